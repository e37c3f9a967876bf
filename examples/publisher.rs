//! A miniature publisher: accepts sequencers and coordinates cross-chain
//! transactions (XTRequest → StartSC → votes → Decided) and relays CIRC
//! messages between them.
//!
//! ```text
//! cargo run --example publisher -- --listen 127.0.0.1:8080 --key-file publisher.key \
//!     --trust seq-a=02ab… --trust-go seq-b=03cd… [--backend tcp|grpc|quic|ws] [--tls]
//! ```
//!
//! `--trust` keys must use the extended handshake; `--trust-go` keys may also
//! use the Go package's handshake, unsigned (a sequencer running the Go SDK).
//!
//! Prints `listening on IP:PORT` and `public key <hex>` on stdout, then
//! `metrics on http://IP:PORT/metrics` with `--metrics-listen`, then `tls
//! fingerprint <sha256 hex>` when TLS is on (QUIC, or `--tls`); without
//! `--tls-cert`/`--tls-key` the certificate is a self-signed one generated at
//! start-up, which sequencers pin with `--pin-sha256`. Logs on stderr
//! (`RUST_LOG`, default `info`). Stops gracefully on Ctrl-C or SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use common::backend::{self, BackendArgs};
use publisher_transport::{
    PublicKey, SecretKey, ServerAuth, ServerConfig, TcpOptions, TrustMode, TrustStore,
    channel_handler,
};
use tracing::{info, warn};

/// Inbound messages buffered for the coordinator before readers wait.
const INBOUND_CAPACITY: usize = 4096;

#[derive(Debug, Parser)]
#[command(about = "Publisher: coordinates cross-chain transactions between sequencers")]
struct Args {
    /// Configuration file (TOML or YAML, see examples/config/); the flags
    /// below override it. SIGHUP reloads its trusted keys.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one) [default: 127.0.0.1:8080,
    /// or the file's transport.listen_addr].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Private key file (64 hex chars); created with mode 0600 if missing.
    /// Without it the key is ephemeral.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Trust a sequencer's key under an identity, for the extended handshake
    /// only (repeatable). The key is a 33-byte compressed or 65-byte
    /// uncompressed secp256k1 key in hex.
    #[arg(long = "trust", value_name = "ID=PUBKEY", value_parser = parse_trust)]
    trust: Vec<(String, PublicKey)>,
    /// Trust a sequencer running the Go package: like --trust, but its Go-mode
    /// handshake is accepted too, and its session is unsigned (repeatable).
    #[arg(long = "trust-go", value_name = "ID=PUBKEY", value_parser = parse_trust)]
    trust_go: Vec<(String, PublicKey)>,
    /// Go's auth-disabled mode: no handshake, no signatures.
    #[arg(long)]
    no_auth: bool,
    /// Address to serve Prometheus metrics on.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    transport: BackendArgs,
}

fn parse_trust(text: &str) -> Result<(String, PublicKey), String> {
    let (id, key) = text
        .split_once('=')
        .ok_or_else(|| "expected ID=PUBKEY".to_owned())?;
    if id.is_empty() {
        return Err("empty identity in ID=PUBKEY".to_owned());
    }
    let key = PublicKey::from_hex(key).map_err(|err| err.to_string())?;
    Ok((id.to_owned(), key))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing("info");
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), backend::BoxError> {
    // Bad back-end flags are reported before anything else happens.
    args.transport.validate()?;
    let flag_trust: Vec<(String, PublicKey, TrustMode)> = args
        .trust
        .iter()
        .map(|(id, key)| (id.clone(), key.clone(), TrustMode::ExtendedOnly))
        .chain(
            args.trust_go
                .iter()
                .map(|(id, key)| (id.clone(), key.clone(), TrustMode::GoCompatible)),
        )
        .collect();
    let file = args
        .config
        .as_deref()
        .map(publisher_transport::config_file::PublisherFile::load)
        .transpose()?;
    let (mut config, tcp, file_auth) = match file {
        Some(file) => file.into_parts(),
        None => (
            ServerConfig::default().with_listen_addr("127.0.0.1:8080"),
            TcpOptions::default(),
            None,
        ),
    };
    if let Some(listen) = &args.listen {
        config.listen_addr = listen.clone();
    }
    let listen = config.listen_addr.clone();
    let key = Arc::new(match (&args.key_file, &file_auth) {
        (Some(path), _) => SecretKey::load_or_generate(path)?,
        (None, Some(ServerAuth { key: Some(key), .. })) => (**key).clone(),
        (None, _) => SecretKey::generate(),
    });
    let auth = if args.no_auth
        || (args.config.is_some() && file_auth.is_none() && flag_trust.is_empty())
    {
        if !flag_trust.is_empty() {
            warn!("--no-auth: the --trust and --trust-go keys are not used");
        }
        None
    } else {
        let mut auth =
            file_auth.unwrap_or_else(|| ServerAuth::new(key.clone(), Arc::new(TrustStore::new())));
        auth.key = Some(key.clone());
        for (id, public, mode) in &flag_trust {
            auth.trust
                .add_with_mode(id.clone(), public.clone(), *mode)
                .map_err(|err| format!("--trust {id}=…: {err}"))?;
        }
        if auth.trust.is_empty() {
            warn!("no trusted keys: every sequencer will be refused");
        }
        Some(auth)
    };
    let trust = auth.as_ref().map(|auth| auth.trust.clone());

    let setup = backend::server(&args.transport, config, tcp, auth)?;
    let server = setup.server;
    // Handler and coordinator first, so no early message finds nobody listening.
    let (handler, inbound) = channel_handler(INBOUND_CAPACITY);
    server.set_handler(handler);
    let coordinator = tokio::spawn(common::Coordinator::new(server.clone()).run(inbound));

    let addr = server.listen(&listen).await?;
    common::say(format!("listening on {addr}"));
    common::say(format!("public key {}", key.public_key()));

    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(metrics_addr) = &args.metrics_listen {
        let bound =
            publisher_transport::metrics::serve(vec![server.metrics()], metrics_addr, async {
                let _ = metrics_stopped.await;
            })
            .await?;
        common::say(format!("metrics on http://{bound}/metrics"));
    }
    if let Some(fingerprint) = &setup.fingerprint {
        common::say(format!("tls fingerprint {fingerprint}"));
        if setup.self_signed {
            info!(
                "TLS with a self-signed certificate generated at start-up; clients pin it with --pin-sha256"
            );
        }
    }
    info!(backend = server.backend_name(), "publisher running");

    match (&args.config, trust) {
        (Some(path), Some(trust)) => reload_on_sighup(path, &trust, &flag_trust).await,
        _ => common::shutdown_signal().await,
    }
    info!("shutting down");
    let _ = stop_metrics.send(());
    coordinator.abort();
    server.stop().await?;
    Ok(())
}

/// Waits for shutdown; on each SIGHUP re-reads the configuration file and
/// applies its trusted keys to the running server: new ids are trusted,
/// changed keys rotate, ids no longer listed (and not given by `--trust`)
/// are removed. Removed or rotated keys lose their live connections.
async fn reload_on_sighup(
    path: &std::path::Path,
    trust: &TrustStore,
    flags: &[(String, PublicKey, TrustMode)],
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        warn!("SIGHUP unavailable: the configuration will not be reloaded");
        return common::shutdown_signal().await;
    };
    let shutdown = common::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = hangups.recv() => {}
        }
        let settings = match publisher_transport::config_file::PublisherSettings::read(path) {
            Ok(settings) => settings,
            Err(err) => {
                warn!(error = %err, "reload failed; keeping the current trusted keys");
                continue;
            }
        };
        let wanted = settings.auth.trusted_sequencers;
        for id in trust.identities() {
            if !wanted.contains_key(&id) && !flags.iter().any(|(flag_id, ..)| *flag_id == id) {
                trust.remove(&id);
                info!(identity = %id, "reload: no longer trusted");
            }
        }
        for (id, entry) in wanted {
            match trust.add_with_mode(id.clone(), entry.key, entry.mode) {
                Ok(Some(old)) if trust.key_of(&id).as_ref() != Some(&old) => {
                    info!(identity = %id, "reload: key rotated")
                }
                Ok(None) => info!(identity = %id, "reload: trusted"),
                Ok(_) => {}
                Err(err) => warn!(identity = %id, error = %err, "reload: key refused"),
            }
        }
        info!(trusted = trust.len(), "configuration reloaded");
    }
}
