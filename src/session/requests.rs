//! Requests waiting for the peer's reply (docs/PROTOCOL.md §5.2).

use std::{
    collections::HashMap,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::oneshot;

use super::Inbound;

/// Field number of `MessageExt.request_id`.
pub(super) const REQUEST_ID_FIELD: u32 = 102;
/// Field number of `MessageExt.reply_to`.
pub(super) const REPLY_TO_FIELD: u32 = 103;

/// The requests of one session that wait for a reply, by id.
#[derive(Debug)]
pub(super) struct Requests {
    pending: Mutex<HashMap<u64, oneshot::Sender<Inbound>>>,
    /// The next id to hand out; ids start at 1, 0 being "absent" on the wire.
    next_id: AtomicU64,
    /// Requests that may wait at once.
    pub(super) limit: usize,
    /// Replies that named no waiting request.
    unknown: AtomicU64,
}

impl Requests {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            limit: limit.max(1),
            unknown: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<Inbound>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new request's id, and where its reply will arrive; `None` when
    /// `limit` requests already wait. The entry goes when the guard drops.
    pub(super) fn register(&self) -> Option<(Pending<'_>, oneshot::Receiver<Inbound>)> {
        let mut pending = self.lock();
        if pending.len() >= self.limit {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        pending.insert(id, tx);
        Some((Pending { requests: self, id }, rx))
    }

    /// Hands `reply` to the request `id`; false when none waits for it (a
    /// late, repeated or forged reply).
    pub(super) fn complete(&self, id: u64, reply: Inbound) -> bool {
        let waiting = self.lock().remove(&id);
        waiting.is_some_and(|tx| tx.send(reply).is_ok())
    }

    /// Counts a reply to an unknown id; returns how many there were so far.
    pub(super) fn unknown_reply(&self) -> u64 {
        self.unknown.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Requests waiting for a reply.
    pub(super) fn pending(&self) -> usize {
        self.lock().len()
    }

    /// Fails every waiting request (their callers see the connection
    /// closed).
    pub(super) fn fail_all(&self) {
        self.lock().clear();
    }
}

/// A registered request; dropping it forgets the request, whether it was
/// answered, timed out or abandoned.
pub(super) struct Pending<'a> {
    requests: &'a Requests,
    pub(super) id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.requests.lock().remove(&self.id);
    }
}

/// One encoded `MessageExt` id field, appended to a message's encoding
/// (protobuf merges fields that follow a message's own).
pub(super) struct IdField {
    bytes: [u8; 12],
    len: u8,
}

impl IdField {
    /// Field `field` (102 or 103) holding `id`.
    pub(super) fn new(field: u32, id: u64) -> Self {
        let mut bytes = [0; 12];
        let mut buf = &mut bytes[..];
        prost::encoding::encode_key(field, prost::encoding::WireType::Varint, &mut buf);
        prost::encoding::encode_varint(id, &mut buf);
        let len = 12 - buf.len();
        Self {
            bytes,
            len: len as u8,
        }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_fields_encode_as_protobuf_varints() {
        assert_eq!(
            IdField::new(REQUEST_ID_FIELD, 300).as_slice(),
            [0xb0, 0x06, 0xac, 0x02]
        );
        assert_eq!(
            IdField::new(REPLY_TO_FIELD, 1).as_slice(),
            [0xb8, 0x06, 0x01]
        );
        let largest = IdField::new(REPLY_TO_FIELD, u64::MAX);
        assert_eq!(largest.as_slice().len(), 12);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_what_its_callers_drop() {
        let requests = Requests::new(2);
        let (first, _rx1) = requests.register().unwrap();
        let (second, _rx2) = requests.register().unwrap();
        assert_ne!(first.id, second.id);
        assert!(requests.register().is_none(), "full");
        let id = first.id;
        drop(first);
        assert_eq!(requests.pending(), 1);
        let reply = Inbound {
            from: "peer".into(),
            connection_id: 1,
            message: Default::default(),
            reply_to: None,
        };
        assert!(!requests.complete(id, reply), "a forgotten id is unknown");
        assert!(requests.register().is_some());
    }
}
