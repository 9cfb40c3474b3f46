//! The perf engine both modes share: picks the target bdevs and reactors,
//! plans one job per reactor per bdev (each on an equal, disjoint share of the
//! range), runs them on the reactors while the calling thread waits, and turns
//! the results into the JSON document. `sluice perf` runs it in its own
//! process; `bdev_perf_run` runs it on the daemon's reactors.

use super::args::Workload;
use super::job::{Job, JobResult, JobSpec};
use super::options::RunOptions;
use super::{report, PerfError};
use bdev::device::Device;
use bdev::{Bdev, BdevError, IoType};
use reactor::{CoreSet, RuntimeHandle};
use serde_json::Value;
use std::sync::Arc;

/// May jobs write to a bdev that another bdev or a device claims?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Yes (the process owns every bdev: `sluice perf` on its own).
    Allow,
    /// No, except devices (shared front doors): writing under a device or
    /// into a qcow2 node's backing or base would corrupt it (the daemon).
    RefuseWrites,
}

/// The result of a run.
pub struct Outcome {
    /// Every job's result, by bdev then reactor (empty for a run done in a
    /// daemon, whose results arrive as `json` only).
    pub results: Vec<JobResult>,
    /// The JSON document (`sluice perf --json`, the result of `bdev_perf_run`).
    pub json: Value,
    /// Whether the run passed (no verify mismatch, no I/O error unless `-f`).
    pub ok: bool,
}

/// Runs `opts` on the reactors of `h`; blocks the calling thread (never call
/// it on a reactor) until every job has finished.
pub fn run(
    nodes: &Arc<bdev::Registry>,
    h: &RuntimeHandle,
    opts: &RunOptions,
    claimed: Claimed,
) -> Result<Outcome, PerfError> {
    opts.validate()?;
    let reactors = reactors(h, opts.cpumask.as_deref())?;
    let targets = targets(nodes, opts)?;
    let specs = plan(nodes, opts, &targets, &reactors, h, claimed)?;
    let results = run_jobs(nodes, specs, &reactors, h)?;
    Ok(summarize(results, opts.continue_on_failure))
}

/// The outcome of finished jobs.
pub fn summarize(results: Vec<JobResult>, continue_on_failure: bool) -> Outcome {
    let hz = reactor::ticks_hz() as f64;
    let ok = results
        .iter()
        .all(|r| r.mismatch.is_none() && (r.fails == 0 || continue_on_failure));
    Outcome {
        json: report::json_doc(&results, hz, ok),
        ok,
        results,
    }
}

/// Whether a workload changes the data of its bdevs.
pub fn writes(w: Workload) -> bool {
    !matches!(w, Workload::Read | Workload::RandRead | Workload::Flush)
}

/// The reactor indices of `mask` (none: the first reactor).
fn reactors(h: &RuntimeHandle, mask: Option<&str>) -> Result<Vec<usize>, PerfError> {
    let Some(mask) = mask else {
        return Ok(vec![0]);
    };
    let have = h.cores();
    CoreSet::from_mask(mask)?
        .cores()
        .iter()
        .map(|c| {
            have.iter().position(|h| h == c).ok_or_else(|| {
                PerfError::Args(format!(
                    "-m {mask}: core {c} runs no reactor (the reactors run on cores {have:?})"
                ))
            })
        })
        .collect()
}

fn targets(nodes: &bdev::Registry, opts: &RunOptions) -> Result<Vec<Arc<dyn Bdev>>, PerfError> {
    let list: Vec<Arc<dyn Bdev>> = if opts.bdevs.is_empty() {
        nodes
            .list()
            .into_iter()
            .filter(|b| nodes.claims(b.name()).is_empty())
            .collect()
    } else {
        opts.bdevs
            .iter()
            .map(|n| nodes.get(n))
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

fn check_target(
    nodes: &bdev::Registry,
    opts: &RunOptions,
    b: &Arc<dyn Bdev>,
    claimed: Claimed,
) -> Result<(), PerfError> {
    let bs = b.block_size() as u64;
    if !opts.io_size.is_multiple_of(bs) {
        return Err(PerfError::Args(format!(
            "-o {}: the I/O size is not a multiple of {}'s block size {bs}",
            opts.io_size,
            b.name()
        )));
    }
    if !opts.offset.is_multiple_of(bs) {
        return Err(PerfError::Args(format!(
            "--offset {}: not a multiple of {}'s block size {bs}",
            opts.offset,
            b.name()
        )));
    }
    for t in needed_io_types(opts.workload) {
        if !b.io_type_supported(*t) {
            return Err(PerfError::Args(format!(
                "bdev {} does not support {}",
                b.name(),
                t.name()
            )));
        }
    }
    if b.read_only() && writes(opts.workload) {
        return Err(PerfError::Args(format!("bdev {} is read-only", b.name())));
    }
    // A device is a front door shared by its clients (exports, jobs): writing
    // through it is what it is for. Any other claimed bdev is part of something.
    let claims = nodes.claims(b.name());
    if claimed == Claimed::RefuseWrites
        && writes(opts.workload)
        && !claims.is_empty()
        && Device::from_bdev(b).is_none()
    {
        return Err(PerfError::Args(format!(
            "bdev {} is claimed by {}: a {} job would corrupt it (run on the device instead)",
            b.name(),
            claims.join(", "),
            opts.workload.name()
        )));
    }
    Ok(())
}

/// One job per reactor per bdev, each on an equal, disjoint share of the range.
fn plan(
    nodes: &bdev::Registry,
    opts: &RunOptions,
    targets: &[Arc<dyn Bdev>],
    reactors: &[usize],
    h: &RuntimeHandle,
    claimed: Claimed,
) -> Result<Vec<JobSpec>, PerfError> {
    let n = reactors.len() as u64;
    let cores = h.cores();
    let run_ticks = (opts.time_in_sec * reactor::ticks_hz() as f64) as u64;
    let mut specs = Vec::new();
    for b in targets {
        check_target(nodes, opts, b, claimed)?;
        let (start, end) = opts.range(b.name(), b.size())?;
        let region_ios = (end - start) / n / opts.io_size;
        if region_ios == 0 {
            return Err(PerfError::Args(format!(
                "bdev {} ({} bytes in range) is too small for {} job(s) of {}-byte requests",
                b.name(),
                end - start,
                n,
                opts.io_size
            )));
        }
        for (i, &r) in reactors.iter().enumerate() {
            let idx = specs.len() as u64;
            specs.push(JobSpec {
                bdev: b.name().to_string(),
                reactor: r,
                core: cores[r],
                workload: opts.workload,
                io_size: opts.io_size,
                queue_depth: opts.queue_depth,
                read_percent: opts.read_percent(),
                region_start: start + i as u64 * region_ios * opts.io_size,
                region_ios,
                run_ticks,
                continue_on_failure: opts.continue_on_failure,
                seed: 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(idx + 1),
            });
        }
    }
    check_buffers(opts, &specs)?;
    Ok(specs)
}

/// Most bytes of request buffers one run may preallocate, over all its jobs.
pub const MAX_BUFFER_BYTES: u64 = 1 << 30;

/// Refuses a run whose preallocated request buffers (queue depth × I/O size,
/// twice for verify's read-back, per job) exceed [`MAX_BUFFER_BYTES`].
fn check_buffers(opts: &RunOptions, specs: &[JobSpec]) -> Result<(), PerfError> {
    if !opts.workload.has_data() {
        return Ok(());
    }
    let per_req = opts
        .io_size
        .saturating_mul(if opts.workload == Workload::Verify {
            2
        } else {
            1
        });
    let total = specs.iter().fold(0u64, |acc, s| {
        let active = if s.workload == Workload::Verify {
            (s.queue_depth as u64).min(s.region_ios)
        } else {
            s.queue_depth as u64
        };
        acc.saturating_add(active.saturating_mul(per_req))
    });
    if total > MAX_BUFFER_BYTES {
        return Err(PerfError::Args(format!(
            "-q {} x -o {} over {} job(s) needs {total} bytes of request buffers; \
             the limit is {MAX_BUFFER_BYTES} bytes (lower the queue depth, the I/O size or the jobs)",
            opts.queue_depth,
            opts.io_size,
            specs.len()
        )));
    }
    Ok(())
}

fn run_jobs(
    nodes: &Arc<bdev::Registry>,
    specs: Vec<JobSpec>,
    reactors: &[usize],
    h: &RuntimeHandle,
) -> Result<Vec<JobResult>, PerfError> {
    let mut handles = Vec::new();
    for &r in reactors {
        let mine: Vec<JobSpec> = specs.iter().filter(|s| s.reactor == r).cloned().collect();
        let nodes = nodes.clone();
        handles.push(h.spawn_on(r, move || async move {
            let mut rxs = Vec::new();
            let mut jobs = Vec::new();
            for spec in mine {
                let name = spec.bdev.clone();
                let err = |e: BdevError| PerfError::Job {
                    bdev: name.clone(),
                    msg: e.to_string(),
                };
                let b = nodes.get(&spec.bdev).map_err(err)?;
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
    let mut first_err = None;
    // Wait for every reactor's jobs even when one failed to start: none may outlive the run.
    for hd in handles {
        match hd.block() {
            Ok(Ok(rs)) => results.extend(rs),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(PerfError::Job {
                    bdev: "-".into(),
                    msg: e.to_string(),
                });
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    results.sort_by(|a, b| {
        (a.spec.bdev.as_str(), a.spec.reactor).cmp(&(b.spec.bdev.as_str(), b.spec.reactor))
    });
    Ok(results)
}
