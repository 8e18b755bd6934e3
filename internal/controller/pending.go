package controller

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Map changes made durable at the client's flush.
//
// The NBD contract makes a write durable once a flush after it (or its
// FUA) has been answered, not before; qcow2 and dm-thin keep their map
// changes in memory until then. So may segmap, for the commits of staged
// writes (copy-on-write, fill-in, whole-segment moves) on a disk that one
// agent alone maps: the commit is recorded here, in memory, applied to
// every read the controller makes of that entry (the overlay), and the
// fault is answered at once: neither the agent's flush of the staged slot
// nor the store's commit is waited for. The changes of a family become
// durable together, in one store transaction, when:
//
//   - the agent flushes the disk (an NBD FLUSH, or a write with FUA): it
//     flushes its containers first, then asks (FaultFlush), so the data
//     is durable before the map that points at it;
//   - a change takes the family exclusively (snapshot, delete, resize,
//     discard, revoke) or a second agent opens one of its disks: they see
//     the durable truth, and from then on the disk is shared;
//   - a disk has MaxPending of them (the rest of its changes commit
//     synchronously until a flush);
//   - Check, the space reports and Close.
//
// Before a commit that no agent's flush preceded, the controller flushes
// the containers the changes' slots are in (their data, written by the
// agent, must be durable first). The slots the changes allocated stay
// reserved in the allocator until their commit. A controller that dies
// loses the changes: the disk reads as before the writes, which were not
// flushed; the agent, which has acknowledged them and may have served
// reads of them, drops its clients' connections when it attaches to the
// next controller, as a crashed server would (agent.Disk), and the slots,
// free in the store, are punched before their next allocation.

// MaxPending bounds the map changes a disk keeps in memory.
const MaxPending = 1 << 16

// flushChunk is the most changes one transaction of a flush commits (an
// etcd transaction is bounded in operations and bytes); the chunks of a
// flush are committed side by side, so that group commit batches them.
const flushChunk = 256

// pendingSeg is one segment's change kept in memory: old is the entry the
// store holds, cur the one agents have.
type pendingSeg struct {
	old, cur table.Entry
	// agent is the agent whose write made the change (the one agent
	// that maps the disk).
	agent string
	// slots are the slots the change allocated, reserved until its
	// commit.
	slots []table.Location
}

// pendingFam is the changes kept in memory for one family.
type pendingFam struct {
	segs  map[segKey]*pendingSeg
	count map[meta.DiskID]int
}

// overlay returns the entry the disk's segment has, the store's e unless
// a change is kept in memory for it.
func (c *Controller) overlay(fam, id meta.DiskID, seg uint64, e table.Entry) table.Entry {
	if cur, ok := c.pendingEntry(fam, id, seg); ok {
		return cur
	}
	return e
}

// pendingEntry returns the entry kept in memory for disk id's segment seg
// of family fam, if there is one.
func (c *Controller) pendingEntry(fam, id meta.DiskID, seg uint64) (table.Entry, bool) {
	c.pend.mu.Lock()
	defer c.pend.mu.Unlock()
	if pf := c.pend.mu.fams[fam]; pf != nil {
		if ps := pf.segs[segKey{id, seg}]; ps != nil {
			return ps.cur, true
		}
	}
	return table.Entry{}, false
}

// refsDelta returns what the changes kept in memory add to the count of
// slot loc, which entries at segment index seg of family fam name.
func (c *Controller) refsDelta(fam meta.DiskID, seg uint64, loc table.Location) int {
	c.pend.mu.Lock()
	defer c.pend.mu.Unlock()
	pf := c.pend.mu.fams[fam]
	if pf == nil {
		return 0
	}
	n := 0
	// The disks with changes are few (a disk, its snapshots and
	// clones): look each up at this index.
	for id := range pf.count {
		ps := pf.segs[segKey{id, seg}]
		if ps == nil {
			continue
		}
		ps.old.Slots(func(l table.Location) {
			if l == loc {
				n--
			}
		})
		ps.cur.Slots(func(l table.Location) {
			if l == loc {
				n++
			}
		})
	}
	return n
}

// mapperCount returns how many agents map disk id (mappers without the
// slice: it runs on every write fault).
func (c *Controller) mapperCount(id meta.DiskID) int {
	c.agents.Lock()
	defer c.agents.Unlock()
	n := 0
	for _, st := range c.agents.byName {
		if st.disks[id] {
			n++
		}
	}
	return n
}

// mayDefer reports whether a staged write's commit on disk d may be kept in
// memory: the controller defers, one agent maps d, its policy is forward
// (a reverse copy moves the other sharers, whose entries it reads from
// the store), and the disk has room for one more.
func (c *Controller) mayDefer(d meta.Disk, seg uint64) bool {
	if !c.deferMaps || d.Policy != table.Forward || c.mapperCount(d.ID) != 1 {
		return false
	}
	c.pend.mu.Lock()
	defer c.pend.mu.Unlock()
	pf := c.pend.mu.fams[d.Family]
	return pf == nil || pf.count[d.ID] < MaxPending || pf.segs[segKey{d.ID, seg}] != nil
}

// deferChange keeps the change of segment seg of d from old to ne in
// memory; newSlot, if set, is a slot it allocated (reserved: the
// reservation passes to the change). It refuses (false) if another agent
// has mapped d since mayDefer and the family has no change in memory
// (see openMapper): the change must be committed now.
func (c *Controller) deferChange(agent string, d meta.Disk, seg uint64, old *table.Entry, ne table.Entry, newSlot *table.Location) (kept, gone bool) {
	c.pend.mu.Lock()
	defer c.pend.mu.Unlock()
	pf := c.pend.mu.fams[d.Family]
	k := segKey{d.ID, seg}
	if old == nil && (pf == nil || pf.segs[k] == nil) {
		return false, true
	}
	if pf == nil && c.mapperCount(d.ID) > 1 {
		return false, false
	}
	if pf == nil {
		pf = &pendingFam{segs: map[segKey]*pendingSeg{}, count: map[meta.DiskID]int{}}
		c.pend.mu.fams[d.Family] = pf
	}
	ps := pf.segs[k]
	if ps != nil {
		ps.cur, ps.agent = ne, agent // old stays what the store holds
	} else {
		ps = &pendingSeg{old: *old, cur: ne, agent: agent}
		pf.segs[k] = ps
		pf.count[d.ID]++
	}
	if newSlot != nil {
		ps.slots = append(ps.slots, *newSlot)
	}
	return true, false
}

// openMapper records that agent st maps disk d and reports whether the
// family has changes in memory, which must then be committed before the
// agent reads (a controller restart would lose them under its reads). It
// and deferChange hold the pending lock while they look at the mappers,
// so a change is never kept in memory for a disk two agents map unless
// the second one's open commits it.
func (c *Controller) openMapper(st *agentState, d meta.Disk) (flush bool) {
	c.pend.mu.Lock()
	defer c.pend.mu.Unlock()
	c.agents.Lock()
	added := !st.disks[d.ID]
	st.disks[d.ID] = true
	c.agents.Unlock()
	return added && c.pend.mu.fams[d.Family] != nil
}

// flushFamily commits the changes of family fam kept in memory, after
// flushing the containers their slots are in. With exclusive the caller
// holds the family lock exclusively; otherwise it takes the family lock
// shared and the lock of each segment index with a change (as a write
// fault would), so that faults on other segments go on meanwhile.
func (c *Controller) flushFamily(ctx context.Context, fam meta.DiskID, exclusive bool) error {
	if !exclusive {
		if err := c.preflush(ctx, fam); err != nil {
			return err
		}
		defer c.lockFamily(fam, false)()
	}
	c.pend.mu.Lock()
	pf := c.pend.mu.fams[fam]
	var idx []uint64
	if pf != nil {
		for k := range pf.segs {
			idx = append(idx, k.seg)
		}
	}
	c.pend.mu.Unlock()
	if pf == nil {
		return nil
	}
	if !exclusive {
		slices.Sort(idx)
		idx = slices.Compact(idx)
		for _, seg := range idx {
			defer c.lockSegment(fam, seg)()
		}
	}
	// Under the locks, the changes at those indexes stay as they are;
	// others may be added meanwhile, and are left for the next flush.
	type change struct {
		k  segKey
		ps *pendingSeg
		pendingSeg
	}
	var todo []change
	c.pend.mu.Lock()
	locked := map[uint64]bool{}
	for _, seg := range idx {
		locked[seg] = true
	}
	for k, ps := range pf.segs {
		if locked[k.seg] {
			todo = append(todo, change{k, ps, *ps})
		}
	}
	c.pend.mu.Unlock()
	sort.Slice(todo, func(i, j int) bool {
		a, b := todo[i].k, todo[j].k
		return a.disk < b.disk || a.disk == b.disk && a.seg < b.seg
	})
	// Data before the map: the agents' writes to the changes' slots
	// are durable before the entries that point at them.
	conts := map[uint32]bool{}
	for _, ch := range todo {
		ch.cur.Slots(func(l table.Location) { conts[l.Container] = true })
	}
	if err := c.flushContainers(ctx, conts); err != nil {
		return err
	}
	// Each chunk commits on its own: a crash between two leaves each
	// segment old or new, and the flush that asked is not answered.
	var (
		wg   sync.WaitGroup
		errs = make([]error, (len(todo)+flushChunk-1)/flushChunk)
	)
	for i := range errs {
		chunk := todo[i*flushChunk : min(len(todo), (i+1)*flushChunk)]
		wg.Go(func() {
			fr := c.newFreeing()
			err := c.store.Update(ctx, func(tx *meta.Tx) error {
				fr.reset()
				for _, ch := range chunk {
					got, err := tx.Entry(ch.k.disk, ch.k.seg)
					if err != nil {
						return err
					}
					if got.Equal(ch.cur) {
						continue // an earlier, failed commit landed all the same
					}
					if !got.Equal(ch.old) {
						return fmt.Errorf("disk %d segment %d holds %v, not %v, under a change kept in memory: %w", ch.k.disk, ch.k.seg, got, ch.old, meta.ErrCorrupt)
					}
					if err := tx.SetEntries(ch.k.disk, ch.k.seg, []table.Entry{ch.cur}); err != nil {
						return err
					}
					if err := moveRefs(tx, ch.old, ch.cur, fr); err != nil {
						return err
					}
				}
				return nil
			})
			fr.finish(ctx, err)
			errs[i] = err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		// Kept: the agents have these entries, and a failed commit
		// may have landed (the next one sees it).
		return fmt.Errorf("commit map changes: %w", err)
	}
	c.pend.mu.Lock()
	for _, ch := range todo {
		delete(pf.segs, ch.k)
		if pf.count[ch.k.disk]--; pf.count[ch.k.disk] == 0 {
			delete(pf.count, ch.k.disk)
		}
	}
	if len(pf.segs) == 0 && c.pend.mu.fams[fam] == pf {
		delete(c.pend.mu.fams, fam)
	}
	c.pend.mu.Unlock()
	for _, ch := range todo {
		for _, l := range ch.slots {
			c.alloc.release(l, false)
		}
	}
	return nil
}

// flushContainers flushes containers ids.
func (c *Controller) flushContainers(ctx context.Context, ids map[uint32]bool) error {
	for _, id := range slices.Sorted(maps.Keys(ids)) {
		ct, err := c.container(ctx, id)
		if err != nil {
			return err
		}
		if err := ct.Flush(); err != nil {
			return fmt.Errorf("flush container %d before committing map changes: %w: %w", id, protocol.ErrIO, err)
		}
	}
	return nil
}

// preflush flushes the containers of family fam's changes kept in memory,
// under no lock, before flushFamily commits them: most of their data is
// then durable before flushFamily takes the locks that writes to those
// segments wait for, and its own flush, under the locks, has little left
// to write. Writes go on while it flushes, so it flushes again while a
// flush takes long (up to Config.PreflushRounds times): each round has
// only what the last one's writes left. Without it a snapshot under random
// writes held its writers for the whole of a flush, a second and more.
func (c *Controller) preflush(ctx context.Context, fam meta.DiskID) error {
	for range c.preflushRounds {
		conts := map[uint32]bool{}
		c.pend.mu.Lock()
		if pf := c.pend.mu.fams[fam]; pf != nil {
			for _, ps := range pf.segs {
				ps.cur.Slots(func(l table.Location) { conts[l.Container] = true })
			}
		}
		c.pend.mu.Unlock()
		start := c.now()
		if err := c.flushContainers(ctx, conts); err != nil {
			return err
		}
		if c.now().Sub(start) < preflushShort {
			return nil
		}
	}
	return nil
}

// DefaultPreflushRounds bounds the flushes of one preflush by default
// (Config.PreflushRounds), and a flush shorter than preflushShort ends
// it: what is left is for the flush under locks.
const (
	DefaultPreflushRounds = 4
	preflushShort         = 50 * time.Millisecond
)

// CommitPending makes every map change kept in memory durable, as the
// agents' flushes would (pending.go). Reports of the store (check, space,
// containers) do it first, so that they count what the agents see.
func (c *Controller) CommitPending(ctx context.Context) error { return c.flushAll(ctx) }

// dropPending forgets the changes kept in memory that agent's writes made,
// as the agent attaches again: it restarted (or lost its controller), and
// the data its unflushed writes put in the changes' slots may be lost
// with it; its flushes never committed them, and no one else maps those
// disks. The disks read as the store holds them; the agent is told to
// drop the entries (Invalid, Blocking) in case it faulted them in again
// before its attach reached here, and the changes' slots go back to the
// free slots.
func (c *Controller) dropPending(ctx context.Context, agent string) {
	c.pend.mu.Lock()
	var fams []meta.DiskID
	for f, pf := range c.pend.mu.fams {
		for _, ps := range pf.segs {
			if ps.agent == agent {
				fams = append(fams, f)
				break
			}
		}
	}
	c.pend.mu.Unlock()
	slices.Sort(fams)
	for _, f := range fams {
		unlock := c.lockFamily(f, true)
		var keys []segKey
		var slots []table.Location
		c.pend.mu.Lock()
		if pf := c.pend.mu.fams[f]; pf != nil {
			for k, ps := range pf.segs {
				if ps.agent != agent {
					continue
				}
				keys = append(keys, k)
				slots = append(slots, ps.slots...)
				delete(pf.segs, k)
				if pf.count[k.disk]--; pf.count[k.disk] == 0 {
					delete(pf.count, k.disk)
				}
			}
			if len(pf.segs) == 0 {
				delete(c.pend.mu.fams, f)
			}
		}
		c.pend.mu.Unlock()
		for _, k := range keys {
			cmd := protocol.SetEntryState{Disk: protocol.DiskID(k.disk), First: k.seg, Count: 1, State: table.Invalid, On: true, Blocking: true}
			if err := c.broadcast(ctx, k.disk, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }); err != nil {
				c.logger.Warn("drop entries of lost map changes", "disk", k.disk, "segment", k.seg, "err", err)
			}
		}
		for _, l := range slots {
			c.alloc.release(l, true)
		}
		unlock()
		if len(keys) > 0 {
			c.logger.Warn("map changes not yet flushed dropped: their agent attached again", "agent", agent, "changes", len(keys))
		}
	}
}

// flushAll commits every family's changes kept in memory.
func (c *Controller) flushAll(ctx context.Context) error {
	c.pend.mu.Lock()
	fams := make([]meta.DiskID, 0, len(c.pend.mu.fams))
	for f := range c.pend.mu.fams {
		fams = append(fams, f)
	}
	c.pend.mu.Unlock()
	sort.Slice(fams, func(i, j int) bool { return fams[i] < fams[j] })
	for _, f := range fams {
		if err := c.flushFamily(ctx, f, false); err != nil {
			return err
		}
	}
	return nil
}
