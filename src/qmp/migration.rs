//! Migration: `migrate`, `migrate_cancel`, `migrate-continue`, capabilities
//! and parameters, `query-migrate`, and baton's `x-baton-migrate-decide` and
//! `x-baton-failpoint`.

use std::sync::Arc;

use block::schema::Field;
use serde_json::{json, Map, Value};

use super::error::QmpError;
use super::{Int, NoArgs, Reply};
use crate::daemon::Daemon;

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct Migrate {
        "uri" uri: String,
        "detach" detach: Option<bool>,
        "resume" resume: Option<bool>,
    }
}

pub async fn migrate(d: Arc<Daemon>, a: Migrate) -> Reply {
    if a.resume == Some(true) {
        return Err(QmpError::generic("resuming a postcopy migration is not supported"));
    }
    d.migrate(&a.uri)?;
    Ok(json!({}))
}

pub async fn migrate_cancel(d: Arc<Daemon>, _: NoArgs) -> Reply {
    d.migration.cancel()?;
    Ok(json!({}))
}

block::qapi_enum! {
    #[allow(dead_code)]
    pub enum ContinueState { "pre-switchover" PreSwitchover }
}

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct MigrateContinue {
        "state" state: ContinueState,
    }
}

pub async fn migrate_continue(d: Arc<Daemon>, _: MigrateContinue) -> Reply {
    d.migration.proceed()?;
    Ok(json!({}))
}

block::qapi_struct! {
    pub struct MigrationCapabilityStatus {
        "capability" capability: String,
        "state" state: bool,
    }
}

block::qapi_struct! {
    pub struct MigrateSetCapabilities {
        "capabilities" capabilities: Vec<MigrationCapabilityStatus>,
    }
}

pub async fn migrate_set_capabilities(d: Arc<Daemon>, a: MigrateSetCapabilities) -> Reply {
    let caps: Vec<(String, bool)> = a.capabilities.into_iter().map(|c| (c.capability, c.state)).collect();
    d.migration.set_capabilities(&caps)?;
    Ok(json!({}))
}

pub async fn query_migrate_capabilities(d: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(d.migration.query_capabilities())
}

/// `migrate-set-parameters`' members: the parameters the migration knows
/// (it checks their values), each an optional integer.
pub fn parameters() -> Vec<Field> {
    use vmm::migration::params::{BitmapMigrationNodeAlias, Parameters, BLOCK_BITMAP_MAPPING};
    let mut f: Vec<Field> = Parameters::int_names().map(Field::of::<Option<Int>>).collect();
    f.push(Field::of::<Option<Vec<BitmapMigrationNodeAlias>>>(BLOCK_BITMAP_MAPPING));
    f
}

pub async fn migrate_set_parameters(d: Arc<Daemon>, a: Map<String, Value>) -> Reply {
    d.migration.set_parameters(&a)?;
    Ok(json!({}))
}

pub async fn query_migrate_parameters(d: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(Value::Object(d.migration.params().to_json()))
}

pub async fn query_migrate(d: Arc<Daemon>, _: NoArgs) -> Reply {
    let total = d.vm().map(|v| v.config().memory).unwrap_or(0);
    let mut v = d.migration.query(total);
    let held = vmm::migration::points::held();
    if !held.is_empty() {
        v["x-baton-held"] = json!(held);
    }
    Ok(v)
}

block::qapi_enum! {
    pub enum Decision { "commit" Commit, "abort" Abort }
}

block::qapi_struct! {
    pub struct MigrateDecide {
        "decision" decision: Decision,
    }
}

/// `x-baton-migrate-decide`: the operator resolves a prepared destination
/// whose source's decision was lost (commit when the source is postmigrate).
pub async fn migrate_decide(d: Arc<Daemon>, a: MigrateDecide) -> Reply {
    let decision = match a.decision {
        Decision::Commit => vmm::migration::Decision::Commit,
        Decision::Abort => vmm::migration::Decision::Abort,
    };
    d.migration.decide(decision)?;
    Ok(json!({}))
}

block::qapi_struct! {
    pub struct Failpoint {
        "name" name: String,
        "actions" actions: String,
    }
}

/// `x-baton-failpoint`: configure (or, with actions "off", remove) a
/// failpoint at run time; only in builds with the `failpoints` feature.
pub async fn failpoint(_d: Arc<Daemon>, a: Failpoint) -> Reply {
    if !fail::has_failpoints() {
        return Err(QmpError::generic("this build has no failpoints (feature failpoints)"));
    }
    if a.actions == "off" {
        fail::remove(&a.name);
        return Ok(json!({}));
    }
    fail::cfg(a.name, &a.actions).map_err(QmpError::generic)?;
    Ok(json!({}))
}
