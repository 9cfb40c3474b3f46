//! Image locks as QEMU takes them (`block/file-posix.c`), so that sluice,
//! qemu-img, qemu-io and qemu-storage-daemon see each other's locks both ways.
//!
//! The contract: a node that opens a file takes an [`ImageLock`] on it for as
//! long as the node lives. The lock lives on the node's own open file
//! description, the one its I/O goes through (QEMU's locks are on `s->fd`):
//! it holds that file as an `Arc<File>` shared with the I/O, so an image
//! costs one descriptor; dropping the lock unlocks its bytes. The lock is a set
//! of open-file-description byte-range read locks (`F_OFD_SETLK`), one byte
//! per permission: byte `100 + i` for each permission `i` the node holds,
//! byte `200 + i` for each permission it does not share. Taking permission
//! `i` conflicts with anyone holding byte `200 + i`; refusing to share `i`
//! conflicts with anyone holding byte `100 + i`. OFD locks conflict between
//! two open file descriptions even in one process, so two writable opens of
//! one file in sluice conflict as they would in two processes.
//!
//! A node whose role changes (an old top that becomes a backing file, a
//! backing file that a stream writes) changes its lock in place with
//! [`ImageLock::set_perms`], as QEMU's `raw_set_perm`: on the same open file
//! description, the new bytes taken before the old ones are dropped.
//!
//! A node that reopens its file (a new open file description put behind the
//! same descriptor number) moves its lock with [`ImageLock::move_to`], as
//! QEMU's `raw_reopen_prepare`/`raw_set_perm` move theirs to the new
//! descriptor: the new permissions are checked against everyone else from
//! the old description before the new one holds anything (our own second
//! description would read as "another holder": every byte is a read lock,
//! so the two never conflict with each other, but `F_OFD_GETLK` reports
//! one to the other), then the new description takes them, the old lets go
//! of what the new does not hold, and the new one takes the old one's place.
//! The file is never without its lock.
//!
//! A conflict is [`BdevError::Locked`], in QEMU's words (`Failed to get
//! "write" lock`, `Is another process using the image [path]?`). Nothing is
//! written to the file here: callers take the lock before they write,
//! extend or truncate anything.

use crate::BdevError;
use nix::fcntl::{fcntl, FcntlArg};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// QEMU's `BLK_PERM_CONSISTENT_READ`.
pub const PERM_CONSISTENT_READ: u8 = 1 << 0;
/// QEMU's `BLK_PERM_WRITE`.
pub const PERM_WRITE: u8 = 1 << 1;
/// QEMU's `BLK_PERM_WRITE_UNCHANGED`.
pub const PERM_WRITE_UNCHANGED: u8 = 1 << 2;
/// QEMU's `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u8 = 1 << 3;
/// QEMU 10's `BLK_PERM_ALL`.
pub const PERM_ALL: u8 = 0x0f;

/// QEMU's `bdrv_perm_names`, by bit.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// QEMU's `RAW_LOCK_PERM_BASE`.
const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`.
const SHARED_BASE: i64 = 200;

/// A file node's `locking` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// On where OFD locks exist (always, on Linux): QEMU's default.
    #[default]
    Auto,
    /// Always.
    On,
    /// No locks: the user vouches that nobody else writes the file.
    Off,
}

impl LockMode {
    /// Parses QEMU's `OnOffAuto` value.
    pub fn parse(s: &str) -> Option<LockMode> {
        match s {
            "auto" => Some(LockMode::Auto),
            "on" => Some(LockMode::On),
            "off" => Some(LockMode::Off),
            _ => None,
        }
    }

    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Auto => "auto",
            LockMode::On => "on",
            LockMode::Off => "off",
        }
    }

    /// Whether locks are taken.
    pub fn enabled(self) -> bool {
        self != LockMode::Off
    }
}

/// What a node holds of a file and what it lets others hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permissions held (`PERM_*` bits).
    pub perm: u8,
    /// Permissions others may hold.
    pub shared: u8,
}

impl Perms {
    /// A reader of an image (QEMU's read-only format node, a backing file):
    /// consistent reads; nobody else may write or resize.
    pub const READER: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
    };
    /// A writer of an image (QEMU's writable qcow2 node): reads, writes and
    /// resizes; nobody else may write or resize.
    pub const WRITER: Perms = Perms {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
    };
    /// Creating (truncating, formatting) a file, as QEMU's `raw_co_create`:
    /// writes and resizes; nobody else may resize.
    pub const CREATOR: Perms = Perms {
        perm: PERM_WRITE | PERM_RESIZE,
        shared: PERM_ALL & !PERM_RESIZE,
    };

    /// Nothing held, everything shared: no byte locked.
    const NONE: Perms = Perms {
        perm: 0,
        shared: PERM_ALL,
    };

    /// A read-only open with `force-share` (QEMU's `force_share` node asks
    /// its children to share everything): reads, and shares all.
    pub const SHARER: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL,
    };

    /// What a read-only open with `force_share` holds: [`Perms::SHARER`],
    /// else [`Perms::for_open`].
    pub fn for_open_sharing(read_only: bool, force_share: bool) -> Perms {
        if read_only && force_share {
            Perms::SHARER
        } else {
            Perms::for_open(read_only)
        }
    }

    /// [`Perms::READER`] or [`Perms::WRITER`].
    pub fn for_open(read_only: bool) -> Perms {
        if read_only {
            Perms::READER
        } else {
            Perms::WRITER
        }
    }
}

/// Held locks on a file, unlocked on drop (the file may stay open). The file is shared with whoever
/// does I/O through it (the lock is on that open file description).
#[derive(Debug)]
pub struct ImageLock {
    file: Arc<File>,
    path: PathBuf,
    perms: Perms,
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

impl ImageLock {
    /// Takes `perms` on `path` through a descriptor of its own (opened
    /// read-only and non-blocking: it never reads, writes or waits): for a
    /// holder that does no I/O; a node's I/O shares its lock's file
    /// ([`ImageLock::on_file`]).
    /// `Ok(None)` when `mode` is [`LockMode::Off`]. Only this module's tests
    /// take one so: every holder in the service does I/O on its file.
    #[cfg(test)]
    fn take(path: &Path, mode: LockMode, perms: Perms) -> Result<Option<ImageLock>, BdevError> {
        use std::os::unix::fs::OpenOptionsExt;
        if !mode.enabled() {
            return Ok(None);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| BdevError::os(format!("opening {}", path.display()), e))?;
        Self::on_file(Arc::new(file), path, perms).map(Some)
    }

    /// The creator's lock on a file about to be (re)written from scratch
    /// (`blockdev-create`, `bdev_qcow2_create`): [`Perms::CREATOR`] on
    /// `file`'s open file description (through a clone of its descriptor). A file some node holds open, in this
    /// process or another, is refused with [`BdevError::Locked`].
    pub fn for_create(file: &File, path: &Path) -> Result<ImageLock, BdevError> {
        let lf = file
            .try_clone()
            .map_err(|e| BdevError::os(format!("locking {}", path.display()), e))?;
        Self::on_file(Arc::new(lf), path, Perms::CREATOR)
    }

    /// Takes `perms` on `path` through `file` (the caller's open file
    /// description, open for reading, which its I/O shares), held until the
    /// lock is dropped.
    pub fn on_file(file: Arc<File>, path: &Path, perms: Perms) -> Result<ImageLock, BdevError> {
        let mut l = ImageLock {
            file,
            path: path.to_path_buf(),
            perms: Perms::NONE,
        };
        l.apply(perms)?;
        l.check(perms)?;
        l.perms = perms;
        Ok(l)
    }

    /// Changes the permissions held to `perms` in place, on the same open
    /// file description (QEMU's `raw_set_perm` after `raw_check_perm`): the
    /// bytes of both the old and the new permissions are locked first, the
    /// new ones checked against everyone else, and only then are the old
    /// bytes that `perms` does not hold unlocked, so no other process can
    /// take what this one lets go of before the change is complete. A
    /// conflict is [`BdevError::Locked`] and leaves the old permissions held.
    pub fn set_perms(&mut self, perms: Perms) -> Result<(), BdevError> {
        if perms == self.perms {
            return Ok(());
        }
        let old = self.perms;
        let both = Perms {
            perm: old.perm | perms.perm,
            shared: old.shared & perms.shared,
        };
        let r = self
            .apply(both)
            .and_then(|()| self.check(perms))
            .and_then(|()| self.apply(perms));
        if let Err(e) = r {
            // Back to exactly the old bytes (it held them all along).
            let _ = self.apply(old);
            return Err(e);
        }
        self.perms = perms;
        Ok(())
    }

    /// Moves the lock, holding `perms` from then on, to `new`: another open
    /// file description of the same file that `swap` puts in the place of
    /// the lock's own, behind its descriptor number (a reopen's `dup3`;
    /// the lock's file then is `new`'s description). In order: the lock's
    /// description takes the bytes of both the old permissions and `perms`,
    /// `perms` is checked against everyone else from there (before `new`
    /// holds anything), `new` takes the bytes of `perms`, the old
    /// description lets go of the bytes `perms` does not hold (it is
    /// closed by `swap`, unless a request in flight keeps it a while), and
    /// `swap` runs. A conflict ([`BdevError::Locked`]) or a failure of
    /// `swap` leaves the old permissions held on the old description and
    /// nothing on `new`.
    pub fn move_to(
        &mut self,
        new: &File,
        perms: Perms,
        swap: impl FnOnce() -> Result<(), BdevError>,
    ) -> Result<(), BdevError> {
        let old = self.perms;
        let both = Perms {
            perm: old.perm | perms.perm,
            shared: old.shared & perms.shared,
        };
        let none = Perms::NONE;
        if let Err(e) = self.apply(both).and_then(|()| self.check(perms)) {
            let _ = self.apply(old);
            return Err(e);
        }
        if let Err(e) = self.apply_to(new, perms) {
            let _ = self.apply_to(new, none);
            let _ = self.apply(old);
            return Err(e);
        }
        // Both descriptions hold `perms` now: the old one lets go of the rest.
        let r = self.apply(perms).and_then(|()| swap());
        if let Err(e) = r {
            let _ = self.apply_to(new, none);
            let _ = self.apply(old);
            return Err(e);
        }
        self.perms = perms;
        Ok(())
    }

    /// The permissions held.
    pub fn perms(&self) -> Perms {
        self.perms
    }

    /// The locked file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Locks the bytes of `p` and unlocks the others (QEMU's `raw_apply_lock_bytes`).
    fn apply(&self, p: Perms) -> Result<(), BdevError> {
        self.apply_to(&self.file, p)
    }

    /// [`ImageLock::apply`] on the open file description of `file`.
    fn apply_to(&self, file: &File, p: Perms) -> Result<(), BdevError> {
        let fd = file.as_raw_fd();
        let unshared = PERM_ALL & !p.shared;
        for i in 0..PERM_NAMES.len() {
            let bit = 1u8 << i;
            for (base, want) in [(PERM_BASE, p.perm & bit), (SHARED_BASE, unshared & bit)] {
                let byte = base + i as i64;
                let kind = if want != 0 {
                    libc::F_RDLCK
                } else {
                    libc::F_UNLCK
                };
                let fl = flock(kind, byte);
                fcntl(fd, FcntlArg::F_OFD_SETLK(&fl)).map_err(|e| {
                    let what = if want != 0 { "lock" } else { "unlock" };
                    self.os_error(&format!("Failed to {what} byte {byte}"), e)
                })?;
            }
        }
        Ok(())
    }

    /// Whether anyone else conflicts with `p` (QEMU's `raw_check_lock_bytes`).
    fn check(&self, p: Perms) -> Result<(), BdevError> {
        for (i, name) in PERM_NAMES.iter().enumerate() {
            if p.perm & (1 << i) != 0 && self.locked_by_other(SHARED_BASE + i as i64)? {
                return Err(self.conflict(format!("Failed to get \"{name}\" lock")));
            }
        }
        for (i, name) in PERM_NAMES.iter().enumerate() {
            if p.shared & (1 << i) == 0 && self.locked_by_other(PERM_BASE + i as i64)? {
                return Err(self.conflict(format!("Failed to get shared \"{name}\" lock")));
            }
        }
        Ok(())
    }

    /// Whether another open file description holds a lock on `byte`.
    fn locked_by_other(&self, byte: i64) -> Result<bool, BdevError> {
        let mut fl = flock(libc::F_WRLCK, byte);
        fcntl(self.file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))
            .map_err(|e| self.os_error(&format!("Failed to check byte {byte}"), e))?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    fn conflict(&self, message: String) -> BdevError {
        BdevError::Locked {
            message,
            path: self.path.clone(),
        }
    }

    fn os_error(&self, what: &str, e: nix::errno::Errno) -> BdevError {
        BdevError::os(
            format!("{what} of {}", self.path.display()),
            std::io::Error::from_raw_os_error(e as i32),
        )
    }
}

impl Drop for ImageLock {
    /// Unlocks every byte: the file, shared with I/O, may stay open a while.
    fn drop(&mut self) {
        if let Err(e) = self.apply(Perms::NONE) {
            tracing::warn!(path = %self.path.display(), error = %e, "image lock not released");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("sluice-lock-{}-{tag}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        p
    }

    fn take(p: &Path, perms: Perms) -> Result<ImageLock, BdevError> {
        ImageLock::take(p, LockMode::Auto, perms).map(|l| l.expect("locking is on"))
    }

    fn conflict(r: Result<ImageLock, BdevError>) -> String {
        match r {
            Err(BdevError::Locked { message, .. }) => message,
            other => panic!("expected a lock conflict, got {other:?}"),
        }
    }

    /// The bytes QEMU's qcow2 writer holds (seen in /proc/locks while
    /// qemu-io has an image open): 100, 101, 103, 201, 203.
    #[test]
    fn writer_holds_qemus_bytes() {
        let p = scratch("bytes");
        let l = take(&p, Perms::WRITER).unwrap();
        assert_eq!(l.perms(), Perms::WRITER);
        assert_eq!(l.path(), p.as_path());
        assert_eq!(held_bytes(&p), [100, 101, 103, 201, 203]);
        drop(l);
        std::fs::remove_file(&p).unwrap();
    }

    /// Two opens in one process conflict as two processes would: writers
    /// exclude writers and readers, readers share with readers; a dropped
    /// lock is gone; locking off takes nothing.
    #[test]
    fn conflicts_within_one_process() {
        let p = scratch("conflicts");
        let w = take(&p, Perms::WRITER).unwrap();
        assert_eq!(
            conflict(take(&p, Perms::WRITER)),
            "Failed to get \"write\" lock"
        );
        assert_eq!(
            conflict(take(&p, Perms::READER)),
            "Failed to get shared \"write\" lock"
        );
        assert_eq!(
            conflict(take(&p, Perms::CREATOR)),
            "Failed to get \"write\" lock"
        );
        assert!(ImageLock::take(&p, LockMode::Off, Perms::WRITER)
            .unwrap()
            .is_none());
        drop(w);
        let r1 = take(&p, Perms::READER).unwrap();
        let r2 = take(&p, Perms::READER).unwrap();
        assert_eq!(
            conflict(take(&p, Perms::WRITER)),
            "Failed to get \"write\" lock"
        );
        drop((r1, r2));
        // A creation shares writes, not resizes.
        let c = take(&p, Perms::CREATOR).unwrap();
        assert_eq!(
            conflict(take(&p, Perms::WRITER)),
            "Failed to get \"resize\" lock"
        );
        drop(c);
        take(&p, Perms::WRITER).unwrap();
        std::fs::remove_file(&p).unwrap();
    }

    /// `/proc/locks` as of one moment. The kernel builds it a read at a
    /// time and lets the lock list change between reads, so a line can be
    /// skipped when other threads (tests running beside this one) lock and
    /// unlock meanwhile: read it until two reads in a row agree.
    fn proc_locks() -> String {
        let mut last = std::fs::read_to_string("/proc/locks").unwrap();
        loop {
            let now = std::fs::read_to_string("/proc/locks").unwrap();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    fn held_bytes(p: &Path) -> Vec<u64> {
        let ino = std::fs::metadata(p).unwrap().ino();
        let mut bytes: Vec<u64> = proc_locks()
            .lines()
            .filter(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
            .flat_map(|l| {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .rev()
                    .take(2)
                    .map(|x| x.parse().unwrap())
                    .collect();
                f[1]..=f[0]
            })
            .collect();
        bytes.sort_unstable();
        bytes
    }

    /// A writer that becomes a backing file holds what QEMU's old top holds
    /// after a snapshot (100, 201, 203: seen in /proc/locks of a
    /// qemu-storage-daemon): another reader gets in, a writer still not;
    /// back to a writer is refused while that reader holds the file, and
    /// the refusal leaves the reader's bytes exactly as they were.
    #[test]
    fn set_perms_in_place() {
        let p = scratch("set");
        let mut l = take(&p, Perms::WRITER).unwrap();
        assert_eq!(
            conflict(take(&p, Perms::READER)),
            "Failed to get shared \"write\" lock"
        );
        l.set_perms(Perms::READER).unwrap();
        assert_eq!(l.perms(), Perms::READER);
        assert_eq!(held_bytes(&p), [100, 201, 203]);
        let r = take(&p, Perms::READER).unwrap();
        assert_eq!(
            conflict(take(&p, Perms::WRITER)),
            "Failed to get \"write\" lock"
        );
        match l.set_perms(Perms::WRITER) {
            Err(BdevError::Locked { message, .. }) => {
                assert_eq!(message, "Failed to get \"write\" lock")
            }
            other => panic!("expected a lock conflict, got {other:?}"),
        }
        assert_eq!(l.perms(), Perms::READER);
        assert_eq!(held_bytes(&p), [100, 100, 201, 201, 203, 203]);
        drop(r);
        l.set_perms(Perms::WRITER).unwrap();
        assert_eq!(held_bytes(&p), [100, 101, 103, 201, 203]);
        assert_eq!(
            conflict(take(&p, Perms::READER)),
            "Failed to get shared \"write\" lock"
        );
        // A force-share reader takes no "not shared" byte.
        l.set_perms(Perms::SHARER).unwrap();
        assert_eq!(held_bytes(&p), [100]);
        take(&p, Perms::WRITER).unwrap();
        drop(l);
        std::fs::remove_file(&p).unwrap();
    }

    fn access_mode(f: &File) -> i32 {
        fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).unwrap() & libc::O_ACCMODE
    }

    fn open_as(p: &Path, write: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .unwrap()
    }

    /// A reopen's move: the lock on the file the I/O shares goes to a new
    /// open file description put behind the same descriptor number, and
    /// only one set of bytes is held after it; a conflict or a failed swap
    /// leaves the old description and its bytes as they were and nothing
    /// on the new one; dropping the lock unlocks while the file stays open.
    #[test]
    fn move_to_a_reopened_file() {
        let p = scratch("move");
        let file = Arc::new(open_as(&p, true));
        let mut l = ImageLock::on_file(file.clone(), &p, Perms::WRITER).unwrap();
        let swap_in = |new: &File| {
            let (new, to) = (new.as_raw_fd(), file.as_raw_fd());
            move || {
                nix::unistd::dup3(new, to, nix::fcntl::OFlag::O_CLOEXEC)
                    .map(drop)
                    .map_err(|e| BdevError::os("dup3", std::io::Error::from(e)))
            }
        };
        let ro = open_as(&p, false);
        l.move_to(&ro, Perms::READER, swap_in(&ro)).unwrap();
        drop(ro);
        assert_eq!(access_mode(&file), libc::O_RDONLY);
        assert_eq!(l.perms(), Perms::READER);
        assert_eq!(held_bytes(&p), [100, 201, 203]);
        let r = take(&p, Perms::READER).unwrap();
        // Back to a writer while another reader holds the file: refused.
        let rw = open_as(&p, true);
        match l.move_to(&rw, Perms::WRITER, swap_in(&rw)) {
            Err(BdevError::Locked { message, .. }) => {
                assert_eq!(message, "Failed to get \"write\" lock")
            }
            other => panic!("expected a lock conflict, got {other:?}"),
        }
        assert_eq!(access_mode(&file), libc::O_RDONLY);
        assert_eq!(l.perms(), Perms::READER);
        assert_eq!(held_bytes(&p), [100, 100, 201, 201, 203, 203]);
        drop(r);
        // A swap that fails leaves the old description holding the old bytes.
        let failed = l.move_to(&rw, Perms::WRITER, || {
            Err(BdevError::InvalidParam("no swap".into()))
        });
        assert!(matches!(failed, Err(BdevError::InvalidParam(_))));
        assert_eq!(l.perms(), Perms::READER);
        assert_eq!(held_bytes(&p), [100, 201, 203]);
        l.move_to(&rw, Perms::WRITER, swap_in(&rw)).unwrap();
        drop(rw);
        assert_eq!(access_mode(&file), libc::O_RDWR);
        assert_eq!(held_bytes(&p), [100, 101, 103, 201, 203]);
        assert_eq!(
            conflict(take(&p, Perms::READER)),
            "Failed to get shared \"write\" lock"
        );
        drop(l);
        assert_eq!(held_bytes(&p), Vec::<u64>::new());
        take(&p, Perms::WRITER).unwrap();
        drop(file);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn error_carries_qemus_hint() {
        let p = scratch("hint");
        let _w = take(&p, Perms::WRITER).unwrap();
        let e = take(&p, Perms::WRITER).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "Failed to get \"write\" lock. Is another process using the image [{}]?",
                p.display()
            )
        );
        std::fs::remove_file(&p).unwrap();
    }
}
