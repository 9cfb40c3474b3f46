//! The whole driver on reactors against the software controller on its own
//! thread: attach (enable, identify, queues per reactor), namespace bdevs doing
//! I/O from two reactors, a reset with I/O in flight (retried), a command
//! timeout (abort; abort ignored -> reset -> retry), detach with I/O in flight
//! (fails cleanly, controller shut down), and attach errors.

use bdev::dma::DmaBuf;
use bdev::nvme::fake::{FakeConfig, FakeNvme, FakeThread};
use bdev::nvme::mem::{DmaSpace, IdentityDma};
use bdev::nvme::regs::RegisterIo;
use bdev::nvme::{CtrlrOpts, NvmeControllers, NvmeError};
use bdev::{BdevIo, IoStatus};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

fn runtime() -> Runtime {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut cfg = RuntimeConfig::new(CoreSet::from_list(if n >= 2 { "0,1" } else { "0" }).unwrap());
    cfg.pin = false;
    Runtime::start(cfg).unwrap()
}

fn fake(cfg: FakeConfig) -> FakeThread {
    // SAFETY: the driver allocates everything it hands the controller through an
    // IdentityDma and the controller thread is stopped (FakeThread drop) before
    // the test's runtime and memory go away.
    unsafe { FakeNvme::new(cfg) }.spawn()
}

fn attach(nv: &NvmeControllers, name: &str, f: &FakeThread, opts: CtrlrOpts) -> Vec<String> {
    let regs: Arc<dyn RegisterIo> = f.regs();
    let dma: Arc<dyn DmaSpace> = Arc::new(IdentityDma::new());
    nv.attach_with(registry(), name, "fake", regs, dma, opts, None)
        .expect("attach")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Writes `n` 4 KiB blocks starting at block `first` from reactor `r`, all at once;
/// returns their statuses.
fn write_many(
    rt: &Runtime,
    bdev_name: &str,
    r: usize,
    first: u64,
    n: u64,
    seed: u8,
) -> reactor::JoinHandle<Vec<IoStatus>> {
    let name = bdev_name.to_string();
    rt.handle().spawn_on(r, move || async move {
        let b = registry().get(&name).unwrap();
        let ch = bdev::channel(&b).unwrap();
        let futs = (0..n).map(|i| {
            let ch = ch.clone();
            async move {
                let buf = DmaBuf::from_slice(&[seed.wrapping_add(i as u8); 4096]).unwrap();
                bdev::submit_wait(&ch, BdevIo::write((first + i) * 4096, buf, None))
                    .await
                    .status
            }
        });
        futures::future::join_all(futs).await
    })
}

#[test]
fn attach_io_from_two_reactors_and_namespaces() {
    let rt = runtime();
    let nv = NvmeControllers::new(rt.handle());
    let f = fake(FakeConfig {
        namespaces: vec![8192, 4096],
        ..FakeConfig::default()
    });
    let names = attach(&nv, "FakeA", &f, CtrlrOpts::default());
    assert_eq!(names, vec!["FakeAn1".to_string(), "FakeAn2".to_string()]);
    let b = registry().get("FakeAn2").unwrap();
    assert_eq!(
        (b.block_size(), b.num_blocks(), b.product_name()),
        (512, 4096, "NVMe disk")
    );
    let info = nv.controllers(Some("FakeA")).unwrap();
    assert_eq!(info[0].model_number, "sluice software NVMe");
    assert_eq!(info[0].bdevs, names);
    assert_eq!(b.driver_specific()["nvme"][0]["ns_data"]["id"], 2);
    assert!(
        registry().get("FakeAn1").unwrap().config().is_some(),
        "the first namespace carries save_config"
    );
    assert!(b.config().is_none());
    let nr = rt.handle().num_reactors();
    for r in 0..nr {
        let st = write_many(&rt, "FakeAn1", r, r as u64 * 100, 64, r as u8 * 50)
            .block()
            .unwrap();
        assert!(st.iter().all(|s| *s == IoStatus::Success), "{st:?}");
    }
    let disks = f.disks();
    for r in 0..nr {
        let d = &disks.lock().unwrap()[0];
        for i in 0..64usize {
            let off = (r * 100 + i) * 4096;
            assert!(
                d[off..off + 4096]
                    .iter()
                    .all(|&x| x == (r as u8 * 50).wrapping_add(i as u8)),
                "block {r}/{i}"
            );
        }
    }
    // Reading back through the other reactor, and from the second namespace.
    disks.lock().unwrap()[1][512..1024].fill(0x5a);
    let got = rt
        .handle()
        .spawn_on(nr - 1, || async {
            let ch1 = bdev::channel(&registry().get("FakeAn1").unwrap()).unwrap();
            let ch2 = bdev::channel(&registry().get("FakeAn2").unwrap()).unwrap();
            let a = bdev::read_at(&ch1, 4096, 4096).await.unwrap();
            let b = bdev::read_at(&ch2, 512, 512).await.unwrap();
            let past = bdev::read_at(&ch2, 4096 * 512 - 512, 1024)
                .await
                .err()
                .map(|e| e.to_string());
            (a.as_slice()[0], b.as_slice().to_vec(), past)
        })
        .block()
        .unwrap();
    assert_eq!(got.0, 1);
    assert!(got.1.iter().all(|&x| x == 0x5a));
    assert!(got.2.is_some(), "a read past the end fails");
    nv.detach(registry(), "FakeA").unwrap();
    assert!(!registry().contains("FakeAn1") && !registry().contains("FakeAn2"));
    assert!(nv.controllers(Some("FakeA")).is_err());
    // Detached like the kernel driver expects: shut down and disabled.
    let regs = f.regs();
    assert_eq!(regs.read32(0x1c) & 1, 0, "CSTS.RDY clear");
    assert_eq!(
        regs.read32(0x1c) & 0xc,
        0x8,
        "CSTS.SHST = shutdown complete"
    );
    rt.shutdown();
}

#[test]
fn reset_with_io_in_flight_retries_it() {
    let rt = runtime();
    let nv = NvmeControllers::new(rt.handle());
    let f = fake(FakeConfig {
        namespaces: vec![8192],
        ..FakeConfig::default()
    });
    attach(&nv, "FakeR", &f, CtrlrOpts::default());
    let faults = f.faults();
    faults.hold_next.store(8, Ordering::Relaxed);
    let before = faults.io_commands.load(Ordering::Relaxed);
    let job = write_many(&rt, "FakeRn1", 0, 0, 16, 9);
    wait_until("16 commands at the device", || {
        faults.io_commands.load(Ordering::Relaxed) >= before + 16
    });
    nv.reset("FakeR").unwrap();
    let st = job.block().unwrap();
    assert!(
        st.iter().all(|s| *s == IoStatus::Success),
        "held writes retried after the reset: {st:?}"
    );
    assert_eq!(
        faults.resets.load(Ordering::Relaxed),
        1,
        "the reset disabled the controller once"
    );
    let disks = f.disks();
    let d = &disks.lock().unwrap()[0];
    for i in 0..16usize {
        assert!(d[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&x| x == 9u8.wrapping_add(i as u8)));
    }
    assert_eq!(nv.controller("FakeR").unwrap().reset_count(), 1);
    nv.detach(registry(), "FakeR").unwrap();
    rt.shutdown();
}

#[test]
fn timed_out_command_is_aborted_or_the_controller_reset() {
    let rt = runtime();
    let nv = NvmeControllers::new(rt.handle());
    let f = fake(FakeConfig {
        namespaces: vec![8192],
        ..FakeConfig::default()
    });
    let opts = CtrlrOpts {
        io_timeout: Duration::from_millis(200),
        ..CtrlrOpts::default()
    };
    attach(&nv, "FakeT", &f, opts);
    let faults = f.faults();
    // The controller honours the abort: the request fails as aborted.
    faults.hold_next.store(1, Ordering::Relaxed);
    let st = write_many(&rt, "FakeTn1", 0, 0, 1, 1).block().unwrap();
    assert_eq!(st, vec![IoStatus::Aborted]);
    assert_eq!(faults.aborts.load(Ordering::Relaxed), 1);
    // It ignores the abort: after another timeout the controller is reset and
    // the request retried, successfully this time.
    faults.ignore_abort.store(true, Ordering::Relaxed);
    faults.hold_next.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let st = write_many(&rt, "FakeTn1", 0, 5, 1, 77).block().unwrap();
    assert_eq!(st, vec![IoStatus::Success]);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "abort, then reset after a second timeout"
    );
    let c = nv.controller("FakeT").unwrap();
    assert_eq!(c.reset_count(), 1);
    assert!(f.disks().lock().unwrap()[0][5 * 4096..6 * 4096]
        .iter()
        .all(|&x| x == 77));
    nv.detach(registry(), "FakeT").unwrap();
    rt.shutdown();
}

#[test]
fn detach_with_io_in_flight_fails_it_cleanly() {
    let rt = runtime();
    let nv = NvmeControllers::new(rt.handle());
    let f = fake(FakeConfig {
        namespaces: vec![8192],
        ..FakeConfig::default()
    });
    attach(&nv, "FakeD", &f, CtrlrOpts::default());
    let faults = f.faults();
    faults.hold_next.store(1000, Ordering::Relaxed);
    let before = faults.io_commands.load(Ordering::Relaxed);
    let job = write_many(&rt, "FakeDn1", 0, 0, 8, 3);
    wait_until("8 commands at the device", || {
        faults.io_commands.load(Ordering::Relaxed) >= before + 8
    });
    // A claimed namespace blocks detach.
    registry()
        .claim(
            "FakeDn1",
            bdev::Claim::root(bdev::Holder::Node("test".into()), false),
        )
        .unwrap();
    assert!(matches!(
        nv.detach(registry(), "FakeD"),
        Err(NvmeError::Bdev(bdev::BdevError::Claimed { .. }))
    ));
    registry().release("FakeDn1", &bdev::Holder::Node("test".into()));
    nv.detach(registry(), "FakeD").unwrap();
    let st = job.block().unwrap();
    assert_eq!(st.len(), 8);
    assert!(st.iter().all(|s| *s == IoStatus::Aborted), "{st:?}");
    assert!(!registry().contains("FakeDn1"));
    assert!(matches!(
        nv.detach(registry(), "FakeD"),
        Err(NvmeError::NotFound(_))
    ));
    rt.shutdown();
}

#[test]
fn attach_errors_are_clear() {
    let rt = runtime();
    let nv = NvmeControllers::new(rt.handle());
    let e = nv
        .attach_pcie(registry(), "X", "not-an-address", CtrlrOpts::default())
        .unwrap_err();
    assert!(matches!(e, NvmeError::BadAddress(_)), "{e}");
    let e = nv
        .attach_pcie(registry(), "X", "0000:ff:1f.7", CtrlrOpts::default())
        .unwrap_err();
    assert!(
        e.to_string().contains("no PCI device at 0000:ff:1f.7"),
        "{e}"
    );
    assert_eq!(e.errno(), libc::ENODEV);
    // A PCI device that is not an NVMe controller, when this machine has one.
    let other = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .find(|d| {
            std::fs::read_to_string(d.path().join("class"))
                .map(|c| c.trim() != "0x010802")
                .unwrap_or(false)
        });
    if let Some(d) = other {
        let addr = d.file_name().to_string_lossy().into_owned();
        let e = nv
            .attach_pcie(registry(), "X", &addr, CtrlrOpts::default())
            .unwrap_err();
        assert!(matches!(e, NvmeError::NotNvme { .. }), "{e}");
        assert!(e.to_string().contains("is not an NVMe controller"), "{e}");
    }
    let f = fake(FakeConfig::default());
    attach(&nv, "FakeE", &f, CtrlrOpts::default());
    let regs: Arc<dyn RegisterIo> = f.regs();
    let e = nv
        .attach_with(
            registry(),
            "FakeE",
            "fake",
            regs,
            Arc::new(IdentityDma::new()),
            CtrlrOpts::default(),
            None,
        )
        .unwrap_err();
    assert!(matches!(e, NvmeError::Exists(_)), "{e}");
    nv.detach(registry(), "FakeE").unwrap();
    rt.shutdown();
}

/// The controller table and the options for later attaches are state of their
/// owner (one per service), not of the process: a second table sees neither.
#[test]
fn controller_tables_are_independent() {
    let rt = runtime();
    let a = NvmeControllers::new(rt.handle());
    let b = NvmeControllers::new(rt.handle());
    let f = fake(FakeConfig::default());
    let names = attach(&a, "FakeS", &f, CtrlrOpts::default());
    assert_eq!(a.controllers(None).unwrap().len(), 1);
    assert!(b.controllers(None).unwrap().is_empty());
    assert!(b.controller("FakeS").is_none());
    assert!(matches!(b.reset("FakeS"), Err(NvmeError::NotFound(_))));
    assert!(matches!(
        b.detach(registry(), "FakeS"),
        Err(NvmeError::NotFound(_))
    ));
    assert!(registry().contains(&names[0]), "b's refusal left a's bdev");
    let slow = CtrlrOpts {
        io_timeout: Duration::from_secs(77),
        ..CtrlrOpts::default()
    };
    b.set_options(slow);
    assert_eq!(b.options().io_timeout, Duration::from_secs(77));
    assert_eq!(a.options().io_timeout, CtrlrOpts::default().io_timeout);
    a.detach(registry(), "FakeS").unwrap();
    assert!(!registry().contains(&names[0]));
    rt.shutdown();
}
