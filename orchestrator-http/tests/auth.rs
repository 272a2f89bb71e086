//! Tokens and roles, agents confined to their own runs, secret answers, rate limiting, CORS.

mod common;

use axum::body::Body;
use axum::http::{Method, Request};
use common::*;
use orchestrator_core::crypto::{Keyring, SecretKey};
use orchestrator_core::OrchestratorConfig;
use orchestrator_http::{HttpConfig, Role};
use serde_json::json;

#[tokio::test]
async fn missing_wrong_and_malformed_tokens_are_401() {
    let app = secure_app();
    let r = get(&app, "/projects", None).await;
    r.err(401, "unauthorized");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    get(&app, "/projects", Some("not-a-token")).await.err(401, "unauthorized");
    let req = Request::builder().uri("/projects").header("authorization", "Basic abc").body(Body::empty()).unwrap();
    send(&app.router, req).await.err(401, "unauthorized");
    post(&app, "/agents/claim", None, json!({"max": 1})).await.err(401, "unauthorized");
    // Public routes need no token.
    get(&app, "/healthz", None).await.ok(200);
    get(&app, "/readyz", None).await.ok(200);
    assert_eq!(get(&app, "/metrics", None).await.status, 200);
    get(&app, "/openapi.json", None).await.ok(200);
    // Every role reads.
    for t in [ADMIN, OPERATOR, VIEWER, AGENT1] {
        get(&app, "/projects", Some(t)).await.ok(200);
    }
}

#[tokio::test]
async fn roles_are_enforced() {
    let app = secure_app();
    post(&app, "/projects", Some(VIEWER), json!({"name": "p"})).await.err(403, "forbidden");
    post(&app, "/projects", Some(AGENT1), json!({"name": "p"})).await.err(403, "forbidden");
    let pid = project(&app, Some(OPERATOR)).await;
    delete(&app, &format!("/projects/{pid}"), Some(OPERATOR)).await.err(403, "forbidden");
    post_empty(&app, "/scheduler/tick", Some(VIEWER)).await.err(403, "forbidden");
    post(&app, "/agents/claim", Some(VIEWER), json!({"agent_id": "x", "max": 1})).await.err(403, "forbidden");
    post(&app, "/agents/claim", Some(OPERATOR), json!({"agent_id": "x", "max": 1})).await.err(403, "forbidden");
    get(&app, "/agents/work", Some(VIEWER)).await.err(403, "forbidden");
    // Viewers may validate recipes (read-only).
    post(&app, "/recipes/validate", Some(VIEWER), json!({"yaml": "name: a\nsteps: [\"true\"]\n"})).await.ok(200);
    post(&app, "/recipes", Some(VIEWER), json!({"yaml": "name: a\nsteps: [\"true\"]\n"})).await.err(403, "forbidden");
    // The decider defaults to the token name.
    let d =
        post(&app, &format!("/projects/{pid}/requirements"), Some(OPERATOR), json!({"requirements": [{"title": "r"}]}))
            .await
            .ok(201);
    assert_eq!(d["draft"]["proposed_by"], "ops");
    delete(&app, &format!("/projects/{pid}"), Some(ADMIN)).await.ok(204);
}

#[tokio::test]
async fn agents_act_only_on_their_own_runs() {
    let app = secure_app();
    let pid = project(&app, Some(OPERATOR)).await;
    queued_item(&app, Some(OPERATOR), &pid, "one").await;
    // An agent token claims as itself; naming another agent is refused.
    post(&app, "/agents/claim", Some(AGENT1), json!({"agent_id": "agent-2", "max": 1})).await.err(403, "forbidden");
    let (run, token) = claim_one(&app, Some(AGENT1), None).await;
    assert_eq!(get(&app, &format!("/runs/{run}"), Some(AGENT1)).await.ok(200)["agent_id"], "agent-1");
    let t = json!({"token": token});
    for (path, body) in [
        ("heartbeat", t.clone()),
        ("start", t.clone()),
        ("logs", json!({"token": token, "lines": [{"stream": "stdout", "line": "x"}]})),
        ("steps", json!({"token": token, "events": [{"kind": "info", "name": "x"}]})),
        ("info-requests", json!({"token": token, "questions": [{"key": "K", "prompt": "p"}]})),
        ("complete", json!({"token": token, "outcome": {"status": "succeeded"}})),
    ] {
        post(&app, &format!("/runs/{run}/{path}"), Some(AGENT2), body).await.err(403, "forbidden");
    }
    // Operators cannot act as agents; the owner and admins can.
    post(&app, &format!("/runs/{run}/heartbeat"), Some(OPERATOR), t.clone()).await.err(403, "forbidden");
    post(&app, &format!("/runs/{run}/heartbeat"), Some(AGENT1), t.clone()).await.ok(200);
    post(&app, &format!("/runs/{run}/heartbeat"), Some(ADMIN), t.clone()).await.ok(200);
    post(
        &app,
        &format!("/runs/{run}/complete"),
        Some(AGENT1),
        json!({"token": token, "outcome": {"status": "succeeded"}}),
    )
    .await
    .ok(200);
}

#[tokio::test]
async fn secret_answers_are_hidden_except_from_admins_and_the_asking_agent() {
    let cfg =
        OrchestratorConfig { keyring: Some(Keyring::new("k1", SecretKey::generate()).unwrap()), ..Default::default() };
    let app = app_with(cfg, tokens());
    let pid = project(&app, Some(OPERATOR)).await;
    queued_item(&app, Some(OPERATOR), &pid, "needs a secret").await;
    let (run, token) = claim_one(&app, Some(AGENT1), None).await;
    let asked = post(
        &app,
        &format!("/runs/{run}/info-requests"),
        Some(AGENT1),
        json!({"token": token, "questions": [{"key": "API_KEY", "prompt": "key?", "kind": "secret"}]}),
    )
    .await
    .ok(200);
    let iid = s(&asked["info_requests"][0]["id"]);
    let ans = post(&app, &format!("/info-requests/{iid}/answer"), Some(OPERATOR), json!({"value": "hunter2"})).await;
    let v = ans.ok(200);
    assert!(v["info_request"]["answer"].is_null());
    assert!(!ans.text.contains("hunter2"));
    assert_eq!(v["info_request"]["answered_by"], "ops");
    for t in [VIEWER, OPERATOR, AGENT2] {
        let r = get(&app, &format!("/info-requests/{iid}"), Some(t)).await;
        assert!(r.ok(200)["answer"].is_null());
        assert!(!r.text.contains("hunter2"));
        let l = get(&app, "/info-requests?state=all", Some(t)).await;
        assert!(!l.text.contains("hunter2"), "{}", l.text);
        let l = get(&app, &format!("/runs/{run}/info-requests"), Some(t)).await;
        assert!(!l.text.contains("hunter2"), "{}", l.text);
    }
    assert_eq!(get(&app, &format!("/info-requests/{iid}"), Some(ADMIN)).await.ok(200)["answer"], "hunter2");
    assert_eq!(get(&app, &format!("/info-requests/{iid}"), Some(AGENT1)).await.ok(200)["answer"], "hunter2");
    let l = get(&app, &format!("/runs/{run}/info-requests"), Some(AGENT1)).await.ok(200);
    assert_eq!(l["items"][0]["answer"], "hunter2");
    // The resumed claim delivers it to the agent, marked secret.
    let c = post(&app, "/agents/claim", Some(AGENT1), json!({"max": 1})).await.ok(200);
    assert_eq!(c["assignments"][0]["answers"]["API_KEY"]["value"], "hunter2");
    assert_eq!(c["assignments"][0]["answers"]["API_KEY"]["secret"], true);
}

#[tokio::test]
async fn rate_limit_per_client_with_retry_after() {
    let app = app_with(OrchestratorConfig::default(), tokens().with_rate_limit_per_min(Some(3)));
    for _ in 0..3 {
        get(&app, "/projects", Some(VIEWER)).await.ok(200);
    }
    let r = get(&app, "/projects", Some(VIEWER)).await;
    r.err(429, "rate_limited");
    let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&ra));
    // Other clients are unaffected; public routes are not limited.
    get(&app, "/projects", Some(OPERATOR)).await.ok(200);
    get(&app, "/healthz", None).await.ok(200);
    // Requests without a valid token share the peer-address bucket (no ConnectInfo here: one bucket).
    for _ in 0..3 {
        get(&app, "/projects", Some("bad")).await.err(401, "unauthorized");
    }
    get(&app, "/projects", Some("bad")).await.err(429, "rate_limited");
}

#[tokio::test]
async fn cors_and_cross_origin_writes() {
    // No origin configured: no CORS headers, and browser writes from any origin are refused.
    let app = open_app();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/projects")
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(Body::from("{\"name\": \"x\"}"))
        .unwrap();
    send(&app.router, req).await.err(403, "forbidden");
    let r = send(
        &app.router,
        Request::builder().uri("/healthz").header("origin", "https://a.example").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(r.headers.get("access-control-allow-origin").is_none());

    let app = app_with(OrchestratorConfig::default(), HttpConfig::new().with_cors_origins(["https://ui.example"]));
    let pre = Request::builder()
        .method(Method::OPTIONS)
        .uri("/projects")
        .header("origin", "https://ui.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .body(Body::empty())
        .unwrap();
    let r = send(&app.router, pre).await;
    assert!(r.status.is_success(), "{}", r.status);
    assert_eq!(r.headers["access-control-allow-origin"], "https://ui.example");
    let mut req = request(Method::POST, "/projects", None, Some(&json!({"name": "from ui"})));
    req.headers_mut().insert("origin", "https://ui.example".parse().unwrap());
    let r = send(&app.router, req).await;
    r.ok(201);
    assert_eq!(r.headers["access-control-allow-origin"], "https://ui.example");
    let mut req = request(Method::POST, "/projects", None, Some(&json!({"name": "x"})));
    req.headers_mut().insert("origin", "https://other.example".parse().unwrap());
    send(&app.router, req).await.err(403, "forbidden");
}

#[test]
fn config_from_lookup_and_token_roles() {
    let c = HttpConfig::new().with_token("a", Role::Agent, "t").unwrap();
    assert!(c.auth_enabled());
    assert!(HttpConfig::new().with_token("a", Role::Agent, "").is_err());
    assert!(c.clone().with_token("a", Role::Viewer, "u").is_err(), "names are unique");
    assert_eq!(c.token_names(), vec![("a".to_string(), Role::Agent)]);
}

#[tokio::test]
async fn without_tokens_only_loopback_host_names_are_served() {
    let app = open_app();
    let with_host = |host: &str| Request::builder().uri("/projects").header("host", host).body(Body::empty()).unwrap();
    for ok in ["127.0.0.1:18080", "localhost:18080", "[::1]:18080"] {
        send(&app.router, with_host(ok)).await.ok(200);
    }
    // A DNS name rebound to 127.0.0.1 by a web page is refused (public routes stay open).
    send(&app.router, with_host("attacker.example:18080")).await.err(403, "forbidden");
    let r = Request::builder().uri("/healthz").header("host", "attacker.example").body(Body::empty()).unwrap();
    send(&app.router, r).await.ok(200);
    // With tokens, any host name is fine.
    let app = secure_app();
    let r = Request::builder()
        .uri("/projects")
        .header("host", "orchestrator.internal")
        .header("authorization", format!("Bearer {VIEWER}"))
        .body(Body::empty())
        .unwrap();
    send(&app.router, r).await.ok(200);
}

#[tokio::test]
async fn without_tokens_a_non_loopback_peer_is_refused_whatever_its_host() {
    use axum::extract::connect_info::MockConnectInfo;
    use std::net::SocketAddr;
    let dir = tempfile::tempdir().unwrap();
    let orch = std::sync::Arc::new(orchestrator_core::Orchestrator::new(
        sqlite_store(dir.path()),
        OrchestratorConfig::default(),
    ));
    let bare = orchestrator_http::router(orch, HttpConfig::new());
    let from = |peer: &str| bare.clone().layer(MockConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    let with_host = || Request::builder().uri("/projects").header("host", "localhost").body(Body::empty()).unwrap();
    for peer in ["10.1.2.3:5555", "[2001:db8::1]:5555", "[::ffff:10.0.0.1]:5555"] {
        let v = send(&from(peer), with_host()).await.err(403, "forbidden");
        assert!(v["error"]["message"].as_str().unwrap().contains("only loopback peers"), "{v}");
    }
    for peer in ["127.0.0.1:5555", "[::1]:5555", "[::ffff:127.0.0.1]:5555"] {
        send(&from(peer), with_host()).await.ok(200);
    }
    // No peer address at all: refused, saying how to serve the router.
    let v = send(&bare, with_host()).await.err(403, "forbidden");
    assert!(v["error"]["message"].as_str().unwrap().contains("connect_info"), "{v}");
}

/// With tokens, audit names are the token's name whatever the body says, and under ORCH_REQUIRE_APPROVAL a
/// token cannot approve what it proposed, created, changed or submitted (unless self-approval is allowed).
#[tokio::test]
async fn audit_names_come_from_the_token_and_self_approval_is_refused() {
    let policy = || OrchestratorConfig { require_approval: true, ..Default::default() };
    let app = app_with(policy(), tokens());
    let pid = project(&app, Some(OPERATOR)).await;

    // Vision author and requirements proposer: the token's name, not the body's.
    let v = put(&app, &format!("/projects/{pid}/vision"), Some(OPERATOR), json!({"text": "v", "author": "ceo"}))
        .await
        .ok(200);
    assert_eq!(v["author"], "ops");
    let d = post(
        &app,
        &format!("/projects/{pid}/requirements"),
        Some(OPERATOR),
        json!({"requirements": [{"title": "r"}], "author": "someone-else"}),
    )
    .await
    .ok(201);
    assert_eq!(d["draft"]["proposed_by"], "ops");
    let draft = s(&d["draft"]["id"]);
    let e = post(&app, &format!("/requirements/{draft}/approve"), Some(OPERATOR), json!({"by": "lead"})).await;
    let body = e.err(403, "forbidden");
    assert!(body["error"]["message"].as_str().unwrap().contains("ORCH_ALLOW_SELF_APPROVAL"), "{body}");
    // Through the approval route too.
    let a = s(&d["approval"]["id"]);
    post_empty(&app, &format!("/approvals/{a}/approve"), Some(OPERATOR)).await.err(403, "forbidden");
    let ok = post(&app, &format!("/requirements/{draft}/approve"), Some(ADMIN), json!({"by": "ops"})).await.ok(200);
    assert_eq!(ok["approval"]["decided_by"], "root", "the body's `by` is not recorded");

    // A work item created by ops waits for someone else.
    let w = post(&app, "/work-items", Some(OPERATOR), json!({"project_id": pid, "title": "w"})).await.ok(201);
    let a = s(&w["approval"]["id"]);
    post(&app, &format!("/approvals/{a}/approve"), Some(OPERATOR), json!({"by": "root"})).await.err(403, "forbidden");
    // Rejecting one's own work is fine.
    let no = post_empty(&app, &format!("/approvals/{a}/reject"), Some(OPERATOR)).await.ok(200);
    assert_eq!(no["approval"]["decided_by"], "ops");
    // Created by root, changed by ops: ops may not approve the change; root may not either.
    let w = post(&app, "/work-items", Some(ADMIN), json!({"project_id": pid, "title": "x"})).await.ok(201);
    let wid = s(&w["work_item"]["id"]);
    let changed = patch(&app, &format!("/work-items/{wid}"), Some(OPERATOR), json!({"title": "x2"})).await.ok(200);
    let a = s(&changed["approval"]["id"]);
    post_empty(&app, &format!("/approvals/{a}/approve"), Some(OPERATOR)).await.err(403, "forbidden");
    post_empty(&app, &format!("/approvals/{a}/approve"), Some(ADMIN)).await.err(403, "forbidden");

    // Info-request answers record the token's name.
    let w = post(&app, "/work-items", Some(ADMIN), json!({"project_id": pid, "title": "asks"})).await.ok(201);
    let a = s(&w["approval"]["id"]);
    post_empty(&app, &format!("/approvals/{a}/approve"), Some(OPERATOR)).await.ok(200);
    let wid = s(&w["work_item"]["id"]);
    post(&app, "/scheduler/enqueue", Some(OPERATOR), json!({"work_item_id": wid})).await.ok(200);
    let (run, token) = claim_one(&app, Some(AGENT1), None).await;
    let q = post(
        &app,
        &format!("/runs/{run}/info-requests"),
        Some(AGENT1),
        json!({"token": token, "questions": [{"key": "K", "prompt": "p"}]}),
    )
    .await
    .ok(200);
    let qid = s(&q["info_requests"][0]["id"]);
    let answered = post(
        &app,
        &format!("/info-requests/{qid}/answer"),
        Some(OPERATOR),
        json!({"value": "v", "answered_by": "ceo"}),
    )
    .await
    .ok(200);
    assert_eq!(answered["info_request"]["answered_by"], "ops");

    // Allowed by configuration: ops approves its own work item.
    let app = app_with(policy(), tokens().with_allow_self_approval(true));
    let pid = project(&app, Some(OPERATOR)).await;
    let w = post(&app, "/work-items", Some(OPERATOR), json!({"project_id": pid, "title": "w"})).await.ok(201);
    let a = s(&w["approval"]["id"]);
    post_empty(&app, &format!("/approvals/{a}/approve"), Some(OPERATOR)).await.ok(200);
}
