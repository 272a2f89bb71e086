//! The OpenAPI 3.0 document, generated from the route table plus hand-written JSON Schemas of the wire
//! types (kept next to the types' serde forms in `orchestrator_core` and [`crate::dto`]).

use crate::middleware::Access;
use crate::routes::{BodyDoc, RouteDef};
use serde_json::{json, Map, Value};

fn rf(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}
fn string() -> Value {
    json!({"type": "string"})
}
fn uuid() -> Value {
    json!({"type": "string", "format": "uuid"})
}
fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}
fn int() -> Value {
    json!({"type": "integer"})
}
fn uint() -> Value {
    json!({"type": "integer", "minimum": 0})
}
fn number() -> Value {
    json!({"type": "number"})
}
fn boolean() -> Value {
    json!({"type": "boolean"})
}
fn arr(items: Value) -> Value {
    json!({"type": "array", "items": items})
}
fn null(mut v: Value) -> Value {
    if let Some(r) = v.get("$ref").cloned() {
        return json!({"allOf": [{"$ref": r}], "nullable": true});
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("nullable".into(), Value::Bool(true));
    }
    v
}
fn enm(values: &[&str]) -> Value {
    json!({"type": "string", "enum": values})
}
fn map_of(v: Value) -> Value {
    json!({"type": "object", "additionalProperties": v})
}
fn obj(required: &[&str], props: Vec<(&str, Value)>) -> Value {
    let mut p = Map::new();
    for (k, v) in props {
        p.insert(k.to_string(), v);
    }
    json!({"type": "object", "required": required, "properties": p})
}
fn strict(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    v
}

const WORK_ITEM_STATES: &[&str] = &[
    "draft",
    "awaiting_approval",
    "ready",
    "queued",
    "running",
    "waiting_input",
    "retrying",
    "blocked",
    "succeeded",
    "failed",
    "cancelled",
];
fn repository() -> Value {
    strict(obj(&["url"], vec![("url", string()), ("base_branch", null(string()))]))
}

const RUN_STATES: &[&str] = &["claimed", "running", "waiting_input", "succeeded", "failed", "cancelled", "lost"];

fn run_result_props() -> Vec<(&'static str, Value)> {
    vec![
        ("branch", string()),
        ("base_commit", string()),
        ("head_commit", string()),
        ("start_commit", null(string())),
        ("committed", boolean()),
        ("pushed", boolean()),
        ("files_changed", uint()),
        ("insertions", uint()),
        ("deletions", uint()),
        ("files", arr(string())),
        ("patch_truncated", boolean()),
    ]
}

fn schemas() -> Value {
    let labels = arr(string());
    let ids = arr(uuid());
    let s: Vec<(&str, Value)> = vec![
        (
            "Error",
            obj(
                &["error"],
                vec![(
                    "error",
                    obj(
                        &["code", "message", "request_id", "details"],
                        vec![
                            ("code", string()),
                            ("message", string()),
                            ("request_id", null(string())),
                            ("details", json!({"type": "object"})),
                        ],
                    ),
                )],
            ),
        ),
        ("Health", obj(&["status"], vec![("status", string())])),
        (
            "QueueStats",
            obj(
                &["work_items", "runs", "pending_info_requests", "pending_approvals"],
                vec![
                    ("work_items", map_of(uint())),
                    ("runs", map_of(uint())),
                    ("pending_info_requests", uint()),
                    ("pending_approvals", uint()),
                ],
            ),
        ),
        ("Repository", repository()),
        (
            "CreateProject",
            strict(obj(
                &["name"],
                vec![("name", string()), ("description", string()), ("repository", null(rf("Repository")))],
            )),
        ),
        (
            "UpdateProject",
            strict(obj(
                &[],
                vec![("name", null(string())), ("description", null(string())), ("repository", null(rf("Repository")))],
            )),
        ),
        (
            "Project",
            obj(
                &["id", "name", "description", "created_at", "updated_at"],
                vec![
                    ("id", uuid()),
                    ("name", string()),
                    ("description", string()),
                    ("repository", null(rf("Repository"))),
                    ("created_at", time()),
                    ("updated_at", time()),
                ],
            ),
        ),
        (
            "Vision",
            obj(
                &["project_id", "version", "text", "author", "created_at"],
                vec![
                    ("project_id", uuid()),
                    ("version", uint()),
                    ("text", string()),
                    ("author", null(string())),
                    ("created_at", time()),
                ],
            ),
        ),
        ("PutVision", strict(obj(&["text"], vec![("text", string()), ("author", null(string()))]))),
        (
            "RequirementSpec",
            strict(obj(
                &["title"],
                vec![
                    ("title", string()),
                    ("description", string()),
                    ("labels", labels.clone()),
                    ("priority", int()),
                    ("recipe_id", null(uuid())),
                ],
            )),
        ),
        (
            "ProposeRequirements",
            strict(obj(
                &["requirements"],
                vec![
                    ("title", null(string())),
                    ("requirements", arr(rf("RequirementSpec"))),
                    ("author", null(string())),
                ],
            )),
        ),
        (
            "RequirementsDraft",
            obj(
                &["id", "project_id", "title", "requirements", "state", "content_hash", "work_item_ids", "created_at"],
                vec![
                    ("id", uuid()),
                    ("project_id", uuid()),
                    ("title", string()),
                    ("requirements", arr(rf("RequirementSpec"))),
                    ("state", enm(&["proposed", "approved", "rejected"])),
                    ("content_hash", string()),
                    ("proposed_by", null(string())),
                    ("work_item_ids", ids.clone()),
                    ("created_at", time()),
                    ("decided_at", null(time())),
                ],
            ),
        ),
        (
            "DraftCreated",
            obj(
                &["draft", "approval"],
                vec![("draft", rf("RequirementsDraft")), ("approval", null(rf("ApprovalRequest")))],
            ),
        ),
        (
            "ApprovalRequest",
            obj(
                &["id", "project_id", "subject", "content_hash", "state", "requested_at"],
                vec![
                    ("id", uuid()),
                    ("project_id", uuid()),
                    (
                        "subject",
                        obj(&["kind", "id"], vec![("kind", enm(&["requirements_draft", "work_item"])), ("id", uuid())]),
                    ),
                    ("content_hash", string()),
                    ("state", enm(&["pending", "approved", "rejected", "superseded"])),
                    ("requested_at", time()),
                    ("decided_by", null(string())),
                    ("decided_at", null(time())),
                    ("reason", null(string())),
                ],
            ),
        ),
        ("DecideBody", strict(obj(&[], vec![("by", null(string())), ("reason", null(string()))]))),
        (
            "DecisionResult",
            obj(
                &["approval", "draft", "work_items"],
                vec![
                    ("approval", null(rf("ApprovalRequest"))),
                    ("draft", null(rf("RequirementsDraft"))),
                    ("work_items", arr(rf("WorkItem"))),
                ],
            ),
        ),
        (
            "RetryOverrides",
            strict(obj(
                &[],
                vec![
                    ("max_retries", uint()),
                    ("backoff_base_seconds", number()),
                    ("backoff_cap_seconds", number()),
                    ("jitter", number()),
                ],
            )),
        ),
        (
            "EnqueueOptions",
            strict(obj(
                &[],
                vec![("priority", null(int())), ("depends_on", ids.clone()), ("not_before", null(time()))],
            )),
        ),
        (
            "CreateWorkItem",
            strict(obj(
                &["project_id", "title"],
                vec![
                    ("project_id", uuid()),
                    ("title", string()),
                    ("description", string()),
                    ("recipe_id", null(uuid())),
                    ("labels", labels.clone()),
                    ("priority", int()),
                    ("retry", rf("RetryOverrides")),
                    ("idempotency_key", null(string())),
                    ("draft", boolean()),
                    ("enqueue", null(rf("EnqueueOptions"))),
                ],
            )),
        ),
        (
            "CreateWorkItemOrBatch",
            json!({"oneOf": [rf("CreateWorkItem"), obj(&["items"], vec![("items", arr(rf("CreateWorkItem")))])]}),
        ),
        (
            "WorkItemCreated",
            obj(
                &["work_item", "created", "approval"],
                vec![("work_item", rf("WorkItem")), ("created", boolean()), ("approval", null(rf("ApprovalRequest")))],
            ),
        ),
        (
            "WorkItemCreatedOrBatch",
            json!({"oneOf": [rf("WorkItemCreated"), obj(&["items"], vec![("items", arr(rf("WorkItemCreated")))])]}),
        ),
        (
            "WorkItem",
            obj(
                &[
                    "id",
                    "project_id",
                    "title",
                    "description",
                    "labels",
                    "state",
                    "priority",
                    "dependencies",
                    "retry",
                    "content_hash",
                    "attempts",
                    "created_at",
                    "updated_at",
                ],
                vec![
                    ("id", uuid()),
                    ("project_id", uuid()),
                    ("title", string()),
                    ("description", string()),
                    ("recipe_id", null(uuid())),
                    ("labels", labels.clone()),
                    ("state", enm(WORK_ITEM_STATES)),
                    ("priority", int()),
                    ("dependencies", ids.clone()),
                    ("retry", rf("RetryOverrides")),
                    ("idempotency_key", null(string())),
                    ("content_hash", string()),
                    ("approval_id", null(uuid())),
                    ("draft_id", null(uuid())),
                    ("blocked_reason", null(string())),
                    ("attempts", uint()),
                    ("current_run_id", null(uuid())),
                    ("run_at", null(time())),
                    ("last_error", null(string())),
                    ("created_at", time()),
                    ("updated_at", time()),
                    ("enqueued_at", null(time())),
                ],
            ),
        ),
        (
            "UpdateWorkItem",
            strict(obj(
                &[],
                vec![
                    ("title", null(string())),
                    ("description", null(string())),
                    ("recipe_id", null(uuid())),
                    ("detach_recipe", boolean()),
                    ("labels", null(labels.clone())),
                    ("priority", null(int())),
                ],
            )),
        ),
        (
            "WorkItemChanged",
            obj(
                &["work_item", "approval"],
                vec![("work_item", rf("WorkItem")), ("approval", null(rf("ApprovalRequest")))],
            ),
        ),
        ("CancelBody", strict(obj(&[], vec![("reason", null(string()))]))),
        ("RequeueRequest", strict(obj(&[], vec![("delay_seconds", uint()), ("backoff", boolean())]))),
        ("AttachRecipe", strict(obj(&["recipe_id"], vec![("recipe_id", uuid())]))),
        (
            "Usage",
            obj(
                &[],
                vec![
                    ("input_tokens", uint()),
                    ("cached_input_tokens", uint()),
                    ("output_tokens", uint()),
                    ("cost_usd", null(number())),
                ],
            ),
        ),
        (
            "Run",
            obj(
                &[
                    "id",
                    "work_item_id",
                    "project_id",
                    "attempt",
                    "agent_id",
                    "state",
                    "lease_token",
                    "claimed_at",
                    "usage",
                ],
                vec![
                    ("id", uuid()),
                    ("work_item_id", uuid()),
                    ("project_id", uuid()),
                    ("attempt", uint()),
                    ("agent_id", string()),
                    ("state", enm(RUN_STATES)),
                    ("lease_token", uint()),
                    ("lease_expires_at", null(time())),
                    ("heartbeat_at", null(time())),
                    ("claimed_at", time()),
                    ("started_at", null(time())),
                    ("finished_at", null(time())),
                    ("exit_code", null(int())),
                    ("error", null(string())),
                    ("failure_kind", null(enm(&["retryable", "permanent"]))),
                    ("usage", rf("Usage")),
                    ("last_completed_step", null(uint())),
                ],
            ),
        ),
        (
            "StepSpec",
            json!({"oneOf": [string(), obj(&["run"], vec![
                ("name", string()),
                ("run", string()),
                ("env", map_of(string())),
                ("timeout", uint()),
                ("cwd", string()),
            ])]}),
        ),
        (
            "RecipeInput",
            obj(
                &["name"],
                vec![
                    ("name", string()),
                    ("prompt", string()),
                    ("kind", enm(&["text", "secret", "choice"])),
                    ("choices", arr(string())),
                    ("default", string()),
                    ("required", boolean()),
                ],
            ),
        ),
        (
            "RecipeSpec",
            obj(
                &["name", "steps"],
                vec![
                    ("name", string()),
                    ("description", string()),
                    ("inputs", arr(rf("RecipeInput"))),
                    ("steps", arr(rf("StepSpec"))),
                ],
            ),
        ),
        ("RecipeSource", strict(obj(&["yaml"], vec![("yaml", string()), ("project_id", null(uuid()))]))),
        (
            "ToolRecipe",
            obj(
                &["id", "name", "yaml", "spec", "created_at"],
                vec![
                    ("id", uuid()),
                    ("project_id", null(uuid())),
                    ("name", string()),
                    ("yaml", string()),
                    ("spec", rf("RecipeSpec")),
                    ("created_at", time()),
                ],
            ),
        ),
        (
            "EnqueueItem",
            strict(obj(
                &["work_item_id"],
                vec![
                    ("work_item_id", uuid()),
                    ("priority", null(int())),
                    ("depends_on", ids.clone()),
                    ("not_before", null(time())),
                ],
            )),
        ),
        (
            "EnqueueItemOrBatch",
            json!({"oneOf": [rf("EnqueueItem"), obj(&["items"], vec![("items", arr(rf("EnqueueItem")))])]}),
        ),
        (
            "ScheduledTask",
            obj(
                &[
                    "work_item_id",
                    "project_id",
                    "state",
                    "priority",
                    "dependencies",
                    "pending_dependencies",
                    "attempts",
                ],
                vec![
                    ("work_item_id", uuid()),
                    ("project_id", uuid()),
                    ("state", enm(WORK_ITEM_STATES)),
                    ("priority", int()),
                    ("dependencies", ids.clone()),
                    ("pending_dependencies", uint()),
                    ("attempts", uint()),
                    ("run_at", null(time())),
                    ("enqueued_at", null(time())),
                    ("blocked_reason", null(string())),
                ],
            ),
        ),
        (
            "ScheduledTaskOrBatch",
            json!({"oneOf": [rf("ScheduledTask"), obj(&["items"], vec![("items", arr(rf("ScheduledTask")))])]}),
        ),
        (
            "ReapedRun",
            obj(
                &["run_id", "work_item_id", "work_item_state"],
                vec![
                    ("run_id", uuid()),
                    ("work_item_id", uuid()),
                    ("work_item_state", enm(WORK_ITEM_STATES)),
                    ("retry_at", null(time())),
                ],
            ),
        ),
        (
            "TickReport",
            obj(
                &["promoted", "reaped", "expired"],
                vec![("promoted", ids.clone()), ("reaped", arr(rf("ReapedRun"))), ("expired", arr(rf("ReapedRun")))],
            ),
        ),
        (
            "NewLogLine",
            obj(&["stream", "line"], vec![("stream", enm(&["stdout", "stderr", "system"])), ("line", string())]),
        ),
        (
            "LogEntry",
            obj(
                &["run_id", "seq", "stream", "line", "at"],
                vec![
                    ("run_id", uuid()),
                    ("seq", uint()),
                    ("stream", enm(&["stdout", "stderr", "system"])),
                    ("line", string()),
                    ("at", time()),
                ],
            ),
        ),
        (
            "NewStepEvent",
            obj(
                &["kind", "name"],
                vec![
                    ("step_index", null(uint())),
                    ("kind", enm(&["planned", "started", "succeeded", "failed", "skipped", "info"])),
                    ("name", string()),
                    ("detail", json!({})),
                ],
            ),
        ),
        (
            "StepEvent",
            obj(
                &["run_id", "seq", "kind", "name", "detail", "at"],
                vec![
                    ("run_id", uuid()),
                    ("seq", uint()),
                    ("step_index", null(uint())),
                    ("kind", enm(&["planned", "started", "succeeded", "failed", "skipped", "info"])),
                    ("name", string()),
                    ("detail", json!({})),
                    ("at", time()),
                ],
            ),
        ),
        (
            "NewInfoRequest",
            strict(obj(
                &["key", "prompt"],
                vec![
                    ("key", string()),
                    ("prompt", string()),
                    ("kind", enm(&["text", "secret", "choice"])),
                    ("choices", arr(string())),
                    ("deadline", null(time())),
                ],
            )),
        ),
        (
            "InfoRequest",
            obj(
                &[
                    "id",
                    "run_id",
                    "work_item_id",
                    "project_id",
                    "key",
                    "prompt",
                    "kind",
                    "choices",
                    "state",
                    "created_at",
                ],
                vec![
                    ("id", uuid()),
                    ("run_id", uuid()),
                    ("work_item_id", uuid()),
                    ("project_id", uuid()),
                    ("key", string()),
                    ("prompt", string()),
                    ("kind", enm(&["text", "secret", "choice"])),
                    ("choices", arr(string())),
                    ("state", enm(&["pending", "answered", "cancelled", "expired"])),
                    ("deadline", null(time())),
                    ("created_at", time()),
                    ("answered_at", null(time())),
                    ("answered_by", null(string())),
                ],
            ),
        ),
        (
            "InfoRequestView",
            json!({"allOf": [rf("InfoRequest"), obj(&[], vec![("answer", null(json!({"type": "string",
                "description": "the answer; only for admins and the asking run's agent"})))])]}),
        ),
        ("AnswerBody", strict(obj(&["value"], vec![("value", string()), ("answered_by", null(string()))]))),
        (
            "InfoAnswered",
            obj(&["info_request", "resumed"], vec![("info_request", rf("InfoRequestView")), ("resumed", boolean())]),
        ),
        (
            "ClaimBody",
            obj(
                &[],
                vec![
                    ("agent_id", null(string())),
                    ("capabilities", arr(string())),
                    ("max", json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 1})),
                    ("lease_ttl_seconds", null(uint())),
                    ("wait_ms", null(json!({"type": "integer", "minimum": 0, "maximum": 30000}))),
                ],
            ),
        ),
        (
            "Lease",
            obj(
                &["run_id", "token", "expires_at"],
                vec![("run_id", uuid()), ("token", uint()), ("expires_at", time())],
            ),
        ),
        ("AnswerValue", obj(&["value", "secret"], vec![("value", string()), ("secret", boolean())])),
        (
            "Assignment",
            obj(
                &["run", "lease", "work_item", "resumed", "recipe", "answers"],
                vec![
                    ("run", rf("Run")),
                    ("lease", rf("Lease")),
                    ("work_item", rf("WorkItem")),
                    ("resumed", boolean()),
                    ("recipe", null(rf("RecipeSpec"))),
                    ("answers", map_of(rf("AnswerValue"))),
                    ("repository", null(rf("Repository"))),
                ],
            ),
        ),
        ("ClaimResponse", obj(&["assignments"], vec![("assignments", arr(rf("Assignment")))])),
        ("WorkGeneration", obj(&["generation", "woken"], vec![("generation", uint()), ("woken", boolean())])),
        ("TokenBody", obj(&["token"], vec![("token", uint())])),
        (
            "RunResult",
            obj(
                &["branch", "base_commit", "head_commit", "files_changed", "insertions", "deletions"],
                run_result_props(),
            ),
        ),
        (
            "RunResultView",
            obj(
                &["run_id", "recorded_at", "patch_bytes", "branch", "base_commit", "head_commit"],
                [("run_id", uuid()), ("recorded_at", time()), ("patch_bytes", uint())]
                    .into_iter()
                    .chain(run_result_props())
                    .collect(),
            ),
        ),
        (
            "RecordResult",
            strict(obj(
                &["token", "result"],
                vec![("token", uint()), ("result", rf("RunResult")), ("patch", string())],
            )),
        ),
        (
            "CancellationsBody",
            strict(obj(
                &["runs"],
                vec![
                    ("runs", arr(strict(obj(&["run_id", "token"], vec![("run_id", uuid()), ("token", uint())])))),
                    ("timeout_ms", null(uint())),
                ],
            )),
        ),
        ("Cancellations", obj(&["runs"], vec![("runs", arr(uuid()))])),
        ("Recorded", obj(&["recorded"], vec![("recorded", boolean())])),
        ("AppendLogs", obj(&["token", "lines"], vec![("token", uint()), ("lines", arr(rf("NewLogLine")))])),
        ("LogsAppended", obj(&["last_seq"], vec![("last_seq", uint())])),
        ("RecordSteps", obj(&["token", "events"], vec![("token", uint()), ("events", arr(rf("NewStepEvent")))])),
        ("StepsRecorded", obj(&["events"], vec![("events", arr(rf("StepEvent")))])),
        (
            "AskBody",
            obj(
                &["token", "questions"],
                vec![("token", uint()), ("questions", arr(rf("NewInfoRequest"))), ("usage", null(rf("Usage")))],
            ),
        ),
        ("ReleaseBody", obj(&["token"], vec![("token", uint()), ("usage", null(rf("Usage")))])),
        ("Asked", obj(&["info_requests"], vec![("info_requests", arr(rf("InfoRequest")))])),
        (
            "RunOutcome",
            json!({"oneOf": [
                obj(&["status"], vec![("status", enm(&["succeeded"])), ("exit_code", null(int()))]),
                obj(&["status", "error"], vec![
                    ("status", enm(&["failed"])),
                    ("error", string()),
                    ("exit_code", null(int())),
                    ("kind", enm(&["retryable", "permanent"])),
                ]),
            ], "discriminator": {"propertyName": "status"}}),
        ),
        (
            "CompleteBody",
            obj(
                &["token", "outcome"],
                vec![("token", uint()), ("outcome", rf("RunOutcome")), ("usage", null(rf("Usage")))],
            ),
        ),
        (
            "CompletionResult",
            obj(
                &["run", "work_item_state", "released", "blocked"],
                vec![
                    ("run", rf("Run")),
                    ("work_item_state", enm(WORK_ITEM_STATES)),
                    ("retry_at", null(time())),
                    ("released", ids.clone()),
                    ("blocked", ids),
                ],
            ),
        ),
    ];
    let mut m = Map::new();
    for (k, v) in s {
        m.insert(k.to_string(), v);
    }
    Value::Object(m)
}

/// A schema expression of the route table: `Name`, `[Name]`, `Page<Name>`, `SeqPage<Name>`.
fn schema_expr(e: &str) -> Value {
    if let Some(inner) = e.strip_prefix("Page<").and_then(|s| s.strip_suffix('>')) {
        obj(&["items", "next"], vec![("items", arr(schema_expr(inner))), ("next", null(string()))])
    } else if let Some(inner) = e.strip_prefix("SeqPage<").and_then(|s| s.strip_suffix('>')) {
        obj(&["items", "next"], vec![("items", arr(schema_expr(inner))), ("next", uint())])
    } else if let Some(inner) = e.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        arr(schema_expr(inner))
    } else if e == "object" {
        json!({"type": "object"})
    } else {
        rf(e)
    }
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": rf("Error")}}})
}

fn operation(r: &RouteDef) -> Value {
    let mut params: Vec<Value> = Vec::new();
    for seg in r.path.split('/') {
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            params.push(json!({"name": name, "in": "path", "required": true, "schema": uuid()}));
        }
    }
    for (name, ty, desc) in r.query {
        let schema = match *ty {
            "uuid" => uuid(),
            "integer" => uint(),
            _ => string(),
        };
        params.push(json!({"name": name, "in": "query", "required": false, "description": desc, "schema": schema}));
    }
    if r.response == "sse" {
        params.push(json!({"name": "Last-Event-ID", "in": "header", "required": false,
            "description": "resume after this log sequence number", "schema": uint()}));
    }
    let mut op = Map::new();
    let tag = r.path.trim_start_matches('/').split('/').next().unwrap_or("").to_string();
    let op_id = format!(
        "{}{}",
        r.method.as_str().to_ascii_lowercase(),
        r.path.replace(['{', '}'], "").split(['/', '-', '.']).map(capitalize).collect::<String>()
    );
    op.insert("operationId".into(), json!(op_id));
    op.insert("summary".into(), json!(r.summary));
    op.insert("tags".into(), json!([tag]));
    let roles = r.access.roles();
    op.insert(
        "description".into(),
        json!(if r.access == Access::Public { "Public.".to_string() } else { format!("Roles: {}.", roles.join(", ")) }),
    );
    if r.access == Access::Public {
        op.insert("security".into(), json!([]));
    }
    op.insert("parameters".into(), Value::Array(params));
    match r.body {
        BodyDoc::None => {}
        BodyDoc::Json(s) | BodyDoc::OptionalJson(s) => {
            op.insert(
                "requestBody".into(),
                json!({"required": matches!(r.body, BodyDoc::Json(_)),
                    "content": {"application/json": {"schema": schema_expr(s)}}}),
            );
        }
        BodyDoc::Recipe => {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {
                    "application/yaml": {"schema": {"type": "string", "description": "the recipe YAML"}},
                    "application/json": {"schema": rf("RecipeSource")},
                }}),
            );
        }
    }
    let ok = match r.response {
        "none" => json!({"description": "done"}),
        "diff" => json!({"description": "a unified diff",
            "content": {"text/x-diff": {"schema": {"type": "string"}}}}),
        "text" => json!({"description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}}}),
        "sse" => {
            json!({"description": "Server-Sent Events: `event: log` (id = seq, data = LogEntry JSON), then `event: end` (data = {\"state\"})",
            "content": {"text/event-stream": {"schema": {"type": "string"}}}})
        }
        s => json!({"description": "success", "content": {"application/json": {"schema": schema_expr(s)}}}),
    };
    let mut responses = Map::new();
    responses.insert(r.status.to_string(), ok);
    if r.status == 201 && matches!(r.body, BodyDoc::Json("CreateWorkItemOrBatch")) {
        responses.insert(
            "200".into(),
            json!({"description": "an existing item matched the idempotency key",
            "content": {"application/json": {"schema": schema_expr(r.response)}}}),
        );
    }
    responses.insert("400".into(), error_response("malformed request"));
    if r.access != Access::Public {
        responses.insert("401".into(), error_response("missing or unknown token"));
        responses.insert("403".into(), error_response("role not allowed"));
        responses.insert("429".into(), error_response("rate limited (see Retry-After)"));
    }
    if r.path.contains('{') {
        responses.insert("404".into(), error_response("unknown id"));
    }
    if r.method != crate::routes::M::Get {
        responses.insert("409".into(), error_response("invalid transition, conflict, lease lost or duplicate"));
        responses.insert("413".into(), error_response("body too large"));
        responses.insert("422".into(), error_response("invalid content"));
    }
    responses.insert("500".into(), error_response("internal error"));
    responses.insert("503".into(), error_response("store unavailable or timeout"));
    op.insert("responses".into(), Value::Object(responses));
    Value::Object(op)
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// The document for `routes`.
pub(crate) fn document(routes: &[RouteDef]) -> Value {
    let mut paths = Map::new();
    for r in routes {
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        if let Some(o) = entry.as_object_mut() {
            o.insert(r.method.as_str().to_ascii_lowercase(), operation(r));
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "orchestrator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Job orchestrator for autonomous coding agents. Every error answers the Error schema.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    })
}
