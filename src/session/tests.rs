//! Decode allowance of signed batches as the writer builds them.

use super::reader::{Decoded, decode_all};
use super::*;
use crate::proto::transport::v1::{Ack, MessageExt};
use crate::{
    decode_bound::{DecodeAllowance, DecodeBoundError},
    proto::{Payload, rollup::v1::Pong},
};
use bytes::Bytes;
use prost::Message as _;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;

/// A signed frame body of `messages`, as the writer seals them (the
/// signature's bytes do not matter to the allowance).
fn frame_of(messages: Vec<Bytes>) -> Bytes {
    crate::proto::transport::v1::SignedFrame {
        sequence: 1,
        audience: Some(
            crate::proto::transport::v1::signed_frame::Audience::RecipientKey(Bytes::from_static(
                &[2; 33],
            )),
        ),
        messages,
        signature: Bytes::from_static(&[0; 64]),
    }
    .encode_to_vec()
    .into()
}

fn decode_frame(body: &Bytes) -> Result<Vec<Decoded>, DecodeBoundError> {
    let mut allowance = DecodeAllowance::for_frame(body.len());
    allowance.charge::<crate::proto::transport::v1::SignedFrame>(
        body,
        crate::decode_bound::Source::Shared,
    )?;
    let frame = crate::proto::transport::v1::SignedFrame::decode(body.clone()).unwrap();
    let mut decoded = Vec::new();
    decode_all(
        body.len(),
        &frame.messages,
        true,
        true,
        &mut allowance,
        &mut super::InboundBatch::default(),
        &mut decoded,
    )?;
    Ok(decoded)
}

#[test]
fn the_largest_batch_of_the_smallest_messages_is_within_the_allowance() {
    // The smallest messages a writer seals: payload-less acks and pongs.
    let pong = Bytes::from(control(Payload::Pong(Pong { timestamp: 0 })).encode_to_vec());
    let empty = Bytes::new();
    for message in [pong, empty] {
        let body = frame_of(vec![message; SIGNED_BATCH_MAX_MESSAGES]);
        let decoded = decode_frame(&body).expect("an honest batch decodes");
        assert_eq!(decoded.len(), SIGNED_BATCH_MAX_MESSAGES);
    }
}

#[test]
fn a_frame_of_many_tiny_messages_is_refused_before_decoding_them() {
    // Few enough for the frame's own list of messages to fit its bound.
    let body = frame_of(vec![Bytes::new(); 16 * SIGNED_BATCH_MAX_MESSAGES]);
    match decode_frame(&body) {
        Err(DecodeBoundError::TooLarge { what, .. }) => {
            assert_eq!(what, "the messages of a signed frame")
        }
        other => panic!("expected TooLarge, got {:?}", other.map(|d| d.len())),
    }
}

fn waiting(acks: &Acks, positions: &[u64]) -> Vec<oneshot::Receiver<()>> {
    positions
        .iter()
        .map(|&position| {
            let (done, confirmed) = oneshot::channel();
            acks.waiting
                .lock()
                .unwrap()
                .push_back((position, tokio::time::Instant::now(), done));
            confirmed
        })
        .collect()
}

#[test]
fn an_ack_confirms_exactly_the_positions_it_covers() {
    let acks = Acks::default();
    acks.written.store(10, Ordering::Release);
    let mut confirmations = waiting(&acks, &[2, 5, 6, 10]);
    acks.acknowledge(5).unwrap();
    assert_eq!(confirmations[0].try_recv(), Ok(()));
    assert_eq!(confirmations[1].try_recv(), Ok(()));
    assert!(
        confirmations[2].try_recv().is_err(),
        "position 6 is not covered"
    );
    // A repeated count is harmless; a later one confirms the rest.
    acks.acknowledge(5).unwrap();
    assert!(confirmations[2].try_recv().is_err());
    acks.acknowledge(10).unwrap();
    assert_eq!(confirmations[2].try_recv(), Ok(()));
    assert_eq!(confirmations[3].try_recv(), Ok(()));
}

#[test]
fn impossible_acks_are_refused() {
    let acks = Acks::default();
    acks.written.store(3, Ordering::Release);
    let mut confirmations = waiting(&acks, &[3]);
    let err = acks.acknowledge(4).unwrap_err();
    assert!(err.contains("ack of 4 messages; 3 sent"), "{err}");
    assert!(confirmations[0].try_recv().is_err(), "nothing confirmed");
    acks.acknowledge(2).unwrap();
    let err = acks.acknowledge(1).unwrap_err();
    assert!(err.contains("2 acknowledged before"), "{err}");
}

/// The example of docs/PROTOCOL.md §5.1.
#[test]
fn ack_bytes_match_the_protocol_document() {
    let ack = MessageExt {
        ack: Some(Ack { delivered: 300 }),
        ack_request: false,
        request_id: 0,
        reply_to: 0,
    };
    assert_eq!(ack.encode_to_vec(), [0xa2, 0x06, 0x03, 0x08, 0xac, 0x02]);
    let as_message = Message::decode(&ack.encode_to_vec()[..]).unwrap();
    assert_eq!(
        as_message.payload, None,
        "a Go peer would see an empty message"
    );
    let request = MessageExt {
        ack: None,
        ack_request: true,
        request_id: 0,
        reply_to: 0,
    };
    assert_eq!(request.encode_to_vec(), [0xa8, 0x06, 0x01]);
}

#[test]
fn failing_the_waiting_tells_every_sender() {
    let acks = Acks::default();
    acks.written.store(2, Ordering::Release);
    let mut confirmations = waiting(&acks, &[1, 2]);
    assert_eq!(acks.fail_waiting(), 2);
    for confirmation in &mut confirmations {
        assert_eq!(
            confirmation.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
    }
    assert_eq!(acks.fail_waiting(), 0);
}

fn outbox(signed: bool) -> Outbox {
    Outbox::new(OutboxConfig {
        max_messages: 4,
        max_bytes: 1 << 20,
        signed,
        max_frame_size: 1 << 20,
        sender_id: Some("me".into()),
        pool: std::sync::Arc::new(BufferPool::new(WRITE_BUFFER_CAPACITY, 2)),
        metrics: Metrics::new("outbox_test"),
        direct: None,
    })
}

#[test]
fn pings_and_pongs_overtake_a_full_queue() {
    for signed in [false, true] {
        let outbox = outbox(signed);
        let mut data = Message {
            sender_id: String::new(),
            payload: Some(Payload::L2Block(crate::proto::rollup::v1::L2Block {
                block: vec![7; 100].into(),
                ..Default::default()
            })),
        };
        for _ in 0..4 {
            let len = data.encoded_len();
            outbox
                .push(&mut data.clone(), len, &[], None, false)
                .unwrap();
        }
        // The budget is spent, yet control messages go, and go first.
        let len = data.encoded_len();
        assert!(outbox.push(&mut data, len, &[], None, false).is_err());
        outbox.push_urgent(&control(Payload::Pong(Pong { timestamp: 9 })));
        assert_eq!(outbox.queued(), 5);
        let first = outbox
            .take(&mut outbox::Spare::default())
            .expect("the pong");
        assert_eq!(first.entries.len(), 1, "signed {signed}");
        let (start, end) = match first.entries[0] {
            outbox::Entry::Frames { start, end, .. } | outbox::Entry::Batch { start, end, .. } => {
                (start, end)
            }
            _ => panic!("a frame"),
        };
        let body = &first.chunk[start..end];
        let room = if signed {
            outbox::UNICAST_HEADER_ROOM
        } else {
            0
        };
        let pong = control(Payload::Pong(Pong { timestamp: 9 })).encode_to_vec();
        assert!(body[room..].ends_with(&pong), "signed {signed}");
        let rest = outbox
            .take(&mut outbox::Spare::default())
            .expect("the data");
        assert_eq!(rest.entries.len(), 1, "one frame or batch of four");
        assert!(outbox.take(&mut outbox::Spare::default()).is_none());
        assert_eq!(outbox.queued(), 0);
    }
}

#[test]
fn recycled_messages_stay_within_what_the_documentation_says() {
    // `InboundBatch::recycle` documents about 280 KiB for 1,152 messages.
    let size = std::mem::size_of::<Message>();
    assert!(size * handler::SPARE_MESSAGES <= 290 * 1024, "{size} bytes");
}

#[test]
fn the_handshake_response_goes_ahead_of_a_ping_queued_before_it() {
    let outbox = outbox(false);
    outbox.push_urgent(&control(Payload::Ping(crate::proto::rollup::v1::Ping {
        timestamp: 1,
    })));
    let response = Bytes::from_static(b"\0\0\0\x02hi");
    outbox.push_first(
        response.clone(),
        crate::proto::MessageKind::HandshakeResponse,
    );
    let taken = outbox.take(&mut outbox::Spare::default()).expect("both");
    assert!(
        matches!(&taken.entries[0], outbox::Entry::Shared { frame, .. } if *frame == response),
        "{:?}",
        taken.entries
    );
    assert_eq!(taken.entries.len(), 2, "then the ping");
}

#[test]
fn the_handshake_response_goes_before_an_early_ping() {
    for signed in [false, true] {
        let outbox = outbox(signed);
        let response = Bytes::from_static(&[0, 0, 0, 2, 0x08, 0x01]);
        outbox.push_first(response.clone(), MessageKind::HandshakeResponse);
        outbox.push_urgent(&control(Payload::Ping(crate::proto::rollup::v1::Ping {
            timestamp: 1,
        })));
        let taken = outbox.take(&mut outbox::Spare::default()).expect("both");
        assert_eq!(taken.entries.len(), 2, "signed {signed}");
        assert!(
            matches!(&taken.entries[0], outbox::Entry::Shared { frame, application: false } if *frame == response),
            "signed {signed}: the response is first"
        );
        assert_eq!(outbox.queued(), 0);
    }
}

#[test]
fn a_quiet_connection_lets_go_of_recycled_messages() {
    let mut batch = InboundBatch::default();
    let mut message = control(Payload::Pong(Pong { timestamp: 1 }));
    message.sender_id = "x".repeat(100);
    batch.recycle(message);
    // A recycled message comes back with its string's room.
    let reused = batch.spare();
    assert!(reused.sender_id.capacity() >= 100);
    batch.recycle(reused);
    batch.trim();
    assert_eq!(
        batch.spare().sender_id.capacity(),
        0,
        "a new message after trim"
    );
    // Messages still waiting for the handler stay.
    batch.push_slot("peer".into(), 1);
    batch.trim();
    assert_eq!(batch.len(), 1);
}

/// A broadcast batch with one 100-byte block, and that block.
fn broadcast_batch() -> (Arc<broadcast::PendingBatch>, Message) {
    let sealer = Arc::new(broadcast::BroadcastSealer {
        key: Arc::new(SecretKey::generate()),
        backend: CryptoBackend::default(),
        sequence: Arc::new(SequenceCounter::starting_at(1)),
        max_frame_size: 1 << 20,
    });
    let block = Message {
        sender_id: "publisher".into(),
        payload: Some(Payload::L2Block(crate::proto::rollup::v1::L2Block {
            block: vec![7; 100].into(),
            ..Default::default()
        })),
    };
    let batch = Arc::new(broadcast::PendingBatch::new(
        sealer,
        7,
        "",
        &block,
        block.encoded_len(),
    ));
    (batch, block)
}

#[test]
fn a_broadcast_batch_gathers_until_something_is_queued_behind_its_place() {
    let kind = MessageKind::L2Block;
    // Its place still waits: a unicast queued behind it ends it.
    let queue = outbox(true);
    let (batch, mut block) = broadcast_batch();
    queue.push_pending(&batch, kind, 200, true).unwrap();
    assert!(batch.is_open());
    let len = block.encoded_len();
    queue.push(&mut block, len, &[], None, false).unwrap();
    assert!(!batch.is_open(), "fenced by the unicast behind its place");
    assert!(!batch.join(&block, block.encoded_len(), 1 << 20));

    // The writer took its place: it still gathers until something is queued.
    let queue = outbox(true);
    let (batch, block) = broadcast_batch();
    queue.push_pending(&batch, kind, 200, true).unwrap();
    let taken = queue
        .take(&mut outbox::Spare::default())
        .expect("the place");
    assert!(matches!(taken.entries[..], [outbox::Entry::Pending { .. }]));
    assert!(
        batch.join(&block, block.encoded_len(), 1 << 20),
        "taking the place does not end it"
    );
    queue.push_ack();
    assert!(!batch.is_open(), "fenced by what was queued after the take");

    // A broadcast that joined just before a unicast fenced the batch is
    // charged to the place all the same: never written, it is counted lost.
    let queue = outbox(true);
    let (late, mut block) = broadcast_batch();
    queue.push_pending(&late, kind, 200, true).unwrap();
    assert!(late.join(&block, block.encoded_len(), 1 << 20));
    let len = block.encoded_len();
    queue.push(&mut block, len, &[], None, false).unwrap();
    queue.push_pending(&late, kind, 200, false).unwrap();
    assert_eq!(queue.queued(), 3);
    assert_eq!(
        queue.close(),
        3,
        "two broadcasts and a unicast never written"
    );

    // Sealed once, with both messages, which the writer counts.
    let metrics = Metrics::new("batch_test");
    let mut tally = metrics.tally(crate::metrics::Direction::Out);
    let (frame, application) = batch.frame(&mut tally);
    let frame = frame.unwrap();
    assert_eq!(application, 2);
    let sealed = crate::proto::transport::v1::SignedFrame::decode(&frame[4..]).unwrap();
    assert_eq!((sealed.sequence, sealed.messages.len()), (7, 2));
    let again = batch.frame(&mut tally).0.unwrap();
    assert_eq!(again, frame, "every recipient writes the same bytes");
}
