package controller

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"

	"segmap/internal/container"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Scrub of mirrored containers. The replicas of a mirrored container
// must hold the same bytes in every used slot, and zeros in every free
// one (free slots are kept durably zero). Nothing else checks that: a
// read goes to one healthy replica, and a replica that silently lost or
// garbled a write answers reads with it. Scrub reads every slot on every
// healthy replica, each directly (container.Mirror.Replica), and
// compares.
//
// A used slot is compared as a rebuild copies it (holdSeg): under the
// locks of a write fault, with the agents that map it kept from writing
// it, so that no host write lands on one replica and not yet on the
// other while they are read. A free slot is compared while reserved in
// the allocator, so that it is not handed out meanwhile.
//
// A repair rewrites the replicas that differ from a source replica,
// chosen as follows: with three healthy replicas, two that agree; else,
// for a slot of the write-intent record (written while a replica was
// away), a healthy replica that has not caught up since; else the first
// healthy replica, in the record's order (the problem says so: nothing
// tells which replica holds the last acknowledged write). A free slot
// that does not read zero is punched.

// ScrubResult is what Scrub found and did.
type ScrubResult struct {
	// Problems are the mismatches found and left as they are
	// (replica-mismatch, free-slot-not-zero).
	Problems []Problem
	// Repaired are the mismatches found and repaired.
	Repaired []Problem
	// Slots is how many slots were compared, used and free, on
	// Containers mirrored containers.
	Slots      uint64
	Containers int
}

// scrubChunk is how much of a slot is read from each replica at once.
const scrubChunk = 1 << 20

// scrubFreeBatch is how many slots the free-slot pass reserves at once.
const scrubFreeBatch = 64

// Scrub compares the replicas of every mirrored container that is not
// failed and has two healthy replicas or more: every used slot that an
// entry names, and every free slot (which must read zero). With repair
// it rewrites each mismatched replica from a source replica and punches
// free slots that do not read zero. progress, if not nil, is called
// with the slots done of the total (the slots of those containers).
func (c *Controller) Scrub(ctx context.Context, repair bool, progress func(done, total uint64)) (ScrubResult, error) {
	var res ScrubResult
	end, err := c.begin(ctx, false)
	if err != nil {
		return res, err
	}
	defer end()
	cs, err := c.ListContainers(ctx)
	if err != nil {
		return res, err
	}
	var (
		todo  []meta.Container
		total uint64
	)
	for _, ct := range cs {
		if ct.Mirrored() && ct.State != meta.ContainerFailed && ct.Healthy() >= 2 {
			todo = append(todo, ct)
			total += ct.Slots
		}
	}
	if err := c.flushAll(ctx); err != nil {
		return res, err
	}
	s := &scrubber{c: c, repair: repair, total: total, progress: progress, res: &res}
	for _, ct := range todo {
		if err := s.container(ctx, ct); err != nil {
			return res, fmt.Errorf("scrub container %d: %w", ct.ID, err)
		}
		res.Containers++
	}
	sortProblems(res.Problems)
	sortProblems(res.Repaired)
	if progress != nil {
		progress(total, total)
	}
	return res, nil
}

// scrubber is one run of Scrub.
type scrubber struct {
	c        *Controller
	repair   bool
	total    uint64
	done     uint64
	progress func(done, total uint64)
	res      *ScrubResult
}

func (s *scrubber) step(n uint64) {
	s.done += n
	s.res.Slots += n
	if s.progress != nil {
		s.progress(min(s.done, s.total), s.total)
	}
}

// container scrubs mirrored container ct.
func (s *scrubber) container(ctx context.Context, ct meta.Container) error {
	c := s.c
	mc, err := c.container(ctx, ct.ID)
	if err != nil {
		return err
	}
	m, ok := mc.(*container.Mirror)
	if !ok {
		return fmt.Errorf("container %d is open unmirrored: %w", ct.ID, meta.ErrCorrupt)
	}
	var intents []uint32
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		intents, err = tx.Intents(ct.ID)
		return err
	}); err != nil {
		return wrapNotFound(err)
	}
	written := make(map[uint32]bool, len(intents))
	for _, sl := range intents {
		written[sl] = true
	}
	work, _, err := c.drainWork(ctx, ct.ID)
	if err != nil {
		return err
	}
	for _, w := range work {
		err := c.holdSeg(ctx, ct.ID, w, nil, func(ents []drainEntry, slots []uint32, _ uint64) error {
			for _, sl := range slots {
				if err := s.usedSlot(m, ct.ID, sl, written[sl], ents, w.seg); err != nil {
					return err
				}
			}
			s.step(uint64(len(slots)))
			return nil
		})
		if err != nil {
			return fmt.Errorf("family %d segment %d: %w", w.fam, w.seg, err)
		}
	}
	for from := uint64(0); from < ct.Slots; from += scrubFreeBatch {
		to := min(from+scrubFreeBatch, ct.Slots)
		held, dirty, err := c.holdFree(ctx, ct.ID, from, to)
		if err != nil {
			return err
		}
		err = func() error {
			defer func() {
				for _, sl := range held {
					c.alloc.release(table.Location{Container: ct.ID, Slot: sl}, false)
				}
			}()
			for _, sl := range held {
				if err := s.freeSlot(m, ct.ID, sl, dirty); err != nil {
					return err
				}
			}
			return nil
		}()
		if err != nil {
			return err
		}
		s.step(uint64(len(held)))
	}
	return nil
}

// holdFree reserves the slots of container cid in [from, to) that are
// free and not reserved, and returns them: none is handed out, written
// or punched by another until released. dirty: the container's free
// slots are not known to be zero yet (they are zeroed before its next
// allocation). A zeroing of the container that runs is waited for.
func (c *Controller) holdFree(ctx context.Context, cid uint32, from, to uint64) (held []uint32, dirty bool, err error) {
	a := &c.alloc
	a.mu.Lock()
	defer a.mu.Unlock()
	for {
		z := a.zs(cid)
		if z.busy == nil {
			dirty = !z.done
			break
		}
		ch := z.busy
		a.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			a.mu.Lock()
			return nil, false, ctx.Err()
		}
		a.mu.Lock()
	}
	err = c.store.View(ctx, func(tx *meta.Tx) error {
		held = held[:0]
		for sl := from; sl < to; sl++ {
			loc := table.Location{Container: cid, Slot: uint32(sl)}
			n, err := tx.Refs(loc)
			if err != nil {
				return err
			}
			if n == 0 && a.mu.reserved[loc] == 0 {
				held = append(held, uint32(sl))
			}
		}
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	for _, sl := range held {
		a.mu.reserved[table.Location{Container: cid, Slot: sl}]++
	}
	return held, dirty, nil
}

// slotView is one slot as each healthy replica holds it.
type slotView struct {
	idx     []int    // the healthy replicas compared, by index
	uris    []string // their URIs
	eq      [][]bool // eq[a][b]: replicas idx[a] and idx[b] hold the same bytes
	nonzero []bool   // nonzero[a]: replica idx[a] holds a byte that is not zero
	first   int64    // the first byte of the slot where two differ; -1: none
}

// readSlot reads slot sl on every healthy replica of m, a chunk at a
// time, and compares.
func readSlot(m *container.Mirror, sl uint32) (slotView, error) {
	mem := m.Membership()
	v := slotView{first: -1}
	var reps []container.Container
	for i, r := range mem.Replicas {
		if r.State != protocol.ReplicaHealthy {
			continue
		}
		rc := m.Replica(i)
		if rc == nil {
			continue
		}
		v.idx = append(v.idx, i)
		v.uris = append(v.uris, r.URI)
		reps = append(reps, rc)
	}
	n := len(reps)
	v.eq = make([][]bool, n)
	for a := range v.eq {
		v.eq[a] = make([]bool, n)
		for b := range v.eq[a] {
			v.eq[a][b] = true
		}
	}
	v.nonzero = make([]bool, n)
	size := m.SlotSize()
	bufs := make([][]byte, n)
	for a := range bufs {
		bufs[a] = make([]byte, min(size, scrubChunk))
	}
	base := int64(sl) * size
	for off := int64(0); off < size; off += int64(len(bufs[0])) {
		k := min(int64(len(bufs[0])), size-off)
		for a, rc := range reps {
			if _, err := rc.ReadAt(bufs[a][:k], base+off); err != nil {
				return v, fmt.Errorf("read slot %d of replica %s: %w: %w", sl, v.uris[a], protocol.ErrIO, err)
			}
			if !v.nonzero[a] && !allZero(bufs[a][:k]) {
				v.nonzero[a] = true
			}
		}
		for a := range n {
			for b := a + 1; b < n; b++ {
				if !v.eq[a][b] {
					continue
				}
				if i := firstDiff(bufs[a][:k], bufs[b][:k]); i >= 0 {
					v.eq[a][b], v.eq[b][a] = false, false
					if v.first < 0 || off+int64(i) < v.first {
						v.first = off + int64(i)
					}
				}
			}
		}
	}
	return v, nil
}

// firstDiff returns the index of the first byte where a and b differ,
// or -1.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// usedSlot compares used slot sl of mirror m, which ents (at segment
// seg) name, and repairs it if asked. written: the slot is in the
// write-intent record. The caller holds the slot still (holdSeg).
func (s *scrubber) usedSlot(m *container.Mirror, cid uint32, sl uint32, written bool, ents []drainEntry, seg uint64) error {
	v, err := readSlot(m, sl)
	if err != nil {
		return err
	}
	if v.first < 0 {
		return nil
	}
	loc := table.Location{Container: cid, Slot: sl}
	var disks []string
	for _, de := range ents {
		de.e.Slots(func(l table.Location) {
			if l == loc && !slices.Contains(disks, de.d.Name) {
				disks = append(disks, de.d.Name)
			}
		})
	}
	src, why := s.c.scrubSource(cid, v, written)
	var targets []int // positions in v that differ from src
	for a := range v.idx {
		if !v.eq[src][a] {
			targets = append(targets, a)
		}
	}
	detail := fmt.Sprintf("%s differ%s from %s, first at byte %d of the slot",
		strings.Join(pick(v.uris, targets), ", "), plural1(len(targets)), v.uris[src], v.first)
	if len(disks) > 1 {
		detail += fmt.Sprintf("; named by disks %s at segment %d", strings.Join(disks, ", "), seg)
	}
	p := Problem{Kind: ReplicaMismatch, Loc: loc, Segment: seg}
	if len(disks) > 0 {
		p.Disk = disks[0]
	}
	if !s.repair {
		p.Detail = detail + "; a repair would copy from " + v.uris[src] + " (" + why + ")"
		s.res.Problems = append(s.res.Problems, p)
		return nil
	}
	if err := copyFromReplica(m, v, src, targets, sl); err != nil {
		p.Detail = detail + "; repair failed: " + err.Error()
		s.res.Problems = append(s.res.Problems, p)
		return err
	}
	p.Detail = detail + "; rewritten from " + v.uris[src] + " (" + why + ")"
	s.res.Repaired = append(s.res.Repaired, p)
	s.c.logger.Warn("scrub: replicas of a used slot differed; rewritten", "slot", loc, "from", v.uris[src], "to", pick(v.uris, targets), "source", why)
	return nil
}

// scrubSource chooses the replica (a position in v) a mismatched slot of
// container cid is rewritten from, and says why.
func (c *Controller) scrubSource(cid uint32, v slotView, written bool) (int, string) {
	n := len(v.idx)
	if n >= 3 {
		for a := range n {
			agree := 0
			for b := range n {
				if v.eq[a][b] {
					agree++
				}
			}
			if 2*agree > n {
				return a, fmt.Sprintf("source chosen by majority: %d of %d replicas agree", agree, n)
			}
		}
	}
	if written {
		c.mirrors.mu.Lock()
		caught := c.mirrors.mu.caughtUp[cid]
		var sus []string
		src := -1
		for a, uri := range v.uris {
			if caught[uri] {
				sus = append(sus, uri)
			} else if src < 0 {
				src = a
			}
		}
		c.mirrors.mu.Unlock()
		if src >= 0 && len(sus) > 0 {
			return src, fmt.Sprintf("the slot was written while a replica was away, and %s caught up since", strings.Join(sus, ", "))
		}
	}
	// Hosts read from the first healthy replica (container.Mirror):
	// what they have seen stays.
	return 0, "source chosen as the replica hosts read the slot from; nothing tells which one holds the last write"
}

// copyFromReplica rewrites slot sl of the replicas at positions targets
// of v from the replica at position src, a chunk at a time (punching
// the chunks that read zero), and flushes them.
func copyFromReplica(m *container.Mirror, v slotView, src int, targets []int, sl uint32) error {
	from := m.Replica(v.idx[src])
	if from == nil {
		return fmt.Errorf("replica %s is no longer healthy: %w", v.uris[src], protocol.ErrStale)
	}
	size := m.SlotSize()
	base := int64(sl) * size
	buf := make([]byte, min(size, scrubChunk))
	for off := int64(0); off < size; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), size-off)]
		if _, err := from.ReadAt(b, base+off); err != nil {
			return fmt.Errorf("read replica %s: %w: %w", v.uris[src], protocol.ErrIO, err)
		}
		zero := allZero(b)
		for _, t := range targets {
			to := m.Replica(v.idx[t])
			if to == nil {
				return fmt.Errorf("replica %s is no longer healthy: %w", v.uris[t], protocol.ErrStale)
			}
			var err error
			if zero {
				err = to.Punch(base+off, int64(len(b)))
			} else {
				_, err = to.WriteAt(b, base+off)
			}
			if err != nil {
				return fmt.Errorf("rewrite replica %s: %w: %w", v.uris[t], protocol.ErrIO, err)
			}
		}
	}
	return flushReplicas(m, v, targets)
}

// flushReplicas flushes the replicas at positions targets of v.
func flushReplicas(m *container.Mirror, v slotView, targets []int) error {
	for _, t := range targets {
		to := m.Replica(v.idx[t])
		if to == nil {
			return fmt.Errorf("replica %s is no longer healthy: %w", v.uris[t], protocol.ErrStale)
		}
		if err := to.Flush(); err != nil {
			return fmt.Errorf("flush replica %s: %w: %w", v.uris[t], protocol.ErrIO, err)
		}
	}
	return nil
}

// freeSlot checks that free slot sl of mirror m reads zero on every
// healthy replica, and punches it where it does not if asked. dirty: the
// container's free slots are not known to be zero yet. The caller holds
// the slot reserved.
func (s *scrubber) freeSlot(m *container.Mirror, cid uint32, sl uint32, dirty bool) error {
	v, err := readSlot(m, sl)
	if err != nil {
		return err
	}
	var targets []int
	for a, nz := range v.nonzero {
		if nz {
			targets = append(targets, a)
		}
	}
	if len(targets) == 0 {
		return nil
	}
	p := Problem{Kind: FreeNotZero, Loc: table.Location{Container: cid, Slot: sl}}
	detail := fmt.Sprintf("free, but %s do%s not read zero", strings.Join(pick(v.uris, targets), ", "), plural1es(len(targets)))
	if dirty {
		detail += " (the container's free slots are zeroed before its next allocation anyway)"
	}
	if !s.repair {
		p.Detail = detail
		s.res.Problems = append(s.res.Problems, p)
		return nil
	}
	for _, t := range targets {
		to := m.Replica(v.idx[t])
		if to == nil {
			return fmt.Errorf("replica %s is no longer healthy: %w", v.uris[t], protocol.ErrStale)
		}
		if err := to.Punch(int64(sl)*m.SlotSize(), m.SlotSize()); err != nil {
			p.Detail = detail + "; punch failed: " + err.Error()
			s.res.Problems = append(s.res.Problems, p)
			return fmt.Errorf("punch replica %s: %w: %w", v.uris[t], protocol.ErrIO, err)
		}
	}
	if err := flushReplicas(m, v, targets); err != nil {
		return err
	}
	p.Detail = detail + "; punched"
	s.res.Repaired = append(s.res.Repaired, p)
	s.c.logger.Warn("scrub: a free slot did not read zero; punched", "slot", p.Loc, "replicas", pick(v.uris, targets))
	return nil
}

// pick returns the elements of s at positions at.
func pick(s []string, at []int) []string {
	out := make([]string, len(at))
	for k, a := range at {
		out[k] = s[a]
	}
	return out
}

// plural1 returns "s" for one subject ("a differs"), "" for more.
func plural1(n int) string {
	if n == 1 {
		return "s"
	}
	return ""
}

// plural1es returns "es" for one subject ("a does"), "" for more.
func plural1es(n int) string {
	if n == 1 {
		return "es"
	}
	return ""
}
