//! The QMP control plane: QEMU's wire protocol, command names and argument
//! names, so that `qemu.qmp`, qmp-shell and libvirt-style clients work
//! unchanged.
//!
//! Each command's arguments are a Rust type declared with
//! [`block::qapi_struct!`], which gives both the typed struct the handler
//! receives and the schema that checks the arguments and that introspection
//! lists; the table ([`table::COMMANDS`]) is built from those types. The
//! handlers live by domain: [`control`], [`block`], [`bitmap`], [`nbd`],
//! [`jobs`], [`migration`], [`guest`] and [`yank`].

pub mod bitmap;
pub mod block;
pub mod control;
pub mod error;
pub mod guest;
pub mod jobs;
pub mod migration;
pub mod monitor;
pub mod nbd;
pub mod schema;
pub mod table;
mod yank;

use ::block::schema::{Qapi, QapiObject, Ty};
use serde_json::{Number, Value};

use error::QmpError;

/// What a command returns.
pub type Reply = Result<Value, QmpError>;

/// A QAPI integer argument, kept as the client sent it: the handler decides
/// the range it accepts, and its error for a value out of it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct Int(Number);

impl Int {
    pub fn as_u64(&self) -> Option<u64> {
        self.0.as_u64()
    }
    pub fn as_i64(&self) -> Option<i64> {
        self.0.as_i64()
    }
}

impl Qapi for Int {
    fn ty() -> Ty {
        Ty::Int
    }
}

::block::qapi_struct! {
    /// No arguments.
    pub struct NoArgs {}
}

::block::qapi_struct! {
    /// QAPI's BlockDirtyBitmap: a bitmap named by its node and its name.
    pub struct BlockDirtyBitmap {
        "node" node: String,
        "name" name: String,
    }
}

/// QAPI's BlockDirtyBitmapOrStr: a bitmap's name (on a node the command
/// implies) or a [`BlockDirtyBitmap`].
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum BitmapOrStr {
    Name(String),
    Bitmap(BlockDirtyBitmap),
}

impl Qapi for BitmapOrStr {
    fn ty() -> Ty {
        Ty::StrOrObj(BlockDirtyBitmap::fields())
    }
}

/// Check `v` against `T`'s schema, naming members from `path` (a nested
/// object whose type the handler picks, e.g. `addr.data`), then decode it.
pub fn parse_at<T: QapiObject>(v: Value, path: &str) -> Result<T, QmpError> {
    ::block::schema::check(&T::ty(), &v, path)?;
    serde_json::from_value(v).map_err(|e| QmpError::generic(format!("Invalid parameter: {e}")))
}
