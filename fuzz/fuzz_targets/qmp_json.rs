//! QMP's input (`rpc::qmp::json::Stream`, a port of QEMU's JSON lexer,
//! streamer and parser), fed in the chunks the input's first byte chooses:
//! never a panic; every value it yields writes back (`to_qemu_json`) as
//! text that parses to the same value (numbers compared as numbers: QEMU
//! writes the double 1e3 as `1000`, which reads back as an integer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc::qmp::json::Stream;

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let chunk = 1 + k as usize % 64;
    let mut st = Stream::new(1 << 16, "too large".into());
    let mut out = Vec::new();
    for c in rest.chunks(chunk) {
        st.feed(c, &mut out);
    }
    for q in out.into_iter().flatten() {
        let text = q.to_qemu_json();
        // A number beyond a double reads as infinity and is written `inf`,
        // as QEMU's qnum_to_string does: not JSON, known, left alone.
        if text.contains("inf") && !text.contains('"') || text.contains(": inf") {
            continue;
        }
        let mut again = Vec::new();
        // A top-level scalar ends at the byte after it, as in QEMU's lexer.
        let mut st2 = Stream::new(1 << 20, "too large".into());
        st2.feed(text.as_bytes(), &mut again);
        st2.feed(b" ", &mut again);
        match again.as_slice() {
            [Ok(q2)] => assert_eq!(
                numeric(q2.to_value()),
                numeric(q.to_value()),
                "{text} reads back differently"
            ),
            other => panic!("{text} does not read back as one value: {other:?}"),
        }
        let _ = q.to_value();
    }
});

/// `v` with every number as a double.
fn numeric(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Value::Array(a) => Value::Array(a.into_iter().map(numeric).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, numeric(v))).collect()),
        v => v,
    }
}
