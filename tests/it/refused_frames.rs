//! A signed frame that is refused delivers nothing (PROTOCOL.md §4.1, §4.4):
//! every message is decoded before the first is handled, so a correctly
//! signed frame with one undecodable message reaches neither the handler
//! nor the control path.

use bytes::Bytes;
use publisher_transport::{
    Message,
    proto::{
        Payload,
        rollup::v1::{Ping, Vote, XtId, disconnect_message::Reason},
    },
};

use crate::raw_peer::{encode, signed_session};

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
/// server sent back before closing, and how many reached the handler.
async fn send_poisoned_frame(first: Message) -> (Vec<Message>, usize) {
    let (server, mut inbound, mut client) = signed_session().await;
    client
        .send(vec![encode(&first), Bytes::from_static(UNDECODABLE)])
        .await;
    let received = client.receive_until_closed().await;
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
