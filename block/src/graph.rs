//! The graph: nodes by `node-name`, their parent/child edges, users and
//! permissions, and the control-plane operations on them.
//!
//! Control-plane operations are serialised by one async mutex (`control`);
//! the graph's own state sits behind a plain mutex that is never held across
//! an `.await`. The I/O path touches neither.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde_json::{Map, Value};

use crate::backend::BlockBackend;
use crate::bitmap::DirtyBitmap;
use crate::driver::{BlockDriver, OpenCtx, Opened};
use crate::error::{BlockError, Result};
use crate::node::{Child, Kind, Node, User, UserId};
use crate::options::{BlockdevDiscardOptions, BlockdevOptionsBase};
use crate::perm::{Perm, PermSet};
use crate::schema::{self, Field, QapiObject, SchemaError};
use crate::sync;

#[derive(Debug, Default)]
pub(crate) struct GraphState {
    /// Every node, children before the parents that were added over them.
    pub(crate) nodes: Vec<Arc<Node>>,
    next_user: u64,
    next_implicit: u64,
}

impl GraphState {
    pub(crate) fn find(&self, name: &str) -> Result<Arc<Node>> {
        self.nodes.iter().find(|n| n.name == name).cloned().ok_or_else(|| BlockError::NodeNotFound(name.to_string()))
    }

    /// Parent nodes of `node`.
    pub(crate) fn parents(&self, node: &Node) -> Vec<Arc<Node>> {
        self.nodes.iter().filter(|p| p.child().is_some_and(|c| std::ptr::eq(c.as_ref(), node))).cloned().collect()
    }

    /// Nodes ordered so that every parent comes before its children.
    pub(crate) fn parents_first(&self) -> Vec<Arc<Node>> {
        let mut out: Vec<Arc<Node>> = Vec::with_capacity(self.nodes.len());
        let mut placed = vec![false; self.nodes.len()];
        // Repeatedly place nodes all of whose parents are placed (the graph is a DAG).
        while out.len() < self.nodes.len() {
            let before = out.len();
            for (i, n) in self.nodes.iter().enumerate() {
                if placed[i] {
                    continue;
                }
                let ready = self.parents(n).iter().all(|p| out.iter().any(|o| Arc::ptr_eq(o, p)));
                if ready {
                    placed[i] = true;
                    out.push(n.clone());
                }
            }
            if out.len() == before {
                break; // cannot happen for a DAG; never loop forever
            }
        }
        out
    }
}

/// Who is in the graph, and how they may use it.
pub struct Graph {
    pub(crate) state: Mutex<GraphState>,
    /// Serialises control-plane operations that await (activation, drain).
    pub(crate) control: tokio::sync::Mutex<()>,
    /// The registry: every driver `blockdev-add` can open.
    drivers: RwLock<Vec<Arc<dyn BlockDriver>>>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").field("state", &self.state).finish_non_exhaustive()
    }
}

/// Node names: QEMU's rules (a letter first, then letters, digits, '-', '.', '_'; under 32 bytes).
pub fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() < 32
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

impl Graph {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(GraphState::default()),
            control: tokio::sync::Mutex::new(()),
            drivers: RwLock::new(crate::drivers::builtin()),
        }
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, GraphState> {
        // A panic while holding the lock cannot leave the node list half-edited
        // (every edit is a single push/remove): the lock is taken over.
        sync::lock(&self.state)
    }

    /// Add a driver to the registry (replacing one of the same name).
    pub fn register(&self, driver: Arc<dyn BlockDriver>) {
        let mut drivers = sync::write(&self.drivers);
        drivers.retain(|d| d.name() != driver.name());
        drivers.push(driver);
    }

    /// The driver `blockdev-add` opens for `name` (a name or an alias).
    pub fn driver(&self, name: &str) -> Option<Arc<dyn BlockDriver>> {
        sync::read(&self.drivers).iter().find(|d| d.name() == name || d.aliases().contains(&name)).cloned()
    }

    /// Names of every driver `blockdev-add` accepts (aliases aside), sorted.
    pub fn driver_names(&self) -> Vec<String> {
        let mut v: Vec<String> = sync::read(&self.drivers).iter().map(|d| d.name().to_string()).collect();
        v.sort();
        v
    }

    /// Keyval's coercion for `--blockdev`: turn the strings of a command-line
    /// definition into the types the schema asks for, for the common members
    /// and the named driver's own, recursing into an inline child definition
    /// (`file.driver=file,file.filename=...`). Members no schema knows are
    /// left alone for `blockdev-add` to judge; so are the members of a driver
    /// without a schema.
    pub fn coerce_keyval(&self, options: Value) -> Result<Value> {
        Ok(self.coerce_keyval_at(options, "")?)
    }

    fn coerce_keyval_at(&self, options: Value, path: &str) -> std::result::Result<Value, SchemaError> {
        let Value::Object(m) = options else { return Ok(options) };
        let driver = m.get("driver").and_then(Value::as_str).and_then(|d| self.driver(d));
        let mut m = schema::coerce_members(&BlockdevOptionsBase::fields(), m, path)?;
        if let Some(driver) = driver {
            let fields: Vec<Field> = driver.options().unwrap_or_default();
            m = schema::coerce_members(&fields, m, path)?;
            if let Some(key) = driver.child_member() {
                if let Some(child) = m.get_mut(key).filter(|c| c.is_object()) {
                    let at = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
                    *child = self.coerce_keyval_at(child.take(), &at)?;
                }
            }
        }
        Ok(Value::Object(m))
    }

    pub fn find(&self, name: &str) -> Result<Arc<Node>> {
        self.lock_state().find(name)
    }

    /// Every node, in the order they were added.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock_state().nodes.clone()
    }

    /// Parent nodes of `node`.
    pub fn parents(&self, node: &Node) -> Vec<Arc<Node>> {
        self.lock_state().parents(node)
    }

    /// `blockdev-add`: open a node (and any nested children) from QEMU-style options.
    pub async fn blockdev_add(&self, options: &Value) -> Result<Arc<Node>> {
        let _ctl = self.control.lock().await;
        let mut created = Vec::new();
        let Value::Object(options) = options else {
            return Err(BlockError::InvalidOption {
                option: "options".into(),
                reason: "expected a JSON object".into(),
            });
        };
        let res = self.add_locked(options.clone(), false, &mut created).await;
        if res.is_err() {
            // Undo nested children created before the failure.
            let mut st = self.lock_state();
            for n in created.iter().rev() {
                release_node(n);
                st.nodes.retain(|x| !Arc::ptr_eq(x, n));
            }
        }
        res
    }

    fn add_locked<'a>(
        &'a self,
        options: Map<String, Value>,
        implicit: bool,
        created: &'a mut Vec<Arc<Node>>,
    ) -> Pin<Box<dyn Future<Output = Result<Arc<Node>>> + Send + 'a>> {
        Box::pin(async move {
            let (base, mut rest) = BlockdevOptionsBase::split(options)?;
            let name = match base.node_name {
                Some(n) => {
                    if !valid_node_name(&n) {
                        return Err(BlockError::InvalidNodeName(n));
                    }
                    n
                }
                None => {
                    let mut st = self.lock_state();
                    st.next_implicit += 1;
                    format!("#block{:03}", st.next_implicit)
                }
            };
            if self.lock_state().find(&name).is_ok() {
                return Err(BlockError::DuplicateNode(name));
            }
            let driver = self.driver(&base.driver).ok_or_else(|| BlockError::UnknownDriver(base.driver.clone()))?;
            let read_only = base.read_only.unwrap_or(false);
            let active = base.active.unwrap_or(true);

            // A filter's child: a node-name or an inline definition.
            let child = match driver.child_member() {
                Some(key) => {
                    let node = self.child_locked(key, rest.remove(key), read_only, created).await?;
                    if !read_only && node.read_only {
                        return Err(BlockError::InvalidOption {
                            option: "read-only".into(),
                            reason: format!("child '{}' is read-only; open '{name}' with read-only=on", node.name),
                        });
                    }
                    Some(Child { role: key, node })
                }
                None => None,
            };
            let ctx = OpenCtx {
                node_name: &name,
                read_only,
                direct: base.cache.as_ref().and_then(|c| c.direct).unwrap_or(false),
                discard_unmap: base.discard == Some(BlockdevDiscardOptions::Unmap),
                child: child.as_ref().map(|c| &c.node),
            };
            let kind = match (driver.open(ctx, rest).await?, child) {
                (Opened::Leaf(d), None) => Kind::Leaf(d),
                (Opened::Filter(f), Some(c)) => Kind::Filter(f, c),
                (_, child) => {
                    return Err(BlockError::InvalidOption {
                        option: "driver".into(),
                        reason: format!(
                            "driver '{}' opened a {} though it {}",
                            driver.name(),
                            if child.is_some() { "leaf" } else { "filter" },
                            if child.is_some() { "declares a child" } else { "declares no child" },
                        ),
                    })
                }
            };
            let node = Arc::new(Node::new(name, kind, read_only, active, implicit));

            // An active parent needs an active child (QEMU refuses the same).
            if active {
                if let Some(c) = node.child_edge() {
                    if !c.node.is_active() {
                        return Err(BlockError::InvalidOption {
                            option: "active".into(),
                            reason: format!(
                                "inactive '{}' can't be a {} child of active '{}'",
                                c.node.name, c.role, node.name
                            ),
                        });
                    }
                }
            }
            {
                let mut st = self.lock_state();
                let added = self.change_users(
                    &mut st,
                    |st| st.nodes.push(node.clone()),
                    |st, ()| {
                        st.nodes.pop();
                    },
                );
                if let Err(e) = added {
                    release_node(&node);
                    return Err(e);
                }
            }
            created.push(node.clone());
            Ok(node)
        })
    }

    /// A filter's child member `key`: an existing node by name, or a node
    /// defined inline (it inherits `read-only`, as in QEMU).
    async fn child_locked(
        &self,
        key: &str,
        value: Option<Value>,
        read_only: bool,
        created: &mut Vec<Arc<Node>>,
    ) -> Result<Arc<Node>> {
        match value {
            None => Err(SchemaError(format!("Parameter '{key}' is missing")).into()),
            Some(Value::String(r)) => self.lock_state().find(&r),
            Some(Value::Object(mut nested)) => {
                if read_only && !nested.contains_key("read-only") {
                    nested.insert("read-only".into(), Value::Bool(true));
                }
                self.add_locked(nested, true, created).await
            }
            Some(_) => Err(BlockError::InvalidOption {
                option: key.into(),
                reason: "expected a node name or an object".into(),
            }),
        }
    }

    /// `blockdev-del`: remove a node nobody uses, with its implicit children.
    pub async fn blockdev_del(&self, name: &str) -> Result<()> {
        let _ctl = self.control.lock().await;
        let mut st = self.lock_state();
        let node = st.find(name)?;
        if node.implicit {
            return Err(BlockError::InvalidOption {
                option: "node-name".into(),
                reason: format!("node '{name}' was created implicitly and is deleted with its parent"),
            });
        }
        let parents = st.parents(&node);
        let users = node.users();
        if !parents.is_empty() || !users.is_empty() {
            let mut who: Vec<String> = parents.iter().map(|p| format!("node '{}'", p.name)).collect();
            who.extend(users.into_iter().map(|u| u.name));
            return Err(BlockError::InUse { node: name.to_string(), users: who.join(", ") });
        }
        let mut n = Some(node);
        while let Some(cur) = n.take() {
            st.nodes.retain(|x| !Arc::ptr_eq(x, &cur));
            release_node(&cur);
            if let Some(c) = cur.child() {
                if c.implicit && st.parents(c).is_empty() && c.users().is_empty() {
                    n = Some(c.clone());
                }
            }
        }
        self.refresh_perms(&st)
    }

    /// Attach a user (guest device, export, job) to a node, checking its
    /// permissions against every other user, here and in other processes.
    pub fn attach(
        self: &Arc<Self>,
        node_name: &str,
        user_name: &str,
        perms: PermSet,
        allow_inactive: bool,
    ) -> Result<BlockBackend> {
        let mut st = self.lock_state();
        let node = st.find(node_name)?;
        if node.read_only && perms.perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE) {
            return Err(BlockError::ReadOnly { node: node_name.to_string(), op: crate::error::Op::Write });
        }
        if node.users_frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BlockError::InUse {
                node: node_name.to_string(),
                users: "a job switching its users to another node".into(),
            });
        }
        st.next_user += 1;
        let id = UserId(st.next_user);
        let backend = BlockBackend::new(self.clone(), node.clone(), id, user_name.to_string(), perms);
        let user = User { id, backend: backend.weak(), name: user_name.to_string(), perms, allow_inactive };
        let attached = self.change_users(
            &mut st,
            |_| sync::lock(&node.users).push(user),
            |_, ()| sync::lock(&node.users).retain(|u| u.id != id),
        );
        if let Err(e) = attached {
            drop(st);
            // The backend's drop detaches a user that no longer exists: harmless.
            drop(backend);
            return Err(e);
        }
        drop(st);
        Ok(backend)
    }

    /// Hold and drain the requests of every user of `node` but `except`
    /// (a mirror's own users), e.g. before moving them to another node.
    pub async fn quiesce_users(&self, node: &Arc<Node>, except: &[UserId]) -> UsersQuiesced {
        // No new user may arrive while these are held (it would be neither drained nor moved).
        let held: Vec<_> = {
            let _st = self.lock_state();
            node.users_frozen.store(true, std::sync::atomic::Ordering::SeqCst);
            node.users().into_iter().filter(|u| !except.contains(&u.id)).filter_map(|u| u.backend.upgrade()).collect()
        };
        for b in &held {
            b.io.begin_quiesce();
        }
        for b in &held {
            b.io.wait_drained().await;
        }
        UsersQuiesced(held, node.clone())
    }

    /// Move every user of `from` but `except` to `to` (QEMU's
    /// bdrv_replace_node for a mirror's pivot). Call with the users quiesced.
    /// Parent nodes of `from` cannot be moved (their child is fixed).
    pub fn move_users(&self, from: &Arc<Node>, to: &Arc<Node>, except: &[UserId]) -> Result<()> {
        let mut st = self.lock_state();
        if !st.parents(from).is_empty() {
            return Err(BlockError::Unsupported {
                node: from.name.clone(),
                what: "replacing a node that has a parent node",
            });
        }
        let moving: Vec<User> = from.users().into_iter().filter(|u| !except.contains(&u.id)).collect();
        let take = |list: &Mutex<Vec<User>>, ids: &[UserId]| sync::lock(list).retain(|u| !ids.contains(&u.id));
        let ids: Vec<UserId> = moving.iter().map(|u| u.id).collect();
        self.change_users(
            &mut st,
            |_| {
                take(&from.users, &ids);
                sync::lock(&to.users).extend(moving.iter().cloned());
            },
            |_, ()| {
                take(&to.users, &ids);
                sync::lock(&from.users).extend(moving.iter().cloned());
            },
        )?;
        for u in &moving {
            if let Some(b) = u.backend.upgrade() {
                b.set_node(to.clone());
            }
        }
        Ok(())
    }

    /// Detach a user (called when its BlockBackend is dropped).
    pub(crate) fn detach(&self, node: &Node, id: UserId) {
        let st = self.lock_state();
        sync::lock(&node.users).retain(|u| u.id != id);
        if let Err(e) = self.refresh_perms(&st) {
            tracing::warn!(node = %node.name, error = %e, "refreshing permissions after detach failed");
        }
    }

    /// Change what a user may do / lets others do on the node it uses.
    pub(crate) fn set_user_perms(&self, node: &Node, id: UserId, perms: PermSet, allow_inactive: bool) -> Result<()> {
        let mut st = self.lock_state();
        let set = |perms, allow_inactive| {
            sync::lock(&node.users).iter_mut().find(|u| u.id == id).map(|u| {
                let old = (u.perms, u.allow_inactive);
                u.perms = perms;
                u.allow_inactive = allow_inactive;
                old
            })
        };
        self.change_users(
            &mut st,
            |_| set(perms, allow_inactive),
            |_, old| {
                if let Some((p, a)) = old {
                    set(p, a);
                }
            },
        )
    }

    /// The one way to change who uses what: apply `change` (users or nodes),
    /// recompute permissions and image locks; if they conflict, apply `undo`
    /// to what `change` returned, recompute again (back to the locks held
    /// before) and return the conflict.
    fn change_users<T>(
        &self,
        st: &mut GraphState,
        change: impl FnOnce(&mut GraphState) -> T,
        undo: impl FnOnce(&mut GraphState, T),
    ) -> Result<()> {
        let done = change(st);
        if let Err(e) = self.refresh_perms(st) {
            undo(st, done);
            if let Err(again) = self.refresh_perms(st) {
                tracing::warn!(error = %again, "restoring permissions after a refused change failed");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Recompute every node's cumulative permissions from its users and
    /// parents, check them pairwise, and bring the image locks of active
    /// `file` nodes in line (inactive ones hold none). Parents first, so that
    /// each child sees its parents' new permissions.
    pub(crate) fn refresh_perms(&self, st: &GraphState) -> Result<()> {
        self.refresh_perms_as(st, &|n: &Node| n.is_active())
    }

    /// As `refresh_perms`, with `active` deciding which nodes count as active
    /// (activation checks the new state before it admits writes).
    pub(crate) fn refresh_perms_as(&self, st: &GraphState, active: &dyn Fn(&Node) -> bool) -> Result<()> {
        let order = st.parents_first();
        let mut cumulative: Vec<(Arc<Node>, PermSet)> = Vec::with_capacity(order.len());
        for node in &order {
            let node_active = active(node);
            let mut holders: Vec<(String, PermSet)> = Vec::new();
            for u in node.users() {
                holders.push((u.name.clone(), if node_active { u.perms } else { PermSet::new(Perm::NONE, Perm::ALL) }));
            }
            for p in st.parents(node) {
                let pp = cumulative
                    .iter()
                    .find(|(n, _)| Arc::ptr_eq(n, &p))
                    .map(|(_, ps)| *ps)
                    .unwrap_or(PermSet::new(Perm::NONE, Perm::ALL));
                let eff = if active(&p) { pp } else { PermSet::new(Perm::NONE, Perm::ALL) };
                holders.push((format!("node '{}'", p.name), eff));
            }
            for (i, (an, a)) in holders.iter().enumerate() {
                for (_, b) in holders.iter().skip(i + 1) {
                    if let Some(c) = a.conflict(b) {
                        return Err(BlockError::PermConflict {
                            node: node.name.clone(),
                            perm: c.first_name(),
                            other: an.clone(),
                        });
                    }
                }
            }
            let total = holders.iter().fold(PermSet::new(Perm::NONE, Perm::ALL), |acc, (_, p)| {
                PermSet::new(acc.perm | p.perm, acc.shared.intersection(p.shared))
            });
            cumulative.push((node.clone(), total));
        }
        for (node, total) in &cumulative {
            if let Some(f) = node.file() {
                if active(node) {
                    f.set_lock(total.perm, total.shared)?;
                } else {
                    f.release_lock();
                }
            }
            *sync::lock(&node.applied) = *total;
        }
        Ok(())
    }

    /// `block-dirty-bitmap-add`.
    pub fn bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: Option<u64>,
        disabled: bool,
    ) -> Result<Arc<DirtyBitmap>> {
        let node = self.find(node)?;
        let mut list = sync::write(&node.bitmaps);
        if list.iter().any(|b| b.name() == name) {
            return Err(BlockError::BitmapExists { node: node.name.clone(), bitmap: name.to_string() });
        }
        let g = granularity.unwrap_or(crate::bitmap::DEFAULT_GRANULARITY);
        let bm = Arc::new(
            DirtyBitmap::new(name, node.length(), g)
                .map_err(|source| BlockError::Bitmap { node: node.name.clone(), source })?,
        );
        bm.set_enabled(!disabled);
        list.push(bm.clone());
        Ok(bm)
    }

    /// Put back a bitmap removed earlier (transaction rollback).
    pub fn bitmap_insert(&self, node: &str, bitmap: Arc<DirtyBitmap>) -> Result<()> {
        let node = self.find(node)?;
        let mut list = sync::write(&node.bitmaps);
        if list.iter().any(|b| b.name() == bitmap.name()) {
            return Err(BlockError::BitmapExists { node: node.name.clone(), bitmap: bitmap.name().to_string() });
        }
        list.push(bitmap);
        Ok(())
    }

    /// Add a bitmap made elsewhere (an incoming migration's): refused when the node has one of
    /// that name (QEMU's rule for migrated bitmaps) or the bitmap covers another size.
    pub fn bitmap_adopt(&self, node: &str, bitmap: DirtyBitmap) -> Result<Arc<DirtyBitmap>> {
        let node = self.find(node)?;
        let mut list = sync::write(&node.bitmaps);
        if list.iter().any(|b| b.name() == bitmap.name()) {
            return Err(BlockError::BitmapExists { node: node.name.clone(), bitmap: bitmap.name().to_string() });
        }
        let (ours, theirs) = (node.length(), bitmap.size());
        if ours != theirs {
            return Err(BlockError::Bitmap {
                node: node.name.clone(),
                source: crate::bitmap::BitmapError::SizeMismatch { ours, theirs },
            });
        }
        let bm = Arc::new(bitmap);
        list.push(bm.clone());
        Ok(bm)
    }

    /// Remove exactly `bitmap` from `node` (not another one of the same name), busy or not: the
    /// undo of [`Graph::bitmap_adopt`]. Whether it was there.
    pub fn bitmap_detach(&self, node: &str, bitmap: &Arc<DirtyBitmap>) -> bool {
        let Ok(node) = self.find(node) else { return false };
        let mut list = sync::write(&node.bitmaps);
        let before = list.len();
        list.retain(|b| !Arc::ptr_eq(b, bitmap));
        list.len() != before
    }

    /// `block-dirty-bitmap-remove`.
    pub fn bitmap_remove(&self, node: &str, name: &str) -> Result<Arc<DirtyBitmap>> {
        let node = self.find(node)?;
        let bm = node.bitmap(name)?;
        bm.check_not_busy().map_err(|source| BlockError::Bitmap { node: node.name.clone(), source })?;
        sync::write(&node.bitmaps).retain(|b| !Arc::ptr_eq(b, &bm));
        Ok(bm)
    }
}

/// Release what a node holds outside the process (its image lock).
fn release_node(node: &Node) {
    if let Some(f) = node.file() {
        f.release_lock();
    }
    if let Kind::Leaf(d) = &node.kind {
        d.close();
    }
}

/// Users whose requests are held at their entry (and a node that takes no
/// new user meanwhile); released on drop.
#[derive(Debug)]
pub struct UsersQuiesced(Vec<Arc<crate::backend::BackendInner>>, Arc<Node>);

impl Drop for UsersQuiesced {
    fn drop(&mut self) {
        self.1.users_frozen.store(false, std::sync::atomic::Ordering::SeqCst);
        for b in &self.0 {
            b.io.end_quiesce();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_coercion_follows_the_common_and_the_drivers_schemas_into_inline_children() {
        let g = Graph::new();
        let kv = json!({"driver": "blkdebug", "node-name": "d", "read-only": "on",
            "inject-error": [{"event": "read_aio", "errno": "5", "once": "on"}],
            "image": {"driver": "raw", "offset": "4k",
                      "file": {"driver": "null-co", "size": "1M", "read-zeroes": "yes", "cache": {"direct": "off"}}},
            "unknown": "on"});
        let typed = g.coerce_keyval(kv).unwrap();
        assert_eq!(
            typed,
            json!({"driver": "blkdebug", "node-name": "d", "read-only": true,
                "inject-error": [{"event": "read_aio", "errno": 5, "once": true}],
                "image": {"driver": "raw", "offset": 4096,
                          "file": {"driver": "null-co", "size": 1048576, "read-zeroes": true, "cache": {"direct": false}}},
                "unknown": "on"})
        );
        let by_name = json!({"driver": "raw", "file": "n", "size": "512"});
        assert_eq!(g.coerce_keyval(by_name).unwrap(), json!({"driver": "raw", "file": "n", "size": 512}));
        let e = g.coerce_keyval(json!({"driver": "raw", "file": {"driver": "null-co", "size": "big"}})).unwrap_err();
        assert!(e.to_string().contains("'file.size'"), "{e}");
        // A driver without a schema gets its strings as they are.
        g.register(Arc::new(Schemaless));
        let kv = json!({"driver": "ext", "read-only": "off", "port": "10809"});
        assert_eq!(g.coerce_keyval(kv).unwrap(), json!({"driver": "ext", "read-only": false, "port": "10809"}));
    }

    /// A driver that declares no schema for its members.
    struct Schemaless;

    impl BlockDriver for Schemaless {
        fn name(&self) -> &str {
            "ext"
        }
        fn options(&self) -> Option<Vec<Field>> {
            None
        }
        fn open<'a>(
            &'a self,
            _ctx: OpenCtx<'a>,
            _options: Map<String, Value>,
        ) -> crate::driver::BoxFuture<'a, Result<Opened>> {
            Box::pin(async { Err(BlockError::UnknownDriver("ext".into())) })
        }
    }

    #[tokio::test]
    async fn blockdev_add_takes_json_types_only_and_every_driver_is_registered_once() {
        let g = Graph::new();
        let e = g.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "read-zeroes": "on"})).await.unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter type for 'read-zeroes', expected: boolean");
        let e = g.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "bogus": 1})).await.unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'bogus' is unexpected");
        let n = g.blockdev_add(&json!({"driver": "null-aio", "node-name": "n", "size": 4096})).await.unwrap();
        assert_eq!((n.driver_name(), n.length()), ("null-co", 4096));
        assert_eq!(g.driver_names(), ["blkdebug", "file", "null-co", "raw"]);
    }
}
