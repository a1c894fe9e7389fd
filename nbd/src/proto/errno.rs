//! Errors on the wire: the error codes the NBD spec allows (Linux values, as
//! the spec fixes them) and their mapping to and from the block layer's
//! [`ErrorKind`].
//!
//! There is one errno table in baton, `block::error`'s (errno <->
//! [`ErrorKind`]); this module only adds what NBD itself decides: which codes
//! may cross the wire. A code the spec names passes unchanged; any other
//! errno is reduced to its kind through the block layer's table, and the kind
//! to the code the spec names for it (EIO when it names none).

use block::error::ErrorKind;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Every error code the spec allows on the wire.
const WIRE_CODES: [u32; 8] = [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN];

/// `errno` as an NBD error code, if the spec allows it on the wire.
fn allowed(errno: i32) -> Option<u32> {
    u32::try_from(errno).ok().filter(|e| WIRE_CODES.contains(e))
}

/// The NBD error code for an error kind: the kind's errno when the spec
/// allows it on the wire, else EIO.
pub fn from_kind(kind: ErrorKind) -> u32 {
    allowed(kind.errno()).unwrap_or(EIO)
}

/// Map a block-layer errno to one the NBD spec allows on the wire.
pub fn wire_errno(errno: i32) -> u32 {
    allowed(errno).unwrap_or_else(|| from_kind(ErrorKind::from_errno(errno)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::error::libc_errno;

    #[test]
    fn codes_the_spec_names_pass_unchanged() {
        for code in WIRE_CODES {
            assert_eq!(wire_errno(code as i32), code);
        }
    }

    #[test]
    fn other_errnos_go_through_their_kind() {
        for (errno, code) in [
            (libc_errno::EACCES, EPERM),
            (libc_errno::EROFS, EPERM),
            (libc_errno::EFBIG, ENOSPC),
            (libc_errno::EDQUOT, ENOSPC),
            (libc_errno::ENOENT, EIO),
            (libc_errno::EBUSY, EIO),
            (libc_errno::EAGAIN, EIO),
            (libc_errno::ETIMEDOUT, EIO),
            (0, EIO),
            (-1, EIO),
            (4095, EIO),
        ] {
            assert_eq!(wire_errno(errno), code, "errno {errno}");
        }
    }

    #[test]
    fn kinds_map_to_the_codes_the_spec_names() {
        assert_eq!(from_kind(ErrorKind::Io), EIO);
        assert_eq!(from_kind(ErrorKind::PermissionDenied), EPERM);
        assert_eq!(from_kind(ErrorKind::InvalidArgument), EINVAL);
        assert_eq!(from_kind(ErrorKind::NoSpace), ENOSPC);
        assert_eq!(from_kind(ErrorKind::Unsupported), ENOTSUP);
        assert_eq!(from_kind(ErrorKind::NotFound), EIO);
        assert_eq!(from_kind(ErrorKind::Busy), EIO);
    }
}
