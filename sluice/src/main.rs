//! The `sluice` command line: `serve` (the daemon), `rpc` (the JSON-RPC
//! client), `perf` (bdevperf, in its own process or inside a daemon).

mod client;
mod nofile;
mod perf_cli;
mod serve;
mod startup;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A userspace, polled-mode block storage service with live image streaming"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service.
    Serve(serve::ServeArgs),
    /// Call a JSON-RPC method of a running sluice and print the result.
    Rpc(client::RpcArgs),
    /// Measure bdevs as SPDK's bdevperf does.
    Perf(perf::PerfArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Serve(a) => serve::run(a).map_err(|e| e.to_string()),
        Cmd::Rpc(a) => return client::run(a),
        Cmd::Perf(a) => {
            let code = perf_cli::run(a);
            rbd::wait_for_closes(std::time::Duration::from_secs(10));
            return code;
        }
    };
    // RBD images and connections close on threads of their own: let them
    // finish (releasing image locks) before the process goes.
    rbd::wait_for_closes(std::time::Duration::from_secs(10));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}
