//! The set of live connections of a server, keyed by verified identity.

use std::{
    net::IpAddr,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use dashmap::DashMap;
use serde::Serialize;

use crate::{
    config::RateLimit,
    error::{DisconnectReason, TransportError},
    session::{Connection, ConnectionInfo},
};

/// Live connections by identity. A second connection of an identity replaces
/// the first, which is told `Disconnect{REQUESTED, "replaced"}`.
#[derive(Debug, Default)]
pub struct ConnectionManager {
    by_identity: DashMap<Arc<str>, Arc<Connection>>,
    /// Every live connection, for broadcasts: rebuilt on the first
    /// broadcast after a change rather than walked out of the map each time.
    everyone: RwLock<Arc<[Arc<Connection>]>>,
    /// The map changed since `everyone` was built.
    changed: AtomicBool,
}

/// Outcome of a broadcast.
#[derive(Debug, Default, Serialize)]
pub struct BroadcastReport {
    /// Identities the frame was queued for, in no particular order.
    pub delivered: Vec<Arc<str>>,
    /// Identities that were dropped, with why. Each was disconnected.
    pub dropped: Vec<DroppedPeer>,
}

/// A broadcast recipient that could not take the frame.
#[derive(Debug, Serialize)]
pub struct DroppedPeer {
    /// The peer.
    pub identity: String,
    /// Why.
    pub reason: String,
}

impl ConnectionManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `connection`; returns the connection it replaced, if any.
    pub fn insert(&self, connection: Arc<Connection>) -> Option<Arc<Connection>> {
        let replaced = self
            .by_identity
            .insert(connection.identity_arc().clone(), connection);
        self.changed.store(true, Ordering::Release);
        if let Some(old) = &replaced {
            old.close(DisconnectReason::Requested, "replaced");
        }
        replaced
    }

    /// Unregisters `connection`, unless it was already replaced by a newer one.
    pub fn remove(&self, connection: &Connection) {
        let removed = self
            .by_identity
            .remove_if(connection.identity(), |_, current| {
                current.id() == connection.id()
            });
        if removed.is_some() {
            // Let go of the connection now, not at the next broadcast; the
            // list stays a valid view for a broadcast reading it meanwhile.
            let mut everyone = self
                .everyone
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            *everyone = everyone
                .iter()
                .filter(|other| other.id() != connection.id())
                .cloned()
                .collect();
            self.changed.store(true, Ordering::Release);
        }
    }

    /// The connection of `identity`.
    pub fn get(&self, identity: &str) -> Option<Arc<Connection>> {
        self.by_identity
            .get(identity)
            .map(|entry| entry.value().clone())
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.by_identity.len()
    }

    /// Whether there is no connection.
    pub fn is_empty(&self) -> bool {
        self.by_identity.is_empty()
    }

    /// Every live connection except the one of `exclude`.
    pub fn snapshot(&self, exclude: Option<&str>) -> Vec<Arc<Connection>> {
        self.by_identity
            .iter()
            .filter(|entry| Some(entry.key().as_ref()) != exclude)
            .map(|entry| entry.value().clone())
            .collect()
    }

    /// Every live connection, shared: no allocation unless the set changed.
    pub(crate) fn everyone(&self) -> Arc<[Arc<Connection>]> {
        if self.changed.load(Ordering::Acquire) {
            // Rebuilt under the write lock, so a slower rebuild from an older
            // view never overwrites a newer one; a change made during the walk
            // sets the flag again for the next call.
            let mut everyone = self
                .everyone
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if self.changed.swap(false, Ordering::AcqRel) {
                *everyone = self
                    .by_identity
                    .iter()
                    .map(|entry| entry.value().clone())
                    .collect();
            }
            return everyone.clone();
        }
        self.everyone
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Metadata and counters of every connection.
    pub fn infos(&self) -> Vec<ConnectionInfo> {
        self.by_identity
            .iter()
            .map(|entry| entry.value().info())
            .collect()
    }

    /// Queues pre-encoded frames on `recipients` without waiting: `signed` for
    /// connections with signed frames, `plain` for the others. A recipient
    /// whose queue is full is disconnected and reported as dropped.
    pub(crate) fn fan_out<'a>(
        recipients: impl Iterator<Item = &'a Arc<Connection>>,
        plain: Option<&Bytes>,
        signed: Option<&Bytes>,
        kind: usize,
    ) -> BroadcastReport {
        let mut report = BroadcastReport::default();
        for connection in recipients {
            let frame = if connection.is_signed() {
                signed
            } else {
                plain
            };
            let result = match frame {
                Some(frame) => connection.try_send_frame(frame.clone(), kind),
                None => Err(TransportError::Config(
                    "no frame for this connection kind".into(),
                )),
            };
            match result {
                Ok(()) => report.delivered.push(connection.identity_arc().clone()),
                Err(err) => report.dropped.push(DroppedPeer {
                    identity: connection.identity().to_owned(),
                    reason: err.to_string(),
                }),
            }
        }
        report
    }
}

/// Per-IP token buckets.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: RateLimit,
    buckets: DashMap<IpAddr, (f64, Instant)>,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: DashMap::new(),
        }
    }

    /// Takes a token for `ip`; false when its bucket is empty.
    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let burst = f64::from(self.limit.burst.max(1));
        if self.buckets.len() > 10_000 {
            // Forget addresses whose bucket has refilled: they are as good as new.
            let refill = self.limit.per_second.max(f64::MIN_POSITIVE);
            self.buckets
                .retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * refill < burst);
        }
        let mut entry = self.buckets.entry(ip).or_insert((burst, now));
        let (tokens, at) = entry.value_mut();
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.limit.per_second).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 3,
            per_second: 0.0,
        });
        let ip = IpAddr::from([127, 0, 0, 1]);
        assert!((0..3).all(|_| limiter.allow(ip)));
        assert!(!limiter.allow(ip));
        assert!(
            limiter.allow(IpAddr::from([127, 0, 0, 2])),
            "buckets are per address"
        );
    }
}
