//! The checker run on each crash state of a qcow2 image:
//!
//! 1. `qemu-img check -f qcow2 --output=json` finds no corruption and no
//!    check error (leaks are allowed: a crash may leak clusters);
//! 2. the image opens in sluice (read-only, so the state is not changed)
//!    and its guest contents read back;
//! 3. the [`Oracle`] accepts those contents (no acknowledged-and-durable
//!    write lost);
//! 4. once a job's completion was reported ([`Expect::result_after`]), its
//!    result is there: the header names no backing file and the contents
//!    are complete without one (a stream's top; a commit's base, which the
//!    guest's disk is after the pivot);
//! 5. every [`Expect::compare_every`]-th state, `qemu-img convert` reads the
//!    same guest contents as sluice.
//!
//! `qemu-img` must be installed; a state that cannot be judged (the tool
//! missing) is a failure, never a pass.

use super::oracle::Oracle;
use super::replay::State;
use crate::qcow2::{open_file, BackingSpec, OpenOptions, Qcow2Bdev};
use crate::{channel, read_at, Bdev};
use reactor::RuntimeHandle;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// What a failed check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// `qemu-img check` reported corruption or could not check.
    Corruption(String),
    /// The image did not open, or not read, in sluice or qemu-img.
    Unopenable(String),
    /// A write acknowledged and durable did not read back.
    Lost(String),
    /// A job reported completed but its result is not there.
    JobResult(String),
    /// sluice and qemu-img read different contents.
    Disagree(String),
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Corruption(s) => write!(f, "corruption: {s}"),
            Finding::Unopenable(s) => write!(f, "does not open: {s}"),
            Finding::Lost(s) => write!(f, "lost writes: {s}"),
            Finding::JobResult(s) => write!(f, "job result missing: {s}"),
            Finding::Disagree(s) => write!(f, "sluice and qemu-img disagree: {s}"),
        }
    }
}

/// What a state must show.
pub struct Expect<'a> {
    /// The guest's writes.
    pub oracle: &'a Oracle,
    /// The seq from which a stream's completion was reported: in states
    /// whose user knew it, the image has no backing file and all of its
    /// contents.
    pub result_after: Option<u64>,
    /// Whether the oracle also judges states before the result is due (a
    /// stream's top reads as the guest's disk all along); `false` where the
    /// recorded image becomes the guest's disk only with the job's result
    /// (a commit's base, before the pivot): until then such a state must
    /// only pass `qemu-img check` and open.
    pub oracle_before_result: bool,
    /// Compare with `qemu-img convert` every this many states (0: never).
    pub compare_every: u64,
}

/// Counts of a replay's checks, as the tests print them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// States checked.
    pub states: u64,
    /// States with corruption (or that did not open).
    pub corruptions: u64,
    /// States with lost acknowledged-and-flushed writes.
    pub lost: u64,
    /// States missing a completed job's result.
    pub job: u64,
    /// States sluice and qemu-img read differently.
    pub disagree: u64,
    /// States compared with qemu-img.
    pub compared: u64,
}

impl Tally {
    /// Counts one finding.
    pub fn count(&mut self, f: &Finding) {
        match f {
            Finding::Corruption(_) | Finding::Unopenable(_) => self.corruptions += 1,
            Finding::Lost(_) => self.lost += 1,
            Finding::JobResult(_) => self.job += 1,
            Finding::Disagree(_) => self.disagree += 1,
        }
    }

    /// Whether nothing was found.
    pub fn clean(&self) -> bool {
        self.corruptions + self.lost + self.job + self.disagree == 0
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} crash states, {} corruptions, {} lost acknowledged-and-flushed writes, {} missing job results, {} disagreements with qemu-img ({} compared)",
            self.states, self.corruptions, self.lost, self.job, self.disagree, self.compared
        )
    }
}

/// `qemu-img check -f qcow2 --output=json -U`: `Ok(leaks)` when it found
/// no corruption and no check error.
pub fn qemu_img_check(path: &Path) -> Result<u64, Finding> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json", "-U"])
        .arg(path)
        .output()
        .map_err(|e| Finding::Corruption(format!("running qemu-img check: {e}")))?;
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| {
        Finding::Corruption(format!(
            "qemu-img check exit {code}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ))
    })?;
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    if n("corruptions") > 0 || n("check-errors") > 0 || !(code == 0 || code == 3) {
        return Err(Finding::Corruption(format!(
            "qemu-img check exit {code}: {v}"
        )));
    }
    Ok(n("leaks"))
}

/// The guest contents of the image at `path` through sluice (read-only,
/// no locks), with its backing chain from the header or none; and the
/// backing file the header names.
pub fn sluice_read(
    rt: &RuntimeHandle,
    path: &Path,
    with_backing: bool,
) -> Result<(Vec<u8>, Option<String>), Finding> {
    let p = path.to_path_buf();
    rt.spawn_on(0, move || async move {
        let opts = OpenOptions {
            read_only: true,
            direct: false,
            locking: crate::lock::LockMode::Off,
            backing: if with_backing {
                BackingSpec::FromHeader
            } else {
                BackingSpec::None
            },
            ..OpenOptions::default()
        };
        let q = open_file("crash-state", &p, opts)
            .await
            .map_err(|e| Finding::Unopenable(format!("sluice: {e}")))?;
        let backing = q.backing_file();
        // Every node of the chain, whose cached channels go when done.
        let mut chain: Vec<Arc<dyn Bdev>> = vec![q.base().clone()];
        let mut next = q.backing();
        while let Some(bk) = next {
            chain.push(bk.clone());
            next = match bk.as_any().downcast_ref::<Qcow2Bdev>() {
                Some(x) => {
                    chain.push(x.base().clone());
                    x.backing()
                }
                None => None,
            };
        }
        let b: Arc<dyn Bdev> = q;
        chain.push(b.clone());
        let ch = channel(&b).map_err(|e| Finding::Unopenable(format!("sluice channel: {e}")))?;
        let size = b.size();
        let mut out = Vec::with_capacity(size as usize);
        let mut off = 0;
        while off < size {
            let n = (1u64 << 20).min(size - off);
            let buf = read_at(&ch, off, n as usize)
                .await
                .map_err(|e| Finding::Unopenable(format!("sluice read at {off}: {e}")))?;
            out.extend_from_slice(buf.as_slice());
            off += n;
        }
        drop(ch);
        for n in &chain {
            crate::drop_cached_channels(n);
        }
        Ok((out, backing))
    })
    .block()
    .map_err(|e| Finding::Unopenable(format!("reactor: {e:?}")))?
}

/// The guest contents through `qemu-img convert -O raw`.
pub fn qemu_read(path: &Path) -> Result<Vec<u8>, Finding> {
    let raw = path.with_extension("cmp.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .map_err(|e| Finding::Unopenable(format!("running qemu-img convert: {e}")))?;
    if !out.status.success() {
        return Err(Finding::Unopenable(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let d = std::fs::read(&raw).map_err(|e| Finding::Unopenable(format!("{e}")))?;
    let _ = std::fs::remove_file(&raw);
    Ok(d)
}

/// Runs every check on one crash state; `Ok(true)` when it was also
/// compared with qemu-img.
pub fn check_state(rt: &RuntimeHandle, st: &State, x: &Expect<'_>) -> Result<bool, Finding> {
    qemu_img_check(&st.path)?;
    let result_due = x.result_after.is_some_and(|m| m < st.next);
    // Once the stream's end was reported, the contents must be complete
    // without the backing file: read without it.
    let (data, backing) = sluice_read(rt, &st.path, !result_due)?;
    if result_due && backing.is_some() {
        return Err(Finding::JobResult(format!(
            "the header still names backing file {backing:?}"
        )));
    }
    if result_due || x.oracle_before_result {
        x.oracle.check(&data, st.next).map_err(|e| {
            if result_due {
                Finding::JobResult(e)
            } else {
                Finding::Lost(e)
            }
        })?;
    }
    if x.compare_every > 0 && st.index.is_multiple_of(x.compare_every) {
        let q = qemu_read(&st.path)?;
        if q != data {
            let at = q.iter().zip(&data).position(|(a, b)| a != b);
            return Err(Finding::Disagree(format!(
                "first difference at byte {at:?} (lengths {} and {})",
                q.len(),
                data.len()
            )));
        }
        return Ok(true);
    }
    Ok(false)
}
