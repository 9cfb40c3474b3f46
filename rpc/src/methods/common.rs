//! Helpers the handlers share (a handler file imports these, never another
//! handler file): adding and removing bdevs with their `bdev_register` /
//! `bdev_unregister` notifications, and the delete methods' `{"name"}`
//! parameters.
//!
//! Bdevs are added and removed through the service's graph
//! ([`graph::Graph::register`], [`graph::Graph::delete`]), which publishes the
//! notifications; [`register_bdev`] and [`delete_bdev`] are its RPC-typed form.

use crate::error::RpcError;
use crate::service::Service;
use bdev::Bdev;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// `bdev_register` / `bdev_unregister` (`ctx`: the bdev's name), published
/// by the graph alone ([`graph::Graph::register`], [`graph::Graph::delete`]).
pub use graph::{BDEV_REGISTER, BDEV_UNREGISTER};

/// Adds a bdev to the registry and publishes `bdev_register`; returns its name.
pub fn register_bdev(svc: &Service, b: Arc<dyn Bdev>) -> Result<String, RpcError> {
    Ok(svc.graph.register(b)?)
}

/// Deletes a bdev (it must not be claimed) and publishes `bdev_unregister`.
pub fn delete_bdev(svc: &Service, name: &str) -> Result<(), RpcError> {
    Ok(svc.graph.delete(name)?)
}

/// Deletes `name` if it is a `T` (SPDK answers -ENODEV for a bdev of another module).
pub fn delete_typed<T: 'static>(svc: &Service, name: &str, kind: &str) -> Result<Value, RpcError> {
    let _g = svc.graph.change();
    let b = svc.graph.nodes().get(name)?;
    if !b.as_any().is::<T>() {
        return Err(RpcError::errno(
            libc::ENODEV,
            format!("bdev {name:?} is not a {kind} bdev"),
        ));
    }
    delete_bdev(svc, name)?;
    Ok(Value::Bool(true))
}

/// `{"name"}`: the delete methods' parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByName {
    pub name: String,
}
