//! End-to-end tests over real sockets, written once against a [`Harness`] and
//! instantiated per back-end by [`e2e_suite!`]; tests that only make sense on
//! a byte stream (raw garbage, a hand-written Go peer) live in `tcp_only`.
//!
//! Rules every test keeps: listen on `127.0.0.1:0`, await events (handler
//! channels, client events, `Connection::closed`) instead of sleeping, poll
//! with [`eventually`] only where the library offers no event, and stay
//! within [`TEST_TIMEOUT`].

mod api;
mod auth;
mod delivery;
mod flow;
mod hostile;
mod requests;
mod stream;
mod tcp_only;

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use publisher_transport::{
    BroadcastReport, ClientAuth, ClientConfig, ConnectionEvent, Inbound, Message, SecretKey,
    ServerAuth, ServerConfig, TcpBackend, TransportClient, TransportServer, TrustMode, TrustStore,
    backend::Backend,
    proto::{
        Payload,
        rollup::v1::{L2Block, Vote},
    },
};
use tokio::sync::{broadcast, mpsc};

/// Bound of every test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one awaited step, so a hang names the step rather than the test.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// One back-end as the suite sees it.
pub trait Harness: Send + Sync + 'static {
    /// The back-end under test.
    type Backend: Backend;

    /// The back-end a server with `config` uses.
    fn server_backend(config: &ServerConfig) -> Self::Backend;

    /// The back-end a client with `config` uses.
    fn client_backend(config: &ClientConfig) -> Self::Backend;

    /// Whether a connection refused before it is established (throttled, too
    /// many pending handshakes) is told why; QUIC refuses it before its
    /// handshake instead, without a message.
    const EXPLAINS_EARLY_REFUSALS: bool = true;

    /// What a client dials to reach a server bound to `bound`.
    fn dial_addr(bound: SocketAddr) -> String {
        bound.to_string()
    }

    /// A server over this back-end.
    fn server(config: ServerConfig, auth: Option<ServerAuth>) -> Server<Self> {
        TransportServer::new(Self::server_backend(&config), config, auth)
    }

    /// A client over this back-end.
    fn client(config: ClientConfig, auth: Option<ClientAuth>) -> Client<Self> {
        TransportClient::new(Self::client_backend(&config), config, auth)
    }
}

/// The server type of harness `H`.
pub type Server<H> = TransportServer<<H as Harness>::Backend>;
/// The client type of harness `H`.
pub type Client<H> = TransportClient<<H as Harness>::Backend>;

/// Plain TCP.
pub struct TcpHarness;

impl Harness for TcpHarness {
    type Backend = TcpBackend;

    fn server_backend(_: &ServerConfig) -> TcpBackend {
        TcpBackend::default()
    }

    fn client_backend(_: &ClientConfig) -> TcpBackend {
        TcpBackend::default()
    }
}

/// Instantiates every generic test for one back-end: `e2e_suite!(tcp,
/// TcpHarness)` yields `e2e::tcp::<test>` for each test listed here. A new
/// back-end needs only a `Harness` impl and one more `e2e_suite!` line.
macro_rules! e2e_suite {
    ($backend:ident, $harness:ty) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;

            e2e_suite!(@tests $harness;
                api::start_and_listen_report_the_real_port,
                api::stop_sends_disconnect_requested,
                api::broadcast_and_send_by_identity,
                api::set_handler_replaces_the_handler,
                api::connections_report_identity_address_and_counters,
                api::client_lifecycle_connect_send_disconnect,
                api::client_reconnect_starts_a_new_session,
                api::connect_with_retry_waits_for_a_late_server,
                api::client_setters_apply_to_future_sessions,
                auth::go_mode_client_against_extended_server,
                auth::go_mode_server_against_default_client,
                auth::go_mode_is_refused_for_a_default_key,
                auth::client_requiring_server_key_refuses_go_mode_server,
                auth::server_refuses_request_for_another_server,
                auth::untrusted_client_key_is_refused_with_go_string,
                auth::auth_disabled_server_uses_connection_ids,
                delivery::confirmed_sends_follow_the_handler,
                delivery::confirmation_waits_for_the_handler_and_fails_when_the_session_ends,
                delivery::sessions_without_acks_refuse_confirmation,
                delivery::try_send_hands_back_what_a_full_queue_cannot_take,
                delivery::a_peer_that_stops_acknowledging_is_disconnected,
                delivery::a_batch_handler_gets_everything_in_order_and_reuses_messages,
                flow::broadcast_reaches_100_authenticated_clients,
                flow::broadcast_exclusion_skips_only_the_excluded,
                flow::two_phase_commit_in_miniature,
                flow::reconnect_after_server_restart_on_same_port,
                flow::second_connection_of_an_identity_replaces_the_first,
                flow::per_ip_throttle_charges_only_failures,
                flow::max_connections_refuses_another_identity,
                flow::client_answering_pings_is_not_evicted,
                hostile::slow_consumer_is_dropped_others_keep_receiving,
                hostile::silent_peer_dropped_after_handshake_timeout,
                hostile::idle_peer_evicted_with_read_timeout,
                requests::a_thousand_requests_in_flight_are_all_answered,
                requests::the_server_requests_from_a_client,
                requests::an_unanswered_request_times_out_and_a_late_reply_is_ignored,
                requests::a_lost_connection_fails_waiting_requests,
                requests::go_mode_sessions_refuse_requests_without_sending,
                stream::a_message_stream_pushes_back_and_loses_nothing,
                stream::a_message_stream_takes_only_the_kinds_asked_for,
            );
        }
    };
    (@tests $harness:ty; $($module:ident :: $test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::e2e::bounded($crate::e2e::$module::$test::<$harness>()).await;
            }
        )*
    };
}

e2e_suite!(tcp, TcpHarness);
#[cfg(feature = "grpc")]
e2e_suite!(grpc, GrpcHarness);
#[cfg(feature = "quic")]
e2e_suite!(quic, QuicHarness);
#[cfg(feature = "ws")]
e2e_suite!(ws, WsHarness);

/// gRPC over h2c. Stream opening is not retried here (the client's own
/// retry logic is what the suite checks); `tests/it/grpc.rs` covers it.
#[cfg(feature = "grpc")]
pub struct GrpcHarness;

#[cfg(feature = "grpc")]
impl Harness for GrpcHarness {
    type Backend = publisher_transport::backend::grpc::GrpcBackend;

    fn server_backend(config: &ServerConfig) -> Self::Backend {
        let mut backend = Self::Backend::new(Default::default());
        backend.options_mut().max_frame_size = config.max_message_size;
        backend
    }

    fn client_backend(config: &ClientConfig) -> Self::Backend {
        let mut backend = Self::Backend::new(Default::default());
        let options = backend.options_mut();
        options.max_frame_size = config.max_message_size;
        options.client_id = Some(config.client_id.clone());
        options.retry.max_retries = Some(0);
        options.connect_timeout = config.connect_timeout;
        backend
    }
}

/// QUIC with a self-signed certificate the clients pin.
#[cfg(feature = "quic")]
pub struct QuicHarness;

#[cfg(feature = "quic")]
static QUIC_IDENTITY: std::sync::LazyLock<publisher_transport::tls::Identity> =
    std::sync::LazyLock::new(|| {
        publisher_transport::tls::Identity::self_signed(&["127.0.0.1", "localhost"]).unwrap()
    });

#[cfg(feature = "quic")]
impl Harness for QuicHarness {
    type Backend = publisher_transport::QuicBackend;

    const EXPLAINS_EARLY_REFUSALS: bool = false;

    fn server_backend(_: &ServerConfig) -> Self::Backend {
        Self::Backend::pinned_pair(&QUIC_IDENTITY, Default::default())
            .unwrap()
            .0
    }

    fn client_backend(_: &ClientConfig) -> Self::Backend {
        Self::Backend::pinned_pair(&QUIC_IDENTITY, Default::default())
            .unwrap()
            .1
    }
}

/// Plain WebSocket (`ws://`) on the default path.
#[cfg(feature = "ws")]
pub struct WsHarness;

#[cfg(feature = "ws")]
impl Harness for WsHarness {
    type Backend = publisher_transport::WsBackend;

    /// The upgrade comes after admission, so a refused connection is closed
    /// before it could be told why.
    const EXPLAINS_EARLY_REFUSALS: bool = false;

    fn server_backend(_: &ServerConfig) -> Self::Backend {
        Self::Backend::new(Default::default()).unwrap()
    }

    fn client_backend(_: &ClientConfig) -> Self::Backend {
        Self::Backend::new(Default::default()).unwrap()
    }
}

/// Runs a test within [`TEST_TIMEOUT`], with logs when `RUST_LOG` is set.
pub async fn bounded(test: impl Future<Output = ()>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test exceeded its time bound");
}

/// A server on `127.0.0.1:0` without the rate limit (every test client
/// comes from 127.0.0.1).
pub fn server_config() -> ServerConfig {
    let mut config = ServerConfig::default()
        .with_listen_addr("127.0.0.1:0")
        .with_rate_limit(None);
    // A hundred clients of one debug-build process, on a loaded machine,
    // take up to about a second between their QUIC handshake and their
    // first bytes; the first-byte deadline has tests of its own.
    config.first_byte_timeout = config.handshake_timeout;
    config
}

/// A client with quick reconnects. Automatic reconnect is off unless a test
/// asks for it, so that no client outlives its server and knocks on a port a
/// parallel test may have been given since.
pub fn client_config(id: &str) -> ClientConfig {
    let mut config = ClientConfig::default()
        .with_client_id(id)
        .with_reconnect_delay(Duration::from_millis(50));
    config.connect_timeout = Duration::from_secs(5);
    config.auto_reconnect = false;
    config
}

/// A server key, and `n` client keys trusted as `seq-0`, `seq-1`, ….
pub struct Keys {
    /// The publisher's key.
    pub server: Arc<SecretKey>,
    /// The trust store holding every client key.
    pub trust: Arc<TrustStore>,
    /// Client keys; key `i` is trusted as [`identity(i)`](identity).
    pub clients: Vec<Arc<SecretKey>>,
}

impl Keys {
    /// Fresh keys, trusted the default way (extended handshake only).
    pub fn new(n: usize) -> Self {
        Self::with_mode(n, TrustMode::ExtendedOnly)
    }

    /// Fresh keys whose Go-mode handshakes are accepted too.
    pub fn go_compatible(n: usize) -> Self {
        Self::with_mode(n, TrustMode::GoCompatible)
    }

    fn with_mode(n: usize, mode: TrustMode) -> Self {
        let trust = Arc::new(TrustStore::new());
        let clients = (0..n)
            .map(|i| {
                let key = Arc::new(SecretKey::generate());
                trust
                    .add_with_mode(identity(i), key.public_key().clone(), mode)
                    .unwrap();
                key
            })
            .collect();
        Self {
            server: Arc::new(SecretKey::generate()),
            trust,
            clients,
        }
    }

    /// Server authentication with the server key, signed frames offered.
    pub fn server_auth(&self) -> ServerAuth {
        ServerAuth::new(self.server.clone(), self.trust.clone())
    }

    /// Client `i`, extended handshake, requiring the server key (mutual auth).
    pub fn client_auth(&self, i: usize) -> ClientAuth {
        ClientAuth::new(self.clients[i].clone()).with_server_key(self.server.public_key().clone())
    }
}

/// The identity client key `i` is trusted as.
pub fn identity(i: usize) -> String {
    format!("seq-{i}")
}

/// A message told apart by `n` (carried as an `L2Block` slot).
pub fn numbered(n: u64) -> Message {
    block(n, Bytes::new())
}

/// A numbered message carrying `data`.
pub fn block(n: u64, data: Bytes) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::L2Block(L2Block {
            slot: n,
            block: data,
            ..Default::default()
        })),
    }
}

/// The number of a [`numbered`] message.
pub fn number_of(message: &Message) -> u64 {
    match &message.payload {
        Some(Payload::L2Block(block)) => block.slot,
        other => panic!("expected a numbered message, got {other:?}"),
    }
}

/// A vote, for messages a client sends.
pub fn vote(commit: bool) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from_static(&[0, 0, 0, 1]),
            vote: commit,
            ..Default::default()
        })),
    }
}

/// The next message a handler channel receives.
pub async fn recv(rx: &mut mpsc::Receiver<Inbound>, what: &str) -> Inbound {
    tokio::time::timeout(STEP_TIMEOUT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("handler channel closed while waiting for {what}"))
}

/// The next client event matching `wanted`, skipping the others.
pub async fn next_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    what: &str,
    wanted: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if wanted(&event) => return event,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for event: {what}"))
}

/// Polls `condition` until it holds. Only for state the library reports by
/// no event (registration, counters updated after a write returns).
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the server has registered `identity`. A client's `connect`
/// returns when the handshake response arrives, slightly before the server
/// registers the session; a broadcast in between would miss the client.
pub async fn registered<B: Backend>(server: &TransportServer<B>, identity: &str) {
    eventually(&format!("{identity} registered"), || {
        server.manager().get(identity).is_some()
    })
    .await;
}

/// Sorted identities of a broadcast's recipients.
pub fn delivered(report: &BroadcastReport) -> Vec<String> {
    let mut delivered: Vec<String> = report.delivered.iter().map(|id| id.to_string()).collect();
    delivered.sort();
    delivered
}

/// Broadcasts ever larger numbers of `size`-byte messages, one at a time,
/// until the peer `slow` (which never reads) is dropped. Each message is
/// awaited at every fast client before the next goes out, so only the slow
/// peer's queue can fill. Returns the number of broadcasts made.
pub async fn broadcast_until_dropped<B: Backend>(
    server: &TransportServer<B>,
    slow: &str,
    fast: &mut [(String, mpsc::Receiver<Inbound>)],
    size: usize,
) -> u64 {
    let data = Bytes::from(vec![0xA5; size]);
    for n in 1..=2_000u64 {
        let report = server.broadcast(block(n, data.clone()), None).unwrap();
        for (identity, rx) in fast.iter_mut() {
            assert!(
                delivered(&report).contains(identity),
                "fast peer {identity} not delivered broadcast {n}: {:?}",
                report.dropped
            );
            let got = recv(rx, &format!("broadcast {n} at {identity}")).await;
            assert_eq!(number_of(&got.message), n, "{identity} lost or reordered");
            assert_eq!(got.message.sender_id, "publisher");
        }
        if report.dropped.iter().any(|d| d.identity == slow) {
            assert_eq!(report.dropped.len(), 1, "only the slow peer drops");
            return n;
        }
    }
    panic!("the slow peer was never dropped");
}
