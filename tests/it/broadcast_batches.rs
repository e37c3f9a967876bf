//! Signed broadcasts made while a recipient's writer is busy share one
//! frame (one signature), and that never reorders a connection's messages
//! nor hides a broadcast from a peer that joined in between.
//!
//! The recipient is a hand-driven client with a tiny receive buffer: until
//! it reads, the server's writer is held up in a large first frame, and
//! everything broadcast meanwhile waits behind it.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use publisher_transport::{
    ClientAuth, ClientConfig, Message, SecretKey, TcpClient, channel_handler,
};

use crate::{
    e2e::{block, eventually, number_of, registered},
    raw_peer::{RawClient, signed_session_with},
};

/// Larger than the server's send buffer can take (4 MiB at most here) plus
/// the client's receive buffer: the writer is still writing it when the
/// test's later broadcasts are made.
const HOLD_UP: usize = 6 * 1024 * 1024;
const BOUND: Duration = Duration::from_secs(30);

fn numbered(n: u64) -> Message {
    block(n, Bytes::from(vec![n as u8; 100]))
}

/// A server and a hand-driven client, `seq-a`, registered, whose tiny
/// receive buffer holds the server's writer up until it reads.
async fn slow_reader() -> (
    publisher_transport::TcpServer,
    tokio::sync::mpsc::Receiver<publisher_transport::Inbound>,
    RawClient,
) {
    let (server, inbound, client) = signed_session_with(Some(4096)).await;
    registered(&server, "seq-a").await;
    (server, inbound, client)
}

/// The number of the next message `inbox` gets, within 10 s.
async fn next_number(inbox: &mut tokio::sync::mpsc::Receiver<publisher_transport::Inbound>) -> u64 {
    let got = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .expect("a message in time")
        .expect("a message");
    number_of(&got.message)
}

/// Broadcasts a first message so large that the writer of `seq-a` is still
/// writing it when the test goes on, and waits until that writer took it.
async fn hold_up_the_writer(server: &publisher_transport::TcpServer) {
    server
        .broadcast(block(0, Bytes::from(vec![7; HOLD_UP])), None)
        .unwrap();
    let connection = server.manager().get("seq-a").expect("registered");
    eventually("the writer took the first frame", || {
        connection.queued() == 0
    })
    .await;
}

/// Frames (as numbers of their messages) until `count` messages came.
async fn frames(client: &mut RawClient, count: usize) -> Vec<Vec<u64>> {
    numbered_frames(client, count)
        .await
        .into_iter()
        .map(|(_, numbers)| numbers)
        .collect()
}

/// Frames as their sequence numbers and their messages' numbers, until
/// `count` messages came.
async fn numbered_frames(client: &mut RawClient, count: usize) -> Vec<(u64, Vec<u64>)> {
    let mut frames = Vec::new();
    let mut seen = 0;
    while seen < count {
        let (sequence, messages) = client.receive().await.expect("the server's frames");
        seen += messages.len();
        let numbers = messages
            .iter()
            .map(|m| number_of(&Message::decode(&m[..]).unwrap()))
            .collect();
        frames.push((sequence, numbers));
    }
    frames
}

/// An ordinary signed client trusted as `seq-b`, connected, feeding `inbox`.
async fn second_client(
    server: &publisher_transport::TcpServer,
    raw: &RawClient,
) -> (
    TcpClient,
    tokio::sync::mpsc::Receiver<publisher_transport::Inbound>,
) {
    let key = std::sync::Arc::new(SecretKey::generate());
    let trust = server.trust().expect("an authenticated server");
    trust.add("seq-b", key.public_key().clone()).unwrap();
    let client = TcpClient::tcp(
        ClientConfig::default().with_client_id("seq-b"),
        Some(ClientAuth::new(key).with_server_key(raw.server_key.clone())),
    );
    let (handler, inbox) = channel_handler(64);
    client.set_handler(handler);
    client
        .connect(&server.local_addr().unwrap().to_string())
        .await
        .unwrap();
    registered(server, "seq-b").await;
    (client, inbox)
}

#[tokio::test]
async fn broadcasts_behind_a_busy_writer_share_frames_and_unicasts_fence_them() {
    tokio::time::timeout(BOUND, async {
        let (server, _inbound, mut client) = slow_reader().await;
        hold_up_the_writer(&server).await;
        for n in 1..=50 {
            let report = server.broadcast(numbered(n), None).unwrap();
            assert!(report.dropped.is_empty(), "{report:?}");
        }
        server.send("seq-a", numbered(51)).await.unwrap();
        for n in 52..=100 {
            server.broadcast(numbered(n), None).unwrap();
        }

        let frames = frames(&mut client, 101).await;
        let order: Vec<u64> = frames.iter().flatten().copied().collect();
        assert_eq!(order, (0..=100).collect::<Vec<_>>(), "one order");
        // The broadcasts made meanwhile share a frame; the unicast fences
        // it, and a new one takes the broadcasts after it. (The first few
        // may still have joined the large first frame, had its writer not
        // sealed it yet.)
        let unicast = frames.iter().position(|f| f == &[51]).expect("alone");
        assert!(unicast <= 2, "at most two frames before it: {frames:?}");
        assert_eq!(frames[unicast + 1..], [(52..=100).collect::<Vec<_>>()]);
        server.stop().await.unwrap();
    })
    .await
    .expect("within the bound");
}

#[tokio::test]
async fn a_peer_that_joins_gets_every_broadcast_made_after_it_joined() {
    tokio::time::timeout(BOUND, async {
        let (server, _inbound, mut client) = slow_reader().await;
        hold_up_the_writer(&server).await;
        server.broadcast(numbered(1), None).unwrap();

        // A second, ordinary client joins while the first batch is open.
        let (late, mut inbox) = second_client(&server, &client).await;
        let report = server.broadcast(numbered(2), None).unwrap();
        assert_eq!(report.delivered.len(), 2, "{report:?}");

        assert_eq!(next_number(&mut inbox).await, 2, "made after it joined");
        // Its own batch, not the open one, which `seq-b` has no place in.
        let frames = frames(&mut client, 3).await;
        assert_eq!(frames.concat(), [0, 1, 2]);
        assert_eq!(frames.last(), Some(&vec![2]), "{frames:?}");
        late.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await
    .expect("within the bound");
}

/// Batches a fast peer's writer seals at once, and batches only a lagging
/// peer gets, which its writer seals much later: the lagging peer still gets
/// its broadcasts' sequence numbers in order (numbers are drawn as batches
/// open), so they never fall behind its replay window.
#[tokio::test]
async fn a_lagging_peer_gets_broadcast_sequence_numbers_in_order() {
    tokio::time::timeout(BOUND, async {
        let (server, _inbound, mut client) = slow_reader().await;
        let (fast, mut inbox) = second_client(&server, &client).await;
        hold_up_the_writer(&server).await;
        assert_eq!(next_number(&mut inbox).await, 0);
        // Alternately to `seq-a` alone and to both: every one opens a batch.
        for n in 1..=20 {
            let exclude = (n % 2 == 1).then_some("seq-b");
            server.broadcast(numbered(n), exclude).unwrap();
            if exclude.is_none() {
                // The fast peer's writer sealed that batch already.
                assert_eq!(next_number(&mut inbox).await, n);
            }
        }
        let frames = numbered_frames(&mut client, 21).await;
        let order: Vec<u64> = frames.iter().flat_map(|(_, n)| n.clone()).collect();
        assert_eq!(order, (0..=20).collect::<Vec<_>>());
        let sequences: Vec<u64> = frames.iter().map(|(s, _)| *s).collect();
        assert!(sequences.is_sorted(), "in order: {sequences:?}");
        fast.disconnect().await.unwrap();
        server.stop().await.unwrap();
    })
    .await
    .expect("within the bound");
}
