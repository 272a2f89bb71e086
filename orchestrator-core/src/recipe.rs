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
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use serde::{Deserialize, Serialize};

/// Maximum size, in bytes, of a recipe document or of a planner answer.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Maximum number of bytes of text (scalars, keys included) in a recipe once
/// its aliases are expanded: a document without aliases never has more text
/// than its own size, so this is the same bound as [`MAX_DOCUMENT_BYTES`].
/// Each use of an alias (`*name`) repeats the whole anchored node, so a small
/// document could otherwise expand to gigabytes.
pub const MAX_EXPANDED_BYTES: usize = MAX_DOCUMENT_BYTES;
/// Maximum number of nodes (scalars, sequences, mappings) in a recipe once its
/// aliases are expanded; no document within [`MAX_DOCUMENT_BYTES`] has this
/// many without aliases.
pub const MAX_EXPANDED_NODES: usize = MAX_DOCUMENT_BYTES;
/// Maximum length of a recipe name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Maximum number of steps in a recipe or a plan.
pub const MAX_STEPS: usize = 1000;
/// Maximum timeout of a step, in seconds (one day).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// At most this many problems are reported; a final entry says how many
/// more were found.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// Maximum nesting of `[`/`{`, counted naively over the whole document
/// (brackets inside scalars and comments count too). No valid recipe comes
/// close; the YAML parser's work grows with the square of the flow nesting,
/// so deeper documents are rejected before parsing.
const MAX_BRACKET_DEPTH: usize = 256;

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
/// fields); deserializes from a string (the command) or an object, in YAML
/// and in JSON. A bare YAML scalar that reads as something else than a
/// string (`true`, `42`, `~`) is rejected: quote it.
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
        StepSpec { name: None, run: run.into(), env: BTreeMap::new(), timeout: None, cwd: None }
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
        StepSpec { name: o.name, run: o.run, env: o.env, timeout: o.timeout, cwd: o.cwd }
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
fn deserialize_env<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
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
        RecipeError { path: String::new(), line: None, column: None, message: message.into() }
    }
}

impl fmt::Display for RecipeError {
    /// `path (line L, column C): message`; `<document>` stands for the empty
    /// path and the parenthesis is left out when the location is unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() { "<document>" } else { self.path.as_str() };
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
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
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
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
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

/// Maximum length of an environment variable name: a recipe input's name, a
/// step's `env` key or an info request's (question's) key, in bytes.
pub const MAX_ENV_NAME_LEN: usize = 128;

/// Whether `s` can be used as an environment variable name:
/// `^[A-Za-z_][A-Za-z0-9_]*$`, at most [`MAX_ENV_NAME_LEN`] bytes. Recipe
/// input names and question keys become variables of the steps' environment.
pub fn is_env_name(s: &str) -> bool {
    if s.len() > MAX_ENV_NAME_LEN {
        return false;
    }
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
                    "invalid environment variable name {name:?}: expected [A-Za-z_][A-Za-z0-9_]*, at most \
                     {MAX_ENV_NAME_LEN} characters"
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
        return Some(format!("cwd must be a relative path inside the workspace (got {cwd:?})"));
    }
    if cwd.split(['/', '\\']).any(|part| part == "..") {
        return Some(format!("cwd must not contain `..` components (got {cwd:?})"));
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
                    "invalid input name {:?}: expected [A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME_LEN} characters",
                    input.name
                ),
            );
        } else if let Some(first) = seen.get(input.name.as_str()) {
            push_issue(
                &mut out,
                &base,
                &[key("name")],
                format!("duplicate input name `{}` (already defined by inputs[{first}])", input.name),
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
                    push_issue(&mut out, &base, &[key("default")], "a secret input cannot have a default".into());
                }
            }
        }
    }

    if spec.steps.is_empty() {
        push_issue(&mut out, &[], &[key("steps")], "a recipe needs at least one step".into());
    } else if spec.steps.len() > MAX_STEPS {
        push_issue(
            &mut out,
            &[],
            &[key("steps")],
            format!("a recipe can have at most {MAX_STEPS} steps (got {})", spec.steps.len()),
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
        errors.push(RecipeError::document(format!("{more} more problem(s) not shown")));
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
    if let Some(error) = bracket_depth_error(yaml) {
        return Err(RecipeErrors::one(error));
    }
    // Syntax first, so that a truncated document reports the syntax error
    // rather than a consequence of it (such as a missing field).
    match serde_yaml_ng::from_str::<Option<IgnoredAny>>(yaml) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(RecipeErrors::one(RecipeError::document("the recipe document is empty"))),
        Err(e) if yaml.trim().is_empty() || is_end_of_stream(&e) => {
            return Err(RecipeErrors::one(RecipeError::document("the recipe document is empty")))
        }
        Err(e) => return Err(RecipeErrors::one(syntax_error(&e))),
    }

    // Aliases: bound the expanded size before building anything from it.
    let mut budget = ExpansionBudget::default();
    let seed = ExpansionSeed { budget: &mut budget };
    if let Err(e) = seed.deserialize(serde_yaml_ng::Deserializer::from_str(yaml)) {
        return Err(RecipeErrors::one(expansion_error(&e)));
    }

    let spec: RecipeSpec = match serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(yaml)) {
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
        errors.push(RecipeError::document(format!("{extra} more problem(s) not shown")));
    }
    Err(RecipeErrors(errors))
}

/// Rejects documents whose (naively counted) bracket nesting exceeds
/// [`MAX_BRACKET_DEPTH`], pointing at the first bracket too deep.
fn bracket_depth_error(yaml: &str) -> Option<RecipeError> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 1usize);
    for c in yaml.chars() {
        match c {
            '[' | '{' => {
                depth += 1;
                if depth > MAX_BRACKET_DEPTH {
                    return Some(RecipeError {
                        path: String::new(),
                        line: Some(line),
                        column: Some(column),
                        message: format!("brackets are nested too deeply (more than {MAX_BRACKET_DEPTH} levels)"),
                    });
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Alias expansion bound
// ---------------------------------------------------------------------------

/// What the document has used so far of [`MAX_EXPANDED_BYTES`] and
/// [`MAX_EXPANDED_NODES`], counting every node reached through an alias again.
#[derive(Default)]
struct ExpansionBudget {
    bytes: usize,
    nodes: usize,
}

/// Prefix of the error [`ExpansionSeed`] stops with (the YAML error adds the position).
const EXPANSION_MESSAGE: &str = "the recipe is too large once its aliases are expanded";

impl ExpansionBudget {
    fn node<E: de::Error>(&mut self, text_bytes: usize) -> Result<(), E> {
        self.nodes += 1;
        self.bytes = self.bytes.saturating_add(text_bytes);
        if self.bytes > MAX_EXPANDED_BYTES {
            return Err(E::custom(format!(
                "{EXPANSION_MESSAGE}: more than {MAX_EXPANDED_BYTES} bytes of text (each use of an alias \
                 `*name` repeats the anchored node)"
            )));
        }
        if self.nodes > MAX_EXPANDED_NODES {
            return Err(E::custom(format!(
                "{EXPANSION_MESSAGE}: more than {MAX_EXPANDED_NODES} nodes (each use of an alias `*name` \
                 repeats the anchored node)"
            )));
        }
        Ok(())
    }
}

/// Walks the whole document as the real deserialization will see it (aliases
/// expanded) without copying any text, and stops as soon as the expanded
/// document exceeds the budget: the work is bounded by the budget, not by the
/// expansion.
struct ExpansionSeed<'b> {
    budget: &'b mut ExpansionBudget,
}

impl<'de> DeserializeSeed<'de> for ExpansionSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ExpansionSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_i64<E: de::Error>(self, _v: i64) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_u64<E: de::Error>(self, _v: u64) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_i128<E: de::Error>(self, _v: i128) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_u128<E: de::Error>(self, _v: u128) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.budget.node(v.len())
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.budget.node(v.len())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.budget.node(0)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): the tag, then the value.
        let (tag, variant) = data.variant::<String>()?;
        self.budget.node(tag.len())?;
        variant.newtype_variant_seed(ExpansionSeed { budget: self.budget })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.budget.node(0)?;
        while seq.next_element_seed(ExpansionSeed { budget: &mut *self.budget })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.budget.node(0)?;
        while map.next_key_seed(ExpansionSeed { budget: &mut *self.budget })?.is_some() {
            map.next_value_seed(ExpansionSeed { budget: &mut *self.budget })?;
        }
        Ok(())
    }
}

/// The error of the expansion pass: over budget (with the position where the
/// budget ran out), or whatever the YAML parser said.
fn expansion_error(e: &serde_yaml_ng::Error) -> RecipeError {
    let mut error = syntax_error(e);
    if let Some(at) = error.message.find(EXPANSION_MESSAGE) {
        error.message = error.message[at..].to_string();
    }
    error
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
        message = remove_first(&message, &format!(" at line {} column {}", l.line(), l.column()));
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
    // The error may have been raised at an ancestor of the tracked path
    // (e.g. an unknown field is reported by its mapping).
    for n in (1..=segs.len()).rev() {
        let prefix = format!("{}: ", yaml_style_path(&segs[..n]));
        if let Some(stripped) = message.strip_prefix(&prefix) {
            message = stripped.to_owned();
            break;
        }
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
    Some(Loc { line: line.parse().ok()?, column: column.trim().parse().ok()? })
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
        let wants = issues.iter().enumerate().map(|(idx, issue)| Want { idx, rest: &issue.segs }).collect();
        let seed = NodeSeed { wants, here: None, fallback: None, results: &mut results };
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
        let NodeSeed { wants, here, fallback, results } = self;
        let outcome =
            deserializer.deserialize_any(NodeVisitor { wants: &wants, here, fallback, results: &mut *results });
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
                .map(|w| Want { idx: w.idx, rest: &w.rest[1..] })
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
            let Some(key_loc) = map.next_key_seed(KeySeed { out: &mut key_text })? else {
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
                        if let (Some(slot), Some(loc)) = (self.results.get_mut(want.idx), key_loc.or(node_loc)) {
                            slot.get_or_insert(loc);
                        }
                    } else {
                        deeper.push(Want { idx: want.idx, rest });
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
/// non-empty list of steps wins, arrays inside ```` ``` ```` fences being
/// tried before the others. Otherwise the problems of the most
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
        // `Value` (unlike `IgnoredAny`) enforces serde_json's recursion
        // limit, so deeply nested garbage fails fast.
        let mut stream = serde_json::Deserializer::from_str(slice).into_iter::<serde_json::Value>();
        match stream.next() {
            Some(Ok(_)) => {
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

    // Arrays inside ``` fences are the likeliest answer: try them first.
    let fences: Vec<(usize, usize)> = {
        let marks: Vec<usize> = text.match_indices("```").map(|(i, _)| i).collect();
        marks.chunks_exact(2).map(|p| (p[0] + 3, p[1])).collect()
    };
    arrays.sort_by_key(|(start, _)| !fences.iter().any(|(a, b)| (*a..*b).contains(start)));

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
        return Err(RecipeErrors::one(RecipeError::document("the plan contains no steps")));
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
        errors.push(RecipeError::document(format!("a plan can have at most {MAX_STEPS} steps (got {})", steps.len())));
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
    RecipeError { path: schema_path(segs, &message), line, column, message }
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

    /// (path, line) of every error, in order.
    fn paths_lines(errors: &[RecipeError]) -> Vec<(String, Option<usize>)> {
        errors.iter().map(|e| (e.path.clone(), e.line)).collect()
    }

    const FULL: &str = r#"name: build-and-test
description: Build it
inputs:
  - name: GITHUB_TOKEN
    prompt: "Token to push"
    kind: secret
  - name: TARGET
    kind: choice
    choices: [debug, release]
    default: debug
    required: false
  - name: NOTE
steps:
  - echo hello
  - name: test
    run: cargo test
    env: {RUST_LOG: debug}
    timeout: 600
    cwd: sub/dir
"#;

    #[test]
    fn parses_full_recipe() {
        let spec = parse_recipe(FULL).unwrap();
        assert_eq!(spec.name, "build-and-test");
        assert_eq!(spec.description.as_deref(), Some("Build it"));
        assert_eq!(spec.inputs.len(), 3);
        let token = &spec.inputs[0];
        assert_eq!(token.name, "GITHUB_TOKEN");
        assert_eq!(token.kind, InputKind::Secret);
        assert_eq!(token.display_prompt(), "Token to push");
        assert!(token.required);
        let target = &spec.inputs[1];
        assert_eq!(target.kind, InputKind::Choice);
        assert_eq!(target.choices, ["debug", "release"]);
        assert_eq!(target.default.as_deref(), Some("debug"));
        assert!(!target.required);
        let note = &spec.inputs[2];
        assert_eq!(note.kind, InputKind::Text);
        assert_eq!(note.display_prompt(), "NOTE");
        assert!(note.required);
        assert_eq!(spec.steps[0], StepSpec::command("echo hello"));
        let test = &spec.steps[1];
        assert_eq!(test.name.as_deref(), Some("test"));
        assert_eq!(test.run, "cargo test");
        assert_eq!(test.env.get("RUST_LOG").map(String::as_str), Some("debug"));
        assert_eq!(test.timeout, Some(600));
        assert_eq!(test.cwd.as_deref(), Some("sub/dir"));
        assert_eq!(validate_recipe(&spec), Ok(()));
    }

    #[test]
    fn roundtrips_through_yaml_and_json() {
        let spec = parse_recipe(FULL).unwrap();
        let yaml = serde_yaml_ng::to_string(&spec).unwrap();
        assert_eq!(parse_recipe(&yaml).unwrap(), spec);
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<RecipeSpec>(&json).unwrap(), spec);
        // Steps serialize as objects without empty fields.
        assert_eq!(serde_json::to_value(StepSpec::command("ls")).unwrap(), serde_json::json!({"run": "ls"}));
    }

    #[test]
    fn string_steps_and_minimal_recipe() {
        let spec = parse_recipe("name: x\nsteps:\n  - cargo build\n  - 'true'\n  - \"a: b\"\n").unwrap();
        assert!(spec.inputs.is_empty());
        assert_eq!(spec.description, None);
        let runs: Vec<_> = spec.steps.iter().map(|s| s.run.as_str()).collect();
        assert_eq!(runs, ["cargo build", "true", "a: b"]);
        assert!(spec.steps.iter().all(|s| s.env.is_empty() && s.timeout.is_none()));
        // Flow style, null env.
        let spec = parse_recipe("{name: x, steps: [a, {run: b, env: ~}]}").unwrap();
        assert_eq!(spec.steps, [StepSpec::command("a"), StepSpec::command("b")]);
    }

    #[test]
    fn step_spec_from_string_or_object_in_json_and_yaml() {
        let steps: Vec<StepSpec> = serde_json::from_str(
            r#"["ls", {"run": "make", "env": {"A": "1"}, "timeout": 5, "cwd": "x", "name": "n"}]"#,
        )
        .unwrap();
        assert_eq!(steps[0], StepSpec::command("ls"));
        assert_eq!(steps[1].env["A"], "1");
        assert_eq!(steps[1].timeout, Some(5));
        let steps: Vec<StepSpec> = serde_yaml_ng::from_str("- ls\n- run: make\n  cwd: x\n").unwrap();
        assert_eq!(steps[0], StepSpec::command("ls"));
        assert_eq!(steps[1].cwd.as_deref(), Some("x"));
        assert!(serde_json::from_str::<StepSpec>("42").is_err());
        assert!(serde_json::from_str::<StepSpec>("null").is_err());
        assert!(serde_json::from_str::<StepSpec>(r#"{"run": "a", "x": 1}"#).is_err());
    }

    #[test]
    fn reports_all_semantic_errors_with_lines() {
        let yaml = r#"name: "   "
inputs:
  - name: 1BAD
    kind: choice
  - name: OK
    choices: [a]
  - name: OK
    kind: secret
    default: x
  - name: PICK
    kind: choice
    choices: [a, b]
    default: c
steps:
  - ""
  - run: "  "
    env: {GOOD: 1, BAD-KEY: 2, "a.b": 3}
    timeout: 0
    cwd: /abs
  - run: x
    timeout: 86401
    cwd: a/../b
  - run: y
    cwd: ""
  - run: z
    cwd: 'C:\x'
"#;
        let errors = errs(yaml);
        let expected: Vec<(String, Option<usize>)> = [
            ("name", 1),
            ("inputs[0].name", 3),
            ("inputs[0].choices", 3),
            ("inputs[1].choices", 6),
            ("inputs[2].name", 7),
            ("inputs[2].default", 9),
            ("inputs[3].default", 13),
            ("steps[0].run", 15),
            ("steps[1].run", 16),
            ("steps[1].env.BAD-KEY", 17),
            ("steps[1].env[\"a.b\"]", 17),
            ("steps[1].timeout", 18),
            ("steps[1].cwd", 19),
            ("steps[2].timeout", 21),
            ("steps[2].cwd", 22),
            ("steps[3].cwd", 24),
            ("steps[4].cwd", 26),
        ]
        .into_iter()
        .map(|(p, l)| (p.to_owned(), Some(l)))
        .collect();
        assert_eq!(paths_lines(&errors), expected, "{errors:#?}");
        // Columns point at the key (or the node for string steps).
        let col = |path: &str| errors.iter().find(|e| e.path == path).unwrap().column;
        assert_eq!(col("name"), Some(1));
        assert_eq!(col("inputs[0].choices"), Some(5));
        assert_eq!(col("steps[0].run"), Some(5));
        assert_eq!(col("steps[1].timeout"), Some(5));
        assert_eq!(col("steps[1].env.BAD-KEY"), Some(20));
        assert!(errors.iter().all(|e| e.column.is_some()));
        // Messages say what is wrong.
        let msg = |path: &str| errors.iter().find(|e| e.path == path).unwrap().message.clone();
        assert!(msg("name").contains("blank"));
        assert!(msg("inputs[2].name").contains("duplicate"));
        assert!(msg("inputs[2].default").contains("secret"));
        assert!(msg("inputs[3].default").contains("not one of the choices"));
        assert!(msg("steps[1].timeout").contains("between 1 and 86400"));
        assert!(msg("steps[2].cwd").contains(".."));
        assert!(msg("steps[1].cwd").contains("relative"));
        assert!(msg("steps[3].cwd").contains("empty"));

        // validate_recipe finds the same problems, without lines.
        let spec: RecipeSpec = serde_yaml_ng::from_str(yaml).unwrap();
        let RecipeErrors(plain) = validate_recipe(&spec).unwrap_err();
        assert_eq!(
            plain.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
            errors.iter().map(|e| e.path.clone()).collect::<Vec<_>>()
        );
        assert!(plain.iter().all(|e| e.line.is_none() && e.column.is_none()));
    }

    #[test]
    fn name_rules() {
        let e = one_err("name: ''\nsteps: [a]\n");
        assert_eq!((e.path.as_str(), e.line), ("name", Some(1)));
        let long = "n".repeat(MAX_NAME_CHARS + 1);
        let e = one_err(&format!("steps: [a]\nname: {long}\n"));
        assert_eq!((e.path.as_str(), e.line), ("name", Some(2)));
        assert!(e.message.contains("at most 200"), "{}", e.message);
        // 200 multi-byte characters are fine.
        parse_recipe(&format!("name: {}\nsteps: [a]\n", "é".repeat(MAX_NAME_CHARS))).unwrap();
    }

    #[test]
    fn input_rules() {
        let e = one_err("name: x\nsteps: [a]\ninputs:\n  - name: has space\n");
        assert_eq!((e.path.as_str(), e.line), ("inputs[0].name", Some(4)));
        let e = one_err("name: x\nsteps: [a]\ninputs:\n  - {name: A, kind: choice, choices: []}\n");
        assert_eq!((e.path.as_str(), e.line), ("inputs[0].choices", Some(4)));
        let e = one_err("name: x\nsteps: [a]\ninputs:\n  - name: A\n    choices: [a]\n");
        assert_eq!((e.path.as_str(), e.line), ("inputs[0].choices", Some(5)));
        let e = one_err("name: x\nsteps: [a]\ninputs:\n  - name: A\n    kind: secret\n    default: ''\n");
        assert_eq!((e.path.as_str(), e.line), ("inputs[0].default", Some(6)));
        let e =
            one_err("name: x\nsteps: [a]\ninputs:\n  - name: A\n    kind: choice\n    choices: [a]\n    default: b\n");
        assert_eq!((e.path.as_str(), e.line), ("inputs[0].default", Some(7)));
        let errors = errs("name: x\nsteps: [a]\ninputs:\n  - name: A\n  - name: B\n  - name: A\n");
        assert_eq!(paths_lines(&errors), [("inputs[2].name".to_owned(), Some(6))]);
        assert!(errors[0].message.contains("inputs[0]"));
        // Valid variants.
        parse_recipe("name: x\nsteps: [a]\ninputs:\n  - {name: _a1, kind: text, default: d}\n  - {name: B, kind: choice, choices: [b]}\n")
            .unwrap();
    }

    /// `name`, then `steps:` with one 240 KB string anchored and `aliases` uses of it.
    fn aliased_steps(aliases: usize) -> String {
        let mut yaml = format!("name: amplified\nsteps:\n  - &big \"echo {}\"\n", "a".repeat(240 * 1024));
        yaml.push_str(&"  - *big\n".repeat(aliases));
        yaml
    }

    #[test]
    fn alias_amplification_is_refused_before_expanding() {
        // 252 KB of YAML whose 240 KB string is referenced by 999 aliases: 240 MB once expanded.
        let yaml = aliased_steps(999);
        assert!(yaml.len() <= MAX_DOCUMENT_BYTES, "{}", yaml.len());
        let started = std::time::Instant::now();
        let errors = parse_recipe(&yaml).unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors:?}");
        let e = &errors.0[0];
        assert!(e.message.starts_with(EXPANSION_MESSAGE), "{}", e.message);
        assert!(e.message.contains(&MAX_EXPANDED_BYTES.to_string()), "{}", e.message);
        assert!(e.line.is_some(), "{e:?}");
        assert!(e.message.len() < 500, "the error does not repeat the document");
        // Bounded work: far less than expanding 240 MB would take (generous for a slow, busy machine).
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());

        // Two levels of small nodes: 2,000 aliases of a 2,000-element list (4 million nodes).
        let level1 = vec!["x"; 2000].join(", ");
        let level2 = vec!["*a"; 2000].join(", ");
        let yaml = format!("name: n\nsteps: [echo]\ndescription: &a [{level1}]\ninputs: [{level2}]\n");
        assert!(yaml.len() < 16 * 1024);
        let e = &parse_recipe(&yaml).unwrap_err().0[0];
        assert!(e.message.starts_with(EXPANSION_MESSAGE), "{}", e.message);

        // A few aliases within the bounds are fine.
        let ok = "name: n\nsteps:\n  - &s {run: make, env: {A: b}}\n  - *s\n  - *s\n";
        assert_eq!(parse_recipe(ok).unwrap().steps.len(), 3);
        let ok = "name: n\nsteps:\n  - &s echo hi\n  - *s\n";
        assert_eq!(parse_recipe(ok).unwrap().steps.len(), 2);
    }

    #[test]
    fn step_count_rules() {
        let e = one_err("name: x\nsteps: []\n");
        assert_eq!((e.path.as_str(), e.line), ("steps", Some(2)));
        let e = one_err("name: x\nsteps:\n");
        assert_eq!((e.path.as_str(), e.line), ("steps", Some(2)));
        let many = format!("name: x\nsteps:\n{}", "  - a\n".repeat(MAX_STEPS + 1));
        let e = one_err(&many);
        assert_eq!((e.path.as_str(), e.line), ("steps", Some(2)));
        let ok = format!("name: x\nsteps:\n{}", "  - a\n".repeat(MAX_STEPS));
        assert_eq!(parse_recipe(&ok).unwrap().steps.len(), MAX_STEPS);
    }

    #[test]
    fn step_validate_uses_prefix() {
        let mut step = StepSpec::command(" ");
        step.timeout = Some(0);
        step.env.insert("9X".into(), "v".into());
        step.cwd = Some("../up".into());
        let paths: Vec<_> = step.validate("steps[2]").into_iter().map(|e| e.path).collect();
        assert_eq!(paths, ["steps[2].run", "steps[2].env.9X", "steps[2].timeout", "steps[2].cwd"]);
        let paths: Vec<_> = step.validate("").into_iter().map(|e| e.path).collect();
        assert_eq!(paths[0], "run");
        assert!(StepSpec::command("ok").validate("x").is_empty());
    }

    #[test]
    fn semantic_errors_in_flow_style_and_aliases_are_located() {
        let errors = errs("name: x\nsteps: [a, {run: b, timeout: 0}]\n");
        assert_eq!(paths_lines(&errors), [("steps[1].timeout".to_owned(), Some(2))]);
        assert_eq!(errors[0].column, Some(21));
        let yaml = "name: x\ndefaults: &d\n  run: a\n";
        assert!(parse_recipe(yaml).is_err());
        let yaml = "name: x\nsteps:\n  - &s {run: ' ', cwd: /x}\n  - *s\n";
        let errors = errs(yaml);
        assert_eq!(
            paths_lines(&errors),
            [
                ("steps[0].run".to_owned(), Some(3)),
                ("steps[0].cwd".to_owned(), Some(3)),
                ("steps[1].run".to_owned(), Some(3)),
                ("steps[1].cwd".to_owned(), Some(3)),
            ]
        );
    }

    #[test]
    fn unknown_fields_have_path_and_line() {
        let e = one_err("name: x\nbogus: 1\nsteps: [a]\n");
        assert_eq!((e.path.as_str(), e.line, e.column), ("bogus", Some(2), Some(1)));
        assert!(e.message.starts_with("unknown field `bogus`"), "{}", e.message);
        let e = one_err("name: x\nsteps:\n  - run: a\n    colour: red\n");
        assert_eq!((e.path.as_str(), e.line, e.column), ("steps[0].colour", Some(4), Some(5)));
        assert!(e.message.starts_with("unknown field `colour`"), "{}", e.message);
        let e = one_err("name: x\nsteps: [a]\ninputs:\n  - name: A\n    secret: true\n");
        assert_eq!((e.path.as_str(), e.line), ("inputs[0].secret", Some(5)));
    }

    #[test]
    fn wrong_types_and_missing_fields() {
        let cases: &[(&str, &str, usize)] = &[
            ("name: x\nsteps:\n  - run: a\n    timeout: abc\n", "steps[0].timeout", 4),
            ("name: x\nsteps:\n  - run: a\n    timeout: -5\n", "steps[0].timeout", 4),
            ("name: x\nsteps:\n  - run: a\n    timeout: 99999999999999999999999\n", "steps[0].timeout", 4),
            ("name: x\nsteps: hello\n", "steps", 2),
            ("name: x\nsteps: [a]\ninputs: 5\n", "inputs", 3),
            ("name: x\nsteps: [a]\ninputs:\n  - name: A\n    kind: bogus\n", "inputs[0].kind", 5),
            ("name: x\nsteps: [a]\ninputs:\n  - name: A\n    required: maybe\n", "inputs[0].required", 5),
            ("name: x\nsteps:\n  - a\n  - true\n", "steps[1]", 4),
            ("name: x\nsteps:\n  - a\n  - [b]\n", "steps[1]", 4),
            ("name: x\nsteps:\n  - run: a\n    env: [A]\n", "steps[0].env", 4),
            ("name: x\nsteps:\n  - run: a\n    env:\n      A: [1]\n", "steps[0].env.A", 5),
            ("name: [x]\nsteps: [a]\n", "name", 1),
            ("name: x\nsteps:\n  - name: a\n", "steps[0].run", 3),
            ("steps: [a]\n", "name", 1),
            ("name: x\n", "steps", 1),
            ("name: x\nsteps:\n  - run: a\n    env: {A: 1, A: 2}\n", "steps[0].env.A", 4),
            ("name: x\nsteps: [a]\nname: y\n", "name", 1),
            ("[]", "", 1),
            ("hello", "", 1),
        ];
        for (yaml, path, line) in cases {
            let e = one_err(yaml);
            assert_eq!((e.path.as_str(), e.line), (*path, Some(*line)), "{yaml:?}: {e:?}");
            assert!(e.column.is_some(), "{yaml:?}");
            assert!(!e.message.contains(" at line "), "{e:?}");
            assert!(!e.message.starts_with(path) || path.is_empty(), "{e:?}");
        }
        let e = one_err("name: x\nsteps:\n  - run: a\n    env: {A: 1, A: 2}\n");
        assert_eq!(e.message, "duplicate environment variable `A`");
        assert_eq!(e.column, Some(17));
        let e = one_err("name: x\nsteps:\n  - name: a\n");
        assert_eq!(e.message, "missing field `run`");
        let e = one_err("name: x\nsteps:\n  - a\n  - true\n");
        assert!(e.message.contains("expected a command string or a step mapping"), "{}", e.message);
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = one_err("name: [x\nsteps: [a]\n");
        assert_eq!(e.path, "");
        assert!(e.line.is_some() && e.column.is_some());
        assert!(e.message.starts_with("invalid YAML: "), "{}", e.message);
        let e = one_err("name: x\nsteps:\n  - a\n\t- b\n");
        assert_eq!((e.line, e.column), (Some(4), Some(1)), "{e:?}");
        let e = one_err("name: x\nsteps: [a]\n  bad: indentation\n");
        assert_eq!(e.line, Some(3), "{e:?}");
        let e = one_err("name: \"unterminated\nsteps: [a]\n");
        assert!(e.line.is_some());
        // Syntax errors win over what the truncated document would produce.
        let e = one_err("name: x\nsteps:\n  - run: a\n    timeout: 0\n  - {\n");
        assert!(e.message.starts_with("invalid YAML"), "{e:?}");
    }

    #[test]
    fn document_level_errors() {
        for doc in ["", "   \n", "# only a comment\n", "~", "null"] {
            let e = one_err(doc);
            assert_eq!(e.path, "");
            assert!(e.message.contains("empty"), "{doc:?}: {e:?}");
        }
        let big = format!("name: x\nsteps: [a]\n#{}\n", "x".repeat(MAX_DOCUMENT_BYTES));
        let e = one_err(&big);
        assert!(e.message.contains("too large"), "{e:?}");
        let e = one_err("name: x\nsteps: [a]\n---\nname: y\n");
        assert!(e.message.contains("more than one document"), "{e:?}");
    }

    #[test]
    fn deep_nesting_is_rejected_early() {
        let deep = format!("name: x\nsteps: {}", "{a: ".repeat(10_000));
        let started = std::time::Instant::now();
        let e = one_err(&deep);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(e.message.contains("nested too deeply"), "{e:?}");
        assert_eq!((e.line, e.column), (Some(2), Some(8 + 4 * MAX_BRACKET_DEPTH)));
        // Balanced brackets in commands are fine, however many.
        let cmd = "[[ -f x ]] && ".repeat(1000);
        parse_recipe(&format!("name: x\nsteps:\n  - '{cmd}true'\n")).unwrap();
    }

    #[test]
    fn many_errors_are_capped_and_fast() {
        let mut yaml = String::from("name: x\nsteps:\n");
        for _ in 0..MAX_STEPS {
            yaml.push_str("  - {run: ' ', timeout: 0, cwd: /x}\n");
        }
        let started = std::time::Instant::now();
        let errors = errs(&yaml);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(errors.len(), MAX_REPORTED_ERRORS + 1);
        assert!(errors[..MAX_REPORTED_ERRORS].iter().all(|e| e.line.is_some()));
        assert_eq!(errors[MAX_REPORTED_ERRORS].path, "");
        assert!(errors[MAX_REPORTED_ERRORS].message.contains("2900 more"));
    }

    #[test]
    fn display_lists_one_error_per_line() {
        let errors = RecipeErrors(vec![
            RecipeError { path: "steps[1].timeout".into(), line: Some(4), column: Some(5), message: "bad".into() },
            RecipeError::document("worse"),
        ]);
        assert_eq!(errors.to_string(), "steps[1].timeout (line 4, column 5): bad\n<document>: worse");
        let e = parse_recipe("name: x\nsteps: []\n").unwrap_err();
        assert_eq!(e.to_string(), "steps (line 2, column 1): a recipe needs at least one step");
    }

    #[test]
    fn plan_plain_array() {
        let steps = parse_plan_json(r#"["cargo build", {"name": "t", "run": "cargo test", "timeout": 60}]"#).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0], StepSpec::command("cargo build"));
        assert_eq!(steps[1].timeout, Some(60));
        assert_eq!(steps[1].name.as_deref(), Some("t"));
    }

    #[test]
    fn plan_with_fences_and_prose() {
        let text = "Sure! Here is the plan:\n```json\n[\n  \"make\",\n  {\"run\": \"make test\"}\n]\n```\nLet me know [if] you need more.";
        let steps = parse_plan_json(text).unwrap();
        assert_eq!(steps, [StepSpec::command("make"), StepSpec::command("make test")]);
        let steps = parse_plan_json("Steps [see below], option [1]: [\"a\"] and [\"b\"]").unwrap();
        assert_eq!(steps, [StepSpec::command("a")]);
        let steps = parse_plan_json(r#"{"steps": ["x", "y"]}"#).unwrap();
        assert_eq!(steps.len(), 2);
        let text = "I will run [\"echo hi\"] first.\n```json\n[\"make\", \"make test\"]\n```\n";
        assert_eq!(parse_plan_json(text).unwrap().len(), 2);
        let steps = parse_plan_json("Empty first [] then [\"z\"]").unwrap();
        assert_eq!(steps, [StepSpec::command("z")]);
    }

    #[test]
    fn plan_errors() {
        let e = parse_plan_json("I cannot help with that.").unwrap_err();
        assert!(e.0[0].message.contains("no JSON array"), "{e}");
        let e = parse_plan_json("").unwrap_err();
        assert!(e.0[0].message.contains("no JSON array"), "{e}");
        let e = parse_plan_json("```json\n[]\n```").unwrap_err();
        assert!(e.0[0].message.contains("no steps"), "{e}");
        let e = parse_plan_json("plan:\n[\"a\", {\"run\": \"b\",\n \"bogus\": 1}]").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].path, "[1].bogus");
        assert_eq!(e.0[0].line, Some(3), "{e:?}");
        assert!(e.0[0].message.starts_with("unknown field `bogus`"), "{e}");
        let e = parse_plan_json("x [\"a\",\n  {\"run\": \"b\", \"timeout\": \"10\"}]").unwrap_err();
        assert_eq!(e.0[0].path, "[1].timeout");
        assert_eq!(e.0[0].line, Some(2));
        let e = parse_plan_json(r#"[{"timeout": 1}]"#).unwrap_err();
        assert_eq!(e.0[0].path, "[0].run");
        let e = parse_plan_json(r#"[" ", {"run": "a", "cwd": "/etc"}]"#).unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["[0].run", "[1].cwd"]);
        let e = parse_plan_json("[1, 2]").unwrap_err();
        assert_eq!(e.0[0].path, "[0]");
        let e = parse_plan_json("here: [\"a\", \"b\"").unwrap_err();
        assert!(e.0[0].message.contains("no valid JSON array"), "{e}");
        assert_eq!(e.0[0].line, Some(1));
        let too_many = serde_json::to_string(&vec!["a"; MAX_STEPS + 1]).unwrap();
        let e = parse_plan_json(&too_many).unwrap_err();
        assert!(e.0[0].message.contains("at most 1000"), "{e}");
        let e = parse_plan_json(&" ".repeat(MAX_DOCUMENT_BYTES + 1)).unwrap_err();
        assert!(e.0[0].message.contains("too large"), "{e}");
    }

    fn nasty_inputs() -> Vec<String> {
        let mut v: Vec<String> = [
            "",
            "~",
            "[]",
            "{}",
            "null",
            "---",
            "...",
            "- a",
            "name:",
            "steps:",
            ":",
            "?",
            "&a",
            "*a",
            "!foo bar",
            "!!binary aGk=",
            "name: !foo x\nsteps: [!bar a]",
            "name: x\nsteps: !tag [a]",
            "name: x\nsteps: [a]\ninputs: !t [{name: A}]",
            "name: x\nsteps: [{run: a, env: !e {A: b}}]",
            "\t",
            "\tname: x",
            "name:\tx",
            "\u{feff}name: x\nsteps: [a]",
            "\0",
            "name: \"\\xff\\ud800\\U0010FFFF\"\nsteps: [a]",
            "name: \"\\uDC00\"",
            "name: x\nsteps: [*a]",
            "a: &a [*a]",
            "<<: {a: 1}",
            "name: x\nsteps: [a]\n<<: {b: 1}",
            "name: x\nsteps:\n  - <<: {run: a}\n",
            "name: 1e999\nsteps: [-1e999]",
            "name: 0x\nsteps: [0o9]",
            "name: x\nsteps:\n  - run: a\n    timeout: 18446744073709551616",
            "name: x\nsteps:\n  - run: a\n    timeout: -0",
            "? [a]\n: b",
            "name: x\nsteps:\n  - run: a\n    env: {[a]: b}",
            "name: x\nsteps:\n  - {? [a] : b}",
            "name: x\nsteps: [' ']\ninputs: [{name: ' ', kind: choice}]",
            "%YAML 1.2\n---\nname: x\nsteps: [a]",
            "%TAG ! tag:x,2000:\n---\n!a b",
            "name: x\nsteps: [a]\n---",
            "'",
            "\"",
            "{",
            "[",
            "]",
            "}",
            "- - - - -",
            "name: >\n  folded\nsteps: |\n  literal",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push("[".repeat(100_000));
        v.push("{a: ".repeat(20_000));
        v.push(format!("name: x\nsteps: {}", "[".repeat(5_000)));
        v.push(format!("name: x\nsteps: [{}]", "{run: ".repeat(5_000)));
        let mut block = String::from("name: x\nsteps:\n");
        for depth in 0..300 {
            block.push_str(&" ".repeat(depth * 2));
            block.push_str("- \n");
        }
        v.push(block);
        // Billion laughs.
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            laughs.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        v.push(laughs.clone());
        v.push(format!("{laughs}name: x\nsteps: *a9\n"));
        v.push(format!("name: x\nsteps: [{}]", "a, ".repeat(60_000)));
        v.push("9".repeat(10_000));
        v.push(format!("name: x\nsteps:\n  - run: a\n    timeout: {}", "9".repeat(5_000)));
        v
    }

    #[test]
    fn never_panics_on_nasty_inputs() {
        for input in nasty_inputs() {
            let _ = parse_recipe(&input);
            let _ = parse_plan_json(&input);
            let json_ish = input.replace('\'', "\"");
            let _ = parse_plan_json(&json_ish);
        }
        for input in [
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            "[\"\\ud800\"]",
            "[\"\\u0000\", 1e999]",
            "[{\"run\": \"a\", \"env\": null, \"timeout\": null, \"cwd\": null, \"name\": null}]",
        ] {
            let _ = parse_plan_json(input);
        }
        let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_plan_json(&deep_json).is_err());
        let quotes = "[\"".repeat(60_000);
        assert!(parse_plan_json(&quotes).is_err());
    }

    #[test]
    fn every_error_is_well_formed() {
        for input in nasty_inputs() {
            if let Err(RecipeErrors(errors)) = parse_recipe(&input) {
                assert!(!errors.is_empty());
                for e in errors {
                    assert!(!e.message.is_empty());
                    assert!(e.line.is_none_or(|l| l >= 1));
                    assert!(e.column.is_none_or(|c| c >= 1));
                    assert!(!e.message.contains(PROBE));
                }
            }
        }
    }

    mod props {
        use super::super::*;
        use super::FULL;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn parse_recipe_never_panics(s in "\\PC{0,200}") {
                let _ = parse_recipe(&s);
            }

            #[test]
            fn parse_recipe_never_panics_on_yamlish(
                s in "[a-z \\n\\t:\\-\\[\\]{}&*!|>'\"#,?%@`~0-9]{0,200}"
            ) {
                let _ = parse_recipe(&s);
                let _ = parse_plan_json(&s);
            }

            #[test]
            fn parse_plan_json_never_panics(s in "\\PC{0,200}") {
                let _ = parse_plan_json(&s);
            }

            #[test]
            fn mutated_recipes_never_panic(cut in 0usize..400, insert in "[\\PC]{0,3}") {
                let mut doc: String = FULL.chars().collect();
                let mut at = cut.min(doc.len());
                while !doc.is_char_boundary(at) { at -= 1; }
                doc.insert_str(at, &insert);
                if let Err(RecipeErrors(errors)) = parse_recipe(&doc) {
                    prop_assert!(!errors.is_empty());
                }
                let _ = parse_recipe(&doc[..at]);
            }
        }
    }
}
