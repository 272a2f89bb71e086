//! The `codex` executor: the whole work item is delegated to `codex exec --sandbox workspace-write --json`
//! (full autonomy). The prompt (title, description, recipe) goes to stdin; the JSONL events become step
//! events and log lines; the token usage is recorded on the run; success is exit code 0 and a completed
//! turn.

use crate::config::AgentConfig;
use crate::process::{describe, feed_stdin, join_pumps, prepare, pump_output, scrub_inherited_env, supervise, Ended};
use crate::shell::run_environment;
use async_trait::async_trait;
use orchestrator_core::agent::{ExecutionContext, ExecutionOutcome, ExecutionSink, Executor};
use orchestrator_core::domain::{LogStream, NewStepEvent, StepEventKind, Usage};
use orchestrator_core::retry::FailureKind;
use serde_json::{json, Value};
use std::time::Duration;

/// Runs `codex exec` once per run (see the module docs).
#[derive(Debug, Clone)]
pub struct CodexExecutor {
    bin: String,
    extra_args: Vec<String>,
    timeout: Duration,
    kill_grace: Duration,
}

impl CodexExecutor {
    /// An executor running `bin` with extra `codex exec` arguments (e.g. `-m MODEL`, `-c key=value`).
    pub fn new(bin: impl Into<String>, extra_args: Vec<String>, timeout: Duration, kill_grace: Duration) -> Self {
        CodexExecutor { bin: bin.into(), extra_args, timeout, kill_grace }
    }

    /// The executor `AGENT_EXECUTOR=codex` selects (`CODEX_BIN`, `AGENT_CODEX_ARGS`,
    /// `AGENT_STEP_TIMEOUT_SECONDS`).
    pub fn from_config(c: &AgentConfig) -> Self {
        Self::new(c.codex_bin.clone(), c.codex_args.clone(), c.step_timeout, c.kill_grace)
    }

    /// The arguments after the executable.
    pub fn args(&self, workspace: &std::path::Path) -> Vec<String> {
        let mut a: Vec<String> =
            ["-a", "never", "exec", "--sandbox", "workspace-write", "--skip-git-repo-check", "--json"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        a.push("-C".into());
        a.push(workspace.display().to_string());
        a.extend(self.extra_args.iter().cloned());
        a.push("-".into());
        a
    }
}

/// The prompt for a codex execution: the work item's title, description, recipe and the names (never
/// the values) of the inputs available as environment variables.
pub fn codex_prompt(ctx: &ExecutionContext) -> String {
    let w = &ctx.assignment.claimed.work_item;
    let mut p = format!("You are an autonomous coding agent. Complete this work item.\n\nTitle: {}\n", w.title);
    if !w.description.trim().is_empty() {
        p.push_str(&format!("\nDescription:\n{}\n", w.description));
    }
    if let Some(r) = &ctx.assignment.recipe {
        if let Ok(y) = serde_json::to_string_pretty(r) {
            p.push_str(&format!("\nTool recipe (the steps to follow):\n{y}\n"));
        }
    }
    let keys: Vec<&str> = ctx.assignment.answers.keys().map(String::as_str).collect();
    if !keys.is_empty() {
        p.push_str(&format!("\nThese inputs are set as environment variables: {}\n", keys.join(", ")));
    }
    p.push_str("\nWork inside the current directory. When you are done, summarize what you did.\n");
    p
}

#[derive(Default)]
struct CodexState {
    completed: bool,
    failed: Option<String>,
    last_error: Option<String>,
}

fn info(name: &str, detail: Value) -> NewStepEvent {
    NewStepEvent { step_index: Some(0), kind: StepEventKind::Info, name: name.to_string(), detail }
}

async fn log_text(sink: &dyn ExecutionSink, stream: LogStream, prefix: &str, text: &str) {
    for l in text.lines() {
        sink.log(stream, format!("{prefix}{l}")).await;
    }
}

fn usage_of(v: &Value) -> Usage {
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    Usage {
        input_tokens: n("input_tokens"),
        cached_input_tokens: n("cached_input_tokens"),
        output_tokens: n("output_tokens"),
        cost_usd: None,
    }
}

async fn handle_item(kind: &str, item: &Value, raw: &str, sink: &dyn ExecutionSink) {
    let itype = item.get("type").and_then(Value::as_str).unwrap_or("");
    let s = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match (kind, itype) {
        ("item.completed", "agent_message") => log_text(sink, LogStream::Stdout, "", &s("text")).await,
        ("item.completed", "reasoning") => log_text(sink, LogStream::System, "[reasoning] ", &s("text")).await,
        ("item.started", "command_execution") => sink.log(LogStream::System, format!("$ {}", s("command"))).await,
        ("item.completed", "command_execution") => {
            log_text(sink, LogStream::Stdout, "", &s("aggregated_output")).await;
            sink.step_event(info(
                "command_execution",
                json!({"command": s("command"), "exit_code": item.get("exit_code"), "status": item.get("status")}),
            ))
            .await;
        }
        ("item.completed", "file_change") => {
            if let Some(changes) = item.get("changes").and_then(Value::as_array) {
                for c in changes {
                    let path = c.get("path").and_then(Value::as_str).unwrap_or("?");
                    let k = c.get("kind").and_then(Value::as_str).unwrap_or("?");
                    sink.log(LogStream::System, format!("file {k}: {path}")).await;
                }
            }
            sink.step_event(info("file_change", json!({"changes": item.get("changes"), "status": item.get("status")})))
                .await;
        }
        (_, "todo_list") if kind != "item.started" => {
            if let Some(items) = item.get("items").and_then(Value::as_array) {
                for t in items {
                    let done = t.get("completed").and_then(Value::as_bool).unwrap_or(false);
                    let text = t.get("text").and_then(Value::as_str).unwrap_or("");
                    sink.log(LogStream::System, format!("todo [{}] {text}", if done { "x" } else { " " })).await;
                }
            }
        }
        ("item.completed", "error") => sink.log(LogStream::Stderr, format!("codex: {}", s("message"))).await,
        ("item.completed", "mcp_tool_call") | ("item.completed", "web_search") => {
            sink.step_event(info(itype, item.clone())).await;
        }
        ("item.completed", _) => sink.log(LogStream::System, raw.to_string()).await,
        // Started/updated items of other types would only repeat what their completion says.
        _ => {}
    }
}

async fn handle_line(line: &str, st: &mut CodexState, sink: &dyn ExecutionSink) {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        sink.log(LogStream::Stdout, line.to_string()).await;
        return;
    };
    let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
    match ty {
        "thread.started" => {
            sink.step_event(info("thread.started", json!({"thread_id": v.get("thread_id")}))).await;
        }
        "turn.started" => sink.log(LogStream::System, "codex turn started".into()).await,
        "turn.completed" => {
            st.completed = true;
            let u = v.get("usage").map(usage_of).unwrap_or_default();
            sink.usage(u.clone()).await;
            sink.step_event(info("turn.completed", json!({"usage": u}))).await;
        }
        "turn.failed" => {
            let m = v.pointer("/error/message").and_then(Value::as_str).unwrap_or("turn failed").to_string();
            sink.log(LogStream::Stderr, format!("codex turn failed: {m}")).await;
            sink.step_event(info("turn.failed", json!({"error": m}))).await;
            st.failed = Some(m);
        }
        "error" => {
            let m = v.get("message").and_then(Value::as_str).unwrap_or("error").to_string();
            sink.log(LogStream::Stderr, format!("codex error: {m}")).await;
            st.last_error = Some(m);
        }
        "item.started" | "item.updated" | "item.completed" => {
            handle_item(ty, v.get("item").unwrap_or(&Value::Null), line, sink).await
        }
        // Unknown events pass through as logs.
        _ => sink.log(LogStream::System, line.to_string()).await,
    }
}

#[async_trait]
impl Executor for CodexExecutor {
    fn name(&self) -> &str {
        "codex"
    }

    async fn execute(&self, ctx: ExecutionContext, sink: &dyn ExecutionSink) -> ExecutionOutcome {
        let args = self.args(&ctx.workspace);
        sink.step_event(NewStepEvent {
            step_index: Some(0),
            kind: StepEventKind::Started,
            name: "codex".into(),
            detail: json!({"bin": self.bin, "args": args}),
        })
        .await;
        let fail = |error: String, exit_code: Option<i32>, kind: FailureKind| async move {
            sink.step_event(NewStepEvent {
                step_index: Some(0),
                kind: StepEventKind::Failed,
                name: "codex".into(),
                detail: json!({"error": error, "exit_code": exit_code}),
            })
            .await;
            ExecutionOutcome::Failed { error, exit_code, kind }
        };
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(&args).current_dir(&ctx.workspace);
        scrub_inherited_env(&mut cmd);
        cmd.envs(run_environment(&ctx));
        prepare(&mut cmd, true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return fail(format!("cannot start `{}`: {e}", self.bin), None, FailureKind::Retryable).await,
        };
        let writer = feed_stdin(&mut child, codex_prompt(&ctx));
        let (mut rx, pumps) = pump_output(&mut child);
        let mut st = CodexState::default();
        let ended = {
            let sup = supervise(&mut child, self.timeout, &ctx.cancel, self.kill_grace);
            tokio::pin!(sup);
            loop {
                tokio::select! {
                    biased;
                    Some((s, l)) = rx.recv() => match s {
                        LogStream::Stdout => handle_line(&l, &mut st, sink).await,
                        _ => sink.log(s, l).await,
                    },
                    r = &mut sup => break r,
                }
            }
        };
        let drain = tokio::spawn(join_pumps(pumps, Duration::from_secs(2)));
        while let Some((s, l)) = rx.recv().await {
            match s {
                LogStream::Stdout => handle_line(&l, &mut st, sink).await,
                _ => sink.log(s, l).await,
            }
        }
        let _ = drain.await;
        if let Some(w) = writer {
            w.abort();
        }
        match ended {
            Ok(Ended::Exited(status)) => {
                let code = status.code();
                if status.success() && st.completed && st.failed.is_none() {
                    sink.step_event(NewStepEvent {
                        step_index: Some(0),
                        kind: StepEventKind::Succeeded,
                        name: "codex".into(),
                        detail: json!({"exit_code": code}),
                    })
                    .await;
                    ExecutionOutcome::Succeeded { exit_code: code }
                } else {
                    let why = st.failed.or(st.last_error).unwrap_or_else(|| {
                        if status.success() {
                            "no completed turn".into()
                        } else {
                            describe(&status)
                        }
                    });
                    fail(format!("codex failed ({}): {why}", describe(&status)), code, FailureKind::Retryable).await
                }
            }
            Ok(Ended::TimedOut) => {
                fail(format!("codex timed out after {} s", self.timeout.as_secs()), None, FailureKind::Retryable).await
            }
            Ok(Ended::Cancelled) => ExecutionOutcome::Cancelled,
            Err(e) => fail(format!("waiting for codex failed: {e}"), None, FailureKind::Retryable).await,
        }
    }
}
