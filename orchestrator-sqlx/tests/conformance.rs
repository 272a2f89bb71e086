//! The shared conformance suite on PostgreSQL: every test on a fresh schema (dropped afterwards).

mod common;

use orchestrator_core::Store;
use std::sync::Arc;

orchestrator_core::store_conformance_tests!(|| async { Arc::new(common::fresh_store("conf").await) as Arc<dyn Store> });
