//! PKCS#12 (`.p12` / `.pfx`) bundles as [`Identity`]s, through the pure-Rust
//! `p12-keystore` crate: no OpenSSL, and the legacy 3DES/RC2 encryption of
//! older tools' bundles is read as well as AES.

use std::path::Path;

use p12_keystore::{
    Certificate, KeyStore, KeyStoreEntry, Pkcs12ImportPolicy, PrivateKey, PrivateKeyChain,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{Identity, TlsError};

/// What is wrong with a PKCS#12 bundle.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Pkcs12Problem {
    /// The password does not open the bundle (its MAC or its encryption).
    #[error("wrong password")]
    WrongPassword,
    /// The bundle holds no private key.
    #[error("no private key in the bundle")]
    MissingKey,
    /// The bundle holds a private key but no certificate for it.
    #[error("no certificate for the private key")]
    MissingCertificate,
    /// The bundle could not be parsed.
    #[error("malformed bundle: {0}")]
    Malformed(String),
}

/// Bundles written by [`Identity::to_pkcs12`] name their entry so.
const ALIAS: &str = "identity";

impl Identity {
    /// From a PKCS#12 file: the first private key and its certificate chain
    /// (leaf first). The file is read as a private key file is (a warning
    /// when others may read it).
    pub fn from_pkcs12(path: impl AsRef<Path>, password: &str) -> Result<Self, TlsError> {
        let path = path.as_ref();
        let what = path.display().to_string();
        let bytes = crate::crypto::key_file::read_private(path).map_err(|source| TlsError::Io {
            path: what.clone(),
            source,
        })?;
        Self::from_pkcs12_der(&bytes, password)
            .map_err(|problem| TlsError::Pkcs12 { what, problem })
    }

    /// From PKCS#12 bytes in memory.
    pub fn from_pkcs12_der(bytes: &[u8], password: &str) -> Result<Self, Pkcs12Problem> {
        // Relaxed keeps a key whose certificate is missing, so that case is
        // told apart from a bundle with no key at all.
        let store = KeyStore::from_pkcs12(bytes, password, Pkcs12ImportPolicy::Relaxed)
            .map_err(classify)?;
        let Some((_, chain)) = store.private_key_chain() else {
            let has_certificate = store
                .entries()
                .any(|(_, entry)| matches!(entry, KeyStoreEntry::Certificate(_)));
            return Err(if has_certificate {
                Pkcs12Problem::MissingKey
            } else {
                Pkcs12Problem::Malformed("the bundle is empty".into())
            });
        };
        if chain.certs().is_empty() {
            return Err(Pkcs12Problem::MissingCertificate);
        }
        Ok(Self {
            chain: chain
                .certs()
                .iter()
                .map(|cert| CertificateDer::from(cert.as_der().to_vec()))
                .collect(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec())),
        })
    }

    /// This identity as a PKCS#12 bundle protected by `password` (AES-256,
    /// HMAC-SHA-256), e.g. for tools that take only PKCS#12. The key must
    /// be PKCS#8, as every generated one is.
    pub fn to_pkcs12(&self, password: &str) -> Result<Vec<u8>, TlsError> {
        let problem = |err: p12_keystore::error::Error| TlsError::Pkcs12 {
            what: "identity".into(),
            problem: Pkcs12Problem::Malformed(err.to_string()),
        };
        let PrivateKeyDer::Pkcs8(key) = &self.key else {
            return Err(TlsError::Pkcs12 {
                what: "identity".into(),
                problem: Pkcs12Problem::Malformed("the private key is not PKCS#8".into()),
            });
        };
        let key = PrivateKey::from_der(key.secret_pkcs8_der()).map_err(problem)?;
        let certs = self
            .chain
            .iter()
            .map(|cert| Certificate::from_der(cert.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(problem)?;
        let local_key_id = self.fingerprint().0.to_vec();
        let mut store = KeyStore::new();
        store.add_entry(
            ALIAS,
            KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(local_key_id, key, certs)),
        );
        store.writer(password).write().map_err(problem)
    }
}

/// A failed MAC check or padding after decryption is what a wrong password
/// produces; everything else is a damaged or unsupported bundle.
fn classify(err: p12_keystore::error::Error) -> Pkcs12Problem {
    use p12_keystore::error::Error;
    match err {
        Error::MacError(_) | Error::UnpadError => Pkcs12Problem::WrongPassword,
        other => Pkcs12Problem::Malformed(other.to_string()),
    }
}
