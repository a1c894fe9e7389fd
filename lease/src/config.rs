//! The daemon's `--lease` option, QEMU keyval style:
//!
//! ```text
//! --lease backend=file,dir=/var/lib/baton/leases,key=vm1,ttl=10000[,margin=2000][,owner=NAME]
//! --lease backend=etcd,endpoints=http://10.0.0.1:2379+http://10.0.0.2:2379,key=vm1,ttl=10000
//! ```
//!
//! `ttl` and `margin` are milliseconds; `ttl` is within [`TTL_MS`], `margin`
//! shorter than `ttl` and defaults to [`default_margin`]. `owner` is this
//! daemon's name in the store (default: the host's name and the process id,
//! so two daemons never share one). etcd endpoints are
//! separated by `+` (a character URLs with host and port do not use).

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{LeaseError, Result};
use crate::etcd::EtcdLease;
use crate::file::FileLease;
use crate::key::Key;
use crate::Lease;

/// Accepted `ttl` values, in milliseconds.
pub const TTL_MS: RangeInclusive<u64> = 1000..=600_000;

/// Where the lease is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A lease file in `dir` (see [`FileLease`]).
    File { dir: PathBuf },
    /// An etcd v3 cluster (see [`EtcdLease`]).
    Etcd { endpoints: Vec<String> },
}

/// A parsed `--lease` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub backend: Backend,
    pub key: Key,
    pub ttl: Duration,
    /// How long before the store's expiry this daemon stops its guest.
    pub margin: Duration,
    /// This daemon's name in the store, if given.
    pub owner: Option<String>,
}

/// The default margin: a fifth of the ttl, at least 100 ms.
pub fn default_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(100))
}

/// Parses `key=value,key=value,...`.
pub fn parse_option(text: &str) -> Result<LeaseConfig> {
    let mut fields = Fields::default();
    for part in text.split(',') {
        let (name, value) = part.split_once('=').ok_or_else(|| bad(format!("{part:?} is not name=value")))?;
        if value.is_empty() {
            return Err(bad(format!("{name} has no value")));
        }
        let slot = match name {
            "backend" => &mut fields.backend,
            "dir" => &mut fields.dir,
            "endpoints" => &mut fields.endpoints,
            "key" => &mut fields.key,
            "ttl" => &mut fields.ttl,
            "margin" => &mut fields.margin,
            "owner" => &mut fields.owner,
            _ => {
                return Err(bad(format!(
                    "unknown parameter {name:?} (expected backend, dir, endpoints, key, ttl, margin, owner)"
                )))
            }
        };
        if slot.replace(value.to_owned()).is_some() {
            return Err(bad(format!("{name} is given twice")));
        }
    }
    fields.into_config()
}

impl LeaseConfig {
    /// Opens the configured backend.
    pub fn open(&self) -> Result<Arc<dyn Lease>> {
        match &self.backend {
            Backend::File { dir } => Ok(Arc::new(FileLease::new(dir, self.key.as_str(), self.ttl, self.margin)?)),
            Backend::Etcd { endpoints } => {
                Ok(Arc::new(EtcdLease::new(endpoints, self.key.as_str(), self.ttl, self.margin)?))
            }
        }
    }
}

#[derive(Default)]
struct Fields {
    backend: Option<String>,
    dir: Option<String>,
    endpoints: Option<String>,
    key: Option<String>,
    ttl: Option<String>,
    margin: Option<String>,
    owner: Option<String>,
}

impl Fields {
    fn into_config(self) -> Result<LeaseConfig> {
        let key = Key::new(&required(self.key, "key")?)?;
        let ttl = Duration::from_millis(millis(&required(self.ttl, "ttl")?, "ttl")?);
        if !TTL_MS.contains(&(ttl.as_millis() as u64)) {
            return Err(bad(format!("ttl must be {} to {} ms", TTL_MS.start(), TTL_MS.end())));
        }
        let margin = match self.margin {
            Some(m) => Duration::from_millis(millis(&m, "margin")?),
            None => default_margin(ttl),
        };
        if margin.is_zero() || margin >= ttl {
            return Err(bad(format!("margin must be at least 1 ms and shorter than the ttl ({} ms)", ttl.as_millis())));
        }
        let backend = match required(self.backend, "backend")?.as_str() {
            "file" => {
                refuse(self.endpoints, "endpoints", "file")?;
                Backend::File { dir: PathBuf::from(required(self.dir, "dir")?) }
            }
            "etcd" => {
                refuse(self.dir, "dir", "etcd")?;
                let endpoints = required(self.endpoints, "endpoints")?;
                let endpoints: Vec<String> = endpoints.split('+').map(str::to_owned).collect();
                if endpoints.iter().any(String::is_empty) {
                    return Err(bad("endpoints has an empty entry (separate endpoints with '+')".into()));
                }
                Backend::Etcd { endpoints }
            }
            other => return Err(bad(format!("unknown backend {other:?} (expected file or etcd)"))),
        };
        if let Some(o) = &self.owner {
            crate::key::check_owner(o)?;
        }
        Ok(LeaseConfig { backend, key, ttl, margin, owner: self.owner })
    }
}

fn required(v: Option<String>, name: &str) -> Result<String> {
    v.ok_or_else(|| bad(format!("{name} is required")))
}

fn refuse(v: Option<String>, name: &str, backend: &str) -> Result<()> {
    match v {
        Some(_) => Err(bad(format!("{name} does not apply to backend={backend}"))),
        None => Ok(()),
    }
}

fn millis(v: &str, name: &str) -> Result<u64> {
    v.parse().map_err(|_| bad(format!("{name}={v:?} is not a whole number of milliseconds")))
}

fn bad(msg: String) -> LeaseError {
    LeaseError::InvalidOption(msg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn err(text: &str) -> String {
        parse_option(text).unwrap_err().to_string()
    }

    #[test]
    fn a_file_option_parses_with_the_default_margin() {
        let c = parse_option("backend=file,dir=/var/lib/baton/leases,key=vm1,ttl=10000").unwrap();
        assert_eq!(c.backend, Backend::File { dir: "/var/lib/baton/leases".into() });
        assert_eq!((c.key.as_str(), c.ttl, c.margin), ("vm1", Duration::from_secs(10), Duration::from_secs(2)));
        let c = parse_option("ttl=1000,key=k,backend=file,dir=d,margin=50").unwrap();
        assert_eq!(c.margin, Duration::from_millis(50));
        assert_eq!(default_margin(Duration::from_millis(300)), Duration::from_millis(100));
    }

    #[test]
    fn an_etcd_option_opens_an_etcd_lease_without_connecting() {
        let c = parse_option("backend=etcd,endpoints=http://a:2379+http://b:2379,key=vm1,ttl=5000").unwrap();
        assert_eq!(c.backend, Backend::Etcd { endpoints: vec!["http://a:2379".into(), "http://b:2379".into()] });
        assert_eq!(c.open().unwrap().key(), "vm1");
    }

    #[test]
    fn a_file_option_opens_a_file_lease() {
        let dir = tempfile::tempdir().unwrap();
        let c = parse_option(&format!("backend=file,dir={},key=vm1,ttl=1000", dir.path().display())).unwrap();
        assert_eq!(c.open().unwrap().key(), "vm1");
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let cases = [
            ("backend=file,dir=d,key=vm1,ttl=1000,colour=red", "unknown parameter \"colour\""),
            ("backend=file,dir=,key=vm1,ttl=1000", "dir has no value"),
            ("backend=file,dir=d,key=vm1,ttl", "\"ttl\" is not name=value"),
            ("backend=file,dir=d,key=vm1", "ttl is required"),
            ("backend=file,key=vm1,ttl=1000", "dir is required"),
            ("backend=file,dir=d,key=vm1,ttl=ten", "ttl=\"ten\" is not a whole number"),
            ("backend=file,dir=d,key=vm1,ttl=999", "ttl must be 1000 to 600000 ms"),
            ("backend=file,dir=d,key=vm1,ttl=600001", "ttl must be 1000 to 600000 ms"),
            ("backend=file,dir=d,key=vm1,ttl=1000,margin=1000", "margin must be"),
            ("backend=file,dir=d,key=vm1,ttl=1000,ttl=2000", "ttl is given twice"),
            ("backend=nfs,dir=d,key=vm1,ttl=1000", "unknown backend \"nfs\""),
            ("backend=file,dir=d,key=../x,ttl=1000", "invalid lease key \"../x\""),
            ("backend=etcd,endpoints=a++b,key=vm1,ttl=1000", "empty entry"),
            ("backend=file,dir=d,endpoints=a,key=vm1,ttl=1000", "endpoints does not apply"),
            ("", "\"\" is not name=value"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "{text:?}: {got:?} lacks {want:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_option_never_panics(text in ".{0,200}") {
            let _ = parse_option(&text);
        }

        #[test]
        fn parse_option_takes_any_ttl_in_range(ttl in 1000u64..=600_000) {
            let c = parse_option(&format!("backend=file,dir=d,key=k,ttl={ttl}")).unwrap();
            proptest::prop_assert!(c.margin < c.ttl);
        }
    }
}
