//! Upgrading a schema that holds live work: runs leased under version 1 are still reaped (through their
//! running work items) after version 2 replaced the leased-runs index.

mod common;

use chrono::{Duration, Utc};
use orchestrator_core::ids::ProjectId;
use orchestrator_core::retry::RetryPolicy;
use orchestrator_core::state::{RunState, WorkItemState};
use orchestrator_core::store::{Claim, NewProject, NewWorkItem, Tick};
use orchestrator_core::{Store, StoreError};
use orchestrator_sqlx::{PgOptions, PgStore};

use common::new_item;

async fn indexes(store: &PgStore) -> Vec<String> {
    sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY 1")
        .bind(store.schema())
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_taken_under_version_1_are_reaped_after_the_upgrade() {
    let schema = common::unique_schema("upgrade");
    let url = common::url();
    let opts = PgOptions { migrate: false, ..common::options(&schema) };
    let store = PgStore::connect_with(&url, opts)
        .await
        .unwrap()
        .with_guard(common::SchemaGuard { url: url.clone(), schema: schema.clone() });
    assert!(matches!(store.migrate_to(0).await, Err(StoreError::Invalid { .. })));
    assert!(matches!(store.migrate_to(orchestrator_sqlx::schema_version() + 1).await, Err(StoreError::Invalid { .. })));
    store.migrate_to(1).await.unwrap();
    assert_eq!(store.stored_version().await.unwrap(), 1);
    assert!(indexes(&store).await.contains(&"runs_leased".to_string()));

    let now = Utc::now();
    let p = ProjectId::new();
    store.project_create(NewProject { id: p, name: "p".into(), description: String::new(), now }).await.unwrap();
    let items: Vec<NewWorkItem> = (0..3).map(|i| new_item(p, &format!("w{i}"))).collect();
    store.work_items_create(items, now).await.unwrap();
    let claim = |ttl: i64| Claim {
        agent_id: "a".into(),
        capabilities: vec![],
        limit: 1,
        lease_ttl: Duration::seconds(ttl),
        now,
    };
    let short = store.runs_claim(claim(10)).await.unwrap().remove(0);
    let long = store.runs_claim(claim(600)).await.unwrap().remove(0);

    store.migrate().await.unwrap();
    assert_eq!(store.stored_version().await.unwrap(), orchestrator_sqlx::schema_version());
    let ix = indexes(&store).await;
    assert!(!ix.contains(&"runs_leased".to_string()), "{ix:?}");
    assert!(ix.contains(&"work_items_running".to_string()), "{ix:?}");
    assert!(ix.contains(&"work_items_waiting".to_string()) && !ix.contains(&"work_items_queue".to_string()), "{ix:?}");

    // Past the short lease only: exactly that run is lost and its item retries.
    let tick = |at| Tick { retry_defaults: RetryPolicy::default(), limit: 100, now: at };
    let report = store.tick(tick(now + Duration::seconds(11))).await.unwrap();
    assert_eq!(report.reaped.len(), 1, "{report:?}");
    assert_eq!(report.reaped[0].run_id, short.run.id);
    assert_eq!(store.run_get(short.run.id).await.unwrap().state, RunState::Lost);
    assert_eq!(store.work_item_get(short.work_item.id).await.unwrap().state, WorkItemState::Retrying);
    assert_eq!(store.run_get(long.run.id).await.unwrap().state, RunState::Claimed);
    // A run claimed after the upgrade is reaped the same way.
    let mut c = claim(5);
    c.now = now + Duration::seconds(12);
    let later = store.runs_claim(c).await.unwrap().remove(0);
    let report = store.tick(tick(now + Duration::seconds(601))).await.unwrap();
    let mut reaped: Vec<_> = report.reaped.iter().map(|r| r.run_id).collect();
    reaped.sort();
    let mut want = vec![long.run.id, later.run.id];
    want.sort();
    assert_eq!(reaped, want);
}
