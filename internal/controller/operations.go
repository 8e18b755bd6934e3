package controller

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"time"
)

// The registry of long operations: what a drain, rebuild, flatten,
// export, import, scrub or preallocation is doing now, and how the last
// few ended, so that an operator (segmap operations, the dashboard) can
// watch an operation that another client started, or that the controller
// runs by itself (a drain or rebuild resumed after a restart, a replica's
// catch-up). The code that streams an operation's progress to its client
// feeds the same counts here.
//
//	StartOperation ──Progress*──▶ Finish(nil) ──▶ OpDone
//	      (OpRunning)               Finish(err) ─▶ OpFailed
//
// Times come from the controller's clock (Config.Now). The registry lives
// in memory: a controller that restarts, or a standby that takes over,
// starts it empty.

// Kinds of long operations.
const (
	OpPreallocate    = "preallocate" // a disk created preallocated
	OpDrain          = "drain"
	OpReplaceReplica = "replace-replica"
	OpRebuild        = "rebuild"
	OpFlatten        = "flatten"
	OpExport         = "export"
	OpImport         = "import"
	OpScrub          = "scrub"
)

// Units an operation counts in.
const (
	UnitBytes    = "bytes"
	UnitSegments = "segments"
	UnitSlots    = "slots"
)

// KeptOperations is how many finished operations the registry keeps.
const KeptOperations = 16

// OpState is how an operation stands.
type OpState int

const (
	// OpRunning: under way.
	OpRunning OpState = iota
	// OpDone: ended well.
	OpDone
	// OpFailed: ended with an error (canceled included).
	OpFailed
)

func (s OpState) String() string {
	switch s {
	case OpRunning:
		return "running"
	case OpDone:
		return "done"
	case OpFailed:
		return "failed"
	}
	return "unknown"
}

// Operation is a snapshot of one long operation.
type Operation struct {
	ID     uint64 // increasing, from 1, in the order they started
	Kind   string // OpDrain ...
	Target string // what it works on: "container 3", "disk vm1", "vm1@mon"
	Unit   string // what Done and Total count: UnitBytes ...
	Done   uint64
	Total  uint64 // 0: not known (yet)
	State  OpState
	Err    string // why it failed
	// Started and Finished (zero while running), on the controller's
	// clock.
	Started, Finished time.Time
}

// operations is the registry. Its lock is a leaf.
type operations struct {
	mu struct {
		sync.Mutex
		next     uint64
		running  map[uint64]*Operation
		finished []Operation // oldest first, at most KeptOperations
	}
}

// Op is the handle of a running operation, which feeds the registry. Its
// methods are safe for concurrent use; nil is a valid Op that records
// nothing.
type Op struct {
	c  *Controller
	id uint64
}

// StartOperation registers a running operation of kind on target,
// counting in unit.
func (c *Controller) StartOperation(kind, target, unit string) *Op {
	now := c.now()
	o := &c.ops
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.mu.running == nil {
		o.mu.running = make(map[uint64]*Operation)
	}
	o.mu.next++
	id := o.mu.next
	o.mu.running[id] = &Operation{ID: id, Kind: kind, Target: target, Unit: unit, State: OpRunning, Started: now}
	return &Op{c: c, id: id}
}

// Progress records done of total (0: not known). It has the signature of
// the progress callbacks of Drain, Flatten and the others.
func (op *Op) Progress(done, total uint64) {
	if op == nil {
		return
	}
	o := &op.c.ops
	o.mu.Lock()
	defer o.mu.Unlock()
	if r := o.mu.running[op.id]; r != nil {
		r.Done, r.Total = done, total
	}
}

// Add counts n more units done.
func (op *Op) Add(n uint64) {
	if op == nil {
		return
	}
	o := &op.c.ops
	o.mu.Lock()
	defer o.mu.Unlock()
	if r := o.mu.running[op.id]; r != nil {
		r.Done += n
	}
}

// SetTotal sets the total (0: not known).
func (op *Op) SetTotal(total uint64) {
	if op == nil {
		return
	}
	o := &op.c.ops
	o.mu.Lock()
	defer o.mu.Unlock()
	if r := o.mu.running[op.id]; r != nil {
		r.Total = total
	}
}

// Finish ends the operation: done with a nil err (its total becomes what
// it did), failed otherwise. Later calls do nothing.
func (op *Op) Finish(err error) {
	if op == nil {
		return
	}
	now := op.c.now()
	o := &op.c.ops
	o.mu.Lock()
	defer o.mu.Unlock()
	r := o.mu.running[op.id]
	if r == nil {
		return
	}
	delete(o.mu.running, op.id)
	r.Finished, r.State = now, OpDone
	if err == nil {
		// Done is what it did: an estimate of the total (an export's)
		// gives way to it.
		r.Total = r.Done
	}
	if err != nil {
		r.State, r.Err = OpFailed, err.Error()
		if errors.Is(err, context.Canceled) {
			r.Err = "canceled"
		}
	}
	o.mu.finished = append(o.mu.finished, *r)
	if n := len(o.mu.finished); n > KeptOperations {
		o.mu.finished = slices.Delete(o.mu.finished, 0, n-KeptOperations)
	}
}

// Operations returns the running operations and the last KeptOperations
// finished ones, in the order they started.
func (c *Controller) Operations() []Operation {
	o := &c.ops
	o.mu.Lock()
	out := make([]Operation, 0, len(o.mu.running)+len(o.mu.finished))
	for _, r := range o.mu.running {
		out = append(out, *r)
	}
	out = append(out, o.mu.finished...)
	o.mu.Unlock()
	slices.SortFunc(out, func(a, b Operation) int { return cmp.Compare(a.ID, b.ID) })
	return out
}
