//! QEMU's mirror commands: `blockdev-mirror` (target a node),
//! `drive-mirror` (target a file this command creates, `mode:
//! absolute-paths`, or opens, `existing`) and `block-job-change` (a
//! mirror's copy mode), parsed with QEMU's QAPI argument errors, then
//! `jobs::drivers::mirror`. The job's events and queries are rendered by
//! `job_qapi` like every job's.

use super::blockdev::args::{check_node_name, Args};
use super::common::register_bdev;
use super::nodes::{self, FileOpts, Open};
use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use bdev::lock::LockMode;
use bdev::qcow2::{self, CreateOptions};
use graph::node;
use jobs::drivers::mirror::{self, CopyMode, MirrorParams, SyncMode};
use jobs::job::{BlockJobArgs, JobError, OnError};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Registers the methods.
pub fn register(t: &mut MethodTable) {
    t.add("blockdev-mirror", blockdev_mirror);
    t.add("drive-mirror", drive_mirror);
    t.add("block-job-change", block_job_change);
}

const SYNC: [&str; 5] = ["top", "full", "none", "incremental", "bitmap"];
const ON_ERROR: [&str; 5] = ["report", "ignore", "enospc", "stop", "auto"];
const COPY_MODE: [&str; 2] = ["background", "write-blocking"];

fn params(p: Params) -> Value {
    match p.0 {
        None | Some(Value::Null) => json!({}),
        Some(v) => v,
    }
}

fn on_error(a: &mut Args, k: &str) -> Result<Option<OnError>, RpcError> {
    Ok(a.enumeration(k, &ON_ERROR)?
        .and_then(|s| OnError::parse(&s)))
}

/// The members after `sync` common to both mirror commands, in schema
/// order from `speed` (`drive-mirror` reads `mode` before them).
fn common_tail(a: &mut Args, m: &mut MirrorParams) -> Result<(), RpcError> {
    m.job.speed = a.int("speed")?.unwrap_or(0);
    m.granularity = a.uint("granularity")?.unwrap_or(0);
    m.buf_size = a.int("buf-size")?.unwrap_or(0);
    Ok(())
}

fn blockdev_mirror(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = params(p);
    let mut a = Args::new(&v, "")?;
    let mut m = MirrorParams {
        job: BlockJobArgs {
            job_id: a.str("job-id")?,
            ..Default::default()
        },
        device: a.req_str("device")?,
        target: a.req_str("target")?,
        replaces: a.str("replaces")?,
        ..Default::default()
    };
    let sync = a
        .enumeration("sync", &SYNC)?
        .ok_or_else(|| super::blockdev::args::missing("sync"))?;
    m.sync = SyncMode::parse(&sync).unwrap_or_default();
    common_tail(&mut a, &mut m)?;
    m.on_source = on_error(&mut a, "on-source-error")?;
    m.on_target = on_error(&mut a, "on-target-error")?;
    // The mirror_top node shown above the source while the job runs.
    m.job.filter_node_name = a.str("filter-node-name")?;
    m.write_blocking = a.enumeration("copy-mode", &COPY_MODE)?.as_deref() == Some("write-blocking");
    m.job.auto_finalize = a.bool("auto-finalize")?;
    m.job.auto_dismiss = a.bool("auto-dismiss")?;
    a.finish(&[])?;
    // QEMU's blockdev-mirror zeroes the target of a full mirror.
    m.zero_target = m.sync == SyncMode::Full;
    mirror::start(&svc.graph, &svc.jobs, &svc.rt, m, svc.tuning)?;
    Ok(json!({}))
}

/// `block-job-change`: `id`, `type` (the union's tag), and for `mirror`
/// its `copy-mode`. Only background -> write-blocking is implemented, as in
/// QEMU; like QEMU 10, a job is changed with the mirror's options whatever
/// `type` says.
fn block_job_change(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = params(p);
    let mut a = Args::new(&v, "")?;
    let id = a.req_str("id")?;
    let ty = a.req_str("type")?;
    let mode = if ty == "mirror" {
        Some(
            a.enumeration("copy-mode", &COPY_MODE)?
                .ok_or_else(|| super::blockdev::args::missing("copy-mode"))?,
        )
    } else {
        None
    };
    a.finish(&[])?;
    let job = svc.jobs.block_job(&id)?;
    let Some(cm) = job.ext::<CopyMode>() else {
        // Jobs without a change handler accept any change (QEMU's).
        return Ok(json!({}));
    };
    let want_blocking = mode.as_deref() == Some("write-blocking");
    if want_blocking {
        cm.set_write_blocking();
    } else if cm.write_blocking() {
        return Err(JobError::Refused(
            "Change to copy mode 'background' is not implemented".into(),
        )
        .into());
    }
    Ok(json!({}))
}

/// Names of the target nodes `drive-mirror` opens without a `node-name`.
static NEXT_TARGET: AtomicU64 = AtomicU64::new(1);

/// `drive-mirror`: QEMU's `qmp_drive_mirror`. The target image is created
/// (`absolute-paths`, the default: the source's size and, for `sync: top`,
/// the source's backing file as its backing; for `none`, the source
/// itself) or opened (`existing`), registered as a node (`node-name`, or a
/// name of its own), and mirrored onto like `blockdev-mirror`'s. The node
/// is released when the job ends unless a device moved onto it; if the
/// job cannot start it is closed at once (the created file stays, as QEMU
/// leaves it).
fn drive_mirror(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let v = params(p);
    let mut a = Args::new(&v, "")?;
    let mut m = MirrorParams {
        job: BlockJobArgs {
            job_id: a.str("job-id")?,
            ..Default::default()
        },
        device: a.req_str("device")?,
        target: a.req_str("target")?,
        ..Default::default()
    };
    let format = a.str("format")?;
    let node_name = a.str("node-name")?;
    m.replaces = a.str("replaces")?;
    let sync = a
        .enumeration("sync", &SYNC)?
        .ok_or_else(|| super::blockdev::args::missing("sync"))?;
    m.sync = SyncMode::parse(&sync).unwrap_or_default();
    let existing = a
        .enumeration("mode", &["existing", "absolute-paths"])?
        .as_deref()
        == Some("existing");
    common_tail(&mut a, &mut m)?;
    m.on_source = on_error(&mut a, "on-source-error")?;
    m.on_target = on_error(&mut a, "on-target-error")?;
    a.bool("unmap")?;
    m.write_blocking = a.enumeration("copy-mode", &COPY_MODE)?.as_deref() == Some("write-blocking");
    m.job.auto_finalize = a.bool("auto-finalize")?;
    m.job.auto_dismiss = a.bool("auto-dismiss")?;
    a.finish(&[])?;

    let _g = svc.graph.change();
    let (source, _) = mirror::source_of(&svc.graph, &svc.jobs, &m.device, None)?;
    let format = match format {
        Some(f) => f,
        None if existing => "qcow2".to_string(),
        None => node::format_of(&source),
    };
    if m.replaces.is_some() && node_name.is_none() {
        return Err(RpcError::invalid_params(
            "a node-name must be provided when replacing a named node of the graph",
        ));
    }
    // The image's backing: the source's backing (top), the source (none).
    let backing = match m.sync {
        SyncMode::Top => node::backing_of(&source),
        SyncMode::None => Some(source.clone()),
        _ => None,
    };
    if m.sync == SyncMode::Top && backing.is_none() {
        m.sync = SyncMode::Full;
    }
    if !matches!(format.as_str(), "qcow2" | "raw") {
        return Err(RpcError::invalid_params(format!(
            "Unknown file format '{format}'"
        )));
    }
    let path = m.target.clone();
    if existing {
        if let Err(e) = std::fs::metadata(&path) {
            return Err(RpcError::invalid_params(format!(
                "Could not open '{path}': {}",
                strerror(&e)
            )));
        }
    } else {
        create_image(svc, &path, &format, source.size(), backing.as_ref())?;
    }
    let name = match node_name {
        Some(n) => {
            check_node_name(&n)?;
            n
        }
        None => format!("#mirror{}", NEXT_TARGET.fetch_add(1, Ordering::Relaxed)),
    };
    if svc.graph.nodes().contains(&name) {
        return Err(RpcError::invalid_params(format!(
            "Duplicate nodes with node-name='{name}'"
        )));
    }
    // The target is opened in the source's cache mode (QEMU opens it with
    // the source's flags).
    let direct = source
        .as_any()
        .downcast_ref::<qcow2::Qcow2Bdev>()
        .and_then(|q| q.base().config())
        .and_then(|c| c["params"]["direct"].as_bool());
    if format == "qcow2" {
        nodes::open(
            svc,
            Open {
                node_name: Some(name.clone()),
                filename: Some(path.clone()),
                direct,
                backing: backing
                    .as_ref()
                    .filter(|_| !existing)
                    .map(|b| b.name().to_string()),
                no_backing: backing.is_none() && !existing,
                ..Open::default()
            },
        )?;
    } else {
        let f = nodes::open_file(
            &name,
            &path,
            FileOpts {
                block_size: None,
                direct,
                read_only: false,
                uuid: None,
                locking: LockMode::Auto,
                force_share: false,
            },
        )?;
        register_bdev(svc, f)?;
    }
    // QEMU zeroes the target of a full mirror unless it is new (and so
    // reads as zeroes).
    m.zero_target = m.sync == SyncMode::Full && existing;
    m.release_target = true;
    m.target = name.clone();
    drop(_g);
    if let Err(e) = mirror::start(&svc.graph, &svc.jobs, &svc.rt, m, svc.tuning) {
        if let Ok(b) = svc.graph.nodes().get(&name) {
            let _ = nodes::delete_node(svc, b);
        }
        return Err(e.into());
    }
    Ok(json!({}))
}

fn strerror(e: &std::io::Error) -> String {
    jobs::copy::strerror(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Creates the target image file (QEMU's `bdrv_img_create`).
fn create_image(
    svc: &Service,
    path: &str,
    format: &str,
    size: u64,
    backing: Option<&std::sync::Arc<dyn bdev::Bdev>>,
) -> Result<(), RpcError> {
    let could_not = |e: std::io::Error| {
        RpcError::invalid_params(format!("Could not create '{path}': {}", strerror(&e)))
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(could_not)?;
    if format == "raw" {
        return f.set_len(size).map_err(could_not);
    }
    drop(f);
    let opts = CreateOptions {
        backing_file: backing.map(node::filename_of),
        backing_format: backing.map(node::format_of),
        ..CreateOptions::new(size)
    };
    let p = Path::new(path).to_path_buf();
    svc.rt
        .spawn_on(0, move || async move {
            qcow2::create_file_locking(&p, &opts, LockMode::Auto).await
        })
        .block()??;
    Ok(())
}
