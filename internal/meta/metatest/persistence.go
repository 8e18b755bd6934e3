package metatest

import (
	"reflect"
	"slices"
	"testing"
	"time"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// reopener opens the store kept in one directory, one at a time, and closes
// whatever is still open when the test ends.
type reopener struct {
	t    *testing.T
	dir  string
	open func(t *testing.T, dir string) meta.Store
	cur  meta.Store
}

func (r *reopener) reopen() meta.Store {
	r.t.Helper()
	if r.cur != nil {
		r.close()
	}
	if r.cur = r.open(r.t, r.dir); r.cur == nil {
		r.t.Fatal("open returned a nil store")
	}
	s := r.cur
	r.t.Cleanup(func() {
		if r.cur == s {
			s.Close()
			r.cur = nil
		}
	})
	return s
}

func (r *reopener) close() {
	r.t.Helper()
	s := r.cur
	r.cur = nil
	if err := s.Close(); err != nil {
		r.t.Fatalf("Close: %v", err)
	}
}

func testSurvivesReopen(t *testing.T, r *reopener) {
	s := r.reopen()
	var a, b, gone meta.Disk
	var c meta.Container
	long := make([]table.Entry, meta.PageEntries+6)
	for i := range long {
		long[i] = at(1, uint32(i))
	}
	long[3] = table.ErrorEntry
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if a, err = tx.CreateDisk(testDisk("a")); err != nil {
			return err
		}
		bd := testDisk("b")
		bd.Created = time.Date(2001, 2, 3, 4, 5, 6, 789, time.UTC)
		bd.Policy, bd.ReadOnly, bd.Origin, bd.Family = table.Reverse, true, a.ID, a.ID
		if b, err = tx.CreateDisk(bd); err != nil {
			return err
		}
		if gone, err = tx.CreateDisk(testDisk("gone")); err != nil {
			return err
		}
		if err := tx.SetEntries(a.ID, meta.PageEntries-3, long); err != nil {
			return err
		}
		// (Error entries: deleting a disk releases the slots it maps.)
		if err := tx.SetEntries(gone.ID, 0, []table.Entry{table.ErrorEntry, table.ErrorEntry}); err != nil {
			return err
		}
		if c, err = tx.AddContainer(testContainer("c", 2*meta.PageSlots+1)); err != nil {
			return err
		}
		for _, sl := range []uint32{0, meta.PageSlots + 1, 2 * meta.PageSlots} {
			if err := tx.SetRefs(loc(c.ID, sl), sl+1); err != nil {
				return err
			}
		}
		return nil
	})
	update(t, s, func(tx *meta.Tx) error {
		if err := tx.CopyTable(a.ID, b.ID); err != nil {
			return err
		}
		renamed := a
		renamed.Name = "a2"
		if err := tx.PutDisk(renamed); err != nil {
			return err
		}
		return deleteDisk(tx, gone.ID)
	})
	a.Name = "a2"
	wantRefs := []slotRef{{0, 1}, {meta.PageSlots + 1, meta.PageSlots + 2}, {2 * meta.PageSlots, 2*meta.PageSlots + 1}}

	for range 2 {
		s = r.reopen()
		view(t, s, func(tx *meta.Tx) error {
			ds, err := tx.Disks()
			if err != nil {
				return err
			}
			if len(ds) != 2 {
				t.Errorf("after reopen: Disks() = %+v, want a2 and b", ds)
				return nil
			}
			for i, want := range []meta.Disk{a, b} {
				if diff := diskDiff(ds[i], want); diff != "" {
					t.Errorf("after reopen: disk %s", diff)
				}
				got, err := tx.Disk(want.Name)
				if err != nil || got.ID != want.ID {
					t.Errorf("after reopen: Disk(%s) = %+v, %v", want.Name, got, err)
				}
				if err := checkEntries(t, tx, want.ID, meta.PageEntries-4, slices.Concat(zeros(1), long, zeros(1))); err != nil {
					return err
				}
			}
			for _, name := range []string{"a", "gone"} {
				_, err := tx.Disk(name)
				wantErr(t, "after reopen: Disk("+name+")", err, meta.ErrNotFound)
			}
			m, err := mappedOf(tx, gone.ID)
			if err != nil {
				return err
			}
			if len(m) != 0 {
				t.Errorf("after reopen: deleted disk maps %s", short(m))
			}
			got, err := tx.Container(c.ID)
			if err != nil {
				return err
			}
			if want := (meta.Container{ID: c.ID, URI: c.URI, SlotSize: c.SlotSize, Slots: c.Slots, Used: 3}); !reflect.DeepEqual(got, want) {
				t.Errorf("after reopen: Container = %+v, want %+v", got, want)
			}
			rs, err := refsOf(tx, c.ID)
			if err != nil {
				return err
			}
			if !slices.Equal(rs, wantRefs) {
				t.Errorf("after reopen: ForEachRef = %v, want %v", rs, wantRefs)
			}
			return nil
		})
	}

	// Id sequences continue after reopen: no id is handed out twice, not
	// even that of a deleted disk.
	update(t, s, func(tx *meta.Tx) error {
		d, err := tx.CreateDisk(testDisk("gone"))
		if err != nil {
			return err
		}
		if d.ID <= gone.ID {
			t.Errorf("after reopen: new disk got id %d, not above %d", d.ID, gone.ID)
		}
		nc, err := tx.AddContainer(testContainer("c2", 1))
		if err != nil {
			return err
		}
		if nc.ID == c.ID {
			t.Errorf("after reopen: new container got the id %d of an existing one", nc.ID)
		}
		return nil
	})
}

// testFailedUpdateAfterReopen: a failed Update leaves nothing in the
// store as reopened (see discarded).
func testFailedUpdateAfterReopen(t *testing.T, r *reopener) {
	f := setupDiscard(t, r.reopen())
	failedUpdate(t, r.cur, f)
	checkNothingLanded(t, r.reopen(), f, "after a failed Update and a reopen")
}

func testClosed(t *testing.T, r *reopener) {
	s := r.reopen()
	update(t, s, func(tx *meta.Tx) error {
		_, err := tx.CreateDisk(testDisk("vol"))
		return err
	})
	r.close()
	called := false
	err := s.View(t.Context(), func(*meta.Tx) error { called = true; return nil })
	wantErr(t, "View after Close", err, meta.ErrClosed)
	err = s.Update(t.Context(), func(*meta.Tx) error { called = true; return nil })
	wantErr(t, "Update after Close", err, meta.ErrClosed)
	if called {
		t.Error("a closed store ran a transaction function")
	}
	// The data is still there for the next opener.
	s = r.reopen()
	view(t, s, func(tx *meta.Tx) error {
		_, err := tx.Disk("vol")
		return err
	})
}
