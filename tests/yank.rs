#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! QMP `yank` / `query-yank` against a `baton daemon` whose NBD client node
//! talks to a server that stopped answering: QEMU's instance types, classes
//! and descs, all-or-nothing lookup, and a yank from a second monitor that
//! frees a command stuck on the hung connection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Proc, Qmp};
use serde_json::{json, Value};

// NBD protocol numbers the black hole needs (fixed newstyle, NBD_OPT_EXPORT_NAME only).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_EXPORT_NAME: u32 = 1;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const CMD_WRITE: u16 = 1;

/// An NBD server that completes the handshake, then reads every request and
/// answers none. `hung_up` turns true once the client's side is gone.
fn black_hole(sock: &Path) -> Arc<AtomicBool> {
    let listener = UnixListener::bind(sock).unwrap();
    let hung_up = Arc::new(AtomicBool::new(false));
    let flag = hung_up.clone();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = Vec::new();
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).unwrap();
        let mut b4 = [0u8; 4];
        s.read_exact(&mut b4).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            if opt == OPT_EXPORT_NAME {
                s.write_all(&(16u64 << 20).to_be_bytes()).unwrap();
                s.write_all(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes()).unwrap();
                break;
            }
            let mut rep = Vec::new();
            rep.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
            rep.extend_from_slice(&opt.to_be_bytes());
            rep.extend_from_slice(&REP_ERR_UNSUP.to_be_bytes());
            rep.extend_from_slice(&0u32.to_be_bytes());
            s.write_all(&rep).unwrap();
        }
        // Requests: 28-byte headers (type at 6..8, length at 24..28), write payloads.
        let mut hdr = [0u8; 28];
        while s.read_exact(&mut hdr).is_ok() {
            let kind = u16::from_be_bytes([hdr[6], hdr[7]]);
            let len = u32::from_be_bytes(hdr[24..28].try_into().unwrap());
            if kind == CMD_WRITE && std::io::copy(&mut (&mut s).take(u64::from(len)), &mut std::io::sink()).is_err() {
                break;
            }
        }
        flag.store(true, Ordering::SeqCst);
        // Keep our end open: the client must not wait for us.
        std::thread::sleep(Duration::from_secs(600));
        drop(s);
    });
    hung_up
}

fn ok(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = q.execute(cmd, args.clone());
    assert!(r.get("return").is_some(), "{cmd} {args}: {r}");
    r["return"].clone()
}

fn err(q: &mut Qmp, cmd: &str, args: Value) -> (String, String) {
    let r = q.execute(cmd, args.clone());
    let e = r.get("error").unwrap_or_else(|| panic!("{cmd} {args} should fail: {r}"));
    (e["class"].as_str().unwrap().to_string(), e["desc"].as_str().unwrap().to_string())
}

fn yank_node(name: &str) -> Value {
    json!({"instances": [{"type": "block-node", "node-name": name}]})
}

#[test]
fn yank_cuts_a_hung_nbd_node_even_while_another_command_waits_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let qmp_sock = dir.path().join("qmp.sock");
    let nbd_sock = dir.path().join("hole.sock");
    let hung_up = black_hole(&nbd_sock);
    let _daemon = Proc(
        Command::new(env!("CARGO_BIN_EXE_baton"))
            .arg("daemon")
            .arg("--qmp")
            .arg(format!("unix:{}", qmp_sock.display()))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut q = Qmp::connect(&qmp_sock);
    assert_eq!(ok(&mut q, "query-yank", json!({})), json!([]));

    // x-baton-request-timeout: checked, and 0 (no timeout) leaves only yank to end a wait.
    let server = json!({"type": "unix", "path": nbd_sock});
    let (class, desc) = err(
        &mut q,
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "bad", "server": server, "x-baton-request-timeout": -5}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("x-baton-request-timeout"), "{desc}");
    ok(
        &mut q,
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tgt", "server": server, "x-baton-request-timeout": 0}),
    );
    ok(&mut q, "blockdev-add", json!({"driver": "null-co", "node-name": "z"}));
    ok(&mut q, "blockdev-add", json!({"driver": "raw", "node-name": "r", "file": "tgt"}));
    // As QEMU: the nbd node itself, not the filter above it, nor local storage.
    assert_eq!(ok(&mut q, "query-yank", json!({})), json!([{"type": "block-node", "node-name": "tgt"}]));

    // Instances that do not exist: QEMU's class and desc, and nothing is yanked.
    for inst in [
        json!({"type": "block-node", "node-name": "z"}),
        json!({"type": "block-node", "node-name": "r"}),
        json!({"type": "block-node", "node-name": "nope"}),
        json!({"type": "chardev", "id": "mon0"}),
    ] {
        let (class, desc) =
            err(&mut q, "yank", json!({"instances": [{"type": "block-node", "node-name": "tgt"}, inst]}));
        assert_eq!((class.as_str(), desc.as_str()), ("DeviceNotFound", "Instance not found"), "{inst}");
    }
    // No migration runs: its instance does not exist (as QEMU), and nothing else is yanked either.
    let (class, desc) =
        err(&mut q, "yank", json!({"instances": [{"type": "block-node", "node-name": "tgt"}, {"type": "migration"}]}));
    assert_eq!((class.as_str(), desc.as_str()), ("DeviceNotFound", "Instance not found"));
    let (class, desc) = err(&mut q, "yank", json!({"instances": [{"type": "block-node"}]}));
    assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "Parameter 'instances[0].node-name' is missing"));
    let (_, desc) = err(&mut q, "yank", json!({"instances": [{"type": "disk", "node-name": "tgt"}]}));
    assert_eq!(desc, "Parameter 'instances[0].type' does not accept value 'disk'");
    ok(&mut q, "yank", json!({"instances": []}));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!hung_up.load(Ordering::SeqCst), "a failed yank must not cut anything");
    ok(&mut q, "blockdev-del", json!({"node-name": "r"}));

    // Inactivating the node flushes it: the flush never gets an answer, and
    // the command holds the command lock while it waits.
    q.send("blockdev-set-active", json!({"node-name": "tgt", "active": false}));
    std::thread::sleep(Duration::from_millis(500));
    let mut q2 = Qmp::connect(&qmp_sock);
    let t0 = Instant::now();
    ok(&mut q2, "yank", yank_node("tgt"));
    assert!(t0.elapsed() < Duration::from_secs(2), "yank waited {:?} behind the hung command", t0.elapsed());
    let r = q.reply();
    let desc =
        r["error"]["desc"].as_str().unwrap_or_else(|| panic!("the stuck inactivation should fail once yanked: {r}"));
    assert!(desc.contains("'tgt'") && desc.contains("was yanked"), "{desc}");
    assert!(t0.elapsed() < Duration::from_secs(2), "the stuck command ended {:?} after the yank", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !hung_up.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the yank did not shut the socket down");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The instance stays until the node goes, as in QEMU; yanking again is harmless.
    assert_eq!(ok(&mut q2, "query-yank", json!({})), json!([{"type": "block-node", "node-name": "tgt"}]));
    ok(&mut q2, "yank", yank_node("tgt"));
    ok(&mut q2, "blockdev-del", json!({"node-name": "tgt"}));
    assert_eq!(ok(&mut q2, "query-yank", json!({})), json!([]));
    let (class, _) = err(&mut q2, "yank", yank_node("tgt"));
    assert_eq!(class, "DeviceNotFound");
}
