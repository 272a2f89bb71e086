//! When the orchestrator cannot be reached for longer than the lease, the agent stops the run's
//! processes (the lease has run out and the run may go to another agent).

mod common;

use async_trait::async_trait;
use common::*;
use orchestrator_agent::Agent;
use orchestrator_core::agent::{AgentApi, Assignment, ClaimRequest};
use orchestrator_core::domain::*;
use orchestrator_core::ids::RunId;
use orchestrator_core::store::{CompletionResult, NewInfoRequest};
use orchestrator_core::{Error, Orchestrator, StoreError};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The in-process orchestrator, with heartbeats failing as if the network were down.
struct NoHeartbeats {
    inner: Orchestrator,
    down: AtomicBool,
    failed: AtomicU32,
}

fn down() -> Error {
    Error::Store(StoreError::Unavailable { retryable: true, message: "network down".into() })
}

#[async_trait]
impl AgentApi for NoHeartbeats {
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Assignment>, Error> {
        self.inner.claim(req).await
    }
    async fn work_generation(&self) -> u64 {
        self.inner.work_generation().await
    }
    async fn wait_for_work(&self, seen: u64, timeout: Duration) -> bool {
        self.inner.wait_for_work(seen, timeout).await
    }
    async fn heartbeat(&self, run_id: RunId, token: u64) -> Result<Lease, Error> {
        if self.down.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(down());
        }
        self.inner.heartbeat(run_id, token).await
    }
    async fn start(&self, run_id: RunId, token: u64) -> Result<Run, Error> {
        self.inner.start(run_id, token).await
    }
    async fn append_logs(&self, run_id: RunId, token: u64, lines: Vec<NewLogLine>) -> Result<u64, Error> {
        self.inner.append_logs(run_id, token, lines).await
    }
    async fn record_steps(
        &self,
        run_id: RunId,
        token: u64,
        events: Vec<NewStepEvent>,
    ) -> Result<Vec<StepEvent>, Error> {
        self.inner.record_steps(run_id, token, events).await
    }
    async fn ask(&self, run_id: RunId, token: u64, questions: Vec<NewInfoRequest>) -> Result<Vec<InfoRequest>, Error> {
        self.inner.ask(run_id, token, questions).await
    }
    async fn complete(
        &self,
        run_id: RunId,
        token: u64,
        outcome: RunOutcome,
        usage: Option<Usage>,
    ) -> Result<CompletionResult, Error> {
        self.inner.complete(run_id, token, outcome, usage).await
    }
    async fn release(&self, run_id: RunId, token: u64) -> Result<Run, Error> {
        self.inner.release(run_id, token).await
    }
    async fn record_result(&self, run_id: RunId, token: u64, result: RunResult, patch: String) -> Result<(), Error> {
        self.inner.record_result(run_id, token, result, patch).await
    }
    async fn wait_for_cancellations(&self, held: Vec<(RunId, u64)>, timeout: Duration) -> Result<Vec<RunId>, Error> {
        if self.down.load(Ordering::SeqCst) {
            tokio::time::sleep(timeout.min(Duration::from_millis(200))).await;
            return Err(down());
        }
        self.inner.wait_for_cancellations(held, timeout).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_lease_cannot_be_renewed_is_stopped_when_the_lease_runs_out() {
    let h = Harness::new().await;
    let pidfile = h.path("sleep.pid");
    let recipe =
        h.recipe(&format!("name: long\nsteps:\n  - \"sleep 300 & echo $! > {}; wait\"\n", pidfile.display())).await;
    let item = h.item("long", "", Some(recipe)).await;
    let api = Arc::new(NoHeartbeats { inner: h.orch.clone(), down: AtomicBool::new(true), failed: AtomicU32::new(0) });
    let agent = h.start_agent(Agent::new(api.clone(), h.config("cut-off").with_lease_ttl_seconds(1)));
    let pid = read_pid(&pidfile).await;
    wait_for("the step's process to be stopped", Duration::from_secs(15), || async { process_gone(pid).then_some(()) })
        .await;
    assert!(api.failed.load(Ordering::SeqCst) >= 1);
    let report = agent.shutdown().await;
    assert_eq!(report.lost, 1, "{report:?}");
    // The agent wrote nothing final for it: the orchestrator reaped the expired lease.
    wait_for("the run to be reaped as lost", Duration::from_secs(10), || async {
        (h.runs(item).await[0].state == orchestrator_core::state::RunState::Lost).then_some(())
    })
    .await;
}
