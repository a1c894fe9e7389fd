//! The lease's errors. Each message names the guest's key, so an operator
//! reading a log line knows which guest it is about.

use std::path::PathBuf;

/// Why a lease operation failed. Every failure changes nothing in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// Another owner holds the lease and it has not expired.
    #[error("the lease of guest {key} is held by {owner} at generation {generation}")]
    HeldBy { key: String, owner: String, generation: u64 },
    /// The caller presented a generation older than the store's.
    #[error("generation {presented} of the lease of guest {key} is stale: the lease is at generation {current}")]
    Stale { key: String, presented: u64, current: u64 },
    /// The store no longer says (owner, generation), or the lease expired:
    /// the caller must stop running the guest.
    #[error("the lease of guest {key} is no longer held by {owner} at generation {generation} (expired, released or taken over)")]
    Lost { key: String, owner: String, generation: u64 },
    /// `claim` found no transfer to (owner, generation) waiting for it.
    #[error("the lease of guest {key} was not handed to {owner} at generation {generation} (or the handover expired)")]
    NotOffered { key: String, owner: String, generation: u64 },
    /// A key that cannot name a lease (it becomes a file name).
    #[error("invalid lease key {0:?}: expected 1 to 64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidKey(String),
    /// An owner name the store cannot hold (empty means "released").
    #[error("invalid lease owner {0:?}: expected 1 to 255 bytes without control characters")]
    InvalidOwner(String),
    /// A bad `--lease` option or constructor argument.
    #[error("invalid lease option: {0}")]
    InvalidOption(String),
    /// The backend's state is unusable (a corrupt or foreign lease file, a clock before 1970, ...).
    #[error("lease backend: {0}")]
    Backend(String),
    /// A system call on the backend's files failed.
    #[error("lease backend: cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, LeaseError>;
