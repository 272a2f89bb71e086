//! The [`Orchestrator`] facade: validates input and applies policy (approvals, retries, encryption) over
//! any [`Store`], and implements [`AgentApi`] in-process.

use crate::agent::{AgentApi, AnswerValue, Assignment, ClaimRequest};
use crate::clock::{Clock, SystemClock};
use crate::config::OrchestratorConfig;
use crate::crypto::SealedValue;
use crate::domain::*;
use crate::due::DueTimes;
use crate::error::{Error, StoreError};
use crate::ids::*;
use crate::notify::Notifier;
use crate::recipe::{parse_recipe, InputKind, RecipeSpec};
use crate::retry::RetryOverrides;
use crate::rules;
use crate::state::WorkItemState;
use crate::store::*;
use async_trait::async_trait;
use chrono::Duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

type Result<T> = std::result::Result<T, Error>;

/// Input of [`Orchestrator::create_work_item`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkItem {
    /// The project.
    pub project_id: Option<ProjectId>,
    /// Title (required).
    pub title: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Recipe.
    #[serde(default)]
    pub recipe_id: Option<RecipeId>,
    /// Required agent capabilities.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Priority (higher first).
    #[serde(default)]
    pub priority: i32,
    /// Retry overrides.
    #[serde(default)]
    pub retry: RetryOverrides,
    /// Idempotency key (unique per project).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Keep it as a draft (not submitted for approval).
    #[serde(default)]
    pub draft: bool,
    /// Enqueue right away (only when no approval is needed).
    #[serde(default)]
    pub enqueue: Option<EnqueueOptions>,
}

/// Input of [`Orchestrator::update_work_item`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateWorkItem {
    /// New title.
    #[serde(default)]
    pub title: Option<String>,
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
    /// New recipe (`null` detaches when `detach_recipe` is set).
    #[serde(default)]
    pub recipe_id: Option<RecipeId>,
    /// Detach the recipe.
    #[serde(default)]
    pub detach_recipe: bool,
    /// New labels.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// New priority.
    #[serde(default)]
    pub priority: Option<i32>,
}

/// Input of [`Orchestrator::create_project_with`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// Name (required).
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// The git repository agents work on.
    #[serde(default)]
    pub repository: Option<Repository>,
}

/// Input of [`Orchestrator::update_project_with`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateProject {
    /// New name.
    pub name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New repository: `Some(None)` removes it.
    pub repository: Option<Option<Repository>>,
}

/// Input of a requeue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequeueRequest {
    /// Wait this many seconds first.
    #[serde(default)]
    pub delay_seconds: u64,
    /// Add the retry policy's backoff for the item's attempts so far.
    #[serde(default)]
    pub backoff: bool,
}

/// What [`Orchestrator::complete_and_claim`] did.
#[derive(Debug)]
pub struct CompletedAndAssigned {
    /// One result per completion, in order (as [`Orchestrator::complete_many`]).
    pub completed: Vec<std::result::Result<CompletionResult, StoreError>>,
    /// The runs claimed after the completions, ready to execute; an error leaves the completions applied.
    pub assigned: Result<Vec<Assignment>>,
}

/// The orchestrator: policy over a store.
#[derive(Clone)]
pub struct Orchestrator {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Arc<OrchestratorConfig>,
    due: Arc<DueTimes>,
    /// Fired when this process cancels or requeues a run, so agents waiting in
    /// [`AgentApi::wait_for_cancellations`] hear of it at once.
    cancels: Notifier,
    meter: crate::meter::Meter,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").field("config", &self.config).finish_non_exhaustive()
    }
}

fn check_text(field: &str, v: &str, max: usize, required: bool) -> Result<()> {
    if required && v.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if v.chars().count() > max {
        return Err(Error::invalid(field, format!("at most {max} characters")));
    }
    Ok(())
}

fn check_labels(labels: &[String]) -> Result<()> {
    if labels.len() > rules::MAX_LABELS {
        return Err(Error::invalid("labels", format!("at most {} labels", rules::MAX_LABELS)));
    }
    for (i, l) in labels.iter().enumerate() {
        if l.trim().is_empty() || l.len() > 100 {
            return Err(Error::invalid(format!("labels[{i}]"), "labels are 1..=100 characters"));
        }
    }
    Ok(())
}

fn check_questions(qs: &[NewInfoRequest]) -> Result<()> {
    if qs.is_empty() || qs.len() > 100 {
        return Err(Error::invalid("questions", "between 1 and 100 questions"));
    }
    for (i, q) in qs.iter().enumerate() {
        check_text(&format!("questions[{i}].key"), &q.key, 200, true)?;
        // The agent exposes each answer as an environment variable named after its key.
        if !crate::recipe::is_env_name(&q.key) {
            return Err(Error::invalid(
                format!("questions[{i}].key"),
                format!(
                    "`{}` is not an environment variable name: expected [A-Za-z_][A-Za-z0-9_]*, at most {} characters",
                    q.key.chars().take(60).collect::<String>(),
                    crate::recipe::MAX_ENV_NAME_LEN
                ),
            ));
        }
        if qs[..i].iter().any(|p| p.key == q.key) {
            return Err(Error::invalid(format!("questions[{i}].key"), format!("duplicate key `{}`", q.key)));
        }
        check_text(&format!("questions[{i}].prompt"), &q.prompt, 10_000, true)?;
        match q.kind {
            InputKind::Choice if q.choices.is_empty() => {
                return Err(Error::invalid(format!("questions[{i}].choices"), "a choice question needs choices"));
            }
            InputKind::Text | InputKind::Secret if !q.choices.is_empty() => {
                return Err(Error::invalid(format!("questions[{i}].choices"), "only choice questions have choices"));
            }
            _ => {}
        }
    }
    Ok(())
}

impl Orchestrator {
    /// A facade over `store` with the system clock.
    pub fn new(store: Arc<dyn Store>, config: OrchestratorConfig) -> Self {
        Self::with_clock(store, config, Arc::new(SystemClock))
    }

    /// A facade with a specific clock (tests use [`crate::ManualClock`]).
    pub fn with_clock(store: Arc<dyn Store>, config: OrchestratorConfig, clock: Arc<dyn Clock>) -> Self {
        Orchestrator {
            store,
            clock,
            config: Arc::new(config),
            due: Arc::new(DueTimes::default()),
            cancels: Notifier::new(),
            meter: crate::meter::Meter::default(),
        }
    }

    /// Records this facade's metrics (and its clones') into `recorder` instead of the process's global
    /// `metrics` recorder: claims (`orchestrator_runs_claimed_total`, `orchestrator_claim_requests_total`,
    /// `orchestrator_claim_duration_seconds`), completions by outcome (`orchestrator_run_completions_total`,
    /// `orchestrator_run_duration_seconds`), failures, retries, lost leases, releases and scheduler ticks.
    /// Returns false when a recorder was set before (the first one stays).
    pub fn set_metrics_recorder(&self, recorder: Arc<dyn metrics::Recorder + Send + Sync>) -> bool {
        self.meter.set(recorder)
    }

    fn record_completions<'a>(
        &self,
        results: impl Iterator<Item = &'a std::result::Result<CompletionResult, StoreError>>,
    ) {
        for r in results.flatten() {
            let run = &r.run;
            let outcome = match run.state {
                crate::state::RunState::Succeeded => "succeeded",
                _ => "failed",
            };
            self.meter.count("orchestrator_run_completions_total", &[("outcome", outcome)], 1);
            if outcome == "failed" {
                self.meter.count("orchestrator_run_failures_total", &[], 1);
            }
            if r.work_item_state == WorkItemState::Retrying {
                self.meter.count("orchestrator_retries_scheduled_total", &[], 1);
            }
            if let Some(end) = run.finished_at {
                let from = run.started_at.unwrap_or(run.claimed_at);
                let secs = (end - from).num_milliseconds().max(0) as f64 / 1000.0;
                self.meter.observe("orchestrator_run_duration_seconds", &[("outcome", outcome)], secs);
            }
        }
    }

    fn record_tick(&self, report: &TickReport) {
        self.meter.count("orchestrator_scheduler_ticks_total", &[], 1);
        self.meter.count("orchestrator_scheduler_promoted_total", &[], report.promoted.len() as u64);
        self.meter.count("orchestrator_lease_expiries_total", &[], report.reaped.len() as u64);
        self.meter.count("orchestrator_info_request_expiries_total", &[], report.expired.len() as u64);
        self.meter.count("orchestrator_run_failures_total", &[], (report.reaped.len() + report.expired.len()) as u64);
        let retrying = report
            .reaped
            .iter()
            .chain(report.expired.iter())
            .filter(|r| r.work_item_state == WorkItemState::Retrying)
            .count();
        self.meter.count("orchestrator_retries_scheduled_total", &[], retrying as u64);
    }

    fn record_claim(&self, started: std::time::Instant, claimed: usize) {
        self.meter.count("orchestrator_claim_requests_total", &[], 1);
        self.meter.count("orchestrator_runs_claimed_total", &[], claimed as u64);
        self.meter.observe("orchestrator_claim_duration_seconds", &[], started.elapsed().as_secs_f64());
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &OrchestratorConfig {
        &self.config
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    // ---- projects and visions ----

    /// Creates a project.
    pub async fn create_project(&self, name: &str, description: &str) -> Result<Project> {
        self.create_project_with(CreateProject {
            name: name.to_string(),
            description: description.to_string(),
            repository: None,
        })
        .await
    }

    /// Creates a project, with its repository when it has one.
    pub async fn create_project_with(&self, p: CreateProject) -> Result<Project> {
        check_text("name", &p.name, 200, true)?;
        check_text("description", &p.description, rules::MAX_TEXT_LEN, false)?;
        let repository = p.repository.map(rules::normalize_repository).transpose()?;
        Ok(self
            .store
            .project_create(NewProject {
                id: ProjectId::new(),
                name: p.name.trim().to_string(),
                description: p.description,
                repository,
                now: self.now(),
            })
            .await?)
    }

    /// Updates a project's name or description.
    pub async fn update_project(
        &self,
        id: ProjectId,
        name: Option<String>,
        description: Option<String>,
    ) -> Result<Project> {
        self.update_project_with(id, UpdateProject { name, description, repository: None }).await
    }

    /// Updates a project's name, description or repository.
    pub async fn update_project_with(&self, id: ProjectId, u: UpdateProject) -> Result<Project> {
        if let Some(n) = &u.name {
            check_text("name", n, 200, true)?;
        }
        if let Some(d) = &u.description {
            check_text("description", d, rules::MAX_TEXT_LEN, false)?;
        }
        let repository = match u.repository {
            None => None,
            Some(None) => Some(None),
            Some(Some(r)) => Some(Some(rules::normalize_repository(r)?)),
        };
        Ok(self
            .store
            .project_update(ProjectUpdate {
                id,
                name: u.name.map(|n| n.trim().to_string()),
                description: u.description,
                repository,
                now: self.now(),
            })
            .await?)
    }

    /// Writes a new vision version.
    pub async fn put_vision(&self, project_id: ProjectId, text: &str, author: Option<String>) -> Result<Vision> {
        check_text("text", text, rules::MAX_TEXT_LEN, true)?;
        Ok(self.store.vision_put(VisionPut { project_id, text: text.to_string(), author, now: self.now() }).await?)
    }

    // ---- requirements and approvals ----

    /// Proposes requirements; under the approval policy a pending approval request is created.
    pub async fn propose_requirements(
        &self,
        project_id: ProjectId,
        title: &str,
        requirements: Vec<RequirementSpec>,
        proposed_by: Option<String>,
    ) -> Result<(RequirementsDraft, Option<ApprovalRequest>)> {
        check_text("title", title, rules::MAX_TITLE_LEN, true)?;
        if requirements.is_empty() || requirements.len() > 1000 {
            return Err(Error::invalid("requirements", "between 1 and 1000 requirements"));
        }
        for (i, r) in requirements.iter().enumerate() {
            check_text(&format!("requirements[{i}].title"), &r.title, rules::MAX_TITLE_LEN, true)?;
            check_text(&format!("requirements[{i}].description"), &r.description, rules::MAX_TEXT_LEN, false)?;
            check_labels(&r.labels)?;
        }
        Ok(self
            .store
            .draft_create(NewDraft {
                id: DraftId::new(),
                project_id,
                title: title.to_string(),
                requirements,
                proposed_by,
                require_approval: self.config.require_approval,
                now: self.now(),
            })
            .await?)
    }

    /// Approves or rejects a requirements draft (approving creates its work items).
    pub async fn decide_draft(
        &self,
        id: DraftId,
        decision: Decision,
        by: &str,
        reason: Option<String>,
    ) -> Result<DecisionOutcome> {
        check_text("decided_by", by, 200, true)?;
        Ok(self
            .store
            .draft_decide(id, Decide { decision, decided_by: by.to_string(), reason, now: self.now() })
            .await?)
    }

    /// Approves or rejects an approval request.
    pub async fn decide_approval(
        &self,
        id: ApprovalId,
        decision: Decision,
        by: &str,
        reason: Option<String>,
    ) -> Result<DecisionOutcome> {
        check_text("decided_by", by, 200, true)?;
        Ok(self
            .store
            .approval_decide(id, Decide { decision, decided_by: by.to_string(), reason, now: self.now() })
            .await?)
    }

    // ---- recipes ----

    /// Parses and validates a recipe without saving it.
    pub fn validate_recipe(&self, yaml: &str) -> Result<RecipeSpec> {
        Ok(parse_recipe(yaml)?)
    }

    /// Parses, validates and stores a recipe.
    pub async fn create_recipe(&self, project_id: Option<ProjectId>, yaml: &str) -> Result<ToolRecipe> {
        let spec = parse_recipe(yaml)?;
        Ok(self
            .store
            .recipe_create(NewRecipe { id: RecipeId::new(), project_id, yaml: yaml.to_string(), spec, now: self.now() })
            .await?)
    }

    /// Attaches a recipe to a work item (an edit: under the approval policy it needs a new approval).
    pub async fn attach_recipe(&self, work_item_id: WorkItemId, recipe_id: RecipeId) -> Result<WorkItemChanged> {
        self.update_work_item(work_item_id, UpdateWorkItem { recipe_id: Some(recipe_id), ..Default::default() }).await
    }

    // ---- work items ----

    fn new_work_item(&self, c: CreateWorkItem) -> Result<NewWorkItem> {
        let project_id = c.project_id.ok_or_else(|| Error::invalid("project_id", "required"))?;
        check_text("title", &c.title, rules::MAX_TITLE_LEN, true)?;
        check_text("description", &c.description, rules::MAX_TEXT_LEN, false)?;
        check_labels(&c.labels)?;
        if let Some(k) = &c.idempotency_key {
            check_text("idempotency_key", k, 200, true)?;
        }
        self.config.retry.with_overrides(&c.retry)?;
        let state = if c.draft {
            WorkItemState::Draft
        } else if self.config.require_approval {
            WorkItemState::AwaitingApproval
        } else {
            WorkItemState::Ready
        };
        if c.enqueue.is_some() && state != WorkItemState::Ready {
            return Err(Error::Store(StoreError::conflict("the work item needs approval before it can be enqueued")));
        }
        if let Some(e) = &c.enqueue {
            if e.depends_on.len() > rules::MAX_DEPENDENCIES {
                return Err(Error::invalid("depends_on", format!("at most {} dependencies", rules::MAX_DEPENDENCIES)));
            }
        }
        Ok(NewWorkItem {
            id: WorkItemId::new(),
            project_id,
            title: c.title,
            description: c.description,
            recipe_id: c.recipe_id,
            labels: c.labels,
            priority: c.priority,
            retry: c.retry,
            idempotency_key: c.idempotency_key,
            state,
            enqueue: c.enqueue,
        })
    }

    /// Creates a work item (awaiting approval under the policy, else ready; enqueued when asked).
    pub async fn create_work_item(&self, c: CreateWorkItem) -> Result<WorkItemCreated> {
        let mut v = self.create_work_items(vec![c]).await?;
        v.pop().ok_or_else(|| Error::Store(StoreError::conflict("no work item created")))
    }

    /// Creates work items in one unit (all or none).
    pub async fn create_work_items(&self, items: Vec<CreateWorkItem>) -> Result<Vec<WorkItemCreated>> {
        let items = items.into_iter().map(|c| self.new_work_item(c)).collect::<Result<Vec<_>>>()?;
        let now = self.now();
        let created = self.store.work_items_create(items, now).await?;
        for c in &created {
            self.due.add(c.work_item.run_at, now);
        }
        Ok(created)
    }

    /// Edits a work item.
    pub async fn update_work_item(&self, id: WorkItemId, u: UpdateWorkItem) -> Result<WorkItemChanged> {
        if let Some(t) = &u.title {
            check_text("title", t, rules::MAX_TITLE_LEN, true)?;
        }
        if let Some(d) = &u.description {
            check_text("description", d, rules::MAX_TEXT_LEN, false)?;
        }
        if let Some(l) = &u.labels {
            check_labels(l)?;
        }
        let recipe_id = if u.detach_recipe { Some(None) } else { u.recipe_id.map(Some) };
        Ok(self
            .store
            .work_item_update(WorkItemUpdate {
                id,
                title: u.title,
                description: u.description,
                recipe_id,
                labels: u.labels,
                priority: u.priority,
                require_approval: self.config.require_approval,
                now: self.now(),
            })
            .await?)
    }

    /// Submits a draft work item (for approval under the policy).
    pub async fn submit_work_item(&self, id: WorkItemId) -> Result<WorkItemChanged> {
        Ok(self.store.work_item_submit(id, self.config.require_approval, self.now()).await?)
    }

    /// Sets per-item retry overrides (validated against the defaults).
    pub async fn set_retry_policy(&self, id: WorkItemId, retry: RetryOverrides) -> Result<WorkItem> {
        self.config.retry.with_overrides(&retry)?;
        Ok(self.store.work_item_set_policy(id, retry, self.now()).await?)
    }

    /// Cancels a work item. Its active run's log says so (with `reason`), and its agent hears of it at once.
    pub async fn cancel_work_item(&self, id: WorkItemId, reason: Option<String>) -> Result<WorkItem> {
        let reason = reason.unwrap_or_else(|| "cancelled".to_string());
        if let Some(run_id) = self.store.work_item_get(id).await?.current_run_id {
            self.log_to_active_run(run_id, format!("work item cancelled: {reason}")).await;
        }
        let item = self.store.work_item_cancel(id, Cancel { reason, now: self.now() }).await?;
        self.cancels.notify();
        Ok(item)
    }

    /// Appends a system line to a run's log while it holds a lease (with its current token), so the
    /// people reading it see why it stopped. Best effort: a run that just ended gets nothing.
    async fn log_to_active_run(&self, run_id: RunId, line: String) {
        let Ok(run) = self.store.run_get(run_id).await else {
            return;
        };
        if !run.state.holds_lease() {
            return;
        }
        let lines = vec![NewLogLine { stream: LogStream::System, line }];
        let append = LogAppend { run_id, token: run.lease_token, lines, now: self.now() };
        if let Err(e) = self.store.logs_append(append).await {
            tracing::debug!(run_id = %run_id, error = %e, "could not log the cancellation to the run");
        }
    }

    fn requeue_at(&self, item: &WorkItem, r: &RequeueRequest) -> Result<Requeue> {
        if r.delay_seconds > 30 * 24 * 3600 {
            return Err(Error::invalid("delay_seconds", "at most 30 days"));
        }
        let now = self.now();
        let mut delay = Duration::seconds(r.delay_seconds as i64);
        if r.backoff {
            let policy = self.config.retry.with_overrides(&item.retry)?;
            delay += policy.backoff_delay(item.attempts.max(1), crate::retry::jitter_unit());
        }
        Ok(Requeue { run_at: now + delay, reason: "requeued".into(), now })
    }

    /// Requeues a work item after `delay_seconds` (plus backoff when asked).
    pub async fn requeue_work_item(&self, id: WorkItemId, r: RequeueRequest) -> Result<WorkItem> {
        let item = self.store.work_item_get(id).await?;
        let rq = self.requeue_at(&item, &r)?;
        let (now, run_at) = (rq.now, rq.run_at);
        let item = self.store.work_item_requeue(id, rq).await?;
        self.due.add(Some(run_at), now);
        self.cancels.notify();
        Ok(item)
    }

    /// Requeues a run's work item (cancelling the run if still active).
    pub async fn requeue_run(&self, id: RunId, r: RequeueRequest) -> Result<WorkItem> {
        let run = self.store.run_get(id).await?;
        let item = self.store.work_item_get(run.work_item_id).await?;
        let rq = self.requeue_at(&item, &r)?;
        let (now, run_at) = (rq.now, rq.run_at);
        self.log_to_active_run(id, "run requeued: its process will be stopped".into()).await;
        let item = self.store.run_requeue(id, rq).await?;
        self.due.add(Some(run_at), now);
        self.cancels.notify();
        Ok(item)
    }

    /// Cancels a run and its work item. The run's log says so (with `reason`), and its agent hears of it
    /// at once.
    pub async fn cancel_run(&self, id: RunId, reason: Option<String>) -> Result<Run> {
        let reason = reason.unwrap_or_else(|| "cancelled".to_string());
        self.log_to_active_run(id, format!("run cancelled: {reason}")).await;
        let run = self.store.run_cancel(id, Cancel { reason, now: self.now() }).await?;
        self.cancels.notify();
        Ok(run)
    }

    /// A run's recorded result with its patch (`None` when the run recorded none).
    pub async fn run_result(&self, id: RunId) -> Result<Option<RunResultRecord>> {
        Ok(self.store.run_result_get(id).await?)
    }

    // ---- scheduler ----

    /// Enqueues one work item.
    pub async fn enqueue(&self, id: WorkItemId, options: EnqueueOptions) -> Result<ScheduledTask> {
        let mut v = self.enqueue_many(vec![Enqueue { work_item_id: id, options }]).await?;
        v.pop().ok_or_else(|| Error::Store(StoreError::conflict("nothing enqueued")))
    }

    /// Enqueues work items in one unit.
    pub async fn enqueue_many(&self, items: Vec<Enqueue>) -> Result<Vec<ScheduledTask>> {
        for e in &items {
            if e.options.depends_on.len() > rules::MAX_DEPENDENCIES {
                return Err(Error::invalid("depends_on", format!("at most {} dependencies", rules::MAX_DEPENDENCIES)));
            }
        }
        let now = self.now();
        let tasks = self.store.enqueue_many(items, now).await?;
        for t in &tasks {
            self.due.add(t.run_at, now);
        }
        Ok(tasks)
    }

    /// Promotes due retries and reaps expired leases.
    #[tracing::instrument(name = "orchestrator.tick", skip_all, level = "debug")]
    pub async fn tick(&self) -> Result<TickReport> {
        let now = self.now();
        let report = match self.store.tick(Tick { retry_defaults: self.config.retry.clone(), limit: 10_000, now }).await
        {
            Ok(r) => r,
            Err(e) => {
                self.meter.count("orchestrator_scheduler_tick_errors_total", &[], 1);
                return Err(e.into());
            }
        };
        for r in report.reaped.iter().chain(&report.expired) {
            self.due.add(r.retry_at, now);
        }
        self.record_tick(&report);
        Ok(report)
    }

    /// Completes many runs in one unit of work (each guarded on its own): the batched form of
    /// [`AgentApi::complete`] for agents that finish several runs at once.
    pub async fn complete_many(
        &self,
        completions: Vec<RunCompletion>,
    ) -> Result<Vec<std::result::Result<CompletionResult, StoreError>>> {
        if completions.len() > Page::MAX_LIMIT as usize {
            return Err(Error::invalid("completions", format!("at most {} per call", Page::MAX_LIMIT)));
        }
        let now = self.now();
        let results = self
            .store
            .runs_complete_many(CompleteMany { completions, retry_defaults: self.config.retry.clone(), now })
            .await?;
        for r in results.iter().flatten() {
            self.due.add(r.retry_at, now);
        }
        self.record_completions(results.iter());
        Ok(results)
    }

    /// Completes runs, then claims up to `req.max` more for the same agent, in one call (one transaction
    /// on stores that can; the PostgreSQL store with combining on runs the two steps in the statements
    /// it shares with concurrent callers): what a worker does when it finishes a batch. The claim sees
    /// the completions, so dependents they released can come back at once (when the steps commit apart,
    /// another claimer may take them first). Bad input and failures before the completions
    /// were applied are the outer `Err`; a claim that failed after them is [`CompletedAndAssigned::assigned`].
    pub async fn complete_and_claim(
        &self,
        completions: Vec<RunCompletion>,
        req: ClaimRequest,
    ) -> Result<CompletedAndAssigned> {
        if completions.len() > Page::MAX_LIMIT as usize {
            return Err(Error::invalid("completions", format!("at most {} per call", Page::MAX_LIMIT)));
        }
        let claim = self.claim_params(req)?;
        let now = claim.now;
        let started = std::time::Instant::now();
        let done = self
            .store
            .runs_complete_and_claim(
                CompleteMany { completions, retry_defaults: self.config.retry.clone(), now },
                claim,
            )
            .await?;
        for r in done.completed.iter().flatten() {
            self.due.add(r.retry_at, now);
        }
        self.record_completions(done.completed.iter());
        if let Ok(c) = &done.claimed {
            self.record_claim(started, c.len());
        }
        let assigned = match done.claimed {
            Ok(c) => Ok(self.assign_all(c).await),
            Err(e) => Err(Error::Store(e)),
        };
        Ok(CompletedAndAssigned { completed: done.completed, assigned })
    }

    /// A claim request checked and turned into the store's parameters.
    fn claim_params(&self, req: ClaimRequest) -> Result<Claim> {
        check_text("agent_id", &req.agent_id, 200, true)?;
        if req.max == 0 || req.max > Page::MAX_LIMIT {
            return Err(Error::invalid("max", format!("between 1 and {}", Page::MAX_LIMIT)));
        }
        let ttl = match req.lease_ttl_seconds {
            Some(s) => {
                let max = self.config.max_lease_ttl.num_seconds().max(1) as u64;
                if s == 0 || s > max {
                    return Err(Error::invalid("lease_ttl_seconds", format!("between 1 and {max}")));
                }
                Duration::seconds(s as i64)
            }
            None => self.config.lease_ttl,
        };
        Ok(Claim {
            agent_id: req.agent_id,
            capabilities: req.capabilities,
            limit: req.max,
            lease_ttl: ttl,
            now: self.now(),
        })
    }

    /// Claimed runs with their recipes and answers. A run that cannot be assigned (its recipe vanished,
    /// an answer cannot be decrypted) is failed permanently now instead of letting its lease expire again
    /// and again.
    async fn assign_all(&self, claimed: Vec<ClaimedRun>) -> Vec<Assignment> {
        let mut out = Vec::with_capacity(claimed.len());
        // One read per project of the batch, not per run (a claim's runs are mostly of few projects).
        let mut repositories: BTreeMap<ProjectId, Option<Repository>> = BTreeMap::new();
        for c in claimed {
            let (run_id, token) = (c.run.id, c.lease.token);
            match self.assignment(c, &mut repositories).await {
                Ok(a) => out.push(a),
                Err(e) => {
                    tracing::error!(run_id = %run_id, error = %e, "claimed run cannot be assigned");
                    let outcome = RunOutcome::Failed {
                        error: format!("cannot be assigned to an agent: {e}"),
                        exit_code: None,
                        kind: crate::retry::FailureKind::Permanent,
                    };
                    if let Err(e2) = self.complete(run_id, token, outcome, None).await {
                        // Keep the runs already assigned in this call; this one's lease will expire.
                        tracing::error!(run_id = %run_id, error = %e2, "could not fail the unassignable run");
                    }
                }
            }
        }
        out
    }

    // ---- info requests ----

    /// Answers a pending info request: validated for its kind and encrypted at rest.
    pub async fn answer_info_request(&self, id: InfoRequestId, value: &str, answered_by: &str) -> Result<InfoAnswered> {
        check_text("answered_by", answered_by, 200, true)?;
        check_text("value", value, 64 * 1024, false)?;
        let req = self.store.info_request_get(id).await?;
        if req.state != InfoRequestState::Pending {
            return Err(Error::Store(StoreError::conflict(format!("info request {id} is {}", req.state.as_str()))));
        }
        if req.kind == InputKind::Choice && !req.choices.iter().any(|c| c == value) {
            return Err(Error::invalid("value", format!("must be one of: {}", req.choices.join(", "))));
        }
        let answer = match &self.config.keyring {
            Some(k) => k.seal(value.as_bytes(), id.0.as_bytes())?,
            None if req.kind == InputKind::Secret => return Err(Error::EncryptionKeyMissing),
            None => SealedValue::plain(value.as_bytes()),
        };
        Ok(self
            .store
            .info_request_answer(InfoAnswer { id, answer, answered_by: answered_by.to_string(), now: self.now() })
            .await?)
    }

    /// Decrypts a stored answer (for admins and the asking run's agent only).
    pub fn reveal_answer(&self, req: &InfoRequest) -> Result<Option<String>> {
        let Some(sealed) = &req.answer else {
            return Ok(None);
        };
        let bytes = match &self.config.keyring {
            Some(k) => k.open(sealed, req.id.0.as_bytes())?,
            None if !sealed.is_encrypted() => sealed.ciphertext.clone(),
            None => return Err(Error::EncryptionKeyMissing),
        };
        String::from_utf8(bytes).map(Some).map_err(|_| Error::invalid("answer", "stored answer is not UTF-8"))
    }

    async fn assignment(
        &self,
        claimed: ClaimedRun,
        repositories: &mut BTreeMap<ProjectId, Option<Repository>>,
    ) -> Result<Assignment> {
        let recipe = match claimed.work_item.recipe_id {
            Some(r) => Some(self.store.recipe_get(r).await?.spec),
            None => None,
        };
        let mut answers = BTreeMap::new();
        if claimed.resumed {
            let now = self.now();
            for r in self.store.info_answers_for_run(claimed.run.id, claimed.lease.token, now).await? {
                if let Some(v) = self.reveal_answer(&r)? {
                    answers.insert(r.key.clone(), AnswerValue { value: v, secret: r.kind == InputKind::Secret });
                }
            }
        }
        let project = claimed.work_item.project_id;
        let repository = match repositories.get(&project) {
            Some(r) => r.clone(),
            None => {
                let r = self.store.project_get(project).await?.repository;
                repositories.insert(project, r.clone());
                r
            }
        };
        Ok(Assignment { claimed, recipe, answers, repository })
    }
}

#[async_trait]
impl AgentApi for Orchestrator {
    #[tracing::instrument(name = "orchestrator.claim", skip_all, fields(agent_id = %req.agent_id, max = req.max))]
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Assignment>> {
        let claim = self.claim_params(req)?;
        let started = std::time::Instant::now();
        let claimed = self.store.runs_claim(claim).await?;
        self.record_claim(started, claimed.len());
        Ok(self.assign_all(claimed).await)
    }

    async fn work_generation(&self) -> u64 {
        self.store.notifier().generation()
    }

    async fn wait_for_work(&self, seen: u64, timeout: std::time::Duration) -> bool {
        // Work this process scheduled for later (not-before, retry times) wakes the waiter when it is due.
        let now = self.now();
        let due = self.due.next_after(now);
        let wait = match due.and_then(|at| (at - now).to_std().ok()) {
            Some(until) => timeout.min(until),
            None => timeout,
        };
        if self.store.notifier().wait_changed(seen, wait).await {
            return true;
        }
        due.is_some_and(|at| self.now() >= at)
    }

    #[tracing::instrument(name = "orchestrator.heartbeat", skip(self))]
    async fn heartbeat(&self, run_id: RunId, token: u64) -> Result<Lease> {
        Ok(self.store.lease_renew(LeaseRenew { run_id, token, ttl: None, now: self.now() }).await?)
    }

    #[tracing::instrument(name = "orchestrator.start", skip(self))]
    async fn start(&self, run_id: RunId, token: u64) -> Result<Run> {
        Ok(self.store.run_start(RunStart { run_id, token, now: self.now() }).await?)
    }

    #[tracing::instrument(name = "orchestrator.append_logs", skip(self, lines), fields(lines = lines.len()))]
    async fn append_logs(&self, run_id: RunId, token: u64, mut lines: Vec<NewLogLine>) -> Result<u64> {
        if lines.len() > 10_000 {
            return Err(Error::invalid("lines", "at most 10000 lines per call"));
        }
        for l in &mut lines {
            if l.line.len() > rules::MAX_LOG_LINE_LEN {
                let mut cut = rules::MAX_LOG_LINE_LEN;
                while !l.line.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.line.truncate(cut);
                l.line.push_str(" [truncated]");
            }
        }
        Ok(self.store.logs_append(LogAppend { run_id, token, lines, now: self.now() }).await?)
    }

    #[tracing::instrument(name = "orchestrator.record_steps", skip(self, events), fields(events = events.len()))]
    async fn record_steps(&self, run_id: RunId, token: u64, events: Vec<NewStepEvent>) -> Result<Vec<StepEvent>> {
        if events.len() > 1000 {
            return Err(Error::invalid("events", "at most 1000 events per call"));
        }
        Ok(self.store.step_events_append(StepEventsAppend { run_id, token, events, now: self.now() }).await?)
    }

    async fn ask(&self, run_id: RunId, token: u64, questions: Vec<NewInfoRequest>) -> Result<Vec<InfoRequest>> {
        self.ask_with_usage(run_id, token, questions, None).await
    }

    #[tracing::instrument(name = "orchestrator.ask", skip(self, questions, usage))]
    async fn ask_with_usage(
        &self,
        run_id: RunId,
        token: u64,
        questions: Vec<NewInfoRequest>,
        usage: Option<Usage>,
    ) -> Result<Vec<InfoRequest>> {
        check_questions(&questions)?;
        Ok(self.store.info_requests_create(InfoAsk { run_id, token, questions, usage, now: self.now() }).await?)
    }

    #[tracing::instrument(name = "orchestrator.complete", skip(self, outcome, usage))]
    async fn complete(
        &self,
        run_id: RunId,
        token: u64,
        outcome: RunOutcome,
        usage: Option<Usage>,
    ) -> Result<CompletionResult> {
        let now = self.now();
        let mut v = self
            .store
            .runs_complete_many(CompleteMany {
                completions: vec![RunCompletion { run_id, token, outcome, usage }],
                retry_defaults: self.config.retry.clone(),
                now,
            })
            .await?;
        self.record_completions(v.iter());
        match v.pop() {
            Some(r) => {
                let r = r?;
                self.due.add(r.retry_at, now);
                Ok(r)
            }
            None => Err(Error::Store(StoreError::conflict("no completion result"))),
        }
    }

    async fn release(&self, run_id: RunId, token: u64) -> Result<Run> {
        self.release_with_usage(run_id, token, None).await
    }

    #[tracing::instrument(name = "orchestrator.release", skip(self, usage))]
    async fn release_with_usage(&self, run_id: RunId, token: u64, usage: Option<Usage>) -> Result<Run> {
        let run = self.store.runs_release(RunRelease { run_id, token, usage, now: self.now() }).await?;
        self.meter.count("orchestrator_runs_released_total", &[], 1);
        Ok(run)
    }

    #[tracing::instrument(name = "orchestrator.record_result", skip(self, result, patch))]
    async fn record_result(&self, run_id: RunId, token: u64, result: RunResult, patch: String) -> Result<()> {
        let (result, patch) = rules::check_run_result(result, patch)?;
        Ok(self.store.run_result_put(RunResultPut { run_id, token, result, patch, now: self.now() }).await?)
    }

    async fn wait_for_cancellations(
        &self,
        held: Vec<(RunId, u64)>,
        timeout: std::time::Duration,
    ) -> Result<Vec<RunId>> {
        if held.len() > 1000 {
            return Err(Error::invalid("runs", "at most 1000 runs per call"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let seen = self.cancels.generation();
            let mut gone = Vec::new();
            for (id, token) in &held {
                match self.store.run_get(*id).await {
                    Ok(r) if r.state.holds_lease() && r.lease_token == *token => {}
                    Ok(_) => gone.push(*id),
                    Err(StoreError::NotFound { .. }) => gone.push(*id),
                    Err(e) => return Err(e.into()),
                }
            }
            let now = tokio::time::Instant::now();
            if !gone.is_empty() || now >= deadline {
                return Ok(gone);
            }
            // Cancellations made by other processes (replicas on one database) are seen by polling.
            let wait = (deadline - now).min(CANCEL_POLL);
            self.cancels.wait_changed(seen, wait).await;
        }
    }
}

/// How often [`AgentApi::wait_for_cancellations`] re-reads its runs when no cancellation of this process
/// wakes it (a cancellation made on another replica is seen within this time).
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(500);
