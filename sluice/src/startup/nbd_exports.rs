//! `sluice serve --nbd-listen ... --export NAME[:writable]`: the NBD server as a
//! start-up subsystem, stopped (clients disconnected after their in-flight
//! requests) before the reactors.

use crate::serve::{ServeArgs, ServeError};
use nbd::{ExportConfig, ListenAddr, StartOptions};
use rpc::subsystem::Subsystem;
use rpc::Service;
use std::sync::Arc;
use std::time::Duration;

/// How long shutdown waits for NBD clients to be disconnected.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// The running NBD server of `serve` (the one in its service context).
pub struct NbdSubsystem(Arc<Service>);

impl Subsystem for NbdSubsystem {
    fn stop(self: Box<Self>) {
        self.0.nbd.shutdown(SHUTDOWN_WAIT);
    }
}

/// Parses `NAME[:writable]` (also `NAME:ro`).
pub fn parse_export(spec: &str) -> Result<(String, bool), String> {
    let (name, writable) = match spec.rsplit_once(':') {
        Some((n, "writable" | "rw")) => (n, true),
        Some((n, "ro" | "readonly")) => (n, false),
        _ => (spec, false),
    };
    if name.is_empty() {
        return Err(format!("--export {spec:?}: empty name"));
    }
    Ok((name.to_string(), writable))
}

/// Starts the NBD server and the exports the command line asks for; `None`
/// when no `--nbd-listen` was given.
pub fn start(svc: &Arc<Service>, args: &ServeArgs) -> Result<Option<NbdSubsystem>, ServeError> {
    let server = &svc.nbd;
    server.set_allow_remote(args.nbd_allow_remote);
    if args.nbd_listen.is_empty() {
        if !args.nbd_exports.is_empty() {
            return Err(ServeError::Start("--export needs --nbd-listen".into()));
        }
        return Ok(None);
    }
    let addrs = args
        .nbd_listen
        .iter()
        .map(|a| ListenAddr::parse(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Start(e.to_string()))?;
    let mut exports = Vec::new();
    for spec in &args.nbd_exports {
        exports.push(parse_export(spec).map_err(ServeError::Start)?);
    }
    let opts = StartOptions {
        max_connections: 0,
        allow_remote: args.nbd_allow_remote,
        ..Default::default()
    };
    server
        .start(&svc.rt, Some(svc.events.clone()), &addrs, opts)
        .map_err(|e| ServeError::Start(format!("NBD server: {e}")))?;
    for (name, writable) in exports {
        let cfg = ExportConfig {
            id: name.clone(),
            node: name.clone(),
            name: name.clone(),
            description: String::new(),
            writable,
            writethrough: false,
        };
        if let Err(e) = server.add_export(svc.graph.nodes(), cfg) {
            server.shutdown(SHUTDOWN_WAIT);
            return Err(ServeError::Start(format!("--export {name}: {e}")));
        }
    }
    Ok(Some(NbdSubsystem(svc.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_specs() {
        assert_eq!(parse_export("disk0").unwrap(), ("disk0".into(), false));
        assert_eq!(
            parse_export("disk0:writable").unwrap(),
            ("disk0".into(), true)
        );
        assert_eq!(parse_export("a:b:ro").unwrap(), ("a:b".into(), false));
        assert!(parse_export(":writable").is_err());
    }
}
