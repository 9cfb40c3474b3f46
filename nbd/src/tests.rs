//! In-process tests of the NBD server with real clients (nbdinfo, qemu-img,
//! fio): allocation maps from `range_status`, and an export of a device whose
//! root is switched under client I/O.

use super::{ExportConfig, ListenAddr, NbdServer, StartOptions};
use bdev::{Bdev, BdevError, BdevIo, Channel, IoStatus, IoType, RangeStatus, RangeStatusFuture};
use reactor::{CoreSet, Runtime, RuntimeConfig};
use std::any::Any;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// This test process's registry (a service's graph owns one).
fn registry() -> &'static Arc<bdev::Registry> {
    static R: std::sync::OnceLock<Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

const MIB: u64 = 1 << 20;

/// A RAM bdev whose second MiB is a hole (unallocated, reads as zeroes).
struct HoleyBdev {
    name: String,
    data: Arc<Mutex<Vec<u8>>>,
}

struct HoleyChannel(Arc<Mutex<Vec<u8>>>);

impl Bdev for HoleyBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "holey test disk"
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        4 * MIB / 512
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Write)
    }
    fn create_channel(&self) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(HoleyChannel(self.data.clone())))
    }
    fn range_status(&self, offset: u64, len: u64) -> Option<RangeStatusFuture> {
        let st = if offset < MIB {
            RangeStatus {
                len: (MIB - offset).min(len),
                allocated: true,
                zero: false,
            }
        } else if offset < 2 * MIB {
            RangeStatus {
                len: (2 * MIB - offset).min(len),
                allocated: false,
                zero: true,
            }
        } else {
            RangeStatus {
                len,
                allocated: true,
                zero: false,
            }
        };
        Some(Box::pin(async move { Ok(st) }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Channel for HoleyChannel {
    fn submit(&self, mut io: Box<BdevIo>) -> Result<(), Box<BdevIo>> {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_empty() {
            d.resize((4 * MIB) as usize, 0);
        }
        let (o, l) = (io.offset as usize, io.len as usize);
        match io.io_type {
            IoType::Read => io.copy_in(0, &d[o..o + l]),
            IoType::Write => io.copy_out(0, &mut d[o..o + l]),
            _ => {}
        }
        drop(d);
        bdev::complete_deferred(io, IoStatus::Success);
        Ok(())
    }
}

static N: AtomicU32 = AtomicU32::new(0);

fn tmpdir(tag: &str) -> PathBuf {
    let p = PathBuf::from(format!(
        "/tmp/sl-nbdut-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

fn runtime(cores: &str) -> Runtime {
    let mut cfg = RuntimeConfig::new(CoreSet::from_list(cores).expect("cores"));
    cfg.pin = false;
    Runtime::start(cfg).expect("runtime")
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

#[test]
fn map_reports_holes_from_range_status() {
    if !have("nbdinfo") {
        eprintln!("nbdinfo missing (apt-get install libnbd-bin); skipping");
        return;
    }
    let rt = runtime("0");
    let dir = tmpdir("map");
    let name = format!("holey{}", N.fetch_add(1, Ordering::Relaxed));
    registry()
        .register(Arc::new(HoleyBdev {
            name: name.clone(),
            data: Arc::new(Mutex::new(Vec::new())),
        }))
        .expect("register");
    let srv = NbdServer::default();
    let sock = dir.join("n.sock");
    srv.start(
        &rt.handle(),
        None,
        &[ListenAddr::Unix(sock.clone())],
        StartOptions::default(),
    )
    .expect("start");
    let cfg = ExportConfig {
        id: name.clone(),
        node: name.clone(),
        name: name.clone(),
        description: "holes".into(),
        writable: false,
        writethrough: false,
    };
    srv.add_export(registry(), cfg).expect("export");
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    let map = run("nbdinfo", &["--map", &uri]);
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 3, "{map}");
    assert_eq!(rows[0][..3], ["0", "1048576", "0"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "1048576", "3"], "{map}");
    assert_eq!(rows[2][..3], ["2097152", "2097152", "0"], "{map}");
    let j = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let v: serde_json::Value = serde_json::from_str(&j).expect("qemu-img map json");
    let hole = v
        .as_array()
        .and_then(|a| a.iter().find(|e| e["start"] == 1048576))
        .expect("hole extent");
    assert_eq!(hole["data"], false, "{j}");
    assert_eq!(hole["zero"], true, "{j}");
    // The claim keeps the bdev while exported, and goes with the export.
    assert!(registry().unregister(&name).is_err());
    // The client has exited; the server notices its hang-up asynchronously,
    // and a safe delete gives it that moment instead of failing.
    srv.del_export(&name, false).expect("del");
    assert!(srv.exports().is_empty());
    srv.shutdown(std::time::Duration::from_secs(2));
    assert!(!sock.exists(), "socket file removed on stop");
    registry()
        .unregister(&name)
        .expect("unclaimed after export removal");
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

/// Copies `from` to `to` on reactor 0, 1 MiB at a time.
fn copy(rt: &reactor::RuntimeHandle, from: Arc<dyn Bdev>, to: Arc<dyn Bdev>) {
    rt.spawn_on(0, move || async move {
        let a = bdev::channel(&from).expect("channel");
        let b = bdev::channel(&to).expect("channel");
        let mut off = 0;
        while off < from.size() {
            let buf = bdev::read_at(&a, off, MIB as usize).await.expect("read");
            bdev::write_at(&b, off, buf).await.expect("write");
            off += MIB;
        }
    })
    .block()
    .expect("copy");
}

#[test]
fn export_follows_device_root_switches_under_io() {
    if !have("fio") {
        eprintln!("fio missing; skipping");
        return;
    }
    let rt = runtime("0,1");
    let h = rt.handle();
    let dir = tmpdir("dev");
    let k = N.fetch_add(1, Ordering::Relaxed);
    let roots: Vec<Arc<dyn Bdev>> = (0..2)
        .map(|i| {
            let b: Arc<dyn Bdev> = bdev::malloc::MallocBdev::new(
                &format!("devroot{k}_{i}"),
                32 * MIB / 512,
                512,
                None,
            )
            .expect("malloc");
            registry().register(b.clone()).expect("register");
            b
        })
        .collect();
    let dev = bdev::device::Device::new(registry(), &format!("dev{k}"), roots[0].clone())
        .expect("device");
    let dev_bdev: Arc<dyn Bdev> = dev.clone();
    registry()
        .register(dev_bdev.clone())
        .expect("register device");
    let srv = NbdServer::default();
    let sock = dir.join("n.sock");
    srv.start(
        &h,
        None,
        &[ListenAddr::Unix(sock.clone())],
        StartOptions::default(),
    )
    .expect("start");
    let name = dev_bdev.name().to_string();
    srv.add_export(
        registry(),
        ExportConfig {
            id: name.clone(),
            node: name.clone(),
            name: name.clone(),
            description: String::new(),
            writable: true,
            writethrough: false,
        },
    )
    .expect("export");
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    // fio writes with checksums and verifies them as it goes (and at the end),
    // over two connections, while the device's root is switched under it.
    let mut fio = Command::new("fio")
        .args([
            "--name=follow",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=64M",
            "--verify=crc32c",
            "--verify_backlog=256",
            "--do_verify=1",
            "--verify_state_save=0",
            "--numjobs=1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio");
    let mut switches = 0;
    let mut cur = 0;
    while fio.try_wait().expect("wait").is_none() && switches < 20 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        let next = 1 - cur;
        let d = dev.clone();
        let (from, to) = (roots[cur].clone(), roots[next].clone());
        let h2 = h.clone();
        futures::executor::block_on(d.quiesce(&h2)).expect("quiesce");
        copy(&h2, from, to.clone());
        futures::executor::block_on(d.swap_root(&h2, to)).expect("swap");
        futures::executor::block_on(d.resume(&h2));
        cur = next;
        switches += 1;
    }
    let out = fio.wait_with_output().expect("fio output");
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed:\n{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("err= 0"), "{so}");
    assert!(
        switches >= 2,
        "fio finished before the root could be switched twice"
    );
    assert_eq!(dev.root().name(), roots[cur].name());
    srv.shutdown(std::time::Duration::from_secs(2));
    rt.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
