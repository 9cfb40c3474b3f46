//! SPDK's `bdev_rbd` methods, with SPDK's parameter names: named RADOS
//! clusters (`bdev_rbd_register_cluster`, `bdev_rbd_unregister_cluster`,
//! `bdev_rbd_get_clusters_info`) and RBD bdevs over them or over
//! connections of their own (`bdev_rbd_create`, `bdev_rbd_delete`,
//! `bdev_rbd_resize`). Connecting blocks on the cluster and runs on the
//! RPC connection's thread, never on a reactor; resizing runs as a task on
//! reactor 0 that waits for librbd on a helper thread.

use crate::error::RpcError;
use crate::methods::common::{delete_typed, register_bdev, ByName};
use crate::methods::nodes::open_rbd;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use rbd::{ClusterOptions, RbdBdev, RbdConfig, RbdOpen};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("bdev_rbd_register_cluster", register_cluster);
    t.add("bdev_rbd_unregister_cluster", |svc, p| {
        svc.rbd.unregister(&p.parse::<ByName>()?.name)?;
        Ok(Value::Bool(true))
    });
    t.add("bdev_rbd_get_clusters_info", |svc, p| {
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Info {
            name: Option<String>,
        }
        let a: Info = p.parse()?;
        Ok(svc.rbd.info(a.name.as_deref())?)
    });
    t.add("bdev_rbd_create", create);
    t.add("bdev_rbd_delete", |svc, p| {
        delete_typed::<RbdBdev>(svc, &p.parse::<ByName>()?.name, "rbd")
    });
    t.add("bdev_rbd_resize", resize);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterCluster {
    name: String,
    user_id: Option<String>,
    config_param: Option<BTreeMap<String, String>>,
    config_file: Option<String>,
    key_file: Option<String>,
    core_mask: Option<String>,
}

fn register_cluster(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: RegisterCluster = p.parse()?;
    if a.core_mask.is_some() {
        return Err(RpcError::errno(
            libc::ENOTSUP,
            "core_mask is not supported by sluice: librbd's threads run where the kernel puts them",
        ));
    }
    let opts = ClusterOptions {
        user: a.user_id,
        config_file: a.config_file,
        key_file: a.key_file,
        config: a.config_param.unwrap_or_default().into_iter().collect(),
    };
    svc.rbd.register(&a.name, opts)?;
    Ok(Value::String(a.name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: Option<String>,
    user_id: Option<String>,
    config: Option<BTreeMap<String, String>>,
    pool_name: String,
    rbd_name: String,
    block_size: u32,
    cluster_name: Option<String>,
    uuid: Option<String>,
    #[serde(default)]
    read_only: bool,
}

fn create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Create = p.parse()?;
    if a.cluster_name.is_some() && (a.user_id.is_some() || a.config.is_some()) {
        return Err(RpcError::invalid_params(
            "cluster_name excludes user_id and config: the named cluster is already connected",
        ));
    }
    let cluster = a
        .cluster_name
        .as_deref()
        .map(|n| svc.rbd.get(n))
        .transpose()?;
    let name = match a.name {
        Some(n) => n,
        // SPDK's default names: Ceph0, Ceph1, ...
        None => (0..)
            .map(|i| format!("Ceph{i}"))
            .find(|n| svc.graph.nodes().get(n).is_err())
            .unwrap_or_default(),
    };
    if svc.graph.nodes().get(&name).is_ok() {
        return Err(RpcError::errno(
            libc::EEXIST,
            format!("a bdev named {name:?} already exists"),
        ));
    }
    let how = RbdOpen {
        config: RbdConfig {
            pool: a.pool_name,
            image: a.rbd_name,
            user: a.user_id,
            options: a.config.unwrap_or_default().into_iter().collect(),
            ..RbdConfig::default()
        },
        read_only: a.read_only,
        block_size: a.block_size,
        cluster_name: a.cluster_name,
        uuid: a.uuid,
    };
    let b = open_rbd(&name, how, cluster)?;
    Ok(Value::String(register_bdev(svc, b)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    /// MiB.
    new_size: u64,
}

fn resize(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: Resize = p.parse()?;
    let b = svc.graph.nodes().get(&a.name)?;
    if !b.as_any().is::<RbdBdev>() {
        return Err(RpcError::errno(
            libc::ENODEV,
            format!("bdev {:?} is not an rbd bdev", a.name),
        ));
    }
    let size = a
        .new_size
        .checked_mul(1 << 20)
        .ok_or_else(|| RpcError::invalid_params("new_size: too large"))?;
    if size < b.size() {
        return Err(RpcError::invalid_params(format!(
            "new_size: the rbd bdev can only grow ({} MiB now)",
            b.size() >> 20
        )));
    }
    let b2 = b.clone();
    let r = svc
        .rt
        .spawn_on(0, move || async move {
            match b2.resize(size) {
                Some(f) => f.await,
                None => Ok(()),
            }
        })
        .block()?;
    let _ = svc.rt.broadcast(bdev::refresh_channel_sizes).block();
    r?;
    Ok(json!(true))
}
