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
//!
//! One file per concept: [`constants`] (magics, flags, commands, limits),
//! [`option`] (option codes and replies), [`request`] and [`reply`] (the
//! transmission headers), [`errno`] (error codes on the wire and the block
//! layer's errors), [`cursor`] (reading payloads). Everything is re-exported
//! here, so users write `proto::CMD_READ`, `proto::Request`.

pub mod constants;
pub mod cursor;
pub mod errno;
pub mod option;
pub mod reply;
pub mod request;

pub use constants::*;
pub use cursor::Cursor;
pub use errno::{wire_errno, EINVAL, EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN};
pub use option::*;
pub use reply::*;
pub use request::*;

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
