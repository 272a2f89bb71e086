//! The request timeout: a slow store answers 503 `unavailable` in the JSON shape (virtual time).

mod common;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::*;
use orchestrator_core::domain::*;
use orchestrator_core::ids::*;
use orchestrator_core::retry::RetryOverrides;
use orchestrator_core::store::*;
use orchestrator_core::{MemoryStore, Notifier, Orchestrator, OrchestratorConfig, StoreResult};
use orchestrator_http::{router_with_metrics, HttpConfig, Metrics};
use std::sync::Arc;
use std::time::Duration;

/// A MemoryStore whose `ping` takes `delay`.
struct SlowPing {
    inner: MemoryStore,
    delay: Duration,
}

#[async_trait]
impl Store for SlowPing {
    fn notifier(&self) -> &Notifier {
        self.inner.notifier()
    }
    async fn ping(&self) -> StoreResult<()> {
        tokio::time::sleep(self.delay).await;
        self.inner.ping().await
    }
    async fn project_create(&self, p: NewProject) -> StoreResult<Project> {
        self.inner.project_create(p).await
    }
    async fn project_get(&self, id: ProjectId) -> StoreResult<Project> {
        self.inner.project_get(id).await
    }
    async fn project_list(&self, page: Page) -> StoreResult<Vec<Project>> {
        self.inner.project_list(page).await
    }
    async fn project_update(&self, p: ProjectUpdate) -> StoreResult<Project> {
        self.inner.project_update(p).await
    }
    async fn project_delete(&self, id: ProjectId) -> StoreResult<()> {
        self.inner.project_delete(id).await
    }
    async fn vision_put(&self, p: VisionPut) -> StoreResult<Vision> {
        self.inner.vision_put(p).await
    }
    async fn vision_get(&self, project_id: ProjectId, version: Option<u32>) -> StoreResult<Vision> {
        self.inner.vision_get(project_id, version).await
    }
    async fn vision_list(&self, project_id: ProjectId) -> StoreResult<Vec<Vision>> {
        self.inner.vision_list(project_id).await
    }
    async fn draft_create(&self, p: NewDraft) -> StoreResult<(RequirementsDraft, Option<ApprovalRequest>)> {
        self.inner.draft_create(p).await
    }
    async fn draft_get(&self, id: DraftId) -> StoreResult<RequirementsDraft> {
        self.inner.draft_get(id).await
    }
    async fn draft_list(&self, project_id: ProjectId, page: Page) -> StoreResult<Vec<RequirementsDraft>> {
        self.inner.draft_list(project_id, page).await
    }
    async fn draft_decide(&self, id: DraftId, d: Decide) -> StoreResult<DecisionOutcome> {
        self.inner.draft_decide(id, d).await
    }
    async fn approval_get(&self, id: ApprovalId) -> StoreResult<ApprovalRequest> {
        self.inner.approval_get(id).await
    }
    async fn approval_list(&self, f: ApprovalFilter) -> StoreResult<Vec<ApprovalRequest>> {
        self.inner.approval_list(f).await
    }
    async fn approval_decide(&self, id: ApprovalId, d: Decide) -> StoreResult<DecisionOutcome> {
        self.inner.approval_decide(id, d).await
    }
    async fn recipe_create(&self, p: NewRecipe) -> StoreResult<ToolRecipe> {
        self.inner.recipe_create(p).await
    }
    async fn recipe_get(&self, id: RecipeId) -> StoreResult<ToolRecipe> {
        self.inner.recipe_get(id).await
    }
    async fn recipe_list(&self, page: Page) -> StoreResult<Vec<ToolRecipe>> {
        self.inner.recipe_list(page).await
    }
    async fn work_items_create(
        &self,
        items: Vec<NewWorkItem>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<WorkItemCreated>> {
        self.inner.work_items_create(items, now).await
    }
    async fn work_item_get(&self, id: WorkItemId) -> StoreResult<WorkItem> {
        self.inner.work_item_get(id).await
    }
    async fn work_item_list(&self, f: WorkItemFilter) -> StoreResult<Vec<WorkItem>> {
        self.inner.work_item_list(f).await
    }
    async fn work_item_update(&self, p: WorkItemUpdate) -> StoreResult<WorkItemChanged> {
        self.inner.work_item_update(p).await
    }
    async fn work_item_submit(
        &self,
        id: WorkItemId,
        require_approval: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItemChanged> {
        self.inner.work_item_submit(id, require_approval, now).await
    }
    async fn work_item_set_policy(
        &self,
        id: WorkItemId,
        retry: RetryOverrides,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItem> {
        self.inner.work_item_set_policy(id, retry, now).await
    }
    async fn work_item_cancel(&self, id: WorkItemId, c: Cancel) -> StoreResult<WorkItem> {
        self.inner.work_item_cancel(id, c).await
    }
    async fn work_item_requeue(&self, id: WorkItemId, r: Requeue) -> StoreResult<WorkItem> {
        self.inner.work_item_requeue(id, r).await
    }
    async fn enqueue_many(&self, items: Vec<Enqueue>, now: DateTime<Utc>) -> StoreResult<Vec<ScheduledTask>> {
        self.inner.enqueue_many(items, now).await
    }
    async fn scheduled_task_get(&self, id: WorkItemId) -> StoreResult<ScheduledTask> {
        self.inner.scheduled_task_get(id).await
    }
    async fn queue_list(&self, f: QueueFilter) -> StoreResult<Vec<ScheduledTask>> {
        self.inner.queue_list(f).await
    }
    async fn tick(&self, t: Tick) -> StoreResult<TickReport> {
        self.inner.tick(t).await
    }
    async fn leases_reap_expired(&self, t: Tick) -> StoreResult<Vec<ReapedRun>> {
        self.inner.leases_reap_expired(t).await
    }
    async fn runs_claim(&self, c: Claim) -> StoreResult<Vec<ClaimedRun>> {
        self.inner.runs_claim(c).await
    }
    async fn lease_renew(&self, p: LeaseRenew) -> StoreResult<Lease> {
        self.inner.lease_renew(p).await
    }
    async fn run_start(&self, p: RunStart) -> StoreResult<Run> {
        self.inner.run_start(p).await
    }
    async fn runs_complete_many(&self, p: CompleteMany) -> StoreResult<Vec<StoreResult<CompletionResult>>> {
        self.inner.runs_complete_many(p).await
    }
    async fn run_get(&self, id: RunId) -> StoreResult<Run> {
        self.inner.run_get(id).await
    }
    async fn run_list(&self, f: RunFilter) -> StoreResult<Vec<Run>> {
        self.inner.run_list(f).await
    }
    async fn run_cancel(&self, id: RunId, c: Cancel) -> StoreResult<Run> {
        self.inner.run_cancel(id, c).await
    }
    async fn run_requeue(&self, id: RunId, r: Requeue) -> StoreResult<WorkItem> {
        self.inner.run_requeue(id, r).await
    }
    async fn runs_release(&self, p: RunRelease) -> StoreResult<Run> {
        self.inner.runs_release(p).await
    }
    async fn run_result_put(&self, p: RunResultPut) -> StoreResult<()> {
        self.inner.run_result_put(p).await
    }
    async fn run_result_get(&self, id: RunId) -> StoreResult<Option<RunResultRecord>> {
        self.inner.run_result_get(id).await
    }
    async fn logs_append(&self, p: LogAppend) -> StoreResult<u64> {
        self.inner.logs_append(p).await
    }
    async fn logs_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<LogEntry>> {
        self.inner.logs_read_after(run_id, after, limit).await
    }
    async fn step_events_append(&self, p: StepEventsAppend) -> StoreResult<Vec<StepEvent>> {
        self.inner.step_events_append(p).await
    }
    async fn step_events_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<StepEvent>> {
        self.inner.step_events_read_after(run_id, after, limit).await
    }
    async fn info_requests_create(&self, p: InfoAsk) -> StoreResult<Vec<InfoRequest>> {
        self.inner.info_requests_create(p).await
    }
    async fn info_request_get(&self, id: InfoRequestId) -> StoreResult<InfoRequest> {
        self.inner.info_request_get(id).await
    }
    async fn info_request_list(&self, f: InfoRequestFilter) -> StoreResult<Vec<InfoRequest>> {
        self.inner.info_request_list(f).await
    }
    async fn info_request_answer(&self, p: InfoAnswer) -> StoreResult<InfoAnswered> {
        self.inner.info_request_answer(p).await
    }
    async fn info_answers_for_run(
        &self,
        run_id: RunId,
        token: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<InfoRequest>> {
        self.inner.info_answers_for_run(run_id, token, now).await
    }
    async fn stats(&self) -> StoreResult<QueueStats> {
        self.inner.stats().await
    }
}

#[tokio::test(start_paused = true)]
async fn slow_requests_time_out_with_503() {
    let store = Arc::new(SlowPing { inner: MemoryStore::new(), delay: Duration::from_secs(3600) });
    let orch = Arc::new(Orchestrator::new(store, OrchestratorConfig::default()));
    let http = HttpConfig::new().with_request_timeout(Duration::from_secs(2));
    let router = local(router_with_metrics(orch, http, Metrics::new()));
    let started = tokio::time::Instant::now();
    let r = send(&router, request(axum::http::Method::GET, "/readyz", None, None)).await;
    let e = r.err(503, "unavailable");
    assert_eq!(e["error"]["details"]["retryable"], true);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(60), "{waited:?}");
    // Fast routes are unaffected.
    send(&router, request(axum::http::Method::GET, "/healthz", None, None)).await.ok(200);
}
