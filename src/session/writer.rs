//! The writing half of a session.

use super::{
    Connection, FrameSigner, FrameWriter, SessionContext, WRITE_BUFFER_CAPACITY,
    WRITE_COALESCE_BYTES, control,
};
use std::{
    sync::{Arc, PoisonError, atomic::Ordering},
    time::Instant,
};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::sync::{
    mpsc::{self},
    oneshot,
};
use tracing::warn;

use crate::{
    codec::{self},
    error::DisconnectReason,
    metrics::{
        ACK_KIND, Direction, MESSAGE_KINDS, MessageTally, Metrics, SIGNED_FRAME_KIND, kind_index,
    },
    proto::{
        Message, Payload,
        rollup::v1::DisconnectMessage,
        transport::v1::{Ack, MessageExt},
    },
    signed::{self, Audience},
};

/// Items of a connection's send queue.
// Messages are queued by value: boxing them would cost an allocation per
// message on the send path, more than the larger queue slots cost in memory.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A message the writer encodes (and, in signed mode, seals with others),
    /// with its `encoded_len` as measured when it was queued.
    Message(Message, usize),
    /// A message whose delivery the peer acknowledges; `done` fires when it has.
    Confirmed(Message, usize, oneshot::Sender<()>),
    /// Acknowledge the messages handed to the handler so far.
    Ack,
    /// A complete frame encoded (and sealed) once for many recipients,
    /// with the payload kind of its message for the metrics.
    Frame(Bytes, usize),
    /// Write a `Disconnect` and close.
    Close(DisconnectReason, String),
}

impl Outbound {
    /// A control message of the transport itself.
    pub(super) fn control(payload: Payload) -> Self {
        let message = control(payload);
        let len = message.encoded_len();
        Self::Message(message, len)
    }
}

/// Accumulates queued items into one write buffer. In signed mode unicast
/// messages wait in `pending` and are sealed together as one frame.
struct WriteBatch {
    buffer: BytesMut,
    /// Encoded messages awaiting a seal, split off as they are added.
    scratch: BytesMut,
    pending: Vec<Bytes>,
    pending_bytes: usize,
    messages: u64,
    max_frame_size: usize,
    metrics: Arc<Metrics>,
    tally: MessageTally,
    /// A sealed batch could not be encoded.
    failed: bool,
}

impl WriteBatch {
    fn len(&self) -> usize {
        self.buffer.len() + self.pending_bytes
    }

    /// Queues `message`, whose `encoded_len` is `len`, preceded by the
    /// pre-encoded `prefix` fields. Returns whether it was taken (the encoder
    /// refuses only what size checks at queueing time let through by mistake).
    fn push_message(
        &mut self,
        message: &Message,
        prefix: &[u8],
        len: usize,
        signer: Option<&FrameSigner>,
    ) -> bool {
        debug_assert_eq!(len, message.encoded_len());
        let size = prefix.len() + len;
        self.push_encoded(kind_index(message), size, signer, |buffer| {
            buffer.put_slice(prefix);
            message.encode(buffer).expect("capacity reserved");
        })
    }

    /// Queues an acknowledgement of `delivered` messages, or (`None`) a
    /// request for one.
    fn push_ack(&mut self, delivered: Option<u64>, signer: Option<&FrameSigner>) {
        let ext = MessageExt {
            ack: delivered.map(|delivered| Ack { delivered }),
            ack_request: delivered.is_none(),
        };
        self.push_encoded(ACK_KIND, ext.encoded_len(), signer, |buffer| {
            ext.encode(buffer).expect("capacity reserved");
        });
    }

    /// Queues one message of `size` bytes that `encode` writes.
    fn push_encoded(
        &mut self,
        kind: usize,
        size: usize,
        signer: Option<&FrameSigner>,
        encode: impl FnOnce(&mut BytesMut),
    ) -> bool {
        let Some(signer) = signer else {
            if let Err(err) = codec::check_frame_len(size, self.max_frame_size) {
                self.metrics.error("encode", "write");
                warn!(error = %err, "message refused by the encoder");
                return false;
            }
            self.buffer.reserve(codec::LENGTH_PREFIX_LEN + size);
            self.buffer.put_u32(size as u32);
            encode(&mut self.buffer);
            self.counted(kind, size);
            return true;
        };
        if self.pending_bytes + size + SIGNED_FRAME_OVERHEAD > self.max_frame_size
            || self.pending.len() >= SIGNED_BATCH_MAX_MESSAGES
        {
            self.seal(Some(signer));
        }
        // Messages of a batch are encoded side by side in one buffer; once
        // sealed, their bytes are copied out and the buffer is reclaimed.
        if self.scratch.capacity() == 0 {
            self.scratch = BytesMut::with_capacity(WRITE_BUFFER_CAPACITY.max(size));
        }
        self.scratch.reserve(size);
        encode(&mut self.scratch);
        self.counted(kind, size);
        self.pending_bytes += size + 8;
        self.pending.push(self.scratch.split().freeze());
        true
    }

    fn counted(&mut self, kind: usize, size: usize) {
        self.messages += u64::from(is_application_kind(kind));
        self.tally.add(kind, size);
    }

    fn push_frame(&mut self, frame: &[u8], kind: usize, signer: Option<&FrameSigner>) {
        // Keep order: what was queued before this frame goes out before it.
        self.seal(signer);
        self.counted(kind, frame.len() - codec::LENGTH_PREFIX_LEN);
        self.buffer.extend_from_slice(frame);
    }

    fn seal(&mut self, signer: Option<&FrameSigner>) {
        let Some(signer) = signer else { return };
        if self.pending.is_empty() {
            return;
        }
        let frame = signed::seal(
            &signer.key,
            signer.backend,
            signer.unicast.next(),
            &Audience::Unicast {
                recipient: signer.recipient.clone(),
                session: signer.session_tag,
            },
            std::mem::take(&mut self.pending),
        );
        self.pending_bytes = 0;
        let before = self.buffer.len();
        match codec::encode_message(&frame, self.max_frame_size, &mut self.buffer) {
            Ok(()) => {
                let size = self.buffer.len() - before - codec::LENGTH_PREFIX_LEN;
                self.tally.add(SIGNED_FRAME_KIND, size);
            }
            Err(err) => {
                // Its messages were counted for acknowledgements: the session
                // cannot go on (the writer aborts it).
                self.metrics.error("encode", "write");
                warn!(error = %err, "signed batch refused by the encoder");
                self.failed = true;
            }
        }
    }
}

/// Room a signed frame needs beyond its messages: sequence, audience,
/// signature and field tags, with margin.
pub(crate) const SIGNED_FRAME_OVERHEAD: usize = 512;

/// Most messages sealed into one signed frame. A receiver charges each
/// message's result to the frame's decode allowance (docs/PROTOCOL.md §6),
/// so a batch of many tiny messages must not outgrow it.
pub const SIGNED_BATCH_MAX_MESSAGES: usize = 1024;

/// The connection's single writer: drains the queue in batches of up to
/// [`WRITE_COALESCE_BYTES`], encodes (and seals) them into one buffer, and
/// writes it with one call.
pub(super) async fn write_loop<W: FrameWriter>(
    mut writer: W,
    mut queue: mpsc::Receiver<Outbound>,
    connection: Arc<Connection>,
    signer: Option<FrameSigner>,
    sender_id: Option<String>,
    context: Arc<SessionContext>,
) {
    let config = &context.config;
    let pool = &context.write_buffers;
    let signer = signer.as_ref();
    // `sender_id` is field 1, which prost writes first: writing it ahead of a
    // message whose own `sender_id` is empty gives the very same bytes as
    // setting it, without a `String` per message.
    let stamp = sender_id.map(|id| {
        let mut field = Vec::new();
        prost::encoding::string::encode(1, &id, &mut field);
        field
    });
    let mut batch = WriteBatch {
        buffer: BytesMut::new(),
        scratch: BytesMut::new(),
        pending: Vec::new(),
        pending_bytes: 0,
        messages: 0,
        max_frame_size: config.max_frame_size,
        metrics: context.metrics.clone(),
        tally: context.metrics.tally(Direction::Out),
        failed: false,
    };
    // Application messages encoded so far: the position of the next one, less 1.
    let mut written: u64 = 0;
    let mut last_ack: u64 = 0;
    // Application messages of batches that never fully left.
    let mut lost: u64 = 0;
    let closed = connection.closed.cancelled();
    tokio::pin!(closed);
    loop {
        let first = tokio::select! {
            biased;
            item = queue.recv() => item,
            _ = &mut closed => None,
        };
        let Some(first) = first else { break };
        // Borrow a buffer only while there is something to write.
        batch.buffer = pool.take();
        let mut next = Some(first);
        let mut close = None;
        let mut confirming = false;
        while let Some(item) = next {
            match item {
                Outbound::Message(mut message, len) => {
                    let (prefix, len) = stamped(stamp.as_deref(), &mut message, len);
                    batch.push_message(&message, prefix, len, signer);
                }
                Outbound::Confirmed(mut message, len, done) => {
                    let (prefix, len) = stamped(stamp.as_deref(), &mut message, len);
                    // A message the encoder refused drops `done`: its sender
                    // learns it was not delivered.
                    if batch.push_message(&message, prefix, len, signer)
                        && let Some(acks) = &connection.acks
                    {
                        let position = written + batch.messages;
                        confirming = true;
                        acks.waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push_back((position, Instant::now(), done));
                    }
                }
                Outbound::Ack => {
                    if let Some(acks) = &connection.acks {
                        // Cleared before reading the count: a request made
                        // after this read queues a new ack (see `send_wanted_ack`).
                        acks.ack_queued.swap(false, Ordering::AcqRel);
                        let delivered = acks.dispatched.load(Ordering::Relaxed);
                        if delivered != last_ack {
                            last_ack = delivered;
                            batch.push_ack(Some(delivered), signer);
                        }
                    }
                }
                Outbound::Frame(frame, kind) => batch.push_frame(&frame, kind, signer),
                Outbound::Close(reason, details) => {
                    let disconnect = control(Payload::Disconnect(DisconnectMessage {
                        reason: reason.to_proto() as i32,
                        details: details.clone(),
                    }));
                    batch.push_message(&disconnect, &[], disconnect.encoded_len(), signer);
                    close = Some((reason, details));
                    break;
                }
            }
            next = if batch.len() < WRITE_COALESCE_BYTES {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        if confirming && close.is_none() {
            // After the messages it covers, in the same write (and frame).
            batch.push_ack(None, signer);
        }
        batch.seal(signer);
        if batch.failed {
            lost += batch.messages;
            batch.tally.discard();
            pool.give(std::mem::take(&mut batch.buffer));
            connection.abort(
                DisconnectReason::InternalError,
                "a signed batch could not be encoded",
            );
            break;
        }
        written += batch.messages;
        if let Some(acks) = &connection.acks {
            // Published before the bytes leave: an ack can cover no more.
            acks.written.store(written, Ordering::Release);
        }
        let limit = if close.is_some() {
            config.disconnect_timeout
        } else {
            config.write_timeout
        };
        let written = batch.buffer.len();
        let segment = std::mem::take(&mut batch.buffer).freeze();
        let result = if written == 0 {
            Some(Ok(Ok(())))
        } else {
            // An aborted connection (too slow, replaced, stopped) stops even a
            // write that is blocked on a peer which does not read.
            tokio::select! {
                result = tokio::time::timeout(limit, writer.write_segments(std::slice::from_ref(&segment))) => Some(result),
                _ = &mut closed => None,
            }
        };
        if let Ok(buffer) = segment.try_into_mut() {
            pool.give(buffer);
        }
        if !matches!(result, Some(Ok(Ok(())))) {
            // Not (fully) written: lost, and not counted as sent.
            lost += batch.messages;
            batch.tally.discard();
        }
        let Some(result) = result else { break };
        if queue.is_empty() {
            // Going idle: hold no buffer while waiting.
            batch.scratch = BytesMut::new();
        }
        match result {
            Ok(Ok(())) => {
                let counters = &connection.counters;
                counters
                    .bytes_out
                    .fetch_add(written as u64, Ordering::Relaxed);
                counters
                    .messages_out
                    .fetch_add(batch.messages, Ordering::Relaxed);
                context.metrics.bytes(Direction::Out, written);
                batch.tally.flush();
                batch.messages = 0;
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
        if let Some((reason, details)) = close {
            connection.abort(reason, details);
            break;
        }
    }
    let end = connection.end.get();
    let reason = end.map(|end| (end.reason, end.details.as_str()));
    let _ = tokio::time::timeout(config.disconnect_timeout, writer.shutdown(reason)).await;
    // Whatever is still queued will never be written: say so, counting
    // application messages one by one, those of the batch cut off included.
    queue.close();
    let mut undelivered = lost;
    while let Ok(item) = queue.try_recv() {
        undelivered += u64::from(match &item {
            Outbound::Message(message, _) | Outbound::Confirmed(message, ..) => {
                is_application(message)
            }
            Outbound::Frame(_, kind) => is_application_kind(*kind),
            Outbound::Ack | Outbound::Close(..) => false,
        });
    }
    if undelivered > 0 {
        context.metrics.errors("undelivered", "write", undelivered);
        warn!(undelivered, "connection closed with messages unsent");
    }
}

/// The `sender_id` field to write ahead of `message`, clearing its own, and
/// the message's `encoded_len` once cleared (`len` is the one before).
fn stamped<'a>(stamp: Option<&'a [u8]>, message: &mut Message, len: usize) -> (&'a [u8], usize) {
    match stamp {
        Some(stamp) if is_application(message) => {
            let own = if message.sender_id.is_empty() {
                0
            } else {
                prost::encoding::string::encoded_len(1, &message.sender_id)
            };
            message.sender_id.clear();
            (stamp, len - own)
        }
        _ => (&[], len),
    }
}

/// Whether a payload kind (an index of `MESSAGE_KINDS`) is an application
/// message rather than handshake or control traffic.
fn is_application_kind(kind: usize) -> bool {
    !matches!(
        MESSAGE_KINDS[kind],
        "handshake_request" | "handshake_response" | "ping" | "pong" | "disconnect" | "ack"
    )
}

fn is_application(message: &Message) -> bool {
    !matches!(
        message.payload,
        Some(Payload::Ping(_) | Payload::Pong(_) | Payload::Disconnect(_))
    )
}
