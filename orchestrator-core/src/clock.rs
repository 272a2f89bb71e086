//! Time: every operation takes `now` from a [`Clock`], so tests move time by hand and never sleep.

use chrono::{DateTime, Duration, DurationRound, TimeZone, Utc};
use std::sync::{Arc, Mutex};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time, truncated to microseconds (what every backend can store exactly).
    fn now(&self) -> DateTime<Utc>;
}

/// Truncates a timestamp to microseconds.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::microseconds(1)).unwrap_or(t)
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        truncate_micros(Utc::now())
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A manual clock at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self { now: Arc::new(Mutex::new(truncate_micros(start))) }
    }

    /// A manual clock at a fixed, well-known instant (2030-01-01T00:00:00Z).
    pub fn at_epoch() -> Self {
        Self::new(Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).single().unwrap_or_else(Utc::now))
    }

    /// Moves the clock forward (or backward with a negative duration).
    pub fn advance(&self, by: Duration) {
        let mut g = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *g += by;
    }

    /// Sets the clock.
    pub fn set(&self, to: DateTime<Utc>) {
        let mut g = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *g = truncate_micros(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}
