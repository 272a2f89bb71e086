//! Row mapping: column lists and conversions between rows and domain types.

use chrono::{DateTime, Utc};
use orchestrator_core::crypto::SealedValue;
use orchestrator_core::domain::*;
use orchestrator_core::error::StoreError;
use orchestrator_core::ids::*;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::Row;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Microseconds since the epoch.
pub fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// Optional timestamp.
pub fn ts_opt(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(ts)
}

/// From microseconds.
pub fn from_ts(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(v).unwrap_or_default()
}

/// A UUID as a 16-byte blob parameter.
pub struct B(pub Uuid);

impl rusqlite::ToSql for B {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Blob(self.0.as_bytes())))
    }
}

/// A UUID read from a 16-byte blob.
pub struct U(pub Uuid);

impl FromSql for U {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let b = v.as_blob()?;
        Uuid::from_slice(b).map(U).map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

/// Blob parameter for any id.
pub fn b<T: Into<Uuid>>(id: T) -> B {
    B(id.into())
}

pub fn uid(r: &Row<'_>, i: usize) -> rusqlite::Result<Uuid> {
    Ok(r.get::<_, U>(i)?.0)
}

pub fn uid_opt(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<Uuid>> {
    Ok(r.get::<_, Option<U>>(i)?.map(|u| u.0))
}

pub fn time(r: &Row<'_>, i: usize) -> rusqlite::Result<DateTime<Utc>> {
    Ok(from_ts(r.get(i)?))
}

pub fn time_opt(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    Ok(r.get::<_, Option<i64>>(i)?.map(from_ts))
}

fn conv_err(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

/// The text of column `i`, borrowed from the row (no allocation).
fn text<'r>(r: &'r Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
    r.get_ref(i)?
        .as_str()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
}

pub fn json<T: DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    serde_json::from_str(text(r, i)?).map_err(|e| conv_err(i, e))
}

/// A JSON array column; the common empty array skips the parser.
pub fn json_vec<T: DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<Vec<T>> {
    match text(r, i)? {
        "[]" => Ok(Vec::new()),
        s => serde_json::from_str(s).map_err(|e| conv_err(i, e)),
    }
}

/// A JSON object column whose empty object is `T::default()` (skips the parser).
pub fn json_or_default<T: DeserializeOwned + Default>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    match text(r, i)? {
        "{}" => Ok(T::default()),
        s => serde_json::from_str(s).map_err(|e| conv_err(i, e)),
    }
}

pub fn parsed<T: std::str::FromStr>(r: &Row<'_>, i: usize) -> rusqlite::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text(r, i)?.parse().map_err(|e| conv_err(i, e))
}

/// JSON text of a value.
pub fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(StoreError::backend)
}

/// Serde snake_case name of a unit enum value.
pub fn enum_str<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    match serde_json::to_value(v).map_err(StoreError::backend)? {
        serde_json::Value::String(s) => Ok(s),
        other => Err(StoreError::invalid("enum", format!("not a unit variant: {other}"))),
    }
}

pub fn enum_from<T: DeserializeOwned>(r: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    let s: String = r.get(i)?;
    serde_json::from_value(serde_json::Value::String(s)).map_err(|e| conv_err(i, e))
}

pub const PROJECT_COLS: &str = "id, name, description, created_at, updated_at, repository";
pub fn project(r: &Row<'_>) -> rusqlite::Result<Project> {
    let repository: Option<String> = r.get(5)?;
    let repository = repository.map(|j| serde_json::from_str(&j).map_err(|e| conv_err(5, e))).transpose()?;
    Ok(Project {
        id: ProjectId(uid(r, 0)?),
        name: r.get(1)?,
        description: r.get(2)?,
        repository,
        created_at: time(r, 3)?,
        updated_at: time(r, 4)?,
    })
}

pub const VISION_COLS: &str = "project_id, version, text, author, created_at";
pub fn vision(r: &Row<'_>) -> rusqlite::Result<Vision> {
    Ok(Vision {
        project_id: ProjectId(uid(r, 0)?),
        version: r.get(1)?,
        text: r.get(2)?,
        author: r.get(3)?,
        created_at: time(r, 4)?,
    })
}

pub const DRAFT_COLS: &str =
    "id, project_id, title, requirements, state, content_hash, proposed_by, work_item_ids, created_at, decided_at";
pub fn draft(r: &Row<'_>) -> rusqlite::Result<RequirementsDraft> {
    Ok(RequirementsDraft {
        id: DraftId(uid(r, 0)?),
        project_id: ProjectId(uid(r, 1)?),
        title: r.get(2)?,
        requirements: json(r, 3)?,
        state: parsed(r, 4)?,
        content_hash: r.get(5)?,
        proposed_by: r.get(6)?,
        work_item_ids: json(r, 7)?,
        created_at: time(r, 8)?,
        decided_at: time_opt(r, 9)?,
    })
}

pub const APPROVAL_COLS: &str =
    "id, project_id, subject_kind, subject_id, content_hash, state, requested_at, decided_by, decided_at, reason";
pub fn approval(r: &Row<'_>) -> rusqlite::Result<ApprovalRequest> {
    let kind: String = r.get(2)?;
    let sid = uid(r, 3)?;
    let subject = match kind.as_str() {
        "requirements_draft" => ApprovalSubject::RequirementsDraft(DraftId(sid)),
        _ => ApprovalSubject::WorkItem(WorkItemId(sid)),
    };
    Ok(ApprovalRequest {
        id: ApprovalId(uid(r, 0)?),
        project_id: ProjectId(uid(r, 1)?),
        subject,
        content_hash: r.get(4)?,
        state: parsed(r, 5)?,
        requested_at: time(r, 6)?,
        decided_by: r.get(7)?,
        decided_at: time_opt(r, 8)?,
        reason: r.get(9)?,
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
pub fn recipe(r: &Row<'_>) -> rusqlite::Result<ToolRecipe> {
    Ok(ToolRecipe {
        id: RecipeId(uid(r, 0)?),
        project_id: uid_opt(r, 1)?.map(ProjectId),
        name: r.get(2)?,
        yaml: r.get(3)?,
        spec: json(r, 4)?,
        created_at: time(r, 5)?,
    })
}

pub const WI_COLS: &str = "id, project_id, title, description, recipe_id, labels, state, priority, dependencies, retry, idempotency_key, content_hash, approval_id, draft_id, blocked_reason, attempts, current_run_id, run_at, last_error, created_at, updated_at, enqueued_at, pending_deps";
pub fn work_item(r: &Row<'_>) -> rusqlite::Result<WorkItem> {
    Ok(WorkItem {
        id: WorkItemId(uid(r, 0)?),
        project_id: ProjectId(uid(r, 1)?),
        title: r.get(2)?,
        description: r.get(3)?,
        recipe_id: uid_opt(r, 4)?.map(RecipeId),
        labels: json_vec(r, 5)?,
        state: parsed(r, 6)?,
        priority: r.get(7)?,
        dependencies: json_vec(r, 8)?,
        retry: json_or_default(r, 9)?,
        idempotency_key: r.get(10)?,
        content_hash: r.get(11)?,
        approval_id: uid_opt(r, 12)?.map(ApprovalId),
        draft_id: uid_opt(r, 13)?.map(DraftId),
        blocked_reason: r.get(14)?,
        attempts: r.get(15)?,
        current_run_id: uid_opt(r, 16)?.map(RunId),
        run_at: time_opt(r, 17)?,
        last_error: r.get(18)?,
        created_at: time(r, 19)?,
        updated_at: time(r, 20)?,
        enqueued_at: time_opt(r, 21)?,
    })
}

/// A work item and its pending dependency count.
pub fn work_item_pending(r: &Row<'_>) -> rusqlite::Result<(WorkItem, u32)> {
    Ok((work_item(r)?, r.get(22)?))
}

pub const RUN_COLS: &str = "id, work_item_id, project_id, attempt, agent_id, state, lease_token, lease_expires_at, heartbeat_at, claimed_at, started_at, finished_at, exit_code, error, failure_kind, usage, last_completed_step";
pub fn run(r: &Row<'_>) -> rusqlite::Result<Run> {
    let usage: Option<String> = r.get(15)?;
    let failure_kind: Option<String> = r.get(14)?;
    Ok(Run {
        id: RunId(uid(r, 0)?),
        work_item_id: WorkItemId(uid(r, 1)?),
        project_id: ProjectId(uid(r, 2)?),
        attempt: r.get(3)?,
        agent_id: r.get(4)?,
        state: parsed(r, 5)?,
        lease_token: r.get::<_, i64>(6)? as u64,
        lease_expires_at: time_opt(r, 7)?,
        heartbeat_at: time_opt(r, 8)?,
        claimed_at: time(r, 9)?,
        started_at: time_opt(r, 10)?,
        finished_at: time_opt(r, 11)?,
        exit_code: r.get(12)?,
        error: r.get(13)?,
        failure_kind: match failure_kind {
            Some(s) => Some(serde_json::from_value(serde_json::Value::String(s)).map_err(|e| conv_err(14, e))?),
            None => None,
        },
        usage: match usage {
            Some(s) => serde_json::from_str(&s).map_err(|e| conv_err(15, e))?,
            None => Usage::default(),
        },
        last_completed_step: r.get(16)?,
    })
}

pub const INFO_COLS: &str = "id, run_id, work_item_id, project_id, key, prompt, kind, choices, state, deadline, created_at, answered_at, answered_by, answer";
pub fn info(r: &Row<'_>) -> rusqlite::Result<InfoRequest> {
    let answer: Option<String> = r.get(13)?;
    Ok(InfoRequest {
        id: InfoRequestId(uid(r, 0)?),
        run_id: RunId(uid(r, 1)?),
        work_item_id: WorkItemId(uid(r, 2)?),
        project_id: ProjectId(uid(r, 3)?),
        key: r.get(4)?,
        prompt: r.get(5)?,
        kind: enum_from(r, 6)?,
        choices: json(r, 7)?,
        state: enum_from(r, 8)?,
        deadline: time_opt(r, 9)?,
        created_at: time(r, 10)?,
        answered_at: time_opt(r, 11)?,
        answered_by: r.get(12)?,
        answer: match answer {
            Some(s) => Some(SealedValue::decode(&s).map_err(|e| conv_err(13, e))?),
            None => None,
        },
    })
}

pub const LOG_COLS: &str = "run_id, seq, stream, line, at";
pub fn log(r: &Row<'_>) -> rusqlite::Result<LogEntry> {
    Ok(LogEntry {
        run_id: RunId(uid(r, 0)?),
        seq: r.get::<_, i64>(1)? as u64,
        stream: enum_from(r, 2)?,
        line: r.get(3)?,
        at: time(r, 4)?,
    })
}

pub const EVENT_COLS: &str = "run_id, seq, step_index, kind, name, detail, at";
pub fn event(r: &Row<'_>) -> rusqlite::Result<StepEvent> {
    Ok(StepEvent {
        run_id: RunId(uid(r, 0)?),
        seq: r.get::<_, i64>(1)? as u64,
        step_index: r.get(2)?,
        kind: enum_from(r, 3)?,
        name: r.get(4)?,
        detail: json(r, 5)?,
        at: time(r, 6)?,
    })
}

/// A borrowed statement parameter (no allocation per value).
pub enum P<'a> {
    /// An integer.
    I(i64),
    /// A blob (an id's 16 bytes).
    B(&'a [u8]),
    /// Text.
    T(&'a str),
}

impl rusqlite::ToSql for P<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            P::I(v) => ValueRef::Integer(*v),
            P::B(b) => ValueRef::Blob(b),
            P::T(t) => ValueRef::Text(t.as_bytes()),
        }))
    }
}
