package controller

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
)

// DefaultStatusTimeout bounds how long AgentStatus waits for an agent's
// get_status answers: a status is for a person looking now, and one slow or
// cut-off agent must not hold up the report on the others.
const DefaultStatusTimeout = 2 * time.Second

// AgentStatus is what one attached agent said of the disks it maps.
type AgentStatus struct {
	Name  string
	Disks []AgentDiskStatus // by disk name
}

// AgentDiskStatus is an agent's get_status answer for one disk it maps, or
// why there is none (Err: protocol.ErrUnavailable wrapping the deadline for
// an agent that did not answer in time, agent.ErrNoTable for a disk mapped
// to it before it made its table, ...).
type AgentDiskStatus struct {
	ID     meta.DiskID
	Name   string // "" if the disk has just been deleted
	Status protocol.DiskStatus
	Err    error
}

// AgentStatus asks every attached agent for the status of every disk it
// maps (get_status), side by side, and returns the answers by agent name.
// An agent that has not answered within timeout (DefaultStatusTimeout if
// 0) is reported with an error for each of its disks, not waited for
// longer. Nothing changes: no lock of the controller is held while the
// agents are asked.
func (c *Controller) AgentStatus(ctx context.Context, timeout time.Duration) ([]AgentStatus, error) {
	if timeout <= 0 {
		timeout = DefaultStatusTimeout
	}
	type ask struct {
		a     protocol.Agent
		agent int
		disk  meta.DiskID
	}
	c.agents.Lock()
	out := make([]AgentStatus, 0, len(c.agents.byName))
	var asks []ask
	for _, st := range c.agents.byName {
		out = append(out, AgentStatus{Name: st.name})
		for id := range st.disks {
			asks = append(asks, ask{a: st.a, agent: len(out) - 1, disk: id})
		}
	}
	c.agents.Unlock()

	names := map[meta.DiskID]string{}
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		for _, q := range asks {
			d, err := tx.DiskByID(q.disk)
			switch {
			case errors.Is(err, meta.ErrNotFound):
				continue // deleted since: its agents forget it
			case err != nil:
				return err
			}
			names[q.disk] = d.Name
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("agent status: %w", err)
	}

	sctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	answers := make([]AgentDiskStatus, len(asks))
	var wg sync.WaitGroup
	for i, q := range asks {
		wg.Go(func() {
			st, err := q.a.GetStatus(sctx, protocol.DiskID(q.disk))
			if err != nil && sctx.Err() != nil && ctx.Err() == nil {
				err = fmt.Errorf("agent %q did not answer get_status within %v: %w: %w", out[q.agent].Name, timeout, protocol.ErrUnavailable, err)
			}
			answers[i] = AgentDiskStatus{ID: q.disk, Name: names[q.disk], Status: st, Err: err}
		})
	}
	// Every protocol.Agent returns once its context ends: the wait is
	// bounded by timeout.
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	for i, q := range asks {
		out[q.agent].Disks = append(out[q.agent].Disks, answers[i])
	}
	for i := range out {
		ds := out[i].Disks
		sort.Slice(ds, func(a, b int) bool { return ds[a].Name < ds[b].Name || ds[a].Name == ds[b].Name && ds[a].ID < ds[b].ID })
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}
