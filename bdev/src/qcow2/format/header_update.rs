//! A header change that a power loss cannot tear: the plan of the writes
//! that take the header cluster on disk from its old bytes to a new
//! [`Header`], each step flushed before the next.
//!
//! The contract: the first `unit` bytes of the cluster (one sector of the
//! base, which a disk writes whole) are the commit record. They hold every
//! fixed field, the backing name's offset and length, and the start of the
//! extension chain. The plan writes, first, every byte the new header uses
//! beyond that sector ([`HeaderWrite::tail`]), over bytes the old header does
//! not read (where the new backing name would land on bytes the old header
//! reads, it goes elsewhere in the cluster); then, after a flush, the first
//! sector ([`HeaderWrite::head`]). A crash before the head lands leaves the
//! old header whole (it reads none of the bytes the tail changed, however
//! much of the tail landed); after it, the new one. Where the new extension
//! chain itself differs from the old beyond the first sector, no such order
//! exists: the plan is the whole cluster in one write ([`HeaderWrite::whole`]),
//! as QEMU's `qcow2_update_header` always does. Sluice's own changes (backing
//! file and format, sizes, tables, feature bits) keep QEMU's extensions, which
//! fit in the first sector, so they always take the two steps.

use super::{be32, be64, put64, FormatError, Header, MAGIC};

/// The writes of one header change, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderWrite {
    /// Written and flushed first: `(offset, bytes)` at whole units past the
    /// first, the old cluster's bytes with the new header's over them.
    pub tail: Option<(u64, Vec<u8>)>,
    /// Written last, at offset 0: the first unit, or the whole cluster when
    /// [`HeaderWrite::whole`].
    pub head: Vec<u8>,
    /// The change could not be ordered: `head` is the whole cluster.
    pub whole: bool,
}

/// Byte ranges `[start, end)` of `cluster` that a reader of its header uses:
/// the fixed header and the extension chain up to and including its end
/// marker, and the backing name. Bytes that do not parse as a header count
/// as all used.
pub fn used_ranges(cluster: &[u8]) -> Vec<(usize, usize)> {
    let all = vec![(0, cluster.len())];
    if cluster.len() < 72 || be32(cluster, 0) != MAGIC {
        return all;
    }
    let version = be32(cluster, 4);
    let hdr_len = match version {
        2 => 72,
        3 if cluster.len() >= 104 => be32(cluster, 100) as usize,
        _ => return all,
    };
    let (bo, bs) = (be64(cluster, 8), be32(cluster, 16) as u64);
    let ext_end = if bo != 0 {
        bo.min(cluster.len() as u64) as usize
    } else {
        cluster.len()
    };
    let mut pos = hdr_len.next_multiple_of(8);
    let chain_end = loop {
        if pos + 8 > ext_end {
            // A chain without its end marker: whatever is there is read.
            break ext_end.max(hdr_len.min(cluster.len()));
        }
        let kind = be32(cluster, pos);
        let len = be32(cluster, pos + 4) as usize;
        pos += 8;
        if kind == 0 {
            break pos;
        }
        pos = pos.saturating_add(len.next_multiple_of(8));
    };
    let mut r = vec![(0, chain_end.min(cluster.len()))];
    if bo != 0 {
        let end = bo.saturating_add(bs).min(cluster.len() as u64) as usize;
        r.push(((bo as usize).min(end), end));
    }
    r
}

fn overlaps(ranges: &[(usize, usize)], s: usize, e: usize) -> bool {
    ranges.iter().any(|&(a, b)| a < e && s < b)
}

/// Whether writing `new`'s used bytes at or past `unit` over `old` changes a
/// byte that `old`'s header reads.
fn conflicts(old: &[u8], old_used: &[(usize, usize)], new: &[u8], unit: usize) -> bool {
    used_ranges(new)
        .iter()
        .any(|&(s, e)| (s.max(unit)..e).any(|i| old[i] != new[i] && overlaps(old_used, i, i + 1)))
}

/// Moves `new`'s backing name (at offset 8 / length 16) to the first
/// 8-aligned offset past its extension chain where it overlaps none of
/// `avoid`; `None` if there is none.
fn relocate_name(new: &[u8], avoid: &[(usize, usize)]) -> Option<Vec<u8>> {
    let bo = be64(new, 8) as usize;
    let bs = be32(new, 16) as usize;
    if bo == 0 || bs == 0 {
        return None;
    }
    let chain_end = used_ranges(new)[0].1;
    let mut starts: Vec<usize> = std::iter::once(chain_end)
        .chain(avoid.iter().map(|&(_, e)| e))
        .map(|p| p.next_multiple_of(8))
        .filter(|&p| p >= chain_end)
        .collect();
    starts.sort_unstable();
    let q = starts
        .into_iter()
        .find(|&q| q + bs <= new.len() && !overlaps(avoid, q, q + bs))?;
    let mut out = new.to_vec();
    let name = new[bo..bo + bs].to_vec();
    out[bo..bo + bs].fill(0);
    out[q..q + bs].copy_from_slice(&name);
    put64(&mut out, 8, q as u64);
    Some(out)
}

/// The writes that change the header cluster `old` (as on disk, a whole
/// cluster) into `hdr`, with `unit` the size of the first write (the base's
/// block size, at least 512).
pub fn plan_update(old: &[u8], hdr: &Header, unit: usize) -> Result<HeaderWrite, FormatError> {
    let new = hdr.to_cluster()?;
    let cs = new.len();
    let whole = |new: Vec<u8>| HeaderWrite {
        tail: None,
        head: new,
        whole: true,
    };
    if old.len() != cs || cs <= unit || unit == 0 || !cs.is_multiple_of(unit) {
        return Ok(whole(new));
    }
    let old_used = used_ranges(old);
    let new = if !conflicts(old, &old_used, &new, unit) {
        new
    } else {
        let avoid: Vec<(usize, usize)> = old_used
            .iter()
            .map(|&(s, e)| (s.max(unit), e))
            .filter(|&(s, e)| s < e)
            .collect();
        match relocate_name(&new, &avoid) {
            Some(n) if !conflicts(old, &old_used, &n, unit) => n,
            _ => return Ok(whole(new)),
        }
    };
    // The tail: the old bytes with the new header's used bytes past the
    // first unit over them, over the units where they differ.
    let mut img = old.to_vec();
    let (mut lo, mut hi) = (usize::MAX, 0);
    for (s, e) in used_ranges(&new) {
        for i in s.max(unit)..e {
            if img[i] != new[i] {
                img[i] = new[i];
                lo = lo.min(i);
                hi = hi.max(i + 1);
            }
        }
    }
    let tail = (lo < hi).then(|| {
        let (s, e) = (lo / unit * unit, hi.next_multiple_of(unit));
        (s as u64, img[s..e].to_vec())
    });
    Ok(HeaderWrite {
        tail,
        head: new[..unit].to_vec(),
        whole: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(name: Option<&str>) -> Header {
        let mut h = Header::parse(&base_cluster(), 1 << 30).expect("a header");
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.map(|_| "qcow2".to_string());
        h
    }

    /// A v3 header with QEMU's feature table, 64 KiB clusters.
    fn base_cluster() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        super::super::put32(&mut b, 0, MAGIC);
        super::super::put32(&mut b, 4, 3);
        super::super::put32(&mut b, 20, 16);
        put64(&mut b, 24, 1 << 20);
        put64(&mut b, 40, 0x30000);
        put64(&mut b, 48, 0x10000);
        super::super::put32(&mut b, 56, 1);
        super::super::put32(&mut b, 36, 1);
        super::super::put32(&mut b, 96, 4);
        super::super::put32(&mut b, 100, 112);
        let mut h = Header::parse(&b, 1 << 30).expect("parse");
        h.extensions.push(Header::qemu_feature_table());
        h.to_cluster().expect("cluster")
    }

    /// Every state a torn plan can leave (any subset of the tail's sectors,
    /// then the head whole or not) parses as the old or the new header.
    fn all_states_parse(old: &[u8], new_hdr: &Header, unit: usize) {
        let old_hdr = Header::parse(old, 1 << 30).expect("old parses");
        let p = plan_update(old, new_hdr, unit).expect("plan");
        assert!(!p.whole, "a backing change needs no whole-cluster write");
        let mut disk = old.to_vec();
        if let Some((off, t)) = &p.tail {
            let off = *off as usize;
            let sectors = t.len() / 512;
            for mask in 0..(1u32 << sectors.min(12)) {
                let mut d = old.to_vec();
                for s in 0..sectors {
                    if mask & (1 << s.min(11)) != 0 {
                        d[off + s * 512..off + (s + 1) * 512]
                            .copy_from_slice(&t[s * 512..(s + 1) * 512]);
                    }
                }
                let h = Header::parse(&d, 1 << 30).expect("a torn tail still parses");
                assert_eq!(h.backing_file, old_hdr.backing_file);
                assert_eq!(h.backing_format, old_hdr.backing_format);
            }
            disk[off..off + t.len()].copy_from_slice(t);
        }
        disk[..p.head.len()].copy_from_slice(&p.head);
        let h = Header::parse(&disk, 1 << 30).expect("the new header parses");
        assert_eq!(h.backing_file, new_hdr.backing_file);
        assert_eq!(h.backing_format, new_hdr.backing_format);
        assert_eq!(h.size, new_hdr.size);
    }

    #[test]
    fn backing_changes_take_two_ordered_steps() {
        let long =
            "/a/rather/long/path/to/some/backing/file/that/crosses/into/the/next/sector.qcow2";
        let cases: [(Option<&str>, Option<&str>); 6] = [
            (None, Some(long)),
            (Some(long), None),
            (Some(long), Some("/short.qcow2")),
            (Some("/short.qcow2"), Some(long)),
            (Some(long), Some(&long[1..])),
            (Some(long), Some(long)),
        ];
        for (a, b) in cases {
            let mut old = hdr(a).to_cluster().expect("old");
            // Leftovers of an earlier change past the chain stay harmless.
            old[2000..2010].fill(0xab);
            all_states_parse(&old, &hdr(b), 512);
            // And again from the state the first change left.
            let p = plan_update(&old, &hdr(b), 512).expect("plan");
            let mut disk = old.clone();
            if let Some((off, t)) = &p.tail {
                disk[*off as usize..*off as usize + t.len()].copy_from_slice(t);
            }
            disk[..512].copy_from_slice(&p.head);
            all_states_parse(&disk, &hdr(a), 512);
        }
    }

    #[test]
    fn a_name_on_the_old_ones_bytes_moves() {
        let long = "/x".repeat(100);
        let old = hdr(Some(&long)).to_cluster().expect("old");
        let p = plan_update(&old, &hdr(Some(&"/y".repeat(100))), 512).expect("plan");
        let (off, t) = p.tail.expect("a tail");
        let mut disk = old.clone();
        disk[off as usize..off as usize + t.len()].copy_from_slice(&t);
        disk[..512].copy_from_slice(&p.head);
        let new_off = be64(&disk, 8) as usize;
        let old_off = be64(&old, 8) as usize;
        assert!(new_off >= old_off + long.len(), "{new_off} {old_off}");
    }

    #[test]
    fn small_clusters_and_garbage_are_one_write() {
        let h = hdr(Some("/b.qcow2"));
        let old = h.to_cluster().expect("old");
        let p = plan_update(&old, &h, 65536).expect("plan");
        assert!(p.whole && p.head.len() == 65536);
        let p = plan_update(&vec![0xff; 65536], &h, 512).expect("plan");
        assert!(p.whole, "an unreadable old header is replaced whole");
        assert_eq!(used_ranges(&[1, 2, 3]), vec![(0, 3)]);
    }
}
