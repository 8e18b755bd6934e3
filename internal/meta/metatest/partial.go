package metatest

import (
	"fmt"
	"slices"
	"testing"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// Partial entries (table.Entry.Part): their layers are stored with the
// entry, read back by value, and counted as slots the entry names.

// subBlocks is the sub-block count of testDisk's 1 MiB segments.
var subBlocks = table.SubBlockCount(1 << 20)

// over is table.Over at subBlocks: a copy-on-write of the sub-blocks
// [lo, hi) of e into slot s of container c.
func over(c, s uint32, lo, hi int, e table.Entry) table.Entry {
	return table.Over(loc(c, s), table.Range(lo, hi), e, subBlocks)
}

// deep returns a valid partial entry of depth layers in container c, on
// slots first (the base) to first+depth-1 (the top), each layer above the
// base holding one sub-block, spread over every word of the bitmap.
func deep(c, first uint32, depth int) table.Entry {
	e := at(c, first)
	for k := 1; k < depth; k++ {
		b := k * (subBlocks - 1) / (depth - 1)
		e = over(c, first+uint32(k), b, b+1, e)
	}
	return e
}

// partialFixture returns entries for the first page of a disk and one
// past it, partial ones at both ends of the page, each valid.
func partialFixture() map[uint64]table.Entry {
	p1 := over(1, 11, 0, 4, at(1, 10))
	nw := over(1, 21, 255, 256, over(1, 22, 64, 65, at(1, 20)))
	nw.State = table.NoWrite
	return map[uint64]table.Entry{
		0:                    over(1, 31, 3, 4, at(1, 30)),
		1:                    at(1, 1),
		2:                    p1,
		3:                    over(1, 12, 8, 9, p1),
		4:                    deep(1, 100, table.MaxDepth),
		5:                    nw,
		meta.PageEntries - 1: deep(1, 200, 3),
		meta.PageEntries + 7: deep(1, 300, table.MaxDepth),
	}
}

// checkPartialFixture fails t unless each entry of fix is valid, so that
// the fixtures are the entries the controller makes.
func checkPartialFixture(t *testing.T, fix map[uint64]table.Entry) {
	t.Helper()
	for seg, e := range fix {
		if e.Part == nil {
			continue
		}
		if err := e.Part.Valid(e.Loc, subBlocks); err != nil {
			t.Fatalf("fixture entry %d: %v", seg, err)
		}
	}
}

// setFixture sets the entries of fix on disk id.
func setFixture(tx *meta.Tx, id meta.DiskID, fix map[uint64]table.Entry) error {
	for seg, e := range fix {
		if err := tx.SetEntries(id, seg, []table.Entry{e}); err != nil {
			return err
		}
	}
	return nil
}

// checkFixture compares disk id's table with fix, through Entries,
// ForEachMapped and Page.
func checkFixture(t *testing.T, tx *meta.Tx, id meta.DiskID, fix map[uint64]table.Entry) error {
	t.Helper()
	for seg, e := range fix {
		if err := checkEntries(t, tx, id, seg, []table.Entry{e}); err != nil {
			return err
		}
	}
	m, err := mappedOf(tx, id)
	if err != nil {
		return err
	}
	if len(m) != len(fix) {
		t.Errorf("ForEachMapped: %v, want the %d entries set", m, len(fix))
	}
	for _, se := range m {
		if !sameEntry(se.e, fix[se.seg]) {
			t.Errorf("ForEachMapped: entry %d = %v, want %v", se.seg, se.e, fix[se.seg])
		}
	}
	prs, err := tx.TablePages(id)
	if err != nil {
		return err
	}
	for _, pr := range prs {
		es, err := tx.Page(pr.ID)
		if err != nil {
			return err
		}
		for i, e := range es {
			seg := pr.Index*meta.PageEntries + uint64(i)
			want, ok := fix[seg]
			if !ok {
				want = table.ZeroEntry
			}
			if !sameEntry(e, want) {
				t.Errorf("Page(%d) entry %d = %v, want %v", pr.ID, i, e, want)
			}
		}
	}
	return nil
}

func testPartialEntries(t *testing.T, s meta.Store) {
	fix := partialFixture()
	checkPartialFixture(t, fix)
	// What the caller passes is its own: SetEntries keeps a copy.
	keep := deep(1, 400, 4)
	const mineSeg = 9
	var a meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if a, err = tx.CreateDisk(testDisk("a")); err != nil {
			return err
		}
		if err := setFixture(tx, a.ID, fix); err != nil {
			return err
		}
		mine := deep(1, 400, 4)
		if err := tx.SetEntries(a.ID, mineSeg, []table.Entry{mine}); err != nil {
			return err
		}
		mine.Part.Under[0].Loc.Slot = 999
		mine.Part.Bits[0] = 0
		// A voided entry keeps no layers.
		z := table.Entry{State: table.Zero, Part: keep.Part}
		if err := tx.SetEntries(a.ID, 10, []table.Entry{z}); err != nil {
			return err
		}
		// The transaction reads its own writes.
		return checkEntries(t, tx, a.ID, mineSeg, []table.Entry{keep, table.ZeroEntry})
	})
	fix[mineSeg] = keep
	view(t, s, func(tx *meta.Tx) error {
		if err := checkFixture(t, tx, a.ID, fix); err != nil {
			return err
		}
		es, err := tx.Entries(a.ID, mineSeg, 1)
		if err != nil {
			return err
		}
		if es[0].Part == keep.Part {
			t.Errorf("entry %d read back shares the layers of the fixture", mineSeg)
		}
		return nil
	})
	// Partial entries made whole again: the page holds no layers.
	update(t, s, func(tx *meta.Tx) error {
		for seg, e := range fix {
			if e.Part != nil {
				fix[seg] = table.Whole(e)
			}
		}
		return setFixture(tx, a.ID, fix)
	})
	view(t, s, func(tx *meta.Tx) error { return checkFixture(t, tx, a.ID, fix) })
}

func testPartialRefusesBadLayout(t *testing.T, s meta.Store) {
	good := over(1, 2, 0, 1, at(1, 1))
	tooDeep := deep(1, 10, table.MaxDepth)
	tooDeep.Part.Under = append(slices.Clone(tooDeep.Part.Under), table.Layer{Loc: loc(1, 99), Bits: table.Full(subBlocks)})
	for _, c := range []struct {
		name string
		part *table.Partial
	}{
		{"NoLayer", &table.Partial{Bits: good.Part.Bits}},
		{"TooDeep", tooDeep.Part},
		{"TopHoldsNothing", &table.Partial{Under: good.Part.Under}},
		{"LayerInContainer0", &table.Partial{Bits: good.Part.Bits, Under: []table.Layer{{Loc: loc(0, 1), Bits: table.Full(subBlocks)}}}},
		{"LayerHoldsNothing", &table.Partial{Bits: good.Part.Bits, Under: []table.Layer{{Loc: loc(1, 3)}, good.Part.Under[0]}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var d meta.Disk
			update(t, s, func(tx *meta.Tx) error {
				var err error
				d, err = tx.CreateDisk(testDisk(c.name))
				if err != nil {
					return err
				}
				e := table.Entry{Loc: loc(1, 2), Part: c.part}
				wantErr(t, fmt.Sprintf("SetEntries(%v)", e), tx.SetEntries(d.ID, 0, []table.Entry{e}), meta.ErrInvalid)
				return nil
			})
			view(t, s, func(tx *meta.Tx) error {
				prs, err := tx.TablePages(d.ID)
				if len(prs) != 0 {
					t.Errorf("refused entry left pages %v", prs)
				}
				return err
			})
		})
	}
}

// testPartialRefs: copying a shared page counts a reference on every slot
// of every partial entry, and deleting the disks frees each slot exactly
// once, when its count reaches zero.
func testPartialRefs(t *testing.T, s meta.Store) {
	fix := map[uint64]table.Entry{
		0: over(1, 2, 0, 1, at(1, 1)), // slots 2, 1
		1: over(1, 3, 5, 6, at(1, 1)), // slots 3, 1: 1 is named twice in the page
		2: deep(1, 10, table.MaxDepth),
		3: at(1, 4),
	}
	checkPartialFixture(t, fix)
	slots := []uint32{1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 16, 17}
	counts := func(tx *meta.Tx) ([]uint32, error) {
		var out []uint32
		for _, sl := range slots {
			n, err := tx.Refs(loc(1, sl))
			if err != nil {
				return nil, err
			}
			out = append(out, n)
		}
		return out, nil
	}
	wantCounts := func(what string, want ...uint32) {
		t.Helper()
		view(t, s, func(tx *meta.Tx) error {
			got, err := counts(tx)
			if err == nil && !slices.Equal(got, want) {
				t.Errorf("%s: counts of slots %v are %v, want %v", what, slots, got, want)
			}
			return err
		})
	}
	var a, b meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if a, err = tx.CreateDisk(testDisk("a")); err != nil {
			return err
		}
		if b, err = tx.CreateDisk(testDisk("b")); err != nil {
			return err
		}
		if err := addContainers(tx, 1); err != nil {
			return err
		}
		for seg, e := range fix {
			if err := mapEntry(tx, a.ID, seg, e); err != nil {
				return err
			}
		}
		return tx.CopyTable(a.ID, b.ID)
	})
	wantCounts("after CopyTable", 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
	update(t, s, func(tx *meta.Tx) error { return tx.Unshare(b.ID, 0, 1) })
	wantCounts("after Unshare", 4, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)
	view(t, s, func(tx *meta.Tx) error {
		if err := checkUsed(t, tx, 1, uint64(len(slots))); err != nil {
			return err
		}
		return checkFixture(t, tx, b.ID, fix)
	})
	var freed []table.Location
	update(t, s, func(tx *meta.Tx) error {
		var err error
		freed, err = tx.DeleteDisk(a.ID)
		return err
	})
	if len(freed) != 0 {
		t.Errorf("deleting a freed %v, which b names", freed)
	}
	wantCounts("after deleting a", 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
	update(t, s, func(tx *meta.Tx) error {
		var err error
		freed, err = tx.DeleteDisk(b.ID)
		return err
	})
	slices.SortFunc(freed, func(x, y table.Location) int { return int(x.Slot) - int(y.Slot) })
	var want []table.Location
	for _, sl := range slots {
		want = append(want, loc(1, sl))
	}
	if !slices.Equal(freed, want) {
		t.Errorf("deleting b freed %v, want each of %v once", freed, want)
	}
	wantCounts("after deleting both", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
	view(t, s, func(tx *meta.Tx) error { return checkUsed(t, tx, 1, 0) })
}

// testPartialSurvivesReopen: partial entries read back the same from a
// reopened store.
func testPartialSurvivesReopen(t *testing.T, r *reopener) {
	fix := partialFixture()
	checkPartialFixture(t, fix)
	s := r.reopen()
	var a meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if a, err = tx.CreateDisk(testDisk("a")); err != nil {
			return err
		}
		return setFixture(tx, a.ID, fix)
	})
	s = r.reopen()
	view(t, s, func(tx *meta.Tx) error { return checkFixture(t, tx, a.ID, fix) })
	r.close()
}
