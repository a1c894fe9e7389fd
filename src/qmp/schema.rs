//! `query-qmp-schema`: the SchemaInfo list of QEMU's introspection, derived
//! from the argument, return and event types of the command table (whose
//! types are declared once, see [`block::schema`]).

use block::schema::{Field, Ty};
use serde_json::{json, Value};

/// One command as introspection shows it.
pub struct CommandInfo {
    pub name: &'static str,
    pub args: Vec<Field>,
    /// `None`: an empty object.
    pub ret: Option<Ty>,
}

/// Assigns opaque names to non-builtin types, as QEMU does.
struct Out {
    list: Vec<Value>,
    next: u32,
}

impl Out {
    fn fresh(&mut self, mut v: Value) -> String {
        let name = self.next.to_string();
        self.next += 1;
        if let Some(o) = v.as_object_mut() {
            o.insert("name".into(), Value::String(name.clone()));
        }
        self.list.push(v);
        name
    }

    fn members(&mut self, fields: &[Field]) -> Vec<Value> {
        fields
            .iter()
            .map(|f| {
                let t = self.ty_ref(&f.ty);
                let mut m = json!({"name": f.name, "type": t});
                if f.optional {
                    m["default"] = Value::Null;
                }
                m
            })
            .collect()
    }

    fn ty_ref(&mut self, ty: &Ty) -> String {
        match ty {
            Ty::Str => "str".into(),
            Ty::Int | Ty::Size => "int".into(),
            Ty::Bool => "bool".into(),
            Ty::Any => "any".into(),
            Ty::Enum(vals) => self.fresh(
                json!({"meta-type": "enum", "members": vals.iter().map(|v| json!({"name": v})).collect::<Vec<_>>(), "values": vals}),
            ),
            Ty::Obj(fields) => {
                let m = self.members(fields);
                self.fresh(json!({"meta-type": "object", "members": m}))
            }
            Ty::StrOrObj(fields) => {
                let m = self.members(fields);
                let obj = self.fresh(json!({"meta-type": "object", "members": m}));
                self.fresh(json!({"meta-type": "alternate", "members": [{"type": "str"}, {"type": obj}]}))
            }
            Ty::Array(elem) => {
                let e = self.ty_ref(elem);
                let name = format!("[{e}]");
                if !self.list.iter().any(|v| v["name"] == name.as_str()) {
                    self.list.push(json!({"name": name, "meta-type": "array", "element-type": e}));
                }
                name
            }
        }
    }
}

/// `query-qmp-schema`: SchemaInfo entries for `commands` and `events`.
/// Like QEMU, non-builtin type names are opaque numbers.
pub fn introspect(commands: &[CommandInfo], events: &[(&'static str, Vec<Field>)]) -> Value {
    let mut out = Out { list: Vec::new(), next: 0 };
    let empty = out.fresh(json!({"meta-type": "object", "members": []}));
    for c in commands {
        let m = out.members(&c.args);
        let arg = if m.is_empty() { empty.clone() } else { out.fresh(json!({"meta-type": "object", "members": m})) };
        let ret = match &c.ret {
            Some(t) => out.ty_ref(t),
            None => empty.clone(),
        };
        out.list.push(
            json!({"name": c.name, "meta-type": "command", "arg-type": arg, "ret-type": ret, "allow-oob": false}),
        );
    }
    for (name, fields) in events {
        let m = out.members(fields);
        let arg = out.fresh(json!({"meta-type": "object", "members": m}));
        out.list.push(json!({"name": name, "meta-type": "event", "arg-type": arg}));
    }
    for (b, j) in [("str", "string"), ("int", "int"), ("bool", "boolean"), ("any", "value"), ("null", "null")] {
        out.list.push(json!({"name": b, "meta-type": "builtin", "json-type": j}));
    }
    Value::Array(out.list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::schema::{check_fields, QapiObject};

    block::qapi_enum! {
        enum Kind { "inet" Inet, "unix" Unix }
    }
    block::qapi_struct! {
        #[allow(dead_code)]
        struct Addr { "type" kind: Kind, "path" path: Option<String> }
    }
    block::qapi_struct! {
        #[allow(dead_code)]
        struct Args { "node-name" node_name: String, "active" active: Option<bool>, "addr" addr: Option<Addr> }
    }

    #[test]
    fn unknown_missing_and_mistyped_members_are_named() {
        let args = Args::fields();
        let e = check_fields(&args, json!({"node-name": "a", "bogus": 1}).as_object().unwrap(), "", false).unwrap_err();
        assert_eq!(e.0, "Parameter 'bogus' is unexpected");
        let e = check_fields(&args, json!({}).as_object().unwrap(), "", false).unwrap_err();
        assert_eq!(e.0, "Parameter 'node-name' is missing");
        let e = check_fields(&args, json!({"node-name": 1}).as_object().unwrap(), "", false).unwrap_err();
        assert_eq!(e.0, "Invalid parameter type for 'node-name', expected: string");
        let e =
            check_fields(&args, json!({"node-name": "a", "addr": {"type": "vsock"}}).as_object().unwrap(), "", false)
                .unwrap_err();
        assert_eq!(e.0, "Parameter 'addr.type' does not accept value 'vsock'");
    }

    #[test]
    fn introspection_lists_commands_with_arg_types() {
        let v = introspect(&[CommandInfo { name: "blockdev-set-active", args: Args::fields(), ret: None }], &[]);
        let list = v.as_array().unwrap();
        let cmd = list.iter().find(|e| e["name"] == "blockdev-set-active").unwrap();
        let arg = cmd["arg-type"].as_str().unwrap();
        let obj = list.iter().find(|e| e["name"] == arg).unwrap();
        assert!(obj["members"].as_array().unwrap().iter().any(|m| m["name"] == "active" && m["type"] == "bool"));
    }
}
