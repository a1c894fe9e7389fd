#!/usr/bin/env bash
# fio's io_uring engine on the same workloads as benches/file_driver.rs, on the
# same file, so the two can be put side by side: run this, then
#   cargo bench -p baton-benches --bench file_driver
# and divide. Prints IOPS and MiB/s per workload.
set -euo pipefail
dir=${BATON_BENCH_DIR:-${TMPDIR:-/tmp}}
file=$dir/baton-bench-file.img
size=$((1 << 30))
if [ "$(stat -c %s "$file" 2>/dev/null || echo 0)" != "$size" ]; then
    dd if=/dev/zero bs=1M count=1024 status=none | tr '\0' 'Z' > "$file"
fi
cat "$file" > /dev/null   # into the page cache, as the criterion bench runs
run() { # name rw bs iodepth numjobs
    out=$(mktemp)
    fio --name="$1" --filename="$file" --ioengine=io_uring --rw="$2" --bs="$3" --iodepth="$4" \
        --numjobs=1 --time_based --runtime="${RUNTIME:-5}" --size="$size" --direct=0 \
        --output-format=json --output="$out" >/dev/null
    python3 - "$1" "$out" <<'PY'
import json, sys
j = json.load(open(sys.argv[2]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
print(f"{sys.argv[1]:<22} {side['iops']:>12.0f} IOPS {side['bw_bytes']/2**20:>10.1f} MiB/s")
PY
    rm -f "$out"
}
run randread-4k-qd32 randread 4k 32
run randwrite-4k-qd32 randwrite 4k 32
run seqread-1m-qd4 read 1M 4
run seqwrite-1m-qd4 write 1M 4
