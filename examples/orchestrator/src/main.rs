//! The `orchestrator` binary.
//!
//! `orchestrator bench --backend sqlite|memory [options]` prints one JSON line per measurement.

mod bench;

use std::process::ExitCode;

const USAGE: &str = "usage: orchestrator <command> [options]

commands:
  bench   measure enqueue and claim+complete throughput and claim latency
          --backend sqlite|memory   store to measure (default sqlite)
          --items N                 work items per measurement (default 100000)
          --claimers C              concurrent in-process claimers (default 8)
          --batch B                 runs claimed per claim call (default 32)
          --enqueue-batch K         items per batched enqueue call (default 1000)
          --db PATH                 SQLite file (default: a file in a new temp dir)
          --synchronous normal|full SQLite durability (default normal)
          --finished M              also measure claims with M finished runs in the database (default 0)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "bench" => bench::parse(&args[1..]).and_then(|opts| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            rt.block_on(bench::run(opts))
        }),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
