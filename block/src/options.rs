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
