//! QMP errors: QEMU's error classes and a human-readable `desc`.

use block::BlockError;
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

    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

impl From<BlockError> for QmpError {
    fn from(e: BlockError) -> Self {
        // QEMU reports block-layer failures as GenericError.
        QmpError { class: ErrorClass::GenericError, desc: e.chain() }
    }
}

impl From<crate::daemon::DaemonError> for QmpError {
    fn from(e: crate::daemon::DaemonError) -> Self {
        QmpError::generic(crate::error_chain(&e))
    }
}
