//! The QMP control plane: QEMU's wire protocol, command names and argument
//! names, so that `qemu.qmp`, qmp-shell and libvirt-style clients work
//! unchanged. The schema ([`commands::COMMANDS`]) drives dispatch, argument
//! checking and introspection.

pub mod commands;
pub mod error;
pub mod monitor;
pub mod schema;
mod yank;
