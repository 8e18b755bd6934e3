package agent_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/controller"
	"segmap/internal/standalone"
)

const (
	benchSeg  = 1 << 20
	benchSize = 256 << 20
)

// benchEnv is a disk whose every segment is allocated, and a plain file of
// the same size beside it: the direct pread/pwrite peer.
type benchEnv struct {
	c      *standalone.Cluster
	d      *agent.Disk
	direct *os.File
}

func newBenchEnv(b *testing.B) *benchEnv {
	b.Helper()
	ctx := context.Background()
	dir := b.TempDir()
	c, err := standalone.Open(ctx, dir, standalone.Options{Pool: []standalone.PoolSpec{{SlotSize: benchSeg, Slots: 2 * benchSize / benchSeg, Count: 1}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "bench", Size: benchSize, SegmentSize: benchSeg}); err != nil {
		b.Fatal(err)
	}
	d, err := c.Agents[0].Open(ctx, "bench")
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "direct"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	buf := make([]byte, benchSeg)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	// Fill both, segment by segment, alternating, so neither gets the
	// page cache's better half.
	for off := int64(0); off < benchSize; off += benchSeg {
		if err := d.WriteAt(ctx, buf, uint64(off), false); err != nil {
			b.Fatal(err)
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := d.Flush(ctx); err != nil {
		b.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	return &benchEnv{c: c, d: d, direct: f}
}

// ioFn does one I/O of p at off.
type ioFn func(p []byte, off int64) error

func (e *benchEnv) fns(write bool) (seg, dir ioFn) {
	ctx := context.Background()
	if write {
		return func(p []byte, off int64) error { return e.d.WriteAt(ctx, p, uint64(off), false) },
			func(p []byte, off int64) error { _, err := e.direct.WriteAt(p, off); return err }
	}
	return func(p []byte, off int64) error { return e.d.ReadAt(ctx, p, uint64(off)) },
		func(p []byte, off int64) error { _, err := e.direct.ReadAt(p, off); return err }
}

// BenchmarkDataPath measures I/O through an agent to a file container and
// the same I/O with pread/pwrite on a plain file, interleaved in rounds so
// that both see the same machine, and reports both and their ratio
// (direct time / agent time: 1.0 means as fast as direct, above is faster).
//
//	go test -run XXX -bench DataPath -count 5 ./internal/agent
func BenchmarkDataPath(b *testing.B) {
	env := newBenchEnv(b)
	for _, bc := range []struct {
		name   string
		size   int
		random bool
		write  bool
		par    int
	}{
		{"read-4k-random", 4 << 10, true, false, 1},
		{"write-4k-random", 4 << 10, true, true, 1},
		{"read-4k-random-qd8", 4 << 10, true, false, 8},
		{"write-4k-random-qd8", 4 << 10, true, true, 8},
		{"read-1m-seq", 1 << 20, false, false, 1},
		{"write-1m-seq", 1 << 20, false, true, 1},
	} {
		b.Run(bc.name, func(b *testing.B) {
			segFn, dirFn := env.fns(bc.write)
			var segT, dirT time.Duration
			const round = 256
			b.SetBytes(int64(bc.size))
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(round, b.N-done)
				// Alternate which goes first, so neither always
				// follows the other's writeback or cache warm-up.
				if (done/round)%2 == 0 {
					segT += runIO(b, segFn, bc.size, bc.random, bc.par, n, done)
					dirT += runIO(b, dirFn, bc.size, bc.random, bc.par, n, done)
				} else {
					dirT += runIO(b, dirFn, bc.size, bc.random, bc.par, n, done)
					segT += runIO(b, segFn, bc.size, bc.random, bc.par, n, done)
				}
				done += n
			}
			b.StopTimer()
			b.ReportMetric(float64(segT.Nanoseconds())/float64(b.N), "agent-ns/op")
			b.ReportMetric(float64(dirT.Nanoseconds())/float64(b.N), "direct-ns/op")
			b.ReportMetric(float64(dirT)/float64(segT), "direct/agent")
		})
	}
}

// runIO does n I/Os with par goroutines and returns the time taken.
func runIO(b *testing.B, fn ioFn, size int, random bool, par, n, start int) time.Duration {
	var wg sync.WaitGroup
	t0 := time.Now()
	for g := 0; g < par; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, size)
			rng := rand.New(rand.NewPCG(uint64(start), uint64(g)))
			for i := g; i < n; i += par {
				var off int64
				if random {
					off = rng.Int64N(benchSize/int64(size)) * int64(size)
				} else {
					off = int64((start+i)*size) % benchSize
				}
				if err := fn(p, off); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(t0)
}
