//! A capped pool of write buffers shared by the connections of one server or
//! client. A writer takes a buffer when it has frames to write and gives it
//! back when its queue runs dry, so idle connections hold none and steady
//! traffic reuses the same few allocations.

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicUsize, Ordering},
};

use bytes::BytesMut;

/// Turns `buffer` into the reference-counted form `bytes` uses once a buffer
/// is shared, if it is not already in it (a cheap no-op then).
///
/// A buffer in that form freezes, slices and turns back into a `BytesMut`
/// with no allocation; a fresh one allocates its counter each time it is
/// frozen. Pooled buffers are written, frozen into slices and reused on every
/// write, so they are converted once, when made. (`bytes` reverts a buffer to
/// the plain form when `reserve` reallocates it; callers convert it again.)
pub(crate) fn make_shareable(buffer: &mut BytesMut) {
    if buffer.capacity() > 0 {
        drop(buffer.split_to(0));
    }
}

/// Buffers kept for reuse.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<BytesMut>>,
    max_free: usize,
    capacity: usize,
    in_use: AtomicUsize,
}

impl BufferPool {
    /// A pool of buffers of `capacity` bytes, keeping at most `max_free` idle ones.
    pub fn new(capacity: usize, max_free: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            max_free,
            capacity,
            in_use: AtomicUsize::new(0),
        }
    }

    /// An empty buffer, reused when one is free.
    pub fn take(&self) -> BytesMut {
        self.in_use.fetch_add(1, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| {
                let mut buffer = BytesMut::with_capacity(self.capacity);
                make_shareable(&mut buffer);
                buffer
            })
    }

    /// Returns a buffer. Buffers grown far beyond the usual size (a huge
    /// message went through) are dropped rather than kept.
    pub fn give(&self, mut buffer: BytesMut) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        buffer.clear();
        if buffer.capacity() < self.capacity || buffer.capacity() > 8 * self.capacity {
            return;
        }
        // One that grew was reallocated in the plain form.
        make_shareable(&mut buffer);
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.max_free {
            free.push(buffer);
        }
    }

    /// Buffers in use / (in use + free); 0 when the pool is untouched.
    pub fn utilization(&self) -> f64 {
        let in_use = self.in_use.load(Ordering::Relaxed) as f64;
        let free = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as f64;
        if in_use + free == 0.0 {
            0.0
        } else {
            in_use / (in_use + free)
        }
    }

    /// Buffers currently lent out.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_returned_buffers() {
        let pool = BufferPool::new(1024, 4);
        let mut buffer = pool.take();
        buffer.extend_from_slice(b"hello");
        let address = buffer.as_ptr();
        pool.give(buffer);
        let again = pool.take();
        assert_eq!(again.as_ptr(), address, "the same allocation comes back");
        assert!(again.is_empty());
        assert_eq!(pool.utilization(), 1.0);
        pool.give(again);
        assert_eq!(pool.utilization(), 0.0);
    }

    #[test]
    fn drops_oversized_buffers_and_caps_the_free_list() {
        let pool = BufferPool::new(64, 1);
        let mut big = pool.take();
        big.reserve(64 * 64);
        pool.give(big);
        assert_eq!(pool.free.lock().unwrap().len(), 0);
        let (a, b) = (pool.take(), pool.take());
        pool.give(a);
        pool.give(b);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }
}
