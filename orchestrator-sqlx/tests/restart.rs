//! PostgreSQL stops mid-run and starts again: operations during the outage (at least one of them sees
//! it) fail with `Unavailable { retryable: true }`
//! (never a panic), the pool recovers once the server is back, and nothing acknowledged is lost.
//!
//! Its own test binary with a single test, so the restart disturbs no other test of this crate.

mod common;

use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::domain::RunOutcome;
use orchestrator_core::ids::WorkItemId;
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::state::WorkItemState;
use orchestrator_core::store::{EnqueueOptions, RunCompletion};
use orchestrator_core::{Error, ManualClock, Orchestrator, OrchestratorConfig, Store, StoreError};
use orchestrator_sqlx::{PgOptions, PgStore};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `pg_ctlcluster ... main <action>` (`stop`, `start`) on the installed cluster.
fn pg_ctl(action: &str) -> std::process::Output {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql lists the installed cluster")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .next()
        .expect("a PostgreSQL cluster");
    std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .output()
        .expect("run pg_ctlcluster")
}

/// Starts the server again when the test fails while it is stopped, so the tests after it find it up.
struct StartOnDrop;

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        pg_ctl("start");
    }
}

fn check_unavailable(e: &Error) {
    match e {
        Error::Store(StoreError::Unavailable { retryable: true, .. }) => {}
        other => panic!("during the outage every failure must be Unavailable {{ retryable: true }}, got {other:?}"),
    }
}

async fn process(orch: &Orchestrator, max: u32, acked: &mut HashSet<WorkItemId>) -> Result<usize, Error> {
    let got = orch
        .claim(ClaimRequest { agent_id: "restart".into(), capabilities: vec![], max, lease_ttl_seconds: None })
        .await?;
    if got.is_empty() {
        return Ok(0);
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
    let results = orch.complete_many(completions).await?;
    for (a, r) in got.iter().zip(results) {
        r.expect("a fenced completion of a fresh claim succeeds");
        acked.insert(a.claimed.work_item.id);
    }
    Ok(got.len())
}

/// `f`, which must finish within 30 s: an operation that hangs fails the test instead of stalling it.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within 30 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_run_is_unavailable_then_recovers_without_losing_acknowledged_work() {
    let schema = common::unique_schema("restart");
    let url = common::url();
    let opts = PgOptions { acquire_timeout: Duration::from_secs(2), ..common::options(&schema) };
    let store = PgStore::connect_with(&url, opts)
        .await
        .expect("the test PostgreSQL must be running")
        .with_guard(common::SchemaGuard { url, schema });
    let store: Arc<dyn Store> = Arc::new(store);
    let clock = ManualClock::at_epoch();
    let orch = Orchestrator::with_clock(store.clone(), OrchestratorConfig::default(), Arc::new(clock.clone()));
    let project = orch.create_project("restart", "faults").await.unwrap();
    let items: Vec<CreateWorkItem> = (0..300)
        .map(|i| CreateWorkItem {
            project_id: Some(project.id),
            title: format!("item {i}"),
            enqueue: Some(EnqueueOptions::default()),
            ..Default::default()
        })
        .collect();
    let created: Vec<WorkItemId> =
        orch.create_work_items(items).await.unwrap().into_iter().map(|c| c.work_item.id).collect();
    let mut acked = HashSet::new();
    while acked.len() < 100 {
        bounded("a claim and completion", process(&orch, 10, &mut acked)).await.unwrap();
    }

    // Stop the server while operations keep coming, and keep them coming until they see it down (a
    // short outage can hide behind the store's retries and the pool's reconnects); then start it.
    let restart_guard = StartOnDrop;
    let stop = tokio::task::spawn_blocking(|| pg_ctl("stop"));
    let mut failures = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.is_finished() || failures == 0 {
        assert!(Instant::now() < deadline, "the stop did not finish, or no operation saw the outage, in time");
        match bounded("a claim and completion", process(&orch, 5, &mut acked)).await {
            Ok(_) => {}
            Err(e) => {
                check_unavailable(&e);
                failures += 1;
            }
        }
        if let Err(e) = bounded("a ping", store.ping()).await {
            check_unavailable(&Error::Store(e));
            failures += 1;
        }
    }
    let out = stop.await.unwrap();
    assert!(out.status.success(), "pg_ctlcluster stop failed: {}", String::from_utf8_lossy(&out.stderr));
    std::mem::forget(restart_guard);
    let out = tokio::task::spawn_blocking(|| pg_ctl("start")).await.unwrap();
    assert!(out.status.success(), "pg_ctlcluster start failed: {}", String::from_utf8_lossy(&out.stderr));

    // Connections from before the restart are dead: the next operations fail (retryably) until the
    // pool has replaced them, then everything works again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match bounded("a ping", store.ping()).await {
            Ok(()) => break,
            Err(e) => {
                check_unavailable(&Error::Store(e));
                assert!(Instant::now() < deadline, "the pool did not recover");
            }
        }
    }
    // Every pooled connection is exercised after the restart; each failure is retryable.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut consecutive_ok = 0;
    while consecutive_ok < 20 {
        assert!(Instant::now() < deadline, "operations did not recover");
        match bounded("stats", orch.store().stats()).await {
            Ok(_) => consecutive_ok += 1,
            Err(e) => {
                check_unavailable(&Error::Store(e));
                consecutive_ok = 0;
            }
        }
    }

    // Nothing acknowledged is lost.
    for id in &acked {
        assert_eq!(store.work_item_get(*id).await.unwrap().state, WorkItemState::Succeeded, "acknowledged {id} lost");
    }
    // Claims whose reply was lost in the outage hold leases that expire; the rest finishes normally.
    clock.advance(chrono::Duration::minutes(5));
    orch.tick().await.unwrap();
    clock.advance(chrono::Duration::hours(2));
    orch.tick().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while bounded("a claim and completion", process(&orch, 50, &mut acked)).await.unwrap() > 0 {
        assert!(Instant::now() < deadline);
    }
    for id in &created {
        assert_eq!(store.work_item_get(*id).await.unwrap().state, WorkItemState::Succeeded);
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.work_items["succeeded"], 300);
}
