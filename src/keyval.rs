//! QEMU's `KEY=VALUE,...` option syntax ("keyval", as in QEMU's
//! `util/keyval.c`) and the "JSON or keyval" rule of
//! `qemu-storage-daemon --blockdev/--object/--export/--monitor/...`.
//!
//! # Syntax
//!
//! ```text
//! key-vals     = [ key-val-1st { ',' key-val } [ ',' ] ]
//! key-val-1st  = val-no-key | key-val        (val-no-key only with an implied key)
//! key-val      = key '=' val
//! key          = key-fragment { '.' key-fragment }
//! key-fragment = qapi-name | index           (the first fragment must be a qapi-name)
//! qapi-name    = [ '__' RFQDN '_' ] [A-Za-z] [A-Za-z0-9_-]*
//! index        = [0-9]+
//! val          = { [^,] | ',,' }             (",," is an escaped ',')
//! val-no-key   = [^=,]+                      (no escapes)
//! ```
//!
//! The result is a JSON object whose leaves are all *strings*: the
//! consumer converts `"on"`, `"off"`, `"5"` according to its schema
//! (for `--blockdev`, `block::Graph::coerce_keyval` with the drivers' schemas).
//! A dotted key is a path from the root: `cache.direct=on` gives
//! `{"cache": {"direct": "on"}}`.  An object whose members are all
//! indexes becomes an array, and its indexes must be exactly `0..n`
//! (in any order): `inject-error.0.event=read_aio` gives
//! `{"inject-error": [{"event": "read_aio"}]}`.
//!
//! With an implied key (e.g. `"backend"` for `--chardev`), the first
//! element may omit `KEY=`: `socket,path=/s` means
//! `backend=socket,path=/s`.
//!
//! Errors: an invalid or empty key or key fragment, a fragment longer
//! than 127 bytes, a missing `=`, a path used both as a scalar and as an
//! object/array (or as both an object and an array), and a gap in array
//! indexes.  Unlike QEMU (where the last one wins), a key given twice is
//! rejected too.  The `help`/`?` pseudo-parameter is not special here.
//!
//! [`parse_option`] accepts either this syntax or, when the string
//! starts with `{` (after whitespace), a JSON object.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The longest key fragment QEMU accepts, in bytes.
const MAX_FRAGMENT_LEN: usize = 127;

/// Why an option string was rejected.
#[derive(Debug, thiserror::Error)]
pub enum KeyvalError {
    /// A key (or one of its fragments) is empty or has invalid characters.
    #[error("invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A key fragment is longer than 127 bytes.
    #[error("parameter '{0}' is too long")]
    TooLong(String),
    /// An element other than an implied first one has no `=`.
    #[error("expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    /// The same key was given twice.
    #[error("parameter '{0}' is duplicate")]
    Duplicate(String),
    /// A path is used both as a scalar and as an object, or both as an
    /// object and an array; holds the path prefix including its final `.`.
    #[error("parameters '{0}*' used inconsistently")]
    Inconsistent(String),
    /// Array indexes are not dense; holds the first missing element.
    #[error("parameter '{0}' missing")]
    MissingIndex(String),
    /// The string looked like JSON but did not parse.
    #[error("invalid json: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON parsed, but is not an object.
    #[error("json option must be an object, not {0}")]
    NotObject(&'static str),
}

/// A parsed-but-not-yet-listified value: strings and objects only.
#[derive(Debug)]
enum Node {
    Leaf(String),
    Dict(BTreeMap<String, Node>),
}

/// Parse `s` as JSON if it starts with `{` (after whitespace), else as
/// keyval with `implied_key` (see [`parse_keyval`]).
pub fn parse_option(s: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, KeyvalError> {
    if s.trim_start().starts_with('{') {
        parse_json_object(s)
    } else {
        parse_keyval(s, implied_key)
    }
}

/// Parse `s` in QEMU's `KEY=VALUE,...` syntax (see the module docs).
///
/// If `implied_key` is given and the first element has no `=`, that
/// element is the value of `implied_key`.  All leaves are strings.
pub fn parse_keyval(s: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, KeyvalError> {
    let mut root = BTreeMap::new();
    let mut rest = s;
    let mut implied = implied_key;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied)?;
        implied = None;
    }
    let mut out = Map::new();
    for (key, node) in root {
        let value = listify(node, &format!("{key}."))?;
        out.insert(key, value);
    }
    Ok(out)
}

fn parse_json_object(s: &str) -> Result<Map<String, Value>, KeyvalError> {
    match serde_json::from_str::<Value>(s)? {
        Value::Object(map) => Ok(map),
        Value::Null => Err(KeyvalError::NotObject("null")),
        Value::Bool(_) => Err(KeyvalError::NotObject("a boolean")),
        Value::Number(_) => Err(KeyvalError::NotObject("a number")),
        Value::String(_) => Err(KeyvalError::NotObject("a string")),
        Value::Array(_) => Err(KeyvalError::NotObject("an array")),
    }
}

/// Parse one element at the start of `params` into `root`; return the
/// rest of the string after the element and its terminating `,`.
fn parse_one<'a>(
    root: &mut BTreeMap<String, Node>,
    params: &'a str,
    implied_key: Option<&str>,
) -> Result<&'a str, KeyvalError> {
    let len = params.find(['=', ',']).unwrap_or(params.len());
    let has_equals = params[len..].starts_with('=');

    if let Some(implied) = implied_key.filter(|_| len > 0 && !has_equals) {
        // `val-no-key`: the whole element, without escapes, is the value.
        let fragments = parse_key(implied)?;
        put(root, &fragments, implied, params[..len].to_owned())?;
        let rest = &params[len..];
        return Ok(rest.strip_prefix(',').unwrap_or(rest));
    }

    let key = &params[..len];
    let fragments = parse_key(key)?;
    if !has_equals {
        return Err(KeyvalError::ExpectedEquals(key.to_owned()));
    }
    let (value, rest) = parse_value(&params[len + 1..]);
    put(root, &fragments, key, value)?;
    Ok(rest)
}

/// Read a value up to an unescaped `,` (consumed) or the end; `,,` is `,`.
fn parse_value(mut s: &str) -> (String, &str) {
    let mut value = String::new();
    while let Some(comma) = s.find(',') {
        value.push_str(&s[..comma]);
        let after = &s[comma + 1..];
        match after.strip_prefix(',') {
            Some(escaped) => {
                value.push(',');
                s = escaped;
            }
            None => return (value, after),
        }
    }
    value.push_str(s);
    (value, "")
}

/// Split `key` into fragments: a QAPI name first, then QAPI names or
/// decimal indexes (indexes are normalised: `007` is `7`).
fn parse_key(key: &str) -> Result<Vec<String>, KeyvalError> {
    let mut fragments = Vec::new();
    let mut rest = key;
    loop {
        let is_index = !fragments.is_empty() && rest.starts_with(|c: char| c.is_ascii_digit());
        let len =
            if is_index { rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len()) } else { qapi_name_len(rest) };
        let after = &rest[len..];
        if len == 0 || !(after.is_empty() || after.starts_with('.')) {
            return Err(KeyvalError::InvalidParameter(key.to_owned()));
        }
        let fragment = &rest[..len];
        if len > MAX_FRAGMENT_LEN {
            return Err(KeyvalError::TooLong(fragment.to_owned()));
        }
        if is_index {
            let trimmed = fragment.trim_start_matches('0');
            fragments.push(if trimmed.is_empty() { "0" } else { trimmed }.to_owned());
        } else {
            fragments.push(fragment.to_owned());
        }
        match after.strip_prefix('.') {
            Some(next) => rest = next,
            None => return Ok(fragments),
        }
    }
}

/// Length of the QAPI name at the start of `s` (0 if there is none):
/// an optional downstream `__RFQDN_` prefix, a letter, then letters,
/// digits, `-` and `_`.
fn qapi_name_len(s: &str) -> usize {
    let b = s.as_bytes();
    let mut p = 0;
    if b.first() == Some(&b'_') {
        if b.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while b.get(p).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.') {
            p += 1;
        }
        if b.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !b.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while b.get(p).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_') {
        p += 1;
    }
    p
}

/// Store `value` at the path `fragments` (non-empty), creating objects.
/// `key` is the key as written, for error messages.
fn put(root: &mut BTreeMap<String, Node>, fragments: &[String], key: &str, value: String) -> Result<(), KeyvalError> {
    let Some((last, parents)) = fragments.split_last() else {
        return Err(KeyvalError::InvalidParameter(key.to_owned()));
    };
    let mut cur = root;
    let mut prefix = String::new();
    for fragment in parents {
        prefix.push_str(fragment);
        prefix.push('.');
        match cur.entry(fragment.clone()).or_insert_with(|| Node::Dict(BTreeMap::new())) {
            Node::Dict(dict) => cur = dict,
            Node::Leaf(_) => return Err(KeyvalError::Inconsistent(prefix)),
        }
    }
    match cur.get(last) {
        Some(Node::Leaf(_)) => Err(KeyvalError::Duplicate(key.to_owned())),
        Some(Node::Dict(_)) => Err(KeyvalError::Inconsistent(format!("{prefix}{last}."))),
        None => {
            cur.insert(last.clone(), Node::Leaf(value));
            Ok(())
        }
    }
}

fn is_index(fragment: &str) -> bool {
    fragment.bytes().all(|c| c.is_ascii_digit())
}

/// Turn `node` into JSON; objects whose members are all indexes become
/// arrays.  `path` is the node's key with a trailing `.`.
fn listify(node: Node, path: &str) -> Result<Value, KeyvalError> {
    let dict = match node {
        Node::Leaf(s) => return Ok(Value::String(s)),
        Node::Dict(dict) => dict,
    };
    let indexes = dict.keys().filter(|k| is_index(k)).count();
    if indexes == 0 {
        let mut map = Map::new();
        for (key, child) in dict {
            let value = listify(child, &format!("{path}{key}."))?;
            map.insert(key, value);
        }
        return Ok(Value::Object(map));
    }
    if indexes != dict.len() {
        return Err(KeyvalError::Inconsistent(path.to_owned()));
    }
    // Indexes are normalised, hence distinct: dense iff all are < len.
    let mut slots: Vec<Option<Value>> = Vec::new();
    slots.resize_with(dict.len(), || None);
    for (key, child) in dict {
        let value = listify(child, &format!("{path}{key}."))?;
        if let Some(slot) = key.parse::<usize>().ok().and_then(|i| slots.get_mut(i)) {
            *slot = Some(value);
        }
    }
    let mut array = Vec::with_capacity(slots.len());
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(value) => array.push(value),
            None => return Err(KeyvalError::MissingIndex(format!("{path}{i}"))),
        }
    }
    Ok(Value::Array(array))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(s: &str, implied: Option<&str>) -> Value {
        Value::Object(parse_keyval(s, implied).unwrap())
    }

    fn kv_err(s: &str, implied: Option<&str>) -> String {
        parse_keyval(s, implied).unwrap_err().to_string()
    }

    #[test]
    fn empty_string_is_empty_object() {
        assert_eq!(kv("", None), json!({}));
        assert_eq!(kv("", Some("driver")), json!({}));
    }

    #[test]
    fn nested_dotted_keys() {
        assert_eq!(
            kv("driver=qcow2,cache.direct=on,cache.no-flush=off,file.driver=file,file.filename=x", None),
            json!({"driver": "qcow2", "cache": {"direct": "on", "no-flush": "off"},
                   "file": {"driver": "file", "filename": "x"}})
        );
        assert_eq!(kv("a.b.c.d=1,a.b.e=2", None), json!({"a": {"b": {"c": {"d": "1"}, "e": "2"}}}));
    }

    #[test]
    fn comma_comma_escapes_in_values() {
        assert_eq!(kv("filename=a,,b.img", None), json!({"filename": "a,b.img"}));
        assert_eq!(kv("filename=a,,,,b,x=1", None), json!({"filename": "a,,b", "x": "1"}));
        assert_eq!(kv("a=1,,b=2", None), json!({"a": "1,b=2"}));
        assert_eq!(kv("a=1,,,b=2", None), json!({"a": "1,", "b": "2"}));
    }

    #[test]
    fn comma_comma_escape_at_end_of_value() {
        assert_eq!(kv("filename=a,,", None), json!({"filename": "a,"}));
        assert_eq!(kv("x=1,filename=,,", None), json!({"x": "1", "filename": ","}));
    }

    #[test]
    fn values_keep_equals_and_may_be_empty() {
        assert_eq!(kv("a=b=c,d=", None), json!({"a": "b=c", "d": ""}));
    }

    #[test]
    fn trailing_comma_is_allowed() {
        assert_eq!(kv("a=1,", None), json!({"a": "1"}));
    }

    #[test]
    fn implied_key() {
        assert_eq!(kv("socket,path=/tmp/q.sock", Some("backend")), json!({"backend": "socket", "path": "/tmp/q.sock"}));
        assert_eq!(kv("m", Some("chardev")), json!({"chardev": "m"}));
        // The explicit form still works with an implied key.
        assert_eq!(kv("chardev=m", Some("chardev")), json!({"chardev": "m"}));
        // A dotted implied key builds a path.
        assert_eq!(kv("unix,x=1", Some("addr.type")), json!({"addr": {"type": "unix"}, "x": "1"}));
    }

    #[test]
    fn implied_key_only_for_first_element() {
        assert_eq!(kv_err("path=/p,socket", Some("backend")), "expected '=' after parameter 'socket'");
    }

    #[test]
    fn implied_key_given_twice_is_duplicate() {
        assert_eq!(kv_err("socket,backend=pty", Some("backend")), "parameter 'backend' is duplicate");
    }

    #[test]
    fn arrays_from_numeric_segments() {
        assert_eq!(
            kv("inject-error.0.event=read_aio,inject-error.0.errno=5", None),
            json!({"inject-error": [{"event": "read_aio", "errno": "5"}]})
        );
        // Any order; numeric, not lexicographic, order; leading zeros.
        assert_eq!(
            kv("l.1=b,l.10=k,l.0=a,l.2=c,l.3=d,l.4=e,l.5=f,l.6=g,l.7=h,l.8=i,l.09=j", None),
            json!({"l": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]})
        );
        assert_eq!(kv("m.0.0=x,m.0.1=y,m.1.0=z", None), json!({"m": [["x", "y"], ["z"]]}));
    }

    #[test]
    fn downstream_qapi_names() {
        assert_eq!(kv("__com.redhat_x.y=1", None), json!({"__com.redhat_x": {"y": "1"}}));
    }

    #[test]
    fn error_duplicate_key() {
        assert_eq!(kv_err("a=1,a=2", None), "parameter 'a' is duplicate");
        assert_eq!(kv_err("a.b=1,x=0,a.b=2", None), "parameter 'a.b' is duplicate");
        assert!(matches!(parse_keyval("l.0=a,l.00=b", None), Err(KeyvalError::Duplicate(k)) if k == "l.00"));
    }

    #[test]
    fn error_empty_key() {
        assert_eq!(kv_err("=v", None), "invalid parameter ''");
        assert_eq!(kv_err(",a=1", None), "invalid parameter ''");
        assert_eq!(kv_err("a=1,=2", None), "invalid parameter ''");
        assert_eq!(kv_err("=v", Some("driver")), "invalid parameter ''");
    }

    #[test]
    fn error_empty_or_invalid_key_fragment() {
        assert_eq!(kv_err("a..b=1", None), "invalid parameter 'a..b'");
        assert_eq!(kv_err("a.=1", None), "invalid parameter 'a.'");
        assert_eq!(kv_err(".a=1", None), "invalid parameter '.a'");
        assert_eq!(kv_err("a b=1", None), "invalid parameter 'a b'");
        assert_eq!(kv_err("0=1", None), "invalid parameter '0'");
        assert_eq!(kv_err("a.0x=1", None), "invalid parameter 'a.0x'");
        assert_eq!(kv_err("_a=1", None), "invalid parameter '_a'");
        assert_eq!(kv_err("ä=1", None), "invalid parameter 'ä'");
    }

    #[test]
    fn error_fragment_too_long() {
        let ok = "k".repeat(127);
        assert_eq!(kv(&format!("{ok}=1"), None), json!({ ok.clone(): "1" }));
        let long = "k".repeat(128);
        assert_eq!(kv_err(&format!("a.{long}=1"), None), format!("parameter '{long}' is too long"));
    }

    #[test]
    fn error_inconsistent_use() {
        assert_eq!(kv_err("a.b=1,a=2", None), "parameters 'a.*' used inconsistently");
        assert_eq!(kv_err("a=2,a.b=1", None), "parameters 'a.*' used inconsistently");
        assert_eq!(kv_err("x.a.b=1,x.a.b.c=2", None), "parameters 'x.a.b.*' used inconsistently");
        assert_eq!(kv_err("l.0=a,l.x=b", None), "parameters 'l.*' used inconsistently");
    }

    #[test]
    fn error_missing_equals_in_non_first_element() {
        assert_eq!(kv_err("a=1,b", None), "expected '=' after parameter 'b'");
        assert_eq!(kv_err("a=1,b,c=2", Some("x")), "expected '=' after parameter 'b'");
        // Without an implied key, the first element needs '=' too.
        assert_eq!(kv_err("socket,path=/p", None), "expected '=' after parameter 'socket'");
    }

    #[test]
    fn error_non_dense_array_indices() {
        assert_eq!(kv_err("a.1=x", None), "parameter 'a.0' missing");
        assert_eq!(kv_err("a.0=x,a.2=y", None), "parameter 'a.1' missing");
        assert_eq!(kv_err("a.0.b.0=x,a.0.b.5=y", None), "parameter 'a.0.b.1' missing");
        assert_eq!(kv_err("a.0=x,a.99999999999999999999999=y", None), "parameter 'a.1' missing");
    }

    #[test]
    fn json_form() {
        let got = parse_option(
            r#"  {"driver": "file", "node-name": "f", "cache": {"direct": true}, "n": 5}"#,
            Some("driver"),
        )
        .unwrap();
        assert_eq!(Value::Object(got), json!({"driver": "file", "node-name": "f", "cache": {"direct": true}, "n": 5}));
    }

    #[test]
    fn option_falls_back_to_keyval() {
        assert_eq!(
            Value::Object(parse_option("file,filename=/x", Some("driver")).unwrap()),
            json!({"driver": "file", "filename": "/x"})
        );
    }

    #[test]
    fn error_json_not_an_object() {
        assert!(matches!(parse_json_object("[1, 2]"), Err(KeyvalError::NotObject("an array"))));
        assert_eq!(parse_json_object("\"x\"").unwrap_err().to_string(), "json option must be an object, not a string");
        // A leading '{' commits to JSON: malformed or trailing text is an error.
        let err = parse_option(r#"{"driver": "file""#, None).unwrap_err();
        assert!(matches!(err, KeyvalError::Json(_)));
        assert!(err.to_string().starts_with("invalid json: "), "{err}");
        assert!(err.to_string().contains("column"), "{err}");
        assert!(matches!(parse_option("{} []", None), Err(KeyvalError::Json(_))));
    }

    #[test]
    fn qsd_blockdev_file() {
        assert_eq!(
            Value::Object(parse_option("driver=file,node-name=f,filename=/tmp/a.img", Some("driver")).unwrap()),
            json!({"driver": "file", "node-name": "f", "filename": "/tmp/a.img"})
        );
    }

    #[test]
    fn qsd_nbd_server_addr() {
        assert_eq!(
            Value::Object(parse_option("addr.type=unix,addr.path=/tmp/s.sock", None).unwrap()),
            json!({"addr": {"type": "unix", "path": "/tmp/s.sock"}})
        );
    }

    #[test]
    fn qsd_export() {
        assert_eq!(
            Value::Object(parse_option("type=nbd,id=e,node-name=r,writable=on", Some("type")).unwrap()),
            json!({"type": "nbd", "id": "e", "node-name": "r", "writable": "on"})
        );
    }

    #[test]
    fn qsd_chardev_with_implied_backend() {
        assert_eq!(
            Value::Object(parse_option("socket,path=/tmp/q.sock,server=on,wait=off,id=m", Some("backend")).unwrap()),
            json!({"backend": "socket", "path": "/tmp/q.sock", "server": "on", "wait": "off", "id": "m"})
        );
    }
}
