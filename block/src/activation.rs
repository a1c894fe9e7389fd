//! Per-node activation (QEMU's `blockdev-set-active`, `bdrv_activate`,
//! `bdrv_inactivate_all`), with DESIGN.md's invariants I3–I5.
//!
//! ```text
//!              activate: children first; run the driver's `activate`
//!              hook (a leaf re-reads its size), take the image lock,
//!              then admit writes
//!   ┌────────┐ ─────────────────────────────────────────────> ┌──────────┐
//!   │inactive│                                                │  active  │
//!   └────────┘ <───────────────────────────────────────────── └──────────┘
//!              inactivate (all or nothing, for a whole set):
//!              1 quiesce the set and its ancestors, drain
//!              2 flush every node, parents first
//!              3 flip every node (the driver's `inactivate` hook),
//!                then drop locks
//!              any failure: flip back what was flipped, release the
//!              held requests, return the error naming the node
//! ```
//!
//! Parent/child rules (QEMU 10): a node with an active parent cannot be
//! inactivated; inactivating a node also inactivates the children no other
//! active parent uses; activating a node activates its children first.
//! Activate and inactivate of a node already in that state are no-ops.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{BlockError, Result};
use crate::graph::{Graph, GraphState};
use crate::node::Node;
use crate::sync;

/// Holds a set of nodes quiesced; releases them (and their held requests) on drop.
struct Quiesced(Vec<Arc<Node>>);

impl Quiesced {
    fn begin(nodes: Vec<Arc<Node>>) -> Self {
        for n in &nodes {
            n.inflight.begin_quiesce();
        }
        Quiesced(nodes)
    }

    async fn drain(&self) {
        for n in &self.0 {
            n.inflight.wait_drained().await;
        }
    }
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        for n in &self.0 {
            n.inflight.end_quiesce();
        }
    }
}

/// `set` plus every ancestor of a node in it.
fn with_ancestors(st: &GraphState, set: &[Arc<Node>]) -> Vec<Arc<Node>> {
    let mut out: Vec<Arc<Node>> = Vec::new();
    let mut todo: Vec<Arc<Node>> = set.to_vec();
    while let Some(n) = todo.pop() {
        if out.iter().any(|o| Arc::ptr_eq(o, &n)) {
            continue;
        }
        todo.extend(st.parents(&n));
        out.push(n);
    }
    out
}

impl Graph {
    /// Activate one node, children first. No-op if already active.
    pub async fn activate(&self, name: &str) -> Result<()> {
        let _ctl = self.control.lock().await;
        let node = self.find(name)?;
        self.activate_locked(&node).await
    }

    /// Activate every node, children first. Stops at the first failure,
    /// naming the node; nodes activated before it stay active.
    pub async fn activate_all(&self) -> Result<()> {
        let _ctl = self.control.lock().await;
        let mut order = self.lock_state().parents_first();
        order.reverse();
        for n in order {
            self.activate_locked(&n).await?;
        }
        Ok(())
    }

    /// Activation with the control lock held.
    pub(crate) async fn activate_locked(&self, node: &Arc<Node>) -> Result<()> {
        // The chain from `node` down to its leaf, activated leaf first.
        let mut chain = vec![node.clone()];
        while let Some(c) = chain.last().and_then(|n| n.child().cloned()) {
            chain.push(c);
        }
        for n in chain.iter().rev() {
            if n.is_active() {
                continue;
            }
            self.activate_one(n).map_err(|e| BlockError::Activate { node: n.name.clone(), source: Box::new(e) })?;
        }
        Ok(())
    }

    fn activate_one(&self, node: &Arc<Node>) -> Result<()> {
        fail::fail_point!("block::activate", |_| Err(BlockError::Injected {
            node: node.name.clone(),
            event: "activate",
            errno: 5
        }));
        let old_len = node.length();
        node.driver_activate()?;
        let new_len = node.length();
        if new_len != old_len {
            // Another host may have resized the image: bitmaps follow, and a
            // grown tail is dirty (nothing is known about what it holds).
            for bm in node.bitmaps().iter().chain(sync::read(&node.internal_bitmaps).clone().iter()) {
                bm.resize(new_len);
                if new_len > old_len {
                    bm.mark_force(old_len, new_len - old_len);
                }
            }
        }
        let st = self.lock_state();
        // Take the locks as if active first; only then admit writes.
        self.refresh_perms_as(&st, &|n: &Node| n.is_active() || std::ptr::eq(n, node.as_ref()))?;
        node.active.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Inactivate one node and the children that no other active parent uses.
    /// Fails if a parent node is active. No-op if already inactive.
    pub async fn inactivate(&self, name: &str) -> Result<()> {
        let _ctl = self.control.lock().await;
        let set = {
            let st = self.lock_state();
            let node = st.find(name)?;
            if !node.is_active() {
                return Ok(());
            }
            if let Some(p) = st.parents(&node).into_iter().find(|p| p.is_active()) {
                return Err(BlockError::HasActiveParent { node: node.name.clone(), parent: p.name.clone() });
            }
            let mut set = vec![node.clone()];
            let mut cur = node;
            while let Some(c) = cur.child().cloned() {
                let others_active =
                    st.parents(&c).iter().any(|p| p.is_active() && !set.iter().any(|s| Arc::ptr_eq(s, p)));
                if others_active || !c.is_active() {
                    break;
                }
                set.push(c.clone());
                cur = c;
            }
            set
        };
        self.inactivate_set(set).await
    }

    /// Inactivate every active node, all or nothing (I3).
    pub async fn inactivate_all(&self) -> Result<()> {
        let _ctl = self.control.lock().await;
        let set: Vec<Arc<Node>> = self.lock_state().parents_first().into_iter().filter(|n| n.is_active()).collect();
        self.inactivate_set(set).await
    }

    /// QMP `blockdev-set-active`: one node, or every node when `name` is None.
    pub async fn set_active(&self, name: Option<&str>, active: bool) -> Result<()> {
        match (name, active) {
            (Some(n), true) => self.activate(n).await,
            (Some(n), false) => self.inactivate(n).await,
            (None, true) => self.activate_all().await,
            (None, false) => self.inactivate_all().await,
        }
    }

    /// Steps 1–3 of the module diagram for `set` (parents before children).
    async fn inactivate_set(&self, set: Vec<Arc<Node>>) -> Result<()> {
        if set.is_empty() {
            return Ok(());
        }
        // 0. Refuse before touching anything: users that forbid inactivation.
        let quiesce = {
            let st = self.lock_state();
            for n in &set {
                if let Some(u) = n.users().into_iter().find(|u| u.blocks_inactivation()) {
                    return Err(BlockError::InactivationRefused { node: n.name.clone(), user: u.name });
                }
            }
            with_ancestors(&st, &set)
        };
        // 1. Quiesce the set and its ancestors; wait for requests in flight.
        let quiesced = Quiesced::begin(quiesce);
        quiesced.drain().await;
        fail::fail_point!("block::inactivate-all::after-drain", |_| Err(BlockError::Injected {
            node: set[0].name.clone(),
            event: "inactivate",
            errno: 5
        }));
        // 2. Flush every node, parents first, so their data is in the children
        // before those flush: by levels (a node's level is past each of its
        // parents'), each level's nodes at once, so independent disks (a
        // guest's image, a mirror's remote target) flush side by side.
        let levels = {
            let st = self.lock_state();
            let mut level: Vec<usize> = Vec::with_capacity(set.len());
            for (i, n) in set.iter().enumerate() {
                let parents = st.parents(n);
                let l = set[..i]
                    .iter()
                    .zip(&level)
                    .filter(|(p, _)| parents.iter().any(|q| Arc::ptr_eq(p, q)))
                    .map(|(_, l)| l + 1)
                    .max()
                    .unwrap_or(0);
                level.push(l);
            }
            level
        };
        for l in 0..=levels.iter().copied().max().unwrap_or(0) {
            let these: Vec<&Arc<Node>> = set.iter().zip(&levels).filter(|(_, x)| **x == l).map(|(n, _)| n).collect();
            let flushed = crate::sync::join_all(these.iter().map(|n| n.flush_quiesced()).collect()).await;
            if let Some((n, Err(e))) = these.iter().zip(flushed).find(|(_, r)| r.is_err()) {
                return Err(BlockError::InactivateFlush { node: n.name.clone(), source: Box::new(e) });
            }
        }
        fail::fail_point!("block::inactivate-all::after-flush", |_| Err(BlockError::Injected {
            node: set[0].name.clone(),
            event: "inactivate",
            errno: 5
        }));
        // 3. Flip every node; on failure flip back what was flipped. Locks are
        // dropped only once every node is flipped, so a rollback never needs
        // to re-take one.
        let mut flipped: Vec<&Arc<Node>> = Vec::with_capacity(set.len());
        for n in &set {
            if let Err(e) = n.driver_inactivate() {
                for f in flipped.iter().rev() {
                    f.active.store(true, Ordering::SeqCst);
                }
                return Err(BlockError::InactivateFlip { node: n.name.clone(), source: Box::new(e) });
            }
            n.active.store(false, Ordering::SeqCst);
            flipped.push(n);
        }
        {
            let st = self.lock_state();
            if let Err(e) = self.refresh_perms(&st) {
                // Only releases happen here; report but keep the nodes inactive.
                tracing::warn!(error = %e, "dropping image locks after inactivation failed");
            }
        }
        drop(quiesced);
        Ok(())
    }
}
