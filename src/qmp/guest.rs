//! The guest (`--vm`): `stop`, `cont`, `query-status`, and baton's
//! `x-baton-guest-stats` and `x-baton-guest-verify`.

use std::sync::Arc;

use block::schema::{Field, Ty};
use serde_json::{json, Value};

use super::error::QmpError;
use super::{Int, NoArgs, Reply};
use crate::daemon::Daemon;

fn the_vm(d: &Daemon) -> Result<Arc<vmm::Vm>, QmpError> {
    d.vm().ok_or_else(|| QmpError::generic("there is no guest: start baton daemon with --vm"))
}

pub async fn stop(d: Arc<Daemon>, _: NoArgs) -> Reply {
    let vm = the_vm(&d)?;
    if vm.state() == vmm::RunState::InMigrate {
        return Err(QmpError::generic("the guest is waiting for an incoming migration"));
    }
    vm.stop().await?;
    Ok(json!({}))
}

pub async fn cont(d: Arc<Daemon>, _: NoArgs) -> Reply {
    use vmm::migration::{Handover, Role, Status, VerbError};
    let vm = the_vm(&d)?;
    // I8: a prepared destination cannot know whether the source committed.
    if matches!(d.migration.handover(), Handover::Prepared | Handover::DecisionUnknown)
        && d.migration.role() == Some(Role::Destination)
    {
        return Err(QmpError::generic(format!("cannot run the guest: {}", VerbError::PreparedWaiting)));
    }
    // The source's switchover owns a stopped guest (pre-switchover, device): a
    // `cont` there would run it on disks being handed over.
    let status = d.migration.status();
    if d.migration.role() == Some(Role::Source)
        && matches!(status, Status::PreSwitchover | Status::Device | Status::Cancelling)
    {
        return Err(QmpError::generic(format!(
            "cannot run the guest while its migration is in '{}': use migrate-continue or migrate_cancel",
            status.as_str()
        )));
    }
    vm.cont().await?;
    Ok(json!({}))
}

pub fn query_status_ret() -> Ty {
    Ty::Obj(vec![
        Field::of::<bool>("running"),
        Field::of::<String>("status"),
        Field::of::<Option<String>>("x-baton-handover"),
        Field::of::<Option<String>>("x-baton-waiting"),
        Field::of::<Option<Value>>("x-baton-lease"),
    ])
}

pub async fn query_status(d: Arc<Daemon>, _: NoArgs) -> Reply {
    let vm = the_vm(&d)?;
    let st = vm.state();
    let mut v = json!({"running": st == vmm::RunState::Running, "status": st.as_str()});
    if let (Some(Value::Object(extra)), Some(o)) = (d.migration.status_extra(), v.as_object_mut()) {
        o.extend(extra);
    }
    if let Some(t) = vm.tenure() {
        v["x-baton-lease"] = t.status();
    }
    Ok(v)
}

pub async fn guest_stats(d: Arc<Daemon>, _: NoArgs) -> Reply {
    let vm = the_vm(&d)?;
    let s = vm.stats();
    let dev = vm.device();
    Ok(json!({
        "writes": s.writes, "checks": s.checks, "mismatches": s.mismatches, "io-errors": s.io_errors,
        "batches": s.batches, "last-bad-block": s.last_bad_block, "blocks": dev.blocks(),
        "device-completed": dev.completed.load(std::sync::atomic::Ordering::SeqCst),
        "device-errors": dev.errors.load(std::sync::atomic::Ordering::SeqCst),
        "device-last-error": dev.last_error(), "status": vm.state().as_str(),
    }))
}

block::qapi_struct! {
    pub struct GuestVerify {
        "timeout-ms" timeout_ms: Option<Int>,
    }
}

pub async fn guest_verify(d: Arc<Daemon>, a: GuestVerify) -> Reply {
    let vm = the_vm(&d)?;
    let ms = a.timeout_ms.and_then(|t| t.as_u64()).unwrap_or(120_000);
    let r = vm.verify(std::time::Duration::from_millis(ms)).await?;
    Ok(json!({"checked": r.checked, "mismatches": r.bad, "request": r.request}))
}
