//! What a step can reach: an allow-list environment (never the agent's tokens, keys or `ORCH_*`), and a
//! non-dumpable agent. Its own test binary: it sets the process environment.

mod common;

use common::*;
use orchestrator_core::state::WorkItemState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_sees_the_allow_list_and_its_run_not_the_agents_secrets() {
    for (k, v) in [
        ("OPENAI_API_KEY", "sk-agent-secret"),
        ("ORCH_SECRET_KEY", "server-key-secret"),
        ("ORCH_API_TOKENS", "admin:token-secret"),
        ("ORCH_TOKEN", "agent-token-secret"),
        ("RUST_LOG", "debug"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ("PASSED_ON", "chosen-by-the-operator"),
        ("LC_TIME", "C"),
    ] {
        std::env::set_var(k, v);
    }
    let h = Harness::new().await;
    let out = h.path("env.txt");
    let recipe = h.recipe(&format!("name: env\nsteps:\n  - env > '{}'\n", out.display())).await;
    let item = h.item("print the environment", "", Some(recipe)).await;
    let agent = h.start(h.config("a1").with_env_passthrough(["PASSED_ON"]));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    // The agent made itself non-dumpable: a same-user step cannot read /proc/<agent>/environ.
    assert!(!nix::sys::prctl::get_dumpable().unwrap(), "the agent process is still dumpable");
    agent.shutdown().await;
    let env = std::fs::read_to_string(&out).unwrap();
    let names: Vec<&str> = env.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    for secret in ["sk-agent-secret", "server-key-secret", "token-secret", "aws-secret"] {
        assert!(!env.contains(secret), "a step saw {secret}: {env}");
    }
    for gone in
        ["OPENAI_API_KEY", "ORCH_SECRET_KEY", "ORCH_API_TOKENS", "ORCH_TOKEN", "RUST_LOG", "AWS_SECRET_ACCESS_KEY"]
    {
        assert!(!names.contains(&gone), "{gone} reached the step: {names:?}");
    }
    for kept in ["PATH", "HOME", "LC_TIME", "PASSED_ON", "ORCH_RUN_ID", "ORCH_WORK_ITEM_ID", "ORCH_WORKSPACE"] {
        assert!(names.contains(&kept), "{kept} missing: {names:?}");
    }
    assert!(env.contains("PASSED_ON=chosen-by-the-operator"));
}

/// git runs with the same allow-list: a step that plants a clean filter (run by the agent's own
/// `git add`) sees none of the agent's secrets either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_git_does_not_hand_its_secrets_to_what_a_step_plants() {
    std::env::set_var("OPENAI_API_KEY", "sk-agent-secret");
    std::env::set_var("ORCH_SECRET_KEY", "server-key-secret");
    let h = Harness::new().await;
    let bare = h.bare_repo("remote");
    h.use_repository(bare.to_str().unwrap(), None).await;
    let leak = h.path("leak.txt");
    let recipe = h
        .recipe(&format!(
            "name: plant\nsteps:\n  - git config filter.spy.clean \"sh -c 'env >> {leak}; cat'\" && echo '* filter=spy' > .gitattributes && echo x > x.txt\n",
            leak = leak.display()
        ))
        .await;
    let item = h.item("plant a filter", "", Some(recipe)).await;
    let agent = h.start(h.config("a1"));
    let w = h.wait_state(item, &[WorkItemState::Succeeded, WorkItemState::Failed]).await;
    agent.shutdown().await;
    assert_eq!(w.state, WorkItemState::Succeeded, "{:?}", w.last_error);
    let seen = std::fs::read_to_string(&leak).expect("the agent's git add ran the planted filter");
    for secret in ["sk-agent-secret", "server-key-secret"] {
        assert!(!seen.contains(secret), "git handed {secret} to a planted filter: {seen}");
    }
    assert!(seen.contains("PATH="), "{seen}");
}
