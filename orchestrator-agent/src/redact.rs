//! Redaction of secret answers from everything the agent writes (logs, step events).

use orchestrator_core::agent::AnswerValue;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// What a secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Replaces every occurrence of known secret values with [`REDACTED`].
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor").field("secrets", &self.secrets.len()).finish()
    }
}

impl Redactor {
    /// A redactor for these secret values (empty values are ignored; a multi-line secret is also
    /// redacted line by line, since output is logged one line at a time).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut v: Vec<String> = Vec::new();
        for s in secrets {
            let lines: Vec<String> =
                s.lines().map(|l| l.trim().to_string()).filter(|l| l.len() >= 4 && l.as_str() != s).collect();
            if !s.is_empty() {
                v.push(s);
            }
            v.extend(lines);
        }
        v.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        v.dedup();
        Redactor { secrets: v }
    }

    /// A redactor for the secret answers of an assignment.
    pub fn from_answers(answers: &BTreeMap<String, AnswerValue>) -> Self {
        Self::new(answers.values().filter(|a| a.secret).map(|a| a.value.clone()))
    }

    /// Whether there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `s` with the secrets replaced.
    pub fn redact<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if !self.secrets.iter().any(|x| s.contains(x.as_str())) {
            return Cow::Borrowed(s);
        }
        let mut out = s.to_string();
        for x in &self.secrets {
            if out.contains(x.as_str()) {
                out = out.replace(x.as_str(), REDACTED);
            }
        }
        Cow::Owned(out)
    }

    /// Redacts every string (and object key) inside a JSON value.
    pub fn redact_value(&self, v: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match v {
            serde_json::Value::String(s) => {
                if let Cow::Owned(r) = self.redact(s) {
                    *s = r;
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| self.redact_value(x)),
            serde_json::Value::Object(m) => {
                let old = std::mem::take(m);
                for (k, mut x) in old {
                    self.redact_value(&mut x);
                    m.insert(self.redact(&k).into_owned(), x);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_strings_and_json() {
        let r = Redactor::new(["hunter2".to_string(), String::new(), "line-one\nline-two".to_string()]);
        assert_eq!(r.redact("pw=hunter2!"), "pw=[REDACTED]!");
        assert_eq!(r.redact("line-two"), "[REDACTED]");
        assert!(matches!(r.redact("nothing"), Cow::Borrowed(_)));
        let mut v = serde_json::json!({"a": ["x hunter2"], "hunter2": 1});
        r.redact_value(&mut v);
        assert_eq!(v, serde_json::json!({"a": ["x [REDACTED]"], "[REDACTED]": 1}));
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
