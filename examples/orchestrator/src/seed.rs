//! `orchestrator seed`: a sample project, over the HTTP API of a running server.

use crate::cli::{actor, ClientOpts};
use crate::client::{s, work_item, Client, ClientError};
use serde_json::{json, Value};

/// The sample recipe: one input (with a default, so it runs without a human) and two steps.
pub const SAMPLE_RECIPE: &str = r#"name: greet-and-count
description: Says hello into greeting.txt, then writes and counts a file (on the work item's branch)
inputs:
  - name: GREETING
    prompt: "How should the agent greet?"
    default: hello
steps:
  - name: greet
    run: echo "$GREETING from the sample recipe" | tee -a greeting.txt
  - name: count
    run: printf 'one\ntwo\nthree\n' > lines.txt && wc -l < lines.txt
    timeout: 60
"#;

/// Creates (once) the sample repository `orchestrator-sample.git` in the working directory: a bare
/// repository with one commit on `main`. Returns its absolute path, or why it could not.
pub fn sample_repository() -> Result<std::path::PathBuf, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
    let bare = cwd.join("orchestrator-sample.git");
    if bare.join("HEAD").exists() {
        return Ok(bare);
    }
    let git = |dir: &std::path::Path, args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=orchestrator seed", "-c", "user.email=seed@localhost"])
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("cannot run git: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
    let work = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    std::fs::write(work.path().join("README.md"), "# Sample\n\nA repository the sample work items change.\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(work.path().join("greeting.txt"), "greetings so far:\n").map_err(|e| e.to_string())?;
    git(work.path(), &["init", "--quiet", "--initial-branch=main"])?;
    git(work.path(), &["add", "."])?;
    git(work.path(), &["commit", "--quiet", "-m", "Sample repository"])?;
    let tmp = cwd.join(format!(".orchestrator-sample-{}.git", std::process::id()));
    let t = tmp.to_string_lossy().into_owned();
    git(&cwd, &["clone", "--quiet", "--bare", &work.path().to_string_lossy(), &t])?;
    std::fs::rename(&tmp, &bare).map_err(|e| format!("cannot move the sample repository in place: {e}"))?;
    Ok(bare)
}

/// What `seed` made (printed as JSON with `--json`).
#[derive(Debug, Default, serde::Serialize)]
pub struct Seeded {
    /// The project's id.
    pub project_id: String,
    /// The sample repository's path, when one was made.
    pub repository: Option<String>,
    /// The vision version written.
    pub vision_version: u64,
    /// The recipe's id.
    pub recipe_id: String,
    /// The work items, in creation order: (id, title).
    pub work_items: Vec<(String, String)>,
    /// Approval requests approved on the way.
    pub approved: Vec<String>,
}

async fn create_item(o: &ClientOpts, c: &Client, body: Value, seeded: &mut Seeded) -> Result<String, ClientError> {
    let v = c.post("/work-items", &body).await?;
    let w = work_item(&v);
    let id = s(w, "id");
    seeded.work_items.push((id.clone(), s(w, "title")));
    // Under ORCH_REQUIRE_APPROVAL the item waits for a human: seed plays that human.
    let approval = v.get("approval").filter(|a| !a.is_null()).map(|a| s(a, "id"));
    let approval = approval.or_else(|| Some(s(w, "approval_id")).filter(|_| s(w, "state") == "awaiting_approval"));
    if let Some(a) = approval.filter(|a| !a.is_empty()) {
        match c.post(&format!("/approvals/{a}/approve"), &json!({"by": actor(o), "reason": "sample data"})).await {
            Ok(_) => seeded.approved.push(a),
            // With tokens, the token that created the item may not approve it (ORCH_ALLOW_SELF_APPROVAL):
            // the item waits for another person.
            Err(ClientError::Api { code, message, .. }) if code == "forbidden" => {
                eprintln!("approval {a} left pending for someone else: {message}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(id)
}

/// Creates the sample project and its work, and prints what it made.
pub async fn run(o: &ClientOpts) -> Result<Seeded, ClientError> {
    let c = o.client()?;
    let mut seeded = Seeded::default();
    let name = format!("sample-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let mut body = json!({"name": name, "description": "Sample project created by `orchestrator seed`"});
    match sample_repository() {
        Ok(path) => {
            let url = path.to_string_lossy().into_owned();
            body["repository"] = json!({"url": url, "base_branch": "main"});
            seeded.repository = Some(url);
        }
        Err(e) => eprintln!("seed: no sample repository ({e}); the sample runs in empty directories"),
    }
    let project = c.post("/projects", &body).await?;
    seeded.project_id = s(&project, "id");
    let pid = seeded.project_id.clone();
    let vision = c
        .call(
            reqwest::Method::PUT,
            &format!("/projects/{pid}/vision"),
            Some(&json!({
                "text": "A tiny pipeline that shows the orchestrator at work: a recipe with an input, \
                         a dependency between work items, and logs streamed from an agent.",
                "author": actor(o),
            })),
        )
        .await?;
    seeded.vision_version = vision.get("version").and_then(Value::as_u64).unwrap_or(0);
    let recipe = crate::cli::create_recipe(&c, SAMPLE_RECIPE, Some(&pid)).await?;
    seeded.recipe_id = s(&recipe, "id");

    let first = create_item(
        o,
        &c,
        json!({"project_id": pid, "title": "Greet with the sample recipe",
               "description": "Runs the two steps of the greet-and-count recipe.",
               "recipe_id": seeded.recipe_id, "priority": 10}),
        &mut seeded,
    )
    .await?;
    let second = create_item(
        o,
        &c,
        json!({"project_id": pid, "title": "Report after the greeting",
               "description": "Runs `echo the greeting is done` once the greeting succeeded.",
               "priority": 5}),
        &mut seeded,
    )
    .await?;
    let third = create_item(
        o,
        &c,
        json!({"project_id": pid, "title": "List the workspace",
               "description": "Runs `ls -la` in the run's workspace."}),
        &mut seeded,
    )
    .await?;
    c.post("/scheduler/enqueue", &json!({"work_item_id": first})).await?;
    c.post("/scheduler/enqueue", &json!({"work_item_id": second, "depends_on": [first]})).await?;
    c.post("/scheduler/enqueue", &json!({"work_item_id": third})).await?;

    if o.json {
        println!("{}", serde_json::to_string_pretty(&seeded).unwrap_or_default());
    } else {
        println!("seeded project {name} ({pid}) on {}", c.base());
        if let Some(r) = &seeded.repository {
            println!("  repository {r} (each work item works on its branch orch/<work item id>)");
        }
        println!("  vision version {}", seeded.vision_version);
        println!("  recipe {} (greet-and-count: input GREETING, steps greet and count)", seeded.recipe_id);
        println!("  work item {first}  Greet with the sample recipe   (recipe, queued)");
        println!("  work item {second}  Report after the greeting     (queued, depends on {first})");
        println!("  work item {third}  List the workspace            (queued)");
        for a in &seeded.approved {
            println!("  approved {a}");
        }
        println!("follow the work: orchestrator work-item list --project {pid}; orchestrator runs list");
    }
    Ok(seeded)
}

/// Seeds, then waits (up to ten minutes) for each sample work item to finish and prints its outcome and
/// the log of its last run: what `serve --seed` shows a newcomer.
pub async fn run_and_report(o: &ClientOpts) -> Result<(), ClientError> {
    let seeded = run(o).await?;
    let c = o.client()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let mut pending: Vec<(String, String)> = seeded.work_items.clone();
    while !pending.is_empty() && std::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for (id, title) in pending {
            let item = c.get(&format!("/work-items/{id}")).await?;
            let state = s(&item, "state");
            if !matches!(state.as_str(), "succeeded" | "failed" | "cancelled" | "blocked") {
                still.push((id, title));
                continue;
            }
            println!("work item {id} ({title}): {state}");
            let runs = crate::client::items(&c.get(&format!("/work-items/{id}/runs")).await?);
            if let Some(run) = runs.iter().max_by_key(|r| s(r, "claimed_at")) {
                let rid = s(run, "id");
                let logs = crate::client::items(&c.get(&format!("/runs/{rid}/logs?limit=1000")).await?);
                for l in logs {
                    println!("  [{}] {}", s(&l, "stream"), s(&l, "line"));
                }
                if let Ok(diff) = c.get_text(&format!("/runs/{rid}/diff")).await {
                    if !diff.trim().is_empty() {
                        println!("  diff of run {rid} (orchestrator runs diff {rid}):");
                        for l in diff.lines() {
                            println!("    {l}");
                        }
                    }
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }
    if !pending.is_empty() {
        println!(
            "still unfinished after ten minutes: {} work item(s); is an agent running (--agents 1)?",
            pending.len()
        );
    }
    Ok(())
}
