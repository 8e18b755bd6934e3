package controller

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Compaction of partial entries.
//
// A partial entry keeps the slots under it for as long as it names them,
// even once the snapshot that wrote them is gone. When no other entry
// names any of its slots any more (the snapshots that shared them were
// deleted), the sub-blocks the upper layers hold are copied down into the
// base, the entry becomes whole again over the base, and the upper slots
// are freed: the disk holds one slot per segment again, and the space the
// snapshots held goes back.
//
// Merging down rather than up copies only what was written since the
// snapshots (the upper layers' sub-blocks), not the segment. The base is
// written in place, but only at sub-blocks the layers above it hide, which
// no one reads: the entry is its only holder. The mappers drop the entry
// first (Invalid, Blocking), so no write to the top is on its way while it
// is copied; the copy is flushed before the commit that makes the base
// whole (data before the map), so a crash between the two leaves the
// partial entry, still correct, and the copy in hidden sub-blocks.

// compactWorkers bounds the segments compacted at once.
const compactWorkers = 8

// compactFamily compacts every partial entry of the disks of family fam
// whose slots no other entry names. It returns how many it made whole.
func (c *Controller) compactFamily(ctx context.Context, fam meta.DiskID) (int, error) {
	type cand struct {
		d   meta.Disk
		seg uint64
	}
	var cands []cand
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		for _, d := range ds {
			if d.Family != fam {
				continue
			}
			if err := tx.ForEachMapped(d.ID, func(seg uint64, e table.Entry) error {
				if e.Partial() {
					cands = append(cands, cand{d, seg})
				}
				return nil
			}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return 0, err
	}
	var (
		mu     sync.Mutex
		merged int
		errs   []error
		wg     sync.WaitGroup
		sem    = make(chan struct{}, compactWorkers)
	)
	for _, k := range cands {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ok, err := c.compactSeg(ctx, k.d.ID, k.seg)
			mu.Lock()
			defer mu.Unlock()
			if ok {
				merged++
			}
			if err != nil {
				errs = append(errs, err)
			}
		})
	}
	wg.Wait()
	return merged, errors.Join(errs...)
}

// compactSeg makes segment seg of disk id whole, if its entry is partial and
// names only slots no other entry does. It takes the family lock shared
// and the segment's lock, like a write fault.
func (c *Controller) compactSeg(ctx context.Context, id meta.DiskID, seg uint64) (bool, error) {
	var d meta.Disk
	byID := func() error {
		return c.store.View(ctx, func(tx *meta.Tx) error {
			var err error
			d, err = tx.DiskByID(id)
			return err
		})
	}
	if err := byID(); err != nil {
		return false, nil // deleted meanwhile
	}
	defer c.lockFamily(d.Family, false)()
	if err := byID(); err != nil || seg >= d.Segments() {
		return false, nil // deleted or shrunk meanwhile
	}
	defer c.lockSegment(d.Family, seg)()

	var e table.Entry
	alone := true
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		got, err := tx.Entry(d.ID, seg)
		if err != nil {
			return err
		}
		e = got
		if !e.Partial() {
			alone = false
			return nil
		}
		if shared, err := tx.PageShared(d.ID, seg); err != nil || shared {
			alone = false
			return err
		}
		e.Slots(func(l table.Location) {
			if n, rerr := tx.Refs(l); rerr != nil {
				err = rerr
			} else if n != 1 {
				alone = false
			}
		})
		return err
	}); err != nil || !alone {
		return false, err
	}
	n := table.SubBlockCount(d.SegmentSize)
	if err := e.Part.Valid(e.Loc, n); err != nil {
		return false, fmt.Errorf("compact %q segment %d: %w: %w (run check)", d.Name, seg, meta.ErrCorrupt, err)
	}
	defer c.lockPublish(d.Family, seg, true)()

	// The mappers drop the entry and finish their I/O through it.
	inval := protocol.SetEntryState{Disk: protocol.DiskID(d.ID), First: seg, Count: 1, State: table.Invalid, On: true, Blocking: true}
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, inval) }); err != nil {
		return false, fmt.Errorf("compact %q segment %d: %w", d.Name, seg, err)
	}
	base := e.Part.Under[len(e.Part.Under)-1].Loc
	if err := c.copyDown(ctx, e, base, d.SegmentSize); err != nil {
		return false, fmt.Errorf("compact %q segment %d: %w", d.Name, seg, err)
	}
	whole := table.Entry{Loc: base, State: e.State}
	fr := c.newFreeing()
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		got, err := tx.Entry(d.ID, seg)
		if err != nil {
			return err
		}
		if !got.Equal(e) {
			return protocol.ErrStale
		}
		if err := tx.SetEntries(d.ID, seg, []table.Entry{whole}); err != nil {
			return err
		}
		return moveRefs(tx, e, whole, fr)
	})
	if errors.Is(err, protocol.ErrStale) {
		fr.finish(ctx, nil)
		return false, nil
	}
	fr.finish(ctx, err)
	if err != nil {
		c.unsettled(ctx, seg, d)
		return false, fmt.Errorf("compact %q segment %d: %w", d.Name, seg, err)
	}
	return true, nil
}

// copyDown copies into base every sub-block of e that a layer above base
// holds, and flushes base's container.
func (c *Controller) copyDown(ctx context.Context, e table.Entry, base table.Location, size uint64) error {
	dst, err := c.container(ctx, base.Container)
	if err != nil {
		return err
	}
	sb := table.SubBlockSize(size)
	var buf []byte
	err = e.Runs(0, table.SubBlockCount(size), func(loc table.Location, lo, hi int) error {
		if loc == base {
			return nil
		}
		src, err := c.container(ctx, loc.Container)
		if err != nil {
			return err
		}
		off, n := uint64(lo)*sb, uint64(hi-lo)*sb
		if uint64(cap(buf)) < n {
			buf = make([]byte, n)
		}
		b := buf[:n]
		if _, err := src.ReadAt(b, int64(uint64(loc.Slot)*size+off)); err != nil {
			return fmt.Errorf("compact: read %v: %w: %w", loc, protocol.ErrIO, err)
		}
		if _, err := dst.WriteAt(b, int64(uint64(base.Slot)*size+off)); err != nil {
			return fmt.Errorf("compact: write %v: %w: %w", base, protocol.ErrIO, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := dst.Flush(); err != nil {
		return fmt.Errorf("compact: flush %v: %w: %w", base, protocol.ErrIO, err)
	}
	return nil
}
