//! Issue 6: an agent process killed with SIGKILL mid-run; its lease expires, the background tick reaps the
//! run as `lost`, and a second agent completes the work item exactly once. Real `orchestrator serve` and
//! `orchestrator agent` processes over HTTP, a temp SQLite file.

mod common;

use common::{eventually, items, str_of, work_item, Api, Proc, Server};
use serde_json::{json, Value};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `(state, pgrp)` of a process from `/proc/PID/stat`, `None` when it is gone.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// The live (not zombie) processes of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| matches!(proc_stat(pid), Some((state, pgrp)) if pgrp == pgid && state != 'Z'))
        .collect()
}

/// The process group of the first attempt's step (it runs in a group of its own, which outlives the killed
/// agent); killed when dropped, so nothing is left running even when an assertion fails.
struct StepGroup(u32);

impl StepGroup {
    fn kill(&self) {
        if !group_members(self.0).is_empty() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0)]).status();
        }
    }
}

impl Drop for StepGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The runs of a work item, by attempt.
async fn runs_of(api: &Api, wid: &str) -> Vec<Value> {
    let mut runs = items(&api.get(&format!("/work-items/{wid}/runs")).await);
    runs.sort_by_key(|r| r["attempt"].as_u64());
    runs
}

/// A run's stored log entries.
async fn log_of(api: &Api, run: &str) -> Vec<Value> {
    items(&api.get(&format!("/runs/{run}/logs?after=0")).await)
}

fn lines(log: &[Value]) -> Vec<String> {
    log.iter().map(|l| str_of(l, "line").to_string()).collect()
}

fn time(v: &Value, key: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(str_of(v, key)).unwrap_or_else(|e| panic!("{key} in {v}: {e}"))
}

fn agent(server: &Server, id: &str) -> Proc {
    let root = server.dir.path().join(format!("ws-{id}"));
    Proc::spawn(
        server.dir.path(),
        &["agent", "--server", &server.url],
        &[
            ("AGENT_ID", id),
            ("AGENT_WORKSPACE_ROOT", root.to_str().unwrap()),
            ("AGENT_POLL_INTERVAL_MS", "200"),
            ("RUST_LOG", "info"),
        ],
    )
}

fn quoted(p: &Path) -> String {
    let s = p.to_str().unwrap();
    assert!(!s.contains('\''), "{s}");
    format!("'{s}'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_run_loses_its_lease_and_a_second_agent_completes_the_item_exactly_once() {
    let begun = Instant::now();
    let mut server = Server::start(
        &[],
        &[
            ("ORCH_LEASE_TTL_SECONDS", "2"),
            ("ORCH_SCHEDULER_BACKGROUND_INTERVAL", "0.2"),
            ("ORCH_BACKOFF_BASE_SECONDS", "0.1"),
            ("ORCH_BACKOFF_JITTER", "0"),
        ],
    )
    .await;
    let api = Api::new(&server.url);
    let mark = server.dir.path().join("MARK");
    let pid_file = server.dir.path().join("step.pid");

    // A one-step recipe: the first attempt marks, says `started` and hangs; a later one finishes at once.
    let script = format!(
        "if [ -f {mark} ]; then echo second-attempt-done; else echo $$ > {pid}; touch {mark}; echo started; \
         sleep 120; fi",
        mark = quoted(&mark),
        pid = quoted(&pid_file),
    );
    let yaml =
        format!("name: hang-once\nsteps:\n  - name: work\n    run: {}\n", serde_json::to_string(&script).unwrap());
    let project = api.post("/projects", json!({"name": "agent-kill"})).await;
    let pid = str_of(&project, "id").to_string();
    let recipe = api.post("/recipes", json!({"yaml": yaml, "project_id": pid})).await;
    let w = api
        .post("/work-items", json!({"project_id": pid, "title": "hang once", "recipe_id": str_of(&recipe, "id")}))
        .await;
    let wid = str_of(work_item(&w), "id").to_string();
    api.post("/scheduler/enqueue", json!({"work_item_id": wid})).await;

    // Agent A claims it and runs the step until it hangs in `sleep`.
    let mut agent_a = agent(&server, "agent-a");
    let first = eventually(Duration::from_secs(60), "agent-a's run to be running with `started` logged", || {
        let (api, wid) = (api.clone(), wid.clone());
        let exited = agent_a.try_wait();
        async move {
            assert!(exited.is_none(), "agent-a exited early: {exited:?}");
            let runs = runs_of(&api, &wid).await;
            let run = runs.first()?;
            if run["state"] != "running" {
                return None;
            }
            let id = str_of(run, "id").to_string();
            lines(&log_of(&api, &id).await).iter().any(|l| l == "started").then_some(id)
        }
    })
    .await;
    let step_pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let (_, pgid) = proc_stat(step_pid).expect("the step's shell is running");
    let step = StepGroup(pgid);
    assert_eq!(pgid, step_pid, "the step runs in a process group of its own");

    // SIGKILL: no cancellation, no release, no last heartbeat.
    let status = agent_a.kill();
    let killed = Instant::now();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    // The step does not outlive its agent: the watchdog in its group reads a pipe only the agent holds
    // open, so the group is killed the moment the agent dies (within 200 ms; it used to poll each second).
    loop {
        if group_members(pgid).is_empty() {
            break;
        }
        let waited = killed.elapsed();
        assert!(waited < Duration::from_millis(200), "the killed agent's step still runs after {waited:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("the step's group was gone {:?} after the agent's SIGKILL", killed.elapsed());
    let killed_at = chrono::Utc::now();
    let a_log = log_of(&api, &first).await;
    let a_lines = lines(&a_log);
    assert_eq!(a_lines.last().map(String::as_str), Some("started"), "agent-a's log at the kill: {a_lines:?}");
    assert!(a_lines[0].starts_with("agent agent-a claimed run"), "{a_lines:?}");

    // The lease expires; the background tick reaps the run as lost and the item goes back to the queue.
    eventually(Duration::from_secs(30), "agent-a's run to be lost and the item requeued", || {
        let (api, wid, first) = (api.clone(), wid.clone(), first.clone());
        async move {
            let run = api.get(&format!("/runs/{first}")).await;
            let item = api.get(&format!("/work-items/{wid}")).await;
            let item_state = str_of(&item, "state").to_string();
            (run["state"] == "lost" && ["retrying", "queued"].contains(&item_state.as_str())).then_some(())
        }
    })
    .await;

    // Agent B takes the retry; the step sees the mark and finishes.
    let mut agent_b = agent(&server, "agent-b");
    eventually(Duration::from_secs(60), "the work item to succeed", || {
        let (api, wid) = (api.clone(), wid.clone());
        let exited = agent_b.try_wait();
        async move {
            assert!(exited.is_none(), "agent-b exited early: {exited:?}");
            let item = api.get(&format!("/work-items/{wid}")).await;
            match str_of(&item, "state") {
                "succeeded" => Some(()),
                "failed" | "blocked" | "cancelled" => panic!("the work item ended badly: {item}"),
                _ => None,
            }
        }
    })
    .await;

    // Exactly once: two runs, the first lost by agent-a, the second succeeded by agent-b.
    let runs = runs_of(&api, &wid).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    let (lost, done) = (&runs[0], &runs[1]);
    assert_eq!(str_of(lost, "id"), first);
    assert_eq!(
        (lost["attempt"].as_u64(), str_of(lost, "agent_id"), str_of(lost, "state")),
        (Some(1), "agent-a", "lost")
    );
    assert_eq!(lost["error"], "lease expired", "{lost}");
    assert_eq!(
        (done["attempt"].as_u64(), str_of(done, "agent_id"), str_of(done, "state")),
        (Some(2), "agent-b", "succeeded")
    );
    assert_eq!(done["exit_code"], 0, "{done}");
    let lost_at = time(lost, "finished_at");
    assert!(lost_at > killed_at, "reaped at {lost_at}, before the kill at {killed_at}");
    assert!(time(done, "claimed_at") >= lost_at, "the retry was claimed before the first run was reaped");

    // The second attempt took the `then` branch only; the first run's log is what agent-a wrote before the
    // kill: nothing later, nothing of agent-b's.
    let b_log = lines(&log_of(&api, str_of(done, "id")).await);
    assert!(b_log.iter().any(|l| l == "second-attempt-done"), "{b_log:?}");
    assert!(!b_log.iter().any(|l| l == "started" || l.contains("agent-a")), "{b_log:?}");
    assert!(b_log[0].starts_with("agent agent-b claimed run"), "{b_log:?}");
    let a_log_now = log_of(&api, &first).await;
    assert_eq!(a_log_now, a_log, "agent-a's run log changed after the kill");
    assert!(!lines(&a_log_now).iter().any(|l| l.contains("agent-b") || l.contains("second-attempt")), "{a_log_now:?}");
    for entry in &a_log_now {
        assert!(time(entry, "at") <= lost_at, "a line appended after the lease was lost: {entry}");
    }

    let item = api.get(&format!("/work-items/{wid}")).await;
    assert_eq!(item["attempts"], 2, "{item}");
    assert_eq!(item["current_run_id"], done["id"], "{item}");
    assert_eq!(item["state"], "succeeded");

    // Agent-b and the server stop cleanly.
    assert!(group_members(pgid).is_empty(), "the first step's group came back?");
    let status = agent_b.terminate(Duration::from_secs(45));
    assert!(status.success(), "agent-b exit status {status}; stderr:\n{}", agent_b.logs());
    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "server exit status {status}; logs:\n{}", server.logs());
    drop(step);
    eprintln!("agent_kill: done in {:?}", begun.elapsed());
}

/// A graceful stop (SIGTERM) of an agent process with a long step hands the run back without using up an
/// attempt: five agents in a row are stopped mid-step, and the item stays at attempt 1, queued, with one
/// run that each next agent resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_a_long_step_without_using_an_attempt_five_times_in_a_row() {
    let server = Server::start(&[], &[("ORCH_BACKOFF_BASE_SECONDS", "0.1"), ("ORCH_MAX_RETRIES", "2")]).await;
    let api = Api::new(&server.url);
    let pid_file = server.dir.path().join("step.pid");
    let script = format!("echo $$ > {pid}; echo started; sleep 120", pid = quoted(&pid_file));
    let yaml = format!("name: long\nsteps:\n  - name: work\n    run: {}\n", serde_json::to_string(&script).unwrap());
    let project = api.post("/projects", json!({"name": "sigterm"})).await;
    let pid = str_of(&project, "id").to_string();
    let recipe = api.post("/recipes", json!({"yaml": yaml, "project_id": pid})).await;
    let w =
        api.post("/work-items", json!({"project_id": pid, "title": "long", "recipe_id": str_of(&recipe, "id")})).await;
    let wid = str_of(work_item(&w), "id").to_string();
    api.post("/scheduler/enqueue", json!({"work_item_id": wid})).await;
    let mut first_run = None;
    for round in 0..5 {
        let _ = std::fs::remove_file(&pid_file);
        let id = format!("agent-{round}");
        let root = server.dir.path().join(format!("ws-{id}"));
        let mut a = Proc::spawn(
            server.dir.path(),
            &["agent", "--server", &server.url],
            &[
                ("AGENT_ID", id.as_str()),
                ("AGENT_WORKSPACE_ROOT", root.to_str().unwrap()),
                ("AGENT_POLL_INTERVAL_MS", "200"),
                ("AGENT_SHUTDOWN_GRACE_SECONDS", "0"),
                ("RUST_LOG", "info"),
            ],
        );
        let step_pid: u32 = eventually(Duration::from_secs(30), "the step to start", || {
            let text = std::fs::read_to_string(&pid_file).ok();
            async move { text.and_then(|t| t.trim().parse().ok()) }
        })
        .await;
        let status = a.terminate(Duration::from_secs(30));
        assert!(status.success(), "round {round}: {status:?}");
        assert!(group_members(step_pid).is_empty(), "round {round}: the step outlived the graceful stop");
        let runs = runs_of(&api, &wid).await;
        assert_eq!(runs.len(), 1, "round {round}: {runs:?}");
        assert_eq!(runs[0]["state"], "waiting_input", "round {round}: handed back, resumable");
        let rid = str_of(&runs[0], "id").to_string();
        assert_eq!(first_run.get_or_insert(rid.clone()), &rid);
        let item = api.get(&format!("/work-items/{wid}")).await;
        assert_eq!((item["state"].as_str(), item["attempts"].as_u64()), (Some("queued"), Some(1)), "round {round}");
    }
    let log = lines(&log_of(&api, first_run.as_deref().unwrap()).await);
    assert_eq!(log.iter().filter(|l| l.contains("handed back (no attempt used)")).count(), 5, "{log:?}");
}
