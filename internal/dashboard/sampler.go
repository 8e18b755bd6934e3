package dashboard

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// The metrics the live graphs read (the agents' and the controller's
// instrumentation creates them). Every series of a name is summed over
// its labels; a name not registered reads as zero, so that the graphs
// are flat, not broken, on a server that lacks it.
const (
	metricRequests = "segmap_agent_requests_total"           // {disk, op}
	metricBytes    = "segmap_agent_request_bytes_total"      // {disk, op}
	metricDuration = "segmap_agent_request_duration_seconds" // histogram {disk, op}
	metricFaults   = "segmap_controller_faults_total"        // {plan}
)

// dataOps are the op label values that count as I/O for the graphs:
// flushes and trims move no data and would make the IOPS a host sees
// look higher than its reads and writes.
var dataOps = map[string]bool{"read": true, "write": true}

const (
	// SampleInterval is how often the sampler reads the metrics.
	SampleInterval = 2 * time.Second
	// SampleWindow is how far back /api/series goes.
	SampleWindow = 10 * time.Minute
)

// totals are the counters the graphs derive from, at one moment.
type totals struct {
	requests float64 // reads and writes
	bytes    float64 // bytes read and written
	durSum   float64 // seconds spent in reads and writes ...
	durCount float64 // ... over this many of them
	faults   float64
}

// Sample is one point of the live graphs: rates over the interval that
// ends at T.
type Sample struct {
	// T is the end of the interval, Unix milliseconds.
	T int64 `json:"t"`
	// IOPS is reads and writes per second.
	IOPS float64 `json:"iops"`
	// Throughput is bytes read and written per second.
	Throughput float64 `json:"throughput"`
	// Latency is the mean time of a read or write in the interval,
	// seconds (0 when there was none).
	Latency float64 `json:"latency"`
	// Faults is faults the controller handled per second.
	Faults float64 `json:"faults"`
}

// gatherTotals reads the graphs' counters from g. A family missing, or a
// metric of another type under the name, counts as zero.
func gatherTotals(g prometheus.Gatherer) (totals, error) {
	mfs, err := g.Gather()
	var t totals
	for _, mf := range mfs {
		switch mf.GetName() {
		case metricRequests:
			t.requests += sumCounters(mf, dataOps)
		case metricBytes:
			t.bytes += sumCounters(mf, dataOps)
		case metricDuration:
			for _, m := range mf.GetMetric() {
				if h := m.GetHistogram(); h != nil && opIn(m, dataOps) {
					t.durSum += h.GetSampleSum()
					t.durCount += float64(h.GetSampleCount())
				}
			}
		case metricFaults:
			t.faults += sumCounters(mf, nil)
		}
	}
	// Gather returns what it could gather along with an error about the
	// rest: use it.
	return t, err
}

// sumCounters sums the counters of mf whose op label is in ops (nil: all).
func sumCounters(mf *dto.MetricFamily, ops map[string]bool) float64 {
	var s float64
	for _, m := range mf.GetMetric() {
		if c := m.GetCounter(); c != nil && opIn(m, ops) {
			s += c.GetValue()
		}
	}
	return s
}

// opIn reports whether m's op label is in ops (nil: any m).
func opIn(m *dto.Metric, ops map[string]bool) bool {
	if ops == nil {
		return true
	}
	for _, l := range m.GetLabel() {
		if l.GetName() == "op" {
			return ops[l.GetValue()]
		}
	}
	return false
}

// rate turns two readings dt apart into a Sample ending at end. A counter
// that went down (its process restarted, a collector re-registered) counts
// as no change rather than a negative rate.
func rate(prev, cur totals, dt time.Duration, end time.Time) Sample {
	s := Sample{T: end.UnixMilli()}
	sec := dt.Seconds()
	if sec <= 0 {
		return s
	}
	delta := func(a, b float64) float64 { return max(b-a, 0) }
	s.IOPS = delta(prev.requests, cur.requests) / sec
	s.Throughput = delta(prev.bytes, cur.bytes) / sec
	s.Faults = delta(prev.faults, cur.faults) / sec
	if n := delta(prev.durCount, cur.durCount); n > 0 {
		s.Latency = delta(prev.durSum, cur.durSum) / n
	}
	return s
}

// sampler keeps the last SampleWindow of Samples, one per interval, in a
// ring.
type sampler struct {
	g   prometheus.Gatherer
	log *slog.Logger
	mu  struct {
		sync.Mutex
		ring   []Sample // len up to cap; next is where the next goes
		next   int
		prev   totals
		prevT  time.Time
		warned bool // a Gather error is logged once
	}
}

func newSampler(g prometheus.Gatherer, log *slog.Logger, now time.Time) *sampler {
	s := &sampler{g: g, log: log}
	s.mu.ring = make([]Sample, 0, int(SampleWindow/SampleInterval))
	s.mu.prev, _ = gatherTotals(g)
	s.mu.prevT = now
	return s
}

// sample reads the metrics at now and appends the rates since the last
// reading.
func (s *sampler) sample(now time.Time) {
	cur, err := gatherTotals(s.g)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil && !s.mu.warned {
		s.mu.warned = true
		s.log.Warn("dashboard: gathering metrics for the graphs", "err", err)
	}
	smp := rate(s.mu.prev, cur, now.Sub(s.mu.prevT), now)
	s.mu.prev, s.mu.prevT = cur, now
	if len(s.mu.ring) < cap(s.mu.ring) {
		s.mu.ring = append(s.mu.ring, smp)
		return
	}
	s.mu.ring[s.mu.next] = smp
	s.mu.next = (s.mu.next + 1) % len(s.mu.ring)
}

// series returns the samples, oldest first.
func (s *sampler) series() []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Sample, 0, len(s.mu.ring))
	out = append(out, s.mu.ring[s.mu.next:]...)
	return append(out, s.mu.ring[:s.mu.next]...)
}

// run samples every SampleInterval until ctx is done.
func (s *sampler) run(ctx context.Context) {
	tk := time.NewTicker(SampleInterval)
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tk.C:
			s.sample(now)
		}
	}
}
