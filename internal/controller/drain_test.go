package controller_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// drainFixture is a family on the default pool (containers 1 and 2, used
// round robin) whose entries name slots of container 1 in every way one
// can: whole and exclusive, shared with a snapshot, as the top and as a
// layer of partial entries. want holds what each disk must read.
type drainFixture struct {
	c    *standalone.Cluster
	h0   *agent.Disk // "d" on host-a
	h1   *agent.Disk // "d" on host-b
	want map[string][]byte
}

const drainSegs = 8

// newDrainFixture builds the fixture; with oneAgent, only host-a maps
// "d" (so its map changes are kept in memory until a flush), else both.
// The controller's writes (its copies) are slowed down so that writes
// of the test's writers meet the drain.
func newDrainFixture(t *testing.T, opts standalone.Options, oneAgent bool) *drainFixture {
	t.Helper()
	opts.WrapControllerContainer = func(ct container.Container) container.Container { return slowWrites{ct} }
	c := newClusterOpts(t, opts)
	createDisk(t, c, "d", drainSegs, table.Forward)
	f := &drainFixture{c: c, h0: openDisk(t, c, 0, "d"), want: map[string][]byte{}}
	f.h1 = f.h0
	if !oneAgent {
		f.h1 = openDisk(t, c, 1, "d")
	}
	d := pattern(drainSegs*seg, 1)
	write(t, f.h0, d, 0)
	snap(t, c, "d", "s1")
	f.want["s1"] = bytes.Clone(d)
	// Partial entries over the snapshot's slots, in segments 1 to 4
	// (tops and bases on either container), a whole new slot in 5,
	// and a second snapshot that shares some of them.
	for s := uint64(1); s <= 4; s++ {
		p := pattern(300, byte(20+s))
		write(t, f.h1, p, s*seg+s*sub+5)
		copy(d[s*seg+s*sub+5:], p)
	}
	p := pattern(seg, 30)
	write(t, f.h0, p, 5*seg)
	copy(d[5*seg:], p)
	snap(t, c, "d", "s2")
	f.want["s2"] = bytes.Clone(d)
	p = pattern(200, 31)
	write(t, f.h0, p, 2*seg+9*sub) // a second layer over segment 2
	copy(d[2*seg+9*sub:], p)
	f.want["d"] = d

	partial, shared := false, false
	for s := range uint64(drainSegs) {
		e := entry(t, c, "d", s)
		if names(e, 1) && e.Partial() {
			partial = true
		}
		if e.Partial() && e.Part.Under[0].Loc.Container == 1 || !e.Partial() && e.Loc.Container == 1 && refs(t, c, e.Loc) > 1 {
			shared = true
		}
	}
	if !partial || !shared {
		t.Fatalf("fixture: container 1 holds partial entries: %v, shared slots: %v; want both", partial, shared)
	}
	return f
}

// slowWrites makes every write to a container take a while.
type slowWrites struct{ container.Container }

func (s slowWrites) WriteAt(p []byte, off int64) (int, error) {
	time.Sleep(2 * time.Millisecond)
	return s.Container.WriteAt(p, off)
}

func names(e table.Entry, id uint32) bool {
	found := false
	e.Slots(func(l table.Location) { found = found || l.Container == id })
	return found
}

// writer writes small patterns to random places of "d" through h until
// stop is closed or n writes are done, keeping want (under mu) in step.
func (f *drainFixture) writer(t *testing.T, h *agent.Disk, seed uint64, n int, stop <-chan struct{}, mu *sync.Mutex, count *atomic.Int64) {
	r := rand.New(rand.NewPCG(seed, 1))
	for i := 0; i < n; i++ {
		select {
		case <-stop:
			return
		default:
		}
		// Writers of seed 1 and 2 write disjoint sub-blocks: two
		// writes to one place at once may land in either order.
		p := pattern(1+r.IntN(sub), byte(i))
		blk := r.Uint64N(drainSegs*seg/sub/2)*2 + seed%2
		off := blk*sub + r.Uint64N(sub-uint64(len(p))+1)
		if err := h.WriteAt(context.Background(), p, off, false); err != nil {
			t.Errorf("write during the drain: %v", err)
			return
		}
		mu.Lock()
		copy(f.want["d"][off:], p)
		mu.Unlock()
		count.Add(1)
	}
}

// verify checks every disk's contents on both agents, check, and that
// container 1 holds no slot and no entry names it.
func (f *drainFixture) verify(t *testing.T) {
	t.Helper()
	c := f.c
	expect(t, f.h0, 0, f.want["d"])
	expect(t, f.h1, 0, f.want["d"])
	for _, s := range []string{"s1", "s2"} {
		expect(t, openDisk(t, c, 1, s), 0, f.want[s])
	}
	checkClean(t, c)
	for _, name := range []string{"d", "s1", "s2"} {
		for s := range uint64(drainSegs) {
			if e := entry(t, c, name, s); names(e, 1) {
				t.Errorf("%s segment %d still names container 1: %v", name, s, e)
			}
		}
	}
	if ct := containerRec(t, c, 1); ct.Used != 0 || ct.State != meta.ContainerDraining {
		t.Errorf("container 1 after the drain: %d slots used, %v; want 0, draining", ct.Used, ct.State)
	}
}

func containerRec(t *testing.T, c *standalone.Cluster, id uint32) meta.Container {
	t.Helper()
	cs, err := c.Ctrl.ListContainers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, ct := range cs {
		if ct.ID == id {
			return ct
		}
	}
	t.Fatalf("no container %d in %+v", id, cs)
	return meta.Container{}
}

// TestDrain drains a container holding exclusive, shared and partial
// slots while two agents keep writing the disk: every disk and snapshot
// reads back what it should, check is clean, the container holds nothing
// and can be removed; before, its removal is refused.
func TestDrain(t *testing.T) {
	ctx := context.Background()
	for _, opts := range []struct {
		name     string
		o        standalone.Options
		oneAgent bool
	}{
		{"one agent", standalone.Options{}, true},
		{"two agents", standalone.Options{}, false},
		{"sync maps", standalone.Options{SyncMaps: true}, true},
	} {
		t.Run(opts.name, func(t *testing.T) {
			f := newDrainFixture(t, opts.o, opts.oneAgent)
			c := f.c
			used := containerRec(t, c, 1).Used
			err := c.Ctrl.RemoveContainer(ctx, 1)
			if !errors.Is(err, controller.ErrContainerInUse) || !strings.Contains(err.Error(), "holds") {
				t.Fatalf("remove of a container in use: %v, want ErrContainerInUse with its count", err)
			}
			if st := containerRec(t, c, 1).State; st != meta.ContainerOnline {
				t.Fatalf("a refused remove left the container %v", st)
			}

			var (
				mu      sync.Mutex
				wg      sync.WaitGroup
				stop    = make(chan struct{})
				writes  atomic.Int64
				writers atomic.Int32
			)
			writers.Add(1)
			wg.Go(func() { defer writers.Add(-1); f.writer(t, f.h0, 1, 2000, stop, &mu, &writes) })
			if f.h1 != f.h0 {
				writers.Add(1)
				wg.Go(func() { defer writers.Add(-1); f.writer(t, f.h1, 2, 2000, stop, &mu, &writes) })
			}
			var last, total uint64
			err = c.Ctrl.Drain(ctx, 1, func(d, n uint64) {
				last, total = d, n
				// Between segments: the writers go on (the
				// drain holds no lock here) for 10 more
				// writes, so that some meet later segments'
				// moves whatever the machine's speed.
				for w0 := writes.Load(); writes.Load() < w0+10 && writers.Load() > 0; {
					time.Sleep(time.Millisecond)
				}
			})
			close(stop)
			wg.Wait()
			if err != nil {
				t.Fatal(err)
			}
			if last != total || last < used {
				t.Errorf("progress ended at %d of %d; %d slots were used", last, total, used)
			}
			f.verify(t)
			// Nothing lands on a draining container.
			write(t, f.h1, pattern(seg, 40), 6*seg)
			copy(f.want["d"][6*seg:], pattern(seg, 40))
			if e := entry(t, c, "d", 6); names(e, 1) {
				t.Errorf("a write after the drain mapped %v", e)
			}

			if err := c.Ctrl.RemoveContainer(ctx, 1); err != nil {
				t.Fatalf("remove a drained container: %v", err)
			}
			cs, err := c.Ctrl.ListContainers(ctx)
			if err != nil || len(cs) != 1 || cs[0].ID != 2 {
				t.Fatalf("containers after the remove: %+v, %v", cs, err)
			}
			if err := c.Ctrl.RemoveContainer(ctx, 1); !errors.Is(err, meta.ErrNotFound) {
				t.Errorf("remove again: %v, want not found", err)
			}
			expect(t, f.h0, 0, f.want["d"])
			checkClean(t, c)
		})
	}
}

// TestDrainResumes interrupts a drain half way (its context cancelled),
// and checks that the container stays draining, gets no new slot, and
// that after a controller restart (or crash) the drain finishes with
// nothing lost: resumed by the new controller by itself, and run again
// alongside.
func TestDrainResumes(t *testing.T) {
	for _, crash := range []bool{false, true} {
		name := map[bool]string{false: "restart", true: "crash"}[crash]
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			// One move at a time, so that the cancel lands half way.
			f := newDrainFixture(t, standalone.Options{SyncMaps: crash, DrainMoves: 1}, false)
			c := f.c
			dctx, cancel := context.WithCancel(ctx)
			var first uint64
			err := c.Ctrl.Drain(dctx, 1, func(d, n uint64) {
				if first == 0 {
					first = d
				}
				if d >= 2 {
					cancel()
				}
			})
			cancel()
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("interrupted drain: %v, want context.Canceled", err)
			}
			ct := containerRec(t, c, 1)
			if ct.State != meta.ContainerDraining || ct.Used == 0 {
				t.Fatalf("container 1 after an interrupted drain: %+v; want draining, with slots left", ct)
			}
			// New slots land on container 2 only.
			write(t, f.h0, pattern(seg, 50), 7*seg)
			copy(f.want["d"][7*seg:], pattern(seg, 50))
			if e := entry(t, c, "d", 7); names(e, 1) {
				t.Errorf("a write to a draining container's pool mapped %v", e)
			}
			if crash {
				err = c.CrashController(ctx)
			} else {
				err = c.RestartController(ctx)
			}
			if err != nil {
				t.Fatal(err)
			}
			if st := containerRec(t, c, 1).State; st != meta.ContainerDraining {
				t.Fatalf("container 1 after a restart: %v, want draining", st)
			}
			var (
				mu     sync.Mutex
				wg     sync.WaitGroup
				stop   = make(chan struct{})
				writes atomic.Int64
			)
			wg.Go(func() { f.writer(t, f.h1, 2, 2000, stop, &mu, &writes) })
			if crash {
				// The restarted controller resumes the drain by
				// itself (ResumeDrains).
				err = waitDrained(ctx, c, 1)
			} else {
				// Run again, alongside the resumed one.
				err = c.Ctrl.Drain(ctx, 1, nil)
			}
			close(stop)
			wg.Wait()
			if err != nil {
				t.Fatal(err)
			}
			f.verify(t)
			if err := c.Ctrl.RemoveContainer(ctx, 1); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// waitDrained waits until container id holds no slot.
func waitDrained(ctx context.Context, c *standalone.Cluster, id uint32) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		cs, err := c.Ctrl.ListContainers(ctx)
		if err != nil {
			return err
		}
		for _, ct := range cs {
			if ct.ID == id && ct.Used == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("container %d not drained: %w", id, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestRemoveContainer: a container that never held a slot is removed
// even online; one that holds slots is refused with their count; a
// drain of a missing container or of a failed one is refused.
func TestRemoveContainer(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	if err := c.AddContainer(ctx, 3, seg, 16); err != nil {
		t.Fatal(err)
	}
	createDisk(t, c, "d", 4, table.Forward)
	write(t, openDisk(t, c, 0, "d"), pattern(4*seg, 1), 0)
	commitPending(t, c)
	for _, id := range []uint32{1, 2, 3} {
		if containerRec(t, c, id).Used == 0 {
			continue
		}
		err := c.Ctrl.RemoveContainer(ctx, id)
		if !errors.Is(err, controller.ErrContainerInUse) {
			t.Errorf("remove container %d in use: %v", id, err)
		}
	}
	if err := c.Ctrl.Drain(ctx, 9, nil); !errors.Is(err, meta.ErrNotFound) {
		t.Errorf("drain of a missing container: %v", err)
	}
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error {
		_, err := tx.SetContainerState(2, meta.ContainerFailed)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.Ctrl.Drain(ctx, 2, nil); !errors.Is(err, controller.ErrContainerFailed) {
		t.Errorf("drain of a failed container: %v", err)
	}
	// Container 3's slots do not fit on container 1 alone (2 is
	// failed): refused, and left online.
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error {
		u, err := tx.Container(1)
		if err != nil {
			return err
		}
		for s := uint32(0); uint64(s) < u.Slots; s++ {
			if n, err := tx.Refs(table.Location{Container: 1, Slot: s}); err != nil {
				return err
			} else if n == 0 {
				if err := tx.SetRefs(table.Location{Container: 1, Slot: s}, 1); err != nil {
					return err
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if containerRec(t, c, 3).Used == 0 {
		t.Fatal("container 3 holds no slot")
	}
	if err := c.Ctrl.Drain(ctx, 3, nil); !errors.Is(err, protocol.ErrNoSpace) || !strings.Contains(err.Error(), "have 0 free") {
		t.Errorf("drain with no room elsewhere: %v, want ErrNoSpace", err)
	}
	if st := containerRec(t, c, 3).State; st != meta.ContainerOnline {
		t.Errorf("a drain refused for space left the container %v", st)
	}
	if _, err := c.Ctrl.Repair(ctx); err != nil {
		t.Fatal(err)
	}
	// A container with no slot used goes, online as it is.
	if err := c.AddContainer(ctx, 4, seg, 16); err != nil {
		t.Fatal(err)
	}
	if err := c.Ctrl.RemoveContainer(ctx, 4); err != nil {
		t.Errorf("remove an empty online container: %v", err)
	}
	checkClean(t, c)
}

// TestDrainLeakedSlot: a used slot that no entry names (a leak, which
// check reports) stops the drain with ErrDrainStuck once everything
// else has moved, rather than waiting for it; once check --repair has
// reclaimed it, the drain ends.
func TestDrainLeakedSlot(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "d", 4, table.Forward)
	h := openDisk(t, c, 0, "d")
	want := pattern(4*seg, 3)
	write(t, h, want, 0)
	leaked := table.Location{Container: 1, Slot: 60}
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error { return tx.SetRefs(leaked, 1) }); err != nil {
		t.Fatal(err)
	}
	err := c.Ctrl.Drain(ctx, 1, nil)
	if !errors.Is(err, controller.ErrDrainStuck) || !strings.Contains(err.Error(), "1 slots used that no table entry names") {
		t.Fatalf("drain with a leaked slot: %v, want ErrDrainStuck naming it", err)
	}
	if _, err := c.Ctrl.Repair(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Ctrl.Drain(ctx, 1, nil); err != nil {
		t.Fatalf("drain after the repair: %v", err)
	}
	expect(t, h, 0, want)
	checkClean(t, c)
	if ct := containerRec(t, c, 1); ct.Used != 0 {
		t.Errorf("container 1 holds %d slots", ct.Used)
	}
}

// TestDrainRacingWrite holds a drain in its copy of a segment (the
// controller's read of the old slot is gated) and checks, with both
// agents mapping the disk: reads through a loaded entry go on meanwhile
// and see the data; a read that faults waits (the publish lock) and
// a write after it too, and it lands, once the move is over, in the new
// slot: nothing is lost.
func TestDrainRacingWrite(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c := newClusterOpts(t, standalone.Options{
		WrapControllerContainer: func(ct container.Container) container.Container { return gatedContainer{ct, g} },
	})
	t.Cleanup(g.release) // before the cluster's Close, which waits for the drain
	createDisk(t, c, "d", 2, table.Forward)
	h0 := openDisk(t, c, 0, "d")
	want := pattern(2*seg, 5)
	write(t, h0, want, 0)
	h1 := openDisk(t, c, 1, "d") // its entries Invalid: its first read faults
	s := uint64(0)
	if entry(t, c, "d", 0).Loc.Container != 1 {
		s = 1
	}
	if e := entry(t, c, "d", s); e.Loc.Container != 1 {
		t.Fatalf("no segment on container 1: %v", e)
	}

	g.arm()
	drained := make(chan error, 1)
	go func() { drained <- c.Ctrl.Drain(ctx, 1, nil) }()
	<-g.entered // copying segment s: the agents have No-write
	expect(t, h0, s*seg, want[s*seg:(s+1)*seg])
	// host-b has not loaded the entry: its read faults, and must not
	// be answered with the old entry, writable, from the store (its
	// write after would land in the old slot, after the copy).
	p := pattern(3000, 6)
	got := make([]byte, seg)
	wrote := make(chan error, 1)
	go func() {
		if err := h1.ReadAt(ctx, got, s*seg); err != nil {
			wrote <- err
			return
		}
		wrote <- h1.WriteAt(ctx, p, s*seg+100, false)
	}()
	select {
	case err := <-wrote:
		t.Fatalf("a read fault and a write on the segment being moved completed during the copy: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if e := agentEntry(t, c, 1, h1, s); !e.Is(table.Invalid) {
		t.Errorf("host-b was given %v during the move", e)
	}
	g.release()
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[s*seg:(s+1)*seg]) {
		t.Errorf("host-b's read during the move did not see the segment's data")
	}
	copy(want[s*seg+100:], p)
	expect(t, h0, 0, want)
	expect(t, h1, 0, want)
	if e := entry(t, c, "d", s); names(e, 1) {
		t.Errorf("segment %d still on container 1: %v", s, e)
	}
	checkClean(t, c)
}
