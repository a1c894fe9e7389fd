//! baton's NBD: one protocol codec ([`proto`]) shared by the server
//! ([`server`]: exports, negotiation, transmission) and the client block
//! driver ([`client`]).
//!
//! ```text
//! proto/    the wire: constants, option codes, request and reply headers,
//!           error codes (through the block layer's errno table), a cursor
//! server/   listeners and exports; handshake.rs negotiates, conn.rs serves
//! client/   the `nbd` block driver: options, negotiate, inflight, driver
//! ```

#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;

pub use server::{AddExportError, Export, ExportConfig, Exports, Listener, Server, ServerConfig};
