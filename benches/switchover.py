#!/usr/bin/env python3
"""The switchover, baton against real QEMU (Debian 12's 7.2; optionally 10) in the same run.

Each case migrates a guest between two processes on unix sockets and reads
the daemons' own QMP event timestamps (same host clock):

  switchover  source STOP (or, for a guest paused beforehand, MIGRATION
              `device`) -> source MIGRATION `completed`. QEMU 7.2 enters
              `device` only with the pause-before-switchover capability
              (QEMU 10 on every switchover), so for a paused guest 7.2's
              source runs with it and gets `migrate-continue` at once on
              `pre-switchover`; 7.2's `total` then leaves out that wait
              (pre-switchover -> device).
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
destination's export, READY before `migrate`, `block-job-cancel` after;
one command: baton's `migrate` with `x-baton-storage: copy`, which does
all of that itself, against QEMU's libvirt sequence, its only way. baton's
`total` there includes copying the disk, QEMU's does not: its mirror is
READY before `migrate`).

The peers, each column labelled with the version the binary reports:

  baton      $BATON (default target/release/baton)
  qemu 7.2   Debian 12's qemu-system-x86 7.2, unpacked beside the installed
             QEMU (whose packages it conflicts with): $QEMU72, else the
             wrapper benches/qemu-7.2.sh prints (it fetches and unpacks the
             .debs into target/qemu-7.2 once, installing nothing). If 7.2
             cannot be had the run says why and goes on without it.
  qemu 10    only with QEMU10=1: the installed qemu-system-x86_64 (or
             $QEMU_SYSTEM), off by default to keep the run short.

QEMU runs -M pc, KVM, -nodefaults, SeaBIOS, the disk on virtio-blk; the QMP
commands used (migrate-incoming, nbd-server-start on a unix socket,
block-export-add, blockdev-mirror) are the same in 7.2 and 10. Medians of
REPS runs (default 5) and ranges; ratios are baton / QEMU 7.2 (below 1:
baton is faster), or baton / QEMU 10 when 7.2 is missing.

  cargo build --release
  benches/switchover.py                  # REPS=5
  REPS=3 MEMS=64 benches/switchover.py
  DISKS=copy benches/switchover.py       # shared, mirrored, copy (default all three)
  QEMU72=/path/to/qemu-system-x86_64 QEMU10=1 benches/switchover.py
"""

import json
import os
import queue
import re
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
DISKS = os.environ.get("DISKS", "shared,mirrored,copy").split(",")
DISK = int(os.environ.get("DISK_MB", "128")) << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.environ.get("BATON", os.path.join(ROOT, "target", "release", "baton"))
QEMU10 = os.environ.get("QEMU10", "0") not in ("", "0")
QEMU_SYSTEM = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
TIMEOUT = 60


class Peer:
    """One side of the comparison: baton or a QEMU binary of a known version."""

    def __init__(self, kind, path, version=None):
        self.kind = kind  # "baton" or "qemu"
        self.path = path
        self.version = version  # (major, minor) for QEMU
        self.label = "baton" if kind == "baton" else f"qemu {version[0]}.{version[1]}"
        # QEMU 10 enters MIGRATION `device` on every switchover, 7.2 only
        # with pause-before-switchover.
        self.device_needs_pause = kind == "qemu" and version < (10, 0)


def qemu_version(path):
    """(major, minor) from `path --version`, or an error string."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    except OSError as e:
        return f"{path}: {e.strerror}"
    m = re.match(r"QEMU emulator version (\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        return f"{path} --version (rc={out.returncode}): {(out.stdout + out.stderr).strip()[:300]}"
    return int(m[1]), int(m[2])


def qemu72():
    """The QEMU 7.2 peer, or an error string saying why there is none."""
    path = os.environ.get("QEMU72")
    if not path:
        script = os.path.join(ROOT, "benches", "qemu-7.2.sh")
        print(f"QEMU 7.2: {script} ...", file=sys.stderr, flush=True)
        try:  # its progress goes to our stderr
            out = subprocess.run([script], stdout=subprocess.PIPE, text=True)
        except OSError as e:
            return f"{script}: {e.strerror}"
        if out.returncode != 0:
            return f"{script} failed (rc={out.returncode}), see its messages above"
        path = out.stdout.strip()
    v = qemu_version(path)
    if isinstance(v, str):
        return v
    if v != (7, 2):
        return f"{path} is QEMU {v[0]}.{v[1]}, not 7.2"
    return Peer("qemu", path, v)


def qemu10():
    """The installed QEMU (10), or an error string."""
    path = shutil.which(QEMU_SYSTEM)
    if path is None:
        return f"{QEMU_SYSTEM} not found"
    v = qemu_version(path)
    return v if isinstance(v, str) else Peer("qemu", path, v)


class Monitor:
    def __init__(self, argv, sock, log):
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv)} did not create {sock} (rc={self.proc.poll()})")
            time.sleep(0.02)
        while True:  # the file appears at bind(), a moment before listen()
            self.s = socket.socket(socket.AF_UNIX)
            try:
                self.s.connect(sock)
                break
            except ConnectionRefusedError:
                self.s.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
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
    if peer.kind == "qemu":
        a = [peer.path, "-M", "pc", "-accel", "kvm", "-m", f"{mem}M", "-nodefaults", "-display", "none",
             "-blockdev", disk_arg, "-device", "virtio-blk-pci,drive=disk", "-chardev", chardev,
             "-mon", "chardev=m,mode=control"]
        return a + (["-incoming", "defer"] if side == "D" else [])
    a = [peer.path, "daemon", "--blockdev", disk_arg, "--vm", f"memory={mem}M,disk=disk", "--chardev", chardev,
         "--monitor", "chardev=m"]
    return a + (["--incoming", "defer"] if side == "D" else [])


def one(peer, mem, writing, disk, tmp):
    # disk: "shared", "mirrored" (libvirt's sequence) or "copy" (baton's one
    # command; QEMU, which has none, runs libvirt's sequence).
    copy = disk == "copy" and peer.kind == "baton"
    mirrored = disk != "shared" and not copy
    d = tempfile.mkdtemp(dir=tmp)
    for n in ("src.img", "dst.img"):
        with open(os.path.join(d, n), "wb") as f:
            f.truncate(DISK)
    src = f"driver=file,node-name=disk,filename={d}/src.img"
    if copy:
        dst = f"driver=file,node-name=disk,filename={d}/dst.img,active=off"
    elif mirrored:
        dst = f"driver=file,node-name=disk,filename={d}/dst.img"
    elif peer.kind == "qemu":
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
        pause = not writing and peer.device_needs_pause
        if pause:
            sq.ok("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": True}])
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
        sq.ok("migrate", uri=f"unix:{d}/mig.sock", **({"x-baton-storage": "copy"} if copy else {}))
        waited = 0.0
        if pause:
            pre = sq.wait("MIGRATION", status="pre-switchover")
            sq.ok("migrate-continue", state="pre-switchover")
            waited = ts(sq.wait("MIGRATION", status="device")) - ts(pre)
        done = sq.wait("MIGRATION", status="completed")
        setup = sq.first("MIGRATION", status="setup")
        stops = [e for e in sq.events if e["event"] == "STOP"][stops_before:]
        start = stops[0] if stops else sq.first("MIGRATION", status="device")
        if start is None or setup is None:
            raise RuntimeError(f"{peer.label}: no STOP/`device` or no `setup` event on the source: "
                               + ", ".join(e["event"] + " " + str((e.get("data") or {}).get("status", ""))
                                           for e in sq.events))
        r = {"switchover": (ts(done) - ts(start)) * 1000, "total": (ts(done) - ts(setup) - waited) * 1000}
        if peer.kind == "baton":
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
    peers = [Peer("baton", BATON)]
    for name, find, wanted in (("QEMU 7.2", qemu72, True), ("QEMU 10", qemu10, QEMU10)):
        if not wanted:
            continue
        p = find()
        if isinstance(p, str):
            print(f"{name} left out: {p}", file=sys.stderr, flush=True)
        elif any(q.label == p.label for q in peers):
            print(f"{name} left out: {p.path} is {p.label} again", file=sys.stderr, flush=True)
        else:
            peers.append(p)
    qemus = [p for p in peers if p.kind == "qemu"]
    ref = qemus[0] if qemus else None  # the ratios' denominator: 7.2 when it is there
    for p in peers:
        print(f"{p.label:10} {p.path}", flush=True)
    print(f"REPS={REPS}, medians (min-max) in ms", flush=True)
    tmp = tempfile.mkdtemp(prefix="baton-switchover-")
    rows = []
    try:
        for mem in MEMS:
            for writing in (False, True):
                for disk in DISKS:
                    res = {p.label: [] for p in peers}
                    for _ in range(REPS):
                        for p in peers:
                            res[p.label].append(one(p, mem, writing, disk, tmp))
                    rows.append((mem, writing, disk, res))
                    print_row(rows[-1], ref)
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


def print_row(row, ref):
    mem, writing, disk, res = row
    kind = {"shared": "shared disk", "mirrored": "mirrored disk", "copy": "one command"}[disk]
    name = f"{mem} MiB, {'running' if writing else 'paused'}, {kind}"
    for k in ("switchover", "to-resume", "total"):
        m = {label: med(xs, k) for label, xs in res.items()}
        if all(v is None for v in m.values()):
            continue
        cols = " ".join(f"{label} {fmt(v):26}" for label, v in m.items())
        b, q = m["baton"], (m[ref.label] if ref else None)
        ratio = f"  baton/{ref.label} {b[0] / q[0]:.2f}" if b and q and q[0] > 0 else ""
        note = " (QEMU idles: SeaBIOS)" if writing and ref else ""
        print(f"{name:38} {k:11} {cols}{ratio}{note}", flush=True)
    for key, side in (("steps", "source"), ("dsteps", "destination")):
        steps = [x.get(key, {}) for x in res["baton"]]
        if steps and steps[0]:
            per = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in steps[0]}
            print(f"{'':38} baton's {side} steps (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()),
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
