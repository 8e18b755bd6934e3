package table

import "fmt"

// Op is the kind of I/O an agent is asked to do on a segment.
type Op uint8

// The operations.
const (
	Read Op = iota + 1
	Write
)

func (o Op) String() string {
	switch o {
	case Read:
		return "read"
	case Write:
		return "write"
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// Action is what an agent does with one I/O on one segment.
type Action uint8

// The actions of Decide.
const (
	// Proceed: do the I/O at the entry's location.
	Proceed Action = iota + 1
	// ReadZeros: the segment is Zero; answer the read with zeros without
	// touching storage.
	ReadZeros
	// Fault: ask the controller, giving Decision.Reason, and retry with the
	// entries it answers.
	Fault
	// Fail: return an I/O error to the host.
	Fail
)

func (a Action) String() string {
	switch a {
	case Proceed:
		return "proceed"
	case ReadZeros:
		return "read-zeros"
	case Fault:
		return "fault"
	case Fail:
		return "fail"
	}
	return fmt.Sprintf("Action(%d)", uint8(a))
}

// Decision is the result of Decide.
type Decision struct {
	Action Action
	// Reason is the state that stopped the I/O, for Fault and Fail.
	Reason State
}

// Decide says what an agent does with op on a segment whose entry is e. It
// checks the states in order of precedence: Invalid (nothing else in the
// entry is meaningful), Error, Zero, NoWrite.
func Decide(e Entry, op Op) Decision {
	switch {
	case e.State&Invalid != 0:
		return Decision{Fault, Invalid}
	case e.State&Error != 0:
		return Decision{Fail, Error}
	case e.State&Zero != 0:
		if op == Read {
			return Decision{Action: ReadZeros}
		}
		return Decision{Fault, Zero}
	case e.State&NoWrite != 0:
		if op == Read {
			return Decision{Action: Proceed}
		}
		return Decision{Fault, NoWrite}
	}
	return Decision{Action: Proceed}
}

// DecideSpan is Decide for an I/O that touches the sub-blocks b: a write
// to a writable partial entry whose own slot does not hold all of b
// faults (Reason is the entry's state, Mapped), since the controller must
// record that the slot now holds them.
func DecideSpan(e Entry, op Op, b Bits) Decision {
	d := Decide(e, op)
	if d.Action == Proceed && op == Write && !e.Holds(b) {
		return Decision{Fault, e.State}
	}
	return d
}

// Policy is how a write to a shared segment is resolved.
type Policy uint8

// The copy-on-write policies.
const (
	// Forward (forward-delta): the writing disk moves to a new slot holding
	// a copy of the old data; every other sharer keeps the original slot.
	Forward Policy = iota + 1
	// Reverse (reverse-delta): the other sharers move to the copy; the
	// writing disk keeps the original slot and writes in place.
	Reverse
)

func (p Policy) String() string {
	switch p {
	case Forward:
		return "forward"
	case Reverse:
		return "reverse"
	}
	return fmt.Sprintf("Policy(%d)", uint8(p))
}

// ParsePolicy parses "forward" or "reverse".
func ParsePolicy(s string) (Policy, error) {
	switch s {
	case "forward", "forward-delta":
		return Forward, nil
	case "reverse", "reverse-delta":
		return Reverse, nil
	}
	return 0, fmt.Errorf("policy %q (want forward or reverse): %w", s, ErrBadPolicy)
}

// Valid reports whether p is a defined policy.
func (p Policy) Valid() bool { return p == Forward || p == Reverse }

// Plan is what a controller does to resolve a map fault.
type Plan uint8

// The plans of Resolve.
const (
	// Load: the persistent entry already allows the operation; send it.
	Load Plan = iota + 1
	// Deny: the entry is Error; the I/O fails.
	Deny
	// Allocate: the segment is Zero; allocate a slot that reads as zero and
	// map it writable.
	Allocate
	// ClearNoWrite: only this table references the slot; clear NoWrite, no
	// copy.
	ClearNoWrite
	// MoveForward: the slot is shared but the write covers the whole
	// segment, so the old data need not be copied: map the writing disk to a
	// fresh zeroed slot.
	MoveForward
	// CopyForward: allocate, copy the old segment into the new slot, point
	// the writing disk at it (forward-delta).
	CopyForward
	// CopyReverse: allocate, copy the old segment into the new slot, point
	// every other sharer at it, then clear NoWrite on the writing disk
	// (reverse-delta).
	CopyReverse
	// CopySub: sub-segment copy-on-write. Allocate a slot, write into it
	// only the sub-blocks the write touches (their edges copied from the
	// old entry), and map the writing disk to a partial entry over the
	// old one (see Over): nothing else is copied, and the old slots stay
	// where they are, one reference more each.
	CopySub
	// FillIn: the entry is writable but partial and its slot lacks some
	// sub-blocks the write touches. The agent writes them into the
	// entry's own slot (edges copied from the layers under it); the
	// controller then records that the slot holds them too (see Filled).
	// Nothing else is copied: a sub-block the disk never writes is read
	// from the layer that holds it for as long as the entry lives.
	FillIn
	// FillAll: a FillIn after which the entry's slot would hold at least
	// half of the segment. The agent also copies into the slot, from the
	// layers under it, every sub-block it still lacks, and the entry
	// becomes whole: no later write into the segment faults, and what
	// is copied is never more than what the disk wrote there.
	FillAll
)

func (p Plan) String() string {
	switch p {
	case Load:
		return "load"
	case Deny:
		return "deny"
	case Allocate:
		return "allocate"
	case ClearNoWrite:
		return "clear-nowrite"
	case MoveForward:
		return "move-forward"
	case CopyForward:
		return "copy-forward"
	case CopyReverse:
		return "copy-reverse"
	case CopySub:
		return "copy-sub"
	case FillIn:
		return "fill-in"
	case FillAll:
		return "fill-all"
	}
	return fmt.Sprintf("Plan(%d)", uint8(p))
}

// Span is the part of a segment a write fault covers.
type Span struct {
	// Whole reports that the write covers the entire segment, so no copy
	// of the old data is needed.
	Whole bool
	// Blocks are the sub-blocks the write touches.
	Blocks Bits
	// Of is the number of sub-blocks of the segment (0: not known, and
	// a fill never fills the rest; see FillAll).
	Of int
}

// Resolve decides how a controller resolves a map fault for op on a segment
// whose persistent entry is e. refs is the reference count of e's own slot
// (used only when e is mapped NoWrite), w is the part of the segment a
// write covers, and p is the disk's policy.
//
// A write into a shared segment copies only the sub-blocks it touches
// (CopySub), unless the disk's policy is reverse-delta and the entry is
// whole (CopyReverse copies the segment for the other sharers), or the
// entry already has MaxDepth layers (CopyForward copies it whole).
//
// The decision depends on the persistent state only, never on the state the
// agent reported, so a fault that is retried, or that raced with another
// agent's fault on the same segment, is resolved against what is true now.
// A persistent entry is never Invalid, and a mapped slot always has a
// reference; otherwise the store is corrupt and Resolve answers Deny.
func Resolve(e Entry, op Op, refs uint32, w Span, p Policy) Plan {
	switch {
	case e.State&(Invalid|Error) != 0:
		return Deny
	case e.State&Zero != 0:
		if op == Read {
			return Load
		}
		return Allocate
	case op == Read:
		return Load
	case e.State&NoWrite == 0:
		if w.Whole && e.Partial() {
			return FillIn
		}
		if !w.Whole && !e.Holds(w.Blocks) {
			if w.Of > 0 && 2*e.Part.Bits.Or(w.Blocks).Count() >= w.Of {
				return FillAll
			}
			return FillIn
		}
		return Load
	case refs == 0:
		// A mapped slot nobody counts: the store contradicts itself.
		return Deny
	case refs == 1:
		return ClearNoWrite
	case w.Whole:
		return MoveForward
	case p == Reverse && !e.Partial():
		return CopyReverse
	case e.Depth() >= MaxDepth:
		return CopyForward
	}
	return CopySub
}
