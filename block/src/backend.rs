//! A user's handle on a node (QEMU's BlockBackend): what guest devices,
//! exports and jobs do I/O through. It holds the user's permissions on the
//! node and detaches them when dropped.

use std::sync::{Arc, RwLock};

use crate::buf::IoBuf;
use crate::driver::{Extent, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Op, Result};
use crate::graph::Graph;
use crate::node::{Node, UserId};
use crate::perm::{Perm, PermSet};

#[derive(Debug)]
pub struct BlockBackend {
    graph: Arc<Graph>,
    /// The node this user works on; replaceable so a job can pivot every user to a new node.
    node: RwLock<Arc<Node>>,
    id: UserId,
    name: String,
    perms: RwLock<PermSet>,
}

impl BlockBackend {
    pub(crate) fn new(graph: Arc<Graph>, node: Arc<Node>, id: UserId, name: String, perms: PermSet) -> Self {
        Self { graph, node: RwLock::new(node), id, name, perms: RwLock::new(perms) }
    }

    /// The node requests go to now.
    pub fn node(&self) -> Arc<Node> {
        match self.node.read() {
            Ok(n) => n.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn graph(&self) -> &Arc<Graph> {
        &self.graph
    }

    pub fn perms(&self) -> PermSet {
        self.perms.read().map(|p| *p).unwrap_or(PermSet::new(Perm::NONE, Perm::ALL))
    }

    /// Change this user's permissions (checked against every other user).
    pub fn set_perms(&self, perms: PermSet, allow_inactive: bool) -> Result<()> {
        let node = self.node();
        self.graph.set_user_perms(&node, self.id, perms, allow_inactive)?;
        if let Ok(mut p) = self.perms.write() {
            *p = perms;
        }
        Ok(())
    }

    fn check_write(&self, node: &Node, op: Op) -> Result<()> {
        if self.perms().perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) {
            Ok(())
        } else {
            Err(BlockError::ReadOnly { node: node.name().to_string(), op })
        }
    }

    pub fn length(&self) -> u64 {
        self.node().length()
    }

    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let node = self.node();
        node.read(offset, buf).await
    }

    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let node = self.node();
        self.check_write(&node, Op::Write)?;
        node.write(offset, buf, flags).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let node = self.node();
        self.check_write(&node, Op::WriteZeroes)?;
        node.write_zeroes(offset, len, flags).await
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let node = self.node();
        self.check_write(&node, Op::Discard)?;
        node.discard(offset, len).await
    }

    pub async fn flush(&self) -> Result<()> {
        let node = self.node();
        node.flush().await
    }

    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let node = self.node();
        node.block_status(offset, len).await
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        let node = self.node();
        self.graph.detach(&node, self.id);
    }
}
