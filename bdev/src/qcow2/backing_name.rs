//! Reading (and opening) a header's backing file name and format as QEMU does: a path
//! (relative to the image's directory) opened as the format the header
//! names, `null-co://`, a protocol URI of a driver registered from above this
//! crate ([`register_protocol`]: `nbd://`, `nbd+unix://`, `nbd+tcp://`), or a
//! `json:{...}` pseudo-filename of a node's options.
//!
//! What sluice can open: `file` and `host_device` (a path), `raw` over one
//! (a raw backing is its file), `qcow2` over one, and `null-co`. Anything
//! else (a driver QEMU has and sluice lacks, or a sluice-only node that lived
//! in a process's memory such as `malloc`) is refused with an error naming the
//! backing file and the driver: an image never opens silently without the
//! backing its header names. Such an image can still be opened with its
//! backing bound explicitly (a named bdev, or none).

use super::format::MAGIC;
use super::open::{BackingSpec, OpenOptions};
use crate::error::BdevError;
use crate::null::{NullBdev, NullOptions};
use crate::uring::{UringBdev, UringOptions};
use crate::Bdev;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The format of a backing file given by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathFormat {
    /// Read as it is (`raw`, or the `file` / `host_device` protocol itself).
    Raw,
    /// A qcow2 image.
    Qcow2,
    /// Not recorded: probed (qcow2 if it has the magic, else raw).
    Probe,
}

/// Opens a protocol node (`name`, read-only) from its URI (a string) or its
/// options (an object), for drivers that live above this crate (the NBD
/// client). Call on a reactor.
pub type ProtocolOpener =
    fn(String, Value) -> futures::future::LocalBoxFuture<'static, Result<Arc<dyn Bdev>, BdevError>>;

/// The protocol drivers registered: (driver, URI schemes, its options, opener).
type Protocols = Vec<(
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    ProtocolOpener,
)>;

static PROTOCOLS: std::sync::Mutex<Protocols> = std::sync::Mutex::new(Vec::new());

/// Registers `driver` (idempotent): backing names with one of `schemes`
/// (`"nbd"` for `nbd://`; one ending in `:`, `"rbd:"`, for names that are
/// `rbd:...` without `//`) or `json:` names with that driver and `options`
/// open through `open`.
pub fn register_protocol(
    driver: &'static str,
    schemes: &'static [&'static str],
    options: &'static [&'static str],
    open: ProtocolOpener,
) {
    let mut v = PROTOCOLS.lock().unwrap_or_else(|e| e.into_inner());
    if !v.iter().any(|(d, ..)| *d == driver) {
        v.push((driver, schemes, options, open));
    }
}

fn protocol_by_driver(driver: &str) -> Option<&'static str> {
    let v = PROTOCOLS.lock().unwrap_or_else(|e| e.into_inner());
    v.iter().find(|(d, ..)| *d == driver).map(|(d, ..)| *d)
}

fn protocol_by_scheme(scheme: &str) -> Option<&'static str> {
    let v = PROTOCOLS.lock().unwrap_or_else(|e| e.into_inner());
    v.iter()
        .find(|(_, s, ..)| s.contains(&scheme))
        .map(|(d, ..)| *d)
}

fn protocol(driver: &str) -> Option<(&'static [&'static str], ProtocolOpener)> {
    let v = PROTOCOLS.lock().unwrap_or_else(|e| e.into_inner());
    v.iter()
        .find(|(d, ..)| *d == driver)
        .map(|(_, _, o, f)| (*o, *f))
}

/// The backing node a header names.
#[derive(Debug, Clone, PartialEq)]
enum BackingNode {
    /// A node of a registered protocol driver, read as `format`.
    Protocol {
        /// The driver.
        driver: &'static str,
        /// Its URI (a string) or options (an object).
        spec: Value,
        /// As what.
        format: PathFormat,
    },
    /// A file or block device, read as `format`.
    Path {
        /// Where (resolved).
        path: PathBuf,
        /// As what.
        format: PathFormat,
        /// QEMU's `host_device`: it must be a block device.
        block_device: bool,
    },
    /// A null device (QEMU's `null-co`).
    Null {
        /// Bytes.
        size: u64,
        /// Reads return zeroes (else buffers are left as they are).
        read_zeroes: bool,
    },
}

/// QEMU's null-co size when none is given.
const NULL_DEFAULT_SIZE: u64 = 1 << 30;

/// Options of any node that change nothing sluice reads.
const HARMLESS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "auto-read-only",
    "cache",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "detect-zeroes",
    "force-share",
    "aio",
    "locking",
];

/// Parses the backing file name `name` (with the header's format `fmt`) of
/// the image at `image` (relative paths resolve against its directory).
fn parse(name: &str, fmt: Option<&str>, image: Option<&Path>) -> Result<BackingNode, BdevError> {
    let unsupported = |why: String| BdevError::Unsupported(format!("backing file {name:?}: {why}"));
    if let Some(json) = name.strip_prefix("json:") {
        let v: Value = serde_json::from_str(json)
            .map_err(|e| BdevError::InvalidParam(format!("backing file {name:?}: {e}")))?;
        let Value::Object(mut m) = v else {
            return Err(unsupported("a json: filename must hold an object".into()));
        };
        if !m.contains_key("driver") {
            if let Some(f) = fmt {
                m.insert("driver".into(), Value::from(f));
            }
        }
        return from_options(name, &m, image);
    }
    if name.starts_with("null-co://") {
        // `raw` over it: a stream's `backing-mask-protocol`.
        if !matches!(fmt, None | Some("null-co") | Some("raw")) {
            return Err(unsupported(format!(
                "format {:?} over null-co",
                fmt.unwrap_or_default()
            )));
        }
        return Ok(BackingNode::Null {
            size: NULL_DEFAULT_SIZE,
            read_zeroes: false,
        });
    }
    // A protocol whose names are `proto:...` without `//` (QEMU's
    // `rbd:pool/image`) is registered with the scheme `"proto:"`.
    let prefixed = name
        .split_once(':')
        .and_then(|(p, _)| protocol_by_scheme(&format!("{p}:")));
    let scheme = name.split_once("://").map(|(p, _)| p);
    if let Some(driver) = prefixed.or_else(|| scheme.and_then(protocol_by_scheme)) {
        let format = match fmt {
            None => PathFormat::Probe,
            Some("raw") => PathFormat::Raw,
            Some(f) if f == driver => PathFormat::Raw,
            Some("qcow2") => PathFormat::Qcow2,
            Some(other) => {
                return Err(unsupported(format!(
                    "backing format {other:?} over {driver}"
                )))
            }
        };
        return Ok(BackingNode::Protocol {
            driver,
            spec: Value::from(name),
            format,
        });
    }
    if let Some(proto) = scheme {
        // QEMU's other protocol filenames (nvme://...): sluice has none of
        // those drivers, and the name is no path.
        if !proto.is_empty() && proto.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(unsupported(format!(
                "protocol {proto:?} cannot be opened by sluice; open the image with its \
                 backing named explicitly"
            )));
        }
    }
    let plain = name.strip_prefix("file:").unwrap_or(name);
    let path = super::open::resolve_backing_path(plain, image)?;
    let (format, block_device) = match fmt {
        None => (PathFormat::Probe, false),
        Some("raw") | Some("file") => (PathFormat::Raw, false),
        Some("host_device") => (PathFormat::Raw, true),
        Some("qcow2") => (PathFormat::Qcow2, false),
        Some(other) => {
            return Err(BdevError::Unsupported(format!(
                "backing format {other:?} of {}",
                path.display()
            )))
        }
    };
    Ok(BackingNode::Path {
        path,
        format,
        block_device,
    })
}

/// A node given by its options (a `json:` filename's object).
fn from_options(
    name: &str,
    m: &Map<String, Value>,
    image: Option<&Path>,
) -> Result<BackingNode, BdevError> {
    let unsupported = |why: String| BdevError::Unsupported(format!("backing file {name:?}: {why}"));
    let driver = m
        .get("driver")
        .and_then(Value::as_str)
        .ok_or_else(|| unsupported("no \"driver\"".into()))?;
    let known: &[&str] = match driver {
        "file" | "host_device" => &["filename"],
        "null-co" => &["size", "read-zeroes", "latency-ns"],
        "raw" | "qcow2" => &["file"],
        "malloc" => {
            return Err(unsupported(
                "a sluice malloc bdev: its data lived in the memory of the process \
                 that wrote this name and is gone; open the image with its backing \
                 named explicitly"
                    .into(),
            ))
        }
        other => match protocol(other) {
            Some((opts, _)) => opts,
            None => {
                return Err(unsupported(format!(
                    "driver {other:?} cannot be opened by sluice; open the image with its \
                     backing named explicitly"
                )))
            }
        },
    };
    if let Some(k) = m
        .keys()
        .find(|k| !known.contains(&k.as_str()) && !HARMLESS.contains(&k.as_str()))
    {
        return Err(unsupported(format!(
            "option {k:?} of driver {driver:?} is not supported"
        )));
    }
    match driver {
        "file" | "host_device" => {
            let f = m
                .get("filename")
                .and_then(Value::as_str)
                .ok_or_else(|| unsupported(format!("driver {driver:?} needs a \"filename\"")))?;
            Ok(BackingNode::Path {
                path: super::open::resolve_backing_path(f, image)?,
                format: PathFormat::Raw,
                block_device: driver == "host_device",
            })
        }
        "null-co" => {
            let size = match m.get("size") {
                None => NULL_DEFAULT_SIZE,
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| unsupported(format!("null-co size {v}")))?,
            };
            if m.get("latency-ns").is_some_and(|l| l.as_u64() != Some(0)) {
                return Err(unsupported("null-co latency-ns other than 0".into()));
            }
            let read_zeroes = match m.get("read-zeroes") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) if s == "on" || s == "true" => true,
                Some(Value::String(s)) if s == "off" || s == "false" => false,
                Some(v) => return Err(unsupported(format!("null-co read-zeroes {v}"))),
            };
            Ok(BackingNode::Null { size, read_zeroes })
        }
        d if !matches!(d, "raw" | "qcow2") => {
            let driver =
                protocol_by_driver(d).ok_or_else(|| unsupported(format!("driver {d:?}")))?;
            let mut o = m.clone();
            for k in HARMLESS {
                o.remove(*k);
            }
            Ok(BackingNode::Protocol {
                driver,
                spec: Value::Object(o),
                format: PathFormat::Raw,
            })
        }
        _ => {
            // raw or qcow2 over a file child (a filename or a node's options).
            let child = match m.get("file") {
                Some(Value::String(f)) => BackingNode::Path {
                    path: super::open::resolve_backing_path(f, image)?,
                    format: PathFormat::Raw,
                    block_device: false,
                },
                Some(Value::Object(c)) => from_options(name, c, image)?,
                _ => return Err(unsupported(format!("driver {driver:?} needs a \"file\""))),
            };
            match (driver, child) {
                ("raw", c) => Ok(c),
                (_, BackingNode::Protocol { driver, spec, .. }) => Ok(BackingNode::Protocol {
                    driver,
                    spec,
                    format: PathFormat::Qcow2,
                }),
                (
                    _,
                    BackingNode::Path {
                        path,
                        format: PathFormat::Raw,
                        block_device,
                    },
                ) => Ok(BackingNode::Path {
                    path,
                    format: PathFormat::Qcow2,
                    block_device,
                }),
                _ => Err(unsupported(
                    "a qcow2 image must be stored on a file or block device".into(),
                )),
            }
        }
    }
}

/// Opens the backing node the header of image `name` names (`file` with
/// format `fmt`), read-only, as bdev `<name>.backing` (its file as
/// `<name>.backing.file`); a qcow2 backing opens its own chain in turn.
/// `visited` holds the chain's canonical paths so far (a loop is an error).
pub(super) async fn open(
    name: &str,
    file: &str,
    fmt: Option<&str>,
    opts: &OpenOptions,
    visited: &[PathBuf],
) -> Result<Arc<dyn Bdev>, BdevError> {
    let bname = format!("{name}.backing");
    match parse(file, fmt, opts.filename.as_deref())? {
        BackingNode::Protocol {
            driver,
            spec,
            format,
        } => {
            let (_, open) = protocol(driver).ok_or_else(|| {
                BdevError::Unsupported(format!("backing file {file:?}: driver {driver:?}"))
            })?;
            let leaf = open(format!("{bname}.file"), spec).await?;
            let qcow2 = match format {
                PathFormat::Raw => false,
                PathFormat::Qcow2 => true,
                PathFormat::Probe => {
                    let ch = crate::channel(&leaf)?;
                    let head = crate::read_at(&ch, 0, leaf.block_size() as usize).await?;
                    let is = u32::from_be_bytes([
                        head.as_slice()[0],
                        head.as_slice()[1],
                        head.as_slice()[2],
                        head.as_slice()[3],
                    ]) == MAGIC;
                    tracing::warn!(
                        backing = file,
                        probed = if is { "qcow2" } else { "raw" },
                        "backing file has no format in the header; probed"
                    );
                    is
                }
            };
            if !qcow2 {
                return Ok(leaf);
            }
            let bopts = OpenOptions {
                read_only: true,
                filename: None,
                backing: BackingSpec::FromHeader,
                file_force_share: false,
                ..opts.clone()
            };
            Ok(super::open::open_chain(bname, leaf, bopts, visited.to_vec(), None).await?)
        }
        BackingNode::Null { size, read_zeroes } => {
            if size == 0 || !size.is_multiple_of(512) {
                return Err(BdevError::Unsupported(format!(
                    "backing file {file:?}: a null-co size of {size} bytes (sluice's null \
                     device takes a positive multiple of 512)"
                )));
            }
            let nopts = NullOptions {
                zero_reads: read_zeroes,
            };
            Ok(NullBdev::with_options(
                &bname,
                size / 512,
                512,
                None,
                nopts,
            )?)
        }
        BackingNode::Path {
            path,
            format,
            block_device,
        } => {
            let canon = std::fs::canonicalize(&path)
                .map_err(|e| BdevError::os(format!("backing file {}", path.display()), e))?;
            if visited.contains(&canon) {
                return Err(BdevError::InvalidParam(format!(
                    "backing chain loop: {} appears twice",
                    path.display()
                )));
            }
            let qcow2 = match format {
                PathFormat::Raw => false,
                PathFormat::Qcow2 => true,
                PathFormat::Probe => probe_is_qcow2(&path)?,
            };
            let leaf = UringBdev::open_with_perms(
                &format!("{bname}.file"),
                &path,
                UringOptions {
                    direct: opts.direct,
                    read_only: true,
                    block_size: None,
                    locking: opts.locking,
                },
                None,
                // A raw backing file may be empty (QEMU opens it: it reads
                // as zeroes); an empty qcow2 one is refused by its header.
                !qcow2,
                crate::lock::Perms::for_open_sharing(true, opts.force_share),
            )?;
            if block_device && !leaf.is_block_device() {
                return Err(BdevError::InvalidParam(format!(
                    "backing file {}: the 'host_device' driver requires a block device",
                    path.display()
                )));
            }
            if !qcow2 {
                return Ok(leaf);
            }
            let bopts = OpenOptions {
                read_only: true,
                filename: Some(path.clone()),
                backing: BackingSpec::FromHeader,
                file_force_share: false,
                ..opts.clone()
            };
            Ok(super::open::open_chain(bname, leaf, bopts, visited.to_vec(), None).await?)
        }
    }
}

/// Whether a backing file the header gives no format for is a qcow2 image
/// (it starts with the magic); else it is read raw.
fn probe_is_qcow2(path: &Path) -> Result<bool, BdevError> {
    let mut magic = [0u8; 4];
    let mut f = crate::open_checked::open_checked(
        path,
        std::fs::OpenOptions::new().read(true),
        libc::O_CLOEXEC,
        "opening backing file",
    )?;
    let is_qcow2 = f.read_exact(&mut magic).is_ok() && u32::from_be_bytes(magic) == MAGIC;
    tracing::warn!(path = %path.display(), probed = if is_qcow2 { "qcow2" } else { "raw" }, "backing file has no format in the header; probed");
    Ok(is_qcow2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> Option<&'static Path> {
        Some(Path::new("/d/top.qcow2"))
    }

    #[test]
    fn names_as_qemu_writes_them() {
        let p = |path: &str, format, block_device| BackingNode::Path {
            path: path.into(),
            format,
            block_device,
        };
        assert_eq!(
            parse("b.raw", Some("raw"), img()).unwrap(),
            p("/d/b.raw", PathFormat::Raw, false)
        );
        assert_eq!(
            parse("/x/b", Some("file"), img()).unwrap(),
            p("/x/b", PathFormat::Raw, false)
        );
        assert_eq!(
            parse("/dev/sdz", Some("host_device"), img()).unwrap(),
            p("/dev/sdz", PathFormat::Raw, true)
        );
        assert_eq!(
            parse("b.qcow2", None, img()).unwrap(),
            p("/d/b.qcow2", PathFormat::Probe, false)
        );
        assert_eq!(
            parse(
                r#"json:{"read-zeroes": true, "driver": "null-co", "size": 1048576}"#,
                Some("null-co"),
                img()
            )
            .unwrap(),
            BackingNode::Null {
                size: 1 << 20,
                read_zeroes: true
            }
        );
        assert_eq!(
            parse("null-co://", Some("raw"), img()).unwrap(),
            BackingNode::Null {
                size: 1 << 30,
                read_zeroes: false
            }
        );
        assert_eq!(
            parse("null-co://", Some("null-co"), img()).unwrap(),
            BackingNode::Null {
                size: 1 << 30,
                read_zeroes: false
            }
        );
        assert_eq!(
            parse(
                r#"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/q"}}"#,
                Some("qcow2"),
                img()
            )
            .unwrap(),
            p("/q", PathFormat::Qcow2, false)
        );
        assert_eq!(
            parse(
                r#"json:{"driver": "raw", "file": {"driver": "null-co", "size": 512}}"#,
                Some("raw"),
                img()
            )
            .unwrap(),
            BackingNode::Null {
                size: 512,
                read_zeroes: false
            }
        );
    }

    #[test]
    fn what_sluice_cannot_open_is_refused_by_name() {
        for (name, want) in [
            (r#"json:{"driver": "malloc", "size": 512}"#, "malloc"),
            (r#"json:{"driver": "nbd", "server": {}}"#, "\"nbd\""),
            (
                r#"json:{"driver": "raw", "offset": 4, "file": "/x"}"#,
                "offset",
            ),
            ("json:[1]", "object"),
            ("nvme://0000:01:00.0/1", "\"nvme\""),
        ] {
            let e = parse(name, None, img()).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("backing file"),
                "{name}: {e}"
            );
        }
        assert!(parse("json:{", None, img()).is_err());
        assert!(parse("b", Some("vmdk"), img()).is_err());
        assert!(parse("null-co://", Some("qcow2"), img()).is_err());
    }

    fn never_opens(
        _: String,
        _: Value,
    ) -> futures::future::LocalBoxFuture<'static, Result<Arc<dyn Bdev>, BdevError>> {
        Box::pin(async { Err(BdevError::Unsupported("test driver".into())) })
    }

    /// A protocol registered with a `"scheme:"` (RBD's `rbd:pool/image`
    /// names, no `//`): such names are its, with or without a format; a
    /// relative path that merely contains a colon elsewhere stays a path.
    #[test]
    fn registered_prefix_protocol_names() {
        register_protocol("tpfx", &["tpfx:"], &["pool", "image"], never_opens);
        let want = |format| BackingNode::Protocol {
            driver: "tpfx",
            spec: Value::from("tpfx:pool/img@s:conf=/c"),
            format,
        };
        assert_eq!(
            parse("tpfx:pool/img@s:conf=/c", Some("raw"), img()).unwrap(),
            want(PathFormat::Raw)
        );
        assert_eq!(
            parse("tpfx:pool/img@s:conf=/c", None, img()).unwrap(),
            want(PathFormat::Probe)
        );
        assert!(matches!(
            parse("dir/a:b.qcow2", Some("qcow2"), img()).unwrap(),
            BackingNode::Path { .. }
        ));
    }

    /// Names of a registered protocol driver (the NBD client's way in),
    /// under a test driver's name so the other tests' refusal of `nbd` holds.
    #[test]
    fn registered_protocols_by_uri_and_json() {
        register_protocol(
            "tproto",
            &["tproto", "tproto+unix"],
            &["server", "export"],
            never_opens,
        );
        let prot = |spec: Value, format| BackingNode::Protocol {
            driver: "tproto",
            spec,
            format,
        };
        assert_eq!(
            parse("tproto+unix:///e?socket=/s", Some("raw"), img()).unwrap(),
            prot(Value::from("tproto+unix:///e?socket=/s"), PathFormat::Raw)
        );
        assert_eq!(
            parse("tproto://h:1/e", None, img()).unwrap(),
            prot(Value::from("tproto://h:1/e"), PathFormat::Probe)
        );
        assert_eq!(
            parse("tproto://h:1/e", Some("qcow2"), img()).unwrap(),
            prot(Value::from("tproto://h:1/e"), PathFormat::Qcow2)
        );
        let opts = serde_json::json!({"server": {"type": "unix", "path": "/s"}, "export": "e"});
        assert_eq!(
            parse(
                r#"json:{"driver": "tproto", "read-only": true, "server": {"type": "unix", "path": "/s"}, "export": "e"}"#,
                None,
                img()
            )
            .unwrap(),
            prot(opts.clone(), PathFormat::Raw)
        );
        assert_eq!(
            parse(
                r#"json:{"driver": "qcow2", "file": {"driver": "tproto", "server": {"type": "unix", "path": "/s"}, "export": "e"}}"#,
                Some("qcow2"),
                img()
            )
            .unwrap(),
            prot(opts, PathFormat::Qcow2)
        );
        let bad = r#"json:{"driver": "tproto", "tls-creds": "x"}"#;
        let e = parse(bad, None, img()).unwrap_err().to_string();
        assert!(e.contains("tls-creds"), "{bad}: {e}");
        assert!(parse("tproto://h/e", Some("vmdk"), img()).is_err());
    }
}
