package controller

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Fault implements protocol.Controller: it resolves a map fault from the
// persistent table (never from what the agent reported, so a retried or
// racing fault is resolved against what is true now) and answers with the
// entries the agent installs before it retries.
//
// During a Hold, read faults are answered: a read resolves to loading the
// entry (or Deny), which changes nothing. Every other fault waits for the
// Hold, write faults included even when they would only load a writable
// entry: an agent of the previous controller that has not yet fenced
// itself may still hold an older entry for the segment (the previous
// controller may have died between committing a new location and telling
// that agent), and a write acknowledged under the new entry would then be
// invisible to its reads.
func (c *Controller) Fault(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
	r, err := c.fault(ctx, f)
	if err == nil {
		c.maskFailed(&r)
	}
	return r, err
}

// fault is Fault before the entries on failed containers are masked.
func (c *Controller) fault(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
	// An abandon only gives a reserved slot back: it changes nothing
	// persistent either.
	end, err := c.begin(ctx, f.Op == protocol.FaultRead || f.Op == protocol.FaultCommit && f.Abandon)
	if err != nil {
		return protocol.Reply{}, err
	}
	defer end()

	id := meta.DiskID(f.Disk)
	c.agents.Lock()
	st := c.agents.byName[f.Agent]
	mapped := st != nil && st.disks[id]
	c.agents.Unlock()
	if f.Op == protocol.FaultCommit && f.Abandon {
		// The agent gives its staged write back unmade.
		c.dropStage(ctx, f.Token, f.Agent, id, f.Segment)
		return protocol.Reply{}, nil
	}
	if f.Op == protocol.FaultCommit {
		// A commit that fails before it reaches its stage (a store
		// read failed, say) ends the stage all the same: the agent
		// does not ask again, and the slot, reserved in memory only,
		// would stay out of use until the agent re-attached. It goes
		// back to the free slots, holding the agent's data.
		defer c.dropStage(ctx, f.Token, f.Agent, id, f.Segment)
	}
	if st == nil {
		return protocol.Reply{}, fmt.Errorf("fault from %q: %w", f.Agent, ErrUnknownAgent)
	}
	if !mapped {
		return protocol.Reply{}, fmt.Errorf("fault from %q on disk %d: %w", f.Agent, f.Disk, ErrNotMapped)
	}
	if f.Count == 0 {
		f.Count = 1
	}
	// load reads the disk's record and checks the fault's range against
	// it; again once the family is locked, since a resize or a delete
	// may have come first.
	load := func() (meta.Disk, error) {
		var d meta.Disk
		if err := c.store.View(ctx, func(tx *meta.Tx) error {
			var err error
			d, err = tx.DiskByID(id)
			return err
		}); err != nil {
			return d, wrapNotFound(err)
		}
		if f.Segment >= d.Segments() || f.Count > d.Segments()-f.Segment {
			return d, fmt.Errorf("fault on segments [%d,+%d) of %q (%d segments): %w", f.Segment, f.Count, d.Name, d.Segments(), protocol.ErrBadRequest)
		}
		return d, nil
	}
	d, err := load()
	if err != nil {
		return protocol.Reply{}, err
	}
	switch f.Op {
	case protocol.FaultRead, protocol.FaultWrite:
		if f.Op == protocol.FaultRead && f.Count > 1 && f.Count <= protocol.MaxReadRange {
			defer c.lockFamily(d.Family, false)()
			if d, err = load(); err != nil {
				return protocol.Reply{}, err
			}
			return c.faultRange(ctx, f, d)
		}
		if f.Count != 1 {
			return protocol.Reply{}, fmt.Errorf("%v fault on %d segments: %w", f.Op, f.Count, protocol.ErrBadRequest)
		}
		if f.Op == protocol.FaultRead {
			// A read resolves to loading the entry (or Deny), which
			// changes nothing, and it does not wait for a copy: it
			// takes the segment's publish lock, not its fault lock.
			// A reply computed before a change and arriving after
			// the change's command is dropped by the agent; but one
			// computed in the middle of a change (committed and not
			// every agent told; or agents told to stop writing and
			// nothing committed yet) would be installed and written
			// through. The family lock (held exclusively across a
			// snapshot, discard, delete or resize) and the publish
			// lock (held by a fault from its first commit to its
			// answer) keep reads out of those windows.
			defer c.lockFamily(d.Family, false)()
			if d, err = load(); err != nil {
				return protocol.Reply{}, err
			}
			defer c.lockPublish(d.Family, f.Segment, false)()
			return c.faultSeg(ctx, f, d)
		}
		if d.ReadOnly {
			return protocol.Reply{}, fmt.Errorf("write to %q: %w", d.Name, protocol.ErrReadOnly)
		}
		for {
			rep, busy, err := func() (protocol.Reply, *fillBusy, error) {
				defer c.lockFamily(d.Family, false)()
				defer c.lockSegment(d.Family, f.Segment)()
				if d, err = load(); err != nil {
					return protocol.Reply{}, nil, err
				}
				rep, err := c.faultSeg(ctx, f, d)
				var fb *fillBusy
				if errors.As(err, &fb) {
					return rep, fb, nil
				}
				return rep, nil, err
			}()
			if busy == nil {
				return rep, err
			}
			// Another write fills the segment in place: its commit
			// needs the segment's lock, so wait without it; if it
			// has been staged for too long, take it back.
			left := min(max(c.fillBreak-c.now().Sub(busy.since), fillBreakPoll), fillBreakLook)
			wctx, cancel := context.WithTimeout(ctx, left)
			select {
			case <-busy.done:
			case <-wctx.Done():
			}
			cancel()
			if err := ctx.Err(); err != nil {
				return protocol.Reply{}, err
			}
			if c.now().Sub(busy.since) < c.fillBreak {
				continue // ended, or not yet due: resolve again
			}
			if err := c.breakInPlace(ctx, d, f.Segment, busy.done); err != nil {
				return protocol.Reply{}, err
			}
		}
	case protocol.FaultCommit:
		defer c.lockFamily(d.Family, false)()
		defer c.lockSegment(d.Family, f.Segment)()
		if d, err = load(); err != nil {
			return protocol.Reply{}, err
		}
		t0 := c.now()
		defer func() { c.met.Fault("commit", c.now().Sub(t0)) }()
		return c.commit(ctx, f, d)
	case protocol.FaultDiscard:
		if d.ReadOnly {
			return protocol.Reply{}, fmt.Errorf("discard on %q: %w", d.Name, protocol.ErrReadOnly)
		}
		defer c.lockFamily(d.Family, true)()
		if d, err = load(); err != nil {
			return protocol.Reply{}, err
		}
		if err := c.flushFamily(ctx, d.Family, true); err != nil {
			return protocol.Reply{}, err
		}
		return c.discard(ctx, d, f.Segment, f.Count)
	case protocol.FaultFlush:
		// The agent has flushed its containers: the family's map
		// changes kept in memory become durable together.
		return protocol.Reply{}, c.flushFamily(ctx, d.Family, false)
	}
	return protocol.Reply{}, fmt.Errorf("fault op %d: %w", f.Op, protocol.ErrBadRequest)
}

// shareCount returns how many holders share the slot entry e (seg of disk id)
// maps, as far as a write needs to know: the slot's count, or at least 2
// when the table page that holds the entry is shared.
func shareCount(tx *meta.Tx, id meta.DiskID, seg uint64, e table.Entry) (uint32, error) {
	if !e.Mapped() {
		return 0, nil
	}
	n, err := tx.Refs(e.Loc)
	if err != nil {
		return 0, err
	}
	if n < 2 {
		shared, err := tx.PageShared(id, seg)
		if err != nil {
			return 0, err
		}
		if shared {
			n = 2
		}
	}
	return n, nil
}

// effective returns entry e as an agent must hold it: No-write when its
// slot is shared (refs > 1). Snapshots do not write No-write into the
// entries they share; it follows from the sharing.
func effective(e table.Entry, refs uint32) table.Entry {
	if e.Mapped() && refs > 1 && !e.Is(table.NoWrite) {
		e.State |= table.NoWrite
	}
	return e
}

// sameEntry reports whether a and b are the same mapping, No-write aside:
// a staged write made against a is still good against b.
func sameEntry(a, b table.Entry) bool {
	a.State &^= table.NoWrite
	b.State &^= table.NoWrite
	return a.Mapped() && a.Equal(b)
}

// dropRefs drops one reference from every slot e names, noting in fr each
// that no one references any more.
func dropRefs(tx *meta.Tx, e table.Entry, fr *freeing) error {
	var err error
	e.Slots(func(loc table.Location) {
		if err != nil {
			return
		}
		var n uint32
		if n, err = meta.AddRefs(tx, loc, -1); err == nil && n == 0 {
			fr.add(loc)
		}
	})
	return err
}

// moveRefs moves the references of one entry from old to ne: each slot
// only old names loses one (and is noted in fr if no one references it
// any more), each slot only ne names gains one.
func moveRefs(tx *meta.Tx, old, ne table.Entry, fr *freeing) error {
	delta := map[table.Location]int{}
	old.Slots(func(l table.Location) { delta[l]-- })
	ne.Slots(func(l table.Location) { delta[l]++ })
	for _, l := range sortedLocs(delta) {
		if delta[l] == 0 {
			continue
		}
		n, err := meta.AddRefs(tx, l, delta[l])
		if err != nil {
			return err
		}
		if n == 0 {
			fr.add(l)
		}
	}
	return nil
}

// sortedLocs returns m's keys in order, so that a transaction's writes
// do not depend on map order.
func sortedLocs[V any](m map[table.Location]V) []table.Location {
	out := make([]table.Location, 0, len(m))
	for l := range m {
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b table.Location) int {
		if a.Container != b.Container {
			return cmp.Compare(a.Container, b.Container)
		}
		return cmp.Compare(a.Slot, b.Slot)
	})
	return out
}

// faultSeg resolves a read or write fault on one segment; for a write, the
// caller holds the family lock shared and the segment's lock.
func (c *Controller) faultSeg(ctx context.Context, f protocol.Fault, d meta.Disk) (protocol.Reply, error) {
	seg := f.Segment
	var e table.Entry
	var refs uint32
	var pageShared bool
	read := func(tx *meta.Tx) error {
		got, err := tx.Entry(d.ID, seg)
		if err != nil {
			return err
		}
		e = c.overlay(d.Family, d.ID, seg, got)
		if e.Mapped() {
			if refs, err = tx.Refs(e.Loc); err != nil {
				return err
			}
			refs = uint32(int(refs) + c.refsDelta(d.Family, seg, e.Loc))
		}
		pageShared, err = tx.PageShared(d.ID, seg)
		return err
	}
	if cur, ok := c.pendingEntry(d.Family, d.ID, seg); ok && cur.State&table.NoWrite == 0 {
		// A change kept in memory is writable and shares neither its
		// slot nor its page (see deferSelf): no need to read the store.
		e, refs = cur, 1
	} else if err := c.store.View(ctx, read); err != nil {
		return protocol.Reply{}, err
	}
	if f.Op == protocol.FaultWrite && pageShared {
		// A write through a shared table page: give the disk a copy
		// of its own first (no entry changes), so that the slot's
		// count alone tells whether the entry is shared.
		if err := c.store.Update(ctx, func(tx *meta.Tx) error {
			if err := tx.Unshare(d.ID, seg, 1); err != nil {
				return err
			}
			return read(tx)
		}); err != nil {
			return protocol.Reply{}, err
		}
	}
	if pageShared && e.Mapped() && refs < 2 {
		refs = 2
	}
	e = effective(e, refs)
	if f.Op == protocol.FaultWrite && (f.Off > d.SegmentSize || f.Len > d.SegmentSize-f.Off) {
		return protocol.Reply{}, fmt.Errorf("write fault on bytes [%d,+%d) of a %d-byte segment: %w", f.Off, f.Len, d.SegmentSize, protocol.ErrBadRequest)
	}
	n := table.SubBlockCount(d.SegmentSize)
	w := table.Span{Whole: f.Whole, Blocks: table.SpanOf(d.SegmentSize, f.Off, f.Len), Of: n}
	if w.Whole || f.Len == 0 {
		// A write that does not say what it covers is taken to
		// touch every sub-block.
		w.Blocks = table.Full(n)
	}
	plan := table.Resolve(e, table.Op(f.Op), refs, w, d.Policy)
	if plan == table.CopySub && c.ctrlCopies {
		// The controller copies whole segments (for comparison).
		plan = table.CopyForward
	}
	r := &faultRun{f: f, d: d, seg: seg, e: e, bits: w.Blocks, n: n, deferred: f.Op == protocol.FaultWrite && c.mayDefer(d, seg)}
	if plan == table.CopyReverse {
		layered, err := c.findSharers(ctx, r, refs)
		if err != nil {
			return protocol.Reply{}, err
		}
		if layered {
			// Some entry reads the slot as a layer under its own:
			// it cannot be written in place, nor that entry moved
			// by a reverse copy. Copy forward, sub-blocks only.
			plan, r.sharers = table.CopySub, nil
		}
	}
	if plan == table.FillIn || plan == table.FillAll {
		// One agent at a time fills a segment in place: two fills of
		// one sub-block would each lay their edges over the other's
		// write. A second waits for the first's commit.
		cl, again := c.claimInPlace(d.ID, seg, f)
		if again != nil {
			// The fault was sent again, its answer lost: the
			// same stage, which its agent may have begun.
			return *again, nil
		}
		if cl != nil {
			return protocol.Reply{}, &fillBusy{done: cl.done, since: cl.since}
		}
	}
	if plan == table.FillAll {
		// The agent fills the rest of the segment too (FillRest):
		// the commit makes the entry whole.
		r.bits = table.Full(n)
	}
	r.plan = plan
	c.plans[plan].Add(1)
	t0 := c.now()
	rep, err := c.run(ctx, r, table.Effects(plan, !c.ctrlCopies))
	c.met.Fault(plan.String(), c.now().Sub(t0))
	return rep, err
}

// faultRange answers a read fault on segments [f.Segment, +f.Count) with
// their entries as a read fault on each would (see Fault), in one store
// transaction. It takes the first segment's publish lock as a read fault
// does, and the others' only if they are free: the reply ends before the
// first segment that a fault is changing (or whose entry is Invalid or
// Error, which a read fault would deny), and the agent asks again for the
// rest. The caller holds the family lock, shared.
func (c *Controller) faultRange(ctx context.Context, f protocol.Fault, d meta.Disk) (protocol.Reply, error) {
	t0 := c.now()
	defer func() { c.met.Fault(table.Load.String(), c.now().Sub(t0)) }()
	n := f.Count
	unlocks := make([]func(), 0, n)
	defer func() {
		for _, u := range unlocks {
			u()
		}
	}()
	unlocks = append(unlocks, c.lockPublish(d.Family, f.Segment, false))
	for i := uint64(1); i < n; i++ {
		u, ok := c.tryLockPublish(d.Family, f.Segment+i)
		if !ok {
			n = i
			break
		}
		unlocks = append(unlocks, u)
	}
	out := make([]table.Entry, 0, n)
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		es, err := tx.Entries(d.ID, f.Segment, n)
		if err != nil {
			return err
		}
		var pageShared bool
		for i, e := range es {
			seg := f.Segment + uint64(i)
			if i == 0 || seg%meta.PageEntries == 0 {
				if pageShared, err = tx.PageShared(d.ID, seg); err != nil {
					return err
				}
			}
			e = c.overlay(d.Family, d.ID, seg, e)
			if e.State&(table.Invalid|table.Error) != 0 {
				if i == 0 {
					return fmt.Errorf("%q segment %d is %v: %w", d.Name, seg, e.State, protocol.ErrIO)
				}
				break
			}
			var refs uint32
			if e.Mapped() {
				if refs, err = tx.Refs(e.Loc); err != nil {
					return err
				}
				refs = uint32(int(refs) + c.refsDelta(d.Family, seg, e.Loc))
				if pageShared && refs < 2 {
					refs = 2
				}
			}
			out = append(out, effective(e, refs))
		}
		return nil
	})
	if err != nil {
		return protocol.Reply{}, err
	}
	c.plans[table.Load].Add(1)
	return protocol.Reply{First: f.Segment, Entries: out}, nil
}

// claimInPlace claims the right to stage a fill of segment seg of disk id
// in place, which one write at a time has (see stagedWrite.inPlace), for
// fault f. If another write has it, it returns that one's claim; if that
// one is f itself, sent again by its agent (same ID) after its answer was
// lost, it returns that answer to give again.
func (c *Controller) claimInPlace(id meta.DiskID, seg uint64, f protocol.Fault) (busy *fillClaim, again *protocol.Reply) {
	c.stage.mu.Lock()
	defer c.stage.mu.Unlock()
	k := segKey{id, seg}
	if cl := c.stage.mu.inPlace[k]; cl != nil {
		if _, staged := c.stage.mu.writes[cl.tok]; staged && f.ID != 0 && cl.agent == f.Agent && cl.id == f.ID {
			// Its agent is alive and has the stage now: the
			// time it has before the fill is taken back starts
			// again.
			cl.since = c.now()
			rep := cl.rep
			return nil, &rep
		}
		return cl, nil
	}
	c.stage.mu.inPlace[k] = &fillClaim{done: make(chan struct{}), since: c.now(), agent: f.Agent, id: f.ID}
	return nil, nil
}

// fillClaim is a write's right to fill a segment in place: done is
// closed when its stage (token tok, once staged) ends. since is when it
// was claimed; agent and id name the fault that claimed it, and rep is
// the answer that fault got.
type fillClaim struct {
	done  chan struct{}
	tok   uint64
	since time.Time
	agent string
	id    uint64
	rep   protocol.Reply
}

// DefaultFillBreakAfter is how long a fill in place may stay staged
// before the next write to its segment takes it back (breakInPlace), by
// default. A fill whose answer never reached its agent (the agent gave
// the write up, its client gone) would otherwise hold the segment until
// the agent attached again. One whose agent is slow is waited for that
// long: a storage node restarting, a controller failing over, take a few
// seconds, and the fill's write must not fail for them. A fault sent
// again after its answer was lost gets its stage again at once
// (claimInPlace).
const DefaultFillBreakAfter = 10 * time.Second

// fillBreakPoll and fillBreakLook are the least and the most a write
// waits for a fill in place before it looks again (the fill may have
// been staged meanwhile for the very fault it waits in, sent again).
const (
	fillBreakPoll = 100 * time.Millisecond
	fillBreakLook = time.Second
)

// breakInPlace ends the in-place stage that holds segment seg of disk d
// (if done is still its claim), which its agent is slow to make or never
// will: the stage is taken back, and its commit, if it ever comes, fails
// with ErrIO; the agents that map d are told to drop the entry (Invalid,
// Blocking), which waits for a write of the stage already on its way and
// makes the agent abandon one not yet begun. Not ErrStale, which makes
// the agent write again: the stage wrote the entry's own slot, others
// read what it wrote over sub-blocks the slot holds, and the write this
// break lets through may overwrite it; written again, it would land a
// second time, after that write. The write fails as one that may or may
// not have taken effect.
func (c *Controller) breakInPlace(ctx context.Context, d meta.Disk, seg uint64, done <-chan struct{}) error {
	k := segKey{d.ID, seg}
	c.stage.mu.Lock()
	cl := c.stage.mu.inPlace[k]
	if cl == nil || cl.done != done || cl.tok == 0 {
		c.stage.mu.Unlock()
		return nil // ended, or not staged yet
	}
	sw, ok := c.stage.mu.writes[cl.tok]
	delete(c.stage.mu.writes, cl.tok)
	c.stage.mu.Unlock()
	if !ok {
		// Its commit has it: it ends the claim (endInPlace) either way.
		return nil
	}
	// A commit that comes while the agents are told fails with IO, not
	// STALE (which makes the agent write again).
	c.noteCommit(sw.tok, commitOutcome{agent: sw.agent, disk: sw.disk, seg: sw.seg,
		err: &spentError{msg: fmt.Sprintf("commit of %q segment %d: its fill in place was taken back", d.Name, seg)}})
	cmd := protocol.SetEntryState{Disk: protocol.DiskID(d.ID), First: seg, Count: 1, State: table.Invalid, On: true, Blocking: true}
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }); err != nil {
		// Not taken back: the stage stands, for its commit or the
		// next try. Left out of the stage table, its claim would hold
		// the segment for good.
		c.stage.mu.Lock()
		c.stage.mu.writes[sw.tok] = sw
		c.stage.mu.Unlock()
		return fmt.Errorf("take back a fill of %q segment %d: %w", d.Name, seg, err)
	}
	c.endInPlace(ctx, sw)
	c.logger.Debug("a fill in place was taken back", "disk", d.Name, "segment", seg)
	return nil
}

// fillBusy is faultSeg's answer when another write fills the segment in
// place (claimed at since): the fault is resolved again once done is
// closed, or the fill taken back once it is due.
type fillBusy struct {
	done  <-chan struct{}
	since time.Time
}

func (*fillBusy) Error() string { return "segment being filled in place" }

// faultRun is the state of one fault's resolution as run carries out its
// steps (table.Effects): the operands the steps name.
type faultRun struct {
	f    protocol.Fault
	d    meta.Disk   // the faulting disk
	seg  uint64      // its segment
	e    table.Entry // its entry: Old is e.Loc, with e's layers
	plan table.Plan
	bits table.Bits // the sub-blocks the write touches
	n    int        // the segment's sub-block count
	// sharers are the other disks of the family that map Old (for a
	// reverse-delta copy).
	sharers []meta.Disk

	// deferred: the commits are kept in memory (pending.go) and the
	// answer says so.
	deferred bool

	newLoc   table.Location // New, once reserved
	reserved bool           // New is reserved and not handed on
	written  bool           // New may hold data
	used     bool           // a commit made New used
}

// target returns the entry t names.
func (r *faultRun) target(t table.Target) table.Entry {
	switch t {
	case table.OldWritable:
		e := r.e
		e.State &^= table.NoWrite
		return e
	case table.NewWritable:
		return table.At(r.newLoc, false)
	case table.NewOver:
		return table.Over(r.newLoc, r.bits, r.e, r.n)
	case table.OldFilled:
		return table.Filled(r.e, r.bits, r.n)
	}
	return r.e
}

// run carries out steps for the fault r, in their order, and answers it.
// It adds no step and changes no order: what is durable when, and what
// agents hear before what, is the pure core's (table.Effects). On a
// failure it undoes what is in memory only (a reserved slot goes back,
// dirty if it was written) and, after a failed commit, which may have
// landed all the same, makes the agents drop the entries it would have
// replaced (see unsettled).
func (c *Controller) run(ctx context.Context, r *faultRun, steps []table.Step) (protocol.Reply, error) {
	d, seg := r.d, r.seg
	defer func() {
		if r.reserved {
			c.alloc.release(r.newLoc, r.written && !r.used)
		}
	}()
	published := false
	hidden := false // the mappers dropped the entry (StepHideMappers)
	for _, st := range steps {
		if !published && (st.Kind == table.StepCommitSelf || st.Kind == table.StepCommitSharers) {
			// From the first commit until the answer, read faults on
			// the segment wait: they would see an entry that some
			// agent has not been told of (see Fault).
			published = true
			defer c.lockPublish(d.Family, seg, true)()
		}
		switch st.Kind {
		case table.StepReserve:
			loc, err := c.takeSlot(ctx, d.SegmentSize)
			if err != nil {
				return protocol.Reply{}, err
			}
			r.newLoc, r.reserved = loc, true

		case table.StepCopyOld:
			r.written = true
			if err := c.copySlot(ctx, r.e, r.newLoc, d.SegmentSize); err != nil {
				return protocol.Reply{}, err
			}

		case table.StepStage:
			// The slot is the stage's now: its commit, or the
			// agent's re-attaching, gives it back.
			sw := stagedWrite{agent: r.f.Agent, disk: d.ID, fam: d.Family, seg: seg, loc: r.newLoc, old: r.e, plan: r.plan, bits: r.bits, noFlush: r.deferred}
			if st.InPlace {
				// The agent writes Old's own slot: it stays
				// reserved until the commit, lest it be freed
				// and handed out while the write is on its way.
				sw.loc, sw.inPlace = r.e.Loc, true
				c.alloc.reserve(sw.loc)
			}
			c.stage.mu.Lock()
			c.stage.mu.next++
			tok := c.stage.mu.next
			sw.tok = tok
			c.stage.mu.writes[tok] = sw
			stage := &protocol.Stage{Loc: sw.loc, Token: tok, Sparse: st.Sparse, FillRest: st.FillRest, NoFlush: r.deferred}
			if st.From {
				stage.From = r.e // the agent reads the rest from Old
				stage.From.State &^= table.NoWrite
			}
			rep := protocol.Reply{First: seg, Stage: stage}
			if cl := c.stage.mu.inPlace[segKey{d.ID, seg}]; sw.inPlace && cl != nil {
				cl.tok, cl.rep = tok, rep
			}
			c.stage.mu.Unlock()
			r.reserved = false
			return rep, nil

		case table.StepCommitSelf:
			if err := c.commitSelf(ctx, r, st); err != nil {
				return protocol.Reply{}, err
			}

		case table.StepCommitSharers:
			if err := c.commitSharers(ctx, r); err != nil {
				return protocol.Reply{}, err
			}

		case table.StepTellSharers:
			if err := c.tellSharers(ctx, r); err != nil {
				return protocol.Reply{}, err
			}

		case table.StepHideMappers:
			var err error
			if hidden, err = c.hideMappers(ctx, d, seg); err != nil {
				return protocol.Reply{}, err
			}

		case table.StepTellMappers:
			if err := c.moveMappers(ctx, d, seg, r.target(st.Entry), hidden); err != nil {
				return protocol.Reply{}, err
			}

		case table.StepAnswer:
			return protocol.Reply{First: seg, Entries: []table.Entry{r.target(st.Entry)}, Deferred: r.deferred && published}, nil

		case table.StepFail:
			return protocol.Reply{}, fmt.Errorf("%q segment %d is %v: %w", d.Name, seg, r.e.State, protocol.ErrIO)
		}
	}
	return protocol.Reply{}, fmt.Errorf("fault steps end without an answer: %w", protocol.ErrBadRequest)
}

// commitSelf commits the faulting disk's entry and its slot counts (a
// StepCommitSelf).
func (c *Controller) commitSelf(ctx context.Context, r *faultRun, st table.Step) error {
	if r.deferred {
		return c.deferSelf(ctx, r, st)
	}
	d, seg := r.d, r.seg
	ne := r.target(st.Entry)
	var refsAfter uint32
	fr := c.newFreeing()
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		if st.IfSame {
			// An in-place fill is still good only while the entry
			// is the one the agent filled against: another fill's
			// commit or a copy-on-write came first otherwise.
			got, err := tx.Entry(d.ID, seg)
			if err != nil {
				return err
			}
			if !sameEntry(got, r.e) {
				return protocol.ErrStale
			}
			ne = table.Filled(got, r.bits, r.n)
		}
		if st.IfShared {
			// A staged write's move is still wanted only while the
			// old slot is shared: if it has become the disk's alone
			// (its sharers moved off by a reverse copy, or
			// deleted), another agent may already write it in
			// place, and freeing it here would pull it from under
			// that agent. The write starts again and finds the
			// entry writable.
			got, err := tx.Entry(d.ID, seg)
			if err != nil {
				return err
			}
			if !sameEntry(got, r.e) {
				return protocol.ErrStale
			}
			if n, err := shareCount(tx, d.ID, seg, got); err != nil {
				return err
			} else if n < 2 {
				return protocol.ErrStale
			}
		}
		if err := tx.SetEntries(d.ID, seg, []table.Entry{ne}); err != nil {
			return err
		}
		// Every slot the old entry names and the new one does not
		// loses its reference (and is freed if its other sharers
		// went away meanwhile); New gains one.
		if err := moveRefs(tx, r.e, ne, fr); err != nil {
			return err
		}
		if st.IfSame {
			// A snapshot since the stage shares the slot now: the
			// agents get it No-write.
			var err error
			refsAfter, err = shareCount(tx, d.ID, seg, ne)
			return err
		}
		return nil
	})
	if errors.Is(err, protocol.ErrStale) {
		fr.finish(ctx, nil) // nothing was freed
		return err
	}
	fr.finish(ctx, err)
	if err != nil {
		c.unsettled(ctx, seg, d)
		return err
	}
	if st.NewRefs > 0 {
		r.used = true
	}
	if st.IfSame {
		r.e = effective(ne, refsAfter) // what the answer and the agents get
	}
	return nil
}

// deferSelf is commitSelf for a change kept in memory until the disk is
// flushed (pending.go): the same checks, against the entry as agents
// have it; no store commit.
func (c *Controller) deferSelf(ctx context.Context, r *faultRun, st table.Step) error {
	d, seg := r.d, r.seg
	ne := r.target(st.Entry)
	for look := 0; ; look++ {
		var stored *table.Entry
		// A change kept in memory for the segment is what agents
		// have; neither its slot nor its table page is shared then,
		// since whatever shares them (a snapshot, a clone) takes the
		// family exclusively, which commits the changes first. So
		// the store need not be read (the first look only: if the
		// change was committed or dropped meanwhile, it is read).
		cur, ok := c.pendingEntry(d.Family, d.ID, seg)
		shared := false
		if !ok || look > 0 {
			if err := c.store.View(ctx, func(tx *meta.Tx) error {
				got, err := tx.Entry(d.ID, seg)
				if err != nil {
					return err
				}
				stored = &got
				cur = c.overlay(d.Family, d.ID, seg, got)
				if (st.IfShared || st.IfSame) && cur.Mapped() {
					n, err := tx.Refs(cur.Loc)
					if err != nil {
						return err
					}
					pageShared, err := tx.PageShared(d.ID, seg)
					shared = pageShared || int(n)+c.refsDelta(d.Family, seg, cur.Loc) > 1
					return err
				}
				return nil
			}); err != nil {
				return err
			}
		}
		switch {
		case st.IfSame && !sameEntry(cur, r.e):
			return protocol.ErrStale
		case st.IfSame:
			ne = table.Filled(cur, r.bits, r.n)
		case st.IfShared && (!sameEntry(cur, r.e) || !shared):
			return protocol.ErrStale
		}
		gone, err := c.deferSelfChange(ctx, r, st, stored, ne, shared)
		if gone {
			continue
		}
		return err
	}
}

// deferSelfChange keeps deferSelf's change ne in memory, or commits it if
// another agent maps the disk now. stored is the entry the store holds, nil
// if it was not read; then gone reports that the change kept for the
// segment is gone, and the store must be read.
func (c *Controller) deferSelfChange(ctx context.Context, r *faultRun, st table.Step, stored *table.Entry, ne table.Entry, shared bool) (gone bool, err error) {
	d, seg := r.d, r.seg
	var slot *table.Location
	if r.reserved {
		ne.Slots(func(l table.Location) {
			if l == r.newLoc {
				slot = &r.newLoc
			}
		})
	}
	kept, gone := c.deferChange(r.f.Agent, d, seg, stored, ne, slot)
	if gone {
		return true, nil
	}
	if !kept {
		// Another agent maps the disk now: commit, after the staged
		// data the agent did not flush.
		r.deferred = false
		if r.written {
			ct, err := c.container(ctx, r.newLoc.Container)
			if err == nil {
				err = ct.Flush()
			}
			if err != nil {
				return false, fmt.Errorf("flush %v: %w: %w", r.newLoc, protocol.ErrIO, err)
			}
		}
		return false, c.commitSelf(ctx, r, st)
	}
	if slot != nil {
		// The change holds the reservation until its commit.
		r.reserved, r.used = false, true
	}
	if st.IfSame {
		// A snapshot since the stage (it committed what was kept in
		// memory) shares the slot now: the agents get it No-write.
		r.e = effective(ne, map[bool]uint32{false: 1, true: 2}[shared])
	}
	return false, nil
}

// findSharers finds the other disks that map the faulting disk's slot:
// only disks of the same family share slots, and always at the same
// segment index.
//
// layered reports that some entry names the slot as a layer under its
// own: then no sharers are returned.
func (c *Controller) findSharers(ctx context.Context, r *faultRun, refs uint32) (layered bool, err error) {
	d, seg, e := r.d, r.seg, r.e
	var sharers []meta.Disk
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		for _, o := range ds {
			if o.ID == d.ID || o.Family != d.Family || seg >= o.Segments() {
				continue
			}
			got, err := tx.Entry(o.ID, seg)
			if err != nil {
				return err
			}
			if got.Mapped() && got.Loc == e.Loc {
				sharers = append(sharers, o)
			}
			got.Slots(func(l table.Location) {
				if l == e.Loc && got.Loc != e.Loc {
					layered = true
				}
			})
		}
		return nil
	}); err != nil {
		return false, err
	}
	if layered {
		return true, nil
	}
	// refs counts table pages (the faulting disk's own, and the
	// sharers'), and sharers may share pages among themselves: so at
	// least refs-1 sharers, and at least one.
	if len(sharers) == 0 || uint32(len(sharers)) < refs-1 {
		return false, fmt.Errorf("slot %v has %d references but %d sharers besides %q: %w (run check)", e.Loc, refs, len(sharers), d.Name, meta.ErrCorrupt)
	}
	r.sharers = sharers
	return false, nil
}

// moved is the entry the sharers of a reverse-delta copy get: the copy,
// No-write while it is still shared.
func (r *faultRun) moved() table.Entry { return table.At(r.newLoc, len(r.sharers) > 1) }

// commitSharers moves every sharer to the copy (a StepCommitSharers).
func (c *Controller) commitSharers(ctx context.Context, r *faultRun) error {
	moved := r.moved()
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		for _, o := range r.sharers {
			if err := tx.SetEntries(o.ID, r.seg, []table.Entry{moved}); err != nil {
				return err
			}
		}
		if err := tx.SetRefs(r.newLoc, uint32(len(r.sharers))); err != nil {
			return err
		}
		return tx.SetRefs(r.e.Loc, 1)
	})
	if err != nil {
		c.unsettled(ctx, r.seg, append(r.sharers, r.d)...)
		return err
	}
	r.used = true
	return nil
}

// tellSharers moves the sharers' agents, Blocking (a StepTellSharers):
// reads of the original slot made under the old entries finish before the
// faulting disk writes to it. If one does not confirm, the faulting disk
// stays No-write (its slot now has one reference, so a later fault would
// clear it: the agent that failed must be fenced first; see broadcast).
// Every sharer's agents are told all the same, even after one failed: the
// move is committed, and an agent never told of a sharer's move would go
// on reading the original slot for it after that later fault's writes.
func (c *Controller) tellSharers(ctx context.Context, r *faultRun) error {
	moved := r.moved()
	errs := make([]error, len(r.sharers))
	var wg sync.WaitGroup
	for i, o := range r.sharers {
		wg.Go(func() {
			cmd := protocol.SetEntry{Disk: protocol.DiskID(o.ID), First: r.seg, Entries: []table.Entry{moved}, Blocking: true}
			if err := c.broadcast(ctx, o.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntry(ctx, cmd) }); err != nil {
				errs[i] = fmt.Errorf("reverse-delta: move %q off %v: %w", o.Name, r.e.Loc, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// moveMappers sends a committed entry to every agent mapping d and
// waits for them: after a copy-on-write or an allocation, none of them may
// read the old location (or zeros) once the faulting agent's retried write
// has landed and been acknowledged. The faulting agent is told too: the
// fault's reply alone would leave its other I/O on the segment (reads on
// other connections) at the old location until the reply is installed, or
// for longer if the agent drops it (a command reached the table while the
// fault was out), while another agent's write to the new location may
// already have been acknowledged. If one fails, so does the fault: the
// write is not done, and what the others read is what the disk held before
// it.
//
// With more than one agent, a writable entry goes out in two rounds: first
// NoWrite to all, then writable. Sent writable at once, it would let the
// first agent to install it write the new location, and acknowledge that,
// while another agent (slow, or cut off until its lease runs out) still
// reads the old one. Not if the agents dropped the entry already (hidden,
// by hideMappers): none reads the old one any more.
func (c *Controller) moveMappers(ctx context.Context, d meta.Disk, seg uint64, e table.Entry, hidden bool) error {
	set := func(e table.Entry) error {
		cmd := protocol.SetEntry{Disk: protocol.DiskID(d.ID), First: seg, Entries: []table.Entry{e}}
		if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntry(ctx, cmd) }); err != nil {
			return fmt.Errorf("%q segment %d: %w: %w", d.Name, seg, protocol.ErrIO, err)
		}
		return nil
	}
	if !hidden && e.Mapped() && e.State&table.NoWrite == 0 && len(c.mappers(d.ID, "")) > 1 {
		ro := e
		ro.State |= table.NoWrite
		if err := set(ro); err != nil {
			return err
		}
	}
	return set(e)
}

// hideMappers makes every agent mapping d drop its entry for segment seg
// (Invalid, Blocking) and waits for them, if more than one maps d (a
// StepHideMappers, before the commit of a staged write is told): the
// written data shows through the new entry, and an agent told it first
// would read the write while another (slow, or cut off until its lease
// runs out) still read what the segment held before; the write would
// be seen, then unseen. Once hidden, reads fault and wait for the answer
// (the segment's publish lock). A lone agent is the faulting one: what
// it reads before and after hearing of the entry is in that order.
// hidden reports whether the agents were told.
func (c *Controller) hideMappers(ctx context.Context, d meta.Disk, seg uint64) (hidden bool, err error) {
	if len(c.mappers(d.ID, "")) < 2 {
		return false, nil
	}
	cmd := protocol.SetEntryState{Disk: protocol.DiskID(d.ID), First: seg, Count: 1, State: table.Invalid, On: true, Blocking: true}
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }); err != nil {
		return false, fmt.Errorf("%q segment %d: %w: %w", d.Name, seg, protocol.ErrIO, err)
	}
	return true, nil
}

// unsettled makes every agent that maps one of disks drop its entry
// for segment seg (Invalid, Blocking), after an Update of that entry
// failed. A failed Update may have committed all the same (the fsync of a
// commit can fail after its pages reached the disk), so the entries the
// agents hold, which the commit would have replaced, cannot be trusted:
// a sharer left reading a slot that the commit gave to the faulting disk
// alone would see that disk's next writes, and an agent left with a Zero
// entry would not see them. Dropped, they are loaded again from the store
// by the next fault, whichever way the commit went. A failure to tell an
// agent is only logged: the fault fails anyway.
func (c *Controller) unsettled(ctx context.Context, seg uint64, disks ...meta.Disk) {
	for _, d := range disks {
		cmd := protocol.SetEntryState{Disk: protocol.DiskID(d.ID), First: seg, Count: 1, State: table.Invalid, On: true, Blocking: true}
		if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }); err != nil {
			c.logger.Warn("drop entries after a failed commit", "disk", d.Name, "segment", seg, "err", err)
		}
	}
}

// stagedWrite is a write handed to an agent and not yet committed: the
// agent writes the segment to loc (copying the rest of a partial write
// from old) and then commits.
type stagedWrite struct {
	agent string
	disk  meta.DiskID
	fam   meta.DiskID // disk's family
	seg   uint64
	loc   table.Location // where the agent writes (free slots are zero)
	old   table.Entry    // the entry the disk maps now
	plan  table.Plan     // what the commit carries out (table.CommitStaged)
	bits  table.Bits     // the sub-blocks the write touches
	// inPlace: loc is old's own slot (a fill-in), not a reserved new
	// one. One agent at a time fills a segment in place (claimInPlace).
	inPlace bool
	tok     uint64
	// noFlush: the agent was told it need not flush loc (Stage.NoFlush).
	noFlush bool
}

// segKey names a segment of a disk.
type segKey struct {
	disk meta.DiskID
	seg  uint64
}

// takeStage removes the staged write of token tok if agent owns it, for
// segment seg of disk.
func (c *Controller) takeStage(tok uint64, agent string, disk meta.DiskID, seg uint64) (stagedWrite, bool) {
	c.stage.mu.Lock()
	defer c.stage.mu.Unlock()
	sw, ok := c.stage.mu.writes[tok]
	if !ok || sw.agent != agent || sw.disk != disk || sw.seg != seg {
		return stagedWrite{}, false
	}
	delete(c.stage.mu.writes, tok)
	return sw, true
}

// endInPlace ends an in-place stage, once the agent's write is over (it
// committed, gave the stage back, or re-attached): the segment may be
// filled in place again, and the slot's reservation goes. If the slot was
// freed meanwhile (its disk deleted, say) it may hold the agent's write
// after its punch: its container's free slots are zeroed again before
// their next allocation.
func (c *Controller) endInPlace(ctx context.Context, sw stagedWrite) {
	c.stage.mu.Lock()
	k := segKey{sw.disk, sw.seg}
	if cl := c.stage.mu.inPlace[k]; cl != nil && cl.tok == sw.tok {
		close(cl.done)
		delete(c.stage.mu.inPlace, k)
	}
	c.stage.mu.Unlock()
	// A commit kept in memory (see pending.go) counts too: the slot of a
	// copy-on-write not yet durable is the one a fill writes next. Were
	// it taken for free, its container's free slots would all be zeroed
	// again before the next allocation. The change is looked at before
	// the store: one flushed in between is counted twice, one dropped
	// in between marks the slot dirty itself.
	if c.refsDelta(sw.fam, sw.seg, sw.loc) > 0 {
		c.alloc.release(sw.loc, false)
		return
	}
	var refs uint32
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		refs, err = tx.Refs(sw.loc)
		return err
	})
	c.alloc.release(sw.loc, err != nil || refs == 0)
}

// dropStage ends the staged write of token tok if agent owns it, for
// segment seg of disk: its slot goes back to the free slots, with
// whatever the agent wrote in it.
func (c *Controller) dropStage(ctx context.Context, tok uint64, agent string, disk meta.DiskID, seg uint64) {
	if sw, ok := c.takeStage(tok, agent, disk, seg); ok {
		c.endStage(ctx, sw)
	}
}

// endStage ends a staged write taken from the stage table and not
// committed.
func (c *Controller) endStage(ctx context.Context, sw stagedWrite) {
	if sw.inPlace {
		c.endInPlace(ctx, sw)
		return
	}
	c.alloc.release(sw.loc, true)
}

// commit commits a staged write: the disk's entry moves from the shared
// slot to the staged one, which the agent has written (and, for a partial
// write, filled from the shared slot) and flushed; or, for a fill in
// place, records that the entry's slot holds the sub-blocks written. If
// the entry changed meanwhile (a discard, a delete, another write's
// copy-on-write or fill), the staged slot is given back and the agent is
// told to start again. The caller holds the family lock shared and the
// segment's lock.
func (c *Controller) commit(ctx context.Context, f protocol.Fault, d meta.Disk) (protocol.Reply, error) {
	sw, ok := c.takeStage(f.Token, f.Agent, d.ID, f.Segment)
	if !ok {
		// The agent may be asking again because the answer to its
		// commit was lost: it gets that answer again. (The first
		// commit held the segment's lock until it had its outcome.)
		if o, ok := c.commitDone(f.Token, f.Agent, d.ID, f.Segment); ok {
			c.logger.Info("commit asked again; answered as before", "agent", f.Agent, "disk", d.Name, "segment", f.Segment, "err", o.err)
			return o.rep, o.err
		}
		return protocol.Reply{}, fmt.Errorf("commit of %q segment %d: %w", d.Name, f.Segment, protocol.ErrStale)
	}
	rep, err := c.commitStage(ctx, f, d, sw)
	if err != nil && !isStale(err) {
		// The commit may have landed (a store commit cut off, or
		// landed and an agent not told): the token is spent, and an
		// agent that asked again and heard ErrStale would write again,
		// after writes that came since. The write fails instead, and
		// its error must not read as one the agent retries.
		err = &spentError{msg: fmt.Sprintf("commit of %q segment %d: %v", d.Name, f.Segment, err), causes: keptCauses(err)}
	}
	if isStale(err) {
		return protocol.Reply{}, fmt.Errorf("commit of %q segment %d: %w", d.Name, f.Segment, err)
	}
	c.noteCommit(f.Token, commitOutcome{agent: f.Agent, disk: d.ID, seg: f.Segment, rep: rep, err: err})
	return rep, err
}

// isStale reports whether a commit failed for certain before it changed
// anything: its entry had moved on (ErrStale, from the commit step itself,
// never wrapped with ErrIO).
func isStale(err error) bool {
	return errors.Is(err, protocol.ErrStale) && !errors.Is(err, protocol.ErrIO)
}

// commitStage carries out commit for the staged write sw, taken from the
// stage table.
func (c *Controller) commitStage(ctx context.Context, f protocol.Fault, d meta.Disk, sw stagedWrite) (protocol.Reply, error) {
	// The agent has written the staged slot: on failure a new slot goes
	// back to the free slots with that data in it.
	r := &faultRun{f: f, d: d, seg: sw.seg, e: sw.old, plan: sw.plan, bits: sw.bits, n: table.SubBlockCount(d.SegmentSize),
		newLoc: sw.loc, reserved: !sw.inPlace, written: true, deferred: c.mayDefer(d, sw.seg)}
	if sw.noFlush && !r.deferred {
		// A second agent mapped the disk since the stage: the commit
		// is durable at once, so the staged data must be first.
		ct, err := c.container(ctx, sw.loc.Container)
		if err == nil {
			err = ct.Flush()
		}
		if err != nil {
			c.endStage(ctx, sw)
			return protocol.Reply{}, fmt.Errorf("flush %v: %w: %w", sw.loc, protocol.ErrIO, err)
		}
	}
	if sw.inPlace {
		defer c.endInPlace(ctx, sw)
	}
	return c.run(ctx, r, table.CommitStaged(sw.plan))
}

// commitKeep is how many commit outcomes the controller remembers: far
// more than the commits that can be under way while an agent retries one.
const commitKeep = 1 << 14

// commitOutcome is the answer to a commit, kept for the agent that asks
// again because the answer was lost on the way (a connection cut, a
// deadline passed while the agent was stopped).
type commitOutcome struct {
	agent string
	disk  meta.DiskID
	seg   uint64
	rep   protocol.Reply
	err   error
}

// noteCommit remembers the outcome of the commit of token tok, forgetting
// the oldest beyond commitKeep.
func (c *Controller) noteCommit(tok uint64, o commitOutcome) {
	c.stage.mu.Lock()
	defer c.stage.mu.Unlock()
	if c.stage.mu.order == nil {
		c.stage.mu.order = make([]uint64, commitKeep)
	}
	i := c.stage.mu.nDone % commitKeep
	if c.stage.mu.nDone >= commitKeep {
		delete(c.stage.mu.done, c.stage.mu.order[i])
	}
	c.stage.mu.order[i] = tok
	c.stage.mu.nDone++
	c.stage.mu.done[tok] = o
}

// commitDone returns the remembered outcome of the commit of token tok by
// agent for segment seg of disk.
func (c *Controller) commitDone(tok uint64, agent string, disk meta.DiskID, seg uint64) (commitOutcome, bool) {
	c.stage.mu.Lock()
	defer c.stage.mu.Unlock()
	o, ok := c.stage.mu.done[tok]
	if !ok || o.agent != agent || o.disk != disk || o.seg != seg {
		return commitOutcome{}, false
	}
	return o, true
}

// MaxDiscard is the most segments one discard fault may cover.
const MaxDiscard = 1 << 16

// discard returns segments [first, first+n) of d to Zero, freeing the
// slots no one else references. The caller holds the family lock
// exclusively.
func (c *Controller) discard(ctx context.Context, d meta.Disk, first, n uint64) (protocol.Reply, error) {
	return c.void(ctx, d, first, n, table.ZeroEntry)
}

// void is discard with the entries set to to: ZeroEntry (discard) or
// ErrorEntry (SetError), neither of which holds a slot.
func (c *Controller) void(ctx context.Context, d meta.Disk, first, n uint64, to table.Entry) (protocol.Reply, error) {
	if n > MaxDiscard {
		return protocol.Reply{}, fmt.Errorf("discard of %d segments (at most %d at once): %w", n, MaxDiscard, protocol.ErrBadRequest)
	}
	// Every agent mapping the disk, the asking one included, drops the
	// slots first (Invalid: restrictive, unlike Zero, which lets reads
	// through), waiting for I/O to them.
	inval := protocol.SetEntryState{Disk: protocol.DiskID(d.ID), First: first, Count: n, State: table.Invalid, On: true, Blocking: true}
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, inval) }); err != nil {
		return protocol.Reply{}, fmt.Errorf("discard on %q: %w", d.Name, err)
	}
	zeros := make([]table.Entry, n)
	for i := range zeros {
		zeros[i] = to
	}

	fr := c.newFreeing()
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		// Shared pages first become the disk's own, so that each
		// entry's slot count is the one to drop.
		if err := tx.Unshare(d.ID, first, n); err != nil {
			return err
		}
		es, err := tx.Entries(d.ID, first, n)
		if err != nil {
			return err
		}
		for _, e := range es {
			if err := dropRefs(tx, e, fr); err != nil {
				return err
			}
		}
		return tx.SetEntries(d.ID, first, zeros)
	})
	fr.finish(ctx, err)
	if err != nil {
		return protocol.Reply{}, err
	}
	// Now the agents may read zeros without asking. A failure here only
	// costs them a fault each.
	set := protocol.SetEntry{Disk: protocol.DiskID(d.ID), First: first, Entries: zeros}
	_ = c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntry(ctx, set) })
	return protocol.Reply{First: first, Entries: zeros}, nil
}

// spentError is the error of a commit that may have landed, or of a
// fill in place taken back (breakInPlace): ErrIO, and the causes of the
// failure but those an agent retries on (keptCauses).
type spentError struct {
	msg    string
	causes []error
}

func (e *spentError) Error() string   { return e.msg + ": " + protocol.ErrIO.Error() }
func (e *spentError) Unwrap() []error { return append([]error{protocol.ErrIO}, e.causes...) }

// retried are the errors that an agent's fault is sent again on (see
// transport's codeOf): the failure of a commit that may have landed must
// not wrap them.
var retried = []error{
	protocol.ErrUnavailable, protocol.ErrFenced, protocol.ErrStale, ErrUnknownAgent, ErrClosed,
	context.Canceled, context.DeadlineExceeded, meta.ErrUnreachable, meta.ErrClosed, meta.ErrLeadershipLost,
}

// keptCauses returns the errors err wraps at the ends of its chains
// (those that wrap nothing), but the retried ones: what a spentError may
// still be matched with (a crash injected in tests, an errno).
func keptCauses(err error) []error {
	var out []error
	var walk func(error)
	walk = func(e error) {
		switch u := e.(type) { //nolint:errorlint // walking the chain itself
		case interface{ Unwrap() error }:
			if w := u.Unwrap(); w != nil {
				walk(w)
				return
			}
		case interface{ Unwrap() []error }:
			for _, w := range u.Unwrap() {
				walk(w)
			}
			return
		}
		for _, r := range retried {
			if errors.Is(e, r) {
				return
			}
		}
		out = append(out, e)
	}
	walk(err)
	return out
}
