package controller

import (
	"context"
	"fmt"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// SetError makes the segments of disk name in [off, off+length) fail every
// read and write with EIO, as dm-flakey does, for testing how hosts take
// errors: their entries become Error, persistently, and the agents that
// map the disk fail I/O there at once, without asking. off and length must
// be multiples of the segment size. An Error entry holds no slot: the data
// there is dropped (snapshots keep theirs) and ClearErrors makes the range
// read as zeros. A trim or write-zeroes of a whole segment clears its
// error too. Read-only disks are refused.
func (c *Controller) SetError(ctx context.Context, name string, off, length uint64) (meta.Disk, error) {
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
	ss := d.SegmentSize
	switch {
	case d.ReadOnly:
		return meta.Disk{}, fmt.Errorf("set error on %q, which is read-only (the data under an error is dropped): %w", name, protocol.ErrReadOnly)
	case length == 0 || off%ss != 0 || length%ss != 0:
		return meta.Disk{}, fmt.Errorf("set error on %q at %d+%d: want a non-empty range in whole segments of %d bytes: %w", name, off, length, ss, protocol.ErrBadRequest)
	case off >= d.Size || length > d.Size-off:
		return meta.Disk{}, fmt.Errorf("set error on %q at %d+%d: past its end (%d bytes): %w", name, off, length, d.Size, protocol.ErrBadRequest)
	}
	if err := c.voidRange(ctx, d, off, length, table.ErrorEntry); err != nil {
		return meta.Disk{}, fmt.Errorf("set error on %q: %w", name, err)
	}
	return d, nil
}

// voidRange sets the entries of d's whole segments in [off, off+length)
// to to (void), MaxDiscard segments at a time.
func (c *Controller) voidRange(ctx context.Context, d meta.Disk, off, length uint64, to table.Entry) error {
	for seg, last := off/d.SegmentSize, (off+length)/d.SegmentSize; seg < last; {
		n := min(last-seg, MaxDiscard)
		if _, err := c.void(ctx, d, seg, n, to); err != nil {
			return err
		}
		seg += n
	}
	return nil
}

// ClearErrors makes every Error segment of disk name read as zeros (those
// on a failed container included, which drop their slots there): the
// data there is declared lost, and the disk is whole again, every byte
// readable (and writable, unless it is read-only: a snapshot that shared
// the Error entries is cleared the same way). It returns the bytes
// cleared.
func (c *Controller) ClearErrors(ctx context.Context, name string) (uint64, error) {
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
	exts, err := c.errorExtents(ctx, d)
	if err != nil {
		return 0, err
	}
	var cleared uint64
	for _, x := range exts {
		if err := c.voidRange(ctx, d, x.Off, x.Len, table.ZeroEntry); err != nil {
			return cleared, fmt.Errorf("clear errors of %q: %w", name, err)
		}
		cleared += x.Len
	}
	return cleared, nil
}

// ErrorExtents returns the byte ranges of disk name whose segments are
// Error, in order and merged.
func (c *Controller) ErrorExtents(ctx context.Context, name string) ([]Extent, error) {
	d, err := c.Disk(ctx, name)
	if err != nil {
		return nil, err
	}
	return c.errorExtents(ctx, d)
}

// errorExtents reads d's Error segments from the store: Error entries,
// and entries that read from a failed container (health.go). Changes kept
// in memory (pending.go) never make or undo an Error entry, nor move an
// entry onto a failed container, so the store is the truth for them.
func (c *Controller) errorExtents(ctx context.Context, d meta.Disk) ([]Extent, error) {
	var out []Extent
	const chunk = 1 << 16
	for first := uint64(0); first < d.Segments(); first += chunk {
		n := min(chunk, d.Segments()-first)
		var es []table.Entry
		if err := c.store.View(ctx, func(tx *meta.Tx) error {
			var err error
			es, err = tx.Entries(d.ID, first, n)
			return err
		}); err != nil {
			return nil, fmt.Errorf("error extents of %q: %w", d.Name, err)
		}
		for i, e := range es {
			if e.State&table.Error == 0 && !c.onFailed(e) {
				continue
			}
			off := (first + uint64(i)) * d.SegmentSize
			if k := len(out) - 1; k >= 0 && out[k].Off+out[k].Len == off {
				out[k].Len += d.SegmentSize
				continue
			}
			out = append(out, Extent{Off: off, Len: d.SegmentSize})
		}
	}
	return out, nil
}
