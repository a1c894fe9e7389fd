//! QEMU-compatible image locks: OFD byte-range locks on the image file itself.
//!
//! A process holding a file node takes a shared (read) lock on byte
//! `100 + i` for every permission bit `i` its users hold, and on byte
//! `200 + i` for every permission its users do not share. Another process
//! wanting permission `i` must find byte `200 + i` unlocked; one refusing to
//! share `i` must find `100 + i` unlocked. QEMU, qemu-nbd, qemu-img and
//! baton therefore keep out of each other's way.
//!
//! Taking is done before testing (take the new bytes, then look for
//! conflicting holders with `F_OFD_GETLK`, and undo on conflict), because a
//! test-then-take sequence races with another process doing the same.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

use crate::error::{BlockError, Result};
use crate::perm::Perm;

/// First byte of the "permission held" range.
pub const PERM_BASE: i64 = 100;
/// First byte of the "permission not shared" range.
pub const SHARED_BASE: i64 = 200;

/// The lock bytes one file node holds.
#[derive(Debug)]
pub struct ImageLock {
    fd: Arc<OwnedFd>,
    path: String,
    /// Permissions whose `100 + i` byte this node currently holds.
    held_perm: Perm,
    /// Permissions whose `200 + i` byte this node currently holds (the unshared ones).
    held_unshared: Perm,
}

/// The one-byte range `byte` with lock type `kind`, built field by field
/// (`l_pid` must be 0 for OFD locks).
fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    libc::flock { l_type: kind, l_whence: libc::SEEK_SET as libc::c_short, l_start: byte, l_len: 1, l_pid: 0 }
}

impl ImageLock {
    pub fn new(fd: Arc<OwnedFd>, path: String) -> Self {
        Self { fd, path, held_perm: Perm::NONE, held_unshared: Perm::NONE }
    }

    /// The bytes currently held, as (perm, unshared).
    pub fn held(&self) -> (Perm, Perm) {
        (self.held_perm, self.held_unshared)
    }

    fn set_byte(&self, byte: i64, lock: bool) -> std::io::Result<()> {
        let kind = if lock { libc::F_RDLCK } else { libc::F_UNLCK } as libc::c_short;
        let fl = flock(kind, byte);
        fcntl(self.fd.as_fd(), FcntlArg::F_OFD_SETLK(&fl)).map(|_| ()).map_err(std::io::Error::from)
    }

    /// Whether another open file description holds a lock on `byte`.
    fn byte_held_elsewhere(&self, byte: i64) -> std::io::Result<bool> {
        let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
        fcntl(self.fd.as_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).map_err(std::io::Error::from)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    fn set_bytes(&mut self, perm: Perm, unshared: Perm) -> std::io::Result<()> {
        for (i, (p, _)) in Perm::NAMES.iter().enumerate() {
            let i = i as i64;
            let want = perm.contains(*p);
            if want != self.held_perm.contains(*p) {
                self.set_byte(PERM_BASE + i, want)?;
                self.held_perm = if want { self.held_perm | *p } else { self.held_perm.without(*p) };
            }
            let want = unshared.contains(*p);
            if want != self.held_unshared.contains(*p) {
                self.set_byte(SHARED_BASE + i, want)?;
                self.held_unshared = if want { self.held_unshared | *p } else { self.held_unshared.without(*p) };
            }
        }
        Ok(())
    }

    /// Hold exactly the bytes for `perm` taken and `shared` shared, or fail
    /// naming the first conflicting permission and leave the bytes as they were.
    pub fn apply(&mut self, perm: Perm, shared: Perm) -> Result<()> {
        let unshared = shared.complement();
        let (old_perm, old_unshared) = self.held();
        // Take new bytes first (keeping the old ones), then test, then drop the surplus.
        let res = self
            .set_bytes(old_perm | perm, old_unshared | unshared)
            .map_err(|source| BlockError::Lock { path: self.path.clone(), source })
            .and_then(|()| self.check_conflicts(perm, unshared));
        match res {
            Ok(()) => {
                self.set_bytes(perm, unshared).map_err(|source| BlockError::Lock { path: self.path.clone(), source })
            }
            Err(e) => {
                // Best effort: restoring only releases bytes we added, which cannot conflict.
                let _ = self.set_bytes(old_perm, old_unshared);
                Err(e)
            }
        }
    }

    fn check_conflicts(&self, perm: Perm, unshared: Perm) -> Result<()> {
        for (i, (p, name)) in Perm::NAMES.iter().enumerate() {
            let i = i as i64;
            let io = |source| BlockError::Lock { path: self.path.clone(), source };
            // We take `p`: nobody else may refuse to share it.
            if perm.contains(*p) && self.byte_held_elsewhere(SHARED_BASE + i).map_err(io)? {
                return Err(BlockError::LockConflict { path: self.path.clone(), perm: name });
            }
            // We refuse to share `p`: nobody else may hold it.
            if unshared.contains(*p) && self.byte_held_elsewhere(PERM_BASE + i).map_err(io)? {
                return Err(BlockError::LockConflict { path: self.path.clone(), perm: name });
            }
        }
        Ok(())
    }

    /// Drop every byte (inactivation, close).
    pub fn release(&mut self) {
        if let Err(e) = self.set_bytes(Perm::NONE, Perm::NONE) {
            tracing::warn!(path = %self.path, error = %e, "releasing image lock failed");
        }
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> Arc<OwnedFd> {
        Arc::new(OpenOptions::new().read(true).write(true).open(path).unwrap().into())
    }

    #[test]
    fn exclusive_writer_blocks_second_writer_and_releases_on_drop() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut a = ImageLock::new(open(f.path()), "a".into());
        a.apply(Perm::CONSISTENT_READ | Perm::WRITE, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED).unwrap();
        let mut b = ImageLock::new(open(f.path()), "b".into());
        let err = b.apply(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL).unwrap_err();
        assert!(matches!(err, BlockError::LockConflict { perm: "write", .. }), "{err}");
        assert_eq!(b.held(), (Perm::NONE, Perm::NONE), "a failed apply leaves nothing behind");
        // A reader that shares everything is fine.
        b.apply(Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        drop(a);
        b.apply(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL).unwrap();
    }
}
