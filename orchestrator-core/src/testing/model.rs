//! A model-based property test: random operation sequences run against a store and a simple model.
//!
//! Each generated sequence of operations runs in its own project of the one store the case receives (with a
//! fresh [`Harness`] whose manual clock starts at the same epoch), so one store serves every sequence:
//! the sequence's work items all carry a label unique to the sequence and its agent claims with only
//! that label as capability, so items of other sequences are never claimed; only the sequence's own items
//! and runs are compared (store-wide [`Store::tick`] reports are filtered to them). After each sequence
//! its unfinished items are cancelled and the project is deleted (best effort).
//!
//! The model tracks, per work item, its state, attempts, `run_at`, priority and dependencies, and the
//! runs with their lease token and expiry. It predicts which items a claim takes (priority desc, then
//! `run_at` asc, then creation order), retry times (`base * 2^(attempts-1)`, capped, no jitter), reaping
//! of expired leases on tick, fencing (`LeaseLost`) and refusals. After every operation the store's items
//! (state, attempts, priority, `run_at` when queued or retrying, current run when running) and its active
//! runs (id, token, expiry, attempt) are compared with the model; at the end of a sequence every run of
//! the project is compared too.
//!
//! The runner is proptest's [`TestRunner`] driven by hand (no macro): it runs inside the case's tokio
//! runtime through `block_in_place` + `Handle::block_on`, and shrinks a failing sequence.

use super::Harness;
use crate::agent::{AgentApi, ClaimRequest};
use crate::clock::Clock;
use crate::domain::{Run, RunOutcome, WorkItem};
use crate::error::{Error, StoreError};
use crate::ids::{ProjectId, RunId, WorkItemId};
use crate::orchestrator::{CreateWorkItem, RequeueRequest, UpdateWorkItem};
use crate::retry::FailureKind;
use crate::state::{RunState, WorkItemState};
use crate::store::*;
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

/// Generated sequences per run.
const CASES: u32 = 64;
/// Longest generated sequence.
const MAX_OPS: usize = 40;
/// The harness lease TTL, in seconds.
const LEASE_TTL: i64 = 30;
/// The harness retry policy: base and cap in seconds, and retries.
const BACKOFF_BASE: i64 = 10;
const BACKOFF_CAP: i64 = 300;
const MAX_RETRIES: u32 = 3;

/// One generated operation. Item and run references are indices taken modulo the number of candidates
/// when the operation runs (an operation with no candidate is skipped).
#[derive(Debug, Clone)]
enum Op {
    /// Creates a work item (enqueued or left `ready`) with an optional dependency on an earlier item.
    Create { priority: i32, dep: Option<usize>, enqueue: bool },
    /// Enqueues an item (with the dependency chosen at creation).
    Enqueue { idx: usize },
    /// Claims up to `n` runs.
    Claim { n: u32 },
    /// Completes the k-th held run successfully.
    Succeed { k: usize },
    /// Fails the k-th held run (retryable).
    FailRetryable { k: usize },
    /// Fails the k-th held run (permanent).
    FailPermanent { k: usize },
    /// Renews the k-th held run's lease.
    Heartbeat { k: usize },
    /// Completes the k-th held run with a stale token (token + 1).
    StaleWrite { k: usize },
    /// Completes the k-th finished run with its last token.
    ZombieWrite { k: usize },
    /// Moves the clock forward.
    AdvanceClock { secs: i64 },
    /// Promotes due retries and reaps expired leases.
    Tick,
    /// Cancels an item.
    Cancel { idx: usize },
    /// Requeues an item with no delay.
    RequeueItem { idx: usize },
    /// Changes an item's priority.
    SetPriority { idx: usize, priority: i32 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (-2i32..3, proptest::option::weighted(0.5, 0usize..64), proptest::bool::weighted(0.8))
            .prop_map(|(priority, dep, enqueue)| Op::Create { priority, dep, enqueue }),
        2 => (0usize..64).prop_map(|idx| Op::Enqueue { idx }),
        5 => (1u32..4).prop_map(|n| Op::Claim { n }),
        3 => (0usize..8).prop_map(|k| Op::Succeed { k }),
        2 => (0usize..8).prop_map(|k| Op::FailRetryable { k }),
        1 => (0usize..8).prop_map(|k| Op::FailPermanent { k }),
        2 => (0usize..8).prop_map(|k| Op::Heartbeat { k }),
        1 => (0usize..8).prop_map(|k| Op::StaleWrite { k }),
        1 => (0usize..16).prop_map(|k| Op::ZombieWrite { k }),
        3 => (1i64..120).prop_map(|secs| Op::AdvanceClock { secs }),
        3 => Just(Op::Tick),
        1 => (0usize..64).prop_map(|idx| Op::Cancel { idx }),
        2 => (0usize..64).prop_map(|idx| Op::RequeueItem { idx }),
        1 => (0usize..64, -2i32..3).prop_map(|(idx, priority)| Op::SetPriority { idx, priority }),
    ]
}

/// Shorthand for [`Op::Create`] in [`REGRESSIONS`].
const fn create(priority: i32, dep: Option<usize>, enqueue: bool) -> Op {
    Op::Create { priority, dep, enqueue }
}

/// Fixed sequences run before the random ones: cases random runs found (or that are too rare to rely on).
const REGRESSIONS: &[&[Op]] = &[
    // Claim order: priority desc, then run_at asc, then creation order.
    &[
        create(1, None, true),
        create(2, None, true),
        create(1, None, true),
        Op::AdvanceClock { secs: 5 },
        create(2, None, true),
        create(1, None, true),
        Op::Claim { n: 1 },
        Op::Claim { n: 1 },
        Op::Claim { n: 1 },
        Op::Claim { n: 1 },
        Op::Claim { n: 1 },
    ],
    // Retries at exactly 10, 20 and 40 s (claimable when due even without a tick), then failed.
    &[
        create(0, None, true),
        Op::Claim { n: 1 },
        Op::FailRetryable { k: 0 },
        Op::AdvanceClock { secs: 9 },
        Op::Claim { n: 1 },
        Op::AdvanceClock { secs: 1 },
        Op::Claim { n: 1 },
        Op::FailRetryable { k: 0 },
        Op::AdvanceClock { secs: 20 },
        Op::Tick,
        Op::Claim { n: 1 },
        Op::FailRetryable { k: 0 },
        Op::AdvanceClock { secs: 40 },
        Op::Claim { n: 1 },
        Op::FailRetryable { k: 0 },
        Op::ZombieWrite { k: 3 },
    ],
    // A running dependent whose dependency was requeued and then failed: when its own lease is reaped,
    // the retry would never run, so it is blocked.
    &[
        create(0, None, true),
        create(0, Some(0), true),
        Op::Claim { n: 1 },
        Op::Succeed { k: 0 },
        Op::Claim { n: 1 },
        Op::RequeueItem { idx: 0 },
        Op::Claim { n: 1 },
        Op::FailPermanent { k: 1 },
        Op::AdvanceClock { secs: 30 },
        Op::Tick,
    ],
    // The same through a retryable failure of the dependent's run.
    &[
        create(0, None, true),
        create(0, Some(0), true),
        Op::Claim { n: 1 },
        Op::Succeed { k: 0 },
        Op::Claim { n: 1 },
        Op::RequeueItem { idx: 0 },
        Op::Cancel { idx: 0 },
        Op::FailRetryable { k: 0 },
    ],
    // Enqueueing an item behind a cancelled dependency blocks the items already waiting on it.
    &[
        create(0, None, false),
        create(0, Some(0), false),
        Op::Cancel { idx: 0 },
        create(0, Some(1), true),
        Op::Enqueue { idx: 1 },
    ],
    // Requeueing a succeeded item behind a cancelled dependency blocks it and its queued dependents.
    &[
        create(0, None, true),
        create(0, Some(0), true),
        create(0, Some(1), true),
        Op::Claim { n: 1 },
        Op::Succeed { k: 0 },
        Op::Claim { n: 1 },
        Op::Succeed { k: 0 },
        Op::RequeueItem { idx: 0 },
        Op::Cancel { idx: 0 },
        Op::RequeueItem { idx: 1 },
        Op::Claim { n: 3 },
    ],
];

/// Runs random operation sequences against `store` and compares with the model.
pub async fn run_model_test(store: Arc<dyn Store>) {
    for (i, ops) in REGRESSIONS.iter().enumerate() {
        if let Err(e) = run_sequence(store.clone(), ops).await {
            panic!("store and model disagree in regression sequence {i}: {e}");
        }
    }
    let handle = tokio::runtime::Handle::current();
    let config = Config {
        // `PROPTEST_CASES` raises the count for a longer local soak.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES),
        failure_persistence: None,
        fork: false,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = proptest::collection::vec(op_strategy(), 1..=MAX_OPS);
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |ops| handle.block_on(run_sequence(store.clone(), &ops)).map_err(TestCaseError::fail))
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            panic!("store and model disagree: {reason}\nminimal failing sequence ({} ops): {ops:?}", ops.len())
        }
        Err(TestError::Abort(reason)) => panic!("model test aborted: {reason}"),
    }
}

/// Runs one sequence in a new project; cleans up whatever happens.
async fn run_sequence(store: Arc<dyn Store>, ops: &[Op]) -> Result<(), String> {
    let h = Harness::new(store);
    let project =
        h.orch.create_project("model", "model-based test").await.map_err(|e| format!("create project: {e}"))?;
    let mut seq = Sequence {
        label: format!("model-{}", project.id),
        h,
        project: project.id,
        m: Model::default(),
        trace: String::new(),
    };
    let mut result = Ok(());
    for (i, op) in ops.iter().enumerate() {
        let _ = write!(seq.trace, "{i:>3}: {op:?}");
        let r = match seq.apply(op).await {
            Ok(()) => seq.compare().await,
            Err(e) => Err(e),
        };
        seq.trace.push('\n');
        if let Err(e) = r {
            result = Err(format!("step {i} ({op:?}): {e}"));
            break;
        }
    }
    if result.is_ok() {
        result = seq.compare_all_runs().await;
    }
    seq.cleanup().await;
    result.map_err(|e| format!("{e}\n--- executed operations ---\n{}--- model ---\n{}", seq.trace, seq.m.describe()))
}

/// A model work item.
#[derive(Debug, Clone)]
struct MItem {
    id: WorkItemId,
    state: WorkItemState,
    attempts: u32,
    run_at: Option<DateTime<Utc>>,
    priority: i32,
    /// Dependencies (indices of earlier items).
    deps: Vec<usize>,
    /// The dependency an `Enqueue` of a `ready` item adds.
    planned_dep: Option<usize>,
}

/// A model run.
#[derive(Debug, Clone)]
struct MRun {
    id: RunId,
    item: usize,
    token: u64,
    expires: DateTime<Utc>,
    attempt: u32,
    state: RunState,
}

#[derive(Debug, Default)]
struct Model {
    items: Vec<MItem>,
    runs: Vec<MRun>,
}

fn backoff(attempt: u32) -> Duration {
    let exp = (attempt.max(1) - 1).min(20);
    Duration::seconds((BACKOFF_BASE << exp).min(BACKOFF_CAP))
}

/// What the store is expected to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Refused by the state machine or a guard (`InvalidTransition` or `Conflict`).
    Refused,
    LeaseLost,
}

fn outcome_of<T>(r: &Result<T, Error>) -> Result<Outcome, String> {
    match r {
        Ok(_) => Ok(Outcome::Ok),
        Err(Error::Store(StoreError::LeaseLost { .. })) => Ok(Outcome::LeaseLost),
        Err(Error::Store(StoreError::InvalidTransition(_) | StoreError::Conflict { .. })) => Ok(Outcome::Refused),
        Err(e) => Err(format!("unexpected error: {e:?}")),
    }
}

fn check_outcome<T>(r: &Result<T, Error>, expected: Outcome) -> Result<(), String> {
    let got = outcome_of(r)?;
    if got != expected {
        let detail = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        return Err(format!("expected {expected:?}, store answered {got:?} ({detail})"));
    }
    Ok(())
}

impl Model {
    fn held(&self) -> Vec<usize> {
        (0..self.runs.len()).filter(|r| self.runs[*r].state == RunState::Claimed).collect()
    }

    fn finished_runs(&self) -> Vec<usize> {
        (0..self.runs.len()).filter(|r| self.runs[*r].state != RunState::Claimed).collect()
    }

    fn held_run_of(&self, item: usize) -> Option<usize> {
        (0..self.runs.len()).find(|r| self.runs[*r].item == item && self.runs[*r].state == RunState::Claimed)
    }

    fn dependents(&self, i: usize) -> Vec<usize> {
        (0..self.items.len()).filter(|j| self.items[*j].deps.contains(&i)).collect()
    }

    fn blocking_dep(&self, i: usize) -> Option<usize> {
        self.items[i].deps.iter().copied().find(|d| self.items[*d].state.blocks_dependents())
    }

    fn deps_succeeded(&self, i: usize) -> bool {
        self.items[i].deps.iter().all(|d| self.items[*d].state == WorkItemState::Succeeded)
    }

    /// Claimable items in claim order.
    fn claimable(&self, now: DateTime<Utc>) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.items.len())
            .filter(|i| {
                let it = &self.items[*i];
                matches!(it.state, WorkItemState::Queued | WorkItemState::Retrying)
                    && self.deps_succeeded(*i)
                    && it.run_at.is_some_and(|t| t <= now)
            })
            .collect();
        v.sort_by_key(|i| (Reverse(self.items[*i].priority), self.items[*i].run_at, *i));
        v
    }

    /// Queued/retrying dependents of a failed, cancelled or blocked item become blocked, transitively.
    fn block_dependents(&mut self, i: usize) -> Vec<usize> {
        let mut blocked = Vec::new();
        let mut stack = vec![i];
        while let Some(cur) = stack.pop() {
            for d in self.dependents(cur) {
                if matches!(self.items[d].state, WorkItemState::Queued | WorkItemState::Retrying) {
                    self.items[d].state = WorkItemState::Blocked;
                    blocked.push(d);
                    stack.push(d);
                }
            }
        }
        blocked
    }

    /// Blocked dependents with no blocking dependency left are queued again (at `now`), transitively.
    fn unblock_dependents(&mut self, i: usize, now: DateTime<Utc>) {
        let mut stack = vec![i];
        while let Some(cur) = stack.pop() {
            for d in self.dependents(cur) {
                if self.items[d].state == WorkItemState::Blocked && self.blocking_dep(d).is_none() {
                    self.items[d].state = WorkItemState::Queued;
                    self.items[d].run_at = Some(now);
                    stack.push(d);
                }
            }
        }
    }

    /// A failed attempt of running item `i`: its next state, retry time and newly blocked dependents.
    /// A retry whose dependency will never succeed (failed, cancelled or blocked) is blocked instead.
    fn fail(
        &mut self,
        i: usize,
        permanent: bool,
        now: DateTime<Utc>,
    ) -> (WorkItemState, Option<DateTime<Utc>>, Vec<usize>) {
        let attempts = self.items[i].attempts.max(1);
        if !permanent && attempts <= MAX_RETRIES {
            if self.blocking_dep(i).is_some() {
                self.items[i].state = WorkItemState::Blocked;
                self.items[i].run_at = None;
                let b = self.block_dependents(i);
                return (WorkItemState::Blocked, None, b);
            }
            let at = now + backoff(attempts);
            self.items[i].state = WorkItemState::Retrying;
            self.items[i].run_at = Some(at);
            (WorkItemState::Retrying, Some(at), Vec::new())
        } else {
            self.items[i].state = WorkItemState::Failed;
            self.items[i].run_at = None;
            let b = self.block_dependents(i);
            (WorkItemState::Failed, None, b)
        }
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for (i, it) in self.items.iter().enumerate() {
            let _ = writeln!(
                s,
                "item #{i} {}: {} attempts={} prio={} run_at={:?} deps={:?}",
                it.id, it.state, it.attempts, it.priority, it.run_at, it.deps
            );
        }
        for r in &self.runs {
            let _ = writeln!(
                s,
                "run {} item #{}: {} token={} expires={} attempt={}",
                r.id, r.item, r.state, r.token, r.expires, r.attempt
            );
        }
        s
    }
}

fn ids_of(m: &Model, v: &[usize]) -> BTreeSet<WorkItemId> {
    v.iter().map(|i| m.items[*i].id).collect()
}

/// One running sequence: the harness, its project and the model.
struct Sequence {
    h: Harness,
    project: ProjectId,
    label: String,
    m: Model,
    trace: String,
}

impl Sequence {
    fn now(&self) -> DateTime<Utc> {
        self.h.clock.now()
    }

    fn idx_of(&self, id: WorkItemId) -> Option<usize> {
        self.m.items.iter().position(|x| x.id == id)
    }

    fn note(&mut self, s: impl std::fmt::Display) {
        let _ = write!(self.trace, " {s}");
    }

    async fn apply(&mut self, op: &Op) -> Result<(), String> {
        let now = self.now();
        let n = self.m.items.len();
        match *op {
            Op::Create { priority, dep, enqueue } => {
                let dep = dep.filter(|_| n > 0).map(|d| d % n);
                let r = self
                    .h
                    .orch
                    .create_work_item(CreateWorkItem {
                        project_id: Some(self.project),
                        title: format!("item {n}"),
                        labels: vec![self.label.clone()],
                        priority,
                        enqueue: enqueue.then(|| EnqueueOptions {
                            priority: None,
                            depends_on: dep.map(|d| vec![self.m.items[d].id]).unwrap_or_default(),
                            not_before: None,
                        }),
                        ..Default::default()
                    })
                    .await;
                check_outcome(&r, Outcome::Ok)?;
                let w = r.map_err(|e| e.to_string())?.work_item;
                let mut it = MItem {
                    id: w.id,
                    state: WorkItemState::Ready,
                    attempts: 0,
                    run_at: None,
                    priority,
                    deps: Vec::new(),
                    planned_dep: dep,
                };
                if enqueue {
                    it.deps = dep.into_iter().collect();
                    it.planned_dep = None;
                    it.run_at = Some(now);
                    it.state = if it.deps.iter().any(|d| self.m.items[*d].state.blocks_dependents()) {
                        WorkItemState::Blocked
                    } else {
                        WorkItemState::Queued
                    };
                }
                self.note(format_args!("-> #{n} dep={dep:?} {}", it.state));
                self.m.items.push(it);
            }
            Op::Enqueue { idx } => {
                if n == 0 {
                    self.note("(skipped)");
                    return Ok(());
                }
                let i = idx % n;
                let dep = self.m.items[i].planned_dep;
                let ready = self.m.items[i].state == WorkItemState::Ready;
                let state = self.m.items[i].state;
                self.note(format_args!("#{i} dep={dep:?} ({state})"));
                let options = EnqueueOptions {
                    priority: None,
                    depends_on: dep.map(|d| vec![self.m.items[d].id]).unwrap_or_default(),
                    not_before: None,
                };
                let r = self.h.orch.enqueue(self.m.items[i].id, options).await;
                check_outcome(&r, if ready { Outcome::Ok } else { Outcome::Refused })?;
                if ready {
                    let blocked = dep.is_some_and(|d| self.m.items[d].state.blocks_dependents());
                    let it = &mut self.m.items[i];
                    it.deps = dep.into_iter().collect();
                    it.planned_dep = None;
                    it.run_at = Some(now);
                    it.state = if blocked { WorkItemState::Blocked } else { WorkItemState::Queued };
                    if blocked {
                        // Items already waiting on this one can no longer run either.
                        self.m.block_dependents(i);
                    }
                }
            }
            Op::Claim { n: max } => {
                let mut expected = self.m.claimable(now);
                expected.truncate(max as usize);
                self.note(format_args!("expect {expected:?}"));
                let r = self
                    .h
                    .orch
                    .claim(ClaimRequest {
                        agent_id: "model-agent".into(),
                        capabilities: vec![self.label.clone()],
                        max,
                        lease_ttl_seconds: None,
                    })
                    .await;
                check_outcome(&r, Outcome::Ok)?;
                let got = r.map_err(|e| e.to_string())?;
                let got_ids: BTreeSet<WorkItemId> = got.iter().map(|a| a.claimed.work_item.id).collect();
                if got_ids != ids_of(&self.m, &expected) || got.len() != expected.len() {
                    let got_idx: Vec<Option<usize>> = got.iter().map(|a| self.idx_of(a.claimed.work_item.id)).collect();
                    return Err(format!(
                        "claim took items {got_idx:?} (None = not of this sequence), model expected {expected:?}"
                    ));
                }
                for i in expected {
                    let Some(a) = got.iter().find(|a| a.claimed.work_item.id == self.m.items[i].id) else {
                        continue;
                    };
                    let attempt = self.m.items[i].attempts + 1;
                    let c = &a.claimed;
                    if c.resumed
                        || c.lease.token != 1
                        || c.run.lease_token != 1
                        || c.run.attempt != attempt
                        || c.lease.expires_at != now + Duration::seconds(LEASE_TTL)
                    {
                        return Err(format!(
                            "claimed run of #{i}: resumed={} token={} attempt={} expires={}, expected a new run with token 1, attempt {attempt}, expiry {}",
                            c.resumed,
                            c.lease.token,
                            c.run.attempt,
                            c.lease.expires_at,
                            now + Duration::seconds(LEASE_TTL)
                        ));
                    }
                    if c.run.state != RunState::Claimed
                        || c.work_item.state != WorkItemState::Running
                        || c.run.work_item_id != c.work_item.id
                    {
                        return Err(format!("claimed run of #{i}: run {} item {}", c.run.state, c.work_item.state));
                    }
                    self.m.items[i].state = WorkItemState::Running;
                    self.m.items[i].attempts = attempt;
                    self.m.runs.push(MRun {
                        id: c.run.id,
                        item: i,
                        token: 1,
                        expires: now + Duration::seconds(LEASE_TTL),
                        attempt,
                        state: RunState::Claimed,
                    });
                }
            }
            Op::Succeed { k } | Op::FailRetryable { k } | Op::FailPermanent { k } => {
                let held = self.m.held();
                if held.is_empty() {
                    self.note("(skipped)");
                    return Ok(());
                }
                let ri = held[k % held.len()];
                let MRun { id: run_id, item: i, token, expires, .. } = self.m.runs[ri];
                let expired = expires <= now;
                self.note(format_args!("run of #{i}{}", if expired { " (lease expired)" } else { "" }));
                let outcome = match op {
                    Op::Succeed { .. } => RunOutcome::Succeeded { exit_code: Some(0) },
                    Op::FailRetryable { .. } => {
                        RunOutcome::Failed { error: "boom".into(), exit_code: Some(1), kind: FailureKind::Retryable }
                    }
                    _ => RunOutcome::Failed { error: "fatal".into(), exit_code: Some(2), kind: FailureKind::Permanent },
                };
                let r = self.h.orch.complete(run_id, token, outcome, None).await;
                check_outcome(&r, if expired { Outcome::LeaseLost } else { Outcome::Ok })?;
                let Ok(res) = r else { return Ok(()) };
                let (state, retry_at, released, blocked) = match op {
                    Op::Succeed { .. } => {
                        self.m.runs[ri].state = RunState::Succeeded;
                        self.m.items[i].state = WorkItemState::Succeeded;
                        self.m.items[i].run_at = None;
                        let released: Vec<usize> = self
                            .m
                            .dependents(i)
                            .into_iter()
                            .filter(|d| {
                                matches!(self.m.items[*d].state, WorkItemState::Queued | WorkItemState::Retrying)
                                    && self.m.deps_succeeded(*d)
                            })
                            .collect();
                        (WorkItemState::Succeeded, None, released, Vec::new())
                    }
                    _ => {
                        self.m.runs[ri].state = RunState::Failed;
                        let (state, retry_at, blocked) = self.m.fail(i, matches!(op, Op::FailPermanent { .. }), now);
                        (state, retry_at, Vec::new(), blocked)
                    }
                };
                self.note(format_args!("-> {state}"));
                let res_released: BTreeSet<WorkItemId> = res.released.iter().copied().collect();
                let res_blocked: BTreeSet<WorkItemId> = res.blocked.iter().copied().collect();
                if res.work_item_state != state
                    || res.retry_at != retry_at
                    || res_released != ids_of(&self.m, &released)
                    || res_blocked != ids_of(&self.m, &blocked)
                    || res.run.id != run_id
                {
                    return Err(format!(
                        "completion of #{i} answered state={} retry_at={:?} released={:?} blocked={:?}; model: state={state} retry_at={retry_at:?} released={released:?} blocked={blocked:?}",
                        res.work_item_state,
                        res.retry_at,
                        res.released.iter().map(|x| self.idx_of(*x)).collect::<Vec<_>>(),
                        res.blocked.iter().map(|x| self.idx_of(*x)).collect::<Vec<_>>(),
                    ));
                }
            }
            Op::Heartbeat { k } => {
                let held = self.m.held();
                if held.is_empty() {
                    self.note("(skipped)");
                    return Ok(());
                }
                let ri = held[k % held.len()];
                let MRun { id: run_id, item: i, token, expires, .. } = self.m.runs[ri];
                let expired = expires <= now;
                self.note(format_args!("run of #{i}{}", if expired { " (lease expired)" } else { "" }));
                let r = self.h.orch.heartbeat(run_id, token).await;
                check_outcome(&r, if expired { Outcome::LeaseLost } else { Outcome::Ok })?;
                if let Ok(lease) = r {
                    let want = now + Duration::seconds(LEASE_TTL);
                    if lease.token != token || lease.expires_at != want || lease.run_id != run_id {
                        return Err(format!(
                            "heartbeat of #{i} gave token {} expiry {}, expected token {token} expiry {want}",
                            lease.token, lease.expires_at
                        ));
                    }
                    self.m.runs[ri].expires = want;
                }
            }
            Op::StaleWrite { k } => {
                let held = self.m.held();
                if held.is_empty() {
                    self.note("(skipped)");
                    return Ok(());
                }
                let ri = held[k % held.len()];
                let MRun { id: run_id, item: i, token, .. } = self.m.runs[ri];
                self.note(format_args!("run of #{i} with token {}", token + 1));
                let r =
                    self.h.orch.complete(run_id, token + 1, RunOutcome::Succeeded { exit_code: Some(0) }, None).await;
                check_outcome(&r, Outcome::LeaseLost)?;
            }
            Op::ZombieWrite { k } => {
                let dead = self.m.finished_runs();
                if dead.is_empty() {
                    self.note("(skipped)");
                    return Ok(());
                }
                let ri = dead[k % dead.len()];
                let MRun { id: run_id, item: i, token, state, .. } = self.m.runs[ri];
                self.note(format_args!("{state} run of #{i}"));
                let r = self.h.orch.complete(run_id, token, RunOutcome::Succeeded { exit_code: Some(0) }, None).await;
                check_outcome(&r, Outcome::LeaseLost)?;
                let r = self.h.orch.heartbeat(run_id, token).await;
                check_outcome(&r, Outcome::LeaseLost)?;
            }
            Op::AdvanceClock { secs } => self.h.clock.advance(Duration::seconds(secs)),
            Op::Tick => {
                // Promotion first, then reaping (in run creation order).
                let promoted: Vec<usize> = (0..n)
                    .filter(|i| {
                        self.m.items[*i].state == WorkItemState::Retrying
                            && self.m.items[*i].run_at.is_some_and(|t| t <= now)
                    })
                    .collect();
                for i in &promoted {
                    self.m.items[*i].state = WorkItemState::Queued;
                }
                let mut reaped: BTreeMap<RunId, (usize, WorkItemState, Option<DateTime<Utc>>)> = BTreeMap::new();
                let mut expired: Vec<usize> =
                    self.m.held().into_iter().filter(|r| self.m.runs[*r].expires <= now).collect();
                expired.sort_by_key(|r| self.m.runs[*r].id);
                for ri in expired {
                    self.m.runs[ri].state = RunState::Lost;
                    let i = self.m.runs[ri].item;
                    let (state, retry_at, _) = self.m.fail(i, false, now);
                    reaped.insert(self.m.runs[ri].id, (i, state, retry_at));
                }
                self.note(format_args!(
                    "expect promoted={promoted:?} reaped={:?}",
                    reaped.values().map(|v| (v.0, v.1)).collect::<Vec<_>>()
                ));
                let r = self.h.orch.tick().await;
                check_outcome(&r, Outcome::Ok)?;
                let report = r.map_err(|e| e.to_string())?;
                let ours: BTreeSet<WorkItemId> = self.m.items.iter().map(|x| x.id).collect();
                let got_promoted: BTreeSet<WorkItemId> =
                    report.promoted.iter().copied().filter(|x| ours.contains(x)).collect();
                if got_promoted != ids_of(&self.m, &promoted) {
                    return Err(format!(
                        "tick promoted {:?}, model expected {promoted:?}",
                        got_promoted.iter().map(|x| self.idx_of(*x)).collect::<Vec<_>>()
                    ));
                }
                let got_reaped: Vec<&ReapedRun> =
                    report.reaped.iter().filter(|x| ours.contains(&x.work_item_id)).collect();
                let got_runs: BTreeSet<RunId> = got_reaped.iter().map(|x| x.run_id).collect();
                if got_runs != reaped.keys().copied().collect::<BTreeSet<_>>() || got_runs.len() != got_reaped.len() {
                    return Err(format!(
                        "tick reaped runs {got_runs:?}, model expected {:?}",
                        reaped.keys().collect::<Vec<_>>()
                    ));
                }
                for g in got_reaped {
                    let (i, state, retry_at) = reaped[&g.run_id];
                    // The order of reaping within one tick is not specified: a retry blocked by a dependency
                    // reaped in the same tick may be reported as `retrying` before it is blocked.
                    let state_ok = g.work_item_state == state
                        || (state == WorkItemState::Blocked
                            && g.work_item_state == WorkItemState::Retrying
                            && g.retry_at.is_some());
                    let retry_ok = g.work_item_state != state || g.retry_at == retry_at;
                    if g.work_item_id != self.m.items[i].id || !state_ok || !retry_ok {
                        return Err(format!(
                            "tick reaped the run of #{i}: state {} retry_at {:?}; model expected {state} retry_at {retry_at:?}",
                            g.work_item_state, g.retry_at
                        ));
                    }
                }
            }
            Op::Cancel { idx } => {
                if n == 0 {
                    self.note("(skipped)");
                    return Ok(());
                }
                let i = idx % n;
                let state = self.m.items[i].state;
                self.note(format_args!("#{i} ({state})"));
                let ok = state.can_transition(WorkItemState::Cancelled);
                let r = self.h.orch.cancel_work_item(self.m.items[i].id, None).await;
                check_outcome(&r, if ok { Outcome::Ok } else { Outcome::Refused })?;
                if ok {
                    if let Some(ri) = self.m.held_run_of(i) {
                        self.m.runs[ri].state = RunState::Cancelled;
                    }
                    self.m.items[i].state = WorkItemState::Cancelled;
                    self.m.items[i].run_at = None;
                    self.m.block_dependents(i);
                }
            }
            Op::RequeueItem { idx } => {
                if n == 0 {
                    self.note("(skipped)");
                    return Ok(());
                }
                let i = idx % n;
                let was = self.m.items[i].state;
                self.note(format_args!("#{i} ({was})"));
                let ok = was.is_requeueable();
                let r = self
                    .h
                    .orch
                    .requeue_work_item(self.m.items[i].id, RequeueRequest { delay_seconds: 0, backoff: false })
                    .await;
                check_outcome(&r, if ok { Outcome::Ok } else { Outcome::Refused })?;
                if ok {
                    let blocked = self.m.blocking_dep(i).is_some();
                    let it = &mut self.m.items[i];
                    it.state = if blocked { WorkItemState::Blocked } else { WorkItemState::Queued };
                    it.run_at = Some(now);
                    if was.is_finished() {
                        it.attempts = 0;
                    }
                    if blocked {
                        // A succeeded item requeued behind a dependency that will not succeed: its queued
                        // dependents are blocked with it.
                        self.m.block_dependents(i);
                    } else if was.is_finished() {
                        self.m.unblock_dependents(i, now);
                    }
                }
            }
            Op::SetPriority { idx, priority } => {
                if n == 0 {
                    self.note("(skipped)");
                    return Ok(());
                }
                let i = idx % n;
                let state = self.m.items[i].state;
                self.note(format_args!("#{i} ({state})"));
                let ok = !state.is_finished();
                let r = self
                    .h
                    .orch
                    .update_work_item(
                        self.m.items[i].id,
                        UpdateWorkItem { priority: Some(priority), ..Default::default() },
                    )
                    .await;
                check_outcome(&r, if ok { Outcome::Ok } else { Outcome::Refused })?;
                if ok {
                    self.m.items[i].priority = priority;
                }
            }
        }
        Ok(())
    }

    async fn items(&self) -> Result<Vec<WorkItem>, String> {
        let mut out: Vec<WorkItem> = Vec::new();
        loop {
            let page = Page { limit: 100, after: out.last().map(|w| w.id.0) };
            let v = self
                .h
                .store
                .work_item_list(WorkItemFilter { project_id: Some(self.project), page, ..Default::default() })
                .await
                .map_err(|e| format!("work_item_list: {e}"))?;
            let done = v.len() < 100;
            out.extend(v);
            if done {
                return Ok(out);
            }
        }
    }

    async fn runs(&self, f: RunFilter) -> Result<Vec<Run>, String> {
        let mut out: Vec<Run> = Vec::new();
        loop {
            let page = Page { limit: 1000, after: out.last().map(|r| r.id.0) };
            let v =
                self.h.store.run_list(RunFilter { page, ..f.clone() }).await.map_err(|e| format!("run_list: {e}"))?;
            let done = v.len() < 1000;
            out.extend(v);
            if done {
                return Ok(out);
            }
        }
    }

    /// Compares the project's items and active runs with the model.
    async fn compare(&self) -> Result<(), String> {
        let items = self.items().await?;
        let got_ids: Vec<WorkItemId> = items.iter().map(|w| w.id).collect();
        let want_ids: Vec<WorkItemId> = self.m.items.iter().map(|x| x.id).collect();
        if got_ids != want_ids {
            return Err(format!("project lists items {got_ids:?}, model has (in creation order) {want_ids:?}"));
        }
        for (i, (w, m)) in items.iter().zip(&self.m.items).enumerate() {
            let mut diffs = Vec::new();
            if w.state != m.state {
                diffs.push(format!("state store={} model={}", w.state, m.state));
            }
            if w.attempts != m.attempts {
                diffs.push(format!("attempts store={} model={}", w.attempts, m.attempts));
            }
            if w.priority != m.priority {
                diffs.push(format!("priority store={} model={}", w.priority, m.priority));
            }
            if matches!(m.state, WorkItemState::Queued | WorkItemState::Retrying) && w.run_at != m.run_at {
                diffs.push(format!("run_at store={:?} model={:?}", w.run_at, m.run_at));
            }
            if w.state == WorkItemState::Blocked && w.blocked_reason.is_none() {
                diffs.push("blocked without blocked_reason".to_string());
            }
            if m.state == WorkItemState::Running {
                let want = self.m.held_run_of(i).map(|r| self.m.runs[r].id);
                if w.current_run_id != want {
                    diffs.push(format!("current_run_id store={:?} model={want:?}", w.current_run_id));
                }
            }
            let want_deps: Vec<WorkItemId> = m.deps.iter().map(|d| self.m.items[*d].id).collect();
            if w.dependencies != want_deps {
                diffs.push(format!("dependencies store={:?} model={want_deps:?}", w.dependencies));
            }
            if !diffs.is_empty() {
                return Err(format!("item #{i} ({}): {}", w.id, diffs.join("; ")));
            }
        }
        let mut active = self.runs(RunFilter { state: Some(RunState::Claimed), ..Default::default() }).await?;
        active.extend(self.runs(RunFilter { state: Some(RunState::Running), ..Default::default() }).await?);
        let active: BTreeMap<RunId, Run> =
            active.into_iter().filter(|r| r.project_id == self.project).map(|r| (r.id, r)).collect();
        let held: BTreeMap<RunId, &MRun> =
            self.m.held().into_iter().map(|r| (self.m.runs[r].id, &self.m.runs[r])).collect();
        if active.keys().collect::<Vec<_>>() != held.keys().collect::<Vec<_>>() {
            let name = |id: &RunId| match self.m.runs.iter().find(|r| r.id == *id) {
                Some(r) => format!("run of #{} ({})", r.item, r.state),
                None => format!("unknown run {id}"),
            };
            return Err(format!(
                "claimed runs: store {:?}, model {:?}",
                active.keys().map(name).collect::<Vec<_>>(),
                held.keys().map(name).collect::<Vec<_>>()
            ));
        }
        for (id, r) in &active {
            let m = held[id];
            if r.lease_token != m.token
                || r.lease_expires_at != Some(m.expires)
                || r.attempt != m.attempt
                || r.work_item_id != self.m.items[m.item].id
            {
                return Err(format!(
                    "run of #{}: token={} expires={:?} attempt={}; model token={} expires={} attempt={}",
                    m.item, r.lease_token, r.lease_expires_at, r.attempt, m.token, m.expires, m.attempt
                ));
            }
        }
        Ok(())
    }

    /// Compares every run of every item of the project with the model (end of a sequence).
    async fn compare_all_runs(&self) -> Result<(), String> {
        for (i, it) in self.m.items.iter().enumerate() {
            let got = self.runs(RunFilter { work_item_id: Some(it.id), ..Default::default() }).await?;
            let got: BTreeMap<RunId, (RunState, u32)> = got.into_iter().map(|r| (r.id, (r.state, r.attempt))).collect();
            let want: BTreeMap<RunId, (RunState, u32)> =
                self.m.runs.iter().filter(|r| r.item == i).map(|r| (r.id, (r.state, r.attempt))).collect();
            if got != want {
                return Err(format!(
                    "runs of item #{i}: store {:?}, model {:?}",
                    got.values().collect::<Vec<_>>(),
                    want.values().collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }

    /// Cancels the sequence's unfinished items and deletes its project (best effort).
    async fn cleanup(&self) {
        if let Ok(items) = self.items().await {
            for w in items.iter().filter(|w| w.state.can_transition(WorkItemState::Cancelled)) {
                let _ = self.h.orch.cancel_work_item(w.id, Some("model test cleanup".into())).await;
            }
        }
        let _ = self.h.store.project_delete(self.project).await;
    }
}
