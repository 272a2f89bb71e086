//! Crash durability: a child process writing through the store (several concurrent tasks, so the
//! writer thread commits in groups) is killed with SIGKILL mid-stream. After reopening, every write the
//! store acknowledged is there and `PRAGMA integrity_check` says `ok`.
//!
//! The child is this test binary re-invoked as `--exact child_writer` with `ORCH_DURABILITY_DB` set; in
//! a normal run `child_writer` is a no-op. The child prints one `ACK ...` line per acknowledged write
//! (flushed right after the store replied); the parent ignores every other line (the test harness's).

use orchestrator_core::agent::ClaimRequest;
use orchestrator_core::domain::{LogStream, NewLogLine, RunOutcome};
use orchestrator_core::ids::{ProjectId, RunId, WorkItemId};
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::state::{RunState, WorkItemState};
use orchestrator_core::store::EnqueueOptions;
use orchestrator_core::{AgentApi, Orchestrator, OrchestratorConfig, Store};
use orchestrator_sqlite::{SqliteOptions, SqliteStore};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const DB_ENV: &str = "ORCH_DURABILITY_DB";
/// Acknowledged writes the parent waits for before killing the child.
const MIN_ACKS: usize = 2_000;
/// How long the parent waits for them.
const ACK_DEADLINE: Duration = Duration::from_secs(120);
/// The child stops on its own after this long (a safety net; the parent kills it much earlier).
const CHILD_MAX_RUNTIME: Duration = Duration::from_secs(300);
/// Tasks creating and enqueueing work items.
const CREATORS: usize = 6;
/// Tasks claiming runs and appending logs to them.
const LOGGERS: usize = 2;
/// Log appends per claimed run before it is completed.
const APPENDS_PER_RUN: u64 = 20;
/// Lines per append.
const LINES_PER_APPEND: u64 = 3;

fn log_line(run: RunId, seq: u64) -> String {
    format!("run {run} line {seq}")
}

// ---------------------------------------------------------------------------------------------------
// The child.

static CHILD_START: OnceLock<Instant> = OnceLock::new();

/// Prints one acknowledgement line and flushes it. Exits when the parent is gone (stdout closed) or
/// the child ran too long.
fn ack(what: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ACK {what}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
    if CHILD_START.get().is_some_and(|t| t.elapsed() > CHILD_MAX_RUNTIME) {
        std::process::exit(0);
    }
}

/// Reports a failed write on stderr and exits, so the parent sees the child end early.
fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("child_writer: {what} failed: {e}");
    std::process::exit(1);
}

async fn creator(orch: Orchestrator, project: ProjectId, k: usize) {
    for n in 0u64.. {
        let created = orch
            .create_work_item(CreateWorkItem {
                project_id: Some(project),
                title: format!("durability item {k}-{n}"),
                description: "written by the durability child".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| fatal("create_work_item", e));
        let id = created.work_item.id;
        ack(format_args!("item {id}"));
        orch.enqueue(id, EnqueueOptions::default()).await.unwrap_or_else(|e| fatal("enqueue", e));
        ack(format_args!("queued {id}"));
    }
}

async fn logger(orch: Orchestrator, k: usize) {
    loop {
        let seen = orch.work_generation().await;
        let claimed = orch
            .claim(ClaimRequest {
                agent_id: format!("durability-agent-{k}"),
                capabilities: Vec::new(),
                max: 1,
                lease_ttl_seconds: Some(3600),
            })
            .await
            .unwrap_or_else(|e| fatal("claim", e));
        let Some(a) = claimed.into_iter().next() else {
            orch.wait_for_work(seen, Duration::from_secs(1)).await;
            continue;
        };
        let (run, token) = (a.run_id(), a.token());
        orch.start(run, token).await.unwrap_or_else(|e| fatal("start", e));
        let mut seq = 0u64;
        for _ in 0..APPENDS_PER_RUN {
            let lines = (1..=LINES_PER_APPEND)
                .map(|i| NewLogLine { stream: LogStream::Stdout, line: log_line(run, seq + i) })
                .collect();
            let last = orch.append_logs(run, token, lines).await.unwrap_or_else(|e| fatal("append_logs", e));
            if last != seq + LINES_PER_APPEND {
                fatal("append_logs", format!("expected last seq {}, got {last}", seq + LINES_PER_APPEND));
            }
            seq = last;
            ack(format_args!("log {run} {seq}"));
        }
        orch.complete(run, token, RunOutcome::Succeeded { exit_code: Some(0) }, None)
            .await
            .unwrap_or_else(|e| fatal("complete", e));
        ack(format_args!("done {run}"));
    }
}

async fn child_main(path: PathBuf) {
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap_or_else(|e| fatal("open", e));
    let orch = Orchestrator::new(Arc::new(store), OrchestratorConfig::default());
    let project =
        orch.create_project("durability", "killed mid-stream").await.unwrap_or_else(|e| fatal("create_project", e));
    ack(format_args!("project {}", project.id));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..CREATORS {
        tasks.spawn(creator(orch.clone(), project.id, k));
    }
    for k in 0..LOGGERS {
        tasks.spawn(logger(orch.clone(), k));
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            fatal("a writer task", e);
        }
    }
}

/// The child process body; a no-op unless `ORCH_DURABILITY_DB` is set.
#[test]
fn child_writer() {
    let Some(path) = std::env::var_os(DB_ENV) else {
        return;
    };
    CHILD_START.get_or_init(Instant::now);
    // The harness may have printed `test child_writer ... ` without a newline: end that line so every
    // acknowledgement starts a line of its own.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out).and_then(|()| out.flush());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime");
    rt.block_on(child_main(PathBuf::from(path)));
}

// ---------------------------------------------------------------------------------------------------
// The parent.

/// Kills the child if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything the child acknowledged.
#[derive(Default)]
struct Acks {
    projects: BTreeSet<ProjectId>,
    items: BTreeSet<WorkItemId>,
    queued: BTreeSet<WorkItemId>,
    /// Highest acknowledged log sequence number per run.
    logs: BTreeMap<RunId, u64>,
    done: BTreeSet<RunId>,
    total: usize,
}

impl Acks {
    /// Records an `ACK ...` line; ignores anything else (the test harness's own output).
    fn record(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("ACK ") else {
            return;
        };
        let parts: Vec<&str> = rest.split_whitespace().collect();
        let id = |i: usize| -> uuid::Uuid {
            parts.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("malformed ack line: {line:?}"))
        };
        match parts.first().copied() {
            Some("project") => {
                self.projects.insert(id(1).into());
            }
            Some("item") => {
                self.items.insert(id(1).into());
            }
            Some("queued") => {
                self.queued.insert(id(1).into());
            }
            Some("log") => {
                let seq: u64 =
                    parts.get(2).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("malformed ack line: {line:?}"));
                let e = self.logs.entry(id(1).into()).or_insert(0);
                *e = (*e).max(seq);
            }
            Some("done") => {
                self.done.insert(id(1).into());
            }
            _ => panic!("unknown ack line: {line:?}"),
        }
        self.total += 1;
    }
}

/// Spawns the child writing to `db` and returns it with a channel of its complete stdout lines (the
/// channel closes at the child's end of output).
fn spawn_child(db: &Path) -> (KillOnDrop, mpsc::Receiver<String>, std::thread::JoinHandle<()>) {
    let exe = std::env::current_exe().expect("current test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(DB_ENV, db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line cut short by the kill (no newline) was never fully acknowledged: skip it.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    (KillOnDrop(child), rx, reader)
}

#[test]
fn durability_after_sigkill() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let db = tmp.path().join("durability.db");
    let (mut child, lines, reader) = spawn_child(&db);

    let mut acks = Acks::default();
    let deadline = Instant::now() + ACK_DEADLINE;
    while acks.total < MIN_ACKS {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => acks.record(&line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("only {} acknowledged writes within {ACK_DEADLINE:?}", acks.total)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the child stopped after {} acknowledged writes: {:?}", acks.total, child.0.try_wait())
            }
        }
    }

    // SIGKILL while the writers are still going.
    child.0.kill().expect("SIGKILL the child");
    let status = child.0.wait().expect("wait for the child");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "the child should die of SIGKILL, not end on its own: {status:?}");
    }
    // Everything it acknowledged before dying is still in the pipe.
    for line in lines.iter() {
        acks.record(&line);
    }
    reader.join().expect("stdout reader");
    assert_eq!(acks.projects.len(), 1, "the project was acknowledged");
    assert!(!acks.logs.is_empty(), "some log appends were acknowledged");
    eprintln!(
        "killed after {} acknowledged writes: {} items, {} enqueues, {} runs with logs ({} lines), {} completions",
        acks.total,
        acks.items.len(),
        acks.queued.len(),
        acks.logs.len(),
        acks.logs.values().sum::<u64>(),
        acks.done.len()
    );

    // The child never closed the database: reopening must recover it from its WAL.
    assert!(PathBuf::from(format!("{}-wal", db.display())).exists(), "the killed child should leave its WAL behind");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(verify(&db, &acks));

    let conn = rusqlite::Connection::open(&db).expect("plain connection");
    let mut st = conn.prepare("PRAGMA integrity_check").expect("prepare");
    let report: Vec<String> = st
        .query_map([], |r| r.get(0))
        .expect("integrity_check")
        .collect::<Result<_, _>>()
        .expect("integrity_check rows");
    assert_eq!(report, vec!["ok".to_string()]);
}

/// Reopens the database and checks every acknowledged write.
async fn verify(db: &Path, acks: &Acks) {
    let store = SqliteStore::open(db, SqliteOptions::default()).expect("reopen after SIGKILL");
    let project = *acks.projects.first().expect("project ack");
    store.project_get(project).await.expect("acknowledged project");
    for id in &acks.items {
        let w = store.work_item_get(*id).await.unwrap_or_else(|e| panic!("acknowledged work item {id} lost: {e}"));
        assert_eq!(w.project_id, project);
    }
    for id in &acks.queued {
        let w = store.work_item_get(*id).await.unwrap_or_else(|e| panic!("acknowledged enqueued item {id} lost: {e}"));
        assert!(
            matches!(w.state, WorkItemState::Queued | WorkItemState::Running | WorkItemState::Succeeded),
            "acknowledged enqueue of {id} lost: state {}",
            w.state
        );
    }
    for (run, last) in &acks.logs {
        let lines = store
            .logs_read_after(*run, 0, 10_000)
            .await
            .unwrap_or_else(|e| panic!("logs of acknowledged run {run} lost: {e}"));
        assert!(lines.len() as u64 >= *last, "run {run}: {last} log lines acknowledged, {} readable", lines.len());
        for (i, l) in lines.iter().enumerate() {
            let seq = i as u64 + 1;
            assert_eq!(l.seq, seq, "run {run}: log sequence has a gap");
            assert_eq!(l.line, log_line(*run, seq), "run {run}: line {seq} differs");
        }
    }
    for run in &acks.done {
        let r = store.run_get(*run).await.unwrap_or_else(|e| panic!("acknowledged completed run {run} lost: {e}"));
        assert_eq!(r.state, RunState::Succeeded, "run {run}");
        let w = store.work_item_get(r.work_item_id).await.expect("its item");
        assert_eq!(w.state, WorkItemState::Succeeded, "item of run {run}");
    }
}
