// Package nbdexport serves a mapping agent's disks over NBD: it is the
// nbd.Backend of an agent (every disk its controller lets it serve is an
// export named after the disk; read-only snapshots are exported read-only)
// and the Errno that turns the agent's errors into the NBD error values a
// host sees. Its exports report their allocation (base:allocation) from
// the agent's table: thin segments are holes; and which extents changed
// since an earlier snapshot (segmap:changed:SNAP, see ChangedContext). Both
// `segmap agent` and the one-process `segmap up` use it.
package nbdexport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

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
	return &export{Disk: d, life: d.Lives(), a: b.a}, io.NopCloser(nil), nil
}

// ChangedContext is the prefix of the metadata contexts an export offers
// beside base:allocation: segmap:changed:SNAP describes which extents of
// the export differ from SNAP, an earlier snapshot of its lineage (or any
// other disk of it), with bit 0 (ChangedFlag) set on those that changed.
// It is the NBD form of a dirty bitmap: a backup copies only those
// extents into its copy of SNAP. It is computed from the two disks'
// tables, without reading data.
const ChangedContext = "segmap:changed:"

// ChangedFlag marks a changed extent in a ChangedContext.
const ChangedFlag nbd.ExtentFlags = 1

var _ nbd.MetaContexter = (*nbdBackend)(nil)

// MetaContexts implements nbd.MetaContexter: segmap:changed:SNAP for a SNAP
// of the export's lineage; a LIST of "segmap:" or "segmap:changed:" names
// one for each read-only disk of the lineage.
func (b *nbdBackend) MetaContexts(ctx context.Context, name, q string, list bool) ([]string, error) {
	if !strings.HasPrefix(q, "segmap:") {
		return nil, nil
	}
	ds, err := b.ctrl.Exports(ctx, b.a.Name())
	if err != nil {
		return nil, err
	}
	i := slices.IndexFunc(ds, func(d protocol.Disk) bool { return d.Name == name })
	if i < 0 {
		return nil, nil
	}
	d := ds[i]
	kin := func(s protocol.Disk) bool {
		return s.ID != d.ID && s.Family == d.Family && s.SegmentSize == d.SegmentSize
	}
	if list && (q == "segmap:" || q == ChangedContext) {
		var out []string
		for _, s := range ds {
			if kin(s) && s.ReadOnly {
				out = append(out, ChangedContext+s.Name)
			}
		}
		return out, nil
	}
	snap, ok := strings.CutPrefix(q, ChangedContext)
	if !ok {
		return nil, nil
	}
	if j := slices.IndexFunc(ds, func(s protocol.Disk) bool { return s.Name == snap }); j >= 0 && kin(ds[j]) {
		return []string{q}, nil
	}
	return nil, nil
}

// export is a disk as one connection sees it: once the disk has lost map
// changes its clients may have read (a new life: agent.Disk.Lives), the
// connection is hung up on, as a crashed server's would be, and the
// client reconnects to the disk as it now is.
type export struct {
	*agent.Disk
	life uint64
	a    *agent.Agent
	mu   struct {
		sync.Mutex
		bases map[string]*agent.Disk // opened for ChangedContext, by name
	}
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

var _ nbd.ContextExtenter = (*export)(nil)

// ContextExtents implements nbd.ContextExtenter for ChangedContext: see
// agent.Disk.Changed. The snapshot compared with is opened on the agent at
// the first request, as a connection opens an export.
func (e *export) ContextExtents(ctx context.Context, name string, off, n uint64, fn func(uint64, nbd.ExtentFlags) bool) error {
	if err := e.lost(); err != nil {
		return err
	}
	snap, ok := strings.CutPrefix(name, ChangedContext)
	if !ok {
		return fmt.Errorf("metadata context %q: %w", name, protocol.ErrBadRequest)
	}
	e.mu.Lock()
	base := e.mu.bases[snap]
	e.mu.Unlock()
	if base == nil {
		b, err := e.a.Open(ctx, snap)
		if err != nil {
			return err
		}
		e.mu.Lock()
		if e.mu.bases == nil {
			e.mu.bases = make(map[string]*agent.Disk)
		}
		e.mu.bases[snap] = b
		e.mu.Unlock()
		base = b
	}
	return e.Changed(ctx, base, off, n, func(n uint64, changed bool) bool {
		var f nbd.ExtentFlags
		if changed {
			f = ChangedFlag
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
	case errors.Is(err, agent.ErrRange), errors.Is(err, agent.ErrLineage), errors.Is(err, protocol.ErrBadRequest):
		return nbdwire.EINVAL
	case errors.Is(err, agent.ErrGone), errors.Is(err, agent.ErrClosed):
		return nbdwire.ESHUTDOWN
	}
	return nbdwire.EIO
}
