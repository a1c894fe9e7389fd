//! The monitor's own commands: capabilities negotiation, what the monitor
//! offers (`query-commands`, `query-version`, `query-qmp-schema`), `quit`.

use std::sync::Arc;

use block::schema::{Field, Ty};
use serde_json::{json, Value};

use super::error::QmpError;
use super::table::{command_infos, events, COMMANDS};
use super::{Int, NoArgs, Reply};
use crate::daemon::Daemon;

block::qapi_enum! {
    /// QMPCapability.
    pub enum QmpCapability { "oob" Oob }
}

block::qapi_struct! {
    pub struct QmpCapabilities {
        "enable" enable: Option<Vec<QmpCapability>>,
    }
}

pub async fn qmp_capabilities(_: Arc<Daemon>, a: QmpCapabilities) -> Reply {
    // The greeting offers no capability (out-of-band execution is not implemented).
    if let Some(c) = a.enable.as_deref().and_then(<[_]>::first) {
        return Err(QmpError::generic(format!("Capability {} not available", c.as_str())));
    }
    Ok(json!({}))
}

/// A return type of anything.
pub fn any() -> Ty {
    Ty::Any
}

/// A return type of a list of anything.
pub fn any_list() -> Ty {
    Ty::Array(Box::new(Ty::Any))
}

pub fn query_commands_ret() -> Ty {
    Ty::Array(Box::new(Ty::Obj(vec![Field::of::<String>("name")])))
}

pub async fn query_commands(_: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(Value::Array(COMMANDS.iter().map(|c| json!({"name": c.name})).collect()))
}

/// The QEMU version baton's QMP corresponds to, and baton's own in `package`.
pub fn version() -> Value {
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": format!("baton {}", env!("CARGO_PKG_VERSION"))})
}

pub fn query_version_ret() -> Ty {
    let triple = Ty::Obj(vec![Field::of::<Int>("major"), Field::of::<Int>("minor"), Field::of::<Int>("micro")]);
    Ty::Obj(vec![Field { name: "qemu", ty: triple, optional: false }, Field::of::<String>("package")])
}

pub async fn query_version(_: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(version())
}

pub async fn query_qmp_schema(_: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(super::schema::introspect(&command_infos(), &events()))
}

pub async fn quit(d: Arc<Daemon>, _: NoArgs) -> Reply {
    d.request_quit_after_reply();
    Ok(json!({}))
}
