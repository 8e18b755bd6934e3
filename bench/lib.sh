# bench/lib.sh: helpers shared by the bench scripts (sourced, not run).
# The sourcing script sets 'work' (a scratch directory) and 'pids' (an array)
# and installs the trap: bench_cleanup kills every server it started.

PY=/usr/bin/python3

bench_cleanup() {
  # SIGCONT too: a server left stopped (SIGSTOP) would never act on the
  # TERM. A minute for them all to stop, then SIGKILL.
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && kill -CONT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 600); do alive "$p" || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# held N PORTS_FILE CMD ARGS...: runs CMD in the background holding N
# listening loopback sockets, bound before it starts, on fds 3, 4, ...
# (pass them as fd:3, fd:4; LISTEN_FDS and LISTEN_PID name them too, for a
# server that takes systemd's socket activation); their ports go to
# PORTS_FILE, space-separated, once bound. The process is CMD itself
# (exec), so held_pid is its pid; it is added to pids. No port is found
# free first and bound later.
held() {
  local n=$1 pf=$2; shift 2
  rm -f "$pf"
  $PY -c '
import fcntl, os, socket, sys
n, pf = int(sys.argv[1]), sys.argv[2]
socks = []
for i in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    socks.append(s)
ports = " ".join(str(s.getsockname()[1]) for s in socks)
# Out of the way first (a socket may already sit on fd 3 or 4), then onto
# fds 3, 4, ... (dup2 makes them inheritable).
high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for s in socks]
for s in socks:
    s.close()
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
with open(pf + ".tmp", "w") as f:
    f.write(ports + "\n")
os.rename(pf + ".tmp", pf)
# For a server started by socket activation (qemu-nbd): the process that
# execs stays this one.
os.environ.update(LISTEN_FDS=str(n), LISTEN_PID=str(os.getpid()))
os.execvp(sys.argv[3], sys.argv[3:])
' "$n" "$pf" "$@" &
  held_pid=$!
  pids+=($held_pid)
  for _ in $(seq 100); do [ -s "$pf" ] && return 0; sleep 0.05; done
  echo "bench: $1 did not bind its sockets" >&2
  return 1
}

# start_segmap DATA POOL_SIZE: start 'segmap up' on sockets it inherits;
# sets sp (NBD port), ap (admin port), hp (HTTP port: metrics on), segpid and SEG (the CLI, with its
# --controller) and waits for "ready". SEGMAP_UP_FLAGS (words) are added to
# its flags: e.g. --controller-copies, to measure the controller copying
# shared segments instead of the agent.
start_segmap() {
  # shellcheck disable=SC2086 # SEGMAP_UP_FLAGS is split into flags
  held 3 "$1.ports" "$work/segmap" up --data "$1" --nbd-listen fd:3 --admin-listen fd:4 --http-listen fd:5 \
    --pool-size "$2" --pool-files 4 ${SEGMAP_UP_FLAGS:-} >"$1.log" 2>&1
  segpid=$held_pid
  read -r sp ap hp <"$1.ports"
  for _ in $(seq 200); do grep -q '^ready' "$1.log" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ready' "$1.log" || { echo "bench: segmap up did not start:" >&2; cat "$1.log" >&2; return 1; }
  SEG=("$work/segmap" --controller 127.0.0.1:$ap)
}

# start_storage DIR NAME SIZE: a storage node serving DIR, with one sparse
# export NAME of SIZE; sets stp (its port) and stpid.
start_storage() {
  "$work/segmap" storage create --dir "$1" "$2" --size "$3" >/dev/null
  held 1 "$1.ports" "$work/segmap" storage --insecure --listen fd:3 --dir "$1" >"$1.log" 2>&1
  stpid=$held_pid
  read -r stp <"$1.ports"
}

# du_bytes PATH...: bytes of blocks allocated under PATH (sparse files count
# only what is written).
du_bytes() { du --block-size=1 -s -c "$@" | awk 'END {print $1}'; }

# alive PID: whether PID runs (an exited child not yet waited for does not).
alive() { case $(ps -o stat= -p "$1" 2>/dev/null) in '' | Z*) return 1 ;; esac; }

# stop_pid PID: stop one server this script started and wait for it: a
# minute for a clean stop (SIGTERM), then SIGKILL.
stop_pid() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 600); do alive "$1" || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

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
