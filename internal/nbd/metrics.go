package nbd

import (
	"strconv"
	"time"

	"segmap/internal/nbd/nbdwire"
)

// Metrics is told what a Server serves, for its operator (Prometheus
// counters, say). Export is called once per connection, as it enters the
// transmission phase: an implementation resolves what it keeps per export
// (its labels) there, not per request. Its methods may be called
// concurrently.
type Metrics interface {
	Export(name string) ExportMetrics
}

// ExportMetrics is told of one connection's requests; it is called on the
// connection's hot path and must neither block nor allocate.
type ExportMetrics interface {
	// Connected is called with +1 as the connection enters the
	// transmission phase and with -1 when it ends.
	Connected(delta int)
	// Request is called once per request answered, after its reply was
	// written (or failed to be): op is its kind, n the bytes its range
	// covered (the payload of a READ or WRITE), errno the error it was
	// answered (0: success), d the time from the request's arrival to its
	// reply's write.
	Request(op Op, n uint64, errno uint32, d time.Duration)
}

// Op is the kind of a request, as Metrics are told it.
type Op uint8

// The kinds of requests. NumOps counts them: an ExportMetrics may keep an
// array indexed by Op.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpTrim
	OpWriteZeroes
	OpBlockStatus
	OpCache
	OpOther // a command the server does not know (answered EINVAL)
	NumOps
)

var opNames = [NumOps]string{"read", "write", "flush", "trim", "write_zeroes", "block_status", "cache", "other"}

func (o Op) String() string {
	if o < NumOps {
		return opNames[o]
	}
	return "Op(" + strconv.Itoa(int(o)) + ")"
}

// opOf returns the kind of a request of command typ; ok is false for
// segmap's lease command, which is the connection's, not the export's.
func opOf(typ nbdwire.Command) (op Op, ok bool) {
	switch typ {
	case nbdwire.CmdRead:
		return OpRead, true
	case nbdwire.CmdWrite:
		return OpWrite, true
	case nbdwire.CmdFlush:
		return OpFlush, true
	case nbdwire.CmdTrim:
		return OpTrim, true
	case nbdwire.CmdWriteZeroes:
		return OpWriteZeroes, true
	case nbdwire.CmdBlockStatus:
		return OpBlockStatus, true
	case nbdwire.CmdCache:
		return OpCache, true
	case nbdwire.CmdSegmapLease:
		return 0, false
	}
	return OpOther, true
}

// ErrnoName returns the name of an NBD error value ("EIO"), "other" for
// one the spec does not define: a bounded set, fit for a metric label.
func ErrnoName(errno uint32) string {
	if name, ok := nbdwire.ErrnoName(errno); ok {
		return name
	}
	return "other"
}

// observe tells the connection's ExportMetrics of the requests of batch,
// whose replies were written at now.
func (c *conn) observe(batch []*request, now time.Time) {
	m := c.met
	for _, r := range batch {
		op, ok := opOf(r.typ)
		if !ok {
			continue
		}
		var n uint64
		if r.status == 0 {
			n = uint64(r.length)
		}
		m.Request(op, n, r.status, now.Sub(r.start))
	}
}
