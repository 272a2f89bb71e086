//! The route table: one entry per (method, path) with its handler, access rule and documentation. The
//! router and the OpenAPI document are both generated from it.

use crate::agent_routes as agent;
use crate::handlers as h;
use crate::middleware::Access;
use crate::sse;
use crate::AppState;
use axum::handler::Handler;
use axum::routing::{on, MethodFilter, MethodRouter};

/// An HTTP method of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum M {
    /// GET.
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl M {
    /// Uppercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            M::Get => "GET",
            M::Post => "POST",
            M::Put => "PUT",
            M::Patch => "PATCH",
            M::Delete => "DELETE",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            M::Get => MethodFilter::GET,
            M::Post => MethodFilter::POST,
            M::Put => MethodFilter::PUT,
            M::Patch => MethodFilter::PATCH,
            M::Delete => MethodFilter::DELETE,
        }
    }
}

/// Request body of a route, for the document.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BodyDoc {
    None,
    /// A JSON body of this schema expression.
    Json(&'static str),
    /// An optional JSON body (may be empty).
    OptionalJson(&'static str),
    /// A recipe: YAML text or JSON `RecipeSource`.
    Recipe,
}

/// One route.
pub(crate) struct RouteDef {
    pub method: M,
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    pub query: &'static [(&'static str, &'static str, &'static str)],
    pub body: BodyDoc,
    pub status: u16,
    /// Response schema expression: a component name, `[X]` (array), `Page<X>`, `SeqPage<X>`, or the
    /// special `text` (Prometheus), `sse` (event stream), `none` (no body), `object` (OpenAPI).
    pub response: &'static str,
    pub long_poll: bool,
    pub handler: MethodRouter<AppState>,
}

fn r<H, T>(method: M, path: &'static str, access: Access, summary: &'static str, handler: H) -> RouteDef
where
    H: Handler<T, AppState>,
    T: 'static,
{
    RouteDef {
        method,
        path,
        access,
        summary,
        query: &[],
        body: BodyDoc::None,
        status: 200,
        response: "object",
        long_poll: false,
        handler: on(method.filter(), handler),
    }
}

impl RouteDef {
    fn q(mut self, q: &'static [(&'static str, &'static str, &'static str)]) -> Self {
        self.query = q;
        self
    }
    fn body(mut self, schema: &'static str) -> Self {
        self.body = BodyDoc::Json(schema);
        self
    }
    fn opt_body(mut self, schema: &'static str) -> Self {
        self.body = BodyDoc::OptionalJson(schema);
        self
    }
    fn recipe_body(mut self) -> Self {
        self.body = BodyDoc::Recipe;
        self
    }
    fn resp(mut self, status: u16, schema: &'static str) -> Self {
        self.status = status;
        self.response = schema;
        self
    }
    fn long_poll(mut self) -> Self {
        self.long_poll = true;
        self
    }
}

const PAGE: (&str, &str, &str) = ("limit", "integer", "page size (1..=1000, default 100)");
const AFTER: (&str, &str, &str) = ("after", "uuid", "cursor: the `next` of the previous page");
const SEQ_AFTER: (&str, &str, &str) = ("after", "integer", "return entries with a sequence number above this");
const SEQ_LIMIT: (&str, &str, &str) = ("limit", "integer", "at most this many entries (default 1000)");

/// Every route of the API.
pub(crate) fn table() -> Vec<RouteDef> {
    use Access::*;
    use M::*;
    vec![
        // observability
        r(Get, "/healthz", Public, "Liveness", h::healthz).resp(200, "Health"),
        r(Get, "/readyz", Public, "Readiness (the store answers)", h::readyz).resp(200, "Health"),
        r(Get, "/metrics", Public, "Prometheus metrics", h::metrics).resp(200, "text"),
        r(Get, "/openapi.json", Public, "This OpenAPI document", h::openapi).resp(200, "object"),
        r(Get, "/stats", Read, "Store counts by state", h::stats).resp(200, "QueueStats"),
        // projects
        r(Post, "/projects", Operate, "Create a project", h::project_create).body("CreateProject").resp(201, "Project"),
        r(Get, "/projects", Read, "List projects", h::project_list).q(&[PAGE, AFTER]).resp(200, "Page<Project>"),
        r(Get, "/projects/{id}", Read, "Get a project", h::project_get).resp(200, "Project"),
        r(Patch, "/projects/{id}", Operate, "Update a project", h::project_update)
            .body("UpdateProject")
            .resp(200, "Project"),
        r(Delete, "/projects/{id}", Admin, "Delete a project and everything in it", h::project_delete)
            .resp(204, "none"),
        r(Get, "/projects/{id}/vision", Read, "Latest vision (or ?version=N)", h::vision_get)
            .q(&[("version", "integer", "a specific version")])
            .resp(200, "Vision"),
        r(Put, "/projects/{id}/vision", Operate, "Write a new vision version", h::vision_put)
            .body("PutVision")
            .resp(200, "Vision"),
        r(Get, "/projects/{id}/vision/versions", Read, "All vision versions, oldest first", h::vision_versions)
            .resp(200, "Page<Vision>"),
        // requirements
        r(Post, "/projects/{id}/requirements", Operate, "Propose requirements", h::requirements_propose)
            .body("ProposeRequirements")
            .resp(201, "DraftCreated"),
        r(Get, "/projects/{id}/requirements", Read, "List requirement drafts", h::requirements_list)
            .q(&[PAGE, AFTER])
            .resp(200, "Page<RequirementsDraft>"),
        r(Get, "/requirements/{id}", Read, "Get a requirements draft", h::requirements_get)
            .resp(200, "RequirementsDraft"),
        r(
            Post,
            "/requirements/{id}/approve",
            Operate,
            "Approve a draft (creates its work items)",
            h::requirements_approve,
        )
        .opt_body("DecideBody")
        .resp(200, "DecisionResult"),
        r(Post, "/requirements/{id}/reject", Operate, "Reject a draft", h::requirements_reject)
            .opt_body("DecideBody")
            .resp(200, "DecisionResult"),
        // work items
        r(Post, "/work-items", Operate, "Create a work item, or a batch with {\"items\": [...]}", h::work_item_create)
            .body("CreateWorkItemOrBatch")
            .resp(201, "WorkItemCreatedOrBatch"),
        r(Get, "/work-items", Read, "List work items", h::work_item_list)
            .q(&[
                ("project_id", "uuid", "only this project"),
                ("state", "string", "only this state (or `all`)"),
                ("label", "string", "only items with this label"),
                PAGE,
                AFTER,
            ])
            .resp(200, "Page<WorkItem>"),
        r(Get, "/work-items/{id}", Read, "Get a work item", h::work_item_get).resp(200, "WorkItem"),
        r(Patch, "/work-items/{id}", Operate, "Edit a work item", h::work_item_update)
            .body("UpdateWorkItem")
            .resp(200, "WorkItemChanged"),
        r(Post, "/work-items/{id}/submit", Operate, "Submit a draft item (for approval)", h::work_item_submit)
            .resp(200, "WorkItemChanged"),
        r(Post, "/work-items/{id}/cancel", Operate, "Cancel a work item", h::work_item_cancel)
            .opt_body("CancelBody")
            .resp(200, "WorkItem"),
        r(Post, "/work-items/{id}/policy", Operate, "Set retry policy overrides", h::work_item_policy)
            .body("RetryOverrides")
            .resp(200, "WorkItem"),
        r(Post, "/work-items/{id}/requeue", Operate, "Requeue a work item", h::work_item_requeue)
            .opt_body("RequeueRequest")
            .resp(200, "WorkItem"),
        r(Put, "/work-items/{id}/recipe", Operate, "Attach a recipe", h::work_item_recipe)
            .body("AttachRecipe")
            .resp(200, "WorkItemChanged"),
        r(Get, "/work-items/{id}/runs", Read, "Runs of a work item", h::work_item_runs)
            .q(&[PAGE, AFTER])
            .resp(200, "Page<Run>"),
        // recipes
        r(Post, "/recipes", Operate, "Create a recipe from YAML", h::recipe_create)
            .recipe_body()
            .resp(201, "ToolRecipe"),
        r(Post, "/recipes/validate", Read, "Validate a recipe without saving it", h::recipe_validate)
            .recipe_body()
            .resp(200, "RecipeSpec"),
        r(Get, "/recipes", Read, "List recipes", h::recipe_list).q(&[PAGE, AFTER]).resp(200, "Page<ToolRecipe>"),
        r(Get, "/recipes/{id}", Read, "Get a recipe", h::recipe_get).resp(200, "ToolRecipe"),
        // approvals
        r(Get, "/approvals", Read, "List approval requests", h::approval_list)
            .q(&[
                ("state", "string", "pending (default), approved, rejected, superseded or all"),
                ("project_id", "uuid", "only this project"),
                PAGE,
                AFTER,
            ])
            .resp(200, "Page<ApprovalRequest>"),
        r(Get, "/approvals/{id}", Read, "Get an approval request", h::approval_get).resp(200, "ApprovalRequest"),
        r(Post, "/approvals/{id}/approve", Operate, "Approve", h::approval_approve)
            .opt_body("DecideBody")
            .resp(200, "DecisionResult"),
        r(Post, "/approvals/{id}/reject", Operate, "Reject", h::approval_reject)
            .opt_body("DecideBody")
            .resp(200, "DecisionResult"),
        // scheduler
        r(
            Post,
            "/scheduler/enqueue",
            Operate,
            "Enqueue one item, or a batch with {\"items\": [...]}",
            h::scheduler_enqueue,
        )
        .body("EnqueueItemOrBatch")
        .resp(200, "ScheduledTaskOrBatch"),
        r(Post, "/scheduler/tick", Operate, "Promote due retries and reap expired leases", h::scheduler_tick)
            .resp(200, "TickReport"),
        r(Get, "/scheduler/queue", Read, "The queue, highest priority first", h::scheduler_queue)
            .q(&[("project_id", "uuid", "only this project"), PAGE, AFTER])
            .resp(200, "Page<ScheduledTask>"),
        // runs
        r(Get, "/runs", Read, "List runs", h::run_list)
            .q(&[
                ("work_item_id", "uuid", "only this work item"),
                ("state", "string", "only this state (or `all`)"),
                ("agent_id", "string", "only this agent"),
                PAGE,
                AFTER,
            ])
            .resp(200, "Page<Run>"),
        r(Get, "/runs/{id}", Read, "Get a run", h::run_get).resp(200, "Run"),
        r(Post, "/runs/{id}/cancel", Operate, "Cancel a run and its work item", h::run_cancel)
            .opt_body("CancelBody")
            .resp(200, "Run"),
        r(Post, "/runs/{id}/requeue", Operate, "Requeue a run's work item", h::run_requeue)
            .opt_body("RequeueRequest")
            .resp(200, "WorkItem"),
        r(Get, "/runs/{id}/result", Read, "What the run changed: branch, commits, diff stats", h::run_result)
            .resp(200, "RunResultView"),
        r(Get, "/runs/{id}/diff", Read, "The run's patch (text/x-diff, cut at 2 MiB with a marker)", h::run_diff)
            .resp(200, "diff"),
        r(Get, "/runs/{id}/logs", Read, "Read log lines after a sequence number", h::run_logs)
            .q(&[SEQ_AFTER, SEQ_LIMIT])
            .resp(200, "SeqPage<LogEntry>"),
        r(Get, "/runs/{id}/logs/stream", Read, "Follow log lines (SSE; resumes from Last-Event-ID)", sse::stream_logs)
            .q(&[SEQ_AFTER])
            .resp(200, "sse"),
        r(Get, "/runs/{id}/steps", Read, "Read step events after a sequence number", h::run_steps)
            .q(&[SEQ_AFTER, SEQ_LIMIT])
            .resp(200, "SeqPage<StepEvent>"),
        r(Get, "/runs/{id}/info-requests", Read, "The run's questions", h::run_info_requests)
            .q(&[PAGE, AFTER])
            .resp(200, "Page<InfoRequestView>"),
        // info requests
        r(Get, "/info-requests", Read, "List info requests", h::info_list)
            .q(&[
                ("state", "string", "pending (default), answered, cancelled, expired or all"),
                ("project_id", "uuid", "only this project"),
                ("run_id", "uuid", "only this run"),
                PAGE,
                AFTER,
            ])
            .resp(200, "Page<InfoRequestView>"),
        r(
            Get,
            "/info-requests/{id}",
            Read,
            "Get an info request (answer only for admins and its run's agent)",
            h::info_get,
        )
        .resp(200, "InfoRequestView"),
        r(Post, "/info-requests/{id}/answer", Operate, "Answer an info request", h::info_answer)
            .body("AnswerBody")
            .resp(200, "InfoAnswered"),
        // agent protocol
        r(Post, "/agents/claim", Agent, "Claim up to N runs (long poll with wait_ms)", agent::claim)
            .body("ClaimBody")
            .resp(200, "ClaimResponse")
            .long_poll(),
        r(Get, "/agents/work", Agent, "Wake-up generation (long poll with seen and timeout_ms)", agent::work)
            .q(&[
                ("seen", "integer", "the generation already seen; wait until it changes"),
                ("timeout_ms", "integer", "longest wait (capped at 30000)"),
            ])
            .resp(200, "WorkGeneration")
            .long_poll(),
        r(Post, "/runs/{id}/heartbeat", Agent, "Renew the lease", agent::heartbeat)
            .body("TokenBody")
            .resp(200, "Lease"),
        r(Post, "/runs/{id}/start", Agent, "Mark the run started", agent::start).body("TokenBody").resp(200, "Run"),
        r(Post, "/runs/{id}/logs", Agent, "Append log lines", agent::append_logs)
            .body("AppendLogs")
            .resp(200, "LogsAppended"),
        r(Post, "/runs/{id}/steps", Agent, "Record step events", agent::record_steps)
            .body("RecordSteps")
            .resp(200, "StepsRecorded"),
        r(Post, "/runs/{id}/info-requests", Agent, "Ask humans for input", agent::ask)
            .body("AskBody")
            .resp(200, "Asked"),
        r(Post, "/runs/{id}/complete", Agent, "Complete the run", agent::complete)
            .body("CompleteBody")
            .resp(200, "CompletionResult"),
        r(
            Post,
            "/runs/{id}/release",
            Agent,
            "Hand the run back without using an attempt (graceful stop); the next claim resumes it",
            agent::release,
        )
        .body("ReleaseBody")
        .resp(200, "Run"),
        r(Post, "/runs/{id}/result", Agent, "Record what the run changed and its patch", agent::record_result)
            .body("RecordResult")
            .resp(200, "Recorded"),
        r(
            Post,
            "/agents/cancellations",
            Agent,
            "Which of the agent's runs are no longer its own (long poll with timeout_ms)",
            agent::cancellations,
        )
        .body("CancellationsBody")
        .resp(200, "Cancellations")
        .long_poll(),
    ]
}
