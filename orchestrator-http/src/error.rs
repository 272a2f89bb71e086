//! [`ApiError`]: the one JSON error shape of every failure,
//! `{"error": {"code", "message", "request_id", "details"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use orchestrator_core::retry::PolicyError;
use orchestrator_core::{Error, StoreError};
use serde_json::{json, Value};
use std::time::Duration;

/// An API failure: a status, a stable code, a message safe to show, and structured details.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (see the table in the crate docs).
    pub code: &'static str,
    /// Human-readable message (never internals).
    pub message: String,
    /// Structured details (`{}` when none).
    pub details: Value,
    /// `Retry-After` seconds (429, 503).
    pub retry_after: Option<Duration>,
}

/// Marks a response rendered from an [`ApiError`]; the request-id middleware re-renders its body with
/// the request id.
#[derive(Debug, Clone)]
pub(crate) struct RenderedError(pub ApiError);

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: json!({}), retry_after: None }
    }

    /// With details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found` for an entity.
    pub fn not_found(entity: &str, id: impl ToString) -> Self {
        let id = id.to_string();
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{entity} `{id}` not found"))
            .with_details(json!({"entity": entity, "id": id}))
    }

    /// 422 `invalid` for one field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let (field, message) = (field.into(), message.into());
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("invalid {field}: {message}")).with_details(
            json!({"field": field, "errors": [{"path": field, "line": null, "column": null, "message": message}]}),
        )
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large(limit: Option<usize>) -> Self {
        let msg = match limit {
            Some(l) => format!("the request body is larger than the limit of {l} bytes"),
            None => "the request body is too large".to_string(),
        };
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", msg)
            .with_details(limit.map(|l| json!({"limit_bytes": l})).unwrap_or_else(|| json!({})))
    }

    /// 429 `rate_limited` with `Retry-After`.
    pub fn rate_limited(retry_after: Duration) -> Self {
        let secs = retry_after.as_secs().max(1);
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; slow down")
            .with_details(json!({"retry_after_seconds": secs}));
        e.retry_after = Some(Duration::from_secs(secs));
        e
    }

    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>, retryable: bool) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).with_details(json!({"retryable": retryable}))
    }

    /// 500 `internal`; the cause is logged, never shown.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error")
    }

    /// The JSON body, with `request_id` (`null` when unknown).
    pub fn body(&self, request_id: Option<&str>) -> Value {
        json!({"error": {
            "code": self.code,
            "message": self.message,
            "request_id": request_id,
            "details": self.details,
        }})
    }

    pub(crate) fn render(&self, request_id: Option<&str>) -> Response {
        let body = serde_json::to_vec(&self.body(request_id)).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp =
            (self.status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response();
        if let Some(ra) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&ra.as_secs().max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }

    /// The error for a response that left a handler or a layer without an [`ApiError`] (axum's 404/405,
    /// tower-http's 413, the timeout's 503).
    pub(crate) fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::bad_request("bad request"),
            401 => Self::unauthorized("authentication required"),
            403 => Self::forbidden("forbidden"),
            404 => Self::new(status, "not_found", "no such route"),
            405 => Self::new(status, "method_not_allowed", "method not allowed on this route"),
            408 | 503 => Self::unavailable("the request timed out or the server is busy", true),
            413 => Self::payload_too_large(None),
            415 => Self::bad_request("unsupported content type"),
            429 => Self::rate_limited(Duration::from_secs(1)),
            s if s < 500 => Self::new(status, "bad_request", status.canonical_reason().unwrap_or("bad request")),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error"),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = self.render(None);
        resp.extensions_mut().insert(RenderedError(self));
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { entity, id } => ApiError::not_found(&entity.to_string(), id),
            StoreError::InvalidTransition(t) => {
                let message = t.to_string();
                ApiError::new(StatusCode::CONFLICT, "invalid_transition", message)
                    .with_details(json!({"entity": t.entity.to_string(), "from": t.from, "to": t.to}))
            }
            StoreError::Conflict { message } => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            StoreError::LeaseLost { run_id, reason } => {
                ApiError::new(StatusCode::CONFLICT, "lease_lost", format!("lease lost for run `{run_id}`: {reason}"))
                    .with_details(json!({"run_id": run_id, "reason": reason}))
            }
            StoreError::Duplicate { entity, key } => {
                ApiError::new(StatusCode::CONFLICT, "duplicate", format!("duplicate {entity} for key `{key}`"))
                    .with_details(json!({"entity": entity.to_string(), "key": key}))
            }
            StoreError::Invalid { field, message } => ApiError::invalid(field, message),
            StoreError::Unavailable { retryable, message } => {
                tracing::warn!(error = %message, retryable, "store unavailable");
                let mut e = ApiError::unavailable("the store is unavailable", retryable);
                if retryable {
                    e.retry_after = Some(Duration::from_secs(1));
                }
                e
            }
            e @ StoreError::Backend { .. } => ApiError::internal(&e),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Store(s) => s.into(),
            Error::Invalid { field, message } => ApiError::invalid(field, message),
            Error::Recipe(errs) => {
                let list: Vec<Value> = errs
                    .0
                    .iter()
                    .map(|r| json!({"path": r.path, "line": r.line, "column": r.column, "message": r.message}))
                    .collect();
                let first = errs.0.first().map(|r| r.to_string()).unwrap_or_else(|| "invalid recipe".into());
                let n = errs.0.len();
                let message = if n > 1 {
                    format!("invalid recipe: {first} (and {} more)", n - 1)
                } else {
                    format!("invalid recipe: {first}")
                };
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
                    .with_details(json!({"errors": list}))
            }
            Error::Policy(PolicyError::Invalid { field, message }) => ApiError::invalid(field, message),
            Error::EncryptionKeyMissing => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "the server has no encryption key (ORCH_SECRET_KEY), so it cannot accept secret answers",
            ),
            e @ Error::Crypto(_) => ApiError::internal(&e),
        }
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
