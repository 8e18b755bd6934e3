package controller

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/stream"
	"segmap/internal/table"
)

// Export and import of snapshots as streams (docs/stream.md).
//
// Export reads a read-only snapshot through its table straight from the
// containers and writes a stream: every mapped segment for a full
// stream (Zero segments are holes, not sent), or for an incremental one
// only the segments whose entries differ from the base's, and of those
// only the sub-blocks whose slot differs. Two snapshots of one family
// that name the same slot for a sub-block hold the same bytes there: a
// slot that a read-only snapshot references is never written in place.
//
// The family lock is held shared for the whole export, as a fault holds
// it, so that no delete, resize or snapshot of the family changes the
// tables meanwhile (they wait for the export); each segment is read
// under its segment lock, so that a reverse-delta copy or a compaction,
// which repoint a snapshot's entry under that lock, is either wholly
// before or wholly after the read.

// ExportOptions describes an export.
type ExportOptions struct {
	// Snapshot is the read-only snapshot to export.
	Snapshot string
	// Base, if set, makes the stream incremental: only what changed
	// from Base, an earlier read-only snapshot of the same lineage.
	Base string
	// Start, if set, is called once before the first byte is written
	// with the number of data bytes the stream will carry (for a
	// progress report).
	Start func(dataBytes uint64)
}

// Export writes a stream of snapshot o.Snapshot to w.
func (c *Controller) Export(ctx context.Context, o ExportOptions, w io.Writer) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	var src, base meta.Disk
	load := func() error {
		return c.store.View(ctx, func(tx *meta.Tx) error {
			var err error
			if src, err = tx.Disk(o.Snapshot); err != nil {
				return fmt.Errorf("export %q: %w", o.Snapshot, wrapNotFound(err))
			}
			if !src.ReadOnly {
				return fmt.Errorf("export %q: %w (take a snapshot and export that)", o.Snapshot, ErrNotSnapshot)
			}
			if o.Base == "" {
				return nil
			}
			if base, err = tx.Disk(o.Base); err != nil {
				return fmt.Errorf("export base %q: %w", o.Base, wrapNotFound(err))
			}
			switch {
			case !base.ReadOnly:
				return fmt.Errorf("export base %q: %w", o.Base, ErrNotSnapshot)
			case base.Family != src.Family:
				return fmt.Errorf("export %q from %q: %w", o.Snapshot, o.Base, ErrOtherLineage)
			case base.ID == src.ID:
				return fmt.Errorf("export %q from itself: %w", o.Snapshot, protocol.ErrBadRequest)
			case base.SegmentSize != src.SegmentSize:
				return fmt.Errorf("export %q from %q: segment sizes %d and %d: %w", o.Snapshot, o.Base, src.SegmentSize, base.SegmentSize, ErrOtherLineage)
			}
			return nil
		})
	}
	if err := load(); err != nil {
		return err
	}
	// The family is locked segment by segment (exportSeg), not for the
	// whole export: snapshots, deletes and resizes of the lineage go on
	// between segments. A snapshot's table does not change; if it is
	// deleted meanwhile, the export fails (and its stream, without an end
	// record, is refused by any import).

	// The segments to send, and the bytes they will carry at most.
	var segs []uint64
	var total uint64
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		from := base
		if o.Base == "" {
			// Against an empty table: every segment not Zero (an
			// Error one fails the export rather than read as a hole).
			from = meta.Disk{SegmentSize: src.SegmentSize}
		}
		// Can be replaced by Controller.Diff once it exists.
		return forChangedSegments(tx, from, src, func(seg uint64, be, se table.Entry) error {
			if seg >= src.Segments() {
				return nil // past a shrunk end: dropped by the resize
			}
			segs = append(segs, seg)
			if !se.Voided() {
				total += segExtent(src, seg)
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	h := stream.Header{Source: streamSnapshot(src)}
	if o.Base != "" {
		b := streamSnapshot(base)
		h.Base = &b
	}
	if o.Start != nil {
		o.Start(total)
	}
	sw, err := stream.NewWriter(w, h)
	if err != nil {
		return err
	}
	// Two stages, so that reading the containers and encoding and
	// sending the stream go on side by side: a reader fills segment
	// buffers (readSeg), this goroutine writes them out (emit).
	const inFlight = 3
	free := make(chan segRead, inFlight)
	for range inFlight {
		r := segRead{buf: make([]byte, src.SegmentSize)}
		if o.Base != "" {
			r.baseBuf = make([]byte, src.SegmentSize)
		}
		free <- r
	}
	rctx, cancel := context.WithCancel(ctx)
	read := make(chan segRead, inFlight)
	go func() {
		defer close(read)
		for _, seg := range segs {
			var r segRead
			select {
			case r = <-free:
			case <-rctx.Done():
				return
			}
			r.err = c.readSeg(rctx, &r, src, base, o.Base != "", seg)
			read <- r // room: at most inFlight buffers exist
			if r.err != nil {
				return
			}
		}
	}()
	defer func() {
		cancel()
		for range read { // the reader ends at its next segment
		}
	}()
	for r := range read {
		if r.err != nil {
			return r.err
		}
		if err := r.emit(sw); err != nil {
			return err
		}
		free <- r
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return sw.Close()
}

// streamSnapshot returns d's identity as a stream names it.
func streamSnapshot(d meta.Disk) stream.Snapshot {
	return stream.Snapshot{Name: d.Name, ID: d.Identity(), Created: d.Created, Size: d.Size, SegmentSize: d.SegmentSize}
}

// segExtent returns the number of bytes of d that segment seg holds: the
// segment size, or less for a last segment cut by the disk's size.
func segExtent(d meta.Disk, seg uint64) uint64 {
	return min(d.SegmentSize, d.Size-seg*d.SegmentSize)
}

// segRead is one segment read for the stream (readSeg) and what emit
// writes of it.
type segRead struct {
	buf, baseBuf []byte // the segment's bytes, and the base's (incremental)
	err          error

	off, n uint64 // the segment's bytes in the disk
	sb     uint64 // its sub-block size
	zero   bool   // one zero record for the whole segment
	runs   []subRun
	// compare: the bytes of runs are compared with baseBuf's (a base
	// that maps the segment), else with zeros, to skip what the target
	// holds already.
	compare bool
}

// subRun is sub-blocks [lo, hi) of a segment.
type subRun struct{ lo, hi int }

// readSeg reads what segment seg of src holds (incr false) or what changed
// in it since base (incr true) into r. It reads the entries and the data
// under the family's lock (shared) and the segment's, as a write fault
// would take them, so that no copy-on-write moves a slot from under the
// read (a reverse-delta write writes the old slot in place); the stream is
// written after they are let go (emit), so a slow reader of the stream
// holds up nothing. A snapshot deleted meanwhile fails the export.
func (c *Controller) readSeg(ctx context.Context, r *segRead, src, base meta.Disk, incr bool, seg uint64) error {
	defer c.lockFamily(src.Family, false)()
	defer c.lockSegment(src.Family, seg)()
	var se, be table.Entry
	be = table.ZeroEntry
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		for _, d := range []meta.Disk{src, base} {
			if d.ID == 0 {
				continue // no base
			}
			if cur, err := tx.DiskByID(d.ID); err != nil {
				return fmt.Errorf("export %q: %q: %w", src.Name, d.Name, wrapNotFound(err))
			} else if cur.Size != d.Size {
				return fmt.Errorf("export %q: %q changed meanwhile: %w", src.Name, d.Name, protocol.ErrStale)
			}
		}
		var err error
		if se, err = tx.Entry(src.ID, seg); err != nil {
			return err
		}
		if incr && seg < base.Segments() {
			be, err = tx.Entry(base.ID, seg)
		}
		return err
	}); err != nil {
		return err
	}
	se = c.overlay(src.Family, src.ID, seg, se)
	if incr {
		be = c.overlay(base.Family, base.ID, seg, be)
	}
	size := src.SegmentSize
	r.off, r.n, r.sb = seg*size, segExtent(src, seg), table.SubBlockSize(size)
	r.zero, r.runs, r.compare = false, r.runs[:0], false
	if se.State&table.Error != 0 {
		return fmt.Errorf("export %q: segment %d is in the Error state: %w", src.Name, seg, protocol.ErrIO)
	}
	if se.Voided() {
		// A zero record where the base had data; nothing for a hole in
		// a full stream or in both.
		r.zero = incr && !be.Voided()
		return nil
	}
	nsb := table.SubBlockCount(size)
	// The runs of sub-blocks to send: all of them, or those whose slot
	// differs from the base's.
	if !incr || be.Voided() {
		r.runs = append(r.runs, subRun{0, nsb})
	} else {
		for i := 0; i < nsb; {
			j := i
			for j < nsb && se.Locate(j) != be.Locate(j) {
				j++
			}
			if j > i {
				r.runs = append(r.runs, subRun{i, j})
				i = j
				continue
			}
			i++
		}
	}
	r.compare = incr && !be.Voided()
	for _, u := range r.runs {
		lo, hi := uint64(u.lo)*r.sb, min(uint64(u.hi)*r.sb, r.n)
		if lo >= hi {
			continue
		}
		if err := c.readEntry(ctx, se, size, lo, r.buf[lo:hi]); err != nil {
			return err
		}
		if r.compare {
			if err := c.readEntry(ctx, be, size, lo, r.baseBuf[lo:hi]); err != nil {
				return err
			}
		}
	}
	return nil
}

// emit writes the records of a segment readSeg read.
func (r *segRead) emit(sw *stream.Writer) error {
	if r.zero {
		return sw.Zero(r.off, r.n)
	}
	sb := r.sb
	for _, u := range r.runs {
		lo, hi := uint64(u.lo)*sb, min(uint64(u.hi)*sb, r.n)
		if lo >= hi {
			continue
		}
		b := r.buf[lo:hi]
		// A sub-block whose bytes are what the target holds already
		// (the base's, or zeros where the base has a hole or for a
		// full stream) is not sent: a whole slot written for a
		// sub-block costs the stream that sub-block.
		var old []byte
		if r.compare {
			old = r.baseBuf[lo:hi]
		}
		same := func(i uint64) bool {
			p := b[i:min(i+sb, uint64(len(b)))]
			if old != nil {
				return bytes.Equal(p, old[i:i+uint64(len(p))])
			}
			return allZero(p)
		}
		for i := uint64(0); i < uint64(len(b)); {
			if same(i) {
				i += sb
				continue
			}
			j := i + sb
			for j < uint64(len(b)) && j-i < stream.MaxData && !same(j) {
				j += sb
			}
			j = min(j, uint64(len(b)))
			if err := sw.Data(r.off+lo+i, b[i:j]); err != nil {
				return err
			}
			i = j
		}
	}
	return nil
}

// readEntry reads len(b) bytes at offset off of the segment that mapped
// entry e names, through its layers.
func (c *Controller) readEntry(ctx context.Context, e table.Entry, size, off uint64, b []byte) error {
	sb := table.SubBlockSize(size)
	lo, hi := int(off/sb), int((off+uint64(len(b))+sb-1)/sb)
	return e.Runs(lo, hi, func(loc table.Location, l, h int) error {
		ct, err := c.container(ctx, loc.Container)
		if err != nil {
			return err
		}
		from, to := max(uint64(l)*sb, off), min(uint64(h)*sb, off+uint64(len(b)))
		if _, err := ct.ReadAt(b[from-off:to-off], int64(uint64(loc.Slot)*size+from)); err != nil {
			return fmt.Errorf("read %v: %w: %w", loc, protocol.ErrIO, err)
		}
		return nil
	})
}

// forChangedSegments calls fn, in segment order, for every segment whose entry
// differs between disks a and b of one family (NoWrite aside), over the
// larger of their sizes: a segment past a disk's end counts as Zero
// there. Pages with the same id at an index hold the same entries and
// are skipped, so its cost grows with the pages that differ. It can be
// replaced by Controller.Diff.
func forChangedSegments(tx *meta.Tx, a, b meta.Disk, fn func(seg uint64, ea, eb table.Entry) error) error {
	pa, err := tx.TablePages(a.ID)
	if err != nil {
		return err
	}
	pb, err := tx.TablePages(b.ID)
	if err != nil {
		return err
	}
	ids := map[uint64][2]uint64{}
	var idx []uint64
	for k, ps := range [][]meta.PageRef{pa, pb} {
		for _, p := range ps {
			v, ok := ids[p.Index]
			if !ok {
				idx = append(idx, p.Index)
			}
			v[k] = p.ID
			ids[p.Index] = v
		}
	}
	slices.Sort(idx)
	entries := func(d meta.Disk, pid, pg uint64) ([]table.Entry, error) {
		out := make([]table.Entry, meta.PageEntries)
		for i := range out {
			out[i] = table.ZeroEntry
		}
		if pid == 0 {
			return out, nil
		}
		es, err := tx.Page(pid)
		if err != nil {
			return nil, err
		}
		// Entries past the disk's end may linger in its last page.
		for i := range es {
			if pg*meta.PageEntries+uint64(i) < d.Segments() {
				out[i] = es[i]
			}
		}
		return out, nil
	}
	for _, pg := range idx {
		v := ids[pg]
		if v[0] == v[1] {
			continue
		}
		ea, err := entries(a, v[0], pg)
		if err != nil {
			return err
		}
		eb, err := entries(b, v[1], pg)
		if err != nil {
			return err
		}
		for i := range ea {
			if !sameBytes(ea[i], eb[i]) {
				if err := fn(pg*meta.PageEntries+uint64(i), ea[i], eb[i]); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// sameBytes reports whether two entries read the same bytes: equal but
// for NoWrite, or both voided the same way.
func sameBytes(a, b table.Entry) bool {
	a.State &^= table.NoWrite
	b.State &^= table.NoWrite
	if a.Voided() || b.Voided() {
		return a.State == b.State
	}
	return a.Equal(b)
}

// sameTables reports whether disks a and b of one family read the same
// entries (NoWrite aside).
func sameTables(tx *meta.Tx, a, b meta.Disk) (bool, error) {
	if a.Size != b.Size {
		return false, nil
	}
	err := forChangedSegments(tx, a, b, func(uint64, table.Entry, table.Entry) error { return errStop })
	if errors.Is(err, errStop) {
		return false, nil
	}
	return err == nil, err
}
