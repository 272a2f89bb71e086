//! Shared test helpers: the server URL, a fresh schema per store, and its cleanup.
#![allow(dead_code)]

use orchestrator_sqlx::{PgOptions, PgStore};
use sqlx::Connection;
use std::sync::atomic::{AtomicU32, Ordering};

/// The test server (`ORCH_TEST_DATABASE_URL`, default the local trust-auth server). A missing server
/// fails the tests that need it.
pub fn url() -> String {
    std::env::var("ORCH_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A schema name no other test (or test process) uses.
pub fn unique_schema(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("t_{prefix}_{}_{}_{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Drops its schema when dropped (on a thread of its own, so it works from any context).
pub struct SchemaGuard {
    pub url: String,
    pub schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")))
                        .execute(&mut c)
                        .await;
                    let _ = c.close().await;
                }
            });
        })
        .join();
    }
}

/// Options for a test store on `schema`: a small pool so parallel tests fit in `max_connections`.
pub fn options(schema: &str) -> PgOptions {
    PgOptions { schema: schema.to_string(), max_connections: 4, ..PgOptions::default() }
}

/// A store on a fresh schema that is dropped with the store.
pub async fn fresh_store(prefix: &str) -> PgStore {
    store_with(prefix, |o| o).await
}

/// A store on a fresh schema that is dropped with the store, with the test options as `adjust` changes
/// them.
pub async fn store_with(prefix: &str, adjust: impl FnOnce(PgOptions) -> PgOptions) -> PgStore {
    let schema = unique_schema(prefix);
    let url = url();
    PgStore::connect_with(&url, adjust(options(&schema)))
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {url}: {e}"))
        .with_guard(SchemaGuard { url, schema })
}

/// A ready work item in `project`, enqueued on creation.
pub fn new_item(project: orchestrator_core::ids::ProjectId, title: &str) -> orchestrator_core::store::NewWorkItem {
    orchestrator_core::store::NewWorkItem {
        id: orchestrator_core::ids::WorkItemId::new(),
        project_id: project,
        title: title.into(),
        description: String::new(),
        recipe_id: None,
        labels: vec![],
        priority: 0,
        retry: Default::default(),
        idempotency_key: None,
        state: orchestrator_core::state::WorkItemState::Ready,
        enqueue: Some(orchestrator_core::store::EnqueueOptions::default()),
    }
}

/// A successful completion of a claimed run, with its lease's token.
pub fn success(r: &orchestrator_core::store::ClaimedRun) -> orchestrator_core::store::RunCompletion {
    orchestrator_core::store::RunCompletion {
        run_id: r.run.id,
        token: r.lease.token,
        outcome: orchestrator_core::domain::RunOutcome::Succeeded { exit_code: Some(0) },
        usage: None,
    }
}
