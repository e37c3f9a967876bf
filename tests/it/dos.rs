//! Denial-of-service resistance over real TCP sockets: silent connections,
//! large stalled frames, oversize frames before authentication, inbound
//! floods and the pending-handshake cap.
//!
//! Tests that measure the process's memory or open a thousand sockets run in
//! a process of their own (see [`isolated`]): the other tests of this binary
//! run in parallel threads and would blur the numbers.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use prost::Message as _;
use publisher_transport::{
    CodecError, ConnectionEvent, DisconnectReason, FrameCodec, Inbound, Message, SyncHandler,
    TcpClient, TcpServer, channel_handler,
    codec::frame_message,
    config::InboundLimit,
    proto::{Payload, rollup::v1::HandshakeResponse},
};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
};
use tokio_util::codec::FramedRead;

use crate::e2e::{
    Keys, STEP_TIMEOUT, block, bounded, client_config, eventually, identity, next_event, number_of,
    numbered, recv, registered, server_config,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Tells a child process which isolated test it is to run.
const ISOLATED_ENV: &str = "PUBLISHER_TRANSPORT_ISOLATED_TEST";

/// Runs the `#[ignore]`d test `name` of this binary alone in a child process
/// and fails if it fails.
pub(crate) async fn isolated(name: &str) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let run = tokio::process::Command::new(exe)
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ISOLATED_ENV, name)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within 90 s"))
        .expect("the test binary starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("--- {name} (own process) ---\n{stdout}{stderr}");
    assert!(output.status.success(), "{name} failed");
    assert!(stdout.contains("1 passed"), "{name} did not run");
}

/// Whether this process was started by [`isolated`] to run `name`; anywhere
/// else the measurement would be meaningless, so the test only says so.
pub(crate) fn in_isolation(name: &str) -> bool {
    let isolated = std::env::var(ISOLATED_ENV).is_ok_and(|wanted| wanted == name);
    if !isolated {
        println!("{name} runs only in a process of its own, started by its parent test");
    }
    isolated
}

/// A `/proc/self/status` figure given in kB, in bytes.
fn proc_status_bytes(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable {line:?}"));
    kib * KIB
}

/// Resident memory now.
pub(crate) fn rss() -> usize {
    proc_status_bytes("VmRSS:")
}

/// Peak resident memory so far.
pub(crate) fn peak_rss() -> usize {
    proc_status_bytes("VmHWM:")
}

pub(crate) fn mib(bytes: usize) -> f64 {
    bytes as f64 / MIB as f64
}

/// Kernel queues of the established IPv4 connections to `port`, from
/// `/proc/net/tcp`: bytes received by the server's sockets but not yet read
/// by the server, bytes the clients' sockets have not yet had acknowledged,
/// and how many server-side sockets there are.
#[derive(Debug, Default, Clone, Copy)]
struct TcpQueues {
    server_unread: usize,
    client_unsent: usize,
    server_sockets: usize,
}

fn tcp_queues(port: u16) -> TcpQueues {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_of = |address: &str| {
        address
            .rsplit(':')
            .next()
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    let mut queues = TcpQueues::default();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl, local, remote, state, tx_queue:rx_queue, …; 01 is ESTABLISHED.
        if fields.len() < 5 || fields[3] != "01" {
            continue;
        }
        let Some((tx, rx)) = fields[4].split_once(':') else {
            continue;
        };
        let tx = usize::from_str_radix(tx, 16).unwrap_or(0);
        let rx = usize::from_str_radix(rx, 16).unwrap_or(0);
        if port_of(fields[1]) == Some(port) {
            queues.server_unread += rx;
            queues.server_sockets += 1;
        } else if port_of(fields[2]) == Some(port) {
            queues.client_unsent += tx;
        }
    }
    queues
}

/// A TCP peer writing raw bytes and reading frames.
struct RawPeer {
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: OwnedWriteHalf,
}

impl RawPeer {
    async fn connect(addr: SocketAddr) -> Self {
        Self::new(TcpStream::connect(addr).await.unwrap())
    }

    /// Connects from the loopback address `from` (all of 127/8 is local).
    async fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        Self::new(socket.connect(addr).await.unwrap())
    }

    fn new(stream: TcpStream) -> Self {
        let (read, writer) = stream.into_split();
        Self {
            reader: FramedRead::new(read, FrameCodec::default()),
            writer,
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// The next frame body; `None` at the end of the stream (or a reset).
    async fn next(&mut self) -> Option<Bytes> {
        match tokio::time::timeout(STEP_TIMEOUT, self.reader.next())
            .await
            .expect("a frame or the end of the stream")
        {
            Some(Ok(body)) => Some(body),
            None | Some(Err(CodecError::Io(_))) => None,
            Some(Err(err)) => panic!("the server sent a bad frame: {err}"),
        }
    }

    /// Expects `Message{Disconnect{reason}}` then the end of the stream;
    /// returns the details.
    async fn expect_disconnect(&mut self, reason: DisconnectReason) -> String {
        let body = self.next().await.expect("a Disconnect");
        let disconnect = match Message::decode(body).unwrap().payload {
            Some(Payload::Disconnect(disconnect)) => disconnect,
            other => panic!("expected a Disconnect, got {other:?}"),
        };
        assert_eq!(
            DisconnectReason::from_proto(disconnect.reason),
            reason,
            "{disconnect:?}"
        );
        assert_eq!(self.next().await, None, "nothing after the Disconnect");
        disconnect.details
    }
}

fn accepted(server: &TcpServer) -> u64 {
    server
        .metrics()
        .connections_total
        .with_label_values(&["accepted"])
        .get()
}

/// Silent connections each hold a pending handshake; a legitimate client's
/// handshake must not queue behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_silent_connections_do_not_delay_a_legitimate_handshake() {
    isolated("dos::isolated_thousand_silent_connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in its own process by thousand_silent_connections_do_not_delay_a_legitimate_handshake"]
async fn isolated_thousand_silent_connections() {
    const SILENT: usize = 1_000;
    if !in_isolation("dos::isolated_thousand_silent_connections") {
        return;
    }
    // Both ends of every connection live in this process, plus some spare.
    let wanted = 2 * SILENT as u64 + 256;
    let limit = rlimit::increase_nofile_limit(wanted).unwrap_or(0);
    if limit < wanted {
        println!("SKIPPED: RLIMIT_NOFILE is {limit} and cannot be raised to {wanted}");
        return;
    }
    bounded(async {
        let keys = Keys::new(1);
        let mut config = server_config();
        // Longer than the test: the silent peers stay pending throughout.
        config.handshake_timeout = Duration::from_secs(60);
        config.first_byte_timeout = Duration::from_secs(60);
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap();

        // From 125 addresses, 8 each: one address may hold only 128 of the
        // pending handshakes. One at a time, so that what is measured is the
        // handshake, not the accept queue.
        let mut silent = Vec::with_capacity(SILENT);
        for n in 0..SILENT {
            let from = std::net::Ipv4Addr::new(127, 0, 1, (n / 8) as u8);
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((from, 0))).unwrap();
            silent.push(socket.connect(addr).await.unwrap());
        }
        eventually("every silent connection accepted", || {
            accepted(&server) >= SILENT as u64
        })
        .await;

        let client = TcpClient::tcp(client_config("legit"), Some(keys.client_auth(0)));
        let started = Instant::now();
        client.connect(&addr.to_string()).await.unwrap();
        let took = started.elapsed();
        println!("handshake with {SILENT} silent connections pending: {took:?}");
        assert!(took < Duration::from_secs(1), "handshake took {took:?}");
        registered(&server, &identity(0)).await;
        let failed = server
            .metrics()
            .connections_total
            .with_label_values(&["handshake_failed"])
            .get();
        assert_eq!(failed, 0, "the silent connections were still pending");

        // Closing them ends their handshakes at once, so `stop` need not wait.
        drop(silent);
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// Peers announcing 9 MiB frames and sending 256 KiB of each make the server
/// buffer only what arrived: announcing is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_9_mib_frames_raise_resident_memory_by_less_than_50_mib() {
    isolated("dos::isolated_stalled_9_mib_frames").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in its own process by stalled_9_mib_frames_raise_resident_memory_by_less_than_50_mib"]
async fn isolated_stalled_9_mib_frames() {
    const PEERS: usize = 50;
    const ANNOUNCED: usize = 9 * MIB;
    const SENT: usize = 256 * KIB;
    if !in_isolation("dos::isolated_stalled_9_mib_frames") {
        return;
    }
    bounded(async {
        // Without authentication frames up to max_message_size (10 MiB) are
        // read from the first byte.
        let server = TcpServer::tcp(server_config(), None);
        let addr = server.start().await.unwrap();
        let before = rss();

        let mut body = BytesMut::new();
        body.extend_from_slice(&(ANNOUNCED as u32).to_be_bytes());
        body.extend_from_slice(&vec![0x5A; SENT]);
        let mut peers = Vec::with_capacity(PEERS);
        for _ in 0..PEERS {
            let mut peer = RawPeer::connect(addr).await;
            peer.write(&body).await;
            peers.push(peer);
        }
        // The bytes have left the kernel for the server's buffers once no
        // socket queue holds any.
        eventually("the server has read everything sent", || {
            let queues = tcp_queues(addr.port());
            queues.server_sockets == PEERS && queues.server_unread == 0 && queues.client_unsent == 0
        })
        .await;
        assert_eq!(server.connections().len(), PEERS, "every peer still served");
        let after = rss();
        let peak = peak_rss();
        let grew = after.saturating_sub(before);
        println!(
            "{PEERS} peers × {} KiB sent of {} MiB announced: RSS {:.1} → {:.1} MiB \
             (+{:.1} MiB), peak {:.1} MiB",
            SENT / KIB,
            ANNOUNCED / MIB,
            mib(before),
            mib(after),
            mib(grew),
            mib(peak)
        );
        assert!(
            grew < 50 * MIB,
            "resident memory grew by {:.1} MiB",
            mib(grew)
        );

        drop(peers);
        server.stop().await.unwrap();
    })
    .await;
}

/// With a 4 MiB read budget, 8 peers each sending most of a 3 MiB frame make
/// the server buffer about the budget, not 24 MiB; once they finish, every
/// frame is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_budget_bounds_large_frames_and_all_complete() {
    isolated("dos::isolated_read_budget").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in its own process by read_budget_bounds_large_frames_and_all_complete"]
async fn isolated_read_budget() {
    const PEERS: usize = 8;
    const BUDGET: usize = 4 * MIB;
    const FRAME: usize = 3 * MIB;
    /// Held back until the stalled state has been measured.
    const TAIL: usize = 256 * KIB;
    if !in_isolation("dos::isolated_read_budget") {
        return;
    }
    bounded(async {
        let mut config = server_config();
        config.read_budget = BUDGET;
        let server = TcpServer::tcp(config, None);
        // Only sizes are kept: holding the frames would measure the test.
        let (tx, mut delivered) = mpsc::unbounded_channel();
        server.set_handler(Arc::new(SyncHandler(move |inbound: Inbound| {
            let _ = tx.send((number_of(&inbound.message), inbound.message.encoded_len()));
            Ok(())
        })));
        let addr = server.start().await.unwrap();
        // The peers' frames are made before measuring: they live in this
        // process too.
        let frames: Vec<Bytes> = (0..PEERS as u64)
            .map(|n| {
                frame_message(&block(n, Bytes::from(vec![n as u8; FRAME - 64])), FRAME).unwrap()
            })
            .collect();
        let before = rss();

        let (go_on, _) = tokio::sync::broadcast::channel::<()>(1);
        let written = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for frame in frames {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (read, mut write) = stream.into_split();
            let written = written.clone();
            let mut go_on = go_on.subscribe();
            writers.push(tokio::spawn(async move {
                let (head, tail) = frame.split_at(frame.len() - TAIL);
                // Counted per write, so the test knows what left this side.
                let mut rest = head;
                while !rest.is_empty() {
                    let n = write.write(rest).await.unwrap();
                    written.fetch_add(n, Ordering::Relaxed);
                    rest = &rest[n..];
                }
                go_on.recv().await.unwrap();
                write.write_all(tail).await.unwrap();
                (read, write)
            }));
        }
        // The server has read what was written minus what the kernels hold.
        let server_read = || {
            let queues = tcp_queues(addr.port());
            written.load(Ordering::Relaxed) - queues.server_unread - queues.client_unsent
        };
        // Settled: the budget is used up and reading has stopped. No event
        // says so, hence two samples apart.
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut last = 0;
        loop {
            let now = server_read();
            if now >= BUDGET - PEERS * 64 * KIB && now == last {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the server read {:.2} MiB and did not settle",
                mib(now)
            );
            last = now;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let stalled_rss = rss();
        let read = server_read();
        let attempted = PEERS * (FRAME - TAIL);
        println!(
            "stalled: peers sent {:.1} MiB, the server read {:.2} MiB (budget {} MiB); \
             RSS {:.1} → {:.1} MiB",
            mib(attempted),
            mib(read),
            BUDGET / MIB,
            mib(before),
            mib(stalled_rss)
        );
        // The budget, plus the one frame allowed to finish beyond it, plus
        // each connection's last slice.
        assert!(
            read <= BUDGET + FRAME + PEERS * 64 * KIB,
            "the server buffered {:.2} MiB",
            mib(read)
        );

        let _ = go_on.send(());
        let mut got = Vec::new();
        while got.len() < PEERS {
            let next = tokio::time::timeout(STEP_TIMEOUT, delivered.recv()).await;
            let Ok(Some((n, size))) = next else {
                panic!(
                    "only {} of {PEERS} frames delivered once the peers finished: {got:?}",
                    got.len()
                );
            };
            assert!(size > FRAME - 128, "frame {n} has {size} bytes");
            got.push(n);
        }
        got.sort_unstable();
        assert_eq!(got, (0..PEERS as u64).collect::<Vec<_>>());
        let peak = peak_rss();
        let grew = peak.saturating_sub(before);
        println!(
            "all {PEERS} frames delivered; peak RSS {:.1} MiB (+{:.1} MiB; unbounded \
             buffering would take {} MiB)",
            mib(peak),
            mib(grew),
            PEERS * FRAME / MIB
        );
        // What the server read is checked exactly above. Resident memory also
        // counts the allocator's slack, about as much again (growing buffers
        // are copied), so it is held to three quarters of the 24 MiB that
        // unbounded buffering would hold before any slack (measured: 10-14).
        assert!(
            grew < PEERS * FRAME * 3 / 4,
            "peak resident memory grew by {:.1} MiB",
            mib(grew)
        );
        for writer in writers {
            drop(writer.await.unwrap());
        }
        server.stop().await.unwrap();
    })
    .await;
}

/// Before authentication only 16 KiB frames are read: announcing more is
/// refused with `PROTOCOL_ERROR` from the length prefix alone, long before
/// the handshake timeout. A frame of exactly 16 KiB is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_before_authentication_is_refused_at_once() {
    bounded(async {
        let keys = Keys::new(1);
        let mut config = server_config();
        config.handshake_timeout = Duration::from_secs(60);
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap();

        for announced in [16 * KIB + 1, 9 * MIB] {
            let mut peer = RawPeer::connect(addr).await;
            let started = Instant::now();
            peer.write(&(announced as u32).to_be_bytes()).await;
            let details = peer
                .expect_disconnect(DisconnectReason::ProtocolError)
                .await;
            let took = started.elapsed();
            assert!(details.contains("exceeds max 16384"), "{details}");
            // Nowhere near the 60 s the server would wait for a handshake.
            assert!(took < Duration::from_secs(5), "refused after {took:?}");
        }

        // Exactly the limit: read in full, then refused as not a handshake.
        let mut peer = RawPeer::connect(addr).await;
        peer.write(&(16 * KIB as u32).to_be_bytes()).await;
        peer.write(&[0xFF; 16 * KIB]).await;
        let response = HandshakeResponse::decode(peer.next().await.expect("a response")).unwrap();
        assert!(!response.accepted, "{response:?}");
        let details = peer
            .expect_disconnect(DisconnectReason::ProtocolError)
            .await;
        assert!(!details.contains("exceeds max"), "{details}");

        let client = TcpClient::tcp(client_config("legit"), Some(keys.client_auth(0)));
        client.connect(&addr.to_string()).await.unwrap();
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// With 100 frames/s allowed, a client blasting 10,000 messages is cut off
/// with `THROTTLED`, while one sending 10 a second is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_rate_limit_throttles_a_flood_not_a_steady_sender() {
    bounded(async {
        let keys = Keys::new(2);
        let mut config = server_config();
        config.inbound_limit = Some(InboundLimit {
            frames_per_second: 100.0,
            bytes_per_second: 1e9,
        });
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let (handler, mut inbound) = channel_handler(16 * 1024);
        server.set_handler(handler);
        let addr = server.start().await.unwrap().to_string();
        // Unsigned frames: one message per frame, so 10,000 messages are
        // 10,000 frames (a signed batch would be one).
        let unsigned = |i: usize| {
            let mut auth = keys.client_auth(i);
            auth.signed_frames = false;
            auth
        };

        let steady = TcpClient::tcp(client_config("steady"), Some(unsigned(1)));
        let mut steady_events = steady.events();
        steady.connect(&addr).await.unwrap();
        registered(&server, &identity(1)).await;
        let steady_task = {
            let steady = steady.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(Duration::from_millis(100));
                for n in 0..25 {
                    ticks.tick().await;
                    steady.send(numbered(n)).await.unwrap();
                }
            })
        };

        let flood = TcpClient::tcp(client_config("flood"), Some(unsigned(0)));
        let mut flood_events = flood.events();
        flood.connect(&addr).await.unwrap();
        let mut accepted_sends = 0;
        for n in 0..10_000 {
            if flood.send(numbered(n)).await.is_err() {
                break;
            }
            accepted_sends += 1;
        }
        let end = next_event(&mut flood_events, "the flood's disconnect", |event| {
            matches!(event, ConnectionEvent::Disconnected { .. })
        })
        .await;
        println!("flood: {accepted_sends} sends accepted before the cut-off; {end:?}");
        assert!(
            matches!(
                end,
                ConnectionEvent::Disconnected {
                    reason: DisconnectReason::Throttled,
                    by_peer: true,
                    ..
                }
            ),
            "{end:?}"
        );
        let throttled = server
            .metrics()
            .errors_total
            .with_label_values(&["throttled", "read"])
            .get();
        assert_eq!(throttled, 1, "only the flood is throttled");

        tokio::time::timeout(STEP_TIMEOUT, steady_task)
            .await
            .expect("the steady sender finishes")
            .unwrap();
        // Everything the steady client sent arrives, in order, among the
        // flood's messages.
        let mut next = 0;
        while next < 25 {
            let got = recv(&mut inbound, "the steady client's messages").await;
            if *got.from == identity(1) {
                assert_eq!(number_of(&got.message), next);
                next += 1;
            }
        }
        assert!(steady.is_connected());
        while let Ok(event) = steady_events.try_recv() {
            assert!(
                matches!(event, ConnectionEvent::Connected { .. }),
                "the steady client: {event:?}"
            );
        }
        steady.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// With 8 handshakes allowed at once, 2 per address, silent peers from four
/// addresses fill the pool; a third from one of them is refused with a
/// refusing `HandshakeResponse` and `TOO_MANY_PEERS`, and a legitimate client
/// from another address gets in at once by displacing one of them, without
/// waiting for their handshakes to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_are_capped_per_address_and_a_newcomer_gets_in() {
    bounded(async {
        const CAP: usize = 8;
        const SHARE: usize = 2;
        let keys = Keys::new(1);
        let mut config = server_config();
        config.max_pending_handshakes = CAP;
        config.max_pending_handshakes_per_prefix = SHARE;
        config.handshake_timeout = Duration::from_secs(60);
        config.first_byte_timeout = Duration::from_secs(60);
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let from = |n: u8| std::net::Ipv4Addr::new(127, 0, 0, 2 + n);

        let mut silent = Vec::new();
        for n in 0..(CAP / SHARE) as u8 {
            for _ in 0..SHARE {
                silent.push(RawPeer::connect_from(from(n), addr).await);
            }
        }
        eventually("the silent peers accepted", || {
            accepted(&server) == CAP as u64
        })
        .await;

        let mut third = RawPeer::connect_from(from(0), addr).await;
        let response = HandshakeResponse::decode(third.next().await.expect("a response")).unwrap();
        assert!(!response.accepted, "{response:?}");
        assert!(
            response.error.contains("pending handshakes"),
            "{response:?}"
        );
        let details = third
            .expect_disconnect(DisconnectReason::TooManyPeers)
            .await;
        assert!(details.contains("from this address"), "{details}");

        let started = Instant::now();
        let legit = TcpClient::tcp(client_config("legit"), Some(keys.client_auth(0)));
        legit.connect(&addr.to_string()).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        registered(&server, &identity(0)).await;
        // One silent peer made room: closed without a word.
        let mut closed = 0;
        for peer in &mut silent {
            if tokio::time::timeout(Duration::from_millis(50), peer.reader.next())
                .await
                .is_ok()
            {
                closed += 1;
            }
        }
        assert_eq!(closed, 1, "exactly one silent peer displaced");
        legit.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}
