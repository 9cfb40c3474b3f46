//! SPDK's JSON config format: replayed at start-up (`sluice serve --json FILE`)
//! and produced by `save_config`, so that a restart restores every bdev.
//!
//! ```json
//! {"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_malloc_create", "params": {...}}]}]}
//! ```
//!
//! Replay runs any method of the table (a config entry may also be a batch: an
//! array of such calls). Each subsystem registers a section with
//! [`crate::table::MethodTable::add_config_section`]; `save_config` collects them.

use crate::error::RpcError;
use crate::service::Service;
use crate::table::{MethodTable, Params};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Why a config could not be replayed or saved.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The file to write exists and is not a regular file.
    #[error("{}: is {kind}, not a regular file; refusing to replace it", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The JSON is not an SPDK config.
    #[error("not an SPDK config: {0}")]
    Format(String),
    /// A method of the config failed.
    #[error("subsystem {subsystem:?}, entry {index} ({method}): {error}")]
    Method {
        /// The subsystem section.
        subsystem: String,
        /// The entry's position in the section, from 0.
        index: usize,
        /// The method.
        method: String,
        /// Its error.
        error: RpcError,
    },
}

/// The table of `svc`, built (and installed) if the service has none yet (a
/// process that replays a config without serving RPC, like `sluice perf`).
fn table(svc: &Service) -> Arc<MethodTable> {
    svc.table
        .get_or_init(|| Arc::new(crate::methods::build_table()))
        .clone()
}

/// Reads and replays an SPDK JSON config file.
pub fn replay(svc: &Service, path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    let v: Value = serde_json::from_slice(&text).map_err(|source| ConfigError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    replay_value(svc, &v)?;
    tracing::info!(config = %path.display(), "config replayed");
    Ok(())
}

/// Replays a parsed SPDK JSON config: every subsystem in file order, every
/// entry in order; stops at the first failure.
pub fn replay_value(svc: &Service, config: &Value) -> Result<(), ConfigError> {
    let table = table(svc);
    let subsystems = match config.get("subsystems") {
        Some(Value::Array(s)) => s,
        Some(Value::Null) | None if config.as_object().is_some_and(|o| o.is_empty()) => {
            return Ok(())
        }
        _ => {
            return Err(ConfigError::Format(
                "the top level must be an object with a \"subsystems\" array".into(),
            ))
        }
    };
    if let Some(k) = config
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "subsystems"))
    {
        return Err(ConfigError::Format(format!(
            "unexpected member {k:?} at the top level"
        )));
    }
    for (si, sub) in subsystems.iter().enumerate() {
        let name = sub
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ConfigError::Format(format!("subsystems[{si}] has no \"subsystem\" name"))
            })?;
        let entries = match sub.get("config") {
            Some(Value::Array(c)) => c.as_slice(),
            Some(Value::Null) | None => &[],
            Some(_) => {
                return Err(ConfigError::Format(format!(
                    "subsystem {name:?}: \"config\" must be an array"
                )))
            }
        };
        for (index, entry) in entries.iter().enumerate() {
            match entry {
                Value::Array(batch) => {
                    for call in batch {
                        run_entry(svc, &table, name, index, call)?;
                    }
                }
                call => run_entry(svc, &table, name, index, call)?,
            }
        }
    }
    Ok(())
}

fn run_entry(
    svc: &Service,
    table: &MethodTable,
    subsystem: &str,
    index: usize,
    entry: &Value,
) -> Result<(), ConfigError> {
    let bad =
        |why: &str| ConfigError::Format(format!("subsystem {subsystem:?}, entry {index}: {why}"));
    let obj: &Map<String, Value> = entry
        .as_object()
        .ok_or_else(|| bad("an entry must be an object"))?;
    if let Some(k) = obj.keys().find(|k| *k != "method" && *k != "params") {
        return Err(bad(&format!("unexpected member {k:?}")));
    }
    let method = obj
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("\"method\" must be a string"))?;
    let params = obj.get("params").cloned();
    tracing::debug!(subsystem, method, "replaying");
    table
        .call(svc, method, Params(params), false)
        .map(|_| ())
        .map_err(|error| ConfigError::Method {
            subsystem: subsystem.to_string(),
            index,
            method: method.to_string(),
            error,
        })
}

/// The current configuration: every registered section, in replay order.
pub fn collect(svc: &Service) -> Value {
    let table = table(svc);
    let subsystems: Vec<Value> = table
        .config_sections()
        .into_iter()
        .map(|s| json!({"subsystem": s.name, "config": (s.collect)(svc)}))
        .collect();
    json!({ "subsystems": subsystems })
}

/// One subsystem's section, if such a subsystem exists.
pub fn collect_section(svc: &Service, name: &str) -> Option<Vec<Value>> {
    let table = table(svc);
    let sections = table.config_sections();
    sections
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| (s.collect)(svc))
}

/// Writes `config` to `path` atomically, pretty-printed, as `--json` reads it.
///
/// The text goes to a new temporary file in the same directory, which is
/// fsynced and renamed over `path`; then the directory is fsynced, so that
/// after a crash `path` holds either the old config or the whole new one. A
/// `path` that exists and is not a regular file (a device node, a FIFO, a
/// symlink, a directory) is refused and left untouched: renaming over it
/// would replace it (a symlink itself, not its target) with a regular file.
/// The new file keeps the permissions of the file it replaces.
pub fn write(config: &Value, path: &Path) -> Result<(), ConfigError> {
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| ConfigError::Io {
            what,
            path: path.clone(),
            source,
        }
    };
    let old = match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_file() => Some(md),
        Ok(md) => {
            return Err(ConfigError::NotRegular {
                path: path.to_path_buf(),
                kind: bdev::open_checked::kind(&md.file_type()),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("inspecting")(e)),
    };
    let name = path
        .file_name()
        .ok_or_else(|| ConfigError::Format(format!("{}: not a file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mut text =
        serde_json::to_vec_pretty(config).map_err(|e| ConfigError::Format(e.to_string()))?;
    text.push(b'\n');
    let res = (|| {
        // A leftover of an earlier failed save by a process with this pid is ours.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        if let Some(md) = &old {
            f.set_permissions(md.permissions())?;
        }
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(io("writing"))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory of"))
}
