//! Wake-ups: a [`Notifier`] tells waiting claimers that work may have become ready, without polling.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// A broadcast wake-up signal with a generation counter, so a waiter that checks the queue and then
/// waits never misses a notification sent in between. Clones share the signal.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    generation: AtomicU64,
    notify: Notify,
}

impl Notifier {
    /// A new signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current generation; pass it to [`Notifier::wait_changed`].
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Signals every waiter that work may be ready.
    pub fn notify(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.notify.notify_waiters();
    }

    /// Waits until the generation differs from `seen` or `timeout` passes. Returns true when signalled.
    pub async fn wait_changed(&self, seen: u64, timeout: Duration) -> bool {
        let notified = self.inner.notify.notified();
        tokio::pin!(notified);
        // Register before re-checking, so a notify between the check and the await is not lost.
        notified.as_mut().enable();
        if self.generation() != seen {
            return true;
        }
        tokio::time::timeout(timeout, notified).await.is_ok() || self.generation() != seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_waiter() {
        let n = Notifier::new();
        let g = n.generation();
        let n2 = n.clone();
        let h = tokio::spawn(async move { n2.wait_changed(g, Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        n.notify();
        assert!(h.await.unwrap());
    }

    #[tokio::test]
    async fn notification_before_wait_is_not_lost() {
        let n = Notifier::new();
        let g = n.generation();
        n.notify();
        assert!(n.wait_changed(g, Duration::from_secs(30)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out() {
        let n = Notifier::new();
        assert!(!n.wait_changed(n.generation(), Duration::from_millis(10)).await);
    }
}
