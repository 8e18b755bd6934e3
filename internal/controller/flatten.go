package controller

import (
	"context"
	"fmt"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Flatten makes the writable disk name stop sharing storage with the
// other disks of its lineage: every segment whose slots it shares is
// copied to a slot of its own, one segment at a time, as a write's
// copy-on-write would (the controller copies; agents that map the disk
// are moved to the copy before the segment's lock is let go, and a write
// to the segment meanwhile waits for that lock, so none is lost). The disk
// stays online throughout; progress, if set, is called after each segment
// with the segments done and the total. At the end the disk's origin is
// cleared: `disk tree` shows it on its own. A flatten that stops half way
// (an error, a restart) leaves every segment either shared or copied, and
// a second flatten finishes the job.
func (c *Controller) Flatten(ctx context.Context, name string, progress func(done, total uint64)) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	d, err := c.Disk(ctx, name)
	if err != nil {
		return err
	}
	if d.ReadOnly {
		return fmt.Errorf("flatten %q: %w", name, protocol.ErrReadOnly)
	}
	total := d.Segments()
	for seg := uint64(0); seg < total; seg++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := c.flattenSeg(ctx, d.ID, seg); err != nil {
			return fmt.Errorf("flatten %q segment %d: %w", name, seg, err)
		}
		if progress != nil {
			progress(seg+1, total)
		}
	}
	nd, unlock, err := c.lockDisk(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	if nd.ID != d.ID || nd.Origin == 0 {
		return nil
	}
	nd.Origin = 0
	return c.store.Update(ctx, func(tx *meta.Tx) error { return tx.PutDisk(nd) })
}

// flattenSeg gives disk id's segment seg slots of its own if it shares
// any. Map changes kept in memory at the segment (a lone agent's writes)
// are committed first: the copy's commit goes to the store, whose counts
// must be whole.
func (c *Controller) flattenSeg(ctx context.Context, id meta.DiskID, seg uint64) error {
	for try := 0; ; try++ {
		fam, flush, err := c.flattenSegOnce(ctx, id, seg)
		if !flush || err != nil {
			return err
		}
		if try == 8 {
			return fmt.Errorf("map changes kept in memory keep coming: %w", protocol.ErrStale)
		}
		// Without the segment's lock: the flush takes it.
		if err := c.flushFamily(ctx, fam, false); err != nil {
			return err
		}
	}
}

// flattenSegOnce is one try of flattenSeg, under the locks a write fault
// takes. It reports flush, doing nothing, if the family keeps map changes
// in memory at seg.
func (c *Controller) flattenSegOnce(ctx context.Context, id meta.DiskID, seg uint64) (fam meta.DiskID, flush bool, err error) {
	var d meta.Disk
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		d, err = tx.DiskByID(id)
		return err
	}); err != nil {
		return 0, false, wrapNotFound(err)
	}
	fam = d.Family
	defer c.lockFamily(d.Family, false)()
	defer c.lockSegment(d.Family, seg)()
	var (
		e      table.Entry
		shared bool
	)
	read := func(tx *meta.Tx) error {
		var err error
		if d, err = tx.DiskByID(id); err != nil {
			return err
		}
		if seg >= d.Segments() {
			e = table.ZeroEntry // shrunk meanwhile
			return nil
		}
		got, err := tx.Entry(d.ID, seg)
		if err != nil {
			return err
		}
		if _, ok := c.pendingEntry(d.Family, d.ID, seg); ok {
			flush = true
			return nil
		}
		e, shared = got, false
		var serr error
		e.Slots(func(l table.Location) {
			refs, err := tx.Refs(l)
			if err != nil {
				serr = err
				return
			}
			if c.refsDelta(d.Family, seg, l) != 0 {
				flush = true
			}
			if refs > 1 {
				shared = true
			}
		})
		return serr
	}
	var pageShared bool
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		if err := read(tx); err != nil {
			return err
		}
		var err error
		if seg < d.Segments() {
			pageShared, err = tx.PageShared(d.ID, seg)
		}
		return err
	}); err != nil {
		return fam, false, wrapNotFound(err)
	}
	if flush {
		return fam, true, nil
	}
	if pageShared && e.Mapped() {
		// As a write fault does: a page of its own first, so that the
		// slot counts alone tell what is shared.
		if err := c.store.Update(ctx, func(tx *meta.Tx) error {
			if err := tx.Unshare(d.ID, seg, 1); err != nil {
				return err
			}
			return read(tx)
		}); err != nil {
			return fam, false, err
		}
		if flush {
			return fam, true, nil
		}
	}
	if d.ReadOnly || !e.Mapped() || !shared {
		return fam, false, nil
	}
	n := table.SubBlockCount(d.SegmentSize)
	r := &faultRun{
		f: protocol.Fault{Disk: protocol.DiskID(d.ID), Segment: seg, Count: 1, Op: protocol.FaultWrite},
		d: d, seg: seg, e: effective(e, 2), plan: table.CopyForward, bits: table.Full(n), n: n,
	}
	_, err = c.run(ctx, r, table.Effects(table.CopyForward, false))
	return fam, false, err
}
