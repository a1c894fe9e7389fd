//! A user's handle on a node (QEMU's BlockBackend): what guest devices,
//! exports and jobs do I/O through. It holds the user's permissions on the
//! node, detaches them when dropped, and can be moved to another node (a
//! mirror's pivot) while its requests are held at its own entry.

use std::sync::{Arc, RwLock, Weak};

use crate::buf::IoBuf;
use crate::driver::{Extent, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Op, Result};
use crate::graph::Graph;
use crate::inflight::Inflight;
use crate::node::{Node, UserId};
use crate::perm::{Perm, PermSet};
use crate::sync;

#[derive(Debug)]
pub(crate) struct BackendInner {
    graph: Arc<Graph>,
    /// The node requests go to; replaced only while `io` is quiesced and drained.
    node: RwLock<Arc<Node>>,
    pub(crate) id: UserId,
    name: String,
    perms: RwLock<PermSet>,
    /// Requests counted at the backend, so a pivot can hold and drain them.
    pub(crate) io: Inflight,
}

impl BackendInner {
    pub(crate) fn node(&self) -> Arc<Node> {
        sync::read(&self.node).clone()
    }

    pub(crate) fn set_node(&self, node: Arc<Node>) {
        *sync::write(&self.node) = node;
    }
}

/// A user's handle; dropping it detaches the user.
#[derive(Debug)]
pub struct BlockBackend {
    inner: Arc<BackendInner>,
}

/// Uncounts a request at the backend when it completes.
struct Entered<'a>(&'a Inflight);
impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.exit();
    }
}

impl BlockBackend {
    pub(crate) fn new(graph: Arc<Graph>, node: Arc<Node>, id: UserId, name: String, perms: PermSet) -> Self {
        Self {
            inner: Arc::new(BackendInner {
                graph,
                node: RwLock::new(node),
                id,
                name,
                perms: RwLock::new(perms),
                io: Inflight::default(),
            }),
        }
    }

    pub(crate) fn weak(&self) -> Weak<BackendInner> {
        Arc::downgrade(&self.inner)
    }

    /// The node requests go to now.
    pub fn node(&self) -> Arc<Node> {
        self.inner.node()
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn id(&self) -> UserId {
        self.inner.id
    }

    pub fn graph(&self) -> &Arc<Graph> {
        &self.inner.graph
    }

    pub fn perms(&self) -> PermSet {
        *sync::read(&self.inner.perms)
    }

    /// Change this user's permissions (checked against every other user).
    pub fn set_perms(&self, perms: PermSet, allow_inactive: bool) -> Result<()> {
        let node = self.node();
        self.inner.graph.set_user_perms(&node, self.inner.id, perms, allow_inactive)?;
        *sync::write(&self.inner.perms) = perms;
        Ok(())
    }

    fn check_write(&self, node: &Node, op: Op) -> Result<()> {
        if self.perms().perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) {
            Ok(())
        } else {
            Err(BlockError::ReadOnly { node: node.name().to_string(), op })
        }
    }

    async fn enter(&self) -> (Entered<'_>, Arc<Node>) {
        self.inner.io.enter().await;
        (Entered(&self.inner.io), self.node())
    }

    pub fn length(&self) -> u64 {
        self.node().length()
    }

    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let (_e, node) = self.enter().await;
        node.read(offset, buf).await
    }

    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let (_e, node) = self.enter().await;
        self.check_write(&node, Op::Write)?;
        node.write(offset, buf, flags).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let (_e, node) = self.enter().await;
        self.check_write(&node, Op::WriteZeroes)?;
        node.write_zeroes(offset, len, flags).await
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let (_e, node) = self.enter().await;
        self.check_write(&node, Op::Discard)?;
        node.discard(offset, len).await
    }

    pub async fn flush(&self) -> Result<()> {
        let (_e, node) = self.enter().await;
        node.flush().await
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let (_e, node) = self.enter().await;
        node.block_status(offset, len).await
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        let node = self.node();
        self.inner.graph.detach(&node, self.inner.id);
    }
}
