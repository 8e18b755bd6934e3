package controller

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"segmap/internal/container"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Container failure. The controller probes every online or draining
// container (ProbeContainers, every second); one whose storage stays out of reach beyond
// the failure timeout (container.ErrUnreachable), or fails probeFailures
// probes in a row, is marked failed (FailContainer): persistently, in its
// record, and at once in every agent that maps a disk with an entry on it,
// whose entry there becomes Error. Agents then fail that I/O with EIO
// without asking, and every other segment goes on. The Error is derived,
// not stored in the entries: a fault whose entry names a failed container
// is answered Error, and when the container is back, OnlineContainer checks
// its header, marks it online and gives the agents their entries again,
// data intact. If it is lost for good, ClearErrors turns the entries into
// Zero (the data is declared lost).

// probeFailures failed probes in a row, other than unreachable, fail a
// container.
const probeFailures = 3

// health is the controller's view of which containers failed.
type health struct {
	mu struct {
		sync.Mutex
		// failed holds the failed containers, as the store says.
		failed map[uint32]bool
		// fails counts the failed probes in a row of a container.
		fails map[uint32]int
	}
}

// isFailed reports whether container id is failed.
func (c *Controller) isFailed(id uint32) bool {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	return c.health.mu.failed[id]
}

// anyFailed reports whether some container is failed.
func (c *Controller) anyFailed() bool {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	return len(c.health.mu.failed) > 0
}

// setFailed records container id as failed or not.
func (c *Controller) setFailed(id uint32, failed bool) {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	if c.health.mu.failed == nil {
		c.health.mu.failed = make(map[uint32]bool)
	}
	if failed {
		c.health.mu.failed[id] = true
	} else {
		delete(c.health.mu.failed, id)
	}
}

// loadFailed reads the failed containers from the store.
func (c *Controller) loadFailed(ctx context.Context) error {
	return c.store.View(ctx, func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		for _, ct := range cs {
			c.setFailed(ct.ID, ct.State == meta.ContainerFailed)
		}
		return err
	})
}

// onFailed reports whether entry e reads from a failed container.
func (c *Controller) onFailed(e table.Entry) bool {
	bad := false
	e.Slots(func(l table.Location) {
		if !bad && c.isFailed(l.Container) {
			bad = true
		}
	})
	return bad
}

// maskFailed turns the entries of a fault's reply that read from a failed
// container into Error.
func (c *Controller) maskFailed(r *protocol.Reply) {
	if !c.anyFailed() {
		return
	}
	for i, e := range r.Entries {
		if c.onFailed(e) {
			r.Entries[i] = table.ErrorEntry
		}
	}
}

// ProbeContainers probes every online or draining container once, side
// by side, with a read of its first block, and fails (FailContainer) one
// whose storage is out of reach beyond the failure timeout, or whose
// probes failed probeFailures times in a row. A probe may wait for its
// storage up to the failure timeout; ProbeContainers returns when all
// are done. The caller runs it every second or so (ctlserver.Watch).
func (c *Controller) ProbeContainers(ctx context.Context) {
	cs, err := c.ListContainers(ctx)
	if err != nil {
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { c.probeReplicas(ctx, cs) })
	for _, ct := range cs {
		if ct.State != meta.ContainerOnline && ct.State != meta.ContainerDraining {
			continue
		}
		wg.Go(func() {
			err := c.probe(ctx, ct.ID)
			if errors.Is(err, ErrClosed) || ctx.Err() != nil {
				return
			}
			if !c.noteProbe(ct.ID, err) {
				return
			}
			if err := c.FailContainer(ctx, ct.ID, err); err != nil && ctx.Err() == nil {
				c.logger.Warn("mark a container failed", "container", ct.ID, "err", err)
			}
		})
	}
	wg.Wait()
}

// noteProbe records the outcome of a probe of container id and reports
// whether the container must be failed.
func (c *Controller) noteProbe(id uint32, err error) (fail bool) {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	if c.health.mu.fails == nil {
		c.health.mu.fails = make(map[uint32]int)
	}
	switch {
	case err == nil:
		delete(c.health.mu.fails, id)
		return false
	case errors.Is(err, container.ErrUnreachable):
		c.health.mu.fails[id] = probeFailures
	default:
		c.health.mu.fails[id]++
	}
	if c.health.mu.fails[id] < probeFailures {
		return false
	}
	delete(c.health.mu.fails, id)
	return true
}

// probe reads the first block of container id. If ctx ends first, it
// returns without waiting for the read (which the container's failure
// timeout, or its closing, ends).
func (c *Controller) probe(ctx context.Context, id uint32) error {
	ct, err := c.container(ctx, id)
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() {
		b := make([]byte, min(4096, ct.Size()))
		_, err := ct.ReadAt(b, 0)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// FailContainer marks container id failed, because of cause: no slot is
// allocated on it, every entry that reads from it is Error to the agents
// (they fail that I/O at once with EIO), and faults on them are answered
// Error, until OnlineContainer or ClearErrors. It is persistent.
func (c *Controller) FailContainer(ctx context.Context, id uint32, cause error) error {
	end, err := c.begin(ctx, false)
	if err != nil {
		return err
	}
	defer end()
	var was meta.ContainerState
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		ct, err := tx.Container(id)
		if err != nil {
			return err
		}
		was = ct.State
		if was == meta.ContainerFailed {
			return nil
		}
		_, err = tx.SetContainerState(id, meta.ContainerFailed)
		return err
	})
	if err != nil {
		return fmt.Errorf("fail container %d: %w", id, wrapNotFound(err))
	}
	c.setFailed(id, true)
	if was == meta.ContainerFailed {
		return nil
	}
	c.logger.Error("container failed: its segments fail I/O until it is online again or their errors are cleared", "container", id, "cause", cause)
	return c.tellContainer(ctx, id, true)
}

// OnlineContainer brings failed container id back: it opens it afresh,
// checks its header is the one registered, marks it online and gives the
// agents back the entries that read from it, data intact.
func (c *Controller) OnlineContainer(ctx context.Context, id uint32) (meta.Container, error) {
	end, err := c.begin(ctx, false)
	if err != nil {
		return meta.Container{}, err
	}
	defer end()
	var rec meta.Container
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		rec, err = tx.Container(id)
		return err
	}); err != nil {
		return rec, fmt.Errorf("online container %d: %w", id, wrapNotFound(err))
	}
	if rec.State != meta.ContainerFailed {
		return rec, fmt.Errorf("online container %d: it is %v, not failed: %w", id, rec.State, protocol.ErrBadRequest)
	}
	c.conts.drop(id)
	if err := c.probe(ctx, id); err != nil {
		c.conts.drop(id)
		return rec, fmt.Errorf("online container %d: %w", id, err)
	}
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		var err error
		rec, err = tx.SetContainerState(id, meta.ContainerOnline)
		return err
	})
	if err != nil {
		return rec, fmt.Errorf("online container %d: %w", id, err)
	}
	c.setFailed(id, false)
	c.logger.Info("container online again", "container", id)
	return rec, c.tellContainer(ctx, id, false)
}

// tellContainer tells the agents that map a disk with entries on
// container id that it failed (their entries there become Error) or is
// back (they get the entries again).
func (c *Controller) tellContainer(ctx context.Context, id uint32, failed bool) error {
	ds, err := c.Disks(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range ds {
		if len(c.mappers(d.ID, "")) == 0 {
			continue
		}
		err := func() error {
			defer c.lockFamily(d.Family, false)()
			runs, err := c.runsOn(ctx, d, id)
			if err != nil {
				return err
			}
			for _, r := range runs {
				var send func(context.Context, protocol.Agent) error
				if failed {
					cmd := protocol.SetEntryState{Disk: protocol.DiskID(d.ID), First: r.first, Count: uint64(len(r.entries)), State: table.Error, On: true}
					send = func(ctx context.Context, a protocol.Agent) error { return a.SetEntryState(ctx, cmd) }
				} else {
					cmd := protocol.SetEntry{Disk: protocol.DiskID(d.ID), First: r.first, Entries: r.entries}
					send = func(ctx context.Context, a protocol.Agent) error { return a.SetEntry(ctx, cmd) }
				}
				if err := c.broadcast(ctx, d.ID, "", send); err != nil {
					return err
				}
			}
			return nil
		}()
		if err != nil {
			errs = append(errs, fmt.Errorf("disk %q: %w", d.Name, err))
		}
	}
	return errors.Join(errs...)
}

// entryRun is a run of entries of one disk from index first.
type entryRun struct {
	first   uint64
	entries []table.Entry
}

// runsOn returns the runs of d's entries that read from container id, as
// the store has them with the changes kept in memory over them.
func (c *Controller) runsOn(ctx context.Context, d meta.Disk, id uint32) ([]entryRun, error) {
	var out []entryRun
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		return tx.ForEachMapped(d.ID, func(seg uint64, e table.Entry) error {
			e = c.overlay(d.Family, d.ID, seg, e)
			on := false
			e.Slots(func(l table.Location) { on = on || l.Container == id })
			if !on {
				return nil
			}
			if k := len(out) - 1; k >= 0 && out[k].first+uint64(len(out[k].entries)) == seg && len(out[k].entries) < MaxDiscard {
				out[k].entries = append(out[k].entries, e)
				return nil
			}
			out = append(out, entryRun{first: seg, entries: []table.Entry{e}})
			return nil
		})
	})
	return out, err
}
