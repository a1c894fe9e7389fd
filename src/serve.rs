//! `baton serve FILE`: the qemu-nbd-like entry point. Same flags and long
//! forms as qemu-nbd where both have them; several clients at once and
//! persistent by default (like nbdkit); loopback unless told otherwise.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use baton_nbd::{Export, ExportConfig, Listener, Server, ServerConfig};
use block::Graph;
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The raw image to serve.
    file: PathBuf,
    /// Image format; only raw.
    #[arg(short = 'f', long = "format", default_value = "raw", value_parser = ["raw"])]
    format: String,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Address to listen on (TCP). Default 127.0.0.1; 0.0.0.0 only when asked.
    #[arg(short = 'b', long = "bind", default_value = "127.0.0.1")]
    bind: String,
    /// TCP port.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// Export name.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Export description (NBD_INFO_DESCRIPTION).
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Offer a dirty bitmap as qemu:dirty-bitmap:NAME. baton's bitmaps are
    /// not persistent: NAME is created when the server starts and records
    /// every write made through baton from then on. Repeatable.
    #[arg(short = 'B', long = "bitmap")]
    bitmaps: Vec<String>,
    /// Offer qemu:allocation-depth.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Clients served at once (qemu-nbd's -e); multi-conn is advertised when above 1.
    #[arg(short = 'e', long = "shared", default_value_t = 16)]
    shared: usize,
    /// Keep serving after clients disconnect (the default; accepted for qemu-nbd compatibility).
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Exit once the first client has disconnected.
    #[arg(long, conflicts_with = "persistent")]
    once: bool,
    /// Write the server's pid here once it listens.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Go to the background once listening (the foreground process prints the URI and exits).
    #[arg(long)]
    fork: bool,
    /// I/O engine (QEMU's aio=).
    #[arg(long, default_value = "io_uring", value_parser = ["threads", "io_uring"])]
    aio: String,
    /// Cache mode: writeback (page cache) or none/directsync (O_DIRECT).
    #[arg(long, default_value = "writeback", value_parser = ["writeback", "none", "directsync", "writethrough"])]
    cache: String,
    /// Discard mode: ignore or unmap (punch holes).
    #[arg(long, default_value = "ignore", value_parser = ["ignore", "unmap"])]
    discard: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Export(#[from] baton_nbd::AddExportError),
    #[error(transparent)]
    Detach(#[from] crate::DetachError),
    #[error("cannot handle signals")]
    Signal(#[source] std::io::Error),
    #[error("cannot write {path}")]
    PidFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

const FORK_CHILD: &str = "BATON_SERVE_FORKED_CHILD";

/// The NBD URI clients use.
fn uri(a: &Args) -> String {
    match &a.socket {
        Some(s) => format!("nbd+unix:///{}?socket={}", a.export_name, s.display()),
        None => {
            let host = if a.bind.contains(':') { format!("[{}]", a.bind) } else { a.bind.clone() };
            format!("nbd://{host}:{}/{}", a.port, a.export_name)
        }
    }
}

/// `--fork`: run the same command in a new session without --fork, wait until it listens, print its URI.
pub fn fork_and_wait() -> Result<(), ServeError> {
    let line = crate::run_detached(FORK_CHILD, "--fork")?;
    print!("{line}");
    Ok(())
}

pub fn is_fork_request(a: &Args) -> bool {
    a.fork && std::env::var_os(FORK_CHILD).is_none()
}

pub async fn run(a: Args) -> Result<(), ServeError> {
    if a.shared == 0 {
        return Err(ServeError::Setup("--shared must be at least 1".into()));
    }
    let graph = Arc::new(Graph::new());
    let direct = matches!(a.cache.as_str(), "none" | "directsync");
    graph
        .blockdev_add(&json!({
            "driver": "file", "node-name": "file0", "filename": a.file, "aio": a.aio,
            "cache": {"direct": direct}, "discard": a.discard, "read-only": a.read_only,
        }))
        .await?;
    graph
        .blockdev_add(&json!({"driver": "raw", "node-name": "disk0", "file": "file0", "read-only": a.read_only}))
        .await?;
    for b in &a.bitmaps {
        graph.bitmap_add("disk0", b, None, false)?;
    }
    let export = Export::open(
        &graph,
        ExportConfig {
            name: a.export_name.clone(),
            description: a.description.clone(),
            node: "disk0".into(),
            writable: !a.read_only,
            bitmaps: a.bitmaps.clone(),
            allocation_depth: a.allocation_depth,
            allow_inactive: false,
            multi_conn: a.shared > 1,
            id: "export0".into(),
        },
    )
    .await?;
    let server = Server::new(ServerConfig { max_connections: a.shared, ..Default::default() });
    server.exports.add(export.clone())?;

    let listener = match &a.socket {
        Some(path) => {
            if path.exists() {
                // A stale socket from a previous run; refuse anything that is not a socket.
                use std::os::unix::fs::FileTypeExt;
                let is_sock = std::fs::metadata(path).map(|m| m.file_type().is_socket()).unwrap_or(false);
                if !is_sock {
                    return Err(ServeError::Setup(format!("{} exists and is not a socket", path.display())));
                }
                let _ = std::fs::remove_file(path);
            }
            Listener::Unix(
                UnixListener::bind(path)
                    .map_err(|source| ServeError::Listen { addr: path.display().to_string(), source })?,
            )
        }
        None => {
            let addr =
                format!("{}:{}", if a.bind.contains(':') { format!("[{}]", a.bind) } else { a.bind.clone() }, a.port);
            Listener::Tcp(TcpListener::bind(&addr).await.map_err(|source| ServeError::Listen { addr, source })?)
        }
    };
    // Handlers first: a signal arriving as soon as the URI is out must shut down cleanly.
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(ServeError::Signal)?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|source| ServeError::PidFile { path: p.display().to_string(), source })?;
    }
    println!("{}", uri(&a));
    let _ = std::io::stdout().flush();
    if std::env::var_os(FORK_CHILD).is_some() {
        crate::detach_stdout();
    }

    let serving = tokio::spawn(server.clone().serve(listener));
    let once = async {
        if !a.once {
            return std::future::pending::<()>().await;
        }
        // Wait for the first client, then for every client to leave.
        while server.accepted() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        server.wait_idle().await;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = once => tracing::info!("--once: the client left"),
    }
    server.stop();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), server.wait_idle()).await;
    serving.abort();
    let res = export.backend.flush().await;
    if let Some(path) = &a.socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    res.map_err(ServeError::from)
}
