//! The [`Agent`]: the claim loop, one task per run (heartbeat, plan, ask, execute, stream, complete),
//! and a graceful shutdown.

use crate::codex::CodexExecutor;
use crate::config::{AgentConfig, ExecutorKind, KeepWorkspaces};
use crate::git::Workspaces;
use crate::planner::default_planners;
use crate::redact::Redactor;
use crate::shell::ShellExecutor;
use crate::sink::{is_lease_lost, is_transient, RunControl, RunSink, StopReason};
use orchestrator_core::agent::{
    plan_with_chain, AgentApi, Assignment, Cancellation, ClaimRequest, ExecutionContext, ExecutionOutcome,
    ExecutionSink, Executor, Plan, PlanContext, Planner,
};
use orchestrator_core::domain::{NewStepEvent, RunOutcome, StepEventKind, Usage};
use orchestrator_core::recipe::InputKind;
use orchestrator_core::retry::FailureKind;
use orchestrator_core::store::NewInfoRequest;
use orchestrator_core::Error;
use serde_json::json;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The workspace root cannot be created.
    #[error("cannot create the workspace root {path}: {source}")]
    Workspace {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// What the agent did before it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// Runs claimed (including resumed ones).
    pub claimed: u64,
    /// Runs completed as succeeded.
    pub succeeded: u64,
    /// Runs completed as failed.
    pub failed: u64,
    /// Runs that asked questions and now wait for answers.
    pub waiting_input: u64,
    /// Runs whose lease was lost (cancelled, expired or reclaimed): nothing more was written for them.
    pub lost: u64,
    /// Runs released at shutdown (failed as retryable so another agent takes them).
    pub released: u64,
    /// Runs whose end could not be reported (the orchestrator was unreachable).
    pub errors: u64,
}

/// How one run ended for this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunEnd {
    Succeeded,
    Failed,
    WaitingInput,
    Lost,
    Released,
    Error,
}

impl AgentReport {
    fn add(&mut self, end: RunEnd) {
        match end {
            RunEnd::Succeeded => self.succeeded += 1,
            RunEnd::Failed => self.failed += 1,
            RunEnd::WaitingInput => self.waiting_input += 1,
            RunEnd::Lost => self.lost += 1,
            RunEnd::Released => self.released += 1,
            RunEnd::Error => self.errors += 1,
        }
    }
}

/// The agent: claims runs as slots free up, plans, asks for missing inputs, executes and completes.
/// The same code runs embedded (over [`orchestrator_core::Orchestrator`]) or remote (over
/// [`crate::HttpAgentApi`]).
pub struct Agent {
    api: Arc<dyn AgentApi>,
    config: AgentConfig,
    executor: Option<Arc<dyn Executor>>,
    planners: Option<Vec<Box<dyn Planner>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("config", &self.config).finish_non_exhaustive()
    }
}

struct Shared {
    api: Arc<dyn AgentApi>,
    config: AgentConfig,
    executor: Arc<dyn Executor>,
    planners: Vec<Box<dyn Planner>>,
    /// Cancelled when the shutdown grace period is over.
    kill: Cancellation,
    /// Repository mirrors and work item worktrees.
    workspaces: Workspaces,
    /// The runs this agent works on, watched for cancellations.
    held: HeldRuns,
}

/// The runs an agent holds (id, token, control), for the cancellation watcher.
#[derive(Default)]
struct HeldRuns {
    runs: std::sync::Mutex<std::collections::HashMap<orchestrator_core::ids::RunId, (u64, Arc<RunControl>)>>,
    changed: tokio::sync::Notify,
}

impl HeldRuns {
    fn add(&self, c: &Arc<RunControl>) {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(c.run_id, (c.token, c.clone()));
        self.changed.notify_one();
    }
    fn remove(&self, id: orchestrator_core::ids::RunId) {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
    fn snapshot(&self) -> Vec<(orchestrator_core::ids::RunId, u64)> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(id, (t, _))| (*id, *t)).collect()
    }
    fn stop(&self, id: orchestrator_core::ids::RunId) {
        let c = self.runs.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|(_, c)| c.clone());
        if let Some(c) = c {
            tracing::warn!(run_id = %id, "the run is no longer this agent's (cancelled, requeued or reclaimed); stopping it");
            c.stop(StopReason::LeaseLost);
        }
    }
}

/// Watches the held runs: a run cancelled (or requeued, or reclaimed) on the server is stopped at once
/// (its processes killed) instead of at its next heartbeat.
async fn cancellation_watcher(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let held = shared.held.snapshot();
        if held.is_empty() {
            shared.held.changed.notified().await;
            continue;
        }
        tokio::select! {
            r = shared.api.wait_for_cancellations(held, Duration::from_secs(25)) => match r {
                Ok(gone) => {
                    backoff = Duration::from_millis(200);
                    for id in gone {
                        shared.held.stop(id);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch for cancellations; retrying");
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            },
            // A run was added: ask again with it.
            _ = shared.held.changed.notified() => {}
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Creates the workspace root as a private directory (0700) of this user: an existing directory is made
/// private too, which fails when another user owns it.
fn private_root(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    let me = nix::unistd::getuid().as_raw();
    if meta.uid() != me {
        return Err(std::io::Error::other(format!(
            "owned by uid {}, not by this agent's user (uid {me}): another user may have created it",
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn jittered(d: Duration) -> Duration {
    // 80% to 120% of the interval, so a fleet of agents does not poll in lockstep.
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

impl Agent {
    /// An agent over `api` with `config`; the executor is chosen by `config.executor` unless
    /// [`Agent::with_executor`] sets one.
    pub fn new(api: Arc<dyn AgentApi>, config: AgentConfig) -> Agent {
        Agent { api, config, executor: None, planners: None }
    }

    /// Uses a custom executor (a host program's own implementation of the core `Executor` trait).
    pub fn with_executor(mut self, executor: Arc<dyn Executor>) -> Agent {
        self.executor = Some(executor);
        self
    }

    /// Replaces the planner chain (default: [`default_planners`] for the config).
    pub fn with_planners(mut self, planners: Vec<Box<dyn Planner>>) -> Agent {
        self.planners = Some(planners);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Runs until `shutdown` resolves; then stops claiming, lets running work go on for the grace
    /// period, cancels what is left and releases it (failed as retryable, so another agent retries it).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<AgentReport, AgentError> {
        let config = self.config;
        private_root(&config.workspace_root)
            .map_err(|source| AgentError::Workspace { path: config.workspace_root.clone(), source })?;
        // A step runs as the agent's user: it must not read the agent's memory or environment
        // (`/proc/<agent>/environ` holds its tokens and, embedded in the server, the encryption key).
        #[cfg(target_os = "linux")]
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %e, "cannot make the agent process non-dumpable");
        }
        let executor: Arc<dyn Executor> = match self.executor {
            Some(e) => e,
            None => match config.executor {
                ExecutorKind::Shell => Arc::new(
                    ShellExecutor::new(config.step_timeout, config.kill_grace)
                        .with_env_passthrough(config.env_passthrough.clone()),
                ),
                ExecutorKind::Codex => Arc::new(CodexExecutor::from_config(&config)),
            },
        };
        let planners = self.planners.unwrap_or_else(|| default_planners(&config));
        let (kill_handle, kill) = Cancellation::new();
        let workspaces =
            Workspaces::new(config.workspace_root.clone(), config.git.clone(), config.env_passthrough.clone());
        let shared =
            Arc::new(Shared { api: self.api, config, executor, planners, kill, workspaces, held: HeldRuns::default() });
        let watcher = tokio::spawn(cancellation_watcher(shared.clone()));
        let _watcher = AbortOnDrop(watcher);
        let concurrency = shared.config.concurrency.max(1) as usize;
        tracing::info!(agent_id = %shared.config.agent_id, concurrency, executor = shared.executor.name(), "agent started");

        let mut report = AgentReport::default();
        let mut tasks: JoinSet<RunEnd> = JoinSet::new();
        let mut error_backoff = Duration::from_millis(100);
        tokio::pin!(shutdown);

        enum Wait {
            Again,
            Work(u64),
            Error(Duration),
            Full,
        }

        loop {
            while let Some(r) = tasks.try_join_next() {
                report.add(r.unwrap_or(RunEnd::Error));
            }
            let free = concurrency.saturating_sub(tasks.len());
            let wait = if free == 0 {
                Wait::Full
            } else {
                let generation = shared.api.work_generation().await;
                let req = ClaimRequest {
                    agent_id: shared.config.agent_id.clone(),
                    capabilities: shared.config.capabilities.clone(),
                    max: free as u32,
                    lease_ttl_seconds: shared.config.lease_ttl_seconds,
                };
                match shared.api.claim(req).await {
                    Ok(assignments) => {
                        error_backoff = Duration::from_millis(100);
                        let n = assignments.len();
                        for a in assignments {
                            report.claimed += 1;
                            // One trace per run: its calls to the server and the server's handling of
                            // them are children of this span.
                            let span = tracing::info_span!(
                                "run",
                                run_id = %a.run_id(),
                                work_item_id = %a.claimed.work_item.id,
                                attempt = a.claimed.run.attempt,
                                resumed = a.claimed.resumed,
                                agent_id = %shared.config.agent_id,
                            );
                            tasks.spawn(tracing::Instrument::instrument(run_one(shared.clone(), a), span));
                        }
                        if n > 0 {
                            Wait::Again
                        } else {
                            Wait::Work(generation)
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claim failed");
                        let d = error_backoff;
                        error_backoff = (error_backoff * 2).min(shared.config.poll_interval.max(error_backoff));
                        Wait::Error(jittered(d))
                    }
                }
            };
            if matches!(wait, Wait::Again) {
                continue;
            }
            let waiter = async {
                match wait {
                    Wait::Work(g) => {
                        shared.api.wait_for_work(g, jittered(shared.config.poll_interval)).await;
                    }
                    Wait::Error(d) => tokio::time::sleep(d).await,
                    Wait::Full | Wait::Again => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                // Shutdown first: once asked to stop, never claim again.
                biased;
                _ = &mut shutdown => break,
                Some(r) = tasks.join_next(), if !tasks.is_empty() => report.add(r.unwrap_or(RunEnd::Error)),
                _ = waiter => {}
            }
        }

        // Shutdown: no more claims; running work gets the grace period.
        tracing::info!(running = tasks.len(), "agent shutting down");
        let grace = tokio::time::sleep(shared.config.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                r = tasks.join_next() => match r {
                    Some(r) => report.add(r.unwrap_or(RunEnd::Error)),
                    None => break,
                },
                _ = &mut grace => {
                    tracing::warn!(running = tasks.len(), "grace period over; cancelling and releasing the remaining runs");
                    kill_handle.cancel();
                    break;
                }
            }
        }
        // Cancelled runs kill their processes and release themselves; give them a bounded time.
        let limit = tokio::time::sleep(shared.config.kill_grace + Duration::from_secs(30));
        tokio::pin!(limit);
        loop {
            tokio::select! {
                r = tasks.join_next() => match r {
                    Some(r) => report.add(r.unwrap_or(RunEnd::Error)),
                    None => break,
                },
                _ = &mut limit => {
                    report.errors += tasks.len() as u64;
                    tasks.abort_all();
                    break;
                }
            }
        }
        tracing::info!(?report, "agent stopped");
        Ok(report)
    }
}

/// Retries a call on transient errors (a few times, with backoff); stops early when the run is lost.
async fn with_retry<T, F, Fut>(control: &RunControl, mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if is_transient(&e) && attempt < 6 && !control.lost() => {
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// The heartbeat of one run: renews at a third of the lease TTL; a lost lease (or the shutdown kill)
/// cancels the run.
async fn heartbeat_loop(shared: Arc<Shared>, control: Arc<RunControl>, ttl: Duration) {
    let every = (ttl / 3).max(Duration::from_millis(50));
    let mut next = every;
    // When renewals keep failing (orchestrator unreachable), the lease runs out on the server's side and
    // the run may be handed to another agent: stop working on it then, rather than run it twice.
    let mut valid_until = tokio::time::Instant::now() + ttl;
    let mut killed = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shared.kill.cancelled(), if !killed => {
                // The run stops; the lease is still renewed while it commits, pushes and is released.
                killed = true;
                control.stop(StopReason::Shutdown);
                continue;
            }
        }
        let sent = tokio::time::Instant::now();
        match shared.api.heartbeat(control.run_id, control.token).await {
            Ok(_) => {
                next = every;
                valid_until = sent + ttl;
            }
            Err(e) if is_lease_lost(&e) => {
                tracing::warn!(run_id = %control.run_id, error = %e, "lease lost; stopping the run");
                control.stop(StopReason::LeaseLost);
                return;
            }
            Err(e) if tokio::time::Instant::now() >= valid_until => {
                tracing::warn!(run_id = %control.run_id, error = %e, "lease ran out without a renewal; stopping the run");
                control.stop(StopReason::LeaseLost);
                return;
            }
            Err(e) => {
                tracing::warn!(run_id = %control.run_id, error = %e, "heartbeat failed; retrying");
                next = (every / 4).max(Duration::from_millis(50));
            }
        }
    }
}

fn lease_ttl(shared: &Shared, a: &Assignment) -> Duration {
    if let Some(s) = shared.config.lease_ttl_seconds {
        return Duration::from_secs(s);
    }
    let run = &a.claimed.run;
    let from = run.heartbeat_at.unwrap_or(run.claimed_at);
    (a.claimed.lease.expires_at - from).to_std().ok().filter(|d| !d.is_zero()).unwrap_or(Duration::from_secs(60))
}

/// The questions for recipe inputs that have no answer and no default.
pub fn missing_inputs(a: &Assignment) -> Vec<NewInfoRequest> {
    let Some(recipe) = &a.recipe else {
        return Vec::new();
    };
    recipe
        .inputs
        .iter()
        .filter(|i| i.required && i.default.is_none() && !a.answers.contains_key(&i.name))
        .map(|i| NewInfoRequest {
            key: i.name.clone(),
            prompt: i.display_prompt().to_string(),
            kind: i.kind,
            choices: if i.kind == InputKind::Choice { i.choices.clone() } else { Vec::new() },
            deadline: None,
        })
        .collect()
}

async fn run_one(shared: Arc<Shared>, a: Assignment) -> RunEnd {
    let (handle, cancel) = Cancellation::new();
    let control = Arc::new(RunControl::new(a.run_id(), a.token(), handle));
    // Two runs of one work item on this agent (a requeue while the first is still being stopped) take
    // turns with its worktree: the later waits until the earlier has cleaned up.
    let _item = match &a.repository {
        Some(_) => Some(shared.workspaces.lock_item(a.claimed.work_item.id).await),
        None => None,
    };
    shared.held.add(&control);
    let end = run_held(&shared, &control, a, cancel).await;
    shared.held.remove(control.run_id);
    end
}

async fn run_held(shared: &Arc<Shared>, control: &Arc<RunControl>, a: Assignment, cancel: Cancellation) -> RunEnd {
    let control = control.clone();
    let shared = shared.clone();
    let redactor = Redactor::from_answers(&a.answers);
    let sink = Arc::new(RunSink::new(shared.api.clone(), control.clone(), redactor, shared.config.log_batch_lines));
    // Stopped when the run ends, and also when its task is dropped (the agent aborted): a lease is never
    // renewed for a run nobody works on.
    let heartbeat = AbortOnDrop(tokio::spawn(heartbeat_loop(shared.clone(), control.clone(), lease_ttl(&shared, &a))));
    let flusher = {
        let sink = sink.clone();
        let every = shared.config.log_flush_interval;
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                sink.flush().await;
            }
        }))
    };
    let repository = a.repository.clone();
    let workspace = match &repository {
        Some(_) => shared.workspaces.item_dir(a.claimed.work_item.id),
        None => shared.config.workspace_root.join(a.run_id().to_string()),
    };
    let scratch = shared.config.workspace_root.join("scratch").join(a.run_id().to_string());
    let end = drive(&shared, &control, &sink, a, cancel, &workspace, &scratch).await;
    drop(flusher);
    drop(heartbeat);
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    let keep = match shared.config.keep_workspaces {
        KeepWorkspaces::Always => true,
        KeepWorkspaces::Never => false,
        KeepWorkspaces::OnFailure => end != RunEnd::Succeeded,
    };
    if !keep {
        match &repository {
            // The branch keeps the work; the worktree goes.
            Some(r) if workspace.exists() => shared.workspaces.remove(&workspace, &r.url).await,
            Some(_) => {}
            None => {
                if let Err(e) = tokio::fs::remove_dir_all(&workspace).await {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %workspace.display(), error = %e, "cannot remove the workspace");
                    }
                }
            }
        }
    }
    end
}

/// Commits what the run changed, records the result (branch, commits, diff) and pushes when asked.
/// Returns an error message when the push failed (the run then fails with it).
async fn finish_checkout(
    shared: &Shared,
    control: &RunControl,
    sink: &RunSink,
    a: &Assignment,
    workspace: &std::path::Path,
    checkout: &orchestrator_core::agent::Checkout,
) -> Result<(), String> {
    let title = sink.redactor().redact(&a.claimed.work_item.title).into_owned();
    let message = format!(
        "{title}\n\nRun {} (attempt {}) of work item {} by agent {}.\n",
        a.run_id(),
        a.claimed.run.attempt,
        a.claimed.work_item.id,
        shared.config.agent_id
    );
    let mut done = match shared.workspaces.finish(workspace, checkout, &message).await {
        Ok(d) => d,
        Err(e) => {
            let e = sink.redactor().redact(&e).into_owned();
            sink.system(format!("cannot commit the run's changes: {e}")).await;
            return Err(format!("cannot commit the run's changes: {e}"));
        }
    };
    if done.result.committed {
        sink.system(format!(
            "committed {} file(s) on {} ({}): {}",
            done.committed_files.len(),
            checkout.branch,
            &done.result.head_commit[..done.result.head_commit.len().min(12)],
            done.committed_files.iter().take(50).map(|l| l.replace('\t', " ")).collect::<Vec<_>>().join(", ")
        ))
        .await;
    } else {
        sink.system(format!("no changes to commit on {}", checkout.branch)).await;
    }
    let mut push_error = None;
    let wanted = shared.workspaces.settings().push && done.result.head_commit != done.result.base_commit;
    // A run taken away (cancelled, reclaimed) pushes nothing; a stopping agent pushes briefly.
    if wanted && !control.lost() {
        let timeout = match control.reason() {
            StopReason::Shutdown => Duration::from_secs(20),
            _ => Duration::from_secs(3600),
        };
        match shared.workspaces.push(workspace, checkout, timeout).await {
            Ok(()) => {
                done.result.pushed = true;
                sink.system(format!("pushed {} to {}", checkout.branch, checkout.url)).await;
            }
            Err(e) => {
                let e = sink.redactor().redact(&e).into_owned();
                sink.system(e.clone()).await;
                push_error = Some(e);
            }
        }
    }
    sink.system(format!(
        "branch {}: {} file(s) changed, {} insertion(s), {} deletion(s) since {}",
        checkout.branch,
        done.result.files_changed,
        done.result.insertions,
        done.result.deletions,
        &done.result.base_commit[..done.result.base_commit.len().min(12)]
    ))
    .await;
    let patch = sink.redactor().redact(&done.patch).into_owned();
    let record = |result: orchestrator_core::domain::RunResult, patch: String| {
        with_retry(control, move || {
            shared.api.record_result(control.run_id, control.token, result.clone(), patch.clone())
        })
    };
    match record(done.result.clone(), patch.clone()).await {
        Ok(()) => {}
        Err(e) if is_lease_lost(&e) => control.stop(StopReason::LeaseLost),
        Err(e) => {
            // Too large for the server's request limit, say: keep the numbers, without the patch.
            let why = sink.redactor().redact(&e.to_string()).into_owned();
            sink.system(format!("the diff could not be recorded ({why}); recording the result without it")).await;
            let mut result = done.result.clone();
            result.patch_truncated = true;
            let marker = format!(
                "# orchestrator: the diff ({} bytes) could not be stored: see the branch {}\n",
                patch.len(),
                checkout.branch
            );
            if let Err(e) = record(result, marker).await {
                if is_lease_lost(&e) {
                    control.stop(StopReason::LeaseLost);
                } else {
                    tracing::warn!(run_id = %control.run_id, error = %e, "cannot record the run's result");
                }
            }
        }
    }
    match push_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn complete(
    shared: &Shared,
    control: &RunControl,
    sink: &RunSink,
    outcome: RunOutcome,
    usage: Option<Usage>,
) -> RunEnd {
    if control.lost() {
        return RunEnd::Lost;
    }
    sink.flush().await;
    if control.lost() {
        return RunEnd::Lost;
    }
    let succeeded = matches!(outcome, RunOutcome::Succeeded { .. });
    let span = tracing::info_span!("complete", succeeded);
    let r = tracing::Instrument::instrument(
        with_retry(control, || shared.api.complete(control.run_id, control.token, outcome.clone(), usage.clone())),
        span,
    )
    .await;
    match r {
        Ok(res) => {
            tracing::info!(run_id = %control.run_id, state = ?res.run.state, work_item_state = ?res.work_item_state, "run completed");
            if succeeded {
                RunEnd::Succeeded
            } else {
                RunEnd::Failed
            }
        }
        Err(e) if is_lease_lost(&e) => {
            control.stop(StopReason::LeaseLost);
            RunEnd::Lost
        }
        Err(e) => {
            tracing::error!(run_id = %control.run_id, error = %e, "cannot complete the run");
            RunEnd::Error
        }
    }
}

/// Releases a run stopped by the shutdown: hands it back without using up an attempt, so another agent
/// (or this one, restarted) resumes it at once.
async fn release(shared: &Shared, control: &RunControl, sink: &RunSink) -> RunEnd {
    if control.lost() {
        return RunEnd::Lost;
    }
    sink.system(format!("agent {} is shutting down: the run is handed back (no attempt used)", shared.config.agent_id))
        .await;
    sink.flush().await;
    let usage = sink.take_usage();
    match with_retry(control, || shared.api.release_with_usage(control.run_id, control.token, usage.clone())).await {
        Ok(_) => {
            tracing::info!(run_id = %control.run_id, "run released");
            RunEnd::Released
        }
        Err(e) if is_lease_lost(&e) => RunEnd::Lost,
        Err(e) => {
            tracing::error!(run_id = %control.run_id, error = %e, "cannot release the run; its lease will expire");
            RunEnd::Error
        }
    }
}

async fn stopped(shared: &Shared, control: &RunControl, sink: &RunSink) -> RunEnd {
    match control.reason() {
        StopReason::Shutdown => release(shared, control, sink).await,
        _ => RunEnd::Lost,
    }
}

async fn ask(shared: &Shared, control: &RunControl, sink: &RunSink, questions: Vec<NewInfoRequest>) -> RunEnd {
    let keys: Vec<&str> = questions.iter().map(|q| q.key.as_str()).collect();
    sink.system(format!("waiting for input: {}", keys.join(", "))).await;
    sink.step_event(NewStepEvent {
        step_index: None,
        kind: StepEventKind::Info,
        name: "needs_input".into(),
        detail: json!({"keys": keys}),
    })
    .await;
    sink.flush().await;
    if control.lost() {
        return RunEnd::Lost;
    }
    let usage = sink.take_usage();
    match with_retry(control, || {
        shared.api.ask_with_usage(control.run_id, control.token, questions.clone(), usage.clone())
    })
    .await
    {
        Ok(reqs) => {
            tracing::info!(run_id = %control.run_id, questions = reqs.len(), "run waits for input");
            RunEnd::WaitingInput
        }
        Err(e) if is_lease_lost(&e) => RunEnd::Lost,
        Err(e) => {
            tracing::error!(run_id = %control.run_id, error = %e, "cannot ask for input");
            let outcome = RunOutcome::Failed {
                error: format!("cannot ask for input: {e}"),
                exit_code: None,
                kind: FailureKind::Permanent,
            };
            complete(shared, control, sink, outcome, None).await
        }
    }
}

async fn drive(
    shared: &Shared,
    control: &Arc<RunControl>,
    sink: &Arc<RunSink>,
    a: Assignment,
    cancel: Cancellation,
    workspace: &std::path::Path,
    scratch: &std::path::Path,
) -> RunEnd {
    let run_id = a.run_id();
    match with_retry(control, || shared.api.start(run_id, control.token)).await {
        Ok(_) => {}
        Err(e) if is_lease_lost(&e) => return RunEnd::Lost,
        Err(e) => {
            tracing::error!(run_id = %run_id, error = %e, "cannot start the run");
            return RunEnd::Error;
        }
    }
    let run = &a.claimed.run;
    sink.system(format!(
        "agent {} {} run {} (attempt {}) of work item {}",
        shared.config.agent_id,
        if a.claimed.resumed { "resumed" } else { "claimed" },
        run_id,
        run.attempt,
        a.claimed.work_item.id
    ))
    .await;
    let mut checkout = None;
    let prepared = match &a.repository {
        Some(repo) => {
            sink.system(format!("checking out {} for work item {}", repo.url, a.claimed.work_item.id)).await;
            tokio::select! {
                p = shared.workspaces.prepare(repo, a.claimed.work_item.id) => p.map(|p| {
                    let line = format!(
                        "workspace {}: branch {} ({}) at {}",
                        p.dir.display(),
                        p.checkout.branch,
                        p.origin,
                        &p.checkout.start_commit[..p.checkout.start_commit.len().min(12)]
                    );
                    checkout = Some(p.checkout);
                    line
                }),
                _ = cancel.cancelled() => return stopped(shared, control, sink).await,
            }
        }
        None => tokio::fs::create_dir_all(workspace)
            .await
            .map(|_| format!("workspace {} (the project has no repository)", workspace.display()))
            .map_err(|e| format!("cannot create the workspace {}: {e}", workspace.display())),
    };
    let made_scratch = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(scratch)
    };
    match prepared
        .and_then(|line| made_scratch.map(|_| line).map_err(|e| format!("cannot create {}: {e}", scratch.display())))
    {
        Ok(line) => sink.system(line).await,
        Err(e) => {
            sink.system(e.clone()).await;
            let outcome = RunOutcome::Failed { error: e, exit_code: None, kind: FailureKind::Retryable };
            return complete(shared, control, sink, outcome, None).await;
        }
    }

    // Plan: an executor that plans itself (codex) gets the recipe's steps when there is a recipe, and no
    // LLM planning call otherwise.
    let ctx = PlanContext {
        work_item: a.claimed.work_item.clone(),
        recipe: a.recipe.clone(),
        workspace: Some(workspace.to_path_buf()),
    };
    let plans_itself = shared.executor.plans_itself();
    let planned = if plans_itself {
        Ok(match a.recipe.as_ref().filter(|r| !r.steps.is_empty()) {
            Some(r) => Plan { planner: "recipe".into(), steps: r.steps.clone(), fallbacks: Vec::new(), usage: None },
            None => Plan {
                planner: shared.executor.name().to_string(),
                steps: Vec::new(),
                fallbacks: Vec::new(),
                usage: None,
            },
        })
    } else {
        let planning =
            tracing::Instrument::instrument(plan_with_chain(&shared.planners, &ctx), tracing::info_span!("plan"));
        tokio::select! {
            p = planning => p,
            _ = cancel.cancelled() => return stopped(shared, control, sink).await,
        }
    };
    let plan = match planned {
        Ok(p) => p,
        Err(fallbacks) => {
            let why: Vec<String> = fallbacks.iter().map(|f| f.to_string()).collect();
            let outcome = RunOutcome::Failed {
                error: format!("no planner produced a plan: {}", why.join("; ")),
                exit_code: None,
                kind: FailureKind::Permanent,
            };
            return complete(shared, control, sink, outcome, None).await;
        }
    };
    if let Some(u) = &plan.usage {
        sink.planner_usage(u.clone());
    }
    // Planners with nothing to say are normal (no recipe); failures are worth a log line.
    for f in plan.fallbacks.iter().filter(|f| f.message != "no plan") {
        sink.system(format!("planner {} fell through: {}", f.planner, f.message)).await;
    }
    if plan.steps.is_empty() {
        sink.system(format!("{} plans the work itself (no planning call)", shared.executor.name())).await;
    } else {
        sink.system(format!("planned {} step(s) with the {} planner", plan.steps.len(), plan.planner)).await;
    }
    sink.step_event(NewStepEvent {
        step_index: None,
        kind: StepEventKind::Planned,
        name: plan.planner.clone(),
        detail: json!({
            "planner": plan.planner,
            "executor": shared.executor.name(),
            "steps": plan.steps,
            "resumed": a.claimed.resumed,
            "executor_plans": plans_itself && plan.steps.is_empty(),
            "usage": plan.usage,
            "fallbacks": plan.fallbacks.iter().map(|f| json!({"planner": f.planner, "message": f.message})).collect::<Vec<_>>(),
        }),
    })
    .await;
    if control.lost() {
        return RunEnd::Lost;
    }

    // Inputs the recipe needs and does not have become questions.
    let questions = missing_inputs(&a);
    if !questions.is_empty() {
        return ask(shared, control, sink, questions).await;
    }

    // Resume after the last completed step.
    let start_step = run.last_completed_step.map_or(0, |i| i.saturating_add(1));
    for i in 0..start_step.min(plan.steps.len() as u32) {
        sink.step_event(NewStepEvent {
            step_index: Some(i),
            kind: StepEventKind::Skipped,
            name: crate::shell::step_name(&plan.steps[i as usize]),
            detail: json!({"reason": "completed before the run waited for input"}),
        })
        .await;
    }
    let ectx = ExecutionContext {
        assignment: a.clone(),
        steps: plan.steps,
        start_step,
        workspace: workspace.to_path_buf(),
        checkout: checkout.clone(),
        scratch: scratch.to_path_buf(),
        cancel: cancel.clone(),
    };
    let outcome = tracing::Instrument::instrument(
        shared.executor.execute(ectx, sink.as_ref() as &dyn ExecutionSink),
        tracing::info_span!("execute", executor = shared.executor.name()),
    )
    .await;
    sink.flush().await;
    let usage = sink.take_usage();
    if control.lost() {
        return RunEnd::Lost;
    }
    // The result is a commit and a diff, whatever the outcome (a retry continues from the commit); not
    // when the run was taken away (someone else may hold it now).
    let mut outcome = outcome;
    if let Some(co) = &checkout {
        let taken = matches!(outcome, ExecutionOutcome::Cancelled) && control.reason() != StopReason::Shutdown;
        if !taken {
            if let Err(e) = finish_checkout(shared, control, sink, &a, workspace, co).await {
                if let ExecutionOutcome::Succeeded { exit_code } = outcome {
                    outcome = ExecutionOutcome::Failed { error: e, exit_code, kind: FailureKind::Retryable };
                }
            }
            sink.flush().await;
            if control.lost() {
                return RunEnd::Lost;
            }
        }
    }
    match outcome {
        ExecutionOutcome::Succeeded { exit_code } => {
            complete(shared, control, sink, RunOutcome::Succeeded { exit_code }, usage).await
        }
        ExecutionOutcome::Failed { error, exit_code, kind } => {
            let error = sink.redactor().redact(&error).into_owned();
            complete(shared, control, sink, RunOutcome::Failed { error, exit_code, kind }, usage).await
        }
        ExecutionOutcome::NeedsInput { questions } => ask(shared, control, sink, questions).await,
        ExecutionOutcome::Cancelled => match control.reason() {
            StopReason::None => {
                // The executor stopped on its own account.
                let outcome = RunOutcome::Failed {
                    error: "the executor cancelled the run".into(),
                    exit_code: None,
                    kind: FailureKind::Retryable,
                };
                complete(shared, control, sink, outcome, usage).await
            }
            _ => stopped(shared, control, sink).await,
        },
    }
}
