//! The CLI client: commands over the HTTP API for a person at a terminal.

use crate::client::{enc, items, s, with_query, work_item, Client, ClientError, DEFAULT_SERVER_URL};
use crate::table::{render, time};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// Options every client command takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Client options")]
pub struct ClientOpts {
    /// Server URL.
    #[arg(long, global = true, env = "ORCH_SERVER_URL", default_value = DEFAULT_SERVER_URL)]
    pub server: String,
    /// Bearer token (when the server has ORCH_API_TOKENS configured).
    #[arg(long, global = true, env = "ORCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's raw JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientOpts {
    /// The HTTP client for these options.
    pub fn client(&self) -> Result<Client, ClientError> {
        Client::new(&self.server, self.token.clone())
    }
}

/// Projects.
#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    /// Create a project.
    Create {
        /// Its name.
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// The git repository agents work on: an absolute path, file://, https://, ssh:// or user@host:path.
        #[arg(long = "repo")]
        repo: Option<String>,
        /// The branch work items start from (default: the repository's default branch).
        #[arg(long, requires = "repo")]
        base_branch: Option<String>,
    },
    /// Set (or with --none remove) a project's repository.
    SetRepo {
        /// Project id.
        id: String,
        /// The repository URL or path.
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        repo: Option<String>,
        /// The branch work items start from.
        #[arg(long)]
        base_branch: Option<String>,
        /// Remove the repository (runs then get an empty directory).
        #[arg(long)]
        none: bool,
    },
    /// List projects.
    List,
    /// Show one project.
    Show {
        /// Project id.
        id: String,
    },
}

/// A project's vision.
#[derive(Debug, Subcommand)]
pub enum VisionCmd {
    /// Write a new version of the vision.
    Set {
        /// Project id.
        project_id: String,
        /// The text (or use --file).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Read the text from this file.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Show the latest vision (or --version N).
    Show {
        /// Project id.
        project_id: String,
        /// An older version.
        #[arg(long)]
        version: Option<u32>,
    },
}

/// Requirements drafts.
#[derive(Debug, Subcommand)]
pub enum RequirementsCmd {
    /// Propose requirements for a project (each becomes a work item when approved).
    Propose {
        /// Project id.
        project_id: String,
        /// A requirement as "title: description" (repeat for several).
        #[arg(long = "req", required = true)]
        reqs: Vec<String>,
        /// Title of the proposal.
        #[arg(long)]
        title: Option<String>,
    },
    /// List a project's drafts.
    List {
        /// Project id.
        project_id: String,
    },
    /// Approve a draft (creates its work items).
    Approve {
        /// Draft id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reject a draft.
    Reject {
        /// Draft id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Work items.
#[derive(Debug, Subcommand)]
pub enum WorkItemCmd {
    /// Create a work item.
    Add {
        /// Project id.
        #[arg(long)]
        project: String,
        /// Title.
        #[arg(long)]
        title: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// A YAML tool recipe to create and attach.
        #[arg(long)]
        recipe_file: Option<std::path::PathBuf>,
        /// A required agent capability (repeat for several).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Priority (higher runs first).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// A work item that must succeed first (repeat for several); implies --enqueue.
        #[arg(long = "depends-on")]
        depends_on: Vec<String>,
        /// Enqueue it right away (only possible when the server needs no approval).
        #[arg(long)]
        enqueue: bool,
    },
    /// List work items.
    List {
        /// Only this state (queued, running, succeeded, ...).
        #[arg(long)]
        state: Option<String>,
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
        /// Only items with this label.
        #[arg(long)]
        label: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one work item.
    Show {
        /// Work item id.
        id: String,
    },
    /// Submit a draft work item (for approval when the server requires it).
    Submit {
        /// Work item id.
        id: String,
    },
    /// Cancel a work item.
    Cancel {
        /// Work item id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Approval requests.
#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// List approval requests (pending by default).
    List {
        /// pending, approved, rejected or superseded.
        #[arg(long)]
        state: Option<String>,
    },
}

/// Runs.
#[derive(Debug, Subcommand)]
pub enum RunsCmd {
    /// List runs.
    List {
        /// Only runs of this work item.
        #[arg(long)]
        work_item: Option<String>,
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one run, its result (branch, commits, diff stats) and its step events.
    Show {
        /// Run id.
        id: String,
    },
    /// Print the run's diff (the patch of its work item's branch).
    Diff {
        /// Run id.
        id: String,
    },
    /// Cancel a run.
    Cancel {
        /// Run id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Info requests (questions runs ask).
#[derive(Debug, Subcommand)]
pub enum InfoCmd {
    /// List info requests (pending by default).
    List {
        /// pending, answered, cancelled or expired.
        #[arg(long)]
        state: Option<String>,
    },
    /// Answer one.
    Answer {
        /// Info request id.
        id: String,
        /// The answer.
        value: String,
    },
}

/// Tool recipes.
#[derive(Debug, Subcommand)]
pub enum RecipeCmd {
    /// Validate a YAML recipe on the server without saving it.
    Validate {
        /// The YAML file.
        file: std::path::PathBuf,
    },
    /// Store a YAML recipe.
    Create {
        /// The YAML file.
        file: std::path::PathBuf,
        /// Owning project.
        #[arg(long)]
        project: Option<String>,
    },
    /// List recipes.
    List,
}

/// Who decides approvals, writes visions and answers: with a token the server records the token's name
/// (`None` here); without one, `$USER`.
pub fn actor(o: &ClientOpts) -> Option<String> {
    if o.token.as_deref().is_some_and(|t| !t.trim().is_empty()) {
        return None;
    }
    std::env::var("USER").ok().filter(|u| !u.trim().is_empty())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

fn read_file(path: &std::path::Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", path.display())))
}

/// Prints `v` as JSON with `--json`, else runs `table`.
fn out(o: &ClientOpts, v: &Value, table: impl FnOnce(&Value)) {
    if o.json {
        print_json(v)
    } else {
        table(v)
    }
}

fn projects_table(v: &Value) {
    let rows: Vec<Vec<String>> = items(v)
        .iter()
        .map(|p| vec![s(p, "id"), s(p, "name"), time(&s(p, "created_at")), s(p, "description")])
        .collect();
    print!("{}", render(&["ID", "NAME", "CREATED", "DESCRIPTION"], &rows));
}

fn work_items_table(v: &Value) {
    let rows: Vec<Vec<String>> = items(v)
        .iter()
        .map(|w| {
            let deps = w.get("dependencies").and_then(Value::as_array).map_or(0, Vec::len);
            vec![
                s(w, "id"),
                s(w, "state"),
                s(w, "priority"),
                s(w, "attempts"),
                if deps == 0 { String::new() } else { deps.to_string() },
                s(w, "title"),
            ]
        })
        .collect();
    print!("{}", render(&["ID", "STATE", "PRI", "ATTEMPTS", "DEPS", "TITLE"], &rows));
}

fn work_item_detail(w: &Value) {
    let w = work_item(w);
    let mut rows = vec![
        ("id", s(w, "id")),
        ("title", s(w, "title")),
        ("state", s(w, "state")),
        ("project", s(w, "project_id")),
        ("priority", s(w, "priority")),
        ("attempts", s(w, "attempts")),
    ];
    for (k, f) in [
        ("recipe", "recipe_id"),
        ("approval", "approval_id"),
        ("run", "current_run_id"),
        ("not before", "run_at"),
        ("blocked", "blocked_reason"),
        ("last error", "last_error"),
    ] {
        let v = s(w, f);
        if !v.is_empty() {
            rows.push((k, if f == "run_at" { time(&v) } else { v }));
        }
    }
    if let Some(d) = w.get("dependencies").and_then(Value::as_array).filter(|d| !d.is_empty()) {
        rows.push(("depends on", d.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")));
    }
    if let Some(l) = w.get("labels").and_then(Value::as_array).filter(|d| !d.is_empty()) {
        rows.push(("labels", l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")));
    }
    for (k, v) in rows {
        println!("{:<11} {v}", format!("{k}:"));
    }
    let d = s(w, "description");
    if !d.is_empty() {
        println!("\n{d}");
    }
}

fn approvals_table(v: &Value) {
    let rows: Vec<Vec<String>> = items(v)
        .iter()
        .map(|a| {
            let subject = a.get("subject").cloned().unwrap_or_default();
            vec![
                s(a, "id"),
                s(a, "state"),
                s(&subject, "kind"),
                s(&subject, "id"),
                time(&s(a, "requested_at")),
                s(a, "decided_by"),
            ]
        })
        .collect();
    print!("{}", render(&["ID", "STATE", "SUBJECT", "SUBJECT ID", "REQUESTED", "DECIDED BY"], &rows));
}

fn runs_table(v: &Value) {
    let rows: Vec<Vec<String>> = items(v)
        .iter()
        .map(|r| {
            vec![
                s(r, "id"),
                s(r, "work_item_id"),
                s(r, "state"),
                s(r, "attempt"),
                s(r, "agent_id"),
                s(r, "exit_code"),
                time(&s(r, "claimed_at")),
                time(&s(r, "finished_at")),
            ]
        })
        .collect();
    print!("{}", render(&["ID", "WORK ITEM", "STATE", "ATTEMPT", "AGENT", "EXIT", "CLAIMED", "FINISHED"], &rows));
}

fn info_table(v: &Value) {
    let rows: Vec<Vec<String>> = items(v)
        .iter()
        .map(|q| {
            let mut prompt = s(q, "prompt");
            if let Some(c) = q.get("choices").and_then(Value::as_array).filter(|c| !c.is_empty()) {
                prompt.push_str(&format!(" [{}]", c.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("|")));
            }
            vec![s(q, "id"), s(q, "state"), s(q, "kind"), s(q, "key"), s(q, "run_id"), prompt]
        })
        .collect();
    print!("{}", render(&["ID", "STATE", "KIND", "KEY", "RUN", "PROMPT"], &rows));
}

fn drafts_table(v: &Value) {
    let rows: Vec<Vec<String>> = items(v)
        .iter()
        .map(|d| {
            let n = d.get("requirements").and_then(Value::as_array).map_or(0, Vec::len);
            vec![s(d, "id"), s(d, "state"), n.to_string(), time(&s(d, "created_at")), s(d, "title")]
        })
        .collect();
    print!("{}", render(&["ID", "STATE", "REQS", "CREATED", "TITLE"], &rows));
}

/// Parses `"title: description"` (the description is optional).
pub fn parse_requirement(r: &str) -> Result<Value, ClientError> {
    let (title, description) = match r.split_once(':') {
        Some((t, d)) => (t.trim(), d.trim()),
        None => (r.trim(), ""),
    };
    if title.is_empty() {
        return Err(ClientError::Usage(format!("--req `{r}`: expected \"title: description\"")));
    }
    Ok(json!({"title": title, "description": description}))
}

/// Creates a recipe from YAML text and returns the stored recipe.
pub async fn create_recipe(c: &Client, yaml: &str, project_id: Option<&str>) -> Result<Value, ClientError> {
    let mut body = json!({"yaml": yaml});
    if let Some(p) = project_id {
        body["project_id"] = json!(p);
    }
    c.post("/recipes", &body).await
}

/// `url (base branch b)`, or `url (the remote's default branch)`.
fn repo_text(r: &Value) -> String {
    let b = s(r, "base_branch");
    if b.is_empty() {
        format!("{} (the remote's default branch)", s(r, "url"))
    } else {
        format!("{} (base branch {b})", s(r, "url"))
    }
}

/// Runs a `project` command.
pub async fn project(o: &ClientOpts, cmd: ProjectCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        ProjectCmd::Create { name, description, repo, base_branch } => {
            let mut body = json!({"name": name, "description": description});
            if let Some(url) = repo {
                body["repository"] = json!({"url": url, "base_branch": base_branch});
            }
            let p = c.post("/projects", &body).await?;
            out(o, &p, |p| {
                println!("created project {} ({})", s(p, "id"), s(p, "name"));
                if let Some(r) = p.get("repository").filter(|r| !r.is_null()) {
                    println!("repository: {}", repo_text(r));
                }
            });
        }
        ProjectCmd::SetRepo { id, repo, base_branch, none } => {
            let repository = if none { Value::Null } else { json!({"url": repo, "base_branch": base_branch}) };
            let p = c
                .call(Method::PATCH, &format!("/projects/{}", enc(&id)), Some(&json!({"repository": repository})))
                .await?;
            out(o, &p, |p| match p.get("repository").filter(|r| !r.is_null()) {
                Some(r) => println!("project {}: repository {}", s(p, "id"), repo_text(r)),
                None => println!("project {}: no repository", s(p, "id")),
            });
        }
        ProjectCmd::List => {
            let v = c.get("/projects?limit=1000").await?;
            out(o, &v, projects_table);
        }
        ProjectCmd::Show { id } => {
            let p = c.get(&format!("/projects/{}", enc(&id))).await?;
            out(o, &p, |p| {
                println!("id:          {}", s(p, "id"));
                println!("name:        {}", s(p, "name"));
                println!("created:     {}", time(&s(p, "created_at")));
                if let Some(r) = p.get("repository").filter(|r| !r.is_null()) {
                    println!("repository:  {}", repo_text(r));
                }
                println!("description: {}", s(p, "description"));
            });
        }
    }
    Ok(())
}

/// Runs a `vision` command.
pub async fn vision(o: &ClientOpts, cmd: VisionCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        VisionCmd::Set { project_id, text, file } => {
            let text = match (text, file) {
                (_, Some(f)) => read_file(&f)?,
                (Some(t), None) => t,
                (None, None) => return Err(ClientError::Usage("give the text or --file".into())),
            };
            let v = c
                .call(
                    Method::PUT,
                    &format!("/projects/{}/vision", enc(&project_id)),
                    Some(&json!({"text": text, "author": actor(o)})),
                )
                .await?;
            out(o, &v, |v| println!("vision version {} saved for project {}", s(v, "version"), s(v, "project_id")));
        }
        VisionCmd::Show { project_id, version } => {
            let path = with_query(
                &format!("/projects/{}/vision", enc(&project_id)),
                &[("version", version.map(|v| v.to_string()))],
            );
            let v = c.get(&path).await?;
            out(o, &v, |v| {
                println!("version {} by {} at {}\n", s(v, "version"), s(v, "author"), time(&s(v, "created_at")));
                println!("{}", s(v, "text"));
            });
        }
    }
    Ok(())
}

/// Runs a `requirements` command.
pub async fn requirements(o: &ClientOpts, cmd: RequirementsCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        RequirementsCmd::Propose { project_id, reqs, title } => {
            let specs = reqs.iter().map(|r| parse_requirement(r)).collect::<Result<Vec<_>, _>>()?;
            let title = title.unwrap_or_else(|| format!("{} requirement(s)", specs.len()));
            let v = c
                .post(
                    &format!("/projects/{}/requirements", enc(&project_id)),
                    &json!({"title": title, "requirements": specs, "author": actor(o)}),
                )
                .await?;
            out(o, &v, |v| {
                let d = v.get("draft").unwrap_or(v);
                println!("proposed draft {} ({}, {} requirement(s))", s(d, "id"), s(d, "state"), specs.len());
                if let Some(a) = v.get("approval").filter(|a| !a.is_null()) {
                    println!("approval request {} is pending", s(a, "id"));
                }
            });
        }
        RequirementsCmd::List { project_id } => {
            let v = c.get(&format!("/projects/{}/requirements", enc(&project_id))).await?;
            out(o, &v, drafts_table);
        }
        RequirementsCmd::Approve { id, reason } => decide_draft(o, &c, &id, "approve", reason).await?,
        RequirementsCmd::Reject { id, reason } => decide_draft(o, &c, &id, "reject", reason).await?,
    }
    Ok(())
}

async fn decide_draft(
    o: &ClientOpts,
    c: &Client,
    id: &str,
    what: &str,
    reason: Option<String>,
) -> Result<(), ClientError> {
    let v = c.post(&format!("/requirements/{}/{what}", enc(id)), &json!({"by": actor(o), "reason": reason})).await?;
    out(o, &v, |v| {
        let d = v.get("draft").filter(|d| !d.is_null()).unwrap_or(v);
        println!("draft {} is {}", s(d, "id"), s(d, "state"));
        let created = v.get("work_items").map(items).unwrap_or_default();
        if !created.is_empty() {
            println!("work items created:");
            work_items_table(&Value::Array(created));
        }
    });
    Ok(())
}

/// Runs a `work-item` command.
pub async fn work_item_cmd(o: &ClientOpts, cmd: WorkItemCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        WorkItemCmd::Add { project, title, description, recipe_file, labels, priority, depends_on, enqueue } => {
            let mut body = json!({
                "project_id": project, "title": title, "description": description,
                "labels": labels, "priority": priority,
            });
            if let Some(f) = recipe_file {
                let yaml = read_file(&f)?;
                let r = create_recipe(&c, &yaml, Some(&project)).await?;
                if !o.json {
                    println!("created recipe {} ({})", s(&r, "id"), s(&r, "name"));
                }
                body["recipe_id"] = json!(s(&r, "id"));
            }
            if enqueue || !depends_on.is_empty() {
                body["enqueue"] = json!({"depends_on": depends_on});
            }
            let v = c.post("/work-items", &body).await?;
            out(o, &v, |v| {
                let w = work_item(v);
                println!("created work item {} ({})", s(w, "id"), s(w, "state"));
                if let Some(a) = v.get("approval").filter(|a| !a.is_null()) {
                    println!("approval request {} is pending: orchestrator approve {}", s(a, "id"), s(a, "id"));
                }
            });
        }
        WorkItemCmd::List { state, project, label, limit } => {
            let path = with_query(
                "/work-items",
                &[
                    ("state", state),
                    ("project_id", project),
                    ("label", label),
                    ("limit", Some(limit.unwrap_or(1000).to_string())),
                ],
            );
            let v = c.get(&path).await?;
            out(o, &v, work_items_table);
        }
        WorkItemCmd::Show { id } => {
            let v = c.get(&format!("/work-items/{}", enc(&id))).await?;
            out(o, &v, work_item_detail);
        }
        WorkItemCmd::Submit { id } => {
            let v = c.post(&format!("/work-items/{}/submit", enc(&id)), &json!({})).await?;
            out(o, &v, |v| {
                let w = work_item(v);
                println!("work item {} is {}", s(w, "id"), s(w, "state"));
                if let Some(a) = v.get("approval").filter(|a| !a.is_null()) {
                    println!("approval request {} is pending", s(a, "id"));
                }
            });
        }
        WorkItemCmd::Cancel { id, reason } => {
            let v = c.post(&format!("/work-items/{}/cancel", enc(&id)), &json!({"reason": reason})).await?;
            out(o, &v, |v| println!("work item {} is {}", s(work_item(v), "id"), s(work_item(v), "state")));
        }
    }
    Ok(())
}

/// Runs `approvals list`.
pub async fn approvals(o: &ClientOpts, cmd: ApprovalsCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        ApprovalsCmd::List { state } => {
            let v = c.get(&with_query("/approvals", &[("state", state), ("limit", Some("1000".into()))])).await?;
            out(o, &v, approvals_table);
        }
    }
    Ok(())
}

/// Runs `approve ID` / `reject ID` (`what` is `approve` or `reject`).
pub async fn decide_approval(o: &ClientOpts, id: &str, what: &str, reason: Option<String>) -> Result<(), ClientError> {
    let c = o.client()?;
    let v = c.post(&format!("/approvals/{}/{what}", enc(id)), &json!({"by": actor(o), "reason": reason})).await?;
    out(o, &v, |v| {
        let a = v.get("approval").filter(|a| !a.is_null()).unwrap_or(v);
        println!("approval {} is {}", s(a, "id"), s(a, "state"));
        let changed = v.get("work_items").map(items).unwrap_or_default();
        if !changed.is_empty() {
            work_items_table(&Value::Array(changed));
        }
    });
    Ok(())
}

/// Options of `enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Work item id.
    pub id: String,
    /// New priority.
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Not claimable before this time (RFC 3339, e.g. 2030-01-01T09:00:00Z).
    #[arg(long, conflicts_with = "delay")]
    pub not_before: Option<String>,
    /// Not claimable for this many seconds.
    #[arg(long)]
    pub delay: Option<u64>,
    /// A work item that must succeed first (repeat for several).
    #[arg(long = "depends-on")]
    pub depends_on: Vec<String>,
}

/// Runs `enqueue`.
pub async fn enqueue(o: &ClientOpts, a: EnqueueArgs) -> Result<(), ClientError> {
    let not_before = match (a.not_before, a.delay) {
        (Some(t), _) => Some(
            chrono::DateTime::parse_from_rfc3339(&t)
                .map_err(|e| ClientError::Usage(format!("--not-before `{t}`: not an RFC 3339 time ({e})")))?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(d)) => Some(chrono::Utc::now() + chrono::Duration::seconds(d.min(i64::MAX as u64) as i64)),
        (None, None) => None,
    };
    let c = o.client()?;
    let body = json!({
        "work_item_id": a.id, "priority": a.priority, "depends_on": a.depends_on,
        "not_before": not_before.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    });
    let v = c.post("/scheduler/enqueue", &body).await?;
    out(o, &v, |v| {
        let tasks = if v.is_object() && v.get("work_item_id").is_some() { vec![v.clone()] } else { items(v) };
        for t in tasks {
            let mut line =
                format!("enqueued {} ({}, priority {})", s(&t, "work_item_id"), s(&t, "state"), s(&t, "priority"));
            let pending = t.get("pending_dependencies").and_then(Value::as_u64).unwrap_or(0);
            if pending > 0 {
                line.push_str(&format!(", waiting for {pending} dependenc{}", if pending == 1 { "y" } else { "ies" }));
            }
            if let Some(at) = t.get("run_at").and_then(Value::as_str) {
                line.push_str(&format!(", not before {}", time(at)));
            }
            println!("{line}");
        }
    });
    Ok(())
}

/// Runs `tick`.
pub async fn tick(o: &ClientOpts) -> Result<(), ClientError> {
    let v = o.client()?.post("/scheduler/tick", &json!({})).await?;
    out(o, &v, |v| {
        let n = |k: &str| v.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        println!(
            "promoted {} retr(ies), reaped {} lost run(s), expired {} run(s)",
            n("promoted"),
            n("reaped"),
            n("expired")
        );
    });
    Ok(())
}

/// Runs a `runs` command.
pub async fn runs(o: &ClientOpts, cmd: RunsCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        RunsCmd::List { work_item, state, limit } => {
            let path = with_query(
                "/runs",
                &[("work_item_id", work_item), ("state", state), ("limit", Some(limit.unwrap_or(1000).to_string()))],
            );
            let v = c.get(&path).await?;
            out(o, &v, runs_table);
        }
        RunsCmd::Show { id } => {
            let run = c.get(&format!("/runs/{}", enc(&id))).await?;
            let steps = c.get(&format!("/runs/{}/steps", enc(&id))).await?;
            let result = match c.get(&format!("/runs/{}/result", enc(&id))).await {
                Ok(r) => r,
                Err(ClientError::Api { code, .. }) if code == "not_found" => Value::Null,
                Err(e) => return Err(e),
            };
            if o.json {
                print_json(&json!({"run": run, "steps": steps, "result": result}));
                return Ok(());
            }
            for (k, f) in [
                ("id", "id"),
                ("work item", "work_item_id"),
                ("state", "state"),
                ("attempt", "attempt"),
                ("agent", "agent_id"),
                ("exit code", "exit_code"),
                ("error", "error"),
            ] {
                let v = s(&run, f);
                if !v.is_empty() {
                    println!("{:<11} {v}", format!("{k}:"));
                }
            }
            for (k, f) in [("claimed", "claimed_at"), ("started", "started_at"), ("finished", "finished_at")] {
                let v = s(&run, f);
                if !v.is_empty() {
                    println!("{:<11} {}", format!("{k}:"), time(&v));
                }
            }
            if let Some(u) = run.get("usage").filter(|u| u.get("input_tokens").and_then(Value::as_u64).unwrap_or(0) > 0)
            {
                println!("{:<11} {} in, {} out", "tokens:", s(u, "input_tokens"), s(u, "output_tokens"));
            }
            if !result.is_null() {
                let short = |k: &str| s(&result, k).chars().take(12).collect::<String>();
                println!(
                    "{:<11} {} {}..{}{}",
                    "branch:",
                    s(&result, "branch"),
                    short("base_commit"),
                    short("head_commit"),
                    if result["pushed"] == true { " (pushed)" } else { "" }
                );
                println!(
                    "{:<11} {} file(s), +{} -{} (orchestrator runs diff {id})",
                    "changes:",
                    s(&result, "files_changed"),
                    s(&result, "insertions"),
                    s(&result, "deletions")
                );
            }
            let rows: Vec<Vec<String>> = items(&steps)
                .iter()
                .map(|e| vec![s(e, "seq"), s(e, "step_index"), s(e, "kind"), time(&s(e, "at")), s(e, "name")])
                .collect();
            if !rows.is_empty() {
                println!();
                print!("{}", render(&["SEQ", "STEP", "EVENT", "AT", "NAME"], &rows));
            }
        }
        RunsCmd::Diff { id } => {
            let patch = c.get_text(&format!("/runs/{}/diff", enc(&id))).await?;
            if o.json {
                print_json(&json!({"diff": patch}));
            } else {
                print!("{patch}");
            }
        }
        RunsCmd::Cancel { id, reason } => {
            let v = c.post(&format!("/runs/{}/cancel", enc(&id)), &json!({"reason": reason})).await?;
            out(o, &v, |v| println!("run {} is {}", s(v, "id"), s(v, "state")));
        }
    }
    Ok(())
}

/// Runs an `info` command.
pub async fn info(o: &ClientOpts, cmd: InfoCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        InfoCmd::List { state } => {
            let v = c.get(&with_query("/info-requests", &[("state", state), ("limit", Some("1000".into()))])).await?;
            out(o, &v, info_table);
        }
        InfoCmd::Answer { id, value } => {
            let v = c
                .post(&format!("/info-requests/{}/answer", enc(&id)), &json!({"value": value, "answered_by": actor(o)}))
                .await?;
            out(o, &v, |v| {
                let r = v.get("info_request").unwrap_or(v);
                println!("answered {} ({})", s(r, "id"), s(r, "key"));
                if v.get("resumed").and_then(Value::as_bool) == Some(true) {
                    println!("all questions answered: the work item is claimable again");
                }
            });
        }
    }
    Ok(())
}

/// Runs a `recipe` command.
pub async fn recipe(o: &ClientOpts, cmd: RecipeCmd) -> Result<(), ClientError> {
    let c = o.client()?;
    match cmd {
        RecipeCmd::Validate { file } => {
            let yaml = read_file(&file)?;
            let v = c.post("/recipes/validate", &json!({"yaml": yaml})).await?;
            out(o, &v, |v| {
                let spec = v.get("spec").or_else(|| v.get("recipe")).unwrap_or(v);
                let n = |k: &str| spec.get(k).and_then(Value::as_array).map_or(0, Vec::len);
                println!(
                    "{}: valid recipe `{}` ({} step(s), {} input(s))",
                    file.display(),
                    s(spec, "name"),
                    n("steps"),
                    n("inputs")
                );
            });
        }
        RecipeCmd::Create { file, project } => {
            let yaml = read_file(&file)?;
            let v = create_recipe(&c, &yaml, project.as_deref()).await?;
            out(o, &v, |v| println!("created recipe {} ({})", s(v, "id"), s(v, "name")));
        }
        RecipeCmd::List => {
            let v = c.get("/recipes?limit=1000").await?;
            out(o, &v, |v| {
                let rows: Vec<Vec<String>> = items(v)
                    .iter()
                    .map(|r| {
                        let steps = r.pointer("/spec/steps").and_then(Value::as_array).map_or(0, Vec::len);
                        vec![s(r, "id"), s(r, "name"), steps.to_string(), s(r, "project_id"), time(&s(r, "created_at"))]
                    })
                    .collect();
                print!("{}", render(&["ID", "NAME", "STEPS", "PROJECT", "CREATED"], &rows));
            });
        }
    }
    Ok(())
}

/// Run states after which no more log lines come.
pub fn run_is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled" | "lost")
}

fn print_log_line(o: &ClientOpts, e: &Value) {
    if o.json {
        println!("{e}");
        return;
    }
    let line = s(e, "line");
    match s(e, "stream").as_str() {
        "stderr" => println!("[stderr] {line}"),
        "system" => println!("[agent] {line}"),
        _ => println!("{line}"),
    }
}

/// Prints every log line after `after`; returns the last sequence number seen.
async fn print_logs_after(o: &ClientOpts, c: &Client, id: &str, mut after: u64) -> Result<u64, ClientError> {
    loop {
        let v = c.get(&format!("/runs/{}/logs?after={after}&limit=1000", enc(id))).await?;
        let lines = items(&v);
        if lines.is_empty() {
            return Ok(after);
        }
        for e in &lines {
            let seq = e.get("seq").and_then(Value::as_u64).unwrap_or(after);
            if seq > after {
                print_log_line(o, e);
                after = seq;
            }
        }
    }
}

/// Runs `logs ID [--follow]`.
pub async fn logs(o: &ClientOpts, id: &str, follow: bool, after: u64) -> Result<(), ClientError> {
    let c = o.client()?;
    if !follow {
        print_logs_after(o, &c, id, after).await?;
        return Ok(());
    }
    let mut last = after;
    // Consecutive connection failures; the follower gives up after about a minute without the server.
    let mut failures = 0u32;
    let mut announced = false;
    loop {
        let mut lost = |e: ClientError, failures: &mut u32| -> Result<(), ClientError> {
            *failures += 1;
            if *failures > 60 {
                return Err(e);
            }
            if !announced {
                eprintln!("(connection lost: {e}; reconnecting)");
                announced = true;
            }
            Ok(())
        };
        match follow_once(o, &c, id, &mut last).await {
            Ok(()) => failures = 0,
            Err(e @ ClientError::Api { .. }) => return Err(e),
            Err(e) => lost(e, &mut failures)?,
        }
        // The stream ended: stop when the run is over (after catching up), else reconnect, resuming after
        // the last line printed.
        match c.get(&format!("/runs/{}", enc(id))).await {
            Ok(run) if run_is_final(&s(&run, "state")) => {
                print_logs_after(o, &c, id, last).await?;
                return Ok(());
            }
            Ok(_) => {}
            Err(e @ ClientError::Api { .. }) => return Err(e),
            Err(e) => lost(e, &mut failures)?,
        }
        if failures == 0 {
            announced = false;
        }
        tokio::time::sleep(Duration::from_millis(if failures == 0 { 200 } else { 1000 })).await;
    }
}

/// Follows the SSE stream once, until it ends; `last` tracks the last sequence number printed, sent as
/// `Last-Event-ID` so a reconnect resumes where this one stopped.
async fn follow_once(o: &ClientOpts, c: &Client, id: &str, last: &mut u64) -> Result<(), ClientError> {
    let mut rb =
        c.request(Method::GET, &format!("/runs/{}/logs/stream", enc(id))).header("accept", "text/event-stream");
    if *last > 0 {
        rb = rb.header("last-event-id", last.to_string());
    }
    let mut resp = rb.send().await.map_err(|e| c.transport(e))?;
    if !resp.status().is_success() {
        return crate::client::decode(resp).await.map(|_| ());
    }
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(ch)) => ch,
            Ok(None) => return Ok(()),
            Err(e) => return Err(ClientError::Transport(format!("log stream interrupted: {e}"))),
        };
        buf.extend_from_slice(&chunk);
        while let Some((end, sep)) = find_event_end(&buf) {
            let raw: Vec<u8> = buf.drain(..end + sep).collect();
            let ev = parse_sse_event(&String::from_utf8_lossy(&raw[..end]));
            match ev.event.as_deref() {
                Some("end" | "done" | "eof" | "closed") => return Ok(()),
                Some("error") => eprintln!("(server: {})", ev.data),
                _ => {}
            }
            if ev.data.is_empty() {
                continue;
            }
            let seq = ev.id.as_deref().and_then(|i| i.parse::<u64>().ok());
            match serde_json::from_str::<Value>(&ev.data) {
                Ok(v) if v.get("line").is_some() => {
                    let seq = seq.or_else(|| v.get("seq").and_then(Value::as_u64));
                    if seq.is_none_or(|q| q > *last) {
                        print_log_line(o, &v);
                    }
                    if let Some(q) = seq {
                        *last = (*last).max(q);
                    }
                }
                _ if matches!(ev.event.as_deref(), None | Some("message" | "log")) => {
                    if seq.is_none_or(|q| q > *last) {
                        println!("{}", ev.data);
                    }
                    if let Some(q) = seq {
                        *last = (*last).max(q);
                    }
                }
                _ => {}
            }
        }
    }
}

/// One parsed Server-Sent Event.
#[derive(Debug, Default, PartialEq)]
pub struct SseEvent {
    /// `id:`.
    pub id: Option<String>,
    /// `event:`.
    pub event: Option<String>,
    /// `data:` lines joined with newlines.
    pub data: String,
}

/// Finds the end of the first complete event in `buf`: (index of the blank line, its length).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
    }
    None
}

/// Parses the lines of one SSE event (comments and unknown fields ignored).
pub fn parse_sse_event(text: &str) -> SseEvent {
    let mut ev = SseEvent::default();
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => ev.id = Some(value.to_string()),
            "event" => ev.event = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    ev.data = data.join("\n");
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sse_events() {
        let ev = parse_sse_event("id: 7\nevent: log\ndata: {\"line\":\"hi\"}\n: comment");
        assert_eq!(ev, SseEvent { id: Some("7".into()), event: Some("log".into()), data: "{\"line\":\"hi\"}".into() });
        assert_eq!(parse_sse_event("data: a\ndata: b").data, "a\nb");
        assert_eq!(find_event_end(b"data: x\n\nrest"), Some((7, 2)));
        assert_eq!(find_event_end(b"data: x\r\n\r\n"), Some((7, 4)));
        assert_eq!(find_event_end(b"data: x\n"), None);
    }

    #[test]
    fn parses_requirements() {
        assert_eq!(
            parse_requirement("Login: users sign in").unwrap(),
            json!({"title": "Login", "description": "users sign in"})
        );
        assert_eq!(parse_requirement("Just a title").unwrap(), json!({"title": "Just a title", "description": ""}));
        assert!(parse_requirement(": nothing").is_err());
    }
}
