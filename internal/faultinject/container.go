package faultinject

import (
	"errors"
	"fmt"
	"sync"
	"syscall"

	"segmap/internal/container"
)

var errEIO error = syscall.EIO

// Container wraps a container.Container: every call is first put to its
// Injector. A volatile one (VolatileContainer) also holds unsynced writes
// and punches in memory until Flush.
type Container struct {
	inner    container.Container
	name     string
	in       *Injector
	volatile bool

	mu struct {
		sync.Mutex
		dead   bool // the injector crashed: every call fails
		closed bool
		// pending are the writes and punches since the last Flush, in
		// order (volatile only).
		pending []pendingOp
	}
}

// pendingOp is an unsynced write (data != nil) or punch.
type pendingOp struct {
	off, n int64
	data   []byte
}

var _ container.Container = (*Container)(nil)

// Container wraps c under name: writes pass straight through (they survive
// a crash, as a process crash leaves the page cache behind), and only the
// faults apply.
func (in *Injector) Container(name string, c container.Container) *Container {
	return in.wrap(name, c, false)
}

// VolatileContainer wraps c under name like Container, but writes and
// punches reach c only at the next successful Flush; reads see them at
// once. A crash discards those not flushed (see KeepUnsynced): a power
// failure.
func (in *Injector) VolatileContainer(name string, c container.Container) *Container {
	return in.wrap(name, c, true)
}

func (in *Injector) wrap(name string, c container.Container, volatile bool) *Container {
	w := &Container{inner: c, name: name, in: in, volatile: volatile}
	in.mu.Lock()
	in.mu.conts = append(in.mu.conts, w)
	crashed := in.mu.crashed
	in.mu.Unlock()
	if crashed {
		w.mu.dead = true
	}
	return w
}

// Inner returns the wrapped container.
func (c *Container) Inner() container.Container { return c.inner }

// Unsynced returns the number of writes and punches not yet flushed.
func (c *Container) Unsynced() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.mu.pending)
}

// ID implements container.Container.
func (c *Container) ID() uint32 { return c.inner.ID() }

// SlotSize implements container.Container.
func (c *Container) SlotSize() int64 { return c.inner.SlotSize() }

// Slots implements container.Container.
func (c *Container) Slots() int64 { return c.inner.Slots() }

// Size implements container.Container.
func (c *Container) Size() int64 { return c.inner.Size() }

// crash ends c: its unsynced operations are dropped, except those keep
// lets through, and every later call fails.
func (c *Container) crash(keep func() bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.dead {
		return
	}
	c.mu.dead = true
	for _, p := range c.mu.pending {
		if keep() {
			_ = c.applyLocked(p) // best effort: a crash reports nothing
		}
	}
	c.mu.pending = nil
}

// applyLocked performs one pending operation on the inner container.
func (c *Container) applyLocked(p pendingOp) error {
	if p.data != nil {
		_, err := c.inner.WriteAt(p.data, p.off)
		return err
	}
	return c.inner.Punch(p.off, p.n)
}

// stateErrLocked is the error of a call on a crashed or closed container.
func (c *Container) stateErrLocked(op Op) error {
	switch {
	case c.mu.dead:
		return fmt.Errorf("%v %s: %w", op, c.name, ErrCrashed)
	case c.mu.closed:
		return fmt.Errorf("%v %s: %w", op, c.name, container.ErrClosed)
	}
	return nil
}

// ReadAt implements container.Container.
func (c *Container) ReadAt(p []byte, off int64) (int, error) {
	v := c.in.decide(Call{Op: OpRead, Target: c.name, Off: off, Len: int64(len(p))})
	if v.crash {
		c.in.dropOverlays()
		return 0, v.err
	}
	if v.err != nil && !v.perform {
		return 0, v.err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.stateErrLocked(OpRead); err != nil {
		return 0, err
	}
	n, err := c.inner.ReadAt(p, off)
	if err != nil {
		return n, err
	}
	// The unsynced operations, in order, over what the container holds.
	for _, q := range c.mu.pending {
		lo, hi := max(off, q.off), min(off+int64(len(p)), q.off+q.n)
		if lo >= hi {
			continue
		}
		if q.data != nil {
			copy(p[lo-off:hi-off], q.data[lo-q.off:hi-q.off])
		} else {
			clear(p[lo-off : hi-off])
		}
	}
	return n, v.err
}

// WriteAt implements container.Container.
func (c *Container) WriteAt(p []byte, off int64) (int, error) {
	call := Call{Op: OpWrite, Target: c.name, Off: off, Len: int64(len(p))}
	n, err := c.persist(call, func(durable bool) error {
		if !c.volatile || durable {
			_, err := c.inner.WriteAt(p, off)
			return err
		}
		if off < 0 || int64(len(p)) > c.inner.Size()-off {
			return fmt.Errorf("%v: %w", call, container.ErrOutOfRange)
		}
		c.mu.pending = append(c.mu.pending, pendingOp{off: off, n: int64(len(p)), data: append([]byte(nil), p...)})
		return nil
	})
	if err != nil && n == 0 {
		return 0, err
	}
	return len(p), err
}

// Punch implements container.Container.
func (c *Container) Punch(off, n int64) error {
	call := Call{Op: OpPunch, Target: c.name, Off: off, Len: n}
	_, err := c.persist(call, func(durable bool) error {
		if !c.volatile || durable {
			return c.inner.Punch(off, n)
		}
		if off < 0 || n < 0 || n > c.inner.Size()-off {
			return fmt.Errorf("%v: %w", call, container.ErrOutOfRange)
		}
		c.mu.pending = append(c.mu.pending, pendingOp{off: off, n: n})
		return nil
	})
	return err
}

// Flush implements container.Container: the unsynced operations reach the
// inner container, in order, and it is flushed.
func (c *Container) Flush() error {
	_, err := c.persist(Call{Op: OpFlush, Target: c.name}, func(bool) error {
		for len(c.mu.pending) > 0 {
			if err := c.applyLocked(c.mu.pending[0]); err != nil {
				return err
			}
			c.mu.pending = c.mu.pending[1:]
		}
		c.mu.pending = nil
		return c.inner.Flush()
	})
	return err
}

// persist runs one persistence step: do performs it under c.mu (durable:
// it must reach the inner container at once, as the step that crashes the
// injector does when kept). It returns 1 if the step was performed.
func (c *Container) persist(call Call, do func(durable bool) error) (int, error) {
	v := c.in.decide(call)
	if !v.perform {
		if v.crash {
			c.in.dropOverlays()
		}
		return 0, v.err
	}
	c.mu.Lock()
	if err := c.stateErrLocked(call.Op); err != nil {
		c.mu.Unlock()
		return 0, err
	}
	err := do(v.crash)
	c.mu.Unlock()
	if v.crash {
		c.in.dropOverlays()
	}
	if err != nil {
		return 0, err
	}
	return 1, v.err
}

// Close implements container.Container. It closes the inner container even
// after a crash (the test reopens its file). Before a crash, the unsynced
// operations reach the inner container unflushed: a process that closes a
// file leaves its writes in the page cache.
func (c *Container) Close() error {
	c.mu.Lock()
	var errs []error
	if !c.mu.dead {
		for _, p := range c.mu.pending {
			errs = append(errs, c.applyLocked(p))
		}
	}
	c.mu.pending = nil
	c.mu.closed = true
	c.mu.Unlock()
	errs = append(errs, c.inner.Close())
	return errors.Join(errs...)
}
