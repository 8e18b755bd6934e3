package table

import (
	"fmt"
	"strings"
)

// A fault's plan (Resolve) implies effects that a controller must carry
// out in a fixed order: reserve a slot before copying into it, copy and
// flush before the map points at the copy, commit before telling agents,
// tell restrictive changes (Blocking) before the permissive ones that
// depend on them are committed, answer last. Effects spells that order out
// as plain data, like etcd raft's Ready: the controller executes the steps
// and adds nothing to their order, and the scenario tests check it with no
// store, container, agent or clock.
//
// The steps name their operands symbolically: Old is the slot the
// faulting disk's entry maps, New the slot that StepReserve took, Sharers the
// other disks of the family that map Old (at the same segment index).

// StepKind is one kind of effect.
type StepKind uint8

// The steps of Effects.
const (
	// StepReserve takes a free, durably zero slot from the allocator: New.
	StepReserve StepKind = iota + 1
	// StepCopyOld copies Old into New and flushes New's container: the data
	// is durable before any map points at it.
	StepCopyOld
	// StepStage answers with a stage of New: the agent writes the segment
	// there (over a copy of Old when Step.From is set), flushes, and
	// asks for the commit, which runs CommitStaged's steps.
	StepStage
	// StepCommitSelf commits the faulting disk's entry (Step.Entry) and the
	// slot count changes Step.OldRefs and Step.NewRefs; a count that
	// drops to zero frees its slot.
	StepCommitSelf
	// StepCommitSharers commits every sharer's entry to New (No-write if
	// more than one shares it), New's count to the number of sharers
	// and Old's to one.
	StepCommitSharers
	// StepTellSharers sends each sharer's new entry to the agents that map
	// it, Blocking, and waits for all: their reads of Old made under the
	// old entries finish before anyone writes Old in place.
	StepTellSharers
	// StepHideMappers makes every agent that maps the faulting disk (the
	// faulting one too) drop its entry, Blocking, and waits for all (an
	// agent that does not answer, until its lease has run out), when
	// more than one maps it: the commit of a staged write, whose data
	// shows through the new entry at once. Were some agent told the
	// new entry while another, slow or cut off, still read the old, a
	// read through the first would see the write and a later one
	// through the second would not.
	StepHideMappers
	// StepTellMappers sends the faulting disk's new entry to every agent
	// that maps it (the faulting one too) and waits: none may read the
	// old location once the faulting agent's write is acknowledged.
	StepTellMappers
	// StepAnswer answers the fault with Step.Entry.
	StepAnswer
	// StepFail fails the fault: the I/O fails.
	StepFail
)

func (k StepKind) String() string {
	switch k {
	case StepReserve:
		return "reserve"
	case StepCopyOld:
		return "copy-old"
	case StepStage:
		return "stage"
	case StepCommitSelf:
		return "commit-self"
	case StepCommitSharers:
		return "commit-sharers"
	case StepTellSharers:
		return "tell-sharers"
	case StepHideMappers:
		return "hide-mappers"
	case StepTellMappers:
		return "tell-mappers"
	case StepAnswer:
		return "answer"
	case StepFail:
		return "fail"
	}
	return fmt.Sprintf("StepKind(%d)", uint8(k))
}

// Target names the entry a step gives the faulting disk.
type Target uint8

// The targets of a step.
const (
	// Unchanged is the entry as the store holds it.
	Unchanged Target = iota + 1
	// OldWritable is Old, without No-write.
	OldWritable
	// NewWritable is New, without No-write.
	NewWritable
	// NewOver is New holding the staged sub-blocks over Old's entry, its
	// layers included (Over), writable.
	NewOver
	// OldFilled is Old's entry with its own slot holding the staged
	// sub-blocks too (Filled), its state as the store holds it.
	OldFilled
)

func (t Target) String() string {
	switch t {
	case Unchanged:
		return "unchanged"
	case OldWritable:
		return "old"
	case NewWritable:
		return "new"
	case NewOver:
		return "new-over-old"
	case OldFilled:
		return "old-filled"
	}
	return fmt.Sprintf("Target(%d)", uint8(t))
}

// Step is one effect of a fault's resolution.
type Step struct {
	Kind StepKind
	// Entry is the faulting disk's entry that CommitSelf commits and
	// StepAnswer answers.
	Entry Target
	// OldRefs and NewRefs are StepCommitSelf's changes to Old's and New's
	// counts. Old's change applies to every slot Old's entry names (its
	// layers too); the count of a layer that the new entry no longer
	// needs drops as well.
	OldRefs, NewRefs int
	// From is set on a StepStage whose slot the agent fills from Old first
	// (a partial write).
	From bool
	// Sparse is set on a StepStage whose slot gets only the sub-blocks the
	// write touches (their edges from Old); InPlace on one that stages
	// into Old's own slot rather than New; FillRest on one whose slot
	// also gets, from Old's layers, every sub-block it lacks, so that it
	// holds the whole segment.
	Sparse, InPlace, FillRest bool
	// IfShared is set on the StepCommitSelf of a staged write: it commits
	// only while the disk's entry still maps Old and Old is still
	// shared; otherwise the stage is stale and the write starts again.
	// IfSame is set on the commit of an in-place stage: it commits only
	// while the disk's entry still maps Old's slot.
	IfShared, IfSame bool
}

func (s Step) String() string {
	var b strings.Builder
	b.WriteString(s.Kind.String())
	switch s.Kind {
	case StepCommitSelf:
		fmt.Fprintf(&b, " entry=%v", s.Entry)
		if s.OldRefs != 0 {
			fmt.Fprintf(&b, " old%+d", s.OldRefs)
		}
		if s.NewRefs != 0 {
			fmt.Fprintf(&b, " new%+d", s.NewRefs)
		}
		if s.IfShared {
			b.WriteString(" if-still-shared")
		}
		if s.IfSame {
			b.WriteString(" if-still-mapped")
		}
	case StepAnswer, StepTellMappers:
		fmt.Fprintf(&b, " %v", s.Entry)
	case StepStage:
		if s.InPlace {
			b.WriteString(" in-place")
		}
		if s.From {
			b.WriteString(" from=old")
		}
		if s.Sparse {
			b.WriteString(" sparse")
		}
		if s.FillRest {
			b.WriteString(" fill-rest")
		}
	}
	return b.String()
}

// Effects returns the steps that carry out plan p. With agentCopies a
// partial write into a shared slot is staged with a copy made by the
// agent (which has the containers open) rather than copied by the
// controller.
func Effects(p Plan, agentCopies bool) []Step {
	switch p {
	case Load:
		return []Step{{Kind: StepAnswer, Entry: Unchanged}}
	case Deny:
		return []Step{{Kind: StepFail}}
	case Allocate:
		// Agents that loaded the Zero entry would keep reading zeros
		// after the faulting agent's write: they are moved before it
		// is answered.
		return []Step{
			{Kind: StepReserve},
			{Kind: StepCommitSelf, Entry: NewWritable, NewRefs: 1},
			{Kind: StepTellMappers, Entry: NewWritable},
			{Kind: StepAnswer, Entry: NewWritable},
		}
	case ClearNoWrite:
		// Other agents keep their No-write entry: it is only more
		// restrictive, and their next write faults and gets this one.
		return []Step{
			{Kind: StepCommitSelf, Entry: OldWritable},
			{Kind: StepAnswer, Entry: OldWritable},
		}
	case MoveForward:
		return []Step{{Kind: StepReserve}, {Kind: StepStage}}
	case CopySub:
		// The agent writes the touched sub-blocks only: whoever
		// copies, nothing else is copied.
		return []Step{{Kind: StepReserve}, {Kind: StepStage, From: true, Sparse: true}}
	case FillIn:
		// Only the sub-blocks the write touches: copying the rest
		// would cost space the snapshot already holds.
		return []Step{{Kind: StepStage, InPlace: true, From: true, Sparse: true}}
	case FillAll:
		// The slot holds half the segment at least: copying the rest
		// (no more than the disk wrote) spares every later write into
		// the segment a fault.
		return []Step{{Kind: StepStage, InPlace: true, From: true, Sparse: true, FillRest: true}}
	case CopyForward:
		if agentCopies {
			return []Step{{Kind: StepReserve}, {Kind: StepStage, From: true}}
		}
		return []Step{
			{Kind: StepReserve},
			{Kind: StepCopyOld},
			{Kind: StepCommitSelf, Entry: NewWritable, OldRefs: -1, NewRefs: 1},
			{Kind: StepTellMappers, Entry: NewWritable},
			{Kind: StepAnswer, Entry: NewWritable},
		}
	case CopyReverse:
		// Only once every sharer's agents have moved off Old may the
		// faulting disk write it in place.
		return []Step{
			{Kind: StepReserve},
			{Kind: StepCopyOld},
			{Kind: StepCommitSharers},
			{Kind: StepTellSharers},
			{Kind: StepCommitSelf, Entry: OldWritable},
			{Kind: StepTellMappers, Entry: OldWritable},
			{Kind: StepAnswer, Entry: OldWritable},
		}
	}
	return []Step{{Kind: StepFail}}
}

// CommitStaged returns the steps of the commit of a staged write made for
// plan p, once the agent has written and flushed it. The written data
// shows through the new entry at once: every agent drops the old entry
// (StepHideMappers) before any hears of the new one.
func CommitStaged(p Plan) []Step {
	switch p {
	case CopySub:
		// Old's slots stay named, under New.
		return []Step{
			{Kind: StepCommitSelf, Entry: NewOver, NewRefs: 1, IfShared: true},
			{Kind: StepHideMappers},
			{Kind: StepTellMappers, Entry: NewOver},
			{Kind: StepAnswer, Entry: NewOver},
		}
	case FillIn, FillAll:
		// Other agents read the filled sub-blocks from the layers
		// under Old until they hear of it.
		return []Step{
			{Kind: StepCommitSelf, Entry: OldFilled, IfSame: true},
			{Kind: StepHideMappers},
			{Kind: StepTellMappers, Entry: OldFilled},
			{Kind: StepAnswer, Entry: OldFilled},
		}
	}
	return []Step{
		{Kind: StepCommitSelf, Entry: NewWritable, OldRefs: -1, NewRefs: 1, IfShared: true},
		{Kind: StepHideMappers},
		{Kind: StepTellMappers, Entry: NewWritable},
		{Kind: StepAnswer, Entry: NewWritable},
	}
}
