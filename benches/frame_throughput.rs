//! Micro-benchmarks of the frame path: the length-prefixed codec, the
//! decode-bound pre-scan, and sealing and opening signed frames with each
//! compiled-in crypto backend.
//!
//! `cargo bench --all-features --bench frame_throughput` covers libsecp256k1 too.

use std::{hint::black_box, time::Duration};

use bytes::{Bytes, BytesMut};
use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use prost::Message as _;
use publisher_transport::{
    CryptoBackend, FrameCodec, Message, SecretKey,
    decode_bound::{DecodeAllowance, Source},
    handshake::{SequenceFloors, SignedFrameSession},
    proto::{
        Payload,
        rollup::v1::{Vote, XtId},
        transport::v1::SignedFrame,
    },
    signed::{Audience, FrameOpener, seal},
};
use tokio_util::codec::{Decoder as _, Encoder as _};

/// Encoded size of the benchmark message.
const MESSAGE_LEN: usize = 100;
/// First sequence number of the sender; any value above the receiver's floor.
const FIRST_SEQUENCE: u64 = 1_000;

/// A `Vote` whose encoded `Message` is exactly [`MESSAGE_LEN`] bytes: typical
/// of the small consensus messages that dominate the traffic.
fn vote() -> Message {
    let with_chain_id = |len: usize| Message {
        sender_id: "seq-a".into(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from(vec![0x42; len]),
            xt_id: Some(XtId {
                hash: Bytes::from(vec![0xab; 32]),
            }),
            vote: true,
        })),
    };
    // Measured from a 1-byte chain id, as an empty one is not encoded at all;
    // below 128 bytes its length prefix stays one byte, so size grows one for one.
    let message = with_chain_id(1 + MESSAGE_LEN - with_chain_id(1).encoded_len());
    assert_eq!(message.encoded_len(), MESSAGE_LEN);
    message
}

/// A `Block` message whose encoding is exactly `len` bytes, for larger sizes.
fn block(len: usize) -> Message {
    let with_data = |n: usize| Message {
        sender_id: String::new(),
        payload: Some(Payload::Block(
            publisher_transport::proto::rollup::v1::Block {
                block_data: Bytes::from(vec![0x5a; n]),
                ..Default::default()
            },
        )),
    };
    // Field tags and length prefixes take a few bytes; shrink until it fits.
    let mut n = len;
    while with_data(n).encoded_len() > len {
        n -= 1;
    }
    let message = with_data(n);
    assert_eq!(message.encoded_len(), len, "no exact fit for {len}");
    message
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

fn codec(c: &mut Criterion) {
    let message = vote();
    let mut group = c.benchmark_group("codec");
    configure(&mut group);
    // Bytes on the wire: prefix and body.
    group.throughput(Throughput::Bytes((4 + MESSAGE_LEN) as u64));

    group.bench_function("encode/vote100", |b| {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            codec.encode(black_box(&message), &mut buf).unwrap();
            black_box(buf.len());
        });
    });

    group.bench_function("round_trip/vote100", |b| {
        let mut codec = FrameCodec::default();
        // Reused: once the decoded frame is dropped, `reserve` reclaims the
        // space instead of allocating.
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            codec.encode(black_box(&message), &mut buf).unwrap();
            let body = codec.decode(&mut buf).unwrap().expect("a whole frame");
            black_box(Message::decode(body).unwrap());
        });
    });

    for len in [1024usize, 64 * 1024] {
        let message = block(len);
        group.throughput(Throughput::Bytes((4 + len) as u64));
        group.bench_function(BenchmarkId::new("round_trip/block", len), |b| {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::with_capacity(2 * len + 8);
            b.iter(|| {
                codec.encode(black_box(&message), &mut buf).unwrap();
                let body = codec.decode(&mut buf).unwrap().expect("a whole frame");
                black_box(Message::decode(body).unwrap());
            });
        });
    }
    group.finish();
}

/// The pre-scan every received body goes through before it is decoded.
fn scan(c: &mut Criterion) {
    let encoded = Bytes::from(vote().encode_to_vec());
    let mut group = c.benchmark_group("decode_bound");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    group.bench_function("scan/vote100", |b| {
        b.iter(|| {
            DecodeAllowance::for_frame(MESSAGE_LEN)
                .charge::<Message>(black_box(&encoded), Source::Shared)
                .unwrap()
        });
    });

    // A signed frame as a receiver scans it: the frame, then each message,
    // charged to one allowance.
    let count = 64;
    let sender = SecretKey::generate();
    let audience = Audience::Unicast {
        recipient: SecretKey::generate().public_key().clone(),
        session: [7; 32],
    };
    let frame = seal(
        &sender,
        CryptoBackend::available()[0],
        FIRST_SEQUENCE,
        &audience,
        vec![encoded; count],
    );
    let body = frame.encode_to_vec();
    group.throughput(Throughput::Elements(count as u64));
    group.bench_function(BenchmarkId::new("scan/signed", count), |b| {
        b.iter(|| {
            let mut allowance = DecodeAllowance::for_frame(body.len());
            allowance
                .charge::<SignedFrame>(black_box(&body), Source::Shared)
                .unwrap();
            for message in &frame.messages {
                allowance
                    .charge::<Message>(black_box(message), Source::Shared)
                    .unwrap();
            }
            allowance.remaining()
        });
    });
    group.finish();
}

fn signed(c: &mut Criterion) {
    let sender = SecretKey::generate();
    let receiver = SecretKey::generate();
    let session_tag = [7u8; 32];
    let audience = Audience::Unicast {
        recipient: receiver.public_key().clone(),
        session: session_tag,
    };
    let session = SignedFrameSession {
        session_tag,
        peer_key: sender.public_key().clone(),
        peer_floors: SequenceFloors {
            unicast: FIRST_SEQUENCE,
            broadcast: None,
        },
        local_floors: SequenceFloors {
            unicast: FIRST_SEQUENCE,
            broadcast: Some(FIRST_SEQUENCE),
        },
    };
    let encoded = Bytes::from(vote().encode_to_vec());

    let mut group = c.benchmark_group("signed");
    configure(&mut group);
    for &backend in CryptoBackend::available() {
        for count in [1usize, 16, 64, 256] {
            let messages = vec![encoded.clone(); count];
            group.throughput(Throughput::Elements(count as u64));

            group.bench_function(BenchmarkId::new(format!("seal/{backend}"), count), |b| {
                let mut sequence = FIRST_SEQUENCE;
                b.iter_batched(
                    || messages.clone(),
                    |messages| {
                        sequence += 1;
                        seal(&sender, backend, sequence, &audience, messages)
                    },
                    BatchSize::SmallInput,
                );
            });

            let body = seal(&sender, backend, FIRST_SEQUENCE, &audience, messages).encode_to_vec();
            // A fresh opener per iteration: the replay window refuses a
            // repeated sequence number, and cloning it stays out of the timing.
            let opener = FrameOpener::new(&session, receiver.public_key().clone(), None, backend);
            group.bench_function(BenchmarkId::new(format!("open/{backend}"), count), |b| {
                b.iter_batched(
                    || opener.clone(),
                    |mut opener| {
                        let opened = opener.open(black_box(&body)).unwrap();
                        assert_eq!(opened.len(), count);
                        opened
                    },
                    BatchSize::SmallInput,
                );
            });
        }
    }
    group.finish();
}

criterion_group!(benches, codec, scan, signed);
criterion_main!(benches);
