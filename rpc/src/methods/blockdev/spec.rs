//! `BlockdevOptions` as sluice serves them: parsed and checked in full before
//! anything is opened, so a refused `blockdev-add` leaves nothing behind.

use super::args::{bad_type, bad_value, missing, Args};
use crate::error::RpcError;
use bdev::lock::LockMode;
use bdev::qcow2::{CacheOptions, OverlapChecks};
use serde_json::Value;

pub use graph::monitor::Driver;

/// QEMU 10's `BlockdevDriver` values sluice does not serve: refused as
/// unsupported rather than unknown.
pub(super) const OTHER_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nfs",
    "null-aio",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qed",
    "quorum",
    "replication",
    "ssh",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Options every node has (`BlockdevOptionsBase`).
#[derive(Debug, Clone, Default)]
pub struct Common {
    pub node_name: Option<String>,
    pub read_only: Option<bool>,
    pub auto_read_only: bool,
    pub direct: Option<bool>,
    /// QEMU's `force-share` (inherited by nested nodes and, for an image, by
    /// the backing files it opens): a read-only node whose lock shares
    /// everything.
    pub force_share: bool,
}

/// A `BlockdevRef`: an existing node by name, or a nested definition.
#[derive(Debug, Clone)]
pub enum NodeRef {
    Named(String),
    Nested(Box<NodeSpec>),
}

/// A qcow2 node's `backing`.
#[derive(Debug, Clone)]
pub enum Backing {
    /// Omitted: the chain the header names.
    FromHeader,
    /// `null`: no backing.
    None,
    /// An existing node.
    Named(String),
}

/// The driver-specific options.
#[derive(Debug, Clone)]
pub enum Kind {
    File {
        filename: String,
        /// QEMU's `locking` (image locks, see `bdev::lock`).
        locking: LockMode,
    },
    Qcow2 {
        file: NodeRef,
        backing: Backing,
        overlap: OverlapChecks,
        cache: CacheOptions,
    },
    Raw {
        file: NodeRef,
    },
    NullCo {
        size: u64,
        read_zeroes: bool,
    },
    Nbd {
        config: nbd::client::ClientConfig,
    },
    Rbd {
        config: rbd::RbdConfig,
    },
    Throttle {
        file: String,
        group: String,
    },
}

/// One node to create.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub driver: Driver,
    pub common: Common,
    pub kind: Kind,
}

/// Options of the base that sluice accepts with no effect (see docs/streaming.md).
const DISCARD: &[&str] = &["ignore", "unmap"];
const DETECT_ZEROES: &[&str] = &["off", "on", "unmap"];

fn common(a: &mut Args, inherited: Option<&Common>) -> Result<Common, RpcError> {
    let node_name = a.str("node-name")?;
    a.enumeration("discard", DISCARD)?;
    let direct = match a.any("cache") {
        None => inherited.and_then(|c| c.direct),
        Some(v) => {
            let mut c = Args::new(v, &a.path("cache."))?;
            let direct = c.bool("direct")?;
            if c.bool("no-flush")? == Some(true) {
                return Err(RpcError::errno(
                    libc::ENOTSUP,
                    format!(
                        "Parameter '{}' is not supported by sluice (flushes always reach the disk)",
                        c.path("no-flush")
                    ),
                ));
            }
            c.finish(&[])?;
            direct.or(inherited.and_then(|c| c.direct))
        }
    };
    let read_only = a.bool("read-only")?.or(inherited.and_then(|c| c.read_only));
    let auto_read_only = a
        .bool("auto-read-only")?
        .unwrap_or(inherited.is_some_and(|c| c.auto_read_only));
    let force_share = a
        .bool("force-share")?
        .unwrap_or(inherited.is_some_and(|c| c.force_share));
    if force_share && read_only != Some(true) {
        return Err(RpcError::errno(
            libc::EINVAL,
            "force-share=on can only be used with read-only images",
        ));
    }
    if let Some(d) = a.enumeration("detect-zeroes", DETECT_ZEROES)? {
        if d != "off" {
            return Err(RpcError::errno(
                libc::ENOTSUP,
                format!(
                    "Parameter '{}' is not supported by sluice with value '{d}' (only 'off')",
                    a.path("detect-zeroes")
                ),
            ));
        }
    }
    if a.bool("active")? == Some(false) {
        return Err(RpcError::errno(
            libc::ENOTSUP,
            format!(
                "Parameter '{}' is not supported by sluice with value false",
                a.path("active")
            ),
        ));
    }
    Ok(Common {
        node_name,
        read_only,
        auto_read_only,
        direct,
        force_share,
    })
}

fn node_ref(a: &mut Args, k: &str, parent: &Common) -> Result<NodeRef, RpcError> {
    match a.any(k) {
        None => Err(missing(&a.path(k))),
        Some(Value::String(s)) => Ok(NodeRef::Named(s.clone())),
        Some(v @ Value::Object(_)) => {
            let child = parse(v, &a.path(&format!("{k}.")), Some(parent))?;
            if !matches!(
                child.driver,
                Driver::File | Driver::HostDevice | Driver::NullCo
            ) {
                return Err(RpcError::errno(
                    libc::ENOTSUP,
                    format!(
                        "Parameter '{}' is not supported by sluice with driver '{}' (only 'file', 'host_device' and 'null-co' nest; add the node first and name it)",
                        a.path(k),
                        child.driver.as_str()
                    ),
                ));
            }
            Ok(NodeRef::Nested(Box::new(child)))
        }
        Some(_) => Err(bad_type(&a.path(k), "BlockdevRef")),
    }
}

const FILE_UNSUPPORTED: &[&str] = &["pr-manager", "x-check-cache-dropped"];
const QCOW2_UNSUPPORTED: &[&str] = &[
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "encrypt",
    "data-file",
];

/// Parses the options of one node found at `prefix` (`""`: the top level).
/// `inherited`: the parent's options that children inherit (cache, read-only).
pub fn parse(v: &Value, prefix: &str, inherited: Option<&Common>) -> Result<NodeSpec, RpcError> {
    let mut a = Args::new(v, prefix)?;
    let driver = match a.any("driver") {
        None => return Err(missing(&a.path("driver"))),
        Some(Value::String(s)) => match s.as_str() {
            "file" => Driver::File,
            "host_device" => Driver::HostDevice,
            "qcow2" => Driver::Qcow2,
            "raw" => Driver::Raw,
            "null-co" => Driver::NullCo,
            "nbd" => Driver::Nbd,
            "rbd" => Driver::Rbd,
            "throttle" => Driver::Throttle,
            d if OTHER_DRIVERS.contains(&d) => {
                return Err(RpcError::errno(
                    libc::ENOTSUP,
                    format!("Driver '{d}' is not supported by sluice"),
                ))
            }
            d => return Err(bad_value(&a.path("driver"), d)),
        },
        Some(_) => return Err(bad_type(&a.path("driver"), "string")),
    };
    let common = common(&mut a, inherited)?;
    let (kind, unsupported): (Kind, &[&str]) = match driver {
        Driver::File | Driver::HostDevice => {
            let filename = a.req_str("filename")?;
            // io_uring serves every file: the choice of engine has nothing
            // to select.
            a.enumeration("aio", &["threads", "native", "io_uring"])?;
            a.uint("aio-max-batch")?;
            let locking = a
                .enumeration("locking", &["auto", "on", "off"])?
                .and_then(|l| LockMode::parse(&l))
                .unwrap_or_default();
            a.bool("drop-cache")?;
            (Kind::File { filename, locking }, FILE_UNSUPPORTED)
        }
        Driver::NullCo => {
            let size = a.uint("size")?.unwrap_or(1 << 30);
            if a.uint("latency-ns")?.is_some_and(|l| l != 0) {
                return Err(RpcError::errno(
                    libc::ENOTSUP,
                    format!(
                        "Parameter '{}' is not supported by sluice (only 0)",
                        a.path("latency-ns")
                    ),
                ));
            }
            let read_zeroes = a.bool("read-zeroes")?.unwrap_or(false);
            (Kind::NullCo { size, read_zeroes }, &[])
        }
        Driver::Nbd => {
            let mut m = serde_json::Map::new();
            for k in [
                "server",
                "export",
                "reconnect-delay",
                "open-timeout",
                "tls-creds",
                "tls-hostname",
            ] {
                if let Some(v) = a.any(k) {
                    m.insert(k.into(), v.clone());
                }
            }
            let config = nbd::client::ClientConfig::from_options(&m)
                .map_err(|e| RpcError::invalid_params(prefix_param(&e, prefix)))?;
            (Kind::Nbd { config }, &["x-dirty-bitmap"])
        }
        Driver::Rbd => {
            let mut m = serde_json::Map::new();
            for k in rbd::cluster::BLOCKDEV_OPTIONS {
                if let Some(v) = a.any(k) {
                    m.insert(k.to_string(), v.clone());
                }
            }
            let config = rbd::RbdConfig::from_options(&m)
                .map_err(|e| RpcError::invalid_params(prefix_param(&e, prefix)))?;
            (Kind::Rbd { config }, &["encrypt", "key-secret"])
        }
        Driver::Throttle => {
            let group = a.req_str("throttle-group")?;
            let file = match node_ref(&mut a, "file", &common)? {
                NodeRef::Named(n) => n,
                NodeRef::Nested(_) => {
                    return Err(RpcError::errno(
                        libc::ENOTSUP,
                        format!(
                            "Parameter '{}' is not supported by sluice as a nested definition (add the node first and name it)",
                            a.path("file")
                        ),
                    ))
                }
            };
            (Kind::Throttle { file, group }, &[])
        }
        Driver::Raw => {
            let file = node_ref(&mut a, "file", &common)?;
            (Kind::Raw { file }, &["offset", "size"])
        }
        Driver::Qcow2 => {
            let file = node_ref(&mut a, "file", &common)?;
            let backing = match a.any("backing") {
                None => Backing::FromHeader,
                Some(Value::Null) => Backing::None,
                Some(Value::String(s)) => Backing::Named(s.clone()),
                Some(Value::Object(_)) => {
                    return Err(RpcError::errno(
                        libc::ENOTSUP,
                        format!(
                            "Parameter '{}' is not supported by sluice as a nested definition (add the node first and name it)",
                            a.path("backing")
                        ),
                    ))
                }
                Some(_) => return Err(bad_type(&a.path("backing"), "BlockdevRefOrNull")),
            };
            let overlap = overlap_check(&mut a)?;
            let cache = CacheOptions {
                cache_size: size(&mut a, "cache-size")?,
                l2_cache_size: size(&mut a, "l2-cache-size")?,
                refcount_cache_size: size(&mut a, "refcount-cache-size")?,
                l2_cache_entry_size: size(&mut a, "l2-cache-entry-size")?,
                cache_clean_interval: a.int("cache-clean-interval")?,
            };
            (
                Kind::Qcow2 {
                    file,
                    backing,
                    overlap,
                    cache,
                },
                QCOW2_UNSUPPORTED,
            )
        }
    };
    a.finish(unsupported)?;
    Ok(NodeSpec {
        driver,
        common,
        kind,
    })
}

/// A QAPI `size` member (QEMU's words for a negative one).
fn size(a: &mut Args, k: &str) -> Result<Option<u64>, RpcError> {
    match a.any(k) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(i)) => Err(RpcError::invalid_params(format!(
                "Value '{i}' is out of range for parameter '{}'",
                a.path(k)
            ))),
            _ => Err(bad_type(&a.path(k), "integer")),
        },
        Some(_) => Err(bad_type(&a.path(k), "integer")),
    }
}

/// An NBD option error with the nested node's prefix in its parameter name.
fn prefix_param(e: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        return e.to_string();
    }
    e.replacen("'", &format!("'{prefix}"), 1)
}

/// A qcow2 node's `overlap-check` (QAPI `Qcow2OverlapChecks`): a mode name,
/// or an object with an optional `template` mode and one boolean per kind of
/// metadata; default `cached`. The errors are QEMU's.
fn overlap_check(a: &mut Args) -> Result<OverlapChecks, RpcError> {
    let mode = |m: &str, path: &str| OverlapChecks::from_mode(m).map_err(|_| bad_value(path, m));
    match a.any("overlap-check") {
        None => Ok(OverlapChecks::default()),
        Some(Value::String(m)) => mode(m, &a.path("overlap-check")),
        Some(v @ Value::Object(_)) => {
            let mut o = Args::new(v, &a.path("overlap-check."))?;
            // QEMU names the template member without its prefix.
            let mut set = match o.any("template") {
                None => OverlapChecks::default(),
                Some(Value::String(m)) => mode(m, "template")?,
                Some(_) => return Err(bad_type(&o.path("template"), "Qcow2OverlapCheckMode")),
            };
            for (k, flag, _) in OverlapChecks::FLAGS {
                if let Some(on) = o.bool(k)? {
                    set = set.with(flag, on);
                }
            }
            o.finish(&[])?;
            Ok(set)
        }
        Some(_) => Err(bad_type(&a.path("overlap-check"), "Qcow2OverlapChecks")),
    }
}
