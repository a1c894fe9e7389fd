//! A fault proxy for the handover tests: sits on a unix socket between two
//! processes and, on command, forwards, stalls, black-holes either
//! direction, half-closes, resets, or throttles; it can also act exactly
//! when a given section of the migration stream (or reply of its return
//! path) reaches it, so a fault lands on one step, deterministically.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

/// Up: from the connecting side (the migration source, the NBD client) to
/// the listener behind the proxy. Down: the way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Up = 0,
    Down = 1,
}

/// What a direction does with the bytes it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Forward,
    /// Stop reading (the sender's buffers fill, then its writes block).
    Stall,
    /// Read and drop everything.
    BlackHole,
}

/// A fault applied when a trigger fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Close every connection at once.
    Reset,
    /// Drop this direction from here on.
    BlackHole(Dir),
    /// Stop reading this direction from here on.
    Stall(Dir),
    /// Shut the write side of this direction (the receiver sees EOF).
    HalfClose(Dir),
}

/// Act when a frame with this tag starts in this direction (Up: a section
/// of the migration stream; Down: a reply of its return path), before
/// forwarding any byte of it.
#[derive(Debug, Clone, Copy)]
struct Trigger {
    dir: Dir,
    tag: u8,
    /// Frames with this tag to let pass first.
    skip: u32,
    action: Action,
}

struct Ctl {
    flow: [Mutex<Flow>; 2],
    /// Bytes per second per direction, 0 for no limit.
    rate: [AtomicU64; 2],
    /// Milliseconds each read waits before it is forwarded, per direction.
    delay: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    changed: Notify,
    /// Bumped by a reset: every connection alive at that moment closes.
    resets: AtomicU64,
    /// The link is cut (a reset until heal()): new connections close at once too.
    down: std::sync::atomic::AtomicBool,
    half_closed: [Mutex<bool>; 2],
    triggers: Mutex<Vec<Trigger>>,
    /// Tags that went through, per direction, in order (frame starts).
    seen: [Mutex<Vec<u8>>; 2],
    /// Flip the byte at this absolute offset of the Up direction.
    flip_at: Mutex<Option<u64>>,
}

/// A running proxy: listens on `path`, connects each client to `upstream`.
pub struct Proxy {
    rt: tokio::runtime::Runtime,
    ctl: Arc<Ctl>,
    pub path: PathBuf,
}

impl Proxy {
    /// `framed`: parse the migration stream (Up) and its replies (Down) so
    /// triggers can fire; plain byte pipes (NBD) pass false.
    pub fn start(path: &Path, upstream: &Path, framed: bool) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ctl = Arc::new(Ctl {
            flow: [Mutex::new(Flow::Forward), Mutex::new(Flow::Forward)],
            rate: [AtomicU64::new(0), AtomicU64::new(0)],
            delay: [AtomicU64::new(0), AtomicU64::new(0)],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            changed: Notify::new(),
            resets: AtomicU64::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
            half_closed: [Mutex::new(false), Mutex::new(false)],
            triggers: Mutex::new(Vec::new()),
            seen: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
            flip_at: Mutex::new(None),
        });
        let _ = std::fs::remove_file(path);
        let listener = {
            let _g = rt.enter();
            UnixListener::bind(path).unwrap()
        };
        let (c, up) = (ctl.clone(), upstream.to_path_buf());
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if c.down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = UnixStream::connect(&up).await else { continue };
                let gen = c.resets.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(c.clone(), Dir::Up, cr, sw, gen, framed));
                tokio::spawn(pump(c.clone(), Dir::Down, sr, cw, gen, framed));
            }
        });
        Proxy { rt, ctl, path: path.to_path_buf() }
    }

    pub fn set(&self, dir: Dir, flow: Flow) {
        *self.ctl.flow[dir as usize].lock().unwrap() = flow;
        self.ctl.changed.notify_waiters();
    }

    pub fn throttle(&self, dir: Dir, bytes_per_sec: u64) {
        self.ctl.rate[dir as usize].store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Cut the link: every connection closes, and new ones too until heal().
    /// Add `ms` of latency to this direction (each read waits that long).
    pub fn delay(&self, dir: Dir, ms: u64) {
        self.ctl.delay[dir as usize].store(ms, Ordering::SeqCst);
    }

    pub fn reset(&self) {
        apply(&self.ctl, Action::Reset);
    }

    /// Close the connections alive now (new ones are let through).
    pub fn drop_connections(&self) {
        self.ctl.resets.fetch_add(1, Ordering::SeqCst);
        self.ctl.changed.notify_waiters();
    }

    pub fn half_close(&self, dir: Dir) {
        *self.ctl.half_closed[dir as usize].lock().unwrap() = true;
        self.ctl.changed.notify_waiters();
    }

    pub fn apply(&self, a: Action) {
        apply(&self.ctl, a);
    }

    /// Arm a one-shot trigger on the next frame with `tag` in `dir`.
    pub fn on_frame(&self, dir: Dir, tag: u8, action: Action) {
        self.on_nth_frame(dir, tag, 1, action);
    }

    /// Arm a one-shot trigger on the `n`-th frame with `tag` in `dir` (from 1).
    pub fn on_nth_frame(&self, dir: Dir, tag: u8, n: u32, action: Action) {
        self.ctl.triggers.lock().unwrap().push(Trigger { dir, tag, skip: n.saturating_sub(1), action });
    }

    pub fn flip_byte_at(&self, offset: u64) {
        *self.ctl.flip_at.lock().unwrap() = Some(offset);
    }

    /// Bytes forwarded in `dir` so far.
    pub fn bytes(&self, dir: Dir) -> u64 {
        self.ctl.bytes[dir as usize].load(Ordering::SeqCst)
    }

    /// Frame tags seen in `dir` so far.
    pub fn seen(&self, dir: Dir) -> Vec<u8> {
        self.ctl.seen[dir as usize].lock().unwrap().clone()
    }

    /// Back to plain forwarding, for the connections alive and new ones.
    pub fn heal(&self) {
        for d in [Dir::Up, Dir::Down] {
            *self.ctl.flow[d as usize].lock().unwrap() = Flow::Forward;
            *self.ctl.half_closed[d as usize].lock().unwrap() = false;
            self.ctl.rate[d as usize].store(0, Ordering::SeqCst);
            self.ctl.seen[d as usize].lock().unwrap().clear();
        }
        self.ctl.triggers.lock().unwrap().clear();
        *self.ctl.flip_at.lock().unwrap() = None;
        self.ctl.down.store(false, Ordering::SeqCst);
        self.ctl.changed.notify_waiters();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn apply(ctl: &Ctl, a: Action) {
    match a {
        Action::Reset => {
            ctl.down.store(true, Ordering::SeqCst);
            ctl.resets.fetch_add(1, Ordering::SeqCst);
        }
        Action::BlackHole(d) => *ctl.flow[d as usize].lock().unwrap() = Flow::BlackHole,
        Action::Stall(d) => *ctl.flow[d as usize].lock().unwrap() = Flow::Stall,
        Action::HalfClose(d) => *ctl.half_closed[d as usize].lock().unwrap() = true,
    }
    ctl.changed.notify_waiters();
}

/// Frame starts in a byte stream (stream format 4): Up is a 12-byte header
/// then sections (tag:u8 version:u8 len:u64 hcrc:u32 payload[len] pcrc:u32);
/// Down is replies (tag:u8 len:u32 hcrc:u32 payload[len] pcrc:u32).
struct Framer {
    skip: u64,
    hdr: Vec<u8>,
    hdr_len: usize,
    /// Where the length field is in the header.
    len_at: std::ops::Range<usize>,
}

impl Framer {
    fn new(dir: Dir) -> Self {
        use vmm::stream::{REPLY_HEADER_LEN, SECTION_HEADER_LEN};
        match dir {
            Dir::Up => Framer { skip: 12, hdr: Vec::new(), hdr_len: SECTION_HEADER_LEN, len_at: 2..10 },
            Dir::Down => Framer { skip: 0, hdr: Vec::new(), hdr_len: REPLY_HEADER_LEN, len_at: 1..5 },
        }
    }

    /// Offsets in `data` where a frame starts, with its tag.
    fn starts(&mut self, data: &[u8]) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut i = 0usize;
        while i < data.len() {
            if self.skip > 0 {
                let n = (self.skip as usize).min(data.len() - i);
                self.skip -= n as u64;
                i += n;
                continue;
            }
            if self.hdr.is_empty() {
                out.push((i, data[i]));
            }
            self.hdr.push(data[i]);
            i += 1;
            if self.hdr.len() == self.hdr_len {
                let len = self.hdr[self.len_at.clone()].iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
                // The payload and its CRC.
                self.skip = len + 4;
                self.hdr.clear();
            }
        }
        out
    }
}

async fn pump(
    ctl: Arc<Ctl>,
    dir: Dir,
    mut r: tokio::net::unix::OwnedReadHalf,
    mut w: tokio::net::unix::OwnedWriteHalf,
    gen: u64,
    framed: bool,
) {
    let d = dir as usize;
    let mut buf = vec![0u8; 64 << 10];
    let mut framer = Framer::new(dir);
    let mut offset = 0u64;
    loop {
        let changed = ctl.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if ctl.resets.load(Ordering::SeqCst) != gen || ctl.down.load(Ordering::SeqCst) {
            return;
        }
        if *ctl.half_closed[d].lock().unwrap() {
            let _ = w.shutdown().await;
            // Keep reading (and dropping) so the sender does not see an error.
            loop {
                tokio::select! {
                    n = r.read(&mut buf) => if !matches!(n, Ok(n) if n > 0) { return },
                    _ = tokio::time::sleep(Duration::from_millis(20)) => if ctl.resets.load(Ordering::SeqCst) != gen { return },
                }
            }
        }
        let flow = *ctl.flow[d].lock().unwrap();
        if flow == Flow::Stall {
            changed.await;
            continue;
        }
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = w.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = &mut changed => continue,
        };
        let mut data = &mut buf[..n];
        if flow == Flow::BlackHole {
            continue;
        }
        let delay = ctl.delay[d].load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if let Some(at) = *ctl.flip_at.lock().unwrap() {
            if dir == Dir::Up && at >= offset && at < offset + n as u64 {
                data[(at - offset) as usize] ^= 0xff;
            }
        }
        offset += n as u64;
        let mut stop_at = None;
        if framed {
            for (at, tag) in framer.starts(data) {
                ctl.seen[d].lock().unwrap().push(tag);
                let fired = {
                    let mut t = ctl.triggers.lock().unwrap();
                    match t.iter_mut().position(|t| t.dir == dir && t.tag == tag) {
                        Some(i) if t[i].skip > 0 => {
                            t[i].skip -= 1;
                            None
                        }
                        Some(i) => Some(t.remove(i)),
                        None => None,
                    }
                };
                if let Some(t) = fired {
                    stop_at = Some((at, t.action));
                    break;
                }
            }
        }
        if let Some((at, action)) = stop_at {
            if w.write_all(&data[..at]).await.is_err() {
                return;
            }
            ctl.bytes[d].fetch_add(at as u64, Ordering::SeqCst);
            apply(&ctl, action);
            let this_way = match action {
                Action::Reset => true,
                Action::BlackHole(x) | Action::Stall(x) | Action::HalfClose(x) => x == dir,
            };
            if this_way {
                // The frame and the rest of this read never pass (a Stall
                // never resumes for them: heal() resets the connections).
                continue;
            }
            data = &mut data[at..];
        }
        let rate = ctl.rate[d].load(Ordering::SeqCst);
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(data.len() as f64 / rate as f64)).await;
        }
        if w.write_all(data).await.is_err() {
            return;
        }
        ctl.bytes[d].fetch_add(data.len() as u64, Ordering::SeqCst);
    }
}
