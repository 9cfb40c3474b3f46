//! The record log: what a [`super::RecordBdev`] saw, as events in one total
//! order, in memory and in a small versioned binary file format.
//!
//! # File format (version 1, all integers little-endian)
//!
//! ```text
//! header   "SLUICERL" (8 bytes), version u32 = 1, block_size u32, size u64
//! record   kind u32, payload_len u32, payload (payload_len bytes)
//!   kind 1 submit    id u64, seq u64, type u8, fua u8, 6 zero bytes,
//!                    offset u64, len u64, then `len` data bytes for a write
//!   kind 2 complete  id u64, seq u64, errno i32 (0: success), 4 zero bytes
//!   kind 3 mark      seq u64, then a UTF-8 label (the rest of the payload)
//! ```
//!
//! `seq` numbers the events of one log from 1 without gaps, across kinds; a
//! reader refuses anything else. A reader never trusts a size: every payload
//! length is checked against the kind's fixed part, the request's `len` and a
//! cap ([`MAX_PAYLOAD`]), ranges against the header's `size`, completions
//! against requests submitted and not yet completed. A log that ends inside
//! a record (the writer was killed) is refused unless read with
//! [`Log::parse_truncated`], which keeps the whole records before the cut.

use crate::error::BdevError;
use crate::io::IoType;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// The file's magic.
pub const MAGIC: &[u8; 8] = b"SLUICERL";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// The largest payload a reader accepts (a write of 64 MiB and its fixed
/// part): a recorder under something that writes more in one request makes
/// a log the reader refuses (no caller of ours does: NBD caps requests at
/// 32 MiB, the copier's chunks are smaller).
pub const MAX_PAYLOAD: u32 = (64 << 20) + 64;
const HEADER_LEN: usize = 24;
const SUBMIT_FIXED: usize = 40;
const COMPLETE_LEN: usize = 24;

/// One logged event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request (not a read) was handed to the base.
    Submit {
        /// The request's number in this log (from 0).
        id: u64,
        /// The event's place in the log.
        seq: u64,
        /// Write, flush, unmap or write-zeroes.
        io_type: IoType,
        /// Force unit access.
        fua: bool,
        /// Byte offset on the base.
        offset: u64,
        /// Length in bytes (0 for a flush).
        len: u64,
        /// The data of a write.
        data: Option<Arc<[u8]>>,
    },
    /// Request `id` completed with `errno` (0: success).
    Complete {
        /// The request.
        id: u64,
        /// The event's place in the log.
        seq: u64,
        /// Positive errno, 0 for success.
        errno: i32,
    },
    /// A point the user named (a job's completion, a guest's flush).
    Mark {
        /// The event's place in the log.
        seq: u64,
        /// What it marks.
        label: String,
    },
}

impl Event {
    /// The event's place in the log.
    pub fn seq(&self) -> u64 {
        match self {
            Event::Submit { seq, .. } | Event::Complete { seq, .. } | Event::Mark { seq, .. } => {
                *seq
            }
        }
    }
}

fn type_code(t: IoType) -> u8 {
    match t {
        IoType::Read => 0,
        IoType::Write => 1,
        IoType::Flush => 2,
        IoType::Unmap => 3,
        IoType::WriteZeroes => 4,
    }
}

fn type_of(c: u8) -> Option<IoType> {
    Some(match c {
        1 => IoType::Write,
        2 => IoType::Flush,
        3 => IoType::Unmap,
        4 => IoType::WriteZeroes,
        _ => return None,
    })
}

/// The header's bytes.
pub fn encode_header(block_size: u32, size: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&block_size.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

/// Appends one event's record to `out`.
pub fn encode_event(e: &Event, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    let kind: u32 = match e {
        Event::Submit {
            id,
            seq,
            io_type,
            fua,
            offset,
            len,
            data,
        } => {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(type_code(*io_type));
            out.push(*fua as u8);
            out.extend_from_slice(&[0u8; 6]);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            if let Some(d) = data {
                out.extend_from_slice(d);
            }
            1
        }
        Event::Complete { id, seq, errno } => {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&errno.to_le_bytes());
            out.extend_from_slice(&[0u8; 4]);
            2
        }
        Event::Mark { seq, label } => {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(label.as_bytes());
            3
        }
    };
    let payload = (out.len() - start - 8) as u32;
    out[start..start + 4].copy_from_slice(&kind.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&payload.to_le_bytes());
}

/// A log streamed to a file as events happen.
pub struct LogFile {
    w: std::io::BufWriter<std::fs::File>,
    scratch: Vec<u8>,
}

impl LogFile {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path, block_size: u32, size: u64) -> Result<LogFile, BdevError> {
        let f = std::fs::File::create(path)
            .map_err(|e| BdevError::os(format!("creating record log {}", path.display()), e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&encode_header(block_size, size))
            .map_err(|e| BdevError::os("writing record log header", e))?;
        Ok(LogFile {
            w,
            scratch: Vec::new(),
        })
    }

    /// Appends one event.
    pub fn append(&mut self, e: &Event) -> std::io::Result<()> {
        self.scratch.clear();
        encode_event(e, &mut self.scratch);
        self.w.write_all(&self.scratch)
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// A whole log, checked.
#[derive(Debug, Clone, Default)]
pub struct Log {
    /// The base's block size.
    pub block_size: u32,
    /// The base's size in bytes.
    pub size: u64,
    /// Every event, in `seq` order.
    pub events: Vec<Event>,
}

fn bad(what: impl std::fmt::Display) -> BdevError {
    BdevError::Corrupt(format!("record log: {what}"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl Log {
    /// Reads and checks a log file.
    pub fn read(path: &Path) -> Result<Log, BdevError> {
        let b = std::fs::read(path)
            .map_err(|e| BdevError::os(format!("reading record log {}", path.display()), e))?;
        Log::parse(&b)
    }

    /// Parses and checks a whole log.
    pub fn parse(b: &[u8]) -> Result<Log, BdevError> {
        Self::parse_inner(b, false)
    }

    /// Parses a log whose writer may have died inside a record: the whole
    /// records before the cut are kept.
    pub fn parse_truncated(b: &[u8]) -> Result<Log, BdevError> {
        Self::parse_inner(b, true)
    }

    fn parse_inner(b: &[u8], allow_cut: bool) -> Result<Log, BdevError> {
        if b.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            )));
        }
        if &b[..8] != MAGIC {
            return Err(bad("bad magic (not a sluice record log)"));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(bad(format!(
                "version {version} (this reader knows {VERSION})"
            )));
        }
        let block_size = u32_at(b, 12);
        let size = u64_at(b, 16);
        if block_size == 0 || !block_size.is_power_of_two() {
            return Err(bad(format!("block size {block_size}")));
        }
        let mut log = Log {
            block_size,
            size,
            events: Vec::new(),
        };
        let mut open: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let mut next_id = 0u64;
        let mut pos = HEADER_LEN;
        while pos < b.len() {
            if b.len() - pos < 8 {
                if allow_cut {
                    break;
                }
                return Err(bad(format!("record header cut at byte {pos}")));
            }
            let kind = u32_at(b, pos);
            let plen = u32_at(b, pos + 4);
            if plen > MAX_PAYLOAD {
                return Err(bad(format!(
                    "record at byte {pos}: payload of {plen} bytes exceeds {MAX_PAYLOAD}"
                )));
            }
            let body_at = pos + 8;
            if b.len() - body_at < plen as usize {
                if allow_cut {
                    break;
                }
                return Err(bad(format!(
                    "record at byte {pos}: {plen} bytes announced, {} left",
                    b.len() - body_at
                )));
            }
            let p = &b[body_at..body_at + plen as usize];
            let want_seq = log.events.len() as u64 + 1;
            let ev = match kind {
                1 => {
                    if p.len() < SUBMIT_FIXED {
                        return Err(bad(format!("submit at byte {pos}: {} bytes", p.len())));
                    }
                    let (id, seq) = (u64_at(p, 0), u64_at(p, 8));
                    let io_type = type_of(p[16])
                        .ok_or_else(|| bad(format!("submit at byte {pos}: type {}", p[16])))?;
                    if p[17] > 1 || p[18..24].iter().any(|&x| x != 0) {
                        return Err(bad(format!("submit at byte {pos}: bad flags")));
                    }
                    let (offset, len) = (u64_at(p, 24), u64_at(p, 32));
                    let data_len = (p.len() - SUBMIT_FIXED) as u64;
                    let want_data = if io_type == IoType::Write { len } else { 0 };
                    if data_len != want_data {
                        return Err(bad(format!(
                            "submit {id} at byte {pos}: {data_len} data bytes for a {} of {len}",
                            io_type.name()
                        )));
                    }
                    if io_type != IoType::Flush
                        && (offset.checked_add(len).is_none_or(|e| e > size)
                            || offset % block_size as u64 != 0
                            || len % block_size as u64 != 0)
                    {
                        return Err(bad(format!(
                            "submit {id}: range {offset}+{len} outside or misaligned on a base of {size} bytes"
                        )));
                    }
                    if id != next_id {
                        return Err(bad(format!("submit {id}: expected request {next_id}")));
                    }
                    next_id += 1;
                    open.insert(id);
                    Event::Submit {
                        id,
                        seq,
                        io_type,
                        fua: p[17] == 1,
                        offset,
                        len,
                        data: (io_type == IoType::Write).then(|| Arc::from(&p[SUBMIT_FIXED..])),
                    }
                }
                2 => {
                    if p.len() != COMPLETE_LEN {
                        return Err(bad(format!("complete at byte {pos}: {} bytes", p.len())));
                    }
                    let (id, seq) = (u64_at(p, 0), u64_at(p, 8));
                    let errno = u32_at(p, 16) as i32;
                    if !open.remove(&id) {
                        return Err(bad(format!(
                            "completion of request {id}, which is not in flight"
                        )));
                    }
                    Event::Complete { id, seq, errno }
                }
                3 => {
                    if p.len() < 8 {
                        return Err(bad(format!("mark at byte {pos}: {} bytes", p.len())));
                    }
                    let label = std::str::from_utf8(&p[8..])
                        .map_err(|_| bad(format!("mark at byte {pos}: label not UTF-8")))?;
                    Event::Mark {
                        seq: u64_at(p, 0),
                        label: label.to_string(),
                    }
                }
                k => return Err(bad(format!("record at byte {pos}: unknown kind {k}"))),
            };
            if ev.seq() != want_seq {
                return Err(bad(format!(
                    "record at byte {pos}: seq {} where {want_seq} was due",
                    ev.seq()
                )));
            }
            log.events.push(ev);
            pos = body_at + plen as usize;
        }
        Ok(log)
    }

    /// The file image of this log.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_header(self.block_size, self.size);
        for e in &self.events {
            encode_event(e, &mut out);
        }
        out
    }

    /// The seq of the first mark labelled `label`.
    pub fn mark(&self, label: &str) -> Option<u64> {
        self.events.iter().find_map(|e| match e {
            Event::Mark { seq, label: l } if l == label => Some(*seq),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Log {
        Log {
            block_size: 512,
            size: 1 << 20,
            events: vec![
                Event::Submit {
                    id: 0,
                    seq: 1,
                    io_type: IoType::Write,
                    fua: true,
                    offset: 512,
                    len: 1024,
                    data: Some(Arc::from(vec![7u8; 1024])),
                },
                Event::Submit {
                    id: 1,
                    seq: 2,
                    io_type: IoType::Flush,
                    fua: false,
                    offset: 0,
                    len: 0,
                    data: None,
                },
                Event::Complete {
                    id: 0,
                    seq: 3,
                    errno: 0,
                },
                Event::Mark {
                    seq: 4,
                    label: "job done".into(),
                },
                Event::Complete {
                    id: 1,
                    seq: 5,
                    errno: libc::EIO,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let l = sample();
        let back = Log::parse(&l.encode()).unwrap();
        assert_eq!(back.events, l.events);
        assert_eq!((back.block_size, back.size), (512, 1 << 20));
        assert_eq!(back.mark("job done"), Some(4));
    }

    /// A cut inside a record is refused (and, for `parse_truncated`, gives
    /// the whole records before it); one between records is a shorter log;
    /// no byte flip panics.
    #[test]
    fn damaged_logs_are_refused_not_trusted() {
        let l = sample();
        let b = l.encode();
        let mut bounds = vec![HEADER_LEN];
        for e in &l.events {
            let mut v = Vec::new();
            encode_event(e, &mut v);
            bounds.push(bounds.last().unwrap() + v.len());
        }
        for cut in 0..b.len() {
            match bounds.iter().position(|&x| x == cut) {
                Some(k) => assert_eq!(Log::parse(&b[..cut]).unwrap().events.len(), k),
                None => assert!(Log::parse(&b[..cut]).is_err(), "cut at {cut} accepted"),
            }
            if cut >= HEADER_LEN {
                let l = Log::parse_truncated(&b[..cut]).unwrap();
                assert!(l.events.len() < 5);
            }
        }
        for i in 0..b.len() {
            for mask in [1u8, 0x80, 0xff] {
                let mut c = b.clone();
                c[i] ^= mask;
                let _ = Log::parse(&c);
            }
        }
        // A huge announced payload is refused before anything is allocated.
        let mut c = b.clone();
        c[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = Log::parse(&c).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        // A completion of a request never submitted.
        let mut l = sample();
        l.events[2] = Event::Complete {
            id: 9,
            seq: 3,
            errno: 0,
        };
        assert!(Log::parse(&l.encode()).is_err());
    }
}
