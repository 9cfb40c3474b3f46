//! QMP output as QEMU writes it (`qobject/json-writer.c` over a `QDict`):
//! `", "` and `": "` between members, doubles as `%.17g`, every character
//! outside printable ASCII as an upper-case `\uXXXX` escape (a surrogate pair
//! beyond the BMP), and an object's members in `QDict`'s own order (its 512
//! hash buckets in turn, the newest member of a bucket first). So a reply,
//! an error or an echoed id reads byte for byte as qemu-storage-daemon's
//! (where two keys of a handler's object share a bucket, their order follows
//! sluice's key order, not QAPI's declaration order).

use super::json::Q;
use serde_json::Value;
use std::fmt::Write;

/// `QDict`'s bucket count.
const BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` (`qobject/qdict.c`).
fn tdb_hash(name: &str) -> u32 {
    let b = name.as_bytes();
    let mut v: u32 = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345)
}

/// The order `QDict` iterates keys given in insertion order.
fn qdict_order<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<usize> {
    let mut idx: Vec<(u32, usize)> = keys
        .enumerate()
        .map(|(i, k)| (tdb_hash(k) % BUCKETS, i))
        .collect();
    idx.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    idx.into_iter().map(|(_, i)| i).collect()
}

/// `%.17g`, as QEMU prints a double.
pub fn fmt_double(f: f64) -> String {
    if f.is_nan() {
        return if f.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if f.is_infinite() {
        return if f < 0.0 { "-inf" } else { "inf" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let e = format!("{f:.16e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..17).contains(&x) {
        let sign = if x < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mant), x.unsigned_abs())
    } else {
        strip(&format!("{:.*}", (16 - x) as usize, f))
    }
}

/// A string as QEMU quotes it (QEMU's `qobject_to_json`, shared with the
/// `json:` pseudo-filenames the graph writes).
pub fn quote(out: &mut String, s: &str) {
    graph::qemu_name::write_str(s, out);
}

/// Writes a parsed QMP value.
pub fn write_q(out: &mut String, q: &Q) {
    match q {
        Q::Null => out.push_str("null"),
        Q::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Q::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Q::Uint(u) => {
            let _ = write!(out, "{u}");
        }
        Q::Double(d) => out.push_str(&fmt_double(*d)),
        Q::Str(s) => quote(out, s),
        Q::List(l) => {
            out.push('[');
            for (i, v) in l.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_q(out, v);
            }
            out.push(']');
        }
        Q::Dict(d) => {
            out.push('{');
            for (n, i) in qdict_order(d.iter().map(|(k, _)| k.as_str()))
                .into_iter()
                .enumerate()
            {
                if n > 0 {
                    out.push_str(", ");
                }
                quote(out, &d[i].0);
                out.push_str(": ");
                write_q(out, &d[i].1);
            }
            out.push('}');
        }
    }
}

/// Writes a handler's value (an object's members taken in key order as the
/// insertion order).
pub fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                out.push_str(&fmt_double(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => quote(out, s),
        Value::Array(l) => {
            out.push('[');
            for (i, v) in l.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, v);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let entries: Vec<(&String, &Value)> = m.iter().collect();
            out.push('{');
            for (n, i) in qdict_order(entries.iter().map(|(k, _)| k.as_str()))
                .into_iter()
                .enumerate()
            {
                if n > 0 {
                    out.push_str(", ");
                }
                quote(out, entries[i].0);
                out.push_str(": ");
                write_value(out, entries[i].1);
            }
            out.push('}');
        }
    }
}

/// An object of `(key, value as QEMU text)` members given in QEMU's
/// insertion order.
pub fn members(pairs: &[(&str, &str)]) -> String {
    let mut out = String::from("{");
    for (n, i) in qdict_order(pairs.iter().map(|(k, _)| *k))
        .into_iter()
        .enumerate()
    {
        if n > 0 {
            out.push_str(", ");
        }
        quote(&mut out, pairs[i].0);
        out.push_str(": ");
        out.push_str(pairs[i].1);
    }
    out.push('}');
    out
}

/// A handler's value as QEMU would write it.
pub fn to_qemu(v: &Value) -> String {
    let mut s = String::new();
    write_value(&mut s, v);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn doubles_as_printf_g17() {
        for (f, s) in [
            (1.2345678901234568e29, "1.2345678901234568e+29"),
            (100.0, "100"),
            (0.1, "0.10000000000000001"),
            (-(2f64.powi(63)), "-9.2233720368547758e+18"),
            (2.5, "2.5"),
            (-0.0, "-0"),
            (1e-5, "1.0000000000000001e-05"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (0.0001, "0.0001"),
        ] {
            assert_eq!(fmt_double(f), s, "{f}");
        }
    }

    #[test]
    fn objects_in_qdict_order_and_strings_escaped() {
        // As qemu-storage-daemon 10.0 orders replies and errors.
        assert_eq!(
            to_qemu(&json!({"id": 1, "return": {}})),
            "{\"return\": {}, \"id\": 1}"
        );
        assert_eq!(
            to_qemu(&json!({"error": {"desc": "d", "class": "c"}, "id": 1})),
            "{\"id\": 1, \"error\": {\"class\": \"c\", \"desc\": \"d\"}}"
        );
        // Keys sharing a bucket ("micro" and "minor") come newest first; a
        // handler's keys count as inserted in sorted order.
        assert_eq!(
            to_qemu(&json!({"major": 10, "minor": 0, "micro": 2})),
            "{\"minor\": 0, \"micro\": 2, \"major\": 10}"
        );
        assert_eq!(
            to_qemu(&json!("a\u{1}\u{e9}\u{1F600}\"")),
            "\"a\\u0001\\u00E9\\uD83D\\uDE00\\\"\""
        );
        assert_eq!(to_qemu(&json!([[], {}])), "[[], {}]");
    }
}
