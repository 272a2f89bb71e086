//! Two orchestrators with separate pools on one schema (as two replicas would be) and 16 claimers:
//! 10,000 work items are each claimed and completed exactly once, and no lease outlives its fencing.

mod common;

use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::domain::RunOutcome;
use orchestrator_core::ids::WorkItemId;
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::store::{EnqueueOptions, RunCompletion};
use orchestrator_core::{Error, ManualClock, Orchestrator, OrchestratorConfig, Store, StoreError};
use orchestrator_sqlx::PgStore;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ITEMS: usize = 10_000;
const CLAIMERS: usize = 16;

fn lease_lost(r: Result<impl std::fmt::Debug, Error>) -> bool {
    matches!(r, Err(Error::Store(StoreError::LeaseLost { .. })))
}

async fn replicas(prefix: &str) -> (Orchestrator, Orchestrator, ManualClock) {
    let a = common::fresh_store(prefix).await;
    let b = PgStore::connect_with(&common::url(), common::options(a.schema())).await.expect("second replica");
    let clock = ManualClock::at_epoch();
    let config = OrchestratorConfig::default();
    let oa = Orchestrator::with_clock(Arc::new(a) as Arc<dyn Store>, config.clone(), Arc::new(clock.clone()));
    let ob = Orchestrator::with_clock(Arc::new(b) as Arc<dyn Store>, config, Arc::new(clock.clone()));
    (oa, ob, clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_claim_each_item_exactly_once() {
    let (oa, ob, _clock) = replicas("mp").await;
    let project = oa.create_project("mp", "two replicas").await.unwrap();
    let mut created = Vec::with_capacity(ITEMS);
    for chunk in (0..ITEMS).collect::<Vec<_>>().chunks(1000) {
        let items = chunk
            .iter()
            .map(|i| CreateWorkItem {
                project_id: Some(project.id),
                title: format!("item {i}"),
                priority: (*i % 5) as i32,
                enqueue: Some(EnqueueOptions::default()),
                ..Default::default()
            })
            .collect();
        created.extend(oa.create_work_items(items).await.unwrap().into_iter().map(|c| c.work_item.id));
    }
    assert_eq!(created.len(), ITEMS);

    let claims: Arc<Mutex<HashMap<WorkItemId, u32>>> = Arc::new(Mutex::new(HashMap::with_capacity(ITEMS)));
    let done = Arc::new(AtomicUsize::new(0));
    let stale_checked = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tasks = Vec::new();
    for c in 0..CLAIMERS {
        let orch = if c % 2 == 0 { oa.clone() } else { ob.clone() };
        let (claims, done, stale_checked) = (claims.clone(), done.clone(), stale_checked.clone());
        tasks.push(tokio::spawn(async move {
            let agent = format!("agent-{c}");
            loop {
                if done.load(Ordering::SeqCst) >= ITEMS {
                    return;
                }
                assert!(Instant::now() < deadline, "claimers did not finish in time");
                let seen = orch.work_generation().await;
                let got = orch
                    .claim(ClaimRequest {
                        agent_id: agent.clone(),
                        capabilities: vec![],
                        max: 32,
                        lease_ttl_seconds: None,
                    })
                    .await
                    .expect("claim");
                if got.is_empty() {
                    orch.wait_for_work(seen, Duration::from_millis(50)).await;
                    continue;
                }
                {
                    let mut m = claims.lock().unwrap();
                    for a in &got {
                        *m.entry(a.claimed.work_item.id).or_default() += 1;
                    }
                }
                let completions = got
                    .iter()
                    .map(|a| RunCompletion {
                        run_id: a.run_id(),
                        token: a.token(),
                        outcome: RunOutcome::Succeeded { exit_code: Some(0) },
                        usage: None,
                    })
                    .collect();
                let results = orch.complete_many(completions).await.expect("complete batch");
                for r in &results {
                    assert!(r.is_ok(), "completion refused: {r:?}");
                }
                // A finished run's token no longer fences anything: heartbeat and completion are refused.
                let first = &got[0];
                assert!(lease_lost(orch.heartbeat(first.run_id(), first.token()).await));
                assert!(lease_lost(
                    orch.complete(first.run_id(), first.token(), RunOutcome::Succeeded { exit_code: None }, None).await
                ));
                stale_checked.fetch_add(1, Ordering::Relaxed);
                done.fetch_add(got.len(), Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.expect("claimer task");
    }
    let m = claims.lock().unwrap().clone();
    assert_eq!(m.len(), ITEMS, "every item claimed");
    assert!(m.values().all(|n| *n == 1), "an item was claimed twice");
    assert!(created.iter().all(|id| m.contains_key(id)));
    assert!(stale_checked.load(Ordering::Relaxed) > 0);
    for orch in [&oa, &ob] {
        let stats = orch.store().stats().await.unwrap();
        assert_eq!(stats.work_items["succeeded"], ITEMS as u64);
        assert_eq!(stats.runs["succeeded"], ITEMS as u64);
        assert_eq!(stats.runs.values().sum::<u64>(), ITEMS as u64, "exactly one run per item");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_lease_is_fenced_on_the_other_replica() {
    let (oa, ob, clock) = replicas("fence").await;
    let project = oa.create_project("fence", "fencing").await.unwrap();
    let item = oa
        .create_work_item(CreateWorkItem {
            project_id: Some(project.id),
            title: "contended".into(),
            enqueue: Some(EnqueueOptions::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .work_item;
    let claim = |agent: &str| ClaimRequest {
        agent_id: agent.into(),
        capabilities: vec![],
        max: 1,
        lease_ttl_seconds: Some(30),
    };
    let old = oa.claim(claim("a")).await.unwrap().remove(0);
    assert_eq!(old.claimed.work_item.id, item.id);
    assert!(ob.claim(claim("b")).await.unwrap().is_empty(), "a held item is not claimable elsewhere");

    // The lease expires; replica B reaps it and, once the retry is due, claims the item again.
    clock.advance(chrono::Duration::seconds(31));
    assert!(lease_lost(oa.heartbeat(old.run_id(), old.token()).await), "an expired lease cannot be renewed");
    let report = ob.tick().await.unwrap();
    assert_eq!(report.reaped.len(), 1);
    clock.advance(chrono::Duration::hours(1));
    ob.tick().await.unwrap();
    let new = ob.claim(claim("b")).await.unwrap().remove(0);
    assert_eq!(new.claimed.work_item.id, item.id);
    assert_ne!(new.run_id(), old.run_id());

    // The old holder is fenced out on every write; the new one proceeds.
    assert!(lease_lost(oa.heartbeat(old.run_id(), old.token()).await));
    assert!(lease_lost(oa.start(old.run_id(), old.token()).await));
    assert!(lease_lost(oa.complete(old.run_id(), old.token(), RunOutcome::Succeeded { exit_code: None }, None).await));
    oa.heartbeat(new.run_id(), new.token()).await.expect("the new holder's lease is valid on any replica");
    ob.complete(new.run_id(), new.token(), RunOutcome::Succeeded { exit_code: Some(0) }, None).await.unwrap();
    assert!(lease_lost(oa.heartbeat(new.run_id(), new.token()).await), "no lease outlives its run");
    assert_eq!(oa.store().work_item_get(item.id).await.unwrap().state.as_str(), "succeeded");
}
