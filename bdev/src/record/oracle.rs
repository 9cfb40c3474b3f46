//! The guest's view: what a workload wrote through the image, what it was
//! told was acknowledged and durable, and when (in the seqs of the record
//! log underneath), so that a crash state's contents can be judged.
//!
//! Every sector a workload writes carries its generation and its own sector
//! number ([`Oracle::data`]), so a sector read back names the write it came
//! from. A workload keeps guest requests to one sector from overlapping in
//! time (one request to a range in flight at once): the versions of a
//! sector are then totally ordered.
//!
//! The rule checked ([`Oracle::check`]): in a crash state the user could
//! have learnt only what it learnt before the state's `next` seq. Every
//! sector must hold its newest version durable by then (a write acknowledged
//! before a flush that then completed, or a FUA write acknowledged), or a
//! version submitted after it and before `next`; with no durable version,
//! the initial contents or any version submitted before `next`.

use super::replay::SECTOR;

/// One guest request that changes contents.
#[derive(Debug, Clone)]
struct Gen {
    /// Data (`true`) or zeroes (write-zeroes, discard).
    data: bool,
    /// Log seq when it was submitted.
    submitted: u64,
    /// The oracle's own order of its acknowledgement.
    acked_order: Option<u64>,
    /// Log seq from which it is durable.
    durable: Option<u64>,
}

/// The guest's writes and what it was told.
pub struct Oracle {
    initial: Vec<u8>,
    gens: Vec<Gen>,
    /// Per sector, the generations that wrote it (index + 1), in order.
    versions: Vec<Vec<u32>>,
    clock: u64,
}

/// A flush the guest submitted.
#[derive(Debug, Clone, Copy)]
pub struct FlushTicket(u64);

/// The contents of sector `lba` as generation `gen` writes it.
pub fn sector_pattern(gen: u64, lba: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&gen.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    let mut x = gen.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ lba.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for b in out[16..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

impl Oracle {
    /// A guest disk whose contents start as `initial` (zeroes, or what its
    /// backing file holds).
    pub fn new(initial: Vec<u8>) -> Oracle {
        let n = initial.len().div_ceil(SECTOR as usize);
        Oracle {
            initial,
            gens: Vec::new(),
            versions: vec![Vec::new(); n],
            clock: 0,
        }
    }

    /// The guest disk's size.
    pub fn size(&self) -> u64 {
        self.initial.len() as u64
    }

    fn add(&mut self, offset: u64, len: u64, data: bool, seq: u64) -> u64 {
        self.gens.push(Gen {
            data,
            submitted: seq,
            acked_order: None,
            durable: None,
        });
        let g = self.gens.len() as u32;
        for s in offset / SECTOR..(offset + len).div_ceil(SECTOR) {
            self.versions[s as usize].push(g);
        }
        g as u64
    }

    /// A write of `len` bytes at `offset` (sector-aligned) about to be
    /// submitted, `seq` being the log's seq now: its generation.
    pub fn submit_write(&mut self, offset: u64, len: u64, seq: u64) -> u64 {
        self.add(offset, len, true, seq)
    }

    /// A write-zeroes or discard (reads back zeroes) about to be submitted.
    pub fn submit_zeroes(&mut self, offset: u64, len: u64, seq: u64) -> u64 {
        self.add(offset, len, false, seq)
    }

    /// The data generation `gen` writes at `offset`.
    pub fn data(gen: u64, offset: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        for (i, c) in v.chunks_mut(SECTOR as usize).enumerate() {
            sector_pattern(gen, offset / SECTOR + i as u64, c);
        }
        v
    }

    /// Generation `gen` was acknowledged successfully (`seq`: the log's seq
    /// now); with FUA it is durable from `seq`.
    pub fn acked(&mut self, gen: u64, fua: bool, seq: u64) {
        self.clock += 1;
        let g = &mut self.gens[gen as usize - 1];
        g.acked_order = Some(self.clock);
        if fua {
            g.durable.get_or_insert(seq);
        }
    }

    /// A flush is about to be submitted.
    pub fn flush_submitted(&mut self) -> FlushTicket {
        self.clock += 1;
        FlushTicket(self.clock)
    }

    /// That flush completed successfully (`seq`: the log's seq now): what
    /// was acknowledged before it was submitted is durable from `seq`.
    pub fn flushed(&mut self, t: FlushTicket, seq: u64) {
        for g in &mut self.gens {
            if g.acked_order.is_some_and(|a| a < t.0) {
                g.durable.get_or_insert(seq);
            }
        }
    }

    /// Every generation durable from `seq` (a job's end: its writes are
    /// all flushed).
    pub fn all_durable(&mut self, seq: u64) {
        for g in &mut self.gens {
            if g.acked_order.is_some() {
                g.durable.get_or_insert(seq);
            }
        }
    }

    /// Generations that were made durable by `seq`.
    pub fn durable_count(&self, seq: u64) -> usize {
        self.gens
            .iter()
            .filter(|g| g.durable.is_some_and(|d| d < seq))
            .count()
    }

    fn matches(&self, v: u32, lba: u64, got: &[u8], tmp: &mut [u8]) -> bool {
        if v == 0 {
            let at = (lba * SECTOR) as usize;
            return got == &self.initial[at..at + got.len()];
        }
        if !self.gens[v as usize - 1].data {
            return got.iter().all(|&b| b == 0);
        }
        sector_pattern(v as u64, lba, tmp);
        got == &tmp[..got.len()]
    }

    /// Judges `contents` (the guest disk read back from a crash state whose
    /// user knew what it learnt before seq `next`). `Err` names the first
    /// sectors that hold an older version than a durable one, or something
    /// no write put there.
    pub fn check(&self, contents: &[u8], next: u64) -> Result<(), String> {
        if contents.len() != self.initial.len() {
            return Err(format!(
                "read {} bytes of a {}-byte disk",
                contents.len(),
                self.initial.len()
            ));
        }
        let mut tmp = vec![0u8; SECTOR as usize];
        let mut bad = Vec::new();
        let mut nbad = 0usize;
        for (lba, vs) in self.versions.iter().enumerate() {
            let at = lba * SECTOR as usize;
            let got = &contents[at..(at + SECTOR as usize).min(contents.len())];
            let lba = lba as u64;
            let d = vs
                .iter()
                .rposition(|&g| self.gens[g as usize - 1].durable.is_some_and(|s| s < next));
            let (first, floor) = match d {
                Some(i) => (i, vs[i]),
                None => (0, 0),
            };
            let mut ok = self.matches(floor, lba, got, &mut tmp);
            if !ok {
                let from = if d.is_some() { first + 1 } else { 0 };
                ok = vs[from..].iter().any(|&g| {
                    self.gens[g as usize - 1].submitted < next
                        && self.matches(g, lba, got, &mut tmp)
                });
            }
            if ok {
                continue;
            }
            nbad += 1;
            if bad.len() < 4 {
                let older = (0..first).any(|i| self.matches(vs[i], lba, got, &mut tmp))
                    || (d.is_some() && self.matches(0, lba, got, &mut tmp));
                bad.push(format!(
                    "sector {lba}: {} (durable generation {floor}, header {:?})",
                    if older {
                        "an older version than a durable write (lost write)"
                    } else {
                        "contents no write put there"
                    },
                    &got[..16.min(got.len())]
                ));
            }
        }
        if nbad == 0 {
            Ok(())
        } else {
            Err(format!("{nbad} sectors wrong: {}", bad.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_must_read_back() {
        let mut o = Oracle::new(vec![0u8; 4096]);
        let g1 = o.submit_write(0, 1024, 1);
        o.acked(g1, false, 2);
        let t = o.flush_submitted();
        let g2 = o.submit_write(0, 512, 3);
        o.flushed(t, 5);
        o.acked(g2, false, 6);
        let mut disk = vec![0u8; 4096];
        // Before the flush completed, nothing is owed.
        o.check(&disk, 5).unwrap();
        // After it, generation 1 (or the newer 2 on sector 0) is.
        let e = o.check(&disk, 6).unwrap_err();
        assert!(
            e.contains("2 sectors wrong") && e.contains("lost write"),
            "{e}"
        );
        disk[..1024].copy_from_slice(&Oracle::data(g1, 0, 1024));
        o.check(&disk, 6).unwrap();
        disk[..512].copy_from_slice(&Oracle::data(g2, 0, 512));
        o.check(&disk, 6).unwrap();
        disk[600] ^= 1;
        let e = o.check(&disk, 6).unwrap_err();
        assert!(e.contains("no write put there"), "{e}");
    }
}
