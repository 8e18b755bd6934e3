package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"segmap/internal/heldport"
	"segmap/internal/tlsconf"
)

// scrape is one read of a server's /metrics.
type scrape map[string]*dto.MetricFamily

// scrapeMetrics reads base's /metrics (base: the server's printed URL)
// with client, and checks it with client_golang's linter (promlint): no
// exposed family may have a problem.
func scrapeMetrics(t *testing.T, client *http.Client, base string) scrape {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(base, "/")+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", base, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s %v\n%s", base, resp.Status, err, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("scrape %s: parse: %v", base, err)
	}
	var list []*dto.MetricFamily
	for _, mf := range mfs {
		list = append(list, mf)
	}
	problems, err := promlint.NewWithMetricFamilies(list).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, pr := range problems {
		t.Errorf("%s: promlint: %s: %s", base, pr.Metric, pr.Text)
	}
	return mfs
}

// value returns the sum of family name's samples whose labels include
// every pair of labels ("k=v"): a counter's or gauge's value, a
// histogram's count.
func (s scrape) value(name string, labels ...string) float64 {
	mf := s[name]
	if mf == nil {
		return 0
	}
	var sum float64
next:
	for _, m := range mf.GetMetric() {
		for _, kv := range labels {
			k, v, _ := strings.Cut(kv, "=")
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return sum
}

// fioIO is what fio's JSON says a job did in one direction.
type fioIO struct {
	TotalIOs uint64 `json:"total_ios"`
	IOBytes  uint64 `json:"io_bytes"`
}

// runFioJSON runs fio's nbd engine on uri with args and returns what it
// reports it read and wrote.
func runFioJSON(t *testing.T, uri string, args ...string) (read, write fioIO) {
	t.Helper()
	out := run(t, 2*time.Minute, "fio", append([]string{"--ioengine=nbd", "--uri=" + uri, "--output-format=json"}, args...)...)
	i := strings.Index(out, "{") // fio's nbd engine may print a line first
	if i < 0 {
		t.Fatalf("fio printed no JSON:\n%s", out)
	}
	var res struct {
		Jobs []struct {
			Error int   `json:"error"`
			Read  fioIO `json:"read"`
			Write fioIO `json:"write"`
		} `json:"jobs"`
	}
	if err := json.NewDecoder(strings.NewReader(out[i:])).Decode(&res); err != nil || len(res.Jobs) != 1 || res.Jobs[0].Error != 0 {
		t.Fatalf("fio JSON: %v\n%s", err, out)
	}
	return res.Jobs[0].Read, res.Jobs[0].Write
}

// near fails t unless got is within 5 % of want (and want is not 0).
func near(t *testing.T, what string, got, want float64) {
	t.Helper()
	if want == 0 || math.Abs(got-want) > 0.05*want {
		t.Errorf("%s: metrics say %v, fio %v (more than 5 %% apart)", what, got, want)
	} else {
		t.Logf("%s: metrics %v, fio %v", what, got, want)
	}
}

// checkFioCounts checks that the request counters of prefix
// (segmap_agent, segmap_storage) for the export label lbl moved, from
// before to after, by what fio reported.
func checkFioCounts(t *testing.T, before, after scrape, prefix, lbl string, read, write fioIO) {
	t.Helper()
	d := func(name string, labels ...string) float64 {
		return after.value(name, labels...) - before.value(name, labels...)
	}
	near(t, prefix+" reads", d(prefix+"_requests_total", lbl, "op=read"), float64(read.TotalIOs))
	near(t, prefix+" writes", d(prefix+"_requests_total", lbl, "op=write"), float64(write.TotalIOs))
	near(t, prefix+" bytes read", d(prefix+"_request_bytes_total", lbl, "op=read"), float64(read.IOBytes))
	near(t, prefix+" bytes written", d(prefix+"_request_bytes_total", lbl, "op=write"), float64(write.IOBytes))
	near(t, prefix+" read latencies", d(prefix+"_request_duration_seconds", lbl, "op=read"), float64(read.TotalIOs))
	near(t, prefix+" write latencies", d(prefix+"_request_duration_seconds", lbl, "op=write"), float64(write.TotalIOs))
	if n := after.value(prefix+"_request_errors_total", lbl); n != 0 {
		t.Errorf("%s: %v request errors, want none", prefix, n)
	}
}

// fioJob is the job the metrics tests run: a known number of 4 KiB random
// reads and writes.
// and a flush at the end (which makes the controller commit the map
// changes it kept in memory: the slot gauges read the store).
var fioJob = []string{"--name=m", "--rw=randrw", "--bs=4k", "--iodepth=8", "--size=64M", "--number_ios=4000", "--randseed=17", "--end_fsync=1"}

// TestMetricsUnderFio: 'segmap up' and a storage node, each with its HTTP
// listener, serve fio; their /metrics move by what fio reports (requests
// and bytes, read and write, within 5 %), a new disk's first writes count
// faults in the agent and the controller, and client_golang's linter
// finds no problem in any exposed family.
func TestMetricsUnderFio(t *testing.T) {
	t.Parallel()
	requireTools(t, "fio")
	plain := &http.Client{Timeout: 10 * time.Second}

	t.Run("up", func(t *testing.T) {
		u := startUp(t, t.TempDir())
		if u.http == "" {
			t.Fatal("segmap up printed no metrics URL")
		}
		u.cli("disk", "create", "m", "--size", "64M")
		before := scrapeMetrics(t, plain, u.http)
		read, write := runFioJSON(t, u.uri("m"), fioJob...)
		after := scrapeMetrics(t, plain, u.http)
		checkFioCounts(t, before, after, "segmap_agent", "disk=m", read, write)

		// First writes to a new disk fault: the agent sent them, the
		// controller allocated.
		if n := after.value("segmap_agent_faults_total", "disk=m") - before.value("segmap_agent_faults_total", "disk=m"); n < 1 {
			t.Errorf("agent faults: %v, want some", n)
		}
		if n := after.value("segmap_agent_fault_duration_seconds", "disk=m"); n != after.value("segmap_agent_faults_total", "disk=m") {
			t.Errorf("agent fault latencies: %v, faults %v", n, after.value("segmap_agent_faults_total", "disk=m"))
		}
		if n := after.value("segmap_controller_faults_total", "plan=allocate") - before.value("segmap_controller_faults_total", "plan=allocate"); n < 1 {
			t.Errorf("controller allocate faults: %v, want some", n)
		}
		if n := after.value("segmap_controller_disks", "kind=disk"); n != 1 {
			t.Errorf("controller disks: %v, want 1", n)
		}
		if n := after.value("segmap_agent_requests_total", "disk=m", "op=flush"); n < 1 {
			t.Errorf("flushes: %v, want fio's end_fsync", n)
		}
		if n := after.value("segmap_controller_container_slots", "use=used"); n < 1 {
			t.Errorf("used slots: %v, want some", n)
		}
		if n := after.value("segmap_controller_commits_total", "store=bolt"); n < 1 {
			t.Errorf("bolt commits: %v, want some", n)
		}
		if n := after.value("segmap_controller_leader"); n != 1 {
			t.Errorf("leader: %v, want 1", n)
		}
		if n := after.value("segmap_agent_connections", "disk=m"); n != 0 {
			t.Errorf("connections after fio: %v, want 0", n)
		}

		u.cli("snapshot", "m", "--name", "m-s1")
		snap := scrapeMetrics(t, plain, u.http)
		if n := snap.value("segmap_controller_snapshots_total", "kind=single"); n != 1 {
			t.Errorf("snapshots: %v, want 1", n)
		}
		if n := snap.value("segmap_controller_disks", "kind=snapshot"); n != 1 {
			t.Errorf("snapshot disks: %v, want 1", n)
		}
		// A group snapshot quiesces the disks an agent maps: its pause
		// is measured. fio keeps m mapped meanwhile.
		u.cli("disk", "create", "m2", "--size", "16M")
		w := background(t, "fio", "--ioengine=nbd", "--uri="+u.uri("m"), "--name=w", "--rw=randwrite", "--bs=4k",
			"--iodepth=4", "--size=16M", "--time_based", "--runtime=3")
		for i := 0; scrapeMetrics(t, plain, u.http).value("segmap_agent_connections", "disk=m") < 1; i++ {
			if i == 100 {
				t.Fatal("fio did not connect")
			}
			time.Sleep(50 * time.Millisecond)
		}
		u.cli("snapshot", "--group", "m", "m2", "--name", "g")
		if out, err := w(); err != nil {
			t.Fatalf("fio: %v\n%s", err, out)
		}
		group := scrapeMetrics(t, plain, u.http)
		if n := group.value("segmap_controller_snapshots_total", "kind=group"); n != 1 {
			t.Errorf("group snapshots: %v, want 1", n)
		}
		if n := group.value("segmap_controller_snapshot_quiesce_seconds"); n != 1 {
			t.Errorf("quiesce pauses: %v, want 1", n)
		}
	})

	t.Run("storage", func(t *testing.T) {
		dir := t.TempDir()
		if _, errOut, code := runBin(t, "storage", "create", "--dir", dir, "s", "--size", "64M"); code != 0 {
			t.Fatalf("storage create: %s", errOut)
		}
		p := heldport.New(t)
		s := startHeld(t, dir, []*heldport.Port{p}, "storage", "--listen", fdArg(0), "--dir", dir, "--insecure", "--http-listen", "127.0.0.1:0")
		if s.http == "" {
			t.Fatal("segmap storage printed no metrics URL")
		}
		before := scrapeMetrics(t, plain, s.http)
		read, write := runFioJSON(t, "nbd://"+p.Addr()+"/s", fioJob...)
		after := scrapeMetrics(t, plain, s.http)
		checkFioCounts(t, before, after, "segmap_storage", "export=s", read, write)
	})

	t.Run("cluster", func(t *testing.T) {
		hl := []string{"--http-listen", "127.0.0.1:0"}
		c := newClusterOf(t, 1, hl, hl, "host-a")
		// The listeners serve TLS with the cluster's certificates and
		// take the CLI's (admin) certificate.
		m, err := tlsconf.DirFiles(c.certs, tlsconf.RoleAdmin, "admin").Load()
		if err != nil {
			t.Fatal(err)
		}
		client := func(server string) *http.Client {
			return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: m.Client(server)}}
		}
		agent := c.agents["host-a"]
		if c.ctl.http == "" || agent.http == "" || !strings.HasPrefix(agent.http, "https://") {
			t.Fatalf("metrics URLs: controller %q, agent %q; want https", c.ctl.http, agent.http)
		}
		c.cli("disk", "create", "m", "--size", "64M")
		before := scrapeMetrics(t, client("host-a"), agent.http)
		read, write := runFioJSON(t, c.uri("host-a", "m"), fioJob...)
		after := scrapeMetrics(t, client("host-a"), agent.http)
		checkFioCounts(t, before, after, "segmap_agent", "disk=m", read, write)
		ctl := scrapeMetrics(t, client("controller"), c.ctl.http)
		if n := ctl.value("segmap_controller_faults_total", "plan=allocate"); n < 1 {
			t.Errorf("controller allocate faults: %v, want some", n)
		}
		if n := ctl.value("segmap_controller_agent_disks", "agent=host-a"); n != 1 {
			t.Errorf("disks host-a maps: %v, want 1", n)
		}
		// Without a client certificate: refused.
		noCert := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		if resp, err := noCert.Get(agent.http + "metrics"); err == nil {
			resp.Body.Close()
			t.Errorf("scrape without a client certificate: %s, want a refused handshake", resp.Status)
		}
	})
}
