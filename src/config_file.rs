//! Configuration files for a publisher and a sequencer, in TOML or YAML.
//!
//! A file has the Go package's shape: a `transport` section (the fields of
//! [`ServerConfig`] or [`ClientConfig`], same names, same defaults, plus
//! `tcp`: the [`TcpOptions`] of the TCP back-end) and an `auth` section (keys,
//! trusted peers, signed frames). The format follows the extension: `.toml`,
//! `.yaml` or `.yml`.
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
//! before touching key files. Both sides share one implementation,
//! [`Settings`] and [`ConfigFile`], generic over the [`Role`]; what differs
//! (the `auth` section and what it resolves to) is in [`Publisher`] and
//! [`Sequencer`].
//!
//! [`ServerConfig`]: crate::ServerConfig
//! [`ClientConfig`]: crate::ClientConfig
//! [`TcpOptions`]: crate::TcpOptions

mod keys;
mod roles;
mod settings;
mod tree;

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

pub use keys::{KeySource, TrustedKey};
pub use roles::{Publisher, PublisherAuthSettings, Sequencer, SequencerAuthSettings};
pub use settings::{ConfigFile, Role, Settings};

use crate::error::{KeyError, TransportError};

/// A publisher's configuration file, read and checked but with no key file
/// loaded yet.
pub type PublisherSettings = Settings<Publisher>;
/// A sequencer's configuration file, read and checked but with no key file
/// loaded yet.
pub type SequencerSettings = Settings<Sequencer>;
/// A publisher's configuration, ready for
/// `TcpServer::tcp_with(file.tcp, file.transport, file.auth)`.
pub type PublisherFile = ConfigFile<Publisher>;
/// A sequencer's configuration, ready for
/// `TcpClient::tcp_with(file.tcp, file.transport, file.auth)`.
pub type SequencerFile = ConfigFile<Sequencer>;

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
