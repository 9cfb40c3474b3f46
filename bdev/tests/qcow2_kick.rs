//! `Channel::kick` through a qcow2 image: reads of mapped clusters (the owner
//! reactor's fast path) wait in the image file's io_uring after `submit`; a
//! kick of the image's channel reaches that ring, so a batch the page cache
//! holds completes inside the kick, as over a plain file (`uring_kick.rs`):
//! vhost-user-blk and NBD over a qcow2 image batch as over a raw file.

mod qcow2_common;

use bdev::{channel, Bdev, BdevIo, DmaBuf, IoDone, IoStatus};
use qcow2_common::*;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// What completed: (offset, status, buffer).
#[derive(Default)]
struct Done(RefCell<Vec<(u64, IoStatus, Option<DmaBuf>)>>);

impl IoDone for Done {
    fn io_done(&self, mut io: Box<BdevIo>) {
        let buf = io.take_buf();
        self.0.borrow_mut().push((io.offset, io.status, buf));
    }
}

#[test]
fn kick_reaches_the_image_files_ring() {
    let rt = runtime(1);
    let h = rt.handle();
    let d = scratch("kick");
    let img = d.join("k.qcow2");
    qemu_img_create(&img, "1M", &[]);
    qemu_io(&img, &["write -P 0x5a 0 512k"]);
    let q = open(&h, "kick", &img, opts()).expect("open");
    let b: Arc<dyn Bdev> = q.clone();
    // Warm the L2 cache (reads of mapped clusters take the fast path) and
    // the page cache (buffered reads complete inside io_uring_enter).
    assert!(read_all(&h, 0, &b, 64 << 10)[..512 << 10]
        .iter()
        .all(|&x| x == 0x5a));
    let res = h
        .call_on(0, move || {
            let ch = channel(&b).map_err(|e| e.to_string())?;
            let done = Rc::new(Done::default());
            for i in 0..8u64 {
                let buf = DmaBuf::new(4096).map_err(|e| e.to_string())?;
                let io = BdevIo::read(i * 8192, buf, Some(done.clone() as Rc<dyn IoDone>));
                if ch.submit(io).is_err() {
                    return Err("queue full".to_string());
                }
            }
            if !done.0.borrow().is_empty() {
                return Err("a request completed inside submit".into());
            }
            ch.kick();
            let got = std::mem::take(&mut *done.0.borrow_mut());
            if got.len() != 8 {
                return Err(format!(
                    "{} of 8 reads completed inside the kick",
                    got.len()
                ));
            }
            for (offset, status, buf) in got {
                if status != IoStatus::Success {
                    return Err(format!("read at {offset} failed: {status:?}"));
                }
                let buf = buf.ok_or("no buffer back")?;
                if buf.as_slice().iter().any(|&x| x != 0x5a) {
                    return Err(format!("read at {offset} returned other bytes"));
                }
            }
            Ok(())
        })
        .block()
        .expect("join");
    rt.shutdown();
    res.unwrap();
}
