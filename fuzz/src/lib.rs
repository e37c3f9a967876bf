//! Invariant checks behind the fuzz targets in `fuzz_targets/`.
//!
//! Each `check_*` function takes the raw fuzzer input and panics when an
//! invariant breaks. The regression tests (`tests/it/fuzz_regressions.rs`)
//! include this file, so a crashing input replays through exactly the check
//! that found it, and they replay the committed seed corpus too.
//!
//! Fixtures follow docs/PROTOCOL.md Appendix A: client key = scalar 1 trusted
//! as `seq-a`, server key = scalar 2, clock and nonce of the worked example,
//! so the Appendix A bytes are valid inputs that reach the accepting paths.

use std::{
    collections::HashSet,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use publisher_transport::{
    CodecError, CryptoBackend, HandshakeError, PublicKey, SecretKey, Signature, SignedFrameError,
    SignedFramesPolicy, TrustStore,
    codec::{DEFAULT_MAX_FRAME_SIZE, FrameCodec, HANDSHAKE_MAX_FRAME_SIZE, frame_body},
    crypto::recover,
    decode_bound::{self, BoundedMessage, Source},
    handshake::{
        ClientHandshake, ClientHandshakeConfig, SequenceFloors, ServerHandshake,
        ServerHandshakeConfig, ServerVerdict, SignedFrameSession, client_transcript_digest,
        go_request_digest, server_transcript_digest, session_tag,
    },
    proto::{
        Message, Payload,
        rollup::v1::{
            Decided, DisconnectMessage, HandshakeRequest, HandshakeResponse, Ping, Vote, XtId,
            disconnect_message::Reason,
        },
        transport::v1::{
            FrameBatch, HandshakeRequestExt, HandshakeResponseExt, SignedFrame, signed_frame,
        },
    },
    signed::{Audience, FrameOpener, frame_digest, seal},
};
use tokio_util::codec::Decoder;

// ---------------------------------------------------------------------------
// Fixtures (docs/PROTOCOL.md Appendix A)
// ---------------------------------------------------------------------------

/// The worked example's clock: 2023-11-14T22:13:20Z in unix nanos.
pub const T0_NANOS: i64 = 1_700_000_000_000_000_000;
/// Identity under which the server trusts the client key.
pub const CLIENT_IDENTITY: &str = "seq-a";
/// A second trusted identity (another key), so identities are not all alike.
pub const OTHER_IDENTITY: &str = "seq-b";
/// The nonce of the worked example: 00 01 … 0f.
pub const NONCE: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
/// The client's sequence floor (Appendix A).
pub const CLIENT_FLOOR: u64 = T0_NANOS as u64;
/// The server's floors (Appendix A): unicast T0 + 1000, broadcast T0 + 2000.
pub const SERVER_FLOORS: SequenceFloors = SequenceFloors {
    unicast: T0_NANOS as u64 + 1000,
    broadcast: Some(T0_NANOS as u64 + 2000),
};
const MAX_SKEW: Duration = Duration::from_secs(30);

/// Appendix A, Go-mode request body (137 bytes).
pub const APPENDIX_A_GO_REQUEST: &str = "088080a8b1e39fe7cb1712210279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f817981a4112a4d5d2d5f72589e544f6bb4ab9dfacd0172316735cf8d54a94a7c21454dadf57d7614cead0caa2f314a8b1f86229b44e1f7199c8e2e0a749a9c297232defb30122057365712d612a10000102030405060708090a0b0c0d0e0f";
/// Appendix A, extension fields appended to the Go request (258 bytes in all).
pub const APPENDIX_A_REQUEST_EXT: &str = "a00601a80603b2062102c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5b8068080a8b1e39fe7cb17c2064108dfbffe446d1bb2376e08ec428112d241a9f88e7172cb78bd1aa8806c5d013f30ceebc1e684b33c90635acef177624faa12ef50ecd2c133d614cfd6f945582b00";
/// Appendix A, extended response body (169 bytes).
pub const APPENDIX_A_RESPONSE: &str = "08011a197365712d612d31373030303030303030303030303030303030a00601a80603b2062102c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5ba06057365712d61c006e887a8b1e39fe7cb17c806d08fa8b1e39fe7cb17d2064110b5260a0a453fc4ce2cc330774f1bda8fd63a494de0153e23ab16a76dac86f940cf89440036565e7dfb5f494a16b9f8932c25209354d6a5908c7dde8a7a3b8a01";
/// Appendix A, unicast signed frame from the client (166 bytes).
pub const APPENDIX_A_UNICAST_FRAME: &str = "088080a8b1e39fe7cb171a2102c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee522350a057365712d611a2c0a040000000112220a20abababababababababababababababababababababababababababababababab18012a407b6dbab4d22bbf32baa228b832361b655178f509706cf2a0272699c50082bba53a709f038e379078b2d6a8ed4a39bf5bc3f7690a768978169f7c058d6ed4dcc2";
/// Appendix A, broadcast signed frame from the server (131 bytes).
pub const APPENDIX_A_BROADCAST_FRAME: &str = "08d08fa8b1e39fe7cb17120022330a097075626c697368657222260a220a20abababababababababababababababababababababababababababababababab10012a4063c0d7163302cadeb75a174d7db18f47a1a5ce852f73cfb50b1c7f32afd718f14e06f972a86a73a326e20ee01a8caa0efb6dd8f7db355274cc8b54443c58348f";

/// Decodes one of the hex constants above (spaces allowed).
pub fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text.replace(' ', "")).expect("valid hex constant")
}

/// The fixture clock.
pub fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(T0_NANOS as u64)
}

fn scalar_key(scalar: u8) -> SecretKey {
    let mut bytes = [0u8; 32];
    bytes[31] = scalar;
    SecretKey::from_bytes(&bytes).expect("small scalars are valid keys")
}

/// Client key: the scalar 1.
pub fn client_key() -> &'static Arc<SecretKey> {
    static KEY: OnceLock<Arc<SecretKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(scalar_key(1)))
}

/// Server key: the scalar 2.
pub fn server_key() -> &'static Arc<SecretKey> {
    static KEY: OnceLock<Arc<SecretKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(scalar_key(2)))
}

/// The key trusted as [`OTHER_IDENTITY`]: the scalar 3.
pub fn other_key() -> &'static Arc<SecretKey> {
    static KEY: OnceLock<Arc<SecretKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(scalar_key(3)))
}

/// The server's trust store: client key as `seq-a`, Go-compatible so that
/// Go-mode requests reach every check, and key 3 as `seq-b`, extended only.
pub fn trust() -> &'static Arc<TrustStore> {
    static TRUST: OnceLock<Arc<TrustStore>> = OnceLock::new();
    TRUST.get_or_init(|| {
        let trust = TrustStore::new();
        trust
            .add_go_compatible(CLIENT_IDENTITY, client_key().public_key().clone())
            .expect("fresh store");
        trust
            .add(OTHER_IDENTITY, other_key().public_key().clone())
            .expect("fresh store");
        Arc::new(trust)
    })
}

fn backends() -> &'static [CryptoBackend] {
    CryptoBackend::available()
}

fn compressed(key: &PublicKey) -> Bytes {
    Bytes::copy_from_slice(key.as_compressed())
}

// ---------------------------------------------------------------------------
// 1. frame_decoder
// ---------------------------------------------------------------------------

/// Body limits a decoder may run with, including the real ones.
const FRAME_LIMITS: [usize; 8] = [
    1,
    2,
    7,
    255,
    256,
    4096,
    HANDSHAKE_MAX_FRAME_SIZE,
    DEFAULT_MAX_FRAME_SIZE,
];
/// Capacity a decoder may hold beyond the bytes it was given.
const CAPACITY_SLACK: usize = 64;

/// A tiny deterministic generator for chunk sizes.
struct XorShift(u32);

impl XorShift {
    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

/// Input: `[limits, chunking, flags] || stream`.
///
/// - `limits`: bits 0-2 pick the body limit; bit 3 raises it to the default
///   10 MiB after `limits >> 4` frames, as a session does after its handshake.
/// - `chunking`: bits 0-2 give the largest chunk (2^n bytes), the rest seeds
///   the chunk sizes (zero-length chunks included).
/// - `flags`: bit 0 preallocates the read buffer to the stream's length.
///
/// Checks: every frame is 1..=max bytes; re-framing the frames gives back
/// exactly the consumed prefix of the stream; no complete frame is withheld;
/// errors are typed and match the announced length; `decode` never grows the
/// buffer, and a preallocated buffer never outgrows the stream.
pub fn check_frame_decoder(data: &[u8]) {
    let Some((&[limits, chunking, flags], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mut max = FRAME_LIMITS[usize::from(limits & 7)];
    let raise_after = (limits & 8 != 0).then_some(usize::from(limits >> 4));
    let largest_chunk = 1usize << (chunking & 7);
    let mut rng = XorShift(0x9e37_79b9 ^ (u32::from(chunking) << 8) ^ (u32::from(flags) << 16));
    let preallocated = flags & 1 != 0;

    let mut codec = FrameCodec::new(max);
    let mut buf = if preallocated {
        BytesMut::with_capacity(stream.len())
    } else {
        BytesMut::new()
    };
    let capacity_limit = stream.len() + CAPACITY_SLACK;
    let mut fed = 0;
    // Length of the stream prefix that the decoded frames re-encode to.
    let mut reframed = 0;
    let mut frames = 0usize;
    let mut last_chunk_empty = false;
    loop {
        let mut chunk = rng.next() as usize % (largest_chunk + 1);
        if chunk == 0 && last_chunk_empty {
            chunk = 1;
        }
        last_chunk_empty = chunk == 0;
        let chunk = chunk.min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + chunk]);
        fed += chunk;

        loop {
            let before = buf.capacity();
            let result = codec.decode(&mut buf);
            assert!(
                buf.capacity() <= before,
                "decode grew the buffer from {before} to {}",
                buf.capacity()
            );
            if preallocated {
                assert!(
                    buf.capacity() <= capacity_limit,
                    "buffer capacity {} beyond {} bytes given",
                    buf.capacity(),
                    stream.len()
                );
            }
            match result {
                Ok(Some(frame)) => {
                    assert!(
                        (1..=max).contains(&frame.len()),
                        "frame of {} bytes under limit {max}",
                        frame.len()
                    );
                    let framed = frame_body(&frame, max).expect("a decoded frame re-encodes");
                    assert_eq!(
                        &framed[..],
                        &stream[reframed..reframed + framed.len()],
                        "frame {frames} does not re-encode to the bytes it came from"
                    );
                    reframed += framed.len();
                    frames += 1;
                    if raise_after == Some(frames) {
                        max = DEFAULT_MAX_FRAME_SIZE;
                        codec.set_max_frame_size(max);
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    assert_eq!(codec.pending_body(), None, "error inside a frame body");
                    check_codec_error(&err, &stream[reframed..], max);
                    return;
                }
            }
        }

        // Every byte fed is in a frame, in the buffer, or the consumed prefix
        // of the frame being read.
        let prefix = if codec.pending_body().is_some() { 4 } else { 0 };
        assert_eq!(fed, reframed + prefix + buf.len(), "bytes lost or invented");
        if fed == stream.len() {
            break;
        }
    }
    match codec.pending_body() {
        Some(len) => {
            assert!((1..=max).contains(&len), "pending body of {len} bytes");
            assert_eq!(
                stream[reframed..reframed + 4],
                (len as u32).to_be_bytes(),
                "pending length is not the announced one"
            );
            assert!(buf.len() < len, "a complete frame was withheld");
        }
        None => assert!(buf.len() < 4, "a complete length prefix was withheld"),
    }
}

/// An error must be the one the next announced length calls for.
fn check_codec_error(err: &CodecError, rest: &[u8], max: usize) {
    let prefix: [u8; 4] = rest
        .get(..4)
        .and_then(|p| p.try_into().ok())
        .unwrap_or_else(|| panic!("{err} before a full length prefix"));
    let len = u32::from_be_bytes(prefix) as usize;
    match err {
        CodecError::EmptyFrame => assert_eq!(len, 0, "{err} for length {len}"),
        CodecError::FrameTooLarge { size, max: limit } => {
            assert_eq!((*size, *limit), (len, max), "{err} for length {len}");
            assert!(len > max, "{err} for length {len}");
        }
        CodecError::UnexpectedProtocol { protocol } => {
            assert!(len > max, "{err} for length {len} within {max}");
            let expected = match prefix {
                [0x16, 0x03, ..] => "TLS",
                [b'G', b'E', b'T', b' '] | [b'P', b'O', b'S', b'T'] | [b'P', b'R', b'I', b' '] => {
                    "HTTP"
                }
                _ => panic!("{err} for prefix {prefix:02x?}"),
            };
            assert_eq!(*protocol, expected);
        }
        other => panic!("decode returned an untyped error: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 2. message_decode
// ---------------------------------------------------------------------------

/// Every body type the transport parses from untrusted bytes: decoding from
/// a slice and from `Bytes` agree, and whatever decodes re-encodes to bytes
/// that decode to an equal value and re-encode identically. The decode
/// bound's pre-scan never panics and accepts whatever prost decodes.
pub fn check_message_decode(data: &[u8]) {
    scanned::<Message>(data);
    scanned::<SignedFrame>(data);
    scanned::<FrameBatch>(data);
    if let Some(message) = round_trip::<Message>(data) {
        // Used in logs and metric labels for anything that decodes.
        let _ = publisher_transport::proto::payload_kind(&message);
    }
    round_trip::<HandshakeRequest>(data);
    round_trip::<HandshakeRequestExt>(data);
    round_trip::<HandshakeResponse>(data);
    round_trip::<HandshakeResponseExt>(data);
    round_trip::<SignedFrame>(data);
    round_trip::<FrameBatch>(data);
    round_trip::<DisconnectMessage>(data);
}

fn scanned<M: BoundedMessage>(data: &[u8]) {
    let name = std::any::type_name::<M>();
    let shared = decode_bound::estimate::<M>(data, Source::Shared);
    let copied = decode_bound::estimate::<M>(data, Source::Copied);
    if M::decode(data).is_ok() {
        let (Some(shared), Some(copied)) = (shared, copied) else {
            panic!("{name}: prost decodes what the decode bound's scan refuses");
        };
        assert!(
            shared <= copied,
            "{name}: sharing bytes costs more than copying"
        );
    }
}

fn round_trip<M>(data: &[u8]) -> Option<M>
where
    M: prost::Message + Default + PartialEq + std::fmt::Debug,
{
    let name = std::any::type_name::<M>();
    let from_slice = M::decode(data);
    let from_bytes = M::decode(Bytes::copy_from_slice(data));
    let value = match (from_slice, from_bytes) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "{name}: slice and Bytes decodings differ");
            a
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string(), "{name}: errors differ");
            return None;
        }
        (a, b) => panic!("{name}: slice gave {a:?}, Bytes gave {b:?}"),
    };
    let encoded = value.encode_to_vec();
    assert_eq!(encoded.len(), value.encoded_len(), "{name}: encoded_len");
    let again = M::decode(encoded.as_slice())
        .unwrap_or_else(|err| panic!("{name}: own encoding does not decode: {err}"));
    assert_eq!(again, value, "{name}: round trip changed the value");
    assert_eq!(
        again.encode_to_vec(),
        encoded,
        "{name}: encoding is not stable"
    );
    Some(value)
}

// ---------------------------------------------------------------------------
// 3. handshake_server
// ---------------------------------------------------------------------------

/// Server settings under test: every policy, and Go mode (no key).
fn server_configs() -> [(SignedFramesPolicy, bool); 4] {
    [
        (SignedFramesPolicy::Offer, true),
        (SignedFramesPolicy::Require, true),
        (SignedFramesPolicy::Off, true),
        (SignedFramesPolicy::Offer, false),
    ]
}

fn server_handshake(
    policy: SignedFramesPolicy,
    keyed: bool,
    backend: CryptoBackend,
) -> ServerHandshake {
    let key = keyed.then(|| server_key().clone());
    let mut config = ServerHandshakeConfig::new(trust().clone(), key);
    config.signed_frames = policy;
    config.max_clock_skew = MAX_SKEW;
    config.backend = backend;
    ServerHandshake::new(config)
}

/// The input is a request body, answered at the Appendix A clock by servers
/// of every policy and crypto back-end (each with fresh nonce memory).
///
/// Checks: a refusal is a plain Go `HandshakeResponse{accepted: false}` and a
/// `Message{Disconnect}` with the matching reason and text, both fitting the
/// handshake frame limit; an acceptance only for a request whose signature
/// recovers to the claimed key, which is trusted as the accepted identity,
/// with a response whose every field (and proof) is what the request called
/// for; the same request again is refused as replayed; back-ends agree byte
/// for byte.
pub fn check_handshake_server(data: &[u8]) {
    for (policy, keyed) in server_configs() {
        let mut outcomes = Vec::new();
        for &backend in backends() {
            let server = server_handshake(policy, keyed, backend);
            let verdict = server.respond(data, t0(), SERVER_FLOORS);
            let outcome = match verdict {
                ServerVerdict::Accept { response, client } => {
                    check_accept(data, &response, &client, policy, keyed, backend);
                    match server.respond(data, t0(), SERVER_FLOORS) {
                        ServerVerdict::Reject {
                            error: HandshakeError::Replayed,
                            ..
                        } => {}
                        other => panic!("a replayed request was not refused: {other:?}"),
                    }
                    format!("accept {} {client:?}", hex::encode(&response))
                }
                ServerVerdict::Reject {
                    response,
                    disconnect,
                    error,
                } => {
                    check_reject(data, &response, &disconnect, &error);
                    format!("reject {error}")
                }
                other => panic!("unknown verdict {other:?}"),
            };
            outcomes.push(outcome);
        }
        assert!(
            outcomes.windows(2).all(|w| w[0] == w[1]),
            "back-ends disagree ({policy:?}, key: {keyed}): {outcomes:#?}"
        );
    }
}

fn check_reject(data: &[u8], response: &[u8], disconnect: &[u8], error: &HandshakeError) {
    let allowed = [
        "malformed",
        "timestamp_future",
        "timestamp_old",
        "bad_signature",
        "untrusted_key",
        "go_mode_refused",
        "wrong_audience",
        "feature_required",
    ];
    assert!(
        allowed.contains(&error.kind()),
        "server refused with a client-side error: {error:?}"
    );
    let decodes =
        HandshakeRequest::decode(data).is_ok() && HandshakeRequestExt::decode(data).is_ok();
    assert_eq!(
        matches!(error, HandshakeError::Malformed { .. }),
        !decodes,
        "malformed iff the request does not decode: {error}"
    );
    for (what, body) in [("response", response), ("disconnect", disconnect)] {
        assert!(
            frame_body(body, HANDSHAKE_MAX_FRAME_SIZE).is_ok(),
            "refusal {what} of {} bytes does not fit a handshake frame",
            body.len()
        );
    }
    // A bad signature is answered like an untrusted key (PROTOCOL.md §2.2).
    let text = match error {
        HandshakeError::BadSignature(_) => "untrusted public key - connection rejected".to_owned(),
        error => error.to_string(),
    };
    let refusal = HandshakeResponse::decode(response).expect("refusal decodes");
    assert_eq!(
        refusal,
        HandshakeResponse {
            accepted: false,
            error: text.clone(),
            session_id: String::new(),
        }
    );
    assert_eq!(
        refusal.encode_to_vec(),
        response,
        "a refusal is the plain Go response, without extension fields"
    );
    let reason = if matches!(error, HandshakeError::Malformed { .. }) {
        Reason::ProtocolError
    } else {
        Reason::AuthFailure
    };
    let message = Message::decode(disconnect).expect("disconnect decodes");
    assert_eq!(
        message,
        Message {
            sender_id: String::new(),
            payload: Some(Payload::Disconnect(DisconnectMessage {
                reason: reason as i32,
                details: text,
            })),
        }
    );
}

fn check_accept(
    data: &[u8],
    response: &[u8],
    client: &publisher_transport::handshake::AcceptedClient,
    policy: SignedFramesPolicy,
    keyed: bool,
    backend: CryptoBackend,
) {
    let request = HandshakeRequest::decode(data).expect("accepted request decodes");
    let ext = HandshakeRequestExt::decode(data).expect("accepted request decodes");
    let skew = i128::from(request.timestamp) - i128::from(T0_NANOS);
    assert!(
        skew.abs() <= MAX_SKEW.as_nanos() as i128,
        "accepted with skew {skew}"
    );
    assert!((1..=64).contains(&request.nonce.len()), "nonce length");

    // The claimed key signed the request and is trusted as the identity.
    let claimed = PublicKey::from_slice(&request.public_key).expect("accepted key parses");
    let signature = Signature::from_slice(&request.signature).expect("accepted signature parses");
    let digest = go_request_digest(request.timestamp, &request.nonce);
    for &other in backends() {
        assert_eq!(
            recover(other, &digest, &signature).ok().as_ref(),
            Some(&claimed),
            "accepted a signature that does not recover to the claimed key ({other})"
        );
    }
    assert_eq!(client.public_key, claimed);
    assert_eq!(
        trust().identity_of(&claimed).as_deref(),
        Some(client.identity.as_str()),
        "accepted key is not trusted as the accepted identity"
    );
    let expected_key = match client.identity.as_str() {
        CLIENT_IDENTITY => client_key().public_key(),
        OTHER_IDENTITY => other_key().public_key(),
        other => panic!("accepted unknown identity {other:?}"),
    };
    assert_eq!(&claimed, expected_key);
    let client_id: String = request.client_id.chars().take(256).collect();
    assert_eq!(client.client_id, client_id);

    let answer = HandshakeResponse::decode(response).expect("acceptance decodes");
    let session_id = format!("{}-{T0_NANOS}", client.identity);
    assert_eq!(
        answer,
        HandshakeResponse {
            accepted: true,
            error: String::new(),
            session_id: session_id.clone(),
        }
    );
    assert_eq!(client.session_id, session_id);
    assert!(
        frame_body(response, HANDSHAKE_MAX_FRAME_SIZE).is_ok(),
        "acceptance does not fit a handshake frame"
    );
    let answer_ext = HandshakeResponseExt::decode(response).expect("acceptance decodes");

    let extended = keyed && ext.ext_version >= 1;
    assert_eq!(client.extended, extended);
    if !extended {
        assert_ne!(
            policy,
            SignedFramesPolicy::Require,
            "Require accepted a Go-mode client"
        );
        assert_eq!(
            answer_ext,
            HandshakeResponseExt::default(),
            "Go-mode answer"
        );
        assert!(client.signed_frames.is_none());
        return;
    }

    let ext_signature = Signature::from_slice(&ext.ext_signature).expect("ext signature parses");
    let transcript = client_transcript_digest(&request, &ext);
    assert_eq!(
        recover(backend, &transcript, &ext_signature).ok().as_ref(),
        Some(&claimed),
        "accepted an extension signature by another key"
    );
    let own = server_key().public_key();
    assert!(
        ext.expected_server_key.is_empty()
            || ext.expected_server_key[..] == own.as_compressed()[..],
        "accepted a request addressed to another server"
    );
    let offered = ext.features & 1 != 0;
    let signed = if policy == SignedFramesPolicy::Off {
        false
    } else if policy == SignedFramesPolicy::Require {
        assert!(
            offered,
            "Require accepted a client not offering signed frames"
        );
        true
    } else {
        offered
    };
    let floors = if signed {
        (
            SERVER_FLOORS.unicast,
            SERVER_FLOORS.broadcast.unwrap_or(u64::MAX),
        )
    } else {
        (0, 0)
    };
    assert_eq!(answer_ext.ext_version, 1);
    // Delivery acks (4) and requests (8) are granted exactly when offered
    // (the server allows them).
    let acks = ext.features & 4;
    let requests = ext.features & 8;
    assert_eq!(answer_ext.features, 2 | u32::from(signed) | acks | requests);
    assert_eq!(client.delivery_acks, acks != 0);
    assert_eq!(client.requests, requests != 0);
    assert_eq!(answer_ext.server_public_key, compressed(own));
    assert_eq!(answer_ext.identity, client.identity);
    assert_eq!(
        (answer_ext.unicast_floor, answer_ext.broadcast_floor),
        floors
    );
    let proof = Signature::from_slice(&answer_ext.server_signature).expect("proof parses");
    assert_eq!(
        recover(
            backend,
            &server_transcript_digest(data, &answer, &answer_ext),
            &proof
        )
        .ok()
        .as_ref(),
        Some(own),
        "server proof does not recover to the server key"
    );
    match &client.signed_frames {
        None => assert!(!signed, "signed frames negotiated but not set up"),
        Some(session) => {
            assert!(signed, "signed frames set up but not negotiated");
            assert_eq!(
                session,
                &SignedFrameSession {
                    session_tag: session_tag(data, response),
                    peer_key: claimed,
                    peer_floors: SequenceFloors {
                        unicast: ext.sequence_floor,
                        broadcast: None,
                    },
                    local_floors: SERVER_FLOORS,
                }
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 4. handshake_client
// ---------------------------------------------------------------------------

/// Client settings under test.
#[derive(Debug, Clone, Copy)]
enum ClientMode {
    /// Appendix A: extended, signed frames offered, expects the server key.
    Mutual,
    /// Extended, signed frames offered, any server key.
    AnyServer,
    /// Go mode.
    Go,
}

fn client_handshake(mode: ClientMode, backend: CryptoBackend) -> ClientHandshake {
    let mut config = ClientHandshakeConfig::new(client_key().clone(), CLIENT_IDENTITY);
    config.backend = backend;
    match mode {
        ClientMode::Mutual => {
            config.expected_server_key = Some(server_key().public_key().clone());
        }
        ClientMode::AnyServer => {}
        ClientMode::Go => config.extensions = false,
    }
    ClientHandshake::start(config, t0(), NONCE, CLIENT_FLOOR)
}

/// The input is a response body to the Appendix A request (and to the same
/// request without an expected key, and in Go mode).
///
/// Checks: success only for an accepting response; a refusal carries the
/// server's text; a client expecting a key succeeds only with a proof by that
/// key; any proven key's proof recovers to it over our own request; the
/// signed-frame session is the one the response announced; back-ends agree.
pub fn check_handshake_client(data: &[u8]) {
    for mode in [ClientMode::Mutual, ClientMode::AnyServer, ClientMode::Go] {
        let mut outcomes = Vec::new();
        for &backend in backends() {
            let client = client_handshake(mode, backend);
            let request = client.request().clone();
            let outcome = match client.finish(data) {
                Ok(session) => {
                    check_client_ok(mode, backend, &request, data, &session);
                    format!("ok {session:?}")
                }
                Err(error) => {
                    check_client_err(data, &error);
                    format!("err {error}")
                }
            };
            outcomes.push(outcome);
        }
        assert!(
            outcomes.windows(2).all(|w| w[0] == w[1]),
            "back-ends disagree ({mode:?}): {outcomes:#?}"
        );
    }
}

fn check_client_err(data: &[u8], error: &HandshakeError) {
    let allowed = [
        "malformed",
        "rejected",
        "server_not_authenticated",
        "wrong_server_key",
        "bad_server_signature",
    ];
    assert!(
        allowed.contains(&error.kind()),
        "client failed with a server-side error: {error:?}"
    );
    match HandshakeResponse::decode(data) {
        Err(_) => assert!(matches!(error, HandshakeError::Malformed { .. })),
        Ok(answer) if !answer.accepted => assert!(
            matches!(error, HandshakeError::Rejected { reason } if *reason == answer.error),
            "refusal reported as {error:?}"
        ),
        Ok(_) => {}
    }
}

fn check_client_ok(
    mode: ClientMode,
    backend: CryptoBackend,
    request: &[u8],
    data: &[u8],
    session: &publisher_transport::handshake::ServerSession,
) {
    let answer = HandshakeResponse::decode(data).expect("accepted response decodes");
    assert!(answer.accepted, "succeeded on a refusal");
    assert_eq!(session.session_id, answer.session_id);
    let ext = HandshakeResponseExt::decode(data).expect("accepted response decodes");
    let proven = !matches!(mode, ClientMode::Go) && ext.ext_version >= 1;
    let Some(server) = &session.server_key else {
        assert!(!proven, "an extended answer succeeded without a proven key");
        assert!(
            !matches!(mode, ClientMode::Mutual),
            "mutual authentication succeeded without a server key"
        );
        assert_eq!((&session.identity, &session.signed_frames), (&None, &None));
        return;
    };
    assert!(proven, "a key was proven without extensions");
    if matches!(mode, ClientMode::Mutual) {
        assert_eq!(
            server,
            server_key().public_key(),
            "succeeded with a server key other than the expected one"
        );
    }
    assert_eq!(
        &PublicKey::from_slice(&ext.server_public_key).expect("proven key parses"),
        server
    );
    let proof = Signature::from_slice(&ext.server_signature).expect("proof parses");
    let digest = server_transcript_digest(request, &answer, &ext);
    for &other in backends() {
        assert_eq!(
            recover(other, &digest, &proof).ok().as_ref(),
            Some(server),
            "accepted a server proof that does not recover to its key ({other}, via {backend})"
        );
    }
    assert_eq!(session.identity.as_deref(), Some(ext.identity.as_str()));
    let signed = ext.features & 1 != 0;
    assert_eq!(session.signed_frames.is_some(), signed);
    if let Some(frames) = &session.signed_frames {
        assert_eq!(
            frames,
            &SignedFrameSession {
                session_tag: session_tag(request, data),
                peer_key: server.clone(),
                peer_floors: SequenceFloors {
                    unicast: ext.unicast_floor,
                    broadcast: Some(ext.broadcast_floor),
                },
                local_floors: SequenceFloors {
                    unicast: CLIENT_FLOOR,
                    broadcast: None,
                },
            }
        );
    }
}

// ---------------------------------------------------------------------------
// 5. signed_open
// ---------------------------------------------------------------------------

/// One receiving side of the fixture session.
pub struct Side {
    /// Who receives (for messages).
    pub name: &'static str,
    /// The sender's key, authenticated by the handshake.
    pub peer_key: PublicKey,
    /// Our key.
    pub local_key: PublicKey,
    /// Our identity as the peer knows it.
    pub local_identity: Option<String>,
    /// The session's parameters as this side sees them.
    pub session: SignedFrameSession,
}

impl Side {
    /// A fresh opener of this side.
    pub fn opener(&self, backend: CryptoBackend) -> FrameOpener {
        FrameOpener::new(
            &self.session,
            self.local_key.clone(),
            self.local_identity.clone(),
            backend,
        )
    }
}

/// A valid frame sealed once by the fixture session.
pub struct BaseFrame {
    /// What it is.
    pub name: &'static str,
    /// Index into [`SignedOpenFixture::sides`] of the side it is for.
    pub side: usize,
    /// Its body.
    pub body: Bytes,
    /// Its decoded value.
    pub frame: SignedFrame,
}

/// A real handshake at the Appendix A parameters and frames sealed in it.
pub struct SignedOpenFixture {
    /// `[server (frames from the client), client (frames from the server)]`.
    pub sides: [Side; 2],
    /// Valid frames to mutate.
    pub bases: Vec<BaseFrame>,
}

fn encoded(message: Message) -> Bytes {
    message.encode_to_vec().into()
}

/// Appendix A's unicast message: a vote from `seq-a`.
fn vote_message() -> Bytes {
    encoded(Message {
        sender_id: CLIENT_IDENTITY.into(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from_static(&[0, 0, 0, 1]),
            xt_id: Some(XtId {
                hash: Bytes::from(vec![0xab; 32]),
            }),
            vote: true,
        })),
    })
}

/// Appendix A's broadcast message: a decision from the publisher.
fn decided_message() -> Bytes {
    encoded(Message {
        sender_id: "publisher".into(),
        payload: Some(Payload::Decided(Decided {
            xt_id: Some(XtId {
                hash: Bytes::from(vec![0xab; 32]),
            }),
            decision: true,
        })),
    })
}

fn ping_message(timestamp: i64) -> Bytes {
    encoded(Message {
        sender_id: String::new(),
        payload: Some(Payload::Ping(Ping { timestamp })),
    })
}

/// (name, side, sealing key, sequence, audience, messages) of a base frame.
type FrameSpec<'a> = (
    &'static str,
    usize,
    &'a SecretKey,
    u64,
    &'a Audience,
    Vec<Bytes>,
);

/// Built once: the handshake and the sealing sign several times.
pub fn signed_open_fixture() -> &'static SignedOpenFixture {
    static FIXTURE: OnceLock<SignedOpenFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let backend = CryptoBackend::default();
        let client = client_handshake(ClientMode::Mutual, backend);
        let server = server_handshake(SignedFramesPolicy::Offer, true, backend);
        let (response, accepted) = match server.respond(client.request(), t0(), SERVER_FLOORS) {
            ServerVerdict::Accept { response, client } => (response, client),
            other => panic!("fixture handshake refused: {other:?}"),
        };
        let session = client.finish(&response).expect("fixture handshake");
        let at_server = Side {
            name: "server",
            peer_key: client_key().public_key().clone(),
            local_key: server_key().public_key().clone(),
            local_identity: None,
            session: accepted.signed_frames.expect("signed frames negotiated"),
        };
        let at_client = Side {
            name: "client",
            peer_key: server_key().public_key().clone(),
            local_key: client_key().public_key().clone(),
            local_identity: session.identity.clone(),
            session: session.signed_frames.expect("signed frames negotiated"),
        };
        assert_eq!(at_server.session.session_tag, at_client.session.session_tag);
        let to_server = Audience::Unicast {
            recipient: server_key().public_key().clone(),
            session: at_server.session.session_tag,
        };
        let to_client = Audience::Unicast {
            recipient: client_key().public_key().clone(),
            session: at_client.session.session_tag,
        };
        let everyone = Audience::Broadcast {
            exclude: String::new(),
        };
        let but_seq_b = Audience::Broadcast {
            exclude: OTHER_IDENTITY.into(),
        };
        let (c, s) = (client_key(), server_key());
        let specs: [FrameSpec; 5] = [
            (
                "unicast-vote",
                0,
                c,
                CLIENT_FLOOR,
                &to_server,
                vec![vote_message()],
            ),
            (
                "unicast-batch",
                0,
                c,
                CLIENT_FLOOR + 5,
                &to_server,
                vec![vote_message(), ping_message(T0_NANOS), vote_message()],
            ),
            (
                "server-unicast",
                1,
                s,
                SERVER_FLOORS.unicast,
                &to_client,
                vec![ping_message(T0_NANOS + 1)],
            ),
            (
                "broadcast-all",
                1,
                s,
                T0_NANOS as u64 + 2000,
                &everyone,
                vec![decided_message()],
            ),
            (
                "broadcast-but-seq-b",
                1,
                s,
                T0_NANOS as u64 + 2001,
                &but_seq_b,
                vec![decided_message(), decided_message()],
            ),
        ];
        let bases = specs
            .into_iter()
            .map(|(name, side, key, sequence, audience, messages)| {
                let frame = seal(key, backend, sequence, audience, messages);
                BaseFrame {
                    name,
                    side,
                    body: frame.encode_to_vec().into(),
                    frame,
                }
            })
            .collect();
        SignedOpenFixture {
            sides: [at_server, at_client],
            bases,
        }
    })
}

/// Input: `mode || rest`.
///
/// - `mode % 3 == 0`: `rest` is one frame body, opened by both sides.
/// - `mode % 3 == 1`: `rest` is a sequence of bodies, each `u16be(len) ||
///   body`, opened in turn by the same openers of both sides.
/// - `mode % 3 == 2`: `rest = base || ops`: the fixture's valid frame number
///   `base` with 4-byte mutations `ops` applied.
///
/// Checks: any frame that opens verifies, independently recomputed, under the
/// peer key, is addressed to us and within the floors; no (stream, sequence)
/// opens twice; `open_messages` delivers iff `open` accepts and every
/// message decodes; back-ends agree. Mutations: a changed body never opens
/// unless it decodes to the very same frame, in which case it opens to the
/// same messages and uses up the sequence number; a refused body leaves the
/// window as it was (the original still opens).
pub fn check_signed_open(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fixture = signed_open_fixture();
    match mode % 3 {
        0 => open_sequence(fixture, &[rest]),
        1 => {
            let mut bodies = Vec::new();
            let mut rest = rest;
            while let Some((len, tail)) = rest.split_first_chunk::<2>() {
                let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
                bodies.push(&tail[..len]);
                rest = &tail[len..];
            }
            open_sequence(fixture, &bodies);
        }
        _ => {
            let Some((&base, ops)) = rest.split_first() else {
                return;
            };
            let base = &fixture.bases[usize::from(base) % fixture.bases.len()];
            check_mutation(fixture, base, &mutate(&base.body, ops));
        }
    }
}

/// Opens `bodies` in turn on one opener per side and back-end.
fn open_sequence(fixture: &SignedOpenFixture, bodies: &[&[u8]]) {
    for side in &fixture.sides {
        let mut openers: Vec<FrameOpener> = backends().iter().map(|&b| side.opener(b)).collect();
        let mut opened = HashSet::new();
        for body in bodies {
            let mut outcomes = Vec::new();
            for opener in &mut openers {
                let mut twin = opener.clone();
                let result = opener.open(body);
                let delivered = twin.open_messages(body);
                check_delivery(&result, &delivered);
                if let Ok(messages) = &result {
                    let (stream, sequence) = check_authentic(side, body, messages);
                    outcomes.push(format!("ok {stream} {sequence}"));
                } else if let Err(err) = &result {
                    outcomes.push(format!("err {err}"));
                }
            }
            assert!(
                outcomes.windows(2).all(|w| w[0] == w[1]),
                "back-ends disagree at the {}: {outcomes:#?}",
                side.name
            );
            if outcomes[0].starts_with("ok") {
                assert!(
                    opened.insert(outcomes[0].clone()),
                    "the {} opened a replayed frame: {}",
                    side.name,
                    outcomes[0]
                );
            }
        }
    }
}

/// `open_messages` delivers exactly when `open` accepts and every message
/// decodes, and then exactly those messages.
fn check_delivery(
    opened: &Result<Vec<Bytes>, SignedFrameError>,
    delivered: &Result<Vec<Message>, SignedFrameError>,
) {
    match (opened, delivered) {
        (Ok(raw), Ok(messages)) => {
            assert_eq!(raw.len(), messages.len());
            for (raw, message) in raw.iter().zip(messages) {
                assert_eq!(&Message::decode(raw.clone()).expect("delivered"), message);
            }
        }
        (Ok(raw), Err(SignedFrameError::Malformed(_))) => assert!(
            raw.iter().any(|m| Message::decode(m.clone()).is_err()),
            "refused a frame whose messages all decode"
        ),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("open gave {a:?} but open_messages gave {b:?}"),
    }
}

/// Recomputes, independently of the opener, why `body` may open at `side`.
/// Returns its stream and sequence number.
fn check_authentic(side: &Side, body: &[u8], messages: &[Bytes]) -> (&'static str, u64) {
    let frame = SignedFrame::decode(body).expect("an opened frame decodes");
    assert!(
        !frame.messages.is_empty(),
        "opened a frame without messages"
    );
    assert_eq!(messages, &frame.messages[..], "opened other messages");
    let audience = frame
        .audience
        .as_ref()
        .expect("opened a frame without audience");
    let floors = side.session.peer_floors;
    let (stream, floor, session) = match audience {
        signed_frame::Audience::RecipientKey(key) => {
            assert_eq!(
                &key[..],
                side.local_key.as_compressed(),
                "opened a frame for another key"
            );
            ("unicast", floors.unicast, side.session.session_tag)
        }
        signed_frame::Audience::BroadcastExclude(exclude) => {
            match &side.local_identity {
                Some(identity) => assert_ne!(exclude, identity, "opened a broadcast excluding us"),
                None => assert!(exclude.is_empty(), "opened a broadcast that may exclude us"),
            }
            let floor = floors
                .broadcast
                .expect("opened a broadcast from a peer that never broadcasts");
            ("broadcast", floor, [0; 32])
        }
    };
    assert!(
        frame.sequence >= floor,
        "opened sequence {} below {floor}",
        frame.sequence
    );
    let digest = frame_digest(
        &side.peer_key,
        frame.sequence,
        audience,
        &session,
        &frame.messages,
    );
    for &backend in backends() {
        side.peer_key
            .verify_compact_with(backend, &digest, &frame.signature)
            .unwrap_or_else(|err| {
                panic!(
                    "the {} opened a frame not signed by its peer ({backend}): {err}",
                    side.name
                )
            });
    }
    (stream, frame.sequence)
}

/// Mutated bodies stop growing here: repeated suffix copies double the size.
const MAX_MUTATED_LEN: usize = 16 * 1024;

/// Applies 4-byte ops `[kind, pos_hi, pos_lo, value]` to `body`.
pub fn mutate(body: &[u8], ops: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    for op in ops.chunks_exact(4).take(64) {
        if out.len() > MAX_MUTATED_LEN {
            break;
        }
        let (kind, pos, value) = (
            op[0],
            usize::from(u16::from_be_bytes([op[1], op[2]])),
            op[3],
        );
        let len = out.len();
        match kind % 7 {
            0 if len > 0 => out[pos % len] ^= 1 << (value & 7),
            1 if len > 0 => out[pos % len] = value,
            2 => out.insert(pos % (len + 1), value),
            3 if len > 0 => {
                out.remove(pos % len);
            }
            4 => out.truncate(pos % (len + 1)),
            // Appends a varint field `value >> 3` with value `pos`: an unknown
            // or repeated field, which protobuf accepts (last one wins).
            5 => {
                let tag = u64::from(value.max(8)) & !7;
                prost::encoding::encode_varint(tag, &mut out);
                prost::encoding::encode_varint(pos as u64, &mut out);
            }
            // Re-appends a suffix: repeats whole fields when it starts on one.
            6 if len > 0 => {
                let suffix = out[pos % len..].to_vec();
                out.extend_from_slice(&suffix);
            }
            _ => {}
        }
    }
    out
}

fn check_mutation(fixture: &SignedOpenFixture, base: &BaseFrame, mutated: &[u8]) {
    let side = &fixture.sides[base.side];
    let same_value = SignedFrame::decode(mutated).is_ok_and(|f| f == base.frame);
    let mut outcomes = Vec::new();
    for &backend in backends() {
        let mut opener = side.opener(backend);
        let result = opener.open(mutated);
        if same_value {
            let messages = result.unwrap_or_else(|err| {
                panic!(
                    "{} re-encoded as {} does not open: {err}",
                    base.name,
                    hex::encode(mutated)
                )
            });
            assert_eq!(messages, base.frame.messages);
            check_authentic(side, mutated, &messages);
            // The re-encoding used up the sequence number.
            assert!(
                matches!(
                    opener.open(&base.body),
                    Err(SignedFrameError::Replayed { .. })
                ),
                "{} opened again after its re-encoding",
                base.name
            );
            outcomes.push("same frame".to_owned());
        } else {
            let err = result.err().unwrap_or_else(|| {
                panic!(
                    "{} altered to {} still opens",
                    base.name,
                    hex::encode(mutated)
                )
            });
            // Refused frames leave no trace in the window.
            opener
                .open(&base.body)
                .unwrap_or_else(|e| panic!("{} refused after a forgery ({err}): {e}", base.name));
            outcomes.push(format!("refused: {err}"));
        }
        // The other side never opens it: it is addressed and signed for this one.
        let other = &fixture.sides[1 - base.side];
        if let Ok(messages) = other.opener(backend).open(mutated) {
            check_authentic(other, mutated, &messages);
        }
    }
    assert!(
        outcomes.windows(2).all(|w| w[0] == w[1]),
        "back-ends disagree on {}: {outcomes:#?}",
        base.name
    );
}

// ---------------------------------------------------------------------------
// Seed corpus
// ---------------------------------------------------------------------------

/// The hand-made seeds committed under `fuzz/corpus/<target>/<name>`:
/// (target, name, bytes).
pub fn seed_corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        seeds.push((target, name.to_owned(), bytes));
    };
    let go_request = unhex(APPENDIX_A_GO_REQUEST);
    let ext_request = [go_request.clone(), unhex(APPENDIX_A_REQUEST_EXT)].concat();
    let response = unhex(APPENDIX_A_RESPONSE);
    let fixture = signed_open_fixture();
    let backend = CryptoBackend::default();

    // frame_decoder: [limits, chunking, flags] || stream.
    let framed = |bodies: &[&[u8]]| -> Vec<u8> {
        bodies
            .iter()
            .flat_map(|b| {
                frame_body(b, DEFAULT_MAX_FRAME_SIZE)
                    .expect("seed frame")
                    .to_vec()
            })
            .collect()
    };
    let handshake = framed(&[&go_request, &ext_request, &response]);
    add(
        "frame_decoder",
        "handshake-frames-16k-limit",
        [&[6u8, 0x02, 0][..], &handshake].concat(),
    );
    add(
        "frame_decoder",
        "handshake-then-session-raise",
        [
            &[0x1e, 0x35, 1][..],
            &handshake,
            &framed(&[&fixture.bases[1].body]),
        ]
        .concat(),
    );
    let mut partial = framed(&[&vote_message(), &decided_message(), &fixture.bases[0].body]);
    partial.extend_from_slice(&[0, 0, 1, 0, 1, 2, 3]);
    add(
        "frame_decoder",
        "messages-and-partial-frame",
        [&[7u8, 0x00, 0][..], &partial].concat(),
    );
    add(
        "frame_decoder",
        "tls-client-hello",
        [&[4u8, 0x03, 1][..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]].concat(),
    );
    add(
        "frame_decoder",
        "http-get",
        [&[6u8, 0x04, 0][..], b"GET / HTTP/1.1\r\n\r\n"].concat(),
    );
    add(
        "frame_decoder",
        "empty-frame",
        vec![5, 0x01, 0, 0, 0, 0, 1, 0x42, 0, 0, 0, 0],
    );
    add(
        "frame_decoder",
        "oversize-after-one",
        [&[3u8, 0x02, 1][..], &framed(&[b"ok"]), &[0, 0, 1, 0]].concat(),
    );

    // message_decode: bodies of every kind.
    add("message_decode", "vote", vote_message().to_vec());
    add("message_decode", "decided", decided_message().to_vec());
    add(
        "message_decode",
        "appendix-a-go-request",
        go_request.clone(),
    );
    add(
        "message_decode",
        "appendix-a-extended-request",
        ext_request.clone(),
    );
    add("message_decode", "appendix-a-response", response.clone());
    add(
        "message_decode",
        "signed-frame",
        fixture.bases[1].body.to_vec(),
    );
    add(
        "message_decode",
        "disconnect",
        publisher_transport::handshake::disconnect_body(
            publisher_transport::DisconnectReason::ProtocolError,
            "malformed",
        )
        .to_vec(),
    );

    // handshake_server: request bodies.
    add(
        "handshake_server",
        "appendix-a-go-request",
        go_request.clone(),
    );
    add(
        "handshake_server",
        "appendix-a-extended-request",
        ext_request.clone(),
    );
    let any_server = client_handshake(ClientMode::AnyServer, backend);
    add(
        "handshake_server",
        "extended-any-server",
        any_server.request().to_vec(),
    );
    let mut unsigned = ClientHandshakeConfig::new(other_key().clone(), "other");
    unsigned.signed_frames = false;
    unsigned.expected_server_key = Some(server_key().public_key().clone());
    let unsigned = ClientHandshake::start(unsigned, t0(), NONCE, 7);
    add(
        "handshake_server",
        "extended-seq-b-no-signed-frames",
        unsigned.request().to_vec(),
    );
    let mut stale = HandshakeRequest::decode(go_request.as_slice()).expect("Appendix A");
    stale.timestamp -= 31_000_000_000;
    add(
        "handshake_server",
        "go-request-too-old",
        stale.encode_to_vec(),
    );

    // handshake_client: response bodies to the Appendix A request.
    add("handshake_client", "appendix-a-response", response.clone());
    let go_answer = HandshakeResponse {
        accepted: true,
        error: String::new(),
        session_id: format!("{CLIENT_IDENTITY}-{T0_NANOS}"),
    };
    add(
        "handshake_client",
        "go-mode-acceptance",
        go_answer.encode_to_vec(),
    );
    let refusal = HandshakeResponse {
        accepted: false,
        error: "untrusted public key - connection rejected".into(),
        session_id: String::new(),
    };
    add("handshake_client", "refusal", refusal.encode_to_vec());
    let any_server = server_handshake(SignedFramesPolicy::Off, true, backend);
    if let ServerVerdict::Accept { response, .. } = any_server.respond(
        client_handshake(ClientMode::AnyServer, backend).request(),
        t0(),
        SERVER_FLOORS,
    ) {
        add("handshake_client", "any-server-unsigned", response.to_vec());
    }

    // signed_open: mode 0 single bodies, mode 1 sequences, mode 2 mutations.
    for base in &fixture.bases {
        add(
            "signed_open",
            &format!("raw-{}", base.name),
            [&[0u8][..], &base.body].concat(),
        );
    }
    add(
        "signed_open",
        "raw-appendix-a-unicast",
        [&[0u8][..], &unhex(APPENDIX_A_UNICAST_FRAME)].concat(),
    );
    add(
        "signed_open",
        "raw-appendix-a-broadcast",
        [&[0u8][..], &unhex(APPENDIX_A_BROADCAST_FRAME)].concat(),
    );
    let sequence = |bodies: &[&Bytes]| -> Vec<u8> {
        let mut out = vec![1u8];
        for body in bodies {
            out.extend_from_slice(&(body.len() as u16).to_be_bytes());
            out.extend_from_slice(body);
        }
        out
    };
    let b = &fixture.bases;
    add(
        "signed_open",
        "sequence-replay",
        sequence(&[&b[0].body, &b[0].body]),
    );
    add(
        "signed_open",
        "sequence-reordered",
        sequence(&[&b[1].body, &b[0].body, &b[3].body, &b[4].body, &b[3].body]),
    );
    for (i, base) in fixture.bases.iter().enumerate() {
        add(
            "signed_open",
            &format!("mutate-{}-identity", base.name),
            vec![2, i as u8],
        );
    }
    add(
        "signed_open",
        "mutate-unknown-field",
        vec![2, 0, 5, 0, 1, 0x30],
    );
    add(
        "signed_open",
        "mutate-flip-sequence",
        vec![2, 3, 0, 0, 1, 0],
    );
    seeds
}
