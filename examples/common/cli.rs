//! The publisher's and the sequencer's command lines, and how each merges a
//! configuration file with its flags: the file is read, the flags applied
//! over it, and only then is the result checked and its keys loaded, so a
//! flag can supply what the file lacks (a key for `signed_frames =
//! "require"`, trusted keys for an empty `trusted_sequencers`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, ValueEnum};
use humantime_serde::re::humantime;
use publisher_transport::{
    ClientAuth, ClientConfig, PublicKey, SecretKey, ServerAuth, ServerConfig, TcpOptions,
    TrustMode, TrustStore,
    config_file::{PublisherSettings, SequencerSettings},
};
use tracing::warn;

use super::backend::{BackendArgs, BoxError};

/// The sequencer's first wait before reconnecting: short, so a restarted
/// publisher is found quickly.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// The publisher's command line.
#[derive(Debug, Parser)]
#[command(
    name = "publisher",
    about = "Publisher: coordinates cross-chain transactions between sequencers"
)]
pub struct PublisherArgs {
    /// Configuration file (TOML or YAML, see examples/config/); the flags
    /// below override it. SIGHUP reloads its trusted keys.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one) [default: 127.0.0.1:8080,
    /// or the file's transport.listen_addr].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Private key file (64 hex chars); created with mode 0600 if missing.
    /// Without it (here or in the file) the key is ephemeral.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Trust a sequencer's key under an identity, for the extended handshake
    /// only (repeatable). The key is a 33-byte compressed or 65-byte
    /// uncompressed secp256k1 key in hex.
    #[arg(long = "trust", value_name = "ID=PUBKEY", value_parser = parse_trust)]
    pub trust: Vec<(String, PublicKey)>,
    /// Trust a sequencer running the Go package: like --trust, but its Go-mode
    /// handshake is accepted too, and its session is unsigned (repeatable).
    #[arg(long = "trust-go", value_name = "ID=PUBKEY", value_parser = parse_trust)]
    pub trust_go: Vec<(String, PublicKey)>,
    /// Go's auth-disabled mode: no handshake, no signatures.
    #[arg(long)]
    pub no_auth: bool,
    /// Address to serve Prometheus metrics on.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Print a `stats` line this often (e.g. "10s"): connections, rounds, and
    /// each sequencer's chain.
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub stats_every: Option<Duration>,
    #[command(flatten)]
    pub transport: BackendArgs,
}

/// A key trusted on the command line: identity, key, mode.
pub type FlagTrust = (String, PublicKey, TrustMode);

/// What the publisher runs with: its file and flags merged and checked.
#[derive(Debug)]
pub struct PublisherSetup {
    /// Server settings.
    pub config: ServerConfig,
    /// The TCP back-end's socket options.
    pub tcp: TcpOptions,
    /// Authentication; `None` in Go's auth-disabled mode.
    pub auth: Option<ServerAuth>,
    /// The publisher's key (ephemeral unless a file holds it).
    pub key: Arc<SecretKey>,
    /// The keys trusted by `--trust` and `--trust-go`, which a reload of the
    /// file leaves as they are.
    pub flag_trust: Vec<FlagTrust>,
}

impl PublisherArgs {
    /// The keys `--trust` and `--trust-go` name.
    pub fn flag_trust(&self) -> Vec<FlagTrust> {
        let extended = self.trust.iter().map(|t| (t, TrustMode::ExtendedOnly));
        let go = self.trust_go.iter().map(|t| (t, TrustMode::GoCompatible));
        extended
            .chain(go)
            .map(|((id, key), mode)| (id.clone(), key.clone(), mode))
            .collect()
    }

    /// Merges the file (if any) and the flags, then checks the result once.
    /// Trusted keys from flags make authentication on, unless `--no-auth`.
    pub fn resolve(&self) -> Result<PublisherSetup, BoxError> {
        // Bad back-end flags are reported before anything else happens.
        self.transport.validate()?;
        let flag_trust = self.flag_trust();
        let flag_key = self.key_file.as_deref().map(SecretKey::load_or_generate);
        let flag_key = flag_key.transpose()?;
        let (mut config, tcp, auth) = match &self.config {
            None => {
                let config = ServerConfig::default().with_listen_addr("127.0.0.1:8080");
                let key = Arc::new(flag_key.clone().unwrap_or_else(SecretKey::generate));
                let auth = (!self.no_auth).then(|| ServerAuth::new(key, Arc::default()));
                (config, TcpOptions::default(), auth)
            }
            Some(path) => {
                let mut settings = PublisherSettings::read(path)?;
                if self.no_auth {
                    settings.auth.enabled = false;
                } else if !flag_trust.is_empty() {
                    settings.auth.enabled = true;
                }
                let file_has_key =
                    settings.auth.private_key_file.is_some() || settings.auth.private_key.is_some();
                // The program always runs with a key: ephemeral if none is given.
                let key = flag_key.clone();
                let key = key.or_else(|| (!file_has_key).then(SecretKey::generate));
                settings.resolve_with_key(key)?.into_parts()
            }
        };
        if let Some(listen) = &self.listen {
            config.listen_addr = listen.clone();
        }
        match &auth {
            Some(auth) => trust_flags(&auth.trust, &flag_trust)?,
            None if !flag_trust.is_empty() => {
                warn!("authentication is off: the --trust and --trust-go keys are not used")
            }
            None => {}
        }
        let key = match auth.as_ref().and_then(|auth| auth.key.clone()) {
            Some(key) => key,
            None => Arc::new(flag_key.unwrap_or_else(SecretKey::generate)),
        };
        Ok(PublisherSetup {
            config,
            tcp,
            auth,
            key,
            flag_trust,
        })
    }
}

/// Adds the keys given by flags to `trust`, over the file's entries of the
/// same identity.
fn trust_flags(trust: &TrustStore, flags: &[FlagTrust]) -> Result<(), BoxError> {
    for (id, key, mode) in flags {
        let flag = if *mode == TrustMode::GoCompatible {
            "--trust-go"
        } else {
            "--trust"
        };
        trust
            .add_with_mode(id.clone(), key.clone(), *mode)
            .map_err(|err| format!("{flag} {id}=…: {err}"))?;
    }
    Ok(())
}

/// How the sequencer votes on every StartSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VoteChoice {
    /// Vote to commit.
    Commit,
    /// Vote to abort.
    Abort,
}

/// The sequencer's command line.
#[derive(Debug, Parser)]
#[command(
    name = "sequencer",
    about = "Sequencer: votes on the publisher's cross-chain transactions"
)]
pub struct SequencerArgs {
    /// Configuration file (TOML or YAML, see examples/config/); the flags
    /// below override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Publisher address [default: 127.0.0.1:8080, or the file's
    /// transport.server_addr].
    #[arg(long, value_name = "ADDR")]
    pub connect: Option<String>,
    /// Private key file (64 hex chars); created with mode 0600 if missing.
    /// Without it the file's key is used; without a file, an ephemeral one.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// The publisher's public key (hex, optional 0x): require the publisher
    /// to prove it (mutual authentication).
    #[arg(long, value_name = "HEX", value_parser = parse_public_key)]
    pub publisher_key: Option<PublicKey>,
    /// Client id sent in the handshake (default: a fresh UUID v7).
    #[arg(long, value_name = "NAME")]
    pub client_id: Option<String>,
    /// This sequencer's chain id, sent as 8 big-endian bytes.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub chain_id: u64,
    /// Retries of the first connection.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,
    /// How to vote on every StartSC.
    #[arg(long, value_enum, default_value_t = VoteChoice::Commit)]
    pub vote: VoteChoice,
    /// Submit an XTRequest this often (e.g. "500ms", "2s").
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub xt_every: Option<Duration>,
    /// Connect without a handshake (a publisher started with --no-auth).
    #[arg(long)]
    pub no_auth: bool,
    #[command(flatten)]
    pub transport: BackendArgs,
}

/// What the sequencer runs with: its file and flags merged and checked.
#[derive(Debug)]
pub struct SequencerSetup {
    /// Client settings; `server_addr` is the publisher to dial.
    pub config: ClientConfig,
    /// The TCP back-end's socket options.
    pub tcp: TcpOptions,
    /// Authentication; `None` without a handshake.
    pub auth: Option<ClientAuth>,
}

impl SequencerArgs {
    /// Merges the file (if any) and the flags, then checks the result once.
    pub fn resolve(&self) -> Result<SequencerSetup, BoxError> {
        // Bad back-end flags are reported before a key is created.
        self.transport.validate()?;
        let flag_key = self.key_file.as_deref().map(SecretKey::load_or_generate);
        let flag_key = flag_key.transpose()?;
        let (mut config, tcp, mut auth) = match &self.config {
            None => {
                let config = ClientConfig::default().with_reconnect_delay(RECONNECT_DELAY);
                let key = || Arc::new(flag_key.unwrap_or_else(SecretKey::generate));
                let auth = (!self.no_auth).then(|| ClientAuth::new(key()));
                (config, TcpOptions::default(), auth)
            }
            Some(path) => {
                let mut settings = SequencerSettings::read(path)?;
                if self.no_auth {
                    settings.auth.enabled = false;
                }
                if let Some(publisher_key) = &self.publisher_key {
                    settings.auth.publisher_key = Some(publisher_key.clone());
                }
                settings.resolve_with_key(flag_key)?.into_parts()
            }
        };
        match (&mut auth, &self.publisher_key) {
            (Some(auth), Some(publisher_key)) => auth.server_key = Some(publisher_key.clone()),
            (None, Some(_)) => warn!("authentication is off: --publisher-key is not used"),
            _ => {}
        }
        if let Some(addr) = &self.connect {
            config.server_addr = addr.clone();
        }
        if let Some(id) = &self.client_id {
            config.client_id = id.clone();
        }
        Ok(SequencerSetup { config, tcp, auth })
    }
}

fn parse_trust(text: &str) -> Result<(String, PublicKey), String> {
    let (id, key) = text
        .split_once('=')
        .ok_or_else(|| "expected ID=PUBKEY".to_owned())?;
    if id.is_empty() {
        return Err("empty identity in ID=PUBKEY".to_owned());
    }
    Ok((id.to_owned(), parse_public_key(key)?))
}

fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    PublicKey::from_hex(text).map_err(|err| err.to_string())
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|err| err.to_string())?;
    if interval.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(interval)
}
