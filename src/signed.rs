//! Signed frames: per-message signatures after a handshake that negotiated them.
//!
//! One signature covers a batch of messages, so a busy writer signs once per
//! batch and a broadcast is signed once for all its recipients. The signed
//! digest binds a domain tag, the sender's key, a sequence number, the
//! audience and every message (docs/PROTOCOL.md §4). The receiver verifies
//! against the key authenticated in the handshake (never recovers), checks the
//! audience, and refuses replays with a sliding window per stream.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use bytes::Bytes;
use prost::Message as _;

use crate::{
    crypto::{CryptoBackend, Keccak, PublicKey, SecretKey},
    decode_bound::{self, DecodeAllowance},
    error::SignedFrameError,
    handshake::{SignedFrameSession, unix_nanos},
    proto::{
        Message,
        transport::v1::{SignedFrame, signed_frame},
    },
};

/// Domain tag of signed-frame digests.
pub const SIGNED_FRAME_DOMAIN: &[u8] = b"publisher-transport/v1/signed-frame";

/// Sequence numbers remembered behind the highest one seen, per stream.
/// Frames sealed concurrently may arrive out of order by up to this many.
pub const REPLAY_WINDOW_BITS: u64 = 4096;

const AUDIENCE_BROADCAST: u8 = 1;
const AUDIENCE_UNICAST: u8 = 2;

/// Who a signed frame is for.
// A short-lived value built per seal, never stored in bulk.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every peer of the sender except the one with identity `exclude` ("" = none).
    Broadcast {
        /// Identity left out.
        exclude: String,
    },
    /// Only the peer holding this key, in this session only.
    Unicast {
        /// The recipient's key.
        recipient: PublicKey,
        /// The session's tag ([`SignedFrameSession::session_tag`]); signed
        /// over but not sent, so a frame opens only in its own session.
        session: [u8; 32],
    },
}

impl Audience {
    fn to_proto(&self) -> signed_frame::Audience {
        match self {
            Self::Broadcast { exclude } => {
                signed_frame::Audience::BroadcastExclude(exclude.clone())
            }
            Self::Unicast { recipient, .. } => signed_frame::Audience::RecipientKey(
                Bytes::copy_from_slice(recipient.as_compressed()),
            ),
        }
    }
}

/// The digest a signed frame's signature covers. `session` is the session
/// tag, covered for unicast frames only (a broadcast serves many sessions).
pub fn frame_digest(
    sender: &PublicKey,
    sequence: u64,
    audience: &signed_frame::Audience,
    session: &[u8; 32],
    messages: &[Bytes],
) -> [u8; 32] {
    let mut hasher = Keccak::new();
    hasher
        .update(SIGNED_FRAME_DOMAIN)
        .update(sender.as_compressed())
        .update(&sequence.to_be_bytes());
    match audience {
        signed_frame::Audience::BroadcastExclude(exclude) => hasher
            .update(&[AUDIENCE_BROADCAST])
            .update_prefixed(exclude.as_bytes()),
        signed_frame::Audience::RecipientKey(key) => hasher
            .update(&[AUDIENCE_UNICAST])
            .update_prefixed(key)
            .update(session),
    };
    hasher.update(&(messages.len() as u32).to_be_bytes());
    for message in messages {
        hasher.update_prefixed(message);
    }
    hasher.finalize()
}

/// Seals encoded `rollup.v1.Message`s (at least one) into one signed frame.
/// The signature is the 64-byte `r || s`: the receiver knows our key, so a
/// recovery id would only give the same signature a second encoding.
pub fn seal(
    key: &SecretKey,
    backend: CryptoBackend,
    sequence: u64,
    audience: &Audience,
    messages: Vec<Bytes>,
) -> SignedFrame {
    debug_assert!(
        !messages.is_empty(),
        "a signed frame carries at least one message"
    );
    let session = match audience {
        Audience::Unicast { session, .. } => *session,
        Audience::Broadcast { .. } => [0; 32],
    };
    let audience = audience.to_proto();
    let digest = frame_digest(key.public_key(), sequence, &audience, &session, &messages);
    let signature = key.sign_digest_with(backend, &digest);
    SignedFrame {
        sequence,
        audience: Some(audience),
        messages,
        signature: Bytes::copy_from_slice(&signature.to_compact()),
    }
}

/// A stream's sequence numbers: start from wall-clock nanoseconds, then count
/// up by one, so they keep rising across restarts (at under 10⁹ frames/s).
#[derive(Debug)]
pub struct SequenceCounter {
    next: AtomicU64,
}

impl SequenceCounter {
    /// A counter whose first number is `now` in Unix nanoseconds.
    pub fn from_clock(now: SystemTime) -> Self {
        Self::starting_at(unix_nanos(now).max(1) as u64)
    }

    /// A counter whose first number is `first`.
    pub fn starting_at(first: u64) -> Self {
        Self {
            next: AtomicU64::new(first),
        }
    }

    /// The number the next frame will get: every later frame is at least this.
    pub fn floor(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Takes the next number.
    pub fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst)
    }
}

/// Sliding anti-replay window (as in RFC 6479 and WireGuard): accepts each
/// sequence number once, in any order within [`REPLAY_WINDOW_BITS`] of the
/// highest seen, and nothing below the session's floor.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    floor: u64,
    highest: Option<u64>,
    bits: [u64; (REPLAY_WINDOW_BITS / 64) as usize],
}

impl ReplayWindow {
    /// A window refusing everything below `floor`.
    pub fn new(floor: u64) -> Self {
        Self {
            floor,
            highest: None,
            bits: [0; (REPLAY_WINDOW_BITS / 64) as usize],
        }
    }

    fn bit(sequence: u64) -> (usize, u64) {
        let index = sequence % REPLAY_WINDOW_BITS;
        ((index / 64) as usize, 1 << (index % 64))
    }

    /// Whether `sequence` would be accepted (does not record it).
    pub fn check(&self, sequence: u64) -> Result<(), SignedFrameError> {
        if sequence < self.floor {
            return Err(SignedFrameError::TooOld {
                sequence,
                lowest_accepted: self.floor,
            });
        }
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if sequence > highest {
            return Ok(());
        }
        if highest - sequence >= REPLAY_WINDOW_BITS {
            return Err(SignedFrameError::TooOld {
                sequence,
                lowest_accepted: highest - REPLAY_WINDOW_BITS + 1,
            });
        }
        let (word, mask) = Self::bit(sequence);
        if self.bits[word] & mask != 0 {
            return Err(SignedFrameError::Replayed { sequence });
        }
        Ok(())
    }

    /// Records `sequence`, which must have passed [`check`](Self::check).
    pub fn record(&mut self, sequence: u64) {
        match self.highest {
            Some(highest) if sequence <= highest => {}
            Some(highest) if sequence - highest < REPLAY_WINDOW_BITS => {
                // Forget the numbers the window slides past.
                for old in highest + 1..sequence {
                    let (word, mask) = Self::bit(old);
                    self.bits[word] &= !mask;
                }
                let (word, mask) = Self::bit(sequence);
                self.bits[word] &= !mask;
                self.highest = Some(sequence);
            }
            _ => {
                self.bits = [0; (REPLAY_WINDOW_BITS / 64) as usize];
                self.highest = Some(sequence);
            }
        }
        let (word, mask) = Self::bit(sequence);
        self.bits[word] |= mask;
    }
}

/// Opens the signed frames one peer sends us.
#[derive(Debug, Clone)]
pub struct FrameOpener {
    peer_key: PublicKey,
    local_key: PublicKey,
    local_identity: Option<String>,
    session_tag: [u8; 32],
    backend: CryptoBackend,
    unicast: ReplayWindow,
    broadcast: Option<ReplayWindow>,
}

impl FrameOpener {
    /// An opener for a session. `local_identity` is the identity the peer
    /// knows us by: broadcasts excluding it are refused; without it, every
    /// broadcast that excludes anyone is refused, as we cannot tell if it is us.
    pub fn new(
        session: &SignedFrameSession,
        local_key: PublicKey,
        local_identity: Option<String>,
        backend: CryptoBackend,
    ) -> Self {
        Self {
            peer_key: session.peer_key.clone(),
            session_tag: session.session_tag,
            local_key,
            local_identity,
            backend,
            unicast: ReplayWindow::new(session.peer_floors.unicast),
            broadcast: session.peer_floors.broadcast.map(ReplayWindow::new),
        }
    }

    /// Verifies a signed frame body and returns its encoded messages.
    pub fn open(&mut self, body: &[u8]) -> Result<Vec<Bytes>, SignedFrameError> {
        self.open_bytes(Bytes::copy_from_slice(body))
    }

    /// Like [`open`](Self::open), without copying: the returned messages
    /// are slices of `body`.
    pub fn open_bytes(&mut self, body: Bytes) -> Result<Vec<Bytes>, SignedFrameError> {
        let mut allowance = DecodeAllowance::for_frame(body.len());
        self.open_within(body, &mut allowance)
    }

    /// Like [`open_bytes`](Self::open_bytes), charging the frame's decoding
    /// to `allowance`, which the caller goes on charging as it decodes the
    /// messages: one allowance covers the whole frame.
    pub fn open_within(
        &mut self,
        body: Bytes,
        allowance: &mut DecodeAllowance,
    ) -> Result<Vec<Bytes>, SignedFrameError> {
        // Before decoding, so before the signature is checked: bounded.
        allowance
            .charge::<SignedFrame>(&body, decode_bound::Source::Shared)
            .map_err(|err| SignedFrameError::Malformed(err.to_string()))?;
        let frame = SignedFrame::decode(body)
            .map_err(|err| SignedFrameError::Malformed(err.to_string()))?;
        if frame.messages.is_empty() {
            return Err(SignedFrameError::Malformed(
                "frame carries no message".into(),
            ));
        }
        let audience = frame
            .audience
            .as_ref()
            .ok_or_else(|| SignedFrameError::Malformed("frame has no audience".into()))?;
        let window = match audience {
            signed_frame::Audience::RecipientKey(key) => {
                if key[..] != self.local_key.as_compressed()[..] {
                    return Err(SignedFrameError::Misaddressed("unicast to another key"));
                }
                &mut self.unicast
            }
            signed_frame::Audience::BroadcastExclude(exclude) => {
                let excluded_us = match &self.local_identity {
                    Some(identity) => exclude == identity,
                    None => !exclude.is_empty(),
                };
                if excluded_us {
                    return Err(SignedFrameError::Misaddressed("broadcast excludes us"));
                }
                self.broadcast
                    .as_mut()
                    .ok_or(SignedFrameError::Misaddressed("peer does not broadcast"))?
            }
        };
        window.check(frame.sequence)?;
        let session = match audience {
            signed_frame::Audience::RecipientKey(_) => self.session_tag,
            signed_frame::Audience::BroadcastExclude(_) => [0; 32],
        };
        let digest = frame_digest(
            &self.peer_key,
            frame.sequence,
            audience,
            &session,
            &frame.messages,
        );
        self.peer_key
            .verify_compact_with(self.backend, &digest, &frame.signature)
            .map_err(|_| SignedFrameError::BadSignature)?;
        // Recorded only once authentic, so forgeries cannot advance the window.
        window.record(frame.sequence);
        Ok(frame.messages)
    }

    /// Verifies a signed frame body and decodes its messages.
    pub fn open_messages(&mut self, body: &[u8]) -> Result<Vec<Message>, SignedFrameError> {
        let mut allowance = DecodeAllowance::for_frame(body.len());
        self.open_within(Bytes::copy_from_slice(body), &mut allowance)?
            .into_iter()
            .map(|bytes| {
                allowance
                    .decode(bytes)
                    .map_err(|err| SignedFrameError::Malformed(err.to_string()))
            })
            .collect()
    }
}
