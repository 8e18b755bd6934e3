package controller

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// ProblemKind is a kind of damage Check finds.
type ProblemKind uint8

// The kinds of damage.
const (
	// Leaked: a slot has a reference count but no entry points at it.
	// Harmless but wasteful; Repair reclaims it.
	Leaked ProblemKind = iota + 1
	// ReferencedFree: entries point at a slot whose count is zero, so it
	// could be handed out again while in use.
	ReferencedFree
	// WrongCount: a slot's count differs from the entries pointing at it.
	WrongCount
	// SharedWritable is no longer found: No-write is derived from
	// sharing (a slot counted by several table pages, or mapped by a
	// shared page), so a shared slot cannot be writable.
	SharedWritable
	// OutOfRange: an entry points at a container that does not exist, past
	// its last slot, or at one whose slot size is not the disk's segment
	// size.
	OutOfRange
	// WrongUsed: a container's used-slot count disagrees with its counts.
	WrongUsed
	// WrongPageCount: a table page's reference count differs from the
	// number of disks whose tables hold it.
	WrongPageCount
	// LeakedPage: a table page (or its count) that no disk's table
	// holds.
	LeakedPage
	// MissingPage: a disk's table holds a page that is not stored.
	MissingPage
)

func (k ProblemKind) String() string {
	switch k {
	case Leaked:
		return "leaked-slot"
	case ReferencedFree:
		return "referenced-free-slot"
	case WrongCount:
		return "wrong-reference-count"
	case SharedWritable:
		return "shared-slot-writable"
	case OutOfRange:
		return "location-out-of-range"
	case WrongUsed:
		return "wrong-used-count"
	case WrongPageCount:
		return "wrong-page-reference-count"
	case LeakedPage:
		return "leaked-table-page"
	case MissingPage:
		return "missing-table-page"
	}
	return fmt.Sprintf("ProblemKind(%d)", uint8(k))
}

// Problem is one violation of the store's invariants.
type Problem struct {
	Kind ProblemKind
	Loc  table.Location
	// Disk and Segment name the entry concerned, when there is one.
	Disk    string
	Segment uint64
	Detail  string
}

func (p Problem) String() string {
	s := fmt.Sprintf("%v: slot %v", p.Kind, p.Loc)
	if p.Disk != "" {
		s += fmt.Sprintf(" (disk %q segment %d)", p.Disk, p.Segment)
	}
	if p.Detail != "" {
		s += ": " + p.Detail
	}
	return s
}

// Check recomputes every reference count from every table and reports each
// violation of the invariants: leaked slots, referenced slots counted free,
// wrong counts (of slots and of table pages), leaked or missing table
// pages, locations outside their container. It changes nothing. A nil
// result means the store is sound.
func (c *Controller) Check(ctx context.Context) ([]Problem, error) {
	var out []Problem
	err := c.store.View(ctx, func(tx meta.Tx) error {
		var err error
		out, err = check(tx)
		return err
	})
	return out, err
}

type use struct {
	refs uint32 // table pages pointing at the slot
	disk string // one disk that maps it
	seg  uint64
	seen bool // the slot has a count
}

func check(tx meta.Tx) ([]Problem, error) {
	var out []Problem
	cs, err := tx.Containers()
	if err != nil {
		return nil, err
	}
	conts := make(map[uint32]meta.Container, len(cs))
	for _, ct := range cs {
		conts[ct.ID] = ct
	}
	ds, err := tx.Disks()
	if err != nil {
		return nil, err
	}
	uses := map[table.Location]*use{}
	holders := map[uint64]uint32{} // table page -> disks holding it
	for _, d := range ds {
		prs, err := tx.TablePages(d.ID)
		if err != nil {
			return nil, err
		}
		for _, pr := range prs {
			holders[pr.ID]++
			first := holders[pr.ID] == 1
			es, err := tx.Page(pr.ID)
			if errors.Is(err, meta.ErrCorrupt) {
				if first {
					out = append(out, Problem{Kind: MissingPage, Disk: d.Name, Segment: pr.Index * meta.PageEntries, Detail: fmt.Sprintf("table page %d: %v", pr.ID, err)})
				}
				continue
			}
			if err != nil {
				return nil, err
			}
			for i, e := range es {
				if !e.Mapped() {
					continue
				}
				seg := pr.Index*meta.PageEntries + uint64(i)
				ct, ok := conts[e.Loc.Container]
				switch {
				case !ok:
					out = append(out, Problem{Kind: OutOfRange, Loc: e.Loc, Disk: d.Name, Segment: seg, Detail: "no such container"})
					continue
				case uint64(e.Loc.Slot) >= ct.Slots:
					out = append(out, Problem{Kind: OutOfRange, Loc: e.Loc, Disk: d.Name, Segment: seg, Detail: fmt.Sprintf("container has %d slots", ct.Slots)})
					continue
				case ct.SlotSize != d.SegmentSize:
					out = append(out, Problem{Kind: OutOfRange, Loc: e.Loc, Disk: d.Name, Segment: seg, Detail: fmt.Sprintf("slot size %d, segment size %d", ct.SlotSize, d.SegmentSize)})
				case seg >= d.Segments():
					out = append(out, Problem{Kind: OutOfRange, Loc: e.Loc, Disk: d.Name, Segment: seg, Detail: fmt.Sprintf("entry past the disk's %d segments", d.Segments())})
				}
				if !first {
					continue // a shared page counts once
				}
				u := uses[e.Loc]
				if u == nil {
					u = &use{disk: d.Name, seg: seg}
					uses[e.Loc] = u
				}
				u.refs++
			}
		}
	}
	err = tx.ForEachStoredPage(func(pid uint64, refs uint32, stored bool) error {
		n := holders[pid]
		switch {
		case n == 0:
			out = append(out, Problem{Kind: LeakedPage, Detail: fmt.Sprintf("table page %d: count %d, stored %v, in no disk's table", pid, refs, stored)})
		case refs != n:
			out = append(out, Problem{Kind: WrongPageCount, Detail: fmt.Sprintf("table page %d: count %d, in %d disks' tables", pid, refs, n)})
		}
		delete(holders, pid)
		return nil
	})
	if err != nil {
		return nil, err
	}
	for pid, n := range holders {
		out = append(out, Problem{Kind: WrongPageCount, Detail: fmt.Sprintf("table page %d: count 0, in %d disks' tables", pid, n)})
	}
	for _, ct := range cs {
		var used uint64
		err := tx.ForEachRef(ct.ID, func(slot uint32, n uint32) error {
			used++
			loc := table.Location{Container: ct.ID, Slot: slot}
			u := uses[loc]
			switch {
			case uint64(slot) >= ct.Slots:
				out = append(out, Problem{Kind: OutOfRange, Loc: loc, Detail: fmt.Sprintf("count %d past the container's %d slots", n, ct.Slots)})
			case u == nil:
				out = append(out, Problem{Kind: Leaked, Loc: loc, Detail: fmt.Sprintf("count %d, no entry", n)})
			case u.refs != n:
				out = append(out, Problem{Kind: WrongCount, Loc: loc, Disk: u.disk, Segment: u.seg, Detail: fmt.Sprintf("count %d, %d table pages map it", n, u.refs)})
			}
			if u != nil {
				u.seen = true
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		if used != ct.Used {
			out = append(out, Problem{Kind: WrongUsed, Loc: table.Location{Container: ct.ID}, Detail: fmt.Sprintf("container says %d used, counts say %d", ct.Used, used)})
		}
	}
	for loc, u := range uses {
		if !u.seen {
			out = append(out, Problem{Kind: ReferencedFree, Loc: loc, Disk: u.disk, Segment: u.seg, Detail: fmt.Sprintf("%d table pages map it, count 0", u.refs)})
		}
	}
	sortProblems(out)
	return out, nil
}

// Repair reclaims leaked slots (and nothing else: every other kind of
// damage needs a person to decide) and returns what it reclaimed.
func (c *Controller) Repair(ctx context.Context) ([]Problem, error) {
	if err := c.lock(); err != nil {
		return nil, err
	}
	defer c.mu.Unlock()
	var fixed []Problem
	err := c.store.Update(ctx, func(tx meta.Tx) error {
		ps, err := check(tx)
		if err != nil {
			return err
		}
		fixed = fixed[:0]
		for _, p := range ps {
			if p.Kind != Leaked {
				continue
			}
			if err := tx.SetRefs(p.Loc, 0); err != nil {
				return err
			}
			fixed = append(fixed, p)
		}
		return nil
	})
	if err != nil {
		c.freeFailedLocked()
		return nil, err
	}
	locs := make([]table.Location, len(fixed))
	for i, p := range fixed {
		locs[i] = p.Loc
	}
	c.punchFreedLocked(ctx, locs)
	return fixed, nil
}

// sortProblems orders problems for stable output.
func sortProblems(ps []Problem) {
	sort.Slice(ps, func(i, j int) bool {
		a, b := ps[i], ps[j]
		if a.Kind != b.Kind {
			return a.Kind < b.Kind
		}
		if a.Loc != b.Loc {
			return a.Loc.Container < b.Loc.Container || a.Loc.Container == b.Loc.Container && a.Loc.Slot < b.Loc.Slot
		}
		return a.Disk < b.Disk
	})
}
