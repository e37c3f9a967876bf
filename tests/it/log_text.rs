//! Text a peer supplies reaches the log cut short and with control
//! characters escaped, so it can neither forge log lines nor flood the log.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use publisher_transport::{
    Message, ServerConfig, TcpServer,
    codec::{DEFAULT_MAX_FRAME_SIZE, encode_message},
    proto::{Payload, rollup::v1::DisconnectMessage},
};
use tokio::{io::AsyncWriteExt, net::TcpStream, time::timeout};

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// Current-thread runtime: the server's tasks run on this thread, under the
// subscriber set for it.
#[tokio::test(flavor = "current_thread")]
async fn peer_disconnect_details_cannot_forge_or_flood_log_lines() {
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = TcpServer::tcp(
        ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_rate_limit(None),
        None,
    );
    let addr = server.start().await.unwrap();
    let mut peer = TcpStream::connect(addr).await.unwrap();
    let details = format!(
        "bye\nINFO forged: admin logged in\x1b[2J{}",
        "x".repeat(100_000)
    );
    let disconnect = Message {
        sender_id: String::new(),
        payload: Some(Payload::Disconnect(DisconnectMessage {
            reason: 1,
            details,
        })),
    };
    let mut frame = BytesMut::new();
    encode_message(&disconnect, DEFAULT_MAX_FRAME_SIZE, &mut frame).unwrap();
    peer.write_all(&frame).await.unwrap();

    timeout(Duration::from_secs(10), async {
        while !sink.text().contains("peer disconnected") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the server logs the peer's disconnect");
    server.stop().await.unwrap();

    let log = sink.text();
    let line = log
        .lines()
        .find(|line| line.contains("peer disconnected"))
        .unwrap();
    assert!(line.contains(r"bye\nINFO forged"), "{line}");
    assert!(line.contains(r"\u{1b}[2J"), "{line}");
    assert!(!log.contains('\x1b'), "raw escape in the log");
    assert!(
        !log.lines().any(|line| line.starts_with("INFO forged")),
        "a forged line: {log}"
    );
    assert!(line.len() < 2_000, "{} bytes in one line", line.len());
}
