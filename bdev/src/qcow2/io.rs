//! The data path: reads, writes with allocation and copy-on-write, zero writes
//! and discards, split per guest cluster.

use super::compress::decompress;
use super::format::{ClusterKind, FormatError, L2Entry};
use super::image::{Image, R};
use super::overlap::OverlapChecks;
use crate::{
    channel, read_at, simple_io, submit_wait, write_at, BdevError, BdevIo, DmaBuf, IoStatus, IoType,
};
use std::rc::Rc;

/// What to write into a cluster range.
#[derive(Clone, Copy)]
pub(crate) enum Src {
    /// The parent request's memory from this byte position.
    Guest(usize),
    /// Zeroes.
    Zeros,
}

/// A run of a read request that one I/O (or one fill) serves: adjacent
/// clusters merge when their data lies contiguously on the host, when they all
/// fall through to the backing file, or when they all read as zeroes.
enum Piece {
    /// `n` bytes at host offset `host` into the parent at `pos`.
    Host { host: u64, n: u64, pos: usize },
    /// `n` bytes at guest offset `goff` from the backing chain.
    Backing { goff: u64, n: u64, pos: usize },
    /// Zeroes.
    Zero { n: u64, pos: usize },
    /// Part of one compressed cluster (raw entry `e`).
    Compressed {
        e: u64,
        host: u64,
        len: u64,
        intra: u64,
        n: u64,
        pos: usize,
    },
}

impl Piece {
    /// Extends `self` by the next piece `p` of the same request if one I/O can serve both.
    fn merge(&mut self, p: &Piece) -> bool {
        match (self, p) {
            (
                Piece::Host { host, n, .. },
                Piece::Host {
                    host: h2, n: n2, ..
                },
            ) if *host + *n == *h2 => {
                *n += n2;
                true
            }
            (Piece::Backing { n, .. }, Piece::Backing { n: n2, .. })
            | (Piece::Zero { n, .. }, Piece::Zero { n: n2, .. }) => {
                *n += n2;
                true
            }
            _ => false,
        }
    }
}

/// Work left after a read segment's I/O: fill the parent's memory.
enum Post {
    Zero(usize, usize),
    Data(usize, Rc<Vec<u8>>, usize, usize),
}

/// The status a failed operation completes a request with.
pub(crate) fn status_of(e: &BdevError) -> IoStatus {
    match e {
        BdevError::Io(s) => *s,
        BdevError::NoMem(_) => IoStatus::Nomem,
        _ => IoStatus::Eio,
    }
}

impl Image {
    /// Decodes a raw L2 entry.
    pub(crate) fn kind(&self, e: u64) -> R<ClusterKind> {
        L2Entry(e)
            .decode(self.version, self.cluster_bits)
            .map_err(|err| {
                tracing::error!(image = %self.name, error = %err, "bad L2 entry");
                BdevError::from(err)
            })
    }

    /// Splits `[off, off+len)` into per-cluster pieces: (guest cluster, offset in it, length, position).
    pub(crate) fn segments(
        &self,
        off: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64, u64, usize)> + '_ {
        let cs = self.cs;
        let end = off + len;
        let mut cur = off;
        std::iter::from_fn(move || {
            if cur >= end {
                return None;
            }
            let gc = cur / cs;
            let intra = cur % cs;
            let n = (cs - intra).min(end - cur);
            let item = (gc, intra, n, (cur - off) as usize);
            cur += n;
            Some(item)
        })
    }

    /// Runs one guest request to completion and returns its status. A write,
    /// write-zeroes or discard with [`BdevIo::fua`] is followed by an image
    /// flush (dirty metadata written in order, base flushed) before it
    /// completes, so its data and every mapping it needs are durable (QEMU
    /// emulates FUA the same way for drivers without native support).
    pub(crate) async fn execute(self: &Rc<Self>, io: &mut BdevIo) -> IoStatus {
        let r = match io.io_type {
            IoType::Read => self.read_req(io).await,
            IoType::Write => self.write_req(io).await,
            IoType::Flush => self.flush().await,
            IoType::WriteZeroes => self.zero_req(io, false).await,
            IoType::Unmap => self.zero_req(io, true).await,
        };
        let r = match r {
            Ok(()) if io.fua && io.io_type != IoType::Read && io.io_type != IoType::Flush => {
                self.flush().await
            }
            r => r,
        };
        match r {
            Ok(()) => IoStatus::Success,
            Err(e) => {
                tracing::debug!(image = %self.name, error = %e, "request failed");
                status_of(&e)
            }
        }
    }

    async fn read_req(self: &Rc<Self>, io: &mut BdevIo) -> R<()> {
        // Held from before the first lookup: no host cluster found below is
        // freed (and reused) until every read of this request is done.
        let _g = self.drain.enter();
        let mut pieces: Vec<Piece> = Vec::new();
        for (gc, intra, n, pos) in self.segments(io.offset, io.len) {
            let e = self.entry(gc).await?;
            let p = match self.kind(e)? {
                ClusterKind::Unallocated => Piece::Backing {
                    goff: gc * self.cs + intra,
                    n,
                    pos,
                },
                ClusterKind::Zero { .. } => Piece::Zero { n, pos },
                ClusterKind::Normal { host, .. } => {
                    self.check_data_cluster(host)?;
                    Piece::Host {
                        host: host + intra,
                        n,
                        pos,
                    }
                }
                ClusterKind::Compressed { host, len } => Piece::Compressed {
                    e,
                    host,
                    len,
                    intra,
                    n,
                    pos,
                },
            };
            if !pieces.last_mut().is_some_and(|last| last.merge(&p)) {
                pieces.push(p);
            }
        }
        let posts = {
            let pio: &BdevIo = io;
            if pieces.len() == 1 {
                vec![self.read_piece(pio, &pieces[0]).await]
            } else {
                let futs: Vec<_> = pieces.iter().map(|p| self.read_piece(pio, p)).collect();
                futures::future::join_all(futs).await
            }
        };
        for p in posts {
            for p in p? {
                match p {
                    Post::Zero(pos, n) => io.zero(pos, n),
                    Post::Data(pos, d, start, n) => io.copy_in(pos, &d[start..start + n]),
                }
            }
        }
        Ok(())
    }

    /// Reads one run of a request: one base (or backing) I/O straight into the
    /// parent's memory, or work to do on the parent's memory afterwards.
    async fn read_piece(&self, io: &BdevIo, p: &Piece) -> R<Vec<Post>> {
        match *p {
            Piece::Backing { goff, n, pos } => self.read_backing(io, goff, n, pos).await,
            Piece::Zero { n, pos } => Ok(vec![Post::Zero(pos, n as usize)]),
            Piece::Host { host, n, pos } => {
                // SAFETY: the parent request outlives this sub-request: we await it here.
                let sub = unsafe { BdevIo::sub_io(io, pos as u64, n, IoType::Read, host, None) };
                let st = submit_wait(&self.ch, sub).await.status;
                if !st.is_ok() {
                    return Err(BdevError::Io(st));
                }
                Ok(Vec::new())
            }
            Piece::Compressed {
                e,
                host,
                len,
                intra,
                n,
                pos,
            } => {
                let d = self.decompressed(e, host, len).await?;
                Ok(vec![Post::Data(pos, d, intra as usize, n as usize)])
            }
        }
    }

    /// A data cluster must lie inside the image and outside the fixed metadata.
    pub(crate) fn check_data_cluster(&self, host: u64) -> R<()> {
        self.check_data_end(host)?;
        if self.overlaps_metadata(host, self.cs) {
            return Err(FormatError::Corrupt(format!(
                "data cluster {host:#x} overlaps image metadata"
            ))
            .into());
        }
        Ok(())
    }

    /// A data cluster must lie inside the image.
    fn check_data_end(&self, host: u64) -> R<()> {
        if host.saturating_add(self.cs) > self.capacity.get() {
            return Err(FormatError::Corrupt(format!(
                "data cluster {host:#x} lies past the end of the image"
            ))
            .into());
        }
        Ok(())
    }

    /// Reads guest range `[goff, goff+n)` from the backing chain into the parent at `pos`.
    async fn read_backing(&self, io: &BdevIo, goff: u64, n: u64, pos: usize) -> R<Vec<Post>> {
        let Some(b) = self.backing.borrow().clone() else {
            return Ok(vec![Post::Zero(pos, n as usize)]);
        };
        let bsize = b.size();
        if goff >= bsize {
            return Ok(vec![Post::Zero(pos, n as usize)]);
        }
        let avail = n.min(bsize - goff);
        let mut posts = Vec::new();
        if avail < n {
            posts.push(Post::Zero(pos + avail as usize, (n - avail) as usize));
        }
        let bch = channel(&b)?;
        let balign = b.block_size() as u64;
        if goff.is_multiple_of(balign) && avail.is_multiple_of(balign) {
            // SAFETY: the parent request outlives this sub-request: we await it here.
            let sub = unsafe { BdevIo::sub_io(io, pos as u64, avail, IoType::Read, goff, None) };
            let st = submit_wait(&bch, sub).await.status;
            if !st.is_ok() {
                return Err(BdevError::Io(st));
            }
        } else {
            let a0 = goff / balign * balign;
            let a1 = (goff + avail).next_multiple_of(balign).min(bsize);
            let buf = read_at(&bch, a0, (a1 - a0) as usize).await?;
            posts.push(Post::Data(
                pos,
                Rc::new(buf.as_slice().to_vec()),
                (goff - a0) as usize,
                avail as usize,
            ));
        }
        Ok(posts)
    }

    /// The decompressed contents of a compressed cluster (cached: the last one).
    async fn decompressed(&self, e: u64, host: u64, len: u64) -> R<Rc<Vec<u8>>> {
        if let Some((k, d)) = self.zcache.borrow().as_ref() {
            if *k == e {
                return Ok(d.clone());
            }
        }
        if host >= self.capacity.get() || host < self.cs {
            return Err(FormatError::Corrupt(format!(
                "compressed cluster at {host:#x} lies outside the image"
            ))
            .into());
        }
        let end = (host + len).min(self.capacity.get());
        let a0 = host / self.align * self.align;
        let a1 = end.next_multiple_of(self.align).min(self.capacity.get());
        let raw = read_at(&self.ch, a0, (a1 - a0) as usize).await?;
        let src = &raw.as_slice()[(host - a0) as usize..(end - a0) as usize];
        let mut out = vec![0u8; self.cs as usize];
        let kind = self.hdr.borrow().compression_type;
        decompress(kind, src, &mut out).map_err(|err| {
            tracing::error!(image = %self.name, offset = host, error = %err, "cannot decompress cluster");
            BdevError::from(err)
        })?;
        let d = Rc::new(out);
        *self.zcache.borrow_mut() = Some((e, d.clone()));
        Ok(d)
    }

    /// Refuses writes on read-only or broken images.
    fn writable(&self) -> R<()> {
        if self.read_only.get() {
            return Err(BdevError::Io(IoStatus::ReadOnly));
        }
        if self.broken.get() {
            return Err(BdevError::Io(IoStatus::Eio));
        }
        Ok(())
    }

    async fn write_req(self: &Rc<Self>, io: &mut BdevIo) -> R<()> {
        self.writable()?;
        let pio: &BdevIo = io;
        let futs: Vec<_> = self
            .segments(pio.offset, pio.len)
            .map(|(gc, intra, n, pos)| self.write_segment(pio, gc, intra, n, Src::Guest(pos)))
            .collect();
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    /// Writes one piece of a guest cluster: in place when the cluster is ours
    /// alone, else by allocating a new cluster (copy-on-write) under the cluster lock.
    pub(crate) async fn write_segment(
        self: &Rc<Self>,
        io: &BdevIo,
        gc: u64,
        intra: u64,
        n: u64,
        src: Src,
    ) -> R<()> {
        let e = self.entry(gc).await?;
        if let ClusterKind::Normal { host, copied: true } = self.kind(e)? {
            return self.write_in_place(io, host, intra, n, src).await;
        }
        let _lk = self.locks.lock(gc).await;
        let e = self.entry(gc).await?;
        match self.kind(e)? {
            ClusterKind::Normal { host, copied: true } => {
                self.write_in_place(io, host, intra, n, src).await
            }
            kind => self.cow_write(Some(io), gc, e, kind, intra, n, src).await,
        }
    }

    async fn write_in_place(&self, io: &BdevIo, host: u64, intra: u64, n: u64, src: Src) -> R<()> {
        self.check_data_end(host)?;
        self.pre_write_check(OverlapChecks::NONE, host + intra, n)
            .await?;
        let _g = self.drain.enter();
        match src {
            Src::Guest(pos) => {
                // SAFETY: the parent request outlives this sub-request: we await it here.
                let sub =
                    unsafe { BdevIo::sub_io(io, pos as u64, n, IoType::Write, host + intra, None) };
                let st = submit_wait(&self.ch, sub).await.status;
                if !st.is_ok() {
                    return Err(BdevError::Io(st));
                }
            }
            Src::Zeros => {
                write_at(&self.ch, host + intra, DmaBuf::new(n as usize)?).await?;
            }
        }
        Ok(())
    }

    /// Allocates a new cluster for `gc`, fills it with the old contents and the new
    /// data, points the L2 entry at it and queues the old cluster's release.
    /// The caller holds the cluster lock. `io` is needed for [`Src::Guest`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn cow_write(
        &self,
        io: Option<&BdevIo>,
        gc: u64,
        e: u64,
        kind: ClusterKind,
        intra: u64,
        n: u64,
        src: Src,
    ) -> R<()> {
        self.writable()?;
        let (host, fresh) = {
            let _m = self.meta.lock().await;
            self.alloc_cluster_fresh().await?
        };
        let res = self
            .fill_new_cluster(io, host, fresh, gc, e, kind, intra, n, src)
            .await;
        let _m = self.meta.lock().await;
        if let Err(err) = res {
            let _ = self.update_refcount(host / self.cs, -1).await;
            return Err(err);
        }
        if let Err(err) = self.set_entry(gc, L2Entry::normal(host).0).await {
            // No L2 entry points at the new cluster (e.g. no space for a new
            // L2 table): give it back rather than leak it.
            let _ = self.update_refcount(host / self.cs, -1).await;
            return Err(err);
        }
        self.queue_free(kind);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn fill_new_cluster(
        &self,
        io: Option<&BdevIo>,
        host: u64,
        fresh: bool,
        gc: u64,
        e: u64,
        kind: ClusterKind,
        intra: u64,
        n: u64,
        src: Src,
    ) -> R<()> {
        self.pre_write_check(OverlapChecks::NONE, host, self.cs)
            .await?;
        let full = intra == 0 && n == self.cs;
        if let (true, Src::Guest(pos), Some(io)) = (full, src, io) {
            return self.write_guest(io, pos, n, host).await;
        }
        if fresh && self.reads_zero(gc, kind) {
            // The host cluster already reads as zeroes: only the new data goes down.
            return match (src, io) {
                (Src::Guest(pos), Some(io)) => self.write_guest(io, pos, n, host + intra).await,
                (Src::Guest(_), None) => Err(BdevError::InvalidParam(
                    "guest data without a request".into(),
                )),
                (Src::Zeros, _) => Ok(()),
            };
        }
        if self.zeroes_on_base.get() && self.reads_zero(gc, kind) {
            match self.fill_zero_cluster(io, host, intra, n, src).await {
                Err(BdevError::Io(IoStatus::Unsupported)) => {
                    // The base cannot write zeroes: fill a buffer from now on.
                    self.zeroes_on_base.set(false);
                }
                r => return r,
            }
        }
        let mut buf = DmaBuf::new(self.cs as usize)?;
        if !full {
            self.read_cluster(gc, e, kind, buf.as_mut_slice()).await?;
        }
        let range = intra as usize..(intra + n) as usize;
        match (src, io) {
            (Src::Guest(pos), Some(io)) => io.copy_out(pos, &mut buf.as_mut_slice()[range]),
            (Src::Guest(_), None) => {
                return Err(BdevError::InvalidParam(
                    "guest data without a request".into(),
                ))
            }
            (Src::Zeros, _) => buf.as_mut_slice()[range].fill(0),
        }
        write_at(&self.ch, host, buf).await?;
        Ok(())
    }

    /// Writes `n` bytes of the parent's memory from `pos` at host offset `host`.
    async fn write_guest(&self, io: &BdevIo, pos: usize, n: u64, host: u64) -> R<()> {
        // SAFETY: the parent request outlives this sub-request: we await it here.
        let sub = unsafe { BdevIo::sub_io(io, pos as u64, n, IoType::Write, host, None) };
        let st = submit_wait(&self.ch, sub).await.status;
        if st.is_ok() {
            Ok(())
        } else {
            Err(BdevError::Io(st))
        }
    }

    /// Writes zeroes on the base over `[off, off+len)` (nothing when empty).
    async fn zero_on_base(&self, off: u64, len: u64) -> R<()> {
        if len == 0 {
            return Ok(());
        }
        let st = simple_io(&self.ch, IoType::WriteZeroes, off, len).await;
        if st.is_ok() {
            Ok(())
        } else {
            Err(BdevError::Io(st))
        }
    }

    /// Fills a new cluster whose old contents read as zeroes without a bounce
    /// buffer: the guest data goes straight from the request, the rest of the
    /// cluster is zeroed by the base (a cheap `fallocate` on files). The three
    /// ranges are disjoint, so they run concurrently.
    async fn fill_zero_cluster(
        &self,
        io: Option<&BdevIo>,
        host: u64,
        intra: u64,
        n: u64,
        src: Src,
    ) -> R<()> {
        let cs = self.cs;
        match (src, io) {
            (Src::Guest(pos), Some(io)) => {
                let (head, tail, data) = futures::future::join3(
                    self.zero_on_base(host, intra),
                    self.zero_on_base(host + intra + n, cs - intra - n),
                    self.write_guest(io, pos, n, host + intra),
                )
                .await;
                head.and(tail).and(data)
            }
            (Src::Guest(_), None) => Err(BdevError::InvalidParam(
                "guest data without a request".into(),
            )),
            (Src::Zeros, _) => self.zero_on_base(host, cs).await,
        }
    }

    /// The current contents of guest cluster `gc` (described by `e`/`kind`) into `out`.
    pub(crate) async fn read_cluster(
        &self,
        gc: u64,
        e: u64,
        kind: ClusterKind,
        out: &mut [u8],
    ) -> R<()> {
        match kind {
            ClusterKind::Zero { .. } => out.fill(0),
            ClusterKind::Normal { host, .. } => {
                self.check_data_cluster(host)?;
                let b = read_at(&self.ch, host, self.cs as usize).await?;
                out.copy_from_slice(b.as_slice());
            }
            ClusterKind::Compressed { host, len } => {
                let d = self.decompressed(e, host, len).await?;
                out.copy_from_slice(&d);
            }
            ClusterKind::Unallocated => {
                out.fill(0);
                let Some(b) = self.backing.borrow().clone() else {
                    return Ok(());
                };
                let goff = gc * self.cs;
                let bsize = b.size();
                if goff >= bsize {
                    return Ok(());
                }
                let end = (goff + self.cs).min(bsize);
                let balign = b.block_size() as u64;
                let a1 = end.next_multiple_of(balign).min(bsize);
                let bch = channel(&b)?;
                let data = read_at(&bch, goff, (a1 - goff) as usize).await?;
                let k = (end - goff) as usize;
                out[..k].copy_from_slice(&data.as_slice()[..k]);
            }
        }
        Ok(())
    }

    /// Queues the release of the host cluster(s) an old entry used.
    pub(crate) fn queue_free(&self, kind: ClusterKind) {
        let r = match kind {
            ClusterKind::Normal { host, .. } => Some((host, self.cs)),
            ClusterKind::Zero { host } if host != 0 => Some((host, self.cs)),
            ClusterKind::Compressed { host, len } => Some((
                host,
                len.min(self.capacity.get().saturating_sub(host)).max(1),
            )),
            _ => None,
        };
        if let Some(r) = r {
            self.frees.borrow_mut().push(r);
        }
    }

    /// Whether a guest cluster of this kind already reads as zeroes.
    pub(crate) fn reads_zero(&self, gc: u64, kind: ClusterKind) -> bool {
        match kind {
            ClusterKind::Zero { .. } => true,
            ClusterKind::Unallocated => self
                .backing
                .borrow()
                .as_ref()
                .is_none_or(|b| gc * self.cs >= b.size()),
            _ => false,
        }
    }

    /// Write-zeroes (`unmap == false`) and discard: zero clusters where the format
    /// allows, explicit zero data elsewhere. Both read back as zeroes.
    async fn zero_req(self: &Rc<Self>, io: &BdevIo, unmap: bool) -> R<()> {
        self.writable()?;
        let has_backing = self.backing.borrow().is_some();
        let v3 = self.version >= 3;
        for (gc, intra, n, _) in self.segments(io.offset, io.len).collect::<Vec<_>>() {
            let whole = intra == 0 && (n == self.cs || gc * self.cs + n >= self.size.get());
            if whole && (v3 || !has_backing) {
                let target = if v3 && (has_backing || !unmap) {
                    L2Entry::zero().0
                } else {
                    0
                };
                let _lk = self.locks.lock(gc).await;
                let _m = self.meta.lock().await;
                let e = self.entry_locked(gc).await?;
                let kind = self.kind(e)?;
                if e == target || (target == 0 && kind == ClusterKind::Unallocated) {
                    continue;
                }
                self.set_entry(gc, target).await?;
                self.queue_free(kind);
                continue;
            }
            let e = self.entry(gc).await?;
            if self.reads_zero(gc, self.kind(e)?) {
                continue;
            }
            self.write_segment(io, gc, intra, n, Src::Zeros).await?;
        }
        Ok(())
    }
}
