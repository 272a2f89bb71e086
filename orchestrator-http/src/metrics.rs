//! [`Metrics`]: a Prometheus exporter (`metrics-exporter-prometheus`) for what the orchestrator records
//! through the `metrics` crate. The [`orchestrator_core::Orchestrator`] facade records claims,
//! completions by outcome, failures, retries, lost leases, releases, scheduler ticks, claim latency and run
//! durations where they happen (so embedded agents' work counts too); the router adds HTTP request
//! durations by route pattern and status; `/metrics` adds queue depths by state from the store.

use metrics::{Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use orchestrator_core::store::QueueStats;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Upper bounds (seconds) of the histogram buckets (request latency, claim latency, run duration).
const BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0, 1800.0];

static METADATA: Metadata<'static> = Metadata::new("orchestrator_http", metrics::Level::INFO, Some(module_path!()));

/// A recorder shared by the facade, the router and (for [`Metrics::global`]) the whole process.
#[derive(Clone)]
struct Shared(Arc<PrometheusRecorder>);

impl Recorder for Shared {
    fn describe_counter(&self, k: metrics::KeyName, u: Option<metrics::Unit>, d: metrics::SharedString) {
        self.0.describe_counter(k, u, d)
    }
    fn describe_gauge(&self, k: metrics::KeyName, u: Option<metrics::Unit>, d: metrics::SharedString) {
        self.0.describe_gauge(k, u, d)
    }
    fn describe_histogram(&self, k: metrics::KeyName, u: Option<metrics::Unit>, d: metrics::SharedString) {
        self.0.describe_histogram(k, u, d)
    }
    fn register_counter(&self, key: &Key, m: &Metadata<'_>) -> metrics::Counter {
        self.0.register_counter(key, m)
    }
    fn register_gauge(&self, key: &Key, m: &Metadata<'_>) -> metrics::Gauge {
        self.0.register_gauge(key, m)
    }
    fn register_histogram(&self, key: &Key, m: &Metadata<'_>) -> metrics::Histogram {
        self.0.register_histogram(key, m)
    }
}

/// The exporter: one Prometheus registry and its renderer. Share one between [`crate::router_with_metrics`]
/// and [`crate::spawn_background_with_metrics`]; [`crate::router`] and [`crate::spawn_background`] use
/// [`Metrics::global`].
pub struct Metrics {
    recorder: Shared,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn describe(r: &Shared) {
    use metrics::Unit;
    let c = |n: &'static str, d: &'static str| r.describe_counter(n.into(), None, d.into());
    c("orchestrator_runs_claimed_total", "Runs claimed by agents.");
    c("orchestrator_claim_requests_total", "Claim calls made to the store.");
    c("orchestrator_run_completions_total", "Run completions by outcome.");
    c("orchestrator_run_failures_total", "Runs that failed, were lost or expired.");
    c("orchestrator_retries_scheduled_total", "Work items scheduled for another attempt.");
    c("orchestrator_lease_expiries_total", "Runs reaped because their lease expired.");
    c("orchestrator_info_request_expiries_total", "Runs failed because an info request's deadline passed.");
    c("orchestrator_runs_released_total", "Runs handed back by agents that stopped gracefully.");
    c("orchestrator_scheduler_promoted_total", "Retrying work items promoted to queued.");
    c("orchestrator_scheduler_ticks_total", "Scheduler ticks run.");
    c("orchestrator_scheduler_tick_errors_total", "Scheduler ticks that failed.");
    c("orchestrator_http_requests_total", "HTTP requests by route pattern and status.");
    c("orchestrator_log_follower_wakeups_total", "Log followers woken by their run (not by the polling fallback).");
    c(
        "orchestrator_http_streams_refused_total",
        "Log streams and long polls refused because the caller held ORCH_MAX_STREAMS_PER_CALLER already.",
    );
    let h = |n: &'static str, d: &'static str| r.describe_histogram(n.into(), Some(Unit::Seconds), d.into());
    h("orchestrator_claim_duration_seconds", "Time a claim call took in the store.");
    h("orchestrator_run_duration_seconds", "Run duration from start (or claim) to completion, by outcome.");
    h(
        "orchestrator_http_request_duration_seconds",
        "HTTP request latency (until the response head) by route pattern and status.",
    );
    let g = |n: &'static str, d: &'static str| r.describe_gauge(n.into(), None, d.into());
    g("orchestrator_work_items", "Work items by state (queue depth).");
    g("orchestrator_runs", "Runs by state.");
    g("orchestrator_pending_info_requests", "Info requests waiting for an answer.");
    g("orchestrator_pending_approvals", "Approval requests waiting for a decision.");
    g("orchestrator_http_streams_active", "Log streams (SSE) and long polls being served now.");
}

impl Metrics {
    /// A registry of its own (not the process's global `metrics` recorder).
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            // Refused only for an empty list: the exporter's summaries then.
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        let recorder = Shared(Arc::new(recorder));
        describe(&recorder);
        // Shown from the start (0), not only once a stream was served.
        recorder.register_gauge(&Key::from_static_name("orchestrator_http_streams_active"), &METADATA).set(0.0);
        Arc::new(Metrics { recorder, handle })
    }

    /// The process-wide registry used by [`crate::router`] and [`crate::spawn_background`]; installed as
    /// the global `metrics` recorder when the host has none, so the host's own `metrics::counter!` calls
    /// are exported too.
    pub fn global() -> Arc<Self> {
        static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let m = Metrics::new();
                if metrics::set_global_recorder(m.recorder.clone()).is_err() {
                    tracing::info!(
                        "a global metrics recorder is installed already: /metrics shows the orchestrator's own"
                    );
                }
                m
            })
            .clone()
    }

    /// The recorder to give to [`orchestrator_core::Orchestrator::set_metrics_recorder`].
    pub fn recorder(&self) -> Arc<dyn Recorder + Send + Sync> {
        Arc::new(self.recorder.clone())
    }

    fn counter(&self, name: &'static str) -> metrics::Counter {
        self.recorder.register_counter(&Key::from_static_name(name), &METADATA)
    }

    /// Records a log follower woken by its run (not by its polling fallback).
    pub fn record_log_wakeup(&self) {
        self.counter("orchestrator_log_follower_wakeups_total").increment(1);
    }

    /// Records a log stream or long poll refused by the per-caller cap.
    pub fn record_stream_refused(&self) {
        self.counter("orchestrator_http_streams_refused_total").increment(1);
    }

    /// Records a log stream or long poll starting (`true`) or ending (`false`).
    pub(crate) fn record_stream_held(&self, held: bool) {
        let g = self.recorder.register_gauge(&Key::from_static_name("orchestrator_http_streams_active"), &METADATA);
        if held {
            g.increment(1.0);
        } else {
            g.decrement(1.0);
        }
    }

    /// Records one HTTP request (`route` is the route pattern, not the concrete path).
    pub fn record_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = vec![
            Label::new("method", method.to_string()),
            Label::new("route", route.to_string()),
            Label::new("status", status.to_string()),
        ];
        let r = &self.recorder;
        r.register_counter(&Key::from_parts("orchestrator_http_requests_total", labels.clone()), &METADATA)
            .increment(1);
        r.register_histogram(&Key::from_parts("orchestrator_http_request_duration_seconds", labels), &METADATA)
            .record(elapsed.as_secs_f64());
    }

    /// Renders the Prometheus text exposition, with queue depths from `stats` when given.
    pub fn render(&self, stats: Option<&QueueStats>) -> String {
        if let Some(s) = stats {
            let gauge = |name: &'static str, labels: Vec<Label>, v: u64| {
                self.recorder.register_gauge(&Key::from_parts(name, labels), &METADATA).set(v as f64);
            };
            for (state, n) in &s.work_items {
                gauge("orchestrator_work_items", vec![Label::new("state", state.clone())], *n);
            }
            for (state, n) in &s.runs {
                gauge("orchestrator_runs", vec![Label::new("state", state.clone())], *n);
            }
            gauge("orchestrator_pending_info_requests", Vec::new(), s.pending_info_requests);
            gauge("orchestrator_pending_approvals", Vec::new(), s.pending_approvals);
        }
        self.handle.render()
    }
}
