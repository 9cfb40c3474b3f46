//! scripts/setup.sh against a fake sysfs/procfs tree: hugepage reservation,
//! refusal of a device with a mounted filesystem, the no-IOMMU message,
//! PCI_BLOCKED, the driver_override binding steps, and `status`. (The real
//! binding and `reset` are exercised in the guest by scripts/vm/run.sh.)

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

const BDF: &str = "0000:00:04.0";

fn tree(name: &str, mounted: bool, iommu: bool) -> PathBuf {
    let root = std::env::temp_dir().join(format!("sluice-setup-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let sys = root.join("sys");
    let proc_ = root.join("proc");
    let dev = sys.join("bus/pci/devices").join(BDF);
    fs::create_dir_all(dev.join("nvme/nvme0/nvme0n1")).unwrap();
    fs::create_dir_all(sys.join("bus/pci/drivers/nvme")).unwrap();
    fs::create_dir_all(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
    fs::create_dir_all(sys.join("class/block/nvme0n1/holders")).unwrap();
    symlink(sys.join("bus/pci/drivers/nvme"), dev.join("driver")).unwrap();
    fs::write(dev.join("class"), "0x010802\n").unwrap();
    fs::write(dev.join("vendor"), "0x1b36\n").unwrap();
    fs::write(dev.join("device"), "0x0010\n").unwrap();
    fs::write(dev.join("driver_override"), "(null)\n").unwrap();
    let other = sys.join("bus/pci/devices/0000:00:03.0");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("class"), "0x020000\n").unwrap();
    if iommu {
        fs::create_dir_all(sys.join("kernel/iommu_groups/1")).unwrap();
        symlink(sys.join("kernel/iommu_groups/1"), dev.join("iommu_group")).unwrap();
    }
    fs::create_dir_all(proc_.join("sys/vm")).unwrap();
    fs::write(proc_.join("sys/vm/nr_hugepages"), "0\n").unwrap();
    fs::write(
        proc_.join("meminfo"),
        "MemTotal: 1000000 kB\nHugePages_Total: 0\nHugePages_Free: 0\nHugepagesize: 2048 kB\n",
    )
    .unwrap();
    let mounts = if mounted {
        "/dev/nvme0n1 /mnt ext4 rw 0 0\n"
    } else {
        "proc /proc proc rw 0 0\n"
    };
    fs::write(proc_.join("mounts"), mounts).unwrap();
    fs::write(proc_.join("swaps"), "Filename Type Size Used Priority\n").unwrap();
    root
}

fn setup(root: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup.sh");
    let mut c = Command::new("sh");
    c.arg(script)
        .args(args)
        .env("SYSFS", root.join("sys"))
        .env("PROCFS", root.join("proc"));
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn override_of(root: &Path) -> String {
    fs::read_to_string(
        root.join("sys/bus/pci/devices")
            .join(BDF)
            .join("driver_override"),
    )
    .unwrap()
}

#[test]
fn a_mounted_device_is_refused_and_hugepages_reserved() {
    let root = tree("mounted", true, true);
    let (rc, out) = setup(&root, &["config"], &[("HUGEMEM", "128")]);
    assert_eq!(rc, 2, "{out}");
    assert!(
        out.contains("in use (mount@nvme0n1), not binding it to vfio-pci"),
        "{out}"
    );
    assert_eq!(override_of(&root), "(null)\n", "driver_override untouched");
    assert_eq!(
        fs::read_to_string(root.join("proc/sys/vm/nr_hugepages"))
            .unwrap()
            .trim(),
        "64"
    );
    let _ = fs::remove_dir_all(root);
}

#[test]
fn no_iommu_is_said_clearly() {
    let root = tree("noiommu", false, false);
    let (rc, out) = setup(&root, &[], &[("HUGEMEM", "2")]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("no IOMMU") && out.contains("intel_iommu=on"),
        "{out}"
    );
    let (rc, out) = setup(&root, &["status"], &[]);
    assert_eq!(rc, 0);
    assert!(out.contains("IOMMU: off"), "{out}");
    let _ = fs::remove_dir_all(root);
}

#[test]
fn blocked_devices_are_skipped_and_binding_uses_driver_override() {
    let root = tree("bind", false, true);
    let (rc, out) = setup(
        &root,
        &["config"],
        &[("HUGEMEM", "2"), ("PCI_BLOCKED", "00:04.0")],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("0000:00:04.0: skipped"), "{out}");
    let (rc, out) = setup(&root, &["status"], &[]);
    assert_eq!(rc, 0);
    assert!(
        out.contains(BDF) && out.contains("nvme ") && out.contains("nvme0n1"),
        "{out}"
    );
    // Allowed: driver_override is set, the device unbound and reprobed. The fake
    // tree has no kernel behind it, so the driver stays and the script says so.
    let (rc, out) = setup(
        &root,
        &["config"],
        &[("HUGEMEM", "2"), ("PCI_ALLOWED", BDF)],
    );
    assert_eq!(rc, 1, "{out}");
    assert_eq!(override_of(&root), "vfio-pci\n");
    let unbind = fs::read_to_string(root.join("sys/bus/pci/drivers/nvme/unbind")).unwrap();
    assert_eq!(unbind.trim(), BDF);
    assert_eq!(
        fs::read_to_string(root.join("sys/bus/pci/drivers_probe"))
            .unwrap()
            .trim(),
        BDF
    );
    assert!(
        out.contains("binding to vfio-pci failed (driver is now 'nvme')"),
        "{out}"
    );
    let (rc, out) = setup(&root, &["bogus"], &[]);
    assert_eq!(rc, 1);
    assert!(out.contains("unknown command 'bogus'"), "{out}");
    let _ = fs::remove_dir_all(root);
}
