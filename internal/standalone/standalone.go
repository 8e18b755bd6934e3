// Package standalone assembles a whole segmap in one process: a bbolt metadata
// store, a pool of file containers in one data directory, a controller and
// any number of mapping agents, connected by direct calls. It is the engine
// of `segmap up` and the harness of the whole-system tests.
//
// A data directory holds:
//
//	meta.db            the bbolt store
//	containers/c<N>    container files (sparse)
package standalone

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/ctlserver"
	"segmap/internal/meta"
	"segmap/internal/metrics"
	"segmap/internal/rpc/protocol"
)

// Options configures Open.
type Options struct {
	// Agents names the agents to start; one agent "local" if empty.
	Agents []string
	// Pool describes the containers to create when the data directory has
	// none: Count files of Slots slots of SlotSize bytes.
	Pool []PoolSpec
	// AutoPool, if set, is how Provision sizes the containers it creates
	// for a slot size that has none: Count files of Bytes/Count bytes.
	AutoPool *AutoPool
	// Logger; slog.Default if nil.
	Logger *slog.Logger
	// CommandTimeout is the controller's; its default if 0.
	CommandTimeout time.Duration
	// OpenStore, if set, opens the controller's metadata store instead of
	// the bbolt file DIR/meta.db (segmap up --etcd). The cluster closes
	// the store it returns.
	OpenStore func(ctx context.Context) (meta.Store, error)
	// WrapAgentContainer, if set, wraps every container an agent opens
	// (tests use it to slow or fail I/O below the agent).
	WrapAgentContainer func(agent string, c container.Container) container.Container
	// WrapControllerContainer, if set, wraps every container the
	// controller opens (tests use it to fail or crash the controller's
	// copies and punches).
	WrapControllerContainer func(c container.Container) container.Container
	// ControllerCopies makes the controller copy shared segments for
	// partial writes itself, instead of the faulting agent (see
	// controller.Config).
	ControllerCopies bool
	// SyncMaps commits every map change before the fault is answered
	// (controller.Config).
	SyncMaps bool
	// DrainMoves is controller.Config's: how many segments a drain moves
	// at once.
	DrainMoves int
	// PreflushRounds is controller.Config's: how many times a flush of
	// map changes kept in memory may flush their containers before it
	// takes its locks, while a flush is slow.
	PreflushRounds int
	// FillBreakAfter is controller.Config's: how long a fill in place
	// may stay staged before the next write to its segment takes it
	// back.
	FillBreakAfter time.Duration
	// ControllerMetrics and AgentMetrics, if set, are the controller's
	// and the agents' metrics (controller.Config.Metrics,
	// agent.Config.Metrics); every agent counts into AgentMetrics.
	ControllerMetrics *metrics.Controller
	AgentMetrics      *metrics.Agent
}

// PoolSpec is a group of containers with one slot size.
type PoolSpec struct {
	SlotSize uint64
	Slots    uint64
	Count    int
}

// AutoPool sizes the container files made on demand for a new slot size.
type AutoPool struct {
	Bytes uint64 // the pool's total size
	Count int    // files it is split into
}

// Cluster is a running in-process segmap.
type Cluster struct {
	Dir    string
	Store  meta.Store
	Ctrl   *controller.Controller
	Agents []*agent.Agent
	opts   Options

	provision sync.Mutex // serialises Provision
}

// Open opens (creating if needed) the data directory dir and starts a
// controller and the agents over it.
func Open(ctx context.Context, dir string, opts Options) (*Cluster, error) {
	if len(opts.Agents) == 0 {
		opts.Agents = []string{"local"}
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "containers"), 0o700); err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, opts: opts}
	if err := c.startController(ctx); err != nil {
		return nil, err
	}
	if err := c.ensurePool(ctx); err != nil {
		c.Close()
		return nil, err
	}
	for _, name := range opts.Agents {
		a := agent.New(agent.Config{Name: name, Controller: c.Ctrl, OpenContainer: c.agentOpener(name), Metrics: opts.AgentMetrics})
		if err := a.Attach(ctx, c.Ctrl); err != nil {
			c.Close()
			return nil, err
		}
		c.Agents = append(c.Agents, a)
	}
	// What a controller that stopped mid-drain left goes on, once the
	// agents have attached: one not yet attached could still act on
	// tables from before (a leader's hold covers this; here there is
	// none).
	c.Ctrl.ResumeDrains(ctx)
	return c, nil
}

// agentOpener returns how agent name opens containers.
func (c *Cluster) agentOpener(name string) func(protocol.Container) (container.Container, error) {
	wrap := c.opts.WrapAgentContainer
	if wrap == nil {
		return container.OpenURI
	}
	return func(info protocol.Container) (container.Container, error) {
		ct, err := container.OpenURI(info)
		if err != nil {
			return nil, err
		}
		return wrap(name, ct), nil
	}
}

func (c *Cluster) startController(ctx context.Context) error {
	var st meta.Store
	var err error
	if c.opts.OpenStore != nil {
		st, err = c.opts.OpenStore(ctx)
	} else {
		st, err = meta.OpenBolt(filepath.Join(c.Dir, "meta.db"))
	}
	if err != nil {
		return err
	}
	c.Store = st
	c.Ctrl = ctlserver.New(ctlserver.Config{Store: st, Logger: c.opts.Logger, CommandTimeout: c.opts.CommandTimeout, WrapContainer: c.opts.WrapControllerContainer, ControllerCopies: c.opts.ControllerCopies, SyncMaps: c.opts.SyncMaps, DrainMoves: c.opts.DrainMoves, PreflushRounds: c.opts.PreflushRounds, Metrics: c.opts.ControllerMetrics, FillBreakAfter: c.opts.FillBreakAfter})
	c.Ctrl.SweepImports(ctx) // what a controller that stopped mid-import left
	return nil
}

// ensurePool creates the pool's containers if the store has none: the
// Pool's, or else the AutoPool's for the default segment size.
func (c *Cluster) ensurePool(ctx context.Context) error {
	cs, err := c.Ctrl.ListContainers(ctx)
	if err != nil || len(cs) > 0 {
		return err
	}
	if len(c.opts.Pool) == 0 && c.opts.AutoPool != nil {
		return c.Provision(ctx, controller.DefaultSegmentSize)
	}
	id := uint32(1)
	for _, p := range c.opts.Pool {
		for i := 0; i < p.Count; i++ {
			if err := c.AddContainer(ctx, id, p.SlotSize, p.Slots); err != nil {
				return err
			}
			id++
		}
	}
	return nil
}

// AddContainer creates container file id in the data directory and adds it
// to the pool.
func (c *Cluster) AddContainer(ctx context.Context, id uint32, slotSize, slots uint64) error {
	path := filepath.Join(c.Dir, "containers", fmt.Sprintf("c%d", id))
	if err := container.CreateFile(path, id, slotSize, slots); err != nil {
		return err
	}
	_, err := c.Ctrl.AddContainer(ctx, container.FileURI(path))
	return err
}

// Provision makes sure some container serves slotSize, creating the
// AutoPool's files in the data directory if none does. Without an AutoPool
// it does nothing (creating the disk then fails with a clear error).
func (c *Cluster) Provision(ctx context.Context, slotSize uint64) error {
	c.provision.Lock()
	defer c.provision.Unlock()
	if c.opts.AutoPool == nil {
		return nil
	}
	cs, err := c.Ctrl.ListContainers(ctx)
	if err != nil {
		return err
	}
	for _, ct := range cs {
		if ct.SlotSize == slotSize {
			return nil
		}
	}
	n := max(c.opts.AutoPool.Count, 1)
	slots := c.opts.AutoPool.Bytes / uint64(n) / slotSize
	if slots == 0 {
		return fmt.Errorf("a pool of %d bytes in %d files has no room for %d-byte slots", c.opts.AutoPool.Bytes, n, slotSize)
	}
	slots = min(slots, 1<<32-1)
	for i := 0; i < n; i++ {
		id, err := c.Ctrl.NextContainerID(ctx)
		if err != nil {
			return err
		}
		if err := c.AddContainer(ctx, id, slotSize, slots); err != nil {
			return err
		}
	}
	return nil
}

// RestartController stops the controller in order (the map changes it
// keeps in memory are committed) and its store, opens the store again,
// starts a new controller, and re-attaches every agent to it; each agent
// forgets its tables.
func (c *Cluster) RestartController(ctx context.Context) error {
	c.Ctrl.Close()
	return c.restartController(ctx)
}

// CrashController is RestartController for a controller that dies: the
// map changes it keeps in memory are lost (the disks they were made for
// read as before them, and the agents hang up on those disks' NBD
// connections).
func (c *Cluster) CrashController(ctx context.Context) error {
	_ = c.Ctrl.Kill() // it dies: nothing to do about its errors
	return c.restartController(ctx)
}

func (c *Cluster) restartController(ctx context.Context) error {
	if err := c.Store.Close(); err != nil {
		return err
	}
	if err := c.startController(ctx); err != nil {
		return err
	}
	for _, a := range c.Agents {
		if err := a.Attach(ctx, c.Ctrl); err != nil {
			return err
		}
	}
	c.Ctrl.ResumeDrains(ctx) // see Open
	return nil
}

// RestartAgent replaces agent i with a new one of the same name: every table
// and open disk of the old one is lost.
func (c *Cluster) RestartAgent(ctx context.Context, i int) error {
	old := c.Agents[i]
	old.Close()
	a := agent.New(agent.Config{Name: old.Name(), Controller: c.Ctrl, OpenContainer: c.agentOpener(old.Name()), Metrics: c.opts.AgentMetrics})
	if err := a.Attach(ctx, c.Ctrl); err != nil {
		return err
	}
	c.Agents[i] = a
	return nil
}

// Fence stops the cluster acting at once, as a controller that lost its
// leadership in etcd must: the store is closed (no more commits), and
// every agent holds its I/O (every entry Invalid) instead of writing
// under entries the next leader may move. Close still follows. It
// returns the agents' errors.
func (c *Cluster) Fence(ctx context.Context) error {
	c.Store.Close()
	var errs []error
	for _, a := range c.Agents {
		if err := a.Fence(ctx); err != nil {
			errs = append(errs, fmt.Errorf("agent %s: %w", a.Name(), err))
		}
	}
	return errors.Join(errs...)
}

// Close stops the agents, then the controller, then the store.
func (c *Cluster) Close() error {
	var errs []error
	for _, a := range c.Agents {
		errs = append(errs, a.Close())
	}
	if c.Ctrl != nil {
		errs = append(errs, c.Ctrl.Close())
	}
	if c.Store != nil {
		errs = append(errs, c.Store.Close())
	}
	return errors.Join(errs...)
}
