//! A qcow2 channel on a reactor that does not own the image: requests travel
//! to the owner and back through a pair of rings ([`reactor::RingSender`]).
//!
//! The submitting side keeps each request's reactor-local parts (completion
//! target, stats, tag) in a fixed slot table and sends the bare request; the
//! owner tries its fast path first and runs anything else as a task; the
//! request comes back on the second ring and is completed where it was
//! submitted. In steady state nothing is allocated and no atomic
//! read-modify-write is done per request.

use super::bdev::engine;
use super::fast::FastPath;
use super::image::Image;
use crate::stats::IoStats;
use crate::{complete_deferred, BdevError, BdevIo, Channel, IoDone, IoStatus};
use reactor::{RingSender, RuntimeHandle};
use std::cell::RefCell;
use std::rc::Rc;

/// Requests one remote channel may have at the owner at once; more are
/// refused as "queue full" and retried ([`Channel::wait_for_space`]). Both
/// rings hold this many, so neither can be full when a slot is free.
const SLOTS: usize = 1024;

/// A request travelling between reactors.
pub(crate) struct SendIo(Option<Box<BdevIo>>);

// SAFETY: a travelling request carries no reactor-local part: its completion
// target and stats stay behind in the submitter's slot table (and the owner
// clears the target it set before sending the request back). Its memory
// belongs to the submitter, who does not touch it until completion.
unsafe impl Send for SendIo {}

impl Drop for SendIo {
    fn drop(&mut self) {
        // Only reached if a ring is dropped with items in it (runtime gone):
        // leaking is the one safe choice for memory the submitter still owns.
        if let Some(io) = self.0.take() {
            std::mem::forget(io);
        }
    }
}

/// What a request left behind on the submitting reactor.
struct Saved {
    done: Option<Rc<dyn IoDone>>,
    stats: Option<Rc<IoStats>>,
    tag: u64,
}

/// The submitting side's slot table.
struct Slots {
    saved: RefCell<Vec<Option<Saved>>>,
    free: RefCell<Vec<usize>>,
}

impl Slots {
    fn new() -> Rc<Self> {
        Rc::new(Slots {
            saved: RefCell::new((0..SLOTS).map(|_| None).collect()),
            free: RefCell::new((0..SLOTS).rev().collect()),
        })
    }

    /// Puts the request's local parts aside; its tag becomes the slot index.
    fn park(&self, io: &mut BdevIo) -> Option<usize> {
        let slot = self.free.borrow_mut().pop()?;
        self.saved.borrow_mut()[slot] = Some(Saved {
            done: io.take_done(),
            stats: io.stats.take(),
            tag: io.tag,
        });
        io.tag = slot as u64;
        Some(slot)
    }

    /// Gives a returned request its local parts back.
    fn unpark(&self, io: &mut BdevIo) -> bool {
        let slot = io.tag as usize;
        let Some(s) = self.saved.borrow_mut().get_mut(slot).and_then(Option::take) else {
            return false;
        };
        self.free.borrow_mut().push(slot);
        io.tag = s.tag;
        io.stats = s.stats;
        io.set_done(s.done);
        true
    }
}

/// The channel of a reactor that does not own the image.
pub(crate) struct RemoteChannel {
    to_owner: RefCell<RingSender<SendIo>>,
    slots: Rc<Slots>,
    rt: RuntimeHandle,
}

impl RemoteChannel {
    /// Opens the two rings between this reactor and the image's owner (call on
    /// the reactor the channel is for).
    pub(crate) fn open(rt: &RuntimeHandle, id: u64, owner: usize) -> Result<Self, BdevError> {
        let slots = Slots::new();
        let back_slots = slots.clone();
        let back = reactor::ring_here(SLOTS, move |mut sio: SendIo| {
            let Some(mut io) = sio.0.take() else { return };
            if back_slots.unpark(&mut io) {
                let st = io.status;
                io.complete(st);
            } else {
                // Not reachable: every request sent carries its slot.
                tracing::error!(slot = io.tag, "qcow2: a request came back to no slot");
                std::mem::forget(io);
            }
        });
        let to_owner = rt
            .ring_to(owner, SLOTS, move || owner_side(id, back))
            .map_err(|e| BdevError::Runtime(e.to_string()))?;
        Ok(RemoteChannel {
            to_owner: RefCell::new(to_owner),
            slots,
            rt: rt.clone(),
        })
    }
}

impl Channel for RemoteChannel {
    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        if self.rt.is_stopping() {
            complete_deferred(io, IoStatus::Aborted);
            return Ok(());
        }
        if self.slots.park(&mut io).is_none() {
            return Err(io);
        }
        match self.to_owner.borrow_mut().push(SendIo(Some(io))) {
            Ok(()) => Ok(()),
            // Not reachable (the ring holds as many as there are slots); undo.
            Err(mut sio) => match sio.0.take() {
                Some(mut io) => {
                    self.slots.unpark(&mut io);
                    Err(io)
                }
                None => Ok(()),
            },
        }
    }
}

/// The owner's end: sends finished requests back.
struct Returner {
    back: RefCell<RingSender<SendIo>>,
}

impl Returner {
    fn send(&self, mut io: Box<BdevIo>) {
        // The target set on this reactor must not travel.
        io.set_done(None);
        if let Err(mut sio) = self.back.borrow_mut().push(SendIo(Some(io))) {
            // Not reachable: the submitter has at most as many requests out as
            // the ring holds. Leak rather than free memory it still owns.
            tracing::error!("qcow2: the return ring is full; a request is lost");
            if let Some(io) = sio.0.take() {
                std::mem::forget(io);
            }
        }
    }
}

impl IoDone for Returner {
    fn io_done(&self, io: Box<BdevIo>) {
        self.send(io);
    }
}

/// Builds, on the owner, the handler of requests from one remote channel.
fn owner_side(id: u64, back: RingSender<SendIo>) -> impl FnMut(SendIo) {
    let ret = Rc::new(Returner {
        back: RefCell::new(back),
    });
    let img: Option<Rc<Image>> = engine(id);
    let fast = img.clone().map(FastPath::new);
    move |mut sio: SendIo| {
        let Some(mut io) = sio.0.take() else { return };
        let (Some(img), Some(fast)) = (&img, &fast) else {
            io.status = IoStatus::Aborted;
            ret.send(io);
            return;
        };
        io.set_done(Some(ret.clone() as Rc<dyn IoDone>));
        if let Err(mut io) = fast.try_submit(io) {
            let (img, ret) = (img.clone(), ret.clone());
            reactor::spawn_local(async move {
                io.status = img.execute(&mut io).await;
                ret.send(io);
            });
        }
    }
}
