//! gRPC per-call behaviour: the confirmation deadline, application
//! metadata, which status codes are retried, and mutual TLS.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use publisher_transport::{
    ClientAuth, ClientConfig, GrpcClient, GrpcServer, HandlerError, Inbound, SecretKey, ServerAuth,
    ServerConfig, TransportError, TrustStore,
    backend::{
        Backend,
        grpc::{GrpcBackend, GrpcCode, GrpcOptions},
    },
    channel_handler,
    proto::transport::v1::{
        FrameBatch,
        frame_service_server::{FrameService, FrameServiceServer},
    },
    retry::Jitter,
    tls::{CertificateAuthority, ClientTrust, ServerTrust, Validity},
};
use tokio::time::timeout;

use super::grpc::vote;

const BOUND: Duration = Duration::from_secs(20);

/// An authenticated server and client (acknowledgements negotiated) over
/// the given back-ends; the server's handler is `handler`.
async fn pair(
    server_backend: GrpcBackend,
    client_backend: GrpcBackend,
    handler: Arc<dyn publisher_transport::Handler>,
) -> (GrpcServer, GrpcClient, Result<(), TransportError>) {
    let (server_key, client_key) = (
        Arc::new(SecretKey::generate()),
        Arc::new(SecretKey::generate()),
    );
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", client_key.public_key().clone()).unwrap();
    let server = GrpcServer::grpc(
        ServerConfig::default().with_listen_addr("127.0.0.1:0"),
        server_backend,
        Some(ServerAuth::new(server_key.clone(), trust)),
    );
    server.set_handler(handler);
    let addr = server.start().await.unwrap().to_string();
    let client = GrpcClient::grpc(
        ClientConfig::default().with_client_id("seq-a"),
        client_backend,
        Some(ClientAuth::new(client_key).with_server_key(server_key.public_key().clone())),
    );
    let connected = timeout(BOUND, client.connect(&addr)).await.unwrap();
    (server, client, connected)
}

fn fast_retry(codes: Vec<GrpcCode>) -> GrpcOptions {
    let mut options = GrpcOptions::default();
    options.retry.initial = Duration::from_millis(1);
    options.retry.max_delay = Duration::from_millis(1);
    options.retry.max_retries = Some(2);
    options.retry.jitter = Jitter::None;
    options.retryable_codes = codes;
    options
}

#[tokio::test]
async fn a_confirmation_that_never_comes_fails_at_the_deadline() {
    // The handler never finishes, so the server never acknowledges.
    let stuck = Arc::new(|_: Inbound| std::future::pending::<Result<(), HandlerError>>());
    let (server, client, connected) = pair(
        GrpcBackend::new(GrpcOptions::default()),
        GrpcBackend::new(GrpcOptions::default()),
        stuck,
    )
    .await;
    connected.unwrap();
    assert!(client.connection().unwrap().confirms_delivery());
    let deadline = Duration::from_millis(300);
    let result = timeout(BOUND, client.send_confirmed_within(vote(), deadline))
        .await
        .expect("the deadline bounds the call");
    match result {
        Err(TransportError::ConfirmDeadline {
            peer,
            deadline: got,
        }) => {
            assert_eq!(got, deadline);
            assert!(peer.starts_with("publisher"), "{peer}");
        }
        other => panic!("expected ConfirmDeadline, got {other:?}"),
    }
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn client_metadata_is_visible_to_the_server_while_connected() {
    let server_backend = GrpcBackend::new(GrpcOptions::default());
    let client_options = GrpcOptions {
        metadata: vec![
            ("x-tenant".into(), "acme".into()),
            ("x-region".into(), "eu west 1".into()),
        ],
        ..GrpcOptions::default()
    };
    let (handler, _inbound) = channel_handler(4);
    let (server, client, connected) = pair(
        server_backend.clone(),
        GrpcBackend::try_new(client_options).unwrap(),
        handler,
    )
    .await;
    connected.unwrap();
    // The server registers the session just after the client's handshake.
    let info = timeout(BOUND, async {
        loop {
            if let Some(info) = server.connections().pop() {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the session is registered");
    // On the connection, in the order sent, as the application sees it.
    let sent = [("x-tenant", "acme"), ("x-region", "eu west 1")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
    assert_eq!(info.metadata, sent);
    let peer = info.remote_addr.unwrap();
    let metadata = server_backend.client_metadata(peer).expect("metadata kept");
    assert_eq!(metadata.get("x-tenant"), Some("acme"));
    assert_eq!(metadata.get("x-region"), Some("eu west 1"));
    // The back-end's own entries are not application metadata.
    assert_eq!(metadata.get("x-client-id"), None);
    assert_eq!(metadata.entries.len(), 2);
    assert_eq!(metadata.dropped, 0);
    client.disconnect().await.unwrap();
    timeout(BOUND, async {
        while server_backend.client_metadata(peer).is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the entry goes with the connection");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_server_keeps_a_bounded_amount_of_metadata() {
    let server_backend = GrpcBackend::new(GrpcOptions {
        max_metadata_entries: 3,
        max_metadata_bytes: 100,
        ..GrpcOptions::default()
    });
    let mut metadata: Vec<(String, String)> = (0..6)
        .map(|i| (format!("x-k{i}"), "v".repeat(10)))
        .collect();
    // Over the byte bound on its own.
    metadata.insert(0, ("x-big".into(), "b".repeat(8 * 1024)));
    let client_backend = GrpcBackend::try_new(GrpcOptions {
        metadata,
        ..GrpcOptions::default()
    })
    .unwrap();
    let (handler, _inbound) = channel_handler(4);
    let (server, client, connected) = pair(server_backend.clone(), client_backend, handler).await;
    connected.unwrap();
    let peer = server.connections()[0].remote_addr.unwrap();
    let kept = server_backend.client_metadata(peer).unwrap();
    let keys: Vec<&str> = kept.entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["x-k0", "x-k1", "x-k2"]);
    assert_eq!(kept.dropped, 4);
    let bytes: usize = kept.entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(bytes <= 100);
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_or_reserved_metadata_is_a_configuration_error() {
    let cases = [
        ("x-client-id", "spoofed"),
        ("authorization", "Bearer stolen"),
        ("grpc-timeout", "1S"),
        ("X-Upper", "v"),
        ("bad key", "v"),
        ("x-data-bin", "AAAA"),
        ("x-ok", "line\nbreak"),
        ("x-ok", "caf\u{e9}"),
    ];
    for (key, value) in cases {
        let options = GrpcOptions {
            metadata: vec![(key.into(), value.into())],
            ..GrpcOptions::default()
        };
        match GrpcBackend::try_new(options.clone()) {
            Err(TransportError::Config(text)) => assert!(text.contains("metadata"), "{text}"),
            other => panic!("{key:?}={value:?}: expected a config error, got {other:?}"),
        }
        // Built unchecked, dialling refuses it the same way, without retrying.
        let backend = GrpcBackend::new(options);
        let result = timeout(BOUND, backend.dial("127.0.0.1:1")).await.unwrap();
        assert!(matches!(result, Err(TransportError::Config(_))), "{key:?}");
        assert_eq!(backend.open_attempts(), 1);
    }
}

/// A gRPC server that answers every call with `code`, counting calls.
async fn failing_server(code: tonic::Code) -> (String, Arc<AtomicU32>) {
    struct Failing(tonic::Code, Arc<AtomicU32>);
    #[tonic::async_trait]
    impl FrameService for Failing {
        type SessionStream = tokio_stream::Empty<Result<FrameBatch, tonic::Status>>;
        async fn session(
            &self,
            _: tonic::Request<tonic::Streaming<FrameBatch>>,
        ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Err(tonic::Status::new(self.0, "not now"))
        }
    }
    let calls = Arc::new(AtomicU32::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let service = FrameServiceServer::new(Failing(code, calls.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, calls)
}

#[tokio::test]
async fn only_the_configured_status_codes_are_retried() {
    // Retried: RESOURCE_EXHAUSTED is in the set; 1 attempt + 2 retries.
    let (addr, calls) = failing_server(tonic::Code::ResourceExhausted).await;
    let backend = GrpcBackend::new(fast_retry(vec![GrpcCode::ResourceExhausted]));
    let result = timeout(BOUND, backend.dial(&addr)).await.unwrap();
    assert!(result.is_err());
    assert_eq!(backend.open_attempts(), 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Not retried: UNAVAILABLE, the default, is left out of this set.
    let (addr, calls) = failing_server(tonic::Code::Unavailable).await;
    let backend = GrpcBackend::new(fast_retry(vec![GrpcCode::ResourceExhausted]));
    let result = timeout(BOUND, backend.dial(&addr)).await.unwrap();
    assert!(result.is_err());
    assert_eq!(backend.open_attempts(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The default set retries UNAVAILABLE.
    let backend = GrpcBackend::new(fast_retry(GrpcOptions::default().retryable_codes));
    let result = timeout(BOUND, backend.dial(&addr)).await.unwrap();
    assert!(result.is_err());
    assert_eq!(backend.open_attempts(), 3);
    // The codes are written as gRPC names them.
    let read: GrpcOptions =
        serde_json::from_str(r#"{"retryable_codes": ["UNAVAILABLE", "ABORTED"]}"#).unwrap();
    assert_eq!(
        read.retryable_codes,
        [GrpcCode::Unavailable, GrpcCode::Aborted]
    );
    assert!(serde_json::from_str::<GrpcOptions>(r#"{"retryable_codes": ["NOPE"]}"#).is_err());
}

/// A gRPC server requiring client certificates issued by `ca`.
fn mtls_server(ca: &CertificateAuthority) -> GrpcBackend {
    let identity = ca.issue(&["127.0.0.1"], Validity::Long).unwrap();
    let clients = ClientTrust {
        roots: vec![ca.certificate().clone()],
        ..ClientTrust::default()
    };
    GrpcBackend::new(GrpcOptions::default())
        .with_server_tls(&identity, &clients)
        .unwrap()
}

fn mtls_client(ca: &CertificateAuthority, presents: Option<&CertificateAuthority>) -> GrpcBackend {
    let mut trust = ServerTrust::ca(ca.certificate().clone());
    if let Some(issuer) = presents {
        trust = trust.with_identity(issuer.issue(&["seq-a"], Validity::Long).unwrap());
    }
    GrpcBackend::new(fast_retry(GrpcOptions::default().retryable_codes))
        .with_client_tls(&trust)
        .unwrap()
}

#[tokio::test]
async fn mutual_tls_admits_a_trusted_client_certificate() {
    let ca = CertificateAuthority::new("test CA").unwrap();
    let (handler, mut inbound) = channel_handler(4);
    let (server, client, connected) =
        pair(mtls_server(&ca), mtls_client(&ca, Some(&ca)), handler).await;
    connected.unwrap();
    client.send(vote()).await.unwrap();
    let got = timeout(BOUND, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(&*got.from, "seq-a");
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_refuses_a_missing_or_untrusted_client_certificate() {
    let ca = CertificateAuthority::new("test CA").unwrap();
    let other = CertificateAuthority::new("other CA").unwrap();
    for presents in [None, Some(&other)] {
        let (handler, _inbound) = channel_handler(4);
        let client_backend = mtls_client(&ca, presents);
        let (server, client, connected) =
            pair(mtls_server(&ca), client_backend.clone(), handler).await;
        match connected {
            Err(TransportError::Tls { .. }) => {}
            other => panic!("expected a TLS refusal, got {other:?}"),
        }
        assert!(!client.is_connected());
        assert!(server.connections().is_empty());
        // A refused certificate is not retried.
        assert_eq!(client_backend.open_attempts(), 1);
        server.stop().await.unwrap();
    }
}
