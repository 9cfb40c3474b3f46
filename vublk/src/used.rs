//! A virtqueue's used ring written a poll at a time (virtio 1.2 2.7.8).
//!
//! Completions are queued here as they come ([`UsedRing::push`]: the chain's
//! head and the bytes written, its status byte and data already in guest
//! memory); [`UsedRing::publish`] writes them into the ring's elements
//! (through one slice of the ring where it lies in one region) and then stores
//! `used.idx` once, with release ordering, so the driver never sees an index
//! that covers an element, a status byte or data not written yet. The queue's
//! own `next_used` follows the published index.
//!
//! The signal decision ([`UsedRing::needs_notification`], 2.7.10) is taken on
//! the published index: with `VIRTIO_F_EVENT_IDX` the driver wants a signal
//! when its `used_event` lies among the indices published since the last
//! decision (the inequality of Linux's `virtqueue_kick_prepare` and of
//! `virtio-queue`, whose `add_used` publishes per element); without it, always
//! (`VRING_AVAIL_F_NO_INTERRUPT` is a hint, ignored as `virtio-queue` does).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

/// The used ring cannot be written (an address outside the guest's memory,
/// a head outside the queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsedRingError;

/// Completions not yet published, and the index at the last signal decision.
pub(crate) struct UsedRing {
    pending: Vec<(u16, u32)>,
    decided: Wrapping<u16>,
}

impl UsedRing {
    /// For `q` as it starts (nothing pending, no decision yet).
    pub(crate) fn new(q: &Queue) -> Self {
        Self {
            pending: Vec::with_capacity(usize::from(q.size())),
            decided: Wrapping(q.next_used()),
        }
    }

    /// Queues the completion of the chain at `head` (`len` bytes written).
    #[inline]
    pub(crate) fn push(&mut self, head: u16, len: u32) {
        self.pending.push((head, len));
    }

    /// Writes the queued completions into the ring, then publishes the new
    /// index (one release store). On an error nothing is published (and the
    /// completions are dropped: the ring is broken).
    pub(crate) fn publish(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap<()>,
    ) -> Result<(), UsedRingError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self.write(q, mem);
        self.pending.clear();
        r
    }

    fn write(&self, q: &mut Queue, mem: &GuestMemoryMmap<()>) -> Result<(), UsedRingError> {
        let size = q.size();
        let base = q.used_ring();
        // flags, idx, then the elements.
        let ring = mem
            .get_slice(GuestAddress(base), 4 + 8 * usize::from(size))
            .ok();
        let mut next = Wrapping(q.next_used());
        for &(head, len) in &self.pending {
            if head >= size || size == 0 {
                return Err(UsedRingError);
            }
            let off = 4 + 8 * u64::from(next.0 % size);
            // The element: le32 id (the head), le32 len.
            let elem = u64::to_le(u64::from(len) << 32 | u64::from(head));
            let ok = match &ring {
                // One volatile store (`write_obj` copies byte-wise).
                Some(r) => r
                    .get_ref::<u64>(off as usize)
                    .map(|e| e.store(elem))
                    .is_ok(),
                None => base
                    .checked_add(off)
                    .is_some_and(|a| mem.write_obj(elem, GuestAddress(a)).is_ok()),
            };
            if !ok {
                return Err(UsedRingError);
            }
            next += Wrapping(1);
        }
        let idx = u16::to_le(next.0);
        let ok = match &ring {
            Some(r) => r.store(idx, 2, Ordering::Release).is_ok(),
            None => base
                .checked_add(2)
                .is_some_and(|a| mem.store(idx, GuestAddress(a), Ordering::Release).is_ok()),
        };
        if !ok {
            return Err(UsedRingError);
        }
        q.set_next_used(next.0);
        Ok(())
    }

    /// Whether the driver wants a signal for what was published since the
    /// last decision (see the module doc).
    pub(crate) fn needs_notification(
        &mut self,
        q: &Queue,
        mem: &GuestMemoryMmap<()>,
    ) -> Result<bool, UsedRingError> {
        let new = Wrapping(q.next_used());
        let old = std::mem::replace(&mut self.decided, new);
        // The index store before the `used_event` load (2.7.10).
        fence(Ordering::SeqCst);
        if !q.event_idx_enabled() {
            return Ok(true);
        }
        let at = q
            .avail_ring()
            .checked_add(4 + 2 * u64::from(q.size()))
            .ok_or(UsedRingError)?;
        let event: u16 = mem
            .load(GuestAddress(at), Ordering::Relaxed)
            .map_err(|_| UsedRingError)?;
        let event = Wrapping(u16::from_le(event));
        Ok(new - event - Wrapping(1) < new - old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup(event_idx: bool) -> (Queue, GuestMemoryMmap<()>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (q, mem)
    }

    fn used_idx(mem: &GuestMemoryMmap<()>) -> u16 {
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap()
    }

    fn elem(mem: &GuestMemoryMmap<()>, i: u64) -> (u32, u32) {
        let a = USED + 4 + 8 * i;
        (
            mem.read_obj::<u32>(GuestAddress(a)).unwrap(),
            mem.read_obj::<u32>(GuestAddress(a + 4)).unwrap(),
        )
    }

    fn set_used_event(mem: &GuestMemoryMmap<()>, v: u16) {
        mem.write_obj(v, GuestAddress(AVAIL + 4 + 2 * 16)).unwrap();
    }

    /// Several completions in a poll: nothing is visible until the publish,
    /// which writes every element and moves the index once, past all of them
    /// (across the ring's end too).
    #[test]
    fn a_poll_publishes_once_with_every_element() {
        let (mut q, mem) = setup(true);
        q.set_next_used(14);
        mem.write_obj(14u16, GuestAddress(USED + 2)).unwrap();
        let mut u = UsedRing::new(&q);
        for (h, l) in [(3u16, 4097u32), (9, 1), (0, 513)] {
            u.push(h, l);
            assert_eq!(used_idx(&mem), 14, "nothing published before the poll ends");
        }
        u.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem), 17);
        assert_eq!(q.next_used(), 17);
        assert_eq!(elem(&mem, 14), (3, 4097));
        assert_eq!(elem(&mem, 15), (9, 1));
        assert_eq!(
            elem(&mem, 0),
            (0, 513),
            "the third wraps to the ring's start"
        );
        // An empty poll publishes nothing.
        mem.write_obj(0xffffu16, GuestAddress(USED + 2)).unwrap();
        u.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem), 0xffff);
    }

    /// EVENT_IDX: a signal when `used_event` is among the indices published
    /// since the last decision, and only once for them.
    #[test]
    fn signal_follows_used_event_over_published_batches() {
        let (mut q, mem) = setup(true);
        let mut u = UsedRing::new(&q);
        set_used_event(&mem, 1);
        u.push(0, 1);
        u.publish(&mut q, &mem).unwrap();
        assert!(
            !u.needs_notification(&q, &mem).unwrap(),
            "index 1 not reached"
        );
        for h in 1..4 {
            u.push(h, 1);
        }
        u.publish(&mut q, &mem).unwrap();
        assert!(
            u.needs_notification(&q, &mem).unwrap(),
            "used_event 1 passed"
        );
        assert!(
            !u.needs_notification(&q, &mem).unwrap(),
            "nothing new since"
        );
        // used_event 3 was passed by the last batch already (index 4).
        set_used_event(&mem, 3);
        u.push(4, 1);
        u.publish(&mut q, &mem).unwrap();
        assert!(
            !u.needs_notification(&q, &mem).unwrap(),
            "4 -> 5 is past used_event 3"
        );
        set_used_event(&mem, 5);
        u.push(5, 1);
        u.push(6, 1);
        u.publish(&mut q, &mem).unwrap();
        assert!(
            u.needs_notification(&q, &mem).unwrap(),
            "5 -> 7 passes used_event 5"
        );
        // Without EVENT_IDX every decision signals.
        let (mut q, mem) = setup(false);
        let mut u = UsedRing::new(&q);
        u.push(0, 1);
        u.publish(&mut q, &mem).unwrap();
        assert!(u.needs_notification(&q, &mem).unwrap());
    }

    /// A head outside the queue or a ring outside memory publishes nothing.
    #[test]
    fn bad_heads_and_rings_fail() {
        let (mut q, mem) = setup(true);
        let mut u = UsedRing::new(&q);
        u.push(16, 1);
        assert_eq!(u.publish(&mut q, &mem), Err(UsedRingError));
        assert_eq!(used_idx(&mem), 0);
        let mut q2 = Queue::new(16).unwrap();
        q2.try_set_used_ring_address(GuestAddress(0x20000)).unwrap();
        let mut u = UsedRing::new(&q2);
        u.push(1, 1);
        assert_eq!(u.publish(&mut q2, &mem), Err(UsedRingError));
        assert_eq!(q2.next_used(), 0);
    }
}
