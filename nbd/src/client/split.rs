//! A job's background read submitted while a client is busy (`gate.rs`)
//! goes to the server in pieces of at most [`BG_PIECE`] bytes, one after the
//! other, each a sub-request over its range of the request's own memory
//! ([`BdevIo::sub_io`]: no buffer or copy per piece): a client's read then
//! waits behind at most one piece at the
//! server and on its disk, not behind a whole chunk of the job. Once the
//! client is quiet again, the rest goes as one request. The pieces are
//! background reads through the bdev's channel on this reactor, so the gate
//! orders them like any other; the request completes with the first failed
//! piece's status, or success when all arrived.
//!
//! While the client is busy the pieces are also paced: each waits for its
//! turn on the gate's timeline ([`Gate::reserve`]) at [`BG_BUSY_RATE`], so a
//! job yields the source, the link and the CPUs to a client that reads
//! without pause, and still moves (a post-copy migration must end). Measured
//! on two namespaces of one 2-core machine (`scripts/bench/nbd_tls.sh`, see
//! BENCHMARKS.md): unpaced, a QD 1 reader's p99 during the stream was 6-9x
//! its idle p99; at 64 MiB/s it stays within 2x. A background read no longer
//! than a piece is paced too.
//!
//! The piece size is [`BG_PIECE`] and the rate [`BG_BUSY_RATE`] unless the
//! service set others at start-up ([`piece_from_env`]:
//! `SLUICE_NBD_BG_PIECE_KB`, 0 for no pieces and no pacing;
//! `SLUICE_NBD_BG_BUSY_MIBS`, 0 for pieces at full speed).

use super::gate::Gate;
use bdev::{Bdev, BdevIo, IoStatus};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The largest piece of a background read while a client is busy.
pub const BG_PIECE: u64 = 64 << 10;

/// A job's data rate (bytes per second) over a reactor's connections of a
/// bdev while a client is busy.
pub const BG_BUSY_RATE: u64 = 64 << 20;

/// The piece size in use (0: no pieces).
static PIECE: AtomicU64 = AtomicU64::new(BG_PIECE);
/// The busy rate in use (0: not paced).
static RATE: AtomicU64 = AtomicU64::new(BG_BUSY_RATE);

/// Sets the piece size from `SLUICE_NBD_BG_PIECE_KB` in `env` (KiB, at least
/// 4; 0: background reads are never cut); junk is ignored. Read once, at
/// start-up, by the service. Returns the size in use.
pub fn piece_from_env(env: impl Fn(&str) -> Option<String>) -> u64 {
    if let Some(b) = parse_piece(env("SLUICE_NBD_BG_PIECE_KB")) {
        PIECE.store(b, Ordering::Relaxed);
    }
    if let Some(r) = parse_rate(env("SLUICE_NBD_BG_BUSY_MIBS")) {
        RATE.store(r, Ordering::Relaxed);
    }
    PIECE.load(Ordering::Relaxed)
}

/// The busy rate in bytes per second a value of `SLUICE_NBD_BG_BUSY_MIBS`
/// (MiB/s) asks for: 0 is "not paced", at most 1 TiB/s.
fn parse_rate(v: Option<String>) -> Option<u64> {
    let mibs = v?.trim().parse::<u64>().ok()?;
    Some(mibs.min(1 << 20) << 20)
}

/// The piece size in bytes a value of `SLUICE_NBD_BG_PIECE_KB` asks for.
fn parse_piece(v: Option<String>) -> Option<u64> {
    let kb = v?.trim().parse::<u64>().ok()?;
    Some(if kb == 0 {
        0
    } else {
        kb.clamp(4, 1 << 20) << 10
    })
}

/// The tag ([`BdevIo::tag`], the submitter's field: this module submits the
/// pieces) that marks a piece, so that it goes to the connection as it is.
const PIECE_TAG: u64 = u64::from_be_bytes(*b"nbdpiece");

/// Whether background read `io` is to be read in pieces now (a piece never is).
pub fn wanted(io: &BdevIo, gate: &Gate) -> bool {
    let piece = PIECE.load(Ordering::Relaxed);
    piece > 0
        && io.tag != PIECE_TAG
        && io.io_type == bdev::IoType::Read
        && (io.len > piece || RATE.load(Ordering::Relaxed) > 0)
        && gate.busy()
}

/// Reads `io` (a background read) from `b` in pieces, on this reactor, and
/// completes it.
pub fn read_in_pieces(b: Arc<dyn Bdev>, gate: Rc<Gate>, io: Box<BdevIo>) {
    reactor::spawn_local(async move {
        let st = match bdev::channel(&b) {
            Ok(ch) => {
                let mut at = 0u64;
                let mut st = IoStatus::Success;
                while at < io.len {
                    let rest = io.len - at;
                    let piece = PIECE.load(Ordering::Relaxed).max(4096);
                    let busy = gate.busy();
                    let n = if busy { rest.min(piece) } else { rest };
                    let rate = RATE.load(Ordering::Relaxed);
                    if busy && rate > 0 {
                        let wait = gate.reserve(std::time::Instant::now(), n, rate);
                        if !wait.is_zero() {
                            reactor::sleep(wait).await;
                        }
                    }
                    // SAFETY: `io` is owned by this task and completed only
                    // after the loop; the pieces go one at a time over
                    // disjoint ranges, each awaited before the next, and
                    // nothing else touches `io`'s memory meanwhile.
                    let mut p = unsafe {
                        BdevIo::sub_io(&io, at, n, bdev::IoType::Read, io.offset + at, None)
                    };
                    p.tag = PIECE_TAG;
                    let s = bdev::submit_wait(&ch, p).await.status;
                    if !s.is_ok() {
                        st = s;
                        break;
                    }
                    at += n;
                }
                st
            }
            Err(_) => IoStatus::Eio,
        };
        io.complete(st);
    })
    .detach();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_piece_size_parses_clamps_and_ignores_junk() {
        let p = |v: &str| parse_piece(Some(v.to_string()));
        assert_eq!(parse_piece(None), None);
        assert_eq!(p("junk"), None);
        assert_eq!(p("-1"), None);
        assert_eq!(p("0"), Some(0), "0: never cut");
        assert_eq!(p("1"), Some(4 << 10));
        assert_eq!(p(" 128 "), Some(128 << 10));
        assert_eq!(p("99999999999"), Some(1 << 30));
        // Nothing set: the default stays (other tests cut reads meanwhile).
        assert_eq!(piece_from_env(|_| None), BG_PIECE);
        let r = |v: &str| parse_rate(Some(v.to_string()));
        assert_eq!(parse_rate(None), None);
        assert_eq!(r("x"), None);
        assert_eq!(r("0"), Some(0), "0: not paced");
        assert_eq!(r(" 64 "), Some(64 << 20));
        assert_eq!(r("99999999999"), Some(1 << 40));
        assert_eq!(RATE.load(Ordering::Relaxed), BG_BUSY_RATE);
    }
}
