//! Built-in drivers, named as in QEMU's `blockdev-add`.

pub mod blkdebug;
pub mod file;
pub mod null;
pub mod raw;
