//! Log followers and long polls: a wake-up signal per run ([`RunNotifier`]), so an append to one run wakes
//! only that run's followers, and a cap on the streams and long polls one caller holds at once
//! ([`StreamLimiter`], `ORCH_MAX_STREAMS_PER_CALLER`).

use crate::error::ApiError;
use crate::metrics::Metrics;
use orchestrator_core::ids::RunId;
use orchestrator_core::Notifier;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One [`Notifier`] per followed run, kept while someone follows it.
#[derive(Debug, Default)]
pub(crate) struct RunNotifier {
    runs: Mutex<HashMap<RunId, (Notifier, usize)>>,
}

impl RunNotifier {
    /// Follows `run_id` until the subscription is dropped.
    pub(crate) fn subscribe(self: &Arc<Self>, run_id: RunId) -> RunSubscription {
        let mut runs = lock(&self.runs);
        let entry = runs.entry(run_id).or_insert_with(|| (Notifier::new(), 0));
        entry.1 += 1;
        RunSubscription { bus: self.clone(), run_id, notifier: entry.0.clone() }
    }

    /// Wakes the followers of `run_id` (nobody else).
    pub(crate) fn notify(&self, run_id: RunId) {
        if let Some((n, _)) = lock(&self.runs).get(&run_id) {
            n.notify();
        }
    }

    /// How many runs are followed now.
    #[cfg(test)]
    fn followed(&self) -> usize {
        lock(&self.runs).len()
    }
}

/// A follower's wake-up signal for one run.
#[derive(Debug)]
pub(crate) struct RunSubscription {
    bus: Arc<RunNotifier>,
    run_id: RunId,
    notifier: Notifier,
}

impl RunSubscription {
    /// See [`Notifier::generation`].
    pub(crate) fn generation(&self) -> u64 {
        self.notifier.generation()
    }

    /// See [`Notifier::wait_changed`].
    pub(crate) async fn wait_changed(&self, seen: u64, timeout: Duration) -> bool {
        self.notifier.wait_changed(seen, timeout).await
    }
}

impl Drop for RunSubscription {
    fn drop(&mut self) {
        let mut runs = lock(&self.bus.runs);
        if let Some(entry) = runs.get_mut(&self.run_id) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                runs.remove(&self.run_id);
            }
        }
    }
}

/// Counts the log streams and long polls each caller holds, refusing more than `max` at once.
#[derive(Debug)]
pub(crate) struct StreamLimiter {
    max: usize,
    held: Mutex<HashMap<String, usize>>,
    metrics: Arc<Metrics>,
}

/// How long a refused caller is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(5);

impl StreamLimiter {
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(StreamLimiter { max, held: Mutex::new(HashMap::new()), metrics })
    }

    /// A permit for one more stream or long poll of `caller` (released when dropped), or a 429.
    pub(crate) fn acquire(self: &Arc<Self>, caller: &str) -> Result<StreamPermit, ApiError> {
        let mut held = lock(&self.held);
        let n = held.entry(caller.to_string()).or_insert(0);
        if *n >= self.max {
            let max = self.max;
            tracing::warn!(client = %caller, max, "too many concurrent streams or long polls");
            let mut e = ApiError::rate_limited(RETRY_AFTER);
            e.message = format!(
                "at most {max} log streams and long polls at once per caller (ORCH_MAX_STREAMS_PER_CALLER); close \
                 one or retry later"
            );
            self.metrics.record_stream_refused();
            return Err(e);
        }
        *n += 1;
        self.metrics.record_stream_held(true);
        Ok(StreamPermit { limiter: self.clone(), caller: caller.to_string() })
    }

    /// Streams and long polls held now, all callers together.
    #[cfg(test)]
    fn active(&self) -> usize {
        lock(&self.held).values().sum()
    }
}

/// One held stream or long poll.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    limiter: Arc<StreamLimiter>,
    caller: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.limiter.metrics.record_stream_held(false);
        let mut held = lock(&self.limiter.held);
        if let Some(n) = held.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_wakes_only_its_own_followers() {
        let bus = Arc::new(RunNotifier::default());
        let (a, b) = (RunId(uuid::Uuid::now_v7()), RunId(uuid::Uuid::now_v7()));
        let fa = bus.subscribe(a);
        let fb = bus.subscribe(b);
        let (ga, gb) = (fa.generation(), fb.generation());
        bus.notify(b);
        assert_eq!(fa.generation(), ga, "run a's follower is not woken by run b");
        assert!(fb.wait_changed(gb, Duration::from_secs(30)).await);
        drop(fa);
        drop(fb);
        assert_eq!(bus.followed(), 0, "nothing is kept for runs nobody follows");
        bus.notify(a);
    }

    #[test]
    fn permits_are_capped_per_caller_and_released() {
        let metrics = Metrics::new();
        let l = StreamLimiter::new(2, metrics.clone());
        let p1 = l.acquire("token:a").unwrap();
        let _p2 = l.acquire("token:a").unwrap();
        let e = l.acquire("token:a").unwrap_err();
        assert_eq!(e.status.as_u16(), 429);
        let _other = l.acquire("token:b").unwrap();
        assert_eq!(l.active(), 3);
        assert!(metrics.render(None).contains("orchestrator_http_streams_active 3"));
        drop(p1);
        assert!(metrics.render(None).contains("orchestrator_http_streams_active 2"));
        let _p3 = l.acquire("token:a").unwrap();
    }
}
