//! Transmission requests: the compact (28-byte) and extended (32-byte)
//! request header codec.

use super::{be16, be32, be64, HeaderError, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC};

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
