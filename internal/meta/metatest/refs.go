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

func testRefsUsed(t *testing.T, s meta.Store) {
	var c, other meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if c, err = tx.AddContainer(testContainer("c", 3*meta.PageSlots+7)); err != nil {
			return err
		}
		other, err = tx.AddContainer(testContainer("other", 10))
		return err
	})
	a, b, z := loc(c.ID, 5), loc(c.ID, 2*meta.PageSlots+3), loc(c.ID, 3*meta.PageSlots+6)
	steps := []struct {
		at   table.Location
		n    uint32
		used uint64
	}{
		{a, 2, 1},              // 0 -> n
		{a, 5, 1},              // n -> m
		{b, 1, 2},              // 0 -> n, another page
		{z, math.MaxUint32, 3}, // last slot, largest count
		{a, 0, 2},              // n -> 0
		{a, 0, 2},              // 0 -> 0
		{b, 1, 2},              // n -> n
	}
	counts := map[table.Location]uint32{}
	update(t, s, func(tx *meta.Tx) error {
		clear(counts)
		for i, st := range steps {
			if err := tx.SetRefs(st.at, st.n); err != nil {
				return fmt.Errorf("step %d: SetRefs(%v, %d): %w", i, st.at, st.n, err)
			}
			counts[st.at] = st.n
			for l, want := range counts {
				if got, err := tx.Refs(l); err != nil || got != want {
					t.Errorf("step %d: Refs(%v) = %d, %v, want %d", i, l, got, err, want)
				}
			}
			if err := checkUsed(t, tx, c.ID, st.used); err != nil {
				return err
			}
		}
		return checkUsed(t, tx, other.ID, 0)
	})
	view(t, s, func(tx *meta.Tx) error {
		for l, want := range counts {
			if got, err := tx.Refs(l); err != nil || got != want {
				t.Errorf("after commit: Refs(%v) = %d, %v, want %d", l, got, err, want)
			}
		}
		if got, err := tx.Refs(loc(other.ID, 5)); err != nil || got != 0 {
			t.Errorf("Refs in another container = %d, %v", got, err)
		}
		if err := checkUsed(t, tx, other.ID, 0); err != nil {
			return err
		}
		return checkUsed(t, tx, c.ID, 2)
	})
	// Changes in a later transaction start from the committed Used.
	update(t, s, func(tx *meta.Tx) error {
		if err := tx.SetRefs(b, 0); err != nil {
			return err
		}
		if err := tx.SetRefs(loc(c.ID, 0), 1); err != nil {
			return err
		}
		if err := tx.SetRefs(z, 0); err != nil {
			return err
		}
		return checkUsed(t, tx, c.ID, 1)
	})
	view(t, s, func(tx *meta.Tx) error { return checkUsed(t, tx, c.ID, 1) })
}

func testRefsRange(t *testing.T, s meta.Store) {
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if c, err = tx.AddContainer(testContainer("c", meta.PageSlots+2)); err != nil {
			return err
		}
		return tx.SetRefs(loc(c.ID, meta.PageSlots+1), 1) // the last slot
	})
	for _, slot := range []uint32{meta.PageSlots + 2, 2 * meta.PageSlots, math.MaxUint32} {
		update(t, s, func(tx *meta.Tx) error {
			wantErr(t, fmt.Sprintf("SetRefs(slot %d of %d)", slot, c.Slots), tx.SetRefs(loc(c.ID, slot), 1), meta.ErrRange)
			_, err := meta.AddRefs(tx, loc(c.ID, slot), 1)
			wantErr(t, fmt.Sprintf("AddRefs(slot %d of %d)", slot, c.Slots), err, meta.ErrRange)
			return checkUsed(t, tx, c.ID, 1)
		})
	}
	view(t, s, func(tx *meta.Tx) error {
		rs, err := refsOf(tx, c.ID)
		if err != nil {
			return err
		}
		if want := []slotRef{{meta.PageSlots + 1, 1}}; !slices.Equal(rs, want) {
			t.Errorf("ForEachRef = %v, want %v", rs, want)
		}
		return checkUsed(t, tx, c.ID, 1)
	})
}

func testAddRefs(t *testing.T, s meta.Store) {
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		c, err = tx.AddContainer(testContainer("c", 10))
		return err
	})
	l := loc(c.ID, 3)
	update(t, s, func(tx *meta.Tx) error {
		_, err := meta.AddRefs(tx, l, -1)
		wantErr(t, "AddRefs(-1) of a free slot", err, meta.ErrCorrupt)
		if n, err := meta.AddRefs(tx, l, 2); err != nil || n != 2 {
			t.Errorf("AddRefs(+2) = %d, %v, want 2", n, err)
		}
		_, err = meta.AddRefs(tx, l, -3)
		wantErr(t, "AddRefs(-3) of a count of 2", err, meta.ErrCorrupt)
		if n, err := tx.Refs(l); err != nil || n != 2 {
			t.Errorf("Refs after a refused AddRefs = %d, %v, want 2", n, err)
		}
		if n, err := meta.AddRefs(tx, l, 0); err != nil || n != 2 {
			t.Errorf("AddRefs(0) = %d, %v, want 2", n, err)
		}
		return checkUsed(t, tx, c.ID, 1)
	})
	update(t, s, func(tx *meta.Tx) error {
		if n, err := meta.AddRefs(tx, l, -2); err != nil || n != 0 {
			t.Errorf("AddRefs(-2) of 2 = %d, %v, want 0", n, err)
		}
		return checkUsed(t, tx, c.ID, 0)
	})
	view(t, s, func(tx *meta.Tx) error {
		if n, err := tx.Refs(l); err != nil || n != 0 {
			t.Errorf("Refs = %d, %v, want 0", n, err)
		}
		return checkUsed(t, tx, c.ID, 0)
	})
}

func testFindFree(t *testing.T, s meta.Store) {
	const slots = 3*meta.PageSlots + 7
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		c, err = tx.AddContainer(testContainer("c", slots))
		return err
	})
	findFree := func(tx *meta.Tx, from, want uint32, wantOK bool) error {
		t.Helper()
		got, ok, err := tx.FindFree(c.ID, from)
		if err != nil {
			return fmt.Errorf("FindFree(%d): %w", from, err)
		}
		if ok != wantOK || (ok && got != want) {
			t.Errorf("FindFree(from %d) = %d, %v, want %d, %v", from, got, ok, want, wantOK)
		}
		return nil
	}
	fill := func(tx *meta.Tx, lo, hi uint32, n uint32) error {
		for s := lo; s < hi; s++ {
			if err := tx.SetRefs(loc(c.ID, s), n); err != nil {
				return err
			}
		}
		return nil
	}
	const last = slots - 1
	update(t, s, func(tx *meta.Tx) error {
		for _, from := range []uint32{0, 1, meta.PageSlots - 1, meta.PageSlots + 5, last} {
			if err := findFree(tx, from, from, true); err != nil {
				return err
			}
		}
		// from past the end wraps to the start.
		if err := findFree(tx, slots, 0, true); err != nil {
			return err
		}
		if err := findFree(tx, math.MaxUint32, 0, true); err != nil {
			return err
		}
		// Used slots are skipped across pages.
		if err := fill(tx, 0, 2*meta.PageSlots+4, 1); err != nil {
			return err
		}
		if err := findFree(tx, 0, 2*meta.PageSlots+4, true); err != nil {
			return err
		}
		return findFree(tx, 10, 2*meta.PageSlots+4, true)
	})
	update(t, s, func(tx *meta.Tx) error {
		// Only the last slot is free: found from anywhere.
		if err := fill(tx, 2*meta.PageSlots+4, last, 3); err != nil {
			return err
		}
		for _, from := range []uint32{0, meta.PageSlots, last} {
			if err := findFree(tx, from, last, true); err != nil {
				return err
			}
		}
		// Only slot 5 is free: found by wrapping around.
		if err := tx.SetRefs(loc(c.ID, last), 1); err != nil {
			return err
		}
		if err := tx.SetRefs(loc(c.ID, 5), 0); err != nil {
			return err
		}
		for _, from := range []uint32{0, 5, 6, meta.PageSlots, last} {
			if err := findFree(tx, from, 5, true); err != nil {
				return err
			}
		}
		// Full.
		if err := tx.SetRefs(loc(c.ID, 5), 1); err != nil {
			return err
		}
		for _, from := range []uint32{0, 1234, last} {
			if err := findFree(tx, from, 0, false); err != nil {
				return err
			}
		}
		return checkUsed(t, tx, c.ID, slots)
	})
	view(t, s, func(tx *meta.Tx) error {
		if err := findFree(tx, 0, 0, false); err != nil {
			return err
		}
		return checkUsed(t, tx, c.ID, slots)
	})
	update(t, s, func(tx *meta.Tx) error {
		if err := tx.SetRefs(loc(c.ID, 3*meta.PageSlots+2), 0); err != nil {
			return err
		}
		return findFree(tx, 0, 3*meta.PageSlots+2, true)
	})
	view(t, s, func(tx *meta.Tx) error { return findFree(tx, 3*meta.PageSlots+3, 3*meta.PageSlots+2, true) })
}

func testForEachRef(t *testing.T, s meta.Store) {
	const slots = 3*meta.PageSlots + 7
	var c, other meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if c, err = tx.AddContainer(testContainer("c", slots)); err != nil {
			return err
		}
		if other, err = tx.AddContainer(testContainer("other", slots)); err != nil {
			return err
		}
		for _, r := range []slotRef{{slots - 1, 1}, {0, 1}, {7, 3}, {meta.PageSlots, 2}, {2*meta.PageSlots + 6, 9}} {
			if err := tx.SetRefs(loc(c.ID, r.slot), r.n); err != nil {
				return err
			}
		}
		return tx.SetRefs(loc(other.ID, 8), 8)
	})
	want := []slotRef{{0, 1}, {meta.PageSlots, 2}, {meta.PageSlots + 1, 4}, {2*meta.PageSlots + 6, 9}, {slots - 1, 1}}
	update(t, s, func(tx *meta.Tx) error {
		if err := tx.SetRefs(loc(c.ID, 7), 0); err != nil {
			return err
		}
		if err := tx.SetRefs(loc(c.ID, meta.PageSlots+1), 4); err != nil {
			return err
		}
		rs, err := refsOf(tx, c.ID)
		if err != nil {
			return err
		}
		if !slices.Equal(rs, want) {
			t.Errorf("ForEachRef inside the writing transaction = %v, want %v", rs, want)
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		rs, err := refsOf(tx, c.ID)
		if err != nil {
			return err
		}
		if !slices.Equal(rs, want) {
			t.Errorf("ForEachRef after commit = %v, want %v", rs, want)
		}
		if rs, err = refsOf(tx, other.ID); err != nil {
			return err
		}
		if want := []slotRef{{8, 8}}; !slices.Equal(rs, want) {
			t.Errorf("ForEachRef(other) = %v, want %v", rs, want)
		}
		calls := 0
		err = tx.ForEachRef(c.ID, func(uint32, uint32) error {
			calls++
			if calls == 3 {
				return errStop
			}
			return nil
		})
		if !errors.Is(err, errStop) || calls != 3 {
			t.Errorf("ForEachRef with fn failing on the 3rd call: %v after %d calls", err, calls)
		}
		return nil
	})
}
