package controller

import (
	"context"
	"sort"
	"sync"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// pickContainer chooses the container for the next slot of a disk whose
// segments are slotSize bytes. It spreads allocations round-robin over every
// online container of that slot size with a free slot (a draining or
// failed one gets none): turn is a counter the caller
// advances on each allocation. ok is false when no container qualifies.
//
// It is pure: the caller reads the containers and applies the choice.
func pickContainer(cs []meta.Container, slotSize uint64, turn uint64) (id uint32, ok bool) {
	var ids []uint32
	for _, c := range cs {
		if c.SlotSize == slotSize && c.Used < c.Slots && c.State == meta.ContainerOnline {
			ids = append(ids, c.ID)
		}
	}
	if len(ids) == 0 {
		return 0, false
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids[turn%uint64(len(ids))], true
}

// hasPool reports whether any container has slots of slotSize.
func hasPool(cs []meta.Container, slotSize uint64) bool {
	for _, c := range cs {
		if c.SlotSize == slotSize {
			return true
		}
	}
	return false
}

// allocator hands out free slots to faults that run in parallel. A slot
// taken from it stays reserved in memory until its owner's commit has
// made it used in the store, or the owner gives it back; a slot that a
// commit frees is reserved before the commit (by the transaction that
// frees it) until it has been punched. So no two owners ever get the same
// slot, and no slot is handed out while it still holds a freed disk's
// data.
//
// Its lock is a leaf: it is taken inside store transactions (by those
// that free or take slots) and around store reads, never across a store
// commit, a container call or an agent command.
type allocator struct {
	mu struct {
		sync.Mutex
		turn uint64            // round-robin counter
		hint map[uint32]uint32 // per container: where to search for a free slot
		// reserved are the slots taken and not yet committed, and
		// the slots freed and not yet punched.
		reserved map[table.Location]int
		// zero holds, per container, whether its free slots are all
		// durably zero (see ensureZeroedLocked).
		zero map[uint32]*zeroState
		// released holds, per container, a channel closed when one of
		// its reservations goes (made by those who wait for that:
		// reservations).
		released map[uint32]chan struct{}
	}
}

// zeroState is what the allocator knows of a container's free slots.
type zeroState struct {
	done bool // every free slot is durably zero
	gen  uint64
	busy chan struct{} // non-nil while a zeroing runs; closed at its end
}

func (a *allocator) init() {
	a.mu.hint = make(map[uint32]uint32)
	a.mu.reserved = make(map[table.Location]int)
	a.mu.zero = make(map[uint32]*zeroState)
	a.mu.released = make(map[uint32]chan struct{})
}

// zs returns container cid's zero state; a.mu held.
func (a *allocator) zs(cid uint32) *zeroState {
	z := a.mu.zero[cid]
	if z == nil {
		z = &zeroState{}
		a.mu.zero[cid] = z
	}
	return z
}

// dirtyLocked notes that a free slot of container cid may hold data: its
// free slots are zeroed again before its next allocation; a.mu held.
func (a *allocator) dirtyLocked(cid uint32) {
	z := a.zs(cid)
	z.done = false
	z.gen++
}

// allDirty notes that any free slot may hold data: after a commit that
// frees slots failed, since it may have committed all the same.
func (a *allocator) allDirty() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for cid := range a.mu.zero {
		a.dirtyLocked(cid)
	}
}

// reserve keeps loc from being handed out until release. Reservations
// count: a slot that an in-place stage writes and a transaction frees is
// held until both are over.
func (a *allocator) reserve(loc table.Location) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.mu.reserved[loc]++
}

// release gives back a reservation. With dirty, loc (free again) may hold
// data.
func (a *allocator) release(loc table.Location, dirty bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.mu.reserved[loc]--; a.mu.reserved[loc] <= 0 {
		delete(a.mu.reserved, loc)
		if ch := a.mu.released[loc.Container]; ch != nil {
			close(ch)
			delete(a.mu.released, loc.Container)
		}
	}
	if dirty {
		a.dirtyLocked(loc.Container)
	}
}

// reservedOn returns how many slots of container cid are reserved.
func (a *allocator) reservedOn(cid uint32) int {
	n, _ := a.reservations(cid)
	return n
}

// reservedSlots returns the slots of container cid that are reserved.
func (a *allocator) reservedSlots(cid uint32) []uint32 {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []uint32
	for loc := range a.mu.reserved {
		if loc.Container == cid {
			out = append(out, loc.Slot)
		}
	}
	return out
}

// reservations returns how many slots of container cid are reserved,
// and a channel closed when one of those reservations goes.
func (a *allocator) reservations(cid uint32) (int, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for loc := range a.mu.reserved {
		if loc.Container == cid {
			n++
		}
	}
	ch := a.mu.released[cid]
	if ch == nil {
		ch = make(chan struct{})
		a.mu.released[cid] = ch
	}
	return n, ch
}

// takeSlot reserves a free slot for a disk with segments of slotSize
// bytes, from a container whose free slots are durably zero, so the slot
// reads as zeros. The caller commits it used and then releases it, or
// releases it unused.
func (c *Controller) takeSlot(ctx context.Context, slotSize uint64) (table.Location, error) {
	a := &c.alloc
	a.mu.Lock()
	defer a.mu.Unlock()
	for {
		var (
			loc   table.Location
			found bool
			zero  uint32 // a container to zero first
		)
		if err := c.store.View(ctx, func(tx *meta.Tx) error {
			cs, err := tx.Containers()
			if err != nil {
				return err
			}
			id, ok := pickContainer(cs, slotSize, a.mu.turn)
			if !ok {
				return protocol.ErrNoSpace
			}
			if !a.zs(id).done {
				zero = id
				return nil
			}
			loc, found, err = c.findFreeTx(tx, cs, slotSize, &a.mu.turn, a.mu.hint)
			if err == nil && !found {
				err = protocol.ErrNoSpace
			}
			if found && !a.zs(loc.Container).done {
				// Another container of the round, not zeroed yet.
				zero, found = loc.Container, false
			}
			return err
		}); err != nil {
			return table.Location{}, err
		}
		if !found {
			if err := c.ensureZeroedLocked(ctx, zero); err != nil {
				return table.Location{}, err
			}
			continue
		}
		a.mu.reserved[loc]++
		return loc, nil
	}
}

// ensureZeroedLocked makes every free slot of container cid durably zero,
// once per controller life (and again after a slot was left dirty): a
// crash may have left a slot freed in the store but not yet punched, and
// a slot handed out for a Zero fault must read as zeros. It is called with
// a.mu held and returns with it held, but does not hold it while it
// punches: allocations from other containers go on meanwhile, and those
// from cid wait for it.
func (c *Controller) ensureZeroedLocked(ctx context.Context, cid uint32) error {
	a := &c.alloc
	for {
		z := a.zs(cid)
		if z.done {
			return nil
		}
		if z.busy != nil {
			ch := z.busy
			a.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				a.mu.Lock()
				return ctx.Err()
			}
			a.mu.Lock()
			continue
		}
		// Reserved slots may already hold their owners' data: they
		// are not punched. No slot of cid is reserved while this runs.
		var keep []uint32
		for loc := range a.mu.reserved {
			if loc.Container == cid {
				keep = append(keep, loc.Slot)
			}
		}
		ch := make(chan struct{})
		z.busy = ch
		gen := z.gen
		a.mu.Unlock()
		err := c.zeroFree(ctx, cid, keep)
		a.mu.Lock()
		z.busy = nil
		close(ch)
		if err != nil {
			return err
		}
		if z.gen == gen {
			z.done = true
		}
	}
}

// findFreeTx finds a free slot of the given size in tx, round robin over
// the containers from *turn, skipping reserved slots; hint holds, per
// container, where to search from. c.alloc.mu held.
func (c *Controller) findFreeTx(tx *meta.Tx, cs []meta.Container, slotSize uint64, turn *uint64, hint map[uint32]uint32) (table.Location, bool, error) {
	for range cs {
		id, ok := pickContainer(cs, slotSize, *turn)
		if !ok {
			return table.Location{}, false, nil
		}
		*turn++
		from := hint[id]
		// FindFree wraps around: after as many reserved slots as
		// there are, every free slot of id is reserved.
		for tries := 0; tries <= len(c.alloc.mu.reserved); tries++ {
			slot, ok, err := tx.FindFree(id, from)
			if err != nil {
				return table.Location{}, false, err
			}
			if !ok {
				break
			}
			l := table.Location{Container: id, Slot: slot}
			if c.alloc.mu.reserved[l] > 0 {
				from = slot + 1
				continue
			}
			hint[id] = slot + 1
			return l, true, nil
		}
	}
	return table.Location{}, false, nil
}

// freeing collects the slots that one transaction frees. Its fn reserves
// each as it frees it (add), before the commit can make it free, so that
// no fault allocates it until it has been punched (finish). fn may run more
// than once: reset at its start; slots an earlier run reserved are given
// back at finish.
type freeing struct {
	c    *Controller
	all  map[table.Location]bool
	last []table.Location
}

func (c *Controller) newFreeing() *freeing {
	return &freeing{c: c, all: map[table.Location]bool{}}
}

// reset starts a run of the transaction's fn.
func (f *freeing) reset() { f.last = f.last[:0] }

// add notes that the running fn frees loc.
func (f *freeing) add(loc table.Location) {
	f.last = append(f.last, loc)
	if !f.all[loc] {
		f.all[loc] = true
		f.c.alloc.reserve(loc)
	}
}

// finish ends the transaction, err being its outcome: on success the freed
// slots are punched and flushed (free slots stay durably zero) and handed
// back to the allocator. A failed commit may have committed all the same,
// leaving freed slots unpunched: every container's free slots are zeroed
// again before their next allocation.
func (f *freeing) finish(ctx context.Context, err error) {
	if err != nil {
		f.c.alloc.allDirty()
		for loc := range f.all {
			f.c.alloc.release(loc, false)
		}
		return
	}
	dirty := f.c.punch(ctx, f.last)
	for loc := range f.all {
		f.c.alloc.release(loc, dirty[loc.Container])
	}
}
