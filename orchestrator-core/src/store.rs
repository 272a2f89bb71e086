//! The [`Store`] contract: atomic domain operations that every storage backend implements.
//!
//! Each operation is one guarded unit of work: it re-checks the expected state (and, for agent writes,
//! the lease's fencing token and expiry) in the same transaction that writes, so a stale writer can never
//! overwrite newer work. Every operation receives `now` from the caller's [`crate::Clock`]; stores never
//! read the wall clock. Policy (approvals, retry defaults, encryption) is decided by the
//! [`crate::Orchestrator`] facade and passed in; rules that every backend must apply identically live in
//! [`crate::rules`] as pure functions that backends call.

use crate::crypto::SealedValue;
use crate::domain::*;
use crate::error::StoreResult;
use crate::ids::*;
use crate::notify::Notifier;
use crate::recipe::{InputKind, RecipeSpec};
use crate::retry::{RetryOverrides, RetryPolicy};
use crate::state::{ApprovalState, RunState, WorkItemState};
use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Keyset pagination: up to `limit` rows with ids greater than `after`, in id (creation) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Maximum rows (clamped to 1..=[`Page::MAX_LIMIT`]).
    pub limit: u32,
    /// Return rows after this id.
    pub after: Option<Uuid>,
}

impl Page {
    /// The largest page a store returns.
    pub const MAX_LIMIT: u32 = 1000;
    /// The clamped limit.
    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, Self::MAX_LIMIT) as usize
    }
}

impl Default for Page {
    fn default() -> Self {
        Page { limit: 100, after: None }
    }
}

/// Parameters of [`Store::project_create`].
#[derive(Debug, Clone)]
pub struct NewProject {
    /// Id to use.
    pub id: ProjectId,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// The repository agents work on.
    pub repository: Option<Repository>,
    /// Now.
    pub now: DateTime<Utc>,
}

impl NewProject {
    /// The project it creates.
    pub fn to_project(&self) -> Project {
        Project {
            id: self.id,
            name: self.name.clone(),
            description: self.description.clone(),
            repository: self.repository.clone(),
            created_at: self.now,
            updated_at: self.now,
        }
    }
}

/// Parameters of [`Store::project_update`].
#[derive(Debug, Clone)]
pub struct ProjectUpdate {
    /// The project.
    pub id: ProjectId,
    /// New name.
    pub name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New repository: `Some(None)` removes it, `None` keeps it.
    pub repository: Option<Option<Repository>>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Parameters of [`Store::vision_put`].
#[derive(Debug, Clone)]
pub struct VisionPut {
    /// The project.
    pub project_id: ProjectId,
    /// Text.
    pub text: String,
    /// Author.
    pub author: Option<String>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Parameters of [`Store::draft_create`].
#[derive(Debug, Clone)]
pub struct NewDraft {
    /// Id to use.
    pub id: DraftId,
    /// The project.
    pub project_id: ProjectId,
    /// Title.
    pub title: String,
    /// Requirements.
    pub requirements: Vec<RequirementSpec>,
    /// Who proposed it.
    pub proposed_by: Option<String>,
    /// Create a pending approval request for it (policy `ORCH_REQUIRE_APPROVAL`).
    pub require_approval: bool,
    /// Now.
    pub now: DateTime<Utc>,
}

/// A human decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Approve.
    Approve,
    /// Reject.
    Reject,
}

/// Parameters of [`Store::approval_decide`] and [`Store::draft_decide`].
#[derive(Debug, Clone)]
pub struct Decide {
    /// Approve or reject.
    pub decision: Decision,
    /// Who decided.
    pub decided_by: String,
    /// Why.
    pub reason: Option<String>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// What a decision changed.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionOutcome {
    /// The decided approval request, when one existed.
    pub approval: Option<ApprovalRequest>,
    /// The decided draft, when the subject was a draft.
    pub draft: Option<RequirementsDraft>,
    /// The work items created (draft approved) or changed (work item decided).
    pub work_items: Vec<WorkItem>,
}

/// Filter for [`Store::approval_list`].
#[derive(Debug, Clone, Default)]
pub struct ApprovalFilter {
    /// Only this state.
    pub state: Option<ApprovalState>,
    /// Only this project.
    pub project_id: Option<ProjectId>,
    /// Page.
    pub page: Page,
}

/// Parameters of [`Store::recipe_create`].
#[derive(Debug, Clone)]
pub struct NewRecipe {
    /// Id to use.
    pub id: RecipeId,
    /// Optional project.
    pub project_id: Option<ProjectId>,
    /// The YAML source.
    pub yaml: String,
    /// The validated recipe.
    pub spec: RecipeSpec,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Scheduling options of an enqueue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueOptions {
    /// New priority (higher first); `None` keeps the item's.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Work items that must succeed first (added to the item's dependencies).
    #[serde(default)]
    pub depends_on: Vec<WorkItemId>,
    /// Not claimable before this time.
    #[serde(default)]
    pub not_before: Option<DateTime<Utc>>,
}

/// Parameters of one work item creation in [`Store::work_items_create`].
#[derive(Debug, Clone)]
pub struct NewWorkItem {
    /// Id to use.
    pub id: WorkItemId,
    /// The project.
    pub project_id: ProjectId,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Recipe (must exist).
    pub recipe_id: Option<RecipeId>,
    /// Required capabilities.
    pub labels: Vec<String>,
    /// Priority.
    pub priority: i32,
    /// Retry overrides.
    pub retry: RetryOverrides,
    /// Idempotency key (unique per project).
    pub idempotency_key: Option<String>,
    /// Initial state: `draft`, `awaiting_approval` (a pending approval request is created) or `ready`.
    pub state: WorkItemState,
    /// Enqueue in the same unit (only with state `ready`).
    pub enqueue: Option<EnqueueOptions>,
}

/// Result of one creation.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItemCreated {
    /// The item (the existing one when the idempotency key matched).
    pub work_item: WorkItem,
    /// False when an existing item with the same idempotency key and content was returned.
    pub created: bool,
    /// The approval request created with it.
    pub approval: Option<ApprovalRequest>,
}

/// Filter for [`Store::work_item_list`].
#[derive(Debug, Clone, Default)]
pub struct WorkItemFilter {
    /// Only this project.
    pub project_id: Option<ProjectId>,
    /// Only this state.
    pub state: Option<WorkItemState>,
    /// Only items with this label.
    pub label: Option<String>,
    /// Page.
    pub page: Page,
}

/// Parameters of [`Store::work_item_update`].
#[derive(Debug, Clone)]
pub struct WorkItemUpdate {
    /// The item.
    pub id: WorkItemId,
    /// New title.
    pub title: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New recipe (`Some(None)` detaches).
    pub recipe_id: Option<Option<RecipeId>>,
    /// New labels.
    pub labels: Option<Vec<String>>,
    /// New priority (allowed in any unfinished state).
    pub priority: Option<i32>,
    /// Whether a content change needs a new approval (policy).
    pub require_approval: bool,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Result of an update or submit.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItemChanged {
    /// The item after the change.
    pub work_item: WorkItem,
    /// A new approval request, when the change needs one.
    pub approval: Option<ApprovalRequest>,
}

/// Parameters of [`Store::work_item_requeue`] and [`Store::run_requeue`].
#[derive(Debug, Clone)]
pub struct Requeue {
    /// Claimable from this time.
    pub run_at: DateTime<Utc>,
    /// Why (recorded on a cancelled active run).
    pub reason: String,
    /// Now.
    pub now: DateTime<Utc>,
}

/// One enqueue in [`Store::enqueue_many`].
#[derive(Debug, Clone)]
pub struct Enqueue {
    /// The item (state `ready`).
    pub work_item_id: WorkItemId,
    /// Options.
    pub options: EnqueueOptions,
}

/// Filter for [`Store::queue_list`].
#[derive(Debug, Clone, Default)]
pub struct QueueFilter {
    /// Only this project.
    pub project_id: Option<ProjectId>,
    /// Page.
    pub page: Page,
}

/// Parameters of [`Store::tick`] and [`Store::leases_reap_expired`].
#[derive(Debug, Clone)]
pub struct Tick {
    /// Retry policy defaults (per-item overrides are applied on top).
    pub retry_defaults: RetryPolicy,
    /// At most this many items promoted and leases reaped.
    pub limit: u32,
    /// Now.
    pub now: DateTime<Utc>,
}

/// What a tick did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    /// Retrying items whose time came, now queued.
    pub promoted: Vec<WorkItemId>,
    /// Runs whose lease expired, now lost.
    pub reaped: Vec<ReapedRun>,
    /// Runs that waited past an info request's deadline, now failed (the retry policy decides what
    /// follows for their work items).
    pub expired: Vec<ReapedRun>,
}

/// A run reaped as lost.
#[derive(Debug, Clone, PartialEq)]
pub struct ReapedRun {
    /// The run.
    pub run_id: RunId,
    /// Its work item.
    pub work_item_id: WorkItemId,
    /// The work item's new state (`retrying` or `failed`; `blocked` when a dependency will no longer succeed).
    pub work_item_state: WorkItemState,
    /// Next attempt time when retrying.
    pub retry_at: Option<DateTime<Utc>>,
}

/// Parameters of [`Store::runs_claim`].
#[derive(Debug, Clone)]
pub struct Claim {
    /// The claiming agent.
    pub agent_id: String,
    /// Its capabilities: it may claim items whose labels are all among them.
    pub capabilities: Vec<String>,
    /// At most this many runs.
    pub limit: u32,
    /// Lease duration.
    pub lease_ttl: Duration,
    /// Now.
    pub now: DateTime<Utc>,
}

/// A claimed run with its lease and work item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimedRun {
    /// The run (state `claimed`).
    pub run: Run,
    /// Its lease.
    pub lease: Lease,
    /// The work item (state `running`).
    pub work_item: WorkItem,
    /// True when this claim resumes a run that waited for input.
    pub resumed: bool,
}

/// Parameters of [`Store::lease_renew`].
#[derive(Debug, Clone, Copy)]
pub struct LeaseRenew {
    /// The run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// New duration from now; `None` keeps the duration the lease was granted with.
    pub ttl: Option<Duration>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Parameters of [`Store::run_start`].
#[derive(Debug, Clone, Copy)]
pub struct RunStart {
    /// The run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// Now.
    pub now: DateTime<Utc>,
}

/// One completion in [`Store::runs_complete_many`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCompletion {
    /// The run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// How it ended.
    pub outcome: RunOutcome,
    /// Usage to record.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// Parameters of [`Store::runs_complete_many`].
#[derive(Debug, Clone)]
pub struct CompleteMany {
    /// The completions (each is guarded independently).
    pub completions: Vec<RunCompletion>,
    /// Retry policy defaults.
    pub retry_defaults: RetryPolicy,
    /// Now.
    pub now: DateTime<Utc>,
}

/// What a completion did.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionResult {
    /// The run after completion.
    pub run: Run,
    /// The work item's new state.
    pub work_item_state: WorkItemState,
    /// Next attempt time when it will be retried.
    pub retry_at: Option<DateTime<Utc>>,
    /// Dependents that became claimable.
    pub released: Vec<WorkItemId>,
    /// Dependents that became blocked.
    pub blocked: Vec<WorkItemId>,
}

/// What [`Store::runs_complete_and_claim`] did.
#[derive(Debug)]
pub struct CompletedAndClaimed {
    /// One result per completion, in order, as [`Store::runs_complete_many`] gives them.
    pub completed: Vec<StoreResult<CompletionResult>>,
    /// The runs claimed after the completions were applied, as [`Store::runs_claim`] gives them. An error
    /// here leaves the completions applied.
    pub claimed: StoreResult<Vec<ClaimedRun>>,
}

/// [`Store::runs_complete_and_claim`] as two steps: [`Store::runs_complete_many`], then
/// [`Store::runs_claim`] (only the claim when there is nothing to complete). The trait's default.
pub async fn complete_then_claim<S: Store + ?Sized>(
    store: &S,
    p: CompleteMany,
    c: Claim,
) -> StoreResult<CompletedAndClaimed> {
    let completed = if p.completions.is_empty() { Vec::new() } else { store.runs_complete_many(p).await? };
    let claimed = store.runs_claim(c).await;
    Ok(CompletedAndClaimed { completed, claimed })
}

/// Settles a backend's one-transaction [`Store::runs_complete_and_claim`] (`both`: the completions'
/// results and the claimed runs). When it failed, nothing was written: an unreachable backend is
/// reported as is; otherwise the completions must not depend on the claim, so the two steps run apart
/// ([`complete_then_claim`]) and the caller learns which part failed.
pub async fn settle_complete_and_claim<S: Store + ?Sized>(
    store: &S,
    both: StoreResult<(Vec<StoreResult<CompletionResult>>, Vec<ClaimedRun>)>,
    p: CompleteMany,
    c: Claim,
) -> StoreResult<CompletedAndClaimed> {
    match both {
        Ok((completed, claimed)) => Ok(CompletedAndClaimed { completed, claimed: Ok(claimed) }),
        Err(e @ crate::error::StoreError::Unavailable { .. }) => Err(e),
        Err(_) => complete_then_claim(store, p, c).await,
    }
}

/// Filter for [`Store::run_list`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this work item.
    pub work_item_id: Option<WorkItemId>,
    /// Only this state.
    pub state: Option<RunState>,
    /// Only this agent.
    pub agent_id: Option<String>,
    /// Page.
    pub page: Page,
}

/// Parameters of [`Store::run_cancel`] and [`Store::work_item_cancel`].
#[derive(Debug, Clone)]
pub struct Cancel {
    /// Why.
    pub reason: String,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Parameters of [`Store::runs_release`].
#[derive(Debug, Clone)]
pub struct RunRelease {
    /// The run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// Usage so far, recorded on the run when given (replaces the previous report).
    pub usage: Option<Usage>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Parameters of [`Store::run_result_put`].
#[derive(Debug, Clone)]
pub struct RunResultPut {
    /// The run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// What the run changed.
    pub result: RunResult,
    /// The patch (unified diff from the base to the head commit), already cut to size.
    pub patch: String,
    /// Now.
    pub now: DateTime<Utc>,
}

/// A run's recorded result with its patch, as [`Store::run_result_get`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResultRecord {
    /// The run.
    pub run_id: RunId,
    /// What the run changed.
    pub result: RunResult,
    /// The patch.
    pub patch: String,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
}

/// Parameters of [`Store::logs_append`].
#[derive(Debug, Clone)]
pub struct LogAppend {
    /// The run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// Lines, in order.
    pub lines: Vec<NewLogLine>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Parameters of [`Store::step_events_append`].
#[derive(Debug, Clone)]
pub struct StepEventsAppend {
    /// The run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// Events, in order. A `succeeded` event with a step index advances the run's resume point.
    pub events: Vec<NewStepEvent>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// One question of [`Store::info_requests_create`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewInfoRequest {
    /// Key the answer is delivered under.
    pub key: String,
    /// The question.
    pub prompt: String,
    /// Kind.
    #[serde(default)]
    pub kind: InputKind,
    /// Allowed answers for `choice`.
    #[serde(default)]
    pub choices: Vec<String>,
    /// Optional deadline.
    #[serde(default)]
    pub deadline: Option<DateTime<Utc>>,
}

/// Parameters of [`Store::info_requests_create`].
#[derive(Debug, Clone)]
pub struct InfoAsk {
    /// The asking run.
    pub run_id: RunId,
    /// Fencing token.
    pub token: u64,
    /// Questions (at least one).
    pub questions: Vec<NewInfoRequest>,
    /// Usage so far, recorded on the run when given (replaces the previous report).
    pub usage: Option<Usage>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Parameters of [`Store::info_request_answer`].
#[derive(Debug, Clone)]
pub struct InfoAnswer {
    /// The request.
    pub id: InfoRequestId,
    /// The sealed answer.
    pub answer: SealedValue,
    /// Who answered.
    pub answered_by: String,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Result of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct InfoAnswered {
    /// The request after the answer.
    pub request: InfoRequest,
    /// True when this was the last open question and the work item is claimable again.
    pub resumed: bool,
}

/// Filter for [`Store::info_request_list`].
#[derive(Debug, Clone, Default)]
pub struct InfoRequestFilter {
    /// Only this state.
    pub state: Option<InfoRequestState>,
    /// Only this run.
    pub run_id: Option<RunId>,
    /// Only this project.
    pub project_id: Option<ProjectId>,
    /// Page.
    pub page: Page,
}

/// Counts for metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Work items per state (every state present, zero included).
    pub work_items: BTreeMap<String, u64>,
    /// Runs per state (every state present, zero included).
    pub runs: BTreeMap<String, u64>,
    /// Pending info requests.
    pub pending_info_requests: u64,
    /// Pending approvals.
    pub pending_approvals: u64,
}

impl QueueStats {
    /// Stats with every state at zero.
    pub fn zeroed() -> Self {
        QueueStats {
            work_items: WorkItemState::ALL.iter().map(|s| (s.as_str().to_string(), 0)).collect(),
            runs: RunState::ALL.iter().map(|s| (s.as_str().to_string(), 0)).collect(),
            pending_info_requests: 0,
            pending_approvals: 0,
        }
    }
}

/// The storage contract. Dyn-compatible: use it as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The signal this store fires (after commit) when work may have become claimable.
    fn notifier(&self) -> &Notifier;

    /// Checks that the backend is reachable.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a project.
    async fn project_create(&self, p: NewProject) -> StoreResult<Project>;
    /// Reads a project.
    async fn project_get(&self, id: ProjectId) -> StoreResult<Project>;
    /// Lists projects.
    async fn project_list(&self, page: Page) -> StoreResult<Vec<Project>>;
    /// Updates a project.
    async fn project_update(&self, p: ProjectUpdate) -> StoreResult<Project>;
    /// Deletes a project and everything in it; refused (`Conflict`) while any of its work items is
    /// queued, running, waiting for input or retrying.
    async fn project_delete(&self, id: ProjectId) -> StoreResult<()>;

    /// Writes a new version of a project's vision.
    async fn vision_put(&self, p: VisionPut) -> StoreResult<Vision>;
    /// Reads a version (latest when `None`).
    async fn vision_get(&self, project_id: ProjectId, version: Option<u32>) -> StoreResult<Vision>;
    /// Lists every version, oldest first.
    async fn vision_list(&self, project_id: ProjectId) -> StoreResult<Vec<Vision>>;

    /// Proposes requirements (with a pending approval request when required).
    async fn draft_create(&self, p: NewDraft) -> StoreResult<(RequirementsDraft, Option<ApprovalRequest>)>;
    /// Reads a draft.
    async fn draft_get(&self, id: DraftId) -> StoreResult<RequirementsDraft>;
    /// Lists a project's drafts.
    async fn draft_list(&self, project_id: ProjectId, page: Page) -> StoreResult<Vec<RequirementsDraft>>;
    /// Approves (creating its work items, state `ready`) or rejects a draft, deciding its pending
    /// approval request too.
    async fn draft_decide(&self, id: DraftId, d: Decide) -> StoreResult<DecisionOutcome>;

    /// Reads an approval request.
    async fn approval_get(&self, id: ApprovalId) -> StoreResult<ApprovalRequest>;
    /// Lists approval requests.
    async fn approval_list(&self, f: ApprovalFilter) -> StoreResult<Vec<ApprovalRequest>>;
    /// Decides a pending approval request. Approving a draft's creates its work items; approving a work
    /// item's makes it `ready`, but only while the item's content hash still equals the approved one;
    /// rejecting a work item's sends it back to `draft`.
    async fn approval_decide(&self, id: ApprovalId, d: Decide) -> StoreResult<DecisionOutcome>;

    /// Stores a validated recipe.
    async fn recipe_create(&self, p: NewRecipe) -> StoreResult<ToolRecipe>;
    /// Reads a recipe.
    async fn recipe_get(&self, id: RecipeId) -> StoreResult<ToolRecipe>;
    /// Lists recipes.
    async fn recipe_list(&self, page: Page) -> StoreResult<Vec<ToolRecipe>>;

    /// Creates work items in one unit (all or none), with idempotency keys, approval requests and
    /// optional enqueue.
    async fn work_items_create(&self, items: Vec<NewWorkItem>, now: DateTime<Utc>)
        -> StoreResult<Vec<WorkItemCreated>>;
    /// Reads a work item.
    async fn work_item_get(&self, id: WorkItemId) -> StoreResult<WorkItem>;
    /// Lists work items.
    async fn work_item_list(&self, f: WorkItemFilter) -> StoreResult<Vec<WorkItem>>;
    /// Edits a work item (content only in `draft`, `awaiting_approval` and `ready`; priority in any
    /// unfinished state). A content change under the approval policy supersedes the pending approval and
    /// requests a new one.
    async fn work_item_update(&self, p: WorkItemUpdate) -> StoreResult<WorkItemChanged>;
    /// Submits a `draft` item: to `awaiting_approval` (with a new approval request) or `ready`.
    async fn work_item_submit(
        &self,
        id: WorkItemId,
        require_approval: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItemChanged>;
    /// Sets retry overrides.
    async fn work_item_set_policy(
        &self,
        id: WorkItemId,
        retry: RetryOverrides,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItem>;
    /// Cancels a work item, its active run and pending info requests; blocks its dependents.
    async fn work_item_cancel(&self, id: WorkItemId, c: Cancel) -> StoreResult<WorkItem>;
    /// Puts a work item back in the queue at `run_at` (from `queued`, `retrying`, `succeeded`,
    /// `failed` or `cancelled`), resetting its attempt budget and unblocking dependents it blocked.
    async fn work_item_requeue(&self, id: WorkItemId, r: Requeue) -> StoreResult<WorkItem>;

    /// Enqueues `ready` items with priority, dependencies and not-before time, in one unit. Unknown
    /// dependencies and cycles are refused (`Invalid`).
    async fn enqueue_many(&self, items: Vec<Enqueue>, now: DateTime<Utc>) -> StoreResult<Vec<ScheduledTask>>;
    /// The scheduler's view of one item.
    async fn scheduled_task_get(&self, id: WorkItemId) -> StoreResult<ScheduledTask>;
    /// Items in the queue (`queued`, `retrying`, `blocked`), highest priority first, then oldest.
    async fn queue_list(&self, f: QueueFilter) -> StoreResult<Vec<ScheduledTask>>;
    /// Promotes `retrying` items whose time came to `queued` and reaps expired leases.
    async fn tick(&self, t: Tick) -> StoreResult<TickReport>;
    /// Marks runs whose lease expired as `lost`; the retry policy decides what follows.
    async fn leases_reap_expired(&self, t: Tick) -> StoreResult<Vec<ReapedRun>>;

    /// Claims up to `limit` claimable items for an agent, highest priority first, then oldest, in one
    /// unit: creates runs (or resumes runs that waited for input) and their leases.
    async fn runs_claim(&self, c: Claim) -> StoreResult<Vec<ClaimedRun>>;
    /// Renews a lease (heartbeat). Refused with `LeaseLost` when the token is stale, the lease expired
    /// or the run was cancelled.
    async fn lease_renew(&self, p: LeaseRenew) -> StoreResult<Lease>;
    /// Marks a claimed run as running (fenced).
    async fn run_start(&self, p: RunStart) -> StoreResult<Run>;
    /// Completes runs, each fenced and guarded on its own; successes release dependents, failures retry
    /// or fail (blocking dependents).
    async fn runs_complete_many(&self, p: CompleteMany) -> StoreResult<Vec<StoreResult<CompletionResult>>>;
    /// Completes runs, then claims more for an agent: what a worker does when it finishes a batch. The
    /// claim sees the completions (dependents they released can be claimed at once). An `Err` means no
    /// completion was applied; a claim that fails after the completions were applied is reported in
    /// [`CompletedAndClaimed::claimed`]. Backends that can do both in one transaction (one commit)
    /// override this; the default runs [`Store::runs_complete_many`], then [`Store::runs_claim`].
    async fn runs_complete_and_claim(&self, p: CompleteMany, c: Claim) -> StoreResult<CompletedAndClaimed> {
        complete_then_claim(self, p, c).await
    }
    /// Reads a run.
    async fn run_get(&self, id: RunId) -> StoreResult<Run>;
    /// Lists runs.
    async fn run_list(&self, f: RunFilter) -> StoreResult<Vec<Run>>;
    /// Cancels an active run and its work item.
    async fn run_cancel(&self, id: RunId, c: Cancel) -> StoreResult<Run>;
    /// Requeues a run's work item (cancelling the run first when it is still active).
    async fn run_requeue(&self, id: RunId, r: Requeue) -> StoreResult<WorkItem>;
    /// Hands a leased run back without using up an attempt (fenced): the run goes to `waiting_input`
    /// with its lease cleared and its work item to `queued`, claimable at once; the next claim resumes
    /// the same run (same attempt, answers and resume point). What an agent does when it stops gracefully.
    async fn runs_release(&self, p: RunRelease) -> StoreResult<Run>;
    /// Records (or replaces) what a leased run changed in its repository, with its patch (fenced).
    async fn run_result_put(&self, p: RunResultPut) -> StoreResult<()>;
    /// Reads a run's recorded result (`None` when it recorded none; `NotFound` for an unknown run).
    async fn run_result_get(&self, run_id: RunId) -> StoreResult<Option<RunResultRecord>>;

    /// Appends log lines (fenced); returns the last sequence number.
    async fn logs_append(&self, p: LogAppend) -> StoreResult<u64>;
    /// Reads log lines with `seq > after`, in order.
    async fn logs_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<LogEntry>>;
    /// Appends step events (fenced).
    async fn step_events_append(&self, p: StepEventsAppend) -> StoreResult<Vec<StepEvent>>;
    /// Reads step events with `seq > after`, in order.
    async fn step_events_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<StepEvent>>;

    /// Asks questions (fenced): the run and its work item go to `waiting_input`, the lease is released.
    async fn info_requests_create(&self, p: InfoAsk) -> StoreResult<Vec<InfoRequest>>;
    /// Reads an info request (with its sealed answer).
    async fn info_request_get(&self, id: InfoRequestId) -> StoreResult<InfoRequest>;
    /// Lists info requests.
    async fn info_request_list(&self, f: InfoRequestFilter) -> StoreResult<Vec<InfoRequest>>;
    /// Answers a pending question; when it was the run's last, the work item is claimable again.
    async fn info_request_answer(&self, p: InfoAnswer) -> StoreResult<InfoAnswered>;
    /// Every info request of a run with sealed answers, for its lease holder (fenced).
    async fn info_answers_for_run(
        &self,
        run_id: RunId,
        token: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<InfoRequest>>;

    /// Counts for metrics.
    async fn stats(&self) -> StoreResult<QueueStats>;
}
