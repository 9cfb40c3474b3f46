//! What a handler running on a connection thread may ask about the call it
//! serves: whether it is still wanted.
//!
//! The contract: while a connection thread serves a request, [`cancelled`]
//! answers `true` once the client has hung up (its socket reports a hang-up:
//! `POLLHUP`/`POLLERR`; for TCP, where a closed peer shows only its FIN, the
//! end of stream found by a peek) or the server is stopping.
//! A handler that waits (a `timeout` parameter) checks it between waits and
//! gives up, so a departed client or a stop never leaves a thread behind.
//! Outside a connection thread (config replay, tests) it is always `false`.

use super::socket::Conn;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, MsgFlags};
use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct Watch {
    conn: Conn,
    stopping: Arc<AtomicBool>,
}

thread_local! {
    static CURRENT: RefCell<Option<Watch>> = const { RefCell::new(None) };
}

/// Marks the current thread as serving `conn` (a second handle to it) of a
/// server whose stop sets `stopping`, until the guard drops.
pub(crate) fn enter(conn: Conn, stopping: Arc<AtomicBool>) -> Guard {
    CURRENT.with(|c| *c.borrow_mut() = Some(Watch { conn, stopping }));
    Guard(())
}

/// Ends what [`enter`] started.
pub(crate) struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// Whether the call this thread serves is no longer wanted: its client hung
/// up or the server is stopping.
pub fn cancelled() -> bool {
    CURRENT.with(|c| {
        let c = c.borrow();
        let Some(w) = c.as_ref() else {
            return false;
        };
        if w.stopping.load(Ordering::SeqCst) {
            return true;
        }
        // Asking for no event: the kernel still reports a hang-up or an error.
        let mut fds = [PollFd::new(w.conn.as_fd(), PollFlags::empty())];
        let hung_up = match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0].revents().is_some_and(|r| {
                r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL)
            }),
            Err(_) => false,
        };
        // A TCP peer that closed shows only its FIN (until a write fails): a
        // peek that finds the end of stream.
        hung_up
            || matches!(w.conn, Conn::Tcp(_))
                && matches!(
                    socket::recv(
                        w.conn.as_fd().as_raw_fd(),
                        &mut [0u8; 1],
                        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
                    ),
                    Ok(0)
                )
    })
}
