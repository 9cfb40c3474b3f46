//! A front end's memory, as `SET_MEM_TABLE` describes it: each region's file
//! (a shared memfd) mapped once, shared and read-write, and addressed by guest
//! physical address (descriptors) or by the front end's virtual address (the
//! rings' addresses in `SET_VRING_ADDR`).
//!
//! A region whose file is shorter than the region, or that overlaps another, is
//! refused before anything is mapped: touching a page past a file's end would
//! raise SIGBUS in the service. Every address a request uses is checked against
//! the regions ([`GuestMem::host_segments`]); one outside them fails the request.
//!
//! This is the crate's one `unsafe` block: [`GuestMem::request`] builds a bdev
//! request over the guest's pages ([`BdevIo::over_foreign`]) from segments
//! only this module can make, checked inside this mapping and not
//! overlapping, with the mapping's `Arc` as the request's keeper.

use bdev::{BdevIo, IoDone, IoType};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// The most regions accepted (QEMU sends at most 8 in one table).
pub const MAX_REGIONS: usize = 32;

/// One mapped region's addresses.
#[derive(Debug, Clone, Copy)]
struct Span {
    uva: u64,
    gpa: u64,
    size: u64,
}

/// A front end's memory, mapped. Requests in flight hold it through an `Arc`,
/// so a new table (or a disconnect) unmaps it only once they have completed.
pub struct GuestMem {
    /// The mappings, by guest physical address (what `virtio-queue` reads).
    pub mem: GuestMemoryMmap<()>,
    spans: Vec<Span>,
}

impl std::fmt::Debug for GuestMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMem")
            .field("spans", &self.spans)
            .finish()
    }
}

impl GuestMem {
    /// Maps `regions`, each over the file of the same index.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, String> {
        if regions.is_empty() || regions.len() > MAX_REGIONS || regions.len() != files.len() {
            return Err(format!(
                "memory table: {} regions with {} files",
                regions.len(),
                files.len()
            ));
        }
        let mut spans: Vec<Span> = Vec::with_capacity(regions.len());
        for r in regions {
            let (gpa, size, uva) = (r.guest_phys_addr, r.memory_size, r.user_addr);
            if size == 0
                || gpa.checked_add(size).is_none()
                || uva.checked_add(size).is_none()
                || r.mmap_offset.checked_add(size).is_none()
                || usize::try_from(size).is_err()
            {
                return Err(format!("memory region at {gpa:#x}: bad size {size:#x}"));
            }
            for s in &spans {
                if gpa < s.gpa + s.size && s.gpa < gpa + size {
                    return Err(format!("memory region at {gpa:#x} overlaps another"));
                }
            }
            spans.push(Span { uva, gpa, size });
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            let (gpa, size, off) = (r.guest_phys_addr, r.memory_size, r.mmap_offset);
            let meta = file
                .metadata()
                .map_err(|e| format!("memory region fd {}: {e}", file.as_raw_fd()))?;
            if !meta.file_type().is_file() || meta.len() < off + size {
                return Err(format!(
                    "memory region at {gpa:#x}: its file ({} bytes) does not hold offset {off:#x} + size {size:#x}",
                    meta.len(),
                ));
            }
            let m = MmapRegion::<()>::from_file(FileOffset::new(file, off), size as usize)
                .map_err(|e| format!("mapping memory region at {gpa:#x}: {e}"))?;
            let g = GuestRegionMmap::new(m, GuestAddress(gpa))
                .ok_or_else(|| format!("memory region at {gpa:#x}: overflow"))?;
            mapped.push(g);
        }
        mapped.sort_by_key(|g| g.start_addr());
        let mem =
            GuestMemoryMmap::from_regions(mapped).map_err(|e| format!("memory table: {e}"))?;
        Ok(Self { mem, spans })
    }

    /// The guest physical address of the front end's virtual address `uva`,
    /// where `len` bytes from it lie in one region.
    pub fn uva_to_gpa(&self, uva: u64, len: u64) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| uva >= s.uva && uva.checked_add(len).is_some_and(|e| e <= s.uva + s.size))
            .map(|s| s.gpa + (uva - s.uva))
    }

    /// Appends the host addresses of guest range `[gpa, gpa+len)` to `out`,
    /// split where it crosses regions; `false` (with `out` partly filled) if
    /// any byte of it lies outside every region, or `out` holds segments of
    /// another mapping.
    pub fn host_segments(&self, gpa: u64, len: u64, out: &mut GuestSegs) -> bool {
        let me = self as *const GuestMem as usize;
        if !out.segs.is_empty() && out.owner != me {
            return false;
        }
        out.owner = me;
        let out = &mut out.segs;
        let (mut at, mut left) = (gpa, len);
        while left > 0 {
            let Some(r) = self.mem.find_region(GuestAddress(at)) else {
                return false;
            };
            let off = at - r.start_addr().0;
            let take = (r.len() - off).min(left);
            // The region found: no second lookup for the address.
            let Ok(p) = r.get_host_address(MemoryRegionAddress(off)) else {
                return false;
            };
            out.push((p, take as usize));
            at += take;
            left -= take;
        }
        true
    }
}

/// Host segments of guest ranges, made only by [`GuestMem::host_segments`]
/// (so each lies inside the mapping that made it).
#[derive(Default)]
pub struct GuestSegs {
    segs: Vec<(*mut u8, usize)>,
    owner: usize,
}

impl GuestSegs {
    /// Empties it for the next request.
    pub fn clear(&mut self) {
        self.segs.clear();
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.segs.iter().map(|s| s.1 as u64).sum()
    }

    /// Whether it holds no segment.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Whether two segments overlap: pairwise for the few segments of a
    /// usual request (no allocation per request), sorted for many.
    fn overlap(&self) -> bool {
        let s = &self.segs;
        let meets = |a: (*mut u8, usize), b: (*mut u8, usize)| {
            let (a0, b0) = (a.0 as usize, b.0 as usize);
            a0 < b0 + b.1 && b0 < a0 + a.1
        };
        if s.len() <= 8 {
            return (1..s.len()).any(|j| s[..j].iter().any(|&a| meets(a, s[j])));
        }
        let mut v: Vec<(usize, usize)> = s.iter().map(|&(p, l)| (p as usize, l)).collect();
        v.sort_unstable();
        v.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
    }
}

impl GuestMem {
    /// A read or write of `segs` at byte `offset`, straight over the guest's
    /// pages; `None` when the segments are not this mapping's or overlap (a
    /// guest's crafted descriptors), which fails the request.
    pub fn request(
        self: &Arc<Self>,
        io_type: IoType,
        offset: u64,
        segs: &GuestSegs,
        done: Option<Rc<dyn IoDone>>,
    ) -> Option<Box<BdevIo>> {
        if segs.is_empty() || segs.owner != Arc::as_ptr(self) as usize || segs.overlap() {
            return None;
        }
        // SAFETY: every segment was made by `host_segments` of this mapping, so
        // lies inside one of its regions, which stay mapped while the request
        // holds its keeper (an `Arc` of this mapping); no two segments overlap
        // (checked above); nothing else in this process uses guest pages while
        // the request is in flight (the guest owns them until it sees the
        // completion, as with a DMA device).
        Some(unsafe { BdevIo::over_foreign(io_type, offset, &segs.segs, self.clone(), done) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: u64) -> File {
        let p = std::env::temp_dir().join(format!("vublk-mem-{}-{len}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(len).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    #[test]
    fn a_file_shorter_than_its_region_is_refused() {
        let r = [VhostUserMemoryRegion::new(0, 1 << 20, 0x7000_0000, 0)];
        let e = GuestMem::map(&r, vec![file(4096)]).unwrap_err();
        assert!(e.contains("does not hold"), "{e}");
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let r = [
            VhostUserMemoryRegion::new(0, 8192, 0x7000_0000, 0),
            VhostUserMemoryRegion::new(4096, 8192, 0x8000_0000, 0),
        ];
        let e = GuestMem::map(&r, vec![file(8192), file(8192)]).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn addresses_translate_within_regions_only() {
        let r = [
            VhostUserMemoryRegion::new(0, 8192, 0x7000_0000, 0),
            VhostUserMemoryRegion::new(8192, 8192, 0x9000_0000, 0),
        ];
        let m = Arc::new(GuestMem::map(&r, vec![file(8192), file(8192)]).unwrap());
        assert_eq!(m.uva_to_gpa(0x9000_0010, 16), Some(8192 + 16));
        assert_eq!(
            m.uva_to_gpa(0x7000_1ff8, 16),
            None,
            "crosses the region's end"
        );
        let mut s = GuestSegs::default();
        assert!(m.host_segments(4096, 8192, &mut s), "spans both regions");
        assert_eq!(s.segs.len(), 2);
        assert_eq!(s.len(), 8192);
        assert!(m.request(IoType::Read, 0, &s, None).is_some());
        let mut bad = GuestSegs::default();
        assert!(
            !m.host_segments(12288, 8192, &mut bad),
            "runs past the memory"
        );
        let mut dup = GuestSegs::default();
        assert!(m.host_segments(0, 4096, &mut dup) && m.host_segments(2048, 4096, &mut dup));
        assert!(
            m.request(IoType::Read, 0, &dup, None).is_none(),
            "overlapping segments"
        );
    }

    #[test]
    fn overlap_is_found_among_few_and_many_segments() {
        let r = [VhostUserMemoryRegion::new(0, 1 << 16, 0x7000_0000, 0)];
        let m = Arc::new(GuestMem::map(&r, vec![file(1 << 16)]).unwrap());
        for n in [2u64, 3, 8, 9, 20] {
            // Touching segments, in reverse order: no overlap.
            let mut s = GuestSegs::default();
            for i in (0..n).rev() {
                assert!(m.host_segments(i * 512, 512, &mut s));
            }
            assert!(m.request(IoType::Read, 0, &s, None).is_some(), "{n} apart");
            // The last one reaches one byte into the first.
            let mut s = GuestSegs::default();
            for i in 0..n - 1 {
                assert!(m.host_segments(i * 512 + 512, 512, &mut s));
            }
            assert!(m.host_segments(1, 512, &mut s));
            assert!(
                m.request(IoType::Read, 0, &s, None).is_none(),
                "{n} with one overlap"
            );
        }
    }
}
