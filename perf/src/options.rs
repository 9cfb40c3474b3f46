//! What one perf run does, independent of where it runs: the options that
//! `sluice perf` takes on its command line and `bdev_perf_run` takes as
//! parameters (the same struct travels as the RPC's `params`).

use super::args::Workload;
use super::PerfError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The options of one run (bdevperf's `-w -q -o -t -M -m -T -f`, plus a range).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// Workload (bdevperf's name, e.g. `verify`).
    pub workload: Workload,
    /// Requests in flight per job.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Bytes per request.
    #[serde(default = "default_io_size")]
    pub io_size: u64,
    /// Run time in seconds.
    #[serde(default = "default_time")]
    pub time_in_sec: f64,
    /// Read percentage of rw / randrw (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rwmixread: Option<u32>,
    /// Target bdevs or devices; empty: every bdev no other claims.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bdevs: Vec<String>,
    /// Core mask of the reactors to run jobs on (one job per reactor per bdev);
    /// none: the first reactor only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpumask: Option<String>,
    /// Count I/O errors instead of failing the run at the first.
    #[serde(default)]
    pub continue_on_failure: bool,
    /// First byte of the range each bdev is exercised on.
    #[serde(default)]
    pub offset: u64,
    /// Bytes of that range (none: to the end of the bdev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

fn default_queue_depth() -> u32 {
    32
}

fn default_io_size() -> u64 {
    4096
}

fn default_time() -> f64 {
    5.0
}

impl Serialize for Workload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Workload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Workload::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl RunOptions {
    /// Checks the combination of options (not the bdevs: those are checked
    /// where they live).
    pub fn validate(&self) -> Result<(), PerfError> {
        let bad = |m: String| Err(PerfError::Args(m));
        if self.queue_depth == 0 || self.queue_depth > 65536 {
            return bad(format!(
                "-q {}: the queue depth must be between 1 and 65536",
                self.queue_depth
            ));
        }
        if !(self.time_in_sec > 0.0 && self.time_in_sec <= 86400.0) {
            return bad(format!(
                "-t {}: the run time must be between 0 and 86400 seconds",
                self.time_in_sec
            ));
        }
        if self.io_size == 0 || self.io_size > (1 << 30) {
            return bad(format!(
                "-o {}: the I/O size must be between 1 byte and 1 GiB",
                self.io_size
            ));
        }
        if self.length == Some(0) {
            return bad("--length 0: the range must not be empty".into());
        }
        match (self.workload, self.rwmixread) {
            (Workload::Rw | Workload::RandRw, Some(m)) if m > 100 => {
                return bad(format!(
                    "-M {m}: the read percentage must be between 0 and 100"
                ))
            }
            (Workload::Rw | Workload::RandRw, _) | (_, None) => {}
            (w, Some(_)) => {
                return bad(format!(
                    "-M only applies to rw and randrw, not {}",
                    w.name()
                ))
            }
        }
        Ok(())
    }

    /// The read percentage of mixed workloads (bdevperf's -M; 50 if not given).
    pub fn read_percent(&self) -> u32 {
        match self.workload {
            Workload::Read | Workload::RandRead => 100,
            Workload::Rw | Workload::RandRw => self.rwmixread.unwrap_or(50),
            _ => 0,
        }
    }

    /// The byte range `[start, end)` of a bdev of `size` bytes the run covers.
    pub fn range(&self, bdev: &str, size: u64) -> Result<(u64, u64), PerfError> {
        let end = match self.length {
            Some(l) => self.offset.checked_add(l),
            None => Some(size),
        };
        match end {
            Some(end) if self.offset < end && end <= size => Ok((self.offset, end)),
            _ => Err(PerfError::Args(format!(
                "bdev {bdev} ({size} bytes) does not hold the range of {} bytes at offset {}",
                self.length
                    .map_or_else(|| "(to the end)".to_string(), |l| l.to_string()),
                self.offset
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_roundtrip_and_defaults() {
        let o: RunOptions = serde_json::from_value(json!({"workload": "verify"})).unwrap();
        assert_eq!(o.queue_depth, 32);
        assert_eq!(o.io_size, 4096);
        assert_eq!(o.time_in_sec, 5.0);
        assert!(o.bdevs.is_empty() && o.cpumask.is_none() && !o.continue_on_failure);
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["workload"], "verify");
        assert_eq!(serde_json::from_value::<RunOptions>(v).unwrap(), o);
        assert!(serde_json::from_value::<RunOptions>(json!({"workload": "sideways"})).is_err());
        assert!(
            serde_json::from_value::<RunOptions>(json!({"workload": "read", "bogus": 1})).is_err()
        );
    }

    #[test]
    fn ranges() {
        let mut o: RunOptions = serde_json::from_value(json!({"workload": "read"})).unwrap();
        assert_eq!(o.range("b", 1 << 20).unwrap(), (0, 1 << 20));
        o.offset = 4096;
        o.length = Some(8192);
        assert_eq!(o.range("b", 1 << 20).unwrap(), (4096, 12288));
        assert!(o.range("b", 8192).is_err());
        o.length = Some(u64::MAX);
        assert!(o.range("b", 1 << 20).is_err());
        o.length = None;
        o.offset = 1 << 20;
        assert!(o.range("b", 1 << 20).is_err());
    }
}
