//! Shared helpers: a router over a temp-file SQLite store, and a request helper.
#![allow(dead_code)]

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use orchestrator_core::{Orchestrator, OrchestratorConfig, Store};
use orchestrator_http::{router_with_metrics, HttpConfig, Metrics, Role};
use orchestrator_sqlite::{SqliteOptions, SqliteStore};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use tower::ServiceExt;

pub const ADMIN: &str = "admin-token";
pub const OPERATOR: &str = "operator-token";
pub const VIEWER: &str = "viewer-token";
pub const AGENT1: &str = "agent1-token";
pub const AGENT2: &str = "agent2-token";

pub struct App {
    pub router: Router,
    pub orch: Arc<Orchestrator>,
    pub metrics: Arc<Metrics>,
    pub dir: tempfile::TempDir,
}

pub fn sqlite_store(dir: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(dir.join("db"), SqliteOptions::default()).expect("open sqlite"))
}

/// The peer address `local` gives requests sent without a socket.
pub const LOCAL_PEER: ([u8; 4], u16) = ([127, 0, 0, 1], 40_000);

/// `router` as if every request came from a loopback peer (a real server passes the peer address with
/// `into_make_service_with_connect_info`; without tokens the router serves loopback peers only).
pub fn local(router: Router) -> Router {
    router.layer(MockConnectInfo(SocketAddr::from(LOCAL_PEER)))
}

/// An app over a fresh SQLite file with `orch_config` and `http`.
pub fn app_with(orch_config: OrchestratorConfig, http: HttpConfig) -> App {
    let dir = tempfile::tempdir().expect("tempdir");
    let orch = Arc::new(Orchestrator::new(sqlite_store(dir.path()), orch_config));
    let metrics = Metrics::new();
    let router = local(router_with_metrics(orch.clone(), http, metrics.clone()));
    App { router, orch, metrics, dir }
}

/// No auth (everyone is admin).
pub fn open_app() -> App {
    app_with(OrchestratorConfig::default(), HttpConfig::new())
}

pub fn tokens() -> HttpConfig {
    HttpConfig::new()
        .with_token("root", Role::Admin, ADMIN)
        .unwrap()
        .with_token("ops", Role::Operator, OPERATOR)
        .unwrap()
        .with_token("watcher", Role::Viewer, VIEWER)
        .unwrap()
        .with_token("agent-1", Role::Agent, AGENT1)
        .unwrap()
        .with_token("agent-2", Role::Agent, AGENT2)
        .unwrap()
}

/// Auth on with the five tokens above.
pub fn secure_app() -> App {
    app_with(OrchestratorConfig::default(), tokens())
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code: {}", self.text)).to_string()
    }
    #[track_caller]
    pub fn ok(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        if self.text.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }
    #[track_caller]
    pub fn err(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "body: {}", self.text);
        assert!(v["error"]["request_id"].as_str().is_some_and(|s| !s.is_empty()), "request id: {}", self.text);
        assert!(v["error"]["message"].is_string());
        assert!(v["error"]["details"].is_object());
        v
    }
}

pub async fn send(router: &Router, req: Request<Body>) -> Resp {
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Resp { status, headers, text: String::from_utf8_lossy(&bytes).into_owned() }
}

pub fn request(method: Method, path: &str, token: Option<&str>, body: Option<&Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    match body {
        Some(v) => b.header("content-type", "application/json").body(Body::from(v.to_string())).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

pub async fn get(app: &App, path: &str, token: Option<&str>) -> Resp {
    send(&app.router, request(Method::GET, path, token, None)).await
}

pub async fn post(app: &App, path: &str, token: Option<&str>, body: Value) -> Resp {
    send(&app.router, request(Method::POST, path, token, Some(&body))).await
}

pub async fn post_empty(app: &App, path: &str, token: Option<&str>) -> Resp {
    send(&app.router, request(Method::POST, path, token, None)).await
}

pub async fn put(app: &App, path: &str, token: Option<&str>, body: Value) -> Resp {
    send(&app.router, request(Method::PUT, path, token, Some(&body))).await
}

pub async fn patch(app: &App, path: &str, token: Option<&str>, body: Value) -> Resp {
    send(&app.router, request(Method::PATCH, path, token, Some(&body))).await
}

pub async fn delete(app: &App, path: &str, token: Option<&str>) -> Resp {
    send(&app.router, request(Method::DELETE, path, token, None)).await
}

pub fn s(v: &Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_string()
}

/// Creates a project; returns its id.
pub async fn project(app: &App, token: Option<&str>) -> String {
    let v = post(app, "/projects", token, json!({"name": "demo", "description": "d"})).await.ok(201);
    s(&v["id"])
}

/// Creates a work item in `project_id` and enqueues it; returns its id.
pub async fn queued_item(app: &App, token: Option<&str>, project_id: &str, title: &str) -> String {
    let v =
        post(app, "/work-items", token, json!({"project_id": project_id, "title": title, "enqueue": {}})).await.ok(201);
    assert_eq!(v["work_item"]["state"], "queued");
    s(&v["work_item"]["id"])
}

/// Claims one run as `token` (agent id = `agent_id` when given); returns (run id, fencing token).
pub async fn claim_one(app: &App, token: Option<&str>, agent_id: Option<&str>) -> (String, u64) {
    let mut body = json!({"max": 1});
    if let Some(a) = agent_id {
        body["agent_id"] = json!(a);
    }
    let v = post(app, "/agents/claim", token, body).await.ok(200);
    let a = &v["assignments"][0];
    (s(&a["run"]["id"]), a["lease"]["token"].as_u64().expect("token"))
}
