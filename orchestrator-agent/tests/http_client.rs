//! HttpAgentApi against a tiny fake server speaking the agent protocol (AGENT_PROTOCOL.md).

mod common;

use common::*;
use orchestrator_agent::HttpAgentApi;
use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::domain::{LogStream, NewLogLine, RunOutcome};
use orchestrator_core::ids::RunId;
use orchestrator_core::{Error, StoreError};
use std::time::Duration;

fn body_of(req: &str) -> serde_json::Value {
    serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_the_protocol_and_maps_errors_back_to_core_errors() {
    // A real assignment, serialized the way the server sends it.
    let h = Harness::new().await;
    let recipe = h.recipe("name: r\nsteps:\n  - echo hi\n").await;
    let item = h.item("remote", "", Some(recipe)).await;
    let claimed = h
        .orch
        .claim(ClaimRequest {
            agent_id: "remote-agent".into(),
            capabilities: vec![],
            max: 1,
            lease_ttl_seconds: Some(30),
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let run_id = claimed[0].run_id();
    let done =
        h.orch.complete(run_id, claimed[0].token(), RunOutcome::Succeeded { exit_code: Some(0) }, None).await.unwrap();
    let completion = serde_json::json!({
        "run": done.run, "work_item_state": done.work_item_state, "retry_at": null, "released": [], "blocked": []
    });
    let other = RunId::new();
    let answers = vec![
        (200, serde_json::json!({ "assignments": claimed }).to_string()),
        (200, r#"{"generation": 5, "woken": false}"#.to_string()),
        (200, r#"{"generation": 6, "woken": true}"#.to_string()),
        (
            409,
            serde_json::json!({"error": {"code": "lease_lost", "message": "lease lost", "request_id": "r1",
                "details": {"run_id": other.to_string(), "reason": "expired"}}})
            .to_string(),
        ),
        (200, r#"{"last_seq": 7}"#.to_string()),
        (
            404,
            r#"{"error": {"code": "not_found", "message": "no such run", "request_id": "r2", "details": {"entity": "run", "id": "x"}}}"#
                .to_string(),
        ),
        (503, r#"{"error": {"code": "unavailable", "message": "db down", "request_id": "r3", "details": {"retryable": true}}}"#.to_string()),
        (200, completion.to_string()),
    ];
    let (url, server) = fake_http_server(answers).await;
    let api = HttpAgentApi::new(format!("{url}/"), Some("agent-token".into()));

    let got = api
        .claim(ClaimRequest {
            agent_id: "remote-agent".into(),
            capabilities: vec!["x".into()],
            max: 2,
            lease_ttl_seconds: None,
        })
        .await
        .unwrap();
    assert_eq!(got, claimed);
    assert_eq!(got[0].claimed.work_item.id, item);
    assert_eq!(got[0].recipe.as_ref().unwrap().name, "r");
    assert_eq!(api.work_generation().await, 5);
    assert!(api.wait_for_work(5, Duration::from_secs(5)).await);
    match api.heartbeat(other, 3).await {
        Err(Error::Store(StoreError::LeaseLost { run_id, reason })) => {
            assert_eq!(run_id, other);
            assert_eq!(reason, "expired");
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    let seq =
        api.append_logs(run_id, 4, vec![NewLogLine { stream: LogStream::Stdout, line: "hello".into() }]).await.unwrap();
    assert_eq!(seq, 7);
    assert!(matches!(api.start(run_id, 4).await, Err(Error::Store(StoreError::NotFound { .. }))));
    assert!(matches!(
        api.complete(run_id, 4, RunOutcome::Succeeded { exit_code: None }, None).await,
        Err(Error::Store(StoreError::Unavailable { retryable: true, .. }))
    ));
    let res = api.complete(run_id, 4, RunOutcome::Succeeded { exit_code: Some(0) }, None).await.unwrap();
    assert_eq!(res.run.id, run_id);

    let reqs = server.await.unwrap();
    assert!(reqs[0].starts_with("POST /agents/claim "), "{}", reqs[0]);
    assert!(reqs[0].to_ascii_lowercase().contains("authorization: bearer agent-token"));
    let claim = body_of(&reqs[0]);
    assert_eq!(claim["agent_id"], "remote-agent");
    assert_eq!(claim["max"], 2);
    assert!(reqs[1].starts_with("GET /agents/work "), "{}", reqs[1]);
    assert!(reqs[2].starts_with("GET /agents/work?seen=5&timeout_ms="), "{}", reqs[2]);
    assert!(reqs[3].starts_with(&format!("POST /runs/{other}/heartbeat ")), "{}", reqs[3]);
    assert_eq!(body_of(&reqs[3])["token"], 3);
    assert!(reqs[4].starts_with(&format!("POST /runs/{run_id}/logs ")));
    let logs = body_of(&reqs[4]);
    assert_eq!(logs["token"], 4);
    assert_eq!(logs["lines"][0]["line"], "hello");
    assert_eq!(logs["lines"][0]["stream"], "stdout");
    assert!(reqs[5].starts_with(&format!("POST /runs/{run_id}/start ")));
    let complete = body_of(&reqs[7]);
    assert_eq!(complete["outcome"]["status"], "succeeded");
    assert!(complete["usage"].is_null());

    // An unreachable server is a retryable Unavailable error, and the long poll falls back to sleeping.
    drop(h);
    let api = HttpAgentApi::new(url, None);
    assert!(matches!(
        api.heartbeat(run_id, 1).await,
        Err(Error::Store(StoreError::Unavailable { retryable: true, .. }))
    ));
    assert!(!api.wait_for_work(0, Duration::from_millis(50)).await);
}
