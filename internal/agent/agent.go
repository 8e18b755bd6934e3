// Package agent is segmap's mapping agent: it serves virtual disks to a host
// and does their I/O straight to the storage containers, through volatile
// copies of the disks' mapping tables. It asks the controller only when an
// entry forbids an I/O (a map fault), and obeys the controller's commands.
//
// # Tables
//
// A table the agent has just opened, or that it forgot (a restart, a
// re-attach to a controller), is all Invalid; entries are loaded by
// faulting. The agent never changes an entry on its own: every change comes
// from a command or a fault reply.
//
// # In-flight I/O and Blocking
//
// An I/O is in flight from the moment its entry let it through to the moment
// its container call returned. A command that must not answer while an older
// I/O is still running (Blocking set commands, DeleteTable, NewTable,
// Quiesce) moves the disk to a new generation and waits until no I/O of an
// older generation is in flight. An I/O waiting for a fault reply is not in
// flight: it holds nothing, so a command never waits for a fault, and a
// controller may hold a fault while it runs commands.
//
// A fault reply is installed only if no command reached the table while the
// fault was out: otherwise the reply may predate the command (a snapshot's
// NoWrite, say) and is dropped, and the I/O looks at the table again. Nor
// is it installed over the reply to a later fault on the same segment.
//
// # Lease
//
// With a controller that grants leases (SetLease), I/O is let through only
// while the lease holds, and a read's data is returned only if the lease
// still held when it came back: once the lease may have lapsed, the
// controller may have moved on without this agent (a snapshot, a copy on
// write), and its entries may be stale. This matters when the agent's
// process was stopped (a stalled VM, a long pause): when it runs again, the
// requests that queued up meanwhile must not be served under the old
// entries before the agent notices the lapse and fences itself. A write
// let through just before the lease lapsed and delayed past it cannot be
// called back; only storage that refuses a fenced agent's writes could.
package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"segmap/internal/backoff"
	"segmap/internal/container"
	"segmap/internal/metrics"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Config configures an Agent.
type Config struct {
	// Name is the agent's (host's) name, unique among agents.
	Name string
	// Controller is the controller to attach to.
	Controller protocol.Controller
	// OpenContainer opens a storage container. The agent closes what it
	// opened on Close. A mirrored container's replicas are each opened
	// with it (URI set to the replica's), under a container.Mirror.
	OpenContainer func(protocol.Container) (container.Container, error)
	// OpenReplica opens a replica of a mirrored container (URI set to
	// the replica's); OpenContainer if nil. A holder gives replicas a
	// short failure timeout (container.ReplicaFailTimeout).
	OpenReplica func(protocol.Container) (container.Container, error)
	// ReplicaTimeout is how long a replica of a mirrored container may
	// take to answer an I/O before the agent reports it failed; default
	// container.DefaultReplicaTimeout.
	ReplicaTimeout time.Duration
	// Metrics, if set, counts each disk's faults and held I/O.
	Metrics *metrics.Agent
}

// Agent is a mapping agent. It implements protocol.Agent for its
// controller; hosts use the *Disk values Open returns.
type Agent struct {
	name  string
	openC func(protocol.Container) (container.Container, error)

	// openMu serialises Open and Disk.Close, so that a disk closed by
	// its last user and opened again by a new one is unmapped and mapped
	// in that order.
	openMu sync.Mutex

	mu struct {
		sync.Mutex
		ctrl   protocol.Controller
		disks  map[protocol.DiskID]*Disk
		closed bool
	}

	// conts holds the opened containers: an immutable map, replaced
	// whole (under contsMu) when a container is opened, so that the data
	// path looks containers up without a lock.
	conts   atomic.Pointer[map[uint32]*openContainer]
	contsMu sync.Mutex
	// members holds the newest membership of each mirrored container
	// the controller sent (contsMu): one that arrives while the
	// container is being opened is applied once it is.
	members map[uint32]protocol.Membership

	replicaTimeout time.Duration
	openR          func(protocol.Container) (container.Container, error)
	met            *metrics.Agent // nil: none

	// leaseUntil is when I/O must stop, in monotonic time since base;
	// noLease if the controller grants no lease.
	leaseUntil atomic.Int64
	base       time.Time
}

// noLease is leaseUntil without a lease.
const noLease = int64(^uint64(0) >> 1)

// leasePoll is how often I/O waiting for a lapsed lease looks again (the
// agent fences itself meanwhile, and the I/O then waits for the re-attach).
const leasePoll = 5 * time.Millisecond

type openContainer struct {
	c container.Container
	// written is set after a write completes and cleared by the flush
	// that covers it.
	written atomic.Bool
	// failed is set by the first failed flush: after an fsync error the
	// kernel may have dropped the dirty pages, so no later flush can
	// promise anything, and every one fails.
	failed atomic.Bool
}

// New returns an agent; Attach connects it to its controller.
func New(cfg Config) *Agent {
	a := &Agent{name: cfg.Name, openC: cfg.OpenContainer, base: time.Now(), replicaTimeout: cfg.ReplicaTimeout, openR: cfg.OpenReplica, met: cfg.Metrics, members: map[uint32]protocol.Membership{}}
	if a.openR == nil {
		a.openR = a.openC
	}
	a.leaseUntil.Store(noLease)
	a.met.SetLease(a.leaseHeld)
	a.mu.ctrl = cfg.Controller
	a.mu.disks = make(map[protocol.DiskID]*Disk)
	a.conts.Store(&map[uint32]*openContainer{})
	return a
}

// Name returns the agent's name.
func (a *Agent) Name() string { return a.name }

// SetLease tells the agent until when its controller's lease lets it do
// I/O (a margin before the lease runs out); the zero time lifts the limit.
// A controller client that holds a lease for the agent calls it whenever
// the lease is granted or renewed.
//
// Containers whose storage serves the agent under a lease of its own
// (container.Leaser) are told to extend it to the same end.
func (a *Agent) SetLease(until time.Time) {
	if until.IsZero() {
		a.leaseUntil.Store(noLease)
		return
	}
	a.leaseUntil.Store(int64(until.Sub(a.base)))
	for _, oc := range *a.conts.Load() {
		if l, ok := oc.c.(container.Leaser); ok {
			l.RenewLease()
		}
	}
}

// LeaseUntil returns when I/O must stop (as SetLease last set it); the
// zero time if there is no limit. Containers opened with a lease
// (container.LeasedOpener) are served until then.
func (a *Agent) LeaseUntil() time.Time {
	u := a.leaseUntil.Load()
	if u == noLease {
		return time.Time{}
	}
	return a.base.Add(time.Duration(u))
}

// waitStorageLease is what an I/O does after its storage refused it for a
// lapsed lease (container.ErrLeaseOver; nothing was done): it waits for
// the agent's own lease (the agent fences itself meanwhile if it lapsed)
// and a moment for the storage's to be renewed, and then the I/O looks at
// its table again. tries counts the refusals so far: after
// maxLeaseRefusals the I/O fails.
func (a *Agent) waitStorageLease(ctx context.Context, tries int, err error) error {
	if tries >= maxLeaseRefusals {
		return fmt.Errorf("storage refused %d times for a lapsed lease: %w", tries, err)
	}
	if err := a.waitLease(ctx); err != nil {
		return err
	}
	t := time.NewTimer(leasePoll)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// maxLeaseRefusals bounds the refusals of one I/O by its storage for a
// lapsed lease while the agent's own lease holds (a storage node that
// cannot be reached to renew it): about two seconds of leasePoll.
const maxLeaseRefusals = 400

// leaseHeld reports whether the agent's lease (if any) still holds.
func (a *Agent) leaseHeld() bool {
	u := a.leaseUntil.Load()
	return u == noLease || int64(time.Since(a.base)) < u
}

// waitLease waits until the agent's lease holds.
func (a *Agent) waitLease(ctx context.Context) error {
	for !a.leaseHeld() {
		t := time.NewTimer(leasePoll)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
	return nil
}

func (a *Agent) controller() protocol.Controller {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mu.ctrl
}

// Attach attaches the agent to ctrl (its controller from now on). Every
// table the agent holds is forgotten first: after a new attach, entries are
// reloaded by faulting.
func (a *Agent) Attach(ctx context.Context, ctrl protocol.Controller) error {
	// An Open racing with the attach either makes it into the list of
	// open disks the controller is given, or happens after the attach.
	a.openMu.Lock()
	defer a.openMu.Unlock()
	a.mu.Lock()
	if a.mu.closed {
		a.mu.Unlock()
		return ErrClosed
	}
	a.mu.ctrl = ctrl
	disks := make([]*Disk, 0, len(a.mu.disks))
	ids := make([]protocol.DiskID, 0, len(a.mu.disks))
	for id, d := range a.mu.disks {
		disks = append(disks, d)
		ids = append(ids, id)
	}
	a.mu.Unlock()
	for _, d := range disks {
		d.lostMaps()
		if err := d.reset(ctx, d.Info()); err != nil {
			return err
		}
	}
	if err := ctrl.Attach(ctx, a.name, a, ids); err != nil {
		return err
	}
	// A table change committed but never sent to this agent -- a grow,
	// sent after its commit, by a controller that died in between, or to
	// an agent that was cut off -- is learned now, and one sent but never
	// committed (a shrink told before a commit that failed) is undone: the
	// agent asks for every open disk as it is.
	for _, d := range disks {
		if err := a.refresh(ctx, ctrl, d); err != nil {
			return err
		}
	}
	// Replica failures the last controller was not told of are
	// recorded first. Then a mirror's membership committed and never
	// sent (a replica made rebuilding by a controller that died before
	// telling anyone) is learned: the agent must write that replica
	// before it does I/O.
	if err := a.recordReplicaFailures(); err != nil {
		return err
	}
	return a.refreshMirrors(ctx, ctrl)
}

// refreshMirrors gives the mirrors the agent has open the membership
// the controller has now, if newer.
func (a *Agent) refreshMirrors(ctx context.Context, ctrl protocol.Controller) error {
	mirrored := false
	for _, oc := range *a.conts.Load() {
		if _, ok := oc.c.(*container.Mirror); ok {
			mirrored = true
		}
	}
	if !mirrored {
		return nil
	}
	cs, err := ctrl.Containers(ctx)
	if err != nil {
		return err
	}
	for _, info := range cs {
		if info.Mirrored() {
			if err := a.SetMembership(ctx, info.Membership()); err != nil {
				return err
			}
		}
	}
	return nil
}

// recordReplicaFailures reports again, to the controller just attached
// to, the replica failures of open mirrors that the last one was not
// told of (it died first): until then every holder reads that replica
// as healthy, though it may miss a write.
func (a *Agent) recordReplicaFailures() error {
	var errs []error
	for id, oc := range *a.conts.Load() {
		if m, ok := oc.c.(*container.Mirror); ok {
			if err := m.RecordFailures(); err != nil {
				errs = append(errs, fmt.Errorf("container %d: %w", id, err))
			}
		}
	}
	return errors.Join(errs...)
}

// refresh asks ctrl for disk d as it is now and, if its size or mode
// changed, starts d on a new table of that geometry, unless a newer table
// (a NewTable command) reached d meanwhile.
func (a *Agent) refresh(ctx context.Context, ctrl protocol.Controller, d *Disk) error {
	was := d.info.Load()
	info, err := ctrl.Open(ctx, a.name, was.Name)
	switch {
	case errors.Is(err, protocol.ErrNotFound):
		return nil // deleted, or no longer granted: its faults say so
	case errors.Is(err, protocol.ErrUnavailable), errors.Is(err, protocol.ErrFenced), ctx.Err() != nil:
		return fmt.Errorf("refresh disk %q: %w", was.Name, err) // attach again
	case err != nil:
		return nil //nolint:nilerr // the controller cannot read the disk: its faults fail too
	}
	if info.ID != was.ID || info.Size == was.Size && info.ReadOnly == was.ReadOnly {
		return nil
	}
	return d.resetIf(ctx, was, info)
}

// Fence stops the agent's I/O until its next Attach: every table goes
// Invalid, new I/O waits, and Fence returns once the I/O in flight has
// drained. An agent fences itself when it cannot renew its lease, before
// the lease runs out, so that a controller that has given up on it can go
// on without it.
func (a *Agent) Fence(ctx context.Context) error {
	a.mu.Lock()
	disks := make([]*Disk, 0, len(a.mu.disks))
	for _, d := range a.mu.disks {
		disks = append(disks, d)
	}
	a.mu.Unlock()
	var errs []error
	for _, d := range disks {
		errs = append(errs, d.fence(ctx))
	}
	return errors.Join(errs...)
}

// OpenPatience is how long Open waits for a controller that cannot be
// reached, or has restarted and not yet seen this agent re-attach.
const OpenPatience = 60 * time.Second

// openBackoff spaces Open's attempts: 20 ms doubling to 1 s, for
// OpenPatience.
var openBackoff = backoff.Policy{Initial: 20 * time.Millisecond, Max: time.Second, Limit: OpenPatience}

// Open maps the disk called name and returns it. Opening a disk that is
// already open returns the same *Disk. While the controller is unreachable
// or does not know this agent yet (ErrUnavailable, ErrFenced), Open waits,
// up to OpenPatience, as a fault does: a host that connects during a
// controller restart gets its disk once the controller is back.
func (a *Agent) Open(ctx context.Context, name string) (*Disk, error) {
	b := backoff.New(openBackoff, nil)
	for {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		d, err := a.open(actx, name)
		cancel()
		retry := errors.Is(err, protocol.ErrUnavailable) || errors.Is(err, protocol.ErrFenced)
		if !retry || ctx.Err() != nil {
			return d, err
		}
		// openMu is free between attempts: the re-attach that the
		// controller waits for takes it.
		if b.Wait(ctx) != nil { // OpenPatience is over, or ctx ended
			return nil, err
		}
	}
}

// open is one attempt of Open.
func (a *Agent) open(ctx context.Context, name string) (*Disk, error) {
	a.openMu.Lock()
	defer a.openMu.Unlock()
	info, err := a.controller().Open(ctx, a.name, name)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.mu.closed {
		return nil, ErrClosed
	}
	d := a.mu.disks[info.ID]
	if d == nil {
		d = newDisk(a, info)
		a.mu.disks[info.ID] = d
	}
	d.opens++
	return d, nil
}

// Close stops the agent: I/O to its disks fails from now on, the I/O in
// flight is waited for, every container written to is flushed, and it
// detaches from its controller.
func (a *Agent) Close() error {
	a.mu.Lock()
	if a.mu.closed {
		a.mu.Unlock()
		return nil
	}
	a.mu.closed = true
	ctrl := a.mu.ctrl
	disks := a.mu.disks
	a.mu.disks = map[protocol.DiskID]*Disk{}
	a.mu.Unlock()
	for _, d := range disks {
		_ = d.forget(context.Background()) // closing: the agent is gone either way
	}
	// Nothing is in flight any more: make every completed write durable.
	errs := []error{a.flushWritten()}
	if ctrl != nil {
		errs = append(errs, ctrl.Detach(context.Background(), a.name))
	}
	a.contsMu.Lock()
	for _, oc := range *a.conts.Load() {
		errs = append(errs, oc.c.Close())
	}
	a.conts.Store(&map[uint32]*openContainer{})
	a.contsMu.Unlock()
	return errors.Join(errs...)
}

// container returns the opened container id, opening it if needed.
func (a *Agent) container(ctx context.Context, id uint32) (*openContainer, error) {
	if oc := (*a.conts.Load())[id]; oc != nil {
		return oc, nil
	}
	cs, err := a.controller().Containers(ctx)
	if err != nil {
		return nil, err
	}
	a.contsMu.Lock()
	defer a.contsMu.Unlock()
	old := *a.conts.Load()
	if oc := old[id]; oc != nil {
		return oc, nil
	}
	for _, info := range cs {
		if info.ID != id {
			continue
		}
		c, err := a.openContainer(info)
		if err != nil {
			return nil, fmt.Errorf("open container %d (%s): %w: %w", id, info.URI, protocol.ErrIO, err)
		}
		oc := &openContainer{c: c}
		m := make(map[uint32]*openContainer, len(old)+1)
		for k, v := range old {
			m[k] = v
		}
		m[id] = oc
		a.conts.Store(&m)
		return oc, nil
	}
	return nil, fmt.Errorf("container %d: unknown to the controller: %w", id, protocol.ErrIO)
}

// openContainer opens the container info describes: a mirrored one as a
// container.Mirror over its replicas, following the newest membership
// the controller sent; contsMu held.
func (a *Agent) openContainer(info protocol.Container) (container.Container, error) {
	if !info.Mirrored() {
		return a.openC(info)
	}
	if m, ok := a.members[info.ID]; ok && m.Epoch > info.Epoch {
		info.Epoch, info.Replicas = m.Epoch, m.Replicas
	}
	open := func(uri string) (container.Container, error) {
		return a.openR(protocol.Container{ID: info.ID, URI: uri, SlotSize: info.SlotSize, Slots: info.Slots})
	}
	return container.OpenMirror(info, open, agentReporter{a: a, id: info.ID}, a.replicaTimeout)
}

// SetMembership implements protocol.Agent: the mirror of the container,
// if open, follows m from now on; if not, it will when opened.
func (a *Agent) SetMembership(ctx context.Context, m protocol.Membership) error {
	a.contsMu.Lock()
	defer a.contsMu.Unlock()
	if old, ok := a.members[m.Container]; ok && old.Epoch >= m.Epoch {
		return nil
	}
	a.members[m.Container] = m
	oc := (*a.conts.Load())[m.Container]
	if oc == nil {
		return nil
	}
	mc, ok := oc.c.(*container.Mirror)
	if !ok {
		return fmt.Errorf("container %d is not mirrored here: %w", m.Container, protocol.ErrBadRequest)
	}
	if err := mc.SetMembership(m); err != nil {
		return fmt.Errorf("container %d: %w: %w", m.Container, protocol.ErrIO, err)
	}
	return nil
}

// agentReporter reports an agent's replica failures and write intents to
// its controller.
type agentReporter struct {
	a  *Agent
	id uint32
}

// reportPatience bounds a report: the controller may wait for a cut-off
// agent's lease before it answers.
const reportPatience = 2 * time.Minute

// ReplicaFailed reports the failure with its slots, at most
// protocol.MaxReadRange a message: the slots beyond go first, as
// intents.
func (r agentReporter) ReplicaFailed(epoch uint64, i int, uri string, slots []uint32, cause error) (protocol.Membership, error) {
	ctx, cancel := context.WithTimeout(context.Background(), reportPatience)
	defer cancel()
	for len(slots) > protocol.MaxReadRange {
		if _, err := r.a.controller().ReportReplica(ctx, protocol.ReplicaReport{Agent: r.a.name, Container: r.id, Epoch: epoch, Failed: -1, Slots: slots[:protocol.MaxReadRange]}); err != nil {
			return protocol.Membership{}, err
		}
		slots = slots[protocol.MaxReadRange:]
	}
	return r.a.controller().ReportReplica(ctx, protocol.ReplicaReport{Agent: r.a.name, Container: r.id, Epoch: epoch, Failed: i, URI: uri, Cause: cause.Error(), Slots: slots})
}

func (r agentReporter) Intent(epoch uint64, slots []uint32) error {
	ctx, cancel := context.WithTimeout(context.Background(), reportPatience)
	defer cancel()
	for len(slots) > 0 {
		n := min(len(slots), protocol.MaxReadRange)
		if _, err := r.a.controller().ReportReplica(ctx, protocol.ReplicaReport{Agent: r.a.name, Container: r.id, Epoch: epoch, Failed: -1, Slots: slots[:n]}); err != nil {
			return err
		}
		slots = slots[n:]
	}
	return nil
}

// flushWritten flushes every container written since its last flush.
func (a *Agent) flushWritten() error {
	m := *a.conts.Load()
	ocs := make([]*openContainer, 0, len(m))
	for _, oc := range m {
		ocs = append(ocs, oc)
	}
	var errs []error
	for _, oc := range ocs {
		if err := oc.flush(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// flush flushes oc if a write completed since its last flush. The flag is
// cleared before the flush starts, so a write that completes during the
// flush sets it again and the next flush covers it.
func (oc *openContainer) flush() error {
	if oc.failed.Load() {
		return fmt.Errorf("flush container %d: an earlier flush failed: %w", oc.c.ID(), protocol.ErrIO)
	}
	if !oc.written.Swap(false) {
		return nil
	}
	if err := oc.c.Flush(); err != nil {
		if errors.Is(err, container.ErrLeaseOver) {
			// Refused, not failed: nothing was lost, and the
			// next flush must cover the writes again.
			oc.written.Store(true)
			return fmt.Errorf("flush container %d: %w", oc.c.ID(), err)
		}
		oc.failed.Store(true)
		return fmt.Errorf("flush container %d: %w: %w", oc.c.ID(), protocol.ErrIO, err)
	}
	return nil
}

// known returns the open disk id, or nil. Commands about a disk the agent
// has no table for succeed without effect: such a disk has nothing cached
// and nothing in flight, and a table made later starts all Invalid. (An
// Open races with commands: the controller maps the disk to the agent
// before the agent has made its table.)
func (a *Agent) known(id protocol.DiskID) *Disk {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mu.disks[id]
}

func (a *Agent) disk(id protocol.DiskID) (*Disk, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d := a.mu.disks[id]
	if d == nil {
		return nil, fmt.Errorf("disk %d: %w", id, ErrNoTable)
	}
	return d, nil
}

// --- protocol.Agent: commands from the controller ----------------------------

// NewTable implements protocol.Agent: the table for d.ID becomes all Invalid
// at d's size, once the I/O in flight has drained.
func (a *Agent) NewTable(ctx context.Context, info protocol.Disk) error {
	a.mu.Lock()
	d := a.mu.disks[info.ID]
	if d == nil {
		d = newDisk(a, info)
		a.mu.disks[info.ID] = d
		a.mu.Unlock()
		return nil
	}
	a.mu.Unlock()
	return d.reset(ctx, info)
}

// DeleteTable implements protocol.Agent: I/O to the disk fails from now on,
// and the answer comes once the I/O in flight has drained.
func (a *Agent) DeleteTable(ctx context.Context, id protocol.DiskID) error {
	a.mu.Lock()
	d := a.mu.disks[id]
	delete(a.mu.disks, id)
	a.mu.Unlock()
	if d == nil {
		return nil
	}
	return d.forget(ctx)
}

// GetEntry implements protocol.Agent.
func (a *Agent) GetEntry(ctx context.Context, id protocol.DiskID, first, n uint64) ([]table.Entry, error) {
	d, err := a.disk(id)
	if err != nil {
		return nil, err
	}
	return d.getEntry(first, n)
}

// GetStatus implements protocol.Agent: it counts the disk's table and its
// I/O under way, holding the table's lock shared (as I/O does) for one
// look at each allocated page of the table; it waits for no I/O.
func (a *Agent) GetStatus(ctx context.Context, id protocol.DiskID) (protocol.DiskStatus, error) {
	d, err := a.disk(id)
	if err != nil {
		return protocol.DiskStatus{}, err
	}
	st := d.status()
	if u := a.leaseUntil.Load(); u != noLease {
		st.Leased = true
		st.LeaseLeft = max(0, time.Duration(u)-time.Since(a.base))
	}
	return st, nil
}

// SetEntry implements protocol.Agent.
func (a *Agent) SetEntry(ctx context.Context, c protocol.SetEntry) error {
	d := a.known(c.Disk)
	if d == nil {
		return nil // no table: nothing of it can be in flight or cached
	}
	return d.setEntry(ctx, c)
}

// SetEntryState implements protocol.Agent.
func (a *Agent) SetEntryState(ctx context.Context, c protocol.SetEntryState) error {
	d := a.known(c.Disk)
	if d == nil {
		return nil // no table: nothing of it can be in flight or cached
	}
	return d.setEntryState(ctx, c)
}

// Quiesce implements protocol.Agent.
func (a *Agent) Quiesce(ctx context.Context, id protocol.DiskID, timeout time.Duration) error {
	d := a.known(id)
	if d == nil {
		return nil // no table: nothing of it can be in flight or cached
	}
	return d.quiesce(ctx, timeout)
}

// Activate implements protocol.Agent.
func (a *Agent) Activate(ctx context.Context, id protocol.DiskID) error {
	d := a.known(id)
	if d == nil {
		return nil // no table: nothing of it can be in flight or cached
	}
	d.activate()
	return nil
}

var _ protocol.Agent = (*Agent)(nil)
