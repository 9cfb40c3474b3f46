//! The NVMe queue pair against the software controller, on one thread without
//! reactors or VFIO: data round trips through PRP lists and splitting, bounce
//! buffers, phase wrap-around, doorbell batching, the non-data commands, device
//! errors and the timeout scan.

use bdev::dma::DmaBuf;
use bdev::nvme::fake::{inline_queue_pair, FakeConfig, FakeNvme};
use bdev::nvme::mem::{DmaSpace, IdentityDma};
use bdev::nvme::queue::{build, NsParams, QueueConfig, QueuePair, TimeoutAction};
use bdev::nvme::regs::RegisterIo;
use bdev::{BdevIo, IoStatus, IoType};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const NS: NsParams = NsParams {
    nsid: 1,
    lba_shift: 9,
    max_zeroes_blocks: 65536,
};

struct Rig {
    fake: FakeNvme,
    io: QueuePair,
    admin: QueuePair,
}

fn rig(entries: u16, dma: Arc<dyn DmaSpace>, blocks: u64) -> Rig {
    // SAFETY: the queue pairs allocate through an IdentityDma and live as long as
    // the controller is stepped (both are in the rig).
    let mut fake = unsafe {
        FakeNvme::new(FakeConfig {
            namespaces: vec![blocks],
            mdts: 5,
            ..FakeConfig::default()
        })
    };
    let cfg = QueueConfig {
        qid: 1,
        entries,
        doorbell_stride: 4,
        max_xfer: 4096 << 5,
        bounce_pages: 512,
        timeout_ticks: 0,
    };
    let (admin, io) = inline_queue_pair(&mut fake, dma, cfg).expect("queue pair");
    Rig { fake, io, admin }
}

impl Rig {
    /// Runs until every request has come back; returns them.
    #[allow(clippy::vec_box)]
    fn run(&mut self) -> Vec<Box<BdevIo>> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            self.io.ring();
            self.fake.step();
            self.io.process_completions(usize::MAX);
            self.io.take_done(&mut out);
            if self.io.inflight() == 0 {
                return out;
            }
        }
        panic!("requests never completed");
    }

    fn one(&mut self, io: Box<BdevIo>) -> Box<BdevIo> {
        self.io
            .submit_io(io, &NS, 0)
            .map_err(|_| "queue full")
            .unwrap();
        let mut v = self.run();
        assert_eq!(v.len(), 1);
        v.pop().unwrap()
    }

    fn disk(&self) -> Vec<u8> {
        self.fake.disks().lock().unwrap()[0].clone()
    }

    /// Another I/O queue pair on the same controller, through `regs`.
    fn extra_queue(
        &mut self,
        qid: u16,
        timeout_ticks: u64,
        regs: Arc<dyn RegisterIo>,
    ) -> QueuePair {
        let cfg = QueueConfig {
            qid,
            entries: 64,
            doorbell_stride: 4,
            max_xfer: 4096 << 5,
            bounce_pages: 0,
            timeout_ticks,
        };
        let qp = QueuePair::new(cfg, regs, Arc::new(IdentityDma::all_memory())).unwrap();
        for cmd in [
            build::create_cq(qid, 64, qp.cq_iova()),
            build::create_sq(qid, 64, qp.sq_iova()),
        ] {
            let cid = self.admin.submit_raw(cmd, 0).unwrap();
            self.admin.ring();
            self.fake.step();
            self.admin.process_completions(8);
            assert!(self.admin.take_raw(cid).unwrap().is_ok());
        }
        qp
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn write_read(r: &mut Rig, off: u64, len: usize, seed: u8) {
    let data = pattern(len, seed);
    let w = r.one(BdevIo::write(off, DmaBuf::from_slice(&data).unwrap(), None));
    assert_eq!(w.status, IoStatus::Success, "write {len} at {off}");
    assert_eq!(
        &r.disk()[off as usize..off as usize + len],
        &data[..],
        "device contents after write {len} at {off}"
    );
    let mut rd = r.one(BdevIo::read(off, DmaBuf::new(len).unwrap(), None));
    assert_eq!(rd.status, IoStatus::Success);
    assert_eq!(
        rd.take_buf().unwrap().as_slice(),
        &data[..],
        "read back {len} at {off}"
    );
}

#[test]
fn direct_transfers_of_every_shape_round_trip() {
    // Every address reachable: PRPs point straight at the request's buffers.
    let mut r = rig(64, Arc::new(IdentityDma::all_memory()), 16384);
    // One page, two pages (PRP2 is data), a PRP list, a split beyond MDTS (128 KiB).
    for (i, len) in [
        512usize,
        4096,
        8192,
        12288,
        65536,
        128 << 10,
        300 << 10,
        1 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        write_read(&mut r, (i as u64) * 4096 * 3, len, i as u8);
    }
}

#[test]
fn unreachable_and_misaligned_memory_goes_through_bounce_buffers() {
    // Only the driver's own regions are mapped (as with an IOMMU): heap buffers bounce.
    let mut r = rig(32, Arc::new(IdentityDma::new()), 16384);
    for (i, len) in [512usize, 4096, 20480, 256 << 10].into_iter().enumerate() {
        write_read(&mut r, i as u64 * 512 * 7, len, 7 + i as u8);
    }
    // A vectored request whose first segment does not end on a page boundary
    // cannot be expressed with PRPs even when reachable: it bounces too.
    let mut r = rig(32, Arc::new(IdentityDma::all_memory()), 16384);
    let a = DmaBuf::from_slice(&pattern(1024, 1)).unwrap();
    let b = DmaBuf::from_slice(&pattern(512, 2)).unwrap();
    let mut w = r.one(BdevIo::vectored(IoType::Write, 4096, vec![a, b], None));
    assert_eq!(w.status, IoStatus::Success);
    let [a, b] = <[DmaBuf; 2]>::try_from(w.take_bufs()).unwrap();
    let disk = r.disk();
    assert_eq!(&disk[4096..5120], a.as_slice());
    assert_eq!(&disk[5120..5632], b.as_slice());
    let mut ra = DmaBuf::new(512).unwrap();
    let mut rb = DmaBuf::new(1024).unwrap();
    ra.as_mut_slice().fill(0xee);
    rb.as_mut_slice().fill(0xee);
    let mut rd = r.one(BdevIo::vectored(IoType::Read, 4096, vec![ra, rb], None));
    assert_eq!(rd.status, IoStatus::Success);
    let [ra, rb] = <[DmaBuf; 2]>::try_from(rd.take_bufs()).unwrap();
    assert_eq!(ra.as_slice(), &disk[4096..4608]);
    assert_eq!(rb.as_slice(), &disk[4608..5632]);
}

#[test]
fn phase_bit_wraps_many_times_on_a_tiny_queue() {
    let mut r = rig(4, Arc::new(IdentityDma::all_memory()), 4096);
    for round in 0..200u64 {
        // Three in flight at once: the most a 4-entry queue holds.
        for k in 0..3u64 {
            let off = ((round * 3 + k) % 4096) * 512;
            let io = BdevIo::write(
                off,
                DmaBuf::from_slice(&[(round + k) as u8; 512]).unwrap(),
                None,
            );
            r.io.submit_io(io, &NS, 0).map_err(|_| "full").unwrap();
        }
        // A fourth does not fit and is handed back untouched.
        let extra = BdevIo::write(0, DmaBuf::new(512).unwrap(), None);
        let back =
            r.io.submit_io(extra, &NS, 0)
                .expect_err("queue must be full");
        assert_eq!(back.status, IoStatus::Pending);
        let done = r.run();
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|d| d.status == IoStatus::Success));
    }
    let disk = r.disk();
    let last = 199 * 3 + 2; // below 4096: no wrap of the offsets
    assert_eq!(disk[last * 512], (199 + 2) as u8);
}

struct CountingRegs {
    inner: Arc<dyn RegisterIo>,
    writes: AtomicU64,
}

impl RegisterIo for CountingRegs {
    fn read32(&self, off: usize) -> u32 {
        self.inner.read32(off)
    }
    fn write32(&self, off: usize, v: u32) {
        if off >= 0x1000 {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.write32(off, v)
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

#[test]
fn one_doorbell_write_per_batch() {
    let mut r = rig(64, Arc::new(IdentityDma::all_memory()), 4096);
    let counting = Arc::new(CountingRegs {
        inner: r.fake.regs(),
        writes: AtomicU64::new(0),
    });
    let mut qp = r.extra_queue(2, 0, counting.clone());
    for i in 0..16u64 {
        qp.submit_io(
            BdevIo::read(i * 512, DmaBuf::new(512).unwrap(), None),
            &NS,
            0,
        )
        .map_err(|_| "full")
        .unwrap();
    }
    assert_eq!(
        counting.writes.load(Ordering::Relaxed),
        0,
        "no doorbell before the batch is rung"
    );
    qp.ring();
    qp.ring();
    assert_eq!(
        counting.writes.load(Ordering::Relaxed),
        1,
        "one SQ tail write for 16 commands"
    );
    r.fake.step();
    assert_eq!(qp.process_completions(usize::MAX), 16);
    assert_eq!(
        counting.writes.load(Ordering::Relaxed),
        2,
        "one CQ head write for 16 completions"
    );
    let mut out = Vec::new();
    qp.take_done(&mut out);
    assert_eq!(out.len(), 16);
}

#[test]
fn flush_write_zeroes_unmap_and_device_errors() {
    let mut r = rig(64, Arc::new(IdentityDma::all_memory()), 300_000);
    let len = 200_000usize * 512; // beyond one Write Zeroes (65536 blocks): split
    r.fake.disks().lock().unwrap()[0].fill(0xab);
    let z = r.one(BdevIo::new(
        IoType::WriteZeroes,
        512,
        len as u64,
        None,
        None,
    ));
    assert_eq!(z.status, IoStatus::Success);
    let disk = r.disk();
    assert_eq!(disk[511], 0xab);
    assert!(disk[512..512 + len].iter().all(|&b| b == 0));
    assert_eq!(disk[512 + len], 0xab);
    r.fake.disks().lock().unwrap()[0].fill(0xcd);
    let u = r.one(BdevIo::new(IoType::Unmap, 4096, 8192, None, None));
    assert_eq!(u.status, IoStatus::Success);
    let disk = r.disk();
    assert!(disk[4096..12288].iter().all(|&b| b == 0) && disk[4095] == 0xcd && disk[12288] == 0xcd);
    assert_eq!(
        r.one(BdevIo::new(IoType::Flush, 0, 0, None, None)).status,
        IoStatus::Success
    );
    // Past the end of the namespace: the device answers LBA Out of Range.
    let end = 300_000u64 * 512;
    let past = r.one(BdevIo::read(end - 512, DmaBuf::new(1024).unwrap(), None));
    assert_eq!(past.status, IoStatus::Einval);
    // Misaligned to the block size: refused without reaching the device.
    let before = r.fake.faults().io_commands.load(Ordering::Relaxed);
    let bad = r.one(BdevIo::read(100, DmaBuf::new(512).unwrap(), None));
    assert_eq!(bad.status, IoStatus::Einval);
    assert_eq!(r.fake.faults().io_commands.load(Ordering::Relaxed), before);
    // Write Zeroes unsupported by the namespace: reported, not sent.
    let no_wz = NsParams {
        max_zeroes_blocks: 0,
        ..NS
    };
    r.io.submit_io(
        BdevIo::new(IoType::WriteZeroes, 0, 512, None, None),
        &no_wz,
        0,
    )
    .map_err(|_| "full")
    .unwrap();
    let v = r.run();
    assert_eq!(v[0].status, IoStatus::Unsupported);
}

#[test]
fn timeouts_ask_for_abort_then_reset_and_reset_takes_requests_back() {
    let mut r = rig(16, Arc::new(IdentityDma::all_memory()), 4096);
    let regs: Arc<dyn RegisterIo> = r.fake.regs();
    let mut q = r.extra_queue(3, 1000, regs);
    r.fake.faults().hold_next.store(2, Ordering::Relaxed);
    for i in 0..2u64 {
        q.submit_io(
            BdevIo::read(i * 512, DmaBuf::new(512).unwrap(), None),
            &NS,
            10_000,
        )
        .map_err(|_| "full")
        .unwrap();
    }
    q.ring();
    r.fake.step();
    assert_eq!(
        q.process_completions(16),
        0,
        "held commands do not complete"
    );
    let mut acts = Vec::new();
    q.check_timeouts(10_500, &mut acts);
    assert!(acts.is_empty(), "not timed out yet");
    q.check_timeouts(11_100, &mut acts);
    assert_eq!(acts.len(), 2);
    assert!(matches!(acts[0], TimeoutAction::Abort { sqid: 3, .. }));
    acts.clear();
    q.check_timeouts(12_200, &mut acts);
    assert_eq!(acts, vec![TimeoutAction::Reset]);
    let mut back = Vec::new();
    q.reset_rings(&mut back);
    assert_eq!(back.len(), 2, "outstanding requests come back for a retry");
    assert!(back
        .iter()
        .all(|(io, ns)| io.status == IoStatus::Pending && ns.nsid == 1));
    assert_eq!(q.inflight(), 0);
    assert_eq!(q.free_slots(), 63);
}

#[test]
fn arena_buffers_are_mapped_once_and_reach_the_device_directly() {
    let dma = Arc::new(IdentityDma::new());
    let buf = DmaBuf::new(8192).unwrap();
    assert!(
        dma.translate(buf.as_ptr(), 8192).is_none(),
        "nothing mapped yet"
    );
    bdev::nvme::mem::follow_arena(&dma);
    assert_eq!(
        dma.translate(buf.as_ptr(), 8192),
        Some(buf.as_ptr() as u64),
        "arena regions are mapped"
    );
    let mut r = rig(32, dma.clone(), 4096);
    write_read(&mut r, 0, 64 << 10, 3);
    let heap = vec![0u8; 4096];
    assert!(
        dma.translate(heap.as_ptr(), 4096).is_none(),
        "ordinary heap memory is not"
    );
}
