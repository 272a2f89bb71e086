//! [`MemoryStore`]: the reference [`Store`], complete, fast and thread-safe.
//!
//! All state sits behind one `std::sync::Mutex`; every operation validates first and then mutates,
//! under one lock acquisition and without any `.await` while holding it, so each operation is atomic.

use crate::domain::*;
use crate::error::{StoreError, StoreResult};
use crate::ids::*;
use crate::notify::Notifier;
use crate::retry::{FailureKind, RetryOverrides};
use crate::rules;
use crate::state::*;
use crate::store::*;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

type ReadyKey = (Reverse<i32>, DateTime<Utc>, WorkItemId);

/// The in-memory reference store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    notifier: Notifier,
}

#[derive(Debug, Default)]
struct State {
    projects: BTreeMap<ProjectId, Project>,
    visions: HashMap<ProjectId, Vec<Vision>>,
    drafts: BTreeMap<DraftId, RequirementsDraft>,
    approvals: BTreeMap<ApprovalId, ApprovalRequest>,
    recipes: BTreeMap<RecipeId, ToolRecipe>,
    items: BTreeMap<WorkItemId, WorkItem>,
    dependents: HashMap<WorkItemId, Vec<WorkItemId>>,
    idempotency: HashMap<(ProjectId, String), WorkItemId>,
    /// Items in `queued`/`retrying` with no pending dependency, by claim order.
    ready: BTreeSet<ReadyKey>,
    runs: BTreeMap<RunId, Run>,
    logs: HashMap<RunId, Vec<LogEntry>>,
    events: HashMap<RunId, Vec<StepEvent>>,
    info: BTreeMap<InfoRequestId, InfoRequest>,
    info_by_run: HashMap<RunId, Vec<InfoRequestId>>,
    results: HashMap<RunId, RunResultRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn page_iter<'a, K: Ord + Copy + Into<uuid::Uuid> + From<uuid::Uuid> + 'a, V: 'a>(
    map: &'a BTreeMap<K, V>,
    page: &Page,
) -> impl Iterator<Item = &'a V> + 'a {
    let start = page.after.map(K::from);
    map.range((
        match start {
            Some(s) => std::ops::Bound::Excluded(s),
            None => std::ops::Bound::Unbounded,
        },
        std::ops::Bound::Unbounded,
    ))
    .map(|(_, v)| v)
}

macro_rules! uuid_conv {
    ($($t:ty),*) => {$(
        impl From<$t> for uuid::Uuid {
            fn from(v: $t) -> uuid::Uuid { v.0 }
        }
    )*};
}
uuid_conv!(ProjectId, DraftId, WorkItemId, RunId, ApprovalId, RecipeId, InfoRequestId);

impl State {
    fn item(&self, id: WorkItemId) -> StoreResult<&WorkItem> {
        self.items.get(&id).ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))
    }

    fn item_mut(&mut self, id: WorkItemId) -> StoreResult<&mut WorkItem> {
        self.items.get_mut(&id).ok_or_else(|| StoreError::not_found(EntityKind::WorkItem, id))
    }

    fn check_recipe(&self, rid: RecipeId, project: ProjectId) -> StoreResult<()> {
        let r = self
            .recipes
            .get(&rid)
            .ok_or_else(|| StoreError::invalid("recipe_id", format!("unknown recipe `{rid}`")))?;
        rules::check_recipe_scope(rid, r.project_id, project)
    }

    fn run(&self, id: RunId) -> StoreResult<&Run> {
        self.runs.get(&id).ok_or_else(|| StoreError::not_found(EntityKind::Run, id))
    }

    fn pending(&self, item: &WorkItem) -> u32 {
        item.dependencies
            .iter()
            .filter(|d| self.items.get(d).is_none_or(|x| x.state != WorkItemState::Succeeded))
            .count() as u32
    }

    fn blocking_dep(&self, item: &WorkItem) -> Option<(WorkItemId, WorkItemState)> {
        item.dependencies
            .iter()
            .find_map(|d| self.items.get(d).filter(|x| x.state.blocks_dependents()).map(|x| (x.id, x.state)))
    }

    fn ready_key(item: &WorkItem) -> ReadyKey {
        (Reverse(item.priority), item.run_at.unwrap_or(item.created_at), item.id)
    }

    fn unindex(&mut self, id: WorkItemId) {
        if let Some(item) = self.items.get(&id) {
            let k = Self::ready_key(item);
            self.ready.remove(&k);
        }
    }

    /// Puts the item in the ready index when it is claimable except for time.
    fn reindex(&mut self, id: WorkItemId) {
        let Some(item) = self.items.get(&id) else {
            return;
        };
        let k = Self::ready_key(item);
        let eligible = matches!(item.state, WorkItemState::Queued | WorkItemState::Retrying) && self.pending(item) == 0;
        if eligible {
            self.ready.insert(k);
        } else {
            self.ready.remove(&k);
        }
    }

    fn set_state(&mut self, id: WorkItemId, to: WorkItemState, now: DateTime<Utc>) -> StoreResult<()> {
        self.unindex(id);
        let item = self.item_mut(id)?;
        item.state = item.state.transition(to)?;
        item.updated_at = now;
        self.reindex(id);
        Ok(())
    }

    fn new_approval(
        &mut self,
        project_id: ProjectId,
        subject: ApprovalSubject,
        hash: &str,
        now: DateTime<Utc>,
    ) -> ApprovalRequest {
        let a = rules::new_approval(project_id, subject, hash, now);
        self.approvals.insert(a.id, a.clone());
        a
    }

    fn supersede_pending(&mut self, approval_id: Option<ApprovalId>, now: DateTime<Utc>) {
        if let Some(a) = approval_id.and_then(|id| self.approvals.get_mut(&id)) {
            if a.state == ApprovalState::Pending {
                a.state = ApprovalState::Superseded;
                a.decided_at = Some(now);
            }
        }
    }

    /// Item `id` succeeded: dependents whose last pending dependency it was become claimable.
    fn release_dependents(&mut self, id: WorkItemId) -> Vec<WorkItemId> {
        let deps = self.dependents.get(&id).cloned().unwrap_or_default();
        let mut released = Vec::new();
        for d in deps {
            let Some(item) = self.items.get(&d) else {
                continue;
            };
            if matches!(item.state, WorkItemState::Queued | WorkItemState::Retrying) && self.pending(item) == 0 {
                self.reindex(d);
                released.push(d);
            }
        }
        released
    }

    /// Item `id` failed, was cancelled or got blocked: its enqueued dependents become blocked, transitively.
    fn block_dependents(&mut self, id: WorkItemId, now: DateTime<Utc>) -> Vec<WorkItemId> {
        let mut blocked = Vec::new();
        let mut stack = vec![id];
        while let Some(cur) = stack.pop() {
            let cur_state = match self.items.get(&cur) {
                Some(i) => i.state,
                None => continue,
            };
            for d in self.dependents.get(&cur).cloned().unwrap_or_default() {
                let Some(item) = self.items.get(&d) else {
                    continue;
                };
                if matches!(item.state, WorkItemState::Queued | WorkItemState::Retrying) {
                    self.unindex(d);
                    if let Some(item) = self.items.get_mut(&d) {
                        item.state = WorkItemState::Blocked;
                        item.blocked_reason = Some(rules::blocked_reason(cur, cur_state));
                        item.updated_at = now;
                    }
                    blocked.push(d);
                    stack.push(d);
                }
            }
        }
        blocked
    }

    /// Item `id` came back to the queue: blocked dependents with no other blocking dependency are
    /// queued again, transitively; queued dependents are re-checked for pending dependencies.
    fn unblock_dependents(&mut self, id: WorkItemId, now: DateTime<Utc>) {
        let mut stack = vec![id];
        while let Some(cur) = stack.pop() {
            for d in self.dependents.get(&cur).cloned().unwrap_or_default() {
                let Some(item) = self.items.get(&d) else {
                    continue;
                };
                match item.state {
                    WorkItemState::Blocked if self.blocking_dep(item).is_none() => {
                        if let Some(item) = self.items.get_mut(&d) {
                            item.state = WorkItemState::Queued;
                            item.blocked_reason = None;
                            item.run_at = Some(now);
                            item.updated_at = now;
                        }
                        self.reindex(d);
                        stack.push(d);
                    }
                    WorkItemState::Blocked => {
                        // Still blocked by another dependency: name that one.
                        let reason = self.blocking_dep(item).map(|(b, s)| rules::blocked_reason(b, s));
                        if let Some(item) = self.items.get_mut(&d) {
                            item.blocked_reason = reason;
                        }
                    }
                    WorkItemState::Queued | WorkItemState::Retrying => self.reindex(d),
                    _ => {}
                }
            }
        }
    }

    /// Decides what follows a failed attempt and applies it.
    fn fail_item(
        &mut self,
        id: WorkItemId,
        kind: FailureKind,
        error: &str,
        defaults: &crate::retry::RetryPolicy,
        now: DateTime<Utc>,
    ) -> StoreResult<(WorkItemState, Option<DateTime<Utc>>, Vec<WorkItemId>)> {
        let item = self.item(id)?;
        let (mut next, mut retry_at) = rules::after_failure(defaults, &item.retry, item.attempts, kind, now);
        // A retry can never run while a dependency will not succeed (it failed or was cancelled after
        // this attempt was claimed): the item is blocked instead, like any queued item in that case.
        let blocking = if next == WorkItemState::Retrying { self.blocking_dep(item) } else { None };
        self.unindex(id);
        let item = self.item_mut(id)?;
        item.state = item.state.transition(next)?;
        if let Some((d, s)) = blocking {
            item.state = item.state.transition(WorkItemState::Blocked)?;
            item.blocked_reason = Some(rules::blocked_reason(d, s));
            (next, retry_at) = (WorkItemState::Blocked, None);
        }
        item.last_error = Some(error.to_string());
        item.updated_at = now;
        item.run_at = retry_at;
        self.reindex(id);
        let blocked = if next.blocks_dependents() { self.block_dependents(id, now) } else { Vec::new() };
        Ok((next, retry_at, blocked))
    }

    fn cancel_item(&mut self, id: WorkItemId, reason: &str, now: DateTime<Utc>) -> StoreResult<WorkItem> {
        let item = self.item(id)?.clone();
        item.state.transition(WorkItemState::Cancelled)?;
        if let Some(run_id) = item.current_run_id {
            if let Some(run) = self.runs.get_mut(&run_id) {
                if matches!(run.state, RunState::Claimed | RunState::Running | RunState::WaitingInput) {
                    run.state = RunState::Cancelled;
                    run.error = Some(reason.to_string());
                    run.finished_at = Some(now);
                    run.lease_expires_at = None;
                }
            }
            for iid in self.info_by_run.get(&run_id).cloned().unwrap_or_default() {
                if let Some(r) = self.info.get_mut(&iid) {
                    if r.state == InfoRequestState::Pending {
                        r.state = InfoRequestState::Cancelled;
                    }
                }
            }
        }
        self.supersede_pending(item.approval_id, now);
        self.set_state(id, WorkItemState::Cancelled, now)?;
        let item = self.item_mut(id)?;
        item.last_error = Some(reason.to_string());
        item.run_at = None;
        self.block_dependents(id, now);
        Ok(self.item(id)?.clone())
    }

    fn requeue_item(&mut self, id: WorkItemId, r: &Requeue) -> StoreResult<WorkItem> {
        let item = self.item(id)?.clone();
        if !item.state.is_requeueable() && !item.state.has_active_run() {
            return Err(item.state.transition(WorkItemState::Queued).unwrap_err_or_conflict());
        }
        let was = item.state;
        self.unindex(id);
        let blocking = self.blocking_dep(&item);
        {
            let it = self.item_mut(id)?;
            it.state = match blocking {
                Some(_) => WorkItemState::Blocked,
                None => WorkItemState::Queued,
            };
            it.blocked_reason = blocking.map(|(d, s)| rules::blocked_reason(d, s));
            if was.is_finished() {
                it.attempts = 0;
                it.last_error = None;
            }
            it.run_at = Some(r.run_at);
            it.enqueued_at = Some(r.now);
            it.updated_at = r.now;
        }
        self.reindex(id);
        if was.blocks_dependents() || was == WorkItemState::Succeeded {
            self.unblock_dependents(id, r.now);
        }
        if blocking.is_some() {
            // Requeued behind a dependency that will not succeed (e.g. a succeeded item whose dependency
            // was cancelled since): the items waiting on it are blocked with it.
            self.block_dependents(id, r.now);
        }
        Ok(self.item(id)?.clone())
    }

    fn decide(
        &mut self,
        approval_id: Option<ApprovalId>,
        draft_id: Option<DraftId>,
        d: &Decide,
    ) -> StoreResult<DecisionOutcome> {
        let approval = match approval_id {
            Some(id) => Some(
                self.approvals
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| StoreError::not_found(EntityKind::ApprovalRequest, id))?,
            ),
            None => None,
        };
        let (subject, to_approval) = rules::decision_subject(approval.as_ref(), draft_id, d.decision)?;
        let mut out = DecisionOutcome { approval: None, draft: None, work_items: Vec::new() };
        match subject {
            ApprovalSubject::RequirementsDraft(did) => {
                let draft = self
                    .drafts
                    .get(&did)
                    .cloned()
                    .ok_or_else(|| StoreError::not_found(EntityKind::RequirementsDraft, did))?;
                let to = rules::draft_decision(&draft, approval.as_ref(), d.decision)?;
                // A draft under the approval policy is decided through its pending approval request.
                let pending = self
                    .approvals
                    .values()
                    .find(|a| a.subject == subject && a.state == ApprovalState::Pending)
                    .map(|a| a.id);
                let approval_id = approval.as_ref().map(|a| a.id).or(pending);
                let mut items = Vec::new();
                if d.decision == Decision::Approve {
                    items = rules::draft_work_items(&draft, d.now);
                    for w in &items {
                        self.items.insert(w.id, w.clone());
                    }
                }
                let dr = self
                    .drafts
                    .get_mut(&did)
                    .ok_or_else(|| StoreError::not_found(EntityKind::RequirementsDraft, did))?;
                dr.state = to;
                dr.decided_at = Some(d.now);
                dr.work_item_ids = items.iter().map(|w| w.id).collect();
                out.draft = Some(dr.clone());
                out.work_items = items;
                if let Some(aid) = approval_id {
                    out.approval = Some(self.record_decision(aid, to_approval, d)?);
                }
            }
            ApprovalSubject::WorkItem(wid) => {
                let a =
                    approval.ok_or_else(|| StoreError::invalid("id", "work items are decided through approvals"))?;
                let item = self.item(wid)?.clone();
                let to = rules::work_item_decision(&item, &a, d.decision)?;
                self.set_state(wid, to, d.now)?;
                out.approval = Some(self.record_decision(a.id, to_approval, d)?);
                out.work_items.push(self.item(wid)?.clone());
            }
        }
        Ok(out)
    }

    fn record_decision(&mut self, id: ApprovalId, to: ApprovalState, d: &Decide) -> StoreResult<ApprovalRequest> {
        let a = self.approvals.get_mut(&id).ok_or_else(|| StoreError::not_found(EntityKind::ApprovalRequest, id))?;
        a.state = to;
        a.decided_by = Some(d.decided_by.clone());
        a.decided_at = Some(d.now);
        a.reason = d.reason.clone();
        Ok(a.clone())
    }

    fn enqueue_checked(&mut self, items: &[Enqueue], now: DateTime<Utc>) -> StoreResult<Vec<ScheduledTask>> {
        // Validate everything against the current graph plus the batch's own new edges, then apply.
        rules::check_distinct_enqueues(items)?;
        let mut extra: HashMap<WorkItemId, Vec<WorkItemId>> = HashMap::new();
        for e in items {
            let item = self.item(e.work_item_id)?;
            if item.state != WorkItemState::Ready {
                return Err(item.state.transition(WorkItemState::Queued).unwrap_err_or_conflict());
            }
            if e.options.depends_on.len() + item.dependencies.len() > rules::MAX_DEPENDENCIES {
                return Err(StoreError::invalid(
                    "depends_on",
                    format!("at most {} dependencies", rules::MAX_DEPENDENCIES),
                ));
            }
            for dep in &e.options.depends_on {
                match self.items.get(dep) {
                    Some(d) if d.project_id == item.project_id => {}
                    _ => return Err(rules::unknown_dependency(*dep, item.project_id)),
                }
            }
            let cyc = rules::find_cycle(e.work_item_id, &e.options.depends_on, |n| {
                let mut v = self.items.get(&n).map(|i| i.dependencies.clone()).unwrap_or_default();
                if let Some(x) = extra.get(&n) {
                    v.extend(x.iter().copied());
                }
                v
            });
            if let Some(c) = cyc {
                return Err(rules::cycle_error(&c));
            }
            extra.entry(e.work_item_id).or_default().extend(e.options.depends_on.iter().copied());
        }
        let mut out = Vec::with_capacity(items.len());
        for e in items {
            let id = e.work_item_id;
            {
                let it = self.item_mut(id)?;
                rules::apply_enqueue(it, &e.options, now);
            }
            for d in &e.options.depends_on {
                let v = self.dependents.entry(*d).or_default();
                if !v.contains(&id) {
                    v.push(id);
                }
            }
            let item = self.item(id)?.clone();
            match self.blocking_dep(&item) {
                Some((d, s)) => {
                    let it = self.item_mut(id)?;
                    it.state = WorkItemState::Blocked;
                    it.blocked_reason = Some(rules::blocked_reason(d, s));
                    // Items already waiting on this one can no longer run either.
                    self.block_dependents(id, now);
                }
                None => self.set_state(id, WorkItemState::Queued, now)?,
            }
            let item = self.item(id)?;
            out.push(item.scheduled_task(self.pending(item)));
        }
        Ok(out)
    }

    /// Runs waiting past an info request's deadline fail (retryable); their open questions close.
    fn expire_info_requests(&mut self, t: &Tick) -> StoreResult<Vec<ReapedRun>> {
        let mut runs: Vec<(RunId, String)> = Vec::new();
        for r in self.info.values() {
            if r.state == InfoRequestState::Pending
                && r.deadline.is_some_and(|d| d <= t.now)
                && !runs.iter().any(|(id, _)| *id == r.run_id)
            {
                runs.push((r.run_id, r.key.clone()));
                if runs.len() >= t.limit.max(1) as usize {
                    break;
                }
            }
        }
        let mut out = Vec::with_capacity(runs.len());
        for (rid, key) in runs {
            let error = rules::expired_error(&key);
            for iid in self.info_by_run.get(&rid).cloned().unwrap_or_default() {
                if let Some(q) = self.info.get_mut(&iid) {
                    if q.state == InfoRequestState::Pending {
                        q.state = if q.deadline.is_some_and(|d| d <= t.now) {
                            InfoRequestState::Expired
                        } else {
                            InfoRequestState::Cancelled
                        };
                    }
                }
            }
            let run = self.runs.get_mut(&rid).ok_or_else(|| StoreError::not_found(EntityKind::Run, rid))?;
            run.state = run.state.transition(RunState::Failed)?;
            run.error = Some(error.clone());
            run.failure_kind = Some(FailureKind::Retryable);
            run.finished_at = Some(t.now);
            run.lease_expires_at = None;
            let wid = run.work_item_id;
            let (state, retry_at, _) = self.fail_item(wid, FailureKind::Retryable, &error, &t.retry_defaults, t.now)?;
            out.push(ReapedRun { run_id: rid, work_item_id: wid, work_item_state: state, retry_at });
        }
        Ok(out)
    }

    fn reap(&mut self, t: &Tick) -> StoreResult<Vec<ReapedRun>> {
        let expired: Vec<RunId> = self
            .runs
            .values()
            .filter(|r| r.state.holds_lease() && r.lease_expires_at.is_some_and(|e| e <= t.now))
            .map(|r| r.id)
            .take(t.limit.max(1) as usize)
            .collect();
        let mut out = Vec::new();
        for rid in expired {
            let run = self.runs.get_mut(&rid).ok_or_else(|| StoreError::not_found(EntityKind::Run, rid))?;
            run.state = RunState::Lost;
            run.error = Some("lease expired".into());
            run.failure_kind = Some(FailureKind::Retryable);
            run.finished_at = Some(t.now);
            run.lease_expires_at = None;
            let wid = run.work_item_id;
            let (state, retry_at, _) =
                self.fail_item(wid, FailureKind::Retryable, "lease expired", &t.retry_defaults, t.now)?;
            out.push(ReapedRun { run_id: rid, work_item_id: wid, work_item_state: state, retry_at });
        }
        Ok(out)
    }

    fn complete_one(
        &mut self,
        c: &RunCompletion,
        defaults: &crate::retry::RetryPolicy,
        now: DateTime<Utc>,
    ) -> StoreResult<CompletionResult> {
        let run = self.run(c.run_id)?;
        rules::check_fence(run, c.token, now)?;
        let wid = run.work_item_id;
        let (run_to, error, exit_code, kind) = match &c.outcome {
            RunOutcome::Succeeded { exit_code } => (RunState::Succeeded, None, *exit_code, None),
            RunOutcome::Failed { error, exit_code, kind } => {
                (RunState::Failed, Some(error.clone()), *exit_code, Some(*kind))
            }
        };
        run.state.transition(run_to)?;
        // Check the item's move before touching the run, so a refusal changes nothing.
        let item_state = self.item(wid)?.state;
        match kind {
            None => {
                item_state.transition(WorkItemState::Succeeded)?;
            }
            Some(_) => {
                if !item_state.can_transition(WorkItemState::Retrying)
                    && !item_state.can_transition(WorkItemState::Failed)
                {
                    return Err(item_state.transition(WorkItemState::Failed).unwrap_err_or_conflict());
                }
            }
        }
        let run = self.runs.get_mut(&c.run_id).ok_or_else(|| StoreError::not_found(EntityKind::Run, c.run_id))?;
        run.state = run_to;
        run.finished_at = Some(now);
        run.lease_expires_at = None;
        run.exit_code = exit_code;
        run.error = error.clone();
        run.failure_kind = kind;
        if let Some(u) = &c.usage {
            run.usage = u.clone();
        }
        let run = run.clone();
        let mut res = CompletionResult {
            run,
            work_item_state: WorkItemState::Succeeded,
            retry_at: None,
            released: Vec::new(),
            blocked: Vec::new(),
        };
        match kind {
            None => {
                self.set_state(wid, WorkItemState::Succeeded, now)?;
                let it = self.item_mut(wid)?;
                it.last_error = None;
                it.run_at = None;
                res.released = self.release_dependents(wid);
            }
            Some(k) => {
                let (state, retry_at, blocked) =
                    self.fail_item(wid, k, error.as_deref().unwrap_or("failed"), defaults, now)?;
                res.work_item_state = state;
                res.retry_at = retry_at;
                res.blocked = blocked;
            }
        }
        Ok(res)
    }

    fn fenced_run(&self, run_id: RunId, token: u64, now: DateTime<Utc>) -> StoreResult<&Run> {
        let run = self.run(run_id)?;
        rules::check_fence(run, token, now)?;
        Ok(run)
    }
}

trait TransitionResultExt {
    fn unwrap_err_or_conflict(self) -> StoreError;
}

impl TransitionResultExt for Result<WorkItemState, TransitionError> {
    fn unwrap_err_or_conflict(self) -> StoreError {
        match self {
            Err(e) => StoreError::InvalidTransition(e),
            Ok(s) => StoreError::conflict(format!("work item is {s}")),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn project_create(&self, p: NewProject) -> StoreResult<Project> {
        let mut s = self.lock();
        let pr = p.to_project();
        if s.projects.contains_key(&pr.id) {
            return Err(StoreError::Duplicate { entity: EntityKind::Project, key: pr.id.to_string() });
        }
        s.projects.insert(pr.id, pr.clone());
        Ok(pr)
    }

    async fn project_get(&self, id: ProjectId) -> StoreResult<Project> {
        self.lock().projects.get(&id).cloned().ok_or_else(|| StoreError::not_found(EntityKind::Project, id))
    }

    async fn project_list(&self, page: Page) -> StoreResult<Vec<Project>> {
        let s = self.lock();
        Ok(page_iter(&s.projects, &page).take(page.effective_limit()).cloned().collect())
    }

    async fn project_update(&self, p: ProjectUpdate) -> StoreResult<Project> {
        let mut s = self.lock();
        let pr = s.projects.get_mut(&p.id).ok_or_else(|| StoreError::not_found(EntityKind::Project, p.id))?;
        if let Some(n) = p.name {
            pr.name = n;
        }
        if let Some(d) = p.description {
            pr.description = d;
        }
        if let Some(r) = p.repository {
            pr.repository = r;
        }
        pr.updated_at = p.now;
        Ok(pr.clone())
    }

    async fn project_delete(&self, id: ProjectId) -> StoreResult<()> {
        let mut s = self.lock();
        if !s.projects.contains_key(&id) {
            return Err(StoreError::not_found(EntityKind::Project, id));
        }
        if let Some(busy) = s.items.values().find(|w| {
            w.project_id == id
                && matches!(
                    w.state,
                    WorkItemState::Queued
                        | WorkItemState::Running
                        | WorkItemState::WaitingInput
                        | WorkItemState::Retrying
                )
        }) {
            return Err(StoreError::conflict(format!(
                "project has active work item {} ({}); cancel it first",
                busy.id, busy.state
            )));
        }
        let item_ids: Vec<WorkItemId> = s.items.values().filter(|w| w.project_id == id).map(|w| w.id).collect();
        for wid in &item_ids {
            s.unindex(*wid);
            s.items.remove(wid);
            s.dependents.remove(wid);
        }
        s.idempotency.retain(|(p, _), _| *p != id);
        let run_ids: Vec<RunId> = s.runs.values().filter(|r| r.project_id == id).map(|r| r.id).collect();
        for rid in &run_ids {
            s.runs.remove(rid);
            s.logs.remove(rid);
            s.results.remove(rid);
            s.events.remove(rid);
            s.info_by_run.remove(rid);
        }
        s.info.retain(|_, r| r.project_id != id);
        s.approvals.retain(|_, a| a.project_id != id);
        s.drafts.retain(|_, d| d.project_id != id);
        s.recipes.retain(|_, r| r.project_id != Some(id));
        s.visions.remove(&id);
        s.projects.remove(&id);
        Ok(())
    }

    async fn vision_put(&self, p: VisionPut) -> StoreResult<Vision> {
        let mut s = self.lock();
        if !s.projects.contains_key(&p.project_id) {
            return Err(StoreError::not_found(EntityKind::Project, p.project_id));
        }
        let versions = s.visions.entry(p.project_id).or_default();
        let v = Vision {
            project_id: p.project_id,
            version: versions.len() as u32 + 1,
            text: p.text,
            author: p.author,
            created_at: p.now,
        };
        versions.push(v.clone());
        Ok(v)
    }

    async fn vision_get(&self, project_id: ProjectId, version: Option<u32>) -> StoreResult<Vision> {
        let s = self.lock();
        if !s.projects.contains_key(&project_id) {
            return Err(StoreError::not_found(EntityKind::Project, project_id));
        }
        let versions = s.visions.get(&project_id);
        let v = match version {
            None => versions.and_then(|v| v.last()),
            Some(n) => versions.and_then(|v| v.iter().find(|x| x.version == n)),
        };
        v.cloned().ok_or_else(|| {
            StoreError::not_found(
                EntityKind::Vision,
                format!("{project_id}@{}", version.map_or("latest".to_string(), |n| n.to_string())),
            )
        })
    }

    async fn vision_list(&self, project_id: ProjectId) -> StoreResult<Vec<Vision>> {
        let s = self.lock();
        if !s.projects.contains_key(&project_id) {
            return Err(StoreError::not_found(EntityKind::Project, project_id));
        }
        Ok(s.visions.get(&project_id).cloned().unwrap_or_default())
    }

    async fn draft_create(&self, p: NewDraft) -> StoreResult<(RequirementsDraft, Option<ApprovalRequest>)> {
        let mut s = self.lock();
        if !s.projects.contains_key(&p.project_id) {
            return Err(StoreError::not_found(EntityKind::Project, p.project_id));
        }
        for (i, r) in p.requirements.iter().enumerate() {
            if let Some(rid) = r.recipe_id {
                s.check_recipe(rid, p.project_id).map_err(|e| match e {
                    StoreError::Invalid { message, .. } => {
                        StoreError::invalid(format!("requirements[{i}].recipe_id"), message)
                    }
                    other => other,
                })?;
            }
        }
        if s.drafts.contains_key(&p.id) {
            return Err(StoreError::Duplicate { entity: EntityKind::RequirementsDraft, key: p.id.to_string() });
        }
        let require_approval = p.require_approval;
        let d = rules::new_draft(p);
        let hash = d.content_hash.clone();
        s.drafts.insert(d.id, d.clone());
        let a = require_approval
            .then(|| s.new_approval(d.project_id, ApprovalSubject::RequirementsDraft(d.id), &hash, d.created_at));
        Ok((d, a))
    }

    async fn draft_get(&self, id: DraftId) -> StoreResult<RequirementsDraft> {
        self.lock().drafts.get(&id).cloned().ok_or_else(|| StoreError::not_found(EntityKind::RequirementsDraft, id))
    }

    async fn draft_list(&self, project_id: ProjectId, page: Page) -> StoreResult<Vec<RequirementsDraft>> {
        let s = self.lock();
        if !s.projects.contains_key(&project_id) {
            return Err(StoreError::not_found(EntityKind::Project, project_id));
        }
        Ok(page_iter(&s.drafts, &page)
            .filter(|d| d.project_id == project_id)
            .take(page.effective_limit())
            .cloned()
            .collect())
    }

    async fn draft_decide(&self, id: DraftId, d: Decide) -> StoreResult<DecisionOutcome> {
        let mut s = self.lock();
        s.decide(None, Some(id), &d)
    }

    async fn approval_get(&self, id: ApprovalId) -> StoreResult<ApprovalRequest> {
        self.lock().approvals.get(&id).cloned().ok_or_else(|| StoreError::not_found(EntityKind::ApprovalRequest, id))
    }

    async fn approval_list(&self, f: ApprovalFilter) -> StoreResult<Vec<ApprovalRequest>> {
        let s = self.lock();
        Ok(page_iter(&s.approvals, &f.page)
            .filter(|a| f.state.is_none_or(|st| a.state == st) && f.project_id.is_none_or(|p| a.project_id == p))
            .take(f.page.effective_limit())
            .cloned()
            .collect())
    }

    async fn approval_decide(&self, id: ApprovalId, d: Decide) -> StoreResult<DecisionOutcome> {
        let mut s = self.lock();
        s.decide(Some(id), None, &d)
    }

    async fn recipe_create(&self, p: NewRecipe) -> StoreResult<ToolRecipe> {
        let mut s = self.lock();
        if let Some(pid) = p.project_id {
            if !s.projects.contains_key(&pid) {
                return Err(StoreError::not_found(EntityKind::Project, pid));
            }
        }
        if s.recipes.contains_key(&p.id) {
            return Err(StoreError::Duplicate { entity: EntityKind::ToolRecipe, key: p.id.to_string() });
        }
        let r = rules::new_recipe(p);
        s.recipes.insert(r.id, r.clone());
        Ok(r)
    }

    async fn recipe_get(&self, id: RecipeId) -> StoreResult<ToolRecipe> {
        self.lock().recipes.get(&id).cloned().ok_or_else(|| StoreError::not_found(EntityKind::ToolRecipe, id))
    }

    async fn recipe_list(&self, page: Page) -> StoreResult<Vec<ToolRecipe>> {
        let s = self.lock();
        Ok(page_iter(&s.recipes, &page).take(page.effective_limit()).cloned().collect())
    }

    async fn work_items_create(
        &self,
        items: Vec<NewWorkItem>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<WorkItemCreated>> {
        let mut s = self.lock();
        // Validate the whole batch first (all or none).
        let mut batch_ids: HashMap<WorkItemId, ProjectId> = HashMap::new();
        let mut batch_keys: HashMap<(ProjectId, String), usize> = HashMap::new();
        let mut existing: Vec<Option<WorkItem>> = Vec::with_capacity(items.len());
        for (i, p) in items.iter().enumerate() {
            if !s.projects.contains_key(&p.project_id) {
                return Err(StoreError::not_found(EntityKind::Project, p.project_id));
            }
            if let Some(rid) = p.recipe_id {
                s.check_recipe(rid, p.project_id)?;
            }
            if !matches!(p.state, WorkItemState::Draft | WorkItemState::AwaitingApproval | WorkItemState::Ready) {
                return Err(StoreError::invalid("state", format!("a work item cannot be created as {}", p.state)));
            }
            if p.enqueue.is_some() && p.state != WorkItemState::Ready {
                return Err(StoreError::conflict(format!(
                    "work item {} needs approval before it can be enqueued",
                    p.id
                )));
            }
            let candidate = rules::new_work_item(p, now);
            let mut found = None;
            if let Some(k) = &p.idempotency_key {
                let key = (p.project_id, k.clone());
                if let Some(id) = s.idempotency.get(&key) {
                    let ex = s.item(*id)?;
                    if ex.content_hash != candidate.content_hash {
                        return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: k.clone() });
                    }
                    found = Some(ex.clone());
                } else if batch_keys.insert(key, i).is_some() {
                    return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: k.clone() });
                }
            }
            if found.is_none() {
                if s.items.contains_key(&p.id) || batch_ids.insert(p.id, p.project_id).is_some() {
                    return Err(StoreError::Duplicate { entity: EntityKind::WorkItem, key: p.id.to_string() });
                }
                if let Some(e) = &p.enqueue {
                    for dep in &e.depends_on {
                        let ok = s.items.get(dep).map(|d| d.project_id) == Some(p.project_id)
                            || batch_ids.get(dep) == Some(&p.project_id) && *dep != p.id;
                        if !ok {
                            return Err(rules::unknown_dependency(*dep, p.project_id));
                        }
                    }
                    if e.depends_on.len() > rules::MAX_DEPENDENCIES {
                        return Err(StoreError::invalid(
                            "depends_on",
                            format!("at most {} dependencies", rules::MAX_DEPENDENCIES),
                        ));
                    }
                }
            }
            existing.push(found);
        }
        // Apply.
        let mut out = Vec::with_capacity(items.len());
        let mut enqueues = Vec::new();
        for (p, ex) in items.into_iter().zip(existing) {
            if let Some(w) = ex {
                out.push(WorkItemCreated { work_item: w, created: false, approval: None });
                continue;
            }
            let mut w = rules::new_work_item(&p, now);
            let approval = (p.state == WorkItemState::AwaitingApproval)
                .then(|| s.new_approval(w.project_id, ApprovalSubject::WorkItem(w.id), &w.content_hash, now));
            w.approval_id = approval.as_ref().map(|a| a.id);
            if let Some(k) = &p.idempotency_key {
                s.idempotency.insert((p.project_id, k.clone()), w.id);
            }
            s.items.insert(w.id, w.clone());
            if let Some(e) = p.enqueue {
                enqueues.push((out.len(), Enqueue { work_item_id: w.id, options: e }));
            }
            out.push(WorkItemCreated { work_item: w, created: true, approval });
        }
        if !enqueues.is_empty() {
            let list: Vec<Enqueue> = enqueues.iter().map(|(_, e)| e.clone()).collect();
            // New items have no dependents yet, so no cycle can form; this cannot fail after validation.
            s.enqueue_checked(&list, now)?;
            for (idx, e) in &enqueues {
                out[*idx].work_item = s.item(e.work_item_id)?.clone();
            }
            drop(s);
            self.notifier.notify();
        }
        Ok(out)
    }

    async fn work_item_get(&self, id: WorkItemId) -> StoreResult<WorkItem> {
        self.lock().item(id).cloned()
    }

    async fn work_item_list(&self, f: WorkItemFilter) -> StoreResult<Vec<WorkItem>> {
        let s = self.lock();
        Ok(page_iter(&s.items, &f.page)
            .filter(|w| {
                f.project_id.is_none_or(|p| w.project_id == p)
                    && f.state.is_none_or(|st| w.state == st)
                    && f.label.as_ref().is_none_or(|l| w.labels.contains(l))
            })
            .take(f.page.effective_limit())
            .cloned()
            .collect())
    }

    async fn work_item_update(&self, p: WorkItemUpdate) -> StoreResult<WorkItemChanged> {
        let mut s = self.lock();
        let item = s.item(p.id)?.clone();
        let (mut new_item, needs_approval) = rules::apply_update(&item, &p)?;
        if let Some(Some(rid)) = p.recipe_id {
            s.check_recipe(rid, item.project_id)?;
        }
        s.unindex(p.id);
        let mut approval = None;
        if needs_approval {
            s.supersede_pending(item.approval_id, p.now);
            let a = s.new_approval(item.project_id, ApprovalSubject::WorkItem(item.id), &new_item.content_hash, p.now);
            new_item.approval_id = Some(a.id);
            approval = Some(a);
        }
        s.items.insert(p.id, new_item.clone());
        s.reindex(p.id);
        Ok(WorkItemChanged { work_item: new_item, approval })
    }

    async fn work_item_submit(
        &self,
        id: WorkItemId,
        require_approval: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItemChanged> {
        let mut s = self.lock();
        let item = s.item(id)?.clone();
        let to = if require_approval { WorkItemState::AwaitingApproval } else { WorkItemState::Ready };
        if item.state != WorkItemState::Draft {
            return Err(item
                .state
                .transition(to)
                .err()
                .map(StoreError::from)
                .unwrap_or_else(|| StoreError::conflict(format!("work item is {}", item.state))));
        }
        s.set_state(id, to, now)?;
        let mut approval = None;
        if require_approval {
            let a = s.new_approval(item.project_id, ApprovalSubject::WorkItem(id), &item.content_hash, now);
            s.item_mut(id)?.approval_id = Some(a.id);
            approval = Some(a);
        }
        Ok(WorkItemChanged { work_item: s.item(id)?.clone(), approval })
    }

    async fn work_item_set_policy(
        &self,
        id: WorkItemId,
        retry: RetryOverrides,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItem> {
        let mut s = self.lock();
        let it = s.item_mut(id)?;
        it.retry = retry;
        it.updated_at = now;
        Ok(it.clone())
    }

    async fn work_item_cancel(&self, id: WorkItemId, c: Cancel) -> StoreResult<WorkItem> {
        let mut s = self.lock();
        s.cancel_item(id, &c.reason, c.now)
    }

    async fn work_item_requeue(&self, id: WorkItemId, r: Requeue) -> StoreResult<WorkItem> {
        let mut s = self.lock();
        let item = s.item(id)?;
        if item.state.has_active_run() {
            return Err(StoreError::conflict(format!(
                "work item {id} has an active run; requeue the run or cancel the item"
            )));
        }
        let out = s.requeue_item(id, &r)?;
        drop(s);
        self.notifier.notify();
        Ok(out)
    }

    async fn enqueue_many(&self, items: Vec<Enqueue>, now: DateTime<Utc>) -> StoreResult<Vec<ScheduledTask>> {
        let out = self.lock().enqueue_checked(&items, now)?;
        self.notifier.notify();
        Ok(out)
    }

    async fn scheduled_task_get(&self, id: WorkItemId) -> StoreResult<ScheduledTask> {
        let s = self.lock();
        let item = s.item(id)?;
        Ok(item.scheduled_task(s.pending(item)))
    }

    async fn queue_list(&self, f: QueueFilter) -> StoreResult<Vec<ScheduledTask>> {
        let s = self.lock();
        let mut v: Vec<&WorkItem> = s
            .items
            .values()
            .filter(|w| {
                matches!(w.state, WorkItemState::Queued | WorkItemState::Retrying | WorkItemState::Blocked)
                    && f.project_id.is_none_or(|p| w.project_id == p)
            })
            .collect();
        v.sort_by_key(|w| State::ready_key(w));
        // Keyset cursor: continue after the cursor item's place in queue order, even if it has left
        // the queue since (an unknown cursor starts from the top).
        let cursor = f.page.after.and_then(|a| s.items.get(&WorkItemId(a))).map(State::ready_key);
        Ok(v.into_iter()
            .filter(|w| cursor.is_none_or(|k| State::ready_key(w) > k))
            .take(f.page.effective_limit())
            .map(|w| w.scheduled_task(s.pending(w)))
            .collect())
    }

    async fn tick(&self, t: Tick) -> StoreResult<TickReport> {
        let mut s = self.lock();
        let due: Vec<WorkItemId> = s
            .items
            .values()
            .filter(|w| w.state == WorkItemState::Retrying && w.run_at.is_none_or(|r| r <= t.now))
            .map(|w| w.id)
            .take(t.limit.max(1) as usize)
            .collect();
        for id in &due {
            s.set_state(*id, WorkItemState::Queued, t.now)?;
        }
        let reaped = s.reap(&t)?;
        let expired = s.expire_info_requests(&t)?;
        drop(s);
        if !due.is_empty() || reaped.iter().chain(&expired).any(|r| r.work_item_state == WorkItemState::Retrying) {
            self.notifier.notify();
        }
        Ok(TickReport { promoted: due, reaped, expired })
    }

    async fn leases_reap_expired(&self, t: Tick) -> StoreResult<Vec<ReapedRun>> {
        let out = self.lock().reap(&t)?;
        if !out.is_empty() {
            self.notifier.notify();
        }
        Ok(out)
    }

    async fn runs_claim(&self, c: Claim) -> StoreResult<Vec<ClaimedRun>> {
        let mut s = self.lock();
        let limit = c.limit.min(Page::MAX_LIMIT) as usize;
        let mut picked = Vec::with_capacity(limit);
        for k in s.ready.iter() {
            if picked.len() >= limit {
                break;
            }
            if k.1 > c.now {
                continue;
            }
            let Some(item) = s.items.get(&k.2) else {
                continue;
            };
            if rules::labels_match(&item.labels, &c.capabilities) {
                picked.push(*k);
            }
        }
        let mut out = Vec::with_capacity(picked.len());
        for k in picked {
            s.ready.remove(&k);
            let id = k.2;
            let item = s.item(id)?.clone();
            let resume = item
                .current_run_id
                .and_then(|r| s.runs.get(&r))
                .filter(|r| r.state == RunState::WaitingInput)
                .map(|r| (r.id, r.lease_token));
            let (run, resumed) = match resume {
                Some((rid, tok)) => {
                    let lease = rules::lease_for(rid, tok + 1, c.now, c.lease_ttl);
                    let run = s.runs.get_mut(&rid).ok_or_else(|| StoreError::not_found(EntityKind::Run, rid))?;
                    run.state = RunState::Claimed;
                    run.agent_id = c.agent_id.clone();
                    run.lease_token = lease.token;
                    run.lease_expires_at = Some(lease.expires_at);
                    run.heartbeat_at = Some(c.now);
                    (run.clone(), true)
                }
                None => {
                    let lease = rules::lease_for(RunId::new(), 1, c.now, c.lease_ttl);
                    let run = rules::new_run(&item, &c.agent_id, item.attempts + 1, &lease, c.now);
                    s.runs.insert(run.id, run.clone());
                    (run, false)
                }
            };
            let it = s.item_mut(id)?;
            it.state = it.state.transition(WorkItemState::Running)?;
            it.current_run_id = Some(run.id);
            if !resumed {
                it.attempts += 1;
            }
            it.updated_at = c.now;
            let work_item = it.clone();
            let lease =
                Lease { run_id: run.id, token: run.lease_token, expires_at: run.lease_expires_at.unwrap_or(c.now) };
            out.push(ClaimedRun { run, lease, work_item, resumed });
        }
        Ok(out)
    }

    async fn lease_renew(&self, p: LeaseRenew) -> StoreResult<Lease> {
        let mut s = self.lock();
        s.fenced_run(p.run_id, p.token, p.now)?;
        let run = s.runs.get_mut(&p.run_id).ok_or_else(|| StoreError::not_found(EntityKind::Run, p.run_id))?;
        let lease = rules::lease_for(run.id, run.lease_token, p.now, rules::renewal_ttl(run, p.ttl));
        run.lease_expires_at = Some(lease.expires_at);
        run.heartbeat_at = Some(p.now);
        Ok(lease)
    }

    async fn run_start(&self, p: RunStart) -> StoreResult<Run> {
        let mut s = self.lock();
        let run = s.fenced_run(p.run_id, p.token, p.now)?;
        if run.state == RunState::Running {
            return Ok(run.clone());
        }
        run.state.transition(RunState::Running)?;
        let run = s.runs.get_mut(&p.run_id).ok_or_else(|| StoreError::not_found(EntityKind::Run, p.run_id))?;
        run.state = RunState::Running;
        run.started_at.get_or_insert(p.now);
        Ok(run.clone())
    }

    async fn runs_complete_many(&self, p: CompleteMany) -> StoreResult<Vec<StoreResult<CompletionResult>>> {
        let mut s = self.lock();
        let out: Vec<StoreResult<CompletionResult>> =
            p.completions.iter().map(|c| s.complete_one(c, &p.retry_defaults, p.now)).collect();
        drop(s);
        if out
            .iter()
            .any(|r| r.as_ref().is_ok_and(|c| !c.released.is_empty() || c.retry_at.is_some_and(|t| t <= p.now)))
        {
            self.notifier.notify();
        }
        Ok(out)
    }

    async fn run_get(&self, id: RunId) -> StoreResult<Run> {
        self.lock().run(id).cloned()
    }

    async fn run_list(&self, f: RunFilter) -> StoreResult<Vec<Run>> {
        let s = self.lock();
        Ok(page_iter(&s.runs, &f.page)
            .filter(|r| {
                f.work_item_id.is_none_or(|w| r.work_item_id == w)
                    && f.state.is_none_or(|st| r.state == st)
                    && f.agent_id.as_ref().is_none_or(|a| &r.agent_id == a)
            })
            .take(f.page.effective_limit())
            .cloned()
            .collect())
    }

    async fn run_cancel(&self, id: RunId, c: Cancel) -> StoreResult<Run> {
        let mut s = self.lock();
        let run = s.run(id)?.clone();
        run.state.transition(RunState::Cancelled)?;
        let item = s.item(run.work_item_id)?;
        if item.current_run_id == Some(id) && item.state.can_transition(WorkItemState::Cancelled) {
            s.cancel_item(run.work_item_id, &c.reason, c.now)?;
        }
        let r = s.runs.get_mut(&id).ok_or_else(|| StoreError::not_found(EntityKind::Run, id))?;
        if r.state != RunState::Cancelled {
            r.state = RunState::Cancelled;
            r.error = Some(c.reason.clone());
            r.finished_at = Some(c.now);
            r.lease_expires_at = None;
        }
        Ok(r.clone())
    }

    async fn run_requeue(&self, id: RunId, r: Requeue) -> StoreResult<WorkItem> {
        let mut s = self.lock();
        let run = s.run(id)?.clone();
        let item = s.item(run.work_item_id)?.clone();
        let active = matches!(run.state, RunState::Claimed | RunState::Running | RunState::WaitingInput);
        if active {
            let rr = s.runs.get_mut(&id).ok_or_else(|| StoreError::not_found(EntityKind::Run, id))?;
            rr.state = RunState::Cancelled;
            rr.error = Some(r.reason.clone());
            rr.finished_at = Some(r.now);
            rr.lease_expires_at = None;
            for iid in s.info_by_run.get(&id).cloned().unwrap_or_default() {
                if let Some(q) = s.info.get_mut(&iid) {
                    if q.state == InfoRequestState::Pending {
                        q.state = InfoRequestState::Cancelled;
                    }
                }
            }
        } else if item.current_run_id != Some(id) && item.state.has_active_run() {
            return Err(StoreError::conflict(format!("work item {} has a newer active run", item.id)));
        }
        let out = s.requeue_item(item.id, &r)?;
        drop(s);
        self.notifier.notify();
        Ok(out)
    }

    async fn runs_release(&self, p: RunRelease) -> StoreResult<Run> {
        let mut s = self.lock();
        let run = s.fenced_run(p.run_id, p.token, p.now)?;
        run.state.transition(RunState::WaitingInput)?;
        let wid = run.work_item_id;
        let item_state = s.item(wid)?.state;
        if item_state != WorkItemState::Running {
            return Err(StoreError::conflict(format!("work item {wid} is {item_state}, not running")));
        }
        let r = s.runs.get_mut(&p.run_id).ok_or_else(|| StoreError::not_found(EntityKind::Run, p.run_id))?;
        r.state = RunState::WaitingInput;
        r.lease_expires_at = None;
        if let Some(u) = p.usage.clone() {
            r.usage = u;
        }
        let run = r.clone();
        s.unindex(wid);
        let it = s.item_mut(wid)?;
        it.state = WorkItemState::Queued;
        it.run_at = Some(p.now);
        it.updated_at = p.now;
        s.reindex(wid);
        drop(s);
        self.notifier.notify();
        Ok(run)
    }

    async fn run_result_put(&self, p: RunResultPut) -> StoreResult<()> {
        let mut s = self.lock();
        s.fenced_run(p.run_id, p.token, p.now)?;
        let rec = RunResultRecord { run_id: p.run_id, result: p.result, patch: p.patch, recorded_at: p.now };
        s.results.insert(p.run_id, rec);
        Ok(())
    }

    async fn run_result_get(&self, run_id: RunId) -> StoreResult<Option<RunResultRecord>> {
        let s = self.lock();
        s.run(run_id)?;
        Ok(s.results.get(&run_id).cloned())
    }

    async fn logs_append(&self, p: LogAppend) -> StoreResult<u64> {
        let mut s = self.lock();
        s.fenced_run(p.run_id, p.token, p.now)?;
        let logs = s.logs.entry(p.run_id).or_default();
        let mut seq = logs.last().map_or(0, |l| l.seq);
        logs.reserve(p.lines.len());
        for l in p.lines {
            seq += 1;
            logs.push(LogEntry { run_id: p.run_id, seq, stream: l.stream, line: l.line, at: p.now });
        }
        Ok(seq)
    }

    async fn logs_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<LogEntry>> {
        let s = self.lock();
        s.run(run_id)?;
        let logs = s.logs.get(&run_id).map(|v| v.as_slice()).unwrap_or(&[]);
        // seq n sits at index n-1.
        let start = (after as usize).min(logs.len());
        Ok(logs[start..].iter().take(limit.clamp(1, 10_000) as usize).cloned().collect())
    }

    async fn step_events_append(&self, p: StepEventsAppend) -> StoreResult<Vec<StepEvent>> {
        let mut s = self.lock();
        s.fenced_run(p.run_id, p.token, p.now)?;
        let events = s.events.entry(p.run_id).or_default();
        let first = events.last().map_or(0, |l| l.seq) + 1;
        let mut out = Vec::with_capacity(p.events.len());
        let mut last_done: Option<u32> = None;
        for (seq, e) in (first..).zip(p.events) {
            if e.kind == StepEventKind::Succeeded {
                if let Some(i) = e.step_index {
                    last_done = Some(last_done.map_or(i, |x| x.max(i)));
                }
            }
            let ev = StepEvent {
                run_id: p.run_id,
                seq,
                step_index: e.step_index,
                kind: e.kind,
                name: e.name,
                detail: e.detail,
                at: p.now,
            };
            events.push(ev.clone());
            out.push(ev);
        }
        if let Some(i) = last_done {
            if let Some(run) = s.runs.get_mut(&p.run_id) {
                run.last_completed_step = Some(run.last_completed_step.map_or(i, |x| x.max(i)));
            }
        }
        Ok(out)
    }

    async fn step_events_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<StepEvent>> {
        let s = self.lock();
        s.run(run_id)?;
        let ev = s.events.get(&run_id).map(|v| v.as_slice()).unwrap_or(&[]);
        let start = (after as usize).min(ev.len());
        Ok(ev[start..].iter().take(limit.clamp(1, 10_000) as usize).cloned().collect())
    }

    async fn info_requests_create(&self, p: InfoAsk) -> StoreResult<Vec<InfoRequest>> {
        let mut s = self.lock();
        let run = s.fenced_run(p.run_id, p.token, p.now)?.clone();
        if p.questions.is_empty() {
            return Err(StoreError::invalid("questions", "at least one question"));
        }
        run.state.transition(RunState::WaitingInput)?;
        let wid = run.work_item_id;
        s.item(wid)?.state.transition(WorkItemState::WaitingInput)?;
        let mut out = Vec::with_capacity(p.questions.len());
        for q in p.questions {
            let r = InfoRequest {
                id: InfoRequestId::new(),
                run_id: run.id,
                work_item_id: wid,
                project_id: run.project_id,
                key: q.key,
                prompt: q.prompt,
                kind: q.kind,
                choices: q.choices,
                state: InfoRequestState::Pending,
                deadline: q.deadline,
                created_at: p.now,
                answered_at: None,
                answered_by: None,
                answer: None,
            };
            s.info.insert(r.id, r.clone());
            s.info_by_run.entry(run.id).or_default().push(r.id);
            out.push(r);
        }
        let r = s.runs.get_mut(&run.id).ok_or_else(|| StoreError::not_found(EntityKind::Run, run.id))?;
        r.state = RunState::WaitingInput;
        r.lease_expires_at = None;
        if let Some(u) = p.usage {
            r.usage = u;
        }
        s.set_state(wid, WorkItemState::WaitingInput, p.now)?;
        Ok(out)
    }

    async fn info_request_get(&self, id: InfoRequestId) -> StoreResult<InfoRequest> {
        self.lock().info.get(&id).cloned().ok_or_else(|| StoreError::not_found(EntityKind::InfoRequest, id))
    }

    async fn info_request_list(&self, f: InfoRequestFilter) -> StoreResult<Vec<InfoRequest>> {
        let s = self.lock();
        Ok(page_iter(&s.info, &f.page)
            .filter(|r| {
                f.state.is_none_or(|st| r.state == st)
                    && f.run_id.is_none_or(|x| r.run_id == x)
                    && f.project_id.is_none_or(|p| r.project_id == p)
            })
            .take(f.page.effective_limit())
            .cloned()
            .collect())
    }

    async fn info_request_answer(&self, p: InfoAnswer) -> StoreResult<InfoAnswered> {
        let mut s = self.lock();
        let req = s.info.get(&p.id).cloned().ok_or_else(|| StoreError::not_found(EntityKind::InfoRequest, p.id))?;
        if req.state != InfoRequestState::Pending {
            return Err(StoreError::conflict(format!("info request {} is {}", p.id, req.state.as_str())));
        }
        let r = s.info.get_mut(&p.id).ok_or_else(|| StoreError::not_found(EntityKind::InfoRequest, p.id))?;
        r.state = InfoRequestState::Answered;
        r.answer = Some(p.answer);
        r.answered_at = Some(p.now);
        r.answered_by = Some(p.answered_by);
        let request = r.clone();
        let all_answered = s
            .info_by_run
            .get(&req.run_id)
            .map(|ids| ids.iter().all(|i| s.info.get(i).is_none_or(|x| x.state != InfoRequestState::Pending)))
            .unwrap_or(true);
        let mut resumed = false;
        if all_answered && s.item(req.work_item_id)?.state == WorkItemState::WaitingInput {
            s.unindex(req.work_item_id);
            let it = s.item_mut(req.work_item_id)?;
            it.state = WorkItemState::Queued;
            it.run_at = Some(p.now);
            it.updated_at = p.now;
            s.reindex(req.work_item_id);
            resumed = true;
        }
        drop(s);
        if resumed {
            self.notifier.notify();
        }
        Ok(InfoAnswered { request, resumed })
    }

    async fn info_answers_for_run(
        &self,
        run_id: RunId,
        token: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<InfoRequest>> {
        let s = self.lock();
        s.fenced_run(run_id, token, now)?;
        Ok(s.info_by_run
            .get(&run_id)
            .map(|ids| ids.iter().filter_map(|i| s.info.get(i).cloned()).collect())
            .unwrap_or_default())
    }

    async fn stats(&self) -> StoreResult<QueueStats> {
        let s = self.lock();
        let mut st = QueueStats::zeroed();
        for w in s.items.values() {
            *st.work_items.entry(w.state.as_str().to_string()).or_default() += 1;
        }
        for r in s.runs.values() {
            *st.runs.entry(r.state.as_str().to_string()).or_default() += 1;
        }
        st.pending_info_requests = s.info.values().filter(|r| r.state == InfoRequestState::Pending).count() as u64;
        st.pending_approvals = s.approvals.values().filter(|a| a.state == ApprovalState::Pending).count() as u64;
        Ok(st)
    }
}
