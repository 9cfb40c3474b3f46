//! Every RPC method, grouped by subsystem; [`build_table`] is the one place the
//! table is assembled.

pub mod bdev;
pub mod blockdev;
pub mod commit;
pub mod common;
pub mod core;
pub mod job_qapi;
pub mod jobs;
pub mod mirror;
pub mod nbd;
pub mod nbd_client;
pub mod nodes;
pub mod notify;
pub mod nvme;
pub mod objects;
pub mod perf;
pub mod qcow2;
pub mod rbd;
pub mod record;
pub mod resize;
pub mod schema;
pub mod snapshot;
pub mod stream2011;
pub mod throttle;
pub mod vhost;

use crate::table::MethodTable;

/// Builds the method table with every subsystem's methods.
pub fn build_table() -> MethodTable {
    let mut t = MethodTable::default();
    core::register(&mut t);
    objects::register(&mut t);
    bdev::register(&mut t);
    notify::register(&mut t);
    qcow2::register(&mut t);
    blockdev::register(&mut t);
    jobs::register(&mut t);
    commit::register(&mut t);
    mirror::register(&mut t);
    stream2011::register(&mut t);
    snapshot::register(&mut t);
    resize::register(&mut t);
    schema::register(&mut t);
    nvme::register(&mut t);
    nbd::register(&mut t);
    nbd_client::register(&mut t);
    rbd::register(&mut t);
    perf::register(&mut t);
    record::register(&mut t);
    vhost::register(&mut t);
    throttle::register(&mut t);
    t
}
