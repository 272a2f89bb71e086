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

/// A fake codex for a work item's checkout: records its arguments, stdin and environment (per call),
/// changes the checkout (`edit`, run in its working directory), writes `final_message` to the `-o` file,
/// replays `fixture_name` (or, when `resume_fixture` is given and it was asked to resume, that one) and
/// exits with 0.
fn scripted_codex(
    h: &Harness,
    fixture_name: &str,
    resume_fixture: Option<&str>,
    edit: &str,
    final_message: &str,
) -> String {
    let body = format!(
        r#"#!/bin/sh
n=$(ls '{calls}' 2>/dev/null | wc -l)
d='{calls}'/$n; mkdir -p "$d"
printf '%s\n' "$@" > "$d/args"; cat > "$d/stdin"; env > "$d/env"; pwd > "$d/pwd"
out=''; prev=''; resume=''
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  [ "$a" = "resume" ] && resume=1
  prev="$a"
done
{edit}
fx='{fx}'
if [ -n "$resume" ] && [ -n '{rfx}' ]; then fx='{rfx}'; printf '%s' '{{"status":"done","summary":"deployed","questions":[]}}' > "$out"
else printf '%s' '{final_message}' > "$out"; fi
cat "$fx"
"#,
        calls = h.path("calls").display(),
        fx = fixture(fixture_name).display(),
        rfx = resume_fixture.map(|f| fixture(f).display().to_string()).unwrap_or_default(),
    );
    script(&h.path("codex"), &body).display().to_string()
}

fn call_file(h: &Harness, n: usize, what: &str) -> String {
    std::fs::read_to_string(h.path("calls").join(n.to_string()).join(what)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_on_a_repository_plans_itself_and_its_edits_become_the_runs_commit() {
    let h = Harness::new().await;
    let bare = h.bare_repo("remote");
    h.use_repository(bare.to_str().unwrap(), None).await;
    let done = r#"{"status":"done","summary":"wrote hello","questions":[]}"#;
    let bin = scripted_codex(&h, "codex_success.jsonl", None, "echo hi > hello.txt", done);
    let item = h.item("Write a greeting file", "Put hi into hello.txt", None).await;
    // An LLM planner that must not be called: codex plans itself.
    let marker = h.path("planner-called");
    let config = h
        .config("a1")
        .with_executor(ExecutorKind::Codex)
        .with_codex_bin(bin)
        .with_llm_planning(Some(format!("touch '{}'; echo '[]'", marker.display())));
    let agent = h.start(config);
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    agent.shutdown().await;
    assert!(!marker.exists(), "a planning call was spent although codex plans itself");
    let run = &h.runs(item).await[0];
    let planned = h.events(run.id).await.into_iter().find(|e| e.kind == StepEventKind::Planned).unwrap();
    assert_eq!(planned.name, "codex");
    assert_eq!(planned.detail["executor_plans"], true);
    let rec = h.orch.run_result(run.id).await.unwrap().expect("a result");
    assert_eq!(rec.result.files, vec!["hello.txt".to_string()]);
    assert!(rec.patch.contains("+hi"));

    let args: Vec<String> = call_file(&h, 0, "args").lines().map(str::to_string).collect();
    let has = |a: &str, b: &str| args.windows(2).any(|w| w[0] == a && w[1] == b);
    assert!(has("--disable", "unbounded_connection_retries"), "{args:?}");
    assert!(has("-c", "sandbox_workspace_write.exclude_slash_tmp=true"), "{args:?}");
    assert!(has("-c", "sandbox_workspace_write.exclude_tmpdir_env_var=true"), "{args:?}");
    assert!(args.iter().any(|a| a == "--output-schema") && args.iter().any(|a| a == "-o"));
    let cwd = call_file(&h, 0, "pwd");
    assert!(cwd.trim().ends_with(&format!("items/{item}")), "{cwd}");
    let prompt = call_file(&h, 0, "stdin");
    assert!(prompt.contains(&format!("branch `orch/{item}`")) && prompt.contains(bare.to_str().unwrap()), "{prompt}");
    assert!(prompt.contains("needs_input"), "the prompt says how to ask a person: {prompt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_codex_is_killed_after_the_idle_timeout_as_a_retryable_failure() {
    let h = Harness::new().await;
    let pidfile = h.path("codex.pid");
    let body = format!(
        "#!/bin/sh\necho $$ > '{}'\necho '{{\"type\":\"thread.started\",\"thread_id\":\"t\"}}'\nsleep 300\n",
        pidfile.display()
    );
    let bin = script(&h.path("codex"), &body).display().to_string();
    let item = h.item_with("hang", "", None, RetryOverrides { max_retries: Some(0), ..Default::default() }).await;
    let config = h
        .config("a1")
        .with_executor(ExecutorKind::Codex)
        .with_codex_bin(bin)
        .with_codex_idle_timeout(std::time::Duration::from_secs(1));
    let agent = h.start(config);
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    agent.shutdown().await;
    assert_eq!(w.state, WorkItemState::Failed);
    let run = &h.runs(item).await[0];
    assert_eq!(run.failure_kind, Some(orchestrator_core::retry::FailureKind::Retryable));
    assert!(run.error.as_deref().unwrap().contains("printed no event for 1 s"), "{:?}", run.error);
    assert!(process_gone(read_pid(&pidfile).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_model_refuses_as_invalid_is_not_retried() {
    let h = Harness::new().await;
    let bin = fake_codex(&h, "codex_invalid_request.jsonl", 1);
    let item = h.item_with("bad model", "", None, RetryOverrides { max_retries: Some(3), ..Default::default() }).await;
    let agent = h.start(h.config("a1").with_executor(ExecutorKind::Codex).with_codex_bin(bin));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    agent.shutdown().await;
    assert_eq!(w.state, WorkItemState::Failed);
    let runs = h.runs(item).await;
    assert_eq!(runs.len(), 1, "no retry");
    assert_eq!(runs[0].failure_kind, Some(orchestrator_core::retry::FailureKind::Permanent));
    assert!(runs[0].error.as_deref().unwrap().contains("400 Bad Request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_asks_a_person_and_its_session_is_resumed_with_the_answer() {
    let h = Harness::new().await;
    let bare = h.bare_repo("remote");
    h.use_repository(bare.to_str().unwrap(), None).await;
    let ask = r#"{"status":"needs_input","summary":"I need the deploy token","questions":[{"key":"DEPLOY_TOKEN","prompt":"Which token may I deploy with?","kind":"secret","choices":[]}]}"#;
    let bin = scripted_codex(
        &h,
        "codex_needs_input.jsonl",
        Some("codex_success.jsonl"),
        "echo \"token length ${#DEPLOY_TOKEN}\" >> deploy.log",
        ask,
    );
    let item = h.item("Deploy", "Deploy the app", None).await;
    let git_settings = orchestrator_agent::GitSettings { push: true, ..Default::default() };
    let agent = h.start(h.config("a1").with_executor(ExecutorKind::Codex).with_codex_bin(bin).with_git(git_settings));
    let w = h.wait_state(item, &[WorkItemState::WaitingInput, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::WaitingInput, "{:?}", w.last_error);
    let run_id = h.runs(item).await[0].id;
    // The turn that ended in the question is counted.
    assert_eq!(h.runs(item).await[0].usage.input_tokens, 1000);
    let questions = h
        .orch
        .store()
        .info_request_list(orchestrator_core::store::InfoRequestFilter { run_id: Some(run_id), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(questions.len(), 1);
    assert_eq!(questions[0].key, "DEPLOY_TOKEN");
    assert_eq!(questions[0].kind, orchestrator_core::recipe::InputKind::Secret);
    h.orch.answer_info_request(questions[0].id, "s3cr3t-token-value", "ann").await.unwrap();
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    agent.shutdown().await;

    // The second call resumed the first call's session, in the same checkout, with the answer as an
    // environment variable only.
    let args: Vec<String> = call_file(&h, 1, "args").lines().map(str::to_string).collect();
    let at = args.iter().position(|a| a == "resume").expect("codex exec resume");
    assert_eq!(args[at + 1], "0199a216-aaaa-7000-8000-00000000beef");
    assert_eq!(args.last().unwrap(), "-");
    assert_eq!(call_file(&h, 0, "pwd"), call_file(&h, 1, "pwd"));
    let prompt = call_file(&h, 1, "stdin");
    assert!(prompt.contains("DEPLOY_TOKEN") && !prompt.contains("s3cr3t-token-value"), "{prompt}");
    assert!(call_file(&h, 1, "env").contains("DEPLOY_TOKEN=s3cr3t-token-value"));
    let log = h.log_text(run_id).await;
    assert!(!log.iter().any(|l| l.contains("s3cr3t-token-value")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("resuming codex session")), "{log:?}");
    // Both calls' edits are on the branch.
    let rec = h.orch.run_result(run_id).await.unwrap().expect("a result");
    let content = git(&bare, &["show", &format!("{}:deploy.log", rec.result.head_commit)]);
    assert_eq!(content, "token length 0\ntoken length 18\n");
}
