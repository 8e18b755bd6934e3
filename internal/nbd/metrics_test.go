package nbd

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"segmap/internal/nbd/nbdwire"
)

// recMetrics records what a Server tells its Metrics.
type recMetrics struct {
	mu      sync.Mutex
	exports []string
	conns   int
	reqs    []recReq
}

type recReq struct {
	op    Op
	n     uint64
	errno uint32
	d     time.Duration
}

func (m *recMetrics) Export(name string) ExportMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.exports = append(m.exports, name)
	return m
}

func (m *recMetrics) Connected(delta int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.conns += delta
}

func (m *recMetrics) Request(op Op, n uint64, errno uint32, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.reqs = append(m.reqs, recReq{op, n, errno, d})
}

func (m *recMetrics) snapshot() (conns int, reqs []recReq) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.conns, append([]recReq(nil), m.reqs...)
}

// TestMetricsHook: Config.Metrics is told of the connection and of every
// request, with its kind, the bytes it covered on success, the errno it
// was answered and the time it took; the lease command is not counted.
func TestMetricsHook(t *testing.T) {
	checkGoroutines(t)
	m := trimFails("d", "trim refused", 2*time.Millisecond)
	rec := &recMetrics{}
	h := startServer(t, func(c *Config) { c.Metrics = rec }, m)
	tc := connect(t, h.addr, "d", true)
	tc.write(0, make([]byte, 8192), 0)
	tc.read(4096, 4096)
	tc.expectErrno(tc.do(nbdwire.CmdFlush, 0, 0, 0, nil), 0)
	tc.expectErrno(tc.do(nbdwire.CmdTrim, 0, 0, 4096, nil), nbdwire.EIO)
	tc.expectErrno(tc.do(nbdwire.CmdRead, 0, 1<<20, 4096, nil), nbdwire.EINVAL) // past the end
	if conns, _ := rec.snapshot(); conns != 1 {
		t.Errorf("connections while connected: %d, want 1", conns)
	}
	tc.close()
	waitFor(t, "the connection's end", func() bool { c, _ := rec.snapshot(); return c == 0 })

	_, reqs := rec.snapshot()
	want := []recReq{
		{op: OpWrite, n: 8192},
		{op: OpRead, n: 4096},
		{op: OpFlush},
		{op: OpTrim, errno: nbdwire.EIO},
		{op: OpRead, errno: nbdwire.EINVAL},
	}
	if len(reqs) != len(want) {
		t.Fatalf("requests: %+v, want %d", reqs, len(want))
	}
	for i, r := range reqs {
		w := want[i]
		if r.op != w.op || r.n != w.n || r.errno != w.errno {
			t.Errorf("request %d: %v %d errno %d, want %v %d errno %d", i, r.op, r.n, r.errno, w.op, w.n, w.errno)
		}
		if r.d <= 0 || r.d > time.Minute {
			t.Errorf("request %d: duration %v", i, r.d)
		}
	}
	if reqs[0].d < 2*time.Millisecond {
		t.Errorf("write took %v in the metrics, the export slept 2ms", reqs[0].d)
	}
	if rec.exports[0] != "d" {
		t.Errorf("exports: %v", rec.exports)
	}
}

func TestOpNames(t *testing.T) {
	for o := range NumOps {
		if o.String() == "" || o.String()[0] == 'O' {
			t.Errorf("Op %d: %q", o, o)
		}
	}
	if ErrnoName(nbdwire.ENOSPC) != "ENOSPC" || ErrnoName(12345) != "other" {
		t.Errorf("ErrnoName: %s %s", ErrnoName(nbdwire.ENOSPC), ErrnoName(12345))
	}
}

// trimFails is a 1 MiB export whose trims fail with msg and whose writes
// take write each.
func trimFails(name, msg string, write time.Duration) *memExport {
	m := newMem(name, 1<<20)
	m.hook = func(ctx context.Context, op string, off, n uint64) error {
		switch op {
		case "trim":
			return errors.New(msg)
		case "write":
			time.Sleep(write)
		}
		return nil
	}
	return m
}

// TestFailedRequestWarned: a request the export fails (EIO) is logged at
// Warn with its cause, at most once a second, the next warning counting
// those left out; a request refused for the client's mistake (EINVAL)
// only at Debug.
func TestFailedRequestWarned(t *testing.T) {
	checkGoroutines(t)
	m := trimFails("d", "the disk under the export is gone", 0)
	h := startServer(t, nil, m)
	tc := connect(t, h.addr, "d", true)
	// The pace is set by hand around the requests, so that the test
	// does not hang on how fast they go.
	pace := func(since time.Duration) {
		h.srv.failed.mu.Lock()
		h.srv.failed.mu.last = time.Now().Add(-since)
		h.srv.failed.mu.Unlock()
	}
	tc.expectErrno(tc.do(nbdwire.CmdTrim, 0, 0, 4096, nil), nbdwire.EIO)
	pace(-time.Hour) // the last warning as good as now, whatever comes
	for range 4 {
		tc.expectErrno(tc.do(nbdwire.CmdTrim, 0, 0, 4096, nil), nbdwire.EIO)
	}
	tc.expectErrno(tc.do(nbdwire.CmdRead, 0, 1<<20, 4096, nil), nbdwire.EINVAL) // past the end
	pace(failedEvery)
	tc.expectErrno(tc.do(nbdwire.CmdTrim, 0, 0, 4096, nil), nbdwire.EIO)
	tc.close()
	var warns []string
	for _, l := range strings.Split(h.logs.String(), "\n") {
		if strings.Contains(l, "level=WARN") && strings.Contains(l, "request failed") {
			warns = append(warns, l)
		}
	}
	if len(warns) != 2 || !strings.Contains(warns[0], "the disk under the export is gone") ||
		!strings.Contains(warns[0], "more_since_last=0") || !strings.Contains(warns[1], "more_since_last=4") {
		t.Errorf("warnings of failed requests:\n%s\nwant two: the first, then one counting the 4 left out", strings.Join(warns, "\n"))
	}
	if strings.Count(h.logs.String(), "level=WARN") != len(warns) {
		t.Errorf("the EINVAL request was warned of:\n%s", h.logs.String())
	}
}
