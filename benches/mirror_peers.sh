#!/usr/bin/env bash
# Mirror of 1 GiB (random data) into a qemu-nbd export: `baton daemon` vs
# qemu-storage-daemon doing blockdev-mirror sync=full, timed from the
# blockdev-mirror command to BLOCK_JOB_READY (then block-job-cancel), with and
# without a concurrent writer (fio, nbd engine, random 4 KiB writes at
# WRITER_IOPS through an NBD export of the source in the same daemon), and
# `qemu-img convert -n` into the same kind of export as the upper reference.
# Interleaved: every repetition runs every case. A fresh sparse target each run.
# Prints medians (GiB/s), ratios baton/QSD and baton/convert, and for the writer
# case how many runs converged (READY within READY_TIMEOUT seconds).
#
#   benches/mirror_peers.sh                        # REPS=5
#   REPS=1 WRITER_IOPS=2000 READY_TIMEOUT=30 benches/mirror_peers.sh
#   CONVERT_FLAGS="-W -m 16" benches/mirror_peers.sh   # out-of-order convert: ~2x faster here
#   BATON_BASE=/path/to/older/baton benches/mirror_peers.sh # adds "baton-base" (another
#       build of baton, e.g. before a change) to every repetition, with a baton/base ratio
#
# Both mirrors flush the target before they report READY; the "+flush" row
# (blockdev-mirror -> BLOCK_JOB_COMPLETED after the cancel) also counts the
# cancel, and is the one to hold against qemu-img convert, which ends with a flush.
#
# Uses unix sockets under $DATA only. The daemons run with their default
# options (baton: aio=io_uring; QSD: aio=threads), both page-cache backed.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REPS:=5}" "${WRITER_IOPS:=1000}" "${READY_TIMEOUT:=60}" "${CONVERT_FLAGS:=}"
: "${DATA:=${TMPDIR:-/tmp}/baton-mirror-bench}"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
for t in qemu-storage-daemon qemu-nbd qemu-img fio; do
    command -v "$t" >/dev/null || { echo "$t is not installed (./scripts/test installs the peers)" >&2; exit 1; }
done
mkdir -p "$DATA"
SRC=$DATA/src.raw TGT=$DATA/tgt.raw
TSOCK=$DATA/tgt.sock ESOCK=$DATA/export.sock QMP=$DATA/qmp.sock CSV=$DATA/results.csv
SIZE=$((1 << 30))
[ "$(stat -c %s "$SRC" 2>/dev/null || echo 0)" = $SIZE ] || head -c $SIZE /dev/urandom > "$SRC"
cat "$SRC" > /dev/null # in the page cache, as in BASELINES.md

cargo build --release -q --bin baton
BATON=${CARGO_TARGET_DIR:-$PWD/target}/release/baton
[ -x "$BATON" ] || { echo "no $BATON" >&2; exit 1; }

# ---------------------------------------------------------------- the QMP driver
cat > "$DATA/mirror.py" <<'EOF'
"""Drive one mirror over QMP: optional writer, blockdev-mirror, READY, cancel, quit.
Prints one CSV tail: seconds to READY, ready (0/1), job len at READY, writer IOPS,
seconds from blockdev-mirror to BLOCK_JOB_COMPLETED after the cancel (which flushes the target)."""
import json, os, signal, socket, subprocess, sys, time

import atexit
qmp_path, tgt_sock, exp_sock, writer_iops, ready_timeout, fio_out = sys.argv[1:7]
writer_iops, ready_timeout = int(writer_iops), float(ready_timeout)

class Qmp:
    def __init__(self, path):
        deadline = time.time() + 20
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.sock.makefile("rw")
        self.events = []
        json.loads(self.f.readline())
        self.ok("qmp_capabilities")

    def read(self, timeout=None):
        self.sock.settimeout(timeout)
        line = self.f.readline()
        if not line:
            raise EOFError("QMP monitor closed")
        return json.loads(line)

    def cmd(self, _cmd, **args):
        self.f.write(json.dumps({"execute": _cmd, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            m = self.read(60)
            if "event" in m:
                self.events.append(m)
            else:
                return m

    def ok(self, _cmd, **args):
        r = self.cmd(_cmd, **args)
        if "return" not in r:
            raise RuntimeError(f"{_cmd} {args}: {r}")
        return r["return"]

    def wait(self, names, timeout):
        """The first event in `names` (consumed), or None after `timeout`."""
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names:
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                m = self.read(left)
            except (socket.timeout, TimeoutError):
                return None
            if "event" in m:
                self.events.append(m)

q = Qmp(qmp_path)
q.ok("blockdev-add", **{"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": tgt_sock}, "export": ""})
writer = None
if writer_iops > 0:
    q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": exp_sock}})
    q.ok("block-export-add", type="nbd", id="e0", name="src", writable=True, **{"node-name": "src"})
    writer = subprocess.Popen(
        ["fio", "--name=writer", "--ioengine=nbd", f"--uri=nbd+unix:///src?socket={exp_sock}", "--rw=randwrite",
         "--bs=4k", "--iodepth=4", f"--rate_iops={writer_iops}", "--time_based", "--runtime=3600",
         "--output-format=json", f"--output={fio_out}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Never leave the writer behind, whatever happens below.
    atexit.register(lambda w=writer: w.poll() is None and (w.kill(), w.wait()))
    time.sleep(1.0)  # the writer is connected and writing before the job starts
    if writer.poll() is not None:
        raise RuntimeError("the fio writer exited early")

t0 = time.perf_counter()
q.ok("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"})
ev = q.wait(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), ready_timeout)
t1 = time.perf_counter()
ready = ev is not None and ev["event"] == "BLOCK_JOB_READY"
if ev is not None and not ready:
    raise RuntimeError(f"the job ended before READY: {ev}")
length = ev["data"]["len"] if ready else q.ok("query-block-jobs")[0]["len"]

iops = 0
if writer is not None:
    writer.send_signal(signal.SIGINT)
    try:
        writer.wait(30)
        txt = open(fio_out).read()  # fio puts "terminating on signal" before the JSON
        j = json.loads(txt[txt.index("{"):])["jobs"][0]["write"]
        iops = round(j["total_ios"] / max(j["runtime"] / 1000.0, 1e-9))
    except Exception:  # a writer stuck on a held export, or no JSON: report 0
        writer.kill()
        writer.wait()
if ready:
    q.ok("block-job-cancel", device="m0")
    if q.wait(("BLOCK_JOB_COMPLETED",), 120) is None:
        raise RuntimeError("no BLOCK_JOB_COMPLETED after cancel")
    t2 = time.perf_counter()
else:
    q.ok("block-job-cancel", device="m0", force=True)
    q.wait(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), 120)
    t2 = time.perf_counter()
q.ok("quit")
print(f"{t1 - t0:.3f},{int(ready)},{length},{iops},{t2 - t0:.3f}")
EOF

# ---------------------------------------------------------------- processes
NBD_PID= DAEMON_PID=
stop_pid() { # pid: SIGTERM, then reap
    [ -n "$1" ] || return 0
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    stop_pid "$DAEMON_PID"; DAEMON_PID=
    stop_pid "$NBD_PID"; NBD_PID=
}
trap cleanup EXIT

fresh_target() { # starts qemu-nbd on a new sparse target
    rm -f "$TGT" "$TSOCK"
    truncate -s $SIZE "$TGT"
    sync
    qemu-nbd -f raw -t -k "$TSOCK" "$TGT" 2>"$DATA/qemu-nbd.log" &
    NBD_PID=$!
    for _ in $(seq 200); do [ -S "$TSOCK" ] && return 0; sleep 0.05; done
    echo "qemu-nbd did not start" >&2; cat "$DATA/qemu-nbd.log" >&2; return 1
}

daemon_cmd() { # impl
    case $1 in
        baton-base) echo "$BATON_BASE daemon --blockdev driver=file,node-name=src,filename=$SRC --qmp unix:$QMP" ;;
        baton) echo "$BATON daemon --blockdev driver=file,node-name=src,filename=$SRC --qmp unix:$QMP" ;;
        qsd) echo "qemu-storage-daemon --blockdev driver=file,node-name=src,filename=$SRC --chardev socket,path=$QMP,server=on,wait=off,id=m --monitor chardev=m" ;;
    esac
}

: > "$CSV" # impl,case,rep,seconds_to_ready,ready,len,writer_iops,seconds_to_completed

run_mirror() { # impl case rep
    local iops=0 out
    [ "$2" = writer ] && iops=$WRITER_IOPS
    fresh_target
    rm -f "$QMP" "$ESOCK"
    bash -c "exec $(daemon_cmd "$1")" >"$DATA/$1.log" 2>&1 &
    DAEMON_PID=$!
    if out=$("$PY" "$DATA/mirror.py" "$QMP" "$TSOCK" "$ESOCK" "$iops" "$READY_TIMEOUT" "$DATA/fio.json" 2>"$DATA/err"); then
        wait "$DAEMON_PID" 2>/dev/null || true # it got `quit`
        DAEMON_PID=
        echo "$1,$2,$3,$out" >> "$CSV"
        echo "rep $3: $1 $2: $out (s to READY,ready,len,writer IOPS,s to COMPLETED)"
    else
        echo "FAIL rep $3: $1 $2"; cat "$DATA/err"; tail -5 "$DATA/$1.log"
    fi
    cleanup
}

run_convert() { # rep
    fresh_target
    local t0 t1
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086 # CONVERT_FLAGS is a list of flags
    if qemu-img convert -n $CONVERT_FLAGS -f raw -O raw "$SRC" "nbd+unix:///?socket=$TSOCK" 2>"$DATA/err"; then
        t1=$(date +%s.%N)
        local s
        s=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
        echo "convert,plain,$1,$s,1,$SIZE,0,$s" >> "$CSV"
        echo "rep $1: convert: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}') s"
    else
        echo "FAIL rep $1: convert"; cat "$DATA/err"
    fi
    cleanup
}

for rep in $(seq "$REPS"); do
    run_convert "$rep"
    # Alternate who goes first, so neither always runs on a warmer machine.
    if [ $((rep % 2)) = 1 ]; then order="baton ${BATON_BASE:+baton-base }qsd"; else order="qsd ${BATON_BASE:+baton-base }baton"; fi
    for c in plain writer; do
        for impl in $order; do run_mirror "$impl" "$c" "$rep"; done
    done
done

# ---------------------------------------------------------------- summary
"$PY" - "$CSV" "$SIZE" "$READY_TIMEOUT" "$WRITER_IOPS" "${BATON_BASE:+1}" <<'EOF'
import csv, statistics, sys
path, size, timeout, wiops, base = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
rows = list(csv.reader(open(path)))
def runs(impl, case):
    return [r for r in rows if r[0] == impl and r[1] == case]
def gibps(rs, col=3):
    v = [size / 2**30 / float(r[col]) for r in rs if r[4] == "1"]
    return statistics.median(v) if v else None
def fmt(x):
    return f"{x:.2f}" if x is not None else "-"
print(f"\nmirror of 1 GiB into qemu-nbd (unix socket), median GiB/s; writer: fio 4k randwrite at {wiops} IOPS on the source's export")
print("  'READY': blockdev-mirror -> BLOCK_JOB_READY;  '+flush': -> BLOCK_JOB_COMPLETED after block-job-cancel (the target flushed),")
print("  comparable with qemu-img convert -n, which ends with a flush")
print(f"{'case':<16} {'baton':>7} {'QSD':>7} {'convert':>8} {'baton/QSD':>10} {'baton/convert':>14}"
      + (f" {'base':>7} {'baton/base':>11}" if base else ""))
conv = gibps(runs("convert", "plain"))
for case in ("plain", "writer"):
    for col, what in ((3, "READY"), (7, "+flush")):
        if case == "writer" and col == 7:
            continue
        b, s = gibps(runs("baton", case), col), gibps(runs("qsd", case), col)
        r1 = b / s if b and s else None
        r2 = b / conv if b and conv else None
        line = f"{case + ' ' + what:<16} {fmt(b):>7} {fmt(s):>7} {fmt(conv):>8} {fmt(r1):>10} {fmt(r2):>14}"
        if base:
            o = gibps(runs("baton-base", case), col)
            line += f" {fmt(o):>7} {fmt(b / o if b and o else None):>11}"
        print(line)
for impl in ("baton", "baton-base", "qsd") if base else ("baton", "qsd"):
    rs = runs(impl, "writer")
    ok = sum(r[4] == "1" for r in rs)
    lens = [int(r[5]) / 2**30 for r in rs]
    iops = [int(r[6]) for r in rs]
    print(f"writer case, {impl}: converged {ok}/{len(rs)} within {timeout} s; job len at READY/timeout "
          f"{fmt(statistics.median(lens)) if lens else '-'} GiB; writer achieved {statistics.median(iops) if iops else '-'} IOPS (median)")
EOF
