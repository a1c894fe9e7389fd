//! `raw`: the format layer libvirt and QEMU stack over `file`. Without
//! `offset`/`size` it passes requests through unchanged; with them it exposes
//! a window of its child.

use crate::error::{BlockError, Result};

#[derive(Debug, Clone, Copy)]
pub struct RawFilter {
    /// Start of the window in the child.
    pub offset: u64,
    /// Size of the window, or the child's size minus `offset` when `None`.
    pub size: Option<u64>,
}

impl RawFilter {
    /// Checks the window against the child's length at open time.
    pub fn new(node: &str, offset: u64, size: Option<u64>, child_len: u64) -> Result<Self> {
        let end = offset.checked_add(size.unwrap_or(0));
        match end {
            Some(end) if offset <= child_len && end <= child_len => Ok(Self { offset, size }),
            _ => Err(BlockError::InvalidOption {
                option: "offset".into(),
                reason: format!(
                    "the window offset {offset} size {} does not fit in the {child_len}-byte child of '{node}'",
                    size.map(|s| s.to_string()).unwrap_or_else(|| "(rest)".into())
                ),
            }),
        }
    }

    /// This node's length given the child's.
    pub fn length(&self, child_len: u64) -> u64 {
        match self.size {
            Some(s) => s,
            None => child_len.saturating_sub(self.offset),
        }
    }

    /// The child offset for a request at `offset` (bounds were checked against `length`).
    pub fn map(&self, offset: u64) -> u64 {
        offset.saturating_add(self.offset)
    }
}
