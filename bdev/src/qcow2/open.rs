//! Opening images: on a base bdev or a file, with the backing chain taken from
//! the header (file names resolved against the image's directory) or bound to
//! bdevs the caller names.

use super::backing_name;
use super::bdev::{install_engine, next_id, track_grown, Info, Qcow2Bdev};
use super::format::{
    be32, be64, Header, L1Entry, RefcountFormat, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAGIC,
};
use super::image::{check_tables, Image, LoadOptions};
use super::overlap::OverlapChecks;
use crate::claim::{Claim, Holder};
use crate::lock::{LockMode, Perms};
use crate::registry::Registry;
use crate::uring::{UringBdev, UringFile, UringOptions};
use crate::{Bdev, BdevError};
use futures::future::LocalBoxFuture;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Where reads of clusters this image does not allocate go.
#[derive(Clone, Default)]
pub enum BackingSpec {
    /// Open the backing file the header names (read-only), recursively.
    #[default]
    FromHeader,
    /// Ignore any backing file: unallocated clusters read as zeroes.
    None,
    /// Use this bdev.
    Bdev(Arc<dyn Bdev>),
    /// Use (and claim, as its `backing`) the bdev of this name registered in
    /// [`OpenOptions::nodes`].
    Named(String),
}

/// How to open an image.
#[derive(Clone)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// The image file's path: relative backing names resolve against its
    /// directory. Set by [`open_file`].
    pub filename: Option<PathBuf>,
    /// The backing chain.
    pub backing: BackingSpec,
    /// The registry the image's claims live in (on a backing named by
    /// [`BackingSpec::Named`] or linked later by `set_backing_bdev`); none:
    /// the image claims nothing.
    pub nodes: Option<Arc<Registry>>,
    /// The metadata caches (L2 tables, refcount blocks): QEMU's options,
    /// applied to the backing files this open opens too.
    pub cache: super::CacheOptions,
    /// O_DIRECT for files this open opens (the image by [`open_file`], backing files).
    pub direct: bool,
    /// Which metadata every write is checked against (QEMU's `overlap-check`;
    /// default `cached`).
    pub overlap_check: OverlapChecks,
    /// Image locks on the files this open opens (see [`crate::lock`]): the
    /// image's is taken before its file is touched and held by the image.
    pub locking: LockMode,
    /// QEMU's `force-share` of a read-only open: the image's lock and those
    /// of its backing files hold [`Perms::SHARER`] (reads, everything
    /// shared) instead of a reader's.
    pub force_share: bool,
    /// `force-share` of the image's file only (QEMU's on a nested `file`
    /// node): the image's own lock holds [`Perms::SHARER`], its backing
    /// files' not.
    pub file_force_share: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            filename: None,
            backing: BackingSpec::FromHeader,
            nodes: None,
            cache: super::CacheOptions::default(),
            direct: true,
            overlap_check: OverlapChecks::default(),
            locking: LockMode::Auto,
            force_share: false,
            file_force_share: false,
        }
    }
}

impl Qcow2Bdev {
    /// Opens the qcow2 image stored on `base` as bdev `name`. Must run on a
    /// reactor, which becomes the image's owner. The caller registers the result
    /// in a [`Registry`] if it should be visible by name.
    pub async fn open(
        name: &str,
        base: Arc<dyn Bdev>,
        opts: OpenOptions,
    ) -> Result<Arc<Qcow2Bdev>, BdevError> {
        open_chain(name.to_string(), base, opts, Vec::new(), None).await
    }
}

/// Opens the qcow2 image file at `path` (through the uring bdev) as bdev `name`.
///
/// For a writable open of a regular file, the file is first extended (sparsely)
/// so that the image can grow by its virtual size; [`Qcow2Bdev::close`] (or
/// [`Qcow2Bdev::close_grown_files`] at shutdown) trims it again. The extension
/// starts where the image's data ends (the last cluster with a refcount), not
/// at the file's length: a tail left behind by a process that died with the
/// image open is trimmed first, so repeated unclean exits do not pile
/// extensions up. A read-only open never changes the file. Before anything
/// is written, the file passes the checks of a read-only open (header, tables
/// against the file's real length): a file that fails them is not touched. A
/// later failure leaves the image as it was (its file at most trimmed to the
/// image's end).
///
/// Before any of that, the image lock is taken (unless `opts.locking` is
/// off): a file another writer holds, here or in another process, is refused
/// untouched with [`BdevError::Locked`]. The image holds the lock until it is
/// deleted or dropped.
pub async fn open_file(
    name: &str,
    path: &Path,
    opts: OpenOptions,
) -> Result<Arc<Qcow2Bdev>, BdevError> {
    open_file_as(name, &format!("{name}.file"), path, opts).await
}

/// [`open_file`] with the name of the uring bdev under the image chosen by the
/// caller (QEMU's node-name of the `file` child), so that the caller can
/// register that bdev (the image's [`Qcow2Bdev::base`]) as a node of its own.
pub async fn open_file_as(
    name: &str,
    file_name: &str,
    path: &Path,
    mut opts: OpenOptions,
) -> Result<Arc<Qcow2Bdev>, BdevError> {
    let sharing = opts.force_share || opts.file_force_share;
    let perms = Perms::for_open_sharing(opts.read_only, sharing);
    // The lock is on the open file the image's I/O goes through (one
    // descriptor per image), taken before anything reads or writes it.
    let file = UringFile::for_image(
        path,
        UringOptions {
            direct: opts.direct,
            read_only: opts.read_only,
            block_size: None,
            locking: opts.locking,
        },
        perms,
    )?;
    // Nothing is written to a file before it passed the checks of a
    // read-only open: a damaged image is refused as it is.
    let valid_len = if opts.read_only {
        None
    } else {
        validate_file(path)?
    };
    let growth = if opts.read_only {
        None
    } else {
        reserve_growth(name, path)?
    };
    let grown_from = growth.map(|g| g.from);
    let restore = |e: BdevError| {
        if let Some(len) = grown_from {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
                let _ = f.set_len(len);
            }
        }
        e
    };
    let base = UringBdev::from_file(file_name, file, None, false).map_err(restore)?;
    opts.filename = Some(path.to_path_buf());
    let direct = opts.direct;
    let dyn_base: Arc<dyn Bdev> = base;
    let valid_len = valid_len.filter(|_| growth.is_some());
    match open_chain(
        name.to_string(),
        dyn_base.clone(),
        opts,
        Vec::new(),
        valid_len,
    )
    .await
    {
        Ok(q) => {
            // With O_DIRECT, fallocate waits for every direct I/O in flight on
            // the file: new clusters get a filled buffer instead.
            if let Err(e) = q.set_fresh_from(grown_from, !direct).await {
                drop(q);
                crate::drop_cached_channels(&dyn_base);
                return Err(restore(e));
            }
            if let Some(g) = growth {
                track_grown(&q, g.keep);
            }
            Ok(q)
        }
        Err(e) => {
            crate::drop_cached_channels(&dyn_base);
            Err(restore(e))
        }
    }
}

/// Checks an image file as a read-only open would (header, L1 and refcount
/// tables against the file's length, L2 table and refcount block offsets; a
/// writable open of an image with internal snapshots is refused), reading
/// only. Returns the file's length; `None` for what is not a regular file or
/// not a qcow2 header at all (the open that follows reports it, and nothing
/// extends such a file).
fn validate_file(path: &Path) -> Result<Option<u64>, BdevError> {
    let os = |what: &str, e| BdevError::os(format!("{what} {}", path.display()), e);
    let md = std::fs::metadata(path).map_err(|e| os("reading", e))?;
    if !md.is_file() {
        return Ok(None);
    }
    let f = crate::open_checked::open_checked(
        path,
        std::fs::OpenOptions::new().read(true),
        libc::O_CLOEXEC,
        "opening",
    )?;
    let len = md.len();
    let mut first = [0u8; 24];
    read_padded(&f, 0, &mut first).map_err(|e| os("reading", e))?;
    if len < 24 || be32(&first, 0) != MAGIC {
        return Ok(None);
    }
    let bits = be32(&first, 20);
    if !(9..=21).contains(&bits) {
        return Err(super::format::FormatError::BadHeader(format!(
            "cluster_bits {bits} outside 9..=21"
        ))
        .into());
    }
    let cs = 1u64 << bits;
    let mut hbuf = vec![0u8; cs as usize];
    read_padded(&f, 0, &mut hbuf).map_err(|e| os("reading", e))?;
    let hdr = Header::parse(&hbuf, (len + 1).next_multiple_of(cs))?;
    if hdr.incompatible & INCOMPAT_CORRUPT != 0 {
        return Ok(Some(len)); // opens read-only, nothing is written
    }
    if hdr.nb_snapshots > 0 {
        return Err(BdevError::Unsupported(format!(
            "writing images with internal snapshots ({} here); open read-only",
            hdr.nb_snapshots
        )));
    }
    let l1_bytes = hdr.l1_size as u64 * 8;
    let mut l1b = vec![0u8; l1_bytes as usize];
    read_padded(&f, hdr.l1_table_offset, &mut l1b).map_err(|e| os("reading", e))?;
    let l1: Vec<u64> = (0..hdr.l1_size as usize)
        .map(|i| be64(&l1b, i * 8))
        .collect();
    let mut rtb = vec![0u8; (hdr.refcount_table_clusters as u64 * cs) as usize];
    read_padded(&f, hdr.refcount_table_offset, &mut rtb).map_err(|e| os("reading", e))?;
    let rt: Vec<u64> = (0..rtb.len() / 8).map(|i| be64(&rtb, i * 8)).collect();
    check_tables(&hdr, &l1, &rt, len, true)?;
    Ok(Some(len))
}

/// Room made for an image of virtual size `vsize` to grow: all of it, plus
/// metadata (L2 tables and refcount blocks are far below 1/32 of the data).
fn growth_reserve(vsize: u64) -> u64 {
    vsize + vsize / 32 + (16 << 20)
}

/// Extends a regular image file so the image can grow by its virtual size,
/// from the end of the image's data (a longer file is trimmed to it first);
/// returns the length from which the file was extended: the bytes from there
/// on read as zeroes. `None`: the file was left alone.
fn reserve_growth(name: &str, path: &Path) -> Result<Option<Growth>, BdevError> {
    let os = |what: &str, e| BdevError::os(format!("{what} {}", path.display()), e);
    let md = std::fs::metadata(path).map_err(|e| os("reading", e))?;
    if !md.is_file() {
        return Ok(None);
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| os("opening", e))?;
    let mut h = [0u8; 80];
    if f.read_exact(&mut h).is_err() || be32(&h, 0) != MAGIC {
        return Ok(None); // not qcow2 or truncated: the open that follows reports it
    }
    let incompatible = be64(&h, 72);
    if be32(&h, 4) == 3 && incompatible & INCOMPAT_CORRUPT != 0 {
        return Ok(None); // corrupt bit: the image opens read-only
    }
    let vsize = be64(&h, 24).min(1 << 50);
    let len = md.len();
    // Only holes are cut: bytes past the image's end that the filesystem holds
    // (clusters a dead process wrote but never referenced, or data a corrupt
    // image references without a refcount) stay; the cut lands after them.
    let mut keep = 0;
    let cut = data_end(&f, len).map(|end| match last_data_end(&f, end) {
        Some(d) if d > end => {
            keep = d.next_multiple_of(MAX_CLUSTER).min(len);
            keep
        }
        Some(_) => end,
        None => {
            keep = len;
            len
        }
    });
    let start = match cut {
        Some(end) if end < len => {
            f.set_len(end).map_err(|e| os("trimming", e))?;
            tracing::info!(
                image = name,
                path = %path.display(),
                from = len,
                to = end,
                "image file trimmed to its data's end (left extended by an unclean exit)"
            );
            end
        }
        _ => len,
    };
    let want = (start + growth_reserve(vsize)).next_multiple_of(1 << 20);
    f.set_len(want).map_err(|e| os("extending", e))?;
    Ok(Some(Growth { from: start, keep }))
}

/// How [`reserve_growth`] extended a file.
#[derive(Clone, Copy)]
struct Growth {
    /// The bytes from here on read as zeroes (a sparse extension).
    from: u64,
    /// Bytes below this are never trimmed away (past the image's end they
    /// hold data no refcount accounts for; 0 when there is none).
    keep: u64,
}

/// Where the data of the qcow2 image in `f` (`len` bytes) ends: the end of
/// its last cluster with a nonzero refcount, as [`Qcow2Bdev::close`] trims to.
/// `None` when that cannot be trusted: a header this cannot parse, the dirty
/// bit (lazy refcounts: the open rebuilds them), internal snapshots (a
/// writable open is refused), or tables that reach past that end. Clusters past
/// it are in no use, so cutting them off cannot lose data.
fn data_end(f: &File, len: u64) -> Option<u64> {
    let mut first = [0u8; 24];
    read_padded(f, 0, &mut first).ok()?;
    let bits = be32(&first, 20);
    if !(9..=21).contains(&bits) {
        return None;
    }
    let cs = 1u64 << bits;
    let mut hbuf = vec![0u8; cs as usize];
    read_padded(f, 0, &mut hbuf).ok()?;
    let hdr = Header::parse(&hbuf, (len + 1).next_multiple_of(cs)).ok()?;
    if hdr.incompatible & INCOMPAT_DIRTY != 0 || hdr.nb_snapshots > 0 {
        return None;
    }
    let rf = RefcountFormat {
        order: hdr.refcount_order,
        cluster_bits: bits,
    };
    // Everything the header and the tables point at lies below the end.
    let l1_bytes = hdr.l1_size as u64 * 8;
    let rt_bytes = hdr.refcount_table_clusters as u64 * cs;
    let mut floor = (hdr.l1_table_offset + l1_bytes.next_multiple_of(cs))
        .max(hdr.refcount_table_offset + rt_bytes)
        .max(cs);
    let mut rt = vec![0u8; rt_bytes as usize];
    read_padded(f, hdr.refcount_table_offset, &mut rt).ok()?;
    let reftable: Vec<u64> = (0..rt.len() / 8).map(|i| be64(&rt, i * 8)).collect();
    for &e in &reftable {
        if e != 0 {
            if !e.is_multiple_of(cs) {
                return None;
            }
            floor = floor.max(e.saturating_add(cs));
        }
    }
    let mut l1 = vec![0u8; l1_bytes as usize];
    read_padded(f, hdr.l1_table_offset, &mut l1).ok()?;
    for i in 0..hdr.l1_size as usize {
        let e = L1Entry(be64(&l1, i * 8));
        e.validate(cs).ok()?;
        if e.l2_offset() != 0 {
            floor = floor.max(e.l2_offset().saturating_add(cs));
        }
    }
    let per_block = rf.block_entries();
    let mut block = vec![0u8; cs as usize];
    for (ti, &e) in reftable.iter().enumerate().rev() {
        if e == 0 {
            continue;
        }
        read_padded(f, e, &mut block).ok()?;
        if let Some(i) = (0..per_block).rev().find(|&i| rf.get(&block, i) != 0) {
            let end = (ti as u64)
                .checked_mul(per_block)
                .and_then(|c| c.checked_add(i + 1))
                .and_then(|c| c.checked_mul(cs))?;
            return (end >= floor).then_some(end);
        }
    }
    None
}

/// The largest qcow2 cluster: a cut rounded up to it starts on a cluster boundary.
const MAX_CLUSTER: u64 = 2 << 20;

/// The end of the last extent holding data at or after `from` (`from` itself if
/// there is none: only holes follow); `None` if that cannot be told (a
/// filesystem without `SEEK_DATA`, or too many extents).
fn last_data_end(f: &File, from: u64) -> Option<u64> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut pos = from;
    let mut end = from;
    for _ in 0..100_000 {
        let data = match lseek(fd, pos as libc::off_t, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => return Some(end),
            Err(_) => return None,
        };
        let hole = lseek(fd, data as libc::off_t, Whence::SeekHole).ok()? as u64;
        end = hole;
        pos = hole;
    }
    None
}

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zeroes.
fn read_padded(f: &File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Resolves a backing file name as QEMU does: relative to the image's directory.
pub fn resolve_backing_path(backing: &str, image: Option<&Path>) -> Result<PathBuf, BdevError> {
    let p = Path::new(backing);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    match image.and_then(|i| i.parent()) {
        Some(dir) => Ok(dir.join(p)),
        None => Err(BdevError::InvalidParam(format!(
            "backing file {backing:?} is relative but the image's own path is unknown"
        ))),
    }
}

/// Opens the image on `base` and its chain. `valid_len`: the image's own
/// length when `base` was extended past it (see [`LoadOptions::valid_len`]).
pub(super) fn open_chain(
    name: String,
    base: Arc<dyn Bdev>,
    opts: OpenOptions,
    mut visited: Vec<PathBuf>,
    valid_len: Option<u64>,
) -> LocalBoxFuture<'static, Result<Arc<Qcow2Bdev>, BdevError>> {
    Box::pin(async move {
        let owner = reactor::current_index()
            .ok_or_else(|| BdevError::Runtime("qcow2 images are opened on a reactor".into()))?;
        let rt = reactor::handle().ok_or_else(|| BdevError::Runtime("no runtime".into()))?;
        if let Some(f) = &opts.filename {
            if let Ok(c) = std::fs::canonicalize(f) {
                if visited.contains(&c) {
                    return Err(BdevError::InvalidParam(format!(
                        "backing chain loop: {} appears twice",
                        f.display()
                    )));
                }
                visited.push(c);
            }
        }
        let img = Image::open_image(
            &name,
            &base,
            &LoadOptions {
                read_only: opts.read_only,
                cache: opts.cache,
                overlap_checks: opts.overlap_check,
                valid_len,
            },
        )
        .await?;
        let (bfile, bfmt) = {
            let h = img.hdr.borrow();
            (h.backing_file.clone(), h.backing_format.clone())
        };
        let mut claims = Vec::new();
        let backing: Option<Arc<dyn Bdev>> = match &opts.backing {
            BackingSpec::None => None,
            BackingSpec::Bdev(b) => Some(b.clone()),
            BackingSpec::Named(n) => {
                let nodes = opts.nodes.as_ref().ok_or_else(|| {
                    BdevError::InvalidParam(format!(
                        "backing {n:?} by name needs the registry it is named in"
                    ))
                })?;
                let b = nodes.claim(n, Claim::backing(Holder::Node(name.clone())))?;
                claims.push(n.clone());
                Some(b)
            }
            BackingSpec::FromHeader => match &bfile {
                None => None,
                Some(file) => {
                    Some(backing_name::open(&name, file, bfmt.as_deref(), &opts, &visited).await?)
                }
            },
        };
        *img.backing.borrow_mut() = backing.clone();
        let id = next_id();
        let q = Arc::new_cyclic(|me| Qcow2Bdev {
            me: me.clone(),
            name: name.clone(),
            id,
            owner,
            rt,
            size: AtomicU64::new(img.size.get()),
            block_size: img.align.max(512) as u32,
            alignment: base.required_alignment(),
            read_only: std::sync::atomic::AtomicBool::new(img.read_only.get()),
            cluster_size: img.cs,
            version: img.version,
            base: base.clone(),
            overlap_checks: opts.overlap_check,
            cache_usage: img.usage.clone(),
            info: Mutex::new(Info {
                filename: opts.filename.clone(),
                backing,
                backing_file: bfile,
                backing_format: bfmt,
                claims,
                nodes: opts.nodes.clone(),
                grown: false,
                keep_len: 0,
                features: {
                    use super::format::{
                        COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_EXTENDED_L2,
                    };
                    let h = img.hdr.borrow();
                    super::bdev::Qcow2Features {
                        version: h.version,
                        refcount_bits: 1 << h.refcount_order,
                        zstd: h.compression_type == 1,
                        lazy_refcounts: h.compatible & COMPAT_LAZY_REFCOUNTS != 0,
                        extended_l2: h.incompatible & INCOMPAT_EXTENDED_L2 != 0,
                        corrupt: h.incompatible & INCOMPAT_CORRUPT != 0,
                    }
                },
            }),
        });
        install_engine(id, img);
        tracing::info!(image = %name, base = base.name(), "qcow2 image opened");
        Ok(q)
    })
}
