//! A qcow2 image whose base fills up (every write past a point fails with
//! ENOSPC) keeps refusing new clusters while it is full, then writes again once
//! space is back, however many writes failed meanwhile: a cluster found but not
//! taken is looked at again by the next allocation.

use bdev::error_bdev::{ErrorBdev, InjectParams};
use bdev::malloc::MallocBdev;
use bdev::qcow2::{create, BackingSpec, CreateOptions, OpenOptions, Qcow2Bdev};
use bdev::{channel, write_at, Bdev, DmaBuf};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::sync::Arc;

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

/// Fills the image until the base refuses writes, fails `n` more writes, frees
/// the space and returns whether a further write succeeds.
fn writes_again_after(n: u64) -> bool {
    let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").unwrap());
    cfg.pin = false;
    let rt = Runtime::start(cfg).unwrap();
    rt.handle()
        .spawn_on(0, move || async move {
            // 256 KiB base: 512 host clusters of 512 bytes; one refcount block
            // covers 256 of them, so filling crosses into a second block.
            let base = format!("enospc{n}");
            let m = MallocBdev::new(&base, 512, 512, None).unwrap();
            registry().register(m as Arc<dyn Bdev>).unwrap();
            let ee: Arc<dyn Bdev> = ErrorBdev::new(registry(), &base).unwrap();
            registry().register(ee.clone()).unwrap();
            let mut o = CreateOptions::new(1 << 20);
            o.cluster_size = 512;
            create(ee.clone(), &o).await.unwrap();
            let opts = OpenOptions {
                backing: BackingSpec::None,
                ..Default::default()
            };
            let q: Arc<dyn Bdev> = Qcow2Bdev::open(&format!("{base}q"), ee.clone(), opts)
                .await
                .unwrap();
            let ch = channel(&q).unwrap();
            let eb = registry().get(&format!("EE_{base}")).unwrap();
            let e = eb.as_any().downcast_ref::<ErrorBdev>().unwrap();
            // The disk is "full" from 128 KiB on.
            let mut p = InjectParams::new("write", "enospc", 0);
            p.offset = 128 << 10;
            e.inject_with(&p).unwrap();
            let block = || DmaBuf::from_slice(&[0x5a; 512]).unwrap();
            let mut gc = 0u64;
            while write_at(&ch, gc * 512, block()).await.is_ok() {
                gc += 1;
            }
            for _ in 0..n {
                gc += 1;
                assert!(
                    write_at(&ch, gc * 512, block()).await.is_err(),
                    "a write succeeded on a full disk"
                );
            }
            e.clear();
            write_at(&ch, (gc + 1) * 512, block()).await.is_ok()
        })
        .block()
        .unwrap()
}

#[test]
fn a_full_image_writes_again_once_space_is_back() {
    for n in [5, 200] {
        assert!(
            writes_again_after(n),
            "after {n} failed writes the image still refused a write with space back"
        );
    }
}
