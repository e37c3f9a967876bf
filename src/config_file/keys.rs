//! Keys in a file: how they are written (hex, trusted-peer entries) and
//! where they come from (a key file or inline), shared by both sides.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer};
use tracing::warn;

use super::{ConfigError, invalid};
use crate::crypto::{CryptoBackend, PublicKey, SecretKey, TrustMode};

/// The settings every `auth` section has, whichever the side: whether to
/// authenticate, where the key comes from, which crypto implementation.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub struct KeySource<'a> {
    /// `auth.enabled`.
    pub enabled: bool,
    /// `auth.private_key_file`.
    pub private_key_file: &'a Option<PathBuf>,
    /// `auth.private_key` (its `Debug` shows the public key only).
    pub private_key: &'a Option<SecretKey>,
    /// `auth.generate_key_if_missing`.
    pub generate_key_if_missing: bool,
    /// `auth.crypto_backend`.
    pub crypto_backend: CryptoBackend,
}

impl KeySource<'_> {
    /// Refuses contradictory key settings.
    pub(super) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        if self.private_key_file.is_some() && self.private_key.is_some() {
            return Err(invalid(
                path,
                "auth",
                "set private_key_file or private_key, not both",
            ));
        }
        if self.generate_key_if_missing && self.private_key_file.is_none() {
            return Err(invalid(
                path,
                "auth.generate_key_if_missing",
                "needs private_key_file (where to save the key)",
            ));
        }
        Ok(())
    }

    /// Fails if the crypto implementation is not compiled in.
    pub(super) fn ensure_backend(&self, path: &Path) -> Result<(), ConfigError> {
        self.crypto_backend
            .ensure_available()
            .map(drop)
            .map_err(|source| ConfigError::Key {
                path: path.to_owned(),
                field: "auth.crypto_backend".into(),
                source,
            })
    }

    /// The key, from the key file or inline; `None` when neither is set.
    pub(super) fn load(&self, path: &Path) -> Result<Option<SecretKey>, ConfigError> {
        if let Some(inline) = self.private_key {
            warn!(
                file = %path.display(),
                "auth.private_key holds the private key inline; prefer private_key_file (mode 0600)"
            );
            return Ok(Some(inline.clone()));
        }
        let Some(key_file) = self.private_key_file else {
            return Ok(None);
        };
        let key = if self.generate_key_if_missing {
            SecretKey::load_or_generate(key_file)
        } else {
            SecretKey::load(key_file)
        }
        .map_err(|source| ConfigError::Key {
            path: path.to_owned(),
            field: "auth.private_key_file".into(),
            source,
        })?;
        // Loading warned if the file's mode lets others read it.
        Ok(Some(key))
    }
}

/// `key_path` relative to the directory of the configuration file at `path`.
pub(super) fn relative_to(path: &Path, key_path: PathBuf) -> PathBuf {
    match path.parent() {
        Some(dir) if key_path.is_relative() => dir.join(key_path),
        _ => key_path,
    }
}

/// Deserializes a private key from hex. Errors never show the value.
pub(super) fn secret_key<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SecretKey>, D::Error> {
    struct Hex;
    const EXPECTED: &str = "a quoted string of 64 hex characters (the value is not shown)";
    impl serde::de::Visitor<'_> for Hex {
        type Value = Option<SecretKey>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(EXPECTED)
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            SecretKey::from_hex(text).map(Some).map_err(E::custom)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        // Anything else is refused without echoing it.
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(E::custom(format_args!("expected {EXPECTED}")))
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(E::custom(format_args!("expected {EXPECTED}")))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(E::custom(format_args!("expected {EXPECTED}")))
        }
        fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<Self::Value, E> {
            Err(E::custom(format_args!("expected {EXPECTED}")))
        }
        fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<Self::Value, E> {
            Err(E::custom(format_args!("expected {EXPECTED}")))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom(format_args!("expected {EXPECTED}")))
        }
        fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            Err(E::custom(format_args!("expected {EXPECTED}")))
        }
    }
    deserializer.deserialize_any(Hex)
}

/// A public key in hex, either form.
struct HexPublicKey(PublicKey);

impl<'de> Deserialize<'de> for HexPublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PublicKey::from_hex(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

pub(super) fn public_key<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PublicKey>, D::Error> {
    Ok(Option::<HexPublicKey>::deserialize(deserializer)?.map(|key| key.0))
}

/// A trusted sequencer's entry in `auth.trusted_sequencers`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// Its public key.
    pub key: PublicKey,
    /// Which handshakes it may use.
    pub mode: TrustMode,
    /// The chain the sequencer sequences (`chain_id`, a string or a
    /// non-negative integer), reported by its sessions.
    pub chain_id: Option<String>,
}

impl<'de> Deserialize<'de> for TrustedKey {
    /// A hex key (extended handshake only), or a table with `key` and
    /// optionally `go_compatible` and `chain_id`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            key: HexPublicKey,
            #[serde(default)]
            go_compatible: bool,
            #[serde(default, deserialize_with = "chain_id")]
            chain_id: Option<String>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TrustedKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a public key in hex, or a table with `key`, `go_compatible` and `chain_id`",
                )
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<TrustedKey, E> {
                Ok(TrustedKey {
                    key: PublicKey::from_hex(text).map_err(E::custom)?,
                    mode: TrustMode::ExtendedOnly,
                    chain_id: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TrustedKey, A::Error> {
                let entry = Entry::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(TrustedKey {
                    key: entry.key.0,
                    mode: if entry.go_compatible {
                        TrustMode::GoCompatible
                    } else {
                        TrustMode::ExtendedOnly
                    },
                    chain_id: entry.chain_id,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A chain id: a non-empty string, or a non-negative integer (TOML and YAML
/// write `chain_id = 10` as a number) kept as its decimal text.
fn chain_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-empty string or a non-negative integer")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            if text.is_empty() {
                return Err(E::custom("a chain id must not be empty"));
            }
            Ok(Some(text.to_owned()))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(n.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            u64::try_from(n)
                .map_err(|_| E::custom("a chain id must not be negative"))
                .and_then(|n| self.visit_u64(n))
        }
    }
    deserializer.deserialize_any(Visitor)
}
