//! Helpers shared by the end-to-end tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod delay;
pub mod etcd;
pub mod netns;
pub mod proxy;

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bytes locked on `path`'s inode, by anyone, from /proc/locks.
pub fn locked_bytes(path: &std::path::Path) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    // /proc/locks names a file MAJ:MIN:INODE (major, minor in hex): match all
    // three, or a file with the same inode number on another device counts too.
    let m = std::fs::metadata(path).unwrap();
    let dev = m.dev();
    let (major, minor) = ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00));
    let needle = format!(" {major:02x}:{minor:02x}:{} ", m.ino());
    let mut bytes = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string("/proc/locks").unwrap().lines() {
        if line.contains("->") || !line.contains(&needle) {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, end) = (f[f.len() - 2].parse::<u64>().unwrap(), f[f.len() - 1].parse::<u64>().unwrap());
        bytes.extend(start..=end);
    }
    bytes
}

/// Whether this machine can run the KVM tests. Without `/dev/kvm` a KVM test
/// fails (a CI runner that silently lost KVM must not look green), unless
/// `BATON_NO_KVM=1` asks to skip them: then it says so and the test returns.
pub fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("BATON_NO_KVM").is_some_and(|v| v == "1") {
        eprintln!("skipped by request (BATON_NO_KVM=1): /dev/kvm is missing on this machine");
        return false;
    }
    panic!("/dev/kvm is missing: this test runs a KVM guest (set BATON_NO_KVM=1 to skip the KVM tests on purpose)");
}

/// The peers are the judges: a missing one is a broken setup, not a skip.
/// `./scripts/test` installs them.
pub fn require_tools(tools: &[&str]) {
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p).chain([std::path::PathBuf::from("/usr/sbin")]).any(|d| d.join(t).is_file())
            })
            .unwrap_or(false);
        assert!(found, "{t} is not installed; run ./scripts/test, which installs the peers");
    }
}

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A minimal synchronous QMP client for driving peers (qemu-storage-daemon) in tests.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen while waiting for replies, oldest first.
    pub events: Vec<serde_json::Value>,
}

impl Qmp {
    /// Connect (retrying while the peer starts), read the greeting, negotiate capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let mut last = None;
        // A minute: a daemon that builds a guest starts slowly on a loaded machine.
        for _ in 0..1200 {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut q = Qmp { reader: BufReader::new(s.try_clone().unwrap()), writer: s, events: Vec::new() };
                    let greeting = q.read();
                    assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
                    let r = q.execute("qmp_capabilities", serde_json::json!({}));
                    assert!(r.get("return").is_some(), "{r}");
                    return q;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("cannot connect to QMP at {}: {last:?}", path.display());
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// The statuses of the MIGRATION events seen so far.
    pub fn migration_events(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "MIGRATION")
            .map(|e| e["data"]["status"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Run a command; returns the reply (`return` or `error`), events kept in `events`.
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        self.send(cmd, args);
        self.reply()
    }

    /// Send a command without waiting for its reply (see [`reply`](Self::reply)).
    pub fn send(&mut self, cmd: &str, args: serde_json::Value) {
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").unwrap();
    }

    /// The next reply (`return` or `error`), skipping events.
    pub fn reply(&mut self) -> serde_json::Value {
        loop {
            let v = self.read();
            if v.get("event").is_none() {
                return v;
            }
            self.events.push(v);
        }
    }
}

/// `baton daemon ARGS` with extra environment, stdout discarded.
pub fn daemon_env(args: &[String], env: &[(&str, &str)]) -> Proc {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_baton"));
    c.arg("daemon").args(args).stdout(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    Proc(c.spawn().unwrap())
}

/// A 16 MiB sparse image.
pub fn image(p: &Path) {
    std::fs::File::create(p).unwrap().set_len(16 << 20).unwrap();
}

/// Poll `cmd` until `f` holds for its return (a minute at most).
pub fn wait_for(q: &mut Qmp, cmd: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = q.execute(cmd, serde_json::json!({}));
        if f(&r["return"]) {
            return r["return"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: last {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `cmd`; it must succeed. Its return.
pub fn ok(q: &mut Qmp, cmd: &str, args: serde_json::Value) -> serde_json::Value {
    let r = q.execute(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}
