//! `raw`: the format layer libvirt and QEMU stack over `file`. Without
//! `offset`/`size` it passes requests through unchanged; with them it exposes
//! a window of its child.

use std::any::Any;

use crate::driver::{Driver, Filter, OpenCtx, Opened};
use crate::error::{BlockError, Result};

crate::qapi_struct! {
    /// QEMU's `BlockdevOptionsRaw` (the child, `file`, is the graph's).
    pub struct BlockdevOptionsRaw {
        "offset" offset: Option<u64>,
        "size" size: Option<u64>,
    }
}

/// The `raw` driver.
#[derive(Debug)]
pub struct RawBdrv;

impl Driver for RawBdrv {
    const NAME: &'static str = "raw";
    const CHILD: Option<&'static str> = Some("file");
    type Options = BlockdevOptionsRaw;
    async fn open<'a>(&'a self, ctx: OpenCtx<'a>, o: BlockdevOptionsRaw) -> Result<Opened> {
        let child_len = ctx.child.map(|c| c.length()).unwrap_or(0);
        let raw = RawFilter::new(ctx.node_name, o.offset.unwrap_or(0), o.size, child_len)?;
        Ok(Opened::Filter(Box::new(raw)))
    }
}

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
}

impl Filter for RawFilter {
    fn driver_name(&self) -> &'static str {
        "raw"
    }
    fn length(&self, child_len: u64) -> u64 {
        match self.size {
            Some(s) => s,
            None => child_len.saturating_sub(self.offset),
        }
    }
    fn map(&self, offset: u64) -> u64 {
        offset.saturating_add(self.offset)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
