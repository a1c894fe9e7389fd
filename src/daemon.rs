//! The daemon's state: the block graph, the NBD server and its exports, the
//! event bus every monitor listens to, and the lock that serialises QMP
//! commands (QEMU's big lock, in spirit: one control-plane command at a time).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use baton_nbd::{Export, ExportConfig, Listener, Server, ServerConfig};
use block::Graph;
use serde_json::{json, Value};
use tokio::sync::{broadcast, Mutex, Notify};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("NBD server already running")]
    NbdRunning,
    #[error("NBD server not running")]
    NbdNotRunning,
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Block export id '{0}' is already in use")]
    ExportIdInUse(String),
    #[error("NBD server already has export named '{0}'")]
    ExportNameInUse(String),
    #[error("Export '{0}' is not found")]
    ExportNotFound(String),
    #[error("Export '{0}' is already shutting down")]
    ExportShuttingDown(String),
    #[error("export '{0}' still in use (use mode='hard' to force client disconnect)")]
    ExportInUse(String),
    /// The server's export list refused the export.
    #[error(transparent)]
    ExportList(#[from] baton_nbd::AddExportError),
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error("migration URI '{0}' is not unix:PATH or tcp:HOST:PORT")]
    BadUri(String),
    #[error("'-incoming' was not specified on the command line")]
    NotDeferred,
    #[error("The incoming migration has already been started")]
    IncomingStarted,
    #[error("there is no guest to migrate")]
    NoGuest,
    #[error("cannot migrate a guest that is {0}")]
    GuestState(&'static str),
    #[error(transparent)]
    Migration(#[from] vmm::migration::VerbError),
    /// The dirty bitmaps cannot go (capability dirty-bitmaps): which, and why.
    #[error("{0}")]
    Bitmaps(String),
    #[error(transparent)]
    Vm(#[from] vmm::VmmError),
}

/// How long a safe `block-export-del` waits for clients that already left.
const EXPORT_DEL_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Where the NBD server listens.
#[derive(Debug, Clone)]
pub enum NbdAddr {
    Inet { host: String, port: String },
    Unix { path: PathBuf },
}

/// Where an incoming migration is accepted.
enum Incoming {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// How this side takes an incoming migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IncomingMode {
    /// Not a destination (no `--incoming`).
    None,
    /// `--incoming defer`: waits for `migrate-incoming`; `paused` is `-S`.
    Deferred { paused: bool },
    /// Listening.
    Listening,
}

/// `unix:PATH` or `tcp:HOST:PORT`.
pub fn parse_uri(uri: &str) -> Result<NbdAddr, DaemonError> {
    if let Some(p) = uri.strip_prefix("unix:") {
        return Ok(NbdAddr::Unix { path: p.into() });
    }
    if let Some((host, port)) = uri.strip_prefix("tcp:").and_then(|r| r.rsplit_once(':')) {
        return Ok(NbdAddr::Inet { host: host.trim_matches(['[', ']']).to_string(), port: port.to_string() });
    }
    Err(DaemonError::BadUri(uri.to_string()))
}

struct NbdService {
    server: Arc<Server>,
    task: tokio::task::JoinHandle<()>,
    unix_path: Option<PathBuf>,
}

pub struct Daemon {
    pub graph: Arc<Graph>,
    pub jobs: Arc<jobs::JobManager>,
    /// The guest, when started with `--vm`.
    vm: std::sync::Mutex<Option<Arc<vmm::Vm>>>,
    /// The migration state of this side (source or destination): the one
    /// owner every migration command goes through.
    pub migration: Arc<vmm::migration::Migration>,
    nbd: Mutex<Option<NbdService>>,
    events: broadcast::Sender<Value>,
    /// Serialises QMP commands.
    pub bql: Mutex<()>,
    quit: Notify,
    quitting: AtomicBool,
    /// QMP `quit` was accepted: shut down once its reply has been sent.
    quit_after_reply: AtomicBool,
    incoming: std::sync::Mutex<IncomingMode>,
    /// A failed incoming migration ended the daemon (`exit-on-error`).
    pub incoming_failed: AtomicBool,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

/// QMP's timestamp member.
pub fn timestamp() -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

/// The daemon's block graph: the built-in drivers and the NBD client.
pub fn graph() -> Graph {
    let graph = Graph::new();
    baton_nbd::client::register(&graph);
    graph
}

impl Daemon {
    pub fn new() -> Arc<Self> {
        let graph = Arc::new(graph());
        let (events, _) = broadcast::channel::<Value>(1024);
        let sink = |tx: broadcast::Sender<Value>| {
            move |event: &str, data: Value| {
                let _ = tx.send(json!({"event": event, "data": data, "timestamp": timestamp()}));
            }
        };
        let jobs = jobs::JobManager::new(Arc::new(sink(events.clone())));
        let migration = vmm::migration::Migration::new(Some(Arc::new(sink(events.clone()))));
        Arc::new(Daemon {
            graph,
            jobs,
            vm: std::sync::Mutex::new(None),
            migration,
            nbd: Mutex::new(None),
            events,
            bql: Mutex::new(()),
            quit: Notify::new(),
            quitting: AtomicBool::new(false),
            quit_after_reply: AtomicBool::new(false),
            incoming: std::sync::Mutex::new(IncomingMode::None),
            incoming_failed: AtomicBool::new(false),
        })
    }

    /// The guest, if any.
    pub fn vm(&self) -> Option<Arc<vmm::Vm>> {
        block::sync::lock(&self.vm).clone()
    }

    /// Create the guest on `disk` (`--vm`); it stays in prelaunch (or
    /// inmigrate, holding no permission on its disk until it first runs).
    pub fn create_vm(&self, config: vmm::VmConfig, disk: &str, incoming: bool) -> Result<Arc<vmm::Vm>, DaemonError> {
        let perms = if incoming {
            block::PermSet::new(block::Perm::NONE, block::Perm::ALL)
        } else {
            block::PermSet::GUEST_WRITER
        };
        let backend = self.graph.attach(disk, "guest disk", perms, true)?;
        let tx = self.events.clone();
        let events: vmm::vm::VmEvents = Arc::new(move |event: &str, data: Value| {
            let _ = tx.send(json!({"event": event, "data": data, "timestamp": timestamp()}));
        });
        let vm = vmm::Vm::new(config, backend, tokio::runtime::Handle::current(), events, incoming)?;
        *block::sync::lock(&self.vm) = Some(vm.clone());
        Ok(vm)
    }

    /// Start an outgoing migration to `target`; with `storage`, the guest's
    /// disk is copied too (`x-baton-storage: copy`).
    /// Refused, with no state change, while another attempt is not final.
    pub fn migrate(self: &Arc<Self>, target: NbdAddr, storage: bool) -> Result<(), DaemonError> {
        let vm = self.vm().ok_or(DaemonError::NoGuest)?;
        if !self.migration.status().is_final() {
            return Err(vmm::migration::VerbError::InProgress.into());
        }
        if !matches!(vm.state(), vmm::RunState::Running | vmm::RunState::Paused) {
            return Err(DaemonError::GuestState(vm.state().as_str()));
        }
        if self.migration.capabilities().dirty_bitmaps {
            // The mapping names what exists, nothing that goes is busy: else refused, nothing changed.
            let mapping = self.migration.params().block_bitmap_mapping;
            vmm::migration::bitmaps::outgoing(&self.graph, mapping.as_deref()).map_err(DaemonError::Bitmaps)?;
        }
        self.migration.begin(vmm::migration::Role::Source)?;
        let d = self.clone();
        // The storage copy reaches the destination's exports where it reaches the migration.
        let route = storage.then(|| match &target {
            NbdAddr::Unix { path } => vmm::migration::storage::Route::Unix { migration: path.clone() },
            NbdAddr::Inet { host, .. } => vmm::migration::storage::Route::Tcp { host: host.clone() },
        });
        // Not under the command lock: query-migrate and migrate_cancel work meanwhile.
        tokio::spawn(async move {
            let (m, g, j) = (&d.migration, &d.graph, &d.jobs);
            match target {
                NbdAddr::Unix { path } => {
                    vmm::migration::migrate_out(m, g, j, &vm, tokio::net::UnixStream::connect(path), route).await
                }
                NbdAddr::Inet { host, port } => {
                    let a = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                    vmm::migration::migrate_out(m, g, j, &vm, tokio::net::TcpStream::connect(a), route).await
                }
            }
        });
        Ok(())
    }

    /// This side's disks that are incoming mirror targets: writable exports
    /// of the guest's disk (or of a node in its chain).
    async fn mirror_targets(&self, vm: &vmm::Vm) -> Vec<vmm::stream::Target> {
        let disk = vm.device().backend().node();
        let chain: Vec<Arc<block::Node>> = std::iter::successors(Some(disk), |n| n.child().cloned()).collect();
        let mut out = Vec::new();
        for e in self.exports().await {
            let node = e.backend.node();
            if e.config.writable && !e.is_closing() && chain.iter().any(|n| Arc::ptr_eq(n, &node)) {
                out.push(vmm::stream::Target {
                    node: node.name().to_string(),
                    export: e.config.name.clone(),
                    size: e.size(),
                    at: None,
                });
            }
        }
        out
    }

    /// At COMMIT: drop the exports that fed the guest's disks (hard: the
    /// source's mirror is done with them), so the guest can take its disk.
    async fn drop_target_exports(&self, vm: &vmm::Vm) {
        let targets = self.mirror_targets(vm).await;
        let mut dropped = Vec::new();
        for e in self.exports().await {
            if e.config.writable && targets.iter().any(|t| t.export == e.config.name) {
                dropped.push(e);
            }
        }
        for e in &dropped {
            if let Err(err) = self.export_del(&e.config.id, true).await {
                tracing::warn!(export = %e.config.id, error = %err, "cannot drop the incoming mirror's export");
            }
        }
        // The export lets go of its node once its last connection is gone
        // (woken by the export, not polled) and the last reference drops.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for e in dropped {
            let (id, node) = (e.config.id.clone(), e.backend.node());
            let _ = tokio::time::timeout_at(deadline.into(), e.wait_idle()).await;
            drop(e);
            let user = format!("export '{id}'");
            while node.users().iter().any(|u| u.name == user) {
                if std::time::Instant::now() > deadline {
                    tracing::warn!(export = %id, "the incoming mirror's export still holds its node");
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }

    /// `--incoming defer`: the guest waits in `inmigrate` for `migrate-incoming`.
    pub fn defer_incoming(&self, paused: bool) {
        *block::sync::lock(&self.incoming) = IncomingMode::Deferred { paused };
    }

    /// `migrate-incoming` on a destination started with `--incoming defer`.
    pub async fn migrate_incoming(self: &Arc<Self>, at: NbdAddr, exit_on_error: bool) -> Result<(), DaemonError> {
        let paused = match *block::sync::lock(&self.incoming) {
            IncomingMode::None => return Err(DaemonError::NotDeferred),
            IncomingMode::Listening => return Err(DaemonError::IncomingStarted),
            IncomingMode::Deferred { paused } => paused,
        };
        self.listen(at, paused, exit_on_error).await
    }

    /// Wait for incoming migrations on `uri` (`--incoming URI`): one attempt
    /// at a time (others are refused, and a silent one frees the slot after
    /// the HELLO bound); a failed attempt rolls back and the next may come;
    /// after COMMIT the guest runs unless `paused`.
    pub async fn listen_incoming(self: &Arc<Self>, uri: &str, paused: bool) -> Result<(), DaemonError> {
        self.listen(parse_uri(uri)?, paused, false).await
    }

    /// Listen for incoming attempts on `at`; with `exit_on_error`, the first
    /// failed attempt ends the daemon (QEMU's `exit-on-error`).
    async fn listen(self: &Arc<Self>, at: NbdAddr, paused: bool, exit_on_error: bool) -> Result<(), DaemonError> {
        let listener = match at.clone() {
            NbdAddr::Unix { path } => {
                let _ = std::fs::remove_file(&path);
                Incoming::Unix(
                    tokio::net::UnixListener::bind(&path)
                        .map_err(|source| DaemonError::Listen { addr: format!("unix:{}", path.display()), source })?,
                )
            }
            NbdAddr::Inet { host, port } => {
                let a = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                Incoming::Tcp(
                    tokio::net::TcpListener::bind(&a)
                        .await
                        .map_err(|source| DaemonError::Listen { addr: a, source })?,
                )
            }
        };
        *block::sync::lock(&self.incoming) = IncomingMode::Listening;
        let d = self.clone();
        tokio::spawn(async move {
            loop {
                let landed = match &listener {
                    Incoming::Unix(l) => match l.accept().await {
                        Ok((s, _)) => d.clone().incoming_attempt(s, paused, at.clone()),
                        Err(_) => continue,
                    },
                    Incoming::Tcp(l) => match l.accept().await {
                        Ok((s, _)) => d.clone().incoming_attempt(s, paused, at.clone()),
                        Err(_) => continue,
                    },
                };
                if !exit_on_error {
                    drop(landed);
                    continue;
                }
                // Watch the attempt in a task of its own: the loop goes on
                // accepting (and refusing a second source meanwhile).
                let d = d.clone();
                tokio::spawn(async move {
                    if let Ok(Some(vmm::migration::Landing::RolledBack)) = landed.await {
                        let why = d.migration.error().unwrap_or_default();
                        tracing::error!(error = %why, "incoming migration failed; exiting (exit-on-error)");
                        d.incoming_failed.store(true, Ordering::SeqCst);
                        d.request_quit();
                    }
                });
            }
        });
        Ok(())
    }

    /// One incoming connection, in a task of its own; the task's result is
    /// how an attempt it began ended (None: refused before it began). `at`
    /// is where the migration listens (a storage copy's exports go next to it).
    fn incoming_attempt<S>(
        self: Arc<Self>,
        conn: S,
        paused: bool,
        at: NbdAddr,
    ) -> tokio::task::JoinHandle<Option<vmm::migration::Landing>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            let Some(vm) = self.vm() else {
                vmm::migration::refuse_busy(conn, "the destination has no guest (--vm) to migrate into").await;
                return None;
            };
            if !self.migration.status().is_final()
                || matches!(
                    self.migration.handover(),
                    vmm::migration::Handover::Prepared | vmm::migration::Handover::DecisionUnknown
                )
            {
                vmm::migration::refuse_busy(conn, "another incoming migration holds this destination").await;
                return None;
            }
            let targets = self.mirror_targets(&vm).await;
            let existing = self.exports().await.iter().map(|e| (e.config.name.clone(), e.backend.node())).collect();
            let port = u16::try_from(self.migration.params().storage_port).unwrap_or(0);
            let exporter = crate::storage::AttemptExports::new(self.graph.clone(), at, existing, port);
            let landing = vmm::migration::migrate_in(&self.migration, &self.graph, &vm, targets, &exporter, conn).await;
            if let vmm::migration::Landing::Committed { run } = landing {
                self.drop_target_exports(&vm).await;
                // As QEMU: a guest that was paused on the source stays paused here.
                if run && !paused {
                    if let Err(e) = vm.cont().await {
                        tracing::warn!(error = %e.chain(), "the guest arrived, but cannot run; fix and `cont`");
                    }
                }
            }
            Some(landing)
        })
    }

    /// Send an event to every monitor.
    pub fn emit(&self, event: &str, data: Value) {
        let _ = self.events.send(json!({"event": event, "data": data, "timestamp": timestamp()}));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    /// QMP `quit`: shut down after the monitor sent the reply (the client
    /// gets its `{}` before the socket closes, as with QEMU).
    pub fn request_quit_after_reply(&self) {
        self.quit_after_reply.store(true, Ordering::SeqCst);
    }

    /// Called by a monitor once it sent a reply.
    pub fn reply_sent(&self) {
        if self.quit_after_reply.swap(false, Ordering::SeqCst) {
            self.request_quit();
        }
    }

    /// Ask the daemon to shut down (QMP `quit`, signals).
    pub fn request_quit(&self) {
        self.quitting.store(true, Ordering::SeqCst);
        self.quit.notify_waiters();
    }

    pub async fn wait_quit(&self) {
        block::sync::wait_for(&self.quit, || self.quitting.load(Ordering::SeqCst)).await
    }

    /// `nbd-server-start`.
    pub async fn nbd_start(&self, addr: NbdAddr, max_connections: usize) -> Result<(), DaemonError> {
        let mut nbd = self.nbd.lock().await;
        if nbd.is_some() {
            return Err(DaemonError::NbdRunning);
        }
        let (listener, unix_path) = match &addr {
            NbdAddr::Inet { host, port } => {
                let a = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
                let l = tokio::net::TcpListener::bind(&a)
                    .await
                    .map_err(|source| DaemonError::Listen { addr: a, source })?;
                (Listener::Tcp(l), None)
            }
            NbdAddr::Unix { path } => {
                let l = tokio::net::UnixListener::bind(path)
                    .map_err(|source| DaemonError::Listen { addr: path.display().to_string(), source })?;
                (Listener::Unix(l), Some(path.clone()))
            }
        };
        let server = Server::new(ServerConfig { max_connections, ..Default::default() });
        let task = tokio::spawn(server.clone().serve(listener));
        *nbd = Some(NbdService { server, task, unix_path });
        Ok(())
    }

    /// `nbd-server-stop`: close every client and delete every NBD export.
    pub async fn nbd_stop(&self) -> Result<(), DaemonError> {
        let svc = self.nbd.lock().await.take().ok_or(DaemonError::NbdNotRunning)?;
        svc.server.stop();
        for e in svc.server.exports.list() {
            e.close();
            if let Some(e) = svc.server.exports.remove(&e.config.id) {
                self.finish_export_delete(e).await;
            }
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), svc.server.wait_idle()).await;
        svc.task.abort();
        if let Some(p) = svc.unix_path {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// `block-export-add` (type nbd).
    pub async fn export_add(&self, config: ExportConfig) -> Result<(), DaemonError> {
        let nbd = self.nbd.lock().await;
        let svc = nbd.as_ref().ok_or(DaemonError::NbdNotRunning)?;
        if svc.server.exports.find_id(&config.id).is_some() {
            return Err(DaemonError::ExportIdInUse(config.id));
        }
        if svc.server.exports.get(&config.name).is_some() {
            return Err(DaemonError::ExportNameInUse(config.name));
        }
        let export = Export::open(&self.graph, config).await?;
        Ok(svc.server.exports.add(export)?)
    }

    /// `block-export-del`.
    pub async fn export_del(&self, id: &str, hard: bool) -> Result<(), DaemonError> {
        let e = {
            let nbd = self.nbd.lock().await;
            let svc = nbd.as_ref().ok_or_else(|| DaemonError::ExportNotFound(id.to_string()))?;
            let e = svc.server.exports.find_id(id).ok_or_else(|| DaemonError::ExportNotFound(id.to_string()))?;
            if e.is_closing() {
                return Err(DaemonError::ExportShuttingDown(id.to_string()));
            }
            // A client that just closed its socket is counted out by its
            // connection task, which may not have run yet on a busy machine
            // (QEMU counts it out in the same main-loop turn): grant it a moment.
            if !hard && e.client_count() > 0 && tokio::time::timeout(EXPORT_DEL_GRACE, e.wait_idle()).await.is_err() {
                return Err(DaemonError::ExportInUse(id.to_string()));
            }
            e.close();
            svc.server.exports.remove(id);
            e
        };
        if e.client_count() == 0 {
            self.finish_export_delete(e).await;
        } else {
            // Hard mode: the event follows once the last client is gone.
            let events = self.events.clone();
            tokio::spawn(async move {
                e.wait_idle().await;
                let id = e.config.id.clone();
                drop(e);
                let _ =
                    events.send(json!({"event": "BLOCK_EXPORT_DELETED", "data": {"id": id}, "timestamp": timestamp()}));
            });
        }
        Ok(())
    }

    async fn finish_export_delete(&self, e: Arc<Export>) {
        // Connections were aborted (sockets shut down); never wait forever anyway.
        if tokio::time::timeout(std::time::Duration::from_secs(10), e.wait_idle()).await.is_err() {
            tracing::warn!(export = %e.config.id, "clients still attached 10 s after the export was closed");
        }
        let id = e.config.id.clone();
        drop(e);
        self.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    }

    /// `query-block-exports`, newest first as QEMU lists them.
    pub async fn exports(&self) -> Vec<Arc<Export>> {
        let nbd = self.nbd.lock().await;
        let mut v = nbd.as_ref().map(|s| s.server.exports.list()).unwrap_or_default();
        v.reverse();
        v
    }

    /// Clean shutdown: stop serving, flush every node, release locks.
    pub async fn shutdown(&self) {
        if let Some(vm) = self.vm() {
            vm.shutdown().await;
        }
        block::sync::lock(&self.vm).take();
        self.jobs.cancel_all().await;
        let _ = self.nbd_stop().await;
        for n in self.graph.nodes() {
            if n.is_active() {
                if let Err(e) = n.flush().await {
                    tracing::warn!(node = n.name(), error = %e.chain(), "flush at shutdown failed");
                }
            }
        }
        for n in self.graph.nodes().iter().rev() {
            if !n.users().is_empty() {
                continue;
            }
            let _ = self.graph.blockdev_del(n.name()).await;
        }
    }
}
