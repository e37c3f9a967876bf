//! Delivery-acknowledgement bookkeeping (docs/PROTOCOL.md §5.1).

use std::{
    collections::VecDeque,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{sync::oneshot, time::Instant};

/// Delivery acknowledgements of a session that negotiated them
/// (docs/PROTOCOL.md §5.1). Positions count application messages from 1, in
/// the order the writer puts them on the wire; the peer counts the same
/// messages as it hands them to its handler.
#[derive(Debug, Default)]
pub(super) struct Acks {
    /// Application messages the writer has encoded for the wire.
    pub(super) written: AtomicU64,
    /// Highest count the peer has acknowledged.
    pub(super) acked: AtomicU64,
    /// Confirmed sends by position (and since when), waiting for an ack
    /// that covers them.
    pub(super) waiting: Mutex<VecDeque<(u64, Instant, oneshot::Sender<()>)>>,
    /// The peer asked for an ack not yet queued (reader only).
    pub(super) ack_wanted: AtomicBool,
    /// Application messages from the peer whose dispatch has finished: the
    /// count an ack reports (updated by the reader once the handler returns,
    /// so an ack never runs ahead of the handler).
    pub(super) dispatched: AtomicU64,
}

impl Acks {
    /// Applies the peer's ack of `delivered` messages.
    pub(super) fn acknowledge(&self, delivered: u64) -> Result<(), String> {
        let written = self.written.load(Ordering::Acquire);
        let previous = self.acked.load(Ordering::Relaxed);
        if delivered > written || delivered < previous {
            return Err(format!(
                "ack of {delivered} messages; {written} sent, {previous} acknowledged before"
            ));
        }
        self.acked.store(delivered, Ordering::Relaxed);
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        while waiting
            .front()
            .is_some_and(|(position, _, _)| *position <= delivered)
        {
            if let Some((_, _, done)) = waiting.pop_front() {
                // The sender may have stopped waiting; nothing to tell then.
                let _ = done.send(());
            }
        }
        Ok(())
    }

    /// Since when the oldest unconfirmed send has waited.
    pub(super) fn oldest_since(&self) -> Option<Instant> {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.front().map(|(_, since, _)| *since)
    }

    /// Fails every waiting confirmation (their senders see `Unconfirmed`);
    /// returns how many there were.
    pub(super) fn fail_waiting(&self) -> usize {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let failed = waiting.len();
        waiting.clear();
        failed
    }
}
