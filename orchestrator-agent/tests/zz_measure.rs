mod common;
use common::*;
use orchestrator_core::state::WorkItemState;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure() {
    let h = Harness::new().await;
    let recipe = h.recipe("name: t\nsteps:\n  - \"true\"\n").await;
    let agent = h.start(h.config("m").with_concurrency(4).with_poll_interval(Duration::from_secs(60)));
    // wake-up latency: idle agent, one item at a time
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let id = h.item("w", "", Some(recipe)).await;
        wait_for("claimed", Duration::from_secs(30), || async { (!h.runs(id).await.is_empty()).then_some(()) }).await;
        lat.push(t.elapsed());
        h.wait_state(id, &[WorkItemState::Succeeded]).await;
    }
    lat.sort();
    println!("MEASURE wake-to-claim (20 items, poll 60s, includes 20ms test polling): median {:?} max {:?}", lat[10], lat[19]);
    let n = 200;
    let mut ids = Vec::new();
    let t = Instant::now();
    for _ in 0..n {
        ids.push(h.item("x", "", Some(recipe)).await);
    }
    for id in &ids {
        h.wait_state(*id, &[WorkItemState::Succeeded]).await;
    }
    let e = t.elapsed();
    println!("MEASURE {n} one-step shell runs, concurrency 4, sqlite: {e:?} = {:.1} runs/s", n as f64 / e.as_secs_f64());
    agent.shutdown().await;
}
