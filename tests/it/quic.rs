//! QUIC-specific behaviour: TLS trust (pinning, ALPN, mutual TLS), the idle
//! timeout, and reconnecting after a restart on the same UDP port.

use std::{sync::Arc, time::Duration};

use crate::e2e::{next_event, recv};

use publisher_transport::{
    ClientAuth, ClientConfig, ConnectionEvent, DisconnectReason, Inbound, Message, QuicBackend,
    QuicClient, QuicOptions, QuicServer, SecretKey, ServerAuth, ServerConfig, TransportError,
    TrustStore, channel_handler,
    proto::{Payload, rollup::v1::Vote},
    tls::{self, CertificateAuthority, ClientTrust, Identity, ServerTrust, Validity},
};
use tokio::{sync::mpsc, time::timeout};

const STEP: Duration = Duration::from_secs(10);

struct Keys {
    server: Arc<SecretKey>,
    client: Arc<SecretKey>,
    trust: Arc<TrustStore>,
}

impl Keys {
    fn new() -> Self {
        let keys = Self {
            server: Arc::new(SecretKey::generate()),
            client: Arc::new(SecretKey::generate()),
            trust: Arc::new(TrustStore::new()),
        };
        keys.trust
            .add("seq-a", keys.client.public_key().clone())
            .unwrap();
        keys
    }

    fn server_auth(&self) -> Option<ServerAuth> {
        Some(ServerAuth::new(self.server.clone(), self.trust.clone()))
    }

    fn client_auth(&self) -> Option<ClientAuth> {
        Some(ClientAuth::new(self.client.clone()).with_server_key(self.server.public_key().clone()))
    }
}

fn identity() -> Identity {
    Identity::self_signed(&["127.0.0.1", "localhost"]).unwrap()
}

fn server_config() -> ServerConfig {
    ServerConfig::default()
        .with_listen_addr("127.0.0.1:0")
        .with_rate_limit(None)
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::default()
        .with_client_id("client-a")
        .with_reconnect_delay(Duration::from_millis(50));
    config.connect_timeout = Duration::from_secs(5);
    config.auto_reconnect = false;
    config
}

fn vote() -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            vote: true,
            ..Default::default()
        })),
    }
}

/// A server on `backend` with a message channel, and the address to dial.
async fn serve(
    backend: QuicBackend,
    config: ServerConfig,
    auth: Option<ServerAuth>,
) -> (QuicServer, mpsc::Receiver<Inbound>, String) {
    let server = QuicServer::new(backend, config, auth);
    let (handler, inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    assert_ne!(addr.port(), 0);
    (server, inbound, addr.to_string())
}

#[tokio::test]
async fn signed_round_trip_and_broadcast() {
    let keys = Keys::new();
    let (server_backend, client_backend) =
        QuicBackend::pinned_pair(&identity(), QuicOptions::default()).unwrap();
    let (server, mut inbound, addr) =
        serve(server_backend, server_config(), keys.server_auth()).await;

    let client = QuicClient::new(client_backend, client_config(), keys.client_auth());
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);
    timeout(STEP, client.connect(&addr)).await.unwrap().unwrap();
    client.send(vote()).await.unwrap();
    let got = recv(&mut inbound, "the client's vote").await;
    assert_eq!(&*got.from, "seq-a");
    assert_eq!(got.message.sender_id, "client-a");
    assert_eq!(got.message.payload, vote().payload);
    let info = &server.connections()[0];
    assert!(info.signed_frames);
    assert_eq!(
        info.remote_addr.map(|a| a.ip()),
        Some([127, 0, 0, 1].into())
    );

    let report = server.broadcast(vote(), None).unwrap();
    assert_eq!(report.delivered, vec![std::sync::Arc::from("seq-a")]);
    let got = recv(&mut client_inbound, "the broadcast").await;
    assert_eq!(got.message.sender_id, "publisher");
    assert_eq!(got.message.payload, vote().payload);

    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn without_authentication_the_first_ping_opens_the_stream() {
    let (server_backend, client_backend) =
        QuicBackend::pinned_pair(&identity(), QuicOptions::default()).unwrap();
    let (server, mut inbound, addr) = serve(server_backend, server_config(), None).await;
    let client = QuicClient::new(client_backend, client_config(), None);
    timeout(STEP, client.connect(&addr)).await.unwrap().unwrap();
    client.send(vote()).await.unwrap();
    let got = recv(&mut inbound, "the vote").await;
    assert_eq!(got.message.payload, vote().payload);
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_fingerprint_mismatch_is_a_tls_error() {
    let (server_backend, _) =
        QuicBackend::pinned_pair(&identity(), QuicOptions::default()).unwrap();
    // Trusts another certificate than the one the server presents.
    let (_, client_backend) =
        QuicBackend::pinned_pair(&identity(), QuicOptions::default()).unwrap();
    let (server, _inbound, addr) = serve(server_backend, server_config(), None).await;
    let client = QuicClient::new(client_backend, client_config(), None);
    let err = timeout(STEP, client.connect(&addr))
        .await
        .unwrap()
        .unwrap_err();
    match &err {
        TransportError::Tls { addr: at, source } => {
            assert_eq!(at, &addr);
            assert!(
                source.to_string().contains("invalid peer certificate"),
                "{err}"
            );
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(!err.is_transient(), "a certificate mismatch is not retried");
    assert!(server.connections().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn another_alpn_fails_the_quic_handshake() {
    let identity = identity();
    let (server_backend, _) = QuicBackend::pinned_pair(&identity, QuicOptions::default()).unwrap();
    let (server, _inbound, addr) = serve(server_backend, server_config(), None).await;

    let tls = tls::client_config(&ServerTrust::pinned(identity.fingerprint()), &[b"h3"]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            addr.parse().unwrap(),
            "127.0.0.1",
        )
        .unwrap();
    let err = timeout(STEP, connecting).await.unwrap().unwrap_err();
    // CRYPTO_ERROR carrying TLS alert 120, no_application_protocol.
    match &err {
        quinn::ConnectionError::ConnectionClosed(close) => {
            assert_eq!(u64::from(close.error_code), 0x100 + 120, "{err}")
        }
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
    assert!(server.connections().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test clients").unwrap();
    let server_identity = identity();
    let clients = ClientTrust {
        roots: vec![ca.certificate().clone()],
        ..ClientTrust::default()
    };
    let server_backend = QuicBackend::new(
        QuicOptions::default(),
        Some((&server_identity, &clients)),
        None,
    )
    .unwrap();
    let (server, mut inbound, addr) =
        serve(server_backend, server_config(), keys.server_auth()).await;
    let pinned = ServerTrust::pinned(server_identity.fingerprint());

    let with_certificate = pinned
        .clone()
        .with_identity(ca.issue(&["seq-a"], Validity::Long).unwrap());
    let backend = QuicBackend::new(QuicOptions::default(), None, Some(&with_certificate)).unwrap();
    let client = QuicClient::new(backend, client_config(), keys.client_auth());
    timeout(STEP, client.connect(&addr)).await.unwrap().unwrap();
    client.send(vote()).await.unwrap();
    assert_eq!(&*recv(&mut inbound, "the vote").await.from, "seq-a");
    client.disconnect().await.unwrap();

    // TLS 1.3 clients finish their handshake before the server has checked
    // their certificate, so the refusal arrives on the first exchange.
    let backend = QuicBackend::new(QuicOptions::default(), None, Some(&pinned)).unwrap();
    let client = QuicClient::new(backend, client_config(), keys.client_auth());
    let err = timeout(STEP, client.connect(&addr))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("cryptographic handshake failed"),
        "{err}"
    );
    assert!(!client.is_connected());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_times_out() {
    let keys = Keys::new();
    let options = QuicOptions {
        idle_timeout: Some(Duration::from_millis(300)),
        keep_alive: None,
    };
    let (server_backend, client_backend) = QuicBackend::pinned_pair(&identity(), options).unwrap();
    let mut config = server_config();
    config.ping_interval = None;
    let (server, _inbound, addr) = serve(server_backend, config, keys.server_auth()).await;

    let mut config = client_config();
    config.ping_interval = None;
    let client = QuicClient::new(client_backend, config, keys.client_auth());
    let mut events = client.events();
    timeout(STEP, client.connect(&addr)).await.unwrap().unwrap();
    let event = next_event(&mut events, "disconnected", |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    let ConnectionEvent::Disconnected {
        reason, details, ..
    } = event
    else {
        unreachable!()
    };
    assert_eq!(reason, DisconnectReason::NetworkError);
    assert!(details.contains("timed out"), "{details}");
    assert!(!client.is_connected());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reconnects_to_a_server_restarted_on_the_same_port() {
    let keys = Keys::new();
    let identity = identity();
    let (first_backend, client_backend) =
        QuicBackend::pinned_pair(&identity, QuicOptions::default()).unwrap();
    let (first, _inbound, addr) = serve(first_backend, server_config(), keys.server_auth()).await;

    let mut config = client_config();
    config.auto_reconnect = true;
    let client = QuicClient::new(client_backend, config, keys.client_auth());
    let mut events = client.events();
    timeout(STEP, client.connect(&addr)).await.unwrap().unwrap();

    first.stop().await.unwrap();
    let event = next_event(&mut events, "disconnected", |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
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

    let (second_backend, _) = QuicBackend::pinned_pair(&identity, QuicOptions::default()).unwrap();
    let second = QuicServer::new(second_backend, server_config(), keys.server_auth());
    let (handler, mut inbound) = channel_handler(8);
    second.set_handler(handler);
    assert_eq!(second.listen(&addr).await.unwrap().to_string(), addr);
    let event = next_event(&mut events, "reconnected", |e| {
        matches!(e, ConnectionEvent::Connected { .. })
    })
    .await;
    assert!(matches!(
        event,
        ConnectionEvent::Connected {
            reconnect: true,
            ..
        }
    ));
    client.send(vote()).await.unwrap();
    assert_eq!(&*recv(&mut inbound, "the vote").await.from, "seq-a");
    client.disconnect().await.unwrap();
    second.stop().await.unwrap();
}

#[tokio::test]
async fn keep_alive_holds_an_idle_connection_open() {
    let keys = Keys::new();
    let idle_timeout = Duration::from_millis(300);
    let options = QuicOptions {
        idle_timeout: Some(idle_timeout),
        keep_alive: Some(Duration::from_millis(50)),
    };
    let (server_backend, client_backend) = QuicBackend::pinned_pair(&identity(), options).unwrap();
    let mut config = server_config();
    config.ping_interval = None;
    let (server, mut inbound, addr) = serve(server_backend, config, keys.server_auth()).await;

    let mut config = client_config();
    config.ping_interval = None;
    let client = QuicClient::new(client_backend, config, keys.client_auth());
    let mut events = client.events();
    timeout(STEP, client.connect(&addr)).await.unwrap().unwrap();
    // Nothing to await here: the point is that nothing happens for several
    // idle timeouts.
    tokio::time::sleep(idle_timeout * 4).await;
    assert!(client.is_connected());
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, ConnectionEvent::Disconnected { .. }),
            "the connection went down: {event:?}"
        );
    }
    client.send(vote()).await.unwrap();
    assert_eq!(&*recv(&mut inbound, "the vote").await.from, "seq-a");
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn binding_the_port_of_a_running_server_fails_at_once() {
    let (backend, _) = QuicBackend::pinned_pair(&identity(), QuicOptions::default()).unwrap();
    let (server, _inbound, addr) = serve(backend.clone(), server_config(), None).await;
    let second = QuicServer::new(backend, server_config(), None);
    // Only a stopped listener's socket is waited for, never a live one.
    let err = timeout(Duration::from_secs(1), second.listen(&addr))
        .await
        .expect("no wait for a listener still serving")
        .unwrap_err();
    assert!(
        matches!(&err, TransportError::Io { op: "bind", source, .. } if source.kind() == std::io::ErrorKind::AddrInUse),
        "{err:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_server_with_another_alpn_is_a_tls_error() {
    let identity = identity();
    let tls = tls::server_config(&identity, &ClientTrust::default(), &[b"h3"]).unwrap();
    let server_backend = QuicBackend::from_rustls(QuicOptions::default(), Some(tls), None).unwrap();
    let (server, _inbound, addr) = serve(server_backend, server_config(), None).await;
    let (_, client_backend) = QuicBackend::pinned_pair(&identity, QuicOptions::default()).unwrap();
    let client = QuicClient::new(client_backend, client_config(), None);
    let err = timeout(STEP, client.connect(&addr))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, TransportError::Tls { source, .. } if source.to_string().contains("error 120")),
        "{err:?}"
    );
    server.stop().await.unwrap();
}
