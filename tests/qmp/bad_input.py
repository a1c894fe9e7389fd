#!/usr/bin/env python3
"""Bad QMP input over a raw socket (no library): every malformed or invalid
message gets exactly one error reply with the right class and a non-empty
desc, `id` is echoed where QEMU echoes it, and the SAME session then still
answers `query-version`.

Each case carries the reply qemu-storage-daemon 10.0.2 gives (class and,
where known, the exact desc). When qemu-storage-daemon is installed the
script first replays every case against it and fails if the table no longer
matches QSD (so the expectations are QSD's, not baton's). Then it replays
them against `baton daemon` with the same command line. A baton desc that
differs from QSD's fails the case unless `allowlist.json` ("bad_input")
names the case with a reason.

Env: BATON = path of the baton binary. Exit status 0 = pass.
"""

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BATON = os.environ.get("BATON")
HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10
MIB = 1 << 20

NEG = "Expecting capabilities negotiation with 'qmp_capabilities'"
OBJ = "QMP input must be a JSON object"
CNF = "CommandNotFound"
GE = "GenericError"
ABSENT = object()  # the reply must carry no "id"


def case(name, send, kind="error", cls=GE, desc=None, id=ABSENT, baton_only=None, why=""):
    """One bad input.

    send: str or bytes, sent followed by a newline.
    kind/cls: the expected reply ("error" + class, or "return").
    desc: QSD 10.0.2's exact desc (None: not compared).
    id: the id the reply must echo (ABSENT: the reply has no id).
    baton_only: a reason this case is not replayed against QSD.
    """
    return dict(name=name, send=send, kind=kind, cls=cls, desc=desc, id=id, baton_only=baton_only, why=why)


def nested(depth):
    return '{"execute":"query-version","arguments":{"a":' + "[" * depth + "]" * depth + "}}"


# Before qmp_capabilities.
PRE = [
    case("pre-query-version", '{"execute":"query-version"}', cls=CNF, desc=NEG),
    case("pre-query-version-id", '{"execute":"query-version","id":"p2"}', cls=CNF, desc=NEG, id="p2"),
    case("pre-unknown-command", '{"execute":"nosuch-cmd","id":7}', cls=CNF, desc=NEG, id=7),
    case("pre-caps-unknown-arg", '{"execute":"qmp_capabilities","arguments":{"x":1}}', desc="Parameter 'x' is unexpected"),
    case("pre-caps-bad-enable", '{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}',
         desc="Parameter 'null' does not accept value 'bogus'"),
    case("pre-malformed-json", '{"execute":"qmp_capabilities",}', desc="JSON parse error, expecting value"),
]

NEGOTIATE = case("qmp_capabilities", '{"execute":"qmp_capabilities","id":"caps"}', kind="return", id="caps")

# Command mode.
CMD = [
    case("caps-twice", '{"execute":"qmp_capabilities"}', cls=CNF,
         desc="Capabilities negotiation is already complete, command ignored"),
    case("caps-twice-id", '{"execute":"qmp_capabilities","id":{"x":1}}', cls=CNF,
         desc="Capabilities negotiation is already complete, command ignored", id={"x": 1}),
    # malformed JSON (balanced, so QEMU's streamer hands it to the parser)
    case("json-trailing-comma", '{"execute":"query-version",}', desc="JSON parse error, expecting value"),
    case("json-missing-colon", '{"a" 1}', desc="JSON parse error, missing : in object pair"),
    case("json-stray-bracket", "]", desc="JSON parse error, expecting value"),
    case("json-lone-surrogate", '{"execute":"query-version","id":"\\ud800"}',
         desc="JSON parse error, \\ud800 is not a valid Unicode character"),
    case("json-invalid-utf8", b'{"execute":"query-version","id":"\xff"}', desc=None,
         why="QSD answers with two errors (one per bad token); only the first desc is compared"),
    case("json-duplicate-key", '{"execute":"blockdev-del","arguments":{"node-name":"x","node-name":"y"}}',
         desc="JSON parse error, duplicate key"),
    # not an object
    case("non-object-array", "[1]", desc=OBJ),
    case("non-object-string", '"x"', desc=OBJ),
    case("non-object-number", "1", desc=OBJ),
    case("non-object-null", "null", desc=OBJ),
    case("non-object-bool", "true", desc=OBJ),
    # envelope
    case("missing-execute", "{}", desc="QMP input lacks member 'execute'"),
    case("missing-execute-id", '{"id":"c9"}', desc="QMP input lacks member 'execute'", id="c9"),
    case("execute-number", '{"execute":1,"id":"c10"}', desc="QMP input member 'execute' must be a string", id="c10"),
    case("execute-array", '{"execute":["query-version"]}', desc="QMP input member 'execute' must be a string"),
    case("arguments-array", '{"execute":"query-version","arguments":[1],"id":"c12"}',
         desc="QMP input member 'arguments' must be an object", id="c12"),
    case("arguments-string", '{"execute":"query-version","arguments":"x"}',
         desc="QMP input member 'arguments' must be an object"),
    case("unknown-member", '{"execute":"query-version","foo":1,"id":"c14"}',
         desc="QMP input member 'foo' is unexpected", id="c14"),
    case("exec-oob-without-oob", '{"exec-oob":"query-version","id":"o1"}',
         desc="QMP input member 'exec-oob' is unexpected", id="o1"),
    # commands and arguments
    case("unknown-command", '{"execute":"nosuch-cmd","id":{"x":[1,{"y":null}]}}', cls=CNF,
         desc="The command nosuch-cmd has not been found", id={"x": [1, {"y": None}]}),
    case("unknown-command-num-id", '{"execute":"nosuch-cmd","id":42}', cls=CNF,
         desc="The command nosuch-cmd has not been found", id=42),
    case("unknown-argument", '{"execute":"query-version","arguments":{"x":1},"id":16}',
         desc="Parameter 'x' is unexpected", id=16),
    case("missing-argument", '{"execute":"blockdev-del","arguments":{},"id":{"k":"v"}}',
         desc="Parameter 'node-name' is missing", id={"k": "v"}),
    case("missing-argument-active", '{"execute":"blockdev-set-active","arguments":{}}',
         desc="Parameter 'active' is missing"),
    case("missing-nested-argument", '{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix"}}}',
         desc="Parameter 'addr.data' is missing"),
    case("missing-nested-argument-2",
         '{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{}}}}',
         desc="Parameter 'addr.data.path' is missing"),
    case("wrong-type-string", '{"execute":"blockdev-del","arguments":{"node-name":1},"id":"c19"}',
         desc="Invalid parameter type for 'node-name', expected: string", id="c19"),
    case("wrong-type-bool", '{"execute":"blockdev-set-active","arguments":{"active":"yes"}}',
         desc="Invalid parameter type for 'active', expected: boolean"),
    case("wrong-type-object", '{"execute":"nbd-server-start","arguments":{"addr":"x"}}',
         desc="Invalid parameter type for 'addr', expected: object"),
    case("wrong-type-int", '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n","name":"b","granularity":"x"}}',
         desc="Parameter 'granularity' expects uint64"),
    case("bad-enum-value", '{"execute":"block-export-del","arguments":{"id":"x","mode":"bogus"}}',
         desc="Parameter 'mode' does not accept value 'bogus'"),
    # nesting: 200 levels is valid JSON (QEMU's limit is 1024) and reaches the command
    case("nesting-200", nested(200), desc="Parameter 'a' is unexpected"),
    # big messages
    case("message-2MiB", '{"execute":"query-version","id":"' + "x" * (2 * MIB) + '"}',
         baton_only="QSD's limit is 64 MiB; baton's documented limit is 1 MiB (MAX_MESSAGE in src/qmp/monitor.rs)"),
    case("message-1MiB-plus-1KiB", '{"execute":"query-version","id":"' + "x" * (MIB + 1024) + '"}',
         baton_only="a valid message just over baton's 1 MiB limit must be refused too"),
    # ids echoed in return replies
    case("id-string-return", '{"execute":"query-version","id":"s"}', kind="return", id="s"),
    case("id-number-return", '{"execute":"query-version","id":1.5}', kind="return", id=1.5),
    case("id-object-return", '{"execute":"query-version","id":{"a":[1,"b"]}}', kind="return", id={"a": [1, "b"]}),
    case("id-array-return", '{"execute":"query-version","id":[1,"x"]}', kind="return", id=[1, "x"]),
    case("id-null-return", '{"execute":"query-version","id":null}', kind="return", id=None),
]

# On a fresh connection: enabling a capability the greeting did not offer.
OOB = case("enable-unoffered-oob", '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
           desc="Capability oob not available",
           why="expected only when the greeting does not offer oob; desc from QEMU's qmp_caps_accept()")


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(TIMEOUT)
        self.s.connect(path)
        self.buf = b""

    def line(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply within %ss" % timeout)
            r, _, _ = select.select([self.s], [], [], left)
            if not r:
                continue
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self):
        while True:
            m = self.line()
            if "event" not in m:
                return m

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.s.sendall(data + b"\n")

    def close(self):
        self.s.close()


def start(argv0, tmp, tag):
    qmp = os.path.join(tmp, f"{tag}-qmp.sock")
    log = open(os.path.join(tmp, f"{tag}.log"), "wb")
    cmd = argv0 + ["--chardev", f"socket,path={qmp},server=on,wait=off,id=m", "--monitor", "chardev=m"]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(qmp):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(cmd)} did not create {qmp} (rc={p.poll()})")
        time.sleep(0.02)
    return p, qmp


def probe(c, n, negotiated):
    """The session must still answer query-version; returns a problem or None."""
    pid = f"probe-{n}"
    c.send(json.dumps({"execute": "query-version", "id": pid}))
    try:
        r = c.reply()
    except Exception as e:  # noqa: BLE001
        return f"no answer to query-version after it: {e}"
    if r.get("id") != pid:
        return f"query-version after it got a reply for something else: {short(r)}"
    if negotiated and "return" not in r:
        return f"query-version after it failed: {short(r)}"
    if not negotiated and r.get("error", {}).get("class") != CNF:
        return f"query-version before negotiation should be CommandNotFound: {short(r)}"
    return None


def short(v, n=200):
    s = json.dumps(v)
    return s if len(s) <= n else s[:n] + "..."


def exchange(c, cs, n, negotiated, many):
    """Send one case; return (replies, problem). `many`: accept several replies
    (QSD answers some garbage with one error per bad token)."""
    c.send(cs["send"])
    replies = []
    try:
        replies.append(c.reply())
    except Exception as e:  # noqa: BLE001
        return replies, f"no reply: {e}"
    pid = f"probe-{n}"
    c.send(json.dumps({"execute": "query-version", "id": pid}))
    while True:
        try:
            r = c.reply()
        except Exception as e:  # noqa: BLE001
            return replies, f"no answer to query-version after it: {e}"
        if r.get("id") == pid:
            break
        replies.append(r)
    if negotiated and "return" not in r:
        return replies, f"query-version after it failed: {short(r)}"
    if not negotiated and r.get("error", {}).get("class") != CNF:
        return replies, f"query-version before negotiation should be CommandNotFound: {short(r)}"
    if len(replies) > 1 and not many:
        return replies, f"{len(replies)} replies to one message: {[short(x, 120) for x in replies]}"
    return replies, None


def check_reply(cs, r, greeting_caps):
    """Problems with reply r against the case's expectation (class, id, envelope)."""
    probs = []
    kind, cls = cs["kind"], cs["cls"]
    if cs["name"] == OOB["name"] and "oob" in greeting_caps:
        kind = "return"
    if kind == "return":
        if "return" not in r:
            probs.append(f"expected a return, got {short(r)}")
        extra = set(r) - {"return", "id"}
    else:
        err = r.get("error")
        if not isinstance(err, dict):
            return [f"expected an error, got {short(r)}"]
        if err.get("class") != cls:
            probs.append(f"class {err.get('class')!r}, expected {cls!r}")
        if not isinstance(err.get("desc"), str) or not err["desc"]:
            probs.append("empty or missing desc")
        if set(err) != {"class", "desc"}:
            probs.append(f"error members {sorted(err)}, expected class and desc")
        extra = set(r) - {"error", "id"}
    if extra:
        probs.append(f"unexpected reply members {sorted(extra)}")
    if cs["id"] is ABSENT:
        if "id" in r:
            probs.append(f"reply carries id {r['id']!r}, expected none")
    elif "id" not in r or r["id"] != cs["id"] or type(r["id"]) is not type(cs["id"]):
        probs.append(f"id {r.get('id', '<absent>')!r}, expected {cs['id']!r}")
    return probs


def run_all(argv0, tmp, tag, many):
    """Replay every case; returns ({name: (replies, problem)}, greeting)."""
    p, qmp = start(argv0, tmp, tag)
    out = {}
    try:
        c = Conn(qmp)
        greeting = c.line()
        n = 0
        for cs in PRE:
            n += 1
            out[cs["name"]] = exchange(c, cs, n, False, many)
        n += 1
        out[NEGOTIATE["name"]] = exchange(c, NEGOTIATE, n, True, many)
        for cs in CMD:
            if tag == "qsd" and cs["baton_only"]:
                continue
            n += 1
            out[cs["name"]] = exchange(c, cs, n, True, many)
        c.close()
        # QSD's chardev takes one client at a time: reconnect after closing.
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                c = Conn(qmp)
                g2 = c.line(2)
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        caps = g2.get("QMP", {}).get("capabilities", [])
        n += 1
        offered = "oob" in caps
        reps, prob = exchange(c, OOB, n, offered, many)
        out[OOB["name"]] = (reps, prob)
        if not offered and not prob:
            c.send('{"execute":"qmp_capabilities","id":"after-oob"}')
            r = c.reply()
            if r != {"return": {}, "id": "after-oob"}:
                out[OOB["name"]] = (reps, f"plain qmp_capabilities after the refused one failed: {short(r)}")
        c.close()
        return out, greeting
    finally:
        p.kill()
        p.wait()


def load_allowlist():
    path = os.path.join(HERE, "allowlist.json")
    with open(path) as f:
        al = json.load(f)
    return al.get("bad_input", {})


def main():
    if not BATON or not os.access(BATON, os.X_OK):
        print(f"FAIL: set BATON to the baton binary (got {BATON!r})")
        return 1
    allow = load_allowlist()
    tmp = tempfile.mkdtemp(prefix="baton-qmp-bad-")
    failures = []
    all_cases = PRE + [NEGOTIATE] + CMD + [OOB]
    try:
        # 1. QSD: confirm the table's expectations are QSD's.
        qsd = shutil.which("qemu-storage-daemon")
        if qsd:
            ref, g = run_all([qsd], tmp, "qsd", many=True)
            caps = g.get("QMP", {}).get("capabilities", [])
            for cs in all_cases:
                if cs["name"] not in ref:
                    continue
                reps, prob = ref[cs["name"]]
                probs = [prob] if prob else []
                if reps:
                    probs += check_reply(cs, reps[0], caps)
                    d = reps[0].get("error", {}).get("desc")
                    if cs["desc"] is not None and "error" in reps[0] and d != cs["desc"] \
                            and not (cs["name"] == OOB["name"] and "oob" in caps):
                        probs.append(f"QSD desc {d!r}, table says {cs['desc']!r}")
                if probs:
                    failures.append(f"[reference table stale] {cs['name']}: QSD: " + "; ".join(probs))
            print(f"QSD reference: {len(ref)} cases replayed against qemu-storage-daemon")
        else:
            print("note: qemu-storage-daemon not installed; using the recorded QSD replies only")

        # 2. baton.
        res, g = run_all([BATON, "daemon"], tmp, "baton", many=False)
        caps = g.get("QMP", {}).get("capabilities", [])
        rows = []
        for cs in all_cases:
            reps, prob = res.get(cs["name"], ([], "not run"))
            probs = [prob] if prob else []
            got = reps[0] if reps else None
            if got is not None:
                probs += check_reply(cs, got, caps)
                d = got.get("error", {}).get("desc")
                want = cs["desc"]
                if "error" in got and want is not None and d != want:
                    a = allow.get(cs["name"])
                    if a is None:
                        probs.append(f"desc differs from QSD: baton {d!r}, QSD {want!r}")
                    elif a.get("prefix") and not d.startswith(a["prefix"]):
                        probs.append(f"desc {d!r} does not start with {a['prefix']!r}")
            status = "FAIL" if probs else "ok"
            shown = short(got, 110) if got is not None else "-"
            rows.append((status, cs["name"], shown))
            if probs:
                failures.append(f"{cs['name']}: " + "; ".join(probs) + (f"  [sent {short(cs['send'] if isinstance(cs['send'], str) else repr(cs['send']), 100)}]"))
        w = max(len(r[1]) for r in rows)
        print(f"\n{'':4}  {'case':{w}}  baton reply")
        for st, name, shown in rows:
            print(f"{st:4}  {name:{w}}  {shown}")
        unused = [k for k in allow if k not in {c['name'] for c in all_cases} and not k.startswith("_")]
        if unused:
            failures.append(f"allowlist.json bad_input names unknown cases: {unused}")
    except Exception as e:  # noqa: BLE001
        failures.append(f"exception: {type(e).__name__}: {e}")
    finally:
        if failures:
            for tag in ("qsd", "baton"):
                logp = os.path.join(tmp, f"{tag}.log")
                if os.path.exists(logp) and os.path.getsize(logp):
                    print(f"---- {tag} output ----")
                    print(open(logp, errors="replace").read()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"\nbad_input.py: {len(failures)} failure(s):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\nbad_input.py: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
