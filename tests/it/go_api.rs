//! What code ported from the Go package reaches for: `connect("")` meaning
//! the configured address, errors that retrying cannot fix failing at once,
//! and the connection API (`remote_addr`, `is_authenticated`,
//! `authenticated_id`, chain ids from the trust store).

use std::{io, time::Duration};

use publisher_transport::{
    ClientAuth, ConnectionEvent, DisconnectReason, HandshakeError, RetryPolicy, SecretKey,
    TcpClient, TcpServer, TransportError, TrustMode, retry::Jitter,
};
use tokio::sync::broadcast;

use crate::e2e::{Keys, STEP_TIMEOUT, bounded, client_config, server_config};

/// A retry schedule of `retries` quick retries: a test of an error that must
/// not be retried would see every one of them in the attempt counter.
fn quick(retries: u32) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        ..RetryPolicy::go_connect(Duration::from_millis(1), retries)
    }
    .with_jitter(Jitter::None)
}

async fn connected_to(events: &mut broadcast::Receiver<ConnectionEvent>) -> String {
    loop {
        let event = tokio::time::timeout(STEP_TIMEOUT, events.recv())
            .await
            .expect("no Connected event")
            .unwrap();
        if let ConnectionEvent::Connected { addr, .. } = event {
            return addr;
        }
    }
}

#[tokio::test]
async fn empty_address_dials_the_configured_one() {
    bounded(async {
        let keys = Keys::new(1);
        let server = TcpServer::tcp(server_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let client = TcpClient::tcp(
            client_config("a").with_server_addr(&addr),
            Some(keys.client_auth(0)),
        );
        let mut events = client.events();

        client.connect("").await.unwrap();
        assert_eq!(connected_to(&mut events).await, addr);
        assert_eq!(client.stats().server_addr.as_deref(), Some(&*addr));

        // `reconnect` reuses the address dialled, never "".
        client.reconnect().await.unwrap();
        assert_eq!(connected_to(&mut events).await, addr);

        client.disconnect().await.unwrap();
        client.connect_with_retry("", 2).await.unwrap();
        assert_eq!(connected_to(&mut events).await, addr);
        client.disconnect().await.unwrap();
        client.connect_with_policy("", &quick(2)).await.unwrap();
        assert_eq!(connected_to(&mut events).await, addr);
        assert_eq!(client.stats().connect_failures, 0);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn no_address_anywhere_fails_at_once() {
    bounded(async {
        let client = TcpClient::tcp(client_config("nowhere").with_server_addr(""), None);
        let is_no_address = |err: &TransportError| {
            matches!(err, TransportError::NoServerAddress { client_id } if client_id == "nowhere")
        };
        let err = client.connect("").await.unwrap_err();
        assert!(is_no_address(&err), "{err:?}");
        assert!(!err.is_transient());
        // Not wrapped in RetriesExhausted: one look, no retry.
        let err = client.connect_with_retry("", 5).await.unwrap_err();
        assert!(is_no_address(&err), "{err:?}");
        let err = client.connect_with_policy("", &quick(5)).await.unwrap_err();
        assert!(is_no_address(&err), "{err:?}");
        // Nothing was dialled, so `reconnect` has no address either.
        let err = client.reconnect().await.unwrap_err();
        assert!(is_no_address(&err), "{err:?}");
        let stats = client.stats();
        assert_eq!(stats.connect_attempts, 0);
        assert_eq!(stats.server_addr, None);
        assert_eq!(client.metrics().retry_attempts_total.get(), 0);
    })
    .await;
}

#[test]
fn errors_retrying_cannot_fix_are_not_transient() {
    let io = |kind| TransportError::Io {
        op: "connect",
        addr: "x".into(),
        source: io::Error::from(kind),
    };
    let permanent = [
        TransportError::NoServerAddress {
            client_id: "a".into(),
        },
        io(io::ErrorKind::InvalidInput),
        TransportError::Config("client_id: must not be empty".into()),
        TransportError::Handshake(HandshakeError::Rejected {
            reason: "untrusted public key - connection rejected".into(),
        }),
        TransportError::Handshake(HandshakeError::WrongServerKey {
            expected: "02aa".into(),
            actual: "02bb".into(),
        }),
        TransportError::Handshake(HandshakeError::ServerNotAuthenticated),
        TransportError::Refused {
            reason: DisconnectReason::AuthFailure,
            details: "untrusted".into(),
        },
    ];
    for err in &permanent {
        assert!(!err.is_transient(), "{err}");
    }
    let transient = [
        io(io::ErrorKind::ConnectionRefused),
        TransportError::Refused {
            reason: DisconnectReason::Throttled,
            details: "connection rate limit".into(),
        },
        TransportError::Handshake(HandshakeError::Timeout(Duration::from_secs(5))),
    ];
    for err in &transient {
        assert!(err.is_transient(), "{err}");
    }
}

/// A wrong publisher key and an address without a port are each tried once.
#[tokio::test]
async fn permanent_connect_errors_stop_after_one_attempt() {
    bounded(async {
        let keys = Keys::new(1);
        let server = TcpServer::tcp(server_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap().to_string();
        let impostor = SecretKey::generate().public_key().clone();
        let client = TcpClient::tcp(
            client_config("a"),
            Some(keys.client_auth(0).with_server_key(impostor)),
        );
        let err = client.connect_with_policy(&addr, &quick(5)).await;
        // The request names the key it expects: the server refuses it.
        assert!(
            matches!(
                &err,
                Err(TransportError::Handshake(HandshakeError::Rejected { reason }))
                    if reason == "handshake addressed to another server"
            ),
            "{err:?}"
        );
        assert_eq!(client.stats().connect_attempts, 1);

        let client = TcpClient::tcp(client_config("b"), None);
        let err = client
            .connect_with_policy("127.0.0.1", &quick(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransportError::Io { source, .. } if source.kind() == io::ErrorKind::InvalidInput),
            "{err:?}"
        );
        assert_eq!(client.stats().connect_attempts, 1);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn connection_reports_address_authentication_and_chain() {
    bounded(async {
        let keys = Keys::new(2);
        // seq-0 is trusted with its chain; seq-1 without.
        let auth = keys.server_auth();
        auth.trust
            .add_with_chain(
                "seq-0",
                keys.clients[0].public_key().clone(),
                TrustMode::ExtendedOnly,
                Some("901".into()),
            )
            .unwrap();
        assert_eq!(auth.trust.chain_of("seq-0").as_deref(), Some("901"));
        assert_eq!(auth.trust.chain_of("seq-1"), None);
        let server = TcpServer::tcp(server_config(), Some(auth));
        let addr = server.start().await.unwrap();
        let clients: Vec<_> = (0..2)
            .map(|i| TcpClient::tcp(client_config(&format!("c{i}")), Some(keys.client_auth(i))))
            .collect();
        for client in &clients {
            client.connect(&addr.to_string()).await.unwrap();
        }
        crate::e2e::eventually("both registered", || server.connections().len() == 2).await;

        let with_chain = server.manager().get("seq-0").unwrap();
        assert!(with_chain.is_authenticated());
        assert_eq!(with_chain.authenticated_id(), Some("seq-0"));
        let client_side = clients[0].connection().unwrap();
        // The peer's address, as each side's socket reports it.
        assert_eq!(client_side.remote_addr(), Some(addr));
        let peer = with_chain.remote_addr().expect("TCP knows the peer");
        assert_eq!(peer.ip(), addr.ip());
        assert_ne!(peer.port(), 0);
        assert_eq!(with_chain.info().remote_addr, Some(peer));
        assert_eq!(with_chain.info().chain_id.as_deref(), Some("901"));
        // The client proved nothing of the chain: only the server knows it.
        assert_eq!(client_side.info().chain_id, None);
        // Mutual authentication: the client knows whom it talks to.
        assert!(client_side.is_authenticated());
        let publisher = format!("publisher:{}", keys.server.public_key());
        assert_eq!(client_side.authenticated_id(), Some(&*publisher));

        let without = server.manager().get("seq-1").unwrap();
        assert_eq!(without.info().chain_id, None);
        without.set_chain_id("902");
        assert_eq!(without.info().chain_id.as_deref(), Some("902"));
        let mut chains: Vec<_> = server
            .connections()
            .into_iter()
            .map(|info| (info.identity, info.chain_id))
            .collect();
        chains.sort();
        assert_eq!(
            chains,
            [
                ("seq-0".to_owned(), Some("901".to_owned())),
                ("seq-1".to_owned(), Some("902".to_owned())),
            ]
        );
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn unauthenticated_connections_have_no_authenticated_id() {
    bounded(async {
        let server = TcpServer::tcp(server_config(), None);
        let addr = server.start().await.unwrap();
        let client = TcpClient::tcp(client_config("plain"), None);
        client.connect(&addr.to_string()).await.unwrap();
        crate::e2e::eventually("registered", || server.connections().len() == 1).await;
        let identity = server.connections()[0].identity.clone();
        let on_server = server.manager().get(&identity).unwrap();
        assert!(!on_server.is_authenticated());
        assert_eq!(on_server.authenticated_id(), None);
        assert!(on_server.remote_addr().is_some());
        let on_client = client.connection().unwrap();
        assert!(!on_client.is_authenticated());
        assert_eq!(on_client.authenticated_id(), None);
        server.stop().await.unwrap();
    })
    .await;

    // A Go-mode server proves no key: the client's peer is not authenticated.
    bounded(async {
        let keys = Keys::go_compatible(1);
        let mut auth = keys.server_auth();
        auth.key = None;
        let server = TcpServer::tcp(server_config(), Some(auth));
        let addr = server.start().await.unwrap();
        let client = TcpClient::tcp(
            client_config("go"),
            Some(ClientAuth {
                extensions: false,
                ..ClientAuth::new(keys.clients[0].clone())
            }),
        );
        client.connect(&addr.to_string()).await.unwrap();
        crate::e2e::eventually("registered", || server.connections().len() == 1).await;
        assert_eq!(
            server.manager().get("seq-0").unwrap().authenticated_id(),
            Some("seq-0")
        );
        assert!(!client.connection().unwrap().is_authenticated());
        server.stop().await.unwrap();
    })
    .await;
}

#[test]
fn trust_store_chain_ids_follow_their_entries() {
    let trust = publisher_transport::TrustStore::new();
    let key = SecretKey::generate().public_key().clone();
    let err = trust
        .add_with_chain(
            "a",
            key.clone(),
            TrustMode::ExtendedOnly,
            Some(String::new()),
        )
        .unwrap_err();
    assert!(matches!(err, publisher_transport::KeyError::EmptyChainId));
    assert!(trust.is_empty());
    let mut changes = trust.changes();
    trust
        .add_with_chain("a", key.clone(), TrustMode::ExtendedOnly, Some("7".into()))
        .unwrap();
    assert_eq!(changes.try_recv().unwrap(), "a");
    assert_eq!(
        trust
            .lookup(key.as_compressed())
            .unwrap()
            .chain_id
            .as_deref(),
        Some("7")
    );
    // A new chain id for the same key is a change; `add` forgets it.
    trust
        .add_with_chain("a", key.clone(), TrustMode::ExtendedOnly, Some("8".into()))
        .unwrap();
    assert_eq!(changes.try_recv().unwrap(), "a");
    trust.add("a", key.clone()).unwrap();
    assert_eq!(changes.try_recv().unwrap(), "a");
    assert_eq!(trust.chain_of("a"), None);
}
