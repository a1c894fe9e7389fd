//! The in-flight request table and the reader task.
//!
//! A request registers a slot under a fresh cookie, then takes its turn on
//! the write half for exactly one header (and payload) and waits for the
//! slot's outcome. The reader task owns the read half: it takes each reply's
//! slot out of the table, reads the payload straight into the slot's buffer,
//! and delivers the outcome when the reply is complete. A watchdog kills the
//! connection when a request outlives `x-baton-request-timeout`; a dead
//! connection fails every slot in the table and every later request.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block::buf::IoBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::negotiate::{ExportInfo, ReadHalf, WriteHalf};
use super::{protocol, MAX_REPLY_PAYLOAD};
use crate::proto::{self, Cursor, ReplyHeader, Request};

/// How long a best-effort `NBD_CMD_DISC` may wait for the write half.
const DISC_TIMEOUT: Duration = Duration::from_secs(5);

/// One request waiting for its reply.
struct Slot {
    cmd: u16,
    /// The request's offset and effect length, to check chunks against.
    offset: u64,
    len: u64,
    /// READ: the destination; this request's data goes to `buf[base..base + len]`.
    buf: Option<IoBuf>,
    base: usize,
    /// Bytes of a structured READ reply received so far (data and holes).
    covered: u64,
    /// The ranges those chunks covered: a server may not send one twice.
    ranges: Vec<(u64, u64)>,
    /// The first error the server reported (errno, message).
    error: Option<(u32, String)>,
    /// BLOCK_STATUS: the first extent (length, flags).
    extent: Option<(u64, u32)>,
    /// When the connection is declared dead if the reply is not complete.
    deadline: Option<Instant>,
    done: oneshot::Sender<Outcome>,
}

/// What a completed request hands back.
pub(super) struct Reply {
    pub(super) buf: Option<IoBuf>,
    pub(super) extent: Option<(u64, u32)>,
}

/// Why a request failed.
pub(super) enum Failure {
    /// The server answered with an error.
    Server { errno: u32, message: String },
    /// The reply was well-formed but unusable for this request.
    Local(String),
    /// The connection is gone.
    Dead(Dead),
}

/// Why the connection is unusable, as every request it fails reports it.
#[derive(Debug, Clone)]
pub(super) struct Dead {
    /// `TimedOut` after a request timeout (ETIMEDOUT), `ConnectionAborted` otherwise (EIO).
    pub(super) kind: io::ErrorKind,
    pub(super) why: Arc<str>,
}

impl Dead {
    pub(super) fn aborted(why: impl Into<Arc<str>>) -> Self {
        Dead { kind: io::ErrorKind::ConnectionAborted, why: why.into() }
    }
}

pub(super) type Outcome = std::result::Result<Reply, Failure>;

#[derive(Default)]
struct Inflight {
    /// Every request whose header may have reached the socket and whose
    /// final reply has not been delivered, by cookie. A slot is out of the
    /// map only while the reader task fills it from the socket.
    slots: HashMap<u64, Slot>,
    /// Why the connection is unusable. Once set it is never cleared, and no
    /// slot is inserted or reinserted afterwards, so no request can wait forever.
    dead: Option<Dead>,
    /// The deadline and command of the slot the reader task holds out of
    /// `slots` while it reads that slot's chunk, so the watchdog sees it too.
    reading: Option<(Instant, u16)>,
}

impl Inflight {
    /// The request that has waited longest for its reply: its deadline and command.
    fn earliest_deadline(&self) -> Option<(Instant, u16)> {
        self.slots.values().filter_map(|s| s.deadline.map(|d| (d, s.cmd))).chain(self.reading).min_by_key(|&(d, _)| d)
    }
}

/// The connection shared by the client handle, the senders and the reader task.
pub(super) struct Shared {
    /// The export's URI, for messages.
    pub(super) uri: String,
    /// The node name I/O errors carry (the URI when the client is not a graph node).
    pub(super) node: String,
    /// The export's name on the server.
    pub(super) export: String,
    pub(super) info: ExportInfo,
    writer: tokio::sync::Mutex<WriteHalf>,
    inflight: Mutex<Inflight>,
    next_cookie: AtomicU64,
    /// The socket; open while `writer` (which owns one half) lives, i.e. while `self` does.
    fd: std::os::fd::RawFd,
    /// `x-baton-request-timeout`: how long a request may wait for its reply.
    request_timeout: Option<Duration>,
}

/// A protocol violation or I/O error that ends the reader.
type ReaderError = io::Error;

impl Shared {
    /// A connection whose handshake settled `info`, writing through `writer`
    /// on socket `fd`; [`reader_task`] reads its replies.
    pub(super) fn new(
        uri: String,
        node: String,
        export: String,
        info: ExportInfo,
        writer: WriteHalf,
        fd: std::os::fd::RawFd,
        request_timeout: Option<Duration>,
    ) -> Self {
        Shared {
            uri,
            node,
            export,
            info,
            writer: tokio::sync::Mutex::new(writer),
            inflight: Mutex::new(Inflight::default()),
            next_cookie: AtomicU64::new(1),
            fd,
            request_timeout,
        }
    }

    fn lock_inflight(&self) -> MutexGuard<'_, Inflight> {
        // Every edit under this lock is a single insert/remove/take, so a
        // panic elsewhere cannot leave it half-done.
        block::sync::lock(&self.inflight)
    }

    fn lost(&self, why: impl fmt::Display) -> String {
        format!("connection to nbd server {} lost: {why}", self.uri)
    }

    /// Mark the connection dead and fail every waiting request. Returns
    /// whether it was alive.
    pub(super) fn kill(&self, why: String) -> bool {
        self.kill_with(Dead::aborted(why))
    }

    /// [`kill`](Self::kill) with the error kind the failed requests report.
    pub(super) fn kill_with(&self, dead: Dead) -> bool {
        self.kill_logged(dead, false)
    }

    /// The client closes the connection (its node goes): worth a warning
    /// only if requests were still waiting.
    pub(super) fn close(&self, why: String) -> bool {
        self.kill_logged(Dead::aborted(why), true)
    }

    fn kill_logged(&self, dead: Dead, ours: bool) -> bool {
        let mut g = self.lock_inflight();
        if g.dead.is_some() {
            return false;
        }
        g.dead = Some(dead.clone());
        g.reading = None;
        let slots = std::mem::take(&mut g.slots);
        drop(g);
        if ours && slots.is_empty() {
            tracing::debug!(uri = %self.uri, node = %self.node, "{}", dead.why);
        } else {
            tracing::warn!(uri = %self.uri, node = %self.node, pending = slots.len(), "{}", dead.why);
        }
        for (_, s) in slots {
            let _ = s.done.send(Err(Failure::Dead(dead.clone())));
        }
        // Unblock a sender stuck writing to a server that stopped reading,
        // and the reader waiting for a reply that will not come.
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
        true
    }

    pub(super) fn dead_reason(&self) -> Option<Dead> {
        self.lock_inflight().dead.clone()
    }

    fn take_slot(&self, cookie: u64) -> io::Result<Slot> {
        let mut g = self.lock_inflight();
        let slot = g.slots.remove(&cookie).ok_or_else(|| protocol(format!("reply for unknown cookie {cookie:#x}")))?;
        g.reading = slot.deadline.map(|d| (d, slot.cmd));
        Ok(slot)
    }

    /// The reader is done with the slot it held (delivered or failed).
    fn done_reading(&self) {
        self.lock_inflight().reading = None;
    }

    /// Put back a slot whose reply has more chunks to come.
    fn reinsert(&self, cookie: u64, slot: Slot) {
        let mut g = self.lock_inflight();
        g.reading = None;
        match &g.dead {
            Some(dead) => {
                let dead = dead.clone();
                drop(g);
                let _ = slot.done.send(Err(Failure::Dead(dead)));
            }
            None => {
                g.slots.insert(cookie, slot);
            }
        }
    }

    /// Resolves when a request has waited longer than `x-baton-request-timeout`
    /// for its reply (never, without a timeout): why the connection is dead.
    async fn watchdog(&self) -> Dead {
        let Some(limit) = self.request_timeout else {
            return std::future::pending().await;
        };
        loop {
            let earliest = self.lock_inflight().earliest_deadline();
            match earliest {
                Some((at, cmd)) if at <= Instant::now() => {
                    let why = format!(
                        "nbd server {} did not answer {} within {} s (x-baton-request-timeout); the connection is closed",
                        self.uri,
                        proto::command_name(cmd),
                        limit.as_secs()
                    );
                    return Dead { kind: io::ErrorKind::TimedOut, why: why.into() };
                }
                Some((at, _)) => tokio::time::sleep_until(at).await,
                // Every request registered from now on has its deadline
                // `limit` from now or later.
                None => tokio::time::sleep(limit).await,
            }
        }
    }

    /// Send one request and wait for its reply. `dest` is a READ's buffer and
    /// where in it the data goes; `payload` is a WRITE's data.
    pub(super) async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<&[u8]>,
        dest: Option<(IoBuf, usize)>,
    ) -> Outcome {
        let (tx, rx) = oneshot::channel();
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (buf, base) = match dest {
            Some((b, at)) => (Some(b), at),
            None => (None, 0),
        };
        let deadline = self.request_timeout.map(|t| Instant::now() + t);
        {
            let mut g = self.lock_inflight();
            if let Some(dead) = &g.dead {
                return Err(Failure::Dead(dead.clone()));
            }
            g.slots.insert(
                cookie,
                Slot {
                    cmd,
                    offset,
                    len,
                    buf,
                    base,
                    covered: 0,
                    ranges: Vec::new(),
                    error: None,
                    extent: None,
                    deadline,
                    done: tx,
                },
            );
        }
        let mut guard = SendGuard { shared: self, cookie, stage: Stage::Queued };
        let mut w = self.writer.lock().await;
        if self.dead_reason().is_none() {
            guard.stage = Stage::Writing;
            let mut hdr = [0u8; 32];
            let n = Request { flags, kind: cmd, cookie, offset, length: len }.encode(self.info.extended, &mut hdr);
            let res = async {
                w.write_all(&hdr[..n]).await?;
                if let Some(p) = payload {
                    w.write_all(p).await?;
                }
                w.flush().await
            }
            .await;
            if let Err(e) = res {
                self.kill(self.lost(e));
            }
        }
        drop(w);
        guard.stage = Stage::Sent;
        match rx.await {
            Ok(outcome) => outcome,
            Err(_) => {
                Err(Failure::Dead(self.dead_reason().unwrap_or_else(|| Dead::aborted(self.lost("reply dropped")))))
            }
        }
    }

    /// Best-effort `NBD_CMD_DISC` and close of the write half.
    pub(super) async fn send_disc(&self) {
        let send = async {
            let mut w = self.writer.lock().await;
            let mut hdr = [0u8; 32];
            let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
            let n = Request { flags: 0, kind: proto::CMD_DISC, cookie, offset: 0, length: 0 }
                .encode(self.info.extended, &mut hdr);
            let _ = w.write_all(&hdr[..n]).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        };
        let _ = tokio::time::timeout(DISC_TIMEOUT, send).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Registered, waiting for the write half: nothing sent yet.
    Queued,
    /// Header or payload partly written.
    Writing,
    /// Fully sent (or not sent because the connection died).
    Sent,
}

/// Keeps the stream consistent when a request future is dropped: a request
/// dropped before sending is unregistered; one dropped halfway through
/// sending leaves the server mid-request, so the connection has to die.
struct SendGuard<'a> {
    shared: &'a Shared,
    cookie: u64,
    stage: Stage,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        match self.stage {
            Stage::Queued => {
                self.shared.lock_inflight().slots.remove(&self.cookie);
            }
            Stage::Writing => {
                self.shared.kill(self.shared.lost("a request was cancelled while it was being sent"));
            }
            Stage::Sent => {}
        }
    }
}

/// Deliver a finished request's outcome.
fn complete(slot: Slot, info: &ExportInfo) {
    let outcome = if let Some((errno, message)) = slot.error {
        Err(Failure::Server { errno, message })
    } else if slot.cmd == proto::CMD_READ && info.structured && slot.covered != slot.len {
        Err(Failure::Local(format!("server's read reply covered {} of {} bytes", slot.covered, slot.len)))
    } else if slot.cmd == proto::CMD_BLOCK_STATUS && slot.extent.is_none() {
        Err(Failure::Local("server sent no base:allocation extent".to_string()))
    } else {
        Ok(Reply { buf: slot.buf, extent: slot.extent })
    };
    let _ = slot.done.send(outcome);
}

/// The reader task: demultiplex replies until the connection ends or a
/// request times out, then fail whatever is left.
pub(super) async fn reader_task(shared: Arc<Shared>, mut r: ReadHalf) {
    let mut held = None;
    let dead = tokio::select! {
        res = read_replies(&shared, &mut r, &mut held) => {
            let err = match res {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
                Err(e) => e.to_string(),
            };
            Dead::aborted(shared.lost(err))
        }
        dead = shared.watchdog() => dead,
    };
    shared.kill_with(dead);
    if let Some((_, slot)) = held.take() {
        let dead = shared.dead_reason().unwrap_or_else(|| Dead::aborted(shared.lost("reader stopped")));
        let _ = slot.done.send(Err(Failure::Dead(dead)));
    }
    // Hang up so a server that broke the protocol sees the end too.
    let mut w = shared.writer.lock().await;
    let _ = tokio::time::timeout(DISC_TIMEOUT, w.shutdown()).await;
}

/// Read replies forever; returns only on an error. `held` is the slot being
/// filled from the socket, so the caller can fail it if reading breaks.
async fn read_replies(
    shared: &Shared,
    r: &mut ReadHalf,
    held: &mut Option<(u64, Slot)>,
) -> std::result::Result<std::convert::Infallible, ReaderError> {
    let info = shared.info;
    loop {
        let mut hdr = [0u8; 32];
        r.read_exact(&mut hdr[..4]).await?;
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let expected = match magic {
            proto::SIMPLE_REPLY_MAGIC => !info.extended,
            proto::STRUCTURED_REPLY_MAGIC => info.structured && !info.extended,
            proto::EXTENDED_REPLY_MAGIC => info.extended,
            _ => return Err(protocol(format!("bad reply magic {magic:#010x}"))),
        };
        if !expected {
            return Err(protocol(format!("reply magic {magic:#010x} does not match the negotiated reply format")));
        }
        let n = proto::reply_header_len(magic).unwrap_or(16);
        r.read_exact(&mut hdr[4..n]).await?;
        let header = match proto::decode_reply_header(&hdr[..n]) {
            Ok(Some((h, _))) => h,
            Ok(None) => return Err(protocol("short reply header")),
            Err(e) => return Err(protocol(e.to_string())),
        };
        match header {
            ReplyHeader::Simple { error, cookie } => {
                let (_, slot) = held.insert((cookie, shared.take_slot(cookie)?));
                if error != 0 {
                    slot.error = Some((error, String::new()));
                } else if slot.cmd == proto::CMD_READ {
                    if info.structured {
                        return Err(protocol(
                            "simple reply with data to a read after structured replies were negotiated",
                        ));
                    }
                    let (base, len) = (slot.base, slot.len as usize);
                    let dest = slot
                        .buf
                        .as_mut()
                        .and_then(|b| b.get_mut(base..base + len))
                        .ok_or_else(|| protocol("read buffer missing"))?;
                    r.read_exact(dest).await?;
                }
                if let Some((_, slot)) = held.take() {
                    shared.done_reading();
                    complete(slot, &info);
                }
            }
            ReplyHeader::Chunk { flags, kind, cookie, length, .. } => {
                let (_, slot) = held.insert((cookie, shared.take_slot(cookie)?));
                let is_done = flags & proto::REPLY_FLAG_DONE != 0;
                if kind == proto::REPLY_TYPE_NONE && !is_done {
                    return Err(protocol("NBD_REPLY_TYPE_NONE without the DONE flag"));
                }
                read_chunk(r, slot, kind, length, &info).await?;
                if let Some((cookie, slot)) = held.take() {
                    if is_done {
                        shared.done_reading();
                        complete(slot, &info);
                    } else {
                        shared.reinsert(cookie, slot);
                    }
                }
            }
        }
    }
}

/// Check that `[off, off + n)` lies inside the slot's request; returns the
/// position in the destination buffer.
fn chunk_range(slot: &Slot, off: u64, n: u64) -> io::Result<usize> {
    let end = off.checked_add(n).ok_or_else(|| protocol("chunk offset overflows"))?;
    if off < slot.offset || end > slot.offset + slot.len {
        return Err(protocol(format!("chunk at {off}+{n} is outside the request at {}+{}", slot.offset, slot.len)));
    }
    Ok(slot.base + (off - slot.offset) as usize)
}

async fn read_payload(r: &mut ReadHalf, length: u64) -> io::Result<Vec<u8>> {
    if length > MAX_REPLY_PAYLOAD {
        return Err(protocol(format!("reply chunk of {length} bytes")));
    }
    let mut v = vec![0u8; length as usize];
    r.read_exact(&mut v).await?;
    Ok(v)
}

/// Record that a read chunk covered `[off, off + n)`; overlapping chunks are a
/// protocol violation (otherwise a repeated chunk could stand in for a missing
/// one and stale buffer bytes would pass for data).
fn cover(slot: &mut Slot, off: u64, n: u64) -> io::Result<()> {
    let end = off.saturating_add(n);
    if slot.ranges.iter().any(|&(a, b)| off < b && a < end) {
        return Err(protocol(format!("read chunk at {off} of {n} bytes overlaps an earlier chunk")));
    }
    slot.ranges.push((off, end));
    slot.covered += n;
    Ok(())
}

/// Consume one structured or extended chunk's payload into `slot`.
async fn read_chunk(r: &mut ReadHalf, slot: &mut Slot, kind: u16, length: u64, info: &ExportInfo) -> io::Result<()> {
    let for_read = slot.cmd == proto::CMD_READ;
    match kind {
        proto::REPLY_TYPE_NONE => {
            if length != 0 {
                return Err(protocol("NBD_REPLY_TYPE_NONE with a payload"));
            }
        }
        proto::REPLY_TYPE_OFFSET_DATA if for_read => {
            if length < 9 {
                return Err(protocol("NBD_REPLY_TYPE_OFFSET_DATA without data"));
            }
            let off = r.read_u64().await?;
            let n = length - 8;
            let at = chunk_range(slot, off, n)?;
            let dest = slot
                .buf
                .as_mut()
                .and_then(|b| b.get_mut(at..at + n as usize))
                .ok_or_else(|| protocol("read buffer missing"))?;
            r.read_exact(dest).await?;
            cover(slot, off, n)?;
        }
        proto::REPLY_TYPE_OFFSET_HOLE if for_read => {
            let p = read_payload(r, length).await?;
            let mut c = Cursor::new(&p);
            let off = c.u64();
            let n = match length {
                12 => c.u32().map(u64::from),
                16 => c.u64(),
                _ => None,
            };
            let (Some(off), Some(n)) = (off, n) else {
                return Err(protocol(format!("NBD_REPLY_TYPE_OFFSET_HOLE of {length} bytes")));
            };
            if n == 0 {
                return Err(protocol("empty hole"));
            }
            let at = chunk_range(slot, off, n)?;
            let dest = slot
                .buf
                .as_mut()
                .and_then(|b| b.get_mut(at..at + n as usize))
                .ok_or_else(|| protocol("read buffer missing"))?;
            dest.fill(0);
            cover(slot, off, n)?;
        }
        proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT if slot.cmd == proto::CMD_BLOCK_STATUS => {
            let p = read_payload(r, length).await?;
            let mut c = Cursor::new(&p);
            let ctx = c.u32().ok_or_else(|| protocol("short block status chunk"))?;
            if Some(ctx) != info.base_allocation {
                return Err(protocol(format!("block status for context {ctx}, which was not negotiated")));
            }
            let first = if kind == proto::REPLY_TYPE_BLOCK_STATUS_EXT {
                let _count = c.u32();
                c.u64().zip(c.u64()).map(|(len, flags)| (len, flags as u32))
            } else {
                c.u32().zip(c.u32()).map(|(len, flags)| (u64::from(len), flags))
            };
            let Some((len, flags)) = first else {
                return Err(protocol("block status chunk without extents"));
            };
            if len == 0 {
                return Err(protocol("block status extent of length 0"));
            }
            if slot.extent.is_none() {
                slot.extent = Some((len.min(slot.len), flags));
            }
        }
        k if k & (1 << 15) != 0 => {
            if length < 6 {
                return Err(protocol("short error chunk"));
            }
            let p = read_payload(r, length).await?;
            let mut c = Cursor::new(&p);
            let errno = c.u32().unwrap_or(0);
            let msg_len = c.u16().unwrap_or(0) as usize;
            let Some(msg) = c.bytes(msg_len) else {
                return Err(protocol("error chunk message overruns its chunk"));
            };
            if errno == 0 {
                return Err(protocol("error chunk with error 0"));
            }
            if slot.error.is_none() {
                slot.error = Some((errno, String::from_utf8_lossy(msg).into_owned()));
            }
        }
        k => return Err(protocol(format!("unexpected reply chunk type {k} to command {}", slot.cmd))),
    }
    Ok(())
}
