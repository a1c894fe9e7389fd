//! QEMU's block permissions (BLK_PERM_*), their sharing, and the check that
//! two users of one node are compatible.
//!
//! Each user of a node (a guest device, an export, a job, a parent node)
//! declares the permissions it takes and the ones it lets others take. Two
//! users conflict when one takes a permission the other does not share.

use std::fmt;

/// A set of block permissions. Bit values are QEMU's, so that the image-lock
/// bytes (100 + bit index, 200 + bit index) match QEMU's exactly.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    pub const NONE: Perm = Perm(0);
    /// Reads return data that is consistent with what was written.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// Writes that change the visible content.
    pub const WRITE: Perm = Perm(0x02);
    /// Writes that leave the visible content unchanged (e.g. a mirror target catching up).
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(0x08);
    /// Every permission.
    pub const ALL: Perm = Perm(0x0f);

    /// Each permission with its QEMU name and bit index, in bit order.
    pub const NAMES: [(Perm, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    pub const fn bits(self) -> u8 {
        self.0
    }
    pub const fn from_bits(bits: u8) -> Perm {
        Perm(bits & Self::ALL.0)
    }
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }
    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
    pub const fn intersection(self, other: Perm) -> Perm {
        Perm(self.0 & other.0)
    }
    pub const fn without(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }
    /// The permissions not in `self`.
    pub const fn complement(self) -> Perm {
        Perm(!self.0 & Self::ALL.0)
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The name of the first permission in `self` (for error messages).
    pub fn first_name(self) -> &'static str {
        Self::NAMES.iter().find(|(p, _)| self.contains(*p)).map(|(_, n)| *n).unwrap_or("none")
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        self.union(rhs)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Self::NAMES.iter().filter(|(p, _)| self.contains(*p)).map(|(_, n)| *n).collect();
        write!(f, "Perm({})", names.join("|"))
    }
}

/// What a user takes and what it lets others take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PermSet {
    pub perm: Perm,
    pub shared: Perm,
}

impl PermSet {
    pub const fn new(perm: Perm, shared: Perm) -> Self {
        Self { perm, shared }
    }

    /// A guest disk: reads and writes, lets others read, write unchanged
    /// data and resize, but not write (QEMU's virtio-blk with share-rw=off).
    /// I1: no second writer.
    pub const GUEST_WRITER: PermSet = PermSet::new(
        Perm::CONSISTENT_READ.union(Perm::WRITE),
        Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED).union(Perm::RESIZE),
    );
    /// A writable NBD export: shares everything but resize (its size is
    /// fixed while clients use it), as qemu-nbd and qemu-storage-daemon do.
    pub const EXPORT_WRITABLE: PermSet =
        PermSet::new(Perm::CONSISTENT_READ.union(Perm::WRITE), Perm::ALL.without(Perm::RESIZE));
    /// A read-only export: shares everything but resize.
    pub const EXPORT_READONLY: PermSet = PermSet::new(Perm::CONSISTENT_READ, Perm::ALL.without(Perm::RESIZE));

    /// The first permission on which `self` and `other` conflict, if any.
    pub fn conflict(&self, other: &PermSet) -> Option<Perm> {
        let a = self.perm.without(other.shared);
        if !a.is_empty() {
            return Some(a);
        }
        let b = other.perm.without(self.shared);
        if !b.is_empty() {
            return Some(b);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_writer_conflicts_with_second_writer_but_not_reader() {
        let reader = PermSet::new(Perm::CONSISTENT_READ, Perm::ALL);
        assert_eq!(PermSet::GUEST_WRITER.conflict(&reader), None);
        assert_eq!(PermSet::GUEST_WRITER.conflict(&PermSet::EXPORT_WRITABLE), Some(Perm::WRITE));
    }

    #[test]
    fn exports_share_write_with_each_other() {
        assert_eq!(PermSet::EXPORT_WRITABLE.conflict(&PermSet::EXPORT_WRITABLE), None);
    }
}
