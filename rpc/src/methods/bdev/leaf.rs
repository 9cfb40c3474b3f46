//! The leaf bdevs' create and delete methods with SPDK's parameters: malloc,
//! null, uring, and aio (served by the uring bdev).
//!
//! SPDK parameters that sluice cannot honour (metadata, protection
//! information, write hints) are accepted at their neutral values, so SPDK's
//! client works unchanged, and refused with -ENOTSUP otherwise.

use crate::error::RpcError;
use crate::methods::common::{delete_typed, register_bdev, ByName};
use crate::methods::nodes::{locking_param, open_file, FileOpts};
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::lock::LockMode;
use bdev::malloc::MallocBdev;
use bdev::null::{NullBdev, NullOptions};
use bdev::uring::UringBdev;
use bdev::{Bdev, BdevError};
use serde::Deserialize;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(super) fn register(t: &mut MethodTable) {
    t.add("bdev_malloc_create", bdev_malloc_create);
    t.add("bdev_malloc_delete", |svc, p| {
        delete_typed::<MallocBdev>(svc, &p.parse::<ByName>()?.name, "malloc")
    });
    t.add("bdev_null_create", bdev_null_create);
    t.add("bdev_null_delete", |svc, p| {
        delete_typed::<NullBdev>(svc, &p.parse::<ByName>()?.name, "null")
    });
    t.add("bdev_null_resize", bdev_null_resize);
    t.add("bdev_uring_create", bdev_uring_create);
    t.add("bdev_uring_delete", |svc, p| {
        delete_typed::<UringBdev>(svc, &p.parse::<ByName>()?.name, "uring")
    });
    t.add("bdev_aio_create", bdev_aio_create);
    t.add("bdev_aio_delete", |svc, p| {
        delete_typed::<UringBdev>(svc, &p.parse::<ByName>()?.name, "aio")
    });
}

/// Refuses a parameter that is set to anything but its neutral value.
fn neutral<T: PartialEq + Default + std::fmt::Debug>(
    name: &str,
    v: &Option<T>,
) -> Result<(), RpcError> {
    match v {
        Some(x) if *x != T::default() => Err(RpcError::errno(
            libc::ENOTSUP,
            format!("{name}: {x:?} is not supported (only the default)"),
        )),
        _ => Ok(()),
    }
}

fn check_physical(physical: Option<u32>, block_size: u32) -> Result<(), RpcError> {
    match physical {
        Some(p) if p != 0 && p != block_size => Err(RpcError::errno(
            libc::ENOTSUP,
            format!(
                "physical_block_size: {p} is not supported (only the block size, {block_size})"
            ),
        )),
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    name: Option<String>,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    physical_block_size: Option<u32>,
    optimal_io_boundary: Option<u32>,
    md_size: Option<u32>,
    md_interleave: Option<bool>,
    dif_type: Option<u32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<u32>,
    /// NUMA placement hint: memory comes from the DMA arena or ordinary pages either way.
    #[allow(dead_code)]
    numa_id: Option<i32>,
}

/// SPDK names unnamed malloc bdevs Malloc0, Malloc1, ...
static NEXT_MALLOC: AtomicU64 = AtomicU64::new(0);

fn bdev_malloc_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: MallocCreate = p.parse()?;
    check_physical(a.physical_block_size, a.block_size)?;
    neutral("optimal_io_boundary", &a.optimal_io_boundary)?;
    neutral("md_size", &a.md_size)?;
    neutral("md_interleave", &a.md_interleave)?;
    neutral("dif_type", &a.dif_type)?;
    neutral("dif_is_head_of_md", &a.dif_is_head_of_md)?;
    neutral("dif_pi_format", &a.dif_pi_format)?;
    if let Some(name) = a.name {
        let b = MallocBdev::new(&name, a.num_blocks, a.block_size, a.uuid)?;
        return Ok(Value::String(register_bdev(svc, b)?));
    }
    loop {
        let n = NEXT_MALLOC.fetch_add(1, Ordering::Relaxed);
        let name = format!("Malloc{n}");
        if svc.graph.nodes().contains(&name) {
            continue;
        }
        let b = MallocBdev::new(&name, a.num_blocks, a.block_size, a.uuid.clone())?;
        match register_bdev(svc, b) {
            Err(e) if e.code == -libc::EEXIST => continue,
            r => return r.map(Value::String),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullResize {
    name: String,
    /// MiB.
    new_size: u64,
}

/// SPDK's `bdev_null_resize {name, new_size (MiB)}`: grows a null bdev.
fn bdev_null_resize(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: NullResize = p.parse()?;
    let _g = svc.graph.change();
    let b = svc
        .graph
        .nodes()
        .get(&a.name)
        .map_err(|_| RpcError::errno(libc::ENODEV, "No such device"))?;
    let n = b
        .as_any()
        .downcast_ref::<NullBdev>()
        .ok_or_else(|| RpcError::errno(libc::ENODEV, "No such device"))?;
    let bytes = a
        .new_size
        .checked_mul(1 << 20)
        .ok_or_else(|| RpcError::errno(libc::EINVAL, "Invalid argument"))?;
    n.grow_to(bytes)
        .map_err(|_| RpcError::errno(libc::EINVAL, "Invalid argument"))?;
    let _ = svc.rt.broadcast(bdev::refresh_channel_sizes).block();
    Ok(Value::Bool(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    physical_block_size: Option<u32>,
    md_size: Option<u32>,
    dif_type: Option<u32>,
    dif_is_head_of_md: Option<bool>,
    dif_pi_format: Option<u32>,
    preferred_write_alignment: Option<u32>,
    preferred_write_granularity: Option<u32>,
    optimal_write_size: Option<u32>,
    preferred_unmap_alignment: Option<u32>,
    preferred_unmap_granularity: Option<u32>,
    /// sluice: fill read buffers with zeroes (default true); `false` leaves
    /// them untouched (benchmarks of the I/O stack). `save_config` emits it.
    zero_reads: Option<bool>,
}

fn bdev_null_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: NullCreate = p.parse()?;
    check_physical(a.physical_block_size, a.block_size)?;
    neutral("md_size", &a.md_size)?;
    neutral("dif_type", &a.dif_type)?;
    neutral("dif_is_head_of_md", &a.dif_is_head_of_md)?;
    neutral("dif_pi_format", &a.dif_pi_format)?;
    neutral("preferred_write_alignment", &a.preferred_write_alignment)?;
    neutral(
        "preferred_write_granularity",
        &a.preferred_write_granularity,
    )?;
    neutral("optimal_write_size", &a.optimal_write_size)?;
    neutral("preferred_unmap_alignment", &a.preferred_unmap_alignment)?;
    neutral(
        "preferred_unmap_granularity",
        &a.preferred_unmap_granularity,
    )?;
    let opts = NullOptions {
        zero_reads: a.zero_reads.unwrap_or(true),
    };
    let b = NullBdev::with_options(&a.name, a.num_blocks, a.block_size, a.uuid, opts)?;
    Ok(Value::String(register_bdev(svc, b)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UringCreate {
    name: String,
    filename: String,
    block_size: Option<u32>,
    uuid: Option<String>,
    /// sluice: O_DIRECT (default: when the filesystem allows it).
    direct: Option<bool>,
    /// sluice: open read-only.
    #[serde(default)]
    readonly: bool,
    /// sluice: image locks as QEMU's `locking` (default `auto`: on).
    locking: Option<String>,
}

fn bdev_uring_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: UringCreate = p.parse()?;
    let locking = locking_param(a.locking.as_deref())?;
    if svc.graph.nodes().contains(&a.name) {
        return Err(BdevError::Exists(a.name).into());
    }
    let o = FileOpts {
        block_size: a.block_size,
        direct: a.direct,
        read_only: a.readonly,
        uuid: a.uuid,
        locking,
        force_share: false,
    };
    let b: Arc<dyn Bdev> = open_file(&a.name, &a.filename, o)?;
    Ok(Value::String(register_bdev(svc, b)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AioCreate {
    name: String,
    filename: String,
    block_size: Option<u32>,
    #[serde(default)]
    readonly: bool,
    /// Unmap and write-zeroes through fallocate: the uring bdev always offers them.
    #[serde(default)]
    #[allow(dead_code)]
    fallocate: bool,
    uuid: Option<String>,
    nowait: Option<bool>,
}

fn bdev_aio_create(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let a: AioCreate = p.parse()?;
    neutral("nowait", &a.nowait)?;
    if svc.graph.nodes().contains(&a.name) {
        return Err(BdevError::Exists(a.name).into());
    }
    let o = FileOpts {
        block_size: a.block_size,
        direct: None,
        read_only: a.readonly,
        uuid: a.uuid,
        locking: LockMode::Auto,
        force_share: false,
    };
    let b: Arc<dyn Bdev> = open_file(&a.name, &a.filename, o)?;
    Ok(Value::String(register_bdev(svc, b)?))
}
