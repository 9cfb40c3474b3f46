//! Socket readiness on the reactors, without a thread per connection.
//!
//! Each reactor that serves sockets gets one private epoll set; that set's fd is
//! registered with the reactor ([`reactor::register_fd`]) so a parked reactor
//! wakes when any socket becomes ready, and an active poller harvests its events
//! (`epoll_wait` with a zero timeout) and wakes the task that owns each ready
//! socket. The harvest is skipped while no socket is registered, and after an
//! empty one it waits [`HARVEST_INTERVAL`] before asking the kernel again, so a
//! spinning reactor does not spend itself on a system call per iteration; after
//! a harvest that found events it asks again on the next iteration (a burst is
//! likely to go on). Sockets are edge-triggered: a task
//! reads (or writes) until the kernel says "would block", then waits for the next
//! edge. An idle reactor parks; an idle connection costs nothing. A reactor
//! woken from a park harvests on its next iteration whatever the interval says
//! ([`reactor::parks`]): the park took the edge that woke it, and with a short
//! `--park-after-us` the reactor would otherwise park again before the
//! interval ended and sleep through the socket's readiness.

use crate::tls::TlsSock;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use reactor::{register_poller, PollStatus, PollerHandle};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Least time between two empty harvests of a reactor's socket set: the most a
/// spinning reactor adds to the latency of noticing a socket edge.
pub const HARVEST_INTERVAL: Duration = Duration::from_micros(4);

/// [`HARVEST_INTERVAL`] in reactor ticks (computed once per reactor, when
/// its socket set is made).
fn harvest_interval_ticks() -> u64 {
    #[cfg(test)]
    let interval = tests::INTERVAL
        .with(|i| i.get())
        .unwrap_or(HARVEST_INTERVAL);
    #[cfg(not(test))]
    let interval = HARVEST_INTERVAL;
    (interval.as_nanos() * reactor::ticks_hz() as u128 / 1_000_000_000) as u64
}

/// Readiness of one registered fd.
struct Source {
    gen: u64,
    readable: Cell<bool>,
    writable: Cell<bool>,
    /// The peer closed its side (or the socket failed): reads never block again,
    /// so a short read no longer means "drained" and the end of stream must
    /// still be read (its edge may have come with the last bytes).
    hup: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

struct Net {
    epoll: Epoll,
    sources: RefCell<Slab<Rc<Source>>>,
    next_gen: Cell<u64>,
    /// Tick before which an `epoll_wait` is skipped (0: ask on the next poll).
    next_harvest: Cell<u64>,
    /// [`harvest_interval_ticks`], cached.
    interval: u64,
    /// The reactor's park count at the last harvest ([`reactor::parks`]).
    parks_seen: Cell<u64>,
    _poller: PollerHandle,
}

thread_local! {
    static NET: RefCell<Option<Rc<Net>>> = const { RefCell::new(None) };
}

fn net() -> io::Result<Rc<Net>> {
    if let Some(n) = NET.with(|n| n.borrow().clone()) {
        return Ok(n);
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
    reactor::register_fd(epoll.0.as_raw_fd())?;
    let poller = register_poller("nbd_sockets", poll_sockets);
    let n = Rc::new(Net {
        epoll,
        sources: RefCell::new(Slab::new()),
        next_gen: Cell::new(0),
        next_harvest: Cell::new(0),
        interval: harvest_interval_ticks(),
        parks_seen: Cell::new(reactor::parks()),
        _poller: poller,
    });
    NET.with(|c| *c.borrow_mut() = Some(n.clone()));
    Ok(n)
}

/// The reactor poller: harvests ready sockets and wakes their tasks.
fn poll_sockets() -> PollStatus {
    let Some(n) = NET.with(|n| n.borrow().clone()) else {
        return PollStatus::Idle;
    };
    if n.sources.borrow().is_empty() {
        return PollStatus::Idle;
    }
    let now = reactor::ticks();
    let due = n.next_harvest.get();
    // A reactor that parked since the last harvest looks at once: a socket's
    // edge may be what woke it, and the park consumed that edge (waiting out
    // the interval, the reactor could park again and sleep through it).
    let parks = reactor::parks();
    let woke = parks != n.parks_seen.get();
    n.parks_seen.set(parks);
    // (The second test guards against a clock that went backwards.)
    if !woke && now < due && due - now <= n.interval {
        return PollStatus::Idle;
    }
    let mut events = [EpollEvent::empty(); 64];
    let got = match n.epoll.wait(&mut events, EpollTimeout::ZERO) {
        Ok(k) => k,
        Err(_) => return PollStatus::Idle,
    };
    n.next_harvest
        .set(if got > 0 { 0 } else { now + n.interval });
    for ev in &events[..got] {
        let token = ev.data();
        let key = (token & 0xffff_ffff) as usize;
        let gen = token >> 32;
        let src = n.sources.borrow().get(key).cloned();
        let Some(src) = src else { continue };
        if src.gen & 0xffff_ffff != gen {
            continue;
        }
        let f = ev.events();
        let err = f.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP);
        if err || f.intersects(EpollFlags::EPOLLRDHUP) {
            src.hup.set(true);
        }
        if err || f.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP) {
            src.readable.set(true);
        }
        if err || f.contains(EpollFlags::EPOLLOUT) {
            src.writable.set(true);
        }
        // The waker stays: the owning task keeps waiting on this fd for its life.
        let w = src.waker.borrow().clone();
        if let Some(w) = w {
            w.wake();
        }
    }
    PollStatus::from(got > 0)
}

/// An fd registered with the current reactor's socket set; removed on drop.
/// Must be created, used and dropped on one reactor.
pub struct Registration {
    fd: RawFd,
    key: usize,
    src: Rc<Source>,
    net: Rc<Net>,
}

impl Registration {
    /// Registers `fd` (edge-triggered, read and write) on the current reactor.
    /// The caller keeps the fd open for the life of the registration.
    pub fn new(fd: RawFd) -> io::Result<Registration> {
        let net = net()?;
        let gen = net.next_gen.get() + 1;
        net.next_gen.set(gen);
        // Ready until the first "would block": nothing is missed before the first edge.
        let src = Rc::new(Source {
            gen,
            readable: Cell::new(true),
            writable: Cell::new(true),
            hup: Cell::new(false),
            waker: RefCell::new(None),
        });
        let key = net.sources.borrow_mut().insert(src.clone());
        net.next_harvest.set(0);
        let token = ((gen & 0xffff_ffff) << 32) | key as u64;
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        // SAFETY: the caller keeps `fd` open while registered; epoll only records it.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Err(e) = net.epoll.add(bfd, EpollEvent::new(flags, token)) {
            net.sources.borrow_mut().remove(key);
            return Err(e.into());
        }
        Ok(Registration { fd, key, src, net })
    }

    /// Whether the fd may be readable (no "would block" seen since the last edge).
    pub fn readable(&self) -> bool {
        self.src.readable.get()
    }

    /// Whether the fd may be writable.
    pub fn writable(&self) -> bool {
        self.src.writable.get()
    }

    /// Records that a read would block (or came back short). Once the peer has
    /// hung up the fd stays readable: the end of stream is still to be read.
    pub fn clear_readable(&self) {
        self.src.readable.set(self.src.hup.get());
    }

    /// Records that the fd may be readable after all (data may be buffered
    /// above the socket, as a TLS session's plaintext is).
    pub fn mark_readable(&self) {
        self.src.readable.set(true);
    }

    /// Records that a write would block (or was partial).
    pub fn clear_writable(&self) {
        self.src.writable.set(false);
    }

    /// Sets the waker to call on the next readiness edge.
    pub fn set_waker(&self, w: &Waker) {
        let mut slot = self.src.waker.borrow_mut();
        match slot.as_ref() {
            Some(old) if old.will_wake(w) => {}
            _ => *slot = Some(w.clone()),
        }
    }

    /// Ready when the fd may be readable.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.readable() {
            return Poll::Ready(());
        }
        self.set_waker(cx.waker());
        Poll::Pending
    }

    /// Ready when the fd may be writable.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.writable() {
            return Poll::Ready(());
        }
        self.set_waker(cx.waker());
        Poll::Pending
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: the fd is still open (the registration is dropped before its socket).
        let bfd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = self.net.epoll.delete(bfd);
        self.net.sources.borrow_mut().try_remove(self.key);
    }
}

/// A connected stream socket (TCP or Unix), non-blocking, plain or with a
/// TLS session over it ([`crate::tls::stream`]).
pub enum Sock {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
    /// TLS over one of the others.
    Tls(Box<TlsSock>),
}

impl Sock {
    /// Puts the socket in non-blocking mode (and disables Nagle on TCP).
    pub fn prepare(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)
            }
            Sock::Unix(s) => s.set_nonblocking(true),
            Sock::Tls(t) => t.inner().prepare(),
        }
    }

    /// The peer, for logs.
    pub fn peer(&self) -> String {
        match self {
            Sock::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp peer".into()),
            Sock::Unix(_) => "unix peer".into(),
            Sock::Tls(t) => t.inner().peer(),
        }
    }

    /// A second handle on the same connection (a duplicate fd; a TLS session is shared).
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(t) => Sock::Tcp(t.try_clone()?),
            Sock::Unix(u) => Sock::Unix(u.try_clone()?),
            Sock::Tls(t) => Sock::Tls(Box::new(t.try_clone()?)),
        })
    }

    /// Whether a TLS session runs over the socket.
    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Tls(_))
    }

    /// Shuts both directions down (the peer sees EOF; a TLS peer gets its
    /// close_notify first).
    pub fn shutdown(&mut self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Tls(t) => {
                t.shutdown();
                Ok(())
            }
        };
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
            Sock::Tls(t) => t.inner().as_fd(),
        }
    }
}

impl Read for Sock {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
            Sock::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Sock {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
            Sock::Tls(t) => t.write(buf),
        }
    }
    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
            Sock::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket with its registration: async exact reads and whole writes, for the
/// handshake (the transmission phase drives the socket directly).
pub struct AsyncSock {
    /// Its readiness (declared first: dropped while the socket is still open).
    pub reg: Registration,
    /// The socket.
    pub sock: Sock,
}

impl AsyncSock {
    /// Registers `sock` (already non-blocking) on the current reactor.
    pub fn new(sock: Sock) -> io::Result<AsyncSock> {
        let reg = Registration::new(sock.as_fd().as_raw_fd())?;
        Ok(AsyncSock { sock, reg })
    }

    /// Reads exactly `buf.len()` bytes; EOF before that is `UnexpectedEof`.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            poll_fn(|cx| self.reg.poll_readable(cx)).await;
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.clear_readable(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and drops `n` bytes.
    pub async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..k]).await?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut off = 0;
        while off < buf.len() {
            poll_fn(|cx| self.reg.poll_writable(cx)).await;
            match self.sock.write(&buf[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.clear_writable(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{AsyncSock, Sock};
    use reactor::{CoreSet, Runtime, RuntimeConfig};
    use std::cell::Cell;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    thread_local! {
        /// A harvest interval for this thread's socket set, set before it is made.
        pub(super) static INTERVAL: Cell<Option<Duration>> = const { Cell::new(None) };
    }

    /// A reactor that parks as soon as it idles (`--park-after-us 0`) must not
    /// sleep through a socket's edge that woke it while the harvest interval
    /// still ran: the park consumed the edge and no other comes. The interval
    /// is stretched to 10 s here so the window is certain to be hit: each echo
    /// below would otherwise wait for it (or forever: nothing else wakes the
    /// reactor).
    #[test]
    fn a_reactor_woken_from_a_park_by_a_socket_harvests_at_once() {
        let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").expect("cores"));
        cfg.pin = false;
        cfg.idle_before_park = Duration::ZERO;
        let rt = Runtime::start(cfg).expect("runtime");
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        const ROUNDS: usize = 20;
        let echo = rt.handle().spawn_on(0, move || async move {
            INTERVAL.with(|i| i.set(Some(Duration::from_secs(10))));
            let mut s = AsyncSock::new(Sock::Unix(ours)).expect("register");
            for _ in 0..ROUNDS {
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.expect("read");
                s.write_all(&b).await.expect("write");
            }
        });
        theirs
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        for i in 0..ROUNDS {
            // Let the reactor go idle and park before the byte comes.
            std::thread::sleep(Duration::from_millis(5));
            let t = Instant::now();
            theirs.write_all(&[i as u8]).expect("send");
            let mut b = [0u8; 1];
            if let Err(e) = theirs.read_exact(&mut b) {
                panic!("echo {i} not back after {:?} ({e}): the reactor slept through the socket's edge", t.elapsed());
            }
            assert_eq!(b[0], i as u8);
        }
        echo.block().expect("echo task");
        rt.shutdown();
    }
}
