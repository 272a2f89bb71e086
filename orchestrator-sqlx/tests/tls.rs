//! PostgreSQL over TLS (rustls): a throwaway cluster started with `ssl=on` and a test CA, accepting only
//! TLS connections. `sslmode=verify-full` with the CA as `sslrootcert` works; another CA is refused with
//! a clear error; a connection without TLS is refused by the server.

mod common;

use orchestrator_core::ids::ProjectId;
use orchestrator_core::store::NewProject;
use orchestrator_core::Store;
use orchestrator_sqlx::PgStore;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = "/usr/lib/postgresql/15/bin";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a PostgreSQL tool as the `postgres` user (the server refuses to run as root).
fn as_postgres(tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{BIN}/{tool}")]);
    c
}

/// A CA and a certificate for `localhost` signed by it: (ca, cert, key) PEM texts.
fn pki(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// A cluster of its own on a free port, stopped and removed when dropped.
struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres("pg_ctl").args(["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn chown_postgres(p: &Path) {
    run(Command::new("chown").args(["-R", "postgres:postgres", p.to_str().unwrap()]));
}

fn start_tls_cluster(cert: &str, key: &str) -> Cluster {
    let dir = std::env::temp_dir().join(format!("orch-pg-tls-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    chown_postgres(&dir);
    let data = dir.join("data");
    run(as_postgres("initdb").args(["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]));
    let port = free_port();
    std::fs::write(data.join("server.crt"), cert).unwrap();
    std::fs::write(data.join("server.key"), key).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let conf = format!(
        "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\n\
         ssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\n",
        dir.display()
    );
    let mut pg_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    pg_conf.push_str(&conf);
    std::fs::write(data.join("postgresql.conf"), pg_conf).unwrap();
    // TCP only with TLS.
    std::fs::write(data.join("pg_hba.conf"), "local all all trust\nhostssl all all 127.0.0.1/32 trust\n").unwrap();
    chown_postgres(&dir);
    let cluster = Cluster { dir: dir.clone(), port };
    run(as_postgres("pg_ctl").args([
        "-D",
        data.to_str().unwrap(),
        "-l",
        dir.join("log").to_str().unwrap(),
        "-w",
        "start",
    ]));
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_ca_works_and_a_wrong_ca_or_no_tls_is_refused() {
    let (ca, cert, key) = pki("good");
    let (other_ca, _, _) = pki("other");
    let cluster = start_tls_cluster(&cert, &key);
    let ca_file = cluster.dir.join("ca.pem");
    let other_file = cluster.dir.join("other.pem");
    std::fs::write(&ca_file, ca).unwrap();
    std::fs::write(&other_file, other_ca).unwrap();
    let url = |mode: &str, root: &Path| {
        format!("postgres://postgres@localhost:{}/postgres?sslmode={mode}&sslrootcert={}", cluster.port, root.display())
    };

    let store = PgStore::connect_with(&url("verify-full", &ca_file), common::options("tls_ok")).await.unwrap();
    let id = ProjectId::new();
    let now = chrono::Utc::now();
    store
        .project_create(NewProject { id, name: "over tls".into(), description: String::new(), repository: None, now })
        .await
        .unwrap();
    assert_eq!(store.project_get(id).await.unwrap().name, "over tls");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    drop(store);

    let err = PgStore::connect_with(&url("verify-full", &other_file), common::options("tls_bad")).await.unwrap_err();
    let msg = err.to_string().to_lowercase();
    assert!(msg.contains("certificate"), "a wrong CA says why: {msg}");

    let err = PgStore::connect_with(&url("disable", &ca_file), common::options("tls_none")).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no encryption") || msg.contains("pg_hba.conf"), "{msg}");
}
