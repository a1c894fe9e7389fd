//! baton's NBD: one protocol codec ([`proto`]) shared by the server
//! ([`server`], [`export`], negotiation in [`handshake`], transmission in
//! `conn`) and the client block driver ([`client`]).

pub mod client;
mod conn;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;

pub use export::{Export, ExportConfig};
pub use server::{Listener, Server, ServerConfig};
