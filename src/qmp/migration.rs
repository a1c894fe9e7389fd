//! Migration: `migrate`, `migrate_cancel`, `migrate-continue`, capabilities
//! and parameters, `query-migrate`, and baton's `x-baton-migrate-decide` and
//! `x-baton-failpoint`.

use std::sync::Arc;

use block::schema::Field;
use serde_json::{json, Map, Value};

use super::error::QmpError;
use super::nbd::SocketAddressType;
use super::{Int, NoArgs, Reply};
use crate::daemon::{Daemon, NbdAddr};

block::qapi_enum! {
    pub enum MigrationChannelType { "main" Main, "cpr" Cpr }
}

block::qapi_enum! {
    pub enum MigrationAddressType { "socket" Socket, "exec" Exec, "rdma" Rdma, "file" File }
}

block::qapi_struct! {
    /// MigrationAddress: `transport` says which members follow (a socket's
    /// are SocketAddress's: `type` and its own).
    pub struct MigrationAddress {
        "transport" transport: MigrationAddressType,
        "type" kind: Option<SocketAddressType>,
        "host" host: Option<String>,
        "port" port: Option<String>,
        "numeric" numeric: Option<bool>,
        "ipv4" ipv4: Option<bool>,
        "ipv6" ipv6: Option<bool>,
        "path" path: Option<String>,
    }
}

block::qapi_struct! {
    pub struct MigrationChannel {
        "channel-type" channel_type: MigrationChannelType,
        "addr" addr: MigrationAddress,
    }
}

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct Migrate {
        "uri" uri: Option<String>,
        "channels" channels: Option<Vec<MigrationChannel>>,
        "detach" detach: Option<bool>,
        "resume" resume: Option<bool>,
        "x-baton-storage" storage: Option<String>,
    }
}

/// The one address of `uri` or `channels` (QEMU 10's rules and words).
fn address(uri: Option<String>, channels: Option<Vec<MigrationChannel>>) -> Result<NbdAddr, QmpError> {
    // QEMU 10's words for both mistakes.
    let mut channels = match (uri, channels) {
        (Some(_), Some(_)) | (None, None) => return Err(QmpError::generic("need either 'uri' or 'channels' argument")),
        (Some(uri), None) => return Ok(crate::daemon::parse_uri(&uri)?),
        (None, Some(c)) => c,
    };
    if channels.len() != 1 {
        return Err(QmpError::generic("Channel list has more than one entries"));
    }
    let Some(MigrationChannel { channel_type, addr }) = channels.pop() else {
        return Err(QmpError::generic("Channel list has no entries"));
    };
    if channel_type != MigrationChannelType::Main {
        return Err(QmpError::generic(format!("channel-type '{}' is not supported", channel_type.as_str())));
    }
    let missing = |m: &str| QmpError::generic(format!("Parameter 'addr.{m}' is missing"));
    match (addr.transport, addr.kind) {
        (MigrationAddressType::Socket, Some(SocketAddressType::Inet)) => Ok(NbdAddr::Inet {
            host: addr.host.ok_or_else(|| missing("host"))?,
            port: addr.port.ok_or_else(|| missing("port"))?,
        }),
        (MigrationAddressType::Socket, Some(SocketAddressType::Unix)) => {
            Ok(NbdAddr::Unix { path: addr.path.ok_or_else(|| missing("path"))?.into() })
        }
        (MigrationAddressType::Socket, Some(other)) => {
            Err(QmpError::generic(format!("socket address type '{}' is not supported for migration", other.as_str())))
        }
        (MigrationAddressType::Socket, None) => Err(missing("type")),
        (other, _) => Err(QmpError::generic(format!("migration transport '{}' is not supported", other.as_str()))),
    }
}

pub async fn migrate(d: Arc<Daemon>, a: Migrate) -> Reply {
    if a.resume == Some(true) {
        return Err(QmpError::generic("resuming a postcopy migration is not supported"));
    }
    let storage = match a.storage.as_deref() {
        None => false,
        Some("copy") => true,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'x-baton-storage' does not accept value '{other}' (only 'copy': the destination \
                 exports the disk it holds for the guest, and this side mirrors into it)"
            )))
        }
    };
    let to = address(a.uri, a.channels)?;
    d.migrate(to, storage)?;
    Ok(json!({}))
}

block::qapi_struct! {
    pub struct MigrateIncoming {
        "uri" uri: Option<String>,
        "channels" channels: Option<Vec<MigrationChannel>>,
        "exit-on-error" exit_on_error: Option<bool>,
    }
}

/// `migrate-incoming`: start listening on a destination started with
/// `--incoming defer`. With `exit-on-error` (QEMU's default), a failed
/// attempt ends the daemon as it ends QEMU; with `false` the destination
/// rolls back and waits for the next attempt (baton's way with `--incoming URI`).
pub async fn migrate_incoming(d: Arc<Daemon>, a: MigrateIncoming) -> Reply {
    let at = address(a.uri, a.channels)?;
    d.migrate_incoming(at, a.exit_on_error.unwrap_or(true)).await?;
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
