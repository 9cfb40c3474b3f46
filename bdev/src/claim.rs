//! Typed claims: who uses a node, and with which permissions, in QEMU's manner.
//!
//! A claim is a holder identity ([`Holder`]), the role it uses the node in
//! (QEMU's child role: `backing`, `file`, `root`, ...), the permissions it
//! takes ([`Perm`]) and the permissions it lets others take (`shared`). A new
//! claim is refused when it takes a permission an existing claim does not
//! share, or when it does not share one an existing claim takes; the refusal
//! reads as QEMU's (`bdrv_check_perm`): "Conflicts with use by HOLDER as
//! 'ROLE', which does not allow 'PERM' on NODE".
//!
//! Claims are compared by holder identity, never by their display text.

use std::fmt;

/// A set of QEMU's `BLK_PERM_*` permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// Nothing.
    pub const NONE: Perm = Perm(0);
    /// `consistent-read`: reads return what was written, not a half-made state.
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// `write`: the contents may change.
    pub const WRITE: Perm = Perm(2);
    /// `write-unchanged`: writes that do not change what a read returns.
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// `resize`.
    pub const RESIZE: Perm = Perm(8);
    /// `graph-mod` (QEMU keeps it for compatibility; nothing takes it).
    pub const GRAPH_MOD: Perm = Perm(16);
    /// Every permission.
    pub const ALL: Perm = Perm(31);

    /// The union.
    pub const fn union(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }

    /// What `self` holds that `o` does not.
    pub const fn minus(self, o: Perm) -> Perm {
        Perm(self.0 & !o.0)
    }

    /// Whether nothing is in the set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QEMU's names of the permissions in the set (`bdrv_perm_names`).
    pub fn names(self) -> String {
        const NAMES: [&str; 5] = [
            "consistent read",
            "write",
            "write unchanged",
            "resize",
            "change children",
        ];
        (0..5)
            .filter(|i| self.0 & (1 << i) != 0)
            .map(|i| NAMES[i])
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        self.union(o)
    }
}

/// Who holds a claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A node above (an image over its backing or file, an error bdev over its base).
    Node(String),
    /// A named device over its root.
    Device(String),
    /// A hidden front door (an export's), by its claim name.
    Export(String),
    /// The monitor's reference on a node `blockdev-add` made.
    Monitor,
    /// A block job, by its id.
    Job(String),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Node(n) | Holder::Export(n) => f.write_str(n),
            Holder::Device(n) => write!(f, "device {n}"),
            Holder::Monitor => f.write_str("monitor (blockdev-add)"),
            Holder::Job(j) => write!(f, "block job {j}"),
        }
    }
}

/// One claim on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Who holds it.
    pub holder: Holder,
    /// The role the node plays for the holder (QEMU's child name).
    pub role: &'static str,
    /// Permissions taken.
    pub perm: Perm,
    /// Permissions others may take meanwhile.
    pub shared: Perm,
}

impl Claim {
    /// A backing child: reads, and lets nobody resize it (QEMU's
    /// `bdrv_default_perms_for_cow`, less its unshared `write`: an overlay's
    /// base may still be exported writable here, as before).
    pub fn backing(holder: Holder) -> Claim {
        Claim {
            holder,
            role: "backing",
            perm: Perm::CONSISTENT_READ,
            shared: Perm::ALL.minus(Perm::RESIZE),
        }
    }

    /// A protocol child (`file`, an error bdev's base): passes on the
    /// user's permissions; sharing what the node above shares.
    pub fn file(holder: Holder, writable: bool) -> Claim {
        Claim {
            holder,
            role: "file",
            perm: rw(writable),
            shared: Perm::ALL.minus(Perm::RESIZE),
        }
    }

    /// A front door over its root (QEMU's BlockBackend `root` child).
    pub fn root(holder: Holder, writable: bool) -> Claim {
        Claim {
            holder,
            role: "root",
            perm: rw(writable),
            shared: Perm::ALL,
        }
    }

    /// The monitor's reference: takes nothing, shares everything.
    pub fn monitor() -> Claim {
        Claim {
            holder: Holder::Monitor,
            role: "monitor",
            perm: Perm::NONE,
            shared: Perm::ALL,
        }
    }

    /// QEMU's refusal when `new` on `node` conflicts with `self`, if it does.
    pub fn conflict(&self, new: &Claim, node: &str) -> Option<String> {
        let denied = new.perm.minus(self.shared);
        if !denied.is_empty() {
            return Some(format!(
                "Conflicts with use by {} as '{}', which does not allow '{}' on {}",
                self.holder,
                self.role,
                denied.names(),
                node
            ));
        }
        let unshared = self.perm.minus(new.shared);
        if !unshared.is_empty() {
            return Some(format!(
                "Conflicts with use by {} as '{}', which uses '{}' on {}",
                self.holder,
                self.role,
                unshared.names(),
                node
            ));
        }
        None
    }
}

fn rw(writable: bool) -> Perm {
    if writable {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resize_of_a_backing_file_conflicts_in_qemus_words() {
        let b = Claim::backing(Holder::Node("top".into()));
        let r = Claim {
            holder: Holder::Job("j".into()),
            role: "root",
            perm: Perm::RESIZE,
            shared: Perm::ALL,
        };
        assert_eq!(
            b.conflict(&r, "base").as_deref(),
            Some("Conflicts with use by top as 'backing', which does not allow 'resize' on base")
        );
        assert_eq!(
            b.conflict(&Claim::root(Holder::Device("d".into()), true), "base"),
            None
        );
        assert_eq!(Holder::Device("d".into()).to_string(), "device d");
        assert_eq!(Holder::Monitor.to_string(), "monitor (blockdev-add)");
    }
}
