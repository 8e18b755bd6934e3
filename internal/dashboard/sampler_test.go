package dashboard

import (
	"log/slog"
	"math"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// instruments is what the agents and the controller register, as far as
// the graphs read it.
type instruments struct {
	reqs, bytes, faults *prometheus.CounterVec
	dur                 *prometheus.HistogramVec
}

func newInstruments(reg *prometheus.Registry) instruments {
	in := instruments{
		reqs:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricRequests, Help: "requests"}, []string{"disk", "op"}),
		bytes:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricBytes, Help: "bytes"}, []string{"disk", "op"}),
		faults: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricFaults, Help: "faults"}, []string{"plan"}),
		dur:    prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: metricDuration, Help: "latency"}, []string{"disk", "op"}),
	}
	reg.MustRegister(in.reqs, in.bytes, in.faults, in.dur)
	return in
}

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

// TestSamplerRates fills a registry as the agents would and checks the
// rates over one interval: reads and writes of every disk summed, flushes
// and trims left out of IOPS, throughput and latency; faults of every
// plan summed; the mean latency from the histogram's sum and count
// deltas.
func TestSamplerRates(t *testing.T) {
	reg := prometheus.NewRegistry()
	in := newInstruments(reg)
	// Before the sampler starts: counts it must not report as a rate.
	in.reqs.WithLabelValues("a", "read").Add(1000)
	in.dur.WithLabelValues("a", "read").Observe(5)

	t0 := time.Unix(1000, 0)
	s := newSampler(reg, slog.Default(), t0)

	in.reqs.WithLabelValues("a", "read").Add(300)
	in.reqs.WithLabelValues("b", "write").Add(100)
	in.reqs.WithLabelValues("a", "flush").Add(50) // not I/O for the graphs
	in.bytes.WithLabelValues("a", "read").Add(300 * 4096)
	in.bytes.WithLabelValues("b", "write").Add(100 * 65536)
	in.bytes.WithLabelValues("b", "trim").Add(1 << 30)
	for range 300 {
		in.dur.WithLabelValues("a", "read").Observe(0.001)
	}
	for range 100 {
		in.dur.WithLabelValues("b", "write").Observe(0.005)
	}
	in.dur.WithLabelValues("a", "flush").Observe(2)
	in.faults.WithLabelValues("load").Add(6)
	in.faults.WithLabelValues("allocate").Add(2)

	s.sample(t0.Add(2 * time.Second))
	got := s.series()
	if len(got) != 1 {
		t.Fatalf("%d samples, want 1", len(got))
	}
	g := got[0]
	want := Sample{
		T:          t0.Add(2 * time.Second).UnixMilli(),
		IOPS:       400.0 / 2,
		Throughput: (300*4096 + 100*65536) / 2.0,
		Latency:    (300*0.001 + 100*0.005) / 400,
		Faults:     8.0 / 2,
	}
	if g.T != want.T || !near(g.IOPS, want.IOPS) || !near(g.Throughput, want.Throughput) || !near(g.Latency, want.Latency) || !near(g.Faults, want.Faults) {
		t.Errorf("sample %+v, want %+v", g, want)
	}

	// An idle interval: zeros, and no latency from no requests.
	s.sample(t0.Add(4 * time.Second))
	if g := s.series()[1]; g.IOPS != 0 || g.Throughput != 0 || g.Latency != 0 || g.Faults != 0 {
		t.Errorf("idle interval: %+v, want zeros", g)
	}
}

// TestSamplerNoMetrics: a registry without the metrics gives flat graphs.
func TestSamplerNoMetrics(t *testing.T) {
	t0 := time.Unix(1000, 0)
	s := newSampler(prometheus.NewRegistry(), slog.Default(), t0)
	s.sample(t0.Add(2 * time.Second))
	if got := s.series(); len(got) != 1 || got[0] != (Sample{T: t0.Add(2 * time.Second).UnixMilli()}) {
		t.Errorf("series %+v, want one zero sample", got)
	}
}

func TestRate(t *testing.T) {
	end := time.Unix(50, 0)
	for _, tt := range []struct {
		name      string
		prev, cur totals
		dt        time.Duration
		want      Sample
	}{
		{"steady", totals{requests: 10, bytes: 100, durSum: 1, durCount: 10, faults: 1},
			totals{requests: 30, bytes: 500, durSum: 1.5, durCount: 30, faults: 5}, 2 * time.Second,
			Sample{T: 50000, IOPS: 10, Throughput: 200, Latency: 0.025, Faults: 2}},
		{"counter reset counts as no change", totals{requests: 100, bytes: 100, durSum: 9, durCount: 100, faults: 7},
			totals{requests: 5, bytes: 50, durSum: 1, durCount: 5, faults: 0}, 2 * time.Second,
			Sample{T: 50000}},
		{"no time passed", totals{}, totals{requests: 5}, 0, Sample{T: 50000}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := rate(tt.prev, tt.cur, tt.dt, end); got != tt.want {
				t.Errorf("rate = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestSamplerRing: the ring keeps the last SampleWindow, oldest first.
func TestSamplerRing(t *testing.T) {
	t0 := time.Unix(0, 0)
	s := newSampler(prometheus.NewRegistry(), slog.Default(), t0)
	n := int(SampleWindow / SampleInterval)
	for i := 1; i <= n+25; i++ {
		s.sample(t0.Add(time.Duration(i) * SampleInterval))
	}
	got := s.series()
	if len(got) != n {
		t.Fatalf("%d samples, want %d", len(got), n)
	}
	for i, smp := range got {
		if want := t0.Add(time.Duration(i+26) * SampleInterval).UnixMilli(); smp.T != want {
			t.Fatalf("sample %d at %d, want %d (oldest first, the first 25 dropped)", i, smp.T, want)
		}
	}
}
