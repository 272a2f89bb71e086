//! Helpers: run the real `orchestrator` binary (server and CLI) in a temp directory.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

/// A free TCP port on loopback (bound then released; the caller retries on a collision).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().unwrap().port()
}

/// A `Command` for the binary with the ORCH_* / AGENT_* environment of the test run removed, so the
/// developer's settings never leak in.
pub fn command(dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("ORCH_") || k.starts_with("AGENT_") || k.starts_with("CODEX_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.current_dir(dir);
    c
}

/// `https` when the server is started with a certificate.
fn scheme(args: &[String]) -> &'static str {
    if args.iter().any(|a| a == "--tls-cert") {
        "https"
    } else {
        "http"
    }
}

/// A running `orchestrator serve`.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The temp dir holding the database, key file and agent workspaces.
    pub dir: tempfile::TempDir,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Server {
    /// Starts `orchestrator serve` with a temp SQLite file on a free port (retrying on a port collision)
    /// and waits for `/healthz`.
    pub async fn start(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let envs: Vec<(String, String)> = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, url, stdout, stderr) = Self::spawn(&dir, &args, &envs).await;
        Server { child, url, dir, stderr, stdout, args, envs }
    }

    /// Starts a new server process in the same directory with the same settings and, when it can, the
    /// same port (after [`Server::terminate`]).
    pub async fn restart(&mut self) {
        let port: u16 = self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        let mut last_err = String::new();
        for _ in 0..5 {
            match Self::try_start(&self.dir, port, &self.args, &self.envs).await {
                Ok((child, stdout, stderr)) => {
                    self.child = child;
                    self.stdout = stdout;
                    self.stderr = stderr;
                    return;
                }
                Err(e) => last_err = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the server did not restart on port {port}: {last_err}");
    }

    #[allow(clippy::type_complexity)]
    async fn spawn(
        dir: &tempfile::TempDir,
        args: &[String],
        envs: &[(String, String)],
    ) -> (Child, String, Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<String>>>) {
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            match Self::try_start(dir, port, args, envs).await {
                Ok((child, stdout, stderr)) => {
                    return (child, format!("{}://127.0.0.1:{port}", scheme(args)), stdout, stderr)
                }
                Err(e) => last_err = e,
            }
        }
        panic!("the server did not start: {last_err}");
    }

    #[allow(clippy::type_complexity)]
    async fn try_start(
        dir: &tempfile::TempDir,
        port: u16,
        args: &[String],
        envs: &[(String, String)],
    ) -> Result<(Child, Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<String>>>), String> {
        let db = dir.path().join("orchestrator.db");
        let mut c = command(dir.path());
        c.arg("serve")
            .args(args)
            .env("ORCH_BIND", format!("127.0.0.1:{port}"))
            .env("ORCH_DATABASE_URL", format!("sqlite://{}", db.display()))
            .env("AGENT_WORKSPACE_ROOT", dir.path().join("workspaces"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            c.env(k, v);
        }
        let mut child = c.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let out = child.stdout.take().unwrap();
        let so = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                so.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let se = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                se.lock().unwrap().push(line);
            }
        });
        // The server prints its URL once it listens (this also proves that the port is ours).
        let deadline = Instant::now() + Duration::from_secs(60);
        let expected = format!("{}://127.0.0.1:{port}", scheme(args));
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains("listening on") && line.contains(&expected) => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Give the reader thread a moment to collect the last lines.
                let _ = rx.recv_timeout(Duration::from_millis(200));
                return Err(format!("exited with {status}: {}", stderr.lock().unwrap().join("\n")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("no `listening on` line within 60 s: {}", stderr.lock().unwrap().join("\n")));
            }
        }
        // Readiness only: the tests check the certificate themselves.
        let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{expected}/healthz")).send().await {
                if r.status().is_success() {
                    return Ok((child, stdout, stderr));
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("/healthz did not answer 200 within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the server wrote to stderr so far (its logs).
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// What the server wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits (up to `within`) for the process to exit.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.signal("TERM", within)
    }

    /// Sends `signal` (`TERM`, `INT`) and waits (up to `within`) for the process to exit.
    pub fn signal(&mut self, signal: &str, within: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the server did not exit within {within:?} after SIGTERM; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(args, &[])
    }

    /// Runs the CLI against this server with extra environment variables.
    pub fn cli_with(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut c = command(self.dir.path());
        c.args(args).env("ORCH_SERVER_URL", &self.url).stdin(Stdio::null());
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().expect("run the CLI")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- server stderr ----\n{}\n---- server stdout ----\n{}", self.logs(), self.stdout());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small JSON-over-HTTP helper that panics with the body on an unexpected status.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api { http: reqwest::Client::new(), base: base.to_string() }
    }

    /// Sends a request and returns (status, JSON body or Null).
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Expects a 2xx answer.
    pub async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.send(method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    pub async fn get(&self, path: &str) -> Value {
        self.ok(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.ok(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Value {
        self.ok(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn text(&self, path: &str) -> String {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.text().await.unwrap()
    }
}

/// The rows of a list answer (a bare array or `{"items": [...]}`).
pub fn items(v: &Value) -> Vec<Value> {
    if let Some(a) = v.as_array() {
        return a.clone();
    }
    for k in ["items", "assignments", "lines", "events", "data"] {
        if let Some(a) = v.get(k).and_then(Value::as_array) {
            return a.clone();
        }
    }
    panic!("not a list: {v}")
}

/// `v["work_item"]` when present, else `v`.
pub fn work_item(v: &Value) -> &Value {
    v.get("work_item").unwrap_or(v)
}

/// A string field.
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_else(|| panic!("no string `{key}` in {v}"))
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh PostgreSQL database (local server, trust auth, user postgres), dropped at the end.
pub struct PgDb {
    /// `postgres://postgres@127.0.0.1:5432/<name>`.
    pub url: String,
    name: String,
}

fn psql(sql: &str) -> Output {
    Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-Atc", sql])
        .output()
        .expect("run psql")
}

impl PgDb {
    /// Creates a uniquely named database.
    pub fn create() -> PgDb {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("orch_e2e_{}_{n}_{nanos}", std::process::id());
        let out = psql(&format!("CREATE DATABASE {name}"));
        assert!(out.status.success(), "CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
        PgDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
    }
}

impl PgDb {
    /// Runs `sql` in this database and returns psql's unaligned output.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", &self.name, "-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = psql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// A background child process (e.g. `orchestrator agent`) killed when dropped.
pub struct Proc {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns the binary in `dir` with `args` and `envs`, collecting its stderr.
    pub fn spawn(dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut c = command(dir);
        c.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in envs {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let se = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                se.lock().unwrap().push(line);
            }
        });
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let so = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                so.lock().unwrap().push(line);
            }
        });
        Proc { child, stderr, stdout }
    }

    /// Its stdout lines so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until its stdout has a line equal to `line`.
    pub async fn wait_for_line(&self, line: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stdout().iter().any(|l| l == line) {
            assert!(Instant::now() < deadline, "no line `{line}` within {within:?}; got {:?}", self.stdout());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "did not exit within {within:?}; stdout {:?}", self.stdout());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait")
    }

    /// Whether it has exited (and how).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// Sends SIGTERM and waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the process did not exit within {within:?} after SIGTERM; stderr:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- process stderr ----\n{}", self.logs());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
