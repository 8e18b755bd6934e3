// Package metrics defines segmap's Prometheus metrics: every family's name,
// help text and labels live here, so that the exposed names are in one
// place and docs/metrics.md can be generated from them (Markdown).
//
// Names follow Prometheus conventions: the segmap_ prefix, then the
// component (agent, controller, storage), base units (_seconds, _bytes)
// and _total on counters. Labels are bounded: a disk, an export, an
// operation, an errno name, a plan, a pool or container; never a segment
// or a request.
//
// The I/O hot path allocates nothing: a connection resolves its export's
// counters once (NBD.Export), and the per-request methods only add to
// counters and histograms whose label values were looked up before. Only
// the error path looks labels up per request.
//
// Every type's methods are safe for concurrent use, and a nil *AgentDisk
// or *Controller does nothing, so that a component built without metrics
// (tests) need not care.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "segmap"

// durationBuckets are the buckets of the latency histograms, in seconds:
// 10 µs to 10 s, about 2.5 times apart.
var durationBuckets = prometheus.ExponentialBucketsRange(10e-6, 10, 16)

// slowBuckets are the buckets of slower operations (snapshots, the
// quiesce pause): 1 ms to 100 s.
var slowBuckets = prometheus.ExponentialBucketsRange(1e-3, 100, 11)
