//! Concurrent claims and completions combined into shared statements: each call keeps its own agent,
//! limit, lease, time and results, and one refused completion does not affect the others.
//!
//! Most tests hold the store's only pooled connection while their calls queue, so they are combined
//! deterministically once it is released; the last one checks that a lone caller is never left waiting.

mod common;

use chrono::{DateTime, SubsecRound, Utc};
use orchestrator_core::domain::RunOutcome;
use orchestrator_core::ids::{ProjectId, WorkItemId};
use orchestrator_core::state::WorkItemState;
use orchestrator_core::store::{Claim, ClaimedRun, CompleteMany, NewProject, RunCompletion};
use orchestrator_core::{Store, StoreError};
use orchestrator_sqlx::{PgOptions, PgStore};
use sqlx::Connection as _;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::new_item;

/// A store with one pooled connection and one combined statement of each kind at a time.
async fn store(prefix: &str) -> Arc<PgStore> {
    Arc::new(combining_store(prefix, 1, 512, 1).await)
}

/// A store on a fresh schema with this pool size and combining.
async fn combining_store(prefix: &str, connections: u32, max_runs: u32, in_flight: u32) -> PgStore {
    common::store_with(prefix, |o| PgOptions {
        max_connections: connections,
        combine_max_runs: max_runs,
        combine_in_flight: in_flight,
        ..o
    })
    .await
}

async fn project_with_items(store: &PgStore, n: usize, label: Option<&str>) -> (ProjectId, Vec<WorkItemId>) {
    let p = ProjectId::new();
    store
        .project_create(NewProject {
            id: p,
            name: "p".into(),
            description: String::new(),
            repository: None,
            now: Utc::now(),
        })
        .await
        .unwrap();
    let items: Vec<_> = (0..n)
        .map(|i| {
            let mut it = new_item(p, &format!("item {i}"));
            it.labels = label.map(|l| vec![l.to_string()]).unwrap_or_default();
            it
        })
        .collect();
    let ids = items.iter().map(|i| i.id).collect();
    store.work_items_create(items, Utc::now()).await.unwrap();
    (p, ids)
}

/// Polls `done` until it holds (the calls have reached the store's queue), with a deadline.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn claim(agent: &str, limit: u32, capabilities: &[&str], now: DateTime<Utc>) -> Claim {
    Claim {
        agent_id: agent.into(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        limit,
        lease_ttl: chrono::Duration::seconds(30),
        now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_claims_keep_each_callers_agent_limit_lease_and_time() {
    let store = store("comb_claim").await;
    let (_, items) = project_with_items(&store, 40, None).await;
    let base = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let before = store.combining();

    let held = store.pool().acquire().await.unwrap();
    let mut calls = Vec::new();
    for i in 0..8u32 {
        let (store, c) = (
            store.clone(),
            claim(&format!("agent-{i}"), i + 1, &[], base + chrono::Duration::milliseconds(i64::from(i))),
        );
        calls.push(tokio::spawn(async move { store.runs_claim(c.clone()).await.map(|runs| (c, runs)) }));
    }
    until("8 queued claims", || store.combining().claim_calls - before.claim_calls == 8).await;
    drop(held);

    let mut results: Vec<(Claim, Vec<ClaimedRun>)> = Vec::new();
    for c in calls {
        results.push(c.await.unwrap().unwrap());
    }
    let statements = store.combining().claim_statements - before.claim_statements;
    assert!(statements <= 2, "8 queued claims ran in {statements} statements");

    let mut runs = HashSet::new();
    let mut claimed_items = HashSet::new();
    for (c, got) in &results {
        // 36 runs asked for, 40 ready: every claim gets its whole limit.
        assert_eq!(got.len() as u32, c.limit, "{} asked for {}", c.agent_id, c.limit);
        for r in got {
            assert!(runs.insert(r.run.id), "run {} handed out twice", r.run.id);
            assert!(claimed_items.insert(r.work_item.id), "item {} claimed twice", r.work_item.id);
            assert_eq!(r.run.agent_id, c.agent_id);
            assert_eq!(r.lease.expires_at, c.now + c.lease_ttl);
            assert_eq!(r.run.claimed_at, c.now);
            // What the store wrote is what the caller was told.
            let stored = store.run_get(r.run.id).await.unwrap();
            assert_eq!(stored.agent_id, c.agent_id);
            assert_eq!(stored.lease_expires_at, Some(c.now + c.lease_ttl));
            assert_eq!(stored.claimed_at, c.now);
            assert_eq!(stored.heartbeat_at, Some(c.now));
            let item = store.work_item_get(r.work_item.id).await.unwrap();
            assert_eq!(item.state, WorkItemState::Running);
            assert_eq!(item.current_run_id, Some(r.run.id));
            assert_eq!(item.updated_at, c.now);
        }
    }
    assert_eq!(claimed_items.len(), 36);
    assert!(claimed_items.iter().all(|i| items.contains(i)));
    // The 4 left are still claimable.
    let rest = store.runs_claim(claim("late", 10, &[], base + chrono::Duration::seconds(1))).await.unwrap();
    assert_eq!(rest.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_with_other_capabilities_are_not_combined() {
    let store = store("comb_caps").await;
    let (p, _) = project_with_items(&store, 5, Some("gpu")).await;
    let plain: Vec<_> = (0..5).map(|i| new_item(p, &format!("plain {i}"))).collect();
    store.work_items_create(plain, Utc::now()).await.unwrap();
    let now = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let before = store.combining();

    let held = store.pool().acquire().await.unwrap();
    let (s1, s2) = (store.clone(), store.clone());
    let gpu = tokio::spawn(async move { s1.runs_claim(claim("gpu-agent", 10, &["gpu"], now)).await });
    let cpu = tokio::spawn(async move { s2.runs_claim(claim("cpu-agent", 10, &[], now)).await });
    until("2 queued claims", || store.combining().claim_calls - before.claim_calls == 2).await;
    drop(held);
    let (gpu, cpu) = (gpu.await.unwrap().unwrap(), cpu.await.unwrap().unwrap());

    assert_eq!(store.combining().claim_statements - before.claim_statements, 2);
    assert!(cpu.iter().all(|r| r.work_item.labels.is_empty()), "an agent without the capability got a gpu item");
    assert_eq!(gpu.len() + cpu.len(), 10);
    assert!(gpu.iter().all(|r| r.run.agent_id == "gpu-agent"));
    assert!(cpu.iter().all(|r| r.run.agent_id == "cpu-agent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_completions_answer_each_call_and_refuse_only_the_bad_one() {
    let store = store("comb_done").await;
    project_with_items(&store, 24, None).await;
    let now = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let claimed = store.runs_claim(claim("agent", 24, &[], now)).await.unwrap();
    assert_eq!(claimed.len(), 24);
    let before = store.combining();

    let held = store.pool().acquire().await.unwrap();
    let mut calls = Vec::new();
    for (k, chunk) in claimed.chunks(4).enumerate() {
        let completions: Vec<RunCompletion> = chunk
            .iter()
            .enumerate()
            .map(|(j, r)| RunCompletion {
                run_id: r.run.id,
                // The second completion of the fourth call carries a stale token.
                token: if k == 3 && j == 1 { r.lease.token + 1 } else { r.lease.token },
                outcome: RunOutcome::Succeeded { exit_code: Some(k as i32) },
                usage: None,
            })
            .collect();
        let p =
            CompleteMany { completions, retry_defaults: Default::default(), now: now + chrono::Duration::seconds(1) };
        let s = store.clone();
        calls.push(tokio::spawn(async move { s.runs_complete_many(p).await }));
    }
    until("6 queued completions", || store.combining().completion_calls - before.completion_calls == 6).await;
    drop(held);

    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap().unwrap());
    }
    let transactions = store.combining().completion_transactions - before.completion_transactions;
    assert!(transactions <= 2, "6 queued completion calls ran in {transactions} transactions");

    let bad = claimed[3 * 4 + 1].run.id;
    for (k, (chunk, got)) in claimed.chunks(4).zip(&results).enumerate() {
        assert_eq!(got.len(), 4, "call {k} got {} answers", got.len());
        for (r, res) in chunk.iter().zip(got) {
            if r.run.id == bad {
                assert!(matches!(res, Err(StoreError::LeaseLost { .. })), "stale token accepted: {res:?}");
                continue;
            }
            let done = res.as_ref().unwrap_or_else(|e| panic!("run {} refused: {e}", r.run.id));
            assert_eq!(done.run.id, r.run.id, "call {k} got another call's answer");
            assert_eq!(done.run.exit_code, Some(k as i32));
            assert_eq!(done.work_item_state, WorkItemState::Succeeded);
        }
    }
    // The refused run is untouched and can still be completed with its token.
    let b = &claimed[3 * 4 + 1];
    assert_eq!(store.work_item_get(b.work_item.id).await.unwrap().state, WorkItemState::Running);
    let again = store.runs_complete_many(completion(b, now + chrono::Duration::seconds(2))).await.unwrap();
    assert!(again[0].is_ok());
}

/// While a claim statement runs, a second one starts only when it carries a quarter of the maximum:
/// small calls wait and are combined instead of running side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_statement_waits_until_it_is_worth_running() {
    let store = Arc::new(combining_store("comb_fill", 1, 40, 2).await);
    project_with_items(&store, 20, None).await;
    let now = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let before = store.combining();
    let queued = |n: u64| {
        let store = store.clone();
        move || store.combining().claim_calls - before.claim_calls == n
    };

    let held = store.pool().acquire().await.unwrap();
    let mut calls = Vec::new();
    // The first runs at once (and waits for the held connection); the next two, one run each, stay
    // queued; the fourth brings the queue to 11 runs, past the quarter (10), and starts the second.
    for (i, limit) in [1u32, 1, 1, 9].into_iter().enumerate() {
        let s = store.clone();
        calls.push(tokio::spawn(async move { s.runs_claim(claim(&format!("a{i}"), limit, &[], now)).await }));
        until("the call to reach the store", queued(i as u64 + 1)).await;
        if i == 0 {
            let s = store.clone();
            until("the first statement to start", move || {
                s.combining().claim_statements - before.claim_statements == 1
            })
            .await;
        }
    }
    drop(held);
    let mut got = 0;
    for c in calls {
        got += c.await.unwrap().unwrap().len();
    }
    assert_eq!(got, 12);
    let statements = store.combining().claim_statements - before.claim_statements;
    assert_eq!(statements, 2, "4 calls ran in {statements} statements");
}

/// A completion whose caller went away is still applied, also when it was still queued as the store
/// was dropped: the store's task drains its queue before it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_completions_are_applied_after_their_callers_and_the_store_are_gone() {
    let owner = store("comb_drop").await;
    project_with_items(&owner, 2, None).await;
    let now = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let claimed = owner.runs_claim(claim("agent", 2, &[], now)).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let options = PgOptions {
        max_connections: 1,
        combine_max_runs: 512,
        combine_in_flight: 1,
        migrate: false,
        ..common::options(owner.schema())
    };
    let store = Arc::new(PgStore::connect_with(&common::url(), options).await.unwrap());
    let complete = |r: &ClaimedRun| completion(r, now + chrono::Duration::seconds(1));

    let held = store.pool().acquire().await.unwrap();
    let (s, p) = (store.clone(), complete(&claimed[0]));
    let first = tokio::spawn(async move { s.runs_complete_many(p).await });
    let s = store.clone();
    until("the first completion to start", move || s.combining().completion_transactions == 1).await;
    let (s, p) = (store.clone(), complete(&claimed[1]));
    let second = tokio::spawn(async move { s.runs_complete_many(p).await });
    let s = store.clone();
    until("the second completion to queue", move || s.combining().completion_calls == 2).await;

    // Both callers go away, then the store.
    first.abort();
    second.abort();
    let _ = first.await;
    let _ = second.await;
    drop(store);
    drop(held);

    let deadline = Instant::now() + Duration::from_secs(20);
    for r in &claimed {
        loop {
            let state = owner.work_item_get(r.work_item.id).await.unwrap().state;
            if state == WorkItemState::Succeeded {
                break;
            }
            assert!(Instant::now() < deadline, "run {} was not completed: item {state:?}", r.run.id);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn completion(r: &ClaimedRun, now: DateTime<Utc>) -> CompleteMany {
    CompleteMany { completions: vec![common::success(r)], retry_defaults: Default::default(), now }
}

/// Completions combined into one transaction are judged at their own callers' times: one whose lease
/// is still valid at its time succeeds beside one whose lease has expired at its (later) time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_completions_keep_their_callers_times() {
    let store = store("comb_times").await;
    project_with_items(&store, 3, None).await;
    let now = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let claimed = store.runs_claim(claim("agent", 3, &[], now)).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let before = store.combining();

    let held = store.pool().acquire().await.unwrap();
    // The first call takes the only slot; the next two queue behind it and are combined.
    let s = store.clone();
    let first = completion(&claimed[0], now + chrono::Duration::seconds(1));
    let first = tokio::spawn(async move { s.runs_complete_many(first).await });
    let s = store.clone();
    until("the first completion to start", move || {
        s.combining().completion_transactions - before.completion_transactions == 1
    })
    .await;
    let (in_time, late) = (now + chrono::Duration::seconds(10), now + chrono::Duration::seconds(60));
    let (s1, s2) = (store.clone(), store.clone());
    let (a, b) = (completion(&claimed[1], in_time), completion(&claimed[2], late));
    let a = tokio::spawn(async move { s1.runs_complete_many(a).await });
    let b = tokio::spawn(async move { s2.runs_complete_many(b).await });
    until("3 queued completions", || store.combining().completion_calls - before.completion_calls == 3).await;
    drop(held);

    assert!(first.await.unwrap().unwrap()[0].is_ok());
    let a = a.await.unwrap().unwrap().remove(0).expect("the completion inside its lease was refused");
    assert_eq!(a.run.finished_at, Some(in_time));
    let b = b.await.unwrap().unwrap().remove(0);
    assert!(matches!(b, Err(StoreError::LeaseLost { .. })), "a completion after its lease expired: {b:?}");
    assert_eq!(store.combining().completion_transactions - before.completion_transactions, 2, "not combined");
    let item = store.work_item_get(claimed[1].work_item.id).await.unwrap();
    assert_eq!(item.updated_at, in_time);
}

/// A completion that waits for a row lock (here an open transaction holding its work item) does not
/// hold up the completions of other calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_waiting_for_a_lock_holds_up_nobody() {
    let store = Arc::new(combining_store("comb_lock", 4, 512, 1).await);
    let (url, schema) = (common::url(), store.schema().to_string());
    project_with_items(&store, 3, None).await;
    let now = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let claimed = store.runs_claim(claim("agent", 3, &[], now)).await.unwrap();
    assert_eq!(claimed.len(), 3);

    // Another session holds the first item's row.
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut other).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT 1 FROM {schema}.work_items WHERE id = $1 FOR UPDATE")))
        .bind(claimed[0].work_item.id.0)
        .execute(&mut *tx)
        .await
        .unwrap();

    let s = store.clone();
    let p = completion(&claimed[0], now + chrono::Duration::seconds(1));
    let blocked = tokio::spawn(async move { s.runs_complete_many(p).await });
    let s = store.clone();
    until("the blocked completion to start", move || s.combining().completion_transactions >= 1).await;
    for r in &claimed[1..] {
        let done = tokio::time::timeout(
            Duration::from_secs(10),
            store.runs_complete_many(completion(r, now + chrono::Duration::seconds(1))),
        )
        .await
        .expect("a completion waited behind another call's lock")
        .unwrap();
        assert!(done[0].is_ok(), "{:?}", done[0]);
    }
    assert!(!blocked.is_finished(), "the first completion did not wait for the lock");
    tx.rollback().await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(10), blocked).await.unwrap().unwrap().unwrap();
    assert!(done[0].is_ok(), "{:?}", done[0]);
}

/// The answer to a call that did not return in time.
fn late<T>(what: String) -> impl FnOnce(tokio::time::error::Elapsed) -> T {
    move |_| panic!("{what} waited 10 s: a combining task missed a wake-up")
}

/// One caller alone, call after call: each call arrives while the statement that answered the previous
/// one still holds its slot, so the combining task waits for that slot, and the slot's release must wake
/// it. End to end, each call must return within the deadline (the order of release and wake-up itself
/// is pinned by a unit test in `combine.rs`: at natural timing a lost wake-up here is rare).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_callers_calls_are_never_left_waiting() {
    let store = combining_store("lone", 4, 512, 2).await;
    let n = 1500;
    project_with_items(&store, n, None).await;
    for i in 0..n {
        let got = tokio::time::timeout(Duration::from_secs(10), store.runs_claim(claim("lone", 1, &[], Utc::now())))
            .await
            .unwrap_or_else(late(format!("claim {i}")))
            .unwrap();
        assert_eq!(got.len(), 1, "claim {i}");
        let completion = common::success(&got[0]);
        let p = CompleteMany { completions: vec![completion], retry_defaults: Default::default(), now: Utc::now() };
        let r = tokio::time::timeout(Duration::from_secs(10), store.runs_complete_many(p))
            .await
            .unwrap_or_else(late(format!("completion {i}")))
            .unwrap();
        r.into_iter().next().unwrap().unwrap();
    }
}

/// With combining on, `runs_complete_and_claim` completes through the combined completions and then
/// claims through the combined claims (its own transaction would keep it out of both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_and_claim_goes_through_the_combiners() {
    let store = store("cc").await;
    project_with_items(&store, 4, None).await;
    let first = store.runs_claim(claim("a", 2, &[], Utc::now())).await.unwrap();
    assert_eq!(first.len(), 2);
    let before = store.combining();
    let completions = first.iter().map(common::success).collect();
    let now = Utc::now();
    let out = store
        .runs_complete_and_claim(
            CompleteMany { completions, retry_defaults: Default::default(), now },
            claim("a", 2, &[], now),
        )
        .await
        .unwrap();
    for r in out.completed {
        assert_eq!(r.unwrap().work_item_state, WorkItemState::Succeeded);
    }
    let next = out.claimed.unwrap();
    assert_eq!(next.len(), 2);
    assert!(next.iter().all(|c| first.iter().all(|f| f.work_item.id != c.work_item.id)));
    let after = store.combining();
    assert_eq!(after.completion_calls - before.completion_calls, 1);
    assert_eq!(after.completion_transactions - before.completion_transactions, 1);
    assert_eq!(after.claim_calls - before.claim_calls, 1);
    assert_eq!(after.claim_statements - before.claim_statements, 1);
}

/// Calls below the fill wait for a running statement only so long: when it hangs (here: it waits for
/// the pool's only connection, held by the test), a call queued behind it starts its own statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_behind_a_hung_statement_starts_after_a_while() {
    let store = Arc::new(
        common::store_with("comb_hung", |o| PgOptions {
            max_connections: 1,
            combine_max_runs: 40,
            combine_in_flight: 2,
            acquire_timeout: Duration::from_secs(30),
            ..o
        })
        .await,
    );
    project_with_items(&store, 4, None).await;
    let now = Utc::now().trunc_subsecs(6) + chrono::Duration::seconds(1);
    let before = store.combining();
    let held = store.pool().acquire().await.unwrap();
    let mut calls = Vec::new();
    for i in 0..2u64 {
        let s = store.clone();
        calls.push(tokio::spawn(async move { s.runs_claim(claim(&format!("a{i}"), 1, &[], now)).await }));
        let s = store.clone();
        until("the call to reach the store", move || s.combining().claim_calls - before.claim_calls == i + 1).await;
        if i == 0 {
            // Started before the second call is sent (queued together, the two would be combined).
            let s = store.clone();
            until("the first statement to start", move || {
                s.combining().claim_statements - before.claim_statements == 1
            })
            .await;
        }
    }
    // The first statement waits for the held connection; the second call (1 run, below the fill of 10)
    // starts its own statement beside it once it has waited long enough.
    let s = store.clone();
    until("the second statement to start", move || s.combining().claim_statements - before.claim_statements == 2).await;
    drop(held);
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().len(), 1);
    }
}
