//! The authentication handshake as sans-IO state machines.
//!
//! Frames go in and out as bodies (no length prefix, no sockets); the clock,
//! nonce, keys and sequence floors are passed in, so both sides can be driven
//! against each other in memory. A back-end moves the bodies with the codec.
//!
//! **Go mode** is the Go package's handshake exactly (docs/PROTOCOL.md §2).
//! **Extended mode** appends [`HandshakeRequestExt`] / [`HandshakeResponseExt`]
//! fields that a Go peer skips (§3): mutual authentication, replay protection
//! of the request, and negotiation of signed frames.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use prost::Message as _;

mod client;
mod nonces;

pub use client::{ClientHandshake, ClientHandshakeConfig, ServerSession};
use nonces::NonceCache;

use crate::{
    crypto::{
        CryptoBackend, Keccak, PublicKey, SecretKey, Signature, TrustStore, TrustedPeer, recover,
    },
    error::{DisconnectReason, HandshakeError},
    proto::{
        Message, Payload,
        rollup::v1::{DisconnectMessage, HandshakeRequest, HandshakeResponse},
        transport::v1::{Feature, HandshakeRequestExt, HandshakeResponseExt},
    },
};

/// How long the server waits for the request (Go: 5 s).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How far a request's timestamp may differ from the server's clock (Go: 30 s).
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Length of the request nonce.
pub const NONCE_LEN: usize = 16;
/// The extension version this crate speaks.
pub const EXT_VERSION: u32 = 1;
/// Domain tag of the client's extension signature.
pub const CLIENT_TRANSCRIPT_DOMAIN: &[u8] = b"publisher-transport/v1/handshake/client";
/// Domain tag of the session tag.
pub const SESSION_TAG_DOMAIN: &[u8] = b"publisher-transport/v1/session";
/// Domain tag of the server's proof of identity.
pub const SERVER_TRANSCRIPT_DOMAIN: &[u8] = b"publisher-transport/v1/handshake/server";
/// Most request nonces remembered for replay protection.
pub const DEFAULT_NONCE_CACHE_CAPACITY: usize = 100_000;

/// Unexpired nonces one key may hold in the replay memory: far more than an
/// honest client's reconnects within 2 × skew.
pub const MAX_NONCES_PER_KEY: usize = 1024;

/// Go's answer to an untrusted key.
const UNTRUSTED_KEY_TEXT: &str = "untrusted public key - connection rejected";
const MAX_NONCE_LEN: usize = 64;
const MAX_CLIENT_ID_LEN: usize = 256;

/// Unix time in nanoseconds, saturating outside `i64`.
pub fn unix_nanos(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// Whether the server offers, requires or refuses signed frames.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignedFramesPolicy {
    /// Never use signed frames.
    Off,
    /// Use them with clients that offer them; serve Go clients in Go mode.
    #[default]
    Offer,
    /// Refuse clients that do not offer them (Go clients included).
    Require,
}

/// The digest a Go-mode request signs: `Keccak-256(u64_be(timestamp) || nonce)`.
pub fn go_request_digest(timestamp: i64, nonce: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak::new();
    hasher
        .update(&(timestamp as u64).to_be_bytes())
        .update(nonce);
    hasher.finalize()
}

/// The digest of the client's extension transcript (docs/PROTOCOL.md §3.1).
pub fn client_transcript_digest(request: &HandshakeRequest, ext: &HandshakeRequestExt) -> [u8; 32] {
    let mut hasher = Keccak::new();
    hasher
        .update(CLIENT_TRANSCRIPT_DOMAIN)
        .update_prefixed(&request.public_key)
        .update(&(request.timestamp as u64).to_be_bytes())
        .update_prefixed(&request.nonce)
        .update_prefixed(request.client_id.as_bytes())
        .update(&ext.ext_version.to_be_bytes())
        .update(&ext.features.to_be_bytes())
        .update_prefixed(&ext.expected_server_key)
        .update(&ext.sequence_floor.to_be_bytes());
    hasher.finalize()
}

/// The digest the server signs to prove its key (docs/PROTOCOL.md §3.2). It
/// covers the whole request as sent, so it answers that request only.
pub fn server_transcript_digest(
    request_body: &[u8],
    response: &HandshakeResponse,
    ext: &HandshakeResponseExt,
) -> [u8; 32] {
    let mut hasher = Keccak::new();
    hasher
        .update(SERVER_TRANSCRIPT_DOMAIN)
        .update(&crate::crypto::keccak256(request_body))
        .update_prefixed(&ext.server_public_key)
        .update_prefixed(response.session_id.as_bytes())
        .update_prefixed(ext.identity.as_bytes())
        .update(&ext.ext_version.to_be_bytes())
        .update(&ext.features.to_be_bytes())
        .update(&ext.unicast_floor.to_be_bytes())
        .update(&ext.broadcast_floor.to_be_bytes());
    hasher.finalize()
}

/// The tag binding unicast signed frames to one session (docs/PROTOCOL.md
/// §4.2): Keccak-256 over the length-prefixed request and response bodies.
pub fn session_tag(request_body: &[u8], response_body: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak::new();
    hasher
        .update(SESSION_TAG_DOMAIN)
        .update_prefixed(request_body)
        .update_prefixed(response_body);
    hasher.finalize()
}

fn has_feature(bits: u32, feature: Feature) -> bool {
    bits & feature as u32 != 0
}

/// Encodes a bare message followed by its extension fields: protobuf merges
/// concatenated encodings, and a Go peer skips the unknown extension fields.
fn encode_with_ext(base: &impl prost::Message, ext: Option<&impl prost::Message>) -> Bytes {
    let mut buf = BytesMut::with_capacity(base.encoded_len() + ext.map_or(0, |e| e.encoded_len()));
    base.encode(&mut buf).expect("BytesMut grows");
    if let Some(ext) = ext {
        ext.encode(&mut buf).expect("BytesMut grows");
    }
    buf.freeze()
}

/// The body of a `Message{Disconnect}` frame.
pub fn disconnect_body(reason: DisconnectReason, details: impl Into<String>) -> Bytes {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Disconnect(DisconnectMessage {
            reason: reason.to_proto() as i32,
            details: details.into(),
        })),
    }
    .encode_to_vec()
    .into()
}

/// Sequence floors for signed frames: the lowest sequence number each stream
/// of the announcing side will use in this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequenceFloors {
    /// Floor of frames addressed to one peer.
    pub unicast: u64,
    /// Floor of broadcast frames; `None` for a side that never broadcasts.
    pub broadcast: Option<u64>,
}

/// Signed-frame parameters both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedFrameSession {
    /// [`session_tag`] of the request and response as sent: unique per
    /// session (the response carries the server's fresh session id and
    /// proof), known to both sides, and bound into unicast frames so they
    /// cannot cross sessions, even one opened by a replayed request.
    pub session_tag: [u8; 32],
    /// The peer's key, authenticated by the handshake; frames must verify against it.
    pub peer_key: PublicKey,
    /// The peer's floors; lower sequence numbers are refused.
    pub peer_floors: SequenceFloors,
    /// Our floors, as announced.
    pub local_floors: SequenceFloors,
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

/// Server-side handshake settings.
#[derive(Debug, Clone)]
pub struct ServerHandshakeConfig {
    /// Keys allowed to connect, and the identity each is known by.
    pub trust: Arc<TrustStore>,
    /// The server's own key: proves its identity to extended clients and signs
    /// its frames. Without it the server speaks Go mode only.
    pub key: Option<Arc<SecretKey>>,
    /// Signed-frame negotiation.
    pub signed_frames: SignedFramesPolicy,
    /// Accept delivery acknowledgements when an extended client offers them.
    pub delivery_acks: bool,
    /// Accept requests and replies when an extended client offers them.
    pub requests: bool,
    /// Allowed difference between the request's timestamp and our clock.
    pub max_clock_skew: Duration,
    /// Crypto implementation.
    pub backend: CryptoBackend,
    /// Most nonces remembered for replay protection.
    pub nonce_cache_capacity: usize,
}

impl ServerHandshakeConfig {
    /// Defaults around a trust store: Go's ±30 s, signed frames offered.
    pub fn new(trust: Arc<TrustStore>, key: Option<Arc<SecretKey>>) -> Self {
        Self {
            trust,
            key,
            signed_frames: SignedFramesPolicy::default(),
            delivery_acks: true,
            requests: true,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            backend: CryptoBackend::default(),
            nonce_cache_capacity: DEFAULT_NONCE_CACHE_CAPACITY,
        }
    }
}

/// A client the server accepted.
#[derive(Debug, Clone)]
pub struct AcceptedClient {
    /// The identity its key is trusted as; the verified sender of its messages.
    pub identity: String,
    /// Its authenticated key.
    pub public_key: PublicKey,
    /// The id the client claims (informational; `identity` is what counts).
    pub client_id: String,
    /// `"<identity>-<unix nanos>"`.
    pub session_id: String,
    /// Whether the client spoke the extension (and got our proof).
    pub extended: bool,
    /// Present when the session uses signed frames.
    pub signed_frames: Option<SignedFrameSession>,
    /// Whether both sides acknowledge delivered messages.
    pub delivery_acks: bool,
    /// Whether messages may carry request and reply ids.
    pub requests: bool,
    /// The chain id its key is trusted with, if any.
    pub chain_id: Option<String>,
}

/// The server's answer to a request.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerVerdict {
    /// Send `response`, then run the session.
    Accept {
        /// Body of the `HandshakeResponse` frame.
        response: Bytes,
        /// Who connected.
        client: Box<AcceptedClient>,
    },
    /// Send `response`, then `disconnect`, then close.
    Reject {
        /// Body of the refusing `HandshakeResponse` frame.
        response: Bytes,
        /// Body of the `Message{Disconnect}` frame that follows it.
        disconnect: Bytes,
        /// Why.
        error: HandshakeError,
    },
}

/// The server half: stateless per connection, except for the shared nonce
/// memory. Cheap to clone; clones share the nonce memory.
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    shared: Arc<ServerShared>,
}

#[derive(Debug)]
struct ServerShared {
    config: ServerHandshakeConfig,
    nonces: NonceCache,
}

impl ServerHandshake {
    /// A server handshake with its own nonce memory.
    pub fn new(config: ServerHandshakeConfig) -> Self {
        let nonces = NonceCache::new(config.nonce_cache_capacity);
        Self {
            shared: Arc::new(ServerShared { config, nonces }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ServerHandshakeConfig {
        &self.shared.config
    }

    /// Answers the request in `request_body`, received at `now`. `local_floors`
    /// are the sequence floors this session will sign from, if it signs.
    pub fn respond(
        &self,
        request_body: &[u8],
        now: SystemTime,
        local_floors: SequenceFloors,
    ) -> ServerVerdict {
        match self.check(request_body, now, local_floors) {
            Ok((response, client)) => ServerVerdict::Accept {
                response,
                client: Box::new(client),
            },
            Err(error) => reject(error),
        }
    }

    /// The checks of a request that need no curve arithmetic (decoding,
    /// clock, nonce, trust): the refusal if one fails, `None` if the request
    /// needs [`respond`](Self::respond). Cheap enough to run for every
    /// request on the connection's own task, so that only requests naming
    /// a trusted key wait for signature work.
    pub fn screen(&self, request_body: &[u8], now: SystemTime) -> Option<ServerVerdict> {
        self.precheck(request_body, now).err().map(reject)
    }

    /// Decodes the request and runs the checks before the signature.
    fn precheck(&self, body: &[u8], now: SystemTime) -> Result<Prechecked, HandshakeError> {
        let malformed = |what| move |source| HandshakeError::Malformed { what, source };
        let request = HandshakeRequest::decode(body).map_err(malformed("HandshakeRequest"))?;
        let ext = HandshakeRequestExt::decode(body).map_err(malformed("HandshakeRequestExt"))?;

        // Go's checks (clock, signature, trust), except that the key is
        // looked up before any curve arithmetic: a stranger's request costs
        // a hash-map look-up, not a key decompression and a recovery.
        let now_nanos = unix_nanos(now);
        let skew = i128::from(request.timestamp) - i128::from(now_nanos);
        let max_skew = self.shared.config.max_clock_skew.as_nanos() as i128;
        if skew > max_skew {
            return Err(HandshakeError::TimestampInFuture { skew_nanos: skew });
        }
        if skew < -max_skew {
            return Err(HandshakeError::TimestampTooOld { skew_nanos: skew });
        }
        if request.nonce.is_empty() || request.nonce.len() > MAX_NONCE_LEN {
            return Err(HandshakeError::BadSignature(
                crate::error::KeyError::InvalidSignature {
                    reason: "nonce must be 1 to 64 bytes",
                },
            ));
        }
        let Some(peer) = self.shared.config.trust.lookup(&request.public_key) else {
            return Err(HandshakeError::UntrustedKey {
                public_key: hex::encode(&request.public_key[..request.public_key.len().min(65)]),
            });
        };
        Ok(Prechecked {
            request,
            ext,
            peer,
            now_nanos,
        })
    }

    fn check(
        &self,
        body: &[u8],
        now: SystemTime,
        local_floors: SequenceFloors,
    ) -> Result<(Bytes, AcceptedClient), HandshakeError> {
        let Prechecked {
            request,
            ext,
            peer:
                TrustedPeer {
                    identity,
                    key: claimed,
                    mode,
                    chain_id,
                },
            now_nanos,
        } = self.precheck(body, now)?;
        let signature =
            Signature::from_slice(&request.signature).map_err(HandshakeError::BadSignature)?;
        let digest = go_request_digest(request.timestamp, &request.nonce);
        let recovered = recover(self.shared.config.backend, &digest, &signature)
            .map_err(HandshakeError::BadSignature)?;
        if recovered != claimed {
            return Err(HandshakeError::BadSignature(
                crate::error::KeyError::VerificationFailed,
            ));
        }

        let extended = ext.ext_version >= EXT_VERSION && self.shared.config.key.is_some();
        if !extended && !mode.allows_go_mode() {
            return Err(HandshakeError::GoModeRefused {
                identity,
                server_has_key: self.shared.config.key.is_some(),
            });
        }
        if extended {
            let ext_signature =
                Signature::from_slice(&ext.ext_signature).map_err(HandshakeError::BadSignature)?;
            claimed
                .verify_recoverable_with(
                    self.shared.config.backend,
                    &client_transcript_digest(&request, &ext),
                    &ext_signature,
                )
                .map_err(HandshakeError::BadSignature)?;
            let own_key = self
                .shared
                .config
                .key
                .as_ref()
                .expect("extended implies a key")
                .public_key();
            if !ext.expected_server_key.is_empty()
                && ext.expected_server_key[..] != own_key.as_compressed()[..]
            {
                return Err(HandshakeError::WrongAudience);
            }
        }
        let client_offers_signed = extended && has_feature(ext.features, Feature::SignedFrames);
        let signed = match self.shared.config.signed_frames {
            SignedFramesPolicy::Off => false,
            SignedFramesPolicy::Offer => client_offers_signed,
            SignedFramesPolicy::Require if client_offers_signed => true,
            SignedFramesPolicy::Require => {
                return Err(HandshakeError::FeatureRequired {
                    feature: "signed frames",
                });
            }
        };

        // Only requests from trusted keys with valid signatures reach the nonce
        // memory, so strangers cannot flush it.
        self.shared.nonces.insert_if_new(
            &claimed,
            &request.nonce,
            now_nanos,
            self.shared.config.max_clock_skew,
        )?;

        let session_id = format!("{identity}-{now_nanos}");
        let response = HandshakeResponse {
            accepted: true,
            error: String::new(),
            session_id: session_id.clone(),
        };
        let mut accepted = AcceptedClient {
            identity: identity.clone(),
            public_key: claimed.clone(),
            client_id: request.client_id.chars().take(MAX_CLIENT_ID_LEN).collect(),
            session_id,
            extended,
            signed_frames: None,
            delivery_acks: false,
            requests: false,
            chain_id,
        };
        if !extended {
            return Ok((
                encode_with_ext(&response, None::<&HandshakeResponseExt>),
                accepted,
            ));
        }

        let server_key = self
            .shared
            .config
            .key
            .as_ref()
            .expect("extended implies a key");
        let mut features = Feature::MutualAuth as u32;
        if self.shared.config.delivery_acks && has_feature(ext.features, Feature::DeliveryAcks) {
            features |= Feature::DeliveryAcks as u32;
            accepted.delivery_acks = true;
        }
        if self.shared.config.requests && has_feature(ext.features, Feature::Requests) {
            features |= Feature::Requests as u32;
            accepted.requests = true;
        }
        if signed {
            features |= Feature::SignedFrames as u32;
            accepted.signed_frames = Some(SignedFrameSession {
                // Set below, once the response bytes exist.
                session_tag: [0; 32],
                peer_key: claimed,
                peer_floors: SequenceFloors {
                    unicast: ext.sequence_floor,
                    broadcast: None,
                },
                local_floors,
            });
        }
        let mut response_ext = HandshakeResponseExt {
            ext_version: EXT_VERSION,
            features,
            server_public_key: Bytes::copy_from_slice(server_key.public_key().as_compressed()),
            identity,
            unicast_floor: if signed { local_floors.unicast } else { 0 },
            // A server that never broadcasts announces an unreachable floor.
            broadcast_floor: if signed {
                local_floors.broadcast.unwrap_or(u64::MAX)
            } else {
                0
            },
            server_signature: Bytes::new(),
        };
        let proof = server_key.sign_digest_with(
            self.shared.config.backend,
            &server_transcript_digest(body, &response, &response_ext),
        );
        response_ext.server_signature = Bytes::copy_from_slice(proof.as_bytes());
        let response_body = encode_with_ext(&response, Some(&response_ext));
        if let Some(frames) = &mut accepted.signed_frames {
            frames.session_tag = session_tag(body, &response_body);
        }
        Ok((response_body, accepted))
    }
}

/// A request that passed the checks before the signature.
struct Prechecked {
    request: HandshakeRequest,
    ext: HandshakeRequestExt,
    peer: TrustedPeer,
    now_nanos: i64,
}

/// The refusal of a request for `error`.
fn reject(error: HandshakeError) -> ServerVerdict {
    // A trusted key with a bad signature is answered like an untrusted one,
    // so that the answer tells a stranger nothing about which keys are
    // trusted (the key is looked up first).
    let text = match &error {
        HandshakeError::BadSignature(_) => UNTRUSTED_KEY_TEXT.to_owned(),
        error => error.to_string(),
    };
    let response = HandshakeResponse {
        accepted: false,
        error: text.clone(),
        session_id: String::new(),
    }
    .encode_to_vec()
    .into();
    let disconnect = disconnect_body(error.disconnect_reason(), text);
    ServerVerdict::Reject {
        response,
        disconnect,
        error,
    }
}
