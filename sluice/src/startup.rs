//! What `serve` starts beside the reactors (RPC servers, config replay, exports),
//! and stops before them. Each subsystem adds itself here.

mod nbd_exports;

use crate::serve::{ServeArgs, ServeError};
use rpc::subsystem::Subsystems;
use rpc::Service;
use std::sync::Arc;

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
        rpc::config::replay(svc, path)
            .map_err(|e| ServeError::Start(format!("--json {}: {e}", path.display())))?;
    }
    // NBD after the config replay (its exports name configured bdevs).
    if let Some(nbd) = nbd_exports::start(svc, args)? {
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
    let err = |e: rpc::transport::TransportError| ServeError::Start(e.to_string());
    subs.push(Box::new(
        rpc::qmp::start_unix(svc, &args.qmp_socket_path(), limits).map_err(err)?,
    ));
    if let Some(addr) = &args.rpc_listen {
        subs.push(Box::new(
            rpc::jsonrpc::start_tcp(svc, addr, args.rpc_allow_remote, limits).map_err(err)?,
        ));
    }
    subs.push(Box::new(
        rpc::jsonrpc::start_unix(svc, &args.rpc_socket_path(), limits).map_err(err)?,
    ));
    Ok(())
}
