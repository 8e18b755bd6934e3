package meta_test

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// heldBatch runs holder in an Update of s whose commit is held, queues
// each of fns in an Update of its own behind it, then releases it. hook
// sees every commit after the held one (its number from 2 and its
// updates) and makes it; it returns each fn's error and the holder's.
func heldBatch(t *testing.T, s *meta.Etcd, holder func(*meta.Tx) error, fns []func(*meta.Tx) error,
	hook func(n, updates int, commit func() error) error) ([]error, error) {
	t.Helper()
	held, release := make(chan struct{}), make(chan struct{})
	queued := make(chan int, len(fns))
	var mu sync.Mutex
	commits := 0
	s.SetCommitHook(func(updates int, commit func() error) error {
		mu.Lock()
		commits++
		n := commits
		mu.Unlock()
		if n == 1 {
			close(held)
			<-release
			return commit()
		}
		return hook(n, updates, commit)
	})
	s.SetQueueHook(func(n int) { queued <- n })
	defer s.SetCommitHook(nil)
	defer s.SetQueueHook(nil)
	ctx := t.Context()
	var wg sync.WaitGroup
	var herr error
	wg.Go(func() { herr = s.Update(ctx, holder) })
	<-held
	errs := make([]error, len(fns))
	for i, fn := range fns {
		wg.Go(func() { errs[i] = s.Update(ctx, fn) })
	}
	for n := range queued {
		if n == len(fns) {
			break
		}
	}
	close(release)
	wg.Wait()
	return errs, herr
}

// A batch whose commit is too large for etcd, though each of its Updates
// alone is not, runs again as two halves, each committed on its own.
func testEtcdBatchSplits(t *testing.T, cli *clientv3.Client, prefix string) {
	s := openEtcd(t, cli, prefix)
	defer s.Close()
	const n, each = 4, testMaxTxnOps / 3 // one fits, n do not
	var fns []func(*meta.Tx) error
	for i := range n {
		fns = append(fns, func(tx *meta.Tx) error {
			for id := range meta.DiskID(each) {
				if err := tx.SetGrants(meta.DiskID(i*each)+id+100, []string{"agent"}, false); err != nil {
					return err
				}
			}
			return nil
		})
	}
	var sizes []int
	var errsSeen []error
	errs, herr := heldBatch(t, s, func(tx *meta.Tx) error { return tx.SetAgents([]string{"holder"}) }, fns,
		func(_, updates int, commit func() error) error {
			err := commit()
			sizes = append(sizes, updates)
			errsSeen = append(errsSeen, err)
			return err
		})
	if herr != nil {
		t.Fatalf("holder: %v", herr)
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("Update %d: %v", i, err)
		}
	}
	if !slices.Equal(sizes, []int{n, n / 2, n / 2}) || !errors.Is(errsSeen[0], meta.ErrTxnTooLarge) {
		t.Errorf("commits of %v updates, outcomes %v; want %v, the first too large", sizes, errsSeen, []int{n, n / 2, n / 2})
	}
	if err := s.View(t.Context(), func(tx *meta.Tx) error {
		for i := range n {
			if gs, all, err := tx.Grants(meta.DiskID(i*each) + 100); err != nil || all || len(gs) != 1 {
				t.Errorf("Update %d's grants: %v, all %v, %v", i, gs, all, err)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// A batch whose commit loses a conflict (another store changed what one
// of its Updates read) runs again, whole, on a new snapshot: each
// read-modify-write of a shared counter counts once, in order.
func testEtcdBatchConflict(t *testing.T, cli *clientv3.Client, prefix string) {
	s := openEtcd(t, cli, prefix)
	defer s.Close()
	other := openEtcd(t, cli, prefix)
	defer other.Close()
	var ctr meta.Disk
	if err := s.Update(t.Context(), func(tx *meta.Tx) error {
		var err error
		ctr, err = tx.CreateDisk(meta.Disk{Name: "counter", SegmentSize: 1 << 16, Policy: table.Forward, Created: time.Unix(1, 0)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	increment := func(tx *meta.Tx) error {
		d, err := tx.DiskByID(ctr.ID)
		if err != nil {
			return err
		}
		d.Size += 512
		return tx.PutDisk(d)
	}
	const n = 3
	var sizes []int
	var errsSeen []error
	errs, herr := heldBatch(t, s, func(tx *meta.Tx) error { return tx.SetAgents([]string{"holder"}) },
		slices.Repeat([]func(*meta.Tx) error{increment}, n),
		func(k, updates int, commit func() error) error {
			if k == 2 { // the batch: another store gets in first
				if err := other.Update(t.Context(), increment); err != nil {
					t.Errorf("the other store's update: %v", err)
				}
			}
			err := commit()
			sizes = append(sizes, updates)
			errsSeen = append(errsSeen, err)
			return err
		})
	if herr != nil {
		t.Fatalf("holder: %v", herr)
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("Update %d: %v", i, err)
		}
	}
	if len(sizes) != 2 || sizes[0] != n || sizes[1] != n || errsSeen[0] == nil || errsSeen[1] != nil {
		t.Errorf("commits of %v updates, outcomes %v; want a conflict, then %d updates committed", sizes, errsSeen, n)
	}
	if err := s.View(t.Context(), func(tx *meta.Tx) error {
		d, err := tx.DiskByID(ctr.ID)
		if err == nil && d.Size != (n+1)*512 {
			t.Errorf("counter %d, want %d: an increment was lost or counted twice", d.Size/512, n+1)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}
