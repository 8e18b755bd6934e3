package controller_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

func writeSlot(t *testing.T, c *standalone.Cluster, loc table.Location, p []byte) {
	t.Helper()
	ct, err := container.Open(filepath.Join(c.Dir, "containers", fmt.Sprintf("c%d", loc.Container)), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Close()
	if _, err := ct.WriteAt(p, int64(loc.Slot)*ct.SlotSize()); err != nil {
		t.Fatal(err)
	}
	if err := ct.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestStagedSlotNotZeroed: a slot handed out for a staged write is free in
// the store until its commit; zeroing a container's free slots (after
// something made them suspect: here another agent's re-attach dropped its
// stage) must leave it alone, or the staged write's data is lost.
func TestStagedSlotNotZeroed(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 16, Count: 1})
	d := createDisk(t, c, "d", 4, table.Forward)
	h0 := openDisk(t, c, 0, "d")
	openDisk(t, c, 1, "d")
	write(t, h0, pattern(2*seg, 1), 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	ra, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Whole: true})
	if err != nil || ra.Stage == nil {
		t.Fatalf("stage a: %+v %v", ra, err)
	}
	data := pattern(seg, 9)
	writeSlot(t, c, ra.Stage.Loc, data) // host-a writes its staged slot
	rb, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-b", Disk: protocol.DiskID(d.ID), Segment: 1, Count: 1, Op: protocol.FaultWrite, Whole: true})
	if err != nil || rb.Stage == nil {
		t.Fatalf("stage b: %+v %v", rb, err)
	}
	// host-b restarts: its staged write is dropped and zeroed cleared.
	if err := c.RestartAgent(ctx, 1); err != nil {
		t.Fatal(err)
	}
	// Any allocation from the container: ensureZeroedLocked.
	write(t, h0, []byte("x"), 2*seg)
	if _, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: ra.Stage.Token}); err != nil {
		t.Fatalf("commit: %v", err)
	}
	// The agent re-faults; read seg 0 fresh on a new agent.
	if err := c.RestartAgent(ctx, 1); err != nil {
		t.Fatal(err)
	}
	h1 := openDisk(t, c, 1, "d")
	expect(t, h1, 0, data)
}

// fakeAgent is an attached agent that answers every command, or fails
// SetEntry when told to.
type fakeAgent struct {
	failSet bool
	// failStates is how many SetEntryState commands fail next, as an
	// agent's that does not answer.
	failStates atomic.Int32
}

func (f *fakeAgent) NewTable(context.Context, protocol.Disk) error      { return nil }
func (f *fakeAgent) DeleteTable(context.Context, protocol.DiskID) error { return nil }
func (f *fakeAgent) SetEntryState(context.Context, protocol.SetEntryState) error {
	if f.failStates.Add(-1) >= 0 {
		return fmt.Errorf("agent stopped: %w", protocol.ErrUnavailable)
	}
	return nil
}
func (f *fakeAgent) Quiesce(context.Context, protocol.DiskID, time.Duration) error { return nil }
func (f *fakeAgent) Activate(context.Context, protocol.DiskID) error               { return nil }
func (f *fakeAgent) GetStatus(_ context.Context, id protocol.DiskID) (protocol.DiskStatus, error) {
	return protocol.DiskStatus{Disk: id}, nil
}
func (f *fakeAgent) GetEntry(context.Context, protocol.DiskID, uint64, uint64) ([]table.Entry, error) {
	return nil, nil
}
func (f *fakeAgent) SetEntry(context.Context, protocol.SetEntry) error {
	if f.failSet {
		// As the transport reports an agent that does not answer.
		return fmt.Errorf("agent stopped: %w", protocol.ErrUnavailable)
	}
	return nil
}

// TestCommitNeverFreesMappedSlot: a staged move commits only while the old
// slot is still shared. Once the snapshot is gone, another agent gets the
// old slot writable; the commit must then be stale, and the old slot stay
// mapped and counted, not be freed (and punched) under that agent.
func TestCommitNeverFreesMappedSlot(t *testing.T) {
	ctx := context.Background()
	c, d, fa, ra, old := stagedBesideFake(t, table.Forward)
	if err := c.Ctrl.DeleteDisk(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	rb, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-b", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite})
	if err != nil {
		t.Fatal(err)
	}
	if len(rb.Entries) != 1 || rb.Entries[0] != table.At(old, false) {
		t.Fatalf("host-b got %v, want %v writable", rb.Entries, old)
	}
	fa.failSet = true
	_, err = c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: ra.Stage.Token})
	if !errors.Is(err, protocol.ErrStale) {
		t.Errorf("commit once the old slot is the disk's alone: %v, want ErrStale", err)
	}
	if r := refs(t, c, old); r != 1 {
		t.Errorf("refs of the old slot, which host-b writes: %d, want 1", r)
	}
	if e := entry(t, c, "d", 0); e.Loc != old {
		t.Errorf("entry moved to %v", e)
	}
	checkClean(t, c)
}

// TestCommitAfterReverseIsStale: on a reverse-delta disk, another agent's
// partial write moves the snapshot to a copy and gets the old slot
// writable; a whole-segment write staged before it must not commit.
func TestCommitAfterReverseIsStale(t *testing.T) {
	ctx := context.Background()
	c, d, _, ra, old := stagedBesideFake(t, table.Reverse)
	rb, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-b", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite})
	if err != nil {
		t.Fatal(err)
	}
	if len(rb.Entries) != 1 || rb.Entries[0] != table.At(old, false) || entry(t, c, "s", 0).Loc == old {
		t.Fatalf("host-b got %v, snapshot at %v; want host-b writable at %v and the snapshot moved", rb.Entries, entry(t, c, "s", 0), old)
	}
	_, err = c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: ra.Stage.Token})
	if !errors.Is(err, protocol.ErrStale) {
		t.Errorf("commit after the reverse copy: %v, want ErrStale", err)
	}
	if r := refs(t, c, old); r != 1 {
		t.Errorf("refs of the old slot: %d, want 1", r)
	}
	checkClean(t, c)
}

// TestCommitAnsweredAgain: an agent that asks again for a commit whose
// answer it lost (a connection cut, a deadline passed while it was
// stopped) gets the same answer, not ErrStale: ErrStale would make it
// write the segment again, over writes that came since the commit.
func TestCommitAnsweredAgain(t *testing.T) {
	ctx := context.Background()
	c, d, _, ra, old := stagedBesideFake(t, table.Forward)
	f := protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: ra.Stage.Token}
	r1, err := c.Ctrl.Fault(ctx, f)
	if err != nil {
		t.Fatalf("commit: %v", err)
	}
	r2, err := c.Ctrl.Fault(ctx, f)
	if err != nil {
		t.Fatalf("the same commit asked again: %v, want its answer again", err)
	}
	if fmt.Sprint(r1) != fmt.Sprint(r2) {
		t.Errorf("the commit asked again answered %+v, the first time %+v", r2, r1)
	}
	if e := entry(t, c, "d", 0); e.Loc != ra.Stage.Loc {
		t.Errorf("entry at %v, want the staged slot %v", e, ra.Stage.Loc)
	}
	if r := refs(t, c, old); r != 1 {
		t.Errorf("refs of the old slot, the snapshot's alone: %d, want 1", r)
	}
	checkClean(t, c)
}

// TestCommitUntoldFailsForGood: a commit that landed but could not be
// told to every agent mapping the disk fails the write with ErrIO; the
// agent's unanswered peer must not turn it into an error the agent
// retries (Unavailable, Fenced) and then finds stale, and the commit
// asked again fails the same way.
func TestCommitUntoldFailsForGood(t *testing.T) {
	ctx := context.Background()
	c, d, fa, ra, _ := stagedBesideFake(t, table.Forward)
	fa.failSet = true
	f := protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: ra.Stage.Token}
	for try := range 2 {
		_, err := c.Ctrl.Fault(ctx, f)
		if !errors.Is(err, protocol.ErrIO) || errors.Is(err, protocol.ErrUnavailable) || errors.Is(err, protocol.ErrFenced) || errors.Is(err, protocol.ErrStale) {
			t.Errorf("commit (try %d) with an agent that does not answer: %v, want ErrIO alone", try, err)
		}
	}
}

// stagedBesideFake sets up disk "d" of the given policy, written at
// segment 0 (slot old), mapped by host-a and by a fake agent host-b,
// snapshotted to "s"; host-a then stages a whole-segment write to segment
// 0 (ra) and writes its slot.
func stagedBesideFake(t *testing.T, p table.Policy) (c *standalone.Cluster, d meta.Disk, fa *fakeAgent, ra protocol.Reply, old table.Location) {
	t.Helper()
	ctx := context.Background()
	c = newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 16, Count: 1})
	d = createDisk(t, c, "d", 4, p)
	write(t, openDisk(t, c, 0, "d"), pattern(seg, 1), 0)
	old = entry(t, c, "d", 0).Loc
	fa = &fakeAgent{}
	if err := c.Ctrl.Attach(ctx, "host-b", fa, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Open(ctx, "host-b", "d"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	ra, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Whole: true})
	if err != nil || ra.Stage == nil {
		t.Fatalf("stage a: %+v %v", ra, err)
	}
	writeSlot(t, c, ra.Stage.Loc, pattern(seg, 9))
	return c, d, fa, ra, old
}
