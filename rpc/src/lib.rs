//! sluice's control plane: the JSON-RPC (SPDK dialect) and QMP servers over
//! one method table, thin handlers (parse, call, render) in `methods/`, the one
//! error mapping, config replay. The NBD server (`nbd`), the perf engine
//! (`perf`) and the binary (`sluice`) are crates of their own.

pub mod config;
pub mod error;
pub mod jsonrpc;
pub mod methods;
pub mod objects;
pub mod qmp;
pub mod service;
pub mod subsystem;
pub mod table;
pub mod transport;

pub use error::{ErrorClass, RpcError};
pub use service::Service;
pub use table::{MethodTable, Params};
