#!/usr/bin/env bash
# bench/export.sh: exporting a snapshot as a stream (segmap export), beside
# reading the same snapshot with nbdcopy, from segmap and from qemu-nbd
# serving the same bytes as a raw file. JSON "bench": "export".
#
# A disk of EXPORT_MB (1 MiB segments) gets random data in every other MiB
# (half the disk is data, half holes), copied in from a sparse raw file
# with nbdcopy; snapshot s1. Then 1 % of the disk is rewritten (fio
# randwrite, 4 KiB blocks, each block once) and snapshotted as s2. Cases,
# interleaved within each rep:
#
#   export        segmap export s1 > /dev/null      (full stream: data only)
#   nbdcopy-segmap  nbdcopy nbd://segmap/s1 null:   (block status skips holes)
#   nbdcopy-qemu  nbdcopy nbd://qemu-nbd/raw null:  (qemu-nbd -r over the raw file)
#   export-incr   segmap export s2 --from s1 > /dev/null
#
# Each records its seconds and the bytes it moved (the stream's size for
# the exports). Usage: bench/export.sh ; env EXPORT_MB (1024), REPS (3),
# RESULTS (JSON lines appended), SEGMAP_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
EXPORT_MB=${EXPORT_MB:-1024}
REPS=${REPS:-3}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-export.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi

# The raw image: random data in even MiBs, holes in odd ones.
$PY - "$work/raw.img" "$EXPORT_MB" <<'PYEOF'
import os, sys
path, mb = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(0, mb, 2):
        f.seek(i << 20)
        f.write(os.urandom(1 << 20))
    f.truncate(mb << 20)
PYEOF

start_segmap "$work/data" "$((EXPORT_MB * 3))M"
"${SEG[@]}" disk create vm --size "${EXPORT_MB}M" >/dev/null
nbdcopy "$work/raw.img" "nbd://127.0.0.1:$sp/vm"
"${SEG[@]}" snapshot vm --name s1 >/dev/null
fio --name=incr --ioengine=nbd --uri="nbd://127.0.0.1:$sp/vm" --rw=randwrite --bs=4k \
  --io_size="$((EXPORT_MB * 1024 / 100))k" --iodepth=16 --randseed=7 --end_fsync=1 >/dev/null
"${SEG[@]}" snapshot vm --name s2 >/dev/null

# -t: nbdcopy connects more than once.
held 1 "$work/q.ports" qemu-nbd -f raw -r -t -x raw --cache=writeback --aio=threads "$work/raw.img"
read -r qp <"$work/q.ports"

# timed CASE REP CMD...: runs CMD with its standard output counted, and
# appends a result.
timed() {
  local c=$1 rep=$2 t0 t1 n
  shift 2
  sync
  t0=$(date +%s.%N)
  n=$("$@" | wc -c)
  t1=$(date +%s.%N)
  $PY - "$c" "$rep" "$t0" "$t1" "$n" "$EXPORT_MB" >>"$RESULTS" <<'PYEOF'
import json, sys
c, rep, t0, t1, n, mb = sys.argv[1:]
print(json.dumps({"bench": "export", "case": c, "rep": int(rep), "seconds": float(t1) - float(t0),
                  "bytes": int(n), "disk_mb": int(mb)}))
PYEOF
}

for rep in $(seq "$REPS"); do
  timed export "$rep" "${SEG[@]}" export s1 --no-progress
  timed nbdcopy-segmap "$rep" nbdcopy "nbd://127.0.0.1:$sp/s1" null:
  timed nbdcopy-qemu "$rep" nbdcopy "nbd://127.0.0.1:$qp/raw" null:
  timed export-incr "$rep" "${SEG[@]}" export s2 --from s1 --no-progress
done
