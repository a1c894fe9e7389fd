//! The NBD client: a block driver (`"driver": "nbd"`) whose storage is an
//! export on a remote NBD server.
//!
//! Storage migration mirrors the source disk into the destination's export
//! through this driver, so it is built for one job above all: keeping many
//! requests in flight on one connection without copying payloads more than
//! the socket forces us to. Hence:
//!
//! - One **reader task** owns the read half. It demultiplexes replies by
//!   cookie and reads `NBD_REPLY_TYPE_OFFSET_DATA` payloads straight into the
//!   caller's [`IoBuf`] (which travels inside the in-flight slot), so a read
//!   is one copy from the kernel, as with a local file.
//! - Senders take turns on the **write half** through an async mutex held for
//!   exactly one request (header + payload), never across the wait for the
//!   reply.
//! - The newest protocol the server speaks is negotiated (extended headers,
//!   else structured replies, else simple replies) because only structured
//!   replies make sparse reads and read errors unambiguous, and only
//!   `base:allocation` lets a mirror skip holes on the destination.
//! - Dropping a request future is safe: before it is sent it is simply
//!   unregistered; once sent its slot stays until the reply arrives and is
//!   absorbed. Only a future dropped halfway through writing its request kills
//!   the connection, because the server would read the next header as payload.
//! - Reads and writes larger than the server's maximum block size (at most
//!   32 MiB, as QEMU) go out as consecutive pieces; write-zeroes, trim and
//!   block status in pieces of at most 1 GiB.
//! - There is no reconnect (DESIGN.md leaves it for later): a dead connection
//!   fails every pending and later request with EIO and says why, instead of
//!   hanging a job or a guest. A server that breaks the protocol (unknown
//!   cookie, bad magic, a chunk outside the request) kills the connection the
//!   same way, since the stream can no longer be trusted.
//! - A server that stops answering must not hang its users either. A request
//!   without its reply after `x-baton-request-timeout` seconds (default 60;
//!   QEMU has no such bound and relies on `yank`) kills the connection: it
//!   fails with ETIMEDOUT naming the node, and so does every other request in
//!   flight, because a late reply could no longer be told from a stray one.
//!   The bound covers the whole request (queueing for the socket, sending,
//!   the reply) and holds for requests whose caller gave up waiting too.
//! - `yank` (QMP, as QEMU's for an `nbd` node) shuts the socket down at once
//!   and fails every request in flight and later with ECONNABORTED-like EIO,
//!   without a word to the server.
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

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block::buf::IoBuf;
use block::driver::{
    BlockRead, BlockStatus, BlockWrite, Caps, Discard, DynDriver, Extent, Flush, LeafInfo, Resize, WriteFlags,
    WriteZeroes, ZeroFlags,
};
use block::error::{BlockError, Op, Result};
use block::graph::DriverCtor;
use block::options::Opts;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::proto::{self, Cursor, ReplyHeader, Request};

/// How long connecting plus the handshake may take before the open fails.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest read or write payload we send in one request, whatever the server allows (as QEMU).
const MAX_TRANSFER: u64 = proto::MAX_PAYLOAD as u64;
/// Largest effect length of one write-zeroes, trim or block-status request.
const MAX_EFFECT: u64 = 1 << 30;
/// Largest option reply or non-data reply chunk we accept before calling it a protocol error.
const MAX_REPLY_PAYLOAD: u64 = 1 << 20;
/// The metadata context block status asks for.
const BASE_ALLOCATION: &str = "base:allocation";
/// The magic an oldstyle server sends where a newstyle one sends IHAVEOPT.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// How long a best-effort `NBD_CMD_DISC` may wait for the write half.
const DISC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may wait for its reply before the connection is
/// declared dead (`x-baton-request-timeout`). Generous: a flush of a large
/// write-back cache on a slow disk can take tens of seconds, and the cost of a
/// false alarm is a dead connection (there is no reconnect yet).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `x-baton-request-timeout` in seconds; 0 turns the bound off.
pub const MAX_REQUEST_TIMEOUT_SECS: u64 = 3600;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// Where the server listens (QEMU's flat `SocketAddress`, the kinds we support).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    Inet { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl fmt::Display for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdServer::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdServer::Inet { host, port } => write!(f, "{host}:{port}"),
            NbdServer::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What to connect to, as `blockdev-add` for driver `nbd` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdClientOptions {
    pub server: NbdServer,
    /// Export name (`""` is the default export).
    pub export: String,
    /// Bound on connecting plus the handshake.
    pub handshake_timeout: Duration,
    /// The graph node this client is, named in I/O errors (default: the URI).
    pub node_name: Option<String>,
    /// How long a request may go without its reply before the connection is
    /// declared dead (`x-baton-request-timeout`); `None`: forever.
    pub request_timeout: Option<Duration>,
}

fn invalid(option: &str, reason: impl Into<String>) -> BlockError {
    BlockError::InvalidOption { option: option.to_string(), reason: reason.into() }
}

impl NbdClientOptions {
    pub fn new(server: NbdServer, export: impl Into<String>) -> Self {
        Self {
            server,
            export: export.into(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            node_name: None,
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
        }
    }

    /// Parse the options `blockdev-add` leaves for the driver (everything but
    /// `driver`, `node-name` and the generic ones), with QEMU's names.
    pub fn from_blockdev_options(map: Map<String, Value>) -> Result<Self> {
        let mut o = Opts::from_map(map);
        for key in ["tls-creds", "tls-hostname"] {
            if o.take(key).is_some() {
                return Err(invalid(key, "TLS is not supported yet"));
            }
        }
        if let Some(delay) = o.u64("reconnect-delay")? {
            if delay > 0 {
                return Err(invalid("reconnect-delay", "reconnect is not implemented yet; only 0 is accepted"));
            }
        }
        // QEMU retries the first connection for this long; we try once, and
        // the handshake has its own bound.
        let _open_timeout = o.u64("open-timeout")?;
        let request_timeout = match o.i64("x-baton-request-timeout")? {
            None => Some(DEFAULT_REQUEST_TIMEOUT),
            Some(0) => None,
            Some(secs) => match u64::try_from(secs) {
                Ok(secs) if secs <= MAX_REQUEST_TIMEOUT_SECS => Some(Duration::from_secs(secs)),
                _ => {
                    return Err(invalid(
                        "x-baton-request-timeout",
                        format!(
                        "{secs} is not a number of seconds from 1 to {MAX_REQUEST_TIMEOUT_SECS} (or 0 for no timeout)"
                    ),
                    ))
                }
            },
        };
        let export = o.str("export")?.unwrap_or_default();
        if export.len() > proto::MAX_STRING {
            return Err(invalid("export", format!("longer than {} bytes", proto::MAX_STRING)));
        }
        let server = match o.take("server") {
            None => return Err(invalid("server", "parameter is missing")),
            Some(Value::Object(m)) => parse_server(Opts::from_map(m))?,
            Some(_) => return Err(invalid("server", "expected an object")),
        };
        o.finish("")?;
        Ok(Self { request_timeout, ..Self::new(server, export) })
    }

    /// The export as QEMU names it in `filename`: `nbd://host:port/export` or
    /// `nbd+unix:///export?socket=path`.
    pub fn uri(&self) -> String {
        match &self.server {
            NbdServer::Inet { .. } => format!("nbd://{}/{}", self.server, self.export),
            NbdServer::Unix { path } => format!("nbd+unix:///{}?socket={}", self.export, path.display()),
        }
    }
}

fn req_server_str(s: &mut Opts, key: &str) -> Result<String> {
    match s.take(key) {
        None => Err(invalid(&format!("server.{key}"), "parameter is missing")),
        Some(Value::String(v)) => Ok(v),
        Some(_) => Err(invalid(&format!("server.{key}"), "expected a string")),
    }
}

fn parse_server(mut s: Opts) -> Result<NbdServer> {
    let kind = req_server_str(&mut s, "type")?;
    let server = match kind.as_str() {
        "inet" => {
            let host = req_server_str(&mut s, "host")?;
            let port = match s.take("port") {
                None => return Err(invalid("server.port", "parameter is missing")),
                Some(Value::String(p)) => p
                    .trim()
                    .parse::<u16>()
                    .map_err(|_| invalid("server.port", format!("expected a port number, got '{p}'")))?,
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| invalid("server.port", format!("expected a port number, got {n}")))?,
                Some(_) => return Err(invalid("server.port", "expected a string or a number")),
            };
            NbdServer::Inet { host, port }
        }
        "unix" => NbdServer::Unix { path: PathBuf::from(req_server_str(&mut s, "path")?) },
        "fd" | "vsock" => {
            return Err(invalid("server.type", format!("'{kind}' is not supported yet; use inet or unix")))
        }
        other => return Err(invalid("server.type", format!("'{other}' is not one of inet, unix, fd, vsock"))),
    };
    s.finish("server.")?;
    Ok(server)
}

/// Register driver `nbd` with `graph`, so `blockdev-add` can open NBD exports.
pub fn register(graph: &block::Graph) {
    let ctor: DriverCtor = Arc::new(|node: String, map: Map<String, Value>| {
        Box::pin(async move {
            let mut opts = NbdClientOptions::from_blockdev_options(map)?;
            opts.node_name = Some(node);
            let client: Arc<dyn DynDriver> = NbdClient::connect(&opts).await?;
            Ok(client)
        })
    });
    graph.register_driver("nbd", ctor);
}

/// Connect to the export `opts` names and complete the handshake.
pub async fn connect(opts: &NbdClientOptions) -> Result<Arc<NbdClient>> {
    NbdClient::connect(opts).await
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

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
    fn has(&self, flag: u16) -> bool {
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

type ReadHalf = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type WriteHalf = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

const READ_BUFFER: usize = 128 << 10;
const WRITE_BUFFER: usize = 128 << 10;

/// Connect; also returns the socket's fd, so that a dead connection can be
/// shut down under a sender blocked in a write.
async fn open_stream(server: &NbdServer) -> io::Result<(ReadHalf, WriteHalf, std::os::fd::RawFd)> {
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

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("protocol error: {}", msg.into()))
}

fn rep_err_name(kind: u32) -> &'static str {
    match kind {
        proto::REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        proto::REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        proto::REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        proto::REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        proto::REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        proto::REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        proto::REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        proto::REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        proto::REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        proto::REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown error reply",
    }
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
        let mut msg = format!("{what} ({})", rep_err_name(self.kind));
        if !self.message.is_empty() {
            msg.push_str(": ");
            msg.push_str(&self.message);
        }
        io::Error::new(kind, msg)
    }
}

/// One side of the option haggling.
struct Haggle<'a> {
    r: &'a mut ReadHalf,
    w: &'a mut WriteHalf,
    export: &'a str,
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

    async fn run(&mut self) -> io::Result<ExportInfo> {
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
                    tracing::debug!(export = self.export, reply = rep_err_name(r.kind), "no extended headers");
                    match self.simple(proto::OPT_STRUCTURED_REPLY).await? {
                        Ok(()) => info.structured = true,
                        Err(r) if r.is_fatal() => return Err(self.give_up(r).await),
                        Err(r) => {
                            tracing::debug!(export = self.export, reply = rep_err_name(r.kind), "no structured replies")
                        }
                    }
                }
            }
            if info.structured {
                match self.set_meta_context().await? {
                    Ok(id) => info.base_allocation = id,
                    Err(r) if r.is_fatal() => return Err(self.give_up(r).await),
                    Err(r) => tracing::debug!(export = self.export, reply = rep_err_name(r.kind), "no base:allocation"),
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

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

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
struct Reply {
    buf: Option<IoBuf>,
    extent: Option<(u64, u32)>,
}

/// Why a request failed.
enum Failure {
    /// The server answered with an error.
    Server { errno: u32, message: String },
    /// The reply was well-formed but unusable for this request.
    Local(String),
    /// The connection is gone.
    Dead(Dead),
}

/// Why the connection is unusable, as every request it fails reports it.
#[derive(Debug, Clone)]
struct Dead {
    /// `TimedOut` after a request timeout (ETIMEDOUT), `ConnectionAborted` otherwise (EIO).
    kind: io::ErrorKind,
    why: Arc<str>,
}

impl Dead {
    fn aborted(why: impl Into<Arc<str>>) -> Self {
        Dead { kind: io::ErrorKind::ConnectionAborted, why: why.into() }
    }
}

type Outcome = std::result::Result<Reply, Failure>;

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
struct Shared {
    /// The export's URI, for messages.
    uri: String,
    /// The node name I/O errors carry (the URI when the client is not a graph node).
    node: String,
    /// The export's name on the server.
    export: String,
    info: ExportInfo,
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
    fn lock_inflight(&self) -> MutexGuard<'_, Inflight> {
        // Every edit under this lock is a single insert/remove/take, so a
        // panic elsewhere cannot leave it half-done.
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self, why: impl fmt::Display) -> String {
        format!("connection to nbd server {} lost: {why}", self.uri)
    }

    /// Mark the connection dead and fail every waiting request. Returns
    /// whether it was alive.
    fn kill(&self, why: String) -> bool {
        self.kill_with(Dead::aborted(why))
    }

    /// [`kill`](Self::kill) with the error kind the failed requests report.
    fn kill_with(&self, dead: Dead) -> bool {
        let mut g = self.lock_inflight();
        if g.dead.is_some() {
            return false;
        }
        tracing::warn!(uri = %self.uri, node = %self.node, "{}", dead.why);
        g.dead = Some(dead.clone());
        g.reading = None;
        let slots = std::mem::take(&mut g.slots);
        drop(g);
        for (_, s) in slots {
            let _ = s.done.send(Err(Failure::Dead(dead.clone())));
        }
        // Unblock a sender stuck writing to a server that stopped reading,
        // and the reader waiting for a reply that will not come.
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
        true
    }

    fn dead_reason(&self) -> Option<Dead> {
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
    async fn request(
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
    async fn send_disc(&self) {
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
async fn reader_task(shared: Arc<Shared>, mut r: ReadHalf) {
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

// ---------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------

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
        let shared = Arc::new(Shared {
            node: opts.node_name.clone().unwrap_or_else(|| uri.clone()),
            uri,
            export: opts.export.clone(),
            info,
            writer: tokio::sync::Mutex::new(w),
            inflight: Mutex::new(Inflight::default()),
            next_cookie: AtomicU64::new(1),
            fd,
            request_timeout: opts.request_timeout,
        });
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
        self.reader.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn closed_by_us(&self) -> String {
        format!("connection to nbd server {} was closed by the client", self.shared.uri)
    }

    /// Fail pending requests, send `NBD_CMD_DISC` (from a spawned task, if a
    /// runtime is running) and close the connection. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        let was_alive = self.shared.kill(self.closed_by_us());
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
        let was_alive = self.shared.kill(self.closed_by_us());
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NbdClientOptions> {
        match v {
            Value::Object(m) => NbdClientOptions::from_blockdev_options(m),
            _ => Err(invalid("options", "not an object")),
        }
    }

    #[test]
    fn inet_port_may_be_a_string_or_a_number() {
        for port in [json!("10809"), json!(10809)] {
            let o = parse(json!({"server": {"type": "inet", "host": "::1", "port": port}, "export": "disk"})).unwrap();
            assert_eq!(o.server, NbdServer::Inet { host: "::1".into(), port: 10809 });
            assert_eq!(o.uri(), "nbd://[::1]:10809/disk");
        }
    }

    #[test]
    fn unix_uri_names_the_socket() {
        let o = parse(json!({"server": {"type": "unix", "path": "/run/x.sock"}})).unwrap();
        assert_eq!(o.export, "");
        assert_eq!(o.uri(), "nbd+unix:///?socket=/run/x.sock");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse(json!({"server": {"type": "unix", "path": "/x"}, "bogus": 1})).unwrap_err();
        assert!(e.to_string().contains("'bogus'") && e.to_string().contains("unexpected"), "{e}");
        let e = parse(json!({"server": {"type": "unix", "path": "/x", "tight": true}})).unwrap_err();
        assert!(e.to_string().contains("'server.tight'"), "{e}");
    }

    #[test]
    fn reconnect_delay_zero_is_accepted_and_positive_refused() {
        assert!(
            parse(json!({"server": {"type": "unix", "path": "/x"}, "reconnect-delay": 0, "open-timeout": 5})).is_ok()
        );
        let e = parse(json!({"server": {"type": "unix", "path": "/x"}, "reconnect-delay": 3})).unwrap_err();
        assert!(e.to_string().contains("reconnect is not implemented"), "{e}");
    }

    #[test]
    fn request_timeout_defaults_to_a_minute_zero_turns_it_off_and_bounds_are_checked() {
        let unix = json!({"type": "unix", "path": "/x"});
        let o = parse(json!({"server": unix})).unwrap();
        assert_eq!(o.request_timeout, Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(o.request_timeout, Some(Duration::from_secs(60)));
        let o = parse(json!({"server": unix, "x-baton-request-timeout": 0})).unwrap();
        assert_eq!(o.request_timeout, None);
        // Keyval (command line) values arrive as strings.
        for v in [json!(5), json!("5")] {
            let o = parse(json!({"server": unix, "x-baton-request-timeout": v})).unwrap();
            assert_eq!(o.request_timeout, Some(Duration::from_secs(5)));
        }
        let o = parse(json!({"server": unix, "x-baton-request-timeout": MAX_REQUEST_TIMEOUT_SECS})).unwrap();
        assert_eq!(o.request_timeout, Some(Duration::from_secs(MAX_REQUEST_TIMEOUT_SECS)));
        for v in
            [json!(-1), json!(MAX_REQUEST_TIMEOUT_SECS + 1), json!(u64::MAX), json!("soon"), json!(true), json!(1.5)]
        {
            let e = parse(json!({"server": unix, "x-baton-request-timeout": v})).unwrap_err();
            assert!(matches!(e, BlockError::InvalidOption { .. }), "{v}: {e}");
            assert!(e.to_string().contains("'x-baton-request-timeout'"), "{v}: {e}");
        }
        let e = parse(json!({"server": unix, "x-baton-request-timeout": 7200})).unwrap_err();
        assert!(e.to_string().contains("from 1 to 3600 (or 0 for no timeout)"), "{e}");
    }

    #[test]
    fn bad_ports_are_refused() {
        for port in [json!("nbd"), json!(70000), json!(-1), json!(true)] {
            let e = parse(json!({"server": {"type": "inet", "host": "h", "port": port}})).unwrap_err();
            assert!(e.to_string().contains("server.port"), "{e}");
        }
    }

    #[test]
    fn max_transfer_is_bounded_and_aligned() {
        let mut i = ExportInfo { max_block: u32::MAX, ..ExportInfo::default() };
        assert_eq!(i.max_transfer(), 32 << 20);
        i.min_block = 4096;
        i.max_block = 10_000;
        assert_eq!(i.max_transfer(), 8192);
    }
}
