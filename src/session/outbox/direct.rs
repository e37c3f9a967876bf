//! Direct writes: a message sent while the writer is idle and nothing is
//! queued is written by the sending task itself, saving the writer's
//! wake-up on the way out (a request/response exchange pays it on every
//! message otherwise).
//!
//! The gate opens once per batch of application messages received (a
//! request arrived, its reply may follow at once), so a connection that only
//! sends keeps batching its writes and never makes a system call per
//! message. Only sessions without signed frames or delivery
//! acknowledgements write directly: sealing and ack positions belong to the
//! writer.

use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};

use super::{Entry, Outbox, State};
use crate::{codec::LENGTH_PREFIX_LEN, metrics::Direction, proto::MessageKind};

/// Frames larger than this always go through the writer.
pub(super) const DIRECT_MAX_BYTES: usize = 16 * 1024;

/// What became of a message handed to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::session) enum Pushed {
    /// Queued for the writer, which counts it once written.
    Queued,
    /// Written whole, directly: `bytes` are on their way.
    Written { bytes: usize },
}

impl Outbox {
    /// Opens the gate for one direct write: the handler is about to get
    /// application messages, and a reply may follow.
    pub(in crate::session) fn arm_direct(&self) {
        if self.direct {
            self.armed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a message of `size` bytes may be written directly now; takes
    /// the gate if so.
    pub(super) fn direct_open(&self, state: &State, size: usize) -> bool {
        self.direct
            && state.parked
            && !state.closed
            && state.entries.is_empty()
            && state.ready.is_empty()
            && state.urgent.is_none()
            && state.direct.is_some()
            && LENGTH_PREFIX_LEN + size <= DIRECT_MAX_BYTES
            && self.armed.swap(false, Ordering::Relaxed)
    }

    /// Encodes one message of `size` bytes and writes what the transport
    /// takes at once; the rest (all of it, when it takes nothing) is queued
    /// for the writer ahead of anything sent later.
    pub(super) fn write_direct(
        &self,
        state: &mut State,
        kind: MessageKind,
        size: usize,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Pushed {
        let mut frame = std::mem::take(&mut state.scratch);
        frame.clear();
        frame.reserve(LENGTH_PREFIX_LEN + size);
        frame.put_u32(size as u32);
        encode(&mut frame);
        // An error is the writer's to meet and report: it writes it all.
        let written = state
            .direct
            .as_ref()
            .and_then(|direct| direct.try_write(&frame).ok())
            .unwrap_or(0);
        let pushed = if written == frame.len() {
            self.metrics.message(Direction::Out, kind, size);
            self.metrics.bytes(Direction::Out, written);
            Pushed::Written { bytes: written }
        } else {
            self.append_rest(state, kind, size, &frame[written..]);
            Pushed::Queued
        };
        state.scratch = frame;
        pushed
    }

    /// Queues the unwritten end of a frame begun directly, as one entry
    /// counting its message.
    fn append_rest(&self, state: &mut State, kind: MessageKind, size: usize, rest: &[u8]) {
        if state.chunk.capacity() == 0 {
            state.chunk = self.pool.take();
        }
        let start = state.chunk.len();
        state.chunk.put_slice(rest);
        state.entries.push(Entry::Frames {
            start,
            end: state.chunk.len(),
            application: u64::from(kind.is_application()),
        });
        state.messages += 1;
        state.bytes += rest.len();
        state.open_messages += 1;
        state.open_bytes += rest.len();
        state.tally.add(kind, size);
    }
}
