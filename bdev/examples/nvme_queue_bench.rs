//! CPU cost of the NVMe queue pair per I/O: submit (command build, PRPs, SQ
//! entry) plus complete (phase-bit poll, CQ entry, request hand-back), with the
//! doorbells written once per batch, measured in TSC ticks. The controller is
//! the software one, stepped between the two timed halves so its own work is
//! not counted. Run: `cargo run --release -p bdev --example nvme_queue_bench [IOS] [BATCH] [SIZE]`.

use bdev::dma::DmaBuf;
use bdev::nvme::fake::{inline_queue_pair, FakeConfig, FakeNvme};
use bdev::nvme::mem::IdentityDma;
use bdev::nvme::queue::{NsParams, QueueConfig};
use bdev::{BdevIo, IoStatus};
use std::sync::Arc;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let total = args.first().copied().unwrap_or(2_000_000);
    let batch = args.get(1).copied().unwrap_or(32) as usize;
    let size = args.get(2).copied().unwrap_or(4096) as usize;
    // SAFETY: every address the queue pair hands the controller is memory it or
    // this program allocated, alive while the controller is stepped here.
    let mut fake = unsafe {
        FakeNvme::new(FakeConfig {
            namespaces: vec![1 << 20],
            lba_shift: 9,
            ..FakeConfig::default()
        })
    };
    let cfg = QueueConfig {
        qid: 1,
        entries: 256,
        doorbell_stride: 4,
        max_xfer: 128 << 10,
        bounce_pages: 0,
        timeout_ticks: 0,
    };
    let (_admin, mut qp) =
        inline_queue_pair(&mut fake, Arc::new(IdentityDma::all_memory()), cfg).expect("queue pair");
    let ns = NsParams {
        nsid: 1,
        lba_shift: 9,
        max_zeroes_blocks: 65536,
    };
    let mut ios: Vec<Box<BdevIo>> = (0..batch)
        .map(|i| BdevIo::read((i * size) as u64, DmaBuf::new(size).unwrap(), None))
        .collect();
    let mut done = Vec::with_capacity(batch);
    let hz = reactor::ticks_hz();
    let (mut submit_ticks, mut complete_ticks, mut n) = (0u64, 0u64, 0u64);
    let mut round = 0u64;
    while n < total {
        let t0 = reactor::ticks();
        for io in ios.drain(..) {
            if qp.submit_io(io, &ns, t0).is_err() {
                panic!("queue full");
            }
        }
        qp.ring();
        let t1 = reactor::ticks();
        fake.step();
        let t2 = reactor::ticks();
        qp.process_completions(usize::MAX);
        qp.take_done(&mut done);
        for mut io in done.drain(..) {
            // What a bdev user's completion does at least: look at the status.
            if io.status != IoStatus::Success {
                panic!("I/O failed: {}", io.status);
            }
            io.status = IoStatus::Pending;
            ios.push(io);
        }
        let t3 = reactor::ticks();
        // The first rounds warm caches and branch predictors.
        if round >= 100 {
            submit_ticks += t1 - t0;
            complete_ticks += t3 - t2;
            n += batch as u64;
        }
        round += 1;
    }
    let per = |t: u64| t as f64 / n as f64;
    println!(
        "nvme queue pair: {n} x {size} B reads, batch {batch}: submit {:.0} + complete {:.0} = {:.0} TSC ticks per I/O ({:.1} ns at {:.2} GHz TSC); SPDK's budget is about 400 cycles",
        per(submit_ticks),
        per(complete_ticks),
        per(submit_ticks + complete_ticks),
        per(submit_ticks + complete_ticks) * 1e9 / hz as f64,
        hz as f64 / 1e9
    );
}
