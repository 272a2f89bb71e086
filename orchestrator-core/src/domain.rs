//! The domain: the nine entities of the orchestrator and their value types.
//!
//! Every type serializes to snake_case JSON that the HTTP layer exposes as it is. Timestamps are
//! RFC 3339 UTC strings; ids are UUID v7 strings.

use crate::crypto::SealedValue;
use crate::ids::*;
use crate::recipe::{InputKind, RecipeSpec};
use crate::retry::{FailureKind, RetryOverrides};
use crate::state::{ApprovalState, DraftState, RunState, WorkItemState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A project: the unit that owns a vision, requirements and work items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// Id.
    pub id: ProjectId,
    /// Short name (1..=200 characters).
    pub name: String,
    /// Free text.
    pub description: String,
    /// The git repository agents work on, if any (without one, runs get an empty directory).
    #[serde(default)]
    pub repository: Option<Repository>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A project's git repository: where agents check out their work and push their branches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// A local path, or a `file://`, `https://`, `http://`, `ssh://` or scp-like (`git@host:path`) URL.
    pub url: String,
    /// The branch work items start from; `None`: the remote's default branch (its `HEAD`).
    #[serde(default)]
    pub base_branch: Option<String>,
}

/// One version of a project's vision: what the project should become.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vision {
    /// The project.
    pub project_id: ProjectId,
    /// 1 for the first version, then increasing by one per `put`.
    pub version: u32,
    /// The vision text.
    pub text: String,
    /// Who wrote this version, when known.
    pub author: Option<String>,
    /// When this version was written.
    pub created_at: DateTime<Utc>,
}

/// One requirement of a draft: it becomes one work item when the draft is approved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequirementSpec {
    /// Title of the work item to create.
    pub title: String,
    /// Description of the work item to create.
    #[serde(default)]
    pub description: String,
    /// Capabilities an agent needs to take it.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Priority (higher runs first).
    #[serde(default)]
    pub priority: i32,
    /// Optional tool recipe.
    #[serde(default)]
    pub recipe_id: Option<RecipeId>,
}

/// Requirements proposed for a project; approving the draft creates its work items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequirementsDraft {
    /// Id.
    pub id: DraftId,
    /// The project.
    pub project_id: ProjectId,
    /// Short title of the proposal.
    pub title: String,
    /// The proposed requirements.
    pub requirements: Vec<RequirementSpec>,
    /// State.
    pub state: DraftState,
    /// Hash of the proposal's content (what an approval is bound to).
    pub content_hash: String,
    /// Who proposed it.
    pub proposed_by: Option<String>,
    /// The work items created on approval (empty before).
    pub work_item_ids: Vec<WorkItemId>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it was approved or rejected.
    pub decided_at: Option<DateTime<Utc>>,
}

/// A unit of work for an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    /// Id.
    pub id: WorkItemId,
    /// The project.
    pub project_id: ProjectId,
    /// Title (1..=500 characters).
    pub title: String,
    /// Description.
    pub description: String,
    /// Optional tool recipe telling the agent what to run.
    pub recipe_id: Option<RecipeId>,
    /// Capabilities an agent must have to claim it.
    pub labels: Vec<String>,
    /// State.
    pub state: WorkItemState,
    /// Priority: higher is claimed first.
    pub priority: i32,
    /// Work items that must succeed before this one may run.
    pub dependencies: Vec<WorkItemId>,
    /// Per-item retry policy overrides.
    pub retry: RetryOverrides,
    /// Caller-chosen key that makes creation idempotent.
    pub idempotency_key: Option<String>,
    /// Hash of the editable content (title, description, recipe, labels); approvals bind to it.
    pub content_hash: String,
    /// The latest approval request for this item, if any.
    pub approval_id: Option<ApprovalId>,
    /// The requirements draft it came from, if any.
    pub draft_id: Option<DraftId>,
    /// Why it is blocked (state `blocked`).
    pub blocked_reason: Option<String>,
    /// Number of attempts started (runs created, not counting resumes).
    pub attempts: u32,
    /// The current or latest run.
    pub current_run_id: Option<RunId>,
    /// Not claimable before this time (not-before or next retry).
    pub run_at: Option<DateTime<Utc>>,
    /// The last failure message.
    pub last_error: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When it was (last) enqueued.
    pub enqueued_at: Option<DateTime<Utc>>,
}

/// The editable content of a work item, hashed for approvals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkItemContent<'a> {
    /// Title.
    pub title: &'a str,
    /// Description.
    pub description: &'a str,
    /// Recipe.
    pub recipe_id: Option<RecipeId>,
    /// Labels.
    pub labels: &'a [String],
}

impl WorkItemContent<'_> {
    /// A stable SHA-256 hex digest of the content.
    pub fn hash(&self) -> String {
        content_hash(self)
    }
}

impl WorkItem {
    /// The content hash computed from the current fields.
    pub fn compute_content_hash(&self) -> String {
        WorkItemContent {
            title: &self.title,
            description: &self.description,
            recipe_id: self.recipe_id,
            labels: &self.labels,
        }
        .hash()
    }

    /// The scheduler's view of this item.
    pub fn scheduled_task(&self, pending_dependencies: u32) -> ScheduledTask {
        ScheduledTask {
            work_item_id: self.id,
            project_id: self.project_id,
            state: self.state,
            priority: self.priority,
            dependencies: self.dependencies.clone(),
            pending_dependencies,
            attempts: self.attempts,
            run_at: self.run_at,
            enqueued_at: self.enqueued_at,
            blocked_reason: self.blocked_reason.clone(),
        }
    }
}

/// SHA-256 hex of the canonical JSON of `value` (serde_json keeps struct field order, so it is stable).
pub fn content_hash<T: Serialize + ?Sized>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// The scheduler's entry for an enqueued work item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledTask {
    /// The work item.
    pub work_item_id: WorkItemId,
    /// Its project.
    pub project_id: ProjectId,
    /// The work item's state.
    pub state: WorkItemState,
    /// Priority: higher first.
    pub priority: i32,
    /// Dependencies.
    pub dependencies: Vec<WorkItemId>,
    /// How many dependencies have not succeeded yet.
    pub pending_dependencies: u32,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before / next attempt time.
    pub run_at: Option<DateTime<Utc>>,
    /// When enqueued.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// Why it is blocked.
    pub blocked_reason: Option<String>,
}

/// Token and cost usage reported by an executor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Input tokens.
    pub input_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cost in US dollars, when known.
    pub cost_usd: Option<f64>,
}

impl Usage {
    /// The sum of two usages (costs add when both are known).
    pub fn plus(&self, o: &Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens + o.input_tokens,
            cached_input_tokens: self.cached_input_tokens + o.cached_input_tokens,
            output_tokens: self.output_tokens + o.output_tokens,
            cost_usd: match (self.cost_usd, o.cost_usd) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            },
        }
    }
}

/// A lease on a run: whoever holds the token may write for the run until `expires_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The run.
    pub run_id: RunId,
    /// Fencing token: increases with every claim of the run; writes must carry the current one.
    pub token: u64,
    /// When the lease expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// One attempt at a work item by one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Id.
    pub id: RunId,
    /// The work item.
    pub work_item_id: WorkItemId,
    /// Its project.
    pub project_id: ProjectId,
    /// 1-based attempt number of the work item.
    pub attempt: u32,
    /// The agent that holds (or last held) it.
    pub agent_id: String,
    /// State.
    pub state: RunState,
    /// The current fencing token (0 when never leased).
    pub lease_token: u64,
    /// Lease expiry while leased.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Last heartbeat.
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// When first claimed.
    pub claimed_at: DateTime<Utc>,
    /// When the agent started executing.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Exit code of the last command, when known.
    pub exit_code: Option<i32>,
    /// Failure message.
    pub error: Option<String>,
    /// Retryable or permanent, for failed runs.
    pub failure_kind: Option<FailureKind>,
    /// Usage reported by the executor.
    pub usage: Usage,
    /// Index of the last step that completed successfully (resume point).
    pub last_completed_step: Option<u32>,
}

/// What an approval decides about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum ApprovalSubject {
    /// A requirements draft.
    RequirementsDraft(DraftId),
    /// A work item.
    WorkItem(WorkItemId),
}

/// A human gate on a requirements draft or a work item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// Id.
    pub id: ApprovalId,
    /// The project.
    pub project_id: ProjectId,
    /// What is being approved.
    pub subject: ApprovalSubject,
    /// Hash of the subject's content when requested; the approval is valid only for it.
    pub content_hash: String,
    /// State.
    pub state: ApprovalState,
    /// When requested.
    pub requested_at: DateTime<Utc>,
    /// Who decided.
    pub decided_by: Option<String>,
    /// When decided.
    pub decided_at: Option<DateTime<Utc>>,
    /// Why.
    pub reason: Option<String>,
}

/// A stored, validated YAML tool recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolRecipe {
    /// Id.
    pub id: RecipeId,
    /// Optional owning project.
    pub project_id: Option<ProjectId>,
    /// The recipe's name (from the YAML).
    pub name: String,
    /// The YAML source as submitted.
    pub yaml: String,
    /// The parsed recipe.
    pub spec: RecipeSpec,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// State of an info request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InfoRequestState {
    /// Waiting for an answer.
    Pending,
    /// Answered.
    Answered,
    /// Its run was cancelled before an answer came.
    Cancelled,
    /// Its deadline passed unanswered (its run failed).
    Expired,
}

impl InfoRequestState {
    /// The snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            InfoRequestState::Pending => "pending",
            InfoRequestState::Answered => "answered",
            InfoRequestState::Cancelled => "cancelled",
            InfoRequestState::Expired => "expired",
        }
    }
}

/// A question a run asks a human mid-run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoRequest {
    /// Id.
    pub id: InfoRequestId,
    /// The asking run.
    pub run_id: RunId,
    /// Its work item.
    pub work_item_id: WorkItemId,
    /// Its project.
    pub project_id: ProjectId,
    /// The key the answer is delivered under (e.g. an environment variable name).
    pub key: String,
    /// The question shown to the human.
    pub prompt: String,
    /// text, secret or choice.
    pub kind: InputKind,
    /// Allowed answers for `choice`.
    pub choices: Vec<String>,
    /// State.
    pub state: InfoRequestState,
    /// Optional deadline.
    pub deadline: Option<DateTime<Utc>>,
    /// When asked.
    pub created_at: DateTime<Utc>,
    /// When answered.
    pub answered_at: Option<DateTime<Utc>>,
    /// Who answered.
    pub answered_by: Option<String>,
    /// The stored (encrypted) answer. Never serialized: read it through the facade.
    #[serde(skip)]
    pub answer: Option<SealedValue>,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// The agent itself.
    System,
}

impl LogStream {
    /// The snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }
}

/// A log line to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewLogLine {
    /// Stream.
    pub stream: LogStream,
    /// Text (one line, without the newline).
    pub line: String,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The run.
    pub run_id: RunId,
    /// Per-run sequence number, from 1, without gaps.
    pub seq: u64,
    /// Stream.
    pub stream: LogStream,
    /// Text.
    pub line: String,
    /// When appended.
    pub at: DateTime<Utc>,
}

/// What a step event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepEventKind {
    /// A plan was made (detail holds the steps and the planner).
    Planned,
    /// A step started.
    Started,
    /// A step finished successfully.
    Succeeded,
    /// A step failed.
    Failed,
    /// A step was skipped (e.g. completed before a resume).
    Skipped,
    /// Anything else worth recording (executor events).
    Info,
}

/// A step event to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewStepEvent {
    /// 0-based index of the step, when the event is about one.
    pub step_index: Option<u32>,
    /// Kind.
    pub kind: StepEventKind,
    /// Human-readable name (command, planner, event type).
    pub name: String,
    /// Structured detail.
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// A stored step event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    /// The run.
    pub run_id: RunId,
    /// Per-run sequence number, from 1, without gaps.
    pub seq: u64,
    /// 0-based step index.
    pub step_index: Option<u32>,
    /// Kind.
    pub kind: StepEventKind,
    /// Name.
    pub name: String,
    /// Detail.
    pub detail: serde_json::Value,
    /// When appended.
    pub at: DateTime<Utc>,
}

/// What a run changed in its project's repository: the branch, the commits and the diff's size. The
/// patch itself is read with [`crate::Store::run_result_get`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// The work item's branch (`orch/<work item id>` by default).
    pub branch: String,
    /// The commit the branch's changes are measured from (where it left the base branch).
    pub base_commit: String,
    /// The branch's head after the run.
    pub head_commit: String,
    /// The commit the run started from (the previous attempt's head on a retry).
    #[serde(default)]
    pub start_commit: Option<String>,
    /// Whether this run made a commit of its own.
    #[serde(default)]
    pub committed: bool,
    /// Whether the branch was pushed to the repository's remote.
    #[serde(default)]
    pub pushed: bool,
    /// Files changed between the base and the head.
    pub files_changed: u32,
    /// Lines added.
    pub insertions: u64,
    /// Lines removed.
    pub deletions: u64,
    /// The changed files' paths (at most 1,000).
    #[serde(default)]
    pub files: Vec<String>,
    /// Whether the stored patch was cut at the size limit.
    #[serde(default)]
    pub patch_truncated: bool,
}

/// How a run ended, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RunOutcome {
    /// Every step succeeded.
    Succeeded {
        /// Exit code of the last step.
        #[serde(default)]
        exit_code: Option<i32>,
    },
    /// A step failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Exit code, when a process exited.
        #[serde(default)]
        exit_code: Option<i32>,
        /// Retryable (default) or permanent.
        #[serde(default = "default_failure_kind")]
        kind: FailureKind,
    },
}

fn default_failure_kind() -> FailureKind {
    FailureKind::Retryable
}
