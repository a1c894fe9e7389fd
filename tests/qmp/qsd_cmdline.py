#!/usr/bin/env python3
"""qemu-storage-daemon's own command line, verbatim, given to `baton daemon`:

  --blockdev driver=file,node-name=f,filename=IMG
  --blockdev driver=raw,node-name=r,file=f
  --nbd-server addr.type=unix,addr.path=NBD
  --export type=nbd,id=e,node-name=r,writable=on
  --chardev socket,path=QMP,server=on,wait=off,id=m --monitor chardev=m
  [--pidfile PID] [--daemonize]

Each run is done with qemu-storage-daemon and with baton, and the
observations are compared: `nbdinfo --list` (export name, size,
is_read_only, can_multi_conn, can_trim, can_zero, and every other reported
line except the URI), qemu-io writes and pattern-checked reads through the
export, the data on disk afterwards, QMP (query-block-exports,
query-named-block-nodes, quit), the exit status, the pidfile (our pid in the
foreground; the daemon's pid with --daemonize, whose foreground process must
exit 0 only once the sockets are up) and its removal at exit.

Env: BATON = path of the baton binary. Exit status 0 = pass.
"""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BATON = os.environ.get("BATON")
TIMEOUT = 10
SIZE = 64 * 1024 * 1024

failures = []
started_pids = []  # (pid, dir) of daemonized processes, killed at the end if still alive


def check(cond, msg, quiet=False):
    if not cond or not quiet:
        print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        failures.append(msg)
    return cond


def run(cmd, timeout=TIMEOUT):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, (r.stdout + r.stderr).strip()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def ours(pid, d):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return d.encode() in f.read()
    except OSError:
        return False


def parse_nbdinfo_list(out):
    """-> {export name: {key: value}} from `nbdinfo --list` text."""
    exports, cur = {}, None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("export=") and s.endswith(":"):
            cur = json.loads(s[len("export="):-1])
            exports[cur] = {}
        elif cur is not None and ":" in s and line.startswith("\t") and not line.startswith("\t\t"):
            k, v = s.split(":", 1)
            exports[cur][k.strip()] = v.strip()
        elif cur is not None and line.startswith("\t\t"):
            exports[cur].setdefault("contexts", "")
            exports[cur]["contexts"] += s + " "
    return exports


class QMP:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
        self.greeting = self.line()
        self.events = []

    def line(self):
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no QMP message")
            r, _, _ = select.select([self.s], [], [], left)
            if r:
                c = self.s.recv(65536)
                if not c:
                    raise ConnectionError("QMP connection closed")
                self.buf += c
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None):
        m = {"execute": name}
        if args is not None:
            m["arguments"] = args
        self.s.sendall(json.dumps(m).encode() + b"\n")
        while True:
            r = self.line()
            if "event" in r:
                self.events.append(r)
            else:
                return r

    def drain(self):
        """Everything until the server closes the connection."""
        out = []
        try:
            while True:
                out.append(self.line())
        except (ConnectionError, TimeoutError, OSError):
            pass
        return out


def wait_path(path, proc=None):
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


def session(tag, argv0, tmp, daemonize):
    """Start with QSD's command line, observe, quit. Returns observations."""
    d = os.path.join(tmp, f"{tag}-{'daemonize' if daemonize else 'fg'}")
    os.makedirs(d)
    img, nbd, qmp, pidf = (os.path.join(d, n) for n in ("img.raw", "nbd.sock", "qmp.sock", "pid"))
    with open(img, "wb") as f:
        f.truncate(SIZE)
    argv = argv0 + [
        "--blockdev", f"driver=file,node-name=f,filename={img}",
        "--blockdev", "driver=raw,node-name=r,file=f",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=e,node-name=r,writable=on",
        "--chardev", f"socket,path={qmp},server=on,wait=off,id=m",
        "--monitor", "chardev=m",
        "--pidfile", pidf,
    ]
    obs = {}
    proc = None
    log = open(os.path.join(d, "log"), "wb")
    name = f"{tag} {'--daemonize' if daemonize else 'foreground'}"
    try:
        if daemonize:
            fg = subprocess.run(argv + ["--daemonize"], stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT)
            obs["foreground exit status"] = fg.returncode
            obs["sockets and pidfile exist when the foreground exits"] = all(
                os.path.exists(p) for p in (nbd, qmp, pidf))
            pid = int(open(pidf).read().strip()) if os.path.exists(pidf) else None
            if pid:
                started_pids.append((pid, d))
            obs["pidfile names a live background process"] = bool(pid) and alive(pid) and ours(pid, d)
        else:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            wait_path(qmp, proc)
            wait_path(nbd, proc)
            wait_path(pidf, proc)
            pid = int(open(pidf).read().strip() or 0)
            obs["pidfile holds the daemon's pid"] = pid == proc.pid
        obs["qmp socket mode"] = oct(os.stat(qmp).st_mode & 0o777)

        # NBD: the export as nbdinfo sees it
        rc, out = run(["nbdinfo", "--list", f"nbd+unix:///?socket={nbd}"])
        obs["nbdinfo --list rc"] = rc
        ex = parse_nbdinfo_list(out)
        obs["export names"] = sorted(ex)
        for k, v in sorted(ex.get("r", {}).items()):
            if k != "uri":
                obs[f"nbdinfo: {k}"] = v
        uri = f"nbd+unix:///r?socket={nbd}"
        rc, out = run(["qemu-io", "-f", "raw", "-c", "write -P 0xa5 4096 8192", "-c", "write -z 1M 64k", uri])
        obs["qemu-io write rc"] = rc
        rc, out2 = run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0xa5 4096 8192", "-c", "read -P 0 1M 64k", uri])
        obs["qemu-io pattern read rc"] = rc
        obs["qemu-io pattern read verified"] = rc == 0 and "Pattern verification failed" not in out2
        rc, out3 = run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", f"nbd+unix:///?socket={nbd}"])
        obs["default export name '' is refused"] = rc != 0
        if rc == 0 or obs["qemu-io write rc"] or obs["qemu-io pattern read rc"]:
            print(f"     [{name}] qemu-io: {out!r} / {out2!r} / {out3!r}")

        # QMP
        q = QMP(qmp)
        obs["qmp_capabilities"] = q.cmd("qmp_capabilities")
        obs["query-block-exports"] = q.cmd("query-block-exports")
        nodes = q.cmd("query-named-block-nodes").get("return", [])
        obs["nodes (name, drv, active)"] = [(n["node-name"], n["drv"], n["active"]) for n in nodes]
        try:
            r = q.cmd("quit")
            rest = q.drain()
        except (ConnectionError, OSError):
            r, rest = None, []
        if tag == "baton":
            # QSD's reply to quit races with its exit (sometimes the connection is just reset);
            # baton must answer it, and announce the export it deletes on the way out.
            check(r == {"return": {}}, f"[{name}] quit answered {{'return': {{}}}} (got {r})")
            evs = [e.get("event") for e in q.events + rest]
            check("BLOCK_EXPORT_DELETED" in evs, f"[{name}] BLOCK_EXPORT_DELETED for e at quit (events {evs})")
        # exit
        deadline = time.monotonic() + TIMEOUT
        if daemonize:
            while pid and alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            obs["daemon gone after quit"] = not (pid and alive(pid))
        else:
            try:
                obs["exit status after quit"] = proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                obs["exit status after quit"] = "still running"
        obs["pidfile removed at exit"] = not os.path.exists(pidf)
        obs["qmp socket removed at exit"] = not os.path.exists(qmp)
        with open(img, "rb") as f:
            f.seek(4096)
            data = f.read(8192)
        obs["data on disk after exit"] = data == b"\xa5" * 8192
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        lg = open(os.path.join(d, "log"), errors="replace").read().strip()
        if lg:
            obs["_log"] = lg[-2000:]
    return obs


EXPECTED = {
    # what a correct run must show, for both daemons (None: compared only)
    "foreground exit status": 0,
    "sockets and pidfile exist when the foreground exits": True,
    "pidfile names a live background process": True,
    "pidfile holds the daemon's pid": True,
    "nbdinfo --list rc": 0,
    "export names": ["r"],
    "nbdinfo: export-size": "67108864 (64M)",
    "nbdinfo: is_read_only": "false",
    "nbdinfo: can_multi_conn": "true",
    "nbdinfo: can_trim": "true",
    "nbdinfo: can_zero": "true",
    "qemu-io write rc": 0,
    "qemu-io pattern read rc": 0,
    "qemu-io pattern read verified": True,
    "default export name '' is refused": True,
    "qmp_capabilities": {"return": {}},
    "query-block-exports": {"return": [{"node-name": "r", "shutting-down": False, "type": "nbd", "id": "e"}]},
    "nodes (name, drv, active)": [("r", "raw", True), ("f", "file", True)],
    "daemon gone after quit": True,
    "exit status after quit": 0,
    "pidfile removed at exit": True,
    "qmp socket removed at exit": True,
    "data on disk after exit": True,
}


def main():
    if not BATON or not os.access(BATON, os.X_OK):
        print(f"FAIL: set BATON to the baton binary (got {BATON!r})")
        return 1
    qsd = shutil.which("qemu-storage-daemon")
    for tool in ("qemu-storage-daemon", "qemu-io", "nbdinfo"):
        if not shutil.which(tool):
            print(f"FAIL: {tool} not found")
            return 1
    tmp = tempfile.mkdtemp(prefix="baton-qmp-cmdline-")
    try:
        for daemonize in (False, True):
            mode = "--daemonize --pidfile" if daemonize else "foreground --pidfile"
            res = {}
            for tag, argv0 in (("qsd", [qsd]), ("baton", [BATON, "daemon"])):
                try:
                    res[tag] = session(tag, argv0, tmp, daemonize)
                except Exception as e:  # noqa: BLE001
                    res[tag] = {"_exception": f"{type(e).__name__}: {e}"}
            print(f"\n== {mode} ==")
            keys = sorted(set(res["qsd"]) | set(res["baton"]), key=lambda k: (k.startswith("_"), k))
            w = max(len(k) for k in keys)
            print(f"  {'observation':{w}}  {'QSD':30}  baton")
            for k in keys:
                a, b = res["qsd"].get(k, "<absent>"), res["baton"].get(k, "<absent>")
                if k.startswith("_"):
                    continue
                mark = "  " if a == b else "!="
                print(f"{mark}{k:{w}}  {json.dumps(a)[:30]:30}  {json.dumps(b)[:80]}")
            for tag in ("qsd", "baton"):
                if "_exception" in res[tag]:
                    check(False, f"[{tag} {mode}] ran without an exception: {res[tag]['_exception']}")
            # QSD must show what the expectations say (else the test, not baton, is wrong)
            for k, want in EXPECTED.items():
                if k in res["qsd"]:
                    got = res["qsd"][k]
                    if isinstance(want, list) and got and isinstance(got[0], (list, tuple)):
                        got = [tuple(x) for x in got]
                    check(got == want, f"[qsd {mode}] reference shows {k} = {want!r} (got {got!r})", quiet=True)
            for k, want in EXPECTED.items():
                if k not in res["qsd"]:
                    continue
                got = res["baton"].get(k, "<absent>")
                if isinstance(want, list) and isinstance(got, list) and got and isinstance(got[0], (list, tuple)):
                    got = [tuple(x) for x in got]
                check(got == want, f"[baton {mode}] {k} = {want!r} (got {got!r})", quiet=True)
            # every nbdinfo line the same as QSD's
            for k in keys:
                if k.startswith("nbdinfo: ") and k not in EXPECTED:
                    check(res["qsd"].get(k) == res["baton"].get(k),
                          f"[baton {mode}] {k}: same as QSD ({res['qsd'].get(k)!r} vs {res['baton'].get(k)!r})",
                          quiet=True)
            print(f"checked: QSD shows the expected values, baton shows the same ({mode}); failures are listed above")
            if failures:
                for tag in ("qsd", "baton"):
                    if res[tag].get("_log"):
                        print(f"---- {tag} output ----\n{res[tag]['_log']}")
    finally:
        for pid, d in started_pids:
            if alive(pid) and ours(pid, d):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"\nqsd_cmdline.py: {len(failures)} failure(s):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\nqsd_cmdline.py: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
