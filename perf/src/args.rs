//! The options of `sluice perf` (SPDK bdevperf's, plus flags that create bdevs
//! and `-s SOCK` to run inside a running `sluice serve`).

use super::options::RunOptions;
use super::PerfError;
use clap::Args;
use std::path::PathBuf;

/// Options of `sluice perf`.
#[derive(Debug, Args, Clone)]
pub struct PerfArgs {
    /// Queue depth per job.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 32)]
    pub queue_depth: u32,
    /// I/O size in bytes (suffixes k, m, g: binary units).
    #[arg(short = 'o', long = "io-size", default_value = "4096", value_parser = parse_size)]
    pub io_size: u64,
    /// Workload: read, write, randread, randwrite, rw, randrw, verify, flush, unmap, write_zeroes.
    #[arg(short = 'w', long = "workload", value_parser = Workload::parse)]
    pub workload: Workload,
    /// Read percentage of rw / randrw (0-100).
    #[arg(short = 'M', long = "rwmixread")]
    pub rwmixread: Option<u32>,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", default_value_t = 5.0)]
    pub time: f64,
    /// Core mask (SPDK style, e.g. 0x3): one job per reactor per bdev. Default:
    /// core 0 (locally), the daemon's first reactor (with -s).
    #[arg(short = 'm', long = "cpumask")]
    pub cpumask: Option<String>,
    /// Accepted for bdevperf compatibility: sluice always runs one job per reactor per bdev.
    #[arg(short = 'C', hide = true)]
    pub multithread: bool,
    /// Target bdev (repeatable); default: every bdev not claimed by another.
    #[arg(short = 'T', long = "bdev")]
    pub bdevs: Vec<String>,
    /// SPDK JSON config to create bdevs from (any method sluice serves).
    #[arg(short = 'c', long = "config", alias = "json-config")]
    pub config: Option<PathBuf>,
    /// Create a null bdev: NAME:SIZE_MIB[:BLOCK_SIZE][:nozero] (repeatable); `nozero`
    /// leaves read buffers untouched, as SPDK's null bdev does.
    #[arg(long = "null", value_name = "NAME:MIB[:BS][:nozero]")]
    pub null: Vec<String>,
    /// Create a malloc bdev: NAME:SIZE_MIB[:BLOCK_SIZE] (repeatable).
    #[arg(long = "malloc", value_name = "NAME:MIB[:BS]")]
    pub malloc: Vec<String>,
    /// Create a uring bdev over a file or block device: [NAME=]PATH (repeatable).
    #[arg(long = "file", value_name = "[NAME=]PATH")]
    pub files: Vec<String>,
    /// Open --file bdevs through the page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Block size of --file bdevs (default: detected).
    #[arg(long = "block-size")]
    pub block_size: Option<u32>,
    /// Keep going after I/O errors (count them as failures) instead of failing the run.
    #[arg(short = 'f', long = "continue-on-failure")]
    pub continue_on_failure: bool,
    /// Print the results as JSON (bdevperf's result fields) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Run inside the `sluice serve` whose JSON-RPC socket this is (a Unix
    /// socket path or HOST:PORT), on its bdevs and devices and its reactors
    /// (`-m` picks a subset), through the `bdev_perf_run` method.
    #[arg(
        short = 's',
        long = "rpc",
        short_alias = 'r',
        alias = "rpc-socket",
        value_name = "SOCK"
    )]
    pub rpc: Option<String>,
    /// First byte of the range of each bdev to exercise (suffixes k, m, g).
    #[arg(long, default_value = "0", value_parser = parse_offset)]
    pub offset: u64,
    /// Bytes of that range (default: to the end of the bdev).
    #[arg(long, value_parser = parse_size)]
    pub length: Option<u64>,
}

/// What each job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential mix.
    Rw,
    /// Random mix.
    RandRw,
    /// Write a pattern, read it back, compare.
    Verify,
    /// Flushes.
    Flush,
    /// Unmaps (sequential ranges).
    Unmap,
    /// Write-zeroes (sequential ranges).
    WriteZeroes,
}

impl Workload {
    /// Parses bdevperf's `-w` value.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Workload::Read,
            "write" => Workload::Write,
            "randread" => Workload::RandRead,
            "randwrite" => Workload::RandWrite,
            "rw" => Workload::Rw,
            "randrw" => Workload::RandRw,
            "verify" => Workload::Verify,
            "flush" => Workload::Flush,
            "unmap" => Workload::Unmap,
            "write_zeroes" => Workload::WriteZeroes,
            other => {
                return Err(format!(
                    "unknown workload {other:?}: use read, write, randread, randwrite, rw, randrw, verify, flush, unmap or write_zeroes"
                ))
            }
        })
    }

    /// bdevperf's name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::Flush => "flush",
            Workload::Unmap => "unmap",
            Workload::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether offsets are random.
    pub fn random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    /// Whether requests carry data buffers.
    pub fn has_data(self) -> bool {
        !matches!(
            self,
            Workload::Flush | Workload::Unmap | Workload::WriteZeroes
        )
    }
}

/// Parses "4096", "4k", "4KiB", "1m", "1G".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 4k, 1m)"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is not a positive size"))
}

/// Parses an offset: like [`parse_size`], and 0.
fn parse_offset(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size(s)
}

impl PerfArgs {
    /// The run's options (what `bdev_perf_run` takes as parameters).
    pub fn options(&self) -> RunOptions {
        RunOptions {
            workload: self.workload,
            queue_depth: self.queue_depth,
            io_size: self.io_size,
            time_in_sec: self.time,
            rwmixread: self.rwmixread,
            bdevs: self.bdevs.clone(),
            cpumask: self.cpumask.clone(),
            continue_on_failure: self.continue_on_failure,
            offset: self.offset,
            length: self.length,
        }
    }

    /// Whether a flag asks this process to create bdevs.
    pub fn creates_bdevs(&self) -> bool {
        !(self.null.is_empty()
            && self.malloc.is_empty()
            && self.files.is_empty()
            && self.config.is_none())
    }

    /// Checks the combination of options.
    pub fn validate(&self) -> Result<(), PerfError> {
        self.options().validate()?;
        match (&self.rpc, self.creates_bdevs()) {
            (None, false) => Err(PerfError::Args(
                "no bdevs: give --null, --malloc, --file or -c CONFIG (or -s SOCK to run in a daemon)"
                    .into(),
            )),
            (Some(_), true) => Err(PerfError::Args(
                "-s runs on the daemon's bdevs: create them there (sluice rpc bdev_..._create), not with --null, --malloc, --file or -c"
                    .into(),
            )),
            (Some(_), false) if self.buffered || self.block_size.is_some() => {
                Err(PerfError::Args(
                    "--buffered and --block-size only apply to bdevs this process creates, not with -s"
                        .into(),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A `NAME:MIB[:BS]` bdev flag (`--null` also takes a final `:nozero`, returned as true).
pub fn parse_null_spec(s: &str) -> Result<(String, u64, u32, bool), PerfError> {
    match s.strip_suffix(":nozero") {
        Some(rest) => parse_mem_spec("null", rest).map(|(n, m, b)| (n, m, b, true)),
        None => parse_mem_spec("null", s).map(|(n, m, b)| (n, m, b, false)),
    }
}

/// A `NAME:MIB[:BS]` bdev flag.
pub fn parse_mem_spec(flag: &str, s: &str) -> Result<(String, u64, u32), PerfError> {
    let bad = |why: &str| {
        PerfError::Args(format!(
            "--{flag} {s:?}: {why} (expected NAME:SIZE_MIB[:BLOCK_SIZE])"
        ))
    };
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 || parts[0].is_empty() {
        return Err(bad("malformed"));
    }
    let mib: u64 = parts[1]
        .parse()
        .map_err(|_| bad("size is not a number of MiB"))?;
    if mib == 0 {
        return Err(bad("size must be at least 1 MiB"));
    }
    let bs: u32 = match parts.get(2) {
        Some(b) => b.parse().map_err(|_| bad("block size is not a number"))?,
        None => 512,
    };
    if bs == 0 || !(mib << 20).is_multiple_of(bs as u64) {
        return Err(bad("the size is not a multiple of the block size"));
    }
    Ok((parts[0].to_string(), mib, bs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn mem_specs() {
        assert_eq!(
            parse_mem_spec("null", "N0:16").unwrap(),
            ("N0".into(), 16, 512)
        );
        assert_eq!(
            parse_mem_spec("null", "N0:16:4096").unwrap(),
            ("N0".into(), 16, 4096)
        );
        assert!(parse_mem_spec("null", "N0").is_err());
        assert!(parse_mem_spec("null", ":16").is_err());
        assert!(parse_mem_spec("null", "N0:x").is_err());
        assert_eq!(
            parse_null_spec("N0:16:4096:nozero").unwrap(),
            ("N0".into(), 16, 4096, true)
        );
        assert_eq!(
            parse_null_spec("N0:16").unwrap(),
            ("N0".into(), 16, 512, false)
        );
    }
}
