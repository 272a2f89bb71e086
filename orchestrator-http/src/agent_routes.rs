//! The agent protocol (see the crate docs): claim (with long poll), work wake-ups, and the fenced per-run
//! routes. An agent token acts only on runs whose `agent_id` is its name; admins act on any run.

use crate::dto::*;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, Json, Path, Query};
use crate::handlers::J;
use crate::middleware::CallerKey;
use crate::AppState;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::domain::{Lease, Run};
use orchestrator_core::ids::RunId;
use serde::Deserialize;
use std::time::Duration;
use tokio::time::Instant;

/// The longest a long poll waits.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(30_000);

/// Refuses an agent acting on another agent's run (403); admins pass.
async fn own_run(s: &AppState, caller: &Caller, run_id: RunId) -> ApiResult<()> {
    if caller.is_agent() {
        let run = s.orch.store().run_get(run_id).await?;
        if run.agent_id != caller.0.name {
            tracing::warn!(run_id = %run_id, principal = %caller.0.name, "agent touched another agent's run");
            return Err(ApiError::forbidden(format!("run `{run_id}` is not held by agent `{}`", caller.0.name)));
        }
    }
    Ok(())
}

pub(crate) async fn claim(
    State(s): State<AppState>,
    caller: Caller,
    Extension(key): Extension<CallerKey>,
    Json(b): Json<ClaimBody>,
) -> ApiResult<J<ClaimResponse>> {
    let agent_id = match (b.agent_id, caller.is_agent()) {
        (Some(a), true) if a != caller.0.name => {
            return Err(ApiError::forbidden(format!(
                "agent_id `{a}` differs from the token's agent `{}`",
                caller.0.name
            )))
        }
        (_, true) => caller.0.name.clone(),
        (Some(a), false) => a,
        (None, false) => return Err(ApiError::invalid("agent_id", "required")),
    };
    let req =
        ClaimRequest { agent_id, capabilities: b.capabilities, max: b.max, lease_ttl_seconds: b.lease_ttl_seconds };
    let wait = Duration::from_millis(b.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    // A long poll counts against the caller's concurrent streams while it waits.
    let _permit = if wait.is_zero() { None } else { Some(s.streams.acquire(&key.0)?) };
    let deadline = Instant::now() + wait;
    loop {
        let generation = s.orch.work_generation().await;
        let assignments = s.orch.claim(req.clone()).await?;
        let now = Instant::now();
        if !assignments.is_empty() || now >= deadline {
            if !assignments.is_empty() {
                tracing::info!(agent_id = %req.agent_id, claimed = assignments.len(), "claimed");
            }
            return Ok(J(ClaimResponse { assignments }));
        }
        tokio::select! {
            _ = s.orch.wait_for_work(generation, deadline - now) => {}
            _ = s.config.shutting_down() => {
                return Ok(J(ClaimResponse { assignments: Vec::new() }));
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkQuery {
    seen: Option<u64>,
    timeout_ms: Option<u64>,
}

pub(crate) async fn work(
    State(s): State<AppState>,
    Extension(key): Extension<CallerKey>,
    Query(q): Query<WorkQuery>,
) -> ApiResult<J<WorkGeneration>> {
    let woken = match q.seen {
        None => false,
        Some(seen) => {
            let _permit = s.streams.acquire(&key.0)?;
            let t = Duration::from_millis(q.timeout_ms.unwrap_or(MAX_WAIT.as_millis() as u64)).min(MAX_WAIT);
            tokio::select! {
                woken = s.orch.wait_for_work(seen, t) => woken,
                _ = s.config.shutting_down() => false,
            }
        }
    };
    Ok(J(WorkGeneration { generation: s.orch.work_generation().await, woken }))
}

pub(crate) async fn heartbeat(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<TokenBody>,
) -> ApiResult<J<Lease>> {
    own_run(&s, &caller, id).await?;
    Ok(J(s.orch.heartbeat(id, b.token).await?))
}

pub(crate) async fn start(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<TokenBody>,
) -> ApiResult<J<Run>> {
    own_run(&s, &caller, id).await?;
    Ok(J(s.orch.start(id, b.token).await?))
}

pub(crate) async fn append_logs(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<AppendLogs>,
) -> ApiResult<J<LogsAppended>> {
    own_run(&s, &caller, id).await?;
    let last_seq = s.orch.append_logs(id, b.token, b.lines).await?;
    s.log_bus.notify(id);
    Ok(J(LogsAppended { last_seq }))
}

pub(crate) async fn record_steps(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<RecordSteps>,
) -> ApiResult<J<StepsRecorded>> {
    own_run(&s, &caller, id).await?;
    Ok(J(StepsRecorded { events: s.orch.record_steps(id, b.token, b.events).await? }))
}

pub(crate) async fn ask(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<AskBody>,
) -> ApiResult<J<Asked>> {
    own_run(&s, &caller, id).await?;
    Ok(J(Asked { info_requests: s.orch.ask_with_usage(id, b.token, b.questions, b.usage).await? }))
}

pub(crate) async fn complete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<CompleteBody>,
) -> ApiResult<J<CompletionBody>> {
    own_run(&s, &caller, id).await?;
    let result = s.orch.complete(id, b.token, b.outcome, b.usage).await?;
    s.log_bus.notify(id);
    tracing::info!(run_id = %id, work_item_state = %result.work_item_state, "run completed");
    Ok(J(result.into()))
}

pub(crate) async fn release(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<ReleaseBody>,
) -> ApiResult<J<Run>> {
    own_run(&s, &caller, id).await?;
    let run = s.orch.release_with_usage(id, b.token, b.usage).await?;
    s.log_bus.notify(id);
    tracing::info!(run_id = %id, "run released");
    Ok(J(run))
}

pub(crate) async fn record_result(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Json(b): Json<RecordResult>,
) -> ApiResult<J<serde_json::Value>> {
    own_run(&s, &caller, id).await?;
    s.orch.record_result(id, b.token, b.result, b.patch).await?;
    Ok(J(serde_json::json!({"recorded": true})))
}

pub(crate) async fn cancellations(
    State(s): State<AppState>,
    caller: Caller,
    Json(b): Json<CancellationsBody>,
) -> ApiResult<J<Cancellations>> {
    if b.runs.len() > 1000 {
        return Err(ApiError::invalid("runs", "at most 1000 runs per call"));
    }
    let mut gone = Vec::new();
    let mut held = Vec::with_capacity(b.runs.len());
    for r in &b.runs {
        match own_run(&s, &caller, r.run_id).await {
            Ok(()) => held.push((r.run_id, r.token)),
            // Another agent's run, or one that is gone: not held by this caller.
            Err(e) if matches!(e.status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND) => gone.push(r.run_id),
            // The store cannot answer now (a database restart): the agent asks again; its runs go on.
            Err(e) => return Err(e),
        }
    }
    if !gone.is_empty() {
        return Ok(J(Cancellations { runs: gone }));
    }
    let t = Duration::from_millis(b.timeout_ms.unwrap_or(0)).min(MAX_WAIT);
    let runs = tokio::select! {
        r = s.orch.wait_for_cancellations(held, t) => r?,
        _ = s.config.shutting_down() => Vec::new(),
    };
    Ok(J(Cancellations { runs }))
}
