//! Sliding-window rate limiting per client (a log of request instants over the last minute).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Clients whose windows emptied are dropped every this many checks.
const SWEEP_EVERY: u64 = 1024;

#[derive(Debug, Default)]
struct Inner {
    clients: HashMap<String, VecDeque<Instant>>,
    checks: u64,
}

/// At most `limit` requests per client in any 60-second window.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: usize,
    inner: Mutex<Inner>,
}

impl RateLimiter {
    pub(crate) fn new(per_min: u32) -> Self {
        RateLimiter { limit: per_min.max(1) as usize, inner: Mutex::new(Inner::default()) }
    }

    /// Admits a request from `client` at `now`, or says how long to wait.
    pub(crate) fn check(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.checks += 1;
        if inner.checks % SWEEP_EVERY == 0 {
            inner.clients.retain(|_, q| q.back().is_some_and(|t| now.saturating_duration_since(*t) < WINDOW));
        }
        let q = inner.clients.entry(client.to_string()).or_default();
        while q.front().is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW) {
            q.pop_front();
        }
        if q.len() >= self.limit {
            let oldest = q.front().copied().unwrap_or(now);
            let wait = (oldest + WINDOW).saturating_duration_since(now);
            // Round up to whole seconds for Retry-After.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(Duration::from_secs(secs.max(1)));
        }
        q.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window() {
        let rl = RateLimiter::new(2);
        let t0 = Instant::now();
        assert!(rl.check("a", t0).is_ok());
        assert!(rl.check("a", t0 + Duration::from_secs(30)).is_ok());
        let wait = rl.check("a", t0 + Duration::from_secs(31)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(29));
        assert!(rl.check("b", t0 + Duration::from_secs(31)).is_ok(), "clients are independent");
        assert!(rl.check("a", t0 + Duration::from_secs(60)).is_ok(), "the first request left the window");
        assert!(rl.check("a", t0 + Duration::from_secs(61)).is_err());
    }
}
