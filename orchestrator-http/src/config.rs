//! [`HttpConfig`]: CORS origins, rate limit, API tokens, body limit and request timeout, from `ORCH_*`
//! variables or builder-style setters.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// What a caller may do. `Admin` ⊇ `Operator` ⊇ `Viewer`; `Agent` may call the agent routes (on its own
/// runs) and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, on every run.
    Admin,
    /// Create, edit, approve, enqueue, cancel, answer; and read.
    Operator,
    /// Claim and report on its own runs; and read.
    Agent,
    /// Read only.
    Viewer,
}

impl Role {
    /// The lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "agent" => Some(Role::Agent),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of a request (an anonymous admin when no token is configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (for agents: the agent id).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}: {message}")]
pub struct ConfigError {
    /// The variable (or setter) at fault.
    pub variable: &'static str,
    /// What is wrong (never contains a token).
    pub message: String,
}

fn cfg_err(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { variable, message: message.into() }
}

/// Configuration of the HTTP layer.
#[derive(Clone)]
pub struct HttpConfig {
    pub(crate) cors_origins: Vec<String>,
    pub(crate) rate_limit_per_min: Option<u32>,
    pub(crate) tokens: HashMap<[u8; 32], Principal>,
    pub(crate) max_body_bytes: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) max_streams_per_caller: usize,
    pub(crate) allow_self_approval: bool,
    pub(crate) shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<String> = self.tokens.values().map(|p| format!("{}:{}", p.name, p.role)).collect();
        names.sort();
        f.debug_struct("HttpConfig")
            .field("cors_origins", &self.cors_origins)
            .field("rate_limit_per_min", &self.rate_limit_per_min)
            .field("tokens", &names)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("max_streams_per_caller", &self.max_streams_per_caller)
            .field("allow_self_approval", &self.allow_self_approval)
            .finish()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            cors_origins: Vec::new(),
            rate_limit_per_min: None,
            tokens: HashMap::new(),
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            request_timeout: Duration::from_secs(Self::DEFAULT_TIMEOUT_SECONDS),
            max_streams_per_caller: Self::DEFAULT_MAX_STREAMS_PER_CALLER,
            allow_self_approval: false,
            shutdown: None,
        }
    }
}

pub(crate) fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl HttpConfig {
    /// Default request body limit: 1 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
    /// Default request timeout in seconds.
    pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
    /// Default cap on the log streams and long polls one caller holds at once.
    pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 16;

    /// Defaults: no CORS origin, no rate limit, no token (auth disabled), 1 MiB bodies, 30 s timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `ORCH_CORS_ORIGINS`, `ORCH_RATE_LIMIT_PER_MIN`, `ORCH_API_TOKENS`, `ORCH_MAX_BODY_BYTES`,
    /// `ORCH_REQUEST_TIMEOUT_SECONDS`, `ORCH_MAX_STREAMS_PER_CALLER` and `ORCH_ALLOW_SELF_APPROVAL` from the
    /// process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the same variables as [`HttpConfig::from_env`] through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = HttpConfig::default();
        if let Some(v) = lookup("ORCH_CORS_ORIGINS") {
            c = c.with_cors_origins(v.split(',').map(str::trim).filter(|s| !s.is_empty()));
        }
        if let Some(v) = lookup("ORCH_RATE_LIMIT_PER_MIN").filter(|v| !v.trim().is_empty()) {
            let n: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| cfg_err("ORCH_RATE_LIMIT_PER_MIN", "expected a positive whole number"))?;
            c.rate_limit_per_min = Some(n);
        }
        if let Some(v) = lookup("ORCH_API_TOKENS") {
            for entry in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                c.add_token_entry(entry)?;
            }
        }
        if let Some(v) = lookup("ORCH_MAX_BODY_BYTES").filter(|v| !v.trim().is_empty()) {
            let n: usize = v
                .trim()
                .parse()
                .ok()
                .filter(|n| *n >= 1024)
                .ok_or_else(|| cfg_err("ORCH_MAX_BODY_BYTES", "expected a whole number of bytes, at least 1024"))?;
            c.max_body_bytes = n;
        }
        if let Some(v) = lookup("ORCH_REQUEST_TIMEOUT_SECONDS").filter(|v| !v.trim().is_empty()) {
            let n: u64 =
                v.trim().parse().ok().filter(|n| (1..=3600).contains(n)).ok_or_else(|| {
                    cfg_err("ORCH_REQUEST_TIMEOUT_SECONDS", "expected whole seconds between 1 and 3600")
                })?;
            c.request_timeout = Duration::from_secs(n);
        }
        if let Some(v) = lookup("ORCH_MAX_STREAMS_PER_CALLER").filter(|v| !v.trim().is_empty()) {
            let n: usize = v.trim().parse().ok().filter(|n| (1..=100_000).contains(n)).ok_or_else(|| {
                cfg_err("ORCH_MAX_STREAMS_PER_CALLER", "expected a whole number between 1 and 100000")
            })?;
            c.max_streams_per_caller = n;
        }
        if let Some(v) = lookup("ORCH_ALLOW_SELF_APPROVAL").filter(|v| !v.trim().is_empty()) {
            c.allow_self_approval = match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => return Err(cfg_err("ORCH_ALLOW_SELF_APPROVAL", "expected true or false")),
            };
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks combinations of settings that are unsafe together: `ORCH_CORS_ORIGINS=*` without
    /// `ORCH_API_TOKENS` would let any web page drive the API as an admin. [`HttpConfig::from_env`] calls
    /// it; a host building the configuration with setters should call it before serving (the router
    /// ignores the `*` origin while authentication is off either way).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.auth_enabled() && self.cors_origins.iter().any(|o| o == "*") {
            return Err(cfg_err(
                "ORCH_CORS_ORIGINS",
                "`*` (any origin) is refused while authentication is off (ORCH_API_TOKENS is not set): any web \
                 page could then call the API as an admin. Set ORCH_API_TOKENS, or list the allowed origins in \
                 ORCH_CORS_ORIGINS",
            ));
        }
        Ok(())
    }

    /// Whether the wildcard origin is in effect: `*` is listed and authentication is on.
    pub(crate) fn any_origin(&self) -> bool {
        self.auth_enabled() && self.cors_origins.iter().any(|o| o == "*")
    }

    fn add_token_entry(&mut self, entry: &str) -> Result<(), ConfigError> {
        const VAR: &str = "ORCH_API_TOKENS";
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(cfg_err(VAR, "each entry is name:role:token or name:role:sha256:<hex>"));
        };
        let role = Role::parse(role)
            .ok_or_else(|| cfg_err(VAR, format!("token `{name}`: role must be admin, operator, agent or viewer")))?;
        if let Some(hex_hash) = secret.strip_prefix("sha256:") {
            let bytes = hex::decode(hex_hash.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| cfg_err(VAR, format!("token `{name}`: sha256: needs 64 hex digits")))?;
            self.insert_token(name, role, bytes)
        } else {
            if secret.chars().count() < 16 {
                tracing::warn!(token = name.trim(), "API token shorter than 16 characters: easy to guess");
            }
            self.insert_token(name, role, hash_token(secret))
        }
    }

    fn insert_token(&mut self, name: &str, role: Role, hash: [u8; 32]) -> Result<(), ConfigError> {
        const VAR: &str = "ORCH_API_TOKENS";
        let name = name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(cfg_err(VAR, "a token name is 1..=200 characters"));
        }
        if self.tokens.values().any(|p| p.name == name) {
            return Err(cfg_err(VAR, format!("token name `{name}` is used twice")));
        }
        if self.tokens.contains_key(&hash) {
            return Err(cfg_err(VAR, format!("token `{name}` has the same secret as another token")));
        }
        self.tokens.insert(hash, Principal { name: name.to_string(), role });
        Ok(())
    }

    /// Allows these CORS origins (`*` allows any origin).
    pub fn with_cors_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cors_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// Limits each client to `per_min` requests per sliding minute (`None`: no limit).
    pub fn with_rate_limit_per_min(mut self, per_min: Option<u32>) -> Self {
        self.rate_limit_per_min = per_min.filter(|n| *n > 0);
        self
    }

    /// Adds a bearer token (kept only as its SHA-256 hash). Fails on an empty or reused name or secret.
    pub fn with_token(mut self, name: &str, role: Role, token: &str) -> Result<Self, ConfigError> {
        if token.is_empty() {
            return Err(cfg_err("ORCH_API_TOKENS", format!("token `{name}` is empty")));
        }
        self.insert_token(name, role, hash_token(token))?;
        Ok(self)
    }

    /// Sets the request body limit in bytes.
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes.max(1);
        self
    }

    /// Sets the request timeout (long polls get up to 30 s more).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Caps the log streams (SSE) and long polls (claims with `wait_ms`, `/agents/work?seen=`) one caller
    /// (token name, else peer address) holds at once; one more answers 429 with `Retry-After`.
    pub fn with_max_streams_per_caller(mut self, max: usize) -> Self {
        self.max_streams_per_caller = max.max(1);
        self
    }

    /// The cap on concurrent log streams and long polls per caller.
    pub fn max_streams_per_caller(&self) -> usize {
        self.max_streams_per_caller
    }

    /// Whether a token may approve what it proposed (a requirements draft) or created, edited or submitted
    /// (a work item, as seen by this router) while approvals are required. Default `false`: another token
    /// must approve (403 otherwise). Without tokens there is no identity to compare and nothing is checked.
    pub fn with_allow_self_approval(mut self, allow: bool) -> Self {
        self.allow_self_approval = allow;
        self
    }

    /// See [`HttpConfig::with_allow_self_approval`].
    pub fn allow_self_approval(&self) -> bool {
        self.allow_self_approval
    }

    /// Ends log streams (SSE) and long polls once `signal` turns true, so a graceful shutdown of the server
    /// is not held up by followers (pass the same signal as `axum::serve(..).with_graceful_shutdown`).
    pub fn with_shutdown(mut self, signal: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(signal);
        self
    }

    /// Resolves once the shutdown signal (see [`HttpConfig::with_shutdown`]) is true; never without one.
    pub(crate) async fn shutting_down(&self) {
        match &self.shutdown {
            Some(rx) => {
                let mut rx = rx.clone();
                if rx.wait_for(|s| *s).await.is_err() {
                    // The sender is gone: no shutdown will be signalled.
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }

    /// Whether bearer-token authentication is on (at least one token configured). When off, every
    /// request is treated as an admin: only bind to loopback then.
    pub fn auth_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The allowed CORS origins.
    pub fn cors_origins(&self) -> &[String] {
        &self.cors_origins
    }

    /// The per-client rate limit.
    pub fn rate_limit_per_min(&self) -> Option<u32> {
        self.rate_limit_per_min
    }

    /// The request body limit.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The configured token names and roles (never the tokens), sorted by name.
    pub fn token_names(&self) -> Vec<(String, Role)> {
        let mut v: Vec<_> = self.tokens.values().map(|p| (p.name.clone(), p.role)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub(crate) fn authenticate(&self, token: &str) -> Option<&Principal> {
        self.tokens.get(&hash_token(token))
    }

    pub(crate) fn origin_allowed(&self, origin: &str) -> bool {
        self.any_origin() || self.cors_origins.iter().any(|o| o != "*" && o.eq_ignore_ascii_case(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<HttpConfig, ConfigError> {
        let env: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HttpConfig::from_lookup(|k| env.get(k).cloned())
    }

    #[test]
    fn parses_everything() {
        let hashed = hex::encode(hash_token("s3cret"));
        let c = from(&[
            ("ORCH_CORS_ORIGINS", "https://a.example, https://b.example"),
            ("ORCH_RATE_LIMIT_PER_MIN", "60"),
            ("ORCH_API_TOKENS", &format!("alice:admin:tok-a, bot:agent:sha256:{hashed}")),
            ("ORCH_MAX_BODY_BYTES", "2048"),
            ("ORCH_REQUEST_TIMEOUT_SECONDS", "5"),
            ("ORCH_MAX_STREAMS_PER_CALLER", "3"),
            ("ORCH_ALLOW_SELF_APPROVAL", "true"),
        ])
        .unwrap();
        assert!(c.allow_self_approval());
        assert_eq!(c.max_streams_per_caller(), 3);
        assert_eq!(c.cors_origins(), ["https://a.example", "https://b.example"]);
        assert_eq!(c.rate_limit_per_min(), Some(60));
        assert!(c.auth_enabled());
        assert_eq!(c.authenticate("tok-a").unwrap().role, Role::Admin);
        assert_eq!(c.authenticate("s3cret").unwrap().name, "bot");
        assert!(c.authenticate("nope").is_none());
        assert_eq!(c.max_body_bytes(), 2048);
        assert_eq!(c.request_timeout(), Duration::from_secs(5));
        assert!(!format!("{c:?}").contains("tok-a"));
    }

    #[test]
    fn any_origin_without_tokens_is_refused() {
        let e = from(&[("ORCH_CORS_ORIGINS", "https://a.example, *")]).unwrap_err();
        assert_eq!(e.variable, "ORCH_CORS_ORIGINS");
        let text = e.to_string();
        assert!(text.contains("ORCH_CORS_ORIGINS") && text.contains("ORCH_API_TOKENS"), "{text}");
        // With tokens, or with listed origins, it is accepted.
        let c = from(&[("ORCH_CORS_ORIGINS", "*"), ("ORCH_API_TOKENS", "a:admin:0123456789abcdef")]).unwrap();
        assert!(c.origin_allowed("https://any.example"));
        let c = from(&[("ORCH_CORS_ORIGINS", "https://a.example")]).unwrap();
        assert!(c.origin_allowed("https://a.example") && !c.origin_allowed("https://b.example"));
        // Built with setters, the wildcard is not in effect while authentication is off.
        let c = HttpConfig::new().with_cors_origins(["*"]);
        assert!(c.validate().is_err());
        assert!(!c.origin_allowed("https://evil.example"));
    }

    #[test]
    fn defaults_and_errors() {
        let c = from(&[]).unwrap();
        assert!(!c.auth_enabled());
        assert!(c.cors_origins().is_empty());
        assert_eq!(c.max_body_bytes(), 1024 * 1024);
        assert_eq!(c.request_timeout(), Duration::from_secs(30));
        assert_eq!(c.max_streams_per_caller(), 16);
        assert!(!c.allow_self_approval());
        for bad in [
            ("ORCH_API_TOKENS", "alice:root:x"),
            ("ORCH_API_TOKENS", "alice:admin"),
            ("ORCH_API_TOKENS", "a:admin:x,a:viewer:y"),
            ("ORCH_API_TOKENS", "a:admin:sha256:zz"),
            ("ORCH_RATE_LIMIT_PER_MIN", "0"),
            ("ORCH_MAX_BODY_BYTES", "ten"),
            ("ORCH_REQUEST_TIMEOUT_SECONDS", "0"),
            ("ORCH_MAX_STREAMS_PER_CALLER", "0"),
            ("ORCH_ALLOW_SELF_APPROVAL", "maybe"),
        ] {
            let e = from(&[bad]).unwrap_err();
            assert_eq!(e.variable, bad.0);
        }
    }
}
