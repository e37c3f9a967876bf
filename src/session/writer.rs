//! The writing half of a session: a thin driver over the [outbox](super::outbox).
//!
//! It takes everything senders queued, seals signed batches where they lie,
//! adds the frames only it writes (acknowledgements), and writes the lot with
//! one vectored write, outside the outbox's lock. Counters and metrics are
//! updated once per write.

use std::{
    ops::Range,
    sync::{Arc, PoisonError, atomic::Ordering},
};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::time::Instant;
use tracing::warn;

use super::{
    Connection, FrameSigner, FrameWriter, SessionContext,
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
}

/// Adds `piece`, extending the last one where they are adjacent in one
/// buffer, so unsigned messages around a confirmation go out as one slice.
fn push_piece(pieces: &mut Vec<Piece>, piece: Piece) {
    if let (Some(Piece::Chunk(last)), Piece::Chunk(next)) = (pieces.last_mut(), &piece)
        && last.end == next.start
    {
        last.end = next.end;
        return;
    }
    pieces.push(piece);
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
    /// Application messages in it.
    messages: u64,
    /// The writer's own traffic and signed frames, for the metrics.
    tally: MessageTally,
}

impl Write {
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
    mut writer: W,
    connection: Arc<Connection>,
    signer: Option<FrameSigner>,
    context: Arc<SessionContext>,
) {
    let config = &context.config;
    let outbox = &connection.outbox;
    let signer = signer.as_ref();
    let mut spare = Spare::default();
    let mut write = Write {
        pieces: Vec::new(),
        own: BytesMut::new(),
        messages: 0,
        tally: context.metrics.tally(Direction::Out),
    };
    let mut segments: Vec<Bytes> = Vec::new();
    // Application messages put on the wire so far: ack positions.
    let mut written: u64 = 0;
    let mut last_ack: u64 = 0;
    // Application messages of writes that never fully left.
    let mut lost: u64 = 0;
    let closed = connection.closed.cancelled();
    tokio::pin!(closed);
    loop {
        let Some(Taken {
            mut chunk,
            mut entries,
            tally: mut taken,
            ..
        }) = outbox.take(&mut spare)
        else {
            tokio::select! {
                biased;
                () = outbox.parked() => continue,
                () = &mut closed => break,
            }
        };
        let mut close = None;
        let mut confirming = false;
        let mut failed = None;
        write.messages = 0;
        for entry in entries.drain(..) {
            match entry {
                Entry::Frames {
                    start,
                    end,
                    application,
                } => {
                    push_piece(&mut write.pieces, Piece::Chunk(start..end));
                    write.messages += application;
                }
                Entry::Batch {
                    start,
                    end,
                    count,
                    application,
                } => {
                    write.messages += application;
                    let sealed = match signer {
                        Some(signer) => seal(signer, &mut chunk[start..end], count),
                        None => Err(SignedFrameError::Malformed("no signing key".into())),
                    };
                    match sealed {
                        Ok((offset, signature)) => {
                            let at = write.own.len();
                            write.own.put_slice(&signature);
                            write.tally.add(
                                MessageKind::SignedFrame,
                                end - start - offset - LENGTH_PREFIX_LEN + signature.len(),
                            );
                            write.pieces.push(Piece::Chunk(start + offset..end));
                            write.pieces.push(Piece::Own(at..write.own.len()));
                        }
                        Err(err) => failed = Some(err),
                    }
                }
                Entry::Shared { frame, application } => {
                    write.pieces.push(Piece::Shared(frame));
                    write.messages += u64::from(application);
                }
                Entry::Ack => {
                    if let Some(acks) = &connection.acks {
                        let delivered = acks.dispatched.load(Ordering::Relaxed);
                        if delivered != last_ack {
                            last_ack = delivered;
                            if let Err(err) = write.push_ack(Some(delivered), signer) {
                                failed = Some(err);
                            }
                        }
                    }
                }
                Entry::Confirm(done) => {
                    // A confirmation nobody can give drops `done`: its sender
                    // learns the message was not confirmed.
                    if let Some(acks) = &connection.acks {
                        confirming = true;
                        acks.waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push_back((written + write.messages, Instant::now(), done));
                    }
                }
                Entry::Close(reason, details) => close = Some((reason, details)),
            }
        }
        spare.entries = entries;
        if confirming
            && close.is_none()
            && let Err(err) = write.push_ack(None, signer)
        {
            failed = Some(err);
        }
        if let Some(err) = failed {
            // Messages counted for acknowledgements cannot be sent: the
            // session cannot go on.
            lost += write.messages;
            taken.discard();
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
        if let Some(acks) = &connection.acks {
            // Published before the bytes leave: an ack can cover no more.
            acks.written
                .store(written + write.messages, Ordering::Release);
        }

        // Chunks with room came from the write-buffer pool.
        let leased = chunk.capacity() > 0;
        let chunk = chunk.freeze();
        let own = std::mem::take(&mut write.own).freeze();
        for piece in write.pieces.drain(..) {
            segments.push(match piece {
                Piece::Shared(frame) => frame,
                Piece::Chunk(range) => chunk.slice(range),
                Piece::Own(range) => own.slice(range),
            });
        }
        let bytes: usize = segments.iter().map(Bytes::len).sum();
        let limit = if close.is_some() {
            config.disconnect_timeout
        } else {
            config.write_timeout
        };
        let result = if bytes == 0 {
            Some(Ok(Ok(())))
        } else {
            // An aborted connection (too slow, replaced, stopped) stops even a
            // write that is blocked on a peer which does not read.
            tokio::select! {
                result = tokio::time::timeout(limit, writer.write_segments(&segments)) => Some(result),
                () = &mut closed => None,
            }
        };
        segments.clear();
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
                    format!("write blocked for {limit:?}"),
                );
                break;
            }
        }
        if write.messages > 0 {
            spare.tally = Some(taken);
        }
        if let Some((reason, details)) = close {
            connection.abort(reason, details);
            break;
        }
    }
    let end = connection.end.get();
    let reason = end.map(|end| (end.reason, end.details.as_str()));
    let _ = tokio::time::timeout(config.disconnect_timeout, writer.shutdown(reason)).await;
    // Whatever is still queued will never be written: say so, counting
    // application messages one by one, those of a write cut off included.
    let undelivered = lost + outbox.close();
    if undelivered > 0 {
        context.metrics.errors("undelivered", "write", undelivered);
        warn!(undelivered, "connection closed with messages unsent");
    }
}
