package standalone_test

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"segmap/internal/faultinject"
)

var crashSeed = flag.Uint64("crash.seed", 0, "run only this seed of TestCrashPoints' soak phase (SEGMAP_SOAK)")

// crashCase is an operation whose every persistence step the test crashes.
type crashCase struct {
	name string
	op   fxOp
	side crashSide
}

// crashSide is what crashes.
type crashSide uint8

const (
	ctrlCrash    crashSide = iota // the controller
	agentsCrash                   // the agents (both, as one machine)
	machineCrash                  // controller and agents, one machine (segmap up)
)

func (s crashSide) String() string {
	return [...]string{"controller", "agents", "machine"}[s]
}

// crashCases are the operations of TestCrashPoints, each from the state
// fxSetup makes: D (forward policy) shares segments 0, 1 with D.s and owns
// segment 2; E (reverse policy) shares segments 0-2 with E.s; F has
// segments 0 and 1 written, and snapshots F@a and F@b (segment 0 and a
// piece of 1 written between them); I is F@a imported, with I@a; every
// disk has fxSegs segments.
func crashCases() []crashCase {
	return []crashCase{
		{"create", opCreate("N", false), ctrlCrash},
		{"create-preallocated", opCreate("P", true), ctrlCrash},
		{"snapshot", opSnapshot([]string{"D"}, []string{"S1"}, false), ctrlCrash},
		{"group-snapshot", opSnapshot([]string{"D", "E", "F"}, []string{"G1", "G2", "G3"}, false), ctrlCrash},
		{"clone", opSnapshot([]string{"D"}, []string{"C1"}, true), ctrlCrash},
		{"cow-forward", opWrite(0, "D", 100, pattern(10, 1000)), ctrlCrash},
		{"cow-forward-staged", opWrite(0, "D", seg64, pattern(11, seg64)), ctrlCrash},
		// D's segment 2 is partial (written after D.s): a write to
		// sub-blocks its own slot lacks fills them in place.
		{"fill-in", opWrite(0, "D", 2*seg64+20000, pattern(21, 3000)), ctrlCrash},
		// One that makes the slot hold half the segment or more: it
		// copies in the rest of the segment too (fill-all).
		{"fill-all", opWrite(0, "D", 2*seg64+20000, pattern(25, 8*4096)), ctrlCrash},
		// The same on D mapped by agent 0 alone: the map changes are
		// kept in memory until the write's FUA flushes them.
		{"lone-cow", opWriteLone("D", 100, pattern(22, 1000)), ctrlCrash},
		{"lone-fill-in", opWriteLone("D", 2*seg64+20000, pattern(23, 3000)), ctrlCrash},
		{"lone-fill-all", opWriteLone("D", 2*seg64+20000, pattern(26, 8*4096)), ctrlCrash},
		{"lone-allocate", opWriteLone("D", 3*seg64+5, pattern(24, 500)), ctrlCrash},
		{"cow-reverse", opWrite(0, "E", 100, pattern(12, 1000)), ctrlCrash},
		{"cow-reverse-whole", opWrite(0, "E", seg64, pattern(13, seg64)), ctrlCrash},
		{"allocate", opWrite(0, "D", 3*seg64+5, pattern(14, 500)), ctrlCrash},
		{"delete", opDelete("D.s"), ctrlCrash},
		{"delete-shared", opDelete("E"), ctrlCrash},
		{"trim", opTrim(0, "D", 2*seg64, seg64), ctrlCrash},
		{"trim-shared", opTrim(1, "D", 0, seg64), ctrlCrash},
		{"resize-grow", opResize("F", fxSegs+2), ctrlCrash},
		{"resize-shrink", opResize("D", 2), ctrlCrash},
		// D owns segment 2 and shares 0 and 1 with D.s: its own slot
		// is freed.
		{"rollback", opRollback("D", "D.s"), ctrlCrash},
		{"rollback-reverse", opRollback("E", "E.s"), ctrlCrash},
		{"rename", opRename("D", "D2"), ctrlCrash},
		{"freeze", opSetReadOnly("F", true), ctrlCrash},
		{"promote", opSetReadOnly("D.s", false), ctrlCrash},
		// D shares segments 0 and 1 with D.s (and 2 under its partial
		// entry). A flatten copies forward whatever the disk's policy.
		{"flatten", opFlatten("D"), ctrlCrash},
		// Container 1 holds slots of every kind: exclusive, shared
		// with snapshots, tops and layers of partial entries.
		{"drain", opDrain(1), ctrlCrash},
		// Container 1 failed (its segments Error), brought back.
		{"online", opOnline(1), ctrlCrash},
		{"fail-container", opFailContainer(1), ctrlCrash},
		// D with segment 2 set to Error and the segments it has on
		// the failed container 1: all become Zero.
		{"clear-errors", opClearErrors("D", 2, 1), ctrlCrash},
		{"import", opImport("J", "F@b", ""), ctrlCrash},
		{"import-incremental", opImport("I", "F@b", "F@a"), ctrlCrash},
	}
}

// The cases of mirrored containers, from fxSetupMirror's state, are
// mirrorCases (crashmirror_test.go).

// crashResult is what one run of crashRun saw.
type crashResult struct {
	steps   int64  // the controller's persistence steps during the operation
	outcome string // "before" or "after"
	log     []faultinject.Call
}

// fxState is a data directory saved by fxSave: its copy in saved, to be
// restored at dir (the store names its containers by their paths).
type fxState struct {
	dir, saved string
	m          fxModel
}

// fxSave closes h and saves its data directory, which holds m.
func fxSave(t testing.TB, h *fx, m fxModel) fxState {
	h.close()
	s := fxState{dir: h.dir, saved: t.TempDir(), m: m}
	if err := os.RemoveAll(s.saved); err != nil {
		t.Fatal(err)
	}
	copyDir(t, s.dir, s.saved)
	return s
}

// restore puts the saved data directory back.
func (s fxState) restore(t testing.TB) {
	if err := os.RemoveAll(s.dir); err != nil {
		t.Fatal(err)
	}
	copyDir(t, s.saved, s.dir)
}

// crashRun restores state st, runs op with side crashing at its
// persistence step k (0: no crash; keep: the step itself is kept),
// restarts what crashed and checks what survived.
func crashRun(t *testing.T, st fxState, op fxOp, k int64, keep bool, seed uint64, side crashSide) (crashResult, error) {
	st.restore(t)
	m0 := st.m
	h := openFx(t, st.dir, true)
	defer h.close()
	h.agentVolatile.Store(side != ctrlCrash)
	h.oneMachine.Store(side == machineCrash)
	if err := h.prepare(m0); err != nil {
		return crashResult{}, fmt.Errorf("prepare: %w", err)
	}
	// The injector wraps the store and containers from the start: count
	// the operation's steps from where it stands now.
	in := h.ctrl.Load()
	if side == agentsCrash {
		in = h.agent.Load()
	}
	if op.pre != nil {
		if err := op.pre(h); err != nil {
			return crashResult{}, fmt.Errorf("before the operation: %w", err)
		}
	}
	start := in.Steps()
	if k > 0 {
		in.CrashAt(start+k, keep)
	}
	in.Record(true)
	in.KeepUnsynced(0.5)
	after, opErr := op.run(h, m0)
	res := crashResult{steps: in.Steps() - start}
	for _, c := range in.Log() {
		if c.Step > start {
			res.log = append(res.log, c)
		}
	}
	if k == 0 && opErr != nil {
		return res, fmt.Errorf("operation without a crash: %w", opErr)
	}
	if k > 0 && !in.Crashed() {
		return res, fmt.Errorf("the operation made %d persistence steps; no crash at step %d", res.steps, k)
	}
	if k > 0 && opErr == nil {
		t.Logf("crash at step %d (%v): operation acknowledged all the same", k, res.log[k-1])
	}
	if opErr != nil && !errors.Is(opErr, faultinject.ErrCrashed) {
		return res, fmt.Errorf("operation failed without naming the crash: %v", opErr)
	}
	if side != agentsCrash {
		h.ctrl.Store(faultinject.New(seed + 1))
		if err := h.c.RestartController(h.ctx); err != nil {
			return res, fmt.Errorf("restart: %w", err)
		}
	}
	if side != ctrlCrash {
		h.agent.Store(faultinject.New(seed + 2))
		for i := range h.c.Agents {
			if err := h.c.RestartAgent(h.ctx, i); err != nil {
				return res, fmt.Errorf("restart agent %d: %w", i, err)
			}
		}
	}
	var seen string // what recover found
	if op.recover != nil {
		var err error
		if seen, err = op.recover(h, m0); err != nil {
			return res, fmt.Errorf("after the restart: %w", err)
		}
	}
	if err := h.checkClean(); err != nil {
		return res, err
	}
	var err error
	var m fxModel
	if res.outcome, m, err = h.outcome(m0, after, opErr == nil, op.torn); err != nil {
		return res, err
	}
	if seen != "" {
		// Recovered to after: the outcome is what the restart left.
		res.outcome = seen
	}
	if res.outcome == "after" && op.settled != nil {
		if err := op.settled(h); err != nil {
			return res, err
		}
	}
	// The restarted controller works: a create, a write that allocates
	// and a snapshot, and the store is still clean.
	live := []fxOp{
		opCreate("live", false),
		opWrite(0, "live", 3*seg64, pattern(99, 700)),
		opSnapshot([]string{"live"}, []string{"live.s"}, false),
	}
	for _, o := range live {
		if m, err = o.run(h, m); err != nil {
			return res, fmt.Errorf("after the restart, %s: %w", o.name, err)
		}
	}
	fresh := fxModel{"live": m["live"], "live.s": m["live.s"]}
	if err := h.contents(fresh, 1); err != nil {
		return res, fmt.Errorf("after the restart and a write: %w", err)
	}
	return res, h.checkClean()
}

// TestCrashPoints crashes the controller at every persistence step (each
// metadata commit, each write, punch and flush of a controller container)
// of every state-changing operation, keeping that step or not, restarts it
// over what survived (the bbolt file and the synced container data, plus a
// random half of the unsynced), and requires: Check clean, every disk and
// snapshot holding exactly what it did before the operation or exactly
// what it holds after it (the operation wholly there or wholly absent,
// and there if it was acknowledged), and a controller that works.
//
// The agents crash too, at every step of the writes (they lose their
// unsynced writes), and controller and agents together as one machine
// (segmap up losing power).
//
// With SEGMAP_SOAK=<duration> it crashes the one machine at every step of
// every write and trim, then keeps crashing random steps of random
// operations after random histories, on a random side, until the duration
// has passed; a failure prints its seed, and -crash.seed N reruns it.
func TestCrashPoints(t *testing.T) {
	// Side by side with the other long sweep of this package: each
	// works in directories of its own, and both leave a core idle
	// much of the time (fsyncs, restarts).
	t.Parallel()
	soak := soakDuration(t)
	deadline := time.Now().Add(soak)
	perOp := map[string]int64{}
	var points, runs, restarts int64
	outcomes := map[string]int{}
	if *crashSeed == 0 {
		h := openFx(t, t.TempDir(), true)
		st := fxSave(t, h, fxSetup(h))
		hm := openFx(t, t.TempDir(), true)
		stMirror := fxSave(t, hm, fxSetupMirror(hm))
		cases := append(crashCases(), mirrorCases()...)
		// The agents' side: the writes (a trim writes nothing on an
		// agent), and one in place; and the writes and trims with
		// controller and agents on one machine that loses power (the
		// short form takes three of those, the long form all).
		inPlace := crashCase{"write-in-place", opWrite(0, "D", 2*seg64+300, pattern(20, 5000)), ctrlCrash}
		short := map[string]bool{"cow-forward": true, "cow-forward-staged": true, "cow-reverse": true, "trim": true, "fill-in": true, "fill-all": true}
		for _, c := range append(crashCases(), inPlace) {
			if c.op.name == "write" {
				cases = append(cases, crashCase{"agents-" + c.name, c.op, agentsCrash})
			}
			if (c.op.name == "write" || c.op.name == "trim") && (soak > 0 || short[c.name]) {
				cases = append(cases, crashCase{"machine-" + c.name, c.op, machineCrash})
			}
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				st := st
				if c.op.mirror {
					st = stMirror
				}
				res, err := crashRun(t, st, c.op, 0, false, 1, c.side)
				if err != nil {
					t.Fatalf("%s without a crash: %v", c.name, err)
				}
				if res.steps == 0 {
					t.Fatalf("%s made no persistence step", c.name)
				}
				if c.name == "machine-cow-forward" {
					// The agent copies: its write and flush of the
					// staged slot, then the commit, each a crash
					// point (a crash between them loses the write,
					// never the snapshot).
					if err := agentCopySteps(res.log); err != nil {
						t.Fatalf("%s: %v: %v", c.name, err, res.log)
					}
				}
				perOp[c.name] = res.steps
				points += res.steps
				runs++
				restarts++
				for k := int64(1); k <= res.steps; k++ {
					for _, keep := range []bool{false, true} {
						r, err := crashRun(t, st, c.op, k, keep, uint64(k), c.side)
						runs++
						restarts++
						if err != nil {
							t.Fatalf("%s: crash at step %d of %d (%v), kept %v: %v", c.name, k, res.steps, res.log[k-1], keep, err)
						}
						outcomes[r.outcome]++
					}
				}
				t.Logf("%s: %d crash points: %v", c.name, res.steps, res.log)
			})
		}
	}
	if soak > 0 && !t.Failed() {
		n, p := crashSoak(t, deadline, outcomes)
		runs += n
		restarts += n
		points += p
	}
	t.Logf("summary: crash points %d (per operation %v), crash runs %d, restarts %d, outcomes %v", points, perOp, runs, restarts, outcomes)
}

// TestCrashPointsSlowFlush: the persistence steps of an operation that
// flushes map changes kept in memory (lone-fill-in: D mapped by one
// agent, a write with FUA) are the same whether the controller's flushes
// are quick or slow. TestCrashPoints counts an operation's steps once and
// then crashes each: a count that depends on fsync's speed made a crash
// run on a loaded CI machine miss its step (the count saw the preflush
// flush again, after a slow fsync; the crash run did not).
func TestCrashPointsSlowFlush(t *testing.T) {
	h := openFx(t, t.TempDir(), true)
	st := fxSave(t, h, fxSetup(h))
	op := opWriteLone("D", 2*seg64+20000, pattern(23, 3000))
	var logs [2][]string
	for i, slow := range []bool{false, true} {
		st.restore(t)
		h := openFx(t, st.dir, true)
		if err := h.prepare(st.m); err != nil {
			h.close()
			t.Fatalf("prepare: %v", err)
		}
		in := h.ctrl.Load()
		start := in.Steps()
		in.Record(true)
		h.slowFlush.Store(slow)
		_, err := op.run(h, st.m)
		h.slowFlush.Store(false)
		for _, c := range in.Log() {
			if c.Step > start {
				logs[i] = append(logs[i], fmt.Sprintf("%v %s", c.Op, c.Target))
			}
		}
		h.close()
		if err != nil {
			t.Fatalf("write (slow flushes %v): %v", slow, err)
		}
	}
	if len(logs[0]) == 0 || !slices.Equal(logs[0], logs[1]) {
		t.Errorf("persistence steps of a lone fill-in:\nquick flushes %v\nslow flushes  %v\nwant the same", logs[0], logs[1])
	}
}

// crashSoak runs random histories, each ended by an operation crashed at
// a random step, until deadline (or only the -crash.seed one). It
// returns the runs and crash points, and counts outcomes.
func crashSoak(t *testing.T, deadline time.Time, outcomes map[string]int) (runs, points int64) {
	seeds := []uint64{*crashSeed}
	if *crashSeed == 0 {
		seeds = nil
	}
	for i := 0; ; i++ {
		var seed uint64
		switch {
		case seeds != nil && i < len(seeds):
			seed = seeds[i]
		case seeds != nil:
			return runs, points
		case time.Now().After(deadline):
			return runs, points
		default:
			seed = rand.Uint64()
		}
		r := rand.New(rand.NewPCG(seed, 11))
		h := openFx(t, t.TempDir(), true)
		m := randomHistory(t, r, h, fxModel{}, seed, "-crash.seed")
		st := fxSave(t, h, m)
		op := randomOp(r, m)
		side := ctrlCrash
		if op.name == "write" || op.name == "trim" {
			side = crashSide(r.IntN(3))
		}
		if side == agentsCrash && op.name == "trim" {
			side = machineCrash
		}
		res, err := crashRun(t, st, op, 0, false, seed, side)
		if err != nil {
			t.Fatalf("seed %d: %s without a crash: %v (rerun with -crash.seed %d)", seed, op.name, err, seed)
		}
		if res.steps > 0 {
			k := 1 + r.Int64N(res.steps)
			keep := r.IntN(2) == 0
			r, err := crashRun(t, st, op, k, keep, seed, side)
			outcomes[r.outcome]++
			if err != nil {
				t.Fatalf("seed %d: %s crashed (%v) at step %d (%v), kept %v: %v (rerun with -crash.seed %d)", seed, op.name, side, k, res.log[k-1], keep, err, seed)
			}
			points++
		}
		runs += 2
	}
}

// randomOp returns a random operation that can succeed on model m.
func randomOp(r *rand.Rand, m fxModel) fxOp {
	names := m.names()
	var writable []string
	for _, n := range names {
		if !m[n].readOnly {
			writable = append(writable, n)
		}
	}
	pick := func(from []string) string { return from[r.IntN(len(from))] }
	fresh := func(prefix string) string {
		for i := 0; ; i++ {
			n := fmt.Sprintf("%s%d", prefix, i)
			if _, ok := m[n]; !ok {
				return n
			}
		}
	}
	if len(writable) == 0 || (len(names) < 3 && r.IntN(2) == 0) {
		if r.IntN(2) == 0 {
			return opCreateReverse(fresh("R"))
		}
		return opCreate(fresh("N"), r.IntN(4) == 0)
	}
	switch r.IntN(10) {
	case 8:
		n := pick(writable)
		var snaps []string
		for _, s := range names {
			if m[s].readOnly && m[s].family == m[n].family {
				snaps = append(snaps, s)
			}
		}
		if len(snaps) > 0 {
			return opRollback(n, pick(snaps))
		}
		return opSnapshot([]string{n}, []string{fresh("S")}, false)
	case 9:
		n := pick(names)
		switch r.IntN(3) {
		case 0:
			return opRename(n, fresh("M"))
		case 1:
			if w := pick(writable); true {
				return opFlatten(w)
			}
			fallthrough
		default:
			return opSetReadOnly(n, !m[n].readOnly)
		}
	case 0:
		if len(names) >= 7 {
			return opDelete(pick(names))
		}
		return opSnapshot([]string{pick(names)}, []string{fresh("S")}, r.IntN(3) == 0)
	case 1:
		if len(names) >= 6 {
			return opDelete(pick(names))
		}
		a, b := pick(names), pick(names)
		if a == b {
			return opSnapshot([]string{a}, []string{fresh("S")}, false)
		}
		return opSnapshot([]string{a, b}, []string{fresh("G"), fresh("H")}, false)
	case 2:
		return opDelete(pick(names))
	case 3:
		n := pick(writable)
		size := len(m[n].data)
		off := r.IntN(size / 512)
		return opTrim(r.IntN(2), n, off*512, min(size-off*512, (1+r.IntN(2*seg64/512))*512))
	case 4:
		n := pick(writable)
		segs := len(m[n].data) / seg64
		if segs > 1 && r.IntN(2) == 0 {
			return opResize(n, 1+r.IntN(segs-1))
		}
		return opResize(n, min(segs+1+r.IntN(2), fxSegs+2))
	default:
		n := pick(writable)
		size := len(m[n].data)
		var off, cnt int
		if r.IntN(2) == 0 { // whole segments
			s := r.IntN(size / seg64)
			off, cnt = s*seg64, seg64*(1+r.IntN(min(2, size/seg64-s)))
		} else {
			off = r.IntN(size - 1)
			cnt = 1 + r.IntN(min(size-off, 2*seg64))
		}
		return opWrite(r.IntN(2), n, off, pattern(r.Uint64(), cnt))
	}
}

// agentCopySteps checks that the persistence steps of a partial write into
// a shared segment, on one machine, are the agent's writes of the staged
// slot, its flush, and then the metadata commit.
func agentCopySteps(log []faultinject.Call) error {
	wrote, flushed, committed := false, false, false
	for _, c := range log {
		agent := strings.HasPrefix(c.Target, "agent/")
		switch {
		case agent && c.Op == faultinject.OpWrite:
			if flushed {
				return fmt.Errorf("an agent write after the flush")
			}
			wrote = true
		case agent && c.Op == faultinject.OpFlush && wrote && !committed:
			flushed = true
		case c.Op == faultinject.OpUpdate && c.Target == "meta":
			if !flushed {
				return fmt.Errorf("a metadata commit before the agent flushed its copy")
			}
			committed = true
		case strings.HasPrefix(c.Target, "ctrl/") && c.Op&(faultinject.OpWrite|faultinject.OpRead) != 0:
			return fmt.Errorf("the controller copied (%v)", c)
		}
	}
	if !committed {
		return fmt.Errorf("no agent write, flush and commit")
	}
	return nil
}
