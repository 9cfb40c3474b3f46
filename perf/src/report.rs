//! Results as JSON with bdevperf's result field names plus percentiles, and
//! the table bdevperf prints (a line per job and a total) rendered from it.

use super::hist::Histogram;
use super::job::JobResult;
use super::pattern::hex;
use serde_json::{json, Value};
use std::fmt::Write;

/// Figures of one line of the report.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Seconds measured.
    pub runtime: f64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mibps: f64,
    /// Failed requests per second.
    pub fail_per_s: f64,
    /// Latencies in microseconds.
    pub avg_us: f64,
    /// Minimum latency.
    pub min_us: f64,
    /// Maximum latency.
    pub max_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

fn us(ticks: u64, hz: f64) -> f64 {
    ticks as f64 * 1e6 / hz
}

/// The figures of one job.
pub fn job_figures(r: &JobResult, hz: f64) -> Figures {
    let runtime = r.runtime_ticks as f64 / hz;
    Figures {
        runtime,
        iops: r.ios as f64 / runtime,
        mibps: r.bytes as f64 / runtime / (1 << 20) as f64,
        fail_per_s: r.fails as f64 / runtime,
        avg_us: if r.ios == 0 {
            0.0
        } else {
            us(r.lat_sum, hz) / r.ios as f64
        },
        min_us: us(r.lat_min, hz),
        max_us: us(r.lat_max, hz),
        p50_us: us(r.hist.quantile(0.5), hz),
        p99_us: us(r.hist.quantile(0.99), hz),
        p999_us: us(r.hist.quantile(0.999), hz),
    }
}

/// The total over every job: rates add up, latencies combine.
pub fn total_figures(rs: &[JobResult], hz: f64) -> Figures {
    let mut hist = Histogram::default();
    let (mut ios, mut sum, mut min, mut max) = (0u64, 0u64, u64::MAX, 0u64);
    let mut t = Figures::default();
    for r in rs {
        let f = job_figures(r, hz);
        t.iops += f.iops;
        t.mibps += f.mibps;
        t.fail_per_s += f.fail_per_s;
        t.runtime = t.runtime.max(f.runtime);
        hist.merge(&r.hist);
        ios += r.ios;
        sum += r.lat_sum;
        if r.ios > 0 {
            min = min.min(r.lat_min);
        }
        max = max.max(r.lat_max);
    }
    t.avg_us = if ios == 0 {
        0.0
    } else {
        us(sum, hz) / ios as f64
    };
    t.min_us = if ios == 0 { 0.0 } else { us(min, hz) };
    t.max_us = us(max, hz);
    t.p50_us = us(hist.quantile(0.5), hz);
    t.p99_us = us(hist.quantile(0.99), hz);
    t.p999_us = us(hist.quantile(0.999), hz);
    t
}

fn core_mask(core: usize) -> String {
    format!("{:#x}", 1u128 << core.min(127))
}

/// Problems to print after the table (verify mismatches, first errors).
pub fn problems(rs: &[JobResult]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rs {
        if let Some(m) = &r.mismatch {
            out.push(format!(
                "verify failed on {} (core {}): mismatch at offset {} ({:#x}): expected [{}], read [{}]",
                r.spec.bdev,
                r.spec.core,
                m.offset,
                m.offset,
                hex(&m.expected),
                hex(&m.actual)
            ));
        }
        if let Some((st, off)) = r.first_error {
            out.push(format!(
                "{} I/O error(s) on {} (core {}); first: {} at offset {off}",
                r.fails, r.spec.bdev, r.spec.core, st
            ));
        }
    }
    out
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Failures per second of a job or total line of the JSON document.
fn fail_rate(v: &Value) -> f64 {
    let rt = num(v, "runtime");
    if rt > 0.0 {
        num(v, "io_failed") / rt
    } else {
        0.0
    }
}

/// The bdevperf-style table, rendered from the JSON document (so a run in a
/// daemon prints exactly as a local one).
pub fn table(doc: &Value) -> String {
    let mut s = String::new();
    let w = 139;
    let _ = writeln!(s, "{:>w$}", "Latency(us)");
    let _ = writeln!(
        s,
        " {:<28}: {:>10} {:>12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "TO/s",
        "Average",
        "min",
        "max",
        "p50",
        "p99",
        "p99.9"
    );
    let empty = Vec::new();
    for r in doc["results"].as_array().unwrap_or(&empty) {
        let job = r["job"].as_str().unwrap_or("?");
        let _ = writeln!(
            s,
            " Job: {} (Core Mask {}, workload: {}, depth: {}, IO size: {})",
            job,
            r["core_mask"].as_str().unwrap_or("?"),
            r["workload"].as_str().unwrap_or("?"),
            r["queue_depth"],
            r["io_size"]
        );
        let _ = writeln!(
            s,
            "\t {:<20}: {:>10.2} {:>12.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            job,
            num(r, "runtime"),
            num(r, "iops"),
            num(r, "mibps"),
            fail_rate(r),
            0.0,
            num(r, "avg_latency_us"),
            num(r, "min_latency_us"),
            num(r, "max_latency_us"),
            num(r, "p50_latency_us"),
            num(r, "p99_latency_us"),
            num(r, "p999_latency_us")
        );
    }
    let _ = writeln!(s, " {}", "=".repeat(w));
    let t = &doc["total"];
    let _ = writeln!(
        s,
        " {:<28}: {:>10} {:>12.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
        "Total",
        "",
        num(t, "iops"),
        num(t, "mibps"),
        fail_rate(t),
        0.0,
        num(t, "avg_latency_us"),
        num(t, "min_latency_us"),
        num(t, "max_latency_us"),
        num(t, "p50_latency_us"),
        num(t, "p99_latency_us"),
        num(t, "p999_latency_us")
    );
    s
}

fn figures_json(f: &Figures) -> Value {
    json!({
        "runtime": f.runtime,
        "iops": f.iops,
        "mibps": f.mibps,
        "io_failed": f.fail_per_s * f.runtime,
        "io_timeout": 0,
        "avg_latency_us": f.avg_us,
        "min_latency_us": f.min_us,
        "max_latency_us": f.max_us,
        "p50_latency_us": f.p50_us,
        "p99_latency_us": f.p99_us,
        "p999_latency_us": f.p999_us,
    })
}

/// The JSON document (`--json`).
pub fn json_doc(rs: &[JobResult], hz: f64, ok: bool) -> Value {
    let results: Vec<Value> = rs
        .iter()
        .map(|r| {
            let mut v = figures_json(&job_figures(r, hz));
            let o = v.as_object_mut().expect("object");
            o.insert("job".into(), json!(r.spec.bdev));
            o.insert("core_mask".into(), json!(core_mask(r.spec.core)));
            o.insert("workload".into(), json!(r.spec.workload.name()));
            o.insert("status".into(), json!(if r.mismatch.is_some() || (r.fails > 0 && !r.spec.continue_on_failure) { "failed" } else { "finished" }));
            o.insert("queue_depth".into(), json!(r.spec.queue_depth));
            o.insert("io_size".into(), json!(r.spec.io_size));
            o.insert("io_failed".into(), json!(r.fails));
            if let Some(m) = &r.mismatch {
                o.insert(
                    "verify_mismatch".into(),
                    json!({"offset": m.offset, "expected": hex(&m.expected), "actual": hex(&m.actual)}),
                );
            }
            v
        })
        .collect();
    json!({ "results": results, "total": figures_json(&total_figures(rs, hz)), "ok": ok, "errors": problems(rs) })
}
