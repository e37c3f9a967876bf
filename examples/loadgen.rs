//! Load generator: a server and its clients in one process on 127.0.0.1
//! (a tokio runtime of 2 worker threads), pushing real `rollup.v1.Message`s
//! for a fixed time, and printing exactly one JSON line on stdout:
//!
//! ```text
//! {"backend","auth","crypto","mode","clients","size","seconds","messages",
//!  "msgs_per_sec","bytes_per_sec","p50_us","p99_us","max_rss_kb"}
//! ```
//!
//! ```text
//! cargo run --release --all-features --example loadgen -- \
//!     --backend tcp --auth signed --crypto k256 --mode stream --clients 1 --size 100 --seconds 3
//! ```
//!
//! Modes:
//! - `stream`: every client sends as fast as `send` lets it (it waits for
//!   queue room); messages are counted by the server's handler. Latency:
//!   every 64th message carries its send time.
//! - `broadcast`: the server broadcasts as fast as the slowest client takes
//!   the messages (a broadcast never waits, it drops a full peer, so the
//!   sender keeps at most half a send queue outstanding per client);
//!   deliveries are counted by the clients' handlers.
//! - `rtt`: each client keeps one message in flight, echoed by the server's
//!   handler; the latency is the round trip.
//!
//! `--baseline raw` sends the same frames through a bare tokio-util
//! `LengthDelimitedCodec` over loopback TCP (coalesced writes, no protobuf
//! decoding, no authentication): the ceiling the transport is measured
//! against. `--baseline prost` does the same with protobuf work on both
//! ends: each message (with a sender id, as the transport stamps one) is
//! encoded per send from one borrowed `Message`, each frame decoded into
//! an owned `Message`, and the `rtt` echo decodes and re-encodes; it shows
//! how much of the gap to `raw` any transport that hands over owned
//! messages must pay. `size` is the encoded size of the message before the
//! transport stamps `sender_id` (the client id) into it. Counts and rates
//! cover the measured window only; a run that stalls is cut off at `seconds` + 10 s
//! with what was measured so far and exit code 3. Exit code 1: the run
//! failed (a send error, a dropped peer, nothing measured); 2: bad arguments
//! (no JSON line then).

#[path = "common/mod.rs"]
mod common;

use std::{
    process::ExitCode,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use common::backend::{self, BackendArgs, BackendKind, BoxError};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use prost::Message as _;
use publisher_transport::{
    Client, ClientAuth, ClientConfig, CryptoBackend, Handled, Handler, HandlerError, Inbound,
    Message, SecretKey, Server, ServerAuth, ServerConfig, SignedFramesPolicy, SyncHandler,
    TcpOptions, TransportError, TrustStore, TrySendError,
    proto::{Payload, rollup::v1::Block},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{info, warn};

/// Every this many messages carries its send time (stream and broadcast).
const SAMPLE_EVERY: u64 = 64;
/// How long past `--seconds` a run may take in all before it is cut off.
const GRACE: Duration = Duration::from_secs(10);
/// Broadcasts outstanding per client: half the server's default send queue
/// (4096), so a broadcast never finds a queue full and never drops a peer.
const BROADCAST_WINDOW: u64 = 2048;
/// Broadcasts sent between two checks of the window (and two yields).
const BROADCAST_STEP: u64 = 64;
/// A client handler wakes the broadcaster after this many deliveries.
const WAKE_EVERY: u64 = 256;
/// Bound on tearing everything down after the measurement.
const TEARDOWN: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Auth {
    /// No handshake at all (Go's auth-disabled mode).
    None,
    /// Authenticated handshake, then unsigned frames.
    Handshake,
    /// Authenticated handshake and signed frames.
    Signed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Crypto {
    K256,
    Libsecp256k1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Stream,
    Broadcast,
    Rtt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Baseline {
    /// Length-delimited frames over plain loopback TCP.
    Raw,
    /// As `raw`, but every message is encoded and every frame decoded with
    /// prost, and the echo of `rtt` decodes and re-encodes: the floor of any
    /// transport that takes and hands over owned messages.
    Prost,
}

#[derive(Debug, Parser)]
#[command(about = "Load generator: one JSON line of throughput and latency")]
struct Args {
    /// Transport.
    #[arg(long, value_enum, default_value_t = BackendKind::Tcp)]
    backend: BackendKind,
    /// Authentication.
    #[arg(long, value_enum, default_value_t = Auth::None)]
    auth: Auth,
    /// secp256k1 implementation for handshakes and signatures.
    #[arg(long, value_enum, default_value_t = Crypto::K256)]
    crypto: Crypto,
    /// TLS on the tcp, grpc and ws back-ends; quic always uses it.
    #[arg(long)]
    tls: bool,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// Client connections.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// Encoded message size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 100)]
    size: usize,
    /// Length of the measurement.
    #[arg(long, value_name = "S", default_value_t = 3.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Measure a bare length-delimited TCP pipe instead of the transport.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(s),
        _ => Err("expected a number of seconds in (0, 3600]".into()),
    }
}

/// The JSON line. Field order is the output contract.
#[derive(Debug, serde::Serialize)]
struct Report {
    backend: String,
    auth: &'static str,
    crypto: &'static str,
    mode: &'static str,
    clients: u32,
    size: usize,
    seconds: f64,
    messages: u64,
    msgs_per_sec: f64,
    bytes_per_sec: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    max_rss_kb: Option<u64>,
}

/// Measurement phases, in order.
const SETUP: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// A value on cache lines of its own (two: Intel's adjacent-line prefetch
/// pairs them), so that a core writing it does not take away the line
/// another core reads or writes something else on.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// Receive counters: one per counting thread, so that the measurement does
/// not make the two cores take turns on one cache line per message (32
/// clients' handlers run on both), which the transport never does.
const COUNTERS: usize = 16;

static NEXT_COUNTER: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTER: usize = NEXT_COUNTER.fetch_add(1, Ordering::Relaxed) % COUNTERS;
}

/// Counters shared by the handlers, the drivers and the watchdog.
struct Measure {
    /// Origin of the timestamps carried in messages.
    base: Instant,
    /// Read by the senders per message, written twice a run.
    phase: Padded<AtomicU8>,
    /// Messages counted where the application receives them, per thread.
    messages: [Padded<AtomicU64>; COUNTERS],
    /// Latencies in nanoseconds, of the messages received while running.
    latency: Mutex<Histogram<u64>>,
    /// When, and at which count, the measured window opened and closed.
    started: OnceLock<(Instant, u64)>,
    stopped: OnceLock<(Instant, u64)>,
    send_errors: AtomicU64,
    dropped_peers: AtomicU64,
    /// Whether the JSON line was printed (exactly once, by whoever is first).
    printed: AtomicBool,
}

impl Measure {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            phase: Padded(AtomicU8::new(SETUP)),
            messages: Default::default(),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds"),
            ),
            started: OnceLock::new(),
            stopped: OnceLock::new(),
            send_errors: AtomicU64::new(0),
            dropped_peers: AtomicU64::new(0),
            printed: AtomicBool::new(false),
        }
    }

    fn running(&self) -> bool {
        self.phase.0.load(Ordering::Relaxed) == RUNNING
    }

    fn start(&self) {
        let _ = self.started.set((Instant::now(), self.counted()));
        self.phase.0.store(RUNNING, Ordering::Release);
    }

    fn stop(&self) {
        self.phase.0.store(DONE, Ordering::Release);
        let _ = self.stopped.set((Instant::now(), self.counted()));
    }

    /// Nanoseconds since `base`, never 0 (0 marks an unsampled message).
    fn now(&self) -> u64 {
        (self.base.elapsed().as_nanos() as u64).max(1)
    }

    /// Counts one message; records its latency when it carries a send time.
    fn received(&self, sent_at: u64) {
        COUNTER.with(|&n| self.messages[n].0.fetch_add(1, Ordering::Relaxed));
        if sent_at != 0 && self.running() {
            let latency = self.now().saturating_sub(sent_at).max(1);
            self.latency
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .saturating_record(latency);
        }
    }

    /// Messages counted so far.
    fn counted(&self) -> u64 {
        self.messages
            .iter()
            .map(|count| count.0.load(Ordering::Relaxed))
            .sum()
    }

    /// Messages and seconds of the measured window so far.
    fn window(&self) -> (u64, f64) {
        let Some(&(from, first)) = self.started.get() else {
            return (0, 0.0);
        };
        let (to, last) = match self.stopped.get() {
            Some(&end) => end,
            None => (Instant::now(), self.counted()),
        };
        (
            last.saturating_sub(first),
            to.duration_since(from).as_secs_f64(),
        )
    }

    fn percentile_us(&self, quantile: f64) -> Option<f64> {
        let histogram = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        (!histogram.is_empty())
            .then(|| round(histogram.value_at_quantile(quantile) as f64 / 1e3, 1))
    }
}

/// What the report says about the run, fixed before it starts.
struct Labels {
    backend: String,
    auth: &'static str,
    crypto: &'static str,
    mode: &'static str,
    clients: u32,
    size: usize,
}

fn report(labels: &Labels, measure: &Measure) -> Report {
    let (messages, seconds) = measure.window();
    let rate = if seconds > 0.0 {
        messages as f64 / seconds
    } else {
        0.0
    };
    Report {
        backend: labels.backend.clone(),
        auth: labels.auth,
        crypto: labels.crypto,
        mode: labels.mode,
        clients: labels.clients,
        size: labels.size,
        seconds: round(seconds, 3),
        messages,
        msgs_per_sec: round(rate, 1),
        bytes_per_sec: round(rate * labels.size as f64, 1),
        p50_us: measure.percentile_us(0.50),
        p99_us: measure.percentile_us(0.99),
        max_rss_kb: max_rss_kb(),
    }
}

/// Prints the JSON line unless someone already did; returns whether it printed.
fn print_once(labels: &Labels, measure: &Measure) -> bool {
    if measure.printed.swap(true, Ordering::SeqCst) {
        return false;
    }
    match serde_json::to_string(&report(labels, measure)) {
        Ok(line) => common::say(line),
        Err(err) => eprintln!("error: report: {err}"),
    }
    true
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Peak resident set size of this process (Linux).
fn max_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing("warn");
    let crypto = match args.crypto {
        Crypto::K256 => CryptoBackend::K256,
        Crypto::Libsecp256k1 => CryptoBackend::Libsecp256k1,
    };
    if args.auth != Auth::None
        && args.baseline.is_none()
        && let Err(err) = crypto.ensure_available()
    {
        eprintln!("error: --crypto {}: {err}", crypto.name());
        return ExitCode::from(2);
    }
    let transport = BackendArgs::new(args.backend, args.tls);
    if args.baseline.is_none()
        && let Err(err) = transport.validate()
    {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }

    let (template, size) = padded_message(args.size);
    let labels = Arc::new(Labels {
        backend: match args.baseline {
            Some(Baseline::Raw) => "raw".into(),
            Some(Baseline::Prost) => "prost".into(),
            None => backend_label(&transport),
        },
        auth: match (args.baseline, args.auth) {
            (Some(_), _) | (None, Auth::None) => "none",
            (None, Auth::Handshake) => "handshake",
            (None, Auth::Signed) => "signed",
        },
        crypto: if args.baseline.is_some() || args.auth == Auth::None {
            "none"
        } else {
            crypto.name()
        },
        mode: match args.mode {
            Mode::Stream => "stream",
            Mode::Broadcast => "broadcast",
            Mode::Rtt => "rtt",
        },
        clients: args.clients,
        size,
    });
    let measure = Arc::new(Measure::new());
    let duration = Duration::from_secs_f64(args.seconds);

    // The watchdog is a plain thread: it fires even if the runtime is wedged.
    {
        let (labels, measure) = (labels.clone(), measure.clone());
        let deadline = duration + GRACE;
        std::thread::spawn(move || {
            std::thread::sleep(deadline);
            measure.stop();
            if print_once(&labels, &measure) {
                eprintln!(
                    "error: hard deadline of {:.1} s reached; the report is partial",
                    deadline.as_secs_f64()
                );
            } else {
                eprintln!("error: teardown did not finish in time");
            }
            std::process::exit(3);
        });
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let setup = Setup {
        args: &args,
        labels: labels.clone(),
        transport,
        crypto,
        template,
        duration,
        measure: measure.clone(),
    };
    let outcome = runtime.block_on(async {
        match args.baseline {
            Some(baseline) => run_raw(&setup, baseline).await,
            None => run_transport(&setup).await,
        }
    });
    let code = match outcome {
        Ok(()) => {
            let (messages, _) = measure.window();
            let errors = measure.send_errors.load(Ordering::Relaxed);
            let dropped = measure.dropped_peers.load(Ordering::Relaxed);
            if errors > 0 {
                warn!(errors, "sends failed");
            }
            if dropped > 0 {
                warn!(dropped, "broadcast recipients dropped");
            }
            if messages > 0 && errors == 0 && dropped == 0 {
                0
            } else {
                1
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            // The line is the contract even when nothing could be measured.
            measure.stop();
            print_once(&labels, &measure);
            1
        }
    };
    // Leave without waiting for the runtime's remaining tasks.
    std::process::exit(code)
}

fn backend_label(transport: &BackendArgs) -> String {
    let name = transport.backend.name();
    if transport.tls && transport.backend != BackendKind::Quic {
        format!("{name}+tls")
    } else {
        name.to_owned()
    }
}

/// A `Block` message whose encoding is `size` bytes (or as close below as
/// varint lengths allow; at least the empty block's size). Its `chain_id`
/// is 8 zero bytes, replaced by the send time in sampled messages.
fn padded_message(size: usize) -> (Message, usize) {
    let build = |padding: usize| Message {
        sender_id: String::new(),
        payload: Some(Payload::Block(Block {
            chain_id: Bytes::from_static(&[0; 8]),
            block_data: Bytes::from(vec![0xab; padding]),
            included_xt_ids: Vec::new(),
        })),
    };
    let len = |padding: usize| build(padding).encoded_len();
    let mut padding = size.saturating_sub(len(0));
    while padding > 0 && len(padding) > size {
        padding -= 1;
    }
    let message = build(padding);
    let encoded = message.encoded_len();
    (message, encoded)
}

/// `template` with bytes of its own: a client of its own process would not
/// share its message's reference count with every other client, and in one
/// process that sharing makes every clone contend across the cores.
fn own_copy(template: &Message) -> Message {
    let mut message = template.clone();
    if let Some(Payload::Block(block)) = &mut message.payload {
        block.block_data = Bytes::copy_from_slice(&block.block_data);
    }
    message
}

/// `template` with `sent_at` (nanoseconds since the shared origin) as its chain id.
fn stamped(template: &Message, sent_at: u64) -> Message {
    let mut message = template.clone();
    if let Some(Payload::Block(block)) = &mut message.payload {
        block.chain_id = Bytes::copy_from_slice(&sent_at.to_be_bytes());
    }
    message
}

/// The send time a message carries (0: none).
fn sent_at(message: &Message) -> u64 {
    match &message.payload {
        Some(Payload::Block(block)) => <[u8; 8]>::try_from(block.chain_id.as_ref())
            .map(u64::from_be_bytes)
            .unwrap_or(0),
        _ => 0,
    }
}

struct Setup<'a> {
    args: &'a Args,
    labels: Arc<Labels>,
    transport: BackendArgs,
    crypto: CryptoBackend,
    template: Message,
    duration: Duration,
    measure: Arc<Measure>,
}

/// Keys and trust for `--auth handshake|signed`.
struct Keys {
    server: Arc<SecretKey>,
    trust: Arc<TrustStore>,
    clients: Vec<Arc<SecretKey>>,
}

fn client_id(n: u32) -> String {
    format!("loadgen-{n}")
}

async fn run_transport(setup: &Setup<'_>) -> Result<(), BoxError> {
    let args = setup.args;
    let measure = &setup.measure;
    let keys = (args.auth != Auth::None)
        .then(|| -> Result<Keys, BoxError> {
            let trust = Arc::new(TrustStore::new());
            let mut clients = Vec::new();
            for n in 0..args.clients {
                let key = Arc::new(SecretKey::generate());
                trust.add(client_id(n), key.public_key().clone())?;
                clients.push(key);
            }
            Ok(Keys {
                server: Arc::new(SecretKey::generate()),
                trust,
                clients,
            })
        })
        .transpose()?;
    let signed = args.auth == Auth::Signed;

    let server_auth = keys.as_ref().map(|keys| ServerAuth {
        signed_frames: if signed {
            SignedFramesPolicy::Require
        } else {
            SignedFramesPolicy::Off
        },
        backend: setup.crypto,
        ..ServerAuth::new(keys.server.clone(), keys.trust.clone())
    });
    // Every client comes from 127.0.0.1: the per-IP rate limit would refuse
    // most, and beyond the default connection limit the rest.
    let config = ServerConfig::default()
        .with_listen_addr("127.0.0.1:0")
        .with_rate_limit(None)
        // Measures raw capacity: no per-connection inbound limit either.
        .with_inbound_limit(None)
        .with_max_connections((args.clients as usize).max(1000));
    let server_setup =
        backend::server(&setup.transport, config, TcpOptions::default(), server_auth)?;
    let server = server_setup.server;
    let mut transport = setup.transport.clone();
    transport.pin_sha256.extend(server_setup.fingerprint);
    let factory = backend::ClientFactory::new(&transport)?;

    match args.mode {
        Mode::Stream => {
            let measure = measure.clone();
            server.set_handler(Arc::new(SyncHandler(
                move |inbound: Inbound| -> Result<(), HandlerError> {
                    measure.received(sent_at(&inbound.message));
                    Ok(())
                },
            )));
        }
        Mode::Rtt => {
            // The echo is queued on the spot, and awaits room only when the
            // queue is full; the weak reference keeps the server from owning
            // itself.
            let weak: Weak<dyn Server> = Arc::downgrade(&server);
            server.set_handler(Arc::new(Echo(weak)));
        }
        Mode::Broadcast => {}
    }
    let addr = server.start().await?.to_string();

    // Clients, each with its handler: counts (broadcast), round trips (rtt).
    let delivered: Arc<Vec<Padded<AtomicU64>>> =
        Arc::new((0..args.clients).map(|_| Padded::default()).collect());
    let wake = Arc::new(Notify::new());
    let mut clients: Vec<Arc<dyn Client>> = Vec::new();
    let mut echoes: Vec<Arc<Notify>> = Vec::new();
    for n in 0..args.clients {
        let auth = keys.as_ref().map(|keys| {
            let mut auth = ClientAuth::new(keys.clients[n as usize].clone())
                .with_server_key(keys.server.public_key().clone());
            auth.signed_frames = signed;
            auth.backend = setup.crypto;
            auth
        });
        let config = ClientConfig {
            auto_reconnect: false,
            ..ClientConfig::default().with_client_id(client_id(n))
        };
        let client = factory.client(config, TcpOptions::default(), auth);
        let echo = Arc::new(Notify::new());
        match args.mode {
            Mode::Stream => {}
            Mode::Broadcast => {
                let (measure, delivered, wake) = (measure.clone(), delivered.clone(), wake.clone());
                client.set_handler(Arc::new(SyncHandler(
                    move |inbound: Inbound| -> Result<(), HandlerError> {
                        measure.received(sent_at(&inbound.message));
                        let count = delivered[n as usize].0.fetch_add(1, Ordering::Relaxed) + 1;
                        if count.is_multiple_of(WAKE_EVERY) {
                            wake.notify_one();
                        }
                        Ok(())
                    },
                )));
            }
            Mode::Rtt => {
                let (measure, echo) = (measure.clone(), echo.clone());
                client.set_handler(Arc::new(SyncHandler(
                    move |inbound: Inbound| -> Result<(), HandlerError> {
                        measure.received(sent_at(&inbound.message));
                        echo.notify_one();
                        Ok(())
                    },
                )));
            }
        }
        client
            .connect(&addr)
            .await
            .map_err(|err| format!("client {n} cannot connect to {addr}: {err}"))?;
        clients.push(client);
        echoes.push(echo);
    }
    // The server registers a connection just after answering its handshake.
    if !wait_until(Duration::from_secs(5), || {
        server.connections().len() == args.clients as usize
    })
    .await
    {
        return Err(format!(
            "{} of {} clients registered at the server",
            server.connections().len(),
            args.clients
        )
        .into());
    }
    if let Some(wrong) = server
        .connections()
        .iter()
        .find(|c| c.signed_frames != signed)
    {
        return Err(format!(
            "connection {} has signed frames {}, expected {signed}",
            wrong.identity, wrong.signed_frames
        )
        .into());
    }
    info!(backend = server.backend_name(), %addr, "connected; measuring");

    measure.start();
    let mut drivers = Vec::new();
    match args.mode {
        Mode::Stream => {
            for client in &clients {
                drivers.push(tokio::spawn(stream_sender(
                    client.clone(),
                    own_copy(&setup.template),
                    measure.clone(),
                )));
            }
        }
        Mode::Rtt => {
            for (client, echo) in clients.iter().zip(&echoes) {
                drivers.push(tokio::spawn(rtt_sender(
                    client.clone(),
                    echo.clone(),
                    setup.template.clone(),
                    measure.clone(),
                )));
            }
        }
        Mode::Broadcast => {
            drivers.push(tokio::spawn(broadcaster(
                server.clone(),
                clients.clone(),
                delivered.clone(),
                wake.clone(),
                setup.template.clone(),
                measure.clone(),
            )));
        }
    }
    measure_for(setup.duration, measure).await;
    print_once(&setup.labels, measure);

    // Orderly teardown, bounded: the numbers are already out.
    let teardown = async {
        for driver in drivers {
            let _ = driver.await;
        }
        for client in &clients {
            let _ = client.disconnect().await;
        }
        let _ = server.stop().await;
    };
    if tokio::time::timeout(TEARDOWN, teardown).await.is_err() {
        warn!("teardown took longer than {TEARDOWN:?}");
    }
    Ok(())
}

/// Sends as fast as the client takes messages, until the window closes.
async fn stream_sender(client: Arc<dyn Client>, template: Message, measure: Arc<Measure>) {
    let mut n: u64 = 0;
    while measure.running() {
        // The queue usually has room: `try_send` then costs no boxed future.
        // Each message is built where the call takes it, not moved there.
        let queued = if n.is_multiple_of(SAMPLE_EVERY) {
            client.try_send(stamped(&template, measure.now()))
        } else {
            client.try_send(template.clone())
        };
        n += 1;
        let sent = match queued {
            Ok(()) => Ok(()),
            Err(err) => resend(client.as_ref(), err).await,
        };
        if let Err(err) = sent {
            if measure.running() {
                measure.send_errors.fetch_add(1, Ordering::Relaxed);
                warn!(client = %client.id(), error = %err, "send failed");
            }
            return;
        }
    }
}

/// The rtt server's handler: sends each message back to its sender.
struct Echo(Weak<dyn Server>);

impl Handler for Echo {
    fn handle(&self, inbound: Inbound) -> Handled {
        let Some(server) = self.0.upgrade() else {
            return Handled::Done(Ok(()));
        };
        match server.try_send(&inbound.from, inbound.message) {
            Ok(()) => Handled::Done(Ok(())),
            Err(TrySendError::Full(message)) => Handled::Pending(Box::pin(async move {
                Ok(server.send(&inbound.from, *message).await?)
            })),
            Err(err) => Handled::Done(Err(err.into())),
        }
    }
}

/// Sends through `try_send`, awaiting queue room only when it is full.
async fn send(client: &dyn Client, message: Message) -> Result<(), TransportError> {
    match client.try_send(message) {
        Ok(()) => Ok(()),
        Err(err) => resend(client, err).await,
    }
}

/// After a refused `try_send`: waits for room when the queue was full.
async fn resend(client: &dyn Client, refused: TrySendError) -> Result<(), TransportError> {
    match refused {
        TrySendError::Full(message) => client.send(*message).await,
        TrySendError::Failed(err) => Err(err),
        err => Err(TransportError::Config(err.to_string())),
    }
}

/// One message in flight: send, wait for the echo, repeat.
async fn rtt_sender(
    client: Arc<dyn Client>,
    echo: Arc<Notify>,
    template: Message,
    measure: Arc<Measure>,
) {
    // A lost echo would stall this client for good: it gives up on one
    // after 1–2 s and sends the next. One timer, re-armed once a second
    // rather than per round trip, keeps the timer wheel off the measured path.
    let patience = Duration::from_secs(2);
    let deadline = tokio::time::sleep(patience);
    tokio::pin!(deadline);
    let mut armed_at = Instant::now();
    while measure.running() {
        if armed_at.elapsed() >= patience / 2 {
            armed_at = Instant::now();
            deadline.as_mut().reset((armed_at + patience).into());
        }
        if let Err(err) = send(client.as_ref(), stamped(&template, measure.now())).await {
            if measure.running() {
                measure.send_errors.fetch_add(1, Ordering::Relaxed);
                warn!(client = %client.id(), error = %err, "send failed");
            }
            return;
        }
        let echoed = tokio::select! {
            biased;
            () = echo.notified() => true,
            () = &mut deadline => false,
        };
        if !echoed {
            armed_at = Instant::now();
            deadline.as_mut().reset((armed_at + patience).into());
            if measure.running() {
                measure.send_errors.fetch_add(1, Ordering::Relaxed);
                warn!(client = %client.id(), "no echo within 1 s");
            }
        }
    }
}

/// Broadcasts as fast as the slowest connected client keeps up.
async fn broadcaster(
    server: Arc<dyn Server>,
    clients: Vec<Arc<dyn Client>>,
    delivered: Arc<Vec<Padded<AtomicU64>>>,
    wake: Arc<Notify>,
    template: Message,
    measure: Arc<Measure>,
) {
    let mut sent: u64 = 0;
    let slowest = || {
        delivered
            .iter()
            .zip(&clients)
            .filter(|(_, client)| client.is_connected())
            .map(|(count, _)| count.0.load(Ordering::Relaxed))
            .min()
    };
    // Checking connectivity takes a lock per client: do it only when the
    // window looks full.
    let slowest_fast = || delivered.iter().map(|c| c.0.load(Ordering::Relaxed)).min();
    while measure.running() {
        // Checked once per `BROADCAST_STEP` broadcasts, for a whole step:
        // each check reads every client's counter, which the clients'
        // handlers keep writing on both cores.
        if sent.is_multiple_of(BROADCAST_STEP)
            && sent.saturating_sub(slowest_fast().unwrap_or(sent)) + BROADCAST_STEP
                > BROADCAST_WINDOW
        {
            let Some(slowest) = slowest() else {
                warn!("no client left connected");
                return;
            };
            if sent.saturating_sub(slowest) + BROADCAST_STEP > BROADCAST_WINDOW {
                let _ = tokio::time::timeout(Duration::from_millis(5), wake.notified()).await;
                continue;
            }
        }
        let message = if sent.is_multiple_of(SAMPLE_EVERY) {
            stamped(&template, measure.now())
        } else {
            template.clone()
        };
        sent += 1;
        match server.broadcast(message, None) {
            Ok(report) if !report.dropped.is_empty() => {
                measure
                    .dropped_peers
                    .fetch_add(report.dropped.len() as u64, Ordering::Relaxed);
                // The dropped peers are gone; let the rest drain before going on.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(_) => {}
            Err(err) => {
                measure.send_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %err, "broadcast failed");
                return;
            }
        }
        // `broadcast` never awaits: let the writers on this worker run.
        if sent.is_multiple_of(BROADCAST_STEP) {
            tokio::task::yield_now().await;
        }
    }
}

/// Closes the measured window after `duration`. A thread keeps the time:
/// a runtime busy with tiny tasks can wake a timer late.
async fn measure_for(duration: Duration, measure: &Arc<Measure>) {
    let (done, closed) = tokio::sync::oneshot::channel();
    let measure = measure.clone();
    std::thread::spawn(move || {
        std::thread::sleep(duration);
        measure.stop();
        let _ = done.send(());
    });
    let _ = closed.await;
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

// ---------------------------------------------------------------------------
// Baseline: the same frames over a bare length-delimited TCP pipe.
// ---------------------------------------------------------------------------

/// The template's encoding, and where its 8 chain-id bytes sit in it.
struct RawFrames {
    frame: Bytes,
    stamp_at: usize,
    /// The prost baseline's message, with the sender id the transport
    /// would stamp: encoded per send, decoded per receipt.
    prost: Option<Message>,
}

impl RawFrames {
    fn new(template: &Message, baseline: Baseline) -> Self {
        let prost = (baseline == Baseline::Prost).then(|| Message {
            sender_id: client_id(0),
            ..own_copy(template)
        });
        let frame = Bytes::from(template.encode_to_vec());
        // Same lengths, so the same layout: find the marker's position.
        let marker = 0x0123_4567_89ab_cdef_u64;
        let marked = stamped(template, marker).encode_to_vec();
        let stamp_at = marked
            .windows(8)
            .position(|w| w == marker.to_be_bytes())
            .expect("the chain id is in the encoding");
        Self {
            frame,
            stamp_at,
            prost,
        }
    }

    /// The `n`th frame to send: the template's bytes (the raw baseline),
    /// or its message encoded into `scratch` (prost); every
    /// `SAMPLE_EVERY`th carries the send time.
    fn next(&self, n: u64, measure: &Measure, scratch: &mut BytesMut) -> Bytes {
        let sampled = n.is_multiple_of(SAMPLE_EVERY);
        match &self.prost {
            None if sampled => self.stamped(measure.now()),
            None => self.frame.clone(),
            Some(message) => {
                let stamped_message;
                let message = if sampled {
                    stamped_message = stamped(message, measure.now());
                    &stamped_message
                } else {
                    message
                };
                encode_frame(message, scratch)
            }
        }
    }

    /// The send time a received frame carries (0: none).
    fn received(&self, frame: BytesMut) -> u64 {
        if self.prost.is_none() {
            return self.sent_at(&frame);
        }
        Message::decode(frame.freeze()).map_or(0, |message| sent_at(&message))
    }

    fn stamped(&self, sent_at: u64) -> Bytes {
        let mut frame = BytesMut::from(&self.frame[..]);
        frame[self.stamp_at..self.stamp_at + 8].copy_from_slice(&sent_at.to_be_bytes());
        frame.freeze()
    }

    fn sent_at(&self, frame: &[u8]) -> u64 {
        frame
            .get(self.stamp_at..self.stamp_at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }
}

/// Encodes `message` into `scratch` and takes it out as a frame body;
/// `scratch` is one buffer that many frames share.
fn encode_frame(message: &Message, scratch: &mut BytesMut) -> Bytes {
    let len = message.encoded_len();
    if scratch.capacity() < len {
        scratch.reserve(len.max(64 * 1024));
    }
    message
        .encode(scratch)
        .expect("a buffer with room for the message");
    scratch.split().freeze()
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(16 << 20)
        .new_codec()
}

/// Frames fed per flush by the raw writers.
const RAW_BATCH: usize = 64;

async fn run_raw(setup: &Setup<'_>, baseline: Baseline) -> Result<(), BoxError> {
    let args = setup.args;
    let measure = &setup.measure;
    let frames = Arc::new(RawFrames::new(&setup.template, baseline));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;

    let mut accepted = Vec::new();
    let mut dialled = Vec::new();
    for _ in 0..args.clients {
        let (dial, accept) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (dial, (accept, _)) = (dial?, accept?);
        dial.set_nodelay(true)?;
        accept.set_nodelay(true)?;
        dialled.push(dial);
        accepted.push(accept);
    }

    measure.start();
    let mut tasks = Vec::new();
    match args.mode {
        Mode::Stream => {
            for (client, server) in dialled.into_iter().zip(accepted) {
                tasks.push(tokio::spawn(raw_reader(
                    server,
                    frames.clone(),
                    measure.clone(),
                )));
                // Its own frame, as each client sends its own message.
                tasks.push(tokio::spawn(raw_writer(
                    vec![client],
                    Arc::new(RawFrames::new(&setup.template, baseline)),
                    measure.clone(),
                )));
            }
        }
        Mode::Broadcast => {
            for client in dialled {
                tasks.push(tokio::spawn(raw_reader(
                    client,
                    frames.clone(),
                    measure.clone(),
                )));
            }
            tasks.push(tokio::spawn(raw_writer(
                accepted,
                frames.clone(),
                measure.clone(),
            )));
        }
        Mode::Rtt => {
            for (client, server) in dialled.into_iter().zip(accepted) {
                tasks.push(tokio::spawn(raw_echo(server, baseline)));
                tasks.push(tokio::spawn(raw_round_trips(
                    client,
                    frames.clone(),
                    measure.clone(),
                )));
            }
        }
    }
    measure_for(setup.duration, measure).await;
    print_once(&setup.labels, measure);
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// Counts frames like a handler would, reading the send time at its offset.
async fn raw_reader(stream: TcpStream, frames: Arc<RawFrames>, measure: Arc<Measure>) {
    let mut reader = FramedRead::new(stream, codec());
    while let Some(Ok(frame)) = reader.next().await {
        measure.received(frames.received(frame));
    }
}

/// Writes the frame to every stream as fast as they take it: a batch fed
/// to each, then one flush each.
async fn raw_writer(streams: Vec<TcpStream>, frames: Arc<RawFrames>, measure: Arc<Measure>) {
    let mut sinks: Vec<_> = streams
        .into_iter()
        .map(|s| FramedWrite::new(s, codec()))
        .collect();
    let mut n: u64 = 0;
    let mut scratch = BytesMut::new();
    while measure.running() {
        for _ in 0..RAW_BATCH {
            let frame = frames.next(n, &measure, &mut scratch);
            n += 1;
            for sink in &mut sinks {
                if sink.feed(frame.clone()).await.is_err() {
                    return;
                }
            }
        }
        for sink in &mut sinks {
            if SinkExt::<Bytes>::flush(sink).await.is_err() {
                return;
            }
        }
    }
}

/// Sends every frame back as it arrives; the prost baseline's echo
/// decodes it and encodes it again, as a handler's reply would be.
async fn raw_echo(stream: TcpStream, baseline: Baseline) {
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, codec());
    let mut writer = FramedWrite::new(write, codec());
    let mut scratch = BytesMut::new();
    while let Some(Ok(frame)) = reader.next().await {
        let frame = match baseline {
            Baseline::Raw => frame.freeze(),
            Baseline::Prost => match Message::decode(frame.freeze()) {
                Ok(message) => encode_frame(&message, &mut scratch),
                Err(_) => return,
            },
        };
        if writer.send(frame).await.is_err() {
            return;
        }
    }
}

/// One frame in flight: send, read the echo, repeat.
async fn raw_round_trips(stream: TcpStream, frames: Arc<RawFrames>, measure: Arc<Measure>) {
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, codec());
    let mut writer = FramedWrite::new(write, codec());
    let mut scratch = BytesMut::new();
    while measure.running() {
        // Every round trip carries its send time.
        let frame = frames.next(0, &measure, &mut scratch);
        if writer.send(frame).await.is_err() {
            return;
        }
        match reader.next().await {
            Some(Ok(frame)) => measure.received(frames.received(frame)),
            _ => return,
        }
    }
}
