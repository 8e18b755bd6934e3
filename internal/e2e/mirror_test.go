package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"segmap/internal/nbd/nbdclient"
	"segmap/internal/rpc/transport"

	"golang.org/x/sys/unix"
)

// mirrorList is the JSON of 'segmap container list' with the replicas of
// mirrored containers.
type mirrorList struct {
	Containers []struct {
		ID        uint32 `json:"id"`
		State     string `json:"state"`
		SlotSize  string `json:"slot_size"`
		UsedSlots string `json:"used_slots"`
		Epoch     string `json:"epoch"`
		Replicas  []struct {
			URI   string `json:"uri"`
			State string `json:"state"`
		} `json:"replicas"`
	} `json:"containers"`
}

// replicaStates returns the state of each replica of mirrored container
// id, by URI, and the bytes of its used slots.
func (c *cluster) replicaStates(id uint32) (map[string]string, int64) {
	c.t.Helper()
	var l mirrorList
	c.cliJSON(&l, "container", "list")
	for _, ct := range l.Containers {
		if ct.ID != id {
			continue
		}
		st := map[string]string{}
		for _, r := range ct.Replicas {
			st[r.URI] = r.State
		}
		used, _ := strconv.ParseInt(ct.UsedSlots, 10, 64)
		slot, _ := strconv.ParseInt(ct.SlotSize, 10, 64)
		return st, used * slot
	}
	c.t.Fatalf("container %d is not listed: %+v", id, l)
	return nil, 0
}

// newMirrorCluster starts a controller with the default agent lease (the
// bound a host's I/O pause must stay under), nodes storage nodes each
// serving one 2 GiB export "s" (not yet a container), and the named
// agents. It returns the exports' URIs and the files behind them.
func newMirrorCluster(t *testing.T, nodes int, agents ...string) (c *cluster, uris, files []string) {
	t.Helper()
	// The agents start after the storage nodes, so that they stop
	// before them when the test ends.
	c = newClusterOf(t, 0, []string{"--lease", transport.DefaultLease.String()}, nil)
	for _, a := range agents {
		if _, errOut, code := runBin(t, "certs", "issue", c.certs, "--role", "agent", "--name", a); code != 0 {
			t.Fatalf("certs issue agent %s: %s", a, errOut)
		}
	}
	for i := 1; i <= nodes; i++ {
		dir := filepath.Join(c.dir, fmt.Sprintf("store%d", i))
		if _, errOut, code := runBin(t, "storage", "create", "--dir", dir, "s", "--size", "2G"); code != 0 {
			t.Fatalf("storage create: %s", errOut)
		}
		addr := c.startStorage(fmt.Sprintf("s%d", i), dir, "--dir", dir)
		uris = append(uris, "nbd://"+addr+"/s")
		files = append(files, filepath.Join(dir, "s"))
	}
	for _, a := range agents {
		c.startAgent(a)
	}
	return c, uris, files
}

// fioReport is what the tests read of fio's JSON output.
type fioReport struct {
	Jobs []struct {
		Name  string   `json:"jobname"`
		Error int      `json:"error"`
		Read  fioStats `json:"read"`
		Write fioStats `json:"write"`
	} `json:"jobs"`
}

type fioStats struct {
	IOBytes int64 `json:"io_bytes"`
	LatNs   struct {
		Max float64 `json:"max"`
	} `json:"lat_ns"`
}

// longest returns the longest completion latency of any I/O, read or
// write, of the report: the longest a host waited.
func (r fioReport) longest() time.Duration {
	var m float64
	for _, j := range r.Jobs {
		m = max(m, j.Read.LatNs.Max, j.Write.LatNs.Max)
	}
	return time.Duration(m)
}

// fioJSON starts fio with the nbd engine on uri, its report written as
// JSON, and returns a function that waits for it and fails the test
// unless it completed, with no error and no verify failure.
func fioJSON(t *testing.T, uri string, args ...string) func() fioReport {
	t.Helper()
	out := filepath.Join(t.TempDir(), "fio.json")
	w := background(t, "fio", append([]string{"--ioengine=nbd", "--uri=" + uri, "--output-format=json", "--output=" + out}, args...)...)
	return func() fioReport {
		t.Helper()
		text, err := w()
		b, rerr := os.ReadFile(out)
		var r fioReport
		if err != nil || rerr != nil || strings.Contains(text, "verify failed") || json.Unmarshal(b, &r) != nil || len(r.Jobs) == 0 {
			t.Fatalf("fio %v: %v %v\n%s\n%s", args, err, rerr, text, b)
		}
		for _, j := range r.Jobs {
			if j.Error != 0 {
				t.Fatalf("fio %v: job %s: error %d\n%s\n%s", args, j.Name, j.Error, text, b)
			}
		}
		return r
	}
}

// hashURI returns the hash of what uri reads, copied with nbdcopy.
func hashURI(t *testing.T, uri string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "copy")
	run(t, 2*time.Minute, "nbdcopy", uri, f)
	defer os.Remove(f)
	return sha(t, f)
}

// TestClusterMirror: a disk on a container mirrored over storage nodes 1
// and 2, written by fio with crc32c verification through two agents.
// Node 2 is killed with SIGKILL under the writes: fio completes and
// verifies, and no I/O waits as long as an agent's lease; snapshots taken
// before and after the kill read the same throughout; check is clean and
// the replica on node 2 is listed failed. It is replaced by an export on
// node 3 while fio writes, and node 1 is then killed too: everything
// reads back from the rebuilt replica alone.
func TestClusterMirror(t *testing.T) {
	requireTools(t, "fio", "nbdcopy")
	c, uris, _ := newMirrorCluster(t, 3, "host-a", "host-b")
	if out := c.cli("container", "add", "--mirror", uris[0]+","+uris[1], "--format", "--slot-size", "1M"); !strings.Contains(out, "added mirrored container 1") {
		t.Fatalf("container add --mirror: %s", out)
	}
	// The mirror is the only container: every segment of the disk is
	// on it.
	c.cli("disk", "create", "d", "--size", "48M", "--segment-size", "1M")

	// Three regions of 16 MiB: A written through host-a and B through
	// host-b across the kill of node 2; C through host-a across the
	// replacement of its replica. fio is rate-bound so that it is surely
	// writing when the nodes are killed and the replica replaced.
	const region = 16 << 20
	job := func(name string, off int64, seed int) []string {
		return []string{"--name=" + name, "--rw=randwrite", "--bs=16k", "--iodepth=8",
			fmt.Sprintf("--offset=%d", off), fmt.Sprintf("--size=%d", region), "--rate=3m",
			"--verify=crc32c", "--verify_backlog=64", fmt.Sprintf("--randseed=%d", seed)}
	}
	verifyJob := func(name string, off int64, seed int) []string {
		return append(job(name, off, seed), "--verify_only=1")
	}
	jobA, jobB, jobC := job("a", 0, 3), job("b", region, 5), job("c", 2*region, 7)
	waitA := fioJSON(t, c.uri("host-a", "d"), jobA...)
	waitB := fioJSON(t, c.uri("host-b", "d"), jobB...)

	time.Sleep(1500 * time.Millisecond)
	c.cli("snapshot", "d", "--name", "d@before")
	snaps := map[string]string{"d@before": hashURI(t, c.uri("host-a", "d@before"))}

	c.storage[1].kill()
	killed := time.Now()
	time.Sleep(time.Second)
	c.cli("snapshot", "d", "--name", "d@after")
	snaps["d@after"] = hashURI(t, c.uri("host-b", "d@after"))

	ra, rb := waitA(), waitB()
	t.Logf("fio across the kill of node 2 (%v after it, %d+%d bytes written): longest I/O %v (host-a), %v (host-b)",
		time.Since(killed).Round(time.Millisecond), ra.Jobs[0].Write.IOBytes, rb.Jobs[0].Write.IOBytes, ra.longest(), rb.longest())
	if pause := max(ra.longest(), rb.longest()); pause >= transport.DefaultLease {
		t.Errorf("an I/O waited %v across the kill of a replica's node, not under the agent lease %v", pause, transport.DefaultLease)
	}
	if st, _ := c.replicaStates(1); st[uris[0]] != "healthy" || st[uris[1]] != "failed" {
		t.Errorf("replicas after the kill of node 2: %v; want %s healthy, %s failed", st, uris[0], uris[1])
	}
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check after the kill of node 2:\n%s", out)
	}
	for snap, want := range snaps {
		if got := hashURI(t, c.uri("host-b", snap)); got != want {
			t.Errorf("snapshot %s reads differently after the kill", snap)
		}
	}

	// The replica on node 2 is replaced by node 3's export while fio
	// writes region C.
	waitC := fioJSON(t, c.uri("host-a", "d"), jobC...)
	time.Sleep(time.Second)
	t0 := time.Now()
	out := c.cli("container", "replace-replica", "1", "--old", uris[1], "--new", uris[2], "--format")
	took := time.Since(t0)
	if !strings.Contains(out, "rebuilt the replica of container 1") {
		t.Fatalf("replace-replica: %s", out)
	}
	rc := waitC()
	t.Logf("replace-replica in %v: %s; fio during it: longest I/O %v", took.Round(time.Millisecond), strings.TrimSpace(out), rc.longest())
	if st, _ := c.replicaStates(1); st[uris[0]] != "healthy" || st[uris[2]] != "healthy" || len(st) != 2 {
		t.Errorf("replicas after replace-replica: %v; want %s and %s healthy", st, uris[0], uris[2])
	}

	// Node 1 is killed too: the rebuilt replica alone holds everything.
	c.storage[0].kill()
	for _, v := range []struct {
		agent string
		args  []string
	}{
		{"host-b", verifyJob("a", 0, 3)},
		{"host-a", verifyJob("b", region, 5)},
		{"host-b", verifyJob("c", 2*region, 7)},
	} {
		r := fioJSON(t, c.uri(v.agent, "d"), v.args...)()
		t.Logf("verify pass %s through %s after the kill of node 1: %d bytes read, longest I/O %v", v.args[0], v.agent, r.Jobs[0].Read.IOBytes, r.longest())
	}
	for snap, want := range snaps {
		for _, a := range []string{"host-a", "host-b"} {
			if got := hashURI(t, c.uri(a, snap)); got != want {
				t.Errorf("snapshot %s reads differently through %s from the rebuilt replica", snap, a)
			}
		}
	}
	if st, _ := c.replicaStates(1); st[uris[0]] != "failed" || st[uris[2]] != "healthy" {
		t.Errorf("replicas after the kill of node 1: %v; want %s failed, %s healthy", st, uris[0], uris[2])
	}
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check after the kill of node 1:\n%s", out)
	}
}

// rebuiltLine matches the controller's log line of a finished catch-up.
var rebuiltLine = regexp.MustCompile(`msg="replica rebuilt: healthy".* full=false .*bytes_copied=(\d+)`)

// TestClusterMirrorCatchUp: storage node 2 of a two-replica mirror is
// stopped (SIGSTOP) while a host writes a few slots; its replica is
// marked failed, and once the node goes on (SIGCONT) the controller
// catches it up by itself, copying only the slots written while it was
// away: far fewer bytes than the container holds. Both replicas then
// hold the same bytes.
func TestClusterMirrorCatchUp(t *testing.T) {
	requireTools(t, "qemu-io")
	c, uris, files := newMirrorCluster(t, 2, "host-a")
	c.cli("container", "add", "--mirror", uris[0]+","+uris[1], "--format", "--slot-size", "1M")
	c.cli("disk", "create", "d", "--size", "96M", "--segment-size", "1M")
	uri := c.uri("host-a", "d")
	run(t, 2*time.Minute, "qemu-io", "-f", "raw", uri, "-c", "write -P 0x11 0 64M", "-c", "flush")
	_, used := c.replicaStates(1)

	addr, export, err := nbdclient.ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cl, err := nbdclient.Dial(ctx, addr, export, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()

	// The outage: node 2 stopped for 4 s, during which 64 KiB writes
	// go round [32M, 36M): four slots, at most 16 MiB written.
	const (
		base    = 32 << 20
		area    = 4 << 20
		chunk   = 64 << 10
		outage  = 4 * time.Second
		maxOut  = 16 << 20
		pattern = 0x22
	)
	node2 := c.storage[1].cmd.Process
	if err := node2.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node2.Signal(syscall.SIGCONT) }) // before the node is stopped
	stopped := time.Now()
	buf := bytes.Repeat([]byte{pattern}, chunk)
	var written int64
	var longest time.Duration
	for i := 0; time.Since(stopped) < outage && written < maxOut; i++ {
		t0 := time.Now()
		if err := cl.WriteAt(ctx, buf, uint64(base+(i*chunk)%area), false); err != nil {
			t.Fatalf("write while node 2 is stopped: %v", err)
		}
		longest = max(longest, time.Since(t0))
		written += chunk
	}
	if err := cl.Flush(ctx); err != nil {
		t.Fatalf("flush while node 2 is stopped: %v", err)
	}
	time.Sleep(time.Until(stopped.Add(outage)))
	if st, _ := c.replicaStates(1); st[uris[1]] != "failed" {
		t.Fatalf("replica %s is %q with its node stopped, want failed", uris[1], st[uris[1]])
	}
	if err := node2.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	t.Logf("node 2 stopped for %v: %d bytes written to %d slots, longest write %v", resumed.Sub(stopped).Round(time.Millisecond), written, area>>20, longest)
	if written < area {
		t.Fatalf("only %d bytes written during the outage; the region is %d", written, area)
	}

	var copied int64
	for {
		if m := rebuiltLine.FindStringSubmatch(c.ctl.out.String()); m != nil {
			copied, _ = strconv.ParseInt(m[1], 10, 64)
			break
		}
		if time.Since(resumed) > 2*time.Minute {
			t.Fatalf("no catch-up 2m after node 2 went on:\n%s", c.ctl.out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("caught up %v after node 2 went on: %d bytes copied; %d bytes written to %d slots (%d bytes) during the outage; the container uses %d bytes",
		time.Since(resumed).Round(time.Millisecond), copied, written, area>>20, area, used)
	if copied < area {
		t.Errorf("the catch-up copied %d bytes, less than the %d bytes of the slots written during the outage", copied, area)
	}
	if copied*4 > used {
		t.Errorf("the catch-up copied %d bytes of the %d the container uses: not only the slots written during the outage", copied, used)
	}
	if st, _ := c.replicaStates(1); st[uris[0]] != "healthy" || st[uris[1]] != "healthy" {
		t.Errorf("replicas after the catch-up: %v; want both healthy", st)
	}
	// The catch-up, which no client started, is listed among the
	// controller's operations, done (once it has returned, just after
	// its log line).
	var ops struct {
		Operations []operationInfo `json:"operations"`
	}
	listed := func() bool {
		c.cliJSON(&ops, "operations")
		return slices.ContainsFunc(ops.Operations, func(o operationInfo) bool {
			return o.Kind == "rebuild" && o.Target == "container 1" && o.State == "done" && o.Unit == "slots" && o.Done == o.Total && o.Done != "0"
		})
	}
	for deadline := time.Now().Add(10 * time.Second); !listed() && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	if !listed() {
		t.Errorf("operations after the catch-up: %+v; want a rebuild of container 1, done", ops.Operations)
	}
	run(t, time.Minute, "qemu-io", "-f", "raw", uri, "-c", "read -P 0x11 0 32M", "-c", "read -P 0x22 32M 4M", "-c", "read -P 0x11 36M 28M")

	// The replicas' data, past their 1 MiB headers, slot by slot.
	if diff := compareReplicas(t, files[0], files[1], 1<<20); len(diff) > 0 {
		t.Errorf("the replicas differ in %d slots after the catch-up, the first: %v", len(diff), diff[:min(len(diff), 16)])
	}
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check after the catch-up:\n%s", out)
	}
}

// compareReplicas compares two replicas' files past their 1 MiB headers
// in slots of slot bytes, and returns the slots that differ. It reads
// only the slots where either file holds data (SEEK_DATA): past them both
// are holes, which read as zeros in both. The files are 2 GiB, mostly
// holes: reading them whole took 22 s under the race detector.
func compareReplicas(t *testing.T, a, b string, slot int) []int {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	// nextData is the offset of the first data at or after off in f, or
	// -1 if there is none.
	nextData := func(f *os.File, off int64) int64 {
		d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return -1
		}
		if err != nil {
			t.Fatalf("seek data in %s at %d: %v", f.Name(), off, err)
		}
		return d
	}
	const header = 1 << 20
	sa, sb := fileSize(t, fa), fileSize(t, fb)
	ba, bb := make([]byte, slot), make([]byte, slot)
	var diff []int
	for s := 0; ; s++ {
		off := int64(header) + int64(s)*int64(slot)
		// Skip to the slot of the first data of either file.
		next := nextData(fa, off)
		if db := nextData(fb, off); next < 0 || db >= 0 && db < next {
			next = db
		}
		if next < 0 || next >= min(sa, sb) {
			// Holes to the end of the shorter file: equal so far, and
			// files of different sizes differ at its end.
			if sa != sb {
				diff = append(diff, int((min(sa, sb)-header)/int64(slot)))
			}
			return diff
		}
		if next >= off+int64(slot) {
			s = int((next - header) / int64(slot))
			off = int64(header) + int64(s)*int64(slot)
		}
		na, erra := fa.ReadAt(ba, off)
		nb, errb := fb.ReadAt(bb, off)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			diff = append(diff, s)
		}
		if erra == io.EOF || errb == io.EOF {
			return diff
		}
		if erra != nil || errb != nil {
			t.Fatalf("read replicas at %d: %v, %v", off, erra, errb)
		}
	}
}

func fileSize(t *testing.T, f *os.File) int64 {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}
