package e2e

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func mustUint(t *testing.T, s string) uint64 {
	t.Helper()
	if s == "" {
		return 0
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("not a number: %q", s)
	}
	return n
}

// TestListAndThin: nbdinfo lists every disk with its size; a 1 TiB disk is
// created at once and allocates nothing.
func TestListAndThin(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdinfo")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "small", "--size", "100M")
	u.cli("disk", "create", "big", "--size", "1T")
	u.cli("disk", "create", "rev", "--size", "64M", "--segment-size", "64K", "--policy", "reverse")

	var list struct {
		Exports []struct {
			Name string `json:"export-name"`
			Size uint64 `json:"export-size"`
		} `json:"exports"`
	}
	out := run(t, 30*time.Second, "nbdinfo", "--list", "--json", "nbd://"+u.nbd)
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	want := map[string]uint64{"small": 100 << 20, "big": 1 << 40, "rev": 64 << 20}
	got := map[string]uint64{}
	for _, e := range list.Exports {
		got[e.Name] = e.Size
	}
	for n, s := range want {
		if got[n] != s {
			t.Errorf("nbdinfo --list: export %q size %d, want %d (all: %v)", n, got[n], s, got)
		}
	}
	// The human-readable listing names them too.
	plain := run(t, 30*time.Second, "nbdinfo", "--list", "nbd://"+u.nbd)
	for n := range want {
		if !strings.Contains(plain, n) {
			t.Errorf("nbdinfo --list does not show %q:\n%s", n, plain)
		}
	}
	var d diskInfo
	u.cliJSON(&d, "disk", "info", "big")
	if mustUint(t, d.Size) != 1<<40 || mustUint(t, d.Allocated) != 0 {
		t.Errorf("big: size %s allocated %s, want 1 TiB and 0", d.Size, d.Allocated)
	}
	var st statusInfo
	u.cliJSON(&st, "status")
	if mustUint(t, st.UsedBytes) != 0 {
		t.Errorf("status: %s bytes used after creating empty disks", st.UsedBytes)
	}
	// The table form works too.
	if out := u.cli("disk", "list"); !strings.Contains(out, "big") || !strings.Contains(out, "1T") {
		t.Errorf("disk list:\n%s", out)
	}
}

// TestQemuIOSnapshot: patterns at unaligned offsets crossing segment
// boundaries, a snapshot, an overwrite; the disk has the new bytes and the
// snapshot the old ones.
func TestQemuIOSnapshot(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir())
	for _, pol := range []string{"forward", "reverse"} {
		t.Run(pol, func(t *testing.T) {
			disk := "q-" + pol
			u.cli("disk", "create", disk, "--size", "8M", "--segment-size", "64K", "--policy", pol)
			// Unaligned ranges, each crossing at least one 64 KiB boundary.
			ranges := [][2]int{{65000, 3000}, {130000, 200000}, {1048575, 2}, {4194000, 70000}}
			qio := func(name string, cmds ...string) string {
				args := []string{"-f", "raw", u.uri(name)}
				if strings.Contains(name, "@") {
					args = append([]string{"-r"}, args...) // snapshots are exported read-only
				}
				for _, c := range cmds {
					args = append(args, "-c", c)
				}
				out := run(t, 60*time.Second, "qemu-io", args...)
				if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
					t.Fatalf("qemu-io %v:\n%s", cmds, out)
				}
				return out
			}
			var w1, w2, r1, r2 []string
			for _, r := range ranges {
				w1 = append(w1, fmt.Sprintf("write -P 0x11 %d %d", r[0], r[1]))
				w2 = append(w2, fmt.Sprintf("write -P 0x22 %d %d", r[0], r[1]))
				r1 = append(r1, fmt.Sprintf("read -P 0x11 %d %d", r[0], r[1]))
				r2 = append(r2, fmt.Sprintf("read -P 0x22 %d %d", r[0], r[1]))
			}
			qio(disk, append(w1, r1...)...)
			u.cli("snapshot", disk, "--name", disk+"@s1")
			qio(disk, w2...)
			qio(disk, r2...)
			qio(disk+"@s1", r1...)
			// Untouched bytes stay zero in both.
			qio(disk, "read -P 0 0 65000", "read -P 0 68000 62000")
			qio(disk+"@s1", "read -P 0 0 65000", "read -P 0 68000 62000")
			// The snapshot is exported read-only.
			out, err := runErr(30*time.Second, "qemu-io", "-f", "raw", u.uri(disk+"@s1"), "-c", "write -P 0x33 0 4096")
			if err == nil && !strings.Contains(out, "failed") && !strings.Contains(out, "ermission") && !strings.Contains(out, "read-only") {
				t.Errorf("write to the read-only snapshot succeeded:\n%s", out)
			}
			qio(disk+"@s1", "read -P 0 0 4096")
			var d diskInfo
			u.cliJSON(&d, "disk", "info", disk+"@s1")
			if d.Origin != disk || !d.ReadOnly {
				t.Errorf("snapshot info: %+v", d)
			}
		})
	}
	if out := u.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
}

// TestNbdcopyRestart: 256 MiB of random data copied in and out
// byte-identical, and still identical after a restart.
func TestNbdcopyRestart(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdcopy")
	dir := t.TempDir()
	data := filepath.Join(t.TempDir(), "in")
	f, err := os.Create(data)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := 0; i < 256; i++ {
		rand.Read(buf)
		f.Write(buf)
	}
	f.Close()
	want := sha(t, data)

	u := startUp(t, dir)
	u.cli("disk", "create", "copy", "--size", "256M")
	run(t, 120*time.Second, "nbdcopy", data, u.uri("copy"))
	out1 := filepath.Join(t.TempDir(), "out1")
	run(t, 120*time.Second, "nbdcopy", u.uri("copy"), out1)
	if got := sha(t, out1); got != want {
		t.Fatalf("copied out %s, put in %s", got, want)
	}
	u.stop()

	u2 := startUp(t, dir)
	out2 := filepath.Join(t.TempDir(), "out2")
	run(t, 120*time.Second, "nbdcopy", u2.uri("copy"), out2)
	if got := sha(t, out2); got != want {
		t.Fatalf("after restart: %s, want %s", got, want)
	}
	var d diskInfo
	u2.cliJSON(&d, "disk", "info", "copy")
	if mustUint(t, d.Allocated) != 256<<20 {
		t.Errorf("allocated %s after a full copy, want %d", d.Allocated, 256<<20)
	}
}

func fio(t *testing.T, u *up, disk string, args ...string) string {
	t.Helper()
	base := []string{"--ioengine=nbd", "--uri=" + u.uri(disk), "--output-format=normal"}
	out := run(t, 5*time.Minute, "fio", append(base, args...)...)
	if strings.Contains(out, "verify failed") || strings.Contains(out, "bad magic") || strings.Contains(out, " err=") && !strings.Contains(out, " err= 0") {
		t.Fatalf("fio %v:\n%s", args, out)
	}
	return out
}

// TestFioVerify: random 4 KiB writes at queue depth 32 from 2 jobs (two
// connections) with crc32c verification, then a verify-only pass.
func TestFioVerify(t *testing.T) {
	t.Parallel()
	requireTools(t, "fio")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "fio", "--size", "256M")
	job := []string{"--name=rw", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=2",
		"--size=128M", "--offset_increment=128M", "--verify=crc32c", "--randseed=42"}
	fio(t, u, "fio", job...)
	fio(t, u, "fio", append(job, "--verify_only=1")...)
	if out := u.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
}

// TestSnapshotUnderFio: a snapshot taken while fio writes holds only whole
// fio blocks: every block of it passes fio's own crc32c verification.
func TestSnapshotUnderFio(t *testing.T) {
	requireTools(t, "fio")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "live", "--size", "64M", "--segment-size", "64K")
	common := []string{"--bs=4k", "--size=64M", "--verify=crc32c"}
	// Give every block a valid fio header first.
	fio(t, u, "live", append([]string{"--name=fill", "--rw=write", "--do_verify=0"}, common...)...)
	wait := background(t, "fio", append([]string{"--ioengine=nbd", "--uri=" + u.uri("live"), "--name=live",
		"--rw=randwrite", "--iodepth=16", "--numjobs=2", "--time_based", "--runtime=4", "--do_verify=0"}, common...)...)
	time.Sleep(1500 * time.Millisecond)
	u.cli("snapshot", "live", "--name", "live@mid")
	out, err := wait()
	if err != nil {
		t.Fatalf("fio writer: %v\n%s", err, out)
	}
	fio(t, u, "live@mid", append([]string{"--name=check-snap", "--rw=read", "--iodepth=8"}, common...)...)
	fio(t, u, "live", append([]string{"--name=check-disk", "--rw=read", "--iodepth=8"}, common...)...)
}

// lockstep writes generation after generation to two disks, each
// generation first wholly to d1 and then wholly to d2, every 4 KiB block
// filled with the generation number, one write at a time (each answered
// before the next is sent), until the file STOP exists. After each
// generation it prints "gen G START END": the wall clock (ns) before its
// first write was sent and after its last was answered.
const lockstep = `
import nbd, os, sys, struct, time
uri1, uri2, blocks, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
h1, h2 = nbd.NBD(), nbd.NBD()
h1.connect_uri(uri1); h2.connect_uri(uri2)
g = 0
while not os.path.exists(stop):
    g += 1
    buf = struct.pack("<I", g) * 1024
    start = time.time_ns()
    for h in (h1, h2):
        for b in range(blocks):
            h.pwrite(buf, b * 4096)
    print("gen", g, start, time.time_ns(), flush=True)
h1.flush(); h2.flush()
h1.shutdown(); h2.shutdown()
print("done", g, flush=True)
`

// readGens reads the generation in every 4 KiB block of an export.
const readGens = `
import nbd, sys, struct
h = nbd.NBD(); h.connect_uri(sys.argv[1])
out = []
for b in range(int(sys.argv[2])):
    d = h.pread(4096, b * 4096)
    gs = set(struct.unpack("<1024I", d))
    out.append(str(gs.pop()) if len(gs) == 1 else "torn")
print(" ".join(out))
`

// lockstepGen is one generation the lock-step writer reported: the wall
// clock before its first write was sent and after its last was answered.
type lockstepGen struct{ start, end int64 }

// lockstepGens parses the writer's "gen G START END" lines.
func lockstepGens(t *testing.T, out string) map[int]lockstepGen {
	t.Helper()
	gens := map[int]lockstepGen{}
	lines := strings.Split(out, "\n")
	for _, line := range lines[:len(lines)-1] { // the last may be half written
		f := strings.Fields(line)
		if len(f) != 4 || f[0] != "gen" {
			continue
		}
		g, err1 := strconv.Atoi(f[1])
		start, err2 := strconv.ParseInt(f[2], 10, 64)
		end, err3 := strconv.ParseInt(f[3], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("lock-step writer: bad line %q", line)
		}
		gens[g] = lockstepGen{start, end}
	}
	return gens
}

// TestGroupSnapshotLockstep: a group snapshot of two disks written in
// lock-step is one point in time, taken while the writer ran: what the two
// snapshots hold together is exactly the first n writes of the writer's
// sequence, for an n no smaller than the writes answered before the
// snapshot was asked for and no larger than the writes sent before it was
// answered.
func TestGroupSnapshotLockstep(t *testing.T) {
	requireTools(t, "/usr/bin/python3")
	u := startUp(t, t.TempDir())
	const blocks = 32
	const perGen = 2 * blocks // writes per generation, over both disks
	for _, d := range []string{"db1", "db2"} {
		u.cli("disk", "create", d, "--size", "1M", "--segment-size", "64K")
	}
	stop := filepath.Join(t.TempDir(), "stop")
	wait, progress := backgroundOut(t, "/usr/bin/python3", "-c", lockstep, u.uri("db1"), u.uri("db2"), strconv.Itoa(blocks), stop)
	// waitGen waits until the writer has answered a whole generation that
	// it started after the instant after (ns).
	waitGen := func(after int64, what string) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			for _, g := range lockstepGens(t, progress.String()) {
				if g.start > after {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("the lock-step writer wrote no generation %s:\n%s", what, progress)
			}
		}
	}
	waitGen(0, "at all")

	type snap struct {
		name   string
		t0, t1 int64 // the wall clock before the snapshot was asked for and after it was answered
	}
	var snaps []snap
	for _, name := range []string{"g1", "g2"} {
		t0 := time.Now().UnixNano()
		u.cli("snapshot", "--group", "db1", "db2", "--name", name)
		t1 := time.Now().UnixNano()
		snaps = append(snaps, snap{name, t0, t1})
		// The writer goes on past the snapshot: writes are answered after it.
		waitGen(t1, "after snapshot "+name)
	}
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := wait()
	if err != nil || !strings.Contains(out, "done") {
		t.Fatalf("lock-step writer: %v\n%s", err, out)
	}
	gens := lockstepGens(t, out)
	last := len(gens)
	for g := 1; g <= last; g++ {
		if _, ok := gens[g]; !ok {
			t.Fatalf("lock-step writer: generation %d missing from its output:\n%s", g, out)
		}
	}

	prev := -1
	for _, sn := range snaps {
		// The writer's sequence: db1's blocks, then db2's.
		var seq []int
		for _, disk := range []string{"db1", "db2"} {
			for _, s := range strings.Fields(python(t, 60*time.Second, readGens, u.uri(disk+"@"+sn.name), strconv.Itoa(blocks))) {
				g, err := strconv.Atoi(s)
				if err != nil {
					t.Fatalf("%s@%s has a torn block", disk, sn.name)
				}
				seq = append(seq, g)
			}
		}
		if len(seq) != perGen {
			t.Fatalf("snapshot %s: %d blocks read, want %d", sn.name, len(seq), perGen)
		}
		// A prefix of the sequence of writes: generation G in the first k
		// blocks, G-1 in the rest. Then n, the writes it holds, is the sum.
		n := 0
		for i, g := range seq {
			if i > 0 && (g > seq[i-1] || seq[0]-g > 1) {
				t.Fatalf("snapshot %s is not one point in time of the writer's sequence (db1's blocks, then db2's): %v", sn.name, seq)
			}
			n += g
		}
		newest := seq[0]
		// Writes answered before the snapshot was asked for are in it.
		var answered int
		for g, w := range gens {
			if w.end < sn.t0 {
				answered = max(answered, g*perGen)
			}
		}
		t.Logf("snapshot %s: the first %d writes (generation %d in %d of %d blocks); "+
			"%d answered before it was asked for; the writer wrote %d", sn.name, n, newest, n-(newest-1)*perGen, perGen, answered, last*perGen)
		if n < answered {
			t.Errorf("snapshot %s holds the first %d writes, but %d were answered before it was asked for", sn.name, n, answered)
		}
		// No write sent after the snapshot was answered is in it.
		if n > 0 && gens[newest].start >= sn.t1 {
			t.Errorf("snapshot %s holds generation %d, whose first write was sent %v after the snapshot was answered",
				sn.name, newest, time.Duration(gens[newest].start-sn.t1))
		}
		// It fell strictly between the writer's first and last write.
		if n == 0 || n >= last*perGen {
			t.Errorf("snapshot %s holds the first %d of %d writes: it was not taken while the writer ran", sn.name, n, last*perGen)
		}
		if n <= prev {
			t.Errorf("snapshot %s holds the first %d writes, no more than the snapshot before it (%d)", sn.name, n, prev)
		}
		prev = n
	}
}

// TestTrimAndDeleteReturnSpace: trimming a whole disk returns its space,
// and so does deleting a disk.
func TestTrimAndDeleteReturnSpace(t *testing.T) {
	t.Parallel()
	requireTools(t, "fio", "qemu-io")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "t1", "--size", "64M")
	u.cli("disk", "create", "t2", "--size", "32M")
	used := func() uint64 {
		var st statusInfo
		u.cliJSON(&st, "status")
		return mustUint(t, st.UsedBytes)
	}
	fio(t, u, "t1", "--name=fill1", "--rw=write", "--bs=1M", "--size=64M")
	fio(t, u, "t2", "--name=fill2", "--rw=write", "--bs=1M", "--size=32M")
	if got := used(); got != 96<<20 {
		t.Fatalf("used %d after writing 96 MiB", got)
	}
	run(t, 60*time.Second, "qemu-io", "-d", "unmap", "-f", "raw", u.uri("t1"), "-c", "discard 0 64M")
	var d diskInfo
	u.cliJSON(&d, "disk", "info", "t1")
	if mustUint(t, d.Allocated) != 0 {
		t.Errorf("t1 allocated %s after a whole-disk trim", d.Allocated)
	}
	if got := used(); got != 32<<20 {
		t.Errorf("used %d after trimming t1, want %d", got, 32<<20)
	}
	run(t, 60*time.Second, "qemu-io", "-f", "raw", u.uri("t1"), "-c", "read -P 0 0 64M")
	u.cli("disk", "delete", "t2")
	if got := used(); got != 0 {
		t.Errorf("used %d after deleting t2", got)
	}
}

// TestBadInput: each bad input gets a clear error and the server keeps
// serving.
func TestBadInput(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdinfo", "qemu-io", "/usr/bin/python3")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "good", "--size", "16M")
	u.cli("snapshot", "good", "--name", "good@ro")

	// Unknown export.
	out, err := runErr(30*time.Second, "nbdinfo", u.uri("nosuch"))
	if err == nil {
		t.Errorf("nbdinfo of an unknown export succeeded:\n%s", out)
	}
	// Write to a read-only snapshot: EPERM, seen through libnbd.
	py := `
import nbd, sys
h = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])
def try_(what, f):
    try:
        f(); print(what, "ok")
    except nbd.Error as e:
        print(what, "errno", e.errno)
if sys.argv[2] == "ro":
    print("readonly", h.is_read_only())
    try_("write", lambda: h.pwrite(b"x" * 4096, 0))
else:
    size = h.get_size()
    try_("read-past-end", lambda: h.pread(4096, size))
    try_("read-straddling", lambda: h.pread(8192, size - 4096))
    try_("write-past-end", lambda: h.pwrite(b"y" * 4096, size))
    try_("read-ok", lambda: h.pread(4096, 0))
`
	out = python(t, 30*time.Second, py, u.uri("good@ro"), "ro")
	if !strings.Contains(out, "readonly True") || !strings.Contains(out, "write errno EPERM") {
		t.Errorf("write to read-only snapshot: want EPERM (1):\n%s", out)
	}
	out = python(t, 30*time.Second, py, u.uri("good"), "rw")
	for _, want := range []string{"read-past-end errno EINVAL", "read-straddling errno EINVAL", "write-past-end errno EINVAL", "read-ok ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("past the end: want %q in:\n%s", want, out)
		}
	}
	// Garbage on the socket: the connection is dropped, others go on.
	for _, junk := range [][]byte{[]byte("GET / HTTP/1.1\r\n\r\n"), make([]byte, 4096), {0xff, 0xff, 0xff}} {
		c, err := net.Dial("tcp", u.nbd)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(junk)
		c.Close()
	}
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("good"), "-c", "write -P 7 0 4096", "-c", "read -P 7 0 4096")

	// CLI: unknown flag, impossible sizes, bad names; clear message, non-zero exit.
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"disk", "create", "x", "--size", "1G", "--frobnicate"}, 2, "unknown flag"},
		{[]string{"disk", "create", "x", "--size", "10Q"}, 2, "not a size"},
		{[]string{"disk", "create", "x", "--size", "0"}, 1, "invalid disk size"},
		{[]string{"disk", "create", "x", "--size", "1000"}, 1, "multiple of 512"},
		{[]string{"disk", "create", "x", "--size", "1G", "--segment-size", "3M"}, 1, "segment size"},
		{[]string{"disk", "create", "bad/name", "--size", "1G"}, 1, "invalid disk name"},
		{[]string{"disk", "create", "good", "--size", "1G"}, 1, "already exists"},
		{[]string{"disk", "create", "x"}, 2, "--size is required"},
		{[]string{"disk", "info", "nosuch"}, 1, "no such disk"},
		{[]string{"disk", "resize", "good", "--size", "1M"}, 1, "shrink"},
		{[]string{"snapshot", "nosuch"}, 1, "no such disk"},
		{[]string{"snapshot", "a", "b"}, 2, "--group"},
		{[]string{"nosuchcommand"}, 1, "unknown command"},
	} {
		out, errOut, code := u.cliResult(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.msg) || !strings.HasPrefix(errOut, "segmap: ") {
			t.Errorf("segmap %v: exit %d, stderr %q, stdout %q; want exit %d and %q", tc.args, code, errOut, out, tc.code, tc.msg)
		}
	}
	// No controller there: a clear message.
	_, errOut, code := runBin(t, "--controller", "127.0.0.1:1", "disk", "list")
	if code == 0 || !strings.Contains(errOut, "no segmap controller") {
		t.Errorf("no controller: exit %d, %q", code, errOut)
	}
	// Everything still works and is sound.
	if out := u.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
	if out := run(t, 30*time.Second, "nbdinfo", u.uri("good")); !strings.Contains(out, "16777216") {
		t.Errorf("nbdinfo after bad input:\n%s", out)
	}
}
