package controller

import (
	"fmt"
	"math"
	"slices"
	"testing"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// TestDiffTables compares two tables held as pages in memory: only pages
// whose ids differ (or that hold entries kept in memory) are read, and the
// extents are exactly the segments, or sub-blocks, whose entries differ.
func TestDiffTables(t *testing.T) {
	const (
		ss  = 64 << 10 // segment size: 16 sub-blocks of 4 KiB
		sb  = 4 << 10
		pe  = meta.PageEntries
		all = math.MaxUint64
	)
	at := func(s uint32, nw bool) table.Entry { return table.At(table.Location{Container: 1, Slot: s}, nw) }
	// page returns a page mapping segment i of the page to slot base+i
	// (NoWrite if nw), with the entries of set replacing those.
	page := func(base uint32, nw bool, set map[int]table.Entry) []table.Entry {
		es := make([]table.Entry, pe)
		for i := range es {
			es[i] = at(base+uint32(i), nw)
			if e, ok := set[i]; ok {
				es[i] = e
			}
		}
		return es
	}
	partial := func(top uint32, bits table.Bits, under uint32) table.Entry {
		return table.Over(table.Location{Container: 1, Slot: top}, bits, at(under, false), 16)
	}
	// Pages by id: 1 and 2 are the shared pages of a snapshot, the
	// others copies of them with changes.
	store := map[uint64][]table.Entry{
		1: page(0, true, nil),
		2: page(pe, true, nil),
		3: page(0, false, nil), // page 1 unshared, nothing changed but NoWrite
		4: page(0, false, map[int]table.Entry{5: at(9000, false), 6: table.ZeroEntry}),
		5: page(pe, false, map[int]table.Entry{0: at(9001, false)}),
		6: page(0, false, map[int]table.Entry{pe - 1: at(9002, false)}),
		7: page(0, false, map[int]table.Entry{3: partial(9003, table.Range(2, 4).Or(table.Range(9, 10)), 3)}),
		8: page(0, false, map[int]table.Entry{10: table.ZeroEntry}),
	}
	refs := func(ids ...uint64) []meta.PageRef {
		var out []meta.PageRef
		for i, id := range ids {
			if id != 0 {
				out = append(out, meta.PageRef{Index: uint64(i), ID: id})
			}
		}
		return out
	}
	seg := func(s uint64) uint64 { return s * ss }
	for _, tt := range []struct {
		name         string
		a, b         diffSide
		sizeA, sizeB uint64
		off, end     uint64
		max          int
		want         []Extent
		next         uint64
		loads        int
	}{
		{name: "shared pages", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(1, 2)}, want: nil},
		{name: "NoWrite alone", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(3, 2)}, want: nil, loads: 2},
		{name: "a write and a trim", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(4, 2)},
			want: []Extent{{seg(5), 2 * ss}}, loads: 2},
		{name: "symmetric", a: diffSide{pages: refs(4, 2)}, b: diffSide{pages: refs(1, 2)},
			want: []Extent{{seg(5), 2 * ss}}, loads: 2},
		{name: "merged across a page boundary", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(6, 5)},
			want: []Extent{{seg(pe - 1), 2 * ss}}, loads: 4},
		{name: "a partial write: its sub-blocks", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(7, 2)},
			want: []Extent{{seg(3) + 2*sb, 2 * sb}, {seg(3) + 9*sb, sb}}, loads: 2},
		{name: "a page not stored is Zero", a: diffSide{pages: refs(0, 2)}, b: diffSide{pages: refs(8, 2)},
			want: []Extent{{0, seg(10)}, {seg(11), seg(pe - 11)}}, loads: 1},
		{name: "entries in memory over shared pages", a: diffSide{pages: refs(1, 2), over: map[uint64]table.Entry{7: at(7, false)}},
			b:    diffSide{pages: refs(1, 2), over: map[uint64]table.Entry{pe + 2: at(9100, false), 8: at(8, false)}},
			want: []Extent{{seg(pe + 2), ss}}, loads: 4},
		{name: "grown: the new bytes changed", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(1, 2)},
			sizeA: seg(pe + 10), sizeB: seg(2*pe) + 512, want: []Extent{{seg(pe + 10), seg(pe-10) + 512}}},
		{name: "shrunk, changed before the end", a: diffSide{pages: refs(4, 2)}, b: diffSide{pages: refs(1)},
			sizeA: seg(2 * pe), sizeB: seg(pe), want: []Extent{{seg(5), 2 * ss}, {seg(pe), seg(pe)}}, loads: 2},
		{name: "a range inside a changed extent", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(4, 2)},
			off: seg(5) + 100, end: seg(6) + 200, want: []Extent{{seg(5) + 100, ss + 100}}, loads: 2},
		{name: "a range that misses the change reads no page", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(1, 5)},
			off: 0, end: seg(pe), want: nil},
		{name: "at most one extent", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(7, 2)}, max: 1,
			want: []Extent{{seg(3) + 2*sb, 2 * sb}}, next: seg(3) + 9*sb, loads: 2},
		{name: "at most one extent, merged across pages", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(6, 5)}, max: 1,
			want: []Extent{{seg(pe - 1), 2 * ss}}, loads: 4},
		{name: "at most one extent, the next past a page", a: diffSide{pages: refs(4, 2)}, b: diffSide{pages: refs(1, 5)}, max: 1,
			want: []Extent{{seg(5), 2 * ss}}, next: seg(pe), loads: 4},
		{name: "at most one extent, a resize next", a: diffSide{pages: refs(4, 2)}, b: diffSide{pages: refs(1)}, max: 1,
			sizeA: seg(2 * pe), sizeB: seg(pe), want: []Extent{{seg(5), 2 * ss}}, next: seg(pe), loads: 2},
		{name: "a range past the end", a: diffSide{pages: refs(1, 2)}, b: diffSide{pages: refs(4, 2)},
			off: seg(3 * pe), end: all, want: nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.sizeA == 0 {
				tt.sizeA, tt.sizeB = seg(2*pe), seg(2*pe)
			}
			if tt.end == 0 {
				tt.end = all
			}
			sp := diffSpec{segSize: ss, sizeA: tt.sizeA, sizeB: tt.sizeB, off: tt.off, end: tt.end, max: tt.max}
			// The sides as TablePageRange would give them.
			first, n := sp.pages()
			clip := func(d diffSide) diffSide {
				d.pages = slices.DeleteFunc(slices.Clone(d.pages), func(p meta.PageRef) bool { return p.Index < first || p.Index >= first+n })
				return d
			}
			loads := 0
			got, next, err := diffTables(sp, clip(tt.a), clip(tt.b), func(pid uint64) ([]table.Entry, error) {
				loads++
				es, ok := store[pid]
				if !ok {
					return nil, fmt.Errorf("page %d: %w", pid, meta.ErrCorrupt)
				}
				return es, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.want) || next != tt.next {
				t.Errorf("extents %v, next %d; want %v, next %d", got, next, tt.want, tt.next)
			}
			if loads != tt.loads {
				t.Errorf("%d pages read, want %d", loads, tt.loads)
			}
		})
	}
}
