//! Bounded decoding: what decoding a peer's bytes may allocate.
//!
//! Protobuf lets a few bytes stand for a whole struct: an empty entry of a
//! repeated sub-message field is two bytes on the wire and a 72-byte struct
//! (in a vector that may double) in memory, so a 10 MiB frame of them would
//! decode into hundreds of MiB. Before a peer's bytes are decoded, a wire
//! pre-scan estimates the heap the decoded value would take, without
//! allocating, and refuses the frame if the estimate exceeds
//! [`DECODE_FACTOR`] times the frame's length plus [`DECODE_SLACK`].
//!
//! The scan is schema-aware: build.rs derives from `proto/` which field
//! numbers hold sub-messages, strings, bytes or scalars, and the size of each
//! generated struct. It counts what prost allocates (vectors of repeated
//! fields, string contents, bytes contents when decoding from a slice) and
//! deliberately over-counts vectors (twice their length, or their minimum
//! capacity), so the estimate is never below what decoding allocates.

use bytes::Bytes;

use crate::proto::{Message, transport::v1::SignedFrame};

/// Decoded heap a frame may cost per byte of its body.
pub const DECODE_FACTOR: u64 = 4;

/// Decoded heap every frame may cost on top of [`DECODE_FACTOR`] per byte:
/// room for a batch of many tiny messages (a 64 KiB signed frame of 4-byte
/// messages estimates at 1 MiB).
pub const DECODE_SLACK: u64 = 1024 * 1024;

/// Deepest nesting of messages accepted, as prost's own recursion limit.
pub const MAX_DEPTH: u32 = 100;

/// Why a frame is refused before it is decoded.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeBoundError {
    /// Decoding the frame would allocate more than the bound allows.
    #[error("{what} of {body_len} bytes would decode to over {estimate} bytes (bound {bound})")]
    TooLarge {
        /// The message type being decoded.
        what: &'static str,
        /// Length of the encoded message.
        body_len: usize,
        /// The estimate when the scan stopped (a lower bound of the whole estimate).
        estimate: u64,
        /// What the frame was allowed.
        bound: u64,
    },
    /// The bytes are not valid protobuf for the type (found by the scan).
    #[error("{what}: {reason}")]
    Malformed {
        /// The message type being decoded.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The bytes passed the scan but prost refused them.
    #[error("{what}: {source}")]
    Decode {
        /// The message type being decoded.
        what: &'static str,
        /// The protobuf error.
        source: prost::DecodeError,
    },
}

/// How the bytes will be decoded: prost slices `bytes` fields out of a
/// [`Bytes`] buffer without copying, but copies them out of a `&[u8]`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Decoded from [`Bytes`]: `bytes` fields share the buffer.
    Shared,
    /// Decoded from a slice: `bytes` fields are copied.
    Copied,
}

/// A generated message type the scan knows the schema of.
pub trait BoundedMessage: prost::Message + Default {
    /// Index of the type's schema.
    #[doc(hidden)]
    const SCHEMA: usize;
}

/// What one frame may still allocate when decoded; a frame whose parts are
/// decoded one by one (a signed frame's messages) charges them all to one
/// allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeAllowance {
    bound: u64,
    remaining: u64,
}

impl DecodeAllowance {
    /// The allowance of a frame body of `body_len` bytes:
    /// `DECODE_FACTOR * body_len + DECODE_SLACK`.
    pub fn for_frame(body_len: usize) -> Self {
        let bound = DECODE_FACTOR
            .saturating_mul(body_len as u64)
            .saturating_add(DECODE_SLACK);
        Self {
            bound,
            remaining: bound,
        }
    }

    /// The whole allowance.
    pub fn bound(&self) -> u64 {
        self.bound
    }

    /// What is left of it.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Charges `bytes` that the receiver itself allocates for `what`, parts
    /// of the frame `body_len` bytes long (say, a result slot per message of
    /// a signed frame), or refuses.
    pub fn reserve(
        &mut self,
        what: &'static str,
        body_len: usize,
        bytes: u64,
    ) -> Result<(), DecodeBoundError> {
        if bytes > self.remaining {
            return Err(DecodeBoundError::TooLarge {
                what,
                body_len,
                estimate: bytes.saturating_add(self.bound - self.remaining),
                bound: self.bound,
            });
        }
        self.remaining -= bytes;
        Ok(())
    }

    /// Estimates decoding `body` as `M` and charges it, or refuses.
    pub fn charge<M: BoundedMessage>(
        &mut self,
        body: &[u8],
        source: Source,
    ) -> Result<u64, DecodeBoundError> {
        let schema = &SCHEMAS[M::SCHEMA];
        let mut scan = Scan {
            total: 0,
            limit: self.remaining,
            source,
        };
        match scan.message(M::SCHEMA, body, 0) {
            Ok(()) => {
                self.remaining -= scan.total;
                Ok(scan.total)
            }
            Err(Stop::OverLimit) => Err(DecodeBoundError::TooLarge {
                what: schema.name,
                body_len: body.len(),
                estimate: scan.total + (self.bound - self.remaining),
                bound: self.bound,
            }),
            Err(Stop::Malformed(reason)) => Err(DecodeBoundError::Malformed {
                what: schema.name,
                reason,
            }),
        }
    }

    /// Charges decoding `body` as `M`, then decodes it (sharing `body`).
    pub fn decode<M: BoundedMessage>(&mut self, body: Bytes) -> Result<M, DecodeBoundError> {
        self.charge::<M>(&body, Source::Shared)?;
        M::decode(body).map_err(|source| DecodeBoundError::Decode {
            what: SCHEMAS[M::SCHEMA].name,
            source,
        })
    }

    /// Charges decoding `rest` as `M`, and `leading` bytes for what the
    /// caller already decoded into `target` from the fields before it, then
    /// merges `rest` into `target` (which it does not clear). When `target`
    /// holds exactly the decoding of those leading fields, the result is
    /// that of decoding the whole body.
    pub(crate) fn merge_into<M: BoundedMessage>(
        &mut self,
        rest: Bytes,
        leading: u64,
        target: &mut M,
    ) -> Result<(), DecodeBoundError> {
        let what = SCHEMAS[M::SCHEMA].name;
        self.reserve(what, rest.len(), leading)?;
        self.charge::<M>(&rest, Source::Shared)?;
        target
            .merge(rest)
            .map_err(|source| DecodeBoundError::Decode { what, source })
    }

    /// Charges decoding `body` as `M`, then decodes it into `target`,
    /// which keeps the allocations it can reuse (string and vector
    /// capacity) from an earlier message.
    pub fn decode_into<M: BoundedMessage>(
        &mut self,
        body: Bytes,
        target: &mut M,
    ) -> Result<(), DecodeBoundError> {
        self.charge::<M>(&body, Source::Shared)?;
        target.clear();
        target
            .merge(body)
            .map_err(|source| DecodeBoundError::Decode {
                what: SCHEMAS[M::SCHEMA].name,
                source,
            })
    }
}

/// The heap decoding `body` as `M` would take at most, by the same scan;
/// `None` if the bytes are malformed.
pub fn estimate<M: BoundedMessage>(body: &[u8], source: Source) -> Option<u64> {
    let mut scan = Scan {
        total: 0,
        limit: u64::MAX,
        source,
    };
    scan.message(M::SCHEMA, body, 0).ok().map(|()| scan.total)
}

/// Decodes a received frame body as a [`Message`] within its frame's allowance.
pub fn decode_message(body: Bytes) -> Result<Message, DecodeBoundError> {
    DecodeAllowance::for_frame(body.len()).decode(body)
}

/// Checks that a signed frame body stays within its allowance.
pub fn check_signed_frame(body: &[u8]) -> Result<(), DecodeBoundError> {
    DecodeAllowance::for_frame(body.len())
        .charge::<SignedFrame>(body, Source::Shared)
        .map(drop)
}

/// What a field holds, as far as allocation is concerned.
// Fixed-width kinds are unused while no `.proto` type has them.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy)]
enum FieldKind {
    Varint,
    Fixed32,
    Fixed64,
    String,
    Bytes,
    /// A sub-message: the index of its schema.
    Message(usize),
}

#[derive(Debug)]
struct FieldSchema {
    number: u64,
    kind: FieldKind,
    repeated: bool,
    /// Bytes one element takes in a repeated field's vector.
    element_size: usize,
    /// The field's counter in a scanned instance, if it is repeated or a
    /// string (`usize::MAX` otherwise).
    slot: usize,
}

#[derive(Debug)]
struct MessageSchema {
    name: &'static str,
    fields: &'static [FieldSchema],
    /// Index in `fields` by field number (255: none), up to the highest
    /// number below 256 that the type has.
    by_number: &'static [u8],
    /// Indices of the repeated fields, in order.
    tallied: &'static [usize],
}

impl MessageSchema {
    #[inline(always)]
    fn field(&self, number: u64) -> Option<&'static FieldSchema> {
        let fields = self.fields;
        match usize::try_from(number)
            .ok()
            .and_then(|n| self.by_number.get(n))
        {
            Some(&index) => fields.get(usize::from(index)),
            None if number < 256 => None,
            None => fields.iter().find(|field| field.number == number),
        }
    }
}

include!(concat!(env!("OUT_DIR"), "/decode_schema.rs"));

enum Stop {
    OverLimit,
    Malformed(&'static str),
}

struct Scan {
    total: u64,
    limit: u64,
    source: Source,
}

#[inline(always)]
fn varint(buf: &mut &[u8]) -> Result<u64, Stop> {
    // Most keys, lengths and values of small messages fit one byte.
    if let Some((&byte, rest)) = buf.split_first()
        && byte < 0x80
    {
        *buf = rest;
        return Ok(u64::from(byte));
    }
    varint_slow(buf)
}

#[inline(never)]
fn varint_slow(buf: &mut &[u8]) -> Result<u64, Stop> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            if i == 9 && byte > 1 {
                break;
            }
            *buf = &buf[i + 1..];
            return Ok(value);
        }
    }
    Err(Stop::Malformed("invalid varint"))
}

/// Reads a field key: its wire type and field number.
#[inline(always)]
fn key(buf: &mut &[u8]) -> Result<(u64, u64), Stop> {
    let key = varint(buf)?;
    if key > u64::from(u32::MAX) {
        return Err(Stop::Malformed("invalid key value"));
    }
    if key >> 3 == 0 {
        return Err(Stop::Malformed("invalid field number 0"));
    }
    Ok((key & 7, key >> 3))
}

/// Skips a group up to its end tag, as prost does.
fn skip_group(buf: &mut &[u8], number: u64, depth: u32) -> Result<(), Stop> {
    if depth >= MAX_DEPTH {
        return Err(Stop::Malformed("recursion limit reached"));
    }
    while !buf.is_empty() {
        match key(buf)? {
            (0, _) => drop(varint(buf)?),
            (1, _) => drop(take(buf, 8)?),
            (5, _) => drop(take(buf, 4)?),
            (2, _) => {
                let len = varint(buf)?;
                take(buf, len)?;
            }
            (3, inner) => skip_group(buf, inner, depth + 1)?,
            (4, end) if end == number => return Ok(()),
            (4, _) => return Err(Stop::Malformed("unexpected end group tag")),
            _ => return Err(Stop::Malformed("invalid wire type")),
        }
    }
    Err(Stop::Malformed("buffer underflow"))
}

#[inline(always)]
fn take<'a>(buf: &mut &'a [u8], len: u64) -> Result<&'a [u8], Stop> {
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= buf.len())
        .ok_or(Stop::Malformed("buffer underflow"))?;
    let (head, tail) = buf.split_at(len);
    *buf = tail;
    Ok(head)
}

/// Capacity a vector of `len` pushed elements of `size` bytes may have, at
/// most: growth doubles it, and a first push allocates a minimum.
fn vector_bytes(len: u64, size: usize) -> u64 {
    let min_capacity = match size {
        1 => 8,
        2..=1024 => 4,
        _ => 1,
    };
    len.saturating_mul(2)
        .max(min_capacity)
        .saturating_mul(size as u64)
}

impl Scan {
    fn add(&mut self, bytes: u64) -> Result<(), Stop> {
        self.total = self.total.saturating_add(bytes);
        if self.total > self.limit {
            Err(Stop::OverLimit)
        } else {
            Ok(())
        }
    }

    fn message(&mut self, schema: usize, mut buf: &[u8], depth: u32) -> Result<(), Stop> {
        if depth >= MAX_DEPTH {
            return Err(Stop::Malformed("recursion limit reached"));
        }
        let schema = &SCHEMAS[schema];
        // Per counted field of this instance: elements of a repeated field,
        // occurrences of a singular string.
        let mut counts = [0u64; MAX_SLOTS];
        while !buf.is_empty() {
            let (wire_type, number) = key(&mut buf)?;
            let field = schema.field(number);
            match wire_type {
                0 => {
                    varint(&mut buf)?;
                }
                1 => {
                    take(&mut buf, 8)?;
                }
                5 => {
                    take(&mut buf, 4)?;
                }
                2 => {
                    let len = varint(&mut buf)?;
                    let payload = take(&mut buf, len)?;
                    if let Some(field) = field {
                        self.length_delimited(field, payload, &mut counts, depth)?;
                    }
                    continue;
                }
                // A group (proto2) allocates nothing: prost skips it, or
                // refuses it for a known field.
                3 => {
                    skip_group(&mut buf, number, depth + 1)?;
                    continue;
                }
                4 => return Err(Stop::Malformed("unexpected end group tag")),
                _ => return Err(Stop::Malformed("invalid wire type")),
            }
            // A scalar, unpacked. (A wire type the field does not have fails
            // prost's decoding, and allocates nothing.)
            if let Some(field) = field
                && field.repeated
            {
                let matches = matches!(
                    (field.kind, wire_type),
                    (FieldKind::Varint, 0) | (FieldKind::Fixed64, 1) | (FieldKind::Fixed32, 5)
                );
                counts[field.slot] += u64::from(matches);
            }
        }
        for &index in schema.tallied {
            let field = &schema.fields[index];
            let count = counts[field.slot];
            if count > 0 {
                self.add(vector_bytes(count, field.element_size))?;
            }
        }
        Ok(())
    }

    /// Charges a length-delimited field's contents, and counts it in
    /// `counts` if the field has a counter.
    #[inline(always)]
    fn length_delimited(
        &mut self,
        field: &FieldSchema,
        payload: &[u8],
        counts: &mut [u64; MAX_SLOTS],
        depth: u32,
    ) -> Result<(), Stop> {
        let elements = match field.kind {
            FieldKind::String => {
                // A string is copied into a vector of at least 8 bytes; a
                // singular one seen again grows its buffer, maybe doubling it.
                let len = payload.len() as u64;
                let again = counts[field.slot] > 0;
                let factor = if again && !field.repeated { 2 } else { 1 };
                if len > 0 {
                    self.add((factor * len).max(8))?;
                }
                1
            }
            FieldKind::Bytes => {
                if self.source == Source::Copied {
                    self.add(payload.len() as u64)?;
                }
                1
            }
            // A singular sub-message lives inline in its parent.
            FieldKind::Message(schema) => {
                self.message(schema, payload, depth + 1)?;
                1
            }
            // Packed scalars.
            FieldKind::Varint => payload.iter().filter(|&&byte| byte < 0x80).count() as u64,
            FieldKind::Fixed32 => payload.len() as u64 / 4,
            FieldKind::Fixed64 => payload.len() as u64 / 8,
        };
        if field.repeated {
            counts[field.slot] += elements;
        } else if matches!(field.kind, FieldKind::String) {
            counts[field.slot] += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
