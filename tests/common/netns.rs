//! Two hosts that share nothing but a link: two network namespaces joined
//! by a veth pair, each with its own address (loopback is per namespace,
//! so nothing crosses but through the link). A daemon runs on a host with
//! `ip netns exec`, which execs it (the child's pid is the daemon's). QMP
//! sockets stay in the shared filesystem, so the test drives both. Loss is
//! an nftables rule in a host's input chain (`numgen random` drops); the
//! namespaces, and with them the link and the rules, go when dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

/// One of the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    A,
    B,
}

pub struct Hosts {
    ns: [String; 2],
    addr: [String; 2],
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    /// Two fresh namespaces named after this process (tests run one per
    /// process), on a /24 of their own.
    pub fn new() -> Hosts {
        super::require_tools(&["ip", "nft"]);
        let pid = std::process::id();
        let ns = [format!("baton{pid}a"), format!("baton{pid}b")];
        let veth = [format!("bt{pid}a"), format!("bt{pid}b")];
        let net = format!("10.{}.{}", 100 + (pid >> 8) % 100, pid % 256);
        let addr = [format!("{net}.1"), format!("{net}.2")];
        for n in &ns {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
            run(&["ip", "netns", "add", n]);
        }
        let h = Hosts { ns, addr };
        run(&[
            "ip", "link", "add", &veth[0], "netns", &h.ns[0], "type", "veth", "peer", "name", &veth[1], "netns",
            &h.ns[1],
        ]);
        for ((n, a), v) in h.ns.iter().zip(&h.addr).zip(&veth) {
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
            run(&["ip", "-n", n, "addr", "add", &format!("{a}/24"), "dev", v]);
            run(&["ip", "-n", n, "link", "set", v, "up"]);
        }
        h
    }

    fn i(host: Host) -> usize {
        match host {
            Host::A => 0,
            Host::B => 1,
        }
    }

    /// The host's address on the link.
    pub fn addr(&self, host: Host) -> &str {
        &self.addr[Self::i(host)]
    }

    /// `program` to run on `host`.
    pub fn command(&self, host: Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[Self::i(host)], program]);
        c
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

    fn nft(&self, host: Host, ruleset: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns[Self::i(host)], "nft", "-f", "-"])
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
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
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
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}
