#!/usr/bin/env bash
# bench/nbd.sh: fio (nbd engine) against segmap, qemu-nbd and nbdkit, side by
# side in one run on the same machine, on the same filesystem:
#
#   segmap   'segmap up', one disk (1 MiB segments, every segment allocated)
#   qemu-nbd a raw file of the same size (qemu-nbd -f raw, cache=writeback)
#   nbdkit   the same kind of raw file (nbdkit file)
#
# Jobs: 4 KiB random read and write at queue depth 1 and 32, and with 4 jobs
# of depth 16 (fio numjobs=4: each job its own NBD connection), 1 MiB
# sequential read and write at depth 8. Each job runs REPS times (default 3)
# per server, interleaved; the table shows medians and segmap's ratio to
# qemu-nbd (IOPS or MB/s: above 1.0 is faster; latency: below 1.0 is
# faster). Usage: bench/nbd.sh [SIZE_MB] ; env REPS, RUNTIME, OUT (the
# table), RESULTS (append the raw per-run results there, JSON lines).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${1:-1024}
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-8}
OUT=${OUT:-}
RESULTS=${RESULTS:-}
PY=/usr/bin/python3

./scripts/deps.sh >/dev/null
work=$(mktemp -d /var/tmp/segmap-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/segmap" ./cmd/segmap

port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# segmap
sp=$(port); ap=$(port)
"$work/segmap" up --data "$work/segmap-data" --nbd-listen 127.0.0.1:$sp --admin-listen 127.0.0.1:$ap --http-listen 127.0.0.1:0 --pool-size $((SIZE_MB * 2))M --pool-files 2 >"$work/up.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^ready' "$work/up.log" && break; sleep 0.1; done
"$work/segmap" --controller 127.0.0.1:$ap disk create bench --size ${SIZE_MB}M >/dev/null

# qemu-nbd and nbdkit on raw files
truncate -s ${SIZE_MB}M "$work/q.raw" "$work/k.raw"
qp=$(port); kp=$(port)
# -e 8: up to 8 connections at once (the 4x16 job opens 4).
qemu-nbd -f raw -t -e 8 -b 127.0.0.1 -p $qp -x bench --cache=writeback --aio=threads "$work/q.raw" &
pids+=($!)
nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p $kp file "$work/k.raw" >/dev/null 2>&1 &
pids+=($!)
sleep 1

declare -A URI=([segmap]="nbd://127.0.0.1:$sp/bench" [qemu-nbd]="nbd://127.0.0.1:$qp/bench" [nbdkit]="nbd://127.0.0.1:$kp/")
servers=(segmap qemu-nbd nbdkit)

# Fill every server's disk so that reads and writes hit allocated storage.
for s in "${servers[@]}"; do
  fio --name=fill --ioengine=nbd --uri="${URI[$s]}" --rw=write --bs=1M --iodepth=8 --size=${SIZE_MB}M --output=/dev/null
done

jobs=(
  "randread-4k-qd1   --rw=randread  --bs=4k --iodepth=1"
  "randread-4k-qd32  --rw=randread  --bs=4k --iodepth=32"
  "randwrite-4k-qd1  --rw=randwrite --bs=4k --iodepth=1"
  "randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32"
  "randread-4k-4x16  --rw=randread  --bs=4k --iodepth=16 --numjobs=4 --group_reporting"
  "randwrite-4k-4x16 --rw=randwrite --bs=4k --iodepth=16 --numjobs=4 --group_reporting"
  "read-1m-seq       --rw=read      --bs=1M --iodepth=8"
  "write-1m-seq      --rw=write     --bs=1M --iodepth=8"
)

results="$work/results.jsonl"
for rep in $(seq "$REPS"); do
  for j in "${jobs[@]}"; do
    name=${j%% *}; args=${j#* }
    for s in "${servers[@]}"; do
      # shellcheck disable=SC2086
      fio --name="$name" --ioengine=nbd --uri="${URI[$s]}" $args --size=${SIZE_MB}M \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json >"$work/out.json"
      $PY - "$s" "$name" "$rep" "$work/out.json" >>"$results" <<'PYEOF'
import json, sys
s, name, rep, path = sys.argv[1:5]
text = open(path).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine prints a line first
op = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print(json.dumps({"bench": "nbd", "server": s, "job": name, "rep": int(rep), "iops": op["iops"],
                  "mbps": op["bw_bytes"] / 1e6, "lat_us": op["clat_ns"]["mean"] / 1e3,
                  "p99_us": op["clat_ns"]["percentile"].get("99.000000", 0) / 1e3}))
PYEOF
    done
  done
done
[ -z "$RESULTS" ] || cat "$results" >>"$RESULTS"

# segmap ran with its metrics on: scrape them once, as Prometheus would,
# and say what they counted.
murl=$(sed -n 's/.*metrics on \([^ ]*\).*/\1/p' "$work/up.log" | head -1)
if [ -n "$murl" ] && curl -sf "${murl%/}/metrics" >"$work/metrics.txt"; then
  awk '/^segmap_agent_requests_total/ {n += $2} END {printf "metrics: segmap counted %d NBD requests (%s)\n", n, "'"${murl%/}/metrics"'"}' "$work/metrics.txt" >&2
fi

$PY - "$results" "$REPS" "$RUNTIME" "$SIZE_MB" "$OUT" <<'PYEOF'
import json, statistics, sys, platform, subprocess, datetime
path, reps, runtime, size, out = sys.argv[1:6]
rows = [json.loads(l) for l in open(path)]
def med(server, job, key):
    return statistics.median(r[key] for r in rows if r["server"] == server and r["job"] == job)
jobs = []
for r in rows:
    if r["job"] not in jobs:
        jobs.append(r["job"])
lines = []
lines.append(f"fio nbd engine, {size} MiB disk, {runtime} s per run, median of {reps} runs, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {platform.node()}")
lines.append("")
lines.append("| job | segmap | qemu-nbd | nbdkit | segmap / qemu-nbd | segmap lat (us) | qemu-nbd lat (us) | lat ratio |")
lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
for job in jobs:
    key, unit = ("mbps", "MB/s") if "1m" in job else ("iops", "IOPS")
    s, q, k = (med(x, job, key) for x in ("segmap", "qemu-nbd", "nbdkit"))
    ls, lq = med("segmap", job, "lat_us"), med("qemu-nbd", job, "lat_us")
    lines.append(f"| {job} | {s:,.0f} {unit} | {q:,.0f} {unit} | {k:,.0f} {unit} | {s/q:.2f} | {ls:.1f} | {lq:.1f} | {ls/lq:.2f} |")
text = "\n".join(lines)
print(text)
if out:
    open(out, "w").write(text + "\n")
PYEOF
