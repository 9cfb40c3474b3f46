//! What `query-qmp-schema` answers: QEMU's `SchemaInfo` list for the
//! commands, events and types sluice really serves, committed as
//! `schema.json` and embedded at build time.
//!
//! The file is generated once from qemu-storage-daemon 10's own
//! `query-qmp-schema` by `scripts/qmp_schema.py`, restricted to the
//! commands in sluice's method table (each command's top-level arguments to
//! those sluice accepts, each probed on a running sluice), the events
//! sluice publishes, and the types they reach; type names are QEMU's masked
//! ones. sluice's own methods (SPDK's JSON-RPC dialect, the 2011 API) and
//! events are listed with the feature `sluice-params`: their arguments are
//! not introspected (an object type without members).
//!
//! # Adding a command (or an event)
//!
//! Register it (`rpc/src/methods/mod.rs`), build, start the binary, and run
//! `.venv/bin/python scripts/qmp_schema.py --qmp RUNTIME/sluice-qmp.sock`
//! (a new QEMU event: add its name to `QEMU_EVENTS` there first). The
//! script rewrites `schema.json`; commit it. `tests/py/qmp_surface.py`
//! (`case_schema`) fails until it is done: it checks that the schema's
//! commands are exactly `query-commands`', that every listed argument is
//! accepted and an unlisted one refused, and that every type referenced is
//! defined.

use serde_json::Value;
use std::sync::OnceLock;

/// The committed schema, as text.
pub const SCHEMA_JSON: &str = include_str!("schema.json");

/// The schema, parsed once (it is constant).
pub fn schema() -> &'static Value {
    static PARSED: OnceLock<Value> = OnceLock::new();
    PARSED.get_or_init(|| serde_json::from_str(SCHEMA_JSON).unwrap_or(Value::Array(Vec::new())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn names(meta: &str) -> BTreeSet<String> {
        schema()
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["meta-type"] == meta)
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect()
    }

    #[test]
    fn the_committed_schema_parses_and_every_type_it_references_is_defined() {
        let all: Vec<Value> = serde_json::from_str(SCHEMA_JSON).expect("schema.json parses");
        let defined: BTreeSet<&str> = all.iter().filter_map(|e| e["name"].as_str()).collect();
        for e in &all {
            let mut refs: Vec<&str> = ["arg-type", "ret-type", "element-type"]
                .iter()
                .filter_map(|k| e[*k].as_str())
                .collect();
            for m in e["members"].as_array().into_iter().flatten() {
                refs.extend(m["type"].as_str());
            }
            for v in e["variants"].as_array().into_iter().flatten() {
                refs.extend(v["type"].as_str());
            }
            for r in refs {
                assert!(
                    defined.contains(r),
                    "{} references undefined type {r}",
                    e["name"]
                );
            }
        }
    }

    /// Every event name published anywhere in the workspace's sources that
    /// a QMP client receives (upper case: QEMU's convention) is listed.
    #[test]
    fn every_event_sluice_publishes_is_listed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let events = names("event");
        let mut missing = Vec::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if p.is_dir() {
                    if !["target", "tests", ".git", ".venv"].contains(&name) {
                        stack.push(p);
                    }
                    continue;
                }
                if !name.ends_with(".rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                if text.contains("#[cfg(test)]") && text.contains("publish(\"A\"") {
                    continue; // the event bus's own tests
                }
                for part in text.split("publish(\"").skip(1) {
                    let ev: String = part.chars().take_while(|c| *c != '"').collect();
                    let qmp =
                        !ev.is_empty() && ev.chars().all(|c| c.is_ascii_uppercase() || c == '_');
                    if qmp && !events.contains(&ev) && ev.len() > 1 {
                        missing.push(format!("{ev} ({})", p.display()));
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "events missing from schema.json: {missing:?}"
        );
    }
}
