//! A reusable retry policy: exponential backoff with jitter, a retryable-error
//! predicate, one log line per retry. The retry loop itself is `backon`'s;
//! this module supplies the delays with the Go package's exact formula.

use std::{future::Future, time::Duration};

use backon::{BackoffBuilder, Retryable};
use rand::Rng;
use tracing::warn;

/// Random part added to each delay.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// No jitter: exact delays (tests, predictable schedules).
    None,
    /// Uniform in `[0, delay / 2)`, as the Go package's `ConnectWithRetry`.
    #[default]
    UpToHalf,
    /// Uniform in `[0, delay)`.
    Full,
}

/// Exponential backoff: the wait before retry `n` (n ≥ 1) is
/// `min(initial × multiplier^(n−1), max_delay)` plus jitter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetryPolicy {
    /// Wait before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Growth per retry.
    pub multiplier: f64,
    /// Cap of the wait, before jitter.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Retries after the first attempt; `None` retries forever.
    pub max_retries: Option<u32>,
    /// Random part of each wait.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// The Go client's reconnect schedule: 5 s doubling to 1 minute, 5 retries.
    fn default() -> Self {
        Self::go_connect(Duration::from_secs(5), 5)
    }
}

impl RetryPolicy {
    /// `ConnectWithRetry(addr, max_retries)` of the Go client: `max_retries + 1`
    /// attempts; waits start at `reconnect_delay` (1 s if zero), double, cap at
    /// one minute, plus jitter in `[0, delay/2)`.
    pub fn go_connect(reconnect_delay: Duration, max_retries: u32) -> Self {
        Self {
            initial: if reconnect_delay.is_zero() {
                Duration::from_secs(1)
            } else {
                reconnect_delay
            },
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            max_retries: Some(max_retries),
            jitter: Jitter::UpToHalf,
        }
    }

    /// Sets the retry limit (`None`: forever).
    pub fn with_max_retries(mut self, max_retries: Option<u32>) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// Sets the jitter.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The wait before retry `retry` (1-based), without jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(64) as i32;
        let factor = self.multiplier.max(1.0).powi(exponent);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max_delay.as_secs_f64());
        // Durations near `Duration::MAX` round up past it as `f64`.
        Duration::try_from_secs_f64(secs.max(0.0))
            .unwrap_or(Duration::MAX)
            .min(self.max_delay)
    }

    /// The wait before retry `retry` (1-based), jitter included.
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self.base_delay(retry);
        let spread = match self.jitter {
            Jitter::None => Duration::ZERO,
            Jitter::UpToHalf => base / 2,
            Jitter::Full => base,
        };
        if spread.is_zero() {
            return base;
        }
        base.saturating_add(rand::rng().random_range(Duration::ZERO..spread))
    }

    /// Runs `operation` until it succeeds, fails with an error `retryable`
    /// refuses, or the retries are used up. Logs one line per retry, e.g.
    /// `retry: connect caught connection refused (1/5)`.
    pub async fn retry<T, E, F, Fut>(
        &self,
        what: &str,
        operation: F,
        retryable: impl FnMut(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut retries = 0u32;
        let limit = self
            .max_retries
            .map_or_else(|| "∞".to_owned(), |max| max.to_string());
        operation
            .retry(self.clone())
            .sleep(tokio::time::sleep)
            .when(retryable)
            .notify(|err: &E, wait: Duration| {
                retries += 1;
                warn!(
                    wait_ms = wait.as_millis() as u64,
                    "retry: {what} caught {err} ({retries}/{limit})"
                );
            })
            .await
    }
}

/// The waits of one run of a [`RetryPolicy`].
#[derive(Debug)]
pub struct Delays {
    policy: RetryPolicy,
    retry: u32,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.policy.max_retries.is_some_and(|max| self.retry >= max) {
            return None;
        }
        self.retry += 1;
        Some(self.policy.delay(self.retry))
    }
}

impl BackoffBuilder for RetryPolicy {
    type Backoff = Delays;

    fn build(self) -> Delays {
        Delays {
            policy: self,
            retry: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_schedule_doubles_and_caps() {
        let policy = RetryPolicy::go_connect(Duration::from_secs(5), 10).with_jitter(Jitter::None);
        let waits: Vec<u64> = policy.clone().build().map(|d| d.as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60, 60, 60, 60, 60]);
    }

    #[test]
    fn zero_delay_starts_at_one_second() {
        let policy = RetryPolicy::go_connect(Duration::ZERO, 1);
        assert_eq!(policy.base_delay(1), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_below_half_the_delay() {
        let policy = RetryPolicy::go_connect(Duration::from_millis(100), 3);
        for retry in 1..=3 {
            let base = policy.base_delay(retry);
            for _ in 0..200 {
                let delay = policy.delay(retry);
                assert!(
                    delay >= base && delay < base + base / 2,
                    "{delay:?} vs {base:?}"
                );
            }
        }
    }

    #[test]
    fn attempts_are_max_retries_plus_one() {
        let policy = RetryPolicy::go_connect(Duration::from_millis(1), 3).with_jitter(Jitter::None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut attempts = 0;
        let result: Result<(), String> = runtime.block_on(policy.retry(
            "test",
            || {
                attempts += 1;
                async { Err("nope".to_owned()) }
            },
            |_| true,
        ));
        assert!(result.is_err());
        assert_eq!(attempts, 4);
    }

    #[test]
    fn non_retryable_errors_stop_at_once() {
        let policy = RetryPolicy::go_connect(Duration::from_millis(1), 3);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut attempts = 0;
        let _: Result<(), String> = runtime.block_on(policy.retry(
            "test",
            || {
                attempts += 1;
                async { Err("fatal".to_owned()) }
            },
            |_| false,
        ));
        assert_eq!(attempts, 1);
    }
}
