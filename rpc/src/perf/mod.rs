//! `sluice perf`: SPDK bdevperf's job. Bdevs come from flags or from an SPDK
//! JSON config; one job per reactor per bdev (each on its own share of the
//! bdev) keeps `-q` requests in flight for `-t` seconds; the results are
//! printed as bdevperf prints them, or as JSON.

pub mod args;
pub mod hist;
pub mod job;
pub mod pattern;
pub mod report;

pub use args::{PerfArgs, Workload};

use crate::service::Service;
use bdev::malloc::{MallocBdev, MallocOptions};
use bdev::null::{NullBdev, NullOptions};
use bdev::uring::{UringBdev, UringOptions};
use bdev::{registry, Bdev, BdevError, IoType};
use job::{Job, JobResult, JobSpec};
use reactor::{CoreSet, Runtime, RuntimeConfig, RuntimeHandle};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use thiserror::Error;

/// Why a perf run could not be set up or carried out.
#[derive(Debug, Error)]
pub enum PerfError {
    /// Bad options.
    #[error("{0}")]
    Args(String),
    /// The reactors could not start.
    #[error("reactors: {0}")]
    Reactor(#[from] reactor::ReactorError),
    /// A bdev could not be created or used.
    #[error("{0}")]
    Bdev(#[from] BdevError),
    /// The JSON config could not be replayed.
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// A job failed to start.
    #[error("job on {bdev}: {msg}")]
    Job {
        /// The bdev.
        bdev: String,
        /// What went wrong.
        msg: String,
    },
}

/// Runs `sluice perf`; the exit code is 0 when every job finished cleanly, 1
/// when a verify mismatch or (without `-f`) an I/O error happened, 2 when the
/// run could not be set up.
pub fn run(args: PerfArgs) -> ExitCode {
    match execute(&args) {
        Ok(outcome) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&outcome.json).unwrap_or_default()
                );
            } else {
                print!("{}", outcome.table);
                for p in &outcome.problems {
                    eprintln!("sluice perf: {p}");
                }
            }
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("sluice perf: {e}");
            ExitCode::from(2)
        }
    }
}

/// The result of a run.
pub struct Outcome {
    /// Every job's result.
    pub results: Vec<JobResult>,
    /// The printed table.
    pub table: String,
    /// The JSON document.
    pub json: serde_json::Value,
    /// Verify mismatches and I/O errors, one line each.
    pub problems: Vec<String>,
    /// Whether the run passed.
    pub ok: bool,
}

/// Sets up the reactors and bdevs, runs the jobs and gathers the results.
pub fn execute(args: &PerfArgs) -> Result<Outcome, PerfError> {
    args.validate()?;
    let cores = CoreSet::from_mask(&args.cpumask)?;
    let rt = Runtime::start(RuntimeConfig {
        pin: !args.no_pin,
        ..RuntimeConfig::new(cores)
    })?;
    let h = rt.handle();
    let res = (|| {
        let _svc = create_bdevs(args, &h)?;
        let targets = targets(args)?;
        let specs = plan(args, &targets, &h)?;
        if !args.json {
            println!("Running I/O for {} seconds...", args.time);
        }
        run_jobs(specs, &h)
    })();
    rt.shutdown();
    let results = res?;
    let hz = reactor::ticks_hz() as f64;
    let problems = report::problems(&results);
    let ok = results
        .iter()
        .all(|r| r.mismatch.is_none() && (r.fails == 0 || args.continue_on_failure));
    Ok(Outcome {
        table: report::table(&results, hz),
        json: report::json_doc(&results, hz, ok),
        problems,
        ok,
        results,
    })
}

fn create_bdevs(args: &PerfArgs, h: &RuntimeHandle) -> Result<Option<Arc<Service>>, PerfError> {
    for s in &args.null {
        let (name, mib, bs, nozero) = args::parse_null_spec(s)?;
        let opts = NullOptions {
            zero_reads: !nozero,
        };
        registry().register(NullBdev::with_options(
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
        registry().register(MallocBdev::with_options(
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
        };
        registry().register(UringBdev::open(&name, Path::new(path), opts)?)?;
    }
    let Some(cfg) = &args.config else {
        return Ok(None);
    };
    let (tx, _rx) = std::sync::mpsc::channel();
    let svc = Service::new(h.clone(), std::env::temp_dir(), tx);
    crate::config::replay(&svc, cfg)?;
    Ok(Some(svc))
}

fn targets(args: &PerfArgs) -> Result<Vec<Arc<dyn Bdev>>, PerfError> {
    let list: Vec<Arc<dyn Bdev>> = if args.bdevs.is_empty() {
        registry()
            .list()
            .into_iter()
            .filter(|b| registry().claims(b.name()).is_empty())
            .collect()
    } else {
        args.bdevs
            .iter()
            .map(|n| registry().get(n))
            .collect::<Result<_, _>>()?
    };
    if list.is_empty() {
        return Err(PerfError::Args(
            "no bdev to run on (every bdev is claimed by another)".into(),
        ));
    }
    Ok(list)
}

fn needed_io_types(w: Workload) -> &'static [IoType] {
    match w {
        Workload::Read | Workload::RandRead => &[IoType::Read],
        Workload::Write | Workload::RandWrite => &[IoType::Write],
        Workload::Rw | Workload::RandRw | Workload::Verify => &[IoType::Read, IoType::Write],
        Workload::Flush => &[IoType::Flush],
        Workload::Unmap => &[IoType::Unmap],
        Workload::WriteZeroes => &[IoType::WriteZeroes],
    }
}

/// One job per reactor per bdev, each on an equal, disjoint share of the bdev.
fn plan(
    args: &PerfArgs,
    targets: &[Arc<dyn Bdev>],
    h: &RuntimeHandle,
) -> Result<Vec<JobSpec>, PerfError> {
    let n = h.num_reactors() as u64;
    let cores = h.cores();
    let run_ticks = (args.time * reactor::ticks_hz() as f64) as u64;
    let mut specs = Vec::new();
    for b in targets {
        let bs = b.block_size() as u64;
        if !args.io_size.is_multiple_of(bs) {
            return Err(PerfError::Args(format!(
                "-o {}: the I/O size is not a multiple of {}'s block size {bs}",
                args.io_size,
                b.name()
            )));
        }
        for t in needed_io_types(args.workload) {
            if !b.io_type_supported(*t) {
                return Err(PerfError::Args(format!(
                    "bdev {} does not support {}",
                    b.name(),
                    t.name()
                )));
            }
        }
        if b.read_only() && args.workload != Workload::Read && args.workload != Workload::RandRead {
            return Err(PerfError::Args(format!("bdev {} is read-only", b.name())));
        }
        let share = b.size() / n;
        let region_ios = share / args.io_size;
        if region_ios == 0 {
            return Err(PerfError::Args(format!(
                "bdev {} ({} bytes) is too small for {} job(s) of {}-byte requests",
                b.name(),
                b.size(),
                n,
                args.io_size
            )));
        }
        for i in 0..n {
            let idx = specs.len() as u64;
            specs.push(JobSpec {
                bdev: b.name().to_string(),
                reactor: i as usize,
                core: cores[i as usize],
                workload: args.workload,
                io_size: args.io_size,
                queue_depth: args.queue_depth,
                read_percent: args.read_percent(),
                region_start: i * region_ios * args.io_size,
                region_ios,
                run_ticks,
                continue_on_failure: args.continue_on_failure,
                seed: 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(idx + 1),
            });
        }
    }
    Ok(specs)
}

fn run_jobs(specs: Vec<JobSpec>, h: &RuntimeHandle) -> Result<Vec<JobResult>, PerfError> {
    let mut handles = Vec::new();
    for r in 0..h.num_reactors() {
        let mine: Vec<JobSpec> = specs.iter().filter(|s| s.reactor == r).cloned().collect();
        handles.push(h.spawn_on(r, move || async move {
            let mut rxs = Vec::new();
            let mut jobs = Vec::new();
            for spec in mine {
                let name = spec.bdev.clone();
                let err = |e: BdevError| PerfError::Job {
                    bdev: name.clone(),
                    msg: e.to_string(),
                };
                let b = registry().get(&spec.bdev).map_err(err)?;
                let ch = bdev::channel(&b).map_err(err)?;
                let (job, rx) = Job::new(spec, ch).map_err(err)?;
                jobs.push(job);
                rxs.push(rx);
            }
            for j in &jobs {
                j.start();
            }
            let mut out = Vec::new();
            for rx in rxs {
                if let Ok(r) = rx.await {
                    out.push(r);
                }
            }
            drop(jobs);
            Ok::<_, PerfError>(out)
        }));
    }
    let mut results = Vec::new();
    for hd in handles {
        let rs = hd.block().map_err(|e| PerfError::Job {
            bdev: "-".into(),
            msg: e.to_string(),
        })??;
        results.extend(rs);
    }
    results.sort_by(|a, b| {
        (a.spec.bdev.as_str(), a.spec.reactor).cmp(&(b.spec.bdev.as_str(), b.spec.reactor))
    });
    Ok(results)
}
