//! Where the facade records what happens (claims, completions, retries, lost leases, claim latency, run
//! durations), through the `metrics` crate: into a recorder given to [`crate::Orchestrator::set_recorder`]
//! (an HTTP layer's Prometheus exporter), else into the process's global recorder (none: nothing).

use metrics::{Key, Label, Metadata, Recorder};
use std::sync::{Arc, OnceLock};

/// The facade's metrics sink.
#[derive(Clone, Default)]
pub(crate) struct Meter {
    local: Arc<OnceLock<Arc<dyn Recorder + Send + Sync>>>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").field("local", &self.local.get().is_some()).finish()
    }
}

static METADATA: Metadata<'static> = Metadata::new("orchestrator", metrics::Level::INFO, Some(module_path!()));

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::from_static_parts(k, v)).collect::<Vec<_>>())
}

impl Meter {
    /// Records into `r` from now on; false when a recorder was set before (it stays).
    pub fn set(&self, r: Arc<dyn Recorder + Send + Sync>) -> bool {
        self.local.set(r).is_ok()
    }

    /// Adds `n` to a counter.
    pub fn count(&self, name: &'static str, labels: &[(&'static str, &'static str)], n: u64) {
        if n == 0 {
            return;
        }
        let k = key(name, labels);
        match self.local.get() {
            Some(r) => r.register_counter(&k, &METADATA).increment(n),
            None => metrics::with_recorder(|r| r.register_counter(&k, &METADATA).increment(n)),
        }
    }

    /// Records a value (seconds) in a histogram.
    pub fn observe(&self, name: &'static str, labels: &[(&'static str, &'static str)], v: f64) {
        let k = key(name, labels);
        match self.local.get() {
            Some(r) => r.register_histogram(&k, &METADATA).record(v),
            None => metrics::with_recorder(|r| r.register_histogram(&k, &METADATA).record(v)),
        }
    }
}
