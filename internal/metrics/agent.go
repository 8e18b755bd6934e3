package metrics

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Agent holds a mapping agent's metrics: its NBD server's (NBD, by disk)
// and its own: map faults sent to the controller and I/O held.
type Agent struct {
	// NBD is the agent's NBD server's: give it to nbd.Config.Metrics.
	NBD *NBD

	faults   *prometheus.CounterVec
	faultDur *prometheus.HistogramVec
	held     *prometheus.GaugeVec
	heldSec  *prometheus.CounterVec
	cowBytes *prometheus.CounterVec
	lease    atomic.Pointer[func() bool]

	mu struct {
		sync.Mutex
		disks map[string]*AgentDisk
	}
}

// Hold is why an agent holds a disk's I/O.
type Hold uint8

// The reasons to hold I/O.
const (
	// HoldQuiesced: a group snapshot quiesced the disk.
	HoldQuiesced Hold = iota
	// HoldLease: the agent's lease from its controller lapsed (it is
	// fenced, or waits to re-attach): I/O waits for a new one.
	HoldLease
	// HoldStorageLease: a container refused an I/O for a lapsed lease;
	// it waits to be done again under a new one.
	HoldStorageLease
	numHolds
)

var holdNames = [numHolds]string{"quiesced", "lease", "storage_lease"}

func (h Hold) String() string {
	if h < numHolds {
		return holdNames[h]
	}
	return "Hold(" + strconv.Itoa(int(h)) + ")"
}

// NewAgent registers an agent's metrics with reg.
func NewAgent(reg prometheus.Registerer) *Agent {
	m := &Agent{
		NBD: newNBD(reg, "agent", "disk", "disk"),
		faults: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "agent", Name: "faults_total",
			Help: "Map faults the agent sent to its controller (loads, first writes, copy-on-write, commits of staged writes), by disk.",
		}, []string{"disk"}),
		faultDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "agent", Name: "fault_duration_seconds",
			Help:    "Time from a map fault's sending to its reply, by disk.",
			Buckets: durationBuckets,
		}, []string{"disk"}),
		held: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "agent", Name: "io_held",
			Help: "I/O held now, by disk and reason (quiesced: a group snapshot; lease: the controller's lease lapsed; storage_lease: a container refused the agent's lease).",
		}, []string{"disk", "reason"}),
		heldSec: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "agent", Name: "io_held_seconds_total",
			Help: "Time I/O spent held, summed over the I/O held, by disk and reason.",
		}, []string{"disk", "reason"}),
		cowBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "agent", Name: "cow_bytes_total",
			Help: "Bytes the agent read from shared segments to copy them into new slots for writes (copy-on-write), by disk: the cost of the first writes after a snapshot.",
		}, []string{"disk"}),
	}
	m.mu.disks = make(map[string]*AgentDisk)
	leaseHeld := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: "agent", Name: "lease_held",
		Help: "1 while the agent's lease from its controller holds (or its controller grants none), 0 once it lapsed: the agent is fenced and holds its I/O until it attaches again.",
	}, func() float64 {
		if f := m.lease.Load(); f != nil && !(*f)() {
			return 0
		}
		return 1
	})
	reg.MustRegister(m.faults, m.faultDur, m.held, m.heldSec, m.cowBytes, leaseHeld)
	return m
}

// SetLease sets the function that tells whether the agent's lease holds,
// read at each scrape.
func (m *Agent) SetLease(held func() bool) {
	if m != nil {
		m.lease.Store(&held)
	}
}

// Disk returns the metrics of the disk name, resolved once; nil if m is
// nil.
func (m *Agent) Disk(name string) *AgentDisk {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.mu.disks[name]
	if d == nil {
		d = &AgentDisk{
			faults:   m.faults.WithLabelValues(name),
			faultDur: m.faultDur.WithLabelValues(name),
			cowBytes: m.cowBytes.WithLabelValues(name),
		}
		for h := range numHolds {
			d.held[h] = m.held.WithLabelValues(name, h.String())
			d.heldSec[h] = m.heldSec.WithLabelValues(name, h.String())
		}
		m.mu.disks[name] = d
	}
	return d
}

// AgentDisk is one disk's agent metrics. A nil *AgentDisk does nothing.
type AgentDisk struct {
	faults   prometheus.Counter
	faultDur prometheus.Observer
	held     [numHolds]prometheus.Gauge
	heldSec  [numHolds]prometheus.Counter
	cowBytes prometheus.Counter
}

// CopiedOnWrite counts n bytes copied by a write's copy-on-write.
func (d *AgentDisk) CopiedOnWrite(n int64) {
	if d == nil || n <= 0 {
		return
	}
	d.cowBytes.Add(float64(n))
}

// Fault counts a map fault answered (or failed) after d.
func (d *AgentDisk) Fault(dur time.Duration) {
	if d == nil {
		return
	}
	d.faults.Inc()
	d.faultDur.Observe(dur.Seconds())
}

// Held counts an I/O held for h (delta +1), or let go after dur (delta
// -1).
func (d *AgentDisk) Held(h Hold, delta int, dur time.Duration) {
	if d == nil {
		return
	}
	d.held[h].Add(float64(delta))
	if dur > 0 {
		d.heldSec[h].Add(dur.Seconds())
	}
}
