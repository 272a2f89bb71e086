//! Conformance cases for the scheduler: claim order and exclusivity, capabilities, not-before times,
//! dependencies (release, blocking, cycles), retries and backoff, leases and fencing, requeue and
//! cancel, the queue views, stats and wake-ups.

use super::Harness;
use crate::agent::{AgentApi, Assignment, ClaimRequest};
use crate::clock::Clock;
use crate::domain::*;
use crate::error::{Error, StoreError};
use crate::ids::*;
use crate::orchestrator::{CreateWorkItem, RequeueRequest, UpdateWorkItem};
use crate::recipe::InputKind;
use crate::retry::{FailureKind, RetryOverrides};
use crate::state::*;
use crate::store::*;
use chrono::Duration;
use std::collections::HashSet;
use std::sync::Arc;

// ---- helpers ----

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

fn item_ids(v: &[Assignment]) -> Vec<WorkItemId> {
    v.iter().map(|a| a.claimed.work_item.id).collect()
}

fn set<T: std::hash::Hash + Eq + Copy>(v: &[T]) -> HashSet<T> {
    v.iter().copied().collect()
}

async fn claim_as(h: &Harness, agent: &str, caps: &[&str], max: u32) -> Vec<Assignment> {
    h.orch
        .claim(ClaimRequest {
            agent_id: agent.into(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            max,
            lease_ttl_seconds: None,
        })
        .await
        .expect("claim")
}

async fn fail_with(h: &Harness, a: &Assignment, kind: FailureKind) -> CompletionResult {
    h.orch
        .complete(a.run_id(), a.token(), RunOutcome::Failed { error: "boom".into(), exit_code: Some(1), kind }, None)
        .await
        .expect("complete")
}

async fn enqueue_with(h: &Harness, id: WorkItemId, deps: &[WorkItemId]) -> Result<ScheduledTask, Error> {
    h.orch.enqueue(id, EnqueueOptions { priority: None, depends_on: deps.to_vec(), not_before: None }).await
}

fn tick_now(h: &Harness) -> Tick {
    Tick { retry_defaults: h.orch.config().retry.clone(), limit: 1000, now: h.clock.now() }
}

fn question(key: &str) -> NewInfoRequest {
    NewInfoRequest {
        key: key.into(),
        prompt: format!("what is {key}?"),
        kind: InputKind::Text,
        choices: vec![],
        deadline: None,
    }
}

fn log_line(s: &str) -> Vec<NewLogLine> {
    vec![NewLogLine { stream: LogStream::Stdout, line: s.into() }]
}

fn step_event() -> Vec<NewStepEvent> {
    vec![NewStepEvent {
        step_index: Some(0),
        kind: StepEventKind::Started,
        name: "step".into(),
        detail: serde_json::Value::Null,
    }]
}

#[track_caller]
fn assert_lease_lost<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::Store(StoreError::LeaseLost { .. })) => {}
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    }
}

#[track_caller]
fn assert_invalid_containing<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::Store(e @ StoreError::Invalid { .. })) => {
            let text = e.to_string().to_lowercase();
            assert!(text.contains(needle), "expected `{needle}` in `{text}`");
        }
        other => panic!("expected StoreError::Invalid containing `{needle}`, got {other:?}"),
    }
}

/// Every agent write with `a`'s run id and `token` is refused with `LeaseLost`.
async fn assert_all_writes_lost(h: &Harness, a: &Assignment, token: u64) {
    let run = a.run_id();
    assert_lease_lost(h.orch.heartbeat(run, token).await, "heartbeat");
    assert_lease_lost(h.orch.start(run, token).await, "start");
    assert_lease_lost(h.orch.append_logs(run, token, log_line("late")).await, "append_logs");
    assert_lease_lost(h.orch.record_steps(run, token, step_event()).await, "record_steps");
    assert_lease_lost(h.orch.ask(run, token, vec![question("late")]).await, "ask");
    assert_lease_lost(
        h.orch.complete(run, token, RunOutcome::Succeeded { exit_code: Some(0) }, None).await,
        "complete",
    );
}

async fn runs_of(h: &Harness, id: WorkItemId) -> Vec<Run> {
    h.store
        .run_list(RunFilter { work_item_id: Some(id), page: Page { limit: 1000, after: None }, ..Default::default() })
        .await
        .expect("run list")
}

// ---- claim order ----

/// Claims come highest priority first, then oldest (enqueue time), one at a time.
pub async fn claim_order_priority_then_oldest(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let low_old = h.queued(p.id, "low old", 0, &[]).await;
    h.clock.advance(secs(1));
    let high = h.queued(p.id, "high", 10, &[]).await;
    let mid = h.queued(p.id, "mid", 5, &[]).await;
    h.clock.advance(secs(1));
    let high_newer = h.queued(p.id, "high newer", 10, &[]).await;
    let low_new = h.queued(p.id, "low new", 0, &[]).await;
    let negative = h.queued(p.id, "negative", -3, &[]).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(h.claim_one("agent").await.claimed.work_item.id);
    }
    assert_eq!(order, vec![high.id, high_newer.id, mid.id, low_old.id, low_new.id, negative.id]);
    assert!(h.claim("agent", 5).await.is_empty());
}

/// With equal priority, items are claimed in the order they were enqueued, not created.
pub async fn claim_equal_priority_is_fifo(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(h.item(p.id, &format!("item {i}")).await.id);
    }
    // Enqueue in reverse creation order, one second apart.
    let mut enqueued = created.clone();
    enqueued.reverse();
    for id in &enqueued {
        enqueue_with(&h, *id, &[]).await.unwrap();
        h.clock.advance(secs(1));
    }
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(h.claim_one("agent").await.claimed.work_item.id);
    }
    assert_eq!(order, enqueued);
}

/// A batch claim of N returns the N first items in claim order; the next batch continues from there.
pub async fn claim_batch_returns_claim_order(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 1, &[]).await;
    h.clock.advance(secs(1));
    let b = h.queued(p.id, "b", 3, &[]).await;
    let c = h.queued(p.id, "c", 1, &[]).await;
    h.clock.advance(secs(1));
    let d = h.queued(p.id, "d", 2, &[]).await;
    let e = h.queued(p.id, "e", 0, &[]).await;
    let f = h.queued(p.id, "f", 3, &[]).await;
    let first = h.claim("agent", 4).await;
    assert_eq!(item_ids(&first), vec![b.id, f.id, d.id, a.id]);
    for x in &first {
        assert_eq!(x.claimed.run.state, RunState::Claimed);
        assert_eq!(x.claimed.work_item.state, WorkItemState::Running);
    }
    let rest = h.claim("agent", 10).await;
    assert_eq!(item_ids(&rest), vec![c.id, e.id]);
    let runs: HashSet<RunId> = first.iter().chain(rest.iter()).map(|x| x.run_id()).collect();
    assert_eq!(runs.len(), 6, "one distinct run per claimed item");
}

/// The claim limit is respected, an empty queue yields nothing, and `max == 0` is refused.
pub async fn claim_respects_limit_and_empty_queue(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    assert!(h.claim("agent", 10).await.is_empty());
    let zero = h
        .orch
        .claim(ClaimRequest { agent_id: "agent".into(), capabilities: vec![], max: 0, lease_ttl_seconds: None })
        .await;
    assert!(matches!(zero, Err(Error::Invalid { .. })), "max 0: {zero:?}");
    let too_many = h
        .orch
        .claim(ClaimRequest {
            agent_id: "agent".into(),
            capabilities: vec![],
            max: Page::MAX_LIMIT + 1,
            lease_ttl_seconds: None,
        })
        .await;
    assert!(matches!(too_many, Err(Error::Invalid { .. })), "max too large: {too_many:?}");
    for i in 0..5 {
        h.queued(p.id, &format!("item {i}"), 0, &[]).await;
    }
    assert_eq!(h.claim("agent", 2).await.len(), 2);
    assert_eq!(h.claim("agent", 2).await.len(), 2);
    assert_eq!(h.claim("agent", 2).await.len(), 1);
    assert!(h.claim("agent", 2).await.is_empty());
}

/// A claim creates a run in `claimed` (attempt 1, token 1) with a lease of the configured or
/// requested length, and moves the item to `running`; invalid lease lengths are refused.
pub async fn claim_creates_run_and_lease(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let t0 = h.clock.now();
    let a = h.claim_one("agent-1").await;
    let run = &a.claimed.run;
    assert!(!a.claimed.resumed);
    assert_eq!(run.state, RunState::Claimed);
    assert_eq!(run.attempt, 1);
    assert_eq!(run.agent_id, "agent-1");
    assert_eq!(run.work_item_id, w.id);
    assert_eq!(run.project_id, p.id);
    assert_eq!(run.lease_token, 1);
    assert_eq!(run.lease_expires_at, Some(t0 + secs(30)));
    assert_eq!(run.claimed_at, t0);
    assert_eq!(run.started_at, None);
    assert_eq!(run.finished_at, None);
    assert_eq!(a.claimed.lease, Lease { run_id: run.id, token: 1, expires_at: t0 + secs(30) });
    assert_eq!(a.claimed.work_item.state, WorkItemState::Running);
    assert_eq!(a.claimed.work_item.attempts, 1);
    assert_eq!(a.claimed.work_item.current_run_id, Some(run.id));
    let stored = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(stored.state, WorkItemState::Running);
    assert_eq!(stored.current_run_id, Some(run.id));
    assert_eq!(&h.store.run_get(run.id).await.unwrap(), run);
    assert_eq!(runs_of(&h, w.id).await, vec![run.clone()]);

    let x = h.queued(p.id, "x", 0, &[]).await;
    for bad in [0u64, 7200] {
        let r = h
            .orch
            .claim(ClaimRequest { agent_id: "a".into(), capabilities: vec![], max: 1, lease_ttl_seconds: Some(bad) })
            .await;
        assert!(matches!(r, Err(Error::Invalid { .. })), "lease_ttl_seconds {bad}: {r:?}");
    }
    assert_eq!(h.state_of(x.id).await, WorkItemState::Queued);
    let v = h
        .orch
        .claim(ClaimRequest { agent_id: "a".into(), capabilities: vec![], max: 1, lease_ttl_seconds: Some(90) })
        .await
        .unwrap();
    assert_eq!(item_ids(&v), vec![x.id]);
    assert_eq!(v[0].claimed.lease.expires_at, t0 + secs(90));
}

/// An item with labels is claimed only by an agent having every one of them as a capability;
/// an agent lacking them skips it and takes lower-priority work it can do.
pub async fn claim_requires_all_labels(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let gpu = h
        .orch
        .create_work_item(CreateWorkItem {
            project_id: Some(p.id),
            title: "gpu job".into(),
            labels: vec!["linux".into(), "gpu".into()],
            priority: 10,
            enqueue: Some(EnqueueOptions::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .work_item;
    let plain = h.queued(p.id, "plain", 0, &[]).await;
    let v = claim_as(&h, "linux-only", &["linux"], 5).await;
    assert_eq!(item_ids(&v), vec![plain.id]);
    assert!(claim_as(&h, "nothing", &[], 5).await.is_empty());
    assert!(claim_as(&h, "linux-mac", &["linux", "mac"], 5).await.is_empty());
    assert_eq!(h.state_of(gpu.id).await, WorkItemState::Queued);
    let v = claim_as(&h, "gpu-box", &["docker", "gpu", "linux"], 5).await;
    assert_eq!(item_ids(&v), vec![gpu.id]);
    assert_eq!(v[0].claimed.run.agent_id, "gpu-box");
}

/// 16 concurrent claimers draining ~200 items in batches of 3: every item is claimed exactly once.
pub async fn claim_exclusive_under_concurrency(store: Arc<dyn Store>) {
    const N: usize = 200;
    let h = Harness::new(store);
    let p = h.project().await;
    let batch: Vec<CreateWorkItem> = (0..N)
        .map(|i| CreateWorkItem {
            project_id: Some(p.id),
            title: format!("item {i}"),
            priority: (i % 4) as i32,
            enqueue: Some(EnqueueOptions::default()),
            ..Default::default()
        })
        .collect();
    let created = h.orch.create_work_items(batch).await.unwrap();
    let all: HashSet<WorkItemId> = created.iter().map(|c| c.work_item.id).collect();
    assert_eq!(all.len(), N);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let agent = format!("agent-{t}");
            let mut got = Vec::new();
            loop {
                let v = h.claim(&agent, 3).await;
                if v.is_empty() {
                    break;
                }
                assert!(v.len() <= 3);
                for a in &v {
                    assert_eq!(a.claimed.run.agent_id, agent);
                    assert_eq!(a.claimed.run.attempt, 1);
                }
                got.extend(v.iter().map(|a| (a.claimed.work_item.id, a.run_id())));
                tokio::task::yield_now().await;
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.expect("claimer task"));
    }
    assert_eq!(claimed.len(), N, "each item claimed exactly once");
    let items: HashSet<WorkItemId> = claimed.iter().map(|c| c.0).collect();
    assert_eq!(items, all);
    let runs: HashSet<RunId> = claimed.iter().map(|c| c.1).collect();
    assert_eq!(runs.len(), N);
    assert!(h.claim("late", 10).await.is_empty());
    let stats = h.store.stats().await.unwrap();
    assert_eq!(stats.work_items["running"], N as u64);
    assert_eq!(stats.work_items["queued"], 0);
    assert_eq!(stats.runs["claimed"], N as u64);
}

// ---- not-before ----

/// An item with a future not-before time is not claimable until then, and does not hold back
/// lower-priority work.
pub async fn not_before_delays_claim(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let t0 = h.clock.now();
    let later = h.item(p.id, "later").await;
    let task = h
        .orch
        .enqueue(later.id, EnqueueOptions { priority: Some(10), depends_on: vec![], not_before: Some(t0 + secs(60)) })
        .await
        .unwrap();
    assert_eq!(task.state, WorkItemState::Queued);
    assert_eq!(task.run_at, Some(t0 + secs(60)));
    assert_eq!(task.priority, 10);
    let now_item = h.queued(p.id, "now", 0, &[]).await;
    assert_eq!(item_ids(&h.claim("agent", 5).await), vec![now_item.id]);
    h.clock.advance(secs(59));
    assert!(h.claim("agent", 5).await.is_empty());
    h.clock.advance(secs(1));
    assert_eq!(h.claim_one("agent").await.claimed.work_item.id, later.id);
}

/// A not-before time in the past acts as the enqueue time: claimable at once, but not ahead of
/// items enqueued earlier.
pub async fn not_before_in_past_acts_as_now(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let t0 = h.clock.now();
    let first = h.queued(p.id, "first", 0, &[]).await;
    h.clock.advance(secs(10));
    let past = h.item(p.id, "past").await;
    let task = h
        .orch
        .enqueue(past.id, EnqueueOptions { priority: None, depends_on: vec![], not_before: Some(t0 - secs(3600)) })
        .await
        .unwrap();
    assert_eq!(task.state, WorkItemState::Queued);
    assert_eq!(task.run_at, Some(t0 + secs(10)));
    assert_eq!(item_ids(&h.claim("agent", 5).await), vec![first.id, past.id]);
}

// ---- dependencies ----

/// A dependent is not claimable until its dependency succeeded (a retrying dependency keeps it
/// waiting, not blocked); the completion that succeeds lists it as released.
pub async fn dependency_released_on_success(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let b = h.queued(p.id, "b", 10, &[a.id]).await;
    assert_eq!(b.state, WorkItemState::Queued);
    assert_eq!(h.store.scheduled_task_get(b.id).await.unwrap().pending_dependencies, 1);
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    let r = h.fail(&v[0]).await;
    assert_eq!(r.work_item_state, WorkItemState::Retrying);
    assert!(r.blocked.is_empty());
    assert_eq!(h.state_of(b.id).await, WorkItemState::Queued);
    h.clock.advance(secs(10));
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    let r = h.succeed(&v[0]).await;
    assert_eq!(r.work_item_state, WorkItemState::Succeeded);
    assert_eq!(r.run.state, RunState::Succeeded);
    assert_eq!(r.released, vec![b.id]);
    assert!(r.blocked.is_empty());
    assert_eq!(h.store.scheduled_task_get(b.id).await.unwrap().pending_dependencies, 0);
    let cb = h.claim_one("agent").await;
    assert_eq!(cb.claimed.work_item.id, b.id);
    assert!(h.succeed(&cb).await.released.is_empty());
}

/// Diamond dependencies: the bottom item needs both middle items to succeed.
pub async fn diamond_dependency_needs_both(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let b = h.queued(p.id, "b", 0, &[a.id]).await;
    let c = h.queued(p.id, "c", 0, &[a.id]).await;
    let d = h.queued(p.id, "d", 100, &[b.id, c.id]).await;
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    let r = h.succeed(&v[0]).await;
    assert_eq!(set(&r.released), set(&[b.id, c.id]));
    let v = h.claim("agent", 10).await;
    assert_eq!(set(&item_ids(&v)), set(&[b.id, c.id]));
    let (vb, vc) = if v[0].claimed.work_item.id == b.id { (&v[0], &v[1]) } else { (&v[1], &v[0]) };
    assert!(h.succeed(vb).await.released.is_empty());
    assert_eq!(h.state_of(d.id).await, WorkItemState::Queued);
    assert_eq!(h.store.scheduled_task_get(d.id).await.unwrap().pending_dependencies, 1);
    assert!(h.claim("agent", 10).await.is_empty());
    assert_eq!(h.succeed(vc).await.released, vec![d.id]);
    assert_eq!(h.claim_one("agent").await.claimed.work_item.id, d.id);
}

/// Unknown dependencies and dependencies in another project are `Invalid`, and nothing changes.
pub async fn enqueue_rejects_unknown_and_foreign_dependencies(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let q = h.orch.create_project("other", "").await.unwrap();
    let foreign = h.queued(q.id, "foreign", 0, &[]).await;
    let w = h.item(p.id, "w").await;
    assert_invalid_containing(enqueue_with(&h, w.id, &[WorkItemId::new()]).await, "");
    assert_invalid_containing(enqueue_with(&h, w.id, &[foreign.id]).await, "");
    let created = h
        .orch
        .create_work_item(CreateWorkItem {
            project_id: Some(p.id),
            title: "x".into(),
            enqueue: Some(EnqueueOptions { priority: None, depends_on: vec![foreign.id], not_before: None }),
            ..Default::default()
        })
        .await;
    assert_invalid_containing(created, "");
    let after = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(after.state, WorkItemState::Ready);
    assert!(after.dependencies.is_empty());
    assert_eq!(after.run_at, None);
    let in_p = h.store.work_item_list(WorkItemFilter { project_id: Some(p.id), ..Default::default() }).await.unwrap();
    assert_eq!(in_p.iter().map(|x| x.id).collect::<Vec<_>>(), vec![w.id]);
    assert_eq!(h.state_of(foreign.id).await, WorkItemState::Queued);
}

/// Self-dependencies and longer cycles (built by separate enqueues) are `Invalid` mentioning a
/// cycle; the refused enqueue changes nothing.
pub async fn enqueue_rejects_cycles(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.item(p.id, "a").await;
    let b = h.item(p.id, "b").await;
    let c = h.item(p.id, "c").await;
    assert_invalid_containing(enqueue_with(&h, a.id, &[a.id]).await, "cycle");
    let a1 = h.store.work_item_get(a.id).await.unwrap();
    assert_eq!(a1.state, WorkItemState::Ready);
    assert!(a1.dependencies.is_empty());
    assert_eq!(enqueue_with(&h, a.id, &[b.id]).await.unwrap().state, WorkItemState::Queued);
    assert_eq!(enqueue_with(&h, b.id, &[c.id]).await.unwrap().state, WorkItemState::Queued);
    assert_invalid_containing(enqueue_with(&h, c.id, &[a.id]).await, "cycle");
    let c1 = h.store.work_item_get(c.id).await.unwrap();
    assert_eq!(c1.state, WorkItemState::Ready);
    assert!(c1.dependencies.is_empty());
    assert_eq!(c1.run_at, None);
    assert_eq!(h.store.work_item_get(a.id).await.unwrap().dependencies, vec![b.id]);
    assert_eq!(h.store.work_item_get(b.id).await.unwrap().dependencies, vec![c.id]);
    // Without the closing edge it is fine, and the chain runs bottom-up.
    enqueue_with(&h, c.id, &[]).await.unwrap();
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![c.id]);
    assert_eq!(h.succeed(&v[0]).await.released, vec![b.id]);
}

/// A refused enqueue batch (cycle inside the batch, unknown dependency, item not ready) changes
/// nothing; a valid batch may depend on its own members.
pub async fn enqueue_batch_is_all_or_nothing(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let ok = h.item(p.id, "ok").await;
    let x = h.item(p.id, "x").await;
    let y = h.item(p.id, "y").await;
    let already = h.queued(p.id, "already", 0, &[]).await;
    let e = |id: WorkItemId, deps: &[WorkItemId]| Enqueue {
        work_item_id: id,
        options: EnqueueOptions { priority: Some(7), depends_on: deps.to_vec(), not_before: None },
    };
    let r = h.orch.enqueue_many(vec![e(ok.id, &[]), e(x.id, &[y.id]), e(y.id, &[x.id])]).await;
    assert_invalid_containing(r, "cycle");
    let r = h.orch.enqueue_many(vec![e(ok.id, &[]), e(x.id, &[WorkItemId::new()])]).await;
    assert_invalid_containing(r, "");
    let r = h.orch.enqueue_many(vec![e(ok.id, &[]), e(already.id, &[])]).await;
    assert!(
        matches!(r, Err(Error::Store(StoreError::InvalidTransition(_) | StoreError::Conflict { .. }))),
        "re-enqueue of a queued item: {r:?}"
    );
    for id in [ok.id, x.id, y.id] {
        let w = h.store.work_item_get(id).await.unwrap();
        assert_eq!(w.state, WorkItemState::Ready, "{}", w.title);
        assert!(w.dependencies.is_empty());
        assert_eq!(w.run_at, None);
        assert_eq!(w.enqueued_at, None);
        assert_eq!(w.priority, 0);
    }
    let queue = h.store.queue_list(QueueFilter::default()).await.unwrap();
    assert_eq!(queue.iter().map(|t| t.work_item_id).collect::<Vec<_>>(), vec![already.id]);
    let tasks = h.orch.enqueue_many(vec![e(x.id, &[]), e(y.id, &[x.id])]).await.unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0].pending_dependencies, 0);
    assert_eq!(tasks[1].pending_dependencies, 1);
    assert_eq!(tasks[1].dependencies, vec![x.id]);
    assert_eq!(h.state_of(y.id).await, WorkItemState::Queued);
}

/// Re-enqueueing an item that is not `ready` (queued, draft) is refused.
pub async fn enqueue_requires_ready_state(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let q = h.queued(p.id, "q", 0, &[]).await;
    let r = enqueue_with(&h, q.id, &[]).await;
    assert!(
        matches!(r, Err(Error::Store(StoreError::InvalidTransition(_) | StoreError::Conflict { .. }))),
        "queued: {r:?}"
    );
    let d = h
        .orch
        .create_work_item(CreateWorkItem {
            project_id: Some(p.id),
            title: "d".into(),
            draft: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .work_item;
    let r = enqueue_with(&h, d.id, &[]).await;
    assert!(
        matches!(r, Err(Error::Store(StoreError::InvalidTransition(_) | StoreError::Conflict { .. }))),
        "draft: {r:?}"
    );
    assert_eq!(h.state_of(d.id).await, WorkItemState::Draft);
    let r = enqueue_with(&h, WorkItemId::new(), &[]).await;
    assert!(matches!(r, Err(Error::Store(StoreError::NotFound { .. }))), "unknown: {r:?}");
}

/// A failed dependency blocks its dependents transitively, with a blocked reason.
pub async fn failed_dependency_blocks_transitively(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let b = h.queued(p.id, "b", 0, &[a.id]).await;
    let c = h.queued(p.id, "c", 0, &[b.id]).await;
    let other = h.item(p.id, "unrelated").await;
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    let r = fail_with(&h, &v[0], FailureKind::Permanent).await;
    assert_eq!(r.work_item_state, WorkItemState::Failed);
    assert_eq!(set(&r.blocked), set(&[b.id, c.id]));
    assert!(r.released.is_empty());
    let wb = h.store.work_item_get(b.id).await.unwrap();
    assert_eq!(wb.state, WorkItemState::Blocked);
    assert!(wb.blocked_reason.as_deref().is_some_and(|s| s.contains(&a.id.to_string())), "{:?}", wb.blocked_reason);
    let wc = h.store.work_item_get(c.id).await.unwrap();
    assert_eq!(wc.state, WorkItemState::Blocked);
    assert!(wc.blocked_reason.as_deref().is_some_and(|s| !s.is_empty()));
    assert_eq!(h.state_of(other.id).await, WorkItemState::Ready);
    h.clock.advance(secs(3600));
    assert!(h.claim("agent", 10).await.is_empty());
    assert!(h.orch.tick().await.unwrap().promoted.is_empty());
    assert_eq!(h.state_of(c.id).await, WorkItemState::Blocked);
}

/// A cancelled dependency (queued or running) blocks its dependents, transitively.
pub async fn cancelled_dependency_blocks_dependents(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let b = h.queued(p.id, "b", 0, &[a.id]).await;
    let c = h.queued(p.id, "c", 0, &[b.id]).await;
    h.orch.cancel_work_item(a.id, Some("not needed".into())).await.unwrap();
    assert_eq!(h.state_of(a.id).await, WorkItemState::Cancelled);
    let wb = h.store.work_item_get(b.id).await.unwrap();
    assert_eq!(wb.state, WorkItemState::Blocked);
    assert!(wb.blocked_reason.as_deref().is_some_and(|s| s.contains(&a.id.to_string())), "{:?}", wb.blocked_reason);
    assert_eq!(h.state_of(c.id).await, WorkItemState::Blocked);
    assert!(h.claim("agent", 10).await.is_empty());

    let x = h.queued(p.id, "x", 0, &[]).await;
    let y = h.queued(p.id, "y", 0, &[x.id]).await;
    let ax = h.claim_one("agent").await;
    assert_eq!(ax.claimed.work_item.id, x.id);
    h.orch.cancel_work_item(x.id, None).await.unwrap();
    let wy = h.store.work_item_get(y.id).await.unwrap();
    assert_eq!(wy.state, WorkItemState::Blocked);
    assert!(wy.blocked_reason.is_some());
}

/// Enqueueing an item that depends on an already failed, cancelled or blocked item makes it `blocked`.
pub async fn enqueue_on_failed_dependency_is_blocked(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let v = h.claim_one("agent").await;
    fail_with(&h, &v, FailureKind::Permanent).await;
    assert_eq!(h.state_of(a.id).await, WorkItemState::Failed);
    let b = h.queued(p.id, "b", 0, &[a.id]).await;
    assert_eq!(b.state, WorkItemState::Blocked);
    assert!(b.blocked_reason.as_deref().is_some_and(|s| s.contains(&a.id.to_string())), "{:?}", b.blocked_reason);
    let c = h.item(p.id, "c").await;
    let task = enqueue_with(&h, c.id, &[a.id]).await.unwrap();
    assert_eq!(task.state, WorkItemState::Blocked);
    assert!(task.blocked_reason.is_some());
    let d = h.queued(p.id, "d", 0, &[b.id]).await;
    assert_eq!(d.state, WorkItemState::Blocked);
    let gone = h.item(p.id, "gone").await;
    h.orch.cancel_work_item(gone.id, None).await.unwrap();
    let e = h.queued(p.id, "e", 0, &[gone.id]).await;
    assert_eq!(e.state, WorkItemState::Blocked);
    assert!(h.claim("agent", 10).await.is_empty());
    assert_eq!(h.store.work_item_get(c.id).await.unwrap().state, WorkItemState::Blocked);
}

/// Requeueing a failed dependency unblocks its dependents (back to queued, transitively); they run
/// after it succeeds.
pub async fn requeue_failed_dependency_unblocks_dependents(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let b = h.queued(p.id, "b", 0, &[a.id]).await;
    let c = h.queued(p.id, "c", 0, &[b.id]).await;
    let v = h.claim_one("agent").await;
    fail_with(&h, &v, FailureKind::Permanent).await;
    assert_eq!(h.state_of(c.id).await, WorkItemState::Blocked);
    let ra = h.orch.requeue_work_item(a.id, RequeueRequest::default()).await.unwrap();
    assert_eq!(ra.state, WorkItemState::Queued);
    assert_eq!(ra.attempts, 0);
    assert_eq!(ra.last_error, None);
    for id in [b.id, c.id] {
        let w = h.store.work_item_get(id).await.unwrap();
        assert_eq!(w.state, WorkItemState::Queued, "{}", w.title);
        assert_eq!(w.blocked_reason, None);
    }
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    assert_eq!(v[0].claimed.run.attempt, 1, "the attempt budget was reset");
    assert_eq!(h.succeed(&v[0]).await.released, vec![b.id]);
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![b.id]);
    assert_eq!(h.succeed(&v[0]).await.released, vec![c.id]);
    let v = h.claim("agent", 10).await;
    assert_eq!(item_ids(&v), vec![c.id]);
    h.succeed(&v[0]).await;
    assert_eq!(h.state_of(c.id).await, WorkItemState::Succeeded);
}

// ---- retries ----

/// Retryable failures back off 10 s, 20 s, 40 s (claimable exactly at the retry time, not before);
/// the fourth failure exhausts the 3 retries and fails the item with its last error.
pub async fn retry_backoff_timing_and_exhaustion(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "flaky", 0, &[]).await;
    let mut a = h.claim_one("agent").await;
    for (attempt, delay) in [(1u32, 10i64), (2, 20), (3, 40)] {
        assert_eq!(a.claimed.run.attempt, attempt);
        let now = h.clock.now();
        let r = h.fail(&a).await;
        assert_eq!(r.work_item_state, WorkItemState::Retrying);
        assert_eq!(r.retry_at, Some(now + secs(delay)));
        assert_eq!(r.run.state, RunState::Failed);
        assert_eq!(r.run.failure_kind, Some(FailureKind::Retryable));
        let it = h.store.work_item_get(w.id).await.unwrap();
        assert_eq!(it.state, WorkItemState::Retrying);
        assert_eq!(it.run_at, Some(now + secs(delay)));
        assert_eq!(it.attempts, attempt);
        assert_eq!(it.last_error.as_deref(), Some("boom"));
        h.clock.advance(secs(delay) - Duration::milliseconds(1));
        assert!(h.claim("agent", 1).await.is_empty(), "claimable before the retry time");
        h.clock.advance(Duration::milliseconds(1));
        a = h.claim_one("agent").await;
        assert_eq!(a.claimed.work_item.id, w.id);
    }
    assert_eq!(a.claimed.run.attempt, 4);
    let r = h.fail(&a).await;
    assert_eq!(r.work_item_state, WorkItemState::Failed);
    assert_eq!(r.retry_at, None);
    let it = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(it.state, WorkItemState::Failed);
    assert_eq!(it.attempts, 4);
    assert_eq!(it.last_error.as_deref(), Some("boom"));
    let runs = runs_of(&h, w.id).await;
    assert_eq!(runs.len(), 4);
    assert_eq!(runs.iter().map(|r| r.attempt).collect::<HashSet<u32>>(), (1..=4).collect::<HashSet<u32>>());
    assert!(runs.iter().all(|r| r.state == RunState::Failed));
    h.clock.advance(secs(3600));
    assert!(h.orch.tick().await.unwrap().promoted.is_empty());
    assert!(h.claim("agent", 1).await.is_empty());
}

/// Per-item retry overrides: `max_retries: 0` fails at once, a 1 s base backs off 1 s then 2 s,
/// overrides given at creation apply, and invalid overrides are refused.
pub async fn retry_policy_overrides(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let once = h.queued(p.id, "once", 0, &[]).await;
    let set_policy =
        h.orch.set_retry_policy(once.id, RetryOverrides { max_retries: Some(0), ..Default::default() }).await.unwrap();
    assert_eq!(set_policy.retry.max_retries, Some(0));
    let a = h.claim_one("agent").await;
    let r = h.fail(&a).await;
    assert_eq!(r.work_item_state, WorkItemState::Failed);
    assert_eq!(r.retry_at, None);

    let fast = h.queued(p.id, "fast", 0, &[]).await;
    h.orch
        .set_retry_policy(fast.id, RetryOverrides { backoff_base_seconds: Some(1.0), ..Default::default() })
        .await
        .unwrap();
    let a = h.claim_one("agent").await;
    let now = h.clock.now();
    assert_eq!(h.fail(&a).await.retry_at, Some(now + secs(1)));
    h.clock.advance(secs(1));
    let a = h.claim_one("agent").await;
    let now = h.clock.now();
    assert_eq!(h.fail(&a).await.retry_at, Some(now + secs(2)));
    h.clock.advance(secs(2));
    let a = h.claim_one("agent").await;
    assert_eq!(a.claimed.run.attempt, 3);
    h.succeed(&a).await;

    let created = h
        .orch
        .create_work_item(CreateWorkItem {
            project_id: Some(p.id),
            title: "created with overrides".into(),
            retry: RetryOverrides { max_retries: Some(1), backoff_base_seconds: Some(5.0), ..Default::default() },
            enqueue: Some(EnqueueOptions::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .work_item;
    let a = h.claim_one("agent").await;
    assert_eq!(a.claimed.work_item.id, created.id);
    let now = h.clock.now();
    assert_eq!(h.fail(&a).await.retry_at, Some(now + secs(5)));
    h.clock.advance(secs(5));
    let a = h.claim_one("agent").await;
    assert_eq!(h.fail(&a).await.work_item_state, WorkItemState::Failed);

    let bad = h
        .orch
        .set_retry_policy(created.id, RetryOverrides { backoff_base_seconds: Some(-1.0), ..Default::default() })
        .await;
    assert!(matches!(bad, Err(Error::Policy(_))), "{bad:?}");
    assert_eq!(h.store.work_item_get(created.id).await.unwrap().retry.backoff_base_seconds, Some(5.0));
}

/// A permanent failure fails the item at once, with no retry.
pub async fn permanent_failure_fails_at_once(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "doomed", 0, &[]).await;
    let a = h.claim_one("agent").await;
    let r = fail_with(&h, &a, FailureKind::Permanent).await;
    assert_eq!(r.work_item_state, WorkItemState::Failed);
    assert_eq!(r.retry_at, None);
    assert_eq!(r.run.state, RunState::Failed);
    assert_eq!(r.run.failure_kind, Some(FailureKind::Permanent));
    assert_eq!(r.run.error.as_deref(), Some("boom"));
    assert_eq!(r.run.exit_code, Some(1));
    let it = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(it.state, WorkItemState::Failed);
    assert_eq!(it.attempts, 1);
    assert_eq!(it.last_error.as_deref(), Some("boom"));
    h.clock.advance(secs(3600));
    assert!(h.orch.tick().await.unwrap().promoted.is_empty());
    assert!(h.claim("agent", 1).await.is_empty());
}

/// `tick` promotes retrying items whose time came to `queued` (listing them) and leaves the others.
pub async fn tick_promotes_only_due_retries(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let x = h.queued(p.id, "x", 0, &[]).await;
    let y = h.queued(p.id, "y", 0, &[]).await;
    let v = h.claim("agent", 2).await;
    assert_eq!(set(&item_ids(&v)), set(&[x.id, y.id]));
    let (ax, ay) = if v[0].claimed.work_item.id == x.id { (&v[0], &v[1]) } else { (&v[1], &v[0]) };
    h.fail(ax).await;
    h.clock.advance(secs(5));
    h.fail(ay).await;
    h.clock.advance(secs(4));
    assert_eq!(h.orch.tick().await.unwrap(), TickReport::default());
    h.clock.advance(secs(1));
    let report = h.orch.tick().await.unwrap();
    assert_eq!(report.promoted, vec![x.id]);
    assert!(report.reaped.is_empty());
    let tx = h.store.scheduled_task_get(x.id).await.unwrap();
    assert_eq!(tx.state, WorkItemState::Queued);
    assert_eq!(tx.attempts, 1);
    assert_eq!(h.state_of(y.id).await, WorkItemState::Retrying);
    assert!(h.orch.tick().await.unwrap().promoted.is_empty());
    h.clock.advance(secs(5));
    assert_eq!(h.orch.tick().await.unwrap().promoted, vec![y.id]);
    assert_eq!(h.state_of(y.id).await, WorkItemState::Queued);
    let v = h.claim("agent", 5).await;
    assert_eq!(item_ids(&v), vec![x.id, y.id]);
    assert!(v.iter().all(|a| a.claimed.run.attempt == 2));
}

// ---- leases ----

/// After the TTL passes, tick reaps the run as lost and the item retries; a second agent claims
/// attempt 2 while the first agent's writes are all `LeaseLost`.
pub async fn expired_lease_is_reaped_and_reclaimed(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let t0 = h.clock.now();
    let first = h.claim_one("first").await;
    h.orch.start(first.run_id(), first.token()).await.unwrap();
    h.clock.advance(secs(29));
    assert!(h.orch.tick().await.unwrap().reaped.is_empty());
    h.clock.advance(secs(1));
    let report = h.orch.tick().await.unwrap();
    assert_eq!(
        report.reaped,
        vec![ReapedRun {
            run_id: first.run_id(),
            work_item_id: w.id,
            work_item_state: WorkItemState::Retrying,
            retry_at: Some(t0 + secs(40)),
        }]
    );
    assert_eq!(h.store.run_get(first.run_id()).await.unwrap().state, RunState::Lost);
    let it = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(it.state, WorkItemState::Retrying);
    assert_eq!(it.run_at, Some(t0 + secs(40)));
    assert!(h.claim("second", 1).await.is_empty());
    h.clock.advance(secs(10));
    let second = h.claim_one("second").await;
    assert_eq!(second.claimed.work_item.id, w.id);
    assert_ne!(second.run_id(), first.run_id());
    assert_eq!(second.claimed.run.attempt, 2);
    assert_eq!(second.claimed.run.agent_id, "second");
    assert_all_writes_lost(&h, &first, first.token()).await;
    h.orch.heartbeat(second.run_id(), second.token()).await.unwrap();
    assert_eq!(h.succeed(&second).await.work_item_state, WorkItemState::Succeeded);
    assert_eq!(h.store.run_get(first.run_id()).await.unwrap().state, RunState::Lost);
}

/// A lease expiring on the last allowed attempt fails the item (and blocks its dependents).
pub async fn expired_lease_out_of_retries_fails(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let d = h.queued(p.id, "d", 0, &[w.id]).await;
    h.orch.set_retry_policy(w.id, RetryOverrides { max_retries: Some(0), ..Default::default() }).await.unwrap();
    let a = h.claim_one("agent").await;
    h.clock.advance(secs(31));
    let reaped = h.store.leases_reap_expired(tick_now(&h)).await.unwrap();
    assert_eq!(
        reaped,
        vec![ReapedRun {
            run_id: a.run_id(),
            work_item_id: w.id,
            work_item_state: WorkItemState::Failed,
            retry_at: None,
        }]
    );
    let it = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(it.state, WorkItemState::Failed);
    assert!(it.last_error.is_some());
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Lost);
    assert_eq!(h.state_of(d.id).await, WorkItemState::Blocked);
    assert!(h.store.leases_reap_expired(tick_now(&h)).await.unwrap().is_empty());
    assert_lease_lost(
        h.orch.complete(a.run_id(), a.token(), RunOutcome::Succeeded { exit_code: None }, None).await,
        "complete",
    );
}

/// A heartbeat extends the lease from now: after 20 s + heartbeat + 20 s the lease is still valid
/// and nothing is reaped; without further heartbeats it expires 30 s after the last one.
pub async fn heartbeat_extends_lease(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    h.queued(p.id, "w", 0, &[]).await;
    let t0 = h.clock.now();
    let a = h.claim_one("agent").await;
    h.clock.advance(secs(20));
    let lease = h.orch.heartbeat(a.run_id(), a.token()).await.unwrap();
    assert_eq!(lease, Lease { run_id: a.run_id(), token: a.token(), expires_at: t0 + secs(50) });
    let run = h.store.run_get(a.run_id()).await.unwrap();
    assert_eq!(run.lease_expires_at, Some(t0 + secs(50)));
    assert_eq!(run.heartbeat_at, Some(t0 + secs(20)));
    h.clock.advance(secs(20));
    assert!(h.store.leases_reap_expired(tick_now(&h)).await.unwrap().is_empty());
    assert!(h.orch.tick().await.unwrap().reaped.is_empty());
    h.orch.start(a.run_id(), a.token()).await.unwrap();
    assert_eq!(h.orch.append_logs(a.run_id(), a.token(), log_line("still here")).await.unwrap(), 1);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().lease_expires_at, Some(t0 + secs(50)));
    h.clock.advance(secs(10));
    let reaped = h.orch.tick().await.unwrap().reaped;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].run_id, a.run_id());
}

/// Writes with a wrong fencing token are `LeaseLost` and change nothing; the right token still works.
pub async fn stale_token_writes_are_lease_lost(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let a = h.claim_one("agent").await;
    for bad in [0, a.token() + 1] {
        assert_all_writes_lost(&h, &a, bad).await;
    }
    let run = h.store.run_get(a.run_id()).await.unwrap();
    assert_eq!(run.state, RunState::Claimed);
    assert_eq!(run.lease_token, a.token());
    assert_eq!(h.state_of(w.id).await, WorkItemState::Running);
    assert!(h.store.logs_read_after(a.run_id(), 0, 100).await.unwrap().is_empty());
    assert!(h.store.step_events_read_after(a.run_id(), 0, 100).await.unwrap().is_empty());
    assert_eq!(h.succeed(&a).await.work_item_state, WorkItemState::Succeeded);
}

/// Once the lease expired, writes are `LeaseLost` even before the run is reaped.
pub async fn writes_after_expiry_before_reap_are_lease_lost(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.orch.start(a.run_id(), a.token()).await.unwrap();
    h.clock.advance(secs(30));
    assert_all_writes_lost(&h, &a, a.token()).await;
    let r = h
        .store
        .runs_complete_many(CompleteMany {
            completions: vec![RunCompletion {
                run_id: a.run_id(),
                token: a.token(),
                outcome: RunOutcome::Succeeded { exit_code: Some(0) },
                usage: None,
            }],
            retry_defaults: h.orch.config().retry.clone(),
            now: h.clock.now(),
        })
        .await
        .unwrap();
    assert!(matches!(r[0], Err(StoreError::LeaseLost { .. })), "{:?}", r[0]);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Running);
    assert_eq!(h.state_of(w.id).await, WorkItemState::Running);
    assert_eq!(h.orch.tick().await.unwrap().reaped.len(), 1);
    assert_eq!(h.state_of(w.id).await, WorkItemState::Retrying);
}

/// Completing a run twice is refused (`LeaseLost`) and does not change the outcome.
pub async fn completing_twice_is_refused(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.succeed(&a).await;
    assert_lease_lost(
        h.orch.complete(a.run_id(), a.token(), RunOutcome::Succeeded { exit_code: Some(0) }, None).await,
        "second success",
    );
    assert_lease_lost(
        h.orch
            .complete(
                a.run_id(),
                a.token(),
                RunOutcome::Failed { error: "x".into(), exit_code: None, kind: FailureKind::Permanent },
                None,
            )
            .await,
        "failure after success",
    );
    assert_lease_lost(h.orch.heartbeat(a.run_id(), a.token()).await, "heartbeat after success");
    assert_eq!(h.state_of(w.id).await, WorkItemState::Succeeded);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Succeeded);

    let x = h.queued(p.id, "x", 0, &[]).await;
    let b = h.claim_one("agent").await;
    h.fail(&b).await;
    assert_lease_lost(
        h.orch.complete(b.run_id(), b.token(), RunOutcome::Succeeded { exit_code: Some(0) }, None).await,
        "success after failure",
    );
    assert_eq!(h.state_of(x.id).await, WorkItemState::Retrying);
    assert_eq!(h.store.run_get(b.run_id()).await.unwrap().state, RunState::Failed);
}

/// `run_start` moves a run from claimed to running; completing straight from claimed is allowed too.
pub async fn run_start_and_complete_from_claimed(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let x = h.queued(p.id, "x", 1, &[]).await;
    let y = h.queued(p.id, "y", 0, &[]).await;
    let v = h.claim("agent", 2).await;
    assert_eq!(item_ids(&v), vec![x.id, y.id]);
    let t0 = h.clock.now();
    let started = h.orch.start(v[0].run_id(), v[0].token()).await.unwrap();
    assert_eq!(started.state, RunState::Running);
    assert_eq!(started.started_at, Some(t0));
    assert_eq!(h.store.run_get(v[0].run_id()).await.unwrap().state, RunState::Running);
    assert_eq!(h.state_of(x.id).await, WorkItemState::Running);
    h.clock.advance(secs(1));
    let r = h.succeed(&v[0]).await;
    assert_eq!(r.run.state, RunState::Succeeded);
    assert_eq!(r.run.finished_at, Some(t0 + secs(1)));
    assert_eq!(r.run.exit_code, Some(0));
    assert_eq!(h.store.run_get(v[1].run_id()).await.unwrap().state, RunState::Claimed);
    let r = h.succeed(&v[1]).await;
    assert_eq!(r.run.state, RunState::Succeeded);
    assert_eq!(r.work_item_state, WorkItemState::Succeeded);
    assert_eq!(h.state_of(y.id).await, WorkItemState::Succeeded);
}

// ---- requeue and cancel ----

/// Requeueing a queued item with `delay_seconds` moves its run time.
pub async fn requeue_queued_item_with_delay(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let t0 = h.clock.now();
    let r = h.orch.requeue_work_item(w.id, RequeueRequest { delay_seconds: 60, backoff: false }).await.unwrap();
    assert_eq!(r.state, WorkItemState::Queued);
    assert_eq!(r.run_at, Some(t0 + secs(60)));
    assert_eq!(h.store.scheduled_task_get(w.id).await.unwrap().run_at, Some(t0 + secs(60)));
    assert!(h.claim("agent", 1).await.is_empty());
    h.clock.advance(secs(59));
    assert!(h.claim("agent", 1).await.is_empty());
    h.clock.advance(secs(1));
    assert_eq!(h.claim_one("agent").await.claimed.work_item.id, w.id);
}

/// Requeue with `backoff` adds the retry policy's delay for the attempts so far.
pub async fn requeue_with_backoff_adds_policy_delay(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.fail(&a).await;
    h.clock.advance(secs(10));
    let a = h.claim_one("agent").await;
    h.fail(&a).await;
    assert_eq!(h.store.work_item_get(w.id).await.unwrap().attempts, 2);
    let t = h.clock.now();
    let r = h.orch.requeue_work_item(w.id, RequeueRequest { delay_seconds: 5, backoff: true }).await.unwrap();
    assert_eq!(r.state, WorkItemState::Queued);
    assert_eq!(r.run_at, Some(t + secs(25)));
    assert_eq!(r.attempts, 2);
    h.clock.advance(secs(24));
    assert!(h.claim("agent", 1).await.is_empty());
    h.clock.advance(secs(1));
    let a = h.claim_one("agent").await;
    assert_eq!(a.claimed.run.attempt, 3);

    let fresh = h.queued(p.id, "fresh", 0, &[]).await;
    let t = h.clock.now();
    let r = h.orch.requeue_work_item(fresh.id, RequeueRequest { delay_seconds: 0, backoff: true }).await.unwrap();
    assert_eq!(r.run_at, Some(t + secs(10)));
}

/// Requeueing an item with an active run (running or waiting for input) through the item is a `Conflict`.
pub async fn requeue_running_item_conflicts(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let a = h.claim_one("agent").await;
    let r = h.orch.requeue_work_item(w.id, RequeueRequest::default()).await;
    assert!(matches!(r, Err(Error::Store(StoreError::Conflict { .. }))), "running: {r:?}");
    assert_eq!(h.state_of(w.id).await, WorkItemState::Running);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Claimed);
    h.orch.heartbeat(a.run_id(), a.token()).await.unwrap();
    h.orch.ask(a.run_id(), a.token(), vec![question("k")]).await.unwrap();
    assert_eq!(h.state_of(w.id).await, WorkItemState::WaitingInput);
    let r = h.orch.requeue_work_item(w.id, RequeueRequest::default()).await;
    assert!(matches!(r, Err(Error::Store(StoreError::Conflict { .. }))), "waiting_input: {r:?}");
    assert_eq!(h.state_of(w.id).await, WorkItemState::WaitingInput);
}

/// `run_requeue` of an active run cancels the run and requeues the item; the stale agent gets
/// `LeaseLost`, and the next claim is a new run. Requeueing the old run while a newer one is active
/// is a `Conflict`.
pub async fn run_requeue_cancels_active_run(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.orch.start(a.run_id(), a.token()).await.unwrap();
    let t = h.clock.now();
    let it = h.orch.requeue_run(a.run_id(), RequeueRequest::default()).await.unwrap();
    assert_eq!(it.state, WorkItemState::Queued);
    assert_eq!(it.run_at, Some(t));
    let run = h.store.run_get(a.run_id()).await.unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.finished_at, Some(t));
    assert_all_writes_lost(&h, &a, a.token()).await;
    let b = h.claim_one("other").await;
    assert_eq!(b.claimed.work_item.id, w.id);
    assert_ne!(b.run_id(), a.run_id());
    assert_eq!(b.claimed.run.attempt, 2);
    assert_eq!(b.token(), 1);
    assert_eq!(runs_of(&h, w.id).await.len(), 2);
    let r = h.orch.requeue_run(a.run_id(), RequeueRequest::default()).await;
    assert!(matches!(r, Err(Error::Store(StoreError::Conflict { .. }))), "old run: {r:?}");
    assert_eq!(h.store.run_get(b.run_id()).await.unwrap().state, RunState::Claimed);
    h.succeed(&b).await;
}

/// Cancelling a queued item and a running item: both cancelled, the run cancelled, the agent's
/// writes `LeaseLost`, nothing left to claim or reap.
pub async fn cancel_queued_and_running_items(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let q = h.queued(p.id, "q", 0, &[]).await;
    let r = h.queued(p.id, "r", 5, &[]).await;
    let a = h.claim_one("agent").await;
    assert_eq!(a.claimed.work_item.id, r.id);
    let cq = h.orch.cancel_work_item(q.id, Some("no longer needed".into())).await.unwrap();
    assert_eq!(cq.state, WorkItemState::Cancelled);
    h.orch.start(a.run_id(), a.token()).await.unwrap();
    let cr = h.orch.cancel_work_item(r.id, None).await.unwrap();
    assert_eq!(cr.state, WorkItemState::Cancelled);
    let run = h.store.run_get(a.run_id()).await.unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    assert!(run.finished_at.is_some());
    assert_all_writes_lost(&h, &a, a.token()).await;
    assert!(h.claim("agent", 10).await.is_empty());
    h.clock.advance(secs(120));
    assert_eq!(h.orch.tick().await.unwrap(), TickReport::default());
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Cancelled);
    assert!(h.store.queue_list(QueueFilter::default()).await.unwrap().is_empty());
}

/// Cancelling a succeeded (or already cancelled) item is an `InvalidTransition`.
pub async fn cancel_finished_item_is_invalid_transition(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "w", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.succeed(&a).await;
    let r = h.orch.cancel_work_item(w.id, None).await;
    assert!(matches!(r, Err(Error::Store(StoreError::InvalidTransition(_)))), "succeeded: {r:?}");
    assert_eq!(h.state_of(w.id).await, WorkItemState::Succeeded);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Succeeded);
    let x = h.queued(p.id, "x", 0, &[]).await;
    h.orch.cancel_work_item(x.id, None).await.unwrap();
    let r = h.orch.cancel_work_item(x.id, None).await;
    assert!(matches!(r, Err(Error::Store(StoreError::InvalidTransition(_)))), "cancelled: {r:?}");
}

// ---- views ----

/// `queue_list` shows queued, retrying and blocked items (not ready, running or finished ones) in
/// claim order, filtered by project and limited by the page.
pub async fn queue_list_in_claim_order(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let t0 = h.clock.now();
    h.queued(p.id, "succeeded", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.succeed(&a).await;
    let failed = h.queued(p.id, "failed", 0, &[]).await;
    let a = h.claim_one("agent").await;
    fail_with(&h, &a, FailureKind::Permanent).await;
    let retrying = h.queued(p.id, "retrying", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.fail(&a).await;
    let running = h.queued(p.id, "running", 0, &[]).await;
    let a = h.claim_one("agent").await;
    assert_eq!(a.claimed.work_item.id, running.id);
    h.clock.advance(secs(1));
    let high = h.queued(p.id, "high", 5, &[]).await;
    let low1 = h.queued(p.id, "low1", 0, &[]).await;
    h.clock.advance(secs(1));
    let low2 = h.queued(p.id, "low2", 0, &[]).await;
    h.clock.advance(secs(1));
    let blocked = h.queued(p.id, "blocked", 0, &[failed.id]).await;
    h.item(p.id, "ready").await;
    let q = h.orch.create_project("other", "").await.unwrap();
    let foreign = h.queued(q.id, "foreign", 9, &[]).await;

    let list = h.store.queue_list(QueueFilter { project_id: Some(p.id), page: Page::default() }).await.unwrap();
    let got: Vec<(WorkItemId, WorkItemState)> = list.iter().map(|t| (t.work_item_id, t.state)).collect();
    assert_eq!(
        got,
        vec![
            (high.id, WorkItemState::Queued),
            (low1.id, WorkItemState::Queued),
            (low2.id, WorkItemState::Queued),
            (blocked.id, WorkItemState::Blocked),
            (retrying.id, WorkItemState::Retrying),
        ]
    );
    let r = list.iter().find(|t| t.work_item_id == retrying.id).unwrap();
    assert_eq!(r.run_at, Some(t0 + secs(10)));
    assert_eq!(r.attempts, 1);
    assert!(list.iter().find(|t| t.work_item_id == blocked.id).unwrap().blocked_reason.is_some());
    let all = h.store.queue_list(QueueFilter::default()).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0].work_item_id, foreign.id);
    let page =
        h.store.queue_list(QueueFilter { project_id: Some(p.id), page: Page { limit: 2, after: None } }).await.unwrap();
    assert_eq!(page.iter().map(|t| t.work_item_id).collect::<Vec<_>>(), vec![high.id, low1.id]);
}

/// Paging through `queue_list` gives the full listing in the same order, for any page size, across
/// claimable items and items waiting for a dependency, interleaved by priority and time.
pub async fn queue_list_pages_across_ready_and_waiting(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let dep = h.queued(p.id, "dependency", 9, &[]).await;
    assert_eq!(h.claim_one("agent").await.claimed.work_item.id, dep.id);
    let mut want = Vec::new();
    for i in 0..6 {
        h.clock.advance(secs(1));
        let deps = if i % 2 == 1 { vec![dep.id] } else { vec![] };
        want.push(h.queued(p.id, &format!("item {i}"), 0, &deps).await.id);
    }
    h.clock.advance(secs(1));
    want.insert(0, h.queued(p.id, "urgent, waiting", 3, &[dep.id]).await.id);
    want.insert(1, h.queued(p.id, "urgent, claimable", 2, &[]).await.id);
    let all = h.store.queue_list(QueueFilter { project_id: Some(p.id), page: Page::default() }).await.unwrap();
    assert_eq!(all.iter().map(|t| t.work_item_id).collect::<Vec<_>>(), want);
    for limit in [1, 2, 3] {
        let (mut got, mut after) = (Vec::new(), None);
        for _ in 0..=want.len() {
            let page =
                h.store.queue_list(QueueFilter { project_id: Some(p.id), page: Page { limit, after } }).await.unwrap();
            assert!(page.len() <= limit as usize);
            let Some(last) = page.last() else { break };
            after = Some(last.work_item_id.0);
            got.extend(page.iter().map(|t| t.work_item_id));
        }
        assert_eq!(got, want, "pages of {limit}");
    }
}

/// `scheduled_task_get` reports the item's dependencies and how many have not succeeded yet.
pub async fn scheduled_task_reports_pending_dependencies(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let t0 = h.clock.now();
    let a = h.queued(p.id, "a", 0, &[]).await;
    let b = h.queued(p.id, "b", 0, &[]).await;
    let c = h.queued(p.id, "c", 3, &[a.id, b.id]).await;
    let t = h.store.scheduled_task_get(c.id).await.unwrap();
    assert_eq!(t.work_item_id, c.id);
    assert_eq!(t.project_id, p.id);
    assert_eq!(t.state, WorkItemState::Queued);
    assert_eq!(t.priority, 3);
    assert_eq!(set(&t.dependencies), set(&[a.id, b.id]));
    assert_eq!(t.pending_dependencies, 2);
    assert_eq!(t.attempts, 0);
    assert_eq!(t.run_at, Some(t0));
    assert_eq!(t.enqueued_at, Some(t0));
    assert_eq!(t.blocked_reason, None);
    let v = h.claim("agent", 5).await;
    assert_eq!(set(&item_ids(&v)), set(&[a.id, b.id]));
    h.succeed(&v[0]).await;
    assert_eq!(h.store.scheduled_task_get(c.id).await.unwrap().pending_dependencies, 1);
    h.succeed(&v[1]).await;
    assert_eq!(h.store.scheduled_task_get(c.id).await.unwrap().pending_dependencies, 0);
    let r = h.store.scheduled_task_get(WorkItemId::new()).await;
    assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
}

/// `runs_complete_many` guards each completion on its own: valid ones apply, stale, finished or
/// unknown ones fail without affecting the others.
pub async fn complete_many_results_are_independent(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    for i in 0..4 {
        h.queued(p.id, &format!("item {i}"), 0, &[]).await;
    }
    let v = h.claim("agent", 4).await;
    assert_eq!(v.len(), 4);
    h.succeed(&v[3]).await;
    let ok = |a: &Assignment, token: u64, outcome: RunOutcome, usage: Option<Usage>| RunCompletion {
        run_id: a.run_id(),
        token,
        outcome,
        usage,
    };
    let success = RunOutcome::Succeeded { exit_code: Some(0) };
    let usage = Usage { input_tokens: 5, output_tokens: 7, ..Default::default() };
    let now = h.clock.now();
    let results = h
        .store
        .runs_complete_many(CompleteMany {
            completions: vec![
                ok(&v[0], v[0].token(), success.clone(), Some(usage.clone())),
                ok(&v[1], v[1].token() + 1, success.clone(), None),
                ok(
                    &v[2],
                    v[2].token(),
                    RunOutcome::Failed { error: "flaky".into(), exit_code: None, kind: FailureKind::Retryable },
                    None,
                ),
                ok(&v[3], v[3].token(), success.clone(), None),
                RunCompletion { run_id: RunId::new(), token: 1, outcome: success.clone(), usage: None },
            ],
            retry_defaults: h.orch.config().retry.clone(),
            now,
        })
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    match &results[0] {
        Ok(r) => {
            assert_eq!(r.work_item_state, WorkItemState::Succeeded);
            assert_eq!(r.run.usage, usage);
        }
        Err(e) => panic!("first completion: {e}"),
    }
    assert!(matches!(results[1], Err(StoreError::LeaseLost { .. })), "{:?}", results[1]);
    match &results[2] {
        Ok(r) => {
            assert_eq!(r.work_item_state, WorkItemState::Retrying);
            assert_eq!(r.retry_at, Some(now + secs(10)));
        }
        Err(e) => panic!("third completion: {e}"),
    }
    assert!(matches!(results[3], Err(StoreError::LeaseLost { .. })), "{:?}", results[3]);
    assert!(matches!(results[4], Err(StoreError::NotFound { .. })), "{:?}", results[4]);
    assert_eq!(h.state_of(v[0].claimed.work_item.id).await, WorkItemState::Succeeded);
    assert_eq!(h.store.run_get(v[0].run_id()).await.unwrap().usage, usage);
    assert_eq!(h.state_of(v[1].claimed.work_item.id).await, WorkItemState::Running);
    assert_eq!(h.store.run_get(v[1].run_id()).await.unwrap().state, RunState::Claimed);
    assert_eq!(h.state_of(v[2].claimed.work_item.id).await, WorkItemState::Retrying);
    assert_eq!(h.state_of(v[3].claimed.work_item.id).await, WorkItemState::Succeeded);
    assert_eq!(h.succeed(&v[1]).await.work_item_state, WorkItemState::Succeeded);
}

/// `stats` counts work items and runs per state (every state present) and pending info requests.
pub async fn stats_count_per_state(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    assert_eq!(h.store.stats().await.unwrap(), QueueStats::zeroed());
    // lost run -> retrying item
    h.queued(p.id, "lost", 0, &[]).await;
    h.claim_one("agent").await;
    h.clock.advance(secs(30));
    assert_eq!(h.store.leases_reap_expired(tick_now(&h)).await.unwrap().len(), 1);
    // succeeded
    h.queued(p.id, "succeeded", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.succeed(&a).await;
    // failed
    let failed = h.queued(p.id, "failed", 0, &[]).await;
    let a = h.claim_one("agent").await;
    fail_with(&h, &a, FailureKind::Permanent).await;
    // retrying
    h.queued(p.id, "retrying", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.fail(&a).await;
    // cancelled with a cancelled run
    let c = h.queued(p.id, "cancelled", 0, &[]).await;
    h.claim_one("agent").await;
    h.orch.cancel_work_item(c.id, None).await.unwrap();
    // waiting for input
    h.queued(p.id, "waiting", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.orch.ask(a.run_id(), a.token(), vec![question("k")]).await.unwrap();
    // running: one claimed, one started
    h.queued(p.id, "claimed", 0, &[]).await;
    h.claim_one("agent").await;
    h.queued(p.id, "started", 0, &[]).await;
    let a = h.claim_one("agent").await;
    h.orch.start(a.run_id(), a.token()).await.unwrap();
    // blocked, queued, ready, draft
    h.queued(p.id, "blocked", 0, &[failed.id]).await;
    h.queued(p.id, "queued", 0, &[]).await;
    h.item(p.id, "ready").await;
    h.orch
        .create_work_item(CreateWorkItem {
            project_id: Some(p.id),
            title: "draft".into(),
            draft: true,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut expected = QueueStats::zeroed();
    for (state, n) in [
        ("draft", 1),
        ("ready", 1),
        ("queued", 1),
        ("running", 2),
        ("waiting_input", 1),
        ("retrying", 2),
        ("blocked", 1),
        ("succeeded", 1),
        ("failed", 1),
        ("cancelled", 1),
    ] {
        expected.work_items.insert(state.to_string(), n);
    }
    for (state, n) in [
        ("claimed", 1),
        ("running", 1),
        ("waiting_input", 1),
        ("succeeded", 1),
        ("failed", 2),
        ("cancelled", 1),
        ("lost", 1),
    ] {
        expected.runs.insert(state.to_string(), n);
    }
    expected.pending_info_requests = 1;
    assert_eq!(h.store.stats().await.unwrap(), expected);
}

/// The store's notifier generation increases when work becomes claimable: enqueue, dependency
/// release, an answered question and a promoted retry.
pub async fn notifier_signals_claimable_work(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let n = h.store.notifier().clone();
    let g = n.generation();
    let a = h.queued(p.id, "a", 0, &[]).await;
    assert!(n.generation() > g, "create with enqueue");
    let b = h.item(p.id, "b").await;
    let g = n.generation();
    enqueue_with(&h, b.id, &[a.id]).await.unwrap();
    assert!(n.generation() > g, "enqueue");
    let v = h.claim("agent", 5).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    let g = n.generation();
    assert_eq!(h.succeed(&v[0]).await.released, vec![b.id]);
    assert!(n.generation() > g, "dependency release");
    let vb = h.claim_one("agent").await;
    let asked = h.orch.ask(vb.run_id(), vb.token(), vec![question("k")]).await.unwrap();
    let g = n.generation();
    let answered = h.orch.answer_info_request(asked[0].id, "42", "human").await.unwrap();
    assert!(answered.resumed);
    assert!(n.generation() > g, "answer");
    let resumed = h.claim_one("agent").await;
    assert!(resumed.claimed.resumed);
    h.fail(&resumed).await;
    h.clock.advance(secs(10));
    let g = n.generation();
    assert_eq!(h.orch.tick().await.unwrap().promoted, vec![b.id]);
    assert!(n.generation() > g, "tick promotion");
}

/// Changing the priority of a queued item reorders the claims.
pub async fn priority_update_reorders_claims(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    h.clock.advance(secs(1));
    let b = h.queued(p.id, "b", 0, &[]).await;
    let changed =
        h.orch.update_work_item(b.id, UpdateWorkItem { priority: Some(5), ..Default::default() }).await.unwrap();
    assert_eq!(changed.work_item.priority, 5);
    assert_eq!(changed.work_item.state, WorkItemState::Queued);
    let list = h.store.queue_list(QueueFilter::default()).await.unwrap();
    assert_eq!(list.iter().map(|t| t.work_item_id).collect::<Vec<_>>(), vec![b.id, a.id]);
    assert_eq!(item_ids(&h.claim("agent", 5).await), vec![b.id, a.id]);
}

/// An item that becomes `blocked` when enqueued blocks the items already waiting on it, transitively
/// (also within one batch, whatever the order).
pub async fn blocked_at_enqueue_blocks_existing_dependents(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let v = h.claim_one("agent").await;
    fail_with(&h, &v, FailureKind::Permanent).await;
    // c waits on b while b is still `ready`; then b is enqueued on the failed a.
    let b = h.item(p.id, "b").await;
    let c = h.queued(p.id, "c", 0, &[b.id]).await;
    let d = h.queued(p.id, "d", 0, &[c.id]).await;
    assert_eq!(c.state, WorkItemState::Queued);
    assert_eq!(enqueue_with(&h, b.id, &[a.id]).await.unwrap().state, WorkItemState::Blocked);
    for id in [c.id, d.id] {
        let w = h.store.work_item_get(id).await.unwrap();
        assert_eq!(w.state, WorkItemState::Blocked, "{}", w.title);
        assert!(w.blocked_reason.is_some());
    }
    // In one batch, a dependent listed before its blocked dependency.
    let x = h.item(p.id, "x").await;
    let y = h.item(p.id, "y").await;
    let e = |id: WorkItemId, deps: &[WorkItemId]| Enqueue {
        work_item_id: id,
        options: EnqueueOptions { priority: None, depends_on: deps.to_vec(), not_before: None },
    };
    h.orch.enqueue_many(vec![e(y.id, &[x.id]), e(x.id, &[a.id])]).await.unwrap();
    assert_eq!(h.state_of(x.id).await, WorkItemState::Blocked);
    assert_eq!(h.state_of(y.id).await, WorkItemState::Blocked);
    // Requeueing the failed root brings the whole chain back.
    h.orch.requeue_work_item(a.id, RequeueRequest::default()).await.unwrap();
    for id in [b.id, c.id, d.id, x.id, y.id] {
        let w = h.store.work_item_get(id).await.unwrap();
        assert_eq!(w.state, WorkItemState::Queued, "{}", w.title);
        assert_eq!(w.blocked_reason, None);
    }
}

/// With two failed dependencies, requeueing one keeps the dependent blocked by the other (and its
/// blocked reason names the remaining blocker); requeueing both unblocks it.
pub async fn blocked_reason_tracks_remaining_blocker(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let x = h.queued(p.id, "x", 1, &[]).await;
    let y = h.queued(p.id, "y", 0, &[]).await;
    let z = h.queued(p.id, "z", 0, &[x.id, y.id]).await;
    let v = h.claim("agent", 2).await;
    assert_eq!(item_ids(&v), vec![x.id, y.id]);
    fail_with(&h, &v[0], FailureKind::Permanent).await;
    fail_with(&h, &v[1], FailureKind::Permanent).await;
    assert_eq!(h.state_of(z.id).await, WorkItemState::Blocked);
    h.orch.requeue_work_item(x.id, RequeueRequest::default()).await.unwrap();
    let wz = h.store.work_item_get(z.id).await.unwrap();
    assert_eq!(wz.state, WorkItemState::Blocked);
    let reason = wz.blocked_reason.unwrap_or_default();
    assert!(reason.contains(&y.id.to_string()), "reason should name y: {reason}");
    assert!(!reason.contains(&x.id.to_string()), "x is queued again: {reason}");
    h.orch.requeue_work_item(y.id, RequeueRequest::default()).await.unwrap();
    let wz = h.store.work_item_get(z.id).await.unwrap();
    assert_eq!(wz.state, WorkItemState::Queued);
    assert_eq!(wz.blocked_reason, None);
    assert_eq!(h.store.scheduled_task_get(z.id).await.unwrap().pending_dependencies, 2);
}

/// Requeueing a succeeded dependency makes its waiting dependents wait again until it succeeds anew.
pub async fn requeue_succeeded_dependency_holds_dependents(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let b = h.queued(p.id, "b", 0, &[a.id]).await;
    let v = h.claim_one("agent").await;
    assert_eq!(h.succeed(&v).await.released, vec![b.id]);
    let ra = h.orch.requeue_work_item(a.id, RequeueRequest::default()).await.unwrap();
    assert_eq!(ra.state, WorkItemState::Queued);
    assert_eq!(ra.attempts, 0);
    assert_eq!(h.state_of(b.id).await, WorkItemState::Queued);
    assert_eq!(h.store.scheduled_task_get(b.id).await.unwrap().pending_dependencies, 1);
    let v = h.claim("agent", 5).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    assert_eq!(h.succeed(&v[0]).await.released, vec![b.id]);
    assert_eq!(h.claim_one("agent").await.claimed.work_item.id, b.id);
}

/// The list of cases in this module, for [`crate::store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __sched_cases {
    ($factory:expr) => {
        $crate::__conformance_cases!(@emit $factory, cases_sched;
            claim_order_priority_then_oldest,
            claim_equal_priority_is_fifo,
            claim_batch_returns_claim_order,
            claim_respects_limit_and_empty_queue,
            claim_creates_run_and_lease,
            claim_requires_all_labels,
            claim_exclusive_under_concurrency,
            not_before_delays_claim,
            not_before_in_past_acts_as_now,
            dependency_released_on_success,
            diamond_dependency_needs_both,
            enqueue_rejects_unknown_and_foreign_dependencies,
            enqueue_rejects_cycles,
            enqueue_batch_is_all_or_nothing,
            enqueue_requires_ready_state,
            failed_dependency_blocks_transitively,
            cancelled_dependency_blocks_dependents,
            enqueue_on_failed_dependency_is_blocked,
            requeue_failed_dependency_unblocks_dependents,
            retry_backoff_timing_and_exhaustion,
            retry_policy_overrides,
            permanent_failure_fails_at_once,
            tick_promotes_only_due_retries,
            expired_lease_is_reaped_and_reclaimed,
            expired_lease_out_of_retries_fails,
            heartbeat_extends_lease,
            stale_token_writes_are_lease_lost,
            writes_after_expiry_before_reap_are_lease_lost,
            completing_twice_is_refused,
            run_start_and_complete_from_claimed,
            requeue_queued_item_with_delay,
            requeue_with_backoff_adds_policy_delay,
            requeue_running_item_conflicts,
            run_requeue_cancels_active_run,
            cancel_queued_and_running_items,
            cancel_finished_item_is_invalid_transition,
            queue_list_in_claim_order,
            queue_list_pages_across_ready_and_waiting,
            scheduled_task_reports_pending_dependencies,
            complete_many_results_are_independent,
            stats_count_per_state,
            notifier_signals_claimable_work,
            priority_update_reorders_claims,
            blocked_at_enqueue_blocks_existing_dependents,
            blocked_reason_tracks_remaining_blocker,
            requeue_succeeded_dependency_holds_dependents,
        );
    };
}
