//! Configuration files for a publisher and a sequencer, in TOML or YAML.
//!
//! A file has the Go package's shape: a `transport` section (the fields of
//! [`ServerConfig`] or [`ClientConfig`], same names, same defaults) and an
//! `auth` section (keys, trusted peers, signed frames). The format follows the
//! extension: `.toml`, `.yaml` or `.yml`.
//!
//! ```toml
//! [transport]
//! listen_addr = "0.0.0.0:8080"
//! read_timeout = "30s"
//! rate_limit = "off"
//!
//! [auth]
//! enabled = true
//! private_key_file = "publisher.key"
//!
//! [auth.trusted_sequencers]
//! optimism = "02ab…"                                  # extended handshake only
//! legacy = { key = "03cd…", go_compatible = true }    # a Go peer: unsigned session
//! ```
//!
//! Rules:
//! - every key but `auth.enabled` is optional and defaults to the struct's
//!   `Default`; `auth.enabled` must be written out, so that a forgotten
//!   section never yields an unauthenticated server;
//! - durations are human-readable strings (`"500ms"`, `"30s"`, `"1m 30s"`);
//! - the string `"off"` turns an optional setting off (`ping_interval`,
//!   `rate_limit`, `inbound_limit`, `tcp.keep_alive`): TOML has no null;
//! - unknown keys and invalid values are errors naming the file and the key,
//!   e.g. `publisher.toml: transport.read_timeout: invalid duration "30 parsecs": …`;
//! - a relative `private_key_file` is relative to the configuration file's
//!   directory;
//! - private keys never appear in errors or `Debug` output.
//!
//! [`PublisherFile::load`] and [`SequencerFile::load`] read, check and
//! resolve a file in one step (loading the key file, filling the trust
//! store); [`PublisherSettings::read`] and [`SequencerSettings::read`] stop
//! before touching key files.

use std::{
    collections::{BTreeMap, HashSet},
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::DeserializeOwned};
// YAML: `serde_yaml` is deprecated and unmaintained, and `serde_yml` was
// withdrawn as unsound (RUSTSEC-2025-0068); `serde_yaml_ng` is the maintained
// continuation of `serde_yaml` 0.9, with the same API and parser.
use serde_yaml_ng::{Mapping, Value};
use tracing::warn;

use crate::{
    config::{ClientAuth, ClientConfig, ServerAuth, ServerConfig},
    crypto::{CryptoBackend, PublicKey, SecretKey, TrustMode, TrustStore},
    error::{KeyError, TransportError},
    handshake::{DEFAULT_MAX_CLOCK_SKEW, SignedFramesPolicy},
};

/// The value that turns an optional setting off.
pub const OFF: &str = "off";

/// A configuration file's format.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML (`.toml`).
    Toml,
    /// YAML (`.yaml`, `.yml`).
    Yaml,
}

impl Format {
    /// The format a path's extension names, if any.
    pub fn from_path(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "toml" => Some(Self::Toml),
            "yaml" | "yml" => Some(Self::Yaml),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Toml => "TOML",
            Self::Yaml => "YAML",
        })
    }
}

/// Why a configuration file was refused. Every variant names the file; those
/// about one setting also name its key path (`transport.read_timeout`).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The extension names no supported format.
    #[error("{}: unknown configuration format (expected .toml, .yaml or .yml)", path.display())]
    UnknownFormat {
        /// The configuration file.
        path: PathBuf,
    },
    /// The text is not valid TOML or YAML.
    #[error("{}: invalid {format}: {message}", path.display())]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// Its format.
        format: Format,
        /// Where the parser stopped (1-based), when known.
        line: Option<usize>,
        /// The column (1-based), when known.
        column: Option<usize>,
        /// The parser's message, position included.
        message: String,
    },
    /// A setting is unknown, of the wrong type, out of range or inconsistent
    /// with another.
    #[error("{}: {field}: {message}", path.display())]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The key path (`transport.read_timeout`), down to the unknown or
        /// missing key; `.` for the document itself.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A key could not be loaded or trusted.
    #[error("{}: {field}: {source}", path.display())]
    Key {
        /// The configuration file.
        path: PathBuf,
        /// The key path (`auth.private_key_file`, `auth.trusted_sequencers.optimism`).
        field: String,
        /// The key error (never the key itself).
        source: KeyError,
    },
}

impl ConfigError {
    /// The configuration file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. }
            | Self::UnknownFormat { path }
            | Self::Syntax { path, .. }
            | Self::Invalid { path, .. }
            | Self::Key { path, .. } => path,
        }
    }

    /// The key path of the offending setting, if the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } | Self::Key { field, .. } => Some(field),
            _ => None,
        }
    }
}

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
    #[serde(default, deserialize_with = "secret_key")]
    pub private_key: Option<SecretKey>,
    /// Create `private_key_file` with a fresh key if it does not exist.
    #[serde(default)]
    pub generate_key_if_missing: bool,
    /// Trusted sequencers: identity → public key (33 or 65 bytes, hex), or
    /// identity → `{ key = "…", go_compatible = true }` for a sequencer
    /// running the Go package (see [`TrustMode::GoCompatible`]).
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
    #[serde(default, deserialize_with = "secret_key")]
    pub private_key: Option<SecretKey>,
    /// Create `private_key_file` with a fresh key if it does not exist.
    #[serde(default)]
    pub generate_key_if_missing: bool,
    /// The publisher's public key: when set, a publisher that does not prove
    /// it is refused (mutual authentication).
    #[serde(default, deserialize_with = "public_key")]
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

/// A publisher's configuration file, read and checked but with no key file
/// loaded yet.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// The `transport` section.
    pub transport: ServerConfig,
    /// The `auth` section (`private_key_file` made relative to the file's directory).
    pub auth: PublisherAuthSettings,
    path: PathBuf,
}

/// A sequencer's configuration file, read and checked but with no key file
/// loaded yet.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct SequencerSettings {
    /// The `transport` section.
    pub transport: ClientConfig,
    /// The `auth` section (`private_key_file` made relative to the file's directory).
    pub auth: SequencerAuthSettings,
    path: PathBuf,
}

/// The layout of a file; checks and paths are applied after deserializing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document<T, A> {
    #[serde(default)]
    transport: T,
    auth: A,
}

/// A publisher's configuration, ready for `TcpServer::tcp(file.transport, file.auth)`.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct PublisherFile {
    /// Server settings.
    pub transport: ServerConfig,
    /// Authentication; `None` when `auth.enabled = false`.
    pub auth: Option<ServerAuth>,
}

/// A sequencer's configuration, ready for `TcpClient::tcp(file.transport, file.auth)`.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct SequencerFile {
    /// Client settings.
    pub transport: ClientConfig,
    /// Authentication; `None` when `auth.enabled = false`.
    pub auth: Option<ClientAuth>,
}

impl PublisherFile {
    /// Reads, checks and resolves a publisher's file: loads the key, fills
    /// the trust store.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        PublisherSettings::read(path)?.resolve()
    }

    /// The publisher's public key, if it has a key.
    pub fn public_key(&self) -> Option<&PublicKey> {
        let key = self.auth.as_ref()?.key.as_ref()?;
        Some(key.public_key())
    }

    /// The server settings and authentication.
    pub fn into_parts(self) -> (ServerConfig, Option<ServerAuth>) {
        (self.transport, self.auth)
    }
}

impl SequencerFile {
    /// Reads, checks and resolves a sequencer's file: loads the key.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        SequencerSettings::read(path)?.resolve()
    }

    /// The sequencer's public key (what the publisher trusts), if it authenticates.
    pub fn public_key(&self) -> Option<&PublicKey> {
        Some(self.auth.as_ref()?.key.public_key())
    }

    /// The client settings and authentication.
    pub fn into_parts(self) -> (ClientConfig, Option<ClientAuth>) {
        (self.transport, self.auth)
    }
}

impl PublisherSettings {
    /// Reads and checks a publisher's file, its format from the extension.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let (text, format) = read_text(path.as_ref())?;
        Self::parse(&text, format, path)
    }

    /// Parses and checks a publisher's configuration; `path` is where it
    /// came from, for messages and relative key paths.
    pub fn parse(text: &str, format: Format, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let defaults = to_value(&ServerConfig::default());
        let document: Document<ServerConfig, PublisherAuthSettings> =
            deserialize(text, format, path, &defaults)?;
        let mut settings = Self {
            transport: document.transport,
            auth: document.auth,
            path: path.to_owned(),
        };
        let fail = |field: &str, message: &str| invalid(path, field, message);
        settings
            .transport
            .validate()
            .map_err(|err| validation_error(path, err))?;
        let auth = &mut settings.auth;
        check_key_source(
            path,
            &auth.private_key_file,
            &auth.private_key,
            auth.generate_key_if_missing,
        )?;
        auth.private_key_file = auth.private_key_file.take().map(|p| relative_to(path, p));
        if auth.trusted_sequencers.contains_key("") {
            return Err(fail(
                "auth.trusted_sequencers",
                "an identity must not be empty",
            ));
        }
        if auth.max_clock_skew.is_zero() {
            return Err(fail("auth.max_clock_skew", "must be longer than zero"));
        }
        if auth.enabled {
            ensure_backend(path, auth.crypto_backend)?;
        }
        Ok(settings)
    }

    /// The file these settings came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the key and fills the trust store.
    pub fn resolve(&self) -> Result<PublisherFile, ConfigError> {
        let path = &self.path;
        let auth = &self.auth;
        if !auth.enabled {
            return Ok(PublisherFile {
                transport: self.transport.clone(),
                auth: None,
            });
        }
        let key = load_key(
            path,
            &auth.private_key_file,
            &auth.private_key,
            auth.generate_key_if_missing,
        )?;
        let trust = TrustStore::new();
        for (id, trusted) in &auth.trusted_sequencers {
            trust
                .add_with_mode(id.clone(), trusted.key.clone(), trusted.mode)
                .map_err(|source| ConfigError::Key {
                    path: path.clone(),
                    field: format!("auth.trusted_sequencers.{id}"),
                    source,
                })?;
        }
        if trust.is_empty() {
            warn!(
                file = %path.display(),
                "auth.trusted_sequencers is empty: every sequencer is refused until a key is trusted"
            );
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
        Ok(PublisherFile {
            transport: self.transport.clone(),
            auth: Some(server_auth),
        })
    }
}

impl SequencerSettings {
    /// Reads and checks a sequencer's file, its format from the extension.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let (text, format) = read_text(path.as_ref())?;
        Self::parse(&text, format, path)
    }

    /// Parses and checks a sequencer's configuration; `path` is where it
    /// came from, for messages and relative key paths.
    pub fn parse(text: &str, format: Format, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        // Only the defaults' key names are used (the client id is a fresh UUID).
        let defaults = to_value(&ClientConfig::default());
        let document: Document<ClientConfig, SequencerAuthSettings> =
            deserialize(text, format, path, &defaults)?;
        let mut settings = Self {
            transport: document.transport,
            auth: document.auth,
            path: path.to_owned(),
        };
        let fail = |field: &str, message: &str| invalid(path, field, message);
        settings
            .transport
            .validate()
            .map_err(|err| validation_error(path, err))?;
        let auth = &mut settings.auth;
        check_key_source(
            path,
            &auth.private_key_file,
            &auth.private_key,
            auth.generate_key_if_missing,
        )?;
        auth.private_key_file = auth.private_key_file.take().map(|p| relative_to(path, p));
        if !auth.enabled {
            return Ok(settings);
        }
        if auth.private_key_file.is_none() && auth.private_key.is_none() {
            return Err(fail(
                "auth",
                "authentication needs a key: set private_key_file",
            ));
        }
        if auth.signed_frames == SignedFramesPolicy::Require {
            return Err(fail(
                "auth.signed_frames",
                "a sequencer offers signed frames (`offer`) or not (`off`); `require` is set on the publisher",
            ));
        }
        if !auth.extensions && auth.publisher_key.is_some() {
            return Err(fail(
                "auth.publisher_key",
                "mutual authentication needs the handshake extensions (extensions = true)",
            ));
        }
        ensure_backend(path, auth.crypto_backend)?;
        Ok(settings)
    }

    /// The file these settings came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the key.
    pub fn resolve(&self) -> Result<SequencerFile, ConfigError> {
        let auth = &self.auth;
        if !auth.enabled {
            return Ok(SequencerFile {
                transport: self.transport.clone(),
                auth: None,
            });
        }
        let key = load_key(
            &self.path,
            &auth.private_key_file,
            &auth.private_key,
            auth.generate_key_if_missing,
        )?
        .ok_or_else(|| {
            invalid(
                &self.path,
                "auth",
                "authentication needs a key: set private_key_file",
            )
        })?;
        Ok(SequencerFile {
            transport: self.transport.clone(),
            auth: Some({
                let mut client = ClientAuth::new(Arc::new(key));
                client.server_key = auth.publisher_key.clone();
                client.extensions = auth.extensions;
                client.signed_frames =
                    auth.extensions && auth.signed_frames != SignedFramesPolicy::Off;
                client.backend = auth.crypto_backend;
                client
            }),
        })
    }
}

fn default_clock_skew() -> Duration {
    DEFAULT_MAX_CLOCK_SKEW
}

fn yes() -> bool {
    true
}

fn invalid(path: &Path, field: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

/// Maps a `validate` error (`"field: problem"`) to the file's key path.
fn validation_error(path: &Path, err: TransportError) -> ConfigError {
    let TransportError::Config(text) = err else {
        return invalid(path, "transport", &err.to_string());
    };
    let (field, message) = text.split_once(": ").unwrap_or(("", &text));
    let field = if field.starts_with("auth.") {
        field.to_owned()
    } else if field.is_empty() {
        "transport".to_owned()
    } else {
        format!("transport.{field}")
    };
    invalid(path, &field, message)
}

fn ensure_backend(path: &Path, backend: CryptoBackend) -> Result<(), ConfigError> {
    backend
        .ensure_available()
        .map(drop)
        .map_err(|source| ConfigError::Key {
            path: path.to_owned(),
            field: "auth.crypto_backend".into(),
            source,
        })
}

fn check_key_source(
    path: &Path,
    file: &Option<PathBuf>,
    inline: &Option<SecretKey>,
    generate: bool,
) -> Result<(), ConfigError> {
    if file.is_some() && inline.is_some() {
        return Err(invalid(
            path,
            "auth",
            "set private_key_file or private_key, not both",
        ));
    }
    if generate && file.is_none() {
        return Err(invalid(
            path,
            "auth.generate_key_if_missing",
            "needs private_key_file (where to save the key)",
        ));
    }
    Ok(())
}

/// `key_path` relative to the directory of the configuration file at `path`.
fn relative_to(path: &Path, key_path: PathBuf) -> PathBuf {
    match path.parent() {
        Some(dir) if key_path.is_relative() => dir.join(key_path),
        _ => key_path,
    }
}

fn load_key(
    path: &Path,
    file: &Option<PathBuf>,
    inline: &Option<SecretKey>,
    generate: bool,
) -> Result<Option<SecretKey>, ConfigError> {
    if let Some(inline) = inline {
        warn!(
            file = %path.display(),
            "auth.private_key holds the private key inline; prefer private_key_file (mode 0600)"
        );
        return Ok(Some(inline.clone()));
    }
    let Some(key_file) = file else {
        return Ok(None);
    };
    let key = if generate {
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

fn read_text(path: &Path) -> Result<(String, Format), ConfigError> {
    let format = Format::from_path(path).ok_or_else(|| ConfigError::UnknownFormat {
        path: path.to_owned(),
    })?;
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok((text, format))
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_yaml_ng::to_value(value).expect("settings serialize to a YAML value")
}

/// Parses `text` into a tree, then deserializes `T` from it with key paths.
///
/// Going through a tree lets `"off"` stand for null in TOML, and lets
/// unknown keys be refused in sections whose struct accepts them (`tcp`):
/// `transport` is compared against `defaults`, the serialized `Default`.
fn deserialize<T: DeserializeOwned>(
    text: &str,
    format: Format,
    path: &Path,
    defaults: &Value,
) -> Result<T, ConfigError> {
    let syntax = |line, column, message| ConfigError::Syntax {
        path: path.to_owned(),
        format,
        line,
        column,
        message,
    };
    let mut tree: Value = match format {
        Format::Toml => toml::from_str(text).map_err(|err| {
            // The message is built here: toml's own quotes the offending
            // line, which may hold a private key.
            let (line, column) = err.span().map(|span| line_column(text, span.start)).unzip();
            let mut message = err.message().trim_end().to_owned();
            if let (Some(line), Some(column)) = (line, column) {
                message.push_str(&format!(" at line {line} column {column}"));
            }
            syntax(line, column, message)
        })?,
        Format::Yaml => {
            let mut tree: Value = serde_yaml_ng::from_str(text).map_err(|err| {
                let location = err.location();
                syntax(
                    location.as_ref().map(|l| l.line()),
                    location.as_ref().map(|l| l.column()),
                    err.to_string(),
                )
            })?;
            tree.apply_merge()
                .map_err(|err| syntax(None, None, err.to_string()))?;
            tree
        }
    };
    if tree.is_null() {
        tree = Value::Mapping(Mapping::new());
    }
    let mut turned_off = HashSet::new();
    if let Some(transport) = tree.get_mut("transport") {
        let mut at = vec!["transport".to_owned()];
        turn_off(transport, &mut at, &mut turned_off);
        check_known_keys(transport, defaults, &mut at)
            .map_err(|(field, message)| invalid(path, &field, &message))?;
    }
    serde_path_to_error::deserialize(&tree).map_err(|err| {
        let mut field = err.path().to_string();
        let message = explain(&tree, err.path(), &field, &turned_off, err.inner());
        // The path names the unknown or missing key itself.
        if let Some(key) = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|prefix| message.strip_prefix(prefix))
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| key)
            && field.rsplit('.').next() != Some(key)
        {
            field = match field.as_str() {
                "." => key.to_owned(),
                parent => format!("{parent}.{key}"),
            };
        }
        invalid(path, &field, &message)
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Replaces every `"off"` string under `value` by null, recording where.
fn turn_off(value: &mut Value, at: &mut Vec<String>, turned_off: &mut HashSet<String>) {
    match value {
        Value::String(text) if text == OFF => {
            *value = Value::Null;
            turned_off.insert(at.join("."));
        }
        Value::Mapping(map) => {
            for (key, child) in map.iter_mut() {
                at.push(key_name(key));
                turn_off(child, at, turned_off);
                at.pop();
            }
        }
        _ => {}
    }
}

/// Refuses keys of `value`'s mappings that `reference` lacks, where
/// `reference` has a mapping.
fn check_known_keys(
    value: &Value,
    reference: &Value,
    at: &mut Vec<String>,
) -> Result<(), (String, String)> {
    let (Value::Mapping(map), Value::Mapping(known)) = (value, reference) else {
        return Ok(());
    };
    for (key, child) in map {
        at.push(key_name(key));
        let Some(expected) = known.get(key) else {
            let names: Vec<String> = known.keys().map(|k| format!("`{}`", key_name(k))).collect();
            return Err((
                at.join("."),
                format!(
                    "unknown field `{}`, expected one of {}",
                    key_name(key),
                    names.join(", ")
                ),
            ));
        };
        check_known_keys(child, expected, at)?;
        at.pop();
    }
    Ok(())
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(text) => text.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|text| text.trim_end().to_owned())
            .unwrap_or_default(),
    }
}

/// The deserializer's message, made specific where it is vague.
fn explain(
    tree: &Value,
    at: &serde_path_to_error::Path,
    field: &str,
    turned_off: &HashSet<String>,
    err: &serde_yaml_ng::Error,
) -> String {
    let message = err.to_string();
    if turned_off.contains(field) {
        return format!("\"{OFF}\" turns off optional settings only; this one needs a value");
    }
    if message.ends_with("expected a duration") {
        let raw = at.iter().try_fold(tree, |value, segment| match segment {
            serde_path_to_error::Segment::Map { key } => value.get(key.as_str()),
            serde_path_to_error::Segment::Seq { index } => value.get(*index),
            _ => None,
        });
        return match raw {
            Some(Value::String(text)) => {
                let reason = humantime_serde::re::humantime::parse_duration(text)
                    .err()
                    .map_or(String::new(), |err| format!(": {err}"));
                format!("invalid duration {text:?}{reason}")
            }
            _ => format!("{message} (a string such as \"30s\", \"500ms\" or \"1m 30s\")"),
        };
    }
    message
}

/// Deserializes a private key from hex. Errors never show the value.
fn secret_key<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SecretKey>, D::Error> {
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

fn public_key<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PublicKey>, D::Error> {
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
}

impl<'de> Deserialize<'de> for TrustedKey {
    /// A hex key (extended handshake only), or a table with `key` and
    /// `go_compatible`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            key: HexPublicKey,
            #[serde(default)]
            go_compatible: bool,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TrustedKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a public key in hex, or a table with `key` and `go_compatible`")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<TrustedKey, E> {
                Ok(TrustedKey {
                    key: PublicKey::from_hex(text).map_err(E::custom)?,
                    mode: TrustMode::ExtendedOnly,
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
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
