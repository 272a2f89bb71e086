//! The conformance suite every [`Store`] must pass (feature `testing`).
//!
//! Cases are plain async functions in [`cases`] taking a fresh store; the
//! [`store_conformance_tests!`](crate::store_conformance_tests) macro stamps them out as `#[tokio::test]`s
//! for a store factory, and [`model`] holds a property test comparing a store with a simple model.
//!
//! ```text
//! orchestrator_core::store_conformance_tests!(|| async {
//!     std::sync::Arc::new(orchestrator_core::MemoryStore::new()) as std::sync::Arc<dyn orchestrator_core::Store>
//! });
//! ```

pub mod cases;
pub mod cases_edge;
pub mod cases_flow;
pub mod cases_sched;
pub mod model;

use crate::agent::{AgentApi, Assignment, ClaimRequest};
use crate::clock::ManualClock;
use crate::config::OrchestratorConfig;
use crate::domain::*;
use crate::ids::*;
use crate::orchestrator::{CreateWorkItem, Orchestrator};
use crate::retry::RetryPolicy;
use crate::store::*;
use std::sync::Arc;

/// A store with a manual clock and a facade over it.
#[derive(Clone)]
pub struct Harness {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// The clock every operation reads.
    pub clock: ManualClock,
    /// The facade.
    pub orch: Orchestrator,
}

impl Harness {
    /// Default policy with deterministic retries: no jitter, base 10 s, cap 300 s, 3 retries; lease 30 s.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_config(store, |_| {})
    }

    /// Like [`Harness::new`] with the configuration adjusted by `f`.
    pub fn with_config(store: Arc<dyn Store>, f: impl FnOnce(&mut OrchestratorConfig)) -> Self {
        let clock = ManualClock::at_epoch();
        let mut config = OrchestratorConfig {
            retry: RetryPolicy { max_retries: 3, backoff_base_seconds: 10.0, backoff_cap_seconds: 300.0, jitter: 0.0 },
            lease_ttl: chrono::Duration::seconds(30),
            ..OrchestratorConfig::default()
        };
        f(&mut config);
        let orch = Orchestrator::with_clock(store.clone(), config, Arc::new(clock.clone()));
        Harness { store, clock, orch }
    }

    /// Creates a project.
    pub async fn project(&self) -> Project {
        self.orch.create_project("proj", "a project").await.expect("create project")
    }

    /// Creates a `ready` work item (the harness default has no approval policy).
    pub async fn item(&self, project: ProjectId, title: &str) -> WorkItem {
        self.orch
            .create_work_item(CreateWorkItem { project_id: Some(project), title: title.into(), ..Default::default() })
            .await
            .expect("create work item")
            .work_item
    }

    /// Creates and enqueues a work item with a priority and dependencies.
    pub async fn queued(&self, project: ProjectId, title: &str, priority: i32, deps: &[WorkItemId]) -> WorkItem {
        self.orch
            .create_work_item(CreateWorkItem {
                project_id: Some(project),
                title: title.into(),
                priority,
                enqueue: Some(EnqueueOptions { priority: None, depends_on: deps.to_vec(), not_before: None }),
                ..Default::default()
            })
            .await
            .expect("create and enqueue")
            .work_item
    }

    /// Claims up to `max` runs as `agent`.
    pub async fn claim(&self, agent: &str, max: u32) -> Vec<Assignment> {
        self.orch
            .claim(ClaimRequest { agent_id: agent.into(), capabilities: vec![], max, lease_ttl_seconds: None })
            .await
            .expect("claim")
    }

    /// Claims exactly one run, panicking otherwise.
    pub async fn claim_one(&self, agent: &str) -> Assignment {
        let mut v = self.claim(agent, 1).await;
        assert_eq!(v.len(), 1, "expected one claimable run");
        v.remove(0)
    }

    /// Completes a run successfully.
    pub async fn succeed(&self, a: &Assignment) -> CompletionResult {
        self.orch
            .complete(a.run_id(), a.token(), RunOutcome::Succeeded { exit_code: Some(0) }, None)
            .await
            .expect("complete")
    }

    /// Fails a run (retryable).
    pub async fn fail(&self, a: &Assignment) -> CompletionResult {
        self.orch
            .complete(
                a.run_id(),
                a.token(),
                RunOutcome::Failed {
                    error: "boom".into(),
                    exit_code: Some(1),
                    kind: crate::retry::FailureKind::Retryable,
                },
                None,
            )
            .await
            .expect("complete")
    }

    /// Reads a work item's state.
    pub async fn state_of(&self, id: WorkItemId) -> crate::state::WorkItemState {
        self.store.work_item_get(id).await.expect("get work item").state
    }
}

/// Stamps out every conformance case as a `#[tokio::test]` for a store factory: an expression callable
/// as `factory().await` returning `Arc<dyn Store>` (a fresh, empty store each call).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::__conformance_cases!(@emit $factory, cases;
            project_crud,
            vision_versions,
            project_delete_refused_while_active,
            model_random_operations,
            heartbeat_keeps_claimed_ttl,
            complete_many_through_the_facade,
            queue_list_cursor_survives_claims,
            info_request_deadline_expires_on_tick,
            complete_many_mixed_batch,
            complete_and_claim_hands_over,
            complete_and_claim_refusals,
            project_repository_round_trip,
            release_hands_the_run_back_without_an_attempt,
            run_result_is_fenced_and_read_back,
            ask_and_release_record_usage,
        );
        $crate::__sched_cases!($factory);
        $crate::__flow_cases!($factory);
        $crate::__edge_cases!($factory);
    };
}

/// Implementation detail of [`store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    (@emit $factory:expr, $module:ident; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let factory = $factory;
                let store: ::std::sync::Arc<dyn $crate::Store> = factory().await;
                $crate::testing::$module::$case(store).await;
            }
        )*
    };
}
