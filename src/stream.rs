//! Frame pipes over byte streams (TCP, TLS, a QUIC stream, an in-memory
//! duplex): the length-prefixed codec on an `AsyncRead` / `AsyncWrite`.

use std::{io, sync::Arc};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::codec::Decoder;

use crate::{
    codec::{self, FrameCodec},
    error::{CodecError, DisconnectReason},
    pipe::{FrameBatch, FrameReader, FrameWriter},
};

/// Bytes a connection may buffer for a frame before it must draw on the
/// shared [`ReadBudget`]: small frames never wait for it.
pub const UNBUDGETED_FRAME_BYTES: usize = 64 * 1024;

/// What a read asks for at first and at least, unless set
/// ([`FrameReader::set_read_buffer_size`]); the buffer grows only with
/// bytes that actually arrive.
const INITIAL_READ_BUFFER: usize = 8 * 1024;

/// A memory budget for partly received large frames, shared by every
/// connection of a server or client. A connection whose frame needs more
/// than [`UNBUDGETED_FRAME_BYTES`] takes budget as the bytes arrive and stops
/// reading while none is left, so many peers each sending a large frame at
/// once cannot exhaust memory together. One connection at a time may finish
/// its frame beyond the budget (see `overdraft`), so buffered bytes stay
/// within the budget plus one frame.
#[derive(Debug)]
pub struct ReadBudget {
    bytes: Arc<Semaphore>,
    /// A single permit to finish a frame without budget. Connections that
    /// each hold part of the budget for an unfinished frame would otherwise
    /// wait for one another forever (8 frames of 3 MiB against 4 MiB).
    overdraft: Arc<Semaphore>,
    total: usize,
}

impl ReadBudget {
    /// A budget of `total` bytes (at least one maximal frame should fit).
    pub fn new(total: usize) -> Arc<Self> {
        let total = total.clamp(UNBUDGETED_FRAME_BYTES, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            bytes: Arc::new(Semaphore::new(total)),
            overdraft: Arc::new(Semaphore::new(1)),
            total,
        })
    }

    /// Bytes not currently taken.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The shared bytes.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn bytes(&self) -> Arc<Semaphore> {
        self.bytes.clone()
    }

    /// The permit to finish one frame without budget.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn overdraft(&self) -> Arc<Semaphore> {
        self.overdraft.clone()
    }
}

/// Frame reader over a byte stream.
///
/// `read_frame` is cancel-safe: partial frames stay buffered in `self`.
#[derive(Debug)]
pub struct StreamFrameReader<R> {
    inner: R,
    buffer: BytesMut,
    codec: FrameCodec,
    budget: Option<Arc<ReadBudget>>,
    /// Budget held for the frame being received.
    held: Option<OwnedSemaphorePermit>,
    /// The budget's overdraft, while this frame finishes beyond the budget.
    overdraft: Option<OwnedSemaphorePermit>,
    eof: bool,
    /// How much one read asks for: doubles while reads fill it (a busy
    /// stream reads many frames per system call), halves when they don't.
    read_size: usize,
    /// The least `read_size` shrinks to.
    min_read: usize,
    /// The most `read_size` grows to.
    max_read: usize,
}

impl<R: AsyncRead + Send + Unpin + 'static> StreamFrameReader<R> {
    /// Reads frames of at most `max_frame_size` bytes from `inner`.
    pub fn new(inner: R, max_frame_size: usize) -> Self {
        Self {
            inner,
            buffer: BytesMut::new(),
            codec: FrameCodec::new(max_frame_size),
            budget: None,
            held: None,
            overdraft: None,
            eof: false,
            read_size: INITIAL_READ_BUFFER,
            min_read: INITIAL_READ_BUFFER,
            max_read: UNBUDGETED_FRAME_BYTES,
        }
    }

    fn held_bytes(&self) -> usize {
        self.held.as_ref().map_or(0, |permit| permit.num_permits())
    }

    /// Takes budget so that `needed` buffered bytes are covered; waits while
    /// the shared budget is exhausted (this connection stops reading).
    async fn cover(&mut self, needed: usize) -> Result<(), CodecError> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        if self.overdraft.is_some() {
            return Ok(());
        }
        // A frame larger than the whole budget takes all of it and no more,
        // or it would wait forever for bytes it already holds.
        let needed = needed.min(budget.total);
        let short = needed.saturating_sub(self.held_bytes());
        if short == 0 {
            return Ok(());
        }
        // Take it in slices, so a stalled sender holds little more than it sent.
        let slice = short.min(UNBUDGETED_FRAME_BYTES).min(budget.total) as u32;
        let closed = |_| CodecError::Io(io::Error::other("read budget closed"));
        let (bytes, overdraft) = (budget.bytes.clone(), budget.overdraft.clone());
        // Budget if there is some, else whichever comes first: budget freed,
        // or the overdraft, whose holder finishes its frame and so frees
        // what it holds. Only a frame that holds budget can be in a cycle of
        // frames waiting for each other; a new one just waits.
        let under_way = self.held.is_some();
        tokio::select! {
            biased;
            permit = bytes.acquire_many_owned(slice) => {
                let permit = permit.map_err(closed)?;
                match &mut self.held {
                    Some(held) => held.merge(permit),
                    None => self.held = Some(permit),
                }
            }
            permit = overdraft.acquire_owned(), if under_way => {
                self.overdraft = Some(permit.map_err(closed)?);
            }
        }
        Ok(())
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> FrameReader for StreamFrameReader<R> {
    async fn read_frame(&mut self) -> Option<Result<Bytes, CodecError>> {
        loop {
            match self.codec.decode(&mut self.buffer) {
                Ok(Some(frame)) => {
                    self.held = None;
                    self.overdraft = None;
                    if self.buffer.is_empty() && self.buffer.capacity() > 4 * self.read_size {
                        // A large frame grew the buffer; do not keep it idle.
                        self.buffer = BytesMut::new();
                    }
                    return Some(Ok(frame));
                }
                Ok(None) => {}
                Err(err) => return Some(Err(err)),
            }
            if self.eof {
                return if self.buffer.is_empty() && self.codec.pending_body().is_none() {
                    None
                } else {
                    Some(Err(CodecError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a frame",
                    ))))
                };
            }
            // Read at most what the frame still needs, in bounded steps.
            let want = match self.codec.pending_body() {
                Some(body) => body
                    .saturating_sub(self.buffer.len())
                    .clamp(1, UNBUDGETED_FRAME_BYTES),
                None => self.read_size,
            };
            let budgeted = self
                .codec
                .pending_body()
                .is_some_and(|body| body > UNBUDGETED_FRAME_BYTES);
            if budgeted && let Err(err) = self.cover(self.buffer.len() + want).await {
                return Some(Err(err));
            }
            self.buffer.reserve(want.max(self.min_read / 2));
            // `read_buf` fills all spare capacity, which a large frame grows
            // far beyond `want`: uncapped, it reads bytes the budget does not
            // cover (8 peers could buffer 19 MiB against a 4 MiB budget).
            let limit = if budgeted { want } else { self.max_read };
            let asked = (self.buffer.capacity() - self.buffer.len()).min(limit);
            match (&mut self.inner)
                .take(limit as u64)
                .read_buf(&mut self.buffer)
                .await
            {
                Ok(0) => self.eof = true,
                Ok(read) => {
                    if read >= asked && !budgeted {
                        self.read_size = (self.read_size * 2).min(self.max_read);
                    } else if read < self.read_size / 4 {
                        self.read_size = (self.read_size / 2).max(self.min_read);
                    }
                }
                Err(err) => return Some(Err(CodecError::Io(err))),
            }
        }
    }

    async fn read_batch(&mut self) -> Option<Result<FrameBatch, CodecError>> {
        let first = match self.read_frame().await? {
            Ok(first) => first,
            Err(err) => return Some(Err(err)),
        };
        // Every whole frame behind it, in one piece. A prefix the codec
        // refuses (over the limit, or empty) ends the batch; the next read
        // reports it.
        let (mut end, mut frames) = (0, 0);
        while let Some(prefix) = self.buffer[end..].first_chunk::<{ codec::LENGTH_PREFIX_LEN }>() {
            let len = u32::from_be_bytes(*prefix) as usize;
            let next = end + codec::LENGTH_PREFIX_LEN + len;
            if codec::check_frame_len(len, self.codec.max_frame_size()).is_err()
                || next > self.buffer.len()
            {
                break;
            }
            (end, frames) = (next, frames + 1);
        }
        if frames == 0 {
            return Some(Ok(FrameBatch::one(first)));
        }
        let rest = self.buffer.split_to(end).freeze();
        Some(Ok(FrameBatch::with_rest(first, rest, frames)))
    }

    fn set_max_frame_size(&mut self, max: usize) {
        self.codec.set_max_frame_size(max);
    }

    fn set_read_buffer_size(&mut self, size: usize) {
        self.min_read = size.max(1);
        self.max_read = UNBUDGETED_FRAME_BYTES.max(self.min_read);
        self.read_size = self.min_read;
    }

    fn set_read_budget(&mut self, budget: Arc<ReadBudget>) {
        self.budget = Some(budget);
    }

    fn has_buffered_frame(&self) -> bool {
        let needed = match self.codec.pending_body() {
            Some(body) => body,
            None => match self.buffer.first_chunk::<{ codec::LENGTH_PREFIX_LEN }>() {
                Some(prefix) => {
                    codec::LENGTH_PREFIX_LEN.saturating_add(u32::from_be_bytes(*prefix) as usize)
                }
                None => return false,
            },
        };
        self.buffer.len() >= needed
    }
}

/// Frame writer over a byte stream.
#[derive(Debug)]
pub struct StreamFrameWriter<W>(pub W);

impl<W: AsyncWrite + Send + Unpin + 'static> FrameWriter for StreamFrameWriter<W> {
    async fn write_segments(&mut self, segments: &[Bytes]) -> io::Result<()> {
        write_all_segments(&mut self.0, segments).await?;
        self.0.flush().await
    }

    async fn shutdown(&mut self, _reason: Option<(DisconnectReason, &str)>) -> io::Result<()> {
        self.0.shutdown().await
    }

    fn prefers_long_segments(&self) -> bool {
        true
    }
}

/// Slices handed to one vectored write (Linux takes up to 1024; a few dozen
/// already amortise the system call).
const MAX_WRITE_SLICES: usize = 64;

/// Writes every byte of `segments`, in order, with vectored writes where the
/// stream supports them.
async fn write_all_segments<W: AsyncWrite + Unpin>(
    writer: &mut W,
    segments: &[Bytes],
) -> io::Result<()> {
    if !writer.is_write_vectored() || segments.len() == 1 {
        for segment in segments {
            writer.write_all(segment).await?;
        }
        return Ok(());
    }
    // Position: the segment, and how much of it is already written.
    let (mut index, mut offset) = (0, 0);
    while index < segments.len() {
        let mut slices = [io::IoSlice::new(&[]); MAX_WRITE_SLICES];
        let mut count = 0;
        for (n, segment) in segments[index..].iter().take(MAX_WRITE_SLICES).enumerate() {
            let start = if n == 0 { offset } else { 0 };
            slices[count] = io::IoSlice::new(&segment[start..]);
            count += 1;
        }
        let mut written = writer.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 && index < segments.len() {
            let left = segments[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
        // Skip empty segments so the loop never spins on nothing.
        while index < segments.len() && segments[index].len() == offset {
            index += 1;
            offset = 0;
        }
    }
    Ok(())
}

/// Splits an in-memory or socket byte stream into a frame reader and writer.
pub fn stream_pipe<S>(
    stream: S,
    max_frame_size: usize,
) -> (
    StreamFrameReader<tokio::io::ReadHalf<S>>,
    StreamFrameWriter<tokio::io::WriteHalf<S>>,
)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    (
        StreamFrameReader::new(read, max_frame_size),
        StreamFrameWriter(write),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame_body;

    /// Fills every read completely with 1-byte frames (`0,0,0,1,x`
    /// repeated) and records how much each read asked for.
    struct Firehose {
        asked: Vec<usize>,
        offset: usize,
    }

    impl AsyncRead for Firehose {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let want = buf.remaining();
            self.asked.push(want);
            for _ in 0..want {
                let byte = [0, 0, 0, 1, 7][self.offset % 5];
                buf.put_slice(&[byte]);
                self.offset += 1;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    async fn asks(buffer_size: Option<usize>) -> Vec<usize> {
        let mut reader = StreamFrameReader::new(
            Firehose {
                asked: Vec::new(),
                offset: 0,
            },
            1024,
        );
        if let Some(size) = buffer_size {
            reader.set_read_buffer_size(size);
        }
        for _ in 0..8 {
            reader.read_batch().await.unwrap().unwrap();
        }
        reader.inner.asked
    }

    #[tokio::test]
    async fn buffer_size_sets_the_first_read_and_reads_grow_while_they_fill() {
        // (buffer_size, first read, largest read)
        for (size, first, cap) in [
            (None, 8192, 65536),
            (Some(2048), 2048, 65536),
            (Some(256 * 1024), 256 * 1024, 256 * 1024),
        ] {
            let asked = asks(size).await;
            assert_eq!(asked[0], first, "{size:?}: {asked:?}");
            assert_eq!(asked.iter().max(), Some(&cap), "{size:?}: {asked:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_frame_ends_the_batch_and_the_next_read_reports_it() {
        // Frames behind the first in one read: an empty or oversize one is
        // refused as it would be first, after the frames before it.
        for (bad, refused) in [
            (&b"\0\0\0\0"[..], CodecError::EmptyFrame),
            (
                &b"\0\0\0\x09123456789"[..],
                CodecError::FrameTooLarge { size: 9, max: 8 },
            ),
        ] {
            let mut wire = b"\0\0\0\x02ab\0\0\0\x02cd".to_vec();
            wire.extend_from_slice(bad);
            wire.extend_from_slice(b"\0\0\0\x02ef");
            let mut reader = StreamFrameReader::new(io::Cursor::new(wire), 8);
            let batch: Vec<Bytes> = reader.read_batch().await.unwrap().unwrap().collect();
            assert_eq!(batch, [&b"ab"[..], b"cd"]);
            let err = reader.read_batch().await.unwrap().unwrap_err();
            assert_eq!(err.to_string(), refused.to_string());
        }
    }

    #[tokio::test]
    async fn reads_frames_split_across_writes() {
        let (client, server) = tokio::io::duplex(64);
        let (mut reader, _) = stream_pipe(server, 1 << 20);
        let (_, mut raw) = tokio::io::split(client);
        let frame = frame_body(&[7u8; 300], 1 << 20).unwrap();
        let writer = tokio::spawn(async move {
            for chunk in frame.chunks(7) {
                raw.write_all(chunk).await.unwrap();
            }
            raw
        });
        let body = reader.read_frame().await.unwrap().unwrap();
        assert_eq!(&body[..], &[7u8; 300][..]);
        drop(writer.await.unwrap());
        assert!(reader.read_frame().await.is_none(), "clean end of stream");
    }

    #[tokio::test]
    async fn a_large_frame_waits_for_budget_and_returns_it() {
        let budget = ReadBudget::new(UNBUDGETED_FRAME_BYTES);
        let (client, server) = tokio::io::duplex(1 << 20);
        let (mut reader, _) = stream_pipe(server, 1 << 20);
        reader.set_read_budget(budget.clone());
        let (_, mut raw) = tokio::io::split(client);
        raw.write_all(&frame_body(&vec![1u8; 200_000], 1 << 20).unwrap())
            .await
            .unwrap();
        // The whole budget is taken by someone else: the reader must wait.
        let hog = budget
            .bytes
            .clone()
            .acquire_many_owned(budget.total() as u32)
            .await
            .unwrap();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), reader.read_frame()).await;
        assert!(pending.is_err(), "read must pause while no budget is left");
        drop(hog);
        let body = tokio::time::timeout(std::time::Duration::from_secs(10), reader.read_frame())
            .await
            .expect("a frame larger than the budget still completes")
            .unwrap()
            .unwrap();
        assert_eq!(body.len(), 200_000);
        assert_eq!(
            budget.available(),
            budget.total(),
            "budget returned after the frame"
        );
    }

    #[tokio::test]
    async fn frames_sharing_a_budget_too_small_for_all_still_complete() {
        // Two frames of 1.5 slices against a budget of 2: once each holds one
        // slice, neither can go on without the overdraft.
        let budget = ReadBudget::new(2 * UNBUDGETED_FRAME_BYTES);
        let body = vec![3u8; 3 * UNBUDGETED_FRAME_BYTES / 2];
        let frame = frame_body(&body, 1 << 20).unwrap();
        let (head, tail) = frame.split_at(UNBUDGETED_FRAME_BYTES / 2);
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..2 {
            let (client, server) = tokio::io::duplex(1 << 20);
            let (mut reader, _) = stream_pipe(server, 1 << 20);
            reader.set_read_budget(budget.clone());
            let (_, mut raw) = tokio::io::split(client);
            raw.write_all(head).await.unwrap();
            readers.push(tokio::spawn(async move { reader.read_frame().await }));
            writers.push(raw);
        }
        let wait = std::time::Duration::from_secs(10);
        tokio::time::timeout(wait, async {
            while budget.available() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both frames take a slice");
        for raw in &mut writers {
            raw.write_all(tail).await.unwrap();
        }
        for reader in readers {
            let frame = tokio::time::timeout(wait, reader)
                .await
                .expect("no deadlock between frames sharing the budget")
                .unwrap();
            assert_eq!(frame.unwrap().unwrap().len(), body.len());
        }
        assert_eq!(budget.available(), budget.total());
    }

    #[tokio::test]
    async fn truncated_frame_at_end_of_stream_is_an_error() {
        let (client, server) = tokio::io::duplex(64);
        let (mut reader, _) = stream_pipe(server, 1 << 20);
        let (_, mut raw) = tokio::io::split(client);
        raw.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(raw);
        assert!(matches!(
            reader.read_frame().await,
            Some(Err(CodecError::Io(_)))
        ));
    }
}
