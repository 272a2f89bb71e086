//! The seams an agent is built from: [`AgentApi`] (talking to the orchestrator, in-process or over
//! HTTP), [`Planner`] (turning a work item into steps) and [`Executor`] (running them).

use crate::domain::*;
use crate::error::Error;
use crate::ids::RunId;
use crate::recipe::{RecipeSpec, StepSpec};
use crate::retry::FailureKind;
use crate::store::{ClaimedRun, CompletionResult, NewInfoRequest};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// What an agent asks for when it claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// The agent's id (stable across restarts is best).
    pub agent_id: String,
    /// Its capabilities (matched against work item labels).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// At most this many runs (its free slots).
    pub max: u32,
    /// Lease duration in seconds (`None`: the orchestrator's default).
    #[serde(default)]
    pub lease_ttl_seconds: Option<u64>,
}

/// An answer delivered to the run that asked.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerValue {
    /// The answer text.
    pub value: String,
    /// Whether it is secret (must never be logged).
    pub secret: bool,
}

impl std::fmt::Debug for AnswerValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = if self.secret { "<redacted>" } else { self.value.as_str() };
        f.debug_struct("AnswerValue").field("value", &shown).field("secret", &self.secret).finish()
    }
}

/// A claimed run with everything the agent needs to execute it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The run, its lease and work item.
    #[serde(flatten)]
    pub claimed: ClaimedRun,
    /// The work item's recipe, if any.
    pub recipe: Option<RecipeSpec>,
    /// Answers to the run's info requests, by key (on resumed runs).
    pub answers: BTreeMap<String, AnswerValue>,
    /// The project's repository, when it has one: the run works on a checkout of it.
    #[serde(default)]
    pub repository: Option<Repository>,
}

impl Assignment {
    /// The run id.
    pub fn run_id(&self) -> RunId {
        self.claimed.run.id
    }
    /// The fencing token.
    pub fn token(&self) -> u64 {
        self.claimed.lease.token
    }
}

/// What an agent needs from the orchestrator. Implemented in-process by [`crate::Orchestrator`] and over
/// HTTP by the client in `orchestrator-agent`; the same agent code runs with either.
#[async_trait]
pub trait AgentApi: Send + Sync {
    /// Claims up to `req.max` runs.
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Assignment>, Error>;
    /// The current wake-up generation: read it before claiming, then pass it to
    /// [`AgentApi::wait_for_work`] so a wake-up sent in between is not missed.
    async fn work_generation(&self) -> u64;
    /// Waits until the wake-up generation differs from `seen` (work may have become ready) or `timeout`
    /// passes; true when woken.
    async fn wait_for_work(&self, seen: u64, timeout: Duration) -> bool;
    /// Renews the lease (heartbeat); `LeaseLost` means stop working on the run.
    async fn heartbeat(&self, run_id: RunId, token: u64) -> Result<Lease, Error>;
    /// Marks the run as started.
    async fn start(&self, run_id: RunId, token: u64) -> Result<Run, Error>;
    /// Appends log lines; returns the last sequence number.
    async fn append_logs(&self, run_id: RunId, token: u64, lines: Vec<NewLogLine>) -> Result<u64, Error>;
    /// Records step events.
    async fn record_steps(&self, run_id: RunId, token: u64, events: Vec<NewStepEvent>)
        -> Result<Vec<StepEvent>, Error>;
    /// Asks humans for input; the run then waits without holding a lease.
    async fn ask(&self, run_id: RunId, token: u64, questions: Vec<NewInfoRequest>) -> Result<Vec<InfoRequest>, Error>;
    /// [`AgentApi::ask`], recording the run's usage so far (a codex turn that ended in a question). The
    /// default drops the usage.
    async fn ask_with_usage(
        &self,
        run_id: RunId,
        token: u64,
        questions: Vec<NewInfoRequest>,
        usage: Option<Usage>,
    ) -> Result<Vec<InfoRequest>, Error> {
        let _ = usage;
        self.ask(run_id, token, questions).await
    }
    /// Completes the run.
    async fn complete(
        &self,
        run_id: RunId,
        token: u64,
        outcome: RunOutcome,
        usage: Option<Usage>,
    ) -> Result<CompletionResult, Error>;
    /// Hands the run back without using up an attempt (a graceful stop): it is claimable at once and the
    /// next claim resumes it.
    async fn release(&self, run_id: RunId, token: u64) -> Result<Run, Error>;
    /// [`AgentApi::release`], recording the run's usage so far. The default drops the usage.
    async fn release_with_usage(&self, run_id: RunId, token: u64, usage: Option<Usage>) -> Result<Run, Error> {
        let _ = usage;
        self.release(run_id, token).await
    }
    /// Records what the run changed in its repository (branch, commits, diff stats) and its patch.
    async fn record_result(&self, run_id: RunId, token: u64, result: RunResult, patch: String) -> Result<(), Error>;
    /// Waits until one of `held` (run id, fencing token) is no longer held by that token (cancelled,
    /// reclaimed, expired, finished) or `timeout` passes; returns those runs (empty on timeout).
    async fn wait_for_cancellations(&self, held: Vec<(RunId, u64)>, timeout: Duration) -> Result<Vec<RunId>, Error>;
}

/// Input to a [`Planner`].
#[derive(Debug, Clone)]
pub struct PlanContext {
    /// The work item.
    pub work_item: WorkItem,
    /// Its recipe, if any.
    pub recipe: Option<RecipeSpec>,
    /// The run's workspace, where a planner that runs a command runs it (`None`: a directory of its own).
    pub workspace: Option<PathBuf>,
}

/// Why a planner produced no plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{planner}: {message}")]
pub struct PlanError {
    /// The planner.
    pub planner: String,
    /// What went wrong.
    pub message: String,
}

/// Turns a work item into steps. A planner that has nothing to say returns `Ok(None)`; one that failed
/// returns `Err`; either way the next planner in the chain is asked.
#[async_trait]
pub trait Planner: Send + Sync {
    /// Name recorded in the plan's step event.
    fn name(&self) -> &str;
    /// Plans the steps.
    async fn plan(&self, ctx: &PlanContext) -> Result<Option<Vec<StepSpec>>, PlanError>;
    /// Plans the steps and says what the planning cost (LLM planners); the default calls
    /// [`Planner::plan`] and reports nothing.
    async fn plan_with_usage(&self, ctx: &PlanContext) -> Result<(Option<Vec<StepSpec>>, Option<Usage>), PlanError> {
        self.plan(ctx).await.map(|s| (s, None))
    }
}

/// The plan a chain produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The planner that produced it.
    pub planner: String,
    /// The steps (at least one).
    pub steps: Vec<StepSpec>,
    /// Planners that were tried before and why they fell through.
    pub fallbacks: Vec<PlanError>,
    /// What planning cost (the tokens of every LLM planner asked, the ones that fell through too).
    pub usage: Option<Usage>,
}

/// Asks each planner in order and returns the first non-empty plan.
pub async fn plan_with_chain(planners: &[Box<dyn Planner>], ctx: &PlanContext) -> Result<Plan, Vec<PlanError>> {
    let mut fallbacks = Vec::new();
    let mut usage: Option<Usage> = None;
    for p in planners {
        match p.plan_with_usage(ctx).await {
            Ok((steps, u)) => {
                if let Some(u) = u {
                    usage = Some(usage.map_or(u.clone(), |t| t.plus(&u)));
                }
                match steps {
                    Some(steps) if !steps.is_empty() => {
                        return Ok(Plan { planner: p.name().to_string(), steps, fallbacks, usage });
                    }
                    _ => fallbacks.push(PlanError { planner: p.name().to_string(), message: "no plan".into() }),
                }
            }
            Err(e) => fallbacks.push(e),
        }
    }
    Err(fallbacks)
}

/// A cooperative cancellation signal (cheap to clone).
#[derive(Debug, Clone)]
pub struct Cancellation {
    rx: tokio::sync::watch::Receiver<bool>,
}

/// The sending half of a [`Cancellation`].
#[derive(Debug)]
pub struct CancelHandle {
    tx: tokio::sync::watch::Sender<bool>,
}

impl Cancellation {
    /// A new signal and its handle.
    pub fn new() -> (CancelHandle, Cancellation) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (CancelHandle { tx }, Cancellation { rx })
    }
    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }
    /// Resolves when cancellation is requested (or the handle is dropped).
    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl CancelHandle {
    /// Requests cancellation.
    pub fn cancel(&self) {
        let _ = self.tx.send(true);
    }
}

/// What an executor gets to run.
#[derive(Debug, Clone)]
pub struct ExecutionContext {
    /// The assignment (run, lease, work item, recipe, answers).
    pub assignment: Assignment,
    /// The planned steps.
    pub steps: Vec<StepSpec>,
    /// Index of the first step to run (after the last completed one on resume).
    pub start_step: u32,
    /// The run's workspace directory (a checkout of the project's repository on the work item's branch,
    /// when the project has one).
    pub workspace: PathBuf,
    /// The checkout, when the workspace is one.
    pub checkout: Option<Checkout>,
    /// A directory of the run's own outside the workspace, for files an executor keeps beside it
    /// (codex's last message and output schema): never part of the diff.
    pub scratch: PathBuf,
    /// Cancellation (lease lost, run cancelled, shutdown).
    pub cancel: Cancellation,
}

/// The git checkout a run works in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The repository's URL.
    pub url: String,
    /// The branch work started from (`main`).
    pub base_branch: String,
    /// The work item's branch (`orch/<work item id>`).
    pub branch: String,
    /// The commit the run starts from.
    pub start_commit: String,
}

/// Where an executor reports output and progress.
#[async_trait]
pub trait ExecutionSink: Send + Sync {
    /// A line of output.
    async fn log(&self, stream: LogStream, line: String);
    /// A step event.
    async fn step_event(&self, event: NewStepEvent);
    /// Usage so far (replaces the previous report).
    async fn usage(&self, usage: Usage);
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutionOutcome {
    /// Every step succeeded.
    Succeeded {
        /// Exit code of the last step.
        exit_code: Option<i32>,
    },
    /// A step failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Exit code, when a process exited.
        exit_code: Option<i32>,
        /// Retryable or permanent.
        kind: FailureKind,
    },
    /// Input from a human is needed before going on.
    NeedsInput {
        /// The questions.
        questions: Vec<NewInfoRequest>,
    },
    /// Stopped by cancellation.
    Cancelled,
}

/// Runs the steps of a work item. Implementations live in `orchestrator-agent` (shell, codex) or in the
/// host program.
#[async_trait]
pub trait Executor: Send + Sync {
    /// Name used for selection (`AGENT_EXECUTOR`) and in step events.
    fn name(&self) -> &str;
    /// Whether it plans the work itself (codex): the agent then spends no planning call on it, and hands
    /// it the recipe's steps when the work item has a recipe (and no steps otherwise).
    fn plans_itself(&self) -> bool {
        false
    }
    /// Executes, streaming through `sink`, honouring `ctx.cancel` and step timeouts.
    async fn execute(&self, ctx: ExecutionContext, sink: &dyn ExecutionSink) -> ExecutionOutcome;
}
