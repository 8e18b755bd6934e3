package container_test

import (
	"testing"

	"segmap/internal/container"
	"segmap/internal/rpc/protocol"
)

// BenchmarkMirror measures what a mirror itself adds to an I/O: the same
// 4 KiB write or read on one in-memory container, and on a mirror of two
// or three of them (the replicas' own work is a copy in memory, so the
// difference is the mirror's: its timeout timer, the goroutine per
// extra replica, the wait for all). Run in parallel, as an agent's many
// connections and requests in flight do.
func BenchmarkMirror(b *testing.B) {
	const slot, slots = 64 << 10, 256
	open := func(b *testing.B, n int) container.Container {
		if n == 1 {
			return container.NewMemory(7, slot, slots)
		}
		info := protocol.Container{ID: 7, SlotSize: slot, Slots: slots, Epoch: 1}
		byURI := map[string]container.Container{}
		for i := range n {
			uri := string(rune('a' + i))
			byURI[uri] = container.NewMemory(7, slot, slots)
			info.Replicas = append(info.Replicas, protocol.Replica{URI: uri})
		}
		m, err := container.OpenMirror(info, func(uri string) (container.Container, error) { return byURI[uri], nil }, &reporter{mem: info.Membership()}, 0)
		if err != nil {
			b.Fatal(err)
		}
		return m
	}
	for _, op := range []string{"write", "read"} {
		for _, n := range []int{1, 2, 3} {
			name := map[int]string{1: "single", 2: "mirror2", 3: "mirror3"}[n]
			b.Run(op+"/"+name, func(b *testing.B) {
				c := open(b, n)
				defer c.Close()
				b.SetBytes(4096)
				b.RunParallel(func(pb *testing.PB) {
					buf := make([]byte, 4096)
					var off int64
					for pb.Next() {
						var err error
						if op == "write" {
							_, err = c.WriteAt(buf, off)
						} else {
							_, err = c.ReadAt(buf, off)
						}
						if err != nil {
							b.Error(err)
							return
						}
						off = (off + 4096) % (slot * slots)
					}
				})
			})
		}
	}
}
