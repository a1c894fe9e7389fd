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

use block::schema::{Qapi, Ty};
use block::Node;
use serde_json::{json, Value};

use super::error::{ErrorClass, QmpError};
use super::{NoArgs, Reply};
use crate::daemon::Daemon;

block::qapi_enum! {
    /// YankInstanceType.
    pub enum YankInstanceType { "block-node" BlockNode, "chardev" Chardev, "migration" Migration }
}

block::qapi_struct! {
    /// QEMU's YankInstance, flattened (the members of each type are checked
    /// by [`check_members`]): `type`, plus `node-name` for `block-node` or
    /// `id` for `chardev`.
    pub struct YankInstance {
        "type" kind: YankInstanceType,
        "node-name" node_name: Option<String>,
        "id" id: Option<String>,
    }
}

block::qapi_struct! {
    /// `yank`'s arguments.
    pub struct Yank {
        "instances" instances: Vec<YankInstance>,
    }
}

/// `query-yank`'s return type.
pub fn query_yank_ret() -> Ty {
    Ty::Array(Box::new(YankInstance::ty()))
}

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

/// The members an instance of its type must have and may have, checked as
/// QEMU's union visitor does: `path` is `instances[N]`.
fn check_members(i: &YankInstance, path: &str) -> Result<(), QmpError> {
    let wanted: &[&str] = match i.kind {
        YankInstanceType::BlockNode => &["node-name"],
        YankInstanceType::Chardev => &["id"],
        YankInstanceType::Migration => &[],
    };
    for (k, present) in [("node-name", i.node_name.is_some()), ("id", i.id.is_some())] {
        match (present, wanted.contains(&k)) {
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

/// Find the instance `i` names.
fn resolve(d: &Daemon, i: &YankInstance, path: &str) -> Result<Target, QmpError> {
    check_members(i, path)?;
    match (i.kind, &i.node_name) {
        (YankInstanceType::BlockNode, Some(name)) => {
            d.graph.find(name).ok().filter(|n| yankable(n)).map(Target::Node).ok_or_else(not_found)
        }
        (YankInstanceType::Migration, _) if d.migration.yankable() => Ok(Target::Migration),
        // baton has no character devices.
        _ => Err(not_found()),
    }
}

/// `yank`: cut every named connection, or none if one of them does not exist.
pub(super) async fn yank(d: Arc<Daemon>, a: Yank) -> Reply {
    let mut nodes = Vec::with_capacity(a.instances.len());
    for (i, inst) in a.instances.iter().enumerate() {
        nodes.push(resolve(&d, inst, &format!("instances[{i}]"))?);
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
pub(super) async fn query_yank(d: Arc<Daemon>, _: NoArgs) -> Reply {
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

    /// [`check_members`] on an instance as a client sends it.
    fn check(v: Value, path: &str) -> Result<(), QmpError> {
        check_members(&block::schema::parse::<YankInstance>(v).unwrap(), path)
    }

    #[test]
    fn each_instance_type_has_exactly_its_own_members() {
        assert!(check(json!({"type": "block-node", "node-name": "n"}), "instances[0]").is_ok());
        assert!(check(json!({"type": "chardev", "id": "c"}), "instances[0]").is_ok());
        assert!(check(json!({"type": "migration"}), "instances[0]").is_ok());
        let e = check(json!({"type": "block-node"}), "instances[2]").unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[2].node-name' is missing");
        let e = check(json!({"type": "block-node", "node-name": "n", "id": "x"}), "instances[0]").unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[0].id' is unexpected");
        let e = check(json!({"type": "migration", "node-name": "n"}), "instances[1]").unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[1].node-name' is unexpected");
        let e = check(json!({"type": "chardev"}), "instances[0]").unwrap_err();
        assert_eq!(e.desc, "Parameter 'instances[0].id' is missing");
    }
}
