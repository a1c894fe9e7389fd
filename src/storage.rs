//! The destination's exports for a storage copy (`migrate` with
//! `x-baton-storage: copy` on the source): vmm asks, through
//! [`vmm::migration::storage::Exporter`], and this serves them on an NBD
//! server of the attempt's own, next to the migration's listener, so the
//! management's NBD server (if any) is never touched:
//!
//! - migration on `unix:PATH`: the server listens on `PATH.disk` (0600);
//! - migration on `tcp:HOST:PORT`: on HOST, a port the kernel picks; the
//!   source reaches it at the host it reached the migration at (a fixed
//!   port with `x-baton-storage-port`, for firewalls).
//!
//! The attempt withdraws them however it ends (the source's connections
//! are cut if any are left), and the socket file goes with them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_nbd::{Export, ExportConfig, Listener, Server, ServerConfig};
use block::Graph;
use vmm::migration::storage::{BoxFuture, Exporter};
use vmm::stream::{Target, TargetAt};

use crate::daemon::NbdAddr;

/// How long a withdrawal waits for the source's connections to end.
const IDLE_BOUND: Duration = Duration::from_secs(5);

/// The server and exports of one attempt.
struct Served {
    server: Arc<Server>,
    task: tokio::task::JoinHandle<()>,
    exports: Vec<Arc<Export>>,
    unix_path: Option<PathBuf>,
}

/// One incoming attempt's exporter.
pub struct AttemptExports {
    graph: Arc<Graph>,
    /// Where the attempt's migration listens.
    at: NbdAddr,
    /// The management's exports when the attempt began: (export name, node).
    existing: Vec<(String, Arc<block::Node>)>,
    /// Over TCP, the port to listen on (`x-baton-storage-port`; 0: any).
    port: u16,
    served: Mutex<Option<Served>>,
}

impl AttemptExports {
    pub fn new(graph: Arc<Graph>, at: NbdAddr, existing: Vec<(String, Arc<block::Node>)>, port: u16) -> Self {
        AttemptExports { graph, at, existing, port, served: Mutex::new(None) }
    }

    async fn open(&self, node_name: &str) -> Result<Target, String> {
        let node = self.graph.find(node_name).map_err(|e| e.chain())?;
        // A disk the management already exports is the management's:
        // exporting it again would give it two writers.
        let chain: Vec<_> = std::iter::successors(Some(node.clone()), |n| n.child().cloned()).collect();
        if let Some((name, n)) = self.existing.iter().find(|(_, n)| chain.iter().any(|c| Arc::ptr_eq(c, n))) {
            return Err(format!(
                "the destination already exports disk '{}' (NBD export '{name}'): x-baton-storage copy exports \
                 it itself; remove that export, or migrate without x-baton-storage and mirror into it",
                n.name()
            ));
        }
        if block::sync::lock(&self.served).is_some() {
            return Err("the destination's storage copy exports a disk already".into());
        }
        let (listener, unix_path, at) = match &self.at {
            NbdAddr::Unix { path } => {
                let mut p = path.clone().into_os_string();
                p.push(".disk");
                let p = PathBuf::from(p);
                // 0600 from the start, listening when it appears (as the QMP sockets).
                let l = crate::qmp::monitor::bind(&p)
                    .map_err(|e| format!("cannot listen on {} for the storage copy: {e}", p.display()))?;
                let at = TargetAt::Unix(p.display().to_string());
                (Listener::Unix(l), Some(p), at)
            }
            NbdAddr::Inet { host, .. } => {
                let port = self.port;
                let a = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                let l = tokio::net::TcpListener::bind(&a)
                    .await
                    .map_err(|e| format!("cannot listen on {a} for the storage copy: {e}"))?;
                let port = l.local_addr().map_err(|e| format!("the storage copy's listener: {e}"))?.port();
                (Listener::Tcp(l), None, TargetAt::Port(port))
            }
        };
        let server = Server::new(ServerConfig { max_connections: 16, ..Default::default() });
        let task = tokio::spawn(server.clone().serve(listener));
        let mut served = Served { server, task, exports: Vec::new(), unix_path };
        let config = ExportConfig {
            name: node_name.to_string(),
            description: "baton storage copy".into(),
            node: node_name.to_string(),
            writable: true,
            bitmaps: Vec::new(),
            allocation_depth: false,
            allow_inactive: false,
            multi_conn: false,
            id: format!("baton-copy-{node_name}"),
        };
        let opened = match Export::open(&self.graph, config).await {
            Ok(e) => served.server.exports.add(e.clone()).map(|()| e).map_err(|e| e.to_string()),
            Err(e) => Err(e.chain()),
        };
        let export = match opened {
            Ok(e) => e,
            Err(why) => {
                let _ = close(served).await;
                return Err(format!("exporting disk '{node_name}' for the storage copy: {why}"));
            }
        };
        let target =
            Target { node: node_name.to_string(), export: node_name.to_string(), size: export.size(), at: Some(at) };
        served.exports.push(export);
        *block::sync::lock(&self.served) = Some(served);
        tracing::info!(node = node_name, "exported for the storage copy");
        Ok(target)
    }
}

/// Close the exports (cutting their connections) and the server; wait,
/// bounded, until the nodes are let go. Err: an export still holds its
/// node (a connection's request did not end), named.
async fn close(s: Served) -> Result<(), String> {
    s.server.stop();
    if let Some(p) = &s.unix_path {
        let _ = std::fs::remove_file(p);
    }
    for e in &s.exports {
        e.close();
        s.server.exports.remove(&e.config.id);
    }
    let deadline = tokio::time::Instant::now() + IDLE_BOUND;
    let _ = tokio::time::timeout_at(deadline, s.server.wait_idle()).await;
    let mut held = Vec::new();
    for e in &s.exports {
        if tokio::time::timeout_at(deadline, e.wait_idle()).await.is_err() {
            held.push(e.config.id.clone());
        }
    }
    s.task.abort();
    let nodes: Vec<_> = s.exports.iter().map(|e| (e.config.id.clone(), e.backend.node())).collect();
    drop(s.exports);
    // The export lets go of its node with its last reference (its connections' tasks).
    for (id, node) in nodes {
        let user = format!("export '{id}'");
        while node.users().iter().any(|u| u.name == user) {
            if tokio::time::Instant::now() > deadline {
                held.push(id.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    if held.is_empty() {
        Ok(())
    } else {
        held.dedup();
        Err(format!(
            "the storage copy's export {} still holds the disk after {IDLE_BOUND:?} (a request that does not end)",
            held.join(", ")
        ))
    }
}

impl Exporter for AttemptExports {
    fn export<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Target, String>> {
        Box::pin(self.open(node))
    }

    fn withdraw(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let served = block::sync::lock(&self.served).take();
            match served {
                Some(s) => close(s).await.map(|()| tracing::info!("the storage copy's exports are withdrawn")),
                None => Ok(()),
            }
        })
    }
}
