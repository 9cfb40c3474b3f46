//! The framework methods: introspection, version, reactors and threads,
//! configuration, and stopping the daemon; QMP's own `query-version`,
//! `query-commands` and `quit`.

use crate::config;
use crate::error::RpcError;
use crate::service::{Service, StopReason};
use crate::table::{Dialect, MethodTable, Params};
use reactor::ReactorStats;
use serde::Deserialize;
use serde_json::{json, Value};

/// Registers the framework methods.
pub fn register(t: &mut MethodTable) {
    t.add("rpc_get_methods", rpc_get_methods);
    t.add("spdk_get_version", |_, p| {
        p.none()?;
        Ok(spdk_version())
    });
    t.add("framework_get_reactors", framework_get_reactors);
    t.add("thread_get_stats", thread_get_stats);
    t.add("thread_get_pollers", thread_get_pollers);
    t.add("framework_get_subsystems", framework_get_subsystems);
    t.add("framework_get_config", framework_get_config);
    t.add("save_config", save_config);
    t.add("spdk_kill_instance", spdk_kill_instance);
    t.add_in("query-version", Dialect::QmpOnly, |_, p| {
        p.none()?;
        Ok(crate::qmp::session::version())
    });
    t.add_in("query-commands", Dialect::QmpOnly, |svc, p| {
        p.none()?;
        let mut names = svc.table().names(true);
        names.push("qmp_capabilities".into());
        names.sort();
        Ok(Value::Array(
            names.into_iter().map(|n| json!({"name": n})).collect(),
        ))
    });
    t.add_in("quit", Dialect::QmpOnly, |svc, p| {
        p.none()?;
        svc.events.publish(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        );
        svc.request_stop(StopReason::Rpc);
        Ok(json!({}))
    });
}

/// SPDK's parameters; both are accepted and change nothing here: every method
/// is callable in every state, and there are no deprecated aliases.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct GetMethods {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

fn rpc_get_methods(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let _: GetMethods = p.parse()?;
    Ok(json!(svc.table().names(false)))
}

/// `spdk_get_version`'s answer, for sluice.
fn spdk_version() -> Value {
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "version": format!("sluice v{}", env!("CARGO_PKG_VERSION")),
        "fields": {
            "major": num(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": num(env!("CARGO_PKG_VERSION_MINOR")),
            "patch": num(env!("CARGO_PKG_VERSION_PATCH")),
            "suffix": env!("CARGO_PKG_VERSION_PRE"),
        }
    })
}

fn reactor_stats(svc: &Service) -> Vec<ReactorStats> {
    futures::executor::block_on(svc.rt.stats())
}

/// SPDK prints cpumasks as bare hex.
fn core_mask(core: usize) -> String {
    format!("{}{}", [1, 2, 4, 8][core % 4], "0".repeat(core / 4))
}

fn thread_name(s: &ReactorStats) -> String {
    format!("reactor_{}", s.index)
}

fn framework_get_reactors(svc: &Service, p: Params) -> Result<Value, RpcError> {
    p.none()?;
    let stats = reactor_stats(svc);
    let reactors: Vec<Value> = stats
        .iter()
        .map(|s| {
            json!({
                "lcore": s.core,
                "busy": s.busy_ticks,
                "idle": s.idle_ticks,
                "in_interrupt": false,
                "irq": 0,
                "sys": 0,
                "usr": 0,
                "lw_threads": [{
                    "name": thread_name(s),
                    "id": s.index + 1,
                    "cpumask": core_mask(s.core),
                    "elapsed": s.busy_ticks + s.idle_ticks,
                }],
            })
        })
        .collect();
    Ok(json!({"tick_rate": reactor::ticks_hz(), "pid": std::process::id(), "reactors": reactors}))
}

fn thread_get_stats(svc: &Service, p: Params) -> Result<Value, RpcError> {
    p.none()?;
    let threads: Vec<Value> = reactor_stats(svc)
        .iter()
        .map(|s| {
            let count = |timed: bool, state: &str| {
                s.pollers
                    .iter()
                    .filter(|p| p.period_us.is_some() == timed && p.state == state)
                    .count()
            };
            json!({
                "name": thread_name(s),
                "id": s.index + 1,
                "cpumask": core_mask(s.core),
                "busy": s.busy_ticks,
                "idle": s.idle_ticks,
                "active_pollers_count": count(false, "running"),
                "timed_pollers_count": count(true, "running"),
                "paused_pollers_count": s.pollers.iter().filter(|p| p.state != "running").count(),
            })
        })
        .collect();
    Ok(json!({"tick_rate": reactor::ticks_hz(), "threads": threads}))
}

/// SPDK's `thread_get_pollers`: each reactor's pollers with their run and
/// busy counts, active, timed (with `period_ticks`) and paused. A poller is
/// "waiting" as SPDK reports one that is not running at the moment (none
/// runs while its reactor answers).
fn thread_get_pollers(svc: &Service, p: Params) -> Result<Value, RpcError> {
    p.none()?;
    let hz = reactor::ticks_hz();
    let threads: Vec<Value> = reactor_stats(svc)
        .iter()
        .map(|s| {
            let list = |keep: &dyn Fn(&reactor::PollerStats) -> bool| -> Vec<Value> {
                s.pollers
                    .iter()
                    .filter(|p| keep(p))
                    .map(|p| {
                        let mut v = json!({
                            "name": p.name,
                            "id": p.id,
                            "state": if p.state == "running" { "waiting" } else { p.state },
                            "run_count": p.run_count,
                            "busy_count": p.busy_count,
                        });
                        if let Some(us) = p.period_us {
                            v["period_ticks"] = json!(us.saturating_mul(hz) / 1_000_000);
                        }
                        v
                    })
                    .collect()
            };
            let running = |p: &reactor::PollerStats| p.state == "running";
            json!({
                "name": thread_name(s),
                "id": s.index + 1,
                "active_pollers": list(&|p| running(p) && p.period_us.is_none()),
                "timed_pollers": list(&|p| running(p) && p.period_us.is_some()),
                "paused_pollers": list(&|p| !running(p)),
            })
        })
        .collect();
    Ok(json!({"tick_rate": hz, "threads": threads}))
}

fn framework_get_subsystems(svc: &Service, p: Params) -> Result<Value, RpcError> {
    p.none()?;
    let table = svc.table();
    let subs: Vec<Value> = table
        .config_sections()
        .into_iter()
        .map(|s| json!({"subsystem": s.name, "depends_on": s.depends_on}))
        .collect();
    Ok(Value::Array(subs))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    /// Accepted for SPDK's client; sections never hold batches, so the result
    /// is flat either way.
    #[serde(default)]
    #[allow(dead_code)]
    with_batches: bool,
}

fn framework_get_config(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let GetConfig { name, .. } = p.parse()?;
    config::collect_section(svc, &name)
        .map(Value::Array)
        .ok_or_else(|| RpcError::invalid_params(format!("Subsystem '{name}' not found")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveConfig {
    /// Also write the config to this file (atomically).
    filename: Option<String>,
}

fn save_config(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let SaveConfig { filename } = p.parse()?;
    let cfg = config::collect(svc);
    if let Some(f) = filename {
        config::write(&cfg, std::path::Path::new(&f))?;
        tracing::info!(file = %f, "configuration saved");
    }
    Ok(cfg)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillInstance {
    sig_name: String,
}

fn spdk_kill_instance(svc: &Service, p: Params) -> Result<Value, RpcError> {
    let KillInstance { sig_name } = p.parse()?;
    let name = sig_name.trim_start_matches("SIG");
    let sig = match name {
        "INT" => libc::SIGINT,
        "TERM" => libc::SIGTERM,
        "QUIT" => libc::SIGQUIT,
        "KILL" => {
            tracing::warn!("spdk_kill_instance SIGKILL: exiting at once");
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
            return Ok(Value::Bool(true));
        }
        _ => {
            return Err(RpcError::invalid_params(format!(
                "sig_name: {sig_name:?} is not one of SIGINT, SIGTERM, SIGQUIT, SIGKILL"
            )))
        }
    };
    tracing::info!(signal = %sig_name, "stop requested over RPC");
    svc.request_stop(StopReason::Signal(sig));
    Ok(Value::Bool(true))
}

#[cfg(test)]
mod tests {
    use super::core_mask;

    #[test]
    fn masks() {
        assert_eq!(core_mask(0), "1");
        assert_eq!(core_mask(5), "20");
        assert_eq!(core_mask(127), format!("{:x}", 1u128 << 127));
        assert_eq!(core_mask(130), format!("4{}", "0".repeat(32)));
    }
}
