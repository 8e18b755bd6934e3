package table_test

import (
	"runtime"
	"testing"

	"segmap/internal/table"
)

// heapAlloc returns the live heap after a full collection.
func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkMemoryPerEntry loads n mapped entries into a Table and reports
// the live heap it holds per entry (bytes/entry, from runtime.MemStats after
// GC). "dense" maps every entry of the table; "sparse" maps one entry in 16
// of a table 16 times larger (each touched page is still allocated whole).
//
//	go test -run XXX -bench MemoryPerEntry -benchtime 1x ./internal/table
func BenchmarkMemoryPerEntry(b *testing.B) {
	for _, bc := range []struct {
		name   string
		n      int
		stride int
	}{
		{"dense-1k", 1 << 10, 1},
		{"dense-1M", 1 << 20, 1},
		{"sparse-1M", 1 << 20, 16},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var perEntry float64
			for range b.N {
				before := heapAlloc()
				t := table.New(bc.n*bc.stride, table.ZeroEntry)
				for i := 0; i < bc.n; i++ {
					e := table.At(table.Location{Container: 1, Slot: uint32(i)}, false)
					if err := t.SetEntry(i*bc.stride, []table.Entry{e}); err != nil {
						b.Fatal(err)
					}
				}
				after := heapAlloc()
				perEntry = float64(after-before) / float64(bc.n)
				runtime.KeepAlive(t)
			}
			b.ReportMetric(perEntry, "bytes/entry")
		})
	}
}
