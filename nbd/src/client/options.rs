//! The driver's options: what `blockdev-add` for driver `nbd` passes (QEMU's
//! names: `server`, `export`, `reconnect-delay`, ... and baton's
//! `x-baton-request-timeout`), parsed into [`NbdClientOptions`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use block::error::{BlockError, Result};
use block::options::Opts;
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

/// Where the server listens (QEMU's flat `SocketAddress`, the kinds we support).
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
        let mut o = Opts::from_map(map);
        for key in ["tls-creds", "tls-hostname"] {
            if o.take(key).is_some() {
                return Err(invalid(key, "TLS is not supported yet"));
            }
        }
        if let Some(delay) = o.u64("reconnect-delay")? {
            if delay > 0 {
                return Err(invalid("reconnect-delay", "reconnect is not implemented yet; only 0 is accepted"));
            }
        }
        // QEMU retries the first connection for this long; we try once, and
        // the handshake has its own bound.
        let _open_timeout = o.u64("open-timeout")?;
        let request_timeout = match o.i64("x-baton-request-timeout")? {
            None => Some(DEFAULT_REQUEST_TIMEOUT),
            Some(0) => None,
            Some(secs) => match u64::try_from(secs) {
                Ok(secs) if secs <= MAX_REQUEST_TIMEOUT_SECS => Some(Duration::from_secs(secs)),
                _ => {
                    return Err(invalid(
                        "x-baton-request-timeout",
                        format!(
                        "{secs} is not a number of seconds from 1 to {MAX_REQUEST_TIMEOUT_SECS} (or 0 for no timeout)"
                    ),
                    ))
                }
            },
        };
        let export = o.str("export")?.unwrap_or_default();
        if export.len() > proto::MAX_STRING {
            return Err(invalid("export", format!("longer than {} bytes", proto::MAX_STRING)));
        }
        let server = match o.take("server") {
            None => return Err(invalid("server", "parameter is missing")),
            Some(Value::Object(m)) => parse_server(Opts::from_map(m))?,
            Some(_) => return Err(invalid("server", "expected an object")),
        };
        o.finish("")?;
        Ok(Self { request_timeout, ..Self::new(server, export) })
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

fn req_server_str(s: &mut Opts, key: &str) -> Result<String> {
    match s.take(key) {
        None => Err(invalid(&format!("server.{key}"), "parameter is missing")),
        Some(Value::String(v)) => Ok(v),
        Some(_) => Err(invalid(&format!("server.{key}"), "expected a string")),
    }
}

fn parse_server(mut s: Opts) -> Result<NbdServer> {
    let kind = req_server_str(&mut s, "type")?;
    let server = match kind.as_str() {
        "inet" => {
            let host = req_server_str(&mut s, "host")?;
            let port = match s.take("port") {
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
        "unix" => NbdServer::Unix { path: PathBuf::from(req_server_str(&mut s, "path")?) },
        "fd" | "vsock" => {
            return Err(invalid("server.type", format!("'{kind}' is not supported yet; use inet or unix")))
        }
        other => return Err(invalid("server.type", format!("'{other}' is not one of inet, unix, fd, vsock"))),
    };
    s.finish("server.")?;
    Ok(server)
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
    fn bad_ports_are_refused() {
        for port in [json!("nbd"), json!(70000), json!(-1), json!(true)] {
            let e = parse(json!({"server": {"type": "inet", "host": "h", "port": port}})).unwrap_err();
            assert!(e.to_string().contains("server.port"), "{e}");
        }
    }
}
