//! A host program with its own executor: an in-process orchestrator (MemoryStore), an embedded agent
//! running a custom `Executor`, one work item from creation to a finished run with its logs.
//!
//! Run it with `cargo run -p orchestrator-agent --example custom_executor`.

use async_trait::async_trait;
use orchestrator_agent::{Agent, AgentConfig};
use orchestrator_core::agent::{ExecutionContext, ExecutionOutcome, ExecutionSink, Executor};
use orchestrator_core::domain::{LogStream, NewStepEvent, StepEventKind};
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::state::WorkItemState;
use orchestrator_core::store::EnqueueOptions;
use orchestrator_core::{MemoryStore, Orchestrator, OrchestratorConfig, Store};
use std::sync::Arc;
use std::time::Duration;

/// "Executes" each planned step by reporting it; a real one would call an API, run a container, ...
struct Announcer;

#[async_trait]
impl Executor for Announcer {
    fn name(&self) -> &str {
        "announcer"
    }

    async fn execute(&self, ctx: ExecutionContext, sink: &dyn ExecutionSink) -> ExecutionOutcome {
        for (i, step) in ctx.steps.iter().enumerate().skip(ctx.start_step as usize) {
            if ctx.cancel.is_cancelled() {
                return ExecutionOutcome::Cancelled;
            }
            let event = |kind| NewStepEvent {
                step_index: Some(i as u32),
                kind,
                name: step.run.clone(),
                detail: serde_json::Value::Null,
            };
            sink.step_event(event(StepEventKind::Started)).await;
            sink.log(LogStream::Stdout, format!("would run: {}", step.run)).await;
            sink.step_event(event(StepEventKind::Succeeded)).await;
        }
        ExecutionOutcome::Succeeded { exit_code: Some(0) }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let orch = Orchestrator::new(store.clone(), OrchestratorConfig::default());
    let project = orch.create_project("demo", "custom executor demo").await?;
    let item = orch
        .create_work_item(CreateWorkItem {
            project_id: Some(project.id),
            title: "Greet the world".into(),
            description: "Steps:\n$ echo hello\n$ echo world\n".into(),
            enqueue: Some(EnqueueOptions::default()),
            ..Default::default()
        })
        .await?
        .work_item;

    let config = AgentConfig::new("demo-agent").with_poll_interval(Duration::from_millis(200));
    let agent = Agent::new(Arc::new(orch.clone()), config).with_executor(Arc::new(Announcer));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));

    // Wait (with a deadline) for the work item to finish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let item = loop {
        let w = store.work_item_get(item.id).await?;
        if matches!(w.state, WorkItemState::Succeeded | WorkItemState::Failed) {
            break w;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the work item did not finish in time".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = stop.send(());
    let report = running.await??;
    println!("work item `{}`: {}", item.title, item.state.as_str());
    if let Some(run) = item.current_run_id {
        for line in store.logs_read_after(run, 0, 1000).await? {
            println!("  [{}] {}", line.stream.as_str(), line.line);
        }
    }
    println!("{report:?}");
    Ok(())
}
