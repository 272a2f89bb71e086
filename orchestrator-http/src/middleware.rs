//! Middleware: request context (request id, tracing span, metrics, error bodies) and the per-route guard
//! (cross-origin check, authentication, rate limit, role).

use crate::config::{Principal, Role};
use crate::error::{ApiError, RenderedError};
use crate::metrics::Metrics;
use crate::AppState;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// The request id header.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of the current request (in request extensions).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Who the caller is for per-client limits (rate limit, concurrent streams): `token:<name>` with
/// authentication on, else `ip:<peer address>` (`shared` when the peer address is unknown).
#[derive(Debug, Clone)]
pub(crate) struct CallerKey(pub String);

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token.
    Public,
    /// Any authenticated role.
    Read,
    /// Operators and admins.
    Operate,
    /// Admins only.
    Admin,
    /// Agents (on their own runs) and admins.
    Agent,
}

impl Access {
    pub(crate) fn allows(self, role: Role) -> bool {
        match self {
            Access::Public | Access::Read => true,
            Access::Operate => matches!(role, Role::Admin | Role::Operator),
            Access::Admin => role == Role::Admin,
            Access::Agent => matches!(role, Role::Admin | Role::Agent),
        }
    }

    /// The role names allowed (for the OpenAPI document).
    pub fn roles(self) -> &'static [&'static str] {
        match self {
            Access::Public => &[],
            Access::Read => &["admin", "operator", "agent", "viewer"],
            Access::Operate => &["admin", "operator"],
            Access::Admin => &["admin"],
            Access::Agent => &["admin", "agent"],
        }
    }
}

fn valid_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?.trim();
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| s.to_string())
}

/// Makes the request's span a child of the caller's trace (its W3C `traceparent` header, with the
/// propagator the host installed; an agent's calls for a run carry the run's trace), and records the
/// trace id on the span (JSON logs show it).
fn join_callers_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&opentelemetry_http::HeaderExtractor(headers)));
    let remote = parent.span().span_context().clone();
    if remote.is_valid() {
        let _ = span.set_parent(parent);
    }
    // With an OpenTelemetry layer the span has its own context (in the caller's trace, or a new one).
    let own = span.context().span().span_context().trace_id();
    let trace_id = if own != opentelemetry::trace::TraceId::INVALID { own } else { remote.trace_id() };
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Outermost middleware: request id (accepted or generated, echoed), a tracing span around everything
/// that runs for the request, HTTP metrics by route pattern, and the JSON error body with the request id
/// for every failure (including those produced by axum or tower-http layers).
pub(crate) async fn request_context(State(metrics): State<Arc<Metrics>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(valid_request_id)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        trace_id = tracing::field::Empty,
        method = %method,
        route = route.as_deref().unwrap_or("unmatched"),
        path = %req.uri().path(),
    );
    join_callers_trace(&span, req.headers());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).instrument(span.clone()).await;

    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        let err = match resp.extensions_mut().remove::<RenderedError>() {
            Some(RenderedError(e)) => e,
            None => ApiError::from_status(status),
        };
        let fresh = err.render(Some(&id));
        let (fresh_parts, fresh_body) = fresh.into_parts();
        *resp.status_mut() = fresh_parts.status;
        for (name, value) in fresh_parts.headers.iter() {
            resp.headers_mut().insert(name.clone(), value.clone());
        }
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        *resp.body_mut() = Body::new(fresh_body);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let elapsed = started.elapsed();
    let status = resp.status();
    // Bounded label values: the route pattern (or "unmatched") and a standard method name.
    let method_label = match method {
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::HEAD | Method::OPTIONS => {
            method.as_str()
        }
        _ => "OTHER",
    };
    metrics.record_request(method_label, route.as_deref().unwrap_or("unmatched"), status.as_u16(), elapsed);
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request");
        }
    });
    resp
}

/// Whether a `Host` header names this machine: `localhost` (and `*.localhost`), `127.0.0.0/8` or `[::1]`,
/// with or without a port. Without tokens every caller is an admin, so a browser page must not reach the
/// server through a rebound DNS name.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        }
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The peer address of the connection: axum's `ConnectInfo<SocketAddr>` (serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`), or a `MockConnectInfo` layer in tests.
pub(crate) fn peer_addr(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| req.extensions().get::<MockConnectInfo<SocketAddr>>().map(|m| m.0))
}

/// Whether the peer is this machine (`127.0.0.0/8`, `::1`, or `::ffff:127.x.y.z`).
fn is_loopback_peer(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Without tokens every caller is an admin: only a loopback peer, naming a loopback host, is served.
pub(crate) fn refuse_without_auth(req: &Request) -> Option<Response> {
    match peer_addr(req) {
        None => {
            return Some(
                ApiError::forbidden(
                    "authentication is off (ORCH_API_TOKENS is not set) and the peer address is unknown, so the \
                     request is refused: serve the router with \
                     into_make_service_with_connect_info::<SocketAddr>(), or configure tokens",
                )
                .into_response(),
            )
        }
        Some(peer) if !is_loopback_peer(&peer) => {
            tracing::warn!(peer = %peer, "refused a non-loopback peer: authentication is off");
            return Some(
                ApiError::forbidden(format!(
                    "authentication is off (ORCH_API_TOKENS is not set), so only loopback peers are served; {} is \
                     not one",
                    peer.ip()
                ))
                .with_details(serde_json::json!({"peer": peer.ip().to_string()}))
                .into_response(),
            );
        }
        Some(_) => {}
    }
    if let Some(host) = req.headers().get(header::HOST) {
        let h = host.to_str().unwrap_or("");
        if !is_loopback_host(h) {
            return Some(
                ApiError::forbidden(
                    "authentication is off, so only loopback host names are served (set ORCH_API_TOKENS)",
                )
                .with_details(serde_json::json!({"host": h}))
                .into_response(),
            );
        }
    }
    None
}

fn bearer(req: &Request) -> Result<Option<&str>, ()> {
    let Some(v) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| ())?.trim();
    let (scheme, token) = s.split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(());
    }
    Ok(Some(token.trim()))
}

/// Per-route guard: refuses cross-origin writes from origins not allowed by CORS, authenticates the bearer
/// token, applies the rate limit (per token name, else per peer address), checks the route's role, and
/// puts the [`Principal`] in the request extensions.
pub(crate) async fn guard(State((state, access)): State<(AppState, Access)>, mut req: Request, next: Next) -> Response {
    let cfg = &state.config;
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("");
            if !cfg.origin_allowed(o) && !crate::session::same_origin(o, req.headers()) {
                return ApiError::forbidden(format!("cross-origin requests from `{o}` are not allowed"))
                    .into_response();
            }
        }
    }
    if access == Access::Public {
        req.extensions_mut().insert(Principal { name: "anonymous".into(), role: Role::Viewer });
        return next.run(req).await;
    }
    if !cfg.auth_enabled() {
        if let Some(refused) = refuse_without_auth(&req) {
            return refused;
        }
    }
    let auth: Result<Option<Principal>, &'static str> = if !cfg.auth_enabled() {
        Ok(Some(Principal { name: "anonymous".into(), role: Role::Admin }))
    } else {
        match bearer(&req) {
            Ok(Some(token)) => cfg.authenticate(token).cloned().map(Some).ok_or("unknown bearer token"),
            // No bearer token: the dashboard's session cookie (writes need its CSRF header).
            Ok(None) => match crate::session::authenticate(&state.sessions, &req) {
                Ok(p) => Ok(p),
                Err(refused) => return *refused,
            },
            Err(()) => Err("malformed Authorization header; expected `Bearer <token>`"),
        }
    };
    let key = match &auth {
        Ok(Some(p)) if cfg.auth_enabled() => format!("token:{}", p.name),
        _ => match peer_addr(&req) {
            Some(addr) => format!("ip:{}", addr.ip()),
            None => "shared".to_string(),
        },
    };
    if let Some(limiter) = &state.limiter {
        if let Err(wait) = limiter.check(&key, Instant::now()) {
            tracing::warn!(client = %key, "rate limited");
            return ApiError::rate_limited(wait).into_response();
        }
    }
    let principal = match auth {
        Ok(Some(p)) => p,
        Ok(None) => return ApiError::unauthorized("a bearer token is required").into_response(),
        Err(msg) => return ApiError::unauthorized(msg).into_response(),
    };
    if !access.allows(principal.role) {
        return ApiError::forbidden(format!("role `{}` may not call this route", principal.role)).into_response();
    }
    tracing::debug!(principal = %principal.name, role = %principal.role, "authenticated");
    req.extensions_mut().insert(principal);
    req.extensions_mut().insert(CallerKey(key));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::{is_loopback_host, is_loopback_peer};

    #[test]
    fn loopback_peers() {
        for a in ["127.0.0.1:1", "127.8.9.10:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            assert!(is_loopback_peer(&a.parse().unwrap()), "{a}");
        }
        for a in ["10.0.0.1:1", "192.0.2.2:1", "[::2]:1", "[::ffff:10.0.0.1]:1", "0.0.0.0:1"] {
            assert!(!is_loopback_peer(&a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for h in
            ["localhost", "localhost:18080", "127.0.0.1", "127.0.0.1:80", "[::1]:8080", "a.localhost", "LOCALHOST."]
        {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["evil.example", "evil.example:18080", "10.0.0.1", "[::2]:80", "127.0.0.1.evil.example", "[::1"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
