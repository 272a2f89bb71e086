//! Configuration of the [`crate::Orchestrator`] facade, from `ORCH_*` variables.

use crate::crypto::Keyring;
use crate::error::Error;
use crate::retry::RetryPolicy;
use chrono::Duration;

/// Policy and defaults the facade applies over any store.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// `ORCH_REQUIRE_APPROVAL`: requirement drafts and work items wait for a human approval.
    pub require_approval: bool,
    /// `ORCH_MAX_RETRIES`, `ORCH_BACKOFF_BASE_SECONDS`, `ORCH_BACKOFF_CAP_SECONDS`, `ORCH_BACKOFF_JITTER`.
    pub retry: RetryPolicy,
    /// `ORCH_LEASE_TTL_SECONDS`: default lease duration (default 60 s).
    pub lease_ttl: Duration,
    /// Longest lease an agent may ask for (1 hour).
    pub max_lease_ttl: Duration,
    /// `ORCH_SECRET_KEY`: the keyring encrypting info-request answers (`None`: secrets refused).
    pub keyring: Option<Keyring>,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            require_approval: false,
            retry: RetryPolicy::default(),
            lease_ttl: Duration::seconds(60),
            max_lease_ttl: Duration::hours(1),
            keyring: None,
        }
    }
}

/// Parses a boolean the way people write them in `.env` files.
pub fn parse_bool(name: &str, v: &str) -> Result<bool, Error> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(Error::invalid(name, format!("expected true or false, got `{v}`"))),
    }
}

impl OrchestratorConfig {
    /// Reads the configuration through `lookup` (e.g. `|k| std::env::var(k).ok()`); missing values keep
    /// their defaults, invalid ones are errors naming the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let mut c = OrchestratorConfig::default();
        if let Some(v) = lookup("ORCH_REQUIRE_APPROVAL") {
            c.require_approval = parse_bool("ORCH_REQUIRE_APPROVAL", &v)?;
        }
        c.retry = RetryPolicy::from_lookup(&lookup)?;
        if let Some(v) = lookup("ORCH_LEASE_TTL_SECONDS") {
            let secs: i64 =
                v.trim().parse().ok().filter(|s| (1..=3600).contains(s)).ok_or_else(|| {
                    Error::invalid("ORCH_LEASE_TTL_SECONDS", "expected whole seconds between 1 and 3600")
                })?;
            c.lease_ttl = Duration::seconds(secs);
        }
        if let Some(v) = lookup("ORCH_SECRET_KEY").filter(|v| !v.trim().is_empty()) {
            c.keyring = Some(Keyring::from_config(&v)?);
        }
        Ok(c)
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn reads_and_rejects() {
        let env: HashMap<&str, &str> =
            [("ORCH_REQUIRE_APPROVAL", "true"), ("ORCH_LEASE_TTL_SECONDS", "30"), ("ORCH_MAX_RETRIES", "5")].into();
        let c = OrchestratorConfig::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert!(c.require_approval);
        assert_eq!(c.lease_ttl, Duration::seconds(30));
        assert_eq!(c.retry.max_retries, 5);
        assert!(c.keyring.is_none());
        let bad: HashMap<&str, &str> = [("ORCH_REQUIRE_APPROVAL", "maybe")].into();
        let e = OrchestratorConfig::from_lookup(|k| bad.get(k).map(|v| v.to_string())).unwrap_err();
        assert!(e.to_string().contains("ORCH_REQUIRE_APPROVAL"));
        let bad: HashMap<&str, &str> = [("ORCH_LEASE_TTL_SECONDS", "0")].into();
        assert!(OrchestratorConfig::from_lookup(|k| bad.get(k).map(|v| v.to_string())).is_err());
        let bad: HashMap<&str, &str> = [("ORCH_SECRET_KEY", "short")].into();
        assert!(OrchestratorConfig::from_lookup(|k| bad.get(k).map(|v| v.to_string())).is_err());
    }
}
