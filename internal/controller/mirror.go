package controller

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"segmap/internal/container"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Mirrored containers. A mirrored container is one container id whose
// slots live on two or three replicas (container.Mirror); its record
// holds the replicas and their states, and an epoch that grows with
// every change. Every change goes the same way, under mirrors.change:
// the record is updated durably, then every agent and the controller's
// own mirror are told (SetMembership, to every attached agent, side by
// side; an agent cut off is waited for until its lease has run out).
//
//	          I/O fails (ReportReplica)           replace-replica
//	healthy ─────────────────────────▶ failed ──────────────────▶ rebuilding (full)
//	   ▲                                 │ answers probes again          │
//	   │                                 ▼                               │
//	   └──────── every slot copied ── rebuilding (catch-up) ◀────────────┘
//
// While a replica is failed, every holder records each slot before its
// first write (Tx.AddIntents); a replica that comes back copies only
// those slots. A rebuild copies under the locks a drain takes (drainSeg):
// the agents that map an entry naming the slot stop writing it (No-write,
// Blocking) while it is copied, so no write lands on the healthy replica
// alone after the copy read it. Writes go to a rebuilding replica from
// the start, so nothing written during the rebuild is missed.

// mirrors is the controller's state of mirrored containers.
type mirrors struct {
	// change serialises membership changes.
	change struct{ mu struct{ sync.Mutex } }
	mu     struct {
		sync.Mutex
		// back counts, per failed replica, the probes in a row that
		// found it answering.
		back map[replicaKey]*backCount
		// round numbers the rounds of probes.
		round uint64
		// rebuilding holds the containers a rebuild runs on.
		rebuilding map[uint32]bool
		// caughtUp holds, per container, the replicas rebuilt while
		// its write-intent record stayed (another replica still
		// away): a scrub does not take them as the source of a slot
		// of the record. Forgotten when the record is cleared, and at
		// a restart.
		caughtUp map[uint32]map[string]bool
	}
}

// backCount is how long a failed replica has answered: n probes in a
// row, each begun after the one before had answered (probes left
// hanging while a node was stopped all answer at once when it resumes,
// and count once); the last answered during round after.
type backCount struct {
	n     int
	after uint64
}

// replicaKey names a replica of a mirrored container.
type replicaKey struct {
	id  uint32
	uri string
}

// backProbes is how many probes in a row a failed replica must answer
// before it catches up. Probes run every second (ProbeContainers; a
// round held up by a hung probe is followed by one at once), so this is
// at least 6 s, longer than an agent's lease: a write an agent queued to the
// replica before it failed, on a connection since closed, can no longer
// land (the storage node refuses it once the lease that carried it is
// over) when the catch-up copies its slot.
const backProbes = 8

// protoContainer is what an agent needs to open container ct.
func protoContainer(ct meta.Container) protocol.Container {
	pc := protocol.Container{ID: ct.ID, URI: ct.URI, SlotSize: ct.SlotSize, Slots: ct.Slots}
	if ct.Mirrored() {
		pc.Epoch = ct.Epoch
		for _, r := range ct.Replicas {
			pc.Replicas = append(pc.Replicas, protocol.Replica{URI: r.URI, State: protocol.ReplicaState(r.State)})
		}
	}
	return pc
}

// membership returns mirrored container ct's membership.
func membership(ct meta.Container) protocol.Membership {
	return protoContainer(ct).Membership()
}

// AddMirror registers a mirrored container made of the containers at
// uris (two or three), which must all carry the same id and slot size in
// their headers (formatted alike). Its slot count is the smallest of
// theirs. Every replica starts healthy: they must hold the same data
// (as after formatting: nothing).
func (c *Controller) AddMirror(ctx context.Context, uris []string) (meta.Container, error) {
	end, err := c.begin(ctx, false)
	if err != nil {
		return meta.Container{}, err
	}
	defer end()
	if len(uris) < 2 || len(uris) > meta.MaxReplicas {
		return meta.Container{}, fmt.Errorf("add mirror: %d replicas (2 to %d): %w", len(uris), meta.MaxReplicas, protocol.ErrBadRequest)
	}
	rec := meta.Container{Epoch: 1}
	for i, uri := range uris {
		if slices.Contains(uris[:i], uri) {
			return meta.Container{}, fmt.Errorf("add mirror: %s twice: %w", uri, protocol.ErrBadRequest)
		}
		ct, err := c.openC(protocol.Container{URI: uri})
		if err != nil {
			return meta.Container{}, fmt.Errorf("add mirror: replica %s: %w", uri, err)
		}
		id, size, slots := ct.ID(), uint64(ct.SlotSize()), uint64(ct.Slots())
		ct.Close()
		if i == 0 {
			rec.ID, rec.SlotSize, rec.Slots = id, size, slots
		} else if id != rec.ID || size != rec.SlotSize {
			return meta.Container{}, fmt.Errorf("add mirror: replica %s is container %d with %d-byte slots, %s is container %d with %d-byte slots (format them together): %w",
				uri, id, size, uris[0], rec.ID, rec.SlotSize, protocol.ErrBadRequest)
		}
		rec.Slots = min(rec.Slots, slots)
		rec.Replicas = append(rec.Replicas, meta.Replica{URI: uri, State: meta.ReplicaHealthy})
	}
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		var err error
		rec, err = tx.AddContainer(rec)
		return err
	})
	if err != nil {
		return meta.Container{}, fmt.Errorf("add mirror: %w", err)
	}
	c.logger.Info("mirrored container added", "container", rec.ID, "replicas", len(rec.Replicas), "slots", rec.Slots)
	return rec, nil
}

// openMirror opens mirrored container rec for the controller.
func (c *Controller) openMirror(rec meta.Container) (container.Container, error) {
	info := protoContainer(rec)
	open := func(uri string) (container.Container, error) {
		return c.openR(protocol.Container{ID: rec.ID, URI: uri, SlotSize: rec.SlotSize, Slots: rec.Slots})
	}
	return container.OpenMirror(info, open, ctlReporter{c: c, id: rec.ID}, c.replicaTimeout)
}

// ctlReporter reports the controller's own replica failures and write
// intents to itself.
type ctlReporter struct {
	c  *Controller
	id uint32
}

func (r ctlReporter) ReplicaFailed(epoch uint64, i int, uri string, slots []uint32, cause error) (protocol.Membership, error) {
	return r.c.ReportReplica(r.c.bg.ctx, protocol.ReplicaReport{Container: r.id, Epoch: epoch, Failed: i, URI: uri, Cause: cause.Error(), Slots: slots})
}

func (r ctlReporter) Intent(epoch uint64, slots []uint32) error {
	_, err := r.c.ReportReplica(r.c.bg.ctx, protocol.ReplicaReport{Container: r.id, Epoch: epoch, Failed: -1, Slots: slots})
	return err
}

// ReportReplica implements protocol.Controller: it records the slots of
// the report (a write intent) and, if a replica failed, marks it failed
// with a new epoch and tells every agent before it answers. The last
// healthy replica is never marked failed: the container fails instead
// (FailContainer), its data kept for when the replica is back.
func (c *Controller) ReportReplica(ctx context.Context, r protocol.ReplicaReport) (protocol.Membership, error) {
	end, err := c.begin(ctx, true)
	if err != nil {
		return protocol.Membership{}, err
	}
	defer end()
	// Without the membership lock: the store's transactions order the
	// changes, the epochs order the tellings (holders keep the newest),
	// and reports from every holder at once share commits.
	if rec, ok := c.reportKnown(ctx, r); ok {
		return membership(rec), nil
	}
	var (
		rec           meta.Container
		changed, last bool
	)
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		changed, last = false, false
		var err error
		if rec, err = tx.Container(r.Container); err != nil {
			return err
		}
		if !rec.Mirrored() {
			return fmt.Errorf("container %d is not mirrored: %w", r.Container, protocol.ErrBadRequest)
		}
		for _, s := range r.Slots {
			if uint64(s) >= rec.Slots {
				return fmt.Errorf("container %d: slot %d of %d: %w", r.Container, s, rec.Slots, protocol.ErrBadRequest)
			}
		}
		if err := tx.AddIntents(rec.ID, r.Slots); err != nil {
			return err
		}
		if r.Failed < 0 {
			return nil
		}
		if r.Failed >= len(rec.Replicas) {
			return fmt.Errorf("container %d: replica %d of %d: %w", r.Container, r.Failed, len(rec.Replicas), protocol.ErrBadRequest)
		}
		rp := rec.Replicas[r.Failed]
		switch {
		case rp.URI != r.URI || rp.State == meta.ReplicaFailed:
			return nil // replaced, or failed already
		case rp.State == meta.ReplicaHealthy && rec.Healthy() == 1:
			last = true
			return nil
		}
		rec.Replicas = slices.Clone(rec.Replicas)
		rec.Replicas[r.Failed].State = meta.ReplicaFailed
		rec.Epoch++
		changed = true
		return tx.PutContainer(rec)
	})
	if err != nil {
		return protocol.Membership{}, fmt.Errorf("report replica of container %d: %w", r.Container, wrapNotFound(err))
	}
	if changed {
		c.logger.Error("replica failed: the mirror goes on without it", "container", rec.ID, "replica", r.Failed, "uri", r.URI, "agent", r.Agent, "epoch", rec.Epoch, "cause", r.Cause)
		_ = c.tellMembership(ctx, rec) // logged; harmless (see tellMembership)
	}
	if last {
		if err := c.FailContainer(ctx, rec.ID, fmt.Errorf("its last healthy replica %s failed: %s", r.URI, r.Cause)); err != nil {
			return protocol.Membership{}, err
		}
	}
	return membership(rec), nil
}

// reportKnown returns the container's record, and ok, if report r tells
// nothing the store does not hold already: its slots are recorded, and
// its replica (if any) is failed or replaced. Most reports are so when a
// replica dies under load: every I/O in flight on it reports.
func (c *Controller) reportKnown(ctx context.Context, r protocol.ReplicaReport) (meta.Container, bool) {
	var (
		rec   meta.Container
		known bool
	)
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		if rec, err = tx.Container(r.Container); err != nil || !rec.Mirrored() {
			return err
		}
		if r.Failed >= 0 {
			if r.Failed >= len(rec.Replicas) {
				return nil
			}
			rp := rec.Replicas[r.Failed]
			if rp.URI == r.URI && rp.State != meta.ReplicaFailed {
				return nil
			}
		}
		for _, s := range r.Slots {
			if uint64(s) >= rec.Slots {
				return nil
			}
			ok, err := tx.HasIntent(rec.ID, s)
			if err != nil || !ok {
				return err
			}
		}
		known = true
		return nil
	})
	return rec, err == nil && known
}

// tellMembership gives rec's membership to the controller's own mirror
// and to every attached agent, side by side, and waits for all (an agent
// cut off is waited for until its lease has run out; it asks again when
// it re-attaches). An agent that fails the command goes on with the
// replicas it knew: harmless when a replica failed (its writes to it
// fail and are reported), but a replica added as rebuilding would miss
// that agent's writes, so the error is returned and a rebuild stops.
func (c *Controller) tellMembership(ctx context.Context, rec meta.Container) error {
	mem := membership(rec)
	if m := c.openedMirror(rec.ID); m != nil {
		if err := m.SetMembership(mem); err != nil {
			// Opened afresh, from the store, when next needed.
			c.logger.Warn("controller's mirror: set membership", "container", rec.ID, "err", err)
			c.conts.drop(rec.ID)
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cmdTimeout)
	defer cancel()
	c.agents.Lock()
	all := make([]*agentState, 0, len(c.agents.byName))
	for _, st := range c.agents.byName {
		all = append(all, st)
	}
	c.agents.Unlock()
	var wg sync.WaitGroup
	errs := make([]error, len(all))
	for i, st := range all {
		wg.Go(func() {
			if err := st.a.SetMembership(ctx, mem); err != nil {
				c.logger.Warn("agent failed to take a mirror's membership", "agent", st.name, "container", rec.ID, "epoch", rec.Epoch, "err", err)
				errs[i] = fmt.Errorf("agent %q: %w", st.name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// openedMirror returns the controller's mirror of container id if it is
// open.
func (c *Controller) openedMirror(id uint32) *container.Mirror {
	o := &c.conts
	o.mu.Lock()
	oc := o.mu.m[id]
	o.mu.Unlock()
	if oc == nil {
		return nil
	}
	<-oc.ready
	m, _ := oc.c.(*container.Mirror)
	return m
}

// setReplica changes replica i of mirrored container id by fn, with a new
// epoch, and tells everyone. fn sees the record and may refuse.
func (c *Controller) setReplica(ctx context.Context, id uint32, fn func(rec *meta.Container) error) (meta.Container, error) {
	c.mirrors.change.mu.Lock()
	defer c.mirrors.change.mu.Unlock()
	var rec meta.Container
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		var err error
		if rec, err = tx.Container(id); err != nil {
			return err
		}
		if !rec.Mirrored() {
			return fmt.Errorf("container %d is not mirrored: %w", id, protocol.ErrBadRequest)
		}
		rec.Replicas = slices.Clone(rec.Replicas)
		if err := fn(&rec); err != nil {
			return err
		}
		rec.Epoch++
		return tx.PutContainer(rec)
	})
	if err != nil {
		return rec, wrapNotFound(err)
	}
	if err := c.tellMembership(ctx, rec); err != nil {
		return rec, fmt.Errorf("%w: %w", errUntold, err)
	}
	return rec, nil
}

// ReplaceReplica replaces the replica of mirrored container id at oldURI
// by the container at newURI (formatted with the container's id and slot
// size, and at least as many slots) and rebuilds it (RebuildReplica). The
// replaced replica may be healthy, failed or rebuilding; at least one
// other must be healthy.
func (c *Controller) ReplaceReplica(ctx context.Context, id uint32, oldURI, newURI string, progress func(done, total uint64)) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	if err := c.checkReplica(ctx, id, newURI); err != nil {
		return fmt.Errorf("replace replica of container %d: %w", id, err)
	}
	_, err = c.setReplica(ctx, id, func(rec *meta.Container) error {
		i := slices.IndexFunc(rec.Replicas, func(r meta.Replica) bool { return r.URI == oldURI })
		if i < 0 {
			return fmt.Errorf("container %d has no replica %s: %w", id, oldURI, protocol.ErrNotFound)
		}
		if slices.ContainsFunc(rec.Replicas, func(r meta.Replica) bool { return r.URI == newURI }) {
			return fmt.Errorf("container %d already has a replica %s: %w", id, newURI, protocol.ErrBadRequest)
		}
		if slices.ContainsFunc(rec.Replicas, func(r meta.Replica) bool { return r.State == meta.ReplicaRebuilding && r.URI != oldURI }) {
			return fmt.Errorf("container %d: another replica is rebuilding: %w", id, ErrRebuilding)
		}
		rec.Replicas[i] = meta.Replica{URI: newURI, State: meta.ReplicaRebuilding, Full: true}
		if rec.Healthy() == 0 {
			return fmt.Errorf("container %d: no healthy replica to rebuild from: %w", id, ErrContainerFailed)
		}
		rec.CursorFam, rec.CursorSeg = 0, 0
		return nil
	})
	if errors.Is(err, errUntold) {
		c.unrebuild(ctx, id, newURI, err)
	}
	if err != nil {
		return fmt.Errorf("replace replica of container %d: %w", id, err)
	}
	c.logger.Info("replica replaced; rebuilding", "container", id, "old", oldURI, "new", newURI)
	return c.rebuild(ctx, id, progress)
}

// unrebuild marks container id's rebuilding replica at uri failed again,
// after some agent did not take it as rebuilding (and would not write
// it).
func (c *Controller) unrebuild(ctx context.Context, id uint32, uri string, cause error) {
	_, err := c.setReplica(ctx, id, func(rec *meta.Container) error {
		i := slices.IndexFunc(rec.Replicas, func(r meta.Replica) bool { return r.URI == uri && r.State == meta.ReplicaRebuilding })
		if i < 0 {
			return nil
		}
		rec.Replicas[i].State = meta.ReplicaFailed
		return nil
	})
	c.logger.Warn("a rebuilding replica failed again: an agent could not write it", "container", id, "replica", uri, "cause", cause, "err", err)
}

// checkReplica opens the container at uri and checks it can be a replica
// of mirrored container id.
func (c *Controller) checkReplica(ctx context.Context, id uint32, uri string) error {
	var rec meta.Container
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		rec, err = tx.Container(id)
		return err
	}); err != nil {
		return wrapNotFound(err)
	}
	ct, err := c.openC(protocol.Container{URI: uri})
	if err != nil {
		return fmt.Errorf("replica %s: %w", uri, err)
	}
	defer ct.Close()
	if ct.ID() != rec.ID || uint64(ct.SlotSize()) != rec.SlotSize || uint64(ct.Slots()) < rec.Slots {
		return fmt.Errorf("replica %s is container %d with %d slots of %d bytes; container %d needs %d slots of %d bytes (format it with --id %d --slot-size %d): %w",
			uri, ct.ID(), ct.Slots(), ct.SlotSize(), rec.ID, rec.Slots, rec.SlotSize, rec.ID, rec.SlotSize, protocol.ErrBadRequest)
	}
	return nil
}

// RebuildReplica rebuilds mirrored container id's failed or rebuilding
// replica: it becomes rebuilding (written by every holder from then on),
// every slot it may miss is copied onto it from a healthy replica (every
// used slot for a full rebuild, otherwise those recorded while it was
// failed), and it is marked healthy. A rebuild that stops (an error, a
// restart) is continued by running it again, from where it stood.
func (c *Controller) RebuildReplica(ctx context.Context, id uint32, progress func(done, total uint64)) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	var uri string
	_, err = c.setReplica(ctx, id, func(rec *meta.Container) error {
		i := slices.IndexFunc(rec.Replicas, func(r meta.Replica) bool { return r.State != meta.ReplicaHealthy })
		if i < 0 {
			return fmt.Errorf("container %d: every replica is healthy: %w", id, ErrNothingToRebuild)
		}
		if rec.Replicas[i].State == meta.ReplicaFailed {
			rec.Replicas[i].State = meta.ReplicaRebuilding
			rec.CursorFam, rec.CursorSeg = 0, 0
		}
		uri = rec.Replicas[i].URI
		return nil
	})
	if errors.Is(err, errUntold) {
		c.unrebuild(ctx, id, uri, err)
	}
	if err != nil {
		return fmt.Errorf("rebuild replica of container %d: %w", id, err)
	}
	return c.rebuild(ctx, id, progress)
}

// rebuild copies onto container id's rebuilding replica what it may
// miss, and marks it healthy.
func (c *Controller) rebuild(ctx context.Context, id uint32, progress func(done, total uint64)) error {
	c.mirrors.mu.Lock()
	if c.mirrors.mu.rebuilding == nil {
		c.mirrors.mu.rebuilding = make(map[uint32]bool)
	}
	if c.mirrors.mu.rebuilding[id] {
		c.mirrors.mu.Unlock()
		return fmt.Errorf("rebuild container %d: %w", id, ErrRebuilding)
	}
	c.mirrors.mu.rebuilding[id] = true
	c.mirrors.mu.Unlock()
	defer func() {
		c.mirrors.mu.Lock()
		delete(c.mirrors.mu.rebuilding, id)
		c.mirrors.mu.Unlock()
	}()
	err := c.rebuildOnce(ctx, id, progress)
	if err != nil {
		return fmt.Errorf("rebuild container %d: %w", id, err)
	}
	return nil
}

func (c *Controller) rebuildOnce(ctx context.Context, id uint32, progress func(done, total uint64)) error {
	var (
		rec     meta.Container
		intents []uint32
	)
	// Slots reserved now may be written, by a copy-on-write or a staged
	// write that began before the replica was written too, and mapped
	// after the scan below: they are copied once committed.
	reserved := c.alloc.reservedSlots(id)
	if err := c.flushAll(ctx); err != nil {
		return err
	}
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		if rec, err = tx.Container(id); err != nil {
			return err
		}
		intents, err = tx.Intents(id)
		return err
	}); err != nil {
		return wrapNotFound(err)
	}
	ri := slices.IndexFunc(rec.Replicas, func(r meta.Replica) bool { return r.State == meta.ReplicaRebuilding })
	if ri < 0 {
		return fmt.Errorf("no replica is rebuilding: %w", ErrNothingToRebuild)
	}
	rp := rec.Replicas[ri]
	mc, err := c.container(ctx, id)
	if err != nil {
		return err
	}
	m, ok := mc.(*container.Mirror)
	if !ok {
		return fmt.Errorf("container %d is open unmirrored: %w", id, meta.ErrCorrupt)
	}
	if err := m.SetMembership(membership(rec)); err != nil {
		return err
	}
	var only map[uint32]bool // the slots to copy; nil: all
	if !rp.Full {
		only = make(map[uint32]bool, len(intents))
		for _, s := range intents {
			only[s] = true
		}
	}
	work, _, err := c.drainWork(ctx, id)
	if err != nil {
		return err
	}
	work = slices.DeleteFunc(work, func(w famSeg) bool {
		return w.fam < rec.CursorFam || (w.fam == rec.CursorFam && w.seg < rec.CursorSeg)
	})
	total := uint64(len(work))
	c.logger.Info("rebuilding a replica", "container", id, "replica", rp.URI, "full", rp.Full, "segments", total, "recorded_slots", len(intents))
	var (
		done   uint64
		copied atomic.Uint64 // bytes
	)
	if err := c.rebuildAll(ctx, m, id, ri, rp.URI, work, only, &copied, func(w famSeg) {
		done++
		if progress != nil {
			progress(done, total)
		}
		if done%64 == 0 {
			c.saveCursor(ctx, id, rp.URI, w)
		}
	}); err != nil {
		return err
	}
	// The slots reserved at the start: copied if they were mapped since.
	if err := c.waitReleased(ctx, id, reserved); err != nil {
		return err
	}
	if len(reserved) > 0 {
		if err := c.flushAll(ctx); err != nil {
			return err
		}
		late := make(map[uint32]bool, len(reserved))
		for _, s := range reserved {
			late[s] = true
		}
		work, _, err := c.drainWork(ctx, id)
		if err != nil {
			return err
		}
		if err := c.rebuildAll(ctx, m, id, ri, rp.URI, work, late, &copied, func(famSeg) {}); err != nil {
			return err
		}
	}
	// Free slots the replica missed the punch of read zero again.
	if err := c.zeroMissed(ctx, m, id, ri, rp, intents); err != nil {
		return err
	}
	rec, err = c.setReplica(ctx, id, func(r *meta.Container) error {
		if r.Replicas[ri].URI != rp.URI || r.Replicas[ri].State != meta.ReplicaRebuilding {
			return fmt.Errorf("replica %s changed during its rebuild (now %s %v): %w", rp.URI, r.Replicas[ri].URI, r.Replicas[ri].State, ErrRebuilding)
		}
		r.Replicas[ri] = meta.Replica{URI: rp.URI, State: meta.ReplicaHealthy}
		r.CursorFam, r.CursorSeg = 0, 0
		return nil
	})
	if errors.Is(err, errUntold) {
		// An agent that missed it still writes the replica (as
		// rebuilding), and reads the others: nothing is lost.
		c.logger.Warn("replica healthy, not every agent told", "container", id, "err", err)
		err = nil
	}
	if err != nil {
		return err
	}
	if !membership(rec).Degraded() {
		if err := c.store.Update(ctx, func(tx *meta.Tx) error { return tx.ClearIntents(id) }); err != nil {
			c.logger.Warn("clear write intents", "container", id, "err", err)
		} else {
			c.mirrors.mu.Lock()
			delete(c.mirrors.mu.caughtUp, id)
			c.mirrors.mu.Unlock()
		}
	} else {
		c.mirrors.mu.Lock()
		if c.mirrors.mu.caughtUp == nil {
			c.mirrors.mu.caughtUp = make(map[uint32]map[string]bool)
		}
		if c.mirrors.mu.caughtUp[id] == nil {
			c.mirrors.mu.caughtUp[id] = make(map[string]bool)
		}
		c.mirrors.mu.caughtUp[id][rp.URI] = true
		c.mirrors.mu.Unlock()
	}
	if progress != nil {
		progress(total, total)
	}
	c.logger.Info("replica rebuilt: healthy", "container", id, "replica", rp.URI, "full", rp.Full, "segments", done, "bytes_copied", copied.Load())
	return nil
}

// saveCursor records that the rebuild of container id's replica uri has
// copied every segment index before w (in the order drainWork gives).
// Moves run side by side, so it is only a hint of where to resume: the
// moves before w may not all be done, and those are copied again.
func (c *Controller) saveCursor(ctx context.Context, id uint32, uri string, w famSeg) {
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		rec, err := tx.Container(id)
		if err != nil {
			return err
		}
		if !slices.ContainsFunc(rec.Replicas, func(r meta.Replica) bool { return r.URI == uri && r.State == meta.ReplicaRebuilding }) {
			return nil
		}
		rec.CursorFam, rec.CursorSeg = w.fam, w.seg
		return tx.PutContainer(rec)
	})
	if err != nil {
		c.logger.Warn("save rebuild cursor", "container", id, "err", err)
	}
}

// rebuildAll copies, c.drainMoves at a time, the slots of container id
// that every index of work names (only those in only, if not nil) onto
// replica ri, calling copied (one at a time) after each index. The
// cursor is saved for an index only once every one before it is done.
func (c *Controller) rebuildAll(ctx context.Context, m *container.Mirror, id uint32, ri int, uri string, work []famSeg, only map[uint32]bool, bytes *atomic.Uint64, copied func(famSeg)) error {
	fin := make([]bool, len(work))
	low := 0 // every index before low is done
	return c.eachMove(ctx, len(work), func(ctx context.Context, k int) error {
		if err := c.rebuildSeg(ctx, m, id, ri, uri, work[k], only, bytes); err != nil {
			return fmt.Errorf("family %d segment %d: %w", work[k].fam, work[k].seg, err)
		}
		return nil
	}, func(k int) {
		fin[k] = true
		for low < len(fin) && fin[low] {
			low++
		}
		if low < len(work) {
			copied(work[low])
		} else {
			copied(famSeg{fam: work[len(work)-1].fam, seg: work[len(work)-1].seg + 1})
		}
	})
}

// rebuildSeg copies onto replica ri the slots of container id that
// segment index w.seg of family w.fam names, under the locks of a write
// fault, with the agents that map them kept from writing them meanwhile.
func (c *Controller) rebuildSeg(ctx context.Context, m *container.Mirror, id uint32, ri int, uri string, w famSeg, only map[uint32]bool, bytes *atomic.Uint64) error {
	return c.holdSeg(ctx, id, w, only, func(_ []drainEntry, slots []uint32, size uint64) error {
		for _, s := range slots {
			if err := c.copyReplica(m, ri, uri, int64(s)*int64(size), int64(size)); err != nil {
				return err
			}
			bytes.Add(size)
		}
		return nil
	})
}

// holdSeg runs fn on the slots of container id (those in only, if not
// nil) that segment index w.seg of family w.fam names, with no write on
// its way to them and none starting until fn returns: under the locks of
// a write fault (family shared, segment, publish), with every agent that
// maps an entry naming them told No-write (Blocking), and the entries
// given back to the agents after. Since disks share slots only within a
// family and at one index, ents holds every entry that names the slots.
// Map changes kept in memory at the index are committed first. fn is not
// called if no entry names a slot.
func (c *Controller) holdSeg(ctx context.Context, id uint32, w famSeg, only map[uint32]bool, fn func(ents []drainEntry, slots []uint32, size uint64) error) error {
	for try := 0; ; try++ {
		flush, err := c.holdSegOnce(ctx, id, w, only, fn)
		if !flush || err != nil {
			return err
		}
		if try == 8 {
			return fmt.Errorf("map changes kept in memory keep coming: %w", protocol.ErrStale)
		}
		if err := c.flushFamily(ctx, w.fam, false); err != nil {
			return err
		}
	}
}

// holdSegOnce is one try of holdSeg; it reports flush, doing nothing,
// if the family keeps map changes in memory at the index.
func (c *Controller) holdSegOnce(ctx context.Context, id uint32, w famSeg, only map[uint32]bool, fn func(ents []drainEntry, slots []uint32, size uint64) error) (flush bool, err error) {
	defer c.lockFamily(w.fam, false)()
	defer c.lockSegment(w.fam, w.seg)()
	var (
		ents  []drainEntry
		slots = map[uint32]bool{}
		size  uint64
	)
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		for _, d := range ds {
			if d.Family != w.fam || w.seg >= d.Segments() {
				continue
			}
			if _, ok := c.pendingEntry(d.Family, d.ID, w.seg); ok {
				flush = true
				return nil
			}
			e, err := tx.Entry(d.ID, w.seg)
			if err != nil {
				return err
			}
			named := false
			e.Slots(func(l table.Location) {
				if l.Container == id && (only == nil || only[l.Slot]) {
					slots[l.Slot] = true
					named = true
				}
			})
			if !named {
				continue
			}
			size = d.SegmentSize
			e.Slots(func(l table.Location) {
				if c.refsDelta(d.Family, w.seg, l) != 0 {
					flush = true
				}
			})
			ents = append(ents, drainEntry{d: d, e: e})
		}
		return nil
	}); err != nil || flush || len(ents) == 0 {
		return flush, wrapNotFound(err)
	}
	defer c.lockPublish(w.fam, w.seg, true)()
	for _, de := range ents {
		cmd := protocol.SetEntryState{Disk: protocol.DiskID(de.d.ID), First: w.seg, Count: 1, State: table.NoWrite, On: true, Blocking: true}
		if err := c.broadcast(ctx, de.d.ID, "", func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }); err != nil {
			// Some agent may still write: fn does not run. The
			// others have only an extra No-write, which a fault
			// clears without a copy.
			return false, fmt.Errorf("stop writes to %q: %w", de.d.Name, err)
		}
	}
	errs := []error{fn(ents, slices.Sorted(maps.Keys(slots)), size)}
	// The entries go back whether fn did its work or not: they are
	// unchanged in the store.
	for _, de := range ents {
		// No-write follows from the slot's count and from the
		// sharing of the table page that holds the entry (a snapshot
		// shares the page, not the count).
		var refs uint32
		if err := c.store.View(ctx, func(tx *meta.Tx) error {
			var err error
			refs, err = shareCount(tx, de.d.ID, w.seg, de.e)
			return err
		}); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := c.moveMappers(ctx, de.d, w.seg, effective(de.e, refs), false); err != nil {
			errs = append(errs, err)
			c.unsettled(ctx, w.seg, de.d)
		}
	}
	return false, errors.Join(errs...)
}

// copyReplica copies [off, off+n) of mirror m from a healthy replica onto
// replica ri (at uri), punching the runs that read zero, and flushes it.
func (c *Controller) copyReplica(m *container.Mirror, ri int, uri string, off, n int64) error {
	dst := m.Replica(ri)
	if dst == nil || m.Membership().Replicas[ri].URI != uri {
		return fmt.Errorf("replica %s is no longer rebuilding: %w", uri, ErrRebuilding)
	}
	buf := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; {
		b := buf[:min(int64(len(buf)), n-done)]
		// ReadAt reads a healthy replica, never a rebuilding one.
		if _, err := m.ReadAt(b, off+done); err != nil {
			return fmt.Errorf("rebuild read at %d: %w: %w", off+done, protocol.ErrIO, err)
		}
		var err error
		if allZero(b) {
			err = dst.Punch(off+done, int64(len(b)))
		} else {
			_, err = dst.WriteAt(b, off+done)
		}
		if err != nil {
			return c.replicaBroke(m, ri, uri, off+done, int64(len(b)), err)
		}
		done += int64(len(b))
	}
	if err := dst.Flush(); err != nil {
		return c.replicaBroke(m, ri, uri, off, n, err)
	}
	return nil
}

// replicaBroke reports that the rebuilding replica ri failed a copy, and
// returns the error that stops the rebuild.
func (c *Controller) replicaBroke(m *container.Mirror, ri int, uri string, off, n int64, cause error) error {
	mem := m.Membership()
	var slots []uint32
	for s := off / m.SlotSize(); s <= (off+n-1)/m.SlotSize(); s++ {
		slots = append(slots, uint32(s))
	}
	if _, err := c.ReportReplica(c.bg.ctx, protocol.ReplicaReport{Container: m.ID(), Epoch: mem.Epoch, Failed: ri, URI: uri, Cause: cause.Error(), Slots: slots}); err != nil {
		c.logger.Warn("report a rebuilding replica failed", "container", m.ID(), "replica", uri, "err", err)
	}
	return fmt.Errorf("rebuilding replica %s: %w: %w", uri, protocol.ErrIO, cause)
}

// zeroMissed punches, on replica ri, the free slots it may hold stale
// data in: those recorded while it was failed (a catch-up), since a
// slot freed meanwhile was punched on the healthy replicas only. It runs
// under the allocator's lock, so that no slot is taken meanwhile.
func (c *Controller) zeroMissed(ctx context.Context, m *container.Mirror, id uint32, ri int, rp meta.Replica, intents []uint32) error {
	if rp.Full || len(intents) == 0 {
		return nil
	}
	dst := m.Replica(ri)
	if dst == nil {
		return fmt.Errorf("replica %s is no longer rebuilding: %w", rp.URI, ErrRebuilding)
	}
	c.alloc.mu.Lock()
	var free []uint32
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		for _, s := range intents {
			n, err := tx.Refs(table.Location{Container: id, Slot: s})
			if err != nil {
				return err
			}
			if n == 0 && c.alloc.mu.reserved[table.Location{Container: id, Slot: s}] == 0 {
				free = append(free, s)
			}
		}
		return nil
	})
	var (
		bad   int64 = -1
		cause error
	)
	for _, s := range free {
		if err != nil {
			break
		}
		if perr := dst.Punch(int64(s)*m.SlotSize(), m.SlotSize()); perr != nil {
			bad, cause = int64(s), perr
			break
		}
	}
	if err == nil && bad < 0 && len(free) > 0 {
		if ferr := dst.Flush(); ferr != nil {
			bad, cause = 0, ferr
		}
	}
	// Reported without the allocator's lock.
	c.alloc.mu.Unlock()
	if err != nil {
		return err
	}
	if bad >= 0 {
		return c.replicaBroke(m, ri, rp.URI, bad*m.SlotSize(), m.SlotSize(), cause)
	}
	return nil
}

// waitReleased waits until none of slots of container id is reserved.
func (c *Controller) waitReleased(ctx context.Context, id uint32, slots []uint32) error {
	for {
		left := 0
		c.alloc.mu.Lock()
		for _, s := range slots {
			if c.alloc.mu.reserved[table.Location{Container: id, Slot: s}] > 0 {
				left++
			}
		}
		c.alloc.mu.Unlock()
		if left == 0 {
			return nil
		}
		_, released := c.alloc.reservations(id)
		select {
		case <-released:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// probeReplicas probes every failed replica of the mirrored containers
// in cs with a fresh open of its URI (header checked), and starts the
// catch-up (RebuildReplica, in the background) of one that has answered
// backProbes times in a row.
func (c *Controller) probeReplicas(ctx context.Context, cs []meta.Container) {
	var wg sync.WaitGroup
	for _, ct := range cs {
		if !ct.Mirrored() || ct.State == meta.ContainerFailed {
			continue
		}
		for _, r := range ct.Replicas {
			if r.State != meta.ReplicaFailed {
				continue
			}
			k := replicaKey{ct.ID, r.URI}
			c.mirrors.mu.Lock()
			c.mirrors.mu.round++
			began := c.mirrors.mu.round
			c.mirrors.mu.Unlock()
			wg.Go(func() {
				up := c.probeReplica(ct, r.URI) == nil
				c.mirrors.mu.Lock()
				if c.mirrors.mu.back == nil {
					c.mirrors.mu.back = make(map[replicaKey]*backCount)
				}
				b := c.mirrors.mu.back[k]
				switch {
				case !up:
					delete(c.mirrors.mu.back, k)
					b = nil
				case b == nil:
					b = &backCount{n: 1, after: c.mirrors.mu.round}
					c.mirrors.mu.back[k] = b
				case began > b.after:
					b.n++
					b.after = c.mirrors.mu.round
				}
				n := 0
				if b != nil {
					n = b.n
				}
				busy := c.mirrors.mu.rebuilding[ct.ID]
				if n >= backProbes && !busy {
					delete(c.mirrors.mu.back, k)
				}
				c.mirrors.mu.Unlock()
				if n < backProbes || busy {
					return
				}
				c.logger.Info("a failed replica answers again: catching up", "container", ct.ID, "replica", r.URI)
				c.bg.wg.Go(func() {
					op := c.StartOperation(OpRebuild, fmt.Sprintf("container %d", ct.ID), UnitSlots)
					err := c.RebuildReplica(c.bg.ctx, ct.ID, op.Progress)
					op.Finish(err)
					if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, ErrClosed) {
						c.logger.Warn("catch-up of a replica failed; it is tried again", "container", ct.ID, "replica", r.URI, "err", err)
					}
				})
			})
		}
	}
	wg.Wait()
}

// probeReplica opens the replica at uri of ct afresh and reads its first
// block.
func (c *Controller) probeReplica(ct meta.Container, uri string) error {
	rc, err := c.openC(protocol.Container{ID: ct.ID, URI: uri, SlotSize: ct.SlotSize, Slots: ct.Slots})
	if err != nil {
		return err
	}
	defer rc.Close()
	_, err = rc.ReadAt(make([]byte, min(4096, rc.Size())), 0)
	return err
}

// ResumeRebuilds continues, in the background, every rebuild that a
// restart stopped (a replica left rebuilding).
func (c *Controller) ResumeRebuilds(ctx context.Context) {
	cs, err := c.ListContainers(ctx)
	if err != nil {
		c.logger.Warn("resume rebuilds: list containers", "err", err)
		return
	}
	for _, ct := range cs {
		if !slices.ContainsFunc(ct.Replicas, func(r meta.Replica) bool { return r.State == meta.ReplicaRebuilding }) {
			continue
		}
		c.logger.Info("resuming the rebuild of a replica", "container", ct.ID)
		c.bg.wg.Go(func() {
			op := c.StartOperation(OpRebuild, fmt.Sprintf("container %d", ct.ID), UnitSlots)
			err := c.RebuildReplica(c.bg.ctx, ct.ID, op.Progress)
			op.Finish(err)
			if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, ErrClosed) {
				c.logger.Warn("resumed rebuild failed; run 'segmap container rebuild' again", "container", ct.ID, "err", err)
			}
		})
	}
}
