package controller_test

import (
	"bytes"
	"context"
	"testing"

	"segmap/internal/meta"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// storeEntry reads entry seg of disk name from the store as it is, without
// committing what the controller keeps in memory.
func storeEntry(t *testing.T, c *standalone.Cluster, name string, seg uint64) table.Entry {
	t.Helper()
	var e table.Entry
	if err := c.Store.View(context.Background(), func(tx *meta.Tx) error {
		d, err := tx.Disk(name)
		if err != nil {
			return err
		}
		es, err := tx.Entries(d.ID, seg, 1)
		e = es[0]
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return e
}

// TestMapChangesDurableAtFlush: on a disk one agent maps, a write's map
// change (an allocation, a sub-segment copy) is kept in the controller's
// memory: the write is answered before the store has it, the disk reads
// it back, and the agent's flush commits it. A controller that dies
// loses what was not flushed: the disk reads as before those writes, and
// the disk starts a new life (its NBD connections are hung up on). A disk
// two agents map has each change committed before the write is answered.
func TestMapChangesDurableAtFlush(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "d", 4, table.Forward)
	h := openDisk(t, c, 0, "d")
	a := pattern(100, 1)
	write(t, h, a, 10)
	if e := storeEntry(t, c, "d", 0); !e.Is(table.Zero) {
		t.Fatalf("the store has segment 0 as %v before any flush; want it Zero still", e)
	}
	expect(t, h, 10, a)
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	flushed := storeEntry(t, c, "d", 0)
	if !flushed.Mapped() {
		t.Fatalf("after the flush the store has segment 0 as %v, want it mapped", flushed)
	}
	checkClean(t, c)

	// A copy-on-write after a snapshot: also kept until the flush.
	snap(t, c, "d", "s")
	b := pattern(100, 2)
	write(t, h, b, 20)
	if e := storeEntry(t, c, "d", 0); e.Partial() || e.Loc != flushed.Loc {
		t.Fatalf("the store has %v before the flush, want %v", e, flushed)
	}
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if e := storeEntry(t, c, "d", 0); !e.Partial() {
		t.Fatalf("after the flush the store has %v, want a partial entry", e)
	}

	// Unflushed writes die with their controller.
	lives := h.Lives()
	lost := pattern(4096, 3)
	write(t, h, lost, seg+100)             // an allocation
	write(t, h, pattern(50, 4), 2*4096+30) // a fill of segment 0
	if err := c.CrashController(ctx); err != nil {
		t.Fatal(err)
	}
	if h.Lives() != lives+1 {
		t.Errorf("the disk lived %d lives after its controller died with its changes, want %d", h.Lives(), lives+1)
	}
	want := make([]byte, 2*seg)
	copy(want, pattern(0, 0))
	copy(want[10:], a)
	copy(want[20:], b)
	expect(t, openDisk(t, c, 0, "d"), 0, want)
	if e := storeEntry(t, c, "d", 1); !e.Is(table.Zero) {
		t.Errorf("an unflushed allocation survived its controller: %v", e)
	}
	checkClean(t, c)

	// A disk two agents map: committed at once.
	h1 := openDisk(t, c, 1, "d")
	write(t, h1, lost, 2*seg)
	if e := storeEntry(t, c, "d", 2); !e.Mapped() {
		t.Errorf("a write to a disk two agents map left the store at %v", e)
	}
	if got := read(t, openDisk(t, c, 0, "d"), 2*seg, uint64(len(lost))); !bytes.Equal(got, lost) {
		t.Error("the other agent does not read the write")
	}
	checkClean(t, c)
}
