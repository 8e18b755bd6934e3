package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/heldport"
)

// Kill storms, ztest style (issue 7, item 4). A controller and two agents
// run as real processes over a file container and a storage node's export;
// a loop kill -9s the controller (TestKillStormController) or the agents,
// alternating (TestKillStormAgent), every 1-5 s and restarts them, and
// after every third kill the storage node too (issue 15: a pause, never an
// error); the controller storm's third kill cuts a drain of the file
// container, which the restarted controller resumes. Meanwhile a driver runs
// a seeded random mix of snapshot / clone / delete / resize operations,
// known-pattern writes (qemu-io + flush) and online checks through the
// CLI, and fio (nbd engine, crc32c verify with a backlog, verify failures
// fatal) writes through both agents to two regions of one disk.
//
// The driver keeps a model of every disk: name, size, mode, origin, and
// what its bytes are where that is known (a pattern over the first 4 MiB,
// zeros from some offset on, or the hash read right after a snapshot was
// taken). An operation whose CLI call fails (the kill cut its connection)
// is resolved by reading the state back ('disk list --json'): found
// applied, it must be applied whole (right size, mode, origin); not found,
// it is retried; "not found" or "already exists" with no controller kill
// during the call means the store lost or invented a disk. A fio round,
// pattern write or read may fail only if its agent was killed meanwhile;
// after an agent's restart, every chunk its earlier rounds flushed must
// verify. Afterwards the disks the controller lists are exactly the
// model's, every known byte reads back through either agent, fio's last
// flushed rounds verify through the other agent, and 'segmap check' is
// clean; then the controller is killed once more (not counted) and, after
// its restart, the list and check are the same again.
//
// Short form (make test): one storm of each kind, until at least
// stormShortOps snapshot / clone / delete / resize operations and
// stormShortKills kills, or stormShortCap. Long form: with
// SEGMAP_SOAK=DURATION each test runs storms of stormSoakOps such
// operations with fresh seeds until half the duration has passed (the two
// tests share it). SEGMAP_KILLSTORM_SEED=N reruns a storm with seed N.

const (
	stormShortOps   = 50
	stormShortKills = 8
	stormShortCap   = 30 * time.Second // a short storm stops here whatever its counts
	stormSoakOps    = 1000

	stormHead   = 4 << 20  // the pattern-written head of a disk
	stormRegion = 16 << 20 // each agent's fio region of "live"
	stormGrowTo = 96 << 20 // resize grows a disk no larger than this
	stormExtras = 10       // snapshots and clones kept at most
)

// stormKind is what a storm kills.
type stormKind int

const (
	killController stormKind = iota
	killAgents
)

func (k stormKind) String() string {
	if k == killController {
		return "controller"
	}
	return "agents"
}

// stormDisk is the model of one disk.
type stormDisk struct {
	size     uint64
	readOnly bool
	origin   string // the source it was made from; "" for the base disks
	base     bool   // live, p, r: never deleted
	fio      bool   // live: written by fio, never pattern-written
	head     int    // the byte pattern of [0, stormHead); -1 unknown
	zeroFrom uint64 // [zeroFrom, size) reads as zeros
	sum      string // a snapshot's hash read when it was taken; "" none
}

// stormStats are a storm's counts.
type stormStats struct {
	ops, acked, unackedApplied, retries int
	resent                              int // applied, but the CLI's resend reported "not found" / "already exists"
	byKind                              map[string]int
	kills                               int
	storageKills                        int // kill -9 and restart of the storage node
	drains, drainsResumed               int // drains started, and resumed by a restarted controller
	maxRestart                          time.Duration
	maxOp                               time.Duration
	maxOpKind                           string
	maxIO                               time.Duration
	fioRounds, fioCut, fioVerifies      int
	writes, writeRetries                int
	contentChecks, hashed, checks       int
}

func (a *stormStats) add(b stormStats) {
	a.ops += b.ops
	a.acked += b.acked
	a.unackedApplied += b.unackedApplied
	a.retries += b.retries
	a.resent += b.resent
	a.kills += b.kills
	a.storageKills += b.storageKills
	a.drains += b.drains
	a.drainsResumed += b.drainsResumed
	a.fioRounds += b.fioRounds
	a.fioCut += b.fioCut
	a.fioVerifies += b.fioVerifies
	a.writes += b.writes
	a.writeRetries += b.writeRetries
	a.contentChecks += b.contentChecks
	a.hashed += b.hashed
	a.checks += b.checks
	a.maxRestart = max(a.maxRestart, b.maxRestart)
	a.maxIO = max(a.maxIO, b.maxIO)
	if b.maxOp > a.maxOp {
		a.maxOp, a.maxOpKind = b.maxOp, b.maxOpKind
	}
	if a.byKind == nil {
		a.byKind = map[string]int{}
	}
	for k, n := range b.byKind {
		a.byKind[k] += n
	}
}

func (a *stormStats) String() string {
	var kinds []string
	for k, n := range a.byKind {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(kinds)
	return fmt.Sprintf("kills survived %d (and storage node kills %d), drains %d (resumed after a controller kill %d), operations %d (acknowledged %d, applied unacknowledged %d of which reported failed by the CLI's resend %d, retries %d; %s), "+
		"pattern writes %d (retried %d), fio rounds %d (cut by a kill %d), fio verifies %d, content checks %d, snapshots hashed %d, online checks %d, "+
		"longest CLI operation %v (%s), longest fio I/O %v, longest restart %v",
		a.kills, a.storageKills, a.drains, a.drainsResumed, a.ops, a.acked, a.unackedApplied, a.resent, a.retries, strings.Join(kinds, ", "),
		a.writes, a.writeRetries, a.fioRounds, a.fioCut, a.fioVerifies, a.contentChecks, a.hashed, a.checks,
		a.maxOp.Round(time.Millisecond), a.maxOpKind, a.maxIO.Round(time.Millisecond), a.maxRestart.Round(time.Millisecond))
}

// TestKillStormController: kill -9 of the controller every 1-5 s during
// snapshot / clone / delete / resize operations and fio through two
// agents.
func TestKillStormController(t *testing.T) { runStorms(t, killController) }

// TestKillStormAgent: kill -9 of the two agents, alternating, every 1-5 s
// during the same operations, with fio in rounds that verify after each
// restart what the earlier rounds flushed.
func TestKillStormAgent(t *testing.T) { runStorms(t, killAgents) }

// runStorms runs one storm (short form) or storms with fresh seeds until
// half of SEGMAP_SOAK has passed, and logs the summary.
func runStorms(t *testing.T, kind stormKind) {
	requireTools(t, "fio", "qemu-io", "nbdcopy")
	soak := soakDuration(t)
	var seed uint64
	if v := os.Getenv("SEGMAP_KILLSTORM_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("SEGMAP_KILLSTORM_SEED=%q: want a number", v)
		}
		seed = n
	} else {
		seed = uint64(time.Now().UnixNano())
	}
	t0 := time.Now()
	end := t0.Add(soak / 2)
	var total stormStats
	storms := 0
	for {
		minOps, minKills, until := stormShortOps, stormShortKills, time.Time{}
		if soak > 0 {
			minOps, until = stormSoakOps, end
		}
		var st stormStats
		ok := t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("kill storm (%s), seed %d: rerun with SEGMAP_KILLSTORM_SEED=%d go test -race -run 'TestKillStorm%s' ./internal/e2e",
				kind, seed, seed, map[stormKind]string{killController: "Controller", killAgents: "Agent"}[kind])
			st = runStorm(t, kind, seed, minOps, minKills, until)
		})
		total.add(st)
		storms++
		if !ok || soak == 0 || time.Until(end) < time.Minute {
			break
		}
		seed = rand.Uint64()
	}
	t.Logf("summary: kill storm (%s): storms %d in %v; %s", kind, storms, time.Since(t0).Round(time.Second), &total)
}

// storm is one storm's cluster, model and counts.
type storm struct {
	t     *testing.T
	kind  stormKind
	c     *cluster
	names []string // agent names

	ctx    context.Context // cancelled when the test gives up: kills the tools
	cancel context.CancelFunc
	broken atomic.Bool // a hard failure: everything stops
	// ctlGen counts controller kills and restarts, agentGen each
	// agent's: odd while the process is down. A failure is excused only
	// by a kill during it.
	ctlGen   atomic.Int64
	agentGen [2]atomic.Int64

	mu    sync.Mutex
	disks map[string]*stormDisk
	st    stormStats
	errs  map[string]int // distinct CLI failures
}

// agentKilled reports whether agent i was killed or down at any time
// since its generation was g0.
func (s *storm) agentKilled(i int, g0 int64) bool {
	return s.agentGen[i].Load() != g0 || g0%2 == 1
}

// failf records a failure that ends the storm. Only the first is an
// error: what fails after it is mostly its echo.
func (s *storm) failf(format string, args ...any) {
	s.t.Helper()
	if s.broken.Swap(true) {
		s.t.Logf("after the first failure: "+format, args...)
		return
	}
	s.t.Errorf(format, args...)
}

// newStormCluster starts a plaintext controller (lease 3s) with two
// containers, a file (container 1) and an export of a storage node
// (container 2, nbd://), and two agents.
func newStormCluster(t *testing.T) *cluster {
	c := newBareCluster(t)
	c.startController()
	c.cli("container", "add", filepath.Join(c.dir, "c1"), "--size", "768M", "--slot-size", "1M")
	dir := filepath.Join(c.dir, "store")
	if _, errOut, code := runBin(t, "storage", "create", "--dir", dir, "s", "--size", "1G"); code != 0 {
		t.Fatalf("storage create: %s", errOut)
	}
	// The container's URI names this address: it stays the storage
	// node's across its restarts.
	p := heldport.New(t)
	sargs := []string{"storage", "--listen", fdArg(0), "--dir", dir, "--insecure"}
	c.storage = append(c.storage, startHeld(t, dir, []*heldport.Port{p}, sargs...))
	c.storageArgs = append(c.storageArgs, sargs)
	c.storagePorts = append(c.storagePorts, p)
	c.cli("container", "add", "nbd://"+p.Addr()+"/s", "--format", "--slot-size", "1M")
	c.startAgent("host-a")
	c.startAgent("host-b")
	return c
}

// stormDrained is the container a controller storm drains and removes.
const stormDrained = 1

// containers returns the containers the controller lists, by id.
func (s *storm) containers() (map[uint32]string, map[uint32]string, error) {
	out, errOut, code := s.cli("container", "list", "--json")
	if code != 0 {
		return nil, nil, fmt.Errorf("container list: exit %d: %s", code, errOut)
	}
	var l containerList
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		return nil, nil, fmt.Errorf("container list --json: %v\n%s", err, out)
	}
	state, used := map[uint32]string{}, map[uint32]string{}
	for _, ct := range l.Containers {
		state[ct.ID], used[ct.ID] = ct.State, ct.UsedSlots
	}
	return state, used, nil
}

// killStorage kill -9s the storage node, keeps it down for up to 1.5 s
// and starts it again on its address: well within the failure timeout,
// so hosts see a pause, never an error. It may land right after a
// controller or agent restart: a process opening the registered container
// for the first time while the node is down waits for it too.
func (s *storm) killStorage(rng *rand.Rand) {
	s.c.storage[0].kill()
	s.scanOutput(s.c.storage[0])
	time.Sleep(time.Duration(rng.Int64N(int64(1500 * time.Millisecond))))
	s.c.restartStorage(0)
	s.mu.Lock()
	s.st.storageKills++
	s.mu.Unlock()
}

// drainKill starts 'container drain' of container stormDrained and kills
// the controller as soon as it is under way, down for longer than the CLI waits, then
// restarts it; in the background it waits for the restarted controller
// to finish the drain by itself (or a later one, if another kill
// interrupts it again), requires the container to end draining with no
// slot used, and removes it.
func (s *storm) drainKill(rng *rand.Rand, wg *sync.WaitGroup) {
	c := s.c
	drained := make(chan string, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		out, errOut, code := s.cli("container", "drain", strconv.Itoa(stormDrained), "--no-progress")
		drained <- fmt.Sprintf("exit %d: %s%s", code, out, errOut)
	}()
	s.mu.Lock()
	s.st.drains++
	s.mu.Unlock()
	// Kill once the drain has begun (the container is draining) and
	// has not ended (it still holds slots).
	for t0 := time.Now(); time.Since(t0) < 10*time.Second; {
		state, used, err := s.containers()
		if err == nil && state[stormDrained] == "draining" {
			if used[stormDrained] == "0" {
				s.t.Logf("the drain ended before the kill")
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.ctlGen.Add(1)
	c.ctl.kill()
	s.scanOutput(c.ctl)
	time.Sleep(2200*time.Millisecond + time.Duration(rng.Int64N(int64(time.Second))))
	c.startController()
	restarted := c.ctl
	s.ctlGen.Add(1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		cliRes := <-drained
		deadline := time.Now().Add(2 * time.Minute)
		for {
			if s.broken.Load() {
				return
			}
			state, used, err := s.containers()
			if err == nil && used[stormDrained] == "0" {
				if state[stormDrained] != "draining" {
					s.failf("drained container %d is %q, want draining", stormDrained, state[stormDrained])
					return
				}
				break
			}
			if time.Now().After(deadline) {
				s.failf("container %d not drained 2m after the controller was killed mid-drain (%v, slots used %q; the drain call: %s)", stormDrained, err, used[stormDrained], cliRes)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
		resumed := strings.Contains(restarted.out.String(), "resuming the drain")
		if !resumed && !strings.HasPrefix(cliRes, "exit 0") {
			s.failf("the drain cut by a controller kill (%s) was not resumed by the restarted controller", strings.TrimSpace(cliRes))
			return
		}
		s.mu.Lock()
		if resumed {
			s.st.drainsResumed++
		}
		s.mu.Unlock()
		s.t.Logf("container %d drained; resumed by the restarted controller: %v; the drain call: %s", stormDrained, resumed, strings.TrimSpace(cliRes))
		for !s.broken.Load() {
			state, _, err := s.containers()
			if err == nil && state[stormDrained] == "" {
				return
			}
			if time.Now().After(deadline) {
				s.failf("container %d not removed: %v", stormDrained, err)
				return
			}
			if _, errOut, code := s.cli("container", "remove", strconv.Itoa(stormDrained)); code != 0 {
				s.noteErr(errOut)
				time.Sleep(200 * time.Millisecond)
			}
		}
	}()
}

// runStorm runs one storm until it has made minOps snapshot / clone /
// delete / resize operations and minKills kills, or until the time until
// (zero: stormShortCap from its start), then verifies the cluster.
func runStorm(t *testing.T, kind stormKind, seed uint64, minOps, minKills int, until time.Time) stormStats {
	s := &storm{t: t, kind: kind, c: newStormCluster(t), names: []string{"host-a", "host-b"},
		disks: map[string]*stormDisk{}, errs: map[string]int{}}
	s.st.byKind = map[string]int{}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	defer s.cancel()
	c := s.c
	c.cli("disk", "create", "live", "--size", "32M")
	c.cli("disk", "create", "p", "--size", "8M")
	c.cli("disk", "create", "r", "--size", "8M", "--policy", "reverse")
	s.disks["live"] = &stormDisk{size: 32 << 20, base: true, fio: true, head: -1, zeroFrom: 32 << 20}
	s.disks["p"] = &stormDisk{size: 8 << 20, base: true, head: 0, zeroFrom: stormHead}
	s.disks["r"] = &stormDisk{size: 8 << 20, base: true, head: 0, zeroFrom: stormHead}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	stopped := false
	halt := func() {
		if !stopped {
			stopped = true
			close(stop)
		}
		if t.Failed() {
			s.cancel() // do not wait for tools stuck on a broken cluster
		}
		wg.Wait()
	}
	defer halt()

	// fio through both agents, to two regions of one disk.
	last := make([][]int64, 2) // per agent: the seed of each chunk's last flushed round, -1 unknown
	for i := range s.names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// fio takes a seed below 2^63.
			last[i] = s.fioLoop(i, uint64(i)*stormRegion, seed>>2+uint64(i)*1_000_003, stop)
		}()
	}
	// The operations driver.
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(seed, 1))
		for !s.broken.Load() {
			select {
			case <-stop:
				return
			default:
			}
			s.step(rng)
		}
	}()

	// The killer, here: starting processes may fail the test.
	rng := rand.New(rand.NewPCG(seed, 2))
	t0 := time.Now()
	if until.IsZero() {
		until = t0.Add(stormShortCap)
	}
	next := t0 // the last kill
	for i := 0; !s.broken.Load(); i++ {
		s.mu.Lock()
		ops := s.st.byKind["snapshot"] + s.st.byKind["clone"] + s.st.byKind["delete"] + s.st.byKind["resize"]
		kills := s.st.kills
		s.mu.Unlock()
		if ops >= minOps && kills >= minKills || time.Now().After(until) {
			break
		}
		// Kills 1-5 s apart, restart included (but at least 300 ms
		// after a restart).
		next = next.Add(time.Second + time.Duration(rng.Int64N(int64(4*time.Second))))
		if soon := time.Now().Add(300 * time.Millisecond); next.Before(soon) {
			next = soon
		}
		for time.Now().Before(next) && !s.broken.Load() {
			time.Sleep(50 * time.Millisecond)
		}
		if s.broken.Load() {
			break
		}
		if kind == killController && i == 2 {
			// The third kill lands in a drain, once there is data
			// to move.
			s.drainKill(rng, &wg)
			s.mu.Lock()
			s.st.kills++
			s.mu.Unlock()
			continue
		}
		var victim *up
		if kind == killController {
			victim = c.ctl
		} else {
			victim = c.agents[s.names[i%2]]
		}
		gen := &s.ctlGen
		if kind == killAgents {
			gen = &s.agentGen[i%2]
		}
		gen.Add(1)
		victim.kill()
		s.scanOutput(victim)
		if kind == killAgents {
			// Sometimes the controller notices before the agent is back.
			time.Sleep(time.Duration(rng.Int64N(int64(1500 * time.Millisecond))))
		} else if rng.IntN(4) == 0 {
			// Down for longer than the CLI waits for a controller
			// (2 s): the calls in flight fail, their outcome unknown.
			time.Sleep(2200*time.Millisecond + time.Duration(rng.Int64N(int64(time.Second))))
		}
		r0 := time.Now()
		if kind == killController {
			c.startController()
		} else {
			c.startAgent(s.names[i%2])
		}
		gen.Add(1)
		s.mu.Lock()
		s.st.kills++
		s.st.maxRestart = max(s.st.maxRestart, time.Since(r0))
		s.mu.Unlock()
		if i%3 == 1 {
			if s.broken.Load() {
				break
			}
			s.killStorage(rng)
		}
	}
	storm := time.Since(t0)
	halt()
	if t.Failed() {
		return s.st
	}
	s.mu.Lock()
	var errs []string
	for e, n := range s.errs {
		errs = append(errs, fmt.Sprintf("%dx %s", n, e))
	}
	s.mu.Unlock()
	sort.Strings(errs)
	if len(errs) == 0 {
		errs = []string{"none"}
	}
	t.Logf("storm of %v: CLI failures seen during the kills:\n  %s", storm.Round(time.Millisecond), strings.Join(errs, "\n  "))
	s.verify(rng, last)
	t.Logf("storm done: %s", &s.st)
	return s.st
}

// scanOutput fails the test if a killed process had reported a data race
// or a panic before the kill.
func (s *storm) scanOutput(u *up) {
	out := u.out.String()
	for _, bad := range []string{"DATA RACE", "panic:"} {
		if strings.Contains(out, bad) {
			s.failf("segmap %s reported %q before it was killed:\n%s", u.cmd.Args[1], bad, out)
		}
	}
}

// cliEnv is the CLI's environment: the race detector's default one-second
// sleep at exit (atexit_sleep_ms) would double the time of every command.
var cliEnv = append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))

// cli runs a segmap admin command, bounded, without failing the test.
func (s *storm) cli(args ...string) (string, string, int) {
	ctx, cancel := context.WithTimeout(s.ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--controller", s.c.ctlAddr, "--timeout", "90s"}, args...)...)
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = cliEnv
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		return "", err.Error(), -1
	}
	return out.String(), errOut.String(), code
}

// list returns the disks the controller lists, asking until it answers
// (it may be restarting) or until deadline.
func (s *storm) list(deadline time.Time) (map[string]diskInfo, error) {
	for {
		out, errOut, code := s.cli("disk", "list", "--json")
		if code == 0 {
			var l struct {
				Disks []diskInfo `json:"disks"`
			}
			if err := json.Unmarshal([]byte(out), &l); err != nil {
				return nil, fmt.Errorf("disk list --json: %v\n%s", err, out)
			}
			m := map[string]diskInfo{}
			for _, d := range l.Disks {
				m[d.Name] = d
			}
			return m, nil
		}
		if code == 2 || time.Now().After(deadline) || s.ctx.Err() != nil {
			return nil, fmt.Errorf("disk list: exit %d: %s", code, errOut)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stormOp is one admin operation of the driver.
type stormOp struct {
	kind    string // snapshot, clone, delete, resize, check
	name    string // the disk made, deleted or resized
	src     string // snapshot, clone: the source
	size    uint64 // snapshot, clone: the source's size; resize: the new size
	oldSize uint64 // resize: the size before
}

func (op stormOp) args() []string {
	switch op.kind {
	case "snapshot":
		return []string{"snapshot", op.src, "--name", op.name}
	case "clone":
		return []string{"snapshot", op.src, "--name", op.name, "--writable"}
	case "delete":
		return []string{"disk", "delete", op.name}
	case "resize":
		return []string{"disk", "resize", op.name, "--size", strconv.FormatUint(op.size, 10)}
	case "check":
		return []string{"check"}
	}
	panic("unknown operation " + op.kind)
}

// step runs one random operation.
func (s *storm) step(rng *rand.Rand) {
	s.mu.Lock()
	var snaps, extras, writable, patternable, growable []string
	for n, d := range s.disks {
		if !d.base {
			extras = append(extras, n)
		}
		if d.readOnly {
			snaps = append(snaps, n)
			continue
		}
		writable = append(writable, n)
		if !d.fio {
			patternable = append(patternable, n)
		}
		if d.size < stormGrowTo {
			growable = append(growable, n)
		}
	}
	for _, l := range [][]string{snaps, extras, writable, patternable, growable} {
		sort.Strings(l)
	}
	s.st.ops++
	id := s.st.ops
	s.mu.Unlock()
	pick := func(l []string) string { return l[rng.IntN(len(l))] }
	r := rng.IntN(100)
	switch {
	case len(extras) >= stormExtras || len(extras) > 3 && r < 20:
		s.run(stormOp{kind: "delete", name: pick(extras)})
	case r < 42:
		s.snapshot(rng, "snapshot", pick(writable), fmt.Sprintf("s%d", id))
	case r < 58 && len(snaps) > 0:
		s.snapshot(rng, "clone", pick(snaps), fmt.Sprintf("k%d", id))
	case r < 72 && len(growable) > 0:
		n := pick(growable)
		s.mu.Lock()
		old := s.disks[n].size
		s.mu.Unlock()
		s.run(stormOp{kind: "resize", name: n, oldSize: old, size: min(old+uint64(1+rng.IntN(4))<<20, stormGrowTo)})
	case r < 95:
		s.write(rng, pick(patternable))
	default:
		s.run(stormOp{kind: "check"})
	}
}

// snapshot makes a snapshot or clone, and hashes some of the snapshots of
// the fio disk as they are taken, to compare at the end.
func (s *storm) snapshot(rng *rand.Rand, kind, src, name string) {
	s.mu.Lock()
	size := s.disks[src].size
	hashIt := kind == "snapshot" && s.disks[src].fio && rng.IntN(3) == 0
	s.mu.Unlock()
	if !s.run(stormOp{kind: kind, name: name, src: src, size: size}) || !hashIt {
		return
	}
	ai := rng.IntN(2)
	g0 := s.agentGen[ai].Load()
	sum, err := s.hash(name, s.names[ai])
	if err != nil {
		if !s.agentKilled(ai, g0) {
			s.failf("read snapshot %s through %s (not killed meanwhile): %v", name, s.names[ai], err)
		}
		return
	}
	s.mu.Lock()
	if d := s.disks[name]; d != nil {
		d.sum = sum
	}
	s.st.hashed++
	s.mu.Unlock()
}

// hash reads a disk whole through agent and returns its SHA-256.
func (s *storm) hash(name, agent string) (string, error) {
	ctx, cancel := context.WithTimeout(s.ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nbdcopy", s.c.uri(agent, name), "-")
	cmd.WaitDelay = 5 * time.Second
	h := newHash()
	var errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = h, &errOut
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("nbdcopy %s: %v: %s", name, err, errOut.String())
	}
	return fmt.Sprintf("%x", h.Sum(nil)), nil
}

// run runs an admin operation until it is acknowledged or found applied,
// and updates the model. It returns whether the operation happened.
func (s *storm) run(op stormOp) bool {
	t0 := time.Now()
	deadline := t0.Add(3 * time.Minute)
	for attempt := 0; !s.broken.Load(); attempt++ {
		g0 := s.ctlGen.Load()
		out, errOut, code := s.cli(op.args()...)
		if s.broken.Load() {
			return false // the storm is over; nothing here is news
		}
		if code == 0 {
			s.done(op, t0, true)
			return true
		}
		if op.kind == "check" && code == 3 {
			s.failf("online check during the storm: exit %d\n%s%s", code, out, errOut)
			return false
		}
		if code == 2 || code == -1 {
			s.failf("segmap %v: exit %d: %s%s", op.args(), code, out, errOut)
			return false
		}
		s.noteErr(errOut)
		// "Not found" or "already exists" for a disk the model has (or
		// has not) is the CLI's own resend after a kill cut the first
		// call (internal/ha.Conn sends a call cut off by a dying leader
		// again) -- or the store lost or invented a disk. Without a
		// controller kill during the call, it can only be the latter.
		g1 := s.ctlGen.Load()
		overlapped := g0 != g1 || g0%2 == 1
		echo := strings.Contains(errOut, "not found") || strings.Contains(errOut, "already exists")
		if echo && !overlapped {
			s.failf("segmap %v: %s with no controller kill during the call: the store and the model disagree", op.args(), strings.TrimSpace(errOut))
			return false
		}
		applied, err := s.applied(op, deadline)
		if err != nil {
			s.failf("%s %s: after a failed attempt (%s): %v", op.kind, op.name, strings.TrimSpace(errOut), err)
			return false
		}
		if applied {
			if echo {
				s.mu.Lock()
				s.st.resent++
				s.mu.Unlock()
			}
			s.done(op, t0, false)
			return true
		}
		if time.Now().After(deadline) {
			s.failf("%s %s: not done after %v of retries: %s", op.kind, op.name, time.Since(t0), errOut)
			return false
		}
		s.mu.Lock()
		s.st.retries++
		s.mu.Unlock()
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// noteErr counts a CLI failure by its message, numbers taken out.
func (s *storm) noteErr(errOut string) {
	msg := strings.TrimSpace(errOut)
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	msg = regexp.MustCompile(`[0-9]+`).ReplaceAllString(msg, "N")
	if len(msg) > 160 {
		msg = msg[:160] + "..."
	}
	s.mu.Lock()
	s.errs[msg]++
	s.mu.Unlock()
}

// applied reads the state back after a failed attempt: whether op took
// effect, and an error if it took effect only in part.
func (s *storm) applied(op stormOp, deadline time.Time) (bool, error) {
	if op.kind == "check" {
		return false, nil
	}
	l, err := s.list(deadline)
	if err != nil {
		return false, err
	}
	d, ok := l[op.name]
	switch op.kind {
	case "snapshot", "clone":
		if !ok {
			return false, nil
		}
		if got := mustUintE(d.Size); got != op.size || d.ReadOnly != (op.kind == "snapshot") || d.Origin != op.src {
			return true, fmt.Errorf("made in part: %+v, want size %d, read-only %v, origin %s", d, op.size, op.kind == "snapshot", op.src)
		}
		return true, nil
	case "delete":
		return !ok, nil
	case "resize":
		if !ok {
			return false, fmt.Errorf("the disk is gone")
		}
		switch mustUintE(d.Size) {
		case op.size:
			return true, nil
		case op.oldSize:
			return false, nil
		}
		return false, fmt.Errorf("size %s, neither the old %d nor the new %d", d.Size, op.oldSize, op.size)
	}
	return false, fmt.Errorf("unknown operation %s", op.kind)
}

func mustUintE(s string) uint64 {
	n, _ := strconv.ParseUint(s, 10, 64)
	return n
}

// done applies an operation that happened to the model.
func (s *storm) done(op stormOp, t0 time.Time, acked bool) {
	took := time.Since(t0)
	s.mu.Lock()
	defer s.mu.Unlock()
	if acked {
		s.st.acked++
	} else {
		s.st.unackedApplied++
	}
	s.st.byKind[op.kind]++
	if took > s.st.maxOp {
		s.st.maxOp, s.st.maxOpKind = took, op.kind
	}
	switch op.kind {
	case "snapshot", "clone":
		src := *s.disks[op.src]
		s.disks[op.name] = &stormDisk{size: op.size, readOnly: op.kind == "snapshot", origin: op.src,
			fio: false, head: src.head, zeroFrom: src.zeroFrom}
	case "delete":
		delete(s.disks, op.name)
	case "resize":
		s.disks[op.name].size = op.size
	case "check":
		s.st.checks++
	}
}

// write writes a fresh pattern over a disk's head through one agent, and
// flushes; an attempt that fails leaves the head unknown until one
// succeeds. Half of each write covers whole segments and half only part of
// one, so both the staged move and the copy-on-write copy run.
func (s *storm) write(rng *rand.Rand, name string) {
	k := 1 + rng.IntN(255)
	s.mu.Lock()
	s.disks[name].head = -1
	s.st.byKind["write"]++
	s.mu.Unlock()
	deadline := time.Now().Add(2 * time.Minute)
	agent := rng.IntN(2)
	for attempt := 0; ; attempt++ {
		g0 := s.agentGen[agent].Load()
		out, err := runCtx(s.ctx, time.Minute, "qemu-io", "-f", "raw", s.c.uri(s.names[agent], name),
			"-c", fmt.Sprintf("write -P %d 0 1536k", k), "-c", fmt.Sprintf("write -P %d 1536k 2560k", k), "-c", "flush")
		if err == nil && !qemuFailed(out) {
			s.mu.Lock()
			s.disks[name].head = k
			s.st.writes++
			s.mu.Unlock()
			return
		}
		if !s.agentKilled(agent, g0) || s.broken.Load() || time.Now().After(deadline) {
			// An agent that lives on serves its I/O through
			// controller restarts and the other agent's death.
			s.failf("pattern write to %s through %s (attempt %d): %v\n%s", name, s.names[agent], attempt+1, err, out)
			return
		}
		s.mu.Lock()
		s.st.writeRetries++
		s.mu.Unlock()
		agent = 1 - agent // this one may be dead for a while
		time.Sleep(200 * time.Millisecond)
	}
}

// qemuFailed reports whether qemu-io's output says a command failed (its
// exit status does not always).
func qemuFailed(out string) bool {
	return strings.Contains(out, "failed") || strings.Contains(out, "error") || strings.Contains(out, "Error")
}

// runCtx is runErr under ctx as well.
func runCtx(ctx context.Context, timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = scratch
	cmd.WaitDelay = 5 * time.Second
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%v (%v)", err, ctx.Err())
	}
	return b.String(), err
}

// fioResult is what one fio run did.
type fioResult struct {
	out    string // stderr and the JSON report
	err    error  // the run failed (exit status, or an I/O or verify error)
	verify bool   // the failure is a verify mismatch, not a lost connection
	maxLat time.Duration
}

// verifyMismatch matches fio's messages for data that does not verify.
var verifyMismatch = regexp.MustCompile(`verify failed|bad magic header|bad header|verify type mismatch|bad pattern`)

// fio runs one round on [off, off+size) of disk through agent: random 8k
// writes with crc32c verification (a backlog verified as it goes, the
// rest at the end, a mismatch fatal) and a flush at the end; or, with
// verifyOnly, only the verification of such a round.
func (s *storm) fio(agent, disk string, off, size, seed uint64, verifyOnly bool) fioResult {
	args := []string{"--ioengine=nbd", "--uri=" + s.c.uri(agent, disk), "--name=ks", "--rw=randwrite", "--bs=8k",
		"--iodepth=8", "--offset=" + strconv.FormatUint(off, 10), "--size=" + strconv.FormatUint(size, 10),
		"--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1", "--randseed=" + strconv.FormatUint(seed, 10),
		"--end_fsync=1", "--output-format=json", "--thread"}
	if verifyOnly {
		args = append(args, "--verify_only=1")
	}
	ctx, cancel := context.WithTimeout(s.ctx, 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "fio", args...)
	cmd.Dir = scratch
	cmd.WaitDelay = 5 * time.Second
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	res := fioResult{out: errOut.String() + out.String(), err: err}
	res.verify = verifyMismatch.MatchString(res.out)
	var rep struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				Lat struct {
					Max float64 `json:"max"`
				} `json:"lat_ns"`
			} `json:"read"`
			Write struct {
				Lat struct {
					Max float64 `json:"max"`
				} `json:"lat_ns"`
			} `json:"write"`
		} `json:"jobs"`
	}
	js := out.Bytes()
	if i := bytes.IndexByte(js, '{'); i >= 0 {
		js = js[i:]
	}
	if jerr := json.Unmarshal(js, &rep); jerr != nil || len(rep.Jobs) != 1 {
		if res.err == nil {
			res.err = fmt.Errorf("no fio report: %v", jerr)
		}
		return res
	}
	j := rep.Jobs[0]
	if j.Error != 0 && res.err == nil {
		res.err = fmt.Errorf("fio job error %d", j.Error)
	}
	res.maxLat = time.Duration(max(j.Read.Lat.Max, j.Write.Lat.Max))
	return res
}

// fioLoop writes rounds through agent ai to its region of "live" until
// stop, and returns the seed of each chunk's last flushed round (-1:
// unknown). In a controller storm a round covers the whole region and must
// never fail. In an agent storm a round covers one quarter of the region;
// only a kill of its agent may cut it (its chunk becomes unknown), and
// once the agent is back every chunk an earlier round flushed must verify.
func (s *storm) fioLoop(ai int, base, seed uint64, stop <-chan struct{}) []int64 {
	agent := s.names[ai]
	chunks, chunk := 1, uint64(stormRegion)
	if s.kind == killAgents {
		chunks, chunk = 4, stormRegion/4
	}
	last := slices.Repeat([]int64{-1}, chunks)
	for round := uint64(0); !s.broken.Load(); round++ {
		select {
		case <-stop:
			return last
		default:
		}
		ch := int(round % uint64(chunks))
		rs := seed + round
		last[ch] = -1
		g0 := s.agentGen[ai].Load()
		res := s.fio(agent, "live", base+uint64(ch)*chunk, chunk, rs, false)
		s.mu.Lock()
		s.st.maxIO = max(s.st.maxIO, res.maxLat)
		s.mu.Unlock()
		if res.err == nil {
			last[ch] = int64(rs)
			s.mu.Lock()
			s.st.fioRounds++
			s.mu.Unlock()
			continue
		}
		if res.verify || !s.agentKilled(ai, g0) {
			s.failf("fio round %d through %s: %v\n%s", round, agent, res.err, res.out)
			return last
		}
		s.mu.Lock()
		s.st.fioCut++
		s.mu.Unlock()
		// The agent was killed: when it is back, what the earlier rounds
		// flushed must all be there.
		if err := s.verifyChunks(ai, base, chunk, last); err != nil {
			s.failf("after %s came back: %v", agent, err)
			return last
		}
	}
	return last
}

// verifyChunks verifies through agent ai every chunk whose last round is
// known, waiting out the agent's restart (and further kills).
func (s *storm) verifyChunks(ai int, base, chunk uint64, last []int64) error {
	agent := s.names[ai]
	deadline := time.Now().Add(2 * time.Minute)
	for ch, rs := range last {
		if rs < 0 {
			continue
		}
		for {
			g0 := s.agentGen[ai].Load()
			res := s.fio(agent, "live", base+uint64(ch)*chunk, chunk, uint64(rs), true)
			if res.err == nil {
				s.mu.Lock()
				s.st.fioVerifies++
				s.mu.Unlock()
				break
			}
			if res.verify || !s.agentKilled(ai, g0) {
				return fmt.Errorf("chunk %d (round seed %d) does not verify: %v\n%s", ch, rs, res.err, res.out)
			}
			if time.Now().After(deadline) || s.broken.Load() {
				return fmt.Errorf("chunk %d: could not verify in 2m: %v\n%s", ch, res.err, res.out)
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
	return nil
}

// verify checks the cluster after the storm, every process up: the disks
// listed are the model's, every known byte reads back through either
// agent, fio's last rounds verify through the other agent, and check is
// clean; and after one more kill -9 of the controller and a restart, the
// disks listed are still the model's and check is still clean.
func (s *storm) verify(rng *rand.Rand, last [][]int64) {
	t := s.t
	names := s.compareList("after the storm")
	// Contents, through a random agent each.
	for _, n := range names {
		d := s.disks[n]
		agent := s.names[rng.IntN(2)]
		var cmds []string
		if d.head >= 0 {
			cmds = append(cmds, "-c", fmt.Sprintf("read -P %d 0 %d", d.head, stormHead))
		}
		if d.size > d.zeroFrom {
			cmds = append(cmds, "-c", fmt.Sprintf("read -P 0 %d %d", d.zeroFrom, d.size-d.zeroFrom))
		}
		if len(cmds) > 0 {
			args := []string{"-f", "raw", s.c.uri(agent, n)}
			if d.readOnly {
				args = append([]string{"-r"}, args...)
			}
			out, err := runErr(time.Minute, "qemu-io", append(args, cmds...)...)
			if err != nil || qemuFailed(out) {
				t.Errorf("disk %s through %s (head pattern %d, zeros from %d of %d): %v\n%s", n, agent, d.head, d.zeroFrom, d.size, err, out)
			}
			s.st.contentChecks++
		}
		if d.sum != "" {
			sum, err := s.hash(n, agent)
			if err != nil {
				t.Errorf("read snapshot %s: %v", n, err)
			} else if sum != d.sum {
				t.Errorf("snapshot %s changed since it was taken: sha256 %s, then %s", n, sum, d.sum)
			}
			s.st.contentChecks++
		}
	}
	// fio's last flushed rounds, through the other agent.
	for i, a := range s.names {
		other := s.names[1-i]
		chunk := uint64(stormRegion / len(last[i]))
		for ch, rs := range last[i] {
			if rs < 0 {
				continue
			}
			res := s.fio(other, "live", uint64(i)*stormRegion+uint64(ch)*chunk, chunk, uint64(rs), true)
			if res.err != nil {
				t.Errorf("fio's last round through %s (chunk %d) does not verify through %s: %v\n%s", a, ch, other, res.err, res.out)
			}
			s.st.fioVerifies++
		}
	}
	s.checkClean("after the storm")
	s.checkContainers()

	// Everything acknowledged was durable, not only in the controller's
	// memory.
	s.c.ctl.kill()
	s.scanOutput(s.c.ctl)
	s.c.startController()
	s.compareList("after a last controller restart")
	s.checkClean("after a last controller restart")
	if s.kind == killController {
		// The agents lived through it all: their logs show no race.
		for _, a := range s.c.agents {
			s.scanOutput(a)
		}
	}
}

// checkContainers fails the test unless no container failed (the storage
// node's restarts were pauses, not failures) and, in a controller storm,
// the drained container is gone.
func (s *storm) checkContainers() {
	state, _, err := s.containers()
	if err != nil {
		s.t.Errorf("after the storm: %v", err)
		return
	}
	for id, st := range state {
		if st != "online" && (st != "draining" || id != stormDrained) {
			s.t.Errorf("after the storm: container %d is %s", id, st)
		}
	}
	if _, ok := state[stormDrained]; ok && s.kind == killController {
		s.t.Errorf("after the storm: container %d was drained and removed, and is listed (%s)", stormDrained, state[stormDrained])
	}
	for _, u := range s.c.storage {
		s.scanOutput(u)
	}
}

// compareList fails the test unless the disks the controller lists are
// the model's, with the model's sizes, modes and origins. It returns the
// model's names, sorted.
func (s *storm) compareList(when string) []string {
	t := s.t
	t.Helper()
	l, err := s.list(time.Now().Add(time.Minute))
	if err != nil {
		t.Fatalf("%s: %v", when, err)
	}
	var names []string
	for n := range s.disks {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		d := s.disks[n]
		got, ok := l[n]
		if !ok {
			t.Errorf("%s: disk %s (made by an acknowledged or applied operation) is missing", when, n)
			continue
		}
		origin := d.origin
		if origin != "" && s.disks[origin] == nil {
			origin = "(deleted)"
		}
		if mustUintE(got.Size) != d.size || got.ReadOnly != d.readOnly || got.Origin != origin {
			t.Errorf("%s: disk %s: size %s, read-only %v, origin %q; want %d, %v, %q", when, n, got.Size, got.ReadOnly, got.Origin, d.size, d.readOnly, origin)
		}
	}
	for n := range l {
		if s.disks[n] == nil {
			t.Errorf("%s: disk %s is listed but was deleted (or never made)", when, n)
		}
	}
	return names
}

// checkClean fails the test unless 'segmap check' is clean.
func (s *storm) checkClean(when string) {
	s.t.Helper()
	out, errOut, code := s.cli("check")
	if code != 0 || !strings.Contains(out, "clean") {
		s.t.Errorf("check %s: exit %d\n%s%s", when, code, out, errOut)
	}
	s.st.checks++
}
