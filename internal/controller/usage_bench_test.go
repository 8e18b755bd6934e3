package controller_test

import (
	"context"
	"fmt"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// BenchmarkSnapshotsHold measures what 'disk list' and 'status' pay to
// count what snapshots hold: a disk of n mapped segments, a snapshot of
// it, and every other segment of the disk moved to a new slot since
// (mapped straight in the store), so that half the snapshot's slots are
// its alone. DiskUsage of the disk is measured beside it.
//
//	go test -run XXX -bench SnapshotsHold -benchtime 5x ./internal/controller
func BenchmarkSnapshotsHold(b *testing.B) {
	for _, n := range []uint64{10_000, 100_000, 1_000_000} {
		ctx := context.Background()
		c, err := standalone.Open(ctx, b.TempDir(), standalone.Options{
			Agents: []string{"host-a"},
			Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: 2 * n, Count: 1}},
		})
		if err != nil {
			b.Fatal(err)
		}
		d, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "d", Size: n * seg, SegmentSize: seg})
		if err != nil {
			b.Fatal(err)
		}
		cs, err := c.Ctrl.ListContainers(ctx)
		if err != nil {
			b.Fatal(err)
		}
		// mapAll maps segment i to slot base+i (every step-th segment).
		mapAll := func(base, step uint64) {
			const chunk = 1 << 16
			for first := uint64(0); first < n; first += chunk {
				k := min(chunk, n-first)
				err := c.Store.Update(ctx, func(tx *meta.Tx) error {
					es, err := tx.Entries(d.ID, first, k)
					if err != nil {
						return err
					}
					for i := range es {
						if (first+uint64(i))%step != 0 {
							continue
						}
						loc := table.Location{Container: cs[0].ID, Slot: uint32(base + first + uint64(i))}
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
		}
		mapAll(0, 1)
		if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
			b.Fatal(err)
		}
		mapAll(n, 2)
		b.Run(fmt.Sprintf("segments=%d/snapshots-hold", n), func(b *testing.B) {
			for b.Loop() {
				held, err := c.Ctrl.FamilySnapshotsHold(ctx, "d")
				if err != nil {
					b.Fatal(err)
				}
				if want := (n / 2) * seg; held != want {
					b.Fatalf("snapshots hold %d, want %d", held, want)
				}
			}
		})
		b.Run(fmt.Sprintf("segments=%d/disk-usage", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := c.Ctrl.DiskUsage(ctx, "d"); err != nil {
					b.Fatal(err)
				}
			}
		})
		if err := c.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
