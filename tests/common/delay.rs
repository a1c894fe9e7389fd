//! A TCP proxy that adds a one-way delay to each direction, across network
//! namespaces. Its listener, and every connection it makes to the target,
//! are created on a thread that entered the listening namespace, so the
//! traffic to the target leaves that namespace through its real link (and
//! meets the link's nftables rules and qdiscs).
//!
//! Per connection and direction: a reader thread stamps each chunk with
//! `now + delay` and queues it; a writer thread releases each chunk at its
//! stamp, in order (so the throughput is not one chunk per delay). An end
//! of stream is delayed like data and becomes a half-close (`shutdown
//! (Write)`) on the other side; an error or reset closes both sides. Drop
//! stops the listener and shuts every connection down.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

enum Msg {
    Data(Instant, Vec<u8>),
    Eof(Instant),
    Reset,
}

impl DelayProxy {
    /// Listen on `listen` (port 0: any) in network namespace `netns` (None:
    /// the test process's own), and forward each connection to `target`,
    /// connected from that same namespace, `delay` added each way.
    pub fn start(netns: Option<&str>, listen: SocketAddr, target: SocketAddr, delay: Duration) -> DelayProxy {
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = netns.map(str::to_string);
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let acceptor = std::thread::spawn(move || {
            if let Some(ns) = &ns {
                super::netns::enter_netns(ns);
            }
            let l = match TcpListener::bind(listen) {
                Ok(l) => l,
                Err(e) => {
                    tx.send(Err(e)).unwrap();
                    return;
                }
            };
            l.set_nonblocking(true).unwrap();
            tx.send(Ok(l.local_addr().unwrap())).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        // Connected from this thread: from the namespace.
                        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                            Ok(server) => pipe(client, server, delay, &conns2),
                            Err(e) => {
                                eprintln!("delay proxy: cannot connect to {target}: {e}");
                                drop(client);
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(e) => panic!("delay proxy: accept on {listen}: {e}"),
                }
            }
        });
        let addr =
            rx.recv().unwrap().unwrap_or_else(|e| panic!("delay proxy cannot listen on {listen} in {netns:?}: {e}"));
        DelayProxy { addr, stop, conns, acceptor: Some(acceptor) }
    }

    /// Where to connect to (in the listening namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn pipe(client: TcpStream, server: TcpStream, delay: Duration, conns: &Mutex<Vec<TcpStream>>) {
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
    }
    {
        let mut c = conns.lock().unwrap();
        c.push(client.try_clone().unwrap());
        c.push(server.try_clone().unwrap());
    }
    for (from, to) in [(&client, &server), (&server, &client)] {
        // Bounded: a slow receiver stops the reader (4096 chunks of at most 64 KiB).
        let (tx, rx) = sync_channel(4096);
        let (r, w) = (from.try_clone().unwrap(), to.try_clone().unwrap());
        let w2 = w.try_clone().unwrap();
        let r2 = r.try_clone().unwrap();
        std::thread::spawn(move || reader(r, delay, tx, w2));
        std::thread::spawn(move || writer(rx, w, r2));
    }
}

fn reader(mut from: TcpStream, delay: Duration, tx: SyncSender<Msg>, to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Msg::Eof(Instant::now() + delay));
                return;
            }
            Ok(n) => {
                if tx.send(Msg::Data(Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    // The writer is gone (its side failed): nothing more to do.
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = tx.send(Msg::Reset);
                return;
            }
        }
    }
}

fn writer(rx: Receiver<Msg>, mut to: TcpStream, from: TcpStream) {
    let wait = |at: Instant| {
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
    };
    while let Ok(m) = rx.recv() {
        match m {
            Msg::Data(at, chunk) => {
                wait(at);
                if to.write_all(&chunk).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            Msg::Eof(at) => {
                wait(at);
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Msg::Reset => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
