//! `sluice rpc ... --wait`: follows the block job a command started with a live
//! progress bar (bytes, rate, ETA) on stderr, and ends with the completion
//! event's content on stdout.

use super::{call, ClientError};
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The events that end a job, for today's API and for the 2011 one
/// (`block_stream`, whose completion is `BLOCK_STREAM_COMPLETED`).
fn end_events(legacy: bool) -> &'static [&'static str] {
    if legacy {
        &["BLOCK_STREAM_COMPLETED", "BLOCK_JOB_CANCELLED"]
    } else {
        &["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]
    }
}

/// The id of the job a command starts: `job-id`, else `device`.
pub fn job_id_of(params: &Option<Value>) -> Option<String> {
    let p = params.as_ref()?;
    p.get("job-id")
        .or_else(|| p.get("device"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The newest job event's sequence number (events after it are new).
pub fn last_event_id(addr: &str, timeout: Duration) -> Result<u64, ClientError> {
    let v = call(addr, "x-query-job-events", None, timeout)?;
    Ok(v.as_array()
        .and_then(|a| a.last())
        .and_then(|n| n.get("seq"))
        .and_then(Value::as_u64)
        .unwrap_or(0))
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// One line of progress: bar, percentage, bytes, rate and ETA.
pub fn progress_line(offset: u64, len: u64, rate: f64) -> String {
    const W: usize = 30;
    let frac = if len == 0 {
        1.0
    } else {
        (offset as f64 / len as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * W as f64).round() as usize;
    let eta = if rate > 0.0 && len > offset {
        let s = ((len - offset) as f64 / rate).round() as u64;
        format!("{}:{:02}", s / 60, s % 60)
    } else {
        "--:--".into()
    };
    format!(
        "[{}{}] {:5.1}% {} / {}  {}/s  ETA {eta}",
        "#".repeat(filled),
        " ".repeat(W - filled),
        frac * 100.0,
        human(offset as f64),
        human(len as f64),
        human(rate),
    )
}

/// Follows job `id` until its end event (published after `after`); returns
/// that event as `{"event", "data"}` and whether the job succeeded.
pub fn follow(
    addr: &str,
    id: &str,
    after: u64,
    legacy: bool,
    timeout: Duration,
) -> Result<(Value, bool), ClientError> {
    let tty = std::io::stderr().is_terminal();
    let mut since = after;
    let (mut last_off, mut last_t, mut rate) = (0u64, Instant::now(), 0.0f64);
    let mut last_print = Instant::now() - Duration::from_secs(10);
    loop {
        let evs = call(
            addr,
            "x-query-job-events",
            Some(json!({"after": since})),
            timeout,
        )?;
        for n in evs.as_array().into_iter().flatten() {
            if let Some(i) = n.get("seq").and_then(Value::as_u64) {
                since = since.max(i);
            }
            let ty = n.get("event").and_then(Value::as_str).unwrap_or("");
            let data = n.get("data").cloned().unwrap_or(Value::Null);
            if end_events(legacy).contains(&ty)
                && data.get("device").and_then(Value::as_str) == Some(id)
            {
                if let (Some(o), Some(l)) = (
                    data.get("offset").and_then(Value::as_u64),
                    data.get("len").and_then(Value::as_u64),
                ) {
                    eprintln!("\r{}", progress_line(o, l, rate));
                }
                let ok = ty != "BLOCK_JOB_CANCELLED" && data.get("error").is_none();
                return Ok((json!({"event": ty, "data": data}), ok));
            }
        }
        let jobs = call(addr, "query-block-jobs", None, timeout)?;
        let job = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j.get("device").and_then(Value::as_str) == Some(id));
        if let Some(j) = job {
            let off = j.get("offset").and_then(Value::as_u64).unwrap_or(0);
            let len = j.get("len").and_then(Value::as_u64).unwrap_or(0);
            let dt = last_t.elapsed().as_secs_f64();
            if dt > 0.0 && off >= last_off {
                let r = (off - last_off) as f64 / dt;
                rate = if rate == 0.0 { r } else { 0.7 * rate + 0.3 * r };
            }
            (last_off, last_t) = (off, Instant::now());
            // A bar redrawn in place on a terminal; a line a second otherwise.
            if tty {
                eprint!("\r{}", progress_line(off, len, rate));
                let _ = std::io::stderr().flush();
            } else if last_print.elapsed() >= Duration::from_secs(1) {
                eprintln!("{}", progress_line(off, len, rate));
                last_print = Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_bytes_rate_and_eta() {
        let l = progress_line(512 << 20, 1 << 30, 128.0 * 1048576.0);
        assert!(l.contains(" 50.0%"), "{l}");
        assert!(l.contains("512.0 MiB / 1.0 GiB"), "{l}");
        assert!(l.contains("128.0 MiB/s"), "{l}");
        assert!(l.contains("ETA 0:04"), "{l}");
        assert!(progress_line(0, 0, 0.0).contains("100.0%"));
        assert_eq!(
            job_id_of(&Some(json!({"device": "d", "job-id": "j"}))).as_deref(),
            Some("j")
        );
        assert_eq!(
            job_id_of(&Some(json!({"device": "d"}))).as_deref(),
            Some("d")
        );
    }
}
