//! The leaf bdevs (null, malloc, uring) through the `Bdev`/`Channel` traits:
//! data round trips, zeroing, flush, validation failures, pushback and stats.

use bdev::malloc::MallocBdev;
use bdev::null::NullBdev;
use bdev::uring::{UringBdev, UringOptions};
use bdev::{
    channel, read_at, simple_io, submit_wait, write_at, Bdev, BdevIo, DmaBuf, IoDone, IoStatus,
    IoType,
};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
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

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes, reads back, zeroes, unmaps and flushes through the channel of `b`.
fn roundtrip(b: Arc<dyn Bdev>) {
    let rt = runtime();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            let bs = b.block_size() as usize;
            let data = pattern(4 * bs, 7);
            write_at(&ch, bs as u64, DmaBuf::from_slice(&data).unwrap())
                .await
                .unwrap();
            let back = read_at(&ch, bs as u64, 4 * bs).await.unwrap();
            assert_eq!(back.as_slice(), &data[..], "read back what was written");
            // Vectored read over two buffers.
            let (a, c) = (DmaBuf::new(bs).unwrap(), DmaBuf::new(3 * bs).unwrap());
            let io = BdevIo::vectored(IoType::Read, bs as u64, vec![a, c], None);
            let mut io = submit_wait(&ch, io).await;
            assert_eq!(io.status, IoStatus::Success);
            let [a, c] = <[DmaBuf; 2]>::try_from(io.take_bufs()).unwrap();
            assert_eq!(a.as_slice(), &data[..bs]);
            assert_eq!(c.as_slice(), &data[bs..]);
            drop(io);
            assert_eq!(
                simple_io(&ch, IoType::WriteZeroes, 2 * bs as u64, bs as u64).await,
                IoStatus::Success
            );
            assert_eq!(simple_io(&ch, IoType::Flush, 0, 0).await, IoStatus::Success);
            let back = read_at(&ch, bs as u64, 4 * bs).await.unwrap();
            assert_eq!(&back.as_slice()[..bs], &data[..bs]);
            assert!(
                back.as_slice()[bs..2 * bs].iter().all(|&x| x == 0),
                "write_zeroes range reads zero"
            );
            assert_eq!(&back.as_slice()[2 * bs..], &data[2 * bs..]);
            assert_eq!(
                simple_io(&ch, IoType::Unmap, bs as u64, 4 * bs as u64).await,
                IoStatus::Success
            );
            let back = read_at(&ch, bs as u64, 4 * bs).await.unwrap();
            assert!(
                back.as_slice().iter().all(|&x| x == 0),
                "unmapped range reads zero"
            );
            // Validation.
            let size = b.size();
            assert!(
                matches!(
                    read_at(&ch, size, bs).await,
                    Err(bdev::BdevError::Io(IoStatus::Einval))
                ),
                "past the end"
            );
            assert!(
                matches!(
                    read_at(&ch, 1, bs).await,
                    Err(bdev::BdevError::Io(IoStatus::Einval))
                ),
                "misaligned offset"
            );
            assert!(
                matches!(
                    read_at(&ch, 0, bs + 1).await,
                    Err(bdev::BdevError::Io(IoStatus::Einval))
                ),
                "misaligned length"
            );
            let st = ch.stats().snapshot();
            assert_eq!(st.num_write_ops, 1);
            assert_eq!(st.bytes_written, 4 * bs as u64);
            assert_eq!(st.num_read_ops, 4);
            assert_eq!(st.num_write_zeroes_ops, 1);
            assert_eq!(st.num_unmap_ops, 1);
            assert_eq!(st.num_flush_ops, 1);
            assert_eq!(st.num_io_errors, 3);
            assert!(
                st.max_read_latency_ticks >= st.min_read_latency_ticks
                    && st.min_read_latency_ticks > 0
            );
        })
        .block()
        .unwrap();
}

#[test]
fn malloc_roundtrip_and_config() {
    let b = MallocBdev::new("leaf_m0", 2048, 512, None).unwrap();
    let cfg = b.config().unwrap();
    assert_eq!(cfg["method"], "bdev_malloc_create");
    assert_eq!(cfg["params"]["num_blocks"], 2048);
    assert_eq!(cfg["params"]["block_size"], 512);
    assert_eq!(cfg["params"]["uuid"].as_str().unwrap().len(), 36);
    assert_eq!(b.product_name(), "Malloc disk");
    roundtrip(b);
    roundtrip(
        MallocBdev::new(
            "leaf_m1",
            256,
            4096,
            Some("6f1d8c5e-2c4a-4b8e-9f3a-0123456789ab".into()),
        )
        .unwrap(),
    );
}

#[test]
fn malloc_large_is_lazy_and_zero() {
    // 8 GiB: only works if memory is populated lazily (ordinary pages).
    let b = MallocBdev::new("leaf_big", 2 << 20, 4096, None).unwrap();
    let b: Arc<dyn Bdev> = b;
    let rt = runtime();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            let back = read_at(&ch, b.size() - 4096, 4096).await.unwrap();
            assert!(back.as_slice().iter().all(|&x| x == 0));
            write_at(
                &ch,
                b.size() - 8192,
                DmaBuf::from_slice(&[9u8; 8192]).unwrap(),
            )
            .await
            .unwrap();
            // A large unmap that releases pages and zeroes partial pages at the edges.
            assert_eq!(
                simple_io(&ch, IoType::Unmap, b.size() - (1 << 20), 1 << 20).await,
                IoStatus::Success
            );
            let back = read_at(&ch, b.size() - 8192, 8192).await.unwrap();
            assert!(back.as_slice().iter().all(|&x| x == 0));
        })
        .block()
        .unwrap();
}

#[test]
fn null_reads_zeroes_and_config() {
    let b = NullBdev::new("leaf_n0", 1 << 20, 4096, None).unwrap();
    assert_eq!(b.config().unwrap()["method"], "bdev_null_create");
    let b: Arc<dyn Bdev> = b;
    let rt = runtime();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            write_at(&ch, 0, DmaBuf::from_slice(&[5u8; 4096]).unwrap())
                .await
                .unwrap();
            let mut buf = DmaBuf::new(8192).unwrap();
            buf.as_mut_slice().fill(0xAA);
            let io = submit_wait(&ch, BdevIo::read(0, buf, None)).await;
            assert_eq!(io.status, IoStatus::Success);
            assert!(
                io.buf().unwrap().as_slice().iter().all(|&x| x == 0),
                "null reads return zeroes"
            );
            assert_eq!(
                simple_io(&ch, IoType::WriteZeroes, 0, 4096).await,
                IoStatus::Success
            );
        })
        .block()
        .unwrap();
}

#[test]
fn bad_geometry_is_refused() {
    for (n, bs) in [
        (0u64, 512u32),
        (10, 0),
        (10, 1000),
        (10, 256),
        (10, 1 << 20),
    ] {
        let e = MallocBdev::new("leaf_bad", n, bs, None)
            .err()
            .expect("refused");
        assert!(matches!(e, bdev::BdevError::InvalidParam(_)), "{e}");
        assert!(NullBdev::new("leaf_bad", n, bs, None).is_err());
    }
    assert!(MallocBdev::new("", 10, 512, None).is_err());
    let e = MallocBdev::new("leaf_bad", 10, 512, Some("not-a-uuid".into()))
        .err()
        .unwrap();
    assert!(e.to_string().contains("uuid"), "{e}");
}

// Completions arrive as boxes; keeping them boxed avoids a move per request.
#[allow(clippy::vec_box)]
struct Collect(RefCell<Vec<Box<BdevIo>>>);
impl IoDone for Collect {
    fn io_done(&self, io: Box<BdevIo>) {
        self.0.borrow_mut().push(io);
    }
}

#[test]
fn full_queue_pushes_back_and_never_completes_inside_submit() {
    let b: Arc<dyn Bdev> = NullBdev::new("leaf_push", 1 << 16, 512, None).unwrap();
    let rt = runtime();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            let sink = Rc::new(Collect(RefCell::new(Vec::new())));
            let mut accepted = 0;
            let refused = loop {
                let io = BdevIo::new(IoType::Flush, 0, 0, None, Some(sink.clone()));
                match ch.submit(io) {
                    Ok(()) => accepted += 1,
                    Err(io) => break io,
                }
                assert!(accepted <= 100_000, "queue never filled");
            };
            assert!(
                sink.0.borrow().is_empty(),
                "nothing completes inside submit"
            );
            assert!(accepted >= 128, "a useful queue depth ({accepted})");
            // Wait for space, then the refused request goes in.
            let (tx, rx) = futures::channel::oneshot::channel();
            ch.wait_for_space(Box::new(move || {
                let _ = tx.send(());
            }));
            rx.await.unwrap();
            assert_eq!(
                sink.0.borrow().len(),
                accepted,
                "all accepted requests completed"
            );
            assert!(ch.submit(refused).is_ok());
            reactor::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(sink.0.borrow().len(), accepted + 1);
            assert!(sink
                .0
                .borrow()
                .iter()
                .all(|io| io.status == IoStatus::Success));
        })
        .block()
        .unwrap();
}

fn temp_file(tag: &str, len: u64) -> PathBuf {
    let p = std::env::temp_dir().join(format!("sluice-leaf-{}-{tag}.img", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    p
}

#[test]
fn uring_direct_roundtrip() {
    let p = temp_file("direct", 8 << 20);
    let b = UringBdev::open("leaf_u0", &p, UringOptions::default()).unwrap();
    assert!(b.block_size() == 512 || b.block_size() == 4096);
    assert_eq!(b.size(), 8 << 20);
    let cfg = b.config().unwrap();
    assert_eq!(cfg["method"], "bdev_uring_create");
    assert_eq!(cfg["params"]["filename"], p.display().to_string());
    assert_eq!(
        b.driver_specific()["uring"]["filename"],
        p.display().to_string()
    );
    roundtrip(b);
    // Data reached the file.
    let b = UringBdev::open(
        "leaf_u0b",
        &p,
        UringOptions {
            direct: false,
            read_only: true,
            block_size: Some(4096),
            locking: Default::default(),
        },
    )
    .unwrap();
    assert!(b.read_only());
    let b: Arc<dyn Bdev> = b;
    let rt = runtime();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            let r = write_at(&ch, 0, DmaBuf::new(4096).unwrap()).await;
            assert!(
                matches!(r, Err(bdev::BdevError::Io(IoStatus::ReadOnly))),
                "{r:?}"
            );
        })
        .block()
        .unwrap();
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn uring_buffered_and_misaligned_buffers_are_bounced() {
    let p = temp_file("buffered", 1 << 20);
    roundtrip(
        UringBdev::open(
            "leaf_u1",
            &p,
            UringOptions {
                direct: false,
                read_only: false,
                block_size: None,
                locking: Default::default(),
            },
        )
        .unwrap(),
    );
    let b: Arc<dyn Bdev> = UringBdev::open("leaf_u2", &p, UringOptions::default()).unwrap();
    let rt = runtime();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            let bs = b.block_size() as u64;
            // A request over a buffer that starts 8 bytes into a DmaBuf.
            let mut whole = DmaBuf::new(bs as usize + 4096).unwrap();
            for (i, x) in whole.as_mut_slice().iter_mut().enumerate() {
                *x = (i % 251) as u8;
            }
            let parent = BdevIo::write(0, whole, None);
            // SAFETY: `parent` outlives the sub-request, which completes before it is dropped.
            let sub = unsafe { BdevIo::sub_io(&parent, 8, bs, IoType::Write, bs, None) };
            let sub = submit_wait(&ch, sub).await;
            assert_eq!(sub.status, IoStatus::Success);
            drop(sub);
            let back = read_at(&ch, bs, bs as usize).await.unwrap();
            let want: Vec<u8> = (8..8 + bs as usize).map(|i| (i % 251) as u8).collect();
            assert_eq!(back.as_slice(), &want[..]);
            drop(parent);
        })
        .block()
        .unwrap();
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn uring_bad_files_give_clear_errors() {
    let e = UringBdev::open(
        "leaf_missing",
        std::path::Path::new("/nonexistent/sluice.img"),
        UringOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("/nonexistent/sluice.img"), "{e}");
    let p = temp_file("tiny", 100);
    let e = UringBdev::open(
        "leaf_tiny",
        &p,
        UringOptions {
            direct: false,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("smaller than one block"), "{e}");
    let e = UringBdev::open(
        "leaf_tiny",
        &p,
        UringOptions {
            block_size: Some(1000),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("block_size"), "{e}");
    std::fs::remove_file(&p).unwrap();
    let e = UringBdev::open(
        "leaf_dir",
        std::path::Path::new("/tmp"),
        UringOptions {
            direct: false,
            read_only: true,
            block_size: None,
            locking: Default::default(),
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("neither"), "{e}");
}

#[test]
fn registry_roundtrip_of_leaf_bdevs() {
    let b = NullBdev::new("leaf_reg", 100, 512, None).unwrap();
    registry().register(b).unwrap();
    assert!(registry()
        .register(NullBdev::new("leaf_reg", 100, 512, None).unwrap())
        .is_err());
    assert_eq!(registry().get("leaf_reg").unwrap().num_blocks(), 100);
    registry().unregister("leaf_reg").unwrap();
}

#[test]
fn uring_full_ring_pushes_back_then_drains() {
    let p = temp_file("push", 1 << 20);
    let b: Arc<dyn Bdev> = UringBdev::open(
        "leaf_upush",
        &p,
        UringOptions {
            direct: false,
            ..Default::default()
        },
    )
    .unwrap();
    let rt = runtime();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            let sink = Rc::new(Collect(RefCell::new(Vec::new())));
            let mut accepted = 0;
            let refused = loop {
                let io = BdevIo::read(0, DmaBuf::new(512).unwrap(), Some(sink.clone()));
                match ch.submit(io) {
                    Ok(()) => accepted += 1,
                    Err(io) => break io,
                }
                assert!(accepted <= 100_000, "ring never filled");
            };
            assert!(accepted >= 32, "a useful ring depth ({accepted})");
            let (tx, rx) = futures::channel::oneshot::channel();
            ch.wait_for_space(Box::new(move || {
                let _ = tx.send(());
            }));
            rx.await.unwrap();
            assert!(ch.submit(refused).is_ok(), "room after completions");
            while sink.0.borrow().len() < accepted + 1 {
                reactor::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert!(sink
                .0
                .borrow()
                .iter()
                .all(|io| io.status == IoStatus::Success));
        })
        .block()
        .unwrap();
    std::fs::remove_file(&p).unwrap();
}
