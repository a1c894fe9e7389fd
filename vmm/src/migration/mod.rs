//! Live migration as a two-phase commit in which the source decides
//! (DESIGN.md, "The handover"). One [`Migration`] per daemon owns the state
//! of each attempt on either side; the QMP handlers only call it.
//!
//! ```text
//!  source                                          destination (--incoming, inmigrate)
//!  setup   connect (bounded, cancellable)
//!          HELLO {format, RAM, vCPUs, disk size} ──>  refuses what it cannot take
//!                                              <──  WELCOME {its incoming mirror targets}
//!          bind each target to the mirror job that carries it, or fail naming the disk
//!  active  RAM pre-copy passes (a cancel acts between two 256 KiB runs) ──> pages applied,
//!                                                                          arrivals tracked
//!  [pre-switchover: guest stopped, wait for migrate-continue or cancel]
//!  device  stop + drain (bounded), carriers in sync (bounded),
//!          inactivate every node (I3), last RAM, vCPUs, device, END ──>  every page, vCPU and
//!                                                                       the device arrived?
//!                                                                       activate nodes, load
//!                                              <──  PREPARED            (guest NOT running)
//!                                              <──  or REFUSED + why    (it rolled back)
//!          commit point: one step; the source is postmigrate, cancel is "too late"
//!          COMMIT ──────────────────────────────>  drop the exports that fed its disks,
//!  completed                                        run (or stay paused with -S); completed
//!
//!  any failure, timeout or cancel before the commit point:
//!          ABORT (best effort) ─────────────────>  roll back: nodes it activated inactive
//!          reactivate, resume if it was running      again, back to inmigrate
//!  a PREPARED destination that hears neither: stays paused, says so, takes a late
//!  decision or the operator's (x-baton-migrate-decide commit|abort)
//! ```
//!
//! Status (QEMU's MigrationStatus, both sides):
//! `none -> setup -> active -> [pre-switchover] -> device -> completed`, with
//! `failed` from any non-final state and `cancelling -> cancelled` before the
//! commit point. baton's detail is in `x-baton-handover`.

pub mod bitmaps;
pub mod carriers;
pub mod dest;
pub mod params;
pub mod points;
pub mod source;
pub mod state;
pub mod storage;

pub use dest::{migrate_in, refuse_busy, Landing};
pub use params::Parameters;
pub use source::migrate_out;
pub use state::{Decision, Handover, Migration, Role, Status, VerbError, CAPABILITIES};

use std::time::Duration;

use crate::stream::StreamError;
use crate::switchover::SwitchoverError;
use crate::VmmError;

/// Why an attempt failed; the text reaches `query-migrate`'s `error-desc`.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Vm(#[from] VmmError),
    #[error(transparent)]
    Switchover(#[from] SwitchoverError),
    #[error("migration cancelled")]
    Cancelled,
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error("no {0} within {1:?}")]
    Timeout(&'static str, Duration),
    /// The link went away without an error of its own (closed, or yanked).
    #[error("the connection to the other side was lost: {0}")]
    LinkLost(&'static str),
    #[error("the connection to the other side was lost: cannot connect")]
    Connect(#[source] std::io::Error),
    /// The destination's replies could not be read.
    #[error("the connection to the other side was lost: the return path failed")]
    ReturnPath(#[source] StreamError),
    #[error("the connection to the other side was lost: the stream ended early while waiting for {what}")]
    EndedEarly {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Disk(String),
    /// Pre-copy did not get the switchover's prediction within
    /// `downtime-limit` (with `x-baton-strict-downtime`).
    #[error(
        "pre-copy did not converge: after {passes} passes the switchover would take {predicted_ms} ms \
         ({ram_ms} ms of RAM and mirror work at {mbps:.1} MB/s, {fixed_ms} ms of flush and round trips), \
         over downtime-limit {limit_ms} ms; the guest runs on here"
    )]
    NotConverged { passes: u64, predicted_ms: u64, ram_ms: u64, fixed_ms: u64, mbps: f64, limit_ms: u64 },
    /// The destination could not take over its disks.
    #[error("activating the disks failed")]
    Activate(#[source] block::BlockError),
    #[error("aborted by the operator (x-baton-migrate-decide)")]
    OperatorAborted,
    #[error("the source aborted: {0}")]
    SourceAborted(String),
    #[error(transparent)]
    Injected(#[from] points::Injected),
    #[error("{0}")]
    Invalid(String),
    /// A dirty bitmap could not go (source) or be taken (destination); the text names it.
    #[error("dirty bitmaps: {0}")]
    Bitmap(String),
    /// The guest's lease decided, or could not be moved or proven.
    #[error("the guest's lease: {0}")]
    Lease(String),
}

impl MigrationError {
    /// The link is gone: nothing more can be read from the other side.
    pub fn is_link_lost(&self) -> bool {
        matches!(
            self,
            MigrationError::LinkLost(_)
                | MigrationError::Connect(_)
                | MigrationError::ReturnPath(_)
                | MigrationError::EndedEarly { .. }
        )
    }
}
