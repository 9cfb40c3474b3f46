//! NBD wire constants and the encoding of the messages the server sends
//! (the NBD project's `doc/proto.md`: fixed newstyle handshake, simple and
//! structured replies, `base:allocation`).

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the server's second magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is understood.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is understood.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is understood.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is understood.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is understood (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA are visible across every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
}

/// Option numbers.
pub mod opt {
    /// Pick an export and enter transmission (no reply on failure: disconnect).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// TLS (not offered).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Success / end of a list.
    pub const ACK: u32 = 1;
    /// One export of `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// One piece of information of `NBD_OPT_INFO` / `NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = 0x8000_0002;
    /// Malformed option.
    pub const ERR_INVALID: u32 = 0x8000_0003;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    /// The option needs TLS first.
    pub const ERR_TLS_REQD: u32 = 0x8000_0005;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = 0x8000_0007;
    /// The option's data is too large.
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;
}

/// `NBD_INFO_*` types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A description for humans.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the request).
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status of the selected metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent is enough.
    pub const REQ_ONE: u16 = 1 << 3;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Final chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// Errors on the wire (fixed values, not the host's errno).
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid request.
    pub const EINVAL: u32 = 22;
    /// No space (write beyond the end, full image).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flags.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id in `NBD_OPT_SET_META_CONTEXT` replies and block-status chunks.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_LEN: usize = 20;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest read or write payload served (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// A transmission request, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub cmd: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Decodes a request header; `None` when the magic is wrong (a fatal protocol error).
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    if be32(&b[0..4]) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: be16(&b[4..6]),
        cmd: be16(&b[6..8]),
        cookie: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        len: be32(&b[24..28]),
    })
}

/// Encodes a request header (for tests and clients).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// Big-endian u16 of the first two bytes.
#[inline]
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Big-endian u32 of the first four bytes.
#[inline]
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Big-endian u64 of the first eight bytes.
#[inline]
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A reply header, at most 32 bytes, built in place.
#[derive(Clone, Copy)]
pub struct Head {
    buf: [u8; 32],
    len: u8,
}

impl Head {
    /// The encoded bytes.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// A simple reply: magic, error, cookie.
    #[inline]
    pub fn simple(error: u32, cookie: u64) -> Head {
        let mut buf = [0u8; 32];
        buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        buf[4..8].copy_from_slice(&error.to_be_bytes());
        buf[8..16].copy_from_slice(&cookie.to_be_bytes());
        Head {
            buf,
            len: SIMPLE_REPLY_LEN as u8,
        }
    }

    /// A structured chunk header announcing `payload_len` bytes of payload.
    #[inline]
    pub fn chunk(flags: u16, ty: u16, cookie: u64, payload_len: u32) -> Head {
        let mut buf = [0u8; 32];
        buf[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        buf[4..6].copy_from_slice(&flags.to_be_bytes());
        buf[6..8].copy_from_slice(&ty.to_be_bytes());
        buf[8..16].copy_from_slice(&cookie.to_be_bytes());
        buf[16..20].copy_from_slice(&payload_len.to_be_bytes());
        Head {
            buf,
            len: CHUNK_LEN as u8,
        }
    }

    /// The final `OFFSET_DATA` chunk header of a read: the chunk header and the
    /// offset; `data_len` bytes of data follow.
    #[inline]
    pub fn read_data(cookie: u64, offset: u64, data_len: u32) -> Head {
        let mut h = Head::chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, data_len + 8);
        h.buf[20..28].copy_from_slice(&offset.to_be_bytes());
        h.len = 28;
        h
    }
}

/// Bytes of an option reply: header plus `data`.
pub fn option_reply(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REP_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The payload of a structured `ERROR` chunk: errno, message length, message.
pub fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let msg = truncate_utf8(msg, MAX_STRING);
    let mut v = Vec::with_capacity(6 + msg.len());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg.as_bytes());
    v
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A cursor over option data that never reads past its end.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
    /// A string of `n` bytes (valid UTF-8, no NUL, at most [`MAX_STRING`]).
    pub fn string(&mut self, n: usize) -> Option<&'a str> {
        if n > MAX_STRING {
            return None;
        }
        let s = std::str::from_utf8(self.take(n)?).ok()?;
        (!s.contains('\0')).then_some(s)
    }
    /// A u32 length followed by that many bytes of string.
    pub fn lstring(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        self.string(n)
    }
    /// Whether every byte was consumed.
    pub fn at_end(&self) -> bool {
        self.pos == self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: cflags::FUA,
            cmd: cmd::WRITE,
            cookie: 0x0102030405060708,
            offset: 4096,
            len: 512,
        };
        let b = encode_request(&r);
        assert_eq!(decode_request(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(decode_request(&bad), None);
    }

    #[test]
    fn reply_headers() {
        let h = Head::simple(errno::EINVAL, 7);
        assert_eq!(h.bytes().len(), 16);
        assert_eq!(be32(&h.bytes()[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&h.bytes()[4..8]), 22);
        assert_eq!(be64(&h.bytes()[8..16]), 7);
        let h = Head::read_data(9, 1 << 20, 4096);
        assert_eq!(h.bytes().len(), 28);
        assert_eq!(be16(&h.bytes()[4..6]), chunk::FLAG_DONE);
        assert_eq!(be16(&h.bytes()[6..8]), chunk::OFFSET_DATA);
        assert_eq!(be32(&h.bytes()[16..20]), 4096 + 8);
        assert_eq!(be64(&h.bytes()[20..28]), 1 << 20);
    }

    #[test]
    fn cursor_rejects_overruns_and_nul() {
        let mut c = Cursor::new(&[0, 0, 0, 3, b'a', b'b']);
        assert_eq!(c.lstring(), None);
        let mut c = Cursor::new(&[0, 0, 0, 2, b'a', 0]);
        assert_eq!(c.lstring(), None);
        let mut c = Cursor::new(&[0, 0, 0, 2, b'h', b'i', 0, 5]);
        assert_eq!(c.lstring(), Some("hi"));
        assert_eq!(c.u16(), Some(5));
        assert!(c.at_end());
    }

    #[test]
    fn error_payload_truncates_on_char_boundary() {
        let long = "é".repeat(3000);
        let p = error_payload(errno::EIO, &long);
        let n = be16(&p[4..6]) as usize;
        assert!(n <= MAX_STRING);
        assert!(std::str::from_utf8(&p[6..6 + n]).is_ok());
    }
}
