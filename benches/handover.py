#!/usr/bin/env python3
"""The handover's latencies, measured between two `baton daemon` processes
(release build) on unix sockets, with a mirrored disk, interleaved:

  cancel   migrate_cancel during RAM pre-copy -> status `cancelled` (source
           running again): how prompt a cancel is (the fault matrix proves what
           it stops; this measures how long it takes)
  downtime query-migrate `downtime` of a completed migration (source stop ->
           completed, as the source measures it) and `total-time`
  resolve  a destination left PREPARED by a lost COMMIT (failpoint
           migration::after-commit on the source, so this needs a build with
           --features failpoints; skipped otherwise): x-baton-migrate-decide ->
           destination running

Prints medians and ranges. No peer row: the comparison of the switchover with
QEMU's belongs to the storage-migration issue (benches there).

  cargo build --release [--features failpoints]
  benches/handover.py                      # REPS=5, 64 MiB guest, 128 MiB disk
  REPS=3 MEM=128M benches/handover.py
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPS = int(os.environ.get("REPS", "5"))
MEM = os.environ.get("MEM", "64M")
DISK = int(os.environ.get("DISK_MB", "128")) << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.environ.get("BATON", os.path.join(ROOT, "target", "release", "baton"))


class Qmp:
    def __init__(self, path):
        for _ in range(400):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit(f"cannot reach {path}")
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, command, **args):
        self.f.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{command}: {r['error']['desc']}")
            return r["return"]

    def until(self, name, pred, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = self.cmd(name)
            if pred(v):
                return v
            time.sleep(0.001)
        raise RuntimeError(f"timed out waiting on {name}")


def pair(d):
    for n in ("src.img", "dst.img"):
        with open(os.path.join(d, n), "wb") as f:
            f.truncate(DISK)
    p = lambda n: os.path.join(d, n)
    dst = subprocess.Popen([BATON, "daemon", "--blockdev", f"driver=file,node-name=disk,filename={p('dst.img')}",
                            "--nbd-server", f"addr.type=unix,addr.path={p('nbd.sock')}",
                            "--export", "type=nbd,id=e,node-name=disk,writable=on",
                            "--vm", f"memory={MEM},disk=disk", "--incoming", f"unix:{p('mig.sock')}",
                            "--qmp", f"unix:{p('dq.sock')}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    src = subprocess.Popen([BATON, "daemon", "--blockdev", f"driver=file,node-name=disk,filename={p('src.img')}",
                            "--vm", f"memory={MEM},disk=disk", "--qmp", f"unix:{p('sq.sock')}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sq, dq = Qmp(p("sq.sock")), Qmp(p("dq.sock"))
    sq.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"}, server={"type": "unix", "path": p("nbd.sock")}, export="disk")
    sq.cmd("blockdev-mirror", **{"job-id": "m0"}, device="disk", target="tgt", sync="full")
    sq.until("query-block-jobs", lambda v: v and v[0]["ready"])
    return src, dst, sq, dq


def one(failpoints):
    d = tempfile.mkdtemp(prefix="baton-handover-bench-")
    procs = []
    try:
        src, dst, sq, dq = pair(d)
        procs = [src, dst]
        uri = f"unix:{os.path.join(d, 'mig.sock')}"
        # cancel during pre-copy
        sq.cmd("migrate", uri=uri)
        sq.until("query-migrate", lambda v: v.get("status") == "active" and v["ram"]["transferred"] > 0)
        t0 = time.monotonic()
        sq.cmd("migrate_cancel")
        sq.until("query-migrate", lambda v: v.get("status") == "cancelled")
        cancel = (time.monotonic() - t0) * 1000
        dq.until("query-status", lambda v: v["status"] == "inmigrate")
        # a lost COMMIT, resolved by the operator
        resolve = None
        if failpoints:
            sq.cmd("x-baton-failpoint", name="migration::after-commit", actions="return")
            dq.cmd("migrate-set-parameters", **{"x-baton-commit-timeout": 100})
        sq.cmd("migrate", uri=uri)
        m = sq.until("query-migrate", lambda v: v.get("status") in ("completed", "failed"))
        if m["status"] != "completed":
            raise RuntimeError(f"migration failed: {m.get('error-desc')}")
        if failpoints:
            dq.until("query-migrate", lambda v: v.get("x-baton-handover") == "decision-unknown")
            t0 = time.monotonic()
            dq.cmd("x-baton-migrate-decide", decision="commit")
            dq.until("query-status", lambda v: v["status"] == "running")
            resolve = (time.monotonic() - t0) * 1000
        return cancel, m["downtime"], m["total-time"], resolve
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()
        shutil.rmtree(d, ignore_errors=True)


def main():
    if not os.path.exists("/dev/kvm"):
        sys.exit("needs /dev/kvm")
    if not os.path.exists(BATON):
        sys.exit(f"{BATON} is missing: cargo build --release")
    failpoints = os.environ.get("FAILPOINTS_BUILD") == "1"
    rows = {"cancel (ms)": [], "downtime (ms)": [], "total-time (ms)": [], "resolve (ms)": []}
    for _ in range(REPS):
        c, dt, tt, r = one(failpoints)
        rows["cancel (ms)"].append(c)
        rows["downtime (ms)"].append(dt)
        rows["total-time (ms)"].append(tt)
        if r is not None:
            rows["resolve (ms)"].append(r)
    print(f"baton handover, {REPS} runs, guest {MEM}, disk {DISK >> 20} MiB (mirrored)")
    print(f"{'measure':<18}{'median':>10}{'min':>10}{'max':>10}")
    for k, v in rows.items():
        if v:
            print(f"{k:<18}{statistics.median(v):>10.1f}{min(v):>10.1f}{max(v):>10.1f}")
        else:
            print(f"{k:<18}{'(needs FAILPOINTS_BUILD=1 and a failpoints build)':>30}")


if __name__ == "__main__":
    main()
