//! Connecting to the server and the option haggling (client side of the
//! fixed newstyle negotiation), up to the [`ExportInfo`] transmission starts
//! with.
//!
//! Handshake path (fixed newstyle, `NBD_FLAG_C_NO_ZEROES` when offered):
//!
//! ```text
//!  S: NBDMAGIC IHAVEOPT hflags ──► C: cflags
//!        │ server is not fixed-newstyle ─────────────────────────────┐
//!        ▼                                                           │
//!  NBD_OPT_EXTENDED_HEADERS ──ACK──► extended (implies structured) ─┐│
//!        │ error reply                                              ││
//!        ▼                                                          ││
//!  NBD_OPT_STRUCTURED_REPLY ──ACK──► structured ───────────────────►┤│
//!        │ error reply: simple replies only, no block status        ││
//!        ▼                                                          ▼│
//!        │                  NBD_OPT_SET_META_CONTEXT base:allocation ││
//!        │                    (error reply: no block status)        ││
//!        ▼◄─────────────────────────────────────────────────────────┘│
//!  NBD_OPT_GO export + NBD_INFO_BLOCK_SIZE                           │
//!        │ INFO(export size, flags; block sizes)... ACK ─► transmission
//!        │ NBD_REP_ERR_UNSUP                                         │
//!        ▼◄──────────────────────────────────────────────────────────┘
//!  NBD_OPT_EXPORT_NAME ──► size, flags ──► transmission
//!
//!  any other error reply (unknown export, TLS required, shutting down):
//!  C: NBD_OPT_ABORT, and the open fails with the server's message.
//! ```

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::options::NbdServer;
use super::{protocol, MAX_REPLY_PAYLOAD};
use crate::proto::{self, Cursor};

/// Largest read or write payload we send in one request, whatever the server allows (as QEMU).
const MAX_TRANSFER: u64 = proto::MAX_PAYLOAD as u64;
/// The metadata context block status asks for.
const BASE_ALLOCATION: &str = "base:allocation";
/// The magic an oldstyle server sends where a newstyle one sends IHAVEOPT.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// What the handshake settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::TFLAG_*`); zero if the server did not set HAS_FLAGS.
    pub flags: u16,
    /// Minimum, preferred and maximum block size (defaults 1, 4096, 32 MiB when not advertised).
    pub min_block: u32,
    pub pref_block: u32,
    pub max_block: u32,
    /// Structured replies are in use (always true with extended headers).
    pub structured: bool,
    /// Extended headers are in use.
    pub extended: bool,
    /// The server's id for `base:allocation`, if block status is available.
    pub base_allocation: Option<u32>,
    /// The export was selected with `NBD_OPT_EXPORT_NAME` (the server does not know `NBD_OPT_GO`).
    pub export_name_fallback: bool,
}

impl Default for ExportInfo {
    fn default() -> Self {
        Self {
            size: 0,
            flags: 0,
            min_block: 1,
            pref_block: 4096,
            max_block: proto::MAX_PAYLOAD,
            structured: false,
            extended: false,
            base_allocation: None,
            export_name_fallback: false,
        }
    }
}

impl ExportInfo {
    pub(super) fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Largest read or write payload per request: the server's maximum, at
    /// most 32 MiB, a multiple of the minimum block size.
    pub fn max_transfer(&self) -> u64 {
        let min = u64::from(self.min_block.max(1));
        let max = u64::from(self.max_block).min(MAX_TRANSFER);
        (max - max % min).max(min)
    }
}

pub(super) type ReadHalf = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
pub(super) type WriteHalf = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

const READ_BUFFER: usize = 128 << 10;
const WRITE_BUFFER: usize = 128 << 10;

/// Connect; also returns the socket's fd, so that a dead connection can be
/// shut down under a sender blocked in a write.
pub(super) async fn open_stream(server: &NbdServer) -> io::Result<(ReadHalf, WriteHalf, std::os::fd::RawFd)> {
    use std::os::fd::AsRawFd;
    let (r, w, fd): (Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>, _) = match server {
        NbdServer::Inet { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            let fd = s.as_raw_fd();
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), fd)
        }
        NbdServer::Unix { path } => {
            let s = tokio::net::UnixStream::connect(path).await?;
            let fd = s.as_raw_fd();
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w), fd)
        }
    };
    Ok((BufReader::with_capacity(READ_BUFFER, r), BufWriter::with_capacity(WRITE_BUFFER, w), fd))
}

/// An error reply to an option: its type and the server's message.
#[derive(Debug)]
struct Refusal {
    opt: u32,
    kind: u32,
    message: String,
}

impl Refusal {
    /// Errors after which no further option can succeed.
    fn is_fatal(&self) -> bool {
        matches!(self.kind, proto::REP_ERR_TLS_REQD | proto::REP_ERR_SHUTDOWN)
    }

    fn into_error(self, export: &str) -> io::Error {
        let what = match self.kind {
            proto::REP_ERR_UNKNOWN => format!("export '{export}' is not available"),
            proto::REP_ERR_TLS_REQD => "the server requires TLS, which is not supported yet".to_string(),
            proto::REP_ERR_SHUTDOWN => "the server is shutting down".to_string(),
            _ => format!("{} refused", proto::option_name(self.opt)),
        };
        let kind = match self.kind {
            proto::REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
            proto::REP_ERR_POLICY | proto::REP_ERR_TLS_REQD => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        let mut msg = format!("{what} ({})", proto::rep_err_name(self.kind));
        if !self.message.is_empty() {
            msg.push_str(": ");
            msg.push_str(&self.message);
        }
        io::Error::new(kind, msg)
    }
}

/// One side of the option haggling.
pub(super) struct Haggle<'a> {
    pub(super) r: &'a mut ReadHalf,
    pub(super) w: &'a mut WriteHalf,
    pub(super) export: &'a str,
}

impl Haggle<'_> {
    async fn send(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let len =
            u32::try_from(data.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option too long"))?;
        self.w.write_all(&proto::IHAVEOPT.to_be_bytes()).await?;
        self.w.write_all(&opt.to_be_bytes()).await?;
        self.w.write_all(&len.to_be_bytes()).await?;
        self.w.write_all(data).await?;
        self.w.flush().await
    }

    /// The next reply to `opt`: its type and payload.
    async fn reply(&mut self, opt: u32) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.r.read_exact(&mut h).await?;
        let mut c = Cursor::new(&h);
        let (magic, got, kind, len) = (c.u64(), c.u32(), c.u32(), c.u32());
        let (Some(magic), Some(got), Some(kind), Some(len)) = (magic, got, kind, len) else {
            return Err(protocol("short option reply"));
        };
        if magic != proto::OPTION_REPLY_MAGIC {
            return Err(protocol(format!("bad option reply magic {magic:#x}")));
        }
        if got != opt {
            return Err(protocol(format!(
                "reply to {} while waiting for {}",
                proto::option_name(got),
                proto::option_name(opt)
            )));
        }
        if u64::from(len) > MAX_REPLY_PAYLOAD {
            return Err(protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.r.read_exact(&mut data).await?;
        Ok((kind, data))
    }

    fn refusal(opt: u32, kind: u32, data: &[u8]) -> Refusal {
        Refusal { opt, kind, message: String::from_utf8_lossy(data).into_owned() }
    }

    /// Send an option without payload that the server answers with ACK or an error.
    async fn simple(&mut self, opt: u32) -> io::Result<std::result::Result<(), Refusal>> {
        self.send(opt, &[]).await?;
        loop {
            let (kind, data) = self.reply(opt).await?;
            match kind {
                proto::REP_ACK => return Ok(Ok(())),
                k if k & proto::REP_FLAG_ERROR != 0 => return Ok(Err(Self::refusal(opt, k, &data))),
                proto::REP_SERVER | proto::REP_INFO => {} // informational; skip
                k => return Err(protocol(format!("unexpected reply type {k:#x} to {}", proto::option_name(opt)))),
            }
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`: the context id, if the server has it.
    async fn set_meta_context(&mut self) -> io::Result<std::result::Result<Option<u32>, Refusal>> {
        let opt = proto::OPT_SET_META_CONTEXT;
        let mut data = Vec::with_capacity(12 + self.export.len() + BASE_ALLOCATION.len());
        data.extend_from_slice(&(self.export.len() as u32).to_be_bytes());
        data.extend_from_slice(self.export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        data.extend_from_slice(BASE_ALLOCATION.as_bytes());
        self.send(opt, &data).await?;
        let mut id = None;
        loop {
            let (kind, data) = self.reply(opt).await?;
            match kind {
                proto::REP_ACK => return Ok(Ok(id)),
                proto::REP_META_CONTEXT => {
                    let mut c = Cursor::new(&data);
                    let ctx = c.u32().ok_or_else(|| protocol("short NBD_REP_META_CONTEXT"))?;
                    let name = c.bytes(c.remaining()).unwrap_or_default();
                    if name == BASE_ALLOCATION.as_bytes() {
                        id = Some(ctx);
                    } else {
                        return Err(protocol(format!(
                            "server selected context '{}', which was not asked for",
                            String::from_utf8_lossy(name)
                        )));
                    }
                }
                k if k & proto::REP_FLAG_ERROR != 0 => return Ok(Err(Self::refusal(opt, k, &data))),
                k => return Err(protocol(format!("unexpected reply type {k:#x} to NBD_OPT_SET_META_CONTEXT"))),
            }
        }
    }

    /// `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`: fills `info` on success.
    async fn go(&mut self, info: &mut ExportInfo) -> io::Result<std::result::Result<(), Refusal>> {
        let opt = proto::OPT_GO;
        let mut data = Vec::with_capacity(8 + self.export.len());
        data.extend_from_slice(&(self.export.len() as u32).to_be_bytes());
        data.extend_from_slice(self.export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        self.send(opt, &data).await?;
        let mut have_export = false;
        loop {
            let (kind, data) = self.reply(opt).await?;
            match kind {
                proto::REP_ACK if have_export => return Ok(Ok(())),
                proto::REP_ACK => return Err(protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")),
                proto::REP_INFO => {
                    let mut c = Cursor::new(&data);
                    match c.u16() {
                        Some(proto::INFO_EXPORT) => {
                            let (Some(size), Some(flags)) = (c.u64(), c.u16()) else {
                                return Err(protocol("short NBD_INFO_EXPORT"));
                            };
                            info.size = size;
                            info.flags = flags;
                            have_export = true;
                        }
                        Some(proto::INFO_BLOCK_SIZE) => {
                            let (Some(min), Some(pref), Some(max)) = (c.u32(), c.u32(), c.u32()) else {
                                return Err(protocol("short NBD_INFO_BLOCK_SIZE"));
                            };
                            check_block_sizes(min, pref, max)?;
                            info.min_block = min;
                            info.pref_block = pref;
                            info.max_block = max;
                        }
                        Some(_) => {} // name, description, ...: not needed
                        None => return Err(protocol("empty NBD_REP_INFO")),
                    }
                }
                k if k & proto::REP_FLAG_ERROR != 0 => return Ok(Err(Self::refusal(opt, k, &data))),
                proto::REP_SERVER => {}
                k => return Err(protocol(format!("unexpected reply type {k:#x} to NBD_OPT_GO"))),
            }
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags, or hangs up.
    async fn export_name(&mut self, no_zeroes: bool, info: &mut ExportInfo) -> io::Result<()> {
        self.send(proto::OPT_EXPORT_NAME, self.export.as_bytes()).await?;
        let mut b = [0u8; 10 + 124];
        let want = if no_zeroes { 10 } else { b.len() };
        if let Err(e) = self.r.read_exact(&mut b[..want]).await {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "server closed the connection after NBD_OPT_EXPORT_NAME; is export '{}' available?",
                        self.export
                    ),
                ));
            }
            return Err(e);
        }
        let mut c = Cursor::new(&b);
        let (Some(size), Some(flags)) = (c.u64(), c.u16()) else {
            return Err(protocol("short NBD_OPT_EXPORT_NAME reply"));
        };
        info.size = size;
        info.flags = flags;
        info.export_name_fallback = true;
        Ok(())
    }

    /// Tell the server we are leaving (soft disconnect); best effort.
    async fn abort(&mut self) {
        if self.send(proto::OPT_ABORT, &[]).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.reply(proto::OPT_ABORT)).await;
        }
    }

    /// Fail the open with `refusal`, after a soft disconnect.
    async fn give_up(&mut self, refusal: Refusal) -> io::Error {
        self.abort().await;
        refusal.into_error(self.export)
    }

    pub(super) async fn run(&mut self) -> io::Result<ExportInfo> {
        let mut b = [0u8; 18];
        self.r.read_exact(&mut b).await?;
        let mut c = Cursor::new(&b);
        let (Some(magic), Some(second), Some(hflags)) = (c.u64(), c.u64(), c.u16()) else {
            return Err(protocol("short greeting"));
        };
        if magic != proto::NBDMAGIC {
            return Err(protocol(format!("not an NBD server (magic {magic:#x})")));
        }
        if second == OLDSTYLE_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the server uses oldstyle negotiation, which is not supported",
            ));
        }
        if second != proto::IHAVEOPT {
            return Err(protocol(format!("bad newstyle magic {second:#x}")));
        }
        let fixed = hflags & proto::FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = 0;
        if fixed {
            cflags |= proto::FLAG_C_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        self.w.write_all(&cflags.to_be_bytes()).await?;
        self.w.flush().await?;

        let mut info = ExportInfo::default();
        if fixed {
            match self.simple(proto::OPT_EXTENDED_HEADERS).await? {
                Ok(()) => {
                    info.extended = true;
                    info.structured = true;
                }
                Err(r) if r.is_fatal() => return Err(self.give_up(r).await),
                Err(r) => {
                    tracing::debug!(export = self.export, reply = proto::rep_err_name(r.kind), "no extended headers");
                    match self.simple(proto::OPT_STRUCTURED_REPLY).await? {
                        Ok(()) => info.structured = true,
                        Err(r) if r.is_fatal() => return Err(self.give_up(r).await),
                        Err(r) => {
                            tracing::debug!(
                                export = self.export,
                                reply = proto::rep_err_name(r.kind),
                                "no structured replies"
                            )
                        }
                    }
                }
            }
            if info.structured {
                match self.set_meta_context().await? {
                    Ok(id) => info.base_allocation = id,
                    Err(r) if r.is_fatal() => return Err(self.give_up(r).await),
                    Err(r) => {
                        tracing::debug!(export = self.export, reply = proto::rep_err_name(r.kind), "no base:allocation")
                    }
                }
            }
            match self.go(&mut info).await? {
                Ok(()) => {}
                Err(r) if r.kind == proto::REP_ERR_UNSUP => self.export_name(no_zeroes, &mut info).await?,
                Err(r) => return Err(self.give_up(r).await),
            }
        } else {
            self.export_name(no_zeroes, &mut info).await?;
        }
        if info.flags & proto::TFLAG_HAS_FLAGS == 0 {
            info.flags = 0;
        }
        Ok(info)
    }
}

fn check_block_sizes(min: u32, pref: u32, max: u32) -> io::Result<()> {
    if !min.is_power_of_two() || min > 64 << 10 {
        return Err(protocol(format!("minimum block size {min} is not a power of two up to 64 KiB")));
    }
    if pref < min || max < min {
        return Err(protocol(format!("block sizes min {min}, preferred {pref}, max {max} are inconsistent")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_transfer_is_bounded_and_aligned() {
        let mut i = ExportInfo { max_block: u32::MAX, ..ExportInfo::default() };
        assert_eq!(i.max_transfer(), 32 << 20);
        i.min_block = 4096;
        i.max_block = 10_000;
        assert_eq!(i.max_transfer(), 8192);
    }
}
