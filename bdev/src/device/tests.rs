//! Live root swaps under concurrent I/O from several reactors.

use super::*;
use crate::{read_at, write_at, DmaBuf};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::sync::atomic::AtomicU64;

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<crate::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<crate::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(crate::Registry::new)
}

/// A RAM bdev for these tests: completes on the next reactor iteration and
/// counts the writes it took.
struct Ram {
    name: String,
    data: Mutex<Vec<u8>>,
    writes: AtomicU64,
}

struct RamChannel {
    ram: Arc<Ram>,
}

/// The registered form of a [`Ram`] (so channels can hold an `Arc<Ram>`).
struct RamHolder(Arc<Ram>);

impl Bdev for RamHolder {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn product_name(&self) -> &str {
        "test ram"
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        self.0.data.lock().unwrap().len() as u64 / 512
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Write)
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(RamChannel {
            ram: self.0.clone(),
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Channel for RamChannel {
    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let (off, len) = (io.offset as usize, io.len as usize);
        match io.io_type {
            IoType::Read => {
                let d = self.ram.data.lock().unwrap();
                let chunk = d[off..off + len].to_vec();
                drop(d);
                io.copy_in(0, &chunk);
            }
            IoType::Write => {
                let mut chunk = vec![0u8; len];
                io.copy_out(0, &mut chunk);
                self.ram.data.lock().unwrap()[off..off + len].copy_from_slice(&chunk);
                self.ram.writes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        complete_deferred(io, IoStatus::Success);
        Ok(())
    }
}

fn ram(name: &str, size: usize) -> Arc<Ram> {
    let r = Arc::new(Ram {
        name: name.into(),
        data: Mutex::new(vec![0; size]),
        writes: AtomicU64::new(0),
    });
    registry().register(Arc::new(RamHolder(r.clone()))).unwrap();
    r
}

#[test]
fn swap_under_load_loses_nothing() {
    // Two reactors when the machine has two cores.
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut cfg = RuntimeConfig::new(CoreSet::from_list(if n >= 2 { "0,1" } else { "0" }).unwrap());
    cfg.pin = false;
    let rt = Runtime::start(cfg).unwrap();
    let h = rt.handle();
    let a = ram("dev-test-a", 1 << 20);
    let b = ram("dev-test-b", 1 << 20);
    let dev = Device::new(
        registry(),
        "dev-test",
        registry().get("dev-test-a").unwrap(),
    )
    .unwrap();
    let dev_bdev: Arc<dyn Bdev> = dev.clone();
    registry().register(dev_bdev.clone()).unwrap();
    assert_eq!(
        registry().claims("dev-test-a"),
        vec!["device dev-test".to_string()]
    );

    const PER_REACTOR: u64 = 3000;
    let mut writers = Vec::new();
    for r in 0..h.num_reactors() {
        let d = dev_bdev.clone();
        writers.push(h.spawn_on(r, move || async move {
            let ch = channel(&d).unwrap();
            let mut ok = 0u64;
            // Keep 8 writes in flight per reactor.
            let mut pending = Vec::new();
            for i in 0..PER_REACTOR {
                let off = ((r as u64 * PER_REACTOR + i) % 2048) * 512;
                let buf = DmaBuf::from_slice(&[r as u8 + 1; 512]).unwrap();
                let ch2 = ch.clone();
                pending.push(reactor::spawn_local(async move {
                    write_at(&ch2, off, buf).await.is_ok()
                }));
                if pending.len() == 8 {
                    for p in pending.drain(..) {
                        ok += p.await.unwrap() as u64;
                    }
                }
            }
            for p in pending.drain(..) {
                ok += p.await.unwrap() as u64;
            }
            ok
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(5));
    let old = futures::executor::block_on(dev.swap_root(&h, registry().get("dev-test-b").unwrap()))
        .unwrap();
    assert_eq!(old.name(), "dev-test-a");
    let mut total = 0;
    for w in writers {
        total += w.block().unwrap();
    }
    let expected = PER_REACTOR * h.num_reactors() as u64;
    assert_eq!(total, expected, "every write must succeed");
    let (wa, wb) = (
        a.writes.load(Ordering::Relaxed),
        b.writes.load(Ordering::Relaxed),
    );
    assert_eq!(wa + wb, expected, "every write lands exactly once");
    assert!(wb > 0, "writes after the swap go to the new root");
    assert_eq!(registry().claims("dev-test-a"), Vec::<String>::new());
    assert_eq!(
        registry().claims("dev-test-b"),
        vec!["device dev-test".to_string()]
    );

    // Reads after the swap come from the new root.
    b.data.lock().unwrap()[0..512].copy_from_slice(&[0xab; 512]);
    let d = dev_bdev.clone();
    let got = h
        .spawn_on(0, move || async move {
            read_at(&channel(&d).unwrap(), 0, 512)
                .await
                .unwrap()
                .as_slice()
                .to_vec()
        })
        .block()
        .unwrap();
    assert_eq!(got, vec![0xab; 512]);

    // A root of another size is refused.
    let _c = ram("dev-test-c", 1 << 19);
    let Err(e) =
        futures::executor::block_on(dev.swap_root(&h, registry().get("dev-test-c").unwrap()))
    else {
        panic!("a root of another size must be refused")
    };
    assert!(matches!(e, BdevError::InvalidParam(_)), "{e}");
    assert_eq!(registry().claims("dev-test-c"), Vec::<String>::new());
    registry().delete("dev-test", &h).unwrap();
    assert!(registry().claims("dev-test-b").is_empty());
    rt.shutdown();
}
