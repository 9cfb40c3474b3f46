//! Shared by the NBD end-to-end tests: a daemon with an NBD listener, and a raw
//! NBD client for the protocol details real clients never get wrong.
#![allow(dead_code)]

use serde_json::{json, Value};
use sluice_tests::{Daemon, TempDir};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const CHUNK_MAGIC: u32 = 0x668e_33ef;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;

/// A daemon with an NBD server on a Unix socket.
pub struct NbdDaemon {
    pub d: Daemon,
    pub sock: PathBuf,
    _dir: TempDir,
}

impl NbdDaemon {
    /// `sluice serve --nbd-listen unix:... CORES EXTRA`.
    pub fn start(cores: &[&str], extra: &[&str]) -> NbdDaemon {
        let dir = TempDir::new("n");
        let sock = dir.join("nbd.sock");
        let listen = format!("unix:{}", sock.display());
        let mut args = vec!["--nbd-listen", listen.as_str()];
        args.extend_from_slice(extra);
        let d = Daemon::start_with(cores, &args);
        NbdDaemon { d, sock, _dir: dir }
    }

    /// A malloc bdev of `mib` MiB in 512-byte blocks.
    pub fn malloc(&mut self, name: &str, mib: u64) {
        self.d.call(
            "bdev_malloc_create",
            json!({"name": name, "num_blocks": mib * 2048, "block_size": 512}),
        );
    }

    /// Exports `node` under its own name.
    pub fn export(&mut self, node: &str, writable: bool) {
        self.d.call(
            "block-export-add",
            json!({"type": "nbd", "id": node, "node-name": node, "writable": writable}),
        );
    }

    /// The `nbd+unix://` URI of an export.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// Waits until `query-block-exports` satisfies `pred`.
    pub fn wait_exports(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..250 {
            let v = self.d.call("query-block-exports", Value::Null);
            if pred(&v) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("query-block-exports never matched");
    }
}

/// A bare-handed NBD client.
pub struct Raw {
    pub s: UnixStream,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub ty: u32,
    pub data: Vec<u8>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl Raw {
    /// Connects and reads the greeting (checking its magics).
    pub fn connect(sock: &PathBuf) -> Raw {
        let s = UnixStream::connect(sock).expect("connect nbd socket");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = Raw { s };
        let g = r.read_n(18);
        assert_eq!(be64(&g[0..8]), NBDMAGIC);
        assert_eq!(be64(&g[8..16]), IHAVEOPT);
        assert_eq!(be16(&g[16..18]) & 1, 1, "fixed newstyle");
        r
    }

    /// Connects and sends the usual client flags (fixed newstyle, no zeroes).
    pub fn connect_flags(sock: &PathBuf) -> Raw {
        let mut r = Raw::connect(sock);
        r.send(&3u32.to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read from server");
        v
    }

    /// Whether the server closed the connection (EOF or reset within the timeout).
    pub fn closed(&mut self) -> bool {
        self.s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    pub fn opt(&mut self, option: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    pub fn reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h[0..8]), REP_MAGIC);
        let len = be32(&h[16..20]) as usize;
        OptReply {
            option: be32(&h[8..12]),
            ty: be32(&h[12..16]),
            data: self.read_n(len),
        }
    }

    /// Replies up to and including the first that is not `REP_INFO`,
    /// `REP_SERVER` or `REP_META_CONTEXT`.
    pub fn replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.reply();
            let last = !matches!(r.ty, REP_INFO | REP_SERVER | REP_META_CONTEXT);
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// The data of `NBD_OPT_GO` / `NBD_OPT_INFO` for `name`, asking for `infos`.
    pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Full handshake to transmission: optional structured replies and
    /// base:allocation, then GO. Returns (size, transmission flags).
    pub fn attach(sock: &PathBuf, name: &str, structured: bool, meta: bool) -> (Raw, u64, u16) {
        let mut r = Raw::connect_flags(sock);
        if structured {
            r.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.reply().ty, REP_ACK);
        }
        if meta {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            r.opt(OPT_SET_META_CONTEXT, &d);
            let reps = r.replies();
            assert_eq!(reps[0].ty, REP_META_CONTEXT, "{reps:?}");
            assert_eq!(reps.last().map(|x| x.ty), Some(REP_ACK));
        }
        r.opt(OPT_GO, &Raw::go_data(name, &[3]));
        let reps = r.replies();
        assert_eq!(
            reps.last().map(|x| x.ty),
            Some(REP_ACK),
            "GO failed: {reps:?}"
        );
        let info = reps
            .iter()
            .find(|x| x.ty == REP_INFO && be16(&x.data[0..2]) == 0)
            .expect("NBD_INFO_EXPORT");
        (r, be64(&info.data[2..10]), be16(&info.data[10..12]))
    }

    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let v = Raw::encode_request(flags, cmd, cookie, offset, len, payload);
        self.send(&v);
    }

    /// The bytes of one transmission request: header, then `payload`.
    pub fn encode_request(
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(28 + payload.len());
        v.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A simple reply: (error, cookie).
    pub fn simple(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(be32(&h[0..4]), SIMPLE_MAGIC, "expected a simple reply");
        (be32(&h[4..8]), be64(&h[8..16]))
    }

    /// A structured chunk: (flags, type, cookie, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be32(&h[0..4]), CHUNK_MAGIC, "expected a structured chunk");
        let len = be32(&h[16..20]) as usize;
        (
            be16(&h[4..6]),
            be16(&h[6..8]),
            be64(&h[8..16]),
            self.read_n(len),
        )
    }

    /// Either reply kind, for commands that may get a simple reply: (error, cookie).
    pub fn any_reply(&mut self) -> (u32, u64) {
        let m = self.read_n(4);
        if be32(&m) == SIMPLE_MAGIC {
            let r = self.read_n(12);
            return (be32(&r[0..4]), be64(&r[4..12]));
        }
        assert_eq!(be32(&m), CHUNK_MAGIC);
        let r = self.read_n(16);
        let (ty, cookie, len) = (be16(&r[2..4]), be64(&r[4..12]), be32(&r[12..16]) as usize);
        let p = self.read_n(len);
        if ty == CHUNK_ERROR {
            return (be32(&p[0..4]), cookie);
        }
        (0, cookie)
    }

    /// Reads `len` bytes at `offset` with a simple-reply connection.
    pub fn read_simple(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len, &[]);
        let (e, c) = self.simple();
        assert_eq!((e, c), (0, cookie));
        self.read_n(len as usize)
    }
}

/// Big-endian helpers for tests.
pub fn be32_of(b: &[u8]) -> u32 {
    be32(b)
}
