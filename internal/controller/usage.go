package controller

import (
	"context"
	"errors"

	"segmap/internal/container"
	"segmap/internal/meta"
	"segmap/internal/table"
)

// This file answers "where did the space go": what each container's
// backing really holds on storage, and what a family's snapshots hold
// that no writable disk of the family needs.

// ContainerSpace is a container's record and what its backing holds.
type ContainerSpace struct {
	meta.Container
	// Allocated is the bytes the container's backing holds on storage,
	// header included (for a file: its allocated blocks, what du(1)
	// counts), when Known. Slots in use (Used × SlotSize) overstate it
	// where slots are sparse.
	Allocated uint64
	// Known is false where the backing cannot tell: an nbd:// container
	// (its storage node's file is not reachable from here), a block
	// device, or a container that cannot be opened now.
	Known bool
}

// ContainerSpaces returns every container with what its backing holds.
// Only containers the controller reaches as local files are asked (opened
// if they are not yet): an nbd:// container's storage node is not dialled
// for a figure it cannot give, and one that does not answer must not stall
// a status.
func (c *Controller) ContainerSpaces(ctx context.Context) ([]ContainerSpace, error) {
	if err := c.flushAll(ctx); err != nil {
		return nil, err
	}
	cs, err := c.ListContainers(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]ContainerSpace, len(cs))
	for i, rec := range cs {
		out[i].Container = rec
		if _, err := container.FilePath(rec.URI); err != nil {
			continue // not a local file: unknown
		}
		ct, err := c.container(ctx, rec.ID)
		if errors.Is(err, ErrClosed) || ctx.Err() != nil {
			return nil, errors.Join(err, ctx.Err())
		}
		if err != nil {
			c.logger.Debug("container space: cannot open container", "container", rec.ID, "uri", rec.URI, "err", err)
			continue
		}
		a, ok := ct.(container.Allocator)
		if !ok {
			continue
		}
		n, err := a.Allocated()
		if err != nil {
			if !errors.Is(err, container.ErrAllocationUnknown) {
				c.logger.Warn("container space: cannot tell what the container holds", "container", rec.ID, "uri", rec.URI, "err", err)
			}
			continue
		}
		out[i].Allocated, out[i].Known = uint64(n), true
	}
	return out, nil
}

// SnapshotsHold returns, by family (meta.Disk.Family), the bytes of the
// slots that only the family's snapshots (its read-only disks) reference
// and none of its writable disks: what deleting every snapshot of the
// family would give back. A slot of a partial entry counts the sub-blocks
// written there only, as the storage it takes does (see snapshotOnly). Families whose snapshots hold nothing are
// absent. It reads every table of every family in one read transaction:
// its cost grows with the mapped entries, as DiskUsage's does.
func (c *Controller) SnapshotsHold(ctx context.Context) (map[meta.DiskID]uint64, error) {
	if err := c.flushAll(ctx); err != nil {
		return nil, err
	}
	out := map[meta.DiskID]uint64{}
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		fams := map[meta.DiskID][]meta.Disk{}
		for _, d := range ds {
			fams[d.Family] = append(fams[d.Family], d)
		}
		for f, members := range fams {
			n, err := familySnapshotsHold(tx, members)
			if err != nil {
				return err
			}
			if n > 0 {
				out[f] = n
			}
		}
		return nil
	})
	return out, err
}

// FamilySnapshotsHold returns what SnapshotsHold returns for the family
// of disk name.
func (c *Controller) FamilySnapshotsHold(ctx context.Context, name string) (uint64, error) {
	if err := c.flushAll(ctx); err != nil {
		return 0, err
	}
	var n uint64
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		d, err := tx.Disk(name)
		if err != nil {
			return err
		}
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		var members []meta.Disk
		for _, m := range ds {
			if m.Family == d.Family {
				members = append(members, m)
			}
		}
		n, err = familySnapshotsHold(tx, members)
		return err
	})
	return n, wrapNotFound(err)
}

// familySnapshotsHold reads the tables of one family's disks page by page
// and counts, with snapshotOnly, the slots only its read-only disks map.
// Disks of a family share slots only at the same segment index, so the
// pages at one index are all that need comparing; a stored page held by
// several disks (a table copied by a snapshot and not written since) is
// read once.
func familySnapshotsHold(tx *meta.Tx, members []meta.Disk) (uint64, error) {
	type pages struct{ live, snaps []uint64 } // page ids at one index
	byIndex := map[uint64]*pages{}
	var segSize uint64
	for _, d := range members {
		segSize = d.SegmentSize // one family, one segment size
		prs, err := tx.TablePages(d.ID)
		if err != nil {
			return 0, err
		}
		for _, pr := range prs {
			p := byIndex[pr.Index]
			if p == nil {
				p = &pages{}
				byIndex[pr.Index] = p
			}
			if d.ReadOnly {
				p.snaps = append(p.snaps, pr.ID)
			} else {
				p.live = append(p.live, pr.ID)
			}
		}
	}
	var blocks uint64
	n := table.SubBlockCount(segSize)
	for _, p := range byIndex {
		if len(p.snaps) == 0 {
			continue
		}
		live, err := readPages(tx, p.live, nil)
		if err != nil {
			return 0, err
		}
		// A page a writable disk holds maps nothing only snapshots hold.
		snaps, err := readPages(tx, p.snaps, p.live)
		if err != nil {
			return 0, err
		}
		blocks += snapshotOnly(live, snaps, n)
	}
	return blocks * table.SubBlockSize(segSize), nil
}

// readPages reads the distinct stored pages pids, but those in skip.
func readPages(tx *meta.Tx, pids, skip []uint64) ([][]table.Entry, error) {
	seen := map[uint64]bool{}
	for _, s := range skip {
		seen[s] = true
	}
	var out [][]table.Entry
	for _, pid := range pids {
		if seen[pid] {
			continue
		}
		seen[pid] = true
		es, err := tx.Page(pid)
		if err != nil {
			return nil, err
		}
		out = append(out, es)
	}
	return out, nil
}

// snapshotOnly counts the sub-blocks held in the distinct slots that the
// snapshot pages map and the live pages do not, and those held in the
// slots above the base of the live partial entries that compaction would
// give back once no snapshot names their slots, comparing entries at the
// same index only (the pages all cover the same segments of one family);
// n is the segments' sub-block count. Every slot an entry names counts
// (table.Entry.Slots): a partial entry's own and each layer under it, so
// a slot a live disk reads through to is not the snapshots' alone; and it
// counts for the sub-blocks the entries naming it say it holds (all of a
// whole entry's), since the slots of partial entries are written only
// there and take no space elsewhere. Entries that hold no location
// (Zero, Error, Invalid) hold no slot.
func snapshotOnly(live, snaps [][]table.Entry, n int) uint64 {
	var total uint64
	type held struct {
		loc    table.Location
		blocks table.Bits
	}
	var hs []held // distinct snapshot-only slots at one index
	for i := range maxLen(snaps) {
		hs = hs[:0]
		for _, p := range snaps {
			if i >= len(p) {
				continue
			}
			slotBlocks(p[i], n, func(l table.Location, b table.Bits) {
				if mapsAt(live, i, l) {
					return
				}
				for k := range hs {
					if hs[k].loc == l {
						hs[k].blocks = hs[k].blocks.Or(b)
						return
					}
				}
				hs = append(hs, held{l, b})
			})
		}
		for _, h := range hs {
			total += uint64(h.blocks.Count())
		}
		// A live partial entry whose slots no other live entry names
		// is compacted once the snapshots are gone: it keeps its base
		// and gives back the slots above it.
		for j, p := range live {
			if i >= len(p) || !p[i].Partial() {
				continue
			}
			alone := true
			p[i].Slots(func(l table.Location) {
				for k, q := range live {
					if k != j && i < len(q) {
						q[i].Slots(func(m table.Location) { alone = alone && m != l })
					}
				}
			})
			if alone {
				part := p[i].Part
				total += uint64(part.Bits.Count())
				for _, l := range part.Under[:len(part.Under)-1] {
					total += uint64(l.Bits.Count())
				}
			}
		}
	}
	return total
}

// slotBlocks calls fn with each slot entry e names and the sub-blocks e
// says it holds: all n of a whole entry's slot.
func slotBlocks(e table.Entry, n int, fn func(table.Location, table.Bits)) {
	if e.Voided() {
		return
	}
	if !e.Partial() {
		fn(e.Loc, table.Full(n))
		return
	}
	fn(e.Loc, e.Part.Bits)
	for _, l := range e.Part.Under {
		fn(l.Loc, l.Bits)
	}
}

// mapsAt says whether an entry of one of pages at index i names location
// l, as its own slot or as a layer.
func mapsAt(pages [][]table.Entry, i int, l table.Location) bool {
	for _, p := range pages {
		if i >= len(p) {
			continue
		}
		found := false
		p[i].Slots(func(m table.Location) { found = found || m == l })
		if found {
			return true
		}
	}
	return false
}

func maxLen(ps [][]table.Entry) int {
	n := 0
	for _, p := range ps {
		n = max(n, len(p))
	}
	return n
}
