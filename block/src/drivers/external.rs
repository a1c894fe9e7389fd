//! The adapter for drivers registered with a constructor
//! ([`Graph::register_driver`](crate::Graph::register_driver), the NBD
//! client): a leaf whose constructor receives the node's name and the
//! members the graph did not consume, and checks them itself. Such a driver
//! has no schema, so keyval strings reach it as strings.

use serde_json::{Map, Value};

use crate::driver::{BlockDriver, BoxFuture, OpenCtx, Opened};
use crate::drivers::Leaf;
use crate::error::Result;
use crate::graph::DriverCtor;
use crate::schema::Field;

/// A leaf driver opened by a [`DriverCtor`].
pub struct External {
    name: String,
    aliases: &'static [&'static str],
    ctor: DriverCtor,
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("External").field("name", &self.name).finish_non_exhaustive()
    }
}

impl External {
    pub fn new(name: &str, aliases: &'static [&'static str], ctor: DriverCtor) -> Self {
        Self { name: name.to_string(), aliases, ctor }
    }
}

impl BlockDriver for External {
    fn name(&self) -> &str {
        &self.name
    }
    fn aliases(&self) -> &'static [&'static str] {
        self.aliases
    }
    fn options(&self) -> Option<Vec<Field>> {
        None
    }
    fn open<'a>(&'a self, ctx: OpenCtx<'a>, options: Map<String, Value>) -> BoxFuture<'a, Result<Opened>> {
        let open = (self.ctor)(ctx.node_name.to_string(), options);
        Box::pin(async move { Ok(Opened::Leaf(Leaf::Dyn(open.await?))) })
    }
}
