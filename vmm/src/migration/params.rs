//! Migration parameters: every wait of the handover is bounded, and each
//! bound is a parameter (`migrate-set-parameters`, `x-baton-` names because
//! QEMU has none of them). One table holds each name, default and bound.

use std::time::Duration;

use serde_json::{Map, Value};

/// The bounds of the handover's waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// Source: connecting to the destination.
    pub connect_timeout: Duration,
    /// Both: the HELLO exchange (a destination frees its slot after this).
    pub hello_timeout: Duration,
    /// Both: each read and each write of the stream.
    pub io_timeout: Duration,
    /// Source: the device's requests in flight when the vCPUs stop.
    pub drain_timeout: Duration,
    /// Source: the mirrors catching up once the guest is stopped.
    pub mirror_sync_timeout: Duration,
    /// Source: the destination's PREPARED after the end marker.
    pub prepared_timeout: Duration,
    /// Destination: COMMIT or ABORT after PREPARED; past it the destination
    /// says the decision is unknown (and still takes a late one).
    pub commit_timeout: Duration,
}

struct Param {
    name: &'static str,
    default_ms: u64,
    field: fn(&mut Parameters) -> &mut Duration,
}

/// Bounds of every timeout parameter, in milliseconds.
pub const MIN_MS: u64 = 1;
pub const MAX_MS: u64 = 3_600_000;

/// The parameters' names (the QMP schema lists them from here).
pub const NAMES: [&str; 7] = [
    "x-baton-connect-timeout",
    "x-baton-hello-timeout",
    "x-baton-io-timeout",
    "x-baton-drain-timeout",
    "x-baton-mirror-sync-timeout",
    "x-baton-prepared-timeout",
    "x-baton-commit-timeout",
];

const PARAMS: [Param; 7] = [
    Param { name: NAMES[0], default_ms: 10_000, field: |p| &mut p.connect_timeout },
    Param { name: NAMES[1], default_ms: 10_000, field: |p| &mut p.hello_timeout },
    Param { name: NAMES[2], default_ms: 30_000, field: |p| &mut p.io_timeout },
    Param { name: NAMES[3], default_ms: 10_000, field: |p| &mut p.drain_timeout },
    Param { name: NAMES[4], default_ms: 30_000, field: |p| &mut p.mirror_sync_timeout },
    Param { name: NAMES[5], default_ms: 30_000, field: |p| &mut p.prepared_timeout },
    Param { name: NAMES[6], default_ms: 30_000, field: |p| &mut p.commit_timeout },
];

impl Default for Parameters {
    fn default() -> Self {
        let z = Duration::ZERO;
        let mut p = Parameters {
            connect_timeout: z,
            hello_timeout: z,
            io_timeout: z,
            drain_timeout: z,
            mirror_sync_timeout: z,
            prepared_timeout: z,
            commit_timeout: z,
        };
        for d in &PARAMS {
            *(d.field)(&mut p) = Duration::from_millis(d.default_ms);
        }
        p
    }
}

impl Parameters {
    /// The parameter names, for the QMP schema.
    pub fn names() -> impl Iterator<Item = &'static str> {
        PARAMS.iter().map(|p| p.name)
    }

    /// Apply `migrate-set-parameters` arguments: all checked first, so an
    /// error changes nothing. Names outside the table are refused by name.
    pub fn set(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let mut next = *self;
        for (k, v) in args {
            let Some(param) = PARAMS.iter().find(|p| p.name == k) else {
                return Err(format!("migration parameter '{k}' is not supported"));
            };
            let ms = v.as_u64().filter(|ms| (MIN_MS..=MAX_MS).contains(ms)).ok_or_else(|| {
                format!("Parameter '{k}' expects a number of milliseconds between {MIN_MS} and {MAX_MS}")
            })?;
            *(param.field)(&mut next) = Duration::from_millis(ms);
        }
        *self = next;
        Ok(())
    }

    /// `query-migrate-parameters`' members (milliseconds).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut me = *self;
        PARAMS.iter().map(|p| (p.name.to_string(), Value::from((p.field)(&mut me).as_millis() as u64))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bad_value_changes_nothing_and_names_the_parameter() {
        let mut p = Parameters::default();
        let args = json!({"x-baton-io-timeout": 5, "x-baton-commit-timeout": 0});
        let e = p.set(args.as_object().unwrap()).unwrap_err();
        assert!(e.contains("x-baton-commit-timeout"), "{e}");
        assert_eq!(p, Parameters::default());
        let e = p.set(json!({"x-baton-nope": 5}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("x-baton-nope"), "{e}");
        p.set(json!({"x-baton-io-timeout": 5}).as_object().unwrap()).unwrap();
        assert_eq!(p.io_timeout, Duration::from_millis(5));
        assert_eq!(p.to_json()["x-baton-io-timeout"], 5);
        assert_eq!(Parameters::names().count(), p.to_json().len());
    }
}
