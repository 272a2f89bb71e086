//! The shared conformance suite on SQLite: a fresh database file in a temp directory per test.

use orchestrator_core::Store;
use orchestrator_sqlite::{SqliteOptions, SqliteStore};
use std::sync::Arc;

async fn file_store() -> Arc<dyn Store> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("orchestrator.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open").with_guard(dir);
    Arc::new(store)
}

orchestrator_core::store_conformance_tests!(|| file_store());

mod in_memory {
    use super::*;
    orchestrator_core::store_conformance_tests!(|| async {
        Arc::new(SqliteStore::open_in_memory().expect("open")) as Arc<dyn Store>
    });
}
