//! Throughput and latency benchmarks over any store, through the `Orchestrator` facade.

use orchestrator_core::agent::{AgentApi, ClaimRequest};
use orchestrator_core::domain::RunOutcome;
use orchestrator_core::orchestrator::CreateWorkItem;
use orchestrator_core::store::{EnqueueOptions, RunCompletion};
use orchestrator_core::{MemoryStore, Orchestrator, OrchestratorConfig, Store};
use orchestrator_sqlite::{SqliteOptions, SqliteStore, Synchronous};
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
    finished: usize,
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
        finished: 0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => o.backend = it.next().cloned().ok_or("--backend needs a value")?,
            "--items" => o.items = num("--items", it.next())?,
            "--claimers" => o.claimers = num("--claimers", it.next())?,
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
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    if !matches!(o.backend.as_str(), "sqlite" | "memory") {
        return Err(format!("unknown backend `{}` (sqlite or memory)", o.backend));
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
}

fn open(o: &Opts) -> Result<Backend, String> {
    match o.backend.as_str() {
        "memory" => Ok(Backend { store: Arc::new(MemoryStore::new()), _dir: None, path: None }),
        _ => {
            let (dir, path) = match &o.db {
                Some(p) => (None, p.clone()),
                None => {
                    let d = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
                    let p = d.path().join("bench.db");
                    (Some(d), p)
                }
            };
            let opts = SqliteOptions { synchronous: o.synchronous, ..Default::default() };
            let s = SqliteStore::open(&path, opts).map_err(|e| e.to_string())?;
            Ok(Backend { store: Arc::new(s), _dir: dir, path: Some(path) })
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

async fn claim_complete(orch: &Orchestrator, n: usize, claimers: usize, batch: u32) -> Result<ClaimStats, String> {
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
            loop {
                if done.load(Ordering::Relaxed) >= n {
                    break;
                }
                let t0 = Instant::now();
                let got = orch.claim(req.clone()).await.map_err(|e| e.to_string())?;
                lat.push(t0.elapsed());
                if got.is_empty() {
                    if done.load(Ordering::Relaxed) >= n {
                        break;
                    }
                    tokio::task::yield_now().await;
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
                for r in orch.complete_many(completions).await.map_err(|e| e.to_string())? {
                    r.map_err(|e| e.to_string())?;
                }
                done.fetch_add(k, Ordering::Relaxed);
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

/// Runs every measurement and prints one JSON line each.
pub async fn run(o: Opts) -> Result<(), String> {
    let b = open(&o)?;
    let orch = Orchestrator::new(b.store.clone(), OrchestratorConfig::default());
    let project = orch.create_project("bench", "").await.map_err(|e| e.to_string())?;
    let base = json!({"backend": o.backend, "synchronous": format!("{:?}", o.synchronous).to_lowercase(), "db": b.path.as_ref().map(|p| p.display().to_string())});
    let with = |mut v: serde_json::Value| {
        if let (Some(m), Some(b)) = (v.as_object_mut(), base.as_object()) {
            for (k, x) in b {
                m.insert(k.clone(), x.clone());
            }
        }
        v
    };

    // 1. Enqueue one by one, from C concurrent producers.
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

    // 2. Claim + complete what was just enqueued.
    let st = claim_complete(&orch, o.items, o.claimers, o.batch).await?;
    report_claims(&with, "claim_complete", &o, &st);

    // 3. Batched enqueue.
    let s = enqueue_batched(&orch, project.id, o.items, o.enqueue_batch).await?;
    emit(with(
        json!({"bench": "enqueue_batched", "items": o.items, "batch": o.enqueue_batch, "seconds": s, "per_second": o.items as f64 / s}),
    ));

    // 4. Claim + complete again (now with 2 * items finished runs in the store).
    let st = claim_complete(&orch, o.items, o.claimers, o.batch).await?;
    report_claims(&with, "claim_complete_after_batched_enqueue", &o, &st);

    // 5. Optionally: claims with M finished runs beside `items` ready ones.
    if o.finished > 0 {
        let t = Instant::now();
        let mut left = o.finished.saturating_sub(2 * o.items);
        while left > 0 {
            let k = left.min(100_000);
            enqueue_batched(&orch, project.id, k, o.enqueue_batch).await?;
            claim_complete(&orch, k, o.claimers, 1000).await?;
            left -= k;
        }
        let finished =
            orch.store().stats().await.map_err(|e| e.to_string())?.runs.get("succeeded").copied().unwrap_or(0);
        eprintln!("preloaded {finished} finished runs in {:.1}s", t.elapsed().as_secs_f64());
        enqueue_batched(&orch, project.id, o.items, o.enqueue_batch).await?;
        let st = claim_complete(&orch, o.items, o.claimers, o.batch).await?;
        let mut v = json!({"finished_runs": finished});
        if let Some(m) = v.as_object_mut() {
            m.insert("note".into(), json!("claims with finished runs in the database"));
        }
        report_claims(&|x| with(merge(x, &v)), "claim_complete_with_finished", &o, &st);
    }
    Ok(())
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
        "runs": st.runs,
        "claimers": o.claimers,
        "batch": o.batch,
        "seconds": st.seconds,
        "per_second": st.runs as f64 / st.seconds,
        "claim_calls": st.latencies.len(),
        "claim_p50_ms": percentile(&st.latencies, 0.50),
        "claim_p99_ms": percentile(&st.latencies, 0.99),
    })));
}
