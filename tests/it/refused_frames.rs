//! A signed frame that is refused delivers nothing (PROTOCOL.md §4.1, §4.4):
//! every message is decoded before the first is handled, so a correctly
//! signed frame with one undecodable message reaches neither the handler
//! nor the control path.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use publisher_transport::{
    FrameCodec, Message, SecretKey, ServerAuth, ServerConfig, TcpServer, TrustStore,
    channel_handler,
    codec::{RawFrame, frame_body},
    handshake::{ClientHandshake, ClientHandshakeConfig},
    proto::{
        Payload,
        rollup::v1::{Ping, Vote, XtId, disconnect_message::Reason},
    },
    signed::{Audience, FrameOpener, seal},
};
use tokio::{net::TcpStream, time::timeout};
use tokio_util::codec::Framed;

const BOUND: Duration = Duration::from_secs(10);

/// Bytes that do not decode as a `Message`: field 1 announces five bytes of
/// string and the frame ends after one.
const UNDECODABLE: &[u8] = &[0x0a, 0x05, 0x61];

fn vote() -> Message {
    Message {
        sender_id: "raw".into(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from_static(&[0, 0, 0, 1]),
            xt_id: Some(XtId {
                hash: Bytes::from_static(&[7; 32]),
            }),
            vote: true,
        })),
    }
}

fn ping() -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Ping(Ping { timestamp: 1 })),
    }
}

/// Opens a signed session by hand, sends one correctly signed frame holding
/// `first` and then an undecodable message, and returns every message the
/// server sent back before closing, opened and decoded.
async fn send_poisoned_frame(first: Message) -> (Vec<Message>, usize) {
    let client_key = Arc::new(SecretKey::generate());
    let server_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", client_key.public_key().clone()).unwrap();
    let server = TcpServer::new(
        Default::default(),
        ServerConfig::default().with_listen_addr("127.0.0.1:0"),
        Some(ServerAuth::new(server_key.clone(), trust)),
    );
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();

    let stream = TcpStream::connect(addr).await.unwrap();
    let mut framed = Framed::new(stream, FrameCodec::default());
    let mut config = ClientHandshakeConfig::new(client_key.clone(), "raw");
    config.expected_server_key = Some(server_key.public_key().clone());
    let handshake = ClientHandshake::start(config, std::time::SystemTime::now(), rand::random(), 1);
    let request = frame_body(handshake.request(), 1 << 20).unwrap();
    framed.send(RawFrame(request)).await.unwrap();
    let response = timeout(BOUND, framed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let session = handshake.finish(&response).unwrap();
    let signed = session.signed_frames.expect("signed frames negotiated");
    let mut opener = FrameOpener::new(
        &signed,
        client_key.public_key().clone(),
        session.identity.clone(),
        Default::default(),
    );

    let audience = Audience::Unicast {
        recipient: server_key.public_key().clone(),
        session: signed.session_tag,
    };
    let frame = seal(
        &client_key,
        Default::default(),
        signed.local_floors.unicast,
        &audience,
        vec![
            Bytes::from(first.encode_to_vec()),
            Bytes::from_static(UNDECODABLE),
        ],
    );
    let bytes = frame_body(&frame.encode_to_vec(), 1 << 20).unwrap();
    framed.send(RawFrame(bytes)).await.unwrap();

    let mut received = Vec::new();
    while let Some(Ok(body)) = timeout(BOUND, framed.next()).await.unwrap() {
        for encoded in opener.open(&body).expect("the server's frames are signed") {
            received.push(Message::decode(encoded).unwrap());
        }
    }
    // The session is over: whatever the handler was given is in the channel.
    let mut delivered = 0;
    while inbound.try_recv().is_ok() {
        delivered += 1;
    }
    server.stop().await.unwrap();
    (received, delivered)
}

fn assert_refused_as_malformed(received: &[Message]) {
    let [
        Message {
            payload: Some(Payload::Disconnect(disconnect)),
            ..
        },
    ] = received
    else {
        panic!("expected only a Disconnect, got {received:?}");
    };
    assert_eq!(disconnect.reason, Reason::ProtocolError as i32);
    assert!(
        disconnect.details.starts_with("malformed signed frame: "),
        "{}",
        disconnect.details
    );
}

#[tokio::test]
async fn an_application_message_before_an_undecodable_one_is_not_delivered() {
    let (received, delivered) = send_poisoned_frame(vote()).await;
    assert_refused_as_malformed(&received);
    assert_eq!(delivered, 0, "the vote reached the handler");
}

#[tokio::test]
async fn a_ping_before_an_undecodable_message_is_not_answered() {
    let (received, delivered) = send_poisoned_frame(ping()).await;
    // A Pong before the Disconnect would mean the Ping was handled.
    assert_refused_as_malformed(&received);
    assert_eq!(delivered, 0);
}
