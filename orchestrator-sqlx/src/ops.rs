//! The store operations as async functions over a connection. Writes run inside the store's transaction
//! (READ COMMITTED, with explicit row locks on what they read and then write, so concurrent units of work
//! serialize where they touch the same rows). Semantics mirror `orchestrator_core::MemoryStore` and the
//! SQLite store; decisions come from `orchestrator_core::rules`.

use crate::error::{map_err, Q};
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
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Row};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;
type Dec<T> = fn(&PgRow) -> Result<T, sqlx::Error>;

/// A `&'static str` SQL text built once from `format!` arguments.
macro_rules! sql {
    ($($t:tt)*) => {{
        static S: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| format!($($t)*));
        S.as_str()
    }};
}

fn q(sql: &'static str) -> Query<'static> {
    sqlx::query(sql)
}

async fn opt<T>(c: &mut PgConnection, query: Query<'_>, f: Dec<T>) -> StoreResult<Option<T>> {
    match query.fetch_optional(&mut *c).await.q()? {
        Some(r) => Ok(Some(f(&r).map_err(map_err)?)),
        None => Ok(None),
    }
}

async fn one<T>(c: &mut PgConnection, query: Query<'_>, f: Dec<T>) -> StoreResult<T> {
    let r = query.fetch_one(&mut *c).await.q()?;
    f(&r).map_err(map_err)
}

async fn all<T>(c: &mut PgConnection, query: Query<'_>, f: Dec<T>) -> StoreResult<Vec<T>> {
    let rows = query.fetch_all(&mut *c).await.q()?;
    rows.iter().map(|r| f(r).map_err(map_err)).collect()
}

async fn exec(c: &mut PgConnection, query: Query<'_>) -> StoreResult<u64> {
    Ok(query.execute(&mut *c).await.q()?.rows_affected())
}

fn uuid_of(r: &PgRow) -> Result<Uuid, sqlx::Error> {
    r.try_get(0)
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn after(page: &Page) -> Uuid {
    page.after.unwrap_or(Uuid::nil())
}

fn lim(page: &Page) -> i64 {
    page.effective_limit() as i64
}

fn parse_state(s: &str) -> StoreResult<WorkItemState> {
    s.parse().map_err(|e: UnknownState| StoreError::invalid("state", e.to_string()))
}

// ---------------------------------------------------------------- projects

pub async fn project_create(c: &mut PgConnection, p: NewProject) -> StoreResult<Project> {
    let pr = p.to_project();
    let n = exec(
        c,
        q("INSERT INTO projects (id, name, description, created_at, updated_at, repository) VALUES ($1, $2, $3, $4, $4, $5) ON CONFLICT DO NOTHING")
            .bind(pr.id.0)
            .bind(&pr.name)
            .bind(&pr.description)
            .bind(p.now)
            .bind(pr.repository.as_ref().map(Json)),
    )
    .await?;
    if n == 0 {
        return Err(StoreError::Duplicate { entity: EntityKind::Project, key: pr.id.to_string() });
    }
    Ok(pr)
}

pub async fn project_get(c: &mut PgConnection, id: ProjectId) -> StoreResult<Project> {
    opt(c, q(sql!("SELECT {PROJECT_COLS} FROM projects WHERE id = $1")).bind(id.0), project)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::Project, id))
}

/// The project exists, and stays until the caller commits: a shared advisory lock on the project that
/// `project_delete` takes exclusively (cheaper than a row lock, which would write the project row on
/// every creation). The check runs after the lock, in a fresh snapshot.
async fn project_exists(c: &mut PgConnection, id: ProjectId) -> StoreResult<()> {
    exec(
        c,
        q("SELECT pg_advisory_xact_lock_shared(hashtextextended('orchestrator-project:' || $1::text, 0))").bind(id.0),
    )
    .await?;
    opt(c, q("SELECT id FROM projects WHERE id = $1").bind(id.0), uuid_of)
        .await?
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found(EntityKind::Project, id))
}

/// The project exists (plain read, for read-only operations).
async fn project_exists_read(c: &mut PgConnection, id: ProjectId) -> StoreResult<()> {
    opt(c, q("SELECT id FROM projects WHERE id = $1").bind(id.0), uuid_of)
        .await?
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found(EntityKind::Project, id))
}

pub async fn project_list(c: &mut PgConnection, page: Page) -> StoreResult<Vec<Project>> {
    all(
        c,
        q(sql!("SELECT {PROJECT_COLS} FROM projects WHERE id > $1 ORDER BY id LIMIT $2"))
            .bind(after(&page))
            .bind(lim(&page)),
        project,
    )
    .await
}

pub async fn project_update(c: &mut PgConnection, p: ProjectUpdate) -> StoreResult<Project> {
    opt(
        c,
        q(sql!(
            "UPDATE projects SET name = COALESCE($2, name), description = COALESCE($3, description), updated_at = $4,
                repository = CASE WHEN $5 THEN $6 ELSE repository END WHERE id = $1 RETURNING {PROJECT_COLS}"
        ))
        .bind(p.id.0)
        .bind(p.name)
        .bind(p.description)
        .bind(p.now)
        .bind(p.repository.is_some())
        .bind(p.repository.as_ref().and_then(|r| r.as_ref()).map(Json)),
        project,
    )
    .await?
    .ok_or_else(|| StoreError::not_found(EntityKind::Project, p.id))
}

pub async fn project_delete(c: &mut PgConnection, id: ProjectId) -> StoreResult<()> {
    // Waits for units of work creating things in the project (see `project_exists`).
    exec(c, q("SELECT pg_advisory_xact_lock(hashtextextended('orchestrator-project:' || $1::text, 0))").bind(id.0))
        .await?;
    opt(c, q("SELECT id FROM projects WHERE id = $1 FOR UPDATE").bind(id.0), uuid_of)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::Project, id))?;
    // The project's items are found through `work_item_projects` (no index on work_items.project_id:
    // it would cost every claim and completion).
    let busy = opt(
        c,
        q("SELECT w.id, w.state FROM work_item_projects p JOIN work_items w ON w.id = p.work_item_id
           WHERE p.project_id = $1 AND w.state IN ('queued', 'running', 'waiting_input', 'retrying') LIMIT 1")
        .bind(id.0),
        |r| Ok((r.try_get::<Uuid, _>(0)?, r.try_get::<String, _>(1)?)),
    )
    .await?;
    if let Some((wid, state)) = busy {
        return Err(StoreError::conflict(format!("project has active work item {wid} ({state}); cancel it first")));
    }
    // Runs are found through their work items (no index on runs.project_id: it would cost every claim).
    exec(
        c,
        q("DELETE FROM logs WHERE run_id IN (SELECT r.id FROM work_item_projects p JOIN runs r ON r.work_item_id = p.work_item_id WHERE p.project_id = $1)")
            .bind(id.0),
    )
    .await?;
    exec(
        c,
        q("DELETE FROM step_events WHERE run_id IN (SELECT r.id FROM work_item_projects p JOIN runs r ON r.work_item_id = p.work_item_id WHERE p.project_id = $1)")
            .bind(id.0),
    )
    .await?;
    exec(
        c,
        q("DELETE FROM work_item_deps WHERE work_item_id IN (SELECT work_item_id FROM work_item_projects WHERE project_id = $1)
           OR depends_on IN (SELECT work_item_id FROM work_item_projects WHERE project_id = $1)")
        .bind(id.0),
    )
    .await?;
    exec(
        c,
        q("DELETE FROM runs WHERE work_item_id IN (SELECT work_item_id FROM work_item_projects WHERE project_id = $1)")
            .bind(id.0),
    )
    .await?;
    exec(c, q("DELETE FROM info_requests WHERE project_id = $1").bind(id.0)).await?;
    exec(c, q("DELETE FROM approvals WHERE project_id = $1").bind(id.0)).await?;
    exec(c, q("DELETE FROM drafts WHERE project_id = $1").bind(id.0)).await?;
    exec(
        c,
        q("DELETE FROM work_items WHERE id IN (SELECT work_item_id FROM work_item_projects WHERE project_id = $1)")
            .bind(id.0),
    )
    .await?;
    exec(c, q("DELETE FROM work_item_projects WHERE project_id = $1").bind(id.0)).await?;
    exec(c, q("DELETE FROM visions WHERE project_id = $1").bind(id.0)).await?;
    exec(c, q("DELETE FROM run_results WHERE project_id = $1").bind(id.0)).await?;
    exec(c, q("DELETE FROM recipes WHERE project_id = $1").bind(id.0)).await?;
    exec(c, q("DELETE FROM projects WHERE id = $1").bind(id.0)).await?;
    Ok(())
}

// ---------------------------------------------------------------- visions

pub async fn vision_put(c: &mut PgConnection, p: VisionPut) -> StoreResult<Vision> {
    // The project row lock serializes concurrent puts on the version number.
    opt(c, q("SELECT id FROM projects WHERE id = $1 FOR NO KEY UPDATE").bind(p.project_id.0), uuid_of)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::Project, p.project_id))?;
    one(
        c,
        q(sql!(
            "INSERT INTO visions (project_id, version, text, author, created_at)
             VALUES ($1, (SELECT COALESCE(MAX(version), 0) + 1 FROM visions WHERE project_id = $1), $2, $3, $4) RETURNING {VISION_COLS}"
        ))
        .bind(p.project_id.0)
        .bind(p.text)
        .bind(p.author)
        .bind(p.now),
        vision,
    )
    .await
}

pub async fn vision_get(c: &mut PgConnection, project_id: ProjectId, version: Option<u32>) -> StoreResult<Vision> {
    project_exists_read(c, project_id).await?;
    let v = match version {
        None => {
            opt(
                c,
                q(sql!("SELECT {VISION_COLS} FROM visions WHERE project_id = $1 ORDER BY version DESC LIMIT 1"))
                    .bind(project_id.0),
                vision,
            )
            .await?
        }
        Some(n) => {
            opt(
                c,
                q(sql!("SELECT {VISION_COLS} FROM visions WHERE project_id = $1 AND version = $2"))
                    .bind(project_id.0)
                    .bind(n.min(i32::MAX as u32) as i32),
                vision,
            )
            .await?
        }
    };
    v.ok_or_else(|| {
        StoreError::not_found(
            EntityKind::Vision,
            format!("{project_id}@{}", version.map_or("latest".to_string(), |n| n.to_string())),
        )
    })
}

pub async fn vision_list(c: &mut PgConnection, project_id: ProjectId) -> StoreResult<Vec<Vision>> {
    project_exists_read(c, project_id).await?;
    all(
        c,
        q(sql!("SELECT {VISION_COLS} FROM visions WHERE project_id = $1 ORDER BY version")).bind(project_id.0),
        vision,
    )
    .await
}

// ---------------------------------------------------------------- drafts and approvals

async fn check_recipe(c: &mut PgConnection, id: RecipeId, project: ProjectId) -> StoreResult<()> {
    let found =
        opt(c, q("SELECT project_id FROM recipes WHERE id = $1").bind(id.0), |r| r.try_get::<Option<Uuid>, _>(0))
            .await?;
    match found {
        None => Err(StoreError::invalid("recipe_id", format!("unknown recipe `{id}`"))),
        Some(p) => rules::check_recipe_scope(id, p.map(ProjectId), project),
    }
}

async fn insert_approval(
    c: &mut PgConnection,
    project_id: ProjectId,
    subject: ApprovalSubject,
    hash: &str,
    now: DateTime<Utc>,
) -> StoreResult<ApprovalRequest> {
    let a = rules::new_approval(project_id, subject, hash, now);
    let (kind, sid) = subject_parts(&subject);
    exec(
        c,
        q("INSERT INTO approvals (id, project_id, subject_kind, subject_id, content_hash, state, requested_at) VALUES ($1, $2, $3, $4, $5, 'pending', $6)")
            .bind(a.id.0)
            .bind(project_id.0)
            .bind(kind)
            .bind(sid)
            .bind(hash.to_string())
            .bind(now),
    )
    .await?;
    Ok(a)
}

async fn supersede_pending(
    c: &mut PgConnection,
    approval_id: Option<ApprovalId>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    if let Some(id) = approval_id {
        exec(
            c,
            q("UPDATE approvals SET state = 'superseded', decided_at = $2 WHERE id = $1 AND state = 'pending'")
                .bind(id.0)
                .bind(now),
        )
        .await?;
    }
    Ok(())
}

pub async fn draft_create(
    c: &mut PgConnection,
    p: NewDraft,
) -> StoreResult<(RequirementsDraft, Option<ApprovalRequest>)> {
    project_exists(c, p.project_id).await?;
    for (i, r) in p.requirements.iter().enumerate() {
        if let Some(rid) = r.recipe_id {
            check_recipe(c, rid, p.project_id).await.map_err(|e| match e {
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
    let n = exec(
        c,
        q(sql!("INSERT INTO drafts ({DRAFT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL) ON CONFLICT DO NOTHING"))
            .bind(d.id.0)
            .bind(d.project_id.0)
            .bind(&d.title)
            .bind(Json(&d.requirements))
            .bind(d.state.as_str())
            .bind(&d.content_hash)
            .bind(&d.proposed_by)
            .bind(Vec::<Uuid>::new())
            .bind(d.created_at),
    )
    .await?;
    if n == 0 {
        return Err(StoreError::Duplicate { entity: EntityKind::RequirementsDraft, key: d.id.to_string() });
    }
    let a = if require_approval {
        Some(insert_approval(c, d.project_id, ApprovalSubject::RequirementsDraft(d.id), &hash, d.created_at).await?)
    } else {
        None
    };
    Ok((d, a))
}

pub async fn draft_get(c: &mut PgConnection, id: DraftId) -> StoreResult<RequirementsDraft> {
    opt(c, q(sql!("SELECT {DRAFT_COLS} FROM drafts WHERE id = $1")).bind(id.0), draft)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::RequirementsDraft, id))
}

async fn draft_lock(c: &mut PgConnection, id: DraftId) -> StoreResult<RequirementsDraft> {
    opt(c, q(sql!("SELECT {DRAFT_COLS} FROM drafts WHERE id = $1 FOR UPDATE")).bind(id.0), draft)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::RequirementsDraft, id))
}

pub async fn draft_list(
    c: &mut PgConnection,
    project_id: ProjectId,
    page: Page,
) -> StoreResult<Vec<RequirementsDraft>> {
    project_exists_read(c, project_id).await?;
    all(
        c,
        q(sql!("SELECT {DRAFT_COLS} FROM drafts WHERE project_id = $1 AND id > $2 ORDER BY id LIMIT $3"))
            .bind(project_id.0)
            .bind(after(&page))
            .bind(lim(&page)),
        draft,
    )
    .await
}

pub async fn approval_get(c: &mut PgConnection, id: ApprovalId) -> StoreResult<ApprovalRequest> {
    opt(c, q(sql!("SELECT {APPROVAL_COLS} FROM approvals WHERE id = $1")).bind(id.0), approval)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::ApprovalRequest, id))
}

async fn approval_lock(c: &mut PgConnection, id: ApprovalId) -> StoreResult<ApprovalRequest> {
    opt(c, q(sql!("SELECT {APPROVAL_COLS} FROM approvals WHERE id = $1 FOR UPDATE")).bind(id.0), approval)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::ApprovalRequest, id))
}

pub async fn approval_list(c: &mut PgConnection, f: &ApprovalFilter) -> StoreResult<Vec<ApprovalRequest>> {
    all(
        c,
        q(sql!(
            "SELECT {APPROVAL_COLS} FROM approvals WHERE id > $1 AND ($2::text IS NULL OR state = $2) AND ($3::uuid IS NULL OR project_id = $3)
             ORDER BY id LIMIT $4"
        ))
        .bind(after(&f.page))
        .bind(f.state.map(|s| s.as_str()))
        .bind(f.project_id.map(|p| p.0))
        .bind(lim(&f.page)),
        approval,
    )
    .await
}

async fn record_decision(
    c: &mut PgConnection,
    id: ApprovalId,
    to: ApprovalState,
    d: &Decide,
) -> StoreResult<ApprovalRequest> {
    one(
        c,
        q(sql!("UPDATE approvals SET state = $2, decided_by = $3, decided_at = $4, reason = $5 WHERE id = $1 RETURNING {APPROVAL_COLS}"))
            .bind(id.0)
            .bind(to.as_str())
            .bind(d.decided_by.clone())
            .bind(d.now)
            .bind(d.reason.clone()),
        approval,
    )
    .await
}

pub async fn decide(
    c: &mut PgConnection,
    approval_id: Option<ApprovalId>,
    draft_id: Option<DraftId>,
    d: &Decide,
) -> StoreResult<DecisionOutcome> {
    let approval = match approval_id {
        Some(id) => Some(approval_lock(c, id).await?),
        None => None,
    };
    let (subject, to_approval) = rules::decision_subject(approval.as_ref(), draft_id, d.decision)?;
    let mut out = DecisionOutcome { approval: None, draft: None, work_items: Vec::new() };
    match subject {
        ApprovalSubject::RequirementsDraft(did) => {
            let dr = draft_lock(c, did).await?;
            let to = rules::draft_decision(&dr, approval.as_ref(), d.decision)?;
            let pending = opt(
                c,
                q("SELECT id FROM approvals WHERE subject_id = $1 AND state = 'pending' ORDER BY id LIMIT 1 FOR UPDATE")
                    .bind(did.0),
                uuid_of,
            )
            .await?;
            let approval_id = approval.as_ref().map(|a| a.id).or(pending.map(ApprovalId));
            let mut items = Vec::new();
            if d.decision == Decision::Approve {
                items = rules::draft_work_items(&dr, d.now);
                insert_work_items(c, &items).await?;
            }
            let ids: Vec<Uuid> = items.iter().map(|w| w.id.0).collect();
            let updated = one(
                c,
                q(sql!("UPDATE drafts SET state = $2, decided_at = $3, work_item_ids = $4 WHERE id = $1 RETURNING {DRAFT_COLS}"))
                    .bind(did.0)
                    .bind(to.as_str())
                    .bind(d.now)
                    .bind(ids),
                draft,
            )
            .await?;
            out.draft = Some(updated);
            out.work_items = items;
            if let Some(aid) = approval_id {
                out.approval = Some(record_decision(c, aid, to_approval, d).await?);
            }
        }
        ApprovalSubject::WorkItem(wid) => {
            let a = approval.ok_or_else(|| StoreError::invalid("id", "work items are decided through approvals"))?;
            let item = work_item_lock(c, wid).await?;
            let to = rules::work_item_decision(&item, &a, d.decision)?;
            set_item_state(c, wid, to, d.now).await?;
            out.approval = Some(record_decision(c, a.id, to_approval, d).await?);
            out.work_items.push(work_item_get(c, wid).await?);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- recipes

pub async fn recipe_create(c: &mut PgConnection, p: NewRecipe) -> StoreResult<ToolRecipe> {
    if let Some(pid) = p.project_id {
        project_exists(c, pid).await?;
    }
    let r = rules::new_recipe(p);
    let n = exec(
        c,
        q(sql!("INSERT INTO recipes ({RECIPE_COLS}) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"))
            .bind(r.id.0)
            .bind(r.project_id.map(|p| p.0))
            .bind(&r.name)
            .bind(&r.yaml)
            .bind(Json(&r.spec))
            .bind(r.created_at),
    )
    .await?;
    if n == 0 {
        return Err(StoreError::Duplicate { entity: EntityKind::ToolRecipe, key: r.id.to_string() });
    }
    Ok(r)
}

pub async fn recipe_get(c: &mut PgConnection, id: RecipeId) -> StoreResult<ToolRecipe> {
    opt(c, q(sql!("SELECT {RECIPE_COLS} FROM recipes WHERE id = $1")).bind(id.0), recipe)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::ToolRecipe, id))
}

pub async fn recipe_list(c: &mut PgConnection, page: Page) -> StoreResult<Vec<ToolRecipe>> {
    all(
        c,
        q(sql!("SELECT {RECIPE_COLS} FROM recipes WHERE id > $1 ORDER BY id LIMIT $2"))
            .bind(after(&page))
            .bind(lim(&page)),
        recipe,
    )
    .await
}

// ---------------------------------------------------------------- work items

/// A PostgreSQL array literal (`{"a","b"}`) of text values; cast to `text[]` or `uuid[]` in SQL.
fn array_literal<T: std::fmt::Display>(items: &[T]) -> String {
    let mut out = String::with_capacity(2 + items.len() * 40);
    out.push('{');
    for (k, v) in items.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in v.to_string().chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// The id named in a unique violation's detail (`Key (id)=(...) already exists.`).
fn duplicate_key(e: &sqlx::Error) -> Option<String> {
    let db = e.as_database_error()?;
    if db.code().as_deref() != Some("23505") || db.constraint() != Some("work_items_pkey") {
        return None;
    }
    let detail = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?.detail()?.to_string();
    let start = detail.find("=(")? + 2;
    let end = detail[start..].find(')')? + start;
    Some(detail[start..end].to_string())
}

/// The insert of work item rows from arrays bound as `$1`..`$17` (see [`bind_work_items`]). The rows are
/// marked `projects_mapped`: the statement that runs it also writes their `work_item_projects` rows.
static INSERT_WORK_ITEMS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO work_items ({WI_COLS}, projects_mapped)
         SELECT id, project_id, title, description, recipe_id, labels::text[], state, priority, deps::uuid[], retry::jsonb, key,
                hash, approval_id, draft_id, NULL, 0, NULL, run_at, NULL, created, created, enqueued_at, 0, false, true
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::text[], $7::text[], $8::int4[],
                     $9::text[], $10::text[], $11::text[], $12::text[], $13::uuid[], $14::uuid[], $15::timestamptz[],
                     $16::timestamptz[], $17::timestamptz[])
              AS t(id, project_id, title, description, recipe_id, labels, state, priority, deps, retry, key, hash,
                   approval_id, draft_id, run_at, created, enqueued_at)"
    )
});

/// `sql` with the rows of `items` bound as the arrays `$1`..`$17` of [`INSERT_WORK_ITEMS`].
fn bind_work_items<'q>(sql: &'static str, items: &'q [WorkItem]) -> StoreResult<Query<'q>> {
    let n = items.len();
    let mut ids = Vec::with_capacity(n);
    let mut projects = Vec::with_capacity(n);
    let mut titles = Vec::with_capacity(n);
    let mut descs = Vec::with_capacity(n);
    let mut recipes: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut prios = Vec::with_capacity(n);
    let mut deps = Vec::with_capacity(n);
    let mut retry = Vec::with_capacity(n);
    let mut keys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut hashes = Vec::with_capacity(n);
    let mut approvals: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut drafts: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut enq: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let empty_retry = serde_json::to_string(&RetryOverrides::default()).map_err(StoreError::backend)?;
    for w in items {
        ids.push(w.id.0);
        projects.push(w.project_id.0);
        titles.push(w.title.as_str());
        descs.push(w.description.as_str());
        recipes.push(w.recipe_id.map(|r| r.0));
        // Arrays of arrays cannot be unnested row by row: they travel as array literals.
        labels.push(if w.labels.is_empty() { "{}".to_string() } else { array_literal(&w.labels) });
        states.push(w.state.as_str());
        prios.push(w.priority);
        deps.push(if w.dependencies.is_empty() { "{}".to_string() } else { array_literal(&w.dependencies) });
        retry.push(if w.retry == RetryOverrides::default() {
            empty_retry.clone()
        } else {
            serde_json::to_string(&w.retry).map_err(StoreError::backend)?
        });
        keys.push(w.idempotency_key.as_deref());
        hashes.push(w.content_hash.as_str());
        approvals.push(w.approval_id.map(|a| a.0));
        drafts.push(w.draft_id.map(|d| d.0));
        run_ats.push(w.run_at);
        created.push(w.created_at);
        enq.push(w.enqueued_at);
    }
    Ok(sqlx::query(sql)
        .bind(ids)
        .bind(projects)
        .bind(titles)
        .bind(descs)
        .bind(recipes)
        .bind(labels)
        .bind(states)
        .bind(prios)
        .bind(deps)
        .bind(retry)
        .bind(keys)
        .bind(hashes)
        .bind(approvals)
        .bind(drafts)
        .bind(run_ats)
        .bind(created)
        .bind(enq))
}

/// A failed insert of work items: a taken id is `Duplicate`.
fn insert_error(e: sqlx::Error) -> StoreError {
    match duplicate_key(&e) {
        Some(key) => StoreError::Duplicate { entity: EntityKind::WorkItem, key },
        None => map_err(e),
    }
}

/// Inserts work item rows in one statement (`pending_deps` 0, no dependents). A taken id is `Duplicate`.
async fn insert_work_items(c: &mut PgConnection, items: &[WorkItem]) -> StoreResult<()> {
    if items.is_empty() {
        return Ok(());
    }
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let insert = INSERT_WORK_ITEMS.as_str();
        format!(
            "WITH ins AS ({insert} RETURNING id, project_id)
             INSERT INTO work_item_projects (project_id, work_item_id) SELECT project_id, id FROM ins"
        )
    });
    bind_work_items(SQL.as_str(), items)?.execute(&mut *c).await.map_err(insert_error)?;
    Ok(())
}

/// The rows of new work items that need nothing but their insert: no idempotency key, recipe, approval
/// or dependency, and distinct ids. `None` when any item needs more (or is refused): the general path
/// then checks and writes them.
pub fn plain_creates(items: &[NewWorkItem], now: DateTime<Utc>) -> Option<Vec<WorkItem>> {
    let mut ids = HashSet::with_capacity(items.len());
    let mut rows = Vec::with_capacity(items.len());
    for p in items {
        let simple_state = match &p.enqueue {
            Some(e) => p.state == WorkItemState::Ready && e.depends_on.is_empty(),
            None => matches!(p.state, WorkItemState::Draft | WorkItemState::Ready),
        };
        if !simple_state || p.recipe_id.is_some() || p.idempotency_key.is_some() || !ids.insert(p.id) {
            return None;
        }
        let mut w = rules::new_work_item(p, now);
        match rules::enqueue_on_create(&mut w, p.enqueue.as_ref(), now) {
            Ok(direct) if direct == p.enqueue.is_some() => rows.push(w),
            _ => return None,
        }
    }
    Some(rows)
}

/// [`plain_creates`] rows written by one self-contained statement (atomic without an explicit
/// transaction, so one round trip): each project is locked against deletion (`FOR KEY SHARE`, which
/// `project_delete`'s `FOR UPDATE` waits for and which sees a deletion that committed first), the rows
/// are inserted only when every project exists, and `notify` (a channel) is notified at the commit.
pub async fn insert_plain(c: &mut PgConnection, rows: &[WorkItem], notify: Option<&str>) -> StoreResult<()> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let insert = INSERT_WORK_ITEMS.as_str();
        format!(
            "WITH p AS (SELECT id FROM projects WHERE id = ANY($18::uuid[]) FOR KEY SHARE),
             ins AS ({insert} WHERE (SELECT count(*) FROM p) = cardinality($18::uuid[]) RETURNING id, project_id),
             mapped AS (INSERT INTO work_item_projects (project_id, work_item_id) SELECT project_id, id FROM ins)
             SELECT (SELECT array_agg(id) FROM p),
                    (SELECT count(*) FROM (SELECT pg_notify($19, '') WHERE $19 IS NOT NULL AND EXISTS (SELECT 1 FROM ins)) n)"
        )
    });
    let mut projects: Vec<Uuid> = rows.iter().map(|w| w.project_id.0).collect();
    projects.sort_unstable();
    projects.dedup();
    let row = bind_work_items(SQL.as_str(), rows)?
        .bind(&projects)
        .bind(notify)
        .fetch_one(&mut *c)
        .await
        .map_err(insert_error)?;
    let found: Option<Vec<Uuid>> = row.try_get(0).map_err(map_err)?;
    let found = found.unwrap_or_default();
    if let Some(missing) = projects.iter().find(|p| !found.contains(p)) {
        return Err(StoreError::not_found(EntityKind::Project, ProjectId(*missing)));
    }
    Ok(())
}

/// Writes every mutable column of a work item back.
async fn save_work_item(c: &mut PgConnection, w: &WorkItem) -> StoreResult<()> {
    let deps: Vec<Uuid> = w.dependencies.iter().map(|d| d.0).collect();
    exec(
        c,
        q("UPDATE work_items SET title = $2, description = $3, recipe_id = $4, labels = $5, state = $6, priority = $7, dependencies = $8,
           retry = $9, content_hash = $10, approval_id = $11, blocked_reason = $12, attempts = $13, current_run_id = $14, run_at = $15,
           last_error = $16, updated_at = $17, enqueued_at = $18 WHERE id = $1")
        .bind(w.id.0)
        .bind(&w.title)
        .bind(&w.description)
        .bind(w.recipe_id.map(|r| r.0))
        .bind(&w.labels)
        .bind(w.state.as_str())
        .bind(w.priority)
        .bind(deps)
        .bind(Json(&w.retry))
        .bind(&w.content_hash)
        .bind(w.approval_id.map(|a| a.0))
        .bind(&w.blocked_reason)
        .bind(w.attempts.min(i32::MAX as u32) as i32)
        .bind(w.current_run_id.map(|r| r.0))
        .bind(w.run_at)
        .bind(&w.last_error)
        .bind(w.updated_at)
        .bind(w.enqueued_at),
    )
    .await?;
    Ok(())
}

pub async fn work_item_get(c: &mut PgConnection, id: WorkItemId) -> StoreResult<WorkItem> {
    opt(c, q(sql!("SELECT {WI_COLS} FROM work_items WHERE id = $1")).bind(id.0), work_item)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))
}

/// Reads a work item and locks its row until the transaction ends.
async fn work_item_lock(c: &mut PgConnection, id: WorkItemId) -> StoreResult<WorkItem> {
    opt(c, q(sql!("SELECT {WI_COLS} FROM work_items WHERE id = $1 FOR UPDATE")).bind(id.0), work_item)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))
}

async fn set_item_state(
    c: &mut PgConnection,
    id: WorkItemId,
    to: WorkItemState,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    exec(
        c,
        q("UPDATE work_items SET state = $2, updated_at = $3 WHERE id = $1").bind(id.0).bind(to.as_str()).bind(now),
    )
    .await?;
    Ok(())
}

/// Count of the item's dependencies that have not succeeded.
async fn count_pending(c: &mut PgConnection, id: WorkItemId) -> StoreResult<u32> {
    let n: i64 = one(
        c,
        q("SELECT COUNT(*) FROM work_item_deps d JOIN work_items w ON w.id = d.depends_on WHERE d.work_item_id = $1 AND w.state <> 'succeeded'")
            .bind(id.0),
        |r| r.try_get(0),
    )
    .await?;
    Ok(n.max(0) as u32)
}

/// Recounts the item's pending dependencies. The row is locked first, and the count runs in a later
/// statement (a fresh snapshot), so two dependencies finishing at once cannot both miss each other.
async fn refresh_pending(c: &mut PgConnection, id: WorkItemId) -> StoreResult<(u32, WorkItemState)> {
    let st: String =
        one(c, q("SELECT state FROM work_items WHERE id = $1 FOR UPDATE").bind(id.0), |r| r.try_get(0)).await?;
    let n = count_pending(c, id).await?;
    exec(c, q("UPDATE work_items SET pending_deps = $2 WHERE id = $1").bind(id.0).bind(n as i32)).await?;
    Ok((n, parse_state(&st)?))
}

async fn blocking_dep(c: &mut PgConnection, id: WorkItemId) -> StoreResult<Option<(WorkItemId, WorkItemState)>> {
    let r = opt(
        c,
        q("SELECT w.id, w.state FROM work_item_deps d JOIN work_items w ON w.id = d.depends_on
           WHERE d.work_item_id = $1 AND w.state IN ('failed', 'cancelled', 'blocked') ORDER BY w.id LIMIT 1")
        .bind(id.0),
        |r| Ok((r.try_get::<Uuid, _>(0)?, r.try_get::<String, _>(1)?)),
    )
    .await?;
    match r {
        Some((u, s)) => Ok(Some((WorkItemId(u), parse_state(&s)?))),
        None => Ok(None),
    }
}

async fn dependents(c: &mut PgConnection, id: WorkItemId) -> StoreResult<Vec<WorkItemId>> {
    let v = all(
        c,
        q("SELECT work_item_id FROM work_item_deps WHERE depends_on = $1 ORDER BY work_item_id").bind(id.0),
        uuid_of,
    )
    .await?;
    Ok(v.into_iter().map(WorkItemId).collect())
}

async fn deps_of(c: &mut PgConnection, id: WorkItemId) -> StoreResult<Vec<WorkItemId>> {
    let v = all(c, q("SELECT depends_on FROM work_item_deps WHERE work_item_id = $1").bind(id.0), uuid_of).await?;
    Ok(v.into_iter().map(WorkItemId).collect())
}

/// Item `id` succeeded: refreshes its dependents' pending counts; returns those now claimable.
async fn release_dependents(c: &mut PgConnection, id: WorkItemId) -> StoreResult<Vec<WorkItemId>> {
    let deps = dependents(c, id).await?;
    let mut released = Vec::new();
    for d in deps {
        let (n, st) = refresh_pending(c, d).await?;
        if n == 0 && matches!(st, WorkItemState::Queued | WorkItemState::Retrying) {
            released.push(d);
        }
    }
    Ok(released)
}

async fn item_state(c: &mut PgConnection, id: WorkItemId) -> StoreResult<WorkItemState> {
    let s: String = opt(c, q("SELECT state FROM work_items WHERE id = $1").bind(id.0), |r| r.try_get(0))
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))?;
    parse_state(&s)
}

async fn block_dependents(c: &mut PgConnection, id: WorkItemId, now: DateTime<Utc>) -> StoreResult<Vec<WorkItemId>> {
    let mut blocked = Vec::new();
    let mut stack = vec![id];
    while let Some(cur) = stack.pop() {
        let cur_state = item_state(c, cur).await?;
        let reason = rules::blocked_reason(cur, cur_state);
        let ids = all(
            c,
            q("UPDATE work_items SET state = 'blocked', blocked_reason = $2, updated_at = $3
               WHERE id IN (SELECT work_item_id FROM work_item_deps WHERE depends_on = $1) AND state IN ('queued', 'retrying') RETURNING id")
            .bind(cur.0)
            .bind(reason)
            .bind(now),
            uuid_of,
        )
        .await?;
        for u in ids {
            blocked.push(WorkItemId(u));
            stack.push(WorkItemId(u));
        }
    }
    Ok(blocked)
}

async fn unblock_dependents(c: &mut PgConnection, id: WorkItemId, now: DateTime<Utc>) -> StoreResult<()> {
    let mut stack = vec![id];
    while let Some(cur) = stack.pop() {
        for d in dependents(c, cur).await? {
            let (_, st) = refresh_pending(c, d).await?;
            if st != WorkItemState::Blocked {
                // Every other dependent keeps an exact count (refreshed above).
                continue;
            }
            match blocking_dep(c, d).await? {
                None => {
                    exec(
                        c,
                        q("UPDATE work_items SET state = 'queued', blocked_reason = NULL, run_at = $2, updated_at = $2 WHERE id = $1")
                            .bind(d.0)
                            .bind(now),
                    )
                    .await?;
                    stack.push(d);
                }
                Some((x, s)) => {
                    // Still blocked by another dependency: name that one.
                    exec(
                        c,
                        q("UPDATE work_items SET blocked_reason = $2 WHERE id = $1")
                            .bind(d.0)
                            .bind(rules::blocked_reason(x, s)),
                    )
                    .await?;
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

/// Serializes edits of the dependency graph (cycle checks read it) within this schema.
async fn lock_dependency_graph(c: &mut PgConnection) -> StoreResult<()> {
    exec(c, q("SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':dependency-graph'))")).await?;
    Ok(())
}

pub async fn enqueue_checked(
    c: &mut PgConnection,
    items: &[Enqueue],
    now: DateTime<Utc>,
) -> StoreResult<Vec<ScheduledTask>> {
    rules::check_distinct_enqueues(items)?;
    if items.iter().any(|e| !e.options.depends_on.is_empty()) {
        lock_dependency_graph(c).await?;
    }
    let mut extra: HashMap<WorkItemId, Vec<WorkItemId>> = HashMap::new();
    let mut loaded = Vec::with_capacity(items.len());
    for e in items {
        let item = work_item_lock(c, e.work_item_id).await?;
        if item.state != WorkItemState::Ready {
            return Err(transition_err(item.state, WorkItemState::Queued));
        }
        if e.options.depends_on.len() + item.dependencies.len() > rules::MAX_DEPENDENCIES {
            return Err(StoreError::invalid("depends_on", format!("at most {} dependencies", rules::MAX_DEPENDENCIES)));
        }
        for dep in &e.options.depends_on {
            let p = opt(c, q("SELECT project_id FROM work_items WHERE id = $1").bind(dep.0), uuid_of).await?;
            if p != Some(item.project_id.0) {
                return Err(rules::unknown_dependency(*dep, item.project_id));
            }
        }
        if !e.options.depends_on.is_empty() {
            // The cycle check walks the stored graph; load it breadth-first before calling the rule.
            let mut graph: HashMap<WorkItemId, Vec<WorkItemId>> = HashMap::new();
            let mut todo: Vec<WorkItemId> = e.options.depends_on.clone();
            let mut seen: HashSet<WorkItemId> = HashSet::new();
            while let Some(n) = todo.pop() {
                if !seen.insert(n) {
                    continue;
                }
                let mut v = deps_of(c, n).await?;
                if let Some(x) = extra.get(&n) {
                    v.extend(x.iter().copied());
                }
                todo.extend(v.iter().copied());
                graph.insert(n, v);
            }
            let cyc = rules::find_cycle(e.work_item_id, &e.options.depends_on, |n| {
                graph.get(&n).cloned().unwrap_or_else(|| extra.get(&n).cloned().unwrap_or_default())
            });
            if let Some(cy) = cyc {
                return Err(rules::cycle_error(&cy));
            }
            extra.entry(e.work_item_id).or_default().extend(e.options.depends_on.iter().copied());
        }
        loaded.push(item);
    }
    let mut out = Vec::with_capacity(items.len());
    for (e, mut it) in items.iter().zip(loaded) {
        if !e.options.depends_on.is_empty() {
            let ds: Vec<Uuid> = e.options.depends_on.iter().map(|d| d.0).collect();
            exec(
                c,
                q("INSERT INTO work_item_deps (depends_on, work_item_id) SELECT d, $2 FROM unnest($1::uuid[]) AS d ON CONFLICT DO NOTHING")
                    .bind(&ds)
                    .bind(it.id.0),
            )
            .await?;
            // Also locks the dependencies: a completion running at the same time either finished first
            // (the count below sees it) or waits for this unit and then sees the new edge.
            exec(c, q("UPDATE work_items SET has_dependents = true WHERE id = ANY($1)").bind(&ds)).await?;
        }
        rules::apply_enqueue(&mut it, &e.options, now);
        let blocking = if it.dependencies.is_empty() { None } else { blocking_dep(c, it.id).await? };
        match blocking {
            Some((d, s)) => {
                it.state = WorkItemState::Blocked;
                it.blocked_reason = Some(rules::blocked_reason(d, s));
            }
            None => it.state = WorkItemState::Queued,
        }
        // Write the pending count before the state so the row never sits in the ready index early.
        let pending = if it.dependencies.is_empty() { 0 } else { refresh_pending(c, it.id).await?.0 };
        save_work_item(c, &it).await?;
        if it.state == WorkItemState::Blocked {
            // Items already waiting on this one can no longer run either.
            block_dependents(c, it.id, now).await?;
        }
        out.push(it.scheduled_task(pending));
    }
    Ok(out)
}

/// Creates work items (see `Store::work_items_create`); the bool says whether claimers should be woken.
pub async fn work_items_create(
    c: &mut PgConnection,
    items: &[NewWorkItem],
    now: DateTime<Utc>,
) -> StoreResult<(Vec<WorkItemCreated>, bool)> {
    let mut out: Vec<WorkItemCreated> = Vec::with_capacity(items.len());
    let mut to_insert: Vec<usize> = Vec::with_capacity(items.len());
    let mut enqueues = Vec::new();
    let mut seen_keys: HashSet<(ProjectId, String)> = HashSet::new();
    let mut known_projects: HashSet<ProjectId> = HashSet::new();
    let mut known_recipes: HashSet<(RecipeId, ProjectId)> = HashSet::new();
    let mut batch_ids: HashSet<WorkItemId> = HashSet::with_capacity(items.len());
    for p in items {
        let mut w = rules::new_work_item(p, now);
        if known_projects.insert(p.project_id) {
            project_exists(c, p.project_id).await?;
        }
        if let Some(rid) = p.recipe_id {
            if known_recipes.insert((rid, p.project_id)) {
                check_recipe(c, rid, p.project_id).await?;
            }
        }
        if !matches!(p.state, WorkItemState::Draft | WorkItemState::AwaitingApproval | WorkItemState::Ready) {
            return Err(StoreError::invalid("state", format!("a work item cannot be created as {}", p.state)));
        }
        if p.enqueue.is_some() && p.state != WorkItemState::Ready {
            return Err(StoreError::conflict(format!("work item {} needs approval before it can be enqueued", p.id)));
        }
        if let Some(k) = &p.idempotency_key {
            // A key created earlier in this same batch is a duplicate; a key that existed before returns
            // the existing item.
            if seen_keys.contains(&(p.project_id, k.clone())) {
                return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: k.clone() });
            }
            let ex = opt(
                c,
                q(sql!("SELECT {WI_COLS} FROM work_items WHERE project_id = $1 AND idempotency_key = $2"))
                    .bind(p.project_id.0)
                    .bind(k.clone()),
                work_item,
            )
            .await?;
            if let Some(ex) = ex {
                if ex.content_hash != w.content_hash {
                    return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: k.clone() });
                }
                out.push(WorkItemCreated { work_item: ex, created: false, approval: None });
                continue;
            }
            seen_keys.insert((p.project_id, k.clone()));
        }
        if let Some(e) = &p.enqueue {
            if e.depends_on.len() > rules::MAX_DEPENDENCIES {
                return Err(StoreError::invalid(
                    "depends_on",
                    format!("at most {} dependencies", rules::MAX_DEPENDENCIES),
                ));
            }
            for dep in &e.depends_on {
                // A dependency may be an item created earlier in this same batch.
                let earlier = out.iter().any(|o| o.work_item.id == *dep && o.work_item.project_id == p.project_id);
                if *dep == p.id {
                    return Err(rules::unknown_dependency(*dep, p.project_id));
                }
                if earlier {
                    continue;
                }
                let proj = opt(c, q("SELECT project_id FROM work_items WHERE id = $1").bind(dep.0), uuid_of).await?;
                if proj != Some(p.project_id.0) {
                    return Err(rules::unknown_dependency(*dep, p.project_id));
                }
            }
        }
        if !batch_ids.insert(w.id) {
            return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: w.id.to_string() });
        }
        // Fast path: a new item enqueued without dependencies is written once, already queued.
        let direct_enqueue = rules::enqueue_on_create(&mut w, p.enqueue.as_ref(), now)?;
        let approval = if p.state == WorkItemState::AwaitingApproval {
            Some(insert_approval(c, w.project_id, ApprovalSubject::WorkItem(w.id), &w.content_hash, now).await?)
        } else {
            None
        };
        w.approval_id = approval.as_ref().map(|a| a.id);
        if let Some(e) = p.enqueue.as_ref().filter(|_| !direct_enqueue) {
            enqueues.push((out.len(), Enqueue { work_item_id: w.id, options: e.clone() }));
        }
        to_insert.push(out.len());
        out.push(WorkItemCreated { work_item: w, created: true, approval });
    }
    if !to_insert.is_empty() {
        let rows: Vec<WorkItem> = to_insert.iter().map(|&i| out[i].work_item.clone()).collect();
        insert_work_items(c, &rows).await?;
    }
    let notify = !enqueues.is_empty() || out.iter().any(|o| o.created && o.work_item.state == WorkItemState::Queued);
    if !enqueues.is_empty() {
        let list: Vec<Enqueue> = enqueues.iter().map(|(_, e)| e.clone()).collect();
        let tasks = enqueue_checked(c, &list, now).await?;
        for ((idx, _), t) in enqueues.iter().zip(tasks) {
            let w = &mut out[*idx].work_item;
            rules::apply_scheduled(w, t, now);
        }
    }
    Ok((out, notify))
}

pub async fn work_item_list(c: &mut PgConnection, f: &WorkItemFilter) -> StoreResult<Vec<WorkItem>> {
    all(
        c,
        q(sql!(
            "SELECT {WI_COLS} FROM work_items WHERE id > $1 AND ($2::uuid IS NULL OR project_id = $2) AND ($3::text IS NULL OR state = $3)
             AND ($4::text IS NULL OR $4 = ANY(labels)) ORDER BY id LIMIT $5"
        ))
        .bind(after(&f.page))
        .bind(f.project_id.map(|p| p.0))
        .bind(f.state.map(|s| s.as_str()))
        .bind(f.label.clone())
        .bind(lim(&f.page)),
        work_item,
    )
    .await
}

pub async fn work_item_update(c: &mut PgConnection, p: WorkItemUpdate) -> StoreResult<WorkItemChanged> {
    let item = work_item_lock(c, p.id).await?;
    let (mut w, needs_approval) = rules::apply_update(&item, &p)?;
    if let Some(Some(rid)) = p.recipe_id {
        check_recipe(c, rid, item.project_id).await?;
    }
    let mut approval = None;
    if needs_approval {
        supersede_pending(c, item.approval_id, p.now).await?;
        let a = insert_approval(c, item.project_id, ApprovalSubject::WorkItem(item.id), &w.content_hash, p.now).await?;
        w.approval_id = Some(a.id);
        approval = Some(a);
    }
    save_work_item(c, &w).await?;
    Ok(WorkItemChanged { work_item: w, approval })
}

pub async fn work_item_submit(
    c: &mut PgConnection,
    id: WorkItemId,
    require_approval: bool,
    now: DateTime<Utc>,
) -> StoreResult<WorkItemChanged> {
    let mut item = work_item_lock(c, id).await?;
    let to = if require_approval { WorkItemState::AwaitingApproval } else { WorkItemState::Ready };
    if item.state != WorkItemState::Draft {
        return Err(transition_err(item.state, to));
    }
    item.state = to;
    item.updated_at = now;
    let mut approval = None;
    if require_approval {
        let a = insert_approval(c, item.project_id, ApprovalSubject::WorkItem(id), &item.content_hash, now).await?;
        item.approval_id = Some(a.id);
        approval = Some(a);
    }
    save_work_item(c, &item).await?;
    Ok(WorkItemChanged { work_item: item, approval })
}

pub async fn work_item_set_policy(
    c: &mut PgConnection,
    id: WorkItemId,
    retry: RetryOverrides,
    now: DateTime<Utc>,
) -> StoreResult<WorkItem> {
    opt(
        c,
        q(sql!("UPDATE work_items SET retry = $2, updated_at = $3 WHERE id = $1 RETURNING {WI_COLS}"))
            .bind(id.0)
            .bind(Json(retry))
            .bind(now),
        work_item,
    )
    .await?
    .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))
}

async fn cancel_run_row(c: &mut PgConnection, run_id: RunId, reason: &str, now: DateTime<Utc>) -> StoreResult<()> {
    exec(
        c,
        q("UPDATE runs SET state = 'cancelled', error = $2, finished_at = $3, lease_expires_at = NULL
           WHERE id = $1 AND state IN ('claimed', 'running', 'waiting_input')")
        .bind(run_id.0)
        .bind(reason.to_string())
        .bind(now),
    )
    .await?;
    exec(c, q("UPDATE info_requests SET state = 'cancelled' WHERE run_id = $1 AND state = 'pending'").bind(run_id.0))
        .await?;
    Ok(())
}

pub async fn cancel_item(
    c: &mut PgConnection,
    id: WorkItemId,
    reason: &str,
    now: DateTime<Utc>,
) -> StoreResult<WorkItem> {
    let mut item = work_item_lock(c, id).await?;
    item.state.transition(WorkItemState::Cancelled)?;
    if let Some(run_id) = item.current_run_id {
        cancel_run_row(c, run_id, reason, now).await?;
    }
    supersede_pending(c, item.approval_id, now).await?;
    item.state = WorkItemState::Cancelled;
    item.last_error = Some(reason.to_string());
    item.run_at = None;
    item.updated_at = now;
    save_work_item(c, &item).await?;
    block_dependents(c, id, now).await?;
    Ok(item)
}

async fn requeue_item(c: &mut PgConnection, id: WorkItemId, r: &Requeue) -> StoreResult<WorkItem> {
    let mut item = work_item_lock(c, id).await?;
    if !item.state.is_requeueable() && !item.state.has_active_run() {
        return Err(transition_err(item.state, WorkItemState::Queued));
    }
    let was = item.state;
    let blocking = if item.dependencies.is_empty() { None } else { blocking_dep(c, id).await? };
    item.state = if blocking.is_some() { WorkItemState::Blocked } else { WorkItemState::Queued };
    item.blocked_reason = blocking.map(|(d, s)| rules::blocked_reason(d, s));
    if was.is_finished() {
        item.attempts = 0;
        item.last_error = None;
    }
    item.run_at = Some(r.run_at);
    item.enqueued_at = Some(r.now);
    item.updated_at = r.now;
    if !item.dependencies.is_empty() {
        refresh_pending(c, id).await?;
    }
    save_work_item(c, &item).await?;
    if was.blocks_dependents() || was == WorkItemState::Succeeded {
        unblock_dependents(c, id, r.now).await?;
    }
    if item.state == WorkItemState::Blocked {
        // Requeued behind a dependency that will not succeed: the items waiting on it are blocked too.
        block_dependents(c, id, r.now).await?;
    }
    Ok(item)
}

pub async fn work_item_requeue(c: &mut PgConnection, id: WorkItemId, r: &Requeue) -> StoreResult<WorkItem> {
    let item = work_item_lock(c, id).await?;
    if item.state.has_active_run() {
        return Err(StoreError::conflict(format!(
            "work item {id} has an active run; requeue the run or cancel the item"
        )));
    }
    requeue_item(c, id, r).await
}

pub async fn scheduled_task_get(c: &mut PgConnection, id: WorkItemId) -> StoreResult<ScheduledTask> {
    let w = work_item_get(c, id).await?;
    let pending = if w.dependencies.is_empty() { 0 } else { count_pending(c, id).await? };
    Ok(w.scheduled_task(pending))
}

pub async fn queue_list(c: &mut PgConnection, f: &QueueFilter) -> StoreResult<Vec<ScheduledTask>> {
    // Keyset cursor: continue after the cursor item's place in queue order, even if it has left the
    // queue since (an unknown cursor starts from the top).
    let cursor = match f.page.after {
        Some(a) => {
            opt(c, q("SELECT priority, COALESCE(run_at, created_at), id FROM work_items WHERE id = $1").bind(a), |r| {
                Ok((r.try_get::<i32, _>(0)?, r.try_get::<DateTime<Utc>, _>(1)?, r.try_get::<Uuid, _>(2)?))
            })
            .await?
        }
        None => None,
    };
    let (cp, cr, cid) = match cursor {
        Some((p, r, id)) => (Some(p), Some(r), Some(id)),
        None => (None, None, None),
    };
    // The ready rows (from the ready index: their `run_at` is set, so its order is the queue order) merged
    // with the waiting ones (from the waiting index). Rows with pending dependencies are counted in the
    // same statement.
    let rows = all(
        c,
        q(sql!(
            "SELECT {WI_COLS}, (SELECT COUNT(*) FROM work_item_deps d JOIN work_items x ON x.id = d.depends_on
                                WHERE d.work_item_id = work_items.id AND x.state <> 'succeeded')
             FROM ((SELECT * FROM work_items
                    WHERE state IN ('queued', 'retrying') AND pending_deps = 0 AND ($1::uuid IS NULL OR project_id = $1)
                      AND ($2::int4 IS NULL OR (priority < $2) OR (priority = $2 AND (run_at, id) > ($3, $4)))
                    ORDER BY priority DESC, run_at, id LIMIT $5)
                   UNION ALL
                   (SELECT * FROM work_items
                    WHERE (state = 'blocked' OR (state IN ('queued', 'retrying') AND pending_deps > 0))
                      AND ($1::uuid IS NULL OR project_id = $1)
                      AND ($2::int4 IS NULL OR (priority < $2) OR (priority = $2 AND (COALESCE(run_at, created_at), id) > ($3, $4)))
                    ORDER BY priority DESC, COALESCE(run_at, created_at), id LIMIT $5)) work_items
             ORDER BY priority DESC, COALESCE(run_at, created_at), id LIMIT $5"
        ))
        .bind(f.project_id.map(|p| p.0))
        .bind(cp)
        .bind(cr)
        .bind(cid)
        .bind(lim(&f.page)),
        |r| Ok((work_item(r)?, r.try_get::<i64, _>(WI_N)?)),
    )
    .await?;
    Ok(rows.into_iter().map(|(w, n)| w.scheduled_task(n.max(0) as u32)).collect())
}

// ---------------------------------------------------------------- failures, reaping, ticks

async fn fail_item(
    c: &mut PgConnection,
    id: WorkItemId,
    kind: FailureKind,
    error: &str,
    defaults: &RetryPolicy,
    now: DateTime<Utc>,
) -> StoreResult<(WorkItemState, Option<DateTime<Utc>>, Vec<WorkItemId>)> {
    let (state, attempts, retry) =
        opt(c, q("SELECT state, attempts, retry FROM work_items WHERE id = $1 FOR UPDATE").bind(id.0), |r| {
            Ok((r.try_get::<String, _>(0)?, r.try_get::<i32, _>(1)?, r.try_get::<Json<RetryOverrides>, _>(2)?.0))
        })
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))?;
    let state = parse_state(&state)?;
    let (mut next, mut retry_at) = rules::after_failure(defaults, &retry, attempts.max(0) as u32, kind, now);
    state.transition(next)?;
    // A retry can never run while a dependency will not succeed: the item is blocked instead.
    let mut reason = None;
    if next == WorkItemState::Retrying {
        if let Some((d, s)) = blocking_dep(c, id).await? {
            reason = Some(rules::blocked_reason(d, s));
            (next, retry_at) = (WorkItemState::Blocked, None);
        }
    }
    exec(
        c,
        q("UPDATE work_items SET state = $2, last_error = $3, updated_at = $4, run_at = $5, blocked_reason = $6 WHERE id = $1")
            .bind(id.0)
            .bind(next.as_str())
            .bind(error.to_string())
            .bind(now)
            .bind(retry_at)
            .bind(reason),
    )
    .await?;
    let blocked = if next.blocks_dependents() { block_dependents(c, id, now).await? } else { Vec::new() };
    Ok((next, retry_at, blocked))
}

pub async fn reap(c: &mut PgConnection, t: &Tick) -> StoreResult<Vec<ReapedRun>> {
    let rows = all(
        c,
        q("UPDATE runs SET state = 'lost', error = 'lease expired', failure_kind = 'retryable', finished_at = $1, lease_expires_at = NULL
           WHERE id IN (SELECT r.id FROM work_items w JOIN runs r ON r.id = w.current_run_id
                        WHERE w.state = 'running' AND r.state IN ('claimed', 'running') AND r.lease_expires_at <= $1
                        ORDER BY r.lease_expires_at LIMIT $2 FOR UPDATE OF r SKIP LOCKED)
           RETURNING id, work_item_id")
        .bind(t.now)
        .bind(t.limit.max(1) as i64),
        |r| Ok((r.try_get::<Uuid, _>(0)?, r.try_get::<Uuid, _>(1)?)),
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (rid, wid) in rows {
        let wid = WorkItemId(wid);
        let (state, retry_at, _) =
            fail_item(c, wid, FailureKind::Retryable, "lease expired", &t.retry_defaults, t.now).await?;
        out.push(ReapedRun { run_id: RunId(rid), work_item_id: wid, work_item_state: state, retry_at });
    }
    Ok(out)
}

pub async fn tick(c: &mut PgConnection, t: &Tick) -> StoreResult<(TickReport, bool)> {
    let promoted = all(
        c,
        q("UPDATE work_items SET state = 'queued', updated_at = $1
           WHERE id IN (SELECT id FROM work_items WHERE state = 'retrying' AND run_at <= $1 ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)
           RETURNING id")
        .bind(t.now)
        .bind(t.limit.max(1) as i64),
        uuid_of,
    )
    .await?
    .into_iter()
    .map(WorkItemId)
    .collect::<Vec<_>>();
    let reaped = reap(c, t).await?;
    let expired = expire_info_requests(c, t).await?;
    let notify =
        !promoted.is_empty() || reaped.iter().chain(&expired).any(|r| r.work_item_state == WorkItemState::Retrying);
    Ok((TickReport { promoted, reaped, expired }, notify))
}

/// Runs waiting past an info request's deadline fail (retryable); their open questions close.
async fn expire_info_requests(c: &mut PgConnection, t: &Tick) -> StoreResult<Vec<ReapedRun>> {
    let runs = all(
        c,
        q("SELECT run_id, MIN(key) FROM info_requests WHERE state = 'pending' AND deadline IS NOT NULL AND deadline <= $1
           GROUP BY run_id ORDER BY MIN(deadline), run_id LIMIT $2")
        .bind(t.now)
        .bind(t.limit.max(1) as i64),
        |r| Ok((RunId(r.try_get::<Uuid, _>(0)?), r.try_get::<String, _>(1)?)),
    )
    .await?;
    let mut out = Vec::with_capacity(runs.len());
    for (rid, key) in runs {
        let r = run_lock(c, rid).await?;
        if r.state != RunState::WaitingInput {
            // Someone else settled it since the scan.
            continue;
        }
        let error = rules::expired_error(&key);
        exec(
            c,
            q("UPDATE info_requests SET state = CASE WHEN deadline IS NOT NULL AND deadline <= $2 THEN 'expired' ELSE 'cancelled' END
               WHERE run_id = $1 AND state = 'pending'")
            .bind(rid.0)
            .bind(t.now),
        )
        .await?;
        r.state.transition(RunState::Failed)?;
        exec(
            c,
            q("UPDATE runs SET state = 'failed', error = $2, failure_kind = 'retryable', finished_at = $3, lease_expires_at = NULL WHERE id = $1")
                .bind(rid.0)
                .bind(error.clone())
                .bind(t.now),
        )
        .await?;
        let (state, retry_at, _) =
            fail_item(c, r.work_item_id, FailureKind::Retryable, &error, &t.retry_defaults, t.now).await?;
        out.push(ReapedRun { run_id: rid, work_item_id: r.work_item_id, work_item_state: state, retry_at });
    }
    Ok(out)
}

// ---------------------------------------------------------------- runs

/// One statement: pick ready rows in claim order with `FOR UPDATE SKIP LOCKED`, mark them running,
/// insert fresh runs (or resume runs that waited for input), and return everything. The rows are
/// numbered in claim order; row `n` goes to the claim that owns slot `n` of the per-slot arrays (run id
/// $4, agent $5, lease expiry $6, time $7). $1 is the earliest claim's time: a row is picked only when
/// it is due for every claim in the statement.
static CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let wi_w = wi_cols_of("w");
    let wi_u = wi_cols_of("u");
    let run_r = run_cols_of("r");
    let run_runs = run_cols_of("runs");
    format!(
        "WITH picked AS (
            SELECT id, current_run_id, priority, run_at FROM work_items
            WHERE state IN ('queued', 'retrying') AND pending_deps = 0 AND run_at <= $1
              AND (labels = '{{}}' OR labels <@ $2::text[])
            ORDER BY priority DESC, run_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
         ),
         numbered AS (
            SELECT p.id, p.current_run_id,
                   CASE WHEN p.current_run_id IS NULL THEN false
                        ELSE EXISTS (SELECT 1 FROM runs x WHERE x.id = p.current_run_id AND x.state = 'waiting_input')
                   END AS resume,
                   row_number() OVER (ORDER BY p.priority DESC, p.run_at, p.id)::int4 AS rn
            FROM picked p
         ),
         fresh AS (
            SELECT n.*, ($4::uuid[])[n.rn] AS run_id, ($7::timestamptz[])[n.rn] AS at FROM numbered n
         ),
         upd AS (
            UPDATE work_items w SET state = 'running', updated_at = f.at,
                   attempts = w.attempts + CASE WHEN f.resume THEN 0 ELSE 1 END,
                   current_run_id = CASE WHEN f.resume THEN w.current_run_id ELSE f.run_id END
            FROM fresh f WHERE w.id = f.id
            RETURNING {wi_w}, f.resume, f.rn, f.at
         ),
         ins AS (
            INSERT INTO runs (id, work_item_id, project_id, attempt, agent_id, state, lease_token, lease_expires_at, heartbeat_at, claimed_at)
            SELECT u.current_run_id, u.id, u.project_id, u.attempts, ($5::text[])[u.rn], 'claimed', 1,
                   ($6::timestamptz[])[u.rn], u.at, u.at
            FROM upd u WHERE NOT u.resume
         ),
         res AS (
            UPDATE runs SET state = 'claimed', agent_id = ($5::text[])[u.rn], lease_token = runs.lease_token + 1,
                   lease_expires_at = ($6::timestamptz[])[u.rn], heartbeat_at = u.at
            FROM upd u WHERE u.resume AND runs.id = u.current_run_id AND runs.state = 'waiting_input'
            RETURNING {run_runs}
         )
         SELECT {wi_u}, u.resume, u.rn, {run_r}
         FROM upd u LEFT JOIN res r ON r.work_item_id = u.id"
    )
});

/// Claims for one caller (inside a transaction of the caller's, or alone).
pub async fn runs_claim(c: &mut PgConnection, cl: &Claim) -> StoreResult<Vec<ClaimedRun>> {
    Ok(runs_claim_many(c, &[cl]).await?.pop().unwrap_or_default())
}

/// Claims for several callers in one statement: the runs of each, in order. Each claim has its own
/// slots (as many as its limit) in claim order, so the first claim gets the first rows.
pub async fn runs_claim_many(c: &mut PgConnection, claims: &[&Claim]) -> StoreResult<Vec<Vec<ClaimedRun>>> {
    let mut out: Vec<Vec<ClaimedRun>> = claims.iter().map(|_| Vec::new()).collect();
    // Slot `k` belongs to claim `owner[k]`.
    let mut owner: Vec<usize> = Vec::new();
    let mut agents: Vec<&str> = Vec::new();
    let mut expiries: Vec<DateTime<Utc>> = Vec::new();
    let mut times: Vec<DateTime<Utc>> = Vec::new();
    for (i, cl) in claims.iter().enumerate() {
        let limit = cl.limit.min(Page::MAX_LIMIT) as usize;
        let expires = rules::lease_for(RunId::new(), 1, cl.now, cl.lease_ttl).expires_at;
        owner.extend(std::iter::repeat_n(i, limit));
        agents.extend(std::iter::repeat_n(cl.agent_id.as_str(), limit));
        expiries.extend(std::iter::repeat_n(expires, limit));
        times.extend(std::iter::repeat_n(cl.now, limit));
    }
    let Some(due) = claims.iter().map(|cl| cl.now).min() else { return Ok(out) };
    if owner.is_empty() {
        return Ok(out);
    }
    let capabilities = &claims[0].capabilities;
    let run_ids: Vec<Uuid> = (0..owner.len()).map(|_| RunId::new().0).collect();
    let rows = all(
        c,
        sqlx::query(CLAIM_SQL.as_str())
            .bind(due)
            .bind(capabilities)
            .bind(owner.len() as i64)
            .bind(run_ids)
            .bind(agents)
            .bind(&expiries)
            .bind(&times),
        |r| {
            let w = work_item(r)?;
            let resumed: bool = r.try_get(WI_N)?;
            let rn: i32 = r.try_get(WI_N + 1)?;
            let run = if resumed && r.try_get::<Option<Uuid>, _>(WI_N + 2)?.is_some() {
                Some(run_at(r, WI_N + 2)?)
            } else {
                None
            };
            Ok((w, resumed, rn, run))
        },
    )
    .await?;
    for (work_item, resumed, rn, run) in rows {
        let Some(slot) = usize::try_from(rn - 1).ok().filter(|k| *k < owner.len()) else {
            tracing::error!(work_item = %work_item.id, rn, "claimed row numbered outside its slots");
            continue;
        };
        let cl = claims[owner[slot]];
        // A fresh run is exactly what the statement inserted: built here rather than sent back.
        let run = match (resumed, run, work_item.current_run_id) {
            (true, Some(run), _) => run,
            (false, _, Some(run_id)) => {
                let lease = Lease { run_id, token: 1, expires_at: expiries[slot] };
                rules::new_run(&work_item, &cl.agent_id, work_item.attempts, &lease, cl.now)
            }
            _ => {
                // Cannot happen while runs change state only under their item's row lock (the resume
                // check and the update read the same locked row). The statement has committed: hand out
                // the other runs rather than fail them all; this item is left for an operator.
                tracing::error!(work_item = %work_item.id, "claimed work item has no run waiting for input to resume");
                continue;
            }
        };
        let lease = Lease {
            run_id: run.id,
            token: run.lease_token,
            expires_at: run.lease_expires_at.unwrap_or(expiries[slot]),
        };
        out[owner[slot]].push(ClaimedRun { run, lease, work_item, resumed });
    }
    for runs in &mut out {
        runs.sort_by_key(|c| (std::cmp::Reverse(c.work_item.priority), c.work_item.run_at, c.work_item.id));
    }
    Ok(out)
}

pub async fn run_get(c: &mut PgConnection, id: RunId) -> StoreResult<Run> {
    opt(c, q(sql!("SELECT {RUN_COLS} FROM runs WHERE id = $1")).bind(id.0), run)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::Run, id))
}

async fn run_lock(c: &mut PgConnection, id: RunId) -> StoreResult<Run> {
    opt(c, q(sql!("SELECT {RUN_COLS} FROM runs WHERE id = $1 FOR UPDATE")).bind(id.0), run)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::Run, id))
}

/// The run locked and fenced.
async fn fenced(c: &mut PgConnection, id: RunId, token: u64, now: DateTime<Utc>) -> StoreResult<Run> {
    let r = run_lock(c, id).await?;
    rules::check_fence(&r, token, now)?;
    Ok(r)
}

pub async fn lease_renew(c: &mut PgConnection, p: &LeaseRenew) -> StoreResult<Lease> {
    let r = fenced(c, p.run_id, p.token, p.now).await?;
    let lease = rules::lease_for(r.id, r.lease_token, p.now, rules::renewal_ttl(&r, p.ttl));
    exec(
        c,
        q("UPDATE runs SET lease_expires_at = $2, heartbeat_at = $3 WHERE id = $1")
            .bind(r.id.0)
            .bind(lease.expires_at)
            .bind(p.now),
    )
    .await?;
    Ok(lease)
}

/// Hands a leased run back: run to `waiting_input` without a lease, item to `queued` now.
pub async fn runs_release(c: &mut PgConnection, p: &RunRelease) -> StoreResult<Run> {
    let r = fenced(c, p.run_id, p.token, p.now).await?;
    r.state.transition(RunState::WaitingInput)?;
    let n = exec(
        c,
        q("UPDATE work_items SET state = 'queued', run_at = $2, updated_at = $2 WHERE id = $1 AND state = 'running'")
            .bind(r.work_item_id.0)
            .bind(p.now),
    )
    .await?;
    if n == 0 {
        let item = work_item_get(c, r.work_item_id).await?;
        return Err(StoreError::conflict(format!("work item {} is {}, not running", item.id, item.state)));
    }
    one(
        c,
        q(sql!("UPDATE runs SET state = 'waiting_input', lease_expires_at = NULL, usage = COALESCE($2, usage) WHERE id = $1 RETURNING {RUN_COLS}"))
            .bind(r.id.0)
            .bind(p.usage.as_ref().map(Json)),
        run,
    )
    .await
}

/// Records a leased run's result (replacing an earlier one).
pub async fn run_result_put(c: &mut PgConnection, p: &RunResultPut) -> StoreResult<()> {
    let r = fenced(c, p.run_id, p.token, p.now).await?;
    exec(
        c,
        q("INSERT INTO run_results (run_id, project_id, result, patch, recorded_at) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (run_id) DO UPDATE SET result = excluded.result, patch = excluded.patch, recorded_at = excluded.recorded_at")
        .bind(r.id.0)
        .bind(r.project_id.0)
        .bind(Json(&p.result))
        .bind(&p.patch)
        .bind(p.now),
    )
    .await?;
    Ok(())
}

/// A run's result, if it recorded one.
pub async fn run_result_get(c: &mut PgConnection, id: RunId) -> StoreResult<Option<RunResultRecord>> {
    run_get(c, id).await?;
    opt(c, q(sql!("SELECT {RUN_RESULT_COLS} FROM run_results WHERE run_id = $1")).bind(id.0), run_result).await
}

pub async fn run_start(c: &mut PgConnection, p: &RunStart) -> StoreResult<Run> {
    let r = fenced(c, p.run_id, p.token, p.now).await?;
    if r.state == RunState::Running {
        return Ok(r);
    }
    r.state.transition(RunState::Running)?;
    one(
        c,
        q(sql!("UPDATE runs SET state = 'running', started_at = COALESCE(started_at, $2) WHERE id = $1 RETURNING {RUN_COLS}"))
            .bind(r.id.0)
            .bind(p.now),
        run,
    )
    .await
}

/// Why a guarded completion matched nothing (read after the fact; nothing was written).
async fn refusal(
    c: &mut PgConnection,
    run_id: RunId,
    token: u64,
    to: RunState,
    now: DateTime<Utc>,
) -> StoreResult<StoreError> {
    let r = match run_get(c, run_id).await {
        Ok(r) => r,
        Err(e @ StoreError::NotFound { .. }) => return Ok(e),
        Err(e) => return Err(e),
    };
    if let Err(e) = rules::check_fence(&r, token, now) {
        return Ok(e);
    }
    if let Err(e) = r.state.transition(to) {
        return Ok(e.into());
    }
    Ok(StoreError::conflict(format!("run {run_id} could not be completed")))
}

async fn complete_one(
    c: &mut PgConnection,
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
    let kind_s = kind.map(|k| enum_str(&k));
    // One guarded statement: the fence (token, leased state, unexpired lease) is re-checked where the
    // row is written. Only when it matches nothing is the run read again to say why.
    let run = opt(
        c,
        q(sql!(
            "UPDATE runs SET state = $2, finished_at = $3, lease_expires_at = NULL, exit_code = $4, error = $5,
             failure_kind = $6, usage = COALESCE($7, usage)
             WHERE id = $1 AND lease_token = $8 AND state IN ('claimed', 'running') AND lease_expires_at > $3
             RETURNING {RUN_COLS}"
        ))
        .bind(x.run_id.0)
        .bind(run_to.as_str())
        .bind(now)
        .bind(exit_code)
        .bind(error.clone())
        .bind(kind_s)
        .bind(x.usage.as_ref().map(Json))
        .bind(i(x.token)),
        run,
    )
    .await?;
    let run = match run {
        Some(r) => r,
        None => return Ok(Err(refusal(c, x.run_id, x.token, run_to, now).await?)),
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
            let done = opt(
                c,
                q("UPDATE work_items SET state = 'succeeded', last_error = NULL, run_at = NULL, updated_at = $2
                   WHERE id = $1 AND state = 'running' RETURNING has_dependents")
                .bind(wid.0)
                .bind(now),
                |r| r.try_get::<bool, _>(0),
            )
            .await?;
            match done {
                Some(true) => res.released = release_dependents(c, wid).await?,
                Some(false) => {}
                None => {
                    let s = item_state(c, wid).await?;
                    return Err(transition_err(s, WorkItemState::Succeeded));
                }
            }
        }
        Some(k) => {
            let (state, retry_at, blocked) =
                fail_item(c, wid, k, error.as_deref().unwrap_or("failed"), defaults, now).await?;
            res.work_item_state = state;
            res.retry_at = retry_at;
            res.blocked = blocked;
        }
    }
    Ok(Ok(res))
}

/// The leased run states, bound as a parameter: with a literal list the planner may prefer an index
/// whose predicate names them over the primary key.
const LEASED: &[&str] = &["claimed", "running"];

static COMPLETE_MANY_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let run_runs = run_cols_of("runs");
    let run_r = run_cols_of("r");
    // Each run's token, exit code and time come with it from the unnested arrays, joined on the run id
    // alone: the runs are reached through their primary key from each element (or, on a small table, by
    // hashing the batch), never by scanning the batch once per run. The runs whose work item was
    // finished come back with it, beside the count of all finished runs, which tells whether any item
    // was not running.
    format!(
        "WITH r AS (
            UPDATE runs SET state = 'succeeded', finished_at = t.at, lease_expires_at = NULL,
                   exit_code = t.code, error = NULL, failure_kind = NULL
            FROM unnest($1::uuid[], $2::int8[], $3::int4[], $4::timestamptz[]) AS t(id, token, code, at)
            WHERE runs.id = t.id AND runs.lease_token = t.token AND runs.state = ANY($5::text[])
                   AND runs.lease_expires_at > t.at
            RETURNING {run_runs}
         ),
         w AS (
            UPDATE work_items SET state = 'succeeded', last_error = NULL, run_at = NULL, updated_at = r.finished_at
            FROM r WHERE work_items.id = r.work_item_id AND work_items.state = 'running'
            RETURNING {run_r}, work_items.has_dependents
         )
         SELECT c.n, w.* FROM (SELECT count(*) AS n FROM r) c LEFT JOIN w ON true"
    )
});

/// Completes runs; the bool says whether claimers should be woken.
pub async fn runs_complete_many(
    c: &mut PgConnection,
    p: &CompleteMany,
) -> StoreResult<(Vec<StoreResult<CompletionResult>>, bool)> {
    runs_complete_many_at(c, &p.completions, &vec![p.now; p.completions.len()], &p.retry_defaults).await
}

/// Completes runs, each judged and stamped at its own time in `nows` (the completions of several
/// calls combined into one transaction keep their callers' times).
pub async fn runs_complete_many_at(
    c: &mut PgConnection,
    completions: &[RunCompletion],
    nows: &[DateTime<Utc>],
    retry_defaults: &RetryPolicy,
) -> StoreResult<(Vec<StoreResult<CompletionResult>>, bool)> {
    if nows.len() != completions.len() {
        return Err(StoreError::invalid("now", "one time per completion"));
    }
    let mut out: Vec<Option<StoreResult<CompletionResult>>> = Vec::with_capacity(completions.len());
    out.resize_with(completions.len(), || None);
    let mut notify = false;
    // Successes without usage, on distinct runs, go through one statement; everything else one by one,
    // in order, after them.
    let mut distinct = HashSet::with_capacity(completions.len());
    let batchable = |x: &RunCompletion| matches!(x.outcome, RunOutcome::Succeeded { .. }) && x.usage.is_none();
    let all_distinct = completions.iter().all(|x| distinct.insert(x.run_id));
    if all_distinct && completions.iter().filter(|x| batchable(x)).count() > 1 {
        let mut idx: Vec<usize> = (0..completions.len()).filter(|&i| batchable(&completions[i])).collect();
        // A stable lock order across concurrent batches.
        idx.sort_by_key(|&i| completions[i].run_id);
        let ids: Vec<Uuid> = idx.iter().map(|&i| completions[i].run_id.0).collect();
        let tokens: Vec<i64> = idx.iter().map(|&k| i(completions[k].token)).collect();
        let times: Vec<DateTime<Utc>> = idx.iter().map(|&k| nows[k]).collect();
        let codes: Vec<Option<i32>> = idx
            .iter()
            .map(|&i| match completions[i].outcome {
                RunOutcome::Succeeded { exit_code } => exit_code,
                RunOutcome::Failed { exit_code, .. } => exit_code,
            })
            .collect();
        let rows = all(
            c,
            sqlx::query(COMPLETE_MANY_SQL.as_str()).bind(&ids).bind(tokens).bind(codes).bind(&times).bind(LEASED),
            |r| {
                let n: i64 = r.try_get(0)?;
                let done = match r.try_get::<Option<Uuid>, _>(1)? {
                    Some(_) => Some((run_at(r, 1)?, r.try_get::<bool, _>(18)?)),
                    None => None,
                };
                Ok((n, done))
            },
        )
        .await?;
        // One row at least (the count), with the finished run and item when there is one.
        let finished = rows.first().map_or(0, |x| x.0);
        let by_run: HashMap<RunId, (Run, bool)> =
            rows.into_iter().filter_map(|(_, d)| d).map(|(r, h)| (r.id, (r, h))).collect();
        if finished != by_run.len() as i64 {
            // A run was finished but its work item was not running: an invariant is broken. Name the item
            // (the transaction rolls back).
            for (id, at) in ids.iter().zip(&times) {
                if by_run.contains_key(&RunId(*id)) {
                    continue;
                }
                let r = run_get(c, RunId(*id)).await?;
                if r.state == RunState::Succeeded && r.finished_at == Some(*at) {
                    let s = item_state(c, r.work_item_id).await?;
                    return Err(transition_err(s, WorkItemState::Succeeded));
                }
            }
            return Err(StoreError::conflict("a completed run's work item was not running"));
        }
        for &i in &idx {
            let x = &completions[i];
            match by_run.get(&x.run_id) {
                Some((run, has_dependents)) => {
                    let released =
                        if *has_dependents { release_dependents(c, run.work_item_id).await? } else { Vec::new() };
                    notify |= !released.is_empty();
                    out[i] = Some(Ok(CompletionResult {
                        run: run.clone(),
                        work_item_state: WorkItemState::Succeeded,
                        retry_at: None,
                        released,
                        blocked: Vec::new(),
                    }));
                }
                None => out[i] = Some(Err(refusal(c, x.run_id, x.token, RunState::Succeeded, nows[i]).await?)),
            }
        }
    }
    let mut results = Vec::with_capacity(out.len());
    for ((x, slot), &now) in completions.iter().zip(out).zip(nows) {
        let r = match slot {
            Some(r) => r,
            // Each completion is guarded on its own: a refused one writes nothing.
            None => complete_one(c, x, retry_defaults, now).await?,
        };
        if let Ok(cr) = &r {
            notify |= !cr.released.is_empty() || cr.retry_at.is_some_and(|t| t <= now);
        }
        results.push(r);
    }
    Ok((results, notify))
}

pub async fn run_list(c: &mut PgConnection, f: &RunFilter) -> StoreResult<Vec<Run>> {
    all(
        c,
        q(sql!(
            "SELECT {RUN_COLS} FROM runs WHERE id > $1 AND ($2::uuid IS NULL OR work_item_id = $2) AND ($3::text IS NULL OR state = $3)
             AND ($4::text IS NULL OR agent_id = $4) ORDER BY id LIMIT $5"
        ))
        .bind(after(&f.page))
        .bind(f.work_item_id.map(|w| w.0))
        .bind(f.state.map(|s| s.as_str()))
        .bind(f.agent_id.clone())
        .bind(lim(&f.page)),
        run,
    )
    .await
}

pub async fn run_cancel(c: &mut PgConnection, id: RunId, x: &Cancel) -> StoreResult<Run> {
    let r = run_get(c, id).await?;
    // Item first, then run: the order every item-level operation takes.
    let item = work_item_lock(c, r.work_item_id).await?;
    let r = run_lock(c, id).await?;
    r.state.transition(RunState::Cancelled)?;
    if item.current_run_id == Some(id) && item.state.can_transition(WorkItemState::Cancelled) {
        cancel_item(c, r.work_item_id, &x.reason, x.now).await?;
    }
    cancel_run_row(c, id, &x.reason, x.now).await?;
    run_get(c, id).await
}

pub async fn run_requeue(c: &mut PgConnection, id: RunId, rq: &Requeue) -> StoreResult<WorkItem> {
    let r = run_get(c, id).await?;
    let item = work_item_lock(c, r.work_item_id).await?;
    let r = run_lock(c, id).await?;
    let active = matches!(r.state, RunState::Claimed | RunState::Running | RunState::WaitingInput);
    if active {
        cancel_run_row(c, id, &rq.reason, rq.now).await?;
    } else if item.current_run_id != Some(id) && item.state.has_active_run() {
        return Err(StoreError::conflict(format!("work item {} has a newer active run", item.id)));
    }
    requeue_item(c, item.id, rq).await
}

// ---------------------------------------------------------------- logs and step events

pub async fn logs_append(c: &mut PgConnection, p: LogAppend) -> StoreResult<u64> {
    fenced(c, p.run_id, p.token, p.now).await?;
    let n = p.lines.len() as i64;
    let seq: i64 = one(
        c,
        q("UPDATE runs SET log_seq = log_seq + $2 WHERE id = $1 RETURNING log_seq").bind(p.run_id.0).bind(n),
        |r| r.try_get(0),
    )
    .await?;
    if n > 0 {
        let streams: Vec<&str> = p.lines.iter().map(|l| l.stream.as_str()).collect();
        let lines: Vec<&str> = p.lines.iter().map(|l| l.line.as_str()).collect();
        exec(
            c,
            q("INSERT INTO logs (run_id, seq, stream, line, at)
               SELECT $1, $2 + t.ord, t.stream, t.line, $5 FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS t(stream, line, ord)")
            .bind(p.run_id.0)
            .bind(seq - n)
            .bind(streams)
            .bind(lines)
            .bind(p.now),
        )
        .await?;
    }
    Ok(seq.max(0) as u64)
}

pub async fn logs_read_after(
    c: &mut PgConnection,
    run_id: RunId,
    after: u64,
    limit: u32,
) -> StoreResult<Vec<LogEntry>> {
    run_get(c, run_id).await?;
    all(
        c,
        q(sql!("SELECT {LOG_COLS} FROM logs WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"))
            .bind(run_id.0)
            .bind(i(after))
            .bind(limit.clamp(1, 10_000) as i64),
        log,
    )
    .await
}

pub async fn step_events_append(c: &mut PgConnection, p: StepEventsAppend) -> StoreResult<Vec<StepEvent>> {
    fenced(c, p.run_id, p.token, p.now).await?;
    let mut last_done: Option<u32> = None;
    for e in &p.events {
        if e.kind == StepEventKind::Succeeded {
            if let Some(i) = e.step_index {
                last_done = Some(last_done.map_or(i, |x| x.max(i)));
            }
        }
    }
    let n = p.events.len() as i64;
    let seq: i64 = one(
        c,
        q("UPDATE runs SET event_seq = event_seq + $2,
                  last_completed_step = CASE WHEN $3::int4 IS NULL THEN last_completed_step ELSE GREATEST(COALESCE(last_completed_step, $3), $3) END
           WHERE id = $1 RETURNING event_seq")
        .bind(p.run_id.0)
        .bind(n)
        .bind(last_done.map(|v| v.min(i32::MAX as u32) as i32)),
        |r| r.try_get(0),
    )
    .await?;
    let first = seq - n;
    let mut out = Vec::with_capacity(p.events.len());
    if n > 0 {
        let idx: Vec<Option<i32>> =
            p.events.iter().map(|e| e.step_index.map(|v| v.min(i32::MAX as u32) as i32)).collect();
        let kinds: Vec<String> = p.events.iter().map(|e| enum_str(&e.kind)).collect();
        let names: Vec<&str> = p.events.iter().map(|e| e.name.as_str()).collect();
        let details: Vec<String> = p
            .events
            .iter()
            .map(|e| serde_json::to_string(&e.detail).map_err(StoreError::backend))
            .collect::<StoreResult<_>>()?;
        exec(
            c,
            q("INSERT INTO step_events (run_id, seq, step_index, kind, name, detail, at)
               SELECT $1, $2 + t.ord, t.idx, t.kind, t.name, t.detail::jsonb, $7
               FROM unnest($3::int4[], $4::text[], $5::text[], $6::text[]) WITH ORDINALITY AS t(idx, kind, name, detail, ord)")
            .bind(p.run_id.0)
            .bind(first)
            .bind(idx)
            .bind(kinds)
            .bind(names)
            .bind(details)
            .bind(p.now),
        )
        .await?;
    }
    for (k, e) in p.events.into_iter().enumerate() {
        out.push(StepEvent {
            run_id: p.run_id,
            seq: (first + 1 + k as i64).max(0) as u64,
            step_index: e.step_index,
            kind: e.kind,
            name: e.name,
            detail: e.detail,
            at: p.now,
        });
    }
    Ok(out)
}

pub async fn step_events_read_after(
    c: &mut PgConnection,
    run_id: RunId,
    after: u64,
    limit: u32,
) -> StoreResult<Vec<StepEvent>> {
    run_get(c, run_id).await?;
    all(
        c,
        q(sql!("SELECT {EVENT_COLS} FROM step_events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"))
            .bind(run_id.0)
            .bind(i(after))
            .bind(limit.clamp(1, 10_000) as i64),
        event,
    )
    .await
}

// ---------------------------------------------------------------- info requests

pub async fn info_requests_create(c: &mut PgConnection, p: InfoAsk) -> StoreResult<Vec<InfoRequest>> {
    let r0 = run_get(c, p.run_id).await?;
    // Item first, then run: the order every item-level operation takes.
    let item = work_item_lock(c, r0.work_item_id).await?;
    let r = fenced(c, p.run_id, p.token, p.now).await?;
    if p.questions.is_empty() {
        return Err(StoreError::invalid("questions", "at least one question"));
    }
    r.state.transition(RunState::WaitingInput)?;
    item.state.transition(WorkItemState::WaitingInput)?;
    let mut out = Vec::with_capacity(p.questions.len());
    for qn in p.questions {
        let ir = InfoRequest {
            id: InfoRequestId::new(),
            run_id: r.id,
            work_item_id: r.work_item_id,
            project_id: r.project_id,
            key: qn.key,
            prompt: qn.prompt,
            kind: qn.kind,
            choices: qn.choices,
            state: InfoRequestState::Pending,
            deadline: qn.deadline,
            created_at: p.now,
            answered_at: None,
            answered_by: None,
            answer: None,
        };
        exec(
            c,
            q(sql!("INSERT INTO info_requests ({INFO_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10, NULL, NULL, NULL)"))
                .bind(ir.id.0)
                .bind(ir.run_id.0)
                .bind(ir.work_item_id.0)
                .bind(ir.project_id.0)
                .bind(&ir.key)
                .bind(&ir.prompt)
                .bind(enum_str(&ir.kind))
                .bind(&ir.choices)
                .bind(ir.deadline)
                .bind(ir.created_at),
        )
        .await?;
        out.push(ir);
    }
    exec(
        c,
        q("UPDATE runs SET state = 'waiting_input', lease_expires_at = NULL, usage = COALESCE($2, usage) WHERE id = $1")
            .bind(r.id.0)
            .bind(p.usage.as_ref().map(Json)),
    )
    .await?;
    set_item_state(c, r.work_item_id, WorkItemState::WaitingInput, p.now).await?;
    Ok(out)
}

pub async fn info_request_get(c: &mut PgConnection, id: InfoRequestId) -> StoreResult<InfoRequest> {
    opt(c, q(sql!("SELECT {INFO_COLS} FROM info_requests WHERE id = $1")).bind(id.0), info)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::InfoRequest, id))
}

pub async fn info_request_list(c: &mut PgConnection, f: &InfoRequestFilter) -> StoreResult<Vec<InfoRequest>> {
    all(
        c,
        q(sql!(
            "SELECT {INFO_COLS} FROM info_requests WHERE id > $1 AND ($2::text IS NULL OR state = $2) AND ($3::uuid IS NULL OR run_id = $3)
             AND ($4::uuid IS NULL OR project_id = $4) ORDER BY id LIMIT $5"
        ))
        .bind(after(&f.page))
        .bind(f.state.map(|s| s.as_str()))
        .bind(f.run_id.map(|r| r.0))
        .bind(f.project_id.map(|p| p.0))
        .bind(lim(&f.page)),
        info,
    )
    .await
}

pub async fn info_request_answer(c: &mut PgConnection, p: InfoAnswer) -> StoreResult<InfoAnswered> {
    let req0 = info_request_get(c, p.id).await?;
    // Item first (it may be resumed), then the request.
    work_item_lock(c, req0.work_item_id).await?;
    let req = opt(c, q(sql!("SELECT {INFO_COLS} FROM info_requests WHERE id = $1 FOR UPDATE")).bind(p.id.0), info)
        .await?
        .ok_or_else(|| StoreError::not_found(EntityKind::InfoRequest, p.id))?;
    if req.state != InfoRequestState::Pending {
        return Err(StoreError::conflict(format!("info request {} is {}", p.id, req.state.as_str())));
    }
    let encoded = SealedValue::encode(&p.answer);
    let request = one(
        c,
        q(sql!(
            "UPDATE info_requests SET state = 'answered', answer = $2, answered_at = $3, answered_by = $4 WHERE id = $1 RETURNING {INFO_COLS}"
        ))
        .bind(p.id.0)
        .bind(encoded)
        .bind(p.now)
        .bind(p.answered_by),
        info,
    )
    .await?;
    let open: i64 = one(
        c,
        q("SELECT COUNT(*) FROM info_requests WHERE run_id = $1 AND state = 'pending'").bind(req.run_id.0),
        |r| r.try_get(0),
    )
    .await?;
    let mut resumed = false;
    if open == 0 {
        let n = exec(
            c,
            q("UPDATE work_items SET state = 'queued', run_at = $2, updated_at = $2 WHERE id = $1 AND state = 'waiting_input'")
                .bind(req.work_item_id.0)
                .bind(p.now),
        )
        .await?;
        resumed = n > 0;
    }
    Ok(InfoAnswered { request, resumed })
}

pub async fn info_answers_for_run(
    c: &mut PgConnection,
    run_id: RunId,
    token: u64,
    now: DateTime<Utc>,
) -> StoreResult<Vec<InfoRequest>> {
    let r = run_get(c, run_id).await?;
    rules::check_fence(&r, token, now)?;
    all(c, q(sql!("SELECT {INFO_COLS} FROM info_requests WHERE run_id = $1 ORDER BY id")).bind(run_id.0), info).await
}

// ---------------------------------------------------------------- stats

pub async fn stats(c: &mut PgConnection) -> StoreResult<QueueStats> {
    let mut s = QueueStats::zeroed();
    let rows = all(c, q("SELECT state, COUNT(*) FROM work_items GROUP BY state"), |r| {
        Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?))
    })
    .await?;
    for (k, v) in rows {
        s.work_items.insert(k, v.max(0) as u64);
    }
    let rows = all(c, q("SELECT state, COUNT(*) FROM runs GROUP BY state"), |r| {
        Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?))
    })
    .await?;
    for (k, v) in rows {
        s.runs.insert(k, v.max(0) as u64);
    }
    let (pi, pa): (i64, i64) = one(
        c,
        q("SELECT (SELECT COUNT(*) FROM info_requests WHERE state = 'pending'), (SELECT COUNT(*) FROM approvals WHERE state = 'pending')"),
        |r| Ok((r.try_get(0)?, r.try_get(1)?)),
    )
    .await?;
    s.pending_info_requests = pi.max(0) as u64;
    s.pending_approvals = pa.max(0) as u64;
    Ok(s)
}
