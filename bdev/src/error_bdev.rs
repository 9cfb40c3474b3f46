//! The error bdev: fault injection over another bdev (SPDK's `bdev_error_create`
//! and `bdev_error_inject_error`, extended with byte ranges and ENOSPC).
//!
//! `EE_<base>` passes every request through to its base unless an injection
//! rule matches it: then the request fails (EIO, ENOSPC, ENOMEM) or its data is
//! corrupted, a given number of times or until the rules are cleared. Rules can
//! be changed at any time from any thread; with no rule armed the data path
//! takes no lock.

use crate::bdev::{Bdev, Channel};
use crate::channel::{channel, IoChannel};
use crate::claim::{Claim, Holder};
use crate::deferred::complete_deferred;
use crate::error::BdevError;
use crate::io::{BdevIo, IoDone, IoStatus, IoType};
use crate::registry::Registry;
use serde::Serialize;
use serde_json::{json, Value};
use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What a matching request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Fails with EIO (SPDK's "failure"; also accepted as "eio").
    Eio,
    /// Fails with ENOSPC.
    Enospc,
    /// Fails with ENOMEM ("nomem").
    Nomem,
    /// Succeeds with one byte XORed: in the data read, or in the data written
    /// ("corrupt_data").
    CorruptData,
}

impl ErrorKind {
    /// Parses SPDK's `error_type` (plus our "eio" and "enospc").
    pub fn parse(s: &str) -> Result<Self, BdevError> {
        match s {
            "failure" | "eio" => Ok(ErrorKind::Eio),
            "enospc" => Ok(ErrorKind::Enospc),
            "nomem" => Ok(ErrorKind::Nomem),
            "corrupt_data" => Ok(ErrorKind::CorruptData),
            other => Err(BdevError::InvalidParam(format!(
                "error_type: {other:?} is not one of failure, eio, enospc, nomem, corrupt_data"
            ))),
        }
    }
}

/// Which request types a rule applies to (bit set over [`IoType`]).
fn type_bit(t: IoType) -> u8 {
    match t {
        IoType::Read => 1,
        IoType::Write => 2,
        IoType::Flush => 4,
        IoType::Unmap => 8,
        IoType::WriteZeroes => 16,
    }
}

fn parse_io_type(s: &str) -> Result<u8, BdevError> {
    Ok(match s {
        "read" => 1,
        "write" => 2,
        "flush" => 4,
        "unmap" => 8,
        "write_zeroes" => 16,
        "all" => 31,
        other => {
            return Err(BdevError::InvalidParam(format!(
            "io_type: {other:?} is not one of read, write, flush, unmap, write_zeroes, all, clear"
        )))
        }
    })
}

/// An injection request (SPDK's `bdev_error_inject_error` parameters plus a byte range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectParams {
    /// "read", "write", "flush", "unmap", "write_zeroes", "all" (or "clear": remove every rule).
    pub io_type: String,
    /// "failure" / "eio", "enospc", "nomem", "corrupt_data".
    pub error_type: String,
    /// How many requests to hit; 0 = every matching request until cleared.
    pub num: u32,
    /// Start of the byte range (default 0).
    pub offset: u64,
    /// Length of the byte range; `None` = to the end of the bdev.
    pub length: Option<u64>,
    /// For corrupt_data: byte offset within the request's data.
    pub corrupt_offset: u64,
    /// For corrupt_data: the XOR mask (non-zero).
    pub corrupt_value: u8,
}

impl InjectParams {
    /// A rule for `io_type` / `error_type`, `num` times, over the whole bdev.
    pub fn new(io_type: &str, error_type: &str, num: u32) -> Self {
        Self {
            io_type: io_type.into(),
            error_type: error_type.into(),
            num,
            offset: 0,
            length: None,
            corrupt_offset: 0,
            corrupt_value: 0,
        }
    }
}

/// An armed rule, as reported by [`ErrorBdev::rules`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Bit set of request types (read 1, write 2, flush 4, unmap 8, write_zeroes 16).
    pub io_types: u8,
    /// What happens.
    pub error: ErrorKind,
    /// Hits left; `None` = until cleared.
    pub remaining: Option<u32>,
    /// Byte range start.
    pub offset: u64,
    /// Byte range end (exclusive).
    pub end: u64,
    /// Corruption offset in the request's data.
    pub corrupt_offset: u64,
    /// Corruption XOR mask.
    pub corrupt_value: u8,
    /// Requests hit so far.
    pub hits: u64,
}

/// The outcome of matching a request.
enum Verdict {
    Pass,
    Fail(IoStatus),
    Corrupt { at: u64, mask: u8 },
}

/// The rules, shared by the bdev and its channels.
#[derive(Default)]
struct Rules {
    armed: AtomicUsize,
    list: Mutex<Vec<Rule>>,
}

impl Rules {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[inline]
    fn verdict(&self, io: &BdevIo) -> Verdict {
        if self.armed.load(Ordering::Acquire) == 0 {
            return Verdict::Pass;
        }
        let bit = type_bit(io.io_type);
        let (start, end) = if io.io_type == IoType::Flush {
            (0, u64::MAX)
        } else {
            (io.offset, io.offset + io.len)
        };
        let mut rules = self.lock();
        let Some(i) = rules
            .iter()
            .position(|r| r.io_types & bit != 0 && start < r.end && r.offset < end)
        else {
            return Verdict::Pass;
        };
        let r = &mut rules[i];
        r.hits += 1;
        let v = match r.error {
            ErrorKind::Eio => Verdict::Fail(IoStatus::Eio),
            ErrorKind::Enospc => Verdict::Fail(IoStatus::Enospc),
            ErrorKind::Nomem => Verdict::Fail(IoStatus::Nomem),
            ErrorKind::CorruptData if io.io_type.has_data() => Verdict::Corrupt {
                at: r.corrupt_offset,
                mask: r.corrupt_value,
            },
            ErrorKind::CorruptData => Verdict::Pass,
        };
        if let Some(n) = r.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                rules.remove(i);
                self.armed.store(rules.len(), Ordering::Release);
            }
        }
        v
    }
}

/// A fault-injection bdev named `EE_<base>`.
pub struct ErrorBdev {
    name: String,
    base: Arc<dyn Bdev>,
    base_name: String,
    nodes: Arc<Registry>,
    rules: Arc<Rules>,
    released: AtomicBool,
}

impl ErrorBdev {
    /// An error bdev over registered bdev `base`, which it claims. The caller
    /// registers it; the claim is released when it is deleted (or dropped).
    pub fn new(nodes: &Arc<Registry>, base: &str) -> Result<Arc<ErrorBdev>, BdevError> {
        let name = format!("EE_{base}");
        if nodes.contains(&name) {
            return Err(BdevError::Exists(name));
        }
        let b = nodes.claim(base, Claim::file(Holder::Node(name.clone()), true))?;
        Ok(Arc::new(ErrorBdev {
            name,
            base: b,
            base_name: base.to_string(),
            nodes: nodes.clone(),
            rules: Arc::new(Rules::default()),
            released: AtomicBool::new(false),
        }))
    }

    /// The bdev underneath.
    pub fn base(&self) -> &Arc<dyn Bdev> {
        &self.base
    }

    /// SPDK's call: fail (or corrupt) `num` requests of `io_type` anywhere on the bdev.
    pub fn inject(&self, io_type: &str, error_type: &str, num: u32) -> Result<(), BdevError> {
        self.inject_with(&InjectParams::new(io_type, error_type, num))
    }

    /// Adds a rule (replacing one with the same request types and range), or
    /// clears every rule for `io_type: "clear"`.
    pub fn inject_with(&self, p: &InjectParams) -> Result<(), BdevError> {
        if p.io_type == "clear" {
            self.clear();
            return Ok(());
        }
        let io_types = parse_io_type(&p.io_type)?;
        let error = ErrorKind::parse(&p.error_type)?;
        let size = self.base.size();
        if p.offset >= size {
            return Err(BdevError::InvalidParam(format!(
                "offset: {} is beyond the end of {} ({size} bytes)",
                p.offset, self.name
            )));
        }
        let end = match p.length {
            Some(0) => {
                return Err(BdevError::InvalidParam(
                    "length: must be greater than 0".into(),
                ))
            }
            Some(l) => p.offset.saturating_add(l).min(size),
            None => size,
        };
        if error == ErrorKind::CorruptData && p.corrupt_value == 0 {
            return Err(BdevError::InvalidParam(
                "corrupt_value: must be non-zero for corrupt_data".into(),
            ));
        }
        let rule = Rule {
            io_types,
            error,
            remaining: (p.num != 0).then_some(p.num),
            offset: p.offset,
            end,
            corrupt_offset: p.corrupt_offset,
            corrupt_value: p.corrupt_value,
            hits: 0,
        };
        let mut rules = self.rules.lock();
        rules.retain(|r| {
            !(r.io_types == rule.io_types && r.offset == rule.offset && r.end == rule.end)
        });
        tracing::info!(bdev = %self.name, ?rule, "error injection armed");
        rules.push(rule);
        self.rules.armed.store(rules.len(), Ordering::Release);
        Ok(())
    }

    /// Removes every rule: requests pass through again.
    pub fn clear(&self) {
        let mut rules = self.rules.lock();
        rules.clear();
        self.rules.armed.store(0, Ordering::Release);
        tracing::info!(bdev = %self.name, "error injection cleared");
    }

    /// The armed rules.
    pub fn rules(&self) -> Vec<Rule> {
        self.rules.lock().clone()
    }

    fn release_base(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.nodes
                .release(&self.base_name, &Holder::Node(self.name.clone()));
        }
    }
}

impl Drop for ErrorBdev {
    fn drop(&mut self) {
        self.release_base();
    }
}

impl Bdev for ErrorBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Error Injection Disk"
    }
    fn block_size(&self) -> u32 {
        self.base.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.base.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }
    fn required_alignment(&self) -> u32 {
        self.base.required_alignment()
    }
    fn read_only(&self) -> bool {
        self.base.read_only()
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let base = channel(&self.base)?;
        let inner = Rc::new(ErrorChannelInner {
            base,
            parents: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        });
        Ok(Box::new(ErrorChannel {
            inner,
            rules: self.rules.clone(),
        }))
    }
    fn driver_specific(&self) -> Value {
        json!({ "error": { "base_bdev": self.base_name, "rules": self.rules() } })
    }
    fn config(&self) -> Option<Value> {
        Some(json!({ "method": "bdev_error_create", "params": { "base_name": self.base_name } }))
    }
    fn on_delete(&self) {
        self.release_base();
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A request passed down, with the corruption (offset, XOR mask) to apply to the data read.
type Forwarded = (Box<BdevIo>, Option<(u64, u8)>);

struct ErrorChannelInner {
    base: Rc<IoChannel>,
    /// Requests passed down, by slot (the child's tag).
    parents: RefCell<Vec<Option<Forwarded>>>,
    free: RefCell<Vec<usize>>,
}

struct ErrorChannel {
    inner: Rc<ErrorChannelInner>,
    rules: Arc<Rules>,
}

fn corrupt(io: &mut BdevIo, at: u64, mask: u8) {
    if at < io.len {
        let mut b = [0u8; 1];
        io.copy_out(at as usize, &mut b);
        b[0] ^= mask;
        io.copy_in(at as usize, &b);
    }
}

impl Channel for ErrorChannel {
    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let mut corrupt_read = None;
        match self.rules.verdict(&io) {
            Verdict::Pass => {}
            Verdict::Fail(st) => {
                complete_deferred(io, st);
                return Ok(());
            }
            Verdict::Corrupt { at, mask } if io.io_type == IoType::Write => {
                corrupt(&mut io, at, mask)
            }
            Verdict::Corrupt { at, mask } => corrupt_read = Some((at, mask)),
        }
        let inner = &self.inner;
        let slot = match inner.free.borrow_mut().pop() {
            Some(s) => s,
            None => {
                let mut p = inner.parents.borrow_mut();
                p.push(None);
                p.len() - 1
            }
        };
        let done: Rc<dyn IoDone> = inner.clone();
        // SAFETY: the parent is kept, untouched, in `parents[slot]` until the
        // child completes (ErrorChannelInner::io_done).
        let mut child =
            unsafe { BdevIo::sub_io(&io, 0, io.len, io.io_type, io.offset, Some(done)) };
        child.fua = io.fua;
        child.write_behind = io.write_behind;
        child.tag = slot as u64;
        inner.parents.borrow_mut()[slot] = Some((io, corrupt_read));
        match inner.base.submit(child) {
            Ok(()) => Ok(()),
            Err(_child) => {
                let parent = inner.parents.borrow_mut()[slot].take();
                inner.free.borrow_mut().push(slot);
                match parent {
                    Some((p, _)) => Err(p),
                    None => Ok(()),
                }
            }
        }
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.inner.base.wait_for_space(f);
    }
}

impl IoDone for ErrorChannelInner {
    fn io_done(&self, child: Box<BdevIo>) {
        let slot = child.tag as usize;
        let status = child.status;
        drop(child);
        let parent = self
            .parents
            .borrow_mut()
            .get_mut(slot)
            .and_then(Option::take);
        self.free.borrow_mut().push(slot);
        let Some((mut parent, corrupt_read)) = parent else {
            return;
        };
        if let (Some((at, mask)), true) = (corrupt_read, status.is_ok()) {
            corrupt(&mut parent, at, mask);
        }
        parent.complete(status);
    }
}
