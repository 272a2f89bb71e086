//! # orchestrator-http
//!
//! An optional axum layer over the [`orchestrator_core::Orchestrator`] facade: the full REST API, the agent
//! protocol, Server-Sent Events for run logs, `/metrics`, `/healthz`, `/readyz` and `/openapi.json`, with
//! request ids, CORS, rate limiting, body limits, timeouts and bearer-token roles.
//!
//! ```no_run
//! # async fn run(orch: std::sync::Arc<orchestrator_core::Orchestrator>) -> Result<(), Box<dyn std::error::Error>> {
//! use orchestrator_http::{router_with_metrics, spawn_background_with_metrics, HttpConfig, Metrics};
//! let config = HttpConfig::from_env()?;
//! let metrics = Metrics::new();
//! let app = axum::Router::new().nest("/api", router_with_metrics(orch.clone(), config, metrics.clone()));
//! let _ticker = spawn_background_with_metrics(orch, std::time::Duration::from_secs(5), metrics);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:18080").await?;
//! // ConnectInfo gives the peer address: without tokens only loopback peers are served, and the rate
//! // limiter tells clients without a token apart by address.
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! ## Public API
//! - [`HttpConfig`] (`from_env`, builder setters, [`HttpConfig::auth_enabled`]), [`Role`], [`Principal`].
//! - [`router`] / [`router_with_metrics`]: the API as an `axum::Router` with its state applied (nestable).
//! - [`spawn_background`] / [`spawn_background_with_metrics`]: runs `orch.tick()` (promotes due retries,
//!   reaps expired leases, expires info-request deadlines) every interval.
//! - [`Metrics`]: counters shared by the two; [`ApiError`]: the error shape; [`dto`]: request/response
//!   bodies; [`route_list`]: every (method, path) served.
//!
//! ## Auth
//! `ORCH_API_TOKENS=name:role:token,...` (or `name:role:sha256:<hex>`). With no token configured every
//! request is an admin, so the router itself serves only loopback peers: a request whose peer address
//! (axum's `ConnectInfo<SocketAddr>`: serve with `into_make_service_with_connect_info::<SocketAddr>()`)
//! is not loopback, or whose peer address is unknown, is refused (403); and requests whose `Host` is not a
//! loopback name (`localhost`, `127.0.0.0/8`, `[::1]`) are refused (403) so a web page cannot reach the
//! server through DNS rebinding. Public routes are served to anyone. Roles: `admin` ⊇ `operator` ⊇ `viewer`; `agent` calls
//! the agent routes on runs it holds (`run.agent_id` = the token name) and reads. `/healthz`, `/readyz`,
//! `/metrics` and `/openapi.json` are public. Writes carrying an `Origin` header that CORS does not allow
//! are refused (403), so a web page cannot drive a local server. With tokens, audit names (`author`, `by`,
//! `answered_by`) are the token's name, and under `ORCH_REQUIRE_APPROVAL` a token may not approve what it
//! proposed, or created, changed or submitted through this router ([`HttpConfig::with_allow_self_approval`]).
//!
//! ## Errors
//! Every failure answers `{"error": {"code", "message", "request_id", "details"}}`:
//!
//! | code | status | when |
//! | --- | --- | --- |
//! | `bad_request` | 400 | malformed JSON, query or path (details: `path`, `line`, `column` for JSON) |
//! | `unauthorized` | 401 | missing or unknown token |
//! | `forbidden` | 403 | wrong role, another agent's run, disallowed origin |
//! | `not_found` | 404 | unknown id (details: `entity`, `id`) or route |
//! | `method_not_allowed` | 405 | known route, other method |
//! | `invalid_transition` | 409 | state machine refusal (details: `entity`, `from`, `to`) |
//! | `conflict` | 409 | guard failed |
//! | `lease_lost` | 409 | stale fencing token (details: `run_id`, `reason`) |
//! | `duplicate` | 409 | unique key taken (details: `entity`, `key`) |
//! | `payload_too_large` | 413 | body over `ORCH_MAX_BODY_BYTES` |
//! | `invalid` | 422 | validation; recipe errors (details: `errors: [{path, line, column, message}]`) |
//! | `rate_limited` | 429 | with `Retry-After` |
//! | `unavailable` | 503 | store unavailable (details: `retryable`), request timeout |
//! | `internal` | 500 | anything else (never shows internals) |

#![forbid(unsafe_code)]

mod agent_routes;
mod authors;
pub mod config;
pub mod dto;
pub mod error;
mod extract;
mod handlers;
pub mod metrics;
mod middleware;
mod openapi;
mod rate_limit;
mod routes;
mod session;
mod sse;
mod streams;
#[cfg(feature = "ui")]
mod ui;

pub use config::{ConfigError, HttpConfig, Principal, Role};
pub use error::ApiError;
pub use metrics::Metrics;
pub use middleware::{RequestId, REQUEST_ID_HEADER};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::Router;
use orchestrator_core::Orchestrator;
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// The router's shared state.
#[derive(Clone)]
pub(crate) struct AppState {
    pub orch: Arc<Orchestrator>,
    pub config: Arc<HttpConfig>,
    pub metrics: Arc<Metrics>,
    pub limiter: Option<Arc<rate_limit::RateLimiter>>,
    /// Wakes a run's log followers when lines are appended to it (or it completes) through this router.
    pub log_bus: Arc<streams::RunNotifier>,
    /// Log streams and long polls held per caller.
    pub streams: Arc<streams::StreamLimiter>,
    /// Who created or changed each work item through this router (self-approval check).
    pub authors: Arc<authors::Authors>,
    pub openapi: Arc<String>,
    /// The dashboard's browser sessions (the guard accepts their cookie).
    pub sessions: Arc<session::Sessions>,
}

/// The API over `orch`, with [`Metrics::global`] counters. Nest it anywhere (`Router::nest("/api", ..)`).
pub fn router(orch: Arc<Orchestrator>, config: HttpConfig) -> Router {
    router_with_metrics(orch, config, Metrics::global())
}

/// Every `(method, path)` the router serves (paths as axum patterns, e.g. `/runs/{id}`).
pub fn route_list() -> Vec<(&'static str, &'static str)> {
    routes::table().iter().map(|r| (r.method.as_str(), r.path)).collect()
}

/// The OpenAPI 3.0 document of the API (what `GET /openapi.json` serves).
pub fn openapi_document() -> serde_json::Value {
    openapi::document(&routes::table())
}

fn cors_layer(config: &HttpConfig) -> Option<CorsLayer> {
    let origins = config.cors_origins();
    if origins.iter().any(|o| o == "*") && !config.auth_enabled() {
        tracing::error!(
            "ORCH_CORS_ORIGINS lists `*` while authentication is off (no ORCH_API_TOKENS): the wildcard is ignored"
        );
    }
    let listed: Vec<HeaderValue> =
        origins.iter().filter(|o| o.as_str() != "*").filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    let allow = if config.any_origin() {
        AllowOrigin::any()
    } else if listed.is_empty() {
        return None;
    } else {
        AllowOrigin::list(listed)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// The API over `orch` with the given counters (share them with [`spawn_background_with_metrics`]).
///
/// The facade records into `metrics` from now on (its claims, completions and ticks, embedded agents'
/// too), unless it was given another recorder before.
pub fn router_with_metrics(orch: Arc<Orchestrator>, config: HttpConfig, metrics: Arc<Metrics>) -> Router {
    orch.set_metrics_recorder(metrics.recorder());
    let table = routes::table();
    let openapi = Arc::new(openapi::document(&table).to_string());
    let max_body = config.max_body_bytes;
    let timeout = config.request_timeout;
    let cors = cors_layer(&config);
    let state = AppState {
        orch,
        limiter: config.rate_limit_per_min.map(|n| Arc::new(rate_limit::RateLimiter::new(n))),
        streams: streams::StreamLimiter::new(config.max_streams_per_caller, metrics.clone()),
        config: Arc::new(config),
        metrics: metrics.clone(),
        log_bus: Arc::new(streams::RunNotifier::default()),
        authors: Arc::new(authors::Authors::default()),
        openapi,
        sessions: Arc::new(session::Sessions::default()),
    };
    let mut r: Router<AppState> = Router::new();
    for def in table {
        let t = if def.long_poll { timeout + agent_routes::MAX_WAIT + Duration::from_secs(5) } else { timeout };
        let mr = def
            .handler
            .route_layer(from_fn_with_state((state.clone(), def.access), middleware::guard))
            .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, t));
        r = r.route(def.path, mr);
    }
    let mut r = r
        .fallback(handlers::fallback)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(RequestBodyLimitLayer::new(max_body));
    if let Some(cors) = cors {
        r = r.layer(cors);
    }
    let r = r.layer(from_fn_with_state(metrics, middleware::request_context));
    // The dashboard's HTML pages answer their own errors (outside the JSON error layer).
    #[cfg(feature = "ui")]
    let r = r.nest("/ui", ui::router(state.clone()));
    r.with_state(state)
}

/// Runs `orch.tick()` every `interval` (promotes due retries, reaps expired leases, expires info-request
/// deadlines), logging failures, with [`Metrics::global`] counters. Abort the handle to stop it.
pub fn spawn_background(orch: Arc<Orchestrator>, interval: Duration) -> tokio::task::JoinHandle<()> {
    spawn_background_with_metrics(orch, interval, Metrics::global())
}

/// [`spawn_background`] recording into `metrics` (the facade records its ticks there).
pub fn spawn_background_with_metrics(
    orch: Arc<Orchestrator>,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    orch.set_metrics_recorder(metrics.recorder());
    let interval = interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match orch.tick().await {
                Ok(report) => {
                    if !report.promoted.is_empty() || !report.reaped.is_empty() || !report.expired.is_empty() {
                        tracing::info!(
                            promoted = report.promoted.len(),
                            reaped = report.reaped.len(),
                            expired = report.expired.len(),
                            "scheduler tick"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "scheduler tick failed");
                }
            }
        }
    })
}
