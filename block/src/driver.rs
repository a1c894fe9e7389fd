//! The driver interface, split into small capabilities.
//!
//! Two kinds of node runtime, and one description of a driver:
//!
//! - A *leaf* driver owns storage (a file, memory, a remote NBD export) and
//!   implements the capability traits below. The node holds it as a
//!   [`Leaf`](crate::drivers::Leaf): built-in leaves are called directly, so
//!   they allocate nothing per request; any other goes through [`DynDriver`]
//!   (blanket-implemented for every [`LeafDriver`]), one boxed future per
//!   request.
//! - A *filter* ([`Filter`]: `raw`, `blkdebug`) has one child and only
//!   transforms a request on its way down (shifts the offset, injects an
//!   error, delays it), synchronously except for a delay the node layer
//!   sleeps; the node layer walks the chain of filters iteratively, so
//!   requests never recurse through boxed futures.
//! - A [`BlockDriver`] describes a driver as QEMU's `BlockDriver` does: its
//!   name, whether it is a leaf or a filter (and the member naming a filter's
//!   child), the schema of its own options, and `open`. Built-in drivers
//!   implement the typed [`Driver`], whose options are a `qapi_struct!`
//!   parsed and checked by the schema before `open` sees them; the graph
//!   parses the options common to every driver (`node-name`, `read-only`,
//!   `cache`, ...) once, see [`crate::options::BlockdevOptionsBase`].
//!   Activation hooks are the opened runtime's ([`Filter::activate`],
//!   [`LeafInfo::refresh`]), as QEMU's take the `BlockDriverState`.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::buf::IoBuf;
use crate::error::{Op, Result};
use crate::node::Node;
use crate::schema::{Field, QapiObject};

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
    /// The concrete driver, for accessors such as [`Node::file`].
    fn as_any(&self) -> &dyn Any;
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
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A filter's runtime: what it does to a request on its way to the child.
/// Every method but `driver_name` and `as_any` has a pass-through default.
pub trait Filter: Send + Sync + std::fmt::Debug + 'static {
    /// Driver name as `blockdev-add` spells it.
    fn driver_name(&self) -> &'static str;
    /// This node's length given its child's.
    fn length(&self, child_len: u64) -> u64 {
        child_len
    }
    /// The child offset of a request at `offset` (already checked against `length`).
    fn map(&self, offset: u64) -> u64 {
        offset
    }
    /// How long to hold a request before it goes on (blkdebug's delay rules).
    fn delay(&self, _op: Op, _offset: u64, _len: u64) -> Option<Duration> {
        None
    }
    /// Fail a request passing through `node` (blkdebug's error rules).
    fn check(&self, _node: &str, _op: Op, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// The node is being activated (children are active already); an error refuses it.
    fn activate(&self, _node: &str) -> Result<()> {
        Ok(())
    }
    /// The node is being inactivated (quiesced and flushed); an error refuses it.
    fn inactivate(&self, _node: &str) -> Result<()> {
        Ok(())
    }
    /// The concrete filter, for accessors such as [`Node::blkdebug`].
    fn as_any(&self) -> &dyn Any;
}

/// What the graph hands a driver's `open`, besides the driver's own options:
/// the common options it parsed, and a filter's child, already opened.
#[derive(Debug, Clone, Copy)]
pub struct OpenCtx<'a> {
    /// The node being opened (for messages).
    pub node_name: &'a str,
    pub read_only: bool,
    /// `cache.direct`: bypass the host page cache.
    pub direct: bool,
    /// `discard=unmap`: discards may deallocate.
    pub discard_unmap: bool,
    /// A filter's child; `None` for a leaf.
    pub child: Option<&'a Arc<Node>>,
}

/// An opened node's runtime.
pub enum Opened {
    Leaf(crate::drivers::Leaf),
    Filter(Box<dyn Filter>),
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opened::Leaf(d) => write!(f, "Leaf({})", d.driver_name()),
            Opened::Filter(d) => write!(f, "Filter({})", d.driver_name()),
        }
    }
}

/// Declare the leaf runtimes called without boxing, as `Variant(Type)`: this
/// writes the enum `Leaf` with those variants plus `Dyn(Arc<dyn DynDriver>)`,
/// and its one dispatch per operation.
macro_rules! registry {
    (
        leaves { $($(#[$meta:meta])* $variant:ident($ty:ty) = $leaf_bdrv:expr),* $(,)? }
        others { $($bdrv:expr),* $(,)? }
    ) => {
        /// Every built-in driver's description, in the order of the registry.
        pub fn builtin() -> Vec<std::sync::Arc<dyn $crate::driver::BlockDriver>> {
            vec![$(std::sync::Arc::new($leaf_bdrv),)* $(std::sync::Arc::new($bdrv),)*]
        }

        /// A leaf's runtime: a built-in driver called directly (nothing
        /// allocated per request), or any other through `DynDriver`.
        pub enum Leaf {
            $($(#[$meta])* $variant($ty),)*
            Dyn(std::sync::Arc<dyn $crate::driver::DynDriver>),
        }

        impl std::fmt::Debug for Leaf {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.driver_name())
            }
        }

        #[allow(dead_code)]
        impl Leaf {
            pub fn driver_name(&self) -> &'static str {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::driver_name(d),)* Leaf::Dyn(d) => d.driver_name() }
            }
            pub fn length(&self) -> u64 {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::length(d),)* Leaf::Dyn(d) => d.length() }
            }
            pub fn alignment(&self) -> u32 {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::alignment(d),)* Leaf::Dyn(d) => d.alignment() }
            }
            pub fn caps(&self) -> $crate::driver::Caps {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::caps(d),)* Leaf::Dyn(d) => d.caps() }
            }
            pub fn refresh(&self) -> $crate::error::Result<()> {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::refresh(d),)* Leaf::Dyn(d) => d.refresh() }
            }
            pub fn close(&self) {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::close(d),)* Leaf::Dyn(d) => d.close() }
            }
            pub fn remote_export(&self) -> Option<String> {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::remote_export(d),)* Leaf::Dyn(d) => d.remote_export() }
            }
            pub fn yank(&self) {
                match self { $(Leaf::$variant(d) => $crate::driver::LeafInfo::yank(d),)* Leaf::Dyn(d) => d.yank() }
            }
            pub fn as_any(&self) -> &dyn std::any::Any {
                match self { $(Leaf::$variant(d) => d,)* Leaf::Dyn(d) => d.as_any() }
            }
            pub async fn read(&self, offset: u64, buf: $crate::buf::IoBuf) -> $crate::error::Result<$crate::buf::IoBuf> {
                match self { $(Leaf::$variant(d) => $crate::driver::BlockRead::read(d, offset, buf).await,)* Leaf::Dyn(d) => d.read(offset, buf).await }
            }
            pub async fn write(&self, offset: u64, buf: $crate::buf::IoBuf, flags: $crate::driver::WriteFlags) -> $crate::error::Result<$crate::buf::IoBuf> {
                match self { $(Leaf::$variant(d) => $crate::driver::BlockWrite::write(d, offset, buf, flags).await,)* Leaf::Dyn(d) => d.write(offset, buf, flags).await }
            }
            pub async fn flush(&self) -> $crate::error::Result<()> {
                match self { $(Leaf::$variant(d) => $crate::driver::Flush::flush(d).await,)* Leaf::Dyn(d) => d.flush().await }
            }
            pub async fn write_zeroes(&self, offset: u64, len: u64, flags: $crate::driver::ZeroFlags) -> $crate::error::Result<()> {
                match self { $(Leaf::$variant(d) => $crate::driver::WriteZeroes::write_zeroes(d, offset, len, flags).await,)* Leaf::Dyn(d) => d.write_zeroes(offset, len, flags).await }
            }
            pub async fn discard(&self, offset: u64, len: u64) -> $crate::error::Result<()> {
                match self { $(Leaf::$variant(d) => $crate::driver::Discard::discard(d, offset, len).await,)* Leaf::Dyn(d) => d.discard(offset, len).await }
            }
            pub async fn block_status(&self, offset: u64, len: u64) -> $crate::error::Result<$crate::driver::Extent> {
                match self { $(Leaf::$variant(d) => $crate::driver::BlockStatus::block_status(d, offset, len).await,)* Leaf::Dyn(d) => d.block_status(offset, len).await }
            }
            pub async fn truncate(&self, len: u64) -> $crate::error::Result<()> {
                match self { $(Leaf::$variant(d) => $crate::driver::Resize::truncate(d, len).await,)* Leaf::Dyn(d) => d.truncate(len).await }
            }
        }
    };
}
pub(crate) use registry;

/// A driver as the graph's registry sees it (QEMU's `BlockDriver`). Drivers
/// implement [`Driver`] instead and get this for free, whether built in or
/// registered from another crate with [`Graph::register`](crate::Graph::register).
pub trait BlockDriver: Send + Sync + 'static {
    /// The name `blockdev-add` selects the driver by.
    fn name(&self) -> &str;
    /// Other names accepted for it (`host_device` for `file`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// For a filter, the member holding its child (a node name or an inline
    /// definition): `file` for `raw`, `image` for `blkdebug`. `None`: a leaf.
    fn child_member(&self) -> Option<&'static str> {
        None
    }
    /// The schema of the driver's own members (not the common ones), for
    /// keyval coercion; `None`: the members are left as they come.
    fn options(&self) -> Option<Vec<Field>>;
    /// Check the driver's own `options` and open the node.
    fn open<'a>(&'a self, ctx: OpenCtx<'a>, options: Map<String, Value>) -> BoxFuture<'a, Result<Opened>>;
}

/// A driver that declares its options as a QAPI struct: the one thing a new
/// built-in driver implements (plus its registry line in [`crate::drivers`]).
pub trait Driver: Send + Sync + 'static {
    const NAME: &'static str;
    const ALIASES: &'static [&'static str] = &[];
    /// See [`BlockDriver::child_member`].
    const CHILD: Option<&'static str> = None;
    /// The driver's own members, declared with `qapi_struct!`.
    type Options: QapiObject + Send + 'static;
    /// Check the driver's own members and decode them. The default is the
    /// schema's check, worded as QEMU words it ([`crate::schema::parse`]); a
    /// driver whose options predate the schema (the NBD client, which also
    /// takes numbers as strings over QMP) keeps its own checks and messages.
    fn parse_options(options: Map<String, Value>) -> Result<Self::Options> {
        Ok(crate::schema::parse::<Self::Options>(Value::Object(options))?)
    }
    fn open<'a>(&'a self, ctx: OpenCtx<'a>, options: Self::Options)
        -> impl Future<Output = Result<Opened>> + Send + 'a;
}

impl<D: Driver> BlockDriver for D {
    fn name(&self) -> &str {
        D::NAME
    }
    fn aliases(&self) -> &'static [&'static str] {
        D::ALIASES
    }
    fn child_member(&self) -> Option<&'static str> {
        D::CHILD
    }
    fn options(&self) -> Option<Vec<Field>> {
        Some(D::Options::fields())
    }
    fn open<'a>(&'a self, ctx: OpenCtx<'a>, options: Map<String, Value>) -> BoxFuture<'a, Result<Opened>> {
        Box::pin(async move {
            let options = D::parse_options(options)?;
            Driver::open(self, ctx, options).await
        })
    }
}
