//! One publisher and three sequencers in one process, mutually
//! authenticated with signed frames on 127.0.0.1, driving 1,000 cross-chain
//! transactions through XTRequest → StartSC → votes → Decided.
//!
//! `cargo run --release --example demo [-- --backend tcp|grpc|quic|ws]` (add
//! `--all-features` for libsecp256k1). QUIC runs over TLS with a self-signed
//! certificate the sequencers pin. Prints a summary; exits non-zero if
//! anything is missing after the global timeout. Logs on stderr (`RUST_LOG`,
//! default `warn`).

#[path = "common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    process::ExitCode,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use common::backend::{self, BackendArgs, BackendKind};
use publisher_transport::{
    Client, ClientAuth, ClientConfig, CryptoBackend, Inbound, SecretKey, ServerAuth, ServerConfig,
    TcpOptions, TrustStore, channel_handler, proto::Payload,
};
use tokio::{
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tracing::warn;

const SEQUENCERS: usize = 3;
const TRANSACTIONS: usize = 1_000;
/// XTs outstanding at once: enough to keep every connection busy, bounded so
/// latencies measure the protocol rather than a queue.
const WINDOW: usize = 32;
const GLOBAL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the sequencers observed, shared by their tasks and the driver.
#[derive(Default)]
struct Progress {
    latencies: Mutex<Vec<Duration>>,
    committed: AtomicU64,
    aborted: AtomicU64,
    send_failures: AtomicU64,
}

/// XTs a sequencer submitted and awaits, with when it sent each.
type Pending = Arc<Mutex<HashMap<Bytes, Instant>>>;

#[derive(Debug, Parser)]
#[command(about = "Publisher and three sequencers in one process: 1,000 cross-chain transactions")]
struct Args {
    /// Transport: tcp, grpc, quic or ws.
    #[arg(long, value_enum, default_value_t = BackendKind::Tcp)]
    backend: BackendKind,
}

struct Sequencer {
    client: Arc<dyn Client>,
    chain_id: Bytes,
    pending: Pending,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing("warn");
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, backend::BoxError> {
    let backend = CryptoBackend::default();
    let server_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    // TLS only where the back-end cannot do without it (QUIC): a fresh
    // self-signed certificate, pinned by the sequencers.
    let mut transport = BackendArgs::new(args.backend, false);
    let setup = backend::server(
        &transport,
        ServerConfig::default().with_listen_addr("127.0.0.1:0"),
        TcpOptions::default(),
        Some(ServerAuth::new(server_key.clone(), trust.clone())),
    )?;
    let server = setup.server;
    transport.pin_sha256.extend(setup.fingerprint.clone());
    let clients = backend::ClientFactory::new(&transport)?;
    let (handler, inbound) = channel_handler(4096);
    server.set_handler(handler);
    let coordinator = common::Coordinator::new(server.clone());
    let coordinator_stats = coordinator.stats();
    let coordinator = tokio::spawn(coordinator.run(inbound));
    let addr = server.start().await?.to_string();

    let progress = Arc::new(Progress::default());
    let window = Arc::new(Semaphore::new(WINDOW));
    let mut sequencers = Vec::with_capacity(SEQUENCERS);
    for n in 1..=SEQUENCERS {
        let name = format!("seq-{n}");
        let key = Arc::new(SecretKey::generate());
        trust.add(name.clone(), key.public_key().clone())?;
        let client = clients.client(
            ClientConfig::default().with_client_id(&name),
            TcpOptions::default(),
            Some(ClientAuth::new(key).with_server_key(server_key.public_key().clone())),
        );
        let (handler, inbound) = channel_handler(4096);
        client.set_handler(handler);
        let sequencer = Sequencer {
            client,
            chain_id: common::chain_id_bytes(n as u64),
            pending: Pending::default(),
        };
        tokio::spawn(run_sequencer(
            sequencer.client.clone(),
            inbound,
            sequencer.chain_id.clone(),
            sequencer.pending.clone(),
            progress.clone(),
            window.clone(),
        ));
        sequencer.client.connect(&addr).await?;
        sequencers.push(sequencer);
    }

    // The server registers a connection just after its handshake reply, so
    // it may trail the clients' `connect` by a moment.
    let registered = wait_until(Duration::from_secs(5), || {
        server.connections().len() == SEQUENCERS
    })
    .await;
    let connections = server.connections();
    if !registered {
        return Err(format!(
            "{} of {SEQUENCERS} sequencers registered at the publisher",
            connections.len()
        )
        .into());
    }
    if let Some(plain) = connections.iter().find(|c| !c.signed_frames) {
        return Err(format!("connection {} is not in signed mode", plain.identity).into());
    }

    let started = Instant::now();
    let finished = tokio::time::timeout(GLOBAL_TIMEOUT, drive(&sequencers, &progress, &window))
        .await
        .is_ok();
    let elapsed = started.elapsed();

    // Decisions for others' XTs may still be in flight to the non-originating
    // sequencers: let the counters settle so sent and received match.
    let counts = || {
        let (mut clients_out, mut clients_in) = (0, 0);
        for sequencer in &sequencers {
            if let Some(info) = sequencer.client.stats().connection {
                clients_out += info.messages_out;
                clients_in += info.messages_in;
            }
        }
        let (mut server_in, mut server_out) = (0, 0);
        for info in server.connections() {
            server_in += info.messages_in;
            server_out += info.messages_out;
        }
        (server_in, server_out, clients_out, clients_in)
    };
    wait_until(Duration::from_secs(2), || {
        let (server_in, server_out, clients_out, clients_in) = counts();
        server_in == clients_out && server_out == clients_in
    })
    .await;
    let (server_in, server_out, clients_out, clients_in) = counts();

    let committed = progress.committed.load(Ordering::Relaxed);
    let aborted = progress.aborted.load(Ordering::Relaxed);
    let decided = committed + aborted;
    let mut latencies = std::mem::take(
        &mut *progress
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    latencies.sort_unstable();

    println!("publisher on {addr}, {SEQUENCERS} sequencers, mutual authentication");
    println!(
        "back-end: {}{}",
        server.backend_name(),
        if setup.fingerprint.is_some() {
            " (TLS, self-signed certificate pinned by the sequencers)"
        } else {
            ""
        }
    );
    if !finished {
        println!(
            "TIMEOUT after {} s: {decided} of {TRANSACTIONS} cross-chain transactions decided",
            GLOBAL_TIMEOUT.as_secs()
        );
    }
    println!(
        "{decided} cross-chain transactions decided in {:.2} s ({:.0} xt/s, window {WINDOW})",
        elapsed.as_secs_f64(),
        decided as f64 / elapsed.as_secs_f64()
    );
    println!(
        "decisions: {committed} commit, {aborted} abort (publisher: {} timed out)",
        coordinator_stats.timed_out.load(Ordering::Relaxed)
    );
    println!(
        "messages: publisher received {server_in}, sent {server_out}; \
         sequencers sent {clients_out}, received {clients_in}"
    );
    match (percentile(&latencies, 50.0), percentile(&latencies, 99.0)) {
        (Some(p50), Some(p99)) => println!(
            "decision latency (XTRequest sent → Decided received): p50 {:.2} ms, p99 {:.2} ms",
            millis(p50),
            millis(p99)
        ),
        _ => println!("decision latency: no decisions"),
    }
    println!(
        "signature mode: signed frames on all {} connections",
        connections.len()
    );
    println!("crypto backend: {backend}");
    let failures = progress.send_failures.load(Ordering::Relaxed);
    if failures > 0 {
        println!("XTRequests not sent: {failures}");
    }

    for sequencer in &sequencers {
        if let Err(err) = sequencer.client.disconnect().await {
            warn!(error = %err, "disconnect");
        }
    }
    coordinator.abort();
    server.stop().await?;
    Ok(finished && committed == TRANSACTIONS as u64 && failures == 0)
}

/// Submits the XTs round-robin from the sequencers, at most `WINDOW`
/// outstanding, and returns when every one is decided.
async fn drive(sequencers: &[Sequencer], progress: &Progress, window: &Semaphore) {
    for n in 0..TRANSACTIONS {
        // A permit per outstanding XT; the sequencer that sent it returns the
        // permit when its Decided arrives.
        window.acquire().await.expect("never closed").forget();
        let sequencer = &sequencers[n % sequencers.len()];
        let request = common::random_xt_request(&sequencer.chain_id);
        let id = Bytes::copy_from_slice(&common::xt_id(&request));
        // Recorded before sending: the Decided may arrive before `send` returns.
        lock(&sequencer.pending).insert(id.clone(), Instant::now());
        let sent = sequencer
            .client
            .send(common::message(Payload::XtRequest(request)))
            .await;
        if let Err(err) = sent {
            warn!(error = %err, "XTRequest not sent");
            lock(&sequencer.pending).remove(&id);
            progress.send_failures.fetch_add(1, Ordering::Relaxed);
            window.add_permits(1);
        }
    }
    // All permits back: nothing outstanding.
    window
        .acquire_many(WINDOW as u32)
        .await
        .expect("never closed")
        .forget();
}

/// A sequencer's inbound loop: vote commit on each StartSC; on the Decided
/// of an XT it submitted, record the latency and free a window slot.
async fn run_sequencer(
    client: Arc<dyn Client>,
    mut inbound: mpsc::Receiver<Inbound>,
    chain_id: Bytes,
    pending: Pending,
    progress: Arc<Progress>,
    window: Arc<Semaphore>,
) {
    while let Some(Inbound { message, .. }) = inbound.recv().await {
        match message.payload {
            Some(Payload::StartSc(start)) => {
                if let Err(err) = client.send(common::vote_for(&start, &chain_id, true)).await {
                    warn!(error = %err, "vote not sent");
                }
            }
            Some(Payload::Decided(decided)) => {
                let id = decided.xt_id.map(|x| x.hash).unwrap_or_default();
                let Some(sent_at) = lock(&pending).remove(&id) else {
                    continue; // another sequencer's XT
                };
                lock(&progress.latencies).push(sent_at.elapsed());
                let counter = if decided.decision {
                    &progress.committed
                } else {
                    &progress.aborted
                };
                counter.fetch_add(1, Ordering::Relaxed);
                window.add_permits(1);
            }
            _ => {}
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Polls `done` every 10 ms for up to `limit`; returns whether it became true.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
