//! The JSON-RPC server's framing of a byte stream (`rpc::transport::Splitter`
//! over `grammar.rs`), fed in the chunks the input's first byte chooses:
//! never a panic; every frame it hands on as a complete value is JSON that
//! `serde_json` (the next stage) parses, but for lone surrogate escapes
//! (`"\ud800"`: valid JSON grammar that serde_json refuses, answered with
//! a Parse error); a value is never larger than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc::transport::{Frame, Splitter};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let chunk = 1 + k as usize % 64;
    let mut sp = Splitter::new(MAX);
    for c in rest.chunks(chunk) {
        sp.feed(c);
        while let Some(f) = sp.next_frame() {
            match f {
                Frame::Value(v) => {
                    assert!(
                        v.len() <= MAX,
                        "a value of {} bytes over the limit",
                        v.len()
                    );
                    match serde_json::from_slice::<serde_json::Value>(&v) {
                        Err(e) if !lone_surrogate(&e) => panic!(
                            "the framer passed {:?} as JSON; serde_json: {e}",
                            String::from_utf8_lossy(&v)
                        ),
                        _ => {}
                    }
                }
                Frame::Invalid { .. } => return,
                Frame::TooLarge | Frame::Garbage { .. } => {}
            }
        }
    }
    let _ = sp.has_partial();
});

/// serde_json's refusals of valid JSON grammar: a lone surrogate escape
/// (`"\\ud83d"`), a number beyond a double (`1e999`); the server answers
/// both with a Parse error.
fn lone_surrogate(e: &serde_json::Error) -> bool {
    let m = e.to_string();
    m.contains("surrogate") || m.contains("hex escape") || m.contains("number out of range")
}
