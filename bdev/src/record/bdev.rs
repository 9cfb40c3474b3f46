//! The recording bdev: a pass-through over any bdev that logs every request
//! that changes the base (writes with their data, FUA, flushes, discards,
//! write-zeroes) at submission and at completion, in one order shared by all
//! reactors.

use super::log::{Event, Log, LogFile};
use crate::bdev::{Bdev, Channel};
use crate::channel::{channel, IoChannel};
use crate::claim::{Claim, Holder};
use crate::deferred::complete_deferred;
use crate::error::BdevError;
use crate::io::{BdevIo, IoDone, IoStatus, IoType};
use crate::registry::Registry;
use serde_json::{json, Value};
use std::any::Any;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How a recorder is set up.
#[derive(Debug, Clone, Default)]
pub struct RecordOptions {
    /// Stream the log to this file (see [`super::log`]); `None`: keep it in
    /// memory ([`RecordBdev::log`]).
    pub log_path: Option<PathBuf>,
    /// A broken device, for proving a checker can fail: flushes complete at
    /// once without reaching the base and without being logged (a disk whose
    /// volatile cache ignores flushes). Never for real use.
    pub lie_about_flushes: bool,
}

/// What the recorder has logged (shared by its channels on every reactor).
struct Recording {
    seq: u64,
    next_id: u64,
    events: Vec<Event>,
    file: Option<LogFile>,
    /// The first failure to write the log: from then on every request fails
    /// (a recording with a hole would make wrong crash states).
    failed: Option<String>,
    block_size: u32,
    size: u64,
}

impl Recording {
    fn push(&mut self, e: Event) {
        if let Some(f) = self.file.as_mut() {
            if let Err(err) = f.append(&e) {
                self.failed.get_or_insert(err.to_string());
            }
        } else {
            self.events.push(e);
        }
    }
}

/// A recording pass-through bdev.
pub struct RecordBdev {
    name: String,
    base: Arc<dyn Bdev>,
    base_name: String,
    nodes: Option<Arc<Registry>>,
    opts: RecordOptions,
    rec: Arc<Mutex<Recording>>,
    released: AtomicBool,
}

impl RecordBdev {
    /// A recorder named `name` over registered bdev `base`, which it claims
    /// (writes, as a filter node). The caller registers it.
    pub fn new(
        nodes: &Arc<Registry>,
        name: &str,
        base: &str,
        opts: RecordOptions,
    ) -> Result<Arc<RecordBdev>, BdevError> {
        if nodes.contains(name) {
            return Err(BdevError::Exists(name.to_string()));
        }
        let b = nodes.claim(base, Claim::file(Holder::Node(name.to_string()), true))?;
        match Self::build(name, b, base, Some(nodes.clone()), opts) {
            Ok(r) => Ok(r),
            Err(e) => {
                nodes.release(base, &Holder::Node(name.to_string()));
                Err(e)
            }
        }
    }

    /// A recorder over `base` outside any registry (in-process tests).
    pub fn over(
        name: &str,
        base: Arc<dyn Bdev>,
        opts: RecordOptions,
    ) -> Result<Arc<RecordBdev>, BdevError> {
        let base_name = base.name().to_string();
        Self::build(name, base, &base_name, None, opts)
    }

    fn build(
        name: &str,
        base: Arc<dyn Bdev>,
        base_name: &str,
        nodes: Option<Arc<Registry>>,
        opts: RecordOptions,
    ) -> Result<Arc<RecordBdev>, BdevError> {
        let (block_size, size) = (base.block_size(), base.size());
        let file = match &opts.log_path {
            Some(p) => Some(LogFile::create(p, block_size, size)?),
            None => None,
        };
        Ok(Arc::new(RecordBdev {
            name: name.to_string(),
            base,
            base_name: base_name.to_string(),
            nodes,
            opts,
            rec: Arc::new(Mutex::new(Recording {
                seq: 0,
                next_id: 0,
                events: Vec::new(),
                file,
                failed: None,
                block_size,
                size,
            })),
            released: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.rec.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bdev underneath.
    pub fn base(&self) -> &Arc<dyn Bdev> {
        &self.base
    }

    /// The file the log goes to, if any.
    pub fn log_path(&self) -> Option<&Path> {
        self.opts.log_path.as_deref()
    }

    /// The seq of the last event logged so far: a user that learns something
    /// (a write acknowledged, a flush done) after this call knows it no
    /// earlier than this point of the log.
    pub fn seq_now(&self) -> u64 {
        self.lock().seq
    }

    /// Logs a mark named `label`; returns its seq.
    pub fn mark(&self, label: &str) -> u64 {
        let mut r = self.lock();
        r.seq += 1;
        let seq = r.seq;
        r.push(Event::Mark {
            seq,
            label: label.to_string(),
        });
        seq
    }

    /// The log kept in memory so far (empty when it goes to a file).
    pub fn log(&self) -> Log {
        let r = self.lock();
        Log {
            block_size: r.block_size,
            size: r.size,
            events: r.events.clone(),
        }
    }

    /// Writes out what the log file has buffered; the first error writing
    /// the log, if any.
    pub fn sync_log(&self) -> Result<(), BdevError> {
        let mut r = self.lock();
        if let Some(f) = r.file.as_mut() {
            if let Err(e) = f.flush() {
                r.failed.get_or_insert(e.to_string());
            }
        }
        match &r.failed {
            Some(e) => Err(BdevError::os(
                "writing record log",
                std::io::Error::other(e.clone()),
            )),
            None => Ok(()),
        }
    }

    fn release_base(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Some(n) = &self.nodes {
                n.release(&self.base_name, &Holder::Node(self.name.clone()));
            }
        }
    }
}

impl Drop for RecordBdev {
    fn drop(&mut self) {
        let _ = self.sync_log();
        self.release_base();
    }
}

impl Bdev for RecordBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Record Disk"
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
    fn fua_is_cheap(&self) -> bool {
        self.base.fua_is_cheap()
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let base = channel(&self.base)?;
        Ok(Box::new(RecordChannel {
            inner: Rc::new(RecordChannelInner {
                base,
                rec: self.rec.clone(),
                parents: RefCell::new(Vec::new()),
                free: RefCell::new(Vec::new()),
            }),
            lie_about_flushes: self.opts.lie_about_flushes,
        }))
    }
    fn driver_specific(&self) -> Value {
        let r = self.lock();
        json!({ "record": {
            "base_bdev": self.base_name,
            "log_path": self.opts.log_path,
            "events": r.seq,
            "requests": r.next_id,
            "error": r.failed,
        } })
    }
    fn on_delete(&self) {
        let _ = self.sync_log();
        self.release_base();
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A request passed down, with its log id (`None` for reads, not logged).
type Forwarded = (Box<BdevIo>, Option<u64>);

struct RecordChannelInner {
    base: Rc<IoChannel>,
    rec: Arc<Mutex<Recording>>,
    /// Requests passed down, by slot (the child's tag).
    parents: RefCell<Vec<Option<Forwarded>>>,
    free: RefCell<Vec<usize>>,
}

struct RecordChannel {
    inner: Rc<RecordChannelInner>,
    lie_about_flushes: bool,
}

impl Channel for RecordChannel {
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        if self.lie_about_flushes && io.io_type == IoType::Flush {
            complete_deferred(io, IoStatus::Success);
            return Ok(());
        }
        let inner = &self.inner;
        let logged = io.io_type != IoType::Read;
        // The data is copied before the request goes down (a base may
        // complete it, and its submitter reuse the memory, before we look again).
        let data: Option<Arc<[u8]>> = (io.io_type == IoType::Write).then(|| {
            let mut d = vec![0u8; io.len as usize];
            io.copy_out(0, &mut d);
            Arc::from(d)
        });
        if logged {
            let r = inner.rec.lock().unwrap_or_else(|p| p.into_inner());
            if r.failed.is_some() {
                drop(r);
                complete_deferred(io, IoStatus::Eio);
                return Ok(());
            }
        }
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
        // child completes (RecordChannelInner::io_done).
        let mut child =
            unsafe { BdevIo::sub_io(&io, 0, io.len, io.io_type, io.offset, Some(done)) };
        child.fua = io.fua;
        child.write_behind = io.write_behind;
        child.tag = slot as u64;
        let (t, off, len, fua) = (io.io_type, io.offset, io.len, io.fua);
        inner.parents.borrow_mut()[slot] = Some((io, None));
        // A logged submission is recorded under the lock held across the
        // base's `submit`, so that no other reactor's event comes between
        // (its completion cannot: completions come later, never inside
        // `submit`). Reads take no lock.
        let guard = logged.then(|| inner.rec.lock().unwrap_or_else(|p| p.into_inner()));
        match inner.base.submit(child) {
            Ok(()) => {
                if let Some(mut r) = guard {
                    let id = r.next_id;
                    r.next_id += 1;
                    r.seq += 1;
                    let seq = r.seq;
                    r.push(Event::Submit {
                        id,
                        seq,
                        io_type: t,
                        fua,
                        offset: off,
                        len,
                        data,
                    });
                    if let Some(Some(p)) = inner.parents.borrow_mut().get_mut(slot) {
                        p.1 = Some(id);
                    }
                }
                Ok(())
            }
            Err(_child) => {
                drop(guard);
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

impl IoDone for RecordChannelInner {
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
        let Some((parent, id)) = parent else {
            return;
        };
        if let Some(id) = id {
            let mut r = self.rec.lock().unwrap_or_else(|p| p.into_inner());
            r.seq += 1;
            let seq = r.seq;
            r.push(Event::Complete {
                id,
                seq,
                errno: status.errno(),
            });
        }
        parent.complete(status);
    }
}
