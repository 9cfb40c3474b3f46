//! The filter nodes of block jobs (`filter-node-name`: stream's
//! copy-on-read, commit's commit_top, mirror's and the active commit's
//! mirror_top), end to end through `qemu.qmp` (tests/py/job_filters.py),
//! compared step by step with qemu-storage-daemon 10: listed while the job
//! runs, the name taken, blockdev-del refused, gone with the job.

use sluice_tests::{check, Daemon, TempDir};

#[test]
fn filters_listed_while_jobs_run_as_qsd_lists_them() {
    let d = Daemon::start(&[]);
    let work = TempDir::new("job_filters");
    let out = check(
        d.python(
            "job_filters.py",
            &["--dir", work.0.to_str().unwrap(), "--case", "filters"],
        ),
        "job_filters.py --case filters",
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}
