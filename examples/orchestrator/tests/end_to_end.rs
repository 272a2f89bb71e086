//! End-to-end tests of the real `orchestrator` binary: `serve` on a free port with a temp SQLite file,
//! driven over HTTP (as a person and as an agent would), with embedded agents, and through the CLI.

mod common;

use common::{eventually, items, str_of, work_item, Api, Server};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// The value of the Prometheus sample named exactly `sample` (name plus labels as rendered; 0 when absent).
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == sample)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

fn time(v: &Value, key: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(str_of(v, key)).unwrap_or_else(|e| panic!("{key} in {v}: {e}"))
}

async fn claim(api: &Api, agent: &str) -> Vec<Value> {
    let v = api
        .post("/agents/claim", json!({"agent_id": agent, "capabilities": [], "max": 10, "lease_ttl_seconds": 60}))
        .await;
    items(&v)
}

fn token_of(a: &Value) -> u64 {
    a.pointer("/lease/token").and_then(Value::as_u64).unwrap_or_else(|| panic!("no lease token in {a}"))
}

fn run_id_of(a: &Value) -> String {
    a.pointer("/run/id").and_then(Value::as_str).unwrap_or_else(|| panic!("no run id in {a}")).to_string()
}

fn item_id_of(a: &Value) -> String {
    a.pointer("/work_item/id").and_then(Value::as_str).unwrap_or_else(|| panic!("no work item in {a}")).to_string()
}

/// The key given to servers on PostgreSQL (which never create one).
const PG_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_walks_the_whole_flow_over_http_and_stops_cleanly_on_sigterm() {
    let server = Server::start(&[], &[]).await;
    assert!(server.dir.path().join("orchestrator.db").exists());
    walk_the_flow(server, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgresql_walks_the_whole_flow_over_http() {
    let db = common::PgDb::create();
    let server = Server::start(&[], &[("ORCH_DATABASE_URL", &db.url), ("ORCH_SECRET_KEY", PG_KEY)]).await;
    assert!(server.logs().contains("PostgreSQL"), "{}", server.logs());
    assert!(!server.dir.path().join("orchestrator.db").exists());
    walk_the_flow(server, false).await;
}

/// Project, vision, requirements, approval, work items with a dependency, enqueue, an agent's claim /
/// heartbeat / logs / complete over the agent routes, the dependent released, metrics, SIGTERM.
/// `key_file`: the server made its key file (SQLite without `ORCH_SECRET_KEY`); else it was given the key.
async fn walk_the_flow(mut server: Server, key_file: bool) {
    let api = Api::new(&server.url);

    // Health, readiness, the OpenAPI document.
    assert_eq!(api.get("/healthz").await["status"], "ok");
    api.get("/readyz").await;
    assert!(api.get("/openapi.json").await.get("paths").is_some());

    // The key file was created beside the database, private.
    let key = server.dir.path().join("orchestrator.key");
    if key_file {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(server.logs().contains("orchestrator.key"), "the key file is announced:\n{}", server.logs());
    } else {
        assert!(!key.exists(), "no key file when the key is given");
    }

    // Project and vision.
    let project = api.post("/projects", json!({"name": "e2e", "description": "end to end"})).await;
    let pid = str_of(&project, "id").to_string();
    let v = api.put(&format!("/projects/{pid}/vision"), json!({"text": "ship it", "author": "tester"})).await;
    assert_eq!(v["version"], 1);
    assert_eq!(api.get(&format!("/projects/{pid}/vision")).await["text"], "ship it");

    // Requirements proposed, then approved: two work items.
    let d = api
        .post(
            &format!("/projects/{pid}/requirements"),
            json!({"requirements": [
                {"title": "build", "description": "compile it"},
                {"title": "test", "description": "test it"},
            ]}),
        )
        .await;
    let draft_id = d.pointer("/draft/id").and_then(Value::as_str).unwrap().to_string();
    assert_eq!(d.pointer("/draft/state").and_then(Value::as_str), Some("proposed"));
    let decided = api.post(&format!("/requirements/{draft_id}/approve"), json!({"by": "lead"})).await;
    let created = items(&decided["work_items"]);
    assert_eq!(created.len(), 2, "{decided}");
    let build = str_of(&created[0], "id").to_string();
    let test = str_of(&created[1], "id").to_string();
    // A third, stand-alone item created directly.
    let w = api.post("/work-items", json!({"project_id": pid, "title": "docs", "priority": -1})).await;
    let docs = str_of(work_item(&w), "id").to_string();
    assert_eq!(str_of(work_item(&w), "state"), "ready");

    // Enqueue: test depends on build.
    api.post("/scheduler/enqueue", json!({"work_item_id": build, "priority": 5})).await;
    let t = api.post("/scheduler/enqueue", json!({"work_item_id": test, "depends_on": [build]})).await;
    assert_eq!(t["pending_dependencies"], 1, "{t}");
    api.post("/scheduler/enqueue", json!({"work_item_id": docs})).await;
    let listed = api.get(&format!("/work-items?project_id={pid}&state=queued")).await;
    assert_eq!(items(&listed).len(), 3);

    // An agent claims: build (priority 5) and docs, not test (waits for build).
    let claimed = claim(&api, "e2e-agent").await;
    let mut ids: Vec<String> = claimed.iter().map(item_id_of).collect();
    ids.sort();
    let mut expected = vec![build.clone(), docs.clone()];
    expected.sort();
    assert_eq!(ids, expected, "claimed {claimed:?}");
    let a_build = claimed.iter().find(|a| item_id_of(a) == build).unwrap().clone();
    let a_docs = claimed.iter().find(|a| item_id_of(a) == docs).unwrap().clone();
    let (run, token) = (run_id_of(&a_build), token_of(&a_build));

    // Heartbeat, start, logs, steps, as the agent protocol says.
    let lease = api.post(&format!("/runs/{run}/heartbeat"), json!({"token": token})).await;
    assert_eq!(lease["token"], token);
    assert_eq!(api.post(&format!("/runs/{run}/start"), json!({"token": token})).await["state"], "running");
    let appended = api
        .post(
            &format!("/runs/{run}/logs"),
            json!({"token": token, "lines": [
                {"stream": "stdout", "line": "compiling"},
                {"stream": "stderr", "line": "warning: none"},
            ]}),
        )
        .await;
    assert_eq!(appended["last_seq"], 2);
    api.post(
        &format!("/runs/{run}/steps"),
        json!({"token": token, "events": [{"step_index": 0, "kind": "started", "name": "make"}]}),
    )
    .await;
    // A stale token is refused with lease_lost.
    let (status, err) =
        api.send(Method::POST, &format!("/runs/{run}/heartbeat"), Some(json!({"token": token + 1}))).await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err.pointer("/error/code").and_then(Value::as_str), Some("lease_lost"));
    assert!(err.pointer("/error/request_id").and_then(Value::as_str).is_some());

    let logs = api.get(&format!("/runs/{run}/logs?after=0")).await;
    let lines: Vec<String> = items(&logs).iter().map(|l| str_of(l, "line").to_string()).collect();
    assert_eq!(lines, ["compiling", "warning: none"]);

    // `orchestrator logs --follow` prints the lines so far, then new ones live, and ends with the run.
    let mut follow = common::Proc::spawn(server.dir.path(), &["logs", "--follow", &run, "--server", &server.url], &[]);
    follow.wait_for_line("[stderr] warning: none", Duration::from_secs(30)).await;
    api.post(&format!("/runs/{run}/logs"), json!({"token": token, "lines": [{"stream": "stdout", "line": "linking"}]}))
        .await;
    follow.wait_for_line("linking", Duration::from_secs(30)).await;
    assert!(follow.try_wait().is_none(), "the follower waits while the run is active");

    // SIGTERM with a follower attached still exits cleanly; the follower reconnects to the restarted
    // server and resumes after the last line it printed (Last-Event-ID): no line twice, none missed.
    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}; logs:\n{}", server.logs());
    server.restart().await;
    api.post(
        &format!("/runs/{run}/logs"),
        json!({"token": token, "lines": [{"stream": "stdout", "line": "after restart"}]}),
    )
    .await;
    follow.wait_for_line("after restart", Duration::from_secs(30)).await;

    // Nothing else is claimable while build runs.
    assert!(claim(&api, "e2e-agent-2").await.is_empty());

    // Completing build releases test.
    let done = api
        .post(
            &format!("/runs/{run}/complete"),
            json!({"token": token, "outcome": {"status": "succeeded", "exit_code": 0}, "usage": null}),
        )
        .await;
    assert_eq!(done["work_item_state"], "succeeded");
    assert_eq!(done["released"], json!([test]));
    let status = follow.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", follow.logs());
    assert_eq!(follow.stdout(), ["compiling", "[stderr] warning: none", "linking", "after restart"]);
    let docs_run = run_id_of(&a_docs);
    api.post(
        &format!("/runs/{docs_run}/complete"),
        json!({"token": token_of(&a_docs), "outcome": {"status": "failed", "error": "no docs", "kind": "permanent"}}),
    )
    .await;

    let next = claim(&api, "e2e-agent").await;
    assert_eq!(next.len(), 1);
    assert_eq!(item_id_of(&next[0]), test);
    api.post(
        &format!("/runs/{}/complete", run_id_of(&next[0])),
        json!({"token": token_of(&next[0]), "outcome": {"status": "succeeded"}}),
    )
    .await;
    assert_eq!(str_of(&api.get(&format!("/work-items/{test}")).await, "state"), "succeeded");
    assert_eq!(str_of(&api.get(&format!("/work-items/{docs}")).await, "state"), "failed");

    // The SSE stream of a finished run replays its lines and ends.
    let sse = api.text(&format!("/runs/{run}/logs/stream")).await;
    assert!(sse.contains("compiling") && sse.contains("event: end"), "{sse}");

    // Metrics reflect the work: gauges from the store, counters since the restart (one claim of `test`,
    // two successful completions and one failed).
    let m = api.text("/metrics").await;
    assert_eq!(metric(&m, "orchestrator_work_items{state=\"succeeded\"}"), 2.0, "{m}");
    assert_eq!(metric(&m, "orchestrator_work_items{state=\"failed\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "orchestrator_work_items{state=\"queued\"}"), 0.0, "{m}");
    assert_eq!(metric(&m, "orchestrator_runs_claimed_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "orchestrator_run_completions_total{outcome=\"succeeded\"}"), 2.0, "{m}");

    // Unknown ids answer the JSON error shape.
    let (status, err) = api.send(Method::GET, "/work-items/0190b8d2-0000-7000-8000-000000000000", None).await;
    assert_eq!(status, 404);
    assert_eq!(err.pointer("/error/code").and_then(Value::as_str), Some("not_found"));

    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}; logs:\n{}", server.logs());
    // A restart on the same database sees the data and reuses the key file.
    let key_before = std::fs::read(&key).ok();
    server.restart().await;
    let api = Api::new(&server.url);
    assert_eq!(str_of(&api.get(&format!("/work-items/{test}")).await, "state"), "succeeded");
    assert_eq!(std::fs::read(&key).ok(), key_before);
    if key_file {
        assert!(server.logs().contains("using the secret key in"), "{}", server.logs());
    }
    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_an_embedded_agent_runs_the_seeded_work_to_success_with_logs() {
    let mut server = Server::start(&["--agents", "1"], &[("AGENT_POLL_INTERVAL_MS", "500")]).await;
    let api = Api::new(&server.url);

    let out = server.cli(&["seed", "--json"]);
    assert!(out.status.success(), "seed failed: {}", String::from_utf8_lossy(&out.stderr));
    let seeded: Value = serde_json::from_slice(&out.stdout).expect("seed --json prints JSON");
    let ids: Vec<String> =
        seeded["work_items"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 3, "{seeded}");

    // Every item succeeds (the second only after the first: it depends on it).
    for id in &ids {
        eventually(Duration::from_secs(90), &format!("work item {id} to succeed"), || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let w = api.get(&format!("/work-items/{id}")).await;
                match str_of(&w, "state") {
                    "succeeded" => Some(()),
                    "failed" | "blocked" | "cancelled" => panic!("work item ended badly: {w}"),
                    _ => None,
                }
            }
        })
        .await;
    }
    let first = api.get(&format!("/work-items/{}", ids[0])).await;
    let second = api.get(&format!("/work-items/{}", ids[1])).await;
    assert_eq!(second["dependencies"], json!([ids[0]]));

    // The recipe's steps ran, with its input's default, and their output is in the run's log.
    let run = str_of(&first, "current_run_id").to_string();
    let logs = api.get(&format!("/runs/{run}/logs")).await;
    let text: Vec<String> = items(&logs).iter().map(|l| str_of(l, "line").to_string()).collect();
    assert!(text.iter().any(|l| l.contains("hello from the sample recipe")), "{text:?}");
    assert!(text.iter().any(|l| l.trim() == "3"), "{text:?}");
    let first_finished = api.get(&format!("/runs/{run}")).await;
    let second_run = api.get(&format!("/runs/{}", str_of(&second, "current_run_id"))).await;
    assert!(time(&second_run, "claimed_at") >= time(&first_finished, "finished_at"), "dependency order");

    // The embedded agent's claims and completions (made in-process, not over HTTP) are in /metrics, with
    // the claim latency and run duration histograms.
    let m = api.text("/metrics").await;
    assert_eq!(metric(&m, "orchestrator_run_completions_total{outcome=\"succeeded\"}"), 3.0, "{m}");
    assert_eq!(metric(&m, "orchestrator_runs_claimed_total"), 3.0, "{m}");
    assert_eq!(metric(&m, "orchestrator_run_duration_seconds_count{outcome=\"succeeded\"}"), 3.0, "{m}");
    assert!(metric(&m, "orchestrator_claim_duration_seconds_count") >= 3.0, "{m}");
    assert!(m.contains("# TYPE orchestrator_run_duration_seconds histogram"), "{m}");
    assert!(metric(&m, "orchestrator_scheduler_ticks_total") >= 1.0, "the background ticker records too: {m}");

    // The CLI prints the same logs, and `logs --follow` ends by itself on a finished run.
    let out = server.cli(&["logs", &run]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from the sample recipe"));
    let out = server.cli(&["logs", "--follow", &run]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let followed = String::from_utf8_lossy(&out.stdout);
    assert!(followed.contains("hello from the sample recipe") && followed.contains('3'), "{followed}");

    let out = server.cli(&["runs", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(table.lines().filter(|l| l.contains("succeeded")).count(), 3, "{table}");

    let status = server.terminate(Duration::from_secs(45));
    assert!(status.success(), "exit status {status}; logs:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_drive_a_running_server() {
    // With ORCH_SECRET_KEY set, no key file is made.
    let key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let mut server = Server::start(&[], &[("ORCH_SECRET_KEY", key)]).await;
    assert!(!server.dir.path().join("orchestrator.key").exists());
    let stdout = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    let out = server.cli(&["project", "create", "cli-demo", "--description", "made by the CLI"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(line.starts_with("created project "), "{line}");
    let pid = line.split_whitespace().nth(2).unwrap().to_string();

    let out = server.cli(&["project", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("ID") && header.contains("NAME") && header.contains("DESCRIPTION"), "{table}");
    let row = lines.find(|l| l.contains("cli-demo")).expect("the project is listed");
    assert!(row.starts_with(&pid) && row.contains("made by the CLI"), "{table}");
    // Columns line up: NAME starts at the same offset in the header and the row.
    assert_eq!(header.find("NAME"), row.find("cli-demo"), "{table}");

    let out = server.cli(&["project", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert!(items(&v).iter().any(|p| p["id"] == pid.as_str()));

    let out = server.cli(&["vision", "set", &pid, "Be useful"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.cli(&["vision", "show", &pid]);
    assert!(stdout(&out).contains("Be useful"));

    let out = server.cli(&["requirements", "propose", &pid, "--req", "Login: users sign in", "--req", "Logout"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let draft = stdout(&out).split_whitespace().nth(2).unwrap().to_string();
    let out = server.cli(&["requirements", "approve", &draft]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Login") && stdout(&out).contains("Logout"), "{}", stdout(&out));

    // A recipe file: invalid ones are reported with their line; a valid one is attached.
    let bad = server.dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: x\nsteps:\n  - run: echo\n    timeout: 0\n").unwrap();
    let out = server.cli(&["recipe", "validate", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.starts_with("error: invalid: ") && err.contains("(request ") && err.contains("line 4"), "{err}");
    let good = server.dir.path().join("good.yaml");
    std::fs::write(&good, "name: hello\nsteps:\n  - echo one\n  - echo two\n").unwrap();
    let out = server.cli(&["recipe", "validate", good.to_str().unwrap()]);
    assert!(out.status.success() && stdout(&out).contains("2 step(s)"), "{}{}", stdout(&out), stderr(&out));

    let out = server.cli(&[
        "work-item",
        "add",
        "--project",
        &pid,
        "--title",
        "first",
        "--recipe-file",
        good.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = stdout(&out)
        .lines()
        .find(|l| l.starts_with("created work item"))
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();
    let out = server.cli(&["work-item", "add", "--project", &pid, "--title", "second", "--depends-on", &first]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.cli(&["enqueue", &first, "--priority", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("enqueued"), "{}", stdout(&out));

    let out = server.cli(&["work-item", "list", "--project", &pid, "--state", "queued"]);
    let table = stdout(&out);
    assert!(table.contains("first") && table.contains("second"), "{table}");
    let second_row = table.lines().find(|l| l.contains("second")).unwrap();
    assert!(second_row.contains("queued"), "{table}");

    let out = server.cli(&["tick"]);
    assert!(out.status.success() && stdout(&out).starts_with("promoted 0"), "{}", stdout(&out));
    let out = server.cli(&["approvals", "list"]);
    assert!(out.status.success() && stdout(&out).starts_with("ID"), "{}", stdout(&out));
    let out = server.cli(&["info", "list"]);
    assert!(out.status.success() && stdout(&out).starts_with("ID"), "{}", stdout(&out));

    // API errors: code, message and request id, non-zero exit.
    let out = server.cli(&["vision", "show", "0190b8d2-0000-7000-8000-000000000000"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.starts_with("error: not_found: ") && err.contains("(request "), "{err}");
    // No server: a clear message.
    let out = server.cli(&["project", "list", "--server", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach the server"), "{}", stderr(&out));

    // The CLI reads ORCH_SERVER_URL from a `.env` file in its working directory.
    std::fs::write(server.dir.path().join(".env"), format!("ORCH_SERVER_URL={}\n", server.url)).unwrap();
    let out = common::command(server.dir.path()).args(["project", "list"]).output().unwrap();
    assert!(out.status.success() && stdout(&out).contains("cli-demo"), "{}", stderr(&out));

    // Ctrl-C (SIGINT) stops the server cleanly too.
    let status = server.signal("INT", Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    assert!(server.logs().contains("Ctrl-C received"), "{}", server.logs());
}

#[tokio::test]
async fn serve_refuses_a_public_address_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::command(dir.path())
        .args(["serve", "--bind", "0.0.0.0:0"])
        .env("ORCH_DATABASE_URL", format!("sqlite://{}", dir.path().join("o.db").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to listen on 0.0.0.0") && err.contains("ORCH_API_TOKENS"), "{err}");
    // Nothing was created: the check comes before the store and key file.
    assert!(!dir.path().join("o.db").exists() && !dir.path().join("orchestrator.key").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_agent_with_an_agent_token_does_the_seeded_work() {
    let tokens = "ops:operator:ops-secret,remote-1:agent:agent-secret";
    let mut server = Server::start(&[], &[("ORCH_API_TOKENS", tokens)]).await;
    let authed = |token: &str| {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        Api { http: reqwest::Client::builder().default_headers(h).build().unwrap(), base: server.url.clone() }
    };
    let ops = authed("ops-secret");

    // Without a token the CLI is refused, with the server's error code and request id.
    let out = server.cli(&["project", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: unauthorized: ") && err.contains("(request "), "{err}");

    let out = server.cli_with(&["seed", "--json"], &[("ORCH_TOKEN", "ops-secret")]);
    assert!(out.status.success(), "seed: {}", String::from_utf8_lossy(&out.stderr));
    let seeded: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> =
        seeded["work_items"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap().to_string()).collect();

    let mut agent = common::Proc::spawn(
        server.dir.path(),
        &["agent", "--server", &server.url],
        &[
            ("ORCH_TOKEN", "agent-secret"),
            ("AGENT_ID", "remote-1"),
            ("AGENT_WORKSPACE_ROOT", server.dir.path().join("remote-ws").to_str().unwrap()),
            ("AGENT_POLL_INTERVAL_MS", "500"),
            ("RUST_LOG", "info"),
        ],
    );
    for id in &ids {
        eventually(Duration::from_secs(90), &format!("work item {id} to succeed"), || {
            let ops = ops.clone();
            let id = id.clone();
            let exited = agent.try_wait();
            async move {
                assert!(exited.is_none(), "the agent exited early: {exited:?}");
                let w = ops.get(&format!("/work-items/{id}")).await;
                match str_of(&w, "state") {
                    "succeeded" => Some(()),
                    "failed" | "blocked" | "cancelled" => panic!("work item ended badly: {w}"),
                    _ => None,
                }
            }
        })
        .await;
    }
    let runs = ops.get("/runs?state=succeeded").await;
    let runs = items(&runs);
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().all(|r| r["agent_id"] == "remote-1"), "{runs:?}");
    let first = ops.get(&format!("/work-items/{}", ids[0])).await;
    let logs = ops.get(&format!("/runs/{}/logs", str_of(&first, "current_run_id"))).await;
    assert!(items(&logs).iter().any(|l| str_of(l, "line").contains("hello from the sample recipe")), "{logs}");

    let status = agent.terminate(Duration::from_secs(45));
    assert!(status.success(), "agent exit status {status}; stderr:\n{}", agent.logs());
    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_requests_are_answered_from_the_cli_and_secrets_stay_encrypted() {
    let mut server = Server::start(&["--agents", "1"], &[("AGENT_POLL_INTERVAL_MS", "300")]).await;
    let stdout = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();
    let secret = "pa55-Wd-e2e-7f3c";

    let out = server.cli(&["project", "create", "asks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pid = stdout(&out).split_whitespace().nth(2).unwrap().to_string();
    let recipe = server.dir.path().join("ask.yaml");
    std::fs::write(
        &recipe,
        "name: ask\ninputs:\n  - name: WHO\n    prompt: Who should be greeted?\n  - name: PASSWORD\n    kind: secret\n\
         steps:\n  - echo \"hello $WHO\"\n  - echo \"password is $PASSWORD\"\n",
    )
    .unwrap();
    let out = server.cli(&[
        "work-item",
        "add",
        "--project",
        &pid,
        "--title",
        "greet",
        "--recipe-file",
        recipe.to_str().unwrap(),
        "--enqueue",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let item = stdout(&out)
        .lines()
        .find(|l| l.starts_with("created work item"))
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();

    // The run asks for both inputs; the questions show up in `info list`.
    let pending = eventually(Duration::from_secs(60), "two pending questions", || {
        let out = server.cli(&["info", "list", "--json"]);
        async move {
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            let qs = items(&v);
            (qs.len() == 2).then_some(qs)
        }
    })
    .await;
    let table = stdout(&server.cli(&["info", "list"]));
    assert!(table.contains("Who should be greeted?") && table.contains("secret"), "{table}");
    for q in &pending {
        let value = if q["key"] == "PASSWORD" { secret } else { "world" };
        let out = server.cli(&["info", "answer", str_of(q, "id"), value]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).starts_with("answered "), "{}", stdout(&out));
    }

    let api = Api::new(&server.url);
    eventually(Duration::from_secs(60), "the work item to succeed", || {
        let api = api.clone();
        let item = item.clone();
        async move {
            let w = api.get(&format!("/work-items/{item}")).await;
            match str_of(&w, "state") {
                "succeeded" => Some(()),
                "failed" | "blocked" | "cancelled" => panic!("work item ended badly: {w}"),
                _ => None,
            }
        }
    })
    .await;
    let w = api.get(&format!("/work-items/{item}")).await;
    let out = server.cli(&["logs", str_of(&w, "current_run_id")]);
    let logs = stdout(&out);
    assert!(logs.contains("hello world"), "{logs}");
    assert!(logs.contains("password is") && !logs.contains(secret), "the secret is redacted: {logs}");

    let status = server.terminate(Duration::from_secs(45));
    assert!(status.success(), "exit status {status}");
    // Encrypted at rest with the generated key: the secret appears nowhere in the database files.
    for f in std::fs::read_dir(server.dir.path()).unwrap() {
        let path = f.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("orchestrator.db") {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds the secret",
                path.display()
            );
        }
    }
}

/// The README's "run it" command: `serve --agents 1 --seed` seeds the sample project and prints each
/// sample work item's outcome with its run log.
#[tokio::test]
async fn serve_with_seed_shows_the_sample_work_done_with_its_logs() {
    let mut server = Server::start(&["--agents", "1", "--seed"], &[("AGENT_GIT_PUSH", "true")]).await;
    let out = eventually(Duration::from_secs(90), "the three sample items to be reported", || {
        let out = server.stdout();
        // Each item's log is printed after its outcome line: wait for the last item's too.
        let done = out.matches("): succeeded").count() == 3
            && out.contains("[stdout] the greeting is done")
            && out.contains("[stdout] hello from the sample recipe")
            && out.contains("+++ b/lines.txt");
        async move { done.then_some(out) }
    })
    .await;
    assert!(out.contains("seeded project sample-"), "{out}");
    assert!(out.contains("(Greet with the sample recipe): succeeded"), "{out}");
    assert!(out.contains("[stdout] hello from the sample recipe"), "{out}");
    assert!(out.contains("[stdout] the greeting is done"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    // The sample project has a repository: the recipe's edits are a commit on the item's branch, pushed
    // to the sample repository, and the run's diff is printed.
    assert!(out.contains("repository ") && out.contains("orchestrator-sample.git"), "{out}");
    assert!(out.contains("[system] committed 2 file(s) on orch/"), "{out}");
    assert!(out.contains("+hello from the sample recipe") && out.contains("+++ b/lines.txt"), "{out}");
    let branches = std::process::Command::new("git")
        .args(["for-each-ref", "--format=%(refname:short)", "refs/heads/orch/"])
        .current_dir(server.dir.path().join("orchestrator-sample.git"))
        .output()
        .unwrap();
    let branches = String::from_utf8_lossy(&branches.stdout);
    assert_eq!(
        branches.lines().count(),
        1,
        "the greeting's branch was pushed (the others changed nothing): {branches}"
    );
    assert!(server.terminate(Duration::from_secs(30)).success(), "{}", server.logs());
}

/// The same "run it" story on PostgreSQL: the embedded agent does the seeded work, with its logs.
#[tokio::test]
async fn serve_with_seed_on_postgresql_shows_the_sample_work_done() {
    let db = common::PgDb::create();
    let env = [
        ("ORCH_DATABASE_URL", db.url.as_str()),
        ("ORCH_SECRET_KEY", PG_KEY),
        ("ORCH_PG_SCHEMA", "sample_jobs"),
        ("ORCH_PG_NOTIFY_INTERVAL_MS", "0"),
    ];
    let mut server = Server::start(&["--agents", "1", "--seed"], &env).await;
    let out = eventually(Duration::from_secs(90), "the three sample items to be reported", || {
        let out = server.stdout();
        // Each item's log is printed after its outcome line: wait for the last item's too.
        let done = out.matches("): succeeded").count() == 3
            && out.contains("[stdout] the greeting is done")
            && out.contains("[stdout] hello from the sample recipe")
            && out.contains("+++ b/lines.txt");
        async move { done.then_some(out) }
    })
    .await;
    assert!(out.contains("[stdout] hello from the sample recipe"), "{out}");
    assert!(out.contains("[stdout] the greeting is done"), "{out}");
    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", server.logs());
    // The store lives in the schema ORCH_PG_SCHEMA named.
    let done = db.query("SELECT count(*) FROM sample_jobs.work_items WHERE state = 'succeeded'");
    assert_eq!(done.trim(), "3");
}

#[tokio::test]
async fn serve_refuses_bad_postgresql_options_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::command(dir.path())
        .args(["serve"])
        .env("ORCH_DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("ORCH_SECRET_KEY", PG_KEY)
        .env("ORCH_PG_MAX_CONNECTIONS", "zero")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ORCH_PG_MAX_CONNECTIONS") && err.contains("zero"), "{err}");
}

/// On PostgreSQL no key is made up: without ORCH_SECRET_KEY `serve` stops at once (before connecting)
/// and says how to set one.
#[tokio::test]
async fn serve_on_postgresql_without_a_key_says_how_to_set_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::command(dir.path())
        .args(["serve"])
        .env("ORCH_DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env_remove("ORCH_SECRET_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ORCH_SECRET_KEY") && err.contains("/dev/urandom"), "{err}");
    assert!(!dir.path().join("orchestrator.key").exists(), "no key file was created");
}
