//! What the in-memory leaf bdevs (null, malloc) share: geometry checks, UUIDs,
//! and a bounded per-channel completion queue drained by a poller.

use crate::error::BdevError;
use crate::io::BdevIo;
use crate::{IoStatus, IoType};
use reactor::{register_poller, PollStatus, PollerHandle};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

/// Requests one channel of an in-memory bdev holds before pushing back.
pub(crate) const LOCAL_QUEUE_DEPTH: usize = 4096;

/// Checks a name, block size and block count for a new bdev.
pub(crate) fn check_geometry(
    name: &str,
    num_blocks: u64,
    block_size: u32,
) -> Result<(), BdevError> {
    if name.is_empty() {
        return Err(BdevError::InvalidParam("name: must not be empty".into()));
    }
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(BdevError::InvalidParam(format!(
            "block_size: {block_size} is not a power of two between 512 and 65536"
        )));
    }
    if num_blocks == 0 {
        return Err(BdevError::InvalidParam(
            "num_blocks: must be greater than 0".into(),
        ));
    }
    if num_blocks
        .checked_mul(block_size as u64)
        .is_none_or(|s| s > (1u64 << 62))
    {
        return Err(BdevError::InvalidParam(format!(
            "num_blocks: {num_blocks} blocks of {block_size} bytes is too large"
        )));
    }
    Ok(())
}

/// Validates a UUID string (8-4-4-4-12 hex digits) or makes a random (v4) one.
pub(crate) fn uuid_or_random(uuid: Option<String>) -> Result<String, BdevError> {
    match uuid {
        Some(u) => {
            let groups: Vec<&str> = u.split('-').collect();
            let lens = [8, 4, 4, 4, 12];
            let ok = groups.len() == 5
                && groups
                    .iter()
                    .zip(lens)
                    .all(|(g, l)| g.len() == l && g.chars().all(|c| c.is_ascii_hexdigit()));
            if ok {
                Ok(u.to_ascii_lowercase())
            } else {
                Err(BdevError::InvalidParam(format!(
                    "uuid: {u:?} is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
                )))
            }
        }
        None => Ok(random_uuid()),
    }
}

/// A random version-4 UUID.
pub(crate) fn random_uuid() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to time and address entropy; uniqueness, not secrecy, is what matters.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mix = t ^ ((&b as *const _ as usize as u128) << 64) ^ (reactor::ticks() as u128);
        b = mix.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The request types the in-memory leaves serve (all of them).
pub(crate) fn io_type_supported(t: IoType) -> bool {
    matches!(
        t,
        IoType::Read | IoType::Write | IoType::Flush | IoType::Unmap | IoType::WriteZeroes
    )
}

/// Unregisters a channel's poller; a no-op when the channel is dropped during
/// reactor thread exit (the pollers are gone already).
pub(crate) fn unregister(h: &PollerHandle) {
    if reactor::is_reactor_thread() {
        h.unregister();
    }
}

/// A channel's queue of requests whose work is done, completed by a poller on
/// the next reactor iteration. Bounded: a full queue pushes back, and waiters
/// run once the poller has made room.
pub(crate) struct LocalQueue {
    q: RefCell<VecDeque<Box<BdevIo>>>,
    waiters: RefCell<Vec<Box<dyn FnOnce()>>>,
}

impl LocalQueue {
    /// A queue and the poller (named `name`) that drains it. Unregister the
    /// poller (and call [`LocalQueue::abort_all`]) when the channel goes away.
    pub(crate) fn start(name: &str) -> (Rc<LocalQueue>, PollerHandle) {
        let q = Rc::new(LocalQueue {
            q: RefCell::new(VecDeque::with_capacity(LOCAL_QUEUE_DEPTH)),
            waiters: RefCell::new(Vec::new()),
        });
        let weak = Rc::downgrade(&q);
        let h = register_poller(name, move || match weak.upgrade() {
            Some(q) => q.poll(),
            None => PollStatus::Idle,
        });
        (q, h)
    }

    /// Whether another request fits.
    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        self.q.borrow().len() < LOCAL_QUEUE_DEPTH
    }

    /// Queues a request whose status is already set.
    #[inline]
    pub(crate) fn push(&self, io: Box<BdevIo>) {
        self.q.borrow_mut().push_back(io);
    }

    /// Runs `f` after the next drain.
    pub(crate) fn wait(&self, f: Box<dyn FnOnce()>) {
        self.waiters.borrow_mut().push(f);
    }

    #[inline]
    fn poll(&self) -> PollStatus {
        let n = self.q.borrow().len();
        if n == 0 && self.waiters.borrow().is_empty() {
            return PollStatus::Idle;
        }
        // Only what was queued before this poll: completions that resubmit land
        // in the next round.
        for _ in 0..n {
            let Some(io) = self.q.borrow_mut().pop_front() else {
                break;
            };
            let st = io.status;
            io.complete(st);
        }
        if !self.waiters.borrow().is_empty() {
            let ws = std::mem::take(&mut *self.waiters.borrow_mut());
            for w in ws {
                w();
            }
        }
        PollStatus::Busy
    }

    /// Completes everything queued with `Aborted` (the channel is going away).
    pub(crate) fn abort_all(&self) {
        loop {
            let Some(io) = self.q.borrow_mut().pop_front() else {
                break;
            };
            io.complete(IoStatus::Aborted);
        }
        let ws = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in ws {
            w();
        }
    }
}
