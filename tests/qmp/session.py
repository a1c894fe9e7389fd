#!/usr/bin/env python3
"""A whole QMP session against `baton daemon --qmp unix:SOCK`, driven by the
Python `qemu.qmp` library (the client libvirt-like tools and iotests use).

Covers: greeting and query-version, the monitor socket's mode (0600),
blockdev-add (file + raw), block-dirty-bitmap-add, nbd-server-start,
block-export-add with `bitmaps`, writes through qemu-io over NBD, the dirty
bitmap read back with `nbdinfo --map=qemu:dirty-bitmap:b0` (exactly the
written 64 KiB granules), blockdev-set-active refused on an exported node
(GenericError, as QSD), block-export-del -> BLOCK_EXPORT_DELETED,
inactivate/reactivate seen in query-named-block-nodes, and `quit` (exit 0,
socket removed).

Env: BATON = path of the baton binary. Exit status 0 = pass.
"""

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

try:
    from qemu.qmp import ExecuteError, QMPClient
except ImportError:
    print("FAIL: the Python qemu.qmp library is missing: python3 -m pip install qemu.qmp")
    sys.exit(1)

BATON = os.environ.get("BATON")
GRAN = 64 * 1024
SIZE = 64 * 1024 * 1024
TIMEOUT = 10

failures = []


def check(cond, msg):
    if cond:
        print(f"ok   {msg}")
    else:
        print(f"FAIL {msg}")
        failures.append(msg)
    return cond


def run(cmd, timeout=TIMEOUT):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    # drop qemu-io's timing lines ("512 bytes, 1 ops; 00.00 sec (...)")
    out = "\n".join(x for x in (r.stdout + r.stderr).splitlines() if " ops; " not in x)
    return r.returncode, out


def wait_for(path, proc, what):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"baton exited with {proc.returncode} before creating {what} {path}")
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what} {path}")


def parse_map(out):
    """nbdinfo --map lines: OFFSET LENGTH TYPE DESCRIPTION -> [(off, len, type)]."""
    extents = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            extents.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return extents


def nodes_by_name(nodes):
    return {n["node-name"]: n for n in nodes}


async def session(tmp, proc, qmp_sock, img):
    nbd_sock = os.path.join(tmp, "nbd.sock")
    uri = f"nbd+unix:///r?socket={nbd_sock}"

    mode = stat.S_IMODE(os.stat(qmp_sock).st_mode)
    check(mode == 0o600, f"QMP socket mode is 0600 (got {mode:o})")

    qmp = QMPClient("baton-session-test")
    await asyncio.wait_for(qmp.connect(qmp_sock), TIMEOUT)

    async def x(cmd, args=None):
        return await asyncio.wait_for(qmp.execute(cmd, args), TIMEOUT)

    # --- greeting and version ---
    g = qmp.greeting
    check(g is not None, "greeting received")
    gv = g.QMP.version
    check(gv.get("qemu") == {"major": 10, "minor": 0, "micro": 2},
          f"greeting says QEMU 10.0.2 (got {gv.get('qemu')})")
    check(isinstance(gv.get("package"), str), "greeting version has a string 'package'")
    check(isinstance(g.QMP.capabilities, list), "greeting capabilities is a list")
    v = await x("query-version")
    check(v == dict(gv), f"query-version equals the greeting version ({v} vs {dict(gv)})")

    # --- nodes, bitmap, NBD export with the bitmap ---
    check(await x("blockdev-add", {"driver": "file", "node-name": "f", "filename": img}) == {},
          "blockdev-add file node f")
    check(await x("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}) == {},
          "blockdev-add raw node r over f")
    check(await x("block-dirty-bitmap-add", {"node": "r", "name": "b0"}) == {},
          "block-dirty-bitmap-add r/b0")
    nodes = nodes_by_name(await x("query-named-block-nodes"))
    bms = nodes.get("r", {}).get("dirty-bitmaps", [])
    check([(b["name"], b["granularity"], b["count"], b["recording"]) for b in bms] == [("b0", GRAN, 0, True)],
          f"r has bitmap b0, granularity 64 KiB, empty, recording (got {bms})")
    check(await x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}}) == {},
          "nbd-server-start on a unix socket")
    check(await x("block-export-add", {"type": "nbd", "id": "e", "node-name": "r",
                                      "writable": True, "bitmaps": ["b0"]}) == {},
          "block-export-add writable with bitmaps [b0]")
    exports = await x("query-block-exports")
    check(exports == [{"type": "nbd", "id": "e", "node-name": "r", "shutting-down": False}],
          f"query-block-exports lists e (got {exports})")

    # --- writes at known offsets through qemu-io over NBD ---
    writes = [
        (0, 512),                     # granule 0
        (1024 * 1024 + 100, 4096),    # granule 16
        (10 * 1024 * 1024 - 512, 1024),  # granules 159 and 160 (crosses a boundary)
        (SIZE - 4096, 4096),          # last granule, 1023
    ]
    expected = set()
    for off, ln in writes:
        rc, out = run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {off} {ln}", uri])
        check(rc == 0 and "wrote" in out, f"qemu-io write {off} {ln} over NBD (rc={rc}: {out.strip()})")
        expected.update(range(off // GRAN, (off + ln - 1) // GRAN + 1))
    for off, ln in writes:
        rc, out = run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x5a {off} {ln}", uri])
        check(rc == 0 and "Pattern verification failed" not in out,
              f"qemu-io reads back {off} {ln} (rc={rc}: {out.strip()})")

    rc, out = run(["nbdinfo", f"--map=qemu:dirty-bitmap:b0", uri])
    check(rc == 0, f"nbdinfo --map=qemu:dirty-bitmap:b0 works (rc={rc}: {out.strip()[:300]})")
    extents = parse_map(out)
    covered = sum(ln for _, ln, _ in extents)
    check(covered == SIZE, f"the dirty-bitmap map covers the whole export ({covered} of {SIZE} bytes)")
    dirty = set()
    misaligned = []
    for off, ln, typ in extents:
        if typ & 1:
            if off % GRAN or ln % GRAN:
                misaligned.append((off, ln))
            dirty.update(range(off // GRAN, (off + ln + GRAN - 1) // GRAN))
    check(not misaligned, f"dirty extents are granule-aligned ({misaligned})")
    check(dirty == expected,
          f"exactly the written granules are dirty: expected {sorted(expected)}, got {sorted(dirty)}")
    nodes = nodes_by_name(await x("query-named-block-nodes"))
    bms = nodes.get("r", {}).get("dirty-bitmaps", [])
    count = bms[0]["count"] if bms else None
    check(count == len(expected) * GRAN, f"query-named-block-nodes count = {len(expected) * GRAN} (got {count})")

    # --- an exported node (writable, no allow-inactive) refuses inactivation, as QSD ---
    try:
        await x("blockdev-set-active", {"node-name": "r", "active": False})
        check(False, "blockdev-set-active r false on an exported node must fail")
    except ExecuteError as e:
        check(e.error_class == "GenericError",
              f"blockdev-set-active on an exported node -> GenericError (got {e.error_class}: {e})")
        check(bool(str(e.error.error.desc)), "the error has a non-empty desc")
    nodes = nodes_by_name(await x("query-named-block-nodes"))
    check(nodes["r"]["active"] is True and nodes["f"]["active"] is True,
          "after the refused inactivation both nodes are still active")
    rc, out = run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 512", uri])
    check(rc == 0 and "wrote" in out, f"the export still accepts writes ({out.strip()})")

    # --- block-export-del -> BLOCK_EXPORT_DELETED ---
    check(await x("block-export-del", {"id": "e"}) == {}, "block-export-del e")
    try:
        ev = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
        check(ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "e"},
              f"BLOCK_EXPORT_DELETED for e (got {dict(ev)})")
        ts = ev.get("timestamp", {})
        check(isinstance(ts.get("seconds"), int) and isinstance(ts.get("microseconds"), int)
              and abs(ts["seconds"] - time.time()) < 60,
              f"event timestamp is current ({ts})")
    except asyncio.TimeoutError:
        check(False, "BLOCK_EXPORT_DELETED event received")
    check(await x("query-block-exports") == [], "no exports left")

    # --- inactivate, reactivate ---
    check(await x("blockdev-set-active", {"node-name": "r", "active": False}) == {},
          "blockdev-set-active r false once the export is gone")
    nodes = nodes_by_name(await x("query-named-block-nodes"))
    check((nodes["r"]["active"], nodes["f"]["active"]) == (False, False),
          f"r and f inactive (got r={nodes['r']['active']}, f={nodes['f']['active']})")
    check(await x("blockdev-set-active", {"node-name": "r", "active": True}) == {},
          "blockdev-set-active r true")
    nodes = nodes_by_name(await x("query-named-block-nodes"))
    check((nodes["r"]["active"], nodes["f"]["active"]) == (True, True),
          f"r and f active again (got r={nodes['r']['active']}, f={nodes['f']['active']})")

    # --- quit ---
    check(await x("quit") == {}, "quit returns {}")
    await qmp.disconnect()
    try:
        rc = proc.wait(TIMEOUT)
        check(rc == 0, f"baton exits 0 after quit (got {rc})")
    except subprocess.TimeoutExpired:
        check(False, "baton exits after quit")
    check(not os.path.exists(qmp_sock), "the QMP socket file is removed on exit")
    check(not os.path.exists(nbd_sock), "the NBD socket file is removed on exit")
    # what went through the export is on disk (the last write put 0x11 over the first 512 bytes)
    with open(img, "rb") as f:
        for off, ln in writes:
            f.seek(off)
            data = f.read(ln)
            want = b"\x11" * 512 + b"\x5a" * (ln - 512) if off == 0 else b"\x5a" * ln
            check(data == want, f"the image holds the data written at {off} (+{ln})")


def main():
    if not BATON or not os.access(BATON, os.X_OK):
        print(f"FAIL: set BATON to the baton binary (got {BATON!r})")
        return 1
    for tool in ("qemu-io", "nbdinfo"):
        if not shutil.which(tool):
            print(f"FAIL: {tool} not found")
            return 1
    tmp = tempfile.mkdtemp(prefix="baton-qmp-session-")
    qmp_sock = os.path.join(tmp, "qmp.sock")
    img = os.path.join(tmp, "img.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    log = open(os.path.join(tmp, "baton.log"), "wb")
    proc = subprocess.Popen([BATON, "daemon", "--qmp", f"unix:{qmp_sock}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(qmp_sock, proc, "QMP socket")
        asyncio.run(asyncio.wait_for(session(tmp, proc, qmp_sock, img), 60))
    except Exception as e:  # noqa: BLE001 - any crash is a failure with a message
        failures.append(f"exception: {type(e).__name__}: {e}")
        print(f"FAIL exception: {type(e).__name__}: {e}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        log.close()
        with open(os.path.join(tmp, "baton.log"), "rb") as f:
            blog = f.read().decode(errors="replace")
        if failures and blog.strip():
            print("---- baton output ----")
            print(blog[-4000:])
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"\nsession.py: {len(failures)} failure(s):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\nsession.py: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
