//! The agent loop with the shell executor, against an in-process orchestrator over SQLite.

mod common;

use common::*;
use orchestrator_core::domain::{LogStream, StepEventKind};
use orchestrator_core::retry::{FailureKind, RetryOverrides};
use orchestrator_core::state::{RunState, WorkItemState};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_step_recipe_runs_in_order_with_env_cwd_and_streams() {
    let h = Harness::new().await;
    let recipe = h
        .recipe(
            r#"
name: three-steps
inputs:
  - name: GREETING
    default: hello
steps:
  - name: write
    run: echo "$GREETING from $ORCH_STEP_INDEX" > note.txt && echo out-1 && echo err-1 >&2
  - name: read
    run: cat ../../note.txt && pwd
    cwd: sub/dir
    env: {EXTRA: extra-value}
  - run: for i in 1 2 3 4 5; do echo "line $i"; done; echo "$EXTRA-unset"
"#,
        )
        .await;
    let item = h.item("three steps", "", Some(recipe)).await;
    let agent = h.start(h.config("a1").with_keep_workspaces(orchestrator_agent::KeepWorkspaces::Always));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    let report = agent.shutdown().await;
    assert_eq!(report.succeeded, 1);
    assert_eq!(report.claimed, 1);

    let runs = h.runs(item).await;
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.last_completed_step, Some(2));

    let logs = h.logs(run.id).await;
    let text: Vec<&str> = logs.iter().map(|l| l.line.as_str()).collect();
    let pos = |s: &str| text.iter().position(|l| *l == s).unwrap_or_else(|| panic!("no log line {s:?} in {text:?}"));
    assert!(pos("out-1") < pos("hello from 0"));
    assert!(pos("hello from 0") < pos("line 1"));
    for i in 1..5 {
        assert!(pos(&format!("line {i}")) < pos(&format!("line {}", i + 1)));
    }
    assert_eq!(logs.iter().find(|l| l.line == "err-1").unwrap().stream, LogStream::Stderr);
    assert_eq!(logs.iter().find(|l| l.line == "out-1").unwrap().stream, LogStream::Stdout);
    assert!(text.contains(&"-unset"), "step env must not leak into the next step: {text:?}");
    let ws = h.path("workspaces").join(run.id.to_string());
    let pwd = std::fs::canonicalize(ws.join("sub/dir")).unwrap();
    assert!(text.contains(&pwd.to_str().unwrap()), "cwd is inside the workspace: {text:?}");
    assert!(ws.join("note.txt").exists(), "workspace kept by policy");
    assert!(logs.windows(2).all(|w| w[0].seq + 1 == w[1].seq));

    let events = h.events(run.id).await;
    assert_eq!(events[0].kind, StepEventKind::Planned);
    assert_eq!(events[0].name, "recipe");
    assert_eq!(events[0].detail["steps"].as_array().unwrap().len(), 3);
    let steps: Vec<(Option<u32>, StepEventKind)> = events[1..].iter().map(|e| (e.step_index, e.kind)).collect();
    assert_eq!(
        steps,
        vec![
            (Some(0), StepEventKind::Started),
            (Some(0), StepEventKind::Succeeded),
            (Some(1), StepEventKind::Started),
            (Some(1), StepEventKind::Succeeded),
            (Some(2), StepEventKind::Started),
            (Some(2), StepEventKind::Succeeded),
        ]
    );
    assert_eq!(events[1].name, "write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_removed_on_success_by_default_and_cwd_escape_refused() {
    let h = Harness::new().await;
    let item = h.item("say `echo inferred-step`", "", None).await;
    let agent = h.start(h.config("a1"));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded);
    agent.shutdown().await;
    let run = &h.runs(item).await[0];
    assert!(h.log_text(run.id).await.contains(&"inferred-step".to_string()));
    let ev = h.events(run.id).await;
    assert_eq!(ev[0].name, "inference");
    assert!(!h.path("workspaces").join(run.id.to_string()).exists(), "on_failure policy removes successful workspaces");

    // A symlink out of the workspace is refused as a cwd.
    let ws = h.path("ws-escape");
    std::fs::create_dir_all(&ws).unwrap();
    std::os::unix::fs::symlink(h.dir.path(), ws.join("out")).unwrap();
    assert!(orchestrator_agent::shell::resolve_cwd(&ws, Some("out")).is_err());
    assert!(orchestrator_agent::shell::resolve_cwd(&ws, Some("../x")).is_err());
    assert!(orchestrator_agent::shell::resolve_cwd(&ws, Some("/etc")).is_err());
    assert!(orchestrator_agent::shell::resolve_cwd(&ws, Some("a/b")).unwrap().ends_with("a/b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_step_is_retried_with_backoff_and_succeeds_on_the_second_attempt() {
    let h = Harness::new().await;
    let marker = h.path("marker");
    let cmd = format!(
        "if [ -f '{m}' ]; then echo second-attempt; else touch '{m}'; echo first-attempt >&2; exit 3; fi",
        m = marker.display()
    );
    let recipe = h.recipe(&format!("name: flaky\nsteps:\n  - run: \"{}\"\n", cmd.replace('"', "\\\""))).await;
    let item = h.item("flaky", "", Some(recipe)).await;
    let agent = h.start(h.config("a1"));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    let report = agent.shutdown().await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    assert_eq!(w.attempts, 2);
    assert_eq!((report.failed, report.succeeded), (1, 1));
    let runs = h.runs(item).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].state, RunState::Failed);
    assert_eq!(runs[0].exit_code, Some(3));
    assert_eq!(runs[0].failure_kind, Some(FailureKind::Retryable));
    assert!(runs[0].error.as_deref().unwrap().contains("exit code 3"));
    assert_eq!(runs[1].state, RunState::Succeeded);
    // The backoff (50 ms, no jitter) separates the attempts.
    let gap = runs[1].claimed_at - runs[0].finished_at.unwrap();
    assert!(gap >= chrono::Duration::milliseconds(50), "retry came after {gap}");
    assert!(h.log_text(runs[0].id).await.contains(&"first-attempt".to_string()));
    assert!(h.log_text(runs[1].id).await.contains(&"second-attempt".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_process_group_including_grandchildren() {
    let h = Harness::new().await;
    let pidfile = h.path("grandchild.pid");
    // sh -c runs an inner sh, which starts sleep: sleep is a grandchild of the step's process.
    let cmd = format!("sh -c 'sleep 300 & echo $! > {}; wait'; echo never", pidfile.display());
    let recipe =
        h.recipe(&format!("name: slow\nsteps:\n  - run: \"{}\"\n    timeout: 1\n", cmd.replace('"', "\\\""))).await;
    let item =
        h.item_with("slow", "", Some(recipe), RetryOverrides { max_retries: Some(0), ..Default::default() }).await;
    let agent = h.start(h.config("a1"));
    let pid = read_pid(&pidfile).await;
    assert!(!process_gone(pid));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Failed);
    wait_for("the grandchild to be killed", Duration::from_secs(10), || async { process_gone(pid).then_some(()) })
        .await;
    agent.shutdown().await;
    let run = &h.runs(item).await[0];
    assert!(run.error.as_deref().unwrap().contains("timed out"), "{:?}", run.error);
    let lines = h.log_text(run.id).await;
    assert!(!lines.contains(&"never".to_string()));
    let ev = h.events(run.id).await;
    let failed = ev.iter().find(|e| e.kind == StepEventKind::Failed).unwrap();
    assert_eq!(failed.detail["timeout"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_mid_step_kills_its_processes_within_two_seconds_and_stops_writing() {
    let h = Harness::new().await;
    for cancel_the_item in [false, true] {
        let pidfile = h.path(&format!("sleep-{cancel_the_item}.pid"));
        let cmd = format!("sleep 60 & echo $! > {}; echo started; wait", pidfile.display());
        let recipe = h.recipe(&format!("name: long\nsteps:\n  - run: \"{}\"\n  - echo second-step\n", cmd)).await;
        let item = h.item("long", "", Some(recipe)).await;
        // A long lease: the heartbeat (every 20 s) is not what stops the step.
        let agent = h.start(h.config("a1").with_lease_ttl_seconds(60));
        let pid = read_pid(&pidfile).await;
        let run_id =
            wait_for("run", Duration::from_secs(10), || async { h.runs(item).await.first().map(|r| r.id) }).await;
        wait_for("started line", Duration::from_secs(10), || async {
            h.log_text(run_id).await.contains(&"started".to_string()).then_some(())
        })
        .await;
        if cancel_the_item {
            h.orch.cancel_work_item(item, Some("not needed (by ann)".into())).await.unwrap();
        } else {
            h.orch.cancel_run(run_id, Some("test cancels (by ann)".into())).await.unwrap();
        }
        // The agent hears of it at once (its cancellation watch), not at its next heartbeat.
        wait_for("the step's process to be killed", Duration::from_secs(2), || async {
            process_gone(pid).then_some(())
        })
        .await;
        let report = agent.shutdown().await;
        assert_eq!(report.lost, 1);
        let run = &h.runs(item).await[0];
        assert_eq!(run.state, RunState::Cancelled);
        assert_eq!(h.work_item(item).await.state, WorkItemState::Cancelled);
        let log = h.log_text(run_id).await;
        assert!(!log.contains(&"second-step".to_string()));
        let said = if cancel_the_item {
            "work item cancelled: not needed (by ann)"
        } else {
            "run cancelled: test cancels (by ann)"
        };
        assert!(log.contains(&said.to_string()), "the log says who cancelled: {log:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_work_finish_within_the_grace_period() {
    let h = Harness::new().await;
    let gate = h.path("gate");
    let cmd = format!("echo waiting; while [ ! -f '{}' ]; do sleep 0.05; done; echo finished", gate.display());
    let recipe = h.recipe(&format!("name: gated\nsteps:\n  - run: \"{}\"\n", cmd)).await;
    let item = h.item("gated", "", Some(recipe)).await;
    let agent = h.start(h.config("a1").with_shutdown_grace(Duration::from_secs(30)));
    let run_id = wait_for("run", Duration::from_secs(10), || async { h.runs(item).await.first().map(|r| r.id) }).await;
    wait_for("waiting line", Duration::from_secs(10), || async {
        h.log_text(run_id).await.contains(&"waiting".to_string()).then_some(())
    })
    .await;
    // Shut down while the step runs, then let it finish: it completes normally.
    let agent = agent.stop();
    std::fs::write(&gate, b"").unwrap();
    let report = agent.shutdown().await;
    assert_eq!(report.succeeded, 1);
    assert_eq!(h.work_item(item).await.state, WorkItemState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_the_grace_period_releases_the_run_without_using_an_attempt_five_times() {
    let h = Harness::new().await;
    let pidfile = h.path("sleep.pid");
    let cmd = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
    let recipe = h.recipe(&format!("name: long\nsteps:\n  - run: \"{}\"\n", cmd)).await;
    let item = h.item("long", "", Some(recipe)).await;
    let mut first_run = None;
    for round in 0..5 {
        let _ = std::fs::remove_file(&pidfile);
        let agent = h.start(h.config(&format!("a{round}")).with_shutdown_grace(Duration::from_millis(200)));
        let pid = read_pid(&pidfile).await;
        let report = agent.shutdown().await;
        assert_eq!(report.released, 1, "round {round}: {report:?}");
        wait_for("the step's process to be killed", Duration::from_secs(5), || async {
            process_gone(pid).then_some(())
        })
        .await;
        // Handed back: the same run waits for the next claim, the item is queued, no attempt used.
        let runs = h.runs(item).await;
        assert_eq!(runs.len(), 1, "round {round}: one run, resumed each time");
        assert_eq!(runs[0].state, RunState::WaitingInput, "round {round}");
        assert_eq!(*first_run.get_or_insert(runs[0].id), runs[0].id);
        let w = h.work_item(item).await;
        assert_eq!((w.state, w.attempts), (WorkItemState::Queued, 1), "round {round}");
        let log = h.log_text(runs[0].id).await;
        assert!(log.iter().any(|l| l.contains("handed back (no attempt used)")), "round {round}: {log:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_run_loses_its_lease_and_a_second_agent_completes_the_item_once() {
    let h = Harness::new().await;
    let marker = h.path("first-attempt-started");
    let done = h.path("completions");
    let pidfile = h.path("first.pid");
    let cmd = format!(
        "if [ -f '{m}' ]; then echo done >> '{d}'; echo second-agent; else sleep 300 & echo $! > '{p}'; touch '{m}'; wait; fi",
        m = marker.display(),
        d = done.display(),
        p = pidfile.display()
    );
    let recipe = h.recipe(&format!("name: once\nsteps:\n  - run: \"{}\"\n", cmd)).await;
    let item = h.item("once", "", Some(recipe)).await;
    let first = h.start(h.config("doomed").with_lease_ttl_seconds(1));
    wait_for("first attempt", Duration::from_secs(10), || async { marker.exists().then_some(()) }).await;
    // Kill the agent without any cleanup: its task (and the run's task) is dropped mid-step.
    let pid = read_pid(&pidfile).await;
    first.handle.abort();
    let _ = first.handle.await;
    // The aborted agent's step processes went with it.
    wait_for("the first attempt's process to be killed", Duration::from_secs(10), || async {
        process_gone(pid).then_some(())
    })
    .await;
    let second = h.start(h.config("rescuer").with_lease_ttl_seconds(5));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    let report = second.shutdown().await;
    assert_eq!(report.succeeded, 1);
    let runs = h.runs(item).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].state, RunState::Lost);
    assert_eq!(runs[0].agent_id, "doomed");
    assert_eq!(runs[1].state, RunState::Succeeded);
    assert_eq!(runs[1].agent_id, "rescuer");
    assert_eq!(std::fs::read_to_string(&done).unwrap().lines().count(), 1, "completed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_agent_wakes_at_once_and_fills_its_slots() {
    let h = Harness::new().await;
    // Polling every minute: only the wake-up signal can make this test pass in time.
    let agent = h.start(h.config("a1").with_concurrency(2).with_poll_interval(Duration::from_secs(60)));
    let gate = h.path("gate");
    let cmd = format!("while [ ! -f '{}' ]; do sleep 0.05; done", gate.display());
    let recipe = h.recipe(&format!("name: gated\nsteps:\n  - run: \"{}\"\n", cmd)).await;
    // A warm-up item: once it is done, the agent has nothing left to claim and waits for a wake-up.
    let warm = h.item("warm-up `true`", "", None).await;
    h.wait_state(warm, &[WorkItemState::Succeeded]).await;
    let items =
        [h.item("a", "", Some(recipe)).await, h.item("b", "", Some(recipe)).await, h.item("c", "", Some(recipe)).await];
    // Two slots: two runs at once, never three.
    wait_for("two running", Duration::from_secs(20), || async {
        let mut n = 0;
        for i in items {
            n += h.runs(i).await.len();
        }
        assert!(n <= 2, "more runs than slots");
        (n == 2).then_some(())
    })
    .await;
    std::fs::write(&gate, b"").unwrap();
    for i in items {
        let w = h.wait_state(i, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
        assert_eq!(w.state, WorkItemState::Succeeded);
    }
    let report = agent.shutdown().await;
    assert_eq!(report.succeeded, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_lines_arrive_in_order_in_batches() {
    let h = Harness::new().await;
    let recipe = h
        .recipe("name: chatty\nsteps:\n  - \"i=1; while [ $i -le 3000 ]; do echo \\\"n $i\\\"; i=$((i+1)); done\"\n")
        .await;
    let item = h.item("chatty", "", Some(recipe)).await;
    let agent = h.start(h.config("a1"));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    agent.shutdown().await;
    let run = &h.runs(item).await[0];
    let numbered: Vec<String> = h.log_text(run.id).await.into_iter().filter(|l| l.starts_with("n ")).collect();
    let expected: Vec<String> = (1..=3000).map(|i| format!("n {i}")).collect();
    assert_eq!(numbered, expected);
}
