package controller_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// gatedContainer stops the first ReadAt made through it once armed, until
// the test opens the gate: a copy-on-write copy that hangs, as one from a
// stalled storage node does.
type gatedContainer struct {
	container.Container
	g *gate
}

type gate struct {
	once    sync.Once
	mu      sync.Mutex
	armed   bool
	entered chan struct{} // closed when the armed read is held
	open    chan struct{} // closed by the test to let it go
}

func newGate() *gate {
	return &gate{entered: make(chan struct{}), open: make(chan struct{})}
}

// release opens the gate.
func (g *gate) release() { g.once.Do(func() { close(g.open) }) }

func (g *gate) arm() {
	g.mu.Lock()
	g.armed = true
	g.mu.Unlock()
}

func (c gatedContainer) ReadAt(p []byte, off int64) (int, error) {
	c.g.mu.Lock()
	hold := c.g.armed
	c.g.armed = false
	c.g.mu.Unlock()
	if hold {
		close(c.g.entered)
		<-c.g.open
	}
	return c.Container.ReadAt(p, off)
}

// TestFaultsRunInParallel: a fault whose copy hangs (its container does
// not answer) delays neither the faults of another disk nor those of
// other segments of its own disk, nor reads of the segment it copies.
// With one controller lock for every fault, each of these would wait for
// the hung copy.
//
// The copy is the controller's (Config.ControllerCopies) or the faulting
// agent's, in a staged write (the default); either way it is gated.
func TestFaultsRunInParallel(t *testing.T) {
	for _, ctrlCopies := range []bool{false, true} {
		t.Run(map[bool]string{false: "agent copies", true: "controller copies"}[ctrlCopies], func(t *testing.T) {
			testFaultsRunInParallel(t, ctrlCopies)
		})
	}
}

func testFaultsRunInParallel(t *testing.T, ctrlCopies bool) {
	ctx := context.Background()
	g := newGate()
	gated := func(ct container.Container) container.Container {
		if ct.SlotSize() == seg {
			return gatedContainer{ct, g}
		}
		return ct
	}
	opts := standalone.Options{
		Agents: []string{"host-a", "host-b"},
		// Disk a's segments are 64 KiB, disk b's 128 KiB: each has
		// its own container, and only a's is gated.
		Pool:             []standalone.PoolSpec{{SlotSize: seg, Slots: 64, Count: 1}, {SlotSize: 2 * seg, Slots: 64, Count: 1}},
		ControllerCopies: ctrlCopies,
	}
	if ctrlCopies {
		opts.WrapControllerContainer = gated
	} else {
		// host-a makes the copy; host-b reads the segment being copied.
		opts.WrapAgentContainer = func(agent string, ct container.Container) container.Container {
			if agent == "host-a" {
				return gated(ct)
			}
			return ct
		}
	}
	c, err := standalone.Open(ctx, t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	// Runs first: a failed test does not leave the copy hung, and Close
	// waiting for it.
	t.Cleanup(g.release)
	for _, o := range []controller.CreateOptions{
		{Name: "a", Size: 4 * seg, SegmentSize: seg, Policy: table.Forward},
		{Name: "b", Size: 4 * 2 * seg, SegmentSize: 2 * seg, Policy: table.Forward},
	} {
		if _, err := c.Ctrl.CreateDisk(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	a, b := openDisk(t, c, 0, "a"), openDisk(t, c, 0, "b")
	old := pattern(2*seg, 1)
	if err := a.WriteAt(ctx, old[:2*seg], 0, false); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteAt(ctx, old, 0, false); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a", "b"}, Names: []string{"a.s", "b.s"}}); err != nil {
		t.Fatal(err)
	}

	// A partial write to a's segment 0 copies it; the copy hangs.
	g.arm()
	hung := make(chan error, 1)
	go func() { hung <- a.WriteAt(ctx, []byte("new"), 0, false) }()
	select {
	case <-g.entered:
	case err := <-hung:
		t.Fatalf("the write returned %v before its copy was held", err)
	}

	done := func(what string, f func() error) {
		t.Helper()
		ch := make(chan error, 1)
		go func() { ch <- f() }()
		select {
		case err := <-ch:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s waited for a hung copy of another fault", what)
		}
	}
	done("a copy-on-write on another disk", func() error { return b.WriteAt(ctx, []byte("other"), 0, false) })
	done("a copy-on-write on another segment", func() error { return a.WriteAt(ctx, []byte("next"), seg, false) })
	a1 := openDisk(t, c, 1, "a")
	got := make([]byte, 16)
	done("a read fault on the segment being copied", func() error { return a1.ReadAt(ctx, got, 0) })
	if !bytes.Equal(got, old[:16]) {
		t.Fatalf("read of the segment being copied: got %x, want the old %x", got, old[:16])
	}

	g.release()
	if err := <-hung; err != nil {
		t.Fatalf("the held write: %v", err)
	}
	for _, r := range []struct {
		disk string
		off  uint64
		want []byte
	}{
		{"a", 0, append([]byte("new"), old[3:seg]...)},
		{"a", seg, append([]byte("next"), old[seg+4:2*seg]...)},
		{"a.s", 0, old[:2*seg]},
		{"b", 0, append([]byte("other"), old[5:]...)},
		{"b.s", 0, old},
	} {
		for _, ag := range []int{0, 1} {
			d := openDisk(t, c, ag, r.disk)
			p := make([]byte, len(r.want))
			if err := d.ReadAt(ctx, p, r.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, r.want) {
				t.Errorf("agent %d: %s at %d does not read what was written", ag, r.disk, r.off)
			}
		}
	}
}
