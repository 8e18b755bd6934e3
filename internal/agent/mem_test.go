package agent_test

import (
	"context"
	"runtime"
	"testing"

	"segmap/internal/agent"
	"segmap/internal/rpc/protocol"
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

// BenchmarkMemoryPerEntry measures what an agent holds per mapped entry of
// its volatile tables: a disk of n segments is opened (NewTable) and every
// entry loaded with set_entry commands of 1024 entries, as a controller
// does; bytes/entry is the live heap growth (runtime.MemStats after GC)
// divided by n.
//
//	go test -run XXX -bench MemoryPerEntry -benchtime 1x ./internal/agent
func BenchmarkMemoryPerEntry(b *testing.B) {
	ctx := context.Background()
	for _, bc := range []struct {
		name string
		n    uint64
	}{
		{"1k", 1 << 10},
		{"1M", 1 << 20},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var perEntry float64
			for range b.N {
				a := agent.New(agent.Config{Name: "mem"})
				chunk := make([]table.Entry, 1024)
				before := heapAlloc()
				info := protocol.Disk{ID: 1, Name: "d", Size: bc.n << 16, SegmentSize: 1 << 16}
				if err := a.NewTable(ctx, info); err != nil {
					b.Fatal(err)
				}
				for first := uint64(0); first < bc.n; first += uint64(len(chunk)) {
					m := min(uint64(len(chunk)), bc.n-first)
					for i := range chunk[:m] {
						chunk[i] = table.At(table.Location{Container: 1, Slot: uint32(first) + uint32(i)}, false)
					}
					if err := a.SetEntry(ctx, protocol.SetEntry{Disk: 1, First: first, Entries: chunk[:m]}); err != nil {
						b.Fatal(err)
					}
				}
				after := heapAlloc()
				perEntry = float64(after-before) / float64(bc.n)
				runtime.KeepAlive(a)
				a.Close()
			}
			b.ReportMetric(perEntry, "bytes/entry")
		})
	}
}
