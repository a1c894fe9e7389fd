#!/usr/bin/env bash
# baton serve vs qemu-nbd (-e 4 --aio=io_uring) vs nbdkit file, on the same
# 1 GiB image, interleaved (every repetition runs every server in turn), over
# TCP and a unix socket. Prints the median of each row and baton's ratio to
# each peer. Workloads: nbdcopy sequential read and write, fio (nbd engine)
# 4 KiB random read and write at queue depth 32.
#
#   benches/nbd_peers.sh            # REPS=5 FIO_RT=5 by default
#   REPS=3 FIO_RT=3 TRANSPORTS=unix benches/nbd_peers.sh
#   BATON_BASE=/path/to/older/baton benches/nbd_peers.sh   # adds "baton-base":
#       another build of baton (e.g. before a change), interleaved with the rest
#
# Uses only 127.0.0.1:10950 and unix sockets under $DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REPS:=5}" "${FIO_RT:=5}" "${TRANSPORTS:=tcp unix}" "${PORT:=10950}"
: "${DATA:=${TMPDIR:-/tmp}/baton-nbd-bench}"
: "${SERVERS:=baton ${BATON_BASE:+baton-base }qemu-nbd nbdkit}"
export PATH="$PATH:/usr/sbin"
mkdir -p "$DATA"
IMG=$DATA/disk.raw SRC=$DATA/src.raw SOCK=$DATA/nbd.sock CSV=$DATA/results.csv
SIZE=$((1 << 30))
[ "$(stat -c %s "$IMG" 2>/dev/null || echo 0)" = $SIZE ] || head -c $SIZE /dev/urandom > "$IMG"
[ "$(stat -c %s "$SRC" 2>/dev/null || echo 0)" = $SIZE ] || head -c $SIZE /dev/urandom > "$SRC"
cargo build --release -q --bin baton
BATON=${CARGO_TARGET_DIR:-$PWD/target}/release/baton
: > "$CSV"

server_cmd() { # server transport
    local addr
    case $2 in tcp) addr="-b 127.0.0.1 -p $PORT" ;; unix) addr="-k $SOCK" ;; esac
    case $1 in
        baton) echo "$BATON serve $addr -e 16 $IMG" ;;
        baton-base) echo "$BATON_BASE serve $addr -e 16 $IMG" ;;
        qemu-nbd) echo "qemu-nbd -f raw -t -x '' -e 4 --aio=io_uring $addr $IMG" ;;
        nbdkit)
            case $2 in tcp) echo "nbdkit -f --exit-with-parent -i 127.0.0.1 -p $PORT file $IMG" ;;
                       unix) echo "nbdkit -f --exit-with-parent -U $SOCK file $IMG" ;; esac ;;
    esac
}
uri() { case $1 in tcp) echo "nbd://127.0.0.1:$PORT" ;; unix) echo "nbd+unix:///?socket=$SOCK" ;; esac; }

PID=
start() {
    rm -f "$SOCK"
    bash -c "exec $1" >"$DATA/server.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do
        nbdinfo --size "$2" >/dev/null 2>&1 && return 0
        kill -0 $PID 2>/dev/null || { cat "$DATA/server.log"; return 1; }
        sleep 0.1
    done
    return 1
}
stop() { [ -n "$PID" ] && kill $PID 2>/dev/null; wait $PID 2>/dev/null || true; PID=; rm -f "$SOCK"; }
trap stop EXIT

row() { echo "$1,$2,$3,$4" >> "$CSV"; }  # server/transport,test,rep,value
timed() { # label rep cmd...
    local label=$1 rep=$2; shift 2
    sync
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>"$DATA/err" || { echo "FAIL $label: $*"; cat "$DATA/err"; return 0; }
    t1=$(date +%s.%N)
    row "$G" "$label" "$rep" "$(awk -v a="$t0" -v b="$t1" -v n=$SIZE 'BEGIN{printf "%.1f", n/1048576/(b-a)}')"
}
fio_iops() { # label rep rw uri
    local out=$DATA/fio.json
    sync
    fio --name=nbd --ioengine=nbd --uri="$4" --bs=4k --iodepth=32 --rw="$3" --runtime="$FIO_RT" \
        --time_based --ramp_time=1 --output-format=json --output="$out" >/dev/null 2>"$DATA/err" \
        || { echo "FAIL $1"; cat "$DATA/err"; return 0; }
    row "$G" "$1" "$2" "$(/usr/bin/python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); d=sys.argv[2]; print(int(sum(x["read" if d=="randread" else "write"]["iops"] for x in j["jobs"])))' "$out" "$3")"
}

for rep in $(seq "$REPS"); do
    for tr in $TRANSPORTS; do
        for s in $SERVERS; do
            G="$s/$tr"
            u=$(uri "$tr")
            start "$(server_cmd "$s" "$tr")" "$u" || { echo "FAIL: $s did not start"; continue; }
            echo "rep $rep: $G"
            timed seq_write_MiBs "$rep" nbdcopy "$SRC" "$u"
            timed seq_read_MiBs "$rep" nbdcopy "$u" null:
            fio_iops randread_4k_qd32_IOPS "$rep" randread "$u"
            fio_iops randwrite_4k_qd32_IOPS "$rep" randwrite "$u"
            stop
        done
    done
done

/usr/bin/python3 - "$CSV" "$SERVERS" "$TRANSPORTS" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
servers, transports = sys.argv[2].split(), sys.argv[3].split()
med = {}
for g, t, _, v in rows:
    med.setdefault((g, t), []).append(float(v))
med = {k: statistics.median(v) for k, v in med.items()}
tests = sorted({t for _, t in med})
peers = [s for s in servers if s != "baton"]
print(f"{'test':<26}{'transport':<10}" + "".join(f"{s:>12}" for s in servers) + "".join(f"{'/' + p:>12}" for p in peers))
for t in tests:
    for tr in transports:
        vals = [med.get((f"{s}/{tr}", t)) for s in servers]
        line = f"{t:<26}{tr:<10}" + "".join(f"{v:>12.0f}" if v else f"{'-':>12}" for v in vals)
        b = med.get((f"baton/{tr}", t))
        for p in peers:
            pv = med.get((f"{p}/{tr}", t))
            line += f"{b / pv:>11.2f}x" if b and pv else f"{'-':>12}"
        print(line)
print(f"(medians of {len(rows) // max(1, len(med))} runs; ratios are baton / peer, higher is better)")
PY
