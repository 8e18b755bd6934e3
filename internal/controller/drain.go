package controller

import (
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

// Drain moves every slot off container id onto the other online
// containers of its slot size while hosts keep reading and writing the
// disks that use it. The container is first marked draining, durably, so
// that no slot is allocated on it any more; then every segment index of
// every family that names one of its slots is moved, one at a time
// (drainSeg): under the locks a write fault takes, the agents that map
// the entries are told to stop writing (No-write, Blocking: writes
// already on their way land first), the slots are copied to newly
// allocated ones, every entry that names them is repointed in one
// transaction (so a slot shared by a snapshot moves once and stays
// shared, and the layers of partial entries move too), the agents are
// given the new entries, and the old slots are freed.
//
// A drain that stops (an error, a cancelled context, a controller
// restart) leaves each segment either moved or not, and the container
// draining: running Drain again continues it. progress, if set, is
// called after each segment with the slots moved and the slots to move
// (which grows if a write in flight when the drain began commits a slot
// on the container later). Drain returns once no slot of the container
// is used and none is reserved by a write in flight; the container can
// then be removed (RemoveContainer).
func (c *Controller) Drain(ctx context.Context, id uint32, progress func(done, total uint64)) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	var ct meta.Container
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		var err error
		if ct, err = tx.Container(id); err != nil {
			return err
		}
		if ct.State == meta.ContainerFailed {
			return fmt.Errorf("container %d: %w", id, ErrContainerFailed)
		}
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		// Refused at once, and the container left online, when its
		// slots cannot fit elsewhere. (Space may still run out on
		// the way, taken by writes: the drain then stops, draining.)
		if free := poolFree(cs, ct.SlotSize, id); free < ct.Used {
			return fmt.Errorf("container %d holds %d slots; the other online containers of its slot size have %d free: %w", id, ct.Used, free, protocol.ErrNoSpace)
		}
		if ct.State == meta.ContainerOnline {
			ct, err = tx.SetContainerState(id, meta.ContainerDraining)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("drain container %d: %w", id, wrapNotFound(err))
	}
	c.logger.Info("draining container", "container", id, "used", ct.Used)
	var done, total uint64
	total = ct.Used
	leak := false // the last scan found used slots that no entry names
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		// Map changes kept in memory may name the container's slots
		// (allocated before it was marked draining): the scan reads
		// the store.
		if err := c.flushAll(ctx); err != nil {
			return fmt.Errorf("drain container %d: %w", id, err)
		}
		work, used, err := c.drainWork(ctx, id)
		if err != nil {
			return fmt.Errorf("drain container %d: %w", id, err)
		}
		total = max(total, done+used)
		if len(work) == 0 {
			reserved, released := c.alloc.reservations(id)
			switch {
			case used == 0 && reserved == 0:
				if progress != nil {
					progress(done, done)
				}
				c.logger.Info("container drained", "container", id, "moved", done)
				return nil
			case reserved == 0 && leak:
				return fmt.Errorf("drain container %d: %d slots used that no table entry names (run check): %w", id, used, ErrDrainStuck)
			case reserved == 0:
				// A write's commit may have landed between the
				// scan and now (it commits, then gives back its
				// reservation): scan once more.
				leak = true
				continue
			}
			// Slots reserved by writes in flight (taken before the
			// container was marked draining, or fills in place of
			// slots moved since) commit or go back soon.
			leak = false
			wctx, cancel := context.WithTimeout(ctx, drainReservedWait)
			select {
			case <-released:
				cancel()
				continue
			case <-wctx.Done():
				cancel()
				if err := ctx.Err(); err != nil {
					return err
				}
				return fmt.Errorf("drain container %d: %d slots reserved by writes in flight for %v: %w (run drain again)", id, reserved, drainReservedWait, ErrDrainStuck)
			}
		}
		leak = false
		if err := c.drainAll(ctx, id, work, func(n uint64) {
			done += n
			total = max(total, done)
			if progress != nil {
				progress(done, total)
			}
		}); err != nil {
			return err
		}
	}
}

// DefaultDrainMoves is how many segments a drain moves at once by default:
// each waits for its copy's flush and its commit, which the others
// overlap.
const DefaultDrainMoves = 16

// drainAll moves the slots of container id at every index of work,
// c.drainMoves at a time, calling moved (one call at a time) with the slots
// each move took off. It stops at the first error.
func (c *Controller) drainAll(ctx context.Context, id uint32, work []famSeg, moved func(uint64)) error {
	n := make([]uint64, len(work))
	return c.eachMove(ctx, len(work), func(ctx context.Context, k int) error {
		var err error
		n[k], err = c.drainSeg(ctx, id, work[k])
		if err == nil {
			err = ctx.Err()
		}
		if err != nil {
			return fmt.Errorf("drain container %d: family %d segment %d: %w", id, work[k].fam, work[k].seg, err)
		}
		return nil
	}, func(k int) { moved(n[k]) })
}

// eachMove runs do(ctx, k) for every k in [0, count), c.drainMoves at a
// time (a drain's or a rebuild's segment moves: each waits for its
// copy's flush and its commit, which the others overlap), calling done(k)
// after each that succeeded, one call at a time. It stops at the first
// error, cancelling the moves under way, and returns it.
func (c *Controller) eachMove(ctx context.Context, count int, do func(ctx context.Context, k int) error, done func(k int)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu    sync.Mutex
		first error
		next  int
		wg    sync.WaitGroup
	)
	for range min(c.drainMoves, count) {
		wg.Go(func() {
			for {
				mu.Lock()
				if first == nil && ctx.Err() != nil {
					first = ctx.Err()
				}
				if first != nil || next == count {
					mu.Unlock()
					return
				}
				k := next
				next++
				mu.Unlock()
				err := do(ctx, k)
				mu.Lock()
				if err != nil && first == nil {
					first = err
					cancel()
				}
				if err == nil {
					done(k)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

// poolFree returns the free slots of the online containers of slotSize
// but skip.
func poolFree(cs []meta.Container, slotSize uint64, skip uint32) uint64 {
	var n uint64
	for _, c := range cs {
		if c.ID != skip && c.SlotSize == slotSize && c.State == meta.ContainerOnline {
			n += c.Free()
		}
	}
	return n
}

// ResumeDrains continues, in the background, the drain of every
// container left draining with slots in use: a drain that a controller
// restart or failover interrupted goes on by itself, as if its command
// had been run again. The controller owns the goroutines: Close and Kill
// stop them and wait for them. A drain that fails is logged; running
// 'container drain' again retries it.
//
// It also loads which containers failed (health.go), which faults need
// from the start.
func (c *Controller) ResumeDrains(ctx context.Context) {
	if err := c.loadFailed(ctx); err != nil {
		c.logger.Warn("load failed containers", "err", err)
	}
	var ids []uint32
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		for _, ct := range cs {
			if ct.State == meta.ContainerDraining && ct.Used > 0 {
				ids = append(ids, ct.ID)
			}
		}
		return err
	}); err != nil {
		c.logger.Warn("resume drains: list containers", "err", err)
		return
	}
	c.ResumeRebuilds(ctx)
	for _, id := range ids {
		c.logger.Info("resuming the drain of a container", "container", id)
		c.bg.wg.Go(func() {
			op := c.StartOperation(OpDrain, fmt.Sprintf("container %d", id), UnitSlots)
			err := c.Drain(c.bg.ctx, id, op.Progress)
			op.Finish(err)
			if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, ErrClosed) {
				c.logger.Warn("resumed drain failed; run 'segmap container drain' again", "container", id, "err", err)
			}
		})
	}
}

// drainReservedWait is how long Drain waits, at most, for a slot of the
// container that a write in flight reserved to be committed or given
// back.
const drainReservedWait = 30 * time.Second

// drainWork returns the segment indexes, per family, of the entries
// that name a slot of container id, in order, and the container's used
// slots.
func (c *Controller) drainWork(ctx context.Context, id uint32) (work []famSeg, used uint64, err error) {
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		ct, err := tx.Container(id)
		if err != nil {
			return err
		}
		used = ct.Used
		if used == 0 {
			return nil
		}
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		seen := map[famSeg]bool{}
		for _, d := range ds {
			if err := tx.ForEachMapped(d.ID, func(seg uint64, e table.Entry) error {
				if names(e, id) && !seen[famSeg{d.Family, seg}] {
					seen[famSeg{d.Family, seg}] = true
					work = append(work, famSeg{d.Family, seg})
				}
				return nil
			}); err != nil {
				return err
			}
		}
		return nil
	})
	slices.SortFunc(work, func(a, b famSeg) int {
		if a.fam != b.fam {
			return int(a.fam) - int(b.fam)
		}
		return int(a.seg) - int(b.seg)
	})
	return work, used, wrapNotFound(err)
}

// names reports whether entry e names a slot of container id.
func names(e table.Entry, id uint32) bool {
	found := false
	e.Slots(func(l table.Location) { found = found || l.Container == id })
	return found
}

// drainSeg moves the slots of container id that segment index w.seg of
// family w.fam names, and returns how many it moved. Map changes kept in
// memory at the index are committed first: the move's commit goes to the
// store, whose counts must be whole.
func (c *Controller) drainSeg(ctx context.Context, id uint32, w famSeg) (uint64, error) {
	for try := 0; ; try++ {
		n, flush, err := c.drainSegOnce(ctx, id, w)
		if !flush || err != nil {
			return n, err
		}
		if try == 8 {
			return 0, fmt.Errorf("map changes kept in memory keep coming: %w", protocol.ErrStale)
		}
		// Without the segment's lock: the flush takes it.
		if err := c.flushFamily(ctx, w.fam, false); err != nil {
			return 0, err
		}
	}
}

// drainEntry is one disk's entry at the segment being drained.
type drainEntry struct {
	d  meta.Disk
	e  table.Entry // as stored
	ne table.Entry // relocated
}

// drainSegOnce is one try of drainSeg, under the family lock (shared)
// and the segment's lock, as a write fault: no fault changes the entries
// at the index meanwhile, and since disks share slots only within a
// family and at one index, every entry that names the slots is among
// them. It reports flush, doing nothing, if the family keeps map changes
// in memory at the index.
func (c *Controller) drainSegOnce(ctx context.Context, id uint32, w famSeg) (moved uint64, flush bool, err error) {
	defer c.lockFamily(w.fam, false)()
	defer c.lockSegment(w.fam, w.seg)()
	var (
		ents []drainEntry
		olds = map[table.Location]table.Bits{} // the slots to move: the sub-blocks read from each
		size uint64
	)
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		for _, d := range ds {
			if d.Family != w.fam || w.seg >= d.Segments() {
				continue
			}
			if _, ok := c.pendingEntry(d.Family, d.ID, w.seg); ok {
				flush = true
				return nil
			}
			e, err := tx.Entry(d.ID, w.seg)
			if err != nil {
				return err
			}
			if !names(e, id) {
				continue
			}
			size = d.SegmentSize
			n := table.SubBlockCount(d.SegmentSize)
			e.Slots(func(l table.Location) {
				if c.refsDelta(d.Family, w.seg, l) != 0 {
					flush = true
				}
			})
			for _, l := range layersOf(e, n) {
				if l.Loc.Container == id {
					olds[l.Loc] = olds[l.Loc].Or(l.Bits)
				}
			}
			ents = append(ents, drainEntry{d: d, e: e})
		}
		return nil
	}); err != nil || flush || len(ents) == 0 {
		return 0, flush, wrapNotFound(err)
	}

	// New slots first, outside the publish lock: a zeroing of their
	// container may run.
	news := map[table.Location]table.Location{}
	defer func() {
		for _, nl := range news {
			// Committed ones are counted now; the others hold a
			// copy, or may.
			c.alloc.release(nl, err != nil)
		}
	}()
	for _, ol := range sortedLocs(olds) {
		nl, err := c.takeSlot(ctx, size)
		if err != nil {
			return 0, false, err
		}
		if nl.Container == id {
			// Cannot happen: the container is not online.
			c.alloc.release(nl, false)
			return 0, false, fmt.Errorf("allocator handed out %v on a draining container: %w", nl, meta.ErrCorrupt)
		}
		news[ol] = nl
	}
	relocate := func(l table.Location) table.Location {
		if nl, ok := news[l]; ok {
			return nl
		}
		return l
	}
	for i := range ents {
		ents[i].ne = ents[i].e.Relocate(relocate)
	}

	// From the first restrictive command until every agent has the new
	// entries, read faults on the index wait: they would answer with
	// the old entry, writable, which the agent would install and write
	// through after the copy.
	defer c.lockPublish(w.fam, w.seg, true)()

	// 1. Block writes: when every agent has answered, no write to the
	// old slots is on its way, and none starts (a write faults, and
	// waits for the segment's lock).
	for _, de := range ents {
		cmd := protocol.SetEntryState{Disk: protocol.DiskID(de.d.ID), First: w.seg, Count: 1, State: table.NoWrite, On: true, Blocking: true}
		if err := c.broadcast(ctx, de.d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }); err != nil {
			// Some agent may still write: nothing is moved. The
			// others have only an extra No-write, which a fault
			// clears without a copy.
			return 0, false, fmt.Errorf("stop writes to %q: %w", de.d.Name, err)
		}
	}

	// 2. Copy, and flush: data before the map.
	for _, ol := range sortedLocs(olds) {
		if err := c.copyBits(ctx, ol, news[ol], olds[ol], size); err != nil {
			return 0, false, err
		}
	}

	// 3. Commit every entry's new location, and the counts, at once.
	fr := c.newFreeing()
	tops := map[meta.DiskID]uint32{} // per disk: its new top slot's count
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		clear(tops)
		for _, de := range ents {
			e, err := tx.Entry(de.d.ID, w.seg)
			if err != nil {
				return err
			}
			if !e.Equal(de.e) {
				return fmt.Errorf("%q segment %d changed under its lock: %w", de.d.Name, w.seg, meta.ErrCorrupt)
			}
			// A page of its own, so that the slot counts alone
			// tell what is shared and move with the entries.
			if err := tx.Unshare(de.d.ID, w.seg, 1); err != nil {
				return err
			}
		}
		for _, de := range ents {
			if err := moveRefs(tx, de.e, de.ne, fr); err != nil {
				return err
			}
			if err := tx.SetEntries(de.d.ID, w.seg, []table.Entry{de.ne}); err != nil {
				return err
			}
		}
		for _, ol := range sortedLocs(olds) {
			n, err := tx.Refs(ol)
			if err != nil {
				return err
			}
			if n != 0 {
				return fmt.Errorf("slot %v still has %d references after its family's entries moved: %w (run check)", ol, n, meta.ErrCorrupt)
			}
		}
		for _, de := range ents {
			n, err := tx.Refs(de.ne.Loc)
			if err != nil {
				return err
			}
			tops[de.d.ID] = n
		}
		return nil
	})
	if err != nil {
		fr.finish(ctx, err)
		ds := make([]meta.Disk, len(ents))
		for i, de := range ents {
			ds[i] = de.d
		}
		c.unsettled(ctx, w.seg, ds...)
		return 0, false, err
	}
	for ol, nl := range news {
		c.alloc.release(nl, false)
		delete(news, ol)
		moved++
	}

	// 4. The new entries, to every agent (writable ones in two rounds
	// when several agents map a disk: see moveMappers). Then the old
	// slots are punched and freed: no agent reads them any more.
	var errs []error
	for _, de := range ents {
		if err := c.moveMappers(ctx, de.d, w.seg, effective(de.ne, tops[de.d.ID]), false); err != nil {
			errs = append(errs, err)
			c.unsettled(ctx, w.seg, de.d)
		}
	}
	fr.finish(ctx, nil)
	return moved, false, errors.Join(errs...)
}

// layersOf returns the slots entry e names with the sub-blocks it reads
// from each: its own slot (every sub-block, for a whole entry) and its
// layers.
func layersOf(e table.Entry, n int) []table.Layer {
	if !e.Partial() {
		return []table.Layer{{Loc: e.Loc, Bits: table.Full(n)}}
	}
	out := []table.Layer{{Loc: e.Loc, Bits: e.Part.Bits}}
	return append(out, e.Part.Under...)
}

// copyBits copies the sub-blocks bits of slot from into slot to, and
// flushes to's container. The sub-blocks no entry reads from the slot
// are not copied: to, zero when allocated, stays as sparse as from was.
func (c *Controller) copyBits(ctx context.Context, from, to table.Location, bits table.Bits, size uint64) error {
	src, err := c.container(ctx, from.Container)
	if err != nil {
		return err
	}
	dst, err := c.container(ctx, to.Container)
	if err != nil {
		return err
	}
	sb, n := table.SubBlockSize(size), table.SubBlockCount(size)
	buf := make([]byte, min(size, 1<<20))
	for i := 0; i < n; {
		if !bits.Test(i) {
			i++
			continue
		}
		j := i + 1
		for j < n && bits.Test(j) {
			j++
		}
		for off, end := uint64(i)*sb, uint64(j)*sb; off < end; {
			b := buf[:min(uint64(len(buf)), end-off)]
			if _, err := src.ReadAt(b, int64(uint64(from.Slot)*size+off)); err != nil {
				return fmt.Errorf("drain read %v: %w: %w", from, protocol.ErrIO, err)
			}
			if _, err := dst.WriteAt(b, int64(uint64(to.Slot)*size+off)); err != nil {
				return fmt.Errorf("drain write %v: %w: %w", to, protocol.ErrIO, err)
			}
			off += uint64(len(b))
		}
		i = j
	}
	if err := dst.Flush(); err != nil {
		return fmt.Errorf("drain flush %v: %w: %w", to, protocol.ErrIO, err)
	}
	return nil
}

// RemoveContainer removes container id from the cluster: its record is
// deleted and the controller closes it. It must hold no slot (drain it
// first: ErrContainerInUse, with the count, otherwise). An online
// container is first marked draining, in a transaction of its own, so
// that no fault takes a slot on it between the check and the removal; a
// slot that a write in flight reserved on it before then makes the
// remove fail (ErrContainerInUse), with the container left draining:
// try again.
func (c *Controller) RemoveContainer(ctx context.Context, id uint32) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	// Changes kept in memory may use its slots.
	if err := c.flushAll(ctx); err != nil {
		return fmt.Errorf("remove container %d: %w", id, err)
	}
	inUse := func(ct meta.Container) error {
		if ct.Used != 0 {
			return fmt.Errorf("container %d holds %d slots: %w", id, ct.Used, ErrContainerInUse)
		}
		return nil
	}
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		ct, err := tx.Container(id)
		if err != nil {
			return err
		}
		if err := inUse(ct); err != nil {
			return err
		}
		if ct.State == meta.ContainerOnline {
			_, err = tx.SetContainerState(id, meta.ContainerDraining)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("remove container %d: %w", id, wrapNotFound(err))
	}
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		ct, err := tx.Container(id)
		if err != nil {
			return err
		}
		if err := inUse(ct); err != nil {
			return err
		}
		// No fault can reserve a slot on it now (it is not online),
		// and one that did before is still reserved: takeSlot holds
		// the allocator's lock from its read of the container to its
		// reservation.
		if n := c.alloc.reservedOn(id); n != 0 {
			return fmt.Errorf("container %d: %d slots reserved by writes in flight: %w", id, n, ErrContainerInUse)
		}
		return tx.RemoveContainer(id)
	})
	if errors.Is(err, meta.ErrInUse) {
		err = fmt.Errorf("%w: %w", ErrContainerInUse, err)
	}
	if err != nil {
		return fmt.Errorf("remove container %d: %w", id, wrapNotFound(err))
	}
	c.conts.drop(id)
	c.logger.Info("container removed", "container", id)
	return nil
}
