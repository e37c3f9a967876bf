//! Admission of new connections, decided before any expensive work: the
//! connection rate limit and the pool of pending handshakes, both keyed by
//! address prefix (/32 for IPv4, /64 for IPv6), since one host or one IPv6
//! subnet is one party however many addresses it uses.

mod rate;

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
};

pub(crate) use rate::{Attempt, RateLimiter};

use tokio_util::sync::CancellationToken;

use tracing::info;

use crate::{
    backend::{Listener, Pipe},
    config::ServerConfig,
    error::DisconnectReason,
    metrics::Metrics,
    session::{refuse_after_handshake, send_disconnect},
};

/// Refuses a connection before establishing it. Where the pipe costs
/// nothing (plain TCP, gRPC) the peer is told why: with authentication on as
/// a refused handshake is, so that every client can say why (a
/// `HandshakeResponse` with `accepted: false` and `error: "<reason>:
/// <details>"`, then `Disconnect{reason, details}`); without, with the bare
/// `Disconnect`. Over TLS and QUIC the connection is closed (QUIC: refused)
/// before its transport handshake, without a message: no work is spent on it.
pub(crate) async fn refuse_early<L: Listener>(
    connecting: L::Connecting,
    authenticating: bool,
    metrics: &Metrics,
    config: &ServerConfig,
    reason: DisconnectReason,
    details: &str,
) {
    info!(%reason, details, "connection refused");
    metrics.connection(&format!("refused_{reason}"));
    let Ok(Pipe { mut writer, .. }) = L::pipe_now(connecting) else {
        return;
    };
    let timeout = config.disconnect_timeout;
    if !authenticating {
        return send_disconnect(&mut writer, reason, details, timeout).await;
    }
    let error = format!("{reason}: {details}");
    refuse_after_handshake(&mut writer, reason, &error, details, timeout).await;
}

/// The party a connection is counted against: an IPv4 address or an IPv6
/// /64. IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Prefix(IpAddr);

impl Prefix {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let masked = u128::from(v6) & !u128::from(u64::MAX);
                Self(IpAddr::V6(Ipv6Addr::from(masked)))
            }
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}/32"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why no pending-handshake slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingRefusal {
    /// The prefix already holds its share of the pool.
    PrefixFull,
    /// The pool is full and no prefix holds more slots than this one.
    PoolFull,
}

/// The pool of handshakes in progress. No prefix holds more than its share;
/// when the pool is full, a newcomer takes a slot from the prefixes holding
/// the most, if that is more than its own prefix holds: of theirs, the
/// oldest. An address with nothing pending thus always gets a slot, and a
/// flood from many addresses displaces the oldest pending handshakes first:
/// a handshake survives until as many newcomers as the pool holds (or, from
/// an address holding more than others, fewer) have arrived after it, which
/// an honest handshake of milliseconds outlasts; it is not immune.
#[derive(Debug)]
pub(crate) struct PendingHandshakes {
    capacity: usize,
    per_prefix: usize,
    state: Mutex<PendingState>,
}

#[derive(Debug, Default)]
struct PendingState {
    total: usize,
    next_id: u64,
    /// Slots by prefix, oldest first.
    by_prefix: HashMap<Prefix, VecDeque<(u64, CancellationToken)>>,
    /// [`Holder`] of every prefix holding any: the victim is the last,
    /// found without a walk.
    by_count: BTreeSet<Holder>,
}

/// A prefix's rank as a victim: most slots first, then the oldest slot
/// (ids grow, so a smaller oldest id ranks higher), so that the last is the
/// oldest slot of the largest holders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Holder {
    held: usize,
    oldest: std::cmp::Reverse<u64>,
    prefix: Prefix,
}

impl PendingState {
    fn holder(&self, prefix: Prefix) -> Option<Holder> {
        let slots = self.by_prefix.get(&prefix)?;
        let &(oldest, _) = slots.front()?;
        Some(Holder {
            held: slots.len(),
            oldest: std::cmp::Reverse(oldest),
            prefix,
        })
    }

    /// Re-ranks `prefix` after its slots changed from `before`.
    fn rerank(&mut self, prefix: Prefix, before: Option<Holder>) {
        if let Some(before) = before {
            self.by_count.remove(&before);
        }
        if let Some(after) = self.holder(prefix) {
            self.by_count.insert(after);
        }
    }

    fn remove(&mut self, prefix: Prefix, id: u64) -> bool {
        let before = self.holder(prefix);
        let Some(slots) = self.by_prefix.get_mut(&prefix) else {
            return false;
        };
        let Some(at) = slots.iter().position(|(slot, _)| *slot == id) else {
            return false;
        };
        slots.remove(at);
        if slots.is_empty() {
            self.by_prefix.remove(&prefix);
        }
        self.rerank(prefix, before);
        self.total -= 1;
        true
    }
}

impl PendingHandshakes {
    pub(crate) fn new(capacity: usize, per_prefix: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Self {
            capacity,
            per_prefix: per_prefix.clamp(1, capacity),
            state: Mutex::default(),
        })
    }

    /// A slot for a handshake from `prefix`. It is given back when dropped;
    /// [`PendingSlot::evicted`] resolves if a newcomer takes it over.
    pub(crate) fn acquire(self: &Arc<Self>, prefix: Prefix) -> Result<PendingSlot, PendingRefusal> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let held = state.by_prefix.get(&prefix).map_or(0, VecDeque::len);
        if held >= self.per_prefix {
            return Err(PendingRefusal::PrefixFull);
        }
        if state.total >= self.capacity {
            let Some(&Holder {
                held: most,
                prefix: victim,
                ..
            }) = state.by_count.last()
            else {
                return Err(PendingRefusal::PoolFull);
            };
            if most <= held {
                return Err(PendingRefusal::PoolFull);
            }
            let oldest = state
                .by_prefix
                .get(&victim)
                .and_then(|s| s.front())
                .cloned();
            if let Some((id, evicted)) = oldest {
                state.remove(victim, id);
                evicted.cancel();
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        let before = state.holder(prefix);
        state
            .by_prefix
            .entry(prefix)
            .or_default()
            .push_back((id, evicted.clone()));
        state.rerank(prefix, before);
        state.total += 1;
        Ok(PendingSlot {
            pool: self.clone(),
            prefix,
            id,
            evicted,
        })
    }

    /// Handshakes in progress.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// A pending handshake's place in the pool.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    pool: Arc<PendingHandshakes>,
    prefix: Prefix,
    id: u64,
    evicted: CancellationToken,
}

impl PendingSlot {
    /// Resolves once a newcomer has taken this slot over.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await;
    }

    /// Cancelled once a newcomer has taken this slot over.
    pub(crate) fn evicted_token(&self) -> CancellationToken {
        self.evicted.clone()
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut state = self
            .pool
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.remove(self.prefix, self.id);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    type Hook = Box<dyn Fn(&str) + Send>;

    /// Runs between a server's handshake and the registration of the
    /// connection: where a trust change used to go unseen.
    static BEFORE_REGISTER: Mutex<Option<Hook>> = Mutex::new(None);

    pub(crate) fn before_register(identity: &str) {
        if let Some(hook) = &*BEFORE_REGISTER
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            hook(identity);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_removed_between_handshake_and_registration_is_disconnected() {
        use crate::{
            ClientAuth, ClientConfig, ConnectionEvent, SecretKey, ServerAuth, ServerConfig,
            TcpBackend, TransportClient, TransportServer, TrustStore,
        };
        // Only this identity is touched: other tests may run servers too.
        const REVOKED: &str = "revoked-in-the-window";
        let trust = Arc::new(TrustStore::new());
        let client_key = Arc::new(SecretKey::generate());
        trust.add(REVOKED, client_key.public_key().clone()).unwrap();
        let hooked = trust.clone();
        *BEFORE_REGISTER.lock().unwrap() = Some(Box::new(move |identity| {
            if identity == REVOKED {
                hooked.remove(identity);
                // Lets the trust watcher look before the registration and
                // find nothing, so that only the re-check after it can catch
                // the change (no event says the watcher has looked; passing
                // does not depend on this wait). Blocking in place hands this
                // worker's queue, the woken watcher in it, to another thread.
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(100)));
            }
        }));
        let server_key = Arc::new(SecretKey::generate());
        let server = TransportServer::new(
            TcpBackend::default(),
            ServerConfig::default()
                .with_listen_addr("127.0.0.1:0")
                .with_rate_limit(None),
            Some(ServerAuth::new(server_key.clone(), trust)),
        );
        let addr = server.start().await.unwrap();
        let mut config = ClientConfig::default().with_client_id(REVOKED);
        config.auto_reconnect = false;
        let client = TransportClient::new(
            TcpBackend::default(),
            config,
            Some(ClientAuth::new(client_key).with_server_key(server_key.public_key().clone())),
        );
        let mut events = client.events();
        let bounded = Duration::from_secs(10);
        // Accepted (the response goes out first), then cut off.
        tokio::time::timeout(bounded, client.connect(&addr.to_string()))
            .await
            .unwrap()
            .unwrap();
        let end = tokio::time::timeout(bounded, async {
            loop {
                if let Ok(event @ ConnectionEvent::Disconnected { .. }) = events.recv().await {
                    return event;
                }
            }
        })
        .await
        .expect("the revoked key is disconnected");
        assert!(
            matches!(
                end,
                ConnectionEvent::Disconnected {
                    reason: DisconnectReason::AuthFailure,
                    by_peer: true,
                    ..
                }
            ),
            "{end:?}"
        );
        *BEFORE_REGISTER.lock().unwrap() = None;
        server.stop().await.unwrap();
    }

    fn v4(last: u8) -> Prefix {
        Prefix::of(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn prefixes_are_v4_addresses_and_v6_slash_64s() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Prefix::of(a), Prefix::of(b));
        assert_ne!(Prefix::of(a), Prefix::of(c));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(Prefix::of(mapped), v4(1));
        assert_ne!(v4(1), v4(2));
        assert_eq!(Prefix::of(a).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn prefix_share_is_capped() {
        let pool = PendingHandshakes::new(8, 2);
        let _a = pool.acquire(v4(1)).unwrap();
        let _b = pool.acquire(v4(1)).unwrap();
        assert_eq!(pool.acquire(v4(1)).unwrap_err(), PendingRefusal::PrefixFull);
        let c = pool.acquire(v4(2)).unwrap();
        drop(c);
        assert_eq!(pool.len(), 2);
    }

    /// Among holders tied for the most, the oldest slot goes, whatever the
    /// addresses: a handshake from a high address outlives newer churn.
    #[test]
    fn full_pool_evicts_the_oldest_of_tied_holders_not_the_highest_address() {
        let pool = PendingHandshakes::new(8, 2);
        let flood: Vec<_> = (2..10).map(|n| pool.acquire(v4(n)).unwrap()).collect();
        let honest = pool.acquire(v4(200)).unwrap();
        assert!(flood[0].evicted.is_cancelled(), "the oldest made room");
        let mut churn = Vec::new();
        for (n, from) in (100..106).enumerate() {
            churn.push(pool.acquire(v4(from)).unwrap());
            assert!(flood[n + 1].evicted.is_cancelled(), "churn {n}");
            assert!(
                !honest.evicted.is_cancelled(),
                "honest evicted by churn {n}"
            );
        }
        assert_eq!(pool.len(), 8);
    }

    #[tokio::test]
    async fn full_pool_evicts_the_largest_holder_for_a_newcomer() {
        let pool = PendingHandshakes::new(4, 3);
        let flood: Vec<_> = (0..3).map(|_| pool.acquire(v4(9)).unwrap()).collect();
        let other = pool.acquire(v4(8)).unwrap();
        assert_eq!(pool.len(), 4);
        // An address with nothing pending displaces the oldest of the largest.
        let honest = pool.acquire(v4(1)).unwrap();
        assert_eq!(pool.len(), 4);
        tokio::time::timeout(Duration::from_secs(1), flood[0].evicted())
            .await
            .expect("the flood's oldest slot is taken over");
        assert!(!flood[1].evicted.is_cancelled());
        // Counts are now 2 (flood), 1, 1: a holder of 1 cannot displace 2…
        let second_honest = pool.acquire(v4(1)).unwrap();
        // …but it could: 2 > 1. The flood is down to one.
        assert!(flood[1].evicted.is_cancelled());
        // Everyone holds one or two; v4(1) holds two now, the most.
        assert_eq!(pool.acquire(v4(1)).unwrap_err(), PendingRefusal::PoolFull);
        drop((flood, other, honest, second_honest));
        assert_eq!(pool.len(), 0);
    }
}
