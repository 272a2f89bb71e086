//! The dashboard's pages. They read the store directly; every write is a form that `app.js` sends to the
//! JSON API (so the API's roles, checks and error bodies apply unchanged). Parts marked `data-live` are
//! refreshed in place while the page is open.

use super::{error_page, layout, Ctx, Nav};
use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use maud::{html, Markup};
use orchestrator_core::domain::*;
use orchestrator_core::ids::*;
use orchestrator_core::recipe::InputKind;
use orchestrator_core::state::{ApprovalState, RunState, WorkItemState};
use orchestrator_core::store::*;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type PageResult = Result<Response, ApiError>;

fn all(limit: u32) -> Page {
    Page { limit, after: None }
}

fn when(t: &DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S")) } }
}

fn when_opt(t: &Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => when(t),
        None => html! { span .muted { "—" } },
    }
}

fn badge(state: &str) -> Markup {
    html! { span class={"badge s-" (state)} data-testid="state" { (state.replace('_', " ")) } }
}

fn short(id: impl std::fmt::Display) -> String {
    let s = id.to_string();
    s.get(s.len().saturating_sub(8)..).unwrap_or(&s).to_string()
}

/// A form that `app.js` sends to the API: `api` is the API path, `next` `reload` or a dashboard URL with
/// `{field.path}` placeholders filled from the answer.
fn api_form(method: &str, api: &str, next: &str, class: &str, body: Markup) -> Markup {
    html! {
        form class={"api " (class)} data-api=(api) data-method=(method) data-next=(next) novalidate {
            (body)
            div .form-error role="alert" aria-live="assertive" {}
        }
    }
}

fn field(id: &str, label: &str, input: Markup) -> Markup {
    html! { div .field { label for=(id) { (label) } (input) } }
}

fn render(ctx: &Ctx, r: PageResult) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) => error_page(ctx, e),
    }
}

// ---- overview ----

/// Samples of the total number of runs, for runs per minute.
#[derive(Debug, Default)]
pub(crate) struct Sampler {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Sampler {
    /// Records `total` now and answers runs per minute over the last ten minutes (`None` for the first
    /// fifteen seconds of samples).
    fn rate(&self, total: u64) -> Option<f64> {
        let now = Instant::now();
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while s.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(600)) {
            s.pop_front();
        }
        if s.back().is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(2)) {
            s.push_back((now, total));
        }
        let (t0, n0) = *s.front()?;
        let secs = now.duration_since(t0).as_secs_f64();
        (secs >= 15.0).then(|| total.saturating_sub(n0) as f64 * 60.0 / secs)
    }
}

pub(crate) async fn overview(
    State(s): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Extension(sampler): Extension<Arc<Sampler>>,
) -> Response {
    let r = async {
        let store = s.orch.store();
        let stats = store.stats().await?;
        let running = store
            .run_list(RunFilter { work_item_id: None, state: Some(RunState::Running), agent_id: None, page: all(100) })
            .await?;
        let mut failed = store
            .work_item_list(WorkItemFilter {
                project_id: None,
                state: Some(WorkItemState::Failed),
                label: None,
                page: all(Page::MAX_LIMIT),
            })
            .await?;
        failed.sort_by_key(|w| std::cmp::Reverse(w.updated_at));
        failed.truncate(10);
        let total_runs: u64 = stats.runs.values().sum();
        let rate = sampler.rate(total_runs);
        let mut titles = HashMap::new();
        for r in &running {
            if let Ok(w) = store.work_item_get(r.work_item_id).await {
                titles.insert(r.work_item_id, w.title);
            }
        }
        let agents: std::collections::BTreeSet<&str> = running.iter().map(|r| r.agent_id.as_str()).collect();
        let body = html! {
            div #live-overview data-live {
                section aria-labelledby="q-h" {
                    h2 #q-h { "Work items by state" }
                    ul .stats {
                        @for st in WorkItemState::ALL {
                            li {
                                a href={(ctx.ui("/items")) "#col-" (st.as_str())} {
                                    span .n data-testid={"count-" (st.as_str())} { (stats.work_items.get(st.as_str()).copied().unwrap_or(0)) }
                                    span .l { (st.as_str().replace('_', " ")) }
                                }
                            }
                        }
                    }
                }
                section aria-labelledby="r-h" {
                    h2 #r-h { "Runs" }
                    ul .stats {
                        li { span .n { (stats.runs.get("running").copied().unwrap_or(0)) } span .l { "running" } }
                        li { span .n { (agents.len()) } span .l { "agents at work" } }
                        li { span .n { @match rate { Some(r) => (format!("{r:.1}")), None => "…" } } span .l { "runs per minute" } }
                        li { a href=(ctx.ui("/approvals")) { span .n { (stats.pending_approvals) } span .l { "pending approvals" } } }
                        li { a href=(ctx.ui("/questions")) { span .n { (stats.pending_info_requests) } span .l { "open questions" } } }
                    }
                    p .muted .small { "Runs per minute: measured from this page's refreshes over the last ten minutes." }
                }
                section aria-labelledby="a-h" {
                    h2 #a-h { "Running now" }
                    @if running.is_empty() { p .muted { "No run is in progress." } }
                    @else {
                        ul .list {
                            @for r in &running {
                                li {
                                    a href=(ctx.ui(&format!("/runs/{}", r.id))) { (titles.get(&r.work_item_id).map(String::as_str).unwrap_or("run")) " · attempt " (r.attempt) }
                                    " " span .muted { "agent " (r.agent_id) ", since " (when(&r.claimed_at)) }
                                }
                            }
                        }
                    }
                }
                section aria-labelledby="f-h" {
                    h2 #f-h { "Recent failures" }
                    @if failed.is_empty() { p .muted { "No failed work item." } }
                    @else {
                        ul .list {
                            @for w in &failed {
                                li {
                                    a href=(ctx.ui(&format!("/items/{}", w.id))) { (w.title) }
                                    " " span .muted { (when(&w.updated_at)) }
                                    @if let Some(e) = &w.last_error { div .err-text { (e) } }
                                    @if let Some(run) = w.current_run_id { " " a href=(ctx.ui(&format!("/runs/{run}"))) { "last run" } }
                                }
                            }
                        }
                    }
                }
            }
        };
        Ok(layout(&ctx, Nav::Overview, "Overview", body).into_response())
    }
    .await;
    render(&ctx, r)
}

// ---- projects ----

pub(crate) async fn projects(State(s): State<AppState>, Extension(ctx): Extension<Ctx>) -> Response {
    let r = async {
        let list = s.orch.store().project_list(all(Page::MAX_LIMIT)).await?;
        let body = html! {
            @if list.is_empty() { p .muted { "No project yet." } }
            @else {
                div .table-wrap {
                    table {
                        thead { tr { th scope="col" { "Name" } th scope="col" { "Repository" } th scope="col" { "Created" } } }
                        tbody {
                            @for p in &list {
                                tr {
                                    td { a href=(ctx.ui(&format!("/projects/{}", p.id))) { (p.name) } }
                                    td .wrap { @if let Some(r) = &p.repository { code { (r.url) } @if let Some(b) = &r.base_branch { " (" (b) ")" } } @else { span .muted { "none" } } }
                                    td { (when(&p.created_at)) }
                                }
                            }
                        }
                    }
                }
            }
            @if ctx.can_operate() {
                section aria-labelledby="new-h" .card {
                    h2 #new-h { "New project" }
                    (api_form("POST", "/projects", &ctx.ui("/projects/{id}"), "", html! {
                        (field("p-name", "Name", html! { input #p-name name="name" required autocomplete="off"; }))
                        (field("p-desc", "Description", html! { textarea #p-desc name="description" rows="2" {} }))
                        (field("p-repo", "Repository URL (optional)", html! { input #p-repo name="repository.url" autocomplete="off" placeholder="https://… or /path/to/repo.git"; }))
                        (field("p-branch", "Base branch (optional)", html! { input #p-branch name="repository.base_branch" autocomplete="off" placeholder="main"; }))
                        button type="submit" { "Create project" }
                    }))
                }
            }
        };
        Ok(layout(&ctx, Nav::Projects, "Projects", body).into_response())
    }
    .await;
    render(&ctx, r)
}

pub(crate) async fn project(
    State(s): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<ProjectId>,
) -> Response {
    let r = async {
        let store = s.orch.store();
        let p = store.project_get(id).await?;
        let mut versions = store.vision_list(id).await?;
        versions.sort_by_key(|v| std::cmp::Reverse(v.version));
        let drafts = store.draft_list(id, all(Page::MAX_LIMIT)).await?;
        let items = store
            .work_item_list(WorkItemFilter { project_id: Some(id), state: None, label: None, page: all(Page::MAX_LIMIT) })
            .await?;
        let titles: HashMap<WorkItemId, &str> = items.iter().map(|w| (w.id, w.title.as_str())).collect();
        let current = versions.first();
        let body = html! {
            p { (p.description) }
            p { "Repository: " @if let Some(r) = &p.repository { code .wrap { (r.url) } @if let Some(b) = &r.base_branch { " (" (b) ")" } } @else { span .muted { "none (runs record no diff)" } } }
            p { a href={(ctx.ui("/items")) "?project=" (p.id)} { "Work items of this project (" (items.len()) ")" }
                @if ctx.can_operate() { " · " a href={(ctx.ui("/items/new")) "?project=" (p.id)} { "New work item" } } }
            section aria-labelledby="v-h" .card {
                h2 #v-h { "Vision" @if let Some(v) = current { " " span .muted { "v" (v.version) } } }
                @match current {
                    Some(v) => { div .text data-testid="vision" { (v.text) } }
                    None => { p .muted { "No vision written yet." } }
                }
                @if ctx.can_operate() {
                    details {
                        summary { "Edit the vision" }
                        (api_form("PUT", &format!("/projects/{id}/vision"), "reload", "", html! {
                            (field("vision-text", "Vision", html! { textarea #vision-text name="text" rows="6" required { (current.map(|v| v.text.as_str()).unwrap_or("")) } }))
                            button type="submit" { "Save a new version" }
                        }))
                    }
                }
                @if versions.len() > 1 {
                    details {
                        summary { "Version history (" (versions.len()) ")" }
                        ol .history reversed {
                            @for v in &versions {
                                li { strong { "v" (v.version) } " " span .muted { (when(&v.created_at)) @if let Some(a) = &v.author { " by " (a) } } div .text { (v.text) } }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="d-h" .card {
                h2 #d-h { "Requirements" }
                @if ctx.can_operate() {
                    details {
                        summary { "Propose requirements" }
                        (api_form("POST", &format!("/projects/{id}/requirements"), "reload", "", html! {
                            (field("req-title", "Draft title (optional)", html! { input #req-title name="title" autocomplete="off"; }))
                            (field("req-lines", "Requirements, one per line", html! { textarea #req-lines name="requirements" data-kind="requirements" rows="4" required {} }))
                            button type="submit" { "Propose" }
                        }))
                    }
                }
                div #live-drafts data-live {
                    @if drafts.is_empty() { p .muted { "No requirements proposed yet." } }
                    @for d in drafts.iter().rev() {
                        article .draft data-testid="draft" {
                            h3 { (d.title) " " (badge(d.state.as_str())) }
                            p .muted .small { "proposed " @if let Some(b) = &d.proposed_by { "by " (b) " " } (when(&d.created_at)) " · hash " code .hash { (d.content_hash) } }
                            ol { @for r in &d.requirements { li { (r.title) @if !r.description.is_empty() { " — " span .muted { (r.description) } } } } }
                            @if !d.work_item_ids.is_empty() {
                                p { "Work items: " @for (i, w) in d.work_item_ids.iter().enumerate() { @if i > 0 { ", " } a href=(ctx.ui(&format!("/items/{w}"))) { (titles.get(w).copied().unwrap_or("item")) } } }
                            }
                            @if ctx.can_operate() && d.state.as_str() == "proposed" {
                                div .actions {
                                    (api_form("POST", &format!("/requirements/{}/approve", d.id), "reload", "inline", html! {
                                        button type="submit" { "Approve requirements" }
                                    }))
                                    (api_form("POST", &format!("/requirements/{}/reject", d.id), "reload", "inline", html! {
                                        label for={"rr-" (d.id)} .sr-only { "Reason for rejecting" }
                                        input id={"rr-" (d.id)} name="reason" placeholder="reason" required;
                                        button type="submit" .secondary { "Reject" }
                                    }))
                                }
                            }
                        }
                    }
                }
            }
        };
        Ok(layout(&ctx, Nav::Projects, &p.name, body).into_response())
    }
    .await;
    render(&ctx, r)
}

// ---- work items ----

#[derive(Debug, Default, Deserialize)]
pub(crate) struct BoardQuery {
    project: Option<String>,
    label: Option<String>,
}

pub(crate) async fn board(
    State(s): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Query(q): Query<BoardQuery>,
) -> Response {
    let r = async {
        let store = s.orch.store();
        let projects = store.project_list(all(Page::MAX_LIMIT)).await?;
        let project = q.project.as_deref().filter(|p| !p.is_empty()).and_then(|p| p.parse::<uuid::Uuid>().ok()).map(ProjectId);
        let label = q.label.clone().filter(|l| !l.trim().is_empty());
        let items = store
            .work_item_list(WorkItemFilter { project_id: project, state: None, label: label.clone(), page: all(Page::MAX_LIMIT) })
            .await?;
        let names: HashMap<ProjectId, &str> = projects.iter().map(|p| (p.id, p.name.as_str())).collect();
        let body = html! {
            form .filters method="get" action=(ctx.ui("/items")) {
                div .field {
                    label for="f-project" { "Project" }
                    select #f-project name="project" {
                        option value="" { "All projects" }
                        @for p in &projects { option value=(p.id) selected[Some(p.id) == project] { (p.name) } }
                    }
                }
                div .field {
                    label for="f-label" { "Label" }
                    input #f-label name="label" value=[label.as_deref()] autocomplete="off";
                }
                button type="submit" { "Filter" }
                @if ctx.can_operate() {
                    a .button href={(ctx.ui("/items/new")) @if let Some(p) = project { "?project=" (p) }} { "New work item" }
                }
            }
            div #live-board .board data-live {
                @for st in WorkItemState::ALL {
                    @let col: Vec<&WorkItem> = items.iter().filter(|w| w.state == *st).collect();
                    section .column id={"col-" (st.as_str())} aria-label=(st.as_str()) {
                        h2 { (st.as_str().replace('_', " ")) " " span .count { (col.len()) } }
                        @for w in col {
                            article .item-card data-testid="item-card" {
                                a href=(ctx.ui(&format!("/items/{}", w.id))) { (w.title) }
                                div .muted .small {
                                    (names.get(&w.project_id).copied().unwrap_or("")) " · priority " (w.priority)
                                    @if w.attempts > 0 { " · attempts " (w.attempts) }
                                }
                                @if !w.labels.is_empty() { div { @for l in &w.labels { span .label { (l) } " " } } }
                            }
                        }
                    }
                }
            }
        };
        Ok(layout(&ctx, Nav::Items, "Work items", body).into_response())
    }
    .await;
    render(&ctx, r)
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct NewItemQuery {
    project: Option<ProjectId>,
}

const RECIPE_HELP: &str = "name: build\ninputs:\n  - name: TOKEN\n    kind: secret\n    prompt: Token to push\nsteps:\n  - echo hello\n  - name: test\n    run: cargo test\n    timeout: 600";

pub(crate) async fn item_new(
    State(s): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Query(q): Query<NewItemQuery>,
) -> Response {
    let r = async {
        let projects = s.orch.store().project_list(all(Page::MAX_LIMIT)).await?;
        let body = html! {
            @if !ctx.can_operate() { p .muted { "Your role may not create work items." } }
            @else if projects.is_empty() { p { "Create a " a href=(ctx.ui("/projects")) { "project" } " first." } }
            @else {
                (api_form("POST", "/work-items", &ctx.ui("/items/{work_item.id}"), "card", html! {
                    (field("i-project", "Project", html! {
                        select #i-project name="project_id" required {
                            @for p in &projects { option value=(p.id) selected[Some(p.id) == q.project] { (p.name) } }
                        }
                    }))
                    (field("i-title", "Title", html! { input #i-title name="title" required autocomplete="off"; }))
                    (field("i-desc", "Description", html! { textarea #i-desc name="description" rows="3" {} }))
                    (field("i-labels", "Labels (comma separated; agents need these capabilities)", html! { input #i-labels name="labels" data-kind="csv" autocomplete="off"; }))
                    (field("i-priority", "Priority (higher runs first)", html! { input #i-priority name="priority" type="number" data-kind="int" value="0"; }))
                    (field("i-retries", "Max retries (empty: the server's policy)", html! { input #i-retries name="retry.max_retries" type="number" min="0" data-kind="int"; }))
                    div .field {
                        label for="i-recipe" { "Recipe (YAML, optional)" }
                        textarea #i-recipe .code name="recipe" data-kind="recipe" rows="10" spellcheck="false" placeholder=(RECIPE_HELP) aria-describedby="i-recipe-help" {}
                        p #i-recipe-help .muted .small { "Errors are shown with their line and column. Inputs missing at run time become questions in the inbox; a " code { "kind: secret" } " input is asked with a password field." }
                    }
                    div .field .check {
                        input #i-draft type="checkbox" name="draft" data-kind="bool";
                        label for="i-draft" { "Keep as a draft (submit for approval later)" }
                    }
                    button type="submit" { "Create work item" }
                }))
            }
        };
        Ok(layout(&ctx, Nav::Items, "New work item", body).into_response())
    }
    .await;
    render(&ctx, r)
}

pub(crate) async fn item(
    State(s): State<AppState>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<WorkItemId>,
) -> Response {
    let r = async {
        let store = s.orch.store();
        let w = store.work_item_get(id).await?;
        let project = store.project_get(w.project_id).await?;
        let recipe = match w.recipe_id {
            Some(r) => Some(store.recipe_get(r).await?),
            None => None,
        };
        let runs = store
            .run_list(RunFilter { work_item_id: Some(id), state: None, agent_id: None, page: all(Page::MAX_LIMIT) })
            .await?;
        let siblings = store
            .work_item_list(WorkItemFilter { project_id: Some(w.project_id), state: None, label: None, page: all(Page::MAX_LIMIT) })
            .await?;
        let titles: HashMap<WorkItemId, &str> = siblings.iter().map(|x| (x.id, x.title.as_str())).collect();
        let approval = match w.approval_id {
            Some(a) => store.approval_get(a).await.ok(),
            None => None,
        };
        let st = w.state;
        let terminal = matches!(st, WorkItemState::Succeeded | WorkItemState::Failed | WorkItemState::Cancelled);
        let body = html! {
            div #live-item data-live {
                dl .facts {
                    dt { "State" } dd { (badge(st.as_str())) @if let Some(b) = &w.blocked_reason { " " span .muted { (b) } } }
                    dt { "Project" } dd { a href=(ctx.ui(&format!("/projects/{}", project.id))) { (project.name) } }
                    dt { "Priority" } dd { (w.priority) }
                    dt { "Attempts" } dd { (w.attempts) }
                    dt { "Labels" } dd { @if w.labels.is_empty() { span .muted { "none" } } @for l in &w.labels { span .label { (l) } " " } }
                    dt { "Depends on" } dd { @if w.dependencies.is_empty() { span .muted { "nothing" } } @for (i, d) in w.dependencies.iter().enumerate() { @if i > 0 { ", " } a href=(ctx.ui(&format!("/items/{d}"))) { (titles.get(d).copied().unwrap_or("item")) } } }
                    dt { "Retry policy" } dd { @if w.retry.is_empty() { span .muted { "the server's" } } @else { code { (serde_json::to_string(&w.retry).unwrap_or_default()) } } }
                    dt { "Runs at" } dd { (when_opt(&w.run_at)) }
                    dt { "Approval" } dd { @match &approval { Some(a) => { (badge(a.state.as_str())) @if a.state == ApprovalState::Pending { " " a href=(ctx.ui("/approvals")) { "in the inbox" } } @if let Some(b) = &a.decided_by { " by " (b) } } None => { span .muted { "none" } } } }
                    dt { "Content hash" } dd { code .hash { (w.content_hash) } }
                    dt { "Updated" } dd { (when(&w.updated_at)) }
                }
                @if let Some(e) = &w.last_error { p .error { "Last error: " (e) } }
                @if !w.description.is_empty() { div .text { (w.description) } }
                section aria-labelledby="runs-h" {
                    h2 #runs-h { "Runs" }
                    @if runs.is_empty() { p .muted { "No run yet." } }
                    @else {
                        ul .list {
                            @for r in runs.iter().rev() {
                                li { a href=(ctx.ui(&format!("/runs/{}", r.id))) data-testid="run-link" { "attempt " (r.attempt) } " " (badge(r.state.as_str())) " " span .muted { "agent " (r.agent_id) ", " (when(&r.claimed_at)) } }
                            }
                        }
                    }
                }
            }
            @if let Some(rc) = &recipe {
                details .card {
                    summary { "Recipe " code { (rc.name) } }
                    pre .code { (rc.yaml) }
                }
            }
            @if ctx.can_operate() {
                section aria-labelledby="act-h" .card {
                    h2 #act-h { "Actions" }
                    div .actions-grid {
                        @if st == WorkItemState::Draft {
                            (api_form("POST", &format!("/work-items/{id}/submit"), "reload", "", html! { button type="submit" { "Submit for approval" } }))
                        }
                        @if st == WorkItemState::Ready {
                            (api_form("POST", "/scheduler/enqueue", "reload", "", html! {
                                h3 { "Enqueue" }
                                input type="hidden" name="work_item_id" value=(id);
                                (field("e-priority", "Priority", html! { input #e-priority type="number" name="priority" data-kind="int" value=(w.priority); }))
                                (field("e-deps", "Depends on (must succeed first)", html! {
                                    select #e-deps name="depends_on" data-kind="multi" multiple size="4" {
                                        @for x in siblings.iter().filter(|x| x.id != id) { option value=(x.id) { (x.title) " (" (x.state.as_str()) ")" } }
                                    }
                                }))
                                (field("e-delay", "Not before, in seconds from now", html! { input #e-delay type="number" min="0" name="not_before" data-kind="after-seconds"; }))
                                button type="submit" { "Enqueue" }
                            }))
                        }
                        @if !terminal && st != WorkItemState::Draft {
                            (api_form("POST", &format!("/work-items/{id}/cancel"), "reload", "", html! {
                                h3 { "Cancel" }
                                (field("c-reason", "Reason", html! { input #c-reason name="reason" autocomplete="off"; }))
                                button type="submit" .danger { "Cancel work item" }
                            }))
                        }
                        @if matches!(st, WorkItemState::Failed | WorkItemState::Cancelled | WorkItemState::Retrying | WorkItemState::Blocked | WorkItemState::Succeeded) {
                            (api_form("POST", &format!("/work-items/{id}/requeue"), "reload", "", html! {
                                h3 { "Requeue" }
                                (field("rq-delay", "Delay (seconds)", html! { input #rq-delay type="number" min="0" name="delay_seconds" data-kind="int" value="0"; }))
                                div .field .check { input #rq-backoff type="checkbox" name="backoff" data-kind="bool"; label for="rq-backoff" { "Add the retry backoff" } }
                                button type="submit" { "Requeue" }
                            }))
                        }
                        (api_form("POST", &format!("/work-items/{id}/policy"), "reload", "", html! {
                            h3 { "Retry policy" }
                            (field("rp-max", "Max retries", html! { input #rp-max type="number" min="0" name="max_retries" data-kind="int" value=[w.retry.max_retries]; }))
                            (field("rp-base", "Backoff base (s)", html! { input #rp-base type="number" min="0" step="any" name="backoff_base_seconds" data-kind="float" value=[w.retry.backoff_base_seconds]; }))
                            (field("rp-cap", "Backoff cap (s)", html! { input #rp-cap type="number" min="0" step="any" name="backoff_cap_seconds" data-kind="float" value=[w.retry.backoff_cap_seconds]; }))
                            (field("rp-jitter", "Jitter (0..1)", html! { input #rp-jitter type="number" min="0" max="1" step="any" name="jitter" data-kind="float" value=[w.retry.jitter]; }))
                            button type="submit" { "Save policy" }
                        }))
                    }
                }
            }
        };
        Ok(layout(&ctx, Nav::Items, &w.title, body).into_response())
    }
    .await;
    render(&ctx, r)
}

// ---- inboxes ----

pub(crate) async fn approvals(State(s): State<AppState>, Extension(ctx): Extension<Ctx>) -> Response {
    let r = async {
        let store = s.orch.store();
        let list = store
            .approval_list(ApprovalFilter { state: Some(ApprovalState::Pending), project_id: None, page: all(Page::MAX_LIMIT) })
            .await?;
        let mut shown = Vec::new();
        for a in list {
            let project = store.project_get(a.project_id).await.map(|p| p.name).unwrap_or_default();
            let what = match a.subject {
                ApprovalSubject::WorkItem(w) => {
                    let item = store.work_item_get(w).await?;
                    let recipe = match item.recipe_id {
                        Some(r) => store.recipe_get(r).await.ok(),
                        None => None,
                    };
                    html! {
                        h3 { "Work item: " a href=(ctx.ui(&format!("/items/{w}"))) { (item.title) } }
                        @if !item.description.is_empty() { div .text { (item.description) } }
                        p .muted .small { "priority " (item.priority) @if !item.labels.is_empty() { " · labels " (item.labels.join(", ")) } }
                        @if let Some(rc) = recipe { details { summary { "Recipe " code { (rc.name) } } pre .code { (rc.yaml) } } }
                    }
                }
                ApprovalSubject::RequirementsDraft(d) => {
                    let draft = store.draft_get(d).await?;
                    html! {
                        h3 { "Requirements: " a href=(ctx.ui(&format!("/projects/{}", draft.project_id))) { (draft.title) } }
                        ol { @for r in &draft.requirements { li { (r.title) } } }
                    }
                }
            };
            shown.push((a, project, what));
        }
        let body = html! {
            div #live-approvals data-live {
                @if shown.is_empty() { p .muted data-testid="empty" { "Nothing waits for an approval." } }
                @for (a, project, what) in &shown {
                    article .card data-testid="approval" {
                        p .muted .small { (project) " · requested " (when(&a.requested_at)) }
                        (what)
                        p .small { "Content hash " code .hash { (a.content_hash) } }
                        @if ctx.can_operate() {
                            div .actions {
                                (api_form("POST", &format!("/approvals/{}/approve", a.id), "reload", "inline", html! { button type="submit" { "Approve" } }))
                                (api_form("POST", &format!("/approvals/{}/reject", a.id), "reload", "inline", html! {
                                    label for={"ar-" (a.id)} .sr-only { "Reason for rejecting" }
                                    input id={"ar-" (a.id)} name="reason" placeholder="reason" required;
                                    button type="submit" .secondary { "Reject" }
                                }))
                            }
                        }
                    }
                }
            }
        };
        Ok(layout(&ctx, Nav::Approvals, "Approvals", body).into_response())
    }
    .await;
    render(&ctx, r)
}

pub(crate) async fn questions(State(s): State<AppState>, Extension(ctx): Extension<Ctx>) -> Response {
    let r = async {
        let store = s.orch.store();
        let list = store
            .info_request_list(InfoRequestFilter {
                state: Some(InfoRequestState::Pending),
                run_id: None,
                project_id: None,
                page: all(Page::MAX_LIMIT),
            })
            .await?;
        let mut titles = HashMap::new();
        for q in &list {
            if let std::collections::hash_map::Entry::Vacant(e) = titles.entry(q.work_item_id) {
                e.insert(store.work_item_get(q.work_item_id).await.map(|w| w.title).unwrap_or_default());
            }
        }
        let body = html! {
            div #live-questions data-live {
                @if list.is_empty() { p .muted data-testid="empty" { "No open question." } }
                @for q in &list {
                    article .card data-testid="question" {
                        p .muted .small {
                            a href=(ctx.ui(&format!("/items/{}", q.work_item_id))) { (titles.get(&q.work_item_id).map(String::as_str).unwrap_or("item")) }
                            " · " a href=(ctx.ui(&format!("/runs/{}", q.run_id))) { "run" }
                            " · asked " (when(&q.created_at))
                            @if let Some(d) = &q.deadline { " · answer before " (when(d)) }
                        }
                        h3 { (q.prompt) }
                        p .small { "Key " code { (q.key) } " · " (format!("{:?}", q.kind).to_lowercase()) }
                        @if ctx.can_operate() {
                            @let fid = format!("ans-{}", q.id);
                            (api_form("POST", &format!("/info-requests/{}/answer", q.id), "reload", "", html! {
                                div .field {
                                    label for=(fid) { "Answer" @if q.kind == InputKind::Secret { " (secret: not shown, stored encrypted)" } }
                                    @match q.kind {
                                        InputKind::Secret => { input id=(fid) type="password" name="value" autocomplete="off" required; }
                                        InputKind::Choice => {
                                            select id=(fid) name="value" required { @for c in &q.choices { option value=(c) { (c) } } }
                                        }
                                        InputKind::Text => { input id=(fid) name="value" autocomplete="off" required; }
                                    }
                                }
                                button type="submit" { "Answer" }
                            }))
                        }
                    }
                }
            }
        };
        Ok(layout(&ctx, Nav::Questions, "Questions", body).into_response())
    }
    .await;
    render(&ctx, r)
}

// ---- runs ----

fn duration(a: &DateTime<Utc>, b: &DateTime<Utc>) -> String {
    let s = (*b - *a).num_milliseconds().max(0) as f64 / 1000.0;
    if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} min", s / 60.0)
    }
}

const MAX_DIFF_LINES: usize = 4000;

fn diff_markup(patch: &str) -> Markup {
    let lines: Vec<&str> = patch.lines().collect();
    html! {
        pre .diff data-testid="diff" {
            @for l in lines.iter().take(MAX_DIFF_LINES) {
                @let class = if l.starts_with("+++") || l.starts_with("---") || l.starts_with("diff ") { "f" }
                    else if l.starts_with('+') { "a" } else if l.starts_with('-') { "d" } else if l.starts_with("@@") { "h" } else { "" };
                span class=(class) { (l) } "\n"
            }
            @if lines.len() > MAX_DIFF_LINES { span .h { "… " (lines.len() - MAX_DIFF_LINES) " more lines (see the raw diff)" } }
        }
    }
}

pub(crate) async fn run(State(s): State<AppState>, Extension(ctx): Extension<Ctx>, Path(id): Path<RunId>) -> Response {
    let r = async {
        let store = s.orch.store();
        let run = store.run_get(id).await?;
        let item = store.work_item_get(run.work_item_id).await?;
        let steps = store.step_events_read_after(id, 0, 2000).await?;
        let result = s.orch.run_result(id).await?;
        let questions = store
            .info_request_list(InfoRequestFilter { state: None, run_id: Some(id), project_id: None, page: all(100) })
            .await?;
        let terminal = run.state.is_terminal();
        let u = &run.usage;
        let body = html! {
            p { "Work item " a href=(ctx.ui(&format!("/items/{}", item.id))) { (item.title) } }
            div #live-run data-live {
                dl .facts {
                    dt { "State" } dd data-testid="run-state" data-state=(run.state.as_str()) { (badge(run.state.as_str())) @if let Some(f) = &run.failure_kind { " " span .muted { (format!("{f:?}").to_lowercase()) } } }
                    dt { "Attempt" } dd { (run.attempt) " of the item's " (item.attempts) }
                    dt { "Agent" } dd { (run.agent_id) }
                    dt { "Lease" } dd { "token " (run.lease_token) @if !terminal { ", expires " (when_opt(&run.lease_expires_at)) ", heartbeat " (when_opt(&run.heartbeat_at)) } }
                    dt { "Claimed" } dd { (when(&run.claimed_at)) }
                    dt { "Started" } dd { (when_opt(&run.started_at)) }
                    dt { "Finished" } dd { (when_opt(&run.finished_at)) @if let (Some(a), Some(b)) = (&run.started_at, &run.finished_at) { " (" (duration(a, b)) ")" } }
                    dt { "Exit code" } dd { @match run.exit_code { Some(c) => (c), None => span .muted { "—" } } }
                    dt { "Tokens" } dd { (u.input_tokens) " in (" (u.cached_input_tokens) " cached), " (u.output_tokens) " out" @if let Some(c) = u.cost_usd { ", $" (format!("{c:.4}")) } }
                }
                @if let Some(e) = &run.error { p .error { (e) } }
                @if !questions.is_empty() {
                    section aria-labelledby="q-h" {
                        h2 #q-h { "Questions" }
                        ul .list { @for q in &questions { li { (q.prompt) " " (badge(match q.state { InfoRequestState::Pending => "pending", InfoRequestState::Answered => "answered", InfoRequestState::Cancelled => "cancelled", InfoRequestState::Expired => "expired" })) @if q.state == InfoRequestState::Pending { " " a href=(ctx.ui("/questions")) { "answer" } } @if let Some(b) = &q.answered_by { " by " (b) } } } }
                    }
                }
                section aria-labelledby="s-h" {
                    h2 #s-h { "Steps" }
                    @if steps.is_empty() { p .muted { "No step event yet." } }
                    @else {
                        ol .timeline {
                            @for e in &steps {
                                @let kind = serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
                                li class={"ev-" (kind)} { span .muted { (e.at.format("%H:%M:%S")) } " " strong { (kind) } " " (e.name) }
                            }
                        }
                    }
                }
                @if let Some(res) = &result {
                    section aria-labelledby="res-h" {
                        h2 #res-h { "Result" }
                        dl .facts {
                            dt { "Branch" } dd { code data-testid="branch" { (res.result.branch) } @if res.result.pushed { " (pushed)" } }
                            dt { "Commits" } dd { code { (short(&res.result.base_commit)) } " → " code { (short(&res.result.head_commit)) } }
                            dt { "Changes" } dd { (res.result.files_changed) " files, +" (res.result.insertions) " −" (res.result.deletions) }
                        }
                        @if !res.result.files.is_empty() { ul .files { @for f in &res.result.files { li { code { (f) } } } } }
                        p { a href={(ctx.prefix) "/runs/" (id) "/diff"} { "Raw diff" } }
                        (diff_markup(&res.patch))
                    }
                }
            }
            section aria-labelledby="log-h" {
                h2 #log-h { "Log " span #log-status .muted .small role="status" {} }
                pre #log .log data-stream={"/runs/" (id) "/logs/stream"} tabindex="0" aria-label="Run log" data-testid="log" {}
            }
            @if ctx.can_operate() {
                section .card aria-labelledby="ra-h" {
                    h2 #ra-h { "Actions" }
                    div .actions-grid {
                        @if !terminal {
                            (api_form("POST", &format!("/runs/{id}/cancel"), "reload", "", html! {
                                (field("rc-reason", "Reason", html! { input #rc-reason name="reason" autocomplete="off"; }))
                                button type="submit" .danger { "Cancel run" }
                            }))
                        }
                        @if terminal {
                            (api_form("POST", &format!("/runs/{id}/requeue"), "reload", "", html! {
                                (field("rr-delay", "Requeue after (seconds)", html! { input #rr-delay type="number" min="0" name="delay_seconds" data-kind="int" value="0"; }))
                                button type="submit" { "Requeue the work item" }
                            }))
                        }
                    }
                }
            }
        };
        let title = format!("Run {} · attempt {}", short(id), run.attempt);
        Ok(layout(&ctx, Nav::Items, &title, body).into_response())
    }
    .await;
    render(&ctx, r)
}
