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
pub mod tenure;
pub mod vcpu;
pub mod vm;

pub use vm::{GuestStats, RunState, VerifyResult, Vm, VmConfig};

/// Errors of the VMM. Each variant says what failed; the cause, where there
/// is one, is its `source()` (render the whole chain with [`VmmError::chain`]).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("/dev/kvm is missing: this machine cannot run guests (no KVM)")]
    NoKvm,
    /// A KVM ioctl on the VM (or opening /dev/kvm) failed.
    #[error("{op} failed with errno {}", .source.errno())]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A system call on the VM's resources failed.
    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    /// A KVM ioctl on one vCPU failed (its registers, on its own thread).
    #[error("vCPU {vcpu}: {op} failed with errno {}", .source.errno())]
    VcpuState {
        vcpu: u64,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The signal handler that kicks vCPUs out of KVM_RUN cannot be installed.
    #[error("sigaction for the vCPU kick signal failed with errno {}", *.source as i32)]
    KickHandler {
        #[source]
        source: nix::Error,
    },
    /// A vCPU's thread could not be started.
    #[error("cannot start vcpu thread {vcpu}")]
    VcpuThread {
        vcpu: u64,
        #[source]
        source: std::io::Error,
    },
    /// Guest RAM could not be allocated.
    #[error("guest memory: cannot allocate {size} bytes")]
    AllocMemory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A read or write of guest RAM (or the lookup of its host mapping) failed.
    #[error("guest memory: cannot {op} {len} bytes at {addr:#x}")]
    GuestMemory {
        op: &'static str,
        addr: u64,
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("vcpus must be between 1 and {max}")]
    VcpuRange { max: u32 },
    #[error("memory must be at least 8 MiB and a multiple of 4 KiB")]
    MemorySize,
    #[error("batch must be between 1 and {max}")]
    BatchRange { max: u64 },
    #[error("the guest workload was not built (GNU as/ld missing at build time)")]
    NoWorkload,
    #[error("the disk is smaller than one 4 KiB block")]
    DiskTooSmall,
    /// A state request for a vCPU this VM does not have.
    #[error("no vCPU {0}")]
    NoVcpu(u64),
    /// vCPU state is read and written only while every vCPU is stopped.
    #[error("the vCPUs must be stopped")]
    VcpusRunning,
    #[error("node '{0}' is inactive: the guest cannot run on it")]
    InactiveDisk(String),
    /// `cont` took the guest's exclusive write permission on its disk and failed.
    #[error("the guest cannot take its disk")]
    TakeDisk(#[source] block::BlockError),
    #[error("guest is waiting for an incoming migration")]
    WaitingForMigration,
    /// I8: the guest now runs on the destination.
    #[error("the guest was migrated away and runs on the destination")]
    MigratedAway,
    /// `cont` (or a resume) could not prove the guest's lease.
    #[error("the guest cannot run without its lease")]
    Lease(#[source] crate::tenure::TenureError),
    #[error("the guest is stopped for a migration's switchover")]
    InSwitchover,
    /// The guest stopped on its own (the vCPU's report: triple fault and the like).
    #[error("guest stopped with an error: {0}")]
    GuestFailed(String),
    #[error("the disk's requests in flight did not complete within {0:?}")]
    DrainTimeout(std::time::Duration),
    #[error("the guest must be running to verify")]
    NotRunning,
    #[error("the guest did not finish its verification pass in {0:?}")]
    VerifyTimeout(std::time::Duration),
    #[error("stop the guest before saving its state")]
    StillRunning,
    #[error("cannot load a guest into a VM that is {}", .0.as_str())]
    CannotLoad(RunState),
    #[error("saved RAM is {saved} bytes, this VM has {have}")]
    RamSize { saved: u64, have: u64 },
    #[error("saved state has {saved} vCPUs, this VM has {have}")]
    VcpuCount { saved: usize, have: u32 },
    /// An MSR of a vCPU's state could not be read or written.
    #[error("vCPU {vcpu}: {op} stopped at MSR {index:#x}: {why}")]
    Msrs { vcpu: u64, op: &'static str, index: u32, why: &'static str },
    /// KVM would need more XSAVE state than the 4096 bytes a vCPU's state carries.
    #[error("this host's KVM needs {0} bytes of XSAVE state per vCPU, more than the 4096 baton carries")]
    XsaveSize(usize),
}

impl VmmError {
    /// The message and its causes, `: `-separated (as QMP's `desc` shows errors).
    pub fn chain(&self) -> String {
        error_text(self)
    }
}

/// An error and its sources, `: `-separated.
pub(crate) fn error_text(e: &dyn std::error::Error) -> String {
    block::error::chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_says_what_failed_and_its_source_says_why() {
        let e = VmmError::TakeDisk(block::BlockError::NodeNotFound("disk".into()));
        assert_eq!(e.to_string(), "the guest cannot take its disk");
        assert_eq!(e.chain(), "the guest cannot take its disk: cannot find node 'disk'");
        let e = VmmError::VcpuState { vcpu: 1, op: "KVM_GET_REGS", source: kvm_ioctls::Error::new(5) };
        assert!(std::error::Error::source(&e).is_some());
        assert!(e.chain().starts_with("vCPU 1: KVM_GET_REGS failed with errno 5: "), "{}", e.chain());
    }
}
