//! Admission under floods, over every back-end: silent connections from many
//! loopback addresses (Linux routes all of 127/8 to `lo`) take what the
//! per-prefix caps let them, and a trusted client still completes its
//! handshake within a second; the connection rate limit charges failures,
//! not trusted peers; a trust change racing a handshake never leaves the
//! revoked key connected.

use std::{
    any::Any,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all};
use prost::Message as _;
use publisher_transport::{
    ClientAuth, DisconnectReason, FrameCodec, Message, RateLimit, SecretKey, ServerConfig,
    TcpClient, TcpServer, TransportClient, TransportError, TransportServer,
    backend::Backend,
    proto::{Payload, rollup::v1::HandshakeResponse},
};
use tokio::{io::AsyncReadExt, net::TcpSocket};
use tokio_util::codec::FramedRead;

use crate::e2e::{
    Keys, STEP_TIMEOUT, bounded, client_config, eventually, identity, registered, server_config,
};

/// Source addresses of the flood: 127.0.0.2 ….
const FLOOD_ADDRESSES: u8 = 32;
/// Silent connections per flood address.
const PER_ADDRESS: usize = 8;
/// The pool of pending handshakes, and one address's share of it.
const POOL: usize = 64;
const SHARE: usize = 4;

fn flood_address(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + n)
}

/// A server whose silent peers would stay pending for the whole test: only
/// admission can make room.
fn flood_config() -> ServerConfig {
    let mut config = server_config();
    config.max_pending_handshakes = POOL;
    config.max_pending_handshakes_per_prefix = SHARE;
    config.handshake_timeout = Duration::from_secs(25);
    config.first_byte_timeout = Duration::from_secs(25);
    config
}

fn counted<B: Backend>(server: &TransportServer<B>, label: &str) -> u64 {
    server
        .metrics()
        .connections_total
        .with_label_values(&[label])
        .get()
}

/// A TCP connection from `from` that never sends anything.
async fn silent_tcp(from: Ipv4Addr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Floods `server` with `silent` connections from [`FLOOD_ADDRESSES`]
/// addresses, checks they hold no more than the pool, then times a trusted
/// client's connect.
async fn flood_then_connect<B, F, Fut>(
    server: &TransportServer<B>,
    client: &TransportClient<B>,
    dial: &str,
    silent: F,
) -> Vec<Box<dyn Any + Send>>
where
    B: Backend,
    F: Fn(Ipv4Addr) -> Fut,
    Fut: Future<Output = Box<dyn Any + Send>>,
{
    let mut held = Vec::new();
    for n in 0..FLOOD_ADDRESSES {
        for _ in 0..PER_ADDRESS {
            held.push(silent(flood_address(n)).await);
        }
    }
    let attempts = held.len() as u64;
    eventually("every silent connection accepted", || {
        counted(server, "accepted") >= attempts
    })
    .await;
    // The pool is full and each attempt beyond it was refused or displaced
    // an earlier one.
    eventually("the flood holds the pool and no more", || {
        counted(server, "refused_too_many_peers") + counted(server, "displaced")
            == attempts - POOL as u64
    })
    .await;
    let displaced = counted(server, "displaced");

    let started = Instant::now();
    client.connect(dial).await.unwrap();
    let took = started.elapsed();
    println!(
        "{} with {attempts} silent connections from {FLOOD_ADDRESSES} addresses: handshake in {took:?}",
        server.backend_name()
    );
    assert!(took < Duration::from_secs(1), "handshake took {took:?}");
    registered(server, &identity(0)).await;
    // Room was made by displacing one of the flood's, not by a timeout.
    assert_eq!(counted(server, "displaced"), displaced + 1);
    assert_eq!(counted(server, "handshake_failed"), 0);
    held
}

/// Relays one connection to `to` from the source address `from` (the
/// client has no way to choose its own): the server sees the connection,
/// and gives it a pending slot, as soon as the client connects, but nothing
/// is forwarded until `go` fires.
async fn held_relay_from(
    from: Ipv4Addr,
    to: SocketAddr,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap();
    let (go, held) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut upstream = silent_tcp(from, to).await;
        if held.await.is_ok() {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    (relay, go)
}

/// A full pool of one silent connection per address, an honest client from
/// a high address (127.0.0.200) whose handshake is held back while new
/// flood addresses keep arriving: every newcomer displaces the oldest of
/// the tied holders, never the honest one for its address, and it still
/// completes its handshake within a second once let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_handshake_from_a_high_address_outlives_flood_churn_over_tcp() {
    bounded(async {
        const CHURN: u8 = 16;
        let keys = Keys::new(1);
        let server = TcpServer::tcp(flood_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        // One each from 127.0.0.2 … 127.0.0.65: the pool is exactly full.
        let mut held = Vec::new();
        for n in 0..POOL as u8 {
            held.push(silent_tcp(flood_address(n), addr).await);
        }
        eventually("the pool filled", || {
            counted(&server, "accepted") == POOL as u64
        })
        .await;

        let (relay, go) = held_relay_from(Ipv4Addr::new(127, 0, 0, 200), addr).await;
        let client = TcpClient::tcp(client_config("legit"), Some(keys.client_auth(0)));
        let relay = relay.to_string();
        let connecting = client.connect(&relay);
        tokio::pin!(connecting);
        let admitted = async {
            eventually("the honest connection displaced the oldest", || {
                counted(&server, "displaced") == 1
            })
            .await;
            // Churn while the honest handshake is pending: 127.0.0.66 ….
            for n in 0..CHURN {
                held.push(silent_tcp(flood_address(POOL as u8 + n), addr).await);
                let displaced = 2 + u64::from(n);
                eventually("a newcomer displaced one", || {
                    counted(&server, "displaced") == displaced
                })
                .await;
            }
        };
        tokio::select! {
            () = admitted => {}
            done = connecting.as_mut() => panic!("the handshake ended while held: {done:?}"),
        }
        let started = Instant::now();
        go.send(()).unwrap();
        connecting.await.unwrap();
        let took = started.elapsed();
        println!("handshake from 127.0.0.200 after {CHURN} newcomers: {took:?}");
        assert!(took < Duration::from_secs(1), "handshake took {took:?}");
        registered(&server, &identity(0)).await;
        assert_eq!(counted(&server, "handshake_failed"), 0);
        drop(held);
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_from_many_addresses_leaves_room_over_tcp() {
    bounded(async {
        let keys = Keys::new(1);
        let server = TcpServer::tcp(flood_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let client = TcpClient::tcp(client_config("legit"), Some(keys.client_auth(0)));
        let held = flood_then_connect(&server, &client, &addr.to_string(), |from| async move {
            Box::new(silent_tcp(from, addr).await) as Box<dyn Any + Send>
        })
        .await;
        drop(held);
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_from_many_addresses_leaves_room_over_tls() {
    use publisher_transport::{
        TcpOptions,
        backend::tcp::tls::TcpTlsBackend,
        tls::{self, ALPN, ClientTrust, Identity, ServerTrust},
    };
    bounded(async {
        let keys = Keys::new(1);
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let server_tls = tls::server_config(&identity, &ClientTrust::default(), &[ALPN]).unwrap();
        let client_tls =
            tls::client_config(&ServerTrust::pinned(identity.fingerprint()), &[ALPN]).unwrap();
        let server = TransportServer::new(
            TcpTlsBackend::new(TcpOptions::default(), Some(server_tls), None),
            flood_config(),
            Some(keys.server_auth()),
        );
        let addr = server.start().await.unwrap();
        let client = TransportClient::new(
            TcpTlsBackend::new(TcpOptions::default(), None, Some(client_tls)),
            client_config("legit"),
            Some(keys.client_auth(0)),
        );
        // Silent before the TLS ClientHello: each holds a slot, no TLS work.
        let held = flood_then_connect(&server, &client, &addr.to_string(), |from| async move {
            Box::new(silent_tcp(from, addr).await) as Box<dyn Any + Send>
        })
        .await;
        drop(held);
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// Over TLS a throttled client is refused before the TLS handshake: the
/// connection is closed before the server's first TLS message, so no TLS
/// work is spent on it (and there is nothing the refusal could be told in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_tls_client_is_refused_before_the_tls_handshake() {
    use publisher_transport::{
        RateLimit, TcpOptions,
        backend::tcp::tls::TcpTlsBackend,
        tls::{self, ALPN, ClientTrust, Identity, ServerTrust},
    };
    bounded(async {
        let keys = Keys::new(1);
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let server_tls = tls::server_config(&identity, &ClientTrust::default(), &[ALPN]).unwrap();
        let client_tls =
            tls::client_config(&ServerTrust::pinned(identity.fingerprint()), &[ALPN]).unwrap();
        let config = server_config().with_rate_limit(Some(RateLimit {
            burst: 1,
            per_second: 0.0,
        }));
        let server = TransportServer::new(
            TcpTlsBackend::new(TcpOptions::default(), Some(server_tls), None),
            config,
            Some(keys.server_auth()),
        );
        let addr = server.start().await.unwrap().to_string();
        let client = |auth| {
            TransportClient::new(
                TcpTlsBackend::new(TcpOptions::default(), None, Some(client_tls.clone())),
                client_config("c"),
                Some(auth),
            )
        };
        let stranger = client(ClientAuth::new(Arc::new(SecretKey::generate())));
        assert!(stranger.connect(&addr).await.is_err());
        eventually("the failure charged", || {
            counted(&server, "handshake_failed") == 1
        })
        .await;
        let throttled = client(keys.client_auth(0)).connect(&addr).await;
        assert!(
            matches!(throttled, Err(TransportError::Tls { .. })),
            "expected the TLS handshake to be cut off, got {throttled:?}"
        );
        assert_eq!(counted(&server, "refused_throttled"), 1);
        assert_eq!(counted(&server, "transport_failed"), 0);
        server.stop().await.unwrap();
    })
    .await;
}

/// Over QUIC a silent connection completes the QUIC handshake and then opens
/// no stream (an Initial that never completes never reaches the server's
/// accept: quinn holds it, bounded by its own handshake timeout).
#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_from_many_addresses_leaves_room_over_quic() {
    use publisher_transport::{
        QuicBackend,
        tls::{self, ALPN, Identity, ServerTrust},
    };
    bounded(async {
        let keys = Keys::new(1);
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let (server_backend, client_backend) =
            QuicBackend::pinned_pair(&identity, Default::default()).unwrap();
        let server = TransportServer::new(server_backend, flood_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let client = TransportClient::new(
            client_backend,
            client_config("legit"),
            Some(keys.client_auth(0)),
        );
        let tls =
            tls::client_config(&ServerTrust::pinned(identity.fingerprint()), &[ALPN]).unwrap();
        let quic_client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let held = flood_then_connect(&server, &client, &addr.to_string(), |from| {
            let quic_client = quic_client.clone();
            async move {
                let mut endpoint =
                    quinn::Endpoint::client(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
                endpoint.set_default_client_config(quic_client);
                // Refused or displaced ones fail; either way the endpoint is kept.
                let connection = tokio::time::timeout(
                    STEP_TIMEOUT,
                    endpoint.connect(addr, "127.0.0.1").unwrap(),
                )
                .await
                .expect("the QUIC handshake ends")
                .ok();
                Box::new((endpoint, connection)) as Box<dyn Any + Send>
            }
        })
        .await;
        drop(held);
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// With authentication on, a connection that sends nothing is closed at the
/// first-byte deadline, long before the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_at_the_first_byte_deadline() {
    bounded(async {
        let keys = Keys::new(1);
        let mut config = server_config();
        config.handshake_timeout = Duration::from_secs(60);
        config.first_byte_timeout = Duration::from_millis(200);
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let mut silent = silent_tcp(Ipv4Addr::LOCALHOST, addr).await;
        let mut rest = Vec::new();
        // Closed without a word: the server reads nothing, so it says nothing.
        let read = tokio::time::timeout(STEP_TIMEOUT, silent.read_to_end(&mut rest))
            .await
            .expect("closed well before the 60 s handshake timeout");
        assert!(read.is_err() || rest.is_empty(), "{read:?} {rest:?}");
        eventually("counted as a failed transport setup", || {
            counted(&server, "transport_failed") == 1
        })
        .await;
        server.stop().await.unwrap();
    })
    .await;
}

/// Over QUIC, a connection that completes the QUIC handshake and opens no
/// stream is closed at the first-byte deadline.
#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connection_without_a_stream_is_closed_at_the_first_byte_deadline() {
    use publisher_transport::{
        QuicBackend,
        tls::{self, ALPN, Identity, ServerTrust},
    };
    bounded(async {
        let keys = Keys::new(1);
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let (server_backend, _) = QuicBackend::pinned_pair(&identity, Default::default()).unwrap();
        let mut config = server_config();
        config.handshake_timeout = Duration::from_secs(60);
        config.first_byte_timeout = Duration::from_millis(200);
        let server = TransportServer::new(server_backend, config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let tls =
            tls::client_config(&ServerTrust::pinned(identity.fingerprint()), &[ALPN]).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        )));
        let connection =
            tokio::time::timeout(STEP_TIMEOUT, endpoint.connect(addr, "127.0.0.1").unwrap())
                .await
                .unwrap()
                .unwrap();
        let closed = tokio::time::timeout(STEP_TIMEOUT, connection.closed())
            .await
            .expect("closed well before the 60 s handshake timeout");
        match &closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(&close.reason[..], b"no stream opened", "{closed}")
            }
            other => panic!("expected the server to close it, got {other:?}"),
        }
        eventually("counted as a failed transport setup", || {
            counted(&server, "transport_failed") == 1
        })
        .await;
        server.stop().await.unwrap();
    })
    .await;
}

/// 100 trusted sequencers behind one address (a publisher restart with
/// everyone behind one NAT) all connect at once with the default settings,
/// rate limit included: successful handshakes are never charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_trusted_clients_from_one_address_all_connect_at_once() {
    bounded(async {
        const CLIENTS: usize = 100;
        let keys = Keys::new(CLIENTS);
        let config = ServerConfig::default().with_listen_addr("127.0.0.1:0");
        assert!(
            config.rate_limit.is_some(),
            "the default rate limit applies"
        );
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let clients: Vec<TcpClient> = (0..CLIENTS)
            .map(|i| TcpClient::tcp(client_config(&format!("c{i}")), Some(keys.client_auth(i))))
            .collect();
        let results = join_all(clients.iter().map(|client| client.connect(&addr))).await;
        for (i, result) in results.iter().enumerate() {
            assert!(result.is_ok(), "client {i}: {result:?}");
        }
        eventually("all registered", || server.connections().len() == CLIENTS).await;
        assert_eq!(counted(&server, "refused_throttled"), 0);
        for client in &clients {
            client.disconnect().await.unwrap();
        }
        server.stop().await.unwrap();
    })
    .await;
}

/// The default burst, refilled so slowly that no token comes back while a
/// test runs: what is counted does not depend on timing.
fn slow_refill() -> ServerConfig {
    ServerConfig::default()
        .with_listen_addr("127.0.0.1:0")
        .with_rate_limit(Some(RateLimit {
            burst: 20,
            per_second: 0.001,
        }))
}

/// 100 attempts with untrusted keys from one address: the first ones fail
/// authentication and use up the bucket (burst 20), the rest are throttled,
/// each told so in a refusing `HandshakeResponse` and the `Disconnect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_untrusted_attempts_from_one_address_are_throttled() {
    bounded(async {
        let keys = Keys::new(1);
        let config = slow_refill();
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let (mut throttled, mut failed) = (0, 0);
        for _ in 0..100 {
            let stranger = TcpClient::tcp(
                client_config("stranger"),
                Some(ClientAuth::new(Arc::new(SecretKey::generate()))),
            );
            match stranger.connect(&addr).await {
                Err(
                    err @ TransportError::Refused {
                        reason: DisconnectReason::Throttled,
                        ..
                    },
                ) => {
                    let text = err.to_string();
                    assert!(text.contains("throttled: connection rate limit"), "{text}");
                    throttled += 1;
                }
                Err(_) => failed += 1,
                Ok(()) => panic!("an untrusted key got in"),
            }
        }
        println!("100 untrusted attempts: {failed} failed authentication, {throttled} throttled");
        // The burst of 20, and nothing refilled meanwhile.
        assert_eq!(failed, 20, "{failed} failed");
        assert_eq!(throttled, 80, "{throttled} throttled");
        assert_eq!(counted(&server, "refused_throttled"), throttled);
        assert!(server.connections().is_empty());

        // On the wire, what any client of the Go protocol reads in place of
        // the response: a refusing `HandshakeResponse`, then the `Disconnect`.
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut frames = FramedRead::new(stream, FrameCodec::default());
        let mut next = async || {
            tokio::time::timeout(STEP_TIMEOUT, frames.next())
                .await
                .expect("a frame")
                .expect("not the end")
                .unwrap()
        };
        let response = HandshakeResponse::decode(next().await).unwrap();
        assert!(!response.accepted);
        assert_eq!(response.error, "throttled: connection rate limit");
        match Message::decode(next().await).unwrap().payload {
            Some(Payload::Disconnect(disconnect)) => {
                assert_eq!(
                    DisconnectReason::from_proto(disconnect.reason),
                    DisconnectReason::Throttled
                );
                assert_eq!(disconnect.details, "connection rate limit");
            }
            other => panic!("expected a Disconnect, got {other:?}"),
        }
        server.stop().await.unwrap();
    })
    .await;
}

/// 100 attempts with untrusted keys from one address at once: attempts in
/// flight count against the bucket, so no more fail authentication than the
/// bucket holds (burst 20) and the rest are throttled, however they overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_untrusted_attempts_fail_no_more_than_the_burst() {
    bounded(async {
        let server = TcpServer::tcp(slow_refill(), Some(Keys::new(1).server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let strangers: Vec<TcpClient> = (0..100)
            .map(|_| {
                TcpClient::tcp(
                    client_config("stranger"),
                    Some(ClientAuth::new(Arc::new(SecretKey::generate()))),
                )
            })
            .collect();
        let results = join_all(strangers.iter().map(|s| s.connect(&addr))).await;
        let throttled = results
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Err(TransportError::Refused {
                        reason: DisconnectReason::Throttled,
                        ..
                    })
                )
            })
            .count();
        assert!(results.iter().all(Result::is_err), "an untrusted key got in");
        let failed = results.len() - throttled;
        println!("100 concurrent untrusted attempts: {failed} failed authentication, {throttled} throttled");
        assert_eq!(failed, 20, "{failed} failed authentication");
        assert_eq!(counted(&server, "handshake_failed"), 20);
        server.stop().await.unwrap();
    })
    .await;
}

/// A pending handshake that is displaced by a newcomer, or cut short by the
/// server stopping, failed through no fault of its own and costs its address
/// nothing: with a bucket of one token and no refill, the same address still
/// connects after both (the limiter outlives a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn displaced_or_shut_down_handshakes_are_not_charged() {
    bounded(async {
        let keys = Keys::new(1);
        let mut config = server_config().with_rate_limit(Some(RateLimit {
            burst: 1,
            per_second: 0.0,
        }));
        config.max_pending_handshakes = 1;
        config.max_pending_handshakes_per_prefix = 1;
        config.handshake_timeout = Duration::from_secs(25);
        config.first_byte_timeout = Duration::from_secs(25);
        let server = TcpServer::tcp(config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap();

        // Displaced: a silent connection from 127.0.0.1, then a newcomer.
        let mut victim = silent_tcp(Ipv4Addr::LOCALHOST, addr).await;
        eventually("the victim accepted", || counted(&server, "accepted") == 1).await;
        let newcomer = silent_tcp(flood_address(0), addr).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(STEP_TIMEOUT, victim.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0))), "the victim is closed: {read:?}");
        assert_eq!(counted(&server, "displaced"), 1);
        drop(newcomer);

        // Shut down: a silent connection from 127.0.0.1 pending at `stop`,
        // which closes it at once rather than at its deadline.
        let mut pending = silent_tcp(Ipv4Addr::LOCALHOST, addr).await;
        eventually("the second accepted", || counted(&server, "accepted") == 3).await;
        server.stop().await.unwrap();
        let read = tokio::time::timeout(STEP_TIMEOUT, pending.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0))), "closed at stop: {read:?}");

        // `stop` waited for every connection's task: any charge is made.
        let addr = server.start().await.unwrap();
        let client = TcpClient::tcp(client_config("legit"), Some(keys.client_auth(0)));
        client.connect(&addr.to_string()).await.unwrap();
        assert_eq!(counted(&server, "refused_throttled"), 0);
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// A key removed while its handshake is in flight never stays connected:
/// either the handshake fails, or the registered connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_removal_racing_a_handshake_leaves_no_connection() {
    bounded(async {
        const ROUNDS: usize = 30;
        let keys = Keys::new(0);
        let server = TcpServer::tcp(server_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let mut connected = 0;
        for round in 0..ROUNDS {
            let id = format!("racer-{round}");
            let key = Arc::new(SecretKey::generate());
            keys.trust.add(&id, key.public_key().clone()).unwrap();
            let client = TcpClient::tcp(
                client_config(&id),
                Some(ClientAuth::new(key).with_server_key(keys.server.public_key().clone())),
            );
            // Spread the removal over the handshake's course.
            let delay = Duration::from_micros(100 * round as u64);
            let (result, _) = tokio::join!(client.connect(&addr), async {
                tokio::time::sleep(delay).await;
                keys.trust.remove(&id)
            });
            connected += usize::from(result.is_ok());
            eventually("the revoked key disconnected", || {
                server.manager().get(&id).is_none()
            })
            .await;
        }
        println!("{connected} of {ROUNDS} racing handshakes completed before the removal");
        server.stop().await.unwrap();
    })
    .await;
}

/// Whether the server has closed `stream` (without reading from it more
/// than a peek's worth).
#[cfg(feature = "grpc")]
fn is_closed(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[cfg(feature = "grpc")]
fn grpc_options() -> publisher_transport::backend::grpc::GrpcOptions {
    let mut options = publisher_transport::backend::grpc::GrpcOptions::default();
    options.retry.max_retries = Some(0);
    options
}

/// Over gRPC, silent TCP connections (no HTTP/2 preface) are held by the
/// listener, per address prefix like pending handshakes: those beyond the
/// pool are closed at once, and a trusted client still gets in within a
/// second, displacing one.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_from_many_addresses_leaves_room_over_grpc() {
    use publisher_transport::backend::grpc::GrpcBackend;
    bounded(async {
        let keys = Keys::new(1);
        let mut options = grpc_options();
        options.max_pending_connections = POOL;
        options.max_pending_connections_per_prefix = SHARE;
        options.stream_deadline = Duration::from_secs(25);
        let server = TransportServer::new(
            GrpcBackend::new(options),
            flood_config(),
            Some(keys.server_auth()),
        );
        let addr = server.start().await.unwrap();
        let mut silent = Vec::new();
        for n in 0..FLOOD_ADDRESSES {
            for _ in 0..PER_ADDRESS {
                silent.push(silent_tcp(flood_address(n), addr).await);
            }
        }
        let closed = |silent: &[tokio::net::TcpStream]| silent.iter().filter(|s| is_closed(s)).count();
        eventually("the silent connections beyond the pool closed", || {
            closed(&silent) == silent.len() - POOL
        })
        .await;

        let client = TransportClient::new(
            GrpcBackend::new(grpc_options()),
            client_config("legit"),
            Some(keys.client_auth(0)),
        );
        let started = Instant::now();
        client.connect(&addr.to_string()).await.unwrap();
        let took = started.elapsed();
        println!(
            "grpc with {} silent connections from {FLOOD_ADDRESSES} addresses: handshake in {took:?}",
            silent.len()
        );
        assert!(took < Duration::from_secs(1), "handshake took {took:?}");
        registered(&server, &identity(0)).await;
        eventually("one silent connection displaced", || {
            closed(&silent) == silent.len() - POOL + 1
        })
        .await;
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// A gRPC connection that never opens a stream is closed at the stream
/// deadline; beyond the connection cap a connection is closed at once.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connection_without_a_stream_is_closed_and_the_cap_holds() {
    use publisher_transport::backend::grpc::GrpcBackend;
    bounded(async {
        let keys = Keys::new(1);
        let mut options = grpc_options();
        options.stream_deadline = Duration::from_millis(300);
        options.max_connections = 1;
        let server = TransportServer::new(
            GrpcBackend::new(options),
            server_config(),
            Some(keys.server_auth()),
        );
        let addr = server.start().await.unwrap();
        let mut first = silent_tcp(Ipv4Addr::LOCALHOST, addr).await;
        let mut second = silent_tcp(Ipv4Addr::LOCALHOST, addr).await;
        let mut rest = Vec::new();
        let over_cap =
            tokio::time::timeout(Duration::from_millis(250), second.read_to_end(&mut rest))
                .await
                .expect("closed at once: over the connection cap");
        assert!(over_cap.is_err() || rest.is_empty(), "{over_cap:?}");
        let started = Instant::now();
        let _ = tokio::time::timeout(STEP_TIMEOUT, first.read_to_end(&mut rest))
            .await
            .expect("closed at the stream deadline");
        println!(
            "silent gRPC connection closed after {:?}",
            started.elapsed()
        );
        // The cap is free again: a client gets in.
        let client = TransportClient::new(
            GrpcBackend::new(grpc_options()),
            client_config("legit"),
            Some(keys.client_auth(0)),
        );
        client.connect(&addr.to_string()).await.unwrap();
        registered(&server, &identity(0)).await;
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

/// Over gRPC with TLS, a connection from a throttled address is closed
/// before its TLS handshake, by the listener: it never reaches the server.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_grpc_tls_connection_is_refused_before_the_tls_handshake() {
    use publisher_transport::{
        backend::grpc::GrpcBackend,
        tls::{ClientTrust, Identity, ServerTrust},
    };
    bounded(async {
        let keys = Keys::new(1);
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let server_backend = GrpcBackend::new(grpc_options())
            .with_server_tls(&identity, &ClientTrust::default())
            .unwrap();
        let config = server_config().with_rate_limit(Some(RateLimit {
            burst: 1,
            per_second: 0.0,
        }));
        let server = TransportServer::new(server_backend, config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let client = |auth| {
            let backend = GrpcBackend::new(grpc_options())
                .with_client_tls(&ServerTrust::pinned(identity.fingerprint()))
                .unwrap();
            TransportClient::new(backend, client_config("c"), Some(auth))
        };
        let stranger = client(ClientAuth::new(Arc::new(SecretKey::generate())));
        assert!(stranger.connect(&addr).await.is_err());
        eventually("the failure charged", || {
            counted(&server, "handshake_failed") == 1
        })
        .await;
        let accepted = counted(&server, "accepted");
        let throttled = client(keys.client_auth(0)).connect(&addr).await;
        assert!(
            matches!(&throttled, Err(TransportError::Io { op: "connect", .. })),
            "expected the connection to be cut before TLS, got {throttled:?}"
        );
        assert_eq!(
            counted(&server, "accepted"),
            accepted,
            "never reached the server"
        );
        assert!(server.connections().is_empty());
        server.stop().await.unwrap();
    })
    .await;
}

/// Over gRPC with TLS, TLS handshakes that fail are charged by the listener,
/// which the server never hears of: after a burst of them the address is
/// refused before its TLS handshake, a trusted client from it included.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_grpc_tls_handshakes_are_charged_until_refused_before_tls() {
    use publisher_transport::{
        backend::grpc::GrpcBackend,
        tls::{ClientTrust, Identity, ServerTrust},
    };
    bounded(async {
        const BURST: u32 = 2;
        let keys = Keys::new(1);
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let other = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let server_backend = GrpcBackend::new(grpc_options())
            .with_server_tls(&identity, &ClientTrust::default())
            .unwrap();
        let config = server_config().with_rate_limit(Some(RateLimit {
            burst: BURST,
            per_second: 0.0,
        }));
        let server = TransportServer::new(server_backend, config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let client = |pin: &Identity| {
            let backend = GrpcBackend::new(grpc_options())
                .with_client_tls(&ServerTrust::pinned(pin.fingerprint()))
                .unwrap();
            TransportClient::new(backend, client_config("c"), Some(keys.client_auth(0)))
        };
        // Clients pinning another certificate abort every TLS handshake.
        for attempt in 0..=BURST {
            let failed = client(&other).connect(&addr).await;
            assert!(failed.is_err(), "attempt {attempt}: {failed:?}");
        }
        let throttled = client(&identity).connect(&addr).await;
        assert!(
            matches!(&throttled, Err(TransportError::Io { op: "connect", .. })),
            "expected the connection to be cut before TLS, got {throttled:?}"
        );
        assert_eq!(
            counted(&server, "accepted"),
            0,
            "nothing reached the server"
        );
        server.stop().await.unwrap();
    })
    .await;
}

/// A plain gRPC connection that opens no stream before the deadline is
/// charged like a silent TCP connection: with a bucket of one token, the
/// address is then throttled, and told so.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connection_without_a_stream_is_charged() {
    use publisher_transport::backend::grpc::GrpcBackend;
    bounded(async {
        let keys = Keys::new(1);
        let mut options = grpc_options();
        options.stream_deadline = Duration::from_millis(200);
        let config = server_config().with_rate_limit(Some(RateLimit {
            burst: 1,
            per_second: 0.0,
        }));
        let server =
            TransportServer::new(GrpcBackend::new(options), config, Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let mut silent = silent_tcp(Ipv4Addr::LOCALHOST, addr).await;
        let mut rest = Vec::new();
        // Charged before the listener closes it.
        let _ = tokio::time::timeout(STEP_TIMEOUT, silent.read_to_end(&mut rest))
            .await
            .expect("closed at the stream deadline");
        let client = TransportClient::new(
            GrpcBackend::new(grpc_options()),
            client_config("legit"),
            Some(keys.client_auth(0)),
        );
        let refused = client.connect(&addr.to_string()).await;
        assert!(
            matches!(
                &refused,
                Err(TransportError::Refused {
                    reason: DisconnectReason::Throttled,
                    ..
                })
            ),
            "{refused:?}"
        );
        server.stop().await.unwrap();
    })
    .await;
}
