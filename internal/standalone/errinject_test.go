package standalone_test

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"strings"
	"syscall"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/faultinject"
)

var errSeed = flag.Uint64("errinject.seed", 0, "run only this seed of TestErrorInjection's soak phase (SEGMAP_SOAK)")

// errMode is one way of failing a call.
type errMode struct {
	name    string
	err     syscall.Errno
	always  bool
	durable bool // performed, then reported failed (persistence steps only)
}

var errModes = []errMode{
	{"EIO once", syscall.EIO, false, false},
	{"ENOSPC always", syscall.ENOSPC, true, false},
	{"EIO once after the fact", syscall.EIO, false, true},
	{"ENOSPC once", syscall.ENOSPC, false, false},
	{"EIO always", syscall.EIO, true, false},
	{"ENOSPC always after the fact", syscall.ENOSPC, true, true},
}

// errPoint is one call of an operation to fail: the nth call of op on
// target, in one of the two injectors.
type errPoint struct {
	agent  bool // in the agents' injector, not the controller's
	op     faultinject.Op
	target string
	nth    int
}

func (p errPoint) String() string { return fmt.Sprintf("%v %s #%d", p.op, p.target, p.nth) }

// errOps are the calls the short form fails in turn: metadata commits
// and container calls. The long form fails views (metadata reads) too.
const errOps = faultinject.OpPersist | faultinject.OpRead

// errPoints lists the calls a run of an operation made, from the logs of
// both injectors.
func errPoints(ctrl, agent []faultinject.Call, ops faultinject.Op) []errPoint {
	var out []errPoint
	for i, log := range [][]faultinject.Call{ctrl, agent} {
		seen := map[string]int{}
		for _, c := range log {
			if c.Op&ops == 0 {
				continue
			}
			k := fmt.Sprintf("%v %s", c.Op, c.Target)
			seen[k]++
			out = append(out, errPoint{agent: i == 1, op: c.Op, target: c.Target, nth: seen[k]})
		}
	}
	return out
}

// errCase is an operation of TestErrorInjection.
type errCase struct {
	crashCase
	// cold: the operation runs under a controller that has not zeroed
	// its free slots yet (it will, before its first allocation); else
	// it has, and trusts them to stay zero.
	cold bool
}

func errCases() []errCase {
	more := []crashCase{
		{"read", opRead(0, "D"), ctrlCrash},
		{"write-in-place", opWrite(0, "D", 2*seg64+300, pattern(20, 5000)), ctrlCrash},
	}
	// The operations that allocate, run cold too, fail the zeroing.
	cold := map[string]bool{"allocate": true, "cow-forward-staged": true, "cow-reverse-whole": true, "create-preallocated": true}
	// The operations on a failed container leave segments Error, which
	// the model check here takes for lost data; their crash points check
	// them with what they leave (crashhealth_test.go).
	// The cases of mirrored containers (mirrorCases) are not run here
	// either: they start from fxSetupMirror's state, and a failed I/O
	// on a replica is what they already inject (crashmirror_test.go).
	health := map[string]bool{"online": true, "fail-container": true, "clear-errors": true}
	var out []errCase
	for _, c := range append(crashCases(), more...) {
		if health[c.name] {
			continue
		}
		out = append(out, errCase{crashCase: c})
		if cold[c.name] {
			out = append(out, errCase{crashCase{c.name + "-cold", c.op, c.side}, true})
		}
	}
	return out
}

// opRead reads disk whole through agent i and compares it with the model.
func opRead(i int, disk string) fxOp {
	return fxOp{name: "read", run: func(h *fx, m fxModel) (fxModel, error) {
		d, err := h.c.Agents[i].Open(h.ctx, disk)
		if err != nil {
			return m, err
		}
		got := make([]byte, len(m[disk].data))
		if err := d.ReadAt(h.ctx, got, 0); err != nil {
			return m, err
		}
		if j := firstDiff(got, m[disk].data); j >= 0 {
			return m, fmt.Errorf("read %s: byte %d reads %#x, want %#x", disk, j, got[j], m[disk].data[j])
		}
		return m, nil
	}}
}

// errResult is what one run of errRun saw.
type errResult struct {
	points  []errPoint // the calls the operation made (count run)
	fired   bool
	outcome string
	leaked  int
	errText string
}

// errRun restores st, runs op with point p failed in mode md (p nil: no
// fault), and checks what follows: the operation succeeds or fails with
// an error naming the cause; Check finds at most leaked slots, which
// Repair reclaims; the disks hold the state before or after the operation
// (after, if it was acknowledged); writes and reads still work through
// both agents; a controller restart succeeds and changes nothing.
func errRun(t *testing.T, st fxState, op fxOp, p *errPoint, md errMode, ops faultinject.Op, cold bool) (errResult, error) {
	st.restore(t)
	m0 := st.m
	h := openFx(t, st.dir, false)
	defer h.close()
	if err := h.prepare(m0); err != nil {
		return errResult{}, fmt.Errorf("prepare: %w", err)
	}
	// The controller zeroes its free slots: from now on it trusts them
	// to stay zero.
	if !cold {
		if err := h.freeSlotsZero(false); err != nil {
			return errResult{}, fmt.Errorf("prepare: %w", err)
		}
	}
	ctrl, agentIn := h.ctrl.Load(), h.agent.Load()
	var fault *faultinject.Fault
	if p != nil {
		in := ctrl
		if p.agent {
			in = agentIn
		}
		target, op := p.target, p.op
		fault = in.Inject(faultinject.Fault{
			Ops: op, If: func(c faultinject.Call) bool { return c.Target == target },
			Nth: p.nth, Always: md.always, Err: md.err, Durable: md.durable && op&faultinject.OpPersist != 0,
		})
	} else {
		ctrl.Record(true)
		agentIn.Record(true)
	}
	after, opErr := op.run(h, m0)
	var res errResult
	if p == nil {
		if opErr != nil {
			return res, fmt.Errorf("without a fault: %w", opErr)
		}
		res.points = errPoints(ctrl.Log(), agentIn.Log(), ops)
	} else {
		res.fired = fault.Fired() > 0
		if opErr != nil {
			res.errText = opErr.Error()
			if !errors.Is(opErr, md.err) && !strings.Contains(opErr.Error(), md.err.Error()) {
				return res, fmt.Errorf("the operation failed without naming the cause (%v): %v", md.err, opErr)
			}
		}
	}
	ctrl.ClearFaults()
	agentIn.ClearFaults()
	// An import whose store failed for good could not delete its hidden
	// disk either: the next import, or the next controller, does.
	h.c.Ctrl.SweepImports(h.ctx)

	ps, err := h.c.Ctrl.Check(h.ctx)
	if err != nil {
		return res, fmt.Errorf("check: %w", err)
	}
	for _, pr := range ps {
		if pr.Kind != controller.Leaked {
			return res, fmt.Errorf("check found more than leaks: %v", ps)
		}
	}
	res.leaked = len(ps)
	if len(ps) > 0 {
		fixed, err := h.c.Ctrl.Repair(h.ctx)
		if err != nil {
			return res, fmt.Errorf("repair: %w", err)
		}
		if len(fixed) != len(ps) {
			return res, fmt.Errorf("repair reclaimed %v of %v", fixed, ps)
		}
		if err := h.checkClean(); err != nil {
			return res, fmt.Errorf("after repair: %w", err)
		}
	}
	// An agent whose flush failed fails every later flush of that
	// container (the kernel may have dropped its dirty pages): an
	// operator restarts it.
	if p != nil && p.agent {
		for i, a := range h.c.Agents {
			if strings.HasPrefix(p.target, "agent/"+a.Name()+"/") {
				if err := h.c.RestartAgent(h.ctx, i); err != nil {
					return res, fmt.Errorf("restart agent %s: %w", a.Name(), err)
				}
			}
		}
	}
	// Every free slot reads zero, as the controller trusts them to. (A
	// staged write that failed on its agent keeps its slot reserved
	// until that agent re-attaches: restarted above.)
	if err := h.freeSlotsZero(true); err != nil {
		return res, fmt.Errorf("after the failure: %w", err)
	}
	var m fxModel
	if res.outcome, m, err = h.outcome(m0, after, opErr == nil, op.torn); err != nil {
		return res, err
	}
	if res.outcome == "after" && op.settled != nil {
		if err := op.settled(h); err != nil {
			return res, err
		}
	}
	// Every segment of every writable disk takes a write through agent
	// a, and agent b, which may hold entries from before the failure,
	// reads them back.
	for _, name := range m.names() {
		if m[name].readOnly {
			continue
		}
		for off := 0; off < len(m[name].data); off += seg64 {
			w := opWrite(0, name, off+200, pattern(uint64(off+len(name)), 300))
			if m, err = w.run(h, m); err != nil {
				return res, fmt.Errorf("after the failure, write %s at %d: %w", name, off+200, err)
			}
		}
	}
	for i := range h.c.Agents {
		if err := h.contents(m, i); err != nil {
			return res, fmt.Errorf("after the failure and a write to every disk: %w", err)
		}
	}
	if err := h.restartController(); err != nil {
		return res, fmt.Errorf("restart: %w", err)
	}
	if err := h.checkClean(); err != nil {
		return res, fmt.Errorf("after the restart: %w", err)
	}
	return res, h.matches(m)
}

// TestErrorInjection fails, in turn, every call an operation makes to a
// metadata Update or a container (the controller's and the agents'
// containers: reads, writes, punches, flushes) with EIO or ENOSPC, once
// or from then on, before or after the call takes effect, and requires:
// the operation completes or fails with an error that names the cause;
// Check then finds at most leaked slots, and Repair reclaims them; the
// disks hold what they held before the operation or what they hold after
// it (after, if it was acknowledged); every disk still takes writes, and
// both agents read them back; and a controller restart succeeds over
// the result.
//
// The short form gives each call one of the error modes, in rotation; with
// SEGMAP_SOAK=<duration> every call, metadata views included, gets every
// mode, and then random histories get random faults until the duration
// has passed (-errinject.seed N reruns one).
func TestErrorInjection(t *testing.T) {
	// Side by side with the other long sweep of this package: each
	// works in directories of its own, and both leave a core idle
	// much of the time (fsyncs, restarts).
	t.Parallel()
	soak := soakDuration(t)
	var points, injected, runs, restarts, leaks int64
	outcomes := map[string]int{}
	perOp := map[string]int{}
	modes, ops := 1, errOps
	if soak > 0 {
		modes, ops = len(errModes), faultinject.OpAll
	}
	start := time.Now()
	if *errSeed == 0 {
		h := openFx(t, t.TempDir(), false)
		st := fxSave(t, h, fxSetup(h))
		rot := 0
		for _, c := range errCases() {
			t.Run(c.name, func(t *testing.T) {
				res, err := errRun(t, st, c.op, nil, errMode{}, ops, c.cold)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				runs++
				restarts++
				perOp[c.name] = len(res.points)
				points += int64(len(res.points))
				for _, p := range res.points {
					for j := 0; j < modes; j++ {
						md := errModes[(rot+j)%len(errModes)]
						r, err := errRun(t, st, c.op, &p, md, ops, c.cold)
						runs++
						restarts++
						if err != nil {
							t.Fatalf("%s: %s at %v: %v", c.name, md.name, p, err)
						}
						if r.fired {
							injected++
						}
						leaks += int64(r.leaked)
						outcomes[r.outcome]++
					}
					rot++
				}
			})
		}
	}
	if soak > 0 && !t.Failed() {
		n, f := errSoak(t, start.Add(soak), outcomes, &leaks)
		runs += n
		restarts += n
		injected += f
	}
	t.Logf("summary: error points %d (per operation %v), faults injected %d, runs %d, controller restarts %d, leaked slots repaired %d, outcomes %v", points, perOp, injected, runs, restarts, leaks, outcomes)
}

// errSoak runs random histories, each ended by an operation with a random
// call failed in a random mode, until deadline. It returns the runs and
// the faults that fired.
func errSoak(t *testing.T, deadline time.Time, outcomes map[string]int, leaks *int64) (runs, fired int64) {
	for i := 0; ; i++ {
		seed := *errSeed
		switch {
		case seed != 0 && i > 0:
			return runs, fired
		case seed == 0 && time.Now().After(deadline):
			return runs, fired
		case seed == 0:
			seed = rand.Uint64()
		}
		n, f := errSoakSeed(t, seed, outcomes, leaks)
		runs += n
		if f {
			fired++
		}
	}
}

// errSoakSeed runs errSoak's history of one seed: it returns the runs it
// made and whether the fault fired.
func errSoakSeed(t *testing.T, seed uint64, outcomes map[string]int, leaks *int64) (runs int64, fired bool) {
	r := rand.New(rand.NewPCG(seed, 13))
	h := openFx(t, t.TempDir(), false)
	m := randomHistory(t, r, h, fxModel{}, seed, "-errinject.seed")
	st := fxSave(t, h, m)
	op := randomOp(r, m)
	cold := r.IntN(2) == 0
	res, err := errRun(t, st, op, nil, errMode{}, faultinject.OpAll, cold)
	if err != nil {
		t.Fatalf("seed %d: %s without a fault: %v (rerun with -errinject.seed %d)", seed, op.name, err, seed)
	}
	runs++
	if len(res.points) == 0 {
		return runs, false
	}
	p := res.points[r.IntN(len(res.points))]
	md := errModes[r.IntN(len(errModes))]
	got, err := errRun(t, st, op, &p, md, faultinject.OpAll, cold)
	runs++
	if err != nil {
		t.Fatalf("seed %d: %s: %s at %v: %v (rerun with -errinject.seed %d)", seed, op.name, md.name, p, err, seed)
	}
	*leaks += int64(got.leaked)
	outcomes[got.outcome]++
	return runs, got.fired
}
