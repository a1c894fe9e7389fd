//! `blockdev-add` options with QEMU's names.
//!
//! [`BlockdevOptionsBase`] declares the members every driver shares (QEMU's
//! `BlockdevOptionsBase`); the graph parses them once and leaves the rest to
//! the driver, which declares its own members in its module. Unknown members
//! are errors (QEMU's QAPI rejects them too), so a typo never silently
//! changes behaviour.
//!
//! [`Opts`] is the untyped map a driver registered with a constructor
//! (`Graph::register_driver`, the NBD client) consumes by hand; it accepts
//! keyval strings because such drivers have no schema to coerce them by.

use serde_json::{Map, Value};

use crate::error::{BlockError, Result};
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

/// A JSON object of options being consumed; whatever remains at the end is unexpected.
#[derive(Debug)]
pub struct Opts {
    map: Map<String, Value>,
}

fn bad(option: &str, reason: impl Into<String>) -> BlockError {
    BlockError::InvalidOption { option: option.to_string(), reason: reason.into() }
}

impl Opts {
    pub fn new(v: &Value) -> Result<Self> {
        match v {
            Value::Object(m) => Ok(Self { map: m.clone() }),
            _ => Err(bad("options", "expected a JSON object")),
        }
    }

    pub fn from_map(map: Map<String, Value>) -> Self {
        Self { map }
    }

    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub fn str(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(key, "expected a string")),
        }
    }

    pub fn req_str(&mut self, key: &str) -> Result<String> {
        self.str(key)?.ok_or_else(|| bad(key, "parameter is missing"))
    }

    /// A boolean; also accepts QEMU's keyval strings "on"/"off"/"true"/"false".
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) => match s.as_str() {
                "on" | "true" | "yes" => Ok(Some(true)),
                "off" | "false" | "no" => Ok(Some(false)),
                _ => Err(bad(key, format!("expected on or off, got '{s}'"))),
            },
            Some(_) => Err(bad(key, "expected a boolean")),
        }
    }

    /// An unsigned integer; also accepts decimal strings (keyval) and size suffixes (k, M, G, T).
    pub fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| bad(key, "expected a non-negative integer")),
            Some(Value::String(s)) => {
                parse_size(&s).map(Some).ok_or_else(|| bad(key, format!("expected a size, got '{s}'")))
            }
            Some(_) => Err(bad(key, "expected an integer")),
        }
    }

    pub fn i64(&mut self, key: &str) -> Result<Option<i64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| bad(key, "expected an integer")),
            Some(Value::String(s)) => {
                s.parse().map(Some).map_err(|_| bad(key, format!("expected an integer, got '{s}'")))
            }
            Some(_) => Err(bad(key, "expected an integer")),
        }
    }

    /// A nested object (e.g. `cache`), or an empty one when absent.
    pub fn object(&mut self, key: &str) -> Result<Opts> {
        match self.take(key) {
            None => Ok(Opts { map: Map::new() }),
            Some(Value::Object(m)) => Ok(Opts { map: m }),
            Some(_) => Err(bad(key, "expected an object")),
        }
    }

    /// One of `choices`.
    pub fn choice(&mut self, key: &str, choices: &[&str]) -> Result<Option<String>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) if choices.contains(&s.as_str()) => Ok(Some(s)),
            Some(s) => Err(bad(key, format!("'{s}' is not one of {}", choices.join(", ")))),
        }
    }

    /// Fail on the first member nobody consumed. `prefix` is the parent key ("cache.").
    pub fn finish(self, prefix: &str) -> Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(BlockError::InvalidOption {
                option: format!("{prefix}{k}"),
                reason: "parameter is unexpected".into(),
            }),
        }
    }

    pub fn into_map(self) -> Map<String, Value> {
        self.map
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

    #[test]
    fn unknown_member_is_an_error_naming_it() {
        let mut o = Opts::new(&serde_json::json!({"filename": "a", "bogus": 1})).unwrap();
        o.req_str("filename").unwrap();
        let e = o.finish("").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
