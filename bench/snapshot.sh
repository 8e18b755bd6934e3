#!/usr/bin/env bash
# bench/snapshot.sh: snapshot time, and the pause a concurrent writer sees,
# against the number of allocated segments. For each count N in SIZES, a
# fresh 'segmap up' gets a disk of N segments of 64 KiB, every segment
# allocated at creation ('disk create --preallocate'; the time it took is
# kept), and a second small disk; then bench/snappause takes SNAPS snapshots through the
# CLI and SNAPS through the admin gRPC API while one qd1 4 KiB writer runs
# on each disk. Also kept: how long the allocation took, the bbolt file's
# size and the process's resident memory after it (the controller caches no
# table: meta.db is what it holds per entry).
# Usage: bench/snapshot.sh ; env SIZES (default "1000 10000 100000 1000000"),
# SNAPS (default 20), RESULTS (JSON lines appended), SEGMAP_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-1000 10000 100000 1000000}
SNAPS=${SNAPS:-20}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-snap.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi
go build -o "$work/snappause" ./bench/snappause

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

for n in $SIZES; do
  data="$work/data-$n"
  # Sparse containers: room for the disk, its copies and the other disk.
  start_segmap "$data" $(( n * 64 / 1024 * 5 / 4 + 256 ))M
  "${SEG[@]}" disk create other --size 64M --segment-size 64K >/dev/null
  rss0=$(rss_kib "$segpid"); meta0=$(stat -c %s "$data/meta.db")
  t0=$(date +%s.%N)
  "${SEG[@]}" --timeout 30m disk create snap --size $((n * 64))K --segment-size 64K --preallocate >/dev/null
  t1=$(date +%s.%N)
  alloc=$("${SEG[@]}" disk info snap --json | $PY -c 'import json,sys; print(int(json.load(sys.stdin)["allocated"]) // 65536)')
  [ "$alloc" = "$n" ] || { echo "snapshot: $alloc segments allocated, want $n" >&2; exit 1; }
  rss1=$(rss_kib "$segpid"); meta1=$(stat -c %s "$data/meta.db")
  out=$("$work/snappause" -nbd 127.0.0.1:$sp -admin 127.0.0.1:$ap -segmap "$work/segmap" \
    -disk snap -other other -segments "$n" -snapshots "$SNAPS")
  meta2=$(stat -c %s "$data/meta.db")
  $PY - "$out" "$t0" "$t1" "$rss0" "$rss1" "$meta0" "$meta1" "$meta2" >>"$RESULTS" <<'PYEOF'
import json, sys
r = json.loads(sys.argv[1])
t0, t1 = float(sys.argv[2]), float(sys.argv[3])
rss0, rss1, m0, m1, m2 = (int(x) for x in sys.argv[4:9])
r.update({"alloc_s": t1 - t0, "alloc_per_s": r["segments"] / (t1 - t0),
          "rss_bytes_per_entry": (rss1 - rss0) * 1024 / r["segments"],
          "meta_bytes": m1, "meta_bytes_per_entry": (m1 - m0) / r["segments"],
          "meta_bytes_after_snaps": m2})
print(json.dumps(r))
PYEOF
  stop_pid "$segpid"
  rm -rf "$data"
done
