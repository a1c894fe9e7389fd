//! Block jobs: `blockdev-mirror`, the `job-*` verbs (by job id) and the
//! `block-job-*` verbs (by device, with QEMU's DeviceNotActive class).

use std::sync::Arc;

use serde_json::json;

use super::error::{ErrorClass, QmpError};
use super::{Int, NoArgs, Reply};
use crate::daemon::Daemon;

block::qapi_enum! {
    pub enum MirrorSyncMode { "top" Top, "full" Full, "none" None, "incremental" Incremental, "bitmap" Bitmap }
}

block::qapi_enum! {
    pub enum BlockdevOnError { "report" Report, "ignore" Ignore, "enospc" Enospc, "stop" Stop, "auto" Auto }
}

block::qapi_enum! {
    pub enum MirrorCopyMode { "background" Background, "write-blocking" WriteBlocking }
}

block::qapi_struct! {
    #[allow(dead_code)]
    pub struct BlockdevMirror {
        "job-id" job_id: Option<String>,
        "device" device: String,
        "target" target: String,
        "replaces" replaces: Option<String>,
        "sync" sync: MirrorSyncMode,
        "speed" speed: Option<Int>,
        "granularity" granularity: Option<Int>,
        "buf-size" buf_size: Option<Int>,
        "on-source-error" on_source_error: Option<BlockdevOnError>,
        "on-target-error" on_target_error: Option<BlockdevOnError>,
        "filter-node-name" filter_node_name: Option<String>,
        "copy-mode" copy_mode: Option<MirrorCopyMode>,
        "auto-finalize" auto_finalize: Option<bool>,
        "auto-dismiss" auto_dismiss: Option<bool>,
        "x-baton-auto-converge" auto_converge: Option<bool>,
        "x-baton-converge-after-ms" converge_after_ms: Option<Int>,
    }
}

fn on_error(e: Option<BlockdevOnError>) -> jobs::mirror::OnError {
    use jobs::mirror::OnError;
    match e.unwrap_or(BlockdevOnError::Report) {
        BlockdevOnError::Report => OnError::Report,
        BlockdevOnError::Ignore => OnError::Ignore,
        BlockdevOnError::Stop => OnError::Stop,
        // QEMU maps these for mirror: enospc/auto stop on ENOSPC else report; baton reports.
        BlockdevOnError::Enospc | BlockdevOnError::Auto => OnError::Report,
    }
}

pub async fn blockdev_mirror(d: Arc<Daemon>, a: BlockdevMirror) -> Reply {
    use jobs::mirror::{CopyMode, MirrorOptions, SyncMode};
    let id = a.job_id.unwrap_or_else(|| a.device.clone());
    let sync = match a.sync {
        MirrorSyncMode::Full => SyncMode::Full,
        MirrorSyncMode::Top => SyncMode::Top,
        MirrorSyncMode::None => SyncMode::None,
        other => return Err(QmpError::generic(format!("sync mode '{}' is not supported for mirror", other.as_str()))),
    };
    if a.replaces.is_some() || a.filter_node_name.is_some() {
        return Err(QmpError::generic("'replaces' and 'filter-node-name' are not supported yet"));
    }
    let mut m = MirrorOptions::new(&a.device, &a.target);
    m.sync = sync;
    if let Some(g) = a.granularity.and_then(|g| g.as_u64()) {
        m.granularity = g;
    }
    if let Some(bs) = a.buf_size.and_then(|b| b.as_u64()) {
        m.buf_size = bs;
    }
    m.copy_mode = match a.copy_mode {
        Some(MirrorCopyMode::WriteBlocking) => CopyMode::WriteBlocking,
        _ => CopyMode::Background,
    };
    m.on_source_error = on_error(a.on_source_error);
    m.on_target_error = on_error(a.on_target_error);
    m.auto_converge = a.auto_converge.unwrap_or(false);
    if let Some(ms) = a.converge_after_ms.and_then(|ms| ms.as_u64()) {
        m.converge_after = std::time::Duration::from_millis(ms);
    }
    let speed = match a.speed {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| QmpError::generic("Parameter 'speed' expects a non-negative value"))?,
    };
    let job = jobs::JobOptions {
        id,
        speed,
        auto_finalize: a.auto_finalize.unwrap_or(true),
        auto_dismiss: a.auto_dismiss.unwrap_or(true),
    };
    jobs::mirror::start(&d.graph, &d.jobs, job, m)?;
    Ok(json!({}))
}

pub async fn query_jobs(d: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(d.jobs.query_jobs())
}

pub async fn query_block_jobs(d: Arc<Daemon>, _: NoArgs) -> Reply {
    Ok(d.jobs.query_block_jobs())
}

block::qapi_struct! {
    pub struct JobId {
        "id" id: String,
    }
}

pub async fn job_pause(d: Arc<Daemon>, a: JobId) -> Reply {
    d.jobs.pause(&a.id)?;
    Ok(json!({}))
}

pub async fn job_resume(d: Arc<Daemon>, a: JobId) -> Reply {
    d.jobs.resume(&a.id)?;
    Ok(json!({}))
}

pub async fn job_cancel(d: Arc<Daemon>, a: JobId) -> Reply {
    // job-cancel is always a hard cancel (QEMU: force for mirror).
    d.jobs.cancel(&a.id, true)?;
    Ok(json!({}))
}

pub async fn job_complete(d: Arc<Daemon>, a: JobId) -> Reply {
    d.jobs.complete(&a.id)?;
    Ok(json!({}))
}

pub async fn job_finalize(d: Arc<Daemon>, a: JobId) -> Reply {
    d.jobs.finalize(&a.id)?;
    Ok(json!({}))
}

pub async fn job_dismiss(d: Arc<Daemon>, a: JobId) -> Reply {
    d.jobs.dismiss(&a.id)?;
    Ok(json!({}))
}

block::qapi_struct! {
    pub struct BlockJobDevice {
        "device" device: String,
    }
}

block::qapi_struct! {
    pub struct BlockJobCancel {
        "device" device: String,
        "force" force: Option<bool>,
    }
}

block::qapi_struct! {
    pub struct BlockJobSetSpeed {
        "device" device: String,
        "speed" speed: Int,
    }
}

/// The block job `device` (QEMU looks block jobs up by device, with its own class).
fn block_job(d: &Daemon, device: &str) -> Result<Arc<jobs::Job>, QmpError> {
    d.jobs
        .find(device)
        .map_err(|_| QmpError::new(ErrorClass::DeviceNotActive, format!("Block job '{device}' not found")))
}

pub async fn block_job_pause(d: Arc<Daemon>, a: BlockJobDevice) -> Reply {
    block_job(&d, &a.device)?;
    d.jobs.pause(&a.device)?;
    Ok(json!({}))
}

pub async fn block_job_resume(d: Arc<Daemon>, a: BlockJobDevice) -> Reply {
    block_job(&d, &a.device)?;
    d.jobs.resume(&a.device)?;
    Ok(json!({}))
}

pub async fn block_job_cancel(d: Arc<Daemon>, a: BlockJobCancel) -> Reply {
    block_job(&d, &a.device)?;
    d.jobs.cancel(&a.device, a.force.unwrap_or(false))?;
    Ok(json!({}))
}

pub async fn block_job_complete(d: Arc<Daemon>, a: BlockJobDevice) -> Reply {
    let id = a.device;
    let job = block_job(&d, &id)?;
    if job.status() != jobs::Status::Ready {
        return Err(QmpError::generic(format!("The active block job '{id}' cannot be completed")));
    }
    d.jobs.complete(&id)?;
    Ok(json!({}))
}

pub async fn block_job_finalize(d: Arc<Daemon>, a: JobId) -> Reply {
    block_job(&d, &a.id)?;
    d.jobs.finalize(&a.id)?;
    Ok(json!({}))
}

pub async fn block_job_dismiss(d: Arc<Daemon>, a: JobId) -> Reply {
    block_job(&d, &a.id)?;
    d.jobs.dismiss(&a.id)?;
    Ok(json!({}))
}

pub async fn block_job_set_speed(d: Arc<Daemon>, a: BlockJobSetSpeed) -> Reply {
    block_job(&d, &a.device)?;
    d.jobs.set_speed(&a.device, a.speed.as_i64().unwrap_or(0))?;
    Ok(json!({}))
}

block::qapi_enum! {
    pub enum JobType { "mirror" Mirror }
}

block::qapi_struct! {
    pub struct BlockJobChange {
        "id" id: String,
        "type" kind: JobType,
        "copy-mode" copy_mode: MirrorCopyMode,
    }
}

pub async fn job_change(d: Arc<Daemon>, a: BlockJobChange) -> Reply {
    let opts = json!({"id": a.id, "type": a.kind.as_str(), "copy-mode": a.copy_mode.as_str()});
    let opts = opts.as_object().cloned().unwrap_or_default();
    d.jobs.change(&a.id, &opts)?;
    Ok(json!({}))
}
