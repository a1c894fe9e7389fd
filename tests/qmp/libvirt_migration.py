#!/usr/bin/env python3
"""libvirt's QMP sequence for a migration without shared storage, run the
same way against real QEMU 10.0.2 (qemu-system-x86_64 -M none, two
processes) and against baton (two `baton daemon --vm` processes), and
compared:

* every reply and every event is validated against QEMU 10's own QAPI
  schema, read from the QEMU binary (`query-qmp-schema`): members, their
  types, enum values, required members; baton may add `x-baton-` members
  and nothing else;
* baton's replies are compared with QEMU's step by step: the same kind
  (return / error) and error class, and for returns the same key sets,
  recursively;
* each side's migration events (MIGRATION, MIGRATION_PASS, STOP, RESUME,
  BLOCK_JOB_*, BLOCK_EXPORT_DELETED) are compared as a sequence of names
  and statuses.

Run 1 is the whole libvirt sequence: capabilities queried and set on both
sides (events, late-block-activate on the destination, pause-before-
switchover on the source), migrate-set-parameters, nbd-server-start and
block-export-add on the destination, migrate-incoming (the destination was
started with --incoming defer / -incoming defer), blockdev-add of an nbd
node and blockdev-mirror on the source, migrate, block-job-cancel at
pre-switchover, migrate-continue, nbd-server-stop and cont on the
destination. Run 2 is the same up to pre-switchover, where migrate_cancel
ends it, with `migrate` given QEMU 10's `channels` instead of `uri`. Before
run 1, the source and destination are given bad input (values out of
range, unknown capabilities, both or neither of uri/channels,
migrate-incoming where there is no deferred incoming).

Differences listed in allowlist.json ("libvirt-migration") with a reason
are reported but allowed; anything else fails.

Env: BATON = the baton binary; QEMU_SYSTEM (default qemu-system-x86_64).
"""

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conformance import Diffs, short  # noqa: E402 - the same allowlist matching as the QSD comparison

BATON = os.environ.get("BATON")
QEMU = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 30
START_TIMEOUT = 90
MIB = 1 << 20
EVENTS = ("MIGRATION", "MIGRATION_PASS", "STOP", "RESUME", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
          "BLOCK_JOB_CANCELLED", "BLOCK_EXPORT_DELETED")


# ---------------------------------------------------------------- the peers

class Monitor:
    """One QMP connection; a thread files events apart from replies."""

    def __init__(self, tag, argv, sock, log):
        self.tag = tag
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        # A minute and a half to start: a daemon with --vm creates its KVM VM
        # first, and KVM_CREATE_IRQCHIP can wait many seconds for an SRCU
        # grace period on a loaded host (seen: over 30 s under the suite).
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                rc = self.proc.poll()
                if rc is None:
                    self.proc.kill()
                    self.proc.wait()
                raise RuntimeError(f"{tag}: {' '.join(argv)} did not create {sock} (rc={rc})")
            time.sleep(0.02)
        # The file appears at bind(), a moment before listen(): retry a refusal.
        while True:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.s.connect(sock)
                break
            except ConnectionRefusedError:
                self.s.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("r")
        self.greeting = json.loads(self.f.readline())
        self.replies = queue.Queue()
        self.events = queue.Queue()
        self.seen = []  # events handed out so far, in order
        threading.Thread(target=self._read, daemon=True).start()
        self.execute("qmp_capabilities", None)

    def _read(self):
        try:
            for line in self.f:
                m = json.loads(line)
                (self.events if "event" in m else self.replies).put(m)
        except (OSError, ValueError):
            pass
        self.replies.put({"__exception__": "QMP connection closed"})

    def execute(self, cmd, args):
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        try:
            return self.replies.get(timeout=TIMEOUT)
        except queue.Empty:
            return {"__exception__": f"no reply to {cmd} within {TIMEOUT}s"}

    def drain(self):
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        self.seen += out
        return out

    def wait_event(self, name, data):
        got = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                e = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            got.append(e)
            self.seen.append(e)
            if e["event"] == name and all((e.get("data") or {}).get(k) == v for k, v in data.items()):
                return got, True
        return got, False

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self.s.close()
        except OSError:
            pass


class Pair:
    """A source and a destination of one kind (qemu or baton) in `dir`."""

    def __init__(self, kind, dir):
        self.kind = kind
        self.dir = dir
        os.makedirs(dir)
        for name in ("src.img", "dst.img"):
            with open(os.path.join(dir, name), "wb") as f:
                f.truncate(64 * MIB)
        self.logs = []
        self.mons = {}
        for side in ("D", "S"):
            sock = os.path.join(dir, f"{side}.qmp")
            log = open(os.path.join(dir, f"{side}.log"), "wb")
            self.logs.append(log)
            img = os.path.join(dir, "dst.img" if side == "D" else "src.img")
            disk = f"driver=file,node-name=disk,filename={img}"
            chardev = f"socket,path={sock},server=on,wait=off,id=m"
            if kind == "qemu":
                argv = [QEMU, "-M", "none", "-nodefaults", "-display", "none", "-blockdev", disk,
                        "-chardev", chardev, "-mon", "chardev=m,mode=control"]
            else:
                argv = [BATON, "daemon", "--blockdev", disk, "--vm", "memory=64M,disk=disk",
                        "--chardev", chardev, "--monitor", "chardev=m"]
            if side == "D":
                argv += ["-S", "--incoming" if kind == "baton" else "-incoming", "defer"]
            try:
                self.mons[side] = Monitor(f"{kind}/{side}", argv, sock, log)
            except BaseException:
                # Never leave the peer started before this one running.
                self.close()
                raise

    def close(self):
        for m in self.mons.values():
            m.close()
        for log in self.logs:
            log.close()


# ---------------------------------------------------------------- the sequence

def Q(side, cmd, args=None, label=None):
    return dict(op="qmp", side=side, cmd=cmd, args=args, label=label or f"{side} {cmd}")


def W(side, event, **data):
    return dict(op="wait", side=side, event=event, data=data,
                label=f"{side} wait {event}" + (f" {data}" if data else ""))


NBD = "{D}/nbd.sock"
MIG = "{D}/mig.sock"
CAPS_D = [{"capability": "events", "state": True}, {"capability": "late-block-activate", "state": True}]
CAPS_S = [{"capability": "events", "state": True}, {"capability": "pause-before-switchover", "state": True}]
CHANNELS = [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": MIG}}]

BAD_INPUT = [
    Q("S", "migrate-set-parameters", {"downtime-limit": 2000001}, "S downtime-limit out of range"),
    Q("S", "migrate-set-parameters", {"max-bandwidth": -1}, "S max-bandwidth negative"),
    Q("S", "migrate-set-parameters", {"downtime-limit": "fast"}, "S downtime-limit not a number"),
    Q("S", "migrate-set-capabilities", {"capabilities": [{"capability": "no-such-thing", "state": True}]},
      "S unknown capability"),
    Q("S", "migrate-incoming", {"uri": "unix:{D}/nowhere.sock"}, "S migrate-incoming without -incoming defer"),
    Q("S", "migrate", {"uri": "unix:" + MIG, "channels": CHANNELS}, "S migrate with uri and channels"),
    Q("S", "migrate", {}, "S migrate with neither uri nor channels"),
    Q("D", "migrate-incoming", {}, "D migrate-incoming with neither uri nor channels"),
    Q("S", "query-migrate-parameters", label="S parameters unchanged"),
]


def libvirt(migrate_args, cancel):
    """libvirt's order (qemuMigrationDstPrepare, qemuMigrationSrcRun)."""
    steps = [
        Q("D", "query-migrate-capabilities"),
        Q("D", "migrate-set-capabilities", {"capabilities": CAPS_D}),
        Q("D", "nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        Q("D", "block-export-add", {"type": "nbd", "id": "drive-disk0", "node-name": "disk", "writable": True,
                                    "name": "drive-disk0"}),
        Q("D", "migrate-incoming", {"uri": "unix:" + MIG, "exit-on-error": False}),
        Q("S", "query-migrate-capabilities"),
        Q("S", "migrate-set-capabilities", {"capabilities": CAPS_S}),
        Q("S", "migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 1 << 30,
                                          "avail-switchover-bandwidth": 0}),
        Q("S", "query-migrate-parameters"),
        Q("S", "blockdev-add", {"driver": "nbd", "node-name": "migration-disk0-storage",
                                "server": {"type": "unix", "path": NBD}, "export": "drive-disk0"}),
        Q("S", "blockdev-mirror", {"job-id": "drive-disk0", "device": "disk", "target": "migration-disk0-storage",
                                   "sync": "full"}),
        W("S", "BLOCK_JOB_READY"),
        Q("S", "migrate", migrate_args),
        W("S", "MIGRATION", status="pre-switchover"),
        Q("S", "query-migrate", label="S query-migrate at pre-switchover"),
    ]
    if cancel:
        return steps + [
            Q("S", "migrate_cancel"),
            W("S", "MIGRATION", status="cancelled"),
            Q("S", "query-migrate", label="S query-migrate cancelled"),
            Q("S", "block-job-cancel", {"device": "drive-disk0"}),
            W("S", "BLOCK_JOB_COMPLETED"),
            Q("S", "query-status", label="S query-status after the cancel"),
            W("D", "MIGRATION", status="failed"),
            Q("D", "query-migrate", label="D query-migrate failed"),
        ]
    return steps + [
        Q("S", "block-job-cancel", {"device": "drive-disk0"}),
        W("S", "BLOCK_JOB_COMPLETED"),
        Q("S", "migrate-continue", {"state": "pre-switchover"}),
        W("S", "MIGRATION", status="completed"),
        Q("S", "query-migrate", label="S query-migrate completed"),
        W("D", "MIGRATION", status="completed"),
        Q("D", "query-migrate", label="D query-migrate completed"),
        Q("D", "query-status", label="D query-status before cont"),
        Q("D", "nbd-server-stop"),
        Q("D", "cont"),
        Q("D", "query-status", label="D query-status after cont"),
        Q("S", "query-status", label="S query-status after the migration"),
        Q("S", "cont", label="S cont after the migration"),
    ]


RUNS = [
    ("run 1 (completes)", BAD_INPUT + libvirt({"uri": "unix:" + MIG}, cancel=False)),
    ("run 2 (migrate_cancel)", libvirt({"channels": CHANNELS}, cancel=True)),
]


def subst(v, d):
    if isinstance(v, str):
        return v.replace("{D}", d)
    if isinstance(v, list):
        return [subst(x, d) for x in v]
    if isinstance(v, dict):
        return {k: subst(x, d) for k, x in v.items()}
    return v


def run(pair, steps):
    out = []
    for st in steps:
        m = pair.mons[st["side"]]
        r = {"label": st["label"], "step": st, "reply": None, "events": []}
        if st["op"] == "qmp":
            r["reply"] = m.execute(st["cmd"], subst(st["args"], pair.dir))
        else:
            r["events"], found = m.wait_event(st["event"], st["data"])
            if not found:
                r["reply"] = {"__exception__": f"no {st['event']} {st['data']} within {TIMEOUT}s"}
        out.append(r)
        if r["reply"] and "__exception__" in r["reply"]:
            break
    time.sleep(0.3)
    for side, m in pair.mons.items():
        m.drain()
    return out


# ---------------------------------------------------------------- checking

class Schema:
    def __init__(self, entities):
        self.ix = {e["name"]: e for e in entities}

    def ret(self, cmd):
        c = self.ix.get(cmd)
        return c.get("ret-type") if c and c["meta-type"] == "command" else None

    def event(self, name):
        e = self.ix.get(name)
        return e.get("arg-type") if e and e["meta-type"] == "event" else None

    def check(self, v, t, path, problems):
        """Append to `problems` where `v` does not fit QAPI type `t`."""
        if t == "any":
            return
        builtin = {"int": int, "str": str, "bool": bool, "number": (int, float), "null": type(None)}
        if t in builtin or t.startswith(("int", "uint", "size")) and t not in self.ix:
            want = builtin.get(t, int)
            if isinstance(v, bool) and t != "bool" or not isinstance(v, want):
                problems.append(f"{path}: {json.dumps(v)[:40]} is not {t}")
            return
        e = self.ix.get(t)
        if e is None:
            problems.append(f"{path}: type {t} is not in QEMU's schema")
            return
        mt = e["meta-type"]
        if mt == "array":
            if not isinstance(v, list):
                problems.append(f"{path}: not a list")
                return
            for i, x in enumerate(v):
                self.check(x, e["element-type"], f"{path}[{i}]", problems)
        elif mt == "enum":
            if v not in e["values"]:
                problems.append(f"{path}: {json.dumps(v)} is not one of {e['values'][:8]}")
        elif mt == "builtin":
            self.check(v, e["json-type"] if e["json-type"] != "value" else "any", path, problems)
        elif mt == "alternate":
            for m in e["members"]:
                p = []
                self.check(v, m["type"], path, p)
                if not p:
                    return
            problems.append(f"{path}: fits no branch of alternate {t}")
        elif mt == "object":
            if not isinstance(v, dict):
                problems.append(f"{path}: not an object")
                return
            members = list(e.get("members", []))
            tag = e.get("tag")
            if tag and tag in v:
                for var in e.get("variants", []):
                    if var["case"] == v[tag]:
                        members += self.ix[var["type"]].get("members", [])
            names = {m["name"] for m in members}
            for m in members:
                if m["name"] in v:
                    self.check(v[m["name"]], m["type"], f"{path}.{m['name']}", problems)
                elif "default" not in m:
                    problems.append(f"{path}.{m['name']}: required by QEMU's schema, absent")
            for k in v:
                if k not in names and not k.startswith("x-baton-"):
                    problems.append(f"{path}.{k}: not in QEMU's schema")
        else:
            problems.append(f"{path}: meta-type {mt} not handled")


def jtype(v):
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"  # QEMU prints a float that is whole as an integer
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def shape(diffs, step, path, q, b):
    tq, tb = jtype(q), jtype(b)
    if tq != tb:
        diffs.add(step, "type", path, f"{tq} {short(q, 30)}", f"{tb} {short(b, 30)}")
    elif tq == "object":
        for k in sorted(set(q) - set(b)):
            diffs.add(step, "missing-key", f"{path}.{k}", short(q[k], 40), "<absent>")
        for k in sorted(set(b) - set(q)):
            if not k.startswith("x-baton-"):
                diffs.add(step, "extra-key", f"{path}.{k}", "<absent>", short(b[k], 40))
        for k in sorted(set(q) & set(b)):
            shape(diffs, step, f"{path}.{k}", q[k], b[k])
    elif tq == "array" and q and b:
        for i, (x, y) in enumerate(zip(q, b)):
            shape(diffs, step, f"{path}[{i}]", x, y)


def event_sigs(events, problems, who):
    """The events' names and statuses, MIGRATION_PASS aside: how many passes
    pre-copy takes depends on the guest (QEMU's has no RAM here). The passes
    are checked instead: numbered 1, 2, 3... within an attempt, the first
    during setup (before `active`), and one in `device` (the last sync)."""
    out = []
    passes = []
    passes_at_device = 0
    for e in events:
        if e["event"] not in EVENTS:
            continue
        d = e.get("data") or {}
        status = d.get("status")
        if e["event"] == "MIGRATION_PASS":
            passes.append(d.get("pass"))
            continue
        out.append(e["event"] + (json.dumps({"status": status}) if status else ""))
        if e["event"] != "MIGRATION":
            continue
        if status == "setup":
            passes = []
        elif status == "active" and not passes:
            problems.append(f"{who}: no MIGRATION_PASS before 'active'")
        elif status == "device":
            passes_at_device = len(passes)
        elif status == "completed" and len(passes) <= passes_at_device:
            problems.append(f"{who}: no MIGRATION_PASS between 'device' and 'completed'")
        if passes != list(range(1, len(passes) + 1)):
            problems.append(f"{who}: MIGRATION_PASS numbers {passes} do not count from 1")
    return out


def compare(run_name, schema, diffs, problems, rq, rb, qpair, bpair):
    for q, b in zip(rq, rb):
        step = f"{run_name}: {q['label']}"
        st = q["step"]
        for kind, r in (("qemu", q), ("baton", b)):
            rep = r["reply"]
            if rep and "__exception__" in rep:
                problems.append(f"{step}: {kind}: {rep['__exception__']}")
            elif rep and "return" in rep and st["op"] == "qmp":
                t = schema.ret(st["cmd"])
                if t:
                    p = []
                    schema.check(rep["return"], t, "return", p)
                    problems += [f"{step}: {kind} reply: {x}" for x in p]
        if st["op"] != "qmp":
            continue
        qr, br = q["reply"] or {}, b["reply"] or {}
        qk = "return" if "return" in qr else "error" if "error" in qr else "none"
        bk = "return" if "return" in br else "error" if "error" in br else "none"
        if qk != bk:
            diffs.add(step, "kind", "reply", f"{qk} {short(qr.get(qk), 40)}", f"{bk} {short(br.get(bk), 40)}")
        elif qk == "error":
            if qr["error"].get("class") != br["error"].get("class"):
                diffs.add(step, "class", "error", qr["error"].get("class"), br["error"].get("class"))
            if qr["error"].get("desc") != br["error"].get("desc"):
                diffs.add(step, "desc", "error", short(qr["error"].get("desc")), short(br["error"].get("desc")))
        elif qk == "return":
            shape(diffs, step, "return", qr["return"], br["return"])
    if len(rq) != len(rb):
        problems.append(f"{run_name}: QEMU ran {len(rq)} steps, baton {len(rb)}")
    for kind, pair in (("qemu", qpair), ("baton", bpair)):
        for side, m in pair.mons.items():
            for e in m.seen:
                t = schema.event(e["event"])
                if t is None:
                    problems.append(f"{run_name}: {kind} {side} event {e['event']} is not in QEMU's schema")
                elif "data" in e:
                    p = []
                    schema.check(e["data"], t, e["event"], p)
                    problems += [f"{run_name}: {kind} {side} event: {x}" for x in p]
    for side in ("S", "D"):
        # MIGRATION_PASS is the source's (the destination's list is checked without passes).
        checks = problems if side == "S" else []
        sq = event_sigs(qpair.mons[side].seen, checks, f"{run_name}: QEMU {side}")
        sb = event_sigs(bpair.mons[side].seen, checks, f"{run_name}: baton {side}")
        if sq != sb:
            diffs.add(f"{run_name}: {side} events", "events", side, " ".join(sq), " ".join(sb))


def main():
    if not BATON:
        print("BATON is not set", file=sys.stderr)
        return 2
    if not shutil.which(QEMU):
        print(f"{QEMU} is not installed (scripts/test installs qemu-system-x86 10 from bookworm-backports)",
              file=sys.stderr)
        return 2
    with open(os.path.join(HERE, "allowlist.json")) as f:
        allow = json.load(f).get("libvirt-migration", [])
    diffs = Diffs(allow)
    problems = []
    tmp = tempfile.mkdtemp(prefix="baton-libvirt-mig-")
    schema = None
    covered = set()
    try:
        for i, (name, steps) in enumerate(RUNS):
            results = {}
            pairs = {}
            try:
                # Inside the try: a pair that fails to start or to run is closed too.
                for kind in ("qemu", "baton"):
                    pairs[kind] = Pair(kind, os.path.join(tmp, f"{kind}{i}"))
                    if schema is None and kind == "qemu":
                        schema = Schema(pairs[kind].mons["S"].execute("query-qmp-schema", None)["return"])
                    results[kind] = run(pairs[kind], steps)
                compare(name, schema, diffs, problems, results["qemu"], results["baton"], pairs["qemu"],
                        pairs["baton"])
                covered |= {s["cmd"] for s in steps if s["op"] == "qmp"}
                if i == 0:
                    for r in results["baton"]:
                        if r["label"] == "S query-migrate completed" and r["reply"]:
                            print("baton's query-migrate after run 1:\n" + json.dumps(r["reply"].get("return"),
                                                                                   indent=2, sort_keys=True))
            finally:
                for p in pairs.values():
                    p.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"commands covered ({len(covered)}): {', '.join(sorted(covered))}")
    allowed = [r for r in diffs.rows if r[5]]
    bad = [r for r in diffs.rows if not r[5]]
    if allowed:
        print(f"\nallowed differences (allowlist.json, libvirt-migration): {len(allowed)}")
        for r in allowed:
            print(f"  {r[0]} | {r[1]} {r[2]}: QEMU {r[3]} / baton {r[4]}\n      because: {r[5]}")
    unused = [a for i, a in enumerate(allow) if i not in diffs.used]
    for a in unused:
        problems.append(f"allowlist entry no longer needed: {a}")
    if bad:
        print(f"\nMISMATCHES (not in allowlist.json) ({len(bad)}):")
        for r in bad:
            print(f"  {r[0]} | {r[1]} {r[2]}:\n      QEMU  {r[3]}\n      baton {r[4]}")
    if problems:
        print(f"\nPROBLEMS ({len(problems)}):")
        for p in problems:
            print("  " + p)
    if bad or problems:
        print(f"\nlibvirt_migration.py: FAILED ({len(bad)} mismatch(es), {len(problems)} problem(s))")
        return 1
    print("\nlibvirt_migration.py: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
