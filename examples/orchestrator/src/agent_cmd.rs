//! `orchestrator agent`: runs an agent against a remote orchestrator server over HTTP until SIGTERM or
//! Ctrl-C. Settings come from the `AGENT_*` environment variables (see `orchestrator_agent::AgentConfig`).

use orchestrator_agent::{Agent, AgentConfig, HttpAgentApi};
use std::sync::Arc;

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received; shutting down"),
        _ = term => tracing::info!("SIGTERM received; shutting down"),
    }
}

/// Runs the agent against `server_url` (e.g. `http://127.0.0.1:8080`) with an optional bearer token,
/// until SIGTERM or Ctrl-C; running work then gets `AGENT_SHUTDOWN_GRACE_SECONDS` to finish before it is
/// cancelled and released.
pub async fn run(server_url: String, token: Option<String>) -> Result<(), Box<dyn std::error::Error>> {
    let config = AgentConfig::from_env()?;
    tracing::info!(
        server = %server_url,
        agent_id = %config.agent_id,
        concurrency = config.concurrency,
        executor = ?config.executor,
        workspace_root = %config.workspace_root.display(),
        "starting agent"
    );
    let client = crate::tls::client_builder()?
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let api = Arc::new(HttpAgentApi::with_client(server_url, token, client));
    let report = Agent::new(api, config).run(shutdown_signal()).await?;
    tracing::info!(
        claimed = report.claimed,
        succeeded = report.succeeded,
        failed = report.failed,
        waiting_input = report.waiting_input,
        lost = report.lost,
        released = report.released,
        errors = report.errors,
        "agent stopped"
    );
    Ok(())
}
