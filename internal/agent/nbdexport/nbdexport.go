// Package nbdexport serves a mapping agent's disks over NBD: it is the
// nbd.Backend of an agent (every disk its controller lets it serve is an
// export named after the disk; read-only snapshots are exported read-only)
// and the Errno that turns the agent's errors into the NBD error values a
// host sees. Its exports report their allocation (base:allocation) from
// the agent's table: thin segments are holes. Both `segmap agent` and the
// one-process `segmap up` use it.
package nbdexport

import (
	"context"
	"errors"
	"fmt"
	"io"

	"segmap/internal/agent"
	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdwire"
	"segmap/internal/rpc/protocol"
)

// Backend serves agent a's disks over NBD: every disk its controller
// lets it serve is an export named after it; read-only snapshots are
// exported read-only.
func Backend(ctrl protocol.Controller, a *agent.Agent) nbd.Backend {
	return &nbdBackend{ctrl: ctrl, a: a}
}

type nbdBackend struct {
	ctrl protocol.Controller
	a    *agent.Agent
}

func (b *nbdBackend) List(ctx context.Context) ([]nbd.ExportInfo, error) {
	ds, err := b.ctrl.Exports(ctx, b.a.Name())
	if err != nil {
		return nil, err
	}
	out := make([]nbd.ExportInfo, 0, len(ds))
	for _, d := range ds {
		desc := "segmap disk"
		if d.ReadOnly {
			desc = "segmap snapshot (read-only)"
		}
		out = append(out, nbd.ExportInfo{Name: d.Name, Description: desc, Size: d.Size, ReadOnly: d.ReadOnly})
	}
	return out, nil
}

func (b *nbdBackend) Open(ctx context.Context, name string) (nbd.Export, io.Closer, error) {
	d, err := b.a.Open(ctx, name)
	if errors.Is(err, protocol.ErrNotFound) {
		return nil, nil, fmt.Errorf("%w: %w", nbdwire.ErrUnknownExport, err)
	}
	if err != nil {
		return nil, nil, err
	}
	// The agent keeps the disk open for every connection that uses it.
	return &export{Disk: d, life: d.Lives()}, io.NopCloser(nil), nil
}

// export is a disk as one connection sees it: once the disk has lost map
// changes its clients may have read (a new life: agent.Disk.Lives), the
// connection is hung up on, as a crashed server's would be, and the
// client reconnects to the disk as it now is.
type export struct {
	*agent.Disk
	life uint64
}

// lost returns the error that ends a connection of an earlier life.
func (e *export) lost() error {
	if e.Lives() == e.life {
		return nil
	}
	return fmt.Errorf("%w: disk %q lost map changes not yet flushed with its controller", nbd.ErrHangUp, e.Info().Name)
}

var _ nbd.ExtentLister = (*export)(nil)

func (e *export) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if err := e.lost(); err != nil {
		return err
	}
	return e.Disk.ReadAt(ctx, p, off)
}

func (e *export) TryReadAt(ctx context.Context, p []byte, off uint64) (bool, error) {
	if err := e.lost(); err != nil {
		return true, err
	}
	return e.Disk.TryReadAt(ctx, p, off)
}

func (e *export) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if err := e.lost(); err != nil {
		return err
	}
	return e.Disk.WriteAt(ctx, p, off, fua)
}

func (e *export) Flush(ctx context.Context) error {
	if err := e.lost(); err != nil {
		return err
	}
	return e.Disk.Flush(ctx)
}

func (e *export) Trim(ctx context.Context, off, n uint64) error {
	if err := e.lost(); err != nil {
		return err
	}
	return e.Disk.Trim(ctx, off, n)
}

func (e *export) WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error {
	if err := e.lost(); err != nil {
		return err
	}
	return e.Disk.WriteZeroes(ctx, off, n, noHole)
}

// Extents is the export's nbd.ExtentLister: a Zero segment is a hole that
// reads as zeroes, every other segment is data (see agent.Disk.Extents).
func (e *export) Extents(ctx context.Context, off, n uint64, fn func(uint64, nbd.ExtentFlags) bool) error {
	if err := e.lost(); err != nil {
		return err
	}
	return e.Disk.Extents(ctx, off, n, func(n uint64, zero bool) bool {
		var f nbd.ExtentFlags
		if zero {
			f = nbd.ExtentHole | nbd.ExtentZero
		}
		return fn(n, f)
	})
}

// Errno maps an agent error to the NBD error a host sees.
func Errno(err error) uint32 {
	switch {
	case errors.Is(err, protocol.ErrNoSpace):
		return nbdwire.ENOSPC
	case errors.Is(err, protocol.ErrReadOnly):
		return nbdwire.EPERM
	case errors.Is(err, agent.ErrRange):
		return nbdwire.EINVAL
	case errors.Is(err, agent.ErrGone), errors.Is(err, agent.ErrClosed):
		return nbdwire.ESHUTDOWN
	}
	return nbdwire.EIO
}
