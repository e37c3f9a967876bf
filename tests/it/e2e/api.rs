//! Every method of the object-safe `Server` and `Client` traits.

use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use publisher_transport::{ConnectionEvent, DisconnectReason, TransportError, channel_handler};

use super::{
    Harness, Keys, STEP_TIMEOUT, client_config, delivered, eventually, identity, next_event,
    number_of, numbered, recv, registered, server_config, vote,
};

fn is_disconnected(event: &ConnectionEvent) -> bool {
    matches!(event, ConnectionEvent::Disconnected { .. })
}

fn is_connected(event: &ConnectionEvent) -> bool {
    matches!(event, ConnectionEvent::Connected { .. })
}

/// `start` / `listen` return the bound port, `local_addr` follows the
/// running state, and double start / double stop are refused.
pub async fn start_and_listen_report_the_real_port<H: Harness>() {
    let keys = Keys::new(1);
    let server: Arc<dyn publisher_transport::Server> =
        Arc::new(H::server(server_config(), Some(keys.server_auth())));
    assert_eq!(server.local_addr(), None);
    let addr = server.start().await.unwrap();
    assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST);
    assert_ne!(addr.port(), 0, "start reports the port it bound");
    assert_eq!(server.local_addr(), Some(addr));
    assert!(matches!(
        server.start().await,
        Err(TransportError::AlreadyRunning)
    ));

    // `listen` ignores the configured address.
    let other: Arc<dyn publisher_transport::Server> = Arc::new(H::server(
        server_config().with_listen_addr("not an address"),
        None,
    ));
    let other_addr = other.listen("127.0.0.1:0").await.unwrap();
    assert_ne!(other_addr.port(), 0);
    assert_ne!(other_addr, addr);
    assert_eq!(other.local_addr(), Some(other_addr));

    // Both ports really serve.
    let client: Arc<dyn publisher_transport::Client> =
        Arc::new(H::client(client_config("a"), Some(keys.client_auth(0))));
    client.connect(&H::dial_addr(addr)).await.unwrap();
    let plain: Arc<dyn publisher_transport::Client> = Arc::new(H::client(client_config("b"), None));
    plain.connect(&H::dial_addr(other_addr)).await.unwrap();

    server.stop().await.unwrap();
    other.stop().await.unwrap();
    assert_eq!(server.local_addr(), None);
    assert!(matches!(
        server.stop().await,
        Err(TransportError::NotRunning)
    ));
}

/// `stop` tells each peer `Disconnect{REQUESTED}` and returns once they left.
pub async fn stop_sends_disconnect_requested<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    let mut events = client.events();
    client.connect(&H::dial_addr(addr)).await.unwrap();
    let connected = next_event(&mut events, "connected", is_connected).await;
    assert!(matches!(
        connected,
        ConnectionEvent::Connected {
            reconnect: false,
            session_id: Some(_),
            ..
        }
    ));
    registered(&server, &identity(0)).await;

    let started = Instant::now();
    let dyn_server: Arc<dyn publisher_transport::Server> = Arc::new(server.clone());
    dyn_server.stop().await.unwrap();
    // A peer that takes its Disconnect lets stop finish before its deadline.
    assert!(started.elapsed() < server.config().stop_timeout);
    let event = next_event(&mut events, "disconnected", is_disconnected).await;
    assert!(
        matches!(
            event,
            ConnectionEvent::Disconnected {
                reason: DisconnectReason::Requested,
                by_peer: true,
                ..
            }
        ),
        "{event:?}"
    );
    assert!(!client.is_connected());
    assert!(server.connections().is_empty());
}

/// `broadcast` reaches everyone with `sender_id = "publisher"`; `send`
/// reaches only the named identity; an unknown identity is `PeerNotFound`.
pub async fn broadcast_and_send_by_identity<H: Harness>() {
    let keys = Keys::new(3);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let dyn_server: Arc<dyn publisher_transport::Server> = Arc::new(server.clone());
    let mut inboxes = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = H::client(client_config(&format!("c{i}")), Some(keys.client_auth(i)));
        let (handler, rx) = channel_handler(64);
        client.set_handler(handler);
        client.connect(&H::dial_addr(addr)).await.unwrap();
        registered(&server, &identity(i)).await;
        inboxes.push(rx);
        clients.push(client);
    }

    let report = dyn_server.broadcast(numbered(1), None).unwrap();
    assert_eq!(delivered(&report), [identity(0), identity(1), identity(2)]);
    assert!(report.dropped.is_empty());
    let server_identity = format!("publisher:{}", keys.server.public_key());
    for rx in &mut inboxes {
        let got = recv(rx, "broadcast 1").await;
        assert_eq!(number_of(&got.message), 1);
        assert_eq!(got.message.sender_id, "publisher");
        assert_eq!(&*got.from, server_identity, "the proven server key");
    }

    dyn_server.send(&identity(1), numbered(2)).await.unwrap();
    dyn_server.broadcast(numbered(3), None).unwrap();
    // Per-connection order is kept, so a peer that got 3 next never got 2.
    for (i, rx) in inboxes.iter_mut().enumerate() {
        if i == 1 {
            assert_eq!(number_of(&recv(rx, "unicast 2").await.message), 2);
        }
        assert_eq!(number_of(&recv(rx, "broadcast 3").await.message), 3);
    }

    match dyn_server.send("nobody", numbered(4)).await {
        Err(TransportError::PeerNotFound { peer }) => assert_eq!(peer, "nobody"),
        other => panic!("expected PeerNotFound, got {other:?}"),
    }
    server.stop().await.unwrap();
}

/// `set_handler` swaps the handler for the messages that follow, on the
/// server and on the client.
pub async fn set_handler_replaces_the_handler<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let dyn_server: Arc<dyn publisher_transport::Server> = Arc::new(server.clone());
    let (first, mut first_rx) = channel_handler(8);
    dyn_server.set_handler(first);
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    let dyn_client: Arc<dyn publisher_transport::Client> = Arc::new(client.clone());
    let (client_first, mut client_first_rx) = channel_handler(8);
    dyn_client.set_handler(client_first);
    dyn_client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    dyn_client.send(numbered(1)).await.unwrap();
    assert_eq!(number_of(&recv(&mut first_rx, "1").await.message), 1);
    dyn_server.broadcast(numbered(1), None).unwrap();
    assert_eq!(number_of(&recv(&mut client_first_rx, "1").await.message), 1);

    let (second, mut second_rx) = channel_handler(8);
    dyn_server.set_handler(second);
    let (client_second, mut client_second_rx) = channel_handler(8);
    dyn_client.set_handler(client_second);
    dyn_client.send(numbered(2)).await.unwrap();
    assert_eq!(number_of(&recv(&mut second_rx, "2").await.message), 2);
    dyn_server.broadcast(numbered(2), None).unwrap();
    assert_eq!(
        number_of(&recv(&mut client_second_rx, "2").await.message),
        2
    );
    assert!(first_rx.try_recv().is_err(), "old server handler bypassed");
    assert!(
        client_first_rx.try_recv().is_err(),
        "old client handler bypassed"
    );
    server.stop().await.unwrap();
}

/// `connections()` reports the verified identity, the peer's address and
/// real byte and message counters; the client's `stats()` mirrors them.
pub async fn connections_report_identity_address_and_counters<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("client-a"), Some(keys.client_auth(0)));
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    for n in 0..3 {
        client.send(vote(n % 2 == 0)).await.unwrap();
        recv(&mut inbound, "vote").await;
    }
    for n in 0..2 {
        server.broadcast(numbered(n), None).unwrap();
        recv(&mut client_inbound, "broadcast").await;
    }

    // Counters of written frames move once the write returns, just after the
    // peer may have read them: no event marks it.
    eventually("server counters", || {
        let info = &server.connections()[0];
        info.messages_out == 2 && info.bytes_out > 0
    })
    .await;
    let connections = server.connections();
    assert_eq!(connections.len(), 1);
    let info = &connections[0];
    assert_eq!(info.identity, identity(0));
    assert_eq!(info.client_id.as_deref(), Some("client-a"));
    assert!(
        info.session_id
            .as_deref()
            .is_some_and(|s| s.starts_with("seq-0-")),
        "{:?}",
        info.session_id
    );
    assert!(info.signed_frames);
    let remote = info.remote_addr.expect("the peer's address");
    assert_eq!(remote.ip(), Ipv4Addr::LOCALHOST);
    assert_ne!(remote.port(), addr.port());
    assert_eq!(info.messages_in, 3);
    // Length prefix, a signed frame and a 65-byte signature per message at least.
    assert!(info.bytes_in >= 3 * (4 + 65), "bytes_in {}", info.bytes_in);
    assert!(
        info.bytes_out >= 2 * (4 + 65),
        "bytes_out {}",
        info.bytes_out
    );

    eventually("client counters", || {
        client
            .stats()
            .connection
            .is_some_and(|c| c.messages_out == 3)
    })
    .await;
    let stats = client.stats();
    assert_eq!(stats.id, "client-a");
    assert!(stats.connected);
    assert_eq!(stats.server_addr.as_deref(), Some(&*H::dial_addr(addr)));
    assert_eq!((stats.connect_attempts, stats.connect_failures), (1, 0));
    assert_eq!(stats.reconnects, 0);
    let mine = stats.connection.unwrap();
    assert_eq!(mine.messages_in, 2);
    assert!(mine.bytes_in > 0 && mine.bytes_out > 0);
    assert_eq!(mine.session_id, info.session_id);
    server.stop().await.unwrap();
}

/// Connect, send, `is_connected`, `id`, and a prompt `disconnect` the server
/// observes as `Disconnect{REQUESTED}` from the peer.
pub async fn client_lifecycle_connect_send_disconnect<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client: Arc<dyn publisher_transport::Client> = Arc::new(H::client(
        client_config("client-a"),
        Some(keys.client_auth(0)),
    ));
    let mut events = client.events();

    assert_eq!(client.id(), "client-a");
    assert!(!client.is_connected());
    assert!(matches!(
        client.send(vote(true)).await,
        Err(TransportError::NotConnected)
    ));
    assert!(matches!(
        client.disconnect().await,
        Err(TransportError::NotConnected)
    ));

    client.connect(&H::dial_addr(addr)).await.unwrap();
    assert!(client.is_connected());
    assert!(matches!(
        client.connect(&H::dial_addr(addr)).await,
        Err(TransportError::AlreadyRunning)
    ));
    client.send(vote(true)).await.unwrap();
    let got = recv(&mut inbound, "vote").await;
    assert_eq!(&*got.from, identity(0));
    assert_eq!(
        got.message.sender_id, "client-a",
        "sender_id is the client id"
    );
    let connection = server.manager().get(&identity(0)).expect("registered");

    // Go's Disconnect hangs on its own lock (WIRE.md weakness 13).
    tokio::time::timeout(Duration::from_secs(5), client.disconnect())
        .await
        .expect("disconnect returns promptly")
        .unwrap();
    assert!(!client.is_connected());
    tokio::time::timeout(STEP_TIMEOUT, connection.closed())
        .await
        .expect("server sees the peer gone");
    let end = connection.end().expect("an ended session says how");
    assert_eq!(end.reason, DisconnectReason::Requested);
    assert!(end.by_peer);
    eventually("connection unregistered", || {
        server.connections().is_empty()
    })
    .await;

    let event = next_event(&mut events, "disconnected", is_disconnected).await;
    assert!(
        matches!(
            event,
            ConnectionEvent::Disconnected {
                reason: DisconnectReason::Requested,
                by_peer: false,
                ..
            }
        ),
        "{event:?}"
    );
    assert!(matches!(
        client.send(vote(true)).await,
        Err(TransportError::NotConnected)
    ));
    assert!(matches!(
        client.disconnect().await,
        Err(TransportError::NotConnected)
    ));
    server.stop().await.unwrap();
}

/// `reconnect` ends the session and opens a new one to the last address,
/// also after a `disconnect`.
pub async fn client_reconnect_starts_a_new_session<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    let dyn_client: Arc<dyn publisher_transport::Client> = Arc::new(client.clone());
    let mut events = client.events();
    dyn_client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;
    let first = server.manager().get(&identity(0)).unwrap();

    dyn_client.reconnect().await.unwrap();
    assert!(dyn_client.is_connected());
    tokio::time::timeout(STEP_TIMEOUT, first.closed())
        .await
        .expect("the old session ends");
    eventually("new session registered", || {
        server
            .manager()
            .get(&identity(0))
            .is_some_and(|c| c.id() != first.id())
    })
    .await;
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(next_event(&mut events, "any", |_| true).await);
    }
    assert!(
        matches!(
            kinds[..],
            [
                ConnectionEvent::Connected {
                    reconnect: false,
                    ..
                },
                ConnectionEvent::Disconnected {
                    reason: DisconnectReason::Requested,
                    by_peer: false,
                    ..
                },
                ConnectionEvent::Connected {
                    reconnect: false,
                    ..
                },
            ]
        ),
        "{kinds:?}"
    );
    dyn_client.send(numbered(1)).await.unwrap();
    assert_eq!(number_of(&recv(&mut inbound, "1").await.message), 1);

    // After an explicit disconnect, reconnect still knows the address.
    dyn_client.disconnect().await.unwrap();
    dyn_client.reconnect().await.unwrap();
    dyn_client.send(numbered(2)).await.unwrap();
    assert_eq!(number_of(&recv(&mut inbound, "2").await.message), 2);
    server.stop().await.unwrap();
}

/// `connect_with_retry` keeps trying until a server appears, and gives up
/// with `RetriesExhausted` after `max_retries + 1` attempts.
pub async fn connect_with_retry_waits_for_a_late_server<H: Harness>() {
    let keys = Keys::new(1);
    // A port known to be free: bound, then released.
    let probe = H::server(server_config(), None);
    let addr = probe.start().await.unwrap();
    probe.stop().await.unwrap();

    let hopeless: Arc<dyn publisher_transport::Client> =
        Arc::new(H::client(client_config("h"), Some(keys.client_auth(0))));
    match hopeless.connect_with_retry(&H::dial_addr(addr), 2).await {
        Err(TransportError::RetriesExhausted { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert_eq!(hopeless.stats().connect_attempts, 3);

    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    let dyn_client: Arc<dyn publisher_transport::Client> = Arc::new(client.clone());
    let dial = H::dial_addr(addr);
    let connecting = tokio::spawn(async move { dyn_client.connect_with_retry(&dial, 10).await });
    // Start the server only after an attempt has failed.
    eventually("a failed attempt", || client.stats().connect_failures >= 1).await;
    let server = H::server(server_config(), Some(keys.server_auth()));
    server.listen(&addr.to_string()).await.unwrap();
    connecting.await.unwrap().unwrap();
    assert!(client.is_connected());
    let stats = client.stats();
    assert!(stats.connect_attempts >= 2, "{stats:?}");
    assert_eq!(stats.connect_failures, stats.connect_attempts - 1);
    server.stop().await.unwrap();
}

/// The read-timeout, write-timeout and reconnect-delay setters take effect
/// on the sessions that follow.
pub async fn client_setters_apply_to_future_sessions<H: Harness>() {
    let keys = Keys::new(1);
    let mut config = server_config();
    config.ping_interval = None; // the server never speaks unprompted
    let server = H::server(config, Some(keys.server_auth()));
    let addr = server.start().await.unwrap();

    let mut client_config = client_config("a");
    client_config.auto_reconnect = true;
    client_config.ping_interval = None;
    // Far beyond the test's bound: only the setter can make the reconnect happen.
    client_config.reconnect_delay = Duration::from_secs(120);
    let client = H::client(client_config, Some(keys.client_auth(0)));
    let dyn_client: Arc<dyn publisher_transport::Client> = Arc::new(client.clone());
    dyn_client.set_read_timeout(Duration::from_millis(300));
    dyn_client.set_write_timeout(Duration::from_secs(2));
    dyn_client.set_reconnect_delay(Duration::from_millis(50));
    assert_eq!(client.config().write_timeout, Duration::from_secs(2));
    let mut events = dyn_client.events();
    dyn_client.connect(&H::dial_addr(addr)).await.unwrap();

    let event = next_event(&mut events, "read timeout", is_disconnected).await;
    assert!(
        matches!(
            event,
            ConnectionEvent::Disconnected {
                reason: DisconnectReason::ReadTimeout,
                by_peer: false,
                ..
            }
        ),
        "{event:?}"
    );
    let event = next_event(&mut events, "automatic reconnect", is_connected).await;
    assert!(
        matches!(
            event,
            ConnectionEvent::Connected {
                reconnect: true,
                ..
            }
        ),
        "{event:?}"
    );
    assert!(dyn_client.stats().reconnects >= 1);
    dyn_client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}
