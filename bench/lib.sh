# bench/lib.sh: helpers shared by the bench scripts (sourced, not run).
# The sourcing script sets 'work' (a scratch directory) and 'pids' (an array)
# and installs the trap: bench_cleanup kills every server it started.

PY=/usr/bin/python3

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# port prints a free loopback TCP port.
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT: wait (at most 10 s) until something listens on PORT. It
# looks at the socket table rather than connecting: qemu-nbd without -t
# would take a probe for its one client and exit.
wait_port() {
  for _ in $(seq 100); do
    [ -n "$(ss -ltnH "sport = :$1")" ] && return 0
    sleep 0.1
  done
  echo "bench: nothing listens on port $1" >&2
  return 1
}

# start_segmap DATA POOL_SIZE: start 'segmap up' on fresh ports; sets
# sp (NBD port), ap (admin port), segpid and SEG (the CLI, with its
# --controller) and waits for "ready".
start_segmap() {
  sp=$(port); ap=$(port)
  "$work/segmap" up --data "$1" --nbd-listen 127.0.0.1:$sp --admin-listen 127.0.0.1:$ap \
    --pool-size "$2" --pool-files 4 >"$1.log" 2>&1 &
  segpid=$!
  pids+=($segpid)
  for _ in $(seq 200); do grep -q '^ready' "$1.log" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ready' "$1.log" || { echo "bench: segmap up did not start:" >&2; cat "$1.log" >&2; return 1; }
  SEG=("$work/segmap" --controller 127.0.0.1:$ap)
}

# stop_pid PID: stop one server this script started and wait for it.
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# fio_summary FILE: reads fio's JSON output in FILE (past the line the nbd
# engine prints first) and prints the first job's "read" or "write" side,
# whichever moved bytes, as {"iops", "mbps", "lat_us", "ios", "secs"}.
fio_summary() {
  $PY - "$1" <<'PYEOF'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
op = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print(json.dumps({"iops": op["iops"], "mbps": op["bw_bytes"] / 1e6,
                  "lat_us": op["clat_ns"]["mean"] / 1e3, "ios": op["total_ios"],
                  "secs": op["runtime"] / 1e3}))
PYEOF
}
