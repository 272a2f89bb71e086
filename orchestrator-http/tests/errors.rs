//! Bad input on each kind of route: malformed JSON, unknown ids, invalid transitions, oversized bodies,
//! YAML errors with lines, unknown routes, validation errors.

mod common;

use axum::body::Body;
use axum::http::{Method, Request};
use common::*;
use orchestrator_core::OrchestratorConfig;
use orchestrator_http::HttpConfig;
use serde_json::json;

fn raw(method: Method, path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    b.body(body.into()).unwrap()
}

#[tokio::test]
async fn malformed_json_and_queries_are_400_with_request_id() {
    let app = open_app();
    let pid = project(&app, None).await;
    let r = send(&app.router, raw(Method::POST, "/projects", Some("application/json"), "{\"name\": ")).await;
    let e = r.err(400, "bad_request");
    assert!(e["error"]["details"]["line"].is_number());
    assert_eq!(r.headers["x-request-id"], e["error"]["request_id"].as_str().unwrap());
    // Given request ids end up in the error body.
    let mut req = raw(Method::POST, "/projects", Some("application/json"), "nope");
    req.headers_mut().insert("x-request-id", "req-42".parse().unwrap());
    assert_eq!(send(&app.router, req).await.err(400, "bad_request")["error"]["request_id"], "req-42");
    // Wrong types, unknown fields, missing fields, empty bodies, non-JSON content types.
    let e = post(&app, "/projects", None, json!({"name": 5})).await.err(400, "bad_request");
    assert_eq!(e["error"]["details"]["path"], "name");
    post(&app, "/projects", None, json!({"name": "x", "colour": "red"})).await.err(400, "bad_request");
    post(&app, "/projects", None, json!({"description": "x"})).await.err(400, "bad_request");
    send(&app.router, raw(Method::POST, "/projects", Some("application/json"), "")).await.err(400, "bad_request");
    send(&app.router, raw(Method::POST, "/projects", Some("application/x-www-form-urlencoded"), "name=x"))
        .await
        .err(400, "bad_request");
    let e = post(&app, "/work-items", None, json!({"items": [{"project_id": pid, "title": 1}]}))
        .await
        .err(400, "bad_request");
    assert_eq!(e["error"]["details"]["path"], "items[0].title");
    post(&app, "/agents/claim", None, json!({"agent_id": "a", "max": "many"})).await.err(400, "bad_request");
    post(&app, "/runs/not-a-uuid/heartbeat", None, json!({"token": 1})).await.err(400, "bad_request");
    get(&app, "/projects/not-a-uuid", None).await.err(400, "bad_request");
    get(&app, "/projects?limit=lots", None).await.err(400, "bad_request");
    get(&app, "/projects?bogus=1", None).await.err(400, "bad_request");
    get(&app, "/runs?state=flying", None).await.err(400, "bad_request");
    get(&app, "/info-requests?state=flying", None).await.err(400, "bad_request");
    get(&app, &format!("/runs/{}/logs?after=-1", uuid::Uuid::now_v7()), None).await.err(400, "bad_request");
}

#[tokio::test]
async fn unknown_ids_are_404_with_entity_details() {
    let app = open_app();
    let id = uuid::Uuid::now_v7();
    for path in [
        format!("/projects/{id}"),
        format!("/projects/{id}/vision"),
        format!("/projects/{id}/vision/versions"),
        format!("/projects/{id}/requirements"),
        format!("/requirements/{id}"),
        format!("/work-items/{id}"),
        format!("/recipes/{id}"),
        format!("/approvals/{id}"),
        format!("/runs/{id}"),
        format!("/runs/{id}/logs"),
        format!("/runs/{id}/steps"),
        format!("/runs/{id}/info-requests"),
        format!("/info-requests/{id}"),
    ] {
        let e = get(&app, &path, None).await.err(404, "not_found");
        assert!(e["error"]["details"]["entity"].is_string(), "{path}: {e}");
    }
    let e = patch(&app, &format!("/work-items/{id}"), None, json!({"title": "t"})).await.err(404, "not_found");
    assert_eq!(e["error"]["details"]["id"], id.to_string());
    assert_eq!(e["error"]["details"]["entity"], "work_item");
    post(&app, &format!("/runs/{id}/heartbeat"), None, json!({"token": 1})).await.err(404, "not_found");
    post(&app, &format!("/runs/{id}/complete"), None, json!({"token": 1, "outcome": {"status": "succeeded"}}))
        .await
        .err(404, "not_found");
    post_empty(&app, &format!("/approvals/{id}/approve"), None).await.err(404, "not_found");
    post(&app, &format!("/info-requests/{id}/answer"), None, json!({"value": "v"})).await.err(404, "not_found");
    delete(&app, &format!("/projects/{id}"), None).await.err(404, "not_found");
    // Unknown routes and methods answer in the same shape.
    get(&app, "/nope", None).await.err(404, "not_found");
    let r = send(&app.router, request(Method::DELETE, "/healthz", None, None)).await;
    r.err(405, "method_not_allowed");
}

#[tokio::test]
async fn invalid_transitions_and_validation() {
    let app = open_app();
    let pid = project(&app, None).await;
    let ready = post(&app, "/work-items", None, json!({"project_id": pid, "title": "r"})).await.ok(201);
    let rid = s(&ready["work_item"]["id"]);
    // Requeue a ready (never enqueued) item, cancel twice.
    let e = post(&app, &format!("/work-items/{rid}/requeue"), None, json!({})).await;
    assert_eq!(e.status, 409, "{}", e.text);
    post_empty(&app, &format!("/work-items/{rid}/cancel"), None).await.ok(200);
    let e = post_empty(&app, &format!("/work-items/{rid}/cancel"), None).await.err(409, "invalid_transition");
    assert_eq!(e["error"]["details"]["entity"], "work_item");
    assert_eq!(e["error"]["details"]["from"], "cancelled");
    // Validation: 422 with the field.
    let e = post(&app, "/projects", None, json!({"name": "  "})).await.err(422, "invalid");
    assert_eq!(e["error"]["details"]["field"], "name");
    post(&app, "/work-items", None, json!({"title": "no project"})).await.err(422, "invalid");
    post(&app, "/agents/claim", None, json!({"agent_id": "a", "max": 0})).await.err(422, "invalid");
    post(&app, "/agents/claim", None, json!({"max": 1})).await.err(422, "invalid");
    post(&app, &format!("/work-items/{rid}/policy"), None, json!({"jitter": 7.0})).await.err(422, "invalid");
    let other = post(&app, "/work-items", None, json!({"project_id": pid, "title": "o"})).await.ok(201);
    let oid = s(&other["work_item"]["id"]);
    let unknown = uuid::Uuid::now_v7();
    post(&app, "/scheduler/enqueue", None, json!({"work_item_id": oid, "depends_on": [unknown]}))
        .await
        .err(422, "invalid");
    // A project with queued work cannot be deleted.
    post(&app, "/scheduler/enqueue", None, json!({"work_item_id": oid})).await.ok(200);
    delete(&app, &format!("/projects/{pid}"), None).await.err(409, "conflict");
    // Secret answers without an encryption key: refused, nothing leaks.
    queued_item(&app, None, &pid, "q").await;
    let (run, token) = claim_one(&app, None, Some("a1")).await;
    let asked = post(
        &app,
        &format!("/runs/{run}/info-requests"),
        None,
        json!({"token": token, "questions": [{"key": "PW", "prompt": "pw?", "kind": "secret"}]}),
    )
    .await
    .ok(200);
    let iid = s(&asked["info_requests"][0]["id"]);
    let e = post(&app, &format!("/info-requests/{iid}/answer"), None, json!({"value": "hunter2"}))
        .await
        .err(409, "conflict");
    assert!(!e.to_string().contains("hunter2"));
}

#[tokio::test]
async fn yaml_errors_carry_path_line_and_column() {
    let app = open_app();
    let yaml = "name: build\nsteps:\n  - run: cargo build\n    timeout: -5\n";
    for path in ["/recipes", "/recipes/validate"] {
        let r = send(&app.router, raw(Method::POST, path, Some("application/yaml"), yaml)).await;
        let e = r.err(422, "invalid");
        let errs = e["error"]["details"]["errors"].as_array().unwrap();
        assert!(!errs.is_empty());
        assert_eq!(errs[0]["line"], 4, "{e}");
        assert!(errs[0]["column"].is_number(), "{e}");
        assert!(errs[0]["path"].as_str().unwrap().starts_with("steps[0]"), "{e}");
    }
    // Syntax error, JSON form.
    let e = post(&app, "/recipes", None, json!({"yaml": "name: x\nsteps: [\n"})).await.err(422, "invalid");
    assert!(e["error"]["details"]["errors"][0]["line"].is_number(), "{e}");
    // No content type, unsupported content type.
    send(&app.router, raw(Method::POST, "/recipes", None, yaml)).await.err(400, "bad_request");
    send(&app.router, raw(Method::POST, "/recipes", Some("text/plain"), yaml)).await.err(400, "bad_request");
    assert_eq!(get(&app, "/recipes", None).await.ok(200)["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = app_with(OrchestratorConfig::default(), HttpConfig::new().with_max_body_bytes(2048));
    let big = json!({"name": "x".repeat(4096)});
    let e = post(&app, "/projects", None, big.clone()).await.err(413, "payload_too_large");
    assert!(e["error"]["request_id"].is_string());
    // Without a Content-Length (streamed body), the limit still holds.
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> =
        (0..8).map(|_| Ok(axum::body::Bytes::from(vec![b' '; 1024]))).collect();
    let stream = futures_util::stream::iter(chunks);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/recipes")
        .header("content-type", "application/yaml")
        .body(Body::from_stream(stream))
        .unwrap();
    send(&app.router, req).await.err(413, "payload_too_large");
    // Under the limit is fine.
    post(&app, "/projects", None, json!({"name": "small"})).await.ok(201);
}

#[tokio::test]
async fn internal_errors_never_show_internals() {
    use orchestrator_core::crypto::{Keyring, SecretKey};
    use orchestrator_core::{MemoryStore, Orchestrator, Store};
    use std::sync::Arc;
    // Two facades over one store with different keys: the second cannot decrypt what the first sealed.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let with_key = |k| OrchestratorConfig { keyring: Some(Keyring::new("k1", k).unwrap()), ..Default::default() };
    let first = Arc::new(Orchestrator::new(store.clone(), with_key(SecretKey::generate())));
    let second = Arc::new(Orchestrator::new(store, with_key(SecretKey::generate())));
    let a = local(orchestrator_http::router_with_metrics(first, HttpConfig::new(), orchestrator_http::Metrics::new()));
    let b = local(orchestrator_http::router_with_metrics(second, HttpConfig::new(), orchestrator_http::Metrics::new()));
    let call = |r: &axum::Router, m: Method, p: &str, body: Option<serde_json::Value>| {
        let r = r.clone();
        let req = request(m, p, None, body.as_ref());
        async move { send(&r, req).await }
    };
    let p = call(&a, Method::POST, "/projects", Some(json!({"name": "p"}))).await.ok(201);
    let pid = s(&p["id"]);
    call(&a, Method::POST, "/work-items", Some(json!({"project_id": pid, "title": "t", "enqueue": {}}))).await.ok(201);
    let c = call(&a, Method::POST, "/agents/claim", Some(json!({"agent_id": "x", "max": 1}))).await.ok(200);
    let run = s(&c["assignments"][0]["run"]["id"]);
    let token = c["assignments"][0]["lease"]["token"].as_u64().unwrap();
    let q = json!({"token": token, "questions": [{"key": "S", "prompt": "s?", "kind": "secret"}]});
    let asked = call(&a, Method::POST, &format!("/runs/{run}/info-requests"), Some(q)).await.ok(200);
    let iid = s(&asked["info_requests"][0]["id"]);
    call(&a, Method::POST, &format!("/info-requests/{iid}/answer"), Some(json!({"value": "v"}))).await.ok(200);
    let r = call(&b, Method::GET, &format!("/info-requests/{iid}"), None).await;
    let e = r.err(500, "internal");
    assert_eq!(e["error"]["message"], "internal server error");
    assert!(!r.text.to_lowercase().contains("decrypt"), "{}", r.text);
    // In a list, the undecryptable answer is hidden and the list still answers.
    let l = call(&b, Method::GET, "/info-requests?state=all", None).await.ok(200);
    assert!(l["items"][0]["answer"].is_null());
}
