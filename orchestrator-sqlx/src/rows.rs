//! Row mapping: column lists and conversions between PostgreSQL rows and domain types.

use orchestrator_core::crypto::SealedValue;
use orchestrator_core::domain::*;
use orchestrator_core::ids::*;
use orchestrator_core::store::RunResultRecord;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

type R<T> = Result<T, sqlx::Error>;

fn decode_err(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::ColumnDecode { index: i.to_string(), source: Box::new(e) }
}

pub fn parsed<T: std::str::FromStr>(r: &PgRow, i: usize) -> R<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let s: &str = r.try_get(i)?;
    s.parse().map_err(|e| decode_err(i, e))
}

pub fn enum_from<T: DeserializeOwned>(r: &PgRow, i: usize) -> R<T> {
    let s: String = r.try_get(i)?;
    serde_json::from_value(serde_json::Value::String(s)).map_err(|e| decode_err(i, e))
}

fn json<T: DeserializeOwned>(r: &PgRow, i: usize) -> R<T> {
    Ok(r.try_get::<Json<T>, _>(i)?.0)
}

fn u32_of(r: &PgRow, i: usize) -> R<u32> {
    Ok(r.try_get::<i32, _>(i)?.max(0) as u32)
}

fn u32_opt(r: &PgRow, i: usize) -> R<Option<u32>> {
    Ok(r.try_get::<Option<i32>, _>(i)?.map(|v| v.max(0) as u32))
}

/// Serde snake_case name of a unit enum value.
pub fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

pub const PROJECT_COLS: &str = "id, name, description, created_at, updated_at, repository";
pub fn project(r: &PgRow) -> R<Project> {
    let repository: Option<Json<Repository>> = r.try_get(5)?;
    Ok(Project {
        id: ProjectId(r.try_get(0)?),
        name: r.try_get(1)?,
        description: r.try_get(2)?,
        repository: repository.map(|j| j.0),
        created_at: r.try_get(3)?,
        updated_at: r.try_get(4)?,
    })
}

pub const RUN_RESULT_COLS: &str = "run_id, result, patch, recorded_at";
pub fn run_result(r: &PgRow) -> R<RunResultRecord> {
    Ok(RunResultRecord {
        run_id: RunId(r.try_get(0)?),
        result: r.try_get::<Json<RunResult>, _>(1)?.0,
        patch: r.try_get(2)?,
        recorded_at: r.try_get(3)?,
    })
}

pub const VISION_COLS: &str = "project_id, version, text, author, created_at";
pub fn vision(r: &PgRow) -> R<Vision> {
    Ok(Vision {
        project_id: ProjectId(r.try_get(0)?),
        version: u32_of(r, 1)?,
        text: r.try_get(2)?,
        author: r.try_get(3)?,
        created_at: r.try_get(4)?,
    })
}

pub const DRAFT_COLS: &str =
    "id, project_id, title, requirements, state, content_hash, proposed_by, work_item_ids, created_at, decided_at";
pub fn draft(r: &PgRow) -> R<RequirementsDraft> {
    let ids: Vec<Uuid> = r.try_get(7)?;
    Ok(RequirementsDraft {
        id: DraftId(r.try_get(0)?),
        project_id: ProjectId(r.try_get(1)?),
        title: r.try_get(2)?,
        requirements: json(r, 3)?,
        state: parsed(r, 4)?,
        content_hash: r.try_get(5)?,
        proposed_by: r.try_get(6)?,
        work_item_ids: ids.into_iter().map(WorkItemId).collect(),
        created_at: r.try_get(8)?,
        decided_at: r.try_get(9)?,
    })
}

pub const APPROVAL_COLS: &str =
    "id, project_id, subject_kind, subject_id, content_hash, state, requested_at, decided_by, decided_at, reason";
pub fn approval(r: &PgRow) -> R<ApprovalRequest> {
    let kind: &str = r.try_get(2)?;
    let sid: Uuid = r.try_get(3)?;
    let subject = match kind {
        "requirements_draft" => ApprovalSubject::RequirementsDraft(DraftId(sid)),
        _ => ApprovalSubject::WorkItem(WorkItemId(sid)),
    };
    Ok(ApprovalRequest {
        id: ApprovalId(r.try_get(0)?),
        project_id: ProjectId(r.try_get(1)?),
        subject,
        content_hash: r.try_get(4)?,
        state: parsed(r, 5)?,
        requested_at: r.try_get(6)?,
        decided_by: r.try_get(7)?,
        decided_at: r.try_get(8)?,
        reason: r.try_get(9)?,
    })
}

/// The kind and id columns of an approval subject.
pub fn subject_parts(s: &ApprovalSubject) -> (&'static str, Uuid) {
    match s {
        ApprovalSubject::RequirementsDraft(d) => ("requirements_draft", d.0),
        ApprovalSubject::WorkItem(w) => ("work_item", w.0),
    }
}

pub const RECIPE_COLS: &str = "id, project_id, name, yaml, spec, created_at";
pub fn recipe(r: &PgRow) -> R<ToolRecipe> {
    Ok(ToolRecipe {
        id: RecipeId(r.try_get(0)?),
        project_id: r.try_get::<Option<Uuid>, _>(1)?.map(ProjectId),
        name: r.try_get(2)?,
        yaml: r.try_get(3)?,
        spec: json(r, 4)?,
        created_at: r.try_get(5)?,
    })
}

pub const WI_COLS: &str = "id, project_id, title, description, recipe_id, labels, state, priority, dependencies, retry, idempotency_key, content_hash, approval_id, draft_id, blocked_reason, attempts, current_run_id, run_at, last_error, created_at, updated_at, enqueued_at, pending_deps, has_dependents";
/// Number of columns in [`WI_COLS`].
pub const WI_N: usize = 24;

/// [`WI_COLS`] with every column prefixed by `alias.`.
pub fn wi_cols_of(alias: &str) -> String {
    WI_COLS.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

/// [`RUN_COLS`] with every column prefixed by `alias.`.
pub fn run_cols_of(alias: &str) -> String {
    RUN_COLS.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

pub fn work_item(r: &PgRow) -> R<WorkItem> {
    work_item_at(r, 0)
}

pub fn work_item_at(r: &PgRow, o: usize) -> R<WorkItem> {
    let deps: Vec<Uuid> = r.try_get(o + 8)?;
    Ok(WorkItem {
        id: WorkItemId(r.try_get(o)?),
        project_id: ProjectId(r.try_get(o + 1)?),
        title: r.try_get(o + 2)?,
        description: r.try_get(o + 3)?,
        recipe_id: r.try_get::<Option<Uuid>, _>(o + 4)?.map(RecipeId),
        labels: r.try_get(o + 5)?,
        state: parsed(r, o + 6)?,
        priority: r.try_get(o + 7)?,
        dependencies: deps.into_iter().map(WorkItemId).collect(),
        retry: json(r, o + 9)?,
        idempotency_key: r.try_get(o + 10)?,
        content_hash: r.try_get(o + 11)?,
        approval_id: r.try_get::<Option<Uuid>, _>(o + 12)?.map(ApprovalId),
        draft_id: r.try_get::<Option<Uuid>, _>(o + 13)?.map(DraftId),
        blocked_reason: r.try_get(o + 14)?,
        attempts: u32_of(r, o + 15)?,
        current_run_id: r.try_get::<Option<Uuid>, _>(o + 16)?.map(RunId),
        run_at: r.try_get(o + 17)?,
        last_error: r.try_get(o + 18)?,
        created_at: r.try_get(o + 19)?,
        updated_at: r.try_get(o + 20)?,
        enqueued_at: r.try_get(o + 21)?,
    })
}

pub const RUN_COLS: &str = "id, work_item_id, project_id, attempt, agent_id, state, lease_token, lease_expires_at, heartbeat_at, claimed_at, started_at, finished_at, exit_code, error, failure_kind, usage, last_completed_step";

pub fn run(r: &PgRow) -> R<Run> {
    run_at(r, 0)
}

pub fn run_at(r: &PgRow, o: usize) -> R<Run> {
    let failure_kind: Option<String> = r.try_get(o + 14)?;
    let usage: Option<Json<Usage>> = r.try_get(o + 15)?;
    Ok(Run {
        id: RunId(r.try_get(o)?),
        work_item_id: WorkItemId(r.try_get(o + 1)?),
        project_id: ProjectId(r.try_get(o + 2)?),
        attempt: u32_of(r, o + 3)?,
        agent_id: r.try_get(o + 4)?,
        state: parsed(r, o + 5)?,
        lease_token: r.try_get::<i64, _>(o + 6)?.max(0) as u64,
        lease_expires_at: r.try_get(o + 7)?,
        heartbeat_at: r.try_get(o + 8)?,
        claimed_at: r.try_get(o + 9)?,
        started_at: r.try_get(o + 10)?,
        finished_at: r.try_get(o + 11)?,
        exit_code: r.try_get(o + 12)?,
        error: r.try_get(o + 13)?,
        failure_kind: match failure_kind {
            Some(s) => Some(serde_json::from_value(serde_json::Value::String(s)).map_err(|e| decode_err(o + 14, e))?),
            None => None,
        },
        usage: usage.map(|u| u.0).unwrap_or_default(),
        last_completed_step: u32_opt(r, o + 16)?,
    })
}

pub const INFO_COLS: &str = "id, run_id, work_item_id, project_id, key, prompt, kind, choices, state, deadline, created_at, answered_at, answered_by, answer";
pub fn info(r: &PgRow) -> R<InfoRequest> {
    let answer: Option<String> = r.try_get(13)?;
    Ok(InfoRequest {
        id: InfoRequestId(r.try_get(0)?),
        run_id: RunId(r.try_get(1)?),
        work_item_id: WorkItemId(r.try_get(2)?),
        project_id: ProjectId(r.try_get(3)?),
        key: r.try_get(4)?,
        prompt: r.try_get(5)?,
        kind: enum_from(r, 6)?,
        choices: r.try_get(7)?,
        state: enum_from(r, 8)?,
        deadline: r.try_get(9)?,
        created_at: r.try_get(10)?,
        answered_at: r.try_get(11)?,
        answered_by: r.try_get(12)?,
        answer: match answer {
            Some(s) => Some(SealedValue::decode(&s).map_err(|e| decode_err(13, e))?),
            None => None,
        },
    })
}

pub const LOG_COLS: &str = "run_id, seq, stream, line, at";
pub fn log(r: &PgRow) -> R<LogEntry> {
    Ok(LogEntry {
        run_id: RunId(r.try_get(0)?),
        seq: r.try_get::<i64, _>(1)?.max(0) as u64,
        stream: enum_from(r, 2)?,
        line: r.try_get(3)?,
        at: r.try_get(4)?,
    })
}

pub const EVENT_COLS: &str = "run_id, seq, step_index, kind, name, detail, at";
pub fn event(r: &PgRow) -> R<StepEvent> {
    Ok(StepEvent {
        run_id: RunId(r.try_get(0)?),
        seq: r.try_get::<i64, _>(1)?.max(0) as u64,
        step_index: u32_opt(r, 2)?,
        kind: enum_from(r, 3)?,
        name: r.try_get(4)?,
        detail: json(r, 5)?,
        at: r.try_get(6)?,
    })
}
