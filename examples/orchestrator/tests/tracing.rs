//! OpenTelemetry traces and JSON logs: a server and a remote agent export their spans over OTLP/HTTP to a
//! receiver in the test; one run is one trace across both processes (the agent's `run` span and the
//! server's request spans for that run's calls share its trace id). `ORCH_LOG_FORMAT=json` logs parse,
//! with the request id and trace id.

mod common;

use common::{eventually, str_of, Api, Proc, Server};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

/// An OTLP/HTTP (protobuf) trace receiver: returns its endpoint and what it got (service name, span).
async fn receiver() -> (String, Received) {
    use axum::{body::Bytes, extract::State, routing::post, Router};
    let got = Received::default();
    async fn traces(State(got): State<Received>, body: Bytes) -> &'static str {
        let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.clone())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.0.lock().unwrap().push((service.clone(), s));
                }
            }
        }
        ""
    }
    let app = Router::new().route("/v1/traces", post(traces)).with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_is_one_trace_across_server_and_agent_and_json_logs_parse() {
    let (endpoint, got) = receiver().await;
    let tokens = "ops:operator:ops-secret,remote-1:agent:agent-secret";
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let mut envs = vec![("ORCH_API_TOKENS", tokens), ("ORCH_LOG_FORMAT", "json")];
    envs.extend(otel);
    let mut server = Server::start(&[], &envs).await;
    let out = server.cli_with(&["seed", "--json"], &[("ORCH_TOKEN", "ops-secret")]);
    assert!(out.status.success(), "seed: {}", String::from_utf8_lossy(&out.stderr));
    let seeded: Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = seeded["work_items"][0][0].as_str().unwrap().to_string();
    let mut agent_env = vec![
        ("ORCH_TOKEN", "agent-secret"),
        ("AGENT_ID", "remote-1"),
        ("AGENT_POLL_INTERVAL_MS", "500"),
        ("RUST_LOG", "info"),
    ];
    agent_env.extend(otel);
    let ws = server.dir.path().join("remote-ws");
    agent_env.push(("AGENT_WORKSPACE_ROOT", ws.to_str().unwrap()));
    let mut agent = Proc::spawn(server.dir.path(), &["agent", "--server", &server.url], &agent_env);
    let ops = {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::AUTHORIZATION, "Bearer ops-secret".parse().unwrap());
        Api { http: reqwest::Client::builder().default_headers(h).build().unwrap(), base: server.url.clone() }
    };
    let run_id = eventually(Duration::from_secs(90), "the first work item to succeed", || {
        let ops = ops.clone();
        let first = first.clone();
        async move {
            let w = ops.get(&format!("/work-items/{first}")).await;
            (str_of(&w, "state") == "succeeded").then(|| str_of(&w, "current_run_id").to_string())
        }
    })
    .await;
    // A stop flushes what is still batched.
    assert!(agent.terminate(Duration::from_secs(30)).success());
    assert!(server.terminate(Duration::from_secs(30)).success(), "{}", server.logs());

    let spans = eventually(Duration::from_secs(10), "the spans of the run from both processes", || {
        let spans = got.spans();
        let run = spans.iter().find(|(_, s)| s.name == "run" && attr(s, "run_id").as_deref() == Some(run_id.as_str()));
        let ready =
            run.is_some_and(|(_, r)| spans.iter().any(|(_, s)| s.name == "request" && s.trace_id == r.trace_id));
        async move { ready.then_some(spans) }
    })
    .await;
    let (service, run) =
        spans.iter().find(|(_, s)| s.name == "run" && attr(s, "run_id").as_deref() == Some(run_id.as_str())).unwrap();
    assert_eq!(service, "orchestrator");
    assert!(run.parent_span_id.is_empty(), "the run is the root of its trace");
    let in_trace: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| s.trace_id == run.trace_id).collect();
    let names: Vec<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
    for expected in ["run", "plan", "execute", "step", "complete", "request", "orchestrator.complete"] {
        assert!(names.contains(&expected), "no {expected} span in the run's trace: {names:?}");
    }
    // The server's handling of the agent's completion is a child of the agent's span for it.
    let complete_request = in_trace
        .iter()
        .find(|s| s.name == "request" && attr(s, "route").as_deref() == Some("/runs/{id}/complete"))
        .expect("the server's span of POST /runs/{id}/complete in the run's trace");
    let agent_complete = in_trace.iter().find(|s| s.name == "complete").unwrap();
    assert!(
        in_trace.iter().any(|s| s.span_id == complete_request.parent_span_id),
        "the request's parent is one of the agent's spans"
    );
    assert_ne!(complete_request.span_id, agent_complete.span_id);

    // JSON logs: every line of the server's is an object; request lines carry the request id and the
    // trace id of the caller's trace.
    let logs = server.logs();
    let lines: Vec<Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let run_trace = hex(&run.trace_id);
    assert!(
        lines.iter().any(|l| l["span"]["request_id"].is_string() && l["span"]["trace_id"] == run_trace.as_str()),
        "no request log line with the run's trace id {run_trace}: {logs}"
    );
}
