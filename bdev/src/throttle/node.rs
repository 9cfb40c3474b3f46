//! QEMU's `throttle` filter node: a node over `file` whose reads and writes
//! are limited by a throttle group object (`throttle-group`), shared with
//! every other member of the group.
//!
//! Requests pass down to the child as they are (their completion goes
//! straight back to the submitter); a limited one first waits in this
//! reactor's [`Gate`]. A reserved request is never handed back as
//! queue-full (a retry would reserve it again): when the child's queue is
//! full it waits here for space.

use super::gate::Gate;
use super::group::ThrottleGroup;
use super::GroupUse;
use crate::bdev::{Bdev, Channel, RangeStatusFuture};
use crate::channel::{channel, IoChannel};
use crate::claim::{Claim, Holder};
use crate::error::BdevError;
use crate::io::{BdevIo, IoType};
use crate::registry::Registry;
use serde_json::{json, Value};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A throttle filter node.
pub struct ThrottleBdev {
    name: String,
    child: Arc<dyn Bdev>,
    nodes: Arc<Registry>,
    group: GroupUse,
    released: AtomicBool,
}

impl ThrottleBdev {
    /// A filter named `name` over registered node `file`, limited by the
    /// group object `group`; it claims `file` (as QEMU's filter takes its
    /// child's permissions). The caller registers it.
    pub fn new(
        nodes: &Arc<Registry>,
        name: &str,
        file: &str,
        group: &str,
    ) -> Result<Arc<ThrottleBdev>, BdevError> {
        let group = GroupUse::new(nodes, group).ok_or_else(|| {
            BdevError::InvalidParam(format!("Throttle group '{group}' does not exist"))
        })?;
        let child = nodes.get(file)?;
        let writable = !child.read_only();
        nodes.claim(file, Claim::file(Holder::Node(name.to_string()), writable))?;
        Ok(Arc::new(ThrottleBdev {
            name: name.to_string(),
            child,
            nodes: nodes.clone(),
            group,
            released: AtomicBool::new(false),
        }))
    }

    /// The node underneath.
    pub fn child(&self) -> &Arc<dyn Bdev> {
        &self.child
    }

    /// The group limiting it.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        self.group.group()
    }

    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.nodes
                .release(self.child.name(), &Holder::Node(self.name.clone()));
        }
    }
}

impl Drop for ThrottleBdev {
    fn drop(&mut self) {
        self.release();
    }
}

impl Bdev for ThrottleBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Throttle filter"
    }
    fn block_size(&self) -> u32 {
        self.child.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.child.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.child.io_type_supported(t)
    }
    fn required_alignment(&self) -> u32 {
        self.child.required_alignment()
    }
    fn read_only(&self) -> bool {
        self.child.read_only()
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        let child = channel(&self.child)?;
        let inner = Rc::new_cyclic(|me: &Weak<Inner>| {
            let released = me.clone();
            Inner {
                child,
                gate: Gate::new(move |io| {
                    if let Some(i) = released.upgrade() {
                        i.pass(io);
                    }
                }),
                full: RefCell::new(VecDeque::new()),
                waiting: Cell::new(false),
                me: me.clone(),
            }
        });
        Ok(Box::new(ThrottleChannel {
            inner,
            group: self.group.group().clone(),
        }))
    }
    fn driver_specific(&self) -> Value {
        json!({"throttle": {"file": self.child.name(), "throttle-group": self.group().name()}})
    }
    fn on_delete(&self) {
        self.release();
    }
    fn range_status(&self, offset: u64, len: u64) -> Option<RangeStatusFuture> {
        self.child.range_status(offset, len)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One reactor's state: the child's channel, the gate, and the requests
/// waiting for room in the child's queue.
struct Inner {
    child: Rc<IoChannel>,
    gate: Rc<Gate>,
    full: RefCell<VecDeque<Box<BdevIo>>>,
    waiting: Cell<bool>,
    /// Itself, for space waits.
    me: Weak<Inner>,
}

impl Inner {
    /// Passes a released request down (in order behind any waiting for room).
    fn pass(&self, io: Box<BdevIo>) {
        if !self.full.borrow().is_empty() {
            self.full.borrow_mut().push_back(io);
            return;
        }
        if let Err(io) = self.child.submit(io) {
            self.full.borrow_mut().push_back(io);
            self.wait();
        }
    }

    fn wait(&self) {
        if self.waiting.replace(true) {
            return;
        }
        let me = self.me.clone();
        self.child.wait_for_space(Box::new(move || {
            if let Some(i) = me.upgrade() {
                i.waiting.set(false);
                i.drain();
            }
        }));
    }

    fn drain(&self) {
        loop {
            let Some(io) = self.full.borrow_mut().pop_front() else {
                return;
            };
            if let Err(io) = self.child.submit(io) {
                self.full.borrow_mut().push_front(io);
                self.wait();
                return;
            }
        }
    }
}

struct ThrottleChannel {
    inner: Rc<Inner>,
    group: Arc<ThrottleGroup>,
}

impl Channel for ThrottleChannel {
    fn submit(&self, io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let reserved = super::gate::limited(io.io_type);
        match self.inner.gate.admit(io, std::slice::from_ref(&self.group)) {
            Some(io) if !reserved => self.inner.child.submit(io),
            Some(io) => {
                self.inner.pass(io);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn wait_for_space(&self, f: Box<dyn FnOnce()>) {
        self.inner.child.wait_for_space(f)
    }
}
