// Package controller is segmap's controller: the only writer of persistent
// state. It keeps the disk catalogue, every disk's mapping table, slot
// allocation and reference counts in a meta.Store; it answers map faults
// from mapping agents, and it drives agents with commands when a snapshot,
// delete or copy-on-write changes what they may do.
//
// # Ordering rules
//
//   - Restrictive changes reach agents before the permissive changes that
//     depend on them are persisted: a snapshot sets NoWrite on every agent
//     (Blocking) before it commits the sharing; a discard or delete makes
//     agents drop a slot (Blocking) before the slot is freed.
//   - Data before the map: a copy-on-write copy (made by the controller,
//     or by the faulting agent in a staged write) is flushed in its
//     container before the entry that points at it is committed.
//   - A fault's map change is committed before the fault is answered.
//   - Free slots are durably zero: a freed slot is punched and flushed,
//     and every free slot of a container is zeroed once after a start,
//     before its first allocation (whatever a crash left in it), so a slot
//     handed out for a Zero fault reads as zero.
//
// # Locks
//
// Faults run in parallel. A family (a disk, its snapshots and clones: the
// disks that can share slots) has a read-write lock: a fault takes it
// shared and then locks its segment index in the family, since sharers
// share slots only at the same index; what changes the family as a whole
// (a snapshot, a delete, a resize, a discard) takes it exclusively. That
// is what makes the "only this table references the slot: just clear
// NoWrite" shortcut safe against a concurrent snapshot. A read fault takes
// the family lock shared and the segment's publish lock shared; a fault
// holds that one exclusively from its first commit until its answer. So a
// read fault never answers from the middle of a change (an entry committed
// and not yet sent to every agent, or agents told to stop writing and the
// change not committed), which its agent would install and write through;
// yet it does not wait for a copy. No other lock is
// held across a store commit, a container call or an agent command: the
// allocator's, the staged writes', the open containers' and the agent
// registry's are leaves. Each change is still one transaction; concurrent
// ones share a commit (see meta.Store).
//
// Lock order: state (shared), family, segment, publish, then any leaf.
package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"segmap/internal/container"
	"segmap/internal/meta"
	"segmap/internal/metrics"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Segment size limits and default.
const (
	MinSegmentSize     = 64 << 10
	MaxSegmentSize     = 64 << 20
	DefaultSegmentSize = 1 << 20
	// MaxDiskSize bounds a disk's size.
	MaxDiskSize = 1 << 60
	// MaxSegments bounds a disk's segment count, so that an agent's table
	// for it (sparse, but with an index of one pointer per 1024 entries)
	// stays small: 16 TiB at 64 KiB segments, 256 TiB at 1 MiB.
	MaxSegments = 1 << 28
)

// Config configures a Controller.
type Config struct {
	// Store is the persistent store. The controller does not close it.
	Store meta.Store
	// OpenContainer opens a container for copies and punches, checking
	// that its header matches the record (ID 0: any container, as when one
	// is added). The controller closes what it opened on Close.
	OpenContainer func(protocol.Container) (container.Container, error)
	// Now returns the current time; time.Now if nil.
	Now func() time.Time
	// Logger receives events worth a line; slog.Default if nil.
	Logger *slog.Logger
	// CommandTimeout bounds how long the controller waits for one agent
	// to answer one command; DefaultCommandTimeout if 0.
	CommandTimeout time.Duration
	// ControllerCopies makes the controller copy a shared segment itself
	// when a partial write moves it forward (read the old slot, write
	// the new one, flush, commit, then answer). By default the faulting
	// agent copies: the controller reserves the new slot and answers
	// with a stage naming the old one, and the agent copies, lays its
	// write over the copy, flushes and commits, as for a whole-segment
	// write; the controller's fault path then does no slot I/O.
	ControllerCopies bool
	// SyncMaps commits every map change before the fault that made it
	// is answered. By default the commits of a disk that one agent
	// alone maps are kept in memory until the agent flushes it (see
	// pending.go), as the NBD contract allows.
	SyncMaps bool
	// DrainMoves is how many segments a drain moves at once; default
	// DefaultDrainMoves. A rebuild copies as many at once.
	DrainMoves int
	// PreflushRounds is how many times the flush of a family's map
	// changes kept in memory may flush their containers before it takes
	// the family's locks, flushing again while a flush is slow
	// (preflush); default DefaultPreflushRounds. The crash-point tests
	// set 1: how many rounds are made depends on how long fsync takes,
	// and they count an operation's persistence steps once, then crash
	// each.
	PreflushRounds int
	// OpenReplica opens a replica of a mirrored container (URI set to
	// the replica's); OpenContainer if nil. A holder gives replicas a
	// short failure timeout (container.ReplicaFailTimeout).
	OpenReplica func(protocol.Container) (container.Container, error)
	// ReplicaTimeout is how long a replica of a mirrored container may
	// take to answer the controller's I/O before it is failed; default
	// container.DefaultReplicaTimeout.
	ReplicaTimeout time.Duration
	// Metrics, if set, counts faults and snapshots, and reads the
	// controller's state at each scrape (see metrics.StateFunc).
	Metrics *metrics.Controller
	// FillBreakAfter is how long a fill in place may stay staged before
	// the next write to its segment takes it back; default
	// DefaultFillBreakAfter.
	FillBreakAfter time.Duration
}

// Controller is the controller. Its methods are safe for concurrent use.
type Controller struct {
	store      meta.Store
	openC      func(protocol.Container) (container.Container, error)
	now        func() time.Time
	logger     *slog.Logger
	cmdTimeout time.Duration
	fillBreak  time.Duration
	ctrlCopies bool
	deferMaps  bool
	met        *metrics.Controller // nil: none

	// pend holds the map changes kept in memory until a flush.
	pend struct {
		mu struct {
			sync.Mutex
			fams map[meta.DiskID]*pendingFam
		}
	}

	// state is taken shared by every state change and exclusively by
	// Close: Close waits for the changes under way.
	state  sync.RWMutex
	closed atomic.Bool

	// fams and segs are the family and segment locks (see lockFamily).
	fams keyedLocks[meta.DiskID]
	segs keyedLocks[famSeg]
	pubs keyedLocks[famSeg] // see lockPublish

	alloc allocator
	conts openContainers

	// stage holds the staged writes handed out and not yet committed,
	// by token; their slots are reserved in the allocator.
	stage struct {
		mu struct {
			sync.Mutex
			writes map[uint64]stagedWrite
			next   uint64
			// inPlace holds the segments an agent is filling in
			// place (stagedWrite.inPlace).
			inPlace map[segKey]*fillClaim
			// done holds the outcomes of the last commitKeep
			// commits, by token; order is a ring of their tokens,
			// the nDone'th commit at nDone % commitKeep.
			done  map[uint64]commitOutcome
			order []uint64
			nDone uint64
		}
	}

	hold holdState

	// drainMoves is Config.DrainMoves.
	drainMoves int
	// preflushRounds is Config.PreflushRounds.
	preflushRounds int
	// openR is Config.OpenReplica.
	openR func(protocol.Container) (container.Container, error)
	// replicaTimeout is Config.ReplicaTimeout.
	replicaTimeout time.Duration
	mirrors        mirrors

	// health knows the failed containers (health.go).
	health health

	// ops is the registry of long operations (operations.go).
	ops operations

	// bg is the work the controller runs in the background (drains
	// resumed after a start, see ResumeDrains): Kill cancels ctx and
	// waits for wg.
	bg struct {
		ctx    context.Context
		cancel context.CancelFunc
		wg     sync.WaitGroup
	}

	// imports holds the hidden disks of the imports under way, which
	// sweepHidden leaves alone.
	imports struct {
		mu struct {
			sync.Mutex
			active map[meta.DiskID]bool
		}
	}

	// reg caches the store's agent registry. Its lock is held across
	// the registry's store updates, so that a prune never drops an agent
	// registered meanwhile.
	reg struct {
		mu struct {
			sync.Mutex
			names  map[string]bool
			pruned bool // the registry has been cut down after the last hold
		}
	}

	// plans counts the faults resolved, by plan.
	plans [table.FillAll + 1]atomic.Uint64

	// agents is the registry of attached agents and what they map. Its
	// lock is a leaf.
	agents struct {
		sync.Mutex
		byName map[string]*agentState
	}
}

type agentState struct {
	name  string
	a     protocol.Agent
	disks map[meta.DiskID]bool
}

// New returns a controller over cfg.Store.
func New(cfg Config) *Controller {
	c := &Controller{store: cfg.Store, openC: cfg.OpenContainer, now: cfg.Now, logger: cfg.Logger, cmdTimeout: cfg.CommandTimeout, ctrlCopies: cfg.ControllerCopies, deferMaps: !cfg.SyncMaps}
	c.fillBreak = cfg.FillBreakAfter
	if c.fillBreak <= 0 {
		c.fillBreak = DefaultFillBreakAfter
	}
	if c.cmdTimeout <= 0 {
		c.cmdTimeout = DefaultCommandTimeout
	}
	c.drainMoves = cfg.DrainMoves
	c.met = cfg.Metrics
	c.met.SetState(c.metricsState)
	c.countCommits()
	c.replicaTimeout = cfg.ReplicaTimeout
	c.openR = cfg.OpenReplica
	if c.openR == nil {
		c.openR = c.openC
	}
	if c.drainMoves <= 0 {
		c.drainMoves = DefaultDrainMoves
	}
	c.preflushRounds = cfg.PreflushRounds
	if c.preflushRounds <= 0 {
		c.preflushRounds = DefaultPreflushRounds
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
	c.alloc.init()
	c.conts.mu.m = make(map[uint32]*openContainer)
	c.stage.mu.writes = make(map[uint64]stagedWrite)
	c.stage.mu.done = make(map[uint64]commitOutcome)
	c.stage.mu.inPlace = make(map[segKey]*fillClaim)
	c.pend.mu.fams = make(map[meta.DiskID]*pendingFam)
	c.agents.byName = make(map[string]*agentState)
	c.hold.mu.ended = closedChan()
	c.bg.ctx, c.bg.cancel = context.WithCancel(context.Background())
	return c
}

// NewEpoch persists and returns a new controller epoch, larger than any
// earlier controller's on this store. A controller calls it once as it
// starts; agents refuse commands from an older epoch.
func (c *Controller) NewEpoch(ctx context.Context) (uint64, error) {
	var e uint64
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		var err error
		e, err = tx.NextSeq("epoch")
		return err
	})
	return e, err
}

// FaultCounts returns how many faults were resolved by each plan since the
// controller started.
func (c *Controller) FaultCounts() map[table.Plan]uint64 {
	out := map[table.Plan]uint64{}
	for p := table.Load; p < table.Plan(len(c.plans)); p++ {
		if n := c.plans[p].Load(); n > 0 {
			out[p] = n
		}
	}
	return out
}

// Close commits the map changes kept in memory (a controller that stops
// in order loses nothing), waits for the state changes under way and
// closes the containers the controller opened. It does not close the
// store.
func (c *Controller) Close() error {
	if err := c.flushAll(context.Background()); err != nil {
		c.logger.Warn("commit map changes on close", "err", err)
	}
	return c.Kill()
}

// Kill stops the controller as a crash would: the map changes kept in
// memory are lost. It waits for the state changes under way and closes
// the containers the controller opened, not the store.
func (c *Controller) Kill() error {
	c.closed.Store(true)
	c.bg.cancel()
	c.hold.mu.Lock()
	c.hold.closeOnce()
	c.hold.mu.Unlock()
	c.bg.wg.Wait()
	c.state.Lock()
	defer c.state.Unlock()
	return c.conts.closeAll()
}

// holdState is the hold a controller places as it starts (see Hold).
type holdState struct {
	mu struct {
		sync.Mutex
		until time.Time
		// ended is closed when the hold ends early (or the
		// controller closes): waiters need not wait for until.
		ended chan struct{}
		// waitFor are the registered agents the hold still waits for.
		waitFor map[string]bool
	}
}

func closedChan() chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}

// closeOnce closes ended if it is not closed yet; mu held.
func (h *holdState) closeOnce() {
	select {
	case <-h.mu.ended:
	default:
		close(h.mu.ended)
	}
}

// Hold makes every state change wait for d, on the controller's clock. A
// controller that starts over a store that agents may still be serving
// from (it restarted, or took over) holds for one agent lease: by then
// every agent of the old controller has either re-attached (and
// forgotten its entries) or, cut off, fenced itself. Without it a
// snapshot could commit while an agent that has not noticed yet still
// writes under its old entries.
//
// The hold ends early once every agent in the store's agent registry has
// attached to this controller: an agent is registered before any
// controller grants it a lease, and one that attaches here has fenced
// itself first, so then no lease of an earlier controller is left. When
// the hold has run its course, the registry is cut down to the agents
// attached here.
func (c *Controller) Hold(d time.Duration) error {
	var reg []string
	if err := c.store.View(context.Background(), func(tx *meta.Tx) error {
		var err error
		reg, err = tx.Agents()
		return err
	}); err != nil {
		return err
	}
	c.reg.mu.Lock()
	c.reg.mu.names = map[string]bool{}
	for _, a := range reg {
		c.reg.mu.names[a] = true
	}
	c.reg.mu.pruned = false
	c.reg.mu.Unlock()

	h := &c.hold
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closeOnce()
	h.mu.until = c.now().Add(d)
	h.mu.ended = make(chan struct{})
	h.mu.waitFor = map[string]bool{}
	c.agents.Lock()
	for _, a := range reg {
		if c.agents.byName[a] == nil {
			h.mu.waitFor[a] = true
		}
	}
	c.agents.Unlock()
	if len(h.mu.waitFor) == 0 {
		h.closeOnce()
	}
	return nil
}

// attachedForHold notes that agent name has attached.
func (c *Controller) attachedForHold(name string) {
	h := &c.hold
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.mu.waitFor[name] {
		return
	}
	delete(h.mu.waitFor, name)
	if len(h.mu.waitFor) == 0 {
		select {
		case <-h.mu.ended:
		default:
			c.logger.Info("every registered agent has re-attached: hold ended early")
			close(h.mu.ended)
		}
	}
}

// waitHold waits until the hold is over. The first state change after a
// hold that ran its course prunes the agent registry.
func (c *Controller) waitHold(ctx context.Context) error {
	h := &c.hold
	for {
		h.mu.Lock()
		ended, until := h.mu.ended, h.mu.until
		h.mu.Unlock()
		select {
		case <-ended:
			return nil
		default:
		}
		d := until.Sub(c.now())
		if d <= 0 {
			c.prune()
			return nil
		}
		t := time.NewTimer(d)
		select {
		case <-ended:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
		t.Stop()
	}
}

// register adds agent name to the store's agent registry, before it is
// granted a lease.
func (c *Controller) register(ctx context.Context, name string) error {
	c.reg.mu.Lock()
	defer c.reg.mu.Unlock()
	if c.reg.mu.names[name] {
		return nil
	}
	err := c.store.Update(ctx, func(tx *meta.Tx) error {
		reg, err := tx.Agents()
		if err != nil || slices.Contains(reg, name) {
			return err
		}
		return tx.SetAgents(append(reg, name))
	})
	if err != nil {
		return fmt.Errorf("register agent %q: %w", name, err)
	}
	if c.reg.mu.names == nil {
		c.reg.mu.names = map[string]bool{}
	}
	c.reg.mu.names[name] = true
	return nil
}

// prune cuts the agent registry down to the agents attached now, once
// after a hold has run its course. Failures are only logged: a longer
// registry only makes the next hold last its full lease.
func (c *Controller) prune() {
	c.reg.mu.Lock()
	defer c.reg.mu.Unlock()
	if c.reg.mu.pruned || c.reg.mu.names == nil {
		return
	}
	c.reg.mu.pruned = true
	c.agents.Lock()
	var keep []string
	for name := range c.agents.byName {
		keep = append(keep, name)
	}
	c.agents.Unlock()
	slices.Sort(keep)
	if len(keep) == len(c.reg.mu.names) {
		return
	}
	err := c.store.Update(context.Background(), func(tx *meta.Tx) error { return tx.SetAgents(keep) })
	if err != nil {
		c.logger.Warn("prune the agent registry", "err", err)
		return
	}
	c.reg.mu.names = map[string]bool{}
	for _, a := range keep {
		c.reg.mu.names[a] = true
	}
}

// begin starts a state change: it waits for the hold (unless noHold: for
// what changes nothing) and takes c.state shared. The caller calls the
// returned end when done.
func (c *Controller) begin(ctx context.Context, noHold bool) (end func(), err error) {
	if c.closed.Load() {
		return nil, ErrClosed
	}
	if !noHold {
		if err := c.waitHold(ctx); err != nil {
			return nil, err
		}
	}
	c.state.RLock()
	if c.closed.Load() {
		c.state.RUnlock()
		return nil, ErrClosed
	}
	return c.state.RUnlock, nil
}

// --- agents -----------------------------------------------------------------

// Attach implements protocol.Controller. An agent attaching under a name that
// is already attached replaces it: the old one is gone (restarted).
func (c *Controller) Attach(ctx context.Context, name string, a protocol.Agent, open []protocol.DiskID) error {
	if name == "" || a == nil {
		return fmt.Errorf("attach: agent without a name: %w", protocol.ErrBadRequest)
	}
	if err := c.register(ctx, name); err != nil {
		return err
	}
	st := &agentState{name: name, a: a, disks: make(map[meta.DiskID]bool)}
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		for _, id := range open {
			if _, err := tx.DiskByID(meta.DiskID(id)); err != nil {
				continue
			}
			if ok, err := allowed(tx, meta.DiskID(id), name); err == nil && ok {
				st.disks[meta.DiskID(id)] = true
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	c.agents.Lock()
	c.agents.byName[name] = st
	c.agents.Unlock()
	// A re-attaching agent lost the staged writes it had not committed,
	// but for its fills in place of disks it still has open (an agent
	// cut off and back, not a new process): such a fill wrote the
	// entry's own slot, and what it wrote over sub-blocks the slot holds
	// was read by others at once. Its commit, sent again after the
	// re-attach, must land rather than come back stale: the agent would
	// write again, over what others wrote since. A fill its agent does
	// not commit is given back (abandoned) or taken back by the next
	// write to the segment (breakInPlace).
	c.stage.mu.Lock()
	var lost []stagedWrite
	for tok, sw := range c.stage.mu.writes {
		if sw.agent == name && (!sw.inPlace || !st.disks[sw.disk]) {
			delete(c.stage.mu.writes, tok)
			lost = append(lost, sw)
		}
	}
	c.stage.mu.Unlock()
	for _, sw := range lost {
		// It may have written the slot: not zero any more.
		c.endStage(ctx, sw)
	}
	c.dropPending(ctx, name)
	c.attachedForHold(name)
	return nil
}

// Detach implements protocol.Controller.
func (c *Controller) Detach(ctx context.Context, name string) error {
	c.agents.Lock()
	delete(c.agents.byName, name)
	c.agents.Unlock()
	return nil
}

// Open implements protocol.Controller.
func (c *Controller) Open(ctx context.Context, agent, disk string) (protocol.Disk, error) {
	var d meta.Disk
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		if d, err = tx.Disk(disk); err != nil {
			return err
		}
		ok, err := allowed(tx, d.ID, agent)
		if err == nil && !ok {
			// Not even its existence is told: to this agent the disk
			// does not exist.
			err = fmt.Errorf("disk %q: %w", disk, meta.ErrNotFound)
		}
		return err
	})
	if err != nil {
		return protocol.Disk{}, wrapNotFound(err)
	}
	c.agents.Lock()
	st := c.agents.byName[agent]
	c.agents.Unlock()
	if st == nil {
		return protocol.Disk{}, fmt.Errorf("open %q by %q: %w", disk, agent, ErrUnknownAgent)
	}
	if c.openMapper(st, d) {
		// The changes another agent's writes made in memory become
		// durable: this agent's reads must see what a controller
		// restart would keep. While two agents map the disk, its
		// changes are committed as they are made.
		if err := c.flushFamily(ctx, d.Family, false); err != nil {
			return protocol.Disk{}, fmt.Errorf("open %q by %q: %w", disk, agent, err)
		}
	}
	return toMapping(d), nil
}

// CloseDisk implements protocol.Controller: agent no longer maps disk id.
func (c *Controller) CloseDisk(ctx context.Context, agent string, id protocol.DiskID) error {
	c.agents.Lock()
	defer c.agents.Unlock()
	if st := c.agents.byName[agent]; st != nil {
		delete(st.disks, meta.DiskID(id))
	}
	return nil
}

// Containers implements protocol.Controller.
func (c *Controller) Containers(ctx context.Context) ([]protocol.Container, error) {
	var cs []meta.Container
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		cs, err = tx.Containers()
		return err
	})
	out := make([]protocol.Container, len(cs))
	for i, ct := range cs {
		out[i] = protoContainer(ct)
	}
	return out, err
}

// Exports implements protocol.Controller: the disks agent may map.
func (c *Controller) Exports(ctx context.Context, agent string) ([]protocol.Disk, error) {
	var out []protocol.Disk
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		for _, d := range ds {
			ok, err := allowed(tx, d.ID, agent)
			if err != nil {
				return err
			}
			if ok {
				out = append(out, toMapping(d))
			}
		}
		return nil
	})
	return out, err
}

// allowed reports whether agent may map disk id.
func allowed(tx *meta.Tx, id meta.DiskID, agent string) (bool, error) {
	gs, all, err := tx.Grants(id)
	return all || slices.Contains(gs, agent), err
}

// mappers returns the agents that map disk id, except the one named skip.
func (c *Controller) mappers(id meta.DiskID, skip string) []*agentState {
	c.agents.Lock()
	defer c.agents.Unlock()
	var out []*agentState
	for _, st := range c.agents.byName {
		if st.disks[id] && st.name != skip {
			out = append(out, st)
		}
	}
	return out
}

// AgentInfo describes an attached agent.
type AgentInfo struct {
	Name  string
	Disks int // disks it maps
}

// Agents lists the attached agents, by name.
func (c *Controller) Agents() []AgentInfo {
	c.agents.Lock()
	defer c.agents.Unlock()
	out := make([]AgentInfo, 0, len(c.agents.byName))
	for _, st := range c.agents.byName {
		out = append(out, AgentInfo{Name: st.name, Disks: len(st.disks)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// forget removes disk id from every agent's map.
func (c *Controller) forget(id meta.DiskID) {
	c.agents.Lock()
	defer c.agents.Unlock()
	for _, st := range c.agents.byName {
		delete(st.disks, id)
	}
}

// DefaultCommandTimeout bounds how long the controller waits for one agent
// to answer one command.
const DefaultCommandTimeout = 30 * time.Second

// broadcast runs cmd on every agent that maps disk id except skip, all at
// once, and waits for all of them. Commands run to completion even if the caller's
// context is cancelled: an operation that has started to change agents
// must not stop half way because an admin gave up waiting. The first
// failure is returned, and the caller must not go on to commit anything
// that depends on the command: an agent that did not confirm a
// restrictive change may still be acting on the old entries. (A remote
// agent that cannot be reached is waited for until its lease has run
// out, and then counts as done: see internal/rpc/transport.)
func (c *Controller) broadcast(ctx context.Context, id meta.DiskID, skip string, cmd func(context.Context, protocol.Agent) error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cmdTimeout)
	defer cancel()
	ms := c.mappers(id, skip)
	errs := make([]error, len(ms))
	run := func(i int) {
		st := ms[i]
		if err := cmd(ctx, st.a); err != nil {
			c.logger.Warn("agent failed a command", "agent", st.name, "disk_id", id, "err", err)
			errs[i] = fmt.Errorf("agent %q: %w", st.name, err)
		}
	}
	// Agents are told side by side: one that is slow to answer (or
	// cut off, until its lease runs out) delays the change by its own
	// time only.
	if len(ms) == 1 {
		run(0)
	} else {
		var wg sync.WaitGroup
		for i := range ms {
			wg.Go(func() { run(i) })
		}
		wg.Wait()
	}
	return errors.Join(errs...)
}

// --- containers ---------------------------------------------------------------

// AddContainer registers the storage container at uri. The container must
// already exist with its header written; its id and geometry come from the
// header, and an id that is already registered is refused.
func (c *Controller) AddContainer(ctx context.Context, uri string) (meta.Container, error) {
	end, err := c.begin(ctx, false)
	if err != nil {
		return meta.Container{}, err
	}
	defer end()
	ct, err := c.openC(protocol.Container{URI: uri})
	if err != nil {
		return meta.Container{}, fmt.Errorf("add container %s: %w", uri, err)
	}
	rec := meta.Container{ID: ct.ID(), URI: uri, SlotSize: uint64(ct.SlotSize()), Slots: uint64(ct.Slots())}
	err = c.store.Update(ctx, func(tx *meta.Tx) error {
		var err error
		rec, err = tx.AddContainer(rec)
		return err
	})
	if err != nil {
		ct.Close()
		return meta.Container{}, fmt.Errorf("add container %s: %w", uri, err)
	}
	c.conts.put(rec.ID, ct)
	return rec, nil
}

// NextContainerID returns an id no registered container has.
func (c *Controller) NextContainerID(ctx context.Context) (uint32, error) {
	cs, err := c.ListContainers(ctx)
	if err != nil {
		return 0, err
	}
	id := uint32(1)
	for _, ct := range cs {
		id = max(id, ct.ID+1)
	}
	return id, nil
}

// ListContainers returns the container records.
func (c *Controller) ListContainers(ctx context.Context) ([]meta.Container, error) {
	if err := c.flushAll(ctx); err != nil {
		return nil, err
	}
	var cs []meta.Container
	err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		cs, err = tx.Containers()
		return err
	})
	return cs, err
}

// openContainers are the containers the controller has opened, each
// opened once: a container whose open hangs (its storage node does not
// answer) delays only the callers that need it.
type openContainers struct {
	mu struct {
		sync.Mutex
		m      map[uint32]*openContainer
		closed bool
	}
}

type openContainer struct {
	ready chan struct{} // closed when the open has finished
	c     container.Container
	err   error
}

// put makes ct container id's opened container, closing one opened before.
func (o *openContainers) put(id uint32, ct container.Container) {
	o.mu.Lock()
	old := o.mu.m[id]
	oc := &openContainer{ready: closedChan(), c: ct}
	o.mu.m[id] = oc
	o.mu.Unlock()
	if old != nil {
		<-old.ready
		if old.c != nil {
			old.c.Close()
		}
	}
}

// drop closes container id if it is open, and forgets it.
func (o *openContainers) drop(id uint32) {
	o.mu.Lock()
	old := o.mu.m[id]
	delete(o.mu.m, id)
	o.mu.Unlock()
	if old != nil {
		<-old.ready
		if old.c != nil {
			old.c.Close()
		}
	}
}

func (o *openContainers) closeAll() error {
	o.mu.Lock()
	all := o.mu.m
	o.mu.m = nil
	o.mu.closed = true
	o.mu.Unlock()
	var errs []error
	for _, oc := range all {
		<-oc.ready
		if oc.c != nil {
			errs = append(errs, oc.c.Close())
		}
	}
	return errors.Join(errs...)
}

// container returns the opened container id, opening it on first use.
func (c *Controller) container(ctx context.Context, id uint32) (container.Container, error) {
	o := &c.conts
	o.mu.Lock()
	if o.mu.closed {
		o.mu.Unlock()
		return nil, ErrClosed
	}
	oc := o.mu.m[id]
	if oc == nil {
		oc = &openContainer{ready: make(chan struct{})}
		o.mu.m[id] = oc
		o.mu.Unlock()
		oc.c, oc.err = c.openContainer(ctx, id)
		close(oc.ready)
		if oc.err != nil {
			o.mu.Lock()
			if o.mu.m[id] == oc {
				delete(o.mu.m, id) // try again next time
			}
			o.mu.Unlock()
		}
		return oc.c, oc.err
	}
	o.mu.Unlock()
	select {
	case <-oc.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return oc.c, oc.err
}

func (c *Controller) openContainer(ctx context.Context, id uint32) (container.Container, error) {
	var rec meta.Container
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		var err error
		rec, err = tx.Container(id)
		return err
	}); err != nil {
		return nil, err
	}
	if rec.Mirrored() {
		ct, err := c.openMirror(rec)
		if err != nil {
			return nil, fmt.Errorf("open mirrored container %d: %w: %w", id, protocol.ErrIO, err)
		}
		return ct, nil
	}
	ct, err := c.openC(protocol.Container{ID: rec.ID, URI: rec.URI, SlotSize: rec.SlotSize, Slots: rec.Slots})
	if err != nil {
		return nil, fmt.Errorf("open container %d (%s): %w: %w", id, rec.URI, protocol.ErrIO, err)
	}
	return ct, nil
}

// zeroFree punches every free slot of container cid but those in keep,
// in runs, and flushes (see ensureZeroedLocked).
func (c *Controller) zeroFree(ctx context.Context, cid uint32, keep []uint32) error {
	ct, err := c.container(ctx, cid)
	if err != nil {
		return err
	}
	used := keep
	if err := c.store.View(ctx, func(tx *meta.Tx) error {
		return tx.ForEachRef(cid, func(slot uint32, _ uint32) error {
			used = append(used, slot)
			return nil
		})
	}); err != nil {
		return err
	}
	size := ct.SlotSize()
	punch := func(from, to int64) error { // slots [from, to)
		if from >= to {
			return nil
		}
		if err := ct.Punch(from*size, (to-from)*size); err != nil {
			return fmt.Errorf("zero free slots [%d, %d) of container %d: %w: %w", from, to, cid, protocol.ErrIO, err)
		}
		return nil
	}
	slices.Sort(used)
	next := int64(0)
	for _, s := range used {
		if err := punch(next, int64(s)); err != nil {
			return err
		}
		next = max(next, int64(s)+1)
	}
	if err := punch(next, ct.Slots()); err != nil {
		return err
	}
	if err := ct.Flush(); err != nil {
		return fmt.Errorf("zero free slots of container %d: flush: %w: %w", cid, protocol.ErrIO, err)
	}
	c.logger.Debug("free slots zeroed", "container", cid, "used", len(used))
	return nil
}

// copySlot copies the segment entry from maps (each sub-block from the
// slot that holds it, for a partial entry) into slot to and flushes to's
// container. It holds no lock: the caller owns to (reserved) and holds
// the segment lock that keeps from's slots in place.
func (c *Controller) copySlot(ctx context.Context, from table.Entry, to table.Location, size uint64) error {
	dst, err := c.container(ctx, to.Container)
	if err != nil {
		return err
	}
	sb := table.SubBlockSize(size)
	buf := make([]byte, min(size, 1<<20))
	err = from.Runs(0, table.SubBlockCount(size), func(loc table.Location, lo, hi int) error {
		src, err := c.container(ctx, loc.Container)
		if err != nil {
			return err
		}
		for off, end := uint64(lo)*sb, uint64(hi)*sb; off < end; {
			b := buf[:min(uint64(len(buf)), end-off)]
			if _, err := src.ReadAt(b, int64(uint64(loc.Slot)*size+off)); err != nil {
				return fmt.Errorf("copy-on-write read %v: %w: %w", loc, protocol.ErrIO, err)
			}
			if _, err := dst.WriteAt(b, int64(uint64(to.Slot)*size+off)); err != nil {
				return fmt.Errorf("copy-on-write write %v: %w: %w", to, protocol.ErrIO, err)
			}
			off += uint64(len(b))
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := dst.Flush(); err != nil {
		return fmt.Errorf("copy-on-write flush %v: %w: %w", to, protocol.ErrIO, err)
	}
	return nil
}

// punch punches slots that a commit freed, so their space goes back to
// the filesystem, and flushes them: free slots stay durably zero, so
// allocation need not punch (see takeSlot). It returns the containers
// where that failed: their free slots are zeroed again before their next
// allocation. A punch lost to a crash only leaves stale bytes in a free
// slot, which ensureZeroedLocked punches again after a restart.
func (c *Controller) punch(ctx context.Context, freed []table.Location) (failed map[uint32]bool) {
	failed = map[uint32]bool{}
	flush := map[uint32]container.Container{}
	for _, loc := range freed {
		if c.isFailed(loc.Container) {
			// Zeroed before its next allocation, once back.
			failed[loc.Container] = true
			continue
		}
		ct, err := c.container(ctx, loc.Container)
		if err == nil {
			err = container.FreeSlot(ct, int64(loc.Slot))
		}
		if err != nil {
			c.logger.Warn("punch freed slot", "slot", loc, "err", err)
			failed[loc.Container] = true
			continue
		}
		flush[loc.Container] = ct
	}
	for cid, ct := range flush {
		if failed[cid] {
			continue
		}
		if err := ct.Flush(); err != nil {
			c.logger.Warn("flush punched slots", "container", cid, "err", err)
			failed[cid] = true
		}
	}
	return failed
}

func toMapping(d meta.Disk) protocol.Disk {
	return protocol.Disk{ID: protocol.DiskID(d.ID), Name: d.Name, Size: d.Size, SegmentSize: d.SegmentSize, ReadOnly: d.ReadOnly, Family: protocol.DiskID(d.Family)}
}

func wrapNotFound(err error) error {
	if errors.Is(err, meta.ErrNotFound) {
		return fmt.Errorf("%w: %w", protocol.ErrNotFound, err)
	}
	return err
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._@-]{0,127}$`)

// ValidName reports whether name can name a disk: 1 to 128 letters, digits,
// '.', '_', '@' and '-', not starting with '.', '@' or '-'.
func ValidName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%q: %w (use 1-128 letters, digits, '.', '_', '@', '-'; not starting with '.', '@' or '-')", name, ErrInvalidName)
	}
	return nil
}

// ValidSegmentSize checks a segment size.
func ValidSegmentSize(n uint64) error {
	if n < MinSegmentSize || n > MaxSegmentSize || n&(n-1) != 0 {
		return fmt.Errorf("%d bytes: %w (a power of two from 64 KiB to 64 MiB)", n, ErrInvalidSegmentSize)
	}
	return nil
}

// ValidGeometry checks a disk size against its segment size.
func ValidGeometry(size, segmentSize uint64) error {
	if err := ValidSize(size); err != nil {
		return err
	}
	if err := ValidSegmentSize(segmentSize); err != nil {
		return err
	}
	if (size+segmentSize-1)/segmentSize > MaxSegments {
		return fmt.Errorf("%d bytes in %d-byte segments: %w (at most %d segments: use a larger segment size)", size, segmentSize, ErrInvalidSize, MaxSegments)
	}
	return nil
}

// ValidSize checks a disk size.
func ValidSize(n uint64) error {
	if n == 0 || n%512 != 0 || n > MaxDiskSize {
		return fmt.Errorf("%d bytes: %w (a non-zero multiple of 512 bytes, at most 1 EiB)", n, ErrInvalidSize)
	}
	return nil
}
