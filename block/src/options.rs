//! `blockdev-add` options with QEMU's names.
//!
//! [`BlockdevOptionsBase`] declares the members every driver shares (QEMU's
//! `BlockdevOptionsBase`); the graph parses them once and leaves the rest to
//! the driver, which declares its own members in its module. Unknown members
//! are errors (QEMU's QAPI rejects them too), so a typo never silently
//! changes behaviour.

use serde_json::{Map, Value};

use crate::error::Result;
use crate::schema::{self, QapiObject};

crate::qapi_enum! {
    /// What discards do (QEMU's `BlockdevDiscardOptions`).
    pub enum BlockdevDiscardOptions { "ignore" Ignore, "unmap" Unmap }
}

crate::qapi_enum! {
    /// QEMU's `BlockdevDetectZeroesOptions` (accepted; baton does not detect zeroes).
    pub enum BlockdevDetectZeroesOptions { "off" Off, "on" On, "unmap" Unmap }
}

crate::qapi_struct! {
    /// QEMU's `BlockdevCacheOptions`.
    pub struct BlockdevCacheOptions {
        "direct" direct: Option<bool>,
        /// Accepted; flushes always reach the storage.
        "no-flush" no_flush: Option<bool>,
    }
}

crate::qapi_struct! {
    /// The members of `blockdev-add` common to every driver.
    pub struct BlockdevOptionsBase {
        "driver" driver: String,
        "node-name" node_name: Option<String>,
        "discard" discard: Option<BlockdevDiscardOptions>,
        "cache" cache: Option<BlockdevCacheOptions>,
        "read-only" read_only: Option<bool>,
        /// Accepted; a node is writable unless `read-only` says otherwise.
        "auto-read-only" auto_read_only: Option<bool>,
        /// Accepted; image locks follow the permissions users take.
        "force-share" force_share: Option<bool>,
        /// Accepted; baton does not detect zeroes.
        "detect-zeroes" detect_zeroes: Option<BlockdevDetectZeroesOptions>,
        "active" active: Option<bool>,
    }
}

impl BlockdevOptionsBase {
    /// Take the common members out of `options` and check them; the rest
    /// (the driver's own members) is returned untouched.
    pub fn split(mut options: Map<String, Value>) -> Result<(Self, Map<String, Value>)> {
        let mut base = Map::new();
        for f in Self::fields() {
            if let Some(v) = options.remove(f.name) {
                base.insert(f.name.to_string(), v);
            }
        }
        Ok((schema::parse(Value::Object(base))?, options))
    }
}

/// Parse "1024", "64k", "1M", "2G", "1T", "1.5G" (binary multiples, as
/// QEMU's `qemu_strtosz`), for command-line sizes outside `--blockdev`
/// (`baton demo --disk`, `--vm memory=`); `--blockdev` sizes go through the
/// schema's keyval coercion ([`crate::schema::parse_size`]).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if num.contains('.') {
        let f: f64 = num.parse().ok()?;
        if !(0.0..1.8e19).contains(&f) {
            return None;
        }
        let v = f * mult as f64;
        return (v < 1.8e19).then_some(v as u64);
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }
}
