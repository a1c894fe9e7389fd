//! Transmission replies: simple reply headers, structured and extended
//! reply chunk headers, and decoding either kind on the client side.

use super::{be16, be32, be64, HeaderError, EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

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
