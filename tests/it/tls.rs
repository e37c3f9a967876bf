//! TLS over TCP end to end: pinned and CA-issued server certificates, expiry,
//! mutual TLS by CA and by pin, TLS against plain TCP, and PEM files.
#![cfg(feature = "tls")]

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use publisher_transport::{
    ClientAuth, ClientConfig, CodecError, Message, SecretKey, ServerAuth, ServerConfig, TcpBackend,
    TcpOptions, TransportClient, TransportError, TransportServer, TrustStore,
    backend::{Backend, tcp::tls::TcpTlsBackend},
    channel_handler,
    proto::{Payload, rollup::v1::Vote},
    tls::{
        self, ALPN, CertificateAuthority, ClientTrust, Fingerprint, Identity, ServerTrust,
        TlsError, Validity,
    },
};
use rustls::{AlertDescription, CertificateError};

/// Bound of one awaited step.
const STEP: Duration = Duration::from_secs(10);
/// The client's identity in the servers' trust stores.
const PEER: &str = "seq-a";

/// Signing keys for the authenticated handshake on top of TLS.
struct Keys {
    server: Arc<SecretKey>,
    client: Arc<SecretKey>,
}

impl Keys {
    fn new() -> Self {
        Self {
            server: Arc::new(SecretKey::generate()),
            client: Arc::new(SecretKey::generate()),
        }
    }

    fn server_auth(&self) -> ServerAuth {
        let trust = Arc::new(TrustStore::new());
        trust.add(PEER, self.client.public_key().clone()).unwrap();
        ServerAuth::new(self.server.clone(), trust)
    }

    fn client_auth(&self) -> ClientAuth {
        ClientAuth::new(self.client.clone()).with_server_key(self.server.public_key().clone())
    }
}

fn server_settings() -> ServerConfig {
    ServerConfig {
        handshake_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_rate_limit(None)
    }
}

fn client_settings() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        auto_reconnect: false,
        ..ClientConfig::default().with_client_id("client-a")
    }
}

/// Starts a server over `backend`; returns it and the address to dial.
async fn serve<B: Backend>(backend: B, keys: &Keys) -> (TransportServer<B>, String) {
    let server = TransportServer::new(backend, server_settings(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap().to_string();
    (server, addr)
}

/// A TLS server presenting `identity`, verifying clients by `clients`.
async fn tls_server(
    identity: &Identity,
    clients: &ClientTrust,
    keys: &Keys,
) -> (TransportServer<TcpTlsBackend>, String) {
    let config = tls::server_config(identity, clients, &[ALPN]).unwrap();
    serve(
        TcpTlsBackend::new(TcpOptions::default(), Some(config), None),
        keys,
    )
    .await
}

fn tls_client(trust: &ServerTrust, keys: &Keys) -> TransportClient<TcpTlsBackend> {
    let config = tls::client_config(trust, &[ALPN]).unwrap();
    TransportClient::new(
        TcpTlsBackend::new(TcpOptions::default(), None, Some(config)),
        client_settings(),
        Some(keys.client_auth()),
    )
}

/// Connects, bounded by [`STEP`].
async fn connect<B: Backend>(
    client: &TransportClient<B>,
    addr: &str,
) -> Result<(), TransportError> {
    bounded("connect", client.connect(addr)).await
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

/// Polls `condition` until it holds, bounded by [`STEP`].
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    bounded(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// The rustls error somewhere in `err`'s source chain (rustls errors travel
/// inside `io::Error`s, whose `source()` skips the wrapped error itself).
fn rustls_error(err: &TransportError) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// Asserts the client's own TLS handshake refused the server's certificate
/// with `expected`; returns the error text.
fn assert_refused_certificate(
    result: Result<(), TransportError>,
    expected: impl Fn(&CertificateError) -> bool,
) -> String {
    let err = result.expect_err("the server certificate must be refused");
    assert!(
        matches!(err, TransportError::Tls { .. }),
        "not a TLS error: {err:?}"
    );
    match rustls_error(&err) {
        Some(rustls::Error::InvalidCertificate(cert)) if expected(cert) => {}
        other => panic!("unexpected TLS error {other:?} in {err}"),
    }
    let text = err.to_string();
    assert!(text.starts_with("TLS with 127.0.0.1:"), "{text}");
    text
}

fn transport_failures<B: Backend>(server: &TransportServer<B>) -> u64 {
    server
        .metrics()
        .connections_total
        .with_label_values(&["transport_failed"])
        .get()
}

/// The server counts `count` failed transport handshakes and holds no connection.
async fn assert_server_refused<B: Backend>(server: &TransportServer<B>, count: u64) {
    eventually("the server to count the failed TLS handshake", || {
        transport_failures(server) == count
    })
    .await;
    assert!(server.connections().is_empty());
}

/// Asserts the server refused the client's certificate. Under TLS 1.3 the
/// client thinks its handshake finished before the server has checked the
/// certificate, so the refusal reaches the client during the authenticated
/// handshake: as the server's alert, or as a reset when the server closed
/// with the client's first frame unread.
async fn assert_client_refused(
    server: &TransportServer<TcpTlsBackend>,
    client: &TransportClient<TcpTlsBackend>,
    result: Result<(), TransportError>,
    alert: AlertDescription,
) {
    let err = result.expect_err("the client certificate must be refused");
    assert!(!client.is_connected());
    match rustls_error(&err) {
        Some(rustls::Error::AlertReceived(got)) => assert_eq!(*got, alert, "{err}"),
        Some(other) => panic!("unexpected TLS error {other:?} in {err}"),
        None => assert!(
            matches!(&err, TransportError::Codec(CodecError::Io(_))),
            "neither the alert nor a broken pipe: {err:?}"
        ),
    }
    assert_server_refused(server, 1).await;
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

/// Messages flow both ways: client → server, `send` and `broadcast` back.
async fn assert_round_trip<B: Backend>(server: &TransportServer<B>, client: &TransportClient<B>) {
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);

    client.send(vote()).await.unwrap();
    let got = bounded("server receive", inbound.recv()).await.unwrap();
    assert_eq!(&*got.from, PEER);
    assert_eq!(got.message.sender_id, "client-a");
    assert_eq!(got.message.payload, vote().payload);

    server.send(PEER, vote()).await.unwrap();
    let got = bounded("client receive (send)", client_inbound.recv())
        .await
        .unwrap();
    assert_eq!(got.message.payload, vote().payload);

    let report = server.broadcast(vote(), None).unwrap();
    assert_eq!(report.delivered, vec![std::sync::Arc::from(PEER)]);
    let got = bounded("client receive (broadcast)", client_inbound.recv())
        .await
        .unwrap();
    assert_eq!(got.message.sender_id, "publisher");
    assert_eq!(got.message.payload, vote().payload);
}

async fn shut_down<B: Backend>(server: &TransportServer<B>, client: &TransportClient<B>) {
    bounded("disconnect", client.disconnect()).await.unwrap();
    bounded("stop", server.stop()).await.unwrap();
}

#[tokio::test]
async fn self_signed_pinned_server_carries_messages_both_ways() {
    let keys = Keys::new();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    // The pin as an operator would paste it.
    let pin: Fingerprint = identity.fingerprint().to_string().parse().unwrap();
    let client = tls_client(&ServerTrust::pinned(pin), &keys);
    connect(&client, &addr).await.unwrap();
    assert_round_trip(&server, &client).await;
    assert_eq!(transport_failures(&server), 0);
    shut_down(&server, &client).await;
}

#[tokio::test]
async fn fingerprint_mismatch_is_refused() {
    let keys = Keys::new();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let other = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    let client = tls_client(&ServerTrust::pinned(other.fingerprint()), &keys);
    let text = assert_refused_certificate(connect(&client, &addr).await, |err| {
        *err == CertificateError::ApplicationVerificationFailure
    });
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(!client.is_connected());
    assert_server_refused(&server, 1).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ca_issued_server_certificate_is_trusted_through_its_ca() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let identity = ca.issue(&["127.0.0.1"], Validity::Long).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    let client = tls_client(&ServerTrust::ca(ca.certificate().clone()), &keys);
    connect(&client, &addr).await.unwrap();
    assert_round_trip(&server, &client).await;
    shut_down(&server, &client).await;
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_refused() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let other_ca = CertificateAuthority::new("other CA").unwrap();
    let identity = ca.issue(&["127.0.0.1"], Validity::Long).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    let client = tls_client(&ServerTrust::ca(other_ca.certificate().clone()), &keys);
    let text = assert_refused_certificate(connect(&client, &addr).await, |err| {
        *err == CertificateError::UnknownIssuer
    });
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert_server_refused(&server, 1).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ca_issued_certificate_for_another_name_is_refused() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let identity = ca.issue(&["publisher.example"], Validity::Long).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    let client = tls_client(&ServerTrust::ca(ca.certificate().clone()), &keys);
    assert_refused_certificate(connect(&client, &addr).await, |err| {
        matches!(
            err,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    });
    assert_server_refused(&server, 1).await;
    server.stop().await.unwrap();
}

fn is_expired(err: &CertificateError) -> bool {
    // webpki reports the times (CA path); the pinning verifier does not.
    matches!(
        err,
        CertificateError::Expired | CertificateError::ExpiredContext { .. }
    )
}

#[tokio::test]
async fn expired_server_certificate_is_refused_through_a_ca() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let identity = ca.issue(&["127.0.0.1"], Validity::Expired).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    let client = tls_client(&ServerTrust::ca(ca.certificate().clone()), &keys);
    let text = assert_refused_certificate(connect(&client, &addr).await, is_expired);
    assert!(text.contains("certificate expired"), "{text}");
    assert_server_refused(&server, 1).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn expired_server_certificate_is_refused_even_when_pinned() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let identity = ca.issue(&["127.0.0.1"], Validity::Expired).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    let client = tls_client(&ServerTrust::pinned(identity.fingerprint()), &keys);
    // The pinning verifier checks validity itself and, like CA
    // verification, says when the certificate stopped being valid.
    let text = assert_refused_certificate(connect(&client, &addr).await, |err| {
        matches!(err, CertificateError::ExpiredContext { .. })
    });
    assert!(text.contains("certificate expired"), "{text}");
    assert_server_refused(&server, 1).await;
    server.stop().await.unwrap();
}

/// A server requiring client certificates issued by `ca`.
async fn mtls_server(
    ca: &CertificateAuthority,
    keys: &Keys,
) -> (TransportServer<TcpTlsBackend>, String) {
    let identity = ca.issue(&["127.0.0.1"], Validity::Long).unwrap();
    let clients = ClientTrust {
        roots: vec![ca.certificate().clone()],
        ..ClientTrust::default()
    };
    tls_server(&identity, &clients, keys).await
}

#[tokio::test]
async fn mtls_accepts_a_client_certificate_from_the_trusted_ca() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let (server, addr) = mtls_server(&ca, &keys).await;
    let client_identity = ca.issue(&["client-a"], Validity::Long).unwrap();
    let trust = ServerTrust::ca(ca.certificate().clone()).with_identity(client_identity);
    let client = tls_client(&trust, &keys);
    connect(&client, &addr).await.unwrap();
    assert_round_trip(&server, &client).await;
    assert_eq!(transport_failures(&server), 0);
    shut_down(&server, &client).await;
}

#[tokio::test]
async fn mtls_refuses_a_client_without_certificate() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let (server, addr) = mtls_server(&ca, &keys).await;
    let client = tls_client(&ServerTrust::ca(ca.certificate().clone()), &keys);
    let result = connect(&client, &addr).await;
    assert_client_refused(
        &server,
        &client,
        result,
        AlertDescription::CertificateRequired,
    )
    .await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mtls_refuses_a_client_certificate_from_another_ca() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let other_ca = CertificateAuthority::new("other CA").unwrap();
    let (server, addr) = mtls_server(&ca, &keys).await;
    let client_identity = other_ca.issue(&["client-a"], Validity::Long).unwrap();
    let trust = ServerTrust::ca(ca.certificate().clone()).with_identity(client_identity);
    let client = tls_client(&trust, &keys);
    let result = connect(&client, &addr).await;
    assert_client_refused(&server, &client, result, AlertDescription::UnknownCA).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn mtls_refuses_an_expired_client_certificate() {
    let keys = Keys::new();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let (server, addr) = mtls_server(&ca, &keys).await;
    let client_identity = ca.issue(&["client-a"], Validity::Expired).unwrap();
    let trust = ServerTrust::ca(ca.certificate().clone()).with_identity(client_identity);
    let client = tls_client(&trust, &keys);
    let result = connect(&client, &addr).await;
    assert_client_refused(
        &server,
        &client,
        result,
        AlertDescription::CertificateExpired,
    )
    .await;
    server.stop().await.unwrap();
}

/// A server accepting only the client certificate `pinned`.
async fn pinning_server(
    pinned: Fingerprint,
    keys: &Keys,
) -> (TransportServer<TcpTlsBackend>, String, Fingerprint) {
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let clients = ClientTrust {
        pins: vec![pinned],
        ..ClientTrust::default()
    };
    let (server, addr) = tls_server(&identity, &clients, keys).await;
    (server, addr, identity.fingerprint())
}

#[tokio::test]
async fn server_pinning_accepts_the_pinned_client_certificate() {
    let keys = Keys::new();
    let client_identity = Identity::self_signed(&["client-a"]).unwrap();
    let (server, addr, server_pin) = pinning_server(client_identity.fingerprint(), &keys).await;
    let client = tls_client(
        &ServerTrust::pinned(server_pin).with_identity(client_identity),
        &keys,
    );
    connect(&client, &addr).await.unwrap();
    assert_round_trip(&server, &client).await;
    shut_down(&server, &client).await;
}

#[tokio::test]
async fn server_pinning_refuses_another_client_certificate() {
    let keys = Keys::new();
    let pinned = Identity::self_signed(&["client-a"]).unwrap();
    let presented = Identity::self_signed(&["client-a"]).unwrap();
    let (server, addr, server_pin) = pinning_server(pinned.fingerprint(), &keys).await;
    let client = tls_client(
        &ServerTrust::pinned(server_pin).with_identity(presented),
        &keys,
    );
    let result = connect(&client, &addr).await;
    // rustls answers an application verification failure with access_denied.
    assert_client_refused(&server, &client, result, AlertDescription::AccessDenied).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn tls_client_against_plain_server_fails_cleanly() {
    let keys = Keys::new();
    let (server, addr) = serve(TcpBackend::default(), &keys).await;
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let client = tls_client(&ServerTrust::pinned(identity.fingerprint()), &keys);
    let started = Instant::now();
    let err = connect(&client, &addr).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, TransportError::Tls { .. }),
        "not a TLS error: {err:?}"
    );
    assert!(err.to_string().starts_with("TLS with 127.0.0.1:"), "{err}");
    assert!(!client.is_connected());
    // The ClientHello is no valid frame: the server refuses the handshake.
    eventually("the server to count the failed handshake", || {
        server
            .metrics()
            .connections_total
            .with_label_values(&["handshake_failed"])
            .get()
            == 1
    })
    .await;
    assert!(server.connections().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn plain_client_against_tls_server_fails_cleanly() {
    let keys = Keys::new();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let (server, addr) = tls_server(&identity, &ClientTrust::default(), &keys).await;
    let client = TransportClient::new(
        TcpBackend::default(),
        client_settings(),
        Some(keys.client_auth()),
    );
    let started = Instant::now();
    let err = connect(&client, &addr).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // The server's TLS alert is no valid frame, or the server hung up.
    assert!(
        matches!(err, TransportError::Codec(_) | TransportError::Handshake(_)),
        "unexpected error: {err:?}"
    );
    assert!(!client.is_connected());
    assert_server_refused(&server, 1).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn silent_server_is_bounded_by_the_connect_timeout() {
    let keys = Keys::new();
    // Accepts TCP and never answers the ClientHello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let config = tls::client_config(&ServerTrust::pinned(identity.fingerprint()), &[ALPN]).unwrap();
    let client = TransportClient::new(
        TcpTlsBackend::new(TcpOptions::default(), None, Some(config)),
        ClientConfig {
            connect_timeout: Duration::from_millis(300),
            ..client_settings()
        },
        Some(keys.client_auth()),
    );
    let started = Instant::now();
    let err = connect(&client, &addr).await.unwrap_err();
    assert!(
        matches!(err, TransportError::ConnectTimeout { .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    holder.abort();
}

#[tokio::test]
async fn silent_client_is_bounded_by_the_handshake_timeout() {
    let keys = Keys::new();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let config = tls::server_config(&identity, &ClientTrust::default(), &[ALPN]).unwrap();
    let server = TransportServer::new(
        TcpTlsBackend::new(TcpOptions::default(), Some(config), None),
        ServerConfig {
            handshake_timeout: Duration::from_millis(300),
            ..server_settings()
        },
        Some(keys.server_auth()),
    );
    let addr = server.start().await.unwrap();
    // Connects and never sends a ClientHello.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_server_refused(&server, 1).await;
    // The server hung up.
    let mut buf = [0u8; 1];
    let read = bounded(
        "server hang-up",
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.stop().await.unwrap();
}

#[test]
fn pem_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::new("test CA").unwrap();
    let identity = ca.issue(&["127.0.0.1"], Validity::Long).unwrap();
    let cert_path = dir.path().join("chain.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, identity.chain_pem()).unwrap();
    std::fs::write(&key_path, identity.key_pem()).unwrap();

    let chain = tls::load_certs(&cert_path).unwrap();
    assert_eq!(chain, identity.chain);
    assert_eq!(chain.len(), 2);
    assert_eq!(&chain[1], ca.certificate());

    let loaded = Identity::from_pem_files(&cert_path, &key_path).unwrap();
    assert_eq!(loaded.chain, identity.chain);
    assert_eq!(loaded.key_pem(), identity.key_pem());
    assert_eq!(loaded.fingerprint(), identity.fingerprint());
    // The loaded identity is usable as a server certificate.
    tls::server_config(&loaded, &ClientTrust::default(), &[ALPN]).unwrap();
}

#[test]
fn missing_pem_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let shown = missing.display().to_string();

    let err = tls::load_certs(&missing).unwrap_err();
    assert!(
        matches!(&err, TlsError::Io { path, source } if *path == shown
            && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(err.to_string().starts_with(&format!("{shown}: ")), "{err}");

    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    std::fs::write(&cert_path, identity.chain_pem()).unwrap();
    let err = Identity::from_pem_files(&cert_path, &missing).unwrap_err();
    assert!(
        matches!(&err, TlsError::Io { path, .. } if *path == shown),
        "{err:?}"
    );
}

#[test]
fn pem_file_without_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let key_path = dir.path().join("key.pem");
    std::fs::write(&key_path, identity.key_pem()).unwrap();
    let shown = key_path.display().to_string();

    let err = tls::load_certs(&key_path).unwrap_err();
    assert!(
        matches!(&err, TlsError::Pem { what, reason } if *what == shown
            && reason.contains("no CERTIFICATE")),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("{shown}: no CERTIFICATE block"));

    // Certificates where the key should be.
    let cert_path = dir.path().join("cert.pem");
    std::fs::write(&cert_path, identity.chain_pem()).unwrap();
    let err = Identity::from_pem_files(&cert_path, &cert_path).unwrap_err();
    assert!(
        matches!(&err, TlsError::Pem { what, .. } if *what == cert_path.display().to_string()),
        "{err:?}"
    );
    // Swapped arguments: the key file holds no certificate.
    let err = Identity::from_pem_files(&key_path, &cert_path).unwrap_err();
    assert!(
        matches!(&err, TlsError::Pem { what, .. } if *what == shown),
        "{err:?}"
    );
}

/// Writes `bytes` as a private file in `dir`.
fn private_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test]
async fn pkcs12_identity_serves_tls_to_a_pinned_client() {
    let dir = tempfile::tempdir().unwrap();
    let made = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let path = private_file(&dir, "server.p12", &made.to_pkcs12("s3cret").unwrap());
    let loaded = Identity::from_pkcs12(&path, "s3cret").unwrap();
    assert_eq!(loaded.chain, made.chain);
    assert_eq!(loaded.key_pem(), made.key_pem());
    let keys = Keys::new();
    let (server, addr) = tls_server(&loaded, &ClientTrust::default(), &keys).await;
    let client = tls_client(&ServerTrust::pinned(made.fingerprint()), &keys);
    connect(&client, &addr).await.unwrap();
    assert_round_trip(&server, &client).await;
    shut_down(&server, &client).await;
}

#[test]
fn pkcs12_failures_are_typed() {
    use p12_keystore::{
        Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKey,
        PrivateKeyChain,
    };
    use publisher_transport::tls::Pkcs12Problem;
    use rustls::pki_types::pem::PemObject;

    let problem = |result: Result<Identity, TlsError>| match result {
        Err(TlsError::Pkcs12 { problem, .. }) => problem,
        other => panic!("expected a PKCS#12 error, got {other:?}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let path = private_file(&dir, "id.p12", &identity.to_pkcs12("right").unwrap());
    assert_eq!(
        problem(Identity::from_pkcs12(&path, "wrong")),
        Pkcs12Problem::WrongPassword
    );

    // Unreadable: the path is named.
    let missing = dir.path().join("missing.p12");
    match Identity::from_pkcs12(&missing, "right") {
        Err(TlsError::Io { path, .. }) => assert!(path.ends_with("missing.p12"), "{path}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let garbage = private_file(&dir, "garbage.p12", b"not a bundle");
    assert!(matches!(
        problem(Identity::from_pkcs12(&garbage, "right")),
        Pkcs12Problem::Malformed(_)
    ));

    // A certificate without its key, and a key without its certificate.
    let key_der =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem().as_bytes()).unwrap();
    let cert = Certificate::from_der(identity.chain[0].as_ref()).unwrap();
    let mut store = KeyStore::new();
    store.add_entry("cert", KeyStoreEntry::Certificate(cert));
    let certificate_only = private_file(&dir, "cert.p12", &store.writer("pw").write().unwrap());
    assert_eq!(
        problem(Identity::from_pkcs12(&certificate_only, "pw")),
        Pkcs12Problem::MissingKey
    );
    let key = PrivateKey::from_der(key_der.secret_der()).unwrap();
    let mut store = KeyStore::new();
    store.add_entry(
        "key",
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(b"k1".to_vec(), key, [])),
    );
    let key_only = private_file(&dir, "key.p12", &store.writer("pw").write().unwrap());
    assert_eq!(
        problem(Identity::from_pkcs12(&key_only, "pw")),
        Pkcs12Problem::MissingCertificate
    );

    // The legacy encryption older tools write (3DES, HMAC-SHA-1) is read too.
    let key = PrivateKey::from_der(key_der.secret_der()).unwrap();
    let cert = Certificate::from_der(identity.chain[0].as_ref()).unwrap();
    let mut store = KeyStore::new();
    store.add_entry(
        "legacy",
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(b"k2".to_vec(), key, [cert])),
    );
    let legacy = store
        .writer("old")
        .encryption_algorithm(EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc)
        .mac_algorithm(MacAlgorithm::HmacSha1)
        .write()
        .unwrap();
    let legacy = private_file(&dir, "legacy.p12", &legacy);
    assert_eq!(
        Identity::from_pkcs12(&legacy, "old").unwrap().chain,
        identity.chain
    );
    assert_eq!(
        problem(Identity::from_pkcs12(&legacy, "new")),
        Pkcs12Problem::WrongPassword
    );
}
