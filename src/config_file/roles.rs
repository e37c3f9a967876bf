//! The two sides: their `auth` sections and what those resolve to.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, KeySource, Role, TrustedKey, invalid, keys, validation_error};
use crate::{
    config::{ClientAuth, ClientConfig, ServerAuth, ServerConfig},
    crypto::{CryptoBackend, PublicKey, SecretKey, TrustStore},
    error::TransportError,
    handshake::{DEFAULT_MAX_CLOCK_SKEW, SignedFramesPolicy},
};

/// The publisher's side: a server, trusting sequencers by key.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub enum Publisher {}

/// A sequencer's side: a client, proving its key to the publisher.
#[non_exhaustive]
#[derive(Debug, Clone, Copy)]
pub enum Sequencer {}

/// The `auth` section of a publisher's file.
#[non_exhaustive]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherAuthSettings {
    /// Whether sequencers must authenticate (required; `false` is Go's
    /// auth-disabled mode: no handshake, no signatures).
    pub enabled: bool,
    /// The publisher's key file (64 hex characters, mode 0600), relative to
    /// the configuration file's directory.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// The key inline, in hex. Prefer `private_key_file`: a configuration
    /// file is copied and shared more often than a key file.
    #[serde(default, deserialize_with = "keys::secret_key")]
    pub private_key: Option<SecretKey>,
    /// Create `private_key_file` with a fresh key if it does not exist.
    #[serde(default)]
    pub generate_key_if_missing: bool,
    /// Trusted sequencers: identity → public key (33 or 65 bytes, hex), or
    /// identity → `{ key = "…", go_compatible = true, chain_id = "…" }`:
    /// `go_compatible` for a sequencer running the Go package (see
    /// [`TrustMode::GoCompatible`](crate::crypto::TrustMode::GoCompatible)),
    /// `chain_id` for the chain its sessions report.
    #[serde(default)]
    pub trusted_sequencers: BTreeMap<String, TrustedKey>,
    /// Signed frames: `off`, `offer` or `require` (needs a key).
    #[serde(default)]
    pub signed_frames: SignedFramesPolicy,
    /// `k256` or `libsecp256k1` (if compiled in).
    #[serde(default)]
    pub crypto_backend: CryptoBackend,
    /// Allowed clock difference of handshake timestamps.
    #[serde(default = "default_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

/// The `auth` section of a sequencer's file.
#[non_exhaustive]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequencerAuthSettings {
    /// Whether to authenticate (required; `false` connects to a publisher in
    /// Go's auth-disabled mode).
    pub enabled: bool,
    /// The sequencer's key file (64 hex characters, mode 0600), relative to
    /// the configuration file's directory.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// The key inline, in hex. Prefer `private_key_file`.
    #[serde(default, deserialize_with = "keys::secret_key")]
    pub private_key: Option<SecretKey>,
    /// Create `private_key_file` with a fresh key if it does not exist.
    #[serde(default)]
    pub generate_key_if_missing: bool,
    /// The publisher's public key: when set, a publisher that does not prove
    /// it is refused (mutual authentication).
    #[serde(default, deserialize_with = "keys::public_key")]
    pub publisher_key: Option<PublicKey>,
    /// Signed frames: `offer` or `off` (`require` is the publisher's setting).
    #[serde(default)]
    pub signed_frames: SignedFramesPolicy,
    /// Speak the handshake extensions; `false` is exactly Go's handshake (no
    /// mutual authentication, no signed frames).
    #[serde(default = "yes")]
    pub extensions: bool,
    /// `k256` or `libsecp256k1` (if compiled in).
    #[serde(default)]
    pub crypto_backend: CryptoBackend,
}

fn default_clock_skew() -> Duration {
    DEFAULT_MAX_CLOCK_SKEW
}

fn yes() -> bool {
    true
}

impl Role for Publisher {
    type Transport = ServerConfig;
    type AuthSettings = PublisherAuthSettings;
    type Auth = ServerAuth;

    fn validate(transport: &ServerConfig) -> Result<(), TransportError> {
        transport.validate()
    }

    fn key_source(auth: &PublisherAuthSettings) -> KeySource<'_> {
        KeySource {
            enabled: auth.enabled,
            private_key_file: &auth.private_key_file,
            private_key: &auth.private_key,
            generate_key_if_missing: auth.generate_key_if_missing,
            crypto_backend: auth.crypto_backend,
        }
    }

    fn key_file_mut(auth: &mut PublisherAuthSettings) -> &mut Option<PathBuf> {
        &mut auth.private_key_file
    }

    fn check_auth(path: &Path, auth: &PublisherAuthSettings) -> Result<(), ConfigError> {
        if auth.trusted_sequencers.contains_key("") {
            return Err(invalid(
                path,
                "auth.trusted_sequencers",
                "an identity must not be empty",
            ));
        }
        if auth.max_clock_skew.is_zero() {
            return Err(invalid(
                path,
                "auth.max_clock_skew",
                "must be longer than zero",
            ));
        }
        Ok(())
    }

    fn resolve_auth(
        path: &Path,
        auth: &PublisherAuthSettings,
        key: Option<SecretKey>,
    ) -> Result<ServerAuth, ConfigError> {
        let trust = TrustStore::new();
        for (id, trusted) in &auth.trusted_sequencers {
            trust
                .add_with_chain(
                    id.clone(),
                    trusted.key.clone(),
                    trusted.mode,
                    trusted.chain_id.clone(),
                )
                .map_err(|source| ConfigError::Key {
                    path: path.to_owned(),
                    field: format!("auth.trusted_sequencers.{id}"),
                    source,
                })?;
        }
        let server_auth = ServerAuth {
            trust: Arc::new(trust),
            key: key.map(Arc::new),
            signed_frames: auth.signed_frames,
            delivery_acks: true,
            backend: auth.crypto_backend,
            max_clock_skew: auth.max_clock_skew,
        };
        server_auth
            .validate()
            .map_err(|err| validation_error(path, err))?;
        Ok(server_auth)
    }

    fn public_key(auth: &ServerAuth) -> Option<&PublicKey> {
        Some(auth.key.as_ref()?.public_key())
    }
}

impl Role for Sequencer {
    type Transport = ClientConfig;
    type AuthSettings = SequencerAuthSettings;
    type Auth = ClientAuth;

    fn validate(transport: &ClientConfig) -> Result<(), TransportError> {
        transport.validate()
    }

    fn key_source(auth: &SequencerAuthSettings) -> KeySource<'_> {
        KeySource {
            enabled: auth.enabled,
            private_key_file: &auth.private_key_file,
            private_key: &auth.private_key,
            generate_key_if_missing: auth.generate_key_if_missing,
            crypto_backend: auth.crypto_backend,
        }
    }

    fn key_file_mut(auth: &mut SequencerAuthSettings) -> &mut Option<PathBuf> {
        &mut auth.private_key_file
    }

    fn check_auth(path: &Path, auth: &SequencerAuthSettings) -> Result<(), ConfigError> {
        if !auth.enabled {
            return Ok(());
        }
        if auth.signed_frames == SignedFramesPolicy::Require {
            return Err(invalid(
                path,
                "auth.signed_frames",
                "a sequencer offers signed frames (`offer`) or not (`off`); `require` is set on the publisher",
            ));
        }
        if !auth.extensions && auth.publisher_key.is_some() {
            return Err(invalid(
                path,
                "auth.publisher_key",
                "mutual authentication needs the handshake extensions (extensions = true)",
            ));
        }
        Ok(())
    }

    fn resolve_auth(
        path: &Path,
        auth: &SequencerAuthSettings,
        key: Option<SecretKey>,
    ) -> Result<ClientAuth, ConfigError> {
        let key = key.ok_or_else(|| no_key(path))?;
        let mut client = ClientAuth::new(Arc::new(key));
        client.server_key = auth.publisher_key.clone();
        client.extensions = auth.extensions;
        client.signed_frames = auth.extensions && auth.signed_frames != SignedFramesPolicy::Off;
        client.backend = auth.crypto_backend;
        Ok(client)
    }

    fn public_key(auth: &ClientAuth) -> Option<&PublicKey> {
        Some(auth.key.public_key())
    }
}

/// A sequencer authenticates with its key: one must be set.
fn no_key(path: &Path) -> ConfigError {
    invalid(
        path,
        "auth",
        "authentication needs a key: set private_key_file",
    )
}
