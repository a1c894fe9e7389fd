//! QMP monitors: the socket, the wire protocol of one session, and events.
//!
//! ```text
//!  connect ─> greeting {"QMP": {version, capabilities: []}}
//!     │
//!  capabilities negotiation: only `qmp_capabilities` is accepted
//!     │   (anything else: CommandNotFound)
//!     v
//!  command mode: {"execute", "arguments"?, "id"?} -> {"return"|"error", "id"?}
//!               events {"event", "data", "timestamp"} to every monitor
//! ```
//!
//! Input is a stream of JSON objects (no framing needed; newlines are
//! whitespace). A message larger than `MAX_MESSAGE`, malformed JSON, or
//! nesting deeper than serde_json's limit is answered with an error and the
//! input is resynchronised at the next newline; the session stays usable.
//! Commands run in their own task: a client that disconnects mid-command
//! does not cancel it halfway.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::error::{ErrorClass, QmpError};
use super::table;
use crate::daemon::Daemon;

/// Largest message accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting accepted (QEMU's JSON parser allows 1024 too).
pub const MAX_NESTING: usize = 1024;

/// A JSON value parsed strictly: duplicate keys and nesting deeper than
/// MAX_NESTING are errors (serde_json alone keeps the last duplicate).
struct Strict(Value);

struct StrictSeed(usize);

impl<'de> serde::de::DeserializeSeed<'de> for StrictSeed {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor(self.0))
    }
}

struct StrictVisitor(usize);

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map(Value::Number).unwrap_or(Value::Null))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.0 >= MAX_NESTING {
            return Err(serde::de::Error::custom("too deeply nested"));
        }
        let mut v = Vec::new();
        while let Some(x) = seq.next_element_seed(StrictSeed(self.0 + 1))? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.0 >= MAX_NESTING {
            return Err(serde::de::Error::custom("too deeply nested"));
        }
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom("duplicate key"));
            }
            let v = map.next_value_seed(StrictSeed(self.0 + 1))?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        StrictSeed(0).deserialize(d).map(Strict)
    }
}

use serde::de::DeserializeSeed;

/// Bind a monitor socket readable and writable by the owner only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    // Create it 0600 from the start: no window in which others may connect.
    // Bind and listen under a temporary name, then rename: the socket
    // appears at `path` already listening (a client that connects as soon
    // as the file exists is never refused between bind and listen).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(&tmp);
    nix::sys::stat::umask(old);
    let l = l?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// Accept monitors forever.
pub async fn serve(d: Arc<Daemon>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let d = d.clone();
                tokio::spawn(async move { session(d, s).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "monitor accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push_str("\r\n");
    w.write_all(line.as_bytes()).await
}

fn error_reply(e: &QmpError, id: Option<Value>) -> Value {
    let mut v = json!({"error": e.to_json()});
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}

/// What the parser found at the front of the input buffer.
enum Parsed {
    Message(Value, usize),
    Incomplete,
    Bad(String, usize),
}

/// Parse one JSON value from the front of `buf`.
fn parse_one(buf: &[u8]) -> Parsed {
    let start = buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
    if start == buf.len() {
        return Parsed::Incomplete;
    }
    let mut de = serde_json::Deserializer::from_slice(&buf[start..]);
    // Depth is bounded by Strict (MAX_NESTING) instead of serde_json's 128.
    de.disable_recursion_limit();
    let mut it = de.into_iter::<Strict>();
    match it.next() {
        Some(Ok(Strict(v))) if it.byte_offset() > MAX_MESSAGE => {
            let _ = v;
            Parsed::Bad(format!("JSON message exceeds the {MAX_MESSAGE}-byte limit"), start + it.byte_offset())
        }
        Some(Ok(Strict(v))) => Parsed::Message(v, start + it.byte_offset()),
        Some(Err(e)) if e.is_eof() => Parsed::Incomplete,
        Some(Err(e)) => {
            // Resynchronise after the next newline (or drop everything seen).
            let skip = buf[start..].iter().position(|&b| b == b'\n').map(|p| start + p + 1).unwrap_or(buf.len());
            // QEMU's parse errors carry no position; drop serde_json's.
            let msg = e.to_string();
            let msg = msg.rfind(" at line ").map(|i| &msg[..i]).unwrap_or(&msg);
            Parsed::Bad(format!("JSON parse error, {msg}"), skip)
        }
        None => Parsed::Incomplete,
    }
}

/// One monitor connection.
pub async fn session(d: Arc<Daemon>, stream: UnixStream) {
    let (mut r, mut w) = stream.into_split();
    let greeting = json!({"QMP": {"version": super::control::version(), "capabilities": []}});
    if send(&mut w, &greeting).await.is_err() {
        return;
    }
    let mut negotiated = false;
    let mut events: Option<tokio::sync::broadcast::Receiver<Value>> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    // While an oversized message is being skipped, drop input up to a newline.
    let mut skipping = false;
    loop {
        // Handle every complete message already buffered.
        loop {
            if skipping {
                match buf.iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        buf.drain(..=p);
                        skipping = false;
                    }
                    None => {
                        buf.clear();
                        break;
                    }
                }
            }
            match parse_one(&buf) {
                Parsed::Incomplete => {
                    if buf.len() > MAX_MESSAGE {
                        let e = QmpError::generic(format!("JSON message exceeds the {MAX_MESSAGE}-byte limit"));
                        if send(&mut w, &error_reply(&e, None)).await.is_err() {
                            return;
                        }
                        buf.clear();
                        skipping = true;
                    }
                    break;
                }
                Parsed::Bad(msg, skip) => {
                    buf.drain(..skip);
                    if send(&mut w, &error_reply(&QmpError::generic(msg), None)).await.is_err() {
                        return;
                    }
                }
                Parsed::Message(v, used) => {
                    buf.drain(..used);
                    let reply = handle(&d, v, &mut negotiated).await;
                    if negotiated && events.is_none() {
                        events = Some(d.subscribe());
                    }
                    // Events raised by the command go out before its reply, as in QEMU.
                    if let Some(rx) = events.as_mut() {
                        while let Ok(ev) = rx.try_recv() {
                            if send(&mut w, &ev).await.is_err() {
                                return;
                            }
                        }
                    }
                    let sent = send(&mut w, &reply).await;
                    let _ = w.flush().await;
                    d.reply_sent();
                    if sent.is_err() {
                        return;
                    }
                }
            }
        }
        let n = tokio::select! {
            r = r.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            ev = recv_event(&mut events) => {
                match ev {
                    Some(ev) => if send(&mut w, &ev).await.is_err() { return },
                    None => events = None,
                }
                continue;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn recv_event(rx: &mut Option<tokio::sync::broadcast::Receiver<Value>>) -> Option<Value> {
    match rx {
        None => std::future::pending().await,
        Some(rx) => loop {
            match rx.recv().await {
                Ok(v) => return Some(v),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("monitor too slow: {n} events dropped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        },
    }
}

/// Validate one message and run it; returns the reply.
async fn handle(d: &Arc<Daemon>, v: Value, negotiated: &mut bool) -> Value {
    let Value::Object(mut m) = v else {
        return error_reply(&QmpError::generic("QMP input must be a JSON object"), None);
    };
    let id = m.remove("id");
    if m.contains_key("exec-oob") {
        return error_reply(
            &QmpError::generic("QMP input member 'exec-oob' is unexpected: out-of-band execution is not supported"),
            id,
        );
    }
    let name = match m.remove("execute") {
        None => return error_reply(&QmpError::generic("QMP input lacks member 'execute'"), id),
        Some(Value::String(s)) => s,
        Some(_) => return error_reply(&QmpError::generic("QMP input member 'execute' must be a string"), id),
    };
    let args = match m.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return error_reply(&QmpError::generic("QMP input member 'arguments' must be an object"), id),
    };
    if let Some(k) = m.keys().next() {
        return error_reply(&QmpError::generic(format!("QMP input member '{k}' is unexpected")), id);
    }
    if name == "qmp_capabilities" {
        if *negotiated {
            return error_reply(
                &QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                ),
                id,
            );
        }
        if let Some(cmd) = table::find(&name) {
            if let Err(e) = table::dispatch(d, cmd, args).await {
                return error_reply(&e, id);
            }
        }
        *negotiated = true;
        return with_id(json!({"return": {}}), id);
    }
    if !*negotiated {
        return error_reply(
            &QmpError::new(ErrorClass::CommandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'"),
            id,
        );
    }
    let Some(cmd) = table::find(&name) else {
        return error_reply(&table::not_found(&name), id);
    };
    // Run to completion even if this client goes away; one command at a time,
    // except those that must work while another one hangs (yank).
    let d2 = d.clone();
    let task = tokio::spawn(async move {
        let _bql = if super::yank::WITHOUT_COMMAND_LOCK.contains(&cmd.name) { None } else { Some(d2.bql.lock().await) };
        table::dispatch(&d2, cmd, args).await
    });
    match task.await {
        Ok(Ok(ret)) => with_id(json!({"return": ret}), id),
        Ok(Err(e)) => error_reply(&e, id),
        Err(e) => error_reply(&QmpError::generic(format!("command failed: {e}")), id),
    }
}

fn with_id(mut v: Value, id: Option<Value>) -> Value {
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Value, String> {
        match parse_one(s.as_bytes()) {
            Parsed::Message(v, _) => Ok(v),
            Parsed::Bad(m, _) => Err(m),
            Parsed::Incomplete => Err("incomplete".into()),
        }
    }

    #[test]
    fn duplicate_keys_are_parse_errors() {
        let e = parse(r#"{"execute": "x", "execute": "y"}"#).unwrap_err();
        assert!(e.contains("duplicate key"), "{e}");
        assert!(parse(r#"{"a": {"b": 1, "b": 2}}"#).is_err());
    }

    #[test]
    fn nesting_is_bounded_without_overflowing_the_stack() {
        let deep_ok = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(parse(&deep_ok).is_ok());
        let too_deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let e = parse(&too_deep).unwrap_err();
        assert!(e.contains("nested"), "{e}");
    }
}
