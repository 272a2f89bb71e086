//! # orchestrator-sqlite
//!
//! The embedded default [`Store`] on SQLite (rusqlite, bundled).
//!
//! - One writer thread owns the write connection and takes commands over a channel with replies. It
//!   runs every command that is waiting in one `BEGIN IMMEDIATE` transaction (group commit; commands
//!   arriving within a few milliseconds join it) and replies after `COMMIT`. A failing command rolls
//!   back alone: commands that can run again (claims, completions, heartbeats, ...) run without a
//!   savepoint and, if one fails after writing, the transaction is rolled back and the commands before
//!   it run again; the others run in a savepoint.
//! - Reads run on a few read-only connections in `spawn_blocking` (WAL lets them run beside the writer).
//! - No rusqlite call ever runs on an async worker thread.
//! - WAL, `busy_timeout`, `synchronous=NORMAL` (or `FULL` by option), embedded versioned migrations.

#![forbid(unsafe_code)]

mod ops;
mod rows;
mod schema;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::domain::*;
use orchestrator_core::error::{StoreError, StoreResult};
use orchestrator_core::ids::*;
use orchestrator_core::retry::RetryOverrides;
use orchestrator_core::store::*;
use orchestrator_core::Notifier;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

pub use schema::latest_version as schema_version;

/// How durable a commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// `synchronous=NORMAL`: durable against process crashes; a power loss may lose the last commits.
    #[default]
    Normal,
    /// `synchronous=FULL`: durable against power loss, slower.
    Full,
}

/// Options of [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Commit durability.
    pub synchronous: Synchronous,
    /// How long a writer waits for a lock held by another process.
    pub busy_timeout: std::time::Duration,
    /// Read-only connections for concurrent reads (file databases only).
    pub read_connections: usize,
    /// Most commands committed together in one transaction.
    pub max_batch: usize,
    /// The writer's page cache, in KiB (`PRAGMA cache_size`). Bigger is not faster: when a B-tree page
    /// splits, SQLite renumbers pages through a temporary page number far past the end of the file,
    /// and the next commit then walks the whole cache; with a big cache that walk costs more than the
    /// reads it saves (the operating system caches the file too). Measured in the README.
    pub cache_kib: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Normal,
            busy_timeout: std::time::Duration::from_secs(5),
            read_connections: 4,
            max_batch: 512,
            cache_kib: 8 * 1024,
        }
    }
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory that should hold the database does not exist.
    #[error("cannot open SQLite database `{path}`: directory `{dir}` does not exist")]
    MissingDirectory {
        /// The database path.
        path: PathBuf,
        /// The missing directory.
        dir: PathBuf,
    },
    /// The file exists but is not a SQLite database.
    #[error("`{path}` is not a SQLite database (or it is encrypted or corrupt)")]
    NotADatabase {
        /// The database path.
        path: PathBuf,
    },
    /// The file or its directory cannot be written.
    #[error("SQLite database `{path}` is read-only: {message}")]
    ReadOnly {
        /// The database path.
        path: PathBuf,
        /// Detail.
        message: String,
    },
    /// A newer build wrote this database.
    #[error("SQLite database `{path}` has schema version {found}, newer than this build supports ({supported}); upgrade the orchestrator")]
    NewerSchema {
        /// The database path.
        path: PathBuf,
        /// Version found.
        found: i64,
        /// Latest version this build knows.
        supported: i64,
    },
    /// Anything else SQLite reported.
    #[error("cannot open SQLite database `{path}`: {message}")]
    Sqlite {
        /// The database path.
        path: PathBuf,
        /// Detail.
        message: String,
    },
}

type Reply = Box<dyn FnOnce(Option<String>) + Send>;
/// What a command did: (it succeeded, claimers should be woken, the reply to send after the commit).
type Ran = (bool, bool, Reply);

/// A command for the writer thread.
enum Job {
    /// Runs exactly once: in its own savepoint, unless it is the first command of its transaction.
    Once(Box<dyn FnOnce(&Connection) -> Ran + Send>),
    /// Can run again with the same effect (it only reads what it captured): runs without a savepoint.
    /// If it fails after writing, the transaction is rolled back and the commands before it run again,
    /// each in its own savepoint.
    Again(Box<dyn FnMut(&Connection) -> Ran + Send>),
}

/// Up to this many work items, a creation is a command that can run again (see [`Job`]).
const SMALL_CREATE: usize = 16;

type Answer<R> = tokio::sync::oneshot::Receiver<StoreResult<R>>;

/// The answer to a command; a command dropped unanswered (it panicked, or its transaction could not
/// begin) is a retryable `Unavailable`.
async fn answered<R>(rx: Answer<R>) -> StoreResult<R> {
    rx.await.map_err(|_| StoreError::Unavailable {
        retryable: true,
        message: "the SQLite writer could not run the command (see the log)".into(),
    })?
}

/// A command that runs once, and where its answer arrives.
fn once_job<R: Send + 'static>(
    f: impl FnOnce(&Connection) -> StoreResult<(R, bool)> + Send + 'static,
) -> (Job, Answer<R>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<StoreResult<R>>();
    let job = Job::Once(Box::new(move |c: &Connection| {
        ran(f(c), move |v| {
            let _ = tx.send(v);
        })
    }));
    (job, rx)
}

/// A command that can run again, and where its answer arrives.
fn again_job<R: Send + 'static>(
    f: impl Fn(&Connection) -> StoreResult<(R, bool)> + Send + 'static,
) -> (Job, Answer<R>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<StoreResult<R>>();
    // Every run makes a reply; only the one of the run whose transaction ends is sent.
    let slot = Arc::new(Mutex::new(Some(tx)));
    let job = Job::Again(Box::new(move |c: &Connection| {
        let slot = slot.clone();
        ran(f(c), move |v| {
            if let Some(tx) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(v);
            }
        })
    }));
    (job, rx)
}

/// Turns a command's result into what the writer needs; `send` delivers the caller's answer.
fn ran<R: Send + 'static>(res: StoreResult<(R, bool)>, send: impl FnOnce(StoreResult<R>) + Send + 'static) -> Ran {
    match res {
        Ok((r, notify)) => {
            let reply: Reply = Box::new(move |commit_err: Option<String>| {
                send(match commit_err {
                    None => Ok(r),
                    Some(m) => Err(StoreError::Unavailable { retryable: true, message: m }),
                })
            });
            (true, notify, reply)
        }
        Err(e) => (false, false, Box::new(move |_| send(Err(e)))),
    }
}

enum Readers {
    /// Read-only connections for a file database.
    Pool { path: PathBuf, idle: Mutex<Vec<Connection>>, max_idle: usize },
    /// `:memory:`: reads go through the writer.
    Writer,
}

/// The SQLite store. Cheap to share behind an `Arc`; dropping the last handle stops the writer thread
/// after it finishes the commands already sent.
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    readers: Arc<Readers>,
    notifier: Notifier,
    path: Option<PathBuf>,
    // Dropping it stops the checkpointer thread.
    checkpointer: Option<mpsc::Sender<()>>,
    // WAL length in frames as the checkpointer last saw it (the writer restarts a long log).
    wal_frames: Arc<AtomicU64>,
    // Keeps a temporary directory alive for stores made by `open_temp`.
    _temp: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn map_open_err(path: &Path, e: rusqlite::Error) -> OpenError {
    use rusqlite::ErrorCode;
    if let rusqlite::Error::SqliteFailure(f, msg) = &e {
        let message = msg.clone().unwrap_or_else(|| f.to_string());
        match f.code {
            ErrorCode::NotADatabase => return OpenError::NotADatabase { path: path.to_path_buf() },
            ErrorCode::ReadOnly => return OpenError::ReadOnly { path: path.to_path_buf(), message },
            ErrorCode::CannotOpen => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                    return OpenError::MissingDirectory { path: path.to_path_buf(), dir: dir.to_path_buf() };
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.is_dir() {
                        return OpenError::Sqlite {
                            path: path.to_path_buf(),
                            message: format!("`{}` is not a directory", dir.display()),
                        };
                    }
                    if !dir_writable(dir) {
                        return OpenError::ReadOnly {
                            path: path.to_path_buf(),
                            message: format!(
                                "directory `{}` is not writable (SQLite creates the database and its -wal and -shm files there)",
                                dir.display()
                            ),
                        };
                    }
                }
                return OpenError::Sqlite { path: path.to_path_buf(), message };
            }
            _ => return OpenError::Sqlite { path: path.to_path_buf(), message },
        }
    }
    OpenError::Sqlite { path: path.to_path_buf(), message: e.to_string() }
}

/// Whether a file can be created in `dir` (only asked after SQLite could not open a database there).
fn dir_writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".orchestrator-sqlite-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::AlreadyExists,
    }
}

fn configure_writer(conn: &Connection, opts: &SqliteOptions, memory: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(opts.busy_timeout)?;
    if !memory {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
                Some(format!("could not switch to WAL (journal_mode is {mode})")),
            ));
        }
    }
    let sync = match opts.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    // Checkpoints run on their own thread (see `start_checkpointer`); the writer checkpoints itself
    // only as a fallback when the WAL grows past ~80 MB.
    let cache = opts.cache_kib.max(64);
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -{cache};
         PRAGMA wal_autocheckpoint = 20000;"
    ))?;
    ops::register_functions(conn)?;
    // Multi-row claim statements come in one shape per chunk size.
    conn.set_prepared_statement_cache_capacity(256);
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| map_open_err(path, e))?;
    let supported = schema::latest_version();
    if found > supported {
        return Err(OpenError::NewerSchema { path: path.to_path_buf(), found, supported });
    }
    if found == supported {
        return Ok(());
    }
    let tx =
        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| map_open_err(path, e))?;
    for (i, m) in schema::MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(m).map_err(|e| map_open_err(path, e))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1)).map_err(|e| map_open_err(path, e))?;
    }
    tx.commit().map_err(|e| map_open_err(path, e))
}

impl SqliteStore {
    /// Opens (creating when missing) a database file and applies pending migrations.
    pub fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<SqliteStore, OpenError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                return Err(OpenError::MissingDirectory { path: path.clone(), dir: dir.to_path_buf() });
            }
        }
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| map_open_err(&path, e))?;
        // SQLite silently falls back to a read-only open when the file cannot be opened for writing
        // (e.g. an immutable file); every write would then fail later. Refuse it here.
        if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) {
            return Err(OpenError::ReadOnly { path, message: "the file cannot be opened for writing".into() });
        }
        configure_writer(&conn, &opts, false).map_err(|e| map_open_err(&path, e))?;
        migrate(&mut conn, &path)?;
        let readers =
            Readers::Pool { path: path.clone(), idle: Mutex::new(Vec::new()), max_idle: opts.read_connections.max(1) };
        let mut store = Self::start(conn, readers, opts, Some(path.clone()))?;
        store.checkpointer = start_checkpointer(&path, store.wal_frames.clone());
        Ok(store)
    }

    /// An in-memory database (for tests): nothing is persisted.
    pub fn open_in_memory() -> Result<SqliteStore, OpenError> {
        let path = PathBuf::from(":memory:");
        let opts = SqliteOptions::default();
        let mut conn = Connection::open_in_memory().map_err(|e| map_open_err(&path, e))?;
        configure_writer(&conn, &opts, true).map_err(|e| map_open_err(&path, e))?;
        migrate(&mut conn, &path)?;
        Self::start(conn, Readers::Writer, opts, None)
    }

    /// The database file (None for `:memory:`).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Keeps `guard` (e.g. a temporary directory) alive as long as the store.
    pub fn with_guard(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self._temp = Some(Box::new(guard));
        self
    }

    fn start(
        conn: Connection,
        readers: Readers,
        opts: SqliteOptions,
        path: Option<PathBuf>,
    ) -> Result<SqliteStore, OpenError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let notifier = Notifier::new();
        let n2 = notifier.clone();
        let max_batch = opts.max_batch.max(1);
        let wal_frames = Arc::new(AtomicU64::new(0));
        let wal = path.as_ref().map(|_| (wal_frames.clone(), opts.busy_timeout));
        let spawned = std::thread::Builder::new()
            .name("orchestrator-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, n2, max_batch, wal));
        if let Err(e) = spawned {
            return Err(OpenError::Sqlite {
                path: path.unwrap_or_else(|| PathBuf::from(":memory:")),
                message: format!("could not start the writer thread: {e}"),
            });
        }
        Ok(SqliteStore {
            jobs: tx,
            readers: Arc::new(readers),
            notifier,
            path,
            checkpointer: None,
            wal_frames,
            _temp: None,
        })
    }

    /// Runs `f` once in the writer's transaction (inside its own savepoint unless it opens the
    /// transaction); replies after commit. The bool returned by `f` says whether claimers should be woken.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<(R, bool)> + Send + 'static,
    ) -> StoreResult<R> {
        let (job, rx) = once_job(f);
        self.submit(job, rx).await
    }

    /// Like [`Self::write`] for commands that `f` can run again with the same effect (it only reads
    /// what it captured): they run without a savepoint of their own.
    async fn write_again<R: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> StoreResult<(R, bool)> + Send + 'static,
    ) -> StoreResult<R> {
        let (job, rx) = again_job(f);
        self.submit(job, rx).await
    }

    async fn submit<R>(&self, job: Job, rx: Answer<R>) -> StoreResult<R> {
        self.send_job(job)?;
        answered(rx).await
    }

    fn send_job(&self, job: Job) -> StoreResult<()> {
        self.jobs.send(job).map_err(|_| StoreError::Unavailable {
            retryable: false,
            message: "the SQLite writer thread has stopped".into(),
        })
    }

    /// Runs a read on a read-only connection (or through the writer for `:memory:`).
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        match &*self.readers {
            Readers::Writer => self.write(move |c| f(c).map(|r| (r, false))).await,
            Readers::Pool { .. } => {
                let readers = self.readers.clone();
                tokio::task::spawn_blocking(move || {
                    let Readers::Pool { path, idle, max_idle } = &*readers else {
                        return Err(StoreError::conflict("reader pool missing"));
                    };
                    let conn = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let conn = match conn {
                        Some(c) => c,
                        None => open_reader(path)?,
                    };
                    let out = f(&conn);
                    let mut g = idle.lock().unwrap_or_else(|p| p.into_inner());
                    if g.len() < *max_idle {
                        g.push(conn);
                    }
                    out
                })
                .await
                .map_err(StoreError::backend)?
            }
        }
    }
}

/// A work item creation with its row, prepared off the writer thread (hashing, JSON).
type Prepared = (NewWorkItem, WorkItem, ops::RowJson);

fn prepare(p: NewWorkItem, now: DateTime<Utc>) -> StoreResult<Prepared> {
    let w = orchestrator_core::rules::new_work_item(&p, now);
    let json = ops::RowJson::of(&w)?;
    Ok((p, w, json))
}

/// Creations above this many items stream to the writer in chunks.
const STREAM_CREATE: usize = 2 * ops::INSERT_CHUNK;

/// The rows of a streamed creation, as the writer thread receives them. `None` marks the end; a
/// stream whose sender went away without it was abandoned (the caller's task was dropped or failed).
struct Streamed {
    rx: mpsc::Receiver<Option<Vec<Prepared>>>,
    buf: std::vec::IntoIter<Prepared>,
    ended: bool,
}

impl Iterator for Streamed {
    type Item = Prepared;
    fn next(&mut self) -> Option<Prepared> {
        loop {
            if let Some(x) = self.buf.next() {
                return Some(x);
            }
            if self.ended {
                return None;
            }
            match self.rx.recv() {
                Ok(Some(rows)) => self.buf = rows.into_iter(),
                Ok(None) => self.ended = true,
                Err(_) => return None,
            }
        }
    }
}

impl SqliteStore {
    /// [`Store::work_items_create`] for many items: one command whose rows arrive in chunks, so the
    /// writer inserts while this task prepares the rest. All or nothing, like any creation.
    async fn work_items_create_streamed(
        &self,
        items: Vec<NewWorkItem>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<WorkItemCreated>> {
        let (tx, rx) = mpsc::channel::<Option<Vec<Prepared>>>();
        let (job, answer) = once_job(move |c| {
            let mut rows = Streamed { rx, buf: Vec::new().into_iter(), ended: false };
            let res = ops::work_items_create(c, &mut rows, now)?;
            if !rows.ended {
                return Err(StoreError::Unavailable {
                    retryable: true,
                    message: "the creation was abandoned before all its items arrived; nothing was stored".into(),
                });
            }
            Ok(res)
        });
        self.send_job(job)?;
        let mut items = items.into_iter();
        loop {
            let chunk: Vec<NewWorkItem> = items.by_ref().take(ops::INSERT_CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            match chunk.into_iter().map(|p| prepare(p, now)).collect::<StoreResult<Vec<_>>>() {
                // A send fails only when the command already ended (with an error): its answer says why.
                Ok(rows) => {
                    if tx.send(Some(rows)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    // Dropping the sender abandons the command, which stores nothing.
                    drop(tx);
                    let _ = answer.await;
                    return Err(e);
                }
            }
        }
        let _ = tx.send(None);
        answered(answer).await
    }
}

fn open_reader(path: &Path) -> StoreResult<Connection> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(ops::map_err)?;
    c.busy_timeout(std::time::Duration::from_secs(5)).map_err(ops::map_err)?;
    ops::register_functions(&c).map_err(ops::map_err)?;
    Ok(c)
}

/// Starts a thread that moves WAL pages into the database (PASSIVE checkpoints, which never block the
/// writer or readers) every 50 ms, so the writer thread does not pay for checkpoints and their fsync.
fn start_checkpointer(path: &Path, wal_frames: Arc<AtomicU64>) -> Option<mpsc::Sender<()>> {
    let conn =
        match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no checkpointer connection; the writer will checkpoint");
                return None;
            }
        };
    let (tx, rx) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new().name("orchestrator-sqlite-checkpointer".into()).spawn(move || {
        let _ = conn.busy_timeout(std::time::Duration::from_millis(100));
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(std::time::Duration::from_millis(50)) {
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
                Ok(frames) => wal_frames.store(frames.max(0) as u64, Ordering::Relaxed),
                Err(e) => tracing::debug!(error = %e, "passive checkpoint skipped"),
            }
        }
    });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "could not start the checkpointer thread");
            None
        }
    }
}

/// WAL length (in frames, as the checkpointer last saw it) past which the writer starts the log over.
const WAL_RESET_FRAMES: u64 = 16 * 1024; // 64 MB of 4 KB pages

/// The passive checkpointer copies WAL pages into the database but, under a steady stream of writes,
/// never gets the moment to start the log over, and a log that only grows makes every page lookup
/// slower. Between batches the writer (the only writer) restarts the log once the checkpointer has seen
/// it pass [`WAL_RESET_FRAMES`]; little is left to copy by then. If a reader or the checkpointer is in
/// the way it gives up at once and tries again later.
fn restart_wal_if_long(conn: &Connection, wal_frames: &AtomicU64, busy_timeout: std::time::Duration) {
    if wal_frames.load(Ordering::Relaxed) < WAL_RESET_FRAMES {
        return;
    }
    let _ = conn.busy_timeout(std::time::Duration::ZERO);
    match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)) {
        Ok(0) => wal_frames.store(0, Ordering::Relaxed),
        Ok(_) => tracing::debug!("WAL restart deferred: the log is in use"),
        Err(e) => tracing::debug!(error = %e, "WAL restart skipped"),
    }
    let _ = conn.busy_timeout(busy_timeout);
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    notifier: Notifier,
    max_batch: usize,
    wal: Option<(Arc<AtomicU64>, std::time::Duration)>,
) {
    let mut batches: u32 = 0;
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // Commands that arrive while the transaction is young join it: fewer commits, and pages that
        // several commands change are written to the WAL once.
        let deadline = std::time::Instant::now() + JOIN_WINDOW;
        let mut more = |len: usize| {
            if len < max_batch && std::time::Instant::now() < deadline {
                rx.try_recv().ok()
            } else {
                None
            }
        };
        run_batch_joining(&mut conn, batch, &notifier, &mut more);
        batches = batches.wrapping_add(1);
        if let Some((frames, busy)) = &wal {
            if batches % 16 == 0 {
                restart_wal_if_long(&conn, frames, *busy);
            }
        }
    }
}

/// How long after a transaction began newly arriving commands may still join it.
const JOIN_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

#[cfg(test)]
fn run_batch(conn: &mut Connection, batch: Vec<Job>, notifier: &Notifier) {
    run_batch_joining(conn, batch, notifier, &mut |_| None)
}

/// Runs the batch; `more(n)` may hand over another command to run in the same transaction (n: commands
/// in the batch so far).
fn run_batch_joining(
    conn: &mut Connection,
    batch: Vec<Job>,
    notifier: &Notifier,
    more: &mut dyn FnMut(usize) -> Option<Job>,
) {
    let mut jobs: Vec<Option<Job>> = batch.into_iter().map(Some).collect();
    let mut next = 0;
    while next < jobs.len() {
        next = run_tx(conn, &mut jobs, next, notifier, more);
    }
}

/// Runs a command (a `Once` command is used up).
fn call(job: &mut Option<Job>, conn: &Connection) -> Option<Ran> {
    match job {
        Some(Job::Again(f)) => Some(f(conn)),
        Some(Job::Once(_)) => match job.take() {
            Some(Job::Once(f)) => Some(f(conn)),
            _ => None,
        },
        None => None,
    }
}

/// Runs commands from `start` in one transaction and commits it; returns the index of the first
/// command it did not take.
///
/// Savepoints cost a copy of every page a command changes, so they are used only where needed: the
/// first command of the transaction, and every command that can run again, run without one. A command
/// that fails without having changed a row needs nothing undone. One that fails after writing rolls
/// the transaction back: alone in it, it is simply answered; otherwise the commands before it (all of
/// them runnable again) run again from the start of a new transaction, each in its own savepoint, as
/// do all commands after the first one that can run only once.
fn run_tx(
    conn: &mut Connection,
    jobs: &mut Vec<Option<Job>>,
    start: usize,
    notifier: &Notifier,
    more: &mut dyn FnMut(usize) -> Option<Job>,
) -> usize {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        // The command cannot run; dropping it answers its caller with a retryable `Unavailable`.
        tracing::error!(error = %e, "could not begin a write transaction");
        jobs[start] = None;
        return start + 1;
    }
    let mut replies: Vec<Reply> = Vec::with_capacity(jobs.len() - start);
    let mut notify = false;
    let mut guarded = false;
    let mut i = start;
    loop {
        if i == jobs.len() {
            match more(jobs.len()) {
                Some(j) => jobs.push(Some(j)),
                None => break,
            }
        }
        let again = matches!(jobs[i], Some(Job::Again(_)));
        if !again {
            // Nothing before the next command could be run again after this one.
            guarded = true;
        }
        let before = conn.total_changes();
        if !guarded || i == start {
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&mut jobs[i], conn)));
            if conn.is_autocommit() {
                lost(&mut replies, res.ok().flatten().map(|r| r.2));
                return i + 1;
            }
            match res {
                Ok(Some((true, n, reply))) => {
                    notify |= n;
                    replies.push(reply);
                }
                Ok(Some((false, _, reply))) if conn.total_changes() == before => replies.push(reply),
                Ok(None) => {}
                failed => {
                    // It failed (or panicked) after writing: undo the whole transaction.
                    let _ = conn.execute_batch("ROLLBACK");
                    if i == start {
                        match failed {
                            Ok(Some((_, _, reply))) => reply(None),
                            _ => tracing::error!("a SQLite command panicked; it was rolled back"),
                        }
                        jobs[i] = None;
                        return i + 1;
                    }
                    // Commands start..i can all run again: do so, each in its own savepoint.
                    replies.clear();
                    notify = false;
                    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
                        tracing::error!(error = %e, "could not begin a write transaction");
                        for j in jobs.iter_mut().take(i + 1).skip(start) {
                            *j = None;
                        }
                        return i + 1;
                    }
                    guarded = true;
                    i = start;
                    continue;
                }
            }
        } else {
            if let Err(e) = conn.prepare_cached("SAVEPOINT job").and_then(|mut st| st.execute([])) {
                tracing::error!(error = %e, "savepoint failed");
                jobs[i] = None;
                i += 1;
                continue;
            }
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&mut jobs[i], conn)));
            let reply = match res {
                Ok(Some((ok, n, reply))) => {
                    let end = if ok {
                        conn.prepare_cached("RELEASE job").and_then(|mut st| st.execute([])).map(|_| ())
                    } else {
                        conn.execute_batch("ROLLBACK TO job; RELEASE job")
                    };
                    if let Err(e) = end {
                        tracing::error!(error = %e, "savepoint release failed");
                    }
                    notify |= ok && n;
                    Some(reply)
                }
                Ok(None) => None,
                Err(_) => {
                    let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
                    tracing::error!("a SQLite command panicked; it was rolled back");
                    None
                }
            };
            if conn.is_autocommit() {
                lost(&mut replies, reply);
                return i + 1;
            }
            replies.extend(reply);
        }
        i += 1;
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => {
            // Wake claimers before replying, so a caller that sees its reply also sees the signal.
            if notify {
                notifier.notify();
            }
            for r in replies {
                r(None);
            }
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            let msg = format!("commit failed: {e}");
            for r in replies {
                r(Some(msg.clone()));
            }
        }
    }
    jobs.len()
}

/// SQLite rolled the whole transaction back by itself (disk full, I/O error, out of memory): every
/// command already run in it is lost. Tells their callers; the writer goes on in a new transaction.
fn lost(replies: &mut Vec<Reply>, current: Option<Reply>) {
    let msg = "the write transaction was rolled back by SQLite; nothing of this command was stored";
    for r in replies.drain(..).chain(current) {
        r(Some(msg.to_string()));
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(ops::map_err)).await
    }

    async fn project_create(&self, p: NewProject) -> StoreResult<Project> {
        self.write(move |c| ops::project_create(c, p).map(|r| (r, false))).await
    }
    async fn project_get(&self, id: ProjectId) -> StoreResult<Project> {
        self.read(move |c| ops::project_get(c, id)).await
    }
    async fn project_list(&self, page: Page) -> StoreResult<Vec<Project>> {
        self.read(move |c| ops::project_list(c, page)).await
    }
    async fn project_update(&self, p: ProjectUpdate) -> StoreResult<Project> {
        self.write(move |c| ops::project_update(c, p).map(|r| (r, false))).await
    }
    async fn project_delete(&self, id: ProjectId) -> StoreResult<()> {
        self.write(move |c| ops::project_delete(c, id).map(|r| (r, false))).await
    }

    async fn vision_put(&self, p: VisionPut) -> StoreResult<Vision> {
        self.write(move |c| ops::vision_put(c, p).map(|r| (r, false))).await
    }
    async fn vision_get(&self, project_id: ProjectId, version: Option<u32>) -> StoreResult<Vision> {
        self.read(move |c| ops::vision_get(c, project_id, version)).await
    }
    async fn vision_list(&self, project_id: ProjectId) -> StoreResult<Vec<Vision>> {
        self.read(move |c| ops::vision_list(c, project_id)).await
    }

    async fn draft_create(&self, p: NewDraft) -> StoreResult<(RequirementsDraft, Option<ApprovalRequest>)> {
        self.write(move |c| ops::draft_create(c, p).map(|r| (r, false))).await
    }
    async fn draft_get(&self, id: DraftId) -> StoreResult<RequirementsDraft> {
        self.read(move |c| ops::draft_get(c, id)).await
    }
    async fn draft_list(&self, project_id: ProjectId, page: Page) -> StoreResult<Vec<RequirementsDraft>> {
        self.read(move |c| ops::draft_list(c, project_id, page)).await
    }
    async fn draft_decide(&self, id: DraftId, d: Decide) -> StoreResult<DecisionOutcome> {
        self.write_again(move |c| ops::decide(c, None, Some(id), &d).map(|r| (r, false))).await
    }

    async fn approval_get(&self, id: ApprovalId) -> StoreResult<ApprovalRequest> {
        self.read(move |c| ops::approval_get(c, id)).await
    }
    async fn approval_list(&self, f: ApprovalFilter) -> StoreResult<Vec<ApprovalRequest>> {
        self.read(move |c| ops::approval_list(c, &f)).await
    }
    async fn approval_decide(&self, id: ApprovalId, d: Decide) -> StoreResult<DecisionOutcome> {
        self.write_again(move |c| ops::decide(c, Some(id), None, &d).map(|r| (r, false))).await
    }

    async fn recipe_create(&self, p: NewRecipe) -> StoreResult<ToolRecipe> {
        self.write(move |c| ops::recipe_create(c, p).map(|r| (r, false))).await
    }
    async fn recipe_get(&self, id: RecipeId) -> StoreResult<ToolRecipe> {
        self.read(move |c| ops::recipe_get(c, id)).await
    }
    async fn recipe_list(&self, page: Page) -> StoreResult<Vec<ToolRecipe>> {
        self.read(move |c| ops::recipe_list(c, page)).await
    }

    async fn work_items_create(
        &self,
        items: Vec<NewWorkItem>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<WorkItemCreated>> {
        // A large creation streams: the writer starts inserting while this task still prepares rows.
        if items.len() > STREAM_CREATE {
            return self.work_items_create_streamed(items, now).await;
        }
        let prepared = items.into_iter().map(|p| prepare(p, now)).collect::<StoreResult<Vec<_>>>()?;
        // A few creations can run again from a copy (cheaper than a savepoint); a large batch runs once.
        if prepared.len() <= SMALL_CREATE {
            self.write_again(move |c| ops::work_items_create(c, prepared.clone(), now)).await
        } else {
            self.write(move |c| ops::work_items_create(c, prepared, now)).await
        }
    }
    async fn work_item_get(&self, id: WorkItemId) -> StoreResult<WorkItem> {
        self.read(move |c| ops::work_item_get(c, id)).await
    }
    async fn work_item_list(&self, f: WorkItemFilter) -> StoreResult<Vec<WorkItem>> {
        self.read(move |c| ops::work_item_list(c, &f)).await
    }
    async fn work_item_update(&self, p: WorkItemUpdate) -> StoreResult<WorkItemChanged> {
        self.write(move |c| ops::work_item_update(c, p).map(|r| (r, false))).await
    }
    async fn work_item_submit(
        &self,
        id: WorkItemId,
        require_approval: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItemChanged> {
        self.write(move |c| ops::work_item_submit(c, id, require_approval, now).map(|r| (r, false))).await
    }
    async fn work_item_set_policy(
        &self,
        id: WorkItemId,
        retry: RetryOverrides,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItem> {
        self.write(move |c| ops::work_item_set_policy(c, id, retry, now).map(|r| (r, false))).await
    }
    async fn work_item_cancel(&self, id: WorkItemId, x: Cancel) -> StoreResult<WorkItem> {
        self.write_again(move |c| ops::cancel_item(c, id, &x.reason, x.now).map(|r| (r, false))).await
    }
    async fn work_item_requeue(&self, id: WorkItemId, r: Requeue) -> StoreResult<WorkItem> {
        self.write_again(move |c| ops::work_item_requeue(c, id, &r).map(|w| (w, true))).await
    }

    async fn enqueue_many(&self, items: Vec<Enqueue>, now: DateTime<Utc>) -> StoreResult<Vec<ScheduledTask>> {
        self.write_again(move |c| ops::enqueue_checked(c, &items, now).map(|r| (r, true))).await
    }
    async fn scheduled_task_get(&self, id: WorkItemId) -> StoreResult<ScheduledTask> {
        self.read(move |c| ops::scheduled_task_get(c, id)).await
    }
    async fn queue_list(&self, f: QueueFilter) -> StoreResult<Vec<ScheduledTask>> {
        self.read(move |c| ops::queue_list(c, &f)).await
    }
    async fn tick(&self, t: Tick) -> StoreResult<TickReport> {
        self.write_again(move |c| ops::tick(c, &t)).await
    }
    async fn leases_reap_expired(&self, t: Tick) -> StoreResult<Vec<ReapedRun>> {
        self.write_again(move |c| {
            ops::reap(c, &t).map(|r| {
                let n = !r.is_empty();
                (r, n)
            })
        })
        .await
    }

    async fn runs_claim(&self, cl: Claim) -> StoreResult<Vec<ClaimedRun>> {
        self.write_again(move |c| ops::runs_claim(c, &cl).map(|r| (r, false))).await
    }
    async fn lease_renew(&self, p: LeaseRenew) -> StoreResult<Lease> {
        self.write_again(move |c| ops::lease_renew(c, &p).map(|r| (r, false))).await
    }
    async fn run_start(&self, p: RunStart) -> StoreResult<Run> {
        self.write_again(move |c| ops::run_start(c, &p).map(|r| (r, false))).await
    }
    async fn runs_complete_many(&self, p: CompleteMany) -> StoreResult<Vec<StoreResult<CompletionResult>>> {
        self.write_again(move |c| ops::runs_complete_many(c, &p)).await
    }
    async fn runs_complete_and_claim(&self, p: CompleteMany, cl: Claim) -> StoreResult<CompletedAndClaimed> {
        // One writer job (one commit): the completions, then the claim (which sees them).
        let (p2, cl2) = (p.clone(), cl.clone());
        let both = self
            .write_again(move |c| {
                let (completed, notify) = ops::runs_complete_many(c, &p2)?;
                let claimed = ops::runs_claim(c, &cl2)?;
                Ok(((completed, claimed), notify))
            })
            .await;
        settle_complete_and_claim(self, both, p, cl).await
    }
    async fn run_get(&self, id: RunId) -> StoreResult<Run> {
        self.read(move |c| ops::run_get(c, id)).await
    }
    async fn run_list(&self, f: RunFilter) -> StoreResult<Vec<Run>> {
        self.read(move |c| ops::run_list(c, &f)).await
    }
    async fn run_cancel(&self, id: RunId, x: Cancel) -> StoreResult<Run> {
        self.write_again(move |c| ops::run_cancel(c, id, &x).map(|r| (r, false))).await
    }
    async fn run_requeue(&self, id: RunId, r: Requeue) -> StoreResult<WorkItem> {
        self.write_again(move |c| ops::run_requeue(c, id, &r).map(|w| (w, true))).await
    }

    async fn runs_release(&self, p: RunRelease) -> StoreResult<Run> {
        self.write(move |c| ops::runs_release(c, &p).map(|r| (r, true))).await
    }
    async fn run_result_put(&self, p: RunResultPut) -> StoreResult<()> {
        self.write(move |c| ops::run_result_put(c, &p).map(|r| (r, false))).await
    }
    async fn run_result_get(&self, run_id: RunId) -> StoreResult<Option<RunResultRecord>> {
        self.read(move |c| ops::run_result_get(c, run_id)).await
    }

    async fn logs_append(&self, p: LogAppend) -> StoreResult<u64> {
        self.write_again(move |c| ops::logs_append(c, &p).map(|r| (r, false))).await
    }
    async fn logs_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<LogEntry>> {
        self.read(move |c| ops::logs_read_after(c, run_id, after, limit)).await
    }
    async fn step_events_append(&self, p: StepEventsAppend) -> StoreResult<Vec<StepEvent>> {
        self.write(move |c| ops::step_events_append(c, p).map(|r| (r, false))).await
    }
    async fn step_events_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<StepEvent>> {
        self.read(move |c| ops::step_events_read_after(c, run_id, after, limit)).await
    }

    async fn info_requests_create(&self, p: InfoAsk) -> StoreResult<Vec<InfoRequest>> {
        self.write(move |c| ops::info_requests_create(c, p).map(|r| (r, false))).await
    }
    async fn info_request_get(&self, id: InfoRequestId) -> StoreResult<InfoRequest> {
        self.read(move |c| ops::info_request_get(c, id)).await
    }
    async fn info_request_list(&self, f: InfoRequestFilter) -> StoreResult<Vec<InfoRequest>> {
        self.read(move |c| ops::info_request_list(c, &f)).await
    }
    async fn info_request_answer(&self, p: InfoAnswer) -> StoreResult<InfoAnswered> {
        self.write(move |c| {
            ops::info_request_answer(c, p).map(|r| {
                let n = r.resumed;
                (r, n)
            })
        })
        .await
    }
    async fn info_answers_for_run(
        &self,
        run_id: RunId,
        token: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<InfoRequest>> {
        self.read(move |c| ops::info_answers_for_run(c, run_id, token, now)).await
    }

    async fn stats(&self) -> StoreResult<QueueStats> {
        self.read(ops::stats).await
    }
}

#[cfg(test)]
mod writer_tests {
    //! The writer's transaction handling: which commands run in savepoints, and what a failure undoes.
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (x TEXT PRIMARY KEY)").unwrap();
        c
    }

    fn rows(c: &Connection) -> Vec<String> {
        let mut st = c.prepare("SELECT x FROM t ORDER BY x").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().collect::<rusqlite::Result<Vec<String>>>().unwrap()
    }

    fn insert(c: &Connection, x: &str) -> StoreResult<()> {
        c.execute("INSERT INTO t (x) VALUES (?1)", [x]).map(|_| ()).map_err(ops::map_err)
    }

    /// What a test command does.
    #[derive(Clone, Copy)]
    enum Act {
        /// Inserts its row and succeeds.
        Ok,
        /// Fails before writing anything.
        FailClean,
        /// Inserts its row, then fails.
        FailDirty,
        /// Inserts its row, then panics.
        Panic,
    }

    fn body(c: &Connection, name: &str, act: Act) -> StoreResult<(String, bool)> {
        match act {
            Act::FailClean => return Err(StoreError::conflict(format!("{name} refused"))),
            _ => insert(c, name)?,
        }
        match act {
            Act::FailDirty => Err(StoreError::conflict(format!("{name} failed after writing"))),
            Act::Panic => panic!("{name} panicked"),
            _ => Ok((name.to_string(), false)),
        }
    }

    struct Cmd {
        runs: Arc<AtomicUsize>,
        answer: Answer<String>,
    }

    fn again(name: &'static str, act: Act) -> (Job, Cmd) {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let (job, answer) = again_job(move |c| {
            r.fetch_add(1, Ordering::SeqCst);
            body(c, name, act)
        });
        (job, Cmd { runs, answer })
    }

    fn once(name: &'static str, act: Act) -> (Job, Cmd) {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let (job, answer) = once_job(move |c| {
            r.fetch_add(1, Ordering::SeqCst);
            body(c, name, act)
        });
        (job, Cmd { runs, answer })
    }

    /// Runs the commands as one batch; returns each one's answer (None: dropped unanswered) and runs.
    fn batch(c: &mut Connection, cmds: Vec<(Job, Cmd)>) -> Vec<(Option<StoreResult<String>>, usize)> {
        let (jobs, cmds): (Vec<Job>, Vec<Cmd>) = cmds.into_iter().unzip();
        run_batch(c, jobs, &Notifier::new());
        assert!(c.is_autocommit(), "the batch left a transaction open");
        cmds.into_iter()
            .map(|mut k| {
                let a = k.answer.try_recv().ok();
                (a, k.runs.load(Ordering::SeqCst))
            })
            .collect()
    }

    fn ok(a: &(Option<StoreResult<String>>, usize)) -> bool {
        matches!(&a.0, Some(Ok(_)))
    }
    fn err(a: &(Option<StoreResult<String>>, usize)) -> bool {
        matches!(&a.0, Some(Err(StoreError::Conflict { .. })))
    }

    #[test]
    fn commands_that_can_run_again_commit_together_without_replays() {
        let mut c = conn();
        let out = batch(&mut c, vec![again("a", Act::Ok), again("b", Act::FailClean), again("c", Act::Ok)]);
        assert!(ok(&out[0]) && err(&out[1]) && ok(&out[2]));
        assert_eq!(out.iter().map(|o| o.1).collect::<Vec<_>>(), vec![1, 1, 1], "a clean failure undoes nothing");
        assert_eq!(rows(&c), vec!["a", "c"]);
    }

    #[test]
    fn a_failure_after_writing_undoes_only_that_command() {
        let mut c = conn();
        let out = batch(
            &mut c,
            vec![again("a", Act::Ok), again("b", Act::Ok), again("x", Act::FailDirty), again("d", Act::Ok)],
        );
        assert!(ok(&out[0]) && ok(&out[1]) && err(&out[2]) && ok(&out[3]));
        // a and b ran again after the rollback; x ran again in a savepoint; d ran once.
        assert_eq!(out.iter().map(|o| o.1).collect::<Vec<_>>(), vec![2, 2, 2, 1]);
        assert_eq!(rows(&c), vec!["a", "b", "d"]);
    }

    #[test]
    fn a_lone_command_that_fails_after_writing_is_rolled_back() {
        let mut c = conn();
        let out = batch(&mut c, vec![again("x", Act::FailDirty), again("b", Act::Ok)]);
        assert!(err(&out[0]) && ok(&out[1]));
        assert_eq!((out[0].1, out[1].1), (1, 1));
        assert_eq!(rows(&c), vec!["b"]);
        let out = batch(&mut c, vec![once("y", Act::FailDirty), once("e", Act::Ok)]);
        assert!(err(&out[0]) && ok(&out[1]));
        assert_eq!(rows(&c), vec!["b", "e"]);
    }

    #[test]
    fn commands_after_a_run_once_command_use_savepoints() {
        let mut c = conn();
        let out = batch(
            &mut c,
            vec![again("a", Act::Ok), once("b", Act::Ok), again("x", Act::FailDirty), once("y", Act::FailDirty)]
                .into_iter()
                .chain([again("e", Act::Ok)])
                .collect(),
        );
        assert!(ok(&out[0]) && ok(&out[1]) && err(&out[2]) && err(&out[3]) && ok(&out[4]));
        assert_eq!(out.iter().map(|o| o.1).collect::<Vec<_>>(), vec![1, 1, 1, 1, 1]);
        assert_eq!(rows(&c), vec!["a", "b", "e"]);
    }

    #[test]
    fn a_panic_is_rolled_back_and_the_others_commit() {
        let mut c = conn();
        let out = batch(&mut c, vec![again("a", Act::Ok), again("p", Act::Panic), once("q", Act::Panic)]);
        assert!(ok(&out[0]));
        assert!(out[1].0.is_none() && out[2].0.is_none(), "a panicking command is dropped unanswered");
        assert_eq!(rows(&c), vec!["a"]);
        let out = batch(&mut c, vec![once("r", Act::Panic), again("f", Act::Ok)]);
        assert!(out[0].0.is_none() && ok(&out[1]));
        assert_eq!(rows(&c), vec!["a", "f"]);
    }

    #[test]
    fn commands_that_arrive_during_the_transaction_join_it() {
        let mut c = conn();
        let (a, ka) = again("a", Act::Ok);
        let mut later = vec![again("x", Act::FailDirty), once("b", Act::Ok), again("c", Act::Ok)].into_iter();
        let mut cmds = Vec::new();
        let mut more = |n: usize| {
            assert!(n >= 1);
            later.next().map(|(j, k)| {
                cmds.push(k);
                j
            })
        };
        run_batch_joining(&mut c, vec![a], &Notifier::new(), &mut more);
        assert!(c.is_autocommit());
        let mut answers = vec![ka];
        answers.extend(cmds);
        let out: Vec<_> =
            answers.into_iter().map(|mut k| (k.answer.try_recv().ok(), k.runs.load(Ordering::SeqCst))).collect();
        assert!(ok(&out[0]) && err(&out[1]) && ok(&out[2]) && ok(&out[3]));
        // x failed after writing: a ran again, x in a savepoint; b and c joined after that.
        assert_eq!(out.iter().map(|o| o.1).collect::<Vec<_>>(), vec![2, 2, 1, 1]);
        assert_eq!(rows(&c), vec!["a", "b", "c"]);
    }

    #[test]
    fn a_failed_commit_answers_every_command_with_a_retryable_error() {
        let mut c = conn();
        c.execute_batch("CREATE TABLE parent (id INTEGER PRIMARY KEY); CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED); PRAGMA foreign_keys = ON;").unwrap();
        let (job, mut answer) = again_job(|c: &Connection| {
            c.execute("INSERT INTO child (p) VALUES (42)", []).map_err(ops::map_err)?;
            Ok(((), false))
        });
        let out = batch(&mut c, vec![again("a", Act::Ok)]);
        assert!(ok(&out[0]));
        run_batch(&mut c, vec![job], &Notifier::new());
        assert!(matches!(answer.try_recv(), Ok(Err(StoreError::Unavailable { retryable: true, .. }))));
        assert!(c.is_autocommit());
        let n: i64 = c.query_row("SELECT count(*) FROM child", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
    }
}
