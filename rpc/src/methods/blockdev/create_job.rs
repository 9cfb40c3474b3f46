//! QEMU's `blockdev-create` as a job of type `create` (`block/create.c`):
//! created and running before the command returns, then waiting, pending and
//! concluded (auto-finalize on, auto-dismiss off: the client dismisses it),
//! or aborting and concluded with the error in `query-jobs`. Progress is 0/1
//! then 1/1, as QEMU's.
//!
//! The job runs on a thread of its own: the host file is created there, the
//! qcow2 image is written on a reactor through `bdev::qcow2::create` /
//! `create_file`, and a monitor-owned file node written through its path is
//! reopened at its new length. The RPC thread only parses and starts it.

use super::create::{could_not_open, format_user, not_found, restore_file_node};
use super::create_opts::{self, CreateSpec, FileCreate, FileRef, Qcow2Create};
use super::spec::Driver;
use super::state;
use crate::error::RpcError;
use crate::service::Service;
use bdev::lock::ImageLock;
use bdev::qcow2::{self, CreateOptions};
use bdev::uring::UringBdev;
use bdev::Bdev;
use graph::Graph;
use jobs::job::{Job, JobSpec, JobType, OnError};
use serde_json::Value;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The reactor the image is written on.
const REACTOR: usize = 0;

/// `blockdev-create`: parses, creates the job (created, running) and starts
/// its thread.
pub(super) fn start(svc: &Service, v: &Value) -> Result<(), RpcError> {
    let cmd = create_opts::parse(v)?;
    let job = svc.jobs.create(JobSpec {
        id: cmd.job_id.clone(),
        job_type: JobType::Create,
        device: cmd.job_id.clone(),
        speed: 0,
        on_error: OnError::Report,
        auto_finalize: true,
        auto_dismiss: false,
        legacy: false,
        nodes: Vec::new(),
    })?;
    job.set_len(1);
    job.start();
    let g = svc.graph.clone();
    let j = job.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("create {}", cmd.job_id))
        .spawn(move || run(&j, &g, &cmd.spec));
    if let Err(e) = spawned {
        let msg = format!("starting the job: {e}");
        futures::executor::block_on(job.complete(Some(msg.clone()), |_| async { Ok(()) }));
        return Err(RpcError::internal(msg));
    }
    Ok(())
}

fn run(job: &Arc<Job>, g: &Graph, spec: &CreateSpec) {
    let r = {
        // No node is added or deleted under the creation.
        let _g = g.change();
        match spec {
            CreateSpec::File(f) => create_host_file(f),
            CreateSpec::Qcow2(q) => create_qcow2(g, q),
        }
    };
    job.add_progress(1);
    match &r {
        Ok(()) => tracing::info!(job = job.id(), "blockdev-create done"),
        Err(e) => tracing::warn!(job = job.id(), "blockdev-create failed: {e}"),
    }
    futures::executor::block_on(job.complete(r.err(), |_| async { Ok(()) }));
}

fn errno_desc(e: &std::io::Error) -> &'static str {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)).desc()
}

/// A creation's error as the job reports it: a lock conflict in QEMU's
/// words without the hint (QEMU's job error carries none).
fn job_error(e: bdev::BdevError) -> String {
    match e {
        bdev::BdevError::Locked { message, .. } => message,
        e => e.to_string(),
    }
}

/// file-posix's `raw_co_create`: open (creating), lock, clear, size.
fn create_host_file(f: &FileCreate) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&f.filename)
        .map_err(|e| format!("Could not create '{}': {}", f.filename, errno_desc(&e)))?;
    // Held until the file is cleared and sized: a file a node has open
    // (here or in another process) holds lock bytes, so it is refused and
    // left untouched, as QEMU finds it.
    let _lock = ImageLock::for_create(&file, Path::new(&f.filename)).map_err(job_error)?;
    if f.preallocation != "off" {
        return Err(format!(
            "Unsupported preallocation mode: {}",
            f.preallocation
        ));
    }
    file.set_len(0)
        .map_err(|e| format!("Could not clear file: {}", errno_desc(&e)))?;
    file.set_len(f.size)
        .map_err(|e| format!("Could not resize file: {}", errno_desc(&e)))?;
    Ok(())
}

/// `qcow2_co_create`'s option checks, in its order and words.
fn validate(q: &Qcow2Create) -> Result<CreateOptions, String> {
    const V3: &str = "(use version=v3 or greater)";
    if !q.size.is_multiple_of(512) {
        return Err("Image size must be a multiple of 512 bytes".into());
    }
    let version = if q.version.as_deref() == Some("v2") {
        2
    } else {
        3
    };
    let cs = q.cluster_size.unwrap_or(65536);
    if q.extended_l2 && version < 3 {
        return Err(format!(
            "Extended L2 entries are only supported with compatibility level 1.1 and above {V3}"
        ));
    }
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if q.extended_l2 && cs < 16384 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    if q.backing_file.is_some() && q.preallocation != "off" && !q.extended_l2 {
        return Err(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                .into(),
        );
    }
    if q.backing_fmt.is_some() && q.backing_file.is_none() {
        return Err("Backing format cannot be used without backing file".into());
    }
    if q.lazy_refcounts && version < 3 {
        return Err(format!(
            "Lazy refcounts only supported with compatibility level 1.1 and above {V3}"
        ));
    }
    let rb = q.refcount_bits.unwrap_or(16);
    if rb > 64 || !rb.is_power_of_two() {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if version < 3 && rb != 16 {
        return Err(format!(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above {V3}"
        ));
    }
    let ctype = q.compression_type.clone().unwrap_or("zlib".into());
    if version < 3 && ctype != "zlib" {
        return Err(format!(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above {V3}"
        ));
    }
    // What QEMU writes and sluice does not.
    if q.lazy_refcounts {
        return Err("sluice does not write images with lazy refcounts".into());
    }
    if q.extended_l2 {
        return Err("sluice does not write images with extended L2 entries".into());
    }
    if q.preallocation != "off" {
        return Err(format!(
            "Unsupported preallocation mode: {}",
            q.preallocation
        ));
    }
    Ok(CreateOptions {
        cluster_size: cs,
        version,
        refcount_bits: rb as u32,
        backing_file: q.backing_file.clone(),
        backing_format: q.backing_fmt.clone(),
        compression_type: ctype,
        ..CreateOptions::new(q.size)
    })
}

/// Where the image goes, once the file reference is resolved.
enum Target {
    /// A file written through its path (nested `file`, or a monitor-owned
    /// file node nothing uses: `node` is reopened afterwards).
    Path {
        path: PathBuf,
        node: Option<state::Record>,
    },
    /// A node of fixed size written in place.
    Node(Arc<dyn Bdev>),
}

/// The node `n` as a target, after QEMU's permission checks (the job's
/// BlockBackend takes write and resize, sharing everything).
fn node_target(g: &Graph, n: &str) -> Result<Target, String> {
    let b = g.nodes().get(n).map_err(|_| not_found(n).message)?;
    if let Some(user) = format_user(g, n) {
        return Err(format!(
            "Permission conflict on node '{n}': permissions 'write, resize' are both required by an unnamed block device (uses node '{n}' as 'root' child) and unshared by node '{user}' (uses node '{n}' as 'file' child)."
        ));
    }
    let users = state::user_claims(g, n);
    if !users.is_empty() {
        return Err(format!(
            "Node '{n}' is in use ({}): sluice writes an image only onto a node nothing else uses",
            users.join(", ")
        ));
    }
    if b.read_only() {
        return Err("Block node is read-only".into());
    }
    let rec = state::record(g, n).filter(|r| r.driver == Driver::File);
    match (rec, b.as_any().downcast_ref::<UringBdev>()) {
        (Some(rec), Some(u)) => Ok(Target::Path {
            path: u.path().to_path_buf(),
            node: Some(rec),
        }),
        _ => Ok(Target::Node(b)),
    }
}

fn create_qcow2(g: &Graph, q: &Qcow2Create) -> Result<(), String> {
    let rt = g.rt();
    // QEMU opens the file reference before it checks the options.
    match &q.file {
        FileRef::Named(n) if !g.nodes().contains(n) => return Err(not_found(n).message),
        FileRef::Path(p) => {
            if let Err(e) = std::fs::metadata(p) {
                return Err(could_not_open(p, &e).message);
            }
        }
        FileRef::Named(_) => {}
    }
    let opts = validate(q)?;
    let target = match &q.file {
        FileRef::Named(n) => node_target(g, n)?,
        FileRef::Path(p) => Target::Path {
            path: PathBuf::from(p),
            node: None,
        },
    };
    let joined = |r: Result<Result<(), bdev::BdevError>, reactor::JoinError>| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(job_error(e)),
        Err(e) => Err(e.to_string()),
    };
    match target {
        Target::Node(b) => joined(
            rt.spawn_on(
                REACTOR,
                move || async move { qcow2::create(b, &opts).await },
            )
            .block(),
        ),
        Target::Path { path, node } => {
            // The file node's own lock would refuse the creation: the node
            // is closed first and reopened at the file's new length.
            if let Some(rec) = &node {
                close_file_node(g, rec)?;
            }
            let r = joined(
                rt.spawn_on(REACTOR, {
                    let path = path.clone();
                    move || async move { qcow2::create_file(&path, &opts).await }
                })
                .block(),
            );
            if let Some(rec) = node {
                restore_file_node(g, &rec);
            }
            r
        }
    }
}

/// Closes a monitor-owned file node (ending its lock) so that its file can be
/// written through its path; `restore_file_node` reopens it at its new size.
fn close_file_node(g: &Graph, rec: &state::Record) -> Result<(), String> {
    g.nodes().release(&rec.name, &bdev::Holder::Monitor);
    if let Err(e) = g.delete(&rec.name) {
        let _ = g.nodes().claim(&rec.name, bdev::Claim::monitor());
        return Err(format!("closing the file node '{}': {e}", rec.name));
    }
    Ok(())
}
