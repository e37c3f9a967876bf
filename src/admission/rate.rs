//! The connection rate limit: token buckets per address prefix, charged for
//! failures only, with the attempts in flight counted against them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::Prefix;
use crate::config::RateLimit;

/// Buckets kept per generation; at most twice this many are held.
const RATE_BUCKETS_PER_GENERATION: usize = 32 * 1024;

/// Per-prefix token buckets that charge failures only: admission needs a
/// token but does not take one, and a connection that fails to authenticate
/// takes one, so any number of honest peers behind one address connect
/// while repeated failures from it are throttled. Attempts in flight count
/// against the bucket: a prefix runs at most as many authentications at
/// once as its bucket holds tokens, and further ones wait for one of them to
/// end (a success leaves the token, a failure takes it), so concurrent
/// failures cannot outrun the bucket.
///
/// Hand-written rather than `governor`: its buckets can be checked only by
/// consuming (no peek) and cannot be refunded, which is exactly what this
/// rule needs.
///
/// The map is bounded in size and time without sweeping it: buckets live in
/// two generations; a generation is retired once a bucket untouched since it
/// began would have refilled completely (forgetting it then loses nothing),
/// or early once it holds [`RATE_BUCKETS_PER_GENERATION`] buckets (then a
/// forgotten prefix starts again with a full bucket).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: RateLimit,
    /// How long an untouched bucket takes to refill completely; `None` when
    /// it never does (`per_second = 0`): generations then turn on size only.
    refill: Option<Duration>,
    state: Mutex<Generations>,
    /// Woken whenever an attempt in flight ends.
    released: Notify,
}

#[derive(Debug)]
struct Generations {
    current: HashMap<Prefix, Bucket>,
    previous: HashMap<Prefix, Bucket>,
    started: Instant,
    /// Authentication attempts in flight per prefix; an entry lives only
    /// while its prefix holds pending-handshake slots, so the pool bounds it.
    in_flight: HashMap<Prefix, usize>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let refill = (limit.per_second > 0.0)
            .then(|| f64::from(limit.burst.max(1)) / limit.per_second)
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok());
        Self {
            limit,
            refill,
            state: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
                started: Instant::now(),
                in_flight: HashMap::new(),
            }),
            released: Notify::new(),
        }
    }

    /// Starts an authentication attempt from `prefix`, waiting while its
    /// attempts in flight claim every token of its bucket; `None` (throttled)
    /// once the bucket is empty. Unbounded in time: the caller bounds it by
    /// the handshake deadline.
    pub(crate) async fn attempt(self: &Arc<Self>, prefix: Prefix) -> Option<Attempt> {
        loop {
            // Registered before looking, so that no release goes unseen.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let claimed = self.with_bucket(prefix, |bucket, in_flight| {
                if bucket.tokens < 1.0 {
                    return Some(false);
                }
                let running = in_flight.entry(prefix).or_default();
                if bucket.tokens - (*running as f64) < 1.0 {
                    return None;
                }
                *running += 1;
                Some(true)
            });
            match claimed {
                Some(true) => {
                    return Some(Attempt {
                        claim: Some((self.clone(), prefix)),
                        charge: true,
                    });
                }
                Some(false) => return None,
                None => released.await,
            }
        }
    }

    fn release(&self, prefix: Prefix) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(running) = state.in_flight.get_mut(&prefix) {
                *running = running.saturating_sub(1);
                if *running == 0 {
                    state.in_flight.remove(&prefix);
                }
            }
        }
        self.released.notify_waiters();
    }

    /// Whether `prefix` may open a connection now (its bucket holds a token).
    pub(crate) fn admits(&self, prefix: Prefix) -> bool {
        self.with_bucket(prefix, |bucket, _| bucket.tokens >= 1.0)
    }

    /// Takes a token from `prefix` (a failed or abandoned authentication, or
    /// any connection without authentication); false if it had none.
    pub(crate) fn charge(&self, prefix: Prefix) -> bool {
        self.with_bucket(prefix, |bucket, _| {
            let had = bucket.tokens >= 1.0;
            bucket.tokens = (bucket.tokens - 1.0).max(0.0);
            had
        })
    }

    fn with_bucket<T>(
        &self,
        prefix: Prefix,
        f: impl FnOnce(&mut Bucket, &mut HashMap<Prefix, usize>) -> T,
    ) -> T {
        let now = Instant::now();
        let burst = f64::from(self.limit.burst.max(1));
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *guard;
        let expired = self
            .refill
            .is_some_and(|refill| now.duration_since(state.started) >= refill);
        let mut retired = None;
        if expired || state.current.len() >= RATE_BUCKETS_PER_GENERATION {
            let current = std::mem::take(&mut state.current);
            retired = Some(std::mem::replace(&mut state.previous, current));
            state.started = now;
        }
        let bucket = match state.current.get_mut(&prefix) {
            Some(bucket) => bucket,
            None => {
                let bucket = state.previous.remove(&prefix).unwrap_or(Bucket {
                    tokens: burst,
                    at: now,
                });
                state.current.entry(prefix).or_insert(bucket)
            }
        };
        let refilled = now.duration_since(bucket.at).as_secs_f64() * self.limit.per_second;
        bucket.tokens = (bucket.tokens + refilled).min(burst);
        bucket.at = now;
        let result = f(bucket, &mut state.in_flight);
        drop(guard);
        // Freed outside the lock: the one step that is not O(1).
        drop(retired);
        result
    }
}

/// An authentication attempt in flight: on drop, charges the rate limit
/// unless [`disarm`](Self::disarm)ed (the attempt failed by the peer's
/// doing: silence, a malformed request, a failed authentication or
/// transport handshake), then frees its place for a waiting attempt.
#[derive(Debug)]
pub(crate) struct Attempt {
    claim: Option<(Arc<RateLimiter>, Prefix)>,
    charge: bool,
}

impl Attempt {
    /// An attempt under no rate limit.
    pub(crate) fn unlimited() -> Self {
        Self {
            claim: None,
            charge: false,
        }
    }

    /// The connection authenticated, or ended for reasons not its own
    /// (displaced, server shutting down): nothing is charged.
    pub(crate) fn disarm(&mut self) {
        self.charge = false;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some((limiter, prefix)) = self.claim.take() {
            // Charged first, so that a waiter woken by the release sees it.
            if self.charge {
                limiter.charge(prefix);
            }
            limiter.release(prefix);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn v4(last: u8) -> Prefix {
        Prefix::of(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn bucket_charges_failures_only() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 3,
            per_second: 0.0,
        });
        // Admission alone never empties the bucket.
        assert!((0..100).all(|_| limiter.admits(v4(1))));
        assert!((0..3).all(|_| limiter.charge(v4(1))));
        assert!(!limiter.admits(v4(1)));
        assert!(!limiter.charge(v4(1)));
        assert!(limiter.admits(v4(2)), "buckets are per prefix");
    }

    #[test]
    fn rate_map_stays_bounded_without_refill() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 1,
            per_second: 0.0,
        });
        for n in 0..(3 * RATE_BUCKETS_PER_GENERATION as u32) {
            limiter.charge(Prefix::of(IpAddr::from(n.to_be_bytes())));
        }
        let state = limiter.state.lock().unwrap();
        assert!(state.current.len() + state.previous.len() <= 2 * RATE_BUCKETS_PER_GENERATION);
    }

    #[test]
    fn rate_generation_keeps_recent_buckets() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 1,
            per_second: 0.0,
        });
        assert!(limiter.charge(v4(1)));
        // Fill one generation: v4(1) moves to the previous one, still empty.
        for n in 0..RATE_BUCKETS_PER_GENERATION as u32 {
            limiter.charge(Prefix::of(IpAddr::from(((n + 1) << 8).to_be_bytes())));
        }
        assert!(!limiter.admits(v4(1)), "a recent bucket survives one turn");
    }

    /// A prefix runs no more attempts at once than its bucket holds tokens;
    /// a success frees a place and costs nothing, a failure takes a token.
    #[tokio::test]
    async fn attempts_in_flight_count_against_the_bucket() {
        let limiter = Arc::new(RateLimiter::new(RateLimit {
            burst: 2,
            per_second: 0.0,
        }));
        let bounded = Duration::from_secs(1);
        let mut first = limiter.attempt(v4(1)).await.unwrap();
        let second = limiter.attempt(v4(1)).await.unwrap();
        let third = limiter.attempt(v4(1));
        tokio::pin!(third);
        let waited = futures::FutureExt::now_or_never(third.as_mut());
        assert!(waited.is_none(), "a third attempt waits for a place");
        assert!(limiter.attempt(v4(2)).await.is_some(), "per prefix");
        first.disarm();
        drop(first);
        let third = tokio::time::timeout(bounded, third).await.unwrap().unwrap();
        // Two failures empty the bucket: the next is throttled at once.
        drop((second, third));
        let refused = tokio::time::timeout(bounded, limiter.attempt(v4(1))).await;
        assert!(matches!(refused, Ok(None)), "{refused:?}");
        assert!(limiter.state.lock().unwrap().in_flight.is_empty());
    }
}
