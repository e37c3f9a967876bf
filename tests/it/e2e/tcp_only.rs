//! Tests that need a raw byte stream: malformed framing, a peer that never
//! reads at the socket level, and a Go-mode peer written by hand from
//! WIRE.md (its own Keccak and k256 signing, not this crate's handshake).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures::StreamExt;
use k256::ecdsa::SigningKey;
use prost::Message as _;
use publisher_transport::{
    CodecError, DisconnectReason, FrameCodec, Message, PublicKey, ServerAuth, TcpClient, TcpServer,
    TrustStore, channel_handler,
    codec::frame_message,
    proto::{
        Payload,
        rollup::v1::{DisconnectMessage, HandshakeRequest, HandshakeResponse, Ping},
    },
};
use sha3::{Digest as _, Keccak256};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpSocket, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_util::codec::FramedRead;

use super::{
    Keys, STEP_TIMEOUT, bounded, broadcast_until_dropped, client_config, delivered, eventually,
    identity, number_of, numbered, recv, registered, server_config, vote,
};

/// Go's refusal of an untrusted key, byte for byte.
const GO_UNTRUSTED: &str = "untrusted public key - connection rejected";

/// A TCP peer reading and writing raw frames.
struct RawPeer {
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: OwnedWriteHalf,
    local_addr: SocketAddr,
}

impl RawPeer {
    async fn connect(addr: SocketAddr) -> Self {
        Self::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    fn from_stream(stream: TcpStream) -> Self {
        let local_addr = stream.local_addr().unwrap();
        let (read, writer) = stream.into_split();
        Self {
            reader: FramedRead::new(read, FrameCodec::default()),
            writer,
            local_addr,
        }
    }

    async fn write_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, message: &impl prost::Message) {
        let frame = frame_message(message, usize::MAX).unwrap();
        self.write_raw(&frame).await;
    }

    /// The next frame body; `None` at end of stream (or a reset).
    async fn next(&mut self) -> Option<Bytes> {
        match tokio::time::timeout(STEP_TIMEOUT, self.reader.next())
            .await
            .expect("a frame or the end of the stream")
        {
            Some(Ok(body)) => Some(body),
            None | Some(Err(CodecError::Io(_))) => None,
            Some(Err(err)) => panic!("the server sent a bad frame: {err}"),
        }
    }

    async fn next_message(&mut self) -> Message {
        Message::decode(self.next().await.expect("a frame")).unwrap()
    }

    /// Expects `Message{Disconnect{reason}}`, then the end of the stream.
    async fn expect_disconnect(&mut self, reason: DisconnectReason) -> String {
        let disconnect = match self.next_message().await {
            Message {
                payload: Some(Payload::Disconnect(disconnect)),
                ..
            } => disconnect,
            other => panic!("expected a Disconnect, got {other:?}"),
        };
        assert_eq!(
            DisconnectReason::from_proto(disconnect.reason),
            reason,
            "{disconnect:?}"
        );
        assert_eq!(self.next().await, None, "nothing after the Disconnect");
        disconnect.details
    }
}

fn message(payload: Payload) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(payload),
    }
}

/// Checks that the legitimate client (auth-less, as the server) still
/// sends and receives.
async fn still_works(
    server: &TcpServer,
    client: &TcpClient,
    client_rx: &mut tokio::sync::mpsc::Receiver<publisher_transport::Inbound>,
    server_rx: &mut tokio::sync::mpsc::Receiver<publisher_transport::Inbound>,
    n: u64,
) {
    server.broadcast(numbered(n), None).unwrap();
    assert_eq!(number_of(&recv(client_rx, "broadcast").await.message), n);
    client.send(numbered(n)).await.unwrap();
    assert_eq!(number_of(&recv(server_rx, "from client").await.message), n);
}

/// Oversize, zero-length and garbage frames in a session each close only
/// the offending connection, after `Disconnect{PROTOCOL_ERROR}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_that_connection() {
    bounded(async {
        let mut config = server_config();
        config.max_message_size = 16 * 1024; // the smallest allowed
        let server = TcpServer::tcp(config, None);
        let (handler, mut server_rx) = channel_handler(16);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        let client = TcpClient::tcp(client_config("legit"), None);
        let (client_handler, mut client_rx) = channel_handler(16);
        client.set_handler(client_handler);
        client.connect(&addr.to_string()).await.unwrap();
        eventually("legit registered", || server.connections().len() == 1).await;

        let mut random: [u8; 64] = rand::random();
        random[0] |= 0x80; // announces ≥ 2 GiB: oversize whatever follows
        let mut malformed = 16u32.to_be_bytes().to_vec();
        malformed.extend([0xFF; 16]); // an endless varint: not protobuf
        let cases: [(&str, Vec<u8>, &str); 5] = [
            (
                "oversize",
                20_000u32.to_be_bytes().to_vec(),
                "message size 20000 exceeds max 16384",
            ),
            ("zero length", vec![0; 4], "empty message"),
            ("malformed body", malformed, "malformed Message"),
            ("random bytes", random.to_vec(), "exceeds max 16384"),
            (
                "an HTTP request",
                b"GET / HTTP/1.1\r\nHost: publisher\r\n\r\n".to_vec(),
                // Recognised for what it is, rather than as a huge frame.
                "peer speaks HTTP",
            ),
        ];
        for (n, (what, bytes, expected)) in cases.into_iter().enumerate() {
            let mut peer = RawPeer::connect(addr).await;
            peer.write_raw(&bytes).await;
            let details = peer
                .expect_disconnect(DisconnectReason::ProtocolError)
                .await;
            assert!(details.contains(expected), "{what}: {details}");
            eventually("bad peer unregistered", || server.connections().len() == 1).await;
            still_works(&server, &client, &mut client_rx, &mut server_rx, n as u64).await;
        }
        server.stop().await.unwrap();
    })
    .await;
}

/// Bad handshake frames: an oversize or empty one gets only a
/// `Disconnect{PROTOCOL_ERROR}`; a body that is not a `HandshakeRequest`
/// gets the Go refusal (response, then Disconnect). Other peers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshake_frames_are_refused() {
    bounded(async {
        let keys = Keys::new(1);
        let server = TcpServer::tcp(server_config(), Some(keys.server_auth()));
        let (handler, mut server_rx) = channel_handler(16);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        let client = TcpClient::tcp(client_config("legit"), Some(keys.client_auth(0)));
        client.connect(&addr.to_string()).await.unwrap();
        registered(&server, &identity(0)).await;

        // Before authentication only 16 KiB frames are read.
        let mut peer = RawPeer::connect(addr).await;
        peer.write_raw(&20_000u32.to_be_bytes()).await;
        let details = peer
            .expect_disconnect(DisconnectReason::ProtocolError)
            .await;
        assert!(details.contains("exceeds max 16384"), "{details}");

        let mut peer = RawPeer::connect(addr).await;
        peer.write_raw(&[0; 4]).await;
        let details = peer
            .expect_disconnect(DisconnectReason::ProtocolError)
            .await;
        assert!(details.contains("empty message"), "{details}");

        let mut peer = RawPeer::connect(addr).await;
        let mut malformed = 16u32.to_be_bytes().to_vec();
        malformed.extend([0xFF; 16]);
        peer.write_raw(&malformed).await;
        let response = HandshakeResponse::decode(peer.next().await.unwrap()).unwrap();
        assert!(!response.accepted);
        assert!(response.session_id.is_empty());
        let details = peer
            .expect_disconnect(DisconnectReason::ProtocolError)
            .await;
        assert_eq!(details, response.error);

        client.send(vote(true)).await.unwrap();
        assert_eq!(&*recv(&mut server_rx, "vote").await.from, identity(0));
        assert_eq!(server.connections().len(), 1);
        server.stop().await.unwrap();
    })
    .await;
}

/// A peer that never reads, with a small receive buffer: the server drops
/// it once its queue is full, and the fast clients miss nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_slow_consumer_is_dropped() {
    bounded(async {
        let mut config = server_config();
        config.send_queue_capacity = 16;
        config.write_timeout = Duration::from_secs(2);
        config.stop_timeout = Duration::from_secs(2);
        let server = TcpServer::tcp(config, None);
        let addr = server.start().await.unwrap();

        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let slow = RawPeer::from_stream(socket.connect(addr).await.unwrap());
        let mut fast = Vec::new();
        let mut clients = Vec::new();
        for i in 0..2 {
            let client = TcpClient::tcp(client_config(&format!("fast{i}")), None);
            let (handler, rx) = channel_handler(4);
            client.set_handler(handler);
            client.connect(&addr.to_string()).await.unwrap();
            clients.push(client);
            fast.push(rx);
        }
        eventually("all registered", || server.connections().len() == 3).await;
        let infos = server.connections();
        let slow_identity = infos
            .iter()
            .find(|c| c.remote_addr == Some(slow.local_addr))
            .expect("the raw peer")
            .identity
            .clone();
        let mut fast: Vec<_> = infos
            .into_iter()
            .map(|c| c.identity)
            .filter(|id| *id != slow_identity)
            .zip(fast)
            .collect();
        let sent = broadcast_until_dropped(&server, &slow_identity, &mut fast, 64 * 1024).await;
        assert!(sent > 16, "the queue alone holds 16 ({sent})");
        let report = server.broadcast(numbered(sent + 1), None).unwrap();
        assert!(!delivered(&report).contains(&slow_identity), "{report:?}");
        for (_, rx) in &mut fast {
            assert_eq!(number_of(&recv(rx, "after").await.message), sent + 1);
        }
        drop(slow);
        server.stop().await.unwrap();
    })
    .await;
}

/// A Go-mode handshake request built by hand from WIRE.md.
fn go_request(key: &SigningKey, client_id: &str, skew: i64) -> HandshakeRequest {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let timestamp = now.as_nanos() as i64 + skew;
    let nonce: [u8; 16] = rand::random();
    let mut data = (timestamp as u64).to_be_bytes().to_vec();
    data.extend_from_slice(&nonce);
    let digest = Keccak256::digest(&data);
    let (signature, recovery) = key.sign_prehash_recoverable(&digest).unwrap();
    let mut sig = signature.to_bytes().to_vec();
    sig.push(recovery.to_byte()); // 0 or 1, not 27/28
    HandshakeRequest {
        timestamp,
        public_key: Bytes::copy_from_slice(key.verifying_key().to_encoded_point(true).as_bytes()),
        signature: sig.into(),
        client_id: client_id.into(),
        nonce: Bytes::copy_from_slice(&nonce),
    }
}

fn go_key() -> (SigningKey, PublicKey) {
    let key = SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
    let public = PublicKey::from_slice(key.verifying_key().to_encoded_point(true).as_bytes());
    (key, public.unwrap())
}

/// A hand-written Go peer: its handshake is answered in Go mode (no
/// extension fields), then it exchanges plain `Message` frames, gets a
/// `Pong` for its `Ping`, and its `Disconnect` ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handwritten_go_peer_speaks_with_the_server() {
    bounded(async {
        let keys = Keys::new(0);
        let (go_key, go_public) = go_key();
        keys.trust.add_go_compatible("seq-go", go_public).unwrap();
        let server = TcpServer::tcp(server_config(), Some(keys.server_auth()));
        let (handler, mut inbound) = channel_handler(16);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();

        let mut peer = RawPeer::connect(addr).await;
        peer.send(&go_request(&go_key, "go-peer", 0)).await;
        let body = peer.next().await.expect("a response");
        let response = HandshakeResponse::decode(body.clone()).unwrap();
        assert!(response.accepted, "{response:?}");
        assert_eq!(response.error, "");
        let nanos = response
            .session_id
            .strip_prefix("seq-go-")
            .expect("<identity>-<unix nanos>");
        assert!(nanos.parse::<i64>().is_ok(), "{nanos}");
        assert_eq!(
            response.encode_to_vec(),
            body,
            "a Go request gets a bare Go response"
        );
        registered(&server, "seq-go").await;
        let info = &server.connections()[0];
        assert_eq!(info.client_id.as_deref(), Some("go-peer"));
        assert!(!info.signed_frames);

        peer.send(&Message {
            sender_id: "go-peer".into(),
            ..vote(true)
        })
        .await;
        let got = recv(&mut inbound, "the Go peer's vote").await;
        assert_eq!(&*got.from, "seq-go");
        assert_eq!(got.message.sender_id, "go-peer");

        peer.send(&message(Payload::Ping(Ping { timestamp: 42 })))
            .await;
        match peer.next_message().await.payload {
            Some(Payload::Pong(pong)) => assert_eq!(pong.timestamp, 42),
            other => panic!("expected a Pong, got {other:?}"),
        }

        server.broadcast(numbered(1), None).unwrap();
        let got = peer.next_message().await;
        assert_eq!(got.sender_id, "publisher");
        assert_eq!(number_of(&got), 1);
        server.send("seq-go", numbered(2)).await.unwrap();
        assert_eq!(number_of(&peer.next_message().await), 2);

        let connection = server.manager().get("seq-go").unwrap();
        peer.send(&message(Payload::Disconnect(DisconnectMessage {
            reason: DisconnectReason::Requested.to_proto() as i32,
            details: "bye".into(),
        })))
        .await;
        tokio::time::timeout(STEP_TIMEOUT, connection.closed())
            .await
            .unwrap();
        let end = connection.end().unwrap();
        assert_eq!(
            (end.reason, end.details.as_str(), end.by_peer),
            (DisconnectReason::Requested, "bye", true)
        );
        assert_eq!(peer.next().await, None);
        server.stop().await.unwrap();
    })
    .await;
}

/// Go's refusals, on the wire: `HandshakeResponse{accepted: false, error}`,
/// then `Message{Disconnect{AUTH_FAILURE, error}}`, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handwritten_go_peer_sees_go_refusals() {
    bounded(async {
        let trust = Arc::new(TrustStore::new());
        let (trusted, trusted_public) = go_key();
        trust.add_go_compatible("seq-go", trusted_public).unwrap();
        let (stranger, _) = go_key();
        let server = TcpServer::tcp(
            server_config(),
            Some(ServerAuth::new(
                Arc::new(publisher_transport::SecretKey::generate()),
                trust,
            )),
        );
        let addr = server.start().await.unwrap();
        let minute = 60_000_000_000;
        let cases = [
            (&stranger, 0, GO_UNTRUSTED),
            (&trusted, -minute, "handshake timestamp too old"),
            (&trusted, minute, "handshake timestamp too far in future"),
        ];
        for (key, skew, expected) in cases {
            let mut peer = RawPeer::connect(addr).await;
            peer.send(&go_request(key, "go-peer", skew)).await;
            let response = HandshakeResponse::decode(peer.next().await.unwrap()).unwrap();
            assert_eq!(
                response,
                HandshakeResponse {
                    accepted: false,
                    error: expected.into(),
                    session_id: String::new(),
                }
            );
            let details = peer.expect_disconnect(DisconnectReason::AuthFailure).await;
            assert_eq!(details, expected);
        }
        assert!(server.connections().is_empty());
        server.stop().await.unwrap();
    })
    .await;
}
