//! Property test: any settings `validate()` accepts, extremes included
//! (`Duration::MAX`, the largest counts), give a server and a client that run
//! a session without panicking and within a bounded time; socket options it
//! refuses are refused by starting and connecting too.

use std::{
    sync::{
        Arc, Once,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};
use publisher_transport::{
    ClientAuth, ClientConfig, Message, RateLimit, SecretKey, ServerAuth, ServerConfig, TcpClient,
    TcpOptions, TcpServer, TransportError, TrustStore, channel_handler,
    codec::{DEFAULT_MAX_FRAME_SIZE, HANDSHAKE_MAX_FRAME_SIZE},
    config::{InboundLimit, MAX_COUNT},
    proto::{Payload, rollup::v1::Vote},
};
use tokio::time::timeout;

/// Bound of one whole case: start, connect, exchange, stop.
const CASE: Duration = Duration::from_secs(20);
/// Bound of one awaited step when the session is expected to work.
const STEP: Duration = Duration::from_secs(5);
/// Prefix of the names of the threads a case runs on.
const THREADS: &str = "config-props";

/// Panics on this test's threads, including tasks the server and client spawn
/// (tokio catches those, so they would otherwise go unseen).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().map(str::to_owned);
            if name.is_some_and(|name| name.starts_with(THREADS)) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Timeouts a session can work with, up to the largest `Duration`.
fn workable() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (2_000u64..60_000).prop_map(Duration::from_millis),
        Just(Duration::from_secs(365 * 24 * 3600)),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::MAX),
        Just(Duration::MAX / 2 + Duration::from_nanos(1)),
    ]
}

/// Any positive timeout, mostly workable ones.
fn timeout_value() -> impl Strategy<Value = (Duration, bool)> {
    prop_oneof![
        12 => workable().prop_map(|d| (d, true)),
        1 => prop_oneof![
            Just(Duration::from_nanos(1)),
            Just(Duration::from_millis(1)),
            (1u64..500).prop_map(Duration::from_millis),
        ]
        .prop_map(|d| (d, false)),
    ]
}

/// Timeouts that never stop a session from working (grace periods).
fn grace() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::from_nanos(1)),
        (1u64..2_000).prop_map(Duration::from_millis),
        workable(),
    ]
}

fn ping() -> impl Strategy<Value = Option<Duration>> {
    prop_oneof![
        Just(None),
        Just(Some(Duration::from_nanos(1))),
        Just(Some(Duration::ZERO)),
        Just(Some(Duration::from_millis(50))),
        workable().prop_map(Some),
    ]
}

fn tcp() -> impl Strategy<Value = TcpOptions> {
    prop_oneof![
        Just(None),
        Just(Some(Duration::from_secs(1))),
        Just(Some(Duration::from_secs(30))),
        Just(Some(Duration::from_secs(32_767))),
    ]
    .prop_map(|keep_alive| TcpOptions {
        keep_alive,
        ..TcpOptions::default()
    })
}

fn count(small: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(small),
        Just(small + 1),
        (small..10_000),
        Just(MAX_COUNT),
    ]
}

fn frame_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(HANDSHAKE_MAX_FRAME_SIZE),
        Just(DEFAULT_MAX_FRAME_SIZE),
        Just(u32::MAX as usize),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    server: ServerConfig,
    server_tcp: TcpOptions,
    client: ClientConfig,
    client_tcp: TcpOptions,
    /// Every timeout on the session's path is workable: messages must pass.
    workable: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let server = (
        (
            timeout_value(),
            timeout_value(),
            timeout_value(),
            grace(),
            grace(),
            timeout_value(),
        ),
        (
            count(1),
            count(1),
            count(1),
            frame_size(),
            ping(),
            tcp(),
            count(1),
        ),
        (
            prop_oneof![
                Just(None),
                (1u32..4, prop_oneof![Just(0.0), Just(5.0), Just(f64::MAX)])
                    .prop_map(|(burst, per_second)| Some(RateLimit { burst, per_second })),
            ],
            prop_oneof![
                Just(None),
                Just(Some(InboundLimit {
                    frames_per_second: 1_000.0,
                    bytes_per_second: 1e9,
                })),
                Just(Some(InboundLimit {
                    frames_per_second: f64::MAX,
                    bytes_per_second: f64::MAX,
                })),
            ],
            prop_oneof![Just(64 * 1024), Just(256 << 20), Just(MAX_COUNT)],
        ),
    );
    let client = (
        (
            timeout_value(),
            timeout_value(),
            timeout_value(),
            timeout_value(),
        ),
        (grace(), grace(), grace(), any::<bool>()),
        (count(1), frame_size(), ping(), tcp()),
    );
    (server, client).prop_map(|(server, client)| {
        let ((read, write, handshake, disconnect, stop, first_byte), counts, limits) = server;
        let (
            max_connections,
            max_pending_handshakes,
            send_queue_capacity,
            max_size,
            ping,
            tcp,
            per_prefix,
        ) = counts;
        let (rate_limit, inbound_limit, read_budget) = limits;
        let server_config = ServerConfig {
            read_timeout: read.0,
            write_timeout: write.0,
            handshake_timeout: handshake.0,
            disconnect_timeout: disconnect,
            stop_timeout: stop,
            max_connections,
            max_pending_handshakes,
            max_pending_handshakes_per_prefix: per_prefix,
            first_byte_timeout: first_byte.0,
            send_queue_capacity,
            max_message_size: max_size,
            ping_interval: ping,
            rate_limit,
            inbound_limit,
            read_budget,
            ..ServerConfig::default().with_listen_addr("127.0.0.1:0")
        };
        let ((c_connect, c_read, c_write, c_handshake), grace_values, rest) = client;
        let (c_disconnect, reconnect_delay, max_reconnect_delay, auto_reconnect) = grace_values;
        let (c_queue, c_size, c_ping, c_tcp) = rest;
        let client_config = ClientConfig {
            connect_timeout: c_connect.0,
            read_timeout: c_read.0,
            write_timeout: c_write.0,
            handshake_timeout: c_handshake.0,
            disconnect_timeout: c_disconnect,
            reconnect_delay,
            max_reconnect_delay,
            auto_reconnect,
            send_queue_capacity: c_queue,
            max_message_size: c_size,
            ping_interval: c_ping,
            ..ClientConfig::default().with_client_id("seq-a")
        };
        let workable = [
            read,
            write,
            handshake,
            first_byte,
            c_connect,
            c_read,
            c_write,
            c_handshake,
        ]
        .iter()
        .all(|(_, ok)| *ok);
        Case {
            server: server_config,
            server_tcp: tcp,
            client: client_config,
            client_tcp: c_tcp,
            workable,
        }
    })
}

struct Keys {
    server: Arc<SecretKey>,
    client: Arc<SecretKey>,
}

fn vote(height: u64) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: height.to_be_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

/// One session under `case`: connect, one message each way, stop.
async fn session(case: &Case, keys: &Keys) {
    let trust = Arc::new(TrustStore::new());
    trust
        .add("seq-a", keys.client.public_key().clone())
        .unwrap();
    let server = TcpServer::tcp_with(
        case.server_tcp.clone(),
        case.server.clone(),
        Some(ServerAuth::new(keys.server.clone(), trust)),
    );
    let (handler, mut at_server) = channel_handler(8);
    server.set_handler(handler);
    let addr = server.start().await.unwrap().to_string();
    let client = TcpClient::tcp_with(
        case.client_tcp.clone(),
        case.client.clone(),
        Some(
            ClientAuth::new(keys.client.clone()).with_server_key(keys.server.public_key().clone()),
        ),
    );
    let (handler, mut at_client) = channel_handler(8);
    client.set_handler(handler);

    let connected = client.connect(&addr).await;
    if case.workable {
        connected.expect("workable settings connect");
        timeout(STEP, client.send(vote(1))).await.unwrap().unwrap();
        let got = timeout(STEP, at_server.recv()).await.unwrap().unwrap();
        assert_eq!(got.message.payload, vote(1).payload);
        assert_eq!(&*got.from, "seq-a");
        timeout(STEP, server.send("seq-a", vote(2)))
            .await
            .unwrap()
            .unwrap();
        let got = timeout(STEP, at_client.recv()).await.unwrap().unwrap();
        assert_eq!(got.message.payload, vote(2).payload);
    } else if connected.is_ok() {
        // Tiny timeouts may end the session at any point: only bounded.
        let _ = timeout(STEP, client.send(vote(1))).await;
        let _ = timeout(STEP, server.send("seq-a", vote(2))).await;
    }
    // The server goes first, so a reconnecting client computes its back-off.
    server.stop().await.unwrap();
    let _ = client.disconnect().await;
}

#[test]
fn validated_settings_never_panic_and_run_a_session() {
    count_panics();
    let keys = Keys {
        server: Arc::new(SecretKey::generate()),
        client: Arc::new(SecretKey::generate()),
    };
    let config = Config {
        cases: 32,
        max_shrink_iters: 16,
        rng_seed: RngSeed::Fixed(0x5e77_1265),
        failure_persistence: None,
        ..Config::default()
    };
    proptest!(config, |(case in case())| {
        let valid = case.server.validate().is_ok()
            && case.client.validate().is_ok()
            && case.server_tcp.validate().is_ok()
            && case.client_tcp.validate().is_ok();
        prop_assume!(valid);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(THREADS)
            .enable_all()
            .build()
            .unwrap();
        let before = PANICS.load(Ordering::SeqCst);
        let finished = runtime.block_on(async { timeout(CASE, session(&case, &keys)).await });
        runtime.shutdown_timeout(Duration::from_secs(1));
        prop_assert!(finished.is_ok(), "the session did not finish within {CASE:?}");
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "a task panicked");
    });
}

#[test]
fn extremes_beyond_the_limits_are_refused_by_validate() {
    let server = ServerConfig::default();
    for bad in [
        ServerConfig {
            max_pending_handshakes: MAX_COUNT + 1,
            ..server.clone()
        },
        ServerConfig {
            send_queue_capacity: usize::MAX,
            ..server.clone()
        },
        ServerConfig {
            read_budget: usize::MAX,
            ..server.clone()
        },
        ServerConfig {
            inbound_limit: Some(InboundLimit {
                frames_per_second: f64::INFINITY,
                bytes_per_second: 1.0,
            }),
            ..server.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let client = ClientConfig {
        send_queue_capacity: MAX_COUNT + 1,
        ..ClientConfig::default()
    };
    assert!(client.validate().is_err());
    // The kernel refuses keep-alive times of 0 s or over 32767 s.
    for keep_alive in [Duration::from_millis(500), Duration::MAX] {
        let tcp = TcpOptions {
            keep_alive: Some(keep_alive),
            ..TcpOptions::default()
        };
        assert!(tcp.validate().is_err(), "{keep_alive:?}");
    }
}

#[tokio::test]
async fn out_of_range_socket_options_are_refused_by_start_and_connect() {
    let bad = TcpOptions {
        keep_alive: Some(Duration::from_secs(32_768)),
        ..TcpOptions::default()
    };
    let refused = |err: TransportError| match err {
        TransportError::Config(text) => {
            assert_eq!(text, "tcp.keep_alive: must be between 1 s and 32767 s");
        }
        other => panic!("{other:?}"),
    };
    let loopback = || ServerConfig::default().with_listen_addr("127.0.0.1:0");
    let server = TcpServer::tcp_with(bad.clone(), loopback(), None);
    refused(timeout(STEP, server.start()).await.unwrap().unwrap_err());

    let server = TcpServer::tcp(loopback(), None);
    let addr = timeout(STEP, server.start()).await.unwrap().unwrap();
    let client = TcpClient::tcp_with(bad, ClientConfig::default(), None);
    refused(
        timeout(STEP, client.connect(&addr.to_string()))
            .await
            .unwrap()
            .unwrap_err(),
    );
    server.stop().await.unwrap();
}
