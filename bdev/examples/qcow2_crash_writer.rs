//! Crash-test writer: opens a qcow2 image read-write and, generation after
//! generation, writes 4 KiB blocks (16 at once, several per cluster) and then
//! flushes; after each completed flush it prints `flushed GEN`. The crash test
//! kills it with SIGKILL at a random moment and checks the image.
//!
//! Usage: qcow2_crash_writer IMAGE SEED FIRST_GEN

#[path = "../tests/qcow2_common/crash_gen.rs"]
mod crash_gen;

use bdev::qcow2::{open_file, OpenOptions};
use bdev::{channel, simple_io, submit_wait, Bdev, BdevIo, DmaBuf, IoType};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use crash_gen::blocks_of;

fn payload(block: u64, gen: u64) -> Vec<u8> {
    let mut d = vec![((block * 31 + gen * 7) % 251) as u8 | 1; 4096];
    d[..8].copy_from_slice(b"SLUICEv1");
    d[8..16].copy_from_slice(&block.to_le_bytes());
    d[16..24].copy_from_slice(&gen.to_le_bytes());
    d
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: {} IMAGE SEED FIRST_GEN", args[0]);
        std::process::exit(2);
    }
    let path = PathBuf::from(&args[1]);
    let seed: u64 = args[2].parse().expect("seed");
    let first: u64 = args[3].parse().expect("first generation");
    let mut cfg = RuntimeConfig::new(CoreSet::from_list("0").expect("cores"));
    cfg.pin = false;
    let rt = Runtime::start(cfg).expect("runtime");
    let r = rt
        .handle()
        .spawn_on(0, move || async move {
            let q = open_file(
                "crash",
                &path,
                OpenOptions {
                    direct: false,
                    ..OpenOptions::default()
                },
            )
            .await?;
            let b: Arc<dyn Bdev> = q;
            let ch = channel(&b)?;
            let nblocks = b.size() / 4096;
            for gen in first.. {
                let futs = blocks_of(seed, gen, nblocks).into_iter().map(|blk| {
                    let ch = ch.clone();
                    async move {
                        let io = BdevIo::write(
                            blk * 4096,
                            DmaBuf::from_slice(&payload(blk, gen)).expect("buf"),
                            None,
                        );
                        submit_wait(&ch, io).await.status
                    }
                });
                for st in futures::future::join_all(futs).await {
                    if !st.is_ok() {
                        return Err(bdev::BdevError::Io(st));
                    }
                }
                let st = simple_io(&ch, IoType::Flush, 0, 0).await;
                if !st.is_ok() {
                    return Err(bdev::BdevError::Io(st));
                }
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "flushed {gen}");
                let _ = out.flush();
            }
            Ok::<(), bdev::BdevError>(())
        })
        .block();
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
