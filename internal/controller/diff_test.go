package controller_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// diffOf returns Diff(from, to), failing the test on an error.
func diffOf(t *testing.T, c *standalone.Cluster, from, to string) []controller.Extent {
	t.Helper()
	r, err := c.Ctrl.Diff(context.Background(), from, to)
	if err != nil {
		t.Fatalf("diff %s %s: %v", from, to, err)
	}
	return r.Extents
}

func expectDiff(t *testing.T, c *standalone.Cluster, from, to string, want []controller.Extent) {
	t.Helper()
	for _, p := range [][2]string{{from, to}, {to, from}} {
		if got := diffOf(t, c, p[0], p[1]); !slices.Equal(got, want) {
			t.Errorf("diff %s %s = %v, want %v", p[0], p[1], got, want)
		}
	}
}

// TestDiff writes a known pattern, snapshots, then writes more (a whole
// segment shared with the snapshot, a few bytes into a shared segment, a
// trim, writes into Zero segments) and checks that Diff names exactly
// what was touched: while the map changes are still in the controller's
// memory, after the flush that commits them, against a second snapshot
// (NoWrite alone is no difference) and after a resize.
func TestDiff(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "d", 16, table.Forward)
	h := openDisk(t, c, 0, "d") // one agent: map changes are kept in memory
	write(t, h, pattern(10*seg, 1), 0)
	snap(t, c, "d", "s1")
	expectDiff(t, c, "s1", "d", nil)

	// The trim first: it commits the changes kept in memory, and those
	// after it are to stay there.
	if err := h.Trim(ctx, 7*seg, seg); err != nil {
		t.Fatal(err)
	}
	write(t, h, pattern(seg, 2), 2*seg)          // a shared segment, whole
	write(t, h, pattern(100, 3), 4*seg+sub+50)   // sub-block 1 of a shared segment
	write(t, h, pattern(seg, 4), 12*seg)         // a Zero segment
	write(t, h, pattern(100, 5), 13*seg+3*sub)   // a few bytes of a Zero segment
	write(t, h, pattern(2*sub, 6), 9*seg+14*sub) // the last two sub-blocks of one
	write(t, h, pattern(seg, 7), 2*seg)          // the first again
	want := []controller.Extent{
		{Off: 2 * seg, Len: seg},
		{Off: 4*seg + sub, Len: sub},
		{Off: 7 * seg, Len: seg},
		{Off: 9*seg + 14*sub, Len: 2 * sub},
		{Off: 12 * seg, Len: 2 * seg},
	}
	if e := storeEntry(t, c, "d", 12); !e.Is(table.Zero) {
		t.Fatalf("segment 12 is %v in the store before a flush; the test wants the change kept in memory", e)
	}
	expectDiff(t, c, "s1", "d", want)

	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	expectDiff(t, c, "s1", "d", want)
	expectDiff(t, c, "d", "d", nil)

	// A second snapshot: the same entries, NoWrite on both.
	snap(t, c, "d", "s2")
	expectDiff(t, c, "s2", "d", nil)
	expectDiff(t, c, "s1", "s2", want)

	// A range.
	s1, err := c.Ctrl.Disk(ctx, "s1")
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.Ctrl.Disk(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.Ctrl.DiffRange(ctx, s1.ID, d.ID, controller.DiffQuery{Off: 4*seg + 100, Len: 6 * seg})
	if err != nil {
		t.Fatal(err)
	}
	if w := want[1:4]; !slices.Equal(r.Extents, w) || r.Bytes() != seg+3*sub {
		t.Errorf("DiffRange(s1, d, [4 segments+100, +6 segments)) = %v (%d bytes), want %v", r.Extents, r.Bytes(), w)
	}

	// Paged, two extents at a time.
	var paged []controller.Extent
	for q := (controller.DiffQuery{Max: 2}); ; {
		r, err := c.Ctrl.DiffRange(ctx, s1.ID, d.ID, q)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Extents) > 2 {
			t.Fatalf("DiffRange(%+v) = %d extents", q, len(r.Extents))
		}
		paged = append(paged, r.Extents...)
		if r.Next == 0 {
			break
		}
		q.Off = r.Next
	}
	if !slices.Equal(paged, want) {
		t.Errorf("DiffRange two at a time: %v, want %v", paged, want)
	}

	// Grown: the new bytes count as changed.
	if _, err := c.Ctrl.ResizeDisk(ctx, "d", 20*seg+512, false); err != nil {
		t.Fatal(err)
	}
	expectDiff(t, c, "s2", "d", []controller.Extent{{Off: 16 * seg, Len: 4*seg + 512}})

	// Disks that cannot be compared.
	createDisk(t, c, "other", 16, table.Forward)
	for _, tt := range []struct {
		from, to string
		want     error
	}{
		{"s1", "other", protocol.ErrBadRequest},
		{"s1", "nosuch", protocol.ErrNotFound},
		{"nosuch", "d", protocol.ErrNotFound},
	} {
		if _, err := c.Ctrl.Diff(ctx, tt.from, tt.to); !errors.Is(err, tt.want) {
			t.Errorf("diff %s %s: %v, want %v", tt.from, tt.to, err, tt.want)
		}
	}
	checkClean(t, c)
}

// TestDiffSegmentSizes: disks of one family with different segment sizes
// cannot be made through the API; the check stands against a store that
// holds them anyway.
func TestDiffSegmentSizes(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	d := createDisk(t, c, "d", 4, table.Forward)
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error {
		o := d
		o.ID, o.Name, o.SegmentSize, o.Origin = 0, "odd", 2*seg, d.ID
		_, err := tx.CreateDisk(o)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Diff(ctx, "d", "odd"); !errors.Is(err, protocol.ErrBadRequest) {
		t.Errorf("diff of segment sizes %d and %d: %v, want %v", seg, 2*seg, err, protocol.ErrBadRequest)
	}
}

// BenchmarkDiff compares a disk of 1 thousand or 1 million allocated
// segments (64 KiB, mapped straight in the store) with its snapshot after
// a few writes into one table page: the cost is that of the pages that
// differ and should not grow with the disk, but for the page directories
// read (a record of up to meta.DirPages page ids each): about 0.21 ms at
// a thousand segments and 0.29 ms at a million here (medians of five).
//
//	go test -run XXX -bench Diff ./internal/controller
func BenchmarkDiff(b *testing.B) {
	for _, n := range []uint64{1_000, 1_000_000} {
		b.Run(fmt.Sprintf("segments=%d", n), func(b *testing.B) {
			ctx := context.Background()
			c, changed := lineageFixture(b, n)
			runtime.GC() // the setup's garbage, not the diff's
			b.ResetTimer()
			for b.Loop() {
				r, err := c.Ctrl.Diff(ctx, "s", "d")
				if err != nil {
					b.Fatal(err)
				}
				if len(r.Extents) != changed {
					b.Fatalf("%d extents, want %d", len(r.Extents), changed)
				}
			}
		})
	}
}

// BenchmarkRollback rolls disk d back to its snapshot s, over and over:
// the cost of replacing a table by a snapshot's (shared pages), which must
// not grow with the disk.
func BenchmarkRollback(b *testing.B) {
	for _, n := range []uint64{1_000, 1_000_000} {
		b.Run(fmt.Sprintf("segments=%d", n), func(b *testing.B) {
			ctx := context.Background()
			c, _ := lineageFixture(b, n)
			runtime.GC()
			b.ResetTimer()
			for b.Loop() {
				if _, err := c.Ctrl.Rollback(ctx, "d", "s"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// lineageFixture makes a cluster whose disk d of n 64 KiB segments, every
// one mapped, has a snapshot s from which four segments of its first table
// page have moved (as copies-on-write would move them); it returns the
// cluster and the segments changed. The entries are written to the store
// directly: writing a million segments through an agent would take the
// benchmark's time.
func lineageFixture(b *testing.B, n uint64) (*standalone.Cluster, int) {
	b.Helper()
	ctx := context.Background()
	c, err := standalone.Open(ctx, b.TempDir(), standalone.Options{
		Agents: []string{"host-a"},
		Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: n + 8, Count: 1}},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	d, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "d", Size: n * seg, SegmentSize: seg})
	if err != nil {
		b.Fatal(err)
	}
	cs, err := c.Ctrl.ListContainers(ctx)
	if err != nil {
		b.Fatal(err)
	}
	cid := cs[0].ID
	const chunk = 1 << 16
	for first := uint64(0); first < n; first += chunk {
		k := min(chunk, n-first)
		err := c.Store.Update(ctx, func(tx *meta.Tx) error {
			es := make([]table.Entry, k)
			for i := range es {
				loc := table.Location{Container: cid, Slot: uint32(first) + uint32(i)}
				es[i] = table.At(loc, false)
				if err := tx.SetRefs(loc, 1); err != nil {
					return err
				}
			}
			return tx.SetEntries(d.ID, first, es)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		b.Fatal(err)
	}
	// Four segments of the first page move to new slots, as
	// a copy-on-write would.
	changed := []uint64{3, 300, 600, 900}
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error {
		for i, s := range changed {
			old, err := tx.Entry(d.ID, s)
			if err != nil {
				return err
			}
			loc := table.Location{Container: cid, Slot: uint32(n) + uint32(i)}
			if err := tx.SetEntries(d.ID, s, []table.Entry{table.At(loc, false)}); err != nil {
				return err
			}
			if _, err := meta.AddRefs(tx, old.Loc, -1); err != nil {
				return err
			}
			if err := tx.SetRefs(loc, 1); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	return c, len(changed)
}
