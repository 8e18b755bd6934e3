package metatest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// Writes that must not land: an Update whose function fails (checked right
// away, and across a reopen by RunPersistence) and writes inside a View.
// The three checks are one scenario: the same store, writes that touch
// every kind of record, and one check that the store is as it was.

// discardFixture is what the store holds before the writes that must not
// land: disk "base", whose entry 0 maps slot 1 of container c, the only
// slot with a count.
type discardFixture struct {
	d meta.Disk
	c meta.Container
}

func setupDiscard(t *testing.T, s meta.Store) discardFixture {
	t.Helper()
	var f discardFixture
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if f.d, err = tx.CreateDisk(testDisk("base")); err != nil {
			return err
		}
		if err := tx.SetEntries(f.d.ID, 0, []table.Entry{at(1, 1)}); err != nil {
			return err
		}
		if f.c, err = tx.AddContainer(testContainer("base", 2*meta.PageSlots)); err != nil {
			return err
		}
		return tx.SetRefs(loc(f.c.ID, 1), 1)
	})
	return f
}

// discarded returns the check that the writes try makes leave the store as
// it was; when says how they were made, for the messages.
func discarded(try func(t *testing.T, s meta.Store, f discardFixture), when string) func(t *testing.T, s meta.Store) {
	return func(t *testing.T, s meta.Store) {
		f := setupDiscard(t, s)
		try(t, s, f)
		checkNothingLanded(t, s, f, when)
	}
}

// failedUpdate writes a new disk and its table, entries of the base disk
// across a page boundary, a rename, a container and counts on two pages,
// then fails the Update.
func failedUpdate(t *testing.T, s meta.Store, f discardFixture) {
	t.Helper()
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		nd, err := tx.CreateDisk(testDisk("new"))
		if err != nil {
			return err
		}
		if err := tx.SetEntries(nd.ID, 0, []table.Entry{at(1, 2)}); err != nil {
			return err
		}
		if err := tx.SetEntries(f.d.ID, meta.PageEntries-1, []table.Entry{at(1, 3), at(1, 4)}); err != nil {
			return err
		}
		renamed := f.d
		renamed.Name, renamed.ReadOnly = "renamed", true
		if err := tx.PutDisk(renamed); err != nil {
			return err
		}
		if _, err := tx.AddContainer(testContainer("new", 5)); err != nil {
			return err
		}
		for _, r := range []slotRef{{1, 0}, {2, 1}, {meta.PageSlots + 1, 1}} {
			if err := tx.SetRefs(loc(f.c.ID, r.slot), r.n); err != nil {
				return err
			}
		}
		return fmt.Errorf("give up: %w", errStop)
	})
	wantErr(t, "Update whose fn fails", err, errStop)
}

// writesInView tries every method that writes inside a View: each fails
// with ErrReadOnlyTx.
func writesInView(t *testing.T, s meta.Store, f discardFixture) {
	t.Helper()
	d, c := f.d, f.c
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
}

// checkNothingLanded checks that the store holds f and nothing else.
func checkNothingLanded(t *testing.T, s meta.Store, f discardFixture, when string) {
	t.Helper()
	d, c := f.d, f.c
	view(t, s, func(tx *meta.Tx) error {
		_, err := tx.Disk("new")
		wantErr(t, "Disk(new) "+when, err, meta.ErrNotFound)
		_, err = tx.Disk("renamed")
		wantErr(t, "Disk(renamed) "+when, err, meta.ErrNotFound)
		got, err := tx.Disk("base")
		if err != nil {
			return fmt.Errorf("Disk(base) %s: %w", when, err)
		}
		if diff := diskDiff(got, d); diff != "" {
			t.Errorf("Disk(base) %s = %s", when, diff)
		}
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		if len(ds) != 1 || ds[0].ID != d.ID {
			t.Errorf("Disks() %s = %+v, want only base", when, ds)
		}
		if err := checkEntries(t, tx, d.ID, 0, []table.Entry{at(1, 1), table.ZeroEntry}); err != nil {
			return err
		}
		if err := checkEntries(t, tx, d.ID, meta.PageEntries-1, zeros(2)); err != nil {
			return err
		}
		m, err := mappedOf(tx, d.ID+1) // where a new disk, or a copy, would be
		if err != nil {
			return err
		}
		if len(m) != 0 {
			t.Errorf("disk %d %s maps %v", d.ID+1, when, m)
		}
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(cs) != 1 {
			t.Errorf("Containers() %s = %+v, want only base", when, cs)
		}
		rs, err := refsOf(tx, c.ID)
		if err != nil {
			return err
		}
		if want := []slotRef{{1, 1}}; !slices.Equal(rs, want) {
			t.Errorf("ForEachRef %s = %v, want %v", when, rs, want)
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
