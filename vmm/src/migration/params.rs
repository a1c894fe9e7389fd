//! Migration parameters (`migrate-set-parameters`, `query-migrate-parameters`).
//!
//! QEMU's that baton honours, with QEMU's names, defaults and ranges:
//! `downtime-limit` (ms the guest may stay stopped for the last RAM; it
//! decides when pre-copy ends), `max-bandwidth` (bytes/s, RAM pre-copy only;
//! 0 is no limit; mirrors keep their own `speed`), `avail-switchover-bandwidth`
//! (bytes/s the switchover may assume instead of the measured rate; 0 =
//! measure), `block-bitmap-mapping` (which node and bitmap names the
//! bitmaps travel under). And baton's own: every wait of the handover is
//! bounded, and each bound is an `x-baton-` parameter. One table holds each
//! name, default and range; a `migrate-set-parameters` is checked whole
//! before anything changes.

use std::time::Duration;

use serde_json::{Map, Value};

block::qapi_struct! {
    /// How a bitmap's properties change on the way (QEMU's BitmapMigrationBitmapAliasTransform).
    #[derive(PartialEq, Eq)]
    pub struct BitmapMigrationBitmapAliasTransform {
        "persistent" persistent: Option<bool>,
    }
}

block::qapi_struct! {
    /// A bitmap's name on this side and the alias it travels under.
    #[derive(PartialEq, Eq)]
    pub struct BitmapMigrationBitmapAlias {
        "name" name: String,
        "alias" alias: String,
        "transform" transform: Option<BitmapMigrationBitmapAliasTransform>,
    }
}

block::qapi_struct! {
    /// A node's name on this side, the alias it travels under, and its bitmaps.
    #[derive(PartialEq, Eq)]
    pub struct BitmapMigrationNodeAlias {
        "node-name" node_name: String,
        "alias" alias: String,
        "bitmaps" bitmaps: Vec<BitmapMigrationBitmapAlias>,
    }
}

/// The parameters of the next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// QEMU's `downtime-limit`, in milliseconds.
    pub downtime_limit: u64,
    /// QEMU's `max-bandwidth`, bytes per second (0: no limit).
    pub max_bandwidth: u64,
    /// QEMU's `avail-switchover-bandwidth`, bytes per second (0: measure).
    pub avail_switchover_bandwidth: u64,
    /// QEMU's `block-bitmap-mapping`, as set (None: match bitmaps by node name).
    pub block_bitmap_mapping: Option<Vec<BitmapMigrationNodeAlias>>,
    /// Pre-copy passes at most (after the first, which sends every page).
    pub max_passes: u64,
    /// 1: fail the attempt (the guest runs on) when `max_passes` passes do
    /// not bring the switchover's prediction within `downtime-limit`; 0:
    /// switch over anyway, as QEMU overruns its limit.
    pub strict_downtime: u64,
    /// Destination: the TCP port a storage copy's export listens on (on the
    /// migration's address; 0: one the kernel picks). For firewalls.
    pub storage_port: u64,
    /// The mapping as the client gave it, for `query-migrate-parameters`.
    block_bitmap_mapping_json: Option<Value>,
}

/// One integer parameter: its name, range, default, unit (for errors) and place.
struct Param {
    name: &'static str,
    default: u64,
    min: u64,
    max: u64,
    /// How QEMU names the parameter, its upper bound and unit in range errors.
    error_name: &'static str,
    max_text: Option<&'static str>,
    unit: &'static str,
    field: fn(&mut Parameters) -> Slot<'_>,
}

enum Slot<'a> {
    Millis(&'a mut Duration),
    Int(&'a mut u64),
}

/// Bounds of every `x-baton-` timeout, in milliseconds.
pub const MIN_MS: u64 = 1;
pub const MAX_MS: u64 = 3_600_000;
/// QEMU's bound on `downtime-limit` (2000 s).
pub const MAX_DOWNTIME_MS: u64 = 2_000_000;
/// QEMU's default `max-bandwidth`.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

const fn timeout(name: &'static str, default: u64, field: fn(&mut Parameters) -> Slot<'_>) -> Param {
    Param { name, default, min: MIN_MS, max: MAX_MS, error_name: name, max_text: None, unit: "milliseconds", field }
}

const PARAMS: [Param; 13] = [
    Param {
        name: "downtime-limit",
        default: 300,
        min: 0,
        max: MAX_DOWNTIME_MS,
        error_name: "downtime_limit",
        // QEMU's message spells its bound this way.
        max_text: Some("(2000 * 1000)"),
        unit: "ms",
        field: |p| Slot::Int(&mut p.downtime_limit),
    },
    Param {
        name: "max-bandwidth",
        default: DEFAULT_MAX_BANDWIDTH,
        min: 0,
        max: u64::MAX,
        error_name: "max_bandwidth",
        max_text: None,
        unit: "bytes/second",
        field: |p| Slot::Int(&mut p.max_bandwidth),
    },
    Param {
        name: "avail-switchover-bandwidth",
        default: 0,
        min: 0,
        max: u64::MAX,
        error_name: "avail_switchover_bandwidth",
        max_text: None,
        unit: "bytes/second",
        field: |p| Slot::Int(&mut p.avail_switchover_bandwidth),
    },
    Param {
        name: "x-baton-max-passes",
        default: 8,
        min: 1,
        max: 1000,
        error_name: "x-baton-max-passes",
        max_text: None,
        unit: "passes",
        field: |p| Slot::Int(&mut p.max_passes),
    },
    Param {
        name: "x-baton-strict-downtime",
        default: 0,
        min: 0,
        max: 1,
        error_name: "x-baton-strict-downtime",
        max_text: None,
        unit: "(0: switch over anyway, as QEMU; 1: fail and run on)",
        field: |p| Slot::Int(&mut p.strict_downtime),
    },
    Param {
        name: "x-baton-storage-port",
        default: 0,
        min: 0,
        max: 65535,
        error_name: "x-baton-storage-port",
        max_text: None,
        unit: "(a TCP port; 0: the kernel picks one)",
        field: |p| Slot::Int(&mut p.storage_port),
    },
    timeout("x-baton-connect-timeout", 10_000, |p| Slot::Millis(&mut p.connect_timeout)),
    timeout("x-baton-hello-timeout", 10_000, |p| Slot::Millis(&mut p.hello_timeout)),
    timeout("x-baton-io-timeout", 30_000, |p| Slot::Millis(&mut p.io_timeout)),
    timeout("x-baton-drain-timeout", 10_000, |p| Slot::Millis(&mut p.drain_timeout)),
    timeout("x-baton-mirror-sync-timeout", 30_000, |p| Slot::Millis(&mut p.mirror_sync_timeout)),
    timeout("x-baton-prepared-timeout", 30_000, |p| Slot::Millis(&mut p.prepared_timeout)),
    timeout("x-baton-commit-timeout", 30_000, |p| Slot::Millis(&mut p.commit_timeout)),
];

/// The one parameter that is not an integer.
pub const BLOCK_BITMAP_MAPPING: &str = "block-bitmap-mapping";

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
            downtime_limit: 0,
            max_bandwidth: 0,
            avail_switchover_bandwidth: 0,
            max_passes: 0,
            strict_downtime: 0,
            storage_port: 0,
            block_bitmap_mapping: None,
            block_bitmap_mapping_json: None,
        };
        for d in &PARAMS {
            match (d.field)(&mut p) {
                Slot::Millis(f) => *f = Duration::from_millis(d.default),
                Slot::Int(f) => *f = d.default,
            }
        }
        p
    }
}

impl Parameters {
    /// The integer parameters' names, for the QMP schema (and
    /// [`BLOCK_BITMAP_MAPPING`]).
    pub fn int_names() -> impl Iterator<Item = &'static str> {
        PARAMS.iter().map(|p| p.name)
    }

    /// Apply `migrate-set-parameters` arguments: all checked first, so an
    /// error changes nothing. Names outside the table are refused by name.
    pub fn set(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let mut next = self.clone();
        for (k, v) in args {
            if k == BLOCK_BITMAP_MAPPING {
                let m: Vec<BitmapMigrationNodeAlias> = serde_json::from_value(v.clone())
                    .map_err(|e| format!("Invalid parameter type for '{BLOCK_BITMAP_MAPPING}': {e}"))?;
                super::bitmaps::check_mapping(&m)?;
                next.block_bitmap_mapping = Some(m);
                next.block_bitmap_mapping_json = Some(v.clone());
                continue;
            }
            let Some(param) = PARAMS.iter().find(|p| p.name == k) else {
                return Err(format!("migration parameter '{k}' is not supported"));
            };
            let n = v.as_u64().filter(|n| (param.min..=param.max).contains(n)).ok_or_else(|| {
                let max = param.max_text.map_or_else(|| param.max.to_string(), str::to_string);
                format!(
                    "Parameter '{}' expects an integer in the range of {} to {max} {}",
                    param.error_name, param.min, param.unit
                )
            })?;
            match (param.field)(&mut next) {
                Slot::Millis(f) => *f = Duration::from_millis(n),
                Slot::Int(f) => *f = n,
            }
        }
        *self = next;
        Ok(())
    }

    /// `query-migrate-parameters`' members (`block-bitmap-mapping` only once set, as QEMU).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut me = self.clone();
        let mut m: Map<String, Value> = PARAMS
            .iter()
            .map(|p| {
                let v = match (p.field)(&mut me) {
                    Slot::Millis(f) => f.as_millis() as u64,
                    Slot::Int(f) => *f,
                };
                (p.name.to_string(), Value::from(v))
            })
            .collect();
        if let Some(j) = &self.block_bitmap_mapping_json {
            m.insert(BLOCK_BITMAP_MAPPING.to_string(), j.clone());
        }
        m
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
        assert_eq!(Parameters::int_names().count(), p.to_json().len());
    }

    #[test]
    fn qemus_parameters_have_qemus_defaults_and_ranges() {
        let mut p = Parameters::default();
        let j = p.to_json();
        assert_eq!(j["downtime-limit"], 300);
        assert_eq!(j["max-bandwidth"], 128 << 20);
        assert_eq!(j["avail-switchover-bandwidth"], 0);
        assert!(j.get(BLOCK_BITMAP_MAPPING).is_none());
        let e = p.set(json!({"downtime-limit": 2_000_001}).as_object().unwrap()).unwrap_err();
        assert_eq!(e, "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms");
        let e = p.set(json!({"max-bandwidth": -1}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("max_bandwidth"), "{e}");
        p.set(json!({"downtime-limit": 0, "max-bandwidth": 0}).as_object().unwrap()).unwrap();
        assert_eq!((p.downtime_limit, p.max_bandwidth), (0, 0));
        let m = json!([{"node-name": "disk0", "alias": "d", "bitmaps": [{"name": "b0", "alias": "b"}]}]);
        p.set(json!({ "block-bitmap-mapping": m.clone() }).as_object().unwrap()).unwrap();
        assert_eq!(p.to_json()[BLOCK_BITMAP_MAPPING], m);
        let mapping = p.block_bitmap_mapping.as_ref().unwrap();
        assert_eq!((mapping[0].node_name.as_str(), mapping[0].bitmaps[0].alias.as_str()), ("disk0", "b"));
        let e = p.set(json!({"block-bitmap-mapping": [{"node-name": "x"}]}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("block-bitmap-mapping"), "{e}");
    }
}
