//! The `codex` executor: the whole work item is delegated to `codex exec --sandbox workspace-write --json`
//! (full autonomy, no planning call: codex plans itself). The prompt (title, description, recipe, the
//! repository and branch) goes to stdin; the JSONL events become step events and log lines; the token
//! usage is recorded on the run; success is exit code 0 and a completed turn.
//!
//! - Codex must not hang: it runs with `--disable unbounded_connection_retries` (it fails instead of
//!   retrying a dead connection forever) and is killed, as a retryable failure, when it prints no JSONL
//!   event for `AGENT_CODEX_IDLE_TIMEOUT_SECONDS`. A request the model refuses as invalid (HTTP 400) is a
//!   permanent failure.
//! - `/tmp` and `$TMPDIR` are excluded from its writable roots, so one run cannot write into another's.
//! - Asking a human: `codex exec` cannot ask mid-run, so its final message is held to a JSON Schema
//!   (`--output-schema`, written with `-o` to the run's scratch directory): `{"status": "needs_input",
//!   "questions": [...]}` becomes info requests; once answered, the same session is resumed
//!   (`codex exec resume <thread id>`) in the work item's checkout with the answers (secret ones only as
//!   environment variables, never in the prompt or the log). An agent without that session starts a new
//!   one, told the questions and their answers.

use crate::config::AgentConfig;
use crate::process::{child_env, describe, feed_stdin, join_pumps, prepare, pump_output, supervise, Ended};
use crate::shell::run_environment;
use async_trait::async_trait;
use orchestrator_core::agent::{Cancellation, ExecutionContext, ExecutionOutcome, ExecutionSink, Executor};
use orchestrator_core::domain::{LogStream, NewStepEvent, StepEventKind, Usage};
use orchestrator_core::recipe::InputKind;
use orchestrator_core::retry::FailureKind;
use orchestrator_core::store::NewInfoRequest;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Runs `codex exec` once per run (see the module docs).
#[derive(Debug, Clone)]
pub struct CodexExecutor {
    bin: String,
    extra_args: Vec<String>,
    timeout: Duration,
    kill_grace: Duration,
    idle_timeout: Duration,
    passthrough: Vec<String>,
    sessions: Option<PathBuf>,
}

impl CodexExecutor {
    /// An executor running `bin` with extra `codex exec` arguments (e.g. `-m MODEL`, `-c key=value`).
    pub fn new(bin: impl Into<String>, extra_args: Vec<String>, timeout: Duration, kill_grace: Duration) -> Self {
        CodexExecutor {
            bin: bin.into(),
            extra_args,
            timeout,
            kill_grace,
            idle_timeout: Duration::from_secs(300),
            passthrough: Vec::new(),
            sessions: None,
        }
    }

    /// The executor `AGENT_EXECUTOR=codex` selects (`CODEX_BIN`, `AGENT_CODEX_ARGS`,
    /// `AGENT_STEP_TIMEOUT_SECONDS`, `AGENT_CODEX_IDLE_TIMEOUT_SECONDS`, `AGENT_ENV_PASSTHROUGH`); the
    /// session ids of runs waiting for answers are kept under the workspace root.
    pub fn from_config(c: &AgentConfig) -> Self {
        let mut e = Self::new(c.codex_bin.clone(), c.codex_args.clone(), c.step_timeout, c.kill_grace);
        e.idle_timeout = c.codex_idle_timeout;
        e.passthrough = c.env_passthrough.clone();
        e.sessions = Some(c.workspace_root.join("codex-sessions"));
        e
    }

    /// Kills codex (a retryable failure) when it prints no JSONL event for this long.
    pub fn with_idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Where the session ids of runs waiting for answers are kept (one small file per run).
    pub fn with_sessions_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.sessions = Some(dir.into());
        self
    }

    /// The arguments after the executable: a new session, or `resume` of `thread` when given.
    pub fn args(&self, workspace: &Path, scratch: &Path, thread: Option<&str>) -> Vec<String> {
        let mut a: Vec<String> = [
            "-a",
            "never",
            "exec",
            "--sandbox",
            "workspace-write",
            "--skip-git-repo-check",
            "--json",
            "--disable",
            "unbounded_connection_retries",
            "-c",
            "sandbox_workspace_write.exclude_slash_tmp=true",
            "-c",
            "sandbox_workspace_write.exclude_tmpdir_env_var=true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("--output-schema".into());
        a.push(scratch.join(SCHEMA_FILE).display().to_string());
        a.push("-o".into());
        a.push(scratch.join(LAST_MESSAGE_FILE).display().to_string());
        a.push("-C".into());
        a.push(workspace.display().to_string());
        a.extend(self.extra_args.iter().cloned());
        if let Some(t) = thread {
            a.push("resume".into());
            a.push(t.to_string());
        }
        a.push("-".into());
        a
    }

    fn session_file(&self, ctx: &ExecutionContext) -> Option<PathBuf> {
        self.sessions.as_ref().map(|d| d.join(ctx.assignment.run_id().to_string()))
    }
}

const SCHEMA_FILE: &str = "codex-final-message.schema.json";
const LAST_MESSAGE_FILE: &str = "codex-last-message.json";

/// The JSON Schema codex's final message follows (strict: every property required, no others).
pub fn final_message_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["status", "summary", "questions"],
        "properties": {
            "status": {"type": "string", "enum": ["done", "needs_input"]},
            "summary": {"type": "string"},
            "questions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["key", "prompt", "kind", "choices"],
                    "properties": {
                        "key": {"type": "string", "description": "an environment variable name, e.g. API_TOKEN"},
                        "prompt": {"type": "string"},
                        "kind": {"type": "string", "enum": ["text", "secret", "choice"]},
                        "choices": {"type": "array", "items": {"type": "string"}}
                    }
                }
            }
        }
    })
}

/// What codex's final message asks for, when it asks a person.
pub fn questions_in_final_message(text: &str) -> Result<Option<Vec<NewInfoRequest>>, String> {
    let Ok(v) = serde_json::from_str::<Value>(text.trim()) else {
        return Ok(None);
    };
    if v.get("status").and_then(Value::as_str) != Some("needs_input") {
        return Ok(None);
    }
    let qs = v.get("questions").and_then(Value::as_array).cloned().unwrap_or_default();
    if qs.is_empty() {
        return Err("codex said it needs input but asked no question".into());
    }
    let mut out = Vec::with_capacity(qs.len());
    for q in qs {
        let key = q.get("key").and_then(Value::as_str).unwrap_or("").trim().to_string();
        let valid = !key.is_empty()
            && key.len() <= 64
            && key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("codex asked a question with the key `{key}`, not an environment variable name"));
        }
        let kind = match q.get("kind").and_then(Value::as_str) {
            Some("secret") => InputKind::Secret,
            Some("choice") => InputKind::Choice,
            _ => InputKind::Text,
        };
        let choices: Vec<String> = q
            .get("choices")
            .and_then(Value::as_array)
            .map(|c| c.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let prompt = q.get("prompt").and_then(Value::as_str).unwrap_or(&key).to_string();
        out.push(NewInfoRequest {
            key,
            prompt,
            kind: if kind == InputKind::Choice && choices.is_empty() { InputKind::Text } else { kind },
            choices: if kind == InputKind::Choice { choices } else { Vec::new() },
            deadline: None,
        });
    }
    Ok(Some(out))
}

/// Whether a failure message is the model refusing the request as invalid (HTTP 400): retrying it cannot
/// help.
pub fn is_invalid_request(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("400 bad request") || m.contains("status 400") || m.contains("invalid_request_error")
}

/// The prompt for a codex execution: the work item's title, description, recipe, the repository and
/// branch, the names (never the values) of the inputs available as environment variables, and how to ask
/// a person.
pub fn codex_prompt(ctx: &ExecutionContext) -> String {
    let w = &ctx.assignment.claimed.work_item;
    let mut p = format!("You are an autonomous coding agent. Complete this work item.\n\nTitle: {}\n", w.title);
    if let Some(co) = &ctx.checkout {
        p.push_str(&format!(
            "\nRepository: {} (a checkout of branch `{}`, started from `{}`; the orchestrator commits your \
             changes when you finish, so do not push)\n",
            co.url, co.branch, co.base_branch
        ));
    }
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
    p.push_str(ASK_INSTRUCTIONS);
    p
}

const ASK_INSTRUCTIONS: &str = "\nWork inside the current directory. Your final message is a JSON object: \
{\"status\": \"done\", \"summary\": \"what you did\", \"questions\": []} when you are done. When you \
cannot go on without a person (a credential, a decision), stop and answer {\"status\": \"needs_input\", \
\"summary\": \"why\", \"questions\": [{\"key\": \"ENV_VAR_NAME\", \"prompt\": \"the question\", \
\"kind\": \"text\" | \"secret\" | \"choice\", \"choices\": [...]}]}: you will be resumed with the answers.\n";

/// The prompt that resumes a session with the answers: plain answers inline, secret ones only as the
/// names of the environment variables that hold them.
pub fn resume_prompt(ctx: &ExecutionContext, fresh: bool) -> String {
    let mut p = String::new();
    if fresh {
        p.push_str(&codex_prompt(ctx));
        p.push_str("\nEarlier in this work you asked a person some questions. Their answers:\n");
    } else {
        p.push_str("A person answered your questions:\n");
    }
    for (k, v) in &ctx.assignment.answers {
        if v.secret {
            p.push_str(&format!("- {k}: a secret, in the environment variable {k} (never print it)\n"));
        } else {
            p.push_str(&format!("- {k}: {}\n", v.value));
        }
    }
    p.push_str("Every answer is also set as an environment variable of the same name. Go on with the work.\n");
    if !fresh {
        p.push_str(ASK_INSTRUCTIONS);
    }
    p
}

#[derive(Default)]
struct CodexState {
    completed: bool,
    failed: Option<String>,
    last_error: Option<String>,
    thread_id: Option<String>,
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
            st.thread_id = v.get("thread_id").and_then(Value::as_str).map(str::to_string);
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

    fn plans_itself(&self) -> bool {
        true
    }

    async fn execute(&self, ctx: ExecutionContext, sink: &dyn ExecutionSink) -> ExecutionOutcome {
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
        // A resumed run with answers continues codex's session when this agent has it.
        let session_file = self.session_file(&ctx);
        let resuming = ctx.assignment.claimed.resumed && !ctx.assignment.answers.is_empty();
        let thread = match (&session_file, resuming) {
            (Some(f), true) => std::fs::read_to_string(f)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')),
            _ => None,
        };
        let prompt = match (&thread, resuming) {
            (Some(_), _) => resume_prompt(&ctx, false),
            (None, true) => resume_prompt(&ctx, true),
            (None, false) => codex_prompt(&ctx),
        };
        let schema = ctx.scratch.join(SCHEMA_FILE);
        let last = ctx.scratch.join(LAST_MESSAGE_FILE);
        let _ = std::fs::remove_file(&last);
        if let Err(e) = std::fs::write(&schema, final_message_schema().to_string()) {
            return fail(format!("cannot write {}: {e}", schema.display()), None, FailureKind::Retryable).await;
        }
        let args = self.args(&ctx.workspace, &ctx.scratch, thread.as_deref());
        sink.step_event(NewStepEvent {
            step_index: Some(0),
            kind: StepEventKind::Started,
            name: "codex".into(),
            detail: json!({"bin": self.bin, "args": args, "resumed_session": thread}),
        })
        .await;
        if let Some(t) = &thread {
            sink.log(LogStream::System, format!("resuming codex session {t} with the answers")).await;
        } else if resuming {
            sink.log(
                LogStream::System,
                "this agent has no codex session for the run: a new one starts with the questions and answers".into(),
            )
            .await;
        }
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(&args).current_dir(&ctx.workspace);
        child_env(&mut cmd, &self.passthrough);
        cmd.envs(run_environment(&ctx));
        prepare(&mut cmd, true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return fail(format!("cannot start `{}`: {e}", self.bin), None, FailureKind::Retryable).await,
        };
        let writer = feed_stdin(&mut child, prompt);
        let (mut rx, pumps) = pump_output(&mut child);
        let mut st = CodexState::default();
        // Stopped by the run's cancellation, or by this executor when codex goes quiet.
        let (stop_handle, stop) = Cancellation::new();
        let stop_handle = Arc::new(stop_handle);
        let forward = {
            let (h, c) = (stop_handle.clone(), ctx.cancel.clone());
            tokio::spawn(async move {
                c.cancelled().await;
                h.cancel();
            })
        };
        let mut idle = false;
        let ended = {
            let sup = supervise(&mut child, self.timeout, &stop, self.kill_grace);
            tokio::pin!(sup);
            let quiet = tokio::time::sleep(self.idle_timeout);
            tokio::pin!(quiet);
            loop {
                tokio::select! {
                    biased;
                    Some((s, l)) = rx.recv() => match s {
                        LogStream::Stdout => {
                            quiet.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
                            handle_line(&l, &mut st, sink).await
                        }
                        _ => sink.log(s, l).await,
                    },
                    r = &mut sup => break r,
                    _ = &mut quiet, if !idle => {
                        idle = true;
                        sink.log(LogStream::System, format!(
                            "codex printed no event for {} s; killing it", self.idle_timeout.as_secs()
                        )).await;
                        stop_handle.cancel();
                    }
                }
            }
        };
        forward.abort();
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
        let session = st.thread_id.clone().or(thread);
        match ended {
            Ok(Ended::Exited(status)) => {
                let code = status.code();
                if status.success() && st.completed && st.failed.is_none() {
                    let text = std::fs::read_to_string(&last).unwrap_or_default();
                    match questions_in_final_message(&text) {
                        Ok(Some(questions)) => {
                            if let (Some(f), Some(t)) = (&session_file, &session) {
                                let saved = f
                                    .parent()
                                    .map(std::fs::create_dir_all)
                                    .transpose()
                                    .and_then(|_| std::fs::write(f, t));
                                if let Err(e) = saved {
                                    tracing::warn!(error = %e, "cannot keep the codex session id; a new session will answer");
                                }
                            }
                            sink.step_event(NewStepEvent {
                                step_index: Some(0),
                                kind: StepEventKind::Info,
                                name: "codex".into(),
                                detail: json!({"needs_input": questions.iter().map(|q| &q.key).collect::<Vec<_>>(), "thread_id": session}),
                            })
                            .await;
                            return ExecutionOutcome::NeedsInput { questions };
                        }
                        Ok(None) => {}
                        Err(e) => return fail(e, code, FailureKind::Retryable).await,
                    }
                    if let Some(f) = &session_file {
                        let _ = std::fs::remove_file(f);
                    }
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
                    let kind = if is_invalid_request(&why) { FailureKind::Permanent } else { FailureKind::Retryable };
                    fail(format!("codex failed ({}): {why}", describe(&status)), code, kind).await
                }
            }
            Ok(Ended::Cancelled) if idle => {
                fail(
                    format!("codex printed no event for {} s and was killed", self.idle_timeout.as_secs()),
                    None,
                    FailureKind::Retryable,
                )
                .await
            }
            Ok(Ended::TimedOut) => {
                fail(format!("codex timed out after {} s", self.timeout.as_secs()), None, FailureKind::Retryable).await
            }
            Ok(Ended::Cancelled) => ExecutionOutcome::Cancelled,
            Err(e) => fail(format!("waiting for codex failed: {e}"), None, FailureKind::Retryable).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_messages_become_questions() {
        let q = questions_in_final_message(
            r#"{"status":"needs_input","summary":"s","questions":[{"key":"API_TOKEN","prompt":"Token?","kind":"secret","choices":[]},{"key":"ENV","prompt":"Where?","kind":"choice","choices":["dev","prod"]}]}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!((q[0].key.as_str(), q[0].kind), ("API_TOKEN", InputKind::Secret));
        assert_eq!(q[1].choices, vec!["dev", "prod"]);
        assert_eq!(questions_in_final_message(r#"{"status":"done","summary":"ok","questions":[]}"#).unwrap(), None);
        assert_eq!(questions_in_final_message("plain text").unwrap(), None);
        assert!(questions_in_final_message(
            r#"{"status":"needs_input","questions":[{"key":"a b","prompt":"x","kind":"text","choices":[]}]}"#
        )
        .is_err());
        assert!(questions_in_final_message(r#"{"status":"needs_input","questions":[]}"#).is_err());
    }

    #[test]
    fn invalid_requests_are_permanent() {
        assert!(is_invalid_request("unexpected status 400 Bad Request: {\"error\": ...}"));
        assert!(is_invalid_request("invalid_request_error: bad model"));
        assert!(!is_invalid_request("stream disconnected before completion"));
    }
}
