//! Signed frames (docs/PROTOCOL.md §4) sealed and opened with the sessions a
//! real handshake negotiated (see `handshake::negotiate_with_nonce`).

use std::time::Duration;

use bytes::Bytes;
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};
use prost::Message as _;
use publisher_transport::{
    CryptoBackend, SignedFrameError,
    handshake::{SequenceFloors, SignedFrameSession, unix_nanos},
    proto::{
        Message, Payload,
        rollup::v1::{Ping, Vote, XtId},
        transport::v1::SignedFrame,
    },
    signed::{Audience, FrameOpener, REPLAY_WINDOW_BITS, SequenceCounter, seal},
};

use crate::handshake::{
    CLIENT_FLOOR, IDENTITY, Negotiated, SERVER_FLOORS, client_key, negotiate_with_nonce, other_key,
    server_key, t0,
};

/// `n` distinct encoded messages.
fn messages(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let payload = if i % 2 == 0 {
                Payload::Vote(Vote {
                    sender_chain_id: Bytes::from(vec![i as u8; 4]),
                    xt_id: Some(XtId {
                        hash: Bytes::from(vec![0xa5; 32]),
                    }),
                    vote: i % 3 == 0,
                })
            } else {
                Payload::Ping(Ping {
                    timestamp: i as i64,
                })
            };
            Message {
                sender_id: format!("sender-{i}"),
                payload: Some(payload),
            }
            .encode_to_vec()
            .into()
        })
        .collect()
}

/// Both directions of one negotiated session.
struct Fixture {
    backend: CryptoBackend,
    negotiated: Negotiated,
    /// The client's opener, for frames from the server.
    at_client: FrameOpener,
    /// The server's opener, for frames from the client.
    at_server: FrameOpener,
}

impl Fixture {
    fn new(backend: CryptoBackend) -> Self {
        Self::new_with_nonce(backend, 1)
    }

    fn new_with_nonce(backend: CryptoBackend, nonce: u8) -> Self {
        let negotiated = negotiate_with_nonce(backend, nonce);
        let at_client = FrameOpener::new(
            &negotiated.client_view,
            client_key().public_key().clone(),
            Some(negotiated.identity.clone()),
            backend,
        );
        let at_server = FrameOpener::new(
            &negotiated.server_view,
            server_key().public_key().clone(),
            None,
            backend,
        );
        Self {
            backend,
            negotiated,
            at_client,
            at_server,
        }
    }

    /// A frame from the server to the client.
    fn to_client(&self, sequence: u64, batch: Vec<Bytes>) -> Vec<u8> {
        let audience = Audience::Unicast {
            recipient: client_key().public_key().clone(),
            session: self.negotiated.client_view.session_tag,
        };
        seal(&server_key(), self.backend, sequence, &audience, batch).encode_to_vec()
    }

    /// A broadcast from the server, leaving out `exclude`.
    fn broadcast(&self, sequence: u64, exclude: &str) -> Vec<u8> {
        let audience = Audience::Broadcast {
            exclude: exclude.into(),
        };
        seal(
            &server_key(),
            self.backend,
            sequence,
            &audience,
            messages(1),
        )
        .encode_to_vec()
    }

    /// A frame from the client to the server.
    fn to_server(&self, sequence: u64, batch: Vec<Bytes>) -> Vec<u8> {
        let audience = Audience::Unicast {
            recipient: server_key().public_key().clone(),
            session: self.negotiated.server_view.session_tag,
        };
        seal(&client_key(), self.backend, sequence, &audience, batch).encode_to_vec()
    }
}

const UNICAST: u64 = SERVER_FLOORS.unicast;

fn assert_too_old(result: Result<Vec<Bytes>, SignedFrameError>, lowest: u64) {
    match result {
        Err(SignedFrameError::TooOld {
            lowest_accepted, ..
        }) => assert_eq!(lowest_accepted, lowest),
        other => panic!("expected TooOld, got {other:?}"),
    }
}

// PROTOCOL.md §4.1
#[test]
fn batches_open_to_the_sealed_bytes_in_both_directions() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        for (i, n) in [1, 64].into_iter().enumerate() {
            let batch = messages(n);
            let frame = f.to_client(UNICAST + i as u64, batch.clone());
            assert_eq!(f.at_client.open(&frame).unwrap(), batch);
            let frame = f.to_server(CLIENT_FLOOR + i as u64, batch.clone());
            assert_eq!(f.at_server.open(&frame).unwrap(), batch);
        }
        let frame = f.to_client(UNICAST + 10, messages(3));
        let decoded = f.at_client.open_messages(&frame).unwrap();
        let expected: Vec<Message> = messages(3)
            .into_iter()
            .map(|m| Message::decode(m).unwrap())
            .collect();
        assert_eq!(decoded, expected);
    }
}

// PROTOCOL.md §4.2
#[test]
fn frames_from_a_hand_built_session_open_the_same() {
    // The opener depends on the session values only, not on how they were made.
    for &backend in CryptoBackend::available() {
        let f = Fixture::new(backend);
        let session = SignedFrameSession {
            session_tag: f.negotiated.client_view.session_tag,
            peer_key: server_key().public_key().clone(),
            peer_floors: SERVER_FLOORS,
            local_floors: SequenceFloors {
                unicast: CLIENT_FLOOR,
                broadcast: None,
            },
        };
        assert_eq!(f.negotiated.client_view, session);
        let mut opener = FrameOpener::new(
            &session,
            client_key().public_key().clone(),
            Some(IDENTITY.into()),
            backend,
        );
        assert_eq!(
            opener.open(&f.to_client(UNICAST, messages(2))).unwrap(),
            messages(2)
        );
    }
}

// PROTOCOL.md §4.2
#[test]
fn frames_signed_by_another_key_are_refused() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        let audience = Audience::Unicast {
            recipient: client_key().public_key().clone(),
            session: f.negotiated.client_view.session_tag,
        };
        // Also the client's own key: a reflected frame is not the server's.
        for forger in [other_key(), client_key()] {
            let frame = seal(&forger, backend, UNICAST, &audience, messages(2)).encode_to_vec();
            assert!(matches!(
                f.at_client.open(&frame),
                Err(SignedFrameError::BadSignature)
            ));
        }
    }
}

// PROTOCOL.md §4.2
#[test]
fn altered_frames_are_refused() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        type Alter = fn(&mut SignedFrame);
        let alterations: [(&str, Alter); 5] = [
            ("message byte", |frame| {
                let mut first = frame.messages[0].to_vec();
                first[2] ^= 0x01;
                frame.messages[0] = first.into();
            }),
            ("message dropped", |frame| {
                frame.messages.pop();
            }),
            ("message appended", |frame| {
                frame.messages.push(messages(1).remove(0))
            }),
            ("messages reordered", |frame| frame.messages.swap(0, 1)),
            ("sequence", |frame| frame.sequence += 1),
        ];
        for (i, (what, alter)) in alterations.into_iter().enumerate() {
            let mut frame =
                SignedFrame::decode(&f.to_client(UNICAST + i as u64, messages(3))[..]).unwrap();
            alter(&mut frame);
            let result = f.at_client.open(&frame.encode_to_vec());
            assert!(
                matches!(result, Err(SignedFrameError::BadSignature)),
                "{what}: {result:?}"
            );
        }
    }
}

// PROTOCOL.md §4.4
#[test]
fn a_replayed_frame_is_refused() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        let frame = f.to_client(UNICAST + 5, messages(1));
        f.at_client.open(&frame).unwrap();
        assert!(matches!(
            f.at_client.open(&frame),
            Err(SignedFrameError::Replayed { sequence }) if sequence == UNICAST + 5
        ));
        // Same for the server's opener.
        let frame = f.to_server(CLIENT_FLOOR, messages(1));
        f.at_server.open(&frame).unwrap();
        assert!(matches!(
            f.at_server.open(&frame),
            Err(SignedFrameError::Replayed { .. })
        ));
    }
}

// PROTOCOL.md §4.3
#[test]
fn frames_below_the_announced_floor_are_refused() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        // Such frames belong to an earlier session: valid signature, wrong time.
        assert_too_old(
            f.at_client.open(&f.to_client(UNICAST - 1, messages(1))),
            UNICAST,
        );
        assert_too_old(
            f.at_client
                .open(&f.broadcast(SERVER_FLOORS.broadcast.unwrap() - 1, "")),
            SERVER_FLOORS.broadcast.unwrap(),
        );
        assert_too_old(
            f.at_server
                .open(&f.to_server(CLIENT_FLOOR - 1, messages(1))),
            CLIENT_FLOOR,
        );
        // The floor itself is the first accepted number.
        f.at_client
            .open(&f.to_client(UNICAST, messages(1)))
            .unwrap();
    }
}

// PROTOCOL.md §4.4
#[test]
fn out_of_order_frames_within_the_window_are_accepted_exactly_once() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        // A fixed permutation of 0..64 (17 is coprime with 64).
        let order: Vec<u64> = (0..64).map(|i| (i * 17) % 64).collect();
        let frames: Vec<_> = order
            .iter()
            .map(|&i| f.to_client(UNICAST + i, messages(1)))
            .collect();
        for frame in &frames {
            f.at_client.open(frame).unwrap();
        }
        for frame in &frames {
            assert!(matches!(
                f.at_client.open(frame),
                Err(SignedFrameError::Replayed { .. })
            ));
        }
    }
}

// PROTOCOL.md §4.4
#[test]
fn frames_further_behind_than_the_window_are_refused() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        let highest = UNICAST + 10 * REPLAY_WINDOW_BITS;
        f.at_client
            .open(&f.to_client(highest, messages(1)))
            .unwrap();
        let oldest = highest - (REPLAY_WINDOW_BITS - 1);
        assert_too_old(
            f.at_client.open(&f.to_client(oldest - 1, messages(1))),
            oldest,
        );
        // The oldest number still inside the window: once, then replay.
        let frame = f.to_client(oldest, messages(1));
        f.at_client.open(&frame).unwrap();
        assert!(matches!(
            f.at_client.open(&frame),
            Err(SignedFrameError::Replayed { .. })
        ));
        // Sliding forward by less than the window keeps what it still covers.
        f.at_client
            .open(&f.to_client(highest + 1, messages(1)))
            .unwrap();
        assert_too_old(f.at_client.open(&frame), oldest + 1);
        let recent = f.to_client(highest - 1, messages(1));
        f.at_client.open(&recent).unwrap();
        assert!(matches!(
            f.at_client.open(&recent),
            Err(SignedFrameError::Replayed { .. })
        ));
    }
}

/// A refusal as misaddressed, with the text PROTOCOL.md §4.5 gives for `why`.
fn assert_misaddressed<T: std::fmt::Debug>(result: Result<T, SignedFrameError>, why: &str) {
    match result {
        Err(err @ SignedFrameError::Misaddressed(_)) => {
            assert_eq!(err.to_string(), format!("signed frame misaddressed: {why}"));
        }
        other => panic!("expected misaddressed ({why}), got {other:?}"),
    }
}

// PROTOCOL.md §4.5
#[test]
fn unicast_to_another_key_is_misaddressed() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        let audience = Audience::Unicast {
            recipient: other_key().public_key().clone(),
            session: f.negotiated.client_view.session_tag,
        };
        let frame = seal(&server_key(), backend, UNICAST, &audience, messages(1)).encode_to_vec();
        assert_misaddressed(f.at_client.open(&frame), "unicast to another key");
        // A frame the client meant for the server cannot be bounced back to it.
        let frame = f.to_server(CLIENT_FLOOR, messages(1));
        assert_misaddressed(f.at_client.open(&frame), "unicast to another key");
        // Refusal left the unicast window untouched.
        f.at_client
            .open(&f.to_client(UNICAST, messages(1)))
            .unwrap();
    }
}

// PROTOCOL.md §4.5
#[test]
fn broadcast_audience_is_checked_against_our_identity() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        let floor = SERVER_FLOORS.broadcast.unwrap();
        assert_misaddressed(
            f.at_client.open(&f.broadcast(floor, IDENTITY)),
            "broadcast excludes us",
        );
        assert_eq!(
            f.at_client.open(&f.broadcast(floor, "")).unwrap(),
            messages(1)
        );
        f.at_client.open(&f.broadcast(floor + 1, "seq-b")).unwrap();
        // Broadcast and unicast numbers are separate streams.
        f.at_client
            .open(&f.to_client(UNICAST, messages(1)))
            .unwrap();

        // Not knowing our identity, any exclusion might be us.
        let mut anonymous = FrameOpener::new(
            &f.negotiated.client_view,
            client_key().public_key().clone(),
            None,
            backend,
        );
        assert_misaddressed(
            anonymous.open(&f.broadcast(floor, "seq-b")),
            "broadcast excludes us",
        );
        anonymous.open(&f.broadcast(floor, "")).unwrap();
    }
}

// PROTOCOL.md §4.5
#[test]
fn broadcast_from_a_peer_without_broadcast_floor_is_misaddressed() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        // Clients never broadcast: the server's view has no broadcast floor.
        assert_eq!(f.negotiated.server_view.peer_floors.broadcast, None);
        let audience = Audience::Broadcast {
            exclude: String::new(),
        };
        let frame =
            seal(&client_key(), backend, CLIENT_FLOOR, &audience, messages(1)).encode_to_vec();
        assert_misaddressed(f.at_server.open(&frame), "peer does not broadcast");
        // A client broadcast excluding anyone is refused first for that.
        let audience = Audience::Broadcast {
            exclude: "seq-b".into(),
        };
        let frame =
            seal(&client_key(), backend, CLIENT_FLOOR, &audience, messages(1)).encode_to_vec();
        assert_misaddressed(f.at_server.open(&frame), "broadcast excludes us");
    }
}

// PROTOCOL.md §4.4
#[test]
fn forged_frames_do_not_move_the_window() {
    for &backend in CryptoBackend::available() {
        let mut f = Fixture::new(backend);
        let audience = Audience::Unicast {
            recipient: client_key().public_key().clone(),
            session: f.negotiated.client_view.session_tag,
        };
        let forge = |sequence| {
            seal(&other_key(), backend, sequence, &audience, messages(1)).encode_to_vec()
        };
        // Far ahead: had it counted, everything genuine below would be too old.
        let far = UNICAST + 100 * REPLAY_WINDOW_BITS;
        assert!(matches!(
            f.at_client.open(&forge(far)),
            Err(SignedFrameError::BadSignature)
        ));
        f.at_client
            .open(&f.to_client(UNICAST, messages(1)))
            .unwrap();
        // At the same number: had it counted, the genuine frame would be a replay.
        assert!(matches!(
            f.at_client.open(&forge(UNICAST + 1)),
            Err(SignedFrameError::BadSignature)
        ));
        f.at_client
            .open(&f.to_client(UNICAST + 1, messages(1)))
            .unwrap();
        // And the genuine frame far ahead is still new.
        f.at_client.open(&f.to_client(far, messages(1))).unwrap();
    }
}

// PROTOCOL.md §4.3
#[test]
fn sequence_counters_start_at_the_clock_and_count_up() {
    let counter = SequenceCounter::from_clock(t0());
    let start = unix_nanos(t0()) as u64;
    assert_eq!(counter.floor(), start);
    assert_eq!(counter.next(), start);
    assert_eq!(counter.next(), start + 1);
    assert_eq!(counter.floor(), start + 2);

    // A counter made later (after a restart) starts above the earlier one.
    let later = SequenceCounter::from_clock(t0() + Duration::from_nanos(1));
    assert!(later.floor() > start);
    assert_eq!(later.floor(), start + 1);
    let much_later = SequenceCounter::from_clock(t0() + Duration::from_secs(1));
    assert!(much_later.floor() > counter.floor());

    assert_eq!(SequenceCounter::starting_at(7).next(), 7);
}

/// A sealed frame and an opener that accepts it, for bit-flip checks.
fn sealed(backend: CryptoBackend, n: usize) -> (Vec<u8>, FrameOpener, Vec<Bytes>) {
    let f = Fixture::new(backend);
    let batch = messages(n);
    let frame = f.to_client(UNICAST + 42, batch.clone());
    let mut check = f.at_client.clone();
    assert_eq!(check.open(&frame).unwrap(), batch, "unflipped frame opens");
    // The signature is the compact 64-byte r || s: no recovery-id twin.
    let signature = SignedFrame::decode(&frame[..]).unwrap().signature;
    assert_eq!(signature.len(), 64);
    (frame, f.at_client, batch)
}

fn assert_flip_refused(frame: &[u8], opener: &FrameOpener, batch: &[Bytes], bit: usize) {
    let mut flipped = frame.to_vec();
    flipped[bit / 8] ^= 1 << (bit % 8);
    // The signature is 64 bytes without a recovery id, so every bit counts.
    if let Ok(opened) = opener.clone().open(&flipped) {
        panic!(
            "bit {bit} (byte {}) flipped, frame still opens (same messages: {})",
            bit / 8,
            opened == batch
        );
    }
}

// PROTOCOL.md §4.1
#[test]
fn every_single_bit_flip_of_a_one_message_frame_is_refused() {
    // Small enough to try every bit, with every backend.
    for &backend in CryptoBackend::available() {
        let (frame, opener, batch) = sealed(backend, 1);
        for bit in 0..frame.len() * 8 {
            assert_flip_refused(&frame, &opener, &batch, bit);
        }
    }
}

fn flip_config() -> Config {
    Config {
        cases: 256,
        // Deterministic, and no regression files written into the tree.
        rng_seed: RngSeed::Fixed(0x5167_4ed0),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(flip_config())]

    // PROTOCOL.md §4.1
    #[test]
    fn a_single_bit_flip_never_opens(bit in any::<prop::sample::Index>(), large in any::<bool>()) {
        thread_local! {
            static FRAMES: Vec<(Vec<u8>, FrameOpener, Vec<Bytes>)> =
                CryptoBackend::available()
                    .iter()
                    .flat_map(|&b| [sealed(b, 1), sealed(b, 64)])
                    .collect();
        }
        FRAMES.with(|frames| {
            for (frame, opener, batch) in frames {
                if (batch.len() > 1) != large {
                    continue;
                }
                assert_flip_refused(frame, opener, batch, bit.index(frame.len() * 8));
            }
        });
    }
}

// PROTOCOL.md §4.2
#[test]
fn unicast_frames_do_not_cross_sessions() {
    // Two sessions between the same keys: a frame sealed for one must not
    // open in the other, even with a fresh sequence number.
    for &backend in CryptoBackend::available() {
        let first = Fixture::new(backend);
        let mut second = Fixture::new_with_nonce(backend, 99);
        assert_ne!(
            first.negotiated.client_view.session_tag,
            second.negotiated.client_view.session_tag
        );
        let frame = first.to_client(UNICAST + 7, messages(1));
        assert!(matches!(
            second.at_client.open(&frame),
            Err(SignedFrameError::BadSignature)
        ));
    }
}
