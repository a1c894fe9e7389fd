#!/usr/bin/env python3
"""The switchover, baton against real QEMU 10 in the same run.

Each case migrates a guest between two processes on unix sockets and reads
the daemons' own QMP event timestamps (same host clock):

  switchover  source STOP (or, for a guest paused beforehand, MIGRATION
              `device`) -> source MIGRATION `completed`
  to-resume   source STOP -> destination RESUME (running guests: the
              destination runs the guest on its own, no -S)
  total       source MIGRATION `setup` -> `completed`

and, for baton, the median time of each switchover step (query-migrate's
`x-baton-switchover`), the profile the speed work goes by.

Cases: guest memory (64 MiB, 256 MiB) x state (paused beforehand; writing:
baton's guest writes its disk, QEMU's SeaBIOS has no OS and idles, so its
"running" row is idle, labelled so) x disk (shared: the destination opens
the same image inactive; mirrored: libvirt's sequence without
pause-before-switchover, a 128 MiB raw image mirrored over NBD into the
destination's export, READY before `migrate`, `block-job-cancel` after).
QEMU is qemu-system-x86_64 10 (-M pc, KVM, -nodefaults, SeaBIOS, the disk
on virtio-blk). Medians of REPS runs (default 5) and ranges; ratios are
baton / QEMU (below 1: baton is faster).

  cargo build --release
  benches/switchover.py                  # REPS=5
  REPS=3 MEMS=64 benches/switchover.py
"""

import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPS = int(os.environ.get("REPS", "5"))
MEMS = [int(m) for m in os.environ.get("MEMS", "64,256").split(",")]
DISK = int(os.environ.get("DISK_MB", "128")) << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.environ.get("BATON", os.path.join(ROOT, "target", "release", "baton"))
QEMU = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
TIMEOUT = 60


class Monitor:
    def __init__(self, argv, sock, log):
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv)} did not create {sock} (rc={self.proc.poll()})")
            time.sleep(0.02)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(sock)
        self.f = self.s.makefile("r")
        self.f.readline()
        self.replies = queue.Queue()
        self.events = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.ok("qmp_capabilities")

    def _read(self):
        try:
            for line in self.f:
                m = json.loads(line)
                if "event" in m:
                    with self.cond:
                        self.events.append(m)
                        self.cond.notify_all()
                else:
                    self.replies.put(m)
        except (OSError, ValueError):
            pass

    def ok(self, cmd, **args):
        self.s.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        r = self.replies.get(timeout=TIMEOUT)
        if "return" not in r:
            raise RuntimeError(f"{cmd} {args}: {r}")
        return r["return"]

    def wait(self, name, **data):
        def find():
            for e in self.events:
                if e["event"] == name and all((e.get("data") or {}).get(k) == v for k, v in data.items()):
                    return e
            return None
        with self.cond:
            if not self.cond.wait_for(find, timeout=TIMEOUT):
                raise RuntimeError(f"no {name} {data} within {TIMEOUT}s")
            return find()

    def first(self, name, **data):
        for e in self.events:
            if e["event"] == name and all((e.get("data") or {}).get(k) == v for k, v in data.items()):
                return e
        return None

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.s.close()


def ts(e):
    return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6


def argv(peer, side, mem, disk_arg, sock):
    chardev = f"socket,path={sock},server=on,wait=off,id=m"
    if peer == "qemu":
        a = [QEMU, "-M", "pc", "-accel", "kvm", "-m", f"{mem}M", "-nodefaults", "-display", "none",
             "-blockdev", disk_arg, "-device", "virtio-blk-pci,drive=disk", "-chardev", chardev,
             "-mon", "chardev=m,mode=control"]
        return a + (["-incoming", "defer"] if side == "D" else [])
    a = [BATON, "daemon", "--blockdev", disk_arg, "--vm", f"memory={mem}M,disk=disk", "--chardev", chardev,
         "--monitor", "chardev=m"]
    return a + (["--incoming", "defer"] if side == "D" else [])


def one(peer, mem, writing, mirrored, tmp):
    d = tempfile.mkdtemp(dir=tmp)
    for n in ("src.img", "dst.img"):
        with open(os.path.join(d, n), "wb") as f:
            f.truncate(DISK)
    src = f"driver=file,node-name=disk,filename={d}/src.img"
    if mirrored:
        dst = f"driver=file,node-name=disk,filename={d}/dst.img"
    elif peer == "qemu":
        dst = src  # QEMU opens an incoming guest's images inactive
    else:
        dst = src + ",active=off"
    logs = [open(os.path.join(d, f"{s}.log"), "wb") for s in "SD"]
    mons = []
    try:
        dq = Monitor(argv(peer, "D", mem, dst, f"{d}/D.qmp"), f"{d}/D.qmp", logs[1])
        mons.append(dq)
        sq = Monitor(argv(peer, "S", mem, src, f"{d}/S.qmp"), f"{d}/S.qmp", logs[0])
        mons.append(sq)
        for m in (sq, dq):
            m.ok("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        if mirrored:
            dq.ok("nbd-server-start", addr={"type": "unix", "data": {"path": f"{d}/nbd.sock"}})
            dq.ok("block-export-add", type="nbd", id="e", **{"node-name": "disk"}, writable=True, name="disk")
        dq.ok("migrate-incoming", uri=f"unix:{d}/mig.sock")
        if not writing:
            sq.ok("stop")
        if mirrored:
            sq.ok("blockdev-add", driver="nbd", **{"node-name": "tgt"}, server={"type": "unix", "path": f"{d}/nbd.sock"},
                  export="disk")
            sq.ok("blockdev-mirror", **{"job-id": "m0"}, device="disk", target="tgt", sync="full")
            sq.wait("BLOCK_JOB_READY")
        time.sleep(0.3 if writing else 0)
        stops_before = len([e for e in sq.events if e["event"] == "STOP"])
        sq.ok("migrate", uri=f"unix:{d}/mig.sock")
        done = sq.wait("MIGRATION", status="completed")
        setup = sq.first("MIGRATION", status="setup")
        stops = [e for e in sq.events if e["event"] == "STOP"][stops_before:]
        start = stops[0] if stops else sq.first("MIGRATION", status="device")
        r = {"switchover": (ts(done) - ts(start)) * 1000, "total": (ts(done) - ts(setup)) * 1000}
        if peer == "baton":
            r["steps"] = sq.ok("query-migrate").get("x-baton-switchover", {})
            dq.wait("MIGRATION", status="completed")
            r["dsteps"] = dq.ok("query-migrate").get("x-baton-switchover", {})
        if writing:
            resume = dq.wait("RESUME")
            r["to-resume"] = (ts(resume) - ts(start)) * 1000
        if mirrored:
            sq.ok("block-job-cancel", device="m0")
        return r
    finally:
        for m in mons:
            m.close()
        for f in logs:
            f.close()
        shutil.rmtree(d, ignore_errors=True)


def main():
    if not os.access(BATON, os.X_OK):
        print(f"{BATON} not found: cargo build --release", file=sys.stderr)
        return 2
    have_qemu = shutil.which(QEMU) is not None
    tmp = tempfile.mkdtemp(prefix="baton-switchover-")
    rows = []
    try:
        for mem in MEMS:
            for writing in (False, True):
                for mirrored in (False, True):
                    res = {"baton": [], "qemu": []}
                    for _ in range(REPS):
                        for peer in ("baton", "qemu") if have_qemu else ("baton",):
                            res[peer].append(one(peer, mem, writing, mirrored, tmp))
                    rows.append((mem, writing, mirrored, res))
                    print_row(rows[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def med(xs, k):
    v = [x[k] for x in xs if k in x]
    if not v:
        return None
    return statistics.median(v), min(v), max(v)


def fmt(m):
    return "-" if m is None else f"{m[0]:7.1f} ({m[1]:.1f}-{m[2]:.1f})"


def print_row(row):
    mem, writing, mirrored, res = row
    name = f"{mem} MiB, {'running' if writing else 'paused'}, {'mirrored' if mirrored else 'shared'} disk"
    for k in ("switchover", "to-resume", "total"):
        b, q = med(res["baton"], k), med(res["qemu"], k)
        if b is None and q is None:
            continue
        ratio = f"{b[0] / q[0]:.2f}" if b and q and q[0] > 0 else "-"
        qlabel = " (QEMU idles: SeaBIOS)" if writing and q else ""
        print(f"{name:38} {k:11} baton {fmt(b):26} qemu {fmt(q):26} baton/qemu {ratio}{qlabel}", flush=True)
    for key, side in (("steps", "source"), ("dsteps", "destination")):
        steps = [x.get(key, {}) for x in res["baton"]]
        if steps and steps[0]:
            per = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in steps[0]}
            print(f"{'':38} baton's {side} steps (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()),
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
