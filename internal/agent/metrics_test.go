package agent

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"segmap/internal/metrics"
)

// sample returns the value of the sample of family name whose labels
// include want, or -1 if there is none.
func sample(t *testing.T, reg *prometheus.Registry, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for k, v := range want {
				found := false
				for _, l := range m.GetLabel() {
					found = found || l.GetName() == k && l.GetValue() == v
				}
				if !found {
					continue next
				}
			}
			switch {
			case m.Gauge != nil:
				return m.GetGauge().GetValue()
			case m.Counter != nil:
				return m.GetCounter().GetValue()
			case m.Histogram != nil:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return -1
}

// TestMetricsHeldAndFaults: I/O held by a quiesce shows in the disk's
// held gauge while it waits, and in its held seconds once activated; the
// faults the disk sends are counted.
func TestMetricsHeldAndFaults(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	m := metrics.NewAgent(reg)
	e.d.met = m.Disk("d") // the env's disk was opened without metrics
	quiesced := map[string]string{"disk": "d", "reason": "quiesced"}

	// A first read of an unloaded segment faults.
	if err := e.d.ReadAt(e.ctx, make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	if n := sample(t, reg, "segmap_agent_faults_total", map[string]string{"disk": "d"}); n < 1 {
		t.Errorf("faults: %v, want at least 1", n)
	}
	if n, f := sample(t, reg, "segmap_agent_fault_duration_seconds", map[string]string{"disk": "d"}), sample(t, reg, "segmap_agent_faults_total", map[string]string{"disk": "d"}); n != f {
		t.Errorf("fault latencies %v, faults %v", n, f)
	}

	if err := await(t, async(func() error { return e.a.Quiesce(e.ctx, tDisk, 0) }), "quiesce"); err != nil {
		t.Fatal(err)
	}
	r := async(func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), 0) })
	blocked(t, r, "read while quiesced")
	waitUntil(t, "the held gauge", func() bool { return sample(t, reg, "segmap_agent_io_held", quiesced) == 1 })
	if err := e.a.Activate(e.ctx, tDisk); err != nil {
		t.Fatal(err)
	}
	if err := await(t, r, "read after activate"); err != nil {
		t.Fatal(err)
	}
	if n := sample(t, reg, "segmap_agent_io_held", quiesced); n != 0 {
		t.Errorf("held after activate: %v, want 0", n)
	}
	if s := sample(t, reg, "segmap_agent_io_held_seconds_total", quiesced); s <= 0 {
		t.Errorf("held seconds: %v, want some", s)
	}
	if n := sample(t, reg, "segmap_agent_lease_held", nil); n != 1 {
		t.Errorf("lease held: %v, want 1 (no lease granted)", n)
	}
}

// waitUntil polls cond until it holds, failing t after mustFinish.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(mustFinish)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, mustFinish)
		}
		time.Sleep(time.Millisecond)
	}
}
