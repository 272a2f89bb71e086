//! The planners of the chain, in order: [`RecipePlanner`], [`CommandPlanner`] (an LLM behind a CLI such as
//! `codex exec`), [`OpenAiPlanner`] (an OpenAI-compatible chat endpoint) and [`InferencePlanner`]
//! (deterministic, from the title and description). [`default_planners`] builds the chain a config asks for.

use crate::config::AgentConfig;
use crate::process::{run_capture, Ended};
use async_trait::async_trait;
use orchestrator_core::agent::{Cancellation, PlanContext, PlanError, Planner};
use orchestrator_core::domain::Usage;
use orchestrator_core::recipe::{parse_plan_json, StepSpec, MAX_DOCUMENT_BYTES};
use std::time::Duration;

fn plan_error(planner: &str, message: impl Into<String>) -> PlanError {
    PlanError { planner: planner.to_string(), message: message.into() }
}

/// The prompt given to LLM planners: the work item, its recipe if any, and the answer format.
pub fn plan_prompt(ctx: &PlanContext) -> String {
    let mut p = String::from(
        "You are planning the shell commands an automated agent will run, in order, in an empty working \
         directory, to do the following work item.\n\n",
    );
    p.push_str(&format!("Title: {}\n", ctx.work_item.title));
    if !ctx.work_item.description.trim().is_empty() {
        p.push_str(&format!("Description:\n{}\n", ctx.work_item.description));
    }
    if let Some(r) = &ctx.recipe {
        if let Ok(j) = serde_json::to_string_pretty(r) {
            p.push_str(&format!("Tool recipe:\n{j}\n"));
        }
    }
    p.push_str(
        "\nAnswer with ONLY a JSON array of steps and nothing else. Each step is either a string (a shell \
         command) or an object {\"run\": \"command\", \"env\": {\"NAME\": \"value\"}, \"timeout\": seconds, \
         \"cwd\": \"relative/dir\"}. Example: [\"echo build\", {\"run\": \"make test\", \"timeout\": 600}]\n",
    );
    p
}

/// Plans from the work item's tool recipe (nothing when there is none).
#[derive(Debug, Clone, Default)]
pub struct RecipePlanner;

#[async_trait]
impl Planner for RecipePlanner {
    fn name(&self) -> &str {
        "recipe"
    }
    async fn plan(&self, ctx: &PlanContext) -> Result<Option<Vec<StepSpec>>, PlanError> {
        Ok(ctx.recipe.as_ref().map(|r| r.steps.clone()).filter(|s| !s.is_empty()))
    }
}

/// Asks an LLM through a command line (`CODEX_PLAN_CMD`, run with `sh -c`): the prompt goes to its stdin,
/// its stdout must hold a JSON array of steps. A failed, empty or invalid answer is an error (the chain
/// falls back).
#[derive(Debug, Clone)]
pub struct CommandPlanner {
    command: String,
    timeout: Duration,
    kill_grace: Duration,
    passthrough: Vec<String>,
}

impl CommandPlanner {
    /// A planner running `command` with a timeout. It runs in the run's workspace (`ORCH_WORKSPACE` is
    /// set to it) with the allow-list environment of steps.
    pub fn new(command: impl Into<String>, timeout: Duration) -> Self {
        CommandPlanner { command: command.into(), timeout, kill_grace: Duration::from_secs(2), passthrough: Vec::new() }
    }

    /// Passes these variables of the agent's environment on to the command (`AGENT_ENV_PASSTHROUGH`).
    pub fn with_env_passthrough(mut self, names: Vec<String>) -> Self {
        self.passthrough = names;
        self
    }
}

fn tail(s: &str, n: usize) -> String {
    let t = s.trim();
    if t.len() <= n {
        return t.to_string();
    }
    let mut start = t.len() - n;
    while !t.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &t[start..])
}

#[async_trait]
impl Planner for CommandPlanner {
    fn name(&self) -> &str {
        "llm-command"
    }
    async fn plan(&self, ctx: &PlanContext) -> Result<Option<Vec<StepSpec>>, PlanError> {
        self.plan_with_usage(ctx).await.map(|(s, _)| s)
    }

    async fn plan_with_usage(&self, ctx: &PlanContext) -> Result<(Option<Vec<StepSpec>>, Option<Usage>), PlanError> {
        let name = self.name();
        let (_keep, never) = Cancellation::new();
        // Never in the agent's own directory (beside its database and key): in the run's workspace, or
        // an empty directory of its own when the caller has none.
        let scratch;
        let dir = match &ctx.workspace {
            Some(d) => d.as_path(),
            None => {
                scratch = tempfile_dir().map_err(|e| plan_error(name, format!("cannot create a directory: {e}")))?;
                scratch.path()
            }
        };
        let out = run_capture(
            &self.command,
            Some(dir),
            &self.passthrough,
            plan_prompt(ctx),
            self.timeout,
            &never,
            self.kill_grace,
            MAX_DOCUMENT_BYTES + 1,
        )
        .await
        .map_err(|e| plan_error(name, format!("cannot run `{}`: {e}", self.command)))?;
        match out.ended {
            Ended::Exited(st) if st.success() => {}
            Ended::Exited(st) => {
                return Err(plan_error(
                    name,
                    format!(
                        "`{}` failed ({}): {}",
                        self.command,
                        crate::process::describe(&st),
                        tail(&out.stderr, 500)
                    ),
                ))
            }
            Ended::TimedOut => {
                return Err(plan_error(name, format!("`{}` timed out after {:?}", self.command, self.timeout)))
            }
            Ended::Cancelled => return Err(plan_error(name, "cancelled")),
        }
        if out.stdout.trim().is_empty() {
            return Err(plan_error(name, "the planner printed nothing"));
        }
        let usage = tokens_used(&out.stderr).map(|n| Usage { input_tokens: n, ..Usage::default() });
        parse_plan_json(&out.stdout)
            .map(|s| (Some(s), usage))
            .map_err(|e| plan_error(name, format!("invalid plan: {e}")))
    }
}

/// Asks an OpenAI-compatible chat-completions endpoint (`{base_url}/chat/completions`).
#[derive(Clone)]
pub struct OpenAiPlanner {
    client: reqwest::Client,
    base_url: String,
    api_key: String,
    model: String,
}

impl std::fmt::Debug for OpenAiPlanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiPlanner").field("base_url", &self.base_url).field("model", &self.model).finish()
    }
}

impl OpenAiPlanner {
    /// A planner for `base_url` (e.g. `https://api.openai.com/v1`), with a key and a model.
    pub fn new(base_url: &str, api_key: &str, model: &str, timeout: Duration) -> Self {
        let client = reqwest::Client::builder().timeout(timeout).build().unwrap_or_default();
        OpenAiPlanner {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            model: model.to_string(),
        }
    }
}

#[async_trait]
impl Planner for OpenAiPlanner {
    fn name(&self) -> &str {
        "openai"
    }
    async fn plan(&self, ctx: &PlanContext) -> Result<Option<Vec<StepSpec>>, PlanError> {
        self.plan_with_usage(ctx).await.map(|(s, _)| s)
    }

    async fn plan_with_usage(&self, ctx: &PlanContext) -> Result<(Option<Vec<StepSpec>>, Option<Usage>), PlanError> {
        let name = self.name();
        let body = serde_json::json!({
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You plan shell commands. Reply with only a JSON array of steps."},
                {"role": "user", "content": plan_prompt(ctx)},
            ],
        });
        let url = format!("{}/chat/completions", self.base_url);
        let resp = self
            .client
            .post(&url)
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .map_err(|e| plan_error(name, format!("request to {url} failed: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| plan_error(name, format!("cannot read the answer: {e}")))?;
        if !status.is_success() {
            return Err(plan_error(name, format!("{url} answered {status}: {}", tail(&text, 300))));
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| plan_error(name, format!("answer is not JSON: {e}")))?;
        let content = v
            .pointer("/choices/0/message/content")
            .and_then(|c| c.as_str())
            .ok_or_else(|| plan_error(name, "answer has no choices[0].message.content"))?;
        if content.trim().is_empty() {
            return Err(plan_error(name, "the model answered nothing"));
        }
        let n = |k: &str| v.pointer(&format!("/usage/{k}")).and_then(|x| x.as_u64()).unwrap_or(0);
        let usage = v.get("usage").map(|_| Usage {
            input_tokens: n("prompt_tokens"),
            cached_input_tokens: n("prompt_tokens_details/cached_tokens"),
            output_tokens: n("completion_tokens"),
            cost_usd: None,
        });
        parse_plan_json(content).map(|s| (Some(s), usage)).map_err(|e| plan_error(name, format!("invalid plan: {e}")))
    }
}

/// Deterministic inference from the title and description: commands in backticks, then lines starting
/// with `$ ` in the description; failing that, a single step echoing the title.
#[derive(Debug, Clone, Default)]
pub struct InferencePlanner;

fn backticked(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('`') {
        if rest[start..].starts_with("```") {
            // A fenced block: every non-empty line inside is a command.
            let body = &rest[start + 3..];
            let Some(end) = body.find("```") else { break };
            let block = &body[..end];
            let block = block.split_once('\n').map_or(block, |(first, after)| {
                if first.trim().chars().all(|c| c.is_ascii_alphanumeric()) {
                    after
                } else {
                    block
                }
            });
            out.extend(
                block
                    .lines()
                    .map(|l| l.trim().trim_start_matches("$ ").trim())
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
            rest = &body[end + 3..];
            continue;
        }
        let after = &rest[start + 1..];
        let Some(end) = after.find('`') else { break };
        let cmd = after[..end].trim();
        if !cmd.is_empty() && !cmd.contains('\n') {
            out.push(cmd.to_string());
        }
        rest = &after[end + 1..];
    }
    out
}

#[async_trait]
impl Planner for InferencePlanner {
    fn name(&self) -> &str {
        "inference"
    }
    async fn plan(&self, ctx: &PlanContext) -> Result<Option<Vec<StepSpec>>, PlanError> {
        let w = &ctx.work_item;
        let mut cmds = backticked(&w.title);
        cmds.extend(backticked(&w.description));
        if cmds.is_empty() {
            cmds = w
                .description
                .lines()
                .filter_map(|l| l.trim().strip_prefix("$ "))
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
        }
        if cmds.is_empty() {
            cmds.push(format!("echo {}", crate::config::shell_quote(w.title.trim())));
        }
        Ok(Some(cmds.into_iter().map(StepSpec::command).collect()))
    }
}

/// The planner chain for a configuration: recipe; the LLM command when `AGENT_ENABLE_LLM_PLANNING`; the
/// OpenAI-compatible endpoint when `AGENT_ALLOW_OPENAI_FALLBACK` and a key is set; inference.
pub fn default_planners(config: &AgentConfig) -> Vec<Box<dyn Planner>> {
    let mut v: Vec<Box<dyn Planner>> = vec![Box::new(RecipePlanner)];
    if config.enable_llm_planning {
        let mut p = CommandPlanner::new(config.effective_plan_command(), config.plan_timeout)
            .with_env_passthrough(config.env_passthrough.clone());
        p.kill_grace = config.kill_grace;
        v.push(Box::new(p));
    }
    if config.allow_openai_fallback {
        if let Some(key) = config.openai_api_key.as_deref().filter(|k| !k.is_empty()) {
            v.push(Box::new(OpenAiPlanner::new(
                &config.openai_base_url,
                key,
                &config.openai_model,
                config.plan_timeout,
            )));
        }
    }
    v.push(Box::new(InferencePlanner));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_backticked_commands() {
        assert_eq!(backticked("Run `cargo test` then `make`"), vec!["cargo test", "make"]);
        assert_eq!(backticked("do:\n```sh\n$ echo a\n# c\necho b\n```\n"), vec!["echo a", "echo b"]);
        assert!(backticked("no commands").is_empty());
    }
}

/// A private temporary directory, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> std::io::Result<TempDir> {
    use std::os::unix::fs::DirBuilderExt;
    let p = std::env::temp_dir().join(format!("orchestrator-plan-{}", uuid::Uuid::now_v7()));
    std::fs::DirBuilder::new().mode(0o700).create(&p)?;
    Ok(TempDir(p))
}

/// The total codex prints on stderr after a non-JSON `exec` (`tokens used 1,234` or `tokens used: 1234`).
pub fn tokens_used(stderr: &str) -> Option<u64> {
    let lines: Vec<&str> = stderr.lines().collect();
    for (i, l) in lines.iter().enumerate().rev() {
        let t = l.trim().to_ascii_lowercase();
        if let Some(rest) = t.strip_prefix("tokens used") {
            let rest = rest.trim_start_matches(':').trim();
            // The number is on the same line, or alone on the next one.
            let text = if rest.is_empty() { lines.get(i + 1).map(|s| s.trim()).unwrap_or("") } else { rest };
            let digits: String =
                text.chars().take_while(|c| c.is_ascii_digit() || *c == ',').filter(|c| *c != ',').collect();
            return digits.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod usage_tests {
    use super::tokens_used;

    #[test]
    fn reads_codex_token_totals() {
        assert_eq!(tokens_used("something\ntokens used 1,234\n"), Some(1234));
        assert_eq!(tokens_used("tokens used\n5678\n"), Some(5678));
        assert_eq!(tokens_used("tokens used: 42"), Some(42));
        assert_eq!(tokens_used("nothing here"), None);
    }
}
