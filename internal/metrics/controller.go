package metrics

import (
	"context"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Controller holds a controller's metrics: faults by plan,
// snapshots and commits as they happen, and gauges of its state
// (disks, agents, slots) read at scrape time from a State function
// (SetState). A nil *Controller does nothing.
type Controller struct {
	faults      *prometheus.CounterVec
	faultDur    *prometheus.HistogramVec
	snaps       *prometheus.CounterVec
	snapDur     *prometheus.HistogramVec
	quiesce     prometheus.Histogram
	commits     *prometheus.CounterVec
	updates     *prometheus.CounterVec
	commitDur   *prometheus.HistogramVec
	leader      prometheus.Gauge
	elections   prometheus.Counter
	state       atomic.Pointer[StateFunc]
	scrapeErrs  atomic.Uint64
	descDisks   *prometheus.Desc
	descAgents  *prometheus.Desc
	descMapped  *prometheus.Desc
	descSlots   *prometheus.Desc
	descScrapeE *prometheus.Desc
}

// State is the controller's state the gauges show.
type State struct {
	// Disks counts the disks by kind: "disk" (writable), "snapshot"
	// (read-only).
	Disks map[string]int
	// Agents are the attached agents, with the disks each maps.
	Agents map[string]int
	// Containers are the containers, with their slots.
	Containers []ContainerState
}

// ContainerState is one container's slots.
type ContainerState struct {
	ID         uint32
	State      string // online, draining, failed
	Used, Free uint64
}

// StateFunc returns the controller's state. It is called at every
// scrape and must be cheap: it reads what the controller has (a store
// read transaction), and never waits for agents or storage.
type StateFunc func(context.Context) (State, error)

// scrapeTimeout bounds a StateFunc.
const scrapeTimeout = 5 * time.Second

// NewController registers a controller's metrics with reg; state, if not
// nil, is what its gauges read (see SetState).
func NewController(reg prometheus.Registerer, state StateFunc) *Controller {
	sub := "controller"
	m := &Controller{
		faults: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: sub, Name: "faults_total",
			Help: "Map faults resolved, by plan (load, deny, allocate, clear-nowrite, move-forward, copy-forward, copy-reverse, copy-sub, fill-in, fill-all; commit: a staged write's commit).",
		}, []string{"plan"}),
		faultDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: sub, Name: "fault_duration_seconds",
			Help:    "Time to resolve a map fault once its locks are held (store reads, copies, commit, agent commands), by plan.",
			Buckets: durationBuckets,
		}, []string{"plan"}),
		snaps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: sub, Name: "snapshots_total",
			Help: "Snapshot and clone operations that succeeded, by kind (single: one disk; group: several at one point in time, quiesced).",
		}, []string{"kind"}),
		snapDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: sub, Name: "snapshot_duration_seconds",
			Help:    "Time a snapshot or clone operation took, by kind.",
			Buckets: slowBuckets,
		}, []string{"kind"}),
		quiesce: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: sub, Name: "snapshot_quiesce_seconds",
			Help:    "Time a group snapshot held its disks' I/O quiesced.",
			Buckets: slowBuckets,
		}),
		commits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: sub, Name: "commits_total",
			Help: "Metadata store commits that succeeded, by store (bolt, etcd); one commit carries a batch of updates (group commit).",
		}, []string{"store"}),
		updates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: sub, Name: "committed_updates_total",
			Help: "Metadata store updates (transactions) the successful commits carried, by store.",
		}, []string{"store"}),
		commitDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: sub, Name: "commit_duration_seconds",
			Help:    "Time a metadata store commit took to be durable (bbolt's fsync, etcd's Txn), by store.",
			Buckets: durationBuckets,
		}, []string{"store"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: sub, Name: "leader",
			Help: "1 while this controller leads (a single controller always does), 0 while it is a standby.",
		}),
		elections: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: sub, Name: "elections_won_total",
			Help: "Times this controller was elected leader (etcd).",
		}),
		descDisks: prometheus.NewDesc("segmap_controller_disks",
			"Disks in the catalogue, by kind (disk: writable; snapshot: read-only).", []string{"kind"}, nil),
		descAgents: prometheus.NewDesc("segmap_controller_agents",
			"Agents attached to the controller.", nil, nil),
		descMapped: prometheus.NewDesc("segmap_controller_agent_disks",
			"Disks an attached agent maps, by agent.", []string{"agent"}, nil),
		descSlots: prometheus.NewDesc("segmap_controller_container_slots",
			"Slots of each container, by container, its state (online, draining, failed) and use (used, free); read from the store, so map changes kept in memory until a flush are not yet counted.", []string{"container", "container_state", "use"}, nil),
		descScrapeE: prometheus.NewDesc("segmap_controller_state_scrape_errors_total",
			"Scrapes whose read of the controller's state failed (the state gauges are then absent).", nil, nil),
	}
	if state != nil {
		m.SetState(state)
	}
	reg.MustRegister(m.faults, m.faultDur, m.snaps, m.snapDur, m.quiesce, m.commits, m.updates, m.commitDur,
		m.leader, m.elections, (*stateCollector)(m))
	return m
}

// SetState sets the function the state gauges read.
func (m *Controller) SetState(f StateFunc) {
	if m != nil {
		m.state.Store(&f)
	}
}

// Fault counts a fault resolved by plan in dur.
func (m *Controller) Fault(plan string, dur time.Duration) {
	if m == nil {
		return
	}
	m.faults.WithLabelValues(plan).Inc()
	m.faultDur.WithLabelValues(plan).Observe(dur.Seconds())
}

// Snapshot counts a snapshot of n disks that took dur.
func (m *Controller) Snapshot(n int, dur time.Duration) {
	if m == nil {
		return
	}
	kind := "single"
	if n > 1 {
		kind = "group"
	}
	m.snaps.WithLabelValues(kind).Inc()
	m.snapDur.WithLabelValues(kind).Observe(dur.Seconds())
}

// Quiesced records the time a group snapshot held I/O.
func (m *Controller) Quiesced(dur time.Duration) {
	if m != nil {
		m.quiesce.Observe(dur.Seconds())
	}
}

// Commit counts a store commit of n updates that took dur. store is
// "bolt" or "etcd".
func (m *Controller) Commit(store string, n int, dur time.Duration) {
	if m == nil {
		return
	}
	m.commits.WithLabelValues(store).Inc()
	m.updates.WithLabelValues(store).Add(float64(n))
	m.commitDur.WithLabelValues(store).Observe(dur.Seconds())
}

// Leader sets whether the controller leads, counting an election won
// when it starts to.
func (m *Controller) Leader(leads, elected bool) {
	if m == nil {
		return
	}
	if leads {
		m.leader.Set(1)
	} else {
		m.leader.Set(0)
	}
	if elected {
		m.elections.Inc()
	}
}

// stateCollector is the Controller seen as the collector of its state
// gauges.
type stateCollector Controller

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.descDisks
	ch <- c.descAgents
	ch <- c.descMapped
	ch <- c.descSlots
	ch <- c.descScrapeE
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	f := c.state.Load()
	if f == nil {
		ch <- prometheus.MustNewConstMetric(c.descScrapeE, prometheus.CounterValue, float64(c.scrapeErrs.Load()))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	st, err := (*f)(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.descScrapeE, prometheus.CounterValue, float64(c.scrapeErrs.Add(1)))
		return
	}
	ch <- prometheus.MustNewConstMetric(c.descScrapeE, prometheus.CounterValue, float64(c.scrapeErrs.Load()))
	for kind, n := range st.Disks {
		ch <- prometheus.MustNewConstMetric(c.descDisks, prometheus.GaugeValue, float64(n), kind)
	}
	ch <- prometheus.MustNewConstMetric(c.descAgents, prometheus.GaugeValue, float64(len(st.Agents)))
	for name, n := range st.Agents {
		ch <- prometheus.MustNewConstMetric(c.descMapped, prometheus.GaugeValue, float64(n), name)
	}
	for _, ct := range st.Containers {
		id := strconv.FormatUint(uint64(ct.ID), 10)
		ch <- prometheus.MustNewConstMetric(c.descSlots, prometheus.GaugeValue, float64(ct.Used), id, ct.State, "used")
		ch <- prometheus.MustNewConstMetric(c.descSlots, prometheus.GaugeValue, float64(ct.Free), id, ct.State, "free")
	}
}
