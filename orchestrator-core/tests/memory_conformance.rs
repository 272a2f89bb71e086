//! The conformance suite on [`MemoryStore`].

use orchestrator_core::{MemoryStore, Store};
use std::sync::Arc;

orchestrator_core::store_conformance_tests!(|| async { Arc::new(MemoryStore::new()) as Arc<dyn Store> });
