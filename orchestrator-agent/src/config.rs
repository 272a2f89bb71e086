//! [`AgentConfig`]: the agent's settings, read from `AGENT_*` (and a few `CODEX_*` / `OPENAI_*` /
//! `ORCH_OPENAI_*`) environment variables, with builder setters for tests and host programs.

use std::path::PathBuf;
use std::time::Duration;

/// A configuration variable that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}: {message}")]
pub struct ConfigError {
    /// The environment variable.
    pub var: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(var: &str, message: impl Into<String>) -> Self {
        ConfigError { var: var.to_string(), message: message.into() }
    }
}

/// Which built-in executor runs the steps (`AGENT_EXECUTOR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// Each step a shell command in its own process group (default).
    #[default]
    Shell,
    /// The whole work item delegated to `codex exec` (full autonomy).
    Codex,
}

/// What happens to a run's workspace directory when the run ends (`AGENT_KEEP_WORKSPACES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepWorkspaces {
    /// Keep every workspace.
    Always,
    /// Delete every workspace when its run ends (even when it waits for input).
    Never,
    /// Keep the workspaces of runs that did not succeed (default).
    #[default]
    OnFailure,
}

/// The agent's configuration. Build it with [`AgentConfig::from_env`] or [`AgentConfig::new`] and the
/// `with_*` setters.
#[derive(Clone)]
pub struct AgentConfig {
    /// `AGENT_ID`: the agent's id (default `hostname-pid`).
    pub agent_id: String,
    /// `AGENT_CONCURRENCY`: how many runs at once (default 2).
    pub concurrency: u32,
    /// `AGENT_CAPABILITIES`: comma-separated capabilities matched against work item labels.
    pub capabilities: Vec<String>,
    /// `AGENT_EXECUTOR`: `shell` (default) or `codex`.
    pub executor: ExecutorKind,
    /// `AGENT_WORKSPACE_ROOT`: where run workspaces, repository mirrors and worktrees live (default
    /// [`default_workspace_root`]; created 0700).
    pub workspace_root: PathBuf,
    /// `AGENT_KEEP_WORKSPACES`: `always`, `never` or `on_failure` (default).
    pub keep_workspaces: KeepWorkspaces,
    /// `AGENT_POLL_INTERVAL_MS`: polling fallback when no wake-up arrives (default 5000 ms, jittered).
    pub poll_interval: Duration,
    /// `AGENT_SHUTDOWN_GRACE_SECONDS`: how long running work may go on after a shutdown request (default 30).
    pub shutdown_grace: Duration,
    /// `AGENT_LEASE_TTL_SECONDS`: lease duration asked for when claiming (default: the server's).
    pub lease_ttl_seconds: Option<u64>,
    /// `AGENT_STEP_TIMEOUT_SECONDS`: timeout of a step that names none, and of a codex execution (default 3600).
    pub step_timeout: Duration,
    /// How long a timed-out or cancelled process group gets between SIGTERM and SIGKILL (default 2 s).
    pub kill_grace: Duration,
    /// `AGENT_ENABLE_LLM_PLANNING`: ask an LLM command for a plan when the work item has no recipe.
    pub enable_llm_planning: bool,
    /// `CODEX_PLAN_CMD`: the planning command line, run with `sh -c` in the run's workspace (default: a
    /// read-only `codex exec -C "$ORCH_WORKSPACE"`).
    pub plan_command: Option<String>,
    /// `AGENT_PLAN_TIMEOUT_SECONDS`: how long a planner may take (default 300).
    pub plan_timeout: Duration,
    /// `AGENT_ALLOW_OPENAI_FALLBACK`: ask an OpenAI-compatible chat endpoint when the command planner fails.
    pub allow_openai_fallback: bool,
    /// `OPENAI_API_KEY`: the key for the OpenAI-compatible endpoint (never printed).
    pub openai_api_key: Option<String>,
    /// `ORCH_OPENAI_MODEL`: model name (default `gpt-4o-mini`).
    pub openai_model: String,
    /// `ORCH_OPENAI_BASE_URL`: base URL of the endpoint (default `https://api.openai.com/v1`).
    pub openai_base_url: String,
    /// `CODEX_BIN`: the codex executable (default `codex`).
    pub codex_bin: String,
    /// `AGENT_CODEX_ARGS`: extra arguments for `codex exec` (whitespace-separated), e.g. `-m some-model`.
    pub codex_args: Vec<String>,
    /// Git settings for projects with a repository (`AGENT_GIT_PUSH`, `AGENT_GIT_AUTHOR`,
    /// `AGENT_BRANCH_PREFIX`, `AGENT_DIFF_MAX_BYTES`).
    pub git: crate::git::GitSettings,
    /// `AGENT_ENV_PASSTHROUGH`: comma-separated names of the agent's environment variables that steps and
    /// codex get besides the allow-list (`PATH`, `HOME`, `LANG`, `LC_*`, `TERM`, `USER`, `TZ`).
    pub env_passthrough: Vec<String>,
    /// `AGENT_CODEX_IDLE_TIMEOUT_SECONDS`: codex is killed (a retryable failure) when it prints no JSONL
    /// event for this long (default 300).
    pub codex_idle_timeout: Duration,
    /// Log lines sent in one batch at most (default 500).
    pub log_batch_lines: usize,
    /// How often buffered log lines are flushed (default 200 ms).
    pub log_flush_interval: Duration,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("agent_id", &self.agent_id)
            .field("concurrency", &self.concurrency)
            .field("capabilities", &self.capabilities)
            .field("executor", &self.executor)
            .field("workspace_root", &self.workspace_root)
            .field("keep_workspaces", &self.keep_workspaces)
            .field("poll_interval", &self.poll_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("lease_ttl_seconds", &self.lease_ttl_seconds)
            .field("step_timeout", &self.step_timeout)
            .field("enable_llm_planning", &self.enable_llm_planning)
            .field("plan_command", &self.plan_command)
            .field("allow_openai_fallback", &self.allow_openai_fallback)
            .field("openai_api_key", &self.openai_api_key.as_ref().map(|_| "<redacted>"))
            .field("openai_model", &self.openai_model)
            .field("openai_base_url", &self.openai_base_url)
            .field("codex_bin", &self.codex_bin)
            .field("codex_args", &self.codex_args)
            .field("git", &self.git)
            .field("env_passthrough", &self.env_passthrough)
            .field("codex_idle_timeout", &self.codex_idle_timeout)
            .finish_non_exhaustive()
    }
}

fn default_agent_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.trim().is_empty()))
        .unwrap_or_else(|| "agent".to_string());
    format!("{host}-{}", std::process::id())
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig::new(default_agent_id())
    }
}

fn parse_bool(var: &str, v: &str) -> Result<bool, ConfigError> {
    orchestrator_core::config::parse_bool(var, v)
        .map_err(|_| ConfigError::new(var, format!("expected true or false, got `{v}`")))
}

fn parse_num<T: std::str::FromStr>(var: &str, v: &str, what: &str) -> Result<T, ConfigError> {
    v.trim().parse::<T>().map_err(|_| ConfigError::new(var, format!("expected {what}, got `{v}`")))
}

impl AgentConfig {
    /// Defaults with the given agent id.
    pub fn new(agent_id: impl Into<String>) -> Self {
        AgentConfig {
            agent_id: agent_id.into(),
            concurrency: 2,
            capabilities: Vec::new(),
            executor: ExecutorKind::Shell,
            workspace_root: default_workspace_root(),
            keep_workspaces: KeepWorkspaces::OnFailure,
            poll_interval: Duration::from_millis(5000),
            shutdown_grace: Duration::from_secs(30),
            lease_ttl_seconds: None,
            step_timeout: Duration::from_secs(3600),
            kill_grace: Duration::from_secs(2),
            enable_llm_planning: false,
            plan_command: None,
            plan_timeout: Duration::from_secs(300),
            allow_openai_fallback: false,
            openai_api_key: None,
            openai_model: "gpt-4o-mini".to_string(),
            openai_base_url: "https://api.openai.com/v1".to_string(),
            codex_bin: "codex".to_string(),
            codex_args: Vec::new(),
            git: crate::git::GitSettings::default(),
            env_passthrough: Vec::new(),
            codex_idle_timeout: Duration::from_secs(300),
            log_batch_lines: 500,
            log_flush_interval: Duration::from_millis(200),
        }
    }

    /// Reads the process environment (see the field docs for the variables).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the configuration through `lookup`; missing or empty values keep their defaults, invalid ones
    /// are errors naming the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let mut c = AgentConfig::default();
        if let Some(v) = get("AGENT_ID") {
            c.agent_id = v.trim().to_string();
        }
        if let Some(v) = get("AGENT_CONCURRENCY") {
            c.concurrency = parse_num::<u32>("AGENT_CONCURRENCY", &v, "a whole number between 1 and 1000")?;
            if !(1..=1000).contains(&c.concurrency) {
                return Err(ConfigError::new("AGENT_CONCURRENCY", "expected a whole number between 1 and 1000"));
            }
        }
        if let Some(v) = get("AGENT_CAPABILITIES") {
            c.capabilities = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = get("AGENT_EXECUTOR") {
            c.executor = match v.trim().to_ascii_lowercase().as_str() {
                "shell" => ExecutorKind::Shell,
                "codex" => ExecutorKind::Codex,
                _ => return Err(ConfigError::new("AGENT_EXECUTOR", format!("expected shell or codex, got `{v}`"))),
            };
        }
        if let Some(v) = get("AGENT_WORKSPACE_ROOT") {
            c.workspace_root = PathBuf::from(v.trim());
        }
        if let Some(v) = get("AGENT_KEEP_WORKSPACES") {
            c.keep_workspaces = match v.trim().to_ascii_lowercase().replace('-', "_").as_str() {
                "always" => KeepWorkspaces::Always,
                "never" => KeepWorkspaces::Never,
                "on_failure" => KeepWorkspaces::OnFailure,
                _ => {
                    return Err(ConfigError::new(
                        "AGENT_KEEP_WORKSPACES",
                        format!("expected always, never or on_failure, got `{v}`"),
                    ))
                }
            };
        }
        if let Some(v) = get("AGENT_POLL_INTERVAL_MS") {
            let ms = parse_num::<u64>("AGENT_POLL_INTERVAL_MS", &v, "milliseconds")?;
            c.poll_interval = Duration::from_millis(ms.clamp(10, 3_600_000));
        }
        if let Some(v) = get("AGENT_SHUTDOWN_GRACE_SECONDS") {
            c.shutdown_grace = Duration::from_secs(parse_num("AGENT_SHUTDOWN_GRACE_SECONDS", &v, "seconds")?);
        }
        if let Some(v) = get("AGENT_LEASE_TTL_SECONDS") {
            let s: u64 = parse_num("AGENT_LEASE_TTL_SECONDS", &v, "seconds")?;
            if s == 0 {
                return Err(ConfigError::new("AGENT_LEASE_TTL_SECONDS", "must be at least 1"));
            }
            c.lease_ttl_seconds = Some(s);
        }
        if let Some(v) = get("AGENT_STEP_TIMEOUT_SECONDS") {
            let s: u64 = parse_num("AGENT_STEP_TIMEOUT_SECONDS", &v, "seconds")?;
            if s == 0 {
                return Err(ConfigError::new("AGENT_STEP_TIMEOUT_SECONDS", "must be at least 1"));
            }
            c.step_timeout = Duration::from_secs(s);
        }
        if let Some(v) = get("AGENT_ENABLE_LLM_PLANNING") {
            c.enable_llm_planning = parse_bool("AGENT_ENABLE_LLM_PLANNING", &v)?;
        }
        c.plan_command = get("CODEX_PLAN_CMD").map(|v| v.trim().to_string());
        if let Some(v) = get("AGENT_PLAN_TIMEOUT_SECONDS") {
            let s: u64 = parse_num("AGENT_PLAN_TIMEOUT_SECONDS", &v, "seconds")?;
            c.plan_timeout = Duration::from_secs(s.max(1));
        }
        if let Some(v) = get("AGENT_ALLOW_OPENAI_FALLBACK") {
            c.allow_openai_fallback = parse_bool("AGENT_ALLOW_OPENAI_FALLBACK", &v)?;
        }
        c.openai_api_key = get("OPENAI_API_KEY").map(|v| v.trim().to_string());
        if let Some(v) = get("ORCH_OPENAI_MODEL") {
            c.openai_model = v.trim().to_string();
        }
        if let Some(v) = get("ORCH_OPENAI_BASE_URL") {
            c.openai_base_url = v.trim().trim_end_matches('/').to_string();
        }
        if let Some(v) = get("CODEX_BIN") {
            c.codex_bin = v.trim().to_string();
        }
        if let Some(v) = get("AGENT_CODEX_ARGS") {
            c.codex_args = v.split_whitespace().map(str::to_string).collect();
        }
        if let Some(v) = get("AGENT_GIT_PUSH") {
            c.git.push = parse_bool("AGENT_GIT_PUSH", &v)?;
        }
        if let Some(v) = get("AGENT_GIT_AUTHOR") {
            let (name, email) = crate::git::parse_author(&v)
                .ok_or_else(|| ConfigError::new("AGENT_GIT_AUTHOR", format!("expected `Name <email>`, got `{v}`")))?;
            c.git.author_name = name;
            c.git.author_email = email;
        }
        if let Some(v) = get("AGENT_BRANCH_PREFIX") {
            let p = v.trim().to_string();
            if !orchestrator_core::rules::is_valid_branch_name(&format!("{p}x")) {
                return Err(ConfigError::new("AGENT_BRANCH_PREFIX", format!("`{p}` does not make valid branch names")));
            }
            c.git.branch_prefix = p;
        }
        if let Some(v) = get("AGENT_DIFF_MAX_BYTES") {
            let n: usize = parse_num("AGENT_DIFF_MAX_BYTES", &v, "bytes")?;
            c.git.diff_max_bytes = n.clamp(1024, orchestrator_core::rules::MAX_PATCH_BYTES);
        }
        if let Some(v) = get("AGENT_ENV_PASSTHROUGH") {
            c.env_passthrough = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = get("AGENT_CODEX_IDLE_TIMEOUT_SECONDS") {
            let s: u64 = parse_num("AGENT_CODEX_IDLE_TIMEOUT_SECONDS", &v, "seconds")?;
            if s == 0 {
                return Err(ConfigError::new("AGENT_CODEX_IDLE_TIMEOUT_SECONDS", "must be at least 1"));
            }
            c.codex_idle_timeout = Duration::from_secs(s);
        }
        Ok(c)
    }

    /// The planning command line: `CODEX_PLAN_CMD`, or a read-only, non-interactive `codex exec` reading
    /// the prompt on stdin (the form current Codex CLI releases accept).
    pub fn effective_plan_command(&self) -> String {
        self.plan_command.clone().unwrap_or_else(|| {
            format!(
                "{} -a never exec --sandbox read-only --skip-git-repo-check -C \"$ORCH_WORKSPACE\" -",
                shell_quote(&self.codex_bin)
            )
        })
    }

    /// Sets the agent id.
    pub fn with_agent_id(mut self, id: impl Into<String>) -> Self {
        self.agent_id = id.into();
        self
    }
    /// Sets the concurrency (at least 1).
    pub fn with_concurrency(mut self, n: u32) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// Sets the capabilities.
    pub fn with_capabilities(mut self, caps: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }
    /// Chooses the built-in executor.
    pub fn with_executor(mut self, kind: ExecutorKind) -> Self {
        self.executor = kind;
        self
    }
    /// Sets the workspace root.
    pub fn with_workspace_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.workspace_root = root.into();
        self
    }
    /// Sets the workspace policy.
    pub fn with_keep_workspaces(mut self, keep: KeepWorkspaces) -> Self {
        self.keep_workspaces = keep;
        self
    }
    /// Sets the polling fallback interval.
    pub fn with_poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d.max(Duration::from_millis(1));
        self
    }
    /// Sets the shutdown grace period.
    pub fn with_shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }
    /// Sets the lease duration asked for when claiming.
    pub fn with_lease_ttl_seconds(mut self, s: u64) -> Self {
        self.lease_ttl_seconds = Some(s.max(1));
        self
    }
    /// Sets the default step timeout.
    pub fn with_step_timeout(mut self, d: Duration) -> Self {
        self.step_timeout = d;
        self
    }
    /// Sets the SIGTERM-to-SIGKILL grace of killed process groups.
    pub fn with_kill_grace(mut self, d: Duration) -> Self {
        self.kill_grace = d;
        self
    }
    /// Enables the LLM command planner with `command` (`None`: the default codex command).
    pub fn with_llm_planning(mut self, command: Option<String>) -> Self {
        self.enable_llm_planning = true;
        self.plan_command = command;
        self
    }
    /// Sets the planner timeout.
    pub fn with_plan_timeout(mut self, d: Duration) -> Self {
        self.plan_timeout = d;
        self
    }
    /// Enables the OpenAI-compatible fallback planner.
    pub fn with_openai_fallback(
        mut self,
        base_url: impl Into<String>,
        api_key: impl Into<String>,
        model: impl Into<String>,
    ) -> Self {
        self.allow_openai_fallback = true;
        self.openai_base_url = base_url.into().trim_end_matches('/').to_string();
        self.openai_api_key = Some(api_key.into());
        self.openai_model = model.into();
        self
    }
    /// Sets the codex executable.
    pub fn with_codex_bin(mut self, bin: impl Into<String>) -> Self {
        self.codex_bin = bin.into();
        self
    }
    /// Sets extra `codex exec` arguments.
    pub fn with_codex_args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.codex_args = args.into_iter().map(Into::into).collect();
        self
    }
    /// Sets the git settings.
    pub fn with_git(mut self, git: crate::git::GitSettings) -> Self {
        self.git = git;
        self
    }
    /// Sets the names of environment variables passed on to steps and codex.
    pub fn with_env_passthrough(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.env_passthrough = names.into_iter().map(Into::into).collect();
        self
    }
    /// Sets codex's idle timeout.
    pub fn with_codex_idle_timeout(mut self, d: Duration) -> Self {
        self.codex_idle_timeout = d;
        self
    }
    /// Sets the log batching (lines per batch, flush interval).
    pub fn with_log_batching(mut self, lines: usize, every: Duration) -> Self {
        self.log_batch_lines = lines.max(1);
        self.log_flush_interval = every.max(Duration::from_millis(1));
        self
    }
}

/// The default workspace root: `$XDG_STATE_HOME/orchestrator/workspaces`, else
/// `$HOME/.local/state/orchestrator/workspaces` (a directory of the user's own, created 0700: never a
/// shared temporary directory another user could create first).
pub fn default_workspace_root() -> PathBuf {
    let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(x) = abs(std::env::var_os("XDG_STATE_HOME")) {
        return x.join("orchestrator").join("workspaces");
    }
    if let Some(h) = abs(std::env::var_os("HOME")) {
        return h.join(".local").join("state").join("orchestrator").join("workspaces");
    }
    PathBuf::from("orchestrator-workspaces")
}

/// Quotes `s` for `sh` when it contains anything but safe characters.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn reads_env_and_rejects_bad_values() {
        let env: HashMap<&str, &str> = [
            ("AGENT_ID", "a1"),
            ("AGENT_CONCURRENCY", "4"),
            ("AGENT_CAPABILITIES", "linux, rust,,"),
            ("AGENT_EXECUTOR", "codex"),
            ("AGENT_KEEP_WORKSPACES", "never"),
            ("AGENT_POLL_INTERVAL_MS", "250"),
            ("AGENT_ENABLE_LLM_PLANNING", "true"),
            ("OPENAI_API_KEY", "sk-secret"),
        ]
        .into();
        let c = AgentConfig::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.agent_id, "a1");
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.capabilities, vec!["linux", "rust"]);
        assert_eq!(c.executor, ExecutorKind::Codex);
        assert_eq!(c.keep_workspaces, KeepWorkspaces::Never);
        assert_eq!(c.poll_interval, Duration::from_millis(250));
        assert!(c.enable_llm_planning);
        assert_eq!(c.openai_model, "gpt-4o-mini");
        assert!(!format!("{c:?}").contains("sk-secret"));
        assert_eq!(
            c.effective_plan_command(),
            "codex -a never exec --sandbox read-only --skip-git-repo-check -C \"$ORCH_WORKSPACE\" -"
        );
        for (k, v) in [("AGENT_CONCURRENCY", "0"), ("AGENT_EXECUTOR", "python"), ("AGENT_KEEP_WORKSPACES", "x")] {
            let e = AgentConfig::from_lookup(|q| (q == k).then(|| v.to_string())).unwrap_err();
            assert_eq!(e.var, k);
        }
        let d = AgentConfig::from_lookup(|_| None).unwrap();
        assert!(d.agent_id.ends_with(&format!("-{}", std::process::id())));
        assert_eq!(d.concurrency, 2);
        assert_eq!(d.keep_workspaces, KeepWorkspaces::OnFailure);
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("codex"), "codex");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
