//! TLS protocol versions: TLS 1.3 only by default, TLS 1.2 only when asked
//! for, on both the server's and the client's side.
#![cfg(feature = "tls")]

use std::{sync::Arc, time::Duration};

use publisher_transport::{
    ClientConfig, ServerConfig, TcpOptions, TransportClient, TransportError, TransportServer,
    backend::tcp::tls::TcpTlsBackend,
    tls::{self, ALPN, CertificateAuthority, ClientTrust, Identity, ServerTrust, Validity},
};
use rustls::{
    ProtocolVersion, RootCertStore,
    pki_types::{PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const STEP: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server of this crate presenting a CA-issued certificate.
async fn server(
    ca: &CertificateAuthority,
    allow_tls12: bool,
) -> (TransportServer<TcpTlsBackend>, String) {
    let identity = ca.issue(&["127.0.0.1"], Validity::Long).unwrap();
    let clients = ClientTrust {
        allow_tls12,
        ..ClientTrust::default()
    };
    let config = tls::server_config(&identity, &clients, &[ALPN]).unwrap();
    let server = TransportServer::new(
        TcpTlsBackend::new(TcpOptions::default(), Some(config), None),
        ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_rate_limit(None),
        None,
    );
    let addr = server.start().await.unwrap().to_string();
    (server, addr)
}

/// A plain rustls client speaking TLS 1.2 only, trusting `ca`: the TLS
/// version it negotiated with `addr`, or the handshake error.
async fn tls12_only_handshake(
    ca: &CertificateAuthority,
    addr: &str,
) -> Result<Option<ProtocolVersion>, std::io::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.certificate().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(stream.get_ref().1.protocol_version())
}

#[tokio::test]
async fn a_tls12_only_client_is_refused_unless_tls12_is_allowed() {
    let ca = CertificateAuthority::new("test CA").unwrap();

    let (strict, addr) = server(&ca, false).await;
    let refused = timeout(STEP, tls12_only_handshake(&ca, &addr))
        .await
        .unwrap();
    let err = refused.expect_err("a TLS 1.3-only server must refuse TLS 1.2");
    assert!(
        err.to_string().to_lowercase().contains("protocolversion"),
        "{err}"
    );
    strict.stop().await.unwrap();

    let (lenient, addr) = server(&ca, true).await;
    let version = timeout(STEP, tls12_only_handshake(&ca, &addr))
        .await
        .unwrap()
        .expect("TLS 1.2 allowed");
    assert_eq!(version, Some(ProtocolVersion::TLSv1_2));
    lenient.stop().await.unwrap();
}

/// A plain rustls server speaking TLS 1.2 only: its address, and a task that
/// reports the version each handshake negotiated (or its error) and then
/// holds the connection open.
async fn tls12_only_server(
    identity: &Identity,
) -> (
    String,
    tokio::sync::mpsc::Receiver<Result<ProtocolVersion, String>>,
) {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            identity.chain.clone(),
            PrivateKeyDer::from_pem_slice(identity.key_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut held = Vec::new();
        // Two clients in the test; the task ends with the runtime.
        for _ in 0..2 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            match acceptor.accept(tcp).await {
                Ok(stream) => {
                    let version = stream.get_ref().1.protocol_version().unwrap();
                    held.push(stream);
                    let _ = tx.send(Ok(version)).await;
                }
                Err(err) => {
                    let _ = tx.send(Err(err.to_string())).await;
                }
            }
        }
        std::future::pending::<()>().await;
    });
    (addr, rx)
}

fn client(ca: &CertificateAuthority, allow_tls12: bool) -> TransportClient<TcpTlsBackend> {
    let trust = ServerTrust {
        allow_tls12,
        ..ServerTrust::ca(ca.certificate().clone())
    };
    let config = tls::client_config(&trust, &[ALPN]).unwrap();
    TransportClient::new(
        TcpTlsBackend::new(TcpOptions::default(), None, Some(config)),
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            auto_reconnect: false,
            ..ClientConfig::default()
        },
        None,
    )
}

#[tokio::test]
async fn the_client_refuses_a_tls12_server_unless_tls12_is_allowed() {
    let ca = CertificateAuthority::new("test CA").unwrap();
    let identity = ca.issue(&["127.0.0.1"], Validity::Long).unwrap();
    let (addr, mut handshakes) = tls12_only_server(&identity).await;

    let strict = client(&ca, false);
    let err = timeout(STEP, strict.connect(&addr))
        .await
        .unwrap()
        .expect_err("a TLS 1.3-only client must refuse a TLS 1.2 server");
    assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
    let seen = timeout(STEP, handshakes.recv()).await.unwrap().unwrap();
    assert!(seen.is_err(), "the server saw {seen:?}");

    let lenient = client(&ca, true);
    timeout(STEP, lenient.connect(&addr))
        .await
        .unwrap()
        .expect("TLS 1.2 allowed");
    let seen = timeout(STEP, handshakes.recv()).await.unwrap().unwrap();
    assert_eq!(seen, Ok(ProtocolVersion::TLSv1_2));
    lenient.disconnect().await.unwrap();
}
