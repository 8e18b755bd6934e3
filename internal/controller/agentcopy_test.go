package controller_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// countingContainer counts the reads and writes made through it.
type countingContainer struct {
	container.Container
	n *atomic.Int64
}

func (c countingContainer) ReadAt(p []byte, off int64) (int, error) {
	c.n.Add(1)
	return c.Container.ReadAt(p, off)
}

func (c countingContainer) WriteAt(p []byte, off int64) (int, error) {
	c.n.Add(1)
	return c.Container.WriteAt(p, off)
}

// TestAgentCopiesPartialWrite: a partial write into a segment shared with
// a snapshot is copied by the faulting agent, not the controller (which
// makes no slot I/O for it); both agents read the write over the old
// data, the snapshot still reads the old data, and the copy's all-zero
// parts stay unwritten in the new slot. With ControllerCopies the
// controller copies, with the same result.
func TestAgentCopiesPartialWrite(t *testing.T) {
	for _, ctrlCopies := range []bool{false, true} {
		t.Run(map[bool]string{false: "agent copies", true: "controller copies"}[ctrlCopies], func(t *testing.T) {
			ctx := context.Background()
			var ctrlIO atomic.Int64
			c := newClusterOpts(t, standalone.Options{
				ControllerCopies: ctrlCopies,
				WrapControllerContainer: func(ct container.Container) container.Container {
					return countingContainer{ct, &ctrlIO}
				},
			})
			createDisk(t, c, "d", 4, table.Forward)
			h0, h1 := openDisk(t, c, 0, "d"), openDisk(t, c, 1, "d")
			old := pattern(2*seg, 1)
			clear(old[seg+seg/2:]) // segment 1's second half is zeros
			write(t, h0, old, 0)
			if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
				t.Fatal(err)
			}
			shared := entry(t, c, "d", 0).Loc
			io0 := ctrlIO.Load()
			// The agent copies the touched sub-blocks only; the
			// controller copies whole segments.
			plan := table.CopySub
			if ctrlCopies {
				plan = table.CopyForward
			}
			n0 := c.Ctrl.FaultCounts()[plan]
			want := bytes.Clone(old)
			copy(want[100:], "new")
			copy(want[seg+10:], pattern(4096, 7))
			write(t, h0, []byte("new"), 100)
			write(t, h0, pattern(4096, 7), seg+10)
			if n := c.Ctrl.FaultCounts()[plan] - n0; n != 2 {
				t.Errorf("%d %v faults, want 2", n, plan)
			}
			if io := ctrlIO.Load() - io0; ctrlCopies != (io > 0) {
				t.Errorf("the controller made %d slot reads and writes (it copies: %v)", io, ctrlCopies)
			}
			for _, h := range []*agent.Disk{h0, h1} {
				expect(t, h, 0, want)
			}
			expect(t, openDisk(t, c, 1, "s"), 0, old)
			// The agent's copy is sub-segment: d reads the rest of the
			// segment through to the shared slot, which both name.
			wantRefs := map[bool]uint32{false: 2, true: 1}[ctrlCopies]
			if e := entry(t, c, "d", 0); e.Loc == shared || e.Partial() == ctrlCopies || refs(t, c, shared) != wantRefs {
				t.Errorf("d's segment 0 at %v, the shared slot %v has %d refs; want d moved off it (partial: %v, %d refs)", e, shared, refs(t, c, shared), !ctrlCopies, wantRefs)
			}
			if !ctrlCopies {
				if a, err := slotAllocated(c, entry(t, c, "d", 1).Loc); err != nil {
					t.Fatal(err)
				} else if a > seg/2+4096 {
					t.Errorf("the copy of a half-zero segment allocated %d bytes of its slot", a)
				}
			}
			checkClean(t, c)
		})
	}
}

// stagedCopy sets up disk d, written at segment 0 (slot old) through
// host-a, snapshotted to s, and stages a partial write to segment 0 for
// host-a, as its agent would fault: the reply must be a stage that copies
// from old. The agent's part (copy, write, flush) is done with writeSlot.
func stagedCopy(t *testing.T, c *standalone.Cluster, data []byte) (protocol.Reply, protocol.DiskID, table.Location) {
	t.Helper()
	ctx := context.Background()
	d := createDisk(t, c, "d", 4, table.Forward)
	write(t, openDisk(t, c, 0, "d"), pattern(seg, 1), 0)
	old := entry(t, c, "d", 0).Loc
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	r, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: protocol.DiskID(d.ID), Segment: 0, Count: 1, Op: protocol.FaultWrite, Reason: table.NoWrite})
	if err != nil || r.Stage == nil || r.Stage.From.Loc != old {
		t.Fatalf("partial write to a shared segment: %+v %v; want a stage copying from %v", r, err, old)
	}
	writeSlot(t, c, r.Stage.Loc, data)
	return r, protocol.DiskID(d.ID), old
}

// TestAgentCopyChangedBeforeCommit: what happens to the segment between a
// copy's stage and its commit (a discard, the disk's deletion, the agent
// restarting, the stage abandoned) makes the commit stale or fail: the
// entry does not move to the staged slot, the snapshot keeps its data,
// and no slot leaks or is freed twice.
func TestAgentCopyChangedBeforeCommit(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, c *standalone.Cluster, r protocol.Reply, id protocol.DiskID)
		gone   bool // the disk is deleted
	}{
		{"discard", func(t *testing.T, c *standalone.Cluster, r protocol.Reply, id protocol.DiskID) {
			if err := openDisk(t, c, 1, "d").Trim(ctx, 0, seg); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"delete", func(t *testing.T, c *standalone.Cluster, r protocol.Reply, id protocol.DiskID) {
			if err := c.Ctrl.DeleteDisk(ctx, "d"); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"agent restart", func(t *testing.T, c *standalone.Cluster, r protocol.Reply, id protocol.DiskID) {
			if err := c.RestartAgent(ctx, 0); err != nil {
				t.Fatal(err)
			}
			openDisk(t, c, 0, "d")
		}, false},
		{"abandoned", func(t *testing.T, c *standalone.Cluster, r protocol.Reply, id protocol.DiskID) {
			if _, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: id, Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: r.Stage.Token, Abandon: true}); err != nil {
				t.Fatal(err)
			}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Two slots: the shared one and one more. A staged slot
			// that stayed reserved would leave none for the write
			// afterwards.
			c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 2, Count: 1})
			data := pattern(seg, 9)
			r, id, old := stagedCopy(t, c, data)
			tc.change(t, c, r, id)
			_, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: "host-a", Disk: id, Segment: 0, Count: 1, Op: protocol.FaultCommit, Token: r.Stage.Token})
			if err == nil {
				t.Fatalf("commit after a %s succeeded", tc.name)
			}
			if !tc.gone && !errors.Is(err, protocol.ErrStale) {
				t.Errorf("commit after a %s: %v, want ErrStale", tc.name, err)
			}
			// d still shares it, unless it was discarded or deleted.
			if r, want := refs(t, c, old), map[bool]uint32{false: 2, true: 1}[tc.gone || tc.name == "discard"]; r != want {
				t.Errorf("refs of the snapshot's slot: %d, want %d", r, want)
			}
			checkClean(t, c)
			expect(t, openDisk(t, c, 1, "s"), 0, pattern(seg, 1))
			if tc.gone {
				return
			}
			want := pattern(seg, 1)
			if tc.name == "discard" {
				want = make([]byte, seg)
			} else if e := entry(t, c, "d", 0); e.Loc != old {
				t.Errorf("d's segment 0 moved to %v", e)
			}
			expect(t, openDisk(t, c, 1, "d"), 0, want)
			// The staged slot is free again: the write that moves d
			// off the shared slot (or allocates, after the discard)
			// gets it.
			h0 := openDisk(t, c, 0, "d")
			write(t, h0, []byte("after"), 7)
			copy(want[7:], "after")
			expect(t, openDisk(t, c, 1, "d"), 0, want)
			expect(t, openDisk(t, c, 1, "s"), 0, pattern(seg, 1))
			checkClean(t, c)
		})
	}
}

// failingReads fails the reads of the agent's container once armed.
type failingReads struct {
	container.Container
	armed *atomic.Bool
}

func (c failingReads) ReadAt(p []byte, off int64) (int, error) {
	if c.armed.Load() {
		return 0, syscall.EIO
	}
	return c.Container.ReadAt(p, off)
}

// TestAgentCopySourceFails: when the agent cannot read the slot it copies
// from, the write fails with the cause, the disk and its snapshot keep
// their data, and the stage is given back at once: with no slot to spare
// but the staged one, the write succeeds once the reads do.
func TestAgentCopySourceFails(t *testing.T) {
	var armed atomic.Bool
	c := newClusterOpts(t, standalone.Options{
		Pool: []standalone.PoolSpec{{SlotSize: seg, Slots: 2, Count: 1}},
		WrapAgentContainer: func(agent string, ct container.Container) container.Container {
			if agent == "host-a" {
				return failingReads{ct, &armed}
			}
			return ct
		},
	})
	ctx := context.Background()
	createDisk(t, c, "d", 4, table.Forward)
	h0 := openDisk(t, c, 0, "d")
	write(t, h0, pattern(seg, 1), 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	err := h0.WriteAt(ctx, []byte("new"), 5, false)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write whose copy cannot read: %v, want EIO", err)
	}
	armed.Store(false)
	checkClean(t, c)
	h1 := openDisk(t, c, 1, "d")
	expect(t, h1, 0, pattern(seg, 1))
	write(t, h0, []byte("new"), 5)
	want := pattern(seg, 1)
	copy(want[5:], "new")
	expect(t, h1, 0, want)
	expect(t, openDisk(t, c, 1, "s"), 0, pattern(seg, 1))
	checkClean(t, c)
}

// TestAgentCopiesConcurrentWrites: partial writes from both agents, at
// once, into every segment of a disk just snapshotted: each segment is
// copied once for good (racing copies of one segment commit one, the
// others start again and write in place), every write reads back on both
// agents, and the snapshot is unchanged.
func TestAgentCopiesConcurrentWrites(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	const segs = 8
	createDisk(t, c, "d", segs, table.Forward)
	hs := []*agent.Disk{openDisk(t, c, 0, "d"), openDisk(t, c, 1, "d")}
	old := pattern(segs*seg, 3)
	write(t, hs[0], old, 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(old)
	var wg sync.WaitGroup
	errs := make(chan error, 4*segs)
	for s := range segs {
		for k := range 4 {
			off := uint64(s)*seg + uint64(k)*1000
			p := pattern(500, byte(s*4+k+100))
			copy(want[off:], p)
			wg.Go(func() { errs <- hs[k%2].WriteAt(ctx, p, off, false) })
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range hs {
		expect(t, h, 0, want)
	}
	expect(t, openDisk(t, c, 1, "s"), 0, old)
	checkClean(t, c)
}

// slotAllocated returns how many bytes of slot loc its container file has
// allocated on storage (SEEK_DATA and SEEK_HOLE).
func slotAllocated(c *standalone.Cluster, loc table.Location) (int64, error) {
	f, err := os.Open(filepath.Join(c.Dir, "containers", fmt.Sprintf("c%d", loc.Container)))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	start := int64(container.HeaderSize) + int64(loc.Slot)*seg
	end := start + seg
	var n int64
	for off := start; off < end; {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) || err == nil && data >= end {
			break
		}
		if err != nil {
			return 0, err
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return 0, err
		}
		n += min(hole, end) - data
		off = hole
	}
	return n, nil
}
