#!/usr/bin/env bash
# fuzz.sh: run every fuzz target for FUZZTIME each, one after the other, and
# keep the inputs the fuzzer found interesting as regression seeds under the
# package's testdata/fuzz/<Target>/ (go test runs them in every `make test`).
#
#   scripts/fuzz.sh [FUZZTIME] [TARGET ...]     (FUZZTIME: a Go duration, default 10m)
#
# Each target runs with one worker (-parallel 1) so that a run leaves a core
# for other work; KEEP (default 40) bounds the new seeds kept per target per
# run, preferring the newest. A crash fails the run and leaves the failing
# input in testdata/fuzz (go test's own behaviour) with the command that
# reproduces it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

fuzztime=${1:-10m}
shift || true
keep=${KEEP:-40}

# package target, for every fuzz target in the tree.
all=(
	"./internal/nbd FuzzHandshake"
	"./internal/nbd FuzzTransmission"
	"./internal/nbd/nbdclient FuzzClient"
	"./internal/rpc/transport FuzzRPC"
	"./internal/meta FuzzRecord"
	"./internal/container FuzzReadHeader"
)

cache=$(go env GOCACHE)/fuzz/segmap
status=0
for entry in "${all[@]}"; do
	read -r pkg target <<<"$entry"
	if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$target"; then
		continue
	fi
	echo "== $target ($pkg) for $fuzztime"
	start=$(date +%s)
	if ! go test -run XXX -fuzz "^${target}\$" -fuzztime "$fuzztime" -parallel 1 "$pkg"; then
		status=1
	fi
	echo "== $target: $(( $(date +%s) - start )) s"
	# Keep the newest interesting inputs that are not seeds yet.
	src="$cache/${pkg#./}/$target"
	dst="${pkg#./}/testdata/fuzz/$target"
	if [ -d "$src" ]; then
		mkdir -p "$dst"
		n=0
		for f in $(ls -t "$src"); do
			[ -e "$dst/$f" ] && continue
			cp "$src/$f" "$dst/$f"
			n=$((n + 1))
			[ "$n" -ge "$keep" ] && break
		done
		echo "== $target: kept $n new seeds in $dst"
	fi
done
exit $status
