//! Conformance cases (flow): requirements drafts and approvals, work item edits, idempotency keys,
//! recipes, info requests with encryption, logs, step events and run records.

use super::Harness;
use crate::agent::{AgentApi, Assignment, ClaimRequest};
use crate::clock::Clock;
use crate::crypto::{Keyring, SecretKey};
use crate::domain::*;
use crate::error::{Error, StoreError};
use crate::ids::*;
use crate::orchestrator::{CreateWorkItem, Orchestrator, UpdateWorkItem};
use crate::recipe::InputKind;
use crate::retry::FailureKind;
use crate::rules;
use crate::state::*;
use crate::store::*;
use std::sync::Arc;

// ---- helpers (private) ----

fn req(title: &str, labels: &[&str], priority: i32) -> RequirementSpec {
    RequirementSpec {
        title: title.into(),
        description: format!("{title}: details"),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        priority,
        recipe_id: None,
    }
}

fn question(key: &str, kind: InputKind) -> NewInfoRequest {
    NewInfoRequest { key: key.into(), prompt: format!("value for {key}?"), kind, choices: vec![], deadline: None }
}

fn choice_question(key: &str, choices: &[&str]) -> NewInfoRequest {
    NewInfoRequest {
        key: key.into(),
        prompt: format!("pick {key}"),
        kind: InputKind::Choice,
        choices: choices.iter().map(|c| c.to_string()).collect(),
        deadline: None,
    }
}

fn line(stream: LogStream, text: &str) -> NewLogLine {
    NewLogLine { stream, line: text.into() }
}

fn step(kind: StepEventKind, index: Option<u32>, name: &str) -> NewStepEvent {
    NewStepEvent { step_index: index, kind, name: name.into(), detail: serde_json::Value::Null }
}

fn keyring(id: &str, key: &SecretKey) -> Keyring {
    Keyring::new(id, key.clone()).expect("keyring")
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn is_lease_lost(e: &Error) -> bool {
    matches!(e, Error::Store(StoreError::LeaseLost { .. }))
}

fn is_store_invalid(e: &Error) -> bool {
    matches!(e, Error::Store(StoreError::Invalid { .. }) | Error::Invalid { .. })
}

fn is_refused_transition(e: &Error) -> bool {
    matches!(e, Error::Store(StoreError::Conflict { .. }) | Error::Store(StoreError::InvalidTransition(_)))
}

async fn pending_approvals(h: &Harness, project_id: Option<ProjectId>) -> Vec<ApprovalRequest> {
    h.store
        .approval_list(ApprovalFilter { state: Some(ApprovalState::Pending), project_id, page: Page::default() })
        .await
        .expect("approval list")
}

async fn items_of(h: &Harness, project_id: ProjectId) -> Vec<WorkItem> {
    h.store
        .work_item_list(WorkItemFilter { project_id: Some(project_id), ..Default::default() })
        .await
        .expect("work item list")
}

fn create(project_id: ProjectId, title: &str) -> CreateWorkItem {
    CreateWorkItem { project_id: Some(project_id), title: title.into(), ..Default::default() }
}

/// A claimed run of a fresh queued item in a fresh project.
async fn claimed(h: &Harness, title: &str) -> Assignment {
    let p = h.project().await;
    h.queued(p.id, title, 0, &[]).await;
    h.claim_one("agent-1").await
}

async fn ask(h: &Harness, a: &Assignment, questions: Vec<NewInfoRequest>) -> Vec<InfoRequest> {
    h.orch.ask(a.run_id(), a.token(), questions).await.expect("ask")
}

async fn all_logs(h: &Harness, run_id: RunId) -> Vec<LogEntry> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |l: &LogEntry| l.seq);
        let page = h.store.logs_read_after(run_id, after, 100).await.expect("read logs");
        if page.is_empty() {
            return out;
        }
        assert!(page.len() <= 100);
        out.extend(page);
    }
}

// ---- requirements drafts ----

/// Without the approval policy a draft is proposed with no approval request; approving it creates one
/// `ready` work item per requirement (draft id set, fields carried over) and records their ids on the
/// draft; a rejected draft creates nothing; a decided draft cannot be decided again.
pub async fn flow_draft_decide_without_policy(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let reqs = vec![req("build it", &["linux"], 3), req("test it", &[], 0)];
    let (d, a) = h.orch.propose_requirements(p.id, "plan", reqs.clone(), Some("pm".into())).await.unwrap();
    assert!(a.is_none());
    assert_eq!(d.state, DraftState::Proposed);
    assert_eq!(d.requirements, reqs);
    assert_eq!(d.proposed_by.as_deref(), Some("pm"));
    assert!(d.work_item_ids.is_empty());
    assert!(d.decided_at.is_none());
    assert_eq!(h.store.draft_get(d.id).await.unwrap(), d);
    assert!(pending_approvals(&h, None).await.is_empty());
    assert!(items_of(&h, p.id).await.is_empty());

    h.clock.advance(chrono::Duration::seconds(5));
    let out = h.orch.decide_draft(d.id, Decision::Approve, "lead", Some("looks good".into())).await.unwrap();
    assert!(out.approval.is_none());
    let dd = out.draft.clone().expect("decided draft");
    assert_eq!(dd.state, DraftState::Approved);
    assert_eq!(dd.decided_at, Some(h.clock.now()));
    assert_eq!(out.work_items.len(), 2);
    assert_eq!(out.work_items.iter().map(|w| w.title.as_str()).collect::<Vec<_>>(), vec!["build it", "test it"]);
    assert_eq!(dd.work_item_ids, out.work_items.iter().map(|w| w.id).collect::<Vec<_>>());
    for (w, r) in out.work_items.iter().zip(&reqs) {
        assert_eq!(w.state, WorkItemState::Ready);
        assert_eq!(w.draft_id, Some(d.id));
        assert_eq!(w.project_id, p.id);
        assert_eq!(w.description, r.description);
        assert_eq!(w.labels, r.labels);
        assert_eq!(w.priority, r.priority);
        assert_eq!(w.content_hash, w.compute_content_hash());
        let stored = h.store.work_item_get(w.id).await.unwrap();
        assert_eq!(&stored, w);
    }
    assert_eq!(h.store.draft_get(d.id).await.unwrap(), dd);
    assert_eq!(items_of(&h, p.id).await.len(), 2);
    // The created items are ordinary ready items: they can be enqueued.
    let t = h.orch.enqueue(out.work_items[0].id, EnqueueOptions::default()).await.unwrap();
    assert_eq!(t.state, WorkItemState::Queued);

    // Deciding twice is refused by the state machine, and nothing more is created.
    for decision in [Decision::Approve, Decision::Reject] {
        let e = h.orch.decide_draft(d.id, decision, "lead", None).await.unwrap_err();
        assert!(matches!(e, Error::Store(StoreError::InvalidTransition(_))), "{e:?}");
    }
    assert_eq!(items_of(&h, p.id).await.len(), 2);

    // A rejected draft creates nothing.
    let (d2, _) = h.orch.propose_requirements(p.id, "other plan", vec![req("nope", &[], 0)], None).await.unwrap();
    let out = h.orch.decide_draft(d2.id, Decision::Reject, "lead", Some("not now".into())).await.unwrap();
    let dd2 = out.draft.expect("decided draft");
    assert_eq!(dd2.state, DraftState::Rejected);
    assert!(dd2.work_item_ids.is_empty());
    assert!(out.work_items.is_empty());
    assert_eq!(items_of(&h, p.id).await.len(), 2);
    let e = h.orch.decide_draft(d2.id, Decision::Approve, "lead", None).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::InvalidTransition(_))), "{e:?}");
    assert_eq!(h.store.draft_get(d2.id).await.unwrap().state, DraftState::Rejected);

    let drafts = h.store.draft_list(p.id, Page::default()).await.unwrap();
    assert_eq!(drafts.iter().map(|d| d.id).collect::<Vec<_>>(), vec![d.id, d2.id]);
    let e = h.orch.decide_draft(DraftId::new(), Decision::Approve, "lead", None).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::NotFound { .. })), "{e:?}");
    // Bad input is refused before reaching the store.
    assert!(h.orch.propose_requirements(p.id, "empty", vec![], None).await.is_err());
    assert!(h.orch.propose_requirements(p.id, " ", vec![req("x", &[], 0)], None).await.is_err());
}

/// Under the approval policy a proposed draft gets a pending approval request bound to its content
/// hash; approving that request creates the work items; `approval_list` filters by state and project;
/// deciding the draft directly decides its pending approval request too.
pub async fn flow_draft_approval_policy(store: Arc<dyn Store>) {
    let h = Harness::with_config(store, |c| c.require_approval = true);
    let p = h.project().await;
    let p2 = h.orch.create_project("other", "").await.unwrap();
    let (d, a) = h
        .orch
        .propose_requirements(p.id, "plan", vec![req("one", &[], 1), req("two", &["gpu"], 2)], None)
        .await
        .unwrap();
    let a = a.expect("approval request");
    assert_eq!(a.state, ApprovalState::Pending);
    assert_eq!(a.subject, ApprovalSubject::RequirementsDraft(d.id));
    assert_eq!(a.project_id, p.id);
    assert_eq!(a.content_hash, d.content_hash);
    assert!(a.decided_by.is_none() && a.decided_at.is_none());
    assert_eq!(h.store.approval_get(a.id).await.unwrap(), a);
    let (d2, a2) = h.orch.propose_requirements(p2.id, "plan 2", vec![req("three", &[], 0)], None).await.unwrap();
    let a2 = a2.expect("approval request");

    assert_eq!(pending_approvals(&h, None).await.iter().map(|x| x.id).collect::<Vec<_>>(), vec![a.id, a2.id]);
    assert_eq!(pending_approvals(&h, Some(p.id)).await, vec![a.clone()]);
    assert_eq!(pending_approvals(&h, Some(p2.id)).await.iter().map(|x| x.id).collect::<Vec<_>>(), vec![a2.id]);
    let approved = ApprovalFilter { state: Some(ApprovalState::Approved), ..Default::default() };
    assert!(h.store.approval_list(approved.clone()).await.unwrap().is_empty());
    let paged = h
        .store
        .approval_list(ApprovalFilter { page: Page { limit: 1, after: Some(a.id.0) }, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(paged.iter().map(|x| x.id).collect::<Vec<_>>(), vec![a2.id]);
    assert!(items_of(&h, p.id).await.is_empty());

    h.clock.advance(chrono::Duration::seconds(7));
    let out = h.orch.decide_approval(a.id, Decision::Approve, "lead", Some("ship it".into())).await.unwrap();
    let decided = out.approval.expect("decided approval");
    assert_eq!(decided.id, a.id);
    assert_eq!(decided.state, ApprovalState::Approved);
    assert_eq!(decided.decided_by.as_deref(), Some("lead"));
    assert_eq!(decided.reason.as_deref(), Some("ship it"));
    assert_eq!(decided.decided_at, Some(h.clock.now()));
    assert_eq!(h.store.approval_get(a.id).await.unwrap(), decided);
    let dd = out.draft.expect("decided draft");
    assert_eq!(dd.state, DraftState::Approved);
    assert_eq!(out.work_items.len(), 2);
    assert!(out.work_items.iter().all(|w| w.state == WorkItemState::Ready && w.draft_id == Some(d.id)));
    assert_eq!(dd.work_item_ids, out.work_items.iter().map(|w| w.id).collect::<Vec<_>>());
    assert_eq!(items_of(&h, p.id).await.len(), 2);
    assert_eq!(h.store.approval_list(approved).await.unwrap(), vec![decided]);
    assert_eq!(pending_approvals(&h, None).await.iter().map(|x| x.id).collect::<Vec<_>>(), vec![a2.id]);

    // The approval is decided: deciding it (or its draft) again is refused.
    let e = h.orch.decide_approval(a.id, Decision::Reject, "lead", None).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::InvalidTransition(_))), "{e:?}");
    let e = h.orch.decide_draft(d.id, Decision::Approve, "lead", None).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::InvalidTransition(_))), "{e:?}");
    assert_eq!(items_of(&h, p.id).await.len(), 2);

    // Deciding the draft directly also decides its pending approval request.
    let out = h.orch.decide_draft(d2.id, Decision::Reject, "boss", Some("later".into())).await.unwrap();
    assert_eq!(out.draft.expect("draft").state, DraftState::Rejected);
    assert!(out.work_items.is_empty());
    let r = h.store.approval_get(a2.id).await.unwrap();
    assert_eq!(r.state, ApprovalState::Rejected);
    assert_eq!(r.decided_by.as_deref(), Some("boss"));
    assert_eq!(r.reason.as_deref(), Some("later"));
    assert!(pending_approvals(&h, None).await.is_empty());
    assert!(items_of(&h, p2.id).await.is_empty());
    let e = h.orch.decide_approval(ApprovalId::new(), Decision::Approve, "x", None).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::NotFound { .. })), "{e:?}");
    assert!(h.orch.decide_approval(a2.id, Decision::Approve, " ", None).await.is_err());
}

// ---- work item approvals ----

/// Under the approval policy a work item is created `awaiting_approval` with a pending approval bound to
/// its content hash; it cannot be enqueued (or created enqueued) before approval; approving it records
/// who, why and when and makes it `ready`, after which it can be enqueued and claimed.
pub async fn flow_work_item_approval_gate(store: Arc<dyn Store>) {
    let h = Harness::with_config(store, |c| c.require_approval = true);
    let p = h.project().await;
    let c = h.orch.create_work_item(create(p.id, "gated")).await.unwrap();
    assert!(c.created);
    let w = c.work_item;
    let a = c.approval.expect("approval request");
    assert_eq!(w.state, WorkItemState::AwaitingApproval);
    assert_eq!(w.approval_id, Some(a.id));
    assert_eq!(a.subject, ApprovalSubject::WorkItem(w.id));
    assert_eq!(a.content_hash, w.content_hash);
    assert_eq!(a.state, ApprovalState::Pending);
    assert_eq!(h.store.approval_get(a.id).await.unwrap(), a);

    let e = h.orch.enqueue(w.id, EnqueueOptions::default()).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
    assert_eq!(h.state_of(w.id).await, WorkItemState::AwaitingApproval);
    let e = h
        .orch
        .create_work_item(CreateWorkItem { enqueue: Some(EnqueueOptions::default()), ..create(p.id, "eager") })
        .await
        .unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
    assert_eq!(items_of(&h, p.id).await.len(), 1);
    assert!(h.claim("agent-1", 10).await.is_empty());

    h.clock.advance(chrono::Duration::seconds(42));
    let out = h.orch.decide_approval(a.id, Decision::Approve, "reviewer", Some("fine".into())).await.unwrap();
    let decided = out.approval.expect("approval");
    assert_eq!(decided.state, ApprovalState::Approved);
    assert_eq!(decided.decided_by.as_deref(), Some("reviewer"));
    assert_eq!(decided.reason.as_deref(), Some("fine"));
    assert_eq!(decided.decided_at, Some(h.clock.now()));
    assert!(out.draft.is_none());
    assert_eq!(out.work_items.len(), 1);
    assert_eq!(out.work_items[0].id, w.id);
    assert_eq!(out.work_items[0].state, WorkItemState::Ready);
    assert_eq!(h.store.approval_get(a.id).await.unwrap(), decided);
    assert_eq!(h.state_of(w.id).await, WorkItemState::Ready);
    assert!(pending_approvals(&h, Some(p.id)).await.is_empty());

    let t = h.orch.enqueue(w.id, EnqueueOptions { priority: Some(5), ..Default::default() }).await.unwrap();
    assert_eq!(t.state, WorkItemState::Queued);
    assert_eq!(t.priority, 5);
    let got = h.claim_one("agent-1").await;
    assert_eq!(got.claimed.work_item.id, w.id);
}

/// An approval is bound to the content hash: editing an item awaiting approval supersedes the pending
/// approval and requests a new one (the old one can no longer be decided); editing a `ready` item under
/// the policy sends it back to `awaiting_approval`; a priority-only change (or an edit that leaves the
/// content unchanged) needs no new approval.
pub async fn flow_approval_bound_to_content(store: Arc<dyn Store>) {
    let h = Harness::with_config(store, |c| c.require_approval = true);
    let p = h.project().await;
    let c = h.orch.create_work_item(create(p.id, "v1")).await.unwrap();
    let w = c.work_item;
    let a1 = c.approval.expect("approval");

    h.clock.advance(chrono::Duration::seconds(1));
    let ch =
        h.orch.update_work_item(w.id, UpdateWorkItem { title: Some("v2".into()), ..Default::default() }).await.unwrap();
    let a2 = ch.approval.expect("new approval");
    assert_ne!(a2.id, a1.id);
    assert_eq!(a2.state, ApprovalState::Pending);
    assert_eq!(ch.work_item.state, WorkItemState::AwaitingApproval);
    assert_eq!(ch.work_item.title, "v2");
    assert_eq!(ch.work_item.approval_id, Some(a2.id));
    assert_ne!(ch.work_item.content_hash, w.content_hash);
    assert_eq!(a2.content_hash, ch.work_item.content_hash);
    assert_eq!(h.store.approval_get(a1.id).await.unwrap().state, ApprovalState::Superseded);
    assert_eq!(h.store.work_item_get(w.id).await.unwrap(), ch.work_item);
    assert_eq!(pending_approvals(&h, Some(p.id)).await.iter().map(|a| a.id).collect::<Vec<_>>(), vec![a2.id]);

    // The superseded approval cannot approve the new content.
    let e = h.orch.decide_approval(a1.id, Decision::Approve, "reviewer", None).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
    assert_eq!(h.state_of(w.id).await, WorkItemState::AwaitingApproval);
    assert_eq!(h.store.approval_get(a1.id).await.unwrap().state, ApprovalState::Superseded);

    h.orch.decide_approval(a2.id, Decision::Approve, "reviewer", None).await.unwrap();
    assert_eq!(h.state_of(w.id).await, WorkItemState::Ready);

    // A priority-only change needs no approval; neither does an edit that changes nothing.
    let ch = h.orch.update_work_item(w.id, UpdateWorkItem { priority: Some(9), ..Default::default() }).await.unwrap();
    assert!(ch.approval.is_none());
    assert_eq!(ch.work_item.state, WorkItemState::Ready);
    assert_eq!(ch.work_item.priority, 9);
    assert_eq!(ch.work_item.approval_id, Some(a2.id));
    let ch =
        h.orch.update_work_item(w.id, UpdateWorkItem { title: Some("v2".into()), ..Default::default() }).await.unwrap();
    assert!(ch.approval.is_none());
    assert_eq!(ch.work_item.state, WorkItemState::Ready);

    // Editing a ready item's content under the policy needs a new approval.
    let ch = h
        .orch
        .update_work_item(w.id, UpdateWorkItem { description: Some("more detail".into()), ..Default::default() })
        .await
        .unwrap();
    let a3 = ch.approval.expect("new approval");
    assert_eq!(ch.work_item.state, WorkItemState::AwaitingApproval);
    assert_eq!(ch.work_item.approval_id, Some(a3.id));
    assert_eq!(a3.content_hash, ch.work_item.content_hash);
    assert_eq!(h.store.approval_get(a2.id).await.unwrap().state, ApprovalState::Approved);
    let e = h.orch.enqueue(w.id, EnqueueOptions::default()).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
    // Labels are content too: a labels edit supersedes a3.
    let ch = h
        .orch
        .update_work_item(w.id, UpdateWorkItem { labels: Some(vec!["linux".into()]), ..Default::default() })
        .await
        .unwrap();
    let a4 = ch.approval.expect("new approval");
    assert_eq!(h.store.approval_get(a3.id).await.unwrap().state, ApprovalState::Superseded);
    h.orch.decide_approval(a4.id, Decision::Approve, "reviewer", None).await.unwrap();
    let w = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(w.state, WorkItemState::Ready);
    assert_eq!(w.labels, vec!["linux".to_string()]);
    assert_eq!(w.description, "more detail");
    assert_eq!(w.priority, 9);
}

/// Rejecting a work item's approval sends it back to `draft` (not enqueueable); submitting it again
/// requests a fresh approval, and approving that makes it `ready`. Without the policy, submitting a draft
/// makes it `ready` directly; submitting a non-draft is refused.
pub async fn flow_reject_and_resubmit(store: Arc<dyn Store>) {
    let h = Harness::with_config(store, |c| c.require_approval = true);
    let p = h.project().await;
    let c = h.orch.create_work_item(create(p.id, "maybe")).await.unwrap();
    let w = c.work_item;
    let a1 = c.approval.expect("approval");
    let out = h.orch.decide_approval(a1.id, Decision::Reject, "reviewer", Some("too vague".into())).await.unwrap();
    let rejected = out.approval.expect("approval");
    assert_eq!(rejected.state, ApprovalState::Rejected);
    assert_eq!(rejected.reason.as_deref(), Some("too vague"));
    assert_eq!(out.work_items.len(), 1);
    assert_eq!(out.work_items[0].state, WorkItemState::Draft);
    assert_eq!(h.state_of(w.id).await, WorkItemState::Draft);
    let e = h.orch.enqueue(w.id, EnqueueOptions::default()).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
    let e = h.orch.decide_approval(a1.id, Decision::Approve, "reviewer", None).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");

    // A draft can be edited, then submitted again.
    let ch = h
        .orch
        .update_work_item(w.id, UpdateWorkItem { description: Some("precise now".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(ch.work_item.state, WorkItemState::Draft);
    h.clock.advance(chrono::Duration::seconds(3));
    let ch = h.orch.submit_work_item(w.id).await.unwrap();
    let a2 = ch.approval.expect("fresh approval");
    assert_ne!(a2.id, a1.id);
    assert_eq!(a2.state, ApprovalState::Pending);
    assert_eq!(a2.requested_at, h.clock.now());
    assert_eq!(a2.content_hash, ch.work_item.content_hash);
    assert_eq!(ch.work_item.state, WorkItemState::AwaitingApproval);
    assert_eq!(ch.work_item.approval_id, Some(a2.id));
    let e = h.orch.submit_work_item(w.id).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
    h.orch.decide_approval(a2.id, Decision::Approve, "reviewer", None).await.unwrap();
    assert_eq!(h.state_of(w.id).await, WorkItemState::Ready);
    let e = h.orch.submit_work_item(w.id).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");

    // Kept as a draft, then submitted without the policy: straight to ready.
    let d = h.orch.create_work_item(CreateWorkItem { draft: true, ..create(p.id, "draft") }).await.unwrap();
    assert_eq!(d.work_item.state, WorkItemState::Draft);
    assert!(d.approval.is_none());
    let open = Harness::with_config(h.store.clone(), |_| {});
    let ch = open.orch.submit_work_item(d.work_item.id).await.unwrap();
    assert!(ch.approval.is_none());
    assert_eq!(ch.work_item.state, WorkItemState::Ready);
    let e = h.orch.submit_work_item(WorkItemId::new()).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::NotFound { .. })), "{e:?}");
}

/// Without the approval policy content edits are allowed in `ready` (no approval, hash recomputed) but
/// refused with `Conflict` once the item is queued or running; the priority may still change while
/// queued; a refused edit changes nothing.
pub async fn flow_edit_refused_while_queued_or_running(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w = h.item(p.id, "edit me").await;
    h.clock.advance(chrono::Duration::seconds(2));
    let ch = h
        .orch
        .update_work_item(
            w.id,
            UpdateWorkItem { title: Some("edited".into()), labels: Some(vec!["a".into()]), ..Default::default() },
        )
        .await
        .unwrap();
    assert!(ch.approval.is_none());
    assert_eq!(ch.work_item.state, WorkItemState::Ready);
    assert_eq!(ch.work_item.title, "edited");
    assert_eq!(ch.work_item.labels, vec!["a".to_string()]);
    assert_ne!(ch.work_item.content_hash, w.content_hash);
    assert_eq!(ch.work_item.content_hash, ch.work_item.compute_content_hash());
    assert_eq!(ch.work_item.updated_at, h.clock.now());
    assert_eq!(h.store.work_item_get(w.id).await.unwrap(), ch.work_item);

    h.orch.enqueue(w.id, EnqueueOptions::default()).await.unwrap();
    let before = h.store.work_item_get(w.id).await.unwrap();
    let e = h
        .orch
        .update_work_item(w.id, UpdateWorkItem { title: Some("late".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    let e = h
        .orch
        .update_work_item(
            w.id,
            UpdateWorkItem { description: Some("late".into()), priority: Some(3), ..Default::default() },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    assert_eq!(h.store.work_item_get(w.id).await.unwrap(), before);
    let ch = h.orch.update_work_item(w.id, UpdateWorkItem { priority: Some(4), ..Default::default() }).await.unwrap();
    assert_eq!(ch.work_item.priority, 4);
    assert_eq!(ch.work_item.state, WorkItemState::Queued);

    // The item now needs capability "a".
    assert!(h.claim("agent-1", 1).await.is_empty());
    let mut got = h
        .orch
        .claim(ClaimRequest {
            agent_id: "agent-1".into(),
            capabilities: vec!["a".into()],
            max: 1,
            lease_ttl_seconds: None,
        })
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let a = got.remove(0);
    assert_eq!(a.claimed.work_item.id, w.id);
    for u in [
        UpdateWorkItem { title: Some("late".into()), ..Default::default() },
        UpdateWorkItem { labels: Some(vec![]), ..Default::default() },
        UpdateWorkItem { description: Some("x".into()), ..Default::default() },
    ] {
        let e = h.orch.update_work_item(w.id, u).await.unwrap_err();
        assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    }
    let now = h.store.work_item_get(w.id).await.unwrap();
    assert_eq!(now.title, "edited");
    assert_eq!(now.state, WorkItemState::Running);
    h.succeed(&a).await;
    let e = h
        .orch
        .update_work_item(w.id, UpdateWorkItem { title: Some("after".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    let e = h
        .orch
        .update_work_item(WorkItemId::new(), UpdateWorkItem { title: Some("x".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::NotFound { .. })), "{e:?}");
}

/// Cancelling an item that awaits approval supersedes its pending approval (deciding it is then
/// refused and the item stays cancelled); pending approvals are counted in the stats.
pub async fn flow_cancel_awaiting_approval(store: Arc<dyn Store>) {
    let h = Harness::with_config(store, |c| c.require_approval = true);
    let p = h.project().await;
    let keep = h.orch.create_work_item(create(p.id, "keep")).await.unwrap();
    let drop = h.orch.create_work_item(create(p.id, "drop")).await.unwrap();
    assert_eq!(h.store.stats().await.unwrap().pending_approvals, 2);
    let a = drop.approval.expect("approval");
    let c = h.orch.cancel_work_item(drop.work_item.id, Some("not wanted".into())).await.unwrap();
    assert_eq!(c.state, WorkItemState::Cancelled);
    let after = h.store.approval_get(a.id).await.unwrap();
    assert_ne!(after.state, ApprovalState::Pending);
    assert_ne!(after.state, ApprovalState::Approved);
    assert_eq!(
        pending_approvals(&h, Some(p.id)).await.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![keep.approval.expect("approval").id]
    );
    assert_eq!(h.store.stats().await.unwrap().pending_approvals, 1);
    let e = h.orch.decide_approval(a.id, Decision::Approve, "reviewer", None).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
    assert_eq!(h.state_of(drop.work_item.id).await, WorkItemState::Cancelled);
    // A cancelled item cannot be edited or submitted either.
    let e = h
        .orch
        .update_work_item(drop.work_item.id, UpdateWorkItem { title: Some("x".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    let e = h.orch.submit_work_item(drop.work_item.id).await.unwrap_err();
    assert!(is_refused_transition(&e), "{e:?}");
}

// ---- idempotency ----

/// Idempotency keys are unique per project: the same key with the same content returns the existing
/// item (`created == false`); with different content it is `Duplicate`; another project may reuse the
/// key; a batch is all-or-nothing (two equal keys in one batch, or one conflicting key, create nothing).
pub async fn flow_idempotency_keys(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let p2 = h.orch.create_project("other", "").await.unwrap();
    let keyed = |project: ProjectId, title: &str, key: &str| CreateWorkItem {
        idempotency_key: Some(key.into()),
        description: "same".into(),
        ..create(project, title)
    };
    let first = h.orch.create_work_item(keyed(p.id, "A", "k1")).await.unwrap();
    assert!(first.created);
    assert_eq!(first.work_item.idempotency_key.as_deref(), Some("k1"));
    h.clock.advance(chrono::Duration::seconds(1));
    let again = h.orch.create_work_item(keyed(p.id, "A", "k1")).await.unwrap();
    assert!(!again.created);
    assert!(again.approval.is_none());
    assert_eq!(again.work_item, first.work_item);
    assert_eq!(items_of(&h, p.id).await.len(), 1);

    let e = h.orch.create_work_item(keyed(p.id, "B", "k1")).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Duplicate { .. })), "{e:?}");
    assert_eq!(items_of(&h, p.id).await.len(), 1);
    assert_eq!(h.store.work_item_get(first.work_item.id).await.unwrap().title, "A");

    let other = h.orch.create_work_item(keyed(p2.id, "A", "k1")).await.unwrap();
    assert!(other.created);
    assert_ne!(other.work_item.id, first.work_item.id);
    assert_eq!(other.work_item.project_id, p2.id);

    // Two identical keys in one batch: Duplicate, nothing created.
    let e = h.orch.create_work_items(vec![keyed(p.id, "C", "k2"), keyed(p.id, "C", "k2")]).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Duplicate { .. })), "{e:?}");
    assert_eq!(items_of(&h, p.id).await.len(), 1);
    // One conflicting key in a batch: nothing created, not even the valid items.
    let e = h
        .orch
        .create_work_items(vec![keyed(p.id, "D", "k3"), create(p.id, "no key"), keyed(p.id, "changed", "k1")])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Duplicate { .. })), "{e:?}");
    assert_eq!(items_of(&h, p.id).await.len(), 1);

    // The keys of the refused batches were not taken; a batch mixing an existing key and a new one works.
    let mixed = h.orch.create_work_items(vec![keyed(p.id, "A", "k1"), keyed(p.id, "D", "k3")]).await.unwrap();
    assert_eq!(mixed.len(), 2);
    assert!(!mixed[0].created);
    assert_eq!(mixed[0].work_item.id, first.work_item.id);
    assert!(mixed[1].created);
    assert_eq!(mixed[1].work_item.title, "D");
    let k2 = h.orch.create_work_item(keyed(p.id, "C", "k2")).await.unwrap();
    assert!(k2.created);
    assert_eq!(items_of(&h, p.id).await.len(), 3);
}

/// `work_item_list` filters by project, state and label (combined) and pages in creation order with
/// `after`.
pub async fn flow_work_item_list_filters(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let p2 = h.orch.create_project("other", "").await.unwrap();
    let labelled = |project: ProjectId, title: &str, labels: &[&str]| CreateWorkItem {
        labels: labels.iter().map(|l| l.to_string()).collect(),
        ..create(project, title)
    };
    let a = h.orch.create_work_item(labelled(p.id, "a", &["linux"])).await.unwrap().work_item;
    let b = h.orch.create_work_item(labelled(p.id, "b", &["linux", "gpu"])).await.unwrap().work_item;
    let c = h.orch.create_work_item(labelled(p.id, "c", &[])).await.unwrap().work_item;
    let d = h.orch.create_work_item(labelled(p2.id, "d", &["linux"])).await.unwrap().work_item;
    h.orch.enqueue(b.id, EnqueueOptions::default()).await.unwrap();
    let list = |f: WorkItemFilter| {
        let h = h.clone();
        async move { h.store.work_item_list(f).await.unwrap().into_iter().map(|w| w.id).collect::<Vec<_>>() }
    };
    assert_eq!(list(WorkItemFilter::default()).await, vec![a.id, b.id, c.id, d.id]);
    assert_eq!(list(WorkItemFilter { project_id: Some(p.id), ..Default::default() }).await, vec![a.id, b.id, c.id]);
    assert_eq!(list(WorkItemFilter { project_id: Some(p2.id), ..Default::default() }).await, vec![d.id]);
    assert_eq!(list(WorkItemFilter { state: Some(WorkItemState::Queued), ..Default::default() }).await, vec![b.id]);
    assert_eq!(
        list(WorkItemFilter { project_id: Some(p.id), state: Some(WorkItemState::Ready), ..Default::default() }).await,
        vec![a.id, c.id]
    );
    assert_eq!(
        list(WorkItemFilter { label: Some("linux".into()), ..Default::default() }).await,
        vec![a.id, b.id, d.id]
    );
    assert_eq!(list(WorkItemFilter { label: Some("gpu".into()), ..Default::default() }).await, vec![b.id]);
    assert_eq!(
        list(WorkItemFilter {
            label: Some("linux".into()),
            project_id: Some(p.id),
            state: Some(WorkItemState::Ready),
            ..Default::default()
        })
        .await,
        vec![a.id]
    );
    assert!(list(WorkItemFilter { label: Some("macos".into()), ..Default::default() }).await.is_empty());
    assert!(list(WorkItemFilter { state: Some(WorkItemState::Running), ..Default::default() }).await.is_empty());
    assert!(list(WorkItemFilter { project_id: Some(ProjectId::new()), ..Default::default() }).await.is_empty());

    let paged = |after: Option<WorkItemId>| WorkItemFilter {
        project_id: Some(p.id),
        page: Page { limit: 2, after: after.map(|i| i.0) },
        ..Default::default()
    };
    assert_eq!(list(paged(None)).await, vec![a.id, b.id]);
    assert_eq!(list(paged(Some(b.id))).await, vec![c.id]);
    assert!(list(paged(Some(c.id))).await.is_empty());
    // `after` is a keyset position, not a member of the filtered set.
    let f = WorkItemFilter {
        label: Some("linux".into()),
        page: Page { limit: 10, after: Some(c.id.0) },
        ..Default::default()
    };
    assert_eq!(list(f).await, vec![d.id]);
}

// ---- recipes ----

const RECIPE: &str = "name: build-and-test\ndescription: Build it\ninputs:\n  - name: GITHUB_TOKEN\n    prompt: Token to push\n    kind: secret\nsteps:\n  - echo hello\n  - name: test\n    run: cargo test\n    env: {RUST_LOG: debug}\n    timeout: 600\n";

/// `create_recipe` parses, validates and stores a recipe (spec parsed, YAML kept as submitted); an
/// invalid recipe is `Error::Recipe` naming a line and stores nothing; `validate_recipe` never stores.
pub async fn flow_recipe_create_and_validate(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let spec = h.orch.validate_recipe(RECIPE).unwrap();
    assert!(h.store.recipe_list(Page::default()).await.unwrap().is_empty());
    let r = h.orch.create_recipe(Some(p.id), RECIPE).await.unwrap();
    assert_eq!(r.name, "build-and-test");
    assert_eq!(r.yaml, RECIPE);
    assert_eq!(r.spec, spec);
    assert_eq!(r.project_id, Some(p.id));
    assert_eq!(r.created_at, h.clock.now());
    assert_eq!(r.spec.steps.len(), 2);
    assert_eq!(r.spec.steps[0].run, "echo hello");
    assert_eq!(r.spec.steps[1].timeout, Some(600));
    assert_eq!(r.spec.steps[1].env.get("RUST_LOG").map(String::as_str), Some("debug"));
    assert_eq!(r.spec.inputs[0].kind, InputKind::Secret);
    assert_eq!(h.store.recipe_get(r.id).await.unwrap(), r);
    let global = h.orch.create_recipe(None, "name: tiny\nsteps:\n  - echo tiny\n").await.unwrap();
    assert_eq!(global.project_id, None);
    assert_eq!(h.store.recipe_list(Page::default()).await.unwrap(), vec![r.clone(), global.clone()]);
    assert_eq!(h.store.recipe_list(Page { limit: 1, after: Some(r.id.0) }).await.unwrap(), vec![global]);

    // An unknown field on line 4: the error names a line, and nothing is stored.
    let bad = "name: x\nsteps:\n  - run: a\n    colour: red\n";
    for e in [h.orch.validate_recipe(bad).unwrap_err(), h.orch.create_recipe(Some(p.id), bad).await.unwrap_err()] {
        let Error::Recipe(errs) = &e else { panic!("expected a recipe error, got {e:?}") };
        assert!(!errs.0.is_empty());
        assert!(errs.0.iter().any(|x| x.line == Some(4)), "{errs:?}");
        assert_eq!(e.code(), "invalid_recipe");
    }
    // A syntax error also names its line.
    let Error::Recipe(errs) = h.orch.create_recipe(None, "name: x\n\tsteps: []\n").await.unwrap_err() else {
        panic!("expected a recipe error")
    };
    assert!(errs.0.iter().any(|x| x.line == Some(2)), "{errs:?}");
    assert!(matches!(h.orch.create_recipe(None, "").await, Err(Error::Recipe(_))));
    assert_eq!(h.store.recipe_list(Page::default()).await.unwrap().len(), 2);
    assert!(matches!(h.store.recipe_get(RecipeId::new()).await, Err(StoreError::NotFound { .. })));
    let e = h.orch.create_recipe(Some(ProjectId::new()), RECIPE).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::NotFound { .. })), "{e:?}");
}

/// A recipe is attached at creation or with `attach_recipe` (an unknown recipe id is `Invalid` either
/// way) and its spec is delivered in the claim's `Assignment.recipe`; items without one get `None`.
pub async fn flow_recipe_attach_and_claim(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let r = h.orch.create_recipe(Some(p.id), RECIPE).await.unwrap();
    let e = h
        .orch
        .create_work_item(CreateWorkItem { recipe_id: Some(RecipeId::new()), ..create(p.id, "bad") })
        .await
        .unwrap_err();
    assert!(is_store_invalid(&e), "{e:?}");
    assert!(items_of(&h, p.id).await.is_empty());

    let with = h
        .orch
        .create_work_item(CreateWorkItem { recipe_id: Some(r.id), priority: 2, ..create(p.id, "with") })
        .await
        .unwrap()
        .work_item;
    assert_eq!(with.recipe_id, Some(r.id));
    let later = h.item(p.id, "later").await;
    let plain = h.item(p.id, "plain").await;
    let e = h.orch.attach_recipe(later.id, RecipeId::new()).await.unwrap_err();
    assert!(is_store_invalid(&e), "{e:?}");
    assert_eq!(h.store.work_item_get(later.id).await.unwrap().recipe_id, None);
    let ch = h.orch.attach_recipe(later.id, r.id).await.unwrap();
    assert_eq!(ch.work_item.recipe_id, Some(r.id));
    assert_ne!(ch.work_item.content_hash, later.content_hash);
    assert!(ch.approval.is_none());
    assert_eq!(h.store.work_item_get(later.id).await.unwrap().recipe_id, Some(r.id));

    for (id, prio) in [(with.id, 3), (later.id, 2), (plain.id, 1)] {
        h.orch.enqueue(id, EnqueueOptions { priority: Some(prio), ..Default::default() }).await.unwrap();
    }
    let got = h.claim("agent-1", 3).await;
    assert_eq!(got.iter().map(|a| a.claimed.work_item.id).collect::<Vec<_>>(), vec![with.id, later.id, plain.id]);
    assert_eq!(got[0].recipe.as_ref(), Some(&r.spec));
    assert_eq!(got[1].recipe.as_ref(), Some(&r.spec));
    assert_eq!(got[2].recipe, None);
    assert!(got.iter().all(|a| a.answers.is_empty() && !a.claimed.resumed));

    // Detaching is an edit of a ready item.
    let other = h
        .orch
        .create_work_item(CreateWorkItem { recipe_id: Some(r.id), ..create(p.id, "detach") })
        .await
        .unwrap()
        .work_item;
    let ch =
        h.orch.update_work_item(other.id, UpdateWorkItem { detach_recipe: true, ..Default::default() }).await.unwrap();
    assert_eq!(ch.work_item.recipe_id, None);
}

// ---- info requests ----

/// The full info-request round trip with a keyring: questions put the run and item in `waiting_input`
/// (nothing claimable, lease released); answers are stored encrypted; the last answer makes the item
/// claimable again (resumed, notifier bumped); the resuming claim gets the same run with token + 1, the
/// decrypted answers with their secret flags and the resume point; the old token is fenced out.
pub async fn flow_info_request_round_trip(store: Arc<dyn Store>) {
    let key = SecretKey::generate();
    let h = Harness::with_config(store, |c| c.keyring = Some(keyring("k1", &key)));
    let p = h.project().await;
    let w = h.queued(p.id, "needs input", 0, &[]).await;
    let a = h.claim_one("agent-1").await;
    let (run_id, tok) = (a.run_id(), a.token());
    assert_eq!(tok, 1);
    h.orch.start(run_id, tok).await.unwrap();
    h.orch
        .record_steps(
            run_id,
            tok,
            vec![step(StepEventKind::Started, Some(0), "s0"), step(StepEventKind::Succeeded, Some(0), "s0")],
        )
        .await
        .unwrap();
    assert_eq!(h.store.run_get(run_id).await.unwrap().last_completed_step, Some(0));

    h.clock.advance(chrono::Duration::seconds(4));
    let qs = ask(&h, &a, vec![question("NAME", InputKind::Text), question("TOKEN", InputKind::Secret)]).await;
    assert_eq!(qs.len(), 2);
    for (q, (k, kind)) in qs.iter().zip([("NAME", InputKind::Text), ("TOKEN", InputKind::Secret)]) {
        assert_eq!(q.key, k);
        assert_eq!(q.kind, kind);
        assert_eq!(q.state, InfoRequestState::Pending);
        assert_eq!(q.run_id, run_id);
        assert_eq!(q.work_item_id, w.id);
        assert_eq!(q.project_id, p.id);
        assert_eq!(q.created_at, h.clock.now());
        assert!(q.answer.is_none() && q.answered_at.is_none() && q.answered_by.is_none());
        assert_eq!(&h.store.info_request_get(q.id).await.unwrap(), q);
    }
    let run = h.store.run_get(run_id).await.unwrap();
    assert_eq!(run.state, RunState::WaitingInput);
    assert_eq!(run.last_completed_step, Some(0));
    assert_eq!(h.state_of(w.id).await, WorkItemState::WaitingInput);
    assert!(h.claim("agent-2", 10).await.is_empty());
    let listed =
        h.store.info_request_list(InfoRequestFilter { run_id: Some(run_id), ..Default::default() }).await.unwrap();
    assert_eq!(listed.iter().map(|q| q.id).collect::<Vec<_>>(), vec![qs[0].id, qs[1].id]);

    // One answer of two: still waiting.
    h.clock.advance(chrono::Duration::seconds(60));
    let r1 = h.orch.answer_info_request(qs[0].id, "alice-plaintext", "human").await.unwrap();
    assert!(!r1.resumed);
    assert_eq!(r1.request.state, InfoRequestState::Answered);
    assert_eq!(r1.request.answered_by.as_deref(), Some("human"));
    assert_eq!(r1.request.answered_at, Some(h.clock.now()));
    assert_eq!(h.state_of(w.id).await, WorkItemState::WaitingInput);
    assert!(h.claim("agent-2", 10).await.is_empty());

    // Stored encrypted: the ciphertext never contains the plaintext.
    let secret = "s3cr3t-v4lue-do-not-leak";
    let gen = h.store.notifier().generation();
    let r2 = h.orch.answer_info_request(qs[1].id, secret, "human").await.unwrap();
    assert!(r2.resumed);
    assert!(h.store.notifier().generation() > gen, "answering the last question must wake claimers");
    for (id, plain) in [(qs[0].id, "alice-plaintext"), (qs[1].id, secret)] {
        let stored = h.store.info_request_get(id).await.unwrap();
        assert_eq!(stored.state, InfoRequestState::Answered);
        let sealed = stored.answer.clone().expect("stored answer");
        assert!(sealed.is_encrypted());
        assert_eq!(sealed.key_id.as_deref(), Some("k1"));
        assert!(!contains_bytes(&sealed.ciphertext, plain.as_bytes()));
        assert!(!contains_bytes(&sealed.encode().into_bytes(), plain.as_bytes()));
        assert_eq!(h.orch.reveal_answer(&stored).unwrap().as_deref(), Some(plain));
    }
    // A sealed answer is bound to its request: moved onto another request it does not open.
    let mut swapped = h.store.info_request_get(qs[0].id).await.unwrap();
    swapped.answer = h.store.info_request_get(qs[1].id).await.unwrap().answer;
    assert!(matches!(h.orch.reveal_answer(&swapped), Err(Error::Crypto(_))));
    assert_eq!(h.state_of(w.id).await, WorkItemState::Queued);

    h.clock.advance(chrono::Duration::seconds(1));
    let b = h.claim_one("agent-2").await;
    assert!(b.claimed.resumed);
    assert_eq!(b.run_id(), run_id);
    assert_eq!(b.token(), tok + 1);
    assert_eq!(b.claimed.run.state, RunState::Claimed);
    assert_eq!(b.claimed.run.attempt, 1);
    assert_eq!(b.claimed.run.agent_id, "agent-2");
    assert_eq!(b.claimed.run.last_completed_step, Some(0));
    assert_eq!(b.claimed.work_item.state, WorkItemState::Running);
    assert_eq!(b.claimed.work_item.attempts, 1);
    assert_eq!(b.claimed.lease.expires_at, h.clock.now() + chrono::Duration::seconds(30));
    assert_eq!(b.answers.len(), 2);
    let name = &b.answers["NAME"];
    assert_eq!((name.value.as_str(), name.secret), ("alice-plaintext", false));
    let token = &b.answers["TOKEN"];
    assert_eq!((token.value.as_str(), token.secret), (secret, true));
    assert!(!format!("{:?}", b.answers).contains(secret), "secret answers are redacted in Debug");
    assert_eq!(h.store.run_list(RunFilter { work_item_id: Some(w.id), ..Default::default() }).await.unwrap().len(), 1);

    // The old token is fenced out everywhere; the new one works.
    assert!(is_lease_lost(&h.orch.heartbeat(run_id, tok).await.unwrap_err()));
    assert!(is_lease_lost(&h.orch.append_logs(run_id, tok, vec![line(LogStream::Stdout, "stale")]).await.unwrap_err()));
    assert!(is_lease_lost(
        &h.orch.record_steps(run_id, tok, vec![step(StepEventKind::Info, None, "stale")]).await.unwrap_err()
    ));
    assert!(is_lease_lost(&h.orch.ask(run_id, tok, vec![question("X", InputKind::Text)]).await.unwrap_err()));
    assert!(matches!(
        h.store.info_answers_for_run(run_id, tok, h.clock.now()).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let e = h.orch.complete(run_id, tok, RunOutcome::Succeeded { exit_code: Some(0) }, None).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert!(h.store.logs_read_after(run_id, 0, 100).await.unwrap().is_empty());
    assert_eq!(h.store.info_answers_for_run(run_id, b.token(), h.clock.now()).await.unwrap().len(), 2);
    h.orch.heartbeat(run_id, b.token()).await.unwrap();
    h.orch.start(run_id, b.token()).await.unwrap();
    let done = h.succeed(&b).await;
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.work_item_state, WorkItemState::Succeeded);
}

/// Without a keyring a secret answer is refused with `EncryptionKeyMissing` (the request stays pending,
/// nothing stored), while a text answer is stored plain and readable through `reveal_answer` — but not
/// through a facade that has a keyring (plain values are refused once a key is configured).
pub async fn flow_info_secret_needs_keyring(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "no key").await;
    let qs = ask(&h, &a, vec![question("PASSWORD", InputKind::Secret), question("NOTE", InputKind::Text)]).await;
    let e = h.orch.answer_info_request(qs[0].id, "hunter2", "human").await.unwrap_err();
    assert!(matches!(e, Error::EncryptionKeyMissing), "{e:?}");
    let pending = h.store.info_request_get(qs[0].id).await.unwrap();
    assert_eq!(pending.state, InfoRequestState::Pending);
    assert!(pending.answer.is_none() && pending.answered_by.is_none());

    let r = h.orch.answer_info_request(qs[1].id, "plain note", "human").await.unwrap();
    assert!(!r.resumed, "the secret is still unanswered");
    let stored = h.store.info_request_get(qs[1].id).await.unwrap();
    let sealed = stored.answer.clone().expect("answer");
    assert!(!sealed.is_encrypted());
    assert_eq!(sealed.ciphertext, b"plain note".to_vec());
    assert_eq!(h.orch.reveal_answer(&stored).unwrap().as_deref(), Some("plain note"));
    assert_eq!(h.orch.reveal_answer(&pending).unwrap(), None);
    assert_eq!(h.state_of(a.claimed.work_item.id).await, WorkItemState::WaitingInput);
    assert!(h.claim("agent-2", 10).await.is_empty());

    // An encrypted answer cannot be revealed without the key.
    let keyed = Harness::with_config(h.store.clone(), |c| c.keyring = Some(keyring("k1", &SecretKey::generate())));
    let r = keyed.orch.answer_info_request(qs[0].id, "hunter2", "human").await.unwrap();
    assert!(r.resumed);
    let sealed_secret = h.store.info_request_get(qs[0].id).await.unwrap();
    assert!(matches!(h.orch.reveal_answer(&sealed_secret), Err(Error::EncryptionKeyMissing)));
    assert_eq!(keyed.orch.reveal_answer(&sealed_secret).unwrap().as_deref(), Some("hunter2"));
    // The keyed facade refuses the plain text answer: it carries no associated data binding it to its row.
    let e = keyed.orch.reveal_answer(&stored).unwrap_err();
    assert!(matches!(e, Error::Crypto(crate::crypto::CryptoError::Unencrypted)), "{e:?}");
}

/// Choice questions accept only one of their choices (`Invalid` otherwise, request left pending);
/// question validation refuses an empty list, a choice without choices and choices on a text question,
/// leaving the run untouched.
pub async fn flow_info_choice_and_validation(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "choose").await;
    let bad_sets = vec![
        vec![],
        vec![choice_question("ENV", &[])],
        vec![NewInfoRequest { choices: vec!["x".into()], ..question("T", InputKind::Text) }],
        vec![NewInfoRequest { key: " ".into(), ..question("T", InputKind::Text) }],
        vec![NewInfoRequest { prompt: "".into(), ..question("T", InputKind::Text) }],
    ];
    for qs in bad_sets {
        let e = h.orch.ask(a.run_id(), a.token(), qs).await.unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    }
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Claimed);
    assert_eq!(h.state_of(a.claimed.work_item.id).await, WorkItemState::Running);
    assert!(h.store.info_request_list(InfoRequestFilter::default()).await.unwrap().is_empty());
    // The store itself refuses an empty question list.
    let e = h
        .store
        .info_requests_create(InfoAsk {
            run_id: a.run_id(),
            token: a.token(),
            questions: vec![],
            usage: None,
            now: h.clock.now(),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid { .. }), "{e:?}");
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Claimed);

    let qs = ask(&h, &a, vec![choice_question("ENV", &["staging", "prod"])]).await;
    assert_eq!(qs[0].choices, vec!["staging".to_string(), "prod".to_string()]);
    for wrong in ["dev", "Prod", "", "staging "] {
        let e = h.orch.answer_info_request(qs[0].id, wrong, "human").await.unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{wrong:?}: {e:?}");
    }
    assert_eq!(h.store.info_request_get(qs[0].id).await.unwrap().state, InfoRequestState::Pending);
    let r = h.orch.answer_info_request(qs[0].id, "prod", "human").await.unwrap();
    assert!(r.resumed);
    let b = h.claim_one("agent-1").await;
    assert!(b.claimed.resumed);
    assert_eq!(b.answers["ENV"].value, "prod");
    assert!(!b.answers["ENV"].secret);
}

/// Answering twice is `Conflict` (facade and store), answering an unknown id is `NotFound`, and
/// `info_request_list` filters by state, run and project.
pub async fn flow_info_answer_twice_and_list(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    h.queued(p.id, "one", 1, &[]).await;
    h.queued(p.id, "two", 0, &[]).await;
    let got = h.claim("agent-1", 2).await;
    assert_eq!(got.len(), 2);
    let q1 = ask(&h, &got[0], vec![question("A", InputKind::Text), question("B", InputKind::Text)]).await;
    let q2 = ask(&h, &got[1], vec![question("C", InputKind::Text)]).await;

    h.orch.answer_info_request(q1[0].id, "first", "human").await.unwrap();
    let e = h.orch.answer_info_request(q1[0].id, "second", "human").await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    let e = h
        .store
        .info_request_answer(InfoAnswer {
            id: q1[0].id,
            answer: crate::crypto::SealedValue::plain(b"again"),
            answered_by: "x".into(),
            now: h.clock.now(),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    assert_eq!(
        h.orch.reveal_answer(&h.store.info_request_get(q1[0].id).await.unwrap()).unwrap().as_deref(),
        Some("first")
    );
    let e = h.orch.answer_info_request(InfoRequestId::new(), "x", "human").await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::NotFound { .. })), "{e:?}");
    let e = h
        .store
        .info_request_answer(InfoAnswer {
            id: InfoRequestId::new(),
            answer: crate::crypto::SealedValue::plain(b"x"),
            answered_by: "x".into(),
            now: h.clock.now(),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
    assert!(matches!(h.store.info_request_get(InfoRequestId::new()).await, Err(StoreError::NotFound { .. })));
    assert!(h.orch.answer_info_request(q1[1].id, "x", " ").await.is_err());

    let ids = |v: Vec<InfoRequest>| v.into_iter().map(|q| q.id).collect::<Vec<_>>();
    let list = |f: InfoRequestFilter| {
        let h = h.clone();
        async move { ids(h.store.info_request_list(f).await.unwrap()) }
    };
    assert_eq!(list(InfoRequestFilter::default()).await, vec![q1[0].id, q1[1].id, q2[0].id]);
    assert_eq!(
        list(InfoRequestFilter { state: Some(InfoRequestState::Pending), ..Default::default() }).await,
        vec![q1[1].id, q2[0].id]
    );
    assert_eq!(
        list(InfoRequestFilter { state: Some(InfoRequestState::Answered), ..Default::default() }).await,
        vec![q1[0].id]
    );
    assert_eq!(list(InfoRequestFilter { run_id: Some(got[1].run_id()), ..Default::default() }).await, vec![q2[0].id]);
    assert_eq!(
        list(InfoRequestFilter {
            run_id: Some(got[0].run_id()),
            state: Some(InfoRequestState::Pending),
            ..Default::default()
        })
        .await,
        vec![q1[1].id]
    );
    assert_eq!(list(InfoRequestFilter { project_id: Some(p.id), ..Default::default() }).await.len(), 3);
    assert!(list(InfoRequestFilter { project_id: Some(ProjectId::new()), ..Default::default() }).await.is_empty());
    assert!(list(InfoRequestFilter { run_id: Some(RunId::new()), ..Default::default() }).await.is_empty());
    assert_eq!(
        list(InfoRequestFilter { page: Page { limit: 1, after: Some(q1[0].id.0) }, ..Default::default() }).await,
        vec![q1[1].id]
    );
    assert_eq!(h.store.stats().await.unwrap().pending_info_requests, 2);
}

/// Asking is fenced: a wrong token or an expired lease is `LeaseLost` and changes nothing; after a
/// successful ask the lease is released, so every write with the old token is `LeaseLost`.
pub async fn flow_info_ask_fenced(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "fenced").await;
    let e = h.orch.ask(a.run_id(), a.token() + 1, vec![question("X", InputKind::Text)]).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Claimed);
    assert_eq!(h.state_of(a.claimed.work_item.id).await, WorkItemState::Running);
    assert!(h.store.info_request_list(InfoRequestFilter::default()).await.unwrap().is_empty());
    let e = h.orch.ask(RunId::new(), 1, vec![question("X", InputKind::Text)]).await.unwrap_err();
    assert!(
        matches!(e, Error::Store(StoreError::NotFound { .. }) | Error::Store(StoreError::LeaseLost { .. })),
        "{e:?}"
    );

    // The lease expires at claim + 30 s (expires_at <= now is expired).
    h.clock.advance(chrono::Duration::seconds(30));
    let e = h.orch.ask(a.run_id(), a.token(), vec![question("X", InputKind::Text)]).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert!(h.store.info_request_list(InfoRequestFilter::default()).await.unwrap().is_empty());
    assert_eq!(h.state_of(a.claimed.work_item.id).await, WorkItemState::Running);

    let b = claimed(&h, "asks").await;
    h.orch.heartbeat(b.run_id(), b.token()).await.unwrap();
    ask(&h, &b, vec![question("X", InputKind::Text)]).await;
    let run = h.store.run_get(b.run_id()).await.unwrap();
    assert_eq!(run.state, RunState::WaitingInput);
    assert_eq!(run.lease_token, b.token());
    let (rid, tok) = (b.run_id(), b.token());
    assert!(is_lease_lost(&h.orch.heartbeat(rid, tok).await.unwrap_err()));
    assert!(is_lease_lost(&h.orch.start(rid, tok).await.unwrap_err()));
    assert!(is_lease_lost(&h.orch.append_logs(rid, tok, vec![line(LogStream::Stdout, "x")]).await.unwrap_err()));
    assert!(is_lease_lost(
        &h.orch.record_steps(rid, tok, vec![step(StepEventKind::Info, None, "x")]).await.unwrap_err()
    ));
    assert!(is_lease_lost(&h.orch.ask(rid, tok, vec![question("Y", InputKind::Text)]).await.unwrap_err()));
    let e = h.orch.complete(rid, tok, RunOutcome::Succeeded { exit_code: None }, None).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert_eq!(
        h.store.info_request_list(InfoRequestFilter { run_id: Some(rid), ..Default::default() }).await.unwrap().len(),
        1
    );
    // A waiting run holds no lease, so it is never reaped.
    h.clock.advance(chrono::Duration::seconds(3600));
    let report = h.orch.tick().await.unwrap();
    assert!(report.reaped.iter().all(|r| r.run_id != rid));
    assert_eq!(h.store.run_get(rid).await.unwrap().state, RunState::WaitingInput);
    assert_eq!(h.state_of(b.claimed.work_item.id).await, WorkItemState::WaitingInput);
}

/// Cancelling a work item that waits for input cancels its run and its pending info requests (answered
/// ones stay answered); answering a cancelled request is refused and nothing becomes claimable.
pub async fn flow_info_cancel_waiting_item(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "cancel me").await;
    let wid = a.claimed.work_item.id;
    let qs = ask(&h, &a, vec![question("A", InputKind::Text), question("B", InputKind::Text)]).await;
    h.orch.answer_info_request(qs[0].id, "kept", "human").await.unwrap();
    let c = h.orch.cancel_work_item(wid, Some("not needed".into())).await.unwrap();
    assert_eq!(c.state, WorkItemState::Cancelled);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Cancelled);
    assert_eq!(h.store.info_request_get(qs[0].id).await.unwrap().state, InfoRequestState::Answered);
    assert_eq!(h.store.info_request_get(qs[1].id).await.unwrap().state, InfoRequestState::Cancelled);
    let e = h.orch.answer_info_request(qs[1].id, "late", "human").await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    let e = h
        .store
        .info_request_answer(InfoAnswer {
            id: qs[1].id,
            answer: crate::crypto::SealedValue::plain(b"late"),
            answered_by: "x".into(),
            now: h.clock.now(),
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    let cancelled = h.store.info_request_get(qs[1].id).await.unwrap();
    assert!(cancelled.answer.is_none());
    assert_eq!(h.state_of(wid).await, WorkItemState::Cancelled);
    assert!(h.claim("agent-2", 10).await.is_empty());
    let pending = h
        .store
        .info_request_list(InfoRequestFilter { state: Some(InfoRequestState::Pending), ..Default::default() })
        .await
        .unwrap();
    assert!(pending.is_empty());
    assert_eq!(h.store.stats().await.unwrap().pending_info_requests, 0);
}

/// A resumed run may ask again: the second resume gets token + 2, the same run and attempt, and the
/// answers of both rounds; question deadlines are stored as given.
pub async fn flow_info_second_round(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "two rounds").await;
    let deadline = h.clock.now() + chrono::Duration::hours(2);
    let q1 = ask(&h, &a, vec![NewInfoRequest { deadline: Some(deadline), ..question("FIRST", InputKind::Text) }]).await;
    assert_eq!(q1[0].deadline, Some(deadline));
    assert_eq!(h.store.info_request_get(q1[0].id).await.unwrap().deadline, Some(deadline));
    assert!(h.orch.answer_info_request(q1[0].id, "one", "human").await.unwrap().resumed);
    let b = h.claim_one("agent-1").await;
    assert!(b.claimed.resumed);
    assert_eq!((b.run_id(), b.token()), (a.run_id(), a.token() + 1));
    assert_eq!(b.answers.keys().collect::<Vec<_>>(), vec!["FIRST"]);
    h.orch.record_steps(b.run_id(), b.token(), vec![step(StepEventKind::Succeeded, Some(1), "s1")]).await.unwrap();

    let q2 = ask(&h, &b, vec![question("SECOND", InputKind::Text)]).await;
    assert_eq!(h.state_of(a.claimed.work_item.id).await, WorkItemState::WaitingInput);
    assert!(h.claim("agent-1", 5).await.is_empty());
    assert!(h.orch.answer_info_request(q2[0].id, "two", "human").await.unwrap().resumed);
    let c = h.claim_one("agent-2").await;
    assert!(c.claimed.resumed);
    assert_eq!((c.run_id(), c.token()), (a.run_id(), a.token() + 2));
    assert_eq!(c.claimed.run.attempt, 1);
    assert_eq!(c.claimed.work_item.attempts, 1);
    assert_eq!(c.claimed.run.last_completed_step, Some(1));
    assert_eq!(c.answers["FIRST"].value, "one");
    assert_eq!(c.answers["SECOND"].value, "two");
    assert!(is_lease_lost(&h.orch.heartbeat(b.run_id(), b.token()).await.unwrap_err()));
    assert_eq!(h.store.run_list(RunFilter::default()).await.unwrap().len(), 1);
    h.succeed(&c).await;
}

/// Requeueing the run of an item that waits for input cancels the run and its pending questions; the
/// item is claimable again as a new attempt (a new run, not a resume, no answers). Requeueing the item
/// itself while its run waits is a `Conflict`; cancelling the waiting run cancels its questions.
pub async fn flow_info_requeue_waiting_run(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "requeue me").await;
    let wid = a.claimed.work_item.id;
    let qs = ask(&h, &a, vec![question("A", InputKind::Text)]).await;
    let e = h.orch.requeue_work_item(wid, Default::default()).await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    assert_eq!(h.state_of(wid).await, WorkItemState::WaitingInput);

    let w = h.orch.requeue_run(a.run_id(), Default::default()).await.unwrap();
    assert_eq!(w.state, WorkItemState::Queued);
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Cancelled);
    assert_eq!(h.store.info_request_get(qs[0].id).await.unwrap().state, InfoRequestState::Cancelled);
    let e = h.orch.answer_info_request(qs[0].id, "late", "human").await.unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::Conflict { .. })), "{e:?}");
    let b = h.claim_one("agent-2").await;
    assert!(!b.claimed.resumed);
    assert_ne!(b.run_id(), a.run_id());
    assert_eq!(b.token(), 1);
    assert_eq!(b.claimed.run.attempt, 2);
    assert_eq!(b.claimed.run.last_completed_step, None);
    assert!(b.answers.is_empty());

    // Cancelling a waiting run cancels its item and questions.
    let qs = ask(&h, &b, vec![question("B", InputKind::Text)]).await;
    let r = h.orch.cancel_run(b.run_id(), Some("stop".into())).await.unwrap();
    assert_eq!(r.state, RunState::Cancelled);
    assert_eq!(h.state_of(wid).await, WorkItemState::Cancelled);
    assert_eq!(h.store.info_request_get(qs[0].id).await.unwrap().state, InfoRequestState::Cancelled);
    assert!(h.claim("agent-2", 5).await.is_empty());
}

// ---- logs ----

/// Log lines get per-run sequence numbers from 1 without gaps across batches; `logs_read_after` pages
/// with `after` and `limit`; streams and text are preserved; an unknown run is `NotFound`.
pub async fn flow_logs_append_and_page(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "logs").await;
    let (rid, tok) = (a.run_id(), a.token());
    assert!(h.store.logs_read_after(rid, 0, 100).await.unwrap().is_empty());
    let first = vec![line(LogStream::Stdout, "one"), line(LogStream::Stderr, "two"), line(LogStream::System, "three")];
    assert_eq!(h.orch.append_logs(rid, tok, first).await.unwrap(), 3);
    h.clock.advance(chrono::Duration::seconds(1));
    let t2 = h.clock.now();
    assert_eq!(
        h.orch
            .append_logs(rid, tok, vec![line(LogStream::Stdout, "four"), line(LogStream::Stdout, "fünf ✓")])
            .await
            .unwrap(),
        5
    );

    let all = h.store.logs_read_after(rid, 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(all.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), vec!["one", "two", "three", "four", "fünf ✓"]);
    assert_eq!(
        all.iter().map(|l| l.stream).collect::<Vec<_>>(),
        vec![LogStream::Stdout, LogStream::Stderr, LogStream::System, LogStream::Stdout, LogStream::Stdout]
    );
    assert!(all.iter().all(|l| l.run_id == rid));
    assert_eq!(all[3].at, t2);
    let page = h.store.logs_read_after(rid, 2, 2).await.unwrap();
    assert_eq!(page.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(page, all[2..4].to_vec());
    assert_eq!(h.store.logs_read_after(rid, 4, 100).await.unwrap(), all[4..].to_vec());
    assert!(h.store.logs_read_after(rid, 5, 100).await.unwrap().is_empty());
    assert!(h.store.logs_read_after(rid, 500, 100).await.unwrap().is_empty());
    assert!(matches!(h.store.logs_read_after(RunId::new(), 0, 100).await, Err(StoreError::NotFound { .. })));

    // Another run of another item has its own sequence.
    let b = claimed(&h, "other logs").await;
    assert_eq!(h.orch.append_logs(b.run_id(), b.token(), vec![line(LogStream::Stdout, "b1")]).await.unwrap(), 1);
    assert_eq!(h.store.logs_read_after(rid, 0, 100).await.unwrap().len(), 5);
    // Logs stay readable after the run finished; appending then is fenced.
    h.succeed(&a).await;
    assert_eq!(h.store.logs_read_after(rid, 0, 100).await.unwrap(), all);
    let e = h.orch.append_logs(rid, tok, vec![line(LogStream::Stdout, "late")]).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert_eq!(h.store.logs_read_after(rid, 0, 100).await.unwrap().len(), 5);
}

/// Eight concurrent appenders on one run: every line is stored once, sequence numbers run from 1 without
/// gaps, and each appender's lines keep their order.
pub async fn flow_logs_concurrent_appenders(store: Arc<dyn Store>) {
    const TASKS: usize = 8;
    const CALLS: usize = 10;
    const LINES: usize = 5;
    let h = Harness::new(store);
    let a = claimed(&h, "busy logs").await;
    let (rid, tok) = (a.run_id(), a.token());
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let orch: Orchestrator = h.orch.clone();
        handles.push(tokio::spawn(async move {
            let mut lasts = Vec::new();
            for c in 0..CALLS {
                let lines = (0..LINES).map(|i| line(LogStream::Stdout, &format!("t{t}-c{c}-l{i}"))).collect();
                lasts.push(orch.append_logs(rid, tok, lines).await.expect("append"));
            }
            lasts
        }));
    }
    let mut lasts = Vec::new();
    for hd in handles {
        lasts.extend(hd.await.expect("task"));
    }
    let total = (TASKS * CALLS * LINES) as u64;
    lasts.sort_unstable();
    lasts.dedup();
    assert_eq!(lasts.len(), TASKS * CALLS, "every call returns its own last seq");
    assert_eq!(lasts.last().copied(), Some(total));
    let all = all_logs(&h, rid).await;
    assert_eq!(all.len() as u64, total);
    assert_eq!(all.iter().map(|l| l.seq).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    for t in 0..TASKS {
        let prefix = format!("t{t}-");
        let mine: Vec<&str> = all.iter().filter(|l| l.line.starts_with(&prefix)).map(|l| l.line.as_str()).collect();
        let expected: Vec<String> =
            (0..CALLS).flat_map(|c| (0..LINES).map(move |i| format!("t{t}-c{c}-l{i}"))).collect();
        assert_eq!(mine, expected.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

/// Log appends are fenced (wrong token, expired lease: `LeaseLost`, nothing written) and overly long
/// lines are truncated by the facade at a character boundary with a marker.
pub async fn flow_logs_fenced_and_truncated(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "fenced logs").await;
    let (rid, tok) = (a.run_id(), a.token());
    let e = h.orch.append_logs(rid, tok + 1, vec![line(LogStream::Stdout, "x")]).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    let e = h
        .store
        .logs_append(LogAppend { run_id: rid, token: 0, lines: vec![line(LogStream::Stdout, "x")], now: h.clock.now() })
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::LeaseLost { .. }), "{e:?}");
    assert!(h.store.logs_read_after(rid, 0, 100).await.unwrap().is_empty());
    let e = h.orch.append_logs(RunId::new(), 1, vec![line(LogStream::Stdout, "x")]).await.unwrap_err();
    assert!(
        matches!(e, Error::Store(StoreError::NotFound { .. }) | Error::Store(StoreError::LeaseLost { .. })),
        "{e:?}"
    );

    let max = rules::MAX_LOG_LINE_LEN;
    let long = "x".repeat(max + 50);
    // A multi-byte character straddling the limit.
    let wide = format!("a{}", "é".repeat(max / 2 + 10));
    let exact = "y".repeat(max);
    assert_eq!(
        h.orch
            .append_logs(
                rid,
                tok,
                vec![line(LogStream::Stdout, &long), line(LogStream::Stderr, &wide), line(LogStream::Stdout, &exact)]
            )
            .await
            .unwrap(),
        3
    );
    let got = h.store.logs_read_after(rid, 0, 100).await.unwrap();
    assert_eq!(got.len(), 3);
    let marker = " [truncated]";
    assert_eq!(got[0].line, format!("{}{marker}", "x".repeat(max)));
    assert!(got[1].line.ends_with(marker));
    assert!(got[1].line.len() <= max + marker.len());
    assert!(wide.starts_with(got[1].line.trim_end_matches(marker)));
    assert_eq!(got[2].line, exact, "a line of exactly the maximum is kept");

    // Expired lease: LeaseLost, nothing written.
    h.clock.advance(chrono::Duration::seconds(31));
    let e = h.orch.append_logs(rid, tok, vec![line(LogStream::Stdout, "too late")]).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert_eq!(h.store.logs_read_after(rid, 0, 100).await.unwrap().len(), 3);
}

// ---- step events ----

/// Step events get per-run sequence numbers from 1, are read after a sequence number, keep every kind,
/// name, index and JSON detail; `succeeded` events with an index advance the run's resume point (never
/// backwards); appends are fenced and an unknown run is `NotFound`.
pub async fn flow_step_events(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let a = claimed(&h, "steps").await;
    let (rid, tok) = (a.run_id(), a.token());
    assert!(h.store.step_events_read_after(rid, 0, 100).await.unwrap().is_empty());
    let detail = serde_json::json!({
        "planner": "recipe",
        "steps": [{"run": "echo hi", "timeout": 600}, {"run": "cargo test", "env": {"RUST_LOG": "debug"}}],
        "nested": {"flag": true, "none": null, "n": -3, "text": "ünïcödé ✓"},
    });
    let events = vec![
        NewStepEvent { detail: detail.clone(), ..step(StepEventKind::Planned, None, "plan") },
        step(StepEventKind::Started, Some(0), "echo hi"),
        step(StepEventKind::Succeeded, Some(0), "echo hi"),
        step(StepEventKind::Started, Some(1), "cargo test"),
        NewStepEvent {
            detail: serde_json::json!({"exit_code": 101, "stderr_tail": ["a", "b"]}),
            ..step(StepEventKind::Failed, Some(1), "cargo test")
        },
        step(StepEventKind::Skipped, Some(2), "deploy"),
        NewStepEvent { detail: serde_json::json!("free text"), ..step(StepEventKind::Info, None, "note") },
    ];
    let stored = h.orch.record_steps(rid, tok, events.clone()).await.unwrap();
    assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=7).collect::<Vec<u64>>());
    for (s, e) in stored.iter().zip(&events) {
        assert_eq!(s.run_id, rid);
        assert_eq!(s.kind, e.kind);
        assert_eq!(s.name, e.name);
        assert_eq!(s.step_index, e.step_index);
        assert_eq!(s.detail, e.detail);
        assert_eq!(s.at, h.clock.now());
    }
    assert_eq!(h.store.step_events_read_after(rid, 0, 100).await.unwrap(), stored);
    assert_eq!(h.store.step_events_read_after(rid, 3, 2).await.unwrap(), stored[3..5].to_vec());
    assert!(h.store.step_events_read_after(rid, 7, 100).await.unwrap().is_empty());
    assert_eq!(h.store.run_get(rid).await.unwrap().last_completed_step, Some(0));

    let more = h
        .orch
        .record_steps(
            rid,
            tok,
            vec![step(StepEventKind::Succeeded, Some(2), "deploy"), step(StepEventKind::Succeeded, Some(1), "retry")],
        )
        .await
        .unwrap();
    assert_eq!(more.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![8, 9]);
    assert_eq!(h.store.run_get(rid).await.unwrap().last_completed_step, Some(2));
    // A succeeded event without an index, or other kinds with an index, do not move the resume point.
    h.orch
        .record_steps(
            rid,
            tok,
            vec![
                step(StepEventKind::Succeeded, None, "x"),
                step(StepEventKind::Started, Some(5), "y"),
                step(StepEventKind::Failed, Some(5), "y"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(h.store.run_get(rid).await.unwrap().last_completed_step, Some(2));
    h.orch.record_steps(rid, tok, vec![step(StepEventKind::Succeeded, Some(0), "old")]).await.unwrap();
    assert_eq!(h.store.run_get(rid).await.unwrap().last_completed_step, Some(2), "the resume point never moves back");

    let e =
        h.orch.record_steps(rid, tok + 1, vec![step(StepEventKind::Succeeded, Some(9), "stale")]).await.unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert_eq!(h.store.step_events_read_after(rid, 0, 100).await.unwrap().len(), 13);
    assert_eq!(h.store.run_get(rid).await.unwrap().last_completed_step, Some(2));
    assert!(matches!(h.store.step_events_read_after(RunId::new(), 0, 10).await, Err(StoreError::NotFound { .. })));
    h.succeed(&a).await;
    assert!(is_lease_lost(
        &h.orch.record_steps(rid, tok, vec![step(StepEventKind::Info, None, "late")]).await.unwrap_err()
    ));
    assert_eq!(h.store.step_events_read_after(rid, 12, 100).await.unwrap().len(), 1);
}

// ---- runs ----

/// `run_list` filters by work item, state and agent (combined) and pages; `run_get` of an unknown id is
/// `NotFound`.
pub async fn flow_run_list_filters(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w1 = h.queued(p.id, "one", 2, &[]).await;
    let w2 = h.queued(p.id, "two", 1, &[]).await;
    let a1 = h.claim_one("agent-a").await;
    let a2 = h.claim_one("agent-b").await;
    assert_eq!((a1.claimed.work_item.id, a2.claimed.work_item.id), (w1.id, w2.id));
    h.succeed(&a1).await;
    let failed = h.fail(&a2).await;
    assert_eq!(failed.work_item_state, WorkItemState::Retrying);
    h.clock.advance(chrono::Duration::seconds(10));
    let a3 = h.claim_one("agent-a").await;
    assert_eq!(a3.claimed.work_item.id, w2.id);
    assert_eq!(a3.claimed.run.attempt, 2);

    let ids = |v: Vec<Run>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let list = |f: RunFilter| {
        let h = h.clone();
        async move { ids(h.store.run_list(f).await.unwrap()) }
    };
    let (r1, r2, r3) = (a1.run_id(), a2.run_id(), a3.run_id());
    assert_eq!(list(RunFilter::default()).await, vec![r1, r2, r3]);
    assert_eq!(list(RunFilter { work_item_id: Some(w1.id), ..Default::default() }).await, vec![r1]);
    assert_eq!(list(RunFilter { work_item_id: Some(w2.id), ..Default::default() }).await, vec![r2, r3]);
    assert_eq!(list(RunFilter { state: Some(RunState::Succeeded), ..Default::default() }).await, vec![r1]);
    assert_eq!(list(RunFilter { state: Some(RunState::Failed), ..Default::default() }).await, vec![r2]);
    assert_eq!(list(RunFilter { state: Some(RunState::Claimed), ..Default::default() }).await, vec![r3]);
    assert_eq!(list(RunFilter { agent_id: Some("agent-a".into()), ..Default::default() }).await, vec![r1, r3]);
    assert_eq!(list(RunFilter { agent_id: Some("agent-b".into()), ..Default::default() }).await, vec![r2]);
    assert_eq!(
        list(RunFilter { agent_id: Some("agent-a".into()), work_item_id: Some(w2.id), ..Default::default() }).await,
        vec![r3]
    );
    assert!(list(RunFilter { agent_id: Some("nobody".into()), ..Default::default() }).await.is_empty());
    assert!(list(RunFilter { work_item_id: Some(WorkItemId::new()), ..Default::default() }).await.is_empty());
    assert!(list(RunFilter { state: Some(RunState::Lost), ..Default::default() }).await.is_empty());
    assert_eq!(list(RunFilter { page: Page { limit: 1, after: None }, ..Default::default() }).await, vec![r1]);
    assert_eq!(list(RunFilter { page: Page { limit: 1, after: Some(r1.0) }, ..Default::default() }).await, vec![r2]);
    assert!(list(RunFilter { page: Page { limit: 5, after: Some(r3.0) }, ..Default::default() }).await.is_empty());
    assert!(matches!(h.store.run_get(RunId::new()).await, Err(StoreError::NotFound { .. })));
    let r = h.store.run_get(r3).await.unwrap();
    assert_eq!(
        (r.work_item_id, r.project_id, r.agent_id.as_str(), r.state),
        (w2.id, p.id, "agent-a", RunState::Claimed)
    );
}

/// Completion records usage, exit code and finish time on the run (readable with `run_get`); a failure
/// records its error, exit code and kind, and the item's last error.
pub async fn flow_run_usage_and_failure_recorded(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let p = h.project().await;
    let w1 = h.queued(p.id, "ok", 1, &[]).await;
    let w2 = h.queued(p.id, "bad", 0, &[]).await;
    let a = h.claim_one("agent-1").await;
    let b = h.claim_one("agent-1").await;
    h.clock.advance(chrono::Duration::seconds(3));
    let started = h.orch.start(a.run_id(), a.token()).await.unwrap();
    assert_eq!(started.state, RunState::Running);
    assert_eq!(started.started_at, Some(h.clock.now()));
    let t_start = h.clock.now();

    h.clock.advance(chrono::Duration::seconds(9));
    let usage = Usage { input_tokens: 1200, cached_input_tokens: 300, output_tokens: 450, cost_usd: Some(0.25) };
    let done = h
        .orch
        .complete(a.run_id(), a.token(), RunOutcome::Succeeded { exit_code: Some(0) }, Some(usage.clone()))
        .await
        .unwrap();
    assert_eq!(done.run.usage, usage);
    let run = h.store.run_get(a.run_id()).await.unwrap();
    assert_eq!(run, done.run);
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.usage, usage);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.error, None);
    assert_eq!(run.failure_kind, None);
    assert_eq!(run.started_at, Some(t_start));
    assert_eq!(run.finished_at, Some(h.clock.now()));
    assert_eq!(h.state_of(w1.id).await, WorkItemState::Succeeded);

    let small = Usage { input_tokens: 7, ..Default::default() };
    let failed = h
        .orch
        .complete(
            b.run_id(),
            b.token(),
            RunOutcome::Failed { error: "compile error".into(), exit_code: Some(2), kind: FailureKind::Permanent },
            Some(small.clone()),
        )
        .await
        .unwrap();
    assert_eq!(failed.work_item_state, WorkItemState::Failed);
    assert_eq!(failed.retry_at, None);
    let run = h.store.run_get(b.run_id()).await.unwrap();
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.error.as_deref(), Some("compile error"));
    assert_eq!(run.exit_code, Some(2));
    assert_eq!(run.failure_kind, Some(FailureKind::Permanent));
    assert_eq!(run.usage, small);
    assert_eq!(run.finished_at, Some(h.clock.now()));
    assert_eq!(run.started_at, None, "never started");
    let item = h.store.work_item_get(w2.id).await.unwrap();
    assert_eq!(item.state, WorkItemState::Failed);
    assert_eq!(item.last_error.as_deref(), Some("compile error"));

    // Completing without usage leaves it at zero.
    let w3 = h.queued(p.id, "no usage", 0, &[]).await;
    let c = h.claim_one("agent-1").await;
    assert_eq!(c.claimed.work_item.id, w3.id);
    let r = h.succeed(&c).await;
    assert_eq!(r.run.usage, Usage::default());
    assert_eq!(h.store.run_get(c.run_id()).await.unwrap().usage, Usage::default());
    // A second completion is fenced.
    let e = h
        .orch
        .complete(a.run_id(), a.token(), RunOutcome::Succeeded { exit_code: Some(0) }, Some(small))
        .await
        .unwrap_err();
    assert!(is_lease_lost(&e), "{e:?}");
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().usage, usage);
}

// ---- key rotation ----

/// After key rotation (new active key, old key kept for decryption) a facade still decrypts answers
/// sealed under the old key and seals new ones under the new key; a facade without the old key cannot
/// read the old answers; a resumed claim through the rotated facade gets every answer.
pub async fn flow_reveal_with_rotated_keyring(store: Arc<dyn Store>) {
    let old = SecretKey::generate();
    let new = SecretKey::generate();
    let h = Harness::with_config(store, |c| c.keyring = Some(keyring("k1", &old)));
    let a = claimed(&h, "rotate").await;
    let qs = ask(&h, &a, vec![question("OLD", InputKind::Secret), question("NEW", InputKind::Secret)]).await;
    h.orch.answer_info_request(qs[0].id, "sealed-under-k1", "human").await.unwrap();

    let mut config = h.orch.config().clone();
    config.keyring = Some(keyring("k2", &new).with_old_key("k1", old.clone()).expect("old key"));
    let rotated = Orchestrator::with_clock(h.store.clone(), config, Arc::new(h.clock.clone()));
    let stored_old = h.store.info_request_get(qs[0].id).await.unwrap();
    assert_eq!(stored_old.answer.as_ref().and_then(|s| s.key_id.as_deref()), Some("k1"));
    assert_eq!(rotated.reveal_answer(&stored_old).unwrap().as_deref(), Some("sealed-under-k1"));

    let r = rotated.answer_info_request(qs[1].id, "sealed-under-k2", "human").await.unwrap();
    assert!(r.resumed);
    let stored_new = h.store.info_request_get(qs[1].id).await.unwrap();
    let sealed = stored_new.answer.clone().expect("answer");
    assert_eq!(sealed.key_id.as_deref(), Some("k2"));
    assert!(!contains_bytes(&sealed.ciphertext, b"sealed-under-k2"));
    assert_eq!(rotated.reveal_answer(&stored_new).unwrap().as_deref(), Some("sealed-under-k2"));
    // The old facade does not know k2; a facade with only k2 does not know k1.
    assert!(matches!(h.orch.reveal_answer(&stored_new), Err(Error::Crypto(_))));
    let mut only_new = h.orch.config().clone();
    only_new.keyring = Some(keyring("k2", &new));
    let only_new = Orchestrator::with_clock(h.store.clone(), only_new, Arc::new(h.clock.clone()));
    assert!(matches!(only_new.reveal_answer(&stored_old), Err(Error::Crypto(_))));
    assert_eq!(only_new.reveal_answer(&stored_new).unwrap().as_deref(), Some("sealed-under-k2"));

    let b = rotated
        .claim(ClaimRequest { agent_id: "agent-2".into(), capabilities: vec![], max: 1, lease_ttl_seconds: None })
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert!(b[0].claimed.resumed);
    assert_eq!(b[0].run_id(), a.run_id());
    assert_eq!(b[0].answers["OLD"].value, "sealed-under-k1");
    assert_eq!(b[0].answers["NEW"].value, "sealed-under-k2");
    assert!(b[0].answers.values().all(|v| v.secret));
}

/// The list of cases in this module, for [`crate::store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __flow_cases {
    ($factory:expr) => {
        $crate::__conformance_cases!(@emit $factory, cases_flow;
            flow_draft_decide_without_policy,
            flow_draft_approval_policy,
            flow_work_item_approval_gate,
            flow_approval_bound_to_content,
            flow_reject_and_resubmit,
            flow_cancel_awaiting_approval,
            flow_edit_refused_while_queued_or_running,
            flow_idempotency_keys,
            flow_work_item_list_filters,
            flow_recipe_create_and_validate,
            flow_recipe_attach_and_claim,
            flow_info_request_round_trip,
            flow_info_secret_needs_keyring,
            flow_info_choice_and_validation,
            flow_info_answer_twice_and_list,
            flow_info_ask_fenced,
            flow_info_cancel_waiting_item,
            flow_info_second_round,
            flow_info_requeue_waiting_run,
            flow_logs_append_and_page,
            flow_logs_concurrent_appenders,
            flow_logs_fenced_and_truncated,
            flow_step_events,
            flow_run_list_filters,
            flow_run_usage_and_failure_recorded,
            flow_reveal_with_rotated_keyring,
        );
    };
}
