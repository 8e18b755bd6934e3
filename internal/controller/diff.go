package controller

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"slices"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Disk diff: the extents in which two disks of one family differ (two
// snapshots, a snapshot and its disk, a clone and its origin), from their
// mapping tables alone, without reading a byte of container data.
//
// Disks of one family share table pages by reference (meta.Tx.CopyTable;
// a write unshares a page first), so two tables that hold the same page
// id at a page index are the same there, and only pages whose ids differ
// are compared entry by entry (table.Changed). The cost is that of the
// page directories (one record per meta.DirPages pages: one for a disk of
// a million segments) and of the pages that differ, not of the disk.
//
// Precision: a segment whose entries differ is changed whole, except
// where both entries are mapped and one is partial (a small write into a
// shared segment): then only the sub-blocks read from different slots
// are. NoWrite alone is no difference. A segment that was rewritten with
// the bytes it held, or trimmed while it held zeros, counts as changed:
// telling would take reading it.

// Extent is a byte range of a disk: [Off, Off+Len).
type Extent struct {
	Off, Len uint64
}

// DiffQuery says what part of a diff to find.
type DiffQuery struct {
	// Off and Len are the bytes asked about, [Off, Off+Len); Len 0 is
	// to the end.
	Off, Len uint64
	// Max, if not 0, is the most extents to return: then
	// DiffResult.Next says where to ask again. It bounds the answer
	// (a message, a reply) and the work done for it.
	Max int
}

// DiffResult is what Diff found: the disk records compared (as they were
// under the lock) and the extents in which they differ, in order, merged
// (no two touch), each aligned to a sub-block (table.SubBlockSize) or
// ending at a disk's end.
type DiffResult struct {
	From, To meta.Disk
	Extents  []Extent
	// Next, if not 0, is where the extents stopped because there were
	// DiffQuery.Max of them: the start of the next extent. Asking again
	// from there gives the rest; no extent returned goes on past it.
	Next uint64
}

// Bytes returns the total length of the extents.
func (r DiffResult) Bytes() uint64 {
	var n uint64
	for _, x := range r.Extents {
		n += x.Len
	}
	return n
}

// Diff returns the extents in which disks from and to differ. They must
// be of one family (meta.Disk.Family) and have one segment size (else
// protocol.ErrBadRequest); where their sizes differ, the bytes past the
// smaller size count as changed (a resize).
func (c *Controller) Diff(ctx context.Context, from, to string) (DiffResult, error) {
	return c.diff(ctx, func(tx *meta.Tx) (a, b meta.Disk, err error) {
		if a, err = tx.Disk(from); err != nil {
			return a, b, err
		}
		b, err = tx.Disk(to)
		return a, b, err
	}, DiffQuery{})
}

// DiffRange is Diff for the part q of disks named by id: the extents are
// clipped to the bytes asked about, and at most q.Max. It is the query
// of a client that asks about one range at a time (an NBD block-status
// request) or pages through a large diff.
func (c *Controller) DiffRange(ctx context.Context, from, to meta.DiskID, q DiffQuery) (DiffResult, error) {
	return c.diff(ctx, func(tx *meta.Tx) (a, b meta.Disk, err error) {
		if a, err = tx.DiskByID(from); err != nil {
			return a, b, err
		}
		b, err = tx.DiskByID(to)
		return a, b, err
	}, q)
}

// diff compares the disks that resolve names, for query q.
//
// The store alone is not current: some map changes are kept in memory
// until a flush (pending.go). Committing them first (as lockDisk does for
// a family-wide change) would cost a container flush and a store commit
// for a read, and hold the family exclusively, every write fault of the
// family waiting, for all of it. Overlaying them is cheaper and as
// correct: under the family lock held shared, nothing that changes the
// family as a whole (snapshot, delete, resize, discard) runs; faults
// still do, but the changes kept in memory are read before the store, so
// each segment is seen as it was at some moment of the diff (a change
// committed meanwhile is in the store with the entry read from memory; a
// change made meanwhile is newer than the diff), as concurrent writes
// allow of any read.
func (c *Controller) diff(ctx context.Context, resolve func(*meta.Tx) (a, b meta.Disk, err error), q DiffQuery) (DiffResult, error) {
	n := q.Len
	if n == 0 {
		n = math.MaxUint64
	}
	end, err := c.begin(ctx, true)
	if err != nil {
		return DiffResult{}, err
	}
	defer end()
	var a, b meta.Disk
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		a, b, err = resolve(tx)
		return err
	}); err != nil {
		return DiffResult{}, wrapNotFound(err)
	}
	if err := diffable(a, b); err != nil {
		return DiffResult{}, err
	}
	defer c.lockFamily(a.Family, false)()
	ovA, ovB := c.pendingOf(a.Family, a.ID, b.ID)
	var out DiffResult
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		// Ids are never reused: a disk deleted since is not found,
		// and one resized since is read at its new size.
		var err error
		if a, err = tx.DiskByID(a.ID); err != nil {
			return err
		}
		if b, err = tx.DiskByID(b.ID); err != nil {
			return err
		}
		sp := diffSpec{segSize: a.SegmentSize, sizeA: a.Size, sizeB: b.Size, off: q.Off, end: q.Off + min(n, math.MaxUint64-q.Off), max: q.Max}
		first, pages := sp.pages()
		sa := diffSide{over: ovA}
		if sa.pages, err = tx.TablePageRange(a.ID, first, pages); err != nil {
			return err
		}
		sb := diffSide{over: ovB}
		if sb.pages, err = tx.TablePageRange(b.ID, first, pages); err != nil {
			return err
		}
		out = DiffResult{From: a, To: b}
		out.Extents, out.Next, err = diffTables(sp, sa, sb, tx.Page)
		return err
	})
	if err != nil {
		return DiffResult{}, wrapNotFound(err)
	}
	return out, nil
}

// diffable says why disks a and b cannot be compared, if they cannot.
func diffable(a, b meta.Disk) error {
	switch {
	case a.Family != b.Family:
		return fmt.Errorf("diff %q and %q: %w: not of one family (a disk, its snapshots and clones share no storage with another)", a.Name, b.Name, protocol.ErrBadRequest)
	case a.SegmentSize != b.SegmentSize:
		return fmt.Errorf("diff %q and %q: %w: segment sizes %d and %d", a.Name, b.Name, protocol.ErrBadRequest, a.SegmentSize, b.SegmentSize)
	}
	return nil
}

// pendingOf returns the entries kept in memory (pending.go) for disks a
// and b of family fam, by segment.
func (c *Controller) pendingOf(fam, a, b meta.DiskID) (ea, eb map[uint64]table.Entry) {
	c.pend.mu.Lock()
	defer c.pend.mu.Unlock()
	pf := c.pend.mu.fams[fam]
	if pf == nil {
		return nil, nil
	}
	ea, eb = map[uint64]table.Entry{}, map[uint64]table.Entry{}
	for k, ps := range pf.segs {
		// Not else: a and b may be one disk.
		if k.disk == a {
			ea[k.seg] = ps.cur
		}
		if k.disk == b {
			eb[k.seg] = ps.cur
		}
	}
	return ea, eb
}

// diffSpec is what a comparison needs to know of the two disks and the
// bytes asked about, [off, end), with the most extents to return (0:
// all).
type diffSpec struct {
	segSize      uint64
	sizeA, sizeB uint64
	off, end     uint64
	max          int
}

// span returns the bytes to compare entry by entry, [lo, common), and the
// bytes only one disk has, [common, hi) (either may be empty).
func (sp diffSpec) span() (lo, common, hi uint64) {
	hi = min(sp.end, max(sp.sizeA, sp.sizeB))
	lo = min(sp.off, hi)
	common = max(lo, min(hi, sp.sizeA, sp.sizeB))
	return lo, common, hi
}

// pages returns the table pages that hold the segments of [lo, common):
// first and count.
func (sp diffSpec) pages() (first, n uint64) {
	lo, common, _ := sp.span()
	if lo == common {
		return 0, 0
	}
	first = lo / sp.segSize / meta.PageEntries
	last := (common - 1) / sp.segSize / meta.PageEntries
	return first, last - first + 1
}

// diffSide is one table of a comparison.
type diffSide struct {
	// pages are the table's stored pages that hold the segments
	// compared, in index order (meta.Tx.TablePageRange); a page not
	// among them holds only Zero entries.
	pages []meta.PageRef
	// over are entries that replace the stored ones, by segment: the
	// changes kept in memory.
	over map[uint64]table.Entry
}

// diffTables returns the extents of bytes [sp.off, sp.end) in which
// tables a and b differ, and, if it stopped at sp.max extents, the start
// of the next one; load returns a stored page's entries. It loads only
// the pages whose ids differ and those with entries in over, up to where
// it stops.
func diffTables(sp diffSpec, a, b diffSide, load func(pid uint64) ([]table.Entry, error)) (_ []Extent, next uint64, _ error) {
	lo, common, hi := sp.span()
	out := extents{max: sp.max}
	if lo < common {
		s0, s1 := lo/sp.segSize, (common-1)/sp.segSize+1 // segments [s0, s1)
		for _, pp := range differingPages(a, b, s0, s1) {
			if out.full {
				break
			}
			ea, err := loadPage(pp.a, load)
			if err != nil {
				return nil, 0, err
			}
			eb, err := loadPage(pp.b, load)
			if err != nil {
				return nil, 0, err
			}
			base := pp.index * meta.PageEntries
			for s := max(s0, base); s < min(s1, base+meta.PageEntries); s++ {
				bits := table.Changed(a.entry(ea, s, base), b.entry(eb, s, base), table.SubBlockCount(sp.segSize))
				out.addBits(s*sp.segSize, sp.segSize, bits, lo, common)
			}
		}
	}
	out.add(common, hi-common) // the bytes only one disk has
	return out.x, out.next, nil
}

// pagePair is one page index of two tables: the ids there (0: not
// stored).
type pagePair struct {
	index, a, b uint64
}

// differingPages returns, in order, the page indexes holding segments
// [s0, s1) at which a's and b's page ids differ or an entry is kept in
// memory.
func differingPages(a, b diffSide, s0, s1 uint64) []pagePair {
	p0, p1 := s0/meta.PageEntries, (s1-1)/meta.PageEntries // inclusive
	var out []pagePair
	i, j := 0, 0
	for i < len(a.pages) || j < len(b.pages) {
		var pp pagePair
		switch {
		case j == len(b.pages) || i < len(a.pages) && a.pages[i].Index < b.pages[j].Index:
			pp = pagePair{index: a.pages[i].Index, a: a.pages[i].ID}
			i++
		case i == len(a.pages) || b.pages[j].Index < a.pages[i].Index:
			pp = pagePair{index: b.pages[j].Index, b: b.pages[j].ID}
			j++
		default:
			pp = pagePair{index: a.pages[i].Index, a: a.pages[i].ID, b: b.pages[j].ID}
			i++
			j++
		}
		if pp.a != pp.b && pp.index >= p0 && pp.index <= p1 {
			out = append(out, pp)
		}
	}
	if len(a.over) == 0 && len(b.over) == 0 {
		return out
	}
	// Pages with entries kept in memory are compared too, whatever
	// their ids: the few there are are looked up in a and b's pages.
	idx := map[uint64]bool{}
	for _, ov := range []map[uint64]table.Entry{a.over, b.over} {
		for s := range ov {
			if s >= s0 && s < s1 {
				idx[s/meta.PageEntries] = true
			}
		}
	}
	for _, pp := range out {
		delete(idx, pp.index)
	}
	for pg := range idx {
		out = append(out, pagePair{index: pg, a: pageAt(a.pages, pg), b: pageAt(b.pages, pg)})
	}
	slices.SortFunc(out, func(x, y pagePair) int { return cmp.Compare(x.index, y.index) })
	return out
}

// pageAt returns the id of page index pg among prs (in index order), 0
// if it is not stored.
func pageAt(prs []meta.PageRef, pg uint64) uint64 {
	lo, hi := 0, len(prs)
	for lo < hi {
		m := (lo + hi) / 2
		if prs[m].Index < pg {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo < len(prs) && prs[lo].Index == pg {
		return prs[lo].ID
	}
	return 0
}

// loadPage returns stored page pid's entries, nil for a page not stored
// (all Zero).
func loadPage(pid uint64, load func(uint64) ([]table.Entry, error)) ([]table.Entry, error) {
	if pid == 0 {
		return nil, nil
	}
	es, err := load(pid)
	if err == nil && len(es) != meta.PageEntries {
		err = fmt.Errorf("table page %d: %d entries: %w", pid, len(es), meta.ErrCorrupt)
	}
	return es, err
}

// entry returns segment s of a side whose page starting at segment base
// holds es (nil: all Zero).
func (d diffSide) entry(es []table.Entry, s, base uint64) table.Entry {
	if e, ok := d.over[s]; ok {
		return e
	}
	if es == nil {
		return table.ZeroEntry
	}
	return es[s-base]
}

// extents collects extents in ascending order, merging those that touch,
// up to max of them (0: no limit).
type extents struct {
	x   []Extent
	max int
	// full says that an extent past the max was met, at next: it and
	// those after are left out.
	full bool
	next uint64
}

// add adds bytes [off, off+n), which start at or after the end of the
// last extent added.
func (x *extents) add(off, n uint64) {
	if n == 0 || x.full {
		return
	}
	if k := len(x.x) - 1; k >= 0 && x.x[k].Off+x.x[k].Len == off {
		x.x[k].Len += n
		return
	}
	if x.max > 0 && len(x.x) == x.max {
		x.full, x.next = true, off
		return
	}
	x.x = append(x.x, Extent{Off: off, Len: n})
}

// addBits adds the sub-blocks bits of the segSize-byte segment at byte
// start, clipped to [lo, hi).
func (x *extents) addBits(start, segSize uint64, bits table.Bits, lo, hi uint64) {
	if bits.Empty() {
		return
	}
	clip := func(a, b uint64) {
		a, b = max(a, lo), min(b, hi)
		if a < b {
			x.add(a, b-a)
		}
	}
	nsub := table.SubBlockCount(segSize)
	if bits == table.Full(nsub) {
		clip(start, start+segSize)
		return
	}
	sb := table.SubBlockSize(segSize)
	for i := 0; i < nsub; {
		if !bits.Test(i) {
			i++
			continue
		}
		j := i + 1
		for j < nsub && bits.Test(j) {
			j++
		}
		clip(start+uint64(i)*sb, start+uint64(j)*sb)
		i = j
	}
}
