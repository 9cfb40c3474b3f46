//! Fuzzed headers and tables (proptest): parsing never panics, and opening,
//! reading and writing a damaged image either works or fails cleanly.

mod qcow2_common;

use bdev::qcow2::format::{Header, L2Entry};
use bdev::qcow2::{BackingSpec, OpenOptions, Qcow2Bdev};
use bdev::{channel, read_at, write_at, Bdev, DmaBuf};
use proptest::prelude::*;
use qcow2_common::*;
use std::sync::{Arc, OnceLock};

fn template() -> &'static Vec<u8> {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let d = scratch("fuzz");
        let p = d.join("t.qcow2");
        qemu_img_create(&p, "2M", &["-o", "cluster_size=4096"]);
        qemu_io(
            &p,
            &[
                "write -P 0x21 0 40k",
                "write -z 64k 8k",
                "write -P 0x22 1m 12k",
            ],
        );
        std::fs::read(&p).unwrap()
    })
}

fn rt() -> &'static reactor::RuntimeHandle {
    static R: OnceLock<reactor::RuntimeHandle> = OnceLock::new();
    R.get_or_init(|| {
        let rt = runtime(1);
        let h = rt.handle();
        std::mem::forget(rt);
        h
    })
}

/// Opens `img` from a RAM bdev, then reads everything and writes a little.
fn exercise(img: Vec<u8>) {
    let h = rt();
    let r = h
        .spawn_on(0, move || async move {
            let blocks = (img.len() as u64).div_ceil(512) + 4096;
            let m = bdev::malloc::MallocBdev::new("fuzz-base", blocks, 512, None).unwrap();
            let base: Arc<dyn Bdev> = m;
            let bch = channel(&base).unwrap();
            let mut padded = img.clone();
            padded.resize(img.len().next_multiple_of(512), 0);
            write_at(&bch, 0, DmaBuf::from_slice(&padded).unwrap())
                .await
                .unwrap();
            let opts = OpenOptions {
                backing: BackingSpec::None,
                ..OpenOptions::default()
            };
            if let Ok(q) = Qcow2Bdev::open("fuzz", base.clone(), opts).await {
                let b: Arc<dyn Bdev> = q.clone();
                let ch = channel(&b).unwrap();
                let size = b.size().min(4 << 20);
                let mut off = 0;
                while off < size {
                    let n = (64u64 << 10).min(size - off);
                    let _ = read_at(&ch, off, n as usize).await;
                    off += n;
                }
                let _ = write_at(&ch, 0, DmaBuf::new(4096).unwrap()).await;
                let _ = write_at(&ch, 8192, DmaBuf::new(512).unwrap()).await;
                let _ = q.flush().await;
                let _ = q.block_status(0, size.max(1), None).await;
                bdev::drop_cached_channels(&b);
            }
            bdev::drop_cached_channels(&base);
        })
        .block();
    assert!(r.is_ok(), "the engine task died: {r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: soak(256) as u32, ..ProptestConfig::default() })]

    #[test]
    fn header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024), len in any::<u64>()) {
        let _ = Header::parse(&bytes, len);
    }

    #[test]
    fn header_field_mutations_never_panic(pos in 0usize..160, val in any::<u8>(), len in 0u64..(1 << 24)) {
        let mut b = template()[..4096].to_vec();
        b[pos] = val;
        if let Ok(h) = Header::parse(&b, len) {
            let _ = h.to_cluster();
        }
    }

    #[test]
    fn l2_entries_decode(e in any::<u64>(), bits in 9u32..=21, v in 2u32..=3) {
        let _ = L2Entry(e).decode(v, bits);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: soak(48) as u32, ..ProptestConfig::default() })]

    #[test]
    fn damaged_tables_fail_cleanly(flips in proptest::collection::vec((0usize..0x9000, any::<u8>()), 1..12)) {
        let mut img = template().clone();
        for (pos, val) in flips {
            if pos < img.len() {
                img[pos] = val;
            }
        }
        exercise(img);
    }

    #[test]
    fn damaged_table_words_fail_cleanly(word in 0usize..(0x9000 / 8), val in prop_oneof![any::<u64>(), Just(0u64), Just(1u64 << 63), (0u64..64).prop_map(|c| (1u64 << 63) | (c * 4096))]) {
        let mut img = template().clone();
        let p = word * 8;
        if p + 8 <= img.len() {
            img[p..p + 8].copy_from_slice(&val.to_be_bytes());
        }
        exercise(img);
    }
}
