//! Connecting without blocking the reactor: a non-blocking `connect`, then
//! the socket's readiness; a TCP host name other than an address literal is
//! resolved by the system resolver (`/etc/hosts` for `localhost`).

use super::config::ServerAddr;
use crate::net::{AsyncSock, Sock};
use nix::sys::socket::{
    connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    SockaddrIn6, UnixAddr,
};
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Connects to `addr` on the current reactor.
pub async fn connect_to(addr: &ServerAddr) -> io::Result<AsyncSock> {
    match addr {
        ServerAddr::Unix(path) => {
            let fd = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            let ua = UnixAddr::new(path.as_path())?;
            let pending = start(&fd, &ua)?;
            let s = AsyncSock::new(Sock::Unix(UnixStream::from(fd)))?;
            finish(s, pending).await
        }
        ServerAddr::Inet { host, port } => {
            let sa: SocketAddr = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, *port),
                Err(_) => (host.as_str(), *port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| io::Error::other(format!("no address for host {host:?}")))?,
            };
            let (pending, fd) = match sa {
                SocketAddr::V4(a) => {
                    let fd = socket(
                        AddressFamily::Inet,
                        SockType::Stream,
                        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                        None,
                    )?;
                    let p = start(&fd, &SockaddrIn::from(a))?;
                    (p, fd)
                }
                SocketAddr::V6(a) => {
                    let fd = socket(
                        AddressFamily::Inet6,
                        SockType::Stream,
                        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                        None,
                    )?;
                    let p = start(&fd, &SockaddrIn6::from(a))?;
                    (p, fd)
                }
            };
            let t = TcpStream::from(fd);
            t.set_nodelay(true)?;
            let s = AsyncSock::new(Sock::Tcp(t))?;
            finish(s, pending).await
        }
    }
}

/// Starts the connect; `true` when it is still in progress.
fn start(fd: &OwnedFd, addr: &dyn nix::sys::socket::SockaddrLike) -> io::Result<bool> {
    match connect(fd.as_raw_fd(), addr) {
        Ok(()) => Ok(false),
        Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EAGAIN) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Waits for an in-progress connect to finish, and reports its outcome.
async fn finish(s: AsyncSock, pending: bool) -> io::Result<AsyncSock> {
    if !pending {
        return Ok(s);
    }
    loop {
        let err = getsockopt(&s.sock, sockopt::SocketError)?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        if nix::sys::socket::getpeername::<nix::sys::socket::SockaddrStorage>(
            s.sock.as_fd().as_raw_fd(),
        )
        .is_ok()
        {
            return Ok(s);
        }
        s.reg.clear_writable();
        poll_fn(|cx| s.reg.poll_writable(cx)).await;
    }
}
