//! The store operations as functions over a connection inside the writer's transaction (writes) or a
//! read connection (reads). Semantics mirror `orchestrator_core::MemoryStore`; decisions come from
//! `orchestrator_core::rules`.

use crate::rows::*;
use chrono::{DateTime, Utc};
use orchestrator_core::crypto::SealedValue;
use orchestrator_core::domain::*;
use orchestrator_core::error::{StoreError, StoreResult};
use orchestrator_core::ids::*;
use orchestrator_core::retry::{FailureKind, RetryOverrides, RetryPolicy};
use orchestrator_core::rules;
use orchestrator_core::state::*;
use orchestrator_core::store::*;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use uuid::Uuid;

const COMPLETE_RUN_SQL: &str =
    "UPDATE runs SET state = ?2, finished_at = ?3, lease_expires_at = NULL, exit_code = ?4, error = ?5,
     failure_kind = ?6, usage = COALESCE(?7, usage)
     WHERE id = ?1 AND lease_token = ?8 AND +state IN ('claimed', 'running') AND +lease_expires_at > ?3";

// Claim candidates, in claim order, from the partial index that holds exactly the claimable-but-for-time
// rows. (SQLite's RETURNING costs more than a plain SELECT followed by primary-key UPDATEs inside the
// writer's exclusive transaction, which is just as atomic; measured in the README.)
static CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {WI_COLS}, (SELECT r.state = 'waiting_input' FROM runs r WHERE r.id = work_items.current_run_id)
         FROM work_items INDEXED BY work_items_ready
         WHERE state IN ('queued', 'retrying') AND pending_deps = 0 AND run_at <= ?1
           AND (labels = '[]' OR NOT EXISTS (
                SELECT 1 FROM json_each(work_items.labels) l WHERE l.value NOT IN (SELECT value FROM json_each(?2))))
         ORDER BY priority DESC, run_at, id LIMIT (?3 + 0)"
    )
});

static RESUME_RUN_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE runs SET state = 'claimed', agent_id = ?2, lease_token = lease_token + 1, lease_expires_at = ?3, heartbeat_at = ?4
         WHERE id = ?1 AND state = 'waiting_input' RETURNING {RUN_COLS}"
    )
});

// Note: every `LIMIT` takes its bound value through an expression (`LIMIT (?n + 0)`): a bare bound
// `LIMIT ?n` makes SQLite re-prepare the statement on every execution.

/// Maps a rusqlite error to the backend-neutral error.
pub fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    if let rusqlite::Error::SqliteFailure(f, msg) = &e {
        let message = msg.clone().unwrap_or_else(|| f.to_string());
        match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                return StoreError::Unavailable { retryable: true, message }
            }
            ErrorCode::DiskFull | ErrorCode::SystemIoFailure | ErrorCode::CannotOpen | ErrorCode::ReadOnly => {
                return StoreError::Unavailable { retryable: false, message }
            }
            _ => {}
        }
    }
    StoreError::backend(e)
}

trait Q<T> {
    fn q(self) -> StoreResult<T>;
}
impl<T> Q<T> for rusqlite::Result<T> {
    fn q(self) -> StoreResult<T> {
        self.map_err(map_err)
    }
}

/// Registers SQL functions the schema and queries use.
pub fn register_functions(c: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    c.create_scalar_function("uuid7", 0, FunctionFlags::SQLITE_UTF8, |_| Ok(Uuid::now_v7().as_bytes().to_vec()))
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

// ---------------------------------------------------------------- projects

pub fn project_create(c: &Connection, p: NewProject) -> StoreResult<Project> {
    let pr = p.to_project();
    let repo = pr.repository.as_ref().map(json_text).transpose()?;
    let n = c
        .prepare_cached("INSERT INTO projects (id, name, description, created_at, updated_at, repository) VALUES (?1, ?2, ?3, ?4, ?4, ?5) ON CONFLICT DO NOTHING")
        .q()?
        .execute(params![b(pr.id), pr.name, pr.description, ts(p.now), repo])
        .q()?;
    if n == 0 {
        return Err(StoreError::Duplicate { entity: EntityKind::Project, key: pr.id.to_string() });
    }
    Ok(pr)
}

pub fn project_get(c: &Connection, id: ProjectId) -> StoreResult<Project> {
    c.prepare_cached(&format!("SELECT {PROJECT_COLS} FROM projects WHERE id = ?1"))
        .q()?
        .query_row([b(id)], project)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::Project, id))
}

fn project_exists(c: &Connection, id: ProjectId) -> StoreResult<()> {
    let found: Option<i64> = c
        .prepare_cached("SELECT 1 FROM projects WHERE id = ?1")
        .q()?
        .query_row([b(id)], |r| r.get(0))
        .optional()
        .q()?;
    found.map(|_| ()).ok_or_else(|| StoreError::not_found(EntityKind::Project, id))
}

fn after(page: &Page) -> Vec<u8> {
    page.after.map(|u| u.as_bytes().to_vec()).unwrap_or_default()
}

pub fn project_list(c: &Connection, page: Page) -> StoreResult<Vec<Project>> {
    let mut st = c
        .prepare_cached(&format!("SELECT {PROJECT_COLS} FROM projects WHERE id > ?1 ORDER BY id LIMIT (?2 + 0)"))
        .q()?;
    let rows = st.query_map(params![after(&page), page.effective_limit() as i64], project).q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

pub fn project_update(c: &Connection, p: ProjectUpdate) -> StoreResult<Project> {
    // ?5: whether to set the repository; ?6: the new value (NULL removes it).
    let repo = match &p.repository {
        Some(Some(r)) => Some(json_text(r)?),
        _ => None,
    };
    c.prepare_cached(&format!(
        "UPDATE projects SET name = COALESCE(?2, name), description = COALESCE(?3, description), updated_at = ?4,
         repository = CASE WHEN ?5 THEN ?6 ELSE repository END WHERE id = ?1 RETURNING {PROJECT_COLS}"
    ))
    .q()?
    .query_row(params![b(p.id), p.name, p.description, ts(p.now), p.repository.is_some(), repo], project)
    .optional()
    .q()?
    .ok_or_else(|| StoreError::not_found(EntityKind::Project, p.id))
}

pub fn project_delete(c: &Connection, id: ProjectId) -> StoreResult<()> {
    project_exists(c, id)?;
    let busy: Option<(U, String)> = c
        .query_row(
            "SELECT id, state FROM work_items WHERE project_id = ?1 AND state IN ('queued', 'running', 'waiting_input', 'retrying') LIMIT 1",
            [b(id)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .q()?;
    if let Some((wid, state)) = busy {
        return Err(StoreError::conflict(format!("project has active work item {} ({state}); cancel it first", wid.0)));
    }
    c.execute_batch("CREATE TEMP TABLE IF NOT EXISTS del_runs (id BLOB PRIMARY KEY); DELETE FROM temp.del_runs;")
        .q()?;
    c.execute("INSERT INTO temp.del_runs SELECT id FROM runs WHERE project_id = ?1", [b(id)]).q()?;
    c.execute("DELETE FROM logs WHERE run_id IN (SELECT id FROM temp.del_runs)", []).q()?;
    c.execute("DELETE FROM step_events WHERE run_id IN (SELECT id FROM temp.del_runs)", []).q()?;
    c.execute("DELETE FROM run_results WHERE project_id = ?1", [b(id)]).q()?;
    c.execute("DELETE FROM work_item_deps WHERE work_item_id IN (SELECT id FROM work_items WHERE project_id = ?1) OR depends_on IN (SELECT id FROM work_items WHERE project_id = ?1)", [b(id)]).q()?;
    for t in ["runs", "info_requests", "approvals", "drafts", "work_items", "visions"] {
        c.execute(&format!("DELETE FROM {t} WHERE project_id = ?1"), [b(id)]).q()?;
    }
    c.execute("DELETE FROM recipes WHERE project_id = ?1", [b(id)]).q()?;
    c.execute("DELETE FROM projects WHERE id = ?1", [b(id)]).q()?;
    c.execute_batch("DELETE FROM temp.del_runs;").q()?;
    Ok(())
}

// ---------------------------------------------------------------- visions

pub fn vision_put(c: &Connection, p: VisionPut) -> StoreResult<Vision> {
    project_exists(c, p.project_id)?;
    c.prepare_cached(&format!(
        "INSERT INTO visions (project_id, version, text, author, created_at)
         VALUES (?1, (SELECT COALESCE(MAX(version), 0) + 1 FROM visions WHERE project_id = ?1), ?2, ?3, ?4) RETURNING {VISION_COLS}"
    ))
    .q()?
    .query_row(params![b(p.project_id), p.text, p.author, ts(p.now)], vision)
    .q()
}

pub fn vision_get(c: &Connection, project_id: ProjectId, version: Option<u32>) -> StoreResult<Vision> {
    project_exists(c, project_id)?;
    let v = match version {
        None => c
            .prepare_cached(&format!(
                "SELECT {VISION_COLS} FROM visions WHERE project_id = ?1 ORDER BY version DESC LIMIT 1"
            ))
            .q()?
            .query_row([b(project_id)], vision)
            .optional()
            .q()?,
        Some(n) => c
            .prepare_cached(&format!("SELECT {VISION_COLS} FROM visions WHERE project_id = ?1 AND version = ?2"))
            .q()?
            .query_row(params![b(project_id), n], vision)
            .optional()
            .q()?,
    };
    v.ok_or_else(|| {
        StoreError::not_found(
            EntityKind::Vision,
            format!("{project_id}@{}", version.map_or("latest".to_string(), |n| n.to_string())),
        )
    })
}

pub fn vision_list(c: &Connection, project_id: ProjectId) -> StoreResult<Vec<Vision>> {
    project_exists(c, project_id)?;
    let mut st =
        c.prepare_cached(&format!("SELECT {VISION_COLS} FROM visions WHERE project_id = ?1 ORDER BY version")).q()?;
    let rows = st.query_map([b(project_id)], vision).q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

// ---------------------------------------------------------------- drafts and approvals

/// The recipe exists and may be used by items of `project`.
fn check_recipe(c: &Connection, id: RecipeId, project: ProjectId) -> StoreResult<()> {
    let found: Option<Option<U>> = c
        .prepare_cached("SELECT project_id FROM recipes WHERE id = ?1")
        .q()?
        .query_row([b(id)], |r| r.get(0))
        .optional()
        .q()?;
    match found {
        None => Err(StoreError::invalid("recipe_id", format!("unknown recipe `{id}`"))),
        Some(p) => rules::check_recipe_scope(id, p.map(|u| ProjectId(u.0)), project),
    }
}

fn insert_approval(
    c: &Connection,
    project_id: ProjectId,
    subject: ApprovalSubject,
    hash: &str,
    now: DateTime<Utc>,
) -> StoreResult<ApprovalRequest> {
    let a = rules::new_approval(project_id, subject, hash, now);
    let (kind, sid) = subject_parts(&subject);
    c.prepare_cached(
        "INSERT INTO approvals (id, project_id, subject_kind, subject_id, content_hash, state, requested_at) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)",
    )
    .q()?
    .execute(params![b(a.id), b(project_id), kind, B(sid), hash, ts(now)])
    .q()?;
    Ok(a)
}

fn supersede_pending(c: &Connection, approval_id: Option<ApprovalId>, now: DateTime<Utc>) -> StoreResult<()> {
    if let Some(id) = approval_id {
        c.prepare_cached(
            "UPDATE approvals SET state = 'superseded', decided_at = ?2 WHERE id = ?1 AND state = 'pending'",
        )
        .q()?
        .execute(params![b(id), ts(now)])
        .q()?;
    }
    Ok(())
}

pub fn draft_create(c: &Connection, p: NewDraft) -> StoreResult<(RequirementsDraft, Option<ApprovalRequest>)> {
    project_exists(c, p.project_id)?;
    for (i, r) in p.requirements.iter().enumerate() {
        if let Some(rid) = r.recipe_id {
            check_recipe(c, rid, p.project_id).map_err(|e| match e {
                StoreError::Invalid { message, .. } => {
                    StoreError::invalid(format!("requirements[{i}].recipe_id"), message)
                }
                other => other,
            })?;
        }
    }
    let require_approval = p.require_approval;
    let d = rules::new_draft(p);
    let hash = d.content_hash.clone();
    let n = c
        .prepare_cached(&format!("INSERT INTO drafts ({DRAFT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL) ON CONFLICT DO NOTHING"))
        .q()?
        .execute(params![
            b(d.id),
            b(d.project_id),
            d.title,
            to_json(&d.requirements)?,
            d.state.as_str(),
            d.content_hash,
            d.proposed_by,
            "[]",
            ts(d.created_at)
        ])
        .q()?;
    if n == 0 {
        return Err(StoreError::Duplicate { entity: EntityKind::RequirementsDraft, key: d.id.to_string() });
    }
    let a = if require_approval {
        Some(insert_approval(c, d.project_id, ApprovalSubject::RequirementsDraft(d.id), &hash, d.created_at)?)
    } else {
        None
    };
    Ok((d, a))
}

pub fn draft_get(c: &Connection, id: DraftId) -> StoreResult<RequirementsDraft> {
    c.prepare_cached(&format!("SELECT {DRAFT_COLS} FROM drafts WHERE id = ?1"))
        .q()?
        .query_row([b(id)], draft)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::RequirementsDraft, id))
}

pub fn draft_list(c: &Connection, project_id: ProjectId, page: Page) -> StoreResult<Vec<RequirementsDraft>> {
    project_exists(c, project_id)?;
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {DRAFT_COLS} FROM drafts WHERE project_id = ?1 AND id > ?2 ORDER BY id LIMIT (?3 + 0)"
        ))
        .q()?;
    let rows = st.query_map(params![b(project_id), after(&page), page.effective_limit() as i64], draft).q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

pub fn approval_get(c: &Connection, id: ApprovalId) -> StoreResult<ApprovalRequest> {
    c.prepare_cached(&format!("SELECT {APPROVAL_COLS} FROM approvals WHERE id = ?1"))
        .q()?
        .query_row([b(id)], approval)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::ApprovalRequest, id))
}

pub fn approval_list(c: &Connection, f: &ApprovalFilter) -> StoreResult<Vec<ApprovalRequest>> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {APPROVAL_COLS} FROM approvals WHERE id > ?1 AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR project_id = ?3) ORDER BY id LIMIT (?4 + 0)"
        ))
        .q()?;
    let rows = st
        .query_map(
            params![after(&f.page), f.state.map(|s| s.as_str()), f.project_id.map(b), f.page.effective_limit() as i64],
            approval,
        )
        .q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

fn record_decision(c: &Connection, id: ApprovalId, to: ApprovalState, d: &Decide) -> StoreResult<ApprovalRequest> {
    c.prepare_cached(&format!("UPDATE approvals SET state = ?2, decided_by = ?3, decided_at = ?4, reason = ?5 WHERE id = ?1 RETURNING {APPROVAL_COLS}"))
        .q()?
        .query_row(params![b(id), to.as_str(), d.decided_by, ts(d.now), d.reason], approval)
        .q()
}

pub fn decide(
    c: &Connection,
    approval_id: Option<ApprovalId>,
    draft_id: Option<DraftId>,
    d: &Decide,
) -> StoreResult<DecisionOutcome> {
    let approval = match approval_id {
        Some(id) => Some(approval_get(c, id)?),
        None => None,
    };
    let (subject, to_approval) = rules::decision_subject(approval.as_ref(), draft_id, d.decision)?;
    let mut out = DecisionOutcome { approval: None, draft: None, work_items: Vec::new() };
    match subject {
        ApprovalSubject::RequirementsDraft(did) => {
            let dr = draft_get(c, did)?;
            let to = rules::draft_decision(&dr, approval.as_ref(), d.decision)?;
            let pending: Option<U> = c
                .query_row(
                    "SELECT id FROM approvals WHERE subject_id = ?1 AND state = 'pending' ORDER BY id LIMIT 1",
                    [b(did)],
                    |r| r.get(0),
                )
                .optional()
                .q()?;
            let approval_id = approval.as_ref().map(|a| a.id).or(pending.map(|u| ApprovalId(u.0)));
            let mut items = Vec::new();
            if d.decision == Decision::Approve {
                items = rules::draft_work_items(&dr, d.now);
                for w in &items {
                    insert_work_item(c, w)?;
                }
            }
            let ids: Vec<WorkItemId> = items.iter().map(|w| w.id).collect();
            let updated = c
                .prepare_cached(&format!("UPDATE drafts SET state = ?2, decided_at = ?3, work_item_ids = ?4 WHERE id = ?1 RETURNING {DRAFT_COLS}"))
                .q()?
                .query_row(params![b(did), to.as_str(), ts(d.now), to_json(&ids)?], draft)
                .q()?;
            out.draft = Some(updated);
            out.work_items = items;
            if let Some(aid) = approval_id {
                out.approval = Some(record_decision(c, aid, to_approval, d)?);
            }
        }
        ApprovalSubject::WorkItem(wid) => {
            let a = approval.ok_or_else(|| StoreError::invalid("id", "work items are decided through approvals"))?;
            let item = work_item_get(c, wid)?;
            let to = rules::work_item_decision(&item, &a, d.decision)?;
            set_item_state(c, wid, to, d.now)?;
            out.approval = Some(record_decision(c, a.id, to_approval, d)?);
            out.work_items.push(work_item_get(c, wid)?);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- recipes

pub fn recipe_create(c: &Connection, p: NewRecipe) -> StoreResult<ToolRecipe> {
    if let Some(pid) = p.project_id {
        project_exists(c, pid)?;
    }
    let r = rules::new_recipe(p);
    let n = c
        .prepare_cached(&format!(
            "INSERT INTO recipes ({RECIPE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING"
        ))
        .q()?
        .execute(params![b(r.id), r.project_id.map(b), r.name, r.yaml, to_json(&r.spec)?, ts(r.created_at)])
        .q()?;
    if n == 0 {
        return Err(StoreError::Duplicate { entity: EntityKind::ToolRecipe, key: r.id.to_string() });
    }
    Ok(r)
}

pub fn recipe_get(c: &Connection, id: RecipeId) -> StoreResult<ToolRecipe> {
    c.prepare_cached(&format!("SELECT {RECIPE_COLS} FROM recipes WHERE id = ?1"))
        .q()?
        .query_row([b(id)], recipe)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::ToolRecipe, id))
}

pub fn recipe_list(c: &Connection, page: Page) -> StoreResult<Vec<ToolRecipe>> {
    let mut st =
        c.prepare_cached(&format!("SELECT {RECIPE_COLS} FROM recipes WHERE id > ?1 ORDER BY id LIMIT (?2 + 0)")).q()?;
    let rows = st.query_map(params![after(&page), page.effective_limit() as i64], recipe).q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

// ---------------------------------------------------------------- work items

/// The JSON columns of a work item row, encoded ahead of the write.
#[derive(Clone)]
pub struct RowJson {
    labels: String,
    dependencies: String,
    retry: String,
}

impl RowJson {
    /// Encodes the JSON columns of `w`.
    pub fn of(w: &WorkItem) -> StoreResult<RowJson> {
        Ok(RowJson { labels: to_json(&w.labels)?, dependencies: to_json(&w.dependencies)?, retry: to_json(&w.retry)? })
    }
}

fn insert_work_item(c: &Connection, w: &WorkItem) -> StoreResult<()> {
    insert_work_item_with(c, w, &RowJson::of(w)?)
}

/// Multi-row inserts of work items come in these sizes only (largest first), so a few statement
/// shapes serve every batch.
const INSERT_SIZES: [usize; 4] = [64, 16, 4, 1];

/// A creation writes its rows whenever this many are waiting (one multi-row statement).
pub const INSERT_CHUNK: usize = INSERT_SIZES[0];

/// Columns bound per inserted work item row.
const WI_PARAMS: usize = 22;

/// `INSERT INTO work_items` statements for `n` rows, by size.
static INSERT_WI_SQL: std::sync::LazyLock<HashMap<usize, String>> = std::sync::LazyLock::new(|| {
    INSERT_SIZES
        .iter()
        .map(|&n| {
            let rows: Vec<String> = (0..n)
                .map(|k| {
                    let ps: Vec<String> = (1..=WI_PARAMS).map(|i| format!("?{}", k * WI_PARAMS + i)).collect();
                    format!("({}, 0)", ps.join(", "))
                })
                .collect();
            (n, format!("INSERT INTO work_items ({WI_COLS}) VALUES {}", rows.join(", ")))
        })
        .collect()
});

/// Appends the parameters of one work item row (in `WI_COLS` order) to `out`.
fn push_work_item_params<'a>(out: &mut Vec<rusqlite::types::ToSqlOutput<'a>>, w: &'a WorkItem, j: &'a RowJson) {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    let blob = |u: &'a Uuid| ToSqlOutput::Borrowed(ValueRef::Blob(u.as_bytes()));
    let text = |t: &'a str| ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes()));
    let int = |v: i64| ToSqlOutput::Owned(rusqlite::types::Value::Integer(v));
    let null = || ToSqlOutput::Borrowed(ValueRef::Null);
    let opt_blob = |u: Option<&'a Uuid>| u.map_or_else(null, blob);
    let opt_text = |t: Option<&'a String>| t.map_or_else(null, |t| text(t));
    let opt_int = |v: Option<i64>| v.map_or_else(null, int);
    out.extend([
        blob(&w.id.0),
        blob(&w.project_id.0),
        text(&w.title),
        text(&w.description),
        opt_blob(w.recipe_id.as_ref().map(|r| &r.0)),
        text(&j.labels),
        text(w.state.as_str()),
        int(i64::from(w.priority)),
        text(&j.dependencies),
        text(&j.retry),
        opt_text(w.idempotency_key.as_ref()),
        text(&w.content_hash),
        opt_blob(w.approval_id.as_ref().map(|r| &r.0)),
        opt_blob(w.draft_id.as_ref().map(|r| &r.0)),
        opt_text(w.blocked_reason.as_ref()),
        int(i64::from(w.attempts)),
        opt_blob(w.current_run_id.as_ref().map(|r| &r.0)),
        opt_int(ts_opt(w.run_at)),
        opt_text(w.last_error.as_ref()),
        int(ts(w.created_at)),
        int(ts(w.updated_at)),
        opt_int(ts_opt(w.enqueued_at)),
    ]);
}

/// Inserts new work items with as few statements as [`INSERT_SIZES`] allows. When a multi-row
/// statement fails (it then wrote nothing), its rows go in one by one so the error names the row.
fn insert_work_items(c: &Connection, rows: &[(&WorkItem, &RowJson)]) -> StoreResult<()> {
    let mut rest = rows;
    while !rest.is_empty() {
        let n = INSERT_SIZES.iter().copied().find(|&n| n <= rest.len()).unwrap_or(1);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        if n == 1 {
            insert_work_item_checked(c, chunk[0].0, chunk[0].1)?;
            continue;
        }
        let mut vals = Vec::with_capacity(n * WI_PARAMS);
        for (w, j) in chunk {
            push_work_item_params(&mut vals, w, j);
        }
        let sql = INSERT_WI_SQL.get(&n).ok_or_else(|| StoreError::conflict("no insert statement"))?;
        let res = c.prepare_cached(sql).q()?.execute(rusqlite::params_from_iter(vals.iter()));
        if let Err(e) = res {
            if c.is_autocommit() {
                // SQLite rolled the whole transaction back (I/O error, disk full): nothing to retry in.
                return Err(map_err(e));
            }
            for (w, j) in chunk {
                insert_work_item_checked(c, w, j)?;
            }
        }
    }
    Ok(())
}

/// Inserts one work item; a primary-key clash is reported as a duplicate.
fn insert_work_item_checked(c: &Connection, w: &WorkItem, j: &RowJson) -> StoreResult<()> {
    if let Err(e) = insert_work_item_with(c, w, j) {
        if let StoreError::Backend { .. } = &e {
            let exists: Option<i64> = c
                .prepare_cached("SELECT 1 FROM work_items WHERE id = ?1")
                .q()?
                .query_row([b(w.id)], |r| r.get(0))
                .optional()
                .q()?;
            if exists.is_some() {
                return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: w.id.to_string() });
            }
        }
        return Err(e);
    }
    Ok(())
}

fn insert_work_item_with(c: &Connection, w: &WorkItem, j: &RowJson) -> StoreResult<()> {
    c.prepare_cached(&INSERT_WI_SQL[&1])
        .q()?
        .execute(params![
            b(w.id),
            b(w.project_id),
            w.title,
            w.description,
            w.recipe_id.map(b),
            j.labels,
            w.state.as_str(),
            w.priority,
            j.dependencies,
            j.retry,
            w.idempotency_key,
            w.content_hash,
            w.approval_id.map(b),
            w.draft_id.map(b),
            w.blocked_reason,
            w.attempts,
            w.current_run_id.map(b),
            ts_opt(w.run_at),
            w.last_error,
            ts(w.created_at),
            ts(w.updated_at),
            ts_opt(w.enqueued_at)
        ])
        .q()?;
    Ok(())
}

/// Writes every mutable column of a work item back.
fn save_work_item(c: &Connection, w: &WorkItem) -> StoreResult<()> {
    c.prepare_cached(
        "UPDATE work_items SET title = ?2, description = ?3, recipe_id = ?4, labels = ?5, state = ?6, priority = ?7, dependencies = ?8,
         retry = ?9, content_hash = ?10, approval_id = ?11, blocked_reason = ?12, attempts = ?13, current_run_id = ?14, run_at = ?15,
         last_error = ?16, updated_at = ?17, enqueued_at = ?18 WHERE id = ?1",
    )
    .q()?
    .execute(params![
        b(w.id),
        w.title,
        w.description,
        w.recipe_id.map(b),
        to_json(&w.labels)?,
        w.state.as_str(),
        w.priority,
        to_json(&w.dependencies)?,
        to_json(&w.retry)?,
        w.content_hash,
        w.approval_id.map(b),
        w.blocked_reason,
        w.attempts,
        w.current_run_id.map(b),
        ts_opt(w.run_at),
        w.last_error,
        ts(w.updated_at),
        ts_opt(w.enqueued_at)
    ])
    .q()?;
    Ok(())
}

pub fn work_item_get(c: &Connection, id: WorkItemId) -> StoreResult<WorkItem> {
    work_item_get_pending(c, id).map(|(w, _)| w)
}

fn work_item_get_pending(c: &Connection, id: WorkItemId) -> StoreResult<(WorkItem, u32)> {
    c.prepare_cached(&format!("SELECT {WI_COLS} FROM work_items WHERE id = ?1"))
        .q()?
        .query_row([b(id)], work_item_pending)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))
}

fn set_item_state(c: &Connection, id: WorkItemId, to: WorkItemState, now: DateTime<Utc>) -> StoreResult<()> {
    c.prepare_cached("UPDATE work_items SET state = ?2, updated_at = ?3 WHERE id = ?1")
        .q()?
        .execute(params![b(id), to.as_str(), ts(now)])
        .q()?;
    Ok(())
}

/// Count of the item's dependencies that have not succeeded.
fn count_pending(c: &Connection, id: WorkItemId) -> StoreResult<u32> {
    c.prepare_cached(
        "SELECT COUNT(*) FROM work_item_deps d JOIN work_items w ON w.id = d.depends_on WHERE d.work_item_id = ?1 AND w.state <> 'succeeded'",
    )
    .q()?
    .query_row([b(id)], |r| r.get(0))
    .q()
}

fn refresh_pending(c: &Connection, id: WorkItemId) -> StoreResult<u32> {
    let n = count_pending(c, id)?;
    c.prepare_cached("UPDATE work_items SET pending_deps = ?2 WHERE id = ?1").q()?.execute(params![b(id), n]).q()?;
    Ok(n)
}

fn blocking_dep(c: &Connection, id: WorkItemId) -> StoreResult<Option<(WorkItemId, WorkItemState)>> {
    let r: Option<(U, String)> = c
        .prepare_cached(
            "SELECT w.id, w.state FROM work_item_deps d JOIN work_items w ON w.id = d.depends_on
             WHERE d.work_item_id = ?1 AND w.state IN ('failed', 'cancelled', 'blocked') ORDER BY w.id LIMIT 1",
        )
        .q()?
        .query_row([b(id)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .q()?;
    match r {
        Some((u, s)) => Ok(Some((
            WorkItemId(u.0),
            s.parse().map_err(|e: UnknownState| StoreError::invalid("state", e.to_string()))?,
        ))),
        None => Ok(None),
    }
}

fn dependents(c: &Connection, id: WorkItemId) -> StoreResult<Vec<WorkItemId>> {
    let mut st = c.prepare_cached("SELECT work_item_id FROM work_item_deps WHERE depends_on = ?1").q()?;
    let rows = st.query_map([b(id)], |r| r.get::<_, U>(0)).q()?;
    rows.map(|r| r.map(|u| WorkItemId(u.0))).collect::<rusqlite::Result<Vec<_>>>().q()
}

fn deps_of(c: &Connection, id: WorkItemId) -> StoreResult<Vec<WorkItemId>> {
    let mut st = c.prepare_cached("SELECT depends_on FROM work_item_deps WHERE work_item_id = ?1").q()?;
    let rows = st.query_map([b(id)], |r| r.get::<_, U>(0)).q()?;
    rows.map(|r| r.map(|u| WorkItemId(u.0))).collect::<rusqlite::Result<Vec<_>>>().q()
}

/// Item `id` succeeded: refreshes its dependents' pending counts; returns those now claimable.
fn release_dependents(c: &Connection, id: WorkItemId) -> StoreResult<Vec<WorkItemId>> {
    let deps = dependents(c, id)?;
    let mut released = Vec::new();
    for d in deps {
        let n = refresh_pending(c, d)?;
        if n == 0 {
            let st: String = c
                .prepare_cached("SELECT state FROM work_items WHERE id = ?1")
                .q()?
                .query_row([b(d)], |r| r.get(0))
                .q()?;
            if st == "queued" || st == "retrying" {
                released.push(d);
            }
        }
    }
    Ok(released)
}

fn block_dependents(c: &Connection, id: WorkItemId, now: DateTime<Utc>) -> StoreResult<Vec<WorkItemId>> {
    let mut blocked = Vec::new();
    let mut stack = vec![id];
    while let Some(cur) = stack.pop() {
        let cur_state: String = c
            .prepare_cached("SELECT state FROM work_items WHERE id = ?1")
            .q()?
            .query_row([b(cur)], |r| r.get(0))
            .q()?;
        let cur_state: WorkItemState =
            cur_state.parse().map_err(|e: UnknownState| StoreError::invalid("state", e.to_string()))?;
        let reason = rules::blocked_reason(cur, cur_state);
        let mut st = c
            .prepare_cached(
                "UPDATE work_items SET state = 'blocked', blocked_reason = ?2, updated_at = ?3
                 WHERE id IN (SELECT work_item_id FROM work_item_deps WHERE depends_on = ?1) AND state IN ('queued', 'retrying') RETURNING id",
            )
            .q()?;
        let ids = st
            .query_map(params![b(cur), reason, ts(now)], |r| r.get::<_, U>(0))
            .q()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .q()?;
        for u in ids {
            blocked.push(WorkItemId(u.0));
            stack.push(WorkItemId(u.0));
        }
    }
    Ok(blocked)
}

fn unblock_dependents(c: &Connection, id: WorkItemId, now: DateTime<Utc>) -> StoreResult<()> {
    let mut stack = vec![id];
    while let Some(cur) = stack.pop() {
        for d in dependents(c, cur)? {
            let st: String = c
                .prepare_cached("SELECT state FROM work_items WHERE id = ?1")
                .q()?
                .query_row([b(d)], |r| r.get(0))
                .q()?;
            match st.as_str() {
                "blocked" if blocking_dep(c, d)?.is_none() => {
                    c.prepare_cached("UPDATE work_items SET state = 'queued', blocked_reason = NULL, run_at = ?2, updated_at = ?2 WHERE id = ?1")
                        .q()?
                        .execute(params![b(d), ts(now)])
                        .q()?;
                    refresh_pending(c, d)?;
                    stack.push(d);
                }
                "blocked" => {
                    // Still blocked by another dependency: name that one.
                    let reason = blocking_dep(c, d)?.map(|(x, s)| rules::blocked_reason(x, s));
                    c.prepare_cached("UPDATE work_items SET blocked_reason = ?2 WHERE id = ?1")
                        .q()?
                        .execute(params![b(d), reason])
                        .q()?;
                }
                // Every other dependent keeps an exact count, whatever its state, so that it waits
                // again when it next becomes claimable.
                _ => {
                    refresh_pending(c, d)?;
                }
            }
        }
    }
    Ok(())
}

fn transition_err(from: WorkItemState, to: WorkItemState) -> StoreError {
    match from.transition(to) {
        Err(e) => StoreError::InvalidTransition(e),
        Ok(s) => StoreError::conflict(format!("work item is {s}")),
    }
}

pub fn enqueue_checked(c: &Connection, items: &[Enqueue], now: DateTime<Utc>) -> StoreResult<Vec<ScheduledTask>> {
    let mut extra: HashMap<WorkItemId, Vec<WorkItemId>> = HashMap::new();
    let mut loaded = Vec::with_capacity(items.len());
    rules::check_distinct_enqueues(items)?;
    for e in items {
        let item = work_item_get(c, e.work_item_id)?;
        if item.state != WorkItemState::Ready {
            return Err(transition_err(item.state, WorkItemState::Queued));
        }
        if e.options.depends_on.len() + item.dependencies.len() > rules::MAX_DEPENDENCIES {
            return Err(StoreError::invalid("depends_on", format!("at most {} dependencies", rules::MAX_DEPENDENCIES)));
        }
        for dep in &e.options.depends_on {
            let p: Option<U> = c
                .prepare_cached("SELECT project_id FROM work_items WHERE id = ?1")
                .q()?
                .query_row([b(*dep)], |r| r.get(0))
                .optional()
                .q()?;
            if p.map(|u| u.0) != Some(item.project_id.0) {
                return Err(rules::unknown_dependency(*dep, item.project_id));
            }
        }
        if !e.options.depends_on.is_empty() {
            let mut err = None;
            let cyc = rules::find_cycle(e.work_item_id, &e.options.depends_on, |n| {
                let mut v = match deps_of(c, n) {
                    Ok(v) => v,
                    Err(x) => {
                        err = Some(x);
                        Vec::new()
                    }
                };
                if let Some(x) = extra.get(&n) {
                    v.extend(x.iter().copied());
                }
                v
            });
            if let Some(x) = err {
                return Err(x);
            }
            if let Some(cy) = cyc {
                return Err(rules::cycle_error(&cy));
            }
            extra.entry(e.work_item_id).or_default().extend(e.options.depends_on.iter().copied());
        }
        loaded.push(item);
    }
    let mut out = Vec::with_capacity(items.len());
    for (e, mut it) in items.iter().zip(loaded) {
        for d in &e.options.depends_on {
            c.prepare_cached("INSERT OR IGNORE INTO work_item_deps (depends_on, work_item_id) VALUES (?1, ?2)")
                .q()?
                .execute(params![b(*d), b(it.id)])
                .q()?;
            c.prepare_cached("UPDATE work_items SET has_dependents = 1 WHERE id = ?1").q()?.execute([b(*d)]).q()?;
        }
        rules::apply_enqueue(&mut it, &e.options, now);
        match blocking_dep(c, it.id)? {
            Some((d, s)) => {
                it.state = WorkItemState::Blocked;
                it.blocked_reason = Some(rules::blocked_reason(d, s));
            }
            None => it.state = WorkItemState::Queued,
        }
        save_work_item(c, &it)?;
        if it.state == WorkItemState::Blocked {
            // Items already waiting on this one can no longer run either.
            block_dependents(c, it.id, now)?;
        }
        let pending = if it.dependencies.is_empty() { 0 } else { refresh_pending(c, it.id)? };
        out.push(it.scheduled_task(pending));
    }
    Ok(out)
}

/// `items` pairs each creation with its prepared row (`rules::new_work_item`, built before the command
/// reaches the writer thread so hashing and allocation happen off it).
///
/// `items` may be a stream that the caller is still preparing (see the SQLite store's
/// `work_items_create`): rows are written every [`INSERT_CHUNK`] items as they arrive.
pub fn work_items_create(
    c: &Connection,
    items: impl IntoIterator<Item = (NewWorkItem, WorkItem, RowJson)>,
    now: DateTime<Utc>,
) -> StoreResult<(Vec<WorkItemCreated>, bool)> {
    let items = items.into_iter();
    let mut out = Vec::with_capacity(items.size_hint().0);
    let mut enqueues = Vec::new();
    let mut seen_keys: HashMap<(ProjectId, String), ()> = HashMap::new();
    let mut known_projects: std::collections::HashSet<ProjectId> = std::collections::HashSet::new();
    // Rows waiting to be inserted (index into `out`, JSON columns): written in multi-row statements
    // before anything reads work items back, and before any error is returned (so a failing batch
    // reports the same first error as writing row by row would).
    let mut pending: Vec<(usize, RowJson)> = Vec::new();
    let flush = |out: &[WorkItemCreated], pending: &mut Vec<(usize, RowJson)>| -> StoreResult<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let rows: Vec<(&WorkItem, &RowJson)> = pending.iter().map(|(i, j)| (&out[*i].work_item, j)).collect();
        let r = insert_work_items(c, &rows);
        pending.clear();
        r
    };
    for (p, w, json) in items {
        let step = create_one(
            c,
            p,
            w,
            json,
            now,
            &mut out,
            &mut pending,
            &mut enqueues,
            &mut seen_keys,
            &mut known_projects,
            &flush,
        );
        if let Err(e) = step {
            flush(&out, &mut pending)?;
            return Err(e);
        }
        if pending.len() >= INSERT_CHUNK {
            flush(&out, &mut pending)?;
        }
    }
    flush(&out, &mut pending)?;
    let notify = !enqueues.is_empty() || out.iter().any(|o| o.created && o.work_item.state == WorkItemState::Queued);
    if !enqueues.is_empty() {
        let list: Vec<Enqueue> = enqueues.iter().map(|(_, e)| e.clone()).collect();
        let tasks = enqueue_checked(c, &list, now)?;
        for ((idx, _), t) in enqueues.iter().zip(tasks) {
            let w = &mut out[*idx].work_item;
            rules::apply_scheduled(w, t, now);
        }
    }
    Ok((out, notify))
}

type Flush<'f> = dyn Fn(&[WorkItemCreated], &mut Vec<(usize, RowJson)>) -> StoreResult<()> + 'f;

/// One creation of [`work_items_create`]: checks it and queues its row in `pending`.
#[allow(clippy::too_many_arguments)]
fn create_one(
    c: &Connection,
    p: NewWorkItem,
    mut w: WorkItem,
    json: RowJson,
    now: DateTime<Utc>,
    out: &mut Vec<WorkItemCreated>,
    pending: &mut Vec<(usize, RowJson)>,
    enqueues: &mut Vec<(usize, Enqueue)>,
    seen_keys: &mut HashMap<(ProjectId, String), ()>,
    known_projects: &mut std::collections::HashSet<ProjectId>,
    flush: &Flush<'_>,
) -> StoreResult<()> {
    {
        if known_projects.insert(p.project_id) {
            project_exists(c, p.project_id)?;
        }
        if let Some(rid) = p.recipe_id {
            check_recipe(c, rid, p.project_id)?;
        }
        if !matches!(p.state, WorkItemState::Draft | WorkItemState::AwaitingApproval | WorkItemState::Ready) {
            return Err(StoreError::invalid("state", format!("a work item cannot be created as {}", p.state)));
        }
        if p.enqueue.is_some() && p.state != WorkItemState::Ready {
            return Err(StoreError::conflict(format!("work item {} needs approval before it can be enqueued", p.id)));
        }
        if let Some(k) = &p.idempotency_key {
            // A key created earlier in this same batch is a duplicate (as if the batch were validated
            // before any of it was written); a key that existed before returns the existing item.
            if seen_keys.contains_key(&(p.project_id, k.clone())) {
                return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: k.clone() });
            }
            let ex: Option<WorkItem> = c
                .prepare_cached(&format!(
                    "SELECT {WI_COLS} FROM work_items WHERE project_id = ?1 AND idempotency_key = ?2"
                ))
                .q()?
                .query_row(params![b(p.project_id), k], work_item)
                .optional()
                .q()?;
            if let Some(ex) = ex {
                if ex.content_hash != w.content_hash {
                    return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: k.clone() });
                }
                out.push(WorkItemCreated { work_item: ex, created: false, approval: None });
                return Ok(());
            }
            seen_keys.insert((p.project_id, k.clone()), ());
        }
        if let Some(e) = &p.enqueue {
            if e.depends_on.len() > rules::MAX_DEPENDENCIES {
                return Err(StoreError::invalid(
                    "depends_on",
                    format!("at most {} dependencies", rules::MAX_DEPENDENCIES),
                ));
            }
            // Dependencies may name items created earlier in this batch: write those first.
            if !e.depends_on.is_empty() {
                flush(out, pending)?;
            }
            for dep in &e.depends_on {
                let proj: Option<U> = c
                    .prepare_cached("SELECT project_id FROM work_items WHERE id = ?1")
                    .q()?
                    .query_row([b(*dep)], |r| r.get(0))
                    .optional()
                    .q()?;
                if *dep == p.id || proj.map(|u| u.0) != Some(p.project_id.0) {
                    return Err(rules::unknown_dependency(*dep, p.project_id));
                }
            }
        }
        // Fast path: a new item enqueued without dependencies is written once, already queued.
        let direct_enqueue = rules::enqueue_on_create(&mut w, p.enqueue.as_ref(), now)?;
        let approval = if p.state == WorkItemState::AwaitingApproval {
            Some(insert_approval(c, w.project_id, ApprovalSubject::WorkItem(w.id), &w.content_hash, now)?)
        } else {
            None
        };
        w.approval_id = approval.as_ref().map(|a| a.id);
        if let Some(e) = p.enqueue.filter(|_| !direct_enqueue) {
            enqueues.push((out.len(), Enqueue { work_item_id: w.id, options: e }));
        }
        pending.push((out.len(), json));
        out.push(WorkItemCreated { work_item: w, created: true, approval });
    }
    Ok(())
}

pub fn work_item_list(c: &Connection, f: &WorkItemFilter) -> StoreResult<Vec<WorkItem>> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {WI_COLS} FROM work_items WHERE id > ?1 AND (?2 IS NULL OR project_id = ?2) AND (?3 IS NULL OR state = ?3)
             AND (?4 IS NULL OR EXISTS (SELECT 1 FROM json_each(work_items.labels) WHERE value = ?4)) ORDER BY id LIMIT (?5 + 0)"
        ))
        .q()?;
    let rows = st
        .query_map(
            params![
                after(&f.page),
                f.project_id.map(b),
                f.state.map(|s| s.as_str()),
                f.label,
                f.page.effective_limit() as i64
            ],
            work_item,
        )
        .q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

pub fn work_item_update(c: &Connection, p: WorkItemUpdate) -> StoreResult<WorkItemChanged> {
    let item = work_item_get(c, p.id)?;
    let (mut w, needs_approval) = rules::apply_update(&item, &p)?;
    if let Some(Some(rid)) = p.recipe_id {
        check_recipe(c, rid, item.project_id)?;
    }
    let mut approval = None;
    if needs_approval {
        supersede_pending(c, item.approval_id, p.now)?;
        let a = insert_approval(c, item.project_id, ApprovalSubject::WorkItem(item.id), &w.content_hash, p.now)?;
        w.approval_id = Some(a.id);
        approval = Some(a);
    }
    save_work_item(c, &w)?;
    Ok(WorkItemChanged { work_item: w, approval })
}

pub fn work_item_submit(
    c: &Connection,
    id: WorkItemId,
    require_approval: bool,
    now: DateTime<Utc>,
) -> StoreResult<WorkItemChanged> {
    let mut item = work_item_get(c, id)?;
    let to = if require_approval { WorkItemState::AwaitingApproval } else { WorkItemState::Ready };
    if item.state != WorkItemState::Draft {
        return Err(transition_err(item.state, to));
    }
    item.state = to;
    item.updated_at = now;
    let mut approval = None;
    if require_approval {
        let a = insert_approval(c, item.project_id, ApprovalSubject::WorkItem(id), &item.content_hash, now)?;
        item.approval_id = Some(a.id);
        approval = Some(a);
    }
    save_work_item(c, &item)?;
    Ok(WorkItemChanged { work_item: item, approval })
}

pub fn work_item_set_policy(
    c: &Connection,
    id: WorkItemId,
    retry: RetryOverrides,
    now: DateTime<Utc>,
) -> StoreResult<WorkItem> {
    c.prepare_cached(&format!("UPDATE work_items SET retry = ?2, updated_at = ?3 WHERE id = ?1 RETURNING {WI_COLS}"))
        .q()?
        .query_row(params![b(id), to_json(&retry)?, ts(now)], work_item)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))
}

fn cancel_run_row(c: &Connection, run_id: RunId, reason: &str, now: DateTime<Utc>) -> StoreResult<()> {
    c.prepare_cached(
        "UPDATE runs SET state = 'cancelled', error = ?2, finished_at = ?3, lease_expires_at = NULL
         WHERE id = ?1 AND state IN ('claimed', 'running', 'waiting_input')",
    )
    .q()?
    .execute(params![b(run_id), reason, ts(now)])
    .q()?;
    c.prepare_cached("UPDATE info_requests SET state = 'cancelled' WHERE run_id = ?1 AND state = 'pending'")
        .q()?
        .execute([b(run_id)])
        .q()?;
    Ok(())
}

pub fn cancel_item(c: &Connection, id: WorkItemId, reason: &str, now: DateTime<Utc>) -> StoreResult<WorkItem> {
    let mut item = work_item_get(c, id)?;
    item.state.transition(WorkItemState::Cancelled)?;
    if let Some(run_id) = item.current_run_id {
        cancel_run_row(c, run_id, reason, now)?;
    }
    supersede_pending(c, item.approval_id, now)?;
    item.state = WorkItemState::Cancelled;
    item.last_error = Some(reason.to_string());
    item.run_at = None;
    item.updated_at = now;
    save_work_item(c, &item)?;
    block_dependents(c, id, now)?;
    Ok(item)
}

fn requeue_item(c: &Connection, id: WorkItemId, r: &Requeue) -> StoreResult<WorkItem> {
    let mut item = work_item_get(c, id)?;
    if !item.state.is_requeueable() && !item.state.has_active_run() {
        return Err(transition_err(item.state, WorkItemState::Queued));
    }
    let was = item.state;
    let blocking = blocking_dep(c, id)?;
    item.state = if blocking.is_some() { WorkItemState::Blocked } else { WorkItemState::Queued };
    item.blocked_reason = blocking.map(|(d, s)| rules::blocked_reason(d, s));
    if was.is_finished() {
        item.attempts = 0;
        item.last_error = None;
    }
    item.run_at = Some(r.run_at);
    item.enqueued_at = Some(r.now);
    item.updated_at = r.now;
    save_work_item(c, &item)?;
    if !item.dependencies.is_empty() {
        refresh_pending(c, id)?;
    }
    if was.blocks_dependents() || was == WorkItemState::Succeeded {
        unblock_dependents(c, id, r.now)?;
    }
    if item.state == WorkItemState::Blocked {
        // Requeued behind a dependency that will not succeed: the items waiting on it are blocked too.
        block_dependents(c, id, r.now)?;
    }
    Ok(item)
}

pub fn work_item_requeue(c: &Connection, id: WorkItemId, r: &Requeue) -> StoreResult<WorkItem> {
    let item = work_item_get(c, id)?;
    if item.state.has_active_run() {
        return Err(StoreError::conflict(format!(
            "work item {id} has an active run; requeue the run or cancel the item"
        )));
    }
    requeue_item(c, id, r)
}

pub fn scheduled_task_get(c: &Connection, id: WorkItemId) -> StoreResult<ScheduledTask> {
    let (w, _) = work_item_get_pending(c, id)?;
    let pending = if w.dependencies.is_empty() { 0 } else { count_pending(c, id)? };
    Ok(w.scheduled_task(pending))
}

pub fn queue_list(c: &Connection, f: &QueueFilter) -> StoreResult<Vec<ScheduledTask>> {
    // Keyset cursor: continue after the cursor item's place in queue order, even if it has left the
    // queue since (an unknown cursor starts from the top).
    let cursor: Option<(i64, i64, U)> = match f.page.after {
        Some(a) => c
            .prepare_cached("SELECT -priority, COALESCE(run_at, created_at), id FROM work_items WHERE id = ?1")
            .q()?
            .query_row([B(a)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .q()?,
        None => None,
    };
    let (cp, cr, cid) = match &cursor {
        Some((p, r, id)) => (Some(*p), Some(*r), Some(B(id.0))),
        None => (None, None, None),
    };
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {WI_COLS} FROM work_items WHERE state IN ('queued', 'retrying', 'blocked') AND (?1 IS NULL OR project_id = ?1)
               AND (?2 IS NULL OR (-priority, COALESCE(run_at, created_at), id) > (?2, ?3, ?4))
             ORDER BY priority DESC, COALESCE(run_at, created_at), id LIMIT (?5 + 0)"
        ))
        .q()?;
    let rows = st
        .query_map(params![f.project_id.map(b), cp, cr, cid, f.page.effective_limit() as i64], work_item)
        .q()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .q()?;
    let mut out = Vec::new();
    for w in rows {
        let pending = if w.dependencies.is_empty() { 0 } else { count_pending(c, w.id)? };
        out.push(w.scheduled_task(pending));
    }
    Ok(out)
}

// ---------------------------------------------------------------- failures, reaping, ticks

fn fail_item(
    c: &Connection,
    id: WorkItemId,
    kind: FailureKind,
    error: &str,
    defaults: &RetryPolicy,
    now: DateTime<Utc>,
) -> StoreResult<(WorkItemState, Option<DateTime<Utc>>, Vec<WorkItemId>)> {
    let (state, attempts, retry): (String, u32, String) = c
        .prepare_cached("SELECT state, attempts, retry FROM work_items WHERE id = ?1")
        .q()?
        .query_row([b(id)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))?;
    let state: WorkItemState = state.parse().map_err(|e: UnknownState| StoreError::invalid("state", e.to_string()))?;
    let overrides: RetryOverrides = serde_json::from_str(&retry).map_err(StoreError::backend)?;
    let (mut next, mut retry_at) = rules::after_failure(defaults, &overrides, attempts, kind, now);
    state.transition(next)?;
    // A retry can never run while a dependency will not succeed: the item is blocked instead.
    let mut reason = None;
    if next == WorkItemState::Retrying {
        if let Some((d, s)) = blocking_dep(c, id)? {
            reason = Some(rules::blocked_reason(d, s));
            (next, retry_at) = (WorkItemState::Blocked, None);
        }
    }
    c.prepare_cached("UPDATE work_items SET state = ?2, last_error = ?3, updated_at = ?4, run_at = ?5, blocked_reason = ?6 WHERE id = ?1")
        .q()?
        .execute(params![b(id), next.as_str(), error, ts(now), ts_opt(retry_at), reason])
        .q()?;
    let blocked = if next.blocks_dependents() { block_dependents(c, id, now)? } else { Vec::new() };
    Ok((next, retry_at, blocked))
}

pub fn reap(c: &Connection, t: &Tick) -> StoreResult<Vec<ReapedRun>> {
    let mut st = c
        .prepare_cached(
            "UPDATE runs SET state = 'lost', error = 'lease expired', failure_kind = 'retryable', finished_at = ?1, lease_expires_at = NULL
             WHERE id IN (SELECT id FROM runs WHERE state IN ('claimed', 'running') AND lease_expires_at <= ?1 ORDER BY lease_expires_at LIMIT (?2 + 0))
             RETURNING id, work_item_id",
        )
        .q()?;
    let rows = st
        .query_map(params![ts(t.now), t.limit.max(1) as i64], |r| Ok((r.get::<_, U>(0)?, r.get::<_, U>(1)?)))
        .q()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .q()?;
    let mut out = Vec::with_capacity(rows.len());
    for (rid, wid) in rows {
        let wid = WorkItemId(wid.0);
        let (state, retry_at, _) =
            fail_item(c, wid, FailureKind::Retryable, "lease expired", &t.retry_defaults, t.now)?;
        out.push(ReapedRun { run_id: RunId(rid.0), work_item_id: wid, work_item_state: state, retry_at });
    }
    Ok(out)
}

pub fn tick(c: &Connection, t: &Tick) -> StoreResult<(TickReport, bool)> {
    let mut st = c
        .prepare_cached(
            "UPDATE work_items SET state = 'queued', updated_at = ?1
             WHERE id IN (SELECT id FROM work_items WHERE state = 'retrying' AND run_at <= ?1 LIMIT (?2 + 0)) RETURNING id",
        )
        .q()?;
    let promoted = st
        .query_map(params![ts(t.now), t.limit.max(1) as i64], |r| r.get::<_, U>(0))
        .q()?
        .map(|r| r.map(|u| WorkItemId(u.0)))
        .collect::<rusqlite::Result<Vec<_>>>()
        .q()?;
    let reaped = reap(c, t)?;
    let expired = expire_info_requests(c, t)?;
    let notify =
        !promoted.is_empty() || reaped.iter().chain(&expired).any(|r| r.work_item_state == WorkItemState::Retrying);
    Ok((TickReport { promoted, reaped, expired }, notify))
}

/// Runs waiting past an info request's deadline fail (retryable); their open questions close.
fn expire_info_requests(c: &Connection, t: &Tick) -> StoreResult<Vec<ReapedRun>> {
    let now = ts(t.now);
    let mut st = c
        .prepare_cached(
            "SELECT run_id, MIN(key) FROM info_requests WHERE state = 'pending' AND deadline IS NOT NULL AND deadline <= ?1
             GROUP BY run_id ORDER BY MIN(deadline) LIMIT (?2 + 0)",
        )
        .q()?;
    let runs = st
        .query_map(params![now, t.limit.max(1) as i64], |r| Ok((RunId(r.get::<_, U>(0)?.0), r.get::<_, String>(1)?)))
        .q()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .q()?;
    drop(st);
    let mut out = Vec::with_capacity(runs.len());
    for (rid, key) in runs {
        let error = rules::expired_error(&key);
        c.prepare_cached(
            "UPDATE info_requests SET state = CASE WHEN deadline IS NOT NULL AND deadline <= ?2 THEN 'expired' ELSE 'cancelled' END
             WHERE run_id = ?1 AND state = 'pending'",
        )
        .q()?
        .execute(params![b(rid), now])
        .q()?;
        let r = run_get(c, rid)?;
        r.state.transition(RunState::Failed)?;
        c.prepare_cached(
            "UPDATE runs SET state = 'failed', error = ?2, failure_kind = 'retryable', finished_at = ?3, lease_expires_at = NULL WHERE id = ?1",
        )
        .q()?
        .execute(params![b(rid), error, now])
        .q()?;
        let (state, retry_at, _) =
            fail_item(c, r.work_item_id, FailureKind::Retryable, &error, &t.retry_defaults, t.now)?;
        out.push(ReapedRun { run_id: rid, work_item_id: r.work_item_id, work_item_state: state, retry_at });
    }
    Ok(out)
}

// ---------------------------------------------------------------- runs

pub fn runs_claim(c: &Connection, cl: &Claim) -> StoreResult<Vec<ClaimedRun>> {
    let limit = cl.limit.min(Page::MAX_LIMIT) as i64;
    if limit == 0 {
        return Ok(Vec::new());
    }
    let caps = to_json(&cl.capabilities)?;
    let now = ts(cl.now);
    let mut st = c.prepare_cached(&CLAIM_SQL).q()?;
    let items = st
        .query_map(params![now, caps, limit], |r| Ok((work_item(r)?, r.get::<_, Option<bool>>(23)?.unwrap_or(false))))
        .q()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .q()?;
    drop(st);
    let expires = rules::lease_for(RunId::new(), 1, cl.now, cl.lease_ttl).expires_at;
    let mut out = Vec::with_capacity(items.len());
    let mut fresh: Vec<(WorkItem, Run)> = Vec::with_capacity(items.len());
    for (mut w, resume) in items {
        w.state = w.state.transition(WorkItemState::Running)?;
        w.updated_at = cl.now;
        match (resume, w.current_run_id) {
            // A row resumes its waiting run when it has one (rare: one statement each).
            (true, Some(run_id)) => {
                c.prepare_cached("UPDATE work_items SET state = 'running', updated_at = ?2 WHERE id = ?1")
                    .q()?
                    .execute(params![b(w.id), now])
                    .q()?;
                let r = c
                    .prepare_cached(&RESUME_RUN_SQL)
                    .q()?
                    .query_row(params![b(run_id), cl.agent_id, ts(expires), now], run)
                    .q()?;
                let lease =
                    Lease { run_id: r.id, token: r.lease_token, expires_at: r.lease_expires_at.unwrap_or(expires) };
                out.push(ClaimedRun { run: r, lease, work_item: w, resumed: true });
            }
            // Otherwise a fresh run and one more attempt, written below in multi-row statements.
            _ => {
                w.attempts += 1;
                let lease = rules::lease_for(RunId::new(), 1, cl.now, cl.lease_ttl);
                w.current_run_id = Some(lease.run_id);
                let r = rules::new_run(&w, &cl.agent_id, w.attempts, &lease, cl.now);
                fresh.push((w, r));
            }
        }
    }
    for chunk in fresh.chunks(CLAIM_CHUNK) {
        claim_fresh_chunk(c, chunk, &cl.agent_id, ts(expires), now)?;
    }
    for (w, r) in fresh {
        let lease = Lease { run_id: r.id, token: r.lease_token, expires_at: expires };
        out.push(ClaimedRun { run: r, lease, work_item: w, resumed: false });
    }
    out.sort_by_key(|c| (std::cmp::Reverse(c.work_item.priority), c.work_item.run_at, c.work_item.id));
    Ok(out)
}

/// Rows per multi-row claim statement.
const CLAIM_CHUNK: usize = 32;

/// The claim statements for `n` rows (index `n`), built once. `OR FAIL` keeps SQLite from opening a
/// statement journal for these multi-row writes: a failure fails the whole command, whose savepoint
/// the writer rolls back anyway.
static CLAIM_CHUNK_SQL: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
    (0..=CLAIM_CHUNK)
        .map(|n| {
            // ?1 = now; then (item id, run id) per row.
            let mut upd = String::from(
                "UPDATE OR FAIL work_items SET state = 'running', updated_at = ?1, attempts = attempts + 1, current_run_id = CASE id",
            );
            let mut ids = String::new();
            for k in 0..n {
                let (pi, pr) = (2 + 2 * k, 3 + 2 * k);
                upd.push_str(&format!(" WHEN ?{pi} THEN ?{pr}"));
                if k > 0 {
                    ids.push_str(", ");
                }
                ids.push_str(&format!("?{pi}"));
            }
            upd.push_str(&format!(" END WHERE id IN ({ids})"));
            // ?1 = agent, ?2 = lease expiry, ?3 = now; then (run id, item id, project id, attempt) per row.
            let mut ins = String::from(
                "INSERT OR FAIL INTO runs (id, work_item_id, project_id, attempt, agent_id, state, lease_token, lease_expires_at, heartbeat_at, claimed_at) VALUES ",
            );
            for k in 0..n {
                let p = 4 + 4 * k;
                if k > 0 {
                    ins.push_str(", ");
                }
                ins.push_str(&format!("(?{}, ?{}, ?{}, ?{}, ?1, 'claimed', 1, ?2, ?3, ?3)", p, p + 1, p + 2, p + 3));
            }
            (upd, ins)
        })
        .collect()
});

/// Marks a chunk of claimed items running and inserts their runs: two statements for the whole chunk.
fn claim_fresh_chunk(
    c: &Connection,
    chunk: &[(WorkItem, Run)],
    agent: &str,
    expires: i64,
    now: i64,
) -> StoreResult<()> {
    let n = chunk.len();
    let (upd, ins) = &CLAIM_CHUNK_SQL[n];
    let mut vals: Vec<P<'_>> = Vec::with_capacity(1 + 2 * n);
    vals.push(P::I(now));
    for (w, r) in chunk {
        vals.push(P::B(w.id.0.as_bytes()));
        vals.push(P::B(r.id.0.as_bytes()));
    }
    let changed = c.prepare_cached(upd).q()?.execute(rusqlite::params_from_iter(vals.iter())).q()?;
    if changed != n {
        return Err(StoreError::conflict(format!("claimed {changed} of {n} work items")));
    }
    let mut vals: Vec<P<'_>> = Vec::with_capacity(3 + 4 * n);
    vals.push(P::T(agent));
    vals.push(P::I(expires));
    vals.push(P::I(now));
    for (w, r) in chunk {
        vals.push(P::B(r.id.0.as_bytes()));
        vals.push(P::B(w.id.0.as_bytes()));
        vals.push(P::B(w.project_id.0.as_bytes()));
        vals.push(P::I(i64::from(r.attempt)));
    }
    c.prepare_cached(ins).q()?.execute(rusqlite::params_from_iter(vals.iter())).q()?;
    Ok(())
}

pub fn run_get(c: &Connection, id: RunId) -> StoreResult<Run> {
    c.prepare_cached(&format!("SELECT {RUN_COLS} FROM runs WHERE id = ?1"))
        .q()?
        .query_row([b(id)], run)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::Run, id))
}

fn fenced(c: &Connection, id: RunId, token: u64, now: DateTime<Utc>) -> StoreResult<Run> {
    let r = run_get(c, id)?;
    rules::check_fence(&r, token, now)?;
    Ok(r)
}

pub fn lease_renew(c: &Connection, p: &LeaseRenew) -> StoreResult<Lease> {
    let r = fenced(c, p.run_id, p.token, p.now)?;
    let lease = rules::lease_for(r.id, r.lease_token, p.now, rules::renewal_ttl(&r, p.ttl));
    c.prepare_cached("UPDATE runs SET lease_expires_at = ?2, heartbeat_at = ?3 WHERE id = ?1")
        .q()?
        .execute(params![b(r.id), ts(lease.expires_at), ts(p.now)])
        .q()?;
    Ok(lease)
}

/// Hands a leased run back: run to `waiting_input` without a lease, item to `queued` now.
pub fn runs_release(c: &Connection, p: &RunRelease) -> StoreResult<Run> {
    let r = fenced(c, p.run_id, p.token, p.now)?;
    r.state.transition(RunState::WaitingInput)?;
    let item_state: String = c
        .prepare_cached("SELECT state FROM work_items WHERE id = ?1")
        .q()?
        .query_row([b(r.work_item_id)], |row| row.get(0))
        .q()?;
    let item_state: WorkItemState = item_state.parse().map_err(StoreError::backend)?;
    if item_state != WorkItemState::Running {
        return Err(StoreError::conflict(format!("work item {} is {item_state}, not running", r.work_item_id)));
    }
    c.prepare_cached("UPDATE work_items SET state = 'queued', run_at = ?2, updated_at = ?2 WHERE id = ?1")
        .q()?
        .execute(params![b(r.work_item_id), ts(p.now)])
        .q()?;
    c.prepare_cached(&format!(
        "UPDATE runs SET state = 'waiting_input', lease_expires_at = NULL, usage = COALESCE(?2, usage) WHERE id = ?1 RETURNING {RUN_COLS}"
    ))
    .q()?
    .query_row(params![b(r.id), p.usage.as_ref().map(to_json).transpose()?], run)
    .q()
}

/// Records a leased run's result (replacing an earlier one).
pub fn run_result_put(c: &Connection, p: &RunResultPut) -> StoreResult<()> {
    let r = fenced(c, p.run_id, p.token, p.now)?;
    c.prepare_cached(
        "INSERT INTO run_results (run_id, project_id, result, patch, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (run_id) DO UPDATE SET result = excluded.result, patch = excluded.patch, recorded_at = excluded.recorded_at",
    )
    .q()?
    .execute(params![b(r.id), b(r.project_id), json_text(&p.result)?, p.patch, ts(p.now)])
    .q()?;
    Ok(())
}

/// A run's result, if it recorded one.
pub fn run_result_get(c: &Connection, id: RunId) -> StoreResult<Option<RunResultRecord>> {
    run_get(c, id)?;
    c.prepare_cached("SELECT result, patch, recorded_at FROM run_results WHERE run_id = ?1")
        .q()?
        .query_row([b(id)], |row| {
            Ok(RunResultRecord { run_id: id, result: json(row, 0)?, patch: row.get(1)?, recorded_at: time(row, 2)? })
        })
        .optional()
        .q()
}

fn json_text<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(StoreError::backend)
}

pub fn run_start(c: &Connection, p: &RunStart) -> StoreResult<Run> {
    let r = fenced(c, p.run_id, p.token, p.now)?;
    if r.state == RunState::Running {
        return Ok(r);
    }
    r.state.transition(RunState::Running)?;
    c.prepare_cached(&format!(
        "UPDATE runs SET state = 'running', started_at = COALESCE(started_at, ?2) WHERE id = ?1 RETURNING {RUN_COLS}"
    ))
    .q()?
    .query_row(params![b(r.id), ts(p.now)], run)
    .q()
}

fn complete_one(
    c: &Connection,
    x: &RunCompletion,
    defaults: &RetryPolicy,
    now: DateTime<Utc>,
) -> StoreResult<StoreResult<CompletionResult>> {
    let (run_to, error, exit_code, kind) = match &x.outcome {
        RunOutcome::Succeeded { exit_code } => (RunState::Succeeded, None, *exit_code, None),
        RunOutcome::Failed { error, exit_code, kind } => {
            (RunState::Failed, Some(error.clone()), *exit_code, Some(*kind))
        }
    };
    let kind_s = match kind {
        Some(k) => Some(enum_str(&k)?),
        None => None,
    };
    let usage = match &x.usage {
        Some(u) => Some(to_json(u)?),
        None => None,
    };
    // One guarded statement: the fence (token, leased state, unexpired lease) is re-checked where the
    // row is written. Only when it matches nothing is the run read again to say why.
    let changed = c
        .prepare_cached(COMPLETE_RUN_SQL)
        .q()?
        .execute(params![b(x.run_id), run_to.as_str(), ts(now), exit_code, error, kind_s, usage, i(x.token)])
        .q()?;
    let run = if changed == 1 { Some(run_get(c, x.run_id)?) } else { None };
    // Refusals below happen before anything was written (inner error); any later failure breaks an
    // invariant and fails the whole unit (outer error), rolling it back.
    let run = match run {
        Some(r) => r,
        None => {
            let r = match run_get(c, x.run_id) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            if let Err(e) = rules::check_fence(&r, x.token, now) {
                return Ok(Err(e));
            }
            if let Err(e) = r.state.transition(run_to) {
                return Ok(Err(e.into()));
            }
            return Ok(Err(StoreError::conflict(format!("run {} could not be completed", x.run_id))));
        }
    };
    let wid = run.work_item_id;
    let mut res = CompletionResult {
        run,
        work_item_state: WorkItemState::Succeeded,
        retry_at: None,
        released: Vec::new(),
        blocked: Vec::new(),
    };
    match kind {
        None => {
            // Common case in one statement: an item nothing depends on.
            let done = |with_dependents: bool| -> StoreResult<usize> {
                c.prepare_cached(
                    "UPDATE work_items SET state = 'succeeded', last_error = NULL, run_at = NULL, updated_at = ?2
                     WHERE id = ?1 AND state = 'running' AND has_dependents = ?3",
                )
                .q()?
                .execute(params![b(wid), ts(now), with_dependents])
                .q()
            };
            if done(false)? == 0 {
                if done(true)? == 0 {
                    let w = work_item_get(c, wid)?;
                    return Err(transition_err(w.state, WorkItemState::Succeeded));
                }
                res.released = release_dependents(c, wid)?;
            }
        }
        Some(k) => {
            let (state, retry_at, blocked) = fail_item(c, wid, k, error.as_deref().unwrap_or("failed"), defaults, now)?;
            res.work_item_state = state;
            res.retry_at = retry_at;
            res.blocked = blocked;
        }
    }
    Ok(Ok(res))
}

pub fn runs_complete_many(c: &Connection, p: &CompleteMany) -> StoreResult<(Vec<StoreResult<CompletionResult>>, bool)> {
    let mut out: Vec<Option<StoreResult<CompletionResult>>> = Vec::with_capacity(p.completions.len());
    out.resize_with(p.completions.len(), || None);
    let mut notify = false;
    // Successes without usage, on distinct runs, that pass their fence go through multi-row statements;
    // everything else (failures, usage reports, repeated runs) one by one, in order, after them.
    let mut distinct = std::collections::HashSet::with_capacity(p.completions.len());
    let batchable = |x: &RunCompletion| matches!(x.outcome, RunOutcome::Succeeded { .. }) && x.usage.is_none();
    let all_distinct = p.completions.iter().all(|x| distinct.insert(x.run_id));
    if all_distinct && p.completions.len() > 1 {
        let ids: Vec<RunId> = p.completions.iter().filter(|x| batchable(x)).map(|x| x.run_id).collect();
        let runs = runs_by_id(c, &ids)?;
        let mut groups: HashMap<Option<i32>, Vec<(usize, Run)>> = HashMap::new();
        for (i, x) in p.completions.iter().enumerate() {
            if !batchable(x) {
                continue;
            }
            let RunOutcome::Succeeded { exit_code } = x.outcome else {
                continue;
            };
            let Some(run) = runs.get(&x.run_id) else {
                out[i] = Some(Err(StoreError::not_found(EntityKind::Run, x.run_id)));
                continue;
            };
            if let Err(e) =
                rules::check_fence(run, x.token, p.now).and_then(|_| Ok(run.state.transition(RunState::Succeeded)?))
            {
                out[i] = Some(Err(e));
                continue;
            }
            groups.entry(exit_code).or_default().push((i, run.clone()));
        }
        for (exit_code, members) in groups {
            for chunk in members.chunks(COMPLETE_CHUNK) {
                for (i, r) in complete_succeeded_chunk(c, chunk, exit_code, p.now)? {
                    notify |= !r.released.is_empty();
                    out[i] = Some(Ok(r));
                }
            }
        }
    }
    let mut results = Vec::with_capacity(out.len());
    for (x, slot) in p.completions.iter().zip(out) {
        let r = match slot {
            Some(r) => r,
            // Each completion is guarded on its own: a refused one writes nothing.
            None => complete_one(c, x, &p.retry_defaults, p.now)?,
        };
        if let Ok(cr) = &r {
            notify |= !cr.released.is_empty() || cr.retry_at.is_some_and(|t| t <= p.now);
        }
        results.push(r);
    }
    Ok((results, notify))
}

/// Runs per multi-row completion statement.
const COMPLETE_CHUNK: usize = 64;

fn in_params(first: usize, n: usize) -> String {
    (first..first + n).map(|k| format!("?{k}")).collect::<Vec<_>>().join(", ")
}

/// The completion statements for `n` runs (index `n`), built once: (select runs, finish runs, finish
/// items). `OR FAIL`: see [`CLAIM_CHUNK_SQL`].
static COMPLETE_CHUNK_SQL: std::sync::LazyLock<Vec<[String; 3]>> = std::sync::LazyLock::new(|| {
    (0..=COMPLETE_CHUNK)
        .map(|n| {
            [
                format!("SELECT {RUN_COLS} FROM runs WHERE id IN ({})", in_params(1, n)),
                format!(
                    "UPDATE OR FAIL runs SET state = 'succeeded', finished_at = ?1, lease_expires_at = NULL, exit_code = ?2, error = NULL,
                     failure_kind = NULL WHERE id IN ({})",
                    in_params(3, n)
                ),
                format!(
                    "UPDATE OR FAIL work_items SET state = 'succeeded', last_error = NULL, run_at = NULL, updated_at = ?1
                     WHERE id IN ({}) AND state = 'running' AND has_dependents = 0",
                    in_params(2, n)
                ),
            ]
        })
        .collect()
});

fn runs_by_id(c: &Connection, ids: &[RunId]) -> StoreResult<HashMap<RunId, Run>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(COMPLETE_CHUNK) {
        let mut st = c.prepare_cached(&COMPLETE_CHUNK_SQL[chunk.len()][0]).q()?;
        let rows = st.query_map(rusqlite::params_from_iter(chunk.iter().map(|r| P::B(r.0.as_bytes()))), run).q()?;
        for r in rows {
            let r = r.q()?;
            out.insert(r.id, r);
        }
    }
    Ok(out)
}

/// Completes fenced, successful runs with the same exit code in three statements for the chunk (plus one
/// per item that has dependents).
fn complete_succeeded_chunk(
    c: &Connection,
    chunk: &[(usize, Run)],
    exit_code: Option<i32>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<(usize, CompletionResult)>> {
    let n = chunk.len();
    let [_, finish_runs, finish_items] = &COMPLETE_CHUNK_SQL[n];
    let now_ts = ts(now);
    let exit: Option<i64> = exit_code.map(i64::from);
    let mut vals: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(2 + n);
    vals.push(&now_ts);
    vals.push(&exit);
    let ids: Vec<P<'_>> = chunk.iter().map(|(_, r)| P::B(r.id.0.as_bytes())).collect();
    vals.extend(ids.iter().map(|p| p as &dyn rusqlite::ToSql));
    let changed = c.prepare_cached(finish_runs).q()?.execute(vals.as_slice()).q()?;
    if changed != n {
        return Err(StoreError::conflict(format!("completed {changed} of {n} runs")));
    }
    // Items nothing depends on finish here; the others (and any item not running) are handled one by one.
    let mut vals: Vec<P<'_>> = Vec::with_capacity(1 + n);
    vals.push(P::I(now_ts));
    vals.extend(chunk.iter().map(|(_, r)| P::B(r.work_item_id.0.as_bytes())));
    let done = c.prepare_cached(finish_items).q()?.execute(rusqlite::params_from_iter(vals.iter())).q()?;
    let mut out = Vec::with_capacity(n);
    for (i, r) in chunk {
        let mut released = Vec::new();
        if done < n {
            let (state, has_dependents): (String, bool) = c
                .prepare_cached("SELECT state, has_dependents FROM work_items WHERE id = ?1")
                .q()?
                .query_row([b(r.work_item_id)], |x| Ok((x.get(0)?, x.get(1)?)))
                .q()?;
            if state == "running" {
                if !has_dependents {
                    return Err(StoreError::conflict(format!("work item {} could not be completed", r.work_item_id)));
                }
                c.prepare_cached(
                    "UPDATE work_items SET state = 'succeeded', last_error = NULL, run_at = NULL, updated_at = ?2 WHERE id = ?1",
                )
                .q()?
                .execute(params![b(r.work_item_id), ts(now)])
                .q()?;
                released = release_dependents(c, r.work_item_id)?;
            } else if state != "succeeded" {
                let from: WorkItemState =
                    state.parse().map_err(|e: UnknownState| StoreError::invalid("state", e.to_string()))?;
                return Err(transition_err(from, WorkItemState::Succeeded));
            }
        }
        let mut run = r.clone();
        run.state = RunState::Succeeded;
        run.finished_at = Some(now);
        run.lease_expires_at = None;
        run.exit_code = exit_code;
        run.error = None;
        run.failure_kind = None;
        out.push((
            *i,
            CompletionResult {
                run,
                work_item_state: WorkItemState::Succeeded,
                retry_at: None,
                released,
                blocked: Vec::new(),
            },
        ));
    }
    Ok(out)
}

pub fn run_list(c: &Connection, f: &RunFilter) -> StoreResult<Vec<Run>> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE id > ?1 AND (?2 IS NULL OR work_item_id = ?2) AND (?3 IS NULL OR state = ?3)
             AND (?4 IS NULL OR agent_id = ?4) ORDER BY id LIMIT (?5 + 0)"
        ))
        .q()?;
    let rows = st
        .query_map(
            params![
                after(&f.page),
                f.work_item_id.map(b),
                f.state.map(|s| s.as_str()),
                f.agent_id,
                f.page.effective_limit() as i64
            ],
            run,
        )
        .q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

pub fn run_cancel(c: &Connection, id: RunId, x: &Cancel) -> StoreResult<Run> {
    let r = run_get(c, id)?;
    r.state.transition(RunState::Cancelled)?;
    let item = work_item_get(c, r.work_item_id)?;
    if item.current_run_id == Some(id) && item.state.can_transition(WorkItemState::Cancelled) {
        cancel_item(c, r.work_item_id, &x.reason, x.now)?;
    }
    cancel_run_row(c, id, &x.reason, x.now)?;
    run_get(c, id)
}

pub fn run_requeue(c: &Connection, id: RunId, rq: &Requeue) -> StoreResult<WorkItem> {
    let r = run_get(c, id)?;
    let item = work_item_get(c, r.work_item_id)?;
    let active = matches!(r.state, RunState::Claimed | RunState::Running | RunState::WaitingInput);
    if active {
        cancel_run_row(c, id, &rq.reason, rq.now)?;
    } else if item.current_run_id != Some(id) && item.state.has_active_run() {
        return Err(StoreError::conflict(format!("work item {} has a newer active run", item.id)));
    }
    requeue_item(c, item.id, rq)
}

// ---------------------------------------------------------------- logs and step events

pub fn logs_append(c: &Connection, p: &LogAppend) -> StoreResult<u64> {
    let r = run_get(c, p.run_id)?;
    rules::check_fence(&r, p.token, p.now)?;
    let mut seq: i64 =
        c.prepare_cached("SELECT log_seq FROM runs WHERE id = ?1").q()?.query_row([b(p.run_id)], |r| r.get(0)).q()?;
    {
        let mut ins =
            c.prepare_cached("INSERT INTO logs (run_id, seq, stream, line, at) VALUES (?1, ?2, ?3, ?4, ?5)").q()?;
        let at = ts(p.now);
        for l in &p.lines {
            seq += 1;
            ins.execute(params![b(p.run_id), seq, l.stream.as_str(), l.line, at]).q()?;
        }
    }
    c.prepare_cached("UPDATE runs SET log_seq = ?2 WHERE id = ?1").q()?.execute(params![b(p.run_id), seq]).q()?;
    Ok(seq as u64)
}

pub fn logs_read_after(c: &Connection, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<LogEntry>> {
    run_get(c, run_id)?;
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {LOG_COLS} FROM logs WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT (?3 + 0)"
        ))
        .q()?;
    let rows = st.query_map(params![b(run_id), i(after), limit.clamp(1, 10_000) as i64], log).q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

pub fn step_events_append(c: &Connection, p: StepEventsAppend) -> StoreResult<Vec<StepEvent>> {
    let r = run_get(c, p.run_id)?;
    rules::check_fence(&r, p.token, p.now)?;
    let mut seq: i64 =
        c.prepare_cached("SELECT event_seq FROM runs WHERE id = ?1").q()?.query_row([b(p.run_id)], |r| r.get(0)).q()?;
    let mut out = Vec::with_capacity(p.events.len());
    let mut last_done: Option<u32> = None;
    {
        let mut ins = c.prepare_cached("INSERT INTO step_events (run_id, seq, step_index, kind, name, detail, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)").q()?;
        for e in p.events {
            seq += 1;
            if e.kind == StepEventKind::Succeeded {
                if let Some(i) = e.step_index {
                    last_done = Some(last_done.map_or(i, |x| x.max(i)));
                }
            }
            ins.execute(params![
                b(p.run_id),
                seq,
                e.step_index,
                enum_str(&e.kind)?,
                e.name,
                to_json(&e.detail)?,
                ts(p.now)
            ])
            .q()?;
            out.push(StepEvent {
                run_id: p.run_id,
                seq: seq as u64,
                step_index: e.step_index,
                kind: e.kind,
                name: e.name,
                detail: e.detail,
                at: p.now,
            });
        }
    }
    c.prepare_cached("UPDATE runs SET event_seq = ?2, last_completed_step = CASE WHEN ?3 IS NULL THEN last_completed_step ELSE MAX(COALESCE(last_completed_step, ?3), ?3) END WHERE id = ?1")
        .q()?
        .execute(params![b(p.run_id), seq, last_done])
        .q()?;
    Ok(out)
}

pub fn step_events_read_after(c: &Connection, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<StepEvent>> {
    run_get(c, run_id)?;
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {EVENT_COLS} FROM step_events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT (?3 + 0)"
        ))
        .q()?;
    let rows = st.query_map(params![b(run_id), i(after), limit.clamp(1, 10_000) as i64], event).q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

// ---------------------------------------------------------------- info requests

pub fn info_requests_create(c: &Connection, p: InfoAsk) -> StoreResult<Vec<InfoRequest>> {
    let r = fenced(c, p.run_id, p.token, p.now)?;
    if p.questions.is_empty() {
        return Err(StoreError::invalid("questions", "at least one question"));
    }
    r.state.transition(RunState::WaitingInput)?;
    let item = work_item_get(c, r.work_item_id)?;
    item.state.transition(WorkItemState::WaitingInput)?;
    let mut out = Vec::with_capacity(p.questions.len());
    for q in p.questions {
        let ir = InfoRequest {
            id: InfoRequestId::new(),
            run_id: r.id,
            work_item_id: r.work_item_id,
            project_id: r.project_id,
            key: q.key,
            prompt: q.prompt,
            kind: q.kind,
            choices: q.choices,
            state: InfoRequestState::Pending,
            deadline: q.deadline,
            created_at: p.now,
            answered_at: None,
            answered_by: None,
            answer: None,
        };
        c.prepare_cached(&format!("INSERT INTO info_requests ({INFO_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10, NULL, NULL, NULL)"))
            .q()?
            .execute(params![
                b(ir.id),
                b(ir.run_id),
                b(ir.work_item_id),
                b(ir.project_id),
                ir.key,
                ir.prompt,
                enum_str(&ir.kind)?,
                to_json(&ir.choices)?,
                ts_opt(ir.deadline),
                ts(ir.created_at)
            ])
            .q()?;
        out.push(ir);
    }
    c.prepare_cached(
        "UPDATE runs SET state = 'waiting_input', lease_expires_at = NULL, usage = COALESCE(?2, usage) WHERE id = ?1",
    )
    .q()?
    .execute(params![b(r.id), p.usage.as_ref().map(to_json).transpose()?])
    .q()?;
    set_item_state(c, r.work_item_id, WorkItemState::WaitingInput, p.now)?;
    Ok(out)
}

pub fn info_request_get(c: &Connection, id: InfoRequestId) -> StoreResult<InfoRequest> {
    c.prepare_cached(&format!("SELECT {INFO_COLS} FROM info_requests WHERE id = ?1"))
        .q()?
        .query_row([b(id)], info)
        .optional()
        .q()?
        .ok_or_else(|| StoreError::not_found(EntityKind::InfoRequest, id))
}

pub fn info_request_list(c: &Connection, f: &InfoRequestFilter) -> StoreResult<Vec<InfoRequest>> {
    let state = f.state.map(|s| s.as_str());
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {INFO_COLS} FROM info_requests WHERE id > ?1 AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR run_id = ?3)
             AND (?4 IS NULL OR project_id = ?4) ORDER BY id LIMIT (?5 + 0)"
        ))
        .q()?;
    let rows = st
        .query_map(
            params![after(&f.page), state, f.run_id.map(b), f.project_id.map(b), f.page.effective_limit() as i64],
            info,
        )
        .q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

pub fn info_request_answer(c: &Connection, p: InfoAnswer) -> StoreResult<InfoAnswered> {
    let req = info_request_get(c, p.id)?;
    if req.state != InfoRequestState::Pending {
        return Err(StoreError::conflict(format!("info request {} is {}", p.id, req.state.as_str())));
    }
    let encoded = SealedValue::encode(&p.answer);
    let request = c
        .prepare_cached(&format!(
            "UPDATE info_requests SET state = 'answered', answer = ?2, answered_at = ?3, answered_by = ?4 WHERE id = ?1 RETURNING {INFO_COLS}"
        ))
        .q()?
        .query_row(params![b(p.id), encoded, ts(p.now), p.answered_by], info)
        .q()?;
    let open: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM info_requests WHERE run_id = ?1 AND state = 'pending'")
        .q()?
        .query_row([b(req.run_id)], |r| r.get(0))
        .q()?;
    let mut resumed = false;
    if open == 0 {
        let n = c
            .prepare_cached("UPDATE work_items SET state = 'queued', run_at = ?2, updated_at = ?2 WHERE id = ?1 AND state = 'waiting_input'")
            .q()?
            .execute(params![b(req.work_item_id), ts(p.now)])
            .q()?;
        resumed = n > 0;
    }
    Ok(InfoAnswered { request, resumed })
}

pub fn info_answers_for_run(
    c: &Connection,
    run_id: RunId,
    token: u64,
    now: DateTime<Utc>,
) -> StoreResult<Vec<InfoRequest>> {
    fenced(c, run_id, token, now)?;
    let mut st =
        c.prepare_cached(&format!("SELECT {INFO_COLS} FROM info_requests WHERE run_id = ?1 ORDER BY id")).q()?;
    let rows = st.query_map([b(run_id)], info).q()?;
    rows.collect::<rusqlite::Result<Vec<_>>>().q()
}

// ---------------------------------------------------------------- stats

pub fn stats(c: &Connection) -> StoreResult<QueueStats> {
    let mut s = QueueStats::zeroed();
    {
        let mut st = c.prepare_cached("SELECT state, COUNT(*) FROM work_items GROUP BY state").q()?;
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).q()? {
            let (k, v) = row.q()?;
            s.work_items.insert(k, v as u64);
        }
    }
    {
        let mut st = c.prepare_cached("SELECT state, COUNT(*) FROM runs GROUP BY state").q()?;
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).q()? {
            let (k, v) = row.q()?;
            s.runs.insert(k, v as u64);
        }
    }
    s.pending_info_requests = c
        .query_row("SELECT COUNT(*) FROM info_requests WHERE state = 'pending'", [], |r| r.get::<_, i64>(0))
        .q()? as u64;
    s.pending_approvals =
        c.query_row("SELECT COUNT(*) FROM approvals WHERE state = 'pending'", [], |r| r.get::<_, i64>(0)).q()? as u64;
    Ok(s)
}
