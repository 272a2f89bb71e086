//! Happy paths of the management routes, through `oneshot` over a temp-file SQLite store.

mod common;

use common::*;
use orchestrator_core::OrchestratorConfig;
use orchestrator_http::HttpConfig;
use serde_json::json;

#[tokio::test]
async fn health_ready_metrics_openapi_stats() {
    let app = open_app();
    assert_eq!(get(&app, "/healthz", None).await.ok(200)["status"], "ok");
    assert_eq!(get(&app, "/readyz", None).await.ok(200)["status"], "ready");
    let m = get(&app, "/metrics", None).await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(m.text.contains("orchestrator_work_items{state=\"queued\"} 0"), "{}", m.text);
    let doc = get(&app, "/openapi.json", None).await.ok(200);
    assert_eq!(doc["openapi"], "3.0.3");
    let stats = get(&app, "/stats", None).await.ok(200);
    assert_eq!(stats["work_items"]["queued"], 0);
    // Every response carries a request id; a given one is echoed.
    let r = send(
        &app.router,
        axum::http::Request::builder()
            .uri("/healthz")
            .header("x-request-id", "abc-123")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    assert!(!get(&app, "/healthz", None).await.headers["x-request-id"].is_empty());
}

#[tokio::test]
async fn projects_visions_and_requirements() {
    let app = open_app();
    let id = project(&app, None).await;
    let p = get(&app, &format!("/projects/{id}"), None).await.ok(200);
    assert_eq!(p["name"], "demo");
    let p = patch(&app, &format!("/projects/{id}"), None, json!({"name": "renamed"})).await.ok(200);
    assert_eq!(p["name"], "renamed");
    assert_eq!(p["description"], "d");
    let list = get(&app, "/projects", None).await.ok(200);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["next"].is_null());
    // Pagination: limit 1 with two projects gives a cursor.
    let id2 = project(&app, None).await;
    let page1 = get(&app, "/projects?limit=1", None).await.ok(200);
    assert_eq!(page1["items"][0]["id"], id.as_str());
    let next = s(&page1["next"]);
    let page2 = get(&app, &format!("/projects?limit=1&after={next}"), None).await.ok(200);
    assert_eq!(page2["items"][0]["id"], id2.as_str());

    // Vision versions.
    let v1 =
        put(&app, &format!("/projects/{id}/vision"), None, json!({"text": "first", "author": "ann"})).await.ok(200);
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["author"], "ann");
    let v2 = put(&app, &format!("/projects/{id}/vision"), None, json!({"text": "second"})).await.ok(200);
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["author"], "anonymous", "the caller's name by default");
    assert_eq!(get(&app, &format!("/projects/{id}/vision"), None).await.ok(200)["text"], "second");
    assert_eq!(get(&app, &format!("/projects/{id}/vision?version=1"), None).await.ok(200)["text"], "first");
    let versions = get(&app, &format!("/projects/{id}/vision/versions"), None).await.ok(200);
    assert_eq!(versions["items"].as_array().unwrap().len(), 2);

    // Requirements: propose, list, get, approve (creates work items), reject another.
    let d = post(
        &app,
        &format!("/projects/{id}/requirements"),
        None,
        json!({"requirements": [{"title": "a"}, {"title": "b", "labels": ["rust"]}], "author": "pm"}),
    )
    .await
    .ok(201);
    assert_eq!(d["draft"]["state"], "proposed");
    assert_eq!(d["draft"]["title"], "2 requirements");
    assert!(d["approval"].is_null());
    let draft_id = s(&d["draft"]["id"]);
    let list = get(&app, &format!("/projects/{id}/requirements"), None).await.ok(200);
    assert_eq!(list["items"][0]["id"], draft_id.as_str());
    assert_eq!(get(&app, &format!("/requirements/{draft_id}"), None).await.ok(200)["proposed_by"], "pm");
    let out = post(&app, &format!("/requirements/{draft_id}/approve"), None, json!({"by": "boss", "reason": "ok"}))
        .await
        .ok(200);
    assert_eq!(out["draft"]["state"], "approved");
    assert_eq!(out["work_items"].as_array().unwrap().len(), 2);
    let d2 = post(
        &app,
        &format!("/projects/{id}/requirements"),
        None,
        json!({"title": "t", "requirements": [{"title": "c"}]}),
    )
    .await
    .ok(201);
    let d2 = s(&d2["draft"]["id"]);
    let out = post_empty(&app, &format!("/requirements/{d2}/reject"), None).await.ok(200);
    assert_eq!(out["draft"]["state"], "rejected");
    // Deciding again is an invalid transition or conflict (409).
    let again = post_empty(&app, &format!("/requirements/{d2}/approve"), None).await;
    assert_eq!(again.status, 409, "{}", again.text);

    // Delete (the project has no active work).
    delete(&app, &format!("/projects/{id2}"), None).await.ok(204);
    get(&app, &format!("/projects/{id2}"), None).await.err(404, "not_found");
}

const RECIPE: &str = "name: build\ninputs:\n  - name: TOKEN\n    kind: secret\nsteps:\n  - run: cargo build\n  - run: cargo test\n    timeout: 600\n";

#[tokio::test]
async fn work_items_and_recipes() {
    let app = open_app();
    let pid = project(&app, None).await;

    // Recipes: YAML body, JSON body, validate, list, get.
    let yaml_req = axum::http::Request::builder()
        .method("POST")
        .uri("/recipes")
        .header("content-type", "application/yaml")
        .body(axum::body::Body::from(RECIPE))
        .unwrap();
    let recipe = send(&app.router, yaml_req).await.ok(201);
    assert_eq!(recipe["name"], "build");
    assert_eq!(recipe["spec"]["steps"][1]["timeout"], 600);
    let rid = s(&recipe["id"]);
    let r2 = post(&app, "/recipes", None, json!({"yaml": "name: other\nsteps: [\"true\"]\n", "project_id": pid}))
        .await
        .ok(201);
    assert_eq!(r2["project_id"], pid.as_str());
    let spec = post(&app, "/recipes/validate", None, json!({"yaml": RECIPE})).await.ok(200);
    assert_eq!(spec["name"], "build");
    assert_eq!(get(&app, "/recipes", None).await.ok(200)["items"].as_array().unwrap().len(), 2);
    assert_eq!(get(&app, &format!("/recipes/{rid}"), None).await.ok(200)["yaml"], RECIPE);

    // Work items: single (draft), batch, idempotency, list filters, get, patch, submit, recipe, policy.
    let w = post(
        &app,
        "/work-items",
        None,
        json!({"project_id": pid, "title": "draft one", "draft": true, "labels": ["rust"]}),
    )
    .await
    .ok(201);
    assert_eq!(w["created"], true);
    assert_eq!(w["work_item"]["state"], "draft");
    let wid = s(&w["work_item"]["id"]);
    let batch = post(
        &app,
        "/work-items",
        None,
        json!({"items": [
            {"project_id": pid, "title": "b1", "idempotency_key": "k1"},
            {"project_id": pid, "title": "b2"}
        ]}),
    )
    .await
    .ok(201);
    assert_eq!(batch["items"].as_array().unwrap().len(), 2);
    assert_eq!(batch["items"][0]["work_item"]["state"], "ready");
    let again = post(&app, "/work-items", None, json!({"project_id": pid, "title": "b1", "idempotency_key": "k1"}))
        .await
        .ok(200);
    assert_eq!(again["created"], false);
    let dup =
        post(&app, "/work-items", None, json!({"project_id": pid, "title": "different", "idempotency_key": "k1"}))
            .await;
    dup.err(409, "duplicate");

    let all = get(&app, &format!("/work-items?project_id={pid}"), None).await.ok(200);
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let drafts = get(&app, "/work-items?state=draft", None).await.ok(200);
    assert_eq!(drafts["items"].as_array().unwrap().len(), 1);
    let labelled = get(&app, "/work-items?label=rust", None).await.ok(200);
    assert_eq!(labelled["items"][0]["id"], wid.as_str());
    get(&app, "/work-items?state=bogus", None).await.err(400, "bad_request");

    assert_eq!(get(&app, &format!("/work-items/{wid}"), None).await.ok(200)["title"], "draft one");
    let ch = patch(&app, &format!("/work-items/{wid}"), None, json!({"title": "renamed", "priority": 5})).await.ok(200);
    assert_eq!(ch["work_item"]["title"], "renamed");
    assert_eq!(ch["work_item"]["priority"], 5);
    let ch = put(&app, &format!("/work-items/{wid}/recipe"), None, json!({"recipe_id": rid})).await.ok(200);
    assert_eq!(ch["work_item"]["recipe_id"], rid.as_str());
    let pol = post(&app, &format!("/work-items/{wid}/policy"), None, json!({"max_retries": 7})).await.ok(200);
    assert_eq!(pol["retry"]["max_retries"], 7);
    let sub = post_empty(&app, &format!("/work-items/{wid}/submit"), None).await.ok(200);
    assert_eq!(sub["work_item"]["state"], "ready");
    assert!(sub["approval"].is_null());
    // Submitting again: invalid transition.
    post_empty(&app, &format!("/work-items/{wid}/submit"), None).await.err(409, "invalid_transition");

    // Enqueue (single) then the queue view, then requeue with a delay, then cancel.
    let t = post(&app, "/scheduler/enqueue", None, json!({"work_item_id": wid, "priority": 9})).await.ok(200);
    assert_eq!(t["state"], "queued");
    assert_eq!(t["priority"], 9);
    let q = get(&app, "/scheduler/queue", None).await.ok(200);
    assert_eq!(q["items"][0]["work_item_id"], wid.as_str());
    let rq = post(&app, &format!("/work-items/{wid}/requeue"), None, json!({"delay_seconds": 60})).await.ok(200);
    assert_eq!(rq["state"], "queued");
    assert!(rq["run_at"].is_string());
    let c = post(&app, &format!("/work-items/{wid}/cancel"), None, json!({"reason": "no longer needed"})).await.ok(200);
    assert_eq!(c["state"], "cancelled");
    let runs = get(&app, &format!("/work-items/{wid}/runs"), None).await.ok(200);
    assert_eq!(runs["items"].as_array().unwrap().len(), 0);
    get(&app, &format!("/work-items/{}/runs", uuid::Uuid::now_v7()), None).await.err(404, "not_found");

    // Batch enqueue with a dependency.
    let ids: Vec<String> = batch["items"].as_array().unwrap().iter().map(|i| s(&i["work_item"]["id"])).collect();
    let e = post(
        &app,
        "/scheduler/enqueue",
        None,
        json!({"items": [{"work_item_id": ids[0]}, {"work_item_id": ids[1], "depends_on": [ids[0]]}]}),
    )
    .await
    .ok(200);
    assert_eq!(e["items"][1]["pending_dependencies"], 1);
    let tick = post_empty(&app, "/scheduler/tick", None).await.ok(200);
    assert!(tick["promoted"].is_array() && tick["reaped"].is_array() && tick["expired"].is_array());
}

#[tokio::test]
async fn approvals_under_the_policy() {
    let app = app_with(OrchestratorConfig { require_approval: true, ..Default::default() }, HttpConfig::new());
    let pid = project(&app, None).await;
    let w1 = post(&app, "/work-items", None, json!({"project_id": pid, "title": "one"})).await.ok(201);
    assert_eq!(w1["work_item"]["state"], "awaiting_approval");
    let a1 = s(&w1["approval"]["id"]);
    let w2 = post(&app, "/work-items", None, json!({"project_id": pid, "title": "two"})).await.ok(201);
    let a2 = s(&w2["approval"]["id"]);
    let pending = get(&app, "/approvals", None).await.ok(200);
    assert_eq!(pending["items"].as_array().unwrap().len(), 2);
    assert_eq!(get(&app, &format!("/approvals/{a1}"), None).await.ok(200)["state"], "pending");
    let ok =
        post(&app, &format!("/approvals/{a1}/approve"), None, json!({"by": "lead", "reason": "fine"})).await.ok(200);
    assert_eq!(ok["approval"]["state"], "approved");
    assert_eq!(ok["approval"]["decided_by"], "lead");
    assert_eq!(ok["work_items"][0]["state"], "ready");
    let no = post(&app, &format!("/approvals/{a2}/reject"), None, json!({"reason": "not now"})).await.ok(200);
    assert_eq!(no["approval"]["state"], "rejected");
    assert_eq!(no["approval"]["decided_by"], "anonymous");
    assert_eq!(get(&app, "/approvals", None).await.ok(200)["items"].as_array().unwrap().len(), 0);
    assert_eq!(get(&app, "/approvals?state=all", None).await.ok(200)["items"].as_array().unwrap().len(), 2);
    assert_eq!(get(&app, "/approvals?state=approved", None).await.ok(200)["items"].as_array().unwrap().len(), 1);
    // Deciding twice: 409.
    let again = post_empty(&app, &format!("/approvals/{a1}/approve"), None).await;
    assert_eq!(again.status, 409, "{}", again.text);
    // Enqueue with the work item creation under the policy is a conflict.
    post(&app, "/work-items", None, json!({"project_id": pid, "title": "x", "enqueue": {}})).await.err(409, "conflict");
    // Requirements under the policy come with an approval request.
    let d = post(&app, &format!("/projects/{pid}/requirements"), None, json!({"requirements": [{"title": "r"}]}))
        .await
        .ok(201);
    assert_eq!(d["approval"]["state"], "pending");
}

/// A 252 KB recipe whose 240 KB string is used by 999 aliases (240 MB expanded): validating or storing it
/// answers a short 422 instead of the expansion.
#[tokio::test]
async fn recipe_alias_amplification_is_a_422() {
    let app = open_app();
    let mut yaml = format!("name: amplified\nsteps:\n  - &big \"echo {}\"\n", "a".repeat(240 * 1024));
    yaml.push_str(&"  - *big\n".repeat(999));
    for path in ["/recipes/validate", "/recipes"] {
        let v = post(&app, path, None, json!({ "yaml": yaml })).await;
        assert!(v.text.len() < 4096, "{path}: answered {} bytes", v.text.len());
        let body = v.err(422, "invalid");
        let message = body["error"]["details"]["errors"][0]["message"].as_str().unwrap().to_string();
        assert!(message.contains("aliases are expanded"), "{path}: {message}");
    }
    let page = get(&app, "/recipes", None).await.ok(200);
    assert_eq!(page["items"].as_array().unwrap().len(), 0, "nothing stored");
}
