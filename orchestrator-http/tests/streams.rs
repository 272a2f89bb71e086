//! Log followers and long polls over a real socket: an append to one run wakes only that run's followers,
//! and a caller holds at most `ORCH_MAX_STREAMS_PER_CALLER` streams and long polls at once (429 beyond).

mod common;

use axum::body::Bytes;
use axum::http::{Method, Request};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use orchestrator_core::{Orchestrator, OrchestratorConfig};
use orchestrator_http::{router_with_metrics, HttpConfig, Metrics};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(http: HttpConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let orch = Arc::new(Orchestrator::new(sqlite_store(dir.path()), OrchestratorConfig::default()));
    let app = router_with_metrics(orch, http, Metrics::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    Server { addr, _dir: dir, task }
}

/// Sends a request; answers (status, Retry-After, body as JSON or Null).
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"));
    let req = match body {
        Some(v) => b.header("content-type", "application/json").body(Full::new(Bytes::from(v.to_string()))).unwrap(),
        None => b.body(Full::new(Bytes::new())).unwrap(),
    };
    let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let bytes = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{path}: the answer ({status}) did not end within 60 s"))
        .unwrap()
        .to_bytes();
    (status, retry, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// An open SSE response whose body is collected in the background.
struct Sse {
    status: u16,
    text: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, token: &str) -> Sse {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        let conn_task = tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await.unwrap().unwrap();
        let status = resp.status().as_u16();
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        let mut body = resp.into_body();
        let task = tokio::spawn(async move {
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    sink.lock().unwrap().push_str(&String::from_utf8_lossy(d));
                }
            }
            drop(sender);
            conn_task.abort();
        });
        Sse { status, text, task }
    }

    /// Waits (up to 30 s) until the stream has shown `needle`.
    async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text.lock().unwrap().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the stream: {}", self.text.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes the connection.
    fn close(self) {
        self.task.abort();
    }
}

async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req =
        Request::builder().uri("/metrics").header("host", addr.to_string()).body(Full::new(Bytes::new())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Two queued work items claimed by agent-1: [(run id, fencing token); 2].
async fn two_claimed_runs(addr: SocketAddr) -> Vec<(String, u64)> {
    let (_, _, p) = call(addr, Method::POST, "/projects", OPERATOR, Some(json!({"name": "streams"}))).await;
    let pid = p["id"].as_str().unwrap().to_string();
    for title in ["a", "b"] {
        let body = json!({"project_id": pid, "title": title, "enqueue": {}});
        assert_eq!(call(addr, Method::POST, "/work-items", OPERATOR, Some(body)).await.0, 201);
    }
    let (status, _, c) = call(addr, Method::POST, "/agents/claim", AGENT1, Some(json!({"max": 2}))).await;
    assert_eq!(status, 200, "{c}");
    let runs: Vec<(String, u64)> = c["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["run"]["id"].as_str().unwrap().to_string(), a["lease"]["token"].as_u64().unwrap()))
        .collect();
    assert_eq!(runs.len(), 2);
    runs
}

async fn append(addr: SocketAddr, run: &(String, u64), line: &str) {
    let body = json!({"token": run.1, "lines": [{"stream": "stdout", "line": line}]});
    let (status, _, v) = call(addr, Method::POST, &format!("/runs/{}/logs", run.0), AGENT1, Some(body)).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_wakes_only_the_followers_of_its_run() {
    const WAKEUPS: &str = "orchestrator_log_follower_wakeups_total";
    let srv = serve(tokens()).await;
    let runs = two_claimed_runs(srv.addr).await;
    let (a, b) = (&runs[0], &runs[1]);
    let follower = Sse::open(srv.addr, &format!("/runs/{}/logs/stream", a.0), VIEWER).await;
    assert_eq!(follower.status, 200);
    append(srv.addr, a, "first").await;
    follower.wait_for("id: 1\n").await;
    let before = metric(srv.addr, WAKEUPS).await;

    // Many appends to the other run: the follower of run a sleeps through them.
    for i in 0..30 {
        append(srv.addr, b, &format!("line {i}")).await;
    }
    append(srv.addr, a, "second").await;
    follower.wait_for("id: 2\n").await;
    let woken = metric(srv.addr, WAKEUPS).await - before;
    // One wake-up for run a's own append (none when its polling fallback read the line first).
    assert!(woken <= 3, "the follower of run a was woken {woken} times by 30 appends to run b");
    follower.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_long_polls_are_capped_per_caller() {
    let srv = serve(tokens().with_max_streams_per_caller(2)).await;
    let runs = two_claimed_runs(srv.addr).await;
    let path = format!("/runs/{}/logs/stream", runs[0].0);
    let first = Sse::open(srv.addr, &path, VIEWER).await;
    let second = Sse::open(srv.addr, &path, VIEWER).await;
    assert_eq!((first.status, second.status), (200, 200));
    let third = Sse::open(srv.addr, &path, VIEWER).await;
    assert_eq!(third.status, 429, "{}", third.text.lock().unwrap());
    third.close();
    let (status, retry_after, v) = call(srv.addr, Method::GET, &path, VIEWER, None).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited");
    assert!(v["error"]["message"].as_str().unwrap().contains("ORCH_MAX_STREAMS_PER_CALLER"), "{v}");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    // Another caller has its own allowance.
    let other = Sse::open(srv.addr, &path, OPERATOR).await;
    assert_eq!(other.status, 200);
    // A closed stream gives its place back (the server notices when it next writes to it).
    first.close();
    append(srv.addr, &runs[0], "wake the streams").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        let s = Sse::open(srv.addr, &path, VIEWER).await;
        if s.status == 200 {
            break s;
        }
        s.close();
        assert!(Instant::now() < deadline, "the closed stream's place was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Long polls count too: agent-1 holds two waiting claims (nothing is claimable, so each waits its full
    // 30 s whatever wakes it); a third long poll is refused while they wait.
    let (_, _, g) = call(srv.addr, Method::GET, "/agents/work", AGENT1, None).await;
    let seen = g["generation"].as_u64().unwrap();
    let waits: Vec<_> = (0..2)
        .map(|_| {
            let addr = srv.addr;
            let body = json!({"max": 1, "wait_ms": 30_000});
            tokio::spawn(async move { call(addr, Method::POST, "/agents/claim", AGENT1, Some(body)).await })
        })
        .collect();
    // Held: watcher's two streams, ops's one, agent-1's two claims.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(srv.addr, "orchestrator_http_streams_active").await != 5 {
        assert!(Instant::now() < deadline, "the two waiting claims were not held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, v) =
        call(srv.addr, Method::GET, &format!("/agents/work?seen={seen}&timeout_ms=50"), AGENT1, None).await;
    assert_eq!(status, 429, "{v}");
    let (status, _, v) =
        call(srv.addr, Method::POST, "/agents/claim", AGENT1, Some(json!({"max": 1, "wait_ms": 50}))).await;
    assert_eq!(status, 429, "{v}");
    // A claim without waiting is not a long poll.
    assert_eq!(call(srv.addr, Method::POST, "/agents/claim", AGENT1, Some(json!({"max": 1}))).await.0, 200);
    for w in waits {
        w.abort();
    }
    assert!(metric(srv.addr, "orchestrator_http_streams_refused_total").await >= 4);
    for s in [second, other, again] {
        s.close();
    }
}
