//! Hosts that share nothing but a switch: one network namespace per host,
//! each joined by a veth pair to a Linux bridge in a "switch" namespace of
//! its own, all on one /24. The root namespace (the test process) is
//! plugged into the switch too, at `.254`, so the test reaches every host
//! directly. A daemon runs on a host with `ip netns exec`, which execs it
//! (the child's pid is the daemon's). QMP sockets stay in the shared
//! filesystem, so the test drives every host.
//!
//! Faults are per host: nftables tables in the host's namespace (loss,
//! firewall, a cut) and a tbf qdisc on its veth (rate). The namespaces, and
//! with them the links, the rules and the qdiscs, go when [`Hosts`] drops.
//!
//! Several test processes run at once: each claims a /24 by creating a
//! root-namespace interface named after it (`bt<o2>x<o3>`, creation is
//! atomic), and names its namespaces after the same pair. The claim's alias
//! names its pid: a later process reclaims the /24 of one that was killed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

/// A host, by its index in the names given to [`Hosts::with`]. `A` and `B`
/// are the two of [`Hosts::new`] (the first two of any [`Hosts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Host(pub usize);

impl Host {
    pub const A: Host = Host(0);
    pub const B: Host = Host(1);
}

#[derive(Debug)]
pub struct Hosts {
    /// `bt<o2>x<o3>`: the prefix of every name, and the root's interface.
    tag: String,
    switch: String,
    names: Vec<String>,
    ns: Vec<String>,
    addr: Vec<String>,
    root_addr: String,
}

/// The interface of a host on the switch, in the host's namespace.
pub const HOST_IF: &str = "eth0";

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// If `tag`'s claim belongs to a process that is gone (killed before its
/// `Hosts` dropped), remove its namespaces and the claim; whether it did.
/// A claim without an owner yet (being made) is not stale.
fn reclaim_stale(tag: &str) -> bool {
    let out = Command::new("ip").args(["-o", "link", "show", "dev", tag]).stderr(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(pid) = text.split("alias baton-lab pid ").nth(1).and_then(|r| r.split_whitespace().next()) else {
        return false;
    };
    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return false;
    }
    // Namespaces first, the claim last: nobody can claim it before.
    if let Ok(dir) = std::fs::read_dir("/var/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{tag}-")) {
                let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
            }
        }
    }
    Command::new("ip").args(["link", "del", tag]).stderr(Stdio::null()).status().unwrap().success()
}

/// The IPv4 prefixes the root namespace routes (every table, but default
/// routes), as (network, length).
fn root_routes() -> Vec<(u32, u32)> {
    let out = Command::new("ip").args(["-4", "route", "show", "table", "all"]).output().unwrap();
    assert!(out.status.success(), "ip route: {}", String::from_utf8_lossy(&out.stderr));
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        // Claims (ours and others'): settled by the claim itself.
        if w.windows(2).any(|p| p[0] == "dev" && is_claim(p[1])) {
            continue;
        }
        // "PREFIX dev ...", or "TYPE PREFIX ..." (local, broadcast, ...).
        for cand in w.iter().take(2) {
            let (a, len) = cand.split_once('/').unwrap_or((cand, "32"));
            if let (Ok(a), Ok(len)) = (a.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) {
                v.push((u32::from(a), len));
                break;
            }
        }
    }
    v
}

/// Whether `dev` is named like a claim (`bt<o2>x<o3>`).
fn is_claim(dev: &str) -> bool {
    dev.strip_prefix("bt")
        .and_then(|r| r.split_once('x'))
        .is_some_and(|(a, b)| a.parse::<u8>().is_ok() && b.parse::<u8>().is_ok())
}

fn overlaps((a, la): (u32, u32), (b, lb): (u32, u32)) -> bool {
    let l = la.min(lb);
    let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
    a & mask == b & mask
}

/// Set the calling thread's network namespace to the named one
/// (`/var/run/netns/<name>`). Sockets the thread creates afterwards live
/// there, and keep living there whichever thread uses them.
pub fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("netns {name} cannot be opened: {e}"));
    // SAFETY: setns(2) on a valid open namespace file descriptor; it changes
    // only this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns into {name}: {}", std::io::Error::last_os_error());
}

impl Default for Hosts {
    fn default() -> Self {
        Self::new()
    }
}

impl Hosts {
    /// Two hosts, `A` and `B`.
    pub fn new() -> Hosts {
        Hosts::with(&["a", "b"])
    }

    /// One host per name (1 to 5 letters or digits: they end namespace
    /// names), in that order: `Host(i)` is `names[i]` (see also
    /// [`host`](Self::host)). Host `i` gets address `.i+1` on the /24.
    pub fn with(names: &[&str]) -> Hosts {
        super::require_tools(&["ip", "nft", "tc"]);
        assert!(!names.is_empty() && names.len() < 250, "1 to 249 hosts");
        for (i, n) in names.iter().enumerate() {
            // Namespace names stay within 15 characters (bt199x255-NAME).
            assert!(
                (1..=5).contains(&n.len()) && n.chars().all(|c| c.is_ascii_alphanumeric()) && *n != "sw",
                "host name {n:?}: 1 to 5 letters or digits, not \"sw\" (the switch)"
            );
            assert!(!names[..i].contains(n), "host name {n:?} twice");
        }
        let pid = std::process::id() as usize;
        // Claim a /24: the root end of the root's veth is named after it.
        // The root namespace gets a route to the /24: never one that
        // overlaps a route the machine has (its own network may be a 10.x).
        let taken = root_routes();
        let mut claimed = None;
        for k in 0..100 * 256 {
            let n = (pid + k * 7919) % (100 * 256);
            let (o2, o3) = (100 + n / 256, n % 256);
            let net = u32::from_be_bytes([10, o2 as u8, o3 as u8, 0]);
            if taken.iter().any(|(a, len)| overlaps((net, 24), (*a, *len))) {
                continue;
            }
            let tag = format!("bt{o2}x{o3}");
            let claim = || {
                Command::new("ip")
                    .args(["link", "add", &tag, "type", "veth", "peer", "name", &format!("{tag}p")])
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .success()
            };
            if claim() || (reclaim_stale(&tag) && claim()) {
                run(&["ip", "link", "set", &tag, "alias", &format!("baton-lab pid {pid}")]);
                claimed = Some((tag, format!("10.{o2}.{o3}")));
                break;
            }
        }
        let (tag, net) = claimed.expect("no free 10.x.y.0/24 for the switch");
        let switch = format!("{tag}-sw");
        let ns: Vec<String> = names.iter().map(|n| format!("{tag}-{n}")).collect();
        let h = Hosts {
            switch,
            names: names.iter().map(|n| n.to_string()).collect(),
            addr: (1..=names.len()).map(|i| format!("{net}.{i}")).collect(),
            ns,
            root_addr: format!("{net}.254"),
            tag,
        };
        // From here on, Drop cleans up whatever was made.
        for n in std::iter::once(&h.switch).chain(&h.ns) {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
            run(&["ip", "netns", "add", n]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        let sw = h.switch.as_str();
        run(&["ip", "-n", sw, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", sw, "link", "set", "br0", "up"]);
        // The root's port.
        run(&["ip", "link", "set", &format!("{}p", h.tag), "netns", sw]);
        run(&["ip", "-n", sw, "link", "set", &format!("{}p", h.tag), "name", "root", "master", "br0", "up"]);
        run(&["ip", "addr", "add", &format!("{}/24", h.root_addr), "dev", &h.tag]);
        run(&["ip", "link", "set", &h.tag, "up"]);
        for (i, (n, a)) in h.ns.iter().zip(&h.addr).enumerate() {
            let port = format!("p{i}");
            run(&["ip", "link", "add", HOST_IF, "netns", n, "type", "veth", "peer", "name", &port, "netns", sw]);
            run(&["ip", "-n", sw, "link", "set", &port, "master", "br0", "up"]);
            run(&["ip", "-n", n, "addr", "add", &format!("{a}/24"), "dev", HOST_IF]);
            run(&["ip", "-n", n, "link", "set", HOST_IF, "up"]);
        }
        h
    }

    /// The host named `name` in [`with`](Self::with).
    pub fn host(&self, name: &str) -> Host {
        Host(self.names.iter().position(|n| n == name).unwrap_or_else(|| panic!("no host {name}")))
    }

    /// Every host, in order.
    pub fn all(&self) -> Vec<Host> {
        (0..self.ns.len()).map(Host).collect()
    }

    /// The host's address on the switch.
    pub fn addr(&self, host: Host) -> &str {
        &self.addr[host.0]
    }

    /// The root namespace's (the test process's) address on the switch.
    pub fn root_addr(&self) -> &str {
        &self.root_addr
    }

    /// The host's network namespace name (`ip netns exec NAME`, [`enter_netns`]).
    pub fn ns(&self, host: Host) -> &str {
        &self.ns[host.0]
    }

    /// `program` to run on `host`.
    pub fn command(&self, host: Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[host.0], program]);
        c
    }

    /// Run `f` on a new thread inside `host`'s network namespace (its
    /// sockets are the host's).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        host: Host,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = self.ns(host).to_string();
        std::thread::spawn(move || {
            enter_netns(&ns);
            f()
        })
    }

    /// Drop `per_mille`/1000 of the packets `host` receives (both hosts:
    /// loss both ways).
    pub fn loss(&self, host: Host, per_mille: u32) {
        let ruleset = format!(
            "table inet baton_loss {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             iifname != \"lo\" numgen random mod 1000 < {per_mille} counter drop\n }}\n}}\n"
        );
        self.nft(host, &ruleset);
    }

    /// Let `host` accept new TCP connections on `ports` only (a firewall).
    pub fn only_tcp_ports(&self, host: Host, ports: &[u16]) {
        let list = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        self.nft(
            host,
            &format!(
                "table inet baton_fw {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
                 iifname != \"lo\" tcp flags syn tcp dport != {{ {list} }} counter reject with tcp reset\n }}\n}}\n"
            ),
        );
    }

    /// Cut `host` off: everything it sends or receives, but on loopback, is
    /// dropped (its table `baton_cut`). [`heal`](Self::heal) undoes it.
    pub fn cut(&self, host: Host) {
        self.nft(
            host,
            "table inet baton_cut {\n chain input {\n  type filter hook input priority -10; policy accept;\n  \
             iifname != \"lo\" counter drop\n }\n chain output {\n  type filter hook output priority -10; \
             policy accept;\n  oifname != \"lo\" counter drop\n }\n}\n",
        );
    }

    /// Drop the traffic between `host` and `peer` only, both ways (rules in
    /// `host`'s namespace, table `baton_cut_<peer>`). [`heal`](Self::heal)
    /// of `host` undoes it.
    pub fn cut_between(&self, host: Host, peer: Host) {
        let a = self.addr(peer);
        self.nft(
            host,
            &format!(
                "table inet baton_cut_{p} {{\n chain input {{\n  type filter hook input priority -10; policy \
                 accept;\n  ip saddr {a} counter drop\n }}\n chain output {{\n  type filter hook output priority \
                 -10; policy accept;\n  ip daddr {a} counter drop\n }}\n}}\n",
                p = peer.0
            ),
        );
    }

    /// Undo every [`cut`](Self::cut) and [`cut_between`](Self::cut_between)
    /// made in `host`'s namespace.
    pub fn heal(&self, host: Host) {
        let out = self.command(host, "nft").args(["list", "tables"]).output().unwrap();
        assert!(out.status.success(), "nft list tables: {}", String::from_utf8_lossy(&out.stderr));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            // Claims (ours and others'): settled by the claim itself.
            if w.windows(2).any(|p| p[0] == "dev" && is_claim(p[1])) {
                continue;
            }
            if let ["table", family, name] = w[..] {
                if name == "baton_cut" || name.starts_with("baton_cut_") {
                    let st = self.command(host, "nft").args(["delete", "table", family, name]).status().unwrap();
                    assert!(st.success(), "nft delete table {family} {name} in {}", self.ns(host));
                }
            }
        }
    }

    /// Limit what `host` sends to `kbit` kbit/s (a tbf qdisc on its veth).
    pub fn rate(&self, host: Host, kbit: u32) {
        // At least two full frames, else 10 ms at the rate.
        let burst = (kbit as u64 * 1000 / 8 / 100).max(3200);
        let st = self
            .command(host, "tc")
            .args(["qdisc", "replace", "dev", HOST_IF, "root", "tbf"])
            .args(["rate", &format!("{kbit}kbit"), "burst", &burst.to_string(), "latency", "400ms"])
            .status()
            .unwrap();
        assert!(st.success(), "tc tbf on {}", self.ns(host));
    }

    /// Remove [`rate`](Self::rate)'s limit.
    pub fn unrate(&self, host: Host) {
        let st = self.command(host, "tc").args(["qdisc", "del", "dev", HOST_IF, "root"]).status().unwrap();
        assert!(st.success(), "tc qdisc del on {}", self.ns(host));
    }

    fn nft(&self, host: Host, ruleset: &str) {
        let out = self
            .command(host, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(ruleset.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success(), "nft: {}\n{ruleset}", String::from_utf8_lossy(&out.stderr));
    }

    /// Packets the loss rule of `host` dropped so far.
    pub fn dropped(&self, host: Host) -> u64 {
        let out = self.command(host, "nft").args(["list", "table", "inet", "baton_loss"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in self.ns.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
        }
        // Gone with the switch's namespace (its peer was there) unless that
        // failed half-way: then by name.
        let _ = Command::new("ip").args(["link", "del", &self.tag]).stderr(Stdio::null()).status();
    }
}
