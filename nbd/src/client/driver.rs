//! The `nbd` block driver: [`NbdClient`] implements `block::driver`'s
//! traits over one connection (reads and writes in pieces of the server's
//! maximum, write-zeroes and trim in pieces of at most 1 GiB, block status
//! through `base:allocation`); [`NbdBdrv`] opens one from `blockdev-add`'s
//! options and is what registers with the graph. `NbdClient` owns the glue
//! that ends a connection: `shutdown` (with `NBD_CMD_DISC`), `disconnect`
//! and QMP `yank`. There is no reconnect yet.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use block::buf::IoBuf;
use block::driver::{
    BlockRead, BlockStatus, BlockWrite, Caps, Discard, Driver, DynDriver, Extent, Flush, LeafInfo, OpenCtx, Opened,
    Resize, WriteFlags, WriteZeroes, ZeroFlags,
};
use block::drivers::Leaf;
use block::error::{BlockError, Op, Result};
use serde_json::{Map, Value};
use tokio::task::JoinHandle;

use super::inflight::{reader_task, Dead, Failure, Shared};
use super::negotiate::{open_stream, ExportInfo, Haggle};
use super::options::{BlockdevOptionsNbd, NbdClientOptions};
use crate::proto;

/// Largest effect length of one write-zeroes, trim or block-status request.
const MAX_EFFECT: u64 = 1 << 30;

/// Register driver `nbd` with `graph`, so `blockdev-add` can open NBD exports.
pub fn register(graph: &block::Graph) {
    graph.register(Arc::new(NbdBdrv));
}

/// The `nbd` driver: opens an [`NbdClient`] from [`BlockdevOptionsNbd`].
#[derive(Debug)]
pub struct NbdBdrv;

impl Driver for NbdBdrv {
    const NAME: &'static str = "nbd";
    type Options = BlockdevOptionsNbd;

    fn parse_options(options: Map<String, Value>) -> Result<BlockdevOptionsNbd> {
        BlockdevOptionsNbd::from_map(options)
    }

    async fn open<'a>(&'a self, ctx: OpenCtx<'a>, o: BlockdevOptionsNbd) -> Result<Opened> {
        let mut opts = NbdClientOptions::try_from(o)?;
        opts.node_name = Some(ctx.node_name.to_string());
        let client: Arc<dyn DynDriver> = NbdClient::connect(&opts).await?;
        Ok(Opened::Leaf(Leaf::Dyn(client)))
    }
}

/// Connect to the export `opts` names and complete the handshake.
pub async fn connect(opts: &NbdClientOptions) -> Result<Arc<NbdClient>> {
    NbdClient::connect(opts).await
}

/// A connection to one NBD export, usable as a block driver.
pub struct NbdClient {
    shared: Arc<Shared>,
    /// The reader task; taken and aborted by `shutdown`.
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.shared.uri)
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connect, negotiate, and start the reader task.
    pub async fn connect(opts: &NbdClientOptions) -> Result<Arc<NbdClient>> {
        let uri = opts.uri();
        let open = async {
            let (mut r, mut w, fd) = open_stream(&opts.server).await?;
            let info = Haggle { r: &mut r, w: &mut w, export: &opts.export }.run().await?;
            io::Result::Ok((r, w, fd, info))
        };
        let (r, w, fd, info) = match tokio::time::timeout(opts.handshake_timeout, open).await {
            Ok(Ok(v)) => v,
            Ok(Err(source)) => return Err(BlockError::Open { path: uri, source }),
            Err(_) => {
                let source = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nbd server {} did not complete the handshake within {:?}",
                        opts.server, opts.handshake_timeout
                    ),
                );
                return Err(BlockError::Open { path: uri, source });
            }
        };
        tracing::debug!(
            %uri, size = info.size, flags = info.flags, extended = info.extended, structured = info.structured,
            block_status = info.base_allocation.is_some(), min_block = info.min_block, max_block = info.max_block,
            "nbd client connected"
        );
        let node = opts.node_name.clone().unwrap_or_else(|| uri.clone());
        let shared = Arc::new(Shared::new(uri, node, opts.export.clone(), info, w, fd, opts.request_timeout));
        let reader = tokio::spawn(reader_task(shared.clone(), r));
        Ok(Arc::new(NbdClient { shared, reader: Mutex::new(Some(reader)) }))
    }

    /// The export's URI (`nbd://...` or `nbd+unix://...`).
    pub fn uri(&self) -> &str {
        &self.shared.uri
    }

    /// What the handshake settled.
    pub fn info(&self) -> ExportInfo {
        self.shared.info
    }

    /// False once the connection died or was shut down.
    pub fn is_connected(&self) -> bool {
        self.shared.dead_reason().is_none()
    }

    fn take_reader(&self) -> Option<JoinHandle<()>> {
        block::sync::lock(&self.reader).take()
    }

    fn closed_by_us(&self) -> String {
        format!("connection to nbd server {} was closed by the client", self.shared.uri)
    }

    /// Fail pending requests, send `NBD_CMD_DISC` (from a spawned task, if a
    /// runtime is running) and close the connection. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        let was_alive = self.shared.close(self.closed_by_us());
        if let Some(h) = self.take_reader() {
            h.abort();
        }
        if was_alive {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let shared = self.shared.clone();
                rt.spawn(async move { shared.send_disc().await });
            }
        }
    }

    /// QMP `yank`: shut the socket down at once and fail every request in
    /// flight and every later one, without waiting for the server (no
    /// `NBD_CMD_DISC`: a server that stopped reading would not take it).
    /// Idempotent; a connection already dead keeps its first reason.
    pub fn yank(&self) {
        let why = format!("connection to nbd server {} was yanked", self.shared.uri);
        if self.shared.kill_with(Dead::aborted(why)) {
            tracing::info!(uri = %self.shared.uri, node = %self.shared.node, "nbd connection yanked");
        }
    }

    /// Like [`shutdown`](Self::shutdown), but waits until `NBD_CMD_DISC` is sent.
    pub async fn disconnect(&self) {
        let was_alive = self.shared.close(self.closed_by_us());
        if let Some(h) = self.take_reader() {
            h.abort();
        }
        if was_alive {
            self.shared.send_disc().await;
        }
    }

    fn error(&self, op: Op, f: Failure) -> BlockError {
        let source = match f {
            Failure::Server { errno, message } => {
                if !message.is_empty() {
                    tracing::warn!(uri = %self.shared.uri, %op, errno, "nbd server: {message}");
                }
                io::Error::from_raw_os_error(proto::wire_errno(errno as i32) as i32)
            }
            Failure::Local(msg) => io::Error::other(msg),
            Failure::Dead(dead) => io::Error::new(dead.kind, dead.why.to_string()),
        };
        BlockError::Io { node: self.shared.node.clone(), op, source }
    }

    fn check_writable(&self, op: Op) -> Result<()> {
        if self.shared.info.has(proto::TFLAG_READ_ONLY) {
            return Err(BlockError::Io {
                node: self.shared.node.clone(),
                op,
                source: io::Error::from_raw_os_error(proto::EPERM as i32),
            });
        }
        Ok(())
    }

    fn fua(&self, fua: bool) -> u16 {
        if fua && self.shared.info.has(proto::TFLAG_SEND_FUA) {
            proto::CMD_FLAG_FUA
        } else {
            0
        }
    }

    /// The largest effect length per zero/trim/status request, a multiple of the minimum block size.
    fn max_effect(&self) -> u64 {
        let min = u64::from(self.shared.info.min_block.max(1));
        MAX_EFFECT - MAX_EFFECT % min
    }

    /// Send `cmd` over `[offset, offset + len)` in pieces of at most `max_effect`.
    async fn effect_only(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> std::result::Result<(), Failure> {
        let step = self.max_effect();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.shared.request(cmd, flags, offset + done, n, None, None).await?;
            done += n;
        }
        Ok(())
    }

    /// Write-zeroes for servers without `NBD_CMD_WRITE_ZEROES`: write zero buffers.
    async fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let step = self.shared.info.max_transfer().min(len);
        let zeroes = IoBuf::zeroed(step as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.shared
                .request(proto::CMD_WRITE, self.fua(fua), offset + done, n, Some(&zeroes[..n as usize]), None)
                .await
                .map_err(|f| self.error(Op::WriteZeroes, f))?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl LeafInfo for NbdClient {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn length(&self) -> u64 {
        self.shared.info.size
    }

    fn alignment(&self) -> u32 {
        self.shared.info.min_block.max(1)
    }

    fn caps(&self) -> Caps {
        let info = &self.shared.info;
        Caps {
            native_zeroes: info.has(proto::TFLAG_SEND_WRITE_ZEROES),
            discard: info.has(proto::TFLAG_SEND_TRIM),
            fast_zero: info.has(proto::TFLAG_SEND_WRITE_ZEROES) && info.has(proto::TFLAG_SEND_FAST_ZERO),
            fua: info.has(proto::TFLAG_SEND_FUA),
            block_status: info.base_allocation.is_some(),
            parallel: true,
        }
    }

    fn close(&self) {
        self.shutdown();
    }

    fn remote_export(&self) -> Option<String> {
        Some(self.shared.export.clone())
    }

    fn yank(&self) {
        NbdClient::yank(self);
    }
}

impl BlockRead for NbdClient {
    async fn read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let total = buf.len() as u64;
        let step = self.shared.info.max_transfer();
        let mut done = 0;
        // Pieces go one after another: the buffer travels with each request.
        while done < total {
            let n = (total - done).min(step);
            let reply = self
                .shared
                .request(proto::CMD_READ, 0, offset + done, n, None, Some((buf, done as usize)))
                .await
                .map_err(|f| self.error(Op::Read, f))?;
            buf = reply.buf.ok_or_else(|| self.error(Op::Read, Failure::Local("read buffer lost".into())))?;
            done += n;
        }
        Ok(buf)
    }
}

impl BlockWrite for NbdClient {
    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.check_writable(Op::Write)?;
        let total = buf.len() as u64;
        let step = self.shared.info.max_transfer();
        let cmd_flags = self.fua(flags.fua);
        let mut done = 0;
        while done < total {
            let n = (total - done).min(step);
            let payload = &buf[done as usize..(done + n) as usize];
            self.shared
                .request(proto::CMD_WRITE, cmd_flags, offset + done, n, Some(payload), None)
                .await
                .map_err(|f| self.error(Op::Write, f))?;
            done += n;
        }
        Ok(buf)
    }
}

impl Flush for NbdClient {
    async fn flush(&self) -> Result<()> {
        if !self.shared.info.has(proto::TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.shared.request(proto::CMD_FLUSH, 0, 0, 0, None, None).await.map_err(|f| self.error(Op::Flush, f))?;
        Ok(())
    }
}

impl WriteZeroes for NbdClient {
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable(Op::WriteZeroes)?;
        if len == 0 {
            return Ok(());
        }
        let caps = LeafInfo::caps(self);
        let unsupported_fast = || BlockError::Unsupported { node: self.shared.node.clone(), what: "fast write-zeroes" };
        if flags.fast && !caps.fast_zero {
            return Err(unsupported_fast());
        }
        if !caps.native_zeroes {
            return self.write_zero_buffers(offset, len, flags.fua).await;
        }
        let mut cmd_flags = self.fua(flags.fua);
        if !flags.may_unmap {
            cmd_flags |= proto::CMD_FLAG_NO_HOLE;
        }
        if flags.fast {
            cmd_flags |= proto::CMD_FLAG_FAST_ZERO;
        }
        match self.effect_only(proto::CMD_WRITE_ZEROES, cmd_flags, offset, len).await {
            Ok(()) => Ok(()),
            Err(Failure::Server { errno: proto::ENOTSUP, .. }) if flags.fast => Err(unsupported_fast()),
            Err(f) => Err(self.error(Op::WriteZeroes, f)),
        }
    }
}

impl Discard for NbdClient {
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(Op::Discard)?;
        // Discard is advisory: without NBD_CMD_TRIM there is nothing to do.
        if len == 0 || !self.shared.info.has(proto::TFLAG_SEND_TRIM) {
            return Ok(());
        }
        self.effect_only(proto::CMD_TRIM, 0, offset, len).await.map_err(|f| self.error(Op::Discard, f))
    }
}

impl BlockStatus for NbdClient {
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        if self.shared.info.base_allocation.is_none() || len == 0 {
            return Ok(Extent { len, data: true, zero: false });
        }
        let n = len.min(self.max_effect());
        let reply = self
            .shared
            .request(proto::CMD_BLOCK_STATUS, proto::CMD_FLAG_REQ_ONE, offset, n, None, None)
            .await
            .map_err(|f| self.error(Op::BlockStatus, f))?;
        let (ext_len, flags) = reply.extent.unwrap_or((n, 0));
        Ok(Extent { len: ext_len.min(n), data: flags & proto::STATE_HOLE == 0, zero: flags & proto::STATE_ZERO != 0 })
    }
}

impl Resize for NbdClient {
    async fn truncate(&self, _len: u64) -> Result<()> {
        Err(BlockError::Unsupported { node: self.shared.node.clone(), what: "resize" })
    }
}
