//! Listening sockets: the Unix socket (mode 0600, a lock beside it, a stale
//! socket of a dead daemon replaced, a live one refused) and the optional TCP
//! socket (loopback unless explicitly allowed).

use super::TransportError;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::sys::stat::Mode;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A listening socket.
pub enum Listener {
    /// A Unix socket, with the guard that removes its file.
    Unix(UnixListener, UnixSocketGuard),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(_, g) => g.path.display().to_string(),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }

    /// The TCP address, if TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Puts the socket in non-blocking mode (the accept loop polls it).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l, _) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

/// One accepted connection.
pub enum Conn {
    /// Over the Unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Conn {
    /// Another handle to the same connection.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        }
    }

    /// Bounds how long a write may block (a client that stops reading).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Bounds how long a read may wait for the client (the idle timeout).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Writes all of `buf` within `limit` in all: a client that reads slowly
    /// cannot stretch one reply past it. (A blocking write with a send
    /// timeout would not do: the kernel restarts that timeout for every chunk
    /// it manages to queue.) Non-blocking sends, and `poll` for room with what
    /// is left of the limit; `TimedOut` when it passes.
    pub fn write_all_within(&mut self, mut buf: &[u8], limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        while !buf.is_empty() {
            match socket::send(
                self.as_fd().as_raw_fd(),
                buf,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLOUT)];
            match nix::poll::poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Makes the socket blocking (accepted sockets may inherit non-blocking mode).
    pub fn set_blocking(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(false),
            Conn::Tcp(s) => s.set_nonblocking(false),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Removes the socket file and its lock file when dropped; holds the lock.
pub struct UnixSocketGuard {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for UnixSocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Binds a Unix socket at `path` with mode 0600.
///
/// A lock file `PATH.lock` is held for the socket's lifetime (as SPDK does), so a
/// second sluice on the same path fails clearly. An existing socket file is
/// probed: if something accepts connections on it, binding fails; if nothing
/// does (a daemon died without cleaning up), it is replaced.
pub fn bind_unix(path: &Path) -> Result<Listener, TransportError> {
    let err = |what: &'static str| {
        let path = path.to_path_buf();
        move |source: io::Error| TransportError::Io {
            what,
            path: path.clone(),
            source,
        }
    };
    let lock_path = lock_path(path);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(err("creating lock file for"))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        TransportError::InUse {
            path: path.to_path_buf(),
            why: format!(
                "another sluice is serving on it (it holds {})",
                lock_path.display()
            ),
        }
    })?;

    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(TransportError::InUse {
                    path: path.to_path_buf(),
                    why: "a live server accepts connections on it".into(),
                });
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "replacing stale socket");
                std::fs::remove_file(path).map_err(err("removing stale socket"))?;
            }
        },
        Ok(_) => {
            return Err(TransportError::InUse {
                path: path.to_path_buf(),
                why: "the path exists and is not a socket".into(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("inspecting")(e)),
    }

    let listener = bind_private(path).map_err(err("binding"))?;
    let guard = UnixSocketGuard {
        path: path.to_path_buf(),
        lock_path,
        _lock: lock,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("setting the mode of"))?;
    Ok(Listener::Unix(listener, guard))
}

/// socket(2) + fchmod 0600 + bind(2) + listen(2): on Linux the socket file takes
/// the mode of the socket inode, so it never exists with looser permissions.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o600))?;
    let addr = UnixAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    let backlog = Backlog::new(512).unwrap_or(Backlog::MAXCONN);
    if let Err(e) = socket::listen(&fd, backlog) {
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(UnixListener::from(fd))
}

/// Binds a TCP socket; refuses a non-loopback address unless `allow_remote`.
pub fn bind_tcp(addr: &str, allow_remote: bool) -> Result<Listener, TransportError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| TransportError::BadAddress {
            addr: addr.into(),
            why: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::BadAddress {
            addr: addr.into(),
            why: "resolves to nothing".into(),
        });
    }
    if !allow_remote {
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(TransportError::BadAddress {
                addr: addr.into(),
                why: format!(
                    "{} is not a loopback address; pass --rpc-allow-remote to listen on it",
                    a.ip()
                ),
            });
        }
    }
    let l = TcpListener::bind(&addrs[..]).map_err(|source| TransportError::Io {
        what: "binding",
        path: PathBuf::from(addr),
        source,
    })?;
    Ok(Listener::Tcp(l))
}
