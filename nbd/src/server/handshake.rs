//! The fixed newstyle negotiation, server side.
//!
//! ```text
//!  S: NBDMAGIC IHAVEOPT flags ──> C: client flags
//!   ┌──────────────────────── option loop ─────────────────────────┐
//!   │ STRUCTURED_REPLY / EXTENDED_HEADERS  -> ACK                   │
//!   │ LIST / INFO / LIST_META_CONTEXT      -> replies, ACK          │
//!   │ SET_META_CONTEXT                     -> contexts, ACK         │
//!   │ STARTTLS -> ERR_POLICY   unknown -> ERR_UNSUP                 │
//!   │ ABORT -> ACK, close                                           │
//!   └─ GO -> INFO..., ACK ──┬── EXPORT_NAME -> size, flags ─────────┘
//!                           v
//!                     transmission
//! ```
//!
//! Oversized options, too many options, a bad magic or an unknown client
//! flag end the connection; everything else gets the error reply the spec
//! names, and negotiation goes on.

use std::sync::Arc;

use block::bitmap::DirtyBitmap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::Export;
use super::Exports;
use crate::proto::{self, Cursor};

/// Most options one client may send before we give up on it.
const MAX_OPTIONS: usize = 1024;

/// A metadata context selected with NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone)]
pub enum Context {
    BaseAllocation,
    AllocationDepth,
    Bitmap(Arc<DirtyBitmap>),
}

/// What negotiation settled on.
#[derive(Debug)]
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    pub extended: bool,
    /// Selected contexts and the ids the client knows them by.
    pub contexts: Vec<(u32, Context)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o during negotiation")]
    Io(#[from] std::io::Error),
    #[error("client sent bad option magic {0:#x}")]
    BadMagic(u64),
    #[error("client flags {0:#x} include unknown bits")]
    BadClientFlags(u32),
    #[error("option {opt} of {len} bytes is larger than {max}", max = proto::MAX_OPTION_LEN)]
    OptionTooLarge { opt: u32, len: u32 },
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("client asked for unknown export '{0}' with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client aborted negotiation")]
    Aborted,
    #[error("client without fixed newstyle sent option {0}")]
    NotFixed(u32),
}

struct Nego<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
    exports: &'a Exports,
    structured: bool,
    extended: bool,
    /// The export the selected contexts were negotiated for.
    meta_export: Option<String>,
    contexts: Vec<(u32, Context)>,
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let hdr = proto::option_reply_header(opt, kind, data.len() as u32);
    w.write_all(&hdr).await?;
    if !data.is_empty() {
        w.write_all(data).await?;
    }
    Ok(())
}

async fn reply_err<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, kind: u32, msg: &str) -> std::io::Result<()> {
    tracing::debug!(option = proto::option_name(opt), "{msg}");
    reply(w, opt, kind, msg.as_bytes()).await
}

/// Run the negotiation on a fresh connection.
pub async fn negotiate<R, W>(r: &mut R, w: &mut W, exports: &Exports) -> Result<Negotiated, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(cflags));
    }
    let fixed = cflags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
    let mut n = Nego { r, w, exports, structured: false, extended: false, meta_export: None, contexts: Vec::new() };
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let magic = n.r.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(HandshakeError::BadMagic(magic));
        }
        let opt = n.r.read_u32().await?;
        let len = n.r.read_u32().await?;
        if len > proto::MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLarge { opt, len });
        }
        data.resize(len as usize, 0);
        n.r.read_exact(&mut data).await?;
        if !fixed && opt != proto::OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixed(opt));
        }
        if let Some(done) = n.option(opt, &data, no_zeroes).await? {
            n.w.flush().await?;
            return Ok(done);
        }
        n.w.flush().await?;
    }
    Err(HandshakeError::TooManyOptions)
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Nego<'_, R, W> {
    /// Handle one option; `Some` when transmission starts.
    async fn option(&mut self, opt: u32, data: &[u8], no_zeroes: bool) -> Result<Option<Negotiated>, HandshakeError> {
        match opt {
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let Some(export) = self.exports.get(&name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                let mut b = [0u8; 10 + 124];
                b[0..8].copy_from_slice(&export.size().to_be_bytes());
                b[8..10].copy_from_slice(&export.transmission_flags().to_be_bytes());
                let n = if no_zeroes { 10 } else { 10 + 124 };
                self.w.write_all(&b[..n]).await?;
                return Ok(Some(self.finish(export)));
            }
            proto::OPT_ABORT => {
                // Best effort: the client may already have closed.
                let _ = reply(self.w, opt, proto::REP_ACK, &[]).await;
                let _ = self.w.flush().await;
                return Err(HandshakeError::Aborted);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    reply_err(self.w, opt, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    return Ok(None);
                }
                for e in self.exports.list() {
                    let mut d = Vec::with_capacity(4 + e.name().len() + e.config.description.len());
                    d.extend_from_slice(&(e.name().len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name().as_bytes());
                    d.extend_from_slice(e.config.description.as_bytes());
                    reply(self.w, opt, proto::REP_SERVER, &d).await?;
                }
                reply(self.w, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_STARTTLS => {
                reply_err(self.w, opt, proto::REP_ERR_POLICY, "TLS is not supported by this server yet").await?;
            }
            proto::OPT_STRUCTURED_REPLY | proto::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_err(self.w, opt, proto::REP_ERR_INVALID, "option takes no data").await?;
                    return Ok(None);
                }
                self.structured = true;
                if opt == proto::OPT_EXTENDED_HEADERS {
                    self.extended = true;
                }
                reply(self.w, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => return self.info_go(opt, data).await,
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => self.meta_context(opt, data).await?,
            _ => {
                reply_err(self.w, opt, proto::REP_ERR_UNSUP, &format!("option {opt} is not supported")).await?;
            }
        }
        Ok(None)
    }

    fn finish(&mut self, export: Arc<Export>) -> Negotiated {
        // Contexts negotiated for another export do not carry over.
        let contexts = if self.meta_export.as_deref() == Some(export.name()) {
            std::mem::take(&mut self.contexts)
        } else {
            Vec::new()
        };
        Negotiated { export, structured: self.structured, extended: self.extended, contexts }
    }

    async fn info_go(&mut self, opt: u32, data: &[u8]) -> Result<Option<Negotiated>, HandshakeError> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()?;
            let mut reqs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                reqs.push(c.u16()?);
            }
            (c.remaining() == 0).then_some((name.to_string(), reqs))
        })();
        let Some((name, reqs)) = parsed else {
            reply_err(self.w, opt, proto::REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO payload").await?;
            return Ok(None);
        };
        let Some(export) = self.exports.get(&name) else {
            reply_err(self.w, opt, proto::REP_ERR_UNKNOWN, &format!("export '{name}' not present")).await?;
            return Ok(None);
        };
        // An export that needs aligned requests (O_DIRECT) only serves clients
        // that asked for the block sizes, so no client meets EINVAL unawares.
        let align = export.backend.node().alignment();
        if opt == proto::OPT_GO && align > 1 && !reqs.contains(&proto::INFO_BLOCK_SIZE) {
            let msg = format!("export '{name}' requires {align}-byte aligned requests: ask for NBD_INFO_BLOCK_SIZE");
            reply_err(self.w, opt, proto::REP_ERR_BLOCK_SIZE_REQD, &msg).await?;
            return Ok(None);
        }
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&export.size().to_be_bytes());
        d.extend_from_slice(&export.transmission_flags().to_be_bytes());
        reply(self.w, opt, proto::REP_INFO, &d).await?;
        if reqs.contains(&proto::INFO_NAME) {
            let mut d = proto::INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name().as_bytes());
            reply(self.w, opt, proto::REP_INFO, &d).await?;
        }
        if reqs.contains(&proto::INFO_DESCRIPTION) && !export.config.description.is_empty() {
            let mut d = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(export.config.description.as_bytes());
            reply(self.w, opt, proto::REP_INFO, &d).await?;
        }
        let min = export.backend.node().alignment().max(1);
        let mut d = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&min.to_be_bytes());
        d.extend_from_slice(&4096u32.max(min).to_be_bytes());
        d.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
        reply(self.w, opt, proto::REP_INFO, &d).await?;
        reply(self.w, opt, proto::REP_ACK, &[]).await?;
        if opt == proto::OPT_GO {
            return Ok(Some(self.finish(export)));
        }
        Ok(None)
    }

    async fn meta_context(&mut self, opt: u32, data: &[u8]) -> Result<(), HandshakeError> {
        if !self.structured {
            reply_err(self.w, opt, proto::REP_ERR_INVALID, "negotiate structured replies first").await?;
            return Ok(());
        }
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?.to_string();
            let n = c.u32()?;
            let mut qs = Vec::new();
            for _ in 0..n {
                qs.push(c.string()?.to_string());
            }
            (c.remaining() == 0).then_some((name, qs))
        })();
        let Some((name, queries)) = parsed else {
            reply_err(self.w, opt, proto::REP_ERR_INVALID, "malformed meta context payload").await?;
            return Ok(());
        };
        let Some(export) = self.exports.get(&name) else {
            reply_err(self.w, opt, proto::REP_ERR_UNKNOWN, &format!("export '{name}' not present")).await?;
            return Ok(());
        };
        let set = opt == proto::OPT_SET_META_CONTEXT;
        let offered = export.contexts();
        let matches = |q: &str, ctx: &str| -> bool {
            if set {
                q == ctx
            } else {
                q == ctx || (q.ends_with(':') && ctx.starts_with(q)) || q == "qemu:dirty-bitmap:" && ctx.starts_with(q)
            }
        };
        let mut chosen: Vec<String> = Vec::new();
        if queries.is_empty() {
            if !set {
                chosen = offered.clone();
            }
        } else {
            for q in &queries {
                for ctx in offered.iter().filter(|c| matches(q, c)) {
                    if !chosen.contains(ctx) {
                        chosen.push(ctx.clone());
                    }
                }
            }
        }
        if set {
            self.contexts.clear();
            self.meta_export = Some(name.clone());
        }
        for (i, ctx) in chosen.iter().enumerate() {
            let id = i as u32 + 1;
            if set {
                let context = if ctx == "base:allocation" {
                    Context::BaseAllocation
                } else if ctx == "qemu:allocation-depth" {
                    Context::AllocationDepth
                } else if let Some(b) =
                    ctx.strip_prefix("qemu:dirty-bitmap:").and_then(|n| export.bitmaps.iter().find(|b| b.name() == n))
                {
                    Context::Bitmap(b.clone())
                } else {
                    continue;
                };
                self.contexts.push((id, context));
            }
            let mut d = Vec::with_capacity(4 + ctx.len());
            d.extend_from_slice(&(if set { id } else { 0 }).to_be_bytes());
            d.extend_from_slice(ctx.as_bytes());
            reply(self.w, opt, proto::REP_META_CONTEXT, &d).await?;
        }
        reply(self.w, opt, proto::REP_ACK, &[]).await?;
        Ok(())
    }
}
