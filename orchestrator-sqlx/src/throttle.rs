//! At most one `NOTIFY` per interval from a store.
//!
//! PostgreSQL serializes the commits of transactions that sent a notification (they take one
//! database-wide lock and keep it through their commit's WAL flush), so a notification from every
//! concurrent enqueue caps them at one commit per flush. The store instead notifies inside the
//! transaction only when it sent nothing in the last interval (the leading edge, so a lone enqueue wakes
//! claimers at once), and otherwise once more after the interval, from its own statement sent after the
//! commits it covers (the trailing edge), so no wake-up is lost.

use sqlx::PgPool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The wake-up notification on the channel bound as `$1`.
pub const NOTIFY_SQL: &str = "SELECT pg_notify($1, '')";

#[derive(Debug)]
pub struct NotifyThrottle {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last notification was sent (or a transaction was allowed to send one).
    last: Option<Instant>,
    /// A trailing notification is due and has not started yet.
    trailing: bool,
}

impl NotifyThrottle {
    pub fn new(interval: Duration) -> Self {
        NotifyThrottle { interval, state: Mutex::new(State::default()) }
    }

    /// Whether a transaction about to make work claimable sends its notification itself (true when
    /// nothing was sent in the last interval). When false, call [`NotifyThrottle::after_commit`] once
    /// it committed.
    pub fn leading(&self) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.last {
            Some(t) if now.duration_since(t) < self.interval => false,
            _ => {
                s.last = Some(now);
                true
            }
        }
    }

    /// After the commit of a transaction that did not notify: makes sure one notification is sent after
    /// now (at the end of the interval that began with the last one).
    pub fn after_commit(self: &Arc<Self>, pool: &PgPool, channel: &str) {
        let due = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.trailing {
                // One is due and has not started: it goes out after this commit.
                return;
            }
            s.trailing = true;
            s.last.map_or_else(Instant::now, |t| t + self.interval)
        };
        let (me, pool, channel) = (self.clone(), pool.clone(), channel.to_string());
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
            {
                let mut s = me.state.lock().unwrap_or_else(|p| p.into_inner());
                // Commits after this point schedule a notification of their own.
                s.trailing = false;
                s.last = Some(Instant::now());
            }
            if let Err(e) = sqlx::query(NOTIFY_SQL).bind(&channel).execute(&pool).await {
                // Claimers elsewhere fall back to polling.
                tracing::warn!(error = %e, channel = %channel, "could not send a wake-up notification");
            }
        });
    }
}
