//! `query-qmp-schema`: the commands, events and types sluice serves, in
//! QEMU's `SchemaInfo` form ([`crate::qmp::schema`] says how it is made and
//! how a new command gets its entry).

use crate::table::{Dialect, MethodTable};

/// Registers the method.
pub fn register(t: &mut MethodTable) {
    t.add_in("query-qmp-schema", Dialect::QmpOnly, |_, p| {
        p.none()?;
        Ok(crate::qmp::schema::schema().clone())
    });
}
