package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"segmap/internal/heldport"
	"segmap/internal/meta"
	"segmap/internal/nbd/nbdclient"
)

// haCluster is three etcd members, three controllers over them (each
// reaching every member through a proxy of its own, so that one can be
// cut off from etcd), and agents.
type haCluster struct {
	t        *testing.T
	dir      string
	etcd     []*up
	etcdURLs []string
	ctlAddrs []string
	ctls     []*up
	proxies  [][]*proxy // per controller, per member
	agents   map[string]*up
	nbdAddrs map[string]string
}

func newHACluster(t *testing.T, agents ...string) *haCluster {
	t.Helper()
	c := &haCluster{t: t, dir: t.TempDir(), agents: map[string]*up{}, nbdAddrs: map[string]string{}}
	c.etcd, c.etcdURLs = startEtcd(t, c.dir, 3)
	for i := range 3 {
		var eps []string
		var ps []*proxy
		for _, u := range c.etcdURLs {
			p := newProxy(t, strings.TrimPrefix(u, "http://"))
			ps = append(ps, p)
			eps = append(eps, "http://"+p.addr())
		}
		c.proxies = append(c.proxies, ps)
		// Held ports: a killed controller's address refuses, and is
		// nobody else's, for the agents that still list it.
		p := heldport.New(t)
		c.ctlAddrs = append(c.ctlAddrs, p.Addr())
		c.ctls = append(c.ctls, startHeld(t, c.dir, []*heldport.Port{p}, "controller", "--listen", fdArg(0), "--name", fmt.Sprintf("c%d", i+1),
			"--etcd", strings.Join(eps, ","), "--insecure")) // default --etcd-ttl and --lease
	}
	for _, a := range agents {
		c.agents[a] = start(t, c.dir, "agent", "--controller", strings.Join(c.ctlAddrs, ","), "--name", a,
			"--nbd-listen", "127.0.0.1:0", "--insecure")
		c.nbdAddrs[a] = c.agents[a].nbd
	}
	return c
}

// startEtcd starts an etcd cluster of n members (processes) and returns
// them and their client URLs. The members reach each other over Unix
// sockets in dir (etcd names a unix:// peer URL's socket by its host part,
// relative to the working directory, which they share), and serve clients
// on ports the kernel chose, which they report: no port is chosen free and
// then handed over.
func startEtcd(t *testing.T, dir string, n int) ([]*up, []string) {
	t.Helper()
	var peers, members []string
	for i := range n {
		peers = append(peers, fmt.Sprintf("unix://e%d.peer:1", i+1))
		members = append(members, fmt.Sprintf("e%d=%s", i+1, peers[i]))
	}
	// The members start together: each waits for a quorum.
	var wg sync.WaitGroup
	procs := make([]*up, n)
	for i := range n {
		wg.Go(func() {
			name := fmt.Sprintf("e%d", i+1)
			cmd := exec.Command(etcdBin, "--name", name, "--dir", filepath.Join(dir, name),
				"--client", "http://127.0.0.1:0", "--peer", peers[i], "--cluster", strings.Join(members, ","))
			cmd.Dir = dir
			procs[i] = startCmd(t, cmd, dir, nil)
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	clients := make([]string, n)
	for i, p := range procs {
		clients[i] = p.clients
	}
	return procs, clients
}

// cli runs an admin command, given every controller's address.
func (c *haCluster) cli(args ...string) string {
	c.t.Helper()
	return c.cliVia(strings.Join(c.ctlAddrs, ","), args...)
}

func (c *haCluster) cliVia(controllers string, args ...string) string {
	c.t.Helper()
	out, errOut, code := runBin(c.t, append([]string{"--controller", controllers}, args...)...)
	if code != 0 {
		c.t.Fatalf("segmap %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func (c *haCluster) uri(agent, disk string) string { return "nbd://" + c.nbdAddrs[agent] + "/" + disk }

// leadsAt says whether controller u leads, and since when (the time it
// printed).
func leadsAt(u *up) (time.Time, bool) {
	out := u.out.String()
	i := strings.LastIndex(out, "leader (etcd revision")
	if i < 0 || strings.LastIndex(out, "stepped down") > i {
		return time.Time{}, false
	}
	return lineTime(out[i:]), true
}

// lineTime parses the time the first line of s ends with: "... (TIME)".
func lineTime(s string) time.Time {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	i, j := strings.LastIndexByte(s, '('), strings.LastIndexByte(s, ')')
	if i < 0 || j < i {
		return time.Time{}
	}
	ts, _ := time.Parse(time.RFC3339Nano, s[i+1:j])
	return ts
}

// leader waits until exactly one live controller other than not leads and
// returns its index.
func (c *haCluster) leader(not int, within time.Duration) int {
	c.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		var leaders []int
		for i, u := range c.ctls {
			if _, ok := leadsAt(u); ok && !u.killed() && i != not {
				leaders = append(leaders, i)
			}
		}
		if len(leaders) == 1 {
			return leaders[0]
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("no single leader after %v", within)
	return -1
}

// steppedDownAt is when controller u last printed that it stepped down.
func steppedDownAt(u *up) time.Time {
	out := u.out.String()
	i := strings.LastIndex(out, "standby: stepped down (")
	if i < 0 {
		return time.Time{}
	}
	return lineTime(out[i:])
}

// prober writes 4 KiB blocks through one agent as fast as it can, one at a
// time, and keeps the completion times, so that a pause in I/O shows as a
// gap between two of them. fresh probers write each block into a segment
// never written before (so every write allocates); the others rewrite a
// few segments.
type prober struct {
	name  string
	c     *nbdclient.Client
	fresh bool

	mu    sync.Mutex
	times []time.Time
	gen   map[uint64]uint32 // offset -> generation last acknowledged
	maybe [2]uint64         // offset, generation of the write cut off at the end
	err   error
}

const probeSeg = 1 << 20 // the disks' segment size

func (p *prober) run(ctx context.Context) {
	buf := make([]byte, 4096)
	for g := uint32(1); ctx.Err() == nil; g++ {
		off := uint64(g%256) * 4096 // 1 MiB: one segment
		if p.fresh {
			off = uint64(g) * probeSeg
		}
		binary.LittleEndian.PutUint64(buf, off)
		binary.LittleEndian.PutUint32(buf[8:], g)
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		err := p.c.WriteAt(wctx, buf, off, false)
		cancel()
		p.mu.Lock()
		if err != nil {
			if ctx.Err() == nil {
				p.err = fmt.Errorf("%s: write at %d: %w", p.name, off, err)
			}
			// Stopped in flight: the write may have landed or not.
			p.maybe = [2]uint64{off, uint64(g)}
			p.mu.Unlock()
			return
		}
		p.times = append(p.times, time.Now())
		p.gen[off] = g
		p.mu.Unlock()
	}
}

// gap returns the longest time between two completions within [from, to],
// counting from from and to to.
func (p *prober) gap(from, to time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	last := from
	var worst time.Duration
	for _, t := range p.times {
		if t.Before(from) {
			continue
		}
		if t.After(to) {
			break
		}
		worst = max(worst, t.Sub(last))
		last = t
	}
	return max(worst, to.Sub(last))
}

// verify reads back every block the prober wrote.
func (p *prober) verify(t *testing.T) {
	t.Helper()
	buf := make([]byte, 4096)
	for off, g := range p.gen {
		if err := p.c.ReadAt(t.Context(), buf, off); err != nil {
			t.Fatalf("%s: read %d: %v", p.name, off, err)
		}
		got := binary.LittleEndian.Uint32(buf[8:])
		if p.maybe[1] != 0 && off == p.maybe[0] && uint64(got) == p.maybe[1] {
			continue
		}
		if binary.LittleEndian.Uint64(buf) != off || got != g {
			t.Errorf("%s: block at %d holds offset %d generation %d, want generation %d", p.name, off,
				binary.LittleEndian.Uint64(buf), binary.LittleEndian.Uint32(buf[8:]), g)
		}
	}
}

// waitProgress waits until p has completed a write after since; if none
// does within the bound, it calls stalled (to gather evidence) and fails.
func (p *prober) waitProgress(t *testing.T, since time.Time, within time.Duration, stalled func()) {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		n := len(p.times)
		ok := n > 0 && p.times[n-1].After(since)
		err := p.err
		p.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	stalled()
	t.Fatalf("%s: no write completed within %v", p.name, within)
}

// dumpStacks has every controller and agent still running print its
// goroutines (SIGQUIT) into its output, which the harness shows when the
// test fails: a write that hangs shows where it waits.
func (c *haCluster) dumpStacks() {
	var ps []*up
	ps = append(ps, c.ctls...)
	for _, a := range c.agents {
		ps = append(ps, a)
	}
	for _, u := range ps {
		if !u.hasExited() && !u.killed() {
			u.cmd.Process.Signal(syscall.SIGQUIT)
		}
	}
	time.Sleep(2 * time.Second) // for the dumps to reach the output
}

// pattern writes a disk's first 4 MiB with byte b through qemu-io.
func (c *haCluster) pattern(agent, disk string, b byte) {
	c.t.Helper()
	run(c.t, time.Minute, "qemu-io", "-f", "raw", c.uri(agent, disk), "-c", fmt.Sprintf("write -P 0x%02x 0 4M", b), "-c", "flush")
}

func (c *haCluster) expect(agent, disk string, b byte) {
	c.t.Helper()
	out, err := runErr(time.Minute, "qemu-io", "-f", "raw", "-r", c.uri(agent, disk), "-c", fmt.Sprintf("read -P 0x%02x 0 4M", b))
	if err != nil || strings.Contains(out, "Pattern verification failed") {
		c.t.Errorf("%s through %s: want 0x%02x: %v\n%s", disk, agent, b, err, out)
	}
}

// TestHAFailover: three controllers on a three-member etcd, two agents,
// fio (verify) and write probes on both. The leader is killed with
// SIGKILL; then an etcd member (etcd's leader) is killed; then the
// controller leading is cut off from etcd. Each time a standby takes over
// and I/O resumes (the pauses are measured); the cut-off leader steps down
// before the next is elected, and etcd's history shows no commit of an
// earlier term after one of a later term. Snapshots taken before and after
// read as they should, every fio verify and probe read-back passes, and
// 'segmap check' is clean.
func TestHAFailover(t *testing.T) {
	requireTools(t, "fio", "qemu-io")
	c := newHACluster(t, "host-a", "host-b")
	for i := range 2 {
		path := filepath.Join(c.dir, fmt.Sprintf("c%d", i+1))
		c.cli("container", "add", path, "--size", "4G", "--slot-size", "1M")
	}
	c.cli("disk", "create", "da", "--size", "128M")
	c.cli("disk", "create", "db", "--size", "128M")
	c.cli("disk", "create", "pa", "--size", "16M")
	c.cli("disk", "create", "pb", "--size", "2G")
	c.cli("disk", "create", "pat", "--size", "16M")
	c.pattern("host-a", "pat", 0xa1)
	c.cli("snapshot", "pat", "--name", "pat@before")

	fioJob := func(agent, disk string) func() (string, error) {
		return background(t, "fio", "--ioengine=nbd", "--uri="+c.uri(agent, disk), "--name=w", "--rw=randwrite",
			"--bs=4k", "--iodepth=16", "--size=64M", "--verify=crc32c", "--verify_backlog=512", "--verify_fatal=1",
			"--time_based", "--runtime=45", "--randseed=11")
	}
	fios := []func() (string, error){fioJob("host-a", "da"), fioJob("host-b", "db")}

	ctx, stopProbes := context.WithCancel(t.Context())
	var probes []*prober
	var wg sync.WaitGroup
	for _, pr := range []struct {
		agent, disk string
		fresh       bool
	}{{"host-a", "pa", false}, {"host-b", "pb", true}} {
		nc, err := nbdclient.Dial(t.Context(), c.nbdAddrs[pr.agent], pr.disk, nbdclient.ClientConfig{})
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		p := &prober{name: pr.agent + "/" + pr.disk, c: nc, fresh: pr.fresh, gen: map[uint64]uint32{}}
		probes = append(probes, p)
		wg.Go(func() { p.run(ctx) })
	}
	defer func() { stopProbes(); wg.Wait() }()
	pauses := func(phase string, from time.Time) {
		t.Helper()
		for _, p := range probes {
			p.waitProgress(t, time.Now(), 30*time.Second, c.dumpStacks)
		}
		to := time.Now()
		for _, p := range probes {
			g := p.gap(from, to)
			t.Logf("%s: longest I/O pause of %s: %v", phase, p.name, g.Round(time.Millisecond))
			if g > 10*time.Second {
				t.Errorf("%s: %s paused %v, more than 10s", phase, p.name, g)
			}
		}
	}

	// 1. kill -9 the leader.
	time.Sleep(2 * time.Second)
	first := c.leader(-1, 10*time.Second)
	killed := time.Now()
	c.ctls[first].kill()
	second := c.leader(first, 20*time.Second)
	at, _ := leadsAt(c.ctls[second])
	t.Logf("kill -9 of c%d: c%d leads %v later", first+1, second+1, at.Sub(killed).Round(time.Millisecond))
	pauses("leader killed", killed)

	// Snapshots before and after the failover read as they should.
	c.pattern("host-b", "pat", 0xb2)
	c.cli("snapshot", "pat", "--name", "pat@after")
	c.pattern("host-a", "pat", 0xc3)
	for _, agent := range []string{"host-a", "host-b"} {
		c.expect(agent, "pat@before", 0xa1)
		c.expect(agent, "pat@after", 0xb2)
		c.expect(agent, "pat", 0xc3)
	}

	// 2. kill -9 etcd's leader under load: nothing stops.
	cli := haEtcdClient(t, c.etcdURLs)
	etcdLeader := -1
	for i, u := range c.etcdURLs {
		st, err := cli.Status(t.Context(), u)
		if err != nil {
			t.Fatal(err)
		}
		if st.Header.MemberId == st.Leader {
			etcdLeader = i
		}
	}
	if etcdLeader < 0 {
		t.Fatal("no etcd leader")
	}
	killed = time.Now()
	c.etcd[etcdLeader].kill()
	time.Sleep(5 * time.Second)
	if got := c.leader(first, time.Second); got != second {
		t.Errorf("etcd member e%d killed: leadership moved from c%d to c%d", etcdLeader+1, second+1, got+1)
	}
	pauses(fmt.Sprintf("etcd member e%d (etcd's leader) killed", etcdLeader+1), killed)

	// 3. Cut the leader off from etcd: it steps down before a standby is
	// elected; its requests held in the proxies reach etcd only after
	// the link comes back, and are refused.
	cut := time.Now()
	for _, p := range c.proxies[second] {
		p.cut.Store(true)
	}
	third := c.leader(second, 20*time.Second)
	elected, _ := leadsAt(c.ctls[third])
	var down time.Time
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if down = steppedDownAt(c.ctls[second]); !down.IsZero() {
			break
		}
	}
	if down.IsZero() || !down.Before(elected) {
		t.Errorf("c%d, cut off, stepped down at %v; c%d elected at %v", second+1, down, third+1, elected)
	} else {
		t.Logf("c%d cut off from etcd: stepped down %v after the cut, %v before c%d was elected", second+1,
			down.Sub(cut).Round(time.Millisecond), elected.Sub(down).Round(time.Millisecond), third+1)
	}
	pauses("leader cut off from etcd", cut)
	for _, p := range c.proxies[second] {
		p.cut.Store(false)
	}

	for _, f := range fios {
		out, err := f()
		if err != nil || strings.Contains(out, "verify failed") || !strings.Contains(out, "err= 0") {
			t.Fatalf("fio: %v\n%s", err, out)
		}
	}
	stopProbes()
	wg.Wait()
	for _, p := range probes {
		if p.err != nil {
			t.Error(p.err)
		}
		p.verify(t)
	}
	// check through every controller, and through a standby alone.
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
	if out := c.cliVia(c.ctlAddrs[second], "check"); !strings.Contains(out, "clean") {
		t.Errorf("check through the standby c%d:\n%s", second+1, out)
	}
	// And straight from etcd, without a controller.
	if out, errOut, code := runBin(t, "check", "--etcd", strings.Join(c.etcdURLs, ",")); code != 0 || !strings.Contains(out, "clean") {
		t.Errorf("check --etcd: exit %d\n%s%s", code, out, errOut)
	}
	checkWriterHistory(t, cli, "/segmap/")
}

func haEtcdClient(t *testing.T, urls []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: urls, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// checkWriterHistory reads every revision of the writer key and requires
// the terms that wrote them ("NAME rev R") never to go back: no commit of
// a deposed leader landed after one of its successor.
func checkWriterHistory(t *testing.T, cli *clientv3.Client, prefix string) {
	t.Helper()
	key := prefix + "meta/" + meta.WriterKey
	last, err := cli.Get(t.Context(), key)
	if err != nil || len(last.Kvs) == 0 {
		t.Fatalf("writer key: %v", err)
	}
	end := last.Kvs[0].ModRevision
	wctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	w := cli.Watch(wctx, key, clientv3.WithRev(1))
	var terms []string
	var prev int64
	commits := 0
	for done := false; !done; {
		resp, ok := <-w
		if !ok || resp.Err() != nil {
			t.Fatalf("watch writer history: %v", resp.Err())
		}
		for _, ev := range resp.Events {
			f := bytes.Fields(ev.Kv.Value)
			rev, err := strconv.ParseInt(string(f[len(f)-1]), 10, 64)
			if err != nil {
				t.Fatalf("writer %q", ev.Kv.Value)
			}
			commits++
			if rev < prev {
				t.Errorf("revision %d written by %q after a commit of the term of revision %d", ev.Kv.ModRevision, ev.Kv.Value, prev)
			}
			if rev != prev {
				terms = append(terms, string(ev.Kv.Value))
			}
			prev = rev
			done = done || ev.Kv.ModRevision >= end
		}
	}
	t.Logf("%d commits by %d terms in order: %s", commits, len(terms), strings.Join(terms, ", "))
	if len(terms) < 3 {
		t.Errorf("%d terms wrote; want at least 3 (one per failover)", len(terms))
	}
}

// TestUpEtcd: 'segmap up --etcd' keeps its metadata in etcd (no meta.db),
// reached over mutual TLS with certificates of the segmap CA, and finds it
// there again after a restart.
func TestUpEtcd(t *testing.T) {
	requireTools(t, "qemu-io")
	dir := t.TempDir()
	certs := filepath.Join(dir, "certs")
	if _, errOut, code := runBin(t, "certs", "init", certs, "--storage", "etcd1"); code != 0 {
		t.Fatalf("certs init: %s", errOut)
	}
	// A member alone never dials its peer URL: both on port 0.
	url := startBin(t, etcdBin, dir, "--name", "etcd1", "--dir", filepath.Join(dir, "etcd1"), "--client", "https://127.0.0.1:0",
		"--peer", "http://127.0.0.1:0", "--cert", filepath.Join(certs, "storage-etcd1.crt"),
		"--key", filepath.Join(certs, "storage-etcd1.key"), "--ca", filepath.Join(certs, "ca.crt")).clients
	etcdArgs := []string{"--etcd", url, "--etcd-prefix", "/up-test/", "--etcd-cacert", filepath.Join(certs, "ca.crt"),
		"--etcd-cert", filepath.Join(certs, "controller-controller.crt"), "--etcd-key", filepath.Join(certs, "controller-controller.key")}
	// Without a client certificate etcd refuses the controller.
	if out, errOut, code := runBin(t, "up", "--data", filepath.Join(dir, "x"), "--nbd-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--http-listen", "",
		"--etcd", url, "--etcd-cacert", filepath.Join(certs, "ca.crt"), "--etcd-ttl", "1s"); code == 0 {
		t.Errorf("up without an etcd client certificate ran:\n%s%s", out, errOut)
	}
	data := filepath.Join(dir, "data")
	u := startUp(t, data, etcdArgs...)
	if !strings.Contains(u.out.String(), "etcd "+url+" under /up-test/") {
		t.Errorf("up does not say where its metadata is:\n%s", u.out)
	}
	u.cli("disk", "create", "d", "--size", "64M")
	run(t, time.Minute, "qemu-io", "-f", "raw", u.uri("d"), "-c", "write -P 0x7e 1M 3M", "-c", "flush")
	u.stop()
	if _, err := os.Stat(filepath.Join(data, "meta.db")); !os.IsNotExist(err) {
		t.Errorf("meta.db in the data directory: %v", err)
	}
	u = startUp(t, data, etcdArgs...)
	run(t, time.Minute, "qemu-io", "-f", "raw", u.uri("d"), "-c", "read -P 0x7e 1M 3M", "-c", "read -P 0 0 1M")
	if out := u.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
	out, errOut, code := runBin(t, "--controller", u.admin, "disk", "list")
	if code != 0 || !strings.Contains(out, "d ") {
		t.Errorf("disk list: %s%s", out, errOut)
	}
}
