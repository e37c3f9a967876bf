use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use bytes::{BufMut, BytesMut};
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};
use prost::Message as _;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::proto::{
    Payload,
    rollup::v1::{
        HandshakeRequest, HandshakeResponse, L2BlockRequest, RequestSeal, StartSlot,
        TransactionRequest, XtRequest,
    },
    transport::v1::{FrameBatch, HandshakeRequestExt, MessageExt},
};

/// Counts the heap this thread holds while `TRACKING` is on, and its peak.
struct CountingAllocator;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static HELD: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn track(delta: i64) {
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        let held = HELD.with(|held| {
            held.set(held.get() + delta);
            held.get()
        });
        PEAK.with(|peak| peak.set(peak.get().max(held)));
    }
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as i64);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as i64);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as i64 - layout.size() as i64);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Peak heap this thread allocated while running `f`, and its result.
pub(crate) fn peak_allocation<T>(f: impl FnOnce() -> T) -> (u64, T) {
    HELD.with(|held| held.set(0));
    PEAK.with(|peak| peak.set(0));
    TRACKING.with(|tracking| tracking.set(true));
    let value = f();
    TRACKING.with(|tracking| tracking.set(false));
    (PEAK.with(Cell::get).max(0) as u64, value)
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8(value as u8 | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

fn put_key(buf: &mut BytesMut, number: u64, wire_type: u64) {
    put_varint(buf, number << 3 | wire_type);
}

fn put_len(buf: &mut BytesMut, number: u64, payload: &[u8]) {
    put_key(buf, number, 2);
    put_varint(buf, payload.len() as u64);
    buf.put_slice(payload);
}

/// A random, well-formed encoding of message type `schema`, following its
/// schema (with unknown fields and repeated singular fields mixed in), so
/// that prost decodes it.
fn random_message(rng: &mut StdRng, schema: usize, depth: u32) -> BytesMut {
    let mut buf = BytesMut::new();
    let fields = SCHEMAS[schema].fields;
    for _ in 0..rng.random_range(0..6) {
        if fields.is_empty() || rng.random_bool(0.1) {
            // An unknown field: skipped by prost.
            put_key(&mut buf, 1000 + rng.random_range(0..10), 0);
            put_varint(&mut buf, rng.random());
            continue;
        }
        let field = &fields[rng.random_range(0..fields.len())];
        let count = if field.repeated {
            rng.random_range(0..40)
        } else {
            1
        };
        let packed = field.repeated && rng.random_bool(0.5);
        let mut packed_payload = BytesMut::new();
        for _ in 0..count {
            match field.kind {
                FieldKind::Varint => {
                    let value = if rng.random_bool(0.5) {
                        rng.random_range(0..2)
                    } else {
                        rng.random()
                    };
                    if packed {
                        put_varint(&mut packed_payload, value);
                    } else {
                        put_key(&mut buf, field.number, 0);
                        put_varint(&mut buf, value);
                    }
                }
                FieldKind::Fixed32 | FieldKind::Fixed64 => {
                    let (wire_type, len) = match field.kind {
                        FieldKind::Fixed32 => (5, 4),
                        _ => (1, 8),
                    };
                    let target = if packed {
                        &mut packed_payload
                    } else {
                        &mut buf
                    };
                    if !packed {
                        put_key(target, field.number, wire_type);
                    }
                    target.put_bytes(0xab, len);
                }
                FieldKind::String => {
                    let text = "x".repeat(rng.random_range(0..50));
                    put_len(&mut buf, field.number, text.as_bytes());
                }
                FieldKind::Bytes => {
                    let data = vec![7u8; rng.random_range(0..80)];
                    put_len(&mut buf, field.number, &data);
                }
                FieldKind::Message(inner) => {
                    let payload = if depth < 4 {
                        random_message(rng, inner, depth + 1)
                    } else {
                        BytesMut::new()
                    };
                    put_len(&mut buf, field.number, &payload);
                }
            }
        }
        if packed && !packed_payload.is_empty() {
            put_len(&mut buf, field.number, &packed_payload);
        }
    }
    buf
}

/// Decodes `body` as `M` both ways and checks the estimates against the
/// heap decoding actually took.
fn check_estimate<M: BoundedMessage>(body: &Bytes) -> Result<(), TestCaseError> {
    let shared = estimate::<M>(body, Source::Shared);
    let copied = estimate::<M>(body, Source::Copied);
    let input = body.clone();
    let (allocated, decoded) = peak_allocation(move || M::decode(input).map(drop));
    prop_assert!(decoded.is_ok(), "generated bytes decode: {decoded:?}");
    let shared = shared.expect("the scan accepts what prost accepts");
    prop_assert!(
        shared >= allocated,
        "{}: estimate {shared} < allocated {allocated} (shared)",
        SCHEMAS[M::SCHEMA].name
    );
    let (allocated, _) = peak_allocation(|| M::decode(&body[..]).map(drop));
    let copied = copied.expect("the scan accepts what prost accepts");
    prop_assert!(
        copied >= allocated,
        "{}: estimate {copied} < allocated {allocated} (copied)",
        SCHEMAS[M::SCHEMA].name
    );
    Ok(())
}

fn config() -> Config {
    Config {
        cases: 256,
        rng_seed: RngSeed::Fixed(0xb0b_b0b),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn estimate_covers_what_decoding_allocates(seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let message = random_message(&mut rng, Message::SCHEMA, 0).freeze();
        check_estimate::<Message>(&message)?;
        let frame = random_message(&mut rng, SignedFrame::SCHEMA, 0).freeze();
        check_estimate::<SignedFrame>(&frame)?;
        let batch = random_message(&mut rng, FrameBatch::SCHEMA, 0).freeze();
        check_estimate::<FrameBatch>(&batch)?;
    }

    #[test]
    fn scanning_arbitrary_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        seed in any::<u64>(),
    ) {
        // Random bytes, and a valid message with random bytes spliced in.
        let _ = estimate::<Message>(&bytes, Source::Copied);
        let _ = DecodeAllowance::for_frame(bytes.len()).charge::<SignedFrame>(&bytes, Source::Shared);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut message = random_message(&mut rng, Message::SCHEMA, 0).to_vec();
        if !message.is_empty() {
            let at = rng.random_range(0..message.len());
            message.splice(at..at, bytes.iter().copied().take(8));
        }
        let scanned = estimate::<Message>(&message, Source::Shared);
        if let Ok(decoded) = Message::decode(&message[..]) {
            // Whatever prost accepts, the scan accepts too.
            prop_assert!(scanned.is_some(), "scan refused what prost decodes: {decoded:?}");
        }
    }
}

/// `count` empty entries of repeated field `number`, inside `Message` field `payload`.
fn bomb(payload: u64, number: u64, count: usize) -> Bytes {
    let mut inner = BytesMut::with_capacity(2 * count);
    for _ in 0..count {
        put_len(&mut inner, number, &[]);
    }
    let mut message = BytesMut::new();
    put_len(&mut message, payload, &inner);
    message.freeze()
}

#[test]
fn empty_repeated_entries_are_refused() {
    // StartSlot.l2_blocks_request, RequestSeal.included_xts, XTRequest.transactions.
    for (payload, number) in [(7, 4), (8, 2), (2, 1)] {
        let body = bomb(payload, number, 500_000);
        let err = decode_message(body.clone()).unwrap_err();
        let DecodeBoundError::TooLarge {
            body_len, bound, ..
        } = err
        else {
            panic!("expected TooLarge, got {err:?}");
        };
        assert_eq!(body_len, body.len());
        assert_eq!(bound, DecodeAllowance::for_frame(body.len()).bound());
    }
    // SignedFrame.messages.
    let mut frame = BytesMut::new();
    for _ in 0..500_000 {
        put_len(&mut frame, 4, &[]);
    }
    let err = check_signed_frame(&frame).unwrap_err();
    assert!(matches!(err, DecodeBoundError::TooLarge { .. }), "{err:?}");
    assert!(
        err.to_string().contains("transport.v1.SignedFrame"),
        "{err}"
    );
}

#[test]
fn realistic_messages_pass() {
    let l2 = |n: u8| L2BlockRequest {
        chain_id: Bytes::from(vec![n; 8]),
        block_number: 1_000_000 + u64::from(n),
        parent_hash: Bytes::from(vec![n; 32]),
    };
    let start = Message {
        sender_id: "publisher".into(),
        payload: Some(Payload::StartSlot(StartSlot {
            slot: 7,
            next_superblock_number: 8,
            last_superblock_hash: Bytes::from(vec![1; 32]),
            l2_blocks_request: (0..200).map(l2).collect(),
        })),
    };
    let seal = Message {
        sender_id: "publisher".into(),
        payload: Some(Payload::RequestSeal(RequestSeal {
            slot: 7,
            included_xts: (0..100_000).map(|_| Bytes::from(vec![9; 32])).collect(),
        })),
    };
    let xt = Message {
        sender_id: "seq-a".into(),
        payload: Some(Payload::XtRequest(XtRequest {
            transactions: vec![TransactionRequest {
                chain_id: Bytes::from(vec![1; 8]),
                transaction: (0..50_000).map(|_| Bytes::from(vec![2; 110])).collect(),
            }],
        })),
    };
    for message in [start, seal, xt] {
        let body = Bytes::from(message.encode_to_vec());
        assert_eq!(decode_message(body).unwrap(), message);
    }
    // A full coalesced batch of the smallest messages.
    let ping = Bytes::from(
        Message {
            sender_id: String::new(),
            payload: Some(Payload::Ping(Default::default())),
        }
        .encode_to_vec(),
    );
    let frame = SignedFrame {
        sequence: 1,
        audience: None,
        messages: vec![ping; 64 * 1024 / 4],
        signature: Bytes::from(vec![0; 64]),
    };
    check_signed_frame(&frame.encode_to_vec()).unwrap();
}

#[test]
fn one_allowance_covers_the_parts_of_a_frame() {
    let body = bomb(7, 4, 1_000);
    let mut allowance = DecodeAllowance::for_frame(100);
    let first = allowance.charge::<Message>(&body, Source::Shared).unwrap();
    assert_eq!(allowance.remaining(), allowance.bound() - first);
    let mut rest = 0;
    let err = loop {
        match allowance.charge::<Message>(&body, Source::Shared) {
            Ok(_) => rest += 1,
            Err(err) => break err,
        }
        assert!(rest < 100, "the allowance never ran out");
    };
    assert!(matches!(err, DecodeBoundError::TooLarge { .. }), "{err:?}");
}

#[test]
fn handshake_messages_decode_to_at_most_their_length() {
    // No repeated fields: a handshake frame (at most 16 KiB) costs at most
    // its own length, whichever way it is decoded.
    let request = HandshakeRequest {
        timestamp: 1,
        public_key: Bytes::from(vec![2; 33]),
        signature: Bytes::from(vec![3; 65]),
        client_id: "x".repeat(10_000),
        nonce: Bytes::from(vec![4; 16]),
    };
    let mut body = request.encode_to_vec();
    body.extend(
        HandshakeRequestExt {
            ext_version: 1,
            ext_signature: Bytes::from(vec![5; 64]),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    for source in [Source::Shared, Source::Copied] {
        assert!(estimate::<HandshakeRequest>(&body, source).unwrap() <= body.len() as u64);
        assert!(estimate::<HandshakeResponse>(&body, source).unwrap() <= body.len() as u64);
        assert_eq!(estimate::<MessageExt>(&body, source), Some(0));
    }
}

#[test]
fn malformed_input_is_refused_by_the_scan() {
    let cases: [(&[u8], &str); 7] = [
        (&[0x3a, 0x05, 0x01], "buffer underflow"),
        (&[0x08], "invalid varint"),
        (&[0x0b], "buffer underflow"),
        (&[0x0b, 0x14], "unexpected end group tag"),
        (&[0x0c], "unexpected end group tag"),
        (&[0x0e, 0x00], "invalid wire type"),
        (&[0x00, 0x00], "invalid field number 0"),
    ];
    for (body, reason) in cases {
        let err = decode_message(Bytes::copy_from_slice(body)).unwrap_err();
        assert_eq!(
            err,
            DecodeBoundError::Malformed {
                what: "rollup.v1.Message",
                reason
            }
        );
        assert!(Message::decode(body).is_err(), "prost refuses {body:?} too");
    }
    // Groups of unknown fields, nested, are skipped as prost skips them.
    let groups = [
        0xbb, 0x3e, 0xc3, 0x3e, 0x08, 0x01, 0xc4, 0x3e, 0xbc, 0x3e, 0x72, 0x00,
    ];
    assert_eq!(estimate::<Message>(&groups, Source::Shared), Some(0));
    assert!(Message::decode(&groups[..]).is_ok());
}

#[test]
fn fields_are_found_by_number() {
    for schema in SCHEMAS {
        for (index, field) in schema.fields.iter().enumerate() {
            assert!(
                std::ptr::eq(schema.field(field.number).unwrap(), &schema.fields[index]),
                "{} field {}",
                schema.name,
                field.number
            );
        }
        for number in [1, 17, 99, 255, 256, 1000, u64::from(u32::MAX >> 3)] {
            let found = schema.field(number).map(|field| field.number);
            let expected = schema.fields.iter().any(|field| field.number == number);
            assert_eq!(found.is_some(), expected, "{} field {number}", schema.name);
        }
    }
    // Numbers beyond the table are searched for.
    static HIGH: MessageSchema = MessageSchema {
        name: "high",
        fields: &[FieldSchema {
            number: 300,
            kind: FieldKind::Varint,
            repeated: false,
            element_size: 8,
            slot: usize::MAX,
        }],
        by_number: &[],
        tallied: &[],
    };
    assert_eq!(HIGH.field(300).map(|field| field.number), Some(300));
    assert!(HIGH.field(5).is_none());
    assert!(HIGH.field(301).is_none());
}
