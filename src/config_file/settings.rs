//! One settings type for both sides: reading, checking and resolving exist
//! once; what differs between a publisher and a sequencer is in [`Role`].

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

use super::{ConfigError, Format, KeySource, keys, tree, validation_error};
use crate::{backend::tcp::TcpOptions, crypto::PublicKey, error::TransportError};

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::super::Publisher {}
    impl Sealed for super::super::Sequencer {}
}

/// The side a configuration file describes: [`Publisher`](super::Publisher)
/// or [`Sequencer`](super::Sequencer). Sealed; its functions are what the
/// shared reading, checking and resolving ask of a side.
pub trait Role: sealed::Sealed + fmt::Debug + Clone + Send + Sync + 'static {
    /// The `transport` section, `tcp` aside: [`ServerConfig`](crate::ServerConfig)
    /// or [`ClientConfig`](crate::ClientConfig).
    type Transport: Serialize + DeserializeOwned + Default + Clone + PartialEq + fmt::Debug;
    /// The `auth` section.
    type AuthSettings: DeserializeOwned + Clone + fmt::Debug;
    /// What an enabled `auth` section resolves to: [`ServerAuth`](crate::ServerAuth)
    /// or [`ClientAuth`](crate::ClientAuth).
    type Auth: Clone + fmt::Debug;

    /// The `transport` section's own checks (its `validate`).
    fn validate(transport: &Self::Transport) -> Result<(), TransportError>;

    /// The key settings of the `auth` section.
    fn key_source(auth: &Self::AuthSettings) -> KeySource<'_>;

    /// `auth.private_key_file`, to be made relative to the file's directory.
    fn key_file_mut(auth: &mut Self::AuthSettings) -> &mut Option<PathBuf>;

    /// The side's own checks of its `auth` section (`path` names the file).
    fn check_auth(path: &Path, auth: &Self::AuthSettings) -> Result<(), ConfigError>;

    /// The authentication an enabled `auth` section describes, with its key.
    fn resolve_auth(
        path: &Path,
        auth: &Self::AuthSettings,
        key: Option<crate::crypto::SecretKey>,
    ) -> Result<Self::Auth, ConfigError>;

    /// The side's own public key, if it has a key.
    fn public_key(auth: &Self::Auth) -> Option<&PublicKey>;
}

/// A configuration file, read and checked but with no key file loaded yet:
/// [`PublisherSettings`](super::PublisherSettings) or
/// [`SequencerSettings`](super::SequencerSettings).
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct Settings<R: Role> {
    /// The `transport` section, `tcp` aside.
    pub transport: R::Transport,
    /// `transport.tcp`: the TCP back-end's socket options.
    pub tcp: TcpOptions,
    /// The `auth` section (`private_key_file` made relative to the file's directory).
    pub auth: R::AuthSettings,
    path: PathBuf,
}

/// A configuration, keys loaded and trust store filled:
/// [`PublisherFile`](super::PublisherFile) or [`SequencerFile`](super::SequencerFile).
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ConfigFile<R: Role> {
    /// Server or client settings.
    pub transport: R::Transport,
    /// The TCP back-end's socket options (`transport.tcp`), for
    /// `TcpServer::tcp_with` / `TcpClient::tcp_with` or `TcpTlsBackend::new`.
    pub tcp: TcpOptions,
    /// Authentication; `None` when `auth.enabled = false`.
    pub auth: Option<R::Auth>,
}

impl<R: Role> ConfigFile<R> {
    /// Reads, checks and resolves a file: loads the key and, for a
    /// publisher, fills the trust store.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Settings::<R>::read(path)?.resolve()
    }

    /// This side's public key (for a sequencer, what the publisher
    /// trusts), if it has a key.
    pub fn public_key(&self) -> Option<&PublicKey> {
        R::public_key(self.auth.as_ref()?)
    }

    /// The settings, the TCP socket options and the authentication.
    pub fn into_parts(self) -> (R::Transport, TcpOptions, Option<R::Auth>) {
        (self.transport, self.tcp, self.auth)
    }
}

impl<R: Role> Settings<R> {
    /// Reads and checks a file, its format from the extension.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let (text, format) = tree::read_text(path.as_ref())?;
        Self::parse(&text, format, path)
    }

    /// Parses and checks a configuration; `path` is where it came from, for
    /// messages and relative key paths.
    pub fn parse(text: &str, format: Format, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let sections = tree::deserialize::<R::Transport, R::AuthSettings>(text, format, path)?;
        let mut auth = sections.auth;
        sections
            .tcp
            .validate()
            .and_then(|()| R::validate(&sections.transport))
            .map_err(|err| validation_error(path, err))?;
        R::key_source(&auth).check(path)?;
        let key_file = R::key_file_mut(&mut auth);
        *key_file = key_file.take().map(|p| keys::relative_to(path, p));
        R::check_auth(path, &auth)?;
        let source = R::key_source(&auth);
        if source.enabled {
            source.ensure_backend(path)?;
        }
        Ok(Self {
            transport: sections.transport,
            tcp: sections.tcp,
            auth,
            path: path.to_owned(),
        })
    }

    /// The file these settings came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the key and, for a publisher, fills the trust store.
    pub fn resolve(&self) -> Result<ConfigFile<R>, ConfigError> {
        self.resolve_with_key(None)
    }

    /// Resolves as [`resolve`](Self::resolve) does, with `key`, when given,
    /// in place of the file's key settings: for a program whose flags may
    /// change the settings (`pub` fields) and give the key, so that the
    /// `auth` checks see the merged result, checked once here.
    pub fn resolve_with_key(
        &self,
        key: Option<crate::crypto::SecretKey>,
    ) -> Result<ConfigFile<R>, ConfigError> {
        R::check_auth(&self.path, &self.auth)?;
        let source = R::key_source(&self.auth);
        let auth = if source.enabled {
            source.ensure_backend(&self.path)?;
            let key = match key {
                Some(key) => Some(key),
                None => source.load(&self.path)?,
            };
            Some(R::resolve_auth(&self.path, &self.auth, key)?)
        } else {
            None
        };
        Ok(ConfigFile {
            transport: self.transport.clone(),
            tcp: self.tcp.clone(),
            auth,
        })
    }
}
