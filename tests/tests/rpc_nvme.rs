//! The `bdev_nvme_*` methods on the real daemon without an NVMe device: the
//! controller table and the options live in the service (`svc.nvme`); empty
//! listings, option validation and SPDK's error codes for unknown controllers
//! and bad addresses. (Attach / I/O / detach on a device: `vm_nvme.rs`.)

use serde_json::json;
use sluice_tests::Daemon;

#[test]
fn nvme_methods_without_a_device() {
    let mut d = Daemon::start(&[]);
    assert_eq!(d.call("bdev_nvme_get_controllers", json!({})), json!([]));
    let e = d.call_err("bdev_nvme_get_controllers", json!({"name": "X"}));
    assert_eq!(e["code"], -19, "{e}");
    assert_eq!(e["message"], "no NVMe controller named \"X\"", "{e}");
    assert_eq!(
        d.call(
            "bdev_nvme_set_options",
            json!({"timeout_us": 5_000_000, "io_queue_requests": 64})
        ),
        json!(true)
    );
    let e = d.call_err("bdev_nvme_set_options", json!({"io_queue_requests": 1}));
    assert_eq!(e["code"], -32602, "{e}");
    assert_eq!(e["message"], "io_queue_requests must be within 2..=65535");
    let e = d.call_err(
        "bdev_nvme_set_options",
        json!({"action_on_timeout": "bogus"}),
    );
    assert_eq!(e["code"], -32602, "{e}");
    for m in ["bdev_nvme_reset_controller", "bdev_nvme_detach_controller"] {
        let e = d.call_err(m, json!({"name": "X"}));
        assert_eq!(e["code"], -19, "{m}: {e}");
        assert_eq!(e["message"], "no NVMe controller named \"X\"", "{m}: {e}");
    }
    let attach = |traddr: &str| json!({"name": "N", "trtype": "PCIe", "traddr": traddr});
    let e = d.call_err("bdev_nvme_attach_controller", attach("0000:ff:1f.7"));
    assert_eq!(e["code"], -19, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("no PCI device at 0000:ff:1f.7"),
        "{e}"
    );
    let e = d.call_err("bdev_nvme_attach_controller", attach("nope"));
    assert_eq!(e["code"], -22, "{e}");
    // Nothing was attached by the failures.
    assert_eq!(d.call("bdev_nvme_get_controllers", json!({})), json!([]));
    assert_eq!(d.stop(), Some(0));
}
