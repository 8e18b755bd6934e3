package controller

import (
	"context"
	"errors"
	"fmt"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
)

// Rollback makes disk name's contents those of the snapshot to, in place:
// the disk keeps its name, its id and its agents' open connections, which
// read the snapshot's data afterwards; to and every other snapshot stay as
// they were. Like a snapshot it costs table pages, not data: the disk's
// table becomes a copy of to's (sharing its pages), and the slots only the
// disk's old table held are freed. The disk takes to's size.
//
// The steps are a snapshot's in reverse: every agent that maps the disk
// starts it on an empty table (Invalid everywhere, at to's size), which
// waits for the I/O in flight, and faults wait on the family's lock; then
// one transaction replaces the table. A crash before it leaves the disk as
// it was, after it as to.
func (c *Controller) Rollback(ctx context.Context, name, to string) (meta.Disk, error) {
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
	snap, err := c.Disk(ctx, to)
	if err != nil {
		return meta.Disk{}, err
	}
	switch {
	case d.ReadOnly:
		return meta.Disk{}, fmt.Errorf("roll back %q: %w", name, protocol.ErrReadOnly)
	case snap.ID == d.ID:
		return meta.Disk{}, fmt.Errorf("roll back %q to itself: %w", name, protocol.ErrBadRequest)
	case snap.Family != d.Family:
		return meta.Disk{}, fmt.Errorf("roll back %q to %q: %w", name, to, ErrOtherLineage)
	case !snap.ReadOnly:
		// A writable disk's agents hold writable entries that the
		// shared pages would make No-write: they would write into
		// slots the rolled-back disk reads.
		return meta.Disk{}, fmt.Errorf("roll back %q to %q: %w", name, to, ErrNotSnapshot)
	case snap.SegmentSize != d.SegmentSize:
		// One family has one segment size; a record that says
		// otherwise is damaged.
		return meta.Disk{}, fmt.Errorf("roll back %q to %q: segment sizes %d and %d: %w", name, to, d.SegmentSize, snap.SegmentSize, meta.ErrCorrupt)
	}
	nd := d
	nd.Size = snap.Size
	if err := c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error {
		return a.NewTable(ctx, toMapping(nd))
	}); err != nil {
		c.resizeFailed(ctx, d)
		return meta.Disk{}, fmt.Errorf("roll back %q: %w", name, err)
	}
	fr := c.newFreeing()
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		// Under the family's lock nothing changed either record since
		// they were read; a record that did is a bug to stop at.
		cur, err := tx.DiskByID(snap.ID)
		if err != nil {
			return err
		}
		if cur != snap {
			return fmt.Errorf("roll back %q: %q changed under the family lock: %w", name, to, protocol.ErrStale)
		}
		freed, err := tx.ReplaceTable(snap.ID, d.ID)
		for _, loc := range freed {
			fr.add(loc)
		}
		if err != nil {
			return err
		}
		return tx.PutDisk(nd)
	})
	fr.finish(ctx, err)
	if err != nil {
		c.resizeFailed(ctx, d)
		return meta.Disk{}, err
	}
	return nd, nil
}

// RenameDisk gives disk name the name to. Its id, table and snapshots stay;
// agents that map it serve it under the new name from then on (connections
// open under the old one stay open).
func (c *Controller) RenameDisk(ctx context.Context, name, to string) (meta.Disk, error) {
	if err := ValidName(to); err != nil {
		return meta.Disk{}, err
	}
	return c.changeDisk(ctx, name, func(d *meta.Disk) bool {
		d.Name = to
		return false
	})
}

// SetReadOnly makes disk name read-only (a clone frozen: it refuses writes
// from then on, and the writes in flight end before the change is
// committed) or writable (a snapshot promoted: its first write to each
// segment it shares copies it, as a clone's does).
func (c *Controller) SetReadOnly(ctx context.Context, name string, ro bool) (meta.Disk, error) {
	return c.changeDisk(ctx, name, func(d *meta.Disk) bool {
		d.ReadOnly = ro
		return ro
	})
}

// changeDisk changes disk name's record with change, under its family's
// lock, and tells the agents that map it. change reports whether the
// change restricts what agents may do: those are told first (and wait for
// their I/O in flight), the others after the commit.
func (c *Controller) changeDisk(ctx context.Context, name string, change func(*meta.Disk) (restrictive bool)) (meta.Disk, error) {
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
	nd := d
	restrictive := change(&nd)
	if nd == d {
		return d, nil
	}
	tell := func() error {
		return c.broadcast(ctx, d.ID, "", func(ctx context.Context, a protocol.Agent) error {
			return a.NewTable(ctx, toMapping(nd))
		})
	}
	if restrictive {
		if err := tell(); err != nil {
			c.resizeFailed(ctx, d)
			return meta.Disk{}, fmt.Errorf("change %q: %w", name, err)
		}
	}
	err = c.store.Update(ctx, func(tx *meta.Tx) error { return tx.PutDisk(nd) })
	if errors.Is(err, meta.ErrExists) {
		err = fmt.Errorf("%w: %w", ErrExists, err)
	}
	if err != nil {
		if restrictive {
			c.resizeFailed(ctx, d)
		}
		return meta.Disk{}, err
	}
	if !restrictive {
		if err := tell(); err != nil {
			return meta.Disk{}, fmt.Errorf("change %q: committed, but %w", name, err)
		}
	}
	return nd, nil
}
