//! Opening images: on a base bdev or a file, with the backing chain taken from
//! the header (file names resolved against the image's directory) or bound to
//! bdevs the caller names.

use super::bdev::{install_engine, next_id, Info, Qcow2Bdev};
use super::format::MAGIC;
use super::image::{Image, LoadOptions};
use crate::uring::{UringBdev, UringOptions};
use crate::{Bdev, BdevError};
use futures::future::LocalBoxFuture;
use std::io::Read;
use std::path::{Path, PathBuf};
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
    /// Use (and claim) the registered bdev of this name.
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
    /// Bytes of metadata cache (L2 tables and refcount blocks).
    pub cache_bytes: u64,
    /// O_DIRECT for files this open opens (the image by [`open_file`], backing files).
    pub direct: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            filename: None,
            backing: BackingSpec::FromHeader,
            cache_bytes: 32 << 20,
            direct: true,
        }
    }
}

impl Qcow2Bdev {
    /// Opens the qcow2 image stored on `base` as bdev `name`. Must run on a
    /// reactor, which becomes the image's owner. The caller registers the result
    /// in [`crate::registry`] if it should be visible by name.
    pub async fn open(
        name: &str,
        base: Arc<dyn Bdev>,
        opts: OpenOptions,
    ) -> Result<Arc<Qcow2Bdev>, BdevError> {
        open_chain(name.to_string(), base, opts, Vec::new()).await
    }
}

/// Opens the qcow2 image file at `path` (through the uring bdev) as bdev `name`.
/// For a writable open of a regular file, the file is first extended (sparsely)
/// so that the image can grow; [`Qcow2Bdev::close`] trims it again.
/// A failed open leaves the file as it was.
pub async fn open_file(
    name: &str,
    path: &Path,
    mut opts: OpenOptions,
) -> Result<Arc<Qcow2Bdev>, BdevError> {
    let grown_from = if opts.read_only {
        None
    } else {
        reserve_growth(path)?
    };
    let restore = |e: BdevError| {
        if let Some(len) = grown_from {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
                let _ = f.set_len(len);
            }
        }
        e
    };
    let base = UringBdev::open(
        &format!("{name}.file"),
        path,
        UringOptions {
            direct: opts.direct,
            read_only: opts.read_only,
            block_size: None,
        },
    )
    .map_err(restore)?;
    opts.filename = Some(path.to_path_buf());
    let direct = opts.direct;
    let dyn_base: Arc<dyn Bdev> = base;
    match Qcow2Bdev::open(name, dyn_base.clone(), opts).await {
        Ok(q) => {
            // With O_DIRECT, fallocate waits for every direct I/O in flight on
            // the file: new clusters get a filled buffer instead.
            q.set_fresh_from(grown_from, !direct).await?;
            Ok(q)
        }
        Err(e) => {
            crate::drop_cached_channels(&dyn_base);
            Err(restore(e))
        }
    }
}

/// Extends a regular image file so the image can grow by its virtual size;
/// returns the length it had when it was extended.
fn reserve_growth(path: &Path) -> Result<Option<u64>, BdevError> {
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
    if f.read_exact(&mut h).is_err() || u32::from_be_bytes([h[0], h[1], h[2], h[3]]) != MAGIC {
        return Ok(None); // not qcow2 or truncated: the open that follows reports it
    }
    if u32::from_be_bytes([h[4], h[5], h[6], h[7]]) == 3 && h[79] & 2 != 0 {
        return Ok(None); // corrupt bit: the image opens read-only
    }
    let vsize =
        u64::from_be_bytes([h[24], h[25], h[26], h[27], h[28], h[29], h[30], h[31]]).min(1 << 50);
    let want = (md.len() + vsize + vsize / 32 + (16 << 20)).next_multiple_of(1 << 20);
    if want > md.len() {
        f.set_len(want).map_err(|e| os("extending", e))?;
        return Ok(Some(md.len()));
    }
    Ok(None)
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

/// Format of a backing file: from the header extension, else probed.
fn backing_format(path: &Path, fmt: Option<&str>) -> Result<&'static str, BdevError> {
    match fmt {
        Some("qcow2") => Ok("qcow2"),
        Some("raw") => Ok("raw"),
        Some(other) => Err(BdevError::Unsupported(format!(
            "backing format {other:?} of {}",
            path.display()
        ))),
        None => {
            let mut magic = [0u8; 4];
            let mut f = std::fs::File::open(path).map_err(|e| {
                BdevError::os(format!("opening backing file {}", path.display()), e)
            })?;
            let is_qcow2 = f.read_exact(&mut magic).is_ok() && u32::from_be_bytes(magic) == MAGIC;
            tracing::warn!(path = %path.display(), probed = if is_qcow2 { "qcow2" } else { "raw" }, "backing file has no format in the header; probed");
            Ok(if is_qcow2 { "qcow2" } else { "raw" })
        }
    }
}

fn open_chain(
    name: String,
    base: Arc<dyn Bdev>,
    opts: OpenOptions,
    mut visited: Vec<PathBuf>,
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
                cache_bytes: opts.cache_bytes,
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
                let b = crate::registry().claim(n, &name)?;
                claims.push(n.clone());
                Some(b)
            }
            BackingSpec::FromHeader => match &bfile {
                None => None,
                Some(file) => {
                    let path = resolve_backing_path(file, opts.filename.as_deref())?;
                    let canon = std::fs::canonicalize(&path).map_err(|e| {
                        BdevError::os(format!("backing file {}", path.display()), e)
                    })?;
                    if visited.contains(&canon) {
                        return Err(BdevError::InvalidParam(format!(
                            "backing chain loop: {} appears twice",
                            path.display()
                        )));
                    }
                    let fmt = backing_format(&path, bfmt.as_deref())?;
                    let bname = format!("{name}.backing");
                    let leaf = UringBdev::open(
                        &format!("{bname}.file"),
                        &path,
                        UringOptions {
                            direct: opts.direct,
                            read_only: true,
                            block_size: None,
                        },
                    )?;
                    if fmt == "raw" {
                        Some(leaf as Arc<dyn Bdev>)
                    } else {
                        let bopts = OpenOptions {
                            read_only: true,
                            filename: Some(path.clone()),
                            backing: BackingSpec::FromHeader,
                            ..opts.clone()
                        };
                        Some(
                            open_chain(bname, leaf, bopts, visited.clone()).await? as Arc<dyn Bdev>,
                        )
                    }
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
            size: img.size,
            block_size: img.align.max(512) as u32,
            alignment: base.required_alignment(),
            read_only: img.read_only,
            cluster_size: img.cs,
            version: img.version,
            base: base.clone(),
            info: Mutex::new(Info {
                filename: opts.filename.clone(),
                backing,
                backing_file: bfile,
                backing_format: bfmt,
                claims,
            }),
        });
        install_engine(id, img);
        tracing::info!(image = %name, base = base.name(), "qcow2 image opened");
        Ok(q)
    })
}
