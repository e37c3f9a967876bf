//! Frames shared by many recipients: whole frames (unsigned broadcasts) and
//! the places of signed broadcast batches that the first writer to reach
//! them seals (see [`broadcast`](crate::session::broadcast)).
//!
//! A batch keeps taking later broadcasts only while nothing was queued
//! behind its place, whether the place still waits or the writer has taken
//! it and not yet sealed the batch: anything queued fences it first, so no
//! broadcast made after it can overtake what the connection sent after the
//! earlier ones. (A broadcast made at the same time as a unicast may join
//! just before the fence: then the two calls were concurrent, and either
//! order is theirs.)

use std::sync::Arc;

use bytes::Bytes;

use super::{Entry, Outbox, Refused, State};
use crate::{proto::MessageKind, session::broadcast::PendingBatch};

impl Outbox {
    /// Queues a frame encoded for many recipients, within the budget.
    pub(in crate::session) fn push_shared(
        &self,
        frame: Bytes,
        kind: MessageKind,
        force: bool,
    ) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if !force && !self.fits(&state, frame.len()) {
            return Err(Refused::Full);
        }
        fence(&mut state);
        let size = frame.len().saturating_sub(crate::codec::LENGTH_PREFIX_LEN);
        charge(&mut state, frame.len());
        state.tally.add(kind, size);
        state.open_batch = None;
        state.entries.push(Entry::Shared {
            frame,
            application: kind.is_application(),
        });
        self.wake_writer(state);
        Ok(())
    }

    /// Charges a message of the signed broadcast `batch` (`kind`, taking
    /// `bytes` of the frame). The `first` queues the batch's place. A later
    /// one is charged to that place, wherever it waits (a unicast may have
    /// fenced the batch after the message joined it), or rides along
    /// uncharged once the writer has taken it (the batch is sealed with it
    /// and written soon). The writer counts the messages in the metrics once
    /// written.
    pub(in crate::session) fn push_pending(
        &self,
        batch: &Arc<PendingBatch>,
        kind: MessageKind,
        bytes: usize,
        first: bool,
    ) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        let application = u64::from(kind.is_application());
        if first {
            if !self.fits(&state, bytes) {
                return Err(Refused::Full);
            }
            fence(&mut state);
            charge(&mut state, bytes);
            state.open_batch = None;
            state.entries.push(Entry::Pending {
                batch: batch.clone(),
                application,
            });
            self.wake_writer(state);
            return Ok(());
        }
        let is_place = |entry: &Entry| matches!(entry, Entry::Pending { batch: placed, .. } if Arc::ptr_eq(placed, batch));
        let open = state.entries.iter().rposition(is_place);
        let ready = match open {
            Some(_) => None,
            None => state
                .ready
                .iter()
                .enumerate()
                .rev()
                .find_map(|(chunk, taken)| {
                    Some((chunk, taken.entries.iter().rposition(is_place)?))
                }),
        };
        let found = open.is_some() || ready.is_some();
        if found && !self.fits(&state, bytes) {
            return Err(Refused::Full);
        }
        let place = match (open, ready) {
            (Some(index), _) => {
                charge(&mut state, bytes);
                &mut state.entries[index]
            }
            (None, Some((chunk, index))) => {
                state.messages += 1;
                state.bytes += bytes;
                let taken = &mut state.ready[chunk];
                taken.messages += 1;
                taken.bytes += bytes;
                &mut taken.entries[index]
            }
            // Taken by the writer already.
            (None, None) => return Ok(()),
        };
        if let Entry::Pending {
            application: charged,
            ..
        } = place
        {
            *charged += application;
        }
        // The writer knows already: the place woke it.
        Ok(())
    }
}

/// Counts one message taking `bytes` on the wire as waiting.
fn charge(state: &mut State, bytes: usize) {
    state.messages += 1;
    state.bytes += bytes;
    state.open_messages += 1;
    state.open_bytes += bytes;
}

/// Ends the gathering of the batches whose places are about to get
/// something queued behind them: the one queued last, and the one the
/// writer took last (its place gone, it may still be gathering).
pub(super) fn fence(state: &mut State) {
    if let Some(Entry::Pending { batch, .. }) = state.entries.last() {
        batch.fence();
    }
    if let Some(batch) = state.taken_batch.take() {
        batch.fence();
    }
}
