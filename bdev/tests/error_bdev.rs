//! The error bdev: pass-through, counted and unlimited failures, byte ranges,
//! ENOSPC, data corruption, run-time switching, claims on its base.

use bdev::error_bdev::{ErrorBdev, InjectParams};
use bdev::malloc::MallocBdev;
use bdev::{channel, read_at, simple_io, write_at, Bdev, BdevError, DmaBuf, IoStatus, IoType};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::sync::Arc;

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig {
        pin: false,
        ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
    })
    .unwrap()
}

fn setup(base: &str) -> (Runtime, Arc<ErrorBdev>) {
    registry()
        .register(MallocBdev::new(base, 256, 512, None).unwrap())
        .unwrap();
    let e = ErrorBdev::new(registry(), base).unwrap();
    registry().register(e.clone()).unwrap();
    (runtime(), e)
}

fn status<T>(r: &Result<T, BdevError>) -> IoStatus {
    match r {
        Ok(_) => IoStatus::Success,
        Err(BdevError::Io(s)) => *s,
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn passes_through_and_fails_counted_requests() {
    let (rt, e) = setup("err_b0");
    assert_eq!(e.name(), "EE_err_b0");
    assert_eq!(e.size(), 256 * 512);
    let e2 = e.clone();
    rt.handle()
        .spawn_on(0, move || async move {
            let b: Arc<dyn Bdev> = e2.clone();
            let ch = channel(&b).unwrap();
            write_at(&ch, 0, DmaBuf::from_slice(&[3u8; 1024]).unwrap())
                .await
                .unwrap();
            assert_eq!(
                read_at(&ch, 0, 1024).await.unwrap().as_slice(),
                &[3u8; 1024][..]
            );
            e2.inject("read", "failure", 2).unwrap();
            assert_eq!(status(&read_at(&ch, 0, 512).await), IoStatus::Eio);
            // Writes are not affected by a read rule.
            assert_eq!(
                status(&write_at(&ch, 512, DmaBuf::new(512).unwrap()).await),
                IoStatus::Success
            );
            assert_eq!(status(&read_at(&ch, 0, 512).await), IoStatus::Eio);
            // Two hits: the rule is used up.
            assert_eq!(status(&read_at(&ch, 0, 512).await), IoStatus::Success);
            assert!(e2.rules().is_empty());
            // Until cleared (num = 0), writes, ENOSPC.
            e2.inject("write", "enospc", 0).unwrap();
            for _ in 0..5 {
                assert_eq!(
                    status(&write_at(&ch, 0, DmaBuf::new(512).unwrap()).await),
                    IoStatus::Enospc
                );
            }
            assert_eq!(e2.rules()[0].hits, 5);
            e2.clear();
            assert_eq!(
                status(&write_at(&ch, 0, DmaBuf::new(512).unwrap()).await),
                IoStatus::Success
            );
            // "all" covers flush and unmap too; "clear" as an io_type removes everything.
            e2.inject("all", "nomem", 0).unwrap();
            assert_eq!(simple_io(&ch, IoType::Flush, 0, 0).await, IoStatus::Nomem);
            assert_eq!(simple_io(&ch, IoType::Unmap, 0, 512).await, IoStatus::Nomem);
            e2.inject_with(&InjectParams::new("clear", "", 0)).unwrap();
            assert_eq!(
                simple_io(&ch, IoType::Unmap, 0, 512).await,
                IoStatus::Success
            );
            let st = ch.stats().snapshot();
            assert!(st.num_io_errors >= 9, "{st:?}");
        })
        .block()
        .unwrap();
    drop(rt);
    registry().unregister("EE_err_b0").unwrap();
}

#[test]
fn byte_ranges_and_corruption() {
    let (rt, e) = setup("err_b1");
    let e2 = e.clone();
    rt.handle()
        .spawn_on(0, move || async move {
            let b: Arc<dyn Bdev> = e2.clone();
            let ch = channel(&b).unwrap();
            let mut p = InjectParams::new("write", "eio", 0);
            p.offset = 4096;
            p.length = Some(1024);
            e2.inject_with(&p).unwrap();
            // Before, after and overlapping the range.
            assert_eq!(
                status(&write_at(&ch, 0, DmaBuf::new(4096).unwrap()).await),
                IoStatus::Success
            );
            assert_eq!(
                status(&write_at(&ch, 5120, DmaBuf::new(512).unwrap()).await),
                IoStatus::Success
            );
            assert_eq!(
                status(&write_at(&ch, 4608, DmaBuf::new(512).unwrap()).await),
                IoStatus::Eio
            );
            assert_eq!(
                status(&write_at(&ch, 3584, DmaBuf::new(1024).unwrap()).await),
                IoStatus::Eio
            );
            assert_eq!(
                status(&read_at(&ch, 4096, 512).await),
                IoStatus::Success,
                "reads are not hit"
            );
            e2.clear();
            // Corrupt one byte of one read.
            write_at(&ch, 0, DmaBuf::from_slice(&[0x11u8; 512]).unwrap())
                .await
                .unwrap();
            let mut c = InjectParams::new("read", "corrupt_data", 1);
            c.corrupt_offset = 10;
            c.corrupt_value = 0xff;
            e2.inject_with(&c).unwrap();
            let r = read_at(&ch, 0, 512).await.unwrap();
            assert_eq!(r.as_slice()[10], 0x11 ^ 0xff);
            assert_eq!(r.as_slice()[9], 0x11);
            let r = read_at(&ch, 0, 512).await.unwrap();
            assert_eq!(r.as_slice()[10], 0x11, "one hit only");
        })
        .block()
        .unwrap();
    drop(rt);
    registry().unregister("EE_err_b1").unwrap();
}

#[test]
fn bad_parameters_and_claims() {
    let (_rt, e) = setup("err_b2");
    for (t, k) in [
        ("reed", "failure"),
        ("read", "explode"),
        ("read", "pending"),
    ] {
        let err = e.inject(t, k, 1).unwrap_err();
        assert!(matches!(err, BdevError::InvalidParam(_)), "{err}");
    }
    let mut p = InjectParams::new("read", "eio", 1);
    p.offset = 1 << 40;
    assert!(e
        .inject_with(&p)
        .unwrap_err()
        .to_string()
        .contains("offset"));
    assert!(e
        .inject("read", "corrupt_data", 1)
        .unwrap_err()
        .to_string()
        .contains("corrupt_value"));
    // The base is claimed: it cannot be deleted underneath the error bdev.
    let err = registry().unregister("err_b2").err().expect("claimed");
    assert!(matches!(err, BdevError::Claimed { .. }), "{err}");
    assert!(err.to_string().contains("EE_err_b2"), "{err}");
    // A second error bdev over the same base is refused.
    assert!(matches!(
        ErrorBdev::new(registry(), "err_b2"),
        Err(BdevError::Exists(_))
    ));
    assert!(matches!(
        ErrorBdev::new(registry(), "err_nope"),
        Err(BdevError::NotFound(_))
    ));
    // Deleting the error bdev releases the claim.
    let removed = registry().unregister("EE_err_b2").unwrap();
    removed.on_delete();
    drop(removed);
    drop(e);
    registry().unregister("err_b2").unwrap();
}
