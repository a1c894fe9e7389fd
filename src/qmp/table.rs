//! The command table: every command's name, argument type and handler, and
//! the events baton emits. [`dispatch`] is the only way in: it checks the
//! arguments against the command's schema, decodes them into the command's
//! argument type, then runs the handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use block::schema::{check_fields, Field, QapiObject, Ty};
use serde_json::{Map, Value};

use super::error::{ErrorClass, QmpError};
use super::schema::CommandInfo;
use super::{bitmap, block as blk, control, guest, jobs, migration, nbd, yank, Int, NoArgs, Reply};
use crate::daemon::Daemon;

type Run = fn(Arc<Daemon>, Map<String, Value>) -> Pin<Box<dyn Future<Output = Reply> + Send>>;

/// One command of the schema.
pub struct Command {
    pub name: &'static str,
    /// The argument members, from the argument type.
    pub args: fn() -> Vec<Field>,
    /// Return type for introspection (`None`: an empty object).
    pub ret: Option<fn() -> Ty>,
    run: Run,
}

/// `cmd!("name", Args, handler[, ret])`: the handler gets an `Args`, decoded
/// from arguments checked against `Args`' schema.
macro_rules! cmd {
    ($name:literal, $args:ty, $handler:path) => {
        cmd!($name, $args, $handler, None)
    };
    ($name:literal, $args:ty, $handler:path, $ret:expr) => {
        Command {
            name: $name,
            args: <$args as QapiObject>::fields,
            ret: $ret,
            run: |d, a| {
                Box::pin(async move {
                    let a = block::schema::parse::<$args>(Value::Object(a))?;
                    $handler(d, a).await
                })
            },
        }
    };
}

/// `open_cmd!("name", fields, handler)`: the members `fields` are checked,
/// others are allowed and left to the handler (a flat union whose variants
/// the block layer checks, such as blockdev-add's); the handler gets the
/// arguments as they came.
macro_rules! open_cmd {
    ($name:literal, $fields:expr, $handler:path) => {
        Command {
            name: $name,
            args: $fields,
            ret: None,
            run: |d, a| {
                Box::pin(async move {
                    check_fields(&$fields(), &a, "", true)?;
                    $handler(d, a).await
                })
            },
        }
    };
}

/// Events baton emits, with their data members.
pub fn events() -> Vec<(&'static str, Vec<Field>)> {
    let s = Field::of::<String>;
    let int = Field::of::<Int>;
    let job = || vec![s("type"), s("device"), int("len"), int("offset"), int("speed")];
    vec![
        ("BLOCK_EXPORT_DELETED", vec![s("id")]),
        ("JOB_STATUS_CHANGE", vec![s("id"), s("status")]),
        ("BLOCK_JOB_READY", job()),
        ("BLOCK_JOB_COMPLETED", [job(), vec![Field::of::<Option<String>>("error")]].concat()),
        ("BLOCK_JOB_CANCELLED", job()),
        ("BLOCK_JOB_ERROR", vec![s("device"), s("operation"), s("action")]),
        ("BLOCK_JOB_PENDING", vec![s("type"), s("id")]),
        ("MIGRATION", vec![s("status")]),
        ("MIGRATION_PASS", vec![int("pass")]),
        ("STOP", vec![]),
        ("RESUME", vec![]),
        (
            "BLOCK_IO_ERROR",
            vec![
                s("device"),
                Field::of::<Option<String>>("node-name"),
                s("operation"),
                s("action"),
                Field::of::<Option<bool>>("nospace"),
                s("reason"),
            ],
        ),
        ("X_BATON_BLOCK_JOB_COPY_MODE_CHANGED", vec![s("device"), s("copy-mode"), s("reason")]),
    ]
}

/// Every command. `qmp_capabilities` is handled by the session but listed here too.
pub static COMMANDS: &[Command] = &[
    cmd!("qmp_capabilities", control::QmpCapabilities, control::qmp_capabilities),
    cmd!("query-commands", NoArgs, control::query_commands, Some(control::query_commands_ret)),
    cmd!("query-version", NoArgs, control::query_version, Some(control::query_version_ret)),
    cmd!("query-qmp-schema", NoArgs, control::query_qmp_schema, Some(control::any_list)),
    cmd!("quit", NoArgs, control::quit),
    open_cmd!("blockdev-add", blk::blockdev_add_fields, blk::blockdev_add),
    cmd!("blockdev-del", blk::BlockdevDel, blk::blockdev_del),
    cmd!("blockdev-set-active", blk::BlockdevSetActive, blk::blockdev_set_active),
    cmd!("query-named-block-nodes", blk::QueryNamedBlockNodes, blk::query_named_block_nodes, Some(control::any_list)),
    cmd!("block-dirty-bitmap-add", bitmap::BlockDirtyBitmapAdd, bitmap::add),
    cmd!("block-dirty-bitmap-remove", super::BlockDirtyBitmap, bitmap::remove),
    cmd!("block-dirty-bitmap-clear", super::BlockDirtyBitmap, bitmap::clear),
    cmd!("block-dirty-bitmap-enable", super::BlockDirtyBitmap, bitmap::enable),
    cmd!("block-dirty-bitmap-disable", super::BlockDirtyBitmap, bitmap::disable),
    cmd!("block-dirty-bitmap-merge", bitmap::BlockDirtyBitmapMerge, bitmap::merge),
    cmd!("x-debug-block-dirty-bitmap-sha256", super::BlockDirtyBitmap, bitmap::sha256, Some(bitmap::sha256_ret)),
    cmd!("nbd-server-start", nbd::NbdServerStart, nbd::nbd_server_start),
    cmd!("nbd-server-stop", NoArgs, nbd::nbd_server_stop),
    cmd!("block-export-add", nbd::BlockExportAdd, nbd::block_export_add),
    cmd!("block-export-del", nbd::BlockExportDel, nbd::block_export_del),
    cmd!("query-block-exports", NoArgs, nbd::query_block_exports, Some(nbd::query_block_exports_ret)),
    cmd!("transaction", bitmap::Transaction, bitmap::transaction),
    cmd!("x-baton-blkdebug-set-rules", blk::BlkdebugSetRules, blk::blkdebug_set_rules),
    cmd!("yank", yank::Yank, yank::yank),
    cmd!("query-yank", NoArgs, yank::query_yank, Some(yank::query_yank_ret)),
    cmd!("blockdev-mirror", jobs::BlockdevMirror, jobs::blockdev_mirror),
    cmd!("query-jobs", NoArgs, jobs::query_jobs, Some(control::any_list)),
    cmd!("query-block-jobs", NoArgs, jobs::query_block_jobs, Some(control::any_list)),
    cmd!("job-pause", jobs::JobId, jobs::job_pause),
    cmd!("job-resume", jobs::JobId, jobs::job_resume),
    cmd!("job-cancel", jobs::JobId, jobs::job_cancel),
    cmd!("job-complete", jobs::JobId, jobs::job_complete),
    cmd!("job-finalize", jobs::JobId, jobs::job_finalize),
    cmd!("job-dismiss", jobs::JobId, jobs::job_dismiss),
    cmd!("block-job-pause", jobs::BlockJobDevice, jobs::block_job_pause),
    cmd!("block-job-resume", jobs::BlockJobDevice, jobs::block_job_resume),
    cmd!("block-job-cancel", jobs::BlockJobCancel, jobs::block_job_cancel),
    cmd!("block-job-complete", jobs::BlockJobDevice, jobs::block_job_complete),
    cmd!("block-job-finalize", jobs::JobId, jobs::block_job_finalize),
    cmd!("block-job-dismiss", jobs::JobId, jobs::block_job_dismiss),
    cmd!("block-job-set-speed", jobs::BlockJobSetSpeed, jobs::block_job_set_speed),
    cmd!("block-job-change", jobs::BlockJobChange, jobs::job_change),
    cmd!("migrate", migration::Migrate, migration::migrate),
    cmd!("migrate-incoming", migration::MigrateIncoming, migration::migrate_incoming),
    cmd!("migrate_cancel", NoArgs, migration::migrate_cancel),
    // baton's first releases spelled it with a dash; kept as an alias.
    cmd!("migrate-cancel", NoArgs, migration::migrate_cancel),
    cmd!("migrate-continue", migration::MigrateContinue, migration::migrate_continue),
    cmd!("migrate-set-capabilities", migration::MigrateSetCapabilities, migration::migrate_set_capabilities),
    cmd!("query-migrate", NoArgs, migration::query_migrate, Some(control::any)),
    cmd!("query-migrate-capabilities", NoArgs, migration::query_migrate_capabilities, Some(control::any)),
    open_cmd!("migrate-set-parameters", migration::parameters, migration::migrate_set_parameters),
    cmd!("query-migrate-parameters", NoArgs, migration::query_migrate_parameters, Some(control::any)),
    cmd!("x-baton-migrate-decide", migration::MigrateDecide, migration::migrate_decide),
    cmd!("x-baton-failpoint", migration::Failpoint, migration::failpoint),
    cmd!("stop", NoArgs, guest::stop),
    cmd!("cont", NoArgs, guest::cont),
    cmd!("query-status", NoArgs, guest::query_status, Some(guest::query_status_ret)),
    cmd!("x-baton-guest-stats", NoArgs, guest::guest_stats, Some(control::any)),
    cmd!("x-baton-guest-verify", guest::GuestVerify, guest::guest_verify, Some(control::any)),
];

pub fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Check the arguments against the command's schema, then run it.
pub async fn dispatch(d: &Arc<Daemon>, cmd: &'static Command, args: Map<String, Value>) -> Reply {
    (cmd.run)(d.clone(), args).await
}

/// What introspection lists about every command.
pub fn command_infos() -> Vec<CommandInfo> {
    COMMANDS.iter().map(|c| CommandInfo { name: c.name, args: (c.args)(), ret: c.ret.map(|r| r()) }).collect()
}

/// The error for a command that does not exist.
pub fn not_found(name: &str) -> QmpError {
    QmpError::new(ErrorClass::CommandNotFound, format!("The command {name} has not been found"))
}
