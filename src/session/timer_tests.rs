//! The session's timers end to end, in virtual time: a session over an
//! in-memory pipe under a paused clock, its peer played by hand. Tokio
//! advances the clock only when every task waits, so each deadline is
//! observed at exactly the instant it is due, and no test sleeps.

use super::*;
use crate::{
    codec,
    error::DisconnectReason,
    proto::{
        Message, Payload,
        rollup::v1::{Ping, Pong},
    },
};
use prost::Message as _;
use tokio::{
    io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf},
    time::Instant,
};

const SECOND: Duration = Duration::from_secs(1);

/// A session over an in-memory pipe, and the peer's ends of it.
struct Pair {
    connection: Arc<Connection>,
    task: tokio::task::JoinHandle<SessionEnd>,
    peer_reader: StreamFrameReader<ReadHalf<DuplexStream>>,
    peer_writer: WriteHalf<DuplexStream>,
}

fn pair(config: SessionConfig, delivery_acks: bool) -> Pair {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (read, write) = tokio::io::split(ours);
    let metrics = Metrics::new("timers");
    let context = SessionContext::new(
        config,
        Arc::new(HandlerSlot::default()),
        metrics.clone(),
        write_buffer_pool(&metrics),
        None,
    );
    let setup = SessionSetup::plain("peer", delivery_acks);
    let reader = StreamFrameReader::new(read, codec::DEFAULT_MAX_FRAME_SIZE);
    let (connection, task) = start_session(1, reader, StreamFrameWriter(write), setup, context);
    let (peer_read, peer_writer) = tokio::io::split(theirs);
    Pair {
        connection,
        task,
        peer_reader: StreamFrameReader::new(peer_read, codec::DEFAULT_MAX_FRAME_SIZE),
        peer_writer,
    }
}

impl Pair {
    /// The next message the session sends.
    async fn next(&mut self) -> Message {
        let body = self
            .peer_reader
            .read_frame()
            .await
            .expect("a frame")
            .expect("a whole frame");
        Message::decode(body).expect("a message")
    }

    async fn send(&mut self, payload: Payload) {
        let frame = codec::frame_message(&control(payload), codec::DEFAULT_MAX_FRAME_SIZE).unwrap();
        self.peer_writer.write_all(&frame).await.unwrap();
    }
}

fn config() -> SessionConfig {
    SessionConfig {
        read_timeout: 30 * SECOND,
        ping_interval: Some(10 * SECOND),
        ..SessionConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_pinged_every_interval_then_evicted_at_the_read_timeout() {
    let start = Instant::now();
    let mut pair = pair(config(), false);
    for due in [10, 20] {
        let message = pair.next().await;
        assert!(
            matches!(message.payload, Some(Payload::Ping(_))),
            "{message:?}"
        );
        assert_eq!(start.elapsed(), due * SECOND, "ping due at {due} s");
    }
    let message = pair.next().await;
    let Some(Payload::Disconnect(disconnect)) = message.payload else {
        panic!("expected the Disconnect, got {message:?}");
    };
    assert_eq!(
        DisconnectReason::from_proto(disconnect.reason),
        DisconnectReason::ReadTimeout
    );
    assert_eq!(start.elapsed(), 30 * SECOND);
    let end = pair.task.await.unwrap();
    assert_eq!(end.reason, DisconnectReason::ReadTimeout);
    assert!(!end.by_peer);
    assert!(pair.connection.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_peer_answering_pings_stays_for_as_long_as_it_answers() {
    let start = Instant::now();
    let mut pair = pair(config(), false);
    // Ten minutes of answered pings: one every interval, never an eviction.
    for n in 1..=60u32 {
        let message = pair.next().await;
        let Some(Payload::Ping(Ping { timestamp })) = message.payload else {
            panic!("expected a ping, got {message:?}");
        };
        assert_eq!(start.elapsed(), n * 10 * SECOND);
        pair.send(Payload::Pong(Pong { timestamp })).await;
    }
    assert!(!pair.connection.is_closed());
    // The peer pings too: the session answers at once, whatever its timers.
    pair.send(Payload::Ping(Ping { timestamp: 7 })).await;
    let at = start.elapsed();
    let message = pair.next().await;
    assert!(
        matches!(message.payload, Some(Payload::Pong(Pong { timestamp: 7 }))),
        "{message:?}"
    );
    assert_eq!(start.elapsed(), at, "answered without waiting for a timer");
    pair.connection
        .close(DisconnectReason::Requested, "test over");
    let end = pair.task.await.unwrap();
    assert_eq!(end.reason, DisconnectReason::Requested);
}

#[tokio::test(start_paused = true)]
async fn a_confirmed_send_never_acknowledged_fails_at_the_read_timeout() {
    let start = Instant::now();
    let mut pair = pair(config(), true);
    let connection = pair.connection.clone();
    let confirmed = tokio::spawn(async move {
        let block = crate::proto::rollup::v1::L2Block::default();
        connection
            .send_confirmed(control(Payload::L2Block(block)))
            .await
    });
    // The peer answers pings, so the link is not idle, but never acknowledges.
    loop {
        let message = pair.next().await;
        match message.payload {
            Some(Payload::Ping(Ping { timestamp })) => {
                pair.send(Payload::Pong(Pong { timestamp })).await
            }
            Some(Payload::Disconnect(disconnect)) => {
                assert_eq!(
                    DisconnectReason::from_proto(disconnect.reason),
                    DisconnectReason::ReadTimeout
                );
                break;
            }
            _ => {}
        }
    }
    assert_eq!(start.elapsed(), 30 * SECOND);
    match confirmed.await.unwrap() {
        Err(crate::TransportError::Unconfirmed { reason, .. }) => {
            assert_eq!(reason, DisconnectReason::ReadTimeout)
        }
        other => panic!("expected Unconfirmed, got {other:?}"),
    }
}
