//! The codex executor against a fake `codex` script replaying recorded JSONL event fixtures.

mod common;

use common::*;
use orchestrator_agent::ExecutorKind;
use orchestrator_core::domain::StepEventKind;
use orchestrator_core::retry::RetryOverrides;
use orchestrator_core::state::{RunState, WorkItemState};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A fake codex: records its arguments, working directory and stdin, replays a fixture, exits with `code`.
fn fake_codex(h: &Harness, fixture_name: &str, code: i32) -> String {
    let body = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{args}'\npwd > '{pwd}'\ncat > '{stdin}'\necho 'codex diagnostics on stderr' >&2\ncat '{fx}'\nexit {code}\n",
        args = h.path("args").display(),
        pwd = h.path("pwd").display(),
        stdin = h.path("stdin").display(),
        fx = fixture(fixture_name).display(),
    );
    script(&h.path("codex"), &body).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_events_become_step_events_logs_and_usage() {
    let h = Harness::new().await;
    let bin = fake_codex(&h, "codex_success.jsonl", 0);
    let recipe = h.recipe("name: greet\nsteps:\n  - echo this-is-the-recipe-step\n").await;
    let item = h.item("Write a greeting file", "Put hi into hello.txt", Some(recipe)).await;
    let config =
        h.config("a1").with_executor(ExecutorKind::Codex).with_codex_bin(bin).with_codex_args(["-m", "some-model"]);
    let agent = h.start(config);
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    agent.shutdown().await;
    let run = &h.runs(item).await[0];
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.usage.input_tokens, 24763);
    assert_eq!(run.usage.cached_input_tokens, 24448);
    assert_eq!(run.usage.output_tokens, 122);

    let args: Vec<String> = std::fs::read_to_string(h.path("args")).unwrap().lines().map(str::to_string).collect();
    let pos = |a: &str| args.iter().position(|x| x == a).unwrap_or_else(|| panic!("no {a} in {args:?}"));
    assert!(pos("-a") < pos("exec"), "approval policy goes before exec: {args:?}");
    assert_eq!(args[pos("--sandbox") + 1], "workspace-write");
    assert!(pos("--json") > pos("exec"));
    assert_eq!(args[pos("-m") + 1], "some-model");
    assert_eq!(args.last().unwrap(), "-");
    let ws = h.path("workspaces").join(run.id.to_string());
    assert!(args[pos("-C") + 1].ends_with(&run.id.to_string()));
    assert!(!ws.exists() || ws.is_dir());
    let pwd = std::fs::read_to_string(h.path("pwd")).unwrap();
    assert!(pwd.trim().ends_with(&run.id.to_string()), "runs inside the run's workspace: {pwd}");
    let prompt = std::fs::read_to_string(h.path("stdin")).unwrap();
    assert!(prompt.contains("Write a greeting file"));
    assert!(prompt.contains("Put hi into hello.txt"));
    assert!(prompt.contains("this-is-the-recipe-step"));

    let text = h.log_text(run.id).await;
    for expected in [
        "Created hello.txt with the greeting.",
        "All done.",
        "hi",
        "[reasoning] **Planning the change**",
        "$ bash -lc 'echo hi > hello.txt && cat hello.txt'",
        "file add: hello.txt",
        "todo [x] create the file",
        "todo [ ] report back",
        "codex diagnostics on stderr",
    ] {
        assert!(text.contains(&expected.to_string()), "missing {expected:?} in {text:?}");
    }
    assert!(text.iter().any(|l| l.contains("some.future.event")), "unknown events pass through as logs");

    let events = h.events(run.id).await;
    let names: Vec<(&str, StepEventKind)> = events.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    for expected in [
        ("codex", StepEventKind::Started),
        ("thread.started", StepEventKind::Info),
        ("command_execution", StepEventKind::Info),
        ("file_change", StepEventKind::Info),
        ("turn.completed", StepEventKind::Info),
        ("codex", StepEventKind::Succeeded),
    ] {
        assert!(names.contains(&expected), "missing {expected:?} in {names:?}");
    }
    let cmd = events.iter().find(|e| e.name == "command_execution").unwrap();
    assert_eq!(cmd.detail["exit_code"], 0);
    let thread = events.iter().find(|e| e.name == "thread.started").unwrap();
    assert_eq!(thread.detail["thread_id"], "0199a213-81c0-7800-8aa1-bbab2a035a53");
}

async fn failing_case(fixture_name: &str, code: i32, expect: &str) {
    let h = Harness::new().await;
    let bin = fake_codex(&h, fixture_name, code);
    let item = h.item_with("fail", "", None, RetryOverrides { max_retries: Some(0), ..Default::default() }).await;
    let agent = h.start(h.config("a1").with_executor(ExecutorKind::Codex).with_codex_bin(bin));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    agent.shutdown().await;
    assert_eq!(w.state, WorkItemState::Failed, "{fixture_name}");
    let run = &h.runs(item).await[0];
    assert_eq!(run.exit_code, Some(code));
    let err = run.error.as_deref().unwrap();
    assert!(err.contains(expect), "{fixture_name}: {err}");
    let events = h.events(run.id).await;
    assert!(events.iter().any(|e| e.name == "codex" && e.kind == StepEventKind::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_turn_fails_the_run() {
    failing_case("codex_turn_failed.jsonl", 1, "stream disconnected before completion").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_zero_without_a_completed_turn_is_a_failure() {
    failing_case("codex_no_turn_completed.jsonl", 0, "no completed turn").await;
}
