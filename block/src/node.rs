//! A node of the graph: a driver, at most one child (filters), a state
//! (active / inactive), its users and their permissions, and its dirty bitmaps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::bitmap::DirtyBitmap;
use crate::driver::{Caps, Filter};
use crate::drivers::blkdebug::Blkdebug;
use crate::drivers::file::FileDriver;
use crate::drivers::Leaf;
use crate::error::{BlockError, Result};
use crate::inflight::Inflight;
use crate::perm::{Perm, PermSet};
use crate::sync;

/// What a node does with requests: serve them from storage, or transform
/// them on their way to its one child.
pub(crate) enum Kind {
    Leaf(Leaf),
    Filter(Box<dyn Filter>, Child),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.driver_name())
    }
}

impl Kind {
    pub(crate) fn driver_name(&self) -> &'static str {
        match self {
            Kind::Leaf(d) => d.driver_name(),
            Kind::Filter(f, _) => f.driver_name(),
        }
    }
}

/// An edge to a child node; `role` is QEMU's child name ("file", "image").
#[derive(Debug)]
pub struct Child {
    pub role: &'static str,
    pub node: Arc<Node>,
}

/// Identifies one user of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserId(pub(crate) u64);

/// A user attached to a node: a guest device, an export, a job.
#[derive(Debug, Clone)]
pub struct User {
    pub id: UserId,
    /// The user's handle, so that a pivot can move it to another node.
    pub(crate) backend: std::sync::Weak<crate::backend::BackendInner>,
    /// Shown in errors: "export 'e0'", "guest disk", "job 'mirror0'".
    pub name: String,
    pub perms: PermSet,
    /// May the node be inactivated under this user? (QEMU: users with a
    /// device, read-only users and exports with `allow-inactive` may.)
    pub allow_inactive: bool,
}

impl User {
    /// Whether this user stops its node from being inactivated.
    pub fn blocks_inactivation(&self) -> bool {
        !self.allow_inactive && !self.perms.perm.without(Perm::CONSISTENT_READ).is_empty()
    }
}

/// What a completed modification did, as a write hook sees it.
#[derive(Debug, Clone, Copy)]
pub enum Written<'a> {
    Data(&'a [u8]),
    Zeroes { may_unmap: bool },
    Discard,
}

/// Brackets every modification through a node (a mirror's write-blocking
/// mode): `before_write` runs before the request reaches the driver (the
/// mirror claims the range, so overlapping writes reach its target in the
/// order they reached the source) and says whether it took anything;
/// `after_write` runs once the driver answered, before the request is
/// answered, with `what` = None if the modification failed. The hook handles
/// its own errors: the request's result is the node's.
pub trait WriteHook: Send + Sync + std::fmt::Debug {
    fn before_write(&self, offset: u64, len: u64) -> crate::driver::BoxFuture<'_, bool>;
    fn after_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        what: Option<Written<'a>>,
        claimed: bool,
    ) -> crate::driver::BoxFuture<'a, ()>;
}

/// A node of the block graph.
#[derive(Debug)]
pub struct Node {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) read_only: bool,
    /// Created implicitly as a nested child in `blockdev-add` (deleted with its parent).
    pub(crate) implicit: bool,
    /// Writes, zeroes, discards and resizes fail with EPERM unless set (I5).
    /// Changes only while the node and its ancestors are quiesced and drained.
    pub(crate) active: AtomicBool,
    pub(crate) inflight: Inflight,
    /// Enabled bitmaps are marked by every write, zero and discard through the node.
    pub(crate) bitmaps: RwLock<Vec<Arc<DirtyBitmap>>>,
    /// Users attached directly (not parent nodes).
    pub(crate) users: Mutex<Vec<User>>,
    /// The permissions last applied to this node (cumulative over users and parents).
    pub(crate) applied: Mutex<PermSet>,
    /// Bitmaps of jobs (a mirror's own): marked like the others, never listed.
    pub(crate) internal_bitmaps: RwLock<Vec<Arc<DirtyBitmap>>>,
    pub(crate) write_hook: RwLock<Option<Arc<dyn WriteHook>>>,
    /// True iff `write_hook` is set; lets writes skip the lock.
    pub(crate) has_hook: AtomicBool,
    /// Set while a job holds this node's users quiesced: no new user may attach.
    pub(crate) users_frozen: AtomicBool,
}

/// A snapshot of a node for query commands.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_name: String,
    pub driver: &'static str,
    pub filename: Option<String>,
    pub read_only: bool,
    pub active: bool,
    pub length: u64,
    pub child: Option<(String, String)>,
    pub perms: PermSet,
    pub users: Vec<String>,
    pub implicit: bool,
}

impl Node {
    pub(crate) fn new(name: String, kind: Kind, read_only: bool, active: bool, implicit: bool) -> Self {
        Self {
            name,
            kind,
            read_only,
            implicit,
            active: AtomicBool::new(active),
            inflight: Inflight::default(),
            bitmaps: RwLock::new(Vec::new()),
            users: Mutex::new(Vec::new()),
            applied: Mutex::new(PermSet::new(Perm::NONE, Perm::ALL)),
            internal_bitmaps: RwLock::new(Vec::new()),
            write_hook: RwLock::new(None),
            has_hook: AtomicBool::new(false),
            users_frozen: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver_name(&self) -> &'static str {
        self.kind.driver_name()
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn child(&self) -> Option<&Arc<Node>> {
        self.child_edge().map(|c| &c.node)
    }

    /// The edge to the child, with its role.
    pub(crate) fn child_edge(&self) -> Option<&Child> {
        match &self.kind {
            Kind::Filter(_, c) => Some(c),
            Kind::Leaf(_) => None,
        }
    }

    /// The file driver, if this is a `file` node.
    pub fn file(&self) -> Option<&FileDriver> {
        match &self.kind {
            Kind::Leaf(d) => d.as_any().downcast_ref(),
            Kind::Filter(..) => None,
        }
    }

    /// The blkdebug filter, if this is a `blkdebug` node.
    pub fn blkdebug(&self) -> Option<&Blkdebug> {
        match &self.kind {
            Kind::Filter(f, _) => f.as_any().downcast_ref(),
            Kind::Leaf(_) => None,
        }
    }

    /// The leaf at the bottom of the filter chain, and its driver.
    pub(crate) fn leaf_driver(&self) -> (&Node, &Leaf) {
        let mut n = self;
        loop {
            match &n.kind {
                Kind::Leaf(d) => return (n, d),
                Kind::Filter(_, c) => n = &c.node,
            }
        }
    }

    /// The leaf at the bottom of the filter chain.
    pub fn leaf(&self) -> &Node {
        self.leaf_driver().0
    }

    /// Current length in bytes.
    pub fn length(&self) -> u64 {
        match &self.kind {
            Kind::Leaf(d) => d.length(),
            Kind::Filter(f, c) => f.length(c.node.length()),
        }
    }

    /// Capabilities of the leaf under this node.
    pub fn caps(&self) -> Caps {
        self.leaf_driver().1.caps()
    }

    /// Required request alignment of the leaf.
    pub fn alignment(&self) -> u32 {
        self.leaf_driver().1.alignment()
    }

    /// The driver's activation hook: a leaf re-reads what it caches (its
    /// size), a filter may refuse (blkdebug's `activate` rules).
    pub(crate) fn driver_activate(&self) -> Result<()> {
        match &self.kind {
            Kind::Leaf(d) => d.refresh(),
            Kind::Filter(f, _) => f.activate(&self.name),
        }
    }

    /// The driver's inactivation hook (the node is quiesced and flushed).
    pub(crate) fn driver_inactivate(&self) -> Result<()> {
        match &self.kind {
            Kind::Leaf(_) => Ok(()),
            Kind::Filter(f, _) => f.inactivate(&self.name),
        }
    }

    /// Requests currently in flight on this node.
    pub fn in_flight(&self) -> usize {
        self.inflight.in_flight()
    }

    /// The users attached directly to this node.
    pub fn users(&self) -> Vec<User> {
        sync::lock(&self.users).clone()
    }

    /// The permissions currently applied (cumulative over users and parents).
    pub fn applied_perms(&self) -> PermSet {
        *sync::lock(&self.applied)
    }

    /// A bitmap by name.
    pub fn bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        sync::read(&self.bitmaps)
            .iter()
            .find(|b| b.name() == name)
            .cloned()
            .ok_or_else(|| BlockError::BitmapNotFound { node: self.name.clone(), bitmap: name.to_string() })
    }

    /// Every bitmap of this node.
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        sync::read(&self.bitmaps).clone()
    }

    /// Mark the enabled bitmaps for a modification of `[offset, offset+len)`.
    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) {
        for list in [&self.bitmaps, &self.internal_bitmaps] {
            for bm in sync::read(list).iter() {
                bm.mark(offset, len);
            }
        }
    }

    /// Add a job's own bitmap: marked by every modification, not listed by queries.
    pub fn add_internal_bitmap(&self, bm: Arc<DirtyBitmap>) {
        sync::write(&self.internal_bitmaps).push(bm);
    }

    /// Whether a job's own bitmap is attached (the node is in a job).
    pub fn has_internal_bitmaps(&self) -> bool {
        !sync::read(&self.internal_bitmaps).is_empty()
    }

    pub fn remove_internal_bitmap(&self, bm: &Arc<DirtyBitmap>) {
        sync::write(&self.internal_bitmaps).retain(|b| !Arc::ptr_eq(b, bm));
    }

    /// Install or remove the write hook.
    pub fn set_write_hook(&self, hook: Option<Arc<dyn WriteHook>>) {
        let mut h = sync::write(&self.write_hook);
        self.has_hook.store(hook.is_some(), Ordering::SeqCst);
        *h = hook;
    }

    pub(crate) fn write_hook(&self) -> Option<Arc<dyn WriteHook>> {
        if !self.has_hook.load(Ordering::SeqCst) {
            return None;
        }
        sync::read(&self.write_hook).clone()
    }

    /// The remote export under this node's chain of filters, if its leaf is
    /// a network client (`nbd`): what a migration matches destination disks by.
    pub fn remote_export(&self) -> Option<String> {
        self.leaf_driver().1.remote_export()
    }

    /// Abort the network connection under this node's chain of filters at
    /// once (QMP `yank`): its requests in flight and later ones fail without
    /// waiting for the remote side. Does nothing for local storage.
    pub fn yank(&self) {
        self.leaf_driver().1.yank();
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            node_name: self.name.clone(),
            driver: self.driver_name(),
            filename: self.leaf().file().map(|f| f.filename().to_string()),
            read_only: self.read_only,
            active: self.is_active(),
            length: self.length(),
            child: self.child_edge().map(|c| (c.role.to_string(), c.node.name.clone())),
            perms: self.applied_perms(),
            users: self.users().into_iter().map(|u| u.name).collect(),
            implicit: self.implicit,
        }
    }
}
