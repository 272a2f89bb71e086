//! A walk through the whole flow, in-process on the MemoryStore: project, vision, requirements,
//! approval, work items with a dependency and a recipe, enqueue, an agent claiming, asking for input,
//! logging and completing, with a failure retried after backoff.
//!
//! Run: `cargo run -p orchestrator-core --example demo`

use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::crypto::{Keyring, SecretKey};
use orchestrator_core::domain::{LogStream, NewLogLine, NewStepEvent, RequirementSpec, RunOutcome, StepEventKind};
use orchestrator_core::recipe::InputKind;
use orchestrator_core::retry::FailureKind;
use orchestrator_core::store::{Decision, EnqueueOptions, NewInfoRequest};
use orchestrator_core::{MemoryStore, Orchestrator, OrchestratorConfig, Store};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = OrchestratorConfig { require_approval: true, ..Default::default() };
    config.retry.backoff_base_seconds = 0.0; // retry at once in the demo
    config.keyring = Some(Keyring::new("demo", SecretKey::generate())?);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let orch = Orchestrator::new(store.clone(), config);

    let project = orch.create_project("demo", "A sample project").await?;
    orch.put_vision(project.id, "Ship a tiny CLI that greets people.", Some("you".into())).await?;
    let reqs = vec![
        RequirementSpec {
            title: "Write the greeter".into(),
            description: String::new(),
            labels: vec![],
            priority: 1,
            recipe_id: None,
        },
        RequirementSpec {
            title: "Test the greeter".into(),
            description: String::new(),
            labels: vec![],
            priority: 0,
            recipe_id: None,
        },
    ];
    let (draft, approval) = orch.propose_requirements(project.id, "MVP", reqs, Some("you".into())).await?;
    println!("proposed draft {} (approval {:?})", draft.id, approval.as_ref().map(|a| a.id));
    let outcome = orch.decide_draft(draft.id, Decision::Approve, "reviewer", Some("looks good".into())).await?;
    let (write, test) = (outcome.work_items[0].clone(), outcome.work_items[1].clone());
    let recipe = orch
        .create_recipe(
            Some(project.id),
            "name: greet\ninputs:\n  - name: GREETING\n    kind: secret\nsteps:\n  - echo $GREETING\n",
        )
        .await?;
    // Attaching a recipe is an edit: under the approval policy it needs a fresh approval.
    let changed = orch.attach_recipe(write.id, recipe.id).await?;
    if let Some(a) = changed.approval {
        orch.decide_approval(a.id, Decision::Approve, "reviewer", None).await?;
    }
    orch.enqueue(write.id, EnqueueOptions::default()).await?;
    orch.enqueue(test.id, EnqueueOptions { depends_on: vec![write.id], ..Default::default() }).await?;

    let claim = ClaimRequest { agent_id: "agent-1".into(), capabilities: vec![], max: 4, lease_ttl_seconds: None };
    let a = orch.claim(claim.clone()).await?.remove(0);
    println!(
        "claimed run {} for {:?} (recipe {:?})",
        a.run_id(),
        a.claimed.work_item.title,
        a.recipe.as_ref().map(|r| &r.name)
    );
    orch.start(a.run_id(), a.token()).await?;
    let q = NewInfoRequest {
        key: "GREETING".into(),
        prompt: "What should it say?".into(),
        kind: InputKind::Secret,
        choices: vec![],
        deadline: None,
    };
    let asked = orch.ask(a.run_id(), a.token(), vec![q]).await?;
    orch.answer_info_request(asked[0].id, "hello", "you").await?;
    let a = orch.claim(claim.clone()).await?.remove(0);
    println!("resumed run {} with answers for {:?}", a.run_id(), a.answers.keys().collect::<Vec<_>>());
    orch.append_logs(
        a.run_id(),
        a.token(),
        vec![NewLogLine { stream: LogStream::Stdout, line: "greeting written".into() }],
    )
    .await?;
    orch.record_steps(
        a.run_id(),
        a.token(),
        vec![NewStepEvent {
            step_index: Some(0),
            kind: StepEventKind::Succeeded,
            name: "echo".into(),
            detail: serde_json::Value::Null,
        }],
    )
    .await?;
    let done = orch.complete(a.run_id(), a.token(), RunOutcome::Succeeded { exit_code: Some(0) }, None).await?;
    println!("write: {}; released dependents: {}", done.work_item_state, done.released.len());

    let b = orch.claim(claim.clone()).await?.remove(0);
    let failed = orch
        .complete(
            b.run_id(),
            b.token(),
            RunOutcome::Failed { error: "flaky test".into(), exit_code: Some(1), kind: FailureKind::Retryable },
            None,
        )
        .await?;
    println!("test attempt 1: {} (retry at {:?})", failed.work_item_state, failed.retry_at);
    let b = orch.claim(claim).await?.remove(0);
    let ok = orch.complete(b.run_id(), b.token(), RunOutcome::Succeeded { exit_code: Some(0) }, None).await?;
    println!("test attempt {}: {}", b.claimed.run.attempt, ok.work_item_state);
    for l in store.logs_read_after(a.run_id(), 0, 100).await? {
        println!("log #{} [{}] {}", l.seq, l.stream.as_str(), l.line);
    }
    println!("stats: {:?}", store.stats().await?.work_items);
    Ok(())
}
