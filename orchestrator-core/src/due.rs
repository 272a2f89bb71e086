//! Times at which work this process knows about becomes claimable (not-before times, retry times), so
//! that claimers waiting for work wake when such a time comes instead of on their polling fallback.

use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::sync::Mutex;

/// At most this many future times are remembered; the farthest are dropped first (claimers then find
/// that work on their polling fallback, as they would after a restart).
const MAX_TIMES: usize = 10_000;

/// Future due times, soonest first.
#[derive(Debug, Default)]
pub(crate) struct DueTimes {
    times: Mutex<BTreeSet<DateTime<Utc>>>,
}

impl DueTimes {
    /// Remembers `at` when it lies after `now`.
    pub(crate) fn add(&self, at: Option<DateTime<Utc>>, now: DateTime<Utc>) {
        let Some(at) = at else { return };
        if at <= now {
            return;
        }
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times.insert(at);
        while times.len() > MAX_TIMES {
            times.pop_last();
        }
    }

    /// The soonest remembered time after `now`, forgetting those at or before it.
    pub(crate) fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(first) = times.first().copied() {
            if first > now {
                return Some(first);
            }
            times.pop_first();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn keeps_only_future_times_soonest_first() {
        let d = DueTimes::default();
        let now = Utc::now();
        d.add(Some(now - Duration::seconds(1)), now);
        d.add(None, now);
        assert_eq!(d.next_after(now), None);
        d.add(Some(now + Duration::seconds(5)), now);
        d.add(Some(now + Duration::seconds(2)), now);
        assert_eq!(d.next_after(now), Some(now + Duration::seconds(2)));
        assert_eq!(d.next_after(now + Duration::seconds(2)), Some(now + Duration::seconds(5)));
        assert_eq!(d.next_after(now + Duration::seconds(5)), None);
    }

    #[test]
    fn is_bounded() {
        let d = DueTimes::default();
        let now = Utc::now();
        for i in 1..=(MAX_TIMES as i64 + 10) {
            d.add(Some(now + Duration::seconds(i)), now);
        }
        assert_eq!(d.times.lock().unwrap().len(), MAX_TIMES);
        assert_eq!(d.next_after(now), Some(now + Duration::seconds(1)));
    }
}
