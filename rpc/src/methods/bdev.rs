//! The bdev methods in SPDK's dialect: listing (`bdev_get_bdevs`), statistics
//! (`bdev_get_iostat`), the leaf bdevs (malloc, null, uring, aio), the error
//! bdev, and the `bdev` section of `save_config`.
//!
//! Other areas that create bdevs should go through
//! [`register_bdev`](super::common::register_bdev) and
//! [`delete_bdev`](super::common::delete_bdev) so that `bdev_register` /
//! `bdev_unregister` notifications are published.

mod error;
mod info;
mod leaf;

use crate::methods::blockdev::state::owns;
use crate::service::Service;
use crate::table::MethodTable;
use bdev::Bdev;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Registers the bdev methods and the `bdev` config section.
pub fn register(t: &mut MethodTable) {
    info::register(t);
    leaf::register(t);
    error::register(t);
    t.add("bdev_wait_for_examine", |_, p| {
        // Every bdev is complete when its create method returns: nothing to wait for.
        p.none()?;
        Ok(Value::Bool(true))
    });
    t.add_config_section("bdev", &[], bdev_section);
}

/// The calls that recreate every bdev, each after the bdevs it claims (a base
/// before the layer above it), otherwise by name.
fn bdev_section(svc: &Service) -> Vec<Value> {
    let bdevs: BTreeMap<String, Arc<dyn Bdev>> = svc
        .graph
        .nodes()
        .list()
        .into_iter()
        .map(|b| (b.name().to_string(), b))
        .collect();
    // users[b] = bdevs that claim b (must come after b); pending[c] = how many bdevs c claims.
    let mut pending: BTreeMap<&str, usize> = bdevs.keys().map(|n| (n.as_str(), 0)).collect();
    let mut users: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for name in bdevs.keys() {
        let mut claimers: Vec<String> = svc
            .graph
            .nodes()
            .claims_of(name)
            .into_iter()
            .filter_map(|c| match c.holder {
                bdev::Holder::Node(n) => Some(n),
                _ => None,
            })
            .filter(|c| bdevs.contains_key(c) && c != name)
            .collect();
        claimers.sort();
        claimers.dedup();
        for c in &claimers {
            if let Some(n) = pending.get_mut(c.as_str()) {
                *n += 1;
            }
        }
        users.insert(name.as_str(), claimers);
    }
    let mut ready: BTreeSet<&str> = pending
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut order: Vec<&str> = Vec::with_capacity(bdevs.len());
    while let Some(n) = ready.pop_first() {
        order.push(n);
        for c in users.get(n).into_iter().flatten() {
            if let Some(p) = pending.get_mut(c.as_str()) {
                *p -= 1;
                if *p == 0 {
                    if let Some((k, _)) = bdevs.get_key_value(c) {
                        ready.insert(k.as_str());
                    }
                }
            }
        }
    }
    if order.len() < bdevs.len() {
        // Claims cannot form a cycle through the registry, but never lose a bdev.
        let placed: BTreeSet<&str> = order.iter().copied().collect();
        let rest: Vec<&str> = bdevs
            .keys()
            .map(String::as_str)
            .filter(|n| !placed.contains(n))
            .collect();
        tracing::warn!(
            ?rest,
            "bdev claims form a cycle; saving those bdevs by name"
        );
        order.extend(rest);
    }
    // Nodes made by blockdev-add are recreated by the `blockdev` section; a
    // device's root by the device's entry.
    let roots: BTreeSet<String> = bdevs
        .values()
        .filter_map(|b| b.as_any().downcast_ref::<bdev::device::Device>())
        .map(|d| d.root().name().to_string())
        .collect();
    order
        .into_iter()
        .filter(|n| !owns(svc, n) && !roots.contains(*n))
        .filter_map(|n| bdevs.get(n).and_then(|b| b.config()))
        .collect()
}
