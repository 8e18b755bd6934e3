package controller_test

import (
	"context"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/table"
)

// DeleteFrees says what a delete frees: the slots only the disk holds, not
// those it shares (by entry or by table page) with a snapshot or clone.
func TestDeleteFrees(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 6, table.Forward)
	h := openDisk(t, c, 0, "a")
	write(t, h, pattern(4*seg, 1), 0)
	snap := func(src, name string) {
		t.Helper()
		if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{src}, Names: []string{name}}); err != nil {
			t.Fatal(err)
		}
	}
	frees := func(name string) uint64 {
		t.Helper()
		n, err := c.Ctrl.DeleteFrees(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	snap("a", "s")
	// Shares its table pages with a: nothing would come back.
	if n := frees("s"); n != 0 {
		t.Errorf("a snapshot sharing every page would free %d bytes", n)
	}
	write(t, h, pattern(2*seg, 2), 0)    // segments 0 and 1 copied: s alone holds the old ones
	write(t, h, pattern(4096, 3), 2*seg) // a small write: segment 2's old slot stays shared
	write(t, h, pattern(seg, 4), 5*seg)  // an allocation: a's alone
	if n, want := frees("s"), uint64(2*seg); n != want {
		t.Errorf("s would free %d bytes, want %d", n, want)
	}
	if n, want := frees("a"), uint64(4*seg); n != want {
		t.Errorf("a would free %d bytes, want %d (segments 0, 1 and 5, and segment 2's top slot)", n, want)
	}
	before := used(t, c)
	n, err := c.Ctrl.DeleteDiskFreed(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	// The delete frees what the dry run said; merging a's partial
	// segment 2, whose old slot only a reads now, frees one more.
	if n != 2*seg || used(t, c) != before-3 {
		t.Errorf("delete freed %d bytes, used %d -> %d slots; want %d bytes, then 3 slots", n, before, used(t, c), 2*seg)
	}
	checkClean(t, c)
}
