package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"segmap/internal/container"
	"segmap/internal/metrics"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// maxRetries bounds how often one segment I/O may fault before it fails:
// each fault is answered with entries that allow it unless a command keeps
// racing it, so a few retries are plenty.
const maxRetries = 64

// Disk is an open virtual disk. Its methods are safe for concurrent use.
type Disk struct {
	a *Agent
	// opens counts the Opens not yet Closed; guarded by a.mu.
	opens int
	// info is what the agent knows of the disk; replaced (under mu) by
	// reset, read without a lock on the data path.
	info atomic.Pointer[protocol.Disk]

	// maps counts the map changes the controller answered as kept in
	// memory (protocol.Reply.Deferred) and those a flush made durable;
	// lives counts the times the disk lost changes to a controller
	// that went away with them (see Lives).
	maps struct {
		deferred, durable atomic.Uint64
	}
	lives atomic.Uint64

	// met are the disk's metrics (nil: none).
	met *metrics.AgentDisk

	// mu guards the table and the disk's state. The data path takes it
	// shared, to look an entry up; commands take it exclusively.
	mu struct {
		sync.RWMutex
		tab *table.Table
		// seq counts changes to the table by commands, and cmds holds
		// the segments the last cmdLog of them changed (command s at
		// cmds[s%cmdLog]); a fault reply is installed only if no
		// command since the fault went out changed a segment the reply
		// covers. A command to other segments (another fault's
		// allocation, say) leaves the reply good.
		seq  uint64
		cmds [cmdLog]segRange
		// cur is the current epoch: I/O let through now is counted in
		// it. pending holds earlier epochs that still had I/O in
		// flight when they were closed.
		cur      *epoch
		pending  []*epoch
		waiters  int // goroutines waiting on wake
		quiesced bool
		gone     bool
		// faults holds the segments with faults out, so that of two
		// replies for one segment the one computed first, if it
		// comes back last, is not installed over the other.
		faults map[uint64]*segFaults
		// loads counts the fault replies installed and the entries
		// invalidated, and loaded holds the segments the last loadLog
		// of them changed (as cmds does for commands): a reply to a
		// read fault on a range is not installed over any of them.
		loads  uint64
		loaded [loadLog]segRange
		// wake is closed (and replaced) when an epoch drains or when
		// quiesced or gone change.
		wake chan struct{}
	}
}

// cmdLog is how many commands a Disk remembers the segments of: a fault
// reply that was out across more commands than that is dropped.
const cmdLog = 64

// loadLog is how many installed replies and invalidations a Disk
// remembers the segments of, for installRange.
const loadLog = 64

// segRange is the segments [first, end) a command changed.
type segRange struct{ first, end uint64 }

// wholeTable is the range of a command that replaced the whole table.
var wholeTable = segRange{0, math.MaxUint64}

// segFaults counts the faults out on one segment and the fault replies
// installed for it while any were out.
type segFaults struct {
	out int
	gen uint64
}

// epoch counts the I/O in flight that started while it was current.
type epoch struct {
	gen uint64
	n   atomic.Int64
	// closed is set when a command ended the epoch; only then does the
	// I/O that drains it need to wake anyone.
	closed atomic.Bool
}

func newDisk(a *Agent, info protocol.Disk) *Disk {
	d := &Disk{a: a, met: a.met.Disk(info.Name)}
	d.info.Store(&info)
	d.mu.tab = table.New(int(info.Segments()), table.InvalidEntry)
	d.mu.cur = &epoch{}
	d.mu.wake = make(chan struct{})
	d.mu.faults = make(map[uint64]*segFaults)
	return d
}

// Info returns what the agent knows of the disk.
func (d *Disk) Info() protocol.Disk { return *d.info.Load() }

// Size returns the disk's size in bytes.
func (d *Disk) Size() uint64 { return d.Info().Size }

// ReadOnly reports whether the disk refuses writes (a snapshot).
func (d *Disk) ReadOnly() bool { return d.Info().ReadOnly }

func (d *Disk) broadcastLocked() {
	close(d.mu.wake)
	d.mu.wake = make(chan struct{})
}

// bumpLocked closes the current epoch and starts a new one. It returns the
// closed epoch's generation: I/O of that generation or older was let through
// before the caller's change.
func (d *Disk) bumpLocked() uint64 {
	old := d.mu.cur
	old.closed.Store(true)
	if old.n.Load() > 0 {
		d.mu.pending = append(d.mu.pending, old)
	}
	d.mu.cur = &epoch{gen: old.gen + 1}
	return old.gen
}

// drainedLocked reports whether no I/O of generation g or older is in
// flight, forgetting the epochs that have drained.
func (d *Disk) drainedLocked(g uint64) bool {
	live := d.mu.pending[:0]
	drained := true
	for _, ep := range d.mu.pending {
		if ep.n.Load() > 0 {
			live = append(live, ep)
			if ep.gen <= g {
				drained = false
			}
		}
	}
	clear(d.mu.pending[len(live):])
	d.mu.pending = live
	return drained
}

// waitDrained waits until no I/O of generation g or older is in flight.
func (d *Disk) waitDrained(ctx context.Context, g uint64) error {
	for {
		d.mu.Lock()
		if d.drainedLocked(g) {
			d.mu.Unlock()
			return nil
		}
		wake := d.mu.wake
		d.mu.waiters++
		d.mu.Unlock()
		var err error
		select {
		case <-wake:
		case <-ctx.Done():
			err = ctx.Err()
		}
		d.mu.Lock()
		d.mu.waiters--
		d.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// begin looks up segment seg for op on the sub-blocks span. If the I/O may
// go to storage it is counted in flight in the returned epoch, and the
// caller must call end(ep) when the container call returns.
func (d *Disk) begin(ctx context.Context, seg uint64, op table.Op, span table.Bits) (e table.Entry, dec table.Decision, ep *epoch, seq uint64, err error) {
	if !d.a.leaseHeld() {
		t0 := time.Now()
		d.met.Held(metrics.HoldLease, 1, 0)
		err := d.a.waitLease(ctx)
		d.met.Held(metrics.HoldLease, -1, time.Since(t0))
		if err != nil {
			return e, dec, nil, 0, err
		}
	}
	d.mu.RLock()
	if d.mu.quiesced && !d.mu.gone {
		t0 := time.Now()
		d.met.Held(metrics.HoldQuiesced, 1, 0)
		defer func() { d.met.Held(metrics.HoldQuiesced, -1, time.Since(t0)) }()
	}
	for d.mu.quiesced && !d.mu.gone {
		wake := d.mu.wake
		d.mu.RUnlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return e, dec, nil, 0, ctx.Err()
		}
		d.mu.RLock()
	}
	defer d.mu.RUnlock()
	if d.mu.gone {
		return e, dec, nil, 0, ErrGone
	}
	if seg >= uint64(d.mu.tab.Len()) {
		return e, dec, nil, 0, fmt.Errorf("segment %d of %d: %w", seg, d.mu.tab.Len(), ErrRange)
	}
	e = d.mu.tab.Entry(int(seg))
	dec = table.DecideSpan(e, op, span)
	if dec.Action == table.Proceed {
		// The epoch cannot be closed while the read lock is held, so
		// the command that closes it will see this count.
		ep = d.mu.cur
		ep.n.Add(1)
	}
	return e, dec, ep, d.mu.seq, nil
}

// end marks an I/O of epoch ep finished.
func (d *Disk) end(ep *epoch) {
	if ep.n.Add(-1) == 0 && ep.closed.Load() {
		// The last I/O of a closed epoch: a command may be waiting.
		d.mu.Lock()
		if d.mu.waiters > 0 {
			d.broadcastLocked()
		}
		d.mu.Unlock()
	}
}

// faultOut notes a fault on seg going out and returns the generation of
// the segment's installed replies; faultIn notes its end.
func (d *Disk) faultOut(seg uint64) uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	sf := d.mu.faults[seg]
	if sf == nil {
		sf = &segFaults{}
		d.mu.faults[seg] = sf
	}
	sf.out++
	return sf.gen
}

func (d *Disk) faultIn(seg uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if sf := d.mu.faults[seg]; sf != nil {
		if sf.out--; sf.out <= 0 {
			delete(d.mu.faults, seg)
		}
	}
}

// changedLocked reports whether a command since seq changed a segment in
// rg (or may have: one too long ago to remember).
func (d *Disk) changedLocked(seq uint64, rg segRange) bool {
	if d.mu.seq-seq > cmdLog {
		return true
	}
	for s := seq + 1; s <= d.mu.seq; s++ {
		if c := d.mu.cmds[s%cmdLog]; c.first < rg.end && rg.first < c.end {
			return true
		}
	}
	return false
}

// recordLocked counts a command that changed the segments in rg.
func (d *Disk) recordLocked(rg segRange) {
	d.mu.seq++
	d.mu.cmds[d.mu.seq%cmdLog] = rg
}

// install applies the reply to a fault on segment seg if no command
// changed the segments it covers since seq and no other fault's reply was installed
// for seg since gen (faultOut), and reports whether it did. The controller
// resolves faults in parallel and its replies may come back in any order:
// a read fault answered before a write's copy on write, installed after
// it, would send reads back to the old slot after the write had been
// acknowledged.
func (d *Disk) install(seq, gen, seg uint64, r protocol.Reply) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mu.gone || r.First > uint64(d.mu.tab.Len()) || d.changedLocked(seq, segRange{r.First, r.First + uint64(len(r.Entries))}) ||
		d.checkEntries(r.Entries) != nil {
		return false
	}
	sf := d.mu.faults[seg]
	if sf == nil || sf.gen != gen {
		return false
	}
	// A reply that does not fit the table (it changed size) is dropped;
	// the I/O looks again and faults again.
	if d.mu.tab.SetEntry(int(r.First), r.Entries) != nil {
		return false
	}
	sf.gen++
	d.loadedLocked(segRange{r.First, r.First + uint64(len(r.Entries))})
	return true
}

// loadedLocked counts an installed reply or an invalidation that changed
// the segments in rg.
func (d *Disk) loadedLocked(rg segRange) {
	d.mu.loads++
	d.mu.loaded[d.mu.loads%loadLog] = rg
}

// installRange installs the reply r to a read fault on a range of
// segments, sent when the table's command count was seq and its load
// count was loads, and reports whether it installed r's first entry. It
// installs an entry only where the table still holds Invalid, no fault is
// out and no command, installed reply or invalidation since the fault went
// out touched the segment: a reply computed before a write's copy on
// write must not send reads back to the old slot. (install's generations
// do this for one segment; a range would need one per segment.) What it
// skips is loaded again by the next I/O, with a fault of its own.
func (d *Disk) installRange(seq, loads uint64, r protocol.Reply) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	end := r.First + uint64(len(r.Entries))
	if d.mu.gone || len(r.Entries) == 0 || end > uint64(d.mu.tab.Len()) || end < r.First ||
		d.mu.loads-loads > loadLog || d.checkEntries(r.Entries) != nil {
		return false
	}
	first := false
	for i, e := range r.Entries {
		seg := r.First + uint64(i)
		rg := segRange{seg, seg + 1}
		if d.mu.faults[seg] != nil || d.mu.tab.Entry(int(seg)).State&table.Invalid == 0 || d.changedLocked(seq, rg) {
			continue
		}
		touched := false
		for l := loads + 1; l <= d.mu.loads; l++ {
			if c := d.mu.loaded[l%loadLog]; c.first < rg.end && rg.first < c.end {
				touched = true
				break
			}
		}
		if touched {
			continue
		}
		if d.mu.tab.SetEntry(int(seg), []table.Entry{e}) != nil {
			return first
		}
		first = first || i == 0
	}
	return first
}

// invalidate makes seg's entry Invalid, so that the next I/O loads it
// afresh, and drops the replies to faults on it that are still out; an
// entry that is already keep (a command brought it) stays.
func (d *Disk) invalidate(seg uint64, keep table.Entry) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mu.gone || seg >= uint64(d.mu.tab.Len()) || d.mu.tab.Entry(int(seg)).Equal(keep) {
		return
	}
	_ = d.mu.tab.SetEntry(int(seg), []table.Entry{table.InvalidEntry}) // seg < Len, checked above
	if sf := d.mu.faults[seg]; sf != nil {
		sf.gen++
	}
	d.loadedLocked(segRange{seg, seg + 1})
}

// fault sends the fault f (its agent and disk filled in) and returns the
// reply.
func (d *Disk) fault(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
	f.Agent, f.Disk = d.a.name, d.Info().ID
	op, seg := f.Op, f.Segment
	t0 := time.Now()
	r, err := d.a.controller().Fault(ctx, f)
	d.met.Fault(time.Since(t0))
	if err != nil {
		return r, fmt.Errorf("%v fault on segment %d: %w", op, seg, err)
	}
	d.noteDeferred(r)
	return r, nil
}

// noteDeferred counts a reply whose map change the controller keeps in
// memory until the disk is flushed.
func (d *Disk) noteDeferred(r protocol.Reply) {
	if r.Deferred {
		d.maps.deferred.Add(1)
	}
}

// Lives counts the times the disk's map changes kept in memory were lost
// with their controller (the agent attached to another with some not yet
// flushed). Its clients may have read what those changes mapped, which
// the disk no longer holds: a connection opened in an earlier life must
// end, as if the server had crashed (nbdexport hangs up on it).
func (d *Disk) Lives() uint64 { return d.lives.Load() }

// lostMaps ends the disk's life if the controller it is leaving kept map
// changes of it in memory: called as the agent attaches to a controller.
func (d *Disk) lostMaps() {
	if g := d.maps.deferred.Load(); g != d.maps.durable.Load() {
		d.maps.durable.Store(g)
		d.lives.Add(1)
		slog.Warn("map changes not yet flushed were lost with the controller: ending the disk's connections", "agent", d.a.name, "disk", d.Info().Name)
	}
}

// ioKind is what segIO does with a piece of a segment.
type ioKind uint8

const (
	ioRead ioKind = iota
	ioWrite
	// ioZero writes zeros, but does nothing to a segment that is Zero.
	ioZero
)

// segIO does one I/O within segment seg: bytes [off, off+len(p)) of it.
func (d *Disk) segIO(ctx context.Context, kind ioKind, seg, off uint64, p []byte, segSize uint64) error {
	op := table.Write
	if kind == ioRead {
		op = table.Read
	}
	whole := kind == ioWrite && off == 0 && uint64(len(p)) == segSize
	span := table.SpanOf(segSize, off, uint64(len(p)))
	// faults counts replies that were installed and still did not let
	// the I/O through; dropped (stale) replies are bounded separately,
	// since they only mean that commands keep arriving.
	faults, dropped, refused := 0, 0, 0
	for {
		if faults == maxRetries || dropped == 16*maxRetries {
			return fmt.Errorf("segment %d: still faulting after %d faults: %w", seg, faults+dropped, protocol.ErrIO)
		}
		e, dec, ep, seq, err := d.begin(ctx, seg, op, span)
		if err != nil {
			return err
		}
		switch dec.Action {
		case table.Proceed:
			err := d.storageIO(ctx, kind, e, seg, off, p, segSize)
			d.end(ep)
			if errors.Is(err, container.ErrLeaseOver) {
				// Refused, so not done: done again under the
				// entries of a new lease.
				t0 := time.Now()
				d.met.Held(metrics.HoldStorageLease, 1, 0)
				err := d.a.waitStorageLease(ctx, refused, err)
				d.met.Held(metrics.HoldStorageLease, -1, time.Since(t0))
				if err != nil {
					return fmt.Errorf("segment %d: %w: %w", seg, protocol.ErrIO, err)
				}
				refused++
				continue
			}
			if err == nil && kind == ioRead && !d.a.leaseHeld() {
				// The lease lapsed while the read was out: what it
				// read may be stale. Read again under a new one.
				continue
			}
			return err
		case table.ReadZeros:
			clear(p)
			return nil
		case table.Fail:
			return fmt.Errorf("segment %d is %v: %w", seg, dec.Reason, protocol.ErrIO)
		}
		// Fault.
		fop := protocol.FaultOp(op)
		if kind == ioZero {
			if dec.Reason == table.Zero {
				return nil // already reads as zeros
			}
			if dec.Reason == table.Invalid {
				fop = protocol.FaultRead // load it first: it may be Zero
			}
		}
		d.mu.RLock()
		tab := d.mu.tab // replaced by a fence or a reset
		d.mu.RUnlock()
		f := protocol.Fault{Segment: seg, Count: 1, Op: fop, Reason: dec.Reason, Whole: whole}
		if fop == protocol.FaultWrite {
			// The bytes it writes: a partial entry's top may be
			// given just the sub-blocks they touch.
			f.Off, f.Len = off, uint64(len(p))
		}
		r, gen, err := d.sendFault(ctx, f)
		if err != nil {
			return err
		}
		if r.Stage != nil {
			done, err := d.staged(ctx, seg, off, p, segSize, r.Stage, seq, gen, tab)
			d.faultIn(seg)
			if done || err != nil {
				return err
			}
			dropped++
			continue
		}
		installed := d.install(seq, gen, seg, r)
		d.faultIn(seg)
		if installed {
			faults++
		} else {
			dropped++
		}
	}
}

// sendFault sends the fault f on one segment, noted out (faultOut) while
// it is, and checks the entries of the reply. gen is the segment's reply
// generation when it went out, for install. On success the fault is still
// noted out: the caller installs the reply (or makes its stage) and then
// calls faultIn.
func (d *Disk) sendFault(ctx context.Context, f protocol.Fault) (r protocol.Reply, gen uint64, err error) {
	seg := f.Segment
	gen = d.faultOut(seg)
	r, err = d.fault(ctx, f)
	if err == nil {
		err = d.checkEntries(r.Entries)
		if r.Stage != nil && err == nil {
			if err = d.checkEntries([]table.Entry{r.Stage.From}); err != nil {
				d.abandon(ctx, seg, r.Stage)
			}
		}
		if err != nil {
			err = fmt.Errorf("%v fault on segment %d: reply: %v: %w", f.Op, seg, err, protocol.ErrIO)
		}
	}
	if err != nil {
		d.faultIn(seg)
		return r, gen, err
	}
	return r, gen, nil
}

// staged does a staged write: p goes to the staged slot at off, the rest
// of the segment (for a partial write) being copied from the stage's From
// entry (through its layers, if it is partial), or, for a sparse stage,
// only the sub-blocks p touches (see writeSparse); and the slot is flushed
// (the data must be durable before the map points at it); then the
// controller is asked to commit the move. done is false if the write must
// start again: the commit came too late, or the segment changed before the
// copy could start.
//
// The I/O to the staged slot (and the copy's reads of the old one) is I/O
// in flight like any other: a command (a fence, a re-attach, a Blocking
// change) waits for it. And it is not made if the disk was fenced or reset
// since the fault was sent (its table is no longer tab): the controller
// forgets the stages of an agent that re-attaches, and the slot is free
// again (but for a fill in place, which it keeps for its commit, and
// which is abandoned then). A copy is not made either if a command changed the segment since
// the fault was sent: the old slot may have been freed (a discard, a
// delete) or moved to (a reverse copy) without waiting for the copy's
// reads, which such a command waits for only once they are counted. A
// stage not made is abandoned, so that the controller frees its slot.
func (d *Disk) staged(ctx context.Context, seg, off uint64, p []byte, segSize uint64, st *protocol.Stage, seq, gen uint64, tab *table.Table) (done bool, err error) {
	oc, err := d.a.container(ctx, st.Loc.Container)
	// srcs holds the containers of the slots From names.
	srcs := &cowSource{conts: map[uint32]container.Container{}}
	if st.Copies() {
		st.From.Slots(func(loc table.Location) {
			if _, ok := srcs.conts[loc.Container]; ok || err != nil {
				return
			}
			var src *openContainer
			if src, err = d.a.container(ctx, loc.Container); err == nil {
				srcs.conts[loc.Container] = src.c
			}
		})
	}
	if err != nil {
		d.abandon(ctx, seg, st)
		return false, err
	}
	d.mu.RLock()
	if d.mu.gone || d.mu.tab != tab || !d.a.leaseHeld() {
		gone := d.mu.gone
		d.mu.RUnlock()
		if gone {
			return false, ErrGone
		}
		if inPlace(st) {
			// The controller keeps a fill in place across a
			// re-attach, for its commit: it is given back now,
			// lest it hold the segment until another write
			// takes it back.
			d.abandon(ctx, seg, st)
		}
		return false, nil // start again
	}
	if st.Copies() && d.changedLocked(seq, segRange{seg, seg + 1}) {
		d.mu.RUnlock()
		d.abandon(ctx, seg, st)
		return false, nil // start again
	}
	ep := d.mu.cur
	ep.n.Add(1)
	d.mu.RUnlock()
	werr := func() error {
		defer d.end(ep)
		if st.Sparse {
			if err := writeSparse(srcs, oc.c, st, off, p, segSize); err != nil {
				return fmt.Errorf("staged write of segment %d: %w", seg, err)
			}
			if st.FillRest && st.Copies() {
				if err := fillRest(srcs, oc.c, st, off, uint64(len(p)), segSize); err != nil {
					return fmt.Errorf("staged write of segment %d: %w", seg, err)
				}
			}
		} else if st.Copies() {
			if err := copyAround(srcs, oc.c, st, off, p, segSize); err != nil {
				return fmt.Errorf("staged write of segment %d: %w", seg, err)
			}
		} else if _, err := oc.c.WriteAt(p, int64(uint64(st.Loc.Slot)*segSize)); err != nil {
			return fmt.Errorf("staged write of segment %d at %v: %w: %w", seg, st.Loc, protocol.ErrIO, err)
		}
		d.met.CopiedOnWrite(srcs.read)
		if st.NoFlush {
			// The commit is kept in memory until the disk's
			// next flush, which flushes this container first.
			oc.written.Store(true)
			return nil
		}
		if err := oc.c.Flush(); err != nil {
			if errors.Is(err, container.ErrLeaseOver) {
				return fmt.Errorf("flush staged segment %d at %v: %w", seg, st.Loc, err)
			}
			// The kernel may have dropped other writes' dirty
			// pages: no later flush of oc can promise anything.
			oc.failed.Store(true)
			return fmt.Errorf("flush staged segment %d at %v: %w: %w", seg, st.Loc, protocol.ErrIO, err)
		}
		return nil
	}()
	if werr != nil {
		d.abandon(ctx, seg, st)
		if errors.Is(werr, container.ErrLeaseOver) {
			// The storage refused the staged slot's writes for a
			// lapsed lease: start again under a new one.
			if err := d.a.waitLease(ctx); err != nil {
				return false, err
			}
			return false, nil
		}
		return false, werr
	}
	if st.Copies() && !inPlace(st) && !d.a.leaseHeld() {
		// The lease lapsed while the copy read the old slot: the
		// controller may have stopped waiting for this agent and
		// freed it. The agent fences itself, and its re-attach
		// drops the stage. Not so a fill in place: the slots it
		// read from are its entry's layers, kept while the entry
		// is the same, which its commit checks; and what it wrote
		// over sub-blocks the slot holds was read by others at
		// once: written again, it would land after what they wrote
		// since. It commits, after the re-attach if need be (the
		// controller keeps the stage).
		return false, nil
	}
	t0 := time.Now()
	r, err := d.a.controller().Fault(ctx, protocol.Fault{
		Agent: d.a.name, Disk: d.Info().ID, Segment: seg, Count: 1, Op: protocol.FaultCommit, Token: st.Token,
	})
	d.met.Fault(time.Since(t0))
	if errors.Is(err, protocol.ErrStale) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("commit staged segment %d: %w", seg, err)
	}
	d.noteDeferred(r)
	// The write is done and will be acknowledged: if the commit's entry
	// cannot be installed (a command or another fault's reply came
	// meanwhile, which may predate the commit), the entry is loaded
	// afresh, lest reads go on to the old slot; unless a command brought
	// the commit's entry already.
	if !d.install(seq, gen, seg, r) {
		keep := table.InvalidEntry
		if r.First == seg && len(r.Entries) == 1 {
			keep = r.Entries[0]
		}
		d.invalidate(seg, keep)
	}
	return true, nil
}

// inPlace reports whether stage st is a fill in place: its slot is the
// one its From entry (the entry the fault was resolved against) names.
func inPlace(st *protocol.Stage) bool {
	return st.Copies() && st.From.Loc == st.Loc
}

// abandon tells the controller that the staged write st of segment seg
// will not be made, so that it frees the reserved slot now rather than
// when the agent re-attaches. A failure is harmless: the slot stays
// reserved until then.
func (d *Disk) abandon(ctx context.Context, seg uint64, st *protocol.Stage) {
	_, _ = d.a.controller().Fault(ctx, protocol.Fault{
		Agent: d.a.name, Disk: d.Info().ID, Segment: seg, Count: 1, Op: protocol.FaultCommit, Token: st.Token, Abandon: true,
	})
}

// copyChunk is the most a staged copy reads and writes at once.
const copyChunk = 1 << 20

// copyBufs holds copyChunk-byte buffers for staged copies.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyChunk); return &b }}

// zeroBlock is the unit in which a staged copy leaves zeros unwritten.
const zeroBlock = 4096

// copyAround fills the staged slot st.Loc of dst with the segment st.From
// maps (src holds the containers of its slots) with p laid over it at off:
// chunk by chunk, each read from the old slots (unless p covers it; a
// partial From reads each sub-block from the slot that holds it),
// overlaid, and written. Blocks that come out all zeros are not written:
// the staged slot, free until now, is durably zero, and the container file
// stays sparse there (a snapshot of a sparse disk does not fill its copies
// with zeros).
func copyAround(src *cowSource, dst container.Container, st *protocol.Stage, off uint64, p []byte, segSize uint64) error {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	to := int64(uint64(st.Loc.Slot) * segSize)
	end := off + uint64(len(p))
	for pos := uint64(0); pos < segSize; {
		n := min(copyChunk, segSize-pos)
		b := (*bp)[:n]
		lo, hi := max(pos, off), min(pos+n, end)
		if lo > pos || hi < pos+n {
			if err := src.readFrom(st.From, pos, b, segSize); err != nil {
				return err
			}
		}
		if lo < hi {
			copy(b[lo-pos:hi-pos], p[lo-off:hi-off])
		}
		// Write the runs of blocks that are not all zeros.
		run := -1 // start of the current run of data blocks in b
		for i := 0; i <= len(b); i += zeroBlock {
			if i < len(b) && !bytes.Equal(b[i:min(i+zeroBlock, len(b))], zeros[:min(zeroBlock, len(b)-i)]) {
				if run < 0 {
					run = i
				}
				continue
			}
			if run >= 0 {
				if _, err := dst.WriteAt(b[run:i], to+int64(pos)+int64(run)); err != nil {
					return fmt.Errorf("copy-on-write write %v: %w: %w", st.Loc, protocol.ErrIO, err)
				}
				run = -1
			}
		}
		pos += n
	}
	return nil
}

// readFrom reads bytes [off, off+len(b)) of the segment the mapped entry
// from maps into b, each sub-block from the slot that holds it; src holds
// the containers of its slots.
func (src *cowSource) readFrom(from table.Entry, off uint64, b []byte, segSize uint64) error {
	err := readRuns(from, off, b, segSize, func(loc table.Location) (container.Container, error) {
		c := src.conts[loc.Container]
		if c == nil {
			return nil, fmt.Errorf("copy-on-write read %v: container %d not open: %w", loc, loc.Container, protocol.ErrIO)
		}
		return c, nil
	}, func(loc table.Location, err error) error {
		return fmt.Errorf("copy-on-write read %v: %w: %w", loc, protocol.ErrIO, err)
	})
	if err == nil {
		src.read += int64(len(b))
	}
	return err
}

// cowSource is what a staged write copies from: the containers of the
// slots its stage's From names, and the bytes read from them so far.
type cowSource struct {
	conts map[uint32]container.Container
	read  int64
}

// fillRest copies into the staged slot st.Loc of dst every sub-block that
// st.From's own slot does not hold and bytes [off, off+n) do not touch,
// each from the layer of st.From that holds it. All-zero 4 KiB blocks
// are punched rather than written: the slot stays sparse, and what it
// holds where it lacks a sub-block is not known to be zero (an in-place
// stage whose commit failed may have written there).
func fillRest(src *cowSource, dst container.Container, st *protocol.Stage, off, n, segSize uint64) error {
	sb := table.SubBlockSize(segSize)
	touched := table.SpanOf(segSize, off, n)
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	to := int64(uint64(st.Loc.Slot) * segSize)
	return st.From.Runs(0, table.SubBlockCount(segSize), func(loc table.Location, lo, hi int) error {
		if loc == st.Loc {
			return nil
		}
		for i := lo; i < hi; {
			if touched.Test(i) {
				i++
				continue
			}
			j := i + 1
			for j < hi && !touched.Test(j) && uint64(j-i)*sb < uint64(len(*bp)) {
				j++
			}
			b := (*bp)[:uint64(j-i)*sb]
			if err := src.readFrom(st.From, uint64(i)*sb, b, segSize); err != nil {
				return err
			}
			// All-zero blocks are punched, not written: the slot stays
			// sparse, and a sub-block it lacks may hold what an
			// in-place stage wrote there before its commit failed.
			at := to + int64(uint64(i)*sb)
			zrun := -1 // start of the current run of all-zero blocks
			for k := 0; k <= len(b); k += zeroBlock {
				blk := b[k:min(k+zeroBlock, len(b))]
				if k < len(b) && bytes.Equal(blk, zeros[:len(blk)]) {
					if zrun < 0 {
						zrun = k
					}
					continue
				}
				if zrun >= 0 {
					if err := dst.Punch(at+int64(zrun), int64(k-zrun)); err != nil {
						return fmt.Errorf("fill the rest of %v: %w: %w", st.Loc, protocol.ErrIO, err)
					}
					zrun = -1
				}
				if k == len(b) {
					break
				}
				if _, err := dst.WriteAt(blk, at+int64(k)); err != nil {
					return fmt.Errorf("fill the rest of %v: %w: %w", st.Loc, protocol.ErrIO, err)
				}
			}
			i = j
		}
		return nil
	})
}

// writeSparse makes a sparse staged write: into the staged slot st.Loc of
// dst it writes only the sub-blocks p (at off) touches, leaving the others
// unwritten. A sub-block p covers whole is p's bytes; one it covers in
// part (at most the first and the last) is read first from the slot of
// st.From that holds it (which may be st.Loc itself, when a partial
// entry's own slot is filled in place; with no From, zeros), and p is laid
// over it.
func writeSparse(src *cowSource, dst container.Container, st *protocol.Stage, off uint64, p []byte, segSize uint64) error {
	end := off + uint64(len(p))
	if end == off {
		return nil
	}
	sb := table.SubBlockSize(segSize)
	to := uint64(st.Loc.Slot) * segSize
	write := func(b []byte, at uint64) error {
		if _, err := dst.WriteAt(b, int64(to+at)); err != nil {
			return fmt.Errorf("sub-block write %v: %w: %w", st.Loc, protocol.ErrIO, err)
		}
		return nil
	}
	// edge returns the bytes to write for the sub-block at a ([a, b) of
	// the segment), which p covers only in part, and where they go. If
	// the staged slot holds it already (a fill in place of a sub-block
	// the slot has), only p's bytes are written: a read-modify-write
	// would lay the bytes read over another writer's write to the rest
	// of the sub-block.
	edge := func(a, b uint64) ([]byte, uint64, error) {
		lo, hi := max(a, off), min(b, end)
		if st.Copies() && st.From.Locate(int(a/sb)) == st.Loc {
			return p[lo-off : hi-off], lo, nil
		}
		buf := make([]byte, b-a)
		if st.Copies() {
			if err := src.readFrom(st.From, a, buf, segSize); err != nil {
				return nil, 0, err
			}
		}
		copy(buf[lo-a:hi-a], p[lo-off:hi-off])
		return buf, a, nil
	}
	// The edges are read before anything is written: a failed read
	// leaves the staged slot as it was.
	type piece struct {
		b  []byte
		at uint64
	}
	var head, tail piece
	first, last := off/sb, (end-1)/sb // the sub-blocks touched
	mid, midEnd := off, end           // the bytes of the sub-blocks p covers whole
	if a := first * sb; a < off || (first == last && end < min(a+sb, segSize)) {
		b := min(a+sb, segSize)
		buf, at, err := edge(a, b)
		if err != nil {
			return err
		}
		head, mid = piece{buf, at}, b
	}
	if a := last * sb; mid < end && end < min(a+sb, segSize) {
		buf, at, err := edge(a, min(a+sb, segSize))
		if err != nil {
			return err
		}
		tail, midEnd = piece{buf, at}, a
	}
	for _, pc := range []piece{head, {p[min(mid, midEnd)-off : midEnd-off], mid}, tail} {
		if len(pc.b) > 0 && pc.at < end {
			if err := write(pc.b, pc.at); err != nil {
				return err
			}
		}
	}
	return nil
}

// zeros is a buffer of zeros for ioZero writes; never written to.
var zeros = make([]byte, 1<<20)

// storageIO does an I/O that e lets through: bytes [off, off+len(p)) of
// segment seg. A read of a partial entry reads each sub-block from the
// slot that holds it; a write goes to e's own slot (DecideSpan let it
// through only if that slot holds every sub-block it touches), as does a
// read of a whole entry.
func (d *Disk) storageIO(ctx context.Context, kind ioKind, e table.Entry, seg, off uint64, p []byte, segSize uint64) error {
	if kind == ioRead && e.Partial() {
		return readRuns(e, off, p, segSize, func(loc table.Location) (container.Container, error) {
			oc, err := d.a.container(ctx, loc.Container)
			if err != nil {
				return nil, err
			}
			return oc.c, nil
		}, func(loc table.Location, err error) error {
			return fmt.Errorf("read segment %d at %v: %w: %w", seg, loc, protocol.ErrIO, err)
		})
	}
	loc := e.Loc
	oc, err := d.a.container(ctx, loc.Container)
	if err != nil {
		return err
	}
	base := int64(uint64(loc.Slot)*segSize + off)
	switch kind {
	case ioRead:
		if _, err := oc.c.ReadAt(p, base); err != nil {
			return fmt.Errorf("read segment %d at %v: %w: %w", seg, loc, protocol.ErrIO, err)
		}
		return nil
	case ioWrite:
		_, err = oc.c.WriteAt(p, base)
	case ioZero:
		for n := 0; n < len(p) && err == nil; {
			m := min(len(p)-n, len(zeros))
			_, err = oc.c.WriteAt(zeros[:m], base+int64(n))
			n += m
		}
	}
	if err != nil {
		return fmt.Errorf("write segment %d at %v: %w: %w", seg, loc, protocol.ErrIO, err)
	}
	oc.written.Store(true)
	return nil
}

// readRuns reads bytes [off, off+len(p)) of the segment entry e maps into
// p: from e's slot, or, for a partial entry, each run of sub-blocks from
// the slot that holds it. open gives the container of a slot; wrap makes
// the error of a failed read.
func readRuns(e table.Entry, off uint64, p []byte, segSize uint64, open func(table.Location) (container.Container, error), wrap func(table.Location, error) error) error {
	end := off + uint64(len(p))
	if end == off {
		return nil
	}
	sb := table.SubBlockSize(segSize)
	return e.Runs(int(off/sb), int((end+sb-1)/sb), func(loc table.Location, lo, hi int) error {
		a, b := max(uint64(lo)*sb, off), min(uint64(hi)*sb, end)
		c, err := open(loc)
		if err != nil {
			return err
		}
		if _, err := c.ReadAt(p[a-off:b-off], int64(uint64(loc.Slot)*segSize+a)); err != nil {
			return wrap(loc, err)
		}
		return nil
	})
}

// span calls fn for each segment piece of [off, off+n), in order. It checks
// the range first.
func (d *Disk) span(off, n uint64, fn func(seg, segOff, pos, m uint64) error) error {
	info := d.info.Load()
	if off > info.Size || n > info.Size-off {
		return fmt.Errorf("[%d, +%d) of a %d-byte disk: %w", off, n, info.Size, ErrRange)
	}
	ss := info.SegmentSize
	for pos := uint64(0); pos < n; {
		seg, segOff := (off+pos)/ss, (off+pos)%ss
		m := min(ss-segOff, n-pos)
		if err := fn(seg, segOff, pos, m); err != nil {
			return err
		}
		pos += m
	}
	return nil
}

// Extents reports the allocation of [off, off+n) from the disk's table,
// without reading any data: fn gets consecutive runs from off on, their
// lengths and whether they are zero (their segments are Zero: they read as
// zeroes and own no storage), until the range is covered or fn returns
// false. Every other run is data: a mapped segment, a partial one (each of
// its sub-blocks is stored in some slot), and one in the Error state,
// whose reads fail. Runs of one kind are merged. An entry the agent has
// not loaded yet is loaded the way a read loads it, with a read fault.
func (d *Disk) Extents(ctx context.Context, off, n uint64, fn func(n uint64, zero bool) bool) error {
	var (
		runLen  uint64
		runZero bool
	)
	err := d.span(off, n, func(seg, segOff, pos, m uint64) error {
		zero, err := d.zeroSeg(ctx, seg)
		if err != nil {
			return err
		}
		if runLen > 0 && zero != runZero {
			if !fn(runLen, runZero) {
				runLen = 0
				return errStopExtents
			}
			runLen = 0
		}
		runLen += m
		runZero = zero
		return nil
	})
	if errors.Is(err, errStopExtents) {
		return nil
	}
	if err != nil {
		return err
	}
	if runLen > 0 {
		fn(runLen, runZero)
	}
	return nil
}

// zeroSeg reports whether segment seg is Zero, as a read would find it.
func (d *Disk) zeroSeg(ctx context.Context, seg uint64) (bool, error) {
	_, dec, err := d.loadEntry(ctx, seg)
	return dec.Action == table.ReadZeros, err
}

// loadEntry returns segment seg's entry as a read would find it, and what
// a read would do with it (never Fault): it waits for the lease and for
// commands as a read does, and loads an entry that is Invalid with a read
// fault (segIO's), retrying while the replies are stale. Its first fault
// asks for the entries of the segments after seg as well (up to
// protocol.MaxReadRange), so that mapping a thin disk that no one has read
// costs a fault per table page, not per segment.
func (d *Disk) loadEntry(ctx context.Context, seg uint64) (table.Entry, table.Decision, error) {
	faults, dropped := 0, 0
	ranged := false
	for {
		if faults == maxRetries || dropped == 16*maxRetries {
			return table.Entry{}, table.Decision{}, fmt.Errorf("segment %d: still faulting after %d faults: %w", seg, faults+dropped, protocol.ErrIO)
		}
		e, dec, ep, seq, err := d.begin(ctx, seg, table.Read, table.Bits{})
		if err != nil {
			return e, dec, err
		}
		if ep != nil {
			d.end(ep) // nothing to read: the entry was all it needed
		}
		if dec.Action != table.Fault {
			return e, dec, nil
		}
		if n := min(d.Info().Segments()-seg, protocol.MaxReadRange); !ranged && n > 1 {
			ranged = true
			if d.loadRange(ctx, seq, seg, n, dec.Reason) {
				faults++
				continue
			}
			if err := ctx.Err(); err != nil {
				return table.Entry{}, table.Decision{}, err
			}
			// Not installed (a change came first) or refused: the
			// one-segment fault below decides.
		}
		r, gen, err := d.sendFault(ctx, protocol.Fault{Segment: seg, Count: 1, Op: protocol.FaultRead, Reason: dec.Reason})
		if err != nil {
			return table.Entry{}, table.Decision{}, err
		}
		if r.Stage != nil {
			// A read fault is never answered with a stage.
			d.abandon(ctx, seg, r.Stage)
			d.faultIn(seg)
			return table.Entry{}, table.Decision{}, fmt.Errorf("read fault on segment %d: answered with a stage: %w", seg, protocol.ErrIO)
		}
		installed := d.install(seq, gen, seg, r)
		d.faultIn(seg)
		if installed {
			faults++
		} else {
			dropped++
		}
	}
}

// Changed reports which parts of [off, off+n) of the disk may differ from
// the disk base, an earlier snapshot of its lineage (or any disk of its
// family), from the two tables alone: fn gets consecutive runs from off
// on, their lengths and whether they changed, until the range is covered
// or fn returns false. A segment whose entries differ changed in the
// sub-blocks they read from different slots (table.Changed); the bytes
// past base's end changed. Entries not loaded yet are loaded as a read
// loads them, on both disks. Base must be open on the same agent.
func (d *Disk) Changed(ctx context.Context, base *Disk, off, n uint64, fn func(n uint64, changed bool) bool) error {
	info, binfo := d.Info(), base.Info()
	if info.Family != binfo.Family || info.SegmentSize != binfo.SegmentSize {
		return fmt.Errorf("%q and %q are not of one lineage: %w", info.Name, binfo.Name, ErrLineage)
	}
	ss := info.SegmentSize
	sb := table.SubBlockSize(ss)
	nb := table.SubBlockCount(ss)
	var (
		runLen     uint64
		runChanged bool
	)
	add := func(m uint64, changed bool) error {
		if runLen > 0 && changed != runChanged {
			if !fn(runLen, runChanged) {
				runLen = 0
				return errStopExtents
			}
			runLen = 0
		}
		runLen += m
		runChanged = changed
		return nil
	}
	err := d.span(off, n, func(seg, segOff, pos, m uint64) error {
		bits := table.Full(nb) // a segment base does not have
		if seg < binfo.Segments() {
			a, _, err := d.loadEntry(ctx, seg)
			if err != nil {
				return err
			}
			b, _, err := base.loadEntry(ctx, seg)
			if err != nil {
				return err
			}
			bits = table.Changed(a, b, nb)
		}
		if past := seg*ss+ss > binfo.Size; !past && (bits.Empty() || bits == table.Full(nb)) {
			return add(m, !bits.Empty()) // the common case: whole segments
		}
		// The sub-blocks [segOff, segOff+m) touches, one by one; one
		// that reaches past base's end changed.
		for p := segOff; p < segOff+m; {
			i := int(p / sb)
			end := min(uint64(i+1)*sb, segOff+m)
			changed := bits.Test(i) || seg*ss+uint64(i+1)*sb > binfo.Size
			if err := add(end-p, changed); err != nil {
				return err
			}
			p = end
		}
		return nil
	})
	if errors.Is(err, errStopExtents) {
		return nil
	}
	if err != nil {
		return err
	}
	if runLen > 0 {
		fn(runLen, runChanged)
	}
	return nil
}

// loadRange loads the entries of segments [seg, seg+n) with one read
// fault, begun when the table's command count was seq, and reports
// whether it installed seg's (see installRange).
func (d *Disk) loadRange(ctx context.Context, seq, seg, n uint64, reason table.State) bool {
	d.mu.RLock()
	loads := d.mu.loads
	d.mu.RUnlock()
	r, err := d.fault(ctx, protocol.Fault{Segment: seg, Count: n, Op: protocol.FaultRead, Reason: reason})
	if err != nil || r.Stage != nil || r.First != seg {
		return false
	}
	return d.installRange(seq, loads, r)
}

// ReadAt reads len(p) bytes at offset off.
func (d *Disk) ReadAt(ctx context.Context, p []byte, off uint64) error {
	ss := d.info.Load().SegmentSize
	return d.span(off, uint64(len(p)), func(seg, segOff, pos, m uint64) error {
		return d.segIO(ctx, ioRead, seg, segOff, p[pos:pos+m], ss)
	})
}

// WriteAt writes p at offset off. With fua the data is durable when it
// returns.
func (d *Disk) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	info := d.info.Load()
	if info.ReadOnly {
		return fmt.Errorf("write to %q: %w", info.Name, protocol.ErrReadOnly)
	}
	err := d.span(off, uint64(len(p)), func(seg, segOff, pos, m uint64) error {
		return d.segIO(ctx, ioWrite, seg, segOff, p[pos:pos+m], info.SegmentSize)
	})
	if err == nil && fua {
		err = d.Flush(ctx)
	}
	return err
}

// Flush makes every write that completed before it durable: the agent's
// containers are flushed, then the map changes the controller keeps in
// memory for the disk are committed (data before the map).
func (d *Disk) Flush(ctx context.Context) error {
	g := d.maps.deferred.Load()
	if err := d.flushContainers(ctx); err != nil {
		return err
	}
	if g == d.maps.durable.Load() {
		return nil
	}
	if _, err := d.fault(ctx, protocol.Fault{Segment: 0, Count: 1, Op: protocol.FaultFlush}); err != nil {
		return err
	}
	for {
		cur := d.maps.durable.Load()
		if cur >= g || d.maps.durable.CompareAndSwap(cur, g) {
			return nil
		}
	}
}

// WriteZeroes makes [off, off+n) read as zeros. Whole segments go back to
// Zero and give their space back, unless noHole asks for the space to stay
// allocated, in which case zeros are written.
func (d *Disk) WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error {
	info := d.Info()
	if info.ReadOnly {
		return fmt.Errorf("write zeroes to %q: %w", info.Name, protocol.ErrReadOnly)
	}
	ss := info.SegmentSize
	var run, runLen uint64 // a pending run of whole segments
	flushRun := func() error {
		for runLen > 0 {
			k := min(runLen, maxDiscard)
			if err := d.discard(ctx, run, k); err != nil {
				return err
			}
			run, runLen = run+k, runLen-k
		}
		return nil
	}
	err := d.span(off, n, func(seg, segOff, pos, m uint64) error {
		if !noHole && segOff == 0 && m == ss {
			if runLen == 0 {
				run = seg
			}
			runLen++
			return nil
		}
		if err := flushRun(); err != nil {
			return err
		}
		// A partial segment: write zeros into it.
		var err error
		for done := uint64(0); done < m && err == nil; {
			k := min(m-done, uint64(len(zeros)))
			err = d.segIO(ctx, ioZero, seg, segOff+done, zeros[:k], ss)
			done += k
		}
		return err
	})
	if err != nil {
		return err
	}
	return flushRun()
}

// Trim discards [off, off+n): whole segments give their space back. segmap
// makes trimmed ranges read as zeros, so Trim is WriteZeroes.
func (d *Disk) Trim(ctx context.Context, off, n uint64) error {
	return d.WriteZeroes(ctx, off, n, false)
}

// maxDiscard is the most segments one discard fault asks for.
const maxDiscard = 1 << 16

// discard asks the controller to return segments [seg, seg+n) to Zero.
// The controller updates every agent's table itself.
func (d *Disk) discard(ctx context.Context, seg, n uint64) error {
	d.mu.RLock()
	gone := d.mu.gone
	d.mu.RUnlock()
	if gone {
		return ErrGone
	}
	_, err := d.fault(ctx, protocol.Fault{Segment: seg, Count: n, Op: protocol.FaultDiscard})
	return err
}

// Close gives back one Open of the disk. When the last is given back the
// agent unmaps it: its I/O fails from then on.
func (d *Disk) Close(ctx context.Context) error {
	a := d.a
	a.openMu.Lock()
	defer a.openMu.Unlock()
	id := d.Info().ID
	a.mu.Lock()
	if a.mu.disks[id] != d {
		a.mu.Unlock()
		return nil // deleted or closed already
	}
	if d.opens--; d.opens > 0 {
		a.mu.Unlock()
		return nil
	}
	delete(a.mu.disks, id)
	a.mu.Unlock()
	err := d.forget(ctx)
	return errors.Join(err, a.controller().CloseDisk(ctx, a.name, id))
}

// --- commands -------------------------------------------------------------------

func (d *Disk) getEntry(first, n uint64) ([]table.Entry, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if first > uint64(d.mu.tab.Len()) || n > uint64(d.mu.tab.Len())-first {
		return nil, fmt.Errorf("entries [%d,+%d): %w", first, n, table.ErrRange)
	}
	return d.mu.tab.GetEntry(int(first), int(n))
}

// status counts the table by state and the I/O and faults under way.
func (d *Disk) status() protocol.DiskStatus {
	d.mu.RLock()
	defer d.mu.RUnlock()
	c := d.mu.tab.Count()
	st := protocol.DiskStatus{
		Disk:     d.Info().ID,
		Segments: uint64(d.mu.tab.Len()),
		Loaded:   uint64(d.mu.tab.Len() - c.Invalid),
		Invalid:  uint64(c.Invalid),
		Error:    uint64(c.Error),
		Zero:     uint64(c.Zero),
		NoWrite:  uint64(c.NoWrite),
		Mapped:   uint64(c.Mapped),
		Quiesced: d.mu.quiesced,
	}
	// An epoch's count is changed without the lock; the sum is a
	// moment's picture, which is all a status promises.
	n := d.mu.cur.n.Load()
	for _, ep := range d.mu.pending {
		n += ep.n.Load()
	}
	st.InFlight = uint64(max(0, n))
	for _, sf := range d.mu.faults {
		st.FaultsOut += uint64(max(0, sf.out))
	}
	return st
}

// command applies change to the table as one command and, if blocking,
// waits until the I/O in flight before it has finished.
func (d *Disk) command(ctx context.Context, blocking bool, rg segRange, change func(t *table.Table) error) error {
	d.mu.Lock()
	if d.mu.gone {
		d.mu.Unlock()
		return ErrGone
	}
	if err := change(d.mu.tab); err != nil {
		d.mu.Unlock()
		return err
	}
	d.recordLocked(rg)
	g := d.bumpLocked()
	d.mu.Unlock()
	if !blocking {
		return nil
	}
	if err := d.waitDrained(ctx, g); err != nil {
		return err
	}
	// The writes made under the old entries are durable too: a snapshot
	// taken after this never loses them to a power failure.
	return d.flushContainers(ctx)
}

// flushContainers flushes every container the agent wrote since its last
// flush. A storage node that refuses the flush for a lapsed lease (the
// agent just re-attached, and the renewal is still on its way to the
// node) is asked again once the lease is renewed, as an I/O is
// (waitStorageLease): a command answered with that refusal would make
// the controller wait out the agent's lease and fence it, for nothing.
func (d *Disk) flushContainers(ctx context.Context) error {
	for tries := 0; ; tries++ {
		err := d.a.flushWritten()
		if err == nil || !errors.Is(err, container.ErrLeaseOver) {
			return err
		}
		if werr := d.a.waitStorageLease(ctx, tries, err); werr != nil {
			return fmt.Errorf("flush %q: %w: %w", d.Info().Name, protocol.ErrIO, werr)
		}
	}
}

func (d *Disk) setEntry(ctx context.Context, c protocol.SetEntry) error {
	return d.command(ctx, c.Blocking, segRange{c.First, c.First + uint64(len(c.Entries))}, func(t *table.Table) error {
		if c.First > uint64(t.Len()) {
			return fmt.Errorf("set_entry at %d: %w", c.First, table.ErrRange)
		}
		if err := d.checkEntries(c.Entries); err != nil {
			return fmt.Errorf("set_entry at %d: %w", c.First, err)
		}
		return t.SetEntry(int(c.First), c.Entries)
	})
}

// checkEntries checks the shape of the partial entries among es for the
// disk's segments: an entry whose layers do not fit (say, made for another
// segment size) would read the wrong bytes.
func (d *Disk) checkEntries(es []table.Entry) error {
	n := table.SubBlockCount(d.Info().SegmentSize)
	for _, e := range es {
		if e.Partial() {
			if err := e.Part.Valid(e.Loc, n); err != nil {
				return fmt.Errorf("%w: %w", err, protocol.ErrBadRequest)
			}
		}
	}
	return nil
}

func (d *Disk) setEntryState(ctx context.Context, c protocol.SetEntryState) error {
	return d.command(ctx, c.Blocking, segRange{c.First, c.First + c.Count}, func(t *table.Table) error {
		if c.First > uint64(t.Len()) || c.Count > uint64(t.Len())-c.First {
			return fmt.Errorf("set_entry_state [%d,+%d): %w", c.First, c.Count, table.ErrRange)
		}
		return t.SetEntryState(int(c.First), int(c.Count), c.State, c.On)
	})
}

// reset makes the table all Invalid at info's size and waits for the I/O in
// flight.
func (d *Disk) reset(ctx context.Context, info protocol.Disk) error {
	return d.resetIf(ctx, nil, info)
}

// resetIf is reset, done only while d's info is still was (nil: in any
// case).
func (d *Disk) resetIf(ctx context.Context, was *protocol.Disk, info protocol.Disk) error {
	d.mu.Lock()
	if was != nil && d.info.Load() != was {
		d.mu.Unlock()
		return nil
	}
	d.info.Store(&info)
	d.mu.tab = table.New(int(info.Segments()), table.InvalidEntry)
	d.mu.quiesced = false // a quiesce does not outlive the table it was for
	d.recordLocked(wholeTable)
	g := d.bumpLocked()
	d.broadcastLocked()
	d.mu.Unlock()
	return d.waitDrained(ctx, g)
}

// fence makes the table all Invalid and holds new I/O (until reset), and
// waits for the I/O in flight.
func (d *Disk) fence(ctx context.Context) error {
	d.mu.Lock()
	d.mu.tab = table.New(d.mu.tab.Len(), table.InvalidEntry)
	d.mu.quiesced = true
	d.recordLocked(wholeTable)
	g := d.bumpLocked()
	d.broadcastLocked()
	d.mu.Unlock()
	return d.waitDrained(ctx, g)
}

// forget makes every I/O fail from now on and waits for the I/O in flight.
func (d *Disk) forget(ctx context.Context) error {
	d.mu.Lock()
	d.mu.gone = true
	d.recordLocked(wholeTable)
	g := d.bumpLocked()
	d.broadcastLocked()
	d.mu.Unlock()
	return d.waitDrained(ctx, g)
}

func (d *Disk) quiesce(ctx context.Context, timeout time.Duration) error {
	d.mu.Lock()
	d.mu.quiesced = true
	g := d.bumpLocked()
	d.mu.Unlock()
	wctx := ctx
	if timeout > 0 {
		var cancel context.CancelFunc
		wctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if err := d.waitDrained(wctx, g); err != nil {
		d.activate()
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			return fmt.Errorf("disk %d after %v: %w", d.Info().ID, timeout, ErrQuiesceTimeout)
		}
		return err
	}
	return nil
}

func (d *Disk) activate() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.quiesced = false
	d.broadcastLocked()
}
