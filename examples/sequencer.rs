//! A miniature sequencer: connects to a publisher, votes on every StartSC,
//! prints every decision, and optionally submits an XTRequest periodically.
//! Reconnects by itself when the publisher restarts.
//!
//! ```text
//! cargo run --example sequencer -- --connect 127.0.0.1:8080 --key-file seq-a.key \
//!     --publisher-key 02ab… --client-id seq-a --chain-id 1 --xt-every 500ms \
//!     [--backend tcp|grpc|quic|ws] [--tls] [--pin-sha256 <publisher's tls fingerprint>]
//! ```
//!
//! With TLS (QUIC, or `--tls`) the publisher's certificate is verified by
//! `--tls-ca` and/or `--pin-sha256`; `--tls-cert`/`--tls-key` present a
//! client certificate to a publisher that requires one.
//!
//! Prints `public key <hex>` (unless `--no-auth`), `connected to ADDR` per
//! (re)connection and `decided <xt_id hex> commit|abort` per decision on
//! stdout; logs on stderr (`RUST_LOG`, default `info`).

#[path = "common/mod.rs"]
mod common;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use common::backend::{self, BackendArgs};
use humantime_serde::re::humantime;
use publisher_transport::{
    Client, ClientAuth, ClientConfig, ConnectionEvent, Inbound, PublicKey, SecretKey, TcpOptions,
    channel_handler, proto::Payload,
};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tracing::{debug, info, warn};

/// First wait before reconnecting: short, so a restarted publisher is found quickly.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VoteChoice {
    Commit,
    Abort,
}

#[derive(Debug, Parser)]
#[command(about = "Sequencer: votes on the publisher's cross-chain transactions")]
struct Args {
    /// Publisher address.
    /// Configuration file (TOML or YAML, see examples/config/); the flags
    /// below override it.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// Private key file (64 hex chars); created with mode 0600 if missing.
    /// Without it the key is ephemeral.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// The publisher's public key (hex, optional 0x): require the publisher
    /// to prove it (mutual authentication).
    #[arg(long, value_name = "HEX", value_parser = parse_public_key)]
    publisher_key: Option<PublicKey>,
    /// Client id sent in the handshake (default: a fresh UUID v7).
    #[arg(long, value_name = "NAME")]
    client_id: Option<String>,
    /// This sequencer's chain id, sent as 8 big-endian bytes.
    #[arg(long, value_name = "N", default_value_t = 1)]
    chain_id: u64,
    /// Retries of the first connection.
    #[arg(long, value_name = "N", default_value_t = 5)]
    retries: u32,
    /// How to vote on every StartSC.
    #[arg(long, value_enum, default_value_t = VoteChoice::Commit)]
    vote: VoteChoice,
    /// Submit an XTRequest this often (e.g. "500ms", "2s").
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    xt_every: Option<Duration>,
    /// Connect without a handshake (a publisher started with --no-auth).
    #[arg(long)]
    no_auth: bool,
    #[command(flatten)]
    transport: BackendArgs,
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

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing("info");
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, backend::BoxError> {
    // Bad back-end flags are reported before a key is printed or created.
    let factory = backend::ClientFactory::new(&args.transport)?;
    let (mut config, tcp, file_auth) = match &args.config {
        Some(path) => publisher_transport::config_file::SequencerFile::load(path)?.into_parts(),
        None => (
            ClientConfig::default().with_reconnect_delay(RECONNECT_DELAY),
            TcpOptions::default(),
            None,
        ),
    };
    if let Some(addr) = &args.connect {
        config.server_addr = addr.clone();
    }
    let connect = config.server_addr.clone();
    if let Some(id) = &args.client_id {
        config = config.with_client_id(id);
    }
    let auth = if args.no_auth || (args.config.is_some() && file_auth.is_none()) {
        if args.publisher_key.is_some() {
            warn!("authentication is off: --publisher-key is not used");
        }
        None
    } else {
        let mut auth = match (&args.key_file, file_auth) {
            (Some(path), file) => {
                let key = Arc::new(SecretKey::load_or_generate(path)?);
                match file {
                    Some(mut auth) => {
                        auth.key = key;
                        auth
                    }
                    None => ClientAuth::new(key),
                }
            }
            (None, Some(auth)) => auth,
            (None, None) => ClientAuth::new(Arc::new(SecretKey::generate())),
        };
        // The publisher operator needs it for --trust.
        common::say(format!("public key {}", auth.key.public_key()));
        if let Some(server_key) = args.publisher_key.clone() {
            auth = auth.with_server_key(server_key);
        }
        Some(auth)
    };

    let client = factory.client(config, tcp, auth);
    let (handler, inbound) = channel_handler(1024);
    client.set_handler(handler);
    // Subscribed before connecting, so the first `Connected` is seen too.
    let events = client.events();
    tokio::spawn(report_events(events));

    let chain_id = common::chain_id_bytes(args.chain_id);
    tokio::spawn(serve(
        client.clone(),
        inbound,
        chain_id.clone(),
        args.vote == VoteChoice::Commit,
    ));

    tokio::select! {
        connected = client.connect_with_retry(&connect, args.retries) => {
            connected.map_err(|err| format!("cannot connect to {connect}: {err}"))?;
        }
        _ = common::shutdown_signal() => return Ok(ExitCode::from(130)),
    }
    info!(client_id = %client.id(), backend = args.transport.backend.name(), "sequencer running");

    if let Some(every) = args.xt_every {
        tokio::spawn(submit_periodically(client.clone(), chain_id, every));
    }

    common::shutdown_signal().await;
    info!("shutting down");
    if let Err(err) = client.disconnect().await {
        debug!(error = %err, "disconnect");
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `connected to ADDR` per session, the reconnects included.
async fn report_events(mut events: tokio::sync::broadcast::Receiver<ConnectionEvent>) {
    loop {
        match events.recv().await {
            Ok(ConnectionEvent::Connected { addr, .. }) => {
                common::say(format!("connected to {addr}"))
            }
            // The client reconnects by itself unless we disconnected.
            Ok(ConnectionEvent::Disconnected {
                reason,
                details,
                by_peer,
            }) => info!(%reason, details, by_peer, "disconnected"),
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => debug!(missed, "connection events missed"),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Votes on each StartSC and prints each Decided.
async fn serve(
    client: Arc<dyn Client>,
    mut inbound: mpsc::Receiver<Inbound>,
    chain_id: Bytes,
    commit: bool,
) {
    while let Some(Inbound { message, .. }) = inbound.recv().await {
        match message.payload {
            Some(Payload::StartSc(start)) => {
                debug!(sequence = start.xt_sequence_number, xt_id = %hex::encode(&start.xt_id), "StartSC");
                if let Err(err) = client
                    .send(common::vote_for(&start, &chain_id, commit))
                    .await
                {
                    warn!(xt_id = %hex::encode(&start.xt_id), error = %err, "vote not sent");
                }
            }
            Some(Payload::Decided(decided)) => {
                let id = decided.xt_id.map(|x| x.hash).unwrap_or_default();
                common::say(format!(
                    "decided {} {}",
                    hex::encode(&id),
                    common::decision_word(decided.decision)
                ));
            }
            Some(Payload::CircMessage(circ)) => info!(
                label = circ.label,
                source_chain = %hex::encode(&circ.source_chain),
                "CIRC message"
            ),
            _ => debug!(
                kind = publisher_transport::proto::payload_kind(&message),
                "ignored message"
            ),
        }
    }
}

/// Submits an XTRequest every `every` while connected.
async fn submit_periodically(client: Arc<dyn Client>, chain_id: Bytes, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    // After an outage, resume the pace rather than send a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !client.is_connected() {
            continue;
        }
        let request = common::random_xt_request(&chain_id);
        let id = common::xt_id(&request);
        match client
            .send(common::message(Payload::XtRequest(request)))
            .await
        {
            Ok(()) => debug!(xt_id = %hex::encode(id), "XTRequest sent"),
            Err(err) => warn!(error = %err, "XTRequest not sent"),
        }
    }
}
