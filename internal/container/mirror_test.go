package container_test

import (
	"bytes"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/container"
	"segmap/internal/container/containertest"
	"segmap/internal/rpc/protocol"
)

// flaky is a replica whose I/O fails, or hangs until it is closed, on
// demand.
type flaky struct {
	*container.Memory
	fail   atomic.Bool
	hang   atomic.Bool
	closed chan struct{}
	once   sync.Once
}

var errBroken = errors.New("replica broken")

func newFlaky(id uint32, slotSize, slots int64) *flaky {
	return &flaky{Memory: container.NewMemory(id, slotSize, slots), closed: make(chan struct{})}
}

func (f *flaky) check() error {
	if f.hang.Load() {
		<-f.closed
		return container.ErrClosed
	}
	if f.fail.Load() {
		return errBroken
	}
	return nil
}

func (f *flaky) ReadAt(p []byte, off int64) (int, error) {
	if err := f.check(); err != nil {
		return 0, err
	}
	return f.Memory.ReadAt(p, off)
}

func (f *flaky) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check(); err != nil {
		return 0, err
	}
	return f.Memory.WriteAt(p, off)
}

func (f *flaky) Flush() error {
	if err := f.check(); err != nil {
		return err
	}
	return f.Memory.Flush()
}

// Close leaves the data readable by the test.
func (f *flaky) Close() error {
	f.once.Do(func() { close(f.closed) })
	return nil
}

// reporter plays the controller for a mirror: it fails a replica unless
// it is the last healthy one, and records intents.
type reporter struct {
	// down makes every report fail, as with a controller that is
	// restarting.
	down    atomic.Bool
	mu      sync.Mutex
	mem     protocol.Membership
	intents []uint32
	reports int
}

var errDown = errors.New("controller down")

func (r *reporter) ReplicaFailed(epoch uint64, i int, uri string, slots []uint32, cause error) (protocol.Membership, error) {
	if r.down.Load() {
		return protocol.Membership{}, errDown
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reports++
	r.intents = append(r.intents, slots...)
	healthy := 0
	for _, x := range r.mem.Replicas {
		if x.State == protocol.ReplicaHealthy {
			healthy++
		}
	}
	if r.mem.Replicas[i].State == protocol.ReplicaFailed || (healthy == 1 && r.mem.Replicas[i].State == protocol.ReplicaHealthy) {
		return r.membership(), nil
	}
	r.mem.Replicas = slices.Clone(r.mem.Replicas)
	r.mem.Replicas[i].State = protocol.ReplicaFailed
	r.mem.Epoch++
	return r.membership(), nil
}

func (r *reporter) Intent(epoch uint64, slots []uint32) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.intents = append(r.intents, slots...)
	return nil
}

func (r *reporter) membership() protocol.Membership {
	m := r.mem
	m.Replicas = slices.Clone(m.Replicas)
	return m
}

const (
	mirrorSlot  = 64 << 10
	mirrorSlots = 16
)

// newMirror returns a mirror of n flaky replicas, all healthy.
func newMirror(t *testing.T, n int, timeout time.Duration) (*container.Mirror, []*flaky, *reporter) {
	t.Helper()
	reps := make([]*flaky, n)
	info := protocol.Container{ID: 7, SlotSize: mirrorSlot, Slots: mirrorSlots, Epoch: 1}
	byURI := map[string]*flaky{}
	for i := range reps {
		reps[i] = newFlaky(7, mirrorSlot, mirrorSlots)
		uri := string(rune('a' + i))
		byURI[uri] = reps[i]
		info.Replicas = append(info.Replicas, protocol.Replica{URI: uri})
	}
	rep := &reporter{mem: info.Membership()}
	m, err := container.OpenMirror(info, func(uri string) (container.Container, error) { return byURI[uri], nil }, rep, timeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, reps, rep
}

func TestMirrorConformance(t *testing.T) {
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		const id = 3
		info := protocol.Container{ID: id, SlotSize: uint64(slotSize), Slots: uint64(slots), Epoch: 1,
			Replicas: []protocol.Replica{{URI: "a"}, {URI: "b"}}}
		m, err := container.OpenMirror(info, func(string) (container.Container, error) {
			return container.NewMemory(id, slotSize, slots), nil
		}, &reporter{mem: info.Membership()}, 0)
		if err != nil {
			t.Fatal(err)
		}
		return m
	})
}

func TestMirrorWritesEveryReplica(t *testing.T) {
	m, reps, _ := newMirror(t, 3, time.Second)
	data := bytes.Repeat([]byte{0xa5}, 8192)
	if _, err := m.WriteAt(data, mirrorSlot+100); err != nil {
		t.Fatal(err)
	}
	for i, r := range reps {
		got := make([]byte, len(data))
		r.Memory.ReadAt(got, mirrorSlot+100)
		if !bytes.Equal(got, data) {
			t.Fatalf("replica %d misses the write", i)
		}
	}
	got := make([]byte, len(data))
	for range 6 {
		if _, err := m.ReadAt(got, mirrorSlot+100); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read: %v", err)
		}
	}
}

func TestMirrorFailsReplica(t *testing.T) {
	m, reps, rep := newMirror(t, 2, time.Second)
	reps[1].fail.Store(true)
	data := bytes.Repeat([]byte{1}, 4096)
	if _, err := m.WriteAt(data, 3*mirrorSlot); err != nil {
		t.Fatalf("write with one replica broken: %v", err)
	}
	mem := m.Membership()
	if mem.Epoch != 2 || mem.Replicas[1].State != protocol.ReplicaFailed {
		t.Fatalf("membership after the failure: %+v", mem)
	}
	if !slices.Equal(rep.intents, []uint32{3}) {
		t.Fatalf("slots recorded with the failure: %v, want [3]", rep.intents)
	}
	// Degraded: a write's slot is recorded once, before it is issued.
	reps[1].fail.Store(false)
	for range 2 {
		if _, err := m.WriteAt(data, 5*mirrorSlot+mirrorSlot-10); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(rep.intents, []uint32{3, 5, 6}) {
		t.Fatalf("slots recorded: %v, want [3 5 6]", rep.intents)
	}
	got := make([]byte, 4096)
	reps[1].Memory.ReadAt(got, 5*mirrorSlot)
	if !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("a failed replica was written")
	}
	for range 4 {
		if _, err := m.ReadAt(got, 3*mirrorSlot); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read from the healthy replica: %v", err)
		}
	}
	// The last healthy replica failing fails the I/O.
	reps[0].fail.Store(true)
	if _, err := m.WriteAt(data, 0); err == nil {
		t.Fatal("a write succeeded with no replica left")
	}
	if _, err := m.ReadAt(got, 0); err == nil {
		t.Fatal("a read succeeded with no replica left")
	}
}

// Two writes of one block in flight at once may reach the replicas in
// different orders, leaving them different there: every read must still
// read the block from one replica, not from one and then the other.
func TestMirrorReadsFirstHealthyReplica(t *testing.T) {
	m, reps, _ := newMirror(t, 3, time.Second)
	for i, r := range reps {
		if _, err := r.Memory.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 4096), 0); err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 4096)
	for range 6 {
		if _, err := m.ReadAt(got, 0); err != nil || got[0] != 1 {
			t.Fatalf("read: %v, bytes of replica %d, want replica 0's", err, got[0]-1)
		}
	}
	// Once it fails, the next one is read, and only it.
	reps[0].fail.Store(true)
	for range 6 {
		if _, err := m.ReadAt(got, 0); err != nil || got[0] != 2 {
			t.Fatalf("read with replica 0 failed: %v, bytes of replica %d, want replica 1's", err, got[0]-1)
		}
	}
	// Every slot is read from the first healthy replica: slot 1 too.
	for i, r := range reps {
		if _, err := r.Memory.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 4096), mirrorSlot); err != nil {
			t.Fatal(err)
		}
	}
	for range 6 {
		if _, err := m.ReadAt(got, mirrorSlot); err != nil || got[0] != 2 {
			t.Fatalf("read of slot 1: %v, bytes of replica %d, want replica 1's", err, got[0]-1)
		}
	}
}

// gated is a replica whose writes of a marked buffer (first byte 0xee)
// wait until release is closed; it counts the writes begun.
type gated struct {
	*container.Memory
	release chan struct{}
	begun   atomic.Int32
}

func (g *gated) WriteAt(p []byte, off int64) (int, error) {
	g.begun.Add(1)
	if len(p) > 0 && p[0] == 0xee {
		<-g.release
	}
	return g.Memory.WriteAt(p, off)
}

// One holder's overlapping writes reach the replicas one after the
// other: the second is not sent to any replica before every replica has
// answered the first, so that both hold the second at the end, whatever
// order the replicas would have taken them in. A write that overlaps
// neither goes on meanwhile.
func TestMirrorOrdersOverlappingWrites(t *testing.T) {
	slow := &gated{Memory: container.NewMemory(7, mirrorSlot, mirrorSlots), release: make(chan struct{})}
	fast := container.NewMemory(7, mirrorSlot, mirrorSlots)
	info := protocol.Container{ID: 7, SlotSize: mirrorSlot, Slots: mirrorSlots, Epoch: 1,
		Replicas: []protocol.Replica{{URI: "a"}, {URI: "b"}}}
	byURI := map[string]container.Container{"a": fast, "b": slow}
	m, err := container.OpenMirror(info, func(uri string) (container.Container, error) { return byURI[uri], nil }, &reporter{mem: info.Membership()}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	first := bytes.Repeat([]byte{0xee}, 8192)
	second := bytes.Repeat([]byte{0x22}, 4096)
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := m.WriteAt(first, 0); err != nil {
			t.Errorf("first write: %v", err)
		}
	})
	// The first write is held by the slow replica.
	for slow.begun.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	// A write elsewhere is not held up.
	if _, err := m.WriteAt(second, 16384); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := m.WriteAt(second, 4096) // overlaps the first
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("an overlapping write was answered while the first was in flight: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if n := slow.begun.Load(); n != 2 {
		t.Fatalf("the slow replica was sent %d writes while the first was held, want 2 (the first and the one elsewhere)", n)
	}
	close(slow.release)
	wg.Wait()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]container.Container{"fast": fast, "slow": slow.Memory} {
		got := make([]byte, 4096)
		if _, err := r.ReadAt(got, 4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, second) {
			t.Errorf("replica %s holds %#x at 4096, want the second write's %#x", name, got[0], second[0])
		}
	}
}

// A replica failure the controller could not record is reported again
// before any later I/O: a write that failed on one replica landed on
// the other, and no read may see the replicas differ meanwhile.
func TestMirrorRecordsFailureAgain(t *testing.T) {
	m, reps, rep := newMirror(t, 2, time.Second)
	rep.down.Store(true)
	reps[1].fail.Store(true)
	data := bytes.Repeat([]byte{7}, 4096)
	if _, err := m.WriteAt(data, 2*mirrorSlot); !errors.Is(err, errDown) {
		t.Fatalf("write with a failure not recorded: %v, want the report's error", err)
	}
	if m.Membership().Replicas[1].State != protocol.ReplicaHealthy {
		t.Fatalf("membership changed with no controller: %+v", m.Membership())
	}
	// The storage comes back, the controller does not yet: replica 1
	// misses the write, and is read by no one.
	reps[1].fail.Store(false)
	got := make([]byte, len(data))
	for range 4 {
		if _, err := m.ReadAt(got, 2*mirrorSlot); !errors.Is(err, errDown) {
			t.Fatalf("read with a failure not recorded: %v", err)
		}
	}
	rep.down.Store(false)
	for range 4 {
		if _, err := m.ReadAt(got, 2*mirrorSlot); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read once the controller is back: %v (data equal %v)", err, bytes.Equal(got, data))
		}
	}
	if mem := m.Membership(); mem.Replicas[1].State != protocol.ReplicaFailed {
		t.Fatalf("replica not failed once reported again: %+v", mem)
	}
	if !slices.Contains(rep.intents, 2) {
		t.Fatalf("slots recorded: %v, want slot 2", rep.intents)
	}
	if err := m.RecordFailures(); err != nil || rep.reports != 1 {
		t.Fatalf("record failures again: %v, %d reports, want 1", err, rep.reports)
	}
}

// A replica that fails may have lost the writes it had not flushed: its
// failure is reported with their slots too, so that its catch-up copies
// them, but not with those flushed since.
func TestMirrorReportsUnflushedSlots(t *testing.T) {
	m, reps, rep := newMirror(t, 2, time.Second)
	data := bytes.Repeat([]byte{3}, 4096)
	if _, err := m.WriteAt(data, 1*mirrorSlot); err != nil {
		t.Fatal(err)
	}
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt(data, 4*mirrorSlot); err != nil {
		t.Fatal(err)
	}
	if err := m.Punch(9*mirrorSlot, mirrorSlot); err != nil {
		t.Fatal(err)
	}
	reps[1].fail.Store(true)
	if _, err := m.WriteAt(data, 6*mirrorSlot); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.intents, []uint32{4, 6, 9}) {
		t.Fatalf("slots reported with the failure: %v, want [4 6 9]", rep.intents)
	}
}

func TestMirrorTimesOutHungReplica(t *testing.T) {
	m, reps, rep := newMirror(t, 2, 100*time.Millisecond)
	reps[0].hang.Store(true)
	start := time.Now()
	if _, err := m.WriteAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("write took %v with a hung replica", el)
	}
	if m.Membership().Replicas[0].State != protocol.ReplicaFailed || rep.reports == 0 {
		t.Fatalf("hung replica not failed: %+v", m.Membership())
	}
}

func TestMirrorRebuildingIsWrittenNotRead(t *testing.T) {
	m, reps, _ := newMirror(t, 2, time.Second)
	mem := m.Membership()
	mem.Epoch++
	mem.Replicas[1].State = protocol.ReplicaRebuilding
	if err := m.SetMembership(mem); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{9}, 512)
	if _, err := m.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 512)
	reps[1].Memory.ReadAt(got, 0)
	if !bytes.Equal(got, data) {
		t.Fatal("rebuilding replica not written")
	}
	reps[1].fail.Store(true) // a read of it would fail
	for range 4 {
		if _, err := m.ReadAt(got, 0); err != nil {
			t.Fatalf("read went to the rebuilding replica: %v", err)
		}
	}
	// An older membership is ignored.
	old := mem
	old.Epoch--
	if err := m.SetMembership(old); err != nil || m.Membership().Epoch != mem.Epoch {
		t.Fatalf("older membership applied: %v", err)
	}
}

// TestMirrorRevivesKeptReplica checks that a replica closed for not
// answering in time, which the controller keeps (the last healthy one),
// is opened again: once its storage answers, I/O works again.
func TestMirrorRevivesKeptReplica(t *testing.T) {
	m, reps, _ := newMirror(t, 2, 100*time.Millisecond)
	reps[1].fail.Store(true)
	if _, err := m.WriteAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	reps[0].hang.Store(true)
	if _, err := m.WriteAt(make([]byte, 512), 0); err == nil {
		t.Fatal("a write succeeded with its last replica hung")
	}
	reps[0].hang.Store(false)
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := m.WriteAt(make([]byte, 512), 0)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the kept replica was not opened again: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMirrorRecordsUnflushedOnToldFailure checks that a holder told of
// a replica's failure by the controller (it met none itself) records
// the slots it wrote since its last flush: the failed replica's machine
// may lose them with its write cache.
func TestMirrorRecordsUnflushedOnToldFailure(t *testing.T) {
	m, _, rep := newMirror(t, 2, time.Second)
	if _, err := m.WriteAt(make([]byte, 512), 3*mirrorSlot); err != nil {
		t.Fatal(err)
	}
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt(make([]byte, 512), 5*mirrorSlot); err != nil {
		t.Fatal(err)
	}
	mem := m.Membership()
	mem.Epoch++
	mem.Replicas = slices.Clone(mem.Replicas)
	mem.Replicas[1].State = protocol.ReplicaFailed
	if err := m.SetMembership(mem); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.intents, []uint32{5}) {
		t.Fatalf("slots recorded when told of the failure: %v, want [5] (3 was flushed)", rep.intents)
	}
}
