//! Block nodes: `blockdev-add`, `blockdev-del`, `blockdev-set-active`,
//! `query-named-block-nodes` (QEMU's BlockDeviceInfo shape) and blkdebug's
//! run-time rules.

use std::sync::{Arc, LazyLock};

use block::options::BlockdevOptionsBase;
use block::schema::{Field, QapiObject, Ty};
use block::Node;
use serde_json::{json, Map, Value};

use super::error::QmpError;
use super::Reply;
use crate::daemon::Daemon;

/// `blockdev-add`'s checked members: the block layer's common ones
/// (`BlockdevOptionsBase`), with `driver` one of the daemon's registered
/// drivers or their aliases (built once; the names live as long as the
/// process, as the schema does). The driver's own members are the block layer's to check (an open
/// flat union), so the handler gets the arguments as a map.
pub fn blockdev_add_fields() -> Vec<Field> {
    static DRIVERS: LazyLock<&'static [&'static str]> = LazyLock::new(|| {
        let g = crate::daemon::graph();
        let mut names: Vec<&'static str> = Vec::new();
        for n in g.driver_names() {
            names.extend(g.driver(&n).map(|d| d.aliases()).unwrap_or_default());
            names.push(Box::leak(n.into_boxed_str()));
        }
        names.sort_unstable();
        Box::leak(names.into_boxed_slice())
    });
    BlockdevOptionsBase::fields()
        .into_iter()
        .map(|f| if f.name == "driver" { Field { ty: Ty::Enum(*DRIVERS), ..f } } else { f })
        .collect()
}

pub async fn blockdev_add(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    if !a.contains_key("node-name") {
        return Err(QmpError::generic("'node-name' must be specified for the root node"));
    }
    d.graph.blockdev_add(&Value::Object(a)).await?;
    Ok(json!({}))
}

block::qapi_struct! {
    pub struct BlockdevDel {
        "node-name" node_name: String,
    }
}

pub async fn blockdev_del(d: Arc<Daemon>, a: BlockdevDel) -> Reply {
    d.graph.blockdev_del(&a.node_name).await?;
    Ok(json!({}))
}

block::qapi_struct! {
    pub struct BlockdevSetActive {
        "node-name" node_name: Option<String>,
        "active" active: bool,
    }
}

pub async fn blockdev_set_active(d: Arc<Daemon>, a: BlockdevSetActive) -> Reply {
    d.graph.set_active(a.node_name.as_deref(), a.active).await?;
    Ok(json!({}))
}

/// The QEMU shape of a node's image (ImageInfo); a filter such as blkdebug
/// shows its child as `backing-image`, as QEMU does.
fn image_info(n: &Node, flat: bool) -> Value {
    let info = n.info();
    let filename = info.filename.clone().unwrap_or_else(|| format!("{}://", info.driver));
    let mut image = json!({"virtual-size": info.length, "filename": filename, "format": info.driver});
    match info.driver {
        // Nothing is stored: QEMU reports 0 and no dirty flag.
        "null-co" => image["actual-size"] = json!(0),
        "blkdebug" => {
            if let Some(c) = n.child().filter(|_| !flat) {
                image["backing-image"] = image_info(c, flat);
            }
        }
        _ => image["dirty-flag"] = json!(false),
    }
    let actual = info.filename.as_ref().and_then(|f| std::fs::metadata(f).ok()).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    if let Some(a) = actual {
        image["actual-size"] = json!(a);
    }
    if info.driver == "file" {
        image["format-specific"] = json!({"type": "file", "data": {}});
    }
    image
}

/// The QEMU shape of one node (BlockDeviceInfo); `flat` omits backing images.
fn node_info(n: &Node, flat: bool) -> Value {
    let info = n.info();
    let filename = info.filename.clone().unwrap_or_else(|| format!("{}://", info.driver));
    let direct = n.leaf().file().is_some_and(|f| f.options().direct);
    let image = image_info(n, flat);
    let mut v = json!({
        "iops_rd": 0, "detect_zeroes": "off", "active": info.active, "image": image, "iops_wr": 0,
        "ro": info.read_only, "node-name": info.node_name, "backing_file_depth": 0, "drv": info.driver,
        "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": false, "direct": direct, "writeback": true}, "file": filename,
    });
    let bitmaps: Vec<Value> = n
        .bitmaps()
        .iter()
        .rev()
        .map(|bm| {
            json!({"name": bm.name(), "recording": bm.is_enabled(), "persistent": false, "busy": bm.is_busy(),
                   "granularity": bm.granularity(), "count": bm.dirty_granules() * bm.granularity()})
        })
        .collect();
    if !bitmaps.is_empty() {
        v["dirty-bitmaps"] = Value::Array(bitmaps);
    }
    v
}

block::qapi_struct! {
    pub struct QueryNamedBlockNodes {
        "flat" flat: Option<bool>,
    }
}

pub async fn query_named_block_nodes(d: Arc<Daemon>, a: QueryNamedBlockNodes) -> Reply {
    let flat = a.flat.unwrap_or(false);
    // Newest first, as QEMU lists them.
    Ok(Value::Array(d.graph.nodes().iter().rev().map(|n| node_info(n, flat)).collect()))
}

block::qapi_struct! {
    /// `x-baton-blkdebug-set-rules`: replace a blkdebug node's rules (the
    /// rule lists are the driver's to decode).
    pub struct BlkdebugSetRules {
        "node-name" node_name: String,
        "inject-error" inject_error: Option<Value>,
        "x-baton-inject-delay" inject_delay: Option<Value>,
    }
}

pub async fn blkdebug_set_rules(d: Arc<Daemon>, a: BlkdebugSetRules) -> Reply {
    let node = d.graph.find(&a.node_name)?;
    let dbg =
        node.blkdebug().ok_or_else(|| QmpError::generic(format!("node '{}' is not a blkdebug node", node.name())))?;
    let errors = serde_json::from_value(a.inject_error.unwrap_or(json!([])))
        .map_err(|e| QmpError::generic(format!("inject-error: {e}")))?;
    let delays = serde_json::from_value(a.inject_delay.unwrap_or(json!([])))
        .map_err(|e| QmpError::generic(format!("x-baton-inject-delay: {e}")))?;
    dbg.set_rules(errors, delays);
    Ok(json!({}))
}
