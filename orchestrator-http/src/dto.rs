//! Request and response bodies of the API (the wire forms; core types are used as they serialize).
//!
//! Clients (the CLI, tests) may use these types directly: they derive both `Serialize` and `Deserialize`.

use chrono::{DateTime, Utc};
use orchestrator_core::agent::Assignment;
use orchestrator_core::domain::*;
use orchestrator_core::ids::*;
use orchestrator_core::state::WorkItemState;
use orchestrator_core::store::{
    CompletionResult, DecisionOutcome, NewInfoRequest, ReapedRun, TickReport, WorkItemChanged, WorkItemCreated,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A page of a list: `{"items": [...], "next": "<id>" | null}`. Pass `next` as `?after=` for the next
/// page; it is `null` when this page was the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListPage<T> {
    /// The items.
    pub items: Vec<T>,
    /// Cursor of the next page.
    pub next: Option<String>,
}

impl<T> ListPage<T> {
    pub(crate) fn new(items: Vec<T>, limit: usize, id: impl Fn(&T) -> Uuid) -> Self {
        let next = if items.len() >= limit { items.last().map(|t| id(t).to_string()) } else { None };
        ListPage { items, next }
    }

    pub(crate) fn all(items: Vec<T>) -> Self {
        ListPage { items, next: None }
    }
}

/// A page of a sequence (logs, step events): `{"items": [...], "next": <seq>}`; pass `next` as `?after=`
/// to read what follows (it equals `after` when nothing new was there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqPage<T> {
    /// The entries, in sequence order.
    pub items: Vec<T>,
    /// The last sequence number read.
    pub next: u64,
}

/// `POST /projects`: the facade's input as it is.
pub use orchestrator_core::orchestrator::CreateProject;

/// `PATCH /projects/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateProject {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
    /// New repository; `null` removes it, absent keeps it.
    #[serde(default, deserialize_with = "present")]
    pub repository: Option<Option<Repository>>,
}

/// Deserializes a field that is present (even as `null`) to `Some(..)`; with `#[serde(default)]` an
/// absent one stays `None`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `PUT /projects/{id}/vision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutVision {
    /// The vision text.
    pub text: String,
    /// Author (default: the caller's token name).
    #[serde(default)]
    pub author: Option<String>,
}

/// `POST /projects/{id}/requirements`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposeRequirements {
    /// Title of the proposal (default: the single requirement's title, or "N requirements").
    #[serde(default)]
    pub title: Option<String>,
    /// The requirements.
    pub requirements: Vec<RequirementSpec>,
    /// Who proposes (default: the caller's token name).
    #[serde(default)]
    pub author: Option<String>,
}

/// Answer of `POST /projects/{id}/requirements` (201).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftCreated {
    /// The draft.
    pub draft: RequirementsDraft,
    /// Its pending approval request (under the approval policy).
    pub approval: Option<ApprovalRequest>,
}

/// Body of approve/reject routes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    /// Who decides (default: the caller's token name).
    #[serde(default)]
    pub by: Option<String>,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Answer of approve/reject routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionResult {
    /// The decided approval request, when one existed.
    pub approval: Option<ApprovalRequest>,
    /// The decided draft, when the subject was a draft.
    pub draft: Option<RequirementsDraft>,
    /// Work items created (draft approved) or changed (work item decided).
    pub work_items: Vec<WorkItem>,
}

impl From<DecisionOutcome> for DecisionResult {
    fn from(d: DecisionOutcome) -> Self {
        DecisionResult { approval: d.approval, draft: d.draft, work_items: d.work_items }
    }
}

/// One created work item (answer of `POST /work-items`: 201 when created, 200 when an existing item
/// matched the idempotency key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItemCreatedBody {
    /// The item.
    pub work_item: WorkItem,
    /// False when an existing item with the same idempotency key was returned.
    pub created: bool,
    /// The approval request created with it.
    pub approval: Option<ApprovalRequest>,
}

impl From<WorkItemCreated> for WorkItemCreatedBody {
    fn from(c: WorkItemCreated) -> Self {
        WorkItemCreatedBody { work_item: c.work_item, created: c.created, approval: c.approval }
    }
}

/// Answer of a batch `POST /work-items` (`{"items": [CreateWorkItem, ...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItemsCreated {
    /// One result per item, in order.
    pub items: Vec<WorkItemCreatedBody>,
}

/// Answer of `PATCH /work-items/{id}`, `POST /work-items/{id}/submit` and `PUT /work-items/{id}/recipe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItemChangedBody {
    /// The item after the change.
    pub work_item: WorkItem,
    /// A new approval request, when the change needs one.
    pub approval: Option<ApprovalRequest>,
}

impl From<WorkItemChanged> for WorkItemChangedBody {
    fn from(c: WorkItemChanged) -> Self {
        WorkItemChangedBody { work_item: c.work_item, approval: c.approval }
    }
}

/// Body of cancel routes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `PUT /work-items/{id}/recipe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRecipe {
    /// The recipe.
    pub recipe_id: RecipeId,
}

/// JSON form of `POST /recipes` and `POST /recipes/validate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeSource {
    /// The YAML text.
    pub yaml: String,
    /// Optional owning project.
    #[serde(default)]
    pub project_id: Option<ProjectId>,
}

/// One enqueue (`POST /scheduler/enqueue`, alone or in `{"items": [...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueItem {
    /// The work item (state `ready`).
    pub work_item_id: WorkItemId,
    /// New priority.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Work items that must succeed first.
    #[serde(default)]
    pub depends_on: Vec<WorkItemId>,
    /// Not claimable before.
    #[serde(default)]
    pub not_before: Option<DateTime<Utc>>,
}

/// Answer of a batch `POST /scheduler/enqueue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enqueued {
    /// The scheduled tasks, in order.
    pub items: Vec<ScheduledTask>,
}

/// A run reaped or expired by a tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReapedRunBody {
    /// The run.
    pub run_id: RunId,
    /// Its work item.
    pub work_item_id: WorkItemId,
    /// The work item's new state.
    pub work_item_state: WorkItemState,
    /// Next attempt time when retrying.
    pub retry_at: Option<DateTime<Utc>>,
}

impl From<ReapedRun> for ReapedRunBody {
    fn from(r: ReapedRun) -> Self {
        ReapedRunBody {
            run_id: r.run_id,
            work_item_id: r.work_item_id,
            work_item_state: r.work_item_state,
            retry_at: r.retry_at,
        }
    }
}

/// Answer of `POST /scheduler/tick`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TickReportBody {
    /// Retrying items promoted to queued.
    pub promoted: Vec<WorkItemId>,
    /// Runs whose lease expired.
    pub reaped: Vec<ReapedRunBody>,
    /// Runs failed by an info-request deadline.
    pub expired: Vec<ReapedRunBody>,
}

impl From<TickReport> for TickReportBody {
    fn from(t: TickReport) -> Self {
        TickReportBody {
            promoted: t.promoted,
            reaped: t.reaped.into_iter().map(Into::into).collect(),
            expired: t.expired.into_iter().map(Into::into).collect(),
        }
    }
}

/// An info request as the API shows it: `answer` is set only for admins and the asking run's agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoRequestView {
    /// The request.
    #[serde(flatten)]
    pub request: InfoRequest,
    /// The decrypted answer, for those allowed to read it.
    #[serde(default)]
    pub answer: Option<String>,
}

/// `POST /info-requests/{id}/answer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    /// The answer.
    pub value: String,
    /// Who answers (default: the caller's token name).
    #[serde(default)]
    pub answered_by: Option<String>,
}

/// Answer of `POST /info-requests/{id}/answer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoAnsweredBody {
    /// The request after the answer.
    pub info_request: InfoRequestView,
    /// True when it was the run's last open question and the work item is claimable again.
    pub resumed: bool,
}

// ---- agent protocol ----

/// `POST /agents/claim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimBody {
    /// The agent id (for agent tokens: the token name, which is the default).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Capabilities.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// At most this many runs (default 1).
    #[serde(default = "one")]
    pub max: u32,
    /// Lease duration in seconds.
    #[serde(default)]
    pub lease_ttl_seconds: Option<u64>,
    /// Long poll: wait up to this long (capped at 30000) for work when none is claimable.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

/// Answer of `POST /agents/claim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// The claimed runs.
    pub assignments: Vec<Assignment>,
}

/// Answer of `GET /agents/work`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkGeneration {
    /// The current wake-up generation.
    pub generation: u64,
    /// True when the generation changed while waiting.
    pub woken: bool,
}

/// `POST /runs/{id}/heartbeat` and `POST /runs/{id}/start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    /// The fencing token.
    pub token: u64,
}

/// `POST /runs/{id}/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordResult {
    /// The fencing token.
    pub token: u64,
    /// What the run changed.
    pub result: RunResult,
    /// The patch (unified diff), cut to size.
    #[serde(default)]
    pub patch: String,
}

/// A run the agent holds, in `POST /agents/cancellations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldRun {
    /// The run.
    pub run_id: RunId,
    /// The fencing token the agent holds it with.
    pub token: u64,
}

/// `POST /agents/cancellations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancellationsBody {
    /// The runs the agent holds.
    pub runs: Vec<HeldRun>,
    /// Longest wait in milliseconds (capped at 30000; default 0: answer at once).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Answer of `POST /agents/cancellations`: the runs no longer held with their token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancellations {
    /// Cancelled, reclaimed, expired or finished runs among those asked about.
    pub runs: Vec<RunId>,
}

/// Answer of `GET /runs/{id}/result`: the result without its patch (see `GET /runs/{id}/diff`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResultView {
    /// The run.
    pub run_id: RunId,
    /// When it was recorded.
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    /// Size of the stored patch in bytes.
    pub patch_bytes: u64,
    /// What the run changed.
    #[serde(flatten)]
    pub result: RunResult,
}

/// `POST /runs/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppendLogs {
    /// The fencing token.
    pub token: u64,
    /// Lines, in order.
    pub lines: Vec<NewLogLine>,
}

/// Answer of `POST /runs/{id}/logs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsAppended {
    /// The sequence number of the last line.
    pub last_seq: u64,
}

/// `POST /runs/{id}/steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordSteps {
    /// The fencing token.
    pub token: u64,
    /// Events, in order.
    pub events: Vec<NewStepEvent>,
}

/// Answer of `POST /runs/{id}/steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepsRecorded {
    /// The stored events.
    pub events: Vec<StepEvent>,
}

/// `POST /runs/{id}/info-requests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AskBody {
    /// The fencing token.
    pub token: u64,
    /// The questions.
    pub questions: Vec<NewInfoRequest>,
    /// The run's usage so far, recorded on it.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// `POST /runs/{id}/release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseBody {
    /// The fencing token.
    pub token: u64,
    /// The run's usage so far, recorded on it.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// Answer of `POST /runs/{id}/info-requests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Asked {
    /// The created requests.
    pub info_requests: Vec<InfoRequest>,
}

/// `POST /runs/{id}/complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteBody {
    /// The fencing token.
    pub token: u64,
    /// How the run ended.
    pub outcome: RunOutcome,
    /// Usage.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// Answer of `POST /runs/{id}/complete` (the serde form of `CompletionResult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionBody {
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

impl From<CompletionResult> for CompletionBody {
    fn from(c: CompletionResult) -> Self {
        CompletionBody {
            run: c.run,
            work_item_state: c.work_item_state,
            retry_at: c.retry_at,
            released: c.released,
            blocked: c.blocked,
        }
    }
}

impl From<CompletionBody> for CompletionResult {
    fn from(c: CompletionBody) -> Self {
        CompletionResult {
            run: c.run,
            work_item_state: c.work_item_state,
            retry_at: c.retry_at,
            released: c.released,
            blocked: c.blocked,
        }
    }
}

/// Answer of `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: String,
}
