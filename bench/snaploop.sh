#!/usr/bin/env bash
# bench/snaploop.sh: snapshots every SNAPLOOP_EVERY seconds under random
# 4 KiB writes, as a user who snapshots a VM often would. Each rep: a fresh
# 'segmap up', one SNAPLOOP_MB disk of 1 MiB segments (the default), filled;
# then, interleaved on the same disk:
#
#   nosnap  fio randwrite, 4 KiB, depth 16, SNAPLOOP_S seconds, no snapshot
#   snap    the same fio while a loop takes a snapshot ('segmap snapshot')
#           at 0, SNAPLOOP_EVERY, 2 x SNAPLOOP_EVERY ... seconds into it
#           (SNAPLOOP_S / SNAPLOOP_EVERY snapshots, all within the run)
#
# and the space the container files really hold (blocks allocated, du)
# before the snap run, after it, and after every snapshot is deleted again,
# beside the bytes the snap run wrote, the disk's own allocated bytes ('disk
# info'), what 'segmap status' counts as used, reports on storage and says
# the snapshots hold, and meta.db's size. 'segmap status' and 'segmap disk
# list' are kept as printed after the snap run.
# One JSON line ("bench": "snaploop") per rep.
# Usage: bench/snaploop.sh ; env REPS (3), SNAPLOOP_MB (2048), SNAPLOOP_S
# (120), SNAPLOOP_EVERY (5), RESULTS (JSON lines appended), SEGMAP_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SNAPLOOP_MB=${SNAPLOOP_MB:-2048}
SNAPLOOP_S=${SNAPLOOP_S:-120}
SNAPLOOP_EVERY=${SNAPLOOP_EVERY:-5}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-snaploop.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi
nsnaps=$((SNAPLOOP_S / SNAPLOOP_EVERY))

# The writer (fio JSON to stdout); run as fio itself, so that its pid is fio's.
randw=(fio --name=loop --ioengine=nbd --rw=randwrite --bs=4k --iodepth=16 --size=${SNAPLOOP_MB}M
  --runtime="$SNAPLOOP_S" --time_based --output-format=json)
# sleep_until T: sleep until the epoch time T (a float).
sleep_until() { $PY -c 'import sys, time; time.sleep(max(0.0, float(sys.argv[1]) - time.time()))' "$1"; }
used() { "${SEG[@]}" --json status | $PY -c 'import json, sys; print(json.load(sys.stdin)["used_bytes"])'; }

for rep in $(seq "$REPS"); do
  data="$work/data-$rep"
  # Room for the disk and a whole copy of it per snapshot (sparse).
  start_segmap "$data" $((SNAPLOOP_MB * (nsnaps + 2)))M
  "${SEG[@]}" disk create vm --size ${SNAPLOOP_MB}M >/dev/null
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$sp/vm" --rw=write --bs=1M --iodepth=8 \
    --size=${SNAPLOOP_MB}M --output=/dev/null

  "${randw[@]}" --uri="nbd://127.0.0.1:$sp/vm" >"$work/nosnap.json"
  own=$("${SEG[@]}" --json disk info vm | $PY -c 'import json, sys; print(json.load(sys.stdin)["allocated"])')
  du0=$(du_bytes "$data/containers"); meta0=$(stat -c %s "$data/meta.db"); used0=$(used)

  "${randw[@]}" --uri="nbd://127.0.0.1:$sp/vm" >"$work/snap.json" &
  fpid=$!
  pids+=($fpid)
  t0=$($PY -c 'import time; print(time.time())')
  : >"$work/snap_ms"
  for i in $(seq 0 $((nsnaps - 1))); do
    sleep_until "$($PY -c 'import sys; print(float(sys.argv[1]) + float(sys.argv[2]))' "$t0" $((i * SNAPLOOP_EVERY)))"
    a=$(date +%s%N)
    "${SEG[@]}" snapshot vm --name "vm@l$i" >/dev/null
    echo $((($(date +%s%N) - a) / 1000)) >>"$work/snap_ms"
  done
  wait "$fpid"
  du1=$(du_bytes "$data/containers"); meta1=$(stat -c %s "$data/meta.db"); used1=$(used)
  "${SEG[@]}" --json status >"$work/status1.json"
  "${SEG[@]}" status >"$work/status.txt"
  "${SEG[@]}" disk list >"$work/list.txt"
  "${SEG[@]}" --json disk list >"$work/list.json"

  for i in $(seq 0 $((nsnaps - 1))); do "${SEG[@]}" disk delete "vm@l$i" >/dev/null; done
  du2=$(du_bytes "$data/containers"); used2=$(used)
  "${SEG[@]}" --json status >"$work/status2.json"
  stop_pid "$segpid"

  $PY - "$rep" "$SNAPLOOP_MB" "$SNAPLOOP_S" "$SNAPLOOP_EVERY" "$own" "$du0" "$du1" "$du2" "$meta0" "$meta1" \
    "$used0" "$used1" "$used2" "$work" >>"$RESULTS" <<'PYEOF'
import json, sys
rep, mb, secs, every, own, du0, du1, du2, meta0, meta1, used0, used1, used2 = (int(x) for x in sys.argv[1:14])
w = sys.argv[14]
def job(name):
    text = open(f"{w}/{name}.json").read()
    return json.loads(text[text.index("{"):])["jobs"][0]["write"]
ns, s = job("nosnap"), job("snap")
disks = json.load(open(f"{w}/list.json"))["disks"]
st1, st2 = (json.load(open(f"{w}/status{i}.json")) for i in (1, 2))
print(json.dumps({
    "bench": "snaploop", "rep": rep, "mb": mb, "secs": secs, "every": every,
    "iops_nosnap": ns["iops"], "iops_snap": s["iops"], "p99_us_snap": s["clat_ns"]["percentile"]["99.000000"] / 1e3,
    "snapshots": sum(1 for d in disks if d["origin"] == "vm"),
    "snap_ms": [int(x) / 1e3 for x in open(f"{w}/snap_ms").read().split()],
    "written": s["io_bytes"], "own": own,
    "du_before": du0, "du_after": du1, "du_deleted": du2,
    "meta_before": meta0, "meta_after": meta1,
    "used_before": used0, "used_after": used1, "used_deleted": used2,
    "stored_after": int(st1["allocated_bytes"]), "stored_deleted": int(st2["allocated_bytes"]),
    "held_after": int(st1["snapshots_hold_bytes"]), "held_deleted": int(st2["snapshots_hold_bytes"]),
    "disks": [{k: d[k] for k in ("name", "allocated", "exclusive", "shared", "snapshots_hold")} for d in disks],
    "status_text": open(f"{w}/status.txt").read(), "list_text": open(f"{w}/list.txt").read()}))
PYEOF
  rm -rf "$data"
done
