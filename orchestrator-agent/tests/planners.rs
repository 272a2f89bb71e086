//! The planner chain: the LLM command planner against fake planner scripts, the OpenAI-compatible
//! fallback against a local fake server, and the chain as the agent records it.

mod common;

use common::*;
use orchestrator_agent::{CommandPlanner, InferencePlanner, OpenAiPlanner, RecipePlanner};
use orchestrator_core::agent::{plan_with_chain, PlanContext, Planner};
use orchestrator_core::domain::StepEventKind;
use orchestrator_core::recipe::StepSpec;
use orchestrator_core::state::WorkItemState;
use std::time::Duration;

async fn ctx(h: &Harness, title: &str, description: &str) -> PlanContext {
    let id = h.item(title, description, None).await;
    PlanContext { work_item: h.work_item(id).await, recipe: None, workspace: None }
}

fn planner_script(h: &Harness, name: &str, body: &str) -> String {
    let p = script(&h.path(name), &format!("#!/bin/sh\n{body}\n"));
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_planner_reads_the_prompt_on_stdin_and_parses_the_json_steps() {
    let h = Harness::new().await;
    let prompt_file = h.path("prompt.txt");
    let cmd = planner_script(
        &h,
        "valid.sh",
        &format!(
            "cat > '{}'\necho 'Here is the plan:'\necho '```json'\necho '[\"echo one\", {{\"run\": \"echo two\", \"env\": {{\"K\": \"V\"}}, \"timeout\": 30, \"cwd\": \"sub\"}}]'\necho '```'",
            prompt_file.display()
        ),
    );
    let c = ctx(&h, "Build the widget", "Make it shiny").await;
    let steps = CommandPlanner::new(cmd, Duration::from_secs(30)).plan(&c).await.unwrap().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0], StepSpec::command("echo one"));
    assert_eq!(steps[1].run, "echo two");
    assert_eq!(steps[1].env.get("K").map(String::as_str), Some("V"));
    assert_eq!(steps[1].timeout, Some(30));
    assert_eq!(steps[1].cwd.as_deref(), Some("sub"));
    let prompt = std::fs::read_to_string(&prompt_file).unwrap();
    assert!(prompt.contains("Build the widget") && prompt.contains("Make it shiny"), "{prompt}");
    assert!(prompt.contains("JSON array"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_planner_failures_fall_back_to_the_next_planner() {
    let h = Harness::new().await;
    let c = ctx(&h, "Run `echo inferred`", "").await;
    let cases = [
        ("garbage.sh", "cat >/dev/null; echo 'I think you should run make, maybe?'", "invalid plan"),
        ("nothing.sh", "cat >/dev/null", "printed nothing"),
        ("empty-array.sh", "cat >/dev/null; echo '[]'", "invalid plan"),
        ("fails.sh", "cat >/dev/null; echo '[\"echo x\"]'; echo boom >&2; exit 3", "exit code 3"),
        ("slow.sh", "sleep 30", "timed out"),
    ];
    for (name, body, why) in cases {
        let cmd = planner_script(&h, name, body);
        let planner = CommandPlanner::new(cmd, Duration::from_secs(1));
        let err = planner.plan(&c).await.unwrap_err();
        assert_eq!(err.planner, "llm-command");
        assert!(err.message.contains(why), "{name}: {}", err.message);
        let chain: Vec<Box<dyn Planner>> = vec![Box::new(RecipePlanner), Box::new(planner), Box::new(InferencePlanner)];
        let plan = plan_with_chain(&chain, &c).await.unwrap();
        assert_eq!(plan.planner, "inference", "{name}");
        assert_eq!(plan.steps, vec![StepSpec::command("echo inferred")]);
        assert_eq!(plan.fallbacks.len(), 2);
        assert_eq!(plan.fallbacks[0].planner, "recipe");
        assert_eq!(plan.fallbacks[1].planner, "llm-command");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_fallback_posts_a_chat_completion_and_parses_the_answer() {
    let h = Harness::new().await;
    let content = "```json\n[\"echo from-openai\", {\"run\": \"echo second\"}]\n```";
    let body = serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]});
    let (url, server) = fake_http_server(vec![(200, body.to_string())]).await;
    let c = ctx(&h, "Deploy the thing", "").await;
    let p = OpenAiPlanner::new(&format!("{url}/v1"), "sk-test-key", "test-model", Duration::from_secs(10));
    let steps = p.plan(&c).await.unwrap().unwrap();
    assert_eq!(steps, vec![StepSpec::command("echo from-openai"), StepSpec::command("echo second")]);
    let reqs = server.await.unwrap();
    let req = &reqs[0];
    assert!(req.starts_with("POST /v1/chat/completions "), "{req}");
    assert!(req.to_ascii_lowercase().contains("authorization: bearer sk-test-key"));
    let json: serde_json::Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["model"], "test-model");
    assert!(json["messages"][1]["content"].as_str().unwrap().contains("Deploy the thing"));

    // Error status, and an answer without a plan, are errors.
    let (url, _server) =
        fake_http_server(vec![(500, r#"{"error":"down"}"#.into()), (200, r#"{"choices":[]}"#.into())]).await;
    let p = OpenAiPlanner::new(&url, "k", "m", Duration::from_secs(10));
    assert!(p.plan(&c).await.unwrap_err().message.contains("500"));
    assert!(p.plan(&c).await.unwrap_err().message.contains("choices"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_records_which_planner_planned_after_the_llm_command_fails() {
    let h = Harness::new().await;
    let content = "[\"echo planned-by-openai\"]";
    let body = serde_json::json!({"choices": [{"message": {"content": content}}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 100}}});
    let (url, server) = fake_http_server(vec![(200, body.to_string())]).await;
    let failing = planner_script(&h, "fails.sh", "cat >/dev/null; exit 1");
    let item = h.item("plan me", "", None).await;
    let config =
        h.config("a1").with_llm_planning(Some(failing)).with_openai_fallback(format!("{url}/v1"), "sk-x", "gpt-test");
    let agent = h.start(config);
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    agent.shutdown().await;
    server.await.unwrap();
    let run = &h.runs(item).await[0];
    let events = h.events(run.id).await;
    let planned = events.iter().find(|e| e.kind == StepEventKind::Planned).unwrap();
    assert_eq!(planned.name, "openai");
    let fallbacks: Vec<&str> =
        planned.detail["fallbacks"].as_array().unwrap().iter().map(|f| f["planner"].as_str().unwrap()).collect();
    assert_eq!(fallbacks, vec!["recipe", "llm-command"]);
    let text = h.log_text(run.id).await;
    assert!(text.contains(&"planned-by-openai".to_string()), "{text:?}");
    assert!(text.iter().any(|l| l.starts_with("planner llm-command fell through")), "{text:?}");
    // The planner's tokens are the run's usage.
    assert_eq!((run.usage.input_tokens, run.usage.cached_input_tokens, run.usage.output_tokens), (120, 100, 30));

    // With a working LLM command, it plans (in the run's workspace), and its token total is recorded.
    let good = planner_script(
        &h,
        "good.sh",
        "cat >/dev/null; pwd > \"$ORCH_WORKSPACE/../planner-cwd\"; echo '[\"echo planned-by-llm\"]'; echo 'tokens used' >&2; echo '2,345' >&2",
    );
    let item = h.item("plan me too", "", None).await;
    let agent = h.start(h.config("a2").with_llm_planning(Some(good)));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded);
    agent.shutdown().await;
    let run = &h.runs(item).await[0];
    let events = h.events(run.id).await;
    assert_eq!(events.iter().find(|e| e.kind == StepEventKind::Planned).unwrap().name, "llm-command");
    assert!(h.log_text(run.id).await.contains(&"planned-by-llm".to_string()));
    assert_eq!(run.usage.input_tokens, 2345);
    let cwd = std::fs::read_to_string(h.path("workspaces").join("planner-cwd")).unwrap();
    assert!(cwd.trim().ends_with(&run.id.to_string()), "the planner runs in the run's workspace: {cwd}");
}
