#!/usr/bin/env bash
# bench/stall.sh: does a stalled container delay the faults of other disks?
# Each rep: a fresh 'segmap up' and two storage nodes ('segmap storage',
# plaintext on loopback), each serving one export added as an nbd://
# container. Disks are placed by pool: a disk's slots come from containers
# of its segment size, so the container on node A has 128 KiB slots and
# disk A 128 KiB segments, the one on node B 64 KiB slots and disk B 64 KiB
# segments ('segmap up' keeps its own 1 MiB pool, which neither uses). Disk B
# (STALL_MB) and disk A (4 x STALL_MB, so that its writer is still faulting
# when its node stops) are filled, then, interleaved:
#
#   calm     disk B snapshotted; one 4 KiB write per segment of B (the
#            strided first-write pattern of cow.sh, depth 1): every write a
#            copy-on-write fault; nothing stalled
#   stalled  disks A and B snapshotted; a writer starts the same pattern on
#            A, at depth 16; after STALL_LEAD seconds node A is stopped (SIGSTOP) with
#            A's writer faulting on it (the line says a_done_early if it had
#            finished: then nothing was measured); then B's pass as in calm;
#            then node A is continued (SIGCONT) and A's writer finishes
#
# The figure is fio's completion latency (clat) percentiles of B's first
# writes. Every fio runs under 'timeout' (B's passes STALL_T seconds, A's
# twice that): a pass that hangs behind the stalled node is killed, and its
# line says "stuck", with the figures of fio's last report before the kill
# (fio reports every second). The stalled line also keeps A's writer's exit
# status (a_rc: 0 if it finished once its node was continued).
# One JSON line ("bench": "stall") per case and rep.
# Usage: bench/stall.sh ; env REPS (3), STALL_MB (256), STALL_T (60),
# STALL_LEAD (0.5), RESULTS (JSON lines appended), SEGMAP_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
STALL_MB=${STALL_MB:-256}
STALL_T=${STALL_T:-60}
STALL_LEAD=${STALL_LEAD:-0.5}
RESULTS=${RESULTS:-/dev/stdout}
work=$(mktemp -d /var/tmp/segmap-stall.XXXXXX)
pids=()
. bench/lib.sh
trap bench_cleanup EXIT

if [ -n "${SEGMAP_BIN:-}" ]; then cp "$SEGMAP_BIN" "$work/segmap"; else go build -o "$work/segmap" ./cmd/segmap; fi

# first DISK SEGKB MB LIMIT QD: sets fa to the command of one 4 KiB write
# per segment of DISK (MB MiB) at depth QD, killed after LIMIT seconds; fio JSON
# to stdout, a report every second (so that a pass killed while hung still
# says how far it got). The command is timeout itself: run in the
# background, $! is the process to stop (timeout passes a TERM on to fio).
first() {
  # --thread: a job process of its own would escape the kill.
  fa=(timeout -k 5 "$4" fio --name="$1" --ioengine=nbd --uri="nbd://127.0.0.1:$sp/$1" --rw=write --bs=4k
    --zonemode=strided --zonesize=4k --zonerange="$2"k --size="$3"M
    --io_size=$(($3 * 1024 / $2 * 4))k --iodepth="$5" --thread --output-format=json --status-interval=1)
}

# result CASE REP RC OUT [A_RC A_EARLY]: one line from B's pass (RC its
# exit status; A_RC that of A's writer, A_EARLY 1 if it had finished before
# its node stopped). Figures come from fio's last
# report: its final one, or the last before it was killed ("stuck").
result() {
  $PY - "$1" "$2" "$3" "$4" "$STALL_T" "$((STALL_MB * 16))" "${5:-}" "${6:-}" >>"$RESULTS" <<'PYEOF'
import json, sys
case, rep, rc, path, limit, segs, arc, early = sys.argv[1:9]
r = {"bench": "stall", "case": case, "rep": int(rep), "rc": int(rc), "timeout_s": int(limit),
     "segments": int(segs), "stuck": int(rc) != 0, "writes": 0}
if arc:
    r["a_rc"], r["a_done_early"] = int(arc), early == "1"
text = open(path).read()
dec, i, last = json.JSONDecoder(), text.find("{"), None
while i >= 0:
    try:
        last, end = dec.raw_decode(text, i)
    except ValueError:
        break  # cut short by the kill
    i = text.find("{", end)
if last:
    w = last["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    r.update({"writes": w["total_ios"], "wps": w["iops"], "mean_ms": w["clat_ns"]["mean"] / 1e6,
              "p50_ms": pct.get("50.000000", 0) / 1e6, "p99_ms": pct.get("99.000000", 0) / 1e6,
              "max_ms": w["clat_ns"]["max"] / 1e6})
r["stuck"] = r["stuck"] or r["writes"] != int(segs)
print(json.dumps(r))
PYEOF
}

for rep in $(seq "$REPS"); do
  d="$work/rep-$rep"
  mkdir -p "$d"
  start_segmap "$d/data" 64M
  # Room for the disk and a copy per snapshot taken of it.
  start_storage "$d/node-a" a $((STALL_MB * 4 * 3))M
  napid=$stpid
  "${SEG[@]}" container add "nbd://127.0.0.1:$stp/a" --format --slot-size 128K >/dev/null
  start_storage "$d/node-b" b $((STALL_MB * 4))M
  nbpid=$stpid
  "${SEG[@]}" container add "nbd://127.0.0.1:$stp/b" --format --slot-size 64K >/dev/null
  "${SEG[@]}" disk create sa --size $((STALL_MB * 4))M --segment-size 128K >/dev/null
  "${SEG[@]}" disk create sb --size ${STALL_MB}M --segment-size 64K >/dev/null
  for x in "sa $((STALL_MB * 4))" "sb $STALL_MB"; do
    fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$sp/${x% *}" --rw=write --bs=1M --iodepth=8 \
      --size="${x#* }"M --output=/dev/null
  done

  "${SEG[@]}" snapshot sb --name sb@calm >/dev/null
  rc=0
  first sb 64 "$STALL_MB" "$STALL_T" 1
  "${fa[@]}" >"$d/calm.json" || rc=$?
  result calm "$rep" "$rc" "$d/calm.json"

  "${SEG[@]}" snapshot sa --name sa@stall >/dev/null
  "${SEG[@]}" snapshot sb --name sb@stall >/dev/null
  # A's writer (depth 16: a busy disk, faults waiting behind faults) has
  # time to finish once its node is continued.
  first sa 128 $((STALL_MB * 4)) $((2 * STALL_T + 1)) 16
  "${fa[@]}" >"$d/a.json" &
  apid=$!
  pids+=($apid)
  sleep "$STALL_LEAD"
  kill -STOP "$napid"
  early=0
  alive "$apid" || early=1
  rc=0
  first sb 64 "$STALL_MB" "$STALL_T" 1
  "${fa[@]}" >"$d/stalled.json" || rc=$?
  kill -CONT "$napid"
  arc=0
  wait "$apid" || arc=$?
  result stalled "$rep" "$rc" "$d/stalled.json" "$arc" "$early"
  stop_pid "$segpid"
  stop_pid "$napid"
  stop_pid "$nbpid"
  rm -rf "$d"
done
