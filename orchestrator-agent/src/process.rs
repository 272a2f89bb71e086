//! Child processes in their own process group: spawning, line-by-line output, timeouts and killing the
//! whole group (grandchildren too).

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use orchestrator_core::agent::Cancellation;
use orchestrator_core::domain::LogStream;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Longest line passed on as one log line; longer output is split.
pub(crate) const MAX_LINE_BYTES: usize = 16 * 1024;

/// How a supervised process ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// It exited by itself.
    Exited(ExitStatus),
    /// Its timeout passed; the group was killed.
    TimedOut,
    /// Cancellation was requested; the group was killed.
    Cancelled,
}

/// The variables a child process keeps from the agent's environment, besides `AGENT_ENV_PASSTHROUGH`.
/// (`CODEX_HOME` is a directory codex needs, not a secret: a step could read it through `HOME` anyway.)
const ALLOWED_ENV: &[&str] = &["PATH", "HOME", "LANG", "TERM", "USER", "TZ", "CODEX_HOME"];

/// Whether the agent's variable `name` is passed on to children (the allow-list, `LC_*`, or one of
/// `passthrough`). Nothing else is: not the agent's tokens, `OPENAI_API_KEY`, `RUST_LOG` or `ORCH_*`
/// (when the agent is embedded in the server, those hold the encryption key, database URL and tokens).
pub(crate) fn env_allowed(name: &str, passthrough: &[String]) -> bool {
    ALLOWED_ENV.contains(&name) || name.starts_with("LC_") || passthrough.iter().any(|p| p == name)
}

/// Gives the child an allow-list environment (see [`env_allowed`]) instead of the agent's. Call it
/// before setting the child's own variables.
pub(crate) fn child_env(cmd: &mut Command, passthrough: &[String]) {
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| env_allowed(k, passthrough)) {
            cmd.env(k, v);
        }
    }
}

/// Makes `cmd` the leader of a new process group, with piped output.
pub(crate) fn prepare(cmd: &mut Command, stdin_piped: bool) {
    cmd.process_group(0)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin_piped { std::process::Stdio::piped() } else { std::process::Stdio::null() });
}

/// The process group id of a child spawned with [`prepare`] (its pid).
pub(crate) fn group_of(child: &Child) -> Option<Pid> {
    child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw)
}

/// Sends `sig` to the whole group (ignoring a group that is already gone).
pub(crate) fn signal_group(pgid: Option<Pid>, sig: Signal) {
    if let Some(p) = pgid {
        if let Err(e) = killpg(p, sig) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(pgid = p.as_raw(), error = %e, "cannot signal process group");
            }
        }
    }
}

/// Kills the group: SIGTERM, up to `grace` for the leader to exit, then SIGKILL.
async fn kill_group(child: &mut Child, pgid: Option<Pid>, grace: Duration) {
    signal_group(pgid, Signal::SIGTERM);
    let _ = tokio::time::timeout(grace, child.wait()).await;
    signal_group(pgid, Signal::SIGKILL);
    let _ = child.wait().await;
}

/// Waits for `child` to exit, killing its whole group on timeout or cancellation. Once the leader has
/// exited, whatever is left in its group is killed too (a finished step leaves nothing running).
pub(crate) async fn supervise(
    child: &mut Child,
    timeout: Duration,
    cancel: &Cancellation,
    kill_grace: Duration,
) -> std::io::Result<Ended> {
    let pgid = group_of(child);
    // Dropped before the end (the agent's task aborted): the whole group is killed.
    let _guard = GroupGuard(pgid);
    // Killed with the group when this returns.
    let _watchdog = pgid.and_then(spawn_watchdog);
    let ended = tokio::select! {
        st = child.wait() => Ended::Exited(st?),
        _ = tokio::time::sleep(timeout) => {
            kill_group(child, pgid, kill_grace).await;
            Ended::TimedOut
        }
        _ = cancel.cancelled() => {
            kill_group(child, pgid, kill_grace).await;
            Ended::Cancelled
        }
    };
    Ok(ended)
}

/// Starts a watchdog inside the group `pgid` that kills the whole group once the agent process is gone,
/// so a step never outlives its agent. The watchdog blocks reading a pipe whose only writer is the agent
/// (the pipe is close-on-exec, so no other child holds it): when the agent dies, even by SIGKILL, the
/// kernel closes it, the read ends at once and the group is killed. It dies with the group when the
/// step ends normally.
fn spawn_watchdog(pgid: Pid) -> Option<Child> {
    let script = format!("read -r _; kill -KILL -{pgid}", pgid = pgid.as_raw());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
        .process_group(pgid.as_raw())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match cmd.spawn() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), error = %e, "cannot start the step watchdog");
            None
        }
    }
}

/// Kills a process group when dropped.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGKILL);
    }
}

/// Writes `input` to the child's stdin and closes it (a child that does not read it is fine).
pub(crate) fn feed_stdin(child: &mut Child, input: String) -> Option<tokio::task::JoinHandle<()>> {
    let mut stdin = child.stdin.take()?;
    Some(tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
        let _ = stdin.shutdown().await;
    }))
}

fn emit_line(buf: &mut Vec<u8>) -> String {
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    let s = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    s
}

/// Reads `r` line by line (lossy UTF-8, lines capped at [`MAX_LINE_BYTES`]) into `tx`.
pub(crate) async fn pump_lines<R: AsyncRead + Unpin>(r: R, stream: LogStream, tx: mpsc::Sender<(LogStream, String)>) {
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let (consumed, line) = {
            let avail = match reader.fill_buf().await {
                Ok(b) => b,
                Err(_) => break,
            };
            if avail.is_empty() {
                break;
            }
            match avail.iter().position(|b| *b == b'\n') {
                Some(i) if buf.len() + i <= MAX_LINE_BYTES => {
                    buf.extend_from_slice(&avail[..i]);
                    (i + 1, Some(emit_line(&mut buf)))
                }
                _ => {
                    let room = MAX_LINE_BYTES.saturating_sub(buf.len()).max(1);
                    let n = avail.len().min(room);
                    buf.extend_from_slice(&avail[..n]);
                    let line = (buf.len() >= MAX_LINE_BYTES).then(|| emit_line(&mut buf));
                    (n, line)
                }
            }
        };
        reader.consume(consumed);
        if let Some(l) = line {
            if tx.send((stream, l)).await.is_err() {
                return;
            }
        }
    }
    if !buf.is_empty() {
        let _ = tx.send((stream, emit_line(&mut buf))).await;
    }
}

/// Starts pumping the child's stdout and stderr into one channel (each stream in order).
pub(crate) fn pump_output(
    child: &mut Child,
) -> (mpsc::Receiver<(LogStream, String)>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(1024);
    let mut tasks = Vec::new();
    if let Some(out) = child.stdout.take() {
        tasks.push(tokio::spawn(pump_lines(out, LogStream::Stdout, tx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        tasks.push(tokio::spawn(pump_lines(err, LogStream::Stderr, tx)));
    }
    (rx, tasks)
}

/// Describes an exit status for a log line or an error message.
pub(crate) fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown exit status".to_string(),
    }
}

/// Output of [`run_capture`].
#[derive(Debug)]
pub(crate) struct Captured {
    pub ended: Ended,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `sh -c command` with `input` on stdin and captures its output (each capped at `max` bytes).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_capture(
    command: &str,
    dir: Option<&std::path::Path>,
    passthrough: &[String],
    input: String,
    timeout: Duration,
    cancel: &Cancellation,
    kill_grace: Duration,
    max: usize,
) -> std::io::Result<Captured> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command);
    child_env(&mut cmd, passthrough);
    if let Some(d) = dir {
        cmd.current_dir(d).env("ORCH_WORKSPACE", d);
    }
    prepare(&mut cmd, true);
    let mut child = cmd.spawn()?;
    let writer = feed_stdin(&mut child, input);
    let (mut rx, tasks) = pump_output(&mut child);
    let collect = tokio::spawn(async move {
        let (mut out, mut err) = (String::new(), String::new());
        while let Some((stream, line)) = rx.recv().await {
            let target = if stream == LogStream::Stdout { &mut out } else { &mut err };
            if target.len() + line.len() < max {
                target.push_str(&line);
                target.push('\n');
            }
        }
        (out, err)
    });
    let ended = supervise(&mut child, timeout, cancel, kill_grace).await?;
    join_pumps(tasks, Duration::from_secs(2)).await;
    if let Some(w) = writer {
        w.abort();
    }
    let (stdout, stderr) = collect.await.unwrap_or_default();
    Ok(Captured { ended, stdout, stderr })
}

/// Waits up to `limit` for the output pumps to reach end of file (a process that escaped the group may
/// keep a pipe open), then aborts the rest.
pub(crate) async fn join_pumps(tasks: Vec<tokio::task::JoinHandle<()>>, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            tracing::warn!("process output still open after the process group ended; dropping the rest");
            t.abort();
        }
    }
}
