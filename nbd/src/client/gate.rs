//! The gate a reactor's connections of one NBD bdev share (the first
//! connection, and with multi-conn each channel's background connection):
//! while a client is using the export, a job's background requests
//! ([`bdev::BdevIo::background`]) wait their turn across all of them.
//!
//! The client is *busy* while one of its (foreground) requests is queued or
//! in flight on any of the connections, and for [`QUIET`] after the last one
//! completed (a client at queue depth 1 sends its next request right after
//! the previous one completed). While it is busy, at most [`BG_WHILE_BUSY`]
//! background requests are in flight over all the connections together, so
//! a client's read waits behind at most that much job data at the server and
//! on its disk. One background request may always go, so a job still moves
//! while a client reads; when the client is idle there is no limit here (the
//! job's own window bounds what it sends). The limit applies when a
//! background request is about to be sent, so it holds from the client's
//! first request on, not from the job's next look at its clients.
//!
//! Each connection registers with the gate; when a background request ends,
//! every registered connection's writer is woken to look again.
//!
//! The gate also paces a job's data while the client is busy
//! ([`Gate::reserve`], used by `split.rs` for each piece of a background
//! read): the pieces of all of the reactor's background reads of the bdev
//! take turns on one timeline at the busy rate, so a client reading without
//! pause shares the source, the link and both hosts' CPUs with at most that
//! many bytes per second of the job's. A pause of the client earns no credit:
//! the timeline restarts from now, and once the client is quiet there is no
//! pacing at all.

use super::conn::Conn;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

/// Background requests in flight, over all of a reactor's connections of a
/// bdev, while a client is busy.
pub const BG_WHILE_BUSY: usize = 1;
/// How long a client stays busy after its last request completed.
pub const QUIET: Duration = Duration::from_millis(5);

/// One reactor's gate for one bdev. Not `Send`: it lives on that reactor.
#[derive(Default)]
pub struct Gate {
    /// Foreground requests submitted and not yet completed.
    fg: Cell<usize>,
    /// When the last foreground request completed.
    last_fg: Cell<Option<Instant>>,
    /// Background requests in flight (sent, not yet answered).
    bg: Cell<usize>,
    /// When the next paced background bytes may go ([`Self::reserve`]).
    next_bg: Cell<Option<Instant>>,
    /// The connections to wake when a background request ends.
    conns: RefCell<Vec<Weak<Conn>>>,
}

impl Gate {
    /// A gate with nothing in flight.
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// Adds `c` to the connections woken when a background request ends.
    pub fn register(&self, c: &Rc<Conn>) {
        let mut v = self.conns.borrow_mut();
        v.retain(|w| w.strong_count() > 0);
        v.push(Rc::downgrade(c));
    }

    /// A foreground request was submitted.
    pub fn fg_start(&self) {
        self.fg.set(self.fg.get() + 1);
    }

    /// A foreground request completed (or failed).
    pub fn fg_end(&self) {
        self.fg.set(self.fg.get().saturating_sub(1));
        self.last_fg.set(Some(Instant::now()));
    }

    /// A client has requests queued or in flight, or had within [`QUIET`].
    pub fn busy(&self) -> bool {
        self.fg.get() > 0 || self.last_fg.get().is_some_and(|t| t.elapsed() < QUIET)
    }

    /// Whether a background request may be sent now (then call [`Self::bg_start`]).
    pub fn may_send_bg(&self) -> bool {
        self.bg.get() < BG_WHILE_BUSY.max(1) || !self.busy()
    }

    /// Books `bytes` of background data at `rate` bytes per second on the
    /// gate's timeline and returns how long after `now` they may go: when
    /// the bytes booked before them have had their time. A timeline that
    /// ended before `now` restarts at `now` (no credit for idle time).
    pub fn reserve(&self, now: Instant, bytes: u64, rate: u64) -> Duration {
        let start = self.next_bg.get().filter(|t| *t > now).unwrap_or(now);
        let span = Duration::from_nanos(
            (u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1))).min(u64::MAX as u128)
                as u64,
        );
        self.next_bg.set(Some(start + span));
        start - now
    }

    /// A background request was sent.
    pub fn bg_start(&self) {
        self.bg.set(self.bg.get() + 1);
    }

    /// A background request was answered, failed or taken back to be sent
    /// again: the connections look at their queues again. Returns the
    /// connections to wake (woken by the caller once it holds no borrow).
    pub fn bg_end(&self) -> Vec<Rc<Conn>> {
        self.bg.set(self.bg.get().saturating_sub(1));
        self.conns
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_requests_go_one_at_a_time_while_a_client_is_busy() {
        let g = Gate::new();
        assert!(!g.busy());
        g.bg_start();
        g.bg_start();
        assert!(g.may_send_bg(), "an idle client: no limit here");
        let _ = g.bg_end();
        let _ = g.bg_end();
        g.fg_start();
        assert!(g.busy());
        assert!(g.may_send_bg(), "one may always go");
        g.bg_start();
        assert!(!g.may_send_bg(), "but only {BG_WHILE_BUSY} while busy");
        g.fg_end();
        assert!(g.busy(), "busy for QUIET after the last one");
        assert!(!g.may_send_bg());
        std::thread::sleep(QUIET + Duration::from_millis(2));
        assert!(!g.busy());
        assert!(g.may_send_bg(), "the limit lifts once the client is quiet");
        let _ = g.bg_end();
        assert!(g.may_send_bg());
    }

    #[test]
    fn paced_bytes_take_turns_on_one_timeline_without_credit_for_idle_time() {
        let g = Gate::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // 64 KiB at 64 MiB/s: about 1 ms each.
        let (piece, rate) = (64u64 << 10, 64u64 << 20);
        let span = Duration::from_nanos(piece * 1_000_000_000 / rate);
        assert_eq!(
            g.reserve(t0, piece, rate),
            Duration::ZERO,
            "the first goes at once"
        );
        assert_eq!(
            g.reserve(t0, piece, rate),
            span,
            "the second after the first's time"
        );
        assert_eq!(g.reserve(t0, piece, rate), span * 2);
        // Later, with the timeline still running: it waits for the rest.
        assert_eq!(g.reserve(t0 + span, piece, rate), span * 2);
        // Long after the timeline ended: at once, and no burst of credit.
        let late = t0 + ms(100);
        assert_eq!(g.reserve(late, piece, rate), Duration::ZERO);
        assert_eq!(g.reserve(late, piece, rate), span);
        // A rate of 0 is taken as 1 byte per second, never a division by zero.
        assert!(g.reserve(late, 1, 0) >= span * 2);
    }
}
