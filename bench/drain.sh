#!/usr/bin/env bash
# bench/drain.sh: draining a container that holds DRAIN_MB of slots, beside
# cp of a file of the same size on the same filesystem, and the latency a
# writer sees while a drain runs under it. JSON "bench": "drain", one line
# per rep.
#
# Each rep starts a fresh 'segmap up' whose pool is one container file
# (--pool-files 1) and copies DRAIN_MB of random data into a disk of 1 MiB
# segments (nbdcopy from a raw file): that container then holds DRAIN_MB of
# slots. Then, in order:
#
#   drain    a second, empty container file is added; 'container drain'
#            of the first is timed, nothing else running (the rate figure).
#   loaded   a third container is added; fio writes to the disk (random
#            4 KiB, depth DRAIN_QD) for DRAIN_BEFORE s, then 'container
#            drain' of the second runs under it; fio is stopped when the
#            drain ends. Its per-I/O latency log (epoch-stamped) is split at
#            the drain's start and end: p99 before (its first second left
#            out, the ramp) against p99 during.
#   cp       cp --reflink=never of the raw file (DRAIN_MB) to a new file on
#            the same filesystem, then 'sync FILE' (an fsync of it): a
#            drain's copy is flushed and committed before the slot is
#            freed, so cp is timed to its data being durable too.
#
# Every timed step starts after a 'sync' (dirty pages of the step before
# are not counted against it). Both sources are in the page cache (just
# written, no O_DIRECT): caches are not dropped, the machine may be shared.
# Usage: bench/drain.sh ; env DRAIN_MB (1024), DRAIN_BEFORE (8), DRAIN_QD
# (4), REPS (3), RESULTS (JSON lines appended), SEGMAP_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
DRAIN_MB=${DRAIN_MB:-1024}
DRAIN_BEFORE=${DRAIN_BEFORE:-8}
DRAIN_QD=${DRAIN_QD:-4}
REPS=${REPS:-3}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-drain.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi

# The source: DRAIN_MB of random data, no holes (a hole would be no slot).
$PY - "$work/raw.img" "$DRAIN_MB" <<'PYEOF'
import os, sys
path, mb = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for _ in range(mb):
        f.write(os.urandom(1 << 20))
PYEOF

now_ms() { date +%s%3N; }

# container_field ID FIELD: FIELD of container ID in 'container list --json'.
container_field() {
  "${SEG[@]}" --json container list | $PY -c '
import json, sys
for c in json.load(sys.stdin).get("containers", []):
    if str(c["id"]) == sys.argv[1]:
        print(c.get(sys.argv[2], 0))
' "$1" "$2"
}

# add_container PATH: adds an empty container file of the pool's size;
# prints its id.
add_container() {
  "${SEG[@]}" --json container add "$1" --size "$((DRAIN_MB + 64))M" --slot-size 1M |
    $PY -c 'import json, sys; print(json.load(sys.stdin)["id"])'
}

# drain ID: drains container ID, checks it holds no slot after; prints the
# slots moved.
drain() {
  local moved
  moved=$("${SEG[@]}" --json --timeout 1800s container drain "$1" --no-progress |
    $PY -c 'import json, sys; print(json.load(sys.stdin).get("done", 0))')
  [ "$(container_field "$1" used_slots)" = 0 ] || { echo "bench: container $1 still holds slots after its drain" >&2; return 1; }
  echo "$moved"
}

for rep in $(seq "$REPS"); do
  d=$work/d$rep
  SEGMAP_UP_FLAGS="--pool-files 1 ${SEGMAP_UP_FLAGS:-}" start_segmap "$d" "$((DRAIN_MB + 64))M"
  "${SEG[@]}" disk create vm --size "${DRAIN_MB}M" --segment-size 1M >/dev/null
  nbdcopy "$work/raw.img" "nbd://127.0.0.1:$sp/vm"
  c1=$("${SEG[@]}" --json container list | $PY -c 'import json, sys; print(json.load(sys.stdin)["containers"][0]["id"])')
  used=$(container_field "$c1" used_slots)
  [ "$used" = "$DRAIN_MB" ] || { echo "bench: container $c1 holds $used slots, want $DRAIN_MB" >&2; exit 1; }

  # The drain alone.
  c2=$(add_container "$d/c2.img")
  sync
  t0=$(now_ms)
  moved=$(drain "$c1")
  t1=$(now_ms)

  # The drain under a writer.
  # The third container receives the second's slots.
  add_container "$d/c3.img" >/dev/null
  sync
  fio --name=drainlat --ioengine=nbd --uri="nbd://127.0.0.1:$sp/vm" --rw=randwrite --bs=4k \
    --iodepth="$DRAIN_QD" --size="${DRAIN_MB}M" --time_based --runtime=3600 --randseed="$rep" \
    --write_lat_log="$d/lat" --log_unix_epoch=1 --per_job_logs=0 \
    --output-format=json --output="$d/fio.json" >"$d/fio.out" 2>&1 &
  fiopid=$!
  pids+=("$fiopid")
  sleep "$DRAIN_BEFORE"
  alive "$fiopid" || { echo "bench: fio ended early:" >&2; cat "$d/fio.out" >&2; exit 1; }
  l0=$(now_ms)
  moved2=$(drain "$c2")
  l1=$(now_ms)
  # fio ends its job on SIGTERM and writes its log; stop_pid waits for it
  # (a minute, then SIGKILL).
  stop_pid "$fiopid"

  # cp of the same bytes, to its data on disk.
  rm -f "$work/cp.img"
  sync
  c0=$(now_ms)
  cp --reflink=never "$work/raw.img" "$work/cp.img"
  sync "$work/cp.img"
  cend=$(now_ms)
  rm -f "$work/cp.img"

  stop_pid "$segpid"
  $PY - "$d/lat_clat.log" "$rep" "$DRAIN_MB" "$moved" "$moved2" "$t0" "$t1" "$l0" "$l1" "$c0" "$cend" "$DRAIN_QD" >>"$RESULTS" <<'PYEOF'
import json, sys
log, rep, mb, moved, moved2, t0, t1, l0, l1, c0, c1, qd = sys.argv[1:]
t0, t1, l0, l1, c0, c1 = (int(x) for x in (t0, t1, l0, l1, c0, c1))
lat = []  # (epoch ms at completion, clat µs)
for line in open(log):
    f = line.split(",")
    lat.append((int(f[0]), int(f[1]) / 1e3))
start = lat[0][0] + 1000  # the ramp: fio's first second left out
before = [v for t, v in lat if start <= t < l0]
during = [v for t, v in lat if l0 <= t <= l1]

def p99(xs):
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))] if s else None

print(json.dumps({"bench": "drain", "rep": int(rep), "mb": int(mb), "qd": int(qd),
                  "slots": int(moved), "slots_loaded": int(moved2),
                  "drain_s": (t1 - t0) / 1e3, "drain_loaded_s": (l1 - l0) / 1e3, "cp_s": (c1 - c0) / 1e3,
                  "p99_before_us": p99(before), "p99_during_us": p99(during),
                  "max_during_us": max(during) if during else None,
                  "iops_before": len(before) / ((l0 - start) / 1e3), "iops_during": len(during) / ((l1 - l0) / 1e3)}))
PYEOF
  rm -rf "$d"
done
