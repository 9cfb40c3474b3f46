//! The VFIO side: container (Type1v2 IOMMU), group and device through rust-vmm's
//! `vfio-ioctls`, bus mastering in PCI config space, BAR0 mapped (only its
//! sparse mmap areas when the MSI-X table shares the BAR), and DMA mappings made
//! with `VFIO_IOMMU_MAP_DMA` (IOVA = process address): the DMA arena's regions
//! once each, and the driver's own queue memory.

use super::error::NvmeError;
use super::mem::{DmaSpace, RangeTable};
use super::pci;
use super::regs::{MmioRegs, RegisterIo};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};

const PCI_COMMAND: u64 = 0x04;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_INTX_DISABLE: u16 = 1 << 10;

/// BAR0 mapped into the process; unmapped on release or drop. Once released,
/// reads return all ones (as from a removed device) and writes are dropped.
pub struct BarRegs {
    mmio: MmioRegs,
    base: *mut u8,
    size: usize,
    live: AtomicBool,
}

// SAFETY: see `MmioRegs`; the mapping itself is owned and only unmapped once.
unsafe impl Send for BarRegs {}
// SAFETY: as above.
unsafe impl Sync for BarRegs {}

impl BarRegs {
    /// Unmaps the BAR (detach): the device file is released only when no
    /// mapping of it is left. The caller guarantees that no other thread is
    /// accessing the registers any more (every queue pair is gone).
    fn release(&self) {
        if self.live.swap(false, Ordering::AcqRel) {
            // SAFETY: the reservation made in `map_bar0`, unmapped exactly once.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
        }
    }
}

impl RegisterIo for BarRegs {
    #[inline]
    fn read32(&self, off: usize) -> u32 {
        if !self.live.load(Ordering::Acquire) {
            return u32::MAX;
        }
        self.mmio.read32(off)
    }
    #[inline]
    fn write32(&self, off: usize, v: u32) {
        if self.live.load(Ordering::Acquire) {
            self.mmio.write32(off, v)
        }
    }
    fn len(&self) -> usize {
        self.mmio.len()
    }
}

impl Drop for BarRegs {
    fn drop(&mut self) {
        self.release();
    }
}

/// The IOMMU address space of a VFIO container. Mappings use IOVA = process
/// address when the IOMMU's aperture covers it; otherwise (e.g. a 39-bit
/// aperture below 48-bit user addresses) IOVAs are handed out from the
/// aperture's valid ranges, and the range table translates.
pub struct VfioDma {
    container: Arc<VfioContainer>,
    ranges: RangeTable,
    aperture: Vec<(u64, u64)>,
    next: Mutex<(usize, u64)>,
}

const IOVA_ALIGN: u64 = 2 << 20;

impl VfioDma {
    fn new(container: Arc<VfioContainer>) -> Self {
        let aperture = iova_ranges(&container);
        tracing::debug!(?aperture, "IOMMU valid IOVA ranges");
        let first = aperture.first().map_or(0, |r| r.0);
        Self {
            container,
            ranges: RangeTable::default(),
            aperture,
            next: Mutex::new((0, first)),
        }
    }

    fn pick_iova(&self, va: u64, len: u64) -> Option<u64> {
        if self.aperture.is_empty()
            || self
                .aperture
                .iter()
                .any(|&(s, e)| va >= s && va.checked_add(len - 1).is_some_and(|end| end <= e))
        {
            return Some(va);
        }
        let mut n = self.next.lock().unwrap_or_else(|p| p.into_inner());
        while n.0 < self.aperture.len() {
            let (s, e) = self.aperture[n.0];
            // Keep clear of the low 4 GiB (MSI window and friends) when the range allows.
            let start =
                n.1.max(s)
                    .max(if e > (8u64 << 30) { 4u64 << 30 } else { 0 })
                    .next_multiple_of(IOVA_ALIGN);
            if let Some(end) = start.checked_add(len - 1) {
                if end <= e {
                    n.1 = end + 1;
                    return Some(start);
                }
            }
            n.0 += 1;
            n.1 = 0;
        }
        None
    }
}

/// The valid IOVA ranges (inclusive) of the container's IOMMU, from
/// `VFIO_IOMMU_GET_INFO`'s IOVA-range capability; empty when not reported.
fn iova_ranges(container: &VfioContainer) -> Vec<(u64, u64)> {
    const VFIO_IOMMU_GET_INFO: libc::c_ulong = (b';' as libc::c_ulong) << 8 | (100 + 12);
    const INFO_CAPS: u32 = 1 << 1;
    const CAP_IOVA_RANGE: u16 = 1;
    let mut buf = vec![0u64; 512];
    let bytes = buf.len() * 8;
    buf[0] = bytes as u64; // argsz (low half), flags 0
                           // SAFETY: the buffer is `bytes` long and argsz says so; the kernel writes at
                           // most argsz bytes of vfio_iommu_type1_info and its capability chain.
    let r = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
    if r != 0 {
        tracing::debug!("VFIO_IOMMU_GET_INFO: {}", std::io::Error::last_os_error());
        return Vec::new();
    }
    // SAFETY: reinterpreting the u64 buffer as bytes (same memory, u8 has no alignment).
    let b = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, bytes) };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|x| u64::from_le_bytes(x.try_into().unwrap_or([0; 8])))
    };
    let flags = u32_at(4).unwrap_or(0);
    let mut off = if flags & INFO_CAPS != 0 {
        u32_at(16).unwrap_or(0) as usize
    } else {
        0
    };
    let mut out = Vec::new();
    let mut hops = 0;
    while off != 0 && off + 8 <= bytes && hops < 16 {
        let id = u32_at(off).unwrap_or(0) as u16;
        if id == CAP_IOVA_RANGE {
            let nr = u32_at(off + 8).unwrap_or(0) as usize;
            for i in 0..nr.min(64) {
                if let (Some(s), Some(e)) = (u64_at(off + 16 + 16 * i), u64_at(off + 24 + 16 * i)) {
                    out.push((s, e));
                }
            }
        }
        off = u32_at(off + 4).unwrap_or(0) as usize;
        hops += 1;
    }
    out
}

impl DmaSpace for VfioDma {
    unsafe fn map(&self, ptr: *mut u8, len: usize) -> Result<u64, NvmeError> {
        let va = ptr as u64;
        let iova = self.pick_iova(va, len as u64).ok_or_else(|| {
            NvmeError::Dma(format!(
                "no room for {len} bytes in the IOMMU's address ranges {:x?}",
                self.aperture
            ))
        })?;
        // SAFETY: the caller upholds this method's contract, which is the one of
        // `vfio_dma_map`: the memory stays mapped until `unmap` and is accessed
        // only through raw pointers.
        unsafe { self.container.vfio_dma_map(iova, len, ptr) }.map_err(|e| {
            NvmeError::Dma(format!(
                "VFIO_IOMMU_MAP_DMA of {len} bytes at {va:#x} (IOVA {iova:#x}): {e}"
            ))
        })?;
        if let Err(e) = self.ranges.insert(va, len as u64, iova) {
            let _ = self.container.vfio_dma_unmap(iova, len);
            return Err(e);
        }
        Ok(iova)
    }

    fn unmap(&self, iova: u64, len: usize) {
        self.ranges.remove(iova);
        if let Err(e) = self.container.vfio_dma_unmap(iova, len) {
            tracing::warn!("VFIO_IOMMU_UNMAP_DMA at {iova:#x}: {e}");
        }
    }

    #[inline]
    fn translate(&self, ptr: *const u8, len: usize) -> Option<u64> {
        self.ranges.lookup(ptr as u64, len as u64)
    }
}

/// An NVMe controller opened through VFIO.
pub struct VfioNvme {
    regs: Arc<BarRegs>,
    dma: Arc<VfioDma>,
    device: VfioDevice,
    addr: String,
}

impl VfioNvme {
    /// Opens the controller at PCI address `addr` (normalized, bound to vfio-pci).
    pub fn open(addr: &str) -> Result<Self, NvmeError> {
        let group = pci::check_vfio_nvme(addr)?;
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| NvmeError::Vfio(format!("opening the container: {e}")))?,
        );
        let device = VfioDevice::new(
            &pci::sysfs_path(addr),
            container.clone() as Arc<dyn VfioOps>,
            false,
        )
        .map_err(|e| NvmeError::Vfio(format!("opening {addr} (IOMMU group {group}): {e}")))?;
        set_command(&device, CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE, 0);
        let regs = Arc::new(map_bar0(&device, addr)?);
        let dma = Arc::new(VfioDma::new(container));
        // Map the DMA arena once, and every region it adds later, so that request
        // buffers (DmaBuf) reach the device without bounce copies.
        super::mem::follow_arena(&dma);
        tracing::info!(%addr, group, bar0 = regs.len(), "VFIO device opened");
        Ok(Self {
            regs,
            dma,
            device,
            addr: addr.into(),
        })
    }

    /// The register window.
    pub fn regs(&self) -> Arc<dyn RegisterIo> {
        self.regs.clone()
    }
    /// The DMA space.
    pub fn dma(&self) -> Arc<dyn DmaSpace> {
        self.dma.clone()
    }
}

impl Drop for VfioNvme {
    fn drop(&mut self) {
        // The controller is disabled by now: stop its DMA at the PCI level too.
        set_command(&self.device, 0, CMD_BUS_MASTER);
        // No mapping may outlive the device file, or the kernel keeps it (and its
        // IOMMU group) busy and a later attach fails with EBUSY.
        self.regs.release();
        tracing::info!(addr = %self.addr, "VFIO device released");
    }
}

fn set_command(device: &VfioDevice, set: u16, clear: u16) {
    let mut b = [0u8; 2];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut b, PCI_COMMAND);
    let cmd = (u16::from_le_bytes(b) | set) & !clear;
    device.region_write(
        VFIO_PCI_CONFIG_REGION_INDEX,
        &cmd.to_le_bytes(),
        PCI_COMMAND,
    );
}

fn map_bar0(device: &VfioDevice, addr: &str) -> Result<BarRegs, NvmeError> {
    let idx = VFIO_PCI_BAR0_REGION_INDEX;
    let size = device.get_region_size(idx) as usize;
    let offset = device.get_region_offset(idx);
    if size < 0x2000 {
        return Err(NvmeError::Vfio(format!(
            "{addr}: BAR0 of {size} bytes is too small for an NVMe controller"
        )));
    }
    if device.get_region_flags(idx) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return Err(NvmeError::Vfio(format!(
            "{addr}: BAR0 cannot be memory-mapped"
        )));
    }
    let mut areas: Vec<(u64, u64)> = vec![(0, size as u64)];
    for cap in device.get_region_caps(idx) {
        if let VfioRegionInfoCap::SparseMmap(s) = cap {
            areas = s.areas.iter().map(|a| (a.offset, a.size)).collect();
        }
    }
    // Reserve the whole BAR, then map the mappable areas into the reservation.
    // SAFETY: an anonymous PROT_NONE reservation at an address the kernel picks.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(NvmeError::Vfio(format!(
            "reserving {size} bytes for BAR0: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut contiguous = 0usize;
    for (off, len) in &areas {
        if off + len > size as u64 || *len == 0 {
            continue;
        }
        // SAFETY: maps device memory over part of our own reservation (MAP_FIXED
        // inside `base..base+size`), from the VFIO device fd at the region offset.
        let p = unsafe {
            libc::mmap(
                (base as *mut u8).add(*off as usize) as *mut libc::c_void,
                *len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                device.as_raw_fd(),
                (offset + off) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: releasing the reservation made above.
            unsafe { libc::munmap(base, size) };
            return Err(NvmeError::Vfio(format!(
                "mmap of BAR0 area {off:#x}+{len:#x}: {e}"
            )));
        }
        if *off as usize == contiguous {
            contiguous += *len as usize;
        }
    }
    if contiguous < 0x1008 {
        // SAFETY: releasing the reservation made above.
        unsafe { libc::munmap(base, size) };
        return Err(NvmeError::Vfio(format!(
            "{addr}: the registers and doorbells of BAR0 are not mappable"
        )));
    }
    // SAFETY: `base..base+contiguous` is mapped device memory, kept until BarRegs drops.
    let mmio = unsafe { MmioRegs::new(base as *mut u8, contiguous) };
    Ok(BarRegs {
        mmio,
        base: base as *mut u8,
        size,
        live: AtomicBool::new(true),
    })
}
