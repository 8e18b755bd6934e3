package meta_test

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"segmap/internal/etcdtest"
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
			s, err := meta.OpenBolt(filepath.Join(b.TempDir(), "meta.db"))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			benchUpdates(b, goroutines, s, func() int { return meta.BoltTxID(s) })
		})
	}
}

// BenchmarkUpdateParallelEtcd is BenchmarkUpdateParallel on an embedded
// etcd member (which does not fsync: the figure is etcd's and the
// client's work per commit, not a disk's); commits are read from etcd's
// revision, which each Txn that writes advances by one.
func BenchmarkUpdateParallelEtcd(b *testing.B) {
	endpoint := etcdtest.StartOne(b)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	for i, goroutines := range []int{1, 32} {
		b.Run(fmt.Sprintf("goroutines=%d", goroutines), func(b *testing.B) {
			s, err := meta.OpenEtcd(b.Context(), cli, fmt.Sprintf("/bench/%d/%d/", i, b.N))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			benchUpdates(b, goroutines, s, func() int {
				resp, err := cli.Get(b.Context(), "/bench-revision")
				if err != nil {
					b.Fatal(err)
				}
				return int(resp.Header.Revision)
			})
		})
	}
}

// benchUpdates runs the benchmark on s; commits returns a count that
// each commit advances by one.
func benchUpdates(b *testing.B, goroutines int, s meta.Store, commits func() int) {
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
	before := commits()
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
	b.ReportMetric(float64(commits()-before)/float64(b.N), "commits/op")
}
