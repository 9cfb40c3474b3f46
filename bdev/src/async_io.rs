//! Awaiting requests from local tasks (control paths, virtual bdevs, jobs).

use crate::channel::IoChannel;
use crate::dma::DmaBuf;
use crate::error::BdevError;
use crate::io::{BdevIo, IoDone, IoStatus, IoType};
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

#[derive(Default)]
struct Waiter {
    io: RefCell<Option<Box<BdevIo>>>,
    waker: RefCell<Option<Waker>>,
}

impl IoDone for Waiter {
    fn io_done(&self, io: Box<BdevIo>) {
        *self.io.borrow_mut() = Some(io);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Result of an awaited data request: the buffer back, or the status it failed with.
pub type IoResult = Result<DmaBuf, BdevError>;

/// Submits `io` (waiting for queue space if needed) and waits for its completion.
/// The request comes back with `status` set and no completion target.
pub async fn submit_wait(ch: &IoChannel, mut io: Box<BdevIo>) -> Box<BdevIo> {
    let w = Rc::new(Waiter::default());
    io.set_done(Some(w.clone()));
    loop {
        match ch.submit(io) {
            Ok(()) => break,
            Err(back) => {
                io = back;
                let (tx, rx) = futures::channel::oneshot::channel::<()>();
                ch.wait_for_space(Box::new(move || {
                    let _ = tx.send(());
                }));
                let _ = rx.await;
            }
        }
    }
    let mut io = poll_fn(|cx| match w.io.borrow_mut().take() {
        Some(io) => Poll::Ready(io),
        None => {
            *w.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
    io.set_done(None);
    io
}

/// Reads `len` bytes at `offset` into a new buffer.
pub async fn read_at(ch: &IoChannel, offset: u64, len: usize) -> IoResult {
    let buf = DmaBuf::new(len)?;
    let mut io = submit_wait(ch, BdevIo::read(offset, buf, None)).await;
    buf_result(&mut io)
}

/// Writes `buf` at `offset`; gives the buffer back.
pub async fn write_at(ch: &IoChannel, offset: u64, buf: DmaBuf) -> IoResult {
    let mut io = submit_wait(ch, BdevIo::write(offset, buf, None)).await;
    buf_result(&mut io)
}

/// The buffer of a finished request, or its error status.
fn buf_result(io: &mut BdevIo) -> IoResult {
    let st = io.status;
    let buf = io.take_buf().ok_or(BdevError::Io(IoStatus::Eio))?;
    if st.is_ok() {
        Ok(buf)
    } else {
        Err(BdevError::Io(st))
    }
}

/// Runs a request without data (flush, unmap, write-zeroes) and returns its status.
pub async fn simple_io(ch: &IoChannel, t: IoType, offset: u64, len: u64) -> IoStatus {
    submit_wait(ch, BdevIo::new(t, offset, len, None, None))
        .await
        .status
}
