//! [`Metrics`]: counters shared by the router and the background scheduler, rendered as Prometheus text.

use orchestrator_core::domain::RunOutcome;
use orchestrator_core::state::WorkItemState;
use orchestrator_core::store::{CompletionResult, QueueStats, TickReport};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds (seconds) of the request latency histogram buckets.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters of what the orchestrator did through this process, plus HTTP request counts and latencies.
/// Share one between [`crate::router_with_metrics`] and [`crate::spawn_background_with_metrics`];
/// [`crate::router`] and [`crate::spawn_background`] share [`Metrics::global`].
#[derive(Debug, Default)]
pub struct Metrics {
    claims: AtomicU64,
    claim_requests: AtomicU64,
    completions: Mutex<BTreeMap<&'static str, u64>>,
    failures: AtomicU64,
    retries: AtomicU64,
    lease_expiries: AtomicU64,
    info_deadline_expiries: AtomicU64,
    promoted: AtomicU64,
    ticks: AtomicU64,
    tick_errors: AtomicU64,
    log_wakeups: AtomicU64,
    streams_refused: AtomicU64,
    streams_active: AtomicU64,
    http: Mutex<BTreeMap<(String, String, u16), Histogram>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Fresh counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The process-wide counters used by [`crate::router`] and [`crate::spawn_background`].
    pub fn global() -> Arc<Self> {
        static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
        GLOBAL.get_or_init(Metrics::new).clone()
    }

    /// Records a claim call that assigned `n` runs.
    pub fn record_claims(&self, n: usize) {
        self.claim_requests.fetch_add(1, Ordering::Relaxed);
        self.claims.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records a completion.
    pub fn record_completion(&self, outcome: &RunOutcome, result: &CompletionResult) {
        let label = match outcome {
            RunOutcome::Succeeded { .. } => "succeeded",
            RunOutcome::Failed { .. } => "failed",
        };
        *lock(&self.completions).entry(label).or_default() += 1;
        if label == "failed" {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        if result.work_item_state == WorkItemState::Retrying {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records what a scheduler tick did.
    pub fn record_tick(&self, report: &TickReport) {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        self.promoted.fetch_add(report.promoted.len() as u64, Ordering::Relaxed);
        self.lease_expiries.fetch_add(report.reaped.len() as u64, Ordering::Relaxed);
        self.info_deadline_expiries.fetch_add(report.expired.len() as u64, Ordering::Relaxed);
        let lost = report.reaped.len() + report.expired.len();
        self.failures.fetch_add(lost as u64, Ordering::Relaxed);
        let retrying = report
            .reaped
            .iter()
            .chain(report.expired.iter())
            .filter(|r| r.work_item_state == WorkItemState::Retrying)
            .count();
        self.retries.fetch_add(retrying as u64, Ordering::Relaxed);
    }

    /// Records a failed scheduler tick.
    pub fn record_tick_error(&self) {
        self.tick_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a log follower woken by its run (not by its polling fallback).
    pub fn record_log_wakeup(&self) {
        self.log_wakeups.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a log stream or long poll refused by the per-caller cap.
    pub fn record_stream_refused(&self) {
        self.streams_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a log stream or long poll starting (`true`) or ending (`false`).
    pub(crate) fn record_stream_held(&self, held: bool) {
        if held {
            self.streams_active.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self.streams_active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Records one HTTP request (`route` is the route pattern, not the concrete path).
    pub fn record_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut http = lock(&self.http);
        let h = http.entry((route.to_string(), method.to_string(), status)).or_default();
        h.count += 1;
        h.sum += secs;
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.buckets[i] += 1;
            }
        }
    }

    /// Runs claimed so far.
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::Relaxed)
    }

    /// Renders the Prometheus text exposition (format 0.0.4), with queue depths from `stats` when given.
    pub fn render(&self, stats: Option<&QueueStats>) -> String {
        let mut o = String::with_capacity(4096);
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };
        if let Some(s) = stats {
            family(&mut o, "orchestrator_work_items", "gauge", "Work items by state (queue depth).");
            for (state, n) in &s.work_items {
                let _ = writeln!(o, "orchestrator_work_items{{state=\"{}\"}} {n}", escape(state));
            }
            family(&mut o, "orchestrator_runs", "gauge", "Runs by state.");
            for (state, n) in &s.runs {
                let _ = writeln!(o, "orchestrator_runs{{state=\"{}\"}} {n}", escape(state));
            }
            family(&mut o, "orchestrator_pending_info_requests", "gauge", "Info requests waiting for an answer.");
            let _ = writeln!(o, "orchestrator_pending_info_requests {}", s.pending_info_requests);
            family(&mut o, "orchestrator_pending_approvals", "gauge", "Approval requests waiting for a decision.");
            let _ = writeln!(o, "orchestrator_pending_approvals {}", s.pending_approvals);
        }
        let counters: [(&str, &str, &AtomicU64); 11] = [
            ("orchestrator_runs_claimed_total", "Runs claimed by agents.", &self.claims),
            ("orchestrator_claim_requests_total", "Claim calls answered.", &self.claim_requests),
            ("orchestrator_run_failures_total", "Runs that failed, were lost or expired.", &self.failures),
            ("orchestrator_retries_scheduled_total", "Work items scheduled for another attempt.", &self.retries),
            ("orchestrator_lease_expiries_total", "Runs reaped because their lease expired.", &self.lease_expiries),
            (
                "orchestrator_info_request_expiries_total",
                "Runs failed because an info request's deadline passed.",
                &self.info_deadline_expiries,
            ),
            ("orchestrator_scheduler_promoted_total", "Retrying work items promoted to queued.", &self.promoted),
            ("orchestrator_scheduler_ticks_total", "Scheduler ticks run.", &self.ticks),
            ("orchestrator_scheduler_tick_errors_total", "Scheduler ticks that failed.", &self.tick_errors),
            (
                "orchestrator_log_follower_wakeups_total",
                "Log followers (SSE) woken by an append to or the completion of the run they follow.",
                &self.log_wakeups,
            ),
            (
                "orchestrator_http_streams_refused_total",
                "Log streams and long polls refused because the caller held ORCH_MAX_STREAMS_PER_CALLER already.",
                &self.streams_refused,
            ),
        ];
        for (name, help, v) in counters {
            family(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        family(
            &mut o,
            "orchestrator_http_streams_active",
            "gauge",
            "Log streams (SSE) and long polls being served now.",
        );
        let _ = writeln!(o, "orchestrator_http_streams_active {}", self.streams_active.load(Ordering::Relaxed));
        family(&mut o, "orchestrator_run_completions_total", "counter", "Run completions by outcome.");
        {
            let c = lock(&self.completions);
            for outcome in ["succeeded", "failed"] {
                let _ = writeln!(
                    o,
                    "orchestrator_run_completions_total{{outcome=\"{outcome}\"}} {}",
                    c.get(outcome).copied().unwrap_or(0)
                );
            }
        }
        let http = lock(&self.http).clone();
        family(&mut o, "orchestrator_http_requests_total", "counter", "HTTP requests by route pattern and status.");
        for ((route, method, status), h) in &http {
            let _ = writeln!(
                o,
                "orchestrator_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {}",
                escape(method),
                escape(route),
                h.count
            );
        }
        family(
            &mut o,
            "orchestrator_http_request_duration_seconds",
            "histogram",
            "HTTP request latency (until the response head) by route pattern and status.",
        );
        for ((route, method, status), h) in &http {
            let labels = format!("method=\"{}\",route=\"{}\",status=\"{status}\"", escape(method), escape(route));
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "orchestrator_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ =
                writeln!(o, "orchestrator_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(o, "orchestrator_http_request_duration_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(o, "orchestrator_http_request_duration_seconds_count{{{labels}}} {}", h.count);
        }
        o
    }
}
