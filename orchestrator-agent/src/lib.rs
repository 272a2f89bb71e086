//! # orchestrator-agent
//!
//! The agent that does the work: it claims runs, heartbeats their leases, plans steps, asks humans for
//! missing inputs, executes, streams logs and completes. The same code runs embedded in a host program
//! (over the in-process [`orchestrator_core::Orchestrator`], which implements
//! [`orchestrator_core::AgentApi`]) or remote (over [`HttpAgentApi`], the HTTP client of the agent
//! protocol).
//!
//! ```no_run
//! # async fn demo(orch: orchestrator_core::Orchestrator) -> Result<(), Box<dyn std::error::Error>> {
//! use orchestrator_agent::{Agent, AgentConfig};
//! use std::sync::Arc;
//! let config = AgentConfig::from_env()?;
//! let report = Agent::new(Arc::new(orch), config)
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! println!("{report:?}");
//! # Ok(()) }
//! ```
//!
//! - [`Agent`]: the loop. It claims as many runs as it has free slots (`AGENT_CONCURRENCY`), wakes at
//!   once on the orchestrator's wake-up signal (`work_generation` / `wait_for_work`, a long poll over
//!   HTTP) and polls with jitter as a fallback; one task per run renews the lease at a third of its TTL;
//!   a lost lease (expired, run cancelled, reclaimed) kills the run's processes and nothing more is
//!   written for it; on shutdown it stops claiming, lets running work go on for
//!   `AGENT_SHUTDOWN_GRACE_SECONDS`, then cancels what is left and releases it (completes it as failed
//!   and retryable: the core has no other way to hand a run back, so the release counts as an attempt).
//! - Planning ([`planner`]): the recipe, then (with `AGENT_ENABLE_LLM_PLANNING`) an LLM command
//!   (`CODEX_PLAN_CMD`), then (with `AGENT_ALLOW_OPENAI_FALLBACK` and `OPENAI_API_KEY`) an
//!   OpenAI-compatible chat endpoint, then deterministic inference; the plan is recorded as a `planned`
//!   step event named after the planner, with the planners that fell through.
//! - Executors: [`ShellExecutor`] (`AGENT_EXECUTOR=shell`, default), [`CodexExecutor`]
//!   (`AGENT_EXECUTOR=codex`), or any implementation of [`orchestrator_core::Executor`] given to
//!   [`Agent::with_executor`].
//! - Info requests: recipe inputs without an answer or default become questions; the run then waits
//!   without holding a slot and resumes, on a later claim, after its last completed step with the
//!   answers in the step environment. Secret answers are redacted ([`Redactor`]) from every log line
//!   and step event.
//! - Workspaces: `AGENT_WORKSPACE_ROOT/<run id>`, kept or removed by `AGENT_KEEP_WORKSPACES`.

#![forbid(unsafe_code)]

mod agent;
pub mod codex;
pub mod config;
pub mod git;
pub mod http;
pub mod planner;
mod process;
pub mod redact;
pub mod shell;
mod sink;

pub use agent::{missing_inputs, Agent, AgentError, AgentReport};
pub use codex::CodexExecutor;
pub use config::{AgentConfig, ConfigError, ExecutorKind, KeepWorkspaces};
pub use git::GitSettings;
pub use http::HttpAgentApi;
pub use planner::{default_planners, CommandPlanner, InferencePlanner, OpenAiPlanner, RecipePlanner};
pub use redact::Redactor;
pub use shell::ShellExecutor;
