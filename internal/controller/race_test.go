package controller_test

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// heldAgent is an attached agent that answers every command at once,
// except the first command of the armed kind on the armed disk once
// armed: that one it holds until the test releases it. It stands for an
// agent that is slow to confirm a command, which leaves the controller
// half way through a change (committed and not yet told, or told the
// restrictive half and not yet committed).
type heldAgent struct {
	mu      sync.Mutex
	kind    string // "SetEntry", "SetEntryState", "DeleteTable", "NewTable"
	disk    protocol.DiskID
	armed   bool
	entered chan struct{}
	open    chan struct{}
	once    sync.Once
}

func newHeldAgent() *heldAgent {
	return &heldAgent{entered: make(chan struct{}), open: make(chan struct{})}
}

func (h *heldAgent) arm(kind string, disk meta.DiskID) {
	h.mu.Lock()
	h.kind, h.disk, h.armed = kind, protocol.DiskID(disk), true
	h.mu.Unlock()
}

func (h *heldAgent) release() { h.once.Do(func() { close(h.open) }) }

func (h *heldAgent) hold(kind string, disk protocol.DiskID) {
	h.mu.Lock()
	hold := h.armed && h.kind == kind && h.disk == disk
	if hold {
		h.armed = false
	}
	h.mu.Unlock()
	if hold {
		close(h.entered)
		<-h.open
	}
}

func (h *heldAgent) NewTable(_ context.Context, d protocol.Disk) error {
	h.hold("NewTable", d.ID)
	return nil
}
func (h *heldAgent) DeleteTable(_ context.Context, id protocol.DiskID) error {
	h.hold("DeleteTable", id)
	return nil
}
func (h *heldAgent) SetEntryState(_ context.Context, c protocol.SetEntryState) error {
	h.hold("SetEntryState", c.Disk)
	return nil
}
func (h *heldAgent) SetEntry(_ context.Context, c protocol.SetEntry) error {
	h.hold("SetEntry", c.Disk)
	return nil
}
func (h *heldAgent) Quiesce(context.Context, protocol.DiskID, time.Duration) error { return nil }
func (h *heldAgent) Activate(context.Context, protocol.DiskID) error               { return nil }
func (h *heldAgent) GetStatus(_ context.Context, id protocol.DiskID) (protocol.DiskStatus, error) {
	h.hold("GetStatus", id)
	return protocol.DiskStatus{Disk: id}, nil
}
func (h *heldAgent) GetEntry(_ context.Context, _ protocol.DiskID, _, n uint64) ([]table.Entry, error) {
	return make([]table.Entry, n), nil
}

// attachFake attaches agent a as name, mapping the disks named.
func attachFake(t *testing.T, c *standalone.Cluster, name string, a protocol.Agent, disks ...string) {
	t.Helper()
	ctx := context.Background()
	if err := c.Ctrl.Attach(ctx, name, a, nil); err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		if _, err := c.Ctrl.Open(ctx, name, d); err != nil {
			t.Fatal(err)
		}
	}
}

// TestReadFaultSeesNoHalfChange: a read fault answered while a change is
// half way through (committed and some agent not yet told; or agents told
// the restrictive half and the commit not made) must not hand out a
// writable entry. The agent would install it (no command reached it while
// its fault was out) and write straight through it: after an allocation
// or a copy on write, acknowledging a write that an agent not yet moved
// would not read; during a snapshot, writing in place into a slot the
// snapshot is about to share (the snapshot changes); during a discard,
// writing into a slot about to be freed and handed to another disk;
// during a reverse copy, writing into the slot the snapshot still reads.
// A read fault may instead wait for the change, or answer what was true
// before it with writes forbidden.
//
// Each case holds the change half way by having an agent ("slow") not
// answer its command, then asks for the segment with a read fault from
// another agent ("reader"). The read fault is given a while to answer;
// one that waits for the change passes.
func TestReadFaultSeesNoHalfChange(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy table.Policy
		// prepare runs before the change; change starts it; kind is
		// the command of "slow" that it stops at, on disk held.
		written, snap bool
		kind          string
		held          string
		change        func(ctx context.Context, c *standalone.Cluster, d meta.Disk) error
	}{
		{name: "allocate", kind: "SetEntry", held: "d", change: writeFault},
		{name: "forward copy", written: true, snap: true, kind: "SetEntry", held: "d", change: writeFault},
		{name: "reverse copy", policy: table.Reverse, written: true, snap: true, kind: "SetEntry", held: "d@1", change: writeFault},
		{name: "snapshot", written: true, kind: "SetEntryState", held: "d", change: func(ctx context.Context, c *standalone.Cluster, _ meta.Disk) error {
			_, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@2"}})
			return err
		}},
		{name: "discard", written: true, kind: "SetEntryState", held: "d", change: func(ctx context.Context, c *standalone.Cluster, d meta.Disk) error {
			_, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "reader", Disk: protocol.DiskID(d.ID), Segment: 1, Count: 1, Op: protocol.FaultDiscard})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			c := newCluster(t)
			p := tc.policy
			if p == 0 {
				p = table.Forward
			}
			d := createDisk(t, c, "d", 4, p)
			attachFake(t, c, "reader", &fakeAgent{}, "d")
			if tc.written {
				if err := writeFault(ctx, c, d); err != nil {
					t.Fatal(err)
				}
			}
			slow := newHeldAgent()
			held := d
			if tc.snap {
				ss, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}})
				if err != nil {
					t.Fatal(err)
				}
				if tc.held == "d@1" {
					held = ss[0]
				}
			}
			attachFake(t, c, "slow", slow, tc.held)
			t.Cleanup(slow.release)
			slow.arm(tc.kind, held.ID)
			changed := make(chan error, 1)
			go func() { changed <- tc.change(ctx, c, d) }()
			select {
			case <-slow.entered:
			case err := <-changed:
				t.Fatalf("the change ended (%v) before it was held", err)
			}
			read := make(chan protocol.Reply, 1)
			readErr := make(chan error, 1)
			go func() {
				r, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "reader", Disk: protocol.DiskID(d.ID), Segment: 1, Count: 1, Op: protocol.FaultRead})
				if err != nil {
					readErr <- err
					return
				}
				read <- r
			}()
			answered := true
			select {
			case r := <-read:
				for _, e := range r.Entries {
					if e.Mapped() && !e.Is(table.NoWrite) {
						t.Errorf("a read fault answered %v (writable) while the %s was half way", e, tc.name)
					}
				}
			case err := <-readErr:
				t.Errorf("read fault: %v", err)
			case <-time.After(200 * time.Millisecond):
				// Waiting for the change is right.
				answered = false
			}
			slow.release()
			if err := <-changed; err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if !answered {
				select {
				case <-read:
				case err := <-readErr:
					t.Errorf("read fault after the change: %v", err)
				}
			}
			checkClean(t, c)
		})
	}
}

// writeFault faults for a write on segment 1 of d as agent "reader", and
// commits the stage if it is given one (the agent copies).
func writeFault(ctx context.Context, c *standalone.Cluster, d meta.Disk) error {
	f := protocol.Fault{Agent: "reader", Disk: protocol.DiskID(d.ID), Segment: 1, Count: 1, Op: protocol.FaultWrite}
	r, err := c.Ctrl.Fault(ctx, f)
	if err != nil || r.Stage == nil {
		return err
	}
	f.Op, f.Token = protocol.FaultCommit, r.Stage.Token
	_, err = c.Ctrl.Fault(ctx, f)
	return err
}

// viewHook is a meta.Store that calls after once after the next View
// that returns once armed, and beforeUpdate once before the next Update.
type viewHook struct {
	meta.Store
	mu           sync.Mutex
	after        func()
	beforeUpdate func()
}

// newHookedCluster starts a one-agent cluster whose store is a viewHook,
// with one container of 16 slots.
func newHookedCluster(t *testing.T) (*standalone.Cluster, *viewHook) {
	t.Helper()
	hook := &viewHook{}
	c, err := standalone.Open(context.Background(), t.TempDir(), standalone.Options{
		Agents: []string{"host-a"},
		Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: 16, Count: 1}},
		OpenStore: func(context.Context) (meta.Store, error) {
			st, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
			hook.Store = st
			return hook, err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	return c, hook
}

func (v *viewHook) Update(ctx context.Context, fn func(*meta.Tx) error) error {
	v.mu.Lock()
	f := v.beforeUpdate
	v.beforeUpdate = nil
	v.mu.Unlock()
	if f != nil {
		f()
	}
	return v.Store.Update(ctx, fn)
}

func (v *viewHook) View(ctx context.Context, fn func(*meta.Tx) error) error {
	err := v.Store.View(ctx, fn)
	v.mu.Lock()
	f := v.after
	v.after = nil
	v.mu.Unlock()
	if f != nil {
		f()
	}
	return err
}

func (v *viewHook) arm(f func()) {
	v.mu.Lock()
	v.after = f
	v.mu.Unlock()
}

// TestWriteFaultRacingFamilyChange: a write fault reads its disk's record
// before it waits for the family lock; a delete or a shrink that holds the
// lock meanwhile changes the record. The fault must then be resolved
// against the disk as it is after the change: not allocate a slot to a
// deleted disk (a leaked slot and an orphan table), nor to a segment past
// a shrunk end.
func TestWriteFaultRacingFamilyChange(t *testing.T) {
	for _, tc := range []struct {
		name   string
		kind   string
		change func(ctx context.Context, c *standalone.Cluster) error
	}{
		{"delete", "DeleteTable", func(ctx context.Context, c *standalone.Cluster) error {
			return c.Ctrl.DeleteDisk(ctx, "d")
		}},
		{"shrink", "NewTable", func(ctx context.Context, c *standalone.Cluster) error {
			_, err := c.Ctrl.ResizeDisk(ctx, "d", seg, true)
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			c, hook := newHookedCluster(t)
			d := createDisk(t, c, "d", 4, table.Forward)
			slow := newHeldAgent()
			attachFake(t, c, "slow", slow, "d")
			attachFake(t, c, "writer", &fakeAgent{}, "d")
			t.Cleanup(slow.release)
			slow.arm(tc.kind, d.ID)
			changed := make(chan error, 1)
			go func() { changed <- tc.change(ctx, c) }()
			<-slow.entered
			// The fault's first View reads the disk record; once it
			// has, the change may go on.
			var read atomic.Bool
			hook.arm(func() { read.Store(true); slow.release() })
			_, ferr := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "writer", Disk: protocol.DiskID(d.ID), Segment: 3, Count: 1, Op: protocol.FaultWrite})
			if err := <-changed; err != nil {
				t.Fatal(err)
			}
			if !read.Load() {
				t.Fatal("the fault made no View")
			}
			if ferr == nil {
				t.Errorf("a write fault on segment 3 succeeded across a %s", tc.name)
			} else if !errors.Is(ferr, protocol.ErrNotFound) && !errors.Is(ferr, protocol.ErrBadRequest) && !errors.Is(ferr, controller.ErrNotMapped) {
				t.Errorf("write fault across a %s: %v", tc.name, ferr)
			}
			checkClean(t, c)
			if n := used(t, c); n != 0 {
				t.Errorf("%d slots used after the %s, want 0", n, tc.name)
			}
		})
	}
}

// TestSnapshotRacingDelete: a snapshot reads its sources' records before
// it waits for their families' locks; a delete of a source that holds the
// lock meanwhile must make the snapshot fail (the source is gone), not
// create a copy of a disk that no longer exists.
func TestSnapshotRacingDelete(t *testing.T) {
	ctx := context.Background()
	c, hook := newHookedCluster(t)
	d := createDisk(t, c, "d", 4, table.Forward)
	write(t, openDisk(t, c, 0, "d"), pattern(seg, 1), 0)
	slow := newHeldAgent()
	attachFake(t, c, "slow", slow, "d")
	t.Cleanup(slow.release)
	slow.arm("DeleteTable", d.ID)
	deleted := make(chan error, 1)
	go func() { deleted <- c.Ctrl.DeleteDisk(ctx, "d") }()
	<-slow.entered
	hook.arm(slow.release) // once the snapshot has read its source
	_, serr := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}})
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	if !errors.Is(serr, protocol.ErrNotFound) {
		t.Errorf("snapshot of a disk deleted meanwhile: %v, want ErrNotFound", serr)
	}
	if ds, err := c.Ctrl.Disks(ctx); err != nil || len(ds) != 0 {
		t.Errorf("disks after the delete: %v %v, want none", ds, err)
	}
	checkClean(t, c)
	if n := used(t, c); n != 0 {
		t.Errorf("%d slots used, want 0", n)
	}
}

// TestResizeRacingResize: a resize that read its disk before a shrink
// held the family lock must see the shrunk size: growing to a size
// between the two is a grow, not a shrink refused.
func TestResizeRacingResize(t *testing.T) {
	ctx := context.Background()
	c, hook := newHookedCluster(t)
	d := createDisk(t, c, "d", 8, table.Forward)
	h := openDisk(t, c, 0, "d")
	write(t, h, pattern(8*seg, 1), 0)
	slow := newHeldAgent()
	attachFake(t, c, "slow", slow, "d")
	t.Cleanup(slow.release)
	slow.arm("NewTable", d.ID) // a shrink tells agents before its commit
	shrunk := make(chan error, 1)
	go func() {
		_, err := c.Ctrl.ResizeDisk(ctx, "d", 4*seg, true)
		shrunk <- err
	}()
	<-slow.entered
	hook.arm(slow.release) // once the grow has read the disk
	nd, gerr := c.Ctrl.ResizeDisk(ctx, "d", 6*seg, false)
	if err := <-shrunk; err != nil {
		t.Fatal(err)
	}
	if gerr != nil || nd.Size != 6*seg {
		t.Errorf("grow from 4 to 6 segments after the shrink: %+v %v", nd, gerr)
	}
	want := append(pattern(8*seg, 1)[:4*seg], make([]byte, 2*seg)...)
	expect(t, openDisk(t, c, 0, "d"), 0, want)
	checkClean(t, c)
}

// TestPreallocateAfterDirtyingRace: a preallocation zeroes the pool's
// free slots and then takes them in its first transaction; a container
// left dirty in between (here: an agent re-attaches, and the slot of its
// dropped staged write goes back holding data) must make it zero again,
// not fail the creation.
func TestPreallocateAfterDirtyingRace(t *testing.T) {
	ctx := context.Background()
	c, hook := newHookedCluster(t)
	d := createDisk(t, c, "d", 2, table.Forward)
	write(t, openDisk(t, c, 0, "d"), pattern(seg, 1), 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}}); err != nil {
		t.Fatal(err)
	}
	attachFake(t, c, "x", &fakeAgent{}, "d")
	r, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "x", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Whole: true})
	if err != nil || r.Stage == nil {
		t.Fatalf("stage: %+v %v", r, err)
	}
	writeSlot(t, c, r.Stage.Loc, pattern(seg, 9))
	hook.mu.Lock()
	hook.beforeUpdate = func() {
		if err := c.Ctrl.Attach(ctx, "x", &fakeAgent{}, nil); err != nil {
			t.Error(err)
		}
	}
	hook.mu.Unlock()
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "p", Size: 12 * seg, SegmentSize: seg, Preallocate: true}); err != nil {
		t.Fatalf("create a preallocated disk: %v", err)
	}
	expect(t, openDisk(t, c, 0, "p"), 0, make([]byte, 12*seg))
	checkClean(t, c)
}

func (f *fakeAgent) SetMembership(ctx context.Context, m protocol.Membership) error { return nil }

func (h *heldAgent) SetMembership(ctx context.Context, m protocol.Membership) error { return nil }
