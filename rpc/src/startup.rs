//! What `serve` starts beside the reactors (RPC servers, config replay, exports),
//! and stops before them. Each subsystem adds itself here.

use crate::serve::{ServeArgs, ServeError};
use crate::service::Service;
use std::sync::Arc;

/// Something started at boot that must be stopped before the reactors.
pub trait Subsystem: Send {
    /// Stops accepting work and releases its resources.
    fn stop(self: Box<Self>);
}

/// The started subsystems, stopped in reverse order.
#[derive(Default)]
pub struct Subsystems {
    list: Vec<Box<dyn Subsystem>>,
}

impl Subsystems {
    /// Adds a started subsystem.
    pub fn push(&mut self, s: Box<dyn Subsystem>) {
        self.list.push(s);
    }
    /// Stops every subsystem, last started first.
    pub fn stop(self) {
        for s in self.list.into_iter().rev() {
            s.stop();
        }
    }
}

/// Starts every subsystem for `serve`.
pub fn start(svc: &Arc<Service>, args: &ServeArgs) -> Result<Subsystems, ServeError> {
    let mut subs = Subsystems::default();
    let res = start_into(svc, args, &mut subs);
    if let Err(e) = res {
        subs.stop();
        return Err(e);
    }
    Ok(subs)
}

/// Starts the subsystems in order, pushing each one started (so a failure
/// stops those already running).
fn start_into(
    svc: &Arc<Service>,
    args: &ServeArgs,
    subs: &mut Subsystems,
) -> Result<(), ServeError> {
    // The config is replayed before any socket opens: once the RPC socket
    // accepts, every configured bdev exists.
    if let Some(path) = &args.json_config {
        crate::config::replay(svc, path)
            .map_err(|e| ServeError::Start(format!("--json {}: {e}", path.display())))?;
    }
    // NBD after the config replay (its exports name configured bdevs).
    if let Some(nbd) = crate::nbd::startup::start(svc, args)? {
        subs.push(Box::new(nbd));
    }
    start_rpc_servers(svc, args, subs)?;
    Ok(())
}

/// The QMP server and the JSON-RPC servers (optional TCP, Unix socket). The
/// JSON-RPC Unix socket opens last: once it accepts, every server is up.
fn start_rpc_servers(
    svc: &Arc<Service>,
    args: &ServeArgs,
    subs: &mut Subsystems,
) -> Result<(), ServeError> {
    let limits = args.rpc_limits();
    let err = |e: crate::transport::TransportError| ServeError::Start(e.to_string());
    subs.push(Box::new(
        crate::qmp::start_unix(svc, &args.qmp_socket_path(), limits).map_err(err)?,
    ));
    if let Some(addr) = &args.rpc_listen {
        subs.push(Box::new(
            crate::jsonrpc::start_tcp(svc, addr, args.rpc_allow_remote, limits).map_err(err)?,
        ));
    }
    subs.push(Box::new(
        crate::jsonrpc::start_unix(svc, &args.rpc_socket_path(), limits).map_err(err)?,
    ));
    Ok(())
}
