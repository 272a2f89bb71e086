//! Handlers of the management API (projects, requirements, work items, recipes, approvals, scheduler, runs,
//! info requests, observability).

use crate::dto::*;
use crate::error::{ApiError, ApiResult};
use crate::extract::{body_bytes, check_json_type, media_type, parse_json, Caller, Json, OptionalJson, Path, Query};
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use orchestrator_core::domain::*;
use orchestrator_core::ids::*;
use orchestrator_core::orchestrator::{CreateWorkItem, RequeueRequest, UpdateWorkItem};
use orchestrator_core::retry::RetryOverrides;
use orchestrator_core::state::{ApprovalState, RunState, WorkItemState};
use orchestrator_core::store::*;
use serde::Deserialize;
use std::str::FromStr;
use uuid::Uuid;

pub(crate) use axum::Json as J;

/// `?limit=&after=` of every list.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    limit: Option<u32>,
    after: Option<Uuid>,
}

fn page(limit: Option<u32>, after: Option<Uuid>) -> (Page, usize) {
    let p = Page { limit: limit.unwrap_or(100), after };
    (p, p.effective_limit())
}

fn parse_state<T: FromStr + std::fmt::Display>(field: &str, v: &str, all: &[T]) -> ApiResult<T> {
    v.parse().map_err(|_| {
        let names: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        ApiError::bad_request(format!("unknown {field} `{v}`; expected one of: {}", names.join(", ")))
    })
}

/// The name recorded as who did something (`by`, `answered_by`, `author`). With tokens it is the token's
/// name, whatever the body says (the body cannot speak for someone else); without tokens, the body's value,
/// else `anonymous`.
fn who(s: &AppState, given: Option<String>, caller: &Caller) -> String {
    if s.config.auth_enabled() {
        if let Some(g) = given.as_deref().filter(|g| !g.trim().is_empty() && *g != caller.0.name) {
            tracing::debug!(principal = %caller.0.name, given = %g, "audit name from the body ignored: the token's name is recorded");
        }
        return caller.0.name.clone();
    }
    given.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| caller.0.name.clone())
}

/// Whether approvals are checked against their author: tokens on, approvals required, self-approval off.
fn self_approval_checked(s: &AppState) -> bool {
    s.config.auth_enabled() && s.orch.config().require_approval && !s.config.allow_self_approval()
}

fn self_approval_refused(caller: &Caller, what: &str) -> ApiError {
    tracing::warn!(principal = %caller.0.name, "self-approval refused");
    ApiError::forbidden(format!(
        "`{}` {what}, so another token must approve it (ORCH_ALLOW_SELF_APPROVAL=true allows approving one's own \
         work)",
        caller.0.name
    ))
}

/// Refuses `caller` approving a draft it proposed (see [`self_approval_checked`]).
async fn check_draft_approver(s: &AppState, caller: &Caller, id: DraftId) -> ApiResult<()> {
    if self_approval_checked(s) {
        let draft = s.orch.store().draft_get(id).await?;
        if draft.proposed_by.as_deref() == Some(caller.0.name.as_str()) {
            return Err(self_approval_refused(caller, "proposed these requirements"));
        }
    }
    Ok(())
}

/// Refuses `caller` approving what it proposed or created, changed or submitted through this router.
async fn check_approver(s: &AppState, caller: &Caller, id: ApprovalId) -> ApiResult<()> {
    if !self_approval_checked(s) {
        return Ok(());
    }
    match s.orch.store().approval_get(id).await?.subject {
        ApprovalSubject::RequirementsDraft(d) => check_draft_approver(s, caller, d).await,
        ApprovalSubject::WorkItem(w) if s.authors.is_author(w, &caller.0.name) => {
            Err(self_approval_refused(caller, "created, changed or submitted this work item"))
        }
        ApprovalSubject::WorkItem(_) => Ok(()),
    }
}

// ---- health, metrics, openapi ----

pub(crate) async fn healthz() -> J<Health> {
    J(Health { status: "ok".into() })
}

pub(crate) async fn readyz(State(s): State<AppState>) -> ApiResult<J<Health>> {
    match s.orch.store().ping().await {
        Ok(()) => Ok(J(Health { status: "ready".into() })),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(ApiError::unavailable("the store is not reachable", true))
        }
    }
}

pub(crate) async fn metrics(State(s): State<AppState>) -> Response {
    let stats = match s.orch.store().stats().await {
        Ok(st) => Some(st),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: store stats unavailable");
            None
        }
    };
    let body = s.metrics.render(stats.as_ref());
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], body)
        .into_response()
}

pub(crate) async fn openapi(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], s.openapi.as_ref().clone()).into_response()
}

pub(crate) async fn stats(State(s): State<AppState>) -> ApiResult<J<QueueStats>> {
    Ok(J(s.orch.store().stats().await?))
}

// ---- projects and visions ----

pub(crate) async fn project_create(
    State(s): State<AppState>,
    Json(b): Json<CreateProject>,
) -> ApiResult<(StatusCode, J<Project>)> {
    Ok((StatusCode::CREATED, J(s.orch.create_project_with(b).await?)))
}

pub(crate) async fn project_list(
    State(s): State<AppState>,
    Query(q): Query<PageQuery>,
) -> ApiResult<J<ListPage<Project>>> {
    let (p, limit) = page(q.limit, q.after);
    let items = s.orch.store().project_list(p).await?;
    Ok(J(ListPage::new(items, limit, |p| p.id.0)))
}

pub(crate) async fn project_get(State(s): State<AppState>, Path(id): Path<ProjectId>) -> ApiResult<J<Project>> {
    Ok(J(s.orch.store().project_get(id).await?))
}

pub(crate) async fn project_update(
    State(s): State<AppState>,
    Path(id): Path<ProjectId>,
    Json(b): Json<UpdateProject>,
) -> ApiResult<J<Project>> {
    let u = orchestrator_core::orchestrator::UpdateProject {
        name: b.name,
        description: b.description,
        repository: b.repository,
    };
    Ok(J(s.orch.update_project_with(id, u).await?))
}

pub(crate) async fn project_delete(State(s): State<AppState>, Path(id): Path<ProjectId>) -> ApiResult<StatusCode> {
    s.orch.store().project_delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VersionQuery {
    version: Option<u32>,
}

pub(crate) async fn vision_get(
    State(s): State<AppState>,
    Path(id): Path<ProjectId>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<J<Vision>> {
    Ok(J(s.orch.store().vision_get(id, q.version).await?))
}

pub(crate) async fn vision_versions(
    State(s): State<AppState>,
    Path(id): Path<ProjectId>,
) -> ApiResult<J<ListPage<Vision>>> {
    s.orch.store().project_get(id).await?;
    Ok(J(ListPage::all(s.orch.store().vision_list(id).await?)))
}

pub(crate) async fn vision_put(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<ProjectId>,
    Json(b): Json<PutVision>,
) -> ApiResult<J<Vision>> {
    Ok(J(s.orch.put_vision(id, &b.text, Some(who(&s, b.author, &caller))).await?))
}

// ---- requirements ----

pub(crate) async fn requirements_propose(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<ProjectId>,
    Json(b): Json<ProposeRequirements>,
) -> ApiResult<(StatusCode, J<DraftCreated>)> {
    let title = match b.title.filter(|t| !t.trim().is_empty()) {
        Some(t) => t,
        None if b.requirements.len() == 1 => b.requirements[0].title.clone(),
        None => format!("{} requirements", b.requirements.len()),
    };
    let (draft, approval) =
        s.orch.propose_requirements(id, &title, b.requirements, Some(who(&s, b.author, &caller))).await?;
    Ok((StatusCode::CREATED, J(DraftCreated { draft, approval })))
}

pub(crate) async fn requirements_list(
    State(s): State<AppState>,
    Path(id): Path<ProjectId>,
    Query(q): Query<PageQuery>,
) -> ApiResult<J<ListPage<RequirementsDraft>>> {
    s.orch.store().project_get(id).await?;
    let (p, limit) = page(q.limit, q.after);
    let items = s.orch.store().draft_list(id, p).await?;
    Ok(J(ListPage::new(items, limit, |d| d.id.0)))
}

pub(crate) async fn requirements_get(
    State(s): State<AppState>,
    Path(id): Path<DraftId>,
) -> ApiResult<J<RequirementsDraft>> {
    Ok(J(s.orch.store().draft_get(id).await?))
}

async fn decide_draft(
    s: AppState,
    caller: Caller,
    id: DraftId,
    d: Decision,
    b: DecideBody,
) -> ApiResult<J<DecisionResult>> {
    if d == Decision::Approve {
        check_draft_approver(&s, &caller, id).await?;
    }
    Ok(J(s.orch.decide_draft(id, d, &who(&s, b.by, &caller), b.reason).await?.into()))
}

pub(crate) async fn requirements_approve(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<DraftId>,
    OptionalJson(b): OptionalJson<DecideBody>,
) -> ApiResult<J<DecisionResult>> {
    decide_draft(s, caller, id, Decision::Approve, b).await
}

pub(crate) async fn requirements_reject(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<DraftId>,
    OptionalJson(b): OptionalJson<DecideBody>,
) -> ApiResult<J<DecisionResult>> {
    decide_draft(s, caller, id, Decision::Reject, b).await
}

// ---- work items ----

/// `POST /work-items`: one `CreateWorkItem`, or `{"items": [CreateWorkItem, ...]}`.
pub(crate) async fn work_item_create(State(s): State<AppState>, caller: Caller, req: Request) -> ApiResult<Response> {
    check_json_type(req.headers())?;
    let bytes = body_bytes(req, &s).await?;
    let value: serde_json::Value = parse_json(&bytes)?;
    if value.get("items").is_some() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Batch {
            items: Vec<CreateWorkItem>,
        }
        let b: Batch = parse_json(&bytes)?;
        if b.items.is_empty() || b.items.len() > Page::MAX_LIMIT as usize {
            return Err(ApiError::invalid("items", format!("between 1 and {} items", Page::MAX_LIMIT)));
        }
        let created = s.orch.create_work_items(b.items).await?;
        for c in created.iter().filter(|c| c.created) {
            s.authors.record(c.work_item.id, &caller.0.name);
        }
        let status = if created.iter().any(|c| c.created) { StatusCode::CREATED } else { StatusCode::OK };
        let body = WorkItemsCreated { items: created.into_iter().map(Into::into).collect() };
        Ok((status, J(body)).into_response())
    } else {
        let c: CreateWorkItem = parse_json(&bytes)?;
        let created = s.orch.create_work_item(c).await?;
        if created.created {
            s.authors.record(created.work_item.id, &caller.0.name);
        }
        let status = if created.created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, J(WorkItemCreatedBody::from(created))).into_response())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkItemQuery {
    project_id: Option<ProjectId>,
    state: Option<String>,
    label: Option<String>,
    limit: Option<u32>,
    after: Option<Uuid>,
}

pub(crate) async fn work_item_list(
    State(s): State<AppState>,
    Query(q): Query<WorkItemQuery>,
) -> ApiResult<J<ListPage<WorkItem>>> {
    let state = match q.state.as_deref() {
        None | Some("") | Some("all") => None,
        Some(v) => Some(parse_state("state", v, WorkItemState::ALL)?),
    };
    let (p, limit) = page(q.limit, q.after);
    let items = s
        .orch
        .store()
        .work_item_list(WorkItemFilter { project_id: q.project_id, state, label: q.label, page: p })
        .await?;
    Ok(J(ListPage::new(items, limit, |w| w.id.0)))
}

pub(crate) async fn work_item_get(State(s): State<AppState>, Path(id): Path<WorkItemId>) -> ApiResult<J<WorkItem>> {
    Ok(J(s.orch.store().work_item_get(id).await?))
}

pub(crate) async fn work_item_update(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<WorkItemId>,
    Json(b): Json<UpdateWorkItem>,
) -> ApiResult<J<WorkItemChangedBody>> {
    let changed = s.orch.update_work_item(id, b).await?;
    s.authors.record(id, &caller.0.name);
    Ok(J(changed.into()))
}

pub(crate) async fn work_item_submit(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<WorkItemId>,
) -> ApiResult<J<WorkItemChangedBody>> {
    let changed = s.orch.submit_work_item(id).await?;
    s.authors.record(id, &caller.0.name);
    Ok(J(changed.into()))
}

/// A cancellation's reason, saying who asked (the run's log shows it).
fn cancel_reason(reason: Option<String>, caller: &Caller) -> String {
    let reason = reason.map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).unwrap_or_else(|| "cancelled".into());
    format!("{reason} (by {})", caller.0.name)
}

pub(crate) async fn work_item_cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<WorkItemId>,
    OptionalJson(b): OptionalJson<CancelBody>,
) -> ApiResult<J<WorkItem>> {
    let item = s.orch.cancel_work_item(id, Some(cancel_reason(b.reason, &caller))).await?;
    if let Some(run) = item.current_run_id {
        s.log_bus.notify(run);
    }
    Ok(J(item))
}

pub(crate) async fn work_item_policy(
    State(s): State<AppState>,
    Path(id): Path<WorkItemId>,
    Json(b): Json<RetryOverrides>,
) -> ApiResult<J<WorkItem>> {
    Ok(J(s.orch.set_retry_policy(id, b).await?))
}

pub(crate) async fn work_item_requeue(
    State(s): State<AppState>,
    Path(id): Path<WorkItemId>,
    OptionalJson(b): OptionalJson<RequeueRequest>,
) -> ApiResult<J<WorkItem>> {
    Ok(J(s.orch.requeue_work_item(id, b).await?))
}

pub(crate) async fn work_item_recipe(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<WorkItemId>,
    Json(b): Json<AttachRecipe>,
) -> ApiResult<J<WorkItemChangedBody>> {
    let changed = s.orch.attach_recipe(id, b.recipe_id).await?;
    s.authors.record(id, &caller.0.name);
    Ok(J(changed.into()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunQuery {
    work_item_id: Option<WorkItemId>,
    state: Option<String>,
    agent_id: Option<String>,
    limit: Option<u32>,
    after: Option<Uuid>,
}

async fn list_runs(s: &AppState, q: RunQuery) -> ApiResult<J<ListPage<Run>>> {
    let state = match q.state.as_deref() {
        None | Some("") | Some("all") => None,
        Some(v) => Some(parse_state("state", v, RunState::ALL)?),
    };
    let (p, limit) = page(q.limit, q.after);
    let items = s
        .orch
        .store()
        .run_list(RunFilter { work_item_id: q.work_item_id, state, agent_id: q.agent_id, page: p })
        .await?;
    Ok(J(ListPage::new(items, limit, |r| r.id.0)))
}

pub(crate) async fn work_item_runs(
    State(s): State<AppState>,
    Path(id): Path<WorkItemId>,
    Query(q): Query<PageQuery>,
) -> ApiResult<J<ListPage<Run>>> {
    s.orch.store().work_item_get(id).await?;
    list_runs(&s, RunQuery { work_item_id: Some(id), limit: q.limit, after: q.after, ..Default::default() }).await
}

// ---- recipes ----

#[derive(Debug, Clone, Copy, PartialEq)]
enum RecipeMode {
    Create,
    Validate,
}

async fn recipe_source(s: &AppState, req: Request) -> ApiResult<RecipeSource> {
    let mt = media_type(req.headers());
    let bytes = body_bytes(req, s).await?;
    match mt.as_deref() {
        Some("application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml") => {
            let yaml = String::from_utf8(bytes.to_vec())
                .map_err(|_| ApiError::bad_request("the YAML body is not valid UTF-8"))?;
            Ok(RecipeSource { yaml, project_id: None })
        }
        None => Err(ApiError::bad_request("set Content-Type: application/yaml (YAML text) or application/json")),
        Some(mt) if mt == "application/json" || mt.ends_with("+json") => parse_json(&bytes),
        Some(mt) => Err(ApiError::bad_request(format!(
            "unsupported Content-Type `{mt}`; send application/yaml (YAML text) or application/json"
        ))),
    }
}

async fn recipe_in(s: AppState, req: Request, mode: RecipeMode) -> ApiResult<Response> {
    let src = recipe_source(&s, req).await?;
    match mode {
        RecipeMode::Validate => Ok(J(s.orch.validate_recipe(&src.yaml)?).into_response()),
        RecipeMode::Create => {
            let r = s.orch.create_recipe(src.project_id, &src.yaml).await?;
            Ok((StatusCode::CREATED, J(r)).into_response())
        }
    }
}

pub(crate) async fn recipe_create(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    recipe_in(s, req, RecipeMode::Create).await
}

pub(crate) async fn recipe_validate(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    recipe_in(s, req, RecipeMode::Validate).await
}

pub(crate) async fn recipe_list(
    State(s): State<AppState>,
    Query(q): Query<PageQuery>,
) -> ApiResult<J<ListPage<ToolRecipe>>> {
    let (p, limit) = page(q.limit, q.after);
    let items = s.orch.store().recipe_list(p).await?;
    Ok(J(ListPage::new(items, limit, |r| r.id.0)))
}

pub(crate) async fn recipe_get(State(s): State<AppState>, Path(id): Path<RecipeId>) -> ApiResult<J<ToolRecipe>> {
    Ok(J(s.orch.store().recipe_get(id).await?))
}

// ---- approvals ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApprovalQuery {
    state: Option<String>,
    project_id: Option<ProjectId>,
    limit: Option<u32>,
    after: Option<Uuid>,
}

pub(crate) async fn approval_list(
    State(s): State<AppState>,
    Query(q): Query<ApprovalQuery>,
) -> ApiResult<J<ListPage<ApprovalRequest>>> {
    let state = match q.state.as_deref() {
        None | Some("") => Some(ApprovalState::Pending),
        Some("all") => None,
        Some(v) => Some(parse_state("state", v, ApprovalState::ALL)?),
    };
    let (p, limit) = page(q.limit, q.after);
    let items = s.orch.store().approval_list(ApprovalFilter { state, project_id: q.project_id, page: p }).await?;
    Ok(J(ListPage::new(items, limit, |a| a.id.0)))
}

pub(crate) async fn approval_get(
    State(s): State<AppState>,
    Path(id): Path<ApprovalId>,
) -> ApiResult<J<ApprovalRequest>> {
    Ok(J(s.orch.store().approval_get(id).await?))
}

pub(crate) async fn approval_approve(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<ApprovalId>,
    OptionalJson(b): OptionalJson<DecideBody>,
) -> ApiResult<J<DecisionResult>> {
    check_approver(&s, &caller, id).await?;
    Ok(J(s.orch.decide_approval(id, Decision::Approve, &who(&s, b.by, &caller), b.reason).await?.into()))
}

pub(crate) async fn approval_reject(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<ApprovalId>,
    OptionalJson(b): OptionalJson<DecideBody>,
) -> ApiResult<J<DecisionResult>> {
    Ok(J(s.orch.decide_approval(id, Decision::Reject, &who(&s, b.by, &caller), b.reason).await?.into()))
}

// ---- scheduler ----

/// `POST /scheduler/enqueue`: one `EnqueueItem` (answer: the `ScheduledTask`) or `{"items": [...]}`
/// (answer: `{"items": [ScheduledTask]}`).
pub(crate) async fn scheduler_enqueue(
    State(s): State<AppState>,
    Json(v): Json<serde_json::Value>,
) -> ApiResult<Response> {
    let to_enqueue = |e: EnqueueItem| Enqueue {
        work_item_id: e.work_item_id,
        options: EnqueueOptions { priority: e.priority, depends_on: e.depends_on, not_before: e.not_before },
    };
    let bytes = serde_json::to_vec(&v).map_err(|e| ApiError::internal(&e))?;
    if v.get("items").is_some() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Batch {
            items: Vec<EnqueueItem>,
        }
        let b: Batch = parse_json(&bytes)?;
        if b.items.is_empty() || b.items.len() > Page::MAX_LIMIT as usize {
            return Err(ApiError::invalid("items", format!("between 1 and {} items", Page::MAX_LIMIT)));
        }
        let tasks = s.orch.enqueue_many(b.items.into_iter().map(to_enqueue).collect()).await?;
        Ok(J(Enqueued { items: tasks }).into_response())
    } else {
        let e: EnqueueItem = parse_json(&bytes)?;
        let e = to_enqueue(e);
        Ok(J(s.orch.enqueue(e.work_item_id, e.options).await?).into_response())
    }
}

pub(crate) async fn scheduler_tick(State(s): State<AppState>) -> ApiResult<J<TickReportBody>> {
    let report = s.orch.tick().await?;
    Ok(J(report.into()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueueQuery {
    project_id: Option<ProjectId>,
    limit: Option<u32>,
    after: Option<Uuid>,
}

pub(crate) async fn scheduler_queue(
    State(s): State<AppState>,
    Query(q): Query<QueueQuery>,
) -> ApiResult<J<ListPage<ScheduledTask>>> {
    let (p, limit) = page(q.limit, q.after);
    let items = s.orch.store().queue_list(QueueFilter { project_id: q.project_id, page: p }).await?;
    Ok(J(ListPage::new(items, limit, |t| t.work_item_id.0)))
}

// ---- runs ----

pub(crate) async fn run_list(State(s): State<AppState>, Query(q): Query<RunQuery>) -> ApiResult<J<ListPage<Run>>> {
    list_runs(&s, q).await
}

pub(crate) async fn run_get(State(s): State<AppState>, Path(id): Path<RunId>) -> ApiResult<J<Run>> {
    Ok(J(s.orch.store().run_get(id).await?))
}

pub(crate) async fn run_cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    OptionalJson(b): OptionalJson<CancelBody>,
) -> ApiResult<J<Run>> {
    let run = s.orch.cancel_run(id, Some(cancel_reason(b.reason, &caller))).await?;
    s.log_bus.notify(id);
    Ok(J(run))
}

pub(crate) async fn run_result(State(s): State<AppState>, Path(id): Path<RunId>) -> ApiResult<J<RunResultView>> {
    match s.orch.run_result(id).await? {
        Some(r) => Ok(J(RunResultView {
            run_id: r.run_id,
            recorded_at: r.recorded_at,
            patch_bytes: r.patch.len() as u64,
            result: r.result,
        })),
        None => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("run `{id}` recorded no result (its project has no repository, or it has not finished)"),
        )),
    }
}

pub(crate) async fn run_diff(State(s): State<AppState>, Path(id): Path<RunId>) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    match s.orch.run_result(id).await? {
        Some(r) => Ok(([(axum::http::header::CONTENT_TYPE, "text/x-diff; charset=utf-8")], r.patch).into_response()),
        None => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("run `{id}` recorded no diff (its project has no repository, or it has not finished)"),
        )),
    }
}

pub(crate) async fn run_requeue(
    State(s): State<AppState>,
    Path(id): Path<RunId>,
    OptionalJson(b): OptionalJson<RequeueRequest>,
) -> ApiResult<J<WorkItem>> {
    Ok(J(s.orch.requeue_run(id, b).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SeqQuery {
    after: Option<u64>,
    limit: Option<u32>,
}

pub(crate) async fn run_logs(
    State(s): State<AppState>,
    Path(id): Path<RunId>,
    Query(q): Query<SeqQuery>,
) -> ApiResult<J<SeqPage<LogEntry>>> {
    s.orch.store().run_get(id).await?;
    let after = q.after.unwrap_or(0);
    let items = s.orch.store().logs_read_after(id, after, q.limit.unwrap_or(1000).clamp(1, 10_000)).await?;
    let next = items.last().map(|l| l.seq).unwrap_or(after);
    Ok(J(SeqPage { items, next }))
}

pub(crate) async fn run_steps(
    State(s): State<AppState>,
    Path(id): Path<RunId>,
    Query(q): Query<SeqQuery>,
) -> ApiResult<J<SeqPage<StepEvent>>> {
    s.orch.store().run_get(id).await?;
    let after = q.after.unwrap_or(0);
    let items = s.orch.store().step_events_read_after(id, after, q.limit.unwrap_or(1000).clamp(1, 10_000)).await?;
    let next = items.last().map(|l| l.seq).unwrap_or(after);
    Ok(J(SeqPage { items, next }))
}

// ---- info requests ----

/// Whether `caller` may read the answers of `run_id`'s questions: admins and the run's agent.
async fn may_read_answers(s: &AppState, caller: &Caller, run_id: RunId) -> ApiResult<bool> {
    if caller.is_admin() {
        return Ok(true);
    }
    if !caller.is_agent() {
        return Ok(false);
    }
    Ok(s.orch.store().run_get(run_id).await?.agent_id == caller.0.name)
}

fn view(s: &AppState, req: InfoRequest, reveal: bool) -> ApiResult<InfoRequestView> {
    let answer = if reveal { s.orch.reveal_answer(&req)? } else { None };
    Ok(InfoRequestView { request: req, answer })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InfoQuery {
    state: Option<String>,
    project_id: Option<ProjectId>,
    run_id: Option<RunId>,
    limit: Option<u32>,
    after: Option<Uuid>,
}

const INFO_STATES: &[&str] = &["pending", "answered", "cancelled", "expired"];

fn parse_info_state(v: &str) -> ApiResult<InfoRequestState> {
    match v {
        "pending" => Ok(InfoRequestState::Pending),
        "answered" => Ok(InfoRequestState::Answered),
        "cancelled" => Ok(InfoRequestState::Cancelled),
        "expired" => Ok(InfoRequestState::Expired),
        other => Err(ApiError::bad_request(format!(
            "unknown state `{other}`; expected one of: all, {}",
            INFO_STATES.join(", ")
        ))),
    }
}

async fn list_info(s: &AppState, caller: &Caller, f: InfoRequestFilter) -> ApiResult<J<ListPage<InfoRequestView>>> {
    let limit = f.page.effective_limit();
    let items = s.orch.store().info_request_list(f).await?;
    let mut out = Vec::with_capacity(items.len());
    let mut allowed: std::collections::HashMap<RunId, bool> = Default::default();
    for r in items {
        let reveal = match allowed.get(&r.run_id) {
            Some(b) => *b,
            None => {
                let b = may_read_answers(s, caller, r.run_id).await?;
                allowed.insert(r.run_id, b);
                b
            }
        };
        // In a list, an answer that cannot be decrypted (a retired key) hides that answer only.
        let answer = if reveal {
            s.orch.reveal_answer(&r).unwrap_or_else(|e| {
                tracing::error!(info_request_id = %r.id, error = %e, "cannot reveal an answer");
                None
            })
        } else {
            None
        };
        out.push(InfoRequestView { request: r, answer });
    }
    Ok(J(ListPage::new(out, limit, |v| v.request.id.0)))
}

pub(crate) async fn info_list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<InfoQuery>,
) -> ApiResult<J<ListPage<InfoRequestView>>> {
    let state = match q.state.as_deref() {
        None | Some("") => Some(InfoRequestState::Pending),
        Some("all") => None,
        Some(v) => Some(parse_info_state(v)?),
    };
    let (p, _) = page(q.limit, q.after);
    list_info(&s, &caller, InfoRequestFilter { state, run_id: q.run_id, project_id: q.project_id, page: p }).await
}

pub(crate) async fn run_info_requests(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<RunId>,
    Query(q): Query<PageQuery>,
) -> ApiResult<J<ListPage<InfoRequestView>>> {
    s.orch.store().run_get(id).await?;
    let (p, _) = page(q.limit, q.after);
    list_info(&s, &caller, InfoRequestFilter { state: None, run_id: Some(id), project_id: None, page: p }).await
}

pub(crate) async fn info_get(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<InfoRequestId>,
) -> ApiResult<J<InfoRequestView>> {
    let r = s.orch.store().info_request_get(id).await?;
    let reveal = may_read_answers(&s, &caller, r.run_id).await?;
    Ok(J(view(&s, r, reveal)?))
}

pub(crate) async fn info_answer(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<InfoRequestId>,
    Json(b): Json<AnswerBody>,
) -> ApiResult<J<InfoAnsweredBody>> {
    let by = who(&s, b.answered_by, &caller);
    let done = s.orch.answer_info_request(id, &b.value, &by).await?;
    let reveal = may_read_answers(&s, &caller, done.request.run_id).await?;
    Ok(J(InfoAnsweredBody { info_request: view(&s, done.request, reveal)?, resumed: done.resumed }))
}

pub(crate) async fn fallback() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}
