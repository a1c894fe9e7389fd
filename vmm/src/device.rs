//! The paravirtual block device ("baton-blk").
//!
//! The guest writes descriptors into a ring in its RAM (layout.rs: op,
//! status, sector, count, buffer address), bumps the submit counter and
//! writes the doorbell port. The device takes every descriptor between its
//! own `consumed` counter and the guest's submit counter and runs each as a
//! request through the block graph, concurrently; the data moves by DMA into
//! or out of guest RAM, and the status is written back last. Every write the
//! device makes to guest RAM goes through vm-memory, so it lands in the dirty
//! log. `consumed` is the device's whole state (the ring is guest RAM).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use block::sync::{lock, wait_for};
use block::{BlockBackend, IoBuf, WriteFlags};
use tokio::sync::Notify;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::Mem;

/// Largest request the device accepts (the guest's own use 4 KiB).
const MAX_REQUEST: u64 = 1 << 20;

/// A device error worth telling the operator about.
pub type ErrorSink = Arc<dyn Fn(&str, &str, &str) + Send + Sync>;

pub struct BlockDevice {
    mem: Arc<Mem>,
    backend: BlockBackend,
    /// Descriptors taken from the ring so far (the device state).
    consumed: Mutex<u32>,
    /// Doorbells being handled plus requests in flight.
    inflight: AtomicUsize,
    drained: Notify,
    rt: tokio::runtime::Handle,
    pub completed: AtomicU64,
    pub errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    on_error: ErrorSink,
    blocks: AtomicU32,
    /// Bytes of guest RAM (buffers must lie inside).
    mem_size: u64,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice").field("inflight", &self.inflight.load(Ordering::SeqCst)).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    op: u32,
    sector: u64,
    count: u32,
    buf: u32,
}

impl BlockDevice {
    pub fn new(mem: Arc<Mem>, backend: BlockBackend, rt: tokio::runtime::Handle, on_error: ErrorSink) -> Arc<Self> {
        let blocks = (backend.length() / BLOCK_SIZE).min(MAX_BLOCKS) as u32;
        Arc::new(Self {
            mem: mem.clone(),
            backend,
            consumed: Mutex::new(0),
            inflight: AtomicUsize::new(0),
            drained: Notify::new(),
            rt,
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            on_error,
            blocks: AtomicU32::new(blocks),
            mem_size: vm_memory::GuestMemoryBackend::last_addr(&*mem).0 + 1,
        })
    }

    /// Blocks of BLOCK_SIZE the guest may use.
    pub fn blocks(&self) -> u32 {
        self.blocks.load(Ordering::SeqCst)
    }

    pub fn backend(&self) -> &BlockBackend {
        &self.backend
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// The device state to migrate.
    pub fn save(&self) -> u32 {
        *lock(&self.consumed)
    }

    pub fn restore(&self, consumed: u32) {
        *lock(&self.consumed) = consumed;
    }

    fn done_one(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// The guest rang the doorbell (called on a vCPU thread).
    pub fn doorbell(self: &Arc<Self>) {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        self.rt.spawn(async move {
            me.take_descriptors();
            me.done_one();
        });
    }

    fn read_desc(&self, slot: u32) -> Option<Desc> {
        let base = RING_DESCS + u64::from(slot % RING_SLOTS as u32) * DESC_SIZE;
        let r32 = |off: u64| self.mem.read_obj::<u32>(GuestAddress(base + off)).ok();
        Some(Desc {
            op: r32(DESC_OP)?,
            sector: self.mem.read_obj::<u64>(GuestAddress(base + DESC_SECTOR)).ok()?,
            count: r32(DESC_COUNT)?,
            buf: r32(DESC_BUF)?,
        })
    }

    fn take_descriptors(self: &Arc<Self>) {
        let mut consumed = lock(&self.consumed);
        let Ok(submit) = self.mem.read_obj::<u32>(GuestAddress(RING_SUBMIT)) else { return };
        // At most a ring's worth: a guest that claims more is ignored past that.
        let mut n = 0;
        // Never more than a ring's worth in flight, however often the guest rings.
        while *consumed != submit && n < RING_SLOTS && self.inflight.load(Ordering::SeqCst) <= RING_SLOTS as usize {
            let slot = *consumed;
            *consumed = consumed.wrapping_add(1);
            n += 1;
            let Some(d) = self.read_desc(slot) else { continue };
            self.inflight.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            self.rt.spawn(async move {
                let status = me.run(d).await;
                let addr = RING_DESCS + u64::from(slot % RING_SLOTS as u32) * DESC_SIZE + DESC_STATUS;
                let _ = me.mem.write_obj::<u32>(status, GuestAddress(addr));
                me.completed.fetch_add(1, Ordering::SeqCst);
                // Descriptors left behind by the in-flight cap are taken now.
                me.take_descriptors();
                me.done_one();
            });
        }
    }

    /// Check a descriptor the guest wrote before anything is allocated for it.
    fn validate(&self, d: &Desc) -> Result<(), String> {
        if d.op as u64 == OP_FLUSH {
            return Ok(());
        }
        let len = u64::from(d.count) * 512;
        if d.count == 0 || len > MAX_REQUEST {
            return Err(format!("request of {} sectors (at most {} allowed)", d.count, MAX_REQUEST / 512));
        }
        let end = d.sector.checked_mul(512).and_then(|o| o.checked_add(len));
        if end.is_none_or(|e| e > self.backend.length()) {
            return Err(format!("request at sector {} of {} sectors is past the end of the disk", d.sector, d.count));
        }
        if u64::from(d.buf).checked_add(len).is_none_or(|e| e > self.mem_size) {
            return Err(format!("buffer {:#x} of {len} bytes is outside guest memory", d.buf));
        }
        Ok(())
    }

    async fn run(&self, d: Desc) -> u32 {
        if let Err(msg) = self.validate(&d) {
            return self.fail("request", msg);
        }
        let len = u64::from(d.count) * 512;
        let off = d.sector.saturating_mul(512);
        let res = match d.op as u64 {
            OP_WRITE => {
                let mut buf = IoBuf::zeroed(len as usize);
                match self.mem.read_slice(&mut buf, GuestAddress(u64::from(d.buf))) {
                    Ok(()) => self
                        .backend
                        .write(off, buf, WriteFlags::default())
                        .await
                        .map(|_| ())
                        .map_err(|e| ("write", e.chain())),
                    Err(e) => Err(("write", format!("bad guest buffer {:#x}: {e}", d.buf))),
                }
            }
            OP_READ => match self.backend.read(off, IoBuf::zeroed(len as usize)).await {
                Ok(buf) => self
                    .mem
                    .write_slice(&buf, GuestAddress(u64::from(d.buf)))
                    .map_err(|e| ("read", format!("bad guest buffer {:#x}: {e}", d.buf))),
                Err(e) => Err(("read", e.chain())),
            },
            OP_FLUSH => self.backend.flush().await.map_err(|e| ("flush", e.chain())),
            _ => Err(("request", format!("unknown operation {}", d.op))),
        };
        match res {
            Ok(()) => STATUS_OK as u32,
            Err((op, msg)) => self.fail(op, msg),
        }
    }

    fn fail(&self, op: &str, msg: String) -> u32 {
        self.errors.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(operation = op, error = %msg, "guest disk I/O error");
        (self.on_error)(self.backend.node().name(), op, &msg);
        *lock(&self.last_error) = Some(msg);
        STATUS_IOERR as u32
    }

    /// Wait until no request is in flight (the vCPUs are stopped, so none can start).
    pub async fn drain(&self) {
        wait_for(&self.drained, || self.inflight.load(Ordering::SeqCst) == 0).await
    }
}
