//! The lease file: the embedded backend, for one host or a directory shared by several.
//!
//! The lease of guest `K` is `<dir>/K.lease`, JSON
//! `{"owner": "...", "generation": N, "expires_ms": T}` (owner `""` when
//! released; `T` in CLOCK_REALTIME milliseconds). Every change is one
//! transaction under an exclusive OFD lock on byte [`LOCK_BYTE`] of the
//! sibling `<dir>/K.lease.lock`, taken on a fresh open file description, so
//! two daemons (two processes, or two handles in one process) serialize.
//! The new content is written to a temporary file, synced and renamed over
//! the lease, then the directory is synced: a crash leaves the old lease or
//! the new one, never a torn one. (The lock cannot live in the lease file
//! itself: the rename replaces that inode.)
//!
//! Expiry is judged on the wall clock, so hosts sharing the directory need
//! synchronized clocks; each holder's own deadline is on its monotonic clock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

use crate::error::{LeaseError, Result};
use crate::key::Key;
use crate::rules::{apply, wall_ms, Op, Record};
use crate::{BoxFuture, Lease};

/// The byte of `<key>.lease.lock` that a transaction write-locks (OFD, `F_OFD_SETLKW`).
pub const LOCK_BYTE: i64 = 0;

/// A guest's lease kept in a file. Cheap to clone; clones share nothing but the path.
#[derive(Debug, Clone)]
pub struct FileLease {
    dir: PathBuf,
    key: Key,
    ttl: Duration,
    margin: Duration,
}

impl FileLease {
    /// The lease of guest `key` in `dir` (created on first use), expiring
    /// `ttl` after each write; this daemon's deadline is `margin` earlier.
    pub fn new(dir: impl Into<PathBuf>, key: &str, ttl: Duration, margin: Duration) -> Result<Self> {
        let key = Key::new(key)?;
        if ttl.as_millis() == 0 || margin >= ttl {
            return Err(LeaseError::InvalidOption(format!(
                "the margin ({} ms) must be shorter than the ttl ({} ms), and the ttl at least 1 ms",
                margin.as_millis(),
                ttl.as_millis()
            )));
        }
        Ok(Self { dir: dir.into(), key, ttl, margin })
    }

    /// `<dir>/<key>.lease`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.lease", self.key))
    }

    /// `<dir>/<key>.lease.lock`, whose byte [`LOCK_BYTE`] guards every transaction.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lease.lock", self.key))
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir.join(format!(".{}.lease.tmp", self.key))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `op` as one transaction on a blocking thread; returns the new record
    /// and the local deadline it grants (measured from before the request was sent).
    async fn run(&self, op: Op) -> Result<(Record, Instant)> {
        let sent = Instant::now();
        let this = self.clone();
        let rec = blocking(move || this.transact(&op)).await?;
        Ok((rec, sent + self.ttl - self.margin))
    }

    fn transact(&self, op: &Op) -> Result<Record> {
        let _lock = self.lock()?;
        let rec = self.load()?;
        let next = apply(&self.key, &rec, op, wall_ms()?, self.ttl_ms())?;
        self.store(&next)?;
        Ok(next)
    }

    /// Opens the lock file (a new open file description) and write-locks
    /// [`LOCK_BYTE`], waiting for any other holder. Dropping the file unlocks.
    fn lock(&self) -> Result<File> {
        let path = self.lock_path();
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
        let file = file.map_err(io("open", &path))?;
        let fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: LOCK_BYTE,
            l_len: 1,
            l_pid: 0, // must be 0 for OFD locks
        };
        loop {
            match fcntl(file.as_fd(), FcntlArg::F_OFD_SETLKW(&fl)) {
                Ok(_) => return Ok(file),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io("lock", &path)(e.into())),
            }
        }
    }

    /// The stored record; a missing file is a lease never held.
    fn load(&self) -> Result<Record> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Record::NEVER_HELD),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let corrupt = |why: String| LeaseError::Backend(format!("{} is not a lease file: {why}", path.display()));
        let rec: Record = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        match rec.defect() {
            Some(why) => Err(corrupt(format!("it names {why}"))),
            None => Ok(rec),
        }
    }

    /// Replaces the lease file atomically and durably.
    fn store(&self, rec: &Record) -> Result<()> {
        let (tmp, path) = (self.tmp_path(), self.path());
        let json = serde_json::to_vec(rec).map_err(|e| LeaseError::Backend(format!("cannot encode the lease: {e}")))?;
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&json).and_then(|()| f.sync_all()).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("sync", &self.dir))
    }
}

impl Lease for FileLease {
    fn key(&self) -> &str {
        self.key.as_str()
    }

    fn inspect(&self) -> BoxFuture<'_, Result<Record>> {
        // No lock needed: the file is only ever replaced whole, by rename.
        Box::pin(async move {
            let this = self.clone();
            blocking(move || this.load()).await
        })
    }

    crate::transactions!();
}

/// Runs blocking file work off the async runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LeaseError::Backend(format!("the lease transaction's thread failed: {e}")))?
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LeaseError {
    let path = path.to_path_buf();
    move |source| LeaseError::Io { op, path, source }
}
