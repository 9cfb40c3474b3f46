//! The replayer: crash states built from a record log.
//!
//! # The model
//!
//! - A request that changes the base (write, write-zeroes, discard) is
//!   *durable* at the earliest of: its own completion if it was FUA; the
//!   completion of the first successful flush *submitted after it completed*.
//!   A request that failed changed nothing (the bases we record fail before
//!   writing: ENOSPC of a size-limited base, injected errors).
//! - *Durability points* are the seqs at which something became durable
//!   (every successful flush completion and FUA completion), plus the start
//!   of the log. Between point `j` (seq `s`) and the next one (`next`) the
//!   disk holds everything durable at `s` plus any subset of what was
//!   submitted before `next` and is not yet durable: requests not separated
//!   by a completed flush may land in any order.
//! - Two versions of one sector land in the order of completion (a request
//!   still in flight at the end of the log counts as completing after every
//!   completed one): the state of a sector is the newest version among those
//!   that landed, never an older one over a newer one.
//! - Granularity: a 512-byte sector is atomic. A request may land *torn*
//!   (any subset of its sectors) when the plan allows it, the image header
//!   included (qcow2 changes it in flushed steps, first sector last:
//!   `qcow2::format::plan_update`).
//! - A discard or write-zeroes that lands makes its range zeroes; one that
//!   does not land leaves it unchanged (QEMU's qcow2 over a file relies on a
//!   discard only for space, so both must be safe).
//!
//! # The states
//!
//! For each point: the durable state itself, the prefixes of its candidates
//! in completion order (all of them, or [`Plan::max_prefixes`] spread evenly),
//! and [`Plan::random`] random subsets (each candidate with probability 1/2,
//! torn with probability 1/4 when [`Plan::torn`]). Every state is
//! materialised in one scratch file: the durable image is kept up to date
//! as the points advance, a state's candidates are written over it, the
//! check runs, and the bytes they replaced are written back.

use super::log::{Event, Log};
use crate::error::BdevError;
use crate::io::IoType;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The atomic unit of the model, in bytes.
pub const SECTOR: u64 = 512;

/// One logged request, submission and completion together.
#[derive(Debug, Clone)]
pub struct Op {
    /// Its id in the log.
    pub id: u64,
    /// Write, flush, unmap or write-zeroes.
    pub io_type: IoType,
    /// Force unit access.
    pub fua: bool,
    /// Byte offset on the base.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// A write's data.
    pub data: Option<Arc<[u8]>>,
    /// Seq of its submission.
    pub sub: u64,
    /// Seq of its completion, if it completed.
    pub cmp: Option<u64>,
    /// Its errno (0: success or not completed).
    pub errno: i32,
}

impl Op {
    /// Whether it changes the base's contents.
    pub fn changes(&self) -> bool {
        matches!(
            self.io_type,
            IoType::Write | IoType::WriteZeroes | IoType::Unmap
        )
    }
    fn failed(&self) -> bool {
        self.cmp.is_some() && self.errno != 0
    }
    fn ok(&self) -> bool {
        self.cmp.is_some() && self.errno == 0
    }
    /// Its place in the order versions of a sector land in.
    fn key(&self) -> u64 {
        self.cmp.unwrap_or(u64::MAX / 2 + self.sub)
    }
}

/// The requests of a log, by id.
pub fn ops(log: &Log) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::new();
    for e in &log.events {
        match e {
            Event::Submit {
                id,
                seq,
                io_type,
                fua,
                offset,
                len,
                data,
            } => ops.push(Op {
                id: *id,
                io_type: *io_type,
                fua: *fua,
                offset: *offset,
                len: *len,
                data: data.clone(),
                sub: *seq,
                cmp: None,
                errno: 0,
            }),
            Event::Complete { id, seq, errno } => {
                if let Some(o) = ops.get_mut(*id as usize) {
                    o.cmp = Some(*seq);
                    o.errno = *errno;
                }
            }
            Event::Mark { .. } => {}
        }
    }
    ops
}

/// When each request became durable (`None`: never, in this log).
pub fn durable_at(ops: &[Op]) -> Vec<Option<u64>> {
    // Successful flushes by submission, with the earliest completion among
    // each one and those submitted after it.
    let mut fl: Vec<(u64, u64)> = ops
        .iter()
        .filter(|o| o.io_type == IoType::Flush && o.ok())
        .map(|o| (o.sub, o.cmp.unwrap_or(u64::MAX)))
        .collect();
    fl.sort_unstable();
    let mut suffix = vec![u64::MAX; fl.len() + 1];
    for i in (0..fl.len()).rev() {
        suffix[i] = suffix[i + 1].min(fl[i].1);
    }
    ops.iter()
        .map(|o| {
            if !o.changes() || !o.ok() {
                return None;
            }
            let c = o.cmp?;
            if o.fua {
                return Some(c);
            }
            let i = fl.partition_point(|f| f.0 <= c);
            (suffix[i] != u64::MAX).then_some(suffix[i])
        })
        .collect()
}

/// One durability point.
#[derive(Debug, Clone)]
pub struct Point {
    /// Its seq (0: the start of the log).
    pub seq: u64,
    /// The next point's seq (`u64::MAX` after the last one).
    pub next: u64,
    /// Requests that became durable at this point, by completion.
    pub newly_durable: Vec<usize>,
    /// Requests that may or may not have landed, by completion.
    pub candidates: Vec<usize>,
}

/// The durability points of a log's requests.
pub fn points(ops: &[Op]) -> Vec<Point> {
    let dur = durable_at(ops);
    let mut seqs: Vec<u64> = dur.iter().flatten().copied().collect();
    seqs.push(0);
    seqs.sort_unstable();
    seqs.dedup();
    let mut by_key: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].changes()).collect();
    by_key.sort_by_key(|&i| ops[i].key());
    let mut out = Vec::with_capacity(seqs.len());
    for (j, &s) in seqs.iter().enumerate() {
        let next = seqs.get(j + 1).copied().unwrap_or(u64::MAX);
        let newly_durable = by_key
            .iter()
            .copied()
            .filter(|&i| dur[i] == Some(s))
            .collect();
        let candidates = by_key
            .iter()
            .copied()
            .filter(|&i| !ops[i].failed() && ops[i].sub < next && dur[i].is_none_or(|d| d > s))
            .collect();
        out.push(Point {
            seq: s,
            next,
            newly_durable,
            candidates,
        });
    }
    out
}

/// An image file kept equal to a model of the disk: contents and, per
/// sector, the key of the version it holds.
pub struct Scratch {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    ver: Vec<u64>,
}

/// What a state's requests replaced.
#[derive(Default)]
pub struct Undo {
    sectors: Vec<(u64, u64)>,
    bytes: Vec<u8>,
}

impl Scratch {
    /// A scratch file at `path` holding `initial` (the base before the
    /// recording began), `size` bytes long.
    pub fn create(path: &Path, initial: &[u8], size: u64) -> Result<Scratch, BdevError> {
        let os = |e| BdevError::os(format!("scratch image {}", path.display()), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(os)?;
        let mut buf = initial.to_vec();
        buf.resize(size as usize, 0);
        file.set_len(size).map_err(os)?;
        for (i, c) in buf.chunks(1 << 16).enumerate() {
            if c.iter().any(|&b| b != 0) {
                file.write_all_at(c, (i as u64) << 16).map_err(os)?;
            }
        }
        Ok(Scratch {
            file,
            path: path.to_path_buf(),
            ver: vec![0; (size / SECTOR) as usize],
            buf,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The modelled contents.
    pub fn contents(&self) -> &[u8] {
        &self.buf
    }

    /// Lands `op` (only the sectors `mask` keeps, when given) wherever it is
    /// newer than what a sector holds; records what it replaced in `undo`.
    pub fn apply(
        &mut self,
        op: &Op,
        mask: Option<&[bool]>,
        mut undo: Option<&mut Undo>,
    ) -> Result<(), BdevError> {
        let first = op.offset / SECTOR;
        let n = op.len.div_ceil(SECTOR);
        let key = op.key();
        let mut run: Option<(u64, u64)> = None;
        for k in 0..n {
            let s = first + k;
            let si = s as usize;
            let keep = mask.is_none_or(|m| m[k as usize]);
            let land = keep && si < self.ver.len() && self.ver[si] < key;
            if land {
                let at = si * SECTOR as usize;
                if let Some(u) = undo.as_deref_mut() {
                    u.sectors.push((s, self.ver[si]));
                    u.bytes
                        .extend_from_slice(&self.buf[at..at + SECTOR as usize]);
                }
                let dst = &mut self.buf[at..at + SECTOR as usize];
                match &op.data {
                    Some(d) => {
                        let from = (k * SECTOR) as usize;
                        dst.copy_from_slice(&d[from..from + SECTOR as usize]);
                    }
                    None => dst.fill(0),
                }
                self.ver[si] = key;
                run = match run {
                    Some((a, b)) if b == s => Some((a, s + 1)),
                    Some(r) => {
                        self.write_out(r)?;
                        Some((s, s + 1))
                    }
                    None => Some((s, s + 1)),
                };
            }
        }
        if let Some(r) = run {
            self.write_out(r)?;
        }
        Ok(())
    }

    /// Puts back what `undo` recorded (newest first).
    pub fn rollback(&mut self, undo: Undo) -> Result<(), BdevError> {
        for (i, &(s, v)) in undo.sectors.iter().enumerate().rev() {
            let at = s as usize * SECTOR as usize;
            let from = i * SECTOR as usize;
            self.buf[at..at + SECTOR as usize]
                .copy_from_slice(&undo.bytes[from..from + SECTOR as usize]);
            self.ver[s as usize] = v;
            self.write_out((s, s + 1))?;
        }
        Ok(())
    }

    fn write_out(&self, (a, b): (u64, u64)) -> Result<(), BdevError> {
        let (at, end) = ((a * SECTOR) as usize, (b * SECTOR) as usize);
        self.file
            .write_all_at(&self.buf[at..end], a * SECTOR)
            .map_err(|e| BdevError::os(format!("scratch image {}", self.path.display()), e))
    }
}

/// Which states to build.
#[derive(Debug, Clone)]
pub struct Plan {
    /// At most this many prefixes per point (spread evenly, the empty and
    /// the full one always among them).
    pub max_prefixes: usize,
    /// Random subsets per point (when the point has candidates).
    pub random: usize,
    /// Whether random subsets may land requests torn.
    pub torn: bool,
    /// The random generator's seed.
    pub seed: u64,
    /// A broken replay, for proving a checker fails: what becomes durable
    /// at this point (by index) never lands, as if one flush had lied.
    pub lose_point: Option<usize>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            max_prefixes: 8,
            random: 4,
            torn: true,
            seed: 0x5eed,
            lose_point: None,
        }
    }
}

/// How a state was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The first `n` candidates, by completion.
    Prefix(usize),
    /// Random subset number `n`.
    Random(usize),
}

/// One crash state, materialised in the scratch file while the check runs.
#[derive(Debug, Clone)]
pub struct State {
    /// The state's number in its replay (from 0).
    pub index: u64,
    /// The point's index.
    pub point: usize,
    /// The point's seq: everything durable at it has landed.
    pub seq: u64,
    /// The next point's seq: the crash happened before it; the user knew
    /// what it learnt before it (a mark below it).
    pub next: u64,
    /// How the candidates were chosen.
    pub choice: Choice,
    /// Candidates that landed (whole or torn).
    pub landed: usize,
    /// Of those, how many landed torn.
    pub torn: usize,
    /// The image file.
    pub path: PathBuf,
}

/// What a replay found.
#[derive(Debug)]
pub struct Outcome<E> {
    /// States checked.
    pub states: u64,
    /// Durability points.
    pub points: usize,
    /// The states whose check failed, with what it said.
    pub failures: Vec<(State, E)>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Builds every state `plan` asks for from `log` over `initial` (the base's
/// contents when the recording began) in the scratch file at `scratch`,
/// running `check` on each.
pub fn replay<E>(
    log: &Log,
    initial: &[u8],
    scratch: &Path,
    plan: &Plan,
    mut check: impl FnMut(&State) -> Result<(), E>,
) -> Result<Outcome<E>, BdevError> {
    let ops = ops(log);
    let pts = points(&ops);
    let mut sc = Scratch::create(scratch, initial, log.size)?;
    let mut rng = Rng(plan.seed | 1);
    let mut out = Outcome {
        states: 0,
        points: pts.len(),
        failures: Vec::new(),
    };
    let mut lost: Vec<bool> = vec![false; ops.len()];
    for (j, p) in pts.iter().enumerate() {
        for &i in &p.newly_durable {
            if plan.lose_point == Some(j) {
                lost[i] = true;
                continue;
            }
            sc.apply(&ops[i], None, None)?;
        }
        let cands: Vec<usize> = p.candidates.iter().copied().filter(|&i| !lost[i]).collect();
        let n = cands.len();
        let mut prefixes: Vec<usize> = if n < plan.max_prefixes.max(2) {
            (0..=n).collect()
        } else {
            let m = plan.max_prefixes.max(2);
            (0..m).map(|k| k * n / (m - 1)).collect()
        };
        prefixes.dedup();
        let mut choices: Vec<Choice> = prefixes.into_iter().map(Choice::Prefix).collect();
        if n > 0 {
            choices.extend((0..plan.random).map(Choice::Random));
        }
        for choice in choices {
            let mut undo = Undo::default();
            let (mut landed, mut torn) = (0, 0);
            match choice {
                Choice::Prefix(k) => {
                    for &i in &cands[..k] {
                        sc.apply(&ops[i], None, Some(&mut undo))?;
                        landed += 1;
                    }
                }
                Choice::Random(_) => {
                    for &i in &cands {
                        if rng.next() & 1 == 0 {
                            continue;
                        }
                        landed += 1;
                        let op = &ops[i];
                        if plan.torn && rng.next().is_multiple_of(4) {
                            let sectors = op.len.div_ceil(SECTOR) as usize;
                            let mask: Vec<bool> =
                                (0..sectors).map(|_| rng.next() & 1 == 1).collect();
                            torn += 1;
                            sc.apply(op, Some(&mask), Some(&mut undo))?;
                        } else {
                            sc.apply(op, None, Some(&mut undo))?;
                        }
                    }
                }
            }
            let st = State {
                index: out.states,
                point: j,
                seq: p.seq,
                next: p.next,
                choice,
                landed,
                torn,
                path: sc.path().to_path_buf(),
            };
            out.states += 1;
            if let Err(e) = check(&st) {
                out.failures.push((st, e));
            }
            sc.rollback(undo)?;
        }
    }
    Ok(out)
}

/// The base's contents after every request of the log landed in completion
/// order (for checking a recording against the base it recorded).
pub fn final_contents(log: &Log, initial: &[u8], scratch: &Path) -> Result<Vec<u8>, BdevError> {
    let ops = ops(log);
    let mut sc = Scratch::create(scratch, initial, log.size)?;
    let mut order: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].changes() && !ops[i].failed())
        .collect();
    order.sort_by_key(|&i| ops[i].key());
    for i in order {
        sc.apply(&ops[i], None, None)?;
    }
    Ok(sc.buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: u64, sub: u64, cmp: u64, off: u64, fua: bool, byte: u8) -> Op {
        Op {
            id,
            io_type: IoType::Write,
            fua,
            offset: off,
            len: SECTOR,
            data: Some(Arc::from(vec![byte; SECTOR as usize])),
            sub,
            cmp: Some(cmp),
            errno: 0,
        }
    }
    fn f(id: u64, sub: u64, cmp: u64) -> Op {
        Op {
            id,
            io_type: IoType::Flush,
            fua: false,
            offset: 0,
            len: 0,
            data: None,
            sub,
            cmp: Some(cmp),
            errno: 0,
        }
    }

    /// A write completed before a flush was submitted is durable when the
    /// flush completes; one completing while the flush is in flight is not;
    /// a FUA write is durable at its completion.
    #[test]
    fn durability_follows_flush_submission() {
        let ops = vec![
            w(0, 1, 2, 0, false, 1),
            f(1, 3, 6),
            w(2, 4, 5, 512, false, 2),
            w(3, 7, 8, 1024, true, 3),
            f(4, 9, 10),
        ];
        let d = durable_at(&ops);
        assert_eq!(d, vec![Some(6), None, Some(10), Some(8), None]);
        let p = points(&ops);
        assert_eq!(
            p.iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![0, 6, 8, 10]
        );
        // Before the first flush completes, both early writes may land.
        assert_eq!(p[0].candidates, vec![0, 2]);
        assert_eq!(p[1].newly_durable, vec![0]);
        assert_eq!(p[1].candidates, vec![2, 3]);
        assert_eq!(p[2].candidates, vec![2]);
        assert!(p[3].candidates.is_empty());
    }

    /// A newer version of a sector is never replaced by an older one.
    #[test]
    fn newer_versions_win() {
        let d = std::env::temp_dir().join(format!("sluice-scratch-{}", std::process::id()));
        let ops = [w(0, 1, 2, 0, false, 1), w(1, 3, 4, 0, false, 2)];
        let mut s = Scratch::create(&d, &[], 4096).unwrap();
        s.apply(&ops[1], None, None).unwrap();
        let mut u = Undo::default();
        s.apply(&ops[0], None, Some(&mut u)).unwrap();
        assert_eq!(s.contents()[0], 2);
        s.rollback(u).unwrap();
        assert_eq!(std::fs::read(&d).unwrap()[0], 2);
        let _ = std::fs::remove_file(&d);
    }
}
