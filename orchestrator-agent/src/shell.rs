//! The `shell` executor: each step a `sh -c` child process in its own process group, inside the run's
//! workspace, with a timeout that kills the whole group and output streamed line by line.

use crate::process::{child_env, describe, join_pumps, prepare, pump_output, supervise, Ended};
use async_trait::async_trait;
use orchestrator_core::agent::{ExecutionContext, ExecutionOutcome, ExecutionSink, Executor};
use orchestrator_core::domain::{LogStream, NewStepEvent, StepEventKind};
use orchestrator_core::recipe::StepSpec;
use orchestrator_core::retry::FailureKind;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment every step of a run gets (on top of the allow-list of the agent's own): `ORCH_RUN_ID`,
/// `ORCH_WORK_ITEM_ID`, `ORCH_PROJECT_ID`, `ORCH_ATTEMPT`, `ORCH_WORKSPACE`, with a repository
/// `ORCH_BRANCH` and `ORCH_BASE_BRANCH`, the recipe inputs' defaults and the answers to the run's info
/// requests (by key).
pub fn run_environment(ctx: &ExecutionContext) -> BTreeMap<String, String> {
    let a = &ctx.assignment;
    let mut env = BTreeMap::new();
    env.insert("ORCH_RUN_ID".to_string(), a.run_id().to_string());
    env.insert("ORCH_WORK_ITEM_ID".to_string(), a.claimed.work_item.id.to_string());
    env.insert("ORCH_PROJECT_ID".to_string(), a.claimed.work_item.project_id.to_string());
    env.insert("ORCH_ATTEMPT".to_string(), a.claimed.run.attempt.to_string());
    env.insert("ORCH_WORKSPACE".to_string(), ctx.workspace.display().to_string());
    if let Some(co) = &ctx.checkout {
        env.insert("ORCH_BRANCH".to_string(), co.branch.clone());
        env.insert("ORCH_BASE_BRANCH".to_string(), co.base_branch.clone());
    }
    if let Some(r) = &a.recipe {
        for i in &r.inputs {
            if let Some(d) = &i.default {
                env.insert(i.name.clone(), d.clone());
            }
        }
    }
    for (k, v) in &a.answers {
        env.insert(k.clone(), v.value.clone());
    }
    env
}

/// Resolves a step's `cwd` inside `workspace` (creating it); a path that would leave the workspace
/// (absolute, `..`, or through a symlink) is refused.
pub fn resolve_cwd(workspace: &Path, cwd: Option<&str>) -> Result<PathBuf, String> {
    let root = std::fs::canonicalize(workspace).map_err(|e| format!("workspace {}: {e}", workspace.display()))?;
    let Some(c) = cwd.map(str::trim).filter(|c| !c.is_empty()) else {
        return Ok(root);
    };
    let rel = Path::new(c);
    if rel.components().any(|comp| !matches!(comp, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("cwd `{c}` must be a relative path inside the run's workspace"));
    }
    let dir = root.join(rel);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create cwd `{c}`: {e}"))?;
    let canon = std::fs::canonicalize(&dir).map_err(|e| format!("cwd `{c}`: {e}"))?;
    if !canon.starts_with(&root) {
        return Err(format!("cwd `{c}` leaves the run's workspace"));
    }
    Ok(canon)
}

/// A step's display name: its `name`, else its command.
pub fn step_name(step: &StepSpec) -> String {
    step.name.clone().unwrap_or_else(|| step.run.clone())
}

/// Runs each step with `sh -c` (see the module docs). A non-zero exit fails the run as retryable; a
/// `cwd` outside the workspace fails it as permanent.
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    default_timeout: Duration,
    kill_grace: Duration,
    passthrough: Vec<String>,
}

impl Default for ShellExecutor {
    fn default() -> Self {
        ShellExecutor::new(Duration::from_secs(3600), Duration::from_secs(2))
    }
}

impl ShellExecutor {
    /// An executor with a default step timeout and a SIGTERM-to-SIGKILL grace. Steps get an allow-list
    /// environment (`PATH`, `HOME`, `LANG`, `LC_*`, `TERM`, `USER`, `TZ`, `CODEX_HOME`), the run's own
    /// variables and answers, never the rest of the agent's.
    pub fn new(default_timeout: Duration, kill_grace: Duration) -> Self {
        ShellExecutor { default_timeout, kill_grace, passthrough: Vec::new() }
    }

    /// Also passes these variables of the agent's environment on (`AGENT_ENV_PASSTHROUGH`).
    pub fn with_env_passthrough(mut self, names: Vec<String>) -> Self {
        self.passthrough = names;
        self
    }
}

fn failed(index: u32, name: &str, detail: serde_json::Value) -> NewStepEvent {
    NewStepEvent { step_index: Some(index), kind: StepEventKind::Failed, name: name.to_string(), detail }
}

#[async_trait]
impl Executor for ShellExecutor {
    fn name(&self) -> &str {
        "shell"
    }

    async fn execute(&self, ctx: ExecutionContext, sink: &dyn ExecutionSink) -> ExecutionOutcome {
        let base_env = run_environment(&ctx);
        let mut last_code = None;
        for (i, step) in ctx.steps.iter().enumerate().skip(ctx.start_step as usize) {
            if ctx.cancel.is_cancelled() {
                return ExecutionOutcome::Cancelled;
            }
            let index = i as u32;
            let name = step_name(step);
            let timeout = step.timeout.map(Duration::from_secs).unwrap_or(self.default_timeout);
            sink.step_event(NewStepEvent {
                step_index: Some(index),
                kind: StepEventKind::Started,
                name: name.clone(),
                detail: json!({"run": step.run, "cwd": step.cwd, "timeout_seconds": timeout.as_secs()}),
            })
            .await;
            let dir = match resolve_cwd(&ctx.workspace, step.cwd.as_deref()) {
                Ok(d) => d,
                Err(msg) => {
                    sink.log(LogStream::System, format!("step {index} refused: {msg}")).await;
                    sink.step_event(failed(index, &name, json!({"error": msg}))).await;
                    return ExecutionOutcome::Failed {
                        error: format!("step {index} ({name}): {msg}"),
                        exit_code: None,
                        kind: FailureKind::Permanent,
                    };
                }
            };
            let mut cmd = tokio::process::Command::new("sh");
            cmd.arg("-c").arg(&step.run).current_dir(&dir);
            child_env(&mut cmd, &self.passthrough);
            cmd.envs(&base_env).envs(&step.env);
            cmd.env("ORCH_STEP_INDEX", index.to_string());
            prepare(&mut cmd, false);
            let started = Instant::now();
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("cannot start `sh`: {e}");
                    sink.step_event(failed(index, &name, json!({"error": msg}))).await;
                    return ExecutionOutcome::Failed {
                        error: format!("step {index} ({name}): {msg}"),
                        exit_code: None,
                        kind: FailureKind::Retryable,
                    };
                }
            };
            let (mut rx, pumps) = pump_output(&mut child);
            let step_span = tracing::info_span!("step", index, name = %name);
            let ended = {
                let sup = tracing::Instrument::instrument(
                    supervise(&mut child, timeout, &ctx.cancel, self.kill_grace),
                    step_span,
                );
                tokio::pin!(sup);
                loop {
                    tokio::select! {
                        biased;
                        Some((s, l)) = rx.recv() => sink.log(s, l).await,
                        r = &mut sup => break r,
                    }
                }
            };
            // Output written just before the exit is still in the pipes: drain it (bounded).
            let drain = tokio::spawn(join_pumps(pumps, Duration::from_secs(2)));
            while let Some((s, l)) = rx.recv().await {
                sink.log(s, l).await;
            }
            let _ = drain.await;
            let duration_ms = started.elapsed().as_millis() as u64;
            match ended {
                Ok(Ended::Exited(st)) if st.success() => {
                    last_code = st.code();
                    sink.step_event(NewStepEvent {
                        step_index: Some(index),
                        kind: StepEventKind::Succeeded,
                        name: name.clone(),
                        detail: json!({"exit_code": st.code(), "duration_ms": duration_ms}),
                    })
                    .await;
                }
                Ok(Ended::Exited(st)) => {
                    let how = describe(&st);
                    sink.log(LogStream::System, format!("step {index} failed: {how}")).await;
                    sink.step_event(failed(
                        index,
                        &name,
                        json!({"exit_code": st.code(), "duration_ms": duration_ms, "error": how}),
                    ))
                    .await;
                    return ExecutionOutcome::Failed {
                        error: format!("step {index} ({name}) failed: {how}"),
                        exit_code: st.code(),
                        kind: FailureKind::Retryable,
                    };
                }
                Ok(Ended::TimedOut) => {
                    let how = format!("timed out after {} s; its process group was killed", timeout.as_secs());
                    sink.log(LogStream::System, format!("step {index} {how}")).await;
                    sink.step_event(failed(
                        index,
                        &name,
                        json!({"timeout": true, "duration_ms": duration_ms, "error": how}),
                    ))
                    .await;
                    return ExecutionOutcome::Failed {
                        error: format!("step {index} ({name}) {how}"),
                        exit_code: None,
                        kind: FailureKind::Retryable,
                    };
                }
                Ok(Ended::Cancelled) => {
                    sink.log(LogStream::System, format!("step {index} cancelled; its process group was killed")).await;
                    sink.step_event(failed(index, &name, json!({"cancelled": true, "duration_ms": duration_ms}))).await;
                    return ExecutionOutcome::Cancelled;
                }
                Err(e) => {
                    let msg = format!("waiting for the step failed: {e}");
                    sink.step_event(failed(index, &name, json!({"error": msg}))).await;
                    return ExecutionOutcome::Failed {
                        error: format!("step {index} ({name}): {msg}"),
                        exit_code: None,
                        kind: FailureKind::Retryable,
                    };
                }
            }
        }
        ExecutionOutcome::Succeeded { exit_code: last_code }
    }
}
