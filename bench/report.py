#!/usr/bin/python3
"""bench/report.py: turns the raw results of one 'make bench' run into
docs/benchmarks.md and its PNG plots (drawn with gnuplot).

Inputs, in the directory given as the first argument: results.jsonl (the JSON
lines of nbd.sh, cow.sh, snaploop.sh, stall.sh, snapshot.sh, export.sh,
drain.sh and mirror.sh),
mem.txt, fault.txt, datapath.txt, snapshot.txt and lineage.txt (go test -bench
output), env.json (the knobs and commands); and, when there was a previous run,
prev-results.jsonl and prev-env.json (its results.jsonl and env.json, which
the fio table shows beside this run's).
Usage: bench/report.py RESULTS_DIR DOC_PATH PLOT_DIR
"""
import datetime, json, os, re, statistics, subprocess, sys

rdir, doc, plotdir = sys.argv[1:4]
env = json.load(open(os.path.join(rdir, "env.json")))
rows = [json.loads(l) for l in open(os.path.join(rdir, "results.jsonl")) if l.strip()]
med = statistics.median


def p99(xs):
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def verdict(value, target, higher_is_better=True):
    """'met' or 'missed', by how much relative to the target."""
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    by = abs(value - target) / target  # the margin, as a share of the target
    return f"met (by {by * 100:.0f}%)" if ok else f"**missed by {by * 100:.0f}%**"


def gobench(path):
    """{(benchmark, sub): {metric: [values]}} from go test -bench output."""
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        m = re.match(r"^Benchmark(\w+)/(\S+?)(-\d+)?\s+\d+\s+(.*)$", line)
        if not m:
            continue
        fields = m.group(4).split()
        d = out.setdefault((m.group(1), m.group(2)), {})
        for v, unit in zip(fields[0::2], fields[1::2]):
            d.setdefault(unit, []).append(float(v))
    return out


L = []
# When the run was made and what it measured (env.json from bench/run.sh;
# a run older than those fields has only the short commit).
when = env.get("date") or f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
commit = env["commit"]
L += ["# Benchmarks", ""]
L += [f"Produced by `make bench` (`bench/run.sh`) on {when} UTC, host `{env['host']}`, "
      f"{env['cpus']} CPUs, {env['kernel']}; segmap at commit `{commit}`"
      + (f" ({env['commit_date']})" if env.get("commit_date") else "") + ".", "",
      f"**These figures measure the code at `{commit}`, not the code you are reading.** The code has moved on "
      f"since (`git log {commit.removesuffix('-dirty')}..HEAD` lists the commits this run did not measure); "
      "`make bench` measures the code you have and rewrites this page."
      + (" The tree had uncommitted changes when it was measured (`-dirty`)." if commit.endswith("-dirty") else "")]
if env.get("note"):
    L += ["", f"**{env['note']}**"]
L += ["", "Knobs of this run (environment variables of `make bench` / `bench/run.sh`): " +
      ", ".join(f"`{k}={env['knobs'][k]}`" for k in env["knobs"]) + ".", "",
      "Rerun everything: `make bench` (knobs as environment variables, e.g. "
      "`REPS=5 RUNTIME=10 SIZES=\"1000 1000000\" make bench`; quick look: "
      "`REPS=1 RUNTIME=2 SIZES=\"1000 10000\" COUNT=1 SNAPLOOP_S=20 make bench`). Each part alone: "
      "`bench/nbd.sh [SIZE_MB]`, `bench/cow.sh [COW_MB]`, `bench/snaploop.sh`, `bench/stall.sh`, "
      "`SIZES=... bench/snapshot.sh`, `bench/export.sh`, `bench/drain.sh`, `bench/mirror.sh` (they print JSON lines "
      "or a table), and the `go test` commands below. The raw results of this run are in `docs/bench-raw/`.", "",
      "Every server is on loopback TCP on the same machine and filesystem; jobs are interleaved "
      "between servers, each repeated `REPS` times; figures are medians. \"Target\" is the goal "
      "set in the issue; this run measures, it does not tune.", ""]

# The targets of the fault-path issue (issue 13), gathered from the sections
# below as (what, measured, target, verdict) and shown together first.
T = []
targets_at = len(L)

# --- 1. fio over NBD ----------------------------------------------------------
nbd = [r for r in rows if r.get("bench") == "nbd"]
if nbd:
    jobs = list(dict.fromkeys(r["job"] for r in nbd))

    def m(server, job, key):
        xs = [r[key] for r in nbd if r["server"] == server and r["job"] == job]
        return med(xs) if xs else None

    L += ["## 1. fio over NBD: segmap, qemu-nbd, nbdkit", "",
          f"One {env['knobs']['SIZE_MB']} MiB disk per server, every block written first; segmap: `segmap up`, "
          "1 MiB segments; qemu-nbd: `qemu-nbd -f raw -t -e 8 --cache=writeback --aio=threads FILE`; "
          "nbdkit: `nbdkit file FILE`. Each run:", "",
          "```",
          f"fio --name=JOB --ioengine=nbd --uri=nbd://127.0.0.1:PORT/EXPORT ARGS --size={env['knobs']['SIZE_MB']}M "
          f"--time_based --runtime={env['knobs']['RUNTIME']} --ramp_time=1 --output-format=json",
          "```", "",
          "| job | ARGS |", "|---|---|"]
    for j in env["nbd_jobs"]:
        name, args = j.split(None, 1)
        L.append(f"| {name} | `{' '.join(args.split())}` |")
    # The previous run's figures, as docs/bench-raw/ held them when this
    # run started (bench/run.sh saves them as prev-*): its ratios go beside
    # this run's, so that a change (metrics on the hot path, say) shows.
    prev_env = {}
    prev = []
    if os.path.exists(os.path.join(rdir, "prev-results.jsonl")):
        prev = [r for r in (json.loads(l) for l in open(os.path.join(rdir, "prev-results.jsonl")) if l.strip())
                if r.get("bench") == "nbd"]
    if os.path.exists(os.path.join(rdir, "prev-env.json")):
        prev_env = json.load(open(os.path.join(rdir, "prev-env.json")))

    def pm(server, job, key):
        xs = [r[key] for r in prev if r["server"] == server and r["job"] == job]
        return med(xs) if xs else None

    def pratio(job, key):
        a, b = pm("segmap", job, key), pm("qemu-nbd", job, key)
        return a / b if a is not None and b else None

    fmt = lambda x: "" if x is None else f"{x:.2f}"
    L += ["", "4x16: fio `numjobs=4`, each job its own NBD connection, depth 16 each (64 in flight).",
          "Ratios are segmap / qemu-nbd (throughput: above 1.0 is faster; latency: below 1.0 is faster). "
          "`segmap up` runs with its HTTP listener on (`--http-listen`): every Prometheus metric is registered "
          "and every request counted (docs/metrics.md), as in production."]
    if prev:
        pk = prev_env.get("knobs", {})
        L += [f"\"Last run\": the same ratio in the previous `make bench` (segmap at `{prev_env.get('commit', '?')}`, "
              f"{prev_env.get('date', '?')} UTC, REPS={pk.get('REPS', '?')}, RUNTIME={pk.get('RUNTIME', '?')}, "
              f"SIZE_MB={pk.get('SIZE_MB', '?')}), read from `docs/bench-raw/` as this run found it; on a shared "
              "machine, differences of 10-20 % between runs are noise."]
    else:
        L += ["\"Last run\": no previous results in `docs/bench-raw/`."]
    L += ["", "| job | segmap | qemu-nbd | nbdkit | segmap / qemu-nbd | last run | target | | segmap lat (µs) | qemu-nbd lat (µs) | lat ratio | last run | target | |",
          "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|"]
    plot = []
    for job in jobs:
        key, unit = ("mbps", "MB/s") if "1m" in job else ("iops", "IOPS")
        s, q, k = (m(x, job, key) for x in ("segmap", "qemu-nbd", "nbdkit"))
        ls, lq = m("segmap", job, "lat_us"), m("qemu-nbd", job, "lat_us")
        ratio, lr = s / q, ls / lq
        t, v = "", ""
        if "qd32" in job or "1m" in job:
            t, v = "≥ 1.0", verdict(ratio, 1.0)
        lt, lv = "", ""
        if "qd1" in job:
            lt, lv = "≤ 1.1", verdict(lr, 1.1, higher_is_better=False)
        L.append(f"| {job} | {s:,.0f} {unit} | {q:,.0f} {unit} | {k:,.0f} {unit} | {ratio:.2f} | {fmt(pratio(job, key))} | {t} | {v} | "
                 f"{ls:.1f} | {lq:.1f} | {lr:.2f} | {fmt(pratio(job, 'lat_us'))} | {lt} | {lv} |")
        plot.append((job, ratio, k / q))
    L += ["", "Latency is fio's mean completion latency (clat).", "", "![fio over NBD](bench-nbd.png)", ""]
    with open(os.path.join(rdir, "nbd.dat"), "w") as f:
        for job, a, b in plot:
            f.write(f"{job} {a:.4f} {b:.4f}\n")

# --- 2. writes after a snapshot ----------------------------------------------------
cow = [r for r in rows if r.get("bench") == "cow"]
# The peer each segmap case's target is set against (issue 13): qcow2 at the
# same pattern, the default segment size against the subcluster overlay.
COW_PEER = {"segmap-64k": "qcow2-64k", "segmap-1m": "qcow2-sub-1m"}
if cow:
    L += ["## 2. First write after a snapshot", "",
          f"A {env['knobs']['COW_MB']} MiB disk, every segment written, then snapshotted: every segment is shared. "
          "Then exactly one 4 KiB write at the start of each segment (each one copies its segment):", "",
          "```",
          f"fio --name=cow --ioengine=nbd --uri=URI --rw=write --bs=4k --zonemode=strided --zonesize=4k "
          f"--zonerange=SEG --size={env['knobs']['COW_MB']}M --io_size=<4k x segments> --iodepth=QD --output-format=json",
          "```", "",
          "qcow2 beside it: `qemu-img create -f qcow2 -o OPTS -b base.raw -F raw overlay.qcow2` "
          "over a filled raw base, served by `qemu-nbd -f qcow2 --cache=writeback --aio=threads`; a fresh "
          "overlay (and a fresh segmap snapshot) for every run. `qcow2-64k`: `OPTS=cluster_size=64k`. "
          "`qcow2-sub-1m` writes the `segmap-1m` pattern (one write per MiB) to an overlay with subclusters, "
          "`OPTS=extended_l2=on,cluster_size=128k` (4 KiB subclusters: a 4 KiB write into a cluster the overlay "
          "lacks copies nothing), the best a qcow2 user can get; `qcow2-1m` writes the same pattern to a "
          "64 KiB-cluster overlay (context). Not the same work: qemu-nbd with cache=writeback "
          "syncs nothing until the client flushes, while each segmap copy is a map fault whose copy is flushed and "
          "whose map change is committed to bbolt (fsync) before the write is answered (README, Durability). "
          "`qcow2-64k-writethrough` (qemu-nbd `--cache=writethrough`: each write durable before it is answered) is "
          "shown for context; the targets are against the writeback overlays.", "",
          "| case | QD | writes per run | writes/s | mean lat (µs) | vs | ratio | target | |",
          "|---|---:|---:|---:|---:|---|---:|---|---|"]
    cases = list(dict.fromkeys(r["case"] for r in cow))
    plot = {}
    for qd in sorted(set(r["qd"] for r in cow)):
        for c in cases:
            xs = [r for r in cow if r["case"] == c and r["qd"] == qd]
            if not xs:
                continue
            w = med(r["wps"] for r in xs)
            plot[(c, qd)] = w
            peer, ratio, t, v = COW_PEER.get(c, ""), "", "", ""
            pws = [r["wps"] for r in cow if r["case"] == peer and r["qd"] == qd]
            if pws:
                ratio, t, v = f"{w / med(pws):.2f}", "≥ 1.0", verdict(w / med(pws), 1.0)
                T.append((f"first write after a snapshot, {c} vs {peer}, QD {qd}", f"{ratio}×", "≥ 1.0×", v))
            L.append(f"| {c} | {qd} | {xs[0]['writes']:,} | {w:,.0f} | {med(r['lat_us'] for r in xs):,.0f} | "
                     f"{peer} | {ratio} | {t} | {v} |")
    L += ["", "![first write after a snapshot](bench-cow.png)", ""]
    with open(os.path.join(rdir, "cow.dat"), "w") as f:
        for c in cases:
            f.write(f"{c} " + " ".join(f"{plot.get((c, qd), 0):.1f}" for qd in (1, 32)) + "\n")

rnd = [r for r in rows if r.get("bench") == "cowrand"]
if rnd:
    k = env["knobs"]
    L += ["### Random writes right after a snapshot", "",
          f"A {k.get('RND_MB', '?')} MiB disk of 1 MiB segments (the default), every segment written, snapshotted "
          f"just before each run; {k.get('RND_S', '?')} s of random 4 KiB writes at depth 16:", "",
          "```",
          f"fio --name=rand --ioengine=nbd --uri=URI --rw=randwrite --bs=4k --iodepth=16 --size={k.get('RND_MB', '?')}M "
          f"--runtime={k.get('RND_S', '?')} --time_based --end_fsync=1 --output-format=json",
          "```", "",
          "`segmap-snap`: that disk. `qcow2-sub`: a fresh subcluster overlay (`extended_l2=on,cluster_size=128k`) "
          "over a full raw base of the same size, qemu-nbd as above. `segmap-nosnap`: a second segmap disk filled "
          "the same way and never snapshotted (nothing to copy). Rate = writes / run time, the final fsync included.",
          "", "| case | writes/s | mean lat (µs) | segmap-snap / this | target | |", "|---|---:|---:|---:|---|---|"]
    snapw = med(r["iops"] for r in rnd if r["case"] == "segmap-snap") if any(r["case"] == "segmap-snap" for r in rnd) else None
    for c in dict.fromkeys(r["case"] for r in rnd):
        xs = [r for r in rnd if r["case"] == c]
        w = med(r["iops"] for r in xs)
        ratio, t, v = "", "", ""
        tgt = {"qcow2-sub": 0.8, "segmap-nosnap": 0.5}.get(c)
        if tgt and snapw is not None:
            ratio, t, v = f"{snapw / w:.2f}", f"≥ {tgt}", verdict(snapw / w, tgt)
            T.append((f"random 4 KiB writes after a snapshot, segmap-snap vs {c}", f"{ratio}×", f"≥ {tgt}×", v))
        L.append(f"| {c} | {w:,.0f} | {med(r['lat_us'] for r in xs):,.0f} | {ratio} | {t} | {v} |")
    L.append("")

par = [r for r in rows if r.get("bench") == "par"]
if par:
    k = env["knobs"]
    L += ["### Parallel faults: four disks at once", "",
          f"Disks of {k.get('PAR_MB', '?')} MiB in 64 KiB segments, every segment written; each run snapshots its "
          "disks afresh, then writes the strided first-write pattern above (one 4 KiB write per segment, "
          f"depth {k.get('PAR_QD', '?')} per writer): `one` on one disk, `four` on four disks at once "
          "(one fio, one job and NBD connection per disk). The fault rate is every job's writes over the "
          "longest job's time.", "",
          "| case | writers | writes per run | faults/s (all writers) | mean lat per write (µs) | vs one | target | |",
          "|---|---:|---:|---:|---:|---:|---|---|"]
    one = [r["fps"] for r in par if r["case"] == "one"]
    for c in dict.fromkeys(r["case"] for r in par):
        xs = [r for r in par if r["case"] == c]
        f_ = med(r["fps"] for r in xs)
        ratio, t, v = "", "", ""
        if c == "four" and one:
            ratio, t, v = f"{f_ / med(one):.2f}", "≥ 2.5", verdict(f_ / med(one), 2.5)
            T.append(("fault rate, four writers on four disks vs one writer", f"{ratio}×", "≥ 2.5×", v))
        L.append(f"| {c} | {xs[0]['writers']} | {xs[0]['writes']:,} | {f_:,.0f} | {med(r['lat_us'] for r in xs):,.0f} | {ratio} | {t} | {v} |")
    L.append("")

# --- 3. snapshots every few seconds under writes -------------------------------------
loop = [r for r in rows if r.get("bench") == "snaploop"]
if loop:
    r0 = loop[-1]
    gib = lambda b: f"{b / 2**30:,.2f} GiB"
    mm = lambda key: med(r[key] for r in loop)
    L += ["## 3. Snapshots every few seconds under random writes", "",
          f"Per run a fresh `segmap up` and one {r0['mb']:,} MiB disk of 1 MiB segments, every segment written. "
          f"Then, on that disk, {r0['secs']} s of random 4 KiB writes at depth 16, twice: without snapshots, "
          f"then with `segmap snapshot vm --name vm@lN` every {r0['every']} s (at 0, {r0['every']}, "
          f"{2 * r0['every']} ... s into the run: {r0['snapshots']} snapshots). Afterwards every snapshot is "
          "deleted (`segmap disk delete`).", "",
          "```",
          f"fio --name=loop --ioengine=nbd --uri=URI --rw=randwrite --bs=4k --iodepth=16 --size={r0['mb']}M "
          f"--runtime={r0['secs']} --time_based --output-format=json",
          "```", "",
          "*Space* is the blocks the container files hold (`du --block-size=1`: a sparse file counts only what "
          "is written): before the run with snapshots, after it, and after the snapshots are deleted; *growth* is "
          "after − before, set against the bytes the writer wrote in that run. `meta.db` (the map) is apart. "
          "Once the snapshots are deleted the space should be the disk's own again: the target allows 1% "
          "for metadata blocks of the container files. Medians over the runs.", "",
          "| what | measured | target | |", "|---|---:|---|---|"]
    ri = mm("iops_snap") / mm("iops_nosnap")
    growth = [(r["du_after"] - r["du_before"]) / r["written"] for r in loop]
    back = [r["du_deleted"] / r["du_before"] for r in loop]
    L += [f"| writer without snapshots (writes/s) | {mm('iops_nosnap'):,.0f} | | |",
          f"| writer with a snapshot every {r0['every']} s (writes/s) | {mm('iops_snap'):,.0f} | | |",
          f"| with / without | {ri:.2f} | ≥ 0.5 | {verdict(ri, 0.5)} |",
          f"| writer's p99 latency with snapshots (ms) | {mm('p99_us_snap') / 1e3:,.1f} | | |",
          f"| snapshot CLI round trip, p50 / max (ms) | {med(x for r in loop for x in r['snap_ms']):,.0f} / "
          f"{max(x for r in loop for x in r['snap_ms']):,.0f} | | |",
          f"| disk's own allocated bytes (`disk info`) | {gib(mm('own'))} | | |",
          f"| space before | {gib(mm('du_before'))} | | |",
          f"| space after the run with snapshots | {gib(mm('du_after'))} | | |",
          f"| bytes written in that run | {gib(mm('written'))} | | |",
          f"| growth / bytes written | {med(growth):.2f} | ≤ 2.0 | {verdict(med(growth), 2.0, False)} |",
          f"| space after deleting the snapshots | {gib(mm('du_deleted'))} | | |",
          f"| after deleting / before | {med(back):.3f} | ≤ 1.01 | {verdict(med(back), 1.01, False)} |",
          f"| `meta.db` before / after the run with snapshots | {mm('meta_before') / 2**20:,.1f} / {mm('meta_after') / 2**20:,.1f} MiB | | |",
          f"| used by `segmap status`: before / after / after deleting | {gib(mm('used_before'))} / {gib(mm('used_after'))} / "
          f"{gib(mm('used_deleted'))} | | |"]
    if all("stored_after" in r for r in loop):
        L += [f"| on storage by `segmap status`: after / after deleting (du: {gib(mm('du_after'))} / {gib(mm('du_deleted'))}) | "
              f"{gib(mm('stored_after'))} / {gib(mm('stored_deleted'))} | | |",
              f"| held by snapshots by `segmap status`: after / after deleting | {gib(mm('held_after'))} / "
              f"{gib(mm('held_deleted'))} | | |"]
    T.append((f"writer with a snapshot every {r0['every']} s vs none", f"{ri:.2f}×", "≥ 0.5×", verdict(ri, 0.5)))
    T.append(("space growth / bytes written, snapshots every few seconds", f"{med(growth):.2f}×", "≤ 2.0×",
              verdict(med(growth), 2.0, False)))
    T.append(("space after deleting the snapshots / before", f"{med(back):.3f}×", "≤ 1.01×", verdict(med(back), 1.01, False)))
    L += ["", "What `segmap status` and `segmap disk list` printed after the run with snapshots (last run), "
              "to set beside the blocks measured above:", "", "```"] + r0["status_text"].rstrip().splitlines() + \
         [""] + r0["list_text"].rstrip().splitlines() + ["```", ""]

# --- 4. a stalled container --------------------------------------------------------
stall = [r for r in rows if r.get("bench") == "stall"]
if stall:
    r0 = stall[0]
    L += ["## 4. A stalled container", "",
          "Per run a fresh `segmap up` and two storage nodes (`segmap storage`), each serving one export added as "
          "an `nbd://` container (`segmap container add nbd://... --format`). Disks are placed by pool: node A's "
          "container has 128 KiB slots and disk A (4 times B's size) 128 KiB segments, node B's 64 KiB slots "
          f"and disk B 64 KiB segments ({r0['segments']:,} of them). *calm*: B snapshotted, then one 4 KiB write "
          "per segment of B (the strided pattern of section 2, depth 1), each a copy-on-write fault. *stalled*: "
          "A and B snapshotted, a writer starts the same pattern on A at depth 16, node A is stopped (SIGSTOP) while that "
          "writer faults on it, then B's pass as in calm; then node A is continued (SIGCONT). Latency is fio's "
          f"completion latency of B's writes. A pass not done within {r0['timeout_s']} s is killed and counted "
          "*stuck* (its figures are fio's last report before the kill). The verdict takes the worst run's p99 "
          "(a stuck run's is unbounded): the target is that no fault of B waits behind A.", "",
          "| case | runs | stuck runs | B's writes done (median) | p50 (ms) | p99 (ms), median / worst | max (ms) | target | |",
          "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in dict.fromkeys(r["case"] for r in stall):
        xs = [r for r in stall if r["case"] == c]
        done = [r for r in xs if not r["stuck"]]
        p99s = [r["p99_ms"] if not r["stuck"] else float("inf") for r in xs]
        worst = max(p99s)
        fmt = lambda x: "stuck" if x == float("inf") else f"{x:,.1f}"
        p50 = f"{med(r['p50_ms'] for r in done):,.1f}" if done else ""
        mx = f"{max(r['max_ms'] for r in done):,.1f}" if done else ""
        t, v = "", ""
        if c == "stalled":
            if any(r.get("a_done_early") for r in xs):
                t, v = "< 10 ms", "n/a (A's writer finished before its node stopped)"
            else:
                t = "< 10 ms"
                v = verdict(worst, 10, False) if worst != float("inf") else \
                    f"**missed: {len(xs) - len(done)} of {len(xs)} runs stuck**"
            T.append(("first-write p99 on a disk beside a stalled container", f"{fmt(worst)} ms" if worst != float("inf") else "stuck", "< 10 ms", v))
        L.append(f"| {c} | {len(xs)} | {len(xs) - len(done)} | {med(r['writes'] or 0 for r in xs):,.0f} of {r0['segments']:,} | "
                 f"{p50} | {fmt(med(p99s))} / {fmt(worst)} | {mx} | {t} | {v} |")
    L.append("")

# --- 5. snapshot time and writer pause ----------------------------------------
snap = sorted((r for r in rows if r.get("bench") == "snap"), key=lambda r: r["segments"])
if snap:
    L += ["## 5. Snapshot time and the writer's pause", "",
          "For each size a fresh `segmap up` and a disk of N segments of 64 KiB, every segment allocated at creation "
          "(*allocation* is the rate of that preallocation):", "",
          "```",
          "segmap disk create snap --size <N x 64K> --segment-size 64K --preallocate",
          f"bench/snappause -disk snap -other other -snapshots {env['knobs']['SNAPS']} ...",
          "```", "",
          "`snappause` runs two writers (4 KiB writes at queue depth 1, one NBD connection each): *same* rewrites "
          "block 0 of the disk being snapshotted (so its first write after each snapshot is also a copy-on-write "
          "fault), *other* rewrites block 0 of a second disk. It takes `SNAPS` snapshots with the CLI "
          "(`segmap snapshot snap --name ...`, a process round trip) then `SNAPS` with one admin gRPC `Snapshot` "
          "call on an open connection (server time plus one loopback round trip: the CLI prints no server-side "
          "time), 300 ms apart. *disk info* is the median round trip of a `segmap disk info` process on the same "
          "disk, beside the CLI snapshot for scale: it is not subtracted from anything, because it counts the "
          "disk's allocated space and so grows with the segments, while a snapshot does not. "
          "A snapshot's *pause* is the longest gap between two consecutive completions of a writer that overlaps "
          "the snapshot; *pause p99* is the 99th percentile of those per-snapshot pauses (with a handful of "
          "snapshots, their maximum); *gap p99* pools every completion gap overlapping a snapshot, *idle* every "
          "gap overlapping none (the writer's normal rhythm).", "",
          "| segments | allocation (segments/s) | CLI snapshot p50 (ms) | disk info p50 (ms) | gRPC snapshot p50 (ms) | target < 20 ms | |"
          " pause same, p50 / p99 (ms) | target < 10 ms | | gap p99 same (ms) | pause other, p50 / p99 (ms) | gap p99 other (ms) | gap p99 idle (ms) |",
          "|---:|---:|---:|---:|---:|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in snap:
        cli, rpc = med(r["cli_ms"]), med(r["grpc_ms"])
        r["_rpc"] = rpc
        T.append((f"writer's pause during a snapshot, p99, {r['segments']:,} segments", f"{p99(r['pause_same_ms']):.1f} ms",
                  "< 10 ms", verdict(p99(r["pause_same_ms"]), 10, False)))
        L.append(f"| {r['segments']:,} | {r['alloc_per_s']:,.0f} | {cli:.1f} | {r['info_cli_ms']:.1f} | {rpc:.1f} | < 20 | "
                 f"{verdict(rpc, 20, False)} | {med(r['pause_same_ms']):.1f} / {p99(r['pause_same_ms']):.1f} | "
                 f"< 10 | {verdict(p99(r['pause_same_ms']), 10, False)} | {r['gap_p99_same_ms']:.2f} | "
                 f"{med(r['pause_other_ms']):.1f} / {p99(r['pause_other_ms']):.1f} | {r['gap_p99_other_ms']:.2f} | {r['gap_p99_idle_same_ms']:.2f} |")
    lo, hi = snap[0], snap[-1]
    if hi["segments"] > lo["segments"]:
        g = hi["_rpc"] / lo["_rpc"]
        L += ["", f"Scaling: gRPC snapshot p50 at {hi['segments']:,} segments / at {lo['segments']:,} = **{g:.1f}×** "
                  f"(target ≤ 2×: {verdict(g, 2.0, False)})."]
    L += ["", "Verdicts on the snapshot time use the gRPC p50; on the pause, the same-disk pause p99. "
              "Every gap, pause and time comes from the same snapshots (CLI and gRPC together).", "",
          "![snapshot time and writer pause](bench-snapshot.png)", ""]
    with open(os.path.join(rdir, "snap.dat"), "w") as f:
        for r in snap:
            f.write(f"{r['segments']} {med(r['cli_ms']):.3f} {r['_rpc']:.3f} {p99(r['pause_same_ms']):.3f} {p99(r['pause_other_ms']):.3f}\n")

# --- 6. memory per entry ------------------------------------------------------
mem = gobench(os.path.join(rdir, "mem.txt"))
if mem or snap:
    L += ["## 6. Memory per mapped entry", "",
          f"`go test -run XXX -bench MemoryPerEntry -benchtime 1x -count {env['knobs']['COUNT']} ./internal/table ./internal/agent`: "
          "live heap growth (runtime.MemStats after GC) per loaded entry. The agent's figure loads a 1k- or "
          "1M-entry table through its set_entry commands; the table's *sparse* case maps one entry in 16 "
          "(a touched page of 1024 entries is allocated whole). At 1k entries the agent's per-disk fixed cost "
          "(its Disk, epoch, page index) is spread over few entries.", "",
          "| what | bytes/entry | target | |", "|---|---:|---|---|"]
    pkg = {"table": [], "agent": []}
    for (bench, sub), d in mem.items():
        v = med(d["bytes/entry"])
        # The agent's sub-benchmarks are named by size only.
        who = "agent" if not sub.startswith(("dense", "sparse")) else "table"
        t, vv = ("≤ 16", verdict(v, 16, False)) if who == "agent" else ("", "")
        L.append(f"| {who}: {sub} | {v:.2f} | {t} | {vv} |")
    if snap:
        L += ["", "The controller keeps no table in memory: it reads them from bbolt (pages of 1024 entries) in each "
                  "transaction. What it holds per entry is on disk, `meta.db` (allocated entries, their reference "
                  "counts, free-slot state; bbolt grows the file in steps, so small sizes round up). Beside it, the "
                  "whole `segmap up` process's resident memory growth over the allocation (agent table, bbolt's "
                  "mmap pages touched, Go heap slack) per entry:", "",
              "| segments | meta.db (bytes) | meta.db growth / entry | after the snapshots (bytes) | segmap up RSS growth / entry |",
              "|---:|---:|---:|---:|---:|"]
        for r in snap:
            L.append(f"| {r['segments']:,} | {r['meta_bytes']:,} | {r['meta_bytes_per_entry']:.1f} | {r['meta_bytes_after_snaps']:,} | {r['rss_bytes_per_entry']:.1f} |")
    L.append("")

# --- 7. fault round trip --------------------------------------------------------
fault = gobench(os.path.join(rdir, "fault.txt"))
if fault:
    L += ["## 7. Map fault round trip", "",
          f"`go test -run XXX -bench FaultRoundTrip -benchtime {env['knobs']['FAULT_N']}x -count {env['knobs']['COUNT']} ./internal/rpc/transport`: "
          "agent → controller → agent over loopback gRPC, controller on bbolt; medians over the runs:", "",
          "| fault | p50 (µs) | p99 (µs) | what it costs |", "|---|---:|---:|---|"]
    what = {"load": "read of a Zero segment: one gRPC round trip and a bbolt read",
            "allocate": "first write to a Zero segment: one bbolt commit (free slots are kept zero, so nothing is punched)"}
    for (bench, sub), d in fault.items():
        L.append(f"| {sub} | {med(d['p50-us']):,.0f} | {med(d['p99-us']):,.0f} | {what.get(sub, '')} |")
    L += ["", "Raw output:", "", "```"] + [l.rstrip() for l in open(os.path.join(rdir, "fault.txt")) if l.startswith("Benchmark")] + ["```", ""]

# --- 8. agent data path -----------------------------------------------------------
dp = gobench(os.path.join(rdir, "datapath.txt"))
if dp:
    L += ["## 8. Agent data path, in process", "",
          f"`go test -run XXX -bench DataPath -benchtime {env['knobs']['DATAPATH_N']}x -count {env['knobs']['COUNT']} ./internal/agent`: "
          "an agent on a file container beside pread/pwrite on a plain file, interleaved; direct time / agent time "
          "(1.0 = as fast as direct):", "", "| job | direct / agent |", "|---|---:|"]
    for (bench, sub), d in dp.items():
        L.append(f"| {sub} | {med(d['direct/agent']):.2f} |")
    L.append("")

# --- 9. snapshot in process ------------------------------------------------------
sb = gobench(os.path.join(rdir, "snapshot.txt"))
if sb:
    L += ["## 9. Snapshot time in process", "",
          f"`go test -run XXX -bench '^BenchmarkSnapshot$' -benchtime 20x -count {env['knobs']['COUNT']} ./internal/controller`: "
          "a disk of N allocated 64 KiB segments (mapped in the store directly), two agents mapping it, 20 snapshots "
          "per run through `Controller.Snapshot` (the No-write broadcast to both agents, one bbolt transaction); "
          "median over the runs of each run's median:", "",
          "| segments | snapshot p50 (ms) | vs 1,000 segments | target |", "|---:|---:|---:|---|"]
    base = None
    for (bench, sub), d in sorted(sb.items(), key=lambda kv: int(kv[0][1].split("=")[1])):
        p50 = med(d["p50-ms"])
        n = int(sub.split("=")[1])
        base = base or p50
        t = f"< 20 ms: {verdict(p50, 20, False)}"
        if n == 1_000_000:
            t += f"; ≤ 2× the 1,000-segment time: {verdict(p50 / base, 2, False)}"
        L.append(f"| {n:,} | {p50:.2f} | {p50 / base:.2f}× | {t} |")
    L += ["", "Raw output:", "", "```"] + [l.rstrip() for l in open(os.path.join(rdir, "snapshot.txt")) if l.startswith("Benchmark")] + ["```", ""]

# --- 10. export ----------------------------------------------------------------
ex = [r for r in rows if r.get("bench") == "export"]
if ex:
    def exmed(c):
        xs = [r["seconds"] for r in ex if r["case"] == c]
        return med(xs) if xs else None
    mb = ex[0]["disk_mb"]
    full, incr = exmed("export"), exmed("export-incr")
    nseg, nq = exmed("nbdcopy-segmap"), exmed("nbdcopy-qemu")
    size = med([r["bytes"] for r in ex if r["case"] == "export"])
    isize = med([r["bytes"] for r in ex if r["case"] == "export-incr"])
    L += ["## 10. Export and incremental export", "",
          f"`bench/export.sh`: a snapshot of a {mb} MiB disk (1 MiB segments) holding random data in every other "
          "MiB, exported with `segmap export SNAP > /dev/null` (the CLI process, the gRPC stream and the "
          "controller reading the containers), beside `nbdcopy URI null:` of the same snapshot from segmap and "
          "of the same bytes from `qemu-nbd -r` over a raw file; then 1 % of the disk rewritten in 4 KiB blocks "
          "and exported incrementally (`--from` the first snapshot). Medians of "
          f"{env['knobs']['REPS']} reps, interleaved:", "",
          "| case | seconds | MB/s of data | vs nbdcopy from qemu-nbd | target |", "|---|---:|---:|---:|---|"]
    data = mb / 2 * 1.048576
    L.append(f"| segmap export | {full:.3f} | {data / full:.0f} | {nq / full:.2f}× | ≥ 1.0×: {verdict(nq / full, 1.0)} |")
    L.append(f"| nbdcopy from segmap | {nseg:.3f} | {data / nseg:.0f} | {nq / nseg:.2f}× | |")
    L.append(f"| nbdcopy from qemu-nbd | {nq:.3f} | {data / nq:.0f} | 1.00× | |")
    L.append(f"| segmap export --from (1 % changed) | {incr:.3f} | | | ≤ 2 % of the full export: "
             f"{incr / full * 100:.1f} %, {verdict(incr / full, 0.02, False)} |")
    L += ["", f"Stream sizes: full {size / 1e6:.1f} MB, incremental {isize / 1e6:.2f} MB "
          f"({isize / (mb * 1024 * 1024 / 100):.2f}× the bytes rewritten). The incremental export's time is mostly "
          "the CLI's start and the gRPC round trip, which the full export pays too.", ""]

# --- 11. diff and rollback --------------------------------------------------------
lb = gobench(os.path.join(rdir, "lineage.txt"))
if lb:
    L += ["## 11. Diff and rollback against table size", "",
          f"`go test -run XXX -bench '^Benchmark(Diff|Rollback)$' -benchtime 200x -count {env['knobs']['COUNT']} ./internal/controller`: "
          "a disk of N mapped 64 KiB segments and its snapshot, four segments of one table page changed since; "
          "`Controller.Diff` of the two, and `Controller.Rollback` of the disk to the snapshot (one bbolt "
          "transaction each); medians over the runs:", "",
          "| operation | 1,000 segments (ms) | 1,000,000 segments (ms) | ratio | target |", "|---|---:|---:|---:|---|"]
    for name in ("Diff", "Rollback"):
        a = lb.get((name, "segments=1000"), {}).get("ns/op")
        b = lb.get((name, "segments=1000000"), {}).get("ns/op")
        if a and b:
            r = med(b) / med(a)
            L.append(f"| {name.lower()} | {med(a) / 1e6:.3f} | {med(b) / 1e6:.3f} | {r:.2f}× | ≤ 2×: {verdict(r, 2, False)} |")
    L += ["", "Raw output:", "", "```"] + [l.rstrip() for l in open(os.path.join(rdir, "lineage.txt")) if l.startswith("Benchmark")] + ["```", ""]

# --- 12. container drain ------------------------------------------------------------
dr = [r for r in rows if r.get("bench") == "drain"]
if dr:
    def dmed(key):
        xs = [r[key] for r in dr if r.get(key) is not None]
        return med(xs) if xs else None
    mb, qd = dr[0]["mb"], dr[0]["qd"]
    data = mb * 1.048576  # MB moved
    ds, cs, ls = dmed("drain_s"), dmed("cp_s"), dmed("drain_loaded_s")
    ratio = med([r["cp_s"] / r["drain_s"] for r in dr])
    L += ["## 12. Container drain beside cp", "",
          f"`bench/drain.sh`: per rep a fresh `segmap up` whose pool is one container file (`--pool-files 1`), and a "
          f"{mb} MiB disk of 1 MiB segments filled with random data (`nbdcopy` from a raw file): that container "
          f"holds {mb} slots. A second, empty container file is added on the same filesystem and "
          "`segmap container drain` of the first is timed, nothing else running. Beside it, "
          f"`cp --reflink=never` of the {mb} MiB raw file to a new file on the same filesystem followed by "
          "`sync FILE` (its fsync): a drain flushes each copy and commits the move before it frees the old slot, "
          "so cp is timed to its data being durable too. Each timed step starts after a `sync`; both sources are "
          "in the page cache (caches are not dropped). Ratio = cp time / drain time, the median of each rep's "
          f"ratio ({len(dr)} reps, fresh `segmap up` each):", "",
          "| case | seconds | MB/s | cp / drain | target | |", "|---|---:|---:|---:|---|---|",
          f"| segmap container drain ({dmed('slots'):,.0f} slots) | {ds:.2f} | {data / ds:,.0f} | {ratio:.2f} | ≥ 0.5 | "
          f"{verdict(ratio, 0.5)} |",
          f"| cp --reflink=never + sync FILE | {cs:.2f} | {data / cs:,.0f} | | | |",
          f"| segmap container drain under the writer below | {ls:.2f} | {data / ls:,.0f} | | | |", "",
          "### A writer's latency during a drain", "",
          "A third container is added and the same disk, now on the second container, gets a writer; after "
          f"{env['knobs'].get('DRAIN_BEFORE', '?')} s the second container is drained under it, and the writer is "
          "stopped when the drain ends:", "",
          "```",
          f"fio --name=drainlat --ioengine=nbd --uri=URI --rw=randwrite --bs=4k --iodepth={qd} --size={mb}M "
          "--time_based --write_lat_log=lat --log_unix_epoch=1",
          "```", "",
          "Its per-I/O completion latency log is split at the drain's start and end: *before* is from its "
          "second second (the first is ramp) to the drain's start, *during* is the drain. Medians over the reps "
          "of each rep's figure:", "",
          "| writer | before the drain | during the drain | during / before |", "|---|---:|---:|---:|"]
    pb, pd = dmed("p99_before_us"), dmed("p99_during_us")
    ib, idu = dmed("iops_before"), dmed("iops_during")
    L += [f"| p99 completion latency (ms) | {pb / 1e3:,.2f} | {pd / 1e3:,.2f} | {pd / pb:,.1f}× |",
          f"| writes/s | {ib:,.0f} | {idu:,.0f} | {idu / ib:.2f}× |",
          f"| longest write (ms) | | {dmed('max_during_us') / 1e3:,.0f} | |", ""]

# --- 13. mirrored containers ------------------------------------------------------
mi = [r for r in rows if r.get("bench") == "mirror"]
if mi:
    mjobs = list(dict.fromkeys(r["job"] for r in mi))
    mreps = sorted({r["rep"] for r in mi})

    def mval(kind, job, key):
        xs = [r[key] for r in mi if r["kind"] == kind and r["job"] == job and key in r]
        return med(xs) if xs else None

    def mratio(job, key):
        """The median over the reps of each rep's mirror / single."""
        xs = []
        for rep in mreps:
            a = [r[key] for r in mi if r["rep"] == rep and r["job"] == job and r["kind"] == "mirror" and key in r]
            b = [r[key] for r in mi if r["rep"] == rep and r["job"] == job and r["kind"] == "single" and key in r]
            if a and b and b[0]:
                xs.append(a[0] / b[0])
        return med(xs) if xs else None

    mmb = env["knobs"].get("MIRROR_MB", "?")
    L += ["## 13. Mirrored containers", "",
          f"`bench/mirror.sh`: per rep a fresh `segmap up` and four `segmap storage` nodes on loopback, each export "
          f"a sparse file of {mmb} MiB + 1 MiB. Disk *m* ({mmb} MiB, 256 KiB segments) is on a mirrored container "
          "of two replicas (`container add --mirror nbd://A,nbd://B --format --slot-size 256K`), disk *s* on a "
          "single container on a third node (`container add nbd://C --format --slot-size 256K`); both are written "
          "whole first (reads read data, writes overwrite: no write faults), and both are served by the same "
          "agent. Each job runs on one disk then the other (the mirror first on odd reps), "
          f"`--size={mmb}M --time_based --runtime={env['knobs']['RUNTIME']} --ramp_time=1`. Ratio = mirror / "
          f"single, the median of each rep's ratio ({len(mreps)} reps); figures are medians. Every process "
          "(fio, the agent, each storage node) shares the same CPUs: a mirrored write costs the machine two "
          "storage nodes' work and two NBD requests from the agent, which separate machines would not share.", "",
          "| job | ARGS | single | mirror | mirror / single | target | | CPU µs per I/O, single | mirror |",
          "|---|---|---:|---:|---:|---|---|---:|---:|"]
    margs = {"randwrite-4k-qd32": "--rw=randwrite --bs=4k --iodepth=32",
             "randwrite-4k-qd1": "--rw=randwrite --bs=4k --iodepth=1",
             "write-1m-seq": "--rw=write --bs=1M --iodepth=8",
             "randread-4k-qd32": "--rw=randread --bs=4k --iodepth=32",
             "read-1m-seq": "--rw=read --bs=1M --iodepth=8"}
    mtargets = {"randwrite-4k-qd32": 0.7, "write-1m-seq": 0.7, "randread-4k-qd32": 1.0, "read-1m-seq": 1.0}
    def mcpu(job):
        """CPU columns: segmap up and the disk's storage nodes, per I/O."""
        a, b = mval("mirror", job, "cpu_us_per_io"), mval("single", job, "cpu_us_per_io")
        return f" {b:,.0f} | {a:,.0f} |" if a is not None and b is not None else " | |"

    for job in mjobs:
        args = f"`{margs[job]}`" if job in margs else ""
        if job == "randwrite-4k-qd1":
            a, b, r = mval("mirror", job, "lat_us"), mval("single", job, "lat_us"), mratio(job, "lat_us")
            L.append(f"| {job}, mean latency | {args} | {b:,.0f} µs | {a:,.0f} µs | {r:.2f} | ≤ 1.4 | "
                     f"{verdict(r, 1.4, higher_is_better=False)} |" + mcpu(job))
            a, b, r = mval("mirror", job, "p50_us"), mval("single", job, "p50_us"), mratio(job, "p50_us")
            L.append(f"| {job}, median latency | | {b:,.0f} µs | {a:,.0f} µs | {r:.2f} | | | | |")
            if mval("mirror", job, "tlat_us") is not None:
                a, b, r = mval("mirror", job, "tlat_us"), mval("single", job, "tlat_us"), mratio(job, "tlat_us")
                L.append(f"| {job}, mean latency with submission | | {b:,.0f} µs | {a:,.0f} µs | {r:.2f} | | | | |")
            continue
        key, unit = ("mbps", "MB/s") if "1m" in job else ("iops", "IOPS")
        a, b, r = mval("mirror", job, key), mval("single", job, key), mratio(job, key)
        t = mtargets.get(job)
        L.append(f"| {job} | {args} | {b:,.0f} {unit} | {a:,.0f} {unit} | {r:.2f} | "
                 + (f"≥ {t} | {verdict(r, t)} |" if t else "| |") + mcpu(job))
    L += ["", "Latency is fio's completion latency (clat, from a request's submission to its reply) unless "
          "it says *with submission* (fio's lat: clat plus the submission).", "",
          "CPU µs per I/O: the CPU time (user + system) `segmap up` and the disk's storage nodes used during "
          "the job, ramp included, over the I/Os fio counted (after its ramp): both sides are overestimated "
          "alike. fio's own CPU is not counted.", ""]
    rb = [r for r in rows if r.get("bench") == "mirror-rebuild"]
    if rb:
        rmb = rb[0]["mb"]
        rs, ns = med([r["rebuild_s"] for r in rb]), med([r["nbdcopy_s"] for r in rb])
        rr = med([(r["mb"] / r["rebuild_s"]) / (r["copy_mb"] / r["nbdcopy_s"]) for r in rb])
        L += ["### Rebuild", "",
              f"After the jobs, `segmap container replace-replica ID --old nbd://A --new nbd://D1 --format` copies "
              f"every used slot ({med([r['segments'] for r in rb]):,.0f} segments, {rmb} MiB) from B onto a fresh "
              f"export on a fourth node, nothing else running; beside it, `nbdcopy nbd://C nbd://D2` copies C's "
              f"whole export ({rb[0]['copy_mb']} MiB) between two storage nodes. Each starts after a `sync`. "
              "Ratio = rebuild MB/s / nbdcopy MB/s, the median of each rep's ratio:", "",
              "| case | seconds | MB/s | rebuild / nbdcopy | target | |", "|---|---:|---:|---:|---|---|",
              f"| segmap container replace-replica | {rs:.2f} | {rmb * 1.048576 / rs:,.0f} | {rr:.2f} | ≥ 0.5 | "
              f"{verdict(rr, 0.5)} |",
              f"| nbdcopy between two storage nodes | {ns:.2f} | {rb[0]['copy_mb'] * 1.048576 / ns:,.0f} | | | |", ""]
    fo = [r for r in rows if r.get("bench") == "mirror-failover"]
    if fo:
        L += ["### A replica killed under a writer", "",
              f"Then a writer (`--rw=randwrite --bs=4k --iodepth=1`, a per-I/O latency log) runs on disk *m* for "
              f"{env['knobs'].get('FAIL_BEFORE', '?')} s and node B, a healthy replica, is killed (SIGKILL); the "
              f"writer goes on {env['knobs'].get('FAIL_AFTER', '?')} s more. The longest write after the kill is "
              "the pause: the replica's I/O timeout (2 s), then the controller recording the failure and telling "
              "the agent. *After* is from 1 s past that write to the end, on the one replica left. "
              f"Medians over {len(fo)} reps (replica states at the end: "
              f"{', '.join(sorted({r['replicas'] for r in fo}))}):", "",
              "After the kill the mirror is degraded: the first write into each slot waits until the controller "
              "has recorded the slot durably (the write-intent record a catch-up copies from), so the writer is "
              "slower until the slots it writes are recorded.", "",
              "| | before the kill | after the pause |", "|---|---:|---:|",
              f"| writes/s | {med([r['wps_before'] for r in fo]):,.0f} | "
              f"{med([r['wps_after'] for r in fo if r['wps_after']]):,.0f} |",
              f"| mean write latency (µs) | {med([r['mean_before_us'] for r in fo]):,.0f} | "
              f"{med([r['mean_after_us'] for r in fo if r['mean_after_us']]):,.0f} |",
              f"| longest write (the pause, ms) | | {med([r['max_us'] for r in fo]) / 1e3:,.0f} |", ""]

if T:
    L[targets_at:targets_at] = [
        "## Targets of the fault path at a glance", "",
        "The targets of the fault-path issue (copy-on-write after a snapshot), each measured in its section "
        "below (sections 2 to 5); that nothing else gets slower is section 1's table against its earlier runs.", "",
        "| what | measured | target | |", "|---|---:|---|---|"] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in T] + [""]
open(doc, "w").write("\n".join(L) + "\n")

# --- plots ------------------------------------------------------------------------
gp = []
common = "set terminal pngcairo size 900,480 font 'sans,10'; set grid ytics; set key top left;"
if nbd:
    gp.append(common + f"""set output '{plotdir}/bench-nbd.png';
set title 'fio over NBD: throughput relative to qemu-nbd (1.0 = qemu-nbd)';
set style data histograms; set style histogram clustered gap 1; set style fill solid 0.8 border -1;
set xtics rotate by -30; set yrange [0:*]; set ylabel 'IOPS or MB/s / qemu-nbd';
plot '{rdir}/nbd.dat' using 2:xtic(1) title 'segmap', '' using 3 title 'nbdkit', 1 with lines lt -1 dt 2 notitle""")
if cow:
    gp.append(common + f"""set output '{plotdir}/bench-cow.png';
set title 'First write after a snapshot: one 4 KiB write per segment (writes/s)';
set style data histograms; set style histogram clustered gap 1; set style fill solid 0.8 border -1;
set yrange [0:*]; set ylabel 'writes/s';
plot '{rdir}/cow.dat' using 2:xtic(1) title 'QD 1', '' using 3 title 'QD 32'""")
if snap:
    gp.append(common + f"""set output '{plotdir}/bench-snapshot.png';
set title 'Snapshot time and the writer pause against allocated segments (64 KiB)';
set logscale xy; set xlabel 'allocated segments'; set ylabel 'ms'; set format x '10^{{%L}}';
plot '{rdir}/snap.dat' using 1:2 with linespoints title 'snapshot, CLI p50', '' using 1:3 with linespoints title 'snapshot, gRPC p50', '' using 1:4 with linespoints title 'writer pause p99 (same disk)', '' using 1:5 with linespoints title 'writer pause p99 (other disk)', 20 with lines dt 2 title '20 ms target', 10 with lines dt 3 title '10 ms target'""")
if gp:
    subprocess.run(["gnuplot"], input="\n".join(gp) + "\n", text=True, check=True)
print(open(doc).read())
