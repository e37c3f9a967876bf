//! TLS shared by every back-end that uses it (TCP with TLS, gRPC, QUIC):
//! PEM and PKCS#12 loading, rustls server and client configs, mutual TLS with a client
//! CA, SHA-256 certificate fingerprint pinning, and self-signed development
//! certificates.
//!
//! A client must trust the server somehow: a CA, pinned fingerprints, or
//! both (then both must hold). Pinning alone still checks the certificate's
//! validity period and the TLS handshake signature, so a stolen certificate
//! without its key, or an expired one, is refused.

use std::{fmt, path::Path, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use sha2::{Digest, Sha256};

mod pkcs12;

pub use self::pkcs12::Pkcs12Problem;

/// ALPN identifier of this crate's protocol over QUIC and TLS-over-TCP.
pub const ALPN: &[u8] = b"publisher-transport/1";

/// Errors of the TLS utilities.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{what}: {reason}")]
    Pem {
        /// What was being loaded (a path or "certificate").
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A fingerprint is not 32 bytes of hex.
    #[error("invalid SHA-256 fingerprint {0:?}: expected 64 hex digits (colons allowed)")]
    InvalidFingerprint(String),
    /// Neither a CA nor a pinned fingerprint: the peer could not be verified.
    #[error("no way to verify the peer: give a CA certificate or a pinned SHA-256 fingerprint")]
    NothingToTrust,
    /// Generating a certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be turned into a verifier.
    #[error("client CA: {0}")]
    ClientCa(String),
    /// A PKCS#12 bundle could not be used.
    #[error("PKCS#12 {what}: {problem}")]
    Pkcs12 {
        /// The file (or "identity" when writing one).
        what: String,
        /// What is wrong.
        problem: Pkcs12Problem,
    },
}

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(Sha256::digest(cert.as_ref()).into())
    }
}

/// Lowercase hex without separators.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Accepts `ab12…` or `AB:12:…` (as `openssl x509 -fingerprint -sha256` prints).
impl std::str::FromStr for Fingerprint {
    type Err = TlsError;

    fn from_str(text: &str) -> Result<Self, TlsError> {
        let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes)
            .map_err(|_| TlsError::InvalidFingerprint(text.to_owned()))?;
        Ok(Self(bytes))
    }
}

/// A certificate chain and its private key: what a TLS endpoint presents.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// From PEM text: certificates (leaf first) and a PKCS#8, PKCS#1 or SEC1 key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certs_from_pem(cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| TlsError::Pem {
            what: "private key".into(),
            reason: err.to_string(),
        })?;
        Ok(Self { chain, key })
    }

    /// From PEM files.
    pub fn from_pem_files(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let cert_pem = read(cert_path.as_ref())?;
        // Warns if the key file is readable by other users.
        let key_pem =
            crate::crypto::key_file::read_private(key_path.as_ref()).map_err(|source| {
                TlsError::Io {
                    path: key_path.as_ref().display().to_string(),
                    source,
                }
            })?;
        let chain = certs_from_pem(&cert_pem, &cert_path.as_ref().display().to_string())?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::Pem {
            what: key_path.as_ref().display().to_string(),
            reason: err.to_string(),
        })?;
        Ok(Self { chain, key })
    }

    /// A fresh self-signed certificate for `names` (DNS names or IP
    /// addresses), for development: pin its [`fingerprint`](Self::fingerprint).
    pub fn self_signed(names: &[&str]) -> Result<Self, TlsError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names)?;
        Ok(Self {
            chain: vec![certified.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
        })
    }

    /// SHA-256 fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.chain[0])
    }

    /// The chain in PEM, e.g. to hand to a client as its CA.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|cert| pem_encode("CERTIFICATE", cert))
            .collect()
    }

    /// The private key in PEM (PKCS#8). Handle with care.
    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", self.key.secret_der())
    }
}

/// A development certificate authority, for mutual TLS between your own
/// nodes and for tests.
pub struct CertificateAuthority {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    cert: CertificateDer<'static>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &Fingerprint::of(&self.cert))
            .finish_non_exhaustive()
    }
}

/// How long an issued certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Validity {
    /// rcgen's default: from 1975 to 4096.
    Long,
    /// Expired: valid only during the year 2000 (for tests).
    Expired,
}

impl CertificateAuthority {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?.der().clone();
        Ok(Self { params, key, cert })
    }

    /// The CA certificate, to trust.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues a certificate for `names`, signed by this CA.
    pub fn issue(&self, names: &[&str], validity: Validity) -> Result<Identity, TlsError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names)?;
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = rcgen::KeyPair::generate()?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone(), self.cert.clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            what: what.to_owned(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Loads every certificate of a PEM file (e.g. a CA bundle).
pub fn load_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = path.as_ref();
    certs_from_pem(&read(path)?, &path.display().to_string())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a server is verified by a client.
#[derive(Debug, Clone, Default)]
pub struct ServerTrust {
    /// CA certificates the server's chain must lead to.
    pub roots: Vec<CertificateDer<'static>>,
    /// Accepted SHA-256 fingerprints of the server's leaf certificate.
    pub pins: Vec<Fingerprint>,
    /// Our certificate for mutual TLS, if the server asks for one.
    pub identity: Option<Identity>,
    /// Also speak TLS 1.2 (default: TLS 1.3 only). QUIC is always TLS 1.3.
    pub allow_tls12: bool,
}

impl ServerTrust {
    /// Trust a server by its certificate fingerprint.
    pub fn pinned(fingerprint: Fingerprint) -> Self {
        Self {
            pins: vec![fingerprint],
            ..Self::default()
        }
    }

    /// Trust servers whose chain leads to `ca`.
    pub fn ca(ca: CertificateDer<'static>) -> Self {
        Self {
            roots: vec![ca],
            ..Self::default()
        }
    }

    /// Presents `identity` when the server asks for a client certificate.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }
}

/// How a server verifies clients (mutual TLS); default: no client certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientTrust {
    /// CA certificates a client's chain must lead to.
    pub roots: Vec<CertificateDer<'static>>,
    /// Accepted SHA-256 fingerprints of a client's leaf certificate.
    pub pins: Vec<Fingerprint>,
    /// Also accept TLS 1.2 clients (default: TLS 1.3 only). QUIC is always
    /// TLS 1.3.
    pub allow_tls12: bool,
}

/// TLS 1.3 only unless TLS 1.2 is asked for: 1.3 has no downgradable cipher
/// suites or renegotiation, and every supported peer speaks it.
fn protocol_versions(allow_tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    if allow_tls12 {
        rustls::ALL_VERSIONS
    } else {
        &TLS13_ONLY
    }
}

/// A rustls client config verifying the server by `trust`, offering `alpn`.
pub fn client_config(
    trust: &ServerTrust,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    if trust.roots.is_empty() && trust.pins.is_empty() {
        return Err(TlsError::NothingToTrust);
    }
    let provider = provider();
    let verifier = Arc::new(PinningVerifier::new(
        &trust.roots,
        &trust.pins,
        provider.clone(),
    )?);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(protocol_versions(trust.allow_tls12))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &trust.identity {
        Some(identity) => {
            builder.with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A rustls server config presenting `identity`, verifying clients by `clients`.
pub fn server_config(
    identity: &Identity,
    clients: &ClientTrust,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(protocol_versions(clients.allow_tls12))?;
    let builder = if clients.roots.is_empty() && clients.pins.is_empty() {
        builder.with_no_client_auth()
    } else {
        let verifier = Arc::new(PinningVerifier::new(
            &clients.roots,
            &clients.pins,
            provider,
        )?);
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Verifies a peer's certificate against CA roots (when given) and pinned
/// fingerprints (when given); with pins only, checks the validity period itself.
#[derive(Debug)]
struct PinningVerifier {
    server_webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    client_webpki: Option<Arc<dyn ClientCertVerifier>>,
    pins: Vec<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinningVerifier {
    fn new(
        roots: &[CertificateDer<'static>],
        pins: &[Fingerprint],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let (server_webpki, client_webpki) = if roots.is_empty() {
            (None, None)
        } else {
            let mut store = rustls::RootCertStore::empty();
            for root in roots {
                store.add(root.clone())?;
            }
            let store = Arc::new(store);
            let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
                store.clone(),
                provider.clone(),
            )
            .build()
            .map_err(|err| TlsError::ClientCa(err.to_string()))?;
            let client = rustls::server::WebPkiClientVerifier::builder_with_provider(
                store,
                provider.clone(),
            )
            .build()
            .map_err(|err| TlsError::ClientCa(err.to_string()))?;
            (Some(server), Some(client))
        };
        Ok(Self {
            server_webpki,
            client_webpki,
            pins: pins.to_vec(),
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// Pin and (without a CA) validity checks on the leaf certificate.
    fn check_leaf(
        &self,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
        ca_checked: bool,
    ) -> Result<(), rustls::Error> {
        if !self.pins.is_empty() && !self.pins.contains(&Fingerprint::of(leaf)) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        if !ca_checked {
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            let validity = cert.validity();
            let seconds = now.as_secs() as i64;
            let at = |time: x509_parser::time::ASN1Time| {
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    time.timestamp().max(0) as u64
                ))
            };
            // The same detailed errors as CA verification gives.
            if seconds > validity.not_after.timestamp() {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredContext {
                        time: now,
                        not_after: at(validity.not_after),
                    },
                ));
            }
            if seconds < validity.not_before.timestamp() {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidYetContext {
                        time: now,
                        not_before: at(validity.not_before),
                    },
                ));
            }
        }
        Ok(())
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(webpki) = &self.server_webpki {
            webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )?;
        }
        self.check_leaf(end_entity, now, self.server_webpki.is_some())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinningVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.client_webpki
            .as_ref()
            .map_or(&[], |v| v.root_hint_subjects())
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(webpki) = &self.client_webpki {
            webpki.verify_client_cert(end_entity, intermediates, now)?;
        }
        self.check_leaf(end_entity, now, self.client_webpki.is_some())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server name to present for `addr` (`host:port`): an IP address or a DNS name.
pub fn server_name_for(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::Pem {
        what: "server name".into(),
        reason: format!("{host:?} is neither a DNS name nor an IP address"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_both_spellings() {
        let identity = Identity::self_signed(&["localhost"]).unwrap();
        let plain = identity.fingerprint().to_string();
        let colons = plain
            .as_bytes()
            .chunks(2)
            .map(|pair| std::str::from_utf8(pair).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            plain.parse::<Fingerprint>().unwrap(),
            identity.fingerprint()
        );
        assert_eq!(
            colons.parse::<Fingerprint>().unwrap(),
            identity.fingerprint()
        );
        assert!("abc".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn pem_round_trips() {
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let again = Identity::from_pem(
            identity.chain_pem().as_bytes(),
            identity.key_pem().as_bytes(),
        )
        .unwrap();
        assert_eq!(again.chain, identity.chain);
        assert_eq!(again.key.secret_der(), identity.key.secret_der());
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name_for("127.0.0.1:80").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name_for("[::1]:80").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name_for("localhost:80").unwrap(),
            ServerName::DnsName(_)
        ));
    }

    #[test]
    fn a_client_must_trust_something() {
        assert!(matches!(
            client_config(&ServerTrust::default(), &[ALPN]),
            Err(TlsError::NothingToTrust)
        ));
    }
}
