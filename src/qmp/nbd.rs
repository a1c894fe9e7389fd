//! The NBD server and its exports: `nbd-server-start`/`-stop`,
//! `block-export-add`/`-del`, `query-block-exports`.

use std::sync::Arc;

use baton_nbd::ExportConfig;
use block::schema::{QapiObject, Ty};
use serde_json::{json, Value};

use super::error::QmpError;
use super::{parse_at, BitmapOrStr, Int, NoArgs, Reply};
use crate::daemon::{Daemon, NbdAddr};

block::qapi_enum! {
    pub enum SocketAddressType { "inet" Inet, "unix" Unix, "vsock" Vsock, "fd" Fd }
}

block::qapi_struct! {
    /// SocketAddressLegacy: `data`'s type depends on `type`.
    pub struct SocketAddressLegacy {
        "type" kind: SocketAddressType,
        "data" data: Value,
    }
}

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct InetSocketAddress {
        "host" host: String,
        "port" port: String,
        "numeric" numeric: Option<bool>,
        "ipv4" ipv4: Option<bool>,
    }
}

block::qapi_struct! {
    pub struct UnixSocketAddress {
        "path" path: String,
    }
}

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct NbdServerStart {
        "addr" addr: SocketAddressLegacy,
        "tls-creds" tls_creds: Option<String>,
        "tls-authz" tls_authz: Option<String>,
        "max-connections" max_connections: Option<Int>,
        "handshake-max-seconds" handshake_max_seconds: Option<Int>,
    }
}

pub async fn nbd_server_start(d: Arc<Daemon>, a: NbdServerStart) -> Reply {
    if a.tls_creds.is_some() || a.tls_authz.is_some() {
        return Err(QmpError::generic("TLS is not supported yet"));
    }
    // A `data` that is not an object has none of the members.
    let data = Value::Object(a.addr.data.as_object().cloned().unwrap_or_default());
    let addr = match a.addr.kind {
        SocketAddressType::Inet => {
            let i: InetSocketAddress = parse_at(data, "addr.data")?;
            NbdAddr::Inet { host: i.host, port: i.port }
        }
        SocketAddressType::Unix => {
            let u: UnixSocketAddress = parse_at(data, "addr.data")?;
            NbdAddr::Unix { path: u.path.into() }
        }
        other => return Err(QmpError::generic(format!("address type '{}' is not supported", other.as_str()))),
    };
    let max = match a.max_connections {
        None => 0,
        Some(v) => {
            v.as_u64()
                .filter(|&n| n <= u64::from(u32::MAX))
                .ok_or_else(|| QmpError::generic("Parameter 'max-connections' expects uint32"))? as usize
        }
    };
    d.nbd_start(addr, max).await?;
    Ok(json!({}))
}

pub async fn nbd_server_stop(d: Arc<Daemon>, _: NoArgs) -> Reply {
    d.nbd_stop().await?;
    Ok(json!({}))
}

block::qapi_enum! {
    pub enum BlockExportType { "nbd" Nbd, "vhost-user-blk" VhostUserBlk, "fuse" Fuse, "vduse-blk" VduseBlk }
}

block::qapi_struct! {
    /// BlockExportOptions (type nbd: BlockExportOptionsNbd's members).
    #[allow(dead_code)]
    pub struct BlockExportAdd {
        "type" kind: BlockExportType,
        "id" id: String,
        "fixed-iothread" fixed_iothread: Option<bool>,
        "iothread" iothread: Option<String>,
        "node-name" node_name: String,
        "writable" writable: Option<bool>,
        "writethrough" writethrough: Option<bool>,
        "allow-inactive" allow_inactive: Option<bool>,
        "name" name: Option<String>,
        "description" description: Option<String>,
        "bitmaps" bitmaps: Option<Vec<BitmapOrStr>>,
        "allocation-depth" allocation_depth: Option<bool>,
        "x-baton-multi-conn" multi_conn: Option<bool>,
    }
}

pub async fn block_export_add(d: Arc<Daemon>, a: BlockExportAdd) -> Reply {
    if a.kind != BlockExportType::Nbd {
        return Err(QmpError::generic(format!("export type '{}' is not supported", a.kind.as_str())));
    }
    let node = a.node_name;
    let mut bitmaps = Vec::new();
    for b in a.bitmaps.unwrap_or_default() {
        match b {
            BitmapOrStr::Name(n) => bitmaps.push(n),
            BitmapOrStr::Bitmap(b) if b.node == node => bitmaps.push(b.name),
            BitmapOrStr::Bitmap(_) => {
                return Err(QmpError::generic("exporting a bitmap of another node is not supported"))
            }
        }
    }
    let writable = a.writable.unwrap_or(false);
    for name in &bitmaps {
        let bm = block::bitmap::lookup(&d.graph, &node, name)
            .map_err(|_| QmpError::generic(format!("Bitmap '{name}' is not found")))?;
        block::bitmap::check_user_may_use(&bm)?;
        if !writable && bm.is_enabled() {
            return Err(QmpError::generic(format!("Enabled bitmap '{name}' incompatible with readonly export")));
        }
    }
    let config = ExportConfig {
        name: a.name.unwrap_or_else(|| node.clone()),
        description: a.description.unwrap_or_default(),
        node,
        writable,
        bitmaps,
        allocation_depth: a.allocation_depth.unwrap_or(false),
        allow_inactive: a.allow_inactive.unwrap_or(false),
        // QEMU 10 advertises multi-conn on every NBD export of qemu-storage-daemon.
        multi_conn: a.multi_conn.unwrap_or(true),
        id: a.id,
    };
    d.export_add(config).await?;
    Ok(json!({}))
}

block::qapi_enum! {
    pub enum BlockExportRemoveMode { "safe" Safe, "hard" Hard }
}

block::qapi_struct! {
    pub struct BlockExportDel {
        "id" id: String,
        "mode" mode: Option<BlockExportRemoveMode>,
    }
}

pub async fn block_export_del(d: Arc<Daemon>, a: BlockExportDel) -> Reply {
    d.export_del(&a.id, a.mode == Some(BlockExportRemoveMode::Hard)).await?;
    Ok(json!({}))
}

block::qapi_struct! {
    /// BlockExportInfo (a return type: never decoded).
    #[allow(dead_code)]
    pub struct BlockExportInfo {
        "type" kind: String,
        "id" id: String,
        "node-name" node_name: String,
        "shutting-down" shutting_down: bool,
    }
}

pub fn query_block_exports_ret() -> Ty {
    Ty::Array(Box::new(Ty::Obj(BlockExportInfo::fields())))
}

pub async fn query_block_exports(d: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(Value::Array(
        d.exports()
            .await
            .iter()
            // The node the export uses now (a mirror's pivot may have moved it).
            .map(|e| json!({"node-name": e.backend.node().name(), "shutting-down": e.is_closing(), "type": "nbd", "id": e.config.id}))
            .collect(),
    ))
}
