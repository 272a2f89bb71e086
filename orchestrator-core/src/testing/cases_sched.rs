//! Conformance cases (sched).

use super::Harness;
use crate::store::*;
use std::sync::Arc;

/// Placeholder so the module is never empty; replace with real cases.
pub async fn sched_smoke(store: Arc<dyn Store>) {
    let h = Harness::new(store);
    let _ = h.project().await;
}

/// The list of cases in this module, for [`crate::store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __sched_cases {
    ($factory:expr) => {
        $crate::__conformance_cases!(@emit $factory, cases_sched;
            sched_smoke,
        );
    };
}
