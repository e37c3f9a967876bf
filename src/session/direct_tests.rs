//! Direct writes: when a message leaves from the sending task, and that
//! what the transport does not take still arrives whole and in order.

use super::*;
use crate::{
    codec,
    pipe::DirectWrite,
    proto::{Message, Payload, rollup::v1::Vote},
};
use bytes::{Buf, Bytes};
use prost::Message as _;
use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
};
use tokio::{
    io::{AsyncWriteExt, DuplexStream, WriteHalf},
    sync::{Notify, mpsc},
};

/// The outgoing wire as one log, in the order bytes left, whether the
/// writer task or a direct write sent them.
struct Wire {
    log: Mutex<Vec<u8>>,
    /// Bytes a direct write takes at most (0: it takes nothing).
    direct_takes: AtomicUsize,
    direct_writes: AtomicUsize,
    writer_writes: AtomicUsize,
    changed: Notify,
}

impl Wire {
    fn append(&self, bytes: &[u8]) {
        self.log.lock().unwrap().extend_from_slice(bytes);
        self.changed.notify_waiters();
    }

    /// The messages of the whole frames on the wire so far.
    fn messages(&self) -> Vec<Message> {
        let log = self.log.lock().unwrap();
        let mut rest = &log[..];
        let mut messages = Vec::new();
        while rest.len() >= codec::LENGTH_PREFIX_LEN {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            if rest.len() < 4 + len {
                break;
            }
            rest.advance(4);
            messages.push(Message::decode(&rest[..len]).expect("a whole message"));
            rest.advance(len);
        }
        messages
    }

    /// Waits until `count` messages are on the wire, and returns them.
    async fn await_messages(&self, count: usize) -> Vec<Message> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let messages = self.messages();
                if messages.len() >= count {
                    return messages;
                }
                changed.await;
            }
        })
        .await
        .expect("the messages within 10 s")
    }
}

impl DirectWrite for Wire {
    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.direct_writes.fetch_add(1, Ordering::Relaxed);
        let take = data.len().min(self.direct_takes.load(Ordering::Relaxed));
        if take == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.append(&data[..take]);
        Ok(take)
    }
}

struct WireWriter(Arc<Wire>);

impl FrameWriter for WireWriter {
    async fn write_segments(&mut self, segments: &[Bytes]) -> io::Result<()> {
        self.0.writer_writes.fetch_add(1, Ordering::Relaxed);
        for segment in segments {
            self.0.append(segment);
        }
        Ok(())
    }

    async fn shutdown(&mut self, _: Option<(DisconnectReason, &str)>) -> io::Result<()> {
        Ok(())
    }

    fn direct(&self) -> Option<Arc<dyn DirectWrite>> {
        Some(self.0.clone())
    }
}

struct Session {
    connection: Arc<Connection>,
    wire: Arc<Wire>,
    handled: mpsc::UnboundedReceiver<Message>,
    peer: WriteHalf<DuplexStream>,
}

fn session(delivery_acks: bool) -> Session {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (read, _) = tokio::io::split(ours);
    let (_, peer) = tokio::io::split(theirs);
    let metrics = Metrics::new("direct");
    let handlers = Arc::new(HandlerSlot::default());
    let (handled_tx, handled) = mpsc::unbounded_channel();
    handlers.set(Arc::new(SyncHandler(move |inbound: Inbound| {
        let _ = handled_tx.send(inbound.message);
        Ok(())
    })));
    let context = SessionContext::new(
        SessionConfig::default(),
        handlers,
        metrics.clone(),
        write_buffer_pool(&metrics),
        None,
    );
    let setup = SessionSetup::plain("peer", delivery_acks);
    let wire = Arc::new(Wire {
        log: Mutex::new(Vec::new()),
        direct_takes: AtomicUsize::new(usize::MAX),
        direct_writes: AtomicUsize::new(0),
        writer_writes: AtomicUsize::new(0),
        changed: Notify::new(),
    });
    let reader = StreamFrameReader::new(read, codec::DEFAULT_MAX_FRAME_SIZE);
    let (connection, _task) = start_session(1, reader, WireWriter(wire.clone()), setup, context);
    Session {
        connection,
        wire,
        handled,
        peer,
    }
}

fn vote(n: u8) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from(vec![n]),
            xt_id: None,
            vote: true,
        })),
    }
}

fn number(message: &Message) -> u8 {
    match &message.payload {
        Some(Payload::Vote(vote)) => vote.sender_chain_id[0],
        other => panic!("expected a vote, got {other:?}"),
    }
}

impl Session {
    /// The peer sends a message; returns once the handler has it.
    async fn receive(&mut self, n: u8) {
        let frame = codec::frame_message(&vote(n), codec::DEFAULT_MAX_FRAME_SIZE).unwrap();
        self.peer.write_all(&frame).await.unwrap();
        let handled = tokio::time::timeout(Duration::from_secs(10), self.handled.recv())
            .await
            .expect("handled within 10 s")
            .expect("a message");
        assert_eq!(number(&handled), n);
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.wire.direct_writes.load(Ordering::Relaxed),
            self.wire.writer_writes.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test]
async fn a_reply_to_a_received_message_leaves_directly_and_once_per_receipt() {
    let mut session = session(false);
    session.receive(1).await;
    session.connection.try_send(vote(10)).unwrap();
    // Written by this task, before try_send returned: no writer involved.
    assert_eq!(session.counts(), (1, 0));
    assert_eq!(session.wire.messages().len(), 1);

    // Nothing received since: the next goes through the writer.
    session.connection.try_send(vote(11)).unwrap();
    let messages = session.wire.await_messages(2).await;
    assert_eq!(messages.iter().map(number).collect::<Vec<_>>(), [10, 11]);
    assert_eq!(session.counts(), (1, 1));

    // Both are counted as sent, bytes included.
    let stats = session.connection.info();
    assert_eq!(stats.messages_out, 2);
    assert_eq!(
        stats.bytes_out,
        session.wire.log.lock().unwrap().len() as u64
    );
}

#[tokio::test]
async fn a_send_only_stream_never_writes_directly() {
    let session = session(false);
    for n in 0..200u8 {
        session.connection.send(vote(n)).await.unwrap();
    }
    let messages = session.wire.await_messages(200).await;
    assert_eq!(
        messages.iter().map(number).collect::<Vec<_>>(),
        (0..200u8).collect::<Vec<_>>()
    );
    assert_eq!(session.counts().0, 0, "no direct write without a receipt");
}

#[tokio::test]
async fn what_a_direct_write_leaves_goes_whole_and_in_order_through_the_writer() {
    let mut session = session(false);
    // The socket takes three bytes of the reply, then nothing more at once.
    session.wire.direct_takes.store(3, Ordering::Relaxed);
    session.receive(1).await;
    session.connection.try_send(vote(10)).unwrap();
    session.connection.try_send(vote(11)).unwrap();
    let messages = session.wire.await_messages(2).await;
    assert_eq!(messages.iter().map(number).collect::<Vec<_>>(), [10, 11]);
    assert_eq!(session.counts().0, 1);
    let stats = session.connection.info();
    assert_eq!(stats.messages_out, 2, "the split reply counts once");

    // A socket that takes nothing: the reply is queued whole.
    session.wire.direct_takes.store(0, Ordering::Relaxed);
    session.receive(2).await;
    session.connection.try_send(vote(12)).unwrap();
    let messages = session.wire.await_messages(3).await;
    assert_eq!(number(&messages[2]), 12);
    assert_eq!(session.counts().0, 2);
    assert_eq!(session.connection.info().messages_out, 3);
}

#[tokio::test]
async fn sessions_with_acknowledgements_never_write_directly() {
    let mut session = session(true);
    session.receive(1).await;
    session.connection.try_send(vote(10)).unwrap();
    // The vote, behind the acknowledgement the session may send first.
    let mut count = 1;
    while !session
        .wire
        .await_messages(count)
        .await
        .iter()
        .any(|message| message.payload.is_some())
    {
        count += 1;
        assert!(count <= 3, "the vote after at most two acknowledgements");
    }
    assert_eq!(session.counts().0, 0);
}
