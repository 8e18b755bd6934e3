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
