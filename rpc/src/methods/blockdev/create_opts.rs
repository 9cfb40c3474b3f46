//! Reading `blockdev-create {job-id, options}` the way QEMU's QAPI visitor
//! does (`BlockdevCreateOptions`, a union on `driver`), with its error texts.
//! What QEMU checks inside the job (sizes, cluster sizes, versions) is left
//! to the job, so that it fails the job as QEMU's does.

use super::args::{bad_type, bad_value, missing, Args};
use super::spec::{self, Kind};
use crate::error::RpcError;
use serde_json::Value;

/// QEMU's `PreallocMode` values.
const PREALLOC: [&str; 4] = ["off", "metadata", "falloc", "full"];

/// Drivers sluice serves as nodes that have no `blockdev-create` in QEMU.
const SERVED_NO_CREATE: [&str; 3] = ["host_device", "null-co", "raw"];

/// Whether QEMU 10 knows `d` as a driver without a `blockdev-create` of its
/// own (the visitor accepts it, the command refuses it).
fn no_create(d: &str) -> bool {
    (SERVED_NO_CREATE.contains(&d) || spec::OTHER_DRIVERS.contains(&d))
        && !OTHER_CREATE.contains(&d)
}

/// QEMU drivers with a `blockdev-create` that sluice does not write.
const OTHER_CREATE: [&str; 7] = ["gluster", "nfs", "rbd", "ssh", "vhdx", "vmdk", "vpc"];

/// Where a qcow2 image is written.
#[derive(Debug, Clone)]
pub(super) enum FileRef {
    /// A node by name.
    Named(String),
    /// A nested `{driver: file, filename}`: opened for the creation only.
    Path(String),
}

/// `BlockdevCreateOptionsFile`.
#[derive(Debug, Clone)]
pub(super) struct FileCreate {
    pub filename: String,
    pub size: u64,
    pub preallocation: String,
}

/// `BlockdevCreateOptionsQcow2` (the members sluice reads).
#[derive(Debug, Clone)]
pub(super) struct Qcow2Create {
    pub file: FileRef,
    pub size: u64,
    /// `v2` or `v3`; absent: v3.
    pub version: Option<String>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub cluster_size: Option<u64>,
    pub preallocation: String,
    pub lazy_refcounts: bool,
    pub refcount_bits: Option<u64>,
    pub compression_type: Option<String>,
    pub extended_l2: bool,
}

/// What a `blockdev-create` job makes.
#[derive(Debug, Clone)]
pub(super) enum CreateSpec {
    /// A file of the host.
    File(FileCreate),
    /// A qcow2 image on a node.
    Qcow2(Qcow2Create),
}

/// The parsed command.
#[derive(Debug, Clone)]
pub(super) struct Command {
    pub job_id: String,
    pub spec: CreateSpec,
}

/// A `size`: QAPI's `uint64` (a negative number wraps, as QEMU's visitor
/// lets it through and the creation fails on it).
fn read_size(a: &mut Args, k: &str) -> Result<Option<u64>, RpcError> {
    match a.any(k) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(i)) => Ok(Some(i as u64)),
            _ => Err(RpcError::invalid_params(format!(
                "Parameter '{}' expects uint64",
                a.path(k)
            ))),
        },
        Some(_) => Err(RpcError::invalid_params(format!(
            "Parameter '{}' expects uint64",
            a.path(k)
        ))),
    }
}

/// An enum member: QEMU names the member without its prefix in this error.
fn enumeration(a: &mut Args, k: &str, values: &[&str]) -> Result<Option<String>, RpcError> {
    match a.str(k)? {
        Some(s) if !values.contains(&s.as_str()) => Err(bad_value(k, &s)),
        r => Ok(r),
    }
}

/// Parses the command's arguments.
pub(super) fn parse(v: &Value) -> Result<Command, RpcError> {
    let mut top = Args::new(v, "")?;
    let job_id = top.req_str("job-id")?;
    let opts = top.any("options").ok_or_else(|| missing("options"))?;
    let mut a = Args::new(opts, "options.")?;
    let driver = a.req_str("driver")?;
    let spec = match driver.as_str() {
        "file" => CreateSpec::File(parse_file(&mut a)?),
        "qcow2" => CreateSpec::Qcow2(parse_qcow2(&mut a)?),
        d if no_create(d) => {
            a.finish(&[])?;
            top.finish(&[])?;
            return Err(RpcError::errno(
                libc::ENOTSUP,
                "Driver does not support blockdev-create",
            ));
        }
        d if OTHER_CREATE.contains(&d) => {
            return Err(RpcError::errno(
                libc::ENOTSUP,
                format!("sluice does not create images of the driver '{d}'"),
            ));
        }
        d => return Err(bad_value("driver", d)),
    };
    top.finish(&[])?;
    Ok(Command { job_id, spec })
}

fn parse_file(a: &mut Args) -> Result<FileCreate, RpcError> {
    let filename = a.req_str("filename")?;
    let size = read_size(a, "size")?.ok_or_else(|| missing(&a.path("size")))?;
    let preallocation = enumeration(a, "preallocation", &PREALLOC)?.unwrap_or("off".into());
    // Copy-on-write is a file system's business; QEMU ignores it where
    // unsupported, and so does sluice.
    a.bool("nocow")?;
    a.finish(&["extent-size-hint"])?;
    Ok(FileCreate {
        filename,
        size,
        preallocation,
    })
}

fn parse_file_ref(a: &mut Args) -> Result<FileRef, RpcError> {
    let path = a.path("file");
    match a.any("file") {
        None => Err(missing(&path)),
        Some(Value::String(s)) => Ok(FileRef::Named(s.clone())),
        Some(o @ Value::Object(_)) => {
            let spec = spec::parse(o, &format!("{path}."), None)?;
            match spec.kind {
                Kind::File { filename, .. } if spec.common.node_name.is_none() => {
                    Ok(FileRef::Path(filename))
                }
                _ => Err(RpcError::errno(
                    libc::ENOTSUP,
                    format!(
                        "sluice creates a qcow2 image in a nested '{path}' only of the driver 'file' without a node-name; add the node first"
                    ),
                )),
            }
        }
        // QEMU names the alternate without its prefix.
        Some(_) => Err(bad_type("file", "BlockdevRef")),
    }
}

fn parse_qcow2(a: &mut Args) -> Result<Qcow2Create, RpcError> {
    let file = parse_file_ref(a)?;
    let extended_l2 = a.bool("extended-l2")?.unwrap_or(false);
    let size = read_size(a, "size")?.ok_or_else(|| missing(&a.path("size")))?;
    let version = enumeration(a, "version", &["v2", "v3"])?;
    let backing_file = a.str("backing-file")?;
    let backing_fmt = a.str("backing-fmt")?;
    let cluster_size = read_size(a, "cluster-size")?;
    let preallocation = enumeration(a, "preallocation", &PREALLOC)?.unwrap_or("off".into());
    let lazy_refcounts = a.bool("lazy-refcounts")?.unwrap_or(false);
    let refcount_bits = a.uint("refcount-bits")?;
    let compression_type = enumeration(a, "compression-type", &["zlib", "zstd"])?;
    a.finish(&["data-file", "data-file-raw", "encrypt"])?;
    Ok(Qcow2Create {
        file,
        size,
        version,
        backing_file,
        backing_fmt,
        cluster_size,
        preallocation,
        lazy_refcounts,
        refcount_bits,
        compression_type,
        extended_l2,
    })
}
