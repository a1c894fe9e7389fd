//! The NBD wire protocol: constants and the fixed-size codecs shared by the
//! server and the client (handshake, options, requests, simple, structured and
//! extended replies).
//!
//! Everything here encodes into and decodes from caller-provided byte arrays:
//! no allocation, no I/O. Big-endian throughout, as the protocol says.
//!
//! ```text
//! handshake:   S: NBDMAGIC IHAVEOPT flags16   C: flags32
//! options:     C: IHAVEOPT opt32 len32 data    S: REPLY_MAGIC opt32 type32 len32 data
//!              ... until GO/EXPORT_NAME (-> transmission) or ABORT
//! transmission:
//!   compact request   (28 B): 0x25609513 flags16 type16 cookie64 offset64 len32
//!   extended request  (32 B): 0x21e41c71 flags16 type16 cookie64 offset64 len64
//!   simple reply      (16 B): 0x67446698 error32 cookie64 [data]
//!   structured chunk  (20 B): 0x668e33ef flags16 type16 cookie64 len32 payload
//!   extended chunk    (32 B): 0x6e8a278c flags16 type16 cookie64 offset64 len64 payload
//! ```

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TFLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// Block status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const STATE_DIRTY: u32 = 1 << 0;

// Errors on the wire (Linux values, as the spec fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest payload of a read or write we accept: 32 MiB, as qemu-nbd.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we accept before disconnecting.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, context name) the spec allows.
pub const MAX_STRING: usize = 4096;

/// Map a block-layer errno to one the NBD spec allows on the wire.
pub fn wire_errno(errno: i32) -> u32 {
    match errno {
        1 | 13 | 30 => EPERM,
        5 => EIO,
        12 => ENOMEM,
        22 => EINVAL,
        27 | 28 | 122 => ENOSPC,
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EIO,
    }
}

/// The name of a transmission command, for logs and errors.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        CMD_RESIZE => "NBD_CMD_RESIZE",
        _ => "an unknown command",
    }
}

/// The name of an option, for logs and errors.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// A request header, compact or extended, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (and payload length for writes).
    pub length: u64,
}

/// Size of a request header.
pub const fn request_len(extended: bool) -> usize {
    if extended {
        32
    } else {
        28
    }
}

/// Why a request header could not be decoded (the stream is out of sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("short header")]
    Short,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Request {
    /// Decode a header of `request_len(extended)` bytes.
    pub fn decode(b: &[u8], extended: bool) -> Result<Request, HeaderError> {
        if b.len() < request_len(extended) {
            return Err(HeaderError::Short);
        }
        let magic = be32(b, 0);
        let want = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
        if magic != want {
            return Err(HeaderError::BadMagic(magic));
        }
        let length = if extended { be64(b, 24) } else { u64::from(be32(b, 24)) };
        Ok(Request { flags: be16(b, 4), kind: be16(b, 6), cookie: be64(b, 8), offset: be64(b, 16), length })
    }

    /// Encode into `out`; returns the bytes used.
    pub fn encode(&self, extended: bool, out: &mut [u8; 32]) -> usize {
        out[0..4].copy_from_slice(&(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC }).to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        if extended {
            out[24..32].copy_from_slice(&self.length.to_be_bytes());
            32
        } else {
            out[24..28].copy_from_slice(&(self.length as u32).to_be_bytes());
            28
        }
    }
}

/// Encode a simple reply header (16 bytes).
pub fn simple_reply(error: u32, cookie: u64, out: &mut [u8; 32]) -> usize {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    16
}

/// Encode a structured (20 bytes) or extended (32 bytes) reply chunk header.
/// `offset` is only carried by extended headers.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
    out: &mut [u8; 32],
) -> usize {
    if extended {
        out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&kind.to_be_bytes());
        out[8..16].copy_from_slice(&cookie.to_be_bytes());
        out[16..24].copy_from_slice(&offset.to_be_bytes());
        out[24..32].copy_from_slice(&payload_len.to_be_bytes());
        32
    } else {
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&kind.to_be_bytes());
        out[8..16].copy_from_slice(&cookie.to_be_bytes());
        out[16..20].copy_from_slice(&(payload_len as u32).to_be_bytes());
        20
    }
}

/// A decoded reply header (what the client reads first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, kind: u16, cookie: u64, offset: u64, length: u64 },
}

/// Decode a reply header from its first bytes. Returns the header and its
/// size, `Ok(None)` if more bytes are needed (`b` holds at least 4).
pub fn decode_reply_header(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, HeaderError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be32(b, 0) {
        SIMPLE_REPLY_MAGIC if b.len() >= 16 => {
            Ok(Some((ReplyHeader::Simple { error: be32(b, 4), cookie: be64(b, 8) }, 16)))
        }
        STRUCTURED_REPLY_MAGIC if b.len() >= 20 => Ok(Some((
            ReplyHeader::Chunk {
                flags: be16(b, 4),
                kind: be16(b, 6),
                cookie: be64(b, 8),
                offset: 0,
                length: u64::from(be32(b, 16)),
            },
            20,
        ))),
        EXTENDED_REPLY_MAGIC if b.len() >= 32 => Ok(Some((
            ReplyHeader::Chunk {
                flags: be16(b, 4),
                kind: be16(b, 6),
                cookie: be64(b, 8),
                offset: be64(b, 16),
                length: be64(b, 24),
            },
            32,
        ))),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => Ok(None),
        m => Err(HeaderError::BadMagic(m)),
    }
}

/// Size of a reply header given its magic, if known.
pub fn reply_header_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(16),
        STRUCTURED_REPLY_MAGIC => Some(20),
        EXTENDED_REPLY_MAGIC => Some(32),
        _ => None,
    }
}

/// Encode an option reply header (20 bytes).
pub fn option_reply_header(opt: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&opt.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A cursor over an option's payload that never reads past its end.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| be64(b, 0))
    }
    /// A u32-length-prefixed UTF-8 string of at most MAX_STRING bytes.
    pub fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.bytes(n)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trips_in_both_forms() {
        let r = Request { flags: CMD_FLAG_FUA, kind: CMD_WRITE, cookie: 0xdead_beef, offset: 1 << 40, length: 4096 };
        for ext in [false, true] {
            let mut b = [0u8; 32];
            let n = r.encode(ext, &mut b);
            assert_eq!(n, request_len(ext));
            assert_eq!(Request::decode(&b[..n], ext), Ok(r));
        }
    }

    #[test]
    fn wrong_magic_is_detected() {
        let r = Request { flags: 0, kind: CMD_READ, cookie: 1, offset: 0, length: 1 };
        let mut b = [0u8; 32];
        let n = r.encode(false, &mut b);
        assert_eq!(Request::decode(&b[..n], true), Err(HeaderError::Short));
        let n = r.encode(true, &mut b);
        assert!(matches!(Request::decode(&b[..n], false), Err(HeaderError::BadMagic(_))));
    }

    proptest! {
        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), ext in any::<bool>()) {
            let _ = Request::decode(&bytes, ext);
            let _ = decode_reply_header(&bytes);
        }

        #[test]
        fn cursor_never_reads_past_the_end(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut c = Cursor::new(&bytes);
            while c.remaining() > 0 {
                if c.string().is_none() && c.u16().is_none() { break; }
            }
        }
    }
}
