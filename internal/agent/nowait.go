package agent

import (
	"context"

	"segmap/internal/container"
	"segmap/internal/table"
)

// TryReadAt reads len(p) bytes at off, as ReadAt does, if nothing on the
// way would wait: the table lock is free, every entry lets the read
// through (or reads as zeros), and the containers hold the bytes in memory
// (container.NoWaitReader). Otherwise it returns done false at once, having
// changed nothing but p, and the caller uses ReadAt, which faults, waits
// and reports errors. The NBD server calls it on a connection's reading
// goroutine, so that reads from the page cache skip the hand-off to a
// worker (it implements nbd.NoWaitReader).
//
// The read counts in the disk's current epoch as ReadAt's does, so commands
// wait for it the same way.
func (d *Disk) TryReadAt(ctx context.Context, p []byte, off uint64) (done bool, err error) {
	info := d.info.Load()
	n := uint64(len(p))
	if off > info.Size || n > info.Size-off {
		return false, nil // ReadAt reports it
	}
	ss := info.SegmentSize
	for pos := uint64(0); pos < n; {
		seg, segOff := (off+pos)/ss, (off+pos)%ss
		m := min(ss-segOff, n-pos)
		if !d.tryReadSeg(seg, segOff, p[pos:pos+m], ss) {
			return false, nil
		}
		pos += m
	}
	return true, nil
}

// tryReadSeg is TryReadAt within segment seg: bytes [off, off+len(p)).
func (d *Disk) tryReadSeg(seg, off uint64, p []byte, segSize uint64) bool {
	if !d.mu.TryRLock() {
		return false // a command holds the table
	}
	if d.mu.quiesced || d.mu.gone || seg >= uint64(d.mu.tab.Len()) {
		d.mu.RUnlock()
		return false
	}
	e := d.mu.tab.Entry(int(seg))
	switch table.Decide(e, table.Read).Action {
	case table.Proceed:
	case table.ReadZeros:
		d.mu.RUnlock()
		clear(p)
		return true
	default:
		d.mu.RUnlock() // a fault or an error: ReadAt's business
		return false
	}
	// As in begin: counted under the read lock, so that a command
	// closing the epoch sees it.
	ep := d.mu.cur
	ep.n.Add(1)
	d.mu.RUnlock()

	conts := *d.a.conts.Load()
	if !e.Partial() {
		ok := false
		if oc := conts[e.Loc.Container]; oc != nil {
			if nw, isNW := oc.c.(container.NoWaitReader); isNW {
				ok = nw.ReadAtNoWait(p, int64(uint64(e.Loc.Slot)*segSize+off))
			}
		}
		d.end(ep)
		return ok
	}
	// A partial entry reads each run of sub-blocks from the slot that
	// holds it.
	sb := table.SubBlockSize(segSize)
	end := off + uint64(len(p))
	ok := len(p) == 0 || e.Runs(int(off/sb), int((end+sb-1)/sb), func(loc table.Location, lo, hi int) error {
		a, b := max(uint64(lo)*sb, off), min(uint64(hi)*sb, end)
		if oc := conts[loc.Container]; oc != nil {
			if nw, isNW := oc.c.(container.NoWaitReader); isNW && nw.ReadAtNoWait(p[a-off:b-off], int64(uint64(loc.Slot)*segSize+a)) {
				return nil
			}
		}
		return errWouldWait
	}) == nil
	d.end(ep)
	return ok
}
