//! `Channel::kick` on a uring channel: a request queued by `submit` is not
//! complete when `submit` returns (it never completes inside it); after a
//! kick, a buffered read the page cache holds has completed inside the kick,
//! with the file's bytes, without waiting for the channel's poller.

use bdev::uring::{UringBdev, UringOptions};
use bdev::{channel, Bdev, BdevIo, DmaBuf, IoDone, IoStatus};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::cell::RefCell;
use std::io::{Read, Write};
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
fn kick_completes_cached_buffered_reads_inside_the_call() {
    let p = std::env::temp_dir().join(format!("sluice-kick-{}.img", std::process::id()));
    let mut data = vec![0u8; 64 << 10];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 4096) as u8 ^ (i as u8);
    }
    std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
    // Read it once so that the page cache holds it.
    let mut back = Vec::new();
    std::fs::File::open(&p)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, data);
    let b: Arc<dyn Bdev> = UringBdev::open(
        "kick0",
        &p,
        UringOptions {
            direct: false,
            read_only: true,
            ..UringOptions::default()
        },
    )
    .unwrap();
    let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").unwrap());
    cfg.pin = false;
    let rt = Runtime::start(cfg).unwrap();
    let expect = data.clone();
    let res = rt
        .handle()
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
                let at = offset as usize;
                let buf = buf.ok_or("no buffer back")?;
                if buf.as_slice() != &expect[at..at + 4096] {
                    return Err(format!("read at {at} returned other bytes"));
                }
            }
            Ok(())
        })
        .block()
        .unwrap();
    rt.shutdown();
    std::fs::remove_file(&p).unwrap();
    res.unwrap();
}
