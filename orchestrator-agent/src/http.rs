//! [`HttpAgentApi`]: the agent protocol over HTTP (the client side of `orchestrator-http`'s agent routes).
//! Errors map back to the core's errors, so the agent loop behaves the same remote and in-process.

use async_trait::async_trait;
use orchestrator_core::agent::{AgentApi, Assignment, ClaimRequest};
use orchestrator_core::domain::{
    InfoRequest, Lease, NewLogLine, NewStepEvent, Run, RunOutcome, RunResult, StepEvent, Usage,
};
use orchestrator_core::ids::RunId;
use orchestrator_core::state::{EntityKind, TransitionError};
use orchestrator_core::store::{CompletionResult, NewInfoRequest};
use orchestrator_core::{Error, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The longest long poll the server grants on `/agents/work`.
const MAX_WAIT_MS: u64 = 30_000;

/// A client of the agent protocol (`POST /agents/claim`, `GET /agents/work`, `POST /runs/{id}/...`).
#[derive(Clone)]
pub struct HttpAgentApi {
    client: reqwest::Client,
    base_url: String,
    token: Option<String>,
    generation: std::sync::Arc<AtomicU64>,
}

impl std::fmt::Debug for HttpAgentApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAgentApi")
            .field("base_url", &self.base_url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A completed transfer's answer body the server returns on `complete`.
#[derive(Deserialize)]
struct CompletionWire {
    run: Run,
    work_item_state: orchestrator_core::state::WorkItemState,
    #[serde(default)]
    retry_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    released: Vec<orchestrator_core::ids::WorkItemId>,
    #[serde(default)]
    blocked: Vec<orchestrator_core::ids::WorkItemId>,
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::Store(StoreError::Unavailable { retryable: true, message: message.into() })
}

fn map_error(status: reqwest::StatusCode, body: &str, run_id: Option<RunId>) -> Error {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let err = v.get("error").cloned().unwrap_or(Value::Null);
    let code = err.get("code").and_then(Value::as_str).unwrap_or("");
    let message = err.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| {
        let b: String = body.chars().take(300).collect();
        format!("HTTP {status}: {b}")
    });
    let details = err.get("details").cloned().unwrap_or(Value::Null);
    let ds = |k: &str| details.get(k).and_then(Value::as_str).map(str::to_string);
    let entity = || {
        details
            .get("entity")
            .and_then(|e| serde_json::from_value::<EntityKind>(e.clone()).ok())
            .unwrap_or(EntityKind::Run)
    };
    match code {
        "lease_lost" => {
            let rid = ds("run_id").and_then(|s| s.parse().ok()).or(run_id).unwrap_or_default();
            Error::Store(StoreError::LeaseLost { run_id: rid, reason: ds("reason").unwrap_or(message) })
        }
        "not_found" => Error::Store(StoreError::NotFound { entity: entity(), id: ds("id").unwrap_or(message) }),
        "invalid_transition" => Error::Store(StoreError::InvalidTransition(TransitionError {
            entity: entity(),
            from: ds("from").unwrap_or_default(),
            to: ds("to").unwrap_or_default(),
        })),
        "conflict" => Error::Store(StoreError::Conflict { message }),
        "duplicate" => Error::Store(StoreError::Duplicate { entity: entity(), key: ds("key").unwrap_or(message) }),
        "invalid" | "bad_request" | "payload_too_large" | "invalid_recipe" | "invalid_policy" => {
            Error::Invalid { field: ds("field").unwrap_or_else(|| "request".into()), message }
        }
        "unauthorized" | "forbidden" => {
            Error::Store(StoreError::Unavailable { retryable: false, message: format!("{code}: {message}") })
        }
        _ if status.as_u16() == 429 || status.is_server_error() => unavailable(message),
        _ if status.as_u16() == 404 => Error::Store(StoreError::NotFound { entity: EntityKind::Run, id: message }),
        _ if status.as_u16() == 409 => Error::Store(StoreError::Conflict { message }),
        _ if status.is_client_error() => Error::Invalid { field: "request".into(), message },
        _ => unavailable(message),
    }
}

#[derive(Serialize)]
struct Fenced<'a, T: Serialize> {
    token: u64,
    #[serde(flatten)]
    body: &'a T,
}

impl HttpAgentApi {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:8080`, or `https://` with the
    /// system and web trust roots), with an optional bearer token.
    pub fn new(base_url: impl Into<String>, token: Option<String>) -> Self {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Self::with_client(base_url, token, client)
    }

    /// Like [`HttpAgentApi::new`] with a client of the caller's (its own trust roots for a private CA,
    /// proxies, timeouts; keep the request timeout above 45 s for the long polls).
    pub fn with_client(base_url: impl Into<String>, token: Option<String>, client: reqwest::Client) -> Self {
        HttpAgentApi {
            client,
            base_url: base_url.into().trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            generation: std::sync::Arc::new(AtomicU64::new(0)),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder, run_id: Option<RunId>) -> Result<T, Error> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        // The call is part of the current span's trace (a run's calls are one trace with the server's
        // handling of them): W3C `traceparent`, with the propagator the host installed.
        let req = {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let cx = tracing::Span::current().context();
            let mut headers = reqwest::header::HeaderMap::new();
            opentelemetry::global::get_text_map_propagator(|p| {
                p.inject_context(&cx, &mut opentelemetry_http::HeaderInjector(&mut headers))
            });
            req.headers(headers)
        };
        let resp = req.send().await.map_err(|e| unavailable(format!("request failed: {e}")))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| unavailable(format!("cannot read the answer: {e}")))?;
        if !status.is_success() {
            return Err(map_error(status, &body, run_id));
        }
        serde_json::from_str(&body).map_err(|e| unavailable(format!("unexpected answer from the server: {e}")))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        run_id: Option<RunId>,
    ) -> Result<T, Error> {
        self.send(self.client.post(self.url(path)).json(body), run_id).await
    }

    async fn run_post<B: Serialize, T: DeserializeOwned>(
        &self,
        run_id: RunId,
        what: &str,
        token: u64,
        body: &B,
    ) -> Result<T, Error> {
        self.post(&format!("/runs/{run_id}/{what}"), &Fenced { token, body }, Some(run_id)).await
    }

    async fn work(&self, seen: Option<u64>, timeout: Duration) -> Result<(u64, bool), Error> {
        let mut req = self.client.get(self.url("/agents/work"));
        if let Some(s) = seen {
            let ms = (timeout.as_millis() as u64).min(MAX_WAIT_MS);
            req = req
                .query(&[("seen", s), ("timeout_ms", ms)])
                .timeout(Duration::from_millis(ms) + Duration::from_secs(15));
        }
        let v: Value = self.send(req, None).await?;
        let g = v.get("generation").and_then(Value::as_u64).unwrap_or(0);
        self.generation.store(g, Ordering::Relaxed);
        Ok((g, v.get("woken").and_then(Value::as_bool).unwrap_or(false)))
    }
}

#[async_trait]
impl AgentApi for HttpAgentApi {
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Assignment>, Error> {
        #[derive(Deserialize)]
        struct Claimed {
            assignments: Vec<Assignment>,
        }
        let c: Claimed = self.post("/agents/claim", &req, None).await?;
        Ok(c.assignments)
    }

    async fn work_generation(&self) -> u64 {
        match self.work(None, Duration::ZERO).await {
            Ok((g, _)) => g,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the work generation");
                self.generation.load(Ordering::Relaxed)
            }
        }
    }

    async fn wait_for_work(&self, seen: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.work(Some(seen), left).await {
                Ok((g, _)) if g != seen => return true,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "wake-up long poll failed");
                    // Fall back to plain polling: sleep out the rest.
                    tokio::time::sleep(left).await;
                    return false;
                }
            }
        }
    }

    async fn heartbeat(&self, run_id: RunId, token: u64) -> Result<Lease, Error> {
        self.run_post(run_id, "heartbeat", token, &json!({})).await
    }

    async fn start(&self, run_id: RunId, token: u64) -> Result<Run, Error> {
        self.run_post(run_id, "start", token, &json!({})).await
    }

    async fn append_logs(&self, run_id: RunId, token: u64, lines: Vec<NewLogLine>) -> Result<u64, Error> {
        let v: Value = self.run_post(run_id, "logs", token, &json!({ "lines": lines })).await?;
        Ok(v.get("last_seq").and_then(Value::as_u64).unwrap_or(0))
    }

    async fn record_steps(
        &self,
        run_id: RunId,
        token: u64,
        events: Vec<NewStepEvent>,
    ) -> Result<Vec<StepEvent>, Error> {
        #[derive(Deserialize)]
        struct Events {
            events: Vec<StepEvent>,
        }
        let v: Events = self.run_post(run_id, "steps", token, &json!({ "events": events })).await?;
        Ok(v.events)
    }

    async fn ask(&self, run_id: RunId, token: u64, questions: Vec<NewInfoRequest>) -> Result<Vec<InfoRequest>, Error> {
        #[derive(Deserialize)]
        struct Asked {
            info_requests: Vec<InfoRequest>,
        }
        let v: Asked = self.run_post(run_id, "info-requests", token, &json!({ "questions": questions })).await?;
        Ok(v.info_requests)
    }

    async fn complete(
        &self,
        run_id: RunId,
        token: u64,
        outcome: RunOutcome,
        usage: Option<Usage>,
    ) -> Result<CompletionResult, Error> {
        let w: CompletionWire =
            self.run_post(run_id, "complete", token, &json!({ "outcome": outcome, "usage": usage })).await?;
        Ok(CompletionResult {
            run: w.run,
            work_item_state: w.work_item_state,
            retry_at: w.retry_at,
            released: w.released,
            blocked: w.blocked,
        })
    }

    async fn release(&self, run_id: RunId, token: u64) -> Result<Run, Error> {
        self.release_with_usage(run_id, token, None).await
    }

    async fn release_with_usage(&self, run_id: RunId, token: u64, usage: Option<Usage>) -> Result<Run, Error> {
        self.run_post(run_id, "release", token, &json!({ "usage": usage })).await
    }

    async fn ask_with_usage(
        &self,
        run_id: RunId,
        token: u64,
        questions: Vec<NewInfoRequest>,
        usage: Option<Usage>,
    ) -> Result<Vec<InfoRequest>, Error> {
        #[derive(Deserialize)]
        struct Asked {
            info_requests: Vec<InfoRequest>,
        }
        let body = json!({ "questions": questions, "usage": usage });
        let v: Asked = self.run_post(run_id, "info-requests", token, &body).await?;
        Ok(v.info_requests)
    }

    async fn record_result(&self, run_id: RunId, token: u64, result: RunResult, patch: String) -> Result<(), Error> {
        let _: Value = self.run_post(run_id, "result", token, &json!({ "result": result, "patch": patch })).await?;
        Ok(())
    }

    async fn wait_for_cancellations(&self, held: Vec<(RunId, u64)>, timeout: Duration) -> Result<Vec<RunId>, Error> {
        #[derive(Deserialize)]
        struct Gone {
            runs: Vec<RunId>,
        }
        let ms = (timeout.as_millis() as u64).min(MAX_WAIT_MS);
        let runs: Vec<Value> = held.iter().map(|(id, token)| json!({"run_id": id, "token": token})).collect();
        let req = self
            .client
            .post(self.url("/agents/cancellations"))
            .json(&json!({ "runs": runs, "timeout_ms": ms }))
            .timeout(Duration::from_millis(ms) + Duration::from_secs(15));
        let g: Gone = self.send(req, None).await?;
        Ok(g.runs)
    }
}
