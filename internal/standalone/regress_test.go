package standalone_test

// Regression tests for bugs a review found: each fails on the code before
// its fix.

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// gated holds agent reads while hold is set.
type gated struct {
	container.Container
	g *gate
}

type gate struct {
	hold    atomic.Bool
	release chan struct{}
	entered chan struct{}
}

func newGate() *gate { return &gate{release: make(chan struct{}), entered: make(chan struct{}, 100)} }

func (g *gated) ReadAt(p []byte, off int64) (int, error) {
	if g.g.hold.Load() {
		g.g.entered <- struct{}{}
		<-g.g.release
	}
	return g.Container.ReadAt(p, off)
}

func open(t *testing.T, agents []string, g *gate, slots uint64) *standalone.Cluster {
	t.Helper()
	c, err := standalone.Open(context.Background(), t.TempDir(), standalone.Options{
		Agents:         agents,
		Pool:           []standalone.PoolSpec{{SlotSize: seg64, Slots: slots, Count: 1}},
		CommandTimeout: time.Second,
		WrapAgentContainer: func(name string, ct container.Container) container.Container {
			if name == "b" || len(agents) == 1 {
				return &gated{ct, g}
			}
			return ct
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func fill(b byte) []byte { return bytes.Repeat([]byte{b}, seg64) }

// A command that fails (here: its context ends while an agent drains) detaches
// the agent silently; it keeps its writable entries for other disks, and a
// later snapshot of those disks does not tell it.
func TestRegressDetachKeepsWritable(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c := open(t, []string{"a", "b"}, g, 64)
	for _, n := range []string{"D", "E"} {
		if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: n, Size: 4 * seg64, SegmentSize: seg64}); err != nil {
			t.Fatal(err)
		}
	}
	b := c.Agents[1]
	hD, _ := b.Open(ctx, "D")
	hE, _ := b.Open(ctx, "E")
	must(t, hD.WriteAt(ctx, fill('d'), 0, false))
	must(t, hE.WriteAt(ctx, fill('A'), 0, false))
	g.hold.Store(true)
	go hD.ReadAt(ctx, make([]byte, 10), 0) // stays in flight
	<-g.entered
	g.hold.Store(false)
	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err := c.Ctrl.Snapshot(tctx, controller.SnapshotOptions{Sources: []string{"D"}, Names: []string{"D.s"}})
	cancel()
	t.Logf("snapshot D with short ctx: %v; agents now: %v", err, c.Ctrl.Agents())
	close(g.release)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"E"}, Names: []string{"E.s"}}); err != nil {
		t.Fatal(err)
	}
	werr := hE.WriteAt(ctx, fill('B'), 0, false)
	got := make([]byte, seg64)
	hs, err := c.Agents[0].Open(ctx, "E.s")
	must(t, err)
	must(t, hs.ReadAt(ctx, got, 0))
	ps, _ := c.Ctrl.Check(ctx)
	t.Logf("write to E after snapshot via detached agent: err=%v; check problems: %v", werr, ps)
	if got[0] != 'A' {
		t.Errorf("snapshot E.s changed after it was taken: reads %q, want 'A'", got[0])
	}
}

// A discard whose commit fails leaves Zero entries in agents: reads return
// zeros for data that is still there (and comes back after a re-attach).
func TestRegressDiscardFailLeavesZero(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c := open(t, []string{"a"}, g, 64)
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "D", Size: 4 * seg64, SegmentSize: seg64}); err != nil {
		t.Fatal(err)
	}
	a := c.Agents[0]
	h, _ := a.Open(ctx, "D")
	must(t, h.WriteAt(ctx, append(fill('x'), fill('y')...), 0, true))
	g.hold.Store(true)
	go h.ReadAt(ctx, make([]byte, 10), 0)
	<-g.entered
	g.hold.Store(false)
	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	err := h.Trim(tctx, seg64, seg64) // segment 1 only
	cancel()
	close(g.release)
	t.Logf("trim with short ctx: %v", err)
	got := make([]byte, 1)
	must(t, h.ReadAt(ctx, got, seg64))
	t.Logf("segment 1 read after failed trim: %q", got)
	must(t, c.RestartController(ctx))
	got2 := make([]byte, 1)
	must(t, h.ReadAt(ctx, got2, seg64))
	t.Logf("segment 1 read after controller restart: %q", got2)
	if got[0] != got2[0] {
		t.Errorf("segment 1 read %q, then %q with no write in between", got, got2)
	}
}

// Fault replies are dropped when any command reached the disk meanwhile; with
// another agent allocating, an agent's I/O can fail after 64 dropped replies.
func TestRegressReplyStarvation(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c := open(t, []string{"a", "b"}, g, 8192)
	const segs = 4096
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "D", Size: segs * seg64, SegmentSize: seg64}); err != nil {
		t.Fatal(err)
	}
	ha, _ := c.Agents[0].Open(ctx, "D")
	hb, _ := c.Agents[1].Open(ctx, "D")
	var wg sync.WaitGroup
	var fails, oks atomic.Int64
	var first atomic.Value
	for w := 0; w < 16; w++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for s := w; s < segs; s += 16 {
				hb.WriteAt(ctx, make([]byte, 512), uint64(s)*seg64, false)
			}
		}()
		go func() {
			defer wg.Done()
			for s := w; s < segs; s += 16 {
				if err := ha.ReadAt(ctx, make([]byte, 512), uint64(s)*seg64); err != nil {
					fails.Add(1)
					first.CompareAndSwap(nil, err.Error())
				} else {
					oks.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("reads by agent a: %d ok, %d failed (first: %v)", oks.Load(), fails.Load(), first.Load())
	if fails.Load() > 0 {
		t.Errorf("reads failed under contention")
	}
}

// Quiesce is not undone by a re-attach: after a controller restart between
// quiesce and activate, I/O hangs.
func TestRegressQuiesceSurvivesReattach(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c := open(t, []string{"a"}, g, 64)
	d, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "D", Size: 4 * seg64, SegmentSize: seg64})
	must(t, err)
	h, _ := c.Agents[0].Open(ctx, "D")
	must(t, c.Agents[0].Quiesce(ctx, protocol.DiskID(d.ID), 0)) // controller "crashes" here
	must(t, c.RestartController(ctx))
	tctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := h.ReadAt(tctx, make([]byte, 1), 0); err != nil {
		t.Errorf("read after controller restart: %v", err)
	}
}

type slowClose struct {
	*controller.Controller
	hold chan struct{}
}

func (s *slowClose) CloseDisk(ctx context.Context, agent string, id protocol.DiskID) error {
	<-s.hold
	return s.Controller.CloseDisk(ctx, agent, id)
}

// Close racing with Open of the same disk on one agent: the late CloseDisk
// unmaps the reopened disk in the controller, which then skips the agent.
func TestRegressCloseOpenRace(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c := open(t, []string{"a"}, g, 64)
	_, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "D", Size: 4 * seg64, SegmentSize: seg64})
	must(t, err)
	w := &slowClose{c.Ctrl, make(chan struct{})}
	ag := agent.New(agent.Config{Name: "w", Controller: w, OpenContainer: container.OpenURI})
	must(t, ag.Attach(ctx, w))
	defer ag.Close()
	h1, _ := ag.Open(ctx, "D")
	must(t, h1.WriteAt(ctx, fill('A'), 0, false))
	done := make(chan error)
	go func() { done <- h1.Close(ctx) }()
	time.Sleep(50 * time.Millisecond) // Close has forgotten the table, CloseDisk is held
	opened := make(chan *agent.Disk)
	go func() {
		h, err := ag.Open(ctx, "D") // must wait for the Close to finish
		if err != nil {
			t.Error(err)
		}
		opened <- h
	}()
	time.Sleep(50 * time.Millisecond)
	close(w.hold)
	must(t, <-done)
	h2 := <-opened
	must(t, h2.WriteAt(ctx, fill('A'), 0, false)) // loads a writable entry
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"D"}, Names: []string{"D.s"}}); err != nil {
		t.Fatal(err)
	}
	werr := h2.WriteAt(ctx, fill('B'), 0, false)
	hs, _ := c.Agents[0].Open(ctx, "D.s")
	got := make([]byte, 1)
	must(t, hs.ReadAt(ctx, got, 0))
	t.Logf("write after snapshot: %v; snapshot reads %q", werr, got)
	if got[0] != 'A' {
		t.Errorf("snapshot D.s changed after it was taken")
	}
}

// MoveForward commits the move to a zeroed slot before the whole-segment
// write lands: if the agent dies (or the write fails) in between, flushed
// old data is replaced by zeros.
func TestRegressMoveForwardLosesOld(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c := open(t, []string{"a"}, g, 64)
	d, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "D", Size: 4 * seg64, SegmentSize: seg64})
	must(t, err)
	h, _ := c.Agents[0].Open(ctx, "D")
	must(t, h.WriteAt(ctx, fill('O'), 0, true)) // flushed
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"D"}, Names: []string{"D.s"}}); err != nil {
		t.Fatal(err)
	}
	// The agent faults for a whole-segment write, gets the reply, and dies
	// before writing.
	r, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Reason: table.NoWrite, Whole: true})
	t.Logf("fault reply %v %v", r, err)
	must(t, c.RestartAgent(ctx, 0))
	h, _ = c.Agents[0].Open(ctx, "D")
	got := make([]byte, 1)
	must(t, h.ReadAt(ctx, got, 0))
	if got[0] != 'O' {
		t.Errorf("segment 0 reads %q after an unacknowledged write; want the flushed 'O'", got)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}
