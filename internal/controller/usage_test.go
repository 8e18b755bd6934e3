package controller_test

import (
	"context"
	"errors"
	"syscall"
	"testing"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// snapsHold returns what the snapshots of disk name's family hold, by
// both ways of asking, which must agree.
func snapsHold(t *testing.T, c *standalone.Cluster, name string) uint64 {
	t.Helper()
	ctx := context.Background()
	n, err := c.Ctrl.FamilySnapshotsHold(ctx, name)
	if err != nil {
		t.Fatalf("family snapshots hold %s: %v", name, err)
	}
	d, err := c.Ctrl.Disk(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	all, err := c.Ctrl.SnapshotsHold(ctx)
	if err != nil {
		t.Fatalf("snapshots hold: %v", err)
	}
	if all[d.Family] != n {
		t.Errorf("SnapshotsHold says family of %s holds %d, FamilySnapshotsHold %d", name, all[d.Family], n)
	}
	return n
}

// allocated returns what the containers hold on storage by
// ContainerSpaces, after checking each figure against stat of its file.
func allocated(t *testing.T, c *standalone.Cluster) uint64 {
	t.Helper()
	cs, err := c.Ctrl.ContainerSpaces(context.Background())
	if err != nil {
		t.Fatalf("container spaces: %v", err)
	}
	if len(cs) == 0 {
		t.Fatal("no containers")
	}
	var total uint64
	for _, ct := range cs {
		path, err := container.FilePath(ct.URI)
		if err != nil {
			t.Fatal(err)
		}
		if want := uint64(stat(t, path).Blocks * 512); !ct.Known || ct.Allocated != want {
			t.Errorf("container %d (%s): allocated %d (known %v), stat says %d", ct.ID, path, ct.Allocated, ct.Known, want)
		}
		total += ct.Allocated
	}
	return total
}

// TestSpaceAccounting follows a disk through writes, snapshots, a clone
// and deletes, checking what the snapshots hold, each disk's exclusive
// space, and what the container files hold on storage.
func TestSpaceAccounting(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	createDisk(t, c, "vm", 8, table.Forward)
	vm := openDisk(t, c, 0, "vm")
	for s := uint64(0); s < 3; s++ {
		write(t, vm, pattern(seg, byte(s)), s*seg)
	}
	expectUsage := func(name string, want controller.Usage) {
		t.Helper()
		if got := usage(t, c, name); got != want {
			t.Errorf("usage of %s: %+v, want %+v", name, got, want)
		}
	}
	expectHold := func(what string, want uint64) {
		t.Helper()
		if got := snapsHold(t, c, "vm"); got != want {
			t.Errorf("%s: snapshots hold %d bytes , want %d", what, got, want)
		}
	}
	snapshot := func(src, name string, writable bool) {
		t.Helper()
		if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{src}, Names: []string{name}, Writable: writable}); err != nil {
			t.Fatalf("snapshot %s as %s: %v", src, name, err)
		}
	}
	del := func(name string) {
		t.Helper()
		if err := c.Ctrl.DeleteDisk(ctx, name); err != nil {
			t.Fatalf("delete %s: %v", name, err)
		}
	}

	expectHold("no snapshot", 0)
	expectUsage("vm", controller.Usage{Allocated: 3 * seg, Exclusive: 3 * seg})
	base := allocated(t, c)

	snapshot("vm", "vm@1", false)
	expectHold("snapshot, nothing written since", 0)
	expectUsage("vm", controller.Usage{Allocated: 3 * seg, Shared: 3 * seg})
	expectUsage("vm@1", controller.Usage{Allocated: 3 * seg, Shared: 3 * seg})
	if got := allocated(t, c); got != base {
		t.Errorf("a snapshot changed what is on storage: %d bytes, was %d", got, base)
	}

	// A 4 KiB write copies only its sub-block into a new slot, over
	// the old one, which the snapshot and vm now both name: deleting the
	// snapshot would give back the new slot (compaction merges it into
	// the old), which holds the one sub-block written: 4 KiB. A write to
	// a segment never written holds nothing old.
	write(t, vm, pattern(4096, 9), 0)
	write(t, vm, pattern(seg, 5), 5*seg)
	expectHold("two writes after the snapshot", 4096)
	expectUsage("vm", controller.Usage{Allocated: 4 * seg, Exclusive: 2 * seg, Shared: 2 * seg})
	expectUsage("vm@1", controller.Usage{Allocated: 3 * seg, Shared: 3 * seg})
	grown := allocated(t, c)
	if grown < base+seg+4096 || grown >= base+2*seg {
		t.Errorf("storage went from %d to %d bytes; want one segment and one 4 KiB sub-block more", base, grown)
	}

	// A slot two snapshots share counts once.
	snapshot("vm", "vm@2", false)
	write(t, vm, pattern(4096, 10), 1*seg)
	expectHold("second snapshot and a write", 2*4096)
	expectUsage("vm@2", controller.Usage{Allocated: 4 * seg, Shared: 4 * seg})

	// A writable clone of the first snapshot makes its slots live again.
	snapshot("vm@1", "clone", true)
	expectHold("a clone of the first snapshot", 0)
	if got := snapsHold(t, c, "clone"); got != 0 {
		t.Errorf("the clone's family holds %d in snapshots, want 0", got)
	}
	del("clone")
	expectHold("the clone deleted", 2*4096)

	// Deleting the snapshots gives back what they held. vm@2 still
	// names every slot vm@1 did, so deleting vm@1 frees nothing; deleting
	// vm@2 lets vm's two partial entries merge into their bases.
	usedBefore, storedBefore := used(t, c), allocated(t, c)
	del("vm@1")
	expectHold("first snapshot deleted", 2*4096)
	if got := used(t, c); got != usedBefore {
		t.Errorf("deleting vm@1 left %d slots in use, want %d", got, usedBefore)
	}
	del("vm@2")
	expectHold("every snapshot deleted", 0)
	if got := used(t, c); got != usedBefore-2 {
		t.Errorf("deleting vm@2 left %d slots in use, want %d", got, usedBefore-2)
	}
	if got := allocated(t, c); got > storedBefore-2*4096 {
		t.Errorf("deleting vm@2 left %d bytes on storage, want at most %d", got, storedBefore-2*4096)
	}
	expectUsage("vm", controller.Usage{Allocated: 4 * seg, Exclusive: 4 * seg})
	if got := used(t, c); got != 4 {
		t.Errorf("only vm left, with 4 segments written: %d slots in use", got)
	}
	all, err := c.Ctrl.SnapshotsHold(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 0 {
		t.Errorf("no snapshot left, yet SnapshotsHold says %v", all)
	}
	checkClean(t, c)
}

// TestSnapshotsHoldNotFound checks the error of a missing disk.
func TestSnapshotsHoldNotFound(t *testing.T) {
	c := newCluster(t)
	if _, err := c.Ctrl.FamilySnapshotsHold(context.Background(), "nope"); !errors.Is(err, protocol.ErrNotFound) {
		t.Errorf("FamilySnapshotsHold of a missing disk: %v, want ErrNotFound", err)
	}
}

// stat returns the stat of path.
func stat(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}
