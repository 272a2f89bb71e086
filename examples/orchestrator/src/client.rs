//! A small JSON client for the orchestrator's HTTP API (used by the CLI commands and `seed`).

use reqwest::Method;
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// The server used when neither `--server` nor `ORCH_SERVER_URL` is given.
pub const DEFAULT_SERVER_URL: &str = "http://127.0.0.1:18080";

/// Why a request failed.
#[derive(Debug)]
pub enum ClientError {
    /// The server answered with an error body (`{"error": {...}}`) or a non-success status.
    Api {
        /// Error code (`not_found`, `invalid`, ...).
        code: String,
        /// Human-readable message.
        message: String,
        /// The request id the server assigned (for its logs).
        request_id: Option<String>,
        /// Structured details (recipe errors, ...).
        details: Value,
    },
    /// The server could not be reached or the answer could not be read.
    Transport(String),
    /// Bad input on the command line (a file that cannot be read, a bad time, ...).
    Usage(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Api { code, message, request_id, details } => {
                write!(f, "{code}: {message}")?;
                if let Some(id) = request_id {
                    write!(f, " (request {id})")?;
                }
                if let Some(errors) = details.get("errors").and_then(Value::as_array) {
                    for e in errors {
                        let path = e.get("path").and_then(Value::as_str).unwrap_or("");
                        let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
                        match (e.get("line").and_then(Value::as_u64), e.get("column").and_then(Value::as_u64)) {
                            (Some(l), Some(c)) => write!(f, "\n  {path} (line {l}, column {c}): {msg}")?,
                            (Some(l), None) => write!(f, "\n  {path} (line {l}): {msg}")?,
                            _ => write!(f, "\n  {path}: {msg}")?,
                        }
                    }
                }
                Ok(())
            }
            ClientError::Transport(m) => write!(f, "unavailable: {m}"),
            ClientError::Usage(m) => write!(f, "usage: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// A client bound to one server and token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:18080`), sending `token` as a bearer token.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        let base = server.trim().trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Usage(format!("server URL `{base}` must start with http:// or https://")));
        }
        let http = crate::tls::client_builder()
            .map_err(ClientError::Usage)?
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Transport(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client { http, base, token: token.filter(|t| !t.trim().is_empty()) })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request builder with the bearer token set.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    /// Sends a JSON request (no body when `body` is `None`) and returns the JSON answer.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let mut rb = self.request(method, path).timeout(Duration::from_secs(60));
        if let Some(b) = body {
            rb = rb.json(b);
        }
        self.finish(rb).await
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// GET `path` as text (a diff); an error answer is decoded as usual.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let resp = self.request(Method::GET, path).send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return resp.text().await.map_err(|e| ClientError::Transport(format!("cannot read the answer: {e}")));
        }
        decode(resp).await.map(|_| String::new())
    }

    /// POST `body` to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Sends a prepared request and decodes the JSON answer or the error body.
    pub async fn finish(&self, rb: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = rb.send().await.map_err(|e| self.transport(e))?;
        decode(resp).await
    }

    /// A transport error naming the server.
    pub fn transport(&self, e: reqwest::Error) -> ClientError {
        let mut msg = format!("cannot reach the server at {}: {e}", self.base);
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        if e.is_connect() {
            msg.push_str(" (is `orchestrator serve` running? set --server or ORCH_SERVER_URL)");
        }
        ClientError::Transport(msg)
    }
}

/// Decodes a response: the JSON body on success, a [`ClientError::Api`] otherwise.
pub async fn decode(resp: reqwest::Response) -> Result<Value, ClientError> {
    let status = resp.status();
    let header_id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = resp.text().await.map_err(|e| ClientError::Transport(format!("cannot read the answer: {e}")))?;
    if status.is_success() {
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_str(&text)
            .map_err(|e| ClientError::Transport(format!("the server answered {status} with invalid JSON: {e}")));
    }
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let err = body.get("error").cloned().unwrap_or(Value::Null);
    let code = err
        .get("code")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_ascii_lowercase().replace(' ', "_"));
    let message = err.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| {
        let t = text.trim();
        if t.is_empty() {
            format!("HTTP {status}")
        } else {
            t.chars().take(500).collect()
        }
    });
    let request_id = err.get("request_id").and_then(Value::as_str).map(str::to_string).or(header_id);
    Err(ClientError::Api { code, message, request_id, details: err.get("details").cloned().unwrap_or_default() })
}

/// The rows of a list answer: a bare array, or the array under `items` (or another list key).
pub fn items(v: &Value) -> Vec<Value> {
    if let Some(a) = v.as_array() {
        return a.clone();
    }
    for key in ["items", "data", "lines", "logs", "events", "assignments"] {
        if let Some(a) = v.get(key).and_then(Value::as_array) {
            return a.clone();
        }
    }
    Vec::new()
}

/// A string field (`""` when missing); numbers and booleans are rendered.
pub fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The work item inside a creation / change answer (`{"work_item": {...}}`) or the item itself.
pub fn work_item(v: &Value) -> &Value {
    v.get("work_item").unwrap_or(v)
}

/// Percent-encodes a query parameter value.
pub fn enc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Builds `path?k=v&...` from the parameters that are set.
pub fn with_query(path: &str, params: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = params.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v)))).collect();
    if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn api_errors_render_code_message_request_and_recipe_errors() {
        let e = ClientError::Api {
            code: "invalid".into(),
            message: "recipe is invalid".into(),
            request_id: Some("r-1".into()),
            details: json!({"errors": [{"path": "steps[0].timeout", "line": 4, "column": 14, "message": "too big"}]}),
        };
        assert_eq!(
            e.to_string(),
            "invalid: recipe is invalid (request r-1)\n  steps[0].timeout (line 4, column 14): too big"
        );
    }

    #[test]
    fn list_shapes_and_queries() {
        assert_eq!(items(&json!([1, 2])).len(), 2);
        assert_eq!(items(&json!({"items": [1], "next": null})).len(), 1);
        assert!(items(&json!({"x": 1})).is_empty());
        assert_eq!(with_query("/runs", &[("state", Some("a b".into())), ("x", None)]), "/runs?state=a%20b");
        assert_eq!(with_query("/runs", &[("x", None)]), "/runs");
        assert_eq!(s(&json!({"a": 3, "b": null}), "a"), "3");
        assert_eq!(s(&json!({"a": 3, "b": null}), "b"), "");
    }
}
