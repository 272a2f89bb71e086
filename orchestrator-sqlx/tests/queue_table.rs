//! The queue table: it mirrors every queued, retrying, blocked and running work item through every
//! transition; the store vacuums it; and a version 1 schema with live work is upgraded onto it.

mod common;

use chrono::{Duration, Utc};
use orchestrator_core::crypto::SealedValue;
use orchestrator_core::domain::RunOutcome;
use orchestrator_core::ids::{ProjectId, WorkItemId};
use orchestrator_core::recipe::InputKind;
use orchestrator_core::retry::{FailureKind, RetryPolicy};
use orchestrator_core::state::WorkItemState;
use orchestrator_core::store::*;
use orchestrator_core::Store;
use orchestrator_sqlx::{PgOptions, PgStore};

fn item(project: ProjectId, title: &str, priority: i32, labels: &[&str], enqueue: EnqueueOptions) -> NewWorkItem {
    NewWorkItem {
        id: WorkItemId::new(),
        project_id: project,
        title: title.into(),
        description: String::new(),
        recipe_id: None,
        labels: labels.iter().map(|l| l.to_string()).collect(),
        priority,
        retry: Default::default(),
        idempotency_key: None,
        state: WorkItemState::Ready,
        enqueue: Some(enqueue),
    }
}

fn claim(caps: &[&str], limit: u32, ttl: Duration, now: chrono::DateTime<Utc>) -> Claim {
    Claim {
        agent_id: "agent".into(),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        limit,
        lease_ttl: ttl,
        now,
    }
}

/// Work items whose queue row is missing, left over, or out of step; empty when the mirror holds.
async fn mismatches(store: &PgStore) -> Vec<String> {
    let s = store.schema();
    let sql = format!(
        "SELECT COALESCE(w.id, q.work_item_id)::text || ' ' || COALESCE(w.state, '-') || '/' || COALESCE(q.state, '-')
         FROM {s}.work_items w FULL JOIN {s}.work_queue q ON q.work_item_id = w.id
         WHERE (w.state IN ('queued', 'retrying', 'blocked', 'running')) IS DISTINCT FROM (q.work_item_id IS NOT NULL)
            OR (q.work_item_id IS NOT NULL AND (q.state IS DISTINCT FROM w.state OR q.project_id IS DISTINCT FROM w.project_id
                OR q.created_at IS DISTINCT FROM w.created_at))
            OR (q.state IN ('queued', 'retrying', 'blocked')
                AND ((q.priority, q.run_at, q.pending_deps, q.labels) IS DISTINCT FROM (w.priority, w.run_at, w.pending_deps, w.labels)
                     OR q.run_id IS NOT NULL OR q.lease_expires_at IS NOT NULL))
            OR (q.state = 'running'
                AND (q.run_id IS DISTINCT FROM w.current_run_id
                     OR q.lease_expires_at IS DISTINCT FROM (SELECT r.lease_expires_at FROM {s}.runs r WHERE r.id = w.current_run_id)
                     OR q.lease_expires_at IS NULL))"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(store.pool()).await.unwrap()
}

async fn assert_mirrored(store: &PgStore, step: &str) {
    let bad = mismatches(store).await;
    assert!(bad.is_empty(), "queue table out of step after {step}: {bad:?}");
}

async fn queue_rows(store: &PgStore) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {}.work_queue", store.schema())))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

fn done(run: &ClaimedRun) -> RunCompletion {
    RunCompletion {
        run_id: run.run.id,
        token: run.lease.token,
        outcome: RunOutcome::Succeeded { exit_code: Some(0) },
        usage: None,
    }
}

fn failed(run: &ClaimedRun) -> RunCompletion {
    RunCompletion {
        run_id: run.run.id,
        token: run.lease.token,
        outcome: RunOutcome::Failed { error: "boom".into(), exit_code: Some(1), kind: FailureKind::Retryable },
        usage: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_table_mirrors_every_transition() {
    let store = common::fresh_store("queue_mirror").await;
    let t0 = Utc::now();
    let p = ProjectId::new();
    store.project_create(NewProject { id: p, name: "p".into(), description: String::new(), now: t0 }).await.unwrap();
    let now_opts = EnqueueOptions::default();
    let created = store
        .work_items_create(
            vec![
                item(p, "first", 5, &[], now_opts.clone()),
                item(p, "gpu", 0, &["gpu"], now_opts.clone()),
                item(
                    p,
                    "later",
                    0,
                    &[],
                    EnqueueOptions { not_before: Some(t0 + Duration::hours(1)), ..Default::default() },
                ),
                item(p, "plain 1", 1, &[], now_opts.clone()),
                item(p, "plain 2", 1, &[], now_opts.clone()),
            ],
            t0,
        )
        .await
        .unwrap();
    let id = |i: usize| created[i].work_item.id;
    let dependent = store
        .work_items_create(
            vec![item(p, "after first", 9, &[], EnqueueOptions { depends_on: vec![id(0)], ..Default::default() })],
            t0,
        )
        .await
        .unwrap()[0]
        .work_item
        .id;
    assert_mirrored(&store, "creation").await;
    assert_eq!(queue_rows(&store).await, 6);

    // Claims take the highest priority ready, unlabeled, undelayed items: not the dependent, the
    // labeled or the delayed one.
    let t1 = t0 + Duration::seconds(1);
    let got = store.runs_claim(claim(&[], 2, Duration::seconds(30), t1)).await.unwrap();
    let ids: Vec<_> = got.iter().map(|c| c.work_item.id).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], id(0));
    assert!(ids[1] == id(3) || ids[1] == id(4), "claimed {ids:?}");
    assert_mirrored(&store, "a claim").await;

    let renewed = store
        .lease_renew(LeaseRenew {
            run_id: got[0].run.id,
            token: got[0].lease.token,
            ttl: Some(Duration::seconds(90)),
            now: t1,
        })
        .await
        .unwrap();
    assert_eq!(renewed.expires_at, t1 + Duration::seconds(90));
    assert_mirrored(&store, "a lease renewal").await;

    // One success (releasing the dependent) and one retryable failure, in one call.
    let t2 = t1 + Duration::seconds(1);
    let res = store
        .runs_complete_many(CompleteMany {
            completions: vec![done(&got[0]), failed(&got[1])],
            retry_defaults: RetryPolicy::default(),
            now: t2,
        })
        .await
        .unwrap();
    assert_eq!(res.len(), 2);
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    assert_eq!(store.work_item_get(got[1].work_item.id).await.unwrap().state, WorkItemState::Retrying);
    assert_mirrored(&store, "a success and a failure").await;

    store.work_item_cancel(id(2), Cancel { reason: "not needed".into(), now: t2 }).await.unwrap();
    assert_mirrored(&store, "a cancel").await;

    // The labeled item, the dependent and the other plain one, on short leases; one run asks for input.
    let t3 = t2 + Duration::seconds(1);
    let got = store.runs_claim(claim(&["gpu"], 10, Duration::seconds(5), t3)).await.unwrap();
    let mut claimed: Vec<_> = got.iter().map(|c| c.work_item.id).collect();
    claimed.sort();
    let other_plain = if ids[1] == id(3) { id(4) } else { id(3) };
    let mut want = vec![id(1), dependent, other_plain];
    want.sort();
    assert_eq!(claimed, want);
    assert_mirrored(&store, "a labeled claim").await;
    let asking = got.iter().find(|c| c.work_item.id == id(1)).unwrap();
    let asked = store
        .info_requests_create(InfoAsk {
            run_id: asking.run.id,
            token: asking.lease.token,
            questions: vec![NewInfoRequest {
                key: "k".into(),
                prompt: "value?".into(),
                kind: InputKind::Text,
                choices: vec![],
                deadline: None,
            }],
            now: t3,
        })
        .await
        .unwrap();
    assert_mirrored(&store, "a question").await;
    store
        .info_request_answer(InfoAnswer {
            id: asked[0].id,
            answer: SealedValue::plain(b"v"),
            answered_by: "human".into(),
            now: t3,
        })
        .await
        .unwrap();
    assert_mirrored(&store, "an answer").await;

    // Later: the short leases expired (reaped, retried) and the earlier failure's retry time came.
    let t4 = t3 + Duration::minutes(30);
    let report = store.tick(Tick { retry_defaults: RetryPolicy::default(), limit: 100, now: t4 }).await.unwrap();
    assert_eq!(report.reaped.len(), 2, "{report:?}");
    assert_mirrored(&store, "a tick").await;

    // Everything left runs to success (the resumed run among them); the queue table empties.
    let t5 = t4 + Duration::hours(2);
    let tick = store.tick(Tick { retry_defaults: RetryPolicy::default(), limit: 100, now: t5 }).await.unwrap();
    assert!(tick.reaped.is_empty());
    let rest = store.runs_claim(claim(&["gpu"], 100, Duration::seconds(30), t5)).await.unwrap();
    assert_eq!(rest.len(), 4, "{:?}", rest.iter().map(|c| &c.work_item.title).collect::<Vec<_>>());
    assert!(rest.iter().any(|c| c.resumed));
    assert_mirrored(&store, "the last claim").await;
    let res = store
        .runs_complete_many(CompleteMany {
            completions: rest.iter().map(done).collect(),
            retry_defaults: RetryPolicy::default(),
            now: t5,
        })
        .await
        .unwrap();
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    assert_mirrored(&store, "the last completions").await;
    assert_eq!(queue_rows(&store).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_vacuums_its_queue_table() {
    let schema = common::unique_schema("queue_vacuum");
    let url = common::url();
    let opts = PgOptions { vacuum_queue_after: 20, ..common::options(&schema) };
    let store = PgStore::connect_with(&url, opts)
        .await
        .unwrap()
        .with_guard(common::SchemaGuard { url, schema: schema.clone() });
    let vacuums = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'work_queue'",
        )
        .bind(&schema)
        .fetch_one(store.pool())
        .await
        .unwrap()
    };
    assert_eq!(vacuums().await, 0);
    let p = ProjectId::new();
    let now = Utc::now();
    store.project_create(NewProject { id: p, name: "p".into(), description: String::new(), now }).await.unwrap();
    let items = (0..40).map(|i| item(p, &format!("v{i}"), 0, &[], EnqueueOptions::default())).collect();
    store.work_items_create(items, now).await.unwrap();
    let got = store.runs_claim(claim(&[], 40, Duration::seconds(30), now + Duration::seconds(1))).await.unwrap();
    assert_eq!(got.len(), 40);
    let res = store
        .runs_complete_many(CompleteMany {
            completions: got.iter().map(done).collect(),
            retry_defaults: RetryPolicy::default(),
            now: now + Duration::seconds(1),
        })
        .await
        .unwrap();
    assert!(res.iter().all(|r| r.is_ok()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while vacuums().await == 0 {
        assert!(std::time::Instant::now() < deadline, "the queue table was not vacuumed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_a_version_1_schema_fills_the_queue_table() {
    let schema = common::unique_schema("queue_upgrade");
    let url = common::url();
    let v1 = PgOptions { migrate: false, listen: false, vacuum_queue_after: 0, ..common::options(&schema) };
    let old = PgStore::connect_with(&url, v1.clone()).await.unwrap();
    old.migrate_to(1).await.unwrap();
    assert_eq!(old.stored_version().await.unwrap(), 1);
    // Version 1 rows written by hand: a queued, a blocked and a running item (with its run), and a
    // finished one.
    let s = &schema;
    let p = uuid::Uuid::now_v7();
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
    let run = uuid::Uuid::now_v7();
    let sql = format!(
        "INSERT INTO {s}.projects VALUES ('{p}', 'p', '', now(), now());
         INSERT INTO {s}.work_items (id, project_id, title, description, labels, state, priority, dependencies, retry, content_hash,
                                     attempts, current_run_id, run_at, created_at, updated_at)
         VALUES ('{a}', '{p}', 'queued', '', '{{x}}', 'queued', 3, '{{}}', '{{}}', 'h', 0, NULL, now(), now(), now()),
                ('{b}', '{p}', 'blocked', '', '{{}}', 'blocked', 0, '{{}}', '{{}}', 'h', 0, NULL, NULL, now(), now()),
                ('{c}', '{p}', 'running', '', '{{}}', 'running', 0, '{{}}', '{{}}', 'h', 1, '{run}', now(), now(), now()),
                ('{d}', '{p}', 'done', '', '{{}}', 'succeeded', 0, '{{}}', '{{}}', 'h', 1, NULL, NULL, now(), now());
         INSERT INTO {s}.runs (id, work_item_id, project_id, attempt, agent_id, state, lease_token, lease_expires_at, claimed_at)
         VALUES ('{run}', '{c}', '{p}', 1, 'a', 'running', 1, now() + interval '1 minute', now());",
        a = ids[0],
        b = ids[1],
        c = ids[2],
        d = ids[3],
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(old.pool()).await.unwrap();
    drop(old);

    let new = PgStore::connect_with(&url, PgOptions { migrate: true, ..v1 })
        .await
        .unwrap()
        .with_guard(common::SchemaGuard { url: url.clone(), schema: schema.clone() });
    assert_eq!(new.stored_version().await.unwrap(), orchestrator_sqlx::schema_version());
    assert_eq!(queue_rows(&new).await, 3);
    assert_mirrored(&new, "the upgrade").await;
    // The upgraded queue works: the queued item is claimable with its label, the running one's lease is
    // reaped when it expires.
    let got = new.runs_claim(claim(&["x"], 10, Duration::hours(1), Utc::now() + Duration::seconds(1))).await.unwrap();
    assert_eq!(got.iter().map(|c| c.work_item.id.0).collect::<Vec<_>>(), vec![ids[0]]);
    let report = new
        .tick(Tick { retry_defaults: RetryPolicy::default(), limit: 10, now: Utc::now() + Duration::minutes(5) })
        .await
        .unwrap();
    assert_eq!(report.reaped.iter().map(|r| r.run_id.0).collect::<Vec<_>>(), vec![run]);
    assert_mirrored(&new, "claims and reaping after the upgrade").await;
}
