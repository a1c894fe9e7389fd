//! QAPI-style schemas, declared once as Rust types.
//!
//! A command's arguments, a driver's options or an event's data are declared
//! with [`qapi_struct!`] (and [`qapi_enum!`] for enumerations): the macro
//! writes the `serde` struct, with QEMU's member names, *and* its schema from
//! the same declaration, so a member's name is spelled once. The schema then
//! serves three purposes:
//!
//! - [`check`]: QEMU's errors for unknown, missing and mistyped members
//!   ("Parameter 'x' is unexpected", "Invalid parameter type for 'x',
//!   expected: boolean"), checked before `serde` sees the value;
//! - [`coerce_keyval`]: the one keyval coercion. Command-line options arrive
//!   as strings (`read-only=on`, `size=1G`); the schema says which strings are
//!   booleans, integers or sizes, as QEMU's keyval input visitor does;
//! - introspection (`query-qmp-schema`), which walks [`Ty`].

use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

/// A member's type, as QAPI spells them.
#[derive(Debug, Clone, PartialEq)]
pub enum Ty {
    Str,
    Int,
    /// An unsigned integer; from keyval, a size as [`parse_size`] reads one ("1G", "1.5M").
    Size,
    Bool,
    /// Anything; the consumer validates it (e.g. blockdev-add's flat union).
    Any,
    Enum(&'static [&'static str]),
    Obj(Vec<Field>),
    Array(Box<Ty>),
    /// A string or an object (a QAPI alternate, e.g. BlockDirtyBitmapOrStr).
    StrOrObj(Vec<Field>),
}

impl Ty {
    /// The JSON type's name, as QEMU's type errors say it.
    pub fn json_name(&self) -> &'static str {
        match self {
            Ty::Str | Ty::Enum(_) => "string",
            Ty::Int | Ty::Size => "integer",
            Ty::Bool => "boolean",
            Ty::Any => "any",
            Ty::Obj(_) => "object",
            Ty::Array(_) => "array",
            Ty::StrOrObj(_) => "string or object",
        }
    }
}

/// A member of an object type.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

impl Field {
    /// The member `name` of Rust type `T` (optional when `T` is an `Option`).
    pub fn of<T: Qapi>(name: &'static str) -> Self {
        Field { name, ty: T::ty(), optional: T::OPTIONAL }
    }
}

/// A Rust type with a QAPI schema.
pub trait Qapi {
    fn ty() -> Ty;
    /// Whether a member of this type may be absent (true for `Option`).
    const OPTIONAL: bool = false;
}

/// A QAPI object: its members, in order.
pub trait QapiObject: Qapi + DeserializeOwned {
    fn fields() -> Vec<Field>;
}

macro_rules! scalar {
    ($ty:expr => $($t:ty),*) => { $(impl Qapi for $t { fn ty() -> Ty { $ty } })* };
}
scalar!(Ty::Str => String);
scalar!(Ty::Bool => bool);
scalar!(Ty::Int => i64, i32, u32, u16, u8, usize);
scalar!(Ty::Any => Value);

/// `u64` is QAPI's `size` (a byte count or a large unsigned number).
impl Qapi for u64 {
    fn ty() -> Ty {
        Ty::Size
    }
}

impl<T: Qapi> Qapi for Option<T> {
    fn ty() -> Ty {
        T::ty()
    }
    const OPTIONAL: bool = true;
}

impl<T: Qapi> Qapi for Vec<T> {
    fn ty() -> Ty {
        Ty::Array(Box::new(T::ty()))
    }
}

/// A schema violation, worded as QEMU words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

/// Declare a QAPI object: a `serde` struct whose members carry QEMU's names,
/// and its [`QapiObject`] schema, from one list of `"wire-name" field: Type`.
/// `Option<T>` members are optional; so is a member with a default,
/// `"wire-name" field: Type = "path::to::default_fn"` (serde's `default`).
///
/// ```
/// block::qapi_struct! {
///     /// Arguments of `block-dirty-bitmap-add`.
///     pub struct BitmapAdd {
///         "node" node: String,
///         "name" name: String,
///         "granularity" granularity: Option<u32>,
///     }
/// }
/// let a: BitmapAdd = block::schema::parse(serde_json::json!({"node": "n", "name": "b"})).unwrap();
/// assert_eq!(a.granularity, None);
/// ```
#[macro_export]
macro_rules! qapi_struct {
    ($(#[$meta:meta])* $vis:vis struct $name:ident {
        $($(#[$fmeta:meta])* $wire:literal $field:ident : $fty:ty $(= $default:literal)?),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        $vis struct $name {
            $($(#[$fmeta])* #[serde(rename = $wire $(, default = $default)?)] pub $field: $fty,)*
        }
        impl $crate::schema::Qapi for $name {
            fn ty() -> $crate::schema::Ty {
                $crate::schema::Ty::Obj(<Self as $crate::schema::QapiObject>::fields())
            }
        }
        impl $crate::schema::QapiObject for $name {
            fn fields() -> Vec<$crate::schema::Field> {
                vec![$({
                    #[allow(unused_mut)]
                    let mut f = $crate::schema::Field::of::<$fty>($wire);
                    // A member with a default may be absent.
                    $(let _: &str = $default; f.optional = true;)?
                    f
                }),*]
            }
        }
    };
}

/// Declare a QAPI enumeration: a Rust enum whose variants carry QEMU's names.
///
/// ```
/// block::qapi_enum! {
///     /// What a job does on an I/O error.
///     pub enum OnError { "report" Report, "ignore" Ignore }
/// }
/// assert_eq!(OnError::Ignore.as_str(), "ignore");
/// ```
#[macro_export]
macro_rules! qapi_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $wire:literal $variant:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
        $vis enum $name { $($(#[$vmeta])* #[serde(rename = $wire)] $variant,)* }
        impl $name {
            /// Every value's QAPI name, in declaration order.
            pub const VALUES: &'static [&'static str] = &[$($wire),*];
            /// This value's QAPI name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire,)* }
            }
        }
        impl $crate::schema::Qapi for $name {
            fn ty() -> $crate::schema::Ty {
                $crate::schema::Ty::Enum(Self::VALUES)
            }
        }
    };
}

/// Check `v` against `ty`; `path` names the member in errors ("addr.type").
pub fn check(ty: &Ty, v: &Value, path: &str) -> Result<(), SchemaError> {
    let bad = || SchemaError(format!("Invalid parameter type for '{path}', expected: {}", ty.json_name()));
    match ty {
        Ty::Any => Ok(()),
        Ty::Str => v.is_string().then_some(()).ok_or_else(bad),
        Ty::Int => (v.is_i64() || v.is_u64()).then_some(()).ok_or_else(bad),
        Ty::Size => v.is_u64().then_some(()).ok_or_else(bad),
        Ty::Bool => v.is_boolean().then_some(()).ok_or_else(bad),
        Ty::Enum(values) => {
            let s = v.as_str().ok_or_else(bad)?;
            if values.contains(&s) {
                Ok(())
            } else {
                Err(SchemaError(format!("Parameter '{path}' does not accept value '{s}'")))
            }
        }
        Ty::Obj(fields) => match v {
            Value::Object(m) => check_fields(fields, m, &format!("{path}."), false),
            _ => Err(bad()),
        },
        Ty::StrOrObj(fields) => match v {
            Value::String(_) => Ok(()),
            Value::Object(m) => check_fields(fields, m, &format!("{path}."), false),
            _ => Err(bad()),
        },
        Ty::Array(elem) => match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(elem, item, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            _ => Err(bad()),
        },
    }
}

/// Check an object's members: unknown ones (unless `open`), missing required
/// ones, then each member's type. `prefix` is prepended to member names.
pub fn check_fields(fields: &[Field], m: &Map<String, Value>, prefix: &str, open: bool) -> Result<(), SchemaError> {
    if !open {
        if let Some(k) = m.keys().find(|k| !fields.iter().any(|f| f.name == k.as_str())) {
            return Err(SchemaError(format!("Parameter '{prefix}{k}' is unexpected")));
        }
    }
    for f in fields {
        match m.get(f.name) {
            None if !f.optional => return Err(SchemaError(format!("Parameter '{prefix}{}' is missing", f.name))),
            None => {}
            Some(v) => check(&f.ty, v, &format!("{prefix}{}", f.name))?,
        }
    }
    Ok(())
}

/// Parse a size as QEMU's `qemu_strtosz` spells one: decimal bytes with an
/// optional b/k/M/G/T/P/E suffix (powers of 1024, case-insensitive) and, with
/// a suffix, a decimal fraction ("1.5M", "0.5k") that comes to a whole number
/// of bytes. A fraction without a suffix or not of whole bytes, overflow and
/// anything else is refused. The one size rule: keyval (`size=1G`) and the
/// command line's sizes (`baton demo --disk`, `--vm memory=`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return None,
            };
            (&s[..i], Some(shift))
        }
        _ => (s, None),
    };
    let decimal = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let (int, frac) = match num.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (num, None),
    };
    if !decimal(int) {
        return None;
    }
    let mult = 1u64 << shift.unwrap_or(0);
    let whole = int.parse::<u64>().ok()?.checked_mul(mult)?;
    let Some(frac) = frac else { return Some(whole) };
    if !decimal(frac) {
        return None;
    }
    // As QEMU's qemu_strtosz: a fraction of a unit is truncated to whole
    // bytes ("0.1k" is 102); a fraction of a byte is refused, unless it is zero.
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        return Some(whole);
    }
    if mult == 1 {
        return None; // a fraction of a byte
    }
    let scaled = frac.parse::<u128>().ok()?.checked_mul(u128::from(mult))?;
    let den = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    whole.checked_add(u64::try_from(scaled / den).ok()?)
}

/// Keyval's one coercion: turn the strings of a command-line option into the
/// JSON types `ty` asks for (`on`/`off`/`yes`/`no`/`true`/`false` for
/// booleans, decimal for integers, sizes with suffixes), recursing into
/// objects and arrays. Members the schema does not know are left alone for
/// [`check`] to reject; a string that cannot be the asked type is an error
/// naming the member.
pub fn coerce_keyval(ty: &Ty, v: Value, path: &str) -> Result<Value, SchemaError> {
    let s = match v {
        Value::String(s) => s,
        Value::Object(m) => {
            return match ty {
                Ty::Obj(fields) | Ty::StrOrObj(fields) => Ok(Value::Object(coerce_members(fields, m, path)?)),
                _ => Ok(Value::Object(m)),
            }
        }
        Value::Array(items) => {
            return match ty {
                Ty::Array(elem) => items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| coerce_keyval(elem, item, &format!("{path}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array),
                _ => Ok(Value::Array(items)),
            }
        }
        other => return Ok(other),
    };
    match ty {
        Ty::Bool => match s.as_str() {
            "on" | "yes" | "true" => Ok(Value::Bool(true)),
            "off" | "no" | "false" => Ok(Value::Bool(false)),
            _ => Err(SchemaError(format!("Parameter '{path}' expects 'on' or 'off'"))),
        },
        Ty::Int => {
            let n = s
                .parse::<i64>()
                .map(Number::from)
                .or_else(|_| s.parse::<u64>().map(Number::from))
                .map_err(|_| SchemaError(format!("Parameter '{path}' expects an integer")))?;
            Ok(Value::Number(n))
        }
        Ty::Size => parse_size(&s)
            .map(|n| Value::Number(n.into()))
            .ok_or_else(|| SchemaError(format!("Parameter '{path}' expects a non-negative number below 2^64"))),
        _ => Ok(Value::String(s)),
    }
}

/// [`coerce_keyval`] for the members of an object.
pub fn coerce_members(fields: &[Field], m: Map<String, Value>, path: &str) -> Result<Map<String, Value>, SchemaError> {
    let prefix = if path.is_empty() { String::new() } else { format!("{path}.") };
    m.into_iter()
        .map(|(k, v)| {
            let v = match fields.iter().find(|f| f.name == k) {
                Some(f) => coerce_keyval(&f.ty, v, &format!("{prefix}{k}"))?,
                None => v,
            };
            Ok((k, v))
        })
        .collect()
}

/// Check `v` against `T`'s schema, then deserialise it: QEMU's errors for
/// what the schema catches, the decoder's for the rest (a number out of the
/// Rust type's range).
pub fn parse<T: QapiObject>(v: Value) -> Result<T, SchemaError> {
    let Value::Object(m) = v else {
        return Err(SchemaError("Invalid parameter type, expected: object".into()));
    };
    check_fields(&T::fields(), &m, "", false)?;
    serde_json::from_value(Value::Object(m)).map_err(|e| SchemaError(format!("Invalid parameter: {e}")))
}

/// [`parse`] for a command-line option: keyval strings coerced first.
pub fn parse_keyval<T: QapiObject>(m: Map<String, Value>) -> Result<T, SchemaError> {
    parse(Value::Object(coerce_members(&T::fields(), m, "")?))
}

// Declared to test the macros; not every member is read.
#[cfg(test)]
#[allow(dead_code)]
mod tests {
    use super::*;
    use serde_json::json;

    qapi_enum! {
        enum Kind { "inet" Inet, "unix" Unix }
    }
    qapi_struct! {
        struct Addr { "type" kind: Kind, "path" path: Option<String> }
    }
    qapi_struct! {
        struct Args {
            "node-name" node_name: String,
            "active" active: Option<bool>,
            "size" size: Option<u64>,
            "count" count: Option<i32>,
            "addr" addr: Option<Addr>,
            "list" list: Option<Vec<u32>>,
            "retries" retries: u32 = "three",
        }
    }

    fn three() -> u32 {
        3
    }

    fn err(v: Value) -> String {
        match parse::<Args>(v) {
            Err(SchemaError(e)) => e,
            Ok(a) => format!("parsed: {a:?}"),
        }
    }

    #[test]
    fn one_declaration_gives_names_types_and_optionality() {
        let f = Args::fields();
        assert_eq!(f[0], Field { name: "node-name", ty: Ty::Str, optional: false });
        assert_eq!(f[1], Field { name: "active", ty: Ty::Bool, optional: true });
        assert_eq!(f[2].ty, Ty::Size);
        assert_eq!(f[5].ty, Ty::Array(Box::new(Ty::Int)));
        assert_eq!(f[6], Field { name: "retries", ty: Ty::Int, optional: true }, "a member with a default");
        assert_eq!(parse::<Args>(json!({"node-name": "a"})).unwrap().retries, 3);
        let Ty::Obj(addr) = &f[4].ty else { panic!("addr is an object: {:?}", f[4]) };
        assert_eq!(addr[0], Field { name: "type", ty: Ty::Enum(&["inet", "unix"]), optional: false });
    }

    #[test]
    fn unknown_missing_and_mistyped_members_are_named_as_qemu_names_them() {
        assert_eq!(err(json!({"node-name": "a", "bogus": 1})), "Parameter 'bogus' is unexpected");
        assert_eq!(err(json!({})), "Parameter 'node-name' is missing");
        assert_eq!(err(json!({"node-name": 1})), "Invalid parameter type for 'node-name', expected: string");
        assert_eq!(
            err(json!({"node-name": "a", "active": "on"})),
            "Invalid parameter type for 'active', expected: boolean"
        );
        assert_eq!(
            err(json!({"node-name": "a", "addr": {"type": "vsock"}})),
            "Parameter 'addr.type' does not accept value 'vsock'"
        );
        assert_eq!(
            err(json!({"node-name": "a", "list": [1, "x"]})),
            "Invalid parameter type for 'list[1]', expected: integer"
        );
        assert!(err(json!({"node-name": "a", "count": 1u64 << 40})).starts_with("Invalid parameter"));
        let a = parse::<Args>(json!({"node-name": "a", "addr": {"type": "unix", "path": "/s"}})).unwrap();
        assert_eq!((a.node_name.as_str(), a.addr.map(|a| a.kind)), ("a", Some(Kind::Unix)));
    }

    #[test]
    fn keyval_strings_become_the_types_the_schema_asks_for() {
        let m = json!({"node-name": "5", "active": "on", "size": "1G", "count": "-3",
                       "addr": {"type": "inet"}, "list": ["1", "2"]});
        let Value::Object(m) = m else { unreachable!() };
        let a = parse_keyval::<Args>(m).unwrap();
        assert_eq!(a.node_name, "5", "a string member stays a string");
        assert_eq!((a.active, a.size, a.count, a.list), (Some(true), Some(1 << 30), Some(-3), Some(vec![1, 2])));
        let Value::Object(m) = json!({"node-name": "a", "active": "maybe"}) else { unreachable!() };
        assert_eq!(parse_keyval::<Args>(m).unwrap_err().0, "Parameter 'active' expects 'on' or 'off'");
        let Value::Object(m) = json!({"node-name": "a", "size": "12Q"}) else { unreachable!() };
        assert!(parse_keyval::<Args>(m).unwrap_err().0.starts_with("Parameter 'size' expects"));
    }

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_overflow() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1"), None);
    }

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
    fn sizes_take_fractions_of_a_unit_truncated_to_whole_bytes() {
        assert_eq!(parse_size("1.5M"), Some(1572864));
        assert_eq!(parse_size("0.5k"), Some(512));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("0.25m"), Some(1 << 18));
        assert_eq!(parse_size("2.0b"), Some(2));
        assert_eq!(parse_size("1.50K"), Some(1536));
        assert_eq!(parse_size(" 3e "), Some(3 << 60));
        assert_eq!(parse_size("15.5E"), Some(31 << 59));
        assert_eq!(parse_size("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_size("18446744073709551615b"), Some(u64::MAX));
        // A fraction of a byte is refused unless it is zero; a fraction of a
        // larger unit is truncated to whole bytes (as QEMU's qemu_strtosz).
        for s in ["1.5", "1.5b", "0.5b"] {
            assert_eq!(parse_size(s), None, "{s}");
        }
        assert_eq!(parse_size("1.0"), Some(1));
        assert_eq!(parse_size("0.1k"), Some(102));
        assert_eq!(parse_size("0.0000001k"), Some(0));
        // Overflow, and what is no number.
        for s in [
            "16.0E",
            "18446744073709551616",
            "16384P",
            "1.k",
            ".5k",
            "1..5k",
            "1.5.5k",
            "+1",
            "1 k",
            "1x",
            "1.5kb",
            "k",
            ".",
        ] {
            assert_eq!(parse_size(s), None, "{s}");
        }
    }
}
