package e2e

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"segmap/internal/nbd/nbdclient"
)

// Sizes of the linearizability test.
const (
	// linRegs registers, spread over linSegs segments of 1 MiB, so that a
	// snapshot makes writes fault in several segments.
	linRegs = 16
	linSegs = 4
	// linConns NBD connections, half through each agent, each used by
	// linWorkers clients at once.
	linConns   = 4
	linWorkers = 2
	// linMinOps: a history runs until its faults are done and it holds at
	// least this many operations, or for linMaxRun.
	linMinOps = 2000
	linMaxRun = 40 * time.Second
	// linTwin is added to a history's index for its twin's.
	linTwin = 1 << 10
	// linShort histories in the short form.
	linShort = 2
	// linLease is the cluster's --lease (cluster.startController).
	linLease = 3 * time.Second
	// linOpTimeout bounds one operation; an operation of a fenced agent
	// waits for the partition to heal, well within it.
	linOpTimeout = 30 * time.Second
	// linCheckTimeout bounds porcupine's check of one history.
	linCheckTimeout = 2 * time.Minute
)

// linPending is the return time of an operation whose reply never came:
// it may take effect at any time after its call.
const linPending = math.MaxInt64

// TestLinearizable checks that the blocks of a disk behave as
// linearizable registers while agents crash, stall and are cut off: a
// controller and two agents run as real processes, four NBD connections
// (two per agent, each through a TCP proxy that can cut it) read and write
// 4 KiB blocks of one disk (and four more, of their own, those of a twin
// disk of the other copy-on-write policy, snapshotted at the same time:
// faults of two families at once), each write a unique value (some FUA, some
// whole-segment writes covering four registers at once, with flushes in
// between), while the test kills agents with SIGKILL and restarts them,
// cuts an agent from the controller past its lease (it must fence itself)
// or for less than it, stops an agent with SIGSTOP past its lease, cuts
// and severs client connections, and takes snapshots. A quarter of the
// operations give up after a second, so that clients keep sending to an
// agent that is stopped or fenced.
//
// Every history goes to porcupine, together with the reads of each
// snapshot (as reads during the snapshot command) and final reads through
// both agents; each must be linearizable. A write whose reply never came
// (killed agent, severed connection, given up) may or may not have taken
// effect. Acknowledged writes are durable across an agent kill: the
// containers outlive the agent. A read that overlaps a write may see it
// half done (the storage nodes' files give no atomicity between pread and
// pwrite): it counts as a read of either value, and must overlap a write
// of one of them.
//
// SEGMAP_LINEAR_SEED=N reruns a history's schedule of operations and
// faults (timing still differs); SEGMAP_SOAK=DURATION keeps making
// histories with fresh seeds until that much time has passed. A failed
// history's visualization goes to the test's artifacts (go test
// -artifacts), or else to a directory under $TMPDIR, named in the error.
func TestLinearizable(t *testing.T) {
	soak := soakDuration(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SEGMAP_LINEAR_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("SEGMAP_LINEAR_SEED=%q: %v", s, err)
		}
		seed = n
	}
	start := time.Now()
	c := newCluster(t)
	agents, conns, twinConns := linStart(t, c)

	var total linCounts
	var last time.Duration // how long the last history took
	for i := 0; ; i++ {
		s := seed + uint64(i)
		// The long form stops before a history that would end after
		// the time asked for.
		if soak == 0 && i == linShort || soak > 0 && i > 0 && time.Since(start)+last > soak {
			break
		}
		began := time.Now()
		h := &linHistory{t: t, c: c, agents: agents, conns: conns, index: i, seed: s,
			rng: rand.New(rand.NewPCG(s, 7)), disk: fmt.Sprintf("lin%d", i)}
		h.twin = &linHistory{t: t, c: c, agents: agents, conns: twinConns, index: linTwin + i, seed: s,
			rng: rand.New(rand.NewPCG(s, 8)), disk: fmt.Sprintf("lin%d-twin", i)}
		h.run()
		last = time.Since(began)
		total.add(&h.n)
		total.add(&h.twin.n)
		if t.Failed() {
			break
		}
	}
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
	t.Logf("summary: histories checked %d, operations %d (reads %d of which torn by a concurrent write %d, writes %d of which FUA %d, in whole-segment writes %d, pending %d; flushes %d), "+
		"agent restarts %d, agent partitions %d (fenced %d), blips under the lease %d, agent pauses %d, client cuts %d (severed %d), snapshots %d (snapshot reads %d), "+
		"longest operation %v, not linearizable %d, in %v",
		total.histories, total.reads+total.writes, total.reads, total.torn, total.writes, total.fua, total.segWrites, total.pending, total.flushes,
		total.restarts, total.partitions, total.fences, total.blips, total.pauses, total.cuts, total.severed, total.snapshots, total.snapReads,
		total.maxWait.Round(time.Millisecond), total.illegal, time.Since(start).Round(time.Second))
}

// linStart starts agents host-a and host-b on c, each reaching the
// controller through a proxy, and returns them with the connections of a
// history and of its twin (half through each agent, each through a
// proxy), closed when the test ends.
func linStart(t *testing.T, c *cluster) (agents []*linAgent, conns, twinConns []*linConn) {
	for _, name := range []string{"host-a", "host-b"} {
		if _, errOut, code := runBin(t, "certs", "issue", c.certs, "--role", "agent", "--name", name); code != 0 {
			t.Fatalf("certs issue %s: %s", name, errOut)
		}
		a := &linAgent{c: c, name: name, nbdAddr: c.nbdPort(name).Addr(), ctl: newProxy(t, c.ctlAddr)}
		a.start()
		agents = append(agents, a)
	}
	conns = make([]*linConn, linConns)
	for i := range conns {
		a := agents[i%len(agents)]
		conns[i] = &linConn{id: i, agent: a, link: newProxy(t, a.nbdAddr)}
	}
	// The twin disk of each history has connections of its own.
	twinConns = make([]*linConn, linConns)
	for i := range twinConns {
		a := agents[i%len(agents)]
		twinConns[i] = &linConn{id: linConns + i, agent: a, link: newProxy(t, a.nbdAddr)}
	}
	t.Cleanup(func() {
		for _, cn := range append(conns, twinConns...) {
			cn.close()
		}
	})
	return agents, conns, twinConns
}

// TestLinearizableMirror is one history of TestLinearizable (with no
// twin) on a disk whose only container is a mirror of two replicas, each
// the export of its own storage node, and whose faults are the second
// storage node killed with SIGKILL mid-history (the agents' writes to it
// fail or time out, they report it, the controller marks it failed and
// the mirror goes on with the other replica), then started again (the
// controller finds it back and catches it up while the clients write).
// The history, whose final reads go to either replica, must be
// linearizable, both replicas healthy at the end, and the store clean.
func TestLinearizableMirror(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SEGMAP_LINEAR_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("SEGMAP_LINEAR_SEED=%q: %v", s, err)
		}
		seed = n
	}
	start := time.Now()
	// The nodes' outages are given up on soon, as in
	// TestClusterStorageFails.
	timeout := []string{"--storage-timeout", "3s"}
	c := newClusterOf(t, 0, timeout, timeout)
	var uris []string
	for i := 1; i <= 2; i++ {
		dir := filepath.Join(c.dir, fmt.Sprintf("store%d", i))
		if _, errOut, code := runBin(t, "storage", "create", "--dir", dir, "s", "--size", "256M"); code != 0 {
			t.Fatalf("storage create: %s", errOut)
		}
		uris = append(uris, "nbd://"+c.startStorage(fmt.Sprintf("s%d", i), dir, "--dir", dir)+"/s")
	}
	c.cli("container", "add", "--mirror", strings.Join(uris, ","), "--format", "--slot-size", "1M")
	agents, conns, _ := linStart(t, c)
	h := &linHistory{t: t, c: c, agents: agents, conns: conns, seed: seed,
		rng: rand.New(rand.NewPCG(seed, 7)), disk: "lin-mirror", faults: []string{"kill-replica", "restart-replica"}}
	h.run()
	if st := linReplicas(c); !slices.Equal(st, []string{"healthy", "healthy"}) {
		t.Errorf("replicas at the end: %v, want both healthy", st)
	}
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
	t.Logf("summary: operations %d (reads %d of which torn %d, writes %d, pending %d; flushes %d), replica kills %d, longest operation %v, not linearizable %d, in %v",
		h.n.reads+h.n.writes, h.n.reads, h.n.torn, h.n.writes, h.n.pending, h.n.flushes, h.n.replicaKills, h.n.maxWait.Round(time.Millisecond), h.n.illegal, time.Since(start).Round(time.Second))
}

// linAgent is one agent process, reaching the controller through a proxy
// that can cut it off.
type linAgent struct {
	c       *cluster
	name    string
	nbdAddr string
	ctl     *proxy
	proc    *up
}

func (a *linAgent) start() {
	a.proc = a.c.startAgentVia(a.name, a.ctl.addr())
}

// kill kills the agent with SIGKILL; the race detector must not have
// spoken before.
func (a *linAgent) kill() {
	a.proc.kill()
	if out := a.proc.out.String(); strings.Contains(out, "DATA RACE") {
		a.c.t.Errorf("agent %s reported a data race:\n%s", a.name, out)
	}
}

// linConn is one NBD connection of the test, to one agent through a
// proxy; it is dialled again when it breaks.
type linConn struct {
	id    int
	agent *linAgent
	link  *proxy
	mu    sync.Mutex
	cl    *nbdclient.Client
	wg    sync.WaitGroup // closing clients
}

// get returns the connection's client, dialling until it connects, stop
// is closed (nil) or a minute has passed (an error).
func (cn *linConn) get(stop <-chan struct{}, export string) (*nbdclient.Client, error) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.cl != nil {
		return cn.cl, nil
	}
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cl, err := nbdclient.Dial(ctx, cn.link.addr(), export, nbdclient.ClientConfig{HandshakeTimeout: 5 * time.Second})
		cancel()
		if err == nil {
			cn.cl = cl
			return cl, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no connection to agent %s for a minute: %w", cn.agent.name, err)
		}
		select {
		case <-stop:
			return nil, nil
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (cn *linConn) String() string { return fmt.Sprintf("conn %d via %s", cn.id, cn.agent.name) }

// drop closes cl if it is still the connection's client.
func (cn *linConn) drop(cl *nbdclient.Client) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.cl != cl {
		return
	}
	cn.cl = nil
	cn.wg.Go(func() { cl.Close() })
}

// close closes the client and waits for every close begun.
func (cn *linConn) close() {
	cn.mu.Lock()
	if cn.cl != nil {
		cl := cn.cl
		cn.wg.Go(func() { cl.Close() })
		cn.cl = nil
	}
	cn.mu.Unlock()
	cn.wg.Wait()
}

// linSever cuts every connection through p at once, as a crashed client
// or a reset link would; requests held in the proxy are lost.
func linSever(p *proxy) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// linCounts are what the summary reports.
type linCounts struct {
	histories, reads, writes, fua, pending, flushes         int
	restarts, partitions, cuts, severed, snapshots, illegal int
	snapReads, segWrites, fences, blips, pauses, torn       int
	replicaKills                                            int
	maxWait                                                 time.Duration
}

func (n *linCounts) add(o *linCounts) {
	n.histories += o.histories
	n.reads += o.reads
	n.writes += o.writes
	n.fua += o.fua
	n.pending += o.pending
	n.flushes += o.flushes
	n.restarts += o.restarts
	n.partitions += o.partitions
	n.cuts += o.cuts
	n.severed += o.severed
	n.snapshots += o.snapshots
	n.illegal += o.illegal
	n.snapReads += o.snapReads
	n.segWrites += o.segWrites
	n.fences += o.fences
	n.blips += o.blips
	n.pauses += o.pauses
	n.torn += o.torn
	n.replicaKills += o.replicaKills
	n.maxWait = max(n.maxWait, o.maxWait)
}

// linHistory is one run of clients and faults against a fresh disk.
type linHistory struct {
	t      *testing.T
	c      *cluster
	agents []*linAgent
	conns  []*linConn
	index  int
	seed   uint64
	rng    *rand.Rand // the fault schedule's; workers have their own
	disk   string
	t0     time.Time
	// twin is a second disk of the other policy, written at once by
	// clients of its own through the same agents, under the same faults,
	// and snapshotted at the same time: faults of two families run in
	// the controller at once. It is checked as a history of its own.
	twin *linHistory
	// faults, if set, are the faults of the history, in this order;
	// otherwise one of each kind and a few more, shuffled.
	faults []string

	clients atomic.Int64 // porcupine client ids handed out
	nops    atomic.Int64

	mu    sync.Mutex
	ops   []porcupine.Operation
	n     linCounts
	bad   int // bad reads logged
	snaps []linSnap
}

// linSnap is a snapshot taken during a history, with the times its
// command was called and returned: each of its blocks is a read at some
// point in between.
type linSnap struct {
	name      string
	call, ret int64
}

// linOffset is where register reg lives on the disk.
func linOffset(reg int) uint64 {
	return uint64(reg%linSegs)<<20 + uint64(reg/linSegs)*linBlock
}

func (h *linHistory) now() int64 { return int64(time.Since(h.t0)) }

// event logs a fault with its time in the history.
func (h *linHistory) event(format string, args ...any) {
	h.t.Logf("history %d: %.4fs: %s", h.index, float64(h.now())/1e9, fmt.Sprintf(format, args...))
}

func (h *linHistory) record(op porcupine.Operation) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ops = append(h.ops, op)
	in := op.Input.(linInput)
	switch {
	case !in.write:
		h.n.reads++
	case op.Return == linPending:
		h.n.writes++
		h.n.pending++
	default:
		h.n.writes++
	}
	h.nops.Add(1)
}

// waited notes how long a client operation took that succeeded.
func (h *linHistory) waited(call, ret int64) {
	h.mu.Lock()
	h.n.maxWait = max(h.n.maxWait, time.Duration(ret-call))
	h.mu.Unlock()
}

// badRead logs what a read that is no whole write held (a few times):
// the runs of 16-byte units and, if again is not nil, what the block holds
// when read again at once, which tells a torn read from a torn block.
func (h *linHistory) badRead(who string, reg int, b []byte, again func() []byte) {
	h.mu.Lock()
	h.bad++
	n := h.bad
	h.mu.Unlock()
	if n > 3 {
		return
	}
	msg := fmt.Sprintf("history %d (seed %d): %s read block %d as no whole write of it: %s", h.index, h.seed, who, reg, linRuns(b))
	if again != nil {
		if b2 := again(); b2 != nil {
			msg += "; read again: " + linRuns(b2)
		}
	}
	h.t.Error(msg)
}

// linRuns describes a block as runs of equal 16-byte units:
// "[0,2048) c6#617/b2 [2048,4096) c7#658/b2".
func linRuns(b []byte) string {
	var out strings.Builder
	desc := func(u []byte) string {
		v, tag := binary.LittleEndian.Uint64(u), binary.LittleEndian.Uint64(u[8:])
		return fmt.Sprintf("%s/%x", linDescribe(v), tag)
	}
	start := 0
	for i := 16; i <= len(b); i += 16 {
		if i < len(b) && string(b[i:i+16]) == string(b[start:start+16]) {
			continue
		}
		fmt.Fprintf(&out, "[%d,%d) %s ", start, i, desc(b[start:start+16]))
		start = i
	}
	return strings.TrimSpace(out.String())
}

func (h *linHistory) run() {
	t := h.t
	t.Logf("history %d: seed %d (rerun with SEGMAP_LINEAR_SEED=%d)", h.index, h.seed, h.seed)
	// Both copy-on-write policies, by turns.
	policy := []string{"forward", "reverse"}[h.index%2]
	h.c.cli("disk", "create", h.disk, "--size", fmt.Sprintf("%dM", linSegs), "--policy", policy)
	tw := h.twin
	if tw != nil {
		h.c.cli("disk", "create", tw.disk, "--size", fmt.Sprintf("%dM", linSegs), "--policy", []string{"reverse", "forward"}[h.index%2])
	}
	h.t0 = time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, x := range []*linHistory{h, tw} {
		if x == nil {
			continue
		}
		x.t0 = h.t0
		for i, cn := range x.conns {
			for w := range linWorkers {
				rng := rand.New(rand.NewPCG(x.seed, uint64(x.index<<8|i*linWorkers+w+1)))
				wg.Go(func() { x.worker(cn, rng, stop) })
			}
		}
	}

	// The faults, in a random order, each after a pause: one of each kind
	// at least, more in a long run.
	kinds := []string{"snapshot", "kill", "partition", "blip", "cut", "pause"}
	for range h.rng.IntN(3) {
		kinds = append(kinds, kinds[h.rng.IntN(len(kinds))])
	}
	h.rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	if h.faults != nil {
		kinds = h.faults
	}
	for _, k := range kinds {
		time.Sleep(h.jitter(300*time.Millisecond, 1200*time.Millisecond))
		switch k {
		case "snapshot":
			h.snapshot()
		case "kill":
			h.kill()
		case "partition":
			h.partition(false)
		case "blip":
			h.partition(true)
		case "pause":
			h.pause()
		case "cut":
			h.cut()
		case "kill-replica":
			h.killReplica()
		case "restart-replica":
			h.restartReplica()
		}
	}
	for h.nops.Load() < linMinOps && time.Since(h.t0) < linMaxRun && !t.Failed() {
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	for _, x := range []*linHistory{h, tw} {
		if x == nil {
			continue
		}
		for _, cn := range x.conns {
			cn.close()
		}
		x.finalReads()
		x.n.histories = 1
		x.check()
		// Clean up, which exercises delete.
		for _, s := range x.snaps {
			h.c.cli("disk", "delete", s.name)
		}
		h.c.cli("disk", "delete", x.disk)
	}
}

func (h *linHistory) jitter(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(h.rng.Int64N(int64(hi-lo)))
}

// worker is one client: random reads, writes (some FUA) and flushes of
// the registers through cn until stop is closed. After an operation whose
// outcome is unknown it goes on as a new porcupine client, since that
// operation stays open for ever.
func (h *linHistory) worker(cn *linConn, rng *rand.Rand, stop <-chan struct{}) {
	t := h.t
	client := int(h.clients.Add(1) - 1)
	var seq uint32
	buf := make([]byte, linBlock)
	for {
		select {
		case <-stop:
			return
		default:
		}
		cl, err := cn.get(stop, h.disk)
		if err != nil {
			t.Errorf("history %d (seed %d): %v", h.index, h.seed, err)
			return
		}
		if cl == nil {
			return
		}
		reg := rng.IntN(linRegs)
		off := linOffset(reg)
		// A quarter of the operations give up soon: while an agent is
		// stopped or fenced, its clients go on sending requests (which
		// it must not serve under stale entries when it wakes up).
		timeout := linOpTimeout
		if rng.IntN(4) == 0 {
			timeout = 200*time.Millisecond + time.Duration(rng.Int64N(int64(800*time.Millisecond)))
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		switch p := rng.IntN(100); {
		case p < 3:
			err = h.segmentWrite(ctx, cn, cl, rng, &client, &seq)
		case p < 8:
			err = cl.Flush(ctx)
			if err == nil {
				h.mu.Lock()
				h.n.flushes++
				h.mu.Unlock()
			}
		case p < 52:
			seq++
			v := linValue(client, seq)
			linEncode(buf, h.index, reg, v)
			fua := rng.IntN(5) == 0
			op := porcupine.Operation{ClientId: client, Input: linInput{write: true, reg: reg, value: v}, Metadata: cn.String(), Call: h.now()}
			err = cl.WriteAt(ctx, buf, off, fua)
			op.Return = h.now()
			if err != nil {
				op.Return = linPending
			} else {
				h.waited(op.Call, op.Return)
			}
			h.record(op)
			if fua && err == nil {
				h.mu.Lock()
				h.n.fua++
				h.mu.Unlock()
			}
		default:
			op := porcupine.Operation{ClientId: client, Input: linInput{reg: reg}, Metadata: cn.String(), Call: h.now()}
			err = cl.ReadAt(ctx, buf, off)
			op.Return = h.now()
			if err == nil {
				v := linDecode(buf, h.index, reg)
				if _, ok := v.(linMix); ok {
					h.mu.Lock()
					h.n.torn++
					h.mu.Unlock()
				}
				if v == linBad {
					h.badRead(cn.agent.name, reg, buf, func() []byte {
						b := make([]byte, linBlock)
						if cl.ReadAt(ctx, b, off) != nil {
							return nil
						}
						return b
					})
				}
				op.Output = v
				h.waited(op.Call, op.Return)
				h.record(op) // a failed read took no effect: left out
			}
		}
		cancel()
		if err != nil {
			client = int(h.clients.Add(1) - 1)
			seq = 0
			var re *nbdclient.RemoteError
			if !errors.As(err, &re) && !errors.Is(err, context.DeadlineExceeded) {
				cn.drop(cl)
			}
		}
	}
}

// segmentWrite writes one whole segment at once (which a shared segment
// takes by a staged move, without copying): to the registers it holds,
// one write each, all with the interval of the one request; the blocks
// between them get values of no register.
func (h *linHistory) segmentWrite(ctx context.Context, cn *linConn, cl *nbdclient.Client, rng *rand.Rand, client *int, seq *uint32) error {
	seg := rng.IntN(linSegs)
	*seq++
	v := linValue(*client, *seq)
	buf := make([]byte, 1<<20)
	for b := 0; b < len(buf)/linBlock; b++ {
		linEncode(buf[b*linBlock:(b+1)*linBlock], h.index, 0xffff, v)
	}
	var ops []porcupine.Operation
	for reg := seg; reg < linRegs; reg += linSegs {
		at := linOffset(reg) - uint64(seg)<<20
		linEncode(buf[at:at+linBlock], h.index, reg, v)
		ops = append(ops, porcupine.Operation{ClientId: *client, Input: linInput{write: true, reg: reg, value: v}, Metadata: cn.String() + ", whole segment"})
	}
	call := h.now()
	err := cl.WriteAt(ctx, buf, uint64(seg)<<20, false)
	ret := h.now()
	if err != nil {
		ret = linPending
	} else {
		h.waited(call, ret)
	}
	for _, op := range ops {
		op.Call, op.Return = call, ret
		h.record(op)
	}
	h.mu.Lock()
	h.n.segWrites++
	h.mu.Unlock()
	return err
}

// snapshot takes a snapshot of the disk, recording when its command ran,
// and one of its twin's at the same time.
func (h *linHistory) snapshot() {
	if h.twin != nil {
		var wg sync.WaitGroup
		wg.Go(h.twin.snapshot)
		defer wg.Wait()
	}
	h.mu.Lock()
	name := fmt.Sprintf("%s@s%d", h.disk, h.n.snapshots)
	h.n.snapshots++ // names stay unique even if one fails
	h.mu.Unlock()
	h.event("snapshot %s begins", name)
	call := h.now()
	out, errOut, code := runBin(h.t, "--controller", h.c.ctlAddr, "--certs", h.c.certs, "snapshot", h.disk, "--name", name)
	ret := h.now()
	h.event("snapshot %s ends, exit %d", name, code)
	if code != 0 {
		h.t.Errorf("history %d (seed %d): snapshot %s: exit %d: %s%s", h.index, h.seed, name, code, out, errOut)
		return
	}
	h.mu.Lock()
	h.snaps = append(h.snaps, linSnap{name: name, call: call, ret: ret})
	h.mu.Unlock()
}

// kill kills an agent with SIGKILL and restarts it after a moment.
func (h *linHistory) kill() {
	a := h.agents[h.rng.IntN(len(h.agents))]
	h.event("kill -9 %s", a.name)
	a.kill()
	time.Sleep(h.jitter(0, 1500*time.Millisecond))
	a.start()
	h.event("%s restarted", a.name)
	h.n.restarts++
}

// killReplica kills the last storage node with SIGKILL, and waits until
// the replica it serves is failed: the holders' writes to it fail or
// time out, and they report it.
func (h *linHistory) killReplica() {
	n := len(h.c.storage) - 1
	h.event("kill -9 storage node %d", n+1)
	h.c.storage[n].kill()
	h.n.replicaKills++
	h.awaitReplica(n, "failed")
}

// restartReplica starts the last storage node again, and waits until the
// replica it serves has caught up and is healthy: the controller's
// probes find it back and copy onto it the slots written meanwhile,
// while the clients go on.
func (h *linHistory) restartReplica() {
	n := len(h.c.storage) - 1
	h.c.restartStorage(n)
	h.event("storage node %d restarted", n+1)
	h.awaitReplica(n, "healthy")
}

// awaitReplica waits until replica i of the (one, mirrored) container is
// in state, for 40 s at most.
func (h *linHistory) awaitReplica(i int, state string) {
	deadline := time.Now().Add(40 * time.Second)
	for {
		st := linReplicas(h.c)
		if len(st) > i && st[i] == state {
			h.event("replica %d %s", i+1, state)
			return
		}
		if time.Now().After(deadline) {
			h.t.Errorf("history %d (seed %d): replica %d not %s after 40 s: replicas %v", h.index, h.seed, i+1, state, st)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// linReplicas returns the states of the replicas of c's first container.
func linReplicas(c *cluster) []string {
	var r struct {
		Containers []struct {
			Replicas []struct {
				State string `json:"state"`
			} `json:"replicas"`
		} `json:"containers"`
	}
	c.cliJSON(&r, "container", "list")
	var out []string
	if len(r.Containers) > 0 {
		for _, rp := range r.Containers[0].Replicas {
			out = append(out, rp.State)
		}
	}
	return out
}

// partition cuts an agent from the controller until its lease has lapsed
// and a little more (it must fence itself), or, if blip, for less than its
// lease (the controller's commands to it wait, it goes on); half the
// time with a snapshot taken meanwhile (it must wait for the cut agent's
// answer or its lease; writes through the other agent then copy on write
// while the cut agent still holds the old entries).
func (h *linHistory) partition(blip bool) {
	a := h.agents[h.rng.IntN(len(h.agents))]
	d := linLease + h.jitter(500*time.Millisecond, 2*time.Second)
	if blip {
		d = h.jitter(300*time.Millisecond, linLease-time.Second)
	}
	fences := strings.Count(a.proc.out.String(), "fencing")
	h.event("cut %s from the controller for %v", a.name, d)
	a.ctl.cut.Store(true)
	var snap sync.WaitGroup
	if h.rng.IntN(2) == 0 {
		snap.Go(func() {
			time.Sleep(200 * time.Millisecond)
			h.snapshot()
		})
	}
	time.Sleep(d)
	fenced := strings.Count(a.proc.out.String(), "fencing") > fences
	a.ctl.cut.Store(false)
	h.event("healed %s (fenced: %v)", a.name, fenced)
	snap.Wait()
	if blip {
		h.n.blips++
		return
	}
	h.n.partitions++
	if !fenced {
		h.t.Errorf("history %d (seed %d): agent %s, cut from the controller for %v (lease %v), did not fence itself:\n%s",
			h.index, h.seed, a.name, d, linLease, a.proc.out)
		return
	}
	h.n.fences++
}

// pause stops an agent process (SIGSTOP) for longer than its lease, as a
// stalled VM or a long GC pause would, with a snapshot taken meanwhile,
// and lets it go on (SIGCONT). The controller gives up on it when its
// lease runs out; when it wakes up it must not serve I/O under the entries
// it held before, which the snapshot and the copies on write made stale.
func (h *linHistory) pause() {
	a := h.agents[h.rng.IntN(len(h.agents))]
	p := a.proc.cmd.Process
	h.event("SIGSTOP %s", a.name)
	if err := p.Signal(syscall.SIGSTOP); err != nil {
		h.t.Fatalf("stop agent %s: %v", a.name, err)
	}
	defer p.Signal(syscall.SIGCONT)
	time.Sleep(200 * time.Millisecond)
	h.snapshot()
	time.Sleep(h.jitter(200*time.Millisecond, time.Second))
	p.Signal(syscall.SIGCONT)
	h.event("SIGCONT %s", a.name)
	h.n.pauses++
}

// cut stops the traffic of one client connection for a moment; half the
// time the connection is then severed with requests in flight.
func (h *linHistory) cut() {
	cn := h.conns[h.rng.IntN(len(h.conns))]
	h.event("cut %s", cn)
	cn.link.cut.Store(true)
	time.Sleep(h.jitter(300*time.Millisecond, 1500*time.Millisecond))
	if h.rng.IntN(2) == 0 {
		linSever(cn.link)
		h.n.severed++
		h.event("severed %s", cn)
	}
	cn.link.cut.Store(false)
	h.event("healed %s", cn)
	h.n.cuts++
}

// finalReads reads every register through both agents after the clients
// stopped, and every snapshot's blocks, as reads during its command.
func (h *linHistory) finalReads() {
	t := h.t
	buf := make([]byte, linBlock)
	// Nothing writes now: every block must be one whole write.
	read := func(a *linAgent, export string, each func(reg int, v uint64, call, ret int64)) {
		deadline := time.Now().Add(time.Minute)
		var cl *nbdclient.Client
		for {
			var err error
			cl, err = nbdclient.Dial(context.Background(), a.nbdAddr, export, nbdclient.ClientConfig{HandshakeTimeout: 5 * time.Second})
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("history %d (seed %d): final reads of %s through %s: %v", h.index, h.seed, export, a.name, err)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		defer cl.Close()
		for reg := range linRegs {
			ctx, cancel := context.WithTimeout(context.Background(), linOpTimeout)
			call := h.now()
			err := cl.ReadAt(ctx, buf, linOffset(reg))
			ret := h.now()
			cancel()
			if err != nil {
				t.Errorf("history %d (seed %d): final read of %s block %d through %s: %v", h.index, h.seed, export, reg, a.name, err)
				return
			}
			v, ok := linDecode(buf, h.index, reg).(uint64)
			if !ok || v == linBad {
				h.badRead(a.name+" "+export, reg, buf, nil)
				v = linBad
			}
			each(reg, v, call, ret)
		}
	}
	for _, a := range h.agents {
		client := int(h.clients.Add(1) - 1)
		read(a, h.disk, func(reg int, v uint64, call, ret int64) {
			h.record(porcupine.Operation{ClientId: client, Input: linInput{reg: reg}, Output: v, Metadata: "final read via " + a.name, Call: call, Return: ret})
		})
	}
	for i, s := range h.snaps {
		// One agent's view goes into the history; the other must read
		// the same.
		var got [2][linRegs]uint64
		for j, a := range h.agents {
			read(a, s.name, func(reg int, v uint64, _, _ int64) { got[j][reg] = v })
		}
		if got[0] != got[1] {
			t.Errorf("history %d (seed %d): snapshot %s reads differently through the two agents:\n%v\n%v", h.index, h.seed, s.name, got[0], got[1])
		}
		client := int(h.clients.Add(1) - 1)
		for reg, v := range got[i%2] {
			h.record(porcupine.Operation{ClientId: client, Input: linInput{reg: reg}, Output: v, Metadata: "snapshot " + s.name, Call: s.call, Return: s.ret})
			h.n.snapReads++
		}
		// The snapshot reads are not client reads.
		h.n.reads -= linRegs
	}
}

// check requires the history to be linearizable; if it is not, the
// visualization goes to the test's artifacts.
func (h *linHistory) check() {
	t := h.t
	h.checkTorn()
	t0 := time.Now()
	res, info := porcupine.CheckOperationsVerbose(linModel, h.ops, linCheckTimeout)
	t.Logf("history %d (seed %d): %d operations (%d pending writes, %d torn reads, longest %v), %d snapshots, %d restarts, %d partitions, %d blips, %d pauses, %d cuts: %s in %v",
		h.index, h.seed, len(h.ops), h.n.pending, h.n.torn, h.n.maxWait.Round(time.Millisecond), len(h.snaps), h.n.restarts, h.n.partitions, h.n.blips,
		h.n.pauses, h.n.cuts, res, time.Since(t0).Round(time.Millisecond))
	if res == porcupine.Ok {
		return
	}
	h.n.illegal++
	path := filepath.Join(linArtifacts(t), fmt.Sprintf("history-%d-seed-%d.html", h.index, h.seed))
	if err := porcupine.VisualizePath(linModel, info, path); err != nil {
		t.Errorf("visualize: %v", err)
	}
	t.Errorf("history %d (seed %d) is %s (not shown linearizable); visualization: %s", h.index, h.seed, res, path)
}

// checkTorn requires every read that saw a write half done to have
// overlapped a write of one of the two values it saw: a block that stays
// torn is an error.
func (h *linHistory) checkTorn() {
	type key struct {
		reg int
		v   uint64
	}
	writes := map[key]porcupine.Operation{}
	for _, op := range h.ops {
		if in := op.Input.(linInput); in.write {
			writes[key{in.reg, in.value}] = op
		}
	}
	for _, op := range h.ops {
		m, ok := op.Output.(linMix)
		if !ok {
			continue
		}
		reg := op.Input.(linInput).reg
		overlaps := func(v uint64) bool {
			w, ok := writes[key{reg, v}]
			return ok && w.Call < op.Return && op.Call < w.Return
		}
		if !overlaps(m.a) && !overlaps(m.b) {
			h.t.Errorf("history %d (seed %d): a read of block %d at [%d, %d] saw %s, but no write of either overlapped it: a torn block",
				h.index, h.seed, reg, op.Call, op.Return, linOf(m))
		}
	}
}

// linArtifacts is where a failed history's visualization goes: the test's
// artifacts directory under -artifacts, otherwise a directory that
// outlives the test.
func linArtifacts(t *testing.T) string {
	if f := flag.Lookup("test.artifacts"); f != nil && f.Value.String() == "true" {
		return t.ArtifactDir()
	}
	dir, err := os.MkdirTemp("", "segmap-linear-")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}
