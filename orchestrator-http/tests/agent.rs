//! The agent protocol and run routes: claim (long poll), work wake-ups, heartbeat, start, logs, steps,
//! info requests, complete; run logs read and followed as SSE.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::*;
use http_body_util::BodyExt;
use serde_json::json;
use std::time::{Duration, Instant};
use tower::ServiceExt;

#[tokio::test]
async fn claim_start_heartbeat_logs_steps_complete() {
    let app = open_app();
    let pid = project(&app, None).await;
    let wid = queued_item(&app, None, &pid, "build it").await;
    let v = post(
        &app,
        "/agents/claim",
        None,
        json!({"agent_id": "a1", "capabilities": [], "max": 2, "lease_ttl_seconds": 30}),
    )
    .await
    .ok(200);
    let a = &v["assignments"];
    assert_eq!(a.as_array().unwrap().len(), 1);
    assert_eq!(a[0]["work_item"]["id"], wid.as_str());
    assert_eq!(a[0]["run"]["agent_id"], "a1");
    assert_eq!(a[0]["resumed"], false);
    assert!(a[0]["answers"].is_object());
    let run = s(&a[0]["run"]["id"]);
    let token = a[0]["lease"]["token"].as_u64().unwrap();

    let lease = post(&app, &format!("/runs/{run}/heartbeat"), None, json!({"token": token})).await.ok(200);
    assert_eq!(lease["token"], token);
    let r = post(&app, &format!("/runs/{run}/start"), None, json!({"token": token})).await.ok(200);
    assert_eq!(r["state"], "running");
    let l = post(
        &app,
        &format!("/runs/{run}/logs"),
        None,
        json!({"token": token, "lines": [{"stream": "stdout", "line": "one"}, {"stream": "stderr", "line": "two"}]}),
    )
    .await
    .ok(200);
    assert_eq!(l["last_seq"], 2);
    let st = post(
        &app,
        &format!("/runs/{run}/steps"),
        None,
        json!({"token": token, "events": [{"step_index": 0, "kind": "started", "name": "cargo build"}]}),
    )
    .await
    .ok(200);
    assert_eq!(st["events"][0]["seq"], 1);

    // Readers.
    let logs = get(&app, &format!("/runs/{run}/logs?after=1"), None).await.ok(200);
    assert_eq!(logs["items"].as_array().unwrap().len(), 1);
    assert_eq!(logs["items"][0]["line"], "two");
    assert_eq!(logs["next"], 2);
    let steps = get(&app, &format!("/runs/{run}/steps"), None).await.ok(200);
    assert_eq!(steps["items"][0]["name"], "cargo build");
    assert_eq!(get(&app, &format!("/runs/{run}"), None).await.ok(200)["state"], "running");
    let runs = get(&app, &format!("/runs?work_item_id={wid}&state=running&agent_id=a1"), None).await.ok(200);
    assert_eq!(runs["items"][0]["id"], run.as_str());
    assert_eq!(get(&app, &format!("/work-items/{wid}/runs"), None).await.ok(200)["items"][0]["id"], run.as_str());

    // Complete.
    let done = post(
        &app,
        &format!("/runs/{run}/complete"),
        None,
        json!({"token": token, "outcome": {"status": "succeeded", "exit_code": 0}, "usage": {"input_tokens": 5}}),
    )
    .await
    .ok(200);
    assert_eq!(done["run"]["state"], "succeeded");
    assert_eq!(done["work_item_state"], "succeeded");
    assert!(done["released"].is_array() && done["blocked"].is_array());
    assert_eq!(done["run"]["usage"]["input_tokens"], 5);

    // A stale writer: lease lost (409) with details.
    let stale = post(&app, &format!("/runs/{run}/heartbeat"), None, json!({"token": token})).await;
    let e = stale.err(409, "lease_lost");
    assert_eq!(e["error"]["details"]["run_id"], run.as_str());

    // Metrics reflect it.
    let m = get(&app, "/metrics", None).await.text;
    assert!(m.contains("orchestrator_runs_claimed_total 1"), "{m}");
    assert!(m.contains("orchestrator_run_completions_total{outcome=\"succeeded\"} 1"), "{m}");
    assert!(m.contains("orchestrator_work_items{state=\"succeeded\"} 1"), "{m}");
    assert!(m.contains("orchestrator_http_request_duration_seconds_bucket{method=\"POST\",route=\"/agents/claim\",status=\"200\",le=\"+Inf\"} 1"), "{m}");
    assert!(m.contains("route=\"/runs/{id}/logs\""), "{m}");
}

#[tokio::test]
async fn failure_retry_cancel_requeue_and_info_requests() {
    let app = open_app();
    let pid = project(&app, None).await;
    let wid = queued_item(&app, None, &pid, "flaky").await;
    let (run, token) = claim_one(&app, None, Some("a1")).await;
    let done = post(
        &app,
        &format!("/runs/{run}/complete"),
        None,
        json!({"token": token, "outcome": {"status": "failed", "error": "boom", "exit_code": 1}}),
    )
    .await
    .ok(200);
    assert_eq!(done["work_item_state"], "retrying");
    assert!(done["retry_at"].is_string());
    // Requeue the run's work item now, claim again, ask a question.
    let w = post(&app, &format!("/runs/{run}/requeue"), None, json!({"delay_seconds": 0})).await.ok(200);
    assert_eq!(w["state"], "queued");
    let (run2, token2) = claim_one(&app, None, Some("a1")).await;
    let asked = post(
        &app,
        &format!("/runs/{run2}/info-requests"),
        None,
        json!({"token": token2, "questions": [{"key": "BRANCH", "prompt": "Which branch?", "kind": "choice", "choices": ["main", "dev"]}]}),
    )
    .await
    .ok(200);
    let iid = s(&asked["info_requests"][0]["id"]);
    assert_eq!(asked["info_requests"][0]["state"], "pending");
    let pending = get(&app, "/info-requests", None).await.ok(200);
    assert_eq!(pending["items"][0]["id"], iid.as_str());
    let of_run = get(&app, &format!("/runs/{run2}/info-requests"), None).await.ok(200);
    assert_eq!(of_run["items"].as_array().unwrap().len(), 1);
    post(&app, &format!("/info-requests/{iid}/answer"), None, json!({"value": "feature"})).await.err(422, "invalid");
    let ans = post(&app, &format!("/info-requests/{iid}/answer"), None, json!({"value": "dev", "answered_by": "ann"}))
        .await
        .ok(200);
    assert_eq!(ans["resumed"], true);
    assert_eq!(ans["info_request"]["state"], "answered");
    assert_eq!(ans["info_request"]["answer"], "dev", "no auth: the caller is an admin");
    assert_eq!(get(&app, &format!("/info-requests/{iid}"), None).await.ok(200)["answered_by"], "ann");
    // Answering twice: conflict.
    post(&app, &format!("/info-requests/{iid}/answer"), None, json!({"value": "main"})).await.err(409, "conflict");
    // The resumed claim carries the answer.
    let v = post(&app, "/agents/claim", None, json!({"agent_id": "a1", "max": 1})).await.ok(200);
    assert_eq!(v["assignments"][0]["resumed"], true);
    assert_eq!(v["assignments"][0]["answers"]["BRANCH"]["value"], "dev");
    // Cancel the run.
    let run3 = s(&v["assignments"][0]["run"]["id"]);
    let c = post(&app, &format!("/runs/{run3}/cancel"), None, json!({"reason": "stop"})).await.ok(200);
    assert_eq!(c["state"], "cancelled");
    post_empty(&app, &format!("/runs/{run3}/cancel"), None).await.err(409, "invalid_transition");
    assert_eq!(get(&app, &format!("/work-items/{wid}"), None).await.ok(200)["state"], "cancelled");
}

#[tokio::test]
async fn claim_long_poll_and_work_wakeups() {
    let app = open_app();
    // Nothing to claim: the long poll waits about wait_ms and answers empty.
    let t0 = Instant::now();
    let v = post(&app, "/agents/claim", None, json!({"agent_id": "a1", "max": 1, "wait_ms": 200})).await.ok(200);
    assert!(v["assignments"].as_array().unwrap().is_empty());
    assert!(t0.elapsed() >= Duration::from_millis(190));

    // A waiting claim gets work enqueued while it waits.
    let pid = project(&app, None).await;
    let router = app.router.clone();
    let waiter = tokio::spawn(async move {
        send(
            &router,
            request(
                axum::http::Method::POST,
                "/agents/claim",
                None,
                Some(&json!({"agent_id": "a1", "max": 1, "wait_ms": 20000})),
            ),
        )
        .await
    });
    let g = get(&app, "/agents/work", None).await.ok(200);
    assert_eq!(g["woken"], false);
    let generation = g["generation"].as_u64().unwrap();
    let router = app.router.clone();
    let work_waiter = tokio::spawn(async move {
        send(
            &router,
            request(axum::http::Method::GET, &format!("/agents/work?seen={generation}&timeout_ms=20000"), None, None),
        )
        .await
    });
    let wid = queued_item(&app, None, &pid, "late").await;
    let t0 = Instant::now();
    let got = waiter.await.unwrap().ok(200);
    assert_eq!(got["assignments"][0]["work_item"]["id"], wid.as_str());
    assert!(t0.elapsed() < Duration::from_secs(15), "woken, not timed out");
    let w = work_waiter.await.unwrap().ok(200);
    assert_eq!(w["woken"], true);
    assert!(w["generation"].as_u64().unwrap() > generation);
}

async fn sse_body(app: &App, path: &str, last_event_id: Option<&str>) -> String {
    let mut b = Request::builder().uri(path);
    if let Some(id) = last_event_id {
        b = b.header("last-event-id", id);
    }
    let resp = app.router.clone().oneshot(b.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let bytes = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the stream ends once the run is finished")
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn event_ids(body: &str) -> Vec<u64> {
    body.lines().filter_map(|l| l.strip_prefix("id: ")).map(|v| v.trim().parse().unwrap()).collect()
}

#[tokio::test]
async fn sse_follows_and_resumes_from_last_event_id() {
    let app = open_app();
    let pid = project(&app, None).await;
    queued_item(&app, None, &pid, "logs").await;
    let (run, token) = claim_one(&app, None, Some("a1")).await;
    let lines: Vec<_> = (1..=3).map(|i| json!({"stream": "stdout", "line": format!("line {i}")})).collect();
    post(&app, &format!("/runs/{run}/logs"), None, json!({"token": token, "lines": lines})).await.ok(200);

    // A live follower started before the run ends sees lines appended later, then the end event.
    let router = app.router.clone();
    let path = format!("/runs/{run}/logs/stream");
    let follower = tokio::spawn(async move {
        let resp = router.oneshot(Request::builder().uri(path).body(Body::empty()).unwrap()).await.unwrap();
        let bytes = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    });
    post(
        &app,
        &format!("/runs/{run}/logs"),
        None,
        json!({"token": token, "lines": [{"stream": "stderr", "line": "line 4"}]}),
    )
    .await
    .ok(200);
    post(&app, &format!("/runs/{run}/complete"), None, json!({"token": token, "outcome": {"status": "succeeded"}}))
        .await
        .ok(200);
    let live = follower.await.unwrap();
    assert_eq!(event_ids(&live), vec![1, 2, 3, 4], "{live}");
    assert!(live.contains("event: end"), "{live}");
    assert!(live.contains("\"state\":\"succeeded\""), "{live}");

    // Resume after 2 via Last-Event-ID, and via ?after=.
    let resumed = sse_body(&app, &format!("/runs/{run}/logs/stream"), Some("2")).await;
    assert_eq!(event_ids(&resumed), vec![3, 4], "{resumed}");
    assert!(resumed.contains("event: log"));
    assert!(resumed.contains("\"line\":\"line 3\""));
    let resumed = sse_body(&app, &format!("/runs/{run}/logs/stream?after=3"), None).await;
    assert_eq!(event_ids(&resumed), vec![4], "{resumed}");

    // A bad Last-Event-ID, an unknown run.
    let r = send(
        &app.router,
        Request::builder()
            .uri(format!("/runs/{run}/logs/stream"))
            .header("last-event-id", "x")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    r.err(400, "bad_request");
    get(&app, &format!("/runs/{}/logs/stream", uuid::Uuid::now_v7()), None).await.err(404, "not_found");
}

#[tokio::test]
async fn background_ticker_reaps_expired_leases_into_metrics() {
    use orchestrator_core::{ManualClock, Orchestrator, OrchestratorConfig};
    use orchestrator_http::{router_with_metrics, spawn_background_with_metrics, HttpConfig, Metrics};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at_epoch());
    let orch =
        Arc::new(Orchestrator::with_clock(sqlite_store(dir.path()), OrchestratorConfig::default(), clock.clone()));
    let metrics = Metrics::new();
    let app = App {
        router: local(router_with_metrics(orch.clone(), HttpConfig::new(), metrics.clone())),
        orch: orch.clone(),
        metrics: metrics.clone(),
        dir,
    };
    let pid = project(&app, None).await;
    let wid = queued_item(&app, None, &pid, "abandoned").await;
    let (run, _) = claim_one(&app, None, Some("gone")).await;
    clock.advance(chrono::Duration::seconds(3600));
    let ticker = spawn_background_with_metrics(orch, Duration::from_millis(10), metrics.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = get(&app, "/metrics", None).await.text;
        if m.contains("orchestrator_lease_expiries_total 1") {
            assert!(m.contains("orchestrator_retries_scheduled_total 1"), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "the lease was never reaped: {m}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ticker.abort();
    assert_eq!(get(&app, &format!("/runs/{run}"), None).await.ok(200)["state"], "lost");
    assert_eq!(get(&app, &format!("/work-items/{wid}"), None).await.ok(200)["state"], "retrying");
}

#[tokio::test]
async fn shutdown_ends_log_streams_and_long_polls() {
    use orchestrator_core::OrchestratorConfig;
    use orchestrator_http::HttpConfig;
    let (stop, signal) = tokio::sync::watch::channel(false);
    let app = app_with(OrchestratorConfig::default(), HttpConfig::new().with_shutdown(signal));
    let pid = project(&app, None).await;
    queued_item(&app, None, &pid, "never finishes").await;
    let (run, token) = claim_one(&app, None, Some("a1")).await;
    post(
        &app,
        &format!("/runs/{run}/logs"),
        None,
        json!({"token": token, "lines": [{"stream": "stdout", "line": "x"}]}),
    )
    .await
    .ok(200);
    let router = app.router.clone();
    let path = format!("/runs/{run}/logs/stream");
    let follower = tokio::spawn(async move {
        let resp = router.oneshot(Request::builder().uri(path).body(Body::empty()).unwrap()).await.unwrap();
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    });
    let router = app.router.clone();
    let poller = tokio::spawn(async move {
        send(
            &router,
            request(
                axum::http::Method::POST,
                "/agents/claim",
                None,
                Some(&json!({"agent_id": "a2", "max": 1, "wait_ms": 30000})),
            ),
        )
        .await
    });
    stop.send(true).unwrap();
    let body = tokio::time::timeout(Duration::from_secs(20), follower).await.expect("the stream ended").unwrap();
    assert_eq!(event_ids(&body), vec![1], "{body}");
    assert!(!body.contains("event: end"), "the run is not finished: {body}");
    let claimed = tokio::time::timeout(Duration::from_secs(20), poller).await.expect("the long poll ended").unwrap();
    assert!(claimed.ok(200)["assignments"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn projects_carry_a_validated_repository() {
    let app = open_app();
    let p = post(
        &app,
        "/projects",
        None,
        json!({"name": "app", "repository": {"url": "https://git.example.com/team/app.git", "base_branch": "main"}}),
    )
    .await
    .ok(201);
    assert_eq!(p["repository"]["url"], "https://git.example.com/team/app.git");
    assert_eq!(p["repository"]["base_branch"], "main");
    let id = s(&p["id"]);
    for bad in [json!({"url": ""}), json!({"url": "not a url"}), json!({"url": "https://u:pw@h/x.git"})] {
        let e = post(&app, "/projects", None, json!({"name": "bad", "repository": bad})).await.err(422, "invalid");
        assert_eq!(e["error"]["details"]["field"], "repository.url", "{e}");
    }
    let e = post(&app, "/projects", None, json!({"name": "bad", "repository": {"url": "/r", "extra": 1}})).await;
    assert_eq!(e.err(400, "bad_request")["error"]["details"]["path"], "repository.extra");
    assert_eq!(get(&app, "/projects", None).await.ok(200)["items"].as_array().unwrap().len(), 1, "nothing stored");
    let e = patch(&app, &format!("/projects/{id}"), None, json!({"repository": {"url": "/r", "base_branch": "a..b"}}))
        .await
        .err(422, "invalid");
    assert_eq!(e["error"]["details"]["field"], "repository.base_branch");
    // A name change keeps it; `null` removes it.
    let u = patch(&app, &format!("/projects/{id}"), None, json!({"name": "app2"})).await.ok(200);
    assert_eq!(u["repository"]["url"], "https://git.example.com/team/app.git");
    let u = patch(&app, &format!("/projects/{id}"), None, json!({"repository": null})).await.ok(200);
    assert!(u["repository"].is_null(), "{u}");
    assert!(get(&app, &format!("/projects/{id}"), None).await.ok(200)["repository"].is_null());
}

#[tokio::test]
async fn results_diffs_releases_and_cancellations() {
    let app = open_app();
    let pid = project(&app, None).await;
    let wid = queued_item(&app, None, &pid, "edit").await;
    let (run, token) = claim_one(&app, None, Some("a1")).await;
    get(&app, &format!("/runs/{run}/result"), None).await.err(404, "not_found");
    get(&app, &format!("/runs/{run}/diff"), None).await.err(404, "not_found");
    let result = json!({
        "branch": format!("orch/{wid}"), "base_commit": "aaaa1111", "head_commit": "bbbb2222",
        "files_changed": 1, "insertions": 2, "deletions": 0, "files": ["a.txt"], "committed": true
    });
    let patch_text = "diff --git a/a.txt b/a.txt\n+one\n+two\n";
    post(
        &app,
        &format!("/runs/{run}/result"),
        None,
        json!({"token": token + 1, "result": result, "patch": patch_text}),
    )
    .await
    .err(409, "lease_lost");
    post(&app, &format!("/runs/{run}/result"), None, json!({"token": token, "result": result, "patch": patch_text}))
        .await
        .ok(200);
    let r = get(&app, &format!("/runs/{run}/result"), None).await.ok(200);
    assert_eq!((r["branch"].as_str(), r["files_changed"].as_u64()), (Some(format!("orch/{wid}").as_str()), Some(1)));
    assert_eq!(r["patch_bytes"], patch_text.len());
    let d = get(&app, &format!("/runs/{run}/diff"), None).await;
    assert_eq!(d.status.as_u16(), 200);
    assert_eq!(d.headers["content-type"], "text/x-diff; charset=utf-8");
    assert_eq!(d.text, patch_text);

    // Nothing changed yet: the long poll times out empty. After a release the run is not held any more.
    let c =
        post(&app, "/agents/cancellations", None, json!({"runs": [{"run_id": run, "token": token}], "timeout_ms": 50}))
            .await
            .ok(200);
    assert_eq!(c["runs"], json!([]));
    let rel = post(&app, &format!("/runs/{run}/release"), None, json!({"token": token})).await.ok(200);
    assert_eq!(rel["state"], "waiting_input");
    let item = get(&app, &format!("/work-items/{wid}"), None).await.ok(200);
    assert_eq!((item["state"].as_str(), item["attempts"].as_u64()), (Some("queued"), Some(1)));
    let c = post(
        &app,
        "/agents/cancellations",
        None,
        json!({"runs": [{"run_id": run, "token": token}], "timeout_ms": 5000}),
    )
    .await
    .ok(200);
    assert_eq!(c["runs"], json!([run]));

    // The next claim resumes the same run; a cancel wakes a waiting long poll at once.
    let (run2, token2) = claim_one(&app, None, Some("a2")).await;
    assert_eq!(run2, run);
    let router = app.router.clone();
    let body = json!({"runs": [{"run_id": run2, "token": token2}], "timeout_ms": 20000});
    let waiter = tokio::spawn(async move {
        send(&router, request(axum::http::Method::POST, "/agents/cancellations", None, Some(&body))).await.ok(200)
    });
    post(&app, &format!("/runs/{run}/cancel"), None, json!({"reason": "enough"})).await.ok(200);
    let gone = waiter.await.unwrap();
    assert_eq!(gone["runs"], json!([run]));
    let logs = get(&app, &format!("/runs/{run}/logs"), None).await.ok(200);
    let lines: Vec<String> = logs["items"].as_array().unwrap().iter().map(|l| s(&l["line"])).collect();
    assert!(lines.iter().any(|l| l.starts_with("run cancelled: enough (by ")), "{lines:?}");
}
