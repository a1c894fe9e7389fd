//! The transmission phase of one connection.
//!
//! A connection runs a fixed set of worker tasks (spawned once, when the
//! connection starts). Each worker in turn takes the read half, reads one
//! request header and its payload, lets go of the read half, runs the
//! request against the block layer and writes the reply under the write
//! half's lock. Requests are therefore read in order and answered as they
//! complete, out of order; a slow request never holds up the others. The
//! workers own their scratch space and take data buffers from a per
//! connection pool, so the steady state allocates nothing.
//!
//! Violations that desynchronise the stream (bad magic, a payload too large
//! to skip) end the connection; everything else gets the errno the spec
//! names and the connection goes on.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block::{BlockError, BufPool, IoBuf, WriteFlags, ZeroFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, Notify};

use super::export::Export;
use super::handshake::{Context, Negotiated};
use crate::proto::{self, Request};

/// Requests a connection works on at once.
pub const WORKERS: usize = 32;
/// Reads at least this long are sent sparsely (holes as OFFSET_HOLE chunks).
const SPARSE_READ_MIN: u64 = 64 << 10;
/// Most extents per context in one block-status reply.
const MAX_EXTENTS: usize = 2048;
/// Largest buffer kept for reuse; bigger requests allocate (rare: clients
/// use 2 MiB or less), which bounds a connection's idle memory to ~80 MiB.
const POOLED_MAX: usize = 2 << 20;
/// Data buffers one connection may hold at once (a 32-worker connection of
/// 32 MiB requests would otherwise hold 1 GiB); counted in 4 KiB units.
const BUFFER_BUDGET: usize = 128 << 20;
const BUDGET_UNIT: usize = 4096;
/// Largest oversized write payload we read and discard to stay in sync.
const MAX_SKIP: u64 = 256 << 20;

/// Read buffer: several small requests arrive in one system call.
const READ_BUFFER: usize = 256 << 10;

struct ReadSide<R> {
    r: BufReader<R>,
    hdr: [u8; 32],
}

pub(crate) struct Conn<R, W> {
    reader: Mutex<ReadSide<R>>,
    writer: Mutex<W>,
    export: Arc<Export>,
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, Context)>,
    pool: BufPool,
    /// Bounds the bytes of data buffers in use (BUFFER_BUDGET).
    budget: tokio::sync::Semaphore,
    /// No more requests are read once set (DISC, EOF, desync, shutdown).
    closed: AtomicBool,
    /// Wakes a worker blocked reading when the connection must stop.
    stop: Notify,
    /// The socket, for `abort`. Valid while `self` lives: the two halves above own it.
    fd: std::os::fd::RawFd,
}

/// What reading the next request produced.
enum Incoming<'a> {
    /// A request, its payload, and the buffer budget the payload holds.
    Request(Request, Option<IoBuf>, Option<tokio::sync::SemaphorePermit<'a>>),
    /// A request that fails before it runs (its payload, if any, was skipped).
    Refused(Request, u32, &'static str),
    /// DISC, EOF, or the connection is closing.
    End,
}

/// Per-worker scratch, reused across requests.
#[derive(Default)]
struct Scratch {
    payload: Vec<u8>,
    extents: Vec<(u64, u32)>,
    bitmap: Vec<(u64, u64, bool)>,
}

type R2 = Result<(), std::io::Error>;

impl<R, W> Conn<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    pub(crate) fn new(r: R, w: W, fd: std::os::fd::RawFd, n: Negotiated) -> Arc<Self> {
        Arc::new(Conn {
            reader: Mutex::new(ReadSide { r: BufReader::with_capacity(READ_BUFFER, r), hdr: [0; 32] }),
            writer: Mutex::new(w),
            export: n.export,
            structured: n.structured,
            extended: n.extended,
            contexts: n.contexts,
            pool: BufPool::new(POOLED_MAX, WORKERS + 8),
            budget: tokio::sync::Semaphore::new(BUFFER_BUDGET / BUDGET_UNIT),
            closed: AtomicBool::new(false),
            stop: Notify::new(),
            fd,
        })
    }

    /// Hard stop (server stop, export deleted with mode=hard): also shut the
    /// socket down, so a worker blocked writing to a client that stopped
    /// reading returns at once instead of holding the connection forever.
    pub(crate) fn abort(&self) {
        self.close();
        // `fd` stays open while `self` lives (the halves own it); shutdown(2)
        // neither closes nor invalidates it.
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
    }

    /// Stop reading requests; requests in flight still complete.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    /// Serve until the client disconnects or the connection is closed.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..WORKERS {
            let c = self.clone();
            set.spawn(async move { c.worker().await });
        }
        while set.join_next().await.is_some() {}
        let mut w = self.writer.lock().await;
        let _ = w.shutdown().await;
    }

    async fn worker(&self) {
        let mut scratch = Scratch::default();
        loop {
            let incoming = {
                let mut rs = self.reader.lock().await;
                // Register for the stop signal before looking at `closed`, so a
                // close() between the two cannot be missed.
                let stop = self.stop.notified();
                let export_closed = self.export.closed();
                tokio::pin!(stop, export_closed);
                stop.as_mut().enable();
                export_closed.as_mut().enable();
                if self.closed.load(Ordering::SeqCst) || self.export.is_closing() {
                    self.close();
                    return;
                }
                tokio::select! {
                    r = self.read_request(&mut rs) => r,
                    _ = stop => Ok(Incoming::End),
                    _ = export_closed => {
                        self.abort();
                        Ok(Incoming::End)
                    }
                }
            };
            let res = match incoming {
                Ok(Incoming::Request(req, payload, _budget)) => self.handle(req, payload, &mut scratch).await,
                Ok(Incoming::Refused(req, errno, why)) => self.send_error(req.cookie, req.offset, errno, why).await,
                Ok(Incoming::End) => {
                    self.close();
                    return;
                }
                Err(e) => {
                    tracing::debug!(export = self.export.name(), error = %e, "dropping connection");
                    self.close();
                    return;
                }
            };
            if let Err(e) = res {
                tracing::debug!(export = self.export.name(), error = %e, "reply failed, dropping connection");
                self.close();
                return;
            }
        }
    }

    /// Buffer budget for a `len`-byte data buffer (None if the budget is closed).
    async fn budget_for(&self, len: u64) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let units = (len as usize).div_ceil(BUDGET_UNIT).clamp(1, BUFFER_BUDGET / BUDGET_UNIT);
        self.budget.acquire_many(units as u32).await.ok()
    }

    async fn read_request(&self, rs: &mut ReadSide<R>) -> std::io::Result<Incoming<'_>> {
        let n = proto::request_len(self.extended);
        let ReadSide { r, hdr } = rs;
        match r.read_exact(&mut hdr[..n]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Incoming::End),
            Err(e) => return Err(e),
        }
        let req = Request::decode(&hdr[..n], self.extended)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if req.kind == proto::CMD_DISC {
            return Ok(Incoming::End);
        }
        // Does a payload follow? Writes always; other commands only with PAYLOAD_LEN (extended).
        let has_payload =
            req.kind == proto::CMD_WRITE || (self.extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0);
        if !has_payload {
            return Ok(Incoming::Request(req, None, None));
        }
        if req.kind != proto::CMD_WRITE || req.length > u64::from(proto::MAX_PAYLOAD) {
            if req.length > MAX_SKIP {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("payload of {} bytes is too large to skip", req.length),
                ));
            }
            skip(r, req.length).await?;
            let errno = if req.kind == proto::CMD_WRITE && self.structured { proto::EOVERFLOW } else { proto::EINVAL };
            let why = if req.kind == proto::CMD_WRITE {
                "write payload larger than the maximum block size"
            } else {
                "unexpected payload"
            };
            return Ok(Incoming::Refused(req, errno, why));
        }
        // Wait for buffer budget before reading the payload (back-pressure on the client).
        let permit = self.budget_for(req.length).await;
        let mut buf = self.pool.get(req.length as usize);
        r.read_exact(&mut buf).await?;
        // The permit travels with the request: released once it is answered.
        Ok(Incoming::Request(req, Some(buf), permit))
    }

    /// Bounds and flag checks common to every command; returns the errno to refuse with.
    fn check(&self, req: &Request) -> Result<(), (u32, &'static str)> {
        let allowed = match req.kind {
            proto::CMD_READ => proto::CMD_FLAG_DF | proto::CMD_FLAG_FUA,
            proto::CMD_WRITE => proto::CMD_FLAG_FUA | proto::CMD_FLAG_PAYLOAD_LEN,
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
            proto::CMD_TRIM => proto::CMD_FLAG_FUA,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE | proto::CMD_FLAG_FUA,
            proto::CMD_FLUSH | proto::CMD_CACHE => proto::CMD_FLAG_FUA,
            _ => return Err((proto::EINVAL, "unknown command")),
        };
        if req.flags & !allowed != 0 {
            return Err((proto::EINVAL, "unsupported flags for this command"));
        }
        if req.flags & proto::CMD_FLAG_DF != 0 && !self.structured {
            return Err((proto::EINVAL, "DF requires structured replies"));
        }
        if self.export.is_closing() {
            return Err((proto::ESHUTDOWN, "export is shutting down"));
        }
        let writes = matches!(req.kind, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES | proto::CMD_TRIM);
        if writes && !self.export.config.writable {
            return Err((proto::EPERM, "export is read-only"));
        }
        if matches!(req.kind, proto::CMD_READ) && req.length > u64::from(proto::MAX_PAYLOAD) {
            return Err((
                if self.structured { proto::EOVERFLOW } else { proto::EINVAL },
                "read larger than the maximum block size",
            ));
        }
        if req.kind == proto::CMD_FLUSH {
            return Ok(());
        }
        let size = self.export.size();
        let in_range = req.offset.checked_add(req.length).is_some_and(|end| end <= size);
        if !in_range {
            return Err(if matches!(req.kind, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES) {
                (proto::ENOSPC, "request past the end of the export")
            } else {
                (proto::EINVAL, "request past the end of the export")
            });
        }
        Ok(())
    }

    async fn handle(&self, req: Request, payload: Option<IoBuf>, s: &mut Scratch) -> R2 {
        if let Err((errno, why)) = self.check(&req) {
            if let Some(b) = payload {
                self.pool.put(b);
            }
            return self.send_error(req.cookie, req.offset, errno, why).await;
        }
        let be = &self.export.backend;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let result: Result<(), BlockError> = match req.kind {
            proto::CMD_READ => return self.read(req, s).await,
            proto::CMD_WRITE => match payload {
                Some(buf) => be.write(req.offset, buf, WriteFlags { fua }).await.map(|b| self.pool.put(b)),
                None => Ok(()),
            },
            proto::CMD_FLUSH => be.flush().await,
            proto::CMD_TRIM => {
                let r = be.discard(req.offset, req.length).await;
                if r.is_ok() && fua {
                    be.flush().await
                } else {
                    r
                }
            }
            proto::CMD_WRITE_ZEROES => {
                let flags = ZeroFlags {
                    may_unmap: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
                    fast: req.flags & proto::CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                be.write_zeroes(req.offset, req.length, flags).await
            }
            proto::CMD_CACHE => Ok(()),
            proto::CMD_BLOCK_STATUS => return self.block_status(req, s).await,
            _ => return self.send_error(req.cookie, req.offset, proto::EINVAL, "unknown command").await,
        };
        match result {
            Ok(()) => self.send_ok(req.cookie, req.offset).await,
            Err(e) => self.send_block_error(req.cookie, req.offset, &e).await,
        }
    }

    async fn read(&self, req: Request, s: &mut Scratch) -> R2 {
        if req.length == 0 && self.structured {
            let mut hdr = [0u8; 32];
            let h = proto::chunk_header(
                self.extended,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
                &mut hdr,
            );
            let mut w = self.writer.lock().await;
            w.write_all(&hdr[..h]).await?;
            return w.flush().await;
        }
        let be = &self.export.backend;
        let _budget = self.budget_for(req.length).await;
        let buf = self.pool.get(req.length as usize);
        let buf = match be.read(req.offset, buf).await {
            Ok(b) => b,
            Err(e) => return self.send_block_error(req.cookie, req.offset, &e).await,
        };
        let sparse = self.structured && req.flags & proto::CMD_FLAG_DF == 0 && req.length >= SPARSE_READ_MIN;
        let res = if sparse {
            self.send_sparse(req, &buf, s).await
        } else {
            self.send_data(req.cookie, req.offset, &buf).await
        };
        self.pool.put(buf);
        res
    }

    /// Send the read as OFFSET_DATA / OFFSET_HOLE chunks following block status.
    async fn send_sparse(&self, req: Request, buf: &[u8], s: &mut Scratch) -> R2 {
        s.extents.clear();
        let be = &self.export.backend;
        let mut off = 0u64;
        while off < req.length {
            match be.block_status(req.offset + off, req.length - off).await {
                Ok(e) if e.len > 0 => {
                    let hole = e.zero && !e.data;
                    let len = e.len.min(req.length - off);
                    let flag = u32::from(hole);
                    match s.extents.last_mut() {
                        Some(last) if last.1 == flag => {}
                        _ => s.extents.push((off, flag)),
                    }
                    off += len;
                }
                _ => {
                    // No status: send the rest as data.
                    match s.extents.last() {
                        Some(last) if last.1 == 0 => {}
                        _ => s.extents.push((off, 0)),
                    }
                    break;
                }
            }
        }
        if s.extents.len() == 1 && s.extents[0].1 == 0 {
            return self.send_data(req.cookie, req.offset, buf).await;
        }
        let mut w = self.writer.lock().await;
        let n = s.extents.len();
        for i in 0..n {
            let (start, hole) = s.extents[i];
            let end = if i + 1 < n { s.extents[i + 1].0 } else { req.length };
            let flags = if i + 1 == n { proto::REPLY_FLAG_DONE } else { 0 };
            let abs = req.offset + start;
            let mut hdr = [0u8; 32];
            if hole == 1 {
                let mut p = [0u8; 12];
                p[0..8].copy_from_slice(&abs.to_be_bytes());
                p[8..12].copy_from_slice(&((end - start) as u32).to_be_bytes());
                let h = proto::chunk_header(
                    self.extended,
                    flags,
                    proto::REPLY_TYPE_OFFSET_HOLE,
                    req.cookie,
                    req.offset,
                    12,
                    &mut hdr,
                );
                write_all_parts(&mut *w, &mut [IoSlice::new(&hdr[..h]), IoSlice::new(&p)]).await?;
            } else {
                let data = &buf[start as usize..end as usize];
                let off = abs.to_be_bytes();
                let h = proto::chunk_header(
                    self.extended,
                    flags,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    8 + data.len() as u64,
                    &mut hdr,
                );
                write_all_parts(&mut *w, &mut [IoSlice::new(&hdr[..h]), IoSlice::new(&off), IoSlice::new(data)])
                    .await?;
            }
        }
        w.flush().await
    }

    async fn block_status(&self, req: Request, s: &mut Scratch) -> R2 {
        if !self.structured || self.contexts.is_empty() {
            return self.send_error(req.cookie, req.offset, proto::EINVAL, "no metadata context negotiated").await;
        }
        if req.length == 0 {
            return self.send_error(req.cookie, req.offset, proto::EINVAL, "zero-length block status").await;
        }
        let max = if req.flags & proto::CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
        // Non-extended descriptors carry 32-bit lengths.
        let cap = if self.extended { u64::MAX } else { u64::from(u32::MAX) & !511 };
        let mut w = None;
        for (i, (id, ctx)) in self.contexts.iter().enumerate() {
            s.payload.clear();
            s.payload.extend_from_slice(&id.to_be_bytes());
            if self.extended {
                s.payload.extend_from_slice(&0u32.to_be_bytes()); // count, patched below
            }
            let mut count = 0u32;
            let ext = self.extended;
            let push = |payload: &mut Vec<u8>, count: &mut u32, len: u64, flags: u32| {
                push_descriptor(payload, count, ext, len, flags)
            };
            match ctx {
                Context::BaseAllocation => {
                    let mut off = req.offset;
                    let end = req.offset + req.length;
                    let mut pending: Option<(u64, u32)> = None;
                    while off < end && (count as usize) < max {
                        let e = match self.export.backend.block_status(off, end - off).await {
                            Ok(e) if e.len > 0 => e,
                            Ok(_) => break,
                            Err(err) => return self.send_block_error(req.cookie, req.offset, &err).await,
                        };
                        let flags =
                            (if e.data { 0 } else { proto::STATE_HOLE }) | (if e.zero { proto::STATE_ZERO } else { 0 });
                        pending = match pending {
                            Some((l, f)) if f == flags && l + e.len <= cap => Some((l + e.len, f)),
                            Some((l, f)) => {
                                push(&mut s.payload, &mut count, l, f);
                                Some((e.len.min(cap), flags))
                            }
                            None => Some((e.len.min(cap), flags)),
                        };
                        off += e.len;
                    }
                    if let Some((l, f)) = pending {
                        if (count as usize) < max {
                            push(&mut s.payload, &mut count, l, f);
                        }
                    }
                }
                Context::AllocationDepth => push(&mut s.payload, &mut count, req.length.min(cap), 1),
                Context::Bitmap(b) => {
                    s.bitmap.clear();
                    b.dirty_extents_max(req.offset, req.length, max, &mut s.bitmap);
                    for &(_, len, dirty) in &s.bitmap {
                        push(&mut s.payload, &mut count, len.min(cap), if dirty { proto::STATE_DIRTY } else { 0 });
                    }
                    if s.bitmap.is_empty() {
                        push(&mut s.payload, &mut count, req.length.min(cap), 0);
                    }
                }
            }
            if self.extended {
                s.payload[4..8].copy_from_slice(&count.to_be_bytes());
            }
            let last = i + 1 == self.contexts.len();
            let kind = if self.extended { proto::REPLY_TYPE_BLOCK_STATUS_EXT } else { proto::REPLY_TYPE_BLOCK_STATUS };
            let mut hdr = [0u8; 32];
            let h = proto::chunk_header(
                self.extended,
                if last { proto::REPLY_FLAG_DONE } else { 0 },
                kind,
                req.cookie,
                req.offset,
                s.payload.len() as u64,
                &mut hdr,
            );
            let guard = match w.as_mut() {
                Some(g) => g,
                None => w.insert(self.writer.lock().await),
            };
            write_all_parts(&mut **guard, &mut [IoSlice::new(&hdr[..h]), IoSlice::new(&s.payload)]).await?;
        }
        if let Some(mut g) = w {
            g.flush().await?;
        }
        Ok(())
    }

    async fn send_data(&self, cookie: u64, offset: u64, data: &[u8]) -> R2 {
        let mut hdr = [0u8; 32];
        let mut w = self.writer.lock().await;
        if self.structured {
            let off = offset.to_be_bytes();
            let h = proto::chunk_header(
                self.extended,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                cookie,
                offset,
                8 + data.len() as u64,
                &mut hdr,
            );
            write_all_parts(&mut *w, &mut [IoSlice::new(&hdr[..h]), IoSlice::new(&off), IoSlice::new(data)]).await?;
        } else {
            let h = proto::simple_reply(0, cookie, &mut hdr);
            write_all_parts(&mut *w, &mut [IoSlice::new(&hdr[..h]), IoSlice::new(data)]).await?;
        }
        w.flush().await
    }

    async fn send_ok(&self, cookie: u64, offset: u64) -> R2 {
        let mut hdr = [0u8; 32];
        let h = if self.extended {
            proto::chunk_header(true, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, cookie, offset, 0, &mut hdr)
        } else {
            proto::simple_reply(0, cookie, &mut hdr)
        };
        let mut w = self.writer.lock().await;
        w.write_all(&hdr[..h]).await?;
        w.flush().await
    }

    async fn send_block_error(&self, cookie: u64, offset: u64, e: &BlockError) -> R2 {
        let errno = proto::wire_errno(e.errno());
        tracing::debug!(export = self.export.name(), error = %e.chain(), "request failed");
        let msg = e.to_string();
        self.send_error(cookie, offset, errno, &msg).await
    }

    async fn send_error(&self, cookie: u64, offset: u64, errno: u32, msg: &str) -> R2 {
        let mut hdr = [0u8; 32];
        let mut w = self.writer.lock().await;
        if self.structured {
            let msg = &msg.as_bytes()[..msg.len().min(proto::MAX_STRING)];
            let mut p = [0u8; 6];
            p[0..4].copy_from_slice(&errno.to_be_bytes());
            p[4..6].copy_from_slice(&(msg.len() as u16).to_be_bytes());
            let h = proto::chunk_header(
                self.extended,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR,
                cookie,
                offset,
                6 + msg.len() as u64,
                &mut hdr,
            );
            write_all_parts(&mut *w, &mut [IoSlice::new(&hdr[..h]), IoSlice::new(&p), IoSlice::new(msg)]).await?;
        } else {
            let h = proto::simple_reply(errno, cookie, &mut hdr);
            w.write_all(&hdr[..h]).await?;
        }
        w.flush().await
    }
}

/// Read and drop `n` bytes.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut sink = [0u8; 8192];
    while n > 0 {
        let k = (n as usize).min(sink.len());
        r.read_exact(&mut sink[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Write every byte of `parts`, with as few system calls as the kernel allows.
async fn write_all_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    let mut parts = parts;
    // Drop empty leading slices so a zero-byte write is never mistaken for EOF.
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        let n = w.write_vectored(parts).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

/// Append one block-status descriptor (32-bit or extended 64-bit fields).
fn push_descriptor(payload: &mut Vec<u8>, count: &mut u32, extended: bool, len: u64, flags: u32) {
    if extended {
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&u64::from(flags).to_be_bytes());
    } else {
        payload.extend_from_slice(&(len as u32).to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    *count += 1;
}
