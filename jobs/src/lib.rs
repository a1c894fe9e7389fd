//! baton's block jobs: QEMU's job state machine ([`job`]) and the mirror job ([`mirror`]).

#![forbid(unsafe_code)]

pub mod job;
pub mod mirror;

pub use job::{EventSink, Job, JobError, JobManager, JobOptions, Outcome, Status};
