//! The NBD client's handshake and reply stream from outside bytes: the
//! input is everything a server sends on one connection (greeting, option
//! replies, then replies and chunks), written by a fake server to the
//! crate's real client (`nbd::client::NbdBdev::open`), which then reads,
//! asks block status and flushes. The client must never panic or hang: a
//! bad stream is an error and a dropped connection.
#![no_main]

use bdev::{Bdev, IoType};
use libfuzzer_sys::fuzz_target;
use nbd::client::{ClientConfig, NbdBdev, ServerAddr};
use sluice_fuzz::{on_reactor, scratch};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

static N: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let sock = scratch().join(format!("c{}.sock", N.fetch_add(1, Ordering::Relaxed)));
    let l = UnixListener::bind(&sock).expect("bind");
    let stream = data.to_vec();
    let server = std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        // Everything at once, then the end of the stream; drain what the
        // client sends until it hangs up.
        let mut r = s.try_clone().expect("clone");
        let drain = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
        });
        let _ = s.write_all(&stream);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = drain.join();
    });
    let cfg = ClientConfig {
        server: ServerAddr::Unix(sock.clone()),
        export: Some("x".into()),
        reconnect_delay: Duration::ZERO,
        open_timeout: Duration::ZERO,
        tls_creds: None,
        tls_hostname: None,
        tls: None,
    };
    on_reactor(move || async move {
        let Ok(b) = NbdBdev::open("fuzz-nbd", cfg, false).await else {
            return;
        };
        let b: Arc<dyn Bdev> = b;
        if let Ok(ch) = bdev::channel(&b) {
            let size = b.size();
            if size >= 4096 {
                let _ = bdev::read_at(&ch, 0, 4096).await;
                if let Some(f) = b.range_status(0, size.min(1 << 20)) {
                    let _ = f.await;
                }
            }
            let _ = bdev::simple_io(&ch, IoType::Flush, 0, 0).await;
            bdev::drop_cached_channels(&b);
        }
    });
    let _ = server.join();
    let _ = std::fs::remove_file(&sock);
});
