#!/usr/bin/env bash
# bench/cow.sh: writes after a snapshot, beside qcow2 overlays served by
# qemu-nbd (--cache=writeback) over a filled raw base. Three parts, their
# cases interleaved within each rep:
#
# 1. The first write after a snapshot (JSON "bench": "cow"). A disk whose
#    every segment is allocated and shared with a snapshot gets one 4 KiB
#    write at the start of each segment (fio strided zones: zonesize 4k,
#    zonerange = the segment size, io_size = 4k x segments, so exactly one
#    write per segment); each write copies its segment. At queue depth 1
#    and 32.
#
#      segmap-64k   segmap disk, 64 KiB segments      (zonerange 64k)
#      qcow2-64k    qcow2 overlay, 64 KiB clusters    (zonerange 64k)
#      segmap-1m    segmap disk, 1 MiB segments (the default; zonerange 1m)
#      qcow2-sub-1m qcow2 overlay with subclusters (extended_l2=on,
#                   cluster_size=128k: 4 KiB subclusters), segmap-1m's pattern
#      qcow2-1m     qcow2 overlay, 64 KiB clusters, segmap-1m's pattern
#      qcow2-64k-writethrough  qcow2-64k with qemu-nbd --cache=writethrough
#                   (every write durable before it is answered; context only)
#
# 2. Random writes right after a snapshot ("bench": "cowrand"): fio
#    randwrite, 4 KiB, depth 16, RND_S seconds (time based, --end_fsync=1)
#    over a filled RND_MB disk.
#
#      segmap-snap    segmap disk, 1 MiB segments, snapshotted just before
#      qcow2-sub      a fresh subcluster overlay (as qcow2-sub-1m) over a full raw base
#      segmap-nosnap  a segmap disk filled the same way and never snapshotted
#
# 3. Parallel faults ("bench": "par"): PAR_MB disks of 64 KiB segments,
#    each snapshotted afresh; fio writes segmap-64k's strided pattern at depth
#    PAR_QD on one disk alone ("one"), then on four disks at once, one job
#    per disk in one fio ("four"). The fault rate is the writes of every job
#    over the longest job's time.
#
# Each rep takes fresh snapshots of the segmap disks (their segments all
# shared again) and makes a fresh overlay. Usage: bench/cow.sh [COW_MB] ;
# env REPS (3), RND_MB (1024), RND_S (10), PAR_MB (128), PAR_QD (1),
# RESULTS (JSON lines appended), SEGMAP_BIN (a built segmap, else it builds
# one), SEGMAP_UP_FLAGS (more 'segmap up' flags: --controller-copies makes
# the controller copy shared segments for partial writes, not the agent).
set -euo pipefail
cd "$(dirname "$0")/.."
COW_MB=${1:-${COW_MB:-512}}
REPS=${REPS:-3}
RND_MB=${RND_MB:-1024}
RND_S=${RND_S:-10}
PAR_MB=${PAR_MB:-128}
PAR_QD=${PAR_QD:-1}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-cow.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi

# The pool of each segment size (sparse): every disk and every copy a rep
# makes. 64 KiB: cow64k copied twice a rep (QD 1 and 32), par1 twice and
# par2-4 once. 1 MiB: cow1m twice a rep, rnd once, rndns never.
pool64=$((COW_MB * (2 * REPS + 2) + PAR_MB * (5 * REPS + 4)))
pool1m=$((COW_MB * (2 * REPS + 2) + RND_MB * (REPS + 2)))
start_segmap "$work/data" $((pool64 > pool1m ? pool64 : pool1m))M
fill() { fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$sp/$1" --rw=write --bs=1M --iodepth=8 --size="$2"M --output=/dev/null; }
"${SEG[@]}" disk create cow64k --size ${COW_MB}M --segment-size 64K >/dev/null
"${SEG[@]}" disk create cow1m --size ${COW_MB}M --segment-size 1M >/dev/null
"${SEG[@]}" disk create rnd --size ${RND_MB}M --segment-size 1M >/dev/null
"${SEG[@]}" disk create rndns --size ${RND_MB}M --segment-size 1M >/dev/null
for d in cow64k cow1m; do fill "$d" "$COW_MB"; done
for d in rnd rndns; do fill "$d" "$RND_MB"; done
for i in 1 2 3 4; do
  "${SEG[@]}" disk create par$i --size ${PAR_MB}M --segment-size 64K >/dev/null
  fill par$i "$PAR_MB"
done
fio --name=fill --filename="$work/base.raw" --rw=write --bs=1M --size=${COW_MB}M --output=/dev/null
fio --name=fill --filename="$work/rnd.raw" --rw=write --bs=1M --size=${RND_MB}M --output=/dev/null

# strided URI ZONERANGE QD MB: fio's one-write-per-segment pass (JSON to stdout).
strided() {
  fio --name=cow --ioengine=nbd --uri="$1" --rw=write --bs=4k --zonemode=strided \
    --zonesize=4k --zonerange=${2}k --size=${4}M --io_size=$(($4 * 1024 / $2 * 4))k \
    --iodepth="$3" --output-format=json
}

# run CASE SERVER URI ZONERANGE QD REP: one strided pass, one result line.
run() {
  local segs=$((COW_MB * 1024 / $4))
  strided "$3" "$4" "$5" "$COW_MB" >"$work/out.json"
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

# randw CASE SERVER URI REP: RND_S seconds of random 4 KiB writes at depth
# 16, one result line.
randw() {
  fio --name=rand --ioengine=nbd --uri="$3" --rw=randwrite --bs=4k --iodepth=16 --size=${RND_MB}M \
    --runtime="$RND_S" --time_based --end_fsync=1 --output-format=json >"$work/out.json"
  local sum
  sum=$(fio_summary "$work/out.json")
  $PY - "$1" "$2" "$4" "$sum" >>"$RESULTS" <<'PYEOF'
import json, sys
case, server, rep, s = sys.argv[1:5]
s = json.loads(s)
print(json.dumps({"bench": "cowrand", "case": case, "server": server, "rep": int(rep),
                  "writes": s["ios"], "iops": s["iops"], "lat_us": s["lat_us"], "secs": s["secs"]}))
PYEOF
}

# serve_overlay OPTS BASE: a fresh qcow2 overlay over BASE (qemu-img create
# -o OPTS), served by a fresh qemu-nbd (cache=writeback unless CACHE says
# otherwise); sets qp and qpid.
serve_overlay() {
  rm -f "$work/overlay.qcow2"
  qemu-img create -q -f qcow2 -o "$1" -b "$2" -F raw "$work/overlay.qcow2"
  # -t: fio connects twice (once for the size), a plain qemu-nbd exits after
  # the first. Its socket comes by socket activation (held).
  held 1 "$work/q.ports" qemu-nbd -f qcow2 -t -x cow --cache="${CACHE:-writeback}" --aio=threads "$work/overlay.qcow2"
  qpid=$held_pid
  read -r qp <"$work/q.ports"
}

# qcow2 CASE OPTS ZONERANGE QD REP [CACHE]: a strided pass on a fresh overlay.
qcow2() {
  CACHE=${6:-writeback} serve_overlay "$2" "$work/base.raw"
  run "$1" qemu-nbd "nbd://127.0.0.1:$qp/cow" "$3" "$4" "$5"
  stop_pid "$qpid"
}

# segmap CASE DISK ZONERANGE QD REP: a fresh snapshot shares every segment.
segmap() {
  "${SEG[@]}" snapshot "$2" --name "$2@q$4r$5" >/dev/null
  run "$1" segmap "nbd://127.0.0.1:$sp/$2" "$3" "$4" "$5"
}

# par CASE REP DISK...: fresh snapshots of the disks, then one fio job per
# disk, all at once; one result line with the aggregate fault rate.
par() {
  local c=$1 rep=$2; shift 2
  local args=() d
  for d in "$@"; do
    "${SEG[@]}" snapshot "$d" --name "$d@$c$rep" >/dev/null
    args+=(--name="$d" --uri="nbd://127.0.0.1:$sp/$d")
  done
  fio --ioengine=nbd --rw=write --bs=4k --zonemode=strided --zonesize=4k --zonerange=64k \
    --size=${PAR_MB}M --io_size=$((PAR_MB * 16 * 4))k --iodepth="$PAR_QD" --output-format=json \
    "${args[@]}" >"$work/out.json"
  $PY - "$c" "$rep" "$#" "$((PAR_MB * 16))" "$work/out.json" >>"$RESULTS" <<'PYEOF'
import json, sys
case, rep, n, segs, path = sys.argv[1:6]
text = open(path).read()
jobs = json.loads(text[text.index("{"):])["jobs"]
if len(jobs) != int(n) or any(j["write"]["total_ios"] != int(segs) for j in jobs):
    sys.exit(f"cow: par {case}: {[j['write']['total_ios'] for j in jobs]} writes, want {n} x {segs}")
writes = sum(j["write"]["total_ios"] for j in jobs)
secs = max(j["write"]["runtime"] for j in jobs) / 1e3
print(json.dumps({"bench": "par", "case": case, "rep": int(rep), "writers": int(n), "writes": writes,
                  "secs": secs, "fps": writes / secs,
                  "lat_us": sorted(j["write"]["clat_ns"]["mean"] / 1e3 for j in jobs)[len(jobs) // 2]}))
PYEOF
}

sub=extended_l2=on,cluster_size=128k
for rep in $(seq "$REPS"); do
  for qd in 1 32; do
    segmap segmap-64k cow64k 64 "$qd" "$rep"
    qcow2 qcow2-64k cluster_size=64k 64 "$qd" "$rep"
    # Context: qcow2 when every write is durable before it is answered.
    qcow2 qcow2-64k-writethrough cluster_size=64k 64 "$qd" "$rep" writethrough
    segmap segmap-1m cow1m 1024 "$qd" "$rep"
    qcow2 qcow2-sub-1m "$sub" 1024 "$qd" "$rep"
    qcow2 qcow2-1m cluster_size=64k 1024 "$qd" "$rep"
  done
  "${SEG[@]}" snapshot rnd --name "rnd@r$rep" >/dev/null
  randw segmap-snap segmap "nbd://127.0.0.1:$sp/rnd" "$rep"
  serve_overlay "$sub" "$work/rnd.raw"
  randw qcow2-sub qemu-nbd "nbd://127.0.0.1:$qp/cow" "$rep"
  stop_pid "$qpid"
  randw segmap-nosnap segmap "nbd://127.0.0.1:$sp/rndns" "$rep"
  # Keep the pool small: the next rep's snapshot shares every segment
  # anyway (its copies go; nothing here is measured).
  "${SEG[@]}" disk delete "rnd@r$rep" >/dev/null
  par one "$rep" par1
  par four "$rep" par1 par2 par3 par4
done
