//! Retry policy: how many times a failed work item is retried and how long to
//! wait before each retry.
//!
//! The delay before the retry that follows failed attempt `n` (1-based) is an
//! exponential backoff `d = min(cap, base * 2^(n-1))`, reduced at random by up
//! to the jitter fraction: `delay = d * (1 - jitter * unit)` with `unit` a
//! uniform sample in `[0, 1)` (see [`jitter_unit`]). The randomness is passed
//! in explicitly so that every computation here is deterministic and testable.
//!
//! Policies come from defaults ([`RetryPolicy::default`]), from the
//! environment ([`RetryPolicy::from_lookup`]), and may be adjusted per work
//! item with [`RetryOverrides`] ([`RetryPolicy::with_overrides`]).

use chrono::Duration;
use serde::{Deserialize, Serialize};

/// Largest accepted backoff cap, in seconds (30 days).
const MAX_CAP_SECONDS: f64 = 30.0 * 24.0 * 60.0 * 60.0;

/// Largest accepted `max_retries`.
const MAX_RETRIES_LIMIT: u32 = 1000;

/// Environment variable holding [`RetryPolicy::max_retries`].
const ENV_MAX_RETRIES: &str = "ORCH_MAX_RETRIES";
/// Environment variable holding [`RetryPolicy::backoff_base_seconds`].
const ENV_BASE: &str = "ORCH_BACKOFF_BASE_SECONDS";
/// Environment variable holding [`RetryPolicy::backoff_cap_seconds`].
const ENV_CAP: &str = "ORCH_BACKOFF_CAP_SECONDS";
/// Environment variable holding [`RetryPolicy::jitter`].
const ENV_JITTER: &str = "ORCH_BACKOFF_JITTER";

const FIELD_MAX_RETRIES: &str = "max_retries";
const FIELD_BASE: &str = "backoff_base_seconds";
const FIELD_CAP: &str = "backoff_cap_seconds";
const FIELD_JITTER: &str = "jitter";

/// Retry policy: exponential backoff from a base, capped, with jitter, and a
/// maximum number of retries.
///
/// Deserialization does not validate the values; call
/// [`RetryPolicy::validate`] on policies read from untrusted input. The delay
/// computations never panic, even on an invalid policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Number of retries allowed after the first attempt (so at most
    /// `max_retries + 1` attempts).
    pub max_retries: u32,
    /// Backoff base in seconds (delay before the first retry, before jitter).
    pub backoff_base_seconds: f64,
    /// Upper bound of any delay, in seconds.
    pub backoff_cap_seconds: f64,
    /// Jitter fraction in `[0, 1]`: the delay is reduced by up to this
    /// fraction at random.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 3 retries, base 2 s, cap 300 s, jitter 0.2.
    fn default() -> Self {
        Self { max_retries: 3, backoff_base_seconds: 2.0, backoff_cap_seconds: 300.0, jitter: 0.2 }
    }
}

/// Per-work-item overrides; `None` keeps the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverrides {
    /// Overrides [`RetryPolicy::max_retries`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Overrides [`RetryPolicy::backoff_base_seconds`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_seconds: Option<f64>,
    /// Overrides [`RetryPolicy::backoff_cap_seconds`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_cap_seconds: Option<f64>,
    /// Overrides [`RetryPolicy::jitter`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

impl RetryOverrides {
    /// True when no field is overridden.
    pub fn is_empty(&self) -> bool {
        self.max_retries.is_none()
            && self.backoff_base_seconds.is_none()
            && self.backoff_cap_seconds.is_none()
            && self.jitter.is_none()
    }
}

/// Whether a failure may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A transient failure: another attempt may succeed.
    Retryable,
    /// A failure that no retry can fix.
    Permanent,
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryDecision {
    /// Try again after `delay`; `next_attempt` is the 1-based number of the
    /// next attempt.
    Retry {
        /// How long to wait before the next attempt.
        delay: Duration,
        /// 1-based number of the next attempt.
        next_attempt: u32,
    },
    /// Stop: the work item fails.
    GiveUp {
        /// Why no further attempt is made.
        reason: GiveUpReason,
    },
}

/// Why a work item is not retried any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GiveUpReason {
    /// The failure was permanent.
    Permanent,
    /// All allowed retries have been used.
    RetriesExhausted,
}

/// Invalid policy values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A field (or, from [`RetryPolicy::from_lookup`], an environment
    /// variable) has an unacceptable value.
    #[error("invalid retry policy: {field}: {message}")]
    Invalid {
        /// The offending field or environment variable name.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl PolicyError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        PolicyError::Invalid { field, message: message.into() }
    }
}

/// Clamps `x` into `[lo, hi]`, mapping NaN to `lo`.
fn clamp_or_low(x: f64, lo: f64, hi: f64) -> f64 {
    if x.is_nan() {
        lo
    } else {
        x.clamp(lo, hi)
    }
}

impl RetryPolicy {
    /// Checks: base >= 0 and finite, cap >= base and finite, cap <= 30 days,
    /// jitter in `[0, 1]`, `max_retries <= 1000`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let base = self.backoff_base_seconds;
        let cap = self.backoff_cap_seconds;
        let jitter = self.jitter;
        if self.max_retries > MAX_RETRIES_LIMIT {
            return Err(PolicyError::invalid(
                FIELD_MAX_RETRIES,
                format!("must be at most {MAX_RETRIES_LIMIT}, got {}", self.max_retries),
            ));
        }
        if !base.is_finite() || base < 0.0 {
            return Err(PolicyError::invalid(
                FIELD_BASE,
                format!("must be a finite number of seconds >= 0, got {base}"),
            ));
        }
        if !cap.is_finite() || cap < 0.0 {
            return Err(PolicyError::invalid(FIELD_CAP, format!("must be a finite number of seconds >= 0, got {cap}")));
        }
        if cap > MAX_CAP_SECONDS {
            return Err(PolicyError::invalid(
                FIELD_CAP,
                format!("must be at most {MAX_CAP_SECONDS} seconds (30 days), got {cap}"),
            ));
        }
        if cap < base {
            return Err(PolicyError::invalid(FIELD_CAP, format!("must be >= {FIELD_BASE} ({base}), got {cap}")));
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(PolicyError::invalid(FIELD_JITTER, format!("must be in [0, 1], got {jitter}")));
        }
        Ok(())
    }

    /// The policy with the overrides applied (then validated).
    pub fn with_overrides(&self, o: &RetryOverrides) -> Result<RetryPolicy, PolicyError> {
        let policy = RetryPolicy {
            max_retries: o.max_retries.unwrap_or(self.max_retries),
            backoff_base_seconds: o.backoff_base_seconds.unwrap_or(self.backoff_base_seconds),
            backoff_cap_seconds: o.backoff_cap_seconds.unwrap_or(self.backoff_cap_seconds),
            jitter: o.jitter.unwrap_or(self.jitter),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Backoff before jitter, in seconds, for failed attempt `attempt`:
    /// `min(cap, base * 2^(attempt-1))`, computed on sanitized values so that
    /// it is finite and in `[0, cap]` for any policy and any attempt.
    fn capped_backoff_seconds(&self, attempt: u32) -> f64 {
        let cap = clamp_or_low(self.backoff_cap_seconds, 0.0, MAX_CAP_SECONDS);
        let base = clamp_or_low(self.backoff_base_seconds, 0.0, MAX_CAP_SECONDS);
        if base == 0.0 {
            return 0.0;
        }
        let exponent = attempt.max(1) - 1;
        // Any positive base is >= 2^-1074 and the cap is <= 30 days < 2^22 s,
        // so from 2^1100 on the product is always above the cap. Bounding the
        // exponent keeps the i32 conversion lossless.
        if exponent >= 1100 {
            return cap;
        }
        let exponent = i32::try_from(exponent).unwrap_or(1100);
        // The product may be +inf for large exponents; min() then yields cap.
        (base * 2f64.powi(exponent)).min(cap)
    }

    /// Delay before the retry that follows failed attempt number `attempt`
    /// (1-based; 0 is treated as 1):
    /// `d = min(cap, base * 2^(attempt-1))` (saturating, no overflow or NaN
    /// for any attempt up to `u32::MAX`), then `delay = d * (1 - jitter * unit)`,
    /// where `unit` in `[0, 1)` is a uniform random sample (out-of-range units
    /// are clamped into `[0, 1]`, NaN counts as 0).
    ///
    /// So the delay is in `[d*(1-jitter), d]` and never above the cap. It is
    /// returned as a [`Duration`] rounded to the nearest millisecond, but never
    /// above the cap rounded down to whole milliseconds.
    ///
    /// Never panics: on a policy that fails [`RetryPolicy::validate`], base
    /// and cap are clamped into `[0, 30 days]` and jitter into `[0, 1]`
    /// (NaN counts as 0).
    pub fn backoff_delay(&self, attempt: u32, unit: f64) -> Duration {
        let cap = clamp_or_low(self.backoff_cap_seconds, 0.0, MAX_CAP_SECONDS);
        let jitter = clamp_or_low(self.jitter, 0.0, 1.0);
        let unit = clamp_or_low(unit, 0.0, 1.0);
        let d = self.capped_backoff_seconds(attempt);
        let delay_seconds = d * (1.0 - jitter * unit);
        let cap_ms = (cap * 1000.0).floor();
        let ms = (delay_seconds * 1000.0).round().clamp(0.0, cap_ms);
        // In range by construction (at most 30 days); `as` saturates anyway.
        Duration::try_milliseconds(ms as i64).unwrap_or_else(Duration::zero)
    }

    /// Decision after failed attempt `attempt` (1-based; 0 is treated as 1):
    /// a [`FailureKind::Permanent`] failure gives up with
    /// [`GiveUpReason::Permanent`]; an attempt beyond `max_retries` gives up
    /// with [`GiveUpReason::RetriesExhausted`]; otherwise retry after
    /// [`RetryPolicy::backoff_delay`]`(attempt, unit)` with
    /// `next_attempt = attempt + 1`.
    pub fn decide(&self, attempt: u32, kind: FailureKind, unit: f64) -> RetryDecision {
        if kind == FailureKind::Permanent {
            return RetryDecision::GiveUp { reason: GiveUpReason::Permanent };
        }
        let attempt = attempt.max(1);
        match attempt.checked_add(1) {
            Some(next_attempt) if attempt <= self.max_retries => {
                RetryDecision::Retry { delay: self.backoff_delay(attempt, unit), next_attempt }
            }
            _ => RetryDecision::GiveUp { reason: GiveUpReason::RetriesExhausted },
        }
    }

    /// Reads `ORCH_MAX_RETRIES`, `ORCH_BACKOFF_BASE_SECONDS`,
    /// `ORCH_BACKOFF_CAP_SECONDS`, `ORCH_BACKOFF_JITTER` through the given
    /// lookup function (so tests do not touch the process environment).
    ///
    /// A missing variable keeps the default; surrounding whitespace is
    /// ignored; an unparsable value (including an empty one) or an invalid
    /// resulting policy is an error whose `field` is the variable name.
    ///
    /// With the real environment: `RetryPolicy::from_lookup(|k| std::env::var(k).ok())`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<RetryPolicy, PolicyError> {
        let defaults = RetryPolicy::default();
        let max_retries = lookup(ENV_MAX_RETRIES);
        let base = lookup(ENV_BASE);
        let cap = lookup(ENV_CAP);
        let jitter = lookup(ENV_JITTER);

        let policy = RetryPolicy {
            max_retries: match &max_retries {
                Some(raw) => parse_var::<u32>(ENV_MAX_RETRIES, raw, "a non-negative integer")?,
                None => defaults.max_retries,
            },
            backoff_base_seconds: match &base {
                Some(raw) => parse_var::<f64>(ENV_BASE, raw, "a number of seconds")?,
                None => defaults.backoff_base_seconds,
            },
            backoff_cap_seconds: match &cap {
                Some(raw) => parse_var::<f64>(ENV_CAP, raw, "a number of seconds")?,
                None => defaults.backoff_cap_seconds,
            },
            jitter: match &jitter {
                Some(raw) => parse_var::<f64>(ENV_JITTER, raw, "a number in [0, 1]")?,
                None => defaults.jitter,
            },
        };

        policy.validate().map_err(|err| {
            let PolicyError::Invalid { field, message } = err;
            let var = match field {
                FIELD_MAX_RETRIES => ENV_MAX_RETRIES,
                FIELD_BASE => ENV_BASE,
                // The cap is compared with the base: when only the base was
                // set, the base variable is the one to fix.
                FIELD_CAP if cap.is_none() && base.is_some() => ENV_BASE,
                FIELD_CAP => ENV_CAP,
                _ => ENV_JITTER,
            };
            PolicyError::invalid(var, format!("{field} {message}"))
        })?;
        Ok(policy)
    }
}

/// Parses an environment variable's value, naming the variable on failure.
fn parse_var<T>(var: &'static str, raw: &str, expected: &str) -> Result<T, PolicyError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    raw.trim().parse::<T>().map_err(|e| PolicyError::invalid(var, format!("expected {expected}, got {raw:?} ({e})")))
}

/// A uniform random sample in `[0, 1)` for jitter (fastrand).
pub fn jitter_unit() -> f64 {
    fastrand::f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn no_jitter(max_retries: u32, base: f64, cap: f64) -> RetryPolicy {
        RetryPolicy { max_retries, backoff_base_seconds: base, backoff_cap_seconds: cap, jitter: 0.0 }
    }

    fn secs(d: Duration) -> f64 {
        d.num_milliseconds() as f64 / 1000.0
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        move |k| map.get(k).map(|v| v.to_string())
    }

    fn field_of(err: PolicyError) -> &'static str {
        let PolicyError::Invalid { field, .. } = err;
        field
    }

    /// Reference value of `d` computed independently (by repeated doubling).
    fn reference_d(p: &RetryPolicy, attempt: u32) -> f64 {
        let mut d = p.backoff_base_seconds;
        let mut i = 1;
        while i < attempt && d > 0.0 && d < p.backoff_cap_seconds {
            d *= 2.0;
            i += 1;
        }
        d.min(p.backoff_cap_seconds)
    }

    // ---------- plain unit tests ----------

    #[test]
    fn default_values() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_retries, 3);
        assert_eq!(p.backoff_base_seconds, 2.0);
        assert_eq!(p.backoff_cap_seconds, 300.0);
        assert_eq!(p.jitter, 0.2);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn exact_delays_without_jitter() {
        let p = no_jitter(20, 2.0, 300.0);
        let got: Vec<i64> = (1..=10).map(|a| p.backoff_delay(a, 0.5).num_milliseconds()).collect();
        assert_eq!(got, vec![2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000, 300_000]);
        assert_eq!(p.backoff_delay(0, 0.0), Duration::seconds(2));
        assert_eq!(p.backoff_delay(u32::MAX, 0.0), Duration::seconds(300));
        assert_eq!(p.backoff_delay(1025, 0.0), Duration::seconds(300));
    }

    #[test]
    fn jitter_reduces_delay() {
        let p = RetryPolicy { jitter: 0.5, ..no_jitter(3, 2.0, 300.0) };
        assert_eq!(p.backoff_delay(1, 0.0), Duration::milliseconds(2_000));
        assert_eq!(p.backoff_delay(1, 0.5), Duration::milliseconds(1_500));
        assert_eq!(p.backoff_delay(2, 0.999), Duration::milliseconds(2_002));
        // Out-of-range units are clamped.
        assert_eq!(p.backoff_delay(1, -3.0), Duration::milliseconds(2_000));
        assert_eq!(p.backoff_delay(1, 7.0), Duration::milliseconds(1_000));
        assert_eq!(p.backoff_delay(1, f64::NAN), Duration::milliseconds(2_000));
        assert_eq!(p.backoff_delay(1, f64::INFINITY), Duration::milliseconds(1_000));
    }

    #[test]
    fn zero_base_gives_zero_delay() {
        let p = no_jitter(3, 0.0, 10.0);
        assert_eq!(p.backoff_delay(1, 0.0), Duration::zero());
        assert_eq!(p.backoff_delay(u32::MAX, 0.0), Duration::zero());
    }

    #[test]
    fn sub_millisecond_cap_is_respected() {
        let p = no_jitter(3, 0.0004, 0.0009);
        assert_eq!(p.backoff_delay(1, 0.0), Duration::zero());
        assert_eq!(p.backoff_delay(40, 0.0), Duration::zero());
        let p = no_jitter(3, 1.0, 1.0009);
        assert_eq!(p.backoff_delay(2, 0.0), Duration::milliseconds(1_000));
    }

    #[test]
    fn invalid_policies_do_not_panic() {
        let weird = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 1e308, 0.0];
        for &b in &weird {
            for &c in &weird {
                for &j in &weird {
                    let p = RetryPolicy {
                        max_retries: u32::MAX,
                        backoff_base_seconds: b,
                        backoff_cap_seconds: c,
                        jitter: j,
                    };
                    for a in [0, 1, 2, 64, 1023, 1024, 1100, u32::MAX] {
                        let d = p.backoff_delay(a, 0.3);
                        assert!(d >= Duration::zero());
                        assert!(secs(d) <= MAX_CAP_SECONDS);
                        let _ = p.decide(a, FailureKind::Retryable, 0.3);
                    }
                }
            }
        }
    }

    #[test]
    fn decide_basic() {
        let p = no_jitter(2, 2.0, 300.0);
        assert_eq!(
            p.decide(1, FailureKind::Retryable, 0.0),
            RetryDecision::Retry { delay: Duration::seconds(2), next_attempt: 2 }
        );
        assert_eq!(
            p.decide(2, FailureKind::Retryable, 0.0),
            RetryDecision::Retry { delay: Duration::seconds(4), next_attempt: 3 }
        );
        assert_eq!(
            p.decide(3, FailureKind::Retryable, 0.0),
            RetryDecision::GiveUp { reason: GiveUpReason::RetriesExhausted }
        );
        assert_eq!(p.decide(1, FailureKind::Permanent, 0.0), RetryDecision::GiveUp { reason: GiveUpReason::Permanent });
        let none = no_jitter(0, 2.0, 300.0);
        assert_eq!(
            none.decide(1, FailureKind::Retryable, 0.0),
            RetryDecision::GiveUp { reason: GiveUpReason::RetriesExhausted }
        );
    }

    #[test]
    fn decide_never_overflows_attempt() {
        let p = no_jitter(u32::MAX, 2.0, 300.0);
        assert_eq!(
            p.decide(u32::MAX, FailureKind::Retryable, 0.0),
            RetryDecision::GiveUp { reason: GiveUpReason::RetriesExhausted }
        );
        assert_eq!(
            p.decide(u32::MAX - 1, FailureKind::Retryable, 0.0),
            RetryDecision::Retry { delay: Duration::seconds(300), next_attempt: u32::MAX }
        );
    }

    #[test]
    fn validate_rejects_bad_values() {
        let ok = RetryPolicy::default();
        let cases: Vec<(RetryPolicy, &str)> = vec![
            (RetryPolicy { max_retries: 1001, ..ok.clone() }, "max_retries"),
            (RetryPolicy { backoff_base_seconds: -0.1, ..ok.clone() }, "backoff_base_seconds"),
            (RetryPolicy { backoff_base_seconds: f64::NAN, ..ok.clone() }, "backoff_base_seconds"),
            (RetryPolicy { backoff_base_seconds: f64::INFINITY, ..ok.clone() }, "backoff_base_seconds"),
            (RetryPolicy { backoff_cap_seconds: 1.0, ..ok.clone() }, "backoff_cap_seconds"),
            (RetryPolicy { backoff_cap_seconds: f64::INFINITY, ..ok.clone() }, "backoff_cap_seconds"),
            (RetryPolicy { backoff_cap_seconds: MAX_CAP_SECONDS + 1.0, ..ok.clone() }, "backoff_cap_seconds"),
            (RetryPolicy { jitter: 1.01, ..ok.clone() }, "jitter"),
            (RetryPolicy { jitter: -0.01, ..ok.clone() }, "jitter"),
            (RetryPolicy { jitter: f64::NAN, ..ok.clone() }, "jitter"),
        ];
        for (p, field) in cases {
            let err = p.validate().expect_err("must be rejected");
            assert_eq!(field_of(err), field, "{p:?}");
        }
        // Boundaries are accepted.
        let edge = RetryPolicy {
            max_retries: 1000,
            backoff_base_seconds: 0.0,
            backoff_cap_seconds: MAX_CAP_SECONDS,
            jitter: 1.0,
        };
        assert_eq!(edge.validate(), Ok(()));
        assert_eq!(no_jitter(0, 5.0, 5.0).validate(), Ok(()));
    }

    #[test]
    fn error_display_names_field() {
        let err = RetryPolicy { jitter: 2.0, ..RetryPolicy::default() }.validate().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("jitter"), "{text}");
        assert!(text.contains('2'), "{text}");
    }

    #[test]
    fn overrides_apply_and_validate() {
        let base = RetryPolicy::default();
        assert!(RetryOverrides::default().is_empty());
        assert_eq!(base.with_overrides(&RetryOverrides::default()), Ok(base.clone()));
        let o = RetryOverrides { max_retries: Some(7), jitter: Some(0.0), ..Default::default() };
        assert!(!o.is_empty());
        let p = base.with_overrides(&o).unwrap();
        assert_eq!(p, no_jitter(7, 2.0, 300.0));
        let bad = RetryOverrides { backoff_base_seconds: Some(1000.0), ..Default::default() };
        assert_eq!(field_of(base.with_overrides(&bad).unwrap_err()), "backoff_cap_seconds");
    }

    #[test]
    fn env_missing_is_default() {
        assert_eq!(RetryPolicy::from_lookup(|_| None), Ok(RetryPolicy::default()));
    }

    #[test]
    fn env_values_are_parsed() {
        let p = RetryPolicy::from_lookup(env(&[
            ("ORCH_MAX_RETRIES", " 5 "),
            ("ORCH_BACKOFF_BASE_SECONDS", "0.5"),
            ("ORCH_BACKOFF_CAP_SECONDS", "60"),
            ("ORCH_BACKOFF_JITTER", "0"),
            ("ORCH_UNRELATED", "x"),
        ]))
        .unwrap();
        assert_eq!(p, no_jitter(5, 0.5, 60.0));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let cases: &[(&str, &str, &str)] = &[
            ("ORCH_MAX_RETRIES", "three", "ORCH_MAX_RETRIES"),
            ("ORCH_MAX_RETRIES", "-1", "ORCH_MAX_RETRIES"),
            ("ORCH_MAX_RETRIES", "2.5", "ORCH_MAX_RETRIES"),
            ("ORCH_MAX_RETRIES", "", "ORCH_MAX_RETRIES"),
            ("ORCH_MAX_RETRIES", "1001", "ORCH_MAX_RETRIES"),
            ("ORCH_BACKOFF_BASE_SECONDS", "2s", "ORCH_BACKOFF_BASE_SECONDS"),
            ("ORCH_BACKOFF_BASE_SECONDS", "-1", "ORCH_BACKOFF_BASE_SECONDS"),
            ("ORCH_BACKOFF_BASE_SECONDS", "NaN", "ORCH_BACKOFF_BASE_SECONDS"),
            ("ORCH_BACKOFF_BASE_SECONDS", "inf", "ORCH_BACKOFF_BASE_SECONDS"),
            // Only the base was set, and it exceeds the default cap.
            ("ORCH_BACKOFF_BASE_SECONDS", "301", "ORCH_BACKOFF_BASE_SECONDS"),
            ("ORCH_BACKOFF_CAP_SECONDS", "", "ORCH_BACKOFF_CAP_SECONDS"),
            ("ORCH_BACKOFF_CAP_SECONDS", "1", "ORCH_BACKOFF_CAP_SECONDS"),
            ("ORCH_BACKOFF_CAP_SECONDS", "1e9", "ORCH_BACKOFF_CAP_SECONDS"),
            ("ORCH_BACKOFF_JITTER", "20%", "ORCH_BACKOFF_JITTER"),
            ("ORCH_BACKOFF_JITTER", "1.5", "ORCH_BACKOFF_JITTER"),
        ];
        for &(var, value, expected) in cases {
            let err =
                RetryPolicy::from_lookup(env(&[(var, value)])).expect_err(&format!("{var}={value:?} must be rejected"));
            assert!(err.to_string().contains(expected), "{err}");
            assert_eq!(field_of(err), expected, "{var}={value:?}");
        }
        // Both set and inconsistent: the cap is blamed.
        let err =
            RetryPolicy::from_lookup(env(&[("ORCH_BACKOFF_BASE_SECONDS", "10"), ("ORCH_BACKOFF_CAP_SECONDS", "5")]))
                .unwrap_err();
        assert_eq!(field_of(err), "ORCH_BACKOFF_CAP_SECONDS");
    }

    #[test]
    fn serde_policy_roundtrip_and_strictness() {
        let p = RetryPolicy::default();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "max_retries": 3,
                "backoff_base_seconds": 2.0,
                "backoff_cap_seconds": 300.0,
                "jitter": 0.2
            })
        );
        let back: RetryPolicy = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
        let unknown =
            r#"{"max_retries":3,"backoff_base_seconds":2.0,"backoff_cap_seconds":300.0,"jitter":0.2,"extra":1}"#;
        assert!(serde_json::from_str::<RetryPolicy>(unknown).is_err());
        let missing = r#"{"max_retries":3}"#;
        assert!(serde_json::from_str::<RetryPolicy>(missing).is_err());
    }

    #[test]
    fn serde_overrides() {
        assert_eq!(serde_json::to_string(&RetryOverrides::default()).unwrap(), "{}");
        let o = RetryOverrides { jitter: Some(0.5), ..Default::default() };
        assert_eq!(serde_json::to_string(&o).unwrap(), r#"{"jitter":0.5}"#);
        let parsed: RetryOverrides = serde_json::from_str(r#"{"max_retries":1}"#).unwrap();
        assert_eq!(parsed.max_retries, Some(1));
        assert!(parsed.backoff_base_seconds.is_none());
        assert_eq!(serde_json::from_str::<RetryOverrides>("{}").unwrap(), RetryOverrides::default());
        assert!(serde_json::from_str::<RetryOverrides>(r#"{"retries":1}"#).is_err());
    }

    #[test]
    fn serde_enums_are_snake_case() {
        assert_eq!(serde_json::to_string(&FailureKind::Retryable).unwrap(), r#""retryable""#);
        assert_eq!(serde_json::to_string(&FailureKind::Permanent).unwrap(), r#""permanent""#);
        assert_eq!(serde_json::to_string(&GiveUpReason::RetriesExhausted).unwrap(), r#""retries_exhausted""#);
        assert_eq!(serde_json::to_string(&GiveUpReason::Permanent).unwrap(), r#""permanent""#);
        assert_eq!(
            serde_json::from_str::<GiveUpReason>(r#""retries_exhausted""#).unwrap(),
            GiveUpReason::RetriesExhausted
        );
        assert!(serde_json::from_str::<FailureKind>(r#""Retryable""#).is_err());
    }

    #[test]
    fn jitter_unit_in_range() {
        for _ in 0..1000 {
            let u = jitter_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }

    // ---------- property tests ----------

    /// Valid policies: base in [0, 1000] s, cap in [base, 30 days].
    fn valid_policy() -> impl Strategy<Value = RetryPolicy> {
        (0u32..=1000, 0.0f64..=1000.0, 0.0f64..=1.0, 0.0f64..=1.0).prop_map(|(max_retries, base, cap_frac, jitter)| {
            RetryPolicy {
                max_retries,
                backoff_base_seconds: base,
                backoff_cap_seconds: (base + cap_frac * (MAX_CAP_SECONDS - base)).clamp(base, MAX_CAP_SECONDS),
                jitter,
            }
        })
    }

    /// Attempts biased towards interesting regions, including huge ones.
    fn attempt() -> impl Strategy<Value = u32> {
        prop_oneof![1u32..=64, 1000u32..=1100, any::<u32>(), Just(u32::MAX), Just(0u32),]
    }

    fn any_unit() -> impl Strategy<Value = f64> {
        prop_oneof![
            4 => 0.0f64..1.0,
            1 => any::<f64>(),
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
            1 => Just(-1.0f64),
        ]
    }

    proptest! {
        #[test]
        fn prop_delay_within_bounds(p in valid_policy(), a in attempt(), unit in any_unit()) {
            let got = secs(p.backoff_delay(a, unit));
            let d = reference_d(&p, a.max(1));
            let lo = d * (1.0 - p.jitter);
            // Millisecond rounding: at most half a millisecond off the exact interval.
            let tol = 0.0005 + 1e-9 * d;
            prop_assert!(got >= lo - tol, "got {got} < lo {lo} (d {d})");
            prop_assert!(got <= d + tol, "got {got} > d {d}");
            // Never above the cap (compared in milliseconds, no tolerance).
            let ms = p.backoff_delay(a, unit).num_milliseconds() as f64;
            prop_assert!(ms <= p.backoff_cap_seconds * 1000.0, "{ms} ms > cap {}", p.backoff_cap_seconds);
            prop_assert!(got >= 0.0);
        }

        #[test]
        fn prop_delay_monotone_in_attempt(p in valid_policy(), a in attempt(), unit in any_unit()) {
            let next = a.saturating_add(1);
            prop_assert!(p.backoff_delay(a, unit) <= p.backoff_delay(next, unit));
            prop_assert!(p.backoff_delay(1, unit) <= p.backoff_delay(a, unit));
        }

        #[test]
        fn prop_delay_exact_powers_without_jitter(
            max_retries in 0u32..=1000,
            base_ms in 0u32..=10_000,
            a in 1u32..=40,
        ) {
            let base = f64::from(base_ms) / 1000.0;
            let p = no_jitter(max_retries, base, 300.0);
            let expected_ms = (u64::from(base_ms) << (a - 1)).min(300_000);
            prop_assert_eq!(p.backoff_delay(a, 0.7).num_milliseconds(), expected_ms as i64);
        }

        #[test]
        fn prop_retry_count_is_max_retries(p in valid_policy(), units in prop::collection::vec(0.0f64..1.0, 8)) {
            let mut attempt = 1u32;
            let mut retries = 0u32;
            loop {
                prop_assert!(attempt <= p.max_retries + 1, "attempt {attempt} beyond limit");
                let unit = units[(attempt as usize) % units.len()];
                match p.decide(attempt, FailureKind::Retryable, unit) {
                    RetryDecision::Retry { delay, next_attempt } => {
                        prop_assert_eq!(next_attempt, attempt + 1);
                        prop_assert_eq!(delay, p.backoff_delay(attempt, unit));
                        retries += 1;
                        attempt = next_attempt;
                    }
                    RetryDecision::GiveUp { reason } => {
                        prop_assert_eq!(reason, GiveUpReason::RetriesExhausted);
                        break;
                    }
                }
            }
            prop_assert_eq!(retries, p.max_retries);
            prop_assert_eq!(attempt, p.max_retries + 1);
        }

        #[test]
        fn prop_permanent_always_gives_up(
            max_retries in any::<u32>(),
            base in any::<f64>(),
            cap in any::<f64>(),
            jitter in any::<f64>(),
            a in any::<u32>(),
            unit in any::<f64>(),
        ) {
            let p = RetryPolicy { max_retries, backoff_base_seconds: base, backoff_cap_seconds: cap, jitter };
            prop_assert_eq!(
                p.decide(a, FailureKind::Permanent, unit),
                RetryDecision::GiveUp { reason: GiveUpReason::Permanent }
            );
        }

        #[test]
        fn prop_never_panics_on_any_policy(
            max_retries in any::<u32>(),
            base in any::<f64>(),
            cap in any::<f64>(),
            jitter in any::<f64>(),
            a in any::<u32>(),
            unit in any::<f64>(),
        ) {
            let p = RetryPolicy { max_retries, backoff_base_seconds: base, backoff_cap_seconds: cap, jitter };
            let d = p.backoff_delay(a, unit);
            prop_assert!(d >= Duration::zero());
            prop_assert!(secs(d) <= MAX_CAP_SECONDS);
            let _ = p.decide(a, FailureKind::Retryable, unit);
            let _ = p.validate();
        }

        #[test]
        fn prop_overrides_roundtrip(p in valid_policy(), q in valid_policy()) {
            // Empty overrides keep the policy.
            prop_assert_eq!(p.with_overrides(&RetryOverrides::default()), Ok(p.clone()));
            // Full overrides replace it entirely.
            let full = RetryOverrides {
                max_retries: Some(q.max_retries),
                backoff_base_seconds: Some(q.backoff_base_seconds),
                backoff_cap_seconds: Some(q.backoff_cap_seconds),
                jitter: Some(q.jitter),
            };
            prop_assert!(!full.is_empty());
            let applied = p.with_overrides(&full);
            prop_assert_eq!(&applied, &Ok(q.clone()));
            // JSON keeps every field. serde_json (without its `float_roundtrip`
            // feature) may be off by one ulp when parsing floats, so compare
            // floats with a relative tolerance.
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(1.0);
            let json = serde_json::to_string(&full).unwrap();
            let back: RetryOverrides = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back.max_retries, full.max_retries);
            prop_assert!(close(back.backoff_base_seconds.unwrap(), q.backoff_base_seconds));
            prop_assert!(close(back.backoff_cap_seconds.unwrap(), q.backoff_cap_seconds));
            prop_assert!(close(back.jitter.unwrap(), q.jitter));
            let pj = serde_json::to_string(&q).unwrap();
            let qb: RetryPolicy = serde_json::from_str(&pj).unwrap();
            prop_assert_eq!(qb.max_retries, q.max_retries);
            prop_assert!(close(qb.backoff_base_seconds, q.backoff_base_seconds));
            prop_assert!(close(qb.backoff_cap_seconds, q.backoff_cap_seconds));
            prop_assert!(close(qb.jitter, q.jitter));
            prop_assert_eq!(qb.validate(), Ok(()));
        }

        #[test]
        fn prop_overrides_result_is_valid_or_error(
            p in valid_policy(),
            max_retries in prop::option::of(any::<u32>()),
            base in prop::option::of(any::<f64>()),
            cap in prop::option::of(any::<f64>()),
            jitter in prop::option::of(any::<f64>()),
        ) {
            let o = RetryOverrides { max_retries, backoff_base_seconds: base, backoff_cap_seconds: cap, jitter };
            match p.with_overrides(&o) {
                Ok(r) => {
                    prop_assert_eq!(r.validate(), Ok(()));
                    prop_assert_eq!(r.max_retries, max_retries.unwrap_or(p.max_retries));
                    prop_assert_eq!(r.jitter.to_bits(), jitter.unwrap_or(p.jitter).to_bits());
                }
                Err(_) => {
                    let merged = RetryPolicy {
                        max_retries: max_retries.unwrap_or(p.max_retries),
                        backoff_base_seconds: base.unwrap_or(p.backoff_base_seconds),
                        backoff_cap_seconds: cap.unwrap_or(p.backoff_cap_seconds),
                        jitter: jitter.unwrap_or(p.jitter),
                    };
                    prop_assert!(merged.validate().is_err());
                }
            }
        }

        #[test]
        fn prop_env_roundtrip(p in valid_policy()) {
            let vars = [
                ("ORCH_MAX_RETRIES".to_string(), p.max_retries.to_string()),
                ("ORCH_BACKOFF_BASE_SECONDS".to_string(), p.backoff_base_seconds.to_string()),
                ("ORCH_BACKOFF_CAP_SECONDS".to_string(), p.backoff_cap_seconds.to_string()),
                ("ORCH_BACKOFF_JITTER".to_string(), p.jitter.to_string()),
            ];
            let map: HashMap<String, String> = vars.into_iter().collect();
            let got = RetryPolicy::from_lookup(|k| map.get(k).cloned());
            prop_assert_eq!(got, Ok(p));
        }
    }
}
