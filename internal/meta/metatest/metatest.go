// Package metatest is the conformance suite for meta.Store backends, in the
// manner of testing/fstest: every backend's tests call Run (and, if the
// backend keeps its data somewhere that can be reopened, RunPersistence)
// with a constructor, and the suite checks the whole Store and Tx contract
// against it.
//
// The suite goes through the meta.Store and *meta.Tx interfaces only, so it
// holds for any backend: the disk catalogue and its name index, sparse
// tables that read as Zero where nothing was written, entries and reference
// counts across page boundaries, Container.Used kept in step with the
// counts, reads that see the transaction's own uncommitted writes,
// all-or-nothing Updates, read-only Views, serialisable concurrent Updates
// (run it with -race) and cancelled contexts. A randomised model test
// compares the store with a plain in-memory model; its seeds are fixed and
// printed with every failure, so a failure can be replayed.
//
// Transaction functions never call t.Fatal: a backend may run them on a
// goroutine of its own, and may run them more than once. They report
// mismatches with t.Errorf and return errors, which the caller of Update or
// View turns into t.Fatal.
package metatest

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// Run runs the conformance suite. open must return a fresh, empty store
// each time it is called and register its Close with t.Cleanup; the suite
// never closes it.
func Run(t *testing.T, open func(t *testing.T) meta.Store) {
	groups := []struct {
		name   string
		checks []check
	}{
		{"Disk", []check{
			{"CreateAssignsIDs", testCreateAssignsIDs},
			{"DuplicateName", testDuplicateName},
			{"Lookup", testLookup},
			{"NotFound", testNotFound},
			{"Rename", testRename},
			{"PutDiskFields", testPutDiskFields},
			{"CreatedTime", testCreatedTime},
			{"Delete", testDeleteDisk},
		}},
		{"Table", []check{
			{"NewDiskIsZero", testNewDiskIsZero},
			{"AcrossPages", testEntriesAcrossPages},
			{"DisksAreSeparate", testTablesSeparate},
			{"RefusesInvalid", testSetEntriesInvalid},
			{"ForEachMapped", testForEachMapped},
			{"CopyTable", testCopyTable},
			{"CopyTableReplacesDestination", testCopyTableReplaces},
			{"SharedPages", testSharedPages},
		}},
		{"Container", []check{
			{"AddAssignsIDs", testAddContainer},
			{"ExplicitID", testAddContainerExplicit},
			{"AutoIDSkipsTaken", testAddContainerSkipsTaken},
		}},
		{"Refs", []check{
			{"Used", testRefsUsed},
			{"Range", testRefsRange},
			{"AddRefs", testAddRefs},
			{"FindFree", testFindFree},
			{"ForEachRef", testForEachRef},
		}},
		{"Agents", []check{
			{"Registry", testAgents},
		}},
		{"Tx", []check{
			{"FailedUpdateKeepsNothing", testRollback},
			{"ViewIsReadOnly", testReadOnly},
			{"Concurrent", testConcurrent},
			{"CancelledContext", testCancelled},
			{"NoneDamaged", testNoneDamaged},
		}},
		{"Model", []check{
			{"Random", testModel},
		}},
	}
	for _, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			for _, c := range g.checks {
				t.Run(c.name, func(t *testing.T) { c.fn(t, open(t)) })
			}
		})
	}
}

// RunPersistence checks that a store keeps exactly what was committed across
// Close and reopen. open must open the store kept in dir, creating it if dir
// holds none; it is called several times with the same dir. The suite
// closes every store it opens, also when a check fails, so open must not
// register a Close of its own.
func RunPersistence(t *testing.T, open func(t *testing.T, dir string) meta.Store) {
	checks := []struct {
		name string
		fn   func(t *testing.T, r *reopener)
	}{
		{"SurvivesReopen", testSurvivesReopen},
		{"FailedUpdateLeavesNothing", testFailedUpdateAfterReopen},
		{"Closed", testClosed},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			c.fn(t, &reopener{t: t, dir: t.TempDir(), open: open})
		})
	}
}

type check struct {
	name string
	fn   func(t *testing.T, s meta.Store)
}

// Fixtures.

// created is a Created time with nanoseconds, in UTC as the store returns it.
var created = time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)

// errStop is returned by callbacks to stop an iteration, and by transaction
// functions to abort an Update.
var errStop = errors.New("metatest: stop")

func testDisk(name string) meta.Disk {
	return meta.Disk{
		Name:        name,
		Size:        64 << 30,
		SegmentSize: 1 << 20,
		Policy:      table.Forward,
		Created:     created,
	}
}

func testContainer(uri string, slots uint64) meta.Container {
	return meta.Container{URI: uri, SlotSize: 1 << 20, Slots: slots}
}

func at(c, s uint32) table.Entry { return table.At(table.Location{Container: c, Slot: s}, false) }

func atNW(c, s uint32) table.Entry { return table.At(table.Location{Container: c, Slot: s}, true) }

func loc(c, s uint32) table.Location { return table.Location{Container: c, Slot: s} }

func zeros(n int) []table.Entry {
	es := make([]table.Entry, n)
	for i := range es {
		es[i] = table.ZeroEntry
	}
	return es
}

// Transaction helpers.

func update(t *testing.T, s meta.Store, fn func(tx *meta.Tx) error) {
	t.Helper()
	if err := s.Update(t.Context(), fn); err != nil {
		t.Fatalf("Update: %v", err)
	}
}

func view(t *testing.T, s meta.Store, fn func(tx *meta.Tx) error) {
	t.Helper()
	if err := s.View(t.Context(), fn); err != nil {
		t.Fatalf("View: %v", err)
	}
}

// wantErr reports an error unless errors.Is(err, target).
func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: error %v, want %v", what, err, target)
	}
}

// diskDiff describes how got differs from want, or returns "".
func diskDiff(got, want meta.Disk) string {
	if !got.Created.Equal(want.Created) {
		return fmt.Sprintf("Created %v, want %v", got.Created, want.Created)
	}
	got.Created, want.Created = time.Time{}, time.Time{}
	if got != want {
		return fmt.Sprintf("%+v, want %+v", got, want)
	}
	return ""
}

// checkEntries compares entries [first, first+len(want)) of disk id.
func checkEntries(t *testing.T, tx *meta.Tx, id meta.DiskID, first uint64, want []table.Entry) error {
	t.Helper()
	got, err := tx.Entries(id, first, uint64(len(want)))
	if err != nil {
		return fmt.Errorf("Entries(%d, %d, %d): %w", id, first, len(want), err)
	}
	if len(got) != len(want) {
		t.Errorf("Entries(%d, %d, %d): %d entries", id, first, len(want), len(got))
		return nil
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("disk %d entry %d = %v, want %v", id, first+uint64(i), got[i], want[i])
			return nil
		}
	}
	return nil
}

// segEntry is one visit of ForEachMapped.
type segEntry struct {
	seg uint64
	e   table.Entry
}

func (s segEntry) String() string { return fmt.Sprintf("%d:%v", s.seg, s.e) }

func mappedOf(tx *meta.Tx, id meta.DiskID) ([]segEntry, error) {
	var out []segEntry
	err := tx.ForEachMapped(id, func(seg uint64, e table.Entry) error {
		out = append(out, segEntry{seg, e})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("ForEachMapped(%d): %w", id, err)
	}
	return out, nil
}

// slotRef is one visit of ForEachRef.
type slotRef struct{ slot, n uint32 }

func (r slotRef) String() string { return fmt.Sprintf("%d:%d", r.slot, r.n) }

func refsOf(tx *meta.Tx, cid uint32) ([]slotRef, error) {
	var out []slotRef
	err := tx.ForEachRef(cid, func(slot, n uint32) error {
		out = append(out, slotRef{slot, n})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("ForEachRef(%d): %w", cid, err)
	}
	return out, nil
}

// checkUsed checks container cid's Used through both Container and
// Containers.
func checkUsed(t *testing.T, tx *meta.Tx, cid uint32, want uint64) error {
	t.Helper()
	c, err := tx.Container(cid)
	if err != nil {
		return fmt.Errorf("Container(%d): %w", cid, err)
	}
	if c.Used != want || c.Free() != c.Slots-want {
		t.Errorf("Container(%d).Used = %d, Free = %d, want %d, %d", cid, c.Used, c.Free(), want, c.Slots-want)
	}
	cs, err := tx.Containers()
	if err != nil {
		return fmt.Errorf("Containers: %w", err)
	}
	i := slices.IndexFunc(cs, func(c meta.Container) bool { return c.ID == cid })
	switch {
	case i < 0:
		t.Errorf("Containers() lacks container %d", cid)
	case cs[i].Used != want:
		t.Errorf("Containers()[%d].Used = %d, want %d", i, cs[i].Used, want)
	}
	return nil
}

// Disks.

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
			got, err := tx.CreateDisk(d)
			if err != nil {
				return fmt.Errorf("CreateDisk(%s): %w", name, err)
			}
			d.ID = got.ID
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

// Tables.

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

// Containers.

func testAddContainer(t *testing.T, s meta.Store) {
	var cs []meta.Container
	update(t, s, func(tx *meta.Tx) error {
		cs = cs[:0]
		for i, uri := range []string{"file:///a", "nbd://host/b", ""} {
			c := testContainer(uri, uint64(10*(i+1)))
			c.Used = 7 // ignored: a new container has no counts
			got, err := tx.AddContainer(c)
			if err != nil {
				return fmt.Errorf("AddContainer(%s): %w", uri, err)
			}
			c.ID, c.Used = got.ID, 0
			if got != c {
				t.Errorf("AddContainer returned %+v, want %+v", got, c)
			}
			cs = append(cs, got)
		}
		return nil
	})
	for i, c := range cs {
		if c.ID == 0 || (i > 0 && c.ID <= cs[i-1].ID) {
			t.Errorf("container %d of %+v: ids must be non-zero and increasing", i, cs)
		}
	}
	view(t, s, func(tx *meta.Tx) error {
		for _, want := range cs {
			got, err := tx.Container(want.ID)
			if err != nil {
				return fmt.Errorf("Container(%d): %w", want.ID, err)
			}
			if got != want {
				t.Errorf("Container(%d) = %+v, want %+v", want.ID, got, want)
			}
		}
		got, err := tx.Containers()
		if err != nil {
			return err
		}
		if !slices.Equal(got, cs) {
			t.Errorf("Containers() = %+v, want %+v", got, cs)
		}
		return nil
	})
}

func testAddContainerExplicit(t *testing.T, s meta.Store) {
	var auto meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if auto, err = tx.AddContainer(testContainer("a", 4)); err != nil {
			return err
		}
		c := testContainer("b", 4)
		c.ID = 1000
		got, err := tx.AddContainer(c)
		if err != nil || got.ID != 1000 {
			t.Errorf("AddContainer(ID 1000) = %+v, %v", got, err)
		}
		return nil
	})
	for _, id := range []uint32{auto.ID, 1000} {
		err := s.Update(t.Context(), func(tx *meta.Tx) error {
			c := testContainer("dup", 4)
			c.ID = id
			_, err := tx.AddContainer(c)
			return err
		})
		wantErr(t, fmt.Sprintf("AddContainer with taken id %d", id), err, meta.ErrExists)
	}
	view(t, s, func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(cs) != 2 || cs[0].URI != "a" || cs[1].ID != 1000 || cs[1].URI != "b" {
			t.Errorf("Containers() = %+v after refused additions", cs)
		}
		return nil
	})
}

func testAddContainerSkipsTaken(t *testing.T, s meta.Store) {
	update(t, s, func(tx *meta.Tx) error {
		for id := uint32(1); id <= 3; id++ {
			c := testContainer("explicit", 4)
			c.ID = id
			if _, err := tx.AddContainer(c); err != nil {
				return err
			}
		}
		return nil
	})
	update(t, s, func(tx *meta.Tx) error {
		c, err := tx.AddContainer(testContainer("auto", 4))
		if err != nil {
			return fmt.Errorf("AddContainer after ids 1-3 were taken explicitly: %w", err)
		}
		if c.ID <= 3 {
			t.Errorf("AddContainer gave id %d, which was taken", c.ID)
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(cs) != 4 {
			t.Errorf("Containers() = %+v, want 4", cs)
		}
		return nil
	})
}

// Reference counts.

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

// Transactions.

func testRollback(t *testing.T, s meta.Store) {
	var d meta.Disk
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if d, err = tx.CreateDisk(testDisk("base")); err != nil {
			return err
		}
		if err := tx.SetEntries(d.ID, 0, []table.Entry{at(1, 1)}); err != nil {
			return err
		}
		if c, err = tx.AddContainer(testContainer("base", 2*meta.PageSlots)); err != nil {
			return err
		}
		return tx.SetRefs(loc(c.ID, 1), 1)
	})
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		nd, err := tx.CreateDisk(testDisk("new"))
		if err != nil {
			return err
		}
		if err := tx.SetEntries(nd.ID, 0, []table.Entry{at(1, 2)}); err != nil {
			return err
		}
		if err := tx.SetEntries(d.ID, meta.PageEntries-1, []table.Entry{at(1, 3), at(1, 4)}); err != nil {
			return err
		}
		renamed := d
		renamed.Name, renamed.ReadOnly = "renamed", true
		if err := tx.PutDisk(renamed); err != nil {
			return err
		}
		if _, err := tx.AddContainer(testContainer("new", 5)); err != nil {
			return err
		}
		for _, r := range []slotRef{{1, 0}, {2, 1}, {meta.PageSlots + 1, 1}} {
			if err := tx.SetRefs(loc(c.ID, r.slot), r.n); err != nil {
				return err
			}
		}
		return fmt.Errorf("give up: %w", errStop)
	})
	wantErr(t, "Update whose fn fails", err, errStop)
	view(t, s, func(tx *meta.Tx) error {
		_, err := tx.Disk("new")
		wantErr(t, "Disk created in a failed Update", err, meta.ErrNotFound)
		_, err = tx.Disk("renamed")
		wantErr(t, "Disk renamed in a failed Update", err, meta.ErrNotFound)
		got, err := tx.Disk("base")
		if err != nil {
			return fmt.Errorf("Disk(base) after a failed Update renamed it: %w", err)
		}
		if diff := diskDiff(got, d); diff != "" {
			t.Errorf("Disk(base) after a failed Update = %s", diff)
		}
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		if len(ds) != 1 {
			t.Errorf("Disks() after a failed Update = %+v", ds)
		}
		if err := checkEntries(t, tx, d.ID, 0, []table.Entry{at(1, 1)}); err != nil {
			return err
		}
		if err := checkEntries(t, tx, d.ID, meta.PageEntries-1, zeros(2)); err != nil {
			return err
		}
		m, err := mappedOf(tx, d.ID+1) // where the new disk would be
		if err != nil {
			return err
		}
		if len(m) != 0 {
			t.Errorf("table of the disk created in a failed Update maps %v", m)
		}
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(cs) != 1 {
			t.Errorf("Containers() after a failed Update = %+v", cs)
		}
		rs, err := refsOf(tx, c.ID)
		if err != nil {
			return err
		}
		if want := []slotRef{{1, 1}}; !slices.Equal(rs, want) {
			t.Errorf("ForEachRef after a failed Update = %v, want %v", rs, want)
		}
		return checkUsed(t, tx, c.ID, 1)
	})
}

func testReadOnly(t *testing.T, s meta.Store) {
	var d meta.Disk
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if d, err = tx.CreateDisk(testDisk("vol")); err != nil {
			return err
		}
		if err := tx.SetEntries(d.ID, 0, []table.Entry{at(1, 1)}); err != nil {
			return err
		}
		if c, err = tx.AddContainer(testContainer("c", 10)); err != nil {
			return err
		}
		return tx.SetRefs(loc(c.ID, 1), 1)
	})
	view(t, s, func(tx *meta.Tx) error {
		_, err := tx.CreateDisk(testDisk("new"))
		wantErr(t, "CreateDisk in View", err, meta.ErrReadOnlyTx)
		renamed := d
		renamed.Name = "renamed"
		wantErr(t, "PutDisk (rename) in View", tx.PutDisk(renamed), meta.ErrReadOnlyTx)
		changed := d
		changed.ReadOnly = true
		wantErr(t, "PutDisk in View", tx.PutDisk(changed), meta.ErrReadOnlyTx)
		wantErr(t, "SetEntries in View", tx.SetEntries(d.ID, 1, []table.Entry{at(1, 2)}), meta.ErrReadOnlyTx)
		wantErr(t, "CopyTable in View", tx.CopyTable(d.ID, d.ID+1), meta.ErrReadOnlyTx)
		_, err = tx.AddContainer(testContainer("new", 10))
		wantErr(t, "AddContainer in View", err, meta.ErrReadOnlyTx)
		wantErr(t, "SetRefs in View", tx.SetRefs(loc(c.ID, 2), 1), meta.ErrReadOnlyTx)
		_, err = meta.AddRefs(tx, loc(c.ID, 1), 1)
		wantErr(t, "AddRefs in View", err, meta.ErrReadOnlyTx)
		wantErr(t, "DeleteDisk in View", deleteDisk(tx, d.ID), meta.ErrReadOnlyTx)
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		got, err := tx.Disk("vol")
		if err != nil {
			return fmt.Errorf("Disk(vol) after writes in View: %w", err)
		}
		if diff := diskDiff(got, d); diff != "" {
			t.Errorf("Disk(vol) after writes in View = %s", diff)
		}
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(ds) != 1 || len(cs) != 1 {
			t.Errorf("after writes in View: %d disks, %d containers, want 1, 1", len(ds), len(cs))
		}
		if err := checkEntries(t, tx, d.ID, 0, []table.Entry{at(1, 1), table.ZeroEntry}); err != nil {
			return err
		}
		m, err := mappedOf(tx, d.ID+1)
		if err != nil {
			return err
		}
		if len(m) != 0 {
			t.Errorf("CopyTable in View left %v", m)
		}
		rs, err := refsOf(tx, c.ID)
		if err != nil {
			return err
		}
		if want := []slotRef{{1, 1}}; !slices.Equal(rs, want) {
			t.Errorf("ForEachRef after writes in View = %v, want %v", rs, want)
		}
		return checkUsed(t, tx, c.ID, 1)
	})
}

// testConcurrent runs Updates from several goroutines, each a
// read-modify-write of shared counts, while Views check that every snapshot
// is consistent. Lost updates show as wrong final counts; torn snapshots as
// a count that disagrees with the number of disks.
func testConcurrent(t *testing.T, s meta.Store) {
	const workers, rounds = 8, 8
	var c meta.Container
	var counter meta.Disk
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if c, err = tx.AddContainer(testContainer("shared", meta.PageSlots+workers)); err != nil {
			return err
		}
		d := testDisk("counter")
		d.Size = 0
		counter, err = tx.CreateDisk(d)
		return err
	})
	shared := loc(c.ID, 0)
	ctx := t.Context()

	// snapshot checks one View: the shared count equals the number of
	// worker disks, and equals the counter disk's Size.
	snapshot := func() error {
		return s.View(ctx, func(tx *meta.Tx) error {
			ds, err := tx.Disks()
			if err != nil {
				return err
			}
			n, err := tx.Refs(shared)
			if err != nil {
				return err
			}
			cd, err := tx.DiskByID(counter.ID)
			if err != nil {
				return err
			}
			if int(n) != len(ds)-1 || cd.Size != uint64(n) {
				return fmt.Errorf("torn snapshot: %d worker disks, shared count %d, counter %d", len(ds)-1, n, cd.Size)
			}
			return nil
		})
	}

	var writers, readers sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		readers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := snapshot(); err != nil {
					t.Errorf("View: %v", err)
					return
				}
			}
		})
	}
	for w := range workers {
		writers.Go(func() {
			for i := range rounds {
				err := s.Update(ctx, func(tx *meta.Tx) error {
					if _, err := tx.CreateDisk(testDisk(fmt.Sprintf("w%d-%d", w, i))); err != nil {
						return err
					}
					if _, err := meta.AddRefs(tx, shared, 1); err != nil {
						return err
					}
					// A slot on the second page, one per worker.
					if _, err := meta.AddRefs(tx, loc(c.ID, meta.PageSlots+uint32(w)), 1); err != nil {
						return err
					}
					cd, err := tx.DiskByID(counter.ID)
					if err != nil {
						return err
					}
					cd.Size++
					return tx.PutDisk(cd)
				})
				if err != nil {
					t.Errorf("worker %d round %d: %v", w, i, err)
					return
				}
			}
		})
	}
	writers.Wait()
	close(stop)
	readers.Wait()

	view(t, s, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		if len(ds) != workers*rounds+1 {
			t.Errorf("%d disks, want %d", len(ds), workers*rounds+1)
		}
		names := map[string]bool{}
		for i, d := range ds {
			if i > 0 && d.ID <= ds[i-1].ID {
				t.Errorf("Disks() not in increasing id order at %d: %d after %d", i, d.ID, ds[i-1].ID)
			}
			if names[d.Name] {
				t.Errorf("two disks called %q", d.Name)
			}
			names[d.Name] = true
		}
		if n, err := tx.Refs(shared); err != nil || n != workers*rounds {
			t.Errorf("shared count = %d, %v, want %d", n, err, workers*rounds)
		}
		for w := range workers {
			if n, err := tx.Refs(loc(c.ID, meta.PageSlots+uint32(w))); err != nil || n != rounds {
				t.Errorf("worker %d's count = %d, %v, want %d", w, n, err, rounds)
			}
		}
		if cd, err := tx.DiskByID(counter.ID); err != nil || cd.Size != workers*rounds {
			t.Errorf("counter = %d, %v, want %d", cd.Size, err, workers*rounds)
		}
		return checkUsed(t, tx, c.ID, workers+1)
	})
}

func testCancelled(t *testing.T, s meta.Store) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := s.Update(ctx, func(tx *meta.Tx) error {
		_, err := tx.CreateDisk(testDisk("vol"))
		return err
	})
	wantErr(t, "Update with a cancelled context", err, context.Canceled)
	err = s.View(ctx, func(*meta.Tx) error { return nil })
	wantErr(t, "View with a cancelled context", err, context.Canceled)

	dctx, dcancel := context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
	defer dcancel()
	err = s.Update(dctx, func(*meta.Tx) error { return nil })
	wantErr(t, "Update past its deadline", err, context.DeadlineExceeded)

	view(t, s, func(tx *meta.Tx) error {
		_, err := tx.Disk("vol")
		wantErr(t, "Disk created by an Update with a cancelled context", err, meta.ErrNotFound)
		return nil
	})
}

// Model test.

// modelSeeds are the seeds of the randomised model test; each runs as its
// own subtest, named after its seed, so `-run Model/Random/seed=N` replays it.
var modelSeeds = []uint64{1, 2, 3, 20250314}

// model is the expected content of a store: the tables of a few disks and
// the counts of one container.
type model struct {
	entries []map[uint64]table.Entry // per disk; missing means Zero
	refs    map[uint32]uint32        // missing means 0
}

func (m model) clone() model {
	c := model{refs: maps.Clone(m.refs)}
	for _, es := range m.entries {
		c.entries = append(c.entries, maps.Clone(es))
	}
	return c
}

// modelOp is one step of a transaction: SetEntries when disk >= 0, else
// SetRefs.
type modelOp struct {
	disk  int
	first uint64
	es    []table.Entry
	slot  uint32
	n     uint32
}

const (
	modelDisks = 2
	modelPages = 4                    // table pages the ops touch
	modelSlots = 2*meta.PageSlots + 5 // slots of the model's container
)

func testModel(t *testing.T, s meta.Store) {
	// The store is shared by the seeds' subtests; each uses its own disks
	// and container.
	for _, seed := range modelSeeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("seed %d", seed)
			runModel(t, s, seed)
		})
	}
}

func runModel(t *testing.T, s meta.Store, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, seed))
	var ids []meta.DiskID
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		ids = ids[:0]
		for i := range modelDisks {
			d, err := tx.CreateDisk(testDisk(fmt.Sprintf("model-%d-%d", seed, i)))
			if err != nil {
				return err
			}
			ids = append(ids, d.ID)
		}
		var err error
		c, err = tx.AddContainer(testContainer(fmt.Sprintf("model-%d", seed), modelSlots))
		return err
	})
	m := model{refs: map[uint32]uint32{}}
	for range modelDisks {
		m.entries = append(m.entries, map[uint64]table.Entry{})
	}

	randEntry := func() table.Entry {
		switch rng.IntN(5) {
		case 0:
			return table.ZeroEntry
		case 1:
			return table.ErrorEntry
		case 2:
			return atNW(uint32(rng.IntN(3)), rng.Uint32())
		default:
			return at(uint32(rng.IntN(3)), rng.Uint32())
		}
	}
	randOps := func() []modelOp {
		ops := make([]modelOp, 1+rng.IntN(12))
		for i := range ops {
			if rng.IntN(3) == 0 {
				ops[i] = modelOp{disk: -1, slot: nearBoundary(rng, meta.PageSlots, modelSlots), n: uint32(rng.IntN(3))}
				continue
			}
			first := uint64(nearBoundary(rng, meta.PageEntries, modelPages*meta.PageEntries))
			n := 1 + rng.IntN(4)
			if rng.IntN(8) == 0 {
				n = 1 + rng.IntN(meta.PageEntries+3)
			}
			n = min(n, modelPages*meta.PageEntries-int(first))
			es := make([]table.Entry, n)
			for j := range es {
				es[j] = randEntry()
			}
			ops[i] = modelOp{disk: rng.IntN(modelDisks), first: first, es: es}
		}
		return ops
	}
	froms := func() []uint32 {
		return []uint32{0, nearBoundary(rng, meta.PageSlots, modelSlots), rng.Uint32N(modelSlots)}
	}

	for round := range 30 {
		ops := randOps()
		commit := rng.IntN(4) != 0
		fs := froms()
		var next model
		err := s.Update(t.Context(), func(tx *meta.Tx) error {
			next = m.clone()
			for _, op := range ops {
				if op.disk < 0 {
					if err := tx.SetRefs(loc(c.ID, op.slot), op.n); err != nil {
						return fmt.Errorf("SetRefs(%d, %d): %w", op.slot, op.n, err)
					}
					if op.n == 0 {
						delete(next.refs, op.slot)
					} else {
						next.refs[op.slot] = op.n
					}
					continue
				}
				if err := tx.SetEntries(ids[op.disk], op.first, op.es); err != nil {
					return fmt.Errorf("SetEntries(%d, %d, %d entries): %w", ids[op.disk], op.first, len(op.es), err)
				}
				for j, e := range op.es {
					next.entries[op.disk][op.first+uint64(j)] = e
				}
			}
			if err := compareModel(t, tx, next, ids, c.ID, fs); err != nil {
				return err
			}
			if !commit {
				return errStop
			}
			return nil
		})
		if commit && err != nil {
			t.Fatalf("seed %d round %d: Update: %v", seed, round, err)
		}
		if !commit && !errors.Is(err, errStop) {
			t.Fatalf("seed %d round %d: aborted Update returned %v", seed, round, err)
		}
		if commit {
			m = next
		}
		view(t, s, func(tx *meta.Tx) error { return compareModel(t, tx, m, ids, c.ID, fs) })
		if t.Failed() {
			t.Fatalf("seed %d: store and model differ after round %d (ops %v, commit %v)", seed, round, ops, commit)
		}
	}
}

// nearBoundary returns a number below limit, mostly at or next to a
// multiple of page.
func nearBoundary(rng *rand.Rand, page, limit int) uint32 {
	var v int
	switch rng.IntN(3) {
	case 0:
		v = rng.IntN(limit)
	default:
		v = rng.IntN(limit/page+1)*page + rng.IntN(5) - 2
	}
	return uint32(min(max(v, 0), limit-1))
}

func compareModel(t *testing.T, tx *meta.Tx, m model, ids []meta.DiskID, cid uint32, froms []uint32) error {
	t.Helper()
	for i, id := range ids {
		want := zeros(modelPages*meta.PageEntries + 1)
		var wantMapped []segEntry
		for seg, e := range m.entries[i] {
			want[seg] = e
		}
		for seg, e := range want {
			if e.Mapped() {
				wantMapped = append(wantMapped, segEntry{uint64(seg), e})
			}
		}
		if err := checkEntries(t, tx, id, 0, want); err != nil {
			return err
		}
		got, err := mappedOf(tx, id)
		if err != nil {
			return err
		}
		if !slices.Equal(got, wantMapped) {
			t.Errorf("ForEachMapped(%d) = %s, want %s", id, short(got), short(wantMapped))
		}
	}
	var wantRefs []slotRef
	for slot, n := range m.refs {
		wantRefs = append(wantRefs, slotRef{slot, n})
	}
	slices.SortFunc(wantRefs, func(a, b slotRef) int { return cmp.Compare(a.slot, b.slot) })
	got, err := refsOf(tx, cid)
	if err != nil {
		return err
	}
	if !slices.Equal(got, wantRefs) {
		t.Errorf("ForEachRef = %s, want %s", short(got), short(wantRefs))
	}
	if err := checkUsed(t, tx, cid, uint64(len(m.refs))); err != nil {
		return err
	}
	for _, from := range froms {
		want, wantOK := from, false
		for i := range uint32(modelSlots) {
			if s := (from + i) % modelSlots; m.refs[s] == 0 {
				want, wantOK = s, true
				break
			}
		}
		slot, ok, err := tx.FindFree(cid, from)
		if err != nil {
			return err
		}
		if ok != wantOK || (ok && slot != want) {
			t.Errorf("FindFree(%d) = %d, %v, want %d, %v", from, slot, ok, want, wantOK)
		}
	}
	return nil
}

// short formats a long list by its length and ends.
func short[E any](s []E) string {
	if len(s) <= 8 {
		return fmt.Sprint(s)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d items: %v ... %v", len(s), s[:4], s[len(s)-4:])
	return b.String()
}

// Persistence.

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
			if want := (meta.Container{ID: c.ID, URI: c.URI, SlotSize: c.SlotSize, Slots: c.Slots, Used: 3}); got != want {
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

func testFailedUpdateAfterReopen(t *testing.T, r *reopener) {
	s := r.reopen()
	var d meta.Disk
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if d, err = tx.CreateDisk(testDisk("base")); err != nil {
			return err
		}
		c, err = tx.AddContainer(testContainer("c", 10))
		return err
	})
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		nd, err := tx.CreateDisk(testDisk("new"))
		if err != nil {
			return err
		}
		if err := tx.SetEntries(nd.ID, 0, []table.Entry{at(1, 1)}); err != nil {
			return err
		}
		if err := tx.SetEntries(d.ID, meta.PageEntries, []table.Entry{at(1, 2)}); err != nil {
			return err
		}
		if err := tx.SetRefs(loc(c.ID, 3), 1); err != nil {
			return err
		}
		if _, err := tx.AddContainer(testContainer("new", 10)); err != nil {
			return err
		}
		return errStop
	})
	wantErr(t, "failing Update", err, errStop)

	s = r.reopen()
	view(t, s, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		if len(ds) != 1 || ds[0].ID != d.ID {
			t.Errorf("after reopen: Disks() = %+v, want only base", ds)
		}
		_, err = tx.Disk("new")
		wantErr(t, "after reopen: Disk(new)", err, meta.ErrNotFound)
		if err := checkEntries(t, tx, d.ID, meta.PageEntries, zeros(1)); err != nil {
			return err
		}
		m, err := mappedOf(tx, d.ID+1)
		if err != nil {
			return err
		}
		if len(m) != 0 {
			t.Errorf("after reopen: table of the disk from the failed Update maps %v", m)
		}
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(cs) != 1 || cs[0].Used != 0 {
			t.Errorf("after reopen: Containers() = %+v, want only c, unused", cs)
		}
		rs, err := refsOf(tx, c.ID)
		if err != nil {
			return err
		}
		if len(rs) != 0 {
			t.Errorf("after reopen: ForEachRef = %v, want none", rs)
		}
		return nil
	})
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

// deleteDisk is DeleteDisk without the slots it freed.
func deleteDisk(tx *meta.Tx, id meta.DiskID) error {
	_, err := tx.DeleteDisk(id)
	return err
}

// addContainers adds containers with the given ids (of 2^20 slots) that
// do not exist yet.
func addContainers(tx *meta.Tx, ids ...uint32) error {
	for _, id := range ids {
		if _, err := tx.Container(id); err == nil {
			continue
		} else if !errors.Is(err, meta.ErrNotFound) {
			return err
		}
		if _, err := tx.AddContainer(meta.Container{ID: id, URI: fmt.Sprintf("c%d", id), SlotSize: 1 << 20, Slots: 1 << 20}); err != nil {
			return err
		}
	}
	return nil
}

// mapEntry sets entry seg of disk id to e, keeping reference counts right:
// the slot e maps gains a reference, the one the entry mapped loses one.
func mapEntry(tx *meta.Tx, id meta.DiskID, seg uint64, e table.Entry) error {
	if err := tx.Unshare(id, seg, 1); err != nil {
		return err
	}
	old, err := tx.Entries(id, seg, 1)
	if err != nil {
		return err
	}
	if old[0].Mapped() {
		if _, err := meta.AddRefs(tx, old[0].Loc, -1); err != nil {
			return err
		}
	}
	if e.Mapped() {
		if _, err := meta.AddRefs(tx, e.Loc, 1); err != nil {
			return err
		}
	}
	return tx.SetEntries(id, seg, []table.Entry{e})
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

// testAgents checks the agent registry: empty at first, replaced whole,
// emptied, refusing bad names, read-only in View.
func testAgents(t *testing.T, s meta.Store) {
	view(t, s, func(tx *meta.Tx) error {
		as, err := tx.Agents()
		if err != nil || len(as) != 0 {
			t.Errorf("Agents of a new store = %v, %v; want none", as, err)
		}
		wantErr(t, "SetAgents in View", tx.SetAgents([]string{"a"}), meta.ErrReadOnlyTx)
		return nil
	})
	update(t, s, func(tx *meta.Tx) error { return tx.SetAgents([]string{"host-a", "host-b"}) })
	view(t, s, func(tx *meta.Tx) error {
		as, err := tx.Agents()
		if err != nil || !slices.Equal(as, []string{"host-a", "host-b"}) {
			t.Errorf("Agents = %v, %v; want host-a host-b", as, err)
		}
		return nil
	})
	update(t, s, func(tx *meta.Tx) error {
		wantErr(t, "SetAgents with an empty name", tx.SetAgents([]string{"ok", ""}), meta.ErrInvalid)
		return tx.SetAgents(nil)
	})
	view(t, s, func(tx *meta.Tx) error {
		as, err := tx.Agents()
		if err != nil || len(as) != 0 {
			t.Errorf("Agents after SetAgents(nil) = %v, %v; want none", as, err)
		}
		return nil
	})
}
