//! Creating the nodes of a parsed `blockdev-add` through the code the SPDK-style
//! methods use: `bdev_uring_create`'s file opening, `bdev_null_create`'s null
//! bdev, `bdev_qcow2_open`'s image opening, and a [`Device`] as the raw node
//! (a passthrough under its own name).

use super::spec::{Backing, Driver, Kind, NodeRef, NodeSpec};
use super::state::{self, Record};
use crate::error::RpcError;
use crate::methods::common::{delete_bdev, register_bdev};
use crate::methods::nodes::{self, open_file as open_uring_file, FileOpts, Open};
use crate::service::Service;
use bdev::device::Device;
use bdev::null::{NullBdev, NullOptions};
use bdev::qcow2::OverlapChecks;
use bdev::uring::UringBdev;
use bdev::Bdev;
use serde_json::Value;
use std::sync::Arc;

/// What one `blockdev-add` made.
pub struct Made {
    /// The nodes created with it (nested `file` nodes), deleted with it.
    pub children: Vec<(String, Driver)>,
    /// A monitor-owned file node the image now reads through.
    pub file_ref: Option<String>,
}

/// QEMU's text for a file that cannot be opened.
pub fn could_not_open(path: &str, e: &std::io::Error) -> RpcError {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    RpcError::errno(
        errno,
        format!(
            "Could not open '{path}': {}",
            nix::errno::Errno::from_raw(errno).desc()
        ),
    )
}

/// QEMU's text for a node name that names nothing.
pub fn not_found(name: &str) -> RpcError {
    RpcError::errno(
        libc::ENODEV,
        format!("Cannot find device='{name}' nor node-name='{name}'"),
    )
}

fn read_only_node() -> RpcError {
    RpcError::errno(libc::EROFS, "Block node is read-only")
}

/// Opens a file node's uring bdev (not registered). With `auto-read-only`, a
/// file that cannot be opened for writing is opened read-only.
pub fn open_file_node(name: &str, spec: &NodeSpec) -> Result<Arc<dyn Bdev>, RpcError> {
    let Kind::File { filename, locking } = &spec.kind else {
        return Err(RpcError::internal("not a file node"));
    };
    let len = match std::fs::metadata(filename) {
        Ok(m) => m.len(),
        Err(e) => return Err(could_not_open(filename, &e)),
    };
    let ro = spec.common.read_only.unwrap_or(false);
    if len < 512 {
        // An empty file (as `blockdev-create` makes it) is a node of size 0.
        let o = bdev::uring::UringOptions {
            direct: spec.common.direct.unwrap_or(false),
            read_only: ro,
            block_size: None,
            locking: *locking,
        };
        let perms = bdev::lock::Perms::for_open_sharing(ro, spec.common.force_share);
        return UringBdev::open_with_perms(
            name,
            std::path::Path::new(filename),
            o,
            None,
            true,
            perms,
        )
        .map(|b| b as Arc<dyn Bdev>)
        .map_err(|e| match e {
            bdev::BdevError::Os { source, .. } => could_not_open(filename, &source),
            e => e.into(),
        });
    }
    let open = |read_only| {
        let o = FileOpts {
            block_size: None,
            direct: Some(spec.common.direct.unwrap_or(false)),
            read_only,
            uuid: None,
            locking: *locking,
            force_share: spec.common.force_share,
        };
        open_uring_file(name, filename, o)
    };
    let os_errno = |e: &RpcError| -e.code;
    match open(ro) {
        Ok(b) => Ok(b),
        Err(e)
            if !ro
                && spec.common.auto_read_only
                && [libc::EACCES, libc::EPERM, libc::EROFS].contains(&os_errno(&e)) =>
        {
            tracing::info!(node = name, file = %filename, "opened read-only (auto-read-only)");
            Ok(open(true)?)
        }
        Err(e) if e.code < 0 && e.code > -4096 => {
            let err = std::io::Error::from_raw_os_error(-e.code);
            Err(could_not_open(filename, &err))
        }
        Err(e) => Err(e),
    }
}

fn open_null(name: &str, size: u64, read_zeroes: bool) -> Result<Arc<dyn Bdev>, RpcError> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(RpcError::invalid_params(format!(
            "Parameter 'size': sluice's null-co node takes a positive multiple of 512 bytes, not {size}"
        )));
    }
    let opts = NullOptions {
        zero_reads: read_zeroes,
    };
    Ok(NullBdev::with_options(name, size / 512, 512, None, opts)?)
}

/// Creates a leaf node (file, host_device, null-co) and registers it.
fn create_leaf(svc: &Service, name: &str, spec: &NodeSpec) -> Result<(), RpcError> {
    let b = match &spec.kind {
        Kind::File { .. } => open_file_node(name, spec)?,
        Kind::NullCo { size, read_zeroes } => open_null(name, *size, *read_zeroes)?,
        Kind::Nbd { config } => nodes::open_nbd(
            svc,
            name,
            config.clone(),
            spec.common.read_only.unwrap_or(false),
            spec.common.auto_read_only,
        )?,
        Kind::Rbd { config } => nodes::open_rbd(
            name,
            rbd::RbdOpen {
                config: config.clone(),
                read_only: spec.common.read_only.unwrap_or(false),
                block_size: 512,
                cluster_name: None,
                uuid: None,
            },
            None,
        )?,
        _ => return Err(RpcError::internal("not a leaf node")),
    };
    register_bdev(svc, b)?;
    Ok(())
}

/// Checks that the nested node `child` of the new node `parent` can be made.
fn check_child_name(
    svc: &Service,
    parent: &str,
    child: &str,
    implicit: bool,
) -> Result<(), RpcError> {
    if child == parent {
        return Err(RpcError::errno(
            libc::EEXIST,
            format!("Duplicate nodes with node-name='{child}'"),
        ));
    }
    check_new_name(svc, child, implicit)
}

/// Checks that `name` can be a new node: QEMU's rules, then unused.
pub fn check_new_name(svc: &Service, name: &str, implicit: bool) -> Result<(), RpcError> {
    if !implicit {
        super::args::check_node_name(name)?;
    }
    if let Ok(b) = svc.graph.nodes().get(name) {
        if Device::from_bdev(&b).is_some() && !state::is_node(&svc.graph, name) {
            return Err(RpcError::errno(
                libc::EEXIST,
                format!("node-name={name} is conflicting with a device id"),
            ));
        }
        return Err(RpcError::errno(
            libc::EEXIST,
            format!("Duplicate nodes with node-name='{name}'"),
        ));
    }
    if !implicit {
        super::args::check_node_name_len(name)?;
    }
    Ok(())
}

/// The name of a nested node: its own `node-name`, else `<parent>.file`.
fn child_name(parent: &str, child: &NodeSpec) -> (String, bool) {
    match &child.common.node_name {
        Some(n) => (n.clone(), false),
        None => (format!("{parent}.file"), true),
    }
}

/// Creates the node `name` of `spec` (its name already checked) and what it nests.
pub fn create(svc: &Service, name: &str, spec: &NodeSpec) -> Result<Made, RpcError> {
    let mut made = Made {
        children: Vec::new(),
        file_ref: None,
    };
    match &spec.kind {
        Kind::File { .. } | Kind::NullCo { .. } | Kind::Nbd { .. } | Kind::Rbd { .. } => {
            create_leaf(svc, name, spec)?
        }
        Kind::Raw { file } => create_raw(svc, name, spec, file, &mut made)?,
        Kind::Throttle { file, group } => {
            let nodes = svc.graph.nodes();
            if !nodes.throttles().has_object(group) {
                return Err(RpcError::invalid_params(format!(
                    "Throttle group '{group}' does not exist"
                )));
            }
            if !nodes.contains(file) {
                return Err(not_found(file));
            }
            let b = bdev::throttle::ThrottleBdev::new(nodes, name, file, group)?;
            let b: Arc<dyn Bdev> = b;
            if let Err(e) = register_bdev(svc, b.clone()) {
                b.on_delete();
                return Err(e);
            }
        }
        Kind::Qcow2 {
            file,
            backing,
            overlap,
            cache,
        } => create_qcow2(
            svc,
            name,
            spec,
            file,
            backing,
            (*overlap, *cache),
            &mut made,
        )?,
    }
    Ok(made)
}

fn create_raw(
    svc: &Service,
    name: &str,
    spec: &NodeSpec,
    file: &NodeRef,
    made: &mut Made,
) -> Result<(), RpcError> {
    let ro = spec.common.read_only.unwrap_or(false);
    let base = match file {
        NodeRef::Nested(child) => {
            let (cname, implicit) = child_name(name, child);
            check_child_name(svc, name, &cname, implicit)?;
            create_leaf(svc, &cname, child)?;
            made.children.push((cname.clone(), child.driver));
            svc.graph.nodes().get(&cname)?
        }
        NodeRef::Named(n) => svc.graph.nodes().get(n).map_err(|_| not_found(n))?,
    };
    let fail = |svc: &Service, made: &Made, e: RpcError| {
        for (c, _) in &made.children {
            let _ = delete_bdev(svc, c);
        }
        e
    };
    if !ro && base.read_only() {
        return Err(fail(svc, made, read_only_node()));
    }
    if ro && !base.read_only() {
        return Err(fail(
            svc,
            made,
            RpcError::errno(
                libc::ENOTSUP,
                format!(
                    "sluice's raw node is as writable as its file: open '{}' read-only too",
                    base.name()
                ),
            ),
        ));
    }
    let dev = match Device::new(svc.graph.nodes(), name, base) {
        Ok(d) => d,
        Err(e) => return Err(fail(svc, made, e.into())),
    };
    let dev: Arc<dyn Bdev> = dev;
    if let Err(e) = register_bdev(svc, dev.clone()) {
        dev.on_delete();
        return Err(fail(svc, made, e));
    }
    Ok(())
}

/// Claims that stand for a format node using `name` as its file (QEMU's
/// permission conflict), if any.
pub(super) fn format_user(g: &graph::Graph, name: &str) -> Option<String> {
    g.nodes().claims_of(name).into_iter().find_map(|c| {
        let user = match c.holder {
            bdev::Holder::Device(d) | bdev::Holder::Node(d) => d,
            _ => return None,
        };
        let b = g.nodes().get(&user).ok()?;
        let is_format =
            graph::node::image(&b).is_some() || state::driver_of(g, &user) == Some(Driver::Raw);
        is_format.then_some(user)
    })
}

/// QEMU opens the backing after the file: checked after the file's checks.
fn check_backing(svc: &Service, backing: &Backing, o: &mut Open) -> Result<(), RpcError> {
    match backing {
        Backing::FromHeader => {}
        Backing::None => o.no_backing = true,
        Backing::Named(b) => {
            if !svc.graph.nodes().contains(b) {
                return Err(RpcError::errno(
                    libc::ENODEV,
                    format!("Could not open backing file: {}", not_found(b).message),
                ));
            }
            o.backing = Some(b.clone());
        }
    }
    Ok(())
}

fn create_qcow2(
    svc: &Service,
    name: &str,
    spec: &NodeSpec,
    file: &NodeRef,
    backing: &Backing,
    (overlap, cache): (OverlapChecks, bdev::qcow2::CacheOptions),
    made: &mut Made,
) -> Result<(), RpcError> {
    let ro = spec.common.read_only.unwrap_or(false);
    let mut o = Open {
        node_name: Some(name.to_string()),
        read_only: ro,
        direct: Some(spec.common.direct.unwrap_or(false)),
        overlap_check: Some(overlap),
        cache,
        force_share: spec.common.force_share,
        ..Open::default()
    };
    // A file node this image swaps in (restored if the open fails).
    let mut swapped: Option<Record> = None;
    match file {
        NodeRef::Nested(child) if child.driver.is_file() => {
            let (cname, implicit) = child_name(name, child);
            check_child_name(svc, name, &cname, implicit)?;
            let Kind::File { filename, locking } = &child.kind else {
                return Err(RpcError::internal("file node without a filename"));
            };
            o.locking = Some(locking.as_str().into());
            if let Err(e) = std::fs::metadata(filename) {
                return Err(could_not_open(filename, &e));
            }
            if !ro && child.common.read_only == Some(true) {
                return Err(read_only_node());
            }
            o.filename = Some(filename.clone());
            o.direct = Some(child.common.direct.unwrap_or(false));
            o.file_node = Some(cname.clone());
            // The file node's own force-share relaxes the image file's lock
            // (not the backing files': QSD holds them as a reader's).
            o.file_force_share = child.common.force_share;
            made.children.push((cname, child.driver));
        }
        NodeRef::Nested(child) => {
            let (cname, implicit) = child_name(name, child);
            check_child_name(svc, name, &cname, implicit)?;
            create_leaf(svc, &cname, child)?;
            made.children.push((cname.clone(), child.driver));
            o.base_bdev = Some(cname);
        }
        NodeRef::Named(n) => {
            let b = svc.graph.nodes().get(n).map_err(|_| not_found(n))?;
            if let Some(user) = format_user(&svc.graph, n) {
                return Err(RpcError::errno(
                    libc::EBUSY,
                    format!(
                        "Permission conflict on node '{n}': permissions 'write, resize' are both required by node '{user}' (uses node '{n}' as 'file' child) and unshared by node '{name}' (uses node '{n}' as 'file' child)."
                    ),
                ));
            }
            if !ro && b.read_only() {
                return Err(read_only_node());
            }
            check_backing(svc, backing, &mut o)?;
            match (
                state::record(&svc.graph, n),
                b.as_any().downcast_ref::<UringBdev>(),
            ) {
                // A file node of the monitor's, unused: the image opens its file
                // itself (so that it can grow it and trim it at close) and the
                // uring bdev it opens takes the node's place under its name.
                (Some(rec), Some(u))
                    if rec.driver.is_file() && state::user_claims(&svc.graph, n).is_empty() =>
                {
                    o.filename = Some(u.path().display().to_string());
                    o.direct = Some(u.options().direct);
                    o.locking = Some(u.options().locking.as_str().into());
                    o.file_node = Some(n.clone());
                    o.file_force_share = rec.args.get("force-share") == Some(&Value::Bool(true));
                    svc.graph.nodes().release(n, &bdev::Holder::Monitor);
                    svc.graph.delete(n)?;
                    made.file_ref = Some(n.clone());
                    swapped = Some(rec);
                }
                _ => o.base_bdev = Some(n.clone()),
            }
        }
    }
    if !matches!(file, NodeRef::Named(_)) {
        if let Err(e) = check_backing(svc, backing, &mut o) {
            for (c, _) in &made.children {
                if svc.graph.nodes().contains(c) {
                    let _ = delete_bdev(svc, c);
                }
            }
            return Err(e);
        }
    }
    match nodes::open(svc, o) {
        Ok(_) => {
            if let Some(f) = &made.file_ref {
                svc.graph.nodes().claim(f, bdev::Claim::monitor())?;
            }
            Ok(())
        }
        Err(e) => {
            if let Some(rec) = swapped {
                restore_file_node(&svc.graph, &rec);
            }
            for (c, _) in &made.children {
                if svc.graph.nodes().contains(c) {
                    let _ = delete_bdev(svc, c);
                }
            }
            Err(e)
        }
    }
}

/// Puts a monitor-owned file node back as a uring bdev of its own (after the
/// image that read through it is gone, or failed to open).
pub fn restore_file_node(g: &graph::Graph, rec: &Record) {
    let r = super::spec::parse(&rec.args, "", None)
        .and_then(|spec| open_file_node(&rec.name, &spec))
        .and_then(|b| Ok(g.register_claimed(b, bdev::Claim::monitor()).map(|_| ())?));
    if let Err(e) = r {
        tracing::error!(node = %rec.name, "reopening the file node: {e}");
        state::forget(g, &rec.name);
    }
}

/// The arguments recorded for `save_config`: as given, with a named backing
/// that the image has since dropped (a stream) recorded as `null`.
pub fn config_args(svc: &Service, rec: &Record) -> Value {
    let mut args = rec.args.clone();
    if rec.driver == Driver::Qcow2 && args.get("backing").is_some_and(Value::is_string) {
        let has_backing = svc
            .graph
            .nodes()
            .get(&rec.name)
            .ok()
            .and_then(|b| graph::node::backing_of(&b))
            .is_some();
        if !has_backing {
            args["backing"] = Value::Null;
        }
    }
    args
}

/// `blockdev-add`: parses all, checks the names, then creates.
pub(super) fn add(svc: &Service, v: &Value) -> Result<String, RpcError> {
    let spec = super::spec::parse(v, "", None)?;
    let Some(name) = spec.common.node_name.clone() else {
        return Err(RpcError::invalid_params(
            "'node-name' must be specified for the root node",
        ));
    };
    check_new_name(svc, &name, false)?;
    let made = create(svc, &name, &spec)?;
    svc.graph.nodes().claim(&name, bdev::Claim::monitor())?;
    state::insert(
        &svc.graph,
        &name,
        spec.driver,
        v.clone(),
        made.children,
        made.file_ref,
    );
    tracing::info!(node = %name, driver = spec.driver.as_str(), "blockdev-add");
    Ok(name)
}
