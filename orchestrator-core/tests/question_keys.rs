//! Question (info request) keys become environment variable names in the agent's steps: `ask` refuses any
//! key that is not one (`^[A-Za-z_][A-Za-z0-9_]*$`, at most `MAX_ENV_NAME_LEN` characters), before anything
//! is stored; recipe input names follow the same rule.

use orchestrator_core::error::Error;
use orchestrator_core::recipe::{is_env_name, parse_recipe, InputKind, MAX_ENV_NAME_LEN};
use orchestrator_core::state::RunState;
use orchestrator_core::store::{InfoRequestFilter, NewInfoRequest};
use orchestrator_core::testing::Harness;
use orchestrator_core::{AgentApi, MemoryStore, Store};
use std::sync::Arc;

fn question(key: &str) -> NewInfoRequest {
    NewInfoRequest { key: key.into(), prompt: "value?".into(), kind: InputKind::Text, choices: vec![], deadline: None }
}

#[tokio::test]
async fn question_keys_must_be_environment_variable_names() {
    let h = Harness::new(Arc::new(MemoryStore::new()) as Arc<dyn Store>);
    let p = h.project().await;
    h.queued(p.id, "asks", 0, &[]).await;
    let a = h.claim_one("agent-1").await;

    let too_long = "K".repeat(MAX_ENV_NAME_LEN + 1);
    for bad in ["A B", "1ABC", "X-Y", "PATH=/tmp", "$(id)", "ÉTÉ", "a.b", "LD_PRELOAD\n", too_long.as_str()] {
        let e = h.orch.ask(a.run_id(), a.token(), vec![question("OK"), question(bad)]).await.unwrap_err();
        match &e {
            Error::Invalid { field, message } => {
                assert_eq!(field, "questions[1].key", "{bad:?}");
                assert!(message.contains("environment variable name"), "{bad:?}: {message}");
            }
            other => panic!("{bad:?}: expected Invalid, got {other:?}"),
        }
    }
    // Nothing was stored and the run is untouched.
    assert!(h.store.info_request_list(InfoRequestFilter::default()).await.unwrap().is_empty());
    assert_eq!(h.store.run_get(a.run_id()).await.unwrap().state, RunState::Claimed);

    let longest = "K".repeat(MAX_ENV_NAME_LEN);
    let asked = h
        .orch
        .ask(a.run_id(), a.token(), vec![question("_A1"), question("x"), question(&longest)])
        .await
        .expect("valid keys are accepted");
    assert_eq!(asked.len(), 3);
}

#[test]
fn recipe_input_names_follow_the_same_rule() {
    assert!(is_env_name("GITHUB_TOKEN") && is_env_name("_") && !is_env_name("") && !is_env_name("9"));
    let long = "N".repeat(MAX_ENV_NAME_LEN + 1);
    let e = parse_recipe(&format!("name: r\ninputs:\n  - name: {long}\nsteps: [echo]\n")).unwrap_err();
    assert_eq!(e.0[0].path, "inputs[0].name", "{e:?}");
    parse_recipe(&format!("name: r\ninputs:\n  - name: {}\nsteps: [echo]\n", &long[1..])).unwrap();
}
