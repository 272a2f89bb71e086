//! Runs on projects with a repository: a checkout of the work item's branch per item, the result as a
//! commit and a diff, pushes to the remote, and retries that continue from the previous attempt's commit
//! (on another agent too). Real git, a local bare repository as the remote.

mod common;

use common::*;
use orchestrator_agent::GitSettings;
use orchestrator_core::retry::RetryOverrides;
use orchestrator_core::state::{RunState, WorkItemState};
use std::time::Duration;

fn pushing() -> GitSettings {
    GitSettings {
        push: true,
        author_name: "Ann Agent".into(),
        author_email: "ann@example.com".into(),
        ..GitSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_edits_a_file_gives_a_commit_a_diff_and_a_pushed_branch() {
    let h = Harness::new().await;
    let bare = h.bare_repo("remote");
    h.use_repository(bare.to_str().unwrap(), None).await;
    let recipe = h
        .recipe("name: edit\nsteps:\n  - echo three >> src/app.txt\n  - mkdir -p docs && echo new > docs/notes.md\n")
        .await;
    let item = h.item("Add a line", "", Some(recipe)).await;
    let agent = h.start(h.config("a1").with_git(pushing()));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    agent.shutdown().await;
    let run = &h.runs(item).await[0];
    let branch = format!("orch/{item}");

    let rec = h.orch.run_result(run.id).await.unwrap().expect("a result");
    let r = &rec.result;
    assert_eq!(r.branch, branch);
    assert!(r.committed && r.pushed, "{r:?}");
    assert_eq!((r.files_changed, r.insertions, r.deletions), (2, 2, 0), "{r:?}");
    assert_eq!(r.files, vec!["docs/notes.md".to_string(), "src/app.txt".to_string()]);
    assert!(rec.patch.contains("diff --git a/src/app.txt b/src/app.txt"), "{}", rec.patch);
    assert!(rec.patch.contains("+three"));
    assert!(rec.patch.contains("docs/notes.md"));
    assert_eq!(r.start_commit.as_deref(), Some(r.base_commit.as_str()));

    // The remote has the branch, at the recorded head, authored by the agent, with the title and run id.
    let head = git(&bare, &["rev-parse", &format!("refs/heads/{branch}")]);
    assert_eq!(head.trim(), r.head_commit);
    let main = git(&bare, &["rev-parse", "refs/heads/main"]);
    assert_eq!(main.trim(), r.base_commit, "main is untouched");
    let msg = git(&bare, &["log", "-1", "--format=%an <%ae>%n%B", &r.head_commit]);
    assert!(msg.starts_with("Ann Agent <ann@example.com>\nAdd a line"), "{msg}");
    assert!(msg.contains(&run.id.to_string()), "{msg}");
    let log = h.log_text(run.id).await;
    assert!(log.iter().any(|l| l.starts_with("committed 2 file(s) on") && l.contains("src/app.txt")), "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("pushed orch/")), "{log:?}");
    // The worktree of a succeeded run is removed (the branch keeps the work).
    assert!(!h.path("workspaces").join("items").join(item.to_string()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_agent_continues_from_the_failed_attempts_pushed_commit() {
    let h = Harness::new().await;
    let bare = h.bare_repo("remote");
    h.use_repository(&format!("file://{}", bare.display()), Some("main")).await;
    // First attempt: writes a file and fails. Second: finds the file, appends, succeeds.
    let recipe = h
        .recipe(
            "name: twice\nsteps:\n  - \"if [ -f progress.txt ]; then echo second >> progress.txt; else echo first > progress.txt; exit 3; fi\"\n",
        )
        .await;
    let retry = RetryOverrides { max_retries: Some(2), ..Default::default() };
    let item = h.item_with("Two attempts", "", Some(recipe), retry).await;
    let first = h.start(h.config("a1").with_git(pushing()).with_workspace_root(h.path("ws-a1")));
    wait_for("the first attempt to fail", Duration::from_secs(30), || async {
        let runs = h.runs(item).await;
        (runs.len() == 1 && runs[0].state == RunState::Failed).then_some(())
    })
    .await;
    first.shutdown().await;
    let second = h.start(h.config("a2").with_git(pushing()).with_workspace_root(h.path("ws-a2")));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    second.shutdown().await;
    let runs = h.runs(item).await;
    assert_eq!(runs.len(), 2);
    let r1 = h.orch.run_result(runs[0].id).await.unwrap().expect("the failed run's result").result;
    let r2 = h.orch.run_result(runs[1].id).await.unwrap().expect("the retry's result").result;
    assert!(r1.committed && r1.pushed);
    assert_eq!(r2.start_commit.as_deref(), Some(r1.head_commit.as_str()), "the retry starts from attempt 1's commit");
    assert_eq!(r2.base_commit, r1.base_commit);
    let content = git(&bare, &["show", &format!("refs/heads/orch/{item}:progress.txt")]);
    assert_eq!(content, "first\nsecond\n");
    let log = h.log_text(runs[1].id).await;
    assert!(log.iter().any(|l| l.contains("(the remote's copy)")), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_failure_fails_the_run_with_gits_message_and_an_unknown_base_branch_is_a_clear_error() {
    let h = Harness::new().await;
    let bare = h.bare_repo("remote");
    // A hook on the remote refuses every push.
    let hook = bare.join("hooks/pre-receive");
    std::fs::write(&hook, "#!/bin/sh\necho 'pushes are closed today' >&2\nexit 1\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    h.use_repository(bare.to_str().unwrap(), None).await;
    let recipe = h.recipe("name: edit\nsteps:\n  - echo x > x.txt\n").await;
    let retry = RetryOverrides { max_retries: Some(0), ..Default::default() };
    let item = h.item_with("Push me", "", Some(recipe), retry.clone()).await;
    let agent = h.start(h.config("a1").with_git(pushing()));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Failed);
    let err = h.runs(item).await[0].error.clone().unwrap_or_default();
    assert!(err.contains("cannot push") && err.contains("pushes are closed today"), "{err}");

    h.use_repository(bare.to_str().unwrap(), Some("no-such-branch")).await;
    let item = h.item_with("Wrong base", "", Some(recipe), retry).await;
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Failed);
    let err = h.runs(item).await[0].error.clone().unwrap_or_default();
    assert!(err.contains("no branch `no-such-branch`"), "{err}");
    agent.shutdown().await;
}
