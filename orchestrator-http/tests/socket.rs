//! Over a real socket: axum::serve on 127.0.0.1:0 with peer addresses, a raw hyper HTTP/1.1 client, an
//! agent's claim/heartbeat/logs/complete flow with tokens, the SSE follow, and metrics.

mod common;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Request};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use orchestrator_core::{Orchestrator, OrchestratorConfig};
use orchestrator_http::{router_with_metrics, Metrics};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(http: orchestrator_http::HttpConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let orch = Arc::new(Orchestrator::new(sqlite_store(dir.path()), OrchestratorConfig::default()));
    let app = axum::Router::new().nest("/api", router_with_metrics(orch, http, Metrics::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    Server { addr, _dir: dir, task }
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    #[track_caller]
    fn json(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        serde_json::from_str(&self.body).unwrap()
    }
}

async fn call(addr: SocketAddr, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder().method(method).uri(path).header("host", addr.to_string());
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(v) => b.header("content-type", "application/json").body(Full::new(Bytes::from(v.to_string()))).unwrap(),
        None => b.body(Full::new(Bytes::new())).unwrap(),
    };
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes =
        tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect()).await.unwrap().unwrap().to_bytes();
    Reply { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_flow_over_a_real_socket() {
    let srv = serve(tokens()).await;
    let a = srv.addr;
    let p = call(a, Method::POST, "/api/projects", Some(OPERATOR), Some(json!({"name": "net"}))).await.json(201);
    let pid = p["id"].as_str().unwrap().to_string();
    let w = call(
        a,
        Method::POST,
        "/api/work-items",
        Some(OPERATOR),
        Some(json!({"project_id": pid, "title": "t", "enqueue": {}})),
    )
    .await
    .json(201);
    let wid = w["work_item"]["id"].as_str().unwrap().to_string();

    // The agent claims (as its token's name), heartbeats, starts, logs and completes.
    let c = call(a, Method::POST, "/api/agents/claim", Some(AGENT1), Some(json!({"max": 4, "wait_ms": 1000})))
        .await
        .json(200);
    assert_eq!(c["assignments"].as_array().unwrap().len(), 1);
    let run = c["assignments"][0]["run"]["id"].as_str().unwrap().to_string();
    let token = c["assignments"][0]["lease"]["token"].as_u64().unwrap();
    assert_eq!(c["assignments"][0]["run"]["agent_id"], "agent-1");
    call(a, Method::POST, &format!("/api/runs/{run}/heartbeat"), Some(AGENT1), Some(json!({"token": token})))
        .await
        .json(200);
    call(a, Method::POST, &format!("/api/runs/{run}/start"), Some(AGENT1), Some(json!({"token": token})))
        .await
        .json(200);
    let l = call(
        a,
        Method::POST,
        &format!("/api/runs/{run}/logs"),
        Some(AGENT1),
        Some(json!({"token": token, "lines": [{"stream": "stdout", "line": "hello"}, {"stream": "stdout", "line": "world"}]})),
    )
    .await
    .json(200);
    assert_eq!(l["last_seq"], 2);
    // Another agent is refused, with the error shape and request id.
    let e =
        call(a, Method::POST, &format!("/api/runs/{run}/heartbeat"), Some(AGENT2), Some(json!({"token": token}))).await;
    let v = e.json(403);
    assert_eq!(v["error"]["code"], "forbidden");
    assert_eq!(e.headers["x-request-id"].to_str().unwrap(), v["error"]["request_id"].as_str().unwrap());
    let done = call(
        a,
        Method::POST,
        &format!("/api/runs/{run}/complete"),
        Some(AGENT1),
        Some(json!({"token": token, "outcome": {"status": "succeeded", "exit_code": 0}})),
    )
    .await
    .json(200);
    assert_eq!(done["work_item_state"], "succeeded");

    // The finished run's logs as SSE, resumed after the first line.
    let events = call_sse(a, &format!("/api/runs/{run}/logs/stream?after=1"), VIEWER).await;
    assert!(events.contains("id: 2"), "{events}");
    assert!(!events.contains("id: 1\n"), "{events}");
    assert!(events.contains("event: end"), "{events}");

    let wi = call(a, Method::GET, &format!("/api/work-items/{wid}"), Some(VIEWER), None).await.json(200);
    assert_eq!(wi["state"], "succeeded");
    let m = call(a, Method::GET, "/api/metrics", None, None).await;
    assert_eq!(m.status, 200);
    assert!(m.body.contains("orchestrator_runs_claimed_total 1"), "{}", m.body);
    assert!(m.body.contains("orchestrator_run_completions_total{outcome=\"succeeded\"} 1"), "{}", m.body);
    assert!(m.body.contains("route=\"/api/runs/{id}/heartbeat\",status=\"403\""), "{}", m.body);
    srv.task.abort();
}

async fn call_sse(addr: SocketAddr, path: &str, token: &str) -> String {
    let r = call(addr, Method::GET, path, Some(token), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_clients_are_rate_limited_by_address() {
    let srv = serve(tokens().with_rate_limit_per_min(Some(2))).await;
    for _ in 0..2 {
        assert_eq!(call(srv.addr, Method::GET, "/api/projects", None, None).await.status, 401);
    }
    let r = call(srv.addr, Method::GET, "/api/projects", None, None).await;
    assert_eq!(r.json(429)["error"]["code"], "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    // A token holder has its own bucket.
    call(srv.addr, Method::GET, "/api/projects", Some(VIEWER), None).await.json(200);
    // Unknown routes under the prefix answer in the JSON shape.
    let r = call(srv.addr, Method::GET, "/api/nope", None, None).await;
    assert_eq!(r.json(404)["error"]["code"], "not_found");
    srv.task.abort();
}

/// A non-loopback address of this machine, if it has one (the local end of a route to a private address;
/// a UDP "connect" sends nothing).
fn non_loopback_local_ip() -> Option<std::net::IpAddr> {
    for target in ["192.0.2.1:9", "10.0.0.1:9", "172.16.0.1:9", "192.168.0.1:9"] {
        let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else { continue };
        if sock.connect(target).is_err() {
            continue;
        }
        if let Ok(local) = sock.local_addr() {
            let ip = local.ip();
            if !ip.is_loopback() && !ip.is_unspecified() {
                return Some(ip);
            }
        }
    }
    None
}

/// GET `path` over a connection to `to`, with the given `Host` header (a client chooses it freely).
async fn get_with_host(to: SocketAddr, host: &str, path: &str) -> Reply {
    let stream = TcpStream::connect(to).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder().uri(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes =
        tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect()).await.unwrap().unwrap().to_bytes();
    Reply { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() }
}

/// Without tokens the router itself serves only loopback peers, whatever `Host` the client sends, and
/// refuses to guess when it is not told the peer address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_only_loopback_peers_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let orch = Arc::new(Orchestrator::new(sqlite_store(dir.path()), OrchestratorConfig::default()));
    let app = router_with_metrics(orch, orchestrator_http::HttpConfig::new(), Metrics::new());

    // Listening on every address, as a host embedding the library might.
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = app.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, served.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let host = format!("localhost:{port}");
    get_with_host(loopback, &host, "/projects").await.json(200);
    match non_loopback_local_ip() {
        Some(ip) => {
            let r = get_with_host(SocketAddr::new(ip, port), &host, "/projects").await;
            let v = r.json(403);
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains("only loopback peers") && message.contains("ORCH_API_TOKENS"), "{message}");
            assert_eq!(v["error"]["details"]["peer"], ip.to_string());
            // Public routes stay open (health checks come from anywhere).
            get_with_host(SocketAddr::new(ip, port), &host, "/healthz").await.json(200);
        }
        None => eprintln!("no non-loopback address on this machine: only the loopback side is checked here"),
    }
    task.abort();

    // Served without connect info, the router cannot tell the peer: it refuses.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service()).await.unwrap();
    });
    let v = get_with_host(addr, &host, "/projects").await.json(403);
    assert!(v["error"]["message"].as_str().unwrap().contains("into_make_service_with_connect_info"), "{v}");
    get_with_host(addr, &host, "/healthz").await.json(200);
    task.abort();
}
