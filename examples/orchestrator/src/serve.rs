//! `orchestrator serve`: the HTTP API over SQLite or PostgreSQL, optionally with embedded agents.

use crate::store_url::StoreUrl;
use clap::Args;
use orchestrator_core::crypto::{Keyring, SecretKey};
use orchestrator_core::{AgentApi, Orchestrator, OrchestratorConfig, Store};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The address `serve` listens on by default.
pub const DEFAULT_BIND: &str = "127.0.0.1:18080";

/// How long open connections (log streams, long polls) may take to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (host:port).
    #[arg(long, env = "ORCH_BIND", default_value = DEFAULT_BIND)]
    pub bind: String,
    /// Run this many agents inside the server process (they use AGENT_* settings).
    #[arg(long, env = "ORCH_EMBEDDED_AGENTS", default_value_t = 0)]
    pub agents: u32,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "ORCH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "ORCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Once listening, create the sample project (as `orchestrator seed` does) and print each sample work
    /// item's outcome and run log as it finishes (uses ORCH_TOKEN when tokens are configured).
    #[arg(long)]
    pub seed: bool,
}

/// A startup failure, shown as `error: <message>`.
pub type ServeError = String;

/// `ORCH_SCHEDULER_BACKGROUND_INTERVAL` (seconds, fractions allowed; `0`/`off` disables). Unset: every
/// second, with or without embedded agents (retries and not-before times become claimable, and the runs of
/// a crashed remote agent are reaped when their lease expires).
pub fn background_interval(value: Option<&str>, _embedded_agents: u32) -> Result<Option<Duration>, ServeError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(Some(Duration::from_secs(1))),
        Some("off" | "false" | "0") => Ok(None),
        Some(v) => match v.parse::<f64>() {
            Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(Some(Duration::from_secs_f64(s))),
            _ => Err(format!(
                "invalid ORCH_SCHEDULER_BACKGROUND_INTERVAL `{v}`: expected seconds (e.g. 1 or 0.5), or 0/off"
            )),
        },
    }
}

/// Reads a key file written by [`load_or_create_key`] (or by hand: any `ORCH_SECRET_KEY` value). A file
/// that its group or other users may access is refused: it holds the key to every secret answer.
pub fn read_key_file(path: &Path) -> Result<Keyring, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the secret key file {} is accessible to other users (mode {mode:o}); it is refused until only its \
             owner may read it: run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    Keyring::from_config(text.trim()).map_err(|e| format!("key file {}: {e}", path.display()))
}

/// Reads the key file, or creates it with a new random key: written to a temporary file (mode 0600) in the
/// same directory, flushed, then moved into place atomically without replacing a file another process made
/// meanwhile (theirs is used then). Returns the keyring (the key's id is its fingerprint) and whether the
/// file was created.
pub fn load_or_create_key(path: &Path) -> Result<(Keyring, bool), ServeError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        return read_key_file(path).map(|k| (k, false));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let cannot = |e: &dyn std::fmt::Display| format!("cannot create key file {}: {e}", path.display());
    let key = SecretKey::generate();
    let mut tmp = tempfile::Builder::new()
        .prefix(".orchestrator.key.")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| cannot(&e))?;
    tmp.write_all(format!("{}\n", key.to_base64()).as_bytes())
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| cannot(&e))?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {
            // Make the new directory entry durable too (best effort).
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok((Keyring::from_key(key), true))
        }
        // Another process created it first: use theirs.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path).map(|k| (k, false)),
        Err(e) => Err(cannot(&e.error)),
    }
}

/// The keyring when `ORCH_SECRET_KEY` is not set: the key file beside the SQLite database (created when
/// missing). For PostgreSQL no key is created: every server sharing the database needs the same key, so
/// it must be given (an existing key file in the working directory is still read).
pub fn keyring_without_env(url: &StoreUrl, key_file: &Path, db_existed: bool) -> Result<Keyring, ServeError> {
    if let StoreUrl::Postgres(_) = url {
        if !key_file.exists() {
            return Err(format!(
                "ORCH_SECRET_KEY is not set: on PostgreSQL no key is created on the fly, since every server \
                 sharing the database must encrypt info-request answers with the same key. Generate one once \
                 (e.g. `head -c 32 /dev/urandom | base64`) and give every server the same value in \
                 ORCH_SECRET_KEY (a secret of your deployment); or put it in {} (mode 0600)",
                key_file.display()
            ));
        }
        let keyring = read_key_file(key_file)?;
        tracing::warn!(
            "ORCH_SECRET_KEY is not set: using the secret key in {}; every server on this database needs the \
             same key, so prefer setting ORCH_SECRET_KEY",
            key_file.display()
        );
        return Ok(keyring);
    }
    let (keyring, created) = load_or_create_key(key_file)?;
    if created {
        tracing::info!(
            "ORCH_SECRET_KEY is not set: created a new secret key in {} (mode 0600, id {}) to encrypt info-request \
             answers; keep it with the database (answers cannot be read without it)",
            key_file.display(),
            keyring.active_key_id()
        );
        if db_existed {
            tracing::warn!(
                "the database existed before this new key: answers encrypted earlier (with another key) \
                 cannot be read; if you have the old key, put it back in {} or list it in ORCH_SECRET_KEY",
                key_file.display()
            );
        }
    } else {
        tracing::info!(
            "ORCH_SECRET_KEY is not set: using the secret key in {} (id {}) to encrypt info-request answers",
            key_file.display(),
            keyring.active_key_id()
        );
    }
    Ok(keyring)
}

/// Resolves `bind` and refuses a non-loopback address when authentication is off.
pub async fn resolve_bind(bind: &str, auth_enabled: bool) -> Result<Vec<SocketAddr>, ServeError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(bind)
        .await
        .map_err(|e| format!("invalid bind address `{bind}` (expected host:port, e.g. {DEFAULT_BIND}): {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("bind address `{bind}` resolves to nothing"));
    }
    if !auth_enabled {
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "refusing to listen on {a}: no ORCH_API_TOKENS are configured, so every request would be an \
                 admin. Configure tokens (ORCH_API_TOKENS=name:role:token,...) or bind to a loopback address \
                 such as {DEFAULT_BIND}"
            ));
        }
    }
    Ok(addrs)
}

async fn open_store(url: &StoreUrl) -> Result<Arc<dyn Store>, ServeError> {
    match url {
        StoreUrl::Sqlite(path) => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || {
                orchestrator_sqlite::SqliteStore::open(&path, orchestrator_sqlite::SqliteOptions::default())
            })
            .await
            .map_err(|e| format!("opening the database panicked: {e}"))?
            .map_err(|e| e.to_string())?;
            Ok(Arc::new(store))
        }
        StoreUrl::Postgres(u) => {
            let options = orchestrator_sqlx::PgOptions::from_env().map_err(|e| e.to_string())?;
            let store = orchestrator_sqlx::PgStore::connect_with(u, options)
                .await
                .map_err(|e| format!("cannot open {}: {e}", url.display()))?;
            Ok(Arc::new(store))
        }
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received: shutting down"),
        _ = term => tracing::info!("SIGTERM received: shutting down"),
    }
}

/// Runs the server until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    let http_config = orchestrator_http::HttpConfig::from_env().map_err(|e| e.to_string())?;
    let addrs = resolve_bind(&args.bind, http_config.auth_enabled()).await?;
    let interval =
        background_interval(std::env::var("ORCH_SCHEDULER_BACKGROUND_INTERVAL").ok().as_deref(), args.agents)?;
    let agent_config = if args.agents > 0 {
        Some(orchestrator_agent::AgentConfig::from_env().map_err(|e| e.to_string())?)
    } else {
        None
    };

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::server_config(c, k)?),
        _ => None,
    };
    let store_url = StoreUrl::parse(std::env::var("ORCH_DATABASE_URL").ok().as_deref())?;
    // Embedded agents keep their workspaces beside the server's data (a private directory), unless
    // AGENT_WORKSPACE_ROOT says otherwise.
    let agent_config = match (agent_config, &store_url) {
        (Some(c), StoreUrl::Sqlite(db)) if std::env::var_os("AGENT_WORKSPACE_ROOT").is_none() => {
            let dir = db.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
            Some(c.with_workspace_root(dir.join("orchestrator-workspaces")))
        }
        (c, _) => c,
    };
    let mut config = OrchestratorConfig::from_env().map_err(|e| e.to_string())?;
    let db_existed = matches!(&store_url, StoreUrl::Sqlite(p) if p.exists());
    // The key comes first, so a missing one is reported before connecting to anything.
    if config.keyring.is_some() {
        tracing::info!("info-request answers are encrypted with the key(s) in ORCH_SECRET_KEY");
    } else {
        config.keyring = Some(keyring_without_env(&store_url, &store_url.key_file(), db_existed)?);
    }
    let store = open_store(&store_url).await?;
    tracing::info!("store: {}", store_url.display());
    let orch = Arc::new(Orchestrator::new(store, config));

    let listener =
        tokio::net::TcpListener::bind(&addrs[..]).await.map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let local = listener.local_addr().map_err(|e| format!("cannot read the listening address: {e}"))?;
    if http_config.auth_enabled() {
        let names: Vec<String> = http_config.token_names().into_iter().map(|(n, r)| format!("{n} ({r})")).collect();
        tracing::info!("authentication on: {} token(s): {}", names.len(), names.join(", "));
    } else {
        tracing::warn!(
            "authentication is off (ORCH_API_TOKENS is not set): every request is treated as an admin, so the \
             server only listens on loopback"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // Log streams and long polls end on the same signal, so followers do not hold up the shutdown.
    let app = orchestrator_http::router(orch.clone(), http_config.with_shutdown(stop_rx.clone()))
        // The web dashboard (orchestrator-http's `ui` feature) is at /ui.
        .route("/", axum::routing::get(|| async { axum::response::Redirect::to("/ui") }));

    let _background = match interval {
        Some(every) => {
            tracing::info!("scheduler tick in the background every {:?}", every);
            Some(orchestrator_http::spawn_background(orch.clone(), every))
        }
        None => {
            tracing::info!(
                "no background scheduler tick (set ORCH_SCHEDULER_BACKGROUND_INTERVAL to promote retries and \
                 reap expired leases automatically)"
            );
            None
        }
    };

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Each embedded agent reports its end here; one that stops before shutdown stops the server.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<AgentEnd>();
    let mut agent_grace = Duration::ZERO;
    if let Some(base) = agent_config {
        agent_grace = base.shutdown_grace;
        for i in 0..args.agents {
            let mut cfg = base.clone();
            if args.agents > 1 {
                cfg.agent_id = format!("{}-{}", base.agent_id, i + 1);
            }
            tracing::info!(agent_id = %cfg.agent_id, "starting an embedded agent");
            let id = cfg.agent_id.clone();
            let api: Arc<dyn AgentApi> = orch.clone();
            let agent = orchestrator_agent::Agent::new(api, cfg);
            let run = tokio::spawn(agent.run(stopped(stop_rx.clone())));
            let tx = done_tx.clone();
            tokio::spawn(async move {
                let end = match run.await {
                    Ok(Ok(report)) => AgentEnd { id, error: None, report: Some(format!("{report:?}")) },
                    Ok(Err(e)) => AgentEnd { id, error: Some(e.to_string()), report: None },
                    Err(e) => AgentEnd { id, error: Some(format!("panicked: {e}")), report: None },
                };
                let _ = tx.send(end);
            });
        }
    }
    drop(done_tx);

    let scheme = if tls.is_some() { "https" } else { "http" };
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match tls {
        Some(config) => {
            use axum::serve::ListenerExt;
            // tap_io: axum gives the peer address as ConnectInfo<SocketAddr> for a tapped listener.
            let listener = crate::tls::TlsListener::new(listener, config)
                .map_err(|e| format!("cannot read the listening address: {e}"))?
                .tap_io(|_| {});
            let serve = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(stopped(stop_rx.clone()));
            Box::pin(std::future::IntoFuture::into_future(serve))
        }
        None => {
            let serve = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(stopped(stop_rx.clone()));
            Box::pin(std::future::IntoFuture::into_future(serve))
        }
    };
    let mut server = tokio::spawn(server);
    println!("orchestrator listening on {scheme}://{local}");
    println!("dashboard: {scheme}://{local}/ui");
    if args.seed {
        let opts = crate::cli::ClientOpts {
            server: format!("{scheme}://{local}"),
            token: std::env::var("ORCH_TOKEN").ok().filter(|t| !t.is_empty()),
            json: false,
        };
        tokio::spawn(async move {
            if let Err(e) = crate::seed::run_and_report(&opts).await {
                eprintln!("seed: {e}");
            }
        });
    }

    let mut failure = None;
    tokio::select! {
        _ = shutdown_signal() => {}
        r = &mut server => {
            let _ = stop_tx.send(true);
            return match r {
                Ok(Ok(())) => Err("the server stopped unexpectedly".to_string()),
                Ok(Err(e)) => Err(format!("the server failed: {e}")),
                Err(e) => Err(format!("the server task failed: {e}")),
            };
        }
        Some(end) = done_rx.recv() => {
            let why = end.error.unwrap_or_else(|| "it stopped".to_string());
            failure = Some(format!("embedded agent {} stopped: {why}", end.id));
        }
    }
    let _ = stop_tx.send(true);
    // A second signal while draining stops at once.
    tokio::spawn(async {
        shutdown_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
    let agent_wait = agent_grace + Duration::from_secs(5);
    let agents_done = async {
        let deadline = tokio::time::Instant::now() + agent_wait;
        loop {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(AgentEnd { id, error: None, report })) => {
                    tracing::info!(agent_id = %id, "embedded agent stopped: {}", report.unwrap_or_default())
                }
                Ok(Some(AgentEnd { id, error: Some(e), .. })) => {
                    tracing::error!(agent_id = %id, "embedded agent stopped with an error: {e}")
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("embedded agents did not stop within {agent_wait:?}");
                    break;
                }
            }
        }
    };
    let server_done = async {
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!("server error while shutting down: {e}"),
            Ok(Err(e)) => tracing::error!("server task failed: {e}"),
            Err(_) => {
                tracing::warn!(
                    "connections still open after {DRAIN_TIMEOUT:?} (log streams, long polls): closing them"
                );
                server.abort();
            }
        }
    };
    tokio::join!(agents_done, server_done);
    if let Some(f) = failure {
        return Err(f);
    }
    tracing::info!("stopped");
    Ok(())
}

/// How an embedded agent ended.
struct AgentEnd {
    id: String,
    error: Option<String>,
    report: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_interval_defaults_and_parsing() {
        assert_eq!(background_interval(None, 0).unwrap(), Some(Duration::from_secs(1)));
        assert_eq!(background_interval(None, 2).unwrap(), Some(Duration::from_secs(1)));
        assert_eq!(background_interval(Some("0"), 2).unwrap(), None);
        assert_eq!(background_interval(Some("off"), 0).unwrap(), None);
        assert_eq!(background_interval(Some("0.5"), 0).unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(background_interval(Some(" 5 "), 0).unwrap(), Some(Duration::from_secs(5)));
        assert!(background_interval(Some("-1"), 0).is_err());
        assert!(background_interval(Some("soon"), 0).is_err());
    }

    #[test]
    fn key_file_is_created_private_then_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orchestrator.key");
        let (k1, created) = load_or_create_key(&path).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (k2, created) = load_or_create_key(&path).unwrap();
        assert!(!created);
        let sealed = k1.seal(b"secret", b"aad").unwrap();
        assert_eq!(k2.open(&sealed, b"aad").unwrap(), b"secret");
        std::fs::write(&path, "not a key").unwrap();
        let e = load_or_create_key(&path).unwrap_err();
        assert!(e.contains("key file") && !e.contains("not a key"), "{e}");
    }

    #[test]
    fn generated_keys_are_named_by_fingerprint_written_atomically_and_kept_private() {
        use orchestrator_core::crypto::SecretKey;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orchestrator.key");
        let (ring, created) = load_or_create_key(&path).unwrap();
        assert!(created);
        // The id is the key's fingerprint, not a fixed "k1".
        let text = std::fs::read_to_string(&path).unwrap();
        let key = SecretKey::parse(text.trim()).unwrap();
        assert_eq!(ring.active_key_id(), key.fingerprint());
        assert_ne!(ring.active_key_id(), "k1");
        let other_dir = tempfile::tempdir().unwrap();
        let (other, _) = load_or_create_key(&other_dir.path().join("orchestrator.key")).unwrap();
        assert_ne!(other.active_key_id(), ring.active_key_id(), "two generated keys, two ids");
        // Only the key file is left in the directory (the temporary file was moved into place).
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["orchestrator.key"]);
        // A key file others may read is refused, with the fix in the message.
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_or_create_key(&path).unwrap_err();
            assert!(e.contains("chmod 600") && e.contains("accessible to other users"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_or_create_key(&path).unwrap().0.active_key_id(), ring.active_key_id());
    }

    #[test]
    fn postgresql_needs_a_given_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("orchestrator.key");
        let pg = StoreUrl::Postgres("postgres://postgres@127.0.0.1:5432/postgres".into());
        let e = keyring_without_env(&pg, &key_file, false).unwrap_err();
        assert!(e.contains("ORCH_SECRET_KEY") && e.contains("head -c 32 /dev/urandom | base64"), "{e}");
        assert!(!key_file.exists(), "no key is created for PostgreSQL");
        // SQLite: created beside the database.
        let sqlite = StoreUrl::Sqlite(dir.path().join("o.db"));
        let ring = keyring_without_env(&sqlite, &key_file, false).unwrap();
        assert!(key_file.exists());
        // An existing key file is still read for PostgreSQL.
        assert_eq!(keyring_without_env(&pg, &key_file, false).unwrap().active_key_id(), ring.active_key_id());
    }

    #[tokio::test]
    async fn refuses_non_loopback_without_tokens() {
        assert!(resolve_bind("127.0.0.1:0", false).await.is_ok());
        assert!(resolve_bind("[::1]:0", false).await.is_ok());
        let e = resolve_bind("0.0.0.0:18080", false).await.unwrap_err();
        assert!(e.contains("ORCH_API_TOKENS"), "{e}");
        assert!(resolve_bind("0.0.0.0:0", true).await.is_ok());
        assert!(resolve_bind("nonsense", false).await.is_err());
    }
}
