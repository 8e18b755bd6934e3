#!/usr/bin/env bash
# fuzz.sh: run every fuzz target in the module for FUZZTIME each, one after
# the other, and keep the inputs the fuzzer found interesting as regression
# seeds under the package's testdata/fuzz/<Target>/ (go test runs them in
# every `make test`).
#
#   scripts/fuzz.sh [FUZZTIME] [TARGET ...]     (FUZZTIME: a Go duration, default 10m)
#   scripts/fuzz.sh --list                      (print "package target" per target)
#
# The targets are found, not listed by hand: every package whose test files
# declare a `func Fuzz...` is asked for its fuzz targets with
# `go test -list '^Fuzz'`, so a new target is fuzzed without editing this
# script. Each target runs with one worker (-parallel 1) so that a run
# leaves a core for other work; KEEP (default 40) bounds the new seeds kept
# per target per run, preferring the newest. A crash fails the run and
# leaves the failing input in testdata/fuzz (go test's own behaviour) with
# the command that reproduces it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

# targets prints "import-path dir target" for every fuzz target in the module.
targets() {
	local pkg dir files f
	go list -f '{{.ImportPath}} {{.Dir}} {{join .TestGoFiles " "}} {{join .XTestGoFiles " "}}' ./... |
		while read -r pkg dir files; do
			[ -n "$files" ] || continue
			# Only packages that may hold one are built to ask for the list.
			(cd "$dir" && grep -qE '^func Fuzz' $files) || continue
			go test -list '^Fuzz' "$pkg" | grep -E '^Fuzz' | while read -r f; do
				echo "$pkg $dir $f"
			done
		done
}

if [ "${1:-}" = "--list" ]; then
	targets | while read -r pkg dir f; do echo "$pkg $f"; done
	exit 0
fi

fuzztime=${1:-10m}
shift || true
keep=${KEEP:-40}

mapfile -t all < <(targets)
if [ "${#all[@]}" -eq 0 ]; then
	echo "fuzz: no fuzz targets found" >&2
	exit 1
fi
echo "== ${#all[@]} fuzz targets: $(for e in "${all[@]}"; do printf '%s ' "${e##* }"; done)"

cache=$(go env GOCACHE)/fuzz
status=0
for entry in "${all[@]}"; do
	read -r pkg dir target <<<"$entry"
	if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$target"; then
		continue
	fi
	echo "== $target ($pkg) for $fuzztime"
	start=$(date +%s)
	if ! go test -run XXX -fuzz "^${target}\$" -fuzztime "$fuzztime" -parallel 1 "$pkg"; then
		status=1
	fi
	echo "== $target: $(($(date +%s) - start)) s"
	# Keep the newest interesting inputs that are not seeds yet.
	src="$cache/$pkg/$target"
	dst="$dir/testdata/fuzz/$target"
	if [ -d "$src" ]; then
		mkdir -p "$dst"
		n=0
		for f in $(ls -t "$src"); do
			[ -e "$dst/$f" ] && continue
			cp "$src/$f" "$dst/$f"
			n=$((n + 1))
			[ "$n" -ge "$keep" ] && break
		done
		echo "== $target: kept $n new seeds in ${dst#"$PWD"/}"
	fi
done
exit $status
