//! baton's small KVM VMM: a VM with guest RAM (dirty-logged), vCPU threads
//! that stop promptly, a paravirtual block device that does its I/O through
//! the block graph, and a tiny self-checking guest workload. Built for a
//! machine whose KVM is nested and slow: the guest only stamps, submits and
//! checks; the device does the heavy lifting.

pub mod device;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod stream;
pub mod switchover;
pub mod vcpu;
pub mod vm;

pub use vm::{GuestStats, RunState, VerifyResult, Vm, VmConfig};

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("/dev/kvm is missing: this machine cannot run guests (no KVM)")]
    NoKvm,
    #[error("{0} failed with errno {1}")]
    Kvm(&'static str, i32),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    State(String),
    #[error("node '{0}' is inactive: the guest cannot run on it")]
    InactiveDisk(String),
}

/// An error and its sources, `: `-separated.
pub(crate) fn error_text(e: &dyn std::error::Error) -> String {
    block::error::chain(e)
}
