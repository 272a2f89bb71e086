//! Rules every backend applies identically, as pure functions. Stores call these inside their units of
//! work so that the decisions (claimability, fencing, retries, conversions) are written once, here.

use crate::domain::{ApprovalRequest, ApprovalSubject, Lease, RequirementsDraft, Run, WorkItem};
use crate::error::StoreError;
use crate::ids::DraftId;
use crate::ids::{ProjectId, RunId, WorkItemId};
use crate::retry::{jitter_unit, FailureKind, RetryDecision, RetryOverrides, RetryPolicy};
use crate::state::{ApprovalState, DraftState};
use crate::state::{RunState, WorkItemState};
use crate::store::Decision;
use crate::store::NewWorkItem;
use chrono::{DateTime, Duration, Utc};
use std::collections::{HashMap, HashSet};

/// Maximum length of a title.
pub const MAX_TITLE_LEN: usize = 500;
/// Maximum length of a description or vision text.
pub const MAX_TEXT_LEN: usize = 100_000;
/// Maximum number of labels on a work item.
pub const MAX_LABELS: usize = 32;
/// Maximum number of dependencies of a work item.
pub const MAX_DEPENDENCIES: usize = 256;
/// Maximum length of one log line (longer lines are truncated by the facade).
pub const MAX_LOG_LINE_LEN: usize = 16 * 1024;

/// Whether an item in `state` with `pending` unfinished dependencies and `run_at` may be claimed at `now`.
pub fn is_claimable(state: WorkItemState, pending: u32, run_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    matches!(state, WorkItemState::Queued | WorkItemState::Retrying) && pending == 0 && run_at.is_none_or(|t| t <= now)
}

/// Whether an agent with `capabilities` may take an item with `labels` (every label is a capability).
pub fn labels_match(labels: &[String], capabilities: &[String]) -> bool {
    labels.iter().all(|l| capabilities.iter().any(|c| c == l))
}

/// Checks that `token` is the run's current lease and that it has not expired.
pub fn check_fence(run: &Run, token: u64, now: DateTime<Utc>) -> Result<(), StoreError> {
    if run.lease_token != token {
        return Err(StoreError::lease_lost(run.id, "stale fencing token: the run was reclaimed"));
    }
    if !run.state.holds_lease() {
        return Err(StoreError::lease_lost(run.id, format!("run is {}", run.state)));
    }
    match run.lease_expires_at {
        Some(t) if t > now => Ok(()),
        _ => Err(StoreError::lease_lost(run.id, "lease expired")),
    }
}

/// The duration a renewal grants: the requested one, else the one the current lease was granted with.
pub fn renewal_ttl(run: &Run, requested: Option<Duration>) -> Duration {
    requested.unwrap_or_else(|| match (run.lease_expires_at, run.heartbeat_at) {
        (Some(e), Some(h)) if e > h => e - h,
        _ => Duration::seconds(60),
    })
}

/// The lease a claim or renewal grants.
pub fn lease_for(run_id: RunId, token: u64, now: DateTime<Utc>, ttl: Duration) -> Lease {
    Lease { run_id, token, expires_at: now.checked_add_signed(ttl).unwrap_or(DateTime::<Utc>::MAX_UTC) }
}

/// Refuses an enqueue batch that names the same work item twice.
pub fn check_distinct_enqueues(items: &[crate::store::Enqueue]) -> Result<(), StoreError> {
    let mut seen = HashSet::with_capacity(items.len());
    for e in items {
        if !seen.insert(e.work_item_id) {
            return Err(StoreError::invalid(
                "work_item_id",
                format!("work item `{}` appears twice in one enqueue", e.work_item_id),
            ));
        }
    }
    Ok(())
}

/// A recipe may be used by work items of its own project, or by any project when it has none.
pub fn check_recipe_scope(
    recipe_id: crate::ids::RecipeId,
    recipe_project: Option<ProjectId>,
    item_project: ProjectId,
) -> Result<(), StoreError> {
    match recipe_project {
        Some(p) if p != item_project => Err(StoreError::invalid(
            "recipe_id",
            format!("recipe `{recipe_id}` belongs to project `{p}`, not to project `{item_project}`"),
        )),
        _ => Ok(()),
    }
}

/// What follows a failed attempt of a work item: its next state and, when retrying, the next attempt time.
pub fn after_failure(
    defaults: &RetryPolicy,
    overrides: &RetryOverrides,
    attempts: u32,
    kind: FailureKind,
    now: DateTime<Utc>,
) -> (WorkItemState, Option<DateTime<Utc>>) {
    let policy = defaults.with_overrides(overrides).unwrap_or_else(|_| defaults.clone());
    match policy.decide(attempts.max(1), kind, jitter_unit()) {
        RetryDecision::Retry { delay, .. } => (WorkItemState::Retrying, Some(now + delay)),
        RetryDecision::GiveUp { .. } => (WorkItemState::Failed, None),
    }
}

/// A new run for a claim.
pub fn new_run(item: &WorkItem, agent_id: &str, attempt: u32, lease: &Lease, now: DateTime<Utc>) -> Run {
    Run {
        id: lease.run_id,
        work_item_id: item.id,
        project_id: item.project_id,
        attempt,
        agent_id: agent_id.to_string(),
        state: RunState::Claimed,
        lease_token: lease.token,
        lease_expires_at: Some(lease.expires_at),
        heartbeat_at: Some(now),
        claimed_at: now,
        started_at: None,
        finished_at: None,
        exit_code: None,
        error: None,
        failure_kind: None,
        usage: Default::default(),
        last_completed_step: None,
    }
}

/// A new work item from creation parameters (state and queue fields as given).
pub fn new_work_item(p: &NewWorkItem, now: DateTime<Utc>) -> WorkItem {
    let mut w = WorkItem {
        id: p.id,
        project_id: p.project_id,
        title: p.title.clone(),
        description: p.description.clone(),
        recipe_id: p.recipe_id,
        labels: p.labels.clone(),
        state: p.state,
        priority: p.priority,
        dependencies: Vec::new(),
        retry: p.retry.clone(),
        idempotency_key: p.idempotency_key.clone(),
        content_hash: String::new(),
        approval_id: None,
        draft_id: None,
        blocked_reason: None,
        attempts: 0,
        current_run_id: None,
        run_at: None,
        last_error: None,
        created_at: now,
        updated_at: now,
        enqueued_at: None,
    };
    w.content_hash = w.compute_content_hash();
    w
}

/// A proposed draft from its creation parameters (its content hash covers title and requirements).
pub fn new_draft(p: crate::store::NewDraft) -> RequirementsDraft {
    let content_hash = crate::domain::content_hash(&(&p.title, &p.requirements));
    RequirementsDraft {
        id: p.id,
        project_id: p.project_id,
        title: p.title,
        requirements: p.requirements,
        state: DraftState::Proposed,
        content_hash,
        proposed_by: p.proposed_by,
        work_item_ids: Vec::new(),
        created_at: p.now,
        decided_at: None,
    }
}

/// A stored recipe from its creation parameters (its name comes from the YAML).
pub fn new_recipe(p: crate::store::NewRecipe) -> crate::domain::ToolRecipe {
    crate::domain::ToolRecipe {
        id: p.id,
        project_id: p.project_id,
        name: p.spec.name.clone(),
        yaml: p.yaml,
        spec: p.spec,
        created_at: p.now,
    }
}

/// The work items an approved draft creates (state `ready`, not enqueued).
pub fn draft_work_items(draft: &RequirementsDraft, now: DateTime<Utc>) -> Vec<WorkItem> {
    draft
        .requirements
        .iter()
        .map(|r| {
            let mut w = new_work_item(
                &NewWorkItem {
                    id: WorkItemId::new(),
                    project_id: draft.project_id,
                    title: r.title.clone(),
                    description: r.description.clone(),
                    recipe_id: r.recipe_id,
                    labels: r.labels.clone(),
                    priority: r.priority,
                    retry: RetryOverrides::default(),
                    idempotency_key: None,
                    state: WorkItemState::Ready,
                    enqueue: None,
                },
                now,
            );
            w.draft_id = Some(draft.id);
            w
        })
        .collect()
}

/// Checks that adding the edges `item -> deps` keeps the dependency graph acyclic. `deps_of` returns the
/// current dependencies of an item. Returns the cycle (starting and ending at `item`) when one would form.
pub fn find_cycle(
    item: WorkItemId,
    deps: &[WorkItemId],
    mut deps_of: impl FnMut(WorkItemId) -> Vec<WorkItemId>,
) -> Option<Vec<WorkItemId>> {
    // DFS from each new dependency looking for `item`, remembering parents to report the path.
    let mut parent: HashMap<WorkItemId, WorkItemId> = HashMap::new();
    let mut seen: HashSet<WorkItemId> = HashSet::new();
    let mut stack: Vec<WorkItemId> = Vec::new();
    for d in deps {
        if *d == item {
            return Some(vec![item, item]);
        }
        if seen.insert(*d) {
            parent.insert(*d, item);
            stack.push(*d);
        }
    }
    while let Some(n) = stack.pop() {
        for m in deps_of(n) {
            if m == item {
                let mut chain = vec![n];
                let mut cur = n;
                while let Some(p) = parent.get(&cur) {
                    if *p == item {
                        break;
                    }
                    chain.push(*p);
                    cur = *p;
                }
                chain.reverse();
                let mut path = Vec::with_capacity(chain.len() + 2);
                path.push(item);
                path.extend(chain);
                path.push(item);
                return Some(path);
            }
            if seen.insert(m) {
                parent.insert(m, n);
                stack.push(m);
            }
        }
    }
    None
}

/// The error for a cycle found by [`find_cycle`].
pub fn cycle_error(cycle: &[WorkItemId]) -> StoreError {
    let path: Vec<String> = cycle.iter().map(|i| i.to_string()).collect();
    StoreError::invalid("depends_on", format!("dependency cycle: {}", path.join(" -> ")))
}

/// The error for a dependency that does not exist (or belongs to another project).
pub fn unknown_dependency(dep: WorkItemId, project: ProjectId) -> StoreError {
    StoreError::invalid("depends_on", format!("unknown dependency `{dep}` (not a work item of project `{project}`)"))
}

/// The failure recorded on a run whose info request `key` passed its deadline unanswered.
pub fn expired_error(key: &str) -> String {
    format!("info request `{key}` passed its deadline unanswered")
}

/// An edit applied to a work item: the edited item, and whether it needs a new approval (its content
/// changed under the approval policy while it was awaiting approval or ready). Refuses content edits
/// outside `draft`, `awaiting_approval` and `ready`, and priority edits of finished items. The caller
/// checks a new recipe's existence and scope, supersedes the pending approval and records the new one.
pub fn apply_update(item: &WorkItem, p: &crate::store::WorkItemUpdate) -> Result<(WorkItem, bool), StoreError> {
    let content_change = p.title.is_some() || p.description.is_some() || p.recipe_id.is_some() || p.labels.is_some();
    if content_change && !item.state.is_editable() {
        return Err(StoreError::conflict(format!(
            "work item {} is {}; its content can be edited only in draft, awaiting_approval or ready",
            item.id, item.state
        )));
    }
    if p.priority.is_some() && item.state.is_finished() {
        return Err(StoreError::conflict(format!("work item {} is {}", item.id, item.state)));
    }
    let mut w = item.clone();
    if let Some(t) = &p.title {
        w.title = t.clone();
    }
    if let Some(d) = &p.description {
        w.description = d.clone();
    }
    if let Some(r) = p.recipe_id {
        w.recipe_id = r;
    }
    if let Some(l) = &p.labels {
        w.labels = l.clone();
    }
    if let Some(pr) = p.priority {
        w.priority = pr;
    }
    w.content_hash = w.compute_content_hash();
    w.updated_at = p.now;
    let needs_approval = w.content_hash != item.content_hash
        && p.require_approval
        && matches!(item.state, WorkItemState::Ready | WorkItemState::AwaitingApproval);
    if needs_approval {
        w.state = WorkItemState::AwaitingApproval;
    }
    Ok((w, needs_approval))
}

/// Which subject a decision is about (the approval's, else the draft named directly) and the approval
/// state it moves to; refuses deciding an approval that is no longer pending.
pub fn decision_subject(
    approval: Option<&ApprovalRequest>,
    draft_id: Option<DraftId>,
    decision: Decision,
) -> Result<(ApprovalSubject, ApprovalState), StoreError> {
    let to = match decision {
        Decision::Approve => ApprovalState::Approved,
        Decision::Reject => ApprovalState::Rejected,
    };
    if let Some(a) = approval {
        a.state.transition(to)?;
    }
    let subject = match (approval, draft_id) {
        (Some(a), _) => a.subject,
        (None, Some(did)) => ApprovalSubject::RequirementsDraft(did),
        (None, None) => return Err(StoreError::invalid("id", "nothing to decide")),
    };
    Ok((subject, to))
}

/// The state a decided draft moves to; refuses a decided draft and an approval for other content.
pub fn draft_decision(
    draft: &RequirementsDraft,
    approval: Option<&ApprovalRequest>,
    decision: Decision,
) -> Result<DraftState, StoreError> {
    let to = match decision {
        Decision::Approve => DraftState::Approved,
        Decision::Reject => DraftState::Rejected,
    };
    draft.state.transition(to)?;
    if approval.is_some_and(|a| a.content_hash != draft.content_hash) {
        return Err(StoreError::conflict("the draft changed after this approval was requested"));
    }
    Ok(to)
}

/// The state a work item moves to when its approval is decided (`ready` or back to `draft`); refuses an
/// item that is not waiting for this approval or whose content changed since it was requested.
pub fn work_item_decision(
    item: &WorkItem,
    approval: &ApprovalRequest,
    decision: Decision,
) -> Result<WorkItemState, StoreError> {
    if item.state != WorkItemState::AwaitingApproval || item.approval_id != Some(approval.id) {
        return Err(StoreError::conflict(format!(
            "work item {} is {} and not waiting for this approval",
            item.id, item.state
        )));
    }
    if item.content_hash != approval.content_hash {
        return Err(StoreError::conflict(
            "the work item changed after this approval was requested; a new approval is needed",
        ));
    }
    let to = match decision {
        Decision::Approve => WorkItemState::Ready,
        Decision::Reject => WorkItemState::Draft,
    };
    Ok(item.state.transition(to)?)
}

/// The reason recorded on an item blocked by `dep`.
pub fn blocked_reason(dep: WorkItemId, dep_state: WorkItemState) -> String {
    format!("dependency {dep} is {dep_state}")
}

/// A new pending approval request of `subject`, bound to its content hash.
pub fn new_approval(
    project_id: ProjectId,
    subject: ApprovalSubject,
    content_hash: &str,
    now: DateTime<Utc>,
) -> ApprovalRequest {
    ApprovalRequest {
        id: crate::ids::ApprovalId::new(),
        project_id,
        subject,
        content_hash: content_hash.to_string(),
        state: ApprovalState::Pending,
        requested_at: now,
        decided_by: None,
        decided_at: None,
        reason: None,
    }
}

/// When an item enqueued at `now` becomes claimable: its not-before time, never in the past.
pub fn enqueue_run_at(not_before: Option<DateTime<Utc>>, now: DateTime<Utc>) -> DateTime<Utc> {
    not_before.map_or(now, |t| t.max(now))
}

/// Applies enqueue options to an item (the caller moves its state): dependencies added (once each),
/// priority, claimable time, enqueue time.
pub fn apply_enqueue(it: &mut WorkItem, o: &crate::store::EnqueueOptions, now: DateTime<Utc>) {
    for d in &o.depends_on {
        if !it.dependencies.contains(d) {
            it.dependencies.push(*d);
        }
    }
    if let Some(p) = o.priority {
        it.priority = p;
    }
    it.run_at = Some(enqueue_run_at(o.not_before, now));
    it.enqueued_at = Some(now);
    it.updated_at = now;
}

/// The fast path of creating an item with an enqueue and no dependencies: it is written once, already
/// queued. True when it applies (otherwise the caller enqueues it after the insert).
pub fn enqueue_on_create(
    w: &mut WorkItem,
    enqueue: Option<&crate::store::EnqueueOptions>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    match enqueue {
        Some(e) if e.depends_on.is_empty() => {
            w.state = WorkItemState::Ready.transition(WorkItemState::Queued)?;
            if let Some(pr) = e.priority {
                w.priority = pr;
            }
            w.run_at = Some(enqueue_run_at(e.not_before, now));
            w.enqueued_at = Some(now);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Copies the scheduler's view of an item (after an enqueue) onto the item.
pub fn apply_scheduled(w: &mut WorkItem, t: crate::domain::ScheduledTask, now: DateTime<Utc>) {
    w.state = t.state;
    w.priority = t.priority;
    w.dependencies = t.dependencies;
    w.run_at = t.run_at;
    w.enqueued_at = t.enqueued_at;
    w.blocked_reason = t.blocked_reason;
    w.updated_at = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_detection() {
        let a = WorkItemId::new();
        let b = WorkItemId::new();
        let c = WorkItemId::new();
        // b -> a, c -> b; adding a -> c closes a cycle.
        let graph: HashMap<WorkItemId, Vec<WorkItemId>> = [(b, vec![a]), (c, vec![b])].into_iter().collect();
        let cyc = find_cycle(a, &[c], |n| graph.get(&n).cloned().unwrap_or_default()).unwrap();
        assert_eq!(cyc.first(), Some(&a));
        assert_eq!(cyc.last(), Some(&a));
        assert!(cyc.contains(&b) && cyc.contains(&c));
        assert!(find_cycle(c, &[a], |n| graph.get(&n).cloned().unwrap_or_default()).is_none());
        assert_eq!(find_cycle(a, &[a], |_| vec![]), Some(vec![a, a]));
    }

    #[test]
    fn label_matching() {
        let caps = vec!["linux".to_string(), "gpu".to_string()];
        assert!(labels_match(&[], &caps));
        assert!(labels_match(&["gpu".to_string()], &caps));
        assert!(!labels_match(&["macos".to_string()], &caps));
    }
}

/// Longest repository URL accepted.
pub const MAX_REPOSITORY_URL_LEN: usize = 2048;
/// Largest patch stored for a run; a longer one is cut with a marker line.
pub const MAX_PATCH_BYTES: usize = 2 * 1024 * 1024;
/// Most file paths kept in a run result.
pub const MAX_RESULT_FILES: usize = 1000;

/// Whether `name` is a branch name git accepts (`git check-ref-format --branch`), without its odd
/// corners: no leading `-`, no `..`, `@{`, control characters, spaces or `~^:?*[\`, no component
/// starting with `.` or ending in `.lock`, no trailing `/` or `.`.
pub fn is_valid_branch_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 250 || name.starts_with('-') || name == "@" {
        return false;
    }
    if name.contains("..") || name.contains("@{") || name.contains("//") || name.ends_with('/') || name.ends_with('.') {
        return false;
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c)) {
        return false;
    }
    !name.split('/').any(|part| part.is_empty() || part.starts_with('.') || part.ends_with(".lock"))
}

/// Checks a project's repository and returns it trimmed: a clear `Invalid` error for an empty or
/// malformed URL or branch. Accepted: an absolute local path, `file://`, `http(s)://`, `ssh://`,
/// `git://` URLs and scp-like `user@host:path`; a password in the URL is refused (credentials belong
/// in the agent's git credential helper, not in the database).
pub fn normalize_repository(r: crate::domain::Repository) -> Result<crate::domain::Repository, crate::Error> {
    use crate::Error;
    let url = r.url.trim().to_string();
    let bad = |m: &str| Err(Error::invalid("repository.url", m.to_string()));
    if url.is_empty() {
        return bad("must not be empty");
    }
    if url.len() > MAX_REPOSITORY_URL_LEN {
        return bad(&format!("at most {MAX_REPOSITORY_URL_LEN} characters"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("must not contain spaces or control characters");
    }
    if url.starts_with('-') {
        return bad("must not start with `-`");
    }
    if url.contains("::") {
        return bad("git remote helpers (`transport::address`) are not accepted");
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                if !rest.starts_with('/') {
                    return bad("a file:// URL needs an absolute path (file:///path/to/repo)");
                }
            }
            "http" | "https" | "ssh" | "git" => {
                let authority = rest.split('/').next().unwrap_or("");
                let (userinfo, host) = match authority.rsplit_once('@') {
                    Some((u, h)) => (Some(u), h),
                    None => (None, authority),
                };
                if host.is_empty() || host.starts_with(':') {
                    return bad("the URL has no host");
                }
                if userinfo.is_some() && scheme != "ssh" {
                    return bad(
                        "must not contain credentials (user or token before `@`): configure a git credential helper on the agents instead",
                    );
                }
                if userinfo.is_some_and(|u| u.contains(':')) {
                    return bad("must not contain a password: use the agents' SSH keys");
                }
                if rest.len() <= authority.len() + 1 {
                    return bad("the URL has no repository path");
                }
            }
            other => {
                return bad(&format!(
                    "unsupported scheme `{other}`: use a local path, file://, https://, http://, ssh:// or git://"
                ))
            }
        }
    } else if url.starts_with('/') {
        // An absolute local path.
    } else if let Some((host, path)) = url.split_once(':') {
        // scp-like: [user@]host:path
        let h = host.rsplit('@').next().unwrap_or("");
        if h.is_empty() || path.is_empty() || host.contains('/') {
            return bad("expected [user@]host:path, an absolute path or a URL");
        }
    } else {
        return bad("a local path must be absolute (or use file:///path, https://, ssh:// or user@host:path)");
    }
    let base_branch = match r.base_branch.map(|b| b.trim().to_string()) {
        None => None,
        Some(b) if b.is_empty() => None,
        Some(b) => {
            let b = b.strip_prefix("refs/heads/").unwrap_or(&b).to_string();
            if !is_valid_branch_name(&b) {
                return Err(Error::invalid("repository.base_branch", format!("`{b}` is not a valid branch name")));
            }
            Some(b)
        }
    };
    Ok(crate::domain::Repository { url, base_branch })
}

/// Checks a run result before it is stored and cuts its patch to [`MAX_PATCH_BYTES`] (with a marker
/// line saying so).
pub fn check_run_result(
    mut r: crate::domain::RunResult,
    mut patch: String,
) -> Result<(crate::domain::RunResult, String), crate::Error> {
    use crate::Error;
    if !is_valid_branch_name(&r.branch) {
        return Err(Error::invalid("result.branch", format!("`{}` is not a valid branch name", r.branch)));
    }
    let is_commit = |c: &str| (4..=64).contains(&c.len()) && c.chars().all(|c| c.is_ascii_hexdigit());
    for (field, c) in [("result.base_commit", Some(&r.base_commit)), ("result.head_commit", Some(&r.head_commit))]
        .into_iter()
        .chain([("result.start_commit", r.start_commit.as_ref())])
    {
        if let Some(c) = c {
            if !is_commit(c) {
                return Err(Error::invalid(field, "expected a hexadecimal commit id"));
            }
        }
    }
    r.files.truncate(MAX_RESULT_FILES);
    if r.files.iter().any(|f| f.len() > 4096) {
        return Err(Error::invalid("result.files", "a path is longer than 4096 bytes"));
    }
    if patch.len() > MAX_PATCH_BYTES {
        let total = patch.len();
        let mut cut = MAX_PATCH_BYTES;
        while !patch.is_char_boundary(cut) {
            cut -= 1;
        }
        patch.truncate(cut);
        patch.push_str(&truncation_marker(total));
        r.patch_truncated = true;
    }
    Ok((r, patch))
}

/// The line that ends a cut patch.
pub fn truncation_marker(total_bytes: usize) -> String {
    format!("\n# orchestrator: diff truncated here; the whole diff is {total_bytes} bytes (see the branch)\n")
}

#[cfg(test)]
mod repository_tests {
    use super::*;
    use crate::domain::Repository;

    fn repo(url: &str) -> Result<Repository, crate::Error> {
        normalize_repository(Repository { url: url.into(), base_branch: None })
    }

    #[test]
    fn accepts_the_usual_forms_and_refuses_bad_ones() {
        for ok in [
            "/srv/git/app.git",
            "file:///srv/git/app.git",
            "https://git.example.com/team/app.git",
            "ssh://git@git.example.com:2222/team/app.git",
            "git@git.example.com:team/app.git",
            " https://git.example.com/app ",
        ] {
            assert!(repo(ok).is_ok(), "{ok}");
        }
        assert_eq!(repo(" /a/b ").unwrap().url, "/a/b");
        for bad in [
            "",
            "  ",
            "relative/path",
            "-uhack",
            "https://",
            "https://host",
            "https://user:pw@host/x.git",
            "https://ghp_token@git.example.com/team/app.git",
            "ext::sh -c touch% /tmp/pwned",
            "hg::https://hg.example.com/repo",
            "ftp://host/x",
            "file://relative",
            "with space/x",
        ] {
            let e = repo(bad).unwrap_err();
            assert!(matches!(&e, crate::Error::Invalid { field, .. } if field == "repository.url"), "{bad}: {e:?}");
        }
        let b = |b: &str| normalize_repository(Repository { url: "/r".into(), base_branch: Some(b.into()) });
        assert_eq!(b("refs/heads/dev").unwrap().base_branch.as_deref(), Some("dev"));
        assert_eq!(b("").unwrap().base_branch, None);
        for bad in ["a..b", "-x", "a b", "x.lock", "a/", ".hidden", "a:b"] {
            assert!(b(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn long_patches_are_cut_with_a_marker() {
        let r = crate::domain::RunResult {
            branch: "orch/x".into(),
            base_commit: "abcd".into(),
            head_commit: "abcdef".into(),
            start_commit: None,
            committed: true,
            pushed: false,
            files_changed: 1,
            insertions: 1,
            deletions: 0,
            files: vec!["a".into()],
            patch_truncated: false,
        };
        let (r2, p) = check_run_result(r.clone(), "é".repeat(MAX_PATCH_BYTES)).unwrap();
        assert!(r2.patch_truncated);
        assert!(p.ends_with(&truncation_marker(2 * MAX_PATCH_BYTES)));
        assert!(p.len() < MAX_PATCH_BYTES + 200);
        let (r3, p3) = check_run_result(r.clone(), "small".into()).unwrap();
        assert!(!r3.patch_truncated);
        assert_eq!(p3, "small");
        let bad = crate::domain::RunResult { head_commit: "zz".into(), ..r };
        assert!(check_run_result(bad, String::new()).is_err());
    }
}
