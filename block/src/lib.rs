//! baton's block layer: a graph of nodes addressed by `node-name`, with
//! QEMU's drivers and options (`file`, `raw`, `null-co`, `blkdebug`), QEMU's
//! permission model and image locks, per-node activation whose
//! `inactivate_all` is all or nothing, and named dirty bitmaps.
//!
//! Drivers live in [`drivers`], one module each, and are registered in
//! [`drivers::builtin`] (or with [`Graph::register`] from other crates);
//! see [`driver`] for their shape.
//!
//! Entry points: [`Graph::blockdev_add`], [`Graph::attach`] (returns a
//! [`BlockBackend`] to do I/O through), [`Graph::inactivate_all`] and
//! friends in [`activation`], [`Graph::bitmap_add`].

// `unsafe` only where a module says why it needs it (`buf`, the io_uring
// wrapper `drivers::file::uring`), each block with its `// SAFETY:` argument.
#![deny(unsafe_code)]

pub mod activation;
pub mod backend;
pub mod bitmap;
#[allow(unsafe_code)] // an aligned, zero-initialised allocation
pub mod buf;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod graph;
pub mod inflight;
mod io;
pub mod lock;
pub mod node;
pub mod options;
pub mod perm;
pub mod schema;
pub mod sync;

pub use backend::BlockBackend;
pub use buf::{BufPool, IoBuf};
pub use driver::{Extent, WriteFlags, ZeroFlags};
pub use error::{BlockError, ErrorKind, Op, Result};
pub use graph::Graph;
pub use node::Node;
pub use perm::{Perm, PermSet};
