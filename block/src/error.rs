//! The block layer's errors.
//!
//! Every error that leaves the process (to an NBD client, a QMP monitor or a
//! guest) is first reduced to an [`ErrorKind`], which maps to an errno for NBD
//! and the guest and to a QMP error class. New variants never need a new kind.

use std::io;

use crate::bitmap::BitmapError;

/// What a caller may branch on.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device or file failed (EIO and friends).
    Io,
    /// The node is inactive, read-only, or the permission is not held (EPERM).
    PermissionDenied,
    /// A malformed request or option (EINVAL).
    InvalidArgument,
    /// A write past the end of the device (ENOSPC).
    NoSpace,
    /// The driver cannot do this (ENOTSUP).
    Unsupported,
    /// A node, bitmap or other named object does not exist.
    NotFound,
    /// Someone else holds what was asked for (EBUSY / EAGAIN for locks).
    Busy,
}

impl ErrorKind {
    /// The errno an NBD client or a guest sees for this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io => libc_errno::EIO,
            ErrorKind::PermissionDenied => libc_errno::EPERM,
            ErrorKind::InvalidArgument => libc_errno::EINVAL,
            ErrorKind::NoSpace => libc_errno::ENOSPC,
            ErrorKind::Unsupported => libc_errno::ENOTSUP,
            ErrorKind::NotFound => libc_errno::ENOENT,
            ErrorKind::Busy => libc_errno::EBUSY,
        }
    }

    /// The kind an errno maps to (for errors injected by `blkdebug` and OS errors).
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc_errno::EPERM | libc_errno::EACCES | libc_errno::EROFS => ErrorKind::PermissionDenied,
            libc_errno::EINVAL | libc_errno::EOVERFLOW => ErrorKind::InvalidArgument,
            libc_errno::ENOSPC | libc_errno::EFBIG | libc_errno::EDQUOT => ErrorKind::NoSpace,
            libc_errno::ENOTSUP => ErrorKind::Unsupported,
            libc_errno::ENOENT => ErrorKind::NotFound,
            libc_errno::EBUSY | libc_errno::EAGAIN => ErrorKind::Busy,
            _ => ErrorKind::Io,
        }
    }
}

/// Linux errno values the mapping needs (stable ABI numbers).
pub mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EAGAIN: i32 = 11;
    pub const EACCES: i32 = 13;
    pub const EBUSY: i32 = 16;
    pub const EFBIG: i32 = 27;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const ENOTSUP: i32 = 95;
    pub const EOVERFLOW: i32 = 75;
    pub const EDQUOT: i32 = 122;
    pub const ETIMEDOUT: i32 = 110;
}

/// A block I/O operation, for error messages and `blkdebug` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
    Truncate,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write-zeroes",
            Op::Discard => "discard",
            Op::Flush => "flush",
            Op::BlockStatus => "block-status",
            Op::Truncate => "truncate",
        })
    }
}

/// Errors of the block layer.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot find node '{0}'")]
    NodeNotFound(String),
    #[error("duplicate node name '{0}'")]
    DuplicateNode(String),
    #[error(
        "invalid node name '{0}': use letters, digits, '-', '.', '_', starting with a letter, at most 31 characters"
    )]
    InvalidNodeName(String),
    #[error("invalid option '{option}': {reason}")]
    InvalidOption { option: String, reason: String },
    #[error("unknown driver '{0}'")]
    UnknownDriver(String),
    /// Options that do not match their schema, worded as QEMU words it
    /// ("Parameter 'x' is unexpected").
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
    #[error("could not open '{path}'")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} on inactive node '{node}'")]
    Inactive { node: String, op: Op },
    #[error("{op} on read-only node '{node}'")]
    ReadOnly { node: String, op: Op },
    #[error("{op} at offset {offset} length {len} is past the end of node '{node}' ({size} bytes)")]
    OutOfRange { node: String, op: Op, offset: u64, len: u64, size: u64 },
    #[error("{op} at offset {offset} length {len} on node '{node}' is not aligned to {align} bytes")]
    Misaligned { node: String, op: Op, offset: u64, len: u64, align: u32 },
    #[error("{op} failed on node '{node}'")]
    Io {
        node: String,
        op: Op,
        #[source]
        source: io::Error,
    },
    #[error("{event} failed on node '{node}': injected error {errno} by blkdebug")]
    Injected { node: String, event: &'static str, errno: i32 },
    #[error("node '{node}' does not support {what}")]
    Unsupported { node: String, what: &'static str },
    #[error("conflicts with use by {other} as '{perm}', which does not allow '{perm}' on {node}")]
    PermConflict { node: String, perm: &'static str, other: String },
    #[error("failed to get \"{perm}\" lock on {path}: is another process using the image?")]
    LockConflict { path: String, perm: &'static str },
    #[error("image lock on {path} failed")]
    Lock {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("node '{node}' has active parent node '{parent}'")]
    HasActiveParent { node: String, parent: String },
    #[error("node '{node}' is in use by {user}, which does not allow inactivation")]
    InactivationRefused { node: String, user: String },
    #[error("node '{node}' is in use by {users}")]
    InUse { node: String, users: String },
    #[error("flushing node '{node}' before inactivation failed; every node is active again")]
    InactivateFlush {
        node: String,
        #[source]
        source: Box<BlockError>,
    },
    #[error("inactivating node '{node}' failed; every node is active again")]
    InactivateFlip {
        node: String,
        #[source]
        source: Box<BlockError>,
    },
    #[error("activating node '{node}' failed")]
    Activate {
        node: String,
        #[source]
        source: Box<BlockError>,
    },
    #[error("rollback failed: node '{node}' could not be reactivated ({first}); it stays inactive")]
    ReactivateFailed {
        node: String,
        first: String,
        #[source]
        source: Box<BlockError>,
    },
    #[error("bitmap '{bitmap}' already exists on node '{node}'")]
    BitmapExists { node: String, bitmap: String },
    #[error("dirty bitmap '{bitmap}' not found on node '{node}'")]
    BitmapNotFound { node: String, bitmap: String },
    #[error("bitmap on node '{node}'")]
    Bitmap {
        node: String,
        #[source]
        source: BitmapError,
    },
}

impl BlockError {
    /// The kind a caller may branch on.
    pub fn kind(&self) -> ErrorKind {
        use BlockError::*;
        match self {
            Bitmap { source: BitmapError::Busy { .. }, .. } => ErrorKind::Busy,
            NodeNotFound(_) | BitmapNotFound { .. } => ErrorKind::NotFound,
            DuplicateNode(_)
            | InvalidNodeName(_)
            | InvalidOption { .. }
            | UnknownDriver(_)
            | Schema(_)
            | BitmapExists { .. }
            | Bitmap { .. } => ErrorKind::InvalidArgument,
            Misaligned { .. } => ErrorKind::InvalidArgument,
            Open { source, .. } | Io { source, .. } => {
                source.raw_os_error().map(ErrorKind::from_errno).unwrap_or(ErrorKind::Io)
            }
            Inactive { .. } | ReadOnly { .. } => ErrorKind::PermissionDenied,
            OutOfRange { op, .. } => match op {
                Op::Write | Op::WriteZeroes | Op::Truncate => ErrorKind::NoSpace,
                _ => ErrorKind::InvalidArgument,
            },
            Injected { errno, .. } => ErrorKind::from_errno(*errno),
            Unsupported { .. } => ErrorKind::Unsupported,
            PermConflict { .. }
            | LockConflict { .. }
            | HasActiveParent { .. }
            | InactivationRefused { .. }
            | InUse { .. } => ErrorKind::Busy,
            Lock { .. } => ErrorKind::Busy,
            InactivateFlush { source, .. }
            | InactivateFlip { source, .. }
            | Activate { source, .. }
            | ReactivateFailed { source, .. } => source.kind(),
        }
    }

    /// The errno an NBD client or guest sees.
    pub fn errno(&self) -> i32 {
        match self {
            // Preserve the precise errno of OS and injected errors; a timeout
            // raised by a driver (no OS code) is still ETIMEDOUT.
            BlockError::Io { source, .. } | BlockError::Open { source, .. } => {
                source.raw_os_error().unwrap_or(match source.kind() {
                    io::ErrorKind::TimedOut => libc_errno::ETIMEDOUT,
                    _ => libc_errno::EIO,
                })
            }
            BlockError::Injected { errno, .. } => *errno,
            other => other.kind().errno(),
        }
    }

    /// The whole chain of messages, `: `-separated, as QMP `desc` shows it.
    pub fn chain(&self) -> String {
        chain(self)
    }
}

/// Any error and its sources, `: `-separated (for messages that leave the process).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Result of block-layer operations.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_timeout_is_etimedout_and_other_driver_errors_eio() {
        let timed_out = BlockError::Io {
            node: "n".into(),
            op: Op::Write,
            source: io::Error::new(io::ErrorKind::TimedOut, "no reply"),
        };
        assert_eq!(timed_out.errno(), libc_errno::ETIMEDOUT);
        assert_eq!(timed_out.kind(), ErrorKind::Io);
        let aborted = BlockError::Io {
            node: "n".into(),
            op: Op::Write,
            source: io::Error::new(io::ErrorKind::ConnectionAborted, "gone"),
        };
        assert_eq!(aborted.errno(), libc_errno::EIO);
        let os =
            BlockError::Io { node: "n".into(), op: Op::Read, source: io::Error::from_raw_os_error(libc_errno::ENOSPC) };
        assert_eq!(os.errno(), libc_errno::ENOSPC);
    }
}
