package controller_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// BenchmarkFirstWriteAfterSnapshot times the first 4 KiB write into a
// segment shared with a snapshot (a forward copy-on-write), in process
// over container files, one write per segment, with the agent copying
// (staged) or the controller (ControllerCopies), at depth 1 and 32. Every
// 64 writes (every segment written once) the timer stops for a fresh
// snapshot, and the one before is deleted.
//
//	go test -run XXX -bench FirstWriteAfterSnapshot -benchtime 640x ./internal/controller
func BenchmarkFirstWriteAfterSnapshot(b *testing.B) {
	const segs = 64
	for _, mode := range []struct {
		name string
		ctrl bool
	}{{"agent", false}, {"controller", true}} {
		for _, ss := range []uint64{64 << 10, 1 << 20} {
			for _, qd := range []int{1, 32} {
				b.Run(fmt.Sprintf("%s/seg=%dk/qd=%d", mode.name, ss>>10, qd), func(b *testing.B) {
					ctx := context.Background()
					c, err := standalone.Open(ctx, b.TempDir(), standalone.Options{
						Agents:           []string{"a"},
						Pool:             []standalone.PoolSpec{{SlotSize: ss, Slots: 4 * segs, Count: 1}},
						ControllerCopies: mode.ctrl,
						Logger:           slog.New(slog.NewTextHandler(io.Discard, nil)),
					})
					if err != nil {
						b.Fatal(err)
					}
					defer c.Close()
					if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "d", Size: segs * ss, SegmentSize: ss, Policy: table.Forward}); err != nil {
						b.Fatal(err)
					}
					d, err := c.Agents[0].Open(ctx, "d")
					if err != nil {
						b.Fatal(err)
					}
					if err := d.WriteAt(ctx, pattern(int(segs*ss), 1), 0, false); err != nil {
						b.Fatal(err)
					}
					p := pattern(4096, 2)
					snap := 0
					round := func() {
						b.StopTimer()
						defer b.StartTimer()
						snap++
						if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{fmt.Sprintf("s%d", snap)}}); err != nil {
							b.Fatal(err)
						}
						if snap > 1 {
							if err := c.Ctrl.DeleteDisk(ctx, fmt.Sprintf("s%d", snap-1)); err != nil {
								b.Fatal(err)
							}
						}
					}
					b.ResetTimer()
					for n := 0; n < b.N; n += segs {
						round()
						k := min(segs, b.N-n)
						var wg sync.WaitGroup
						next := make(chan int, k)
						for i := range k {
							next <- i
						}
						close(next)
						for range min(qd, k) {
							wg.Go(func() {
								for i := range next {
									if err := d.WriteAt(ctx, p, uint64(i)*ss, false); err != nil {
										b.Error(err)
									}
								}
							})
						}
						wg.Wait()
					}
				})
			}
		}
	}
}
