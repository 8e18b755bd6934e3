package standalone_test

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"testing"

	"segmap/internal/agent/nbdexport"
	"segmap/internal/controller"
	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/standalone"
)

const (
	benchSeg  = 1 << 20
	benchSize = 128 << 20
)

// BenchmarkNBD measures the whole data path of 'segmap up': package nbdclient's
// client over loopback TCP, the NBD server, nbdexport.Backend, the agent and a
// file container, on a disk whose every segment is allocated. allocs/op
// counts the client's allocations too (a few per request).
//
//	go test -run XXX -bench BenchmarkNBD -benchmem -count 5 ./internal/standalone
func BenchmarkNBD(b *testing.B) {
	ctx := context.Background()
	c, err := standalone.Open(ctx, b.TempDir(), standalone.Options{
		Pool:   []standalone.PoolSpec{{SlotSize: benchSeg, Slots: benchSize / benchSeg, Count: 1}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "bench", Size: benchSize, SegmentSize: benchSeg}); err != nil {
		b.Fatal(err)
	}
	addr := serveNBD(b, c)
	cl, err := nbdclient.Dial(ctx, addr, "bench", nbdclient.ClientConfig{})
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	// Allocate every segment, so that no I/O below faults.
	buf := make([]byte, benchSeg)
	for off := uint64(0); off < benchSize; off += benchSeg {
		if err := cl.WriteAt(ctx, buf, off, false); err != nil {
			b.Fatal(err)
		}
	}

	for _, bc := range []struct {
		op     string
		size   int
		qd     int
		random bool
	}{
		{"randread", 4 << 10, 1, true},
		{"randread", 4 << 10, 32, true},
		{"randwrite", 4 << 10, 1, true},
		{"randwrite", 4 << 10, 32, true},
		{"read", 1 << 20, 8, false},
		{"write", 1 << 20, 8, false},
	} {
		b.Run(fmt.Sprintf("op=%s/bs=%dk/qd=%d", bc.op, bc.size>>10, bc.qd), func(b *testing.B) {
			write := bc.op == "write" || bc.op == "randwrite"
			blocks := int64(benchSize / bc.size)
			b.SetBytes(int64(bc.size))
			b.ReportAllocs()
			var next sync.Mutex
			i := 0
			var wg sync.WaitGroup
			b.ResetTimer()
			for g := range bc.qd {
				wg.Add(1)
				go func() {
					defer wg.Done()
					p := make([]byte, bc.size)
					rng := rand.New(rand.NewPCG(uint64(g), 1))
					for {
						next.Lock()
						n := i
						i++
						next.Unlock()
						if n >= b.N {
							return
						}
						off := uint64(int64(n)%blocks) * uint64(bc.size)
						if bc.random {
							off = uint64(rng.Int64N(blocks)) * uint64(bc.size)
						}
						var err error
						if write {
							err = cl.WriteAt(ctx, p, off, false)
						} else {
							err = cl.ReadAt(ctx, p, off)
						}
						if err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}

// serveNBD serves c's first agent over NBD on loopback (nbdexport, as
// 'segmap up' does) until the test ends, and returns the address.
func serveNBD(tb testing.TB, c *standalone.Cluster) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Backend: nbdexport.Backend(c.Ctrl, c.Agents[0]), Errno: nbdexport.Errno,
		Logger: slog.New(slog.DiscardHandler)})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	tb.Cleanup(func() {
		srv.Close()
		<-served
	})
	return l.Addr().String()
}
