//! Server memory per idle authenticated connection.
//!
//! Opens N (default 10,000) authenticated TCP connections with signed frames
//! to one server, lets them idle, and prints the server's resident memory per
//! connection (goal: at most 32 KiB).
//!
//! The server runs in a child process (this binary again, with
//! `MEMBENCH_ROLE=server`) so that its resident set holds no client state.
//! Both processes derive every key from a seed passed in the environment;
//! each connection has its own identity, since a second connection of an
//! identity replaces the first. The child answers `count` and `profile` on
//! stdin and exits when stdin closes, so it never outlives this process.
//!
//! A global allocator counts live heap bytes by allocation size, so the
//! server also reports which allocations each connection holds.
//!
//! Run: `cargo bench --bench memory_per_connection [-- --connections N]`;
//! `--unsigned` turns signed frames off, `--no-auth` runs without a handshake,
//! `--touch-all` has glibc fill every server allocation (`MALLOC_PERTURB_`):
//! buffers an idle connection never wrote to then count as resident, as they
//! become once traffic has passed through them.
//!
//! `--broadcast BYTES` then has the server broadcast one message of that many
//! bytes to every connection and reports how much the server's peak resident
//! memory rose until every client had it: a broadcast is encoded and sealed
//! once and its frame shared by every recipient's writer, so the rise should
//! be about one copy, not one per recipient (`cargo bench --bench
//! memory_per_connection -- --connections 100 --broadcast 8388608`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    env,
    fmt::Write as _,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use publisher_transport::{
    ClientAuth, ClientConfig, SecretKey, ServerAuth, ServerConfig, SyncHandler, TcpClient,
    TcpServer, TrustStore,
    crypto::keccak256,
    proto::{Payload, rollup::v1::L2Block},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
    sync::Notify,
};

/// Allocation sizes tracked one by one; larger ones share the last slot.
const SIZE_CLASSES: usize = 64 * 1024;

static LIVE_BY_SIZE: [AtomicI64; SIZE_CLASSES + 1] =
    [const { AtomicI64::new(0) }; SIZE_CLASSES + 1];
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

fn record(size: usize, delta: i64) {
    LIVE_BY_SIZE[size.min(SIZE_CLASSES)].fetch_add(delta, Ordering::Relaxed);
    LIVE_BYTES.fetch_add(delta * size as i64, Ordering::Relaxed);
}

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            record(layout.size(), 1);
        }
        ptr
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            record(layout.size(), 1);
        }
        ptr
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            record(layout.size(), -1);
            record(new_size, 1);
        }
        new
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        record(layout.size(), -1);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DEFAULT_CONNECTIONS: usize = 10_000;
/// Descriptors kept free beyond one per connection (listener, pipes, runtime).
const FD_MARGIN: usize = 512;
/// Connections being established at once.
const CONCURRENCY: usize = 64;
/// Connections opened and closed before the baseline, so that code pages,
/// runtime structures and metric series exist before it is taken.
const WARM_UP: usize = 64;
/// Idle time before a reading, for the last handshakes' garbage to settle.
const SETTLE: Duration = Duration::from_secs(2);
/// Bound on the whole run.
const DEADLINE: Duration = Duration::from_secs(120);
/// The child's own bound, should its stdin never close.
const SERVER_DEADLINE: Duration = Duration::from_secs(300);
const GOAL_KIB: f64 = 32.0;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let result = if env::var("MEMBENCH_ROLE").as_deref() == Ok("server") {
        server_main()
    } else {
        driver_main()
    };
    if let Err(err) = result {
        eprintln!("memory_per_connection: {err}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Raises the soft descriptor limit to the hard one; returns the soft limit.
fn raise_nofile() -> Result<usize, Error> {
    let soft = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok(usize::try_from(soft).unwrap_or(usize::MAX))
}

/// Key `index` of the run: every process derives the same keys from the seed.
fn derive_key(seed: &[u8; 32], label: &[u8]) -> SecretKey {
    let digest = keccak256(&[seed.as_slice(), label].concat());
    // A digest that is not a valid scalar has probability ~2^-128.
    SecretKey::from_bytes(&digest).expect("a valid secp256k1 scalar")
}

fn client_key(seed: &[u8; 32], index: usize) -> SecretKey {
    derive_key(seed, &(index as u64).to_be_bytes())
}

fn server_key(seed: &[u8; 32]) -> SecretKey {
    derive_key(seed, b"server")
}

fn identity(index: usize) -> String {
    format!("c{index}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Signed,
    Unsigned,
    NoAuth,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Signed => "authenticated, signed frames",
            Mode::Unsigned => "authenticated, unsigned frames",
            Mode::NoAuth => "no authentication",
        }
    }
}

// ---------------------------------------------------------------- server role

fn server_main() -> Result<(), Error> {
    let seed: [u8; 32] = hex::decode(env::var("MEMBENCH_SEED")?)?
        .try_into()
        .map_err(|_| "MEMBENCH_SEED: 32 bytes expected")?;
    let connections: usize = env::var("MEMBENCH_CONNECTIONS")?.parse()?;
    let auth = env::var("MEMBENCH_AUTH").as_deref() != Ok("0");
    raise_nofile()?;
    runtime()?.block_on(async move {
        let mut config = ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_rate_limit(None)
            .with_max_connections(connections + WARM_UP + 100);
        config.max_pending_handshakes = config.max_pending_handshakes.max(CONCURRENCY);
        let auth = auth.then(|| {
            let trust = TrustStore::new();
            for index in 0..connections.max(WARM_UP) {
                trust
                    .add(
                        identity(index),
                        client_key(&seed, index).public_key().clone(),
                    )
                    .expect("distinct keys");
            }
            ServerAuth::new(Arc::new(server_key(&seed)), Arc::new(trust))
        });
        let server = TcpServer::tcp(config, auth);
        let addr = server.start().await?;
        println!("ready {addr}");
        let mut commands = BufReader::new(tokio::io::stdin()).lines();
        let deadline = tokio::time::sleep(SERVER_DEADLINE);
        tokio::pin!(deadline);
        loop {
            let command = tokio::select! {
                line = commands.next_line() => line?,
                _ = &mut deadline => None,
            };
            match command.as_deref() {
                // The manager's count, not `connections()`: that builds a
                // 10,000-entry Vec whose garbage would blur the reading.
                Some("count") => println!(
                    "{} {}",
                    server.manager().len(),
                    LIVE_BYTES.load(Ordering::Relaxed)
                ),
                Some("profile") => {
                    let mut line = String::new();
                    for (size, count) in LIVE_BY_SIZE.iter().enumerate() {
                        let count = count.load(Ordering::Relaxed);
                        if count != 0 {
                            let _ = write!(line, "{size}:{count} ");
                        }
                    }
                    println!("{}", line.trim_end());
                }
                Some(other) if other.starts_with("broadcast ") => {
                    let bytes: usize = other["broadcast ".len()..].parse()?;
                    let message = publisher_transport::Message {
                        sender_id: String::new(),
                        payload: Some(Payload::L2Block(L2Block {
                            block: vec![7u8; bytes].into(),
                            ..L2Block::default()
                        })),
                    };
                    let report = server.broadcast(message, None)?;
                    println!("{}", report.delivered.len());
                }
                Some(other) => return Err(format!("unknown command {other:?}").into()),
                None => break,
            }
        }
        Ok::<_, Error>(())
    })?;
    // Skip the graceful stop of thousands of sessions: the driver is done.
    std::process::exit(0)
}

// ---------------------------------------------------------------- driver role

struct Options {
    connections: usize,
    mode: Mode,
    touch_all: bool,
    broadcast: Option<usize>,
}

fn options() -> Result<Options, Error> {
    let mut connections = match env::var("MEMBENCH_CONNECTIONS") {
        Ok(value) => value.parse()?,
        Err(_) => DEFAULT_CONNECTIONS,
    };
    let mut mode = Mode::Signed;
    let mut touch_all = false;
    let mut broadcast = None;
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connections" => {
                connections = args.next().ok_or("--connections needs a value")?.parse()?
            }
            "--unsigned" => mode = Mode::Unsigned,
            "--no-auth" => mode = Mode::NoAuth,
            "--touch-all" => touch_all = true,
            "--broadcast" => {
                broadcast = Some(args.next().ok_or("--broadcast needs a size")?.parse()?)
            }
            // `cargo bench` passes `--bench` and any filter: not ours.
            other => {
                if let Some(value) = other.strip_prefix("--connections=") {
                    connections = value.parse()?;
                }
            }
        }
    }
    if connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    Ok(Options {
        connections,
        mode,
        touch_all,
        broadcast,
    })
}

fn driver_main() -> Result<(), Error> {
    let Options {
        connections: requested,
        mode,
        touch_all,
        broadcast,
    } = options()?;
    // The child inherits the raised limit; each process needs one descriptor
    // per connection.
    let limit = raise_nofile()?;
    let fits = limit.saturating_sub(FD_MARGIN);
    let connections = requested.min(fits);
    if connections < requested {
        println!(
            "RLIMIT_NOFILE allows {limit} descriptors per process (hard limit): \
             scaling down from {requested} to {connections} connections"
        );
    }
    if connections == 0 {
        return Err(format!("RLIMIT_NOFILE hard limit {limit} is too low").into());
    }
    runtime()?.block_on(async move {
        tokio::time::timeout(DEADLINE, drive(connections, mode, touch_all, broadcast))
            .await
            .map_err(|_| format!("gave up after {DEADLINE:?}"))?
    })
}

/// The server child and its command channel.
struct ServerProcess {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ServerProcess {
    async fn spawn(
        seed: &[u8; 32],
        connections: usize,
        mode: Mode,
        touch_all: bool,
    ) -> Result<(Self, String), Error> {
        let mut command = Command::new(env::current_exe()?);
        if touch_all {
            command.env("MALLOC_PERTURB_", "165");
        }
        let mut child = command
            .env("MEMBENCH_ROLE", "server")
            .env("MEMBENCH_SEED", hex::encode(seed))
            .env("MEMBENCH_CONNECTIONS", connections.to_string())
            .env(
                "MEMBENCH_AUTH",
                if mode == Mode::NoAuth { "0" } else { "1" },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("server exited at once")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let mut server = Self {
            child,
            pid,
            stdin,
            stdout,
        };
        let ready = server.line().await?;
        let addr = ready
            .strip_prefix("ready ")
            .ok_or_else(|| format!("unexpected server output {ready:?}"))?
            .to_owned();
        Ok((server, addr))
    }

    async fn line(&mut self) -> Result<String, Error> {
        Ok(self
            .stdout
            .next_line()
            .await?
            .ok_or("the server process exited")?)
    }

    async fn ask(&mut self, command: &str) -> Result<String, Error> {
        let stdin = self.stdin.as_mut().ok_or("server stdin closed")?;
        stdin.write_all(format!("{command}\n").as_bytes()).await?;
        stdin.flush().await?;
        self.line().await
    }

    /// Live connections and live heap bytes.
    async fn count(&mut self) -> Result<(usize, i64), Error> {
        let answer = self.ask("count").await?;
        let (connections, heap) = answer.split_once(' ').ok_or("malformed count")?;
        Ok((connections.parse()?, heap.parse()?))
    }

    /// Live allocations by size.
    async fn profile(&mut self) -> Result<Vec<i64>, Error> {
        let mut live = vec![0; SIZE_CLASSES + 1];
        for entry in self.ask("profile").await?.split_whitespace() {
            let (size, count) = entry.split_once(':').ok_or("malformed profile")?;
            live[size.parse::<usize>()?] = count.parse()?;
        }
        Ok(live)
    }

    async fn wait_for(&mut self, connections: usize) -> Result<(), Error> {
        while self.count().await?.0 != connections {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// A field of the server's /proc status, in KiB.
    fn status_kib(&self, name: &str) -> Result<u64, Error> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .ok_or_else(|| format!("/proc status lacks {name}"))?;
        let value = line.trim_start_matches(':').split_whitespace().next();
        Ok(value.ok_or("empty /proc field")?.parse()?)
    }

    async fn snapshot(&mut self) -> Result<Snapshot, Error> {
        let (connections, heap) = self.count().await?;
        let profile = self.profile().await?;
        let field = |name: &str| self.status_kib(name);
        Ok(Snapshot {
            connections,
            heap,
            profile,
            rss_kib: field("VmRSS")?,
            anon_kib: field("RssAnon")?,
            threads: field("Threads")?,
        })
    }

    /// Closes stdin (the child exits on it), then reaps it.
    async fn shut_down(mut self) {
        self.stdin = None;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

struct Snapshot {
    connections: usize,
    heap: i64,
    profile: Vec<i64>,
    rss_kib: u64,
    anon_kib: u64,
    threads: u64,
}

fn client(seed: &[u8; 32], index: usize, mode: Mode, server: &SecretKey) -> TcpClient {
    let config = ClientConfig {
        // A lost connection must show as a shortfall, not be replaced.
        auto_reconnect: false,
        ..ClientConfig::default().with_client_id(identity(index))
    };
    let auth = (mode != Mode::NoAuth).then(|| ClientAuth {
        signed_frames: mode == Mode::Signed,
        ..ClientAuth::new(Arc::new(client_key(seed, index)))
            .with_server_key(server.public_key().clone())
    });
    TcpClient::tcp(config, auth)
}

/// Connects clients `0..count`, `CONCURRENCY` at a time. Returns the
/// connected ones and the failures.
async fn connect_all(
    seed: &[u8; 32],
    count: usize,
    mode: Mode,
    addr: &str,
) -> (Vec<TcpClient>, Vec<String>) {
    let server = server_key(seed);
    let results: Vec<_> = futures::stream::iter(0..count)
        .map(|index| {
            let client = client(seed, index, mode, &server);
            async move {
                match client.connect(addr).await {
                    Ok(()) => Ok(client),
                    Err(err) => Err(format!("{}: {err}", identity(index))),
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut connected = Vec::with_capacity(count);
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(client) => connected.push(client),
            Err(err) => failures.push(err),
        }
    }
    (connected, failures)
}

async fn drive(
    connections: usize,
    mode: Mode,
    touch_all: bool,
    broadcast: Option<usize>,
) -> Result<(), Error> {
    let seed: [u8; 32] = rand::random();
    let (mut server, addr) = ServerProcess::spawn(&seed, connections, mode, touch_all).await?;
    if touch_all {
        println!("server allocations are filled on malloc (MALLOC_PERTURB_): all of them resident");
    }
    let result = measure(&mut server, &seed, &addr, connections, mode, broadcast).await;
    server.shut_down().await;
    result
}

async fn measure(
    server: &mut ServerProcess,
    seed: &[u8; 32],
    addr: &str,
    connections: usize,
    mode: Mode,
    broadcast: Option<usize>,
) -> Result<(), Error> {
    println!(
        "memory per idle connection: {connections} connections, {mode_name}, server pid {pid}",
        mode_name = mode.name(),
        pid = server.pid
    );

    let (warm, failures) = connect_all(seed, WARM_UP, mode, addr).await;
    if let Some(failure) = failures.first() {
        return Err(format!("warm-up connection failed: {failure}").into());
    }
    for client in &warm {
        client.disconnect().await?;
    }
    drop(warm);
    server.wait_for(0).await?;
    tokio::time::sleep(SETTLE).await;
    let before = server.snapshot().await?;

    let started = Instant::now();
    let (clients, failures) = connect_all(seed, connections, mode, addr).await;
    let connect_time = started.elapsed();
    if !failures.is_empty() {
        println!(
            "{} connections failed (first: {}); measuring the {} that succeeded",
            failures.len(),
            failures[0],
            clients.len()
        );
    }
    if clients.is_empty() {
        return Err("no connection succeeded".into());
    }
    server.wait_for(clients.len()).await?;
    tokio::time::sleep(SETTLE).await;
    let after = server.snapshot().await?;
    let open = clients.iter().filter(|c| c.is_connected()).count();
    if after.connections != clients.len() || open != clients.len() {
        return Err(format!(
            "connections dropped while idle: server holds {}, clients hold {open} of {}",
            after.connections,
            clients.len()
        )
        .into());
    }
    report(&before, &after, connect_time);
    if let Some(bytes) = broadcast {
        measure_broadcast(server, &clients, bytes).await?;
    }
    Ok(())
}

/// One broadcast of `bytes` to every client: the server's peak resident
/// memory until all of them have it, against its resident memory before.
async fn measure_broadcast(
    server: &mut ServerProcess,
    clients: &[TcpClient],
    bytes: usize,
) -> Result<(), Error> {
    let received = Arc::new(AtomicI64::new(0));
    let all = Arc::new(Notify::new());
    let expected = clients.len() as i64;
    for client in clients {
        let (received, all) = (received.clone(), all.clone());
        client.set_handler(Arc::new(SyncHandler(move |_| {
            if received.fetch_add(1, Ordering::SeqCst) + 1 == expected {
                all.notify_one();
            }
            Ok(())
        })));
    }
    let before = server.status_kib("VmRSS")?;
    // Resets the peak (VmHWM) to the current resident set.
    std::fs::write(format!("/proc/{}/clear_refs", server.pid), "5")?;
    let started = Instant::now();
    let sent: usize = server.ask(&format!("broadcast {bytes}")).await?.parse()?;
    tokio::time::timeout(Duration::from_secs(60), all.notified())
        .await
        .map_err(|_| {
            format!(
                "{} of {expected} clients received the broadcast within 60 s",
                received.load(Ordering::SeqCst)
            )
        })?;
    let took = started.elapsed();
    let peak = server.status_kib("VmHWM")?;
    let rise = peak.saturating_sub(before) as f64 / 1024.0;
    let frame = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "broadcast of {frame:.1} MiB to {sent} recipients, all received in {:.2} s: \
         server peak RSS {:.1} MiB -> {:.1} MiB, +{rise:.1} MiB = {:.2}× the message",
        took.as_secs_f64(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        rise / frame
    );
    Ok(())
}

fn report(before: &Snapshot, after: &Snapshot, connect_time: Duration) {
    let n = (after.connections - before.connections) as f64;
    let per = |before: f64, after: f64| (after - before) / n;
    let rss = per(before.rss_kib as f64, after.rss_kib as f64);
    let anon = per(before.anon_kib as f64, after.anon_kib as f64);
    let heap = per(before.heap as f64, after.heap as f64) / 1024.0;
    println!(
        "connected {n} in {:.2} s ({:.0} connections/s, {CONCURRENCY} at a time)",
        connect_time.as_secs_f64(),
        n / connect_time.as_secs_f64()
    );
    println!(
        "server VmRSS   {:>8} KiB -> {:>8} KiB: {rss:6.2} KiB per connection",
        before.rss_kib, after.rss_kib
    );
    println!(
        "server RssAnon {:>8} KiB -> {:>8} KiB: {anon:6.2} KiB per connection",
        before.anon_kib, after.anon_kib
    );
    println!(
        "server heap    {:>8} KiB -> {:>8} KiB: {heap:6.2} KiB per connection (live, requested sizes)",
        before.heap / 1024,
        after.heap / 1024
    );
    println!("server threads {} -> {}", before.threads, after.threads);
    println!("live allocations per connection, by size (≥ 0.1 of one per connection):");
    let mut rows: Vec<(usize, f64)> = (0..=SIZE_CLASSES)
        .map(|size| {
            (
                size,
                (after.profile[size] - before.profile[size]) as f64 / n,
            )
        })
        .filter(|(_, count)| count.abs() >= 0.1)
        .collect();
    rows.sort_by(|a, b| (b.0 as f64 * b.1).total_cmp(&(a.0 as f64 * a.1)));
    for (size, count) in rows {
        let size_label = if size == SIZE_CLASSES {
            format!("≥{size}")
        } else {
            size.to_string()
        };
        println!(
            "  {size_label:>7} B × {count:5.2} = {:8.1} B",
            size as f64 * count
        );
    }
    let verdict = if rss <= GOAL_KIB { "within" } else { "ABOVE" };
    println!(
        "result: {rss:.2} KiB of resident memory per idle connection, {verdict} the {GOAL_KIB} KiB goal"
    );
}
