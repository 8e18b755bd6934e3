#!/usr/bin/env bash
# bench/run.sh: what 'make bench' runs. One run measures everything side by
# side and writes docs/benchmarks.md and its plots (docs/bench-*.png):
#
#   1. bench/nbd.sh       fio over NBD: segmap, qemu-nbd, nbdkit
#   2. bench/cow.sh       writes after a snapshot, beside qcow2 overlays:
#                         first writes, random writes, four disks at once
#   3. bench/snaploop.sh  a snapshot every few seconds under random writes:
#                         the writer's rate and the space the containers hold
#   4. bench/stall.sh     first writes beside a stopped storage node
#   5. bench/snapshot.sh  snapshot time and writer pause against allocated segments
#   6. go test -bench MemoryPerEntry   table and agent bytes per mapped entry
#   7. go test -bench FaultRoundTrip   the map fault round trip
#   8. go test -bench DataPath         the agent data path beside pread/pwrite
#   9. go test -bench Snapshot         snapshot time in process, 1K to 1M segments
#  10. bench/export.sh    segmap export (full, incremental) beside nbdcopy
#  11. go test -bench 'Diff|Rollback'  diff and rollback time, 1K to 1M segments
#  12. bench/drain.sh     container drain beside cp, and a writer's p99 during it
#  13. bench/mirror.sh    a mirrored disk beside a single-container one: fio,
#                         replace-replica beside nbdcopy, a replica killed
#
# Knobs (environment): REPS (3) repetitions of every fio job, RUNTIME (8) s
# per nbd.sh job, SIZE_MB (1024) nbd.sh's disks, COW_MB (512) cow.sh's
# first-write disks, RND_MB (1024) and RND_S (10) its random-write disks and
# seconds, PAR_MB (128) and PAR_QD (1) its four parallel disks and each
# writer's depth, SNAPLOOP_MB (2048), SNAPLOOP_S (120) and SNAPLOOP_EVERY (5)
# snaploop.sh's disk, run and snapshot interval (its pool may hold a copy of
# the disk per snapshot: up to SNAPLOOP_MB x (SNAPLOOP_S / SNAPLOOP_EVERY + 1)
# on /var/tmp), STALL_MB (256) and STALL_T (60) stall.sh's disk and time
# limit, SIZES ("1000 10000 100000 1000000") snapshot.sh's segment counts,
# SNAPS (20) snapshots per path per size, COUNT (3) runs of each Go
# benchmark, FAULT_N (2000) and DATAPATH_N (40000) their iterations,
# EXPORT_MB (1024) export.sh's disk, DRAIN_MB (1024) the slots drain.sh's
# container holds, DRAIN_BEFORE (8) s its writer runs before the drain,
# MIRROR_MB (1024) mirror.sh's disks, FAIL_BEFORE (3) and FAIL_AFTER (8) s
# its writer runs before and after a replica is killed, DOC
# (docs/benchmarks.md) where the report goes (plots beside it), NOTE a line
# printed in bold at the top (say when the machine was shared).
set -euo pipefail
cd "$(dirname "$0")/.."
export REPS=${REPS:-3} RUNTIME=${RUNTIME:-8}
SIZE_MB=${SIZE_MB:-1024}
COW_MB=${COW_MB:-512}
export RND_MB=${RND_MB:-1024} RND_S=${RND_S:-10} PAR_MB=${PAR_MB:-128} PAR_QD=${PAR_QD:-1}
export SNAPLOOP_MB=${SNAPLOOP_MB:-2048} SNAPLOOP_S=${SNAPLOOP_S:-120} SNAPLOOP_EVERY=${SNAPLOOP_EVERY:-5}
export STALL_MB=${STALL_MB:-256} STALL_T=${STALL_T:-60}
export SIZES=${SIZES:-1000 10000 100000 1000000}
export SNAPS=${SNAPS:-20}
export EXPORT_MB=${EXPORT_MB:-1024}
export DRAIN_MB=${DRAIN_MB:-1024} DRAIN_BEFORE=${DRAIN_BEFORE:-8}
export MIRROR_MB=${MIRROR_MB:-1024} FAIL_BEFORE=${FAIL_BEFORE:-3} FAIL_AFTER=${FAIL_AFTER:-8}
COUNT=${COUNT:-3}
FAULT_N=${FAULT_N:-2000}
DATAPATH_N=${DATAPATH_N:-40000}
DOC=${DOC:-docs/benchmarks.md}
NOTE=${NOTE:-}

# gnuplot draws the plots: installed here when missing, or this fails.
./scripts/deps.sh bench
work=$(mktemp -d /var/tmp/segmap-benchrun.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

go build -o "$work/segmap" ./cmd/segmap
export SEGMAP_BIN=$work/segmap
export RESULTS=$work/results.jsonl
: >"$RESULTS"

$PY - >"$work/env.json" <<PYEOF
import json, os, platform, subprocess
jobs = []
on = False
for l in open("bench/nbd.sh"):
    if l.startswith("jobs=("): on = True; continue
    if on and l.startswith(")"): break
    if on: jobs.append(l.strip().strip('"'))
import datetime
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
# The commit measured (with -dirty if the tree had changes) and when it was made.
commit = git("describe", "--always", "--dirty", "--abbrev=12")
print(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.platform(),
    "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
    "commit": commit, "commit_date": git("show", "-s", "--format=%cI", "HEAD"),
    "note": """$NOTE""", "nbd_jobs": jobs,
    "knobs": {"REPS": "$REPS", "RUNTIME": "$RUNTIME", "SIZE_MB": "$SIZE_MB", "COW_MB": "$COW_MB",
              "RND_MB": "$RND_MB", "RND_S": "$RND_S", "PAR_MB": "$PAR_MB", "PAR_QD": "$PAR_QD",
              "SNAPLOOP_MB": "$SNAPLOOP_MB", "SNAPLOOP_S": "$SNAPLOOP_S", "SNAPLOOP_EVERY": "$SNAPLOOP_EVERY",
              "STALL_MB": "$STALL_MB", "STALL_T": "$STALL_T",
              "SIZES": "$SIZES", "SNAPS": "$SNAPS", "COUNT": "$COUNT", "FAULT_N": "$FAULT_N",
              "DATAPATH_N": "$DATAPATH_N", "EXPORT_MB": "$EXPORT_MB",
              "DRAIN_MB": "$DRAIN_MB", "DRAIN_BEFORE": "$DRAIN_BEFORE",
              "MIRROR_MB": "$MIRROR_MB", "FAIL_BEFORE": "$FAIL_BEFORE", "FAIL_AFTER": "$FAIL_AFTER"}}))
PYEOF

step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }
step "1/13 fio over NBD (bench/nbd.sh $SIZE_MB)"
bench/nbd.sh "$SIZE_MB" >&2
step "2/13 writes after a snapshot (bench/cow.sh $COW_MB)"
bench/cow.sh "$COW_MB"
step "3/13 a snapshot every ${SNAPLOOP_EVERY} s under writes (bench/snaploop.sh)"
bench/snaploop.sh
step "4/13 first writes beside a stalled container (bench/stall.sh)"
bench/stall.sh
step "5/13 snapshot time and writer pause (bench/snapshot.sh, SIZES=$SIZES)"
bench/snapshot.sh
step "6/13 memory per entry"
go test -run XXX -bench MemoryPerEntry -benchtime 1x -count "$COUNT" ./internal/table ./internal/agent | tee "$work/mem.txt" >&2
step "7/13 fault round trip"
go test -run XXX -bench FaultRoundTrip -benchtime "${FAULT_N}x" -count "$COUNT" ./internal/rpc/transport | tee "$work/fault.txt" >&2
step "8/13 agent data path"
go test -run XXX -bench DataPath -benchtime "${DATAPATH_N}x" -count "$COUNT" ./internal/agent | tee "$work/datapath.txt" >&2
step "9/13 snapshot in process"
go test -run XXX -bench '^BenchmarkSnapshot$' -benchtime 20x -count "$COUNT" ./internal/controller | tee "$work/snapshot.txt" >&2
step "10/13 export and incremental export (bench/export.sh, EXPORT_MB=$EXPORT_MB)"
bench/export.sh
step "11/13 diff and rollback against table size"
go test -run XXX -bench '^Benchmark(Diff|Rollback)$' -benchtime 200x -count "$COUNT" ./internal/controller | tee "$work/lineage.txt" >&2
step "12/13 container drain beside cp (bench/drain.sh, DRAIN_MB=$DRAIN_MB)"
bench/drain.sh
step "13/13 mirrored containers (bench/mirror.sh, MIRROR_MB=$MIRROR_MB)"
bench/mirror.sh
# The raw results beside the report, for anyone who wants other figures;
# the previous run's go beside this run's in the report (prev-*).
raw="$(dirname "$DOC")/bench-raw"
[ ! -f "$raw/results.jsonl" ] || cp "$raw/results.jsonl" "$work/prev-results.jsonl"
[ ! -f "$raw/env.json" ] || cp "$raw/env.json" "$work/prev-env.json"
mkdir -p "$raw"
cp "$RESULTS" "$work/env.json" "$work"/*.txt "$(dirname "$DOC")/bench-raw/"
$PY bench/report.py "$work" "$DOC" "$(dirname "$DOC")"
