//! The QMP schema baton implements: one table of commands and events that
//! drives dispatch, argument checking, `query-commands` and
//! `query-qmp-schema`. Names, argument names and types are QEMU's.

use serde_json::{json, Map, Value};

use super::error::QmpError;

/// An argument or member type, as QAPI spells them.
#[derive(Debug)]
pub enum Ty {
    Str,
    Int,
    Bool,
    /// Anything; the handler validates it (e.g. blockdev-add's flat union).
    Any,
    Enum(&'static [&'static str]),
    Obj(&'static [Field]),
    Array(&'static Ty),
    /// A string or an object (QAPI alternate, e.g. BlockDirtyBitmapOrStr).
    StrOrObj(&'static [Field]),
}

/// A member of an object type.
#[derive(Debug)]
pub struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

pub const fn req(name: &'static str, ty: Ty) -> Field {
    Field { name, ty, optional: false }
}
pub const fn opt(name: &'static str, ty: Ty) -> Field {
    Field { name, ty, optional: true }
}

/// How a command's arguments are checked.
#[derive(Debug)]
pub enum Args {
    /// A fixed set of members.
    Fields(&'static [Field]),
    /// Checked for being an object only; the handler checks the members
    /// (flat unions whose variants the block layer knows).
    Open(&'static [Field]),
}

impl Args {
    pub fn fields(&self) -> &'static [Field] {
        match self {
            Args::Fields(f) | Args::Open(f) => f,
        }
    }
}

fn type_name(ty: &Ty) -> &'static str {
    match ty {
        Ty::Str | Ty::Enum(_) => "string",
        Ty::Int => "integer",
        Ty::Bool => "boolean",
        Ty::Any => "any",
        Ty::Obj(_) => "object",
        Ty::Array(_) => "array",
        Ty::StrOrObj(_) => "string or object",
    }
}

/// Check `v` against `ty`; `path` names the member in errors ("addr.type").
pub fn check_value(ty: &Ty, v: &Value, path: &str) -> Result<(), QmpError> {
    let bad = || QmpError::generic(format!("Invalid parameter type for '{path}', expected: {}", type_name(ty)));
    match ty {
        Ty::Any => Ok(()),
        Ty::Str => v.is_string().then_some(()).ok_or_else(bad),
        Ty::Int => (v.is_i64() || v.is_u64()).then_some(()).ok_or_else(bad),
        Ty::Bool => v.is_boolean().then_some(()).ok_or_else(bad),
        Ty::Enum(values) => {
            let s = v.as_str().ok_or_else(bad)?;
            if values.contains(&s) {
                Ok(())
            } else {
                Err(QmpError::generic(format!("Parameter '{path}' does not accept value '{s}'")))
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
                    check_value(elem, item, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            _ => Err(bad()),
        },
    }
}

/// Check an object's members: unknown ones (unless `open`), missing required ones, types.
pub fn check_fields(fields: &[Field], m: &Map<String, Value>, prefix: &str, open: bool) -> Result<(), QmpError> {
    if !open {
        if let Some(k) = m.keys().find(|k| !fields.iter().any(|f| f.name == k.as_str())) {
            return Err(QmpError::generic(format!("Parameter '{prefix}{k}' is unexpected")));
        }
    }
    for f in fields {
        match m.get(f.name) {
            None if !f.optional => return Err(QmpError::generic(format!("Parameter '{prefix}{}' is missing", f.name))),
            None => {}
            Some(v) => check_value(&f.ty, v, &format!("{prefix}{}", f.name))?,
        }
    }
    Ok(())
}

/// `query-qmp-schema`: SchemaInfo entries for `commands` and `events`.
/// Like QEMU, non-builtin type names are opaque numbers.
pub fn introspect(
    commands: &[(&'static str, &Args, Option<&'static Ty>)],
    events: &[(&'static str, &'static [Field])],
) -> Value {
    let mut out: Vec<Value> = Vec::new();
    let mut next = 0u32;
    let mut fresh = |out: &mut Vec<Value>, v: Value| -> String {
        let name = next.to_string();
        next += 1;
        let mut v = v;
        if let Some(o) = v.as_object_mut() {
            o.insert("name".into(), Value::String(name.clone()));
        }
        out.push(v);
        name
    };
    fn members(
        fields: &[Field],
        out: &mut Vec<Value>,
        fresh: &mut dyn FnMut(&mut Vec<Value>, Value) -> String,
    ) -> Vec<Value> {
        fields
            .iter()
            .map(|f| {
                let t = ty_ref(&f.ty, out, fresh);
                let mut m = json!({"name": f.name, "type": t});
                if f.optional {
                    m["default"] = Value::Null;
                }
                m
            })
            .collect()
    }
    fn ty_ref(ty: &Ty, out: &mut Vec<Value>, fresh: &mut dyn FnMut(&mut Vec<Value>, Value) -> String) -> String {
        match ty {
            Ty::Str => "str".into(),
            Ty::Int => "int".into(),
            Ty::Bool => "bool".into(),
            Ty::Any => "any".into(),
            Ty::Enum(vals) => fresh(
                out,
                json!({"meta-type": "enum", "members": vals.iter().map(|v| json!({"name": v})).collect::<Vec<_>>(), "values": vals}),
            ),
            Ty::Obj(fields) => {
                let m = members(fields, out, fresh);
                fresh(out, json!({"meta-type": "object", "members": m}))
            }
            Ty::StrOrObj(fields) => {
                let m = members(fields, out, fresh);
                let obj = fresh(out, json!({"meta-type": "object", "members": m}));
                fresh(out, json!({"meta-type": "alternate", "members": [{"type": "str"}, {"type": obj}]}))
            }
            Ty::Array(elem) => {
                let e = ty_ref(elem, out, fresh);
                let name = format!("[{e}]");
                if !out.iter().any(|v| v["name"] == name.as_str()) {
                    out.push(json!({"name": name, "meta-type": "array", "element-type": e}));
                }
                name
            }
        }
    }
    let empty = fresh(&mut out, json!({"meta-type": "object", "members": []}));
    for (name, args, ret) in commands {
        let m = members(args.fields(), &mut out, &mut fresh);
        let arg =
            if m.is_empty() { empty.clone() } else { fresh(&mut out, json!({"meta-type": "object", "members": m})) };
        let ret = match ret {
            Some(t) => ty_ref(t, &mut out, &mut fresh),
            None => empty.clone(),
        };
        out.push(json!({"name": name, "meta-type": "command", "arg-type": arg, "ret-type": ret, "allow-oob": false}));
    }
    for (name, fields) in events {
        let m = members(fields, &mut out, &mut fresh);
        let arg = fresh(&mut out, json!({"meta-type": "object", "members": m}));
        out.push(json!({"name": name, "meta-type": "event", "arg-type": arg}));
    }
    for (b, j) in [("str", "string"), ("int", "int"), ("bool", "boolean"), ("any", "value"), ("null", "null")] {
        out.push(json!({"name": b, "meta-type": "builtin", "json-type": j}));
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    static ADDR: [Field; 2] = [req("type", Ty::Enum(&["inet", "unix"])), opt("path", Ty::Str)];
    static ARGS: [Field; 3] = [req("node-name", Ty::Str), opt("active", Ty::Bool), opt("addr", Ty::Obj(&ADDR))];

    #[test]
    fn unknown_missing_and_mistyped_members_are_named() {
        let e = check_fields(&ARGS, json!({"node-name": "a", "bogus": 1}).as_object().unwrap(), "", false).unwrap_err();
        assert_eq!(e.desc, "Parameter 'bogus' is unexpected");
        let e = check_fields(&ARGS, json!({}).as_object().unwrap(), "", false).unwrap_err();
        assert_eq!(e.desc, "Parameter 'node-name' is missing");
        let e = check_fields(&ARGS, json!({"node-name": 1}).as_object().unwrap(), "", false).unwrap_err();
        assert_eq!(e.desc, "Invalid parameter type for 'node-name', expected: string");
        let e =
            check_fields(&ARGS, json!({"node-name": "a", "addr": {"type": "vsock"}}).as_object().unwrap(), "", false)
                .unwrap_err();
        assert_eq!(e.desc, "Parameter 'addr.type' does not accept value 'vsock'");
    }

    #[test]
    fn introspection_lists_commands_with_arg_types() {
        let args = Args::Fields(&ARGS);
        let v = introspect(&[("blockdev-set-active", &args, None)], &[]);
        let list = v.as_array().unwrap();
        let cmd = list.iter().find(|e| e["name"] == "blockdev-set-active").unwrap();
        let arg = cmd["arg-type"].as_str().unwrap();
        let obj = list.iter().find(|e| e["name"] == arg).unwrap();
        assert!(obj["members"].as_array().unwrap().iter().any(|m| m["name"] == "active" && m["type"] == "bool"));
    }
}
