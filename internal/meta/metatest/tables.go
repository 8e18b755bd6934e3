package metatest

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"

	"segmap/internal/meta"
	"segmap/internal/table"
)

func testNewDiskIsZero(t *testing.T, s meta.Store) {
	var d meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		d, err = tx.CreateDisk(testDisk("vol"))
		return err
	})
	verify := func(tx *meta.Tx) error {
		for _, r := range []struct{ first, n uint64 }{
			{0, 5},
			{meta.PageEntries - 1, 2},
			{0, 3*meta.PageEntries + 1},
			{1 << 40, 3},
			{1<<40 - 1, 2},
			{math.MaxUint64 / 2, 4},
		} {
			if err := checkEntries(t, tx, d.ID, r.first, zeros(int(r.n))); err != nil {
				return err
			}
		}
		if es, err := tx.Entries(d.ID, 7, 0); err != nil || len(es) != 0 {
			t.Errorf("Entries(n=0) = %v, %v", es, err)
		}
		m, err := mappedOf(tx, d.ID)
		if err != nil {
			return err
		}
		if len(m) != 0 {
			t.Errorf("new disk maps %v", m)
		}
		return nil
	}
	view(t, s, verify)
	update(t, s, verify) // reading in an Update stores nothing either
	view(t, s, verify)

	// A far segment is addressable without the pages before it.
	far := uint64(1) << 40
	update(t, s, func(tx *meta.Tx) error { return tx.SetEntries(d.ID, far+1, []table.Entry{at(1, 9)}) })
	view(t, s, func(tx *meta.Tx) error {
		if err := checkEntries(t, tx, d.ID, far, []table.Entry{table.ZeroEntry, at(1, 9), table.ZeroEntry}); err != nil {
			return err
		}
		m, err := mappedOf(tx, d.ID)
		if err != nil {
			return err
		}
		if want := []segEntry{{far + 1, at(1, 9)}}; !slices.Equal(m, want) {
			t.Errorf("ForEachMapped = %v, want %v", m, want)
		}
		return nil
	})
}

func testEntriesAcrossPages(t *testing.T, s meta.Store) {
	var d meta.Disk
	// PageEntries-3 .. PageEntries+5, every kind of persistable entry.
	first := uint64(meta.PageEntries - 3)
	es := []table.Entry{
		at(1, 10), atNW(1, 11), table.ErrorEntry, table.ZeroEntry, // page 0
		at(2, 0), {Loc: loc(3, 4), State: table.Zero}, {Loc: loc(5, 6), State: table.Error | table.NoWrite}, atNW(math.MaxUint32, math.MaxUint32), at(0, 0), // page 1
	}
	// A run over four pages, starting and ending mid-page.
	long := make([]table.Entry, 2*meta.PageEntries+20)
	for i := range long {
		long[i] = at(7, uint32(i))
	}
	longFirst := uint64(3*meta.PageEntries - 10)
	want := func() []table.Entry {
		return slices.Concat(zeros(2), es, zeros(2))
	}
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if d, err = tx.CreateDisk(testDisk("vol")); err != nil {
			return err
		}
		if err := tx.SetEntries(d.ID, first, es); err != nil {
			return fmt.Errorf("SetEntries: %w", err)
		}
		if err := tx.SetEntries(d.ID, longFirst, long); err != nil {
			return fmt.Errorf("SetEntries: %w", err)
		}
		return checkEntries(t, tx, d.ID, first-2, want())
	})
	view(t, s, func(tx *meta.Tx) error {
		if err := checkEntries(t, tx, d.ID, first-2, want()); err != nil {
			return err
		}
		// One entry at a time, each page boundary crossed separately.
		for i, e := range es {
			if err := checkEntries(t, tx, d.ID, first+uint64(i), []table.Entry{e}); err != nil {
				return err
			}
		}
		if err := checkEntries(t, tx, d.ID, longFirst-1, slices.Concat(zeros(1), long, zeros(1))); err != nil {
			return err
		}
		return checkEntries(t, tx, d.ID, 4*meta.PageEntries, long[4*meta.PageEntries-longFirst:][:meta.PageEntries])
	})

	// Overwriting part of a stored page keeps the rest of it.
	update(t, s, func(tx *meta.Tx) error {
		return tx.SetEntries(d.ID, meta.PageEntries, []table.Entry{table.ErrorEntry})
	})
	es[3] = table.ErrorEntry
	view(t, s, func(tx *meta.Tx) error { return checkEntries(t, tx, d.ID, first-2, want()) })
}

func testTablesSeparate(t *testing.T, s meta.Store) {
	var ds []meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		ds = ds[:0]
		for i := range 3 {
			d, err := tx.CreateDisk(testDisk(fmt.Sprintf("d%d", i)))
			if err != nil {
				return err
			}
			ds = append(ds, d)
			if err := tx.SetEntries(d.ID, meta.PageEntries-1, []table.Entry{at(uint32(i+1), 1), at(uint32(i+1), 2)}); err != nil {
				return err
			}
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		for i, d := range ds {
			c := uint32(i + 1)
			if err := checkEntries(t, tx, d.ID, meta.PageEntries-1, []table.Entry{at(c, 1), at(c, 2)}); err != nil {
				return err
			}
			m, err := mappedOf(tx, d.ID)
			if err != nil {
				return err
			}
			if want := []segEntry{{meta.PageEntries - 1, at(c, 1)}, {meta.PageEntries, at(c, 2)}}; !slices.Equal(m, want) {
				t.Errorf("ForEachMapped(%d) = %v, want %v", d.ID, m, want)
			}
		}
		return nil
	})
}

func testSetEntriesInvalid(t *testing.T, s meta.Store) {
	var d meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		d, err = tx.CreateDisk(testDisk("vol"))
		return err
	})
	for _, bad := range []table.Entry{
		table.InvalidEntry,
		{Loc: loc(1, 1), State: table.Invalid | table.NoWrite},
		{State: table.Invalid | table.Zero},
		{Loc: loc(1, 1), State: 0x80},
		{State: table.Zero | 0x10},
	} {
		update(t, s, func(tx *meta.Tx) error {
			// The bad entry is last, so a store that wrote as it checked
			// would have written the first ones.
			err := tx.SetEntries(d.ID, meta.PageEntries-1, []table.Entry{at(1, 1), at(1, 2), bad})
			wantErr(t, fmt.Sprintf("SetEntries(%v)", bad), err, table.ErrBadState)
			return checkEntries(t, tx, d.ID, meta.PageEntries-1, zeros(3))
		})
	}
	view(t, s, func(tx *meta.Tx) error { return checkEntries(t, tx, d.ID, meta.PageEntries-1, zeros(3)) })
}

func testForEachMapped(t *testing.T, s meta.Store) {
	var d, other meta.Disk
	far := uint64(1) << 40
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if d, err = tx.CreateDisk(testDisk("vol")); err != nil {
			return err
		}
		if other, err = tx.CreateDisk(testDisk("other")); err != nil {
			return err
		}
		for _, w := range []segEntry{
			{1, at(1, 1)},
			{2, table.ErrorEntry},
			{3, table.ZeroEntry},
			{4, table.Entry{Loc: loc(1, 4), State: table.Error | table.NoWrite}},
			{meta.PageEntries + 7, atNW(1, 7)},
			{5 * meta.PageEntries, at(1, 5)},
			{far, at(1, 40)},
		} {
			if err := tx.SetEntries(d.ID, w.seg, []table.Entry{w.e}); err != nil {
				return err
			}
		}
		return tx.SetEntries(other.ID, 0, []table.Entry{at(9, 9), at(9, 9), at(9, 9)})
	})
	want := []segEntry{
		{0, at(2, 0)},
		{meta.PageEntries + 7, atNW(1, 7)},
		{3*meta.PageEntries + 1, atNW(2, 3)},
		{5 * meta.PageEntries, at(1, 5)},
		{far, at(1, 40)},
	}
	update(t, s, func(tx *meta.Tx) error {
		// Uncommitted changes: a new entry on a stored page, a new page,
		// and a mapped entry voided.
		if err := tx.SetEntries(d.ID, 0, []table.Entry{at(2, 0), table.ZeroEntry}); err != nil {
			return err
		}
		if err := tx.SetEntries(d.ID, 3*meta.PageEntries+1, []table.Entry{atNW(2, 3)}); err != nil {
			return err
		}
		m, err := mappedOf(tx, d.ID)
		if err != nil {
			return err
		}
		if !slices.Equal(m, want) {
			t.Errorf("ForEachMapped inside the writing transaction = %v, want %v", m, want)
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		m, err := mappedOf(tx, d.ID)
		if err != nil {
			return err
		}
		if !slices.Equal(m, want) {
			t.Errorf("ForEachMapped after commit = %v, want %v", m, want)
		}
		// An error from fn stops the walk and is returned.
		calls := 0
		err = tx.ForEachMapped(d.ID, func(uint64, table.Entry) error {
			calls++
			if calls == 2 {
				return errStop
			}
			return nil
		})
		if !errors.Is(err, errStop) || calls != 2 {
			t.Errorf("ForEachMapped with fn failing on the 2nd call: %v after %d calls", err, calls)
		}
		m, err = mappedOf(tx, other.ID)
		if err != nil {
			return err
		}
		if want := []segEntry{{0, at(9, 9)}, {1, at(9, 9)}, {2, at(9, 9)}}; !slices.Equal(m, want) {
			t.Errorf("ForEachMapped(other) = %v, want %v", m, want)
		}
		return nil
	})
}

func testCopyTable(t *testing.T, s meta.Store) {
	var src, dst meta.Disk
	far := uint64(1) << 40
	set := []segEntry{
		{0, at(1, 0)},
		{1, table.ErrorEntry},
		{2, atNW(1, 2)},
		{3, table.Entry{Loc: loc(4, 4), State: table.Error | table.NoWrite}},
		{meta.PageEntries - 1, table.ErrorEntry},
		{meta.PageEntries, at(1, 3)},
		{far, table.ErrorEntry},
		{far + 1, at(1, 4)},
	}
	uncommitted := []segEntry{
		{2, table.ZeroEntry},
		{7 * meta.PageEntries, table.ErrorEntry},
		{7*meta.PageEntries + 1, at(1, 7)},
	}
	ranges := []struct{ first, n uint64 }{{0, 2*meta.PageEntries + 1}, {7 * meta.PageEntries, 3}, {far - 1, 4}}
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if src, err = tx.CreateDisk(testDisk("src")); err != nil {
			return err
		}
		if err := addContainers(tx, 1, 8); err != nil {
			return err
		}
		for _, w := range set {
			if err := mapEntry(tx, src.ID, w.seg, w.e); err != nil {
				return err
			}
		}
		return nil
	})
	var srcEntries [][]table.Entry
	var srcMapped []segEntry
	verify := func(tx *meta.Tx) error {
		for i, r := range ranges {
			if err := checkEntries(t, tx, dst.ID, r.first, srcEntries[i]); err != nil {
				return err
			}
			if err := checkEntries(t, tx, src.ID, r.first, srcEntries[i]); err != nil {
				return err
			}
		}
		m, err := mappedOf(tx, dst.ID)
		if err != nil {
			return err
		}
		if !slices.Equal(m, srcMapped) {
			t.Errorf("ForEachMapped(copy) = %v, want %v", m, srcMapped)
		}
		return nil
	}
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if dst, err = tx.CreateDisk(testDisk("dst")); err != nil {
			return err
		}
		for _, w := range uncommitted {
			if err := mapEntry(tx, src.ID, w.seg, w.e); err != nil {
				return err
			}
		}
		srcEntries = srcEntries[:0]
		for _, r := range ranges {
			es, err := tx.Entries(src.ID, r.first, r.n)
			if err != nil {
				return err
			}
			srcEntries = append(srcEntries, es)
		}
		if srcMapped, err = mappedOf(tx, src.ID); err != nil {
			return err
		}
		if err := tx.CopyTable(src.ID, dst.ID); err != nil {
			return fmt.Errorf("CopyTable: %w", err)
		}
		return verify(tx)
	})
	view(t, s, verify)
	// Spot checks that the fixture holds what the test is about: Error
	// entries, which ForEachMapped does not show, were copied.
	view(t, s, func(tx *meta.Tx) error {
		for _, seg := range []uint64{1, meta.PageEntries - 1, far, 7 * meta.PageEntries} {
			if err := checkEntries(t, tx, dst.ID, seg, []table.Entry{table.ErrorEntry}); err != nil {
				return err
			}
		}
		return checkEntries(t, tx, dst.ID, 3, []table.Entry{{Loc: loc(4, 4), State: table.Error | table.NoWrite}})
	})
	// The copy is independent of its source.
	update(t, s, func(tx *meta.Tx) error { return tx.SetEntries(src.ID, 0, []table.Entry{at(8, 8)}) })
	view(t, s, func(tx *meta.Tx) error { return checkEntries(t, tx, dst.ID, 0, []table.Entry{at(1, 0)}) })
}

// testCopyTableReplaces checks that CopyTable makes dst a copy of src even
// where dst had entries and src has none stored.
func testCopyTableReplaces(t *testing.T, s meta.Store) {
	var src, dst meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if src, err = tx.CreateDisk(testDisk("src")); err != nil {
			return err
		}
		if dst, err = tx.CreateDisk(testDisk("dst")); err != nil {
			return err
		}
		if err := addContainers(tx, 1, 2); err != nil {
			return err
		}
		if err := mapEntry(tx, src.ID, 1, at(1, 1)); err != nil {
			return err
		}
		// dst has entries on src's page and on pages src never stored.
		for _, seg := range []uint64{2, 5 * meta.PageEntries, 1 << 40} {
			if err := mapEntry(tx, dst.ID, seg, at(2, 2)); err != nil {
				return err
			}
		}
		return nil
	})
	want := []segEntry{{1, at(1, 1)}}
	verify := func(tx *meta.Tx) error {
		m, err := mappedOf(tx, dst.ID)
		if err != nil {
			return err
		}
		if !slices.Equal(m, want) {
			t.Errorf("after CopyTable(src, dst) dst maps %v, want %v (src's table)", m, want)
		}
		return nil
	}
	update(t, s, func(tx *meta.Tx) error {
		if err := tx.CopyTable(src.ID, dst.ID); err != nil {
			return err
		}
		return verify(tx)
	})
	view(t, s, verify)
}

// testSharedPages checks the sharing of table pages: CopyTable shares pages
// and changes no slot count; the first write through a sharer copies the
// page, counting a reference on each slot the copy maps; deleting one
// sharer frees nothing the other still maps, deleting the last frees.
func testSharedPages(t *testing.T, s meta.Store) {
	var a, b meta.Disk
	const far = 5 * meta.PageEntries
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
		for i, seg := range []uint64{0, 1, far} {
			if err := mapEntry(tx, a.ID, seg, at(1, uint32(i))); err != nil {
				return err
			}
		}
		return tx.CopyTable(a.ID, b.ID)
	})
	refsOf := func(tx *meta.Tx, slots ...uint32) []uint32 {
		var out []uint32
		for _, sl := range slots {
			n, err := tx.Refs(loc(1, sl))
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, n)
		}
		return out
	}
	view(t, s, func(tx *meta.Tx) error {
		if got := refsOf(tx, 0, 1, 2); !slices.Equal(got, []uint32{1, 1, 1}) {
			t.Errorf("slot counts after CopyTable %v, want 1 1 1 (pages are shared, not entries)", got)
		}
		for _, d := range []meta.Disk{a, b} {
			for _, seg := range []uint64{0, far} {
				if sh, err := tx.PageShared(d.ID, seg); err != nil || !sh {
					t.Errorf("PageShared(%s, %d) = %v, %v; want true", d.Name, seg, sh, err)
				}
			}
			if sh, err := tx.PageShared(d.ID, 3*meta.PageEntries); err != nil || sh {
				t.Errorf("PageShared(%s) of a page not stored = %v, %v; want false", d.Name, sh, err)
			}
		}
		pa, err := tx.TablePages(a.ID)
		if err != nil {
			return err
		}
		pb, err := tx.TablePages(b.ID)
		if err != nil {
			return err
		}
		if len(pa) != 2 || !slices.Equal(pa, pb) {
			t.Errorf("TablePages: a %v, b %v; want the same two", pa, pb)
		}
		// A range reads the pages it covers, whatever directory
		// they are in.
		for _, r := range []struct {
			first, n uint64
			want     []meta.PageRef
		}{
			{0, 1, pa[:1]},
			{1, far/meta.PageEntries - 1, nil},
			{1, far / meta.PageEntries, pa[1:]},
			{far / meta.PageEntries, math.MaxUint64, pa[1:]},
			{0, math.MaxUint64, pa},
			{0, 0, nil},
		} {
			got, err := tx.TablePageRange(a.ID, r.first, r.n)
			if err != nil || !slices.Equal(got, r.want) {
				t.Errorf("TablePageRange(%d, %d) = %v, %v; want %v", r.first, r.n, got, err, r.want)
			}
		}
		for _, p := range pa {
			if n, err := tx.PageRefs(p.ID); err != nil || n != 2 {
				t.Errorf("PageRefs(%d) = %d, %v; want 2", p.ID, n, err)
			}
		}
		return nil
	})
	// A write through b copies b's first page: slots 0 and 1 gain a
	// reference; a keeps its entries.
	update(t, s, func(tx *meta.Tx) error { return tx.SetEntries(b.ID, 5, []table.Entry{table.ErrorEntry}) })
	view(t, s, func(tx *meta.Tx) error {
		if got := refsOf(tx, 0, 1, 2); !slices.Equal(got, []uint32{2, 2, 1}) {
			t.Errorf("slot counts after the copy on write %v, want 2 2 1", got)
		}
		if sh, _ := tx.PageShared(a.ID, 0); sh {
			t.Error("a's first page still shared after b's write")
		}
		if sh, _ := tx.PageShared(a.ID, far); !sh {
			t.Error("a's other page no longer shared")
		}
		return checkEntries(t, tx, a.ID, 5, []table.Entry{table.ZeroEntry})
	})
	// Unshare copies the other page without changing an entry.
	update(t, s, func(tx *meta.Tx) error { return tx.Unshare(a.ID, far, 1) })
	view(t, s, func(tx *meta.Tx) error {
		if got := refsOf(tx, 0, 1, 2); !slices.Equal(got, []uint32{2, 2, 2}) {
			t.Errorf("slot counts after Unshare %v, want 2 2 2", got)
		}
		return checkEntries(t, tx, a.ID, far, []table.Entry{at(1, 2)})
	})
	// Deleting a frees nothing b maps; deleting b frees the rest.
	var freed []table.Location
	update(t, s, func(tx *meta.Tx) error {
		var err error
		freed, err = tx.DeleteDisk(a.ID)
		return err
	})
	if len(freed) != 0 {
		t.Errorf("deleting a freed %v, which b maps", freed)
	}
	update(t, s, func(tx *meta.Tx) error {
		var err error
		freed, err = tx.DeleteDisk(b.ID)
		return err
	})
	slices.SortFunc(freed, func(x, y table.Location) int { return int(x.Slot) - int(y.Slot) })
	if !slices.Equal(freed, []table.Location{loc(1, 0), loc(1, 1), loc(1, 2)}) {
		t.Errorf("deleting b freed %v, want slots 0, 1, 2", freed)
	}
	view(t, s, func(tx *meta.Tx) error {
		return tx.ForEachStoredPage(func(pid uint64, refs uint32, stored bool) error {
			t.Errorf("page %d left (%d references, stored %v) after both disks were deleted", pid, refs, stored)
			return nil
		})
	})
}
