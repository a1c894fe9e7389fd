#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End-to-end NBD interop: the real `baton serve` binary against the real
//! peers (qemu-io, qemu-img, qemu-nbd, nbdinfo, nbdcopy) and the Rust `nbd`
//! crate as an independent old-style client. The peers are the judges.

mod common;
#[path = "common/nbd.rs"]
mod nbd_common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::require_tools;
use nbd_common::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `baton serve -k DIR/sN.sock ARGS... FILE` (a fresh socket name each time); returns the server and the socket.
fn serve_unix(dir: &Path, file: &Path, args: &[&str]) -> (Server, PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let sock = dir.join(format!("s{}.sock", N.fetch_add(1, Ordering::Relaxed)));
    let mut a = vec!["-k", path_str(&sock)];
    a.extend_from_slice(args);
    a.push(path_str(file));
    let s = Server::start(dir, &a);
    assert!(s.uri.starts_with("nbd+unix:///") && s.uri.contains(path_str(&sock)), "printed URI {:?}", s.uri);
    (s, sock)
}

/// `baton serve -p PORT ARGS... FILE` on a free port; returns the server and the port.
fn serve_tcp(dir: &Path, file: &Path, args: &[&str]) -> (Server, u16) {
    let port = free_port();
    let p = port.to_string();
    let mut a = vec!["-p", p.as_str()];
    a.extend_from_slice(args);
    a.push(path_str(file));
    let s = Server::start(dir, &a);
    assert!(s.uri.starts_with(&format!("nbd://127.0.0.1:{port}")), "printed URI {:?}", s.uri);
    (s, port)
}

/// A deterministic non-repeating byte pattern (so misplaced blocks show).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(data, off).unwrap();
}

// ---------------------------------------------------------------- 1. qemu-io

/// One qemu-io session covering plain, FUA, zero, discard and aio writes,
/// each read back in the same session; then the file is checked after a
/// clean SIGTERM.
fn qemu_io_session_lands_in_file(uri: &str, server: &mut Server, file: &Path) {
    let mut cmds: Vec<String> = vec![
        "write -P 0xab 0 64k".into(),
        "read -P 0xab 0 64k".into(),
        "write -f -P 0xcd 64k 64k".into(),
        "read -P 0xcd 64k 64k".into(),
        "write -z 128k 64k".into(),
        "read -P 0 128k 64k".into(),
        "discard 192k 64k".into(),
        "read -P 0 192k 64k".into(),
    ];
    for i in 0..8u64 {
        cmds.push(format!("aio_write -P {:#x} {}k 4k", i + 1, 256 + 4 * i));
    }
    cmds.push("aio_flush".into());
    for i in 0..8u64 {
        cmds.push(format!("read -P {:#x} {}k 4k", i + 1, 256 + 4 * i));
    }
    cmds.push("read -P 0x77 288k 32k".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(uri, &refs);
    assert!(out.contains("wrote 65536/65536 bytes at offset 0"), "{out}");
    assert!(out.contains("discard 65536/65536 bytes at offset 196608"), "{out}");

    server.stop_ok();
    let data = std::fs::read(file).unwrap();
    assert_eq!(data.len() as u64, M, "the file changed size");
    assert_run(&data, 0, 64 << 10, 0xab);
    assert_run(&data, 64 << 10, 64 << 10, 0xcd);
    assert_run(&data, 128 << 10, 64 << 10, 0);
    assert_run(&data, 192 << 10, 64 << 10, 0);
    for i in 0..8usize {
        assert_run(&data, (256 + 4 * i) << 10, 4 << 10, i as u8 + 1);
    }
    assert_run(&data, 288 << 10, 32 << 10, 0x77);
    assert_run(&data, 320 << 10, (M as usize) - (320 << 10), 0);

    // --discard unmap really punched the discarded range out of the file.
    let map: serde_json::Value =
        serde_json::from_str(&run(tool("qemu-img").args(["map", "--output=json", "-f", "raw", path_str(file)])))
            .unwrap();
    let covering = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s <= 192 * K && 256 * K <= s + l
        })
        .unwrap_or_else(|| panic!("discarded range split into several extents (not a hole): {map}"));
    assert_eq!(covering["data"], false, "discarded range still allocated: {map}");
}

/// 1 MiB image whose 128k..320k holds 0x77, so zeroing and discard must change it.
fn prefilled_image(dir: &Path) -> PathBuf {
    let f = dir.join("served.img");
    image(&f, M, &[(128 * K, 192 << 10, 0x77)]);
    f
}

#[test]
fn qemu_io_over_unix_socket_writes_fua_zeroes_discards_and_aio_reach_the_file() {
    require_tools(&["qemu-io", "qemu-img"]);
    let d = tmp();
    let f = prefilled_image(d.path());
    let (mut s, sock) = serve_unix(d.path(), &f, &["--discard", "unmap"]);
    qemu_io_session_lands_in_file(&unix_uri(&sock, ""), &mut s, &f);
}

#[test]
fn qemu_io_over_tcp_writes_fua_zeroes_discards_and_aio_reach_the_file() {
    require_tools(&["qemu-io", "qemu-img"]);
    let d = tmp();
    let f = prefilled_image(d.path());
    let (mut s, port) = serve_tcp(d.path(), &f, &["--discard", "unmap"]);
    qemu_io_session_lands_in_file(&format!("nbd://127.0.0.1:{port}"), &mut s, &f);
}

// ---------------------------------------------------------------- 2. qemu-img, nbdcopy, nbdinfo

#[test]
fn qemu_img_convert_from_the_export_is_identical_to_the_file() {
    require_tools(&["qemu-img"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, 8 * M, &[]);
    write_at(&f, 0, &pattern(300 << 10, 1));
    write_at(&f, 3 * M + 4 * K, &pattern(1 << 20, 2));
    write_at(&f, 8 * M - 4 * K, &pattern(4 << 10, 3));
    let (mut s, sock) = serve_unix(d.path(), &f, &[]);
    let copy = d.path().join("copy.img");
    run(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &unix_uri(&sock, ""), path_str(&copy)]));
    s.stop_ok();
    let out = run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", path_str(&f), path_str(&copy)]));
    assert!(out.contains("Images are identical"), "{out}");
    assert_eq!(std::fs::read(&f).unwrap(), std::fs::read(&copy).unwrap());
}

#[test]
fn nbdcopy_export_to_file_and_file_to_export_round_trip() {
    require_tools(&["nbdcopy"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, 4 * M, &[]);
    write_at(&f, 64 * K, &pattern(512 << 10, 4));
    write_at(&f, 2 * M, &pattern(64 << 10, 5));
    let (mut s, sock) = serve_unix(d.path(), &f, &[]);
    let uri = unix_uri(&sock, "");

    let out = d.path().join("out.img");
    run(tool("nbdcopy").arg(&uri).arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&f).unwrap(), "export -> file differs");

    let src = d.path().join("src.img");
    image(&src, 4 * M, &[]);
    write_at(&src, 0, &pattern(1 << 20, 6));
    write_at(&src, 3 * M, &pattern(256 << 10, 7));
    run(tool("nbdcopy").arg(&src).arg(&uri));
    s.stop_ok();
    let served = std::fs::read(&f).unwrap();
    assert!(served == std::fs::read(&src).unwrap(), "file -> export: served image differs from the source");
}

#[test]
fn nbdinfo_list_shows_export_name_and_description() {
    require_tools(&["nbdinfo"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, 2 * M, &[]);
    let (_s, sock) = serve_unix(d.path(), &f, &["-x", "disk0", "-D", "the first disk"]);
    let uri = unix_uri(&sock, "");
    let out = run(tool("nbdinfo").arg("--list").arg(&uri));
    assert!(out.contains("export=\"disk0\":"), "{out}");
    assert!(out.contains("description: the first disk"), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&run(tool("nbdinfo").args(["--list", "--json"]).arg(&uri))).unwrap();
    let exports = j["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1, "{j}");
    assert_eq!(exports[0]["export-name"], "disk0", "{j}");
    assert_eq!(exports[0]["description"], "the first disk", "{j}");
    assert_eq!(exports[0]["export-size"], 2 * M, "{j}");
}

#[test]
fn nbdinfo_map_reports_exactly_the_files_data_and_holes() {
    require_tools(&["nbdinfo", "qemu-img"]);
    let d = tmp();
    let f = d.path().join("served.img");
    let size = 4 * M;
    image(&f, size, &[(0, 64 << 10, 0x11), (M, 128 << 10, 0x22), (3 * M + 4 * K, 4 << 10, 0x33)]);
    let (_s, sock) = serve_unix(d.path(), &f, &[]);
    let got = coalesce(&map(&unix_uri(&sock, ""), None));
    let expected: Vec<Extent> = vec![
        (0, 64 * K, 0),
        (64 * K, M - 64 * K, 3),
        (M, 128 * K, 0),
        (M + 128 * K, 2 * M + 4 * K - 128 * K, 3),
        (3 * M + 4 * K, 4 * K, 0),
        (3 * M + 8 * K, size - 3 * M - 8 * K, 3),
    ];
    assert_eq!(got, expected, "base:allocation (0 = data, 3 = hole,zero)");

    // And the same as QEMU's own view of the file.
    let qmap: serde_json::Value =
        serde_json::from_str(&run(tool("qemu-img").args(["map", "--output=json", "-f", "raw", path_str(&f)]))).unwrap();
    let qemu: Vec<Extent> = qmap
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let t = if e["data"] == true { 0 } else { 3 };
            (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), t)
        })
        .collect();
    assert_eq!(got, coalesce(&qemu), "baton's map differs from qemu-img map");
}

#[test]
fn nbdinfo_dirty_bitmap_shows_exactly_the_granules_written() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let d = tmp();
    let f = d.path().join("served.img");
    let size = 2 * M;
    image(&f, size, &[(0, 1 << 20, 0x5c)]);
    let (_s, sock) = serve_unix(d.path(), &f, &["-B", "b0"]);
    let uri = unix_uri(&sock, "");
    let ctx = Some("qemu:dirty-bitmap:b0");
    assert_eq!(coalesce(&map(&uri, ctx)), vec![(0, size, 0)], "a fresh bitmap must be clean");

    qemu_io(
        &uri,
        &[
            "write -P 0x1 0 4k",     // granule 0
            "write -P 0x2 200k 1",   // granule 3 (192k..256k)
            "write -P 0x3 1020k 8k", // granules 15 and 16 (straddles 1M)
            "write -z 1536k 64k",    // granule 24
            "read 512k 64k",         // reads dirty nothing
        ],
    );
    let g = 64 * K;
    let dirty = [0u64, 3, 15, 16, 24];
    let expected = coalesce(&(0..size / g).map(|i| (i * g, g, u32::from(dirty.contains(&i)))).collect::<Vec<_>>());
    assert_eq!(coalesce(&map(&uri, ctx)), expected, "dirty granules (1 = dirty)");
}

#[test]
fn nbdinfo_allocation_depth_and_map_match_qemu_nbd_on_the_same_file() {
    require_tools(&["nbdinfo", "qemu-nbd"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, 4 * M, &[(0, 4 << 10, 1), (512 * K, 300 << 10, 2), (4 * M - 64 * K, 64 << 10, 3)]);
    let maps = |uri: &str| -> (String, String) {
        (run(tool("nbdinfo").arg("--map=qemu:allocation-depth").arg(uri)), run(tool("nbdinfo").arg("--map").arg(uri)))
    };
    let (mut s, sock) = serve_unix(d.path(), &f, &["-A"]);
    let baton = maps(&unix_uri(&sock, ""));
    s.stop_ok();

    let qsock = d.path().join("q.sock");
    let peer = qemu_nbd(&qsock, &["-A"], &f);
    let qemu = maps(&unix_uri(&qsock, ""));
    drop(peer);
    assert!(!baton.0.trim().is_empty());
    assert_eq!(baton.0, qemu.0, "qemu:allocation-depth: baton (left) vs qemu-nbd (right)");
    assert_eq!(baton.1, qemu.1, "base:allocation: baton (left) vs qemu-nbd (right)");
}

// ---------------------------------------------------------------- 3. extended headers

#[test]
fn qemu_io_negotiates_extended_headers_and_io_succeeds() {
    require_tools(&["qemu-io"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    let (mut s, sock) = serve_unix(d.path(), &f, &[]);
    let out =
        output(
            tool("qemu-io")
                .args(["-f", "raw", "--trace", "nbd_receive_option_reply*"])
                .arg(unix_uri(&sock, ""))
                .args(["-c", "write -P 0x5a 4k 8k", "-c", "read -P 0x5a 4k 8k", "-c", "read -P 0 0 4k"]),
        );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success() && !all.contains("failed"), "{all}");
    assert!(all.contains("Received option reply 11 (extended headers), type 1 (ack)"), "{all}");
    assert!(
        all.contains("wrote 8192/8192 bytes at offset 4096") && all.contains("read 8192/8192 bytes at offset 4096"),
        "{all}"
    );
    s.stop_ok();
    let data = std::fs::read(&f).unwrap();
    assert_run(&data, 0, 4096, 0);
    assert_run(&data, 4096, 8192, 0x5a);
}

// ---------------------------------------------------------------- 4. the nbd crate (old EXPORT_NAME handshake)

fn nbd_crate_round_trip<S: Read + Write>(mut conn: S, file: &Path, size: u64) {
    let export = nbd::client::handshake(&mut conn, b"crate").unwrap();
    assert_eq!(export.size, size);
    assert!(!export.readonly);
    assert!(export.send_flush, "flush not advertised");
    let mut c = nbd::client::NbdClient::new(conn, &export);
    let data = pattern(96 << 10, 9);
    c.seek(SeekFrom::Start(12 * K)).unwrap();
    c.write_all(&data).unwrap();
    c.flush().unwrap();
    c.seek(SeekFrom::Start(12 * K)).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).unwrap();
    assert!(back == data, "read back differs from what was written");
    let mut zero = vec![0xffu8; 4096];
    c.seek(SeekFrom::Start(size - 4096)).unwrap();
    c.read_exact(&mut zero).unwrap();
    assert!(zero.iter().all(|&b| b == 0), "unwritten tail not zero");
    drop(c); // hang up without NBD_CMD_DISC

    let on_disk = std::fs::read(file).unwrap();
    assert!(on_disk[12 << 10..(12 << 10) + data.len()] == data[..], "the file does not hold the write");
    assert_run(&on_disk, 0, 12 << 10, 0);
}

#[test]
fn nbd_crate_client_over_tcp_writes_and_reads_back() {
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, 2 * M, &[]);
    let (mut s, port) = serve_tcp(d.path(), &f, &["-x", "crate"]);
    let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    nbd_crate_round_trip(conn, &f, 2 * M);

    // An unknown name in NBD_OPT_EXPORT_NAME: the server hangs up, the session fails.
    let mut bad = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(nbd::client::handshake(&mut bad, b"nope").is_err(), "unknown export name accepted");
    s.stop_ok();
}

#[test]
fn nbd_crate_client_over_unix_socket_writes_and_reads_back() {
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, 2 * M, &[]);
    let (mut s, sock) = serve_unix(d.path(), &f, &["-x", "crate"]);
    let conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    nbd_crate_round_trip(conn, &f, 2 * M);
    s.stop_ok();
}

// ---------------------------------------------------------------- 5. read-only

#[test]
fn read_only_export_refuses_writes_and_serves_reads() {
    require_tools(&["qemu-io", "qemu-img", "nbdinfo"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    write_at(&f, 0, &pattern(128 << 10, 11));
    let before = std::fs::read(&f).unwrap();
    let (mut s, sock) = serve_unix(d.path(), &f, &["-r", "-x", "crate"]);
    let uri = unix_uri(&sock, "crate");

    let info = run(tool("nbdinfo").arg(&uri));
    assert!(info.contains("is_read_only: true"), "{info}");

    // As against qemu-nbd -r: a read-write open is refused ("Permission denied"),
    // and a read-only open refuses every kind of write.
    for cmd in ["write -P 0xee 0 4k", "write -z 0 4k", "discard 0 64k"] {
        for ro in [false, true] {
            let mut c = tool("qemu-io");
            if ro {
                c.arg("-r");
            }
            let out = output(c.args(["-f", "raw", &uri, "-c", cmd]));
            let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(!out.status.success(), "qemu-io (-r: {ro}) {cmd} succeeded on a read-only export:\n{all}");
            let refused = ["Operation not permitted", "Permission denied", "read-only"].iter().any(|m| all.contains(m));
            assert!(refused, "qemu-io (-r: {ro}) {cmd}: {all}");
        }
    }
    // Below qemu's own read-only check: the server itself answers EPERM.
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let export = nbd::client::handshake(&mut conn, b"crate").unwrap();
    assert!(export.readonly, "NBD_FLAG_READ_ONLY not set");
    let mut c = nbd::client::NbdClient::new(conn, &export);
    let err = c.write(&[0xee; 4096]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "write on a read-only export: {err}");
    c.seek(SeekFrom::Start(0)).unwrap();
    let mut back = vec![0u8; 128 << 10];
    c.read_exact(&mut back).unwrap();
    assert!(back[..] == before[..128 << 10], "read-only export reads wrong data");
    drop(c);

    let mut ro = tool("qemu-io");
    ro.args(["-r", "-f", "raw", &uri, "-c", "read 0 128k", "-c", "read -P 0 128k 64k", "-c", "read -P 0 512k 512k"]);
    let out = run(&mut ro);
    assert!(!out.contains("failed"), "{out}");
    let copy = d.path().join("copy.img");
    run(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri, path_str(&copy)]));
    assert!(std::fs::read(&copy).unwrap() == before, "qemu-img convert of the read-only export differs from the file");
    s.stop_ok();
    assert!(std::fs::read(&f).unwrap() == before, "a read-only export changed the file");
}

// ---------------------------------------------------------------- 6. --once, --pid-file, --fork

#[test]
fn once_exits_by_itself_after_the_first_client_disconnects() {
    require_tools(&["nbdinfo"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    let (mut s, sock) = serve_unix(d.path(), &f, &["--once"]);
    assert!(s.wait_exit(Duration::from_millis(300)).is_none(), "--once exited before any client");
    run(tool("nbdinfo").arg(unix_uri(&sock, "")));
    let st = s.wait_exit(Duration::from_secs(5));
    let st = st.unwrap_or_else(|| panic!("--once server still running 5 s after its client left"));
    assert!(st.success(), "--once exit status {st}; stderr:\n{}", s.stderr());
}

#[test]
fn pid_file_holds_the_pid_while_serving_and_is_removed_on_exit() {
    require_tools(&["nbdinfo"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    let pid_file = d.path().join("baton.pid");
    let (mut s, sock) = serve_unix(d.path(), &f, &["--pid-file", path_str(&pid_file)]);
    run(tool("nbdinfo").arg(unix_uri(&sock, "")));
    let content = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(content.trim(), s.pid().to_string(), "pid file content {content:?}");
    s.stop_ok();
    assert!(!pid_file.exists(), "pid file left behind after exit");
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie waiting for a reaper has exited.
        Ok(stat) => stat.rsplit(')').next().map(|r| r.trim_start().starts_with('Z')) != Some(true),
        Err(_) => false,
    }
}

/// Kills a daemonised server (not our child) by pid on drop.
struct PidGuard(Option<u32>);
impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
    }
}

#[test]
fn fork_returns_after_printing_the_uri_and_the_server_keeps_serving() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    let sock = d.path().join("s.sock");
    let pid_file = d.path().join("baton.pid");
    let mut fg = Command::new(BATON)
        .args(["serve", "--fork", "--pid-file", path_str(&pid_file), "-k", path_str(&sock), path_str(&f)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = PidGuard(None);
    let uri = first_line(fg.stdout.take().unwrap());
    // Whatever happens next, do not leave the daemon behind.
    guard.0 = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok());
    let uri = uri.unwrap_or_else(|| panic!("--fork printed no URI"));
    assert!(uri.starts_with("nbd+unix:///"), "{uri}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        if let Some(st) = fg.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the foreground process of --fork did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "--fork foreground exit status {st}");

    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    guard.0 = Some(pid);
    assert_ne!(pid, fg.id(), "the pid file names the foreground process");
    assert!(alive(pid), "the daemon {pid} is not running");
    run(tool("nbdinfo").arg(unix_uri(&sock, "")));
    qemu_io(&unix_uri(&sock, ""), &["write -P 0x3c 0 4k"]);

    assert!(Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the daemon did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    guard.0 = None;
    assert!(!pid_file.exists(), "pid file left behind after the daemon exited");
    assert_run(&std::fs::read(&f).unwrap(), 0, 4096, 0x3c);
}

// ---------------------------------------------------------------- 7. loopback by default

/// LISTEN sockets on `port` in a /proc/net/tcp{,6} table, as hex local addresses.
fn listeners(table: &str, port: u16) -> Vec<String> {
    let suffix = format!(":{port:04X}");
    std::fs::read_to_string(table)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[3] == "0A" && f[1].ends_with(&suffix)).then(|| f[1].to_string())
        })
        .collect()
}

#[test]
fn tcp_listens_on_loopback_only_by_default() {
    require_tools(&["nbdinfo"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    let (_s, port) = serve_tcp(d.path(), &f, &[]);
    run(tool("nbdinfo").arg(format!("nbd://127.0.0.1:{port}")));
    let v4 = listeners("/proc/net/tcp", port);
    let v6 = listeners("/proc/net/tcp6", port);
    assert_eq!(v4, vec![format!("0100007F:{port:04X}")], "IPv4 listeners on {port} (want 127.0.0.1 only); v6: {v6:?}");
    assert!(v6.is_empty(), "IPv6 listeners on {port}: {v6:?}");
}

// ---------------------------------------------------------------- 8. signals

#[test]
fn sigterm_with_a_client_connected_exits_zero_promptly_and_keeps_the_write() {
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    let (mut s, port) = serve_tcp(d.path(), &f, &["-x", "crate"]);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let export = nbd::client::handshake(&mut conn, b"crate").unwrap();
    let mut c = nbd::client::NbdClient::new(conn, &export);
    let data = pattern(64 << 10, 13);
    c.seek(SeekFrom::Start(128 * K)).unwrap();
    c.write_all(&data).unwrap(); // acknowledged, no flush; the client stays connected

    let t = Instant::now();
    s.signal("TERM");
    let st = s.wait_exit(Duration::from_secs(5));
    let st = st.unwrap_or_else(|| panic!("still running 5 s after SIGTERM with a client connected"));
    assert!(st.success(), "exit status {st} after SIGTERM; stderr:\n{}", s.stderr());
    assert!(t.elapsed() < Duration::from_secs(2), "SIGTERM took {:?}", t.elapsed());
    let on_disk = std::fs::read(&f).unwrap();
    assert!(on_disk[128 << 10..192 << 10] == data[..], "the acknowledged write is not in the file");
    drop(c);
}

/// The URI line means "ready": a SIGTERM or SIGINT from then on is a clean
/// shutdown (exit 0, pid file and socket removed), never death by the
/// default action. Repeated because the window is narrow.
#[test]
fn sigterm_or_sigint_right_after_the_uri_line_is_a_clean_exit() {
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    for i in 0..20 {
        let sig = if i % 2 == 0 { "TERM" } else { "INT" };
        let pid_file = d.path().join(format!("baton{i}.pid"));
        let (mut s, sock) = serve_unix(d.path(), &f, &["--pid-file", path_str(&pid_file)]);
        s.signal(sig);
        let st = s.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| panic!("still running 5 s after SIG{sig}"));
        assert!(
            st.success(),
            "round {i}: SIG{sig} right after the URI line: exit status {st}; stderr:\n{}",
            s.stderr()
        );
        assert!(!pid_file.exists(), "round {i}: pid file left behind");
        assert!(!sock.exists(), "round {i}: socket left behind");
    }
}

#[test]
fn sigint_exits_zero_and_keeps_the_write() {
    require_tools(&["qemu-io"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    let (mut s, sock) = serve_unix(d.path(), &f, &[]);
    qemu_io(&unix_uri(&sock, ""), &["write -P 0x99 64k 64k"]);
    s.signal("INT");
    let st = s.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| panic!("still running 5 s after SIGINT"));
    assert!(st.success(), "exit status {st} after SIGINT; stderr:\n{}", s.stderr());
    assert_run(&std::fs::read(&f).unwrap(), 64 << 10, 64 << 10, 0x99);
}

// ---------------------------------------------------------------- 9. multi-conn

fn multi_conn(uri: &str) -> bool {
    let info = run(tool("nbdinfo").arg(uri));
    if info.contains("can_multi_conn: true") {
        true
    } else if info.contains("can_multi_conn: false") {
        false
    } else {
        panic!("no can_multi_conn in:\n{info}")
    }
}

#[test]
fn multi_conn_is_advertised_by_default_and_follows_qemu_nbds_shared_rule() {
    require_tools(&["nbdinfo", "qemu-nbd"]);
    let d = tmp();
    let f = d.path().join("served.img");
    image(&f, M, &[]);
    {
        let (_s, sock) = serve_unix(d.path(), &f, &[]);
        assert!(multi_conn(&unix_uri(&sock, "")), "default: multi-conn not advertised");
    }
    for (i, (args, want)) in
        [(&["-e", "1"][..], false), (&["-e", "2"][..], true), (&["-r", "-e", "1"][..], false)].into_iter().enumerate()
    {
        let (_s, sock) = serve_unix(d.path(), &f, args);
        let baton = multi_conn(&unix_uri(&sock, ""));
        let qsock = d.path().join(format!("q{i}.sock"));
        let _peer = qemu_nbd(&qsock, args, &f);
        let qemu = multi_conn(&unix_uri(&qsock, ""));
        assert_eq!(qemu, want, "qemu-nbd {args:?}");
        assert_eq!(baton, qemu, "can_multi_conn with {args:?}: baton vs qemu-nbd");
    }
}
