//! Deadlines from configured durations, which may be as long as
//! `Duration::MAX`: adding one to `Instant::now()` would overflow.

use std::time::Duration;

use tokio::time::Instant;

/// About thirty years: later than any deadline that can come due.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `now + after`, or a deadline that never comes when that overflows.
pub(crate) fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after).unwrap_or_else(|| now + FAR_FUTURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_do_not_overflow() {
        let now = Instant::now();
        assert!(deadline_after(Duration::MAX) > now + Duration::from_secs(86_400));
        let soon = deadline_after(Duration::from_secs(1));
        assert!(soon >= now + Duration::from_secs(1));
        assert!(soon < now + Duration::from_secs(60));
    }
}
