//! QMP `yank` and `query-yank` (QEMU 6.0, qapi/yank.json): recover from a
//! hung peer by cutting the connection at once instead of waiting for it.
//!
//! A yank instance is one of QEMU's three kinds:
//!
//! - `block-node`: an NBD client node (the node whose driver is `nbd`, as in
//!   QEMU; not a filter above it). Yanking shuts its socket down: every
//!   request in flight and every later one fails, nothing waits for the
//!   server, and there is no reconnect. The node stays until `blockdev-del`.
//! - `chardev`: baton has no character devices, so there is none to yank.
//! - `migration`: the attempt's connection is dropped and the attempt fails
//!   (`failed`, not `cancelled`, as in QEMU) and rolls back, on either side.
//!   It exists while an attempt runs before the commit point; a source past
//!   it, or a destination that is prepared, has nothing left to yank (the
//!   decision is what matters there: `x-baton-migrate-decide`).
//!
//! As in QEMU, every instance is looked up before any is yanked, and one that
//! does not exist fails the whole command with `DeviceNotFound`.
//!
//! Both commands run without waiting for the command lock (see
//! [`WITHOUT_COMMAND_LOCK`]): QEMU marks them `allow-oob` so that they work
//! while another command hangs on the very connection to be yanked; baton has
//! no out-of-band execution, so a second monitor connection gets the same.

use std::sync::Arc;

use block::Node;
use serde_json::{json, Map, Value};

use super::error::{ErrorClass, QmpError};
use super::schema::{opt, req, Field, Ty};
use crate::daemon::Daemon;

/// QEMU's YankInstance, flattened (the members of each type are checked by
/// [`yank`]): `type`, plus `node-name` for `block-node` or `id` for `chardev`.
pub(super) static INSTANCE: [Field; 3] =
    [req("type", Ty::Enum(&["block-node", "chardev", "migration"])), opt("node-name", Ty::Str), opt("id", Ty::Str)];
/// `yank`'s arguments.
pub(super) static YANK_ARGS: [Field; 1] = [req("instances", Ty::Array(&Ty::Obj(&INSTANCE)))];
/// `query-yank`'s return type.
pub(super) static QUERY_YANK_RET: Ty = Ty::Array(&Ty::Obj(&INSTANCE));

/// Commands the monitor runs without the command lock: they only cut
/// connections or list them, and must work while another command is stuck.
pub const WITHOUT_COMMAND_LOCK: [&str; 2] = ["yank", "query-yank"];

/// The node is a network client that a yank can cut (its driver has a remote
/// export: `nbd`).
fn yankable(n: &Node) -> bool {
    n.child().is_none() && n.remote_export().is_some()
}

fn not_found() -> QmpError {
    // QEMU's words and class (util/yank.c).
    QmpError::new(ErrorClass::DeviceNotFound, "Instance not found")
}

/// The members an instance of `kind` must have and may have, checked as
/// QEMU's union visitor does: `path` is `instances[N]`.
fn check_members(kind: &str, m: &Map<String, Value>, path: &str) -> Result<(), QmpError> {
    let wanted: &[&str] = match kind {
        "block-node" => &["node-name"],
        "chardev" => &["id"],
        _ => &[],
    };
    for k in ["node-name", "id"] {
        match (m.contains_key(k), wanted.contains(&k)) {
            (true, false) => return Err(QmpError::generic(format!("Parameter '{path}.{k}' is unexpected"))),
            (false, true) => return Err(QmpError::generic(format!("Parameter '{path}.{k}' is missing"))),
            _ => {}
        }
    }
    Ok(())
}

/// What one instance names.
enum Target {
    Node(Arc<Node>),
    Migration,
}

/// Find the instance `m` names (checked against the schema already).
fn resolve(d: &Daemon, m: &Map<String, Value>, path: &str) -> Result<Target, QmpError> {
    let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
    check_members(kind, m, path)?;
    match kind {
        "block-node" => {
            let name = m.get("node-name").and_then(Value::as_str).unwrap_or_default();
            d.graph.find(name).ok().filter(|n| yankable(n)).map(Target::Node).ok_or_else(not_found)
        }
        "migration" if d.migration.yankable() => Ok(Target::Migration),
        // baton has no character devices.
        _ => Err(not_found()),
    }
}

/// `yank`: cut every named connection, or none if one of them does not exist.
pub(super) async fn yank(d: Arc<Daemon>, a: Map<String, Value>) -> Result<Value, QmpError> {
    let list = a.get("instances").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut nodes = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let m = v.as_object().ok_or_else(|| {
            QmpError::generic(format!("Invalid parameter type for 'instances[{i}]', expected: object"))
        })?;
        nodes.push(resolve(&d, m, &format!("instances[{i}]"))?);
    }
    for t in nodes {
        match t {
            Target::Node(n) => {
                tracing::info!(node = n.name(), "yank");
                n.yank();
            }
            Target::Migration => {
                tracing::info!("yank of the migration");
                d.migration.yank();
            }
        }
    }
    Ok(json!({}))
}

/// `query-yank`: every instance `yank` accepts now.
pub(super) async fn query_yank(d: Arc<Daemon>, _: Map<String, Value>) -> Result<Value, QmpError> {
    let mut v: Vec<Value> = d
        .graph
        .nodes()
        .iter()
        .filter(|n| yankable(n))
        .map(|n| json!({"type": "block-node", "node-name": n.name()}))
        .collect();
    if d.migration.yankable() {
        v.push(json!({"type": "migration"}));
    }
    Ok(Value::Array(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn each_instance_type_has_exactly_its_own_members() {
        assert!(check_members("block-node", &members(json!({"type": "block-node", "node-name": "n"})), "instances[0]")
            .is_ok());
        assert!(check_members("chardev", &members(json!({"type": "chardev", "id": "c"})), "instances[0]").is_ok());
        assert!(check_members("migration", &members(json!({"type": "migration"})), "instances[0]").is_ok());
        let e = check_members("block-node", &members(json!({"type": "block-node"})), "instances[2]").unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[2].node-name' is missing");
        let e = check_members(
            "block-node",
            &members(json!({"type": "block-node", "node-name": "n", "id": "x"})),
            "instances[0]",
        )
        .unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[0].id' is unexpected");
        let e = check_members("migration", &members(json!({"type": "migration", "node-name": "n"})), "instances[1]")
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[1].node-name' is unexpected");
        let e = check_members("chardev", &members(json!({"type": "chardev"})), "instances[0]").unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[0].id' is missing");
    }
}
