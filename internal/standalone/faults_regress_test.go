package standalone_test

// Regression tests for bugs the crash-point and error-injection tests
// found: each fails on the code before its fix.

import (
	"errors"
	"strings"
	"syscall"
	"testing"

	"segmap/internal/faultinject"
)

// A controller that dies between committing a resize and telling the
// agents (a grow is told after its commit), or after telling them of a
// shrink it then does not commit, left each agent serving the disk at the
// size it last heard of, even after re-attaching to the next controller.
func TestRegressResizeCrashAgentSize(t *testing.T) {
	tests := []struct {
		name string
		segs int  // the new size, in segments
		keep bool // the resize's commit survives the crash
		want int  // the size the agents must see after the restart
	}{
		{"grow committed", fxSegs + 2, true, fxSegs + 2},
		{"shrink not committed", 1, false, fxSegs},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := openFx(t, t.TempDir(), false)
			defer h.close()
			m, err := opCreate("F", false).run(h, fxModel{})
			if err != nil {
				t.Fatal(err)
			}
			if m, err = opWrite(0, "F", 0, pattern(1, fxSegs*seg64)).run(h, m); err != nil {
				t.Fatal(err)
			}
			if err := h.prepare(m); err != nil {
				t.Fatal(err)
			}
			in := h.ctrl.Load()
			in.CrashAt(in.Steps()+1, tt.keep) // the resize's commit
			_, err = opResize("F", tt.segs).run(h, m)
			if !errors.Is(err, faultinject.ErrCrashed) {
				t.Fatalf("resize: %v, want the crash", err)
			}
			if err := h.restartController(); err != nil {
				t.Fatal(err)
			}
			for _, a := range h.c.Agents {
				d, err := a.Open(h.ctx, "F")
				if err != nil {
					t.Fatal(err)
				}
				if got := d.Size(); got != uint64(tt.want*seg64) {
					t.Errorf("agent %s serves F at %d bytes after the restart, want %d", a.Name(), got, tt.want*seg64)
				}
			}
		})
	}
}

// A metadata commit that failed may have landed all the same (its fsync
// failed after the pages reached the disk). The controller answered the
// fault with the error and left every agent with the entries the commit
// replaced: after a reverse-delta copy, an agent still reading the
// original slot for E.s saw E's next writes (the snapshot changed); after
// an allocation or a forward copy, an agent kept reading zeros or the old
// slot while the other wrote the new one. And a resize whose commit failed
// left the agents at the size they had been told (a shrink is told before
// its commit).
func TestRegressFailedCommitStaleEntries(t *testing.T) {
	h := openFx(t, t.TempDir(), false)
	st := fxSave(t, h, fxSetup(h))
	ops := map[string]fxOp{}
	for _, c := range errCases() {
		ops[c.name] = c.op
	}
	update := func(nth int) *errPoint { return &errPoint{op: faultinject.OpUpdate, target: "meta", nth: nth} }
	landed := errMode{"EIO after the fact", syscall.EIO, false, true}
	failed := errMode{"EIO", syscall.EIO, false, false}
	tests := []struct {
		op string
		p  *errPoint
		md errMode
	}{
		{"cow-reverse", update(2), landed},
		{"cow-reverse-whole", update(2), landed},
		{"cow-forward", update(1), landed},
		{"cow-forward-staged", update(1), landed},
		{"allocate", update(1), landed},
		{"resize-grow", update(1), landed},
		{"resize-shrink", update(1), failed},
	}
	for _, tt := range tests {
		t.Run(tt.op, func(t *testing.T) {
			res, err := errRun(t, st, ops[tt.op], tt.p, tt.md, errOps, true)
			if err != nil {
				t.Fatalf("%s at %v: %v", tt.md.name, tt.p, err)
			}
			if !res.fired {
				t.Fatalf("the fault at %v did not fire", tt.p)
			}
		})
	}
}

// A preallocated disk was created in one transaction and preallocated in
// the next: a controller that died between them left the disk without a
// single slot, where it must exist preallocated or not at all.
func TestRegressPreallocateCrash(t *testing.T) {
	h := openFx(t, t.TempDir(), true)
	st := fxSave(t, h, fxModel{})
	op := opCreate("P", true)
	res, err := crashRun(t, st, op, 0, false, 1, ctrlCrash)
	if err != nil {
		t.Fatal(err)
	}
	for k := int64(1); k <= res.steps; k++ {
		for _, keep := range []bool{false, true} {
			if _, err := crashRun(t, st, op, k, keep, 1, ctrlCrash); err != nil {
				t.Errorf("crash at step %d of %d (%v), kept %v: %v", k, res.steps, res.log[k-1], keep, err)
			}
		}
	}
}

// A commit that frees slots and fails may have landed all the same,
// leaving the slots it freed unpunched, with the deleted disk's data in
// them, while the controller went on trusting its free slots to be zero:
// the next Zero fault was handed a slot that read another disk's data.
func TestRegressFailedFreeDirtySlots(t *testing.T) {
	h := openFx(t, t.TempDir(), false)
	st := fxSave(t, h, fxSetup(h))
	cases := map[string]fxOp{}
	for _, c := range crashCases() {
		cases[c.name] = c.op
	}
	landed := errMode{"ENOSPC after the fact", syscall.ENOSPC, false, true}
	for _, name := range []string{"delete", "trim", "resize-shrink"} {
		t.Run(name, func(t *testing.T) {
			p := &errPoint{op: faultinject.OpUpdate, target: "meta", nth: 1}
			res, err := errRun(t, st, cases[name], p, landed, errOps, false)
			if err != nil {
				t.Fatalf("%s at %v: %v", landed.name, p, err)
			}
			if !res.fired {
				t.Fatalf("the fault at %v did not fire", p)
			}
		})
	}
}

// A staged write's commit that failed before it reached its stage (here:
// a store read at the start of the fault) left the slot reserved in the
// controller's memory until the agent re-attached: each such failure took
// a slot out of use.
func TestRegressFailedCommitKeepsReservation(t *testing.T) {
	h := openFx(t, t.TempDir(), false)
	st := fxSave(t, h, fxSetup(h))
	var op fxOp
	for _, c := range crashCases() {
		if c.name == "cow-reverse-whole" {
			op = c.op
		}
	}
	md := errMode{"ENOSPC always after the fact", syscall.ENOSPC, true, true}
	// The sixth store read is the commit fault's first (the disk's
	// record): the write fault before it reads the disk twice (before
	// and under its locks), its entry, and the free slots, and the
	// zeroing of the container once.
	p := &errPoint{op: faultinject.OpView, target: "meta", nth: 6}
	res, err := errRun(t, st, op, p, md, faultinject.OpAll, false)
	if err != nil {
		t.Fatalf("%s at %v: %v", md.name, p, err)
	}
	if !res.fired || !strings.Contains(res.errText, "commit") {
		t.Fatalf("the fault at %v did not fail the commit: fired %v, %q", p, res.fired, res.errText)
	}
}

// A reverse-delta copy commits the move of every sharer of the slot and
// then tells each sharer's agents, one sharer after the other. When an
// agent failed the command for the first sharer (here agent b, whose
// flush of its own earlier write failed), the fault returned at once, and
// the agents of the other sharers were never told; yet the slot had one
// reference left, so the next write fault on the origin, from any agent,
// let it write in place, and agent a, still reading the original slot for
// the second snapshot, saw the snapshot change. (Found by
// TestErrorInjection, seed 1912215370762065660.)
func TestRegressReverseFailedMoveOtherSharers(t *testing.T) {
	h := openFx(t, t.TempDir(), false)
	defer h.close()
	m := fxModel{}
	var err error
	for _, op := range []fxOp{
		opCreateReverse("R"),
		opWrite(0, "R", 0, pattern(1, 2*seg64)),
		opSnapshot([]string{"R"}, []string{"S1"}, false),
		opSnapshot([]string{"R"}, []string{"S2"}, false),
	} {
		if m, err = op.run(h, m); err != nil {
			t.Fatalf("%s: %v", op.name, err)
		}
	}
	if err := h.prepare(m); err != nil {
		t.Fatal(err)
	}
	// Agent b writes segments 0 and 1 of R: segment 0's copy goes well
	// and b writes it in place; segment 1's copy moves S1 and S2, and
	// b's first flush (for S1's Blocking move, covering its write to
	// segment 0) fails after the fact.
	f := h.agent.Load().Inject(faultinject.Fault{Ops: faultinject.OpFlush, Target: "agent/b/", Err: syscall.EIO, Durable: true})
	_, err = opWrite(1, "R", seg64/2, pattern(2, seg64)).run(h, m)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write through agent b: %v, want EIO", err)
	}
	if f.Fired() == 0 {
		t.Fatal("the flush fault did not fire")
	}
	h.agent.Load().ClearFaults()
	if err := h.c.RestartAgent(h.ctx, 1); err != nil {
		t.Fatal(err)
	}
	// Agent a writes segment 1 of R in place; the snapshots keep what R
	// held when they were taken, through both agents.
	if _, err := opWrite(0, "R", seg64+100, pattern(3, 300)).run(h, m); err != nil {
		t.Fatal(err)
	}
	for i := range h.c.Agents {
		for _, name := range []string{"S1", "S2"} {
			d, err := h.c.Agents[i].Open(h.ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(m[name].data))
			if err := d.ReadAt(h.ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			if j := firstDiff(got, m[name].data); j >= 0 {
				t.Errorf("agent %s: snapshot %s: byte %d (segment %d) reads %#x, want %#x", h.c.Agents[i].Name(), name, j, j/seg64, got[j], m[name].data[j])
			}
		}
	}
}

// A fill of the rest of a segment (fill-all) skipped the blocks that read
// zero in the layers under the entry, trusting the slot to read zero
// there; but an in-place stage whose commit failed (here: a store read at
// the start of the commit, after the agent wrote a whole segment into the
// top) had left its data in the sub-blocks the top lacked, and the filled
// entry read it. make soak found it; this is its seed.
func TestRegressFillRestOverFailedStage(t *testing.T) {
	outcomes := map[string]int{}
	var leaks int64
	if _, fired := errSoakSeed(t, 10873163516263344047, outcomes, &leaks); !fired {
		t.Fatalf("the seed's fault did not fire (outcomes %v): the history no longer reaches the case", outcomes)
	}
}
