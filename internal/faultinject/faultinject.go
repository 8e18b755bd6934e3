// Package faultinject wraps segmap's two persistence interfaces, the storage
// container (container.Container) and the metadata store (meta.Store), so
// that tests can make them fail the way real disks and file systems do:
// one chosen operation returns EIO or ENOSPC (once, or from then on), a
// metadata commit lands but reports failure (an fsync error after the data
// reached the disk), or the whole "machine" crashes at a chosen persistence
// step, keeping only what was synced.
//
// # Injector
//
// An Injector stands for one process and the storage it writes: every
// wrapper made from it (Container, VolatileContainer, Store) consults it
// before each operation. It numbers the persistence steps (each container
// WriteAt, Punch and Flush, each store commit: one per Update, or one per
// batch of Updates committed together, see Store) 1, 2, 3, ... across all its
// wrappers, in the order they happen, so a test can run a scenario once to
// count them and then crash or fail at each one in turn. Reads (ReadAt,
// View) are not persistence steps but can be failed too.
//
// # Faults
//
// A Fault selects operations by kind (Ops), by wrapper name (Target), by a
// predicate (If) and by position (the Nth matching call), and fails them
// with Err, once or Always. The error returned is an *InjectedError that
// wraps Err, so callers see errors.Is(err, syscall.EIO). A Durable fault
// performs the operation first and still reports the error.
//
// # Crashes
//
// CrashAt(k, keep) crashes the injector at persistence step k: that step
// is performed (keep) or not, and from then on every call of every wrapper
// fails with ErrCrashed. A Fault with Crash set crashes it at the call the
// fault selects instead (the Nth commit, say). A VolatileContainer holds the writes and punches
// made since its last successful Flush in an overlay that reads see; a
// crash discards the overlay (or, with KeepUnsynced, lets a random subset
// of it reach the underlying container, as a disk's write cache may).
// A plain Container passes writes straight through: what a process crash
// (not a power failure) leaves behind. The test reopens the underlying
// files with a new Injector to play the restart.
//
// States of an Injector:
//
//	running --step k == CrashAt, or Crash()--> crashed (every call: ErrCrashed)
package faultinject

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
)

// Op is a kind of operation, or a set of them (a bit mask).
type Op uint8

// The operations a wrapper sees.
const (
	OpRead   Op = 1 << iota // Container.ReadAt
	OpWrite                 // Container.WriteAt
	OpPunch                 // Container.Punch
	OpFlush                 // Container.Flush
	OpUpdate                // Store.Update
	OpView                  // Store.View

	// OpPersist are the persistence steps.
	OpPersist = OpWrite | OpPunch | OpFlush | OpUpdate
	// OpAll is every operation.
	OpAll = OpPersist | OpRead | OpView
)

func (o Op) String() string {
	names := []string{"read", "write", "punch", "flush", "update", "view"}
	var parts []string
	for i, n := range names {
		if o&(1<<i) != 0 {
			parts = append(parts, n)
		}
	}
	if len(parts) == 0 {
		return fmt.Sprintf("Op(%d)", uint8(o))
	}
	return strings.Join(parts, "|")
}

// Call describes one operation reaching a wrapper.
type Call struct {
	Op     Op
	Target string // the wrapper's name
	Off    int64  // ReadAt, WriteAt, Punch: the range
	// Len is the length of that range; for an Update of a store that
	// groups commits (see Store), the number of Updates whose writes
	// the commit carries.
	Len int64
	// Step is the persistence step's number (1-based) in its injector,
	// 0 for reads and views.
	Step int64
}

func (c Call) String() string {
	s := fmt.Sprintf("%v %s", c.Op, c.Target)
	if c.Op&(OpRead|OpWrite|OpPunch) != 0 {
		s += fmt.Sprintf(" [%d,+%d)", c.Off, c.Len)
	}
	if c.Op == OpUpdate && c.Len > 1 {
		s += fmt.Sprintf(" of %d updates", c.Len)
	}
	if c.Step != 0 {
		s += fmt.Sprintf(" (step %d)", c.Step)
	}
	return s
}

// InjectedError is the error of an operation failed by a Fault. It wraps
// the fault's Err, so errors.Is(err, syscall.EIO) holds for an EIO fault.
type InjectedError struct {
	Call    Call
	Err     error
	Durable bool // the operation was performed all the same
}

func (e *InjectedError) Error() string {
	if e.Durable {
		return fmt.Sprintf("faultinject: %v, performed, then failed: %v", e.Call, e.Err)
	}
	return fmt.Sprintf("faultinject: %v failed: %v", e.Call, e.Err)
}

func (e *InjectedError) Unwrap() error { return e.Err }

// Fault selects operations to fail. The zero values of its selectors match
// everything: a Fault{Ops: OpWrite, Err: syscall.EIO} fails the next write
// of any wrapper, once.
type Fault struct {
	// Ops is the set of operations the fault applies to.
	Ops Op
	// Target, if not empty, limits the fault to wrappers whose name
	// starts with it.
	Target string
	// If, if set, must also return true for a call to match.
	If func(Call) bool
	// Nth makes the fault fire at the Nth matching call (1-based); 0 is
	// the same as 1.
	Nth int
	// Always makes the fault fail every matching call from the Nth on,
	// rather than the Nth only.
	Always bool
	// Err is wrapped in the error the failed call returns; syscall.EIO
	// if nil.
	Err error
	// Durable performs the operation before reporting the error: a
	// commit that reached the disk, or a write that landed, whose
	// caller is told it failed.
	Durable bool
	// Crash makes the fault crash the injector instead of failing the
	// call (as CrashAt does, at the Nth matching call rather than at a
	// step number); with Durable the call is performed first. The call
	// returns ErrCrashed.
	Crash bool

	seen  int // matching calls so far
	fired int // calls failed
}

// Fired returns how many calls the fault has failed.
func (f *Fault) Fired() int { return f.fired }

// match reports whether f fails call c, counting c if it matches.
func (f *Fault) match(c Call) bool {
	if f.Ops&c.Op == 0 || !strings.HasPrefix(c.Target, f.Target) || (f.If != nil && !f.If(c)) {
		return false
	}
	f.seen++
	n := max(f.Nth, 1)
	if f.seen == n || (f.Always && f.seen > n) {
		f.fired++
		return true
	}
	return false
}

// Injector decides, for every operation of its wrappers, whether it
// proceeds, fails or crashes the injector. Its methods are safe for
// concurrent use.
type Injector struct {
	mu struct {
		sync.Mutex
		steps    int64
		counts   map[Op]int64
		faults   []*Fault
		crashAt  int64
		keep     bool
		crashed  bool
		injected int64
		record   bool
		log      []Call
		conts    []*Container
		keepFrac float64
		rng      *rand.Rand
	}
}

// New returns an injector; seed drives the random choices a crash makes
// (see KeepUnsynced).
func New(seed uint64) *Injector {
	in := &Injector{}
	in.mu.counts = map[Op]int64{}
	in.mu.rng = rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return in
}

// Inject adds a fault and returns it (to read Fired later).
func (in *Injector) Inject(f Fault) *Fault {
	if f.Err == nil {
		f.Err = errEIO
	}
	p := &f
	in.mu.Lock()
	defer in.mu.Unlock()
	in.mu.faults = append(in.mu.faults, p)
	return p
}

// ClearFaults removes every fault; crashes stay as they are.
func (in *Injector) ClearFaults() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.mu.faults = nil
}

// CrashAt makes the injector crash at persistence step k (counted from the
// injector's start): the step is performed first if keep is set. k <= 0
// cancels it.
func (in *Injector) CrashAt(k int64, keep bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.mu.crashAt, in.mu.keep = k, keep
}

// KeepUnsynced makes a crash let each unsynced write or punch of a
// VolatileContainer reach the underlying container with probability p,
// independently, rather than none of them.
func (in *Injector) KeepUnsynced(p float64) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.mu.keepFrac = p
}

// Record makes the injector keep the list of the calls it sees (Log).
func (in *Injector) Record(on bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.mu.record = on
}

// Log returns the calls seen since Record(true), in order: persistence
// steps carry their Step, reads and views have Step 0.
func (in *Injector) Log() []Call {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]Call(nil), in.mu.log...)
}

// Steps returns the number of persistence steps so far (the crashing one
// included).
func (in *Injector) Steps() int64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.mu.steps
}

// Count returns how many operations of the kinds in ops have reached the
// wrappers (failed ones included, calls after a crash excluded).
func (in *Injector) Count(ops Op) int64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	var n int64
	for o, k := range in.mu.counts {
		if o&ops != 0 {
			n += k
		}
	}
	return n
}

// Injected returns the number of calls failed by faults.
func (in *Injector) Injected() int64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.mu.injected
}

// Crashed reports whether the injector has crashed.
func (in *Injector) Crashed() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.mu.crashed
}

// Crash crashes the injector now, as if the machine lost power: every
// VolatileContainer loses its unsynced writes (see KeepUnsynced), and every
// later call fails with ErrCrashed.
func (in *Injector) Crash() {
	in.mu.Lock()
	if in.mu.crashed {
		in.mu.Unlock()
		return
	}
	in.mu.crashed = true
	in.mu.Unlock()
	in.dropOverlays()
}

// dropOverlays ends every container of a crashed injector.
func (in *Injector) dropOverlays() {
	in.mu.Lock()
	conts := append([]*Container(nil), in.mu.conts...)
	in.mu.Unlock()
	for _, c := range conts {
		c.crash(in.keepUnsynced)
	}
}

// keepUnsynced decides whether one unsynced operation survives a crash.
func (in *Injector) keepUnsynced() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.mu.keepFrac > 0 && in.mu.rng.Float64() < in.mu.keepFrac
}

// verdict is what an injector decides about one call.
type verdict struct {
	err     error // to return; nil: proceed
	perform bool  // perform the operation (even if err is set)
	crash   bool  // the injector crashes with this call (after it, if perform)
}

// decide numbers call c and decides its fate.
func (in *Injector) decide(c Call) verdict {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.mu.crashed {
		return verdict{err: fmt.Errorf("%v: %w", c, ErrCrashed)}
	}
	in.mu.counts[c.Op]++
	if c.Op&OpPersist != 0 {
		in.mu.steps++
		c.Step = in.mu.steps
	}
	if in.mu.record {
		in.mu.log = append(in.mu.log, c)
	}
	if c.Op&OpPersist != 0 {
		if c.Step == in.mu.crashAt {
			in.mu.crashed = true
			return verdict{err: fmt.Errorf("%v: %w", c, ErrCrashed), perform: in.mu.keep, crash: true}
		}
	}
	for _, f := range in.mu.faults {
		if f.match(c) {
			in.mu.injected++
			if f.Crash {
				in.mu.crashed = true
				return verdict{err: fmt.Errorf("%v: %w", c, ErrCrashed), perform: f.Durable, crash: true}
			}
			return verdict{err: &InjectedError{Call: c, Err: f.Err, Durable: f.Durable}, perform: f.Durable}
		}
	}
	return verdict{perform: true}
}
