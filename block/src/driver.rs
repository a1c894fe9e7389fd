//! The driver interface, split into small capabilities.
//!
//! A *leaf* driver owns storage (a file, memory, a remote NBD export) and
//! implements the capability traits below. A *filter* driver (`raw`,
//! `blkdebug`) has one child and only transforms a request on its way down
//! (shifts the offset, injects an error, delays it); the node layer walks the
//! chain of filters iteratively, so requests never recurse through boxed
//! futures and built-in drivers allocate nothing per request.
//!
//! Drivers that live in other crates (the NBD client) implement the same
//! traits and plug in through [`DynDriver`], whose futures are boxed.

use std::future::Future;
use std::pin::Pin;

use crate::buf::IoBuf;
use crate::error::Result;

/// Flags of a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the write completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) instead of written (NBD: no NO_HOLE).
    pub may_unmap: bool,
    /// Fail with `Unsupported` rather than fall back to writing zero buffers (NBD FAST_ZERO).
    pub fast: bool,
    /// Force unit access.
    pub fua: bool,
}

/// The allocation state of a run of bytes, as block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes (> 0).
    pub len: u64,
    /// The run is backed by storage (not a hole).
    pub data: bool,
    /// The run reads as zeroes.
    pub zero: bool,
}

/// What a driver can do natively; the node layer falls back or refuses the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// Write-zeroes without writing buffers (fallocate, a protocol command).
    pub native_zeroes: bool,
    /// Discard deallocates storage.
    pub discard: bool,
    /// Write-zeroes with `fast` can succeed.
    pub fast_zero: bool,
    /// FUA is honoured natively (otherwise the node flushes after the write).
    pub fua: bool,
    /// Block status distinguishes data from holes.
    pub block_status: bool,
    /// Several requests may be in flight at once.
    pub parallel: bool,
}

/// Reading.
pub trait BlockRead {
    /// Fill `buf` from `offset`; the request is within the device.
    fn read(&self, offset: u64, buf: IoBuf) -> impl Future<Output = Result<IoBuf>> + Send;
}

/// Writing.
pub trait BlockWrite {
    /// Write all of `buf` at `offset`; the request is within the device.
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> impl Future<Output = Result<IoBuf>> + Send;
}

/// Making completed writes durable.
pub trait Flush {
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
}

/// Writing zeroes without a data buffer.
pub trait WriteZeroes {
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> impl Future<Output = Result<()>> + Send;
}

/// Telling the storage that a range is no longer needed.
pub trait Discard {
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send;
}

/// Reporting which ranges hold data and which read as zeroes.
pub trait BlockStatus {
    /// The extent starting at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> impl Future<Output = Result<Extent>> + Send;
}

/// Changing and re-reading the size.
pub trait Resize {
    fn truncate(&self, len: u64) -> impl Future<Output = Result<()>> + Send;
}

/// The static facts about a leaf and its activation hooks.
pub trait LeafInfo {
    /// Driver name as `blockdev-add` spells it.
    fn driver_name(&self) -> &'static str;
    /// Current length in bytes (cached; refreshed by `refresh`).
    fn length(&self) -> u64;
    /// Required alignment of offsets and lengths in bytes (1 if none).
    fn alignment(&self) -> u32 {
        1
    }
    fn caps(&self) -> Caps;
    /// Re-read what the driver caches (size, metadata); called on activation.
    fn refresh(&self) -> Result<()> {
        Ok(())
    }
    /// The node is being deleted: release connections and other resources now.
    fn close(&self) {}
    /// The name of the remote export this leaf reads and writes (an NBD
    /// client), so that a migration can tell which destination disk it feeds.
    fn remote_export(&self) -> Option<String> {
        None
    }
    /// Abort the connection at once (QMP `yank`): every request in flight and
    /// every later one fails, nothing waits for the remote side. Only network
    /// clients have anything to yank; the default does nothing.
    fn yank(&self) {}
}

/// A complete leaf driver.
pub trait LeafDriver:
    LeafInfo + BlockRead + BlockWrite + Flush + WriteZeroes + Discard + BlockStatus + Resize + Send + Sync + 'static
{
}

impl<T> LeafDriver for T where
    T: LeafInfo + BlockRead + BlockWrite + Flush + WriteZeroes + Discard + BlockStatus + Resize + Send + Sync + 'static
{
}

/// A boxed future, for drivers reached through `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe form of [`LeafDriver`], for drivers registered from other crates.
/// Blanket-implemented for every `LeafDriver`.
pub trait DynDriver: Send + Sync + 'static {
    fn driver_name(&self) -> &'static str;
    fn length(&self) -> u64;
    fn alignment(&self) -> u32;
    fn caps(&self) -> Caps;
    fn refresh(&self) -> Result<()>;
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, Result<IoBuf>>;
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, Result<IoBuf>>;
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>>;
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>>;
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>>;
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>>;
    /// Called when the node is deleted (close connections, release resources).
    fn close(&self) {}
    /// See [`LeafInfo::remote_export`].
    fn remote_export(&self) -> Option<String>;
    /// See [`LeafInfo::yank`].
    fn yank(&self);
}

impl<T: LeafDriver> DynDriver for T {
    fn driver_name(&self) -> &'static str {
        LeafInfo::driver_name(self)
    }
    fn length(&self) -> u64 {
        LeafInfo::length(self)
    }
    fn alignment(&self) -> u32 {
        LeafInfo::alignment(self)
    }
    fn caps(&self) -> Caps {
        LeafInfo::caps(self)
    }
    fn refresh(&self) -> Result<()> {
        LeafInfo::refresh(self)
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, Result<IoBuf>> {
        Box::pin(BlockRead::read(self, offset, buf))
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, Result<IoBuf>> {
        Box::pin(BlockWrite::write(self, offset, buf, flags))
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(Flush::flush(self))
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(WriteZeroes::write_zeroes(self, offset, len, flags))
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(Discard::discard(self, offset, len))
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(BlockStatus::block_status(self, offset, len))
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(Resize::truncate(self, len))
    }
    fn close(&self) {
        LeafInfo::close(self)
    }
    fn remote_export(&self) -> Option<String> {
        LeafInfo::remote_export(self)
    }
    fn yank(&self) {
        LeafInfo::yank(self)
    }
}
