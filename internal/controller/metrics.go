package controller

import (
	"context"

	"segmap/internal/meta"
	"segmap/internal/metrics"
)

// metricsState is the controller's state for its metrics' gauges
// (metrics.StateFunc): one store read transaction and the agent
// registry's lock, nothing that waits for an agent or a container. The
// slot counts are the store's: map changes kept in memory until a flush
// are not in them.
func (c *Controller) metricsState(ctx context.Context) (metrics.State, error) {
	st := metrics.State{Disks: map[string]int{"disk": 0, "snapshot": 0}, Agents: map[string]int{}}
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		for _, d := range ds {
			if d.ReadOnly {
				st.Disks["snapshot"]++
			} else {
				st.Disks["disk"]++
			}
		}
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		for _, ct := range cs {
			st.Containers = append(st.Containers, metrics.ContainerState{ID: ct.ID, State: ct.State.String(), Used: ct.Used, Free: ct.Free()})
		}
		return nil
	})
	if err != nil {
		return metrics.State{}, err
	}
	c.agents.Lock()
	for name, a := range c.agents.byName {
		st.Agents[name] = len(a.disks)
	}
	c.agents.Unlock()
	return st, nil
}

// countCommits makes the store's commits counted in c.met, if it groups
// commits (meta.GroupCommitter: the bbolt and etcd stores do). Only a
// controller with metrics sets the hook: tests inject errors through it.
func (c *Controller) countCommits() {
	gc, ok := c.store.(meta.GroupCommitter)
	if c.met == nil || !ok {
		return
	}
	kind := "other"
	switch c.store.(type) {
	case *meta.Bolt:
		kind = "bolt"
	case *meta.Etcd:
		kind = "etcd"
	}
	gc.SetCommitHook(func(updates int, commit func() error) error {
		if updates == 0 {
			return commit()
		}
		t0 := c.now()
		err := commit()
		if err == nil {
			c.met.Commit(kind, updates, c.now().Sub(t0))
		}
		return err
	})
}
