//! Parking and waking a reactor: an epoll set holding an eventfd (for messages)
//! plus any file descriptors the reactor's users register.

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::time::Duration;

const WAKE_TOKEN: u64 = u64::MAX;

/// The cross-thread half: lets any thread wake a parked reactor.
pub(crate) struct Notifier {
    efd: EventFd,
    sleeping: AtomicBool,
}

impl Notifier {
    pub(crate) fn new() -> nix::Result<Self> {
        Ok(Self {
            efd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Called after publishing work for the reactor (a queued message).
    #[inline]
    pub(crate) fn notify(&self) {
        // Pairs with the fence in `Parker::park`: either the reactor sees our work
        // when it re-checks, or we see it sleeping and write the eventfd.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            let _ = self.efd.write(1);
        }
    }

    /// Unconditional wake (shutdown).
    pub(crate) fn wake(&self) {
        let _ = self.efd.write(1);
    }
}

/// The reactor-local half: the epoll set.
pub(crate) struct Parker {
    epoll: Epoll,
}

impl Parker {
    pub(crate) fn new(notifier: &Notifier) -> nix::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            notifier.efd.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )?;
        Ok(Self { epoll })
    }

    /// Adds `fd` (edge-triggered, readable or writable) to the wake set.
    pub(crate) fn add_fd(&self, fd: RawFd) -> nix::Result<()> {
        // SAFETY: the caller keeps the fd open until `remove_fd`; epoll only records it.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET;
        self.epoll.add(bfd, EpollEvent::new(flags, fd as u64))
    }

    pub(crate) fn remove_fd(&self, fd: RawFd) -> nix::Result<()> {
        // SAFETY: as in `add_fd`; the fd is still open when removed.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.epoll.delete(bfd)
    }

    /// Sleeps until woken or `timeout` passes. `has_work` is re-checked after the
    /// sleeping flag is published so no wake-up can be lost.
    pub(crate) fn park(
        &self,
        notifier: &Notifier,
        timeout: Option<Duration>,
        has_work: impl Fn() -> bool,
    ) {
        notifier.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !has_work() {
            let mut events = [EpollEvent::empty(); 16];
            let t = match timeout {
                None => EpollTimeout::NONE,
                Some(d) => {
                    let ms = d.as_micros().div_ceil(1000).min(60_000) as u16;
                    EpollTimeout::from(ms)
                }
            };
            let _ = self.epoll.wait(&mut events, t);
        }
        notifier.sleeping.store(false, Ordering::Relaxed);
        let _ = notifier.efd.read_nonblocking();
        let _ = notifier.efd.as_fd().as_raw_fd();
    }
}

trait ReadNonblocking {
    fn read_nonblocking(&self) -> nix::Result<u64>;
}

impl ReadNonblocking for EventFd {
    fn read_nonblocking(&self) -> nix::Result<u64> {
        self.read()
    }
}
