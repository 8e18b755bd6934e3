package metatest

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"segmap/internal/meta"
	"segmap/internal/table"
)

func testCreateAssignsIDs(t *testing.T, s meta.Store) {
	var ds []meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		ds = ds[:0]
		for _, name := range []string{"a", "b"} {
			d := testDisk(name)
			d.ID = 999 // ignored: ids are handed out by the store
			got, err := tx.CreateDisk(d)
			if err != nil {
				return fmt.Errorf("CreateDisk(%s): %w", name, err)
			}
			ds = append(ds, got)
		}
		return nil
	})
	update(t, s, func(tx *meta.Tx) error {
		ds = ds[:2]
		d := testDisk("c")
		d.Family, d.Origin = ds[0].ID, ds[0].ID
		got, err := tx.CreateDisk(d)
		if err != nil {
			return fmt.Errorf("CreateDisk(c): %w", err)
		}
		ds = append(ds, got)
		return nil
	})
	for i, d := range ds {
		if d.ID == 0 || (i > 0 && d.ID <= ds[i-1].ID) {
			t.Errorf("disk %s has id %d after %v: ids must be non-zero and increasing", d.Name, d.ID, ds[:i])
		}
	}
	if ds[0].Family != ds[0].ID || ds[1].Family != ds[1].ID {
		t.Errorf("Family of new disks = %d, %d, want their own ids %d, %d", ds[0].Family, ds[1].Family, ds[0].ID, ds[1].ID)
	}
	if ds[2].Family != ds[0].ID || ds[2].Origin != ds[0].ID {
		t.Errorf("disk c: Family %d, Origin %d, want the given %d, %d", ds[2].Family, ds[2].Origin, ds[0].ID, ds[0].ID)
	}
	view(t, s, func(tx *meta.Tx) error {
		for _, want := range ds {
			got, err := tx.DiskByID(want.ID)
			if err != nil {
				return fmt.Errorf("DiskByID(%d): %w", want.ID, err)
			}
			if diff := diskDiff(got, want); diff != "" {
				t.Errorf("DiskByID(%d) = %s", want.ID, diff)
			}
		}
		return nil
	})

	// Ids are never reused, not even the id of the newest disk once deleted.
	update(t, s, func(tx *meta.Tx) error { return deleteDisk(tx, ds[2].ID) })
	update(t, s, func(tx *meta.Tx) error {
		d, err := tx.CreateDisk(testDisk("d"))
		if err != nil {
			return fmt.Errorf("CreateDisk(d): %w", err)
		}
		if d.ID <= ds[2].ID {
			t.Errorf("disk created after deleting disk %d got id %d", ds[2].ID, d.ID)
		}
		return nil
	})
}

func testDuplicateName(t *testing.T, s meta.Store) {
	var first meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if first, err = tx.CreateDisk(testDisk("vol")); err != nil {
			return err
		}
		_, err = tx.CreateDisk(testDisk("vol"))
		wantErr(t, "CreateDisk(vol) twice in one transaction", err, meta.ErrExists)
		return nil
	})
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		_, err := tx.CreateDisk(testDisk("vol"))
		return err
	})
	wantErr(t, "CreateDisk(vol) in a later transaction", err, meta.ErrExists)
	view(t, s, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		if len(ds) != 1 || ds[0].ID != first.ID {
			t.Errorf("Disks() = %+v, want only disk %d", ds, first.ID)
		}
		return nil
	})
}

func testLookup(t *testing.T, s meta.Store) {
	var want []meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		want = want[:0]
		for i, name := range []string{"zeta", "alpha", "mid dle/ü", "x"} {
			d := testDisk(name)
			d.Size = uint64(i+1) << 30
			d.SegmentSize = 1 << (12 + i)
			if i%2 == 1 {
				d.Policy = table.Reverse
				d.ReadOnly = true
			}
			if i > 0 {
				d.Origin, d.Family = want[0].ID, want[0].ID
			}
			if i%2 == 1 {
				d.UUID = [16]byte{byte(i), 0xee, 15: 1} // kept as given
			}
			got, err := tx.CreateDisk(d)
			if err != nil {
				return fmt.Errorf("CreateDisk(%s): %w", name, err)
			}
			d.ID = got.ID
			if d.UUID == ([16]byte{}) {
				// A random one is given.
				if got.UUID == ([16]byte{}) {
					t.Errorf("CreateDisk(%s) gave no UUID", name)
				}
				d.UUID = got.UUID
			}
			if d.Family == 0 {
				d.Family = d.ID
			}
			if diff := diskDiff(got, d); diff != "" {
				t.Errorf("CreateDisk returned %s", diff)
			}
			want = append(want, d)
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		for _, w := range want {
			got, err := tx.Disk(w.Name)
			if err != nil {
				return fmt.Errorf("Disk(%q): %w", w.Name, err)
			}
			if diff := diskDiff(got, w); diff != "" {
				t.Errorf("Disk(%q) = %s", w.Name, diff)
			}
			if got, err = tx.DiskByID(w.ID); err != nil {
				return fmt.Errorf("DiskByID(%d): %w", w.ID, err)
			}
			if diff := diskDiff(got, w); diff != "" {
				t.Errorf("DiskByID(%d) = %s", w.ID, diff)
			}
		}
		got, err := tx.Disks()
		if err != nil {
			return fmt.Errorf("Disks: %w", err)
		}
		if len(got) != len(want) {
			t.Errorf("Disks() returned %d disks, want %d", len(got), len(want))
			return nil
		}
		for i := range want { // created in id order
			if diff := diskDiff(got[i], want[i]); diff != "" {
				t.Errorf("Disks()[%d] = %s", i, diff)
			}
		}
		return nil
	})
}

func testNotFound(t *testing.T, s meta.Store) {
	view(t, s, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil || len(ds) != 0 {
			t.Errorf("Disks() of an empty store = %v, %v", ds, err)
		}
		cs, err := tx.Containers()
		if err != nil || len(cs) != 0 {
			t.Errorf("Containers() of an empty store = %v, %v", cs, err)
		}
		_, err = tx.Disk("nope")
		wantErr(t, "Disk(nope)", err, meta.ErrNotFound)
		_, err = tx.DiskByID(12345)
		wantErr(t, "DiskByID(12345)", err, meta.ErrNotFound)
		_, err = tx.Container(77)
		wantErr(t, "Container(77)", err, meta.ErrNotFound)
		_, _, err = tx.FindFree(77, 0)
		wantErr(t, "FindFree(77)", err, meta.ErrNotFound)
		return nil
	})
	update(t, s, func(tx *meta.Tx) error {
		wantErr(t, "PutDisk of a missing disk", tx.PutDisk(meta.Disk{ID: 12345, Name: "x", SegmentSize: 1 << 20, Policy: table.Forward, Created: time.Unix(1700000000, 0).UTC()}), meta.ErrNotFound)
		wantErr(t, "DeleteDisk of a missing disk", deleteDisk(tx, 12345), meta.ErrNotFound)
		wantErr(t, "SetRefs in a missing container", tx.SetRefs(loc(77, 0), 1), meta.ErrNotFound)
		return nil
	})
}

func testRename(t *testing.T, s meta.Store) {
	var a, b meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if a, err = tx.CreateDisk(testDisk("a")); err != nil {
			return err
		}
		b, err = tx.CreateDisk(testDisk("b"))
		return err
	})
	a.Name = "a2"
	update(t, s, func(tx *meta.Tx) error { return tx.PutDisk(a) })
	view(t, s, func(tx *meta.Tx) error {
		_, err := tx.Disk("a")
		wantErr(t, "Disk(a) after renaming it to a2", err, meta.ErrNotFound)
		got, err := tx.Disk("a2")
		if err != nil {
			return fmt.Errorf("Disk(a2) after renaming a to it: %w", err)
		}
		if diff := diskDiff(got, a); diff != "" {
			t.Errorf("Disk(a2) = %s", diff)
		}
		if got, err := tx.Disk("b"); err != nil || got.ID != b.ID {
			t.Errorf("Disk(b) = %+v, %v after renaming another disk", got, err)
		}
		return nil
	})

	// Renaming onto a taken name fails and changes nothing.
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		d := a
		d.Name = "b"
		return tx.PutDisk(d)
	})
	wantErr(t, "PutDisk renaming a2 onto b", err, meta.ErrExists)
	view(t, s, func(tx *meta.Tx) error {
		if got, err := tx.Disk("b"); err != nil || got.ID != b.ID {
			t.Errorf("Disk(b) = %+v, %v after a refused rename onto it", got, err)
		}
		if got, err := tx.Disk("a2"); err != nil || got.ID != a.ID {
			t.Errorf("Disk(a2) = %+v, %v after a refused rename", got, err)
		}
		return nil
	})

	// The old name is free again: a new disk may take it, and a rename back
	// and forth in one transaction leaves the index right.
	update(t, s, func(tx *meta.Tx) error {
		c, err := tx.CreateDisk(testDisk("a"))
		if err != nil {
			return fmt.Errorf("CreateDisk(a) after a was renamed: %w", err)
		}
		c.Name = "c"
		if err := tx.PutDisk(c); err != nil {
			return err
		}
		c.Name = "a"
		if err := tx.PutDisk(c); err != nil {
			return err
		}
		_, err = tx.Disk("c")
		wantErr(t, "Disk(c) after renaming c back to a", err, meta.ErrNotFound)
		got, err := tx.Disk("a")
		if err != nil || got.ID != c.ID {
			t.Errorf("Disk(a) = %+v, %v, want disk %d", got, err, c.ID)
		}
		return nil
	})
}

func testPutDiskFields(t *testing.T, s meta.Store) {
	var d meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		d, err = tx.CreateDisk(testDisk("vol"))
		return err
	})
	d.Size *= 2
	d.ReadOnly = true
	d.Policy = table.Reverse
	d.Origin = 42
	d.Created = created.Add(time.Hour + 1)
	update(t, s, func(tx *meta.Tx) error { return tx.PutDisk(d) })
	view(t, s, func(tx *meta.Tx) error {
		got, err := tx.Disk("vol")
		if err != nil {
			return err
		}
		if diff := diskDiff(got, d); diff != "" {
			t.Errorf("after PutDisk: %s", diff)
		}
		return nil
	})
}

func testCreatedTime(t *testing.T, s meta.Store) {
	times := []time.Time{
		time.Date(2024, 2, 29, 23, 59, 59, 999999999, time.FixedZone("X", 5*3600+1800)),
		time.Date(1970, 1, 1, 0, 0, 0, 1, time.UTC),
		time.Date(1969, 12, 31, 23, 59, 59, 999999999, time.UTC),
		time.Date(2200, 1, 1, 0, 0, 0, 7, time.UTC),
		time.Now(), // carries a monotonic reading
	}
	ids := make([]meta.DiskID, len(times))
	update(t, s, func(tx *meta.Tx) error {
		for i, tm := range times {
			d := testDisk(fmt.Sprintf("t%d", i))
			d.Created = tm
			got, err := tx.CreateDisk(d)
			if err != nil {
				return err
			}
			ids[i] = got.ID
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		for i, tm := range times {
			d, err := tx.DiskByID(ids[i])
			if err != nil {
				return err
			}
			if !d.Created.Equal(tm) || d.Created.Nanosecond() != tm.Nanosecond() {
				t.Errorf("Created %v read back as %v", tm, d.Created)
			}
			if d.Created.Location() != time.UTC {
				t.Errorf("Created %v read back in %v, want UTC", tm, d.Created.Location())
			}
		}
		return nil
	})
}

func testDeleteDisk(t *testing.T, s meta.Store) {
	var old, keep meta.Disk
	segs := []uint64{0, 5, meta.PageEntries + 1, 1 << 40}
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if old, err = tx.CreateDisk(testDisk("vol")); err != nil {
			return err
		}
		if keep, err = tx.CreateDisk(testDisk("keep")); err != nil {
			return err
		}
		if err := addContainers(tx, 1, 2); err != nil {
			return err
		}
		for i, seg := range segs {
			if err := mapEntry(tx, old.ID, seg, at(1, uint32(i))); err != nil {
				return err
			}
			if err := mapEntry(tx, keep.ID, seg, at(2, uint32(i))); err != nil {
				return err
			}
		}
		return nil
	})
	update(t, s, func(tx *meta.Tx) error { return deleteDisk(tx, old.ID) })

	checkGone := func(tx *meta.Tx, newID meta.DiskID) error {
		_, err := tx.Disk("vol")
		if newID == 0 {
			wantErr(t, "Disk(vol) after DeleteDisk", err, meta.ErrNotFound)
		} else if err != nil {
			return fmt.Errorf("Disk(vol) after re-creating it: %w", err)
		}
		_, err = tx.DiskByID(old.ID)
		wantErr(t, "DiskByID after DeleteDisk", err, meta.ErrNotFound)
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		for _, d := range ds {
			if d.ID == old.ID {
				t.Errorf("Disks() still lists deleted disk %d", old.ID)
			}
		}
		for _, id := range []meta.DiskID{old.ID, newID} {
			if id == 0 {
				continue
			}
			m, err := mappedOf(tx, id)
			if err != nil {
				return err
			}
			if len(m) != 0 {
				t.Errorf("table of disk %d after deleting disk %d: mapped %v", id, old.ID, m)
			}
			for _, seg := range segs {
				if err := checkEntries(t, tx, id, seg, zeros(1)); err != nil {
					return err
				}
			}
		}
		for i, seg := range segs { // the other disk is untouched
			if err := checkEntries(t, tx, keep.ID, seg, []table.Entry{at(2, uint32(i))}); err != nil {
				return err
			}
		}
		return nil
	}
	view(t, s, func(tx *meta.Tx) error { return checkGone(tx, 0) })

	var recreated meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if recreated, err = tx.CreateDisk(testDisk("vol")); err != nil {
			return fmt.Errorf("CreateDisk(vol) after deleting vol: %w", err)
		}
		return checkGone(tx, recreated.ID)
	})
	view(t, s, func(tx *meta.Tx) error { return checkGone(tx, recreated.ID) })

	// Deleting a disk whose table was written in the same transaction drops
	// the uncommitted pages too.
	update(t, s, func(tx *meta.Tx) error {
		if err := addContainers(tx, 3); err != nil {
			return err
		}
		if err := mapEntry(tx, recreated.ID, 3*meta.PageEntries, at(3, 3)); err != nil {
			return err
		}
		if err := deleteDisk(tx, recreated.ID); err != nil {
			return err
		}
		m, err := mappedOf(tx, recreated.ID)
		if err != nil {
			return err
		}
		if len(m) != 0 {
			t.Errorf("deleted disk still maps %v in the deleting transaction", m)
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		if _, err := tx.DiskByID(recreated.ID); !errors.Is(err, meta.ErrNotFound) {
			t.Errorf("DiskByID(%d) after DeleteDisk: %v", recreated.ID, err)
		}
		m, err := mappedOf(tx, recreated.ID)
		if err != nil {
			return err
		}
		if len(m) != 0 {
			t.Errorf("deleted disk %d still maps %v", recreated.ID, m)
		}
		return nil
	})
}
