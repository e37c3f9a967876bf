//! Private and public keys, signatures, addresses and key files.

use std::{fmt, path::Path};

use k256::{
    ecdsa::{RecoveryId, SigningKey, VerifyingKey, signature::hazmat::PrehashVerifier},
    elliptic_curve::ops::Reduce,
};

use super::{
    COMPRESSED_KEY_LEN, CryptoBackend, SIGNATURE_LEN, UNCOMPRESSED_KEY_LEN, keccak256, key_file,
};
use crate::error::KeyError;

/// A secp256k1 private key. Its `Debug` output shows only the public key.
#[derive(Clone)]
pub struct SecretKey {
    k256: SigningKey,
    #[cfg(feature = "libsecp256k1")]
    secp: secp256k1::SecretKey,
    public: PublicKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        loop {
            let candidate: [u8; 32] = rand::random();
            // Fails only for zero or values ≥ the curve order (~2^-128).
            if let Ok(key) = Self::from_bytes(&candidate) {
                return key;
            }
        }
    }

    /// A key from its 32 big-endian bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let k256 = SigningKey::from_slice(bytes).map_err(|_| KeyError::InvalidPrivateKey {
            reason: "zero or not below the curve order",
        })?;
        let public = PublicKey::from_k256(*k256.verifying_key());
        Ok(Self {
            #[cfg(feature = "libsecp256k1")]
            secp: secp256k1::SecretKey::from_slice(bytes).map_err(|_| {
                KeyError::InvalidPrivateKey {
                    reason: "zero or not below the curve order",
                }
            })?,
            k256,
            public,
        })
    }

    /// A key from 64 hex characters, optionally `0x`-prefixed and surrounded by white space.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = parse_hex_key(text).map_err(|reason| KeyError::InvalidPrivateKey { reason })?;
        Self::from_bytes(&bytes)
    }

    /// Loads a key file: 64 hex characters (optional `0x`, trailing newline allowed).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let raw = key_file::read_private(path).map_err(|source| KeyError::KeyFileIo {
            path: path.to_owned(),
            source,
        })?;
        // Non-UTF-8 content is a malformed key file, not an I/O failure.
        let text = std::str::from_utf8(&raw).map_err(|_| "not hexadecimal");
        let bytes = text
            .and_then(parse_hex_key)
            .map_err(|reason| KeyError::KeyFileFormat {
                path: path.to_owned(),
                reason: reason.to_owned(),
            })?;
        Self::from_bytes(&bytes).map_err(|err| KeyError::KeyFileFormat {
            path: path.to_owned(),
            reason: err.to_string(),
        })
    }

    /// Writes the key as 64 hex characters, readable by the owner only (mode
    /// 0600 on Unix), replacing any file at `path`. The key goes to a
    /// temporary file first and is renamed into place: a symlink at `path` is
    /// replaced, never written through, and no reader sees half a key.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), KeyError> {
        let path = path.as_ref();
        key_file::write_replacing(path, self.to_hex().as_bytes()).map_err(|source| {
            KeyError::KeyFileIo {
                path: path.to_owned(),
                source,
            }
        })
    }

    /// Loads the key at `path`, or creates and saves a fresh one if there is
    /// no file. Creation never replaces a file: when several processes start
    /// at once, one key is written and every one of them loads it.
    pub fn load_or_generate(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        match Self::load(path) {
            Err(KeyError::KeyFileIo { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let key = Self::generate();
                let created =
                    key_file::write_new(path, key.to_hex().as_bytes()).map_err(|source| {
                        KeyError::KeyFileIo {
                            path: path.to_owned(),
                            source,
                        }
                    })?;
                if created { Ok(key) } else { Self::load(path) }
            }
            other => other,
        }
    }

    fn to_hex(&self) -> String {
        hex::encode(self.k256.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs a 32-byte digest with the default backend.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Signature {
        self.sign_digest_with(CryptoBackend::default(), digest)
    }

    /// Signs a 32-byte digest: deterministic (RFC 6979), low-s, `v` ∈ {0, 1}.
    ///
    /// A backend not compiled in falls back to k256; both produce the same bytes.
    pub fn sign_digest_with(&self, backend: CryptoBackend, digest: &[u8; 32]) -> Signature {
        match backend {
            #[cfg(feature = "libsecp256k1")]
            CryptoBackend::Libsecp256k1 => {
                let message = secp256k1::Message::from_digest(*digest);
                let (recovery_id, compact) = secp256k1::SECP256K1
                    .sign_ecdsa_recoverable(&message, &self.secp)
                    .serialize_compact();
                let mut bytes = [0u8; SIGNATURE_LEN];
                bytes[..64].copy_from_slice(&compact);
                bytes[64] = recovery_id.to_i32() as u8;
                Signature(bytes)
            }
            _ => {
                // RFC 6979 (3.2 d, bits2octets) seeds the nonce with the digest
                // reduced mod n, as libsecp256k1 does; k256 0.13 seeds it
                // unreduced, so for a digest ≥ n the two would sign different
                // bytes. Reducing first keeps z (and validity) unchanged.
                let reduced = <k256::Scalar as Reduce<k256::U256>>::reduce_bytes(&(*digest).into());
                let (signature, recovery_id) = self
                    .k256
                    .sign_prehash_recoverable(&reduced.to_bytes())
                    .expect("signing a 32-byte prehash cannot fail");
                let mut bytes = [0u8; SIGNATURE_LEN];
                bytes[..64].copy_from_slice(&signature.to_bytes());
                bytes[64] = recovery_id.to_byte();
                Signature(bytes)
            }
        }
    }

    /// Signs `Keccak-256(message)`, as go-ethereum's `crypto.Sign(Keccak256(msg), key)`.
    pub fn sign_message(&self, message: &[u8]) -> Signature {
        self.sign_digest(&keccak256(message))
    }
}

fn parse_hex_key(text: &str) -> Result<[u8; 32], &'static str> {
    let text = text.trim();
    let text = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if text.len() != 64 {
        return Err("expected 64 hex characters");
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes).map_err(|_| "not hexadecimal")?;
    Ok(bytes)
}

/// A secp256k1 public key. Equality and hashing use its compressed form.
#[derive(Clone)]
pub struct PublicKey {
    compressed: [u8; COMPRESSED_KEY_LEN],
    k256: VerifyingKey,
    #[cfg(feature = "libsecp256k1")]
    secp: secp256k1::PublicKey,
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.compressed == other.compressed
    }
}
impl Eq for PublicKey {}
impl std::hash::Hash for PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.compressed.hash(state);
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self)
    }
}

/// Hex of the compressed key, without `0x`.
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.compressed))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_hex(s)
    }
}

impl PublicKey {
    fn from_k256(k256: VerifyingKey) -> Self {
        let mut compressed = [0u8; COMPRESSED_KEY_LEN];
        compressed.copy_from_slice(k256.to_encoded_point(true).as_bytes());
        Self {
            #[cfg(feature = "libsecp256k1")]
            secp: secp256k1::PublicKey::from_slice(&compressed)
                .expect("k256 produced a valid point"),
            compressed,
            k256,
        }
    }

    /// Parses a 33-byte compressed or 65-byte uncompressed (`0x04…`) key.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let invalid = |reason| KeyError::InvalidPublicKey {
            len: bytes.len(),
            reason,
        };
        match bytes.len() {
            COMPRESSED_KEY_LEN if matches!(bytes[0], 2 | 3) => {}
            UNCOMPRESSED_KEY_LEN if bytes[0] == 4 => {}
            COMPRESSED_KEY_LEN | UNCOMPRESSED_KEY_LEN => return Err(invalid("bad prefix byte")),
            _ => return Err(invalid("expected 33 or 65 bytes")),
        }
        let key = VerifyingKey::from_sec1_bytes(bytes).map_err(|_| invalid("not a curve point"))?;
        Ok(Self::from_k256(key))
    }

    /// Parses a key written in hex (optional `0x`), either form.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let text = text
            .strip_prefix("0x")
            .or_else(|| text.strip_prefix("0X"))
            .unwrap_or(text);
        let bytes = hex::decode(text).map_err(|_| KeyError::InvalidPublicKey {
            len: text.len() / 2,
            reason: "not hexadecimal",
        })?;
        Self::from_slice(&bytes)
    }

    /// The 33-byte compressed form.
    pub fn to_compressed(&self) -> [u8; COMPRESSED_KEY_LEN] {
        self.compressed
    }

    /// The 33-byte compressed form, borrowed.
    pub fn as_compressed(&self) -> &[u8; COMPRESSED_KEY_LEN] {
        &self.compressed
    }

    /// The 65-byte uncompressed form `0x04 || x || y`.
    pub fn to_uncompressed(&self) -> [u8; UNCOMPRESSED_KEY_LEN] {
        let mut out = [0u8; UNCOMPRESSED_KEY_LEN];
        out.copy_from_slice(self.k256.to_encoded_point(false).as_bytes());
        out
    }

    /// The Ethereum address: the last 20 bytes of Keccak-256 of `x || y`.
    pub fn address(&self) -> Address {
        let digest = keccak256(&self.to_uncompressed()[1..]);
        let mut address = [0u8; 20];
        address.copy_from_slice(&digest[12..]);
        Address(address)
    }

    /// Verifies `signature` over `digest` with the default backend.
    pub fn verify_digest(&self, digest: &[u8; 32], signature: &Signature) -> Result<(), KeyError> {
        self.verify_digest_with(CryptoBackend::default(), digest, signature)
    }

    /// Verifies `signature` (its `r || s`; `v` is not needed) over `digest`.
    pub fn verify_digest_with(
        &self,
        backend: CryptoBackend,
        digest: &[u8; 32],
        signature: &Signature,
    ) -> Result<(), KeyError> {
        match backend {
            #[cfg(feature = "libsecp256k1")]
            CryptoBackend::Libsecp256k1 => {
                let message = secp256k1::Message::from_digest(*digest);
                let sig = secp256k1::ecdsa::Signature::from_compact(&signature.0[..64])
                    .map_err(|_| KeyError::VerificationFailed)?;
                secp256k1::SECP256K1
                    .verify_ecdsa(&message, &sig, &self.secp)
                    .map_err(|_| KeyError::VerificationFailed)
            }
            _ => {
                let sig = k256::ecdsa::Signature::from_slice(&signature.0[..64])
                    .map_err(|_| KeyError::VerificationFailed)?;
                self.k256
                    .verify_prehash(digest, &sig)
                    .map_err(|_| KeyError::VerificationFailed)
            }
        }
    }
}

impl PublicKey {
    /// Verifies a 64-byte `r || s` signature (low s) over `digest`. With the
    /// signer's key known, the recovery id is redundant: leaving it out gives
    /// each signature exactly one encoding.
    pub fn verify_compact_with(
        &self,
        backend: CryptoBackend,
        digest: &[u8; 32],
        compact: &[u8],
    ) -> Result<(), KeyError> {
        if compact.len() != 64 {
            return Err(KeyError::InvalidSignature {
                reason: "expected 64 bytes",
            });
        }
        let parsed = k256::ecdsa::Signature::from_slice(compact).map_err(|_| {
            KeyError::InvalidSignature {
                reason: "r or s out of range",
            }
        })?;
        if parsed.normalize_s().is_some() {
            return Err(KeyError::InvalidSignature {
                reason: "s is not low (malleable signature)",
            });
        }
        let mut full = [0u8; SIGNATURE_LEN];
        full[..64].copy_from_slice(compact);
        self.verify_digest_with(backend, digest, &Signature(full))
    }

    /// Checks that `signature` over `digest` recovers to this key: unlike
    /// [`verify_digest_with`](Self::verify_digest_with) this also authenticates
    /// the recovery id, so a 65-byte signature has one valid encoding.
    pub fn verify_recoverable_with(
        &self,
        backend: CryptoBackend,
        digest: &[u8; 32],
        signature: &Signature,
    ) -> Result<(), KeyError> {
        if recover(backend, digest, signature)? == *self {
            Ok(())
        } else {
            Err(KeyError::VerificationFailed)
        }
    }
}

/// Recovers the signer's public key from a signature over `digest`.
pub fn recover(
    backend: CryptoBackend,
    digest: &[u8; 32],
    signature: &Signature,
) -> Result<PublicKey, KeyError> {
    match backend {
        #[cfg(feature = "libsecp256k1")]
        CryptoBackend::Libsecp256k1 => {
            use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
            let message = secp256k1::Message::from_digest(*digest);
            let recovery_id = RecoveryId::from_i32(i32::from(signature.v()))
                .map_err(|_| KeyError::VerificationFailed)?;
            let sig = RecoverableSignature::from_compact(&signature.0[..64], recovery_id)
                .map_err(|_| KeyError::VerificationFailed)?;
            let key = secp256k1::SECP256K1
                .recover_ecdsa(&message, &sig)
                .map_err(|_| KeyError::VerificationFailed)?;
            PublicKey::from_slice(&key.serialize())
        }
        _ => {
            let sig = k256::ecdsa::Signature::from_slice(&signature.0[..64])
                .map_err(|_| KeyError::VerificationFailed)?;
            let recovery_id =
                RecoveryId::from_byte(signature.v()).ok_or(KeyError::VerificationFailed)?;
            let key = VerifyingKey::recover_from_prehash(digest, &sig, recovery_id)
                .map_err(|_| KeyError::VerificationFailed)?;
            Ok(PublicKey::from_k256(key))
        }
    }
}

/// A 65-byte signature `r || s || v`, with `v` ∈ {0, 1} and `s` low.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature([u8; SIGNATURE_LEN]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

impl Signature {
    /// Parses and checks a signature: 65 bytes, `r` and `s` in range, `s`
    /// low (no malleable twins), `v` ∈ {0, 1}.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let invalid = |reason| KeyError::InvalidSignature { reason };
        let bytes: [u8; SIGNATURE_LEN] =
            bytes.try_into().map_err(|_| invalid("expected 65 bytes"))?;
        if bytes[64] > 1 {
            return Err(invalid("recovery id must be 0 or 1"));
        }
        let sig = k256::ecdsa::Signature::from_slice(&bytes[..64])
            .map_err(|_| invalid("r or s out of range"))?;
        if sig.normalize_s().is_some() {
            return Err(invalid("s is not low (malleable signature)"));
        }
        Ok(Self(bytes))
    }

    /// The 65 bytes.
    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }

    /// The recovery id.
    pub fn v(&self) -> u8 {
        self.0[64]
    }

    /// `r || s` without the recovery id.
    pub fn to_compact(&self) -> [u8; 64] {
        let mut compact = [0u8; 64];
        compact.copy_from_slice(&self.0[..64]);
        compact
    }
}

/// A 20-byte Ethereum address; `Display` writes EIP-55 mixed-case hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address(pub [u8; 20]);

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lower = hex::encode(self.0);
        let hash = keccak256(lower.as_bytes());
        f.write_str("0x")?;
        for (i, c) in lower.chars().enumerate() {
            let nibble = (hash[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0x0f;
            if c.is_ascii_alphabetic() && nibble >= 8 {
                write!(f, "{}", c.to_ascii_uppercase())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}
