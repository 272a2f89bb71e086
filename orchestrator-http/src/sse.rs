//! `GET /runs/{id}/logs/stream`: a run's log lines as Server-Sent Events (`id` = sequence number,
//! `event: log`, `data` = the `LogEntry` JSON), resuming after `Last-Event-ID` (or `?after=`), ending
//! with `event: end` (`data` = `{"state": "<run state>"}`) once the run is finished and every line was sent.

use crate::error::{ApiError, ApiResult};
use crate::extract::{Path, Query};
use crate::metrics::Metrics;
use crate::middleware::CallerKey;
use crate::streams::{RunSubscription, StreamPermit};
use crate::{AppState, HttpConfig};
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use orchestrator_core::domain::LogEntry;
use orchestrator_core::ids::RunId;
use orchestrator_core::state::RunState;
use orchestrator_core::Orchestrator;
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// How often a follower re-reads when no append through this router woke it (appends by in-process agents,
/// or through another server).
const POLL: Duration = Duration::from_secs(1);
const BATCH: u32 = 500;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    after: Option<u64>,
}

struct Follow {
    orch: Arc<Orchestrator>,
    config: Arc<HttpConfig>,
    metrics: Arc<Metrics>,
    /// This run's wake-ups (appends to other runs do not wake this follower).
    bus: RunSubscription,
    /// Counts against the caller's `ORCH_MAX_STREAMS_PER_CALLER` until the stream is dropped.
    _permit: StreamPermit,
    run_id: RunId,
    after: u64,
    pending: VecDeque<LogEntry>,
    finished: Option<RunState>,
    done: bool,
}

fn log_event(e: &LogEntry) -> Event {
    let ev = Event::default().id(e.seq.to_string()).event("log");
    match serde_json::to_string(e) {
        Ok(json) => ev.data(json),
        Err(_) => ev.data("{}"),
    }
}

fn error_event(message: &str) -> Event {
    Event::default().event("error").data(serde_json::json!({"message": message}).to_string())
}

impl Follow {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.after = e.seq;
                return Some(log_event(&e));
            }
            if self.done {
                return None;
            }
            let generation = self.bus.generation();
            let store = self.orch.store();
            match store.logs_read_after(self.run_id, self.after, BATCH).await {
                Ok(lines) if !lines.is_empty() => {
                    self.pending.extend(lines);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(run_id = %self.run_id, error = %e, "log stream read failed");
                    self.done = true;
                    return Some(error_event("reading the logs failed"));
                }
            }
            if let Some(state) = self.finished {
                // Finished and a read after seeing it finished found nothing more: drained.
                self.done = true;
                return Some(Event::default().event("end").data(serde_json::json!({"state": state}).to_string()));
            }
            match store.run_get(self.run_id).await {
                Ok(run) if run.state.is_terminal() => self.finished = Some(run.state),
                Ok(_) => {
                    tokio::select! {
                        woken = self.bus.wait_changed(generation, POLL) => {
                            if woken {
                                self.metrics.record_log_wakeup();
                            }
                        }
                        _ = self.config.shutting_down() => {
                            self.done = true;
                            return None;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(run_id = %self.run_id, error = %e, "log stream run read failed");
                    self.done = true;
                    return Some(error_event("reading the run failed"));
                }
            }
        }
    }
}

pub(crate) async fn stream_logs(
    State(s): State<AppState>,
    Extension(caller): Extension<CallerKey>,
    Path(id): Path<RunId>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let permit = s.streams.acquire(&caller.0)?;
    s.orch.store().run_get(id).await?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be a log sequence number"))?,
        None => q.after.unwrap_or(0),
    };
    let follow = Follow {
        orch: s.orch.clone(),
        config: s.config.clone(),
        metrics: s.metrics.clone(),
        bus: s.log_bus.subscribe(id),
        _permit: permit,
        run_id: id,
        after,
        pending: VecDeque::new(),
        finished: None,
        done: false,
    };
    let stream = stream::unfold(follow, |mut f| async move { f.next_event().await.map(|e| (Ok(e), f)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
