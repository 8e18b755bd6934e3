package transport_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/rpc/protocol"
	"segmap/internal/rpc/transport"
	"segmap/internal/table"
)

// BenchmarkFaultRoundTrip measures a map fault's round trip from an agent's
// transport.Client to a controller over bbolt, through loopback gRPC, and back:
//
//   - load: a read fault on a Zero segment (plan Load: one store read, no
//     commit);
//   - allocate: a write fault on a fresh Zero segment (plan Allocate: the
//     slot is punched and flushed, and the map change committed, fsync'd,
//     before the answer).
//
// Faults are sent one at a time; p50-us and p99-us are the median and 99th
// percentile of their latencies, in microseconds.
func BenchmarkFaultRoundTrip(b *testing.B) {
	for _, bc := range []struct {
		name string
		op   protocol.FaultOp
		why  table.State
		plan table.Plan
	}{
		{"load", protocol.FaultRead, table.Invalid, table.Load},
		{"allocate", protocol.FaultWrite, table.Zero, table.Allocate},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			// One segment per fault, and a slot for each.
			segs := uint64(max(b.N, 1))
			s := newStack(b, stackOptions{lease: transport.DefaultLease, commandTimeout: 30 * time.Second, containers: 1, slots: segs + 16})
			conn := dial(b, s.addr)
			client := transport.NewClient(conn, quiet)
			a := agent.New(agent.Config{Name: "bench", Controller: client, OpenContainer: container.OpenURI})
			b.Cleanup(func() {
				a.Close()
				conn.Close()
			})
			if err := a.Attach(ctx, client); err != nil {
				b.Fatal(err)
			}
			s.createDisk(ctx, "d", segs)
			d, err := a.Open(ctx, "d") // the controller counts the agent as mapping d
			if err != nil {
				b.Fatal(err)
			}
			f := protocol.Fault{Agent: "bench", Disk: d.Info().ID, Count: 1, Op: bc.op, Reason: bc.why}
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				f.Segment = uint64(i)
				start := time.Now()
				r, err := client.Fault(ctx, f)
				lat = append(lat, time.Since(start))
				if err != nil {
					b.Fatal(err)
				}
				if len(r.Entries) != 1 {
					b.Fatalf("fault answered %+v", r)
				}
			}
			b.StopTimer()
			if n := s.ctrl.FaultCounts()[bc.plan]; n != uint64(b.N) {
				b.Fatalf("%d faults resolved by %v, want %d", n, bc.plan, b.N)
			}
			slices.Sort(lat)
			b.ReportMetric(micros(percentile(lat, 50)), "p50-us")
			b.ReportMetric(micros(percentile(lat, 99)), "p99-us")
		})
	}
}

// percentile returns the p-th percentile of sorted durations (nearest
// rank).
func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*p + 99) / 100 // ceil(n*p/100), 1-based
	return sorted[max(i, 1)-1]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
