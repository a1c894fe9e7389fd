//! An export: a name bound to a block node through a `BlockBackend`, with
//! the metadata contexts it offers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use block::bitmap::DirtyBitmap;
use block::{BlockBackend, BlockError, Graph, PermSet};
use tokio::sync::Notify;

use crate::proto;

/// How an export is set up (QEMU's `block-export-add` for type nbd).
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Export name clients ask for ("" is the default export).
    pub name: String,
    /// NBD_INFO_DESCRIPTION.
    pub description: String,
    /// Node to export.
    pub node: String,
    pub writable: bool,
    /// Bitmaps of the node offered as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<String>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Keep the node inactive if it is (serving reads, failing writes with
    /// EPERM) instead of activating it; also lets it be inactivated later.
    pub allow_inactive: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN.
    pub multi_conn: bool,
    /// QMP id of the export (block-export-add `id`).
    pub id: String,
}

/// A live export.
#[derive(Debug)]
pub struct Export {
    pub config: ExportConfig,
    pub backend: BlockBackend,
    pub bitmaps: Vec<Arc<DirtyBitmap>>,
    /// Connections currently using the export.
    clients: AtomicUsize,
    /// Set by a hard delete: connections stop taking requests.
    closing: AtomicBool,
    /// Signalled when the last client leaves.
    idle: Notify,
    /// Signalled when the export is closed, to wake connections waiting for requests.
    closed: Notify,
}

impl Export {
    /// Attach to the node: activate it first unless `allow_inactive`
    /// (as qemu-storage-daemon does), take the export's permissions.
    pub async fn open(graph: &Arc<Graph>, config: ExportConfig) -> Result<Arc<Export>, BlockError> {
        let node = graph.find(&config.node)?;
        if !config.allow_inactive && !node.is_active() {
            graph.activate(&config.node).await?;
        }
        let mut bitmaps = Vec::with_capacity(config.bitmaps.len());
        for b in &config.bitmaps {
            let bm = node.bitmap(b)?;
            bm.check_not_busy().map_err(|source| BlockError::Bitmap { node: config.node.clone(), source })?;
            bitmaps.push(bm);
        }
        let perms = if config.writable { PermSet::EXPORT_WRITABLE } else { PermSet::EXPORT_READONLY };
        let user = format!("export '{}'", if config.id.is_empty() { &config.name } else { &config.id });
        let backend = graph.attach(&config.node, &user, perms, config.allow_inactive)?;
        // While exported, a bitmap cannot be removed, cleared or changed (QEMU: busy).
        for bm in &bitmaps {
            bm.set_busy(true);
        }
        Ok(Arc::new(Export {
            config,
            backend,
            bitmaps,
            clients: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            idle: Notify::new(),
            closed: Notify::new(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn size(&self) -> u64 {
        self.backend.length()
    }

    /// Transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let caps = self.backend.node().caps();
        let mut f = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_DF
            | proto::TFLAG_SEND_CACHE;
        if self.config.writable {
            f |= proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES;
            if caps.fast_zero {
                f |= proto::TFLAG_SEND_FAST_ZERO;
            }
        } else {
            f |= proto::TFLAG_READ_ONLY;
        }
        if self.config.multi_conn {
            f |= proto::TFLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// The metadata context names this export offers.
    pub fn contexts(&self) -> Vec<String> {
        let mut v = vec!["base:allocation".to_string()];
        if self.config.allocation_depth {
            v.push("qemu:allocation-depth".into());
        }
        for b in &self.config.bitmaps {
            v.push(format!("qemu:dirty-bitmap:{b}"));
        }
        v
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }

    pub(crate) fn client_enter(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::SeqCst);
        ClientGuard(self.clone())
    }

    /// Stop serving: connections drop after their current request.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.closed.notify_waiters();
    }

    /// Resolves when `close` is called (register before checking `is_closing`).
    pub(crate) fn closed(&self) -> tokio::sync::futures::Notified<'_> {
        self.closed.notified()
    }

    /// Wait until no client uses the export.
    pub async fn wait_idle(&self) {
        block::sync::wait_for(&self.idle, || self.client_count() == 0).await
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        for bm in &self.bitmaps {
            bm.set_busy(false);
        }
    }
}

/// Counts a connection on an export while it lives.
#[derive(Debug)]
pub(crate) struct ClientGuard(Arc<Export>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if self.0.clients.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
