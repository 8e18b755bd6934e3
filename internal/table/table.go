// Package table holds segmap's mapping tables: one entry per segment of a
// virtual disk, each naming a storage location (container id and slot) and a
// set of state bits. It also holds the pure decisions made from entries: what
// an agent does with an I/O (Decide) and what a controller does with a map
// fault (Resolve).
//
// The package does no I/O, starts no goroutines and reads no clock.
//
// # States
//
//	state     read by the agent    write by the agent
//	Invalid   fault                fault
//	Error     error to the host    error to the host
//	Zero      zeros                fault
//	NoWrite   read the location    fault
//	(none)    read the location    write the location
//
// Invalid, Error and Zero void the location: once one of them is set the
// location means nothing, so they can only be left by replacing the entry
// whole (SetEntry). SetEntryState may set any state but clear only NoWrite:
//
//	           SetEntryState(+Invalid|+Error|+Zero)
//	mapped ─────────────────────────────────────────▶ voided
//	(±Nw)  ◀───────────────────────────────────────── (I, E or Z)
//	                   SetEntry (whole entry)
//
// A new table is all Invalid (an agent that has not loaded anything); a new
// disk's persistent table is all Zero (thin provisioning).
package table

import (
	"fmt"
	"strings"
	"unsafe"
)

// State is a set of entry state bits.
type State uint8

// The entry states. Their meaning is in the package comment.
const (
	Invalid State = 1 << iota
	Error
	Zero
	NoWrite

	// voiding are the states that make the location meaningless.
	voiding = Invalid | Error | Zero
	// allStates is every defined bit.
	allStates = Invalid | Error | Zero | NoWrite
)

// String returns the state bits as "Invalid|NoWrite", or "Mapped" when none
// is set.
func (s State) String() string {
	if s == 0 {
		return "Mapped"
	}
	var parts []string
	for _, b := range []struct {
		bit  State
		name string
	}{{Invalid, "Invalid"}, {Error, "Error"}, {Zero, "Zero"}, {NoWrite, "NoWrite"}} {
		if s&b.bit != 0 {
			parts = append(parts, b.name)
		}
	}
	if rest := s &^ allStates; rest != 0 {
		parts = append(parts, fmt.Sprintf("0x%x", uint8(rest)))
	}
	return strings.Join(parts, "|")
}

// Valid reports whether s uses only defined bits.
func (s State) Valid() bool { return s&^allStates == 0 }

// Location names a segment slot: slot Slot of container Container.
type Location struct {
	Container uint32
	Slot      uint32
}

func (l Location) String() string { return fmt.Sprintf("c%d/s%d", l.Container, l.Slot) }

// Entry is one row of a mapping table. The zero Entry maps slot 0 of
// container 0 writable, so tables are filled explicitly. Part, when set on
// a mapped entry, makes it partial (see Partial): its slot holds only some
// sub-blocks and the rest are read from the layers under it.
type Entry struct {
	Loc   Location
	State State
	Part  *Partial
}

// Is reports whether every bit of s is set in e.
func (e Entry) Is(s State) bool { return e.State&s == s }

// Voided reports whether e's location is meaningless (Invalid, Error or Zero).
func (e Entry) Voided() bool { return e.State&voiding != 0 }

// Mapped reports whether e points at storage that it may read: no voiding
// state is set (NoWrite may be).
func (e Entry) Mapped() bool { return !e.Voided() }

func (e Entry) String() string {
	if e.Voided() {
		return e.State.String()
	}
	s := e.Loc.String()
	if e.Partial() {
		s += "{" + e.Part.Bits.String() + "}"
		for i, l := range e.Part.Under {
			s += "<" + l.Loc.String()
			// A base that holds every sub-block is written bare.
			if i < len(e.Part.Under)-1 || l.Bits.Count() != e.Part.Covered() {
				s += "{" + l.Bits.String() + "}"
			}
		}
	}
	if e.State == 0 {
		return s
	}
	return s + "+" + e.State.String()
}

// Constructors for the common entries.
var (
	// InvalidEntry is the entry of a table that has not been loaded.
	InvalidEntry = Entry{State: Invalid}
	// ZeroEntry is the entry of a segment that reads as zeros and owns no storage.
	ZeroEntry = Entry{State: Zero}
	// ErrorEntry fails every I/O.
	ErrorEntry = Entry{State: Error}
)

// At returns a mapped entry for loc, NoWrite when nw is set.
func At(loc Location, nw bool) Entry {
	e := Entry{Loc: loc}
	if nw {
		e.State = NoWrite
	}
	return e
}

// pageSize is the number of entries in one page of a Table.
const pageSize = 1024

// Table is a mapping table: a fixed number of entries addressed by segment
// index. It is stored sparsely, in pages of entries allocated on first use:
// a page that is not allocated holds only the table's fill entry, so a table
// for a huge disk that is mostly unloaded (Invalid) or unused costs little.
//
// Entries are kept normalised: a voided entry (Invalid, Error or Zero) holds
// only its voiding bits, since nothing else in it means anything. So
// SetEntryState(NoWrite) leaves voided entries, and unallocated pages,
// unchanged.
//
// Setting NoWrite on every entry (a snapshot of the disk) costs O(1): the
// table counts such settings in gen, and a page applies the ones it has
// not seen (pageGen) when it is next written; until then Entry reports its
// mapped entries NoWrite.
//
// A Table is not safe for concurrent use; its owner serialises access.
type Table struct {
	n       int
	fill    Entry
	pages   []*[pageSize]Entry
	gen     uint32
	pageGen []uint32
}

// normal returns e normalised: a voided entry keeps only its voiding bits,
// and no layers.
func normal(e Entry) Entry {
	if e.Voided() {
		return Entry{State: e.State & voiding}
	}
	return e
}

// New returns a table of n entries, each set to fill.
func New(n int, fill Entry) *Table {
	np := (n + pageSize - 1) / pageSize
	return &Table{n: n, fill: normal(fill), pages: make([]*[pageSize]Entry, np), pageGen: make([]uint32, np)}
}

// Len returns the number of entries.
func (t *Table) Len() int { return t.n }

// Entry returns entry i. It panics if i is out of range, like a slice index:
// callers check ranges at their boundary.
func (t *Table) Entry(i int) Entry {
	if uint(i) >= uint(t.n) {
		panic(fmt.Sprintf("table: entry %d of %d", i, t.n))
	}
	pi := i / pageSize
	if p := t.pages[pi]; p != nil {
		e := p[i%pageSize]
		if t.pageGen[pi] != t.gen && !e.Voided() {
			e.State |= NoWrite
		}
		return e
	}
	return t.fill
}

// Pages returns the number of allocated pages, for memory accounting.
func (t *Table) Pages() int {
	n := 0
	for _, p := range t.pages {
		if p != nil {
			n++
		}
	}
	return n
}

// PageBytes is the memory one allocated page takes.
const PageBytes = pageSize * int(unsafe.Sizeof(Entry{}))

// page returns page pi for writing, allocating it if needed, with every
// whole-table NoWrite applied.
func (t *Table) page(pi int) *[pageSize]Entry {
	p := t.pages[pi]
	if p == nil {
		p = new([pageSize]Entry)
		if t.fill != (Entry{}) {
			for i := range p {
				p[i] = t.fill
			}
		}
		t.pages[pi] = p
		t.pageGen[pi] = t.gen
	}
	if t.pageGen[pi] != t.gen {
		for i := range p {
			if !p[i].Voided() {
				p[i].State |= NoWrite
			}
		}
		t.pageGen[pi] = t.gen
	}
	return p
}

// set stores e (normalised) at i, without allocating a page for an entry
// equal to the fill.
func (t *Table) set(i int, e Entry) {
	e = normal(e)
	pi := i / pageSize
	if t.pages[pi] == nil && e == t.fill {
		return
	}
	t.page(pi)[i%pageSize] = e
}

func (t *Table) check(first, n int) error {
	if first < 0 || n < 0 || first > t.n || n > t.n-first {
		return fmt.Errorf("entries [%d, +%d) of a %d-entry table: %w", first, n, t.n, ErrRange)
	}
	return nil
}

// SetEntry replaces entries [first, first+len(es)) with es. It is the only way
// to leave Invalid, Error or Zero.
func (t *Table) SetEntry(first int, es []Entry) error {
	if err := t.check(first, len(es)); err != nil {
		return err
	}
	for _, e := range es {
		if !e.State.Valid() {
			return fmt.Errorf("set entry %v: %w", e, ErrBadState)
		}
	}
	for i, e := range es {
		t.set(first+i, e)
	}
	return nil
}

// Fill replaces entries [first, first+n) with e, freeing pages that become
// equal to the table's fill entry.
func (t *Table) Fill(first, n int, e Entry) error {
	if err := t.check(first, n); err != nil {
		return err
	}
	if !e.State.Valid() {
		return fmt.Errorf("fill %v: %w", e, ErrBadState)
	}
	e = normal(e)
	for i := first; i < first+n; {
		pi, off := i/pageSize, i%pageSize
		m := min(pageSize-off, first+n-i)
		if m == pageSize && e == t.fill {
			t.pages[pi] = nil
		} else {
			for j := i; j < i+m; j++ {
				t.set(j, e)
			}
		}
		i += m
	}
	return nil
}

// SetEntryState sets (on) or clears (!on) the bits s in entries
// [first, first+n). Clearing Invalid, Error or Zero is refused with
// ErrVoided: those entries must be replaced whole with SetEntry. Setting or
// clearing NoWrite on a voided entry leaves it as it is, since its location
// means nothing.
func (t *Table) SetEntryState(first, n int, s State, on bool) error {
	if err := t.check(first, n); err != nil {
		return err
	}
	if s == 0 || !s.Valid() {
		return fmt.Errorf("set entry state %v: %w", s, ErrBadState)
	}
	if !on && s&voiding != 0 {
		return fmt.Errorf("clear %v: %w", s&voiding, ErrVoided)
	}
	if first == 0 && n == t.n && s == NoWrite && on && t.fill.Voided() {
		// Every entry: O(1), applied to each page lazily.
		t.gen++
		return nil
	}
	for i := first; i < first+n; {
		pi, off := i/pageSize, i%pageSize
		m := min(pageSize-off, first+n-i)
		p := t.pages[pi]
		if p != nil {
			p = t.page(pi)
		}
		if p == nil {
			// Every entry of the page is the fill entry.
			f := t.fill
			if on {
				f.State |= s
			} else {
				f.State &^= s
			}
			if normal(f) == t.fill {
				i += m
				continue
			}
			p = t.page(pi)
		}
		for j := off; j < off+m; j++ {
			if p[j].Voided() && s&voiding == 0 {
				continue
			}
			if on {
				p[j].State |= s
			} else {
				p[j].State &^= s
			}
			p[j] = normal(p[j])
		}
		i += m
	}
	return nil
}

// GetEntry returns a copy of entries [first, first+n).
func (t *Table) GetEntry(first, n int) ([]Entry, error) {
	if err := t.check(first, n); err != nil {
		return nil, err
	}
	out := make([]Entry, n)
	for i := range out {
		out[i] = t.Entry(first + i)
	}
	return out, nil
}

// GetStatus returns, for each entry in [first, first+n), whether all the bits
// of s are set.
func (t *Table) GetStatus(first, n int, s State) ([]bool, error) {
	if err := t.check(first, n); err != nil {
		return nil, err
	}
	out := make([]bool, n)
	for i := range out {
		out[i] = t.Entry(first + i).Is(s)
	}
	return out, nil
}

// Counts is the number of entries of a table with each state bit set, and
// of those that point at storage. An entry may count under several bits
// (Invalid|Error, NoWrite on a mapped entry).
type Counts struct {
	Invalid, Error, Zero, NoWrite int
	// Mapped counts the entries that point at storage: none of Invalid,
	// Error or Zero set (NoWrite may be).
	Mapped int
}

// add counts entry e n times.
func (c *Counts) add(e Entry, n int) {
	if e.State&Invalid != 0 {
		c.Invalid += n
	}
	if e.State&Error != 0 {
		c.Error += n
	}
	if e.State&Zero != 0 {
		c.Zero += n
	}
	if e.State&NoWrite != 0 {
		c.NoWrite += n
	}
	if !e.Voided() {
		c.Mapped += n
	}
}

// Count counts t's entries by state (the get_status of the whole table).
// It costs one look per entry of the allocated pages only: a page that is
// not allocated counts as its fill entry times its length.
func (t *Table) Count() Counts {
	var c Counts
	for pi, p := range t.pages {
		n := min(pageSize, t.n-pi*pageSize)
		if p == nil {
			c.add(t.fill, n)
			continue
		}
		stale := t.pageGen[pi] != t.gen
		for _, e := range p[:n] {
			if stale && !e.Voided() {
				e.State |= NoWrite
			}
			c.add(e, 1)
		}
	}
	return c
}
