//! The lab harness itself, proven on its own: hosts on a switch, a
//! three-member etcd cluster across them (quorum lost and regained), the
//! delay proxy across namespaces, and cuts that a connection notices.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::delay::DelayProxy;
use common::etcd::EtcdCluster;
use common::netns::{Host, Hosts};

/// These tests make namespaces: they need root. Elsewhere they say so and
/// return; as root (CI) they all run.
fn root_or_skip() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("skipped: not root (network namespaces need root)");
    false
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Put `key` = `value` through `endpoint` and read it back there, 5 s at most.
async fn put_get(endpoint: &str, key: &str, value: &str) -> Result<(), String> {
    let io = async {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(4));
        let mut c = etcd_client::Client::connect([endpoint], Some(opts)).await.map_err(|e| e.to_string())?;
        c.put(key, value, None).await.map_err(|e| e.to_string())?;
        let r = c.get(key, None).await.map_err(|e| e.to_string())?;
        let got = r.kvs().first().map(|kv| kv.value().to_vec());
        if got.as_deref() != Some(value.as_bytes()) {
            return Err(format!("{key} read back as {got:?}"));
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), io).await {
        Ok(r) => r.map_err(|e| format!("{endpoint}: {e}")),
        Err(_) => Err(format!("{endpoint}: no answer within 5 s")),
    }
}

#[test]
fn etcd_on_three_hosts_answers_from_root_and_from_a_host_and_needs_a_quorum() {
    if !root_or_skip() {
        return;
    }
    let t0 = Instant::now();
    let hosts = Hosts::with(&["a", "b", "e1", "e2", "e3"]);
    let mut etcd = EtcdCluster::start(&hosts, [hosts.host("e1"), hosts.host("e2"), hosts.host("e3")]);
    eprintln!("cluster healthy after {:?}", t0.elapsed());
    let eps = etcd.endpoints();
    assert_eq!(eps.len(), 3);
    let rt = runtime();
    // From the test process (the root namespace, on the switch).
    for (i, ep) in eps.iter().enumerate() {
        rt.block_on(put_get(ep, &format!("root/{i}"), "r")).unwrap_or_else(|e| panic!("{e}\n{}", etcd.logs()));
    }
    // From host A's namespace: a runtime on a thread inside it.
    let eps2 = eps.clone();
    let from_a = hosts
        .spawn_in(Host::A, move || {
            let rt = runtime();
            eps2.iter().enumerate().map(|(i, ep)| rt.block_on(put_get(ep, &format!("a/{i}"), "a"))).collect::<Vec<_>>()
        })
        .join()
        .unwrap();
    for r in from_a {
        r.unwrap_or_else(|e| panic!("from host A: {e}\n{}", etcd.logs()));
    }
    // A cut host reaches nobody: its member is out, the others carry on.
    hosts.cut(Host::A);
    let eps2 = eps.clone();
    let r = hosts.spawn_in(Host::A, move || runtime().block_on(put_get(&eps2[0], "a/cut", "x"))).join().unwrap();
    assert!(r.is_err(), "a put from a cut host succeeded");
    hosts.heal(Host::A);

    // One member down: a quorum is left. Killing the leader costs an
    // election (1 s to a few with a split vote): the writer retries, 15 s.
    etcd.kill(0);
    let t = Instant::now();
    loop {
        match rt.block_on(put_get(&eps[1], "k", "1")) {
            Ok(()) => break,
            Err(e) if t.elapsed() > Duration::from_secs(15) => panic!("one down, 15 s: {e}\n{}", etcd.logs()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    eprintln!("one member down: a write succeeded after {:?}", t.elapsed());
    // Two down: no quorum, the write fails (in bounded time).
    etcd.kill(1);
    let t = Instant::now();
    let r = rt.block_on(put_get(&eps[2], "k", "2"));
    assert!(r.is_err(), "a write without quorum succeeded");
    assert!(t.elapsed() < Duration::from_secs(6), "the failing write took {:?}", t.elapsed());
    eprintln!("without quorum: {} (after {:?})", r.unwrap_err(), t.elapsed());
    // Both back on their data: writes again, through every member.
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_healthy();
    for (i, ep) in eps.iter().enumerate() {
        rt.block_on(put_get(ep, "k", &format!("3{i}"))).unwrap_or_else(|e| panic!("restarted: {e}\n{}", etcd.logs()));
    }
    eprintln!("test took {:?}", t0.elapsed());
}

/// An echo server inside a host, stopped when dropped.
struct Echo {
    addr: SocketAddr,
    /// Where each connection came from.
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    /// Listening on `addr` (port 0: any) inside `host`.
    fn start(hosts: &Hosts, host: Host, addr: &str) -> Echo {
        let addr: SocketAddr = format!("{addr}:0").parse().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, peers) = (stop.clone(), Arc::new(Mutex::new(Vec::new())));
        let peers2 = peers.clone();
        let thread = hosts.spawn_in(host, move || {
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        peers2.lock().unwrap().push(peer);
                        s.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            let mut r = s.try_clone().unwrap();
                            let _ = std::io::copy(&mut r, &mut s);
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("echo server: accept: {e}"),
                }
            }
        });
        Echo { addr: rx.recv().unwrap(), peers, stop, thread: Some(thread) }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.take().unwrap().join();
    }
}

/// Send `data` on `s` and half-close, while reading all that comes back
/// (until EOF).
fn echo_all(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let d2 = data.to_vec();
    let sender = std::thread::spawn(move || {
        w.write_all(&d2).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    back
}

#[test]
fn the_delay_proxy_adds_its_delay_each_way_and_keeps_the_bytes() {
    if !root_or_skip() {
        return;
    }
    let hosts = Hosts::new();
    let server = Echo::start(&hosts, Host::B, hosts.addr(Host::B));
    let echo = server.addr;
    let delay = Duration::from_millis(10);
    let proxy = DelayProxy::start(Some(hosts.ns(Host::A)), "127.0.0.1:0".parse().unwrap(), echo, delay);
    let (addr, ns) = (proxy.addr(), hosts.ns(Host::A).to_string());
    // The proxy listens on host A's loopback: the client must be in host A.
    let (rtts, data_ok, took) = std::thread::spawn(move || {
        common::netns::enter_netns(&ns);
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rtts = Vec::new();
        for i in 0..5u8 {
            let t = Instant::now();
            s.write_all(&[i]).unwrap();
            let mut b = [0u8];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i);
            rtts.push(t.elapsed());
        }
        // 1 MiB through and back, then a half-close that comes back as EOF.
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        let t = Instant::now();
        let back = echo_all(s, &data);
        (rtts, back == data, t.elapsed())
    })
    .join()
    .unwrap();
    eprintln!("round trips through a {delay:?} proxy: {rtts:?}; 1 MiB echoed in {took:?}");
    assert!(rtts.iter().all(|r| *r >= 2 * delay), "a round trip under 2 × {delay:?}: {rtts:?}");
    assert!(rtts.iter().all(|r| *r < 50 * delay), "a round trip far over 2 × {delay:?}: {rtts:?}");
    assert!(data_ok, "the echoed MiB differs");
    assert!(took >= 2 * delay, "1 MiB echoed in {took:?}, under 2 × {delay:?}");

    // Not one chunk per delay: through 50 ms each way, 1 MiB (16 reads of
    // 64 KiB at best, each way) would take 1.6 s+; pipelined, 100 ms and
    // the copying.
    let slow = DelayProxy::start(Some(hosts.ns(Host::A)), "127.0.0.1:0".parse().unwrap(), echo, 5 * delay);
    let (saddr, ns) = (slow.addr(), hosts.ns(Host::A).to_string());
    let (ok, took) = std::thread::spawn(move || {
        common::netns::enter_netns(&ns);
        let s = TcpStream::connect(saddr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let data = vec![5u8; 1 << 20];
        let t = Instant::now();
        let back = echo_all(s, &data);
        (back == data, t.elapsed())
    })
    .join()
    .unwrap();
    eprintln!("1 MiB echoed through a {:?} proxy in {took:?}", 5 * delay);
    assert!(ok, "the echoed MiB differs (slow proxy)");
    assert!(took >= 10 * delay && took < Duration::from_millis(800), "1 MiB through 2 × 50 ms took {took:?}");
    drop(slow);
    // The proxy connected from host A's namespace, over the switch.
    let peers = server.peers.lock().unwrap().clone();
    assert!(peers.iter().all(|p| p.ip().to_string() == hosts.addr(Host::A)), "echo peers {peers:?}");

    // Many connections at once, each its own bytes.
    let ns = hosts.ns(Host::A).to_string();
    let each: Vec<_> = (0..16u8)
        .map(|k| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                common::netns::enter_netns(&ns);
                let s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let data = vec![k; 200_000];
                echo_all(s, &data) == data
            })
        })
        .collect();
    for (k, t) in each.into_iter().enumerate() {
        assert!(t.join().unwrap(), "connection {k}: the echo differs");
    }

    // Dropping the proxy ends a connection through it.
    let held = std::thread::spawn(move || {
        common::netns::enter_netns(&ns);
        TcpStream::connect(addr).unwrap()
    })
    .join()
    .unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(proxy);
    let mut b = [0u8; 1];
    assert!(matches!((&held).read(&mut b), Ok(0) | Err(_)), "a connection outlived its proxy");
}

#[test]
fn a_cut_host_is_unreachable_until_healed() {
    if !root_or_skip() {
        return;
    }
    let hosts = Hosts::with(&["a", "b", "c"]);
    let c = hosts.host("c");
    let server = Echo::start(&hosts, Host::B, hosts.addr(Host::B));
    let echo = server.addr;
    let reach = |from: Option<Host>| -> bool {
        let ns = from.map(|h| hosts.ns(h).to_string());
        std::thread::spawn(move || {
            if let Some(ns) = ns {
                common::netns::enter_netns(&ns);
            }
            let Ok(mut s) = TcpStream::connect_timeout(&echo, Duration::from_millis(700)) else { return false };
            s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
            let mut b = [0u8; 3];
            s.write_all(b"abc").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"abc"
        })
        .join()
        .unwrap()
    };
    assert!(reach(None) && reach(Some(Host::A)) && reach(Some(c)), "B is unreachable before any cut");
    // An established connection stalls too.
    let mut held = TcpStream::connect(echo).unwrap();
    held.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    hosts.cut(Host::B);
    assert!(!reach(None), "root reaches a cut B");
    assert!(!reach(Some(Host::A)), "A reaches a cut B");
    held.write_all(b"x").unwrap();
    assert!(held.read(&mut [0u8; 1]).is_err(), "an established connection to a cut B answered");
    hosts.heal(Host::B);
    assert!(reach(None) && reach(Some(Host::A)), "B is unreachable after heal");
    // The held connection resumes (TCP retransmits the byte, at its
    // backed-off timer: seconds after the heal).
    held.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");

    // Between A and B only: root and C still reach B.
    hosts.cut_between(Host::B, Host::A);
    assert!(!reach(Some(Host::A)), "A reaches B through a cut between them");
    assert!(reach(None) && reach(Some(c)), "a cut between A and B stopped others");
    hosts.heal(Host::B);
    assert!(reach(Some(Host::A)), "A is still cut from B after heal");
}

#[test]
fn a_rate_limited_host_sends_at_its_rate() {
    if !root_or_skip() {
        return;
    }
    let hosts = Hosts::new();
    let l = TcpListener::bind(format!("{}:0", hosts.root_addr())).unwrap();
    let to = l.local_addr().unwrap();
    hosts.rate(Host::A, 8000); // 1 MB/s
    let send = |n: usize| {
        hosts.spawn_in(Host::A, move || {
            let mut s = TcpStream::connect(to).unwrap();
            s.write_all(&vec![7u8; n]).unwrap();
        })
    };
    let time = |n: usize| {
        let t = Instant::now();
        let h = send(n);
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        h.join().unwrap();
        assert_eq!(got.len(), n);
        t.elapsed()
    };
    let limited = time(1 << 20);
    hosts.unrate(Host::A);
    let free = time(1 << 20);
    eprintln!("1 MiB from A: {limited:?} at 8 Mbit/s, {free:?} unlimited");
    assert!(limited >= Duration::from_millis(800), "1 MiB at 8 Mbit/s took {limited:?}");
    assert!(free < limited / 2, "unlimited {free:?} vs limited {limited:?}");
}

#[test]
fn a_killed_runs_leftovers_are_reclaimed() {
    if !root_or_skip() {
        return;
    }
    // The /24 this process tries first, claimed by a process that is gone,
    // with a namespace left behind.
    let n = std::process::id() % (100 * 256);
    let (o2, o3) = (100 + n / 256, n % 256);
    let tag = format!("bt{o2}x{o3}");
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let run = |args: &[&str]| {
        let st = std::process::Command::new("ip").args(args).status().unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    run(&["link", "add", &tag, "type", "veth", "peer", "name", &format!("{tag}p")]);
    run(&["link", "set", &tag, "alias", &format!("baton-lab pid {dead}")]);
    run(&["addr", "add", &format!("10.{o2}.{o3}.254/24"), "dev", &tag]);
    run(&["link", "set", &tag, "up"]);
    run(&["netns", "add", &format!("{tag}-zz")]);
    let hosts = Hosts::new();
    assert_eq!(hosts.addr(Host::A), format!("10.{o2}.{o3}.1"), "the leftover /24 was not reclaimed");
    assert!(
        !std::path::Path::new(&format!("/var/run/netns/{tag}-zz")).exists(),
        "the leftover namespace is still there"
    );
    let server = Echo::start(&hosts, Host::B, hosts.addr(Host::B));
    assert!(TcpStream::connect_timeout(&server.addr, Duration::from_secs(2)).is_ok(), "B unreachable from root");
}
