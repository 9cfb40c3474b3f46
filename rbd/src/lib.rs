//! sluice's Ceph RBD driver: QEMU's `rbd` block driver and SPDK's
//! `bdev_rbd`, over librbd's stable C API.
//!
//! - [`ffi`]: the ~25 C functions, declared by hand (no bindgen); linked
//!   when the machine has librbd and librados (`build.rs`), else every open
//!   fails with [`RbdError::Unavailable`] and nothing else changes.
//! - [`config`]: QEMU's options and `rbd:pool/image[@snap][:opts]` names.
//! - [`cluster`]: RADOS connections and SPDK's named clusters.
//! - [`image`]: an open image's blocking calls, run off the reactors.
//! - [`bdev`]: [`RbdBdev`], the data-path contract over `rbd_aio_*` with
//!   completions brought back to the submitting reactor.
//! - [`status`]: an image's last allocation answer, for the next query.

pub mod bdev;
pub mod cluster;
pub mod config;
pub mod error;
pub mod ffi;
pub mod image;
pub mod status;

pub use self::bdev::{RbdBdev, RbdOpen};
pub use cluster::{Cluster, ClusterOptions, Clusters};
pub use config::RbdConfig;
pub use error::RbdError;
pub use image::wait_for_closes;

/// Whether this build links librbd.
pub fn available() -> bool {
    cfg!(sluice_librbd)
}

/// Lets qcow2 headers name backing files on RBD as QEMU writes them
/// (`rbd:pool/image[@snap][:conf=...]`, and `json:` names with driver
/// `rbd`): such a backing opens read-only through [`RbdBdev`] on a
/// connection of its own.
pub fn register_backing_protocol() {
    ::bdev::qcow2::register_protocol("rbd", &["rbd:"], cluster::BLOCKDEV_OPTIONS, open_backing);
}

fn open_backing(
    name: String,
    spec: serde_json::Value,
) -> futures::future::LocalBoxFuture<
    'static,
    Result<std::sync::Arc<dyn ::bdev::Bdev>, ::bdev::BdevError>,
> {
    Box::pin(async move {
        let config = match &spec {
            serde_json::Value::String(u) => RbdConfig::parse_filename(u),
            serde_json::Value::Object(m) => RbdConfig::from_options(m),
            other => Err(format!("an RBD backing named by {other}")),
        }
        .map_err(|e| ::bdev::BdevError::InvalidParam(format!("backing file: {e}")))?;
        let how = RbdOpen {
            config,
            read_only: true,
            block_size: 512,
            cluster_name: None,
            uuid: None,
        };
        let b = RbdBdev::open_async(name, how, None).await?;
        Ok(b as std::sync::Arc<dyn ::bdev::Bdev>)
    })
}
