//! The driver's options: what `blockdev-add` for driver `nbd` passes,
//! declared once as QEMU's `BlockdevOptionsNbd` (the members baton accepts:
//! `server`, `export`, `reconnect-delay`, `open-timeout`, and baton's
//! `x-baton-request-timeout`), and turned into the [`NbdClientOptions`] a
//! connection is opened with.
//!
//! The declaration gives the schema (keyval coercion for `--blockdev`); the
//! checks are the driver's own, with the messages it always had, and take
//! numbers as strings over QMP too, as the driver always did.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use block::error::{BlockError, Result};
use block::schema::{Qapi, Ty};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::proto;

/// How long connecting plus the handshake may take before the open fails.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request may wait for its reply before the connection is
/// declared dead (`x-baton-request-timeout`). Generous: a flush of a large
/// write-back cache on a slow disk can take tens of seconds, and the cost of a
/// false alarm is a dead connection (there is no reconnect yet).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `x-baton-request-timeout` in seconds; 0 turns the bound off.
pub const MAX_REQUEST_TIMEOUT_SECS: u64 = 3600;

/// QEMU's members for TLS, known and refused: TLS is not supported yet.
const TLS_MEMBERS: [&str; 2] = ["tls-creds", "tls-hostname"];

block::qapi_struct! {
    /// QEMU's `BlockdevOptionsNbd`, the members baton accepts.
    pub struct BlockdevOptionsNbd {
        "server" server: NbdServer,
        /// Export name (absent: `""`, the default export).
        "export" export: Option<String>,
        /// Only 0: there is no reconnect yet.
        "reconnect-delay" reconnect_delay: Option<u64>,
        /// Accepted: QEMU retries the first connection for this long; baton
        /// tries once, and the handshake has its own bound.
        "open-timeout" open_timeout: Option<u64>,
        /// Seconds a request may wait for its reply, 1 to
        /// [`MAX_REQUEST_TIMEOUT_SECS`]; 0: no bound. Absent:
        /// [`DEFAULT_REQUEST_TIMEOUT`].
        "x-baton-request-timeout" request_timeout: Option<i64>,
    }
}

/// Where the server listens: QEMU's `SocketAddress` (a flat union on
/// `type`), the kinds baton connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    Inet { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl fmt::Display for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdServer::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdServer::Inet { host, port } => write!(f, "{host}:{port}"),
            NbdServer::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A flat union, and `port` a string (QEMU) or a number (baton too): the
/// schema cannot say it, so [`NbdServer::from_value`] checks it.
impl Qapi for NbdServer {
    fn ty() -> Ty {
        Ty::Any
    }
}

impl<'de> Deserialize<'de> for NbdServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        NbdServer::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// What to connect to, as `blockdev-add` for driver `nbd` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdClientOptions {
    pub server: NbdServer,
    /// Export name (`""` is the default export).
    pub export: String,
    /// Bound on connecting plus the handshake.
    pub handshake_timeout: Duration,
    /// The graph node this client is, named in I/O errors (default: the URI).
    pub node_name: Option<String>,
    /// How long a request may go without its reply before the connection is
    /// declared dead (`x-baton-request-timeout`); `None`: forever.
    pub request_timeout: Option<Duration>,
}

fn invalid(option: &str, reason: impl Into<String>) -> BlockError {
    BlockError::InvalidOption { option: option.to_string(), reason: reason.into() }
}

/// An unsigned member: a JSON number, or a size as a string (keyval).
fn take_size(m: &mut Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match m.remove(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| invalid(key, "expected a non-negative integer")),
        Some(Value::String(s)) => {
            block::schema::parse_size(&s).map(Some).ok_or_else(|| invalid(key, format!("expected a size, got '{s}'")))
        }
        Some(_) => Err(invalid(key, "expected an integer")),
    }
}

/// A signed member: a JSON number, or a decimal string (keyval).
fn take_int(m: &mut Map<String, Value>, key: &str) -> Result<Option<i64>> {
    match m.remove(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| invalid(key, "expected an integer")),
        Some(Value::String(s)) => {
            s.parse().map(Some).map_err(|_| invalid(key, format!("expected an integer, got '{s}'")))
        }
        Some(_) => Err(invalid(key, "expected an integer")),
    }
}

/// A string member of `server` (`key` is its name there).
fn take_server_str(m: &mut Map<String, Value>, key: &str) -> Result<String> {
    match m.remove(key) {
        None => Err(invalid(&format!("server.{key}"), "parameter is missing")),
        Some(Value::String(v)) => Ok(v),
        Some(_) => Err(invalid(&format!("server.{key}"), "expected a string")),
    }
}

fn check_reconnect_delay(delay: Option<u64>) -> Result<()> {
    match delay {
        Some(d) if d > 0 => Err(invalid("reconnect-delay", "reconnect is not implemented yet; only 0 is accepted")),
        _ => Ok(()),
    }
}

fn request_timeout(secs: Option<i64>) -> Result<Option<Duration>> {
    match secs {
        None => Ok(Some(DEFAULT_REQUEST_TIMEOUT)),
        Some(0) => Ok(None),
        Some(secs) => match u64::try_from(secs) {
            Ok(secs) if secs <= MAX_REQUEST_TIMEOUT_SECS => Ok(Some(Duration::from_secs(secs))),
            _ => Err(invalid(
                "x-baton-request-timeout",
                format!("{secs} is not a number of seconds from 1 to {MAX_REQUEST_TIMEOUT_SECS} (or 0 for no timeout)"),
            )),
        },
    }
}

fn check_export(export: Option<&str>) -> Result<()> {
    match export {
        Some(e) if e.len() > proto::MAX_STRING => {
            Err(invalid("export", format!("longer than {} bytes", proto::MAX_STRING)))
        }
        _ => Ok(()),
    }
}

impl BlockdevOptionsNbd {
    /// Check the members `blockdev-add` leaves for the driver (everything
    /// but `driver`, `node-name` and the common ones) and decode them: the
    /// first error, in a fixed order (TLS, `reconnect-delay`,
    /// `open-timeout`, `x-baton-request-timeout`, `export`, `server`, then
    /// unknown members).
    pub fn from_map(mut m: Map<String, Value>) -> Result<Self> {
        for key in TLS_MEMBERS {
            if m.remove(key).is_some() {
                return Err(invalid(key, "TLS is not supported yet"));
            }
        }
        let reconnect_delay = take_size(&mut m, "reconnect-delay")?;
        check_reconnect_delay(reconnect_delay)?;
        let open_timeout = take_size(&mut m, "open-timeout")?;
        let request_timeout_secs = take_int(&mut m, "x-baton-request-timeout")?;
        request_timeout(request_timeout_secs)?;
        let export = match m.remove("export") {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(invalid("export", "expected a string")),
        };
        check_export(export.as_deref())?;
        let server = match m.remove("server") {
            None => return Err(invalid("server", "parameter is missing")),
            Some(v) => NbdServer::from_value(v)?,
        };
        if let Some(k) = m.keys().next() {
            return Err(invalid(k, "parameter is unexpected"));
        }
        Ok(Self { server, export, reconnect_delay, open_timeout, request_timeout: request_timeout_secs })
    }
}

impl NbdServer {
    /// Check and decode `server`: `{"type": "inet", "host", "port"}` (the
    /// port a string or a number) or `{"type": "unix", "path"}`.
    pub fn from_value(v: Value) -> Result<Self> {
        let Value::Object(mut s) = v else {
            return Err(invalid("server", "expected an object"));
        };
        let kind = take_server_str(&mut s, "type")?;
        let server = match kind.as_str() {
            "inet" => {
                let host = take_server_str(&mut s, "host")?;
                let port = match s.remove("port") {
                    None => return Err(invalid("server.port", "parameter is missing")),
                    Some(Value::String(p)) => p
                        .trim()
                        .parse::<u16>()
                        .map_err(|_| invalid("server.port", format!("expected a port number, got '{p}'")))?,
                    Some(Value::Number(n)) => n
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or_else(|| invalid("server.port", format!("expected a port number, got {n}")))?,
                    Some(_) => return Err(invalid("server.port", "expected a string or a number")),
                };
                NbdServer::Inet { host, port }
            }
            "unix" => NbdServer::Unix { path: PathBuf::from(take_server_str(&mut s, "path")?) },
            "fd" | "vsock" => {
                return Err(invalid("server.type", format!("'{kind}' is not supported yet; use inet or unix")))
            }
            other => return Err(invalid("server.type", format!("'{other}' is not one of inet, unix, fd, vsock"))),
        };
        if let Some(k) = s.keys().next() {
            return Err(invalid(&format!("server.{k}"), "parameter is unexpected"));
        }
        Ok(server)
    }
}

impl TryFrom<BlockdevOptionsNbd> for NbdClientOptions {
    type Error = BlockError;

    /// The values' own rules, as [`BlockdevOptionsNbd::from_map`] checks them.
    fn try_from(o: BlockdevOptionsNbd) -> Result<Self> {
        check_reconnect_delay(o.reconnect_delay)?;
        let request_timeout = request_timeout(o.request_timeout)?;
        check_export(o.export.as_deref())?;
        Ok(Self { request_timeout, ..Self::new(o.server, o.export.unwrap_or_default()) })
    }
}

impl NbdClientOptions {
    pub fn new(server: NbdServer, export: impl Into<String>) -> Self {
        Self {
            server,
            export: export.into(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            node_name: None,
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
        }
    }

    /// Parse the options `blockdev-add` leaves for the driver (everything but
    /// `driver`, `node-name` and the generic ones), with QEMU's names.
    pub fn from_blockdev_options(map: Map<String, Value>) -> Result<Self> {
        Self::try_from(BlockdevOptionsNbd::from_map(map)?)
    }

    /// The export as QEMU names it in `filename`: `nbd://host:port/export` or
    /// `nbd+unix:///export?socket=path`.
    pub fn uri(&self) -> String {
        match &self.server {
            NbdServer::Inet { .. } => format!("nbd://{}/{}", self.server, self.export),
            NbdServer::Unix { path } => format!("nbd+unix:///{}?socket={}", self.export, path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NbdClientOptions> {
        match v {
            Value::Object(m) => NbdClientOptions::from_blockdev_options(m),
            _ => Err(invalid("options", "not an object")),
        }
    }

    #[test]
    fn inet_port_may_be_a_string_or_a_number() {
        for port in [json!("10809"), json!(10809)] {
            let o = parse(json!({"server": {"type": "inet", "host": "::1", "port": port}, "export": "disk"})).unwrap();
            assert_eq!(o.server, NbdServer::Inet { host: "::1".into(), port: 10809 });
            assert_eq!(o.uri(), "nbd://[::1]:10809/disk");
        }
    }

    #[test]
    fn unix_uri_names_the_socket() {
        let o = parse(json!({"server": {"type": "unix", "path": "/run/x.sock"}})).unwrap();
        assert_eq!(o.export, "");
        assert_eq!(o.uri(), "nbd+unix:///?socket=/run/x.sock");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse(json!({"server": {"type": "unix", "path": "/x"}, "bogus": 1})).unwrap_err();
        assert!(e.to_string().contains("'bogus'") && e.to_string().contains("unexpected"), "{e}");
        let e = parse(json!({"server": {"type": "unix", "path": "/x", "tight": true}})).unwrap_err();
        assert!(e.to_string().contains("'server.tight'"), "{e}");
    }

    #[test]
    fn reconnect_delay_zero_is_accepted_and_positive_refused() {
        assert!(
            parse(json!({"server": {"type": "unix", "path": "/x"}, "reconnect-delay": 0, "open-timeout": 5})).is_ok()
        );
        let e = parse(json!({"server": {"type": "unix", "path": "/x"}, "reconnect-delay": 3})).unwrap_err();
        assert!(e.to_string().contains("reconnect is not implemented"), "{e}");
    }

    #[test]
    fn request_timeout_defaults_to_a_minute_zero_turns_it_off_and_bounds_are_checked() {
        let unix = json!({"type": "unix", "path": "/x"});
        let o = parse(json!({"server": unix})).unwrap();
        assert_eq!(o.request_timeout, Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(o.request_timeout, Some(Duration::from_secs(60)));
        let o = parse(json!({"server": unix, "x-baton-request-timeout": 0})).unwrap();
        assert_eq!(o.request_timeout, None);
        // Keyval (command line) values arrive as strings.
        for v in [json!(5), json!("5")] {
            let o = parse(json!({"server": unix, "x-baton-request-timeout": v})).unwrap();
            assert_eq!(o.request_timeout, Some(Duration::from_secs(5)));
        }
        let o = parse(json!({"server": unix, "x-baton-request-timeout": MAX_REQUEST_TIMEOUT_SECS})).unwrap();
        assert_eq!(o.request_timeout, Some(Duration::from_secs(MAX_REQUEST_TIMEOUT_SECS)));
        for v in
            [json!(-1), json!(MAX_REQUEST_TIMEOUT_SECS + 1), json!(u64::MAX), json!("soon"), json!(true), json!(1.5)]
        {
            let e = parse(json!({"server": unix, "x-baton-request-timeout": v})).unwrap_err();
            assert!(matches!(e, BlockError::InvalidOption { .. }), "{v}: {e}");
            assert!(e.to_string().contains("'x-baton-request-timeout'"), "{v}: {e}");
        }
        let e = parse(json!({"server": unix, "x-baton-request-timeout": 7200})).unwrap_err();
        assert!(e.to_string().contains("from 1 to 3600 (or 0 for no timeout)"), "{e}");
    }

    #[test]
    fn the_declaration_gives_keyval_its_types_and_leaves_server_to_the_driver() {
        let g = block::Graph::new();
        crate::client::register(&g);
        let kv = json!({"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "10809"},
                        "reconnect-delay": "0", "open-timeout": "5", "x-baton-request-timeout": "-5"});
        let typed = g.coerce_keyval(kv).unwrap();
        assert_eq!(
            typed,
            json!({"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "10809"},
                   "reconnect-delay": 0, "open-timeout": 5, "x-baton-request-timeout": -5})
        );
        // The QAPI struct decodes as the driver checks (the server through its own rules).
        let o: BlockdevOptionsNbd =
            block::schema::parse(json!({"server": {"type": "inet", "host": "h", "port": 1}, "export": "e"})).unwrap();
        assert_eq!(o.server, NbdServer::Inet { host: "h".into(), port: 1 });
        let e = block::schema::parse::<BlockdevOptionsNbd>(json!({"server": {"type": "vsock"}})).unwrap_err();
        assert!(e.0.contains("'server.type'"), "{e}");
    }

    #[test]
    fn bad_ports_are_refused() {
        for port in [json!("nbd"), json!(70000), json!(-1), json!(true)] {
            let e = parse(json!({"server": {"type": "inet", "host": "h", "port": port}})).unwrap_err();
            assert!(e.to_string().contains("server.port"), "{e}");
        }
    }
}
