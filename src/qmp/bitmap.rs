//! Dirty bitmaps: `block-dirty-bitmap-*`, the debug hash, and `transaction`
//! of bitmap actions. The rules are the block layer's
//! ([`block::bitmap::Action`]); each single command is a transaction of one
//! action.

use std::sync::Arc;

use block::bitmap::{Action, BitmapRef};
use block::schema::{Field, Ty};
use serde_json::{json, Value};

use super::error::QmpError;
use super::{BitmapOrStr, BlockDirtyBitmap, Int, Reply};
use crate::daemon::Daemon;

block::qapi_struct! {
    pub struct BlockDirtyBitmapAdd {
        "node" node: String,
        "name" name: String,
        "granularity" granularity: Option<Int>,
        "persistent" persistent: Option<bool>,
        "disabled" disabled: Option<bool>,
    }
}

block::qapi_struct! {
    pub struct BlockDirtyBitmapMerge {
        "node" node: String,
        "target" target: String,
        "bitmaps" bitmaps: Vec<BitmapOrStr>,
    }
}

impl From<BlockDirtyBitmap> for BitmapRef {
    fn from(b: BlockDirtyBitmap) -> Self {
        BitmapRef { node: b.node, name: b.name }
    }
}

impl From<BlockDirtyBitmapAdd> for Action {
    fn from(a: BlockDirtyBitmapAdd) -> Self {
        Action::Add {
            node: a.node,
            name: a.name,
            // A negative granularity breaks the same rule as 0 does.
            granularity: a.granularity.map(|g| g.as_u64().unwrap_or(0)),
            persistent: a.persistent.unwrap_or(false),
            disabled: a.disabled.unwrap_or(false),
        }
    }
}

impl From<BlockDirtyBitmapMerge> for Action {
    fn from(a: BlockDirtyBitmapMerge) -> Self {
        let sources = a
            .bitmaps
            .into_iter()
            .map(|b| match b {
                // A bare name is a bitmap of the target's node.
                BitmapOrStr::Name(name) => BitmapRef { node: a.node.clone(), name },
                BitmapOrStr::Bitmap(b) => b.into(),
            })
            .collect();
        Action::Merge { node: a.node, target: a.target, sources }
    }
}

/// Run one action as a transaction of its own.
fn run(d: &Daemon, action: Action) -> Reply {
    block::bitmap::transaction(&d.graph, [Ok::<_, block::bitmap::ActionError>(action)])?;
    Ok(json!({}))
}

pub async fn add(d: Arc<Daemon>, a: BlockDirtyBitmapAdd) -> Reply {
    run(&d, a.into())
}

pub async fn remove(d: Arc<Daemon>, a: BlockDirtyBitmap) -> Reply {
    run(&d, Action::Remove(a.into()))
}

pub async fn clear(d: Arc<Daemon>, a: BlockDirtyBitmap) -> Reply {
    run(&d, Action::Clear(a.into()))
}

pub async fn enable(d: Arc<Daemon>, a: BlockDirtyBitmap) -> Reply {
    run(&d, Action::Enable(a.into()))
}

pub async fn disable(d: Arc<Daemon>, a: BlockDirtyBitmap) -> Reply {
    run(&d, Action::Disable(a.into()))
}

pub async fn merge(d: Arc<Daemon>, a: BlockDirtyBitmapMerge) -> Reply {
    run(&d, a.into())
}

pub fn sha256_ret() -> Ty {
    Ty::Obj(vec![Field::of::<String>("sha256")])
}

pub async fn sha256(d: Arc<Daemon>, a: BlockDirtyBitmap) -> Reply {
    use sha2::Digest;
    let bm = block::bitmap::lookup(&d.graph, &a.node, &a.name)?;
    let mut h = sha2::Sha256::new();
    for w in bm.snapshot_bits() {
        h.update(w.to_le_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(json!({"sha256": hex}))
}

block::qapi_enum! {
    /// The actions a `transaction` takes (bitmap actions only).
    pub enum TransactionActionKind {
        "block-dirty-bitmap-add" Add,
        "block-dirty-bitmap-remove" Remove,
        "block-dirty-bitmap-clear" Clear,
        "block-dirty-bitmap-enable" Enable,
        "block-dirty-bitmap-disable" Disable,
        "block-dirty-bitmap-merge" Merge,
    }
}

block::qapi_struct! {
    /// One action: its arguments in `data`, checked against its kind's type.
    pub struct TransactionAction {
        "type" kind: TransactionActionKind,
        "data" data: Value,
    }
}

block::qapi_enum! {
    #[allow(dead_code)]
    pub enum ActionCompletionMode { "individual" Individual, "grouped" Grouped }
}

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct TransactionProperties {
        "completion-mode" completion_mode: Option<ActionCompletionMode>,
    }
}

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct Transaction {
        "actions" actions: Vec<TransactionAction>,
        "properties" properties: Option<TransactionProperties>,
    }
}

/// Decode one action's `data` as its kind's arguments.
fn action(a: TransactionAction) -> Result<Action, QmpError> {
    use block::schema::parse;
    use TransactionActionKind as K;
    if !a.data.is_object() {
        return Err(QmpError::generic("Invalid parameter type for 'data', expected: object"));
    }
    let bitmap = |data| parse::<BlockDirtyBitmap>(data).map(BitmapRef::from);
    Ok(match a.kind {
        K::Add => parse::<BlockDirtyBitmapAdd>(a.data)?.into(),
        K::Merge => parse::<BlockDirtyBitmapMerge>(a.data)?.into(),
        K::Remove => Action::Remove(bitmap(a.data)?),
        K::Clear => Action::Clear(bitmap(a.data)?),
        K::Enable => Action::Enable(bitmap(a.data)?),
        K::Disable => Action::Disable(bitmap(a.data)?),
    })
}

/// `transaction`: every action or none (the command lock is held for the
/// whole of it). Each action is decoded and prepared in turn; the first
/// failure aborts those prepared before it.
pub async fn transaction(d: Arc<Daemon>, a: Transaction) -> Reply {
    block::bitmap::transaction(&d.graph, a.actions.into_iter().map(action))?;
    Ok(json!({}))
}
