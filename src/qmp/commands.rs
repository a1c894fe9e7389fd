//! The QMP commands: the table (names, arguments, return types) and their
//! handlers. `dispatch` is the only way in: it checks the arguments against
//! the table, then runs the handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use baton_nbd::ExportConfig;
use block::bitmap::DirtyBitmap;
use block::Node;
use serde_json::{json, Map, Value};

use super::error::{ErrorClass, QmpError};
use super::schema::{check_fields, check_value, introspect, opt, req, Args, Field, Ty};
use crate::daemon::{Daemon, NbdAddr};

type Reply = Result<Value, QmpError>;
type Handler = fn(Arc<Daemon>, Map<String, Value>) -> Pin<Box<dyn Future<Output = Reply> + Send>>;

/// One command of the schema.
pub struct Command {
    pub name: &'static str,
    pub args: Args,
    /// Return type for introspection (`None`: an empty object).
    pub ret: Option<&'static Ty>,
    pub handler: Handler,
}

macro_rules! handler {
    ($f:path) => {
        |d, a| Box::pin($f(d, a))
    };
}

// ---- types shared by several commands ----

static BITMAP_REF: [Field; 2] = [req("node", Ty::Str), req("name", Ty::Str)];
static BITMAP_ADD: [Field; 5] = [
    req("node", Ty::Str),
    req("name", Ty::Str),
    opt("granularity", Ty::Int),
    opt("persistent", Ty::Bool),
    opt("disabled", Ty::Bool),
];
static BITMAP_MERGE: [Field; 3] =
    [req("node", Ty::Str), req("target", Ty::Str), req("bitmaps", Ty::Array(&Ty::StrOrObj(&BITMAP_REF)))];
static INET: [Field; 4] = [req("host", Ty::Str), req("port", Ty::Str), opt("numeric", Ty::Bool), opt("ipv4", Ty::Bool)];
static UNIX: [Field; 1] = [req("path", Ty::Str)];
static ADDR_LEGACY: [Field; 2] = [req("type", Ty::Enum(&["inet", "unix", "vsock", "fd"])), req("data", Ty::Any)];
static NBD_START: [Field; 5] = [
    req("addr", Ty::Obj(&ADDR_LEGACY)),
    opt("tls-creds", Ty::Str),
    opt("tls-authz", Ty::Str),
    opt("max-connections", Ty::Int),
    opt("handshake-max-seconds", Ty::Int),
];
static EXPORT_ADD: [Field; 13] = [
    req("type", Ty::Enum(&["nbd", "vhost-user-blk", "fuse", "vduse-blk"])),
    req("id", Ty::Str),
    opt("fixed-iothread", Ty::Bool),
    opt("iothread", Ty::Str),
    req("node-name", Ty::Str),
    opt("writable", Ty::Bool),
    opt("writethrough", Ty::Bool),
    opt("allow-inactive", Ty::Bool),
    opt("name", Ty::Str),
    opt("description", Ty::Str),
    opt("bitmaps", Ty::Array(&Ty::StrOrObj(&BITMAP_REF))),
    opt("allocation-depth", Ty::Bool),
    opt("x-baton-multi-conn", Ty::Bool),
];
static EXPORT_DEL: [Field; 2] = [req("id", Ty::Str), opt("mode", Ty::Enum(&["safe", "hard"]))];
static EXPORT_INFO: [Field; 4] =
    [req("type", Ty::Str), req("id", Ty::Str), req("node-name", Ty::Str), req("shutting-down", Ty::Bool)];
static TRANSACTION_ACTION: [Field; 2] = [
    req(
        "type",
        Ty::Enum(&[
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge",
        ]),
    ),
    req("data", Ty::Any),
];
static TRANSACTION_PROPS: [Field; 1] = [opt("completion-mode", Ty::Enum(&["individual", "grouped"]))];
static BLOCKDEV_ADD: [Field; 8] = [
    req("driver", Ty::Enum(&["blkdebug", "file", "host_device", "nbd", "null-aio", "null-co", "raw"])),
    opt("node-name", Ty::Str),
    opt("discard", Ty::Enum(&["ignore", "unmap"])),
    opt("cache", Ty::Any),
    opt("read-only", Ty::Bool),
    opt("auto-read-only", Ty::Bool),
    opt("force-share", Ty::Bool),
    opt("active", Ty::Bool),
];
static VERSION_TRIPLE: [Field; 3] = [req("major", Ty::Int), req("minor", Ty::Int), req("micro", Ty::Int)];
static VERSION_INFO: [Field; 2] = [req("qemu", Ty::Obj(&VERSION_TRIPLE)), req("package", Ty::Str)];
static COMMAND_INFO: [Field; 1] = [req("name", Ty::Str)];
static SHA256: [Field; 1] = [req("sha256", Ty::Str)];
static BLKDEBUG_RULES: [Field; 3] =
    [req("node-name", Ty::Str), opt("inject-error", Ty::Any), opt("x-baton-inject-delay", Ty::Any)];
static NODE_INFO_RET: Ty = Ty::Array(&Ty::Any);
static EXPORTS_RET: Ty = Ty::Array(&Ty::Obj(&EXPORT_INFO));
static COMMANDS_RET: Ty = Ty::Array(&Ty::Obj(&COMMAND_INFO));
static VERSION_RET: Ty = Ty::Obj(&VERSION_INFO);
static SHA_RET: Ty = Ty::Obj(&SHA256);
static SCHEMA_RET: Ty = Ty::Array(&Ty::Any);

static JOB_ID: [Field; 1] = [req("id", Ty::Str)];
static BLOCK_JOB_DEVICE: [Field; 1] = [req("device", Ty::Str)];
static BLOCK_JOB_CANCEL: [Field; 2] = [req("device", Ty::Str), opt("force", Ty::Bool)];
static BLOCK_JOB_SPEED: [Field; 2] = [req("device", Ty::Str), req("speed", Ty::Int)];
static JOB_CHANGE: [Field; 3] = [
    req("id", Ty::Str),
    req("type", Ty::Enum(&["mirror"])),
    req("copy-mode", Ty::Enum(&["background", "write-blocking"])),
];
const ON_ERROR: Ty = Ty::Enum(&["report", "ignore", "enospc", "stop", "auto"]);
static MIRROR: [Field; 16] = [
    opt("job-id", Ty::Str),
    req("device", Ty::Str),
    req("target", Ty::Str),
    opt("replaces", Ty::Str),
    req("sync", Ty::Enum(&["top", "full", "none", "incremental", "bitmap"])),
    opt("speed", Ty::Int),
    opt("granularity", Ty::Int),
    opt("buf-size", Ty::Int),
    opt("on-source-error", ON_ERROR),
    opt("on-target-error", ON_ERROR),
    opt("filter-node-name", Ty::Str),
    opt("copy-mode", Ty::Enum(&["background", "write-blocking"])),
    opt("auto-finalize", Ty::Bool),
    opt("auto-dismiss", Ty::Bool),
    opt("x-baton-auto-converge", Ty::Bool),
    opt("x-baton-converge-after-ms", Ty::Int),
];
static JOB_INFO_RET: Ty = Ty::Array(&Ty::Any);
static MIG_CAP: [Field; 2] = [req("capability", Ty::Str), req("state", Ty::Bool)];
static STATUS_INFO: [Field; 4] = [
    req("running", Ty::Bool),
    req("status", Ty::Str),
    opt("x-baton-handover", Ty::Str),
    opt("x-baton-waiting", Ty::Str),
];
static MIG_PARAMS: [Field; 7] = {
    const N: [&str; 7] = vmm::migration::params::NAMES;
    [
        opt(N[0], Ty::Int),
        opt(N[1], Ty::Int),
        opt(N[2], Ty::Int),
        opt(N[3], Ty::Int),
        opt(N[4], Ty::Int),
        opt(N[5], Ty::Int),
        opt(N[6], Ty::Int),
    ]
};
static MIG_DECIDE: [Field; 1] = [req("decision", Ty::Enum(&["commit", "abort"]))];
static FAILPOINT: [Field; 2] = [req("name", Ty::Str), req("actions", Ty::Str)];
static STATUS_RET: Ty = Ty::Obj(&STATUS_INFO);
static ANY_RET: Ty = Ty::Any;

/// Events baton emits, with their data members.
pub static EVENTS: &[(&str, &[Field])] = &[
    ("BLOCK_EXPORT_DELETED", &[req("id", Ty::Str)]),
    ("JOB_STATUS_CHANGE", &[req("id", Ty::Str), req("status", Ty::Str)]),
    (
        "BLOCK_JOB_READY",
        &[
            req("type", Ty::Str),
            req("device", Ty::Str),
            req("len", Ty::Int),
            req("offset", Ty::Int),
            req("speed", Ty::Int),
        ],
    ),
    (
        "BLOCK_JOB_COMPLETED",
        &[
            req("type", Ty::Str),
            req("device", Ty::Str),
            req("len", Ty::Int),
            req("offset", Ty::Int),
            req("speed", Ty::Int),
            opt("error", Ty::Str),
        ],
    ),
    (
        "BLOCK_JOB_CANCELLED",
        &[
            req("type", Ty::Str),
            req("device", Ty::Str),
            req("len", Ty::Int),
            req("offset", Ty::Int),
            req("speed", Ty::Int),
        ],
    ),
    ("BLOCK_JOB_ERROR", &[req("device", Ty::Str), req("operation", Ty::Str), req("action", Ty::Str)]),
    ("BLOCK_JOB_PENDING", &[req("type", Ty::Str), req("id", Ty::Str)]),
    ("MIGRATION", &[req("status", Ty::Str)]),
    ("STOP", &[]),
    ("RESUME", &[]),
    (
        "BLOCK_IO_ERROR",
        &[
            req("device", Ty::Str),
            opt("node-name", Ty::Str),
            req("operation", Ty::Str),
            req("action", Ty::Str),
            opt("nospace", Ty::Bool),
            req("reason", Ty::Str),
        ],
    ),
    (
        "X_BATON_BLOCK_JOB_COPY_MODE_CHANGED",
        &[req("device", Ty::Str), req("copy-mode", Ty::Str), req("reason", Ty::Str)],
    ),
];

/// Every command. `qmp_capabilities` is handled by the session but listed here too.
pub static COMMANDS: &[Command] = &[
    Command {
        name: "qmp_capabilities",
        args: Args::Fields(&[opt("enable", Ty::Array(&Ty::Enum(&["oob"])))]),
        ret: None,
        handler: handler!(qmp_capabilities),
    },
    Command {
        name: "query-commands",
        args: Args::Fields(&[]),
        ret: Some(&COMMANDS_RET),
        handler: handler!(query_commands),
    },
    Command {
        name: "query-version",
        args: Args::Fields(&[]),
        ret: Some(&VERSION_RET),
        handler: handler!(query_version),
    },
    Command {
        name: "query-qmp-schema",
        args: Args::Fields(&[]),
        ret: Some(&SCHEMA_RET),
        handler: handler!(query_qmp_schema),
    },
    Command { name: "quit", args: Args::Fields(&[]), ret: None, handler: handler!(quit) },
    Command { name: "blockdev-add", args: Args::Open(&BLOCKDEV_ADD), ret: None, handler: handler!(blockdev_add) },
    Command {
        name: "blockdev-del",
        args: Args::Fields(&[req("node-name", Ty::Str)]),
        ret: None,
        handler: handler!(blockdev_del),
    },
    Command {
        name: "blockdev-set-active",
        args: Args::Fields(&[opt("node-name", Ty::Str), req("active", Ty::Bool)]),
        ret: None,
        handler: handler!(blockdev_set_active),
    },
    Command {
        name: "query-named-block-nodes",
        args: Args::Fields(&[opt("flat", Ty::Bool)]),
        ret: Some(&NODE_INFO_RET),
        handler: handler!(query_named_block_nodes),
    },
    Command {
        name: "block-dirty-bitmap-add",
        args: Args::Fields(&BITMAP_ADD),
        ret: None,
        handler: handler!(bitmap_add),
    },
    Command {
        name: "block-dirty-bitmap-remove",
        args: Args::Fields(&BITMAP_REF),
        ret: None,
        handler: handler!(bitmap_remove),
    },
    Command {
        name: "block-dirty-bitmap-clear",
        args: Args::Fields(&BITMAP_REF),
        ret: None,
        handler: handler!(bitmap_clear),
    },
    Command {
        name: "block-dirty-bitmap-enable",
        args: Args::Fields(&BITMAP_REF),
        ret: None,
        handler: handler!(bitmap_enable),
    },
    Command {
        name: "block-dirty-bitmap-disable",
        args: Args::Fields(&BITMAP_REF),
        ret: None,
        handler: handler!(bitmap_disable),
    },
    Command {
        name: "block-dirty-bitmap-merge",
        args: Args::Fields(&BITMAP_MERGE),
        ret: None,
        handler: handler!(bitmap_merge),
    },
    Command {
        name: "x-debug-block-dirty-bitmap-sha256",
        args: Args::Fields(&BITMAP_REF),
        ret: Some(&SHA_RET),
        handler: handler!(bitmap_sha256),
    },
    Command {
        name: "nbd-server-start",
        args: Args::Fields(&NBD_START),
        ret: None,
        handler: handler!(nbd_server_start),
    },
    Command { name: "nbd-server-stop", args: Args::Fields(&[]), ret: None, handler: handler!(nbd_server_stop) },
    Command {
        name: "block-export-add",
        args: Args::Fields(&EXPORT_ADD),
        ret: None,
        handler: handler!(block_export_add),
    },
    Command {
        name: "block-export-del",
        args: Args::Fields(&EXPORT_DEL),
        ret: None,
        handler: handler!(block_export_del),
    },
    Command {
        name: "query-block-exports",
        args: Args::Fields(&[]),
        ret: Some(&EXPORTS_RET),
        handler: handler!(query_block_exports),
    },
    Command {
        name: "transaction",
        args: Args::Fields(&[
            req("actions", Ty::Array(&Ty::Obj(&TRANSACTION_ACTION))),
            opt("properties", Ty::Obj(&TRANSACTION_PROPS)),
        ]),
        ret: None,
        handler: handler!(transaction),
    },
    Command {
        name: "x-baton-blkdebug-set-rules",
        args: Args::Fields(&BLKDEBUG_RULES),
        ret: None,
        handler: handler!(blkdebug_set_rules),
    },
    Command {
        name: "yank",
        args: Args::Fields(&super::yank::YANK_ARGS),
        ret: None,
        handler: handler!(super::yank::yank),
    },
    Command {
        name: "query-yank",
        args: Args::Fields(&[]),
        ret: Some(&super::yank::QUERY_YANK_RET),
        handler: handler!(super::yank::query_yank),
    },
    Command { name: "blockdev-mirror", args: Args::Fields(&MIRROR), ret: None, handler: handler!(blockdev_mirror) },
    Command { name: "query-jobs", args: Args::Fields(&[]), ret: Some(&JOB_INFO_RET), handler: handler!(query_jobs) },
    Command {
        name: "query-block-jobs",
        args: Args::Fields(&[]),
        ret: Some(&JOB_INFO_RET),
        handler: handler!(query_block_jobs),
    },
    Command { name: "job-pause", args: Args::Fields(&JOB_ID), ret: None, handler: handler!(job_pause) },
    Command { name: "job-resume", args: Args::Fields(&JOB_ID), ret: None, handler: handler!(job_resume) },
    Command { name: "job-cancel", args: Args::Fields(&JOB_ID), ret: None, handler: handler!(job_cancel) },
    Command { name: "job-complete", args: Args::Fields(&JOB_ID), ret: None, handler: handler!(job_complete) },
    Command { name: "job-finalize", args: Args::Fields(&JOB_ID), ret: None, handler: handler!(job_finalize) },
    Command { name: "job-dismiss", args: Args::Fields(&JOB_ID), ret: None, handler: handler!(job_dismiss) },
    Command {
        name: "block-job-pause",
        args: Args::Fields(&BLOCK_JOB_DEVICE),
        ret: None,
        handler: handler!(block_job_pause),
    },
    Command {
        name: "block-job-resume",
        args: Args::Fields(&BLOCK_JOB_DEVICE),
        ret: None,
        handler: handler!(block_job_resume),
    },
    Command {
        name: "block-job-cancel",
        args: Args::Fields(&BLOCK_JOB_CANCEL),
        ret: None,
        handler: handler!(block_job_cancel),
    },
    Command {
        name: "block-job-complete",
        args: Args::Fields(&BLOCK_JOB_DEVICE),
        ret: None,
        handler: handler!(block_job_complete),
    },
    Command {
        name: "block-job-finalize",
        args: Args::Fields(&JOB_ID),
        ret: None,
        handler: handler!(block_job_finalize),
    },
    Command { name: "block-job-dismiss", args: Args::Fields(&JOB_ID), ret: None, handler: handler!(block_job_dismiss) },
    Command {
        name: "block-job-set-speed",
        args: Args::Fields(&BLOCK_JOB_SPEED),
        ret: None,
        handler: handler!(block_job_set_speed),
    },
    Command { name: "block-job-change", args: Args::Fields(&JOB_CHANGE), ret: None, handler: handler!(job_change) },
    Command {
        name: "migrate",
        args: Args::Fields(&[req("uri", Ty::Str), opt("detach", Ty::Bool), opt("resume", Ty::Bool)]),
        ret: None,
        handler: handler!(migrate),
    },
    Command { name: "migrate_cancel", args: Args::Fields(&[]), ret: None, handler: handler!(migrate_cancel) },
    // baton's first releases spelled it with a dash; kept as an alias.
    Command { name: "migrate-cancel", args: Args::Fields(&[]), ret: None, handler: handler!(migrate_cancel) },
    Command {
        name: "migrate-continue",
        args: Args::Fields(&[req("state", Ty::Enum(&["pre-switchover"]))]),
        ret: None,
        handler: handler!(migrate_continue),
    },
    Command {
        name: "migrate-set-capabilities",
        args: Args::Fields(&[req("capabilities", Ty::Array(&Ty::Obj(&MIG_CAP)))]),
        ret: None,
        handler: handler!(migrate_set_capabilities),
    },
    Command { name: "query-migrate", args: Args::Fields(&[]), ret: Some(&ANY_RET), handler: handler!(query_migrate) },
    Command {
        name: "query-migrate-capabilities",
        args: Args::Fields(&[]),
        ret: Some(&ANY_RET),
        handler: handler!(query_migrate_capabilities),
    },
    Command {
        name: "migrate-set-parameters",
        args: Args::Open(&MIG_PARAMS),
        ret: None,
        handler: handler!(migrate_set_parameters),
    },
    Command {
        name: "query-migrate-parameters",
        args: Args::Fields(&[]),
        ret: Some(&ANY_RET),
        handler: handler!(query_migrate_parameters),
    },
    Command {
        name: "x-baton-migrate-decide",
        args: Args::Fields(&MIG_DECIDE),
        ret: None,
        handler: handler!(migrate_decide),
    },
    Command { name: "x-baton-failpoint", args: Args::Fields(&FAILPOINT), ret: None, handler: handler!(failpoint) },
    Command { name: "stop", args: Args::Fields(&[]), ret: None, handler: handler!(stop) },
    Command { name: "cont", args: Args::Fields(&[]), ret: None, handler: handler!(cont) },
    Command { name: "query-status", args: Args::Fields(&[]), ret: Some(&STATUS_RET), handler: handler!(query_status) },
    Command {
        name: "x-baton-guest-stats",
        args: Args::Fields(&[]),
        ret: Some(&ANY_RET),
        handler: handler!(guest_stats),
    },
    Command {
        name: "x-baton-guest-verify",
        args: Args::Fields(&[opt("timeout-ms", Ty::Int)]),
        ret: Some(&ANY_RET),
        handler: handler!(guest_verify),
    },
];

pub fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Check arguments against the schema, then run the command.
pub async fn dispatch(d: &Arc<Daemon>, cmd: &'static Command, args: Map<String, Value>) -> Reply {
    match &cmd.args {
        Args::Fields(f) => check_fields(f, &args, "", false)?,
        Args::Open(f) => check_fields(f, &args, "", true)?,
    }
    (cmd.handler)(d.clone(), args).await
}

fn s(a: &Map<String, Value>, k: &str) -> String {
    a.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}
fn b(a: &Map<String, Value>, k: &str) -> Option<bool> {
    a.get(k).and_then(Value::as_bool)
}

async fn qmp_capabilities(_: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    // The greeting offers no capability (out-of-band execution is not implemented).
    if let Some(c) = a.get("enable").and_then(Value::as_array).and_then(|l| l.first()).and_then(Value::as_str) {
        return Err(QmpError::generic(format!("Capability {c} not available")));
    }
    Ok(json!({}))
}

async fn query_commands(_: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    Ok(Value::Array(COMMANDS.iter().map(|c| json!({"name": c.name})).collect()))
}

/// The QEMU version baton's QMP corresponds to, and baton's own in `package`.
pub fn version() -> Value {
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": format!("baton {}", env!("CARGO_PKG_VERSION"))})
}

async fn query_version(_: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    Ok(version())
}

async fn query_qmp_schema(_: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    let cmds: Vec<(&'static str, &Args, Option<&'static Ty>)> =
        COMMANDS.iter().map(|c| (c.name, &c.args, c.ret)).collect();
    Ok(introspect(&cmds, EVENTS))
}

async fn quit(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    d.request_quit_after_reply();
    Ok(json!({}))
}

async fn blockdev_add(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    if !a.contains_key("node-name") {
        return Err(QmpError::generic("'node-name' must be specified for the root node"));
    }
    d.graph.blockdev_add(&Value::Object(a)).await?;
    Ok(json!({}))
}

async fn blockdev_del(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.graph.blockdev_del(&s(&a, "node-name")).await?;
    Ok(json!({}))
}

async fn blockdev_set_active(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let node = a.get("node-name").and_then(Value::as_str);
    let active = b(&a, "active").unwrap_or(true);
    d.graph.set_active(node, active).await?;
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

async fn query_named_block_nodes(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let flat = b(&a, "flat").unwrap_or(false);
    // Newest first, as QEMU lists them.
    Ok(Value::Array(d.graph.nodes().iter().rev().map(|n| node_info(n, flat)).collect()))
}

fn bitmap_of(d: &Daemon, node: &str, name: &str) -> Result<Arc<DirtyBitmap>, QmpError> {
    let n = d.graph.find(node)?;
    n.bitmap(name).map_err(|_| QmpError::generic(format!("Dirty bitmap '{name}' not found")))
}

fn check_bitmap_name(name: &str) -> Result<(), QmpError> {
    if name.is_empty() {
        return Err(QmpError::generic("Bitmap name cannot be empty"));
    }
    if name.len() > 1023 {
        return Err(QmpError::generic("Bitmap name too long"));
    }
    Ok(())
}

fn bitmap_add_now(d: &Daemon, a: &Map<String, Value>) -> Result<(), QmpError> {
    let (node, name) = (s(a, "node"), s(a, "name"));
    check_bitmap_name(&name)?;
    if b(a, "persistent") == Some(true) {
        return Err(QmpError::generic("persistent bitmaps are not supported yet (baton has no qcow2)"));
    }
    let n = d.graph.find(&node)?;
    let granularity = match a.get("granularity") {
        None => None,
        Some(g) => match g.as_u64() {
            Some(g) if g.is_power_of_two() && g >= 512 => Some(g),
            _ => return Err(QmpError::generic("Granularity must be power of 2 and at least 512")),
        },
    };
    if n.bitmap(&name).is_ok() {
        return Err(QmpError::generic(format!("Bitmap already exists: {name}")));
    }
    d.graph.bitmap_add(&node, &name, granularity, b(a, "disabled").unwrap_or(false))?;
    Ok(())
}

async fn bitmap_add(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    bitmap_add_now(&d, &a).map(|()| json!({}))
}

fn not_busy(bm: &DirtyBitmap) -> Result<(), QmpError> {
    if bm.is_busy() {
        return Err(QmpError::generic(format!(
            "Bitmap '{}' is currently in use by another operation and cannot be used",
            bm.name()
        )));
    }
    Ok(())
}

async fn bitmap_remove(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let bm = bitmap_of(&d, &s(&a, "node"), &s(&a, "name"))?;
    not_busy(&bm)?;
    d.graph.bitmap_remove(&s(&a, "node"), &s(&a, "name"))?;
    Ok(json!({}))
}

async fn bitmap_clear(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let bm = bitmap_of(&d, &s(&a, "node"), &s(&a, "name"))?;
    not_busy(&bm)?;
    bm.clear();
    Ok(json!({}))
}

async fn bitmap_enable(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let bm = bitmap_of(&d, &s(&a, "node"), &s(&a, "name"))?;
    not_busy(&bm)?;
    bm.set_enabled(true);
    Ok(json!({}))
}

async fn bitmap_disable(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let bm = bitmap_of(&d, &s(&a, "node"), &s(&a, "name"))?;
    not_busy(&bm)?;
    bm.set_enabled(false);
    Ok(json!({}))
}

/// The sources of a merge: names on `node`, or `{node, name}` anywhere.
fn merge_sources(d: &Daemon, node: &str, list: &[Value]) -> Result<Vec<Arc<DirtyBitmap>>, QmpError> {
    list.iter()
        .map(|v| match v {
            Value::String(name) => bitmap_of(d, node, name),
            Value::Object(o) => bitmap_of(d, &s(o, "node"), &s(o, "name")),
            _ => Err(QmpError::generic("Invalid parameter type for 'bitmaps', expected: string or object")),
        })
        .collect()
}

async fn bitmap_merge(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let node = s(&a, "node");
    let target = bitmap_of(&d, &node, &s(&a, "target"))?;
    not_busy(&target)?;
    let sources =
        merge_sources(&d, &node, a.get("bitmaps").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default())?;
    // Check every source first so that a bad one changes nothing.
    for src in &sources {
        if src.size() != target.size() {
            return Err(QmpError::generic(format!(
                "Bitmap '{}' is of a different size than '{}'",
                src.name(),
                target.name()
            )));
        }
    }
    for src in &sources {
        target.merge_from(src).map_err(|e| QmpError::generic(e.to_string()))?;
    }
    Ok(json!({}))
}

async fn bitmap_sha256(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    use sha2::Digest;
    let bm = bitmap_of(&d, &s(&a, "node"), &s(&a, "name"))?;
    let mut h = sha2::Sha256::new();
    for w in bm.snapshot_bits() {
        h.update(w.to_le_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(json!({"sha256": hex}))
}

async fn nbd_server_start(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    if a.contains_key("tls-creds") || a.contains_key("tls-authz") {
        return Err(QmpError::generic("TLS is not supported yet"));
    }
    let addr = a.get("addr").cloned().unwrap_or(Value::Null);
    let data = addr.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
    let addr = match addr.get("type").and_then(Value::as_str) {
        Some("inet") => {
            static F: Ty = Ty::Obj(&INET);
            check_value(&F, &Value::Object(data.clone()), "addr.data")?;
            NbdAddr::Inet { host: s(&data, "host"), port: s(&data, "port") }
        }
        Some("unix") => {
            static F: Ty = Ty::Obj(&UNIX);
            check_value(&F, &Value::Object(data.clone()), "addr.data")?;
            NbdAddr::Unix { path: s(&data, "path").into() }
        }
        Some(other) => return Err(QmpError::generic(format!("address type '{other}' is not supported"))),
        None => return Err(QmpError::generic("Parameter 'addr.type' is missing")),
    };
    let max = match a.get("max-connections") {
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

async fn nbd_server_stop(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    d.nbd_stop().await?;
    Ok(json!({}))
}

async fn block_export_add(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    if s(&a, "type") != "nbd" {
        return Err(QmpError::generic(format!("export type '{}' is not supported", s(&a, "type"))));
    }
    let node = s(&a, "node-name");
    let mut bitmaps = Vec::new();
    for v in a.get("bitmaps").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
        match v {
            Value::String(n) => bitmaps.push(n.clone()),
            Value::Object(o) if s(o, "node") == node => bitmaps.push(s(o, "name")),
            Value::Object(_) => return Err(QmpError::generic("exporting a bitmap of another node is not supported")),
            _ => {}
        }
    }
    let writable = b(&a, "writable").unwrap_or(false);
    for name in &bitmaps {
        let bm = bitmap_of(&d, &node, name).map_err(|_| QmpError::generic(format!("Bitmap '{name}' is not found")))?;
        not_busy(&bm)?;
        if !writable && bm.is_enabled() {
            return Err(QmpError::generic(format!("Enabled bitmap '{name}' incompatible with readonly export")));
        }
    }
    let config = ExportConfig {
        name: a.get("name").and_then(Value::as_str).unwrap_or(&node).to_string(),
        description: s(&a, "description"),
        node: node.clone(),
        writable,
        bitmaps,
        allocation_depth: b(&a, "allocation-depth").unwrap_or(false),
        allow_inactive: b(&a, "allow-inactive").unwrap_or(false),
        // QEMU 10 advertises multi-conn on every NBD export of qemu-storage-daemon.
        multi_conn: b(&a, "x-baton-multi-conn").unwrap_or(true),
        id: s(&a, "id"),
    };
    d.export_add(config).await?;
    Ok(json!({}))
}

async fn block_export_del(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.export_del(&s(&a, "id"), a.get("mode").and_then(Value::as_str) == Some("hard")).await?;
    Ok(json!({}))
}

async fn query_block_exports(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    Ok(Value::Array(
        d.exports()
            .await
            .iter()
            // The node the export uses now (a mirror's pivot may have moved it).
            .map(|e| json!({"node-name": e.backend.node().name(), "shutting-down": e.is_closing(), "type": "nbd", "id": e.config.id}))
            .collect(),
    ))
}

async fn blkdebug_set_rules(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let node = d.graph.find(&s(&a, "node-name"))?;
    let dbg =
        node.blkdebug().ok_or_else(|| QmpError::generic(format!("node '{}' is not a blkdebug node", node.name())))?;
    let parse = |k: &str| -> Result<Value, QmpError> { Ok(a.get(k).cloned().unwrap_or(json!([]))) };
    let errors =
        serde_json::from_value(parse("inject-error")?).map_err(|e| QmpError::generic(format!("inject-error: {e}")))?;
    let delays = serde_json::from_value(parse("x-baton-inject-delay")?)
        .map_err(|e| QmpError::generic(format!("x-baton-inject-delay: {e}")))?;
    dbg.set_rules(errors, delays);
    Ok(json!({}))
}

/// One prepared transaction action and how to undo it.
enum Undo {
    Remove { node: String, name: String },
    Reinsert { node: String, bitmap: Arc<DirtyBitmap> },
    Restore { bitmap: Arc<DirtyBitmap>, copy: DirtyBitmap },
    Enabled { bitmap: Arc<DirtyBitmap>, was: bool },
}

fn copy_of(bm: &DirtyBitmap) -> Result<DirtyBitmap, QmpError> {
    let c = DirtyBitmap::new(bm.name(), bm.size(), bm.granularity()).map_err(|e| QmpError::generic(e.to_string()))?;
    c.merge_from(bm).map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(c)
}

fn apply_action(d: &Daemon, kind: &str, a: &Map<String, Value>) -> Result<Undo, QmpError> {
    match kind {
        "block-dirty-bitmap-add" => {
            check_fields(&BITMAP_ADD, a, "", false)?;
            bitmap_add_now(d, a)?;
            Ok(Undo::Remove { node: s(a, "node"), name: s(a, "name") })
        }
        "block-dirty-bitmap-merge" => {
            check_fields(&BITMAP_MERGE, a, "", false)?;
            let node = s(a, "node");
            let target = bitmap_of(d, &node, &s(a, "target"))?;
            not_busy(&target)?;
            let sources = merge_sources(
                d,
                &node,
                a.get("bitmaps").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default(),
            )?;
            // Check every source before changing anything.
            for src in &sources {
                if src.size() != target.size() {
                    return Err(QmpError::generic(format!(
                        "Bitmap '{}' is of a different size than '{}'",
                        src.name(),
                        target.name()
                    )));
                }
            }
            let copy = copy_of(&target)?;
            for src in &sources {
                target.merge_from(src).map_err(|e| QmpError::generic(e.to_string()))?;
            }
            Ok(Undo::Restore { bitmap: target, copy })
        }
        _ => {
            check_fields(&BITMAP_REF, a, "", false)?;
            let bm = bitmap_of(d, &s(a, "node"), &s(a, "name"))?;
            not_busy(&bm)?;
            match kind {
                "block-dirty-bitmap-remove" => {
                    d.graph.bitmap_remove(&s(a, "node"), &s(a, "name"))?;
                    Ok(Undo::Reinsert { node: s(a, "node"), bitmap: bm })
                }
                "block-dirty-bitmap-clear" => {
                    let copy = copy_of(&bm)?;
                    bm.clear();
                    Ok(Undo::Restore { bitmap: bm, copy })
                }
                "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => {
                    let was = bm.is_enabled();
                    bm.set_enabled(kind == "block-dirty-bitmap-enable");
                    Ok(Undo::Enabled { bitmap: bm, was })
                }
                other => Err(QmpError::generic(format!("transaction action '{other}' is not supported"))),
            }
        }
    }
}

fn undo(d: &Daemon, u: Undo) {
    match u {
        Undo::Remove { node, name } => {
            let _ = d.graph.bitmap_remove(&node, &name);
        }
        Undo::Reinsert { node, bitmap } => {
            let _ = d.graph.bitmap_insert(&node, bitmap);
        }
        // OR the saved bits back rather than clear first: writes made since the
        // action must stay recorded (a bit too many is safe, one too few is not).
        Undo::Restore { bitmap, copy } => {
            let _ = bitmap.merge_from(&copy);
        }
        Undo::Enabled { bitmap, was } => bitmap.set_enabled(was),
    }
}

/// `transaction`: every action or none (the graph is locked for the whole of it).
async fn transaction(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let actions = a.get("actions").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut done: Vec<Undo> = Vec::with_capacity(actions.len());
    for act in &actions {
        let kind = act.get("type").and_then(Value::as_str).unwrap_or_default();
        let data = act.get("data").and_then(Value::as_object).cloned();
        let res = match data {
            Some(data) => apply_action(&d, kind, &data),
            None => Err(QmpError::generic("Invalid parameter type for 'data', expected: object")),
        };
        match res {
            Ok(u) => done.push(u),
            Err(e) => {
                for u in done.into_iter().rev() {
                    undo(&d, u);
                }
                return Err(e);
            }
        }
    }
    Ok(json!({}))
}

/// Classes for errors raised before dispatch.
pub fn not_found(name: &str) -> QmpError {
    QmpError::new(ErrorClass::CommandNotFound, format!("The command {name} has not been found"))
}

// ---- jobs ----

fn job_err(e: jobs::JobError) -> QmpError {
    QmpError::generic(e.to_string())
}

fn on_error(a: &Map<String, Value>, k: &str) -> Result<jobs::mirror::OnError, QmpError> {
    use jobs::mirror::OnError;
    match a.get(k).and_then(Value::as_str).unwrap_or("report") {
        "report" => Ok(OnError::Report),
        "ignore" => Ok(OnError::Ignore),
        "stop" => Ok(OnError::Stop),
        // QEMU maps these for mirror: enospc/auto stop on ENOSPC else report; baton reports.
        "enospc" | "auto" => Ok(OnError::Report),
        other => Err(QmpError::generic(format!("Parameter '{k}' does not accept value '{other}'"))),
    }
}

async fn blockdev_mirror(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    use jobs::mirror::{CopyMode, MirrorOptions, SyncMode};
    let device = s(&a, "device");
    let id = a.get("job-id").and_then(Value::as_str).map(String::from).unwrap_or_else(|| device.clone());
    let sync = match s(&a, "sync").as_str() {
        "full" => SyncMode::Full,
        "top" => SyncMode::Top,
        "none" => SyncMode::None,
        other => return Err(QmpError::generic(format!("sync mode '{other}' is not supported for mirror"))),
    };
    if a.contains_key("replaces") || a.contains_key("filter-node-name") {
        return Err(QmpError::generic("'replaces' and 'filter-node-name' are not supported yet"));
    }
    let mut m = MirrorOptions::new(&device, &s(&a, "target"));
    m.sync = sync;
    if let Some(g) = a.get("granularity").and_then(Value::as_u64) {
        m.granularity = g;
    }
    if let Some(bs) = a.get("buf-size").and_then(Value::as_u64) {
        m.buf_size = bs;
    }
    m.copy_mode = if a.get("copy-mode").and_then(Value::as_str) == Some("write-blocking") {
        CopyMode::WriteBlocking
    } else {
        CopyMode::Background
    };
    m.on_source_error = on_error(&a, "on-source-error")?;
    m.on_target_error = on_error(&a, "on-target-error")?;
    m.auto_converge = b(&a, "x-baton-auto-converge").unwrap_or(false);
    if let Some(ms) = a.get("x-baton-converge-after-ms").and_then(Value::as_u64) {
        m.converge_after = std::time::Duration::from_millis(ms);
    }
    let speed = match a.get("speed") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| QmpError::generic("Parameter 'speed' expects a non-negative value"))?,
    };
    let job = jobs::JobOptions {
        id,
        speed,
        auto_finalize: b(&a, "auto-finalize").unwrap_or(true),
        auto_dismiss: b(&a, "auto-dismiss").unwrap_or(true),
    };
    jobs::mirror::start(&d.graph, &d.jobs, job, m).map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({}))
}

async fn query_jobs(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    Ok(d.jobs.query_jobs())
}

async fn query_block_jobs(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    Ok(d.jobs.query_block_jobs())
}

async fn job_pause(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.jobs.pause(&s(&a, "id")).map_err(job_err).map(|()| json!({}))
}

async fn job_resume(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.jobs.resume(&s(&a, "id")).map_err(job_err).map(|()| json!({}))
}

async fn job_cancel(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    // job-cancel is always a hard cancel (QEMU: force for mirror).
    d.jobs.cancel(&s(&a, "id"), true).map_err(job_err).map(|()| json!({}))
}

async fn job_complete(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.jobs.complete(&s(&a, "id")).map_err(job_err).map(|()| json!({}))
}

async fn job_finalize(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.jobs.finalize(&s(&a, "id")).map_err(job_err).map(|()| json!({}))
}

async fn job_dismiss(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.jobs.dismiss(&s(&a, "id")).map_err(job_err).map(|()| json!({}))
}

fn block_job_not_found(device: &str) -> QmpError {
    QmpError::new(ErrorClass::DeviceNotActive, format!("Block job '{device}' not found"))
}

async fn block_job_pause(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let id = s(&a, "device");
    d.jobs.find(&id).map_err(|_| block_job_not_found(&id))?;
    d.jobs.pause(&id).map_err(job_err).map(|()| json!({}))
}

async fn block_job_resume(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let id = s(&a, "device");
    d.jobs.find(&id).map_err(|_| block_job_not_found(&id))?;
    d.jobs.resume(&id).map_err(job_err).map(|()| json!({}))
}

async fn block_job_cancel(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let id = s(&a, "device");
    d.jobs.find(&id).map_err(|_| block_job_not_found(&id))?;
    d.jobs.cancel(&id, b(&a, "force").unwrap_or(false)).map_err(job_err).map(|()| json!({}))
}

async fn block_job_complete(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let id = s(&a, "device");
    let job = d.jobs.find(&id).map_err(|_| block_job_not_found(&id))?;
    if job.status() != jobs::Status::Ready {
        return Err(QmpError::generic(format!("The active block job '{id}' cannot be completed")));
    }
    d.jobs.complete(&id).map_err(job_err).map(|()| json!({}))
}

async fn block_job_finalize(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let id = s(&a, "id");
    d.jobs.find(&id).map_err(|_| block_job_not_found(&id))?;
    d.jobs.finalize(&id).map_err(job_err).map(|()| json!({}))
}

async fn block_job_dismiss(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let id = s(&a, "id");
    d.jobs.find(&id).map_err(|_| block_job_not_found(&id))?;
    d.jobs.dismiss(&id).map_err(job_err).map(|()| json!({}))
}

async fn block_job_set_speed(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let id = s(&a, "device");
    d.jobs.find(&id).map_err(|_| block_job_not_found(&id))?;
    let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
    d.jobs.set_speed(&id, speed).map_err(job_err).map(|()| json!({}))
}

async fn job_change(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.jobs.change(&s(&a, "id"), &a).map_err(job_err).map(|()| json!({}))
}

// ---- the guest ----

fn the_vm(d: &Daemon) -> Result<Arc<vmm::Vm>, QmpError> {
    d.vm().ok_or_else(|| QmpError::generic("there is no guest: start baton daemon with --vm"))
}

async fn stop(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    let vm = the_vm(&d)?;
    if vm.state() == vmm::RunState::InMigrate {
        return Err(QmpError::generic("the guest is waiting for an incoming migration"));
    }
    vm.stop().await.map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({}))
}

async fn cont(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    let vm = the_vm(&d)?;
    // I8: a prepared destination cannot know whether the source committed.
    if matches!(d.migration.handover(), vmm::migration::Handover::Prepared | vmm::migration::Handover::DecisionUnknown)
        && d.migration.role() == Some(vmm::migration::Role::Destination)
    {
        return Err(QmpError::generic(format!("cannot run the guest: {}", vmm::migration::VerbError::PreparedWaiting)));
    }
    // The source's switchover owns a stopped guest (pre-switchover, device): a
    // `cont` there would run it on disks being handed over.
    let status = d.migration.status();
    if d.migration.role() == Some(vmm::migration::Role::Source)
        && matches!(
            status,
            vmm::migration::Status::PreSwitchover | vmm::migration::Status::Device | vmm::migration::Status::Cancelling
        )
    {
        return Err(QmpError::generic(format!(
            "cannot run the guest while its migration is in '{}': use migrate-continue or migrate_cancel",
            status.as_str()
        )));
    }
    vm.cont().await.map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({}))
}

async fn query_status(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    let vm = the_vm(&d)?;
    let st = vm.state();
    let mut v = json!({"running": st == vmm::RunState::Running, "status": st.as_str()});
    if let (Some(Value::Object(extra)), Some(o)) = (d.migration.status_extra(), v.as_object_mut()) {
        o.extend(extra);
    }
    Ok(v)
}

async fn guest_stats(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    let vm = the_vm(&d)?;
    let s = vm.stats();
    let dev = vm.device();
    Ok(json!({
        "writes": s.writes, "checks": s.checks, "mismatches": s.mismatches, "io-errors": s.io_errors,
        "batches": s.batches, "last-bad-block": s.last_bad_block, "blocks": dev.blocks(),
        "device-completed": dev.completed.load(std::sync::atomic::Ordering::SeqCst),
        "device-errors": dev.errors.load(std::sync::atomic::Ordering::SeqCst),
        "device-last-error": dev.last_error(), "status": vm.state().as_str(),
    }))
}

async fn guest_verify(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let vm = the_vm(&d)?;
    let ms = a.get("timeout-ms").and_then(Value::as_u64).unwrap_or(120_000);
    let r = vm.verify(std::time::Duration::from_millis(ms)).await.map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({"checked": r.checked, "mismatches": r.bad, "request": r.request}))
}

// ---- migration ----

async fn migrate(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    if b(&a, "resume") == Some(true) {
        return Err(QmpError::generic("resuming a postcopy migration is not supported"));
    }
    d.migrate(&s(&a, "uri"))?;
    Ok(json!({}))
}

fn mig_err(e: vmm::migration::VerbError) -> QmpError {
    QmpError::generic(e.to_string())
}

async fn migrate_cancel(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    d.migration.cancel().map_err(mig_err)?;
    Ok(json!({}))
}

async fn migrate_continue(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    d.migration.proceed().map_err(mig_err)?;
    Ok(json!({}))
}

async fn migrate_set_capabilities(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let caps: Vec<(String, bool)> = a
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|c| {
                    (
                        c.get("capability").and_then(Value::as_str).unwrap_or_default().to_string(),
                        c.get("state").and_then(Value::as_bool).unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    d.migration.set_capabilities(&caps).map_err(mig_err)?;
    Ok(json!({}))
}

async fn query_migrate_capabilities(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    Ok(d.migration.query_capabilities())
}

async fn migrate_set_parameters(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.migration.set_parameters(&a).map_err(mig_err)?;
    Ok(json!({}))
}

async fn query_migrate_parameters(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    Ok(Value::Object(d.migration.params().to_json()))
}

async fn query_migrate(d: Arc<Daemon>, _: Map<String, Value>) -> Reply {
    let total = d.vm().map(|v| v.config().memory).unwrap_or(0);
    let mut v = d.migration.query(total);
    let held = vmm::migration::points::held();
    if !held.is_empty() {
        v["x-baton-held"] = json!(held);
    }
    Ok(v)
}

/// `x-baton-migrate-decide`: the operator resolves a prepared destination
/// whose source's decision was lost (commit when the source is postmigrate).
async fn migrate_decide(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let decision = match s(&a, "decision").as_str() {
        "commit" => vmm::migration::Decision::Commit,
        _ => vmm::migration::Decision::Abort,
    };
    d.migration.decide(decision).map_err(mig_err)?;
    Ok(json!({}))
}

/// `x-baton-failpoint`: configure (or, with actions "off", remove) a
/// failpoint at run time; only in builds with the `failpoints` feature.
async fn failpoint(_d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    let (name, actions) = (s(&a, "name"), s(&a, "actions"));
    if !fail::has_failpoints() {
        return Err(QmpError::generic("this build has no failpoints (feature failpoints)"));
    }
    if actions == "off" {
        fail::remove(&name);
        return Ok(json!({}));
    }
    fail::cfg(name, &actions).map_err(QmpError::generic)?;
    Ok(json!({}))
}
