#!/usr/bin/env bash
# bench/cow.sh: the first write after a snapshot. A disk whose every segment
# is allocated and shared with a snapshot gets one 4 KiB write at the start
# of each segment (fio strided zones: zonesize 4k, zonerange = the segment
# size, io_size = 4k x segments, so exactly one write per segment); each
# write copies its segment. Beside it, the same pattern on a qcow2 overlay
# (cluster_size 64k) over a filled raw base, served by qemu-nbd.
#
#   segmap-64k   segmap disk, 64 KiB segments      (zonerange 64k)
#   qcow2-64k    qcow2 overlay, 64 KiB clusters    (zonerange 64k)
#   segmap-1m    segmap disk, 1 MiB segments (the default; zonerange 1m)
#   qcow2-1m     qcow2 overlay, 64 KiB clusters, same pattern as segmap-1m
#   qcow2-64k-writethrough  qcow2-64k with qemu-nbd --cache=writethrough
#                (every write durable before it is answered; context only)
#
# At queue depth 1 and 32. Each rep takes a fresh snapshot of the segmap
# disks (their segments all shared again) and a fresh overlay; cases are
# interleaved. Usage: bench/cow.sh [COW_MB] ; env REPS, RESULTS (JSON lines
# appended), SEGMAP_BIN (a built segmap, else it builds one).
set -euo pipefail
cd "$(dirname "$0")/.."
COW_MB=${1:-${COW_MB:-512}}
REPS=${REPS:-3}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-cow.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi

# Two disks, each copied once per rep and QD: pool per segment size.
start_segmap "$work/data" $((COW_MB * (2 * REPS + 2)))M
"${SEG[@]}" disk create cow64k --size ${COW_MB}M --segment-size 64K >/dev/null
"${SEG[@]}" disk create cow1m --size ${COW_MB}M --segment-size 1M >/dev/null
for d in cow64k cow1m; do
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$sp/$d" --rw=write --bs=1M --iodepth=8 --size=${COW_MB}M --output=/dev/null
done
fio --name=fill --filename="$work/base.raw" --rw=write --bs=1M --size=${COW_MB}M --output=/dev/null

# run CASE SERVER URI ZONERANGE QD REP: one strided pass, one result line.
run() {
  local segs=$(( COW_MB * 1024 / $4 ))
  fio --name=cow --ioengine=nbd --uri="$3" --rw=write --bs=4k --zonemode=strided \
    --zonesize=4k --zonerange=${4}k --size=${COW_MB}M --io_size=$((segs * 4))k \
    --iodepth="$5" --output-format=json >"$work/out.json"
  local sum
  sum=$(fio_summary "$work/out.json")
  $PY - "$1" "$2" "$5" "$6" "$segs" "$sum" >>"$RESULTS" <<'PYEOF'
import json, sys
case, server, qd, rep, segs, s = sys.argv[1:7]
s = json.loads(s)
if s["ios"] != int(segs):
    sys.exit(f"cow: {case} did {s['ios']} writes, want one per segment ({segs})")
print(json.dumps({"bench": "cow", "case": case, "server": server, "qd": int(qd), "rep": int(rep),
                  "writes": s["ios"], "wps": s["iops"], "lat_us": s["lat_us"]}))
PYEOF
}

# qcow2 CASE ZONERANGE QD REP [CACHE]: a fresh overlay, served by a fresh
# qemu-nbd (cache=writeback unless CACHE says otherwise).
qcow2() {
  rm -f "$work/overlay.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=64k -b "$work/base.raw" -F raw "$work/overlay.qcow2"
  local qp; qp=$(port)
  # -t: fio connects twice (once for the size), a plain qemu-nbd exits after the first.
  qemu-nbd -f qcow2 -t -b 127.0.0.1 -p "$qp" -x cow --cache="${5:-writeback}" --aio=threads "$work/overlay.qcow2" &
  local qpid=$!
  pids+=($qpid)
  wait_port "$qp"
  run "$1" qemu-nbd "nbd://127.0.0.1:$qp/cow" "$2" "$3" "$4"
  stop_pid "$qpid"
}

# segmap CASE DISK ZONERANGE QD REP: a fresh snapshot shares every segment.
segmap() {
  "${SEG[@]}" snapshot "$2" --name "$2@q$4r$5" >/dev/null
  run "$1" segmap "nbd://127.0.0.1:$sp/$2" "$3" "$4" "$5"
}

for rep in $(seq "$REPS"); do
  for qd in 1 32; do
    segmap segmap-64k cow64k 64 "$qd" "$rep"
    qcow2 qcow2-64k 64 "$qd" "$rep"
    # Context: qcow2 when every write is durable before it is answered.
    qcow2 qcow2-64k-writethrough 64 "$qd" "$rep" writethrough
    segmap segmap-1m cow1m 1024 "$qd" "$rep"
    qcow2 qcow2-1m 1024 "$qd" "$rep"
  done
done
