package metatest

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"segmap/internal/meta"
)

// RunGroupCommit checks the group commit of a store that implements
// meta.GroupCommitter: concurrent Updates share commits, each keeps its
// own outcome, a failed commit fails its whole batch, and a caller that
// gives up while queued breaks nothing. open is as for Run.
//
// The checks hold the first commit in the commit hook until the other
// Updates have queued behind it (the queue hook says when), so the
// batches they form do not depend on timing.
func RunGroupCommit(t *testing.T, open func(t *testing.T) meta.Store) {
	checks := []check{
		{"AllApplied", testGroupAllApplied},
		{"FewCommits", testGroupFewCommits},
		{"FailingUpdateAlone", testGroupFailingAlone},
		{"FailedCommitFailsBatch", testGroupFailedCommit},
		{"DurableCommitError", testGroupDurableError},
		{"CancelWhileQueued", testGroupCancel},
		{"Panic", testGroupPanic},
		{"Goexit", testGroupGoexit},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) { c.fn(t, open(t)) })
	}
}

// gate is a commit hook that holds the first commit until released,
// counts commits and the Updates each carries, and can fail one.
type gate struct {
	held    chan struct{} // closed when the first commit is held
	release chan struct{}
	queued  chan int // the queue hook's reports

	mu struct {
		sync.Mutex
		sizes []int // updates carried by each commit, in order
	}
	// fail, if set, is asked about every commit (1-based): an error
	// fails it, after committing if durable. Set them before the
	// Updates start.
	fail    func(n int) error
	durable bool
}

// hold installs a gate on s.
func hold(t *testing.T, s meta.Store) *gate {
	t.Helper()
	gc, ok := s.(meta.GroupCommitter)
	if !ok {
		t.Fatalf("%T does not implement meta.GroupCommitter", s)
	}
	g := &gate{held: make(chan struct{}), release: make(chan struct{}), queued: make(chan int, 1024)}
	gc.SetCommitHook(func(updates int, commit func() error) error {
		g.mu.Lock()
		g.mu.sizes = append(g.mu.sizes, updates)
		n := len(g.mu.sizes)
		g.mu.Unlock()
		fail, durable := g.fail, g.durable
		if n == 1 {
			close(g.held)
			<-g.release
		}
		if fail != nil {
			if err := fail(n); err != nil {
				if durable {
					if cerr := commit(); cerr != nil {
						return cerr
					}
				}
				return err
			}
		}
		return commit()
	})
	gc.SetQueueHook(func(n int) { g.queued <- n })
	t.Cleanup(func() {
		gc.SetCommitHook(nil)
		gc.SetQueueHook(nil)
	})
	return g
}

// commits returns the updates carried by each commit so far.
func (g *gate) commits() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.mu.sizes)
}

// batch runs holder in one Update, whose commit the gate holds, then each
// of fns in an Update of its own, all queued behind it, and releases the
// gate once every one has queued. It returns each fn's error and holder's.
func (g *gate) batch(t *testing.T, s meta.Store, holder func(*meta.Tx) error, fns []func(*meta.Tx) error) ([]error, error) {
	t.Helper()
	ctx := t.Context()
	var wg sync.WaitGroup
	var herr error
	wg.Go(func() { herr = s.Update(ctx, holder) })
	<-g.held
	errs := make([]error, len(fns))
	for i, fn := range fns {
		wg.Go(func() { errs[i] = s.Update(ctx, fn) })
	}
	for n := range g.queued {
		if n == len(fns) {
			break
		}
	}
	close(g.release)
	wg.Wait()
	return errs, herr
}

func createDisk(name string) func(*meta.Tx) error {
	return func(tx *meta.Tx) error {
		_, err := tx.CreateDisk(testDisk(name))
		return err
	}
}

// diskNames returns the names of the store's disks, sorted.
func diskNames(t *testing.T, s meta.Store) []string {
	t.Helper()
	var names []string
	view(t, s, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		for _, d := range ds {
			names = append(names, d.Name)
		}
		return err
	})
	slices.Sort(names)
	return names
}

// testGroupAllApplied runs 64 concurrent read-modify-write Updates of one
// shared count: none is lost.
func testGroupAllApplied(t *testing.T, s meta.Store) {
	const n = 64
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		c, err = tx.AddContainer(testContainer("shared", n+1))
		return err
	})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			err := s.Update(t.Context(), func(tx *meta.Tx) error {
				if _, err := tx.CreateDisk(testDisk(fmt.Sprintf("d%02d", i))); err != nil {
					return err
				}
				if _, err := meta.AddRefs(tx, loc(c.ID, 0), 1); err != nil {
					return err
				}
				return tx.SetRefs(loc(c.ID, uint32(i+1)), 1)
			})
			if err != nil {
				t.Errorf("Update %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	view(t, s, func(tx *meta.Tx) error {
		if n, err := tx.Refs(loc(c.ID, 0)); err != nil || n != 64 {
			t.Errorf("shared count %d, %v; want 64", n, err)
		}
		return checkUsed(t, tx, c.ID, n+1)
	})
	if got := len(diskNames(t, s)); got != n {
		t.Errorf("%d disks, want %d", got, n)
	}
}

// testGroupFewCommits: 64 Updates at once cost far fewer than 64 commits.
func testGroupFewCommits(t *testing.T, s meta.Store) {
	g := hold(t, s)
	var fns []func(*meta.Tx) error
	for i := range 63 {
		fns = append(fns, createDisk(fmt.Sprintf("d%02d", i)))
	}
	errs, herr := g.batch(t, s, createDisk("holder"), fns)
	if herr != nil {
		t.Fatalf("holder: %v", herr)
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("Update %d: %v", i, err)
		}
	}
	cs := g.commits()
	sum := 0
	for _, n := range cs {
		sum += n
	}
	if len(cs) > 8 || sum != 64 || cs[0] != 1 {
		t.Errorf("64 Updates took %d commits carrying %v updates; want at most 8, carrying 64, the first 1", len(cs), cs)
	}
	if got := len(diskNames(t, s)); got != 64 {
		t.Errorf("%d disks, want 64", got)
	}
	t.Logf("64 Updates: %d commits carrying %v", len(cs), cs)
}

// testGroupFailingAlone runs a batch in which every third Update fails
// after writing: only its caller sees the error, nothing it wrote is
// kept, and the Updates after it in the batch see the writes of those
// before it but not its own. Each Update increments one shared counter
// (a disk's size) and records the value it read: the successful ones
// must have read 0, 1, 2, ... each once, as if run one after another.
func testGroupFailingAlone(t *testing.T, s meta.Store) {
	const n = 32
	var ctr meta.Disk
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		d := testDisk("counter")
		d.Size = 0
		if ctr, err = tx.CreateDisk(d); err != nil {
			return err
		}
		c, err = tx.AddContainer(testContainer("c", n))
		return err
	})
	g := hold(t, s)
	seen := make([]uint64, n)
	var fns []func(*meta.Tx) error
	fails := func(i int) bool { return i%3 == 1 }
	for i := range n {
		fns = append(fns, func(tx *meta.Tx) error {
			d, err := tx.DiskByID(ctr.ID)
			if err != nil {
				return err
			}
			seen[i] = d.Size
			d.Size++
			if err := tx.PutDisk(d); err != nil {
				return err
			}
			if _, err := tx.CreateDisk(testDisk(fmt.Sprintf("d%02d", i))); err != nil {
				return err
			}
			if err := tx.SetRefs(loc(c.ID, uint32(i)), 1); err != nil {
				return err
			}
			if fails(i) {
				return fmt.Errorf("update %d: %w", i, errStop)
			}
			return nil
		})
	}
	errs, herr := g.batch(t, s, createDisk("holder"), fns)
	if herr != nil {
		t.Fatalf("holder: %v", herr)
	}
	var reads []uint64
	want := []string{"counter", "holder"}
	for i, err := range errs {
		if fails(i) {
			wantErr(t, fmt.Sprintf("failing Update %d", i), err, errStop)
			continue
		}
		if err != nil {
			t.Errorf("Update %d: %v", i, err)
		}
		reads = append(reads, seen[i])
		want = append(want, fmt.Sprintf("d%02d", i))
	}
	slices.Sort(reads)
	for i, r := range reads {
		if r != uint64(i) {
			t.Errorf("the successful Updates read the counter as %v; want 0 to %d, each once", reads, len(reads)-1)
			break
		}
	}
	slices.Sort(want)
	if got := diskNames(t, s); !slices.Equal(got, want) {
		t.Errorf("disks %v, want %v", got, want)
	}
	view(t, s, func(tx *meta.Tx) error {
		d, err := tx.DiskByID(ctr.ID)
		if err != nil {
			return err
		}
		if d.Size != uint64(len(reads)) {
			t.Errorf("counter %d, want %d", d.Size, len(reads))
		}
		for i := range n {
			want := uint32(1)
			if fails(i) {
				want = 0
			}
			if got, err := tx.Refs(loc(c.ID, uint32(i))); err != nil || got != want {
				t.Errorf("slot %d: count %d, %v; want %d", i, got, err, want)
			}
		}
		return checkUsed(t, tx, c.ID, uint64(len(reads)))
	})
	if cs := g.commits(); len(cs) > 3 {
		t.Errorf("%d Updates took %d commits (%v)", n+1, len(cs), cs)
	}
}

// testGroupFailedCommit fails the commit of a batch (before it is made):
// every caller whose Update was in it gets the error, one whose own fn
// failed gets its own, and nothing of the batch is kept.
func testGroupFailedCommit(t *testing.T, s meta.Store) {
	g := hold(t, s)
	g.fail = func(n int) error {
		if n == 2 {
			return errInjected
		}
		return nil
	}
	const n = 8
	var fns []func(*meta.Tx) error
	for i := range n {
		fns = append(fns, createDisk(fmt.Sprintf("d%d", i)))
	}
	fns = append(fns, func(tx *meta.Tx) error {
		if err := createDisk("own")(tx); err != nil {
			return err
		}
		return errStop
	})
	errs, herr := g.batch(t, s, createDisk("holder"), fns)
	if herr != nil {
		t.Fatalf("holder: %v", herr)
	}
	for i, err := range errs[:n] {
		wantErr(t, fmt.Sprintf("Update %d of the failed batch", i), err, errInjected)
	}
	wantErr(t, "the failing Update of the failed batch", errs[n], errStop)
	if errors.Is(errs[n], errInjected) {
		t.Errorf("the failing Update got the commit's error: %v", errs[n])
	}
	if got := diskNames(t, s); !slices.Equal(got, []string{"holder"}) {
		t.Errorf("disks %v after the failed commit; want [holder]", got)
	}
	if cs := g.commits(); len(cs) != 2 || cs[1] != n {
		t.Errorf("commits carried %v; want [1 %d]", cs, n)
	}
	// The store goes on.
	update(t, s, createDisk("after"))
	if got := diskNames(t, s); !slices.Equal(got, []string{"after", "holder"}) {
		t.Errorf("disks %v; want [after holder]", got)
	}
}

// testGroupDurableError fails a batch's commit after making it (an fsync
// error after the data reached the disk): every caller gets the error,
// and the batch is in the store whole.
func testGroupDurableError(t *testing.T, s meta.Store) {
	g := hold(t, s)
	g.fail = func(n int) error {
		if n == 2 {
			return errInjected
		}
		return nil
	}
	g.durable = true
	var fns []func(*meta.Tx) error
	want := []string{"holder"}
	for i := range 5 {
		fns = append(fns, createDisk(fmt.Sprintf("d%d", i)))
		want = append(want, fmt.Sprintf("d%d", i))
	}
	errs, herr := g.batch(t, s, createDisk("holder"), fns)
	if herr != nil {
		t.Fatalf("holder: %v", herr)
	}
	for i, err := range errs {
		wantErr(t, fmt.Sprintf("Update %d", i), err, errInjected)
	}
	slices.Sort(want)
	if got := diskNames(t, s); !slices.Equal(got, want) {
		t.Errorf("disks %v, want %v", got, want)
	}
}

// testGroupCancel cancels one queued Update: it returns at once with the
// context's error and writes nothing; the others of its batch commit.
func testGroupCancel(t *testing.T, s meta.Store) {
	g := hold(t, s)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var wg sync.WaitGroup
	var herr, aerr, berr error
	wg.Go(func() { herr = s.Update(t.Context(), createDisk("holder")) })
	<-g.held
	aDone := make(chan struct{})
	wg.Go(func() {
		defer close(aDone)
		aerr = s.Update(ctx, createDisk("a"))
	})
	wg.Go(func() { berr = s.Update(t.Context(), createDisk("b")) })
	for n := range g.queued {
		if n == 2 {
			break
		}
	}
	cancel()
	<-aDone // while the first commit is still held
	wantErr(t, "the cancelled Update", aerr, context.Canceled)
	close(g.release)
	wg.Wait()
	if herr != nil || berr != nil {
		t.Errorf("holder: %v; b: %v", herr, berr)
	}
	if got := diskNames(t, s); !slices.Equal(got, []string{"b", "holder"}) {
		t.Errorf("disks %v; want [b holder]", got)
	}
}

// testGroupPanic: an Update whose fn panics panics in its caller, and
// keeps nothing; the others of its batch commit.
func testGroupPanic(t *testing.T, s meta.Store) {
	g := hold(t, s)
	type boom struct{ n int }
	var recovered atomic.Value
	fns := []func(*meta.Tx) error{
		createDisk("a"),
		func(tx *meta.Tx) error {
			if err := createDisk("p")(tx); err != nil {
				return err
			}
			panic(boom{7})
		},
		createDisk("b"),
	}
	// The panicking Update's caller recovers the panic around its call.
	ctx := t.Context()
	var wg sync.WaitGroup
	var herr, aerr, berr error
	wg.Go(func() { herr = s.Update(ctx, createDisk("holder")) })
	<-g.held
	wg.Go(func() { aerr = s.Update(ctx, fns[0]) })
	wg.Go(func() {
		defer func() {
			if r := recover(); r != nil {
				recovered.Store(r)
			}
		}()
		_ = s.Update(ctx, fns[1])
	})
	wg.Go(func() { berr = s.Update(ctx, fns[2]) })
	for n := range g.queued {
		if n == 3 {
			break
		}
	}
	close(g.release)
	wg.Wait()
	if herr != nil || aerr != nil || berr != nil {
		t.Errorf("holder: %v, a: %v, b: %v", herr, aerr, berr)
	}
	if r := recovered.Load(); r != (boom{7}) {
		t.Errorf("the panicking Update's caller recovered %v, want %v", r, boom{7})
	}
	if got := diskNames(t, s); !slices.Equal(got, []string{"a", "b", "holder"}) {
		t.Errorf("disks %v; want [a b holder]", got)
	}
}

// testGroupGoexit: an fn that ends its goroutine (runtime.Goexit, which
// the contract forbids) abandons the rest of its batch with an error but
// leaves the store working. The Updates queue in a known order, so the
// one that exits leads its batch and runs first in it.
func testGroupGoexit(t *testing.T, s meta.Store) {
	g := hold(t, s)
	ctx := t.Context()
	var wg sync.WaitGroup
	var herr, berr error
	aReturned := false
	wg.Go(func() { herr = s.Update(ctx, createDisk("holder")) })
	<-g.held
	wg.Go(func() {
		_ = s.Update(ctx, func(*meta.Tx) error { runtime.Goexit(); return nil })
		aReturned = true
	})
	<-g.queued
	wg.Go(func() { berr = s.Update(ctx, createDisk("b")) })
	<-g.queued
	close(g.release)
	wg.Wait()
	if herr != nil || aReturned {
		t.Errorf("holder: %v; the exiting Update returned: %v", herr, aReturned)
	}
	if berr == nil {
		t.Error("the Update batched after the exiting one succeeded; want an error")
	}
	update(t, s, createDisk("after"))
	if got := diskNames(t, s); !slices.Equal(got, []string{"after", "holder"}) {
		t.Errorf("disks %v; want [after holder]", got)
	}
}
