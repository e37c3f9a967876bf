//! Received messages as a `Stream`: bounded, with backpressure that
//! reaches the sender and loses nothing, and a filter by kind.

use bytes::Bytes;
use futures::StreamExt;
use publisher_transport::{
    Message, TrySendError,
    proto::{
        MessageKind, Payload,
        rollup::v1::{Decided, XtId},
    },
};

use super::{
    Harness, Keys, STEP_TIMEOUT, block, client_config, identity, number_of, registered,
    server_config,
};

fn decided(n: u8) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Decided(Decided {
            xt_id: Some(XtId {
                hash: Bytes::from(vec![n; 32]),
            }),
            decision: true,
        })),
    }
}

/// While nobody reads the server's stream of 4, the client's queue of 8
/// fills and `try_send` refuses; then every accepted message arrives, in
/// order, through the stream.
pub async fn a_message_stream_pushes_back_and_loses_nothing<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let mut messages = server.messages(4);
    let addr = server.start().await.unwrap();
    let mut config = client_config("a");
    config.send_queue_capacity = 8;
    let client = H::client(config, Some(keys.client_auth(0)));
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    // 16 KiB messages: a few MiB fill the socket buffers on the way.
    let data = Bytes::from(vec![5u8; 16 * 1024]);
    let mut accepted = 0u64;
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match client.try_send(block(accepted, data.clone())) {
            Ok(()) => accepted += 1,
            Err(TrySendError::Full(_)) => break,
            Err(err) => panic!("try_send: {err}"),
        }
        assert!(accepted < 100_000, "the queue never filled");
        if accepted.is_multiple_of(64) {
            // Let the writer drain what the socket takes.
            tokio::task::yield_now().await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "the queue never filled"
            );
        }
    }
    for expected in 0..accepted {
        let inbound = tokio::time::timeout(STEP_TIMEOUT, messages.next())
            .await
            .expect("a message in time")
            .expect("the stream goes on");
        assert_eq!(number_of(&inbound.message), expected);
    }
    assert_eq!(messages.skipped(), 0);
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// A stream of `Decided` only: the client's stream takes those, in order,
/// and counts the others it left out.
pub async fn a_message_stream_takes_only_the_kinds_asked_for<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    let mut decisions = client.messages_of(16, &[MessageKind::Decided]);
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;
    for n in 0..10u8 {
        server
            .send(&identity(0), block(u64::from(n), Bytes::new()))
            .await
            .unwrap();
        server.send(&identity(0), decided(n)).await.unwrap();
    }
    for n in 0..10u8 {
        let inbound = tokio::time::timeout(STEP_TIMEOUT, decisions.recv())
            .await
            .expect("a decision in time")
            .expect("the stream goes on");
        let Some(Payload::Decided(got)) = inbound.message.payload else {
            panic!("not a Decided: {:?}", inbound.message);
        };
        assert_eq!(got.xt_id.unwrap().hash[0], n);
    }
    // The last block was sent before the last decision: all ten are counted.
    assert_eq!(decisions.skipped(), 10);
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}
