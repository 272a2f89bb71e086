//! Throughput and latency benchmarks over any store, through the `Orchestrator` facade.

use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::domain::RunOutcome;
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::store::{EnqueueOptions, RunCompletion};
use orchestrator_core::{MemoryStore, Orchestrator, OrchestratorConfig, Store};
use orchestrator_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use orchestrator_sqlx::{PgOptions, PgStore};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Benchmark options.
#[derive(Debug, Clone)]
pub struct Opts {
    backend: String,
    items: usize,
    claimers: usize,
    batch: u32,
    enqueue_batch: usize,
    db: Option<PathBuf>,
    synchronous: Synchronous,
    cache_kib: Option<u32>,
    finished: usize,
    database_url: String,
    latency_items: usize,
    latency_rate: f64,
    latency_claimers: usize,
    combined: bool,
    single: bool,
    pg_combine_max_runs: Option<u32>,
    pg_combine_in_flight: Option<u32>,
}

/// The PostgreSQL server the `postgres` backend uses unless `--database-url` says otherwise.
fn default_database_url() -> String {
    std::env::var("ORCH_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn num<T: std::str::FromStr>(name: &str, v: Option<&String>) -> Result<T, String> {
    v.ok_or_else(|| format!("{name} needs a value"))?.parse().map_err(|_| format!("{name}: not a valid number"))
}

/// Parses `bench` arguments.
pub fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        backend: "sqlite".into(),
        items: 100_000,
        claimers: 8,
        batch: 32,
        enqueue_batch: 1000,
        db: None,
        synchronous: Synchronous::Normal,
        cache_kib: None,
        finished: 0,
        database_url: default_database_url(),
        latency_items: 200,
        latency_rate: 50.0,
        latency_claimers: 1,
        combined: false,
        single: true,
        pg_combine_max_runs: None,
        pg_combine_in_flight: None,
    };
    let mut claimers_set = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => o.backend = it.next().cloned().ok_or("--backend needs a value")?,
            "--items" => o.items = num("--items", it.next())?,
            "--claimers" => {
                o.claimers = num("--claimers", it.next())?;
                claimers_set = true;
            }
            "--database-url" => o.database_url = it.next().cloned().ok_or("--database-url needs a value")?,
            "--latency-items" => o.latency_items = num("--latency-items", it.next())?,
            "--latency-rate" => o.latency_rate = num("--latency-rate", it.next())?,
            "--latency-claimers" => o.latency_claimers = num("--latency-claimers", it.next())?,
            "--pg-combine-max-runs" => o.pg_combine_max_runs = Some(num("--pg-combine-max-runs", it.next())?),
            "--pg-combine-in-flight" => o.pg_combine_in_flight = Some(num("--pg-combine-in-flight", it.next())?),
            "--combined" => o.combined = true,
            "--no-single" => o.single = false,
            "--batch" => o.batch = num("--batch", it.next())?,
            "--enqueue-batch" => o.enqueue_batch = num("--enqueue-batch", it.next())?,
            "--db" => o.db = Some(PathBuf::from(it.next().ok_or("--db needs a value")?)),
            "--synchronous" => {
                o.synchronous = match it.next().map(|s| s.as_str()) {
                    Some("normal") => Synchronous::Normal,
                    Some("full") => Synchronous::Full,
                    _ => return Err("--synchronous is normal or full".into()),
                }
            }
            "--finished" => o.finished = num("--finished", it.next())?,
            "--cache-kib" => o.cache_kib = Some(num("--cache-kib", it.next())?),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    if !matches!(o.backend.as_str(), "sqlite" | "memory" | "postgres") {
        return Err(format!("unknown backend `{}` (sqlite, memory or postgres)", o.backend));
    }
    if o.backend == "postgres" && !claimers_set {
        o.claimers = 16;
    }
    if !o.latency_rate.is_finite() || o.latency_rate <= 0.0 {
        return Err("--latency-rate must be positive".into());
    }
    if o.items == 0 || o.claimers == 0 || o.batch == 0 || o.enqueue_batch == 0 {
        return Err("--items, --claimers, --batch and --enqueue-batch must be positive".into());
    }
    Ok(o)
}

struct Backend {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    path: Option<PathBuf>,
    /// The PostgreSQL store (its fresh schema is dropped after the run).
    pg: Option<Arc<PgStore>>,
}

async fn open(o: &Opts) -> Result<Backend, String> {
    match o.backend.as_str() {
        "memory" => Ok(Backend { store: Arc::new(MemoryStore::new()), _dir: None, path: None, pg: None }),
        "postgres" => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let schema = format!("orchestrator_bench_{}_{nanos}", std::process::id());
            let d = PgOptions::default();
            let opts = PgOptions {
                schema,
                max_connections: (o.claimers as u32 + 4).max(8),
                min_connections: (o.claimers as u32).min(32),
                combine_max_runs: o.pg_combine_max_runs.unwrap_or(d.combine_max_runs),
                combine_in_flight: o.pg_combine_in_flight.unwrap_or(d.combine_in_flight),
                ..d
            };
            let s = Arc::new(PgStore::connect_with(&o.database_url, opts).await.map_err(|e| e.to_string())?);
            Ok(Backend { store: s.clone(), _dir: None, path: None, pg: Some(s) })
        }
        _ => {
            let (dir, path) = match &o.db {
                Some(p) => (None, p.clone()),
                None => {
                    let d = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
                    let p = d.path().join("bench.db");
                    (Some(d), p)
                }
            };
            let mut opts = SqliteOptions { synchronous: o.synchronous, ..Default::default() };
            if let Some(k) = o.cache_kib {
                opts.cache_kib = k;
            }
            let s = SqliteStore::open(&path, opts).map_err(|e| e.to_string())?;
            Ok(Backend { store: Arc::new(s), _dir: dir, path: Some(path), pg: None })
        }
    }
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn item(project: orchestrator_core::ids::ProjectId, i: usize) -> CreateWorkItem {
    CreateWorkItem {
        project_id: Some(project),
        title: format!("bench item {i}"),
        priority: (i % 3) as i32,
        enqueue: Some(EnqueueOptions::default()),
        ..Default::default()
    }
}

async fn enqueue_batched(
    orch: &Orchestrator,
    project: orchestrator_core::ids::ProjectId,
    n: usize,
    batch: usize,
) -> Result<f64, String> {
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let k = batch.min(n - done);
        let v: Vec<CreateWorkItem> = (done..done + k).map(|i| item(project, i)).collect();
        orch.create_work_items(v).await.map_err(|e| e.to_string())?;
        done += k;
    }
    Ok(t.elapsed().as_secs_f64())
}

struct ClaimStats {
    seconds: f64,
    runs: usize,
    latencies: Vec<Duration>,
}

/// `n` runs claimed and completed by `claimers` tasks in batches of `batch`: a claim, then a completion
/// of what it returned (`combined`: each completion call also claims the next batch, in one transaction).
async fn claim_complete(
    orch: &Orchestrator,
    n: usize,
    claimers: usize,
    batch: u32,
    combined: bool,
) -> Result<ClaimStats, String> {
    let done = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..claimers {
        let orch = orch.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let req = ClaimRequest {
                agent_id: format!("bench-{c}"),
                capabilities: vec![],
                max: batch,
                lease_ttl_seconds: None,
            };
            let mut got = Vec::new();
            loop {
                if got.is_empty() {
                    if done.load(Ordering::Relaxed) >= n {
                        break;
                    }
                    let t0 = Instant::now();
                    got = orch.claim(req.clone()).await.map_err(|e| e.to_string())?;
                    lat.push(t0.elapsed());
                    if got.is_empty() {
                        tokio::task::yield_now().await;
                    }
                    continue;
                }
                let completions: Vec<RunCompletion> = got
                    .iter()
                    .map(|a| RunCompletion {
                        run_id: a.run_id(),
                        token: a.token(),
                        outcome: RunOutcome::Succeeded { exit_code: Some(0) },
                        usage: None,
                    })
                    .collect();
                let k = completions.len();
                if combined {
                    let t0 = Instant::now();
                    let out = orch.complete_and_claim(completions, req.clone()).await.map_err(|e| e.to_string())?;
                    lat.push(t0.elapsed());
                    for r in out.completed {
                        r.map_err(|e| e.to_string())?;
                    }
                    done.fetch_add(k, Ordering::Relaxed);
                    got = out.assigned.map_err(|e| e.to_string())?;
                } else {
                    for r in orch.complete_many(completions).await.map_err(|e| e.to_string())? {
                        r.map_err(|e| e.to_string())?;
                    }
                    done.fetch_add(k, Ordering::Relaxed);
                    got = Vec::new();
                }
            }
            Ok::<Vec<Duration>, String>(lat)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.map_err(|e| e.to_string())??);
    }
    latencies.sort();
    Ok(ClaimStats { seconds: t.elapsed().as_secs_f64(), runs: done.load(Ordering::Relaxed), latencies })
}

/// Enqueues `n` items one at a time at a steady `rate` while claimers wait on the store's wake-up signal;
/// returns latencies sorted: (from the start of each enqueue call to its claim, from the enqueue call's
/// return (the item acknowledged) to its claim, of the enqueue calls themselves).
async fn enqueue_to_claim(
    orch: &Orchestrator,
    project: orchestrator_core::ids::ProjectId,
    n: usize,
    rate: f64,
    claimers: usize,
) -> Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>), String> {
    let started: Arc<Vec<std::sync::Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| std::sync::Mutex::new(None)).collect());
    let claimed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..claimers {
        let (orch, claimed) = (orch.clone(), claimed.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let req = ClaimRequest {
                agent_id: format!("latency-{c}"),
                capabilities: vec![],
                max: 32,
                lease_ttl_seconds: None,
            };
            while claimed.load(Ordering::SeqCst) < n {
                let seen = orch.work_generation().await;
                let got = orch.claim(req.clone()).await.map_err(|e| e.to_string())?;
                let at = Instant::now();
                if got.is_empty() {
                    orch.wait_for_work(seen, Duration::from_millis(500)).await;
                    continue;
                }
                for a in &got {
                    let i: usize =
                        a.claimed.work_item.title.trim_start_matches("latency ").parse().unwrap_or(usize::MAX);
                    lat.push((i, at));
                }
                let completions: Vec<RunCompletion> = got
                    .iter()
                    .map(|a| RunCompletion {
                        run_id: a.run_id(),
                        token: a.token(),
                        outcome: RunOutcome::Succeeded { exit_code: Some(0) },
                        usage: None,
                    })
                    .collect();
                claimed.fetch_add(completions.len(), Ordering::SeqCst);
                for r in orch.complete_many(completions).await.map_err(|e| e.to_string())? {
                    r.map_err(|e| e.to_string())?;
                }
            }
            Ok::<Vec<(usize, Instant)>, String>(lat)
        }));
    }
    let acked: Vec<std::sync::Mutex<Option<Instant>>> = (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut enqueue_lat = Vec::with_capacity(n);
    for i in 0..n {
        ticker.tick().await;
        let t0 = Instant::now();
        if let Some(m) = started.get(i) {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(t0);
        }
        let it = CreateWorkItem {
            project_id: Some(project),
            title: format!("latency {i}"),
            enqueue: Some(EnqueueOptions::default()),
            ..Default::default()
        };
        orch.create_work_item(it).await.map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        if let Some(m) = acked.get(i) {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(t1);
        }
        enqueue_lat.push(t1 - t0);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut claims = Vec::with_capacity(n);
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, t).await.map_err(|_| "latency claimers did not finish".to_string())?;
        claims.extend(r.map_err(|e| e.to_string())??);
    }
    let at = |v: &[std::sync::Mutex<Option<Instant>>], i: usize| {
        v.get(i).and_then(|m| *m.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let mut from_start: Vec<Duration> =
        claims.iter().filter_map(|(i, c)| at(&started, *i).map(|t| c.saturating_duration_since(t))).collect();
    let mut from_ack: Vec<Duration> =
        claims.iter().filter_map(|(i, c)| at(&acked, *i).map(|t| c.saturating_duration_since(t))).collect();
    from_start.sort();
    from_ack.sort();
    enqueue_lat.sort();
    Ok((from_start, from_ack, enqueue_lat))
}

/// Runs every measurement and prints one JSON line each.
pub async fn run(o: Opts) -> Result<(), String> {
    let b = open(&o).await?;
    let res = measure(&o, &b).await;
    if let Some(pg) = &b.pg {
        if let Err(e) = pg.drop_schema().await {
            eprintln!("could not drop bench schema `{}`: {e}", pg.schema());
        }
    }
    res
}

async fn measure(o: &Opts, b: &Backend) -> Result<(), String> {
    let o = o.clone();
    let orch = Orchestrator::new(b.store.clone(), OrchestratorConfig::default());
    let project = orch.create_project("bench", "").await.map_err(|e| e.to_string())?;
    let base = match &b.pg {
        Some(pg) => json!({"backend": o.backend, "schema": pg.schema()}),
        None => {
            json!({"backend": o.backend, "synchronous": format!("{:?}", o.synchronous).to_lowercase(), "cache_kib": o.cache_kib.unwrap_or(SqliteOptions::default().cache_kib), "db": b.path.as_ref().map(|p| p.display().to_string())})
        }
    };
    let with = |mut v: serde_json::Value| {
        if let (Some(m), Some(b)) = (v.as_object_mut(), base.as_object()) {
            for (k, x) in b {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    };

    // 1. Enqueue one by one, from C concurrent producers (or batched, with --no-single).
    if !o.single {
        let s = enqueue_batched(&orch, project.id, o.items, o.enqueue_batch).await?;
        emit(with(
            json!({"bench": "enqueue_batched", "items": o.items, "batch": o.enqueue_batch, "seconds": s, "per_second": o.items as f64 / s}),
        ));
    } else {
        let t = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..o.claimers {
            let orch = orch.clone();
            let next = next.clone();
            let n = o.items;
            let pid = project.id;
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), String>(());
                    }
                    orch.create_work_item(item(pid, i)).await.map_err(|e| e.to_string())?;
                }
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        let s = t.elapsed().as_secs_f64();
        emit(with(
            json!({"bench": "enqueue_single", "items": o.items, "producers": o.claimers, "seconds": s, "per_second": o.items as f64 / s}),
        ));
    }

    // The PostgreSQL store's statements per call over a claim phase (see `PgStore::combining`).
    let combining = |before: Option<orchestrator_sqlx::CombiningStats>| {
        let (Some(pg), Some(a)) = (&b.pg, before) else { return json!({}) };
        let z = pg.combining();
        json!({
            "pg_claim_statements_per_call": (z.claim_statements - a.claim_statements) as f64 / (z.claim_calls - a.claim_calls).max(1) as f64,
            "pg_completion_transactions_per_call": (z.completion_transactions - a.completion_transactions) as f64 / (z.completion_calls - a.completion_calls).max(1) as f64,
        })
    };
    let stats = || b.pg.as_ref().map(|pg| pg.combining());

    // 2. Claim + complete what was just enqueued.
    let before = stats();
    let st = claim_complete(&orch, o.items, o.claimers, o.batch, o.combined).await?;
    let c = combining(before);
    report_claims(&|x| with(merge(x, &c)), "claim_complete", &o, &st);

    // 3. Batched enqueue.
    let s = enqueue_batched(&orch, project.id, o.items, o.enqueue_batch).await?;
    emit(with(
        json!({"bench": "enqueue_batched", "items": o.items, "batch": o.enqueue_batch, "seconds": s, "per_second": o.items as f64 / s}),
    ));

    // 4. Claim + complete again (now with 2 * items finished runs in the store).
    let before = stats();
    let st = claim_complete(&orch, o.items, o.claimers, o.batch, o.combined).await?;
    let c = combining(before);
    report_claims(&|x| with(merge(x, &c)), "claim_complete_after_batched_enqueue", &o, &st);

    // 5. Optionally: claims with M finished runs beside `items` ready ones.
    if o.finished > 0 {
        let t = Instant::now();
        let mut left = o.finished.saturating_sub(2 * o.items);
        while left > 0 {
            let k = left.min(100_000);
            enqueue_batched(&orch, project.id, k, o.enqueue_batch).await?;
            claim_complete(&orch, k, o.claimers, 1000, o.combined).await?;
            left -= k;
        }
        let finished =
            orch.store().stats().await.map_err(|e| e.to_string())?.runs.get("succeeded").copied().unwrap_or(0);
        eprintln!("preloaded {finished} finished runs in {:.1}s", t.elapsed().as_secs_f64());
        enqueue_batched(&orch, project.id, o.items, o.enqueue_batch).await?;
        let st = claim_complete(&orch, o.items, o.claimers, o.batch, o.combined).await?;
        let mut v = json!({"finished_runs": finished});
        if let Some(m) = v.as_object_mut() {
            m.insert("note".into(), json!("claims with finished runs in the database"));
        }
        report_claims(&|x| with(merge(x, &v)), "claim_complete_with_finished", &o, &st);
    }

    // 6. Enqueue-to-claim latency at a low steady rate, claimers waiting on the wake-up signal.
    if o.latency_items > 0 {
        let waiters = o.latency_claimers.max(1);
        let (lat, from_ack, enq) =
            enqueue_to_claim(&orch, project.id, o.latency_items, o.latency_rate, waiters).await?;
        emit(with(latency_report("enqueue_to_claim_latency", &o, &lat, &from_ack, &enq)));
        // PostgreSQL keeps the dead index entries of every claimed item until a vacuum (this server may
        // run without autovacuum), and claims step over them: measure once more on a fresh schema.
        if b.pg.is_some() {
            let fresh = open(&o).await?;
            let res = async {
                let orch = Orchestrator::new(fresh.store.clone(), OrchestratorConfig::default());
                let project = orch.create_project("bench", "").await.map_err(|e| e.to_string())?;
                enqueue_to_claim(&orch, project.id, o.latency_items, o.latency_rate, waiters).await
            }
            .await;
            if let Some(pg) = &fresh.pg {
                if let Err(e) = pg.drop_schema().await {
                    eprintln!("could not drop bench schema `{}`: {e}", pg.schema());
                }
            }
            let (lat, from_ack, enq) = res?;
            let mut v = latency_report("enqueue_to_claim_latency_fresh_schema", &o, &lat, &from_ack, &enq);
            if let (Some(m), Some(pg)) = (v.as_object_mut(), &fresh.pg) {
                m.insert("latency_schema".into(), json!(pg.schema()));
            }
            emit(with(v));
        }
    }
    Ok(())
}

fn latency_report(
    name: &str,
    o: &Opts,
    lat: &[Duration],
    from_ack: &[Duration],
    enq: &[Duration],
) -> serde_json::Value {
    json!({
        "bench": name,
        "items": o.latency_items,
        "rate_per_second": o.latency_rate,
        "waiting_claimers": o.latency_claimers.max(1),
        "claimed": lat.len(),
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        "from_acknowledged_p50_ms": percentile(from_ack, 0.50),
        "from_acknowledged_p99_ms": percentile(from_ack, 0.99),
        "enqueue_call_p50_ms": percentile(enq, 0.50),
        "enqueue_call_p99_ms": percentile(enq, 0.99),
        "note": "p50/p99: from the start of each enqueue call to the claim returning it; from_acknowledged: from the enqueue call's return",
    })
}

fn merge(mut a: serde_json::Value, b: &serde_json::Value) -> serde_json::Value {
    if let (Some(m), Some(b)) = (a.as_object_mut(), b.as_object()) {
        for (k, x) in b {
            m.insert(k.clone(), x.clone());
        }
    }
    a
}

fn report_claims(with: &dyn Fn(serde_json::Value) -> serde_json::Value, name: &str, o: &Opts, st: &ClaimStats) {
    emit(with(json!({
        "bench": name,
        "combined": o.combined,
        "runs": st.runs,
        "claimers": o.claimers,
        "batch": o.batch,
        "seconds": st.seconds,
        "per_second": st.runs as f64 / st.seconds,
        "claim_calls": st.latencies.len(),
        "note": "claim_p50_ms/claim_p99_ms: each claim call (with --combined: each completion-and-claim call)",
        "claim_p50_ms": percentile(&st.latencies, 0.50),
        "claim_p99_ms": percentile(&st.latencies, 0.99),
    })));
}
