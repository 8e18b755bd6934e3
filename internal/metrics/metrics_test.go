package metrics

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"segmap/internal/nbd"
)

// TestRequestAllocs checks that the per-request path (nbd.ExportMetrics
// on a connection's hot path) and an agent disk's fault and hold counts
// allocate nothing once the export's operation was seen.
func TestRequestAllocs(t *testing.T) {
	a := NewAgent(prometheus.NewRegistry())
	e := a.NBD.Export("vm1")
	for o := range nbd.NumOps {
		e.Request(o, 4096, 0, time.Microsecond) // resolve each op once
	}
	if n := testing.AllocsPerRun(1000, func() {
		e.Request(nbd.OpRead, 4096, 0, 30*time.Microsecond)
		e.Request(nbd.OpWrite, 4096, 0, 50*time.Microsecond)
		e.Request(nbd.OpFlush, 0, 0, time.Millisecond)
	}); n != 0 {
		t.Errorf("Request: %v allocations per run, want 0", n)
	}
	d := a.Disk("vm1")
	if n := testing.AllocsPerRun(1000, func() {
		d.Fault(time.Millisecond)
		d.Held(HoldQuiesced, 1, 0)
		d.Held(HoldQuiesced, -1, time.Millisecond)
	}); n != 0 {
		t.Errorf("AgentDisk: %v allocations per run, want 0", n)
	}
	var nilDisk *AgentDisk
	if n := testing.AllocsPerRun(100, func() { nilDisk.Fault(time.Second) }); n != 0 {
		t.Errorf("nil AgentDisk: %v allocations per run, want 0", n)
	}
}

// TestRequestCounts checks what a request adds: requests and duration
// always, bytes on success, an error by errno on failure.
func TestRequestCounts(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewStorage(reg)
	e := m.Export("x")
	e.Connected(1)
	for range 3 {
		e.Request(nbd.OpWrite, 4096, 0, time.Millisecond)
	}
	e.Request(nbd.OpWrite, 4096, 28, time.Millisecond) // ENOSPC
	e.Request(nbd.OpRead, 512, 5, time.Millisecond)    // EIO
	if m.Export("x") != e {
		t.Errorf("Export resolved twice for one name")
	}
	for _, c := range []struct {
		c    prometheus.Collector
		want float64
	}{
		{m.requests.WithLabelValues("x", "write"), 4},
		{m.bytes.WithLabelValues("x", "write"), 3 * 4096},
		{m.requests.WithLabelValues("x", "read"), 1},
		{m.bytes.WithLabelValues("x", "read"), 0},
		{m.errors.WithLabelValues("x", "write", "ENOSPC"), 1},
		{m.errors.WithLabelValues("x", "read", "EIO"), 1},
		{m.conns.WithLabelValues("x"), 1},
	} {
		if got := testutil.ToFloat64(c.c); got != c.want {
			t.Errorf("%v: %v, want %v", c.c, got, c.want)
		}
	}
	if n := testutil.CollectAndCount(m.duration); n != 2 {
		t.Errorf("duration: %d series, want 2 (read, write)", n)
	}
}

// TestLint runs client_golang's linter (promlint) over every family, each
// with a sample, and the controller's state gauges.
func TestLint(t *testing.T) {
	fs, err := Families()
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) < 20 {
		t.Fatalf("%d families, want every one", len(fs))
	}
	reg := sampled()
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// TestDocCurrent checks that docs/metrics.md is what the code generates.
func TestDocCurrent(t *testing.T) {
	var b bytes.Buffer
	if err := Markdown(&b); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, b.Bytes()) {
		t.Errorf("docs/metrics.md is stale: run go run ./scripts/metricsdoc > docs/metrics.md")
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	want, ok, err := ReplaceReadme(readme)
	switch {
	case err != nil:
		t.Fatal(err)
	case !ok:
		t.Errorf("README.md has no metric table between %q and %q", ReadmeBegin, ReadmeEnd)
	case !bytes.Equal(want, readme):
		t.Errorf("README.md's metric table is stale: run go run ./scripts/metricsdoc -readme README.md")
	}
}

// TestStateGauges checks the controller's scrape-time gauges, and that a
// failing state read is counted, not fatal.
func TestStateGauges(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := NewController(reg, func(context.Context) (State, error) {
		return State{Disks: map[string]int{"disk": 2, "snapshot": 1}, Agents: map[string]int{"h1": 2},
			Containers: []ContainerState{{ID: 7, State: "online", Used: 5, Free: 11}}}, nil
	})
	want := `
# HELP segmap_controller_agents Agents attached to the controller.
# TYPE segmap_controller_agents gauge
segmap_controller_agents 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "segmap_controller_agents"); err != nil {
		t.Error(err)
	}
	n, err := testutil.GatherAndCount(reg, "segmap_controller_container_slots", "segmap_controller_disks")
	if err != nil || n != 4 {
		t.Errorf("slots and disks: %d series (%v), want 4", n, err)
	}
	c.SetState(func(context.Context) (State, error) { return State{}, context.DeadlineExceeded })
	// Two scrapes fail from here: this count and the comparison's.
	if n, _ := testutil.GatherAndCount(reg, "segmap_controller_disks"); n != 0 {
		t.Errorf("disks after a failed read: %d series, want 0", n)
	}
	want = `
# HELP segmap_controller_state_scrape_errors_total Scrapes whose read of the controller's state failed (the state gauges are then absent).
# TYPE segmap_controller_state_scrape_errors_total counter
segmap_controller_state_scrape_errors_total 2
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "segmap_controller_state_scrape_errors_total"); err != nil {
		t.Error(err)
	}
}

// BenchmarkRequest is the cost the metrics add to one NBD request: what a
// connection calls once its reply is written (plus the two clock readings
// of internal/nbd, not counted here).
func BenchmarkRequest(b *testing.B) {
	e := NewAgent(prometheus.NewRegistry()).NBD.Export("vm1")
	e.Request(nbd.OpWrite, 4096, 0, time.Microsecond)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			e.Request(nbd.OpWrite, 4096, 0, 80*time.Microsecond)
		}
	})
}
