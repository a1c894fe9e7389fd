//! Helpers for the NBD interop tests: the `baton serve` process, peers run
//! under a timeout, free ports, sparse images and `nbdinfo --map` parsing.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// The longest any peer tool may run before the test calls it hung.
const TOOL_TIMEOUT: &str = "30";

static SERVERS: AtomicUsize = AtomicUsize::new(0);

/// A port nobody listens on right now (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `baton serve` process; SIGKILLed on drop unless it was stopped.
pub struct Server {
    child: Option<Child>,
    /// The first line the server printed on stdout.
    pub uri: String,
    stderr: PathBuf,
}

impl Server {
    /// `baton serve ARGS...`, waiting (at most 10 s) for the URI line on stdout.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let stderr = dir.join(format!("baton-{n}.stderr"));
        let child = Command::new(BATON)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut server = Server { child: Some(child), uri: String::new(), stderr };
        let stdout = server.child.as_mut().unwrap().stdout.take().unwrap();
        server.uri = first_line(stdout).unwrap_or_else(|| {
            let status = server.wait_exit(Duration::from_secs(1));
            panic!("baton serve {args:?} printed no URI (status {status:?}); stderr:\n{}", server.stderr())
        });
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Send a signal by name (TERM, INT, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(st.success(), "kill -{sig} failed");
    }

    /// The exit status if the process exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status; fails unless it exits within 10 s.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        let st = self.wait_exit(Duration::from_secs(10));
        st.unwrap_or_else(|| panic!("baton serve did not exit within 10 s of SIGTERM; stderr:\n{}", self.stderr()))
    }

    /// SIGTERM and insist on a clean exit.
    pub fn stop_ok(&mut self) {
        let st = self.stop();
        assert!(st.success(), "baton serve exited with {st} after SIGTERM; stderr:\n{}", self.stderr());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The first line of `r` (without the newline), read on a thread that then
/// drains the rest; None on EOF or after 10 s.
pub fn first_line<R: Read + Send + 'static>(r: R) -> Option<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        let n = r.read_line(&mut line).unwrap_or(0);
        let _ = tx.send(if n == 0 { None } else { Some(line.trim_end().to_string()) });
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    rx.recv_timeout(Duration::from_secs(10)).ok().flatten()
}

/// A peer tool under timeout(1), so a hang fails the test instead of the run.
pub fn tool(name: &str) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", TOOL_TIMEOUT, name]);
    c
}

/// Run and return the output, whatever the status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Run, insist on success, return stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// qemu-io on `uri` with these commands, insisting every one succeeded:
/// exit 0 and no "failed"/"error" line (asynchronous failures do not set the status).
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = output(&mut c);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let lower = all.to_lowercase();
    assert!(
        out.status.success() && !lower.contains("failed") && !lower.contains("error"),
        "qemu-io {uri} {cmds:?} ({}):\n{all}",
        out.status
    );
    all
}

/// A sparse file of `size` bytes with `(offset, len, byte)` runs written in it.
pub fn image(path: &Path, size: u64, runs: &[(u64, usize, u8)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &(off, len, b) in runs {
        f.write_all_at(&vec![b; len], off).unwrap();
    }
    f.sync_all().unwrap();
}

/// Assert `data[off..off+len]` is all `b`.
pub fn assert_run(data: &[u8], off: usize, len: usize, b: u8) {
    let slice = &data[off..off + len];
    if let Some(i) = slice.iter().position(|&x| x != b) {
        panic!("byte at {} is {:#04x}, expected {b:#04x} (run {off}+{len})", off + i, slice[i]);
    }
}

/// One `nbdinfo --map` line: start, length, type bits.
pub type Extent = (u64, u64, u32);

/// `nbdinfo --map[=CONTEXT] URI`, parsed; asserts the extents tile the export from 0.
pub fn map(uri: &str, context: Option<&str>) -> Vec<Extent> {
    let arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = run(tool("nbdinfo").arg(arg).arg(uri));
    let extents = parse_map(&out);
    let mut next = 0;
    for &(s, l, _) in &extents {
        assert_eq!(s, next, "extents do not tile:\n{out}");
        next = s + l;
    }
    extents
}

pub fn parse_map(out: &str) -> Vec<Extent> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}

/// Merge adjacent extents of the same type (servers may split differently).
pub fn coalesce(extents: &[Extent]) -> Vec<Extent> {
    let mut v: Vec<Extent> = Vec::new();
    for &(s, l, t) in extents {
        match v.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == s => last.1 += l,
            _ => v.push((s, l, t)),
        }
    }
    v
}

/// Wait (at most 10 s) until a unix socket accepts connections.
pub fn wait_unix_socket(path: &Path) {
    for _ in 0..1000 {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) {
            let _ = s.flush();
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on {}", path.display());
}

/// A peer server (qemu-nbd): SIGKILLed on drop.
pub struct Peer(pub Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-nbd -t -f raw -k SOCK ARGS... FILE`, ready to accept.
pub fn qemu_nbd(sock: &Path, args: &[&str], file: &Path) -> Peer {
    let child = Command::new("qemu-nbd")
        .args(["-t", "-f", "raw", "-k"])
        .arg(sock)
        .args(args)
        .arg(file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let peer = Peer(child);
    wait_unix_socket(sock);
    peer
}

pub fn unix_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}
