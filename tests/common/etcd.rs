//! A three-member etcd cluster (Debian's etcd-server), each member on its
//! own host of a [`Hosts`] switch, listening on that host's address (client
//! port 2379, peer port 2380). Data and logs in one temporary directory in
//! /dev/shm (etcd fsyncs every write); the logs stay for panic messages.
//! Members are killed with SIGKILL and restarted on their data; all are
//! killed when the cluster drops, and (PR_SET_PDEATHSIG) when the thread
//! that started them ends: keep a cluster on the test's own thread.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::netns::{Host, Hosts};

const ETCD: &str = "/usr/bin/etcd";
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

#[derive(Debug)]
struct Member {
    name: String,
    ns: String,
    addr: String,
    child: Option<Child>,
}

#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Start one member on each of `on` (all at once: none is ready before
    /// a quorum runs) and wait until all are healthy.
    pub fn start(hosts: &Hosts, on: [Host; 3]) -> EtcdCluster {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: run ./scripts/test, which installs etcd-server"
        );
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let members: Vec<Member> = on
            .iter()
            .enumerate()
            .map(|(i, h)| Member {
                name: format!("m{i}"),
                ns: hosts.ns(*h).to_string(),
                addr: hosts.addr(*h).to_string(),
                child: None,
            })
            .collect();
        let initial_cluster =
            members.iter().map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.addr)).collect::<Vec<_>>().join(",");
        let token = format!("baton-{}", dir.path().file_name().unwrap().to_string_lossy());
        let mut c = EtcdCluster { members, initial_cluster, token, dir };
        for i in 0..3 {
            c.spawn(i, "new");
        }
        c.wait_healthy();
        c
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize, state: &str) {
        assert!(self.members[i].child.is_none(), "member {i} runs already");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(i)).unwrap();
        let m = &self.members[i];
        let client = format!("http://{}:{CLIENT_PORT}", m.addr);
        let peer = format!("http://{}:{PEER_PORT}", m.addr);
        let mut cmd = std::process::Command::new("ip");
        // Killed with the test process even if it dies without dropping us
        // (the signal follows the spawning thread: keep the cluster on the
        // thread that started it).
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(["netns", "exec", &m.ns, ETCD])
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", self.dir.path().join(&m.name).display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--initial-cluster-state={state}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd {}: {e}", m.name));
        self.members[i].child = Some(child);
    }

    /// The members' client URLs (`http://addr:2379`), in order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{CLIENT_PORT}", self.members[i].addr)
    }

    /// SIGKILL member `i` (and reap it).
    pub fn kill(&mut self, i: usize) {
        let mut c = self.members[i].child.take().unwrap_or_else(|| panic!("member {i} is not running"));
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Start member `i` again on its data directory (it rejoins); does not
    /// wait (see [`wait_healthy`](Self::wait_healthy)).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
    }

    /// Whether member `i` says it is healthy (`GET /health`: it has a leader
    /// and a quorum read succeeds).
    pub fn healthy(&self, i: usize) -> bool {
        let addr = format!("{}:{CLIENT_PORT}", self.members[i].addr);
        let get = || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            Ok(r)
        };
        get().is_ok_and(|r| r.contains("\"health\":\"true\""))
    }

    /// Wait (30 s at most) until every running member is healthy; panics
    /// with the logs if one exited or the time ran out.
    pub fn wait_healthy(&mut self) {
        let start = Instant::now();
        loop {
            for i in 0..self.members.len() {
                if let Some(c) = self.members[i].child.as_mut() {
                    if let Some(st) = c.try_wait().unwrap() {
                        self.members[i].child = None;
                        panic!("etcd {} exited with {st}\n{}", self.members[i].name, self.logs());
                    }
                }
            }
            let running: Vec<usize> = (0..self.members.len()).filter(|i| self.members[*i].child.is_some()).collect();
            if running.iter().all(|i| self.healthy(*i)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd members {running:?} not all healthy within 30 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every member's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.members.len() {
            let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("--- etcd {} ({}) log, last lines:\n", self.members[i].name, self.endpoint(i));
            for l in &lines[lines.len().saturating_sub(30)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
