//! The driver's checks on a real (emulated) controller through VFIO, run inside
//! the test guest (scripts/vm): attach errors, attach + identify, verified I/O
//! from two reactors (two queue pairs) across PRP lists and MDTS splits, the
//! non-data commands, reads past the end (rejected by the bdev layer and by the
//! device), a reset with I/O in flight, detach with I/O in flight, and a
//! re-attach that finds the data written before. Prints one line per check and
//! `NVME-GUEST: PASS` or `NVME-GUEST: FAIL`.
//!
//! Usage: nvme_guest TRADDR [NON_NVME_TRADDR]

use bdev::dma::DmaBuf;
use bdev::nvme::{self, CtrlrOpts, NvmeError};
use bdev::{BdevIo, IoDone, IoStatus, IoType};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

type R<T> = Result<T, String>;

fn pattern(off: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((off as usize + i) as u8).wrapping_mul(13) ^ seed ^ ((off as usize + i) >> 12) as u8
        })
        .collect()
}

/// Writes then reads back and compares ranges of several shapes, from reactor `r`.
fn verify_io(h: &RuntimeHandle, bdev_name: &str, r: usize, base: u64, seed: u8) -> R<usize> {
    let name = bdev_name.to_string();
    h.spawn_on(r, move || async move {
        let b = registry().get(&name).map_err(|e| e.to_string())?;
        let ch = bdev::channel(&b).map_err(|e| e.to_string())?;
        let mut off = base;
        let mut n = 0;
        for len in [512usize, 4096, 8192, 65536, 1 << 20, 3 << 20] {
            let data = pattern(off, len, seed);
            bdev::write_at(
                &ch,
                off,
                DmaBuf::from_slice(&data).map_err(|e| e.to_string())?,
            )
            .await
            .map_err(|e| format!("write {len} at {off}: {e}"))?;
            let got = bdev::read_at(&ch, off, len)
                .await
                .map_err(|e| format!("read {len} at {off}: {e}"))?;
            if got.as_slice() != &data[..] {
                return Err(format!("data mismatch: {len} bytes at {off}"));
            }
            off += len as u64 + 4096;
            n += 1;
        }
        Ok(n)
    })
    .block()
    .map_err(|e| format!("{e:?}"))?
}

fn non_data(h: &RuntimeHandle, bdev_name: &str) -> R<()> {
    let name = bdev_name.to_string();
    h.spawn_on(0, move || async move {
        let b = registry().get(&name).map_err(|e| e.to_string())?;
        let ch = bdev::channel(&b).map_err(|e| e.to_string())?;
        let off = 64 << 20;
        bdev::write_at(&ch, off, DmaBuf::from_slice(&[0xa5; 65536]).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        for (t, what) in [
            (IoType::WriteZeroes, "write zeroes"),
            (IoType::Flush, "flush"),
        ] {
            if b.io_type_supported(t) {
                let st = bdev::simple_io(&ch, t, off, 32768).await;
                if !st.is_ok() {
                    return Err(format!("{what}: {st}"));
                }
            }
        }
        let got = bdev::read_at(&ch, off, 65536)
            .await
            .map_err(|e| e.to_string())?;
        if b.io_type_supported(IoType::WriteZeroes)
            && (got.as_slice()[..32768].iter().any(|&x| x != 0) || got.as_slice()[32768] != 0xa5)
        {
            return Err("write zeroes did not zero exactly its range".into());
        }
        if b.io_type_supported(IoType::Unmap) {
            let st = bdev::simple_io(&ch, IoType::Unmap, off, 65536).await;
            if !st.is_ok() {
                return Err(format!("unmap: {st}"));
            }
        }
        Ok(())
    })
    .block()
    .map_err(|e| format!("{e:?}"))?
}

struct Slot(RefCell<Option<IoStatus>>);
impl IoDone for Slot {
    fn io_done(&self, io: Box<BdevIo>) {
        *self.0.borrow_mut() = Some(io.status);
    }
}

/// Reads past the end: through the bdev layer (refused) and straight to the
/// device, bypassing validation (the controller answers LBA Out of Range).
fn past_end(h: &RuntimeHandle, bdev_name: &str) -> R<(String, String)> {
    let name = bdev_name.to_string();
    h.spawn_on(0, move || async move {
        let b = registry().get(&name).map_err(|e| e.to_string())?;
        let ch = bdev::channel(&b).map_err(|e| e.to_string())?;
        let size = b.size();
        let layer = match bdev::read_at(&ch, size - 512, 4096).await {
            Ok(_) => return Err("read past the end succeeded (bdev layer)".into()),
            Err(e) => e.to_string(),
        };
        let raw = b.create_channel().map_err(|e| e.to_string())?;
        let slot = Rc::new(Slot(RefCell::new(None)));
        let io = BdevIo::read(size - 512, DmaBuf::new(4096).unwrap(), Some(slot.clone()));
        if raw.submit(io).is_err() {
            return Err("queue full".into());
        }
        let t = Instant::now();
        while slot.0.borrow().is_none() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err("read past the end never completed".into());
            }
            reactor::sleep(Duration::from_millis(1)).await;
        }
        let st = slot.0.borrow().unwrap_or(IoStatus::Pending);
        if st != IoStatus::Einval {
            return Err(format!(
                "device answered {st}, expected LBA out of range (EINVAL)"
            ));
        }
        Ok((layer, st.to_string()))
    })
    .block()
    .map_err(|e| format!("{e:?}"))?
}

/// Starts `n` 64 KiB writes from reactor `r` without waiting; the handle yields their statuses.
fn start_writes(
    h: &RuntimeHandle,
    bdev_name: &str,
    r: usize,
    base: u64,
    n: u64,
    seed: u8,
) -> reactor::JoinHandle<Vec<IoStatus>> {
    let name = bdev_name.to_string();
    h.spawn_on(r, move || async move {
        let Ok(b) = registry().get(&name) else {
            return vec![];
        };
        let Ok(ch) = bdev::channel(&b) else {
            return vec![];
        };
        let futs = (0..n).map(|i| {
            let ch = ch.clone();
            async move {
                let off = base + i * 65536;
                let buf = DmaBuf::from_slice(&pattern(off, 65536, seed)).unwrap();
                bdev::submit_wait(&ch, BdevIo::write(off, buf, None))
                    .await
                    .status
            }
        });
        futures::future::join_all(futs).await
    })
}

fn check_range(h: &RuntimeHandle, bdev_name: &str, base: u64, n: u64, seed: u8) -> R<()> {
    let name = bdev_name.to_string();
    h.spawn_on(1.min(h.num_reactors() - 1), move || async move {
        let b = registry().get(&name).map_err(|e| e.to_string())?;
        let ch = bdev::channel(&b).map_err(|e| e.to_string())?;
        let got = bdev::read_at(&ch, base, (n * 65536) as usize)
            .await
            .map_err(|e| e.to_string())?;
        for i in 0..n {
            let off = base + i * 65536;
            if got.as_slice()[(i * 65536) as usize..((i + 1) * 65536) as usize]
                != pattern(off, 65536, seed)[..]
            {
                return Err(format!("block at {off} differs"));
            }
        }
        Ok(())
    })
    .block()
    .map_err(|e| format!("{e:?}"))?
}

fn run(traddr: &str, other: Option<&str>) -> R<Vec<String>> {
    let mut log = Vec::new();
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut cfg = RuntimeConfig::new(
        CoreSet::from_list(if n >= 2 { "0,1" } else { "0" }).map_err(|e| e.to_string())?,
    );
    cfg.pin = n >= 2;
    let rt = Runtime::start(cfg).map_err(|e| e.to_string())?;
    let h = rt.handle();
    let nv = nvme::NvmeControllers::new(h.clone());
    let opts = CtrlrOpts {
        io_timeout: Duration::from_secs(20),
        ..CtrlrOpts::default()
    };

    match nv.attach_pcie(registry(), "Bad", "0000:ff:1f.7", opts.clone()) {
        Err(e @ NvmeError::NoDevice(_)) => log.push(format!("attach to an absent device: {e}")),
        other => return Err(format!("attach to an absent device: {other:?}")),
    }
    if let Some(o) = other {
        match nv.attach_pcie(registry(), "Bad", o, opts.clone()) {
            Err(e @ NvmeError::NotNvme { .. }) => {
                log.push(format!("attach to a non-NVMe device: {e}"))
            }
            other => return Err(format!("attach to a non-NVMe device: {other:?}")),
        }
    }
    let names = nv
        .attach_pcie(registry(), "Nvme0", traddr, opts.clone())
        .map_err(|e| format!("attach: {e}"))?;
    let c = nv.controller("Nvme0").ok_or("controller missing")?;
    let b = registry().get(&names[0]).map_err(|e| e.to_string())?;
    log.push(format!(
        "attached {traddr}: {:?} sn {:?} fw {:?}, {} namespace(s) {:?}, {} x {} B, MQES {}, DSTRD {}, max transfer {} KiB, {} reactors, hugepages {}",
        c.data().mn, c.data().sn, c.data().fr, names.len(), names, b.num_blocks(), b.block_size(), c.cap().mqes,
        c.cap().doorbell_stride, c.max_xfer() / 1024, h.num_reactors(), bdev::dma::hugepages_in_use()
    ));
    let bn = names[0].clone();
    drop((b, c.clone()));
    for r in 0..h.num_reactors() {
        let k = verify_io(&h, &bn, r, r as u64 * (16 << 20), 0x30 + r as u8)?;
        log.push(format!(
            "reactor {r} (queue pair {}): {k} write+read shapes verified (512 B .. 3 MiB)",
            r + 1
        ));
    }
    non_data(&h, &bn)?;
    log.push("write zeroes, flush, unmap: ok".into());
    let (layer, dev) = past_end(&h, &bn)?;
    log.push(format!(
        "read past the end: bdev layer: {layer}; device: {dev}"
    ));

    let job = start_writes(&h, &bn, 0, 80 << 20, 64, 0x77);
    std::thread::sleep(Duration::from_millis(5));
    nv.reset("Nvme0").map_err(|e| format!("reset: {e}"))?;
    let st = job.block().map_err(|e| format!("{e:?}"))?;
    if st.len() != 64 || st.iter().any(|s| *s != IoStatus::Success) {
        return Err(format!("writes across a reset: {st:?}"));
    }
    check_range(&h, &bn, 80 << 20, 64, 0x77)?;
    log.push(format!(
        "reset with I/O in flight: 64 writes retried and verified (resets: {})",
        c.reset_count()
    ));

    let job = start_writes(&h, &bn, 0, 100 << 20, 64, 0x12);
    std::thread::sleep(Duration::from_millis(5));
    nv.detach(registry(), "Nvme0")
        .map_err(|e| format!("detach: {e}"))?;
    let st = job.block().map_err(|e| format!("{e:?}"))?;
    let ok = st.iter().filter(|s| **s == IoStatus::Success).count();
    let aborted = st.iter().filter(|s| **s == IoStatus::Aborted).count();
    if ok + aborted != st.len() {
        return Err(format!(
            "detach with I/O in flight: unexpected statuses {st:?}"
        ));
    }
    if registry().contains(&bn) {
        return Err("bdev still registered after detach".into());
    }
    log.push(format!(
        "detach with I/O in flight: {ok} completed, {aborted} aborted, none lost"
    ));

    let names = nv
        .attach_pcie(registry(), "Nvme0", traddr, opts)
        .map_err(|e| format!("re-attach: {e}"))?;
    check_range(&h, &names[0], 80 << 20, 64, 0x77)?;
    nv.detach(registry(), "Nvme0")
        .map_err(|e| format!("final detach: {e}"))?;
    log.push("re-attach after detach: data written before is there".into());
    rt.shutdown();
    Ok(log)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(traddr) = args.first() else {
        eprintln!("usage: nvme_guest TRADDR [NON_NVME_TRADDR]");
        std::process::exit(2);
    };
    match run(traddr, args.get(1).map(|s| s.as_str())) {
        Ok(lines) => {
            for l in lines {
                println!("nvme_guest: {l}");
            }
            println!("NVME-GUEST: PASS");
        }
        Err(e) => {
            println!("NVME-GUEST: FAIL {e}");
            std::process::exit(1);
        }
    }
}
