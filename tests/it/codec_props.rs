//! Property tests of the frame codec (docs/PROTOCOL.md §1) and of the
//! `rollup.v1.Message` encoding it carries (§5).

use bytes::{BufMut, Bytes, BytesMut};
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config, RngSeed},
};
use prost::Message as _;
use publisher_transport::{
    CodecError, FrameCodec,
    codec::{DEFAULT_MAX_FRAME_SIZE, LENGTH_PREFIX_LEN},
    proto::{
        Message, Payload,
        rollup::v1::{
            CircMessage, Decided, DisconnectMessage, L2Block, Ping, Pong, RequestSeal, StartSc,
            TransactionRequest, Vote, XtId, XtRequest,
        },
    },
};
use tokio_util::codec::{Decoder, Encoder};

fn config() -> Config {
    Config {
        // Deterministic, and no regression files written into the tree.
        rng_seed: RngSeed::Fixed(0xc0de_c0de),
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn xt_id() -> impl Strategy<Value = Option<XtId>> {
    prop::option::of(bytes(40).prop_map(|hash| XtId { hash }))
}

fn xt_request() -> impl Strategy<Value = XtRequest> {
    vec(
        (bytes(8), vec(bytes(64), 0..4)).prop_map(|(chain_id, transaction)| TransactionRequest {
            chain_id,
            transaction,
        }),
        0..4,
    )
    .prop_map(|transactions| XtRequest { transactions })
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (bytes(8), xt_id(), any::<bool>()).prop_map(|(sender_chain_id, xt_id, vote)| {
            Payload::Vote(Vote {
                sender_chain_id,
                xt_id,
                vote,
            })
        }),
        (xt_id(), any::<bool>())
            .prop_map(|(xt_id, decision)| Payload::Decided(Decided { xt_id, decision })),
        (
            any::<u64>(),
            any::<u64>(),
            prop::option::of(xt_request()),
            bytes(40)
        )
            .prop_map(|(slot, xt_sequence_number, xt_request, xt_id)| {
                Payload::StartSc(StartSc {
                    slot,
                    xt_sequence_number,
                    xt_request,
                    xt_id,
                })
            }),
        (
            (
                bytes(8),
                bytes(8),
                vec(bytes(20), 0..3),
                vec(bytes(20), 0..3)
            ),
            (xt_id(), any::<String>(), vec(bytes(64), 0..3), bytes(16)),
        )
            .prop_map(
                |(
                    (source_chain, destination_chain, source, receiver),
                    (xt_id, label, data, session_id),
                )| {
                    Payload::CircMessage(CircMessage {
                        source_chain,
                        destination_chain,
                        source,
                        receiver,
                        xt_id,
                        label,
                        data,
                        session_id,
                    })
                }
            ),
        any::<i64>().prop_map(|timestamp| Payload::Ping(Ping { timestamp })),
        any::<i64>().prop_map(|timestamp| Payload::Pong(Pong { timestamp })),
        // Any i32: proto3 enums are open, unknown reasons must survive too.
        (any::<i32>(), any::<String>()).prop_map(|(reason, details)| {
            Payload::Disconnect(DisconnectMessage { reason, details })
        }),
        xt_request().prop_map(Payload::XtRequest),
        (any::<u64>(), vec(bytes(32), 0..4)).prop_map(|(slot, included_xts)| Payload::RequestSeal(
            RequestSeal { slot, included_xts }
        )),
        (
            (any::<u64>(), bytes(8), any::<u64>()),
            (bytes(32), bytes(32), vec(bytes(32), 0..3), bytes(256)),
        )
            .prop_map(
                |(
                    (slot, chain_id, block_number),
                    (block_hash, parent_block_hash, included_xts, block),
                )| {
                    Payload::L2Block(L2Block {
                        slot,
                        chain_id,
                        block_number,
                        block_hash,
                        parent_block_hash,
                        included_xts,
                        block,
                    })
                }
            ),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (any::<String>(), prop::option::of(payload()))
        .prop_map(|(sender_id, payload)| Message { sender_id, payload })
}

/// A byte stream that is mostly well-formed frames, with the occasional zero
/// or oversize prefix and raw garbage, so every decoder path is reached.
fn stream(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let segment = prop_oneof![
        6 => vec(any::<u8>(), 1..=max).prop_map(|body| {
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend(body);
            frame
        }),
        1 => Just(vec![0, 0, 0, 0]),
        1 => ((max as u32 + 1)..=u32::MAX).prop_map(|len| len.to_be_bytes().to_vec()),
        1 => vec(any::<u8>(), 0..16),
    ];
    vec(segment, 0..12).prop_map(|segments| segments.concat())
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// How the decoder stopped on a stream.
#[derive(Debug, PartialEq)]
enum End {
    /// Waiting for more bytes.
    Pending,
    Empty,
    TooLarge(usize),
}

/// The frames a correct decoder finds in `data`, computed independently.
fn reference(data: &[u8], max: usize) -> (Vec<Bytes>, End) {
    let mut frames = Vec::new();
    let mut rest = data;
    loop {
        let Some(prefix) = rest.get(..LENGTH_PREFIX_LEN) else {
            return (frames, End::Pending);
        };
        let len = u32::from_be_bytes(prefix.try_into().unwrap()) as usize;
        if len == 0 {
            return (frames, End::Empty);
        }
        if len > max {
            return (frames, End::TooLarge(len));
        }
        let Some(body) = rest.get(LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len) else {
            return (frames, End::Pending);
        };
        frames.push(Bytes::copy_from_slice(body));
        rest = &rest[LENGTH_PREFIX_LEN + len..];
    }
}

/// Feeds `data` to a fresh decoder in chunks of the given sizes (cycled), as
/// a socket would, stopping at the first error as a connection does.
fn feed(data: &[u8], chunks: &[usize], max: usize) -> (Vec<Bytes>, End) {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut offset = 0;
    for &size in chunks.iter().cycle() {
        let end = (offset + size).min(data.len());
        buf.extend_from_slice(&data[offset..end]);
        offset = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= max, "{}", frame.len());
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(CodecError::EmptyFrame) => return (frames, End::Empty),
                Err(CodecError::FrameTooLarge { size, max: limit }) => {
                    assert_eq!(limit, max);
                    assert!(size > max);
                    return (frames, End::TooLarge(size));
                }
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
        if offset == data.len() {
            return (frames, End::Pending);
        }
    }
    unreachable!("chunk sizes are never empty")
}

/// Appends `chunk`, growing the buffer to exactly what it must hold, so that
/// any extra capacity can only come from the decoder.
fn append_exact(buf: &mut BytesMut, chunk: &[u8]) {
    if buf.capacity() - buf.len() < chunk.len() {
        let mut grown = BytesMut::with_capacity(buf.len() + chunk.len());
        grown.extend_from_slice(buf);
        *buf = grown;
    }
    buf.extend_from_slice(chunk);
}

const NINE_MIB: usize = 9 * 1024 * 1024;
/// Slack allowed above the bytes given: the allocator may round up a little.
const CAPACITY_SLACK: usize = 64;

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    // PROTOCOL.md §1, §5
    #[test]
    fn messages_round_trip_through_the_codec(message in message()) {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        match codec.encode(&message, &mut buf) {
            // Only the all-default message encodes to nothing.
            Err(CodecError::EmptyFrame) => {
                prop_assert_eq!(message.encoded_len(), 0);
                return Ok(());
            }
            result => result.unwrap(),
        }
        let prefix = u32::from_be_bytes(buf[..LENGTH_PREFIX_LEN].try_into().unwrap());
        prop_assert_eq!(prefix as usize, message.encoded_len());
        prop_assert_eq!(buf.len(), LENGTH_PREFIX_LEN + message.encoded_len());
        let body = codec.decode(&mut buf).unwrap().expect("a whole frame");
        prop_assert!(buf.is_empty());
        prop_assert_eq!(Message::decode(body).unwrap(), message);
    }

    // PROTOCOL.md §1
    #[test]
    fn message_streams_survive_any_chunking(
        messages in vec(message(), 1..8),
        chunks in vec(1usize..64, 1..8),
    ) {
        let messages: Vec<Message> =
            messages.into_iter().filter(|m| m.encoded_len() > 0).collect();
        let mut stream = BytesMut::new();
        for message in &messages {
            FrameCodec::default().encode(message, &mut stream).unwrap();
        }
        let (frames, end) = feed(&stream, &chunks, DEFAULT_MAX_FRAME_SIZE);
        prop_assert_eq!(end, End::Pending);
        let decoded: Vec<Message> =
            frames.into_iter().map(|f| Message::decode(f).unwrap()).collect();
        prop_assert_eq!(decoded, messages);
    }

    // PROTOCOL.md §1
    #[test]
    fn arbitrary_streams_decode_like_the_reference_in_any_chunking(
        (max, data) in (1usize..300).prop_flat_map(|max| (Just(max), stream(max))),
        chunks in vec(1usize..400, 1..8),
    ) {
        // Never panics, yields only frames within limits, and stops with a
        // typed error exactly where the stream breaks the framing rules.
        prop_assert_eq!(feed(&data, &chunks, max), reference(&data, max));
    }

    // PROTOCOL.md §1
    #[test]
    fn random_bytes_never_panic_the_decoder(
        data in vec(any::<u8>(), 0..2048),
        chunks in vec(1usize..300, 1..8),
        max in prop_oneof![1usize..64, Just(DEFAULT_MAX_FRAME_SIZE)],
    ) {
        prop_assert_eq!(feed(&data, &chunks, max), reference(&data, max));
    }

    // PROTOCOL.md §1
    #[test]
    fn an_announced_9_mib_frame_reserves_nothing(
        chunks in vec(1usize..16_384, 1..48),
    ) {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut given = LENGTH_PREFIX_LEN;
        append_exact(&mut buf, &(NINE_MIB as u32).to_be_bytes());
        for size in chunks {
            let capacity = buf.capacity();
            prop_assert!(codec.decode(&mut buf).unwrap().is_none());
            // The decoder itself never grows the buffer...
            prop_assert!(buf.capacity() <= capacity);
            // ... so it holds no more than what actually arrived.
            prop_assert!(buf.capacity() <= given + CAPACITY_SLACK,
                "capacity {} after {given} bytes", buf.capacity());
            append_exact(&mut buf, &vec![0xab; size]);
            given += size;
        }
    }
}

// PROTOCOL.md §1
#[test]
fn an_announced_9_mib_frame_arrives_whole_once_all_its_bytes_do() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    buf.put_u32(NINE_MIB as u32);
    let body: Vec<u8> = (0..NINE_MIB).map(|i| (i % 251) as u8).collect();
    for chunk in body.chunks(256 * 1024) {
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(chunk);
    }
    let frame = codec.decode(&mut buf).unwrap().expect("complete");
    assert_eq!(&frame[..], &body[..]);
    assert!(buf.is_empty());
    assert!(codec.decode(&mut buf).unwrap().is_none());
}

// PROTOCOL.md §1
#[test]
fn frame_length_limits_are_inclusive() {
    for max in [1, 100, DEFAULT_MAX_FRAME_SIZE] {
        let mut at_max = BytesMut::new();
        at_max.put_u32(max as u32);
        at_max.put_bytes(0, max);
        assert_eq!(feed(&at_max, &[max + 4], max).0.len(), 1);
        let over = ((max + 1) as u32).to_be_bytes();
        assert_eq!(feed(&over, &[4], max), (vec![], End::TooLarge(max + 1)));
    }
    assert_eq!(feed(&[0; 4], &[1], 100), (vec![], End::Empty));
}
