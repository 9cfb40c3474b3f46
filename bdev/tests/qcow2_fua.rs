//! FUA on every device kind. A kill test means nothing for RAM, so the
//! requests that reach the bottom device are recorded instead, and the FUA
//! contract (`BdevIo::fua`) is checked on them: when a FUA request completes,
//! every write the image made (data and metadata) either went down with FUA
//! or was followed by a completed flush.
//!
//! - qcow2 over a recording layer over malloc: FUA write into a new cluster
//!   (submitted on the owner reactor and on another one, through the remote
//!   channel), FUA write into a mapped cluster (one write, with FUA, no flush),
//!   the same after unrelated metadata got dirty (flushed), FUA write-zeroes
//!   and discard; and a plain write, which the check must find not durable.
//! - qcow2 over the software NVMe controller: the commands it executed (the
//!   FUA bit, Flush commands); NVMe Write Zeroes with FUA carries the bit, a
//!   FUA discard is followed by a Flush.
//! - malloc and null: FUA requests complete (nothing volatile).

mod qcow2_common;

use bdev::malloc::MallocBdev;
use bdev::null::NullBdev;
use bdev::nvme::fake::{FakeConfig, FakeNvme, FakeThread, LoggedCmd};
use bdev::nvme::mem::{DmaSpace, IdentityDma};
use bdev::nvme::regs::RegisterIo;
use bdev::nvme::spec::nvm;
use bdev::nvme::{self, CtrlrOpts};
use bdev::qcow2::{self, BackingSpec, CreateOptions, OpenOptions, Qcow2Bdev};
use bdev::{
    channel, read_at, simple_io, submit_wait, Bdev, BdevError, BdevIo, Channel, DmaBuf, IoStatus,
    IoType,
};
use qcow2_common::runtime;
use reactor::RuntimeHandle;
use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

/// One thing the recording layer saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    /// A write, write-zeroes or discard completed.
    Done {
        t: IoType,
        off: u64,
        len: u64,
        fua: bool,
    },
    /// Flush number `n` was submitted / completed successfully.
    FlushStart(u64),
    FlushDone(u64),
}

/// A pass-through bdev that records what goes down to its base.
struct Recorder {
    name: String,
    base: Arc<dyn Bdev>,
    log: Arc<Mutex<Vec<Ev>>>,
    /// What it answers to `fua_is_cheap` (false: as a buffered file).
    cheap_fua: bool,
}

struct RecChannel {
    base: Arc<dyn Bdev>,
    log: Arc<Mutex<Vec<Ev>>>,
}

impl Bdev for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Recorder"
    }
    fn block_size(&self) -> u32 {
        self.base.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.base.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }
    fn fua_is_cheap(&self) -> bool {
        self.cheap_fua
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(RecChannel {
            base: self.base.clone(),
            log: self.log.clone(),
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Channel for RecChannel {
    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let (base, log) = (self.base.clone(), self.log.clone());
        reactor::spawn_local(async move {
            let ch = match channel(&base) {
                Ok(c) => c,
                Err(_) => return io.complete(IoStatus::Eio),
            };
            let (t, off, len, fua) = (io.io_type, io.offset, io.len, io.fua);
            let st = match t {
                IoType::Read => match read_at(&ch, off, len as usize).await {
                    Ok(b) => {
                        io.copy_in(0, b.as_slice());
                        IoStatus::Success
                    }
                    Err(_) => IoStatus::Eio,
                },
                IoType::Write => {
                    let mut b = DmaBuf::new(len as usize).expect("buffer");
                    io.copy_out(0, b.as_mut_slice());
                    let mut w = BdevIo::write(off, b, None);
                    w.fua = fua;
                    submit_wait(&ch, w).await.status
                }
                IoType::Flush => {
                    let n = {
                        let mut l = log.lock().unwrap();
                        let n = l.len() as u64;
                        l.push(Ev::FlushStart(n));
                        n
                    };
                    let st = simple_io(&ch, IoType::Flush, 0, 0).await;
                    if st.is_ok() {
                        log.lock().unwrap().push(Ev::FlushDone(n));
                    }
                    st
                }
                IoType::WriteZeroes | IoType::Unmap => {
                    let mut r = BdevIo::new(t, off, len, None, None);
                    r.fua = fua;
                    submit_wait(&ch, r).await.status
                }
            };
            if st.is_ok() && t != IoType::Read && t != IoType::Flush {
                log.lock().unwrap().push(Ev::Done { t, off, len, fua });
            }
            io.complete(st);
        });
        Ok(())
    }
}

/// The completed writes of `log` that are not durable at its end: neither FUA
/// nor completed before a flush that then completed.
fn not_durable(log: &[Ev]) -> Vec<Ev> {
    let mut pending: Vec<Ev> = Vec::new();
    let mut flights: Vec<(u64, Vec<Ev>)> = Vec::new();
    for &e in log {
        match e {
            Ev::Done { fua: false, .. } => pending.push(e),
            Ev::Done { .. } => {}
            Ev::FlushStart(n) => flights.push((n, std::mem::take(&mut pending))),
            Ev::FlushDone(n) => flights.retain(|(k, _)| *k != n),
        }
    }
    flights
        .into_iter()
        .flat_map(|(_, v)| v)
        .chain(pending)
        .collect()
}

const CS: u64 = 65536;

/// A new 64 MiB qcow2 image (64 KiB clusters) over a recorder over a malloc
/// bdev, opened with reactor 0 as its owner.
fn recorded_image(rt: &RuntimeHandle, tag: &str) -> (Arc<dyn Bdev>, Arc<Mutex<Vec<Ev>>>) {
    recorded_image_with(rt, tag, true)
}

/// [`recorded_image`] over a base whose FUA is cheap or not.
fn recorded_image_with(
    rt: &RuntimeHandle,
    tag: &str,
    cheap_fua: bool,
) -> (Arc<dyn Bdev>, Arc<Mutex<Vec<Ev>>>) {
    let m: Arc<dyn Bdev> =
        MallocBdev::new(&format!("fua_m_{tag}"), 256 * 1024, 512, None).expect("malloc");
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec: Arc<dyn Bdev> = Arc::new(Recorder {
        name: format!("fua_rec_{tag}"),
        base: m,
        log: log.clone(),
        cheap_fua,
    });
    let name = format!("fua_q_{tag}");
    let q = rt
        .spawn_on(0, move || async move {
            qcow2::create(rec.clone(), &CreateOptions::new(64 << 20)).await?;
            let opts = OpenOptions {
                backing: BackingSpec::None,
                ..OpenOptions::default()
            };
            Qcow2Bdev::open(&name, rec, opts).await
        })
        .block()
        .expect("join")
        .expect("open image");
    (q as Arc<dyn Bdev>, log)
}

/// Submits one request of `t` (`fua` as given) on reactor `r`; returns its status.
fn io_on(
    rt: &RuntimeHandle,
    r: usize,
    b: &Arc<dyn Bdev>,
    t: IoType,
    off: u64,
    fua: bool,
) -> IoStatus {
    let b = b.clone();
    rt.spawn_on(r, move || async move {
        let ch = channel(&b).expect("channel");
        let buf = (t == IoType::Write).then(|| DmaBuf::from_slice(&[0x5au8; CS as usize]).unwrap());
        let mut io = BdevIo::new(t, off, CS, buf, None);
        io.fua = fua;
        submit_wait(&ch, io).await.status
    })
    .block()
    .expect("join")
}

fn take(log: &Mutex<Vec<Ev>>) -> Vec<Ev> {
    std::mem::take(&mut *log.lock().unwrap())
}

fn writes(log: &[Ev]) -> usize {
    log.iter().filter(|e| matches!(e, Ev::Done { .. })).count()
}

fn flushes(log: &[Ev]) -> usize {
    log.iter().filter(|e| matches!(e, Ev::FlushDone(_))).count()
}

#[test]
fn qcow2_fua_write_into_new_cluster_is_durable_on_completion() {
    let rt = runtime(2);
    let h = rt.handle();
    for r in [0usize, 1] {
        let (q, log) = recorded_image(&h, &format!("new{r}"));
        take(&log);
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, 5 * CS, true),
            IoStatus::Success
        );
        let l = take(&log);
        assert!(
            writes(&l) >= 2,
            "reactor {r}: expected the data and the metadata written: {l:?}"
        );
        assert!(flushes(&l) >= 1, "reactor {r}: no flush: {l:?}");
        assert_eq!(
            not_durable(&l),
            vec![],
            "reactor {r}: FUA write completed with writes not durable: {l:?}"
        );
        // The check sees what a plain write leaves behind: not durable.
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, 9 * CS, false),
            IoStatus::Success
        );
        let l = take(&log);
        assert!(
            !not_durable(&l).is_empty(),
            "reactor {r}: a plain write into a new cluster looked durable: {l:?}"
        );
    }
}

#[test]
fn qcow2_fua_write_into_mapped_cluster() {
    let rt = runtime(2);
    let h = rt.handle();
    for r in [0usize, 1] {
        let (q, log) = recorded_image(&h, &format!("mapped{r}"));
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, 3 * CS, true),
            IoStatus::Success
        );
        take(&log);
        // The mapping is durable: the write goes down as it is, with FUA.
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, 3 * CS, true),
            IoStatus::Success
        );
        let l = take(&log);
        assert_eq!(l.len(), 1, "reactor {r}: {l:?}");
        assert!(
            matches!(
                l[0],
                Ev::Done {
                    t: IoType::Write,
                    fua: true,
                    ..
                }
            ),
            "reactor {r}: {l:?}"
        );
        // Metadata made dirty by a plain write elsewhere: the FUA write to the
        // mapped cluster must not complete before it is durable too (the
        // image cannot tell which metadata the reader will need).
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, 20 * CS, false),
            IoStatus::Success
        );
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, 3 * CS, true),
            IoStatus::Success
        );
        let l = take(&log);
        assert_eq!(not_durable(&l), vec![], "reactor {r}: {l:?}");
        assert!(flushes(&l) >= 1, "reactor {r}: {l:?}");
    }
}

/// Over a base whose FUA is not cheap (a buffered file: `RWF_DSYNC` syncs per
/// request), a FUA write to a mapped cluster goes down plain and completes
/// after a flush, and FUA writes in flight together share one flush.
#[test]
fn qcow2_fua_over_a_base_without_cheap_fua_is_write_then_shared_flush() {
    let rt = runtime(2);
    let h = rt.handle();
    for r in [0usize, 1] {
        let (q, log) = recorded_image_with(&h, &format!("nocheap{r}"), false);
        for i in 0..8 {
            assert_eq!(
                io_on(&h, r, &q, IoType::Write, i * CS, true),
                IoStatus::Success
            );
        }
        take(&log);
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, 3 * CS, true),
            IoStatus::Success
        );
        let l = take(&log);
        assert!(
            l.iter().all(|e| !matches!(e, Ev::Done { fua: true, .. })),
            "reactor {r}: FUA passed down to a base without cheap FUA: {l:?}"
        );
        assert_eq!(not_durable(&l), vec![], "reactor {r}: {l:?}");
        assert_eq!(flushes(&l), 1, "reactor {r}: {l:?}");
        // Eight FUA writes to mapped clusters at once: fewer flushes than writes.
        let q2 = q.clone();
        let st = h
            .spawn_on(r, move || async move {
                let ch = channel(&q2).expect("channel");
                let mut futs = Vec::new();
                for i in 0..8u64 {
                    let buf = DmaBuf::from_slice(&[0x5au8; CS as usize]).unwrap();
                    let mut io = BdevIo::new(IoType::Write, i * CS, CS, Some(buf), None);
                    io.fua = true;
                    futs.push(submit_wait(&ch, io));
                }
                let done = futures::future::join_all(futs).await;
                done.into_iter().map(|io| io.status).collect::<Vec<_>>()
            })
            .block()
            .expect("join");
        assert!(st.iter().all(|s| *s == IoStatus::Success), "{st:?}");
        let l = take(&log);
        assert_eq!(not_durable(&l), vec![], "reactor {r}: {l:?}");
        assert!(
            flushes(&l) <= 3,
            "reactor {r}: 8 FUA writes, {} flushes: {l:?}",
            flushes(&l)
        );
    }
}

#[test]
fn qcow2_fua_write_zeroes_and_discard_are_durable_on_completion() {
    let rt = runtime(2);
    let h = rt.handle();
    let (q, log) = recorded_image(&h, "zero");
    for (i, t) in [IoType::WriteZeroes, IoType::Unmap].into_iter().enumerate() {
        let off = (10 + i as u64) * CS;
        assert_eq!(
            io_on(&h, 1, &q, IoType::Write, off, false),
            IoStatus::Success
        );
        take(&log);
        assert_eq!(io_on(&h, 1, &q, t, off, true), IoStatus::Success);
        let l = take(&log);
        assert!(
            writes(&l) >= 1,
            "{t:?}: the L2 entry was not written: {l:?}"
        );
        assert_eq!(not_durable(&l), vec![], "{t:?}: {l:?}");
    }
}

fn fake_nvme() -> FakeThread {
    // SAFETY: the driver allocates everything it hands the controller through an
    // IdentityDma and the controller thread is stopped (FakeThread drop) before
    // the test's runtime and memory go away.
    unsafe {
        FakeNvme::new(FakeConfig {
            namespaces: vec![128 * 1024],
            ..FakeConfig::default()
        })
    }
    .spawn()
}

/// Commands of `log` that are not durable at its end: writes without FUA
/// not followed by a Flush (the fake executes commands in order).
fn nvme_not_durable(log: &[LoggedCmd]) -> Vec<LoggedCmd> {
    let mut pending = Vec::new();
    for c in log {
        match c.opc {
            nvm::FLUSH => pending.clear(),
            nvm::WRITE | nvm::WRITE_ZEROES | nvm::DSM if !c.fua => pending.push(*c),
            _ => {}
        }
    }
    pending
}

#[test]
fn qcow2_over_nvme_fua() {
    let rt = runtime(2);
    let h = rt.handle();
    let f = fake_nvme();
    let regs: Arc<dyn RegisterIo> = f.regs();
    let dma: Arc<dyn DmaSpace> = Arc::new(IdentityDma::new());
    let nv = nvme::NvmeControllers::new(h.clone());
    let names = nv
        .attach_with(
            registry(),
            "FuaN",
            "fake",
            regs,
            dma,
            CtrlrOpts::default(),
            None,
        )
        .expect("attach");
    let ns = registry().get(&names[0]).expect("namespace");
    let nsb = ns.clone();
    let q: Arc<dyn Bdev> = h
        .spawn_on(0, move || async move {
            qcow2::create(nsb.clone(), &CreateOptions::new(32 << 20)).await?;
            let opts = OpenOptions {
                backing: BackingSpec::None,
                ..OpenOptions::default()
            };
            Qcow2Bdev::open("fua_nvme_q", nsb, opts).await
        })
        .block()
        .expect("join")
        .expect("open image on NVMe");
    let faults = f.faults();
    let take_log = || std::mem::take(&mut *faults.log.lock().unwrap());
    faults.log_io.store(true, Ordering::SeqCst);
    for r in [0usize, 1] {
        let off = (4 + 8 * r as u64) * CS;
        take_log();
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, off, true),
            IoStatus::Success
        );
        let l = take_log();
        assert!(l.iter().any(|c| c.opc == nvm::FLUSH), "reactor {r}: {l:?}");
        assert_eq!(nvme_not_durable(&l), vec![], "reactor {r}: {l:?}");
        // Mapped and durable: one Write command per transfer, all with FUA.
        assert_eq!(
            io_on(&h, r, &q, IoType::Write, off, true),
            IoStatus::Success
        );
        let l = take_log();
        assert!(
            !l.is_empty() && l.iter().all(|c| c.opc == nvm::WRITE && c.fua),
            "reactor {r}: {l:?}"
        );
    }
    // Straight to the namespace: Write Zeroes with the FUA bit, and a discard
    // (no FUA bit in Dataset Management) followed by a Flush.
    take_log();
    assert_eq!(
        io_on(&h, 0, &ns, IoType::WriteZeroes, 64 * CS, true),
        IoStatus::Success
    );
    let l = take_log();
    assert!(
        !l.is_empty() && l.iter().all(|c| c.opc == nvm::WRITE_ZEROES && c.fua),
        "{l:?}"
    );
    assert_eq!(
        io_on(&h, 1, &ns, IoType::Unmap, 64 * CS, true),
        IoStatus::Success
    );
    let l = take_log();
    assert_eq!(
        l.iter().map(|c| c.opc).collect::<Vec<_>>(),
        vec![nvm::DSM, nvm::FLUSH],
        "{l:?}"
    );
    // Without FUA: no bit, no flush.
    assert_eq!(
        io_on(&h, 0, &ns, IoType::Unmap, 64 * CS, false),
        IoStatus::Success
    );
    assert_eq!(
        take_log().iter().map(|c| c.opc).collect::<Vec<_>>(),
        vec![nvm::DSM]
    );
    faults.log_io.store(false, Ordering::SeqCst);
    drop(q);
    let _ = nv.detach(registry(), "FuaN");
}

#[test]
fn malloc_and_null_complete_fua_requests() {
    let rt = runtime(1);
    let h = rt.handle();
    let m: Arc<dyn Bdev> = MallocBdev::new("fua_malloc", 4096, 512, None).expect("malloc");
    let n: Arc<dyn Bdev> = NullBdev::new("fua_null", 4096, 512, None).expect("null");
    for b in [&m, &n] {
        for t in [IoType::Write, IoType::WriteZeroes, IoType::Unmap] {
            assert_eq!(
                io_on(&h, 0, b, t, 0, true),
                IoStatus::Success,
                "{} {t:?}",
                b.name()
            );
        }
    }
    assert_eq!(io_on(&h, 0, &m, IoType::Write, CS, true), IoStatus::Success);
    let mb = m.clone();
    let data = h
        .spawn_on(0, move || async move {
            let ch = channel(&mb).unwrap();
            read_at(&ch, CS, CS as usize)
                .await
                .unwrap()
                .as_slice()
                .to_vec()
        })
        .block()
        .unwrap();
    assert!(data.iter().all(|&x| x == 0x5a));
}
