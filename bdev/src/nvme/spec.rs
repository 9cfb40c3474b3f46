//! NVMe definitions used by the driver (NVM Express Base Specification 1.4):
//! controller registers, command and completion layouts, opcodes, status codes.

/// Controller Capabilities (64-bit).
pub const REG_CAP: usize = 0x00;
/// Version.
pub const REG_VS: usize = 0x08;
/// Interrupt Mask Set.
pub const REG_INTMS: usize = 0x0c;
/// Controller Configuration.
pub const REG_CC: usize = 0x14;
/// Controller Status.
pub const REG_CSTS: usize = 0x1c;
/// Admin Queue Attributes.
pub const REG_AQA: usize = 0x24;
/// Admin Submission Queue base address (64-bit).
pub const REG_ASQ: usize = 0x28;
/// Admin Completion Queue base address (64-bit).
pub const REG_ACQ: usize = 0x30;
/// First doorbell register.
pub const REG_DOORBELL_BASE: usize = 0x1000;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.IOSQES = 6 (64-byte submission entries).
pub const CC_IOSQES_64: u32 = 6 << 16;
/// CC.IOCQES = 4 (16-byte completion entries).
pub const CC_IOCQES_16: u32 = 4 << 20;
/// CC.SHN field mask.
pub const CC_SHN_MASK: u32 = 3 << 14;
/// CC.SHN = normal shutdown.
pub const CC_SHN_NORMAL: u32 = 1 << 14;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS (controller fatal status).
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST field mask.
pub const CSTS_SHST_MASK: u32 = 3 << 2;
/// CSTS.SHST = shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Memory page size the driver configures (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;
/// Size of a submission queue entry.
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry.
pub const CQE_SIZE: usize = 16;

/// Admin opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Feature: Number of Queues.
    pub const FEAT_NUM_QUEUES: u32 = 0x07;
    /// Identify CNS: namespace.
    pub const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CNS: controller.
    pub const CNS_CONTROLLER: u32 = 0x01;
    /// Identify CNS: active namespace ID list.
    pub const CNS_ACTIVE_NS_LIST: u32 = 0x02;
}

/// NVM command set opcodes.
pub mod nvm {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
    /// DSM attribute: deallocate.
    pub const DSM_AD: u32 = 1 << 2;
    /// Command dword 12: force unit access.
    pub const FUA: u32 = 1 << 30;
}

/// A submission queue entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opc: u8,
    /// Fused operation / PSDT (0: PRPs).
    pub flags: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// Reserved dwords 2-3.
    pub cdw2: [u32; 2],
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (or PRP list pointer).
    pub prp2: u64,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Command>() == SQE_SIZE);

/// A completion queue entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Reserved.
    pub dw1: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 1-15).
    pub status: u16,
}

const _: () = assert!(std::mem::size_of::<Completion>() == CQE_SIZE);

impl Completion {
    /// The status without the phase bit: SC in bits 0-7, SCT in bits 8-10, DNR in bit 14.
    pub fn status_code(&self) -> u16 {
        self.status >> 1
    }
    /// Whether the command succeeded.
    pub fn is_ok(&self) -> bool {
        self.status_code() & 0x7ff == 0
    }
}

/// Status codes (status field without the phase bit: `SCT << 8 | SC`).
pub mod status {
    /// Successful completion.
    pub const SUCCESS: u16 = 0x000;
    /// Invalid command opcode.
    pub const INVALID_OPCODE: u16 = 0x001;
    /// Invalid field in command.
    pub const INVALID_FIELD: u16 = 0x002;
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: u16 = 0x004;
    /// Command aborted due to power loss notification.
    pub const ABORTED_POWER_LOSS: u16 = 0x005;
    /// Internal error.
    pub const INTERNAL_ERROR: u16 = 0x006;
    /// Command abort requested.
    pub const ABORTED_BY_REQUEST: u16 = 0x007;
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: u16 = 0x008;
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: u16 = 0x00b;
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: u16 = 0x080;
    /// Capacity exceeded.
    pub const CAPACITY_EXCEEDED: u16 = 0x081;
    /// Invalid queue identifier (command specific).
    pub const INVALID_QUEUE_ID: u16 = 0x101;
    /// Invalid queue size (command specific).
    pub const INVALID_QUEUE_SIZE: u16 = 0x102;
    /// Attempted write to read-only range (command specific).
    pub const WRITE_TO_READ_ONLY: u16 = 0x182;
    /// Do Not Retry bit.
    pub const DNR: u16 = 1 << 14;
}

/// Decoded CAP register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Maximum queue entries supported (0-based in the register; here 1-based).
    pub mqes: u32,
    /// Timeout for CSTS.RDY transitions in milliseconds.
    pub timeout_ms: u64,
    /// Doorbell stride in bytes.
    pub doorbell_stride: usize,
    /// Minimum memory page size in bytes.
    pub mps_min: usize,
    /// Maximum memory page size in bytes.
    pub mps_max: usize,
    /// Whether the NVM command set is supported.
    pub nvm_css: bool,
}

impl Cap {
    /// Decodes the 64-bit CAP value.
    pub fn decode(v: u64) -> Self {
        Cap {
            mqes: (v & 0xffff) as u32 + 1,
            timeout_ms: ((v >> 24) & 0xff).max(1) * 500,
            doorbell_stride: 4 << ((v >> 32) & 0xf),
            mps_min: 1 << (12 + ((v >> 48) & 0xf)),
            mps_max: 1 << (12 + ((v >> 52) & 0xf)),
            nvm_css: (v >> 37) & 1 == 1,
        }
    }
}

/// Byte offset of a queue's doorbell: SQ tail (`cq == false`) or CQ head.
pub fn doorbell_offset(qid: u16, cq: bool, stride: usize) -> usize {
    REG_DOORBELL_BASE + (2 * qid as usize + cq as usize) * stride
}
