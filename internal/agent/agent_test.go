package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/container"
	"segmap/internal/leaktest"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// The geometry of the disk every test here serves.
const (
	tSeg   = 64 << 10
	tSegs  = 8
	tSlots = 16
	tDisk  = protocol.DiskID(7)
)

// Timeouts: how long a call that must not return is watched, and how long
// one that must return is waited for.
const (
	stillBlocked = 100 * time.Millisecond
	mustFinish   = 5 * time.Second
)

// checkGoroutines fails t if, after its cleanups, goroutines it started
// are still running a second later. Call it first, so its cleanup runs
// last.
func checkGoroutines(t *testing.T) {
	t.Helper()
	leaktest.Check(t, leaktest.Within(time.Second))
}

// gateContainer is a container whose writes can be held: while hold is
// set, each WriteAt sends a fresh channel on entered and waits until that
// channel is closed (or stop is) before it writes.
type gateContainer struct {
	container.Container
	hold    atomic.Bool
	entered chan chan struct{}
	stop    chan struct{}
}

func (g *gateContainer) WriteAt(p []byte, off int64) (int, error) {
	if g.hold.Load() {
		rel := make(chan struct{})
		select {
		case g.entered <- rel:
			select {
			case <-rel:
			case <-g.stop:
			}
		case <-g.stop:
		}
	}
	return g.Container.WriteAt(p, off)
}

// fakeCtrl is a protocol.Controller that serves one disk and one container
// and answers faults with fn. Without fn, a fault maps segment i writable
// at slot i.
type fakeCtrl struct {
	disk protocol.Disk
	cont protocol.Container

	mu struct {
		sync.Mutex
		fn     func(ctx context.Context, f protocol.Fault) (protocol.Reply, error)
		faults []protocol.Fault
	}
}

func (c *fakeCtrl) Attach(ctx context.Context, name string, a protocol.Agent, open []protocol.DiskID) error {
	return nil
}
func (c *fakeCtrl) Detach(ctx context.Context, name string) error { return nil }
func (c *fakeCtrl) Exports(ctx context.Context, agent string) ([]protocol.Disk, error) {
	return []protocol.Disk{c.disk}, nil
}
func (c *fakeCtrl) Open(ctx context.Context, agent, disk string) (protocol.Disk, error) {
	if disk != c.disk.Name {
		return protocol.Disk{}, fmt.Errorf("%q: %w", disk, protocol.ErrNotFound)
	}
	return c.disk, nil
}
func (c *fakeCtrl) CloseDisk(ctx context.Context, agent string, disk protocol.DiskID) error {
	return nil
}
func (c *fakeCtrl) Containers(ctx context.Context) ([]protocol.Container, error) {
	return []protocol.Container{c.cont}, nil
}

func (c *fakeCtrl) Fault(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
	c.mu.Lock()
	c.mu.faults = append(c.mu.faults, f)
	fn := c.mu.fn
	c.mu.Unlock()
	if fn != nil {
		return fn(ctx, f)
	}
	return identity(f), nil
}

// identity maps the faulting segment writable at the slot of the same number.
func identity(f protocol.Fault) protocol.Reply {
	return protocol.Reply{First: f.Segment, Entries: []table.Entry{table.At(table.Location{Container: 1, Slot: uint32(f.Segment)}, false)}}
}

func (c *fakeCtrl) setFault(fn func(ctx context.Context, f protocol.Fault) (protocol.Reply, error)) {
	c.mu.Lock()
	c.mu.fn = fn
	c.mu.Unlock()
}

func (c *fakeCtrl) faults() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.mu.faults)
}

var _ protocol.Controller = (*fakeCtrl)(nil)

// env is an agent serving one disk of tSegs segments from a memory
// container behind a gate.
type env struct {
	t    *testing.T
	ctx  context.Context
	fc   *fakeCtrl
	mem  *container.Memory
	gate *gateContainer
	a    *Agent
	d    *Disk
}

func newEnv(t *testing.T) *env {
	t.Helper()
	var gate *gateContainer
	e := newEnvOver(t, func(mem *container.Memory) (container.Container, func()) {
		gate = &gateContainer{Container: mem, entered: make(chan chan struct{}), stop: make(chan struct{})}
		return gate, func() { close(gate.stop) }
	})
	e.gate = gate
	return e
}

// newEnvOver is newEnv with the agent's one container made by wrap over
// the memory container; stop, called at cleanup before the agent closes,
// releases whatever the wrapper holds.
func newEnvOver(t *testing.T, wrap func(mem *container.Memory) (c container.Container, stop func())) *env {
	t.Helper()
	checkGoroutines(t)
	ctx := context.Background()
	mem := container.NewMemory(1, tSeg, tSlots)
	c, stop := wrap(mem)
	fc := &fakeCtrl{
		disk: protocol.Disk{ID: tDisk, Name: "d", Size: tSegs * tSeg, SegmentSize: tSeg},
		cont: protocol.Container{ID: 1, URI: "mem:1", SlotSize: tSeg, Slots: tSlots},
	}
	a := New(Config{Name: "host", Controller: fc, OpenContainer: func(info protocol.Container) (container.Container, error) {
		if info.ID != 1 {
			return nil, fmt.Errorf("container %d: %w", info.ID, container.ErrNotContainer)
		}
		return c, nil
	}})
	if err := a.Attach(ctx, fc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stop()
		if err := a.Close(); err != nil {
			t.Errorf("close agent: %v", err)
		}
	})
	d, err := a.Open(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, ctx: ctx, fc: fc, mem: mem, a: a, d: d}
}

// mapAll maps every segment i writable at slot i.
func (e *env) mapAll() {
	e.t.Helper()
	es := make([]table.Entry, tSegs)
	for i := range es {
		es[i] = table.At(table.Location{Container: 1, Slot: uint32(i)}, false)
	}
	if err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, Entries: es}); err != nil {
		e.t.Fatal(err)
	}
}

// entered waits for a held write to reach the container and returns its
// release channel.
func (e *env) entered() chan struct{} {
	e.t.Helper()
	select {
	case rel := <-e.gate.entered:
		return rel
	case <-time.After(mustFinish):
		e.t.Fatal("no write reached the container")
		return nil
	}
}

// slot returns n bytes of slot s at off, read straight from the container.
func (e *env) slot(s, off, n int) []byte {
	e.t.Helper()
	p := make([]byte, n)
	if _, err := e.mem.ReadAt(p, int64(s*tSeg+off)); err != nil {
		e.t.Fatal(err)
	}
	return p
}

func (e *env) entry(seg uint64) table.Entry {
	e.t.Helper()
	es, err := e.a.GetEntry(e.ctx, tDisk, seg, 1)
	if err != nil {
		e.t.Fatal(err)
	}
	return es[0]
}

// async runs fn in a goroutine and returns where its result arrives. The
// test must receive it (await) so the goroutine is not leaked.
func async(fn func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	return ch
}

// await returns fn's result, failing t if it takes longer than mustFinish.
func await(t *testing.T, ch <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(mustFinish):
		t.Fatalf("%s did not return", what)
		return nil
	}
}

// blocked fails t if ch delivers within stillBlocked.
func blocked(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s returned (%v) while it should wait", what, err)
	case <-time.After(stillBlocked):
	}
}

func bytesOf(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i%251) | 1
	}
	return p
}

func TestBlockingCommandWaitsForWrite(t *testing.T) {
	for _, tc := range []struct {
		name string
		cmd  func(e *env, blocking bool) error
	}{
		{"set_entry_state", func(e *env, blocking bool) error {
			return e.a.SetEntryState(e.ctx, protocol.SetEntryState{Disk: tDisk, First: 0, Count: tSegs, State: table.NoWrite, On: true, Blocking: blocking})
		}},
		{"set_entry", func(e *env, blocking bool) error {
			return e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: 0, Entries: []table.Entry{table.At(table.Location{Container: 1, Slot: 9}, true)}, Blocking: blocking})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.mapAll()
			e.gate.hold.Store(true)
			data := bytesOf(4096, 1)
			w := async(func() error { return e.d.WriteAt(e.ctx, data, 100, false) })
			rel := e.entered()

			// Not Blocking: answered at once, the write still held.
			if err := await(t, async(func() error { return tc.cmd(e, false) }), "non-blocking command"); err != nil {
				t.Fatalf("non-blocking command: %v", err)
			}
			// Blocking: answered only once the write has finished.
			b := async(func() error { return tc.cmd(e, true) })
			blocked(t, b, "blocking command")
			blocked(t, w, "held write")
			close(rel)
			if err := await(t, b, "blocking command"); err != nil {
				t.Fatalf("blocking command: %v", err)
			}
			// The write had reached storage before the command answered.
			if got := e.slot(0, 100, len(data)); !bytes.Equal(got, data) {
				t.Errorf("blocking command answered before the write landed")
			}
			if err := await(t, w, "write"); err != nil {
				t.Fatalf("write: %v", err)
			}
			if e0 := e.entry(0); !e0.Is(table.NoWrite) {
				t.Errorf("entry 0 after the commands: %v, want NoWrite", e0)
			}
		})
	}
}

// TestBlockingCommandIgnoresLaterIO checks that a Blocking command waits
// only for I/O that passed the table before it, not for I/O that started
// after it.
func TestBlockingCommandIgnoresLaterIO(t *testing.T) {
	e := newEnv(t)
	e.mapAll()
	e.gate.hold.Store(true)
	w1 := async(func() error { return e.d.WriteAt(e.ctx, bytesOf(10, 2), 0, false) })
	rel1 := e.entered()
	b := async(func() error {
		return e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: 5, Entries: []table.Entry{table.At(table.Location{Container: 1, Slot: 12}, false)}, Blocking: true})
	})
	blocked(t, b, "blocking command")
	w2 := async(func() error { return e.d.WriteAt(e.ctx, bytesOf(10, 3), tSeg, false) })
	rel2 := e.entered()
	// A later command ends the epoch w2 started in; the first command
	// still must not wait for w2.
	if err := e.a.SetEntryState(e.ctx, protocol.SetEntryState{Disk: tDisk, First: 6, Count: 1, State: table.NoWrite, On: true}); err != nil {
		t.Fatal(err)
	}
	close(rel1)
	if err := await(t, b, "blocking command"); err != nil {
		t.Fatal(err)
	}
	blocked(t, w2, "later write")
	close(rel2)
	for _, w := range []<-chan error{w1, w2} {
		if err := await(t, w, "write"); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFaultDoesNotHoldCommands: an I/O waiting for a fault reply is not in
// flight, so Blocking commands answer while the fault is out.
func TestFaultDoesNotHoldCommands(t *testing.T) {
	e := newEnv(t)
	faulted := make(chan struct{})
	release := make(chan struct{})
	var first atomic.Bool
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		if first.CompareAndSwap(false, true) {
			close(faulted)
			<-release
		}
		return identity(f), nil
	})
	want := bytesOf(100, 4)
	if _, err := e.mem.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	r := async(func() error { return e.d.ReadAt(e.ctx, got, 0) })
	select {
	case <-faulted:
	case <-time.After(mustFinish):
		t.Fatal("the read did not fault")
	}
	for _, cmd := range []struct {
		name string
		fn   func() error
	}{
		{"blocking set_entry_state", func() error {
			return e.a.SetEntryState(e.ctx, protocol.SetEntryState{Disk: tDisk, First: 0, Count: tSegs, State: table.NoWrite, On: true, Blocking: true})
		}},
		{"blocking set_entry", func() error {
			return e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: 3, Entries: []table.Entry{table.ZeroEntry}, Blocking: true})
		}},
		{"quiesce", func() error { return e.a.Quiesce(e.ctx, tDisk, 0) }},
		{"activate", func() error { return e.a.Activate(e.ctx, tDisk) }},
	} {
		if err := await(t, async(cmd.fn), cmd.name); err != nil {
			t.Fatalf("%s: %v", cmd.name, err)
		}
	}
	blocked(t, r, "read waiting for its fault")
	close(release)
	if err := await(t, r, "read"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("read %x, want %x", got[:8], want[:8])
	}
	// The first reply came back after commands changed the table, so it
	// was dropped and the read faulted again.
	if n := e.fc.faults(); n != 2 {
		t.Errorf("%d faults, want 2", n)
	}
}

// TestStaleFaultReplyDropped: a fault reply that comes back after a command
// changed the table is dropped; the table keeps the command's entry and the
// I/O retries against it.
func TestStaleFaultReplyDropped(t *testing.T) {
	cmdLoc := table.Location{Container: 1, Slot: 2}
	staleLoc := table.Location{Container: 1, Slot: 5}
	for _, tc := range []struct {
		name  string
		write bool
		cmd   table.Entry
	}{
		{"read, set_entry", false, table.At(cmdLoc, false)},
		{"read, set_entry NoWrite", false, table.At(cmdLoc, true)},
		{"read, set_entry Zero", false, table.ZeroEntry},
		{"write, set_entry", true, table.At(cmdLoc, false)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			atCmd, atStale := bytesOf(tSeg, 5), bytesOf(tSeg, 6)
			for _, s := range []struct {
				loc table.Location
				p   []byte
			}{{cmdLoc, atCmd}, {staleLoc, atStale}} {
				if _, err := e.mem.WriteAt(s.p, int64(s.loc.Slot)*tSeg); err != nil {
					t.Fatal(err)
				}
			}
			faulted := make(chan struct{})
			release := make(chan struct{})
			var calls atomic.Int32
			e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
				if calls.Add(1) > 1 {
					return protocol.Reply{}, fmt.Errorf("unexpected second fault %+v: %w", f, protocol.ErrIO)
				}
				close(faulted)
				<-release
				return protocol.Reply{First: 0, Entries: []table.Entry{table.At(staleLoc, false)}}, nil
			})
			const off, n = 300, 1000
			p := make([]byte, n)
			if tc.write {
				p = bytesOf(n, 7)
			}
			io := async(func() error {
				if tc.write {
					return e.d.WriteAt(e.ctx, p, off, false)
				}
				return e.d.ReadAt(e.ctx, p, off)
			})
			select {
			case <-faulted:
			case <-time.After(mustFinish):
				t.Fatal("the I/O did not fault")
			}
			if err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: 0, Entries: []table.Entry{tc.cmd}}); err != nil {
				t.Fatal(err)
			}
			close(release)
			if err := await(t, io, "I/O"); err != nil {
				t.Fatal(err)
			}
			if got := e.entry(0); got != tc.cmd {
				t.Errorf("entry 0 is %v, want the command's %v", got, tc.cmd)
			}
			if n := e.fc.faults(); n != 1 {
				t.Errorf("%d faults, want 1", n)
			}
			switch {
			case tc.write:
				if got := e.slot(int(cmdLoc.Slot), off, n); !bytes.Equal(got, p) {
					t.Errorf("the write did not land in the command's slot")
				}
				if got := e.slot(int(staleLoc.Slot), 0, tSeg); !bytes.Equal(got, atStale) {
					t.Errorf("the write landed in the stale reply's slot")
				}
			case tc.cmd == table.ZeroEntry:
				if !bytes.Equal(p, make([]byte, n)) {
					t.Errorf("read of a Zero entry: %x..., want zeros", p[:8])
				}
			default:
				if !bytes.Equal(p, atCmd[off:off+n]) {
					t.Errorf("read %x..., want the command's slot %x...", p[:8], atCmd[off:off+8])
				}
			}
		})
	}
}

func TestQuiesce(t *testing.T) {
	t.Run("new I/O waits until activate", func(t *testing.T) {
		e := newEnv(t)
		e.mapAll()
		if err := await(t, async(func() error { return e.a.Quiesce(e.ctx, tDisk, 0) }), "quiesce of an idle disk"); err != nil {
			t.Fatal(err)
		}
		data := bytesOf(50, 8)
		got := make([]byte, 10)
		r := async(func() error { return e.d.ReadAt(e.ctx, got, 0) })
		w := async(func() error { return e.d.WriteAt(e.ctx, data, tSeg+7, false) })
		blocked(t, r, "read while quiesced")
		blocked(t, w, "write while quiesced")
		// Commands still work.
		if _, err := e.a.GetEntry(e.ctx, tDisk, 0, tSegs); err != nil {
			t.Fatal(err)
		}
		if got := e.slot(1, 7, len(data)); bytes.Equal(got, data) {
			t.Fatal("the write went through while quiesced")
		}
		if err := e.a.Activate(e.ctx, tDisk); err != nil {
			t.Fatal(err)
		}
		for _, ch := range []<-chan error{r, w} {
			if err := await(t, ch, "I/O after activate"); err != nil {
				t.Fatal(err)
			}
		}
		if got := e.slot(1, 7, len(data)); !bytes.Equal(got, data) {
			t.Error("the write did not land after activate")
		}
	})

	t.Run("waits for in-flight I/O", func(t *testing.T) {
		e := newEnv(t)
		e.mapAll()
		e.gate.hold.Store(true)
		w := async(func() error { return e.d.WriteAt(e.ctx, bytesOf(10, 9), 0, false) })
		rel := e.entered()
		q := async(func() error { return e.a.Quiesce(e.ctx, tDisk, 0) })
		blocked(t, q, "quiesce with a write in flight")
		r := async(func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), tSeg) })
		blocked(t, r, "read after quiesce")
		close(rel)
		if err := await(t, q, "quiesce"); err != nil {
			t.Fatal(err)
		}
		if err := await(t, w, "write"); err != nil {
			t.Fatal(err)
		}
		blocked(t, r, "read while quiesced")
		if err := e.a.Activate(e.ctx, tDisk); err != nil {
			t.Fatal(err)
		}
		if err := await(t, r, "read after activate"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("timeout leaves the disk active", func(t *testing.T) {
		e := newEnv(t)
		e.mapAll()
		e.gate.hold.Store(true)
		w := async(func() error { return e.d.WriteAt(e.ctx, bytesOf(10, 10), 0, false) })
		rel := e.entered()
		err := await(t, async(func() error { return e.a.Quiesce(e.ctx, tDisk, 50*time.Millisecond) }), "quiesce with a time limit")
		if !errors.Is(err, ErrQuiesceTimeout) {
			t.Fatalf("quiesce: %v, want ErrQuiesceTimeout", err)
		}
		// The disk is active: new I/O proceeds while the old write is
		// still stuck.
		want := bytesOf(10, 11)
		if _, err := e.mem.WriteAt(want, tSeg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if err := await(t, async(func() error { return e.d.ReadAt(e.ctx, got, tSeg) }), "read after a failed quiesce"); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("read %x, want %x", got, want)
		}
		e.gate.hold.Store(false)
		if err := await(t, async(func() error { return e.d.WriteAt(e.ctx, want, 2*tSeg, false) }), "write after a failed quiesce"); err != nil {
			t.Fatal(err)
		}
		blocked(t, w, "stuck write")
		close(rel)
		if err := await(t, w, "write"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		e := newEnv(t)
		e.mapAll()
		e.gate.hold.Store(true)
		w := async(func() error { return e.d.WriteAt(e.ctx, bytesOf(10, 12), 0, false) })
		rel := e.entered()
		ctx, cancel := context.WithCancel(e.ctx)
		q := async(func() error { return e.a.Quiesce(ctx, tDisk, time.Hour) })
		blocked(t, q, "quiesce with a write in flight")
		cancel()
		err := await(t, q, "cancelled quiesce")
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrQuiesceTimeout) {
			t.Fatalf("cancelled quiesce: %v, want context.Canceled", err)
		}
		if err := await(t, async(func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), tSeg) }), "read after a cancelled quiesce"); err != nil {
			t.Fatal(err)
		}
		close(rel)
		if err := await(t, w, "write"); err != nil {
			t.Fatal(err)
		}
	})
}

func TestDeleteTable(t *testing.T) {
	// gone checks that every kind of I/O now fails, that get_entry finds
	// no table, and that set commands about the forgotten disk are
	// answered without effect (the agent has nothing of it cached or in
	// flight) and bring no table back.
	gone := func(t *testing.T, e *env) {
		t.Helper()
		if err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, Entries: []table.Entry{table.ZeroEntry}, Blocking: true}); err != nil {
			t.Errorf("set_entry after delete_table: %v", err)
		}
		if err := e.a.SetEntryState(e.ctx, protocol.SetEntryState{Disk: tDisk, Count: 1, State: table.NoWrite, On: true, Blocking: true}); err != nil {
			t.Errorf("set_entry_state after delete_table: %v", err)
		}
		if err := await(t, async(func() error { return e.a.Quiesce(e.ctx, tDisk, 0) }), "quiesce after delete_table"); err != nil {
			t.Errorf("quiesce after delete_table: %v", err)
		}
		for _, tc := range []struct {
			name string
			fn   func() error
			want error
		}{
			{"read", func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), 0) }, ErrGone},
			{"write", func() error { return e.d.WriteAt(e.ctx, make([]byte, 10), tSeg, false) }, ErrGone},
			{"trim", func() error { return e.d.Trim(e.ctx, 0, tSeg) }, ErrGone},
			{"write zeroes", func() error { return e.d.WriteZeroes(e.ctx, 10, 10, true) }, ErrGone},
			{"get_entry", func() error { _, err := e.a.GetEntry(e.ctx, tDisk, 0, 1); return err }, ErrNoTable},
		} {
			if err := await(t, async(tc.fn), tc.name); !errors.Is(err, tc.want) {
				t.Errorf("%s after delete_table: %v, want %v", tc.name, err, tc.want)
			}
		}
		if err := e.a.Activate(e.ctx, tDisk); err != nil {
			t.Errorf("activate after delete_table: %v", err)
		}
	}

	t.Run("waits for in-flight I/O", func(t *testing.T) {
		e := newEnv(t)
		e.mapAll()
		e.gate.hold.Store(true)
		data := bytesOf(10, 13)
		w := async(func() error { return e.d.WriteAt(e.ctx, data, 0, false) })
		rel := e.entered()
		del := async(func() error { return e.a.DeleteTable(e.ctx, tDisk) })
		blocked(t, del, "delete_table with a write in flight")
		// I/O that starts now fails at once.
		if err := await(t, async(func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), tSeg) }), "read during delete_table"); !errors.Is(err, ErrGone) {
			t.Errorf("read during delete_table: %v, want ErrGone", err)
		}
		close(rel)
		if err := await(t, del, "delete_table"); err != nil {
			t.Fatal(err)
		}
		// The write was in flight: it completes.
		if err := await(t, w, "write"); err != nil {
			t.Errorf("in-flight write: %v", err)
		}
		if got := e.slot(0, 0, len(data)); !bytes.Equal(got, data) {
			t.Error("in-flight write did not land")
		}
		gone(t, e)
	})

	t.Run("I/O waiting for a fault", func(t *testing.T) {
		e := newEnv(t)
		faulted := make(chan struct{})
		release := make(chan struct{})
		e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
			close(faulted)
			<-release
			return identity(f), nil
		})
		r := async(func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), 0) })
		select {
		case <-faulted:
		case <-time.After(mustFinish):
			t.Fatal("the read did not fault")
		}
		if err := await(t, async(func() error { return e.a.DeleteTable(e.ctx, tDisk) }), "delete_table"); err != nil {
			t.Fatal(err)
		}
		close(release)
		if err := await(t, r, "read"); !errors.Is(err, ErrGone) {
			t.Errorf("read whose fault outlived delete_table: %v, want ErrGone", err)
		}
		if n := e.fc.faults(); n != 1 {
			t.Errorf("%d faults, want 1", n)
		}
		gone(t, e)
	})

	t.Run("I/O queued by quiesce", func(t *testing.T) {
		e := newEnv(t)
		e.mapAll()
		if err := e.a.Quiesce(e.ctx, tDisk, 0); err != nil {
			t.Fatal(err)
		}
		r := async(func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), 0) })
		blocked(t, r, "read while quiesced")
		if err := await(t, async(func() error { return e.a.DeleteTable(e.ctx, tDisk) }), "delete_table"); err != nil {
			t.Fatal(err)
		}
		if err := await(t, r, "queued read"); !errors.Is(err, ErrGone) {
			t.Errorf("queued read after delete_table: %v, want ErrGone", err)
		}
		gone(t, e)
	})
}

func (c *fakeCtrl) ReportReplica(ctx context.Context, r protocol.ReplicaReport) (protocol.Membership, error) {
	return protocol.Membership{}, protocol.ErrBadRequest
}
