//! WebSocket-specific behaviour: the upgrade path, what the binding refuses
//! (text messages, an oversize message before authentication), and `wss://`
//! with a pinned self-signed certificate. The shared suites run over `ws://`
//! through `WsHarness`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use bytes::Bytes;
use prost::Message as _;
use publisher_transport::{
    Message, WsBackend, WsOptions, channel_handler,
    proto::{Payload, rollup::v1::disconnect_message::Reason},
    tls::Identity,
};
use tungstenite::{Message as WsMessage, WebSocket};

use crate::e2e::{
    Harness, Keys, STEP_TIMEOUT, WsHarness, block, bounded, client_config, recv, server_config,
    vote,
};

/// Runs blocking socket work off the runtime, within [`STEP_TIMEOUT`].
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::time::timeout(STEP_TIMEOUT, tokio::task::spawn_blocking(work))
        .await
        .expect("blocking step timed out")
        .expect("blocking step panicked")
}

/// A TCP connection to `addr` whose reads give up after a step's time.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    stream
}

/// A WebSocket upgraded on the default path by a plain tungstenite client.
fn upgraded(addr: SocketAddr) -> WebSocket<TcpStream> {
    let url = format!("ws://{addr}/rollup");
    tungstenite::client(url.as_str(), connect(addr)).unwrap().0
}

/// The `Disconnect` the server sends before closing, read by `ws`.
fn disconnect_of(ws: &mut WebSocket<TcpStream>) -> (i32, String) {
    loop {
        match ws.read().expect("connection ended without a Disconnect") {
            WsMessage::Binary(body) => {
                let message = Message::decode(body).unwrap();
                match message.payload {
                    Some(Payload::Disconnect(disconnect)) => {
                        return (disconnect.reason, disconnect.details);
                    }
                    other => panic!("expected a Disconnect, got {other:?}"),
                }
            }
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_path_gets_404_and_no_session() {
    bounded(async {
        let keys = Keys::new(1);
        let server = WsHarness::server(server_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let response = blocking(move || {
            let mut stream = connect(addr);
            let request = format!(
                "GET /elsewhere HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).unwrap();
            let mut response = String::new();
            // The server closes after its answer.
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        // A client configured for another path is refused the same way.
        let options = WsOptions {
            path: "/other".into(),
            ..Default::default()
        };
        let client = publisher_transport::WsClient::new(
            WsBackend::new(options).unwrap(),
            client_config("c0"),
            Some(keys.client_auth(0)),
        );
        let refused = client.connect(&addr.to_string()).await;
        let err = refused.expect_err("upgrade on another path succeeded");
        assert!(err.to_string().contains("404"), "{err}");
        // A wrong path is not retried as if the server were down.
        assert!(!err.is_transient(), "{err:?}");
        assert!(server.connections().is_empty());
        // The right path still works.
        let good = WsHarness::client(client_config("c0"), Some(keys.client_auth(0)));
        good.connect(&addr.to_string()).await.unwrap();
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_is_a_protocol_error() {
    bounded(async {
        let server = WsHarness::server(server_config(), None);
        let (handler, mut inbound) = channel_handler(8);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        let (reason, details) = blocking(move || {
            let mut ws = upgraded(addr);
            ws.send(WsMessage::text("hello")).unwrap();
            disconnect_of(&mut ws)
        })
        .await;
        assert_eq!(reason, Reason::ProtocolError as i32);
        assert!(details.contains("text message"), "{details}");
        assert!(inbound.try_recv().is_err(), "a text message was delivered");
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_before_authentication_is_refused_unread() {
    bounded(async {
        let keys = Keys::new(1);
        let server = WsHarness::server(server_config(), Some(keys.server_auth()));
        let addr = server.start().await.unwrap();
        let (reason, details) = blocking(move || {
            let mut ws = upgraded(addr);
            // A masked binary frame announcing 10 MiB, of which nothing
            // follows: the refusal cannot have waited for (or reserved) it.
            let mut header = vec![0x82, 0x80 | 127];
            header.extend_from_slice(&(10u64 << 20).to_be_bytes());
            header.extend_from_slice(&[1, 2, 3, 4]);
            ws.get_mut().write_all(&header).unwrap();
            disconnect_of(&mut ws)
        })
        .await;
        assert_eq!(reason, Reason::ProtocolError as i32);
        assert!(
            details.contains(&format!("message size {} exceeds max 16384", 10 << 20)),
            "{details}"
        );
        assert!(server.connections().is_empty());
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_pinned_self_signed_certificate() {
    bounded(async {
        let identity = Identity::self_signed(&["127.0.0.1", "localhost"]).unwrap();
        let (server_backend, client_backend) =
            WsBackend::pinned_pair(&identity, WsOptions::default()).unwrap();
        let keys = Keys::new(1);
        let server = publisher_transport::WsServer::new(
            server_backend,
            server_config(),
            Some(keys.server_auth()),
        );
        let (handler, mut inbound) = channel_handler(8);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        assert_eq!(server.backend_name(), "wss");
        let client = publisher_transport::WsClient::new(
            client_backend,
            client_config("c0"),
            Some(keys.client_auth(0)),
        );
        client
            .connect(&format!("wss://{addr}/rollup"))
            .await
            .unwrap();
        client.send(vote(true)).await.unwrap();
        let received = recv(&mut inbound, "a vote over wss").await;
        assert_eq!(received.message.payload, vote(true).payload);
        // After authentication the limit is the full frame size: a message
        // far above the handshake's 16 KiB arrives whole.
        let big = block(7, Bytes::from(vec![0x5a; 1 << 20]));
        client.send(big.clone()).await.unwrap();
        let received = recv(&mut inbound, "a 1 MiB block over wss").await;
        assert_eq!(received.message.payload, big.payload);
        // A client pinning another certificate is refused by TLS.
        let other = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let (_, stranger) = WsBackend::pinned_pair(&other, WsOptions::default()).unwrap();
        let stranger = publisher_transport::WsClient::new(
            stranger,
            client_config("c1"),
            Some(keys.client_auth(0)),
        );
        let refused =
            tokio::time::timeout(Duration::from_secs(5), stranger.connect(&addr.to_string()))
                .await
                .expect("refusal timed out");
        assert!(refused.is_err(), "{refused:?}");
        server.stop().await.unwrap();
    })
    .await;
}
