//! Claimers waiting through the facade wake when work scheduled for later becomes due.

use chrono::Utc;
use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::domain::RunOutcome;
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::retry::{FailureKind, RetryOverrides};
use orchestrator_core::store::EnqueueOptions;
use orchestrator_core::{MemoryStore, Orchestrator, OrchestratorConfig};
use std::sync::Arc;
use std::time::Duration;

fn claim_req() -> ClaimRequest {
    ClaimRequest { agent_id: "a".into(), capabilities: vec![], max: 1, lease_ttl_seconds: None }
}

/// Waits for work (as an agent loop does) until a claim succeeds; false when the waits ran out.
async fn wait_and_claim(orch: &Orchestrator) -> bool {
    for _ in 0..5 {
        let seen = orch.work_generation().await;
        if !orch.claim(claim_req()).await.unwrap().is_empty() {
            return true;
        }
        // Nothing notifies in this test: only the due time can end the wait early.
        if !orch.wait_for_work(seen, Duration::from_secs(30)).await {
            return false;
        }
    }
    false
}

#[tokio::test]
async fn a_not_before_time_wakes_waiting_claimers() {
    let orch = Orchestrator::new(Arc::new(MemoryStore::new()), OrchestratorConfig::default());
    let p = orch.create_project("p", "").await.unwrap();
    let not_before = Utc::now() + chrono::Duration::milliseconds(300);
    orch.create_work_item(CreateWorkItem {
        project_id: Some(p.id),
        title: "later".into(),
        enqueue: Some(EnqueueOptions { not_before: Some(not_before), ..Default::default() }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(orch.claim(claim_req()).await.unwrap().is_empty(), "not claimable before its time");
    assert!(wait_and_claim(&orch).await, "the waiter woke at the not-before time and claimed");
    assert!(Utc::now() >= not_before);
}

#[tokio::test]
async fn a_retry_time_wakes_waiting_claimers() {
    let mut config = OrchestratorConfig::default();
    config.retry.backoff_base_seconds = 0.3;
    config.retry.jitter = 0.0;
    let orch = Orchestrator::new(Arc::new(MemoryStore::new()), config);
    let p = orch.create_project("p", "").await.unwrap();
    orch.create_work_item(CreateWorkItem {
        project_id: Some(p.id),
        title: "flaky".into(),
        retry: RetryOverrides::default(),
        enqueue: Some(EnqueueOptions::default()),
        ..Default::default()
    })
    .await
    .unwrap();
    let a = orch.claim(claim_req()).await.unwrap().pop().unwrap();
    let failed = RunOutcome::Failed { error: "boom".into(), exit_code: Some(1), kind: FailureKind::Retryable };
    let done = orch.complete(a.run_id(), a.token(), failed, None).await.unwrap();
    let retry_at = done.retry_at.expect("retried later");
    assert!(wait_and_claim(&orch).await, "the waiter woke at the retry time and claimed");
    assert!(Utc::now() >= retry_at);
}
