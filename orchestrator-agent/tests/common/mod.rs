//! Test harness: an in-process orchestrator over a temp SQLite file, a ticker, agents, and polling helpers.
#![allow(dead_code)]

use orchestrator_agent::{Agent, AgentConfig, AgentError, AgentReport};
use orchestrator_core::agent::Executor;
use orchestrator_core::crypto::Keyring;
use orchestrator_core::domain::*;
use orchestrator_core::ids::*;
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::retry::{RetryOverrides, RetryPolicy};
use orchestrator_core::store::*;
use orchestrator_core::{Orchestrator, OrchestratorConfig, Store};
use orchestrator_sqlite::{SqliteOptions, SqliteStore};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub orch: Orchestrator,
    pub project: ProjectId,
    ticker: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

pub struct RunningAgent {
    pub handle: JoinHandle<Result<AgentReport, AgentError>>,
    stop: Option<oneshot::Sender<()>>,
}

impl RunningAgent {
    /// Sends the shutdown signal without waiting.
    pub fn stop(mut self) -> Self {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self
    }

    /// Asks the agent to shut down and waits for its report.
    pub async fn shutdown(mut self) -> AgentReport {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("agent did not stop in time")
            .expect("agent task panicked")
            .expect("agent failed")
    }
}

impl Harness {
    pub async fn new() -> Harness {
        Self::with_retry(RetryPolicy {
            max_retries: 3,
            backoff_base_seconds: 0.05,
            backoff_cap_seconds: 0.2,
            jitter: 0.0,
        })
        .await
    }

    pub async fn with_retry(retry: RetryPolicy) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("db.sqlite"), SqliteOptions::default()).unwrap();
        let config = OrchestratorConfig {
            retry,
            keyring: Some(Keyring::from_config(SECRET_KEY).unwrap()),
            ..OrchestratorConfig::default()
        };
        let orch = Orchestrator::new(Arc::new(store) as Arc<dyn Store>, config);
        let project = orch.create_project("agent-tests", "").await.unwrap().id;
        let t = orch.clone();
        // The scheduler tick (retries due, expired leases), as the server would run it.
        let ticker = tokio::spawn(async move {
            loop {
                let _ = t.tick().await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        Harness { dir, orch, project, ticker }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self, id: &str) -> AgentConfig {
        AgentConfig::new(id)
            .with_workspace_root(self.dir.path().join("workspaces"))
            .with_poll_interval(Duration::from_millis(200))
            .with_shutdown_grace(Duration::from_secs(5))
            .with_kill_grace(Duration::from_millis(500))
            .with_log_batching(100, Duration::from_millis(50))
    }

    pub fn start(&self, config: AgentConfig) -> RunningAgent {
        self.start_agent(Agent::new(Arc::new(self.orch.clone()), config))
    }

    pub fn start_with(&self, config: AgentConfig, executor: Arc<dyn Executor>) -> RunningAgent {
        self.start_agent(Agent::new(Arc::new(self.orch.clone()), config).with_executor(executor))
    }

    pub fn start_agent(&self, agent: Agent) -> RunningAgent {
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        RunningAgent { handle, stop: Some(tx) }
    }

    pub async fn recipe(&self, yaml: &str) -> RecipeId {
        self.orch.create_recipe(Some(self.project), yaml).await.unwrap().id
    }

    pub async fn item(&self, title: &str, description: &str, recipe: Option<RecipeId>) -> WorkItemId {
        self.item_with(title, description, recipe, RetryOverrides::default()).await
    }

    pub async fn item_with(
        &self,
        title: &str,
        description: &str,
        recipe: Option<RecipeId>,
        retry: RetryOverrides,
    ) -> WorkItemId {
        self.orch
            .create_work_item(CreateWorkItem {
                project_id: Some(self.project),
                title: title.into(),
                description: description.into(),
                recipe_id: recipe,
                retry,
                enqueue: Some(EnqueueOptions::default()),
                ..Default::default()
            })
            .await
            .unwrap()
            .work_item
            .id
    }

    pub async fn work_item(&self, id: WorkItemId) -> WorkItem {
        self.orch.store().work_item_get(id).await.unwrap()
    }

    pub async fn runs(&self, id: WorkItemId) -> Vec<Run> {
        let mut v =
            self.orch.store().run_list(RunFilter { work_item_id: Some(id), ..Default::default() }).await.unwrap();
        v.sort_by_key(|r| r.attempt);
        v
    }

    pub async fn logs(&self, run: RunId) -> Vec<LogEntry> {
        self.orch.store().logs_read_after(run, 0, 10_000).await.unwrap()
    }

    pub async fn log_text(&self, run: RunId) -> Vec<String> {
        self.logs(run).await.into_iter().map(|l| l.line).collect()
    }

    pub async fn events(&self, run: RunId) -> Vec<StepEvent> {
        self.orch.store().step_events_read_after(run, 0, 10_000).await.unwrap()
    }

    /// Waits until the work item is in one of `states`.
    pub async fn wait_state(&self, id: WorkItemId, states: &[orchestrator_core::state::WorkItemState]) -> WorkItem {
        wait_for(&format!("work item in {states:?}"), Duration::from_secs(60), || async {
            let w = self.work_item(id).await;
            states.contains(&w.state).then_some(w)
        })
        .await
    }
}

/// Polls `f` every 20 ms until it yields a value or `timeout` passes (then panics).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process is gone (or a zombie nobody reaped yet).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')).unwrap_or(false),
    }
}

/// Reads a pid written by a test step (polling until the file is complete).
pub async fn read_pid(path: &Path) -> i32 {
    wait_for("pid file", Duration::from_secs(30), || async {
        std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<i32>().ok())
    })
    .await
}

/// Writes an executable script. It is written by a short-lived `sh` child, so no file descriptor open
/// for writing can leak into a concurrently forked process (which would make exec fail with ETXTBSY).
pub fn script(path: &Path, body: &str) -> PathBuf {
    use std::io::Write;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("cat > \"$0\" && chmod 755 \"$0\"")
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    path.to_path_buf()
}

/// A tiny HTTP server on 127.0.0.1 answering one connection per canned `(status, json body)`, in order.
/// The join handle yields the raw requests (head and body) it received.
pub async fn fake_http_server(answers: Vec<(u16, String)>) -> (String, JoinHandle<Vec<String>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let mut seen = Vec::new();
        for (status, body) in answers {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then Content-Length bytes of body.
            let (head_end, len) = loop {
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                        .unwrap_or(0);
                    break (i + 4, len);
                }
            };
            while buf.len() < head_end + len {
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&chunk[..n]);
            }
            seen.push(String::from_utf8_lossy(&buf).into_owned());
            let reason = if status == 200 { "OK" } else { "Error" };
            let resp = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await.unwrap();
            sock.shutdown().await.unwrap();
        }
        seen
    });
    (format!("http://{addr}"), handle)
}

/// Runs git synchronously (tests only), panicking with its output on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Harness {
    /// A bare repository (the "remote") with one commit on `main`: `README.md` and `src/app.txt`.
    pub fn bare_repo(&self, name: &str) -> PathBuf {
        let bare = self.path(&format!("{name}.git"));
        let seed = self.path(&format!("{name}-seed"));
        std::fs::create_dir_all(&seed).unwrap();
        git(self.dir.path(), &["init", "--quiet", "--bare", bare.to_str().unwrap()]);
        git(&seed, &["init", "--quiet"]);
        std::fs::write(seed.join("README.md"), "# sample\n").unwrap();
        std::fs::create_dir_all(seed.join("src")).unwrap();
        std::fs::write(seed.join("src/app.txt"), "one\ntwo\n").unwrap();
        git(&seed, &["add", "."]);
        git(&seed, &["commit", "--quiet", "-m", "initial"]);
        git(&seed, &["push", "--quiet", bare.to_str().unwrap(), "HEAD:refs/heads/main"]);
        git(&bare, &["symbolic-ref", "HEAD", "refs/heads/main"]);
        bare
    }

    /// Points the harness project at `url`.
    pub async fn use_repository(&self, url: &str, base_branch: Option<&str>) {
        let repo = Repository { url: url.into(), base_branch: base_branch.map(str::to_string) };
        let u = orchestrator_core::orchestrator::UpdateProject { repository: Some(Some(repo)), ..Default::default() };
        self.orch.update_project_with(self.project, u).await.unwrap();
    }
}
