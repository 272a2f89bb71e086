//! The run's [`ExecutionSink`]: batches log lines, records step events, keeps usage, redacts secrets and
//! stops writing the moment the lease is lost.

use crate::redact::Redactor;
use async_trait::async_trait;
use orchestrator_core::agent::{AgentApi, CancelHandle, ExecutionSink};
use orchestrator_core::domain::{LogStream, NewLogLine, NewStepEvent, Usage};
use orchestrator_core::ids::RunId;
use orchestrator_core::{Error, StoreError};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Lines kept while the orchestrator cannot be reached; older ones are dropped beyond this.
const MAX_BUFFERED_LINES: usize = 50_000;

/// Whether an error on a per-run write means the run is no longer ours (lease lost, run cancelled,
/// reclaimed or gone).
pub(crate) fn is_lease_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::Store(
            StoreError::LeaseLost { .. }
                | StoreError::NotFound { .. }
                | StoreError::InvalidTransition(_)
                | StoreError::Conflict { .. }
        )
    )
}

/// Whether trying again may help.
pub(crate) fn is_transient(e: &Error) -> bool {
    matches!(e, Error::Store(StoreError::Unavailable { retryable: true, .. } | StoreError::Backend { .. }))
}

/// Why a run's work was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    None = 0,
    LeaseLost = 1,
    Shutdown = 2,
}

/// Shared state of one run: its cancellation and why it stopped.
pub(crate) struct RunControl {
    pub run_id: RunId,
    pub token: u64,
    handle: CancelHandle,
    reason: AtomicU8,
}

impl RunControl {
    pub fn new(run_id: RunId, token: u64, handle: CancelHandle) -> Self {
        RunControl { run_id, token, handle, reason: AtomicU8::new(StopReason::None as u8) }
    }
    pub fn stop(&self, why: StopReason) {
        let _ = self.reason.compare_exchange(StopReason::None as u8, why as u8, Ordering::AcqRel, Ordering::Acquire);
        if why == StopReason::LeaseLost {
            // Lease loss wins over shutdown: never write for the run again.
            self.reason.store(StopReason::LeaseLost as u8, Ordering::Release);
        }
        self.handle.cancel();
    }
    pub fn reason(&self) -> StopReason {
        match self.reason.load(Ordering::Acquire) {
            1 => StopReason::LeaseLost,
            2 => StopReason::Shutdown,
            _ => StopReason::None,
        }
    }
    pub fn lost(&self) -> bool {
        self.reason() == StopReason::LeaseLost
    }
}

/// The sink of one run.
pub(crate) struct RunSink {
    api: Arc<dyn AgentApi>,
    control: Arc<RunControl>,
    redactor: Redactor,
    batch: usize,
    buf: tokio::sync::Mutex<Vec<NewLogLine>>,
    usage: Mutex<Option<Usage>>,
    planner: Mutex<Option<Usage>>,
    dropped_warned: AtomicBool,
}

impl RunSink {
    pub fn new(api: Arc<dyn AgentApi>, control: Arc<RunControl>, redactor: Redactor, batch: usize) -> Self {
        RunSink {
            api,
            control,
            redactor,
            batch: batch.max(1),
            buf: tokio::sync::Mutex::new(Vec::new()),
            usage: Mutex::new(None),
            planner: Mutex::new(None),
            dropped_warned: AtomicBool::new(false),
        }
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The run's usage: the planner's plus the last usage the executor reported.
    pub fn take_usage(&self) -> Option<Usage> {
        let exec = self.usage.lock().map(|u| u.clone()).unwrap_or(None);
        let plan = self.planner.lock().map(|u| u.clone()).unwrap_or(None);
        match (plan, exec) {
            (Some(p), Some(e)) => Some(p.plus(&e)),
            (p, e) => p.or(e),
        }
    }

    /// What planning cost (added to the executor's usage).
    pub fn planner_usage(&self, u: Usage) {
        if let Ok(mut p) = self.planner.lock() {
            *p = Some(u);
        }
    }

    fn on_error(&self, what: &str, e: &Error) {
        if is_lease_lost(e) {
            tracing::warn!(run_id = %self.control.run_id, error = %e, "lease lost while writing {what}; stopping the run");
            self.control.stop(StopReason::LeaseLost);
        } else {
            tracing::warn!(run_id = %self.control.run_id, error = %e, "cannot write {what}");
        }
    }

    async fn flush_locked(&self, buf: &mut Vec<NewLogLine>) {
        if buf.is_empty() || self.control.lost() {
            return;
        }
        let lines = std::mem::take(buf);
        if let Err(e) = self.api.append_logs(self.control.run_id, self.control.token, lines.clone()).await {
            self.on_error("logs", &e);
            if is_transient(&e) && !self.control.lost() {
                let mut kept = lines;
                kept.append(buf);
                if kept.len() > MAX_BUFFERED_LINES {
                    let extra = kept.len() - MAX_BUFFERED_LINES;
                    kept.drain(..extra);
                    if !self.dropped_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(run_id = %self.control.run_id, "log buffer full; dropping the oldest lines");
                    }
                }
                *buf = kept;
            }
        }
    }

    /// Sends the buffered log lines.
    pub async fn flush(&self) {
        let mut buf = self.buf.lock().await;
        self.flush_locked(&mut buf).await;
    }

    /// A line from the agent itself.
    pub async fn system(&self, line: impl Into<String>) {
        self.log(LogStream::System, line.into()).await;
    }
}

#[async_trait]
impl ExecutionSink for RunSink {
    async fn log(&self, stream: LogStream, line: String) {
        if self.control.lost() {
            return;
        }
        let line = match self.redactor.redact(&line) {
            std::borrow::Cow::Borrowed(_) => line,
            std::borrow::Cow::Owned(r) => r,
        };
        let mut buf = self.buf.lock().await;
        buf.push(NewLogLine { stream, line });
        if buf.len() >= self.batch {
            self.flush_locked(&mut buf).await;
        }
    }

    async fn step_event(&self, mut event: NewStepEvent) {
        if self.control.lost() {
            return;
        }
        // Logs written before the event go first.
        self.flush().await;
        event.name = self.redactor.redact(&event.name).into_owned();
        self.redactor.redact_value(&mut event.detail);
        let mut attempt = 0;
        loop {
            match self.api.record_steps(self.control.run_id, self.control.token, vec![event.clone()]).await {
                Ok(_) => return,
                Err(e) if is_transient(&e) && attempt < 5 && !self.control.lost() => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => {
                    self.on_error("a step event", &e);
                    return;
                }
            }
        }
    }

    async fn usage(&self, usage: Usage) {
        if let Ok(mut u) = self.usage.lock() {
            *u = Some(usage);
        }
    }
}
