//! Git workspaces: each work item of a project with a repository gets its own branch
//! (`orch/<work item id>`) checked out in its own worktree, from a bare mirror of the repository cached
//! per agent (one clone per repository, not per run). A retry continues from what the previous attempt
//! committed (fetched from the remote's branch when it was pushed, so another agent continues too); after
//! the executor, the agent commits what changed and records the branch, the commits and the diff.

use orchestrator_core::agent::Checkout;
use orchestrator_core::domain::{Repository, RunResult};
use orchestrator_core::ids::WorkItemId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The agent's git settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSettings {
    /// `AGENT_BRANCH_PREFIX`: branches are `<prefix><work item id>` (default `orch/`).
    pub branch_prefix: String,
    /// `AGENT_GIT_AUTHOR` (`Name <email>`): author and committer of the agent's commits.
    pub author_name: String,
    /// The author's email.
    pub author_email: String,
    /// `AGENT_GIT_PUSH`: push the work item's branch to the repository's remote after each run.
    pub push: bool,
    /// `AGENT_DIFF_MAX_BYTES`: the longest patch sent to the server (default 512 KiB, so that it fits the
    /// server's default 1 MiB request body once JSON-escaped); longer ones are cut with a marker line.
    pub diff_max_bytes: usize,
    /// Timeout of one git command that talks to the remote (clone, fetch, push).
    pub network_timeout: Duration,
}

impl Default for GitSettings {
    fn default() -> Self {
        GitSettings {
            branch_prefix: "orch/".into(),
            author_name: "orchestrator-agent".into(),
            author_email: "orchestrator-agent@localhost".into(),
            push: false,
            // Below the server's default request body limit (1 MiB) once JSON-escaped.
            diff_max_bytes: 512 * 1024,
            network_timeout: Duration::from_secs(600),
        }
    }
}

/// Parses `Name <email>`.
pub fn parse_author(v: &str) -> Option<(String, String)> {
    let v = v.trim();
    let (name, rest) = v.split_once('<')?;
    let email = rest.strip_suffix('>')?.trim();
    let name = name.trim();
    if name.is_empty() || email.is_empty() || email.contains(['<', '>']) || name.contains(['<', '>']) {
        return None;
    }
    Some((name.to_string(), email.to_string()))
}

/// Output of a git command.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// How the agent runs git: with the allow-list environment of steps (never the agent's tokens or keys:
/// a step can plant hooks or an fsmonitor in the repository's config, and git passes its environment on)
/// plus what reaching a remote needs (`SSH_AUTH_SOCK`, `GIT_SSH*`, `GIT_ASKPASS`, `GIT_SSL_CAINFO`, and
/// `AGENT_ENV_PASSTHROUGH`), no prompts, no hooks, no fsmonitor. The user's own git config still applies
/// (credential helpers live there).
#[derive(Debug, Clone, Default)]
pub(crate) struct Git {
    passthrough: Vec<String>,
}

/// Variables git keeps from the agent's environment besides the steps' allow-list (how to reach a remote).
const GIT_ENV_KEPT: &[&str] =
    &["SSH_AUTH_SOCK", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_ASKPASS", "SSH_ASKPASS", "GIT_SSL_CAINFO"];

const LOCAL: Duration = Duration::from_secs(120);

impl Git {
    fn command(&self, dir: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("git");
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            let keep = k
                .to_str()
                .is_some_and(|k| crate::process::env_allowed(k, &self.passthrough) || GIT_ENV_KEPT.contains(&k));
            if keep {
                cmd.env(k, v);
            }
        }
        cmd.env("GIT_TERMINAL_PROMPT", "0").env("LC_ALL", "C");
        cmd.args(["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "protocol.file.allow=always"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    async fn raw(&self, dir: &Path, args: &[&str], timeout: Duration) -> Result<Out, String> {
        let mut cmd = self.command(dir);
        cmd.args(args);
        let child = cmd.spawn().map_err(|e| format!("cannot start git: {e}"))?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(o)) => Ok(Out {
                code: o.status.code(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
            }),
            Ok(Err(e)) => Err(format!("git {}: {e}", args.first().unwrap_or(&""))),
            Err(_) => Err(format!("git {} timed out after {} s", args.join(" "), timeout.as_secs())),
        }
    }

    /// Runs git and returns its standard output, or an error with its standard error.
    async fn run(&self, dir: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
        let o = self.raw(dir, args, timeout).await?;
        if o.code == Some(0) {
            Ok(o.stdout)
        } else {
            let what = args.iter().take(3).copied().collect::<Vec<_>>().join(" ");
            Err(format!("git {what} failed: {}", if o.stderr.is_empty() { o.stdout.trim() } else { &o.stderr }))
        }
    }

    /// Whether git exits with 0.
    async fn ok(&self, dir: &Path, args: &[&str]) -> Result<bool, String> {
        Ok(self.raw(dir, args, LOCAL).await?.code == Some(0))
    }

    async fn rev(&self, dir: &Path, name: &str) -> Result<Option<String>, String> {
        let o = self.raw(dir, &["rev-parse", "--verify", "--quiet", &format!("{name}^{{commit}}")], LOCAL).await?;
        Ok((o.code == Some(0)).then(|| o.stdout.trim().to_string()))
    }
}

/// The repositories and worktrees of one agent, under its workspace root.
#[derive(Debug)]
pub(crate) struct Workspaces {
    root: PathBuf,
    settings: GitSettings,
    /// One lock per mirror: fetches and worktree changes of one repository do not overlap.
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per work item: two runs of one item on this agent never share its worktree at once.
    items: Mutex<HashMap<WorkItemId, Arc<tokio::sync::Mutex<()>>>>,
    git: Git,
}

/// A checkout prepared for a run.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub dir: PathBuf,
    pub checkout: Checkout,
    /// How the branch was found (for the run's log).
    pub origin: String,
}

/// What [`Workspaces::finish`] did.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    pub result: RunResult,
    pub patch: String,
    /// `git diff --name-status` lines of the run's own commit (empty when it committed nothing).
    pub committed_files: Vec<String>,
}

impl Workspaces {
    pub fn new(root: PathBuf, settings: GitSettings, env_passthrough: Vec<String>) -> Self {
        Workspaces {
            root,
            settings,
            locks: Mutex::new(HashMap::new()),
            items: Mutex::new(HashMap::new()),
            git: Git { passthrough: env_passthrough },
        }
    }

    /// Holds the work item's worktree for one run (from checkout to cleanup).
    pub async fn lock_item(&self, item: WorkItemId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut m = self.items.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|_, l| Arc::strong_count(l) > 1 || l.try_lock().is_err());
            m.entry(item).or_default().clone()
        };
        lock.lock_owned().await
    }

    pub fn settings(&self) -> &GitSettings {
        &self.settings
    }

    fn mirror_path(&self, url: &str) -> PathBuf {
        let h = hex::encode(&Sha256::digest(url.as_bytes())[..10]);
        self.root.join("repos").join(format!("{h}.git"))
    }

    /// The worktree of a work item.
    pub fn item_dir(&self, item: WorkItemId) -> PathBuf {
        self.root.join("items").join(item.to_string())
    }

    fn lock_for(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(mirror.to_path_buf()).or_default().clone()
    }

    /// The bare mirror of `url`, created on first use, fetched now.
    async fn mirror(&self, url: &str) -> Result<PathBuf, String> {
        let mirror = self.mirror_path(url);
        if !mirror.join("HEAD").exists() {
            let parent = mirror.parent().unwrap_or(&self.root).to_path_buf();
            std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::now_v7()));
            let init = async {
                let t = tmp.to_string_lossy().into_owned();
                self.git.run(&parent, &["init", "--bare", "--quiet", &t], LOCAL).await?;
                self.git.run(&tmp, &["config", "remote.origin.url", url], LOCAL).await?;
                self.git
                    .run(&tmp, &["config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"], LOCAL)
                    .await?;
                self.git.run(&tmp, &["config", "gc.auto", "0"], LOCAL).await?;
                std::fs::rename(&tmp, &mirror).map_err(|e| format!("cannot move the new mirror in place: {e}"))
            };
            if let Err(e) = init.await {
                let _ = std::fs::remove_dir_all(&tmp);
                if !mirror.join("HEAD").exists() {
                    return Err(e);
                }
            }
        }
        // The project's URL itself, not the mirror's `origin` (a step can rewrite the mirror's config).
        self.git
            .run(
                &mirror,
                &["fetch", "--prune", "--quiet", url, "+refs/heads/*:refs/remotes/origin/*"],
                self.settings.network_timeout,
            )
            .await
            .map_err(|e| format!("cannot fetch {url}: {e}"))?;
        Ok(mirror)
    }

    /// The remote's default branch (what its `HEAD` points at).
    async fn default_branch(&self, mirror: &Path, url: &str) -> Result<String, String> {
        let out = self.git.run(mirror, &["ls-remote", "--symref", url, "HEAD"], self.settings.network_timeout).await?;
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("ref: refs/heads/") {
                if let Some((b, _)) = rest.split_once('\t') {
                    return Ok(b.to_string());
                }
            }
        }
        for b in ["main", "master"] {
            if self.git.rev(mirror, &format!("refs/remotes/origin/{b}")).await?.is_some() {
                return Ok(b.to_string());
            }
        }
        Err("cannot tell the repository's default branch (is it empty?): set the project's base_branch".into())
    }

    /// Checks out the work item's branch in its worktree: reused when it is there, else created from the
    /// remote's copy of the branch (pushed by an earlier attempt), the mirror's, or the base branch.
    pub async fn prepare(&self, repo: &Repository, item: WorkItemId) -> Result<Prepared, String> {
        let mirror_path = self.mirror_path(&repo.url);
        let lock = self.lock_for(&mirror_path);
        let _held = lock.lock().await;
        let mirror = self.mirror(&repo.url).await?;
        let base = match &repo.base_branch {
            Some(b) => b.clone(),
            None => self.default_branch(&mirror, &repo.url).await?,
        };
        let base_ref = format!("refs/remotes/origin/{base}");
        if self.git.rev(&mirror, &base_ref).await?.is_none() {
            return Err(format!("the repository has no branch `{base}`"));
        }
        let branch = format!("{}{}", self.settings.branch_prefix, item);
        let local_ref = format!("refs/heads/{branch}");
        let remote = self.git.rev(&mirror, &format!("refs/remotes/origin/{branch}")).await?;
        let dir = self.item_dir(item);
        let reusable = dir.join(".git").exists()
            && self
                .git
                .run(&dir, &["symbolic-ref", "--quiet", "HEAD"], LOCAL)
                .await
                .is_ok_and(|h| h.trim() == local_ref);
        let origin;
        if reusable {
            // A retry continues from what was committed: changes a stopped attempt left uncommitted go.
            self.git.run(&dir, &["reset", "--hard", "--quiet", "HEAD"], LOCAL).await?;
            self.git.run(&dir, &["clean", "-ffd", "--quiet"], LOCAL).await?;
            origin = match &remote {
                Some(r) if self.git.ok(&dir, &["merge-base", "--is-ancestor", r, "HEAD"]).await? => {
                    "its worktree of an earlier attempt".to_string()
                }
                // Another agent pushed further: move on to it.
                Some(r) if self.git.ok(&dir, &["merge-base", "--is-ancestor", "HEAD", r]).await? => {
                    self.git.run(&dir, &["merge", "--ff-only", "--quiet", r], LOCAL).await?;
                    "its worktree, fast-forwarded to the remote's copy".to_string()
                }
                // Diverged (a push of ours failed while another agent pushed): the remote's copy wins;
                // ours is kept under refs/orch-diverged/.
                Some(r) => {
                    let head = self.git.rev(&dir, "HEAD").await?.unwrap_or_default();
                    let keep = format!("refs/orch-diverged/{branch}/{head}");
                    self.git.run(&dir, &["update-ref", &keep, &head], LOCAL).await?;
                    self.git.run(&dir, &["reset", "--hard", "--quiet", r], LOCAL).await?;
                    format!("the remote's copy; this agent's diverged commits are kept as {keep}")
                }
                None => "its worktree of an earlier attempt".to_string(),
            };
        } else {
            if dir.exists() {
                tokio::fs::remove_dir_all(&dir).await.map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
            }
            // Forget worktrees whose directories are gone (this one too).
            self.git.run(&mirror, &["worktree", "prune"], LOCAL).await?;
            let local = self.git.rev(&mirror, &local_ref).await?;
            let start = match (&local, &remote) {
                (Some(l), Some(r)) if self.git.ok(&mirror, &["merge-base", "--is-ancestor", l, r]).await? => {
                    origin = "the remote's copy".to_string();
                    r.clone()
                }
                (Some(l), Some(r)) if !self.git.ok(&mirror, &["merge-base", "--is-ancestor", r, l]).await? => {
                    let keep = format!("refs/orch-diverged/{branch}/{l}");
                    self.git.run(&mirror, &["update-ref", &keep, l], LOCAL).await?;
                    origin = format!("the remote's copy; this agent's diverged commits are kept as {keep}");
                    r.clone()
                }
                (Some(l), _) => {
                    origin = "this agent's copy of an earlier attempt".to_string();
                    l.clone()
                }
                (None, Some(r)) => {
                    origin = "the remote's copy".to_string();
                    r.clone()
                }
                (None, None) => {
                    origin = format!("new, from {base}");
                    self.git.rev(&mirror, &base_ref).await?.unwrap_or_default()
                }
            };
            self.git.run(&mirror, &["update-ref", &local_ref, &start], LOCAL).await?;
            std::fs::create_dir_all(dir.parent().unwrap_or(&self.root))
                .map_err(|e| format!("cannot create the worktree's directory: {e}"))?;
            let d = dir.to_string_lossy().into_owned();
            self.git.run(&mirror, &["worktree", "add", "--force", "--quiet", &d, &branch], LOCAL).await?;
        }
        let start_commit = self.git.rev(&dir, "HEAD").await?.ok_or("the worktree has no commit")?;
        Ok(Prepared {
            dir,
            checkout: Checkout { url: repo.url.clone(), base_branch: base, branch, start_commit },
            origin,
        })
    }

    /// Commits what changed in the worktree (when anything did) and measures the branch against its base.
    pub async fn finish(&self, dir: &Path, co: &Checkout, message: &str) -> Result<Finished, String> {
        self.git.run(dir, &["add", "--all", "--", "."], LOCAL).await?;
        let changed = !self.git.ok(dir, &["diff", "--cached", "--quiet"]).await?;
        let mut committed_files = Vec::new();
        if changed {
            let name = format!("user.name={}", self.settings.author_name);
            let email = format!("user.email={}", self.settings.author_email);
            self.git
                .run(dir, &["-c", &name, "-c", &email, "commit", "--quiet", "--no-verify", "-m", message], LOCAL)
                .await?;
            committed_files = self
                .git
                .run(dir, &["diff", "--name-status", "HEAD~1", "HEAD"], LOCAL)
                .await?
                .lines()
                .map(str::to_string)
                .collect();
        }
        let head = self.git.rev(dir, "HEAD").await?.ok_or("the worktree has no commit")?;
        let base_ref = format!("refs/remotes/origin/{}", co.base_branch);
        let base = self.git.run(dir, &["merge-base", &base_ref, "HEAD"], LOCAL).await.map(|s| s.trim().to_string())?;
        let numstat = self.git.run(dir, &["diff", "--numstat", "--no-renames", &base, &head], LOCAL).await?;
        let (mut insertions, mut deletions, mut files) = (0u64, 0u64, Vec::new());
        for line in numstat.lines() {
            let mut parts = line.splitn(3, '\t');
            let (a, d, path) = (parts.next(), parts.next(), parts.next());
            insertions += a.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
            deletions += d.and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
            if let Some(p) = path {
                files.push(p.to_string());
            }
        }
        let (patch, truncated) = self.patch(dir, &base, &head).await?;
        let files_changed = files.len() as u32;
        files.truncate(orchestrator_core::rules::MAX_RESULT_FILES);
        Ok(Finished {
            result: RunResult {
                branch: co.branch.clone(),
                base_commit: base,
                head_commit: head,
                start_commit: Some(co.start_commit.clone()),
                committed: changed,
                pushed: false,
                files_changed,
                insertions,
                deletions,
                files,
                patch_truncated: truncated,
            },
            patch,
            committed_files,
        })
    }

    /// The patch from `base` to `head`, read up to the size limit (the rest is not read).
    async fn patch(&self, dir: &Path, base: &str, head: &str) -> Result<(String, bool), String> {
        let max = self.settings.diff_max_bytes;
        let mut cmd = self.git.command(dir);
        cmd.args(["diff", "--no-color", "--no-ext-diff", "--binary", base, head]).stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| format!("cannot start git: {e}"))?;
        let mut out = child.stdout.take().ok_or("git diff has no output")?;
        let mut buf = Vec::with_capacity(max.min(1 << 20) + 1);
        let limit = (max as u64).saturating_add(1);
        (&mut out).take(limit).read_to_end(&mut buf).await.map_err(|e| format!("cannot read the diff: {e}"))?;
        let truncated = buf.len() > max;
        let total = if truncated {
            // Count the rest without keeping it.
            let rest = tokio::io::copy(&mut out, &mut tokio::io::sink()).await.unwrap_or(0);
            buf.len() as u64 + rest
        } else {
            buf.len() as u64
        };
        let _ = child.wait().await;
        let mut text = String::from_utf8_lossy(&buf[..buf.len().min(max)]).into_owned();
        if truncated {
            text.push_str(&orchestrator_core::rules::truncation_marker(total as usize));
        }
        Ok((text, truncated))
    }

    /// Pushes the work item's branch to the project's repository URL (not the mirror's `origin`, which a
    /// step could rewrite), within `timeout` at most.
    pub async fn push(&self, dir: &Path, co: &Checkout, timeout: Duration) -> Result<(), String> {
        let refspec = format!("HEAD:refs/heads/{}", co.branch);
        self.git
            .run(dir, &["push", "--quiet", &co.url, &refspec], timeout.min(self.settings.network_timeout))
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot push {} to {}: {e}", co.branch, co.url))
    }

    /// Removes a work item's worktree (its branch stays in the mirror and, when pushed, on the remote).
    pub async fn remove(&self, dir: &Path, url: &str) {
        let mirror = self.mirror_path(url);
        let d = dir.to_string_lossy().into_owned();
        if let Err(e) = self.git.run(&mirror, &["worktree", "remove", "--force", &d], LOCAL).await {
            tracing::debug!(path = %d, error = %e, "git worktree remove failed; removing the directory");
            let _ = tokio::fs::remove_dir_all(dir).await;
            let _ = self.git.run(&mirror, &["worktree", "prune"], LOCAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_authors() {
        assert_eq!(parse_author("Ann Agent <ann@example.com>"), Some(("Ann Agent".into(), "ann@example.com".into())));
        assert_eq!(parse_author("no email"), None);
        assert_eq!(parse_author("<a@b>"), None);
        assert_eq!(parse_author("x <>"), None);
    }
}
