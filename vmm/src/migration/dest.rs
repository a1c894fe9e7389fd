//! The destination side of the handover: strict about what it accepts,
//! never runs the guest before it knows the source committed, and rolls its
//! own side back on a refusal, an ABORT or a link lost before PREPARED.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use block::Graph;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use vm_memory::{Bytes, GuestAddress};

use super::bitmaps::{self, Created};
use super::params::Parameters;
use super::points::point;
use super::state::{Decision, Handover, Migration, Role, Status};
use super::storage::Exporter;
use super::MigrationError;
use crate::stream::{self, Reply, Section, StreamError, Target, PAGE};
use crate::vm::{RunState, Vm};

/// How an incoming attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// COMMIT (or the operator's commit): the guest is loaded, paused, on
    /// active nodes; the caller drops the exports that fed its disks and
    /// runs it if it ran on the source (`run`), unless started with -S.
    Committed { run: bool },
    /// Refused, aborted or failed: this side is as before the attempt.
    RolledBack,
}

/// Refuse a connection while another attempt holds the slot.
pub async fn refuse_busy<S: AsyncRead + AsyncWrite + Unpin>(conn: S, why: &str) {
    let (_r, mut w) = tokio::io::split(conn);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream::write_reply(&mut w, &Reply::Refused(why.to_string())))
        .await;
}

/// One incoming attempt on `conn`. `targets` are this side's disks exported
/// writable for the source's mirror; `exporter` makes the exports of a
/// storage copy, which the attempt withdraws however it ends. Opens and
/// ends the attempt in `mig`.
pub async fn migrate_in<S>(
    mig: &Arc<Migration>,
    graph: &Arc<Graph>,
    vm: &Arc<Vm>,
    targets: Vec<Target>,
    exporter: &dyn Exporter,
    conn: S,
) -> Landing
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if vm.state() != RunState::InMigrate {
        refuse_busy(conn, &format!("the guest here is {}, not waiting for a migration", vm.state().as_str())).await;
        return Landing::RolledBack;
    }
    if let Err(e) = mig.begin(Role::Destination) {
        refuse_busy(conn, &e.to_string()).await;
        return Landing::RolledBack;
    }
    let p = mig.params();
    let (r, mut w) = tokio::io::split(conn);
    let mut r = BufReader::with_capacity(1 << 20, r);
    let mut activated = Vec::new();
    let mut created = Vec::new();
    let mut lease = None;
    let res =
        receive(mig, graph, vm, &targets, exporter, &p, &mut r, &mut w, &mut activated, &mut created, &mut lease).await;
    let failure = match res {
        Ok(run) => match decide(mig, &p, &mut r, lease.as_ref()).await {
            Ok(leased) => {
                mig.set_handover(Handover::Committed);
                // Acknowledge (best effort: the source may be gone, and the
                // decision stands either way).
                let ack = stream::write_reply(&mut w, &Reply::Committed);
                let _ = tokio::time::timeout(Duration::from_secs(1), ack).await;
                // The storage copy's exports go before the guest takes its disk.
                let t = std::time::Instant::now();
                let withdrawn = exporter.withdraw().await;
                mig.step_done("withdraw-exports", t.elapsed());
                vm.set_state(RunState::Paused);
                if !mig.transition(Status::Completed) {
                    tracing::error!(status = mig.status().as_str(), "committed, but the status cannot say completed");
                }
                if let Err(why) = withdrawn {
                    // The guest is ours, but a writer other than it still
                    // holds its disk: it stays paused until that is resolved.
                    tracing::error!(error = %why, "committed; the guest stays paused");
                    mig.set_decision_note(format!("COMMIT taken, but {why}: the guest stays paused"));
                    return Landing::Committed { run: false };
                }
                return Landing::Committed { run: run && leased };
            }
            Err(e) => e,
        },
        Err(e) => {
            // Tell the source why (best effort): its error says what we refused.
            let why = crate::error_text(&e);
            let _ =
                tokio::time::timeout(Duration::from_secs(1), stream::write_reply(&mut w, &Reply::Refused(why))).await;
            e
        }
    };
    let mut text = crate::error_text(&failure);
    if let Err(e) = exporter.withdraw().await {
        text = format!("{text}; and {e}");
    }
    if let Err(e) = roll_back(graph, vm, &activated, &mut created).await {
        text = format!("{text}; and rolling back failed: {e}");
    }
    tracing::warn!(error = %text, "incoming migration failed; waiting for another attempt");
    mig.set_handover(Handover::RolledBack);
    mig.fail(text, mig.is_cancelled());
    Landing::RolledBack
}

/// Remove the bitmaps this attempt created, inactivate what it activated
/// and drop the loaded state: back to `inmigrate`, ready for the next attempt.
async fn roll_back(
    graph: &Arc<Graph>,
    vm: &Arc<Vm>,
    activated: &[String],
    created: &mut Vec<Created>,
) -> Result<(), String> {
    bitmaps::remove(graph, created);
    let mut failed = Vec::new();
    for name in activated.iter().rev() {
        let Ok(node) = graph.find(name) else { continue };
        if !node.is_active() {
            continue;
        }
        if let Err(e) = graph.set_active(Some(name), false).await {
            tracing::error!(node = %name, error = %e.chain(), "rolling back an incoming migration: cannot inactivate");
            failed.push(format!("cannot inactivate '{name}': {}", e.chain()));
        }
    }
    vm.set_state(RunState::InMigrate);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// The guest's lease in an incoming attempt: the source's record as read
/// before PREPARED went (its owner and generation are HELLO's).
struct Incoming {
    tenure: Arc<crate::tenure::Tenure>,
    prepared: lease::Record,
}

impl Incoming {
    /// The generation the lease moves to at the commit point.
    fn next(&self) -> u64 {
        self.prepared.generation + 1
    }
}

/// HELLO's lease against this side's: both keep the same one, under
/// different names, or neither keeps one.
fn check_lease(vm: &Vm, theirs: Option<&stream::HelloLease>) -> Result<(), MigrationError> {
    match (vm.tenure(), theirs) {
        (None, None) => Ok(()),
        (None, Some(l)) => Err(MigrationError::Lease(format!(
            "the source's guest has lease {}; this destination keeps none (start it with the same --lease key)",
            l.key
        ))),
        (Some(t), None) => {
            Err(MigrationError::Lease(format!("this destination keeps lease {}; the source's guest has none", t.key())))
        }
        (Some(t), Some(l)) if l.key != t.key() => Err(MigrationError::Lease(format!(
            "the source's guest has lease {}, this destination keeps {}",
            l.key,
            t.key()
        ))),
        (Some(t), Some(l)) if l.owner == t.owner() => Err(MigrationError::Lease(format!(
            "both daemons call themselves {} in the lease store (give each its own owner=)",
            l.owner
        ))),
        _ => Ok(()),
    }
}

/// Read a section within `bound`; `migrate_cancel` (or yank) ends the wait.
async fn section<R: AsyncRead + Unpin>(
    mig: &Migration,
    r: &mut R,
    bound: Duration,
    what: &'static str,
) -> Result<Section, MigrationError> {
    let read = tokio::select! {
        biased;
        _ = mig.cancelled() => return Err(mig.stop_reason()),
        read = tokio::time::timeout(bound, stream::read_section(r)) => read,
    };
    match read {
        Err(_) => Err(MigrationError::Timeout(what, bound)),
        Ok(Err(StreamError::Io(source))) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(MigrationError::EndedEarly { what, source })
        }
        Ok(r) => Ok(r?),
    }
}

#[allow(clippy::too_many_arguments)]
/// Everything up to PREPARED. Returns whether the guest ran on the source.
async fn receive<R, W>(
    mig: &Migration,
    graph: &Arc<Graph>,
    vm: &Arc<Vm>,
    targets: &[Target],
    exporter: &dyn Exporter,
    p: &Parameters,
    r: &mut R,
    w: &mut W,
    activated: &mut Vec<String>,
    created: &mut Vec<Created>,
    lease: &mut Option<Incoming>,
) -> Result<bool, MigrationError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if vm.state() != RunState::InMigrate {
        return Err(MigrationError::Invalid(format!(
            "the guest here is {}, not waiting for a migration",
            vm.state().as_str()
        )));
    }
    // Setup: the header and HELLO within the HELLO bound (a silent peer frees the slot).
    let hello = tokio::select! {
        biased;
        _ = mig.cancelled() => return Err(mig.stop_reason()),
        h = tokio::time::timeout(p.hello_timeout, async {
            stream::read_header(r).await?;
            stream::read_section(r).await
        }) => h.map_err(|_| MigrationError::Timeout("HELLO from the source", p.hello_timeout))??,
    };
    let Section::Hello(h) = hello else {
        return Err(MigrationError::Invalid("the stream does not start with HELLO".into()));
    };
    // Another build's layouts: refused before any RAM is accepted.
    h.check_layout()?;
    let cfg = vm.config();
    let disk = vm.device().backend().node().length();
    if h.memory != cfg.memory || h.vcpus != cfg.vcpus {
        return Err(MigrationError::Invalid(format!(
            "the source's guest has {} bytes of RAM and {} vCPUs, this one {} and {}",
            h.memory, h.vcpus, cfg.memory, cfg.vcpus
        )));
    }
    if h.disk_size != disk {
        return Err(MigrationError::Invalid(format!(
            "the source's guest disk has {} bytes, this one {disk}",
            h.disk_size
        )));
    }
    check_lease(vm, h.lease.as_ref())?;
    point("migration::incoming-hello").await?;
    let targets = match h.storage {
        false => targets.to_vec(),
        true => {
            // Storage copy: this side exports its guest's disk itself (the
            // export activates it; a rollback inactivates it again).
            let node = vm.device().backend().node();
            // Children first, as activation goes (a rollback walks it backwards).
            let chain: Vec<_> = std::iter::successors(Some(node.clone()), |n| n.child().cloned()).collect();
            activated.extend(chain.iter().rev().filter(|n| !n.is_active()).map(|n| n.name().to_string()));
            point("migration::incoming-storage").await?;
            vec![exporter.export(node.name()).await.map_err(MigrationError::Disk)?]
        }
    };
    let welcome = stream::Welcome { targets, lease: vm.tenure().map(|t| (t.key().to_string(), t.owner().to_string())) };
    tokio::time::timeout(p.io_timeout, stream::write_reply(w, &Reply::Welcome(welcome)))
        .await
        .map_err(|_| MigrationError::Timeout("the WELCOME write", p.io_timeout))?
        .map_err(StreamError::Io)?;
    mig.transition(Status::Active);

    // Active: sections until END; every page must arrive at least once.
    let mem = vm.memory().clone();
    let pages = cfg.memory / PAGE as u64;
    let mut arrived = vec![0u64; pages.div_ceil(64) as usize];
    // The guest never ran here: its RAM starts as zeroes, and the pages
    // written with data are tracked, so a zero page is written only over one.
    crate::memory::discard(&mem)?;
    let mut written = vec![0u64; pages.div_ceil(64) as usize];
    let mut vcpus = vec![None; cfg.vcpus as usize];
    let mut device = None;
    let mut incoming = bitmaps::Incoming::default();
    let mut clock = None;
    let running = loop {
        match section(mig, r, p.io_timeout, "next section").await? {
            Section::Hello(_) => return Err(MigrationError::Invalid("a second HELLO".into())),
            Section::Ram(run) => {
                let (first_page, n) = (run.first_page, run.zero.len() as u64);
                if first_page.checked_add(n).is_none_or(|end| end > pages) {
                    return Err(MigrationError::Invalid(format!(
                        "RAM pages {first_page}+{n} are outside the guest's {pages} pages"
                    )));
                }
                write_pages(&mem, &run, &mut written)?;
                for pg in first_page..first_page + n {
                    if let Some(word) = arrived.get_mut((pg / 64) as usize) {
                        *word |= 1 << (pg % 64);
                    }
                }
                mig.counters.pages_received.fetch_add(n, Ordering::SeqCst);
            }
            Section::Vcpu { id, state } => match vcpus.get_mut(id as usize) {
                Some(slot @ None) => *slot = Some(*state),
                Some(Some(_)) => return Err(MigrationError::Invalid(format!("vCPU {id}'s state arrived twice"))),
                None => return Err(MigrationError::Invalid(format!("state for vCPU {id}, which this guest lacks"))),
            },
            Section::Device { consumed } => {
                if device.replace(consumed).is_some() {
                    return Err(MigrationError::Invalid("the device's state arrived twice".into()));
                }
            }
            Section::Bitmap(chunk) => {
                if !mig.capabilities().dirty_bitmaps {
                    return Err(MigrationError::Bitmap(format!(
                        "the source sent bitmap '{}' of node '{}', but capability dirty-bitmaps is off here",
                        chunk.meta.bitmap, chunk.meta.node
                    )));
                }
                incoming.take(graph, p.block_bitmap_mapping.as_deref(), chunk).map_err(MigrationError::Bitmap)?;
            }
            Section::KvmClock { clock: c } => {
                if clock.replace(c).is_some() {
                    return Err(MigrationError::Invalid("the KVM clock arrived twice".into()));
                }
            }
            Section::Abort(why) => return Err(MigrationError::SourceAborted(why)),
            Section::KeepAlive => {}
            // The source is about to stop the guest: say when all before this is in RAM.
            Section::Sync => tokio::time::timeout(p.io_timeout, stream::write_reply(w, &Reply::Synced))
                .await
                .map_err(|_| MigrationError::Timeout("the SYNCED write", p.io_timeout))?
                .map_err(StreamError::Io)?,
            Section::Commit { .. } => {
                return Err(MigrationError::Invalid("COMMIT before the end of the stream".into()))
            }
            Section::End { running } => break running,
        }
    };
    let missing = pages - crate::memory::count(&arrived).min(pages);
    if missing > 0 {
        let first = (0..pages)
            .find(|pg| arrived.get((pg / 64) as usize).is_some_and(|w| w & (1 << (pg % 64)) == 0))
            .unwrap_or(0);
        return Err(MigrationError::Invalid(format!(
            "the stream ended with {missing} of {pages} RAM pages never sent (the first is page {first})"
        )));
    }
    let Some(vcpus) = vcpus.into_iter().collect::<Option<Vec<_>>>() else {
        return Err(MigrationError::Invalid("the stream ended without every vCPU's state".into()));
    };
    let Some(device) = device else {
        return Err(MigrationError::Invalid("the stream ended without the device's state".into()));
    };
    let Some(clock) = clock else {
        return Err(MigrationError::Invalid("the stream ended without the KVM clock".into()));
    };

    // Everything arrived and fits: take over the disks, load the guest, do NOT run it.
    let t = std::time::Instant::now();
    activated.extend(graph.nodes().iter().filter(|n| !n.is_active()).map(|n| n.name().to_string()));
    graph.activate_all().await.map_err(MigrationError::Activate)?;
    mig.step_done("activate", t.elapsed());
    point("migration::incoming-before-ack").await?;
    bitmaps::apply(graph, incoming, created).map_err(MigrationError::Bitmap)?;
    let t = std::time::Instant::now();
    vm.load_cpu_state(&vcpus, device, clock).await?;
    mig.step_done("load-state", t.elapsed());
    point("migration::incoming-before-prepared").await?;
    // The lease: the source's, at the generation HELLO said, now that its
    // last state is here and it renews no more until it decides; what the
    // record says now is what a later read is judged against.
    if let (Some(t), Some(l)) = (vm.tenure(), h.lease.as_ref()) {
        let rec = t.inspect().await.map_err(|e| MigrationError::Lease(crate::error_text(&e)))?;
        let now = lease::wall_ms().map_err(|e| MigrationError::Lease(e.to_string()))?;
        match rec.live_holder(now) {
            Some(holder) if holder.owner == l.owner && holder.generation == l.generation => {}
            other => {
                return Err(MigrationError::Lease(format!(
                    "the lease of guest {} is not the source's ({} at generation {}): {}",
                    t.key(),
                    l.owner,
                    l.generation,
                    match other {
                        Some(h) => format!("{} holds it at generation {}", h.owner, h.generation),
                        None => "nobody holds it".into(),
                    }
                )))
            }
        }
        *lease = Some(Incoming { tenure: t.clone(), prepared: rec });
    }
    if !mig.try_prepare() {
        return Err(mig.stop_reason());
    }
    tokio::time::timeout(p.io_timeout, stream::write_reply(w, &Reply::Prepared))
        .await
        .map_err(|_| MigrationError::Timeout("the PREPARED write", p.io_timeout))?
        .map_err(StreamError::Io)?;
    Ok(running)
}

/// Write a run's pages into guest RAM, which read zeroes when the attempt
/// began (see [`crate::memory::discard`]): a data page is written and
/// marked in `written`; a zero page is written only over a page marked
/// there (and unmarked), else skipped: no fresh page is faulted in and
/// cleared, and nothing is read (a 64 MiB guest is mostly such pages).
fn write_pages(mem: &crate::memory::Mem, run: &stream::RamRun, written: &mut [u64]) -> Result<(), MigrationError> {
    const ZERO: [u8; PAGE] = [0; PAGE];
    for (i, page) in run.pages().enumerate() {
        let pg = run.first_page + i as u64;
        let Some(word) = written.get_mut((pg / 64) as usize) else { continue };
        let bit = 1u64 << (pg % 64);
        let bytes = match page {
            Some(p) => {
                *word |= bit;
                p
            }
            None if *word & bit != 0 => {
                *word &= !bit;
                &ZERO[..]
            }
            None => continue,
        };
        let addr = pg * PAGE as u64;
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| crate::memory::error("write", addr, PAGE, source))?;
    }
    Ok(())
}

/// PREPARED: wait for COMMIT or ABORT from the source, or the operator's
/// decision, or (with a lease) the lease store's. Past the commit bound, or
/// with the link gone, the decision is unknown: stay paused and say so (a
/// late COMMIT is still taken); with a lease the store resolves it.
/// Ok: commit (and whether this side holds the lease, if it has one).
/// Err: abort, and why.
async fn decide<R: AsyncRead + Unpin>(
    mig: &Migration,
    p: &Parameters,
    r: &mut R,
    lease: Option<&Incoming>,
) -> Result<bool, MigrationError> {
    let commit = decided(mig, p, r, lease).await?;
    let Some(l) = lease else { return Ok(true) };
    match commit {
        // The store's decision made this side the holder already.
        Via::Store => Ok(true),
        Via::Source | Via::Operator => match l.tenure.claim(l.next()).await {
            Ok(_) => Ok(true),
            Err(e) => {
                let why = crate::error_text(&e);
                tracing::error!(error = %why, "committed, but the lease cannot be claimed: the guest stays paused");
                mig.set_decision_note(format!(
                    "committed, but the lease cannot be claimed ({why}): the guest stays paused"
                ));
                Ok(false)
            }
        },
    }
}

/// Who decided to commit.
enum Via {
    Source,
    Operator,
    /// The lease store (this side holds the lease already).
    Store,
}

/// How often a prepared destination reads the lease store: a tenth of the
/// ttl, within 20 ms and 500 ms.
fn poll_every(l: &Incoming) -> Duration {
    (l.tenure.ttl() / 10).clamp(Duration::from_millis(20), Duration::from_millis(500))
}

/// One read of the store: Some(Ok) commit (this side now holds the lease),
/// Some(Err) abort, None undecided (or the store did not answer).
async fn ask_store(l: &Incoming) -> Option<Result<(), String>> {
    use crate::tenure::Verdict;
    let now = match l.tenure.inspect().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "the lease store did not answer");
            return None;
        }
    };
    let now_ms = lease::wall_ms().ok()?;
    match crate::tenure::verdict(&l.prepared, &now, l.tenure.owner(), now_ms) {
        Verdict::Open => None,
        Verdict::Abort(why) => Some(Err(why)),
        Verdict::Commit => match l.tenure.claim(l.next()).await {
            Ok(_) => Some(Ok(())),
            Err(e) => {
                tracing::warn!(error = %crate::error_text(&e), "the lease moved here, but claiming it failed");
                None
            }
        },
        Verdict::Lapsed => match l.tenure.take_lapsed(now.generation + 1).await {
            Ok(_) => Some(Ok(())),
            Err(e) => {
                tracing::warn!(error = %crate::error_text(&e), "the source's lease lapsed, but taking it failed");
                None
            }
        },
    }
}

async fn decided<R: AsyncRead + Unpin>(
    mig: &Migration,
    p: &Parameters,
    r: &mut R,
    lease: Option<&Incoming>,
) -> Result<Via, MigrationError> {
    // One read, never dropped halfway (a COMMIT that straddles the bound is
    // still read whole); the bound only changes what the destination says.
    let read = stream::read_section(r);
    tokio::pin!(read);
    let bound = tokio::time::sleep(p.commit_timeout);
    tokio::pin!(bound);
    let mut link_open = true;
    let mut bound_passed = false;
    loop {
        let next = async {
            if link_open {
                (&mut read).await
            } else {
                std::future::pending().await
            }
        };
        // Reads the store until it decides (never, without a lease).
        let store = async {
            let Some(l) = lease else { return std::future::pending().await };
            loop {
                tokio::time::sleep(poll_every(l)).await;
                if let Some(v) = ask_store(l).await {
                    return v;
                }
            }
        };
        tokio::select! {
            d = mig.wait_decision() => return match d {
                Decision::Commit => Ok(Via::Operator),
                Decision::Abort => Err(MigrationError::OperatorAborted),
            },
            verdict = store => match verdict {
                Ok(()) => {
                    mig.set_decision_note("the lease moved to this destination (read from the lease store)".into());
                    return Ok(Via::Store);
                }
                Err(why) => {
                    mig.set_decision_note(format!("the lease store says abort: {why}"));
                    return Err(MigrationError::Lease(why));
                }
            },
            _ = &mut bound, if !bound_passed => {
                bound_passed = true;
                mig.decision_unknown(format!("no COMMIT or ABORT within {:?}", p.commit_timeout));
            }
            got = next => {
                link_open = false;
                match got {
                    Ok(Section::Commit { generation }) => {
                        if point("migration::incoming-commit").await.is_err() {
                            // Behave as if COMMIT never arrived.
                            mig.decision_unknown("failpoint migration::incoming-commit".into());
                            continue;
                        }
                        if let Some(l) = lease {
                            if generation != Some(l.next()) {
                                mig.decision_unknown(format!(
                                    "COMMIT says generation {generation:?}, the lease moves to {}",
                                    l.next()
                                ));
                                continue;
                            }
                        }
                        mig.set_decision_note("COMMIT from the source".into());
                        return Ok(Via::Source);
                    }
                    Ok(Section::Abort(why)) => {
                        mig.set_decision_note(format!("ABORT from the source: {why}"));
                        return Err(MigrationError::SourceAborted(why));
                    }
                    Ok(other) => mig.decision_unknown(format!("the source sent {} instead of its decision", other.name())),
                    Err(e) => mig.decision_unknown(format!("the link to the source was lost: {}", crate::error_text(&e))),
                }
            }
        }
    }
}
