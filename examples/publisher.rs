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
//! start-up, which sequencers pin with `--pin-sha256`. With `--stats-every`
//! it prints `stats connections=N started=N committed=N aborted=N
//! relayed=N chains=ID:CHAIN,…` that often, `-` for a sequencer without a
//! chain id (one comes from its `trusted_sequencers` entry). Logs on stderr
//! (`RUST_LOG`, default `info`). Stops gracefully on Ctrl-C or SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::{
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use clap::Parser;
use common::{
    CoordinatorStats, backend,
    cli::{FlagTrust, PublisherArgs},
};
use publisher_transport::{Server, TrustStore, channel_handler};
use tracing::{info, warn};

/// Inbound messages buffered for the coordinator before readers wait.
const INBOUND_CAPACITY: usize = 4096;

#[tokio::main]
async fn main() -> ExitCode {
    let args = PublisherArgs::parse();
    common::init_tracing("info");
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: PublisherArgs) -> Result<(), backend::BoxError> {
    let setup = args.resolve()?;
    let listen = setup.config.listen_addr.clone();
    let trust = setup.auth.as_ref().map(|auth| auth.trust.clone());
    let key = setup.key.clone();

    let backend = backend::server(&args.transport, setup.config, setup.tcp, setup.auth)?;
    let server = backend.server;
    // Handler and coordinator first, so no early message finds nobody listening.
    let (handler, inbound) = channel_handler(INBOUND_CAPACITY);
    server.set_handler(handler);
    let coordinator = common::Coordinator::new(server.clone());
    let stats = coordinator.stats();
    let coordinator = tokio::spawn(coordinator.run(inbound));

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
    if let Some(fingerprint) = &backend.fingerprint {
        common::say(format!("tls fingerprint {fingerprint}"));
        if backend.self_signed {
            info!(
                "TLS with a self-signed certificate generated at start-up; clients pin it with --pin-sha256"
            );
        }
    }
    info!(backend = server.backend_name(), "publisher running");
    let reporter = args
        .stats_every
        .map(|every| tokio::spawn(report_stats(server.clone(), stats, every)));

    match (&args.config, trust) {
        (Some(path), Some(trust)) => reload_on_sighup(path, &trust, &setup.flag_trust).await,
        _ => common::shutdown_signal().await,
    }
    info!("shutting down");
    let _ = stop_metrics.send(());
    coordinator.abort();
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    server.stop().await?;
    Ok(())
}

/// Prints a `stats` line every `every`: the coordinator's counters and, per
/// connected sequencer, its chain id.
async fn report_stats(server: Arc<dyn Server>, stats: Arc<CoordinatorStats>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let mut connections = server.connections();
        connections.sort_by(|a, b| a.identity.cmp(&b.identity));
        let chains: Vec<String> = connections
            .iter()
            .map(|c| format!("{}:{}", c.identity, c.chain_id.as_deref().unwrap_or("-")))
            .collect();
        let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        common::say(format!(
            "stats connections={} started={} committed={} aborted={} relayed={} chains={}",
            connections.len(),
            count(&stats.started),
            count(&stats.committed),
            count(&stats.aborted),
            count(&stats.relayed),
            chains.join(",")
        ));
    }
}

/// Waits for shutdown; on each SIGHUP re-reads the configuration file and
/// applies its trusted keys to the running server: new ids are trusted,
/// changed keys rotate, ids no longer listed (and not given by `--trust`)
/// are removed; ids given by `--trust` or `--trust-go` keep the flag's key.
/// Removed or rotated keys lose their live connections.
async fn reload_on_sighup(path: &std::path::Path, trust: &TrustStore, flags: &[FlagTrust]) {
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
            if flags.iter().any(|(flag_id, ..)| *flag_id == id) {
                // The command line overrides the file.
                continue;
            }
            match trust.add_with_chain(id.clone(), entry.key, entry.mode, entry.chain_id) {
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
