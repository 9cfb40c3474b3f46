//! The NBD client's SPDK-dialect methods: `bdev_nbd_client_create` and
//! `bdev_nbd_client_delete`. SPDK has no NBD client bdev (its `nbd_start_disk`
//! is the kernel's NBD device exporting a bdev, the other direction), so the
//! names follow SPDK's `bdev_<driver>_create` / `_delete` with the driver
//! named for what it is; the parameters are QEMU's `nbd` options in SPDK's
//! spelling: `name`, `socket` (a Unix socket) or `host` and `port`, `export`,
//! `reconnect_delay` and `open_timeout` (seconds), `readonly`, `tls_creds`
//! (the id of client TLS credentials, `object-add`) and `tls_hostname`.

use crate::error::RpcError;
use crate::methods::common::{delete_typed, register_bdev, ByName};
use crate::methods::nodes::open_nbd;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use nbd::client::{ClientConfig, NbdBdev, ServerAddr, DEFAULT_PORT};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("bdev_nbd_client_create", bdev_nbd_client_create);
    t.add("bdev_nbd_client_delete", |svc, p| {
        delete_typed::<NbdBdev>(svc, &p.parse::<ByName>()?.name, "nbd client")
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    socket: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    export: Option<String>,
    #[serde(default)]
    reconnect_delay: u64,
    #[serde(default)]
    open_timeout: u64,
    #[serde(default)]
    readonly: bool,
    tls_creds: Option<String>,
    tls_hostname: Option<String>,
}

fn bdev_nbd_client_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Create = p.parse()?;
    let server = match (a.socket, a.host) {
        (Some(s), None) if a.port.is_none() => ServerAddr::Unix(s.into()),
        (None, Some(host)) => ServerAddr::Inet {
            host,
            port: a.port.unwrap_or(DEFAULT_PORT),
        },
        _ => {
            return Err(RpcError::invalid_params(
                "give either 'socket' or 'host' (with an optional 'port')",
            ))
        }
    };
    if a.reconnect_delay > u32::MAX as u64 || a.open_timeout > u32::MAX as u64 {
        return Err(RpcError::invalid_params("delay out of range"));
    }
    let config = ClientConfig {
        server,
        export: a.export,
        reconnect_delay: Duration::from_secs(a.reconnect_delay),
        open_timeout: Duration::from_secs(a.open_timeout),
        tls_creds: a.tls_creds,
        tls_hostname: a.tls_hostname,
        tls: None,
    };
    let b = open_nbd(svc, &a.name, config, a.readonly, true)?;
    Ok(Value::String(register_bdev(svc, b)?))
}
