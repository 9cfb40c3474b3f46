//! A job's background read submitted while a client is busy (`gate.rs`)
//! goes to the server in pieces of at most [`BG_PIECE`] bytes, one after the
//! other, each into a buffer of its own and copied into the request when it
//! arrives: a client's read then waits behind at most one piece at the
//! server and on its disk, not behind a whole chunk of the job. Once the
//! client is quiet again, the rest goes as one request. The pieces are
//! background reads through the bdev's channel on this reactor, so the gate
//! orders them like any other; the request completes with the first failed
//! piece's status, or success when all arrived.

use super::gate::Gate;
use bdev::{Bdev, BdevIo, DmaBuf, IoStatus};
use std::rc::Rc;
use std::sync::Arc;

/// The largest piece of a background read while a client is busy.
pub const BG_PIECE: u64 = 64 << 10;

/// Whether background read `io` is to be read in pieces now.
pub fn wanted(io: &BdevIo, gate: &Gate) -> bool {
    io.io_type == bdev::IoType::Read && io.len > BG_PIECE && gate.busy()
}

/// Reads `io` (a background read) from `b` in pieces, on this reactor, and
/// completes it.
pub fn read_in_pieces(b: Arc<dyn Bdev>, gate: Rc<Gate>, mut io: Box<BdevIo>) {
    reactor::spawn_local(async move {
        let st = match bdev::channel(&b) {
            Ok(ch) => {
                let mut at = 0u64;
                let mut st = IoStatus::Success;
                while at < io.len {
                    let rest = io.len - at;
                    let n = if gate.busy() { rest.min(BG_PIECE) } else { rest };
                    let Ok(buf) = DmaBuf::new(n as usize) else {
                        st = IoStatus::Nomem;
                        break;
                    };
                    let mut p = BdevIo::read(io.offset + at, buf, None);
                    p.background = true;
                    let mut p = bdev::submit_wait(&ch, p).await;
                    match (p.status, p.take_buf()) {
                        (s, Some(buf)) if s.is_ok() => io.copy_in(at as usize, buf.as_slice()),
                        (s, _) => {
                            st = if s.is_ok() { IoStatus::Eio } else { s };
                            break;
                        }
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
