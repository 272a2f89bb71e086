//! Info requests: missing recipe inputs become questions, the run waits without a slot, resumes after the
//! last completed step with the answers in its environment, and secrets never reach the logs.

mod common;

use async_trait::async_trait;
use common::*;
use orchestrator_agent::ShellExecutor;
use orchestrator_core::agent::{ExecutionContext, ExecutionOutcome, ExecutionSink, Executor};
use orchestrator_core::domain::{InfoRequestState, LogStream, NewStepEvent, StepEventKind};
use orchestrator_core::recipe::InputKind;
use orchestrator_core::state::{RunState, WorkItemState};
use orchestrator_core::store::{InfoRequestFilter, NewInfoRequest};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "s3cr3t-Value-42";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_inputs_are_asked_and_the_run_resumes_with_answers_and_secrets_redacted() {
    let h = Harness::new().await;
    let recipe = h
        .recipe(
            r#"
name: deploy
inputs:
  - name: TARGET
    prompt: "Where to?"
    kind: choice
    choices: [staging, prod]
  - name: API_TOKEN
    prompt: "The API token"
    kind: secret
  - name: OPTIONAL
    required: false
steps:
  - echo "target=$TARGET"
  - echo "token=$API_TOKEN"; echo "stderr $API_TOKEN" >&2
  - test "$(printf %s "$API_TOKEN" | tr a-z A-Z)" = "S3CR3T-VALUE-42" && echo token-ok
"#,
        )
        .await;
    let item = h.item("deploy", "", Some(recipe)).await;
    // One slot: while the run waits for input, the slot must be free for other work.
    let agent = h.start(h.config("a1").with_concurrency(1));
    h.wait_state(item, &[WorkItemState::WaitingInput]).await;
    let run_id = h.runs(item).await[0].id;
    assert_eq!(h.runs(item).await[0].state, RunState::WaitingInput);
    let mut pending = h
        .orch
        .store()
        .info_request_list(InfoRequestFilter {
            run_id: Some(run_id),
            state: Some(InfoRequestState::Pending),
            ..Default::default()
        })
        .await
        .unwrap();
    pending.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = pending.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, vec!["API_TOKEN", "TARGET"], "optional inputs are not asked");
    assert_eq!(pending[0].kind, InputKind::Secret);
    assert_eq!(pending[1].kind, InputKind::Choice);
    assert_eq!(pending[1].prompt, "Where to?");
    assert_eq!(pending[1].choices, vec!["staging", "prod"]);

    // The slot is free: another item runs while the first waits.
    let other = h.item("other `echo other-ran`", "", None).await;
    let w = h.wait_state(other, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded);

    for r in &pending {
        let v = if r.key == "TARGET" { "staging" } else { SECRET };
        h.orch.answer_info_request(r.id, v, "tester").await.unwrap();
    }
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    let report = agent.shutdown().await;
    assert_eq!(report.waiting_input, 1);
    assert_eq!(report.succeeded, 2);

    let runs = h.runs(item).await;
    assert_eq!(runs.len(), 1, "the resumed run is the same run");
    let logs = h.logs(run_id).await;
    let text: Vec<&str> = logs.iter().map(|l| l.line.as_str()).collect();
    assert!(text.contains(&"target=staging"), "{text:?}");
    assert!(text.contains(&"token=[REDACTED]"), "{text:?}");
    assert!(text.contains(&"token-ok"), "{text:?}");
    assert!(logs.iter().any(|l| l.stream == LogStream::Stderr && l.line == "stderr [REDACTED]"));
    assert!(!text.iter().any(|l| l.contains(SECRET)), "secret leaked into the logs: {text:?}");
    let events = h.events(run_id).await;
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(SECRET), "secret leaked into step events");
    assert!(events.iter().any(|e| e.kind == StepEventKind::Info && e.name == "needs_input"));
    assert_eq!(events.iter().filter(|e| e.kind == StepEventKind::Planned).count(), 2, "planned on each claim");
}

/// A custom executor: runs the shell executor for the steps, but asks a question after step 0 until it
/// has the answer, recording where each execution started.
struct AskAfterFirstStep {
    inner: ShellExecutor,
    starts: Mutex<Vec<u32>>,
}

#[async_trait]
impl Executor for AskAfterFirstStep {
    fn name(&self) -> &str {
        "ask-after-first"
    }
    async fn execute(&self, mut ctx: ExecutionContext, sink: &dyn ExecutionSink) -> ExecutionOutcome {
        self.starts.lock().unwrap().push(ctx.start_step);
        if !ctx.assignment.answers.contains_key("CONFIRM") {
            // Run only step 0, then ask.
            ctx.steps.truncate(1);
            match self.inner.execute(ctx, sink).await {
                ExecutionOutcome::Succeeded { .. } => {}
                other => return other,
            }
            sink.step_event(NewStepEvent {
                step_index: None,
                kind: StepEventKind::Info,
                name: "asking".into(),
                detail: serde_json::Value::Null,
            })
            .await;
            return ExecutionOutcome::NeedsInput {
                questions: vec![NewInfoRequest {
                    key: "CONFIRM".into(),
                    prompt: "Go on?".into(),
                    kind: InputKind::Text,
                    choices: vec![],
                    deadline: None,
                }],
            };
        }
        self.inner.execute(ctx, sink).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_continues_after_its_last_completed_step() {
    let h = Harness::new().await;
    let counter = h.path("first-step-runs");
    let recipe = h
        .recipe(&format!("name: two\nsteps:\n  - echo ran >> '{}'\n  - echo \"confirm=$CONFIRM\"\n", counter.display()))
        .await;
    let item = h.item("two", "", Some(recipe)).await;
    let exec = Arc::new(AskAfterFirstStep {
        inner: ShellExecutor::new(Duration::from_secs(60), Duration::from_millis(200)),
        starts: Mutex::new(Vec::new()),
    });
    let agent = h.start_with(h.config("a1"), exec.clone());
    h.wait_state(item, &[WorkItemState::WaitingInput]).await;
    let run = h.runs(item).await.remove(0);
    assert_eq!(run.last_completed_step, Some(0));
    let q = h
        .orch
        .store()
        .info_request_list(InfoRequestFilter { run_id: Some(run.id), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(q.len(), 1);
    h.orch.answer_info_request(q[0].id, "yes", "tester").await.unwrap();
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    agent.shutdown().await;
    assert_eq!(*exec.starts.lock().unwrap(), vec![0, 1]);
    assert_eq!(std::fs::read_to_string(&counter).unwrap().lines().count(), 1, "step 0 ran once");
    let text = h.log_text(run.id).await;
    assert!(text.contains(&"confirm=yes".to_string()), "{text:?}");
    let events = h.events(run.id).await;
    assert!(events.iter().any(|e| e.kind == StepEventKind::Skipped && e.step_index == Some(0)));
    let planned = events.iter().rfind(|e| e.kind == StepEventKind::Planned).unwrap();
    assert_eq!(planned.detail["executor"], "ask-after-first");
    assert_eq!(planned.detail["resumed"], true);
}
