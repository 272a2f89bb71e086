//! Tool recipes: YAML documents attached to a work item that tell an agent
//! what to run, and the step shape shared with the LLM planner (JSON).
//!
//! * [`parse_recipe`] parses and validates a recipe document and reports
//!   every problem with its path (`steps[1].timeout`) and, whenever it can be
//!   determined, its 1-based line and column in the source.
//! * [`validate_recipe`] checks the semantic rules on an already built
//!   [`RecipeSpec`].
//! * [`parse_plan_json`] extracts the JSON array of steps from a planner
//!   answer, tolerating surrounding prose and Markdown fences.
//!
//! A recipe looks like this:
//!
//! ```yaml
//! name: build-and-test
//! description: Build it
//! inputs:
//!   - name: GITHUB_TOKEN
//!     prompt: "Token to push"
//!     kind: secret
//! steps:
//!   - echo hello
//!   - name: test
//!     run: cargo test
//!     env: {RUST_LOG: debug}
//!     timeout: 600
//!     cwd: sub/dir
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};
use serde::{Deserialize, Serialize};

/// Maximum size, in bytes, of a recipe document or of a planner answer.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Maximum length of a recipe name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Maximum number of steps in a recipe or a plan.
pub const MAX_STEPS: usize = 1000;
/// Maximum timeout of a step, in seconds (one day).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// At most this many problems are reported; a final entry says how many
/// more were found.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// How many `[` positions [`parse_plan_json`] tries as the start of a JSON
/// array before giving up (bounds the work on adversarial input).
const MAX_PLAN_CANDIDATES: usize = 256;

// ---------------------------------------------------------------------------
// Data model
// ---------------------------------------------------------------------------

/// A tool recipe: a named list of steps plus the inputs they need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a recipe mapping")]
pub struct RecipeSpec {
    /// Name of the recipe (1..=200 characters, not blank).
    pub name: String,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Inputs; those missing at run time become questions to a human.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<RecipeInput>,
    /// The commands to run, in order (1..=1000).
    pub steps: Vec<StepSpec>,
}

/// A value a recipe needs at run time (exposed to steps as an environment
/// variable named after it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an input mapping")]
pub struct RecipeInput {
    /// Name, environment-variable-like (`[A-Za-z_][A-Za-z0-9_]*`), unique
    /// within the recipe.
    pub name: String,
    /// Question shown to the human; defaults to the name (see
    /// [`RecipeInput::display_prompt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Kind of value.
    #[serde(default)]
    pub kind: InputKind,
    /// Allowed values; non-empty iff `kind` is [`InputKind::Choice`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// Default value; must be one of `choices` for a choice, forbidden for a
    /// secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Whether a value must be provided (default `true`).
    #[serde(default = "default_required")]
    pub required: bool,
}

fn default_required() -> bool {
    true
}

impl RecipeInput {
    /// The text to show when asking for this input: the prompt, or the name
    /// when there is none.
    pub fn display_prompt(&self) -> &str {
        self.prompt.as_deref().unwrap_or(&self.name)
    }
}

/// Kind of a recipe input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// Free text.
    #[default]
    Text,
    /// A secret: never echoed, never defaulted.
    Secret,
    /// One of a fixed list of choices.
    Choice,
}

/// One command to run. Serializes as an object (skipping empty/`None`
/// fields); deserializes from a string (the command) or an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepSpec {
    /// Optional display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The shell command (not blank).
    pub run: String,
    /// Extra environment variables (names environment-variable-like).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Timeout in seconds (1..=86400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Working directory relative to the workspace (no leading `/`, no `..`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl StepSpec {
    /// A step that just runs `run`, with no name, env, timeout or cwd.
    pub fn command(run: impl Into<String>) -> StepSpec {
        StepSpec {
            name: None,
            run: run.into(),
            env: BTreeMap::new(),
            timeout: None,
            cwd: None,
        }
    }

    /// Validates the run/env/timeout/cwd rules; errors use the given path
    /// prefix (e.g. `"steps[2]"` gives `"steps[2].timeout"`). Errors carry
    /// no line/column.
    pub fn validate(&self, path: &str) -> Vec<RecipeError> {
        let mut issues = Vec::new();
        step_issues(self, &[], &mut issues);
        issues
            .into_iter()
            .map(|issue| RecipeError {
                path: render_path(path, &issue.segs),
                line: None,
                column: None,
                message: issue.message,
            })
            .collect()
    }
}

/// The object form of a step, as written by users and planners.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a step mapping")]
struct StepObject {
    #[serde(default)]
    name: Option<String>,
    run: String,
    #[serde(default, deserialize_with = "deserialize_env")]
    env: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    cwd: Option<String>,
}

impl From<StepObject> for StepSpec {
    fn from(o: StepObject) -> StepSpec {
        StepSpec {
            name: o.name,
            run: o.run,
            env: o.env,
            timeout: o.timeout,
            cwd: o.cwd,
        }
    }
}

impl<'de> Deserialize<'de> for StepSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<StepSpec, D::Error> {
        deserializer.deserialize_any(StepVisitor)
    }
}

struct StepVisitor;

impl<'de> Visitor<'de> for StepVisitor {
    type Value = StepSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a command string or a step mapping")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StepSpec, E> {
        Ok(StepSpec::command(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<StepSpec, E> {
        Ok(StepSpec::command(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StepSpec, A::Error> {
        StepObject::deserialize(de::value::MapAccessDeserializer::new(map)).map(StepSpec::from)
    }
}

/// `env`: a map of strings that rejects duplicate names (at the duplicate
/// key) and accepts `null` as empty.
fn deserialize_env<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    deserializer.deserialize_any(EnvVisitor)
}

struct EnvVisitor;

impl<'de> Visitor<'de> for EnvVisitor {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of environment variable names to strings")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key_seed(EnvKeySeed { seen: &out })? {
            let value: String = map.next_value()?;
            out.insert(key, value);
        }
        Ok(out)
    }
}

struct EnvKeySeed<'a> {
    seen: &'a BTreeMap<String, String>,
}

impl<'de> DeserializeSeed<'de> for EnvKeySeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for EnvKeySeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an environment variable name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if self.seen.contains_key(v) {
            Err(E::custom(format!("duplicate environment variable `{v}`")))
        } else {
            Ok(v.to_owned())
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeError {
    /// Path of the offending field, e.g. `"steps[1].timeout"`,
    /// `"inputs[0].choices"`, `"steps[0].env[\"A.B\"]"`; `""` for the whole
    /// document.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl RecipeError {
    fn document(message: impl Into<String>) -> RecipeError {
        RecipeError {
            path: String::new(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for RecipeError {
    /// `path (line L, column C): message`; `<document>` stands for the empty
    /// path and the parenthesis is left out when the location is unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "<document>"
        } else {
            self.path.as_str()
        };
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "{path} (line {line}, column {column}): {}", self.message)
            }
            (Some(line), None) => write!(f, "{path} (line {line}): {}", self.message),
            _ => write!(f, "{path}: {}", self.message),
        }
    }
}

/// All problems found (at least one). Display lists them
/// `path (line L, column C): message`, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", join_errors(.0))]
pub struct RecipeErrors(pub Vec<RecipeError>);

fn join_errors(errors: &[RecipeError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl RecipeErrors {
    fn one(error: RecipeError) -> RecipeErrors {
        RecipeErrors(vec![error])
    }
}

// ---------------------------------------------------------------------------
// Paths and semantic validation
// ---------------------------------------------------------------------------

/// One step of a structured path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_owned())
}

/// A semantic problem at a structured path.
#[derive(Debug)]
struct Issue {
    segs: Vec<Seg>,
    message: String,
}

fn push_issue(out: &mut Vec<Issue>, base: &[Seg], tail: &[Seg], message: String) {
    let mut segs = base.to_vec();
    segs.extend_from_slice(tail);
    out.push(Issue { segs, message });
}

/// Keys that can be written after a `.` without ambiguity.
fn is_plain_key(k: &str) -> bool {
    !k.is_empty()
        && k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn render_path(prefix: &str, segs: &[Seg]) -> String {
    let mut s = prefix.to_owned();
    for seg in segs {
        match seg {
            Seg::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
            Seg::Key(k) if is_plain_key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Key(k) => {
                s.push('[');
                s.push_str(&serde_json::to_string(k).unwrap_or_default());
                s.push(']');
            }
        }
    }
    s
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn step_issues(step: &StepSpec, base: &[Seg], out: &mut Vec<Issue>) {
    if step.run.trim().is_empty() {
        push_issue(out, base, &[key("run")], "run must not be blank".into());
    }
    for name in step.env.keys() {
        if !is_env_name(name) {
            push_issue(
                out,
                base,
                &[key("env"), key(name)],
                format!(
                    "invalid environment variable name {name:?}: expected [A-Za-z_][A-Za-z0-9_]*"
                ),
            );
        }
    }
    if let Some(timeout) = step.timeout {
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout) {
            push_issue(
                out,
                base,
                &[key("timeout")],
                format!("timeout must be between 1 and {MAX_TIMEOUT_SECS} seconds (got {timeout})"),
            );
        }
    }
    if let Some(cwd) = &step.cwd {
        if let Some(problem) = cwd_problem(cwd) {
            push_issue(out, base, &[key("cwd")], problem);
        }
    }
}

fn cwd_problem(cwd: &str) -> Option<String> {
    if cwd.trim().is_empty() {
        return Some("cwd must not be empty".into());
    }
    if cwd.contains('\0') {
        return Some("cwd must not contain NUL characters".into());
    }
    let bytes = cwd.as_bytes();
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if cwd.starts_with('/') || cwd.starts_with('\\') || drive {
        return Some(format!(
            "cwd must be a relative path inside the workspace (got {cwd:?})"
        ));
    }
    if cwd.split(['/', '\\']).any(|part| part == "..") {
        return Some(format!(
            "cwd must not contain `..` components (got {cwd:?})"
        ));
    }
    None
}

fn recipe_issues(spec: &RecipeSpec) -> Vec<Issue> {
    let mut out = Vec::new();
    if spec.name.trim().is_empty() {
        push_issue(&mut out, &[], &[key("name")], "name must not be blank".into());
    } else {
        let chars = spec.name.chars().count();
        if chars > MAX_NAME_CHARS {
            push_issue(
                &mut out,
                &[],
                &[key("name")],
                format!("name must be at most {MAX_NAME_CHARS} characters (got {chars})"),
            );
        }
    }

    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        let base = [key("inputs"), Seg::Index(i)];
        if !is_env_name(&input.name) {
            push_issue(
                &mut out,
                &base,
                &[key("name")],
                format!(
                    "invalid input name {:?}: expected [A-Za-z_][A-Za-z0-9_]*",
                    input.name
                ),
            );
        } else if let Some(first) = seen.get(input.name.as_str()) {
            push_issue(
                &mut out,
                &base,
                &[key("name")],
                format!(
                    "duplicate input name `{}` (already defined by inputs[{first}])",
                    input.name
                ),
            );
        } else {
            seen.insert(&input.name, i);
        }
        match input.kind {
            InputKind::Choice => {
                if input.choices.is_empty() {
                    push_issue(
                        &mut out,
                        &base,
                        &[key("choices")],
                        "an input of kind `choice` needs a non-empty list of choices".into(),
                    );
                } else if let Some(default) = &input.default {
                    if !input.choices.contains(default) {
                        push_issue(
                            &mut out,
                            &base,
                            &[key("default")],
                            format!("default {default:?} is not one of the choices"),
                        );
                    }
                }
            }
            InputKind::Text | InputKind::Secret => {
                if !input.choices.is_empty() {
                    push_issue(
                        &mut out,
                        &base,
                        &[key("choices")],
                        "choices are only allowed for inputs of kind `choice`".into(),
                    );
                }
                if input.kind == InputKind::Secret && input.default.is_some() {
                    push_issue(
                        &mut out,
                        &base,
                        &[key("default")],
                        "a secret input cannot have a default".into(),
                    );
                }
            }
        }
    }

    if spec.steps.is_empty() {
        push_issue(
            &mut out,
            &[],
            &[key("steps")],
            "a recipe needs at least one step".into(),
        );
    } else if spec.steps.len() > MAX_STEPS {
        push_issue(
            &mut out,
            &[],
            &[key("steps")],
            format!(
                "a recipe can have at most {MAX_STEPS} steps (got {})",
                spec.steps.len()
            ),
        );
    }
    for (i, step) in spec.steps.iter().enumerate() {
        step_issues(step, &[key("steps"), Seg::Index(i)], &mut out);
    }
    out
}

/// Caps the list at [`MAX_REPORTED_ERRORS`], adding a summary entry.
fn finish(mut errors: Vec<RecipeError>) -> RecipeErrors {
    if errors.len() > MAX_REPORTED_ERRORS {
        let more = errors.len() - MAX_REPORTED_ERRORS;
        errors.truncate(MAX_REPORTED_ERRORS);
        errors.push(RecipeError::document(format!(
            "{more} more problem(s) not shown"
        )));
    }
    RecipeErrors(errors)
}

/// Validates an already-deserialized spec (semantic rules only; no lines).
pub fn validate_recipe(spec: &RecipeSpec) -> Result<(), RecipeErrors> {
    let issues = recipe_issues(spec);
    if issues.is_empty() {
        return Ok(());
    }
    Err(finish(
        issues
            .into_iter()
            .map(|issue| RecipeError {
                path: render_path("", &issue.segs),
                line: None,
                column: None,
                message: issue.message,
            })
            .collect(),
    ))
}

// ---------------------------------------------------------------------------
// YAML parsing
// ---------------------------------------------------------------------------

/// Parses and validates a recipe.
///
/// * Syntax errors give line/column.
/// * Schema errors (wrong type, missing field, unknown field) give the field
///   path and line/column.
/// * Semantic errors give the path and the line/column of the offending
///   node: the key of the field when it is present, otherwise the enclosing
///   node (e.g. the mapping of an input whose `choices` are missing).
///
/// All semantic errors are reported at once (up to
/// [`MAX_REPORTED_ERRORS`]); for syntax and schema errors, the first one.
/// Documents larger than [`MAX_DOCUMENT_BYTES`] are rejected.
pub fn parse_recipe(yaml: &str) -> Result<RecipeSpec, RecipeErrors> {
    if yaml.len() > MAX_DOCUMENT_BYTES {
        return Err(RecipeErrors::one(RecipeError::document(format!(
            "the recipe is too large: {} bytes (maximum {MAX_DOCUMENT_BYTES} bytes)",
            yaml.len()
        ))));
    }
    // Syntax first, so that a truncated document reports the syntax error
    // rather than a consequence of it (such as a missing field).
    match serde_yaml_ng::from_str::<Option<IgnoredAny>>(yaml) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(RecipeErrors::one(RecipeError::document(
                "the recipe document is empty",
            )))
        }
        Err(e) if yaml.trim().is_empty() || is_end_of_stream(&e) => {
            return Err(RecipeErrors::one(RecipeError::document(
                "the recipe document is empty",
            )))
        }
        Err(e) => return Err(RecipeErrors::one(syntax_error(&e))),
    }

    let spec: RecipeSpec =
        match serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(yaml)) {
            Ok(spec) => spec,
            Err(e) => return Err(RecipeErrors::one(yaml_schema_error(&e))),
        };

    let mut issues = recipe_issues(&spec);
    if issues.is_empty() {
        return Ok(spec);
    }
    let extra = issues.len().saturating_sub(MAX_REPORTED_ERRORS);
    issues.truncate(MAX_REPORTED_ERRORS);
    let locations = locate(yaml, &issues);
    let mut errors: Vec<RecipeError> = issues
        .into_iter()
        .zip(locations)
        .map(|(issue, loc)| RecipeError {
            path: render_path("", &issue.segs),
            line: loc.map(|l| l.line),
            column: loc.map(|l| l.column),
            message: issue.message,
        })
        .collect();
    if extra > 0 {
        errors.push(RecipeError::document(format!(
            "{extra} more problem(s) not shown"
        )));
    }
    Err(RecipeErrors(errors))
}

fn is_end_of_stream(e: &serde_yaml_ng::Error) -> bool {
    e.location().is_none() && e.to_string() == "EOF while parsing a value"
}

/// Removes the first occurrence of `needle` from `s`.
fn remove_first(s: &str, needle: &str) -> String {
    match s.find(needle) {
        Some(at) => format!("{}{}", &s[..at], &s[at + needle.len()..]),
        None => s.to_owned(),
    }
}

fn syntax_error(e: &serde_yaml_ng::Error) -> RecipeError {
    let loc = e.location();
    let mut message = e.to_string();
    if let Some(l) = &loc {
        message = remove_first(
            &message,
            &format!(" at line {} column {}", l.line(), l.column()),
        );
    }
    RecipeError {
        path: String::new(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        message: format!("invalid YAML: {message}"),
    }
}

fn segs_from(path: &serde_path_to_error::Path) -> Vec<Seg> {
    path.iter()
        .filter_map(|seg| match seg {
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            _ => None,
        })
        .collect()
}

/// serde_yaml_ng prefixes messages with its own rendering of the path.
fn yaml_style_path(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
        }
    }
    s
}

/// For "unknown field `x`", "missing field `x`" and "duplicate field `x`",
/// the field the message is about.
fn field_in_message(message: &str) -> Option<&str> {
    ["unknown field `", "missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next())
}

/// Builds the path of a schema error, pointing at the field the message is
/// about when there is one.
fn schema_path(mut segs: Vec<Seg>, message: &str) -> String {
    if let Some(field) = field_in_message(message) {
        if segs.last() != Some(&Seg::Key(field.to_owned())) {
            segs.push(Seg::Key(field.to_owned()));
        }
    }
    render_path("", &segs)
}

fn yaml_schema_error(e: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> RecipeError {
    let segs = segs_from(e.path());
    let inner = e.inner();
    let loc = inner.location();
    let mut message = inner.to_string();
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
    }
    let prefix = format!("{}: ", yaml_style_path(&segs));
    if let Some(stripped) = message.strip_prefix(&prefix) {
        message = stripped.to_owned();
    }
    RecipeError {
        path: schema_path(segs, &message),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        message,
    }
}

// ---------------------------------------------------------------------------
// Locating semantic issues in the source
// ---------------------------------------------------------------------------
//
// serde_yaml_ng attaches the position of the current node to any custom
// error raised while visiting it, and hands the error back to the caller of
// `deserialize_*` before anything else happens. The locator walks the
// document along the paths of the issues; at every scalar it needs (keys on
// the way, and scalar leaves) it raises a sentinel error, reads the position
// back from it and carries on. Scalars are consumed before the visitor runs,
// so swallowing the error leaves the deserializer in a consistent state;
// collections are walked normally and located by their first key (or by the
// key that leads to them).

const PROBE: &str = "\u{1}recipe-locator-probe\u{1}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    line: usize,
    column: usize,
}

/// Reads the position serde_yaml_ng appended to a sentinel error
/// (`"...PROBE at line L column C"`, or nothing at line 1 column 1).
fn probe_loc(display: &str) -> Option<Loc> {
    let at = display.find(PROBE)?;
    let rest = &display[at + PROBE.len()..];
    if rest.is_empty() {
        return Some(Loc { line: 1, column: 1 });
    }
    let rest = rest.strip_prefix(" at line ")?;
    let (line, column) = rest.split_once(" column ")?;
    Some(Loc {
        line: line.parse().ok()?,
        column: column.trim().parse().ok()?,
    })
}

fn is_probe<E: fmt::Display>(e: &E) -> Option<String> {
    let text = e.to_string();
    text.contains(PROBE).then_some(text)
}

/// An issue still to be located, with the part of its path below the
/// current node.
struct Want<'w> {
    idx: usize,
    rest: &'w [Seg],
}

fn fill(results: &mut [Option<Loc>], wants: &[Want<'_>], loc: Option<Loc>) {
    if let Some(loc) = loc {
        for want in wants {
            if let Some(slot) = results.get_mut(want.idx) {
                slot.get_or_insert(loc);
            }
        }
    }
}

/// Positions of the issues' nodes (`None` where unknown).
fn locate(yaml: &str, issues: &[Issue]) -> Vec<Option<Loc>> {
    let walk = || {
        let mut results = vec![None; issues.len()];
        let wants = issues
            .iter()
            .enumerate()
            .map(|(idx, issue)| Want {
                idx,
                rest: &issue.segs,
            })
            .collect();
        let seed = NodeSeed {
            wants,
            here: None,
            fallback: None,
            results: &mut results,
        };
        // A failure leaves the positions found so far.
        let _ = seed.deserialize(serde_yaml_ng::Deserializer::from_str(yaml));
        results
    };
    // Locations are a nicety: should the walk ever hit an internal panic of
    // the YAML library, report the errors without them.
    panic::catch_unwind(AssertUnwindSafe(walk)).unwrap_or_else(|_| vec![None; issues.len()])
}

struct NodeSeed<'w, 'r> {
    wants: Vec<Want<'w>>,
    /// Position of the key leading to this node, if it is a mapping value.
    here: Option<Loc>,
    /// Position of the closest located ancestor.
    fallback: Option<Loc>,
    results: &'r mut [Option<Loc>],
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let NodeSeed {
            wants,
            here,
            fallback,
            results,
        } = self;
        let outcome = deserializer.deserialize_any(NodeVisitor {
            wants: &wants,
            here,
            fallback,
            results: &mut *results,
        });
        match outcome {
            Ok(()) => Ok(()),
            Err(e) => match is_probe(&e) {
                // A scalar (or tagged) node: everything wanted here or below
                // resolves to it.
                Some(text) => {
                    fill(results, &wants, here.or_else(|| probe_loc(&text)).or(fallback));
                    Ok(())
                }
                None => Err(e),
            },
        }
    }
}

struct NodeVisitor<'a, 'w, 'r> {
    wants: &'a [Want<'w>],
    here: Option<Loc>,
    fallback: Option<Loc>,
    results: &'r mut [Option<Loc>],
}

macro_rules! probe_scalars {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, _v: $ty) -> Result<Self::Value, E> {
                Err(E::custom(PROBE))
            }
        )*
    };
}

impl<'de> Visitor<'de> for NodeVisitor<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    probe_scalars!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_i128(i128),
        visit_u128(u128),
        visit_f64(f64),
        visit_str(&str),
        visit_bytes(&[u8]),
    );

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node: consume it entirely, then locate it.
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<IgnoredAny>()?;
        Err(de::Error::custom(PROBE))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let node_loc = self.here.or(self.fallback);
        let mut index = 0usize;
        loop {
            let sub: Vec<Want<'_>> = self
                .wants
                .iter()
                .filter(|w| w.rest.first() == Some(&Seg::Index(index)))
                .map(|w| Want {
                    idx: w.idx,
                    rest: &w.rest[1..],
                })
                .collect();
            let more = if sub.is_empty() {
                seq.next_element::<IgnoredAny>()?.is_some()
            } else {
                seq.next_element_seed(NodeSeed {
                    wants: sub,
                    here: None,
                    fallback: node_loc,
                    results: &mut *self.results,
                })?
                .is_some()
            };
            if !more {
                break;
            }
            index += 1;
        }
        fill(self.results, self.wants, node_loc);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut node_loc = self.here;
        loop {
            let mut key_text: Option<String> = None;
            let Some(key_loc) = map.next_key_seed(KeySeed {
                out: &mut key_text,
            })?
            else {
                break;
            };
            if node_loc.is_none() {
                node_loc = key_loc;
            }
            let mut deeper = Vec::new();
            if let Some(k) = &key_text {
                for want in self.wants {
                    let Some((Seg::Key(first), rest)) = want.rest.split_first() else {
                        continue;
                    };
                    if first != k {
                        continue;
                    }
                    if rest.is_empty() {
                        // Issues about a field point at its key.
                        if let (Some(slot), Some(loc)) =
                            (self.results.get_mut(want.idx), key_loc.or(node_loc))
                        {
                            slot.get_or_insert(loc);
                        }
                    } else {
                        deeper.push(Want {
                            idx: want.idx,
                            rest,
                        });
                    }
                }
            }
            if deeper.is_empty() {
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value_seed(NodeSeed {
                    wants: deeper,
                    here: key_loc,
                    fallback: node_loc.or(self.fallback),
                    results: &mut *self.results,
                })?;
            }
        }
        // Whatever was not found below (missing fields...) points here.
        fill(self.results, self.wants, node_loc.or(self.fallback));
        Ok(())
    }
}

/// Reads a mapping key as a string and reports its position.
struct KeySeed<'k> {
    out: &'k mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<Loc>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<Loc>, D::Error> {
        match deserializer.deserialize_str(KeyVisitor { out: self.out }) {
            Ok(()) => Ok(None),
            Err(e) => match is_probe(&e) {
                Some(text) => Ok(probe_loc(&text)),
                None => Err(e),
            },
        }
    }
}

struct KeyVisitor<'k> {
    out: &'k mut Option<String>,
}

impl<'de> Visitor<'de> for KeyVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        *self.out = Some(v.to_owned());
        Err(E::custom(PROBE))
    }
}

// ---------------------------------------------------------------------------
// Planner answers (JSON)
// ---------------------------------------------------------------------------

/// Parses an LLM planner answer: a JSON array of steps (strings or objects).
///
/// Surrounding prose and Markdown fences are tolerated: the answer is
/// scanned for top-level JSON arrays and the first one that is a valid,
/// non-empty list of steps wins. Otherwise the problems of the most
/// plausible candidate (the longest array) are returned, with paths relative
/// to the array (`"[1].timeout"`) and, for JSON and schema errors, the
/// line/column in `text`. An empty array, no array at all, or an answer
/// larger than [`MAX_DOCUMENT_BYTES`] is an error too.
pub fn parse_plan_json(text: &str) -> Result<Vec<StepSpec>, RecipeErrors> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(RecipeErrors::one(RecipeError::document(format!(
            "the planner answer is too large: {} bytes (maximum {MAX_DOCUMENT_BYTES} bytes)",
            text.len()
        ))));
    }

    // Candidate arrays: every `[` not inside an array already found.
    let mut arrays: Vec<(usize, usize)> = Vec::new();
    let mut first_syntax: Option<RecipeError> = None;
    let mut pos = 0usize;
    for _ in 0..MAX_PLAN_CANDIDATES {
        let Some(start) = text.get(pos..).and_then(|t| t.find('[')).map(|o| pos + o) else {
            break;
        };
        let Some(slice) = text.get(start..) else {
            break;
        };
        let mut stream = serde_json::Deserializer::from_str(slice).into_iter::<IgnoredAny>();
        match stream.next() {
            Some(Ok(IgnoredAny)) => {
                let end = start + stream.byte_offset();
                arrays.push((start, end));
                pos = end;
            }
            Some(Err(e)) => {
                if first_syntax.is_none() {
                    first_syntax = Some(json_error(text, start, &e, Vec::new()));
                }
                pos = start + 1;
            }
            None => break,
        }
    }

    let mut best_failure: Option<(usize, Vec<RecipeError>)> = None;
    let mut saw_empty = false;
    for (start, end) in arrays {
        let slice = &text[start..end];
        let mut de = serde_json::Deserializer::from_str(slice);
        let errors = match serde_path_to_error::deserialize::<_, Vec<StepSpec>>(&mut de) {
            Ok(steps) if steps.is_empty() => {
                saw_empty = true;
                continue;
            }
            Ok(steps) => {
                let errors = plan_issues(&steps);
                if errors.is_empty() {
                    return Ok(steps);
                }
                errors
            }
            Err(e) => {
                let segs = segs_from(e.path());
                vec![json_error(text, start, e.inner(), segs)]
            }
        };
        let len = end - start;
        if best_failure.as_ref().is_none_or(|(best, _)| len > *best) {
            best_failure = Some((len, errors));
        }
    }

    if let Some((_, errors)) = best_failure {
        return Err(finish(errors));
    }
    if saw_empty {
        return Err(RecipeErrors::one(RecipeError::document(
            "the plan contains no steps",
        )));
    }
    Err(RecipeErrors::one(match first_syntax {
        Some(mut e) => {
            e.message = format!("no valid JSON array found in the planner answer: {}", e.message);
            e
        }
        None => RecipeError::document("no JSON array found in the planner answer"),
    }))
}

fn plan_issues(steps: &[StepSpec]) -> Vec<RecipeError> {
    let mut errors = Vec::new();
    if steps.len() > MAX_STEPS {
        errors.push(RecipeError::document(format!(
            "a plan can have at most {MAX_STEPS} steps (got {})",
            steps.len()
        )));
    }
    for (i, step) in steps.iter().enumerate() {
        errors.extend(step.validate(&format!("[{i}]")));
    }
    errors
}

/// 1-based line and column of byte offset `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, offset - line_start + 1)
}

/// A serde_json error on `text[start..]`, positioned in `text`.
fn json_error(text: &str, start: usize, e: &serde_json::Error, segs: Vec<Seg>) -> RecipeError {
    let mut message = e.to_string();
    let (mut line, mut column) = (None, None);
    if e.line() != 0 {
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
        let (start_line, start_col) = line_col(text, start);
        if e.line() == 1 {
            line = Some(start_line);
            column = Some(start_col + e.column().saturating_sub(1));
        } else {
            line = Some(start_line + e.line() - 1);
            column = Some(e.column());
        }
    }
    RecipeError {
        path: schema_path(segs, &message),
        line,
        column,
        message,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(yaml: &str) -> Vec<RecipeError> {
        match parse_recipe(yaml) {
            Ok(spec) => panic!("expected errors, got {spec:?}"),
            Err(RecipeErrors(errors)) => {
                assert!(!errors.is_empty());
                errors
            }
        }
    }

    fn one_err(yaml: &str) -> RecipeError {
        let errors = errs(yaml);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors.into_iter().next().unwrap()
    }

    #[test]
    fn debug_print() {
        for y in [
            "name: x\nsteps:\n  - run: a\n    colour: red\n",
            "name: x\nsteps:\n  - run: a\n    timeout: abc\n",
            "name: x\nsteps:\n  - name: a\n",
            "name: x\nbogus: 1\nsteps: [a]\n",
            "[]",
            "name: x\nsteps: [a]\ninputs:\n  - name: A\n    kind: bogus\n",
            "name: x\nsteps:\n  - run: a\n    env: {A: 1, A: 2}\n",
            "name: x\nsteps: [a]\nname: y\n",
            "name: [x\n",
            "name: x\n\tsteps: []\n",
            "",
            "# c\n",
            "~",
            "a: 1\n---\nb: 2\n",
        ] {
            eprintln!("{y:?} => {:#?}", parse_recipe(y));
        }
    }
}
