//! A qcow2 image from outside bytes, opened over an in-memory bdev
//! (`bdev::qcow2::Qcow2Bdev::open` over a malloc bdev holding the input):
//! the header, its extensions, the L1 table, the refcount table and blocks
//! (checked at a writable open), then reads over the L2 tables and cluster
//! entries, block status, a write and a flush. Never a panic or a hang: a
//! bad image is refused, or reads and writes fail, with an error.
#![no_main]

use bdev::qcow2::{BackingSpec, OpenOptions, Qcow2Bdev};
use bdev::{Bdev, IoType};
use libfuzzer_sys::fuzz_target;
use sluice_fuzz::on_reactor;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let img = data.to_vec();
    on_reactor(move || async move {
        let blocks = (img.len() as u64).div_ceil(512).max(1);
        let m: Arc<dyn Bdev> =
            bdev::malloc::MallocBdev::new("fuzz-file", blocks, 512, None).expect("malloc");
        {
            let ch = bdev::channel(&m).expect("channel");
            let mut buf = bdev::DmaBuf::new(blocks as usize * 512).expect("buf");
            buf.as_mut_slice()[..img.len()].copy_from_slice(&img);
            bdev::write_at(&ch, 0, buf).await.expect("fill");
        }
        let opts = OpenOptions {
            backing: BackingSpec::None,
            locking: bdev::lock::LockMode::Off,
            ..OpenOptions::default()
        };
        let q = Qcow2Bdev::open("fuzz-img", m.clone(), opts).await;
        if let Ok(q) = q {
            let b: Arc<dyn Bdev> = q.clone();
            if let Ok(ch) = bdev::channel(&b) {
                let size = b.size();
                let step = (size / 8).max(4096).next_multiple_of(4096);
                let mut off = 0;
                while off < size.min(64 << 20) {
                    let len = 4096.min(size - off) as usize;
                    let _ = bdev::read_at(&ch, off, len).await;
                    if let Some(f) = b.range_status(off, len as u64) {
                        let _ = f.await;
                    }
                    off += step;
                }
                if size >= 4096 {
                    let mut w = bdev::DmaBuf::new(4096).expect("buf");
                    w.as_mut_slice().fill(0x5a);
                    let _ = bdev::write_at(&ch, size / 2 / 4096 * 4096, w).await;
                    let _ = bdev::simple_io(&ch, IoType::Flush, 0, 0).await;
                }
                bdev::drop_cached_channels(&b);
            }
            let _ = q.close().await;
        }
        bdev::drop_cached_channels(&m);
    });
});
