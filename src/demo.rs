//! `baton demo`: the mission in one command. Two daemons on this machine
//! stand for two hosts that share no storage; a guest runs on the first,
//! checking its own disk; its disk is mirrored into the second's NBD export,
//! the guest migrates, and its own full check on the second host must find
//! every block it ever wrote. It prints each step and the invariants it
//! checked, and leaves nothing behind (a work directory it created is removed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the images and sockets go (default: a fresh temporary directory, removed at the end).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Disk size of the guest.
    #[arg(long, default_value = "64M")]
    disk: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Step(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn step(msg: impl Into<String>) -> DemoError {
    DemoError::Step(msg.into())
}

/// A minimal QMP client for the demo's two daemons.
struct Qmp {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
    events: Vec<Value>,
}

impl Qmp {
    async fn connect(path: &Path) -> Result<Qmp, DemoError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(DemoError::Io { what: format!("cannot reach {}", path.display()), source: e })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (r, w) = s.into_split();
        let mut q = Qmp { r: BufReader::new(r), w, events: Vec::new() };
        q.line().await?;
        q.cmd("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn line(&mut self) -> Result<Value, DemoError> {
        let mut l = String::new();
        let n = self.r.read_line(&mut l).await.map_err(|source| DemoError::Io { what: "QMP read".into(), source })?;
        if n == 0 {
            return Err(step("a daemon closed its QMP socket"));
        }
        serde_json::from_str(&l).map_err(|e| step(format!("bad QMP line: {e}")))
    }

    async fn cmd(&mut self, name: &str, args: Value) -> Result<Value, DemoError> {
        let msg = json!({"execute": name, "arguments": args}).to_string() + "\n";
        self.w.write_all(msg.as_bytes()).await.map_err(|source| DemoError::Io { what: "QMP write".into(), source })?;
        loop {
            let v = self.line().await?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(step(format!("{name}: {}", e["desc"].as_str().unwrap_or("error"))));
            }
            return Ok(v["return"].clone());
        }
    }

    async fn until(
        &mut self,
        name: &str,
        what: &str,
        secs: u64,
        f: impl Fn(&Value) -> bool,
    ) -> Result<Value, DemoError> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.cmd(name, json!({})).await?;
            if f(&v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(step(format!("timed out waiting for {what} (last: {v})")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[String]) -> Result<Daemon, DemoError> {
    let exe = std::env::current_exe().map_err(|source| DemoError::Io { what: "own executable".into(), source })?;
    let c = Command::new(exe)
        .arg("daemon")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| DemoError::Io { what: "starting a daemon".into(), source })?;
    Ok(Daemon(c))
}

pub async fn run(a: Args) -> Result<(), DemoError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(step("the demo runs a guest: /dev/kvm is missing on this machine"));
    }
    let size = block::schema::parse_size(&a.disk).ok_or_else(|| step(format!("--disk: '{}' is not a size", a.disk)))?;
    let tmp;
    let dir = match &a.workdir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|source| DemoError::Io { what: format!("creating {}", d.display()), source })?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let p = |n: &str| dir.join(n).display().to_string();
    for img in ["host-a.img", "host-b.img"] {
        let f = std::fs::File::create(dir.join(img))
            .map_err(|source| DemoError::Io { what: format!("creating {img}"), source })?;
        f.set_len(size).map_err(|source| DemoError::Io { what: format!("sizing {img}"), source })?;
    }
    println!("baton demo: two daemons stand for two hosts that share no storage (work dir {})", dir.display());

    let _b = spawn(&[
        "--blockdev".into(),
        format!("driver=file,node-name=disk-file,filename={}", p("host-b.img")),
        "--blockdev".into(),
        "driver=blkdebug,node-name=disk,image=disk-file".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", p("b-nbd.sock")),
        "--export".into(),
        "type=nbd,id=incoming-disk,node-name=disk,writable=on".into(),
        "--vm".into(),
        "memory=64M,disk=disk".into(),
        "-S".into(),
        "--incoming".into(),
        format!("unix:{}", p("b-migrate.sock")),
        "--qmp".into(),
        format!("unix:{}", p("b-qmp.sock")),
    ])?;
    let _a = spawn(&[
        "--blockdev".into(),
        format!("driver=file,node-name=disk,filename={}", p("host-a.img")),
        "--vm".into(),
        "memory=64M,disk=disk".into(),
        "--qmp".into(),
        format!("unix:{}", p("a-qmp.sock")),
    ])?;
    let mut qa = Qmp::connect(&dir.join("a-qmp.sock")).await?;
    let mut qb = Qmp::connect(&dir.join("b-qmp.sock")).await?;
    println!("host B waits for the guest (inmigrate), its empty disk exported for the mirror");

    tokio::time::sleep(Duration::from_secs_f64(a.seconds.max(0.5))).await;
    let s = qa.cmd("x-baton-guest-stats", json!({})).await?;
    println!(
        "host A: the guest runs: {} blocks written, {} re-read and checked, {} mismatches",
        s["writes"], s["checks"], s["mismatches"]
    );

    let t = Instant::now();
    qa.cmd("blockdev-add", json!({"driver": "nbd", "node-name": "to-b", "server": {"type": "unix", "path": p("b-nbd.sock")}, "export": "disk"})).await?;
    qa.cmd("blockdev-mirror", json!({"job-id": "disk-to-b", "device": "disk", "target": "to-b", "sync": "full", "x-baton-auto-converge": true})).await?;
    qa.until("query-block-jobs", "the mirror to be ready", 120, |v| v[0]["ready"] == true).await?;
    println!("host A: disk mirrored to host B while the guest writes: READY in {:.2}s", t.elapsed().as_secs_f64());

    // Attempt 1: host B's disk cannot make writes durable. The switchover must
    // fail as a whole and leave host A exactly as it was.
    let uri = format!("unix:{}", p("b-migrate.sock"));
    qb.cmd(
        "x-baton-blkdebug-set-rules",
        json!({"node-name": "disk", "inject-error": [{"event": "flush_to_disk", "errno": 5}]}),
    )
    .await?;
    qa.cmd("migrate", json!({"uri": uri})).await?;
    let m = qa
        .until("query-migrate", "the first attempt", 120, |v| {
            matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled"))
        })
        .await?;
    let st = qa.cmd("query-status", json!({})).await?;
    let nodes = qa.cmd("query-named-block-nodes", json!({})).await?;
    let active = nodes.as_array().is_some_and(|l| l.iter().all(|n| n["active"] == true));
    let job = qa.cmd("query-block-jobs", json!({})).await?;
    println!("attempt 1 (host B's disk fails to flush): {}: {}", m["status"], m["error-desc"].as_str().unwrap_or(""));
    println!(
        "  host A after the rollback: guest {}, every node active: {active}, mirror ready: {}",
        st["status"], job[0]["ready"]
    );
    if m["status"] != "failed" || st["status"] != "running" || !active || job[0]["ready"] != true {
        return Err(step("I3/I7: a failed switchover must leave the source as it was"));
    }
    qb.cmd("x-baton-blkdebug-set-rules", json!({"node-name": "disk"})).await?;

    // Attempt 2: the fault is gone.
    let t = Instant::now();
    qa.cmd("migrate", json!({"uri": uri})).await?;
    let m = qa
        .until("query-migrate", "the migration", 120, |v| {
            matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled"))
        })
        .await?;
    if m["status"] != "completed" {
        return Err(step(format!("migration {}: {}", m["status"], m["error-desc"])));
    }
    let sent = m["ram"]["transferred"].as_u64().unwrap_or(0);
    println!(
        "attempt 2: migrated in {:.2}s: {} MiB of RAM in {} pre-copy passes; stop, mirror in sync, every node inactivated, host B PREPARED, committed, COMMIT",
        t.elapsed().as_secs_f64(),
        sent >> 20,
        m["ram"]["dirty-sync-count"]
    );

    // The invariants, checked on both hosts.
    let st = qa.cmd("query-status", json!({})).await?;
    let nodes = qa.cmd("query-named-block-nodes", json!({})).await?;
    let inactive = nodes.as_array().is_some_and(|l| l.iter().all(|n| n["active"] == false));
    println!("host A: guest {} (not running), every node inactive: {inactive}", st["status"]);
    if st["status"] != "postmigrate" || !inactive {
        return Err(step("I8: the source must be stopped with its nodes inactive"));
    }
    qa.cmd("block-job-cancel", json!({"device": "disk-to-b"})).await?;
    qa.until("query-block-jobs", "the mirror to end", 60, |v| v.as_array().is_some_and(|l| l.is_empty())).await?;
    qa.cmd("blockdev-del", json!({"node-name": "to-b"})).await?;
    // Host B dropped its export at COMMIT (the mirror is done with it); -S keeps the guest paused until `cont`.
    let b = qb
        .until("query-migrate", "host B to hear the decision", 60, |v| {
            matches!(v["status"].as_str(), Some("completed" | "failed"))
        })
        .await?;
    if b["status"] != "completed" {
        return Err(step(format!("host B did not complete: {b}")));
    }
    qb.cmd("cont", json!({})).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s2 = qb.cmd("x-baton-guest-stats", json!({})).await?;
    println!("host B: the guest goes on: {} blocks written so far, {} mismatches", s2["writes"], s2["mismatches"]);
    let v = qb.cmd("x-baton-guest-verify", json!({})).await?;
    println!("host B: the guest re-read all {} blocks it ever wrote: {} mismatches", v["checked"], v["mismatches"]);
    if v["mismatches"] != 0 || s2["mismatches"] != 0 {
        return Err(step("I6: a write was lost in the handover"));
    }
    let _ = qb.cmd("quit", json!({})).await;
    let _ = qa.cmd("quit", json!({})).await;
    println!("done: one guest, one disk, two hosts, never both running; every write accounted for");
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, DemoError> {
        let base = std::env::temp_dir().join(format!("baton-demo-{}", std::process::id()));
        std::fs::create_dir_all(&base)
            .map_err(|source| DemoError::Io { what: format!("creating {}", base.display()), source })?;
        Ok(TempDir(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
