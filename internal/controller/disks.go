package controller

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// CreateOptions describes a new disk.
type CreateOptions struct {
	Name        string
	Size        uint64
	SegmentSize uint64       // DefaultSegmentSize if 0
	Policy      table.Policy // table.Forward if 0
	// Agents are the agents (hosts) allowed to map the disk; nil lets
	// every agent map it.
	Agents []string
	// Preallocate allocates a (zeroed) slot for every segment at once, so
	// that no write to the disk ever faults to allocate.
	Preallocate bool
	// Progress, if set, is told how many segments of a preallocation
	// are mapped of how many, after each transaction.
	Progress func(done, total uint64)
}

// CreateDisk creates a disk whose every segment is Zero: nothing is
// allocated, so it is instant at any size. With Preallocate every segment
// gets its slot at once instead, in transactions of PreallocateChunk
// segments, the first of which creates the disk (so a disk of up to
// PreallocateChunk segments is created preallocated or not at all); if a
// later one fails, the disk is deleted again.
func (c *Controller) CreateDisk(ctx context.Context, o CreateOptions) (meta.Disk, error) {
	if o.SegmentSize == 0 {
		o.SegmentSize = DefaultSegmentSize
	}
	if o.Policy == 0 {
		o.Policy = table.Forward
	}
	if err := ValidName(o.Name); err != nil {
		return meta.Disk{}, err
	}
	if err := ValidSegmentSize(o.SegmentSize); err != nil {
		return meta.Disk{}, err
	}
	if err := ValidGeometry(o.Size, o.SegmentSize); err != nil {
		return meta.Disk{}, err
	}
	if !o.Policy.Valid() {
		return meta.Disk{}, fmt.Errorf("policy %d: %w", o.Policy, table.ErrBadPolicy)
	}
	end, err := c.begin(ctx, false)
	if err != nil {
		return meta.Disk{}, err
	}
	defer end()
	var d meta.Disk
	if o.Preallocate && o.Progress != nil {
		// Zeroing the pool's free slots may take a while first.
		o.Progress(0, (o.Size+o.SegmentSize-1)/o.SegmentSize)
	}
again:
	if o.Preallocate {
		if err := c.zeroPool(ctx, o.SegmentSize); err != nil {
			return meta.Disk{}, fmt.Errorf("preallocate %q: %w", o.Name, err)
		}
	}
	pre := c.newTaking()
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if !hasPool(cs, o.SegmentSize) {
			return fmt.Errorf("segment size %d: %w; add a container with that slot size", o.SegmentSize, ErrNoPool)
		}
		d, err = tx.CreateDisk(meta.Disk{
			Name: o.Name, Size: o.Size, SegmentSize: o.SegmentSize,
			Policy: o.Policy, Created: c.now().UTC(),
		})
		if err != nil {
			return err
		}
		if o.Agents != nil {
			if err := tx.SetGrants(d.ID, o.Agents, false); err != nil {
				return err
			}
		}
		if o.Preallocate {
			if err := c.preallocateTx(tx, d, 0, pre); err != nil {
				return fmt.Errorf("preallocate %q: %w", o.Name, err)
			}
		}
		return nil
	})
	pre.finish()
	if errors.Is(err, errNotZeroed) {
		// A container's free slots were left dirty after zeroPool (a
		// fault running meanwhile gave a slot back holding data):
		// zero them again.
		goto again
	}
	if errors.Is(err, meta.ErrExists) {
		err = fmt.Errorf("%q: %w", o.Name, ErrExists)
	}
	if err != nil {
		return d, err
	}
	if !o.Preallocate {
		c.logCreated(d, false)
		return d, nil
	}
	progress := func(done uint64) {
		if o.Progress != nil {
			o.Progress(min(done, d.Segments()), d.Segments())
		}
	}
	progress(PreallocateChunk)
	if d.Segments() <= PreallocateChunk {
		c.logCreated(d, true)
		return d, nil
	}
	if err := c.preallocate(ctx, d, PreallocateChunk, progress); err != nil {
		fr := c.newFreeing()
		derr := c.store.Update(ctx, func(tx *meta.Tx) error {
			fr.reset()
			freed, err := tx.DeleteDisk(d.ID)
			for _, loc := range freed {
				fr.add(loc)
			}
			return err
		})
		fr.finish(ctx, derr)
		if derr != nil {
			c.logger.Warn("delete a disk whose preallocation failed", "disk", d.Name, "err", derr)
		}
		return meta.Disk{}, fmt.Errorf("preallocate %q: %w", d.Name, err)
	}
	c.logCreated(d, true)
	return d, nil
}

// logCreated tells the operator a disk was created.
func (c *Controller) logCreated(d meta.Disk, preallocated bool) {
	c.logger.Info("disk created", "disk", d.Name, "size", d.Size, "segment_size", d.SegmentSize, "preallocated", preallocated)
}

// PreallocateChunk is how many segments one transaction of a
// preallocation maps.
const PreallocateChunk = 1 << 14

// zeroPool makes every free slot of the containers of slotSize durably
// zero (see ensureZeroedLocked), so that slots taken without a punch, as a
// preallocation takes them, read as zeros.
func (c *Controller) zeroPool(ctx context.Context, slotSize uint64) error {
	var cs []meta.Container
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		cs, err = tx.Containers()
		return err
	}); err != nil {
		return err
	}
	c.alloc.mu.Lock()
	defer c.alloc.mu.Unlock()
	for _, ct := range cs {
		if ct.SlotSize == slotSize && ct.State == meta.ContainerOnline {
			if err := c.ensureZeroedLocked(ctx, ct.ID); err != nil {
				return err
			}
		}
	}
	return nil
}

// preallocate maps segments from `from` on of the new disk d to free
// slots, in transactions of PreallocateChunk segments. The pool must have
// been zeroed (zeroPool).
func (c *Controller) preallocate(ctx context.Context, d meta.Disk, from uint64, progress func(done uint64)) error {
	for first := from; first < d.Segments(); first += PreallocateChunk {
		pre := c.newTaking()
		err := c.store.Update(ctx, func(tx *meta.Tx) error {
			return c.preallocateTx(tx, d, first, pre)
		})
		pre.finish()
		if errors.Is(err, errNotZeroed) {
			// A container's free slots were left dirty meanwhile:
			// zero them again and retry the chunk.
			if err = c.zeroPool(ctx, d.SegmentSize); err == nil {
				first -= PreallocateChunk
				continue
			}
		}
		if err != nil {
			return err
		}
		progress(first + PreallocateChunk)
	}
	return nil
}

// taking holds the slots that one transaction takes for itself (a
// preallocation), reserved from the moment its fn picks them until the
// commit is over. fn may run more than once: the slots of every run are
// held until finish.
type taking struct {
	c   *Controller
	all []table.Location
}

func (c *Controller) newTaking() *taking { return &taking{c: c} }

// finish gives the reservations back: the slots are used now, or free and
// still zero.
func (t *taking) finish() {
	for _, loc := range t.all {
		t.c.alloc.release(loc, false)
	}
	t.all = nil
}

// preallocateTx maps segments [first, first+PreallocateChunk) of d (up to
// its end) to free slots in tx. Free slots are durably zero (see
// zeroPool), so the disk reads as zeros.
func (c *Controller) preallocateTx(tx *meta.Tx, d meta.Disk, first uint64, pre *taking) error {
	segs := d.Segments()
	n := min(PreallocateChunk, segs-first)
	cs, err := tx.Containers()
	if err != nil {
		return err
	}
	a := &c.alloc
	a.mu.Lock()
	defer a.mu.Unlock()
	es := make([]table.Entry, 0, n)
	turn, hint := a.mu.turn, maps.Clone(a.mu.hint)
	for len(es) < int(n) {
		loc, ok, err := c.findFreeTx(tx, cs, d.SegmentSize, &turn, hint)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("%d of %d segments: %w", first+uint64(len(es)), segs, protocol.ErrNoSpace)
		}
		if !a.zs(loc.Container).done {
			return fmt.Errorf("container %d: %w", loc.Container, errNotZeroed)
		}
		if err := tx.SetRefs(loc, 1); err != nil {
			return err
		}
		// Reserved until the commit is over: an allocation meanwhile
		// would find it free in the store.
		a.mu.reserved[loc]++
		pre.all = append(pre.all, loc)
		es = append(es, table.At(loc, false))
	}
	if err := tx.SetEntries(d.ID, first, es); err != nil {
		return err
	}
	a.mu.turn, a.mu.hint = turn, hint
	return nil
}

// Disk returns the record of the disk called name.
func (c *Controller) Disk(ctx context.Context, name string) (meta.Disk, error) {
	var d meta.Disk
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		d, err = tx.Disk(name)
		return err
	})
	return d, wrapNotFound(err)
}

// Disks returns every disk.
func (c *Controller) Disks(ctx context.Context) ([]meta.Disk, error) {
	var ds []meta.Disk
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		ds, err = tx.Disks()
		return err
	})
	return ds, err
}

// Usage is how much storage a disk uses.
type Usage struct {
	// Allocated is the bytes of segments that hold a slot.
	Allocated uint64
	// Exclusive is the bytes of slots only this disk references;
	// Shared, those it shares with other disks.
	Exclusive, Shared uint64
}

// DiskUsage returns how much storage disk name uses.
func (c *Controller) DiskUsage(ctx context.Context, name string) (Usage, error) {
	if err := c.flushAll(ctx); err != nil {
		return Usage{}, err
	}
	var u Usage
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		d, err := tx.Disk(name)
		if err != nil {
			return err
		}
		return tx.ForEachMapped(d.ID, func(seg uint64, e table.Entry) error {
			n, err := shareCount(tx, d.ID, seg, e)
			if err != nil {
				return err
			}
			u.Allocated += d.SegmentSize
			if n > 1 {
				u.Shared += d.SegmentSize
			} else {
				u.Exclusive += d.SegmentSize
			}
			return nil
		})
	})
	return u, wrapNotFound(err)
}

// SnapshotOptions describes a snapshot of one disk or a consistency group.
type SnapshotOptions struct {
	// Sources are the disks to copy; Names the new disks' names, one per
	// source.
	Sources, Names []string
	// Writable makes the copies writable clones instead of read-only
	// snapshots.
	Writable bool
	// QuiesceTimeout bounds how long a group snapshot waits for an agent
	// to drain its I/O; 0 means 30 seconds.
	QuiesceTimeout time.Duration
	// Closed makes copies no agent may map until granted, in the same
	// transaction that makes them: the CSI driver's clones are born
	// closed, so a crash cannot leave one open to its source's nodes.
	Closed bool
}

// Snapshot copies the tables of the source disks, at one point in time
// across all of them:
//
//  1. if there are several sources, quiesce every agent that maps one;
//  2. set NoWrite on every entry of each source on every agent that maps
//     it, with Blocking, so no write made under the old entries is still
//     on its way;
//  3. in one transaction, create the copies sharing the sources' table
//     pages (no entry is written: No-write follows from the sharing);
//  4. activate.
func (c *Controller) Snapshot(ctx context.Context, o SnapshotOptions) ([]meta.Disk, error) {
	t0 := c.now()
	out, err := c.snapshot(ctx, o)
	if err == nil {
		c.met.Snapshot(len(o.Sources), c.now().Sub(t0))
	}
	return out, err
}

// snapshot is Snapshot, uncounted.
func (c *Controller) snapshot(ctx context.Context, o SnapshotOptions) ([]meta.Disk, error) {
	if len(o.Sources) == 0 || len(o.Sources) != len(o.Names) {
		return nil, fmt.Errorf("snapshot: %d sources, %d names: %w", len(o.Sources), len(o.Names), protocol.ErrBadRequest)
	}
	seen := map[string]bool{}
	for _, n := range append(append([]string(nil), o.Sources...), o.Names...) {
		if err := ValidName(n); err != nil {
			return nil, err
		}
		if seen[n] {
			return nil, fmt.Errorf("snapshot: %q named twice: %w", n, protocol.ErrBadRequest)
		}
		seen[n] = true
	}
	if o.QuiesceTimeout == 0 {
		o.QuiesceTimeout = 30 * time.Second
	}
	end, err := c.begin(ctx, false)
	if err != nil {
		return nil, err
	}
	defer end()

	// Check everything that can be checked before any agent is touched.
	srcs := make([]meta.Disk, len(o.Sources))
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		for i, n := range o.Sources {
			d, err := tx.Disk(n)
			if err != nil {
				return wrapNotFound(err)
			}
			srcs[i] = d
		}
		for _, n := range o.Names {
			if _, err := tx.Disk(n); err == nil {
				return fmt.Errorf("%q: %w", n, ErrExists)
			} else if !errors.Is(err, meta.ErrNotFound) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// The sources' families stop faulting that could change them until
	// the copies are committed.
	fams := make([]meta.DiskID, len(srcs))
	for i, d := range srcs {
		fams[i] = d.Family
	}
	unlock, err := c.lockFamilies(ctx, fams)
	defer unlock()
	if err != nil {
		return nil, err
	}
	// Read again under the locks: a source resized meanwhile must have
	// every segment of its new size set NoWrite below.
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		for i, n := range o.Sources {
			d, err := tx.Disk(n)
			if err != nil {
				return wrapNotFound(err)
			}
			if d.ID != srcs[i].ID {
				return fmt.Errorf("snapshot: %q was deleted and created again meanwhile: %w", n, protocol.ErrStale)
			}
			srcs[i] = d
		}
		return nil
	}); err != nil {
		return nil, err
	}

	// 1. Quiesce.
	if len(srcs) > 1 {
		type q struct {
			st *agentState
			id meta.DiskID
		}
		var quiesced []q
		t0 := c.now()
		defer func() {
			for _, x := range quiesced {
				if err := x.st.a.Activate(ctx, protocol.DiskID(x.id)); err != nil {
					c.logger.Warn("activate after snapshot", "agent", x.st.name, "err", err)
				}
			}
			if len(quiesced) > 0 {
				c.met.Quiesced(c.now().Sub(t0))
			}
		}()
		for _, d := range srcs {
			for _, st := range c.mappers(d.ID, "") {
				// Record before asking: a quiesce that fails half way
				// still gets its activate.
				quiesced = append(quiesced, q{st, d.ID})
				if err := st.a.Quiesce(ctx, protocol.DiskID(d.ID), o.QuiesceTimeout); err != nil {
					return nil, fmt.Errorf("snapshot: quiesce %q on agent %q: %w", d.Name, st.name, err)
				}
			}
		}
	}

	// 2. NoWrite on every agent, Blocking: when it answers, no write
	// made under the old entries is on its way, and those writes are
	// durable.
	errs := make([]error, len(srcs))
	var wg sync.WaitGroup
	for i, d := range srcs {
		wg.Go(func() {
			cmd := protocol.SetEntryState{Disk: protocol.DiskID(d.ID), First: 0, Count: d.Segments(), State: table.NoWrite, On: true, Blocking: true}
			if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }); err != nil {
				// Nothing is committed; the extra NoWrite bits some
				// agents got only cost a fault each.
				errs[i] = fmt.Errorf("snapshot: set NoWrite on %q: %w", d.Name, err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	// 3. One transaction.
	out := make([]meta.Disk, len(srcs))
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		for i, src := range srcs {
			// The copy shares the source's table pages: no entry
			// is written, no slot count changes. No-write follows
			// from the sharing (see effective).
			nd, err := tx.CreateDisk(meta.Disk{
				Name: o.Names[i], Size: src.Size, SegmentSize: src.SegmentSize, Policy: src.Policy,
				Origin: src.ID, Family: src.Family, ReadOnly: !o.Writable, Created: c.now().UTC(),
			})
			if err != nil {
				return err
			}
			if err := tx.CopyTable(src.ID, nd.ID); err != nil {
				return err
			}
			// A copy may be mapped by the agents that could map
			// its source.
			gs, all, err := tx.Grants(src.ID)
			if err != nil {
				return err
			}
			if o.Closed {
				gs, all = []string{}, false
			}
			if err := tx.SetGrants(nd.ID, gs, all); err != nil {
				return err
			}
			out[i] = nd
		}
		return nil
	})
	if errors.Is(err, meta.ErrExists) {
		err = fmt.Errorf("%w: %w", ErrExists, err)
	}
	if err != nil {
		return nil, err
	}
	for i, nd := range out {
		c.logger.Info("snapshot created", "disk", nd.Name, "source", srcs[i].Name, "writable", o.Writable, "group", len(out) > 1)
	}
	// 4. Activate: deferred above.
	return out, nil
}

// Grants returns the agents allowed to map disk name; all is true if any
// agent may.
func (c *Controller) Grants(ctx context.Context, name string) (agents []string, all bool, err error) {
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		d, err := tx.Disk(name)
		if err != nil {
			return err
		}
		agents, all, err = tx.Grants(d.ID)
		return err
	})
	return agents, all, wrapNotFound(err)
}

// Grant lets agents map disk name; with all, any agent may.
func (c *Controller) Grant(ctx context.Context, name string, agents []string, all bool) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	return wrapNotFound(c.store.Update(ctx, func(tx *meta.Tx) error {
		d, err := tx.Disk(name)
		if err != nil {
			return err
		}
		if all {
			return tx.SetGrants(d.ID, nil, true)
		}
		gs, was, err := tx.Grants(d.ID)
		if err != nil || was {
			return err // any agent may already
		}
		for _, a := range agents {
			if !slices.Contains(gs, a) {
				gs = append(gs, a)
			}
		}
		return tx.SetGrants(d.ID, gs, false)
	}))
}

// Revoke takes disk name away from agents: an agent that maps it forgets
// it first (waiting for its I/O), and cannot map it again. Revoking from a
// disk any agent may map leaves it to every agent attached now but those.
func (c *Controller) Revoke(ctx context.Context, name string, agents []string) error {
	return c.regrant(ctx, name, func(gs []string, all bool) []string {
		if all {
			gs = nil
			for _, a := range c.Agents() {
				gs = append(gs, a.Name)
			}
		}
		return slices.DeleteFunc(gs, func(a string) bool { return slices.Contains(agents, a) })
	})
}

// GrantOnly lets exactly agents map disk name (none if agents is empty),
// replacing every earlier grant: an agent that maps it and is not among
// agents forgets it first, as at Revoke. The CSI driver keeps a volume
// to the node it is published to this way.
func (c *Controller) GrantOnly(ctx context.Context, name string, agents []string) error {
	return c.regrant(ctx, name, func([]string, bool) []string { return agents })
}

// regrant sets disk name's grants to what next makes of the current ones,
// after every agent that maps the disk and is left out has forgotten it.
func (c *Controller) regrant(ctx context.Context, name string, next func(gs []string, all bool) []string) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	d, unlock, err := c.lockDisk(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	gs, all, err := c.grants(ctx, d.ID)
	if err != nil {
		return err
	}
	keep := next(slices.Clone(gs), all)
	for _, st := range c.mappers(d.ID, "") {
		if slices.Contains(keep, st.name) {
			continue
		}
		if err := st.a.DeleteTable(ctx, protocol.DiskID(d.ID)); err != nil {
			return fmt.Errorf("revoke %q from %q: %w", name, st.name, err)
		}
		c.agents.Lock()
		delete(st.disks, d.ID)
		c.agents.Unlock()
	}
	return c.store.Update(ctx, func(tx *meta.Tx) error {
		gs, all, err := tx.Grants(d.ID)
		if err != nil {
			return err
		}
		keep := next(gs, all)
		if keep == nil {
			keep = []string{}
		}
		return tx.SetGrants(d.ID, keep, false)
	})
}

// grants reads disk id's grants.
func (c *Controller) grants(ctx context.Context, id meta.DiskID) (agents []string, all bool, err error) {
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		agents, all, err = tx.Grants(id)
		return err
	})
	return agents, all, err
}

// DeleteFrees returns how many bytes of slots deleting disk name would
// free: those that only its table references. Like the delete, it costs
// the table pages only the disk holds (a page it shares with a snapshot or
// clone goes on holding its slots); it reads no data.
func (c *Controller) DeleteFrees(ctx context.Context, name string) (uint64, error) {
	end, err := c.begin(ctx, false)
	if err != nil {
		return 0, err
	}
	defer end()
	d, unlock, err := c.lockDisk(ctx, name)
	if err != nil {
		return 0, err
	}
	defer unlock()
	var freed uint64
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		pages, err := tx.TablePages(d.ID)
		if err != nil {
			return err
		}
		// Slot counts count the table pages' entries that name the
		// slot; a page shared with another disk stays.
		held := make(map[table.Location]uint32)
		for _, p := range pages {
			refs, err := tx.PageRefs(p.ID)
			if err != nil {
				return err
			}
			if refs > 1 {
				continue
			}
			es, err := tx.Page(p.ID)
			if err != nil {
				return err
			}
			for _, e := range es {
				e.Slots(func(l table.Location) { held[l]++ })
			}
		}
		for l, n := range held {
			refs, err := tx.Refs(l)
			if err != nil {
				return err
			}
			if refs <= n {
				freed += d.SegmentSize
			}
		}
		return nil
	})
	return freed, err
}

// DeleteDisk deletes a disk. Agents that map it forget it first (waiting
// for their I/O to it), then its references are dropped in one transaction;
// slots no one references any more are freed and punched.
func (c *Controller) DeleteDisk(ctx context.Context, name string) error {
	_, err := c.DeleteDiskFreed(ctx, name)
	return err
}

// DeleteDiskFreed is DeleteDisk, returning the bytes of the slots it freed
// (what DeleteFrees said it would).
func (c *Controller) DeleteDiskFreed(ctx context.Context, name string) (uint64, error) {
	end, err := c.begin(ctx, false)
	if err != nil {
		return 0, err
	}
	defer end()
	d, unlock, err := c.lockDisk(ctx, name)
	if err != nil {
		return 0, err
	}
	defer func() { unlock() }()
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error {
		return a.DeleteTable(ctx, protocol.DiskID(d.ID))
	}); err != nil {
		return 0, fmt.Errorf("delete %q: %w", name, err)
	}
	c.forget(d.ID)
	fr := c.newFreeing()
	var nfreed int
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		freed, err := tx.DeleteDisk(d.ID)
		for _, loc := range freed {
			fr.add(loc)
		}
		nfreed = len(freed)
		return err
	})
	fr.finish(ctx, err)
	if err != nil {
		return 0, err
	}
	unlock()
	unlock = func() {}
	c.logger.Info("disk deleted", "disk", name, "freed", uint64(nfreed)*d.SegmentSize)
	// The family's partial entries that named the deleted disk's slots
	// alone may be made whole now, giving back what it held. The delete
	// is done whatever comes of that.
	if n, err := c.compactFamily(ctx, d.Family); err != nil {
		c.logger.Warn("compact partial entries after a delete", "disk", name, "merged", n, "err", err)
	} else if n > 0 {
		c.logger.Debug("partial entries made whole after a delete", "disk", name, "merged", n)
	}
	return uint64(nfreed) * d.SegmentSize, nil
}

// resizeFailed tells the agents that map d the size the store
// holds after a resize's commit failed: a shrink was told before its
// commit, and a failed commit may have landed all the same. A failure is
// only logged.
func (c *Controller) resizeFailed(ctx context.Context, d meta.Disk) {
	cur, err := c.Disk(ctx, d.Name)
	if err != nil || cur.ID != d.ID {
		c.logger.Warn("reload a disk after a failed resize", "disk", d.Name, "err", err)
		return
	}
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error {
		return a.NewTable(ctx, toMapping(cur))
	}); err != nil {
		c.logger.Warn("restore the size after a failed resize", "disk", d.Name, "err", err)
	}
}

// ResizeDisk changes a disk's size. New segments are Zero. Shrinking drops
// the segments past the new end and is refused unless shrink is set.
func (c *Controller) ResizeDisk(ctx context.Context, name string, size uint64, shrink bool) (meta.Disk, error) {
	if err := ValidSize(size); err != nil {
		return meta.Disk{}, err
	}
	end, err := c.begin(ctx, false)
	if err != nil {
		return meta.Disk{}, err
	}
	defer end()
	d, unlock, err := c.lockDisk(ctx, name)
	if err != nil {
		return meta.Disk{}, err
	}
	defer unlock()
	if err := ValidGeometry(size, d.SegmentSize); err != nil {
		return meta.Disk{}, err
	}
	if size < d.Size && !shrink {
		return meta.Disk{}, fmt.Errorf("%q from %d to %d bytes: %w", name, d.Size, size, ErrShrink)
	}
	if size < d.Size && size%d.SegmentSize != 0 {
		// A segment cut in the middle would keep its tail, which a later
		// grow would expose.
		return meta.Disk{}, fmt.Errorf("shrink %q to %d bytes: %w (shrink to a multiple of the segment size, %d)", name, size, ErrInvalidSize, d.SegmentSize)
	}
	nd := d
	nd.Size = size
	// Agents reload the table at its new size; NewTable waits for I/O in
	// flight, so nothing is still writing past a shrunk end. A shrink is
	// restrictive, so agents hear of it before the commit; a grow is
	// permissive, so after.
	newTable := func() error {
		return c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error {
			return a.NewTable(ctx, toMapping(nd))
		})
	}
	if size < d.Size {
		if err := newTable(); err != nil {
			return meta.Disk{}, fmt.Errorf("shrink %q: %w", name, err)
		}
	}
	fr := c.newFreeing()
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		if size < d.Size {
			from := nd.Segments()
			if err := tx.Unshare(d.ID, from, d.Segments()-from); err != nil {
				return err
			}
			if err := tx.ForEachMapped(d.ID, func(seg uint64, e table.Entry) error {
				if seg < from {
					return nil
				}
				if err := tx.SetEntries(d.ID, seg, []table.Entry{table.ZeroEntry}); err != nil {
					return err
				}
				return dropRefs(tx, e, fr)
			}); err != nil {
				return err
			}
		}
		return tx.PutDisk(nd)
	})
	fr.finish(ctx, err)
	if err != nil {
		c.resizeFailed(ctx, d)
		return meta.Disk{}, err
	}
	if size > d.Size {
		if err := newTable(); err != nil {
			return meta.Disk{}, fmt.Errorf("grow %q: committed, but %w", name, err)
		}
	}
	c.logger.Info("disk resized", "disk", name, "from", d.Size, "size", size)
	return nd, nil
}
