//! QMP errors: QEMU's error classes and a human-readable `desc`.

use block::schema::SchemaError;
use serde_json::{json, Value};

/// QEMU's error classes (qapi/error.json) that baton raises. QEMU also
/// has KVMMissingCap; it joins when a command needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    /// A block job looked up by `device` does not exist.
    DeviceNotActive,
    /// A yank instance does not exist.
    DeviceNotFound,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        Self { class: ErrorClass::GenericError, desc: desc.into() }
    }

    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self { class, desc: desc.into() }
    }

    /// The one conversion of an error into a reply: a GenericError (QEMU
    /// reports the failures of its subsystems so) whose desc is the error
    /// and all of its sources, `a: b: c`.
    pub fn chain<E: std::error::Error>(e: E) -> Self {
        Self::generic(block::error::chain(&e))
    }

    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

/// `?` on the errors of the subsystems commands call: [`QmpError::chain`].
macro_rules! from_chain {
    ($($t:ty),* $(,)?) => {
        $(impl From<$t> for QmpError {
            fn from(e: $t) -> Self {
                QmpError::chain(e)
            }
        })*
    };
}
from_chain!(
    block::BlockError,
    block::bitmap::ActionError,
    crate::daemon::DaemonError,
    jobs::JobError,
    jobs::mirror::MirrorError,
    vmm::migration::VerbError,
    vmm::VmmError,
);

impl From<SchemaError> for QmpError {
    fn from(e: SchemaError) -> Self {
        QmpError::generic(e.0)
    }
}
