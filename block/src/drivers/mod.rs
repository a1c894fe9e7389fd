//! Built-in drivers, named as in QEMU's `blockdev-add`, and the registry.
//!
//! A driver is one module: its options declared with `qapi_struct!`, its
//! runtime (a [`LeafDriver`](crate::driver::LeafDriver) or a
//! [`Filter`](crate::driver::Filter)), and a [`Driver`](crate::driver::Driver)
//! value that opens one from the other. The registry below lists them, one
//! line each, and gives [`builtin`] and [`Leaf`]; drivers from other crates
//! (the NBD client) implement the same [`Driver`](crate::driver::Driver) and
//! are added with [`Graph::register`](crate::Graph::register).

pub mod blkdebug;
pub mod file;
pub mod null;
pub mod raw;

// The registry: one line a driver. A leaf that must not allocate per request
// (everything on the NBD hot path) goes under `leaves`, as the variant of
// `Leaf` that calls it without boxing, its runtime type, and its description;
// every other driver (filters, leaves that may box) under `others`.
crate::driver::registry! {
    leaves {
        File(file::FileDriver) = file::FileBdrv,
        Null(null::NullDriver) = null::NullBdrv,
    }
    others {
        raw::RawBdrv,
        blkdebug::BlkdebugBdrv,
    }
}
