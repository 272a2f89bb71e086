//! `SqliteStore::open` fails with a clear, typed error (never a panic) on bad paths and files, and
//! re-opening an existing database keeps its data.
//!
//! Tests run as root, so file modes do not stop writes; read-only files and directories are made with
//! the immutable attribute (`chattr +i`), which stops root too. Those tests check at runtime that the
//! attribute really blocks writes and skip (with a note on stderr) where it does not.

use chrono::{DateTime, TimeZone, Utc};
use orchestrator_core::ids::ProjectId;
use orchestrator_core::store::{NewProject, Page, VisionPut};
use orchestrator_core::Store;
use orchestrator_sqlite::{schema_version, OpenError, SqliteOptions, SqliteStore};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn open(path: &Path) -> Result<SqliteStore, OpenError> {
    SqliteStore::open(path, SqliteOptions::default())
}

/// The error of an open that must fail.
fn open_err(path: &Path) -> OpenError {
    match open(path) {
        Ok(_) => panic!("opening `{}` should have failed", path.display()),
        Err(e) => e,
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

/// Waits until the writer thread of a dropped store closed the database. Valid for stores that only
/// wrote: the writer is then the only connection, and closing it checkpoints and deletes the `-wal`
/// file.
fn wait_released(path: &Path) {
    let wal = sidecar(path, "-wal");
    let deadline = Instant::now() + Duration::from_secs(10);
    while wal.exists() {
        assert!(Instant::now() < deadline, "the writer thread did not release `{}` within 10 s", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn fixed_now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000, 0).single().expect("valid time")
}

fn user_version(path: &Path) -> i64 {
    let c = rusqlite::Connection::open(path).expect("plain connection");
    c.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version")
}

fn set_user_version(path: &Path, v: i64) {
    let c = rusqlite::Connection::open(path).expect("plain connection");
    c.busy_timeout(Duration::from_secs(10)).expect("busy_timeout");
    c.execute_batch(&format!("PRAGMA user_version = {v}")).expect("set user_version");
}

/// Creates a database with one project (writes only) and waits until its writer released it.
async fn create_db_with_project(path: &Path) -> ProjectId {
    let store = open(path).expect("create database");
    let id = ProjectId::new();
    store
        .project_create(NewProject {
            id,
            name: "kept".into(),
            description: "survives a reopen".into(),
            repository: None,
            now: fixed_now(),
        })
        .await
        .expect("create project");
    drop(store);
    wait_released(path);
    id
}

#[test]
fn missing_directory_is_named() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let missing = tmp.path().join("no-such-dir").join("nested");
    let path = missing.join("orchestrator.db");
    let err = open_err(&path);
    match &err {
        OpenError::MissingDirectory { path: p, dir } => {
            assert_eq!(p, &path);
            assert_eq!(dir, &missing);
        }
        other => panic!("expected MissingDirectory, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&shown(&missing)), "{msg}");
    assert!(msg.contains(&shown(&path)), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(!tmp.path().join("no-such-dir").exists(), "open must not create directories");
}

#[test]
fn not_a_database_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("notes.txt");
    let bytes: Vec<u8> =
        b"this is not a SQLite database, just some text\n".iter().copied().cycle().take(4096).collect();
    std::fs::write(&path, &bytes).expect("write file");
    let err = open_err(&path);
    match &err {
        OpenError::NotADatabase { path: p } => assert_eq!(p, &path),
        other => panic!("expected NotADatabase, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&shown(&path)), "{msg}");
    assert!(msg.contains("not a SQLite database"), "{msg}");
    assert_eq!(std::fs::read(&path).expect("read back"), bytes, "a refused open must not modify the file");
    assert!(!sidecar(&path, "-wal").exists(), "no WAL next to a non-database");
    // Asking again gives the same answer (nothing was half-initialised by the first attempt).
    assert!(matches!(open_err(&path), OpenError::NotADatabase { .. }));
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("orchestrator.db");
    create_db_with_project(&path).await;
    assert_eq!(user_version(&path), schema_version());

    set_user_version(&path, 999);
    let err = open_err(&path);
    match &err {
        OpenError::NewerSchema { path: p, found, supported } => {
            assert_eq!(p, &path);
            assert_eq!(*found, 999);
            assert_eq!(*supported, schema_version());
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&shown(&path)), "{msg}");
    assert!(msg.contains("999"), "{msg}");
    assert!(msg.contains("upgrade"), "{msg}");
    assert_eq!(user_version(&path), 999, "a refused open must not migrate");

    // The boundary: one version ahead is refused, the current version opens.
    set_user_version(&path, schema_version() + 1);
    assert!(matches!(
        open_err(&path),
        OpenError::NewerSchema { found, .. } if found == schema_version() + 1
    ));
    set_user_version(&path, schema_version());
    open(&path).expect("the current schema version opens");
}

#[tokio::test]
async fn reopen_keeps_data() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("orchestrator.db");
    let store = open(&path).expect("create database");
    let project = store
        .project_create(NewProject {
            id: ProjectId::new(),
            name: "kept".into(),
            description: "survives a reopen".into(),
            repository: None,
            now: fixed_now(),
        })
        .await
        .expect("create project");
    let vision = store
        .vision_put(VisionPut {
            project_id: project.id,
            text: "the vision".into(),
            author: Some("tester".into()),
            now: fixed_now(),
        })
        .await
        .expect("put vision");
    drop(store);
    wait_released(&path);

    for round in 0..2 {
        let store = open(&path).unwrap_or_else(|e| panic!("reopen {round}: {e}"));
        assert_eq!(store.project_get(project.id).await.expect("project"), project);
        assert_eq!(store.project_list(Page::default()).await.expect("list"), vec![project.clone()]);
        assert_eq!(store.vision_get(project.id, None).await.expect("vision"), vision);
        drop(store);
    }
    assert_eq!(user_version(&path), schema_version());
}

#[test]
fn parent_that_is_a_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"not a directory").expect("write file");
    let path = file.join("orchestrator.db");
    let err = open_err(&path);
    let msg = err.to_string();
    assert!(matches!(&err, OpenError::Sqlite { path: p, .. } if p == &path), "{err:?}");
    assert!(msg.contains(&shown(&path)), "{msg}");
    assert!(msg.contains("is not a directory"), "{msg}");
    assert_eq!(std::fs::read(&file).expect("read back"), b"not a directory");
}

/// Clears the immutable attribute on drop, so the temporary directory can be removed even when a test
/// fails. Declare it after the `TempDir` so it drops first.
struct Immutable(PathBuf);

impl Immutable {
    /// Sets the immutable attribute on `path`; `None` (with a note) where that is unsupported or does
    /// not actually stop writes.
    fn set(path: &Path) -> Option<Immutable> {
        let ok = Command::new("chattr").arg("+i").arg(path).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            eprintln!("note: `chattr +i {}` is unavailable here; read-only test skipped", path.display());
            return None;
        }
        let guard = Immutable(path.to_path_buf());
        let writable = if path.is_dir() {
            let probe = path.join("write-probe");
            let created = std::fs::File::create(&probe).is_ok();
            let _ = std::fs::remove_file(&probe);
            created
        } else {
            std::fs::OpenOptions::new().append(true).open(path).is_ok()
        };
        if writable {
            eprintln!(
                "note: the immutable attribute does not stop writes to `{}` here; read-only test skipped",
                path.display()
            );
            return None;
        }
        Some(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test]
async fn read_only_database_file() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("orchestrator.db");
    let project = create_db_with_project(&path).await;
    let before = std::fs::read(&path).expect("read db");
    {
        let Some(_immutable) = Immutable::set(&path) else {
            return;
        };
        // SQLite would silently fall back to a read-only connection here; the store must refuse it.
        let err = open_err(&path);
        match &err {
            OpenError::ReadOnly { path: p, .. } => assert_eq!(p, &path),
            other => panic!("expected ReadOnly, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&shown(&path)), "{msg}");
        assert!(msg.contains("read-only"), "{msg}");
    }
    assert_eq!(std::fs::read(&path).expect("read db"), before);
    let store = open(&path).expect("writable again");
    store.project_get(project).await.expect("data intact after the refused open");
}

#[tokio::test]
async fn read_only_directory() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("db-dir");
    std::fs::create_dir(&dir).expect("mkdir");
    let existing = dir.join("existing.db");
    let project = create_db_with_project(&existing).await;
    let fresh = dir.join("fresh.db");
    {
        let Some(_immutable) = Immutable::set(&dir) else {
            return;
        };
        // A new database cannot be created, and an existing one cannot get its -wal and -shm files.
        for path in [&fresh, &existing] {
            let err = open_err(path);
            match &err {
                OpenError::ReadOnly { path: p, message } => {
                    assert_eq!(p, path);
                    assert!(message.contains(&shown(&dir)), "{message}");
                }
                other => panic!("expected ReadOnly for `{}`, got {other:?}", path.display()),
            }
            let msg = err.to_string();
            assert!(msg.contains(&shown(path)), "{msg}");
            assert!(msg.contains("not writable"), "{msg}");
        }
        assert!(!fresh.exists());
    }
    let store = open(&existing).expect("writable again");
    store.project_get(project).await.expect("data intact after the refused open");
}
