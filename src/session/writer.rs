//! The writing half of a session: a thin driver over the [outbox](super::outbox).
//!
//! It takes everything senders queued, seals signed batches where they lie,
//! adds the frames only it writes (acknowledgements), and writes the lot with
//! one vectored write, outside the outbox's lock. Counters and metrics are
//! updated once per write.

use std::{
    io,
    ops::Range,
    pin::Pin,
    sync::{PoisonError, atomic::Ordering},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::time::{Instant, error::Elapsed};
use tokio_util::sync::{ReusableBoxFuture, WaitForCancellationFuture};
use tracing::warn;

use super::{
    Acks, Connection, FrameSigner, FrameWriter, SessionConfig, SessionContext,
    outbox::{Entry, Spare, Taken, UNICAST_HEADER_ROOM},
};
use crate::{
    codec::LENGTH_PREFIX_LEN,
    error::{DisconnectReason, SignedFrameError},
    metrics::{Direction, MessageTally},
    proto::{
        MessageKind,
        transport::v1::{Ack, MessageExt},
    },
    signed::{self, Audience},
};

/// Room a signed frame needs beyond its messages: sequence, audience,
/// signature and field tags, with margin.
pub(crate) const SIGNED_FRAME_OVERHEAD: usize = 512;

/// Most messages sealed into one signed frame. A receiver charges each
/// message's result to the frame's decode allowance (docs/PROTOCOL.md §6),
/// so a batch of many tiny messages must not outgrow it.
pub const SIGNED_BATCH_MAX_MESSAGES: usize = 1024;

/// Where a piece of the next write lies.
enum Piece {
    /// In the chunk taken from the outbox.
    Chunk(Range<usize>),
    /// In the writer's own buffer (its frames, signature fields).
    Own(Range<usize>),
    /// A frame shared with other connections.
    Shared(Bytes),
    /// Small shared frames, copied one after another into one buffer.
    Copied(Range<usize>),
}

/// Adds `piece`, extending the last one where they are adjacent in one
/// buffer, so unsigned messages around a confirmation go out as one slice.
fn push_piece(pieces: &mut Vec<Piece>, piece: Piece) {
    match (pieces.last_mut(), &piece) {
        (Some(Piece::Chunk(last)), Piece::Chunk(next))
        | (Some(Piece::Copied(last)), Piece::Copied(next))
            if last.end == next.start =>
        {
            last.end = next.end;
        }
        _ => pieces.push(piece),
    }
}

/// Shared frames up to this size are copied into one buffer per write,
/// where the transport prefers long segments, rather than written as slices
/// of their own: a vectored write's cost grows with its slices, and a run of
/// small broadcasts would be one slice each.
const COPY_SHARED_MAX: usize = 1024;

/// Most bytes copied so per write: what a blocked write holds beyond the
/// shared frames themselves.
const COPY_SHARED_TOTAL: usize = 64 * 1024;

/// A buffer for the small shared frames of `entries`, sized to them, when
/// there are at least two (a lone one is no cheaper copied).
fn gathering(entries: &[Entry]) -> BytesMut {
    let (count, bytes) = entries
        .iter()
        .filter_map(|entry| match entry {
            Entry::Shared { frame, .. } if frame.len() <= COPY_SHARED_MAX => Some(frame.len()),
            _ => None,
        })
        .fold((0, 0), |(count, bytes), len| (count + 1, bytes + len));
    if count < 2 {
        return BytesMut::new();
    }
    BytesMut::with_capacity(bytes.min(COPY_SHARED_TOTAL))
}

/// Seals the unicast batch `batch` (room, then `count` entries) in place.
fn seal(
    signer: &FrameSigner,
    batch: &mut [u8],
    count: usize,
) -> Result<(usize, [u8; signed::SIGNATURE_FIELD_LEN]), SignedFrameError> {
    signed::seal_in_place(
        &signer.key,
        signer.backend,
        signer.unicast.next(),
        &Audience::Unicast {
            recipient: signer.recipient.clone(),
            session: signer.session_tag,
        },
        batch,
        UNICAST_HEADER_ROOM,
        count,
    )
}

/// What one write is made of, and what it carries.
struct Write {
    pieces: Vec<Piece>,
    own: BytesMut,
    /// Small shared frames gathered for this write (see `gathering`).
    copied: BytesMut,
    /// Application messages in it.
    messages: u64,
    /// The writer's own traffic and signed frames, for the metrics.
    tally: MessageTally,
    /// The delivered count last acknowledged.
    last_ack: u64,
}

impl Write {
    /// Lays out what was taken from the outbox for one write: seals signed
    /// batches where they lie in `chunk`, adds acknowledgements, and
    /// registers confirmations at their place in the stream (`written`
    /// application messages went before this write). Returns the `Close`
    /// entry, if any. Every entry is accounted for even when one cannot be
    /// sealed; the error is returned then.
    fn compose(
        &mut self,
        gather: bool,
        entries: &mut Vec<Entry>,
        chunk: &mut BytesMut,
        signer: Option<&FrameSigner>,
        acks: Option<&Acks>,
        written: u64,
    ) -> Result<Option<(DisconnectReason, String)>, SignedFrameError> {
        let mut close = None;
        let mut confirming = false;
        let mut failed = None;
        self.messages = 0;
        self.copied = if gather {
            gathering(entries)
        } else {
            BytesMut::new()
        };
        for entry in entries.drain(..) {
            match entry {
                Entry::Frames {
                    start,
                    end,
                    application,
                } => {
                    push_piece(&mut self.pieces, Piece::Chunk(start..end));
                    self.messages += application;
                }
                Entry::Batch {
                    start,
                    end,
                    count,
                    application,
                } => {
                    self.messages += application;
                    let sealed = match signer {
                        Some(signer) => seal(signer, &mut chunk[start..end], count),
                        None => Err(SignedFrameError::Malformed("no signing key".into())),
                    };
                    match sealed {
                        Ok((offset, signature)) => {
                            let at = self.own.len();
                            self.own.put_slice(&signature);
                            self.tally.add(
                                MessageKind::SignedFrame,
                                end - start - offset - LENGTH_PREFIX_LEN + signature.len(),
                            );
                            self.pieces.push(Piece::Chunk(start + offset..end));
                            self.pieces.push(Piece::Own(at..self.own.len()));
                        }
                        Err(err) => failed = Some(err),
                    }
                }
                Entry::Shared { frame, application } => {
                    self.push_shared(frame);
                    self.messages += u64::from(application);
                }
                // Counted from the batch: it may have taken broadcasts after
                // the place was taken from the outbox.
                Entry::Pending { batch, .. } => {
                    let (frame, application) = batch.frame(&mut self.tally);
                    self.messages += application;
                    match frame {
                        Ok(frame) => self.pieces.push(Piece::Shared(frame)),
                        Err(err) => failed = Some(err),
                    }
                }
                Entry::Ack => {
                    if let Some(acks) = acks {
                        let delivered = acks.dispatched.load(Ordering::Relaxed);
                        if delivered != self.last_ack {
                            self.last_ack = delivered;
                            if let Err(err) = self.push_ack(Some(delivered), signer) {
                                failed = Some(err);
                            }
                        }
                    }
                }
                Entry::Confirm(done) => {
                    // A confirmation nobody can give drops `done`: its sender
                    // learns the message was not confirmed.
                    if let Some(acks) = acks {
                        confirming = true;
                        acks.waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push_back((written + self.messages, Instant::now(), done));
                    }
                }
                Entry::Close(reason, details) => close = Some((reason, details)),
            }
        }
        if confirming
            && close.is_none()
            && let Err(err) = self.push_ack(None, signer)
        {
            failed = Some(err);
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(close),
        }
    }

    /// Adds a shared frame: copied after the small ones before it while the
    /// gathering buffer has room (it never grows), else as a slice of its own.
    fn push_shared(&mut self, frame: Bytes) {
        let at = self.copied.len();
        if frame.len() > COPY_SHARED_MAX || self.copied.capacity() - at < frame.len() {
            self.pieces.push(Piece::Shared(frame));
            return;
        }
        self.copied.put_slice(&frame);
        push_piece(&mut self.pieces, Piece::Copied(at..self.copied.len()));
    }

    /// Adds an acknowledgement (`Some(count)`) or a request for one (`None`).
    fn push_ack(
        &mut self,
        delivered: Option<u64>,
        signer: Option<&FrameSigner>,
    ) -> Result<(), SignedFrameError> {
        let ext = MessageExt {
            ack: delivered.map(|delivered| Ack { delivered }),
            ack_request: delivered.is_none(),
            request_id: 0,
            reply_to: 0,
        };
        let size = ext.encoded_len();
        let at = self.own.len();
        match signer {
            None => {
                self.own.put_u32(size as u32);
                let _ = ext.encode(&mut self.own);
            }
            Some(signer) => {
                self.own.put_bytes(0, UNICAST_HEADER_ROOM);
                signed::put_message_field(&mut self.own, size);
                let _ = ext.encode(&mut self.own);
                let (offset, signature) = seal(signer, &mut self.own[at..], 1)?;
                self.own.put_slice(&signature);
                self.tally.add(
                    MessageKind::SignedFrame,
                    self.own.len() - at - offset - LENGTH_PREFIX_LEN,
                );
                self.pieces.push(Piece::Own(at + offset..self.own.len()));
                self.tally.add(MessageKind::Ack, size);
                return Ok(());
            }
        }
        self.pieces.push(Piece::Own(at..self.own.len()));
        self.tally.add(MessageKind::Ack, size);
        Ok(())
    }
}

/// The connection's single writer.
pub(super) async fn write_loop<W: FrameWriter>(
    writer: &mut W,
    connection: &Connection,
    signer: Option<&FrameSigner>,
    context: &SessionContext,
) {
    let lost = write_queued(&mut *writer, connection, signer, context).await;
    let end = connection.end.get();
    let reason = end.map(|end| (end.reason, end.details.as_str()));
    // Boxed: it runs once, and inline it would widen the state every idle
    // connection keeps.
    let shutdown = tokio::time::timeout(context.config.disconnect_timeout, writer.shutdown(reason));
    let _ = Box::pin(shutdown).await;
    // Whatever is still queued will never be written: say so, counting
    // application messages one by one, those of a write cut off included.
    let undelivered = lost + connection.outbox.close();
    if undelivered > 0 {
        context.metrics.errors("undelivered", "write", undelivered);
        warn!(undelivered, "connection closed with messages unsent");
    }
}

/// Bound on one write: the last, with the `Disconnect`, has the shorter
/// disconnect timeout.
fn write_limit(config: &SessionConfig, closing: bool) -> Duration {
    if closing {
        config.disconnect_timeout
    } else {
        config.write_timeout
    }
}

/// What a write borrows, and gives back when it ends.
struct Lent<'w, 'c, W> {
    writer: &'w mut W,
    segments: Vec<Bytes>,
    closed: Pin<&'w mut WaitForCancellationFuture<'c>>,
}

/// How a write went: `None` when the connection was aborted meanwhile.
type WriteResult = Option<Result<io::Result<()>, Elapsed>>;

/// Writes what senders queue until the connection closes or a write fails.
/// Returns the application messages of writes that never fully left.
async fn write_queued<W: FrameWriter>(
    writer: &mut W,
    connection: &Connection,
    signer: Option<&FrameSigner>,
    context: &SessionContext,
) -> u64 {
    let config = &context.config;
    let outbox = &connection.outbox;
    let gather = writer.prefers_long_segments();
    let closed = connection.closed.cancelled();
    tokio::pin!(closed);
    let mut lent = Lent {
        writer,
        segments: Vec::new(),
        closed,
    };
    // The write in progress lives on the heap: a byte stream's write keeps
    // a kilobyte of slices, which an idle writer need not carry. The
    // allocation is reused from write to write, and let go when the queue
    // runs dry after a write of no application message (the handshake
    // response, or the ping of a connection quiet for a ping interval): a
    // connection carrying data allocates nothing per write.
    let mut keep_in_flight = false;
    let mut in_flight: Option<ReusableBoxFuture<'_, (Lent<'_, '_, W>, WriteResult)>> = None;
    let mut spare = Spare::default();
    let mut write = Write {
        pieces: Vec::new(),
        own: BytesMut::new(),
        copied: BytesMut::new(),
        messages: 0,
        tally: context.metrics.tally(Direction::Out),
        last_ack: 0,
    };
    // Application messages put on the wire so far: ack positions.
    let mut written: u64 = 0;
    // Application messages of writes that never fully left.
    let mut lost: u64 = 0;
    loop {
        let Some(Taken {
            mut chunk,
            mut entries,
            tally: mut taken,
            ..
        }) = outbox.take(&mut spare)
        else {
            if !keep_in_flight {
                in_flight = None;
            }
            tokio::select! {
                biased;
                () = outbox.parked() => continue,
                () = lent.closed.as_mut() => break,
            }
        };
        // A broadcast batch still gathering is sealed after one pass of the
        // scheduler: a busy broadcaster adds what it has meanwhile, so its
        // peers verify one signature for many messages; an idle server pays
        // a task switch.
        if let Some(Entry::Pending { batch, .. }) = entries.last()
            && batch.is_open()
        {
            tokio::task::yield_now().await;
        }
        let close = match write.compose(
            gather,
            &mut entries,
            &mut chunk,
            signer,
            connection.acks.as_ref(),
            written,
        ) {
            Ok(close) => close,
            Err(err) => {
                // Messages counted for acknowledgements cannot be sent: the
                // session cannot go on.
                lost += write.messages;
                taken.discard();
                write.tally.discard();
                if chunk.capacity() > 0 {
                    outbox.recycle(chunk);
                }
                context.metrics.error("encode", "write");
                warn!(error = %err, "a signed batch could not be sealed");
                connection.abort(
                    DisconnectReason::InternalError,
                    "a signed batch could not be sealed",
                );
                break;
            }
        };
        spare.entries = entries;
        if let Some(acks) = &connection.acks {
            // Published before the bytes leave: an ack can cover no more.
            acks.written
                .store(written + write.messages, Ordering::Release);
        }

        // Chunks with room came from the write-buffer pool.
        let leased = chunk.capacity() > 0;
        let chunk = chunk.freeze();
        let own = std::mem::take(&mut write.own).freeze();
        let copied = std::mem::take(&mut write.copied).freeze();
        for piece in write.pieces.drain(..) {
            lent.segments.push(match piece {
                Piece::Shared(frame) => frame,
                Piece::Chunk(range) => chunk.slice(range),
                Piece::Own(range) => own.slice(range),
                Piece::Copied(range) => copied.slice(range),
            });
        }
        let bytes: usize = lent.segments.iter().map(Bytes::len).sum();
        let result = if bytes == 0 {
            Some(Ok(Ok(())))
        } else {
            let limit = write_limit(config, close.is_some());
            let write = async move {
                let Lent {
                    writer,
                    segments,
                    closed,
                } = &mut lent;
                // An aborted connection (too slow, replaced, stopped) stops
                // even a write that is blocked on a peer which does not read.
                // Checked first: nothing more goes to a peer once dropped.
                let result = tokio::select! {
                    biased;
                    () = closed.as_mut() => None,
                    result = tokio::time::timeout(limit, writer.write_segments(segments)) => Some(result),
                };
                (lent, result)
            };
            let write = match &mut in_flight {
                Some(slot) => {
                    slot.set(write);
                    slot
                }
                None => in_flight.insert(ReusableBoxFuture::new(write)),
            };
            let (back, result) = write.await;
            lent = back;
            result
        };
        lent.segments.clear();
        // Buffers nobody else holds any more are reused.
        if leased {
            // A buffer still shared (a transport keeps slices of it) is
            // released to the allocator instead, ending its lease all the same.
            outbox.recycle(chunk.try_into_mut().unwrap_or_default());
        }
        if let Ok(mut own) = own.try_into_mut() {
            own.clear();
            crate::pool::make_shareable(&mut own);
            write.own = own;
        }
        if !matches!(result, Some(Ok(Ok(())))) {
            // Not (fully) written: lost, and not counted as sent.
            lost += write.messages;
            write.tally.discard();
            taken.discard();
        }
        let Some(result) = result else { break };
        match result {
            Ok(Ok(())) => {
                written += write.messages;
                let counters = &connection.counters;
                counters
                    .bytes_out
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                counters
                    .messages_out
                    .fetch_add(write.messages, Ordering::Relaxed);
                context.metrics.bytes(Direction::Out, bytes);
                write.tally.flush();
                taken.flush();
            }
            Ok(Err(err)) => {
                context.metrics.error("io", "write");
                connection.abort(
                    DisconnectReason::NetworkError,
                    format!("write failed: {err}"),
                );
                break;
            }
            Err(_) => {
                context.metrics.error("write_timeout", "write");
                connection.abort(
                    DisconnectReason::WriteTimeout,
                    format!(
                        "write blocked for {:?}",
                        write_limit(config, close.is_some())
                    ),
                );
                break;
            }
        }
        keep_in_flight = write.messages > 0;
        if keep_in_flight {
            spare.tally = Some(taken);
        }
        if let Some((reason, details)) = close {
            connection.abort(reason, details);
            break;
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn frame(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    fn shared(frame: &Bytes) -> Entry {
        Entry::Shared {
            frame: frame.clone(),
            application: true,
        }
    }

    /// Lays out `frames` as one write's shared entries; returns its
    /// segments.
    fn compose(gather: bool, frames: &[Bytes]) -> (Vec<Bytes>, u64) {
        let metrics = Metrics::new("writer_test");
        let mut write = Write {
            pieces: Vec::new(),
            own: BytesMut::new(),
            copied: BytesMut::new(),
            messages: 0,
            tally: metrics.tally(Direction::Out),
            last_ack: 0,
        };
        let mut entries: Vec<Entry> = frames.iter().map(shared).collect();
        let close = write
            .compose(gather, &mut entries, &mut BytesMut::new(), None, None, 0)
            .expect("nothing to seal");
        assert!(close.is_none());
        let copied = std::mem::take(&mut write.copied).freeze();
        let segments = write
            .pieces
            .drain(..)
            .map(|piece| match piece {
                Piece::Shared(frame) => frame,
                Piece::Copied(range) => copied.slice(range),
                Piece::Chunk(_) | Piece::Own(_) => unreachable!("only shared frames"),
            })
            .collect();
        (segments, write.messages)
    }

    #[test]
    fn small_shared_frames_are_gathered_in_order_around_large_ones() {
        let (a, big, b, c) = (frame(100, 1), frame(4096, 2), frame(200, 3), frame(300, 4));
        let frames = [a.clone(), big.clone(), b.clone(), c.clone()];
        let (segments, messages) = compose(true, &frames);
        assert_eq!(messages, 4);
        // The large frame stays shared; the small ones around it are copied,
        // the two adjacent ones into one segment.
        assert_eq!(segments.len(), 3);
        assert_eq!(segments[0], a);
        assert_eq!(segments[1].as_ptr(), big.as_ptr(), "not copied");
        assert_eq!(segments[2], [&b[..], &c[..]].concat());
        assert_ne!(segments[0].as_ptr(), a.as_ptr(), "copied");
        // A transport that sends frames one by one gets them as they are.
        let (segments, _) = compose(false, &frames);
        assert_eq!(segments.len(), 4);
        assert!(
            segments
                .iter()
                .zip(&frames)
                .all(|(s, f)| s.as_ptr() == f.as_ptr())
        );
        // A lone small frame is not worth a copy.
        let (segments, _) = compose(true, &[a.clone(), big.clone()]);
        assert_eq!(segments[0].as_ptr(), a.as_ptr());
    }

    #[test]
    fn gathering_stops_at_its_cap_and_keeps_the_order() {
        let frames: Vec<Bytes> = (0..100u8).map(|i| frame(COPY_SHARED_MAX, i)).collect();
        let (segments, messages) = compose(true, &frames);
        assert_eq!(messages, 100);
        let copied: usize = COPY_SHARED_TOTAL / COPY_SHARED_MAX;
        // One segment of the first 64 frames, then the rest as they are.
        assert_eq!(segments.len(), 1 + frames.len() - copied);
        assert_eq!(segments[0].len(), COPY_SHARED_TOTAL);
        let all: Vec<u8> = segments.concat();
        assert_eq!(all, frames.concat());
    }
}
