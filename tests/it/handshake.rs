//! The handshake state machines driven against each other in memory: every
//! acceptance and refusal path of Go mode (docs/PROTOCOL.md §2) and of the
//! extended mode (§3). Clock, nonces, keys and floors are injected, so every
//! run sees the same bytes.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use prost::Message as _;
use publisher_transport::{
    CryptoBackend, HandshakeError, PublicKey, SecretKey, TrustMode, TrustStore,
    crypto::{Signature, keccak256, recover},
    handshake::{
        AcceptedClient, ClientHandshake, ClientHandshakeConfig, DEFAULT_MAX_CLOCK_SKEW,
        MAX_NONCES_PER_KEY, NONCE_LEN, SequenceFloors, ServerHandshake, ServerHandshakeConfig,
        ServerSession, ServerVerdict, SignedFrameSession, SignedFramesPolicy,
        client_transcript_digest, go_request_digest, server_transcript_digest, session_tag,
        unix_nanos,
    },
    proto::{
        Message, Payload,
        rollup::v1::{HandshakeRequest, HandshakeResponse, disconnect_message::Reason},
        transport::v1::{Feature, HandshakeRequestExt, HandshakeResponseExt},
    },
};
use rand::{RngCore, SeedableRng, rngs::StdRng};

// ---------------------------------------------------------------------------
// Fixtures (also used by `signed.rs`)
// ---------------------------------------------------------------------------

/// The identity the client's key is trusted as.
pub(crate) const IDENTITY: &str = "seq-a";
/// The id the client claims; deliberately not its identity.
pub(crate) const CLAIMED_ID: &str = "claimed-name";
/// Go's answer to an untrusted key.
const GO_UNTRUSTED: &str = "untrusted public key - connection rejected";
/// The client's signed-frame floor.
pub(crate) const CLIENT_FLOOR: u64 = 1_000_000;
/// The server's signed-frame floors.
pub(crate) const SERVER_FLOORS: SequenceFloors = SequenceFloors {
    unicast: 2_000_000,
    broadcast: Some(3_000_000),
};

/// A fixed key: tests must be reproducible byte for byte.
pub(crate) fn secret(n: u8) -> Arc<SecretKey> {
    Arc::new(SecretKey::from_bytes(&[n; 32]).expect("small constant keys are valid"))
}
pub(crate) fn client_key() -> Arc<SecretKey> {
    secret(1)
}
pub(crate) fn server_key() -> Arc<SecretKey> {
    secret(2)
}
/// Neither trusted nor the server's.
pub(crate) fn other_key() -> Arc<SecretKey> {
    secret(3)
}

/// The clock both sides agree on, with a sub-second part so that nanosecond
/// handling is visible.
pub(crate) fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn nonce(n: u8) -> [u8; NONCE_LEN] {
    [n; NONCE_LEN]
}

/// Trusts the client's key in Go-compatible mode, since most of these tests
/// exercise the Go-mode wire; the secure default (extended only) is tested
/// with [`extended_only_trust`].
fn trust() -> Arc<TrustStore> {
    let trust = TrustStore::new();
    trust
        .add_go_compatible(IDENTITY, client_key().public_key().clone())
        .unwrap();
    // A second trusted peer, so that the identity lookup has a choice.
    trust.add("seq-b", secret(4).public_key().clone()).unwrap();
    Arc::new(trust)
}

/// The client's key trusted the default way: extended handshake only.
fn extended_only_trust() -> Arc<TrustStore> {
    let trust = TrustStore::new();
    trust
        .add(IDENTITY, client_key().public_key().clone())
        .unwrap();
    Arc::new(trust)
}

pub(crate) fn server(
    backend: CryptoBackend,
    key: Option<Arc<SecretKey>>,
    policy: SignedFramesPolicy,
) -> ServerHandshake {
    let mut config = ServerHandshakeConfig::new(trust(), key);
    config.signed_frames = policy;
    config.backend = backend;
    ServerHandshake::new(config)
}

/// The usual server: has a key, offers signed frames.
fn ext_server(backend: CryptoBackend) -> ServerHandshake {
    server(backend, Some(server_key()), SignedFramesPolicy::Offer)
}

pub(crate) fn client_config(backend: CryptoBackend) -> ClientHandshakeConfig {
    let mut config = ClientHandshakeConfig::new(client_key(), CLAIMED_ID);
    config.backend = backend;
    config
}

fn go_client_config(backend: CryptoBackend) -> ClientHandshakeConfig {
    let mut config = client_config(backend);
    config.extensions = false;
    config
}

fn start(config: ClientHandshakeConfig, now: SystemTime, n: u8) -> ClientHandshake {
    ClientHandshake::start(config, now, nonce(n), CLIENT_FLOOR)
}

fn expect_accept(verdict: ServerVerdict) -> (Bytes, AcceptedClient) {
    let ServerVerdict::Accept { response, client } = verdict else {
        panic!("expected Accept, got {verdict:?}");
    };
    (response, *client)
}

/// Checks a refusal the way a Go client sees it (§2.3): a bare
/// `HandshakeResponse{accepted: false, error}`, then a `Message{Disconnect}`
/// with `reason` and the same text. Our own client reports the server's
/// text as `Rejected`. Returns the server-side error.
fn expect_refusal(
    client: ClientHandshake,
    verdict: ServerVerdict,
    reason: Reason,
) -> HandshakeError {
    let ServerVerdict::Reject {
        response,
        disconnect,
        error,
    } = verdict
    else {
        panic!("expected Reject, got {verdict:?}");
    };
    // A bad signature is answered like an untrusted key: the answer must not
    // tell a stranger which keys are trusted.
    let text = match &error {
        HandshakeError::BadSignature(_) => GO_UNTRUSTED.to_owned(),
        error => error.to_string(),
    };
    let decoded = HandshakeResponse::decode(response.clone()).unwrap();
    assert!(!decoded.accepted);
    assert_eq!(decoded.error, text);
    assert_eq!(decoded.session_id, "");
    // A refusal carries only Go's fields.
    assert_eq!(decoded.encode_to_vec(), response.to_vec());

    let message = Message::decode(disconnect).unwrap();
    let Some(Payload::Disconnect(disconnect)) = message.payload else {
        panic!("expected a Disconnect payload, got {message:?}");
    };
    assert_eq!(disconnect.reason, reason as i32, "{error}");
    assert_eq!(disconnect.details, text);

    match client.finish(&response) {
        Err(HandshakeError::Rejected { reason }) => assert_eq!(reason, text),
        other => panic!("client should report the server's reason, got {other:?}"),
    }
    error
}

/// Runs a full handshake that must succeed on both sides.
fn handshake(
    server: &ServerHandshake,
    config: ClientHandshakeConfig,
    now: SystemTime,
    n: u8,
) -> (AcceptedClient, ServerSession) {
    let client = start(config, now, n);
    let (response, accepted) = expect_accept(server.respond(client.request(), now, SERVER_FLOORS));
    let session = client
        .finish(&response)
        .expect("client accepts the response");
    (accepted, session)
}

/// Both views of a negotiated signed-frame session, for `signed.rs`.
pub(crate) struct Negotiated {
    /// What the client got: peer = the server.
    pub client_view: SignedFrameSession,
    /// What the server got: peer = the client.
    pub server_view: SignedFrameSession,
    /// The identity the server knows the client by.
    pub identity: String,
}

pub(crate) fn negotiate_with_nonce(backend: CryptoBackend, nonce: u8) -> Negotiated {
    let mut config = client_config(backend);
    config.expected_server_key = Some(server_key().public_key().clone());
    let (accepted, session) = handshake(&ext_server(backend), config, t0(), nonce);
    Negotiated {
        client_view: session
            .signed_frames
            .expect("client negotiated signed frames"),
        server_view: accepted
            .signed_frames
            .expect("server negotiated signed frames"),
        identity: session.identity.expect("extended session has an identity"),
    }
}

fn decode_request(body: &[u8]) -> (HandshakeRequest, HandshakeRequestExt) {
    (
        HandshakeRequest::decode(body).unwrap(),
        HandshakeRequestExt::decode(body).unwrap(),
    )
}

fn decode_response(body: &[u8]) -> (HandshakeResponse, HandshakeResponseExt) {
    (
        HandshakeResponse::decode(body).unwrap(),
        HandshakeResponseExt::decode(body).unwrap(),
    )
}

/// Base fields then extension fields, as the crate lays them out.
fn concat(base: &impl prost::Message, ext: &impl prost::Message) -> Vec<u8> {
    let mut body = base.encode_to_vec();
    body.extend(ext.encode_to_vec());
    body
}

fn compressed(key: &PublicKey) -> Bytes {
    Bytes::copy_from_slice(key.as_compressed())
}

// ---------------------------------------------------------------------------
// §2 Go mode
// ---------------------------------------------------------------------------

// PROTOCOL.md §2.1
#[test]
fn go_mode_request_is_exactly_go_and_signs_keccak_of_timestamp_and_nonce() {
    let mut bodies = Vec::new();
    for &backend in CryptoBackend::available() {
        let client = start(go_client_config(backend), t0(), 7);
        let body = client.request().clone();
        let request = HandshakeRequest::decode(body.clone()).unwrap();
        // No unknown fields: the decoded request re-encodes to the same bytes.
        assert_eq!(request.encode_to_vec(), body.to_vec());
        assert_eq!(
            HandshakeRequestExt::decode(body.clone()).unwrap(),
            HandshakeRequestExt::default()
        );
        assert_eq!(request.timestamp, unix_nanos(t0()));
        assert_eq!(
            request.timestamp % 1_000_000_000,
            123_456_789,
            "nanoseconds"
        );
        assert_eq!(
            &request.public_key[..],
            client_key().public_key().as_compressed()
        );
        assert_eq!(request.client_id, CLAIMED_ID);
        assert_eq!(&request.nonce[..], &nonce(7));

        // Keccak-256(u64_be(timestamp) || nonce), spelled out independently.
        let mut data = (request.timestamp as u64).to_be_bytes().to_vec();
        data.extend_from_slice(&request.nonce);
        let digest = go_request_digest(request.timestamp, &request.nonce);
        assert_eq!(digest, keccak256(&data));
        // 65 bytes, low s, v ∈ {0, 1}: `from_slice` refuses anything else.
        let signature = Signature::from_slice(&request.signature).unwrap();
        for &verifier in CryptoBackend::available() {
            assert_eq!(
                &recover(verifier, &digest, &signature).unwrap(),
                client_key().public_key()
            );
        }
        bodies.push(body);
    }
    // RFC 6979: every backend signs the same bytes.
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
}

// PROTOCOL.md §2.3
#[test]
fn go_mode_request_is_answered_exactly_like_go() {
    for &backend in CryptoBackend::available() {
        // With or without a key of its own, the server answers a Go client like Go.
        for key in [Some(server_key()), None] {
            let server = server(backend, key, SignedFramesPolicy::Offer);
            let client = start(go_client_config(backend), t0(), 1);
            // The session id uses the server's clock, not the request's timestamp.
            let now = t0() + secs(5);
            let (response, accepted) =
                expect_accept(server.respond(client.request(), now, SERVER_FLOORS));

            let decoded = HandshakeResponse::decode(response.clone()).unwrap();
            let session_id = format!("{IDENTITY}-{}", unix_nanos(now));
            assert!(decoded.accepted);
            assert_eq!(decoded.error, "");
            assert_eq!(decoded.session_id, session_id);
            assert_eq!(decoded.encode_to_vec(), response.to_vec(), "only Go fields");
            assert_eq!(
                HandshakeResponseExt::decode(response.clone()).unwrap(),
                HandshakeResponseExt::default()
            );

            // The identity is the trusted id, not the claimed client id.
            assert_eq!(accepted.identity, IDENTITY);
            assert_eq!(accepted.client_id, CLAIMED_ID);
            assert_eq!(&accepted.public_key, client_key().public_key());
            assert_eq!(accepted.session_id, session_id);
            assert!(!accepted.extended);
            assert!(accepted.signed_frames.is_none());

            let session = client.finish(&response).unwrap();
            assert_eq!(session.session_id, session_id);
            assert!(session.server_key.is_none());
            assert!(session.identity.is_none());
            assert!(session.signed_frames.is_none());
        }
    }
}

// PROTOCOL.md §3.3
#[test]
fn go_mode_server_serves_an_extended_client_in_go_mode_unless_it_expects_a_key() {
    for &backend in CryptoBackend::available() {
        // No key: the server cannot prove anything, so it answers like Go.
        let go_server = server(backend, None, SignedFramesPolicy::Offer);
        let (accepted, session) = handshake(&go_server, client_config(backend), t0(), 1);
        assert!(!accepted.extended);
        assert!(accepted.signed_frames.is_none());
        assert_eq!(accepted.identity, IDENTITY);
        assert!(session.server_key.is_none());
        assert!(session.identity.is_none());
        assert!(session.signed_frames.is_none());

        // Expecting a key, the client refuses a server that proves none.
        for extensions in [true, false] {
            let mut config = client_config(backend);
            config.extensions = extensions;
            config.expected_server_key = Some(server_key().public_key().clone());
            let client = start(config, t0(), 2 + u8::from(extensions));
            let (response, _) =
                expect_accept(go_server.respond(client.request(), t0(), SERVER_FLOORS));
            assert!(matches!(
                client.finish(&response),
                Err(HandshakeError::ServerNotAuthenticated)
            ));
        }
    }
}

// PROTOCOL.md §2.2
#[test]
fn timestamp_more_than_30s_off_is_refused_with_go_strings() {
    for &backend in CryptoBackend::available() {
        for config in [go_client_config(backend), client_config(backend)] {
            let server = ext_server(backend);

            let ahead = start(config.clone(), t0() + secs(31), 1);
            let verdict = server.respond(ahead.request(), t0(), SERVER_FLOORS);
            let error = expect_refusal(ahead, verdict, Reason::AuthFailure);
            assert!(matches!(error, HandshakeError::TimestampInFuture { .. }));
            assert_eq!(error.to_string(), "handshake timestamp too far in future");

            let behind = start(config.clone(), t0() - secs(31), 2);
            let verdict = server.respond(behind.request(), t0(), SERVER_FLOORS);
            let error = expect_refusal(behind, verdict, Reason::AuthFailure);
            assert!(matches!(error, HandshakeError::TimestampTooOld { .. }));
            assert_eq!(error.to_string(), "handshake timestamp too old");

            // One nanosecond past the limit is already too far.
            let skew = DEFAULT_MAX_CLOCK_SKEW + Duration::from_nanos(1);
            let just_ahead = start(config.clone(), t0() + skew, 3);
            assert!(matches!(
                server.respond(just_ahead.request(), t0(), SERVER_FLOORS),
                ServerVerdict::Reject {
                    error: HandshakeError::TimestampInFuture { .. },
                    ..
                }
            ));
        }
    }
}

// PROTOCOL.md §2.2
#[test]
fn timestamp_exactly_30s_off_is_accepted() {
    for &backend in CryptoBackend::available() {
        for config in [go_client_config(backend), client_config(backend)] {
            let server = ext_server(backend);
            handshake_at(&server, config.clone(), t0() + secs(30), t0(), 1);
            handshake_at(&server, config, t0() - secs(30), t0(), 2);
        }
    }
}

/// A handshake whose client clock (`client_now`) differs from the server's.
fn handshake_at(
    server: &ServerHandshake,
    config: ClientHandshakeConfig,
    client_now: SystemTime,
    server_now: SystemTime,
    n: u8,
) -> (AcceptedClient, ServerSession) {
    let client = start(config, client_now, n);
    let (response, accepted) =
        expect_accept(server.respond(client.request(), server_now, SERVER_FLOORS));
    (accepted, client.finish(&response).unwrap())
}

fn assert_bad_signature(client: ClientHandshake, server: &ServerHandshake, body: &[u8]) {
    let verdict = server.respond(body, t0(), SERVER_FLOORS);
    let error = expect_refusal(client, verdict, Reason::AuthFailure);
    assert!(
        matches!(error, HandshakeError::BadSignature(_)),
        "expected BadSignature, got {error:?}"
    );
    assert!(
        error.to_string().starts_with("invalid handshake signature"),
        "{error}"
    );
}

// PROTOCOL.md §2.2
#[test]
fn bad_request_signatures_are_refused() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        for (n, config) in [(1, go_client_config(backend)), (2, client_config(backend))] {
            // A flipped byte in r, in s, or in v.
            for index in [5, 40, 64] {
                let client = start(config.clone(), t0(), n);
                let (mut request, ext) = decode_request(client.request());
                let mut signature = request.signature.to_vec();
                signature[index] ^= 0x01;
                request.signature = signature.into();
                assert_bad_signature(client, &server, &concat(&request, &ext));
            }

            // The right data, signed by another key.
            let client = start(config.clone(), t0(), n);
            let (mut request, ext) = decode_request(client.request());
            let digest = go_request_digest(request.timestamp, &request.nonce);
            request.signature =
                Bytes::copy_from_slice(other_key().sign_digest_with(backend, &digest).as_bytes());
            assert_bad_signature(client, &server, &concat(&request, &ext));

            // The right key over other data: the signature binds the timestamp.
            let client = start(config.clone(), t0(), n);
            let (mut request, ext) = decode_request(client.request());
            let digest = go_request_digest(request.timestamp + 1, &request.nonce);
            request.signature =
                Bytes::copy_from_slice(client_key().sign_digest_with(backend, &digest).as_bytes());
            assert_bad_signature(client, &server, &concat(&request, &ext));

            // ... and the nonce.
            let client = start(config.clone(), t0(), n);
            let (mut request, ext) = decode_request(client.request());
            request.nonce = Bytes::copy_from_slice(&nonce(99));
            assert_bad_signature(client, &server, &concat(&request, &ext));
        }
    }
}

// PROTOCOL.md §2.2
#[test]
fn untrusted_key_is_refused_with_go_string() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        for extensions in [false, true] {
            let mut config = ClientHandshakeConfig::new(other_key(), CLAIMED_ID);
            config.backend = backend;
            config.extensions = extensions;
            let client = start(config, t0(), 1);
            let verdict = server.respond(client.request(), t0(), SERVER_FLOORS);
            let error = expect_refusal(client, verdict, Reason::AuthFailure);
            assert!(matches!(error, HandshakeError::UntrustedKey { .. }));
            assert_eq!(
                error.to_string(),
                "untrusted public key - connection rejected"
            );
        }
    }
}

// PROTOCOL.md §2.2
#[test]
fn checks_run_clock_then_trust_then_signature() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        let mut untrusted = go_client_config(backend);
        untrusted.key = other_key();

        // Untrusted and stale: the clock is checked first.
        let client = start(untrusted.clone(), t0() - secs(60), 1);
        let verdict = server.respond(client.request(), t0(), SERVER_FLOORS);
        assert!(matches!(
            expect_refusal(client, verdict, Reason::AuthFailure),
            HandshakeError::TimestampTooOld { .. }
        ));

        // Trusted, badly signed and from the future: still the clock first.
        let client = start(go_client_config(backend), t0() + secs(60), 2);
        let (mut request, _) = decode_request(client.request());
        request.nonce = Bytes::copy_from_slice(&nonce(99));
        let verdict = server.respond(&request.encode_to_vec(), t0(), SERVER_FLOORS);
        assert!(matches!(
            expect_refusal(client, verdict, Reason::AuthFailure),
            HandshakeError::TimestampInFuture { .. }
        ));

        // Untrusted and badly signed: the trust store before the signature,
        // so that a stranger's request costs no curve arithmetic.
        let client = start(untrusted, t0(), 3);
        let (mut request, _) = decode_request(client.request());
        request.nonce = Bytes::copy_from_slice(&nonce(99));
        let verdict = server.respond(&request.encode_to_vec(), t0(), SERVER_FLOORS);
        assert!(matches!(
            expect_refusal(client, verdict, Reason::AuthFailure),
            HandshakeError::UntrustedKey { .. }
        ));

        // A stranger's key that is not even a point is refused the same way.
        let client = start(go_client_config(backend), t0(), 4);
        let (mut request, _) = decode_request(client.request());
        request.public_key = Bytes::from_static(&[0x02; 33]);
        let verdict = server.respond(&request.encode_to_vec(), t0(), SERVER_FLOORS);
        assert!(matches!(
            expect_refusal(client, verdict, Reason::AuthFailure),
            HandshakeError::UntrustedKey { .. }
        ));
    }
}

// PROTOCOL.md §2.2
#[test]
fn screening_refuses_without_signature_work_only_what_needs_none() {
    let backend = CryptoBackend::default();
    let server = ext_server(backend);
    let mut stranger = client_config(backend);
    stranger.key = other_key();
    // A stranger's key and a stale clock are refused by the screen alone.
    for (config, at) in [(stranger, t0()), (client_config(backend), t0() - secs(60))] {
        let client = start(config, at, 1);
        match server.screen(client.request(), t0()) {
            Some(ServerVerdict::Reject { error, .. }) => assert!(
                matches!(
                    error,
                    HandshakeError::UntrustedKey { .. } | HandshakeError::TimestampTooOld { .. }
                ),
                "{error:?}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // A trusted key needs the signature checked, bad or good.
    let client = start(client_config(backend), t0(), 2);
    let (mut request, ext) = decode_request(client.request());
    assert!(server.screen(&concat(&request, &ext), t0()).is_none());
    request.nonce = Bytes::copy_from_slice(&nonce(99));
    assert!(server.screen(&concat(&request, &ext), t0()).is_none());
}

// PROTOCOL.md §2.2
#[test]
fn a_trusted_key_is_found_in_either_encoding_but_only_exactly() {
    let key = client_key().public_key().clone();
    let trust = extended_only_trust();
    let found = trust.lookup(key.as_compressed()).expect("compressed");
    assert_eq!(found.identity, IDENTITY);
    assert_eq!(found.mode, TrustMode::ExtendedOnly);
    let uncompressed = key.to_uncompressed();
    assert_eq!(trust.lookup(&uncompressed), Some(found));
    // Same x and parity, another y: not the trusted key's encoding.
    let mut forged = uncompressed;
    forged[40] ^= 0x10;
    assert_eq!(trust.lookup(&forged), None);
    assert_eq!(trust.lookup(&uncompressed[..64]), None);
    assert_eq!(trust.lookup(&[]), None);
}

// PROTOCOL.md §2.3
#[test]
fn malformed_request_is_refused_as_a_protocol_error() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        let good = start(go_client_config(backend), t0(), 1).request().clone();
        let bodies: [&[u8]; 3] = [
            // A tag varint that never ends.
            &[0xff; 11],
            // A length-delimited field longer than the body.
            &[0x12, 0x40, 1, 2, 3],
            // A real request, truncated inside its last field.
            &good[..good.len() - 1],
        ];
        for body in bodies {
            let client = start(go_client_config(backend), t0(), 2);
            let verdict = server.respond(body, t0(), SERVER_FLOORS);
            let error = expect_refusal(client, verdict, Reason::ProtocolError);
            assert!(
                matches!(error, HandshakeError::Malformed { .. }),
                "{error:?}"
            );
        }

        // Random bodies: always refused, as a protocol error exactly when the
        // bytes are not protobuf.
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for _ in 0..200 {
            let mut body = vec![0u8; (rng.next_u32() % 300) as usize];
            rng.fill_bytes(&mut body);
            let ServerVerdict::Reject { error, .. } = server.respond(&body, t0(), SERVER_FLOORS)
            else {
                panic!("random bytes accepted: {body:02x?}");
            };
            let not_protobuf = HandshakeRequest::decode(&body[..]).is_err()
                || HandshakeRequestExt::decode(&body[..]).is_err();
            assert_eq!(
                matches!(error, HandshakeError::Malformed { .. }),
                not_protobuf,
                "{error:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// §3 Extended handshake
// ---------------------------------------------------------------------------

// PROTOCOL.md §3.2
#[test]
fn mutual_authentication_succeeds_with_the_expected_key() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        let mut config = client_config(backend);
        config.expected_server_key = Some(server_key().public_key().clone());
        let (accepted, session) = handshake(&server, config, t0(), 1);

        assert_eq!(session.server_key.as_ref(), Some(server_key().public_key()));
        assert_eq!(session.identity.as_deref(), Some(IDENTITY));
        assert_eq!(
            session.session_id,
            format!("{IDENTITY}-{}", unix_nanos(t0()))
        );
        assert_eq!(session.session_id, accepted.session_id);
        assert_eq!(
            session.signed_frames,
            Some(SignedFrameSession {
                // Both sides derive the same tag from the request they share.
                session_tag: accepted.signed_frames.as_ref().unwrap().session_tag,
                peer_key: server_key().public_key().clone(),
                peer_floors: SERVER_FLOORS,
                local_floors: SequenceFloors {
                    unicast: CLIENT_FLOOR,
                    broadcast: None,
                },
            })
        );

        assert!(accepted.extended);
        assert_eq!(accepted.identity, IDENTITY);
        assert_eq!(accepted.client_id, CLAIMED_ID);
        assert_eq!(
            accepted.signed_frames,
            Some(SignedFrameSession {
                session_tag: session.signed_frames.as_ref().unwrap().session_tag,
                peer_key: client_key().public_key().clone(),
                peer_floors: SequenceFloors {
                    unicast: CLIENT_FLOOR,
                    broadcast: None,
                },
                local_floors: SERVER_FLOORS,
            })
        );

        // Without an expected key the client still learns (and checks) the server's.
        let (_, session) = handshake(&server, client_config(backend), t0(), 2);
        assert_eq!(session.server_key.as_ref(), Some(server_key().public_key()));
    }
}

// PROTOCOL.md §3.3
#[test]
fn extended_messages_stay_valid_go_messages() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        let client = start(client_config(backend), t0(), 1);
        let (request, ext) = decode_request(client.request());
        // A Go server sees a complete, correctly signed request...
        let digest = go_request_digest(request.timestamp, &request.nonce);
        let signature = Signature::from_slice(&request.signature).unwrap();
        assert_eq!(
            &recover(backend, &digest, &signature).unwrap(),
            client_key().public_key()
        );
        // ... whose extension fields all sit at numbers Go does not know.
        assert!(ext.ext_version >= 1);
        assert_eq!(concat(&request, &ext), client.request().to_vec());

        let (response, _) = expect_accept(server.respond(client.request(), t0(), SERVER_FLOORS));
        let (base, ext) = decode_response(&response);
        assert!(base.accepted);
        assert_eq!(base.session_id, format!("{IDENTITY}-{}", unix_nanos(t0())));
        assert_eq!(
            ext.features,
            Feature::MutualAuth as u32
                | Feature::SignedFrames as u32
                | Feature::DeliveryAcks as u32
                | Feature::Requests as u32
        );
        assert_eq!(concat(&base, &ext), response.to_vec());
    }
}

// PROTOCOL.md §3.2
#[test]
fn request_for_another_server_key_is_refused_by_the_server() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        let mut config = client_config(backend);
        config.expected_server_key = Some(other_key().public_key().clone());
        let client = start(config, t0(), 1);
        let verdict = server.respond(client.request(), t0(), SERVER_FLOORS);
        let error = expect_refusal(client, verdict, Reason::AuthFailure);
        assert!(matches!(error, HandshakeError::WrongAudience), "{error:?}");
    }
}

/// An accepted extended response for a client built from `config`.
fn accepted_response(
    backend: CryptoBackend,
    config: ClientHandshakeConfig,
    n: u8,
) -> (ClientHandshake, Bytes) {
    let client = start(config, t0(), n);
    let (response, _) =
        expect_accept(ext_server(backend).respond(client.request(), t0(), SERVER_FLOORS));
    (client, response)
}

// PROTOCOL.md §3.2
#[test]
fn client_refuses_a_response_proving_another_key() {
    for &backend in CryptoBackend::available() {
        let mut expecting = client_config(backend);
        expecting.expected_server_key = Some(server_key().public_key().clone());

        for config in [expecting, client_config(backend)] {
            let expects_key = config.expected_server_key.is_some();
            let (client, response) = accepted_response(backend, config, 1);
            let (base, mut ext) = decode_response(&response);
            assert_eq!(concat(&base, &ext), response.to_vec());
            ext.server_public_key = compressed(other_key().public_key());
            let result = client.finish(&concat(&base, &ext));
            if expects_key {
                match result {
                    Err(HandshakeError::WrongServerKey { expected, actual }) => {
                        assert_eq!(expected, server_key().public_key().to_string());
                        assert_eq!(actual, other_key().public_key().to_string());
                    }
                    other => panic!("expected WrongServerKey, got {other:?}"),
                }
            } else {
                // Nothing to compare against, but the proof does not verify.
                assert!(
                    matches!(result, Err(HandshakeError::BadServerSignature(_))),
                    "{result:?}"
                );
            }
        }
    }
}

// PROTOCOL.md §3.2
#[test]
fn client_refuses_a_tampered_server_proof() {
    for &backend in CryptoBackend::available() {
        type Tamper = fn(&mut HandshakeResponse, &mut HandshakeResponseExt);
        let tampers: [(&str, Tamper); 8] = [
            ("signature r", |_, ext| flip(&mut ext.server_signature, 3)),
            ("signature s", |_, ext| flip(&mut ext.server_signature, 40)),
            ("session id", |base, _| base.session_id.push('0')),
            ("identity", |_, ext| ext.identity = "seq-b".into()),
            ("features", |_, ext| {
                ext.features &= !(Feature::SignedFrames as u32)
            }),
            ("unicast floor", |_, ext| ext.unicast_floor -= 1),
            ("broadcast floor", |_, ext| ext.broadcast_floor = 0),
            ("no proof", |_, ext| ext.server_signature = Bytes::new()),
        ];
        for (what, tamper) in tampers {
            let (client, response) = accepted_response(backend, client_config(backend), 1);
            let (mut base, mut ext) = decode_response(&response);
            tamper(&mut base, &mut ext);
            let result = client.finish(&concat(&base, &ext));
            assert!(
                matches!(result, Err(HandshakeError::BadServerSignature(_))),
                "{what}: {result:?}"
            );
        }
    }
}

// PROTOCOL.md §3.3, §5.1, §5.2
#[test]
fn delivery_acks_and_requests_need_both_sides() {
    for &backend in CryptoBackend::available() {
        for (offered, allowed) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut config = client_config(backend);
            config.delivery_acks = offered;
            config.requests = !offered;
            let mut server_config = ServerHandshakeConfig::new(trust(), Some(server_key()));
            server_config.backend = backend;
            server_config.delivery_acks = allowed;
            server_config.requests = allowed;
            let (accepted, session) =
                handshake(&ServerHandshake::new(server_config), config, t0(), 1);
            let (acks, requests) = (offered && allowed, !offered && allowed);
            assert_eq!(accepted.delivery_acks, acks, "{offered} {allowed}");
            assert_eq!(session.delivery_acks, acks, "{offered} {allowed}");
            assert_eq!((accepted.requests, session.requests), (requests, requests));
            assert!(
                session.signed_frames.is_some(),
                "independent of signed frames"
            );
        }
        // The bit is covered by the server's proof.
        let (client, response) = accepted_response(backend, client_config(backend), 2);
        let (base, mut ext) = decode_response(&response);
        assert_ne!(ext.features & Feature::DeliveryAcks as u32, 0);
        ext.features &= !(Feature::DeliveryAcks as u32);
        let result = client.finish(&concat(&base, &ext));
        assert!(
            matches!(result, Err(HandshakeError::BadServerSignature(_))),
            "{result:?}"
        );
        // Go mode has no acknowledgements and no requests.
        let (accepted, session) =
            handshake(&ext_server(backend), go_client_config(backend), t0(), 3);
        assert!(!accepted.delivery_acks && !session.delivery_acks);
        assert!(!accepted.requests && !session.requests);
    }
}

/// Signs `ext` as the server would (`server_signature` = the proof over the
/// transcript of `request` and this response), so that only the client's
/// checks after the proof can refuse it.
fn resign_response(
    backend: CryptoBackend,
    request: &[u8],
    base: &HandshakeResponse,
    ext: &mut HandshakeResponseExt,
) {
    let digest = server_transcript_digest(request, base, ext);
    let proof = server_key().sign_digest_with(backend, &digest);
    ext.server_signature = Bytes::copy_from_slice(proof.as_bytes());
}

// PROTOCOL.md §3
#[test]
fn a_later_ext_version_is_answered_and_signed_as_version_1() {
    for &backend in CryptoBackend::available() {
        // A request announcing version 2, correctly signed.
        let client = start(client_config(backend), t0(), 1);
        let (request, mut ext) = decode_request(client.request());
        ext.ext_version = 2;
        let digest = client_transcript_digest(&request, &ext);
        ext.ext_signature =
            Bytes::copy_from_slice(client_key().sign_digest_with(backend, &digest).as_bytes());
        let body = concat(&request, &ext);

        let (response, accepted) =
            expect_accept(ext_server(backend).respond(&body, t0(), SERVER_FLOORS));
        assert!(accepted.extended);
        let (base, ext) = decode_response(&response);
        assert_eq!(ext.ext_version, 1, "the server answers 1");
        // ... and its proof covers that 1.
        let proof = Signature::from_slice(&ext.server_signature).unwrap();
        let signed = server_transcript_digest(&body, &base, &ext);
        assert_eq!(
            &recover(backend, &signed, &proof).unwrap(),
            server_key().public_key()
        );

        // A client treats a response of version 2 as version 1, with the
        // received value in the transcript.
        let (client, response) = accepted_response(backend, client_config(backend), 2);
        let (base, mut ext) = decode_response(&response);
        ext.ext_version = 2;
        resign_response(backend, client.request(), &base, &mut ext);
        let session = client.finish(&concat(&base, &ext)).unwrap();
        assert!(session.signed_frames.is_some() && session.delivery_acks);
    }
}

// PROTOCOL.md §3.2, client checks 6 and 7
#[test]
fn client_refuses_features_it_did_not_offer() {
    for &backend in CryptoBackend::available() {
        let cases = [
            (
                Feature::SignedFrames,
                "server enabled signed frames that were not offered",
            ),
            (
                Feature::DeliveryAcks,
                "server enabled delivery acknowledgements that were not offered",
            ),
            (
                Feature::Requests,
                "server enabled requests that were not offered",
            ),
        ];
        for (feature, text) in cases {
            let mut config = client_config(backend);
            config.signed_frames = false;
            config.delivery_acks = false;
            config.requests = false;
            let (client, response) = accepted_response(backend, config, 1);
            let (base, mut ext) = decode_response(&response);
            assert_eq!(ext.features, Feature::MutualAuth as u32);
            ext.features |= feature as u32;
            resign_response(backend, client.request(), &base, &mut ext);
            let error = client.finish(&concat(&base, &ext)).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("handshake rejected by server: {text}")
            );
        }
    }
}

// PROTOCOL.md §3, `server_public_key`
#[test]
fn a_65_byte_server_public_key_is_accepted() {
    for &backend in CryptoBackend::available() {
        let mut config = client_config(backend);
        config.expected_server_key = Some(server_key().public_key().clone());
        let (client, response) = accepted_response(backend, config, 1);
        let (base, mut ext) = decode_response(&response);
        assert_eq!(
            ext.server_public_key.len(),
            33,
            "this server sends 33 bytes"
        );
        ext.server_public_key =
            Bytes::copy_from_slice(&server_key().public_key().to_uncompressed());
        resign_response(backend, client.request(), &base, &mut ext);
        let request = client.request().clone();
        let body = concat(&base, &ext);
        let session = client.finish(&body).unwrap();
        // The expected key matches whatever its encoding; frames use the key.
        assert_eq!(session.server_key.as_ref(), Some(server_key().public_key()));
        let signed = session.signed_frames.unwrap();
        assert_eq!(&signed.peer_key, server_key().public_key());
        assert_eq!(signed.session_tag, session_tag(&request, &body));
    }
}

fn flip(bytes: &mut Bytes, index: usize) {
    let mut copy = bytes.to_vec();
    copy[index] ^= 0x01;
    *bytes = copy.into();
}

// PROTOCOL.md §3.2
#[test]
fn response_to_another_request_is_refused() {
    for &backend in CryptoBackend::available() {
        let (_, response) = accepted_response(backend, client_config(backend), 1);
        // Same key, same time, another nonce: the proof binds the request.
        let other = start(client_config(backend), t0(), 2);
        assert!(matches!(
            other.finish(&response),
            Err(HandshakeError::BadServerSignature(_))
        ));
    }
}

// PROTOCOL.md §3.4
#[test]
fn replayed_request_is_refused() {
    for &backend in CryptoBackend::available() {
        for config in [go_client_config(backend), client_config(backend)] {
            let server = ext_server(backend);
            let client = start(config.clone(), t0(), 1);
            let body = client.request().clone();
            expect_accept(server.respond(&body, t0(), SERVER_FLOORS));

            let verdict = server.respond(&body, t0() + secs(1), SERVER_FLOORS);
            let error = expect_refusal(client, verdict, Reason::AuthFailure);
            assert!(matches!(error, HandshakeError::Replayed), "{error:?}");

            // A fresh nonce from the same key is fine.
            handshake(&server, config, t0() + secs(1), 2);
        }
    }
}

// PROTOCOL.md §3.4
#[test]
fn nonces_are_remembered_exactly_as_long_as_a_replay_passes_the_clock() {
    let skew = DEFAULT_MAX_CLOCK_SKEW;
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        // The client's clock runs a full skew ahead, the latest a request may
        // still be accepted; first seen at t0.
        let ahead = start(client_config(backend), t0() + skew, 1);
        let body = ahead.request().clone();
        expect_accept(server.respond(&body, t0(), SERVER_FLOORS));

        // At t0 + 2 × skew the capture still passes the clock: the nonce memory catches it.
        let last_chance = t0() + 2 * skew;
        assert!(matches!(
            server.respond(&body, last_chance, SERVER_FLOORS),
            ServerVerdict::Reject {
                error: HandshakeError::Replayed,
                ..
            }
        ));
        // A nanosecond later the clock refuses it.
        let after = last_chance + Duration::from_nanos(1);
        assert!(matches!(
            server.respond(&body, after, SERVER_FLOORS),
            ServerVerdict::Reject {
                error: HandshakeError::TimestampTooOld { .. },
                ..
            }
        ));

        // A new request reusing the nonce is refused while it is remembered...
        let reuse = start(client_config(backend), last_chance, 1);
        assert!(matches!(
            server.respond(reuse.request(), last_chance, SERVER_FLOORS),
            ServerVerdict::Reject {
                error: HandshakeError::Replayed,
                ..
            }
        ));
        // ... and accepted once it is forgotten.
        handshake_at(&server, client_config(backend), after, after, 1);
    }
}

// PROTOCOL.md §3.1
#[test]
fn tampered_request_extension_is_refused() {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        type Tamper = fn(&mut HandshakeRequest, &mut HandshakeRequestExt);
        let tampers: [(&str, Tamper); 7] = [
            ("drop signed frames", |_, ext| {
                ext.features &= !(Feature::SignedFrames as u32)
            }),
            ("drop mutual auth", |_, ext| {
                ext.features &= !(Feature::MutualAuth as u32)
            }),
            ("sequence floor", |_, ext| ext.sequence_floor ^= 1),
            ("expected server key", |_, ext| {
                ext.expected_server_key = Bytes::new()
            }),
            ("ext version", |_, ext| ext.ext_version += 1),
            ("client id", |base, _| base.client_id = "seq-b".into()),
            ("ext signature", |_, ext| flip(&mut ext.ext_signature, 3)),
        ];
        for (what, tamper) in tampers {
            let mut config = client_config(backend);
            config.expected_server_key = Some(server_key().public_key().clone());
            let client = start(config, t0(), 1);
            let (mut request, mut ext) = decode_request(client.request());
            tamper(&mut request, &mut ext);
            let verdict = server.respond(&concat(&request, &ext), t0(), SERVER_FLOORS);
            let error = expect_refusal(client, verdict, Reason::AuthFailure);
            assert!(
                matches!(error, HandshakeError::BadSignature(_)),
                "{what}: {error:?}"
            );
        }
    }
}

// PROTOCOL.md §3.3
#[test]
fn stripping_the_extension_is_refused_for_a_default_key() {
    for &backend in CryptoBackend::available() {
        let mut config = ServerHandshakeConfig::new(extended_only_trust(), Some(server_key()));
        config.backend = backend;
        let server = ServerHandshake::new(config);
        let client = start(client_config(backend), t0(), 1);
        let (request, _) = decode_request(client.request());
        // The Go part alone is a valid Go request, signed by the client: an
        // on-path attacker could otherwise open an unsigned session with it.
        let verdict = server.respond(&request.encode_to_vec(), t0(), SERVER_FLOORS);
        let error = expect_refusal(client, verdict, Reason::AuthFailure);
        assert!(
            matches!(&error, HandshakeError::GoModeRefused { identity, server_has_key: true } if identity == IDENTITY),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("extended handshake only"),
            "{error}"
        );
        // The request with its extension is served as usual.
        let (accepted, session) = handshake(&server, client_config(backend), t0(), 2);
        assert!(accepted.extended && accepted.signed_frames.is_some());
        assert!(session.signed_frames.is_some());
    }
}

// PROTOCOL.md §3.3
#[test]
fn stripping_the_extension_of_a_go_compatible_key_yields_go_mode_which_a_key_expecting_client_refuses()
 {
    for &backend in CryptoBackend::available() {
        let server = ext_server(backend);
        let mut config = client_config(backend);
        config.expected_server_key = Some(server_key().public_key().clone());
        let client = start(config, t0(), 1);
        let (request, _) = decode_request(client.request());
        let (response, accepted) =
            expect_accept(server.respond(&request.encode_to_vec(), t0(), SERVER_FLOORS));
        assert!(!accepted.extended);
        assert!(accepted.signed_frames.is_none());
        assert!(matches!(
            client.finish(&response),
            Err(HandshakeError::ServerNotAuthenticated)
        ));
    }
}

// PROTOCOL.md §3.3
#[test]
fn a_server_without_a_key_refuses_a_default_key_and_says_why() {
    for &backend in CryptoBackend::available() {
        let mut config = ServerHandshakeConfig::new(extended_only_trust(), None);
        config.backend = backend;
        let server = ServerHandshake::new(config);
        for (n, client_config) in [(1, client_config(backend)), (2, go_client_config(backend))] {
            let client = start(client_config, t0(), n);
            let verdict = server.respond(client.request(), t0(), SERVER_FLOORS);
            let error = expect_refusal(client, verdict, Reason::AuthFailure);
            assert!(
                matches!(
                    error,
                    HandshakeError::GoModeRefused {
                        server_has_key: false,
                        ..
                    }
                ),
                "{error:?}"
            );
            assert!(error.to_string().contains("without a key"), "{error}");
        }
    }
}

// PROTOCOL.md §3.4
#[test]
fn the_nonce_memory_refuses_rather_than_forgets_an_unexpired_nonce() {
    let backend = CryptoBackend::default();
    let mut config = ServerHandshakeConfig::new(trust(), Some(server_key()));
    config.nonce_cache_capacity = 2;
    let server = ServerHandshake::new(config);
    let first = start(client_config(backend), t0(), 1);
    let first_request = first.request().clone();
    handshake(&server, client_config(backend), t0(), 1);
    handshake(&server, client_config(backend), t0(), 2);
    // Full of unexpired nonces: a new one is refused, the old ones still are.
    let client = start(client_config(backend), t0(), 3);
    let verdict = server.respond(client.request(), t0(), SERVER_FLOORS);
    assert!(matches!(
        expect_refusal(client, verdict, Reason::AuthFailure),
        HandshakeError::TooManyHandshakes {
            from_this_key: false
        }
    ));
    let verdict = server.respond(&first_request, t0() + secs(1), SERVER_FLOORS);
    assert!(matches!(
        expect_refusal(first, verdict, Reason::AuthFailure),
        HandshakeError::Replayed
    ));
    // Once the window has passed they expire and make room.
    let later = t0() + secs(61);
    handshake(&server, client_config(backend), later, 4);
}

// PROTOCOL.md §3.4
#[test]
fn one_key_cannot_fill_the_nonce_memory() {
    let backend = CryptoBackend::default();
    let server = ext_server(backend);
    let config = go_client_config(backend);
    let mut refused = None;
    for n in 0..=MAX_NONCES_PER_KEY as u32 {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&n.to_be_bytes());
        let client = ClientHandshake::start(config.clone(), t0(), nonce, CLIENT_FLOOR);
        if let ServerVerdict::Reject { error, .. } =
            server.respond(client.request(), t0(), SERVER_FLOORS)
        {
            refused = Some((n, error));
            break;
        }
    }
    let (n, error) = refused.expect("the key's share of the nonce memory runs out");
    assert_eq!(n as usize, MAX_NONCES_PER_KEY);
    assert!(
        matches!(
            error,
            HandshakeError::TooManyHandshakes {
                from_this_key: true
            }
        ),
        "{error:?}"
    );
    // Another trusted key is still served.
    let mut other = ClientHandshakeConfig::new(secret(4), "seq-b");
    other.backend = backend;
    handshake(&server, other, t0(), 1);
}

// PROTOCOL.md §3.3
#[test]
fn signed_frames_negotiation_follows_the_policy() {
    for &backend in CryptoBackend::available() {
        let mut not_offering = client_config(backend);
        not_offering.signed_frames = false;

        // Off: never, even when offered; mutual authentication still happens.
        let off = server(backend, Some(server_key()), SignedFramesPolicy::Off);
        let (accepted, session) = handshake(&off, client_config(backend), t0(), 1);
        assert!(accepted.extended);
        assert!(accepted.signed_frames.is_none());
        assert!(session.signed_frames.is_none());
        assert_eq!(session.server_key.as_ref(), Some(server_key().public_key()));

        // Offer: only with a client that offers.
        let offer = ext_server(backend);
        let (accepted, session) = handshake(&offer, not_offering.clone(), t0(), 2);
        assert!(accepted.extended);
        assert!(accepted.signed_frames.is_none());
        assert!(session.signed_frames.is_none());
        let (accepted, session) = handshake(&offer, go_client_config(backend), t0(), 3);
        assert!(accepted.signed_frames.is_none());
        assert!(session.signed_frames.is_none());

        // Require: with a client that offers...
        let require = server(backend, Some(server_key()), SignedFramesPolicy::Require);
        let (accepted, session) = handshake(&require, client_config(backend), t0(), 4);
        assert!(accepted.signed_frames.is_some());
        assert!(session.signed_frames.is_some());
        // ... and refuses Go clients and clients that do not offer.
        for (n, config) in [(5, go_client_config(backend)), (6, not_offering)] {
            let client = start(config, t0(), n);
            let verdict = require.respond(client.request(), t0(), SERVER_FLOORS);
            let error = expect_refusal(client, verdict, Reason::AuthFailure);
            assert!(
                matches!(error, HandshakeError::FeatureRequired { .. }),
                "{error:?}"
            );
        }
    }
}

// PROTOCOL.md §3.4, §4.2
#[test]
fn a_request_replayed_after_a_restart_gets_a_new_session_tag() {
    // A restarted server has forgotten every nonce, so a captured request
    // still inside the clock window is accepted again. Its session must not
    // share the tag of the original one, or the client's recorded unicast
    // frames would open in it.
    for &backend in CryptoBackend::available() {
        let mut config = client_config(backend);
        config.expected_server_key = Some(server_key().public_key().clone());
        let client = start(config, t0(), 7);
        let request = client.request().clone();
        let (response, original) =
            expect_accept(ext_server(backend).respond(&request, t0(), SERVER_FLOORS));
        client.finish(&response).unwrap();

        let restarted = ext_server(backend);
        let later = t0() + std::time::Duration::from_secs(1);
        let (_, replayed) = expect_accept(restarted.respond(&request, later, SERVER_FLOORS));
        assert_ne!(
            original.signed_frames.unwrap().session_tag,
            replayed.signed_frames.unwrap().session_tag
        );
    }
}
