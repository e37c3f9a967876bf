//! Fault injection on real network paths: a server in one Linux network
//! namespace, clients in another, joined by a link of their own that is
//! delayed, lossy or cut.
//!
//! The link is a veth pair impaired with `tc … netem` where the kernel has
//! netem; otherwise a pair of TUN devices whose packets this process carries
//! across, dropping and delaying them the same way. Without the privileges or
//! tools for namespaces the tests are skipped (and pass), saying why.
//!
//! Namespaces are named after the process and the test, and deleted on drop,
//! so a failing test leaves nothing behind.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use publisher_transport::{
    ConnectionEvent, Inbound, SecretKey, SyncHandler, TcpClient, TcpServer, TransportError,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::{mpsc, oneshot},
};

use crate::e2e::{Keys, client_config, identity, number_of, numbered, server_config};

const SERVER_IP: &str = "10.77.0.1";
const CLIENT_IP: &str = "10.77.0.2";

/// Runs a command; its stderr is the error.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{program}: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A network namespace made by this test; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Self, String> {
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn tc(&self, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("tc", &full)
    }

    /// The file `setns` takes (iproute2 keeps one per named namespace).
    fn path(&self) -> PathBuf {
        ["/run/netns", "/var/run/netns"]
            .iter()
            .map(|dir| Path::new(dir).join(&self.name))
            .find(|path| path.exists())
            .unwrap_or_else(|| Path::new("/run/netns").join(&self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleaning up: {err}");
        }
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|err| format!("setns: {err}"))
}

/// The impairment a TUN link applies in each direction.
#[derive(Debug, Default)]
struct Impairment {
    delay_micros: AtomicU64,
    /// Drop probability in millionths.
    loss_ppm: AtomicU32,
    cut: AtomicBool,
}

impl Impairment {
    fn drops(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
            || rand::random::<u32>() % 1_000_000 < self.loss_ppm.load(Ordering::Relaxed)
    }
}

/// Carries IP packets between two TUN devices, applying an [`Impairment`].
struct Forwarder {
    impairment: Arc<Impairment>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(a: File, b: File) -> Result<Self, String> {
        let impairment = Arc::new(Impairment::default());
        let stop = Arc::new(AtomicBool::new(false));
        let clone = |file: &File| file.try_clone().map_err(|err| format!("dup: {err}"));
        let (a_out, b_out) = (clone(&a)?, clone(&b)?);
        let mut threads = Vec::new();
        for (from, to) in [(a, b_out), (b, a_out)] {
            let (queue, delayed) = std_mpsc::channel::<(Instant, Vec<u8>)>();
            let (impairment, stop) = (impairment.clone(), stop.clone());
            threads.push(thread::spawn(move || {
                receive(from, queue, &impairment, &stop)
            }));
            threads.push(thread::spawn(move || deliver(to, delayed)));
        }
        Ok(Self {
            impairment,
            stop,
            threads,
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Reads packets from `from` and queues the survivors with their due time.
fn receive(
    mut from: File,
    queue: std_mpsc::Sender<(Instant, Vec<u8>)>,
    impairment: &Impairment,
    stop: &AtomicBool,
) {
    let mut packet = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut poll = nix::libc::pollfd {
            fd: from.as_raw_fd(),
            events: nix::libc::POLLIN,
            revents: 0,
        };
        // Wakes up now and then to notice `stop`.
        // SAFETY: one valid pollfd, for the duration of the call.
        if unsafe { nix::libc::poll(&mut poll, 1, 50) } <= 0 {
            continue;
        }
        let Ok(len) = from.read(&mut packet) else {
            return;
        };
        if impairment.drops() {
            continue;
        }
        let delay = Duration::from_micros(impairment.delay_micros.load(Ordering::Relaxed));
        if queue
            .send((Instant::now() + delay, packet[..len].to_vec()))
            .is_err()
        {
            return;
        }
    }
}

/// Writes queued packets to `to` when they are due; ends with the receiver.
fn deliver(mut to: File, delayed: std_mpsc::Receiver<(Instant, Vec<u8>)>) {
    while let Ok((due, packet)) = delayed.recv() {
        thread::sleep(due.saturating_duration_since(Instant::now()));
        // A packet the kernel refuses is a lost packet.
        let _ = to.write(&packet);
    }
}

const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: a name, then flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _rest: [u8; 22],
}

/// Creates TUN device `name` inside `netns`; the device lives as long as the
/// returned file.
fn open_tun(netns: &Netns, name: &str) -> Result<File, String> {
    let path = netns.path();
    let name = name.to_owned();
    // A thread of its own: entering the namespace is for good.
    thread::spawn(move || {
        enter(&path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|err| format!("/dev/net/tun: {err}"))?;
        let mut request = IfReq {
            name: [0; 16],
            flags: IFF_TUN | IFF_NO_PI,
            _rest: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `IfReq` lays out.
        let result = unsafe { nix::libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut request) };
        if result < 0 {
            return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()));
        }
        Ok(file)
    })
    .join()
    .map_err(|_| "the TUN thread panicked".to_owned())?
}

/// How the two namespaces are joined.
enum Link {
    /// A veth pair; `tc netem` on both ends.
    Netem { ends: [(String, String); 2] },
    /// TUN devices and this process in between.
    Tun(Forwarder),
}

/// Two namespaces (server, clients) and the link between them.
struct Topology {
    // Dropped first: the forwarder stops before its devices go.
    link: Link,
    server: Netns,
    client: Netns,
}

impl Topology {
    /// Sets everything up, or says why it cannot be done here.
    fn create(test: &str) -> Result<Self, String> {
        let pid = std::process::id();
        let server = Netns::create(format!("pt-{pid}-{test}-srv"))?;
        let client = Netns::create(format!("pt-{pid}-{test}-cli"))?;
        let link = match Self::veth_with_netem(&server, &client) {
            Ok(link) => link,
            Err(why) => {
                println!("netem unavailable ({why}); impairing a TUN link in user space");
                Self::tun(&server, &client)?
            }
        };
        Ok(Self {
            link,
            server,
            client,
        })
    }

    fn veth_with_netem(server: &Netns, client: &Netns) -> Result<Link, String> {
        let (server_end, client_end) = ("pt-srv", "pt-cli");
        run(
            "ip",
            &[
                "link",
                "add",
                server_end,
                "netns",
                &server.name,
                "type",
                "veth",
                "peer",
                "name",
                client_end,
                "netns",
                &client.name,
            ],
        )?;
        for (netns, device, address) in [
            (server, server_end, SERVER_IP),
            (client, client_end, CLIENT_IP),
        ] {
            netns.ip(&["addr", "add", &format!("{address}/24"), "dev", device])?;
            netns.ip(&["link", "set", device, "up"])?;
        }
        let link = Link::Netem {
            ends: [
                (server.name.clone(), server_end.to_owned()),
                (client.name.clone(), client_end.to_owned()),
            ],
        };
        if let Err(err) = server.tc(&["qdisc", "add", "dev", server_end, "root", "netem"]) {
            server.ip(&["link", "del", server_end])?;
            return Err(err);
        }
        Ok(link)
    }

    fn tun(server: &Netns, client: &Netns) -> Result<Link, String> {
        let (server_end, client_end) = ("pt-srv", "pt-cli");
        let server_file = open_tun(server, server_end)?;
        let client_file = open_tun(client, client_end)?;
        for (netns, device, address, peer) in [
            (server, server_end, SERVER_IP, CLIENT_IP),
            (client, client_end, CLIENT_IP, SERVER_IP),
        ] {
            netns.ip(&["addr", "add", address, "peer", peer, "dev", device])?;
            netns.ip(&["link", "set", device, "up"])?;
        }
        Ok(Link::Tun(Forwarder::start(server_file, client_file)?))
    }

    /// Delays every packet by `delay` and drops `loss_percent` of them, in
    /// each direction; a loss of 100 cuts the link.
    fn impair(&self, delay: Duration, loss_percent: u32) {
        match &self.link {
            Link::Netem { ends } => {
                for (netns, device) in ends {
                    let delay = format!("{}ms", delay.as_millis());
                    let loss = format!("{loss_percent}%");
                    run(
                        "tc",
                        &[
                            "-n", netns, "qdisc", "replace", "dev", device, "root", "netem",
                            "delay", &delay, "loss", &loss,
                        ],
                    )
                    .expect("netem worked when the link was made");
                }
            }
            Link::Tun(forwarder) => {
                let impairment = &forwarder.impairment;
                impairment
                    .delay_micros
                    .store(delay.as_micros() as u64, Ordering::Relaxed);
                impairment
                    .loss_ppm
                    .store(loss_percent.min(100) * 10_000, Ordering::Relaxed);
                impairment.cut.store(loss_percent >= 100, Ordering::Relaxed);
            }
        }
    }

    fn cut(&self) {
        self.impair(Duration::ZERO, 100);
    }

    fn restore(&self) {
        self.impair(Duration::ZERO, 0);
    }
}

/// The topology for `test`, or `None` (with the reason printed) where
/// namespaces cannot be made.
fn topology_or_skip(test: &str) -> Option<Topology> {
    match Topology::create(test) {
        Ok(topology) => Some(topology),
        Err(why) => {
            println!("SKIPPED {test}: cannot build network namespaces here: {why}");
            None
        }
    }
}

/// A thread inside a namespace running a single-threaded runtime: every
/// socket its tasks open belongs to that namespace.
struct NsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NsRuntime {
    fn start(netns: &Netns) -> Self {
        let path = netns.path();
        let (ready, handle) = std_mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            enter(&path).expect("entering the namespace");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            ready.send(runtime.handle().clone()).unwrap();
            // Runs the spawned tasks until told to stop; dropping the runtime
            // then ends whatever is left.
            runtime.block_on(async {
                let _ = stopped.await;
            });
        });
        Self {
            handle: handle.recv().expect("the runtime starts"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Builds the publisher and sequencer examples (with this binary's
/// features) and returns their paths.
async fn example_binaries() -> (PathBuf, PathBuf) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let features: Vec<&str> = [
        ("grpc", cfg!(feature = "grpc")),
        ("quic", cfg!(feature = "quic")),
        ("tls", cfg!(feature = "tls")),
        ("libsecp256k1", cfg!(feature = "libsecp256k1")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let mut build = tokio::process::Command::new(cargo);
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--example", "publisher", "--example", "sequencer"])
        .args(["--message-format=json", "--no-default-features"])
        .args(["--features", &features.join(",")])
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(600), build.output())
        .await
        .expect("building the examples took over 10 minutes")
        .expect("cargo runs");
    assert!(output.status.success(), "building the examples failed");
    println!("examples built in {:?}", started.elapsed());
    let mut paths = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(path)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            paths.insert(name.to_owned(), PathBuf::from(path));
        }
    }
    (
        paths.remove("publisher").expect("the publisher was built"),
        paths.remove("sequencer").expect("the sequencer was built"),
    )
}

/// A program started inside a namespace; its stdout lines arrive on
/// `lines`, its stderr is kept for the report. Killed on drop.
struct Program {
    _child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Program {
    fn start(netns: &Netns, program: &Path, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the program starts");
        let (tx, lines) = mpsc::unbounded_channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let kept = stderr.clone();
        let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                kept.lock().unwrap().push(line);
            }
        });
        Self {
            _child: child,
            lines,
            stderr,
        }
    }

    /// The next stdout line starting with `prefix`, what follows it.
    async fn line_after(&mut self, prefix: &str) -> String {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return rest.to_owned();
                }
            }
            panic!("output ended before `{prefix}…`");
        };
        match tokio::time::timeout(Duration::from_secs(20), wait).await {
            Ok(rest) => rest,
            Err(_) => panic!(
                "no `{prefix}…` line within 20 s; stderr: {:?}",
                self.stderr.lock().unwrap()
            ),
        }
    }
}

/// Over a link with 100 ms of delay and 5 % loss each way, the example
/// sequencers authenticate to the example publisher and their two-phase
/// rounds complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_rounds_complete_over_a_slow_lossy_link() {
    const DECISIONS: usize = 5;
    let Some(topology) = topology_or_skip("lossy") else {
        return;
    };
    // Built before the clock starts; the build alone may wait for the
    // target directory.
    let (publisher, sequencer) = example_binaries().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        topology.impair(Duration::from_millis(100), 5);
        let dir = tempfile::tempdir().unwrap();
        let key_file = |name: &str| {
            let path = dir.path().join(format!("{name}.key"));
            let key = SecretKey::generate();
            key.save(&path).unwrap();
            (
                path.to_str().unwrap().to_owned(),
                key.public_key().to_string(),
            )
        };
        let (publisher_key, publisher_public) = key_file("publisher");
        let sequencers = [key_file("seq-a"), key_file("seq-b")];
        let trust: Vec<String> = ["seq-a", "seq-b"]
            .iter()
            .zip(&sequencers)
            .map(|(id, (_, public))| format!("{id}={public}"))
            .collect();

        let listen = format!("{SERVER_IP}:0");
        let mut args = vec!["--listen", &listen, "--key-file", &publisher_key];
        for trusted in &trust {
            args.extend(["--trust", trusted]);
        }
        let mut server = Program::start(&topology.server, &publisher, &args);
        let addr = server.line_after("listening on ").await;
        assert_eq!(
            server.line_after("public key ").await,
            publisher_public,
            "the publisher uses its key file"
        );

        let mut clients = Vec::new();
        for ((key, _), id) in sequencers.iter().zip(["seq-a", "seq-b"]) {
            let chain = if id == "seq-a" { "1" } else { "2" };
            clients.push(Program::start(
                &topology.client,
                &sequencer,
                &[
                    "--connect",
                    &addr,
                    "--key-file",
                    key,
                    "--publisher-key",
                    &publisher_public,
                    "--client-id",
                    id,
                    "--chain-id",
                    chain,
                    "--xt-every",
                    "300ms",
                ],
            ));
        }
        let started = Instant::now();
        for client in &mut clients {
            assert_eq!(client.line_after("connected to ").await, addr);
        }
        println!("both sequencers connected in {:?}", started.elapsed());
        // Every sequencer sees every decision; count its commits.
        for (client, id) in clients.iter_mut().zip(["seq-a", "seq-b"]) {
            for _ in 0..DECISIONS {
                let decided = client.line_after("decided ").await;
                assert!(decided.ends_with(" commit"), "{id}: decided {decided}");
            }
        }
        println!(
            "{DECISIONS} commits seen by each sequencer {:?} after connecting",
            started.elapsed()
        );
    })
    .await
    .expect("the rounds completed within 60 s");
}

/// How a confirmed send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The server acknowledged it.
    Delivered,
    /// Refused before it was queued (no session).
    Refused,
    /// The session ended before the ack: it may or may not have arrived.
    Unconfirmed,
}

/// One client's sends: number, when `send_confirmed` was called and
/// returned, and how it ended.
#[derive(Debug, Clone, Copy)]
struct Sent {
    n: u64,
    called: Instant,
    returned: Instant,
    outcome: Outcome,
}

impl Sent {
    fn ok(&self) -> bool {
        self.outcome == Outcome::Delivered
    }
}

#[derive(Debug, Default)]
struct SendLog {
    sends: Vec<Sent>,
    /// Set once the client stopped sending.
    done: bool,
}

impl SendLog {
    fn ok_since(&self, since: Instant) -> usize {
        self.sends
            .iter()
            .filter(|sent| sent.ok() && sent.called >= since)
            .count()
    }
}

/// Per identity, (server connection id, number) in arrival order.
type Arrivals = HashMap<String, Vec<(u64, u64)>>;

fn collect(inbound: &mut mpsc::UnboundedReceiver<(String, u64, u64)>, into: &mut Arrivals) {
    while let Ok((from, connection, n)) = inbound.try_recv() {
        into.entry(from).or_default().push((connection, n));
    }
}

/// Polls `condition` every 20 ms for up to `limit`.
async fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 10 s cut of the link: every send made during the cut fails — the ones
/// in flight when it began with `Unconfirmed` once the client notices, the
/// later ones with `NotConnected` — and after the link is back the clients
/// reconnect within the backoff bounds. Every send reported delivered
/// arrived, in order, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_cut_fails_sends_and_clients_reconnect() {
    const CLIENTS: usize = 3;
    const CUT: Duration = Duration::from_secs(10);
    const PACE: Duration = Duration::from_millis(100);
    const READ_TIMEOUT: Duration = Duration::from_secs(2);
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
    // A dial may be stuck in the blackhole when the link returns; then
    // the longest wait (jitter adds up to half), then the handshake.
    const RECONNECT_BOUND: Duration = Duration::from_secs(1 + 3 + 2);
    let Some(topology) = topology_or_skip("cut") else {
        return;
    };
    let server_runtime = NsRuntime::start(&topology.server);
    let client_runtime = NsRuntime::start(&topology.client);
    bounded_long(async {
        let keys = Arc::new(Keys::new(CLIENTS));

        let (bound_tx, bound) = oneshot::channel::<SocketAddr>();
        let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
        let (stop_server, server_stopped) = oneshot::channel::<()>();
        let server_keys = keys.clone();
        let server_task = server_runtime.spawn(async move {
            let mut config = server_config();
            // Sessions the cut left behind go during the cut.
            config.read_timeout = Duration::from_secs(3);
            config.ping_interval = Some(Duration::from_secs(1));
            let server = TcpServer::tcp(config, Some(server_keys.server_auth()));
            server.set_handler(Arc::new(SyncHandler(move |inbound: Inbound| {
                let _ = arrived_tx.send((
                    inbound.from.to_string(),
                    inbound.connection_id,
                    number_of(&inbound.message),
                ));
                Ok(())
            })));
            let addr = server.listen(&format!("{SERVER_IP}:0")).await.unwrap();
            bound_tx.send(addr).unwrap();
            let _ = server_stopped.await;
            server.stop().await.unwrap();
        });
        let addr = bound.await.expect("the server listens");

        let logs: Vec<Arc<Mutex<SendLog>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
        let streaming = Arc::new(AtomicBool::new(true));
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let (stop_clients, clients_stopped) = oneshot::channel::<()>();
        let client_task = {
            let (keys, logs, streaming) = (keys.clone(), logs.clone(), streaming.clone());
            client_runtime.spawn(async move {
                let mut clients = Vec::new();
                for (i, log) in logs.into_iter().enumerate() {
                    let mut config = client_config(&format!("client-{i}"));
                    config.auto_reconnect = true;
                    config.reconnect_delay = Duration::from_millis(250);
                    config.max_reconnect_delay = MAX_RECONNECT_DELAY;
                    config.connect_timeout = CONNECT_TIMEOUT;
                    config.handshake_timeout = Duration::from_secs(2);
                    config.read_timeout = READ_TIMEOUT;
                    config.ping_interval = Some(Duration::from_millis(500));
                    let client = TcpClient::tcp(config, Some(keys.client_auth(i)));
                    let mut client_events = client.events();
                    let events_tx = events_tx.clone();
                    tokio::spawn(async move {
                        while let Ok(event) = client_events.recv().await {
                            let _ = events_tx.send((i, Instant::now(), event));
                        }
                    });
                    client.connect(&addr.to_string()).await.unwrap();
                    tokio::spawn(stream(client.clone(), log, streaming.clone(), PACE));
                    clients.push(client);
                }
                let _ = clients_stopped.await;
                for client in &clients {
                    let _ = client.disconnect().await;
                }
            })
        };

        let mut got = Arrivals::new();
        wait_for("every client streaming", Duration::from_secs(10), || {
            collect(&mut arrived, &mut got);
            logs.iter().enumerate().all(|(i, log)| {
                let log = log.lock().unwrap();
                log.sends.iter().filter(|sent| sent.ok()).count() >= 10
                    && got.get(&identity(i)).is_some_and(|got| got.len() >= 10)
            })
        })
        .await;

        let cut_at = Instant::now();
        topology.cut();
        let mut noticed = HashMap::new();
        while noticed.len() < CLIENTS {
            let (i, at, event) = tokio::time::timeout_at((cut_at + CUT).into(), events.recv())
                .await
                .expect("every client notices the cut before it ends")
                .unwrap();
            if let ConnectionEvent::Disconnected { reason, .. } = event {
                println!(
                    "client {i} noticed the cut after {:?} ({reason})",
                    at - cut_at
                );
                noticed.entry(i).or_insert(at);
            }
        }
        tokio::time::sleep_until((cut_at + CUT).into()).await;
        let restored_at = Instant::now();
        topology.restore();
        let mut back = HashMap::new();
        while back.len() < CLIENTS {
            let (i, at, event) =
                tokio::time::timeout_at((restored_at + RECONNECT_BOUND).into(), events.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "only {} of {CLIENTS} clients reconnected within {RECONNECT_BOUND:?}",
                            back.len()
                        )
                    })
                    .unwrap();
            if let ConnectionEvent::Connected {
                reconnect: true, ..
            } = event
            {
                println!(
                    "client {i} reconnected {:?} after the link came back",
                    at - restored_at
                );
                back.entry(i).or_insert(at);
            }
        }

        wait_for(
            "every client streaming again",
            Duration::from_secs(10),
            || {
                logs.iter()
                    .enumerate()
                    .all(|(i, log)| log.lock().unwrap().ok_since(back[&i]) >= 10)
            },
        )
        .await;
        streaming.store(false, Ordering::Relaxed);
        wait_for(
            "every client stopped sending",
            Duration::from_secs(5),
            || logs.iter().all(|log| log.lock().unwrap().done),
        )
        .await;
        wait_for(
            "the last accepted message of every client",
            Duration::from_secs(10),
            || {
                collect(&mut arrived, &mut got);
                logs.iter().enumerate().all(|(i, log)| {
                    let last_ok = log
                        .lock()
                        .unwrap()
                        .sends
                        .iter()
                        .rev()
                        .find(|s| s.ok())
                        .map(|s| s.n);
                    got.get(&identity(i))
                        .and_then(|got| got.last())
                        .map(|(_, n)| *n)
                        == last_ok
                })
            },
        )
        .await;
        let _ = stop_clients.send(());
        client_task.await.unwrap();
        let _ = stop_server.send(());
        server_task.await.unwrap();

        let mut totals = [0usize; 5];
        for (i, log) in logs.iter().enumerate() {
            let log = log.lock().unwrap();
            let arrivals = &got[&identity(i)];
            let numbers: Vec<u64> = arrivals.iter().map(|(_, n)| *n).collect();
            assert!(
                numbers.windows(2).all(|w| w[0] < w[1]),
                "client {i}: duplicated or reordered: {numbers:?}"
            );
            let noticed = noticed[&i];
            let (mut before, mut unconfirmed, mut arrived_unconfirmed, mut refused, mut after) =
                (0, 0, 0, 0, 0);
            for sent in &log.sends {
                let arrived = numbers.binary_search(&sent.n).is_ok();
                match sent.outcome {
                    Outcome::Delivered => {
                        assert!(
                            arrived,
                            "client {i}: message {} reported delivered is missing",
                            sent.n
                        );
                        assert!(
                            sent.called < cut_at || sent.called >= restored_at,
                            "client {i}: message {} sent during the cut reported delivered",
                            sent.n
                        );
                        if sent.called < cut_at {
                            before += 1;
                        } else {
                            after += 1;
                        }
                    }
                    Outcome::Refused => {
                        assert!(!arrived, "client {i}: refused message {} arrived", sent.n);
                        refused += 1;
                    }
                    Outcome::Unconfirmed => {
                        // In flight when the link went: reported at the
                        // latest when the client noticed.
                        assert!(
                            sent.returned <= noticed + Duration::from_secs(1),
                            "client {i}: message {} unconfirmed only {:?} after the cut",
                            sent.n,
                            sent.returned - cut_at
                        );
                        unconfirmed += 1;
                        arrived_unconfirmed += usize::from(arrived);
                    }
                }
            }
            println!(
                "client {i}: {before} delivered before the cut; {unconfirmed} in flight \
                 reported unconfirmed when it noticed the cut after {:?} ({arrived_unconfirmed} \
                 of them had arrived); {refused} refused while disconnected; {after} delivered \
                 after",
                noticed - cut_at
            );
            for (total, count) in
                totals
                    .iter_mut()
                    .zip([before, unconfirmed, arrived_unconfirmed, refused, after])
            {
                *total += count;
            }
        }
        println!(
            "all clients: {} delivered before the cut, {} unconfirmed ({} of which had \
             arrived), {} refused, {} delivered after; none reported delivered is missing",
            totals[0], totals[1], totals[2], totals[3], totals[4]
        );
        assert!(
            totals[1] + totals[3] > 0,
            "sends during the cut were reported failed"
        );
    })
    .await;
    drop((client_runtime, server_runtime));
}

/// Bounds a test with room for a 10 s cut.
async fn bounded_long(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(50), test)
        .await
        .expect("test exceeded its time bound");
}

/// Sends a numbered message every `pace` while `streaming`, each confirmed
/// before the next, logging how each ended.
async fn stream(
    client: TcpClient,
    log: Arc<Mutex<SendLog>>,
    streaming: Arc<AtomicBool>,
    pace: Duration,
) {
    let mut ticks = tokio::time::interval(pace);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0;
    while streaming.load(Ordering::Relaxed) {
        ticks.tick().await;
        n += 1;
        let called = Instant::now();
        let outcome = match client.send_confirmed(numbered(n)).await {
            Ok(()) => Outcome::Delivered,
            Err(TransportError::NotConnected | TransportError::ConnectionClosed { .. }) => {
                Outcome::Refused
            }
            Err(TransportError::Unconfirmed { .. }) => Outcome::Unconfirmed,
            Err(err) => panic!("unexpected send error: {err}"),
        };
        log.lock().unwrap().sends.push(Sent {
            n,
            called,
            returned: Instant::now(),
            outcome,
        });
    }
    log.lock().unwrap().done = true;
}
