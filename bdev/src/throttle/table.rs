//! Which group limits whom: one table per [`crate::Registry`].

use super::config::ThrottleConfig;
use super::group::ThrottleGroup;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Who a member is, for the two dialects' views of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Set by SPDK's `bdev_set_qos_limit` (an implicit group named after
    /// the bdev).
    Spdk,
    /// Set by QEMU's `block_set_io_throttle` (the group it names, or an
    /// implicit one named after the device).
    Qemu,
}

#[derive(Default)]
struct Inner {
    /// Groups made as objects (`object-add qom-type: throttle-group`): they
    /// live until `object-del`.
    objects: HashMap<String, Arc<ThrottleGroup>>,
    /// Users of a group object other than members (throttle nodes, jobs).
    users: HashMap<String, usize>,
    /// Device or node name -> the group limiting it.
    members: HashMap<String, (Arc<ThrottleGroup>, Membership)>,
}

/// The throttle table. Nothing here is on the data path but
/// [`Throttles::generation`].
#[derive(Default)]
pub struct Throttles {
    inner: Mutex<Inner>,
    gen: AtomicU64,
}

impl Throttles {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.gen.fetch_add(1, Ordering::Release);
    }

    /// Bumped on every change of membership (compare to refresh a cache).
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// The group limiting `name`, if any.
    pub fn of(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.lock().members.get(name).map(|(g, _)| g.clone())
    }

    /// The group limiting `name` and who set it.
    pub fn membership(&self, name: &str) -> Option<(Arc<ThrottleGroup>, Membership)> {
        self.lock().members.get(name).cloned()
    }

    /// Any group by name: an object, or an implicit group with members.
    pub fn group(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        let g = self.lock();
        g.objects.get(name).cloned().or_else(|| {
            g.members
                .values()
                .find(|(m, _)| m.name() == name)
                .map(|(m, _)| m.clone())
        })
    }

    /// Adds a group object; `false` when one of that name exists.
    pub fn add_object(&self, group: Arc<ThrottleGroup>) -> bool {
        let mut g = self.lock();
        if g.objects.contains_key(group.name()) {
            return false;
        }
        g.objects.insert(group.name().to_string(), group);
        true
    }

    /// Whether a group object of that name exists.
    pub fn has_object(&self, name: &str) -> bool {
        self.lock().objects.contains_key(name)
    }

    /// Every group object, by name.
    pub fn objects(&self) -> Vec<Arc<ThrottleGroup>> {
        let mut v: Vec<_> = self.lock().objects.values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Removes a group object. `Err(true)`: in use (a member, or a user
    /// such as a throttle node or a job, still has it); `Err(false)`: no
    /// such object.
    pub fn remove_object(&self, name: &str) -> Result<(), bool> {
        let mut g = self.lock();
        let Some(o) = g.objects.get(name).cloned() else {
            return Err(false);
        };
        if g.users.get(name).is_some_and(|n| *n > 0)
            || g.members.values().any(|(m, _)| Arc::ptr_eq(m, &o))
        {
            return Err(true);
        }
        g.objects.remove(name);
        Ok(())
    }

    /// Takes a group object for a user (a throttle node, a job): it cannot
    /// be deleted until [`Throttles::unuse`]. `None`: no such object.
    pub fn use_object(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        let mut g = self.lock();
        let o = g.objects.get(name).cloned()?;
        *g.users.entry(name.to_string()).or_default() += 1;
        Some(o)
    }

    /// Gives back what [`Throttles::use_object`] took.
    pub fn unuse(&self, name: &str) {
        let mut g = self.lock();
        if let Some(n) = g.users.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.users.remove(name);
            }
        }
    }

    /// Limits `member` with the group named `group` (made with `cfg` when
    /// it does not exist; its config replaced by `cfg` when it does).
    pub fn join(&self, member: &str, group: &str, cfg: ThrottleConfig, who: Membership) {
        let mut g = self.lock();
        let existing = g.objects.get(group).cloned().or_else(|| {
            g.members
                .values()
                .find(|(m, _)| m.name() == group)
                .map(|(m, _)| m.clone())
        });
        let grp = match existing {
            Some(e) => {
                e.set_config(cfg);
                e
            }
            None => Arc::new(ThrottleGroup::new(group, cfg)),
        };
        g.members.insert(member.to_string(), (grp, who));
        drop(g);
        self.bump();
    }

    /// Lifts `member`'s limits (when it is deleted, or all limits are 0).
    pub fn leave(&self, member: &str) {
        if self.lock().members.remove(member).is_some() {
            self.bump();
        }
    }
}
