package controller_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// gateAgent is a fakeAgent whose commands, once armed, wait for release:
// an agent cut from the controller, which the controller waits for until
// its lease runs out.
type gateAgent struct {
	fakeAgent
	armed   atomic.Bool
	got     chan struct{} // closed at the first command while armed
	release chan struct{}
	once    atomic.Bool
}

func (g *gateAgent) hold() {
	if !g.armed.Load() {
		return
	}
	if g.once.CompareAndSwap(false, true) {
		close(g.got)
	}
	<-g.release
}

func (g *gateAgent) SetEntry(ctx context.Context, c protocol.SetEntry) error {
	g.hold()
	return g.fakeAgent.SetEntry(ctx, c)
}

func (g *gateAgent) SetEntryState(ctx context.Context, c protocol.SetEntryState) error {
	g.hold()
	return g.fakeAgent.SetEntryState(ctx, c)
}

// TestStagedCommitHiddenFirst: the commit of a staged write makes its data
// show through the new entry at once. While another agent mapping the
// disk has not dropped the old entry (here host-x, which answers no
// command: cut off, until its lease runs out), no agent may hold the new
// one: host-a, told it first, read the write still under way while
// host-x went on reading what the segment held before (TestLinearizable
// saw so). Every agent drops the entry first; then all are told.
func TestStagedCommitHiddenFirst(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	d := createDisk(t, c, "d", 2, table.Forward)
	h0 := openDisk(t, c, 0, "d")
	write(t, h0, pattern(seg, 1), 0)
	old := entry(t, c, "d", 0).Loc
	g := &gateAgent{got: make(chan struct{}), release: make(chan struct{})}
	if err := c.Ctrl.Attach(ctx, "host-x", g, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Open(ctx, "host-x", "d"); err != nil {
		t.Fatal(err)
	}
	snap(t, c, "d", "s")
	g.armed.Store(true)
	var released sync.Once
	free := func() { released.Do(func() { close(g.release) }) }
	defer free() // lest a failure leave the write, and the cluster's close, waiting
	done := make(chan error, 1)
	data := pattern(seg, 2)
	go func() { // a whole-segment write into a shared slot: staged
		done <- h0.WriteAt(ctx, data, 0, false)
	}()
	select {
	case <-g.got:
	case err := <-done:
		t.Fatalf("the write ended (%v) without telling host-x", err)
	case <-time.After(10 * time.Second):
		t.Fatal("host-x was never told of the write")
	}
	// host-x holds the command; host-a must not come to hold the new
	// entry meanwhile (it would be told side by side with host-x).
	for range 20 {
		es, err := c.Agents[0].GetEntry(ctx, protocol.DiskID(d.ID), 0, 1)
		if err != nil {
			t.Fatal(err)
		}
		if e := es[0]; e.Mapped() && e.Loc != old && !e.Is(table.Invalid) {
			t.Fatalf("host-a holds the new entry %v while host-x has not dropped the old one (%v)", e, old)
		}
		time.Sleep(10 * time.Millisecond)
	}
	free()
	if err := <-done; err != nil {
		t.Fatalf("write: %v", err)
	}
	expect(t, h0, 0, data)
	checkClean(t, c)
}
