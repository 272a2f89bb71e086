//! LISTEN/NOTIFY wake-ups across stores, and work items created inside a host's own transaction.

mod common;

use chrono::Utc;
use orchestrator_core::ids::ProjectId;
use orchestrator_core::state::WorkItemState;
use orchestrator_core::store::{Claim, NewProject};
use orchestrator_core::{Store, StoreError};
use orchestrator_sqlx::{PgOptions, PgStore};
use std::time::Duration;

use common::new_item;

async fn project(store: &PgStore) -> ProjectId {
    let id = ProjectId::new();
    store
        .project_create(NewProject {
            id,
            name: "p".into(),
            description: String::new(),
            repository: None,
            now: Utc::now(),
        })
        .await
        .unwrap();
    id
}

fn claim(limit: u32) -> Claim {
    Claim {
        agent_id: "agent".into(),
        capabilities: vec![],
        limit,
        lease_ttl: chrono::Duration::seconds(30),
        now: Utc::now() + chrono::Duration::seconds(1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_on_one_store_wakes_a_waiter_on_another() {
    let a = common::fresh_store("notify").await;
    let b = PgStore::connect_with(&common::url(), common::options(a.schema())).await.unwrap();
    let p = project(&a).await;
    for round in 0..3 {
        let seen = b.notifier().generation();
        let n = b.notifier().clone();
        let waiter = tokio::spawn(async move { n.wait_changed(seen, Duration::from_secs(10)).await });
        a.work_items_create(vec![new_item(p, &format!("wake {round}"))], Utc::now()).await.unwrap();
        assert!(waiter.await.unwrap(), "store b was not woken by store a's enqueue (round {round})");
        assert_eq!(b.runs_claim(claim(10)).await.unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_transaction_rollback_leaves_nothing_and_commit_publishes() {
    let store = common::fresh_store("hosttx").await;
    let other = PgStore::connect_with(&common::url(), common::options(store.schema())).await.unwrap();
    let p = project(&store).await;
    let pool = store.pool().clone();
    let host_table = format!("{}.host_orders", store.schema());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE TABLE {host_table} (id int PRIMARY KEY)")))
        .execute(&pool)
        .await
        .unwrap();

    // Rolled back: neither the host's row nor the work item exists.
    let item = new_item(p, "rolled back");
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {host_table} VALUES (1)"))).execute(&mut *tx).await.unwrap();
    let created = store.work_items_create_in(&mut tx, vec![item.clone()], Utc::now()).await.unwrap();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].work_item.state, WorkItemState::Queued);
    // Not visible outside the transaction before it commits.
    assert!(matches!(store.work_item_get(item.id).await, Err(StoreError::NotFound { .. })));
    tx.rollback().await.unwrap();
    assert!(matches!(store.work_item_get(item.id).await, Err(StoreError::NotFound { .. })));
    assert!(store.runs_claim(claim(10)).await.unwrap().is_empty());
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {host_table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);

    // Committed: both exist, and claimers elsewhere are woken by the commit.
    let item = new_item(p, "committed");
    let seen = other.notifier().generation();
    let n = other.notifier().clone();
    let waiter = tokio::spawn(async move { n.wait_changed(seen, Duration::from_secs(10)).await });
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL search_path TO public").execute(&mut *tx).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {host_table} VALUES (2)"))).execute(&mut *tx).await.unwrap();
    store.work_items_create_in(&mut tx, vec![item.clone()], Utc::now()).await.unwrap();
    let path: String = sqlx::query_scalar("SELECT current_setting('search_path')").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(path, "public", "the host's search_path is restored");
    tx.commit().await.unwrap();
    assert!(waiter.await.unwrap(), "the commit notified other stores");
    assert_eq!(store.work_item_get(item.id).await.unwrap().state, WorkItemState::Queued);
    let claimed = other.runs_claim(claim(10)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].work_item.id, item.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_concurrent_and_refuse_newer_schemas() {
    let schema = common::unique_schema("mig");
    let url = common::url();
    let _guard = common::SchemaGuard { url: url.clone(), schema: schema.clone() };
    // Several processes starting at once: the advisory lock serializes them.
    let opts = common::options(&schema);
    let (a, b, c) = tokio::join!(
        PgStore::connect_with(&url, opts.clone()),
        PgStore::connect_with(&url, opts.clone()),
        PgStore::connect_with(&url, opts.clone())
    );
    let (a, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.stored_version().await.unwrap(), orchestrator_sqlx::schema_version());
    a.migrate().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("INSERT INTO {schema}.orchestrator_migrations (version) VALUES (9999)")))
        .execute(a.pool())
        .await
        .unwrap();
    match PgStore::connect_with(&url, opts).await {
        Err(StoreError::Unavailable { retryable: false, message }) => assert!(message.contains("newer"), "{message}"),
        other => panic!("a newer schema must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_over_a_host_pool_uses_its_own_schema() {
    let schema = common::unique_schema("hostpool");
    let url = common::url();
    let _guard = common::SchemaGuard { url: url.clone(), schema: schema.clone() };
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
    let store = PgStore::from_pool(pool.clone(), common::options(&schema)).await.unwrap();
    let p = project(&store).await;
    store.work_items_create(vec![new_item(p, "x")], Utc::now()).await.unwrap();
    assert_eq!(store.runs_claim(claim(5)).await.unwrap().len(), 1);
    let path: String = sqlx::query_scalar("SELECT current_setting('search_path')").fetch_one(&pool).await.unwrap();
    assert!(!path.contains(&schema), "the host pool's search_path is left alone: {path}");
    assert!(matches!(
        PgStore::from_pool(pool, orchestrator_sqlx::PgOptions::with_schema("Bad-Name")).await,
        Err(StoreError::Invalid { .. })
    ));
}

/// A plain create (one statement, no transaction of its own) waits for a project deletion that holds the
/// project's row, as `project_delete` does: when the deletion rolls back the items are created; when it
/// commits the create reports the project missing and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_create_waits_for_a_project_deletion_in_progress() {
    use sqlx::{AssertSqlSafe, Connection};
    let store = std::sync::Arc::new(common::fresh_store("plaindel").await);
    let p = project(&store).await;
    let mut deleter = sqlx::PgConnection::connect(&common::url()).await.unwrap();
    let deleter_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut deleter).await.unwrap();
    let mut watcher = sqlx::PgConnection::connect(&common::url()).await.unwrap();
    let items_of_p = format!("SELECT COUNT(*) FROM {}.work_items WHERE project_id = $1", store.schema());
    for commit in [false, true] {
        let mut tx = deleter.begin().await.unwrap();
        sqlx::query(AssertSqlSafe(format!("DELETE FROM {}.projects WHERE id = $1", store.schema())))
            .bind(p.0)
            .execute(&mut *tx)
            .await
            .unwrap();
        let s = store.clone();
        let create = tokio::spawn(async move { s.work_items_create(vec![new_item(p, "racing")], Utc::now()).await });
        // Wait (with a deadline) until the create is blocked by the deleting transaction.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let blocked: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                    .bind(deleter_pid)
                    .fetch_one(&mut watcher)
                    .await
                    .unwrap();
            if blocked > 0 {
                break;
            }
            assert!(!create.is_finished(), "the create did not wait for the deletion: {:?}", create.await);
            assert!(std::time::Instant::now() < deadline, "the create never blocked on the deletion");
            tokio::task::yield_now().await;
        }
        if commit {
            tx.commit().await.unwrap();
            let res = create.await.unwrap();
            assert!(matches!(res, Err(StoreError::NotFound { .. })), "{res:?}");
        } else {
            tx.rollback().await.unwrap();
            assert_eq!(create.await.unwrap().unwrap().len(), 1);
        }
        let n: i64 =
            sqlx::query_scalar(AssertSqlSafe(items_of_p.clone())).bind(p.0).fetch_one(&mut watcher).await.unwrap();
        assert_eq!(n, 1, "one item from the round whose deletion rolled back, none from the other");
    }
}

/// Wake-up notifications are throttled per store: within `notify_interval` of one, further enqueues do
/// not notify in their own transactions; one notification follows after the interval, after their
/// commits, so a claimer elsewhere is woken and finds all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_notifications_wake_after_the_last_commit() {
    let interval = Duration::from_secs(2);
    let schema = common::unique_schema("throttle");
    let url = common::url();
    let a = PgStore::connect_with(&url, PgOptions { notify_interval: interval, ..common::options(&schema) })
        .await
        .unwrap()
        .with_guard(common::SchemaGuard { url: url.clone(), schema: schema.clone() });
    let b = PgStore::connect_with(&url, common::options(&schema)).await.unwrap();
    let p = project(&a).await;
    let g0 = b.notifier().generation();
    let t0 = std::time::Instant::now();
    a.work_items_create(vec![new_item(p, "first")], Utc::now()).await.unwrap();
    assert!(b.notifier().wait_changed(g0, Duration::from_secs(10)).await, "the first enqueue notifies at once");
    let g1 = b.notifier().generation();
    for i in 0..5 {
        a.work_items_create(vec![new_item(p, &format!("more {i}"))], Utc::now()).await.unwrap();
    }
    assert!(b.notifier().wait_changed(g1, Duration::from_secs(20)).await, "no notification followed the burst");
    assert!(t0.elapsed() >= interval, "the follow-up came {:?} after the first, inside the interval", t0.elapsed());
    assert_eq!(b.runs_claim(claim(10)).await.unwrap().len(), 6);
}

/// The LISTEN connection is a plain backend that the server (or an operator, or a proxy) may end. Each
/// store reconnects it, and wake-ups across stores flow again through the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listener_reconnects_and_wakes_again() {
    let a = common::fresh_store("relisten").await;
    let b = PgStore::connect_with(&common::url(), common::options(a.schema())).await.unwrap();
    let p = project(&a).await;
    let admin = a.pool().clone();
    let channel = a.channel().to_string();
    let listeners = || {
        let (admin, channel) = (admin.clone(), channel.clone());
        async move {
            sqlx::query_scalar::<_, i32>(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND position($1 in query) > 0 ORDER BY pid",
            )
            .bind(channel)
            .fetch_all(&admin)
            .await
            .unwrap()
        }
    };
    let old = listeners().await;
    assert_eq!(old.len(), 2, "one LISTEN backend per store: {old:?}");
    for pid in &old {
        let ended: bool =
            sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&admin).await.unwrap();
        assert!(ended, "backend {pid} was not terminated");
    }

    // Both stores listen again, on new backends.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = listeners().await;
        if now.len() == 2 && now.iter().all(|pid| !old.contains(pid)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "listeners not re-established: before {old:?}, now {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Let the reconnection's own wake-up pass, then an enqueue on one store wakes the other.
    let mut seen = b.notifier().generation();
    while b.notifier().wait_changed(seen, Duration::from_millis(300)).await {
        seen = b.notifier().generation();
    }
    let n = b.notifier().clone();
    let waiter = tokio::spawn(async move { n.wait_changed(seen, Duration::from_secs(10)).await });
    a.work_items_create(vec![new_item(p, "after reconnect")], Utc::now()).await.unwrap();
    assert!(waiter.await.unwrap(), "store b was not woken through its new LISTEN connection");
    assert_eq!(b.runs_claim(claim(10)).await.unwrap().len(), 1);
}
