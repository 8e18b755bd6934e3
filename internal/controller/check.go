package controller

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// ProblemKind is a kind of damage Check finds.
type ProblemKind uint8

// The kinds of damage.
const (
	// Leaked: a slot has a reference count but no entry names it (as
	// its own slot or as a layer under a partial entry).
	// Harmless but wasteful; Repair reclaims it.
	Leaked ProblemKind = iota + 1
	// ReferencedFree: entries point at a slot whose count is zero, so it
	// could be handed out again while in use.
	ReferencedFree
	// WrongCount: a slot's count differs from the entries pointing at it
	// (when the count is 1 and more table pages map it, SharedWritable).
	WrongCount
	// SharedWritable: a shared slot the controller would let a disk
	// write in place. No-write is derived from sharing (a slot is
	// writable only if its count is 1 and the table page that maps it is
	// not shared), so this is a slot that several table pages map with
	// a stored count of 1, or a table page that several disks' tables
	// hold with a stored count of 1. A write through one disk would
	// change the others' data.
	SharedWritable
	// OutOfRange: an entry points at a container that does not exist, past
	// its last slot, or at one whose slot size is not the disk's segment
	// size, or lies past the end of its disk; or a slot past the end of
	// its container has a count.
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
	// CorruptRecord: a record fails its checksum, does not decode, or
	// contradicts its key or the record it names.
	CorruptRecord
	// TruncatedRecord: a record is shorter than its layout, so it
	// cannot hold its fields or its checksum.
	TruncatedRecord
	// DamagedFile: the bbolt file itself is damaged, below the records
	// (its pages, free list or meta pages), as bbolt's own check of the
	// file finds. Check looks for it first, on a store that can check
	// its file (meta.Bolt), and stops there if it finds any.
	DamagedFile
	// InvalidPartial: a partial entry (sub-segment copy-on-write) whose
	// shape does not hold for its disk's segment size
	// (table.Partial.Valid): too many layers, a top that holds no
	// sub-block or all of them, a base that does not hold all, a slot
	// named twice, or a layer that holds no visible sub-block. Reads of
	// some sub-block would go to the wrong slot.
	InvalidPartial
	// ReplicaMismatch: the replicas of a mirrored container hold
	// different bytes in a used slot (Scrub). Reads of it depend on
	// the replica they go to.
	ReplicaMismatch
	// FreeNotZero: a free slot of a mirrored container does not read
	// zero on some healthy replica (Scrub). Free slots are kept zero, so
	// that a slot handed out reads as zeros.
	FreeNotZero
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
	case CorruptRecord:
		return "corrupt-record"
	case TruncatedRecord:
		return "truncated-record"
	case DamagedFile:
		return "damaged-file"
	case InvalidPartial:
		return "invalid-partial-entry"
	case ReplicaMismatch:
		return "replica-mismatch"
	case FreeNotZero:
		return "free-slot-not-zero"
	}
	return fmt.Sprintf("ProblemKind(%d)", uint8(k))
}

// Problem is one violation of the store's invariants.
type Problem struct {
	Kind ProblemKind
	// Loc is the slot concerned, for the kinds on a slot.
	Loc table.Location
	// Key names the record concerned, for the other kinds (meta.KeyName:
	// "p/17" for table page 17, "c/1" for container 1, "d/3" for the
	// record of disk 3).
	Key string
	// Disk and Segment name the entry concerned, when there is one.
	Disk    string
	Segment uint64
	Detail  string
}

func (p Problem) String() string {
	var s string
	if p.Key != "" {
		s = fmt.Sprintf("%v: record %s", p.Kind, p.Key)
	} else {
		s = fmt.Sprintf("%v: slot %v", p.Kind, p.Loc)
	}
	if p.Disk != "" {
		s += fmt.Sprintf(" (disk %q segment %d)", p.Disk, p.Segment)
	}
	if p.Detail != "" {
		s += ": " + p.Detail
	}
	return s
}

// Check reports each violation of the store's invariants. On a store that
// can check its file (meta.Bolt) it runs that check first and stops there
// if it finds damage (DamagedFile). Then it decodes
// every record and reports each damaged one (corrupt-record,
// truncated-record), with its key; if there is any, it stops there: counting
// references without every table page, directory and count record would
// report the slots of the unreadable records as leaked or wrongly counted,
// and a repair would then free slots still in use. Otherwise it recomputes
// every reference count from every table and reports leaked slots,
// referenced slots counted free, wrong counts (of slots and of table pages),
// shared slots left writable, leaked or missing table pages, locations
// outside their container, partial entries of an invalid shape and wrong
// used-slot counts. Every slot an entry names counts: its own and, for a
// partial entry, each layer under it (table.Entry.Slots). It changes
// nothing. A nil result means the store is sound.
func (c *Controller) Check(ctx context.Context) ([]Problem, error) {
	if err := c.flushAll(ctx); err != nil {
		return nil, err
	}
	if ps := c.checkFile(); len(ps) > 0 {
		return ps, nil
	}
	var out []Problem
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		out, err = check(tx)
		return err
	})
	return out, err
}

// fileChecker is a store that can check its file below the records
// (meta.Bolt).
type fileChecker interface{ CheckFile() []error }

// checkFile returns a DamagedFile problem for each error the store's own
// file check finds, if it has one.
func (c *Controller) checkFile() []Problem {
	fc, ok := c.store.(fileChecker)
	if !ok {
		return nil
	}
	var ps []Problem
	for _, err := range fc.CheckFile() {
		ps = append(ps, Problem{Kind: DamagedFile, Detail: err.Error()})
	}
	return ps
}

type use struct {
	refs uint32 // table pages pointing at the slot
	disk string // one disk that maps it
	seg  uint64
	seen bool // the slot has a count
}

func check(tx *meta.Tx) ([]Problem, error) {
	damaged, err := tx.Damaged()
	if err != nil {
		return nil, err
	}
	if len(damaged) > 0 {
		out := make([]Problem, len(damaged))
		for i, e := range damaged {
			k := CorruptRecord
			if e.Truncated {
				k = TruncatedRecord
			}
			out[i] = Problem{Kind: k, Key: meta.KeyName(e.Key), Detail: e.Reason}
		}
		sortProblems(out)
		return out, nil
	}
	return checkCounts(tx)
}

// pageName names table page pid's record (as meta.KeyName does).
func pageName(pid uint64) string { return fmt.Sprintf("p/%d", pid) }

// checkCounts recomputes the reference counts of a store whose records all
// decode and compares them with the stored ones.
func checkCounts(tx *meta.Tx) ([]Problem, error) {
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
	holders := map[uint64]uint32{}   // table page -> disks holding it
	holder := map[uint64]meta.Disk{} // table page -> one disk holding it
	for _, d := range ds {
		prs, err := tx.TablePages(d.ID)
		if err != nil {
			return nil, err
		}
		for _, pr := range prs {
			holders[pr.ID]++
			first := holders[pr.ID] == 1
			if first {
				holder[pr.ID] = d
			}
			es, err := tx.Page(pr.ID)
			if errors.Is(err, meta.ErrCorrupt) {
				// Every record decodes (check looked first), so the
				// page is not stored.
				if first {
					out = append(out, Problem{Kind: MissingPage, Key: pageName(pr.ID), Disk: d.Name, Segment: pr.Index * meta.PageEntries,
						Detail: fmt.Sprintf("table page %d, entries [%d, %d) of the disk, is not stored", pr.ID, pr.Index*meta.PageEntries, (pr.Index+1)*meta.PageEntries)})
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
				if e.Part != nil && first {
					if err := e.Part.Valid(e.Loc, table.SubBlockCount(d.SegmentSize)); err != nil {
						out = append(out, Problem{Kind: InvalidPartial, Loc: e.Loc, Disk: d.Name, Segment: seg, Detail: fmt.Sprintf("%v (entry %v)", err, e)})
					}
				}
				// Every slot the entry names counts: its own and, for a
				// partial entry, each layer under it.
				e.Slots(func(l table.Location) {
					where := ""
					if l != e.Loc {
						where = fmt.Sprintf("layer under partial entry %v: ", e.Loc)
					}
					ct, ok := conts[l.Container]
					switch {
					case !ok:
						out = append(out, Problem{Kind: OutOfRange, Loc: l, Disk: d.Name, Segment: seg, Detail: where + "no such container"})
						return
					case uint64(l.Slot) >= ct.Slots:
						out = append(out, Problem{Kind: OutOfRange, Loc: l, Disk: d.Name, Segment: seg, Detail: fmt.Sprintf("%scontainer has %d slots", where, ct.Slots)})
						return
					case ct.SlotSize != d.SegmentSize:
						out = append(out, Problem{Kind: OutOfRange, Loc: l, Disk: d.Name, Segment: seg, Detail: fmt.Sprintf("%sslot size %d, segment size %d", where, ct.SlotSize, d.SegmentSize)})
					case l == e.Loc && seg >= d.Segments():
						out = append(out, Problem{Kind: OutOfRange, Loc: l, Disk: d.Name, Segment: seg, Detail: fmt.Sprintf("entry past the disk's %d segments", d.Segments())})
					}
					if !first {
						return // a shared page counts once
					}
					u := uses[l]
					if u == nil {
						u = &use{disk: d.Name, seg: seg}
						uses[l] = u
					}
					u.refs++
				})
			}
		}
	}
	err = tx.ForEachStoredPage(func(pid uint64, refs uint32, stored bool) error {
		n := holders[pid]
		switch {
		case n == 0:
			out = append(out, Problem{Kind: LeakedPage, Key: pageName(pid), Detail: fmt.Sprintf("table page %d: count %d, stored %v, in no disk's table", pid, refs, stored)})
		case refs == 1 && n > 1:
			d := holder[pid]
			out = append(out, Problem{Kind: SharedWritable, Key: pageName(pid), Disk: d.Name, Detail: fmt.Sprintf("table page %d: count 1, but %d disks' tables hold it: a write through one of them would land in place, in slots the others share", pid, n)})
		case refs != n:
			out = append(out, Problem{Kind: WrongPageCount, Key: pageName(pid), Detail: fmt.Sprintf("table page %d: count %d, in the tables of %s", pid, refs, count(n, "disk"))})
		}
		delete(holders, pid)
		return nil
	})
	if err != nil {
		return nil, err
	}
	for pid, n := range holders {
		out = append(out, Problem{Kind: WrongPageCount, Key: pageName(pid), Detail: fmt.Sprintf("table page %d: count 0, in the tables of %s", pid, count(n, "disk"))})
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
			case n == 1 && u.refs > 1:
				out = append(out, Problem{Kind: SharedWritable, Loc: loc, Disk: u.disk, Segment: u.seg, Detail: fmt.Sprintf("count 1, but %d table pages map it: a write through one of them would land in place, in a slot the others share", u.refs)})
			case u.refs != n:
				out = append(out, Problem{Kind: WrongCount, Loc: loc, Disk: u.disk, Segment: u.seg, Detail: fmt.Sprintf("count %d, but %s", n, mapIt(u.refs))})
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
			out = append(out, Problem{Kind: WrongUsed, Key: fmt.Sprintf("c/%d", ct.ID), Loc: table.Location{Container: ct.ID}, Detail: fmt.Sprintf("container %d says %d slots used, counts say %d", ct.ID, ct.Used, used)})
		}
	}
	for loc, u := range uses {
		if !u.seen {
			out = append(out, Problem{Kind: ReferencedFree, Loc: loc, Disk: u.disk, Segment: u.seg, Detail: fmt.Sprintf("count 0, but %s: it could be handed out again while in use", mapIt(u.refs))})
		}
	}
	sortProblems(out)
	return out, nil
}

// Repair reclaims leaked slots and returns what it reclaimed. It changes
// nothing else, and nothing at all when Check finds any other kind of
// damage (every other kind needs a person to decide, and with it present a
// slot that looks leaked may not be): then it returns an error matching
// ErrRepairRefused. A store with nothing to reclaim is not written.
func (c *Controller) Repair(ctx context.Context) ([]Problem, error) {
	end, err := c.begin(ctx, false)
	if err != nil {
		return nil, err
	}
	defer end()
	// Look first, so that a refused or empty repair writes nothing.
	ps := c.checkFile()
	if len(ps) > 0 {
		return nil, Repairable(ps)
	}
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		ps, err = check(tx)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := Repairable(ps); err != nil || len(ps) == 0 {
		return nil, err
	}
	var fixed []Problem
	fr := c.newFreeing()
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		fr.reset()
		ps, err := check(tx)
		if err != nil {
			return err
		}
		if err := Repairable(ps); err != nil {
			return err
		}
		fixed = fixed[:0]
		for _, p := range ps {
			if err := tx.SetRefs(p.Loc, 0); err != nil {
				return err
			}
			fr.add(p.Loc)
			fixed = append(fixed, p)
		}
		return nil
	})
	fr.finish(ctx, err)
	if err != nil {
		return nil, err
	}
	return fixed, nil
}

// Repairable returns an error matching ErrRepairRefused if ps holds any
// problem but a leaked slot: what Repair would refuse.
func Repairable(ps []Problem) error {
	n := map[ProblemKind]int{}
	var kinds []ProblemKind
	for _, p := range ps {
		if p.Kind != Leaked {
			if n[p.Kind] == 0 {
				kinds = append(kinds, p.Kind)
			}
			n[p.Kind]++
		}
	}
	if len(kinds) == 0 {
		return nil
	}
	var list []string
	for _, k := range kinds {
		list = append(list, fmt.Sprintf("%d %v", n[k], k))
	}
	return fmt.Errorf("%w: %s; nothing was changed", ErrRepairRefused, strings.Join(list, ", "))
}

// count returns "1 disk", "2 disks".
func count(n uint32, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// mapIt says how many table pages map a slot.
func mapIt(n uint32) string {
	if n == 1 {
		return "1 table page maps it"
	}
	return fmt.Sprintf("%d table pages map it", n)
}

// sortProblems orders problems for stable output.
func sortProblems(ps []Problem) {
	sort.Slice(ps, func(i, j int) bool {
		a, b := ps[i], ps[j]
		if a.Kind != b.Kind {
			return a.Kind < b.Kind
		}
		if a.Key != b.Key {
			return a.Key < b.Key
		}
		if a.Loc != b.Loc {
			return a.Loc.Container < b.Loc.Container || a.Loc.Container == b.Loc.Container && a.Loc.Slot < b.Loc.Slot
		}
		return a.Disk < b.Disk
	})
}
