package metrics

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"segmap/internal/nbd"
)

// NBD counts what an NBD server serves, per export (nbd.Metrics): the
// agent's (segmap_agent_*, label disk) and the storage node's
// (segmap_storage_*, label export).
type NBD struct {
	requests, bytes *prometheus.CounterVec
	errors          *prometheus.CounterVec
	duration        *prometheus.HistogramVec
	conns           *prometheus.GaugeVec

	mu struct {
		sync.Mutex
		exports map[string]*nbdExport
	}
}

// newNBD makes the families of an NBD server of subsystem (agent,
// storage), whose exports are told apart by label; what names an export
// in their help.
func newNBD(reg prometheus.Registerer, subsystem, label, what string) *NBD {
	m := &NBD{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: subsystem, Name: "requests_total",
			Help: "NBD requests answered, by " + what + " and operation (read, write, flush, trim, write_zeroes, block_status, cache, other), failed ones included.",
		}, []string{label, "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: subsystem, Name: "request_bytes_total",
			Help: "Bytes covered by the NBD requests that succeeded (the payload of reads and writes; the range of trims, write_zeroes, block_status and cache), by " + what + " and operation.",
		}, []string{label, "op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: subsystem, Name: "request_errors_total",
			Help: "NBD requests answered with an error, by " + what + ", operation and NBD error (EIO, EPERM, ENOSPC, EINVAL, ...).",
		}, []string{label, "op", "errno"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: subsystem, Name: "request_duration_seconds",
			Help:    "Time from an NBD request's arrival to its reply's write, by " + what + " and operation.",
			Buckets: durationBuckets,
		}, []string{label, "op"}),
		conns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: subsystem, Name: "connections",
			Help: "NBD connections open (in the transmission phase), by " + what + ".",
		}, []string{label}),
	}
	m.mu.exports = make(map[string]*nbdExport)
	reg.MustRegister(m.requests, m.bytes, m.errors, m.duration, m.conns)
	return m
}

// Export implements nbd.Metrics: the counters of the export name,
// resolved once and shared by its connections.
func (m *NBD) Export(name string) nbd.ExportMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.mu.exports[name]
	if e == nil {
		e = &nbdExport{m: m, name: name, conns: m.conns.WithLabelValues(name)}
		m.mu.exports[name] = e
	}
	return e
}

// nbdExport is one export's counters. Those of an operation are looked up
// at its first request (an export that never sees a TRIM shows none).
type nbdExport struct {
	m     *NBD
	name  string
	conns prometheus.Gauge
	ops   [nbd.NumOps]atomic.Pointer[opMetrics]
}

// opMetrics are the counters of one operation on one export.
type opMetrics struct {
	requests, bytes prometheus.Counter
	duration        prometheus.Observer
}

func (e *nbdExport) op(o nbd.Op) *opMetrics {
	if p := e.ops[o].Load(); p != nil {
		return p
	}
	l := o.String()
	p := &opMetrics{
		requests: e.m.requests.WithLabelValues(e.name, l),
		bytes:    e.m.bytes.WithLabelValues(e.name, l),
		duration: e.m.duration.WithLabelValues(e.name, l),
	}
	// Two first requests may race: both resolved the same children.
	e.ops[o].CompareAndSwap(nil, p)
	return e.ops[o].Load()
}

func (e *nbdExport) Connected(delta int) { e.conns.Add(float64(delta)) }

func (e *nbdExport) Request(o nbd.Op, n uint64, errno uint32, d time.Duration) {
	if o >= nbd.NumOps {
		o = nbd.OpOther
	}
	p := e.op(o)
	p.requests.Inc()
	p.duration.Observe(d.Seconds())
	if errno != 0 {
		// The error path looks its labels up: errors are not the
		// hot path, and an errno label per op would be many series
		// for nothing.
		e.m.errors.WithLabelValues(e.name, o.String(), nbd.ErrnoName(errno)).Inc()
		return
	}
	if n > 0 {
		p.bytes.Add(float64(n))
	}
}

// NewStorage registers the metrics of a storage node's NBD server with
// reg: segmap_storage_*, by export.
func NewStorage(reg prometheus.Registerer) *NBD {
	return newNBD(reg, "storage", "export", "export")
}
