//! Upgrading a schema that holds live work: runs leased under version 1 are still reaped (through their
//! running work items) after version 2 replaced the leased-runs index, and projects whose items were
//! written before version 3 are deleted whole (their items found through `work_item_projects`); runs
//! completed under version 4 keep their rows on their pages.

mod common;

use chrono::{Duration, Utc};
use orchestrator_core::ids::{ProjectId, WorkItemId};
use orchestrator_core::retry::RetryPolicy;
use orchestrator_core::state::{RunState, WorkItemState};
use orchestrator_core::store::{Claim, CompleteMany, NewWorkItem, Tick};
use orchestrator_core::{Store, StoreError};
use orchestrator_sqlx::{PgOptions, PgStore};

use common::new_item;

/// A work item row as an older build writes it (none of the columns later versions added), so it can be
/// written before the upgrade.
/// A project as builds before schema version 5 insert it (the store under test may run on an older schema).
async fn legacy_project(store: &PgStore, id: ProjectId, name: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.projects (id, name, description, created_at, updated_at) VALUES ($1, $2, '', now(), now())",
        store.schema()
    )))
    .bind(id.0)
    .bind(name)
    .execute(store.pool())
    .await
    .unwrap();
}

async fn legacy_insert(store: &PgStore, project: ProjectId, title: &str, state: &str) -> WorkItemId {
    let id = WorkItemId::new();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.work_items (id, project_id, title, description, labels, state, priority, dependencies, retry,
             content_hash, attempts, run_at, created_at, updated_at, enqueued_at)
         VALUES ($1, $2, $3, '', '{{}}', $4, 0, '{{}}', '{{}}', 'h', 0,
             CASE WHEN $4 = 'queued' THEN now() - interval '1 minute' END, now(), now(), now())",
        store.schema()
    )))
    .bind(id.0)
    .bind(project.0)
    .bind(title)
    .bind(state)
    .execute(store.pool())
    .await
    .unwrap();
    id
}

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
    legacy_project(&store, p, "p").await;
    for i in 0..3 {
        legacy_insert(&store, p, &format!("w{i}"), "queued").await;
    }
    let claim = |ttl: i64| Claim {
        agent_id: "a".into(),
        capabilities: vec![],
        limit: 1,
        lease_ttl: Duration::seconds(ttl),
        now,
    };
    let short = store.runs_claim(claim(10)).await.unwrap().remove(0);
    let long = store.runs_claim(claim(600)).await.unwrap().remove(0);
    // A second project with drafts only (nothing active), to be deleted after the upgrade.
    let q = ProjectId::new();
    legacy_project(&store, q, "q").await;
    let mut gone = vec![legacy_insert(&store, q, "d0", "draft").await, legacy_insert(&store, q, "d1", "draft").await];

    store.migrate().await.unwrap();
    assert_eq!(store.stored_version().await.unwrap(), orchestrator_sqlx::schema_version());
    let ix = indexes(&store).await;
    assert!(!ix.contains(&"runs_leased".to_string()), "{ix:?}");
    assert!(ix.contains(&"work_items_running".to_string()), "{ix:?}");
    assert!(ix.contains(&"work_items_waiting".to_string()) && !ix.contains(&"work_items_queue".to_string()), "{ix:?}");
    assert!(!ix.contains(&"work_items_project".to_string()), "{ix:?}");
    let mapped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_item_projects").fetch_one(store.pool()).await.unwrap();
    assert_eq!(mapped, 5, "every item written before the upgrade is in work_item_projects");

    // Items from before and after the upgrade go with their project; the other project keeps its own.
    // This build's insert maps its own rows; an older build's insert is mapped by the trigger.
    let new_draft = NewWorkItem { state: WorkItemState::Draft, enqueue: None, ..new_item(q, "after the upgrade") };
    store.work_items_create(vec![new_draft.clone()], now).await.unwrap();
    gone.push(new_draft.id);
    gone.push(legacy_insert(&store, q, "legacy", "draft").await);
    let mapped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_item_projects").fetch_one(store.pool()).await.unwrap();
    assert_eq!(mapped, 7);
    store.project_delete(q).await.unwrap();
    for id in &gone {
        assert!(matches!(store.work_item_get(*id).await, Err(StoreError::NotFound { .. })), "{id} left behind");
    }
    let mapped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_item_projects").fetch_one(store.pool()).await.unwrap();
    assert_eq!(mapped, 3);
    assert!(matches!(store.project_delete(p).await, Err(StoreError::Conflict { .. })), "p has active items");

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

/// The heap page (block number) of every run row.
async fn run_pages(store: &PgStore) -> std::collections::HashMap<uuid::Uuid, i32> {
    let rows: Vec<(uuid::Uuid, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, ((ctid::text::point)[0])::int4 FROM {}.runs",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Schema version 4 leaves half of each runs page free: a completion's new row version fits beside the
/// run it replaces (a HOT update, which writes no index entries) instead of moving to another page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_runs_stay_on_their_pages() {
    let store = common::fresh_store("runpages").await;
    let now = Utc::now();
    let p = ProjectId::new();
    legacy_project(&store, p, "p").await;
    let items: Vec<NewWorkItem> = (0..200).map(|i| new_item(p, &format!("w{i}"))).collect();
    store.work_items_create(items, now).await.unwrap();
    let claimed = store
        .runs_claim(Claim {
            agent_id: "a".into(),
            capabilities: vec![],
            limit: 200,
            lease_ttl: Duration::seconds(60),
            now,
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 200);
    let before = run_pages(&store).await;
    let completions = claimed.iter().map(common::success).collect();
    for r in store
        .runs_complete_many(CompleteMany { completions, retry_defaults: RetryPolicy::default(), now })
        .await
        .unwrap()
    {
        assert_eq!(r.unwrap().run.state, RunState::Succeeded);
    }
    let after = run_pages(&store).await;
    let stayed = before.iter().filter(|(id, page)| after.get(*id) == Some(*page)).count();
    // At the old fill factor (80) about a quarter stay; the runs at the end of a full page may not fit.
    assert!(stayed >= 180, "only {stayed} of 200 completed runs stayed on their pages");
}

/// A schema that a newer build migrated is refused unless that build recorded that builds of this
/// version still run on it; the versions this build applies record it themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_run_on_only_when_it_says_this_build_can() {
    let store = common::fresh_store("newer").await;
    let latest = orchestrator_sqlx::schema_version();
    let recorded: Vec<(i32, Option<i32>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT version, compatible_from FROM {}.orchestrator_migrations ORDER BY version",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(recorded.len() as i32, latest);
    assert!(recorded.iter().all(|(v, c)| c.is_some_and(|c| (1..=*v).contains(&c))), "{recorded:?}");

    // A migrations table from before the column (as builds of schema version 3 left it) gets it again.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {}.orchestrator_migrations DROP COLUMN compatible_from",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    store.migrate().await.unwrap();

    let record = |version: i32, from: Option<i32>| {
        let store = &store;
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {}.orchestrator_migrations (version, compatible_from) VALUES ($1, $2)",
                store.schema()
            )))
            .bind(version)
            .bind(from)
            .execute(store.pool())
            .await
            .unwrap();
        }
    };
    // A newer version that builds of this one run on: migrating succeeds and changes nothing.
    record(latest + 1, Some(latest)).await;
    store.migrate().await.unwrap();
    assert_eq!(store.stored_version().await.unwrap(), latest + 1);
    // One more that needs a newer build: refused, for good.
    record(latest + 2, Some(latest + 1)).await;
    match store.migrate().await {
        Err(StoreError::Unavailable { retryable: false, message }) => {
            assert!(message.contains(&format!("version {}", latest + 2)), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A newer version recorded without saying (as builds before the column wrote them): refused.
    let other = common::fresh_store("newer").await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.orchestrator_migrations (version) VALUES ($1)",
        other.schema()
    )))
    .bind(latest + 1)
    .execute(other.pool())
    .await
    .unwrap();
    assert!(matches!(other.migrate().await, Err(StoreError::Unavailable { retryable: false, .. })));
}
