//! The request path: entry, checks, the walk down the filter chain, the leaf
//! call, and dirty-bitmap marking.
//!
//! A request enters its node (waiting there while quiesced), is checked
//! against the node's size, state (I5) and the leaf's alignment, then walks
//! down through filters iteratively: each level is counted in flight, checked
//! for activity, and given the chance to shift the offset (raw), delay or
//! fail the request (blkdebug). Writes mark the enabled bitmaps of every
//! level they passed, once the leaf has answered. Nothing here allocates
//! (a leaf outside the registry's `leaves` boxes its future).

use crate::buf::IoBuf;
use crate::driver::{Extent, WriteFlags, ZeroFlags};
use crate::drivers::Leaf;
use crate::error::{BlockError, Op, Result};
use crate::node::{Kind, Node, Written};

/// Deepest filter chain a request may walk.
const MAX_DEPTH: usize = 8;

/// The nodes a request passed and its offset at each; uncounts them on drop.
struct Path<'a> {
    levels: [Option<(&'a Node, u64)>; MAX_DEPTH],
    depth: usize,
    /// What each level's write hook claimed in `before_write`.
    claimed: [bool; MAX_DEPTH],
}

impl<'a> Path<'a> {
    async fn enter(node: &'a Node, offset: u64) -> Path<'a> {
        node.inflight.enter().await;
        Self::entered(node, offset)
    }

    /// Count a request that must not wait for quiescing (the graph's own
    /// flush while it holds the node quiesced).
    fn enter_quiesced(node: &'a Node, offset: u64) -> Path<'a> {
        node.inflight.pass();
        Self::entered(node, offset)
    }

    fn entered(node: &'a Node, offset: u64) -> Path<'a> {
        let mut levels = [None; MAX_DEPTH];
        levels[0] = Some((node, offset));
        Path { levels, depth: 1, claimed: [false; MAX_DEPTH] }
    }

    fn push(&mut self, node: &'a Node, offset: u64) -> Result<()> {
        if self.depth == MAX_DEPTH {
            return Err(BlockError::InvalidOption {
                option: "graph".into(),
                reason: format!("filter chain deeper than {MAX_DEPTH} at '{}'", node.name),
            });
        }
        node.inflight.pass();
        self.levels[self.depth] = Some((node, offset));
        self.depth += 1;
        Ok(())
    }

    fn mark_dirty(&self, len: u64) {
        for (node, offset) in self.levels.iter().take(self.depth).flatten() {
            node.mark_dirty(*offset, len);
        }
    }

    /// Run `before_write` of the levels that have a hook.
    async fn hooks_before(&mut self, len: u64) {
        for i in 0..self.depth {
            if let Some((node, offset)) = self.levels[i] {
                if let Some(h) = node.write_hook() {
                    self.claimed[i] = h.before_write(offset, len).await;
                }
            }
        }
    }

    /// Run `after_write` of the levels that have a hook (`what` None: the write failed).
    async fn hooks_after(&self, len: u64, what: Option<Written<'_>>) {
        for i in 0..self.depth {
            if let Some((node, offset)) = self.levels[i] {
                if let Some(h) = node.write_hook() {
                    h.after_write(offset, len, what, self.claimed[i]).await;
                }
            }
        }
    }
}

impl Drop for Path<'_> {
    fn drop(&mut self) {
        for (node, _) in self.levels.iter().take(self.depth).flatten() {
            node.inflight.exit();
        }
    }
}

fn is_modification(op: Op) -> bool {
    matches!(op, Op::Write | Op::WriteZeroes | Op::Discard | Op::Truncate)
}

impl Node {
    /// Bounds of a request against this node's length (overflow-safe).
    fn check_range(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        let size = self.length();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { node: self.name.clone(), op, offset, len, size }),
        }
    }

    fn check_state(&self, op: Op) -> Result<()> {
        if is_modification(op) {
            if !self.is_active() {
                return Err(BlockError::Inactive { node: self.name.clone(), op });
            }
            if self.read_only {
                return Err(BlockError::ReadOnly { node: self.name.clone(), op });
            }
        }
        Ok(())
    }

    /// Walk from `path`'s top to the leaf, running filters; returns the
    /// leaf, its driver and the request's offset there.
    async fn descend<'a>(
        &'a self,
        path: &mut Path<'a>,
        op: Op,
        offset: u64,
        len: u64,
    ) -> Result<(&'a Node, &'a Leaf, u64)> {
        let mut node: &'a Node = self;
        let mut off = offset;
        loop {
            node.check_state(op)?;
            match &node.kind {
                Kind::Filter(f, child) => {
                    if let Some(d) = f.delay(op, off, len) {
                        tokio::time::sleep(d).await;
                    }
                    f.check(&node.name, op, off, len)?;
                    off = f.map(off);
                    node = &child.node;
                    path.push(node, off)?;
                }
                Kind::Leaf(d) => {
                    let align = u64::from(d.alignment());
                    if align > 1 && (off % align != 0 || len % align != 0) {
                        return Err(BlockError::Misaligned {
                            node: node.name.clone(),
                            op,
                            offset: off,
                            len,
                            align: align as u32,
                        });
                    }
                    return Ok((node, d, off));
                }
            }
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let mut path = Path::enter(self, offset).await;
        self.check_range(Op::Read, offset, len)?;
        let (_, d, off) = self.descend(&mut path, Op::Read, offset, len).await?;
        d.read(off, buf).await
    }

    /// Write all of `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let mut path = Path::enter(self, offset).await;
        self.check_range(Op::Write, offset, len)?;
        let (_, d, off) = self.descend(&mut path, Op::Write, offset, len).await?;
        let native_fua = d.caps().fua;
        let leaf_flags = WriteFlags { fua: flags.fua && native_fua };
        path.hooks_before(len).await;
        let res = d.write(off, buf, leaf_flags).await;
        path.mark_dirty(len);
        let buf = match res {
            Ok(b) => b,
            Err(e) => {
                path.hooks_after(len, None).await;
                return Err(e);
            }
        };
        if flags.fua && !native_fua {
            if let Err(e) = d.flush().await {
                path.hooks_after(len, None).await;
                return Err(e);
            }
        }
        path.hooks_after(len, Some(Written::Data(&buf))).await;
        Ok(buf)
    }

    /// Make `[offset, offset+len)` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let mut path = Path::enter(self, offset).await;
        self.check_range(Op::WriteZeroes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (_, d, off) = self.descend(&mut path, Op::WriteZeroes, offset, len).await?;
        path.hooks_before(len).await;
        let res = d.write_zeroes(off, len, flags).await;
        // A fast-zero refusal changed nothing.
        if !matches!(res, Err(BlockError::Unsupported { .. })) {
            path.mark_dirty(len);
        }
        let what = res.is_ok().then_some(Written::Zeroes { may_unmap: flags.may_unmap });
        path.hooks_after(len, what).await;
        res
    }

    /// Tell the storage `[offset, offset+len)` is no longer needed.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut path = Path::enter(self, offset).await;
        self.check_range(Op::Discard, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (_, d, off) = self.descend(&mut path, Op::Discard, offset, len).await?;
        path.hooks_before(len).await;
        let res = d.discard(off, len).await;
        path.mark_dirty(len);
        path.hooks_after(len, res.is_ok().then_some(Written::Discard)).await;
        res
    }

    /// Flush this node and every node below it.
    pub async fn flush(&self) -> Result<()> {
        let mut path = Path::enter(self, 0).await;
        let (_, d, _) = self.descend(&mut path, Op::Flush, 0, 0).await?;
        d.flush().await
    }

    /// Flush while the caller holds this node quiesced (inactivation).
    pub(crate) async fn flush_quiesced(&self) -> Result<()> {
        let mut path = Path::enter_quiesced(self, 0);
        let (_, d, _) = self.descend(&mut path, Op::Flush, 0, 0).await?;
        d.flush().await
    }

    /// The allocation state of the extent at `offset` (at most `len` bytes).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let mut path = Path::enter(self, offset).await;
        self.check_range(Op::BlockStatus, offset, len)?;
        let (_, d, off) = self.descend(&mut path, Op::BlockStatus, offset, len).await?;
        let ext = d.block_status(off, len).await?;
        // A driver must make progress and stay inside the request.
        Ok(Extent { len: ext.len.clamp(1.min(len), len), ..ext })
    }

    /// Change the size (only nodes without filters in between).
    pub async fn truncate(&self, len: u64) -> Result<()> {
        let mut path = Path::enter(self, 0).await;
        let (leaf, d, _) = self.descend(&mut path, Op::Truncate, 0, 0).await?;
        if !std::ptr::eq(leaf, self) {
            return Err(BlockError::Unsupported { node: self.name.clone(), what: "resize through a filter" });
        }
        d.truncate(len).await
    }
}
