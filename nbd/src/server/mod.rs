//! The NBD server: listeners (TCP and unix), a bounded number of
//! connections, a handshake timeout, and the set of exports.
//!
//! A connection goes through [`handshake`] (the fixed newstyle negotiation,
//! server side) and then `conn` (the transmission phase); both serve the
//! [`export`]s this module's [`Exports`] holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use block::sync::{lock, read, wait_for, write};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;

mod conn;
pub mod export;
pub mod handshake;

use conn::Conn;
pub use export::{Export, ExportConfig};

/// The exports of a server, by name.
#[derive(Debug, Default)]
pub struct Exports {
    list: RwLock<Vec<Arc<Export>>>,
}

/// Why [`Exports::add`] refused an export.
#[derive(Debug, thiserror::Error)]
pub enum AddExportError {
    #[error("an export named '{0}' already exists")]
    NameTaken(String),
    #[error("an export with id '{0}' already exists")]
    IdTaken(String),
}

impl Exports {
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        read(&self.list).iter().find(|e| e.name() == name && !e.is_closing()).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Export>> {
        read(&self.list).iter().filter(|e| !e.is_closing()).cloned().collect()
    }

    /// Add an export; fails if the name or id is taken.
    pub fn add(&self, e: Arc<Export>) -> Result<(), AddExportError> {
        let mut l = write(&self.list);
        if l.iter().any(|x| x.name() == e.name()) {
            return Err(AddExportError::NameTaken(e.name().to_string()));
        }
        if !e.config.id.is_empty() && l.iter().any(|x| x.config.id == e.config.id) {
            return Err(AddExportError::IdTaken(e.config.id.clone()));
        }
        l.push(e);
        Ok(())
    }

    /// Remove by QMP id (or name when ids are empty).
    pub fn remove(&self, id: &str) -> Option<Arc<Export>> {
        let mut l = write(&self.list);
        let i = l.iter().position(|x| x.config.id == id || (x.config.id.is_empty() && x.name() == id))?;
        Some(l.remove(i))
    }

    pub fn find_id(&self, id: &str) -> Option<Arc<Export>> {
        read(&self.list).iter().find(|x| x.config.id == id || (x.config.id.is_empty() && x.name() == id)).cloned()
    }
}

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further ones are closed at once (QEMU's max-connections, 0 = unlimited).
    pub max_connections: usize,
    /// A client that has not finished negotiating by then is dropped.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { max_connections: 100, handshake_timeout: Duration::from_secs(10) }
    }
}

/// A listening endpoint.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

#[derive(Debug)]
pub struct Server {
    pub exports: Arc<Exports>,
    config: ServerConfig,
    connections: AtomicUsize,
    /// Total connections accepted (for `--once` and tests).
    accepted: AtomicUsize,
    stop: Notify,
    /// Live connections, so that stop() can close them.
    live: Mutex<Vec<std::sync::Weak<dyn Closable>>>,
    idle: Notify,
}

/// A connection the server can ask to stop reading.
pub(crate) trait Closable: Send + Sync + std::fmt::Debug {
    fn close(&self);
}

impl<R, W> std::fmt::Debug for Conn<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl<R, W> Closable for Conn<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    fn close(&self) {
        Conn::abort(self)
    }
}

/// Counts a live connection.
struct ConnSlot<'a>(&'a Server);
impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Server {
    pub fn new(config: ServerConfig) -> Arc<Self> {
        Arc::new(Server {
            exports: Arc::new(Exports::default()),
            config,
            connections: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            stop: Notify::new(),
            live: Mutex::new(Vec::new()),
            idle: Notify::new(),
        })
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Accept connections until `stop`.
    pub async fn serve(self: Arc<Self>, listener: Listener) {
        loop {
            let stop = self.stop.notified();
            tokio::pin!(stop);
            stop.as_mut().enable();
            let accepted = tokio::select! {
                _ = &mut stop => return,
                r = accept(&listener) => r,
            };
            match accepted {
                Ok(conn) => {
                    let max = self.config.max_connections;
                    if max > 0 && self.connections() >= max {
                        tracing::warn!("refusing connection: {max} connections already");
                        drop(conn);
                        continue;
                    }
                    self.connections.fetch_add(1, Ordering::SeqCst);
                    self.accepted.fetch_add(1, Ordering::SeqCst);
                    let s = self.clone();
                    tokio::spawn(async move {
                        let _slot = ConnSlot(&s);
                        match conn {
                            Accepted::Tcp(t) => {
                                let _ = t.set_nodelay(true);
                                let fd = std::os::fd::AsRawFd::as_raw_fd(&t);
                                let (r, w) = t.into_split();
                                s.connection(r, w, fd).await
                            }
                            Accepted::Unix(u) => {
                                let fd = std::os::fd::AsRawFd::as_raw_fd(&u);
                                let (r, w) = u.into_split();
                                s.connection(r, w, fd).await
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection<R, W>(&self, mut r: R, mut w: W, fd: std::os::fd::RawFd)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let nego =
            tokio::time::timeout(self.config.handshake_timeout, handshake::negotiate(&mut r, &mut w, &self.exports))
                .await;
        let n = match nego {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "negotiation ended");
                return;
            }
            Err(_) => {
                tracing::info!("client did not finish negotiating in {:?}; dropped", self.config.handshake_timeout);
                return;
            }
        };
        let _client = n.export.client_enter();
        let conn = Conn::new(r, w, fd, n);
        {
            let mut live = lock(&self.live);
            live.retain(|c| c.strong_count() > 0);
            let c: Arc<dyn Closable> = conn.clone();
            live.push(Arc::downgrade(&c));
        }
        conn.run().await;
    }

    /// Stop accepting, close every connection (requests in flight finish).
    pub fn stop(&self) {
        self.stop.notify_waiters();
        for c in lock(&self.live).iter().filter_map(|c| c.upgrade()) {
            c.close();
        }
    }

    /// Wait until no connection is left.
    pub async fn wait_idle(&self) {
        wait_for(&self.idle, || self.connections() == 0).await
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Accepted> {
    match l {
        Listener::Tcp(t) => t.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Listener::Unix(u) => u.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}
