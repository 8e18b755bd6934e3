package controller

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"segmap/internal/container"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/stream"
	"segmap/internal/table"
)

// Import applies a stream to a disk, wholly or not at all.
//
// The records go into a hidden disk (HiddenPrefix, granted to no agent):
// a new one for a full stream, a clone of the target's newest snapshot
// for an incremental one. Only once the stream's end record has proved
// it whole does one transaction swap the hidden disk in: for a full
// stream it is renamed to the target; for an incremental one the
// target's table is replaced by the hidden disk's, which is deleted.
// Either way the same transaction makes the snapshot named like the
// source, with its identity. A stream that is refused at any point
// leaves the target as it was, and the hidden disk is deleted.
//
// The controller writes the data itself rather than through an agent:
// for every segment the stream touches it takes a free slot (takeSlot,
// so it reads as zeros), composes the whole segment there (the records'
// bytes over the old bytes, read through the old entry and its layers)
// and commits the slot as the hidden disk's entry with one reference,
// dropping one from every slot the old entry named (moveRefs). A segment
// that composes to all zeros becomes Zero instead. This is the write
// path of a fault that copies a whole segment, without a host to wait
// for, and keeps the reference counts right by the same helpers.

// HiddenPrefix starts the names of the disks an import applies a stream
// to before it swaps them in. ValidName refuses it, so no user disk can
// take such a name; disk lists skip them.
const HiddenPrefix = ".import-"

// Hidden reports whether a disk name is an import's hidden disk.
func Hidden(name string) bool { return strings.HasPrefix(name, HiddenPrefix) }

// importBatch is how many segments an import commits in one transaction.
const importBatch = 64

// ImportOptions describes an import.
type ImportOptions struct {
	// Disk is the target: created by a full stream, updated by an
	// incremental one.
	Disk string
	// Force applies an incremental stream to a disk written since its
	// newest snapshot: those writes are lost.
	Force bool
	// Prepare, if set, is called with the stream's header once it has
	// been read, before anything is changed (the embedded mode creates
	// containers for a segment size it has none of); an error refuses
	// the stream.
	Prepare func(ctx context.Context, h stream.Header) error
}

// ImportSnapshotName returns the name of the snapshot an import into
// disk ends with, for a stream of source: the disk's name and the part
// of the source's name from its '@' (vm1@mon into vm2 makes vm2@mon), or
// the source's name if it has no '@'.
func ImportSnapshotName(disk, source string) string {
	if i := strings.LastIndexByte(source, '@'); i >= 0 {
		return disk + source[i:]
	}
	return source
}

// Import reads a stream from r and applies it to disk o.Disk. It
// returns the snapshot the import made.
func (c *Controller) Import(ctx context.Context, o ImportOptions, r io.Reader) (meta.Disk, error) {
	if err := ValidName(o.Disk); err != nil {
		return meta.Disk{}, err
	}
	sr, err := stream.NewReader(r)
	if err != nil {
		return meta.Disk{}, fmt.Errorf("import into %q: %w", o.Disk, err)
	}
	h := sr.Header()
	src := h.Source
	snapName := ImportSnapshotName(o.Disk, src.Name)
	if err := ValidName(snapName); err != nil {
		return meta.Disk{}, fmt.Errorf("import into %q: snapshot name: %w", o.Disk, err)
	}
	if err := ValidSegmentSize(src.SegmentSize); err != nil {
		return meta.Disk{}, fmt.Errorf("import into %q: %w", o.Disk, err)
	}
	if err := ValidGeometry(src.Size, src.SegmentSize); err != nil {
		return meta.Disk{}, fmt.Errorf("import into %q: %w", o.Disk, err)
	}
	if o.Prepare != nil {
		if err := o.Prepare(ctx, h); err != nil {
			return meta.Disk{}, fmt.Errorf("import into %q: %w", o.Disk, err)
		}
	}
	end, err := c.begin(ctx, false)
	if err != nil {
		return meta.Disk{}, err
	}
	defer end()

	c.SweepImports(ctx)
	hidden, base, err := c.importPrepare(ctx, o, h, snapName)
	if err != nil {
		return meta.Disk{}, err
	}
	defer c.importDone(hidden.ID)
	snap, err := c.importApply(ctx, o, h, snapName, hidden, base, sr)
	if err != nil {
		if derr := c.dropHidden(ctx, hidden.ID); derr != nil {
			c.logger.Warn("delete an import's hidden disk", "disk", hidden.Name, "err", derr)
		}
		return meta.Disk{}, err
	}
	return snap, nil
}

// importPrepare checks the target and makes the hidden disk: a new one
// for a full stream, a clone of the target's newest snapshot (base,
// returned) for an incremental one, resized to the source's size.
func (c *Controller) importPrepare(ctx context.Context, o ImportOptions, h stream.Header, snapName string) (hidden, base meta.Disk, err error) {
	src := h.Source
	name := HiddenPrefix + hex.EncodeToString(func() []byte { u := meta.NewUUID(); return u[:8] }())
	// The hidden disks this import owns, marked as each is created (a
	// store may run a transaction more than once). On a failure they are
	// let go: one that was committed all the same (an error after the
	// fact) or could not be dropped is swept by the next import or
	// controller (SweepImports).
	var marked []meta.DiskID
	mark := func(id meta.DiskID) {
		c.importing(id)
		marked = append(marked, id)
	}
	defer func() {
		if err != nil {
			for _, id := range marked {
				c.importDone(id)
			}
		}
	}()
	if h.Base == nil {
		err = c.store.Update(ctx, func(tx *meta.Tx) error {
			cs, err := tx.Containers()
			if err != nil {
				return err
			}
			if !hasPool(cs, src.SegmentSize) {
				return fmt.Errorf("segment size %d: %w; add a container with that slot size", src.SegmentSize, ErrNoPool)
			}
			for _, n := range []string{o.Disk, snapName} {
				if _, err := tx.Disk(n); err == nil {
					return fmt.Errorf("import into %q: %q: %w", o.Disk, n, ErrExists)
				} else if !errors.Is(err, meta.ErrNotFound) {
					return err
				}
			}
			hidden, err = tx.CreateDisk(meta.Disk{
				Name: name, Size: src.Size, SegmentSize: src.SegmentSize,
				Policy: table.Forward, Created: c.now().UTC(),
			})
			if err != nil {
				return err
			}
			mark(hidden.ID)
			return tx.SetGrants(hidden.ID, []string{}, false)
		})
		return hidden, base, err
	}
	var d meta.Disk
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		if d, base, err = newestSnapshot(tx, o.Disk); err != nil {
			return err
		}
		return checkBase(o.Disk, base, *h.Base, src)
	})
	if err != nil {
		return hidden, base, err
	}
	unlock := c.lockFamily(d.Family, false)
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		if _, err := tx.Disk(snapName); err == nil {
			return fmt.Errorf("import into %q: %q: %w", o.Disk, snapName, ErrExists)
		} else if !errors.Is(err, meta.ErrNotFound) {
			return err
		}
		b, err := tx.DiskByID(base.ID)
		if err != nil {
			return wrapNotFound(err)
		}
		hidden, err = tx.CreateDisk(meta.Disk{
			Name: name, Size: b.Size, SegmentSize: b.SegmentSize, Policy: d.Policy,
			Origin: b.ID, Family: b.Family, Created: c.now().UTC(),
		})
		if err != nil {
			return err
		}
		mark(hidden.ID)
		if err := tx.SetGrants(hidden.ID, []string{}, false); err != nil {
			return err
		}
		return tx.CopyTable(b.ID, hidden.ID)
	})
	unlock()
	if err != nil {
		return hidden, base, err
	}
	if src.Size != hidden.Size {
		// No agent maps the hidden disk: the resize tells no one.
		if hidden, err = c.resizeHidden(ctx, hidden, src.Size); err != nil {
			if derr := c.dropHidden(ctx, hidden.ID); derr != nil {
				c.logger.Warn("delete an import's hidden disk", "disk", hidden.Name, "err", derr)
			}
			return hidden, base, err
		}
	}
	return hidden, base, nil
}

// resizeHidden resizes an import's hidden disk to size: segments past a
// shrunk end are dropped, new ones are Zero.
func (c *Controller) resizeHidden(ctx context.Context, d meta.Disk, size uint64) (meta.Disk, error) {
	defer c.lockFamily(d.Family, false)()
	nd := d
	nd.Size = size
	from := nd.Segments()
	for seg := from; seg < d.Segments(); seg++ {
		defer c.lockSegment(d.Family, seg)()
	}
	fr := c.newFreeing()
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		if size < d.Size {
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
		return d, err
	}
	return nd, nil
}

// newestSnapshot returns disk name and its newest read-only snapshot
// (the newest by creation time of the read-only disks whose origin it
// is).
func newestSnapshot(tx *meta.Tx, name string) (d, snap meta.Disk, err error) {
	d, err = tx.Disk(name)
	if err != nil {
		return d, snap, fmt.Errorf("import into %q: %w", name, wrapNotFound(err))
	}
	ds, err := tx.Disks()
	if err != nil {
		return d, snap, err
	}
	found := false
	for _, s := range ds {
		if s.Origin != d.ID || !s.ReadOnly || Hidden(s.Name) {
			continue
		}
		if !found || s.Created.After(snap.Created) || (s.Created.Equal(snap.Created) && s.ID > snap.ID) {
			snap, found = s, true
		}
	}
	if !found {
		return d, snap, fmt.Errorf("import into %q: it has no snapshot: %w", name, ErrWrongBase)
	}
	return d, snap, nil
}

// checkBase refuses a stream whose base is not snap.
func checkBase(disk string, snap meta.Disk, base, src stream.Snapshot) error {
	switch {
	case snap.Identity() != base.ID:
		return fmt.Errorf("import into %q: the stream applies to %q (%x), the newest snapshot is %q (%x): %w",
			disk, base.Name, base.ID, snap.Name, snap.Identity(), ErrWrongBase)
	case snap.Size != base.Size || snap.SegmentSize != base.SegmentSize:
		return fmt.Errorf("import into %q: base %q is %d bytes in segments of %d, the stream says %d in %d: %w",
			disk, snap.Name, snap.Size, snap.SegmentSize, base.Size, base.SegmentSize, ErrWrongBase)
	case src.SegmentSize != base.SegmentSize:
		return fmt.Errorf("import into %q: the stream changes the segment size: %w", disk, ErrWrongBase)
	}
	return nil
}

// segImage is one segment being composed from a stream's records.
type segImage struct {
	seg uint64
	buf []byte // the segment's bytes where sectors is set
	// sectors marks the 512-byte sectors the records gave (data, or
	// zeros); the others come from the old entry.
	sectors []bool
}

// importApply reads every record into the hidden disk and, once the
// stream is proved whole, swaps it in.
func (c *Controller) importApply(ctx context.Context, o ImportOptions, h stream.Header, snapName string, hidden, base meta.Disk, sr *stream.Reader) (meta.Disk, error) {
	size := hidden.SegmentSize
	var batch []*segImage
	var cur *segImage
	flush := func() error {
		err := c.importCommit(ctx, hidden, batch)
		batch = batch[:0]
		return err
	}
	for {
		if err := ctx.Err(); err != nil {
			return meta.Disk{}, err
		}
		rec, err := sr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return meta.Disk{}, fmt.Errorf("import into %q: %w", o.Disk, err)
		}
		if h.Base == nil && rec.Type == stream.TypeZero {
			continue // a full stream's holes read as zero already
		}
		for off, n := rec.Off, rec.Len; n > 0; {
			seg := off / size
			in := off % size
			m := min(n, size-in)
			if cur == nil || cur.seg != seg {
				if cur != nil {
					batch = append(batch, cur)
					if len(batch) >= importBatch {
						if err := flush(); err != nil {
							return meta.Disk{}, err
						}
					}
				}
				cur = &segImage{seg: seg, buf: make([]byte, size), sectors: make([]bool, size/stream.Sector)}
			}
			if rec.Type == stream.TypeData {
				copy(cur.buf[in:in+m], rec.Data[off-rec.Off:off-rec.Off+m])
			} else {
				clear(cur.buf[in : in+m])
			}
			for s := in / stream.Sector; s < (in+m)/stream.Sector; s++ {
				cur.sectors[s] = true
			}
			off, n = off+m, n-m
		}
	}
	if cur != nil {
		batch = append(batch, cur)
	}
	if err := flush(); err != nil {
		return meta.Disk{}, err
	}
	return c.importSwap(ctx, o, h, snapName, hidden, base)
}

// importCommit writes the composed segments of batch into fresh slots
// and commits them as the hidden disk's entries in one transaction.
func (c *Controller) importCommit(ctx context.Context, hidden meta.Disk, batch []*segImage) (err error) {
	if len(batch) == 0 {
		return nil
	}
	size := hidden.SegmentSize
	defer c.lockFamily(hidden.Family, false)()
	for _, im := range batch { // in increasing order, as flushFamily locks
		defer c.lockSegment(hidden.Family, im.seg)()
	}
	olds := make([]table.Entry, len(batch))
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		for i, im := range batch {
			var err error
			if olds[i], err = tx.Entry(hidden.ID, im.seg); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	news := make([]table.Entry, len(batch))
	var taken []table.Location
	defer func() {
		// Committed, the slots are used; not, they hold data and are
		// free: their container is zeroed again before they are
		// handed out.
		for _, loc := range taken {
			c.alloc.release(loc, err != nil)
		}
	}()
	flushes := map[uint32]container.Container{}
	for i, im := range batch {
		old := olds[i]
		// Fill what the records did not give from the old entry.
		if old.Mapped() {
			for s := 0; s < len(im.sectors); {
				if im.sectors[s] {
					s++
					continue
				}
				e := s
				for e < len(im.sectors) && !im.sectors[e] {
					e++
				}
				lo, hi := uint64(s)*stream.Sector, uint64(e)*stream.Sector
				if err := c.readEntry(ctx, old, size, lo, im.buf[lo:hi]); err != nil {
					return err
				}
				s = e
			}
		}
		if allZero(im.buf) {
			news[i] = table.ZeroEntry
			continue
		}
		loc, err := c.takeSlot(ctx, size)
		if err != nil {
			return err
		}
		taken = append(taken, loc)
		ct, err := c.container(ctx, loc.Container)
		if err != nil {
			return err
		}
		// Over a mapped entry, the new slot holds only the sub-blocks
		// the records touch (composed whole above) and the old slots
		// stay layers under it, as a partial copy-on-write leaves
		// them: a 4 KiB change costs the target a sub-block, not a
		// segment. The rest of a slot from takeSlot reads as zero.
		sb := table.SubBlockSize(size)
		nsb := table.SubBlockCount(size)
		bits := table.Full(nsb)
		if old.Mapped() && old.Depth() < table.MaxDepth {
			bits = table.Bits{}
			per := int(sb / stream.Sector)
			for s, ok := range im.sectors {
				if ok {
					bits = bits.Or(table.Range(s/per, s/per+1))
				}
			}
		}
		for b := 0; b < nsb; {
			if !bits.Test(b) {
				b++
				continue
			}
			e := b
			for e < nsb && bits.Test(e) {
				e++
			}
			lo, hi := uint64(b)*sb, uint64(e)*sb
			if _, err := ct.WriteAt(im.buf[lo:hi], int64(uint64(loc.Slot)*size+lo)); err != nil {
				return fmt.Errorf("import write %v: %w: %w", loc, protocol.ErrIO, err)
			}
			b = e
		}
		flushes[loc.Container] = ct
		if bits.Has(table.Full(nsb)) {
			news[i] = table.At(loc, false)
		} else {
			news[i] = table.Over(loc, bits, old, nsb)
		}
	}
	// The data is durable before the map that points at it.
	for id, ct := range flushes {
		if err := ct.Flush(); err != nil {
			return fmt.Errorf("import flush container %d: %w: %w", id, protocol.ErrIO, err)
		}
	}
	fr := c.newFreeing()
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		for i, im := range batch {
			cur, err := tx.Entry(hidden.ID, im.seg)
			if err != nil {
				return err
			}
			if !cur.Equal(olds[i]) {
				// Not while the segment lock is held: a bug.
				return fmt.Errorf("import segment %d: entry %v changed to %v under its lock: %w", im.seg, olds[i], cur, protocol.ErrStale)
			}
			if err := tx.SetEntries(hidden.ID, im.seg, []table.Entry{news[i]}); err != nil {
				return err
			}
			if err := moveRefs(tx, cur, news[i], fr); err != nil {
				return err
			}
		}
		return nil
	})
	fr.finish(ctx, err)
	return err
}

// allZero reports whether b holds only zeros.
func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if !bytes.Equal(b[:n], zeroBlock[:n]) { // the runtime's vector compare
			return false
		}
		b = b[n:]
	}
	return true
}

// zeroBlock is what allZero compares with.
var zeroBlock [64 << 10]byte

// importSwap makes the applied hidden disk the target, and the snapshot
// named like the source, in one transaction.
func (c *Controller) importSwap(ctx context.Context, o ImportOptions, h stream.Header, snapName string, hidden, base meta.Disk) (meta.Disk, error) {
	src := h.Source
	var snap meta.Disk
	newSnap := func(tx *meta.Tx, d meta.Disk) error {
		var err error
		snap, err = tx.CreateDisk(meta.Disk{
			Name: snapName, Size: d.Size, SegmentSize: d.SegmentSize, Policy: d.Policy,
			Origin: d.ID, Family: d.Family, ReadOnly: true, Created: src.Created.UTC(), UUID: src.ID,
		})
		if err != nil {
			return err
		}
		if err := tx.CopyTable(d.ID, snap.ID); err != nil {
			return err
		}
		gs, all, err := tx.Grants(d.ID)
		if err != nil {
			return err
		}
		return tx.SetGrants(snap.ID, gs, all)
	}
	if h.Base == nil {
		err := c.store.Update(ctx, func(tx *meta.Tx) error {
			d := hidden
			d.Name = o.Disk
			if err := tx.PutDisk(d); err != nil {
				if errors.Is(err, meta.ErrExists) {
					return fmt.Errorf("import into %q: %w", o.Disk, ErrExists)
				}
				return err
			}
			if err := tx.SetGrants(d.ID, nil, true); err != nil {
				return err
			}
			return newSnap(tx, d)
		})
		if errors.Is(err, meta.ErrExists) {
			err = fmt.Errorf("import into %q: %w", o.Disk, ErrExists)
		}
		return snap, err
	}

	// Incremental: the target's table becomes the hidden disk's, while
	// no fault changes the family and no agent holds an old entry.
	d, unlock, err := c.lockDisk(ctx, o.Disk)
	if err != nil {
		return meta.Disk{}, err
	}
	defer unlock()
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		nd, nb, err := newestSnapshot(tx, o.Disk)
		if err != nil {
			return err
		}
		if nd.ID != d.ID || nb.ID != base.ID {
			return fmt.Errorf("import into %q: its newest snapshot changed meanwhile: %w", o.Disk, ErrWrongBase)
		}
		if o.Force {
			return nil
		}
		same, err := sameTables(tx, d, nb)
		if err == nil && !same {
			err = fmt.Errorf("import into %q: %w since %q (import with force to drop those writes)", o.Disk, ErrWrittenSince, nb.Name)
		}
		return err
	}); err != nil {
		return meta.Disk{}, err
	}
	nd := d
	nd.Size = hidden.Size
	// Agents drop every entry of the disk (waiting for their I/O) and
	// fault again once the family lock is released: a restrictive
	// change, told before the commit.
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error {
		return a.NewTable(ctx, toMapping(nd))
	}); err != nil {
		return meta.Disk{}, fmt.Errorf("import into %q: %w", o.Disk, err)
	}
	fr := c.newFreeing()
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		freed, err := tx.ReplaceTable(hidden.ID, d.ID)
		if err != nil {
			return err
		}
		for _, loc := range freed {
			fr.add(loc)
		}
		if err := tx.PutDisk(nd); err != nil {
			return err
		}
		if err := newSnap(tx, nd); err != nil {
			return err
		}
		freed, err = tx.DeleteDisk(hidden.ID)
		for _, loc := range freed {
			fr.add(loc)
		}
		return err
	})
	fr.finish(ctx, err)
	if errors.Is(err, meta.ErrExists) {
		err = fmt.Errorf("import into %q: %q: %w", o.Disk, snapName, ErrExists)
	}
	if err != nil {
		c.resizeFailed(ctx, d)
		return meta.Disk{}, err
	}
	return snap, nil
}

// importing notes that the hidden disk id belongs to an import under
// way (before its creation commits, so no sweep takes it).
func (c *Controller) importing(id meta.DiskID) {
	c.imports.mu.Lock()
	defer c.imports.mu.Unlock()
	if c.imports.mu.active == nil {
		c.imports.mu.active = map[meta.DiskID]bool{}
	}
	c.imports.mu.active[id] = true
}

// importDone notes that the import of hidden disk id is over.
func (c *Controller) importDone(id meta.DiskID) {
	c.imports.mu.Lock()
	defer c.imports.mu.Unlock()
	delete(c.imports.mu.active, id)
}

// SweepImports deletes the hidden disks that no import under way owns:
// those of an import that a stopped controller left behind, whose target
// is as it was before the import. A controller calls it as it starts, and
// each import before its own. A failure is only logged.
func (c *Controller) SweepImports(ctx context.Context) {
	ds, err := c.Disks(ctx)
	if err != nil {
		return
	}
	for _, d := range ds {
		if !Hidden(d.Name) {
			continue
		}
		c.imports.mu.Lock()
		active := c.imports.mu.active[d.ID]
		c.imports.mu.Unlock()
		if active {
			continue
		}
		if err := c.dropHidden(ctx, d.ID); err != nil {
			c.logger.Warn("delete a hidden disk left by an import", "disk", d.Name, "err", err)
		} else {
			c.logger.Info("deleted a hidden disk left by an import", "disk", d.Name)
		}
	}
}

// dropHidden deletes an import's hidden disk, if it still exists.
func (c *Controller) dropHidden(ctx context.Context, id meta.DiskID) error {
	var d meta.Disk
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		d, err = tx.DiskByID(id)
		return err
	}); errors.Is(err, meta.ErrNotFound) {
		return nil
	} else if err != nil {
		return err
	}
	// Exclusively: a fault of the family that shares a slot with the
	// hidden disk (a reverse-delta copy) must not find it half gone.
	defer c.lockFamily(d.Family, true)()
	fr := c.newFreeing()
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		if cur, err := tx.DiskByID(id); errors.Is(err, meta.ErrNotFound) {
			return nil
		} else if err != nil {
			return err
		} else if !Hidden(cur.Name) {
			// The swap that renamed it to the target landed
			// although its commit reported an error: the
			// import took effect, and the disk is the target.
			return nil
		}
		freed, err := tx.DeleteDisk(id)
		if errors.Is(err, meta.ErrNotFound) {
			return nil
		}
		for _, loc := range freed {
			fr.add(loc)
		}
		return err
	})
	fr.finish(ctx, err)
	return err
}
