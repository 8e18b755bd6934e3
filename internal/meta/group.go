package meta

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

// # Group commit
//
// Every Store.Update of both backends goes through a group: Updates that
// arrive while a commit is in flight are gathered and run, one after the
// other, inside one backend transaction, which is committed once (one
// fsync for bbolt, one Txn and raft round for etcd). It adds no delay: a
// caller that finds no commit in flight leads a batch of itself at once;
// the callers that arrive meanwhile queue, and when the commit ends the
// first of them leads the next batch, made of the queue (at most maxBatch
// calls; the rest wait for the one after). This is the leader/follower
// group commit of databases' write-ahead logs; unlike bbolt's db.Batch it
// never waits for company.
//
// An Update's call goes through these states (the group is busy from a
// leader's start until it finds the queue empty):
//
//	group idle ------------------------------------> leader
//	group busy --> queued --batch taken by a leader--> in a batch --> done
//	                 |  \--first in the queue when a batch ends--> leader
//	                 \--context ends--> done (the context's error)
//	leader: takes the queue (up to maxBatch-1) as its batch behind its own
//	call, runs and commits it, hands the lead to the next queued call
//	(or marks the group idle), and wakes its batch --> done
//
// # Each Update keeps its own outcome
//
// Each fn runs on a Tx of its own (its own page caches) over an overlay of
// the batch's transaction: its writes, including those t.flush makes at
// its end, are buffered in the overlay, and its reads see the overlay over
// the batch (so the writes of the fns before it in the batch, which is
// how a batch stays serialisable: in batch order, each fn sees what the
// earlier ones did). When fn returns nil its overlay is written into the
// batch's transaction; when it returns an error (or panics) the overlay is
// dropped and only its caller gets the error: nothing it did is kept, and
// nothing is run again for it. The overlay costs a map of the keys fn
// writes; it spares the batch the reruns bbolt's Batch makes (roll back
// and run every fn again without the failing one). If writing an overlay
// into the transaction fails, which leaves it half applied, that fn fails
// with the error and the batch runs again without it.
//
// # A failed commit fails the batch
//
// If the commit fails (an fsync error, an etcd Txn that fails or whose
// outcome is unknown, a lost leadership, a CommitHook's error), every
// caller whose fn was in it gets the error, wrapped so as to say that the
// batch of n updates failed; the wrapped error keeps what the backend
// says of it (an etcd timeout still means the commit may or may not have
// happened). Callers whose fn failed get their own error. On etcd a commit
// refused because something the batch read has changed (every fn's reads
// count, failed ones' too, since their failure may rest on them) runs the
// whole batch again on a new snapshot, as a lone Update ran again before;
// a commit refused as too large for etcd runs the batch again as two
// halves, each committed on its own, so a batch never fails for a size
// its updates would not have alone.
//
// # Contexts
//
// A queued caller whose context ends leaves the queue and returns the
// context's error: nothing of its fn ran. Once its batch has started, a
// caller waits for the batch's outcome (a commit in flight, which bbolt
// bounds by an fsync), so that its answer is always true; when its turn
// in the batch comes and its context has ended, its fn is skipped and it
// gets the context's error. The batch's transaction (etcd's reads and
// Txn) runs under a context that ends only once every caller of the batch
// has given up: one caller's cancellation does not break the others.
//
// fn runs on the goroutine of whichever caller leads its batch (the
// Store contract already says fn may run more than once and have no
// effects outside the transaction). A panic in fn is recovered there,
// drops fn's overlay, and is raised again, with the same value, on the
// goroutine of fn's caller; the rest of the batch goes on. fn must return
// (not call runtime.Goexit, as t.FailNow does): if it does, the rest of
// its batch fails with errGoexit.

// Batch bounds: bbolt's batches are bounded by the work one goroutine does
// between fsyncs; etcd's by the Txn limits (see Etcd), which a batch that
// outgrows them splits.
const (
	boltMaxBatch = 64
	etcdMaxBatch = 16
)

// CommitHook, set on a store with SetCommitHook, sees every commit of a
// batch: updates is the number of Updates whose fn returned nil and whose
// writes the commit carries (0 when none did: then commit writes
// nothing). The hook calls commit to commit (at most once) and returns
// the outcome the callers get: commit's error, or an error of its own,
// which fails the batch (whether commit was called or not: the error
// injection of internal/faultinject fails a commit before or after it
// is made, or crashes there). On etcd it is called once per attempt: a
// batch that lost a conflict runs and commits again.
type CommitHook func(updates int, commit func() error) error

// GroupCommitter is implemented by the stores that group commits (Bolt,
// Etcd): tests and error injection observe and intercept commits through
// it.
type GroupCommitter interface {
	// SetCommitHook makes every later commit go through h (nil: none).
	SetCommitHook(h CommitHook)
	// SetQueueHook makes every Update that queues behind a commit in
	// flight call h with the number of Updates queued, itself included
	// (nil: none). h must not block for long: the caller waits for it.
	SetQueueHook(h func(queued int))
}

// batchBackend is what a store gives its group.
type batchBackend interface {
	// begin starts the transaction of one attempt of a batch; ctx
	// bounds its requests.
	begin(ctx context.Context) (batchTx, error)
	// stale says whether err, from an fn or the commit, means the
	// batch's snapshot went stale, so that the batch must run again.
	stale(err error) bool
	// again is called after stale attempt number attempt: it returns
	// nil once it is time to run the batch again, or the error to fail
	// it with.
	again(ctx context.Context, attempt int) error
	// tooLarge says whether a commit failed for its size alone.
	tooLarge(err error) bool
}

// batchTx is one backend transaction.
type batchTx interface {
	kv() KV
	// commit commits; wrote is false when nothing was written (the
	// backend may then commit nothing).
	commit(wrote bool) error
	// rollback ends a transaction that was not committed.
	rollback()
}

// group is a store's group committer. Its zero value is not usable: see
// newGroup.
type group struct {
	be       batchBackend
	maxBatch int
	hook     atomic.Pointer[CommitHook]
	queued   atomic.Pointer[func(int)]

	mu struct {
		sync.Mutex
		busy  bool    // a leader is running a batch
		queue []*call // waiting for the next batch, in arrival order
	}
}

// init readies g for a store whose backend is be.
func (g *group) init(be batchBackend, maxBatch int) {
	g.be, g.maxBatch = be, maxBatch
}

// SetCommitHook implements GroupCommitter.
func (g *group) SetCommitHook(h CommitHook) {
	if h == nil {
		g.hook.Store(nil)
		return
	}
	g.hook.Store(&h)
}

// SetQueueHook implements GroupCommitter.
func (g *group) SetQueueHook(h func(queued int)) {
	if h == nil {
		g.queued.Store(nil)
		return
	}
	g.queued.Store(&h)
}

// call is one Update.
type call struct {
	ctx  context.Context
	fn   func(*Tx) error
	wake chan struct{} // one send: lead, or the outcome is set
	lead bool          // told to lead the next batch

	// The outcome, final once done is set.
	done     bool
	err      error
	panicked bool
	panicVal any
}

func (c *call) finish(err error) {
	c.done, c.err = true, err
}

// update runs fn in a batch and returns its outcome.
func (g *group) update(ctx context.Context, fn func(*Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c := &call{ctx: ctx, fn: fn, wake: make(chan struct{}, 1)}
	g.mu.Lock()
	if !g.mu.busy {
		g.mu.busy = true
		g.mu.Unlock()
		g.lead(c)
	} else {
		g.mu.queue = append(g.mu.queue, c)
		n := len(g.mu.queue)
		g.mu.Unlock()
		if h := g.queued.Load(); h != nil {
			(*h)(n)
		}
		select {
		case <-c.wake:
		case <-ctx.Done():
			g.mu.Lock()
			i := slices.Index(g.mu.queue, c)
			if i >= 0 {
				g.mu.queue = slices.Delete(g.mu.queue, i, i+1)
			}
			g.mu.Unlock()
			if i >= 0 {
				return ctx.Err()
			}
			<-c.wake // taken into a batch, or told to lead: see it through
		}
		if c.lead {
			g.lead(c)
		}
	}
	if c.panicked {
		panic(c.panicVal)
	}
	return c.err
}

// lead runs one batch: first and the calls queued behind it. Then it
// hands the lead to the first call still queued, or marks the group idle.
func (g *group) lead(first *call) {
	g.mu.Lock()
	k := min(len(g.mu.queue), g.maxBatch-1)
	batch := append([]*call{first}, g.mu.queue[:k]...)
	clear(g.mu.queue[:k]) // the backing array outlives them
	g.mu.queue = g.mu.queue[k:]
	g.mu.Unlock()

	ended := false
	defer func() {
		if !ended { // runtime.Goexit inside an fn
			for _, c := range batch {
				if !c.done {
					c.finish(errGoexit)
				}
			}
		}
		g.mu.Lock()
		var next *call
		if len(g.mu.queue) > 0 {
			next = g.mu.queue[0]
			g.mu.queue[0] = nil
			g.mu.queue = g.mu.queue[1:]
			next.lead = true
		} else {
			g.mu.busy = false
		}
		g.mu.Unlock()
		if next != nil {
			next.wake <- struct{}{}
		}
		for _, c := range batch[1:] {
			c.wake <- struct{}{}
		}
	}()
	g.run(batch)
	ended = true
}

// run gives every call of batch its outcome.
func (g *group) run(batch []*call) {
	defer func() {
		// A panic outside every fn (in the backend): the batch's
		// transaction was rolled back; each caller panics with it.
		if r := recover(); r != nil {
			for _, c := range batch {
				if !c.done {
					c.finish(nil)
					c.panicked, c.panicVal = true, r
				}
			}
		}
	}()
	ctx, stop := batchContext(batch)
	defer stop()
	g.execute(ctx, batch)
}

// batchContext returns the context of a batch's transaction: it carries
// the first call's values and ends when every call's context has ended.
func batchContext(batch []*call) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(batch[0].ctx))
	var left atomic.Int64
	left.Store(int64(len(batch)))
	stops := make([]func() bool, len(batch))
	for i, c := range batch {
		stops[i] = context.AfterFunc(c.ctx, func() {
			if left.Add(-1) == 0 {
				cancel()
			}
		})
	}
	return ctx, func() {
		for _, s := range stops {
			s()
		}
		cancel()
	}
}

// execute runs calls (those not done) as one batch, attempt after
// attempt, until each is done.
func (g *group) execute(ctx context.Context, calls []*call) {
	for attempt := 1; ; {
		err := g.attempt(ctx, calls)
		switch {
		case err == nil:
			return
		case errors.Is(err, errRerun):
			continue
		case errors.Is(err, errSplit):
			h := len(calls) / 2
			g.execute(ctx, calls[:h])
			g.execute(ctx, calls[h:])
			return
		}
		// Stale: run every fn again on a new snapshot.
		if err := g.be.again(ctx, attempt); err != nil {
			for _, c := range calls {
				if !c.done {
					c.finish(err)
				}
			}
			return
		}
		attempt++
	}
}

// attempt runs the fns of the calls not done in one backend transaction
// and commits it. It returns nil when every call is done, errRerun or
// errSplit, or a stale error (see batchBackend.stale).
func (g *group) attempt(ctx context.Context, calls []*call) error {
	bt, err := g.be.begin(ctx)
	if err != nil {
		for _, c := range calls {
			if !c.done {
				c.finish(err)
			}
		}
		return nil
	}
	ended := false // committed (or the commit tried): no rollback
	defer func() {
		if !ended {
			bt.rollback()
		}
	}()
	live := make([]*call, 0, len(calls))
	errs := make([]error, 0, len(calls)) // each live call's fn's outcome
	applied, wrote := 0, false
	for _, c := range calls {
		if c.done {
			continue
		}
		if err := c.ctx.Err(); err != nil {
			c.finish(err)
			continue
		}
		o := &overlayKV{base: bt.kv()}
		err := c.run(newTx(o, true))
		if c.done { // panicked
			continue
		}
		if g.be.stale(err) {
			return err
		}
		if err == nil {
			if aerr := o.apply(); aerr != nil {
				c.finish(aerr)
				return errRerun
			}
			applied++
			wrote = wrote || len(o.writes) > 0
		}
		live = append(live, c)
		errs = append(errs, err)
	}
	commit := func() error {
		err := bt.commit(wrote)
		ended = true
		return err
	}
	if h := g.hook.Load(); h != nil {
		err = (*h)(applied, commit)
	} else {
		err = commit()
	}
	switch {
	case err != nil && g.be.stale(err):
		return err
	case err != nil && applied > 1 && g.be.tooLarge(err):
		return errSplit
	case err != nil && applied > 1:
		err = fmt.Errorf("commit of a batch of %d updates: %w", applied, err)
	}
	for i, c := range live {
		if errs[i] != nil {
			c.finish(errs[i])
		} else {
			c.finish(err)
		}
	}
	return nil
}

// run calls fn on t and flushes t; a panic is recorded as the call's
// outcome.
func (c *call) run(t *Tx) (err error) {
	defer func() {
		if r := recover(); r != nil {
			c.finish(nil)
			c.panicked, c.panicVal = true, r
			err = nil
		}
	}()
	if err := c.fn(t); err != nil {
		return err
	}
	return t.flush()
}

// overlayKV buffers one fn's writes over the batch's transaction: reads
// see them over the base, and apply writes them into it.
type overlayKV struct {
	base   KV
	writes map[string]pending
}

func (o *overlayKV) Get(key []byte) ([]byte, error) {
	if w, ok := o.writes[string(key)]; ok {
		if w.del {
			return nil, nil
		}
		return w.value, nil
	}
	return o.base.Get(key)
}

func (o *overlayKV) Put(key, value []byte) error {
	if value == nil {
		value = []byte{}
	}
	o.set(key, pending{value: value})
	return nil
}

func (o *overlayKV) Delete(key []byte) error {
	o.set(key, pending{del: true})
	return nil
}

func (o *overlayKV) set(key []byte, w pending) {
	if o.writes == nil {
		o.writes = make(map[string]pending)
	}
	o.writes[string(key)] = w
}

// Scan merges the base's keys under prefix with the overlay's, in order.
func (o *overlayKV) Scan(prefix []byte, fn func(key, value []byte) error) error {
	var keys []string
	for k := range o.writes {
		if len(k) >= len(prefix) && k[:len(prefix)] == string(prefix) {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return o.base.Scan(prefix, fn)
	}
	slices.Sort(keys)
	i := 0
	// emit passes the overlay's keys before key (all of them if key is
	// nil) to fn; it reports whether the overlay holds key itself.
	emit := func(key []byte) (bool, error) {
		for ; i < len(keys) && (key == nil || keys[i] <= string(key)); i++ {
			k := keys[i]
			if key != nil && k == string(key) {
				i++
				return true, o.one(k, fn)
			}
			if err := o.one(k, fn); err != nil {
				return false, err
			}
		}
		return false, nil
	}
	if err := o.base.Scan(prefix, func(key, value []byte) error {
		held, err := emit(key)
		if err != nil || held {
			return err
		}
		return fn(key, value)
	}); err != nil {
		return err
	}
	_, err := emit(nil)
	return err
}

// one passes the overlay's key k to fn, unless it is deleted.
func (o *overlayKV) one(k string, fn func(key, value []byte) error) error {
	if w := o.writes[k]; !w.del {
		return fn([]byte(k), w.value)
	}
	return nil
}

// apply writes the overlay into the base, in key order.
func (o *overlayKV) apply() error {
	for _, k := range sortedKeys(o.writes) {
		var err error
		if w := o.writes[k]; w.del {
			err = o.base.Delete([]byte(k))
		} else {
			err = o.base.Put([]byte(k), w.value)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
