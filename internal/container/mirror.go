package container

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"segmap/internal/rpc/protocol"
)

// Mirror is a container made of two or three replicas, each a container
// with the same id and slot size (an nbd:// export on its own storage
// node, a file or a device). Tables name the mirror's id; the replicas
// are below the Container interface, so copy-on-write, staged writes,
// snapshots, drain and check see one container.
//
// Its membership (protocol.Membership) comes from the controller and
// says which replicas are healthy (written and read), rebuilding
// (written, not read) or failed (neither). Writes, punches and flushes go
// to every healthy and rebuilding replica in parallel and are answered
// when all of them have answered; reads go to the first healthy replica
// (by index), every holder's alike. A replica that fails an I/O, or does
// not answer it within the mirror's timeout, is reported
// (MirrorReporter.ReplicaFailed) with the slots of the I/O, and the I/O
// is answered only once the controller has recorded the failure and told
// every holder: from then on no holder writes it. The I/O then succeeds
// if a healthy replica did it (a read is tried on the next healthy
// replica); if none is left, it fails.
//
// Reads are not spread over the replicas because the replicas may hold
// different bytes where writes raced: two writes of one block in flight
// at once, from two holders, may reach one replica in one order and
// another in the other, and each replica keeps the last it got. Either
// is a right result for the block, but only one may be read: a block
// read from one replica and then from another would go back in time. So
// every read of every holder goes to one replica, which stays the one
// read while it is healthy: a replica failing or coming back after it
// does not move the reads. The rebuild copies from it too (it reads
// through a Mirror), so a rebuilt replica agrees with what was read.
// One holder never lets its own writes race: a write or punch waits
// for the holder's writes and punches in flight that overlap it
// (order), so they reach every replica in the same order. What remains
// is two holders writing one block at the same moment and the replica
// read then failing before the block is written again: the next one
// may hold the other write, and a read may see it once.
//
// A failure the controller could not be told of (it was down, or
// restarting) is not forgotten: the replica may now miss a write the
// others hold, while every holder still reads it as healthy. It is
// reported again before any later I/O of the mirror goes on (and by
// RecordFailures, which an agent calls once it has attached to a new
// controller); until it has been recorded, that I/O fails.
//
// A replica that fails may have lost what it had not flushed (its node
// lost power), so its failure is reported with every slot written since
// the last flush all replicas answered, besides those of the failed I/O:
// its catch-up copies them all.
//
// While a replica is failed, the first write or punch of each slot is
// recorded with the controller before it is issued (MirrorReporter.
// Intent): the replica, once back, catches up by copying those slots
// only.
type Mirror struct {
	id       uint32
	slotSize int64
	slots    int64
	open     func(uri string) (Container, error)
	rep      MirrorReporter
	timeout  time.Duration

	// view is what I/O follows, replaced whole on every change.
	view atomic.Pointer[mirrorView]

	// unrecorded is set while mu.unrecorded is not empty.
	unrecorded atomic.Bool

	mu struct {
		sync.Mutex
		// noted holds the slots recorded as written while degraded.
		noted map[int64]bool
		// dead holds the replicas closed because they did not answer
		// in time: opened again if the controller keeps them.
		dead map[Container]bool
		// unrecorded holds, by replica index, the failures whose
		// report did not reach the controller.
		unrecorded map[int]*unrecordedFailure
		// inFlight holds the writes and punches on their way to the
		// replicas (see order).
		inFlight map[*span]struct{}
		// unflushed holds the slots written or punched since the
		// last flush that every replica answered.
		unflushed map[int64]unflushedSlot
		seq       uint64
	}
}

// span is a write or punch of bytes [off, end) of a mirror on its way
// to the replicas; done is closed when it has been answered.
type span struct {
	off, end int64
	done     chan struct{}
}

// unflushedSlot is the writes of a slot that no flush covers yet.
type unflushedSlot struct {
	inFlight int    // writes begun and not answered
	seq      uint64 // the number of the last one answered
}

// unrecordedFailure is a replica failure to report again: the slots of
// the I/Os the replica failed meanwhile.
type unrecordedFailure struct {
	epoch uint64
	uri   string
	slots []uint32
	cause error
	gen   int // grows with every failure added
}

// MirrorReporter is how a Mirror tells its controller what its replicas
// do.
type MirrorReporter interface {
	// ReplicaFailed reports that replica i (at uri) of membership epoch
	// failed an I/O of slots, because of cause. It returns once the
	// controller has recorded the failure durably and told every
	// holder, with the membership that follows.
	ReplicaFailed(epoch uint64, i int, uri string, slots []uint32, cause error) (protocol.Membership, error)
	// Intent records durably that slots are about to be written while
	// a replica of membership epoch is failed.
	Intent(epoch uint64, slots []uint32) error
}

// DefaultReplicaTimeout is how long a replica may take to answer an I/O
// before the mirror gives up on it and reports it failed. It stays well
// under an agent's lease (transport.DefaultLease), so that a host's I/O
// never waits as long as a fence.
const DefaultReplicaTimeout = 2 * time.Second

// ReplicaFailTimeout is the failure timeout (NBDOptions.FailTimeout) a
// holder gives the nbd:// replicas of its mirrors, for a replica timeout
// of timeout (0: DefaultReplicaTimeout): a quarter of it, at least
// 100 ms. A replica whose connection breaks (its node killed, its
// machine gone) then fails that soon rather than at the replica timeout,
// and the mirror goes on with the others; it catches up once back.
func ReplicaFailTimeout(timeout time.Duration) time.Duration {
	if timeout <= 0 {
		timeout = DefaultReplicaTimeout
	}
	return max(timeout/4, 100*time.Millisecond)
}

// mirrorView is a mirror's replicas at one membership epoch.
type mirrorView struct {
	mem     protocol.Membership
	members []Container // by replica index; nil unless healthy or rebuilding
	healthy []int       // the healthy replicas' indexes
	write   []int       // the healthy and rebuilding replicas' indexes
	closed  bool
}

var (
	_ Container = (*Mirror)(nil)
	_ Leaser    = (*Mirror)(nil)
	_ Allocator = (*Mirror)(nil)
	_ Aborter   = (*NBD)(nil)
)

// OpenMirror opens the mirrored container info describes: each healthy
// or rebuilding replica with open (by URI; failed ones are not opened),
// side by side. I/O failures are reported to rep; a replica I/O that
// takes longer than timeout (0: DefaultReplicaTimeout) is failed.
func OpenMirror(info protocol.Container, open func(uri string) (Container, error), rep MirrorReporter, timeout time.Duration) (*Mirror, error) {
	if !info.Mirrored() {
		return nil, fmt.Errorf("container %d: not mirrored", info.ID)
	}
	if timeout <= 0 {
		timeout = DefaultReplicaTimeout
	}
	m := &Mirror{id: info.ID, slotSize: int64(info.SlotSize), slots: int64(info.Slots), open: open, rep: rep, timeout: timeout}
	m.view.Store(&mirrorView{mem: protocol.Membership{Container: info.ID}, members: make([]Container, len(info.Replicas))})
	if err := m.SetMembership(info.Membership()); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// SetMembership makes the mirror follow mem, unless it already follows a
// newer one. Replicas that become healthy or rebuilding are opened;
// failed ones are closed (I/O on them in flight fails). I/O that starts
// after it returns writes every healthy and rebuilding replica of mem.
func (m *Mirror) SetMembership(mem protocol.Membership) error {
	unflushed, err := m.setMembership(mem)
	if err != nil || len(unflushed) == 0 {
		return err
	}
	// A replica failed that this holder wrote since its last flush:
	// those writes may be lost with its machine's write cache (a crash,
	// a reboot), so its catch-up must copy those slots too. Recorded
	// before the answer, and so before the I/O that met the failure is.
	for len(unflushed) > 0 {
		n := min(len(unflushed), protocol.MaxReadRange)
		if err := m.rep.Intent(mem.Epoch, unflushed[:n]); err != nil {
			return fmt.Errorf("container %d: record the slots not flushed on a failed replica: %w", m.id, err)
		}
		unflushed = unflushed[n:]
	}
	return nil
}

// setMembership is SetMembership but for the recording, whose slots it
// returns: the holder's unflushed slots if a replica failed.
func (m *Mirror) setMembership(mem protocol.Membership) (unflushed []uint32, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.view.Load()
	if old.closed {
		return nil, fmt.Errorf("container %d: %w", m.id, ErrClosed)
	}
	if mem.Epoch < old.mem.Epoch || (mem.Epoch == old.mem.Epoch && old.mem.Replicas != nil) {
		return nil, nil
	}
	if mem.Container != m.id || len(mem.Replicas) == 0 {
		return nil, fmt.Errorf("container %d: membership of container %d with %d replicas", m.id, mem.Container, len(mem.Replicas))
	}
	v := &mirrorView{mem: mem, members: make([]Container, len(mem.Replicas))}
	var (
		closing     []Container
		newlyFailed bool
	)
	for i, r := range mem.Replicas {
		var was Container
		if i < len(old.members) && old.mem.Replicas != nil && old.mem.Replicas[i].URI == r.URI {
			was = old.members[i]
		} else if i < len(old.members) && old.members[i] != nil {
			closing = append(closing, old.members[i])
		}
		if r.State == protocol.ReplicaFailed {
			if was != nil {
				closing = append(closing, was)
			}
			if i < len(old.mem.Replicas) && old.mem.Replicas[i].State != protocol.ReplicaFailed {
				newlyFailed = true
			}
			continue
		}
		if was != nil && m.mu.dead[was] {
			delete(m.mu.dead, was)
			was = nil
		}
		if was == nil {
			c, err := m.openReplica(r.URI)
			if err != nil {
				for _, c := range v.members {
					if c != nil && !slices.Contains(old.members, c) {
						c.Close()
					}
				}
				return nil, fmt.Errorf("container %d: replica %d (%s): %w", m.id, i, r.URI, err)
			}
			was = c
		}
		v.members[i] = was
		v.write = append(v.write, i)
		if r.State == protocol.ReplicaHealthy {
			v.healthy = append(v.healthy, i)
		}
	}
	for i := len(mem.Replicas); i < len(old.members); i++ {
		if old.members[i] != nil {
			closing = append(closing, old.members[i])
		}
	}
	if !mem.Degraded() {
		m.mu.noted = nil
	}
	m.view.Store(v)
	for _, c := range closing {
		abort(c)
	}
	if newlyFailed {
		for s := range m.mu.unflushed {
			unflushed = append(unflushed, uint32(s))
		}
		slices.Sort(unflushed)
	}
	return unflushed, nil
}

// abort releases replica c, which the mirror gave up on, failing its I/O
// in flight at once where it can: a replica whose node stopped answering
// would keep a Close waiting for answers, and the mirror's I/O, which
// waits for every replica's, with it.
func abort(c Container) {
	if a, ok := c.(Aborter); ok {
		_ = a.Abort() // the replica is given up: its errors are the I/O's
		return
	}
	c.Close()
}

// openReplica opens a replica and checks its geometry.
func (m *Mirror) openReplica(uri string) (Container, error) {
	c, err := m.open(uri)
	if err != nil {
		return nil, err
	}
	if c.ID() != m.id || c.SlotSize() != m.slotSize || c.Slots() < m.slots {
		c.Close()
		return nil, fmt.Errorf("%w: replica has id %d, slot size %d and %d slots; the mirror has id %d, slot size %d and %d slots",
			ErrWrongContainer, c.ID(), c.SlotSize(), c.Slots(), m.id, m.slotSize, m.slots)
	}
	return c, nil
}

// Membership returns the membership the mirror follows.
func (m *Mirror) Membership() protocol.Membership { return m.view.Load().mem }

// Replica returns replica i's container while it is healthy or
// rebuilding (nil otherwise), for rebuild and scrub: I/O on it is not
// mirrored.
func (m *Mirror) Replica(i int) Container {
	v := m.view.Load()
	if i < 0 || i >= len(v.members) {
		return nil
	}
	return v.members[i]
}

// ID implements Container.
func (m *Mirror) ID() uint32 { return m.id }

// SlotSize implements Container.
func (m *Mirror) SlotSize() int64 { return m.slotSize }

// Slots implements Container.
func (m *Mirror) Slots() int64 { return m.slots }

// Size implements Container.
func (m *Mirror) Size() int64 { return m.slots * m.slotSize }

// ReadAt implements Container: from the first healthy replica (see
// Mirror), and from the next if it fails.
func (m *Mirror) ReadAt(p []byte, off int64) (int, error) {
	if err := checkRange(m.id, "read", off, int64(len(p)), m.Size()); err != nil {
		return 0, err
	}
	if err := m.recordFailuresFirst(); err != nil {
		return 0, err
	}
	for {
		v := m.view.Load()
		if v.closed {
			return 0, fmt.Errorf("container %d: %w", m.id, ErrClosed)
		}
		if len(v.healthy) == 0 {
			return 0, fmt.Errorf("container %d: no healthy replica: %w", m.id, ErrUnreachable)
		}
		i := v.healthy[0]
		err := m.runOne(v, i, func(c Container) error { _, err := c.ReadAt(p, off); return err })
		if err == nil {
			return len(p), nil
		}
		if !replicaFault(err) {
			return 0, err
		}
		if err := m.fail(v, i, off, int64(len(p)), err); err != nil {
			return 0, err
		}
	}
}

// WriteAt implements Container: to every healthy and rebuilding replica.
func (m *Mirror) WriteAt(p []byte, off int64) (int, error) {
	if err := checkRange(m.id, "write", off, int64(len(p)), m.Size()); err != nil {
		return 0, err
	}
	err := m.update(off, int64(len(p)), func(c Container) error { _, err := c.WriteAt(p, off); return err })
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Punch implements Container: on every healthy and rebuilding replica.
func (m *Mirror) Punch(off, n int64) error {
	if err := checkRange(m.id, "punch", off, n, m.Size()); err != nil {
		return err
	}
	return m.update(off, n, func(c Container) error { return c.Punch(off, n) })
}

// Flush implements Container: on every healthy and rebuilding replica.
func (m *Mirror) Flush() error {
	m.mu.Lock()
	seq := m.mu.seq
	m.mu.Unlock()
	if err := m.update(0, 0, func(c Container) error { return c.Flush() }); err != nil {
		return err
	}
	// Every replica written holds the writes answered before the flush
	// began: those of failed ones were reported with their failure.
	m.mu.Lock()
	defer m.mu.Unlock()
	for s, u := range m.mu.unflushed {
		if u.inFlight == 0 && u.seq <= seq {
			delete(m.mu.unflushed, s)
		}
	}
	return nil
}

// writing notes that slots [off, off+n) are being written, and returns
// the func that notes the write answered.
func (m *Mirror) writing(off, n int64) func() {
	slots := m.slotsOf(off, n)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.unflushed == nil {
		m.mu.unflushed = make(map[int64]unflushedSlot)
	}
	for _, s := range slots {
		u := m.mu.unflushed[int64(s)]
		u.inFlight++
		m.mu.unflushed[int64(s)] = u
	}
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.mu.seq++
		for _, s := range slots {
			u := m.mu.unflushed[int64(s)]
			u.inFlight--
			u.seq = m.mu.seq
			m.mu.unflushed[int64(s)] = u
		}
	}
}

// order waits until no write or punch of this holder that overlaps
// [off, off+n) is on its way to the replicas, and returns the func that
// ends this one's turn (once every replica has answered it, and any
// failure is recorded). Two overlapping writes of one holder in flight at
// once could reach the replicas in different orders and leave them
// different; after each other, every replica holds the second. Writes
// that do not overlap go side by side.
func (m *Mirror) order(off, n int64) func() {
	s := &span{off: off, end: off + n, done: make(chan struct{})}
	for {
		var wait chan struct{}
		m.mu.Lock()
		for o := range m.mu.inFlight {
			if o.off < s.end && s.off < o.end {
				wait = o.done
				break
			}
		}
		if wait == nil {
			if m.mu.inFlight == nil {
				m.mu.inFlight = make(map[*span]struct{})
			}
			m.mu.inFlight[s] = struct{}{}
			m.mu.Unlock()
			return func() {
				m.mu.Lock()
				delete(m.mu.inFlight, s)
				m.mu.Unlock()
				close(s.done)
			}
		}
		m.mu.Unlock()
		<-wait
	}
}

// failedSlots returns the slots a replica that failed an I/O of [off,
// off+n) may miss: those of the I/O and every one not flushed since.
func (m *Mirror) failedSlots(off, n int64) []uint32 {
	slots := m.slotsOf(off, n)
	m.mu.Lock()
	defer m.mu.Unlock()
	for s := range m.mu.unflushed {
		if !slices.Contains(slots, uint32(s)) {
			slots = append(slots, uint32(s))
		}
	}
	slices.Sort(slots)
	return slots
}

// update runs op, a write, punch or flush of [off, off+n), on every
// healthy and rebuilding replica, and reports those that fail.
func (m *Mirror) update(off, n int64, op func(Container) error) error {
	if n > 0 {
		// First: the view taken below is then the one the writes
		// before it left.
		defer m.order(off, n)()
	}
	if err := m.recordFailuresFirst(); err != nil {
		return err
	}
	v := m.view.Load()
	if v.closed {
		return fmt.Errorf("container %d: %w", m.id, ErrClosed)
	}
	if n > 0 && v.mem.Degraded() {
		if err := m.intend(v, off, n); err != nil {
			return err
		}
	}
	if len(v.healthy) == 0 {
		return fmt.Errorf("container %d: no healthy replica: %w", m.id, ErrUnreachable)
	}
	if n > 0 {
		defer m.writing(off, n)()
	}
	errs := m.runAll(v, op)
	var (
		ok    bool
		first error
	)
	for k, i := range v.write {
		err := errs[k]
		switch {
		case err == nil:
			ok = ok || v.mem.Replicas[i].State == protocol.ReplicaHealthy
			continue
		case !replicaFault(err):
			return err
		}
		if first == nil {
			first = err
		}
		if ferr := m.fail(v, i, off, n, err); ferr != nil {
			return ferr
		}
	}
	if !ok {
		return fmt.Errorf("container %d: every healthy replica failed: %w", m.id, first)
	}
	return nil
}

// replicaFault reports whether err, from a replica, means the replica
// failed, rather than the request being refused as a whole: a lease
// that ran out refuses it on every replica alike, and the holder does it
// again once renewed.
func replicaFault(err error) bool {
	return !errors.Is(err, ErrLeaseOver) && !errors.Is(err, ErrOutOfRange)
}

// fail reports that replica i of v failed an I/O of [off, off+n) and
// follows the membership the controller answers with.
func (m *Mirror) fail(v *mirrorView, i int, off, n int64, cause error) error {
	if m.view.Load().closed {
		return fmt.Errorf("container %d: %w", m.id, ErrClosed)
	}
	uri, slots := v.mem.Replicas[i].URI, m.failedSlots(off, n)
	mem, err := m.rep.ReplicaFailed(v.mem.Epoch, i, uri, slots, cause)
	if err != nil {
		m.keepUnrecorded(v.mem.Epoch, i, uri, slots, cause)
		return fmt.Errorf("container %d: replica %d failed (%w) and the failure could not be recorded: %w", m.id, i, cause, err)
	}
	if _, err := m.setMembership(mem); err != nil { // its slots were reported
		return err
	}
	if nv := m.view.Load(); nv.mem.Epoch == v.mem.Epoch {
		// The controller kept the replica (the last healthy one:
		// the container fails instead). Once back, it must be open.
		m.revive(i)
		return fmt.Errorf("container %d: replica %d: %w", m.id, i, cause)
	}
	return nil
}

// keepUnrecorded keeps the failure of replica i (at uri) in I/O of slots,
// which the controller could not be told of, to report again.
func (m *Mirror) keepUnrecorded(epoch uint64, i int, uri string, slots []uint32, cause error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.unrecorded == nil {
		m.mu.unrecorded = make(map[int]*unrecordedFailure)
	}
	u := m.mu.unrecorded[i]
	if u == nil || u.uri != uri {
		u = &unrecordedFailure{uri: uri}
		m.mu.unrecorded[i] = u
	}
	u.epoch = max(u.epoch, epoch)
	for _, s := range slots {
		if !slices.Contains(u.slots, s) {
			u.slots = append(u.slots, s)
		}
	}
	u.cause = cause
	u.gen++
	m.unrecorded.Store(true)
}

// recordFailuresFirst reports the failures not yet recorded, if any,
// before an I/O goes on.
func (m *Mirror) recordFailuresFirst() error {
	if !m.unrecorded.Load() {
		return nil
	}
	return m.RecordFailures()
}

// RecordFailures reports again to the controller every replica failure
// whose report did not reach it, and follows the membership it answers
// with. Until it succeeds, every I/O of the mirror first tries it and
// fails if it fails: a replica that failed a write may miss it, and must
// be recorded failed before anyone reads it, or writes as if the
// replicas were alike.
func (m *Mirror) RecordFailures() error {
	m.mu.Lock()
	type pending struct {
		i   int
		u   unrecordedFailure
		gen int
	}
	var todo []pending
	for i, u := range m.mu.unrecorded {
		todo = append(todo, pending{i: i, u: *u, gen: u.gen})
	}
	m.mu.Unlock()
	for _, p := range todo {
		mem, err := m.rep.ReplicaFailed(p.u.epoch, p.i, p.u.uri, slices.Clone(p.u.slots), p.u.cause)
		if err != nil {
			return fmt.Errorf("container %d: replica %d failed (%w) and the failure could not be recorded: %w", m.id, p.i, p.u.cause, err)
		}
		if _, err := m.setMembership(mem); err != nil { // its slots were reported
			return err
		}
		m.mu.Lock()
		// A failure added meanwhile stays, to be reported too.
		if u := m.mu.unrecorded[p.i]; u != nil && u.gen == p.gen {
			delete(m.mu.unrecorded, p.i)
		}
		m.unrecorded.Store(len(m.mu.unrecorded) > 0)
		m.mu.Unlock()
	}
	return nil
}

// slotsOf returns the slots [off, off+n) touches.
func (m *Mirror) slotsOf(off, n int64) []uint32 {
	if n <= 0 {
		return nil
	}
	var out []uint32
	for s := off / m.slotSize; s <= (off+n-1)/m.slotSize; s++ {
		out = append(out, uint32(s))
	}
	return out
}

// intend records the slots of [off, off+n) that were not yet recorded
// while the mirror is degraded.
func (m *Mirror) intend(v *mirrorView, off, n int64) error {
	var need []uint32
	m.mu.Lock()
	for _, s := range m.slotsOf(off, n) {
		if !m.mu.noted[int64(s)] {
			need = append(need, s)
		}
	}
	m.mu.Unlock()
	if len(need) == 0 {
		return nil
	}
	if err := m.rep.Intent(v.mem.Epoch, need); err != nil {
		return fmt.Errorf("container %d: record the slots written while degraded: %w", m.id, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.view.Load().mem.Degraded() {
		if m.mu.noted == nil {
			m.mu.noted = make(map[int64]bool)
		}
		for _, s := range need {
			m.mu.noted[int64(s)] = true
		}
	}
	return nil
}

// runOne runs op on replica i, failing it with a timeout error if it
// takes longer than the mirror's timeout.
func (m *Mirror) runOne(v *mirrorView, i int, op func(Container) error) error {
	return m.run(v.members, []int{i}, op)[0]
}

// runAll runs op on every replica of v.write side by side.
func (m *Mirror) runAll(v *mirrorView, op func(Container) error) []error {
	return m.run(v.members, v.write, op)
}

// run runs op on members[i] for every i of idx side by side and returns
// their errors in that order. A replica that has not answered within the
// timeout is aborted, which ends its I/O with an error at once; run
// returns only once every op has returned, so the caller's buffer is
// never used after.
func (m *Mirror) run(members []Container, idx []int, op func(Container) error) []error {
	errs := make([]error, len(idx))
	done := make([]atomic.Bool, len(idx))
	var fired atomic.Bool
	t := time.AfterFunc(m.timeout, func() {
		fired.Store(true)
		for k, i := range idx {
			if !done[k].Load() {
				m.kill(members[i])
			}
		}
	})
	var wg sync.WaitGroup
	for k := 1; k < len(idx); k++ {
		wg.Go(func() {
			errs[k] = op(members[idx[k]])
			done[k].Store(true)
		})
	}
	errs[0] = op(members[idx[0]])
	done[0].Store(true)
	wg.Wait()
	if !t.Stop() || fired.Load() {
		for k := range idx {
			if errs[k] != nil && errors.Is(errs[k], ErrClosed) {
				errs[k] = fmt.Errorf("no answer within %v: %w", m.timeout, ErrUnreachable)
			}
		}
	}
	return errs
}

// kill closes replica container c, which did not answer in time, so that
// the I/O on it ends, and notes it dead.
func (m *Mirror) kill(c Container) {
	m.mu.Lock()
	if m.mu.dead == nil {
		m.mu.dead = make(map[Container]bool)
	}
	m.mu.dead[c] = true
	m.mu.Unlock()
	abort(c)
}

// revive opens replica i again, in the background, if the container
// the view has for it is dead (closed for not answering in time) and the
// controller kept it: otherwise every later I/O on it would fail.
func (m *Mirror) revive(i int) {
	v := m.view.Load()
	if i >= len(v.members) || v.members[i] == nil {
		return
	}
	dead := v.members[i]
	uri := v.mem.Replicas[i].URI
	m.mu.Lock()
	if !m.mu.dead[dead] {
		m.mu.Unlock()
		return
	}
	delete(m.mu.dead, dead) // one reopen at a time
	m.mu.Unlock()
	go func() {
		c, err := m.openReplica(uri)
		if err != nil {
			m.mu.Lock()
			m.mu.dead[dead] = true // tried again at the next failure
			m.mu.Unlock()
			return
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		v := m.view.Load()
		if v.closed || i >= len(v.members) || v.members[i] != dead {
			c.Close()
			return
		}
		nv := *v
		nv.members = slices.Clone(v.members)
		nv.members[i] = c
		m.view.Store(&nv)
	}()
}

// RenewLease implements Leaser for the replicas that have a lease.
func (m *Mirror) RenewLease() {
	for _, c := range m.view.Load().members {
		if l, ok := c.(Leaser); ok {
			l.RenewLease()
		}
	}
}

// Allocated implements Allocator: a healthy replica's allocation, times
// the replicas (every healthy one holds the same slots).
func (m *Mirror) Allocated() (int64, error) {
	v := m.view.Load()
	if v.closed {
		return 0, fmt.Errorf("container %d: %w", m.id, ErrClosed)
	}
	for _, i := range v.healthy {
		if a, ok := v.members[i].(Allocator); ok {
			n, err := a.Allocated()
			if err == nil {
				return n * int64(len(v.mem.Replicas)), nil
			}
		}
	}
	return 0, fmt.Errorf("container %d: %w", m.id, ErrAllocationUnknown)
}

// Close implements Container: it closes every open replica.
func (m *Mirror) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.view.Load()
	if v.closed {
		return fmt.Errorf("container %d: %w", m.id, ErrClosed)
	}
	m.view.Store(&mirrorView{mem: v.mem, members: make([]Container, len(v.members)), closed: true})
	var errs []error
	for _, c := range v.members {
		if c != nil {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}
