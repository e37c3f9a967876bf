//! The server's memory of request nonces (docs/PROTOCOL.md §3.4).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use super::MAX_NONCES_PER_KEY;
use crate::{
    crypto::{COMPRESSED_KEY_LEN, Keccak, PublicKey},
    error::HandshakeError,
};

/// Remembers request nonces for the clock window, so a captured request
/// cannot be replayed while its timestamp is still accepted. An unexpired
/// nonce is never forgotten: when the memory is full, or one key holds
/// [`MAX_NONCES_PER_KEY`] of it, new handshakes are refused instead.
#[derive(Debug)]
pub(super) struct NonceCache {
    capacity: usize,
    inner: Mutex<NonceCacheInner>,
}

#[derive(Debug, Default)]
struct NonceCacheInner {
    seen: HashSet<[u8; 32]>,
    /// (forget after, in unix nanos; entry; key), in insertion order.
    expiry: VecDeque<(i64, [u8; 32], [u8; COMPRESSED_KEY_LEN])>,
    /// Unexpired nonces per key.
    per_key: HashMap<[u8; COMPRESSED_KEY_LEN], usize>,
}

impl NonceCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    /// Records (key, nonce): `Ok` if it was new, `Replayed` if seen within
    /// the window, `TooManyHandshakes` if there is no room for it.
    pub(super) fn insert_if_new(
        &self,
        key: &PublicKey,
        nonce: &[u8],
        now_nanos: i64,
        skew: Duration,
    ) -> Result<(), HandshakeError> {
        let mut hasher = Keccak::new();
        hasher.update(key.as_compressed()).update(nonce);
        let entry = hasher.finalize();
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = &mut *guard;
        // Expiry times only grow along the queue (a clock stepping back
        // leaves some entries longer, never shorter, than their window).
        while let Some(&(forget_after, old, old_key)) = inner.expiry.front() {
            if forget_after >= now_nanos {
                break;
            }
            inner.expiry.pop_front();
            inner.seen.remove(&old);
            if let Some(count) = inner.per_key.get_mut(&old_key) {
                *count -= 1;
                if *count == 0 {
                    inner.per_key.remove(&old_key);
                }
            }
        }
        if inner.seen.contains(&entry) {
            return Err(HandshakeError::Replayed);
        }
        let key_bytes = key.to_compressed();
        let held = inner.per_key.get(&key_bytes).copied().unwrap_or(0);
        if held >= MAX_NONCES_PER_KEY {
            return Err(HandshakeError::TooManyHandshakes {
                from_this_key: true,
            });
        }
        if inner.seen.len() >= self.capacity {
            return Err(HandshakeError::TooManyHandshakes {
                from_this_key: false,
            });
        }
        inner.seen.insert(entry);
        *inner.per_key.entry(key_bytes).or_default() += 1;
        // A request is accepted while |timestamp - now| ≤ skew, so it is
        // replayable for at most 2 × skew after we first see it.
        let keep = i64::try_from(skew.as_nanos().saturating_mul(2)).unwrap_or(i64::MAX);
        let forget_after = now_nanos
            .saturating_add(keep)
            .max(inner.expiry.back().map_or(i64::MIN, |last| last.0));
        inner.expiry.push_back((forget_after, entry, key_bytes));
        Ok(())
    }
}
