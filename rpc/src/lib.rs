//! sluice's control plane and front ends: the JSON-RPC (SPDK dialect) and QMP
//! servers over one method table, config replay, the `sluice` command line
//! (serve, rpc, perf) and the NBD export.

pub mod client;
pub mod config;
pub mod error;
pub mod jsonrpc;
pub mod methods;
pub mod nbd;
pub mod perf;
pub mod qmp;
pub mod serve;
pub mod service;
pub mod startup;
pub mod table;
pub mod transport;

pub use error::{ErrorClass, RpcError};
pub use service::Service;
pub use table::{MethodTable, Params};
