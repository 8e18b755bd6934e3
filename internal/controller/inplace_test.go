package controller_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// fillInPlace sets up disk "d" whose segment 0 is partial (a small write
// after a snapshot), mapped by host-a and by a fake agent host-x, which
// then stages a whole-segment write of segment 0: a fill in place (its
// stage is the entry's own slot). It returns host-x's commit.
func fillInPlace(t *testing.T, breakAfter time.Duration) (c *standalone.Cluster, d meta.Disk, commit protocol.Fault) {
	t.Helper()
	c, d, r := stageFillInPlace(t, breakAfter, 0, &fakeAgent{})
	// host-x writes the slot in place: at once, host-a reads what it
	// wrote over the sub-blocks the slot holds.
	writeSlot(t, c, r.Stage.Loc, pattern(seg, 9))
	return c, d, protocol.Fault{Agent: "host-x", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: r.Stage.Token}
}

// stageFillInPlace is fillInPlace up to the stage: host-x's (fa's) write
// fault (with id, if not 0) and its answer, the slot not written yet. A
// fill that stays staged breakAfter is taken back by the next write.
func stageFillInPlace(t *testing.T, breakAfter time.Duration, id uint64, fa *fakeAgent) (c *standalone.Cluster, d meta.Disk, r protocol.Reply) {
	t.Helper()
	ctx := context.Background()
	c = newClusterOpts(t, standalone.Options{FillBreakAfter: breakAfter})
	d = createDisk(t, c, "d", 2, table.Forward)
	h0 := openDisk(t, c, 0, "d")
	write(t, h0, pattern(seg, 1), 0)
	snap(t, c, "d", "s")
	write(t, h0, pattern(100, 2), sub+50)
	e := entry(t, c, "d", 0)
	if !e.Partial() {
		t.Fatalf("entry after a small write into a shared segment: %v, want partial", e)
	}
	if err := c.Ctrl.Attach(ctx, "host-x", fa, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Open(ctx, "host-x", "d"); err != nil {
		t.Fatal(err)
	}
	r, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-x", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Whole: true, ID: id})
	if err != nil || r.Stage == nil || r.Stage.Loc != e.Loc {
		t.Fatalf("whole-segment write of a partial segment: %+v %v; want a stage in place at %v", r, err, e.Loc)
	}
	return c, d, r
}

// TestFillInPlaceKeptAcrossReattach: an agent cut from the controller
// after it wrote a fill in place re-attaches (with the disk still open)
// and sends its commit again: the commit lands. Answered stale, the agent
// would write the segment again, over what host-a wrote meanwhile to the
// sub-blocks it had read from the fill (TestLinearizable saw a write land
// twice so). A new process under the agent's name (no disk open) has
// lost the stage: its slot goes back, and the old token is stale.
func TestFillInPlaceKeptAcrossReattach(t *testing.T) {
	ctx := context.Background()
	c, d, commit := fillInPlace(t, 0)
	if err := c.Ctrl.Attach(ctx, "host-x", &fakeAgent{}, []protocol.DiskID{protocol.DiskID(d.ID)}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Fault(ctx, commit); err != nil {
		t.Fatalf("commit of a fill in place after the agent re-attached: %v, want it to land", err)
	}
	if e := entry(t, c, "d", 0); e.Partial() {
		t.Errorf("entry after the fill's commit: %v, want whole", e)
	}
	checkClean(t, c)

	c2, _, commit2 := fillInPlace(t, 0)
	if err := c2.Ctrl.Attach(ctx, "host-x", &fakeAgent{}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Ctrl.Open(ctx, "host-x", "d"); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Ctrl.Fault(ctx, commit2); !errors.Is(err, protocol.ErrStale) {
		t.Errorf("commit of an agent's fill in place after a new process took its name: %v, want ErrStale", err)
	}
	if e := entry(t, c2, "d", 0); !e.Partial() {
		t.Errorf("entry after a dropped fill: %v, want partial still", e)
	}
	// The segment is not held by the dropped fill: another write to
	// it is not kept waiting.
	h1 := openDisk(t, c2, 1, "d")
	write(t, h1, pattern(sub, 3), 8*sub)
	checkClean(t, c2)
}

// TestFillInPlaceTakenBackFails: a fill in place whose agent is slow to
// commit is taken back by another agent's write to the segment; the
// commit that comes at last fails with ErrIO, not ErrStale: the agent
// would write the segment again, over the write the break let through,
// which may have overwritten what the fill wrote in place and others
// read.
func TestFillInPlaceTakenBackFails(t *testing.T) {
	ctx := context.Background()
	c, _, commit := fillInPlace(t, 300*time.Millisecond)
	h1 := openDisk(t, c, 1, "d")
	write(t, h1, pattern(sub, 3), 8*sub) // waits for the fill, then breaks it
	for try := range 2 {
		_, err := c.Ctrl.Fault(ctx, commit)
		if !errors.Is(err, protocol.ErrIO) || errors.Is(err, protocol.ErrStale) {
			t.Errorf("commit (try %d) of a fill in place taken back: %v, want ErrIO, not ErrStale", try, err)
		}
	}
	checkClean(t, c)
}

// TestFillInPlaceWaitedFor: a fill in place whose agent is slow to
// commit (its storage node restarting, its controller failing over) is
// waited for by another write to the segment, longer than a second, and
// its commit lands: the pause is not turned into an error. Before, the
// next write took a fill back after one second, and the kill storm saw
// fio's write fail with EIO after a storage node's 1.5 s restart.
func TestFillInPlaceWaitedFor(t *testing.T) {
	ctx := context.Background()
	c, _, commit := fillInPlace(t, time.Minute)
	h1 := openDisk(t, c, 1, "d")
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		write(t, h1, pattern(sub, 3), 8*sub)
	}()
	select {
	case <-wrote:
		t.Fatal("a write went through a segment being filled in place")
	case <-time.After(1500 * time.Millisecond):
	}
	if _, err := c.Ctrl.Fault(ctx, commit); err != nil {
		t.Fatalf("commit of a fill in place waited for: %v, want it to land", err)
	}
	<-wrote
	checkClean(t, c)
}

// TestFillInPlaceAnsweredAgain: a write fault sent again with its id
// (its answer lost, the agent re-attached) gets its fill in place again,
// the same stage, at once; another fault of the same agent (another
// write) waits for it as any write does.
func TestFillInPlaceAnsweredAgain(t *testing.T) {
	ctx := context.Background()
	c, d, r := stageFillInPlace(t, time.Minute, 42, &fakeAgent{})
	again, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-x", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Whole: true, ID: 42})
	if err != nil || again.Stage == nil || *again.Stage != *r.Stage {
		t.Fatalf("the fault sent again: %+v %v; want its stage again, %+v", again, err, r.Stage)
	}
	other := make(chan error, 1)
	go func() {
		_, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-x", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Whole: true, ID: 43})
		other <- err
	}()
	select {
	case err := <-other:
		t.Fatalf("another write fault of the agent was answered while the fill is staged: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	writeSlot(t, c, r.Stage.Loc, pattern(seg, 9))
	if _, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-x", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: r.Stage.Token}); err != nil {
		t.Fatalf("commit of the stage answered twice: %v", err)
	}
	if err := <-other; err != nil {
		t.Fatalf("the other write after the commit: %v", err)
	}
}

// TestFillInPlaceTakeBackRetried: a take-back whose command to the agents
// fails (an agent does not answer) leaves the fill staged, and the next
// try takes it back for good: the segment is written, and the fill's
// commit fails with IO. Before, the failed try dropped the stage and left
// its claim, and every later write to the segment waited for good.
func TestFillInPlaceTakeBackRetried(t *testing.T) {
	ctx := context.Background()
	fa := &fakeAgent{}
	c, d, r := stageFillInPlace(t, 200*time.Millisecond, 0, fa)
	writeSlot(t, c, r.Stage.Loc, pattern(seg, 9))
	fa.failStates.Store(1)
	h1 := openDisk(t, c, 1, "d")
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var err error
	for try := 0; try < 3; try++ {
		if err = h1.WriteAt(wctx, pattern(sub, 3), 8*sub, false); err == nil {
			break
		}
		t.Logf("write %d: %v", try, err)
	}
	if err != nil {
		t.Fatalf("write to a segment whose fill's first take-back failed: %v", err)
	}
	if fa.failStates.Load() >= 0 {
		t.Fatal("the take-back's command was not failed once: the test did not test it")
	}
	commit := protocol.Fault{Agent: "host-x", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: r.Stage.Token}
	if _, err := c.Ctrl.Fault(ctx, commit); !errors.Is(err, protocol.ErrIO) || errors.Is(err, protocol.ErrStale) {
		t.Errorf("commit of the fill taken back: %v, want ErrIO, not ErrStale", err)
	}
	checkClean(t, c)
}
