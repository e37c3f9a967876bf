//! Frame pipes: the contract between the session layer and the back-ends.
//!
//! A back-end moves frames; it knows nothing of handshakes, signatures or
//! sessions. It hands the session a [`FrameReader`] and a [`FrameWriter`]
//! (together a [`Pipe`]). Writers take *segments*: shared buffers each
//! holding whole frames in their wire form (4-byte length prefix + body), as
//! the session encodes them once for every transport. A byte stream writes
//! the segments as they are, in one vectored write; a transport that frames
//! messages itself (gRPC) takes the bodies out with [`frame_bodies`], which
//! slices the shared buffers without copying.

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use bytes::{Buf, Bytes, BytesMut};

use crate::{
    codec::LENGTH_PREFIX_LEN,
    error::{CodecError, DisconnectReason},
    stream::ReadBudget,
};

/// Bytes of queued frames gathered into one write before it is issued.
pub const WRITE_COALESCE_BYTES: usize = 64 * 1024;

/// Reads frame bodies from a pipe.
pub trait FrameReader: Send + 'static {
    /// The next frame body; `None` at a clean end of stream.
    fn read_frame(&mut self) -> impl Future<Output = Option<Result<Bytes, CodecError>>> + Send;
    /// At least one frame: the next, and every complete frame already
    /// received behind it, so that a byte stream hands over all the frames
    /// one read brought in. The default returns one frame.
    fn read_batch(
        &mut self,
    ) -> impl Future<Output = Option<Result<FrameBatch, CodecError>>> + Send {
        async { Some(self.read_frame().await?.map(FrameBatch::one)) }
    }
    /// Changes the largest body accepted from now on.
    fn set_max_frame_size(&mut self, max: usize);
    /// Sets what a read asks for at first and at least (reads grow while
    /// they fill the buffer). Readers that receive whole frames from their
    /// transport ignore it.
    fn set_read_buffer_size(&mut self, _size: usize) {}
    /// Shares a budget for buffering large frames (see [`ReadBudget`]).
    /// Readers that receive whole frames from their transport ignore it.
    fn set_read_budget(&mut self, _budget: Arc<ReadBudget>) {}
    /// Whether a complete frame is already buffered, so the next
    /// `read_frame` returns without waiting. Delivery acknowledgements are
    /// sent when this turns false; the default (false) acknowledges after
    /// every frame.
    fn has_buffered_frame(&self) -> bool {
        false
    }
}

/// Writes frames to a pipe.
pub trait FrameWriter: Send + 'static {
    /// Writes `segments` in order: each holds one or more complete frames,
    /// length prefixes included.
    fn write_segments(&mut self, segments: &[Bytes])
    -> impl Future<Output = io::Result<()>> + Send;
    /// Ends the sending side; `reason` says why, for transports that can
    /// carry it out of band (gRPC trailers).
    fn shutdown(
        &mut self,
        reason: Option<(DisconnectReason, &str)>,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// A handle that writes without waiting, from any task, when the
    /// transport can (plain TCP): a reply on an otherwise idle connection
    /// then leaves from the task that makes it, without waking the writer.
    /// `None`, the default, when it cannot.
    fn direct(&self) -> Option<Arc<dyn DirectWrite>> {
        None
    }

    /// Whether one long segment costs less than many short ones: a byte
    /// stream, where every slice adds to a vectored write (and a system call
    /// takes only so many). The session then copies small shared frames
    /// (broadcasts) into one buffer per write. `false`, the default, for
    /// transports that send each frame as a message of its own.
    fn prefers_long_segments(&self) -> bool {
        false
    }
}

/// Writes without waiting (see [`FrameWriter::direct`]). The session uses it
/// only while its writer is idle and nothing is queued, so the bytes keep
/// their order; what it cannot take goes through the writer.
pub trait DirectWrite: Send + Sync + 'static {
    /// Writes what the transport takes at once, and says how much;
    /// `ErrorKind::WouldBlock` when it takes nothing now.
    fn try_write(&self, data: &[u8]) -> io::Result<usize>;
}

/// Both halves of a new connection.
#[derive(Debug)]
pub struct Pipe<R, W> {
    /// Reading half.
    pub reader: R,
    /// Writing half.
    pub writer: W,
    /// The peer's address, when the back-end knows it.
    pub remote_addr: Option<SocketAddr>,
    /// Application metadata the peer sent when it opened the pipe (a gRPC
    /// client's request metadata), within the back-end's bounds; empty
    /// where the transport carries none.
    pub metadata: Vec<(String, String)>,
}

/// Frames received together: a first body, then complete frames in wire
/// form (length prefix + body) sharing one buffer; or bodies that arrived
/// as messages of their own. Iterating yields the bodies, each a slice of a
/// received buffer.
#[derive(Debug, Clone, Default)]
pub struct FrameBatch {
    first: Option<Bytes>,
    /// Whole frames, prefixes included, already checked against the limit.
    rest: Bytes,
    /// Bodies received one by one (after `first` and `rest`, which are
    /// empty when these are used).
    bodies: std::vec::IntoIter<Bytes>,
    frames: usize,
    wire_len: usize,
}

impl FrameBatch {
    /// A batch of one frame body.
    pub fn one(body: Bytes) -> Self {
        Self {
            wire_len: LENGTH_PREFIX_LEN + body.len(),
            first: Some(body),
            frames: 1,
            ..Self::default()
        }
    }

    /// Frame bodies that arrived as messages of their own (a transport that
    /// carries frames in its own messages), already checked against the
    /// limit. `wire_len` counts each as if length-prefixed.
    pub fn from_bodies(bodies: Vec<Bytes>) -> Self {
        let wire_len = bodies
            .iter()
            .map(|body| LENGTH_PREFIX_LEN + body.len())
            .sum();
        Self {
            frames: bodies.len(),
            wire_len,
            bodies: bodies.into_iter(),
            ..Self::default()
        }
    }

    /// `first`, then the `frames` whole frames of `rest`, which the caller
    /// has split at frame boundaries.
    pub(crate) fn with_rest(first: Bytes, rest: Bytes, frames: usize) -> Self {
        Self {
            wire_len: LENGTH_PREFIX_LEN + first.len() + rest.len(),
            first: Some(first),
            rest,
            frames: frames + 1,
            ..Self::default()
        }
    }

    /// Frames not yet taken.
    pub fn len(&self) -> usize {
        self.frames
    }

    /// Whether every frame has been taken.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Bytes the frames took on the wire, length prefixes included.
    pub fn wire_len(&self) -> usize {
        self.wire_len
    }
}

impl Iterator for FrameBatch {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            self.frames -= 1;
            return Some(first);
        }
        let Some(prefix) = self.rest.first_chunk::<LENGTH_PREFIX_LEN>() else {
            let body = self.bodies.next()?;
            self.frames = self.frames.saturating_sub(1);
            return Some(body);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        self.rest.advance(LENGTH_PREFIX_LEN);
        self.frames = self.frames.saturating_sub(1);
        // `with_rest` holds whole frames only; `min` keeps a broken caller
        // from panicking here.
        Some(self.rest.split_to(len.min(self.rest.len())))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.frames, Some(self.frames))
    }
}

/// The frame bodies of `segments`, in order. A body that lies within one
/// segment is a slice of its buffer (no copy); one that spans segments (a
/// signed frame whose signature field follows it separately) is gathered
/// into one buffer. A truncated frame is an error: segments come from the
/// session's own encoder, so it means a bug, never peer input.
pub fn frame_bodies(segments: &[Bytes]) -> io::Result<Vec<Bytes>> {
    let truncated = || io::Error::new(io::ErrorKind::InvalidInput, "truncated frame");
    let mut bodies = Vec::new();
    let mut segments = segments.iter().filter(|s| !s.is_empty()).cloned();
    let mut rest = Bytes::new();
    loop {
        if rest.is_empty() {
            match segments.next() {
                Some(next) => rest = next,
                None => return Ok(bodies),
            }
        }
        // The prefix, then the body, each possibly continued in later segments.
        let mut prefix = [0; LENGTH_PREFIX_LEN];
        let mut filled = 0;
        while filled < LENGTH_PREFIX_LEN {
            if rest.is_empty() {
                rest = segments.next().ok_or_else(truncated)?;
            }
            let take = (LENGTH_PREFIX_LEN - filled).min(rest.len());
            prefix[filled..filled + take].copy_from_slice(&rest[..take]);
            rest.advance(take);
            filled += take;
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if rest.len() >= len {
            bodies.push(rest.split_to(len));
            continue;
        }
        let mut body = BytesMut::with_capacity(len);
        while body.len() < len {
            if rest.is_empty() {
                rest = segments.next().ok_or_else(truncated)?;
            }
            let take = (len - body.len()).min(rest.len());
            body.extend_from_slice(&rest.split_to(take));
        }
        bodies.push(body.freeze());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_sliced_across_segments_and_truncation_is_refused() {
        let one = Bytes::from_static(b"\0\0\0\x02ab\0\0\0\0");
        let two = Bytes::from_static(b"\0\0\0\x03xyz");
        let bodies = frame_bodies(&[one.clone(), two]).unwrap();
        assert_eq!(bodies, [&b"ab"[..], b"", b"xyz"]);
        // Slices share the segment's buffer.
        assert_eq!(bodies[0].as_ptr(), one[4..].as_ptr());
        // A body continued in the next segment is gathered.
        let spanning = frame_bodies(&[
            Bytes::from_static(b"\0\0"),
            Bytes::from_static(b"\0\x04ab"),
            Bytes::from_static(b"cd\0\0\0\x01z"),
        ])
        .unwrap();
        assert_eq!(spanning, [&b"abcd"[..], b"z"]);
        let cut = Bytes::from_static(b"\0\0\0\x05abc");
        assert_eq!(
            frame_bodies(&[cut]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(frame_bodies(&[Bytes::from_static(b"\0\0")]).is_err());
    }

    #[test]
    fn a_batch_yields_its_first_body_then_the_whole_frames_behind_it() {
        let rest = Bytes::from_static(b"\0\0\0\x02ab\0\0\0\0\0\0\0\x01z");
        let batch = FrameBatch::with_rest(Bytes::from_static(b"first"), rest, 3);
        assert_eq!((batch.len(), batch.wire_len()), (4, 9 + 15));
        let bodies: Vec<Bytes> = batch.collect();
        assert_eq!(bodies, [&b"first"[..], b"ab", b"", b"z"]);
        let bodies = FrameBatch::from_bodies(vec![Bytes::from_static(b"cd"), Bytes::new()]);
        assert_eq!((bodies.len(), bodies.wire_len()), (2, 6 + 4));
        assert_eq!(bodies.collect::<Vec<_>>(), [&b"cd"[..], b""]);
        let mut one = FrameBatch::one(Bytes::from_static(b"x"));
        assert_eq!((one.len(), one.wire_len()), (1, 5));
        assert_eq!(one.next().as_deref(), Some(&b"x"[..]));
        assert!(one.is_empty() && one.next().is_none());
    }
}
