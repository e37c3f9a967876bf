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

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::{
    codec::LENGTH_PREFIX_LEN,
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

/// An audience as it is hashed and encoded, borrowed: sealing a frame
/// allocates nothing for it.
#[derive(Clone, Copy)]
enum AudienceField<'a> {
    Exclude(&'a str),
    Recipient(&'a [u8]),
}

impl<'a> AudienceField<'a> {
    fn of(audience: &'a Audience) -> Self {
        match audience {
            Audience::Broadcast { exclude } => Self::Exclude(exclude),
            Audience::Unicast { recipient, .. } => Self::Recipient(recipient.as_compressed()),
        }
    }

    fn of_proto(audience: &'a signed_frame::Audience) -> Self {
        match audience {
            signed_frame::Audience::BroadcastExclude(exclude) => Self::Exclude(exclude),
            signed_frame::Audience::RecipientKey(key) => Self::Recipient(key),
        }
    }

    /// The field's tag and contents (`SignedFrame` fields 2 and 3).
    fn field(self) -> (u32, &'a [u8]) {
        match self {
            Self::Exclude(exclude) => (2, exclude.as_bytes()),
            Self::Recipient(key) => (3, key),
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
    let audience = AudienceField::of_proto(audience);
    let mut hasher = frame_hasher(sender, sequence, audience, session, messages.len());
    for message in messages {
        hasher.update_prefixed(message);
    }
    hasher.finalize()
}

/// The digest's hasher up to the messages, which follow, each prefixed.
fn frame_hasher(
    sender: &PublicKey,
    sequence: u64,
    audience: AudienceField<'_>,
    session: &[u8; 32],
    count: usize,
) -> Keccak {
    let mut hasher = Keccak::new();
    hasher
        .update(SIGNED_FRAME_DOMAIN)
        .update(sender.as_compressed())
        .update(&sequence.to_be_bytes());
    match audience {
        AudienceField::Exclude(exclude) => hasher
            .update(&[AUDIENCE_BROADCAST])
            .update_prefixed(exclude.as_bytes()),
        AudienceField::Recipient(key) => hasher
            .update(&[AUDIENCE_UNICAST])
            .update_prefixed(key)
            .update(session),
    };
    hasher.update(&(count as u32).to_be_bytes());
    hasher
}

/// Seals encoded `rollup.v1.Message`s (at least one) into one signed frame.
/// The signature is the 64-byte `r || s`: the receiver knows our key, so a
/// recovery id would only give the same signature a second encoding.
///
/// The bytes are those of [`seal_in_place`], which the transport itself uses.
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
    let room = header_room(audience);
    let mut batch = BytesMut::with_capacity(
        room + messages.iter().map(|m| m.len() + 11).sum::<usize>() + SIGNATURE_FIELD_LEN,
    );
    batch.put_bytes(0, room);
    for message in &messages {
        put_message_field(&mut batch, message.len());
        batch.put_slice(message);
    }
    let (start, signature) = seal_in_place(
        key,
        backend,
        sequence,
        audience,
        &mut batch,
        room,
        messages.len(),
    )
    .expect("a batch laid out by put_message_field");
    batch.put_slice(&signature);
    // The frame body follows its 4-byte length prefix.
    SignedFrame::decode(&batch[start + LENGTH_PREFIX_LEN..]).expect("a frame just encoded")
}

/// One message sealed alone into a complete wire frame (length prefix
/// included), as a broadcast is: encoded once, in place, for every
/// recipient. Refused if the frame would exceed `max_frame_size`.
pub fn seal_message(
    key: &SecretKey,
    backend: CryptoBackend,
    sequence: u64,
    audience: &Audience,
    message: &Message,
    max_frame_size: usize,
) -> Result<Bytes, crate::error::CodecError> {
    let room = header_room(audience);
    let len = message.encoded_len();
    let mut batch = BytesMut::with_capacity(room + 11 + len + SIGNATURE_FIELD_LEN);
    batch.put_bytes(0, room);
    put_message_field(&mut batch, len);
    message
        .encode(&mut batch)
        .map_err(|err| crate::error::CodecError::Io(std::io::Error::other(err)))?;
    let (start, signature) =
        seal_in_place(key, backend, sequence, audience, &mut batch, room, 1)
            .map_err(|err| crate::error::CodecError::Io(std::io::Error::other(err)))?;
    batch.put_slice(&signature);
    let frame = batch.freeze().slice(start..);
    crate::codec::check_frame_len(frame.len() - LENGTH_PREFIX_LEN, max_frame_size)?;
    Ok(frame)
}

/// Bytes of the `signature` field that ends every signed frame.
pub const SIGNATURE_FIELD_LEN: usize = 2 + 64;

/// Room [`seal_in_place`] needs ahead of a batch's messages for the frame's
/// length prefix, its sequence number and `audience`.
pub fn header_room(audience: &Audience) -> usize {
    let audience_len = match audience {
        Audience::Broadcast { exclude } => exclude.len(),
        Audience::Unicast { .. } => 33,
    };
    // Prefix, sequence (tag + up to 10 varint bytes), audience (tag + length).
    LENGTH_PREFIX_LEN
        + 11
        + 1
        + prost::encoding::encoded_len_varint(audience_len as u64)
        + audience_len
}

/// Appends the header of one `messages` entry of `len` bytes; the encoded
/// message follows it, in its final wire form.
pub fn put_message_field(batch: &mut impl BufMut, len: usize) {
    prost::encoding::encode_key(4, prost::encoding::WireType::LengthDelimited, batch);
    prost::encoding::encode_varint(len as u64, batch);
}

/// The one place frames are signed. `batch[..room]` is free room (at least
/// [`header_room`]), followed by `count` (at least one) entries written with
/// [`put_message_field`]. Hashes the messages where they lie, signs, writes
/// the length prefix, sequence number and audience at the end of the room,
/// and returns where the frame (its length prefix) starts in `batch` and the
/// signature field that must directly follow the batch on the wire. The
/// bytes are exactly those of encoding the [`SignedFrame`].
pub fn seal_in_place(
    key: &SecretKey,
    backend: CryptoBackend,
    sequence: u64,
    audience: &Audience,
    batch: &mut [u8],
    room: usize,
    count: usize,
) -> Result<(usize, [u8; SIGNATURE_FIELD_LEN]), SignedFrameError> {
    let malformed = |what: &str| SignedFrameError::Malformed(format!("batch to seal: {what}"));
    if room < header_room(audience) || room > batch.len() || count == 0 {
        return Err(malformed("no room for the header, or no message"));
    }
    let session = match audience {
        Audience::Unicast { session, .. } => *session,
        Audience::Broadcast { .. } => [0; 32],
    };
    let field = AudienceField::of(audience);
    let mut hasher = frame_hasher(key.public_key(), sequence, field, &session, count);
    let mut entries = &batch[room..];
    let mut seen = 0;
    while !entries.is_empty() {
        let key = prost::encoding::decode_varint(&mut entries).map_err(|_| malformed("tag"))?;
        let len = prost::encoding::decode_varint(&mut entries).map_err(|_| malformed("length"))?;
        let len = usize::try_from(len).map_err(|_| malformed("length"))?;
        if key != (4 << 3 | 2) || len > entries.len() {
            return Err(malformed("entry"));
        }
        hasher.update_prefixed(&entries[..len]);
        entries = &entries[len..];
        seen += 1;
    }
    if seen != count {
        return Err(malformed("message count"));
    }
    let signature = key.sign_digest_with(backend, &hasher.finalize());
    let mut signature_field = [0; SIGNATURE_FIELD_LEN];
    signature_field[0] = 5 << 3 | 2;
    signature_field[1] = 64;
    signature_field[2..].copy_from_slice(&signature.to_compact());

    // The header is written straight into the room, ending where the
    // messages begin: sequence (field 1), then the audience.
    let (tag, audience_bytes) = field.field();
    let header_len = prost::encoding::uint64::encoded_len(1, &sequence)
        + prost::encoding::key_len(tag)
        + prost::encoding::encoded_len_varint(audience_bytes.len() as u64)
        + audience_bytes.len();
    let body = header_len + (batch.len() - room) + SIGNATURE_FIELD_LEN;
    let body = u32::try_from(body).map_err(|_| malformed("too large"))?;
    let start = room - header_len - LENGTH_PREFIX_LEN;
    let mut header = &mut batch[start..room];
    header.put_u32(body);
    prost::encoding::uint64::encode(1, &sequence, &mut header);
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut header);
    prost::encoding::encode_varint(audience_bytes.len() as u64, &mut header);
    header.put_slice(audience_bytes);
    Ok((start, signature_field))
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
        let mut frame = SignedFrame::default();
        self.open_into(body, allowance, &mut frame)?;
        Ok(frame.messages)
    }

    /// Like [`open_within`](Self::open_within), decoding into `frame`
    /// (cleared first), whose message list keeps its capacity from frame to
    /// frame; the messages are `frame.messages`. Whatever the outcome,
    /// `frame` may still hold slices of `body` until it is cleared again.
    pub fn open_into(
        &mut self,
        body: Bytes,
        allowance: &mut DecodeAllowance,
        frame: &mut SignedFrame,
    ) -> Result<(), SignedFrameError> {
        // Before decoding, so before the signature is checked: bounded.
        allowance
            .charge::<SignedFrame>(&body, decode_bound::Source::Shared)
            .map_err(|err| SignedFrameError::Malformed(err.to_string()))?;
        frame.clear();
        frame
            .merge(body)
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
        Ok(())
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
