#!/usr/bin/env bash
# soak.sh: the reliability tests in their long form, for as long as asked.
#
#   scripts/soak.sh DURATION        (a Go duration: 30m, 2h, 1h30m)
#
# DURATION is shared out between the parts below, run one after another:
# each test part runs with SEGMAP_SOAK=<its share>, under which the tests
# keep going with fresh random seeds until their share has passed; the fuzz
# part runs every fuzz target (scripts/fuzz.sh) for an equal slice of its
# share. Each part's summary lines (t.Logf "summary: ...") are collected in
# soak-<time>.log, with a total at the end. A failure prints the seed and the
# command that reproduces it; the run goes on with the next part and exits
# non-zero at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

duration=${1:?usage: soak.sh DURATION (e.g. 30m, 2h)}

# seconds parses a Go-style duration (h, m, s parts).
seconds() {
	local d=$1 total=0 n unit
	if ! [[ $d =~ ^([0-9]+[hms])+$ ]]; then
		echo "soak: bad duration $d (use e.g. 90s, 30m, 2h, 1h30m)" >&2
		exit 2
	fi
	while [[ $d =~ ^([0-9]+)([hms])(.*)$ ]]; do
		n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]} d=${BASH_REMATCH[3]}
		case $unit in
		h) total=$((total + n * 3600)) ;;
		m) total=$((total + n * 60)) ;;
		s) total=$((total + n)) ;;
		esac
	done
	echo "$total"
}

total=$(seconds "$duration")

# name | package | -run pattern, for the test parts.
parts=(
	"crash-points|./internal/standalone|^TestCrashPoints$"
	"error-injection|./internal/standalone|^TestErrorInjection$"
	"kill-storms|./internal/e2e|^TestKillStorm"
	"linearizability|./internal/e2e|^TestLinearizable"
	"model|./internal/standalone|^TestModel$"
	"model-concurrent|./internal/standalone|^TestModelConcurrent$"
	"check-damage|./internal/e2e|^TestCheckRandomDamage$"
)
nparts=$((${#parts[@]} + 1)) # + fuzzing
share=$((total / nparts))
if [ "$share" -lt 60 ]; then
	echo "soak: $duration is too short for ${nparts} parts (at least $((60 * nparts))s)" >&2
	exit 2
fi

log=soak-$(date -u +%Y%m%dT%H%M%SZ).log
echo "soak: $duration in $nparts parts of ${share}s; log in $log" | tee "$log"
for p in "${parts[@]}"; do
	IFS='|' read -r name pkg pattern <<<"$p"
	echo "== $name: ${share}s ($(date -u +%T))"
	# The test's own timeout: its share plus time to finish the round it is in.
	SEGMAP_SOAK=${share}s go test -count=1 -v -timeout $((share + 900))s -run "$pattern" "$pkg" 2>&1 |
		tee -a "$log.full" | grep -E '^(--- |FAIL|ok|PASS)|summary:|seed'
	rc=${PIPESTATUS[0]}
	echo "== $name: exit $rc"
done 2>&1 | tee -a "$log"
status=$(grep -c '^== .*: exit [1-9]' "$log" || true)

# As many slices as fuzz.sh finds targets, so that none is left out.
targets=$(./scripts/fuzz.sh --list | wc -l)
[ "$targets" -gt 0 ] || targets=1
slice=$((share / targets))
[ "$slice" -gt 0 ] || slice=1
echo "== fuzzing: ${targets} targets x ${slice}s ($(date -u +%T))" | tee -a "$log"
./scripts/fuzz.sh "${slice}s" 2>&1 | tee -a "$log.full" | grep -E '^==|FAIL|panic' | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=$((status + 1))

echo "== summaries" | tee -a "$log"
sums=$(grep 'summary:' "$log" | sed 's/^ *//')
echo "$sums" | tee -a "$log"
[ "$status" -eq 0 ] && echo "soak: PASS ($duration)" || echo "soak: FAIL (see $log.full)"
exit $status
