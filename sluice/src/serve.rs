//! `sluice serve`: start the reactors and the service, stop cleanly on signals.

use clap::Args;
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use rpc::service::{Service, StopReason};
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Options of `sluice serve`.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Core mask, SPDK style (e.g. 0x3). Default: every available core.
    #[arg(short = 'm', long = "cpumask", conflicts_with = "cores")]
    pub cpumask: Option<String>,
    /// Core list (e.g. 0,1 or 0-3). Default: every available core.
    #[arg(long)]
    pub cores: Option<String>,
    /// Directory for runtime files (pid file, default sockets).
    #[arg(long, default_value = "/var/tmp")]
    pub runtime_dir: PathBuf,
    /// JSON-RPC Unix socket (default: RUNTIME_DIR/sluice.sock).
    #[arg(short = 'r', long = "rpc-socket")]
    pub rpc_socket: Option<PathBuf>,
    /// Also serve JSON-RPC on TCP (loopback unless --rpc-allow-remote).
    #[arg(long)]
    pub rpc_listen: Option<String>,
    /// Allow a non-loopback --rpc-listen address.
    #[arg(long)]
    pub rpc_allow_remote: bool,
    /// QMP Unix socket (default: RUNTIME_DIR/sluice-qmp.sock).
    #[arg(long)]
    pub qmp_socket: Option<PathBuf>,
    /// SPDK-format JSON config to replay at start-up.
    #[arg(long = "json")]
    pub json_config: Option<PathBuf>,
    /// Most simultaneous connections per RPC socket; more are refused with an error.
    #[arg(long, default_value_t = 256)]
    pub rpc_max_connections: usize,
    /// Largest RPC request in bytes; a larger one gets an error.
    #[arg(long, default_value_t = 4 << 20)]
    pub rpc_max_request_size: usize,
    /// Seconds a JSON-RPC connection may stay silent (no call of its running)
    /// before it is closed; 0: never. QMP connections have none.
    #[arg(long, default_value_t = 60)]
    pub rpc_idle_timeout: u64,
    /// Seconds one reply may take to reach a client that reads slowly or not
    /// at all (JSON-RPC and QMP) before the connection is dropped.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub rpc_write_timeout: u64,
    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Microseconds of idle polling after which a reactor parks until a message,
    /// a timer or a registered file descriptor wakes it.
    #[arg(long, default_value_t = 500)]
    pub park_after_us: u64,
    /// Start the NBD server on unix:PATH or HOST:PORT (repeatable; TCP on
    /// loopback unless --nbd-allow-remote).
    #[arg(long = "nbd-listen", value_name = "unix:PATH|HOST:PORT")]
    pub nbd_listen: Vec<String>,
    /// Allow NBD on non-loopback TCP addresses (command line and nbd-server-start).
    #[arg(long)]
    pub nbd_allow_remote: bool,
    /// Export a bdev or device over NBD at start-up, under its own name
    /// (repeatable; read-only unless ":writable"). Needs --nbd-listen.
    #[arg(long = "export", value_name = "NAME[:writable]")]
    pub nbd_exports: Vec<String>,
}

impl ServeArgs {
    /// The JSON-RPC socket path.
    pub fn rpc_socket_path(&self) -> PathBuf {
        self.rpc_socket
            .clone()
            .unwrap_or_else(|| self.runtime_dir.join("sluice.sock"))
    }
    /// The QMP socket path.
    pub fn qmp_socket_path(&self) -> PathBuf {
        self.qmp_socket
            .clone()
            .unwrap_or_else(|| self.runtime_dir.join("sluice-qmp.sock"))
    }
    /// The caps of the RPC servers.
    pub fn rpc_limits(&self) -> rpc::transport::Limits {
        rpc::transport::Limits {
            max_connections: self.rpc_max_connections.max(1),
            max_request: self.rpc_max_request_size.max(64),
            write_timeout: std::time::Duration::from_secs(self.rpc_write_timeout),
            idle_timeout: (self.rpc_idle_timeout > 0)
                .then(|| std::time::Duration::from_secs(self.rpc_idle_timeout)),
        }
    }
    /// The reactors' cores.
    pub fn core_set(&self) -> Result<CoreSet, reactor::ReactorError> {
        match (&self.cpumask, &self.cores) {
            (Some(m), _) => CoreSet::from_mask(m),
            (None, Some(l)) => CoreSet::from_list(l),
            (None, None) => Ok(CoreSet::all_available()),
        }
    }
}

/// Why `serve` could not start.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Bad cores.
    #[error(transparent)]
    Cores(#[from] reactor::ReactorError),
    /// A runtime file could not be made.
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A subsystem failed to start.
    #[error("{0}")]
    Start(String),
}

/// Runs the daemon until a signal or a stop request; returns once everything stopped.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    crate::nofile::raise_limit();
    let cores = args.core_set()?;
    std::fs::create_dir_all(&args.runtime_dir).map_err(|source| ServeError::File {
        what: "creating runtime directory",
        path: args.runtime_dir.clone(),
        source,
    })?;
    let mut cfg = RuntimeConfig::new(cores);
    cfg.pin = !args.no_pin;
    cfg.idle_before_park = std::time::Duration::from_micros(args.park_after_us);
    let (stop_tx, stop_rx) = channel();
    // Signals become stop requests (handled on a dedicated thread so no reactor blocks).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| ServeError::Start(format!("installing signal handlers: {e}")))?;
    let sig_tx = stop_tx.clone();
    let sig_handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = sig_tx.send(StopReason::Signal(sig));
            }
        })
        .map_err(|e| ServeError::Start(e.to_string()))?;

    let runtime = Runtime::start(cfg)?;
    let svc = Service::new(runtime.handle(), args.runtime_dir.clone(), stop_tx);
    let _ = svc.table.set(Arc::new(rpc::methods::build_table()));
    let pid_path = args.runtime_dir.join("sluice.pid");
    write_pid(&pid_path)?;

    let subsystems = crate::startup::start(&svc, &args);
    let subsystems = match subsystems {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&pid_path);
            close_images(&runtime.handle());
            runtime.shutdown();
            return Err(e);
        }
    };
    tracing::info!(pid = std::process::id(), "sluice is serving");

    let why = stop_rx.recv().unwrap_or(StopReason::Rpc);
    tracing::info!(?why, "stopping");
    sig_handle.close();
    subsystems.stop();
    close_images(&runtime.handle());
    runtime.shutdown();
    let _ = std::fs::remove_file(&pid_path);
    tracing::info!("stopped");
    Ok(())
}

/// The longest shutdown waits for open images to be closed.
const CLOSE_IMAGES_WAIT: Duration = Duration::from_secs(5);

/// Closes the open qcow2 images whose files were extended for growth (flush,
/// then trim the file to the image's end), while the reactors still run: once
/// the servers stopped, so that no new request comes in.
fn close_images(rt: &RuntimeHandle) {
    let t = Instant::now();
    let n = bdev::qcow2::Qcow2Bdev::close_grown_files(rt, CLOSE_IMAGES_WAIT);
    if n > 0 {
        tracing::info!(images = n, took = ?t.elapsed(), "qcow2 images closed");
    }
}

fn write_pid(path: &Path) -> Result<(), ServeError> {
    std::fs::write(path, format!("{}\n", std::process::id())).map_err(|source| ServeError::File {
        what: "writing pid file",
        path: path.to_path_buf(),
        source,
    })
}
