//! The conformance cases. Each takes a fresh, empty store.

use super::Harness;
use crate::error::StoreError;
use crate::state::*;
use crate::store::*;
use std::sync::Arc;

/// Projects: create, get, list with pagination, update, delete; unknown ids are `NotFound`.
pub async fn project_crud(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = h.orch.create_project("alpha", "first").await.unwrap();
    let b = h.orch.create_project("beta", "").await.unwrap();
    assert_eq!(h.store.project_get(a.id).await.unwrap(), a);
    let all = h.store.project_list(Page::default()).await.unwrap();
    assert_eq!(all.iter().map(|p| p.id).collect::<Vec<_>>(), vec![a.id, b.id]);
    let page = h.store.project_list(Page { limit: 1, after: Some(a.id.0) }).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, b.id);
    h.clock.advance(chrono::Duration::seconds(5));
    let u = h.orch.update_project(a.id, Some("alpha2".into()), None).await.unwrap();
    assert_eq!(u.name, "alpha2");
    assert_eq!(u.description, "first");
    assert!(u.updated_at > a.updated_at);
    assert!(h.orch.create_project("  ", "").await.is_err());
    h.store.project_delete(b.id).await.unwrap();
    assert!(matches!(h.store.project_get(b.id).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(h.store.project_delete(b.id).await, Err(StoreError::NotFound { .. })));
}

/// Visions are versioned: each put adds a version; get returns the latest or a given one.
pub async fn vision_versions(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    assert!(matches!(h.store.vision_get(p.id, None).await, Err(StoreError::NotFound { .. })));
    let v1 = h.orch.put_vision(p.id, "first vision", Some("ann".into())).await.unwrap();
    let v2 = h.orch.put_vision(p.id, "second vision", None).await.unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    assert_eq!(h.store.vision_get(p.id, None).await.unwrap().text, "second vision");
    assert_eq!(h.store.vision_get(p.id, Some(1)).await.unwrap().text, "first vision");
    assert_eq!(h.store.vision_list(p.id).await.unwrap().len(), 2);
    assert!(matches!(h.store.vision_get(p.id, Some(9)).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(
        h.orch.put_vision(crate::ids::ProjectId::new(), "x", None).await,
        Err(crate::Error::Store(StoreError::NotFound { .. }))
    ));
}

/// A project with active work cannot be deleted; once the work is cancelled it can, with everything in it.
pub async fn project_delete_refused_while_active(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "busy", 0, &[]).await;
    assert!(matches!(h.store.project_delete(p.id).await, Err(StoreError::Conflict { .. })));
    h.orch.cancel_work_item(w.id, None).await.unwrap();
    h.store.project_delete(p.id).await.unwrap();
    assert!(matches!(h.store.work_item_get(w.id).await, Err(StoreError::NotFound { .. })));
    assert_eq!(h.state_of_opt(w.id).await, None);
}

impl Harness {
    async fn state_of_opt(&self, id: crate::ids::WorkItemId) -> Option<WorkItemState> {
        self.store.work_item_get(id).await.ok().map(|w| w.state)
    }
}

/// Random operation sequences against the store, compared with a simple model after each step.
pub async fn model_random_operations(store: Arc<dyn Store>) {
    super::model::run_model_test(store).await;
}

/// A heartbeat renews the lease for the duration it was claimed with, not the configured default.
pub async fn heartbeat_keeps_claimed_ttl(store: Arc<dyn Store>) {
    use crate::agent::{AgentApi, ClaimRequest};
    use crate::clock::Clock;
    let h = Harness::new(store);
    let p = h.project().await;
    h.queued(p.id, "long", 0, &[]).await;
    let req = ClaimRequest { agent_id: "a".into(), capabilities: vec![], max: 1, lease_ttl_seconds: Some(600) };
    let a = h.orch.claim(req).await.unwrap().remove(0);
    assert_eq!(a.claimed.lease.expires_at, h.clock.now() + chrono::Duration::seconds(600));
    h.clock.advance(chrono::Duration::seconds(500));
    let lease = h.orch.heartbeat(a.run_id(), a.token()).await.unwrap();
    assert_eq!(lease.expires_at, h.clock.now() + chrono::Duration::seconds(600));
    // Past the default TTL (30 s in the harness) but inside the claimed one: still held.
    h.clock.advance(chrono::Duration::seconds(100));
    assert!(h.orch.tick().await.unwrap().reaped.is_empty());
    h.orch.append_logs(a.run_id(), a.token(), vec![]).await.unwrap();
}

/// `Orchestrator::complete_many` completes a batch in one call; each completion is guarded alone.
pub async fn complete_many_through_the_facade(store: Arc<dyn Store>) {
    use crate::domain::RunOutcome;
    let h = Harness::new(store);
    let p = h.project().await;
    for i in 0..5 {
        h.queued(p.id, &format!("w{i}"), 0, &[]).await;
    }
    let claimed = h.claim("a", 5).await;
    let mut completions: Vec<RunCompletion> = claimed
        .iter()
        .map(|a| RunCompletion {
            run_id: a.run_id(),
            token: a.token(),
            outcome: RunOutcome::Succeeded { exit_code: Some(0) },
            usage: None,
        })
        .collect();
    completions[2].token += 7;
    let out = h.orch.complete_many(completions).await.unwrap();
    assert_eq!(out.len(), 5);
    for (i, r) in out.iter().enumerate() {
        if i == 2 {
            assert!(matches!(r, Err(StoreError::LeaseLost { .. })));
        } else {
            assert_eq!(r.as_ref().unwrap().work_item_state, WorkItemState::Succeeded);
        }
    }
    assert_eq!(h.state_of(claimed[2].claimed.work_item.id).await, WorkItemState::Running);
}

/// `queue_list` pages with a keyset cursor: when the cursor item leaves the queue between pages (it was
/// claimed), the next page continues after its place instead of starting over.
pub async fn queue_list_cursor_survives_claims(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(h.queued(p.id, &format!("q{i}"), 0, &[]).await.id);
        h.clock.advance(chrono::Duration::seconds(1));
    }
    let f = |after: Option<uuid::Uuid>| QueueFilter { project_id: Some(p.id), page: Page { limit: 2, after } };
    let first = h.store.queue_list(f(None)).await.unwrap();
    assert_eq!(first.iter().map(|t| t.work_item_id).collect::<Vec<_>>(), ids[..2].to_vec());
    // The cursor item (and the one before it) leave the queue.
    let claimed = h.claim("a", 2).await;
    assert_eq!(claimed.len(), 2);
    let second = h.store.queue_list(f(Some(first[1].work_item_id.0))).await.unwrap();
    assert_eq!(second.iter().map(|t| t.work_item_id).collect::<Vec<_>>(), ids[2..4].to_vec());
    let third = h.store.queue_list(f(Some(second[1].work_item_id.0))).await.unwrap();
    assert_eq!(third.iter().map(|t| t.work_item_id).collect::<Vec<_>>(), ids[4..].to_vec());
}

/// An info request's deadline is enforced by `tick`: the waiting run fails (retryable), its open
/// questions close (`expired` past their deadline, `cancelled` otherwise), and the retry policy decides
/// what follows; a later answer is refused.
pub async fn info_request_deadline_expires_on_tick(store: Arc<dyn Store>) {
    use crate::agent::AgentApi;
    use crate::domain::InfoRequestState;
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "needs input", 0, &[]).await;
    let a = h.claim_one("a").await;
    let soon = h.orch.clock().now() + chrono::Duration::seconds(60);
    let q = |key: &str, deadline| NewInfoRequest {
        key: key.into(),
        prompt: "?".into(),
        kind: crate::recipe::InputKind::Text,
        choices: vec![],
        deadline,
    };
    let asked = h.orch.ask(a.run_id(), a.token(), vec![q("A", Some(soon)), q("B", None)]).await.unwrap();
    // Not yet due: nothing happens.
    h.clock.advance(chrono::Duration::seconds(59));
    assert!(h.orch.tick().await.unwrap().expired.is_empty());
    h.clock.advance(chrono::Duration::seconds(1));
    let report = h.orch.tick().await.unwrap();
    assert_eq!(report.expired.len(), 1);
    assert_eq!(report.expired[0].run_id, a.run_id());
    assert_eq!(report.expired[0].work_item_state, WorkItemState::Retrying);
    let run = h.store.run_get(a.run_id()).await.unwrap();
    assert_eq!(run.state, RunState::Failed);
    assert!(run.error.unwrap_or_default().contains("deadline"));
    assert_eq!(h.store.info_request_get(asked[0].id).await.unwrap().state, InfoRequestState::Expired);
    assert_eq!(h.store.info_request_get(asked[1].id).await.unwrap().state, InfoRequestState::Cancelled);
    assert!(h.orch.answer_info_request(asked[0].id, "late", "human").await.is_err());
    assert_eq!(h.state_of(w.id).await, WorkItemState::Retrying);
    // A second tick finds nothing more to expire.
    assert!(h.orch.tick().await.unwrap().expired.is_empty());
}

/// One batch of completions mixing items with and without dependents, a failure, an exit code and the
/// same run twice gives the same results as completing them one by one.
pub async fn complete_many_mixed_batch(store: Arc<dyn Store>) {
    use crate::domain::RunOutcome;
    use crate::retry::FailureKind;
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 0, &[]).await;
    let c = h.queued(p.id, "c", 0, &[]).await;
    let d = h.queued(p.id, "d", 0, &[]).await;
    let b = h.queued(p.id, "b", 0, &[a.id]).await;
    let claimed = h.claim("agent", 10).await;
    assert_eq!(claimed.len(), 3);
    let by_item = |id| claimed.iter().find(|x| x.claimed.work_item.id == id).unwrap();
    let done = |id, outcome| {
        let x = by_item(id);
        RunCompletion { run_id: x.run_id(), token: x.token(), outcome, usage: None }
    };
    let out = h
        .orch
        .complete_many(vec![
            done(a.id, RunOutcome::Succeeded { exit_code: Some(0) }),
            done(c.id, RunOutcome::Succeeded { exit_code: Some(3) }),
            done(d.id, RunOutcome::Failed { error: "no".into(), exit_code: Some(1), kind: FailureKind::Permanent }),
            done(a.id, RunOutcome::Succeeded { exit_code: Some(0) }),
        ])
        .await
        .unwrap();
    let ra = out[0].as_ref().unwrap();
    assert_eq!(ra.released, vec![b.id]);
    assert_eq!(ra.run.state, RunState::Succeeded);
    let rc = out[1].as_ref().unwrap();
    assert_eq!(rc.run.exit_code, Some(3));
    assert!(rc.released.is_empty());
    assert_eq!(out[2].as_ref().unwrap().work_item_state, WorkItemState::Failed);
    assert!(matches!(out[3], Err(StoreError::LeaseLost { .. })));
    assert_eq!(h.store.run_get(by_item(c.id).run_id()).await.unwrap().exit_code, Some(3));
    for (id, st) in [(a.id, WorkItemState::Succeeded), (c.id, WorkItemState::Succeeded), (d.id, WorkItemState::Failed)]
    {
        assert_eq!(h.state_of(id).await, st);
    }
    assert_eq!(h.claim_one("agent").await.claimed.work_item.id, b.id);
}

/// `complete_and_claim` applies the completions, then claims for the same agent: dependents the
/// completions released are claimable in the same call (in claim order), a failed run's retry waits for
/// its backoff, and the claimed runs hold fresh leases.
pub async fn complete_and_claim_hands_over(store: Arc<dyn Store>) {
    use crate::agent::ClaimRequest;
    use crate::domain::RunOutcome;
    use crate::retry::FailureKind;
    let h = Harness::new(store);
    let p = h.project().await;
    let a = h.queued(p.id, "a", 3, &[]).await;
    let d = h.queued(p.id, "d", 2, &[]).await;
    let b = h.queued(p.id, "b", 5, &[a.id]).await;
    let c = h.queued(p.id, "c", 0, &[]).await;
    let first = h.claim("agent", 2).await;
    assert_eq!(first.iter().map(|x| x.claimed.work_item.id).collect::<Vec<_>>(), vec![a.id, d.id]);
    let done = |x: &crate::agent::Assignment, outcome| RunCompletion {
        run_id: x.run_id(),
        token: x.token(),
        outcome,
        usage: None,
    };
    let req = ClaimRequest { agent_id: "agent".into(), capabilities: vec![], max: 5, lease_ttl_seconds: Some(120) };
    let out = h
        .orch
        .complete_and_claim(
            vec![
                done(&first[0], RunOutcome::Succeeded { exit_code: Some(0) }),
                done(
                    &first[1],
                    RunOutcome::Failed { error: "flaky".into(), exit_code: Some(1), kind: FailureKind::Retryable },
                ),
            ],
            req,
        )
        .await
        .unwrap();
    assert_eq!(out.completed.len(), 2);
    let ra = out.completed[0].as_ref().unwrap();
    assert_eq!(ra.work_item_state, WorkItemState::Succeeded);
    assert_eq!(ra.released, vec![b.id]);
    let rd = out.completed[1].as_ref().unwrap();
    assert_eq!(rd.work_item_state, WorkItemState::Retrying);
    assert!(rd.retry_at.is_some());
    let got = out.assigned.unwrap();
    assert_eq!(got.iter().map(|x| x.claimed.work_item.id).collect::<Vec<_>>(), vec![b.id, c.id]);
    let now = h.orch.clock().now();
    for x in &got {
        assert_eq!(x.claimed.run.agent_id, "agent");
        assert_eq!(x.claimed.run.state, RunState::Claimed);
        assert_eq!(x.claimed.lease.expires_at, now + chrono::Duration::seconds(120));
        let run = h.store.run_get(x.run_id()).await.unwrap();
        assert_eq!((run.state, run.lease_token), (RunState::Claimed, x.token()));
        assert_eq!(h.state_of(x.claimed.work_item.id).await, WorkItemState::Running);
    }
    assert_eq!(h.state_of(a.id).await, WorkItemState::Succeeded);
    assert_eq!(h.state_of(d.id).await, WorkItemState::Retrying);
    // With nothing to complete it is a plain claim; with nothing claimable it completes and returns none.
    let e = h.queued(p.id, "e", 0, &[]).await;
    let req = |max| ClaimRequest { agent_id: "agent".into(), capabilities: vec![], max, lease_ttl_seconds: None };
    let out = h.orch.complete_and_claim(vec![], req(1)).await.unwrap();
    assert!(out.completed.is_empty());
    assert_eq!(out.assigned.unwrap()[0].claimed.work_item.id, e.id);
    let out = h
        .orch
        .complete_and_claim(got.iter().map(|x| done(x, RunOutcome::Succeeded { exit_code: None })).collect(), req(4))
        .await
        .unwrap();
    assert!(out.completed.iter().all(|r| r.is_ok()));
    assert!(out.assigned.unwrap().is_empty());
    assert_eq!(h.state_of(b.id).await, WorkItemState::Succeeded);
    assert_eq!(h.state_of(c.id).await, WorkItemState::Succeeded);
}

/// A refused completion (stale token) in `complete_and_claim` is its own result: the other completions
/// and the claim go ahead. Bad input is refused before anything is written.
pub async fn complete_and_claim_refusals(store: Arc<dyn Store>) {
    use crate::agent::ClaimRequest;
    use crate::domain::RunOutcome;
    let h = Harness::new(store);
    let p = h.project().await;
    for i in 0..3 {
        h.queued(p.id, &format!("w{i}"), 0, &[]).await;
        h.clock.advance(chrono::Duration::seconds(1));
    }
    let claimed = h.claim("a", 2).await;
    let ok = |x: &crate::agent::Assignment, token| RunCompletion {
        run_id: x.run_id(),
        token,
        outcome: RunOutcome::Succeeded { exit_code: Some(0) },
        usage: None,
    };
    let req = |max| ClaimRequest { agent_id: "a".into(), capabilities: vec![], max, lease_ttl_seconds: None };
    // Bad claim input: nothing is completed.
    let bad = h.orch.complete_and_claim(vec![ok(&claimed[0], claimed[0].token())], req(0)).await;
    assert!(matches!(bad, Err(crate::Error::Invalid { .. })), "{bad:?}");
    let too_many = (0..=Page::MAX_LIMIT).map(|_| ok(&claimed[0], claimed[0].token())).collect();
    assert!(matches!(h.orch.complete_and_claim(too_many, req(1)).await, Err(crate::Error::Invalid { .. })));
    assert_eq!(h.state_of(claimed[0].claimed.work_item.id).await, WorkItemState::Running);
    let out = h
        .orch
        .complete_and_claim(vec![ok(&claimed[0], claimed[0].token() + 1), ok(&claimed[1], claimed[1].token())], req(5))
        .await
        .unwrap();
    assert!(matches!(out.completed[0], Err(StoreError::LeaseLost { .. })), "{:?}", out.completed[0]);
    assert_eq!(out.completed[1].as_ref().unwrap().work_item_state, WorkItemState::Succeeded);
    assert_eq!(out.assigned.unwrap().len(), 1);
    assert_eq!(h.state_of(claimed[0].claimed.work_item.id).await, WorkItemState::Running);
    assert_eq!(h.state_of(claimed[1].claimed.work_item.id).await, WorkItemState::Succeeded);
}

/// A project's repository is stored, shown, changed and removed; a malformed URL is refused with
/// nothing stored; claims carry the repository to the agent.
pub async fn project_repository_round_trip(store: Arc<dyn Store>) {
    use crate::domain::Repository;
    use crate::orchestrator::{CreateProject, UpdateProject};
    let h = Harness::new(store);
    let repo = Repository { url: "/srv/git/app.git".into(), base_branch: Some("main".into()) };
    let p = h
        .orch
        .create_project_with(CreateProject {
            name: "app".into(),
            description: String::new(),
            repository: Some(repo.clone()),
        })
        .await
        .unwrap();
    assert_eq!(p.repository.as_ref(), Some(&repo));
    assert_eq!(h.store.project_get(p.id).await.unwrap().repository.as_ref(), Some(&repo));
    assert_eq!(h.store.project_list(Page::default()).await.unwrap()[0].repository.as_ref(), Some(&repo));
    let before = h.store.project_list(Page::default()).await.unwrap().len();
    let bad = CreateProject {
        name: "bad".into(),
        description: String::new(),
        repository: Some(Repository { url: "  ".into(), base_branch: None }),
    };
    assert!(matches!(h.orch.create_project_with(bad).await, Err(crate::Error::Invalid { .. })));
    assert_eq!(h.store.project_list(Page::default()).await.unwrap().len(), before);
    // A name change keeps the repository; a new one replaces it; `Some(None)` removes it.
    let u = h.orch.update_project(p.id, Some("app2".into()), None).await.unwrap();
    assert_eq!(u.repository.as_ref(), Some(&repo));
    let other = Repository { url: "https://git.example.com/team/app.git".into(), base_branch: None };
    let change = UpdateProject { repository: Some(Some(other.clone())), ..Default::default() };
    let u = h.orch.update_project_with(p.id, change).await.unwrap();
    assert_eq!(u.repository.as_ref(), Some(&other));
    assert_eq!(h.store.project_get(p.id).await.unwrap().repository.as_ref(), Some(&other));
    let bad = UpdateProject {
        repository: Some(Some(Repository { url: "https://h/x".into(), base_branch: Some("a..b".into()) })),
        ..Default::default()
    };
    assert!(h.orch.update_project_with(p.id, bad).await.is_err());
    assert_eq!(h.store.project_get(p.id).await.unwrap().repository.as_ref(), Some(&other));
    h.queued(p.id, "work", 0, &[]).await;
    let a = h.claim_one("agent").await;
    assert_eq!(a.repository.as_ref(), Some(&other));
    let u = h.orch.update_project_with(p.id, UpdateProject { repository: Some(None), ..Default::default() }).await;
    assert_eq!(u.unwrap().repository, None);
    assert_eq!(h.store.project_get(p.id).await.unwrap().repository, None);
}

/// A released run does not use up an attempt: its item is claimable at once and the next claim resumes
/// the same run (same attempt, new token) with its answers; the old token is refused afterwards. Five
/// releases in a row leave the attempts unchanged.
pub async fn release_hands_the_run_back_without_an_attempt(store: Arc<dyn Store>) {
    use crate::agent::AgentApi;
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.queued(p.id, "long step", 0, &[]).await;
    let mut a = h.claim_one("a1").await;
    let run_id = a.run_id();
    h.orch.start(run_id, a.token()).await.unwrap();
    for i in 0..5 {
        let released = h.orch.release(run_id, a.token()).await.unwrap();
        assert_eq!(released.state, RunState::WaitingInput);
        assert_eq!(released.lease_expires_at, None);
        let item = h.store.work_item_get(w.id).await.unwrap();
        assert_eq!(item.state, WorkItemState::Queued, "release {i}");
        assert_eq!(item.attempts, 1, "release {i}");
        // The old token can no longer write.
        assert!(matches!(
            h.orch.release(run_id, a.token()).await,
            Err(crate::Error::Store(StoreError::LeaseLost { .. }))
        ));
        let next = h.claim_one(&format!("a{}", i + 2)).await;
        assert_eq!(next.run_id(), run_id);
        assert!(next.claimed.resumed);
        assert!(next.token() > a.token());
        assert_eq!(next.claimed.run.attempt, 1);
        a = next;
    }
    h.succeed(&a).await;
    assert_eq!(h.state_of(w.id).await, WorkItemState::Succeeded);
    assert_eq!(h.store.work_item_get(w.id).await.unwrap().attempts, 1);
    // A finished run cannot be released.
    assert!(h.orch.release(run_id, a.token()).await.is_err());
}

/// A run's result is written by its lease holder only and read back with its patch.
pub async fn run_result_is_fenced_and_read_back(store: Arc<dyn Store>) {
    use crate::agent::AgentApi;
    use crate::domain::RunResult;
    let h = Harness::new(store);
    let p = h.project().await;
    h.queued(p.id, "edit", 0, &[]).await;
    let a = h.claim_one("a1").await;
    assert_eq!(h.orch.run_result(a.run_id()).await.unwrap(), None);
    let result = RunResult {
        branch: "orch/item".into(),
        base_commit: "1111111111111111111111111111111111111111".into(),
        head_commit: "2222222222222222222222222222222222222222".into(),
        start_commit: Some("1111111111111111111111111111111111111111".into()),
        committed: true,
        pushed: false,
        files_changed: 1,
        insertions: 3,
        deletions: 1,
        files: vec!["src/lib.rs".into()],
        patch_truncated: false,
    };
    let patch = "diff --git a/src/lib.rs b/src/lib.rs\n+é unicode\n".to_string();
    assert!(matches!(
        h.orch.record_result(a.run_id(), a.token() + 1, result.clone(), patch.clone()).await,
        Err(crate::Error::Store(StoreError::LeaseLost { .. }))
    ));
    h.orch.record_result(a.run_id(), a.token(), result.clone(), "old".into()).await.unwrap();
    h.orch.record_result(a.run_id(), a.token(), result.clone(), patch.clone()).await.unwrap();
    let got = h.orch.run_result(a.run_id()).await.unwrap().unwrap();
    assert_eq!((got.run_id, &got.result, &got.patch), (a.run_id(), &result, &patch));
    h.succeed(&a).await;
    // After completion the lease is gone: nothing more is written.
    assert!(h.orch.record_result(a.run_id(), a.token(), result.clone(), String::new()).await.is_err());
    assert_eq!(h.orch.run_result(a.run_id()).await.unwrap().unwrap().patch, patch);
    assert!(matches!(h.store.run_result_get(crate::ids::RunId::new()).await, Err(StoreError::NotFound { .. })));
}

/// A run that asks or is released records the usage it reports (a codex turn that ended in a question).
pub async fn ask_and_release_record_usage(store: Arc<dyn Store>) {
    use crate::agent::AgentApi;
    use crate::domain::Usage;
    use crate::recipe::InputKind;
    let h = Harness::new(store);
    let p = h.project().await;
    h.queued(p.id, "asks", 0, &[]).await;
    let a = h.claim_one("a1").await;
    let asked = Usage { input_tokens: 1000, cached_input_tokens: 10, output_tokens: 50, cost_usd: None };
    let q =
        NewInfoRequest { key: "K".into(), prompt: "k?".into(), kind: InputKind::Text, choices: vec![], deadline: None };
    h.orch.ask_with_usage(a.run_id(), a.token(), vec![q], Some(asked.clone())).await.unwrap();
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().usage, asked);
    let req = h.store.info_request_list(InfoRequestFilter { run_id: Some(a.run_id()), ..Default::default() }).await;
    h.orch.answer_info_request(req.unwrap()[0].id, "v", "ann").await.unwrap();
    let b = h.claim_one("a2").await;
    assert_eq!(b.run_id(), a.run_id());
    // Nothing reported: the usage stays.
    h.orch.release_with_usage(b.run_id(), b.token(), None).await.unwrap();
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().usage, asked);
    let c = h.claim_one("a3").await;
    let more = Usage { input_tokens: 3000, cached_input_tokens: 0, output_tokens: 90, cost_usd: Some(0.5) };
    h.orch.release_with_usage(c.run_id(), c.token(), Some(more.clone())).await.unwrap();
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().usage, more);
}
