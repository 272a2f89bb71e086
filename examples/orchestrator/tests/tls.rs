//! HTTPS straight from `serve --tls-cert/--tls-key` (rustls), with a test CA: the CLI and a remote agent
//! trust it through `ORCH_CA_FILE` and do the seeded work; without the CA they refuse the server.

mod common;

use common::{eventually, str_of, Proc, Server};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it; returns (ca, cert, key) paths.
pub fn test_pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths =
        (dir.join(format!("{name}-ca.pem")), dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_a_remote_agent_work_over_https_with_a_private_ca() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(pki.path(), "good");
    let (other_ca, _, _) = test_pki(pki.path(), "other");
    let tokens = "ops:operator:ops-secret,remote-1:agent:agent-secret";
    let mut server = Server::start(
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
        &[("ORCH_API_TOKENS", tokens)],
    )
    .await;
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);
    let ca_env = ("ORCH_CA_FILE", ca.to_str().unwrap());

    // Without the CA (or with another one) the CLI refuses the server's certificate, and says so.
    for envs in [
        vec![("ORCH_TOKEN", "ops-secret")],
        vec![("ORCH_TOKEN", "ops-secret"), ("ORCH_CA_FILE", other_ca.to_str().unwrap())],
    ] {
        let out = server.cli_with(&["project", "list"], &envs);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("certificate"), "{err}");
    }
    // Plain HTTP to the TLS port gets no answer.
    let plain = server.url.replacen("https://", "http://", 1);
    let answered = reqwest::get(format!("{plain}/healthz")).await.map(|r| r.status().is_success());
    assert!(!answered.unwrap_or(false), "plain HTTP was served on the TLS port");

    // With it, the seed goes through and a remote agent does the work over HTTPS.
    let out = server.cli_with(&["seed", "--json"], &[("ORCH_TOKEN", "ops-secret"), ca_env]);
    assert!(out.status.success(), "seed: {}", String::from_utf8_lossy(&out.stderr));
    let seeded: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> =
        seeded["work_items"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap().to_string()).collect();
    let mut agent = Proc::spawn(
        server.dir.path(),
        &["agent", "--server", &server.url],
        &[
            ("ORCH_TOKEN", "agent-secret"),
            ("AGENT_ID", "remote-1"),
            ("AGENT_WORKSPACE_ROOT", server.dir.path().join("remote-ws").to_str().unwrap()),
            ("AGENT_POLL_INTERVAL_MS", "500"),
            ca_env,
            ("RUST_LOG", "info"),
        ],
    );
    for id in &ids {
        eventually(Duration::from_secs(90), &format!("work item {id} to succeed"), || {
            let out = server.cli_with(&["work-item", "show", id, "--json"], &[("ORCH_TOKEN", "ops-secret"), ca_env]);
            let exited = agent.try_wait();
            async move {
                assert!(exited.is_none(), "the agent exited early: {exited:?}");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                let w: Value = serde_json::from_slice(&out.stdout).unwrap();
                let w = w.get("work_item").unwrap_or(&w).clone();
                match str_of(&w, "state") {
                    "succeeded" => Some(()),
                    "failed" | "blocked" | "cancelled" => panic!("work item ended badly: {w}"),
                    _ => None,
                }
            }
        })
        .await;
    }
    assert!(agent.terminate(Duration::from_secs(30)).success());
    assert!(server.terminate(Duration::from_secs(30)).success(), "{}", server.logs());
}
