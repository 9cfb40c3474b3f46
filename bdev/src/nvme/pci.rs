//! PCI addresses and the sysfs checks made before opening a device through VFIO,
//! so that a wrong address gets a clear error instead of an ioctl failure.

use super::error::NvmeError;
use std::path::{Path, PathBuf};

/// PCI class of an NVM Express controller (mass storage, NVM, NVMe).
pub const NVME_CLASS: u32 = 0x010802;

/// `DDDD:BB:DD.F` in lower case (the domain may be omitted: `BB:DD.F`).
pub fn normalize(traddr: &str) -> Result<String, NvmeError> {
    let bad = || NvmeError::BadAddress(traddr.to_string());
    let t = traddr.trim().to_ascii_lowercase();
    let parts: Vec<&str> = t.split(':').collect();
    let (dom, bus, rest) = match parts.as_slice() {
        [d, b, r] => (*d, *b, *r),
        [b, r] => ("0000", *b, *r),
        _ => return Err(bad()),
    };
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str, max: usize| {
        s.len() <= max && !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit())
    };
    if !(hex(dom, 4)
        && hex(bus, 2)
        && hex(dev, 2)
        && func.len() == 1
        && matches!(func.as_bytes()[0], b'0'..=b'7'))
    {
        return Err(bad());
    }
    let n = |s: &str| u32::from_str_radix(s, 16).map_err(|_| bad());
    let (d, b, v) = (n(dom)?, n(bus)?, n(dev)?);
    if v > 0x1f {
        return Err(bad());
    }
    Ok(format!("{d:04x}:{b:02x}:{v:02x}.{func}"))
}

/// The sysfs folder of a PCI device.
pub fn sysfs_path(addr: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(addr)
}

/// Checks that `addr` is an NVMe controller bound to vfio-pci with an IOMMU group;
/// returns the group number.
pub fn check_vfio_nvme(addr: &str) -> Result<u32, NvmeError> {
    let dir = sysfs_path(addr);
    if !dir.exists() {
        return Err(NvmeError::NoDevice(addr.into()));
    }
    let class_txt = std::fs::read_to_string(dir.join("class"))
        .map_err(|e| NvmeError::Vfio(format!("reading the class of {addr}: {e}")))?;
    let class = u32::from_str_radix(class_txt.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    if class != NVME_CLASS {
        return Err(NvmeError::NotNvme {
            addr: addr.into(),
            class,
        });
    }
    let driver = std::fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "no driver".into());
    if driver != "vfio-pci" {
        return Err(NvmeError::NotVfio {
            addr: addr.into(),
            driver,
        });
    }
    let group = std::fs::read_link(dir.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().and_then(|f| f.to_str()).and_then(|s| s.parse::<u32>().ok()))
        .ok_or_else(|| NvmeError::Vfio(format!("{addr} has no IOMMU group: the IOMMU is off (boot with intel_iommu=on or amd_iommu=on)")))?;
    if !Path::new(&format!("/dev/vfio/{group}")).exists() {
        return Err(NvmeError::Vfio(format!(
            "/dev/vfio/{group} is missing (is vfio-pci loaded?)"
        )));
    }
    if !Path::new("/dev/vfio/vfio").exists() {
        return Err(NvmeError::Vfio(
            "/dev/vfio/vfio is missing: load the vfio and vfio_iommu_type1 modules".into(),
        ));
    }
    Ok(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalized_and_checked() {
        assert_eq!(normalize("0000:00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(normalize("00:1F.7").unwrap(), "0000:00:1f.7");
        assert_eq!(normalize(" 0001:af:00.1 ").unwrap(), "0001:af:00.1");
        for bad in [
            "",
            "00:04",
            "0000:00:04.8",
            "0000:00:20.0",
            "zz:00.0",
            "0000:00:04.0.1",
            "1:2:3:4.0",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn absent_device_is_reported_as_such() {
        match check_vfio_nvme("0000:ff:1f.7") {
            Err(NvmeError::NoDevice(a)) => assert_eq!(a, "0000:ff:1f.7"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
