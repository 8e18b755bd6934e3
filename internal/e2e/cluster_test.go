package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"segmap/internal/heldport"
)

type cluster struct {
	t        *testing.T
	dir      string
	certs    string // TLS certificates; "" for a plaintext cluster
	ctlPort  *heldport.Port
	ctlAddr  string
	ctl      *up
	agents   map[string]*up
	nbdPorts map[string]*heldport.Port
	nbdAddrs map[string]string
	storage  []*up
	// storageArgs[i] starts storage[i] again, on its held port.
	storageArgs  [][]string
	storagePorts []*heldport.Port
	// ctlExtra and agentExtra are more flags for the controller and
	// the agents (newClusterWith).
	ctlExtra, agentExtra []string
}

// restartStorage kills storage node i (SIGKILL, as a crash would), if it
// runs, and starts it again on the same address and data directory.
func (c *cluster) restartStorage(i int) {
	c.t.Helper()
	c.storage[i].kill()
	c.storage[i] = startHeld(c.t, c.storage[i].dir, []*heldport.Port{c.storagePorts[i]}, c.storageArgs[i]...)
}

// newBareCluster returns a cluster with nothing started: the controller's
// port is held by the test, so that a restarted controller comes back on
// the address its agents know.
func newBareCluster(t *testing.T) *cluster {
	p := heldport.New(t)
	return &cluster{t: t, dir: t.TempDir(), ctlPort: p, ctlAddr: p.Addr(), agents: map[string]*up{},
		nbdPorts: map[string]*heldport.Port{}, nbdAddrs: map[string]string{}}
}

func (c *cluster) tlsArgs() []string {
	if c.certs == "" {
		return []string{"--insecure"}
	}
	return []string{"--certs", c.certs}
}

func (c *cluster) startController() {
	c.ctl = startHeld(c.t, c.dir, []*heldport.Port{c.ctlPort},
		append(append([]string{"controller", "--listen", fdArg(0), "--data", filepath.Join(c.dir, "ctl"), "--lease", "3s"}, c.tlsArgs()...), c.ctlExtra...)...)
}

// nbdPort returns the NBD port of the named agent, the same for every
// start of it.
func (c *cluster) nbdPort(name string) *heldport.Port {
	p := c.nbdPorts[name]
	if p == nil {
		p = heldport.New(c.t)
		c.nbdPorts[name] = p
		c.nbdAddrs[name] = p.Addr()
	}
	return p
}

func (c *cluster) startAgent(name string) *up {
	return c.startAgentVia(name, c.ctlAddr)
}

// startAgentVia starts the named agent, reaching the controller at ctl.
func (c *cluster) startAgentVia(name, ctl string, extra ...string) *up {
	args := append([]string{"agent", "--controller", ctl, "--name", name, "--nbd-listen", fdArg(0)}, c.tlsArgs()...)
	args = append(args, c.agentExtra...)
	a := startHeld(c.t, c.dir, []*heldport.Port{c.nbdPort(name)}, append(args, extra...)...)
	c.agents[name] = a
	return a
}

func (c *cluster) uri(agent, disk string) string { return "nbd://" + c.nbdAddrs[agent] + "/" + disk }

// cliJSON runs an admin command with --json and decodes its output into v.
func (c *cluster) cliJSON(v any, args ...string) {
	c.t.Helper()
	out := c.cli(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		c.t.Fatalf("segmap %v --json: %v\n%s", args, err, out)
	}
}

// cli runs an admin command against the controller.
func (c *cluster) cli(args ...string) string {
	c.t.Helper()
	var tls []string
	if c.certs != "" {
		tls = []string{"--certs", c.certs}
	}
	out, errOut, code := runBin(c.t, append(append([]string{"--controller", c.ctlAddr}, tls...), args...)...)
	if code != 0 {
		c.t.Fatalf("segmap %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// newCluster starts a controller with mutual TLS (certificates from
// 'segmap certs init'), two storage nodes whose exports are its
// containers, serving NBD over TLS only, and the named agents.
func newCluster(t *testing.T, agents ...string) *cluster {
	return newClusterWith(t, nil, nil, agents...)
}

// newClusterWith is newCluster with more flags for the controller and the
// agents.
func newClusterWith(t *testing.T, ctlExtra, agentExtra []string, agents ...string) *cluster {
	return newClusterOf(t, 2, ctlExtra, agentExtra, agents...)
}

// newClusterOf is newClusterWith with stores storage nodes (s1, s2, ...)
// instead of two; with none, the test adds the containers it wants.
func newClusterOf(t *testing.T, stores int, ctlExtra, agentExtra []string, agents ...string) *cluster {
	c := newBareCluster(t)
	c.ctlExtra, c.agentExtra = ctlExtra, agentExtra
	c.certs = filepath.Join(c.dir, "certs")
	args := []string{"certs", "init", c.certs}
	for _, a := range agents {
		args = append(args, "--agent", a)
	}
	if _, errOut, code := runBin(t, args...); code != 0 {
		t.Fatalf("certs init: %s", errOut)
	}
	c.startController()
	// Storage nodes, each serving one export, formatted as a container
	// through NBD by the controller.
	for i := 1; i <= stores; i++ {
		dir := filepath.Join(c.dir, fmt.Sprintf("store%d", i))
		if _, errOut, code := runBin(t, "storage", "create", "--dir", dir, "s", "--size", "2G"); code != 0 {
			t.Fatalf("storage create: %s", errOut)
		}
		addr := c.startStorage(fmt.Sprintf("s%d", i), dir, "--dir", dir)
		c.cli("container", "add", "nbd://"+addr+"/s", "--format", "--slot-size", "1M")
	}
	for _, a := range agents {
		c.startAgent(a)
	}
	return c
}

// startStorage starts a storage node named name (its certificate is
// issued here) with dir as its working directory and args (--dir,
// --device) saying what it serves, on a port the test holds, and returns
// its address: the containers' URIs name it, and it stays the node's
// across restarts (restartStorage).
func (c *cluster) startStorage(name, dir string, args ...string) string {
	c.t.Helper()
	if _, errOut, code := runBin(c.t, "certs", "issue", c.certs, "--role", "storage", "--name", name); code != 0 {
		c.t.Fatalf("certs issue storage %s: %s", name, errOut)
	}
	p := heldport.New(c.t)
	sargs := append([]string{"storage", "--listen", fdArg(0), "--certs", c.certs, "--cert-name", name}, args...)
	c.storage = append(c.storage, startHeld(c.t, dir, []*heldport.Port{p}, sargs...))
	c.storageArgs = append(c.storageArgs, sargs)
	c.storagePorts = append(c.storagePorts, p)
	return p.Addr()
}

func fioURI(t *testing.T, uri string, args ...string) string {
	t.Helper()
	out := run(t, 5*time.Minute, "fio", append([]string{"--ioengine=nbd", "--uri=" + uri}, args...)...)
	if strings.Contains(out, "verify failed") || strings.Contains(out, " err=") && !strings.Contains(out, " err= 0") {
		t.Fatalf("fio %v:\n%s", args, out)
	}
	return out
}

// TestClusterTwoAgents: a controller and two agents as separate processes;
// fio with crc32c verification writes through both agents to different
// ranges of one disk (and to another disk), snapshots are taken during the
// run, and every snapshot reads the same through either agent.
//
// The writers write 8 MiB each: a write after a snapshot is a
// copy-on-write fill through the controller, and four times as much was
// 90 s of the test under the race detector. They still write for many
// seconds after the second snapshot (26 s in all on a loaded 2-core
// machine: the fills run at about 80 writes a second).
func TestClusterTwoAgents(t *testing.T) {
	t.Parallel()
	requireTools(t, "fio", "nbdcopy")
	c := newCluster(t, "host-a", "host-b")
	c.cli("disk", "create", "shared", "--size", "64M")
	c.cli("disk", "create", "other", "--size", "16M")

	job := func(uri string, offset string) func() (string, error) {
		return background(t, "fio", "--ioengine=nbd", "--uri="+uri, "--name=w", "--rw=randwrite", "--bs=4k",
			"--iodepth=16", "--offset="+offset, "--size=8M", "--verify=crc32c", "--randseed=7")
	}
	waits := []func() (string, error){
		job(c.uri("host-a", "shared"), "0"),
		job(c.uri("host-b", "shared"), "32M"),
		job(c.uri("host-b", "other"), "0"),
	}
	time.Sleep(time.Second)
	c.cli("snapshot", "shared", "--name", "shared@1")
	time.Sleep(time.Second)
	c.cli("snapshot", "shared", "--name", "shared@2")
	for _, w := range waits {
		out, err := w()
		if err != nil || strings.Contains(out, "verify failed") || !strings.Contains(out, "err= 0") {
			t.Fatalf("fio: %v\n%s", err, out)
		}
	}
	for _, snap := range []string{"shared@1", "shared@2"} {
		a := filepath.Join(t.TempDir(), "a")
		b := filepath.Join(t.TempDir(), "b")
		run(t, 2*time.Minute, "nbdcopy", c.uri("host-a", snap), a)
		run(t, 2*time.Minute, "nbdcopy", c.uri("host-b", snap), b)
		if sha(t, a) != sha(t, b) {
			t.Errorf("snapshot %s reads differently through the two agents", snap)
		}
	}
	// The disk verifies through the other agent too.
	fioURI(t, c.uri("host-b", "shared"), "--name=v", "--rw=randwrite", "--bs=4k", "--offset=0", "--size=8M",
		"--verify=crc32c", "--randseed=7", "--verify_only=1")
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
}

// TestClusterKills: kill -9 of an agent and of the controller while fio
// writes; after restarts, every flushed write is there, I/O resumes by
// itself, and check is clean.
func TestClusterKills(t *testing.T) {
	requireTools(t, "fio", "qemu-io", "/usr/bin/python3")
	c := newCluster(t, "host-a", "host-b")
	c.cli("disk", "create", "d", "--size", "128M")
	// Flushed data first (qemu-io flushes before it exits).
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "write -P 0x5a 0 32M", "-c", "flush")

	// Agent kill during writes. The writer fills 64 KiB regions of
	// [64M, 128M), each with its own pattern, 16 writes in flight at a
	// time, and flushes after every 16: "flushed N" means regions 0..N-1
	// are durable. It is killed in the middle, once 64 regions are; so
	// that it is surely still writing then, however fast the machine,
	// it writes the regions over and over (up to 64 passes).
	const (
		base    = 64 << 20
		region  = 64 << 10
		regions = 1024
	)
	const writer = `
import nbd, sys, struct
uri, base, region, count, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h = nbd.NBD()
h.connect_uri(uri)
i = 0
while i < 64 * count:
    batch = []
    for j in range(i, i + depth):
        k = j % count
        buf = nbd.Buffer.from_bytearray(bytearray(struct.pack("<Q", 0x5345474d41500000 + k) * (region // 8)))
        batch.append((buf, h.aio_pwrite(buf, base + k * region)))
    for _, c in batch:
        while not h.aio_command_completed(c):
            h.poll(-1)
    h.flush()
    i += len(batch)
    print("flushed", min(i, count), flush=True)
print("done", flush=True)
`
	// verify prints the regions among the first N that do not hold their
	// pattern.
	const verify = `
import nbd, sys, struct
uri, base, region, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
bad = [j for j in range(count)
       if h.pread(region, base + j * region) != struct.pack("<Q", 0x5345474d41500000 + j) * (region // 8)]
print("regions", count, "bad", " ".join(map(str, bad)) if bad else "none")
`
	flushed := func(out string) int {
		n := 0
		lines := strings.Split(out, "\n")
		for _, l := range lines[:len(lines)-1] { // the last may be half written
			if v, ok := strings.CutPrefix(l, "flushed "); ok {
				var i int
				if _, err := fmt.Sscan(v, &i); err == nil {
					n = max(n, i)
				}
			}
		}
		return n
	}
	w, progress := backgroundOut(t, "/usr/bin/python3", "-c", writer, c.uri("host-a", "d"),
		fmt.Sprint(base), fmt.Sprint(region), fmt.Sprint(regions), "16")
	for deadline := time.Now().Add(2 * time.Minute); flushed(progress.String()) < 64; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the writer did not flush 64 regions:\n%s", progress)
		}
	}
	c.agents["host-a"].kill()
	out, err := w()
	if err == nil || strings.Contains(out, "done") {
		t.Fatalf("the writer finished although its agent was killed under it: %v\n%s", err, out)
	}
	n := flushed(out)
	t.Logf("agent killed with %d of %d regions flushed", n, regions)
	c.startAgent("host-a")
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "read -P 0x5a 0 32M")
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-b", "d"), "-c", "read -P 0x5a 0 32M")
	// Every region flushed before the kill is there, through both agents.
	verifyFlushed := func(when string, agents ...string) {
		t.Helper()
		for _, a := range agents {
			got := python(t, time.Minute, verify, c.uri(a, "d"), fmt.Sprint(base), fmt.Sprint(region), fmt.Sprint(n))
			if !strings.Contains(got, "bad none") {
				t.Errorf("%s, through %s, regions flushed before the agent kill are lost: %s", when, a, got)
			}
		}
	}
	verifyFlushed("after the agent kill", "host-a", "host-b")
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check after the agent kill:\n%s", out)
	}

	// Controller kill during writes: the agents wait, re-attach to the
	// restarted controller by themselves, and fio goes on to the end.
	w = background(t, "fio", "--ioengine=nbd", "--uri="+c.uri("host-b", "d"), "--name=w2", "--rw=randwrite",
		"--bs=64k", "--iodepth=8", "--offset=32M", "--size=32M", "--verify=crc32c", "--loops=4")
	time.Sleep(700 * time.Millisecond)
	c.ctl.kill()
	time.Sleep(500 * time.Millisecond)
	c.startController()
	out, err = w()
	if err != nil || !strings.Contains(out, "err= 0") {
		t.Fatalf("fio across a controller kill: %v\n%s", err, out)
	}
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "read -P 0x5a 0 32M")
	verifyFlushed("after the controller kill", "host-a", "host-b")
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check after the controller kill:\n%s", out)
	}
}

// TestClusterGroupSnapshotStuck: a group snapshot whose agent cannot drain
// its I/O (the storage under it is frozen) fails within its time limit,
// every agent is activated, and nothing stays suspended.
func TestClusterGroupSnapshotStuck(t *testing.T) {
	requireTools(t, "fio", "qemu-io")
	c := newCluster(t, "host-a", "host-b")
	c.cli("disk", "create", "g1", "--size", "64M")
	c.cli("disk", "create", "g2", "--size", "64M")
	// Map both disks on both agents.
	for _, a := range []string{"host-a", "host-b"} {
		for _, d := range []string{"g1", "g2"} {
			run(t, time.Minute, "qemu-io", "-f", "raw", c.uri(a, d), "-c", "write -P 1 0 1M")
		}
	}
	w := background(t, "fio", "--ioengine=nbd", "--uri="+c.uri("host-a", "g1"), "--name=w", "--rw=randwrite",
		"--bs=4k", "--iodepth=4", "--size=64M", "--time_based", "--runtime=8")
	time.Sleep(time.Second)
	for _, s := range c.storage {
		s.cmd.Process.Signal(syscall.SIGSTOP)
	}
	// A write that is surely in flight, whether or not fio has started
	// writing yet on a loaded machine: it cannot complete while the
	// storage is stopped.
	stuck := background(t, "qemu-io", "-f", "raw", c.uri("host-a", "g1"), "-c", "write -P 3 2M 64k")
	time.Sleep(500 * time.Millisecond) // writes are now stuck in flight
	t0 := time.Now()
	_, errOut, code := runBin(t, "--controller", c.ctlAddr, "--certs", c.certs, "snapshot", "--group", "g1", "g2", "--name", "x", "--quiesce-timeout", "2s")
	took := time.Since(t0)
	for _, s := range c.storage {
		s.cmd.Process.Signal(syscall.SIGCONT)
	}
	t.Logf("group snapshot with a stuck agent: exit %d after %v: %s", code, took, errOut)
	if code == 0 || !strings.Contains(errOut, "quiesce") {
		t.Fatalf("group snapshot with a stuck agent: exit %d, %q; want a quiesce failure", code, errOut)
	}
	if took > 20*time.Second {
		t.Errorf("the group snapshot failed only after %v (limit 2s)", took)
	}
	if out, err := w(); err != nil || !strings.Contains(out, "err= 0") {
		t.Errorf("fio across the failed snapshot: %v\n%s", err, out)
	}
	if out, err := stuck(); err != nil {
		t.Errorf("the write held while the storage was stopped: %v\n%s", err, out)
	}
	// Nothing is suspended: both disks take I/O through both agents.
	for _, a := range []string{"host-a", "host-b"} {
		for _, d := range []string{"g1", "g2"} {
			run(t, time.Minute, "qemu-io", "-f", "raw", c.uri(a, d), "-c", "write -P 2 1M 4k", "-c", "read -P 2 1M 4k")
		}
	}
	if _, _, code := runBin(t, "--controller", c.ctlAddr, "--certs", c.certs, "disk", "info", "g1@x"); code == 0 {
		t.Errorf("the failed group snapshot left g1@x behind")
	}
	// And a group snapshot now succeeds.
	c.cli("snapshot", "--group", "g1", "g2", "--name", "y")
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
}
