//! Conformance cases (edge): behaviours a review found at risk of differing between stores — resuming
//! after edits and requeues, exact pending-dependency counts, duplicate enqueues and idempotency keys in
//! one batch, recipe scope, project deletion, keyset pagination, unassignable claims, redacted answers
//! and writes for runs that do not exist.

use super::Harness;
use crate::agent::{AgentApi, Assignment, ClaimRequest};
use crate::clock::Clock;
use crate::crypto::{Keyring, SecretKey};
use crate::domain::*;
use crate::error::{Error, StoreError, StoreResult};
use crate::ids::*;
use crate::orchestrator::{CreateWorkItem, Orchestrator, RequeueRequest, UpdateWorkItem};
use crate::recipe::InputKind;
use crate::retry::FailureKind;
use crate::state::*;
use crate::store::*;
use chrono::Duration;
use std::future::Future;
use std::sync::Arc;
use uuid::Uuid;

// ---- helpers (private) ----

const TINY_RECIPE: &str = "name: tiny\nsteps:\n  - echo tiny\n";

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

fn create(project_id: ProjectId, title: &str) -> CreateWorkItem {
    CreateWorkItem { project_id: Some(project_id), title: title.into(), ..Default::default() }
}

fn question(key: &str) -> NewInfoRequest {
    NewInfoRequest {
        key: key.into(),
        prompt: format!("value for {key}?"),
        kind: InputKind::Text,
        choices: vec![],
        deadline: None,
    }
}

fn req(title: &str, recipe_id: Option<RecipeId>) -> RequirementSpec {
    RequirementSpec { title: title.into(), description: String::new(), labels: vec![], priority: 0, recipe_id }
}

fn lines(text: &str) -> Vec<NewLogLine> {
    vec![NewLogLine { stream: LogStream::Stdout, line: text.into() }]
}

fn steps() -> Vec<NewStepEvent> {
    vec![NewStepEvent {
        step_index: Some(0),
        kind: StepEventKind::Succeeded,
        name: "s0".into(),
        detail: serde_json::Value::Null,
    }]
}

fn item_ids(v: &[Assignment]) -> Vec<WorkItemId> {
    v.iter().map(|a| a.claimed.work_item.id).collect()
}

fn all() -> Page {
    Page { limit: Page::MAX_LIMIT, after: None }
}

async fn ask(h: &Harness, a: &Assignment, questions: Vec<NewInfoRequest>) -> Vec<InfoRequest> {
    h.orch.ask(a.run_id(), a.token(), questions).await.expect("ask")
}

async fn items_of(h: &Harness, project_id: ProjectId) -> Vec<WorkItem> {
    h.store
        .work_item_list(WorkItemFilter { project_id: Some(project_id), page: all(), ..Default::default() })
        .await
        .expect("work item list")
}

async fn runs_of(h: &Harness, id: WorkItemId) -> Vec<Run> {
    h.store.run_list(RunFilter { work_item_id: Some(id), page: all(), ..Default::default() }).await.expect("run list")
}

/// A second facade over the harness's store and clock with an adjusted configuration.
fn facade(h: &Harness, f: impl FnOnce(&mut crate::config::OrchestratorConfig)) -> Orchestrator {
    let mut config = h.orch.config().clone();
    f(&mut config);
    Orchestrator::with_clock(h.store.clone(), config, Arc::new(h.clock.clone()))
}

#[track_caller]
fn assert_invalid_field<T: std::fmt::Debug>(r: Result<T, Error>, field: &str) {
    match r {
        Err(Error::Store(StoreError::Invalid { field: f, .. })) => {
            assert!(f.contains(field), "expected an Invalid error naming `{field}`, got field `{f}`")
        }
        other => panic!("expected StoreError::Invalid naming `{field}`, got {other:?}"),
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) {
    match r {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

#[track_caller]
fn assert_missing_run<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::Store(StoreError::NotFound { .. } | StoreError::LeaseLost { .. })) => {}
        other => panic!("{what}: expected NotFound or LeaseLost, got {other:?}"),
    }
}

/// Reads every page of `limit` rows through `fetch`, following `after` with the last id of each page.
async fn walk<T, Fut>(limit: u32, mut fetch: impl FnMut(Page) -> Fut, id: impl Fn(&T) -> Uuid) -> Vec<Vec<T>>
where
    Fut: Future<Output = StoreResult<Vec<T>>>,
{
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = fetch(Page { limit, after }).await.expect("list page");
        assert!(page.len() <= limit as usize, "a page holds at most `limit` rows");
        let Some(last) = page.last() else {
            return pages;
        };
        after = Some(id(last));
        pages.push(page);
        assert!(pages.len() <= 100, "pagination does not end");
    }
}

/// Checks that pages of 2 over `expected` (all the rows, in any order) return each row once, in id order.
async fn check_pages<T, Fut>(what: &str, expected: &[Uuid], fetch: impl FnMut(Page) -> Fut, id: impl Fn(&T) -> Uuid)
where
    Fut: Future<Output = StoreResult<Vec<T>>>,
{
    let pages = walk(2, fetch, &id).await;
    let sizes: Vec<usize> = pages.iter().map(|p| p.len()).collect();
    assert_eq!(sizes, vec![2, 2, 1], "{what}: page sizes");
    let seen: Vec<Uuid> = pages.iter().flatten().map(&id).collect();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(seen, want, "{what}: every row exactly once, in id order");
}

// ---- resume after edits and requeues ----

/// A run waiting for input resumes even when its item was edited (priority, while waiting and again once
/// queued) and requeued with no delay after all questions were answered: the next claim is `resumed`,
/// reuses the run (token + 1, attempt unchanged), carries the new priority and delivers the answers.
pub async fn edge_resume_survives_priority_edit_and_requeue(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "asks twice", 0, &[]).await;
    let a = h.claim_one("agent-1").await;
    assert_eq!((a.claimed.run.attempt, a.token()), (1, 1));
    let qs = ask(&h, &a, vec![question("NAME"), question("COLOR")]).await;

    // A priority edit is allowed while waiting and changes nothing else.
    let ch = h.orch.update_work_item(w.id, UpdateWorkItem { priority: Some(5), ..Default::default() }).await.unwrap();
    assert_eq!(ch.work_item.state, WorkItemState::WaitingInput);
    assert_eq!(ch.work_item.priority, 5);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::WaitingInput);

    h.clock.advance(secs(2));
    assert!(!h.orch.answer_info_request(qs[0].id, "alice", "human").await.unwrap().resumed);
    assert!(h.orch.answer_info_request(qs[1].id, "blue", "human").await.unwrap().resumed);
    assert_eq!(h.state_of(w.id).await, WorkItemState::Queued);

    // Edit again while queued, then requeue without delay: still the same waiting run.
    let ch = h.orch.update_work_item(w.id, UpdateWorkItem { priority: Some(7), ..Default::default() }).await.unwrap();
    assert_eq!(ch.work_item.state, WorkItemState::Queued);
    h.clock.advance(secs(1));
    let rq = h.orch.requeue_work_item(w.id, RequeueRequest::default()).await.unwrap();
    assert_eq!(rq.state, WorkItemState::Queued);
    assert_eq!(rq.attempts, 1, "requeueing an unfinished item keeps its attempts");
    assert_eq!(rq.run_at, Some(h.clock.now()));
    assert_eq!(rq.current_run_id, Some(a.run_id()));
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::WaitingInput);

    let b = h.claim_one("agent-2").await;
    assert!(b.claimed.resumed, "the waiting run must be resumed");
    assert_eq!(b.run_id(), a.run_id());
    assert_eq!(b.token(), a.token() + 1);
    assert_eq!(b.claimed.run.attempt, 1);
    assert_eq!(b.claimed.run.state, RunState::Claimed);
    assert_eq!(b.claimed.run.agent_id, "agent-2");
    assert_eq!(b.claimed.work_item.attempts, 1);
    assert_eq!(b.claimed.work_item.priority, 7);
    assert_eq!(b.claimed.work_item.state, WorkItemState::Running);
    assert_eq!(b.answers.len(), 2);
    assert_eq!(b.answers["NAME"].value, "alice");
    assert_eq!(b.answers["COLOR"].value, "blue");
    assert_eq!(runs_of(&h, w.id).await.len(), 1);
    let stored = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!((stored.attempts, stored.current_run_id), (1, Some(a.run_id())));
    assert_eq!(h.succeed(&b).await.work_item_state, WorkItemState::Succeeded);
}

/// `run_requeue` of a run waiting for input cancels it: whether its questions were all answered (item
/// already queued) or not (pending questions cancelled), the next claim is a fresh run — not resumed,
/// a new run id, token 1, attempt + 1, no answers.
pub async fn edge_run_requeue_of_waiting_run_starts_fresh(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "asks", 0, &[]).await;
    let a = h.claim_one("agent-1").await;
    let qs = ask(&h, &a, vec![question("NAME")]).await;
    assert!(h.orch.answer_info_request(qs[0].id, "alice", "human").await.unwrap().resumed);
    assert_eq!(h.state_of(w.id).await, WorkItemState::Queued);

    // Answered and queued, but the run is requeued: it is cancelled and will not be resumed.
    h.clock.advance(secs(1));
    let rq = h.orch.requeue_run(a.run_id(), RequeueRequest::default()).await.unwrap();
    assert_eq!(rq.state, WorkItemState::Queued);
    assert_eq!(rq.attempts, 1);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Cancelled);
    assert_eq!(h.store.info_request_get(qs[0].id).await.unwrap().state, InfoRequestState::Answered);
    let b = h.claim_one("agent-2").await;
    assert!(!b.claimed.resumed);
    assert_ne!(b.run_id(), a.run_id());
    assert_eq!(b.token(), 1);
    assert_eq!(b.claimed.run.attempt, 2);
    assert_eq!(b.claimed.work_item.attempts, 2);
    assert!(b.answers.is_empty());

    // Still waiting (question unanswered): the question is cancelled with the run.
    let qs = ask(&h, &b, vec![question("COLOR")]).await;
    h.clock.advance(secs(1));
    let rq = h.orch.requeue_run(b.run_id(), RequeueRequest::default()).await.unwrap();
    assert_eq!(rq.state, WorkItemState::Queued);
    assert_eq!(h.store.run_get(b.run_id()).await.unwrap().state, RunState::Cancelled);
    assert_eq!(h.store.info_request_get(qs[0].id).await.unwrap().state, InfoRequestState::Cancelled);
    let c = h.claim_one("agent-3").await;
    assert!(!c.claimed.resumed);
    assert!(c.run_id() != a.run_id() && c.run_id() != b.run_id());
    assert_eq!((c.token(), c.claimed.run.attempt, c.claimed.work_item.attempts), (1, 3, 3));
    assert!(c.answers.is_empty());
    assert_eq!(runs_of(&h, w.id).await.len(), 3);
}

// ---- pending dependency counts ----

/// Pending-dependency counts stay exact when a succeeded dependency is requeued under a running
/// dependent: the dependent keeps running, and when it then fails retryably it is `retrying` but not
/// claimable (even past its retry time, even once promoted by a tick) until the dependency succeeds again.
pub async fn edge_pending_deps_exact_after_dependency_requeue(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "A", 0, &[]).await;
    let b = h.queued(p.id, "B", 0, &[a.id]).await;
    let ca = h.claim_one("agent").await;
    assert_eq!(ca.claimed.work_item.id, a.id);
    assert_eq!(h.succeed(&ca).await.released, vec![b.id]);
    let cb = h.claim_one("agent").await;
    assert_eq!(cb.claimed.work_item.id, b.id);

    // Requeue A: B is not touched while it runs, but it now waits for A again.
    h.clock.advance(secs(1));
    let ra = h.orch.requeue_work_item(a.id, RequeueRequest::default()).await.unwrap();
    assert_eq!((ra.state, ra.attempts), (WorkItemState::Queued, 0));
    assert_eq!(h.state_of(b.id).await, WorkItemState::Running);
    h.orch.heartbeat(cb.run_id(), cb.token()).await.unwrap();
    assert_eq!(h.store.scheduled_task_get(b.id).await.unwrap().pending_dependencies, 1);

    // B fails (retryable): retrying, but held back by A.
    let f = h.fail(&cb).await;
    assert_eq!(f.work_item_state, WorkItemState::Retrying);
    assert_eq!(f.retry_at, Some(h.clock.now() + secs(10)));
    let t = h.store.scheduled_task_get(b.id).await.unwrap();
    assert_eq!((t.state, t.pending_dependencies), (WorkItemState::Retrying, 1));

    h.clock.advance(secs(11));
    let v = h.claim("agent", 5).await;
    assert_eq!(item_ids(&v), vec![a.id], "B must wait for A");
    // Promoted by a tick, B is queued and still waits.
    let rep = h.orch.tick().await.unwrap();
    assert_eq!(rep.promoted, vec![b.id]);
    assert_eq!(h.state_of(b.id).await, WorkItemState::Queued);
    assert!(h.claim("agent", 5).await.is_empty());
    assert_eq!(h.store.scheduled_task_get(b.id).await.unwrap().pending_dependencies, 1);

    assert_eq!(h.succeed(&v[0]).await.released, vec![b.id]);
    assert_eq!(h.store.scheduled_task_get(b.id).await.unwrap().pending_dependencies, 0);
    let cb2 = h.claim_one("agent").await;
    assert_eq!(cb2.claimed.work_item.id, b.id);
    assert!(!cb2.claimed.resumed);
    assert_eq!(cb2.claimed.run.attempt, 2);
    assert_eq!(h.succeed(&cb2).await.work_item_state, WorkItemState::Succeeded);
}

/// The same holds for a dependent waiting for input when its succeeded dependency is requeued: once its
/// questions are answered it is `queued` (and resumes later) but is not claimable until the dependency
/// succeeds again; a dependent that already succeeded is left alone.
pub async fn edge_pending_deps_exact_for_waiting_dependent(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "A", 0, &[]).await;
    let b = h.queued(p.id, "B", 0, &[a.id]).await;
    let done = h.queued(p.id, "done", 0, &[a.id]).await;
    let ca = h.claim_one("agent").await;
    assert_eq!(ca.claimed.work_item.id, a.id);
    assert_eq!(h.succeed(&ca).await.released, vec![b.id, done.id]);
    let v = h.claim("agent", 2).await;
    assert_eq!(item_ids(&v), vec![b.id, done.id]);
    h.succeed(&v[1]).await;
    let qs = ask(&h, &v[0], vec![question("NAME")]).await;

    h.clock.advance(secs(1));
    h.orch.requeue_work_item(a.id, RequeueRequest { delay_seconds: 60, backoff: false }).await.unwrap();
    assert_eq!(h.state_of(done.id).await, WorkItemState::Succeeded);
    assert_eq!(h.state_of(b.id).await, WorkItemState::WaitingInput);
    assert!(h.orch.answer_info_request(qs[0].id, "alice", "human").await.unwrap().resumed);
    let t = h.store.scheduled_task_get(b.id).await.unwrap();
    assert_eq!((t.state, t.pending_dependencies), (WorkItemState::Queued, 1));
    assert!(h.claim("agent", 5).await.is_empty(), "B waits for A, and A is not due yet");

    h.clock.advance(secs(60));
    let v = h.claim("agent", 5).await;
    assert_eq!(item_ids(&v), vec![a.id]);
    assert_eq!(h.succeed(&v[0]).await.released, vec![b.id]);
    assert_eq!(h.state_of(done.id).await, WorkItemState::Succeeded);
    let cb = h.claim_one("agent").await;
    assert_eq!(cb.claimed.work_item.id, b.id);
    assert!(cb.claimed.resumed);
    assert_eq!(cb.answers["NAME"].value, "alice");
}

// ---- duplicate entries in one batch ----

/// An `enqueue_many` batch naming the same work item twice is `Invalid` and changes nothing: every item
/// of the batch stays `ready` with no dependency, priority or run time recorded; enqueued once, it works.
pub async fn edge_enqueue_many_same_item_twice_is_invalid(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let dep = h.item(p.id, "dep").await;
    let x = h.item(p.id, "x").await;
    let y = h.item(p.id, "y").await;
    let with_dep = EnqueueOptions { priority: Some(9), depends_on: vec![dep.id], not_before: None };
    let batches = vec![
        vec![Enqueue { work_item_id: x.id, options: EnqueueOptions::default() }; 2],
        vec![
            Enqueue { work_item_id: x.id, options: with_dep.clone() },
            Enqueue { work_item_id: y.id, options: EnqueueOptions::default() },
            Enqueue { work_item_id: x.id, options: EnqueueOptions::default() },
        ],
    ];
    for batch in batches {
        let e = h.orch.enqueue_many(batch.clone()).await.unwrap_err();
        assert!(matches!(e, Error::Store(StoreError::Invalid { .. })), "{e:?}");
        let e = h.store.enqueue_many(batch, h.clock.now()).await.unwrap_err();
        assert!(matches!(e, StoreError::Invalid { .. }), "{e:?}");
    }
    for w in [&dep, &x, &y] {
        let stored = h.store.work_item_get(w.id).await.unwrap();
        assert_eq!(&stored, w, "nothing changed");
        let t = h.store.scheduled_task_get(w.id).await.unwrap();
        assert_eq!((t.state, t.pending_dependencies, t.run_at), (WorkItemState::Ready, 0, None));
        assert!(t.dependencies.is_empty());
    }
    // No dependency edge was left behind: x enqueued alone is claimable at once.
    let t = h.orch.enqueue(x.id, EnqueueOptions::default()).await.unwrap();
    assert_eq!((t.state, t.pending_dependencies, t.priority), (WorkItemState::Queued, 0, 0));
    assert!(t.dependencies.is_empty());
    assert_eq!(h.claim_one("agent").await.claimed.work_item.id, x.id);
    assert_eq!(h.state_of(y.id).await, WorkItemState::Ready);
}

/// An idempotency key used twice in one creation batch: when an item with that key and the same content
/// already exists, both entries return it (`created == false`, no approval); when it does not exist
/// yet, or one entry's content differs, the batch is `Duplicate` and nothing of it is created.
pub async fn edge_idempotency_key_twice_in_one_batch(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let same =
        CreateWorkItem { idempotency_key: Some("key-1".into()), description: "d".into(), ..create(p.id, "same") };
    let first = h.orch.create_work_item(same.clone()).await.unwrap();
    assert!(first.created);

    let out = h.orch.create_work_items(vec![same.clone(), same.clone()]).await.unwrap();
    assert_eq!(out.len(), 2);
    for o in &out {
        assert!(!o.created);
        assert!(o.approval.is_none());
        assert_eq!(o.work_item, first.work_item);
    }
    assert_eq!(items_of(&h, p.id).await.len(), 1);

    // A new key twice in one batch: Duplicate, and the other entries are not created either.
    let fresh = CreateWorkItem { idempotency_key: Some("key-2".into()), ..create(p.id, "fresh") };
    let e = h.orch.create_work_items(vec![create(p.id, "bystander"), fresh.clone(), fresh.clone()]).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Duplicate { .. })), "{e:?}");
    assert_eq!(items_of(&h, p.id).await.len(), 1);

    // The existing key twice, once with other content: Duplicate, nothing created.
    let changed = CreateWorkItem { description: "other".into(), ..same.clone() };
    let e = h.orch.create_work_items(vec![same.clone(), changed, create(p.id, "bystander")]).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Duplicate { .. })), "{e:?}");
    let items = items_of(&h, p.id).await;
    assert_eq!(items, vec![first.work_item.clone()]);

    // The refused key is still free.
    let made = h.orch.create_work_item(fresh.clone()).await.unwrap();
    assert!(made.created);
    assert!(!h.orch.create_work_item(fresh).await.unwrap().created);
    assert_eq!(items_of(&h, p.id).await.len(), 2);
}

/// A large creation batch (stores may stream or chunk it) is all or nothing: a duplicate idempotency key
/// near its end stores none of it; a valid one stores every item, returned in request order.
pub async fn edge_large_creation_batch_is_atomic(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let n = 700;
    let batch = |tag: &str| -> Vec<CreateWorkItem> {
        (0..n)
            .map(|i| CreateWorkItem { enqueue: Some(EnqueueOptions::default()), ..create(p.id, &format!("{tag} {i}")) })
            .collect()
    };
    let mut bad = batch("bad");
    bad[n - 50].idempotency_key = Some("twice".into());
    bad[n - 10].idempotency_key = Some("twice".into());
    let e = h.orch.create_work_items(bad).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Duplicate { .. })), "{e:?}");
    assert!(items_of(&h, p.id).await.is_empty(), "a refused batch stored some of its items");

    let good = batch("good");
    let out = h.orch.create_work_items(good).await.unwrap();
    assert_eq!(out.len(), n);
    for (i, o) in out.iter().enumerate() {
        assert!(o.created);
        assert_eq!(o.work_item.title, format!("good {i}"));
        assert_eq!(o.work_item.state, WorkItemState::Queued);
    }
    assert_eq!(items_of(&h, p.id).await.len(), n);
    let stats = h.store.stats().await.unwrap();
    assert_eq!(stats.work_items.get("queued"), Some(&(n as u64)));
}

// ---- recipe scope ----

/// A recipe created for project P cannot be used by project Q (creating, attaching or proposing a
/// requirement: `Invalid` naming `recipe_id`, nothing changed); a recipe without a project can be used
/// by any project, and is delivered with the claim.
pub async fn edge_recipe_scope_by_project(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.orch.create_project("p", "").await.unwrap();
    let q = h.orch.create_project("q", "").await.unwrap();
    let rp = h.orch.create_recipe(Some(p.id), TINY_RECIPE).await.unwrap();
    let global = h.orch.create_recipe(None, "name: global\nsteps:\n  - echo global\n").await.unwrap();

    // Foreign recipe refused at creation (alone or in a batch), by attach and in a draft.
    let foreign = CreateWorkItem { recipe_id: Some(rp.id), ..create(q.id, "foreign") };
    assert_invalid_field(h.orch.create_work_item(foreign.clone()).await, "recipe_id");
    assert_invalid_field(h.orch.create_work_items(vec![create(q.id, "ok"), foreign]).await, "recipe_id");
    assert!(items_of(&h, q.id).await.is_empty());
    let wq = h.item(q.id, "wq").await;
    assert_invalid_field(h.orch.attach_recipe(wq.id, rp.id).await, "recipe_id");
    assert_eq!(h.store.work_item_get(wq.id).await.unwrap(), wq);
    assert_invalid_field(
        h.orch.propose_requirements(q.id, "plan", vec![req("r", Some(rp.id))], None).await,
        "recipe_id",
    );
    assert!(h.store.draft_list(q.id, Page::default()).await.unwrap().is_empty());

    // Its own project may use it.
    let wp = h
        .orch
        .create_work_item(CreateWorkItem { recipe_id: Some(rp.id), ..create(p.id, "own") })
        .await
        .unwrap()
        .work_item;
    assert_eq!(wp.recipe_id, Some(rp.id));

    // A recipe without a project works everywhere.
    let ch = h.orch.attach_recipe(wq.id, global.id).await.unwrap();
    assert_eq!(ch.work_item.recipe_id, Some(global.id));
    for pid in [p.id, q.id] {
        let w = h
            .orch
            .create_work_item(CreateWorkItem { recipe_id: Some(global.id), ..create(pid, "global") })
            .await
            .unwrap()
            .work_item;
        assert_eq!(w.recipe_id, Some(global.id));
        h.orch.propose_requirements(pid, "plan", vec![req("r", Some(global.id))], None).await.unwrap();
    }
    h.orch.enqueue(wq.id, EnqueueOptions::default()).await.unwrap();
    let a = h.claim_one("agent").await;
    assert_eq!(a.claimed.work_item.id, wq.id);
    assert_eq!(a.recipe.as_ref(), Some(&global.spec));
}

// ---- project deletion ----

/// Everything one project holds, for checking a deletion.
struct Footprint {
    project: Project,
    items: Vec<WorkItemId>,
    runs: Vec<RunId>,
    infos: Vec<InfoRequestId>,
    drafts: Vec<DraftId>,
    approvals: Vec<ApprovalId>,
    recipe: RecipeId,
    active: Vec<WorkItemId>,
    running: Assignment,
}

/// A project with visions, a recipe, drafts (pending and approved), an item awaiting approval, a
/// succeeded run with logs and step events, a run waiting for input, a running run and a queued item
/// not due before tomorrow.
async fn populate(h: &Harness, strict: &Orchestrator, name: &str) -> Footprint {
    let project = h.orch.create_project(name, "").await.unwrap();
    let pid = project.id;
    h.orch.put_vision(pid, "first", None).await.unwrap();
    h.orch.put_vision(pid, "second", None).await.unwrap();
    let recipe = h.orch.create_recipe(Some(pid), TINY_RECIPE).await.unwrap().id;
    let (d1, a1) = strict.propose_requirements(pid, "pending plan", vec![req("r1", Some(recipe))], None).await.unwrap();
    let (d2, _) = h.orch.propose_requirements(pid, "approved plan", vec![req("r2", None)], None).await.unwrap();
    let made = h.orch.decide_draft(d2.id, Decision::Approve, "lead", None).await.unwrap().work_items;
    let awaiting = strict.create_work_item(create(pid, "awaiting")).await.unwrap();

    let done = h
        .orch
        .create_work_item(CreateWorkItem {
            recipe_id: Some(recipe),
            enqueue: Some(EnqueueOptions::default()),
            ..create(pid, "done")
        })
        .await
        .unwrap()
        .work_item;
    let a = h.claim_one("agent").await;
    assert_eq!(a.claimed.work_item.id, done.id);
    h.orch.append_logs(a.run_id(), a.token(), lines("built")).await.unwrap();
    h.orch.record_steps(a.run_id(), a.token(), steps()).await.unwrap();
    h.succeed(&a).await;

    let asking = h.queued(pid, "asking", 0, &[]).await;
    let b = h.claim_one("agent").await;
    assert_eq!(b.claimed.work_item.id, asking.id);
    h.orch.append_logs(b.run_id(), b.token(), lines("asking")).await.unwrap();
    let qs = ask(h, &b, vec![question("NAME")]).await;

    let running = h.queued(pid, "running", 0, &[]).await;
    let c = h.claim_one("agent").await;
    assert_eq!(c.claimed.work_item.id, running.id);
    h.orch.append_logs(c.run_id(), c.token(), lines("running")).await.unwrap();

    let tomorrow = h.clock.now() + Duration::days(1);
    let later = h
        .orch
        .create_work_item(CreateWorkItem {
            enqueue: Some(EnqueueOptions { priority: None, depends_on: vec![done.id], not_before: Some(tomorrow) }),
            ..create(pid, "later")
        })
        .await
        .unwrap()
        .work_item;
    assert_eq!(later.state, WorkItemState::Queued);

    let mut items: Vec<WorkItemId> = made.iter().map(|w| w.id).collect();
    items.extend([awaiting.work_item.id, done.id, asking.id, running.id, later.id]);
    Footprint {
        project,
        items,
        runs: vec![a.run_id(), b.run_id(), c.run_id()],
        infos: qs.iter().map(|q| q.id).collect(),
        drafts: vec![d1.id, d2.id],
        approvals: vec![a1.expect("draft approval").id, awaiting.approval.expect("item approval").id],
        recipe,
        active: vec![asking.id, running.id, later.id],
        running: c,
    }
}

/// What the store holds for a project, read through the contract.
#[derive(Debug, PartialEq)]
struct Snapshot {
    project: Project,
    visions: Vec<Vision>,
    drafts: Vec<RequirementsDraft>,
    approvals: Vec<ApprovalRequest>,
    recipe: ToolRecipe,
    items: Vec<WorkItem>,
    runs: Vec<Run>,
    logs: Vec<Vec<LogEntry>>,
    events: Vec<Vec<StepEvent>>,
    infos: Vec<InfoRequest>,
}

async fn snapshot(h: &Harness, f: &Footprint) -> Snapshot {
    let pid = f.project.id;
    let items = items_of(h, pid).await;
    let mut runs = Vec::new();
    for w in &items {
        runs.extend(runs_of(h, w.id).await);
    }
    let mut logs = Vec::new();
    let mut events = Vec::new();
    for r in &runs {
        logs.push(h.store.logs_read_after(r.id, 0, 1000).await.unwrap());
        events.push(h.store.step_events_read_after(r.id, 0, 1000).await.unwrap());
    }
    Snapshot {
        project: h.store.project_get(pid).await.unwrap(),
        visions: h.store.vision_list(pid).await.unwrap(),
        drafts: h.store.draft_list(pid, all()).await.unwrap(),
        approvals: h
            .store
            .approval_list(ApprovalFilter { project_id: Some(pid), page: all(), ..Default::default() })
            .await
            .unwrap(),
        recipe: h.store.recipe_get(f.recipe).await.unwrap(),
        items,
        runs,
        logs,
        events,
        infos: h
            .store
            .info_request_list(InfoRequestFilter { project_id: Some(pid), page: all(), ..Default::default() })
            .await
            .unwrap(),
    }
}

/// Deleting a project (after cancelling its active work) removes its work items, runs (`run_get`
/// NotFound), logs and step events (reads NotFound), info requests, visions, drafts, approvals and
/// recipes; another project's data and a recipe without project are untouched, and counts agree.
pub async fn edge_project_delete_cascades(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let strict = facade(&h, |c| c.require_approval = true);
    let global = h.orch.create_recipe(None, TINY_RECIPE).await.unwrap();
    let fp = populate(&h, &strict, "doomed").await;
    let fq = populate(&h, &strict, "kept").await;
    let pid = fp.project.id;

    assert!(matches!(h.store.project_delete(pid).await, Err(StoreError::Conflict { .. })));
    for id in &fp.active {
        h.orch.cancel_work_item(*id, None).await.unwrap();
    }
    let before_q = snapshot(&h, &fq).await;
    let snap_p = snapshot(&h, &fp).await;
    assert_eq!(snap_p.items.len(), fp.items.len());
    assert_eq!(snap_p.runs.len(), 3);
    assert!(snap_p.logs.iter().any(|l| !l.is_empty()) && snap_p.events.iter().any(|e| !e.is_empty()));

    h.store.project_delete(pid).await.unwrap();

    assert_not_found(h.store.project_get(pid).await, "project_get");
    assert_not_found(h.store.project_delete(pid).await, "project_delete");
    assert_not_found(h.store.vision_get(pid, None).await, "vision_get");
    assert_not_found(h.store.vision_list(pid).await, "vision_list");
    assert_not_found(h.store.draft_list(pid, Page::default()).await, "draft_list");
    for id in &fp.items {
        assert_not_found(h.store.work_item_get(*id).await, "work_item_get");
        assert_not_found(h.store.scheduled_task_get(*id).await, "scheduled_task_get");
        assert!(runs_of(&h, *id).await.is_empty());
    }
    for id in &fp.runs {
        assert_not_found(h.store.run_get(*id).await, "run_get");
        assert_not_found(h.store.logs_read_after(*id, 0, 100).await, "logs_read_after");
        assert_not_found(h.store.step_events_read_after(*id, 0, 100).await, "step_events_read_after");
        assert!(h
            .store
            .info_request_list(InfoRequestFilter { run_id: Some(*id), ..Default::default() })
            .await
            .unwrap()
            .is_empty());
    }
    for id in &fp.infos {
        assert_not_found(h.store.info_request_get(*id).await, "info_request_get");
    }
    for id in &fp.drafts {
        assert_not_found(h.store.draft_get(*id).await, "draft_get");
    }
    for id in &fp.approvals {
        assert_not_found(h.store.approval_get(*id).await, "approval_get");
    }
    assert_not_found(h.store.recipe_get(fp.recipe).await, "recipe_get");
    assert!(items_of(&h, pid).await.is_empty());
    let approvals_of = |project_id| ApprovalFilter { project_id: Some(project_id), page: all(), ..Default::default() };
    assert!(h.store.approval_list(approvals_of(pid)).await.unwrap().is_empty());
    assert!(h
        .store
        .info_request_list(InfoRequestFilter { project_id: Some(pid), page: all(), ..Default::default() })
        .await
        .unwrap()
        .is_empty());

    // The other project and the global recipe are untouched; the counts only see what is left.
    let after_q = snapshot(&h, &fq).await;
    assert_eq!(after_q, before_q);
    let recipes: Vec<RecipeId> = h.store.recipe_list(all()).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(recipes, vec![global.id, fq.recipe]);
    let projects: Vec<ProjectId> = h.store.project_list(all()).await.unwrap().iter().map(|p| p.id).collect();
    assert_eq!(projects, vec![fq.project.id]);
    let all_runs = h.store.run_list(RunFilter { page: all(), ..Default::default() }).await.unwrap();
    let mut kept_runs = after_q.runs.clone();
    kept_runs.sort_by_key(|r| r.id);
    assert_eq!(all_runs, kept_runs);
    let st = h.store.stats().await.unwrap();
    assert_eq!(st.work_items.values().sum::<u64>(), after_q.items.len() as u64);
    assert_eq!(st.runs.values().sum::<u64>(), after_q.runs.len() as u64);
    let pending_infos = after_q.infos.iter().filter(|r| r.state == InfoRequestState::Pending).count() as u64;
    assert_eq!(st.pending_info_requests, pending_infos);
    let pending_approvals = after_q.approvals.iter().filter(|a| a.state == ApprovalState::Pending).count() as u64;
    assert_eq!(st.pending_approvals, pending_approvals);
    assert_eq!((pending_infos, pending_approvals), (1, 2));

    // The other project keeps working.
    assert_eq!(h.succeed(&fq.running).await.work_item_state, WorkItemState::Succeeded);
}

// ---- pagination ----

/// Keyset pagination with `after`: pages of 2 over 5 rows return every row exactly once, in id order,
/// for `work_item_list`, `run_list`, `approval_list`, `info_request_list` and `recipe_list`.
pub async fn edge_pagination_after_visits_every_row_once(store: Arc<dyn Store>) {
    let h = Harness::with_config(store, |c| c.require_approval = true);
    let p = h.project().await;
    let mut recipes = Vec::new();
    let mut items = Vec::new();
    let mut approvals = Vec::new();
    for i in 0..5 {
        let yaml = format!("name: recipe-{i}\nsteps:\n  - echo {i}\n");
        recipes.push(h.orch.create_recipe(Some(p.id), &yaml).await.unwrap().id.0);
        let c = h.orch.create_work_item(create(p.id, &format!("item {i}"))).await.unwrap();
        let a = c.approval.expect("approval requested");
        approvals.push(a.id.0);
        h.orch.decide_approval(a.id, Decision::Approve, "lead", None).await.unwrap();
        h.orch.enqueue(c.work_item.id, EnqueueOptions::default()).await.unwrap();
        items.push(c.work_item.id.0);
    }
    let claimed = h.claim("agent", 5).await;
    assert_eq!(claimed.len(), 5);
    let runs: Vec<Uuid> = claimed.iter().map(|a| a.run_id().0).collect();
    let mut infos = Vec::new();
    for a in &claimed {
        infos.extend(ask(&h, a, vec![question("K")]).await.iter().map(|q| q.id.0));
    }

    let store = &h.store;
    check_pages(
        "work_item_list",
        &items,
        move |page| store.work_item_list(WorkItemFilter { project_id: Some(p.id), page, ..Default::default() }),
        |w: &WorkItem| w.id.0,
    )
    .await;
    check_pages(
        "run_list",
        &runs,
        move |page| store.run_list(RunFilter { page, ..Default::default() }),
        |r: &Run| r.id.0,
    )
    .await;
    check_pages(
        "approval_list",
        &approvals,
        move |page| store.approval_list(ApprovalFilter { project_id: Some(p.id), page, ..Default::default() }),
        |a: &ApprovalRequest| a.id.0,
    )
    .await;
    check_pages(
        "info_request_list",
        &infos,
        move |page| store.info_request_list(InfoRequestFilter { project_id: Some(p.id), page, ..Default::default() }),
        |r: &InfoRequest| r.id.0,
    )
    .await;
    check_pages("recipe_list", &recipes, move |page| store.recipe_list(page), |r: &ToolRecipe| r.id.0).await;
}

// ---- unassignable claims ----

/// A claimed run the facade cannot hand out (here: a resumed run whose answer was sealed under a key
/// this facade's keyring cannot open) is failed permanently instead: the claim returns the other
/// claimable work only, the run and its item end `failed`, its dependents are blocked, and it is not
/// offered again.
pub async fn edge_unassignable_claim_fails_run_permanently(store: Arc<dyn Store>) {
    let h = Harness::with_config(store, |c| {
        c.keyring = Some(Keyring::new("k1", SecretKey::generate()).expect("keyring"));
    });
    let p = h.project().await;
    let w = h.queued(p.id, "asks", 0, &[]).await;
    let a = h.claim_one("agent-1").await;
    let qs = ask(&h, &a, vec![question("NAME")]).await;
    let dependent = h.queued(p.id, "dependent", 0, &[w.id]).await;
    h.clock.advance(secs(1));
    assert!(h.orch.answer_info_request(qs[0].id, "sealed-answer", "human").await.unwrap().resumed);
    h.clock.advance(secs(1));
    let other = h.queued(p.id, "other", 0, &[]).await;

    // Same key id, another key: the stored answer cannot be decrypted by this facade.
    let wrong = facade(&h, |c| c.keyring = Some(Keyring::new("k1", SecretKey::generate()).expect("keyring")));
    let req = || ClaimRequest { agent_id: "agent-2".into(), capabilities: vec![], max: 5, lease_ttl_seconds: None };
    let got = wrong.claim(req()).await.unwrap();
    assert_eq!(item_ids(&got), vec![other.id], "only the assignable run is handed out");
    assert_eq!(h.succeed(&got[0]).await.work_item_state, WorkItemState::Succeeded);

    let run = h.store.run_get(a.run_id()).await.unwrap();
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.failure_kind, Some(FailureKind::Permanent));
    assert!(run.error.is_some());
    assert_eq!(run.lease_token, a.token() + 1, "it was claimed (resumed) before it failed");
    let item = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(item.state, WorkItemState::Failed);
    assert!(item.last_error.is_some());
    assert_eq!(h.state_of(dependent.id).await, WorkItemState::Blocked);
    assert_eq!(runs_of(&h, w.id).await.len(), 1);

    // Not offered again, to anyone.
    h.clock.advance(secs(60));
    h.orch.tick().await.unwrap();
    assert!(wrong.claim(req()).await.unwrap().is_empty());
    assert!(h.claim("agent-1", 5).await.is_empty());
    assert_eq!(h.state_of(w.id).await, WorkItemState::Failed);
}

// ---- redaction ----

/// `SealedValue`'s Debug output never shows the answer bytes: an answer stored plain (no keyring) does
/// not appear, as text or as a byte list, in the Debug of the `InfoRequest` holding it.
pub async fn edge_sealed_value_debug_redacts_plain_answer(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    h.queued(p.id, "asks", 0, &[]).await;
    let a = h.claim_one("agent").await;
    let qs = ask(&h, &a, vec![question("NOTE")]).await;
    let plaintext = "plain-answer-7f3c9e";
    let answered = h.orch.answer_info_request(qs[0].id, plaintext, "human").await.unwrap();
    let stored = h.store.info_request_get(qs[0].id).await.unwrap();
    let sealed = stored.answer.clone().expect("stored answer");
    assert!(!sealed.is_encrypted());
    assert_eq!(sealed.ciphertext, plaintext.as_bytes(), "stored plain, so only the Debug output hides it");
    assert_eq!(h.orch.reveal_answer(&stored).unwrap().as_deref(), Some(plaintext));

    let bytes = format!("{:?}", plaintext.as_bytes());
    let byte_list = bytes.trim_start_matches('[').trim_end_matches(']');
    let listed = h.store.info_request_list(InfoRequestFilter::default()).await.unwrap();
    for shown in [
        format!("{stored:?}"),
        format!("{stored:#?}"),
        format!("{sealed:?}"),
        format!("{answered:?}"),
        format!("{listed:?}"),
    ] {
        assert!(!shown.contains(plaintext), "plaintext in Debug output: {shown}");
        assert!(!shown.contains(byte_list), "answer bytes in Debug output: {shown}");
        assert!(!shown.contains(&sealed.encode()), "encoded answer in Debug output: {shown}");
    }
}

// ---- writes for unknown runs ----

/// Agent writes naming a run id that does not exist are refused with `NotFound` or `LeaseLost`, whatever
/// the token, and write nothing: counts, the existing run, logs and info requests are unchanged.
pub async fn edge_writes_for_unknown_run_write_nothing(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "real", 0, &[]).await;
    let a = h.claim_one("agent").await;
    let before = h.store.stats().await.unwrap();
    let now = h.clock.now();
    // A fresh id, and the id of an existing work item used as a run id.
    for ghost in [RunId::new(), RunId(w.id.0)] {
        for token in [0, 1, a.token(), u64::MAX] {
            assert_missing_run(h.orch.heartbeat(ghost, token).await, "heartbeat");
            assert_missing_run(h.orch.start(ghost, token).await, "start");
            assert_missing_run(h.orch.append_logs(ghost, token, lines("ghost")).await, "append_logs");
            assert_missing_run(h.orch.record_steps(ghost, token, steps()).await, "record_steps");
            assert_missing_run(h.orch.ask(ghost, token, vec![question("Q")]).await, "ask");
            let done = RunOutcome::Succeeded { exit_code: Some(0) };
            assert_missing_run(h.orch.complete(ghost, token, done, None).await, "complete");
            let failed = RunOutcome::Failed { error: "x".into(), exit_code: None, kind: FailureKind::Permanent };
            assert_missing_run(h.orch.complete(ghost, token, failed, None).await, "complete failed");
            let renew = LeaseRenew { run_id: ghost, token, ttl: Some(secs(600)), now };
            assert_missing_run(h.store.lease_renew(renew).await.map_err(Error::from), "lease_renew");
            assert_missing_run(
                h.store.info_answers_for_run(ghost, token, now).await.map_err(Error::from),
                "info_answers_for_run",
            );
        }
        assert_not_found(h.store.run_get(ghost).await, "run_get");
        assert_not_found(h.store.logs_read_after(ghost, 0, 100).await, "logs_read_after");
        assert_not_found(h.store.step_events_read_after(ghost, 0, 100).await, "step_events_read_after");
    }
    assert_eq!(h.store.stats().await.unwrap(), before);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap(), a.claimed.run);
    assert_eq!(h.store.work_item_get(w.id).await.unwrap(), a.claimed.work_item);
    assert!(h.store.logs_read_after(a.run_id(), 0, 100).await.unwrap().is_empty());
    assert!(h.store.step_events_read_after(a.run_id(), 0, 100).await.unwrap().is_empty());
    assert!(h.store.info_request_list(InfoRequestFilter::default()).await.unwrap().is_empty());
    assert_eq!(h.store.run_list(RunFilter::default()).await.unwrap(), vec![a.claimed.run.clone()]);

    // In a batch, the unknown run is refused on its own and the real one completes.
    let ghost = RunId::new();
    let out = h
        .orch
        .complete_many(vec![
            RunCompletion {
                run_id: ghost,
                token: 1,
                outcome: RunOutcome::Succeeded { exit_code: Some(0) },
                usage: None,
            },
            RunCompletion {
                run_id: a.run_id(),
                token: a.token(),
                outcome: RunOutcome::Succeeded { exit_code: Some(0) },
                usage: None,
            },
        ])
        .await
        .unwrap();
    assert!(matches!(out[0], Err(StoreError::NotFound { .. } | StoreError::LeaseLost { .. })), "{:?}", out[0]);
    assert_eq!(out[1].as_ref().unwrap().work_item_state, WorkItemState::Succeeded);
    assert_not_found(h.store.run_get(ghost).await, "run_get after batch");
    assert_eq!(h.store.run_list(RunFilter::default()).await.unwrap().len(), 1);
}

/// The list of cases in this module, for [`crate::store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __edge_cases {
    ($factory:expr) => {
        $crate::__conformance_cases!(@emit $factory, cases_edge;
            edge_resume_survives_priority_edit_and_requeue,
            edge_run_requeue_of_waiting_run_starts_fresh,
            edge_pending_deps_exact_after_dependency_requeue,
            edge_pending_deps_exact_for_waiting_dependent,
            edge_enqueue_many_same_item_twice_is_invalid,
            edge_idempotency_key_twice_in_one_batch,
            edge_large_creation_batch_is_atomic,
            edge_recipe_scope_by_project,
            edge_project_delete_cascades,
            edge_pagination_after_visits_every_row_once,
            edge_unassignable_claim_fails_run_permanently,
            edge_sealed_value_debug_redacts_plain_answer,
            edge_writes_for_unknown_run_write_nothing,
        );
    };
}
