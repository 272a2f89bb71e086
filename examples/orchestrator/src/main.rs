//! The `orchestrator` binary.
//!
//! - `orchestrator serve [--bind ADDR] [--agents N]`: the HTTP API over SQLite (default) or PostgreSQL,
//!   optionally with agents running inside the server process.
//! - `orchestrator agent --server URL [--token T]`: an agent working for a remote server.
//! - `orchestrator project|vision|requirements|work-item|approvals|approve|reject|enqueue|tick|runs|logs|
//!   info|recipe ...`: a CLI client over the HTTP API.
//! - `orchestrator seed`: a sample project with work items and a recipe, over the API.
//! - `orchestrator bench --backend sqlite|memory [options]` prints one JSON line per measurement.

mod agent_cmd;
mod bench;
mod cli;
mod client;
mod seed;
mod serve;
mod store_url;
mod table;
mod telemetry;
mod tls;

use clap::{Parser, Subcommand};
use cli::ClientOpts;
use std::process::ExitCode;

const BENCH_USAGE: &str = "usage: orchestrator bench [options]

measure enqueue and claim+complete throughput and claim latency; one JSON line per measurement
  --backend sqlite|memory|postgres  store to measure (default sqlite)
  --items N                 work items per measurement (default 100000)
  --claimers C              concurrent in-process claimers (default 8; 16 for postgres)
  --batch B                 runs claimed per claim call (default 32)
  --no-single               skip the one-by-one enqueue: the first claims take a batched enqueue's items
  --combined                each claimer completes its batch and claims the next in one call
                            (Orchestrator::complete_and_claim) instead of a claim call and a completion call
  --enqueue-batch K         items per batched enqueue call (default 1000)
  --db PATH                 SQLite file (default: a file in a new temp dir)
  --synchronous normal|full SQLite durability (default normal)
  --database-url URL        PostgreSQL server for the postgres backend (default ORCH_TEST_DATABASE_URL,
                            else the local server's `postgres` database)
  --finished M              also measure claims with M finished runs in the database (default 0)
  --cache-kib N             SQLite writer page cache in KiB (default 8192)
  --latency-items N         items of the enqueue-to-claim latency measurement (default 200)
  --latency-rate R          enqueues per second of the latency measurement (default 50)
  --latency-claimers K      claimers waiting for work during the latency measurement (default 1)
  --pg-combine-max-runs N   postgres: runs per combined claim statement or completion transaction
                            (default 512; 0 runs every call on its own)
  --pg-combine-in-flight K  postgres: combined statements of each kind running at once (default 2)
";

const SERVE_HELP: &str = "Settings (environment or a .env file):
  ORCH_DATABASE_URL        sqlite://PATH or postgres://... (default: SQLite file orchestrator.db here)
  ORCH_PG_*                with PostgreSQL: ORCH_PG_SCHEMA (default orchestrator), ORCH_PG_MAX_CONNECTIONS,
                           ORCH_PG_MIN_CONNECTIONS, ORCH_PG_ACQUIRE_TIMEOUT_SECONDS, ORCH_PG_MIGRATE,
                           ORCH_PG_NOTIFY_INTERVAL_MS, ORCH_PG_COMBINE_MAX_RUNS, ORCH_PG_COMBINE_IN_FLIGHT
  ORCH_SECRET_KEY          key encrypting info-request answers; unset: orchestrator.key beside the
                           database (created with mode 0600 on first start)
  ORCH_API_TOKENS          name:role:token,... (roles admin, operator, agent, viewer); without tokens
                           the server only listens on loopback
  ORCH_SCHEDULER_BACKGROUND_INTERVAL
                           seconds between background ticks (promote due retries, reap expired
                           leases); default 1; 0 turns it off
  AGENT_*                  settings of the embedded agents (AGENT_CONCURRENCY, AGENT_WORKSPACE_ROOT, ...)
  RUST_LOG                 log filter (default info)
Ctrl-C or SIGTERM stops it gracefully: embedded agents finish their steps within
AGENT_SHUTDOWN_GRACE_SECONDS, open connections get 5 seconds.";

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Job orchestrator for autonomous coding agents: server, agent and CLI client",
    after_help = "Start with: orchestrator serve --agents 1   (then, in another terminal: orchestrator seed)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server (SQLite `orchestrator.db` by default; ORCH_DATABASE_URL for another store).
    #[command(after_help = SERVE_HELP)]
    Serve(serve::ServeArgs),
    /// Run an agent that works for a remote server.
    Agent {
        /// Server URL.
        #[arg(long, env = "ORCH_SERVER_URL", default_value = client::DEFAULT_SERVER_URL)]
        server: String,
        /// Bearer token (an `agent` token when the server has ORCH_API_TOKENS).
        #[arg(long, env = "ORCH_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Create a sample project with a vision, a recipe and three work items, and enqueue them.
    Seed {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Projects: create, list, show.
    Project {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::ProjectCmd,
    },
    /// A project's vision: set, show.
    Vision {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::VisionCmd,
    },
    /// Requirements drafts: propose, list, approve, reject.
    Requirements {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::RequirementsCmd,
    },
    /// Work items: add, list, show, submit, cancel.
    WorkItem {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::WorkItemCmd,
    },
    /// Approval requests: list.
    Approvals {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::ApprovalsCmd,
    },
    /// Approve an approval request.
    Approve {
        /// Approval request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Reject an approval request.
    Reject {
        /// Approval request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Enqueue a work item (priority, dependencies, not-before time).
    Enqueue {
        #[command(flatten)]
        args: cli::EnqueueArgs,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Run one scheduler tick (promote due retries, reap expired leases).
    Tick {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Runs: list, show, cancel.
    Runs {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::RunsCmd,
    },
    /// Print a run's logs (--follow streams them live).
    Logs {
        /// Run id.
        run_id: String,
        /// Keep printing new lines until the run ends.
        #[arg(long, short)]
        follow: bool,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Info requests (questions from runs): list, answer.
    Info {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::InfoCmd,
    },
    /// Tool recipes: validate, create, list.
    Recipe {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: cli::RecipeCmd,
    },
    /// Measure throughput and claim latency (`orchestrator bench --help` lists the options).
    Bench {
        /// Options (see `orchestrator bench --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn bench(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{BENCH_USAGE}");
        return Ok(());
    }
    bench::parse(args).and_then(|opts| runtime()?.block_on(bench::run(opts)))
}

fn main() -> ExitCode {
    // `bench` parses its own arguments.
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some("bench") {
        return finish(bench(&raw[2..]));
    }
    // Settings may come from a `.env` file (the process environment wins).
    let dotenv = dotenvy::dotenv();
    let cli = Cli::parse();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return finish(Err(e)),
    };
    let result: Result<(), String> = rt.block_on(async move {
        let c = |r: Result<(), client::ClientError>| r.map_err(|e| e.to_string());
        match cli.command {
            Command::Serve(args) => {
                let _telemetry = telemetry::init();
                if let Ok(path) = &dotenv {
                    tracing::info!("read settings from {}", path.display());
                }
                let r = serve::run(args).await;
                // The exporter flushes on its own thread: off the runtime's workers.
                tokio::task::spawn_blocking(move || drop(_telemetry)).await.ok();
                r
            }
            Command::Agent { server, token } => {
                let _telemetry = telemetry::init();
                let r = agent_cmd::run(server, token).await.map_err(|e| e.to_string());
                tokio::task::spawn_blocking(move || drop(_telemetry)).await.ok();
                r
            }
            Command::Seed { opts } => c(seed::run(&opts).await.map(|_| ())),
            Command::Project { opts, cmd } => c(cli::project(&opts, cmd).await),
            Command::Vision { opts, cmd } => c(cli::vision(&opts, cmd).await),
            Command::Requirements { opts, cmd } => c(cli::requirements(&opts, cmd).await),
            Command::WorkItem { opts, cmd } => c(cli::work_item_cmd(&opts, cmd).await),
            Command::Approvals { opts, cmd } => c(cli::approvals(&opts, cmd).await),
            Command::Approve { id, reason, opts } => c(cli::decide_approval(&opts, &id, "approve", reason).await),
            Command::Reject { id, reason, opts } => c(cli::decide_approval(&opts, &id, "reject", reason).await),
            Command::Enqueue { args, opts } => c(cli::enqueue(&opts, args).await),
            Command::Tick { opts } => c(cli::tick(&opts).await),
            Command::Runs { opts, cmd } => c(cli::runs(&opts, cmd).await),
            Command::Logs { run_id, follow, after, opts } => c(cli::logs(&opts, &run_id, follow, after).await),
            Command::Info { opts, cmd } => c(cli::info(&opts, cmd).await),
            Command::Recipe { opts, cmd } => c(cli::recipe(&opts, cmd).await),
            Command::Bench { args } => bench(&args),
        }
    });
    // Embedded agents or open streams may leave tasks behind: don't wait for them.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    finish(result)
}

fn finish(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_client_commands() {
        let cli = Cli::try_parse_from([
            "orchestrator",
            "work-item",
            "add",
            "--project",
            "p",
            "--title",
            "t",
            "--depends-on",
            "a",
            "--depends-on",
            "b",
            "--priority",
            "-3",
            "--json",
        ])
        .unwrap();
        match cli.command {
            Command::WorkItem { opts, cmd: cli::WorkItemCmd::Add { depends_on, priority, .. } } => {
                assert!(opts.json);
                assert_eq!(depends_on, ["a", "b"]);
                assert_eq!(priority, -3);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["orchestrator", "enqueue", "x", "--not-before", "t", "--delay", "3"]).is_err());
        assert!(Cli::try_parse_from(["orchestrator", "vision", "set", "p"]).is_err());
        let cli = Cli::try_parse_from(["orchestrator", "serve", "--agents", "2", "--bind", "127.0.0.1:1"]).unwrap();
        assert!(matches!(cli.command, Command::Serve(serve::ServeArgs { agents: 2, .. })));
    }
}
