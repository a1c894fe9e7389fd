//! Built-in drivers, named as in QEMU's `blockdev-add`, and the registry.
//!
//! A driver is one module: its options declared with `qapi_struct!`, its
//! runtime (a [`LeafDriver`](crate::driver::LeafDriver) or a
//! [`Filter`](crate::driver::Filter)), and a [`Driver`](crate::driver::Driver)
//! value that opens one from the other. [`builtin`] lists them, one line each;
//! drivers from other crates (the NBD client) implement the same
//! [`Driver`](crate::driver::Driver) and are added with
//! [`Graph::register`](crate::Graph::register). A leaf
//! that must not allocate per request (everything on the NBD hot path) is
//! also listed in `leaves!`, so that [`Leaf`] calls it without boxing.

use std::sync::Arc;

use crate::driver::BlockDriver;

pub mod blkdebug;
pub mod file;
pub mod null;
pub mod raw;

crate::driver::leaves! {
    File(file::FileDriver),
    Null(null::NullDriver),
}

/// Every built-in driver, one line each.
#[rustfmt::skip]
pub fn builtin() -> Vec<Arc<dyn BlockDriver>> {
    vec![
        Arc::new(file::FileBdrv),
        Arc::new(raw::RawBdrv),
        Arc::new(blkdebug::BlkdebugBdrv),
        Arc::new(null::NullBdrv),
    ]
}
