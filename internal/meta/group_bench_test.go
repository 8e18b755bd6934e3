package meta_test

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// BenchmarkUpdateParallel measures Store.Update on a bbolt file, each
// Update the map change of one fault: a table entry of the goroutine's own
// disk pointed at a fresh slot, and that slot's reference count. It runs
// with 1 goroutine (queue depth 1: no added delay may show) and with 32
// (the controller resolving faults of many disks at once), and reports the
// store's commits per Update, read from bbolt's transaction id.
func BenchmarkUpdateParallel(b *testing.B) {
	for _, goroutines := range []int{1, 32} {
		b.Run(fmt.Sprintf("goroutines=%d", goroutines), func(b *testing.B) {
			benchUpdates(b, goroutines)
		})
	}
}

func benchUpdates(b *testing.B, goroutines int) {
	path := filepath.Join(b.TempDir(), "meta.db")
	s, err := meta.OpenBolt(path)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	const slotsEach = 1 << 12
	ctx := context.Background()
	var cid uint32
	disks := make([]meta.DiskID, goroutines)
	if err := s.Update(ctx, func(tx *meta.Tx) error {
		c, err := tx.AddContainer(meta.Container{URI: "c", SlotSize: 1 << 16, Slots: uint64(goroutines) * slotsEach})
		if err != nil {
			return err
		}
		cid = c.ID
		for g := range disks {
			d, err := tx.CreateDisk(meta.Disk{Name: fmt.Sprintf("d%d", g), Size: slotsEach << 16, SegmentSize: 1 << 16,
				Policy: table.Forward, Created: time.Unix(1, 0)})
			if err != nil {
				return err
			}
			disks[g] = d.ID
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	// fault maps entry i of goroutine g's disk to a slot of its own.
	fault := func(g int, i uint64) error {
		seg := i % slotsEach
		loc := table.Location{Container: cid, Slot: uint32(uint64(g)*slotsEach + seg)}
		return s.Update(ctx, func(tx *meta.Tx) error {
			if err := tx.SetEntries(disks[g], seg, []table.Entry{table.At(loc, false)}); err != nil {
				return err
			}
			return tx.SetRefs(loc, 1)
		})
	}
	before := meta.BoltTxID(s)
	b.ResetTimer()
	if goroutines == 1 {
		for i := range uint64(b.N) {
			if err := fault(0, i); err != nil {
				b.Fatal(err)
			}
		}
	} else {
		var next atomic.Int64
		b.SetParallelism(max(1, goroutines/runtime.GOMAXPROCS(0)))
		b.RunParallel(func(pb *testing.PB) {
			g := int(next.Add(1)-1) % goroutines
			for i := uint64(0); pb.Next(); i++ {
				if err := fault(g, i); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.StopTimer()
	b.ReportMetric(float64(meta.BoltTxID(s)-before)/float64(b.N), "commits/op")
}
