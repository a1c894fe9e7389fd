//! Live migration over a stream (unix or TCP socket): RAM pre-copy driven
//! by the dirty log while the guest runs, then the switchover (see
//! switchover.rs) that sends the last dirty pages, the vCPUs and the device
//! and waits for the destination's acknowledgement.
//!
//! ```text
//!  source: setup ─> active (pre-copy passes) ─> device (switchover) ─> completed
//!                         any error / cancel before the ack ─> failed / cancelled
//!  destination: inmigrate ─> sections ... END ─> activate nodes ─> ack ─> paused
//! ```
//! Disks travel separately, through mirror jobs into the destination's NBD
//! exports; the switchover waits for them to be in sync.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use block::Graph;
use jobs::JobManager;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use vm_memory::{Bytes, GuestAddress};

use crate::stream::{self, Section, StreamError, PAGE};
use crate::switchover::{switchover_resuming, SwitchoverError};
use crate::vm::{RunState, Vm};
use crate::VmmError;

/// Pre-copy passes at most before the switchover.
const MAX_PASSES: u32 = 8;
/// Switch over once a pass leaves this few dirty pages.
const SMALL_ENOUGH: u64 = 256;

/// QMP's MigrationStatus names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    None,
    Setup,
    Active,
    /// Stopped before the switchover, waiting for migrate-continue (capability pause-before-switchover).
    PreSwitchover,
    Device,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::PreSwitchover => "pre-switchover",
            Status::Device => "device",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Called on every status change (the daemon sends MIGRATION events).
pub type StatusSink = Arc<dyn Fn(Status) + Send + Sync>;

/// What `query-migrate` shows.
#[derive(Default)]
pub struct Progress {
    status: Mutex<Option<Status>>,
    pub pages_sent: AtomicU64,
    pub passes: AtomicU64,
    pub dirty_pages: AtomicU64,
    error: Mutex<Option<String>>,
    pub cancel: AtomicBool,
    /// Capability pause-before-switchover.
    pub pause_before_switchover: AtomicBool,
    /// Set by migrate-continue.
    pub proceed: AtomicBool,
    /// Wakes a migration waiting in pre-switchover (continue or cancel).
    pub wake: tokio::sync::Notify,
    /// Status changes, for the MIGRATION event.
    pub on_status: Mutex<Option<StatusSink>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl Progress {
    pub fn status(&self) -> Status {
        self.status.lock().ok().and_then(|s| *s).unwrap_or(Status::None)
    }
    pub fn set(&self, s: Status) {
        if let Ok(mut st) = self.status.lock() {
            *st = Some(s);
        }
        if let Some(f) = self.on_status.lock().ok().and_then(|f| f.clone()) {
            f(s);
        }
    }
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }
    pub fn fail(&self, e: String) {
        if let Ok(mut x) = self.error.lock() {
            *x = Some(e);
        }
    }
}

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
    #[error("{0}")]
    Invalid(String),
}

/// Send the pages set in `log` (a dirty-log bitmap), in runs.
async fn send_pages<W: AsyncWrite + Unpin>(w: &mut W, vm: &Vm, log: &[u64], p: &Progress) -> Result<(), MigrationError> {
    let mem = vm.memory();
    let pages = vm.config().memory / PAGE as u64;
    let mut buf = Vec::with_capacity(64 * PAGE);
    let mut first = 0u64;
    let flush = |buf: &mut Vec<u8>, first: u64| {
        let data = std::mem::take(buf);
        (first, data)
    };
    let mut i = 0u64;
    while i < pages {
        let dirty = log.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0);
        if dirty {
            if buf.is_empty() {
                first = i;
            }
            let at = buf.len();
            buf.resize(at + PAGE, 0);
            mem.read_slice(&mut buf[at..], GuestAddress(i * PAGE as u64)).map_err(|e| VmmError::Memory(e.to_string()))?;
        }
        if (!dirty || buf.len() >= 64 * PAGE) && !buf.is_empty() {
            let (f, data) = flush(&mut buf, first);
            stream::write_ram(w, f, &data).await.map_err(StreamError::from)?;
            p.pages_sent.fetch_add((data.len() / PAGE) as u64, Ordering::SeqCst);
            buf = data;
            buf.clear();
        }
        i += 1;
    }
    if !buf.is_empty() {
        stream::write_ram(w, first, &buf).await.map_err(StreamError::from)?;
        p.pages_sent.fetch_add((buf.len() / PAGE) as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// The source side of a migration over `conn`. On error the source is as
/// before (the switchover rolled back, or never started).
pub async fn migrate_out<S>(graph: &Arc<Graph>, jobs: &Arc<JobManager>, vm: &Arc<Vm>, conn: S, p: &Progress) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (r, w) = tokio::io::split(conn);
    let mut w = BufWriter::with_capacity(1 << 20, w);
    let mut r = BufReader::new(r);
    stream::write_header(&mut w).await.map_err(StreamError::from)?;
    stream::write_config(&mut w, vm.config().memory, vm.config().vcpus).await.map_err(StreamError::from)?;
    p.set(Status::Active);
    // Pass 0 sends every page; later passes what the guest dirtied meanwhile.
    let _ = vm.take_dirty_log()?;
    let all = vec![u64::MAX; (vm.config().memory / PAGE as u64).div_ceil(64) as usize];
    send_pages(&mut w, vm, &all, p).await?;
    for _ in 0..MAX_PASSES {
        if p.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        let log = vm.take_dirty_log()?;
        let n = crate::memory::count(&log);
        p.dirty_pages.store(n, Ordering::SeqCst);
        p.passes.fetch_add(1, Ordering::SeqCst);
        send_pages(&mut w, vm, &log, p).await?;
        if n <= SMALL_ENOUGH {
            break;
        }
    }
    if p.cancel.load(Ordering::SeqCst) {
        return Err(MigrationError::Cancelled);
    }
    let was_running = vm.is_running();
    if p.pause_before_switchover.load(Ordering::SeqCst) {
        // Stop first and let the operator decide (migrate-continue or cancel).
        vm.stop().await?;
        p.set(Status::PreSwitchover);
        loop {
            let woken = p.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if p.cancel.load(Ordering::SeqCst) {
                if was_running {
                    vm.cont().await?;
                }
                return Err(MigrationError::Cancelled);
            }
            if p.proceed.load(Ordering::SeqCst) {
                break;
            }
            woken.await;
        }
    }
    p.set(Status::Device);
    let mirrors: Vec<String> = jobs.jobs().iter().filter(|j| j.kind() == "mirror").map(|j| j.id.clone()).collect();
    let vm2 = vm.clone();
    let (wr, rr) = (&mut w, &mut r);
    switchover_resuming(graph, jobs, vm, &mirrors, was_running, |st| async move {
        // The guest is stopped: the last dirty pages, the vCPUs, the device, the end.
        let log = vm2.take_dirty_log()?;
        send_pages(wr, &vm2, &log, p).await?;
        for (id, v) in st.vcpus.iter().enumerate() {
            stream::write_vcpu(wr, id as u32, v).await?;
        }
        stream::write_device(wr, st.device).await?;
        stream::write_end(wr).await?;
        match stream::read_ack(rr).await? {
            Ok(()) => Ok(()),
            Err(msg) => Err(Box::new(MigrationError::Refused(msg)) as Box<dyn std::error::Error + Send + Sync>),
        }
    })
    .await?;
    p.set(Status::Completed);
    Ok(())
}

/// The destination side: apply the stream to `vm` (inmigrate); at the end
/// marker activate every node, load the vCPUs and the device, acknowledge.
/// The VM is left paused; the caller resumes it unless started with -S.
pub async fn migrate_in<S>(graph: &Arc<Graph>, vm: &Arc<Vm>, conn: S) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (r, mut w) = tokio::io::split(conn);
    let mut r = BufReader::with_capacity(1 << 20, r);
    let res = receive(graph, vm, &mut r).await;
    match &res {
        Ok(()) => stream::write_ack(&mut w, Ok(())).await.map_err(StreamError::from)?,
        Err(e) => {
            let _ = stream::write_ack(&mut w, Err(&crate::error_text(e))).await;
        }
    }
    res
}

async fn receive<R: AsyncRead + Unpin>(graph: &Arc<Graph>, vm: &Arc<Vm>, r: &mut R) -> Result<(), MigrationError> {
    if vm.state() != RunState::InMigrate {
        return Err(MigrationError::Invalid(format!("the guest is {}, not waiting for a migration", vm.state().as_str())));
    }
    stream::read_header(r).await?;
    let mem = vm.memory().clone();
    let pages = vm.config().memory / PAGE as u64;
    let mut config_seen = false;
    let mut vcpus = vec![None; vm.config().vcpus as usize];
    let mut device = None;
    loop {
        match stream::read_section(r).await? {
            Section::Config { memory, vcpus: n } => {
                if memory != vm.config().memory || n != vm.config().vcpus {
                    return Err(MigrationError::Invalid(format!(
                        "the source's guest has {memory} bytes and {n} vCPUs, this one {} and {}",
                        vm.config().memory,
                        vm.config().vcpus
                    )));
                }
                config_seen = true;
            }
            _ if !config_seen => return Err(MigrationError::Invalid("the stream does not start with its configuration".into())),
            Section::Ram { first_page, data } => {
                let n = (data.len() / PAGE) as u64;
                if first_page.checked_add(n).is_none_or(|end| end > pages) {
                    return Err(MigrationError::Invalid(format!("RAM pages {first_page}+{n} are outside the guest's {pages} pages")));
                }
                mem.write_slice(&data, GuestAddress(first_page * PAGE as u64)).map_err(|e| VmmError::Memory(e.to_string()))?;
            }
            Section::Vcpu { id, state } => match vcpus.get_mut(id as usize) {
                Some(slot) => *slot = Some(*state),
                None => return Err(MigrationError::Invalid(format!("state for vCPU {id}, which this guest lacks"))),
            },
            Section::Device { consumed } => device = Some(consumed),
            Section::End => break,
        }
    }
    let vcpus: Option<Vec<_>> = vcpus.into_iter().collect();
    let (Some(vcpus), Some(device)) = (vcpus, device) else {
        return Err(MigrationError::Invalid("the stream ended without every vCPU and the device".into()));
    };
    // Everything arrived and fits: take over the disks, then load the guest.
    graph.activate_all().await.map_err(|e| MigrationError::Invalid(format!("activating the disks failed: {}", e.chain())))?;
    fail::fail_point!("migration::incoming-before-ack", |_| Err(MigrationError::Invalid("failpoint migration::incoming-before-ack".into())));
    vm.load_cpu_state(&vcpus, device).await?;
    vm.set_state(RunState::Paused);
    Ok(())
}
