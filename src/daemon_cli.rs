//! `baton daemon`: the qemu-storage-daemon-like entry point. It takes QSD's
//! own command lines (`--blockdev`, `--nbd-server`, `--export`,
//! `--chardev`/`--monitor`, `--pidfile`, `--daemonize`) plus the `--qmp
//! unix:PATH` shorthand, and serves QMP monitors until `quit` or a signal.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::daemon::Daemon;
use crate::keyval::parse_option;
use crate::qmp::{monitor, nbd, table};
use block::schema::QapiObject;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A block node, in keyval (driver=file,node-name=f,filename=x) or JSON form; repeatable.
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    blockdevs: Vec<String>,
    /// Start the NBD server: addr.type=unix,addr.path=P or addr.type=inet,addr.host=H,addr.port=N [,max-connections=N].
    #[arg(long = "nbd-server", value_name = "OPTIONS")]
    nbd_server: Option<String>,
    /// A block export: type=nbd,id=E,node-name=N[,name=X][,writable=on][,bitmaps.0=B][,allow-inactive=on]; repeatable.
    #[arg(long = "export", value_name = "OPTIONS")]
    exports: Vec<String>,
    /// A character device: socket,path=P,server=on,wait=off,id=X; repeatable.
    #[arg(long = "chardev", value_name = "OPTIONS")]
    chardevs: Vec<String>,
    /// A QMP monitor on a chardev: [chardev=]X[,mode=control]; repeatable.
    #[arg(long = "monitor", value_name = "OPTIONS")]
    monitors: Vec<String>,
    /// Shorthand for a QMP monitor: unix:PATH (server, no wait); repeatable.
    #[arg(long = "qmp", value_name = "unix:PATH")]
    qmp: Vec<String>,
    /// Write the daemon's pid here.
    #[arg(long = "pidfile", value_name = "PATH")]
    pidfile: Option<PathBuf>,
    /// Go to the background once everything is set up.
    #[arg(long)]
    daemonize: bool,
    /// Run a guest: memory=SIZE,vcpus=N,disk=NODE[,seed=N,dirty-pages=N,batch=N].
    #[arg(long = "vm", value_name = "OPTIONS")]
    vm: Option<String>,
    /// Start the guest paused (as QEMU's -S); `cont` starts it.
    #[arg(short = 'S')]
    start_paused: bool,
    /// Wait for the guest to arrive by migration on unix:PATH or tcp:HOST:PORT,
    /// or, with `defer`, wherever `migrate-incoming` says.
    #[arg(long = "incoming", value_name = "URI")]
    incoming: Option<String>,
    /// The guest's lease: backend=file,dir=D or backend=etcd,endpoints=URL[+URL...],
    /// then key=K,ttl=MS[,margin=MS][,owner=NAME]. The guest runs only while this
    /// daemon holds it; a migration moves it to the destination.
    #[arg(long = "lease", value_name = "OPTIONS")]
    lease: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{option}: {reason}")]
    Option { option: &'static str, reason: String },
    /// The option's value does not fit its schema (keyval coercion).
    #[error("{option}")]
    Schema {
        option: &'static str,
        #[source]
        source: block::schema::SchemaError,
    },
    /// What the option asked for failed.
    #[error("{option}")]
    Failed {
        option: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{option}")]
    Qmp {
        option: &'static str,
        #[source]
        source: crate::qmp::error::QmpError,
    },
    #[error("cannot create the monitor socket {path}")]
    Monitor {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn opt_err(option: &'static str, reason: impl std::fmt::Display) -> CliError {
    CliError::Option { option, reason: reason.to_string() }
}

/// `option` failed because of `source` (kept as the error's cause).
fn failed(option: &'static str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> CliError {
    move |source| CliError::Failed { option, source }
}

/// Keyval's one coercion for an option that is a QMP command's arguments:
/// strings become what `T`'s schema asks for; unknown members are left for
/// the command's own check.
fn coerce<T: QapiObject>(option: &'static str, o: Map<String, Value>) -> Result<Map<String, Value>, CliError> {
    block::schema::coerce_members(&T::fields(), o, "").map_err(|source| CliError::Schema { option, source })
}

/// Parse an option that is not a QMP command against its schema `T`.
fn parse<T: QapiObject>(option: &'static str, o: Map<String, Value>) -> Result<T, CliError> {
    block::schema::parse_keyval(o).map_err(|source| CliError::Schema { option, source })
}

block::qapi_struct! {
    /// `--chardev socket,id=X,path=P[,server=on][,wait=off]` (the backend,
    /// the implied first member, is checked before). `wait` is accepted and
    /// has no effect: the monitor never waits for a client.
    #[allow(dead_code)]
    struct ChardevSocket {
        "id" id: Option<String>,
        "path" path: Option<String>,
        "server" server: Option<bool>,
        "wait" wait: Option<bool>,
    }
}

block::qapi_struct! {
    /// `--vm disk=NODE[,memory=SIZE][,vcpus=N][,seed=N][,dirty-pages=N][,batch=N]`:
    /// the guest and the node its disk is (what is absent takes `VmConfig`'s default).
    struct VmOptions {
        "disk" disk: String,
        "memory" memory: Option<u64>,
        "vcpus" vcpus: Option<u32>,
        "seed" seed: Option<u32>,
        "dirty-pages" dirty_pages: Option<u32>,
        "batch" batch: Option<u32>,
    }
}

block::qapi_struct! {
    /// `--monitor [chardev=]X[,mode=control]`; `pretty` and `id` are accepted
    /// and have no effect, QSD's other members are ignored.
    #[allow(dead_code)]
    struct MonitorOptions {
        "chardev" chardev: Option<String>,
        "mode" mode: Option<String>,
        "pretty" pretty: Option<bool>,
        "id" id: Option<String>,
    }
}

/// Run a QMP command from the command line, through the same dispatch as a monitor.
async fn run_command(
    d: &Arc<Daemon>,
    option: &'static str,
    name: &str,
    args: Map<String, Value>,
) -> Result<(), CliError> {
    let cmd = table::find(name).ok_or_else(|| opt_err(option, format!("no command {name}")))?;
    table::dispatch(d, cmd, args).await.map(|_| ()).map_err(|source| CliError::Qmp { option, source })
}

const DAEMON_CHILD: &str = "BATON_DAEMONIZED_CHILD";

pub fn is_daemonize_request(a: &Args) -> bool {
    a.daemonize && std::env::var_os(DAEMON_CHILD).is_none()
}

/// `--daemonize`: start the same command line in a new session and return once it is set up.
pub fn daemonize_and_wait() -> Result<(), CliError> {
    let line = crate::run_detached(DAEMON_CHILD, "--daemonize").map_err(|e| failed("--daemonize")(e.into()))?;
    if line.trim() != "ready" {
        return Err(opt_err("--daemonize", format!("unexpected output from the daemon: {line}")));
    }
    Ok(())
}

pub async fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let d = Daemon::new();
    for b in &a.blockdevs {
        let opts = parse_option(b, None).map_err(|e| opt_err("--blockdev", e))?;
        // Keyval's strings become the types the common members' and the
        // driver's schemas ask for (inline children included).
        let Value::Object(opts) = d.graph.coerce_keyval(Value::Object(opts)).map_err(|e| opt_err("--blockdev", e))?
        else {
            return Err(opt_err("--blockdev", "expected an object").into());
        };
        run_command(&d, "--blockdev", "blockdev-add", opts).await?;
    }
    if let Some(n) = &a.nbd_server {
        let mut o = parse_option(n, None).map_err(|e| opt_err("--nbd-server", e))?;
        // QSD's flat form (addr.type=unix,addr.path=P) -> QMP's legacy {type, data}.
        let addr = match o.remove("addr") {
            Some(Value::Object(mut addr)) => {
                let ty = addr.remove("type").unwrap_or(Value::Null);
                let data = match ty.as_str() {
                    Some("inet") => coerce::<nbd::InetSocketAddress>("--nbd-server", addr)?,
                    Some("unix") => coerce::<nbd::UnixSocketAddress>("--nbd-server", addr)?,
                    _ => addr,
                };
                serde_json::json!({"type": ty, "data": data})
            }
            _ => return Err(opt_err("--nbd-server", "addr.type is missing").into()),
        };
        o.insert("addr".into(), addr);
        let args = coerce::<nbd::NbdServerStart>("--nbd-server", o)?;
        run_command(&d, "--nbd-server", "nbd-server-start", args).await?;
    }
    for e in &a.exports {
        let o = parse_option(e, None).map_err(|e| opt_err("--export", e))?;
        let o = coerce::<nbd::BlockExportAdd>("--export", o)?;
        run_command(&d, "--export", "block-export-add", o).await?;
    }

    if let Some(v) = &a.vm {
        let o = parse_option(v, None).map_err(|e| opt_err("--vm", e))?;
        let o = parse::<VmOptions>("--vm", o)?;
        let dflt = vmm::VmConfig::default();
        let cfg = vmm::VmConfig {
            memory: o.memory.unwrap_or(dflt.memory),
            vcpus: o.vcpus.unwrap_or(dflt.vcpus),
            seed: o.seed.unwrap_or(dflt.seed),
            dirty_pages: o.dirty_pages.unwrap_or(dflt.dirty_pages),
            batch: o.batch.unwrap_or(dflt.batch),
        };
        let disk = o.disk;
        let vm = d.create_vm(cfg, &disk, a.incoming.is_some()).map_err(|e| failed("--vm")(e.into()))?;
        if let Some(l) = &a.lease {
            let c = lease::parse_option(l).map_err(|e| opt_err("--lease", e))?;
            let store = c.open().map_err(|e| opt_err("--lease", e))?;
            let owner = c.owner.clone().unwrap_or_else(default_owner);
            vm.set_tenure(vmm::tenure::Tenure::new(store, owner, c.ttl));
        }
        match &a.incoming {
            Some(defer) if defer == "defer" => d.defer_incoming(a.start_paused),
            Some(uri) => d.listen_incoming(uri, a.start_paused).await.map_err(|e| failed("--incoming")(e.into()))?,
            None if !a.start_paused => vm.cont().await.map_err(|e| failed("--vm")(e.into()))?,
            None => {}
        }
    } else if a.incoming.is_some() {
        return Err(opt_err("--incoming", "needs --vm").into());
    } else if a.lease.is_some() {
        return Err(opt_err("--lease", "needs --vm").into());
    }

    let mut chardevs: HashMap<String, PathBuf> = HashMap::new();
    for c in &a.chardevs {
        let mut o = parse_option(c, Some("backend")).map_err(|e| opt_err("--chardev", e))?;
        let backend = o.remove("backend").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        if backend != "socket" {
            return Err(opt_err("--chardev", format!("backend '{backend}' is not supported (only socket)")).into());
        }
        let c: ChardevSocket = parse("--chardev", o)?;
        let id = c.id.ok_or_else(|| opt_err("--chardev", "id is missing"))?;
        let path = c.path.ok_or_else(|| opt_err("--chardev", "path is missing (only unix sockets)"))?;
        if c.server == Some(false) {
            return Err(opt_err("--chardev", "server=off is not supported").into());
        }
        chardevs.insert(id, path.into());
    }
    let mut sockets: Vec<PathBuf> = Vec::new();
    for m in &a.monitors {
        let mut o = parse_option(m, Some("chardev")).map_err(|e| opt_err("--monitor", e))?;
        o.retain(|k, _| MonitorOptions::fields().iter().any(|f| f.name == k));
        let m: MonitorOptions = parse("--monitor", o)?;
        if m.mode.as_deref().is_some_and(|mode| mode != "control") {
            return Err(opt_err("--monitor", "only mode=control is supported").into());
        }
        let id = m.chardev.unwrap_or_default();
        let path = chardevs.get(&id).ok_or_else(|| opt_err("--monitor", format!("chardev '{id}' not found")))?;
        sockets.push(path.clone());
    }
    for q in &a.qmp {
        let rest = q.strip_prefix("unix:").ok_or_else(|| opt_err("--qmp", "only unix:PATH is supported"))?;
        let path = rest.split(',').next().unwrap_or_default();
        sockets.push(path.into());
    }
    for path in &sockets {
        let l = monitor::bind(path).map_err(|source| CliError::Monitor { path: path.display().to_string(), source })?;
        tokio::spawn(monitor::serve(d.clone(), l));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    if let Some(p) = &a.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| failed("--pidfile")(e.into()))?;
    }
    if std::env::var_os(DAEMON_CHILD).is_some() {
        println!("ready");
        crate::detach_stdout();
    }
    tokio::select! {
        _ = d.wait_quit() => tracing::info!("quit"),
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    let _bql = d.bql.lock().await;
    d.shutdown().await;
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    if let Some(p) = &a.pidfile {
        let _ = std::fs::remove_file(p);
    }
    if d.incoming_failed.load(std::sync::atomic::Ordering::SeqCst) {
        let why = d.migration.error().unwrap_or_default();
        return Err(opt_err("--incoming", format!("the incoming migration failed: {why}")).into());
    }
    Ok(())
}

/// This daemon's name in the lease store unless `owner=` says: the host's
/// name and the process id.
fn default_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{}", if host.is_empty() { "baton" } else { host }, std::process::id())
}
