package standalone_test

// The harness of the crash-point and error-injection tests: an in-process
// cluster whose controller persists through faultinject wrappers (its
// bbolt store and the containers it opens), agents whose containers can
// be wrapped too, a byte model of every disk, and the operations the
// tests crash or fail.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/faultinject"
	"segmap/internal/meta"
	"segmap/internal/standalone"
	"segmap/internal/table"

	"golang.org/x/sys/unix"
)

// fxSegs is the number of segments of the harness's disks.
const fxSegs = 4

// fx is a cluster under fault injection.
type fx struct {
	t   testing.TB
	ctx context.Context
	dir string
	c   *standalone.Cluster
	// ctrl is the injector of the controller "process" (its store and
	// containers); agent that of the agents' containers. A restart
	// swaps in new ones.
	ctrl, agent atomic.Pointer[faultinject.Injector]
	// volatile makes the controller's containers hold unsynced writes
	// (a crash then keeps only what was flushed); agentVolatile the
	// agents' containers opened from then on.
	volatile      bool
	agentVolatile atomic.Bool
	// oneMachine wraps the agents' containers opened from then on in
	// the controller's injector: controller and agents are one process
	// on one machine (segmap up), and crash together.
	oneMachine atomic.Bool
	// slowFlush makes every flush of the controller's containers take
	// slowFlushTime more, as fsync does on a loaded machine.
	slowFlush atomic.Bool
	// buf is what prepare and contents read disks into, reused: a fresh
	// buffer for every disk read costs the race detector its shadow
	// pages anew each time.
	buf []byte
}

// readBuf returns h.buf, grown to n bytes if need be.
func (h *fx) readBuf(n int) []byte {
	if cap(h.buf) < n {
		h.buf = make([]byte, n)
	}
	return h.buf[:n]
}

// slowFlushTime is how much longer a flush takes under fx.slowFlush:
// longer than the controller's preflushShort (50 ms), past which its
// preflush would flush again.
const slowFlushTime = 100 * time.Millisecond

// slowFlusher is a container whose flushes take slowFlushTime more while
// *slow is set.
type slowFlusher struct {
	container.Container
	slow *atomic.Bool
}

func (c slowFlusher) Flush() error {
	if c.slow.Load() {
		time.Sleep(slowFlushTime)
	}
	return c.Container.Flush()
}

// openFx opens a cluster over dir (created if empty) with agents a and b.
func openFx(t testing.TB, dir string, volatile bool) *fx {
	t.Helper()
	h := &fx{t: t, ctx: context.Background(), dir: dir, volatile: volatile}
	h.ctrl.Store(faultinject.New(1))
	h.agent.Store(faultinject.New(2))
	c, err := standalone.Open(h.ctx, dir, standalone.Options{
		Agents:         []string{"a", "b"},
		Pool:           []standalone.PoolSpec{{SlotSize: seg64, Slots: 40, Count: 2}},
		CommandTimeout: 2 * time.Second,
		// One move at a time: crash points are counted in order.
		DrainMoves: 1,
		// One flush of a family's containers before its locks are
		// taken, however long it takes: a slow fsync (a loaded CI
		// machine) made another round, two more crash points in a
		// counting run than in the crash runs after it. A further
		// round's points are those of the first (its containers
		// flushed again, before any commit).
		PreflushRounds: 1,
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
		OpenStore: func(ctx context.Context) (meta.Store, error) {
			b, err := meta.OpenBolt(filepath.Join(dir, "meta.db"))
			if err != nil {
				return nil, err
			}
			return h.ctrl.Load().Store("meta", b), nil
		},
		WrapControllerContainer: func(ct container.Container) container.Container {
			name := "ctrl/" + fxContainerName(ct)
			ct = slowFlusher{Container: ct, slow: &h.slowFlush}
			if h.volatile {
				return h.ctrl.Load().VolatileContainer(name, ct)
			}
			return h.ctrl.Load().Container(name, ct)
		},
		WrapAgentContainer: func(agent string, ct container.Container) container.Container {
			name := fmt.Sprintf("agent/%s/%s", agent, fxContainerName(ct))
			in := h.agent.Load()
			if h.oneMachine.Load() {
				in = h.ctrl.Load()
			}
			if h.agentVolatile.Load() {
				return in.VolatileContainer(name, ct)
			}
			return in.Container(name, ct)
		},
	})
	if err != nil {
		t.Fatalf("open cluster: %v", err)
	}
	h.c = c
	return h
}

// fxContainerName names container ct for the injectors: c<id>, and for
// a replica of a mirrored container (a file not named c<id>) c<id>/ and
// its file's name, so that a fault can pick one replica.
func fxContainerName(ct container.Container) string {
	name := fmt.Sprintf("c%d", ct.ID())
	if f, ok := ct.(*container.File); ok && filepath.Base(f.Path()) != name {
		name += "/" + filepath.Base(f.Path())
	}
	return name
}

func (h *fx) close() {
	if err := h.c.Close(); err != nil && !errors.Is(err, faultinject.ErrCrashed) {
		h.t.Logf("close cluster: %v", err)
	}
}

// restartController kills the controller and starts a new one over what
// its store and containers kept, with a fresh injector.
func (h *fx) restartController() error {
	h.ctrl.Store(faultinject.New(uint64(time.Now().UnixNano())))
	return h.c.RestartController(h.ctx)
}

// fxDisk is the model of one disk.
type fxDisk struct {
	data     []byte
	readOnly bool
	// family names the disk it all started from (its name at
	// creation): disks of one family may roll back to each other.
	family string
}

// fxModel is the model of every disk, by name. Operations return new
// models; a model is never changed in place, and neither are the bytes of
// its disks, which models share: an operation that changes a disk's bytes
// gives it bytes of its own first (own).
type fxModel map[string]fxDisk

// clone returns a copy of m that shares its disks' bytes. Copying every
// disk's bytes for every operation was a fifth of a crash run's time
// under the race detector.
func (m fxModel) clone() fxModel {
	return maps.Clone(m)
}

// own gives disk name of m a copy of its bytes, to change in place, and
// returns it.
func (m fxModel) own(name string) []byte {
	d := m[name]
	d.data = slices.Clone(d.data)
	m[name] = d
	return d.data
}

func (m fxModel) names() []string {
	return slices.Sorted(maps.Keys(m))
}

// fxOp is an operation under test: it returns the model as it must be if
// the operation took effect, and its error (nil: acknowledged).
type fxOp struct {
	name string
	run  func(h *fx, m fxModel) (fxModel, error)
	// torn: when not acknowledged, each segment may hold its bytes from
	// before or from after independently (a write or trim of several
	// segments, like one of several blocks of any block device, is not
	// atomic).
	torn bool
	// settled, if set, checks what the model does not hold once the
	// operation has taken effect.
	settled func(h *fx) error
	// pre, if set, runs after prepare and before the operation: its
	// steps are not crash points (a failed container to bring back).
	pre func(h *fx) error
	// recover, if set, runs after the restart, before the state is
	// checked: it checks what a state the model cannot hold must be
	// (an Error segment reads EIO or zeros), says which it found
	// ("before", "after" or "torn"), and retries the operation, as an
	// operator would, so that the cluster holds the model after.
	recover func(h *fx, before fxModel) (string, error)
	// mirror: the operation runs from fxSetupMirror's state, which
	// adds mirrored container 3 and disk M on it, not fxSetup's.
	mirror bool
}

func opCreate(name string, prealloc bool) fxOp {
	op := fxOp{name: "create", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		after[name] = fxDisk{data: make([]byte, fxSegs*seg64), family: name}
		_, err := h.c.Ctrl.CreateDisk(h.ctx, controller.CreateOptions{Name: name, Size: fxSegs * seg64, SegmentSize: seg64, Preallocate: prealloc})
		return after, err
	}}
	if prealloc {
		// A preallocated disk has every segment allocated.
		op.settled = func(h *fx) error {
			u, err := h.c.Ctrl.DiskUsage(h.ctx, name)
			if err != nil {
				return err
			}
			if u.Allocated != fxSegs*seg64 {
				return fmt.Errorf("preallocated disk %s has %d of %d bytes allocated", name, u.Allocated, fxSegs*seg64)
			}
			return nil
		}
	}
	return op
}

// opCreateReverse creates a disk with the reverse-delta policy.
func opCreateReverse(name string) fxOp {
	return fxOp{name: "create", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		after[name] = fxDisk{data: make([]byte, fxSegs*seg64), family: name}
		_, err := h.c.Ctrl.CreateDisk(h.ctx, controller.CreateOptions{Name: name, Size: fxSegs * seg64, SegmentSize: seg64, Policy: table.Reverse})
		return after, err
	}}
}

func opSnapshot(srcs, names []string, writable bool) fxOp {
	return fxOp{name: "snapshot", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		for i, s := range srcs {
			after[names[i]] = fxDisk{data: m[s].data, readOnly: !writable, family: m[s].family}
		}
		_, err := h.c.Ctrl.Snapshot(h.ctx, controller.SnapshotOptions{Sources: srcs, Names: names, Writable: writable})
		return after, err
	}}
}

// opWrite writes p at off of disk through agent i, with FUA.
func opWrite(i int, disk string, off int, p []byte) fxOp {
	return fxOp{name: "write", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		copy(after.own(disk)[off:], p)
		d, err := h.c.Agents[i].Open(h.ctx, disk)
		if err != nil {
			return after, err
		}
		return after, d.WriteAt(h.ctx, p, uint64(off), true)
	}, torn: true}
}

// opWriteLone is opWrite (with FUA) by agent 0 on a disk agent 1 has
// closed: one agent maps it, so the controller keeps the write's map
// change in memory until the FUA's flush commits it.
func opWriteLone(disk string, off int, p []byte) fxOp {
	return fxOp{name: "write", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		copy(after.own(disk)[off:], p)
		if d, err := h.c.Agents[1].Open(h.ctx, disk); err == nil {
			// Once for this Open, once for prepare's.
			if err := d.Close(h.ctx); err != nil {
				return m, err
			}
			if err := d.Close(h.ctx); err != nil {
				return m, err
			}
		}
		d, err := h.c.Agents[0].Open(h.ctx, disk)
		if err != nil {
			return after, err
		}
		return after, d.WriteAt(h.ctx, p, uint64(off), true)
	}, torn: true}
}

func opTrim(i int, disk string, off, n int) fxOp {
	return fxOp{name: "trim", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		clear(after.own(disk)[off : off+n])
		d, err := h.c.Agents[i].Open(h.ctx, disk)
		if err != nil {
			return after, err
		}
		return after, d.Trim(h.ctx, uint64(off), uint64(n))
	}, torn: true}
}

func opDelete(name string) fxOp {
	return fxOp{name: "delete", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		delete(after, name)
		return after, h.c.Ctrl.DeleteDisk(h.ctx, name)
	}}
}

func opResize(name string, segs int) fxOp {
	return fxOp{name: "resize", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		d := after[name]
		nd := make([]byte, segs*seg64)
		copy(nd, d.data)
		d.data = nd
		after[name] = d
		_, err := h.c.Ctrl.ResizeDisk(h.ctx, name, uint64(segs*seg64), true)
		return after, err
	}}
}

// opRollback rolls disk back to its snapshot to: it takes to's data and
// size.
func opRollback(disk, to string) fxOp {
	return fxOp{name: "rollback", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		d := after[disk]
		d.data = m[to].data
		after[disk] = d
		_, err := h.c.Ctrl.Rollback(h.ctx, disk, to)
		return after, err
	}}
}

func opRename(from, to string) fxOp {
	return fxOp{name: "rename", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		after[to] = after[from]
		delete(after, from)
		_, err := h.c.Ctrl.RenameDisk(h.ctx, from, to)
		return after, err
	}}
}

// opFlatten flattens a writable disk: its data stays. Its data is the same
// before and after, so settled runs it again (finishing one that stopped
// half way, as a user would after a crash) and checks that it shares no
// slot.
func opFlatten(name string) fxOp {
	return fxOp{name: "flatten", run: func(h *fx, m fxModel) (fxModel, error) {
		return m.clone(), h.c.Ctrl.Flatten(h.ctx, name, nil)
	}, settled: func(h *fx) error {
		if err := h.c.Ctrl.Flatten(h.ctx, name, nil); err != nil {
			return fmt.Errorf("flatten %s again: %w", name, err)
		}
		u, err := h.c.Ctrl.DiskUsage(h.ctx, name)
		if err != nil {
			return err
		}
		if u.Shared != 0 {
			return fmt.Errorf("flattened %s still shares %d bytes", name, u.Shared)
		}
		return nil
	}}
}

// opDrain drains container id: every disk's data stays. Once it has
// taken effect, a second drain (as after an interrupted one) ends with
// the container holding no slot, and it can be removed.
func opDrain(id uint32) fxOp {
	return fxOp{name: "drain", run: func(h *fx, m fxModel) (fxModel, error) {
		return m.clone(), h.c.Ctrl.Drain(h.ctx, id, nil)
	}, settled: func(h *fx) error {
		if err := h.c.Ctrl.Drain(h.ctx, id, nil); err != nil {
			return fmt.Errorf("drain container %d again: %w", id, err)
		}
		cs, err := h.c.Ctrl.ListContainers(h.ctx)
		if err != nil {
			return err
		}
		for _, ct := range cs {
			if ct.ID == id && (ct.Used != 0 || ct.State != meta.ContainerDraining) {
				return fmt.Errorf("drained container %d: %d slots used, %v", id, ct.Used, ct.State)
			}
		}
		return nil
	}}
}

// opImport exports snapshot snap (incrementally from base, if set) and
// imports the stream into disk: a full stream makes disk and its snapshot,
// an incremental one brings disk to snap's data and adds the snapshot.
func opImport(disk, snap, base string) fxOp {
	return fxOp{name: "import", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		d, ok := after[disk]
		if !ok {
			d.family = disk
		}
		d.data = m[snap].data
		after[disk] = d
		after[controller.ImportSnapshotName(disk, snap)] = fxDisk{data: m[snap].data, readOnly: true, family: d.family}
		var b bytes.Buffer
		if err := h.c.Ctrl.Export(h.ctx, controller.ExportOptions{Snapshot: snap, Base: base}, &b); err != nil {
			return m, err
		}
		_, err := h.c.Ctrl.Import(h.ctx, controller.ImportOptions{Disk: disk}, &b)
		return after, err
	}}
}

func opSetReadOnly(name string, ro bool) fxOp {
	return fxOp{name: "set-read-only", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		d := after[name]
		d.readOnly = ro
		after[name] = d
		_, err := h.c.Ctrl.SetReadOnly(h.ctx, name, ro)
		return after, err
	}}
}

// pattern returns n bytes that name where they were written.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

// fxSetup is the state every crash point starts from: disks D (forward)
// and E (reverse) written and snapshotted (D.s, E.s), D rewritten in part
// after its snapshot, and F written. Every write is flushed.
func fxSetup(h *fx) fxModel {
	m := fxModel{}
	steps := []fxOp{
		opCreate("D", false), opCreateReverse("E"), opCreate("F", false),
		opWrite(0, "D", 0, pattern(1, 3*seg64)),
		opWrite(1, "E", 0, pattern(2, 2*seg64+100)),
		opWrite(0, "F", seg64, pattern(3, seg64)),
		opSnapshot([]string{"D"}, []string{"D.s"}, false),
		opSnapshot([]string{"E"}, []string{"E.s"}, false),
		opWrite(0, "D", 2*seg64+10, pattern(4, 1000)),
		// I is F imported at F@a; F moves on to F@b.
		opSnapshot([]string{"F"}, []string{"F@a"}, false),
		opImport("I", "F@a", ""),
		opWrite(0, "F", 0, pattern(5, seg64+300)),
		opSnapshot([]string{"F"}, []string{"F@b"}, false),
	}
	for _, op := range steps {
		var err error
		if m, err = op.run(h, m); err != nil {
			h.t.Fatalf("setup %s: %v", op.name, err)
		}
	}
	return m
}

// prepare opens every disk of m on both agents and reads it, so that both
// hold entries the operation must change.
func (h *fx) prepare(m fxModel) error {
	for _, a := range h.c.Agents {
		for _, name := range m.names() {
			d, err := a.Open(h.ctx, name)
			if err != nil {
				return fmt.Errorf("agent %s: open %s: %w", a.Name(), name, err)
			}
			if err := d.ReadAt(h.ctx, h.readBuf(len(m[name].data)), 0); err != nil {
				return fmt.Errorf("agent %s: read %s: %w", a.Name(), name, err)
			}
		}
	}
	return nil
}

// catalogue compares the controller's disks with m's: names, sizes and
// read-only flags.
func (h *fx) catalogue(m fxModel) error {
	ds, err := h.c.Ctrl.Disks(h.ctx)
	if err != nil {
		return err
	}
	var got []string
	for _, d := range ds {
		got = append(got, fmt.Sprintf("%s:%d:%v", d.Name, d.Size, d.ReadOnly))
	}
	var want []string
	for _, n := range m.names() {
		want = append(want, fmt.Sprintf("%s:%d:%v", n, len(m[n].data), m[n].readOnly))
	}
	sort.Strings(got)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		return fmt.Errorf("disks %v, want %v", got, want)
	}
	return nil
}

// contents reads every disk of m whole through agent i and compares.
func (h *fx) contents(m fxModel, i int) error {
	a := h.c.Agents[i]
	for _, name := range m.names() {
		d, err := a.Open(h.ctx, name)
		if err != nil {
			return fmt.Errorf("agent %s: open %s: %w", a.Name(), name, err)
		}
		got := h.readBuf(len(m[name].data))
		if err := d.ReadAt(h.ctx, got, 0); err != nil {
			return fmt.Errorf("agent %s: read %s: %w", a.Name(), name, err)
		}
		if j := firstDiff(got, m[name].data); j >= 0 {
			return fmt.Errorf("agent %s: disk %s: byte %d (segment %d) reads %#x, want %#x", a.Name(), name, j, j/seg64, got[j], m[name].data[j])
		}
	}
	return nil
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// matches reports whether the cluster holds exactly model m.
func (h *fx) matches(m fxModel) error {
	if err := h.catalogue(m); err != nil {
		return err
	}
	return h.contents(m, 1)
}

// outcome checks that the cluster holds before or after, wholly: after if
// the operation was acknowledged. It returns which. If torn, each 4 KiB
// block (the smallest sub-block: table.MinSubBlock) may come from either,
// independently ("torn").
// The model returned is what the cluster holds.
func (h *fx) outcome(before, after fxModel, acked, torn bool) (string, fxModel, error) {
	errAfter := h.matches(after)
	if errAfter == nil {
		return "after", after, nil
	}
	if acked {
		return "", nil, fmt.Errorf("acknowledged operation lost: %v", errAfter)
	}
	errBefore := h.matches(before)
	if errBefore == nil {
		return "before", before, nil
	}
	if torn {
		m, err := h.tornMatch(before, after)
		if err != nil {
			return "", nil, fmt.Errorf("neither before (%v) nor after (%v), nor blocks of both: %v", errBefore, errAfter, err)
		}
		return "torn", m, nil
	}
	return "", nil, fmt.Errorf("neither before (%v) nor after (%v)", errBefore, errAfter)
}

// tornMatch checks that every 4 KiB block of every disk holds its bytes
// of before or of after (which have the same disks, of the same sizes),
// and returns the model of what it holds. A write that was not
// acknowledged may land in part: a segment is written sub-block by
// sub-block, and each block reads old or new.
func (h *fx) tornMatch(before, after fxModel) (fxModel, error) {
	if err := h.catalogue(after); err != nil {
		return nil, err
	}
	a := h.c.Agents[0]
	m := after.clone()
	for _, name := range after.names() {
		d, err := a.Open(h.ctx, name)
		if err != nil {
			return nil, err
		}
		got := make([]byte, len(after[name].data))
		if err := d.ReadAt(h.ctx, got, 0); err != nil {
			return nil, err
		}
		const blk = table.MinSubBlock
		for s := 0; s < len(got); s += blk {
			g := got[s : s+blk]
			if !bytes.Equal(g, after[name].data[s:s+blk]) && !bytes.Equal(g, before[name].data[s:s+blk]) {
				return nil, fmt.Errorf("disk %s block %d (segment %d) holds neither its old nor its new bytes", name, s/blk, s/seg64)
			}
		}
		m[name] = fxDisk{data: got, readOnly: after[name].readOnly, family: after[name].family}
	}
	return m, nil
}

// checkClean requires Check to find nothing.
func (h *fx) checkClean() error {
	ps, err := h.c.Ctrl.Check(h.ctx)
	if err != nil {
		return fmt.Errorf("check: %w", err)
	}
	if len(ps) > 0 {
		return fmt.Errorf("check found %d problems: %v", len(ps), ps)
	}
	return nil
}

// copyDir copies the data directory src to dst, holes left out.
func copyDir(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, e os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		if e.IsDir() {
			return os.MkdirAll(to, 0o700)
		}
		return copySparse(p, to)
	})
	if err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
}

func copySparse(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := copyData(in, out, fi.Size()); err != nil {
		out.Close()
		return err
	}
	if err := out.Truncate(fi.Size()); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// copyData copies the data of in's [0, size) to out, leaving holes
// where in has holes or zeros. It reads only the extents that hold data
// (SEEK_DATA, SEEK_HOLE): the containers are mostly holes, and reading
// those under the race detector was most of a crash run's time.
func copyData(in, out *os.File, size int64) error {
	buf := make([]byte, 64<<10)
	fd := int(in.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // nothing but a hole after off
		}
		if err != nil {
			return fmt.Errorf("seek data in %s: %w", in.Name(), err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole in %s: %w", in.Name(), err)
		}
		hole = min(hole, size)
		for p := data; p < hole; {
			n, err := in.ReadAt(buf[:min(int64(len(buf)), hole-p)], p)
			if n > 0 && !isZero(buf[:n]) {
				if _, err := out.WriteAt(buf[:n], p); err != nil {
					return err
				}
			}
			p += int64(n)
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
		}
		off = hole
	}
	return nil
}

var zeros = make([]byte, 64<<10)

// isZero reports whether p (at most 64 KiB) is all zeros, with
// bytes.Equal's assembly rather than a loop the race detector checks
// byte by byte.
func isZero(p []byte) bool { return bytes.Equal(p, zeros[:len(p)]) }

// soakDuration returns $SEGMAP_SOAK, or 0 when it is not set.
func soakDuration(t testing.TB) time.Duration {
	v := os.Getenv("SEGMAP_SOAK")
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(strings.TrimSpace(v))
	if err != nil {
		t.Fatalf("SEGMAP_SOAK=%q: %v", v, err)
	}
	return d
}

// freeSlotsZero checks that every free slot reads as zero, as the
// controller believes (it hands free slots out without zeroing them once
// it has zeroed a container's free slots in its life): it preallocates a
// disk over every free slot, reads it back through agent b (if check),
// and deletes it again. Without check it only makes the controller zero
// its free slots, and trust them from then on. Only online containers
// count: no slot is allocated on a draining one.
func (h *fx) freeSlotsZero(check bool) error {
	cs, err := h.c.Ctrl.ListContainers(h.ctx)
	if err != nil {
		return err
	}
	var free uint64
	for _, ct := range cs {
		if ct.SlotSize == seg64 && ct.State == meta.ContainerOnline {
			free += ct.Free()
		}
	}
	if free == 0 {
		return nil
	}
	const name = "free-slots"
	if _, err := h.c.Ctrl.CreateDisk(h.ctx, controller.CreateOptions{Name: name, Size: free * seg64, SegmentSize: seg64, Preallocate: true}); err != nil {
		return fmt.Errorf("preallocate the %d free slots: %w", free, err)
	}
	if !check {
		return h.c.Ctrl.DeleteDisk(h.ctx, name)
	}
	d, err := h.c.Agents[1].Open(h.ctx, name)
	if err != nil {
		return err
	}
	got := make([]byte, free*seg64)
	if err := d.ReadAt(h.ctx, got, 0); err != nil {
		return fmt.Errorf("read the free slots: %w", err)
	}
	if j := firstDiff(got, make([]byte, len(got))); j >= 0 {
		return fmt.Errorf("a free slot is not zero: byte %d of the %d free slots reads %#x", j, free, got[j])
	}
	if err := d.Close(h.ctx); err != nil {
		return err
	}
	return h.c.Ctrl.DeleteDisk(h.ctx, name)
}

// randomHistory runs a random history of 3 to 22 operations on h, from
// model m, and returns the model after it; a failure names the seed and
// the flag (rerun) that replays it.
func randomHistory(t *testing.T, r *rand.Rand, h *fx, m fxModel, seed uint64, rerun string) fxModel {
	t.Helper()
	var err error
	for j, n := 0, 3+r.IntN(20); j < n; j++ {
		op := randomOp(r, m)
		if m, err = op.run(h, m); err != nil {
			h.close()
			t.Fatalf("seed %d: history op %d (%s): %v (rerun with %s %d)", seed, j, op.name, err, rerun, seed)
		}
	}
	return m
}
