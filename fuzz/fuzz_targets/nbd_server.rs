//! The NBD server's handshake and request stream from outside bytes: the
//! input is everything a client sends on one connection (flags, options,
//! then requests and their data), written to the crate's real server
//! (`nbd::NbdServer` on a reactor, one writable 1 MiB malloc export "m0"),
//! then the client's side is shut. The server must never panic, and must
//! close the connection within a bound (no hang on a half-open stream).
#![no_main]

use bdev::Bdev;
use libfuzzer_sys::fuzz_target;
use nbd::{ExportConfig, ListenAddr, NbdServer, StartOptions};
use sluice_fuzz::{rt, scratch, HANG};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

fn server() -> &'static PathBuf {
    static S: OnceLock<(NbdServer, PathBuf)> = OnceLock::new();
    &S.get_or_init(|| {
        let h = rt();
        let reg = bdev::Registry::new();
        let m: Arc<dyn Bdev> =
            bdev::malloc::MallocBdev::new("m0", 2048, 512, None).expect("malloc");
        reg.register(m).expect("register");
        let srv = NbdServer::default();
        let sock = scratch().join("nbd.sock");
        let opts = StartOptions {
            max_connections: 0,
            ..StartOptions::default()
        };
        srv.start(&h, None, &[ListenAddr::Unix(sock.clone())], opts)
            .expect("start");
        srv.add_export(
            &reg,
            ExportConfig {
                id: "m0".into(),
                node: "m0".into(),
                name: "m0".into(),
                description: "fuzz".into(),
                writable: true,
                writethrough: false,
            },
        )
        .expect("export");
        std::mem::forget(reg);
        (srv, sock)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let mut s = UnixStream::connect(server()).expect("connect");
    s.set_read_timeout(Some(HANG)).expect("timeout");
    s.set_write_timeout(Some(HANG)).expect("timeout");
    // Read the server's side beside the writes (a reply stream the client
    // never reads would stall the server's writes and so ours).
    let mut r = s.try_clone().expect("clone");
    let reader = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut buf = [0u8; 65536];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return Err(format!(
                        "no end of the connection within {:?}",
                        t0.elapsed()
                    ))
                }
                Err(_) => return Ok(()),
            }
        }
    });
    // The server may close early (a refused handshake): write errors are fine.
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    if let Err(e) = reader.join().expect("reader") {
        panic!(
            "the server hung on a client that sent {} bytes and hung up: {e}",
            data.len()
        );
    }
});
