//! The send/receive contract under load, over real sockets and through the
//! public API only, so that it holds whatever the send path looks like
//! inside: frames never interleave, unicasts and broadcasts keep one order
//! per connection, every message a `send` accepted is either written or
//! counted lost, `try_send` hands back the very message it refuses, and
//! every `send_confirmed` resolves.
//!
//! Covered elsewhere, not repeated here:
//! - the client's `try_send` on a full queue:
//!   `e2e::*::try_send_hands_back_what_a_full_queue_cannot_take` (the
//!   server's is below);
//! - a stalled broadcast peer dropped, named in the `BroadcastReport`, the
//!   others receiving everything: `e2e::*::slow_consumer_is_dropped_others_keep_receiving`;
//! - loss counted and buffers returned when a writer blocked on a peer that
//!   never reads is cut: `lost_messages`.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use publisher_transport::{
    ClientAuth, ConnectionEvent, Handled, Handler, Inbound, SyncHandler, TransportClient,
    TransportError, TrySendError, backend::Backend, channel_handler, metrics::Metrics,
    proto::Payload,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
    task::{JoinHandle, JoinSet},
};

#[cfg(feature = "grpc")]
use crate::e2e::GrpcHarness;
#[cfg(feature = "quic")]
use crate::e2e::QuicHarness;
#[cfg(feature = "ws")]
use crate::e2e::WsHarness;
use crate::e2e::{
    Harness, Keys, STEP_TIMEOUT, TcpHarness, block, client_config, delivered, identity, next_event,
    number_of, numbered, recv, registered, server_config,
};

/// Bound of every test here: they move a few hundred megabytes through a
/// debug build, so they get more time than the end-to-end suite.
const BOUND: Duration = Duration::from_secs(120);

/// Instantiates each generic test below for one back-end.
macro_rules! contract_suite {
    ($backend:ident, $harness:ty) => {
        mod $backend {
            use super::*;

            contract_suite!(@tests $harness;
                producers_never_interleave_frames,
                unicast_and_broadcast_keep_one_order_per_connection,
                accepted_sends_are_written_or_counted_lost_when_the_server_stops,
                server_try_send_hands_back_the_very_message,
                every_confirmed_send_resolves_when_the_server_stops,
            );
        }
    };
    (@tests $harness:ty; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                bounded(super::$test::<$harness>()).await;
            }
        )*
    };
}

contract_suite!(tcp, TcpHarness);
#[cfg(feature = "grpc")]
contract_suite!(grpc, GrpcHarness);
#[cfg(feature = "quic")]
contract_suite!(quic, QuicHarness);
#[cfg(feature = "ws")]
contract_suite!(ws, WsHarness);

async fn bounded(test: impl Future<Output = ()>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(BOUND, test)
        .await
        .expect("test exceeded its time bound");
}

// ---------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------

/// Producers sharing one connection.
const PRODUCERS: u64 = 8;

/// A splitmix64 step: cheap, deterministic pseudo-random numbers.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The slot of message `seq` of `producer`.
fn slot(producer: u64, seq: u64) -> u64 {
    producer << 32 | seq
}

/// The body of message `slot`: 10 B to 64 KiB, mostly small, every byte
/// derived from the slot, so a receiver recomputes it to check it whole.
fn body(slot: u64) -> Bytes {
    let x = mix(slot);
    let size = match x % 16 {
        0..=7 => 10 + (x >> 8) as usize % 1_000,
        8..=12 => 1_000 + (x >> 8) as usize % 15_000,
        13..=14 => 16_000 + (x >> 8) as usize % 34_000,
        _ => 64 * 1024,
    };
    let mut data = Vec::with_capacity(size + 8);
    let mut state = x;
    while data.len() < size {
        state = mix(state);
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(size);
    Bytes::from(data)
}

// ---------------------------------------------------------------------------
// a. Frames never interleave
// ---------------------------------------------------------------------------

/// Which end runs the producers.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// Eight tasks `send` on one connection at once, messages of 10 B to 64 KiB
/// so that writes end mid-frame; plain and signed sessions, both ways. The
/// receiver gets every message exactly once, each body intact, each
/// producer's messages in the order it sent them, and nothing else.
pub async fn producers_never_interleave_frames<H: Harness>() {
    // Sized for a debug build on a loaded two-core machine: signed 64 KiB
    // messages are hashed twice, in unoptimised code.
    for (signed, from, per_producer) in [
        (false, Side::Client, 1_000),
        (true, Side::Client, 100),
        (false, Side::Server, 500),
        (true, Side::Server, 100),
    ] {
        let case = format!("signed {signed}, from {from:?}");
        let started = Instant::now();
        let keys = Keys::new(1);
        let server = H::server(server_config(), Some(keys.server_auth()));
        let (handler, mut at_server) = channel_handler(1024);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        let client = H::client(
            client_config("a"),
            Some(ClientAuth {
                signed_frames: signed,
                ..keys.client_auth(0)
            }),
        );
        let (handler, mut at_client) = channel_handler(1024);
        client.set_handler(handler);
        client.connect(&H::dial_addr(addr)).await.unwrap();
        registered(&server, &identity(0)).await;
        let connection = server.manager().get(&identity(0)).unwrap();
        assert_eq!(connection.is_signed(), signed, "{case}");

        let mut producers = JoinSet::new();
        for producer in 0..PRODUCERS {
            let (client, server) = (client.clone(), server.clone());
            producers.spawn(async move {
                for seq in 0..per_producer {
                    let n = slot(producer, seq);
                    let message = block(n, body(n));
                    match from {
                        Side::Client => client.send(message).await,
                        Side::Server => server.send(&identity(0), message).await,
                    }
                    .unwrap_or_else(|err| panic!("producer {producer}, message {seq}: {err}"));
                }
            });
        }
        let rx = match from {
            Side::Client => &mut at_server,
            Side::Server => &mut at_client,
        };
        let mut next = [0u64; PRODUCERS as usize];
        for _ in 0..PRODUCERS * per_producer {
            let got = recv(rx, &case).await;
            let n = number_of(&got.message);
            let (producer, seq) = (n >> 32, n & 0xFFFF_FFFF);
            assert!(producer < PRODUCERS, "{case}: unknown producer in {n:#x}");
            assert_eq!(
                seq, next[producer as usize],
                "{case}: producer {producer} out of order"
            );
            next[producer as usize] += 1;
            let Some(Payload::L2Block(got)) = got.message.payload else {
                unreachable!("number_of checked the payload")
            };
            assert!(
                got.block == body(n),
                "{case}: producer {producer} message {seq} corrupt ({} bytes)",
                got.block.len()
            );
        }
        while let Some(done) = producers.join_next().await {
            done.expect("producer");
        }
        // Anything extra would arrive before this last message.
        match from {
            Side::Client => client.send(numbered(u64::MAX)).await.unwrap(),
            Side::Server => server.send(&identity(0), numbered(u64::MAX)).await.unwrap(),
        }
        let last = recv(rx, &case).await;
        assert_eq!(number_of(&last.message), u64::MAX, "{case}: extra message");
        eprintln!(
            "{}: {case}: {} messages in {:?}",
            server.backend_name(),
            PRODUCERS * per_producer,
            started.elapsed()
        );
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// b. One order per connection for unicasts and broadcasts
// ---------------------------------------------------------------------------

/// The server interleaves `send` to one client and `broadcast` to all
/// (numbered in issue order); each client receives exactly its unicasts and
/// the broadcasts, in issue order. All sessions plain, then plain and signed
/// side by side (one broadcast then goes out in both forms).
pub async fn unicast_and_broadcast_keep_one_order_per_connection<H: Harness>() {
    const CLIENTS: usize = 3;
    // Each window is awaited at every client before the next, so no queue
    // holds more than a window and no broadcast may drop anyone.
    const WINDOW: u64 = 200;
    const WINDOWS: u64 = 10;
    for signed in [[false; CLIENTS], [true, false, true]] {
        let keys = Keys::new(CLIENTS);
        let server = H::server(server_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let mut clients = Vec::new();
        let mut inboxes = Vec::new();
        for (i, signed) in signed.into_iter().enumerate() {
            let client = H::client(
                client_config(&format!("c{i}")),
                Some(ClientAuth {
                    signed_frames: signed,
                    ..keys.client_auth(i)
                }),
            );
            let (handler, rx) = channel_handler(1024);
            client.set_handler(handler);
            client.connect(&H::dial_addr(addr)).await.unwrap();
            registered(&server, &identity(i)).await;
            let connection = server.manager().get(&identity(i)).unwrap();
            assert_eq!(connection.is_signed(), signed, "client {i}");
            clients.push(client);
            inboxes.push(rx);
        }
        let everyone: Vec<String> = (0..CLIENTS).map(identity).collect();

        let mut n = 0u64;
        for window in 0..WINDOWS {
            let mut expected = vec![Vec::new(); CLIENTS];
            for k in 0..WINDOW {
                let data = Bytes::from(vec![n as u8; (mix(n) % 20_000) as usize]);
                // The window ends with a broadcast, so an extra message
                // anywhere in it shows up as a wrong number.
                let to = if k == WINDOW - 1 { 3 } else { mix(!n) % 4 };
                if let Some(peer) = (to < CLIENTS as u64).then_some(to as usize) {
                    server.send(&identity(peer), block(n, data)).await.unwrap();
                    expected[peer].push((n, ""));
                } else {
                    let report = server.broadcast(block(n, data), None).unwrap();
                    assert!(report.dropped.is_empty(), "{report:?}");
                    assert_eq!(delivered(&report), everyone);
                    expected.iter_mut().for_each(|e| e.push((n, "publisher")));
                }
                n += 1;
            }
            for (i, rx) in inboxes.iter_mut().enumerate() {
                for &(want, sender) in &expected[i] {
                    let what = format!("client {i} (signed {}), window {window}", signed[i]);
                    let got = recv(rx, &what).await;
                    assert_eq!(number_of(&got.message), want, "{what}");
                    // Broadcasts say who sent them; unicasts carry what the
                    // application set (docs/PROTOCOL.md §5).
                    assert_eq!(got.message.sender_id, sender, "{what}");
                }
            }
        }
        for client in &clients {
            client.disconnect().await.unwrap();
        }
        server.stop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// c. Every accepted send is written or counted lost
// ---------------------------------------------------------------------------

/// Messages a test streams at most before the cut must have come.
const STREAM_LIMIT: u64 = 1_000_000;
/// The cut comes once the server's handler has seen this many.
const CUT_AFTER: u64 = 300;

/// Numbered messages a session wrote, by its metrics.
fn written(metrics: &Metrics) -> u64 {
    metrics
        .messages_total
        .with_label_values(&["l2_block", "out"])
        .get()
}

/// Messages a session counted lost, by its metrics.
fn undelivered(metrics: &Metrics) -> u64 {
    metrics
        .errors_total
        .with_label_values(&["undelivered", "write"])
        .get()
}

/// A handler forwarding each message's number, never waiting.
fn forwarding_handler() -> (Arc<dyn Handler>, mpsc::UnboundedReceiver<u64>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = SyncHandler(move |inbound: Inbound| {
        let _ = tx.send(number_of(&inbound.message));
        Ok(())
    });
    (Arc::new(handler), rx)
}

/// Streams numbered 1 KiB messages from `client` until a `send` fails,
/// running `cut` once the server's handler has seen [`CUT_AFTER`] of them,
/// and checks the books once the client reports the session over: every
/// `Ok` was written or counted undelivered, and the handler got an
/// in-order, gap-free prefix of what was written.
async fn stream_until_cut<B: Backend>(
    case: &str,
    client: &TransportClient<B>,
    seen: &mut mpsc::UnboundedReceiver<u64>,
    cut: impl Future<Output = ()>,
    settled: impl Future<Output = ()>,
) {
    let mut events = client.events();
    let producer = tokio::spawn({
        let client = client.clone();
        async move {
            let data = Bytes::from(vec![0x5A; 1024]);
            for n in 0..STREAM_LIMIT {
                if let Err(err) = client.send(block(n, data.clone())).await {
                    assert!(err.is_transient(), "send refused for a cut link: {err}");
                    return n;
                }
            }
            panic!("the stream ended before the cut");
        }
    });
    let mut handled = 0u64;
    while handled <= CUT_AFTER {
        let got = tokio::time::timeout(STEP_TIMEOUT, seen.recv()).await;
        assert_eq!(got.unwrap(), Some(handled), "{case}: handled out of order");
        handled += 1;
    }
    cut.await;
    let accepted = tokio::time::timeout(STEP_TIMEOUT, producer)
        .await
        .expect("the producer learns of the cut")
        .unwrap();
    next_event(&mut events, "session over", |event| {
        matches!(event, ConnectionEvent::Disconnected { .. })
    })
    .await;
    // The session is over: its counters are final.
    let metrics = client.metrics();
    let (written, undelivered) = (written(metrics), undelivered(metrics));
    settled.await;
    while let Ok(n) = seen.try_recv() {
        assert_eq!(n, handled, "{case}: handled out of order");
        handled += 1;
    }
    eprintln!(
        "{case}: accepted {accepted}, written {written}, undelivered {undelivered}, handled {handled}"
    );
    assert_eq!(
        accepted,
        written + undelivered,
        "{case}: {accepted} accepted, {written} written, {undelivered} counted lost"
    );
    assert!(
        handled <= written,
        "{case}: handled {handled} > written {written}"
    );
}

/// A client streams, the server stops mid-way: see [`stream_until_cut`].
pub async fn accepted_sends_are_written_or_counted_lost_when_the_server_stops<H: Harness>() {
    for signed in [false, true] {
        let keys = Keys::new(1);
        let mut config = server_config();
        config.stop_timeout = Duration::from_secs(1);
        let server = H::server(config, Some(keys.server_auth()));
        let (handler, mut seen) = forwarding_handler();
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        let client = H::client(
            client_config("a"),
            Some(ClientAuth {
                signed_frames: signed,
                ..keys.client_auth(0)
            }),
        );
        client.connect(&H::dial_addr(addr)).await.unwrap();
        registered(&server, &identity(0)).await;
        let case = format!("{}: server stops, signed {signed}", server.backend_name());
        let cut = async { server.stop().await.unwrap() };
        stream_until_cut(&case, &client, &mut seen, cut, async {}).await;
    }
}

/// A TCP relay to `target` for one link; aborting the task drops both
/// sockets at once, as a killed peer or a cut cable would.
async fn relay(target: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut outbound) = TcpStream::connect(target).await else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    (addr, task)
}

/// Kills the link of `relay` and waits until its sockets are gone.
async fn kill(relay: JoinHandle<()>) {
    relay.abort();
    let _ = relay.await;
}

/// A client streams over TCP, and the link is killed mid-way: see
/// [`stream_until_cut`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_sends_are_written_or_counted_lost_when_the_link_is_killed() {
    bounded(async {
        for signed in [false, true] {
            let case = format!("tcp: link killed, signed {signed}");
            let keys = Keys::new(1);
            let server = TcpHarness::server(server_config(), Some(keys.server_auth()));
            let (handler, mut seen) = forwarding_handler();
            server.set_handler(handler);
            let (addr, link) = relay(server.start().await.unwrap()).await;
            let client = TcpHarness::client(
                client_config("a"),
                Some(ClientAuth {
                    signed_frames: signed,
                    ..keys.client_auth(0)
                }),
            );
            client.connect(&addr.to_string()).await.unwrap();
            registered(&server, &identity(0)).await;
            // Stopping the server waits for its sessions, handlers included.
            let settled = async { server.stop().await.unwrap() };
            stream_until_cut(&case, &client, &mut seen, kill(link), settled).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// d. The server's try_send hands back the very message
// ---------------------------------------------------------------------------

/// Forwards each message's number, then holds it until the test grants a
/// permit: a peer that has stopped reading.
struct GatedHandler {
    seen: mpsc::UnboundedSender<u64>,
    gate: Arc<Semaphore>,
}

impl Handler for GatedHandler {
    fn handle(&self, inbound: Inbound) -> Handled {
        let _ = self.seen.send(number_of(&inbound.message));
        let gate = self.gate.clone();
        Handled::Pending(Box::pin(async move {
            let _ = gate.acquire_owned().await.map(|permit| permit.forget());
            Ok(())
        }))
    }
}

fn gated_handler() -> (
    Arc<dyn Handler>,
    mpsc::UnboundedReceiver<u64>,
    Arc<Semaphore>,
) {
    let (seen, rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let handler = GatedHandler {
        seen,
        gate: gate.clone(),
    };
    (Arc::new(handler), rx, gate)
}

/// The server's `try_send` to a client that stopped reading: on a full
/// queue the message comes back equal to what was offered, the connection
/// stays open, and once the client reads again everything queued and then
/// the handed-back message arrive in order.
pub async fn server_try_send_hands_back_the_very_message<H: Harness>() {
    let keys = Keys::new(1);
    let mut config = server_config();
    config.send_queue_capacity = 2;
    let server = H::server(config, Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    let (handler, mut seen, gate) = gated_handler();
    client.set_handler(handler);
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    let big = |n: u64| block(n, Bytes::from(vec![n as u8; 256 * 1024]));
    let mut queued = 0u64;
    let handed_back = loop {
        match server.try_send(&identity(0), big(queued)) {
            Ok(()) => queued += 1,
            Err(TrySendError::Full(message)) => break message,
            Err(err) => panic!("unexpected: {err}"),
        }
        assert!(queued < 4096, "the queue never filled");
    };
    assert!(*handed_back == big(queued), "the refused message changed");
    let connection = server.manager().get(&identity(0)).expect("still there");
    assert!(!connection.is_closed(), "a full queue does not disconnect");
    assert!(client.is_connected());

    for expected in 0..queued {
        let got = tokio::time::timeout(STEP_TIMEOUT, seen.recv()).await;
        assert_eq!(got.unwrap(), Some(expected));
        gate.add_permits(1);
    }
    server.send(&identity(0), *handed_back).await.unwrap();
    let got = tokio::time::timeout(STEP_TIMEOUT, seen.recv()).await;
    assert_eq!(got.unwrap(), Some(queued));
    gate.add_permits(1);
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// e. Every send_confirmed resolves
// ---------------------------------------------------------------------------

/// Confirmed sends in all.
const CONFIRMED: u64 = 500;
/// Confirmed sends of the first wave, which the server's handler finishes.
const FINISHED: u64 = 200;

/// [`CONFIRMED`] `send_confirmed` calls in two waves of concurrent calls.
/// The server's handler finishes the first wave, which must then be
/// confirmed (nothing follows it, so the peer acknowledges it); it holds
/// the first message of the second wave, and `cut` ends the session with
/// the rest of that wave in flight. Every call resolves, `Ok` or
/// `Unconfirmed`, and only messages whose handler returned are confirmed.
async fn confirmed_sends_across_a_cut<B: Backend>(
    case: &str,
    client: &TransportClient<B>,
    seen: &mut mpsc::UnboundedReceiver<u64>,
    gate: &Semaphore,
    cut: impl Future<Output = ()>,
) {
    gate.add_permits(FINISHED as usize);
    let (issued_tx, issued) = oneshot::channel();
    let calls = tokio::spawn({
        let client = client.clone();
        async move {
            let first = (0..FINISHED).map(|n| client.send_confirmed(numbered(n)));
            let mut results = futures::future::join_all(first).await;
            let mut second: Vec<_> = (FINISHED..CONFIRMED)
                .map(|n| Box::pin(client.send_confirmed(numbered(n))))
                .collect();
            // A call's first poll issues it: all are under way before the cut.
            for call in &mut second {
                if futures::poll!(call.as_mut()).is_ready() {
                    return None;
                }
            }
            let _ = issued_tx.send(());
            results.extend(futures::future::join_all(second).await);
            Some(results)
        }
    });
    tokio::time::timeout(STEP_TIMEOUT, issued)
        .await
        .expect("the first wave confirmed, the second issued")
        .expect("a call of the second wave resolved before the cut");
    for expected in 0..=FINISHED {
        let got = tokio::time::timeout(STEP_TIMEOUT, seen.recv()).await;
        assert_eq!(got.unwrap(), Some(expected), "{case}");
    }
    cut.await;
    let results = tokio::time::timeout(STEP_TIMEOUT, calls)
        .await
        .expect("no confirmed send hangs")
        .unwrap()
        .expect("issued");
    let mut confirmed = BTreeSet::new();
    for (n, result) in (0..).zip(results) {
        match result {
            Ok(()) => {
                confirmed.insert(n);
            }
            Err(TransportError::Unconfirmed { .. }) => {}
            Err(other) => panic!("{case}: message {n}: expected Ok or Unconfirmed, got {other}"),
        }
    }
    eprintln!("{case}: {} of {CONFIRMED} confirmed", confirmed.len());
    assert!(
        confirmed.iter().all(|&n| n < FINISHED),
        "{case}: confirmed a message whose handler never returned: {:?}",
        confirmed.range(FINISHED..).next()
    );
    assert_eq!(confirmed.len() as u64, FINISHED, "{case}: first wave");
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
}

/// Confirmed sends in flight when the server stops: see
/// [`confirmed_sends_across_a_cut`].
pub async fn every_confirmed_send_resolves_when_the_server_stops<H: Harness>() {
    let keys = Keys::new(1);
    let mut config = server_config();
    config.stop_timeout = Duration::from_secs(1);
    let server = H::server(config, Some(keys.server_auth()));
    let (handler, mut seen, gate) = gated_handler();
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;
    let case = format!("{}: server stops", server.backend_name());
    let cut = async { server.stop().await.unwrap() };
    confirmed_sends_across_a_cut(&case, &client, &mut seen, &gate, cut).await;
}

/// Confirmed sends in flight when the TCP link is killed: see
/// [`confirmed_sends_across_a_cut`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_send_resolves_when_the_link_is_killed() {
    bounded(async {
        let keys = Keys::new(1);
        let server = TcpHarness::server(server_config(), Some(keys.server_auth()));
        let (handler, mut seen, gate) = gated_handler();
        server.set_handler(handler);
        let (addr, link) = relay(server.start().await.unwrap()).await;
        let client = TcpHarness::client(client_config("a"), Some(keys.client_auth(0)));
        client.connect(&addr.to_string()).await.unwrap();
        registered(&server, &identity(0)).await;
        let case = "tcp: link killed";
        confirmed_sends_across_a_cut(case, &client, &mut seen, &gate, kill(link)).await;
        server.stop().await.unwrap();
    })
    .await;
}
