//! secp256k1 keys and Ethereum-style signatures.
//!
//! Signatures are 65 bytes `r || s || v` over a Keccak-256 digest, with `v`
//! the recovery id (0 or 1) and `s` low, exactly as go-ethereum's
//! `crypto.Sign`. Two implementations sit behind one API: `k256` (pure Rust,
//! always available) and libsecp256k1 (the `libsecp256k1` feature), chosen per
//! call with [`CryptoBackend`] or by default with [`CryptoBackend::default`].

pub(crate) mod key_file;
mod keys;
mod trust;

pub use keys::{Address, PublicKey, SecretKey, Signature, recover};
pub use trust::{TrustMode, TrustStore, TrustedPeer};

use sha3::{Digest as _, Keccak256};

use crate::error::KeyError;

/// Length of a signature: `r (32) || s (32) || v (1)`.
pub const SIGNATURE_LEN: usize = 65;
/// Length of a compressed public key.
pub const COMPRESSED_KEY_LEN: usize = 33;
/// Length of an uncompressed public key (`0x04 || x || y`).
pub const UNCOMPRESSED_KEY_LEN: usize = 65;

/// Keccak-256 (Ethereum's original Keccak, not NIST SHA3-256).
pub fn keccak256(data: &[u8]) -> [u8; 32] {
    Keccak256::digest(data).into()
}

/// An incremental Keccak-256, for digests over several fields.
#[derive(Clone, Default)]
pub struct Keccak(Keccak256);

impl Keccak {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Absorbs `data`.
    pub fn update(&mut self, data: &[u8]) -> &mut Self {
        self.0.update(data);
        self
    }

    /// Absorbs `data` preceded by its length as u32 big-endian, so that
    /// adjacent variable-length fields cannot be confused.
    pub fn update_prefixed(&mut self, data: &[u8]) -> &mut Self {
        self.0.update((data.len() as u32).to_be_bytes());
        self.0.update(data);
        self
    }

    /// The digest.
    pub fn finalize(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// Which secp256k1 implementation signs, verifies and recovers.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CryptoBackend {
    /// The pure-Rust `k256` crate.
    K256,
    /// The C libsecp256k1 through the `secp256k1` crate (feature `libsecp256k1`).
    Libsecp256k1,
}

impl Default for CryptoBackend {
    /// libsecp256k1 when compiled in (about 3x faster to verify), else k256.
    fn default() -> Self {
        if cfg!(feature = "libsecp256k1") {
            Self::Libsecp256k1
        } else {
            Self::K256
        }
    }
}

impl CryptoBackend {
    /// Every backend compiled into this build.
    pub fn available() -> &'static [CryptoBackend] {
        if cfg!(feature = "libsecp256k1") {
            &[Self::K256, Self::Libsecp256k1]
        } else {
            &[Self::K256]
        }
    }

    /// The name used on command lines and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::K256 => "k256",
            Self::Libsecp256k1 => "libsecp256k1",
        }
    }

    /// Errors if this backend is not compiled in.
    pub fn ensure_available(self) -> Result<Self, KeyError> {
        if Self::available().contains(&self) {
            Ok(self)
        } else {
            Err(KeyError::BackendUnavailable(self.name()))
        }
    }
}

impl std::fmt::Display for CryptoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CryptoBackend {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "k256" => Ok(Self::K256),
            "libsecp256k1" | "secp256k1" => Self::Libsecp256k1.ensure_available(),
            _ => Err(KeyError::UnknownBackend { name: s.to_owned() }),
        }
    }
}
