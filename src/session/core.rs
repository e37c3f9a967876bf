//! The session's timers as a sans-IO state machine: no clock is read here,
//! `now` comes in as an argument, and [`Health::poll_timeout`] says when to
//! call [`Health::handle_timeout`] next (as quinn-proto's connection does).
//! The reader drives it with one sleep; tests step it with any instants.

use std::time::Duration;

use tokio::time::Instant;

/// What the session must do when a deadline passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HealthAction {
    /// Send a `Ping`: nothing received for the ping interval.
    Ping,
    /// Close with `READ_TIMEOUT`: nothing received for the read timeout.
    Idle(Duration),
    /// Close with `READ_TIMEOUT`: a confirmed send waited the read timeout
    /// for its acknowledgement (a peer that answers pings with its handler
    /// stuck would otherwise keep it waiting forever).
    Unacknowledged(Duration),
}

/// Idle eviction, pings and acknowledgement waits of one session.
#[derive(Debug)]
pub(crate) struct Health {
    read_timeout: Duration,
    ping_interval: Option<Duration>,
    last_received: Instant,
    last_ping: Option<Instant>,
    /// An eviction was decided: no further deadlines.
    done: bool,
}

impl Health {
    pub(crate) fn new(
        read_timeout: Duration,
        ping_interval: Option<Duration>,
        now: Instant,
    ) -> Self {
        Self {
            read_timeout,
            ping_interval,
            last_received: now,
            last_ping: None,
            done: false,
        }
    }

    /// Something arrived from the peer at `now`.
    pub(crate) fn received(&mut self, now: Instant) {
        self.last_received = now;
        self.last_ping = None;
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called,
    /// given since when the oldest confirmed send has waited. Deadlines only
    /// move later as frames arrive, so a driver may sleep until this and
    /// ask again when it fires.
    pub(crate) fn poll_timeout(&self, unconfirmed_since: Option<Instant>) -> Option<Instant> {
        if self.done {
            return None;
        }
        // Deadlines beyond what the clock can represent never come.
        let ping_at = self.ping_interval.and_then(|interval| {
            self.last_ping
                .unwrap_or(self.last_received)
                .checked_add(interval)
        });
        let ack_at = unconfirmed_since.and_then(|since| since.checked_add(self.read_timeout));
        [
            self.last_received.checked_add(self.read_timeout),
            ping_at,
            ack_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// What is due at `now`, if anything.
    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        unconfirmed_since: Option<Instant>,
    ) -> Option<HealthAction> {
        if self.done {
            return None;
        }
        let idle = now.saturating_duration_since(self.last_received);
        if idle >= self.read_timeout {
            self.done = true;
            return Some(HealthAction::Idle(idle));
        }
        if let Some(since) = unconfirmed_since {
            let waited = now.saturating_duration_since(since);
            if waited >= self.read_timeout {
                self.done = true;
                return Some(HealthAction::Unacknowledged(waited));
            }
        }
        if let Some(interval) = self.ping_interval
            && idle >= interval
            && self
                .last_ping
                .is_none_or(|at| now.saturating_duration_since(at) >= interval)
        {
            self.last_ping = Some(now);
            return Some(HealthAction::Ping);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Steps `health` to each deadline it asks for until `until`, returning
    /// what happened when.
    fn run(
        health: &mut Health,
        start: Instant,
        until: Duration,
        unconfirmed: Option<Instant>,
    ) -> Vec<(Duration, HealthAction)> {
        let mut seen = Vec::new();
        for _ in 0..100 {
            let Some(at) = health.poll_timeout(unconfirmed) else {
                break;
            };
            if at > start + until {
                break;
            }
            if let Some(action) = health.handle_timeout(at, unconfirmed) {
                seen.push((at - start, action));
            }
        }
        seen
    }

    #[test]
    fn a_silent_peer_is_pinged_each_interval_then_evicted() {
        let start = Instant::now();
        let mut health = Health::new(30 * SECOND, Some(15 * SECOND), start);
        let seen = run(&mut health, start, 60 * SECOND, None);
        assert_eq!(
            seen,
            [
                (15 * SECOND, HealthAction::Ping),
                (30 * SECOND, HealthAction::Idle(30 * SECOND)),
            ]
        );
        assert_eq!(health.poll_timeout(None), None, "nothing after eviction");
    }

    #[test]
    fn traffic_postpones_pings_and_eviction() {
        let start = Instant::now();
        let mut health = Health::new(30 * SECOND, Some(15 * SECOND), start);
        // A deadline computed before traffic fires early: nothing is due.
        let first = health.poll_timeout(None).unwrap();
        assert_eq!(first, start + 15 * SECOND);
        health.received(start + 10 * SECOND);
        assert_eq!(health.handle_timeout(first, None), None);
        assert_eq!(health.poll_timeout(None), Some(start + 25 * SECOND));
        assert_eq!(
            health.handle_timeout(start + 25 * SECOND, None),
            Some(HealthAction::Ping)
        );
        // A pong resets the clock.
        health.received(start + 26 * SECOND);
        assert_eq!(health.poll_timeout(None), Some(start + 41 * SECOND));
    }

    #[test]
    fn timeouts_beyond_the_clock_never_fire() {
        let start = Instant::now();
        let health = Health::new(Duration::MAX, Some(Duration::MAX), start);
        assert_eq!(health.poll_timeout(Some(start)), None);
    }

    #[test]
    fn without_pings_only_the_read_timeout_applies() {
        let start = Instant::now();
        let mut health = Health::new(5 * SECOND, None, start);
        assert_eq!(
            run(&mut health, start, 60 * SECOND, None),
            [(5 * SECOND, HealthAction::Idle(5 * SECOND))]
        );
    }

    #[test]
    fn an_unanswered_confirmation_evicts_a_peer_that_still_talks() {
        let start = Instant::now();
        let mut health = Health::new(30 * SECOND, Some(15 * SECOND), start);
        let since = start + 5 * SECOND;
        // The peer answers every ping, but never acknowledges.
        let mut evicted = None;
        for _ in 0..10 {
            let at = health.poll_timeout(Some(since)).unwrap();
            match health.handle_timeout(at, Some(since)) {
                Some(HealthAction::Ping) => health.received(at),
                Some(action) => {
                    evicted = Some((at - start, action));
                    break;
                }
                None => {}
            }
        }
        assert_eq!(
            evicted,
            Some((35 * SECOND, HealthAction::Unacknowledged(30 * SECOND)))
        );
    }
}
