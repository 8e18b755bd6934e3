package table

import (
	"errors"
	"fmt"
	"testing"
)

var loc = Location{Container: 3, Slot: 7}

func TestDecide(t *testing.T) {
	tests := []struct {
		e     Entry
		op    Op
		want  Action
		cause State
	}{
		{InvalidEntry, Read, Fault, Invalid},
		{InvalidEntry, Write, Fault, Invalid},
		{Entry{Loc: loc, State: Invalid | NoWrite}, Read, Fault, Invalid},
		{Entry{Loc: loc, State: Invalid | NoWrite}, Write, Fault, Invalid},
		{Entry{State: Invalid | Zero}, Read, Fault, Invalid},
		{ErrorEntry, Read, Fail, Error},
		{ErrorEntry, Write, Fail, Error},
		{Entry{State: Error | Zero}, Read, Fail, Error},
		{ZeroEntry, Read, ReadZeros, 0},
		{ZeroEntry, Write, Fault, Zero},
		{Entry{State: Zero | NoWrite}, Read, ReadZeros, 0},
		{Entry{State: Zero | NoWrite}, Write, Fault, Zero},
		{At(loc, true), Read, Proceed, 0},
		{At(loc, true), Write, Fault, NoWrite},
		{At(loc, false), Read, Proceed, 0},
		{At(loc, false), Write, Proceed, 0},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%v/%v", tt.e, tt.op), func(t *testing.T) {
			got := Decide(tt.e, tt.op)
			if got.Action != tt.want || got.Reason != tt.cause {
				t.Fatalf("Decide(%v, %v) = %v/%v, want %v/%v", tt.e, tt.op, got.Action, got.Reason, tt.want, tt.cause)
			}
		})
	}
}

// TestDecideEveryState checks that every combination of state bits and
// operation gets a decision, and that only entries without voiding bits reach
// storage.
func TestDecideEveryState(t *testing.T) {
	for s := State(0); s <= allStates; s++ {
		for _, op := range []Op{Read, Write} {
			d := Decide(Entry{Loc: loc, State: s}, op)
			if d.Action == 0 {
				t.Fatalf("no decision for %v %v", s, op)
			}
			if d.Action == Proceed && s&voiding != 0 {
				t.Errorf("%v %v proceeds to a voided location", s, op)
			}
			if op == Write && d.Action == Proceed && s != 0 {
				t.Errorf("write proceeds with %v", s)
			}
		}
	}
}

func TestResolve(t *testing.T) {
	mapped, nw := At(loc, false), At(loc, true)
	tests := []struct {
		e     Entry
		op    Op
		refs  uint32
		whole bool
		p     Policy
		want  Plan
	}{
		{ErrorEntry, Read, 0, false, Forward, Deny},
		{ErrorEntry, Write, 0, false, Forward, Deny},
		{InvalidEntry, Write, 0, false, Forward, Deny},
		{ZeroEntry, Read, 0, false, Forward, Load},
		{ZeroEntry, Write, 0, false, Forward, Allocate},
		{ZeroEntry, Write, 0, true, Reverse, Allocate},
		{mapped, Read, 1, false, Forward, Load},
		{mapped, Write, 1, false, Forward, Load},
		{nw, Read, 2, false, Forward, Load},
		{nw, Write, 1, false, Forward, ClearNoWrite},
		{nw, Write, 0, false, Forward, Deny},
		{nw, Write, 1, false, Reverse, ClearNoWrite},
		{nw, Write, 2, false, Forward, CopySub},
		{nw, Write, 5, false, Reverse, CopyReverse},
		{nw, Write, 2, true, Forward, MoveForward},
		{nw, Write, 2, true, Reverse, MoveForward},
	}
	for _, tt := range tests {
		got := Resolve(tt.e, tt.op, tt.refs, Span{Whole: tt.whole, Blocks: Range(0, 1)}, tt.p)
		if got != tt.want {
			t.Errorf("Resolve(%v, %v, refs=%d, whole=%v, %v) = %v, want %v", tt.e, tt.op, tt.refs, tt.whole, tt.p, got, tt.want)
		}
	}
}

func TestSetEntryStateCannotLeaveVoidingStates(t *testing.T) {
	for _, s := range []State{Invalid, Error, Zero, Invalid | NoWrite, Zero | Error} {
		tb := New(4, Entry{Loc: loc, State: s})
		err := tb.SetEntryState(0, 4, s, false)
		if !errors.Is(err, ErrVoided) {
			t.Fatalf("clear %v: err = %v, want ErrVoided", s, err)
		}
		for i := 0; i < 4; i++ {
			if tb.Entry(i) != normal(Entry{Loc: loc, State: s}) {
				t.Fatalf("refused clear changed entry %d to %v", i, tb.Entry(i))
			}
		}
		// Replacing the entry whole works.
		if err := tb.SetEntry(1, []Entry{At(loc, false)}); err != nil {
			t.Fatal(err)
		}
		if got := tb.Entry(1); got != At(loc, false) {
			t.Fatalf("after SetEntry: %v", got)
		}
	}
}

func TestSetEntryStateNoWrite(t *testing.T) {
	tb := New(8, At(loc, false))
	if err := tb.SetEntryState(2, 3, NoWrite, true); err != nil {
		t.Fatal(err)
	}
	st, err := tb.GetStatus(0, 8, NoWrite)
	if err != nil {
		t.Fatal(err)
	}
	want := []bool{false, false, true, true, true, false, false, false}
	if fmt.Sprint(st) != fmt.Sprint(want) {
		t.Fatalf("status %v, want %v", st, want)
	}
	if err := tb.SetEntryState(0, 8, NoWrite, false); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		if tb.Entry(i) != At(loc, false) {
			t.Fatalf("entry %d = %v", i, tb.Entry(i))
		}
	}
	// Setting a voiding state is allowed (restrictive).
	if err := tb.SetEntryState(0, 2, Invalid, true); err != nil {
		t.Fatal(err)
	}
	if Decide(tb.Entry(0), Read).Action != Fault {
		t.Fatal("invalidated entry does not fault")
	}
}

func TestRanges(t *testing.T) {
	tb := New(4, ZeroEntry)
	bad := [][2]int{{-1, 1}, {0, 5}, {4, 1}, {5, 0}, {2, -1}, {3, 2}}
	for _, r := range bad {
		if _, err := tb.GetEntry(r[0], r[1]); !errors.Is(err, ErrRange) {
			t.Errorf("GetEntry%v: %v", r, err)
		}
		if _, err := tb.GetStatus(r[0], r[1], Zero); !errors.Is(err, ErrRange) {
			t.Errorf("GetStatus%v: %v", r, err)
		}
		if err := tb.SetEntryState(r[0], r[1], NoWrite, true); !errors.Is(err, ErrRange) {
			t.Errorf("SetEntryState%v: %v", r, err)
		}
	}
	if err := tb.SetEntry(3, []Entry{ZeroEntry, ZeroEntry}); !errors.Is(err, ErrRange) {
		t.Errorf("SetEntry past end: %v", err)
	}
	if err := tb.SetEntry(0, []Entry{{State: 0x80}}); !errors.Is(err, ErrBadState) {
		t.Errorf("SetEntry bad state: %v", err)
	}
	if err := tb.SetEntryState(0, 1, 0, true); !errors.Is(err, ErrBadState) {
		t.Errorf("SetEntryState empty: %v", err)
	}
	es, err := tb.GetEntry(4, 0)
	if err != nil || len(es) != 0 {
		t.Errorf("empty range at end: %v %v", es, err)
	}
}

func TestSparse(t *testing.T) {
	const n = 1 << 24 // a 1 TiB disk of 64 KiB segments
	tb := New(n, InvalidEntry)
	if err := tb.SetEntryState(0, n, NoWrite, true); err != nil {
		t.Fatal(err)
	}
	if tb.Pages() != 0 {
		t.Fatalf("NoWrite on an Invalid table allocated %d pages", tb.Pages())
	}
	if err := tb.SetEntry(n-1, []Entry{At(loc, false)}); err != nil {
		t.Fatal(err)
	}
	if tb.Pages() != 1 || tb.Entry(n-1) != At(loc, false) || tb.Entry(n-2) != InvalidEntry {
		t.Fatalf("pages %d, last %v, before %v", tb.Pages(), tb.Entry(n-1), tb.Entry(n-2))
	}
	if err := tb.SetEntryState(0, n, NoWrite, true); err != nil {
		t.Fatal(err)
	}
	if tb.Entry(n-1) != At(loc, true) || tb.Pages() != 1 {
		t.Fatalf("after NoWrite: %v, %d pages", tb.Entry(n-1), tb.Pages())
	}
	if err := tb.Fill(0, n, InvalidEntry); err != nil {
		t.Fatal(err)
	}
	if tb.Pages() != 0 {
		t.Fatalf("Fill with the fill entry kept %d pages", tb.Pages())
	}
}

func TestNormalised(t *testing.T) {
	tb := New(4, At(loc, false))
	// A voiding state drops the location.
	if err := tb.SetEntryState(0, 1, Zero, true); err != nil {
		t.Fatal(err)
	}
	if tb.Entry(0) != ZeroEntry {
		t.Fatalf("zeroed entry = %#v", tb.Entry(0))
	}
	// NoWrite does not stick to voided entries.
	if err := tb.SetEntryState(0, 4, NoWrite, true); err != nil {
		t.Fatal(err)
	}
	if tb.Entry(0) != ZeroEntry || tb.Entry(1) != At(loc, true) {
		t.Fatalf("after NoWrite: %v %v", tb.Entry(0), tb.Entry(1))
	}
	if err := tb.SetEntry(2, []Entry{{Loc: loc, State: Error | NoWrite}}); err != nil {
		t.Fatal(err)
	}
	if tb.Entry(2) != ErrorEntry {
		t.Fatalf("set voided entry kept %#v", tb.Entry(2))
	}
}

func TestStrings(t *testing.T) {
	for _, tt := range []struct {
		got, want string
	}{
		{State(0).String(), "Mapped"},
		{(Invalid | NoWrite).String(), "Invalid|NoWrite"},
		{At(loc, true).String(), "c3/s7+NoWrite"},
		{ZeroEntry.String(), "Zero"},
		{CopyReverse.String(), "copy-reverse"},
		{Forward.String(), "forward"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	if p, err := ParsePolicy("reverse"); err != nil || p != Reverse {
		t.Errorf("ParsePolicy: %v %v", p, err)
	}
	if _, err := ParsePolicy("sideways"); !errors.Is(err, ErrBadPolicy) {
		t.Errorf("ParsePolicy(sideways): %v", err)
	}
}

// TestWholeTableNoWrite: NoWrite on every entry (a snapshot) applies to
// every mapped entry loaded before it, including entries written later to
// the same pages, and not to entries set after it.
func TestWholeTableNoWrite(t *testing.T) {
	const n = 3*pageSize + 5
	tb := New(n, InvalidEntry)
	loc := func(i int) Location { return Location{Container: 1, Slot: uint32(i)} }
	for _, i := range []int{0, 1, pageSize + 7, 3 * pageSize} {
		if err := tb.SetEntry(i, []Entry{At(loc(i), false)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := tb.SetEntry(2, []Entry{ZeroEntry}); err != nil {
		t.Fatal(err)
	}
	gen := tb.gen
	if err := tb.SetEntryState(0, n, NoWrite, true); err != nil {
		t.Fatal(err)
	}
	if tb.gen == gen {
		t.Fatal("whole-table NoWrite walked the entries instead of counting")
	}
	// A write to entry 1 after the snapshot must not lose entry 0's NoWrite.
	if err := tb.SetEntry(1, []Entry{At(loc(99), false)}); err != nil {
		t.Fatal(err)
	}
	want := map[int]Entry{
		0:            At(loc(0), true),
		1:            At(loc(99), false),
		2:            ZeroEntry,
		3:            InvalidEntry,
		pageSize + 7: At(loc(pageSize+7), true),
		3 * pageSize: At(loc(3*pageSize), true),
		2 * pageSize: InvalidEntry,
	}
	for i, w := range want {
		if got := tb.Entry(i); got != w {
			t.Errorf("entry %d = %v, want %v", i, got, w)
		}
	}
	st, err := tb.GetStatus(pageSize+7, 1, NoWrite)
	if err != nil || !st[0] {
		t.Errorf("GetStatus NoWrite of a loaded entry after the snapshot = %v, %v", st, err)
	}
	// Clearing NoWrite on one entry (a copy-on-write resolved) works on
	// a page not yet written since.
	if err := tb.SetEntryState(3*pageSize, 1, NoWrite, false); err != nil {
		t.Fatal(err)
	}
	if got := tb.Entry(3 * pageSize); got != At(loc(3*pageSize), false) {
		t.Errorf("entry after clearing NoWrite = %v", got)
	}
}

// TestCount checks Count against a count of every entry, over tables with
// unallocated pages, a short last page and a lazy whole-table NoWrite.
func TestCount(t *testing.T) {
	n := 2*pageSize + 100
	tests := []struct {
		name  string
		fill  Entry
		apply func(tb *Table) error
		want  Counts
	}{
		{"new agent table", InvalidEntry, func(*Table) error { return nil }, Counts{Invalid: n}},
		{"new disk", ZeroEntry, func(*Table) error { return nil }, Counts{Zero: n}},
		{"some loaded", InvalidEntry, func(tb *Table) error {
			return tb.SetEntry(pageSize-1, []Entry{At(loc, false), At(loc, true), ZeroEntry, ErrorEntry})
		}, Counts{Invalid: n - 4, Mapped: 2, NoWrite: 1, Zero: 1, Error: 1}},
		{"whole-table NoWrite is lazy", InvalidEntry, func(tb *Table) error {
			if err := tb.SetEntry(3, []Entry{At(loc, false), At(loc, false)}); err != nil {
				return err
			}
			return tb.SetEntryState(0, n, NoWrite, true)
		}, Counts{Invalid: n - 2, Mapped: 2, NoWrite: 2}},
		{"error over invalid", InvalidEntry, func(tb *Table) error {
			return tb.SetEntryState(2*pageSize, 100, Error, true)
		}, Counts{Invalid: n, Error: 100}},
		{"mapped fill", At(loc, false), func(tb *Table) error {
			return tb.SetEntryState(0, 10, Zero, true)
		}, Counts{Zero: 10, Mapped: n - 10}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := New(n, tt.fill)
			if err := tt.apply(tb); err != nil {
				t.Fatal(err)
			}
			var each Counts
			for i := range n {
				each.add(tb.Entry(i), 1)
			}
			if got := tb.Count(); got != tt.want || each != tt.want {
				t.Errorf("Count() = %+v, entry by entry %+v, want %+v", got, each, tt.want)
			}
		})
	}
}

// TestRelocate checks that Relocate moves an entry's own slot and its
// layers, keeps its state and sub-blocks, and leaves the original alone.
func TestRelocate(t *testing.T) {
	const n = 16
	base := At(Location{Container: 1, Slot: 2}, false)
	mid := Over(Location{Container: 2, Slot: 5}, Range(3, 4), base, n)
	e := Over(Location{Container: 1, Slot: 7}, Range(0, 1), mid, n)
	e.State = NoWrite
	move := func(l Location) Location {
		if l.Container == 1 {
			return Location{Container: 3, Slot: l.Slot + 100}
		}
		return l
	}
	got := e.Relocate(move)
	if got.String() != "c3/s107{0}<c2/s5{3}<c3/s102+NoWrite" || got.State != NoWrite {
		t.Errorf("Relocate = %v (%v)", got, got.State)
	}
	if e.String() != "c1/s7{0}<c2/s5{3}<c1/s2+NoWrite" {
		t.Errorf("Relocate changed its input: %v", e)
	}
	if z := (Entry{State: Zero}); !z.Relocate(move).Equal(z) {
		t.Errorf("Relocate of Zero = %v", z.Relocate(move))
	}
}
