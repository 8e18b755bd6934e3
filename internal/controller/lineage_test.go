package controller_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestRollback rolls a disk back to its first snapshot and then forward
// to its second, through one open handle (a host's connection), and
// checks that the data follows, the snapshots stay, the space the disk's
// own writes held comes back and the store stays consistent.
func TestRollback(t *testing.T) {
	ctx := context.Background()
	for _, pol := range []table.Policy{table.Forward, table.Reverse} {
		t.Run(pol.String(), func(t *testing.T) {
			c := newCluster(t)
			createDisk(t, c, "a", 6, pol)
			h := openDisk(t, c, 0, "a")
			snap := func(name string) {
				t.Helper()
				if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{name}}); err != nil {
					t.Fatal(err)
				}
			}
			v1 := pattern(4*seg, 1)
			write(t, h, v1, 0)
			snap("s1")
			v2 := bytes.Clone(v1)
			copy(v2[seg/2:], pattern(seg, 2)) // part of segments 0 and 1
			copy(v2[3*seg:], pattern(seg, 3))
			write(t, h, v2[:4*seg], 0)
			if err := h.WriteZeroes(ctx, 2*seg, seg, false); err != nil { // a trim
				t.Fatal(err)
			}
			clear(v2[2*seg : 3*seg])
			write(t, h, pattern(seg, 4), 5*seg) // an allocation
			v2 = append(v2, make([]byte, seg)...)
			v2 = append(v2, pattern(seg, 4)...)
			snap("s2")
			write(t, h, pattern(6*seg, 5), 0) // a's own: every segment
			usedBefore := used(t, c)

			if _, err := c.Ctrl.Rollback(ctx, "a", "s1"); err != nil {
				t.Fatal(err)
			}
			expect(t, h, 0, append(bytes.Clone(v1), make([]byte, 2*seg)...))
			s2 := openDisk(t, c, 1, "s2")
			expect(t, s2, 0, v2)
			if u := used(t, c); u >= usedBefore {
				t.Errorf("%d slots used after the rollback, %d before: a's own writes were not freed", u, usedBefore)
			}
			checkClean(t, c)

			// Writes after the rollback copy on write: s1 stays.
			write(t, h, pattern(seg, 6), 0)
			s1 := openDisk(t, c, 1, "s1")
			expect(t, s1, 0, v1)

			// Forward to the later snapshot: it was kept.
			if _, err := c.Ctrl.Rollback(ctx, "a", "s2"); err != nil {
				t.Fatal(err)
			}
			expect(t, h, 0, v2)
			expect(t, s1, 0, v1)
			checkClean(t, c)
		})
	}
}

// A rollback takes the snapshot's size: an open handle sees the disk
// shrink back, and grow again with the next rollback.
func TestRollbackSize(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 2, table.Forward)
	h := openDisk(t, c, 0, "a")
	write(t, h, pattern(2*seg, 1), 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"small"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.ResizeDisk(ctx, "a", 4*seg, false); err != nil {
		t.Fatal(err)
	}
	write(t, h, pattern(2*seg, 2), 2*seg)
	d, err := c.Ctrl.Rollback(ctx, "a", "small")
	if err != nil {
		t.Fatal(err)
	}
	if d.Size != 2*seg || h.Info().Size != 2*seg {
		t.Fatalf("size %d, agent %d after rollback, want %d", d.Size, h.Info().Size, 2*seg)
	}
	expect(t, h, 0, pattern(2*seg, 1))
	if _, err := c.Ctrl.ResizeDisk(ctx, "a", 4*seg, false); err != nil {
		t.Fatal(err)
	}
	// Grown again, the segments past the snapshot's end read zeros.
	expect(t, h, 2*seg, make([]byte, 2*seg))
	checkClean(t, c)
}

func TestRollbackRefused(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 2, table.Forward)
	createDisk(t, c, "b", 2, table.Forward)
	h := openDisk(t, c, 0, "a")
	write(t, h, pattern(2*seg, 1), 0)
	for _, o := range []controller.SnapshotOptions{
		{Sources: []string{"a"}, Names: []string{"a-snap"}},
		{Sources: []string{"a"}, Names: []string{"a-clone"}, Writable: true},
		{Sources: []string{"b"}, Names: []string{"b-snap"}},
	} {
		if _, err := c.Ctrl.Snapshot(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	write(t, h, pattern(2*seg, 2), 0)
	before := stateOf(t, c)
	for _, tc := range []struct {
		name, disk, to string
		want           error
	}{
		{"another lineage", "a", "b-snap", controller.ErrOtherLineage},
		{"a writable clone", "a", "a-clone", controller.ErrNotSnapshot},
		{"itself", "a", "a", protocol.ErrBadRequest},
		{"a snapshot", "a-snap", "a-snap", protocol.ErrReadOnly},
		{"no such snapshot", "a", "nope", protocol.ErrNotFound},
		{"no such disk", "nope", "a-snap", protocol.ErrNotFound},
	} {
		if _, err := c.Ctrl.Rollback(ctx, tc.disk, tc.to); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	assertUnchanged(t, c, before)
	expect(t, h, 0, pattern(2*seg, 2))
}

func TestRenameDisk(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 2, table.Forward)
	createDisk(t, c, "taken", 1, table.Forward)
	h := openDisk(t, c, 0, "a")
	write(t, h, pattern(2*seg, 1), 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"a-snap"}}); err != nil {
		t.Fatal(err)
	}
	before := stateOf(t, c)
	for _, tc := range []struct {
		name, from, to string
		want           error
	}{
		{"to a taken name", "a", "taken", controller.ErrExists},
		{"to a bad name", "a", "a/b", controller.ErrInvalidName},
		{"a missing disk", "nope", "b", protocol.ErrNotFound},
	} {
		if _, err := c.Ctrl.RenameDisk(ctx, tc.from, tc.to); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	assertUnchanged(t, c, before)

	d, err := c.Ctrl.RenameDisk(ctx, "a", "b")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Disk(ctx, "a"); !errors.Is(err, protocol.ErrNotFound) {
		t.Errorf("old name after rename: %v, want ErrNotFound", err)
	}
	if h.Info().Name != "b" || h.Info().ID != protocol.DiskID(d.ID) {
		t.Errorf("the agent serves %+v, want b, id %d", h.Info(), d.ID)
	}
	// The open handle goes on, and a new one opens by the new name.
	write(t, h, pattern(seg, 2), 0)
	expect(t, openDisk(t, c, 1, "b"), 0, append(pattern(seg, 2), pattern(2*seg, 1)[seg:]...))
	s, err := c.Ctrl.Disk(ctx, "a-snap")
	if err != nil || s.Origin != d.ID {
		t.Errorf("snapshot %+v, %v: want origin %d", s, err, d.ID)
	}
	checkClean(t, c)
}

func TestSetReadOnly(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 2, table.Forward)
	h := openDisk(t, c, 0, "a")
	write(t, h, pattern(2*seg, 1), 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"snap"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"clone"}, Writable: true}); err != nil {
		t.Fatal(err)
	}

	// Freeze the clone: an open handle's writes are refused.
	cl := openDisk(t, c, 1, "clone")
	write(t, cl, pattern(seg, 2), 0)
	if _, err := c.Ctrl.SetReadOnly(ctx, "clone", true); err != nil {
		t.Fatal(err)
	}
	if err := cl.WriteAt(ctx, []byte{1}, 0, false); !errors.Is(err, protocol.ErrReadOnly) {
		t.Fatalf("write to a frozen clone: %v, want ErrReadOnly", err)
	}
	expect(t, cl, 0, pattern(seg, 2))

	// Promote the snapshot: it takes writes, copying on write, and its
	// origin keeps its data.
	sn := openDisk(t, c, 1, "snap")
	if _, err := c.Ctrl.SetReadOnly(ctx, "snap", false); err != nil {
		t.Fatal(err)
	}
	write(t, sn, pattern(seg, 3), seg)
	expect(t, sn, 0, append(pattern(2*seg, 1)[:seg], pattern(seg, 3)...))
	expect(t, h, 0, pattern(2*seg, 1))

	// Setting what is already set changes nothing.
	if d, err := c.Ctrl.SetReadOnly(ctx, "snap", false); err != nil || d.ReadOnly {
		t.Errorf("set again: %+v, %v", d, err)
	}
	if _, err := c.Ctrl.SetReadOnly(ctx, "nope", true); !errors.Is(err, protocol.ErrNotFound) {
		t.Errorf("missing disk: %v, want ErrNotFound", err)
	}
	checkClean(t, c)
}
