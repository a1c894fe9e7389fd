//! `null-co`: a device of a given size that discards writes, for benchmarks
//! and for measuring the protocol and the graph without storage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::buf::IoBuf;
use crate::driver::*;
use crate::error::Result;

crate::qapi_struct! {
    /// QEMU's `BlockdevOptionsNull`.
    pub struct BlockdevOptionsNull {
        "size" size: Option<u64>,
        "latency-ns" latency_ns: Option<u64>,
        "read-zeroes" read_zeroes: Option<bool>,
    }
}

/// The `null-co` driver (also `null-aio`).
#[derive(Debug)]
pub struct NullBdrv;

impl Driver for NullBdrv {
    const NAME: &'static str = "null-co";
    const ALIASES: &'static [&'static str] = &["null-aio"];
    type Options = BlockdevOptionsNull;
    async fn open<'a>(&'a self, _ctx: OpenCtx<'a>, o: BlockdevOptionsNull) -> Result<Opened> {
        let size = o.size.unwrap_or(DEFAULT_SIZE);
        let d = NullDriver::new(size, o.read_zeroes.unwrap_or(false), o.latency_ns.unwrap_or(0));
        Ok(Opened::Leaf(super::Leaf::Null(d)))
    }
}

/// QEMU's default size for null-co: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(Debug)]
pub struct NullDriver {
    size: AtomicU64,
    /// Reads fill the buffer with zeroes (QEMU's `read-zeroes`); otherwise
    /// the buffer is returned as it came, which is what makes null-co fast.
    read_zeroes: bool,
    /// Artificial latency per request (QEMU's `latency-ns`).
    latency: Duration,
}

impl NullDriver {
    pub fn new(size: u64, read_zeroes: bool, latency_ns: u64) -> Self {
        Self { size: AtomicU64::new(size), read_zeroes, latency: Duration::from_nanos(latency_ns) }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

impl LeafInfo for NullDriver {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }
    fn length(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    fn caps(&self) -> Caps {
        Caps { native_zeroes: true, discard: true, fast_zero: true, fua: true, block_status: true, parallel: true }
    }
}

impl BlockRead for NullDriver {
    async fn read(&self, _offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        self.delay().await;
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(buf)
    }
}

impl BlockWrite for NullDriver {
    async fn write(&self, _offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        self.delay().await;
        Ok(buf)
    }
}

impl Flush for NullDriver {
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

impl WriteZeroes for NullDriver {
    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        self.delay().await;
        Ok(())
    }
}

impl Discard for NullDriver {
    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}

impl BlockStatus for NullDriver {
    async fn block_status(&self, _offset: u64, len: u64) -> Result<Extent> {
        Ok(Extent { len, data: false, zero: self.read_zeroes })
    }
}

impl Resize for NullDriver {
    async fn truncate(&self, len: u64) -> Result<()> {
        self.size.store(len, Ordering::Relaxed);
        Ok(())
    }
}
