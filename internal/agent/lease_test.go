package agent

import (
	"bytes"
	"context"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/container"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// heldReads is a container whose reads can be held after they read: while
// hold is set, each ReadAt reads, then sends a fresh channel on entered and
// waits until that channel is closed (or stop is) before it returns.
type heldReads struct {
	container.Container
	hold    atomic.Bool
	entered chan chan struct{}
	stop    chan struct{}
}

func (h *heldReads) ReadAt(p []byte, off int64) (int, error) {
	n, err := h.Container.ReadAt(p, off)
	if h.hold.Load() {
		rel := make(chan struct{})
		select {
		case h.entered <- rel:
			select {
			case <-rel:
			case <-h.stop:
			}
		case <-h.stop:
		}
	}
	return n, err
}

// TestLeaseHoldsIO: with its lease lapsed, the agent lets no I/O through
// (its entries may be stale: the controller may have gone on without it);
// the I/O waits, and goes on when the lease is renewed or lifted.
func TestLeaseHoldsIO(t *testing.T) {
	e := newEnv(t)
	e.mapAll()
	e.a.SetLease(time.Now().Add(-time.Second))
	p := bytesOf(4096, 1)
	write := async(func() error { return e.d.WriteAt(e.ctx, p, 0, false) })
	got := make([]byte, 4096)
	read := async(func() error { return e.d.ReadAt(e.ctx, got, 0) })
	blocked(t, write, "write with the lease lapsed")
	blocked(t, read, "read with the lease lapsed")
	e.a.SetLease(time.Now().Add(time.Minute))
	if err := await(t, write, "write"); err != nil {
		t.Fatal(err)
	}
	if err := await(t, read, "read"); err != nil {
		t.Fatal(err)
	}
	e.a.SetLease(time.Now().Add(-time.Second))
	e.a.SetLease(time.Time{}) // no lease: no limit
	if err := await(t, async(func() error { return e.d.ReadAt(e.ctx, got, 0) }), "read without a lease"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Errorf("read %x..., want the write's %x...", got[:8], p[:8])
	}
	// A context that ends while the I/O waits for the lease ends it.
	e.a.SetLease(time.Now().Add(-time.Second))
	ctx, cancel := context.WithTimeout(e.ctx, 50*time.Millisecond)
	defer cancel()
	if err := e.d.ReadAt(ctx, got, 0); err == nil {
		t.Errorf("a read with the lease lapsed and its context ended succeeded")
	}
}

// TestReadOutlivingLease: a read that comes back from storage after the
// agent's lease lapsed (its process was stopped, say) does not return what
// it read, which may be stale by then; it reads again once the agent holds
// a lease again. (Found by TestLinearizable in internal/e2e: an agent woken
// from SIGSTOP served reads from a slot that a snapshot and a copy on write
// had taken from its disk meanwhile.)
func TestReadOutlivingLease(t *testing.T) {
	var held *heldReads
	e := newEnvOver(t, func(mem *container.Memory) (container.Container, func()) {
		held = &heldReads{Container: mem, entered: make(chan chan struct{}), stop: make(chan struct{})}
		return held, func() { close(held.stop) }
	})
	ctx, mem, a, d := e.ctx, e.mem, e.a, e.d
	a.SetLease(time.Now().Add(time.Minute))
	old, cur := bytesOf(4096, 1), bytesOf(4096, 2)
	if _, err := mem.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	held.hold.Store(true)
	read := async(func() error { return d.ReadAt(ctx, got, 0) })
	var rel chan struct{}
	select {
	case rel = <-held.entered:
	case <-time.After(mustFinish):
		t.Fatal("the read did not reach the container")
	}
	held.hold.Store(false)
	// Meanwhile the lease lapses and the block changes under the agent.
	a.SetLease(time.Now().Add(-time.Second))
	if _, err := mem.WriteAt(cur, 0); err != nil {
		t.Fatal(err)
	}
	close(rel)
	blocked(t, read, "read back after the lease lapsed")
	a.SetLease(time.Now().Add(time.Minute))
	if err := await(t, read, "read"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, cur) {
		t.Errorf("read %x..., read before the lease lapsed; want %x..., read again after", got[:8], cur[:8])
	}
}

// refusedFlushes is a container whose next refuse flushes are refused
// for a lapsed storage lease, as a storage node refuses an agent whose
// renewal has not reached it yet.
type refusedFlushes struct {
	container.Container
	refuse  atomic.Int32
	flushes atomic.Int32
}

func (r *refusedFlushes) Flush() error {
	r.flushes.Add(1)
	if r.refuse.Add(-1) >= 0 {
		return container.ErrLeaseOver
	}
	return r.Container.Flush()
}

// TestBlockingCommandRidesOutStorageLease: a Blocking command flushes
// what was written under the old entries; a storage node that refuses
// that flush for a lapsed lease (the renewal still on its way) is asked
// again, and the command succeeds. Answered with the refusal, the
// controller took the agent for one that does not answer and waited its
// lease out (TestKillStormController saw it, and fio got EIO).
func TestBlockingCommandRidesOutStorageLease(t *testing.T) {
	var rc *refusedFlushes
	e := newEnvOver(t, func(mem *container.Memory) (container.Container, func()) {
		rc = &refusedFlushes{Container: mem}
		return rc, func() {}
	})
	e.mapAll()
	if err := e.d.WriteAt(e.ctx, bytesOf(4096, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	rc.refuse.Store(3)
	cmd := protocol.SetEntryState{Disk: tDisk, First: 0, Count: 1, State: table.NoWrite, On: true, Blocking: true}
	if err := e.a.SetEntryState(e.ctx, cmd); err != nil {
		t.Fatalf("blocking command with the storage refusing 3 flushes for its lease: %v", err)
	}
	if n := rc.flushes.Load(); n != 4 {
		t.Errorf("%d flushes, want 4 (3 refused, then one done)", n)
	}
}
