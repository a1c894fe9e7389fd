//! The NBD client: a block driver (`"driver": "nbd"`) whose storage is an
//! export on a remote NBD server.
//!
//! Storage migration mirrors the source disk into the destination's export
//! through this driver, so it is built for one job above all: keeping many
//! requests in flight on one connection without copying payloads more than
//! the socket forces us to. Hence:
//!
//! - One **reader task** owns the read half. It demultiplexes replies by
//!   cookie and reads `NBD_REPLY_TYPE_OFFSET_DATA` payloads straight into the
//!   caller's [`IoBuf`](block::IoBuf) (which travels inside the in-flight
//!   slot), so a read is one copy from the kernel, as with a local file.
//! - Senders take turns on the **write half** through an async mutex held for
//!   exactly one request (header + payload), never across the wait for the
//!   reply.
//! - The newest protocol the server speaks is negotiated (extended headers,
//!   else structured replies, else simple replies) because only structured
//!   replies make sparse reads and read errors unambiguous, and only
//!   `base:allocation` lets a mirror skip holes on the destination.
//! - Dropping a request future is safe: before it is sent it is simply
//!   unregistered; once sent its slot stays until the reply arrives and is
//!   absorbed. Only a future dropped halfway through writing its request kills
//!   the connection, because the server would read the next header as payload.
//! - Reads and writes larger than the server's maximum block size (at most
//!   32 MiB, as QEMU) go out as consecutive pieces; write-zeroes, trim and
//!   block status in pieces of at most 1 GiB.
//! - There is no reconnect (DESIGN.md leaves it for later): a dead connection
//!   fails every pending and later request with EIO and says why, instead of
//!   hanging a job or a guest. A server that breaks the protocol (unknown
//!   cookie, bad magic, a chunk outside the request) kills the connection the
//!   same way, since the stream can no longer be trusted.
//! - A server that stops answering must not hang its users either. A request
//!   without its reply after `x-baton-request-timeout` seconds (default 60;
//!   QEMU has no such bound and relies on `yank`) kills the connection: it
//!   fails with ETIMEDOUT naming the node, and so does every other request in
//!   flight, because a late reply could no longer be told from a stray one.
//!   The bound covers the whole request (queueing for the socket, sending,
//!   the reply) and holds for requests whose caller gave up waiting too.
//! - `yank` (QMP, as QEMU's for an `nbd` node) shuts the socket down at once
//!   and fails every request in flight and later with ECONNABORTED-like EIO,
//!   without a word to the server.
//!
//! The client's four concerns, one file each:
//!
//! ```text
//! options.rs    BlockdevOptionsNbd (blockdev-add's options, declared and
//!               checked) and NbdClientOptions / NbdServer, what they open
//! negotiate.rs  connecting and the option haggling, up to ExportInfo
//! inflight.rs   the in-flight table (cookie -> slot), the senders' side of
//!               it, the reader task that demultiplexes replies, the watchdog
//! driver.rs     NbdBdrv (the block::driver::Driver impl) and NbdClient:
//!               the leaf's I/O, shutdown and yank
//! ```

use std::io;

mod driver;
mod inflight;
mod negotiate;
mod options;

pub use driver::{connect, register, NbdBdrv, NbdClient};
pub use negotiate::ExportInfo;
pub use options::{
    BlockdevOptionsNbd, NbdClientOptions, NbdServer, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT,
    MAX_REQUEST_TIMEOUT_SECS,
};

/// Largest option reply or non-data reply chunk we accept before calling it a protocol error.
const MAX_REPLY_PAYLOAD: u64 = 1 << 20;

/// A protocol violation: the stream can no longer be trusted, so the open
/// or the reader ends with this error.
fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("protocol error: {}", msg.into()))
}
