package controller_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// BenchmarkSnapshot takes snapshots of a disk with 1 thousand to 1
// million allocated segments (64 KiB segments, mapped straight in the
// store rather than written), with two agents mapping it, and reports the median time per snapshot (p50-ms) beside
// the mean. Snapshots share table pages: the cost should not grow with
// the disk.
//
//	go test -run XXX -bench Snapshot -benchtime 20x ./internal/controller
func BenchmarkSnapshot(b *testing.B) {
	for _, n := range []uint64{1_000, 10_000, 100_000, 1_000_000} {
		b.Run(fmt.Sprintf("segments=%d", n), func(b *testing.B) {
			ctx := context.Background()
			c, err := standalone.Open(ctx, b.TempDir(), standalone.Options{
				Agents: []string{"host-a", "host-b"},
				Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: n, Count: 1}},
			})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			d, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "d", Size: n * seg, SegmentSize: seg})
			if err != nil {
				b.Fatal(err)
			}
			cs, err := c.Ctrl.ListContainers(ctx)
			if err != nil {
				b.Fatal(err)
			}
			// Map every segment, in chunks of 64Ki entries per
			// transaction.
			const chunk = 1 << 16
			for first := uint64(0); first < n; first += chunk {
				k := min(chunk, n-first)
				err := c.Store.Update(ctx, func(tx *meta.Tx) error {
					es := make([]table.Entry, k)
					for i := range es {
						loc := table.Location{Container: cs[0].ID, Slot: uint32(first) + uint32(i)}
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
			// Both agents map the disk and load its first thousand
			// entries (a whole-disk No-write costs them O(1) however
			// many they hold: see table.Table).
			for _, a := range c.Agents {
				ad, err := a.Open(ctx, "d")
				if err != nil {
					b.Fatal(err)
				}
				buf := make([]byte, 512)
				for s := range uint64(1000) {
					if err := ad.ReadAt(ctx, buf, s*seg); err != nil {
						b.Fatal(err)
					}
				}
			}
			times := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{fmt.Sprintf("s%d", i)}}); err != nil {
					b.Fatal(err)
				}
				times = append(times, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(times)
			b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "p50-ms")
			if problems, err := c.Ctrl.Check(ctx); err != nil || len(problems) > 0 {
				b.Fatalf("check after the snapshots: %v %v", problems, err)
			}
		})
	}
}
