//! `sluice perf` in its own process: start reactors, create the bdevs the
//! flags and the JSON config name, run the engine, then flush every bdev the
//! run wrote and close and delete every bdev it created (qcow2 images through
//! `bdev_qcow2_delete`, which writes their metadata back), so what perf wrote
//! is durable and images are clean when it exits.

use super::RunError;
use bdev::device::Device;
use bdev::malloc::{MallocBdev, MallocOptions};
use bdev::null::{NullBdev, NullOptions};
use bdev::uring::{UringBdev, UringOptions};
use bdev::{IoStatus, IoType};
use perf::args::{self, PerfArgs};
use perf::engine::{self, Claimed, Outcome};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use rpc::{Params, Service};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

/// Sets up the reactors and bdevs, runs the jobs, tears everything down.
/// A failure to flush or close a bdev fails the outcome (it is listed in
/// the document's `errors`).
pub fn execute(args: &PerfArgs) -> Result<Outcome, RunError> {
    args.validate()?;
    let opts = args.options();
    let mask = opts.cpumask.clone().unwrap_or_else(|| "0x1".into());
    let cores = CoreSet::from_mask(&mask)?;
    let rt = Runtime::start(RuntimeConfig {
        pin: !args.no_pin,
        ..RuntimeConfig::new(cores)
    })?;
    let h = rt.handle();
    let (tx, _rx) = std::sync::mpsc::channel();
    let svc = Service::new(h.clone(), std::env::temp_dir(), tx);
    let _ = svc.table.set(Arc::new(rpc::methods::build_table()));
    let res = create_bdevs(args, &svc).and_then(|()| {
        if !args.json {
            println!("Running I/O for {} seconds...", args.time);
        }
        // The run covers every reactor of this process: name them all.
        let mut o = opts.clone();
        o.cpumask = Some(mask);
        Ok(engine::run(svc.graph.nodes(), &h, &o, Claimed::Allow)?)
    });
    let mut closing = Vec::new();
    if let Ok(out) = &res {
        if engine::writes(opts.workload) {
            let mut written: Vec<&str> = out.results.iter().map(|r| r.spec.bdev.as_str()).collect();
            written.dedup();
            closing.extend(flush(svc.graph.nodes(), &h, &written));
        }
    }
    closing.extend(teardown(&svc));
    drop(svc);
    rt.shutdown();
    let mut out = res?;
    if !closing.is_empty() {
        out.ok = false;
        out.json["ok"] = json!(false);
        if let Some(errs) = out.json["errors"].as_array_mut() {
            errs.extend(closing.into_iter().map(serde_json::Value::String));
        }
    }
    Ok(out)
}

fn create_bdevs(args: &PerfArgs, svc: &Arc<Service>) -> Result<(), RunError> {
    for s in &args.null {
        let (name, mib, bs, nozero) = args::parse_null_spec(s)?;
        let opts = NullOptions {
            zero_reads: !nozero,
        };
        svc.graph.register(NullBdev::with_options(
            &name,
            (mib << 20) / bs as u64,
            bs,
            None,
            opts,
        )?)?;
    }
    for s in &args.malloc {
        let (name, mib, bs) = args::parse_mem_spec("malloc", s)?;
        // Populated at creation, as SPDK's malloc bdev is: no page faults while measuring.
        let opts = MallocOptions { populate: true };
        svc.graph.register(MallocBdev::with_options(
            &name,
            (mib << 20) / bs as u64,
            bs,
            None,
            opts,
        )?)?;
    }
    for (i, s) in args.files.iter().enumerate() {
        let (name, path) = match s.split_once('=') {
            Some((n, p)) if !n.is_empty() && !n.contains('/') => (n.to_string(), p),
            _ => (format!("Uring{i}"), s.as_str()),
        };
        let opts = UringOptions {
            direct: !args.buffered,
            read_only: false,
            block_size: args.block_size,
            locking: Default::default(),
        };
        svc.graph
            .register(UringBdev::open(&name, Path::new(path), opts)?)?;
    }
    if let Some(cfg) = &args.config {
        rpc::config::replay(svc, cfg)?;
    }
    Ok(())
}

/// Flushes each named bdev (from the first reactor); returns the failures.
fn flush(nodes: &bdev::Registry, h: &RuntimeHandle, names: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for name in names {
        let Ok(b) = nodes.get(name) else {
            continue;
        };
        if !b.io_type_supported(IoType::Flush) {
            continue;
        }
        let n = name.to_string();
        let st = h
            .spawn_on(0, move || async move {
                match bdev::channel(&b) {
                    Ok(ch) => match bdev::simple_io(&ch, IoType::Flush, 0, 0).await {
                        IoStatus::Success => Ok(()),
                        st => Err(st.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                }
            })
            .block()
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match st {
            Ok(()) => tracing::debug!(bdev = %n, "flushed"),
            Err(e) => problems.push(format!("flushing {n} at exit failed: {e}")),
        }
    }
    problems
}

/// Closes and deletes every bdev of this process, users before what they
/// claim; returns the failures.
fn teardown(svc: &Arc<Service>) -> Vec<String> {
    let mut problems = Vec::new();
    loop {
        let free: Vec<_> = svc
            .graph
            .nodes()
            .list()
            .into_iter()
            .filter(|b| svc.graph.nodes().claims(b.name()).is_empty())
            .collect();
        let mut progress = false;
        for b in free {
            let name = b.name().to_string();
            if !svc.graph.nodes().contains(&name) {
                continue; // went with a node above it
            }
            let image = Device::from_bdev(&b).is_some() || graph::node::image(&b).is_some();
            drop(b);
            let res = if image {
                svc.table()
                    .call(
                        svc,
                        "bdev_qcow2_delete",
                        Params(Some(json!({ "name": name }))),
                        false,
                    )
                    .map(|_| ())
            } else {
                rpc::methods::common::delete_bdev(svc, &name)
            };
            match res {
                Ok(()) => progress = true,
                Err(e) => problems.push(format!("closing {name} at exit failed: {e}")),
            }
        }
        if !progress {
            break;
        }
    }
    let left: Vec<String> = svc
        .graph
        .nodes()
        .list()
        .iter()
        .map(|b| b.name().to_string())
        .collect();
    if !left.is_empty() && problems.is_empty() {
        problems.push(format!("bdevs left open at exit: {}", left.join(", ")));
    }
    problems
}
