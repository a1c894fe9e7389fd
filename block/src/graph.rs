//! The graph: nodes by `node-name`, their parent/child edges, users and
//! permissions, and the control-plane operations on them.
//!
//! Control-plane operations are serialised by one async mutex (`control`);
//! the graph's own state sits behind a plain mutex that is never held across
//! an `.await`. The I/O path touches neither.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde_json::{Map, Value};

use crate::backend::BlockBackend;
use crate::bitmap::DirtyBitmap;
use crate::driver::DynDriver;
use crate::drivers::blkdebug::{Blkdebug, InjectDelay, InjectError};
use crate::drivers::file::{AioMode, FileDriver, FileOptions, Locking};
use crate::drivers::null::{NullDriver, DEFAULT_SIZE};
use crate::drivers::raw::RawFilter;
use crate::error::{BlockError, Result};
use crate::node::{Child, Kind, Node, User, UserId};
use crate::options::Opts;
use crate::perm::{Perm, PermSet};
use crate::sync;

/// Builds a driver registered from another crate from the node's name (for
/// its messages) and its remaining options.
pub type DriverCtor = Arc<
    dyn Fn(String, Map<String, Value>) -> Pin<Box<dyn Future<Output = Result<Arc<dyn DynDriver>>> + Send>>
        + Send
        + Sync,
>;

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
    drivers: RwLock<HashMap<String, DriverCtor>>,
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

/// What a `blockdev-add` describes, parsed before anything is opened.
enum Spec {
    File(FileOptions),
    Null { size: u64, read_zeroes: bool, latency_ns: u64 },
    Raw { offset: u64, size: Option<u64> },
    Blkdebug { errors: Vec<InjectError>, delays: Vec<InjectDelay> },
    Dyn(DriverCtor, Map<String, Value>),
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
            drivers: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, GraphState> {
        // A panic while holding the lock cannot leave the node list half-edited
        // (every edit is a single push/remove): the lock is taken over.
        sync::lock(&self.state)
    }

    /// Register a driver implemented outside this crate (e.g. `nbd`).
    pub fn register_driver(&self, name: &str, ctor: DriverCtor) {
        sync::write(&self.drivers).insert(name.to_string(), ctor);
    }

    /// Names of every driver `blockdev-add` accepts.
    pub fn driver_names(&self) -> Vec<String> {
        let mut v: Vec<String> = ["blkdebug", "file", "null-co", "raw"].iter().map(|s| s.to_string()).collect();
        v.extend(sync::read(&self.drivers).keys().cloned());
        v.sort();
        v
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
        let res = self.add_locked(Opts::new(options)?, false, &mut created).await;
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
        mut o: Opts,
        implicit: bool,
        created: &'a mut Vec<Arc<Node>>,
    ) -> Pin<Box<dyn Future<Output = Result<Arc<Node>>> + Send + 'a>> {
        Box::pin(async move {
            let driver = o.req_str("driver")?;
            let name = match o.str("node-name")? {
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
            let read_only = o.bool("read-only")?.unwrap_or(false);
            let _auto_read_only = o.bool("auto-read-only")?;
            let active = o.bool("active")?.unwrap_or(true);
            let discard = o.choice("discard", &["ignore", "unmap"])?;
            let mut cache = o.object("cache")?;
            let direct = cache.bool("direct")?.unwrap_or(false);
            let _no_flush = cache.bool("no-flush")?;
            cache.finish("cache.")?;
            let _force_share = o.bool("force-share")?;
            let _detect_zeroes = o.choice("detect-zeroes", &["off", "on", "unmap"])?;

            // The child, for filters: a node-name or nested options.
            let child_key = match driver.as_str() {
                "raw" => Some("file"),
                "blkdebug" => Some("image"),
                _ => None,
            };
            let child = match child_key {
                Some(key) => {
                    let node = match o.take(key) {
                        None => {
                            return Err(BlockError::InvalidOption {
                                option: key.into(),
                                reason: "parameter is missing".into(),
                            })
                        }
                        Some(Value::String(r)) => self.lock_state().find(&r)?,
                        Some(v @ Value::Object(_)) => {
                            let mut nested = Opts::new(&v)?;
                            // Nested children inherit read-only, as in QEMU.
                            if read_only && nested.bool("read-only")?.is_none() {
                                nested = Opts::from_map({
                                    let mut m = nested.into_map();
                                    m.insert("read-only".into(), Value::Bool(true));
                                    m
                                });
                            }
                            self.add_locked(nested, true, created).await?
                        }
                        Some(_) => {
                            return Err(BlockError::InvalidOption {
                                option: key.into(),
                                reason: "expected a node name or an object".into(),
                            })
                        }
                    };
                    Some(Child { role: key, node })
                }
                None => None,
            };

            let spec = match driver.as_str() {
                "file" | "host_device" => {
                    let aio = match o.choice("aio", &["threads", "io_uring", "native"])?.as_deref() {
                        Some("io_uring") => AioMode::IoUring,
                        _ => AioMode::Threads,
                    };
                    let locking = match o.choice("locking", &["auto", "on", "off"])?.as_deref() {
                        Some("on") => Locking::On,
                        Some("off") => Locking::Off,
                        _ => Locking::Auto,
                    };
                    let _aio_max_batch = o.u64("aio-max-batch")?;
                    Spec::File(FileOptions {
                        filename: o.req_str("filename")?,
                        aio,
                        direct,
                        discard_unmap: discard.as_deref() == Some("unmap"),
                        locking,
                        read_only,
                    })
                }
                "null-co" | "null-aio" => Spec::Null {
                    size: o.u64("size")?.unwrap_or(DEFAULT_SIZE),
                    read_zeroes: o.bool("read-zeroes")?.unwrap_or(false),
                    latency_ns: o.u64("latency-ns")?.unwrap_or(0),
                },
                "raw" => Spec::Raw { offset: o.u64("offset")?.unwrap_or(0), size: o.u64("size")? },
                "blkdebug" => {
                    let errors = match o.take("inject-error") {
                        None => Vec::new(),
                        Some(v) => serde_json::from_value(keyval_scalars(v)).map_err(|e| {
                            BlockError::InvalidOption { option: "inject-error".into(), reason: e.to_string() }
                        })?,
                    };
                    let delays = match o.take("x-baton-inject-delay") {
                        None => Vec::new(),
                        Some(v) => serde_json::from_value(keyval_scalars(v)).map_err(|e| {
                            BlockError::InvalidOption { option: "x-baton-inject-delay".into(), reason: e.to_string() }
                        })?,
                    };
                    let _align = o.u64("align")?;
                    Spec::Blkdebug { errors, delays }
                }
                other => {
                    let ctor = sync::read(&self.drivers).get(other).cloned();
                    match ctor {
                        Some(c) => Spec::Dyn(c, std::mem::replace(&mut o, Opts::from_map(Map::new())).into_map()),
                        None => return Err(BlockError::UnknownDriver(other.to_string())),
                    }
                }
            };
            o.finish("")?;

            if let Some(c) = &child {
                if !read_only && c.node.read_only {
                    return Err(BlockError::InvalidOption {
                        option: "read-only".into(),
                        reason: format!("child '{}' is read-only; open '{name}' with read-only=on", c.node.name),
                    });
                }
            }
            let kind = match spec {
                Spec::File(f) => Kind::File(FileDriver::open(f)?),
                Spec::Null { size, read_zeroes, latency_ns } => {
                    Kind::Null(NullDriver::new(size, read_zeroes, latency_ns))
                }
                Spec::Raw { offset, size } => {
                    let child_len = child.as_ref().map(|c| c.node.length()).unwrap_or(0);
                    Kind::Raw(RawFilter::new(&name, offset, size, child_len)?)
                }
                Spec::Blkdebug { errors, delays } => Kind::Blkdebug(Blkdebug::new(errors, delays)),
                Spec::Dyn(ctor, rest) => Kind::Dyn(ctor(name.clone(), rest).await?),
            };
            let node = Arc::new(Node::new(name, kind, child, read_only, active, implicit));

            // An active parent needs an active child (QEMU refuses the same).
            if active {
                if let Some(c) = node.child() {
                    if !c.is_active() {
                        return Err(BlockError::InvalidOption {
                            option: "active".into(),
                            reason: format!(
                                "inactive '{}' can't be a {} child of active '{}'",
                                c.name,
                                node.child.as_ref().map(|c| c.role).unwrap_or("file"),
                                node.name
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

    /// `block-dirty-bitmap-remove`.
    pub fn bitmap_remove(&self, node: &str, name: &str) -> Result<Arc<DirtyBitmap>> {
        let node = self.find(node)?;
        let bm = node.bitmap(name)?;
        if bm.is_busy() {
            return Err(BlockError::BitmapBusy { bitmap: name.to_string() });
        }
        sync::write(&node.bitmaps).retain(|b| !Arc::ptr_eq(b, &bm));
        Ok(bm)
    }
}

/// Turn keyval's strings ("5", "on") into numbers and booleans inside rule
/// lists, so `--blockdev ...,inject-error.0.errno=5` works as in QEMU.
fn keyval_scalars(v: Value) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.into_iter().map(keyval_scalars).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, keyval_scalars(v))).collect()),
        Value::String(s) => match s.as_str() {
            "on" | "true" | "yes" => Value::Bool(true),
            "off" | "false" | "no" => Value::Bool(false),
            _ => s.parse::<i64>().map(Value::from).unwrap_or(Value::String(s)),
        },
        other => other,
    }
}

/// Release what a node holds outside the process (its image lock).
fn release_node(node: &Node) {
    if let Some(f) = node.file() {
        f.release_lock();
    }
    if let Kind::Dyn(d) = &node.kind {
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
