//! Opening a file or block device without blocking the calling thread.
//!
//! The rule: a reactor never blocks, and control paths often run on one (a
//! qcow2 open, its backing files, a snapshot's overlay, an image's creation).
//! Every open of a path that may name anything (a leaf's file, a backing file
//! from a header, an image to create) goes through [`open_checked`]:
//!
//! - the path is `stat`ed first, and anything but a regular file or a block
//!   device (a FIFO, a character device, a socket, a directory) is refused
//!   with an error naming the path and what it is: opening a FIFO blocks until
//!   the other end opens it, and a character device is no disk;
//! - the open itself carries `O_NONBLOCK` (and `O_NOCTTY`), so a path swapped
//!   for a FIFO after the `stat` cannot block either; the opened file is
//!   `fstat`ed again and refused the same way;
//! - `O_NONBLOCK` is then cleared, so the file is used as a plain one.
//!
//! QEMU's `file` driver refuses such paths too ("'file' driver requires ... to
//! be a regular file"); it accepts block devices as the `host_device` driver.

use crate::error::BdevError;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::fs::{File, FileType, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a file type is, in words.
pub fn kind(t: &FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "of an unknown type"
    }
}

fn refuse(path: &Path, t: &FileType) -> Result<(), BdevError> {
    if t.is_file() || t.is_block_device() {
        return Ok(());
    }
    Err(BdevError::InvalidParam(format!(
        "filename: {} is {}, neither a regular file nor a block device",
        path.display(),
        kind(t)
    )))
}

/// Opens `path` with `oo` (read/write/create/truncate as the caller set them)
/// and `custom_flags` (`O_DIRECT`, `O_CLOEXEC`...) without blocking: see the
/// module's rule. A path that does not exist yet is opened as `oo` says (it
/// creates a regular file or fails). OS errors come back as
/// [`BdevError::Os`] with `what` and the path in their text.
pub fn open_checked(
    path: &Path,
    oo: &mut OpenOptions,
    custom_flags: libc::c_int,
    what: &str,
) -> Result<File, BdevError> {
    let os = |e| BdevError::os(format!("{what} {}", path.display()), e);
    match std::fs::metadata(path) {
        Ok(md) => refuse(path, &md.file_type())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(os(e)),
    }
    let f = oo
        .custom_flags(custom_flags | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(os)?;
    refuse(path, &f.metadata().map_err(os)?.file_type())?;
    let fd = f.as_raw_fd();
    let fl = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| os(e.into()))?;
    let fl = OFlag::from_bits_retain(fl) & !OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(fl)).map_err(|e| os(e.into()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-oc-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn regular_files_open_blocking_and_fifos_are_refused() {
        let d = dir("a");
        let f = d.join("f");
        let file = open_checked(
            &f,
            OpenOptions::new().read(true).write(true).create(true),
            libc::O_CLOEXEC,
            "opening",
        )
        .unwrap();
        let fl = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
        assert_eq!(fl & libc::O_NONBLOCK, 0, "O_NONBLOCK left set");
        assert!(f.is_file());

        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for write in [false, true] {
            let e = open_checked(
                &fifo,
                OpenOptions::new().read(true).write(write),
                0,
                "opening",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("is a FIFO") && e.contains(fifo.to_str().unwrap()),
                "{e}"
            );
        }
        let e = open_checked(
            Path::new("/dev/null"),
            OpenOptions::new().read(true),
            0,
            "opening",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/dev/null is a character device"), "{e}");
        let e = open_checked(&d, OpenOptions::new().read(true), 0, "opening")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e =
            open_checked(&d.join("none"), OpenOptions::new().read(true), 0, "opening").unwrap_err();
        assert!(matches!(e, BdevError::Os { .. }), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
