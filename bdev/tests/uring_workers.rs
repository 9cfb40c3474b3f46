//! io_uring's kernel workers (io-wq, which do buffered file I/O) run on the
//! runtime's helper cores, not on the pinned reactor's core.

use bdev::uring::{UringBdev, UringOptions};
use bdev::{channel, read_at, write_at, Bdev, DmaBuf};

use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::sync::Arc;

/// (name, allowed cpu list) of this process's threads.
fn threads() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        v.push((comm.trim().to_string(), cpus));
    }
    v
}

#[test]
fn io_workers_stay_off_the_reactor_core() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shm = std::path::Path::new("/dev/shm");
    if cores < 2 || !shm.is_dir() {
        eprintln!("skipped: needs two cores and /dev/shm");
        return;
    }
    // tmpfs has no non-blocking buffered I/O, so io_uring hands every request
    // to an io-wq worker.
    let p = shm.join(format!("sluice-iowq-{}.img", std::process::id()));
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let b: Arc<dyn Bdev> = UringBdev::open(
        "iowq0",
        &p,
        UringOptions {
            direct: false,
            ..UringOptions::default()
        },
    )
    .unwrap();
    let rt = Runtime::start(RuntimeConfig::new(CoreSet::from_list("0").unwrap())).unwrap();
    assert!(!rt.handle().helper_cores().contains(&0));
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            for i in 0..16u64 {
                let data = vec![i as u8; 1 << 20];
                write_at(&ch, i << 20, DmaBuf::from_slice(&data).unwrap())
                    .await
                    .unwrap();
                let back = read_at(&ch, i << 20, 1 << 20).await.unwrap();
                assert_eq!(back.as_slice(), &data[..]);
            }
        })
        .block()
        .unwrap();
    let workers: Vec<_> = threads()
        .into_iter()
        .filter(|(n, _)| n.starts_with("iou-wrk"))
        .collect();
    std::fs::remove_file(&p).unwrap();
    assert!(!workers.is_empty(), "no io-wq worker seen: {:?}", threads());
    for (name, cpus) in &workers {
        let on_reactor_core = cpus.split(',').any(|r| r.split('-').next() == Some("0"));
        assert!(
            !on_reactor_core,
            "{name} may run on the reactor's core 0: {cpus}"
        );
    }
}

/// On tmpfs the reactor reads itself (no io-wq): single and vectored reads
/// return what was written, and a file shrunk underneath gives an error, not a hang.
#[test]
fn tmpfs_reads_inline_return_the_data() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: needs /dev/shm");
        return;
    }
    let p = shm.join(format!("sluice-inline-{}.img", std::process::id()));
    let data: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    let b: Arc<dyn Bdev> = UringBdev::open(
        "inline0",
        &p,
        UringOptions {
            direct: false,
            ..UringOptions::default()
        },
    )
    .unwrap();
    let rt = Runtime::start(RuntimeConfig {
        pin: false,
        ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
    })
    .unwrap();
    let p2 = p.clone();
    rt.handle()
        .spawn_on(0, move || async move {
            let ch = channel(&b).unwrap();
            let back = read_at(&ch, 4096, 1 << 20).await.unwrap();
            assert_eq!(back.as_slice(), &data[4096..4096 + (1 << 20)]);
            let (a, c) = (DmaBuf::new(512).unwrap(), DmaBuf::new(8192).unwrap());
            let io = bdev::BdevIo::vectored(bdev::IoType::Read, 1536, vec![a, c], None);
            let mut io = bdev::submit_wait(&ch, io).await;
            assert_eq!(io.status, bdev::IoStatus::Success);
            let [a, c] = <[DmaBuf; 2]>::try_from(io.take_bufs()).unwrap();
            assert_eq!(a.as_slice(), &data[1536..2048]);
            assert_eq!(c.as_slice(), &data[2048..2048 + 8192]);
            drop(io);
            // Concurrent writes (to io-wq) and inline reads of them.
            let writes = (0..32u64).map(|i| {
                let ch = &ch;
                async move {
                    let d = vec![i as u8 + 1; 64 << 10];
                    write_at(
                        ch,
                        (1 << 20) + i * (64 << 10),
                        DmaBuf::from_slice(&d).unwrap(),
                    )
                    .await
                    .unwrap();
                }
            });
            futures::future::join_all(writes).await;
            let back = read_at(&ch, 1 << 20, 32 * (64 << 10)).await.unwrap();
            for (i, c) in back.as_slice().chunks(64 << 10).enumerate() {
                assert!(c.iter().all(|&x| x == i as u8 + 1), "chunk {i}");
            }
            // The file loses its tail behind the bdev's back: reads there fail.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p2)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
            let r = read_at(&ch, 2 << 20, 4096).await;
            assert!(matches!(r, Err(bdev::BdevError::Io(_))), "{r:?}");
        })
        .block()
        .unwrap();
    std::fs::remove_file(&p).unwrap();
}

/// A reactor that parks as soon as it idles (`--park-after-us 0`) is woken
/// when an io-wq worker completes its write (tmpfs writes always go to a
/// worker): each of many writes, awaited one at a time, comes back, and the
/// reactor parked while most of them were in flight, so a wake-up, not
/// polling, is what brought them back. (The kernel's task work for the
/// reactor's thread interrupts its `epoll_wait` as well as the ring's
/// eventfd does: with the eventfd left out of the wake set this still
/// passes, so it does not prove the eventfd alone.)
#[test]
fn a_parked_reactor_is_woken_by_the_completions_of_io_workers() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: needs /dev/shm");
        return;
    }
    let p = shm.join(format!("sluice-iowq-park-{}.img", std::process::id()));
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    let b: Arc<dyn Bdev> = UringBdev::open(
        "iowq2",
        &p,
        UringOptions {
            direct: false,
            ..UringOptions::default()
        },
    )
    .unwrap();
    let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").unwrap());
    cfg.pin = false;
    cfg.idle_before_park = std::time::Duration::ZERO;
    let rt = Runtime::start(cfg).unwrap();
    const WRITES: u64 = 200;
    let job = rt.handle().spawn_on(0, move || async move {
        let ch = channel(&b).unwrap();
        let parks = reactor::parks();
        for i in 0..WRITES {
            let data = vec![i as u8; 4096];
            write_at(&ch, (i % 1024) * 4096, DmaBuf::from_slice(&data).unwrap())
                .await
                .unwrap();
        }
        let back = read_at(&ch, (WRITES - 1) * 4096, 4096).await.unwrap();
        assert!(back.as_slice().iter().all(|&x| x == (WRITES - 1) as u8));
        reactor::parks() - parks
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(job.block());
    });
    let parked = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the writes did not all come back within 30 s: a completion slept through")
        .unwrap();
    rt.shutdown();
    std::fs::remove_file(&p).unwrap();
    assert!(
        parked >= WRITES / 4,
        "the reactor parked {parked} times over {WRITES} writes: the wake path was not exercised"
    );
}
