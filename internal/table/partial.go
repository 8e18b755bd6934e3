package table

import (
	"fmt"
	"math/bits"
	"slices"
	"strings"
)

// Sub-segment copy-on-write.
//
// A write of a few KiB into a shared segment need not copy the segment: the
// writing disk gets a new slot that holds only the sub-blocks written since,
// and reads the others through to the slot it shared, which stays where it
// is. Such an entry is partial: its location is the new slot (the top
// layer), Part.Bits says which sub-blocks the top holds, and Part.Under lists
// the slots below it, newest first, each with the sub-blocks it holds; the
// layers hold every sub-block together (the last, the base, holds them all
// until the layers above come to hide it and it is dropped). A sub-block
// is read from the first layer that holds it.
//
//	entry c1/s9{0-3}<c1/s7{8}<c1/s2
//	  sub-blocks 0..3  from c1/s9 (written after the last snapshot)
//	  sub-block  8     from c1/s7 (written between the two snapshots)
//	  the rest         from c1/s2 (the segment as the first snapshot holds it)
//
// Every slot an entry names (top and under) is counted once in its
// reference count, so a slot under a live disk's entry outlives the
// snapshot that wrote it. Writes only ever go to the top layer, so a shared
// lower layer is never written. Part is immutable once built: entries share
// it by pointer, and a change builds a new one.

// SubBlocks is the most sub-blocks a segment is divided into.
const SubBlocks = 256

// MinSubBlock is the smallest sub-block: a 64 KiB segment has 16 of them.
const MinSubBlock = 4096

// MaxDepth is the most layers (top and under) a partial entry has. A
// copy-on-write that would make a deeper entry copies the segment whole
// instead (CopyForward), so reads fan out to a bounded number of slots
// and a table row stays small.
const MaxDepth = 8

// SubBlockSize returns the size of a sub-block of a segSize-byte segment:
// segSize/SubBlocks, but at least MinSubBlock.
func SubBlockSize(segSize uint64) uint64 { return max(MinSubBlock, segSize/SubBlocks) }

// SubBlockCount returns the number of sub-blocks of a segSize-byte segment.
func SubBlockCount(segSize uint64) int {
	return int((segSize + SubBlockSize(segSize) - 1) / SubBlockSize(segSize))
}

// Bits is a set of sub-blocks, bit i for sub-block i.
type Bits [SubBlocks / 64]uint64

// Range returns the set of sub-blocks [lo, hi).
func Range(lo, hi int) Bits {
	var b Bits
	lo, hi = max(lo, 0), min(hi, SubBlocks)
	for w := range b {
		// The bits of [lo, hi) in word w, bits [64w, 64w+64).
		from, to := max(lo-64*w, 0), min(hi-64*w, 64)
		if from >= to {
			continue
		}
		b[w] = (^uint64(0) >> (64 - (to - from))) << from
	}
	return b
}

// SpanOf returns the sub-blocks that bytes [off, off+n) of a segSize-byte
// segment touch.
func SpanOf(segSize, off, n uint64) Bits {
	if n == 0 {
		return Bits{}
	}
	sb := SubBlockSize(segSize)
	return Range(int(off/sb), int((off+n+sb-1)/sb))
}

// Full returns the set of sub-blocks [0, n).
func Full(n int) Bits { return Range(0, n) }

// Test reports whether sub-block i is in b.
func (b Bits) Test(i int) bool { return uint(i) < SubBlocks && b[i/64]&(1<<(i%64)) != 0 }

// Has reports whether every sub-block of c is in b.
func (b Bits) Has(c Bits) bool {
	for i := range b {
		if c[i]&^b[i] != 0 {
			return false
		}
	}
	return true
}

// Or returns the union of b and c.
func (b Bits) Or(c Bits) Bits {
	for i := range b {
		b[i] |= c[i]
	}
	return b
}

// AndNot returns the sub-blocks of b not in c.
func (b Bits) AndNot(c Bits) Bits {
	for i := range b {
		b[i] &^= c[i]
	}
	return b
}

// Count returns the number of sub-blocks in b.
func (b Bits) Count() int {
	n := 0
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return n
}

// Empty reports whether b has no sub-block.
func (b Bits) Empty() bool { return b == Bits{} }

// Beyond reports whether b has a sub-block at n or above.
func (b Bits) Beyond(n int) bool { return !Full(n).Has(b) }

// String returns the sub-blocks as ranges: "0-3,8".
func (b Bits) String() string {
	var parts []string
	for i := 0; i < SubBlocks; {
		if !b.Test(i) {
			i++
			continue
		}
		j := i
		for j+1 < SubBlocks && b.Test(j+1) {
			j++
		}
		if j == i {
			parts = append(parts, fmt.Sprint(i))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", i, j))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}

// Layer is one slot under a partial entry and the sub-blocks it holds.
type Layer struct {
	Loc  Location
	Bits Bits
}

// Partial is what makes an entry partial: the sub-blocks its own slot holds
// and the layers under it, newest first. It is immutable.
type Partial struct {
	Bits  Bits
	Under []Layer
}

// Valid checks a partial entry's shape for a segment of n sub-blocks: the
// top holds at least one sub-block and not all, each layer holds one that
// no layer above it does, together they hold every sub-block and none
// past n, no slot appears twice, and there are at most MaxDepth layers.
func (p *Partial) Valid(top Location, n int) error {
	switch {
	case len(p.Under) == 0:
		return fmt.Errorf("partial entry %v has no layer under it", top)
	case 1+len(p.Under) > MaxDepth:
		return fmt.Errorf("partial entry %v has %d layers (at most %d)", top, 1+len(p.Under), MaxDepth)
	case p.Bits.Empty() || p.Bits.Beyond(n) || p.Bits.Has(Full(n)):
		return fmt.Errorf("partial entry %v: top holds sub-blocks {%v} of %d", top, p.Bits, n)
	}
	seen := map[Location]bool{top: true}
	above := p.Bits
	for i, l := range p.Under {
		if seen[l.Loc] {
			return fmt.Errorf("partial entry %v names %v twice", top, l.Loc)
		}
		seen[l.Loc] = true
		if l.Loc.Container == 0 {
			return fmt.Errorf("partial entry %v: layer %d has no container", top, i+1)
		}
		if l.Bits.Beyond(n) || above.Has(l.Bits) {
			return fmt.Errorf("partial entry %v: layer %v holds sub-blocks {%v} of %d, none visible", top, l.Loc, l.Bits, n)
		}
		above = above.Or(l.Bits)
	}
	if above != Full(n) {
		return fmt.Errorf("partial entry %v: its layers hold {%v}, not all %d sub-blocks", top, above, n)
	}
	return nil
}

// Covered returns the number of sub-blocks a partial entry's layers hold
// together, if they are the first n of a segment (as Valid wants), else
// -1: the segment size of an entry that comes without its disk (from the
// wire).
func (p *Partial) Covered() int {
	all := p.Bits
	for _, l := range p.Under {
		all = all.Or(l.Bits)
	}
	if n := all.Count(); all == Full(n) {
		return n
	}
	return -1
}

// Partial reports whether e is a mapped partial entry.
func (e Entry) Partial() bool { return e.Part != nil && !e.Voided() }

// Depth returns the number of slots a mapped entry reads from: 1 for a
// whole entry.
func (e Entry) Depth() int {
	if !e.Partial() {
		return 1
	}
	return 1 + len(e.Part.Under)
}

// Locate returns the slot that holds sub-block i of a mapped entry.
func (e Entry) Locate(i int) Location {
	if !e.Partial() || e.Part.Bits.Test(i) {
		return e.Loc
	}
	for _, l := range e.Part.Under {
		if l.Bits.Test(i) {
			return l.Loc
		}
	}
	return e.Part.Under[len(e.Part.Under)-1].Loc
}

// Runs calls fn for each run of sub-blocks in [lo, hi) that one slot holds,
// in order.
func (e Entry) Runs(lo, hi int, fn func(loc Location, lo, hi int) error) error {
	if !e.Partial() {
		return fn(e.Loc, lo, hi)
	}
	for i := lo; i < hi; {
		loc := e.Locate(i)
		j := i + 1
		for j < hi && e.Locate(j) == loc {
			j++
		}
		if err := fn(loc, i, j); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// Slots calls fn for every slot a mapped entry names: its own, then the
// layers under it. A voided entry names none.
func (e Entry) Slots(fn func(Location)) {
	if e.Voided() {
		return
	}
	fn(e.Loc)
	if e.Part != nil {
		for _, l := range e.Part.Under {
			fn(l.Loc)
		}
	}
}

// Holds reports whether a mapped entry's own slot holds every sub-block of
// b: a write of b may go there without a fault.
func (e Entry) Holds(b Bits) bool { return !e.Partial() || e.Part.Bits.Has(b) }

// Equal reports whether e and f are the same entry, layers included.
func (e Entry) Equal(f Entry) bool {
	a, b := normal(e), normal(f)
	if a.Loc != b.Loc || a.State != b.State || (a.Part == nil) != (b.Part == nil) {
		return false
	}
	if a.Part == nil || a.Part == b.Part {
		return true
	}
	return a.Part.Bits == b.Part.Bits && slices.Equal(a.Part.Under, b.Part.Under)
}

// Over returns the writable entry of a new slot top holding the
// sub-blocks b, over the mapped entry e: a copy-on-write of b from e. n is
// the segment's sub-block count. If b is every sub-block, the entry is
// whole.
func Over(top Location, b Bits, e Entry, n int) Entry {
	if b.Has(Full(n)) {
		return Entry{Loc: top}
	}
	under := make([]Layer, 0, e.Depth())
	if e.Partial() {
		under = append(under, Layer{e.Loc, e.Part.Bits})
		for _, l := range e.Part.Under {
			under = append(under, Layer{l.Loc, l.Bits})
		}
	} else {
		under = append(under, Layer{e.Loc, Full(n)})
	}
	return Entry{Loc: top, Part: &Partial{Bits: b, Under: visible(b, under)}}
}

// Filled returns a mapped entry e with its own slot holding b as well. An
// entry whose own slot comes to hold every sub-block becomes whole, and
// the layers under it are no longer named.
func Filled(e Entry, b Bits, n int) Entry {
	if !e.Partial() {
		return e
	}
	nb := e.Part.Bits.Or(b)
	if nb.Has(Full(n)) {
		return Entry{Loc: e.Loc, State: e.State}
	}
	under := visible(nb, slices.Clone(e.Part.Under))
	return Entry{Loc: e.Loc, State: e.State, Part: &Partial{Bits: nb, Under: under}}
}

// visible returns the layers of under (newest first) that hold a
// sub-block neither top (the sub-blocks above them) nor a newer layer
// does: the others are hidden, and no longer named. It reuses under.
func visible(top Bits, under []Layer) []Layer {
	above, kept := top, under[:0]
	for _, l := range under {
		if l.Bits.AndNot(above).Empty() {
			continue
		}
		kept = append(kept, l)
		above = above.Or(l.Bits)
	}
	return kept
}

// Whole returns e with its layers dropped: the entry of its own slot once
// that slot holds every sub-block.
func Whole(e Entry) Entry {
	e.Part = nil
	return e
}

// Relocate returns e with every slot it names (its own and its layers')
// replaced by to(slot): the same data, held elsewhere, as when a drain
// moves slots off a container. The layers are copied; e's are not
// changed. A voided entry is returned as it is.
func (e Entry) Relocate(to func(Location) Location) Entry {
	if e.Voided() {
		return e
	}
	e.Loc = to(e.Loc)
	if e.Part != nil {
		under := slices.Clone(e.Part.Under)
		for i := range under {
			under[i].Loc = to(under[i].Loc)
		}
		e.Part = &Partial{Bits: e.Part.Bits, Under: under}
	}
	return e
}
