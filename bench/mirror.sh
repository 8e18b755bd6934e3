#!/usr/bin/env bash
# bench/mirror.sh: a disk on a two-replica mirrored container beside a disk
# on a single container, through the same agent, and the mirror's rebuild
# and failover. JSON lines "bench": "mirror" (one per fio job, kind and rep),
# "mirror-rebuild" and "mirror-failover" (one per rep).
#
# Each rep starts a fresh 'segmap up' (its own 1 MiB-slot pool, which
# neither disk uses) and storage nodes on loopback ('segmap storage',
# plaintext), each export a sparse file of MIRROR_MB + 1 MiB (the header):
#
#   nodes A and B   one export each: 'container add --mirror A,B --format
#                   --slot-size 256K', MIRROR_MB x 4 slots
#   node C          one export: the single container, the same way
#   node D          two exports: the rebuild's new replica, and the
#                   target of nbdcopy
#
# Disk "m" (MIRROR_MB, 256 KiB segments) is created and filled (fio, 1 MiB
# sequential writes) while the mirror is the only container of that slot
# size, so every segment of it is on the mirror and the mirror is full;
# then the single container is added and disk "s" created and filled the
# same way: all of its segments are on C. Both disks are thus written
# through (the read jobs read data, the write jobs overwrite: no write
# fault in any measured job). Then, interleaved (the mirror first on odd
# reps, the single container first on even ones), every job of 'jobs'
# below on each disk, RUNTIME seconds each after a second of ramp, over
# the agent's NBD export, each after a 'sync' (the storage nodes write
# through the page cache: the writeback of a fill or of the job before
# would land on the next job). Each job's line has the CPU time 'segmap
# up' and the disk's storage nodes used per I/O (cpu_us_per_io): on a
# machine whose CPUs fio, the agent and every node share, a mirrored
# write costs two nodes' work. Then:
#
#   rebuild   'container replace-replica --old A --new D1 --format' (every
#             used slot, MIRROR_MB, copied from B onto D1), timed, nothing
#             else running; beside it nbdcopy of C's export (MIRROR_MB +
#             1 MiB of data) to D's second export: the same bytes from one
#             storage node to another over NBD. Each starts after a 'sync'.
#   failover  fio writes to disk m (random 4 KiB, depth 1, a per-I/O
#             latency log) for FAIL_BEFORE s, then node B (a healthy
#             replica: the mirror is D1 and B now) is killed (SIGKILL), and
#             fio goes on for FAIL_AFTER s: its longest write is the pause
#             (the replica's I/O timeout, then the controller recording
#             the failure and telling the agent), and the writes/s after
#             the kill are those of one replica.
#
# Usage: bench/mirror.sh ; env MIRROR_MB (1024), RUNTIME (8), REPS (3),
# FAIL_BEFORE (3), FAIL_AFTER (8), RESULTS (JSON lines appended),
# SEGMAP_BIN, SEGMAP_UP_FLAGS (e.g. --pprof 127.0.0.1:6060).
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR_MB=${MIRROR_MB:-1024}
RUNTIME=${RUNTIME:-8}
REPS=${REPS:-3}
FAIL_BEFORE=${FAIL_BEFORE:-3}
FAIL_AFTER=${FAIL_AFTER:-8}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-mirror.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi

jobs=(
  "randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32"
  "randwrite-4k-qd1  --rw=randwrite --bs=4k --iodepth=1"
  "write-1m-seq      --rw=write     --bs=1M --iodepth=8"
  "randread-4k-qd32  --rw=randread  --bs=4k --iodepth=32"
  "read-1m-seq       --rw=read      --bs=1M --iodepth=8"
)

now_ms() { date +%s%3N; }

# cpu_ticks PID...: the CPU time (user + system, in clock ticks) the
# processes PID... have used so far.
cpu_ticks() {
  local p f t=0
  for p in "$@"; do
    # Fields 14 and 15 of /proc/PID/stat: 11 and 12 after the command in
    # parentheses.
    read -r -a f <<<"$(sed 's/^.*) //' "/proc/$p/stat")"
    t=$((t + f[11] + f[12]))
  done
  echo "$t"
}
tick=$(getconf CLK_TCK)
export_size=$((MIRROR_MB + 1))M

# fill DISK: one sequential pass of 1 MiB writes over DISK.
fill() {
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$sp/$1" --rw=write --bs=1M --iodepth=8 \
    --size="${MIRROR_MB}M" --output=/dev/null
}

# container_id JSON: the id in the JSON 'container add' prints.
container_id() { $PY -c 'import json, sys; print(json.load(sys.stdin)["id"])'; }

for rep in $(seq "$REPS"); do
  d=$work/r$rep
  mkdir -p "$d"
  start_segmap "$d/data" 64M
  start_storage "$d/a" a "$export_size"
  apid=$stpid uA=nbd://127.0.0.1:$stp/a
  start_storage "$d/b" b "$export_size"
  bpid=$stpid uB=nbd://127.0.0.1:$stp/b
  start_storage "$d/c" c "$export_size"
  cpid=$stpid uC=nbd://127.0.0.1:$stp/c
  start_storage "$d/d" d1 "$export_size"
  "$work/segmap" storage create --dir "$d/d" d2 --size "$export_size" >/dev/null
  uD1=nbd://127.0.0.1:$stp/d1 uD2=nbd://127.0.0.1:$stp/d2

  mid=$("${SEG[@]}" --json container add --mirror "$uA,$uB" --format --slot-size 256K | container_id)
  "${SEG[@]}" disk create m --size "${MIRROR_MB}M" --segment-size 256K >/dev/null
  fill m
  "${SEG[@]}" --json container add "$uC" --format --slot-size 256K >/dev/null
  "${SEG[@]}" disk create s --size "${MIRROR_MB}M" --segment-size 256K >/dev/null
  fill s
  # Every segment of m on the mirror, every one of s on C.
  "${SEG[@]}" --json container list | $PY -c '
import json, sys
mid, want = int(sys.argv[1]), int(sys.argv[2])
for c in json.load(sys.stdin)["containers"]:
    if int(c.get("slot_size", 0)) == 256 << 10 and int(c.get("used_slots", 0)) != want:
        sys.exit("bench: container %s holds %s slots, want %d" % (c["id"], c.get("used_slots", 0), want))
' "$mid" "$((MIRROR_MB * 4))"

  order=(m s)
  [ $((rep % 2)) = 1 ] || order=(s m)
  for j in "${jobs[@]}"; do
    name=${j%% *} args=${j#* }
    for disk in "${order[@]}"; do
      kind=single
      [ "$disk" = m ] && kind=mirror
      # The writeback of what the fills and the jobs before wrote would
      # slow down whichever job comes next: none is pending at the start.
      sync
      # The CPU the agent and the storage nodes of the disk spend.
      servers=("$segpid" "$cpid")
      [ "$kind" = single ] || servers=("$segpid" "$apid" "$bpid")
      u0=$(cpu_ticks "${servers[@]}")
      # shellcheck disable=SC2086 # args are fio's flags
      fio --name="$name" --ioengine=nbd --uri="nbd://127.0.0.1:$sp/$disk" $args --size="${MIRROR_MB}M" \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --randseed="$rep" --output-format=json >"$d/out.json"
      u1=$(cpu_ticks "${servers[@]}")
      $PY - "$kind" "$name" "$rep" "$d/out.json" "$(((u1 - u0) * 1000000 / tick))" >>"$RESULTS" <<'PYEOF'
import json, sys
kind, name, rep, path, cpu_us = sys.argv[1:6]
text = open(path).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine prints a line first
op = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
pct = op["clat_ns"].get("percentile", {})
# lat_us and p50_us are fio's completion latency (clat: from the
# request's submission to its reply); tlat_us adds the submission (lat).
print(json.dumps({"bench": "mirror", "kind": kind, "job": name, "rep": int(rep), "iops": op["iops"],
                  "mbps": op["bw_bytes"] / 1e6, "lat_us": op["clat_ns"]["mean"] / 1e3,
                  "tlat_us": op["lat_ns"]["mean"] / 1e3,
                  "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3,
                  # Ramp included in the CPU, not in the I/Os: an overestimate alike on both sides.
                  "cpu_us_per_io": int(cpu_us) / max(1, op["total_ios"])}))
PYEOF
    done
  done

  # The rebuild beside nbdcopy of the same bytes between two storage nodes.
  sync
  t0=$(now_ms)
  segs=$("${SEG[@]}" --json --timeout 1800s container replace-replica "$mid" --old "$uA" --new "$uD1" --format \
    --no-progress | $PY -c 'import json, sys; print(json.load(sys.stdin).get("done", 0))')
  t1=$(now_ms)
  stop_pid "$apid"
  sync
  c0=$(now_ms)
  nbdcopy "$uC" "$uD2"
  c1=$(now_ms)
  echo "{\"bench\": \"mirror-rebuild\", \"rep\": $rep, \"mb\": $MIRROR_MB, \"segments\": $segs," \
    "\"rebuild_s\": $((t1 - t0))e-3, \"copy_mb\": $((MIRROR_MB + 1)), \"nbdcopy_s\": $((c1 - c0))e-3}" >>"$RESULTS"

  # A replica killed under a writer.
  sync
  fio --name=failover --ioengine=nbd --uri="nbd://127.0.0.1:$sp/m" --rw=randwrite --bs=4k --iodepth=1 \
    --size="${MIRROR_MB}M" --time_based --runtime=3600 --randseed="$rep" \
    --write_lat_log="$d/lat" --log_unix_epoch=1 --per_job_logs=0 \
    --output-format=json --output="$d/fail.json" >"$d/fail.out" 2>&1 &
  fiopid=$!
  pids+=("$fiopid")
  sleep "$FAIL_BEFORE"
  alive "$fiopid" || { echo "bench: fio ended early:" >&2; cat "$d/fail.out" >&2; exit 1; }
  k=$(now_ms)
  kill -9 "$bpid"
  # Waited for here, quietly: bash would report the kill.
  wait "$bpid" 2>/dev/null || true
  sleep "$FAIL_AFTER"
  alive "$fiopid" || { echo "bench: fio failed after the kill:" >&2; cat "$d/fail.out" >&2; exit 1; }
  stop_pid "$fiopid"
  state=$("${SEG[@]}" --json container list | $PY -c '
import json, sys
mid = int(sys.argv[1])
for c in json.load(sys.stdin)["containers"]:
    if c["id"] == mid:
        print(",".join(r.get("state", "?") for r in c.get("replicas", [])))
' "$mid")
  $PY - "$d/lat_clat.log" "$rep" "$k" "$FAIL_AFTER" "$state" >>"$RESULTS" <<'PYEOF'
import json, sys
log, rep, k, after, state = sys.argv[1:6]
k, after = int(k), float(after)
lat = []  # (epoch ms at completion, clat µs)
for line in open(log):
    f = line.split(",")
    lat.append((int(f[0]), int(f[1]) / 1e3))
start = lat[0][0] + 1000  # the ramp: fio's first second left out
before = [v for t, v in lat if start <= t < k]
# The pause: the longest write completed after the kill; after it
# (from 1 s past its completion to the end), one replica's rate.
longest, lt = max(((v, t) for t, v in lat if t >= k), default=(None, k))
after_ok = [v for t, v in lat if t > lt + 1000]
span = (lat[-1][0] - (lt + 1000)) / 1e3
print(json.dumps({"bench": "mirror-failover", "rep": int(rep), "replicas": state,
                  "max_us": longest, "pause_done_after_kill_s": (lt - k) / 1e3,
                  "wps_before": len(before) / ((k - start) / 1e3),
                  "wps_after": len(after_ok) / span if span > 0 else None,
                  "mean_before_us": sum(before) / len(before) if before else None,
                  "mean_after_us": sum(after_ok) / len(after_ok) if after_ok else None}))
PYEOF
  stop_pid "$segpid"
  rm -rf "$d"
done
