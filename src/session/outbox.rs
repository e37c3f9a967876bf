//! A connection's outbox: messages encoded once, by their senders, straight
//! into their wire form, waiting for the connection's writer.
//!
//! Senders take one short lock to encode a message into the open chunk (no
//! `Message` kept, no channel operation per message); the writer swaps the
//! chunk out under the same lock and writes it outside it, so the lock is
//! never held during I/O. In signed sessions messages are appended as the
//! entries of a signed batch, behind room left for its header; the writer
//! seals the batch where it lies (one signature, no further copy). Frames
//! encoded once for many recipients (broadcasts) join as shared buffers.
//!
//! The budget counts messages (`send_queue_capacity`) and bytes
//! (`send_queue_bytes`) waiting to be taken by the writer.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::AtomicBool};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::sync::{Notify, oneshot};

use crate::{
    error::DisconnectReason,
    metrics::{Direction, MessageTally, Metrics},
    pipe::DirectWrite,
    pool::BufferPool,
    proto::{Message, MessageKind},
    signed,
};

use super::{
    SIGNED_BATCH_MAX_MESSAGES, SIGNED_FRAME_OVERHEAD, WRITE_COALESCE_BYTES, broadcast::PendingBatch,
};

mod direct;
mod shared;
pub(super) use direct::Pushed;

/// Room a unicast signed batch leaves ahead of its messages: the length
/// prefix, the sequence number (tag + up to 10 bytes) and the recipient's
/// 33-byte key (tag + length + key).
pub(super) const UNICAST_HEADER_ROOM: usize = crate::codec::LENGTH_PREFIX_LEN + 11 + 2 + 33;

/// One item of the outbox, in wire order.
#[derive(Debug)]
pub(super) enum Entry {
    /// Whole wire frames in `chunk[start..end]` (unsigned sessions), of
    /// which `application` are application messages.
    Frames {
        start: usize,
        end: usize,
        application: u64,
    },
    /// A signed batch in `chunk[start..end]`: [`UNICAST_HEADER_ROOM`] bytes
    /// of room, then `count` message entries.
    Batch {
        start: usize,
        end: usize,
        count: usize,
        application: u64,
    },
    /// A complete frame encoded (and sealed) once for many recipients.
    Shared { frame: Bytes, application: bool },
    /// The place of a signed broadcast batch, sealed by the first writer
    /// that reaches it; `application` of its messages were charged here.
    Pending {
        batch: Arc<PendingBatch>,
        application: u64,
    },
    /// Acknowledge the messages dispatched to the handler so far.
    Ack,
    /// The message before this one waits for the peer's acknowledgement.
    Confirm(oneshot::Sender<()>),
    /// Close once what precedes (the `Disconnect`) is written.
    Close(DisconnectReason, String),
}

impl Entry {
    fn application(&self) -> u64 {
        match self {
            Self::Frames { application, .. }
            | Self::Batch { application, .. }
            | Self::Pending { application, .. } => *application,
            Self::Shared { application, .. } => u64::from(*application),
            _ => 0,
        }
    }
}

/// What the writer takes in one go.
pub(super) struct Taken {
    pub(super) chunk: BytesMut,
    pub(super) entries: Vec<Entry>,
    /// Per-kind counts of its messages, published once written.
    pub(super) tally: MessageTally,
    messages: usize,
    bytes: usize,
}

/// What the writer hands back with its next `take`, for the next chunks:
/// a busy connection then allocates no entry list or tally per write.
#[derive(Default)]
pub(super) struct Spare {
    pub(super) entries: Vec<Entry>,
    pub(super) tally: Option<MessageTally>,
}

/// Why a message was not queued.
#[derive(Debug)]
pub(super) enum Refused {
    /// Over budget: the caller gets its message back.
    Full,
    /// The connection is closing or closed.
    Closed,
}

struct State {
    chunk: BytesMut,
    entries: Vec<Entry>,
    /// Messages and bytes waiting for the writer: the budget's measure.
    messages: usize,
    bytes: usize,
    /// Index of the signed batch still open to more messages.
    open_batch: Option<usize>,
    /// An `Entry::Ack` is waiting: later requests fold into it.
    ack_queued: bool,
    /// The writer waits for `Outbox::wake`.
    parked: bool,
    /// Senders wait for `Outbox::room`.
    waiting: usize,
    /// Nothing more is taken: the connection is closing or closed.
    closed: bool,
    tally: MessageTally,
    /// Messages and bytes of the open chunk (the rest wait in `ready`).
    open_messages: usize,
    open_bytes: usize,
    /// Full chunks, each one write's worth, waiting for the writer.
    ready: std::collections::VecDeque<Taken>,
    /// Control messages that go ahead of everything else.
    urgent: Option<Taken>,
    /// Handed back by the writer for the next chunk (see [`Spare`]). Only
    /// writes of application messages hand their tally back, and an idle
    /// connection lets it go (`trim`): idle connections hold none.
    spare: Spare,
    /// Writes without waiting while the writer is idle (see `direct`);
    /// let go when the outbox closes.
    direct: Option<Arc<dyn DirectWrite>>,
    /// A direct write's frame, kept for the next one.
    scratch: BytesMut,
    /// The broadcast batch whose place the writer took last, until it
    /// takes again: it may still gather, and must not take broadcasts made
    /// after something queued since.
    taken_batch: Option<Arc<PendingBatch>>,
}

/// See the module documentation.
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Wakes the parked writer.
    wake: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
    max_messages: usize,
    max_bytes: usize,
    signed: bool,
    max_frame_size: usize,
    /// The encoded `sender_id` field written ahead of application messages.
    stamp: Box<[u8]>,
    pool: std::sync::Arc<BufferPool>,
    metrics: std::sync::Arc<Metrics>,
    /// The transport writes directly.
    direct: bool,
    /// The gate of the next direct write (see `direct`).
    armed: AtomicBool,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("max_messages", &self.max_messages)
            .field("max_bytes", &self.max_bytes)
            .field("signed", &self.signed)
            .finish_non_exhaustive()
    }
}

/// Settings of an outbox.
pub(super) struct OutboxConfig {
    pub(super) max_messages: usize,
    pub(super) max_bytes: usize,
    pub(super) signed: bool,
    pub(super) max_frame_size: usize,
    pub(super) sender_id: Option<String>,
    pub(super) pool: std::sync::Arc<BufferPool>,
    pub(super) metrics: std::sync::Arc<Metrics>,
    /// Given only to sessions without signed frames or acknowledgements.
    pub(super) direct: Option<Arc<dyn DirectWrite>>,
}

impl Outbox {
    pub(super) fn new(config: OutboxConfig) -> Self {
        // `sender_id` is field 1, which prost writes first: writing it ahead
        // of a message whose own `sender_id` is empty gives the very same
        // bytes as setting it, without a `String` per message.
        let stamp = config.sender_id.map_or_else(Vec::new, |id| {
            let mut field = Vec::new();
            prost::encoding::string::encode(1, &id, &mut field);
            field
        });
        Self {
            state: Mutex::new(State {
                chunk: BytesMut::new(),
                entries: Vec::new(),
                messages: 0,
                bytes: 0,
                open_batch: None,
                ack_queued: false,
                parked: false,
                waiting: 0,
                closed: false,
                tally: config.metrics.tally(Direction::Out),
                open_messages: 0,
                open_bytes: 0,
                ready: std::collections::VecDeque::new(),
                urgent: None,
                spare: Spare::default(),
                direct: config.direct.clone(),
                scratch: BytesMut::new(),
                taken_batch: None,
            }),
            metrics: config.metrics,
            wake: Notify::new(),
            room: Notify::new(),
            max_messages: config.max_messages.max(1),
            max_bytes: config.max_bytes.max(1),
            signed: config.signed,
            max_frame_size: config.max_frame_size,
            stamp: stamp.into_boxed_slice(),
            pool: config.pool,
            direct: config.direct.is_some() && !config.signed,
            armed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes of `sender_id` stamped on application messages.
    pub(super) fn stamp_len(&self) -> usize {
        self.stamp.len()
    }

    /// Queues `message` (its `encoded_len` is `len`) if the budget has room,
    /// stamping application messages with our `sender_id`; `confirm` waits
    /// for the peer's acknowledgement of it. `tail` (extension fields, or
    /// nothing) follows the message's own fields. `force` ignores the budget
    /// (a control message, a closing `Disconnect`).
    pub(super) fn push(
        &self,
        message: &mut Message,
        len: usize,
        tail: &[u8],
        confirm: Option<oneshot::Sender<()>>,
        force: bool,
    ) -> Result<Pushed, (Refused, Option<oneshot::Sender<()>>)> {
        let kind = MessageKind::of(message);
        let stamp: &[u8] = if kind.is_application() && !self.stamp.is_empty() {
            &self.stamp
        } else {
            &[]
        };
        // The stamp replaces the message's own `sender_id`.
        let own = if stamp.is_empty() || message.sender_id.is_empty() {
            0
        } else {
            prost::encoding::string::encoded_len(1, &message.sender_id)
        };
        let size = stamp.len() + len - own + tail.len();
        let mut state = self.lock();
        if state.closed {
            return Err((Refused::Closed, confirm));
        }
        if !force && !self.fits(&state, size) {
            return Err((Refused::Full, confirm));
        }
        if own > 0 {
            message.sender_id.clear();
        }
        let encode = |chunk: &mut BytesMut| {
            chunk.put_slice(stamp);
            // Capacity is reserved and the length measured: cannot fail.
            let _ = message.encode(chunk);
            chunk.put_slice(tail);
        };
        if confirm.is_none() && self.direct_open(&state, size) {
            let pushed = self.write_direct(&mut state, kind, size, encode);
            if pushed != Pushed::Queued {
                // Nothing for the writer: it stays parked.
                return Ok(pushed);
            }
        } else {
            self.append(&mut state, kind, size, encode);
        }
        if let Some(confirm) = confirm {
            state.entries.push(Entry::Confirm(confirm));
            state.open_batch = None;
        }
        self.wake_writer(state);
        Ok(Pushed::Queued)
    }

    /// Queues a control message ahead of everything waiting, whatever the
    /// budget: a ping or pong measures the link, and behind a backlog it
    /// would measure the backlog (a busy sender's peer would be evicted as
    /// silent). Each goes as a frame of its own; in signed sessions the
    /// writer seals it, so sequence numbers still follow the wire order.
    pub(super) fn push_urgent(&self, message: &Message) {
        let kind = MessageKind::of(message);
        let size = message.encoded_len();
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let urgent = self.urgent(&mut state);
        if urgent.chunk.capacity() == 0 {
            // Pooled like every chunk: the writer gives it back.
            urgent.chunk = self.pool.take();
        }
        let start = urgent.chunk.len();
        if self.signed {
            urgent.chunk.put_bytes(0, UNICAST_HEADER_ROOM);
            signed::put_message_field(&mut urgent.chunk, size);
        } else {
            urgent.chunk.put_u32(size as u32);
        }
        let _ = message.encode(&mut urgent.chunk);
        let end = urgent.chunk.len();
        urgent.entries.push(if self.signed {
            Entry::Batch {
                start,
                end,
                count: 1,
                application: 0,
            }
        } else {
            Entry::Frames {
                start,
                end,
                application: 0,
            }
        });
        let bytes = end - start;
        urgent.messages += 1;
        urgent.bytes += bytes;
        urgent.tally.add(kind, size);
        state.messages += 1;
        state.bytes += bytes;
        self.wake_writer(state);
    }

    /// Queues `frame` ahead of everything, pings included: the handshake
    /// response, which the session may have pinged before it is queued.
    pub(super) fn push_first(&self, frame: Bytes, kind: MessageKind) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let bytes = frame.len();
        let urgent = self.urgent(&mut state);
        urgent.messages += 1;
        urgent.bytes += bytes;
        let size = bytes.saturating_sub(crate::codec::LENGTH_PREFIX_LEN);
        urgent.tally.add(kind, size);
        urgent.entries.insert(
            0,
            Entry::Shared {
                frame,
                application: false,
            },
        );
        state.messages += 1;
        state.bytes += bytes;
        self.wake_writer(state);
    }

    /// The lane of frames that go ahead of queued data.
    fn urgent<'a>(&self, state: &'a mut State) -> &'a mut Taken {
        state.urgent.get_or_insert_with(|| Taken {
            // Taken from the pool when a message is encoded into it (the
            // handshake response, a shared frame, needs none).
            chunk: BytesMut::new(),
            entries: Vec::new(),
            tally: self.metrics.tally(Direction::Out),
            messages: 0,
            bytes: 0,
        })
    }

    /// Queues an acknowledgement unless one is already waiting (it will
    /// carry the newest count).
    pub(super) fn push_ack(&self) {
        let mut state = self.lock();
        if state.closed || state.ack_queued {
            return;
        }
        shared::fence(&mut state);
        state.ack_queued = true;
        state.open_batch = None;
        state.entries.push(Entry::Ack);
        self.wake_writer(state);
    }

    /// Queues `disconnect` (a control message) and then the end of the
    /// connection, whatever the budget; nothing is queued after them. False
    /// if the connection is already closing.
    pub(super) fn push_close(
        &self,
        disconnect: &Message,
        reason: DisconnectReason,
        details: String,
    ) -> bool {
        let size = disconnect.encoded_len();
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        self.append(&mut state, MessageKind::Disconnect, size, |chunk| {
            let _ = disconnect.encode(chunk);
        });
        state.closed = true;
        state.open_batch = None;
        state.entries.push(Entry::Close(reason, details));
        self.wake_writer(state);
        true
    }

    fn fits(&self, state: &State, size: usize) -> bool {
        // A message larger than the byte budget still goes when nothing waits.
        state.messages < self.max_messages
            && (state.bytes == 0 || state.bytes + size <= self.max_bytes)
    }

    /// Encodes one message of `size` bytes into the open chunk.
    fn append(
        &self,
        state: &mut State,
        kind: MessageKind,
        size: usize,
        encode: impl FnOnce(&mut BytesMut),
    ) {
        shared::fence(state);
        if state.chunk.capacity() == 0 {
            state.chunk = self.pool.take();
        }
        let at = state.chunk.len();
        let bytes_before = state.bytes;
        let application = u64::from(kind.is_application());
        if self.signed {
            let field = 1 + prost::encoding::encoded_len_varint(size as u64);
            let open = state
                .open_batch
                .and_then(|index| match state.entries[index] {
                    Entry::Batch {
                        start, end, count, ..
                    } if end == at
                        && count < SIGNED_BATCH_MAX_MESSAGES
                        && end - start + field + size + SIGNED_FRAME_OVERHEAD
                            <= self.max_frame_size =>
                    {
                        Some(index)
                    }
                    _ => None,
                });
            let index = match open {
                Some(index) => index,
                None => {
                    state.chunk.reserve(UNICAST_HEADER_ROOM + field + size);
                    state.chunk.put_bytes(0, UNICAST_HEADER_ROOM);
                    state.entries.push(Entry::Batch {
                        start: at,
                        end: at,
                        count: 0,
                        application: 0,
                    });
                    state.entries.len() - 1
                }
            };
            state.chunk.reserve(field + size);
            signed::put_message_field(&mut state.chunk, size);
            encode(&mut state.chunk);
            let end_now = state.chunk.len();
            if let Entry::Batch {
                end,
                count,
                application: apps,
                ..
            } = &mut state.entries[index]
            {
                *end = end_now;
                *count += 1;
                *apps += application;
            }
            state.open_batch = Some(index);
            state.bytes += field + size;
        } else {
            state.chunk.reserve(crate::codec::LENGTH_PREFIX_LEN + size);
            state.chunk.put_u32(size as u32);
            encode(&mut state.chunk);
            let end_now = state.chunk.len();
            match state.entries.last_mut() {
                Some(Entry::Frames {
                    end,
                    application: apps,
                    ..
                }) if *end == at => {
                    *end = end_now;
                    *apps += application;
                }
                _ => state.entries.push(Entry::Frames {
                    start: at,
                    end: end_now,
                    application,
                }),
            }
            state.bytes += crate::codec::LENGTH_PREFIX_LEN + size;
        }
        state.messages += 1;
        state.open_messages += 1;
        state.open_bytes += state.bytes - bytes_before;
        state.tally.add(kind, size);
        if state.chunk.len() >= WRITE_COALESCE_BYTES {
            self.close_chunk(state);
        }
    }

    /// Moves the open chunk to the ready list: a write's worth is enough.
    fn close_chunk(&self, state: &mut State) {
        let (entries, tally) = self.next_lists(state);
        let taken = Taken {
            chunk: std::mem::take(&mut state.chunk),
            entries: std::mem::replace(&mut state.entries, entries),
            tally: std::mem::replace(&mut state.tally, tally),
            messages: std::mem::take(&mut state.open_messages),
            bytes: std::mem::take(&mut state.open_bytes),
        };
        state.open_batch = None;
        state.ready.push_back(taken);
    }

    /// An entry list and a tally for the next chunk: the spares if there
    /// are some.
    fn next_lists(&self, state: &mut State) -> (Vec<Entry>, MessageTally) {
        let tally = state
            .spare
            .tally
            .take()
            .unwrap_or_else(|| self.metrics.tally(Direction::Out));
        (std::mem::take(&mut state.spare.entries), tally)
    }

    fn wake_writer(&self, mut state: MutexGuard<'_, State>) {
        let wake = std::mem::take(&mut state.parked);
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Takes one write's worth: the oldest full chunk, else everything
    /// open; `None` (and the writer is marked parked) when nothing waits.
    /// `spare` holds what the writer hands back from its last write.
    pub(super) fn take(&self, spare: &mut Spare) -> Option<Taken> {
        let mut state = self.lock();
        if state.spare.entries.capacity() == 0 {
            state.spare.entries = std::mem::take(&mut spare.entries);
        }
        if state.spare.tally.is_none() {
            state.spare.tally = spare.tally.take();
        }
        let taken = match state.urgent.take().or_else(|| state.ready.pop_front()) {
            Some(taken) => taken,
            None if state.entries.is_empty() => {
                state.taken_batch = None;
                state.parked = true;
                return None;
            }
            None => {
                // The place goes, the batch may still gather (see `shared`).
                state.taken_batch = match state.entries.last() {
                    Some(Entry::Pending { batch, .. }) => Some(batch.clone()),
                    _ => None,
                };
                let (entries, tally) = self.next_lists(&mut state);
                state.open_batch = None;
                state.ack_queued = false;
                Taken {
                    chunk: std::mem::take(&mut state.chunk),
                    entries: std::mem::replace(&mut state.entries, entries),
                    tally: std::mem::replace(&mut state.tally, tally),
                    messages: std::mem::take(&mut state.open_messages),
                    bytes: std::mem::take(&mut state.open_bytes),
                }
            }
        };
        state.messages -= taken.messages;
        state.bytes = state.bytes.saturating_sub(taken.bytes);
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            self.room.notify_waiters();
        }
        Some(taken)
    }

    /// Lets go of the spare tally: the connection has been idle.
    pub(super) fn trim(&self) {
        let mut state = self.lock();
        state.spare.tally = None;
        state.scratch = BytesMut::new();
    }

    /// Resolves when the writer should look again (after `take` said `None`).
    pub(super) async fn parked(&self) {
        self.wake.notified().await;
    }

    /// Waits until the writer takes what is queued, or the connection
    /// closes; the caller then tries again.
    pub(super) async fn room(&self) {
        let notified = self.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut state = self.lock();
            if state.closed || state.messages == 0 {
                return;
            }
            state.waiting += 1;
        }
        struct Waiting<'a>(&'a Outbox);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.lock().waiting -= 1;
            }
        }
        let _waiting = Waiting(self);
        notified.await;
    }

    /// Refuses everything from now on; returns how many application
    /// messages were still waiting (they will never be written).
    pub(super) fn close(&self) -> u64 {
        let mut state = self.lock();
        state.closed = true;
        state.ack_queued = true;
        state.direct = None;
        state.taken_batch = None;
        let mut entries = std::mem::take(&mut state.entries);
        // Local counters publish when dropped: what is never written must
        // be forgotten first.
        state.tally.discard();
        let mut chunks = vec![std::mem::take(&mut state.chunk)];
        let urgent = state.urgent.take();
        for mut taken in std::mem::take(&mut state.ready).into_iter().chain(urgent) {
            taken.tally.discard();
            entries.extend(taken.entries);
            chunks.push(taken.chunk);
        }
        // Their buffers go back to the pool, which counts them as lent out.
        for mut chunk in chunks.into_iter().filter(|c| c.capacity() > 0) {
            chunk.clear();
            self.pool.give(chunk);
        }
        state.messages = 0;
        state.bytes = 0;
        drop(state);
        self.room.notify_waiters();
        entries.iter().map(Entry::application).sum()
    }

    /// Returns a written chunk's buffer to the pool.
    pub(super) fn recycle(&self, chunk: BytesMut) {
        self.pool.give(chunk);
    }

    /// Messages waiting for the writer.
    pub(super) fn queued(&self) -> usize {
        self.lock().messages
    }
}
