package controller_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"segmap/internal/agent"
	"segmap/internal/controller"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// sub is the sub-block size of the tests' 64 KiB segments.
const sub = 4096

// snap snapshots disk src as name.
func snap(t *testing.T, c *standalone.Cluster, src, name string) {
	t.Helper()
	if _, err := c.Ctrl.Snapshot(context.Background(), controller.SnapshotOptions{Sources: []string{src}, Names: []string{name}}); err != nil {
		t.Fatal(err)
	}
}

// TestPartialCopyOnWrite: a small write into a segment shared with a
// snapshot writes only the sub-blocks it touches into a new slot, and the
// disk maps a partial entry over the shared slot, which gains a reference
// and is not copied. Both agents read the write over the old data, the
// snapshot the old data; a write to another sub-block fills the new slot
// in place; the store passes check.
func TestPartialCopyOnWrite(t *testing.T) {
	c := newCluster(t)
	createDisk(t, c, "d", 2, table.Forward)
	h0, h1 := openDisk(t, c, 0, "d"), openDisk(t, c, 1, "d")
	old := pattern(2*seg, 1)
	write(t, h0, old, 0)
	base := entry(t, c, "d", 0).Loc
	snap(t, c, "d", "s")
	want := bytes.Clone(old)
	n0 := c.Ctrl.FaultCounts()
	w1 := pattern(100, 2)
	write(t, h0, w1, sub+50) // sub-block 1
	copy(want[sub+50:], w1)

	e := entry(t, c, "d", 0)
	if !e.Partial() || e.Part.Bits != table.Range(1, 2) || len(e.Part.Under) != 1 || e.Part.Under[0].Loc != base {
		t.Fatalf("entry after a 100-byte write into a shared segment: %v; want a new slot holding sub-block 1 over %v", e, base)
	}
	if got := c.Ctrl.FaultCounts()[table.CopySub] - n0[table.CopySub]; got != 1 {
		t.Errorf("%d copy-sub faults, want 1", got)
	}
	if r := refs(t, c, base); r != 2 {
		t.Errorf("the shared slot has %d references, want 2 (the snapshot, the layer)", r)
	}
	top := readSlot(t, c, e.Loc)
	if !bytes.Equal(top[sub:2*sub], want[sub:2*sub]) {
		t.Errorf("the new slot's sub-block 1 does not hold the write over the old data")
	}
	for i := 0; i < seg/sub; i++ {
		if i != 1 && !bytes.Equal(top[i*sub:(i+1)*sub], make([]byte, sub)) {
			t.Errorf("sub-block %d of the new slot was written; only sub-block 1 should be", i)
		}
	}
	for _, h := range []*agent.Disk{h0, h1} {
		expect(t, h, 0, want)
	}
	expect(t, openDisk(t, c, 1, "s"), 0, old)

	// Other sub-blocks, through the other agent: filled in place, and
	// nothing else copied: the slot holds 5 of the 16 sub-blocks.
	w2 := pattern(3*sub, 3)
	write(t, h1, w2, 4*sub+7) // sub-blocks 4 to 7
	copy(want[4*sub+7:], w2)
	if e := entry(t, c, "d", 0); !e.Partial() || e.Part.Bits != table.Range(1, 2).Or(table.Range(4, 8)) {
		t.Fatalf("entry after a fill: %v; want sub-blocks 1 and 4-7 in the top", e)
	}
	if got := c.Ctrl.FaultCounts()[table.FillIn] - n0[table.FillIn]; got != 1 {
		t.Errorf("%d fill-in faults, want 1", got)
	}
	for _, h := range []*agent.Disk{h0, h1} {
		expect(t, h, 0, want)
	}
	// Three more make half the segment: the rest is filled too, the
	// entry is whole, and the slot it read through to is the
	// snapshot's alone again.
	w4 := pattern(3*sub, 5)
	write(t, h0, w4, 8*sub) // sub-blocks 8 to 10
	copy(want[8*sub:], w4)
	e2 := entry(t, c, "d", 0)
	if e2.Partial() || e2.Loc != e.Loc {
		t.Fatalf("entry after a fill of half the segment: %v; want %v, whole", e2, e.Loc)
	}
	if got := c.Ctrl.FaultCounts()[table.FillAll] - n0[table.FillAll]; got != 1 {
		t.Errorf("%d fill-all faults, want 1", got)
	}
	if r := refs(t, c, base); r != 1 {
		t.Errorf("the shared slot has %d references after the fill, want 1 (the snapshot)", r)
	}
	if !bytes.Equal(readSlot(t, c, e.Loc), want[:seg]) {
		t.Error("the filled slot does not hold the whole segment")
	}
	// A write the slot already holds goes straight through.
	w3 := pattern(10, 4)
	before := c.Ctrl.FaultCounts()
	write(t, h1, w3, 5*sub)
	copy(want[5*sub:], w3)
	if after := c.Ctrl.FaultCounts(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("a write to sub-blocks the slot holds faulted: %v -> %v", before, after)
	}
	for _, h := range []*agent.Disk{h0, h1} {
		expect(t, h, 0, want)
	}
	expect(t, openDisk(t, c, 0, "s"), 0, old)
	checkClean(t, c)
}

// TestPartialLayersAndCompaction: snapshots taken between small writes
// stack layers under the disk's entry (each snapshot keeps what it saw;
// nothing is copied); a write that would make an entry deeper than
// MaxDepth copies it whole instead. Deleting the snapshots merges what
// the upper layers hold down into the base slot: the entry is whole
// again and every other slot is free, as before the snapshots.
func TestPartialLayersAndCompaction(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "d", 1, table.Forward)
	h := openDisk(t, c, 0, "d")
	data := pattern(seg, 1)
	write(t, h, data, 0)
	usedBefore := used(t, c)
	snaps := map[string][]byte{}
	for i := 0; i < table.MaxDepth-1; i++ {
		name := fmt.Sprintf("s%d", i)
		snap(t, c, "d", name)
		snaps[name] = bytes.Clone(data)
		w := pattern(10, byte(10+i))
		write(t, h, w, uint64(i)*sub+1)
		copy(data[i*sub+1:], w)
		if e := entry(t, c, "d", 0); e.Depth() != i+2 {
			t.Fatalf("after %d snapshots and writes the entry is %v, depth %d; want %d", i+1, e, e.Depth(), i+2)
		}
	}
	expect(t, h, 0, data)
	for name, want := range snaps {
		expect(t, openDisk(t, c, 1, name), 0, want)
	}
	checkClean(t, c)

	// One more: the entry is as deep as it may be, so it is copied whole.
	snap(t, c, "d", "last")
	snaps["last"] = bytes.Clone(data)
	n0 := c.Ctrl.FaultCounts()[table.CopyForward]
	w := pattern(10, 99)
	write(t, h, w, 9*sub)
	copy(data[9*sub:], w)
	if e := entry(t, c, "d", 0); e.Partial() {
		t.Errorf("a write past MaxDepth left a partial entry %v", e)
	}
	if n := c.Ctrl.FaultCounts()[table.CopyForward] - n0; n != 1 {
		t.Errorf("%d copy-forward faults past MaxDepth, want 1", n)
	}
	expect(t, h, 0, data)
	checkClean(t, c)
	if err := c.Ctrl.DeleteDisk(ctx, "last"); err != nil {
		t.Fatal(err)
	}

	// Back to a partial entry, then delete every snapshot.
	snap(t, c, "d", "again")
	write(t, h, w, 12*sub)
	if e := entry(t, c, "d", 0); !e.Partial() {
		t.Fatalf("entry %v, want a partial one", e)
	}
	for name := range snaps {
		if name != "last" {
			if err := c.Ctrl.DeleteDisk(ctx, name); err != nil {
				t.Fatal(err)
			}
		}
	}
	copy(data[12*sub:], w)
	if err := c.Ctrl.DeleteDisk(ctx, "again"); err != nil {
		t.Fatal(err)
	}
	e := entry(t, c, "d", 0)
	if e.Partial() {
		t.Errorf("after every snapshot was deleted the entry is still partial: %v", e)
	}
	if u := used(t, c); u != usedBefore {
		t.Errorf("%d slots used after the snapshots were deleted, want %d as before them", u, usedBefore)
	}
	expect(t, h, 0, data)
	expect(t, openDisk(t, c, 1, "d"), 0, data)
	checkClean(t, c)
}
