// Package metatest is the conformance suite for meta.Store backends, in the
// manner of testing/fstest: every backend's tests call Run (and, if the
// backend keeps its data somewhere that can be reopened, RunPersistence)
// with a constructor, and the suite checks the whole Store and Tx contract
// against it.
//
// The suite goes through meta.Store and its transactions (*meta.Tx) only,
// so it holds for any backend: the disk catalogue and its name index, sparse
// tables that read as Zero where nothing was written, entries and reference
// counts across page boundaries, Container.Used kept in step with the
// counts, reads that see the transaction's own uncommitted writes,
// all-or-nothing Updates, read-only Views, serialisable concurrent Updates
// (run it with -race) and cancelled contexts. A randomised model test
// compares the store with a plain in-memory model; its seeds are fixed and
// printed with every failure, so a failure can be replayed.
//
// The checks are grouped by area, one file each: disks.go (the catalogue),
// tables.go (entries, table pages and their sharing), containers.go,
// refs.go (slot reference counts and Used), agents.go (the agent
// registry), transactions.go (rollback, read-only Views, concurrency,
// cancellation), damaged.go (Damaged on healthy records), model.go (the
// randomised model test) and persistence.go (RunPersistence).
//
// Transaction functions never call t.Fatal: a backend may run them on a
// goroutine of its own, and may run them more than once. They report
// mismatches with t.Errorf and return errors, which the caller of Update or
// View turns into t.Fatal.
package metatest

import (
	"errors"
	"fmt"
	"slices"
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
			{"PartialEntries", testPartialEntries},
			{"PartialRefusesBadLayout", testPartialRefusesBadLayout},
		}},
		{"Container", []check{
			{"AddAssignsIDs", testAddContainer},
			{"ExplicitID", testAddContainerExplicit},
			{"AutoIDSkipsTaken", testAddContainerSkipsTaken},
			{"StateAndRemove", testContainerStateRemove},
		}},
		{"Refs", []check{
			{"Used", testRefsUsed},
			{"Range", testRefsRange},
			{"AddRefs", testAddRefs},
			{"FindFree", testFindFree},
			{"ForEachRef", testForEachRef},
			{"PartialEntries", testPartialRefs},
		}},
		{"Agents", []check{
			{"Registry", testAgents},
		}},
		{"Tx", []check{
			{"FailedUpdateKeepsNothing", discarded(failedUpdate, "after a failed Update")},
			{"ViewIsReadOnly", discarded(writesInView, "after writes in View")},
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
		{"PartialSurvivesReopen", testPartialSurvivesReopen},
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
		if !sameEntry(got[i], want[i]) {
			t.Errorf("disk %d entry %d = %v, want %v", id, first+uint64(i), got[i], want[i])
			return nil
		}
	}
	return nil
}

// sameEntry reports whether a and b are the same entry as stored: the same
// location and state bits, and the same layers (compared by value).
func sameEntry(a, b table.Entry) bool {
	if (a.Part == nil) != (b.Part == nil) {
		return false
	}
	if a.Part == nil {
		return a == b
	}
	return a.Loc == b.Loc && a.State == b.State && a.Equal(b)
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
// the slots e names gain a reference, those the entry named lose one.
func mapEntry(tx *meta.Tx, id meta.DiskID, seg uint64, e table.Entry) error {
	if err := tx.Unshare(id, seg, 1); err != nil {
		return err
	}
	old, err := tx.Entries(id, seg, 1)
	if err != nil {
		return err
	}
	if err := addSlotRefs(tx, old[0], -1); err != nil {
		return err
	}
	if err := addSlotRefs(tx, e, 1); err != nil {
		return err
	}
	return tx.SetEntries(id, seg, []table.Entry{e})
}

// addSlotRefs adds delta to the count of every slot e names (its own and,
// for a partial entry, the layers under it).
func addSlotRefs(tx *meta.Tx, e table.Entry, delta int) error {
	var err error
	e.Slots(func(l table.Location) {
		if err == nil {
			_, err = meta.AddRefs(tx, l, delta)
		}
	})
	return err
}
