package standalone_test

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

var (
	modelSeed  = flag.Uint64("model.seed", 0, "run TestModel with this seed only (0: the default seeds)")
	modelOps   = flag.Int("model.ops", 0, "operations per seed in TestModel (0: $SEGMAP_MODEL_OPS or 700)")
	modelTrace = flag.Bool("model.trace", false, "log every operation of TestModel")
	modelSeeds = flag.Int("model.seeds", 0, "number of seeds in TestModel (0: $SEGMAP_MODEL_SEEDS or 3)")
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestModel drives one controller and two agents that map the same disks
// with random operations, and compares every read with a plain byte-array
// model of every disk and snapshot. After every operation the store must
// pass Check. Run a long one with
//
//	go test -run TestModel ./internal/standalone -model.ops 100000 -model.seeds 10
//
// and reproduce a failure with -model.seed N.
func TestModel(t *testing.T) {
	ops := *modelOps
	if ops == 0 {
		ops = envInt("SEGMAP_MODEL_OPS", 700)
	}
	plans := map[table.Plan]uint64{}
	total, nseeds := runSeeds(t, *modelSeed, *modelSeeds, "SEGMAP_MODEL_SEEDS", 3, func(t *testing.T, seed uint64) int {
		return runModel(t, seed, ops, plans)
	})
	t.Logf("summary: model %d operations over %d seeds; faults resolved by plan: %v", total, nseeds, plans)
	// The run must have exercised every way of resolving a fault.
	if !t.Failed() && total >= 1000 {
		for p := table.Load; p <= table.FillAll; p++ {
			if p != table.Deny && plans[p] == 0 {
				t.Errorf("no fault was resolved by %v in %d operations", p, total)
			}
		}
	}
}

// runSeeds runs run once per seed and returns the operations they ran and
// the seeds run: seed one alone if it is set, else seeds 1 to n (n from
// env, or def, when 0). Under `make soak` (SEGMAP_SOAK=DURATION) fresh
// seeds follow until the duration has passed. It stops at the first
// failure.
func runSeeds(t *testing.T, one uint64, n int, env string, def int, run func(t *testing.T, seed uint64) int) (total, nseeds int) {
	var seeds []uint64
	if one != 0 {
		seeds = []uint64{one}
	} else {
		if n == 0 {
			n = envInt(env, def)
		}
		for i := 0; i < n; i++ {
			seeds = append(seeds, uint64(i)+1)
		}
	}
	var deadline time.Time
	if soak := soakDuration(t); soak > 0 && one == 0 {
		deadline = time.Now().Add(soak)
	}
	next := uint64(time.Now().UnixNano())
	for i := 0; i < len(seeds) || time.Now().Before(deadline); i++ {
		if i >= len(seeds) {
			seeds = append(seeds, next+uint64(i))
		}
		seed := seeds[i]
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { total += run(t, seed) })
		if t.Failed() {
			break
		}
	}
	return total, len(seeds)
}

// Geometry of the model: small segments so that disks are small.
const (
	seg64  = 64 << 10
	seg128 = 128 << 10
	// maxDisks bounds the number of disks so the pool never fills.
	maxDisks = 14
)

// slowContainer delays one I/O in eight by up to a millisecond.
type slowContainer struct {
	container.Container
	seed uint64
	n    atomic.Uint64
}

func (s *slowContainer) delay() {
	x := s.n.Add(1) * (s.seed | 1) * 0x9e3779b97f4a7c15
	if x>>61 == 0 {
		time.Sleep(time.Duration(x>>40%1000) * time.Microsecond)
	}
}

func (s *slowContainer) ReadAt(p []byte, off int64) (int, error) {
	s.delay()
	return s.Container.ReadAt(p, off)
}

func (s *slowContainer) WriteAt(p []byte, off int64) (int, error) {
	s.delay()
	return s.Container.WriteAt(p, off)
}

type mdisk struct {
	clone    bool // a writable copy of another disk
	name     string
	data     []byte
	segSize  uint64
	readOnly bool
	policy   table.Policy
	// family is the name at creation of the disk it all started from:
	// a disk may roll back to the read-only disks of its family.
	family string
}

type model struct {
	t     *testing.T
	rng   *rand.Rand
	ctx   context.Context
	c     *standalone.Cluster
	disks map[string]*mdisk
	// open[i] holds agent i's open disks.
	open  []map[string]*agent.Disk
	seq   int
	stats map[string]int
	plans map[table.Plan]uint64
	// maxDisks bounds this model's disks; prefix starts their names.
	maxDisks int
	prefix   string
	// sh is set when several models run side by side on one cluster
	// (TestModelConcurrent).
	sh *sharedRun
}

// modelOp is one kind of operation of the model, with its weight.
type modelOp struct {
	w    int
	name string
	fn   func()
	// global ops (restarts) run alone when models run side by side.
	global bool
}

// mix returns the operations of the model and their weights.
func (m *model) mix() []modelOp {
	return []modelOp{
		{30, "write", m.write, false}, {30, "read", m.read, false}, {5, "flush", m.flush, false}, {6, "zero", m.zero, false},
		{4, "create", m.create, false}, {2, "delete", m.delete, false}, {4, "snapshot", m.snapshot, false}, {2, "group-snapshot", m.groupSnapshot, false},
		{2, "clone", m.clone, false}, {1, "resize", m.resize, false}, {2, "concurrent", m.concurrent, false},
		{1, "restart-agent", m.restartAgent, true}, {1, "restart-controller", m.restartController, true}, {2, "read-only-write", m.readOnlyWrite, false},
		{2, "rollback", m.rollback, false}, {1, "rename", m.rename, false}, {1, "set-read-only", m.setReadOnly, false}, {1, "flatten", m.flatten, false},
		{1, "snapshot-delete", m.snapshotDelete, false}, {1, "set-error", m.setError, false},
	}
}

func runModel(t *testing.T, seed uint64, ops int, plans map[table.Plan]uint64) int {
	ctx := context.Background()
	dir := t.TempDir()
	c, err := standalone.Open(ctx, dir, standalone.Options{
		Agents: []string{"host-a", "host-b"},
		// Every third seed, the controller copies whole segments
		// (copy-forward) instead of the agents' sub-segment copies.
		ControllerCopies: seed%3 == 0,
		Pool: []standalone.PoolSpec{
			{SlotSize: seg64, Slots: 512, Count: 2},
			{SlotSize: seg128, Slots: 128, Count: 2},
		},
		// Some agent writes and reads take a while, so that commands
		// really find I/O in flight and Blocking has something to
		// wait for.
		WrapAgentContainer: func(_ string, ct container.Container) container.Container {
			return &slowContainer{Container: ct, seed: seed}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	m := &model{
		t: t, rng: rand.New(rand.NewPCG(seed, seed^0x5e9a)), ctx: ctx, c: c,
		disks: map[string]*mdisk{}, open: []map[string]*agent.Disk{{}, {}},
		stats: map[string]int{}, plans: plans, maxDisks: maxDisks,
	}
	defer func() { m.c.Close() }()
	defer func() {
		// The controller restarts; count what the last one did.
		for p, n := range m.c.Ctrl.FaultCounts() {
			plans[p] += n
		}
	}()
	defer func() {
		if t.Failed() {
			t.Logf("FAILED with seed %d after %d operations; rerun with -run 'TestModel/seed=%d$' -model.seed %d -model.ops %d", seed, m.seq, seed, seed, ops)
		}
	}()

	mix := m.mix()
	sum := 0
	for _, o := range mix {
		sum += o.w
	}
	m.create()
	for m.seq = 0; m.seq < ops && !t.Failed(); m.seq++ {
		r := m.rng.IntN(sum)
		for _, o := range mix {
			if r < o.w {
				if *modelTrace {
					t.Logf("op %d: %s", m.seq, o.name)
				}
				o.fn()
				break
			}
			r -= o.w
		}
		m.check()
	}
	// Finally read every disk whole through both agents.
	for _, d := range m.sorted() {
		for i := range m.open {
			m.verify(i, d, 0, uint64(len(d.data)))
		}
	}
	m.check()
	t.Logf("seed %d: %d operations: %v", seed, m.seq, m.stats)
	return m.seq
}

func (m *model) fatalf(format string, args ...any) {
	m.t.Helper()
	if m.sh != nil {
		// Not the test's goroutine: fail, and end this model's.
		m.t.Errorf("model %s op %d: "+format, append([]any{m.prefix, m.seq}, args...)...)
		runtime.Goexit()
	}
	m.t.Fatalf("op %d: "+format, append([]any{m.seq}, args...)...)
}

func (m *model) tracef(format string, args ...any) {
	if *modelTrace {
		m.t.Helper()
		m.t.Logf("    "+format, args...)
	}
}

func (m *model) check() {
	m.t.Helper()
	ps, err := m.c.Ctrl.Check(m.ctx)
	if err != nil {
		m.fatalf("check: %v", err)
	}
	for _, p := range ps {
		m.t.Errorf("model %s op %d: check: %v", m.prefix, m.seq, p)
	}
	if len(ps) > 0 {
		m.fatalf("check found %d problems", len(ps))
	}
}

func (m *model) sorted() []*mdisk {
	out := make([]*mdisk, 0, len(m.disks))
	for _, d := range m.disks {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

func (m *model) pick(writable bool) *mdisk {
	var ds []*mdisk
	for _, d := range m.sorted() {
		if !writable || !d.readOnly {
			ds = append(ds, d)
		}
	}
	if len(ds) == 0 {
		return nil
	}
	return ds[m.rng.IntN(len(ds))]
}

// handle returns agent i's open handle of d, opening it if needed.
func (m *model) handle(i int, d *mdisk) *agent.Disk {
	m.t.Helper()
	if h := m.open[i][d.name]; h != nil {
		return h
	}
	h, err := m.c.Agents[i].Open(m.ctx, d.name)
	if err != nil {
		m.fatalf("agent %d open %s: %v", i, d.name, err)
	}
	m.open[i][d.name] = h
	return h
}

// span returns a random range of d, often crossing segment boundaries.
func (m *model) span(d *mdisk) (off, n uint64) {
	size := uint64(len(d.data))
	switch m.rng.IntN(4) {
	case 0: // small, unaligned
		n = 1 + m.rng.Uint64N(4096)
	case 1: // around a segment boundary
		b := d.segSize * (1 + m.rng.Uint64N(max(size/d.segSize, 1)))
		off = b - min(b, 1+m.rng.Uint64N(8192))
		n = 1 + m.rng.Uint64N(16384)
		if off >= size {
			off = size - 1
		}
		return off, min(n, size-off)
	case 2: // a whole segment or several
		if size < d.segSize {
			return 0, size
		}
		s := m.rng.Uint64N(size / d.segSize)
		k := 1 + m.rng.Uint64N(min(3, size/d.segSize-s))
		return s * d.segSize, k * d.segSize
	default:
		n = 1 + m.rng.Uint64N(3*d.segSize)
	}
	n = min(n, size)
	off = m.rng.Uint64N(size - n + 1)
	return off, n
}

func (m *model) write() {
	if d := m.pick(true); d != nil {
		m.writeTo(d)
	}
}

// writeTo writes a random span of d through a random agent.
func (m *model) writeTo(d *mdisk) {
	i := m.rng.IntN(2)
	off, n := m.span(d)
	p := make([]byte, n)
	for j := range p {
		p[j] = byte(m.rng.Uint32())
	}
	if err := m.handle(i, d).WriteAt(m.ctx, p, off, m.rng.IntN(8) == 0); err != nil {
		m.fatalf("agent %d write %s [%d,+%d): %v", i, d.name, off, n, err)
	}
	copy(d.data[off:], p)
	m.tracef("agent %d write %s [%d,+%d) segs %d-%d", i, d.name, off, n, off/d.segSize, (off+n-1)/d.segSize)
	m.stats["write"]++
}

func (m *model) read() {
	d := m.pick(false)
	if d == nil {
		return
	}
	off, n := m.span(d)
	m.verify(m.rng.IntN(2), d, off, n)
	m.stats["read"]++
}

func (m *model) verify(i int, d *mdisk, off, n uint64) {
	m.t.Helper()
	p := make([]byte, n)
	if err := m.handle(i, d).ReadAt(m.ctx, p, off); err != nil {
		m.fatalf("agent %d read %s [%d,+%d): %v", i, d.name, off, n, err)
	}
	if want := d.data[off : off+n]; !bytes.Equal(p, want) {
		j := 0
		for j < len(p) && p[j] == want[j] {
			j++
		}
		m.fatalf("agent %d read %s [%d,+%d): differs from byte %d (disk offset %d, segment %d): got %x want %x",
			i, d.name, off, n, j, off+uint64(j), (off+uint64(j))/d.segSize, p[j:min(j+8, len(p))], want[j:min(j+8, len(p))])
	}
}

func (m *model) flush() {
	d := m.pick(false)
	if d == nil {
		return
	}
	if err := m.handle(m.rng.IntN(2), d).Flush(m.ctx); err != nil {
		m.fatalf("flush: %v", err)
	}
	m.stats["flush"]++
}

func (m *model) zero() {
	d := m.pick(true)
	if d == nil {
		return
	}
	i := m.rng.IntN(2)
	off, n := m.span(d)
	h := m.handle(i, d)
	var err error
	switch m.rng.IntN(3) {
	case 0:
		err = h.Trim(m.ctx, off, n)
	case 1:
		err = h.WriteZeroes(m.ctx, off, n, false)
	default:
		err = h.WriteZeroes(m.ctx, off, n, true)
	}
	if err != nil {
		m.fatalf("agent %d zero %s [%d,+%d): %v", i, d.name, off, n, err)
	}
	clear(d.data[off : off+n])
	m.tracef("agent %d zero %s [%d,+%d) segs %d-%d", i, d.name, off, n, off/d.segSize, (off+n-1)/d.segSize)
	m.stats["zero"]++
}

func (m *model) newName(prefix string) string {
	for {
		n := fmt.Sprintf("%s%d", prefix, m.rng.IntN(1000))
		if m.disks[n] == nil {
			return n
		}
	}
}

func (m *model) create() {
	if len(m.disks) >= m.maxDisks {
		m.delete()
		return
	}
	ss := uint64(seg64)
	if m.rng.IntN(3) == 0 {
		ss = seg128
	}
	segs := 1 + m.rng.Uint64N(8)
	size := segs * ss
	if m.rng.IntN(3) == 0 { // not a whole number of segments
		size -= 512 * (1 + m.rng.Uint64N(ss/512-1))
	}
	pol := table.Forward
	if m.rng.IntN(2) == 0 {
		pol = table.Reverse
	}
	name := m.newName(m.prefix + "d")
	if _, err := m.c.Ctrl.CreateDisk(m.ctx, controller.CreateOptions{Name: name, Size: size, SegmentSize: ss, Policy: pol}); err != nil {
		m.fatalf("create %s: %v", name, err)
	}
	m.disks[name] = &mdisk{name: name, data: make([]byte, size), segSize: ss, policy: pol, family: name}
	m.tracef("create %s size %d seg %d %v", name, size, ss, pol)
	m.stats["create"]++
}

func (m *model) delete() {
	if len(m.disks) <= 1 {
		return
	}
	d := m.pick(false)
	if err := m.c.Ctrl.DeleteDisk(m.ctx, d.name); err != nil {
		m.fatalf("delete %s: %v", d.name, err)
	}
	// Handles of the deleted disk fail from now on.
	for i := range m.open {
		if h := m.open[i][d.name]; h != nil {
			if err := h.ReadAt(m.ctx, make([]byte, 1), 0); !errors.Is(err, agent.ErrGone) {
				m.fatalf("read of deleted %s on agent %d: %v, want ErrGone", d.name, i, err)
			}
			delete(m.open[i], d.name)
		}
	}
	delete(m.disks, d.name)
	m.tracef("delete %s", d.name)
	m.stats["delete"]++
}

func (m *model) snapshotOf(srcs []*mdisk, writable bool) {
	m.t.Helper()
	if len(m.disks)+len(srcs) > m.maxDisks {
		m.delete()
		return
	}
	o := controller.SnapshotOptions{Writable: writable}
	for _, s := range srcs {
		o.Sources = append(o.Sources, s.name)
		o.Names = append(o.Names, m.newName(s.name+".s"))
	}
	for i := 1; i < len(o.Names); i++ { // newName may repeat within a group
		for j := 0; j < i; j++ {
			if o.Names[i] == o.Names[j] {
				o.Names[i] += "x"
			}
		}
	}
	out, err := m.c.Ctrl.Snapshot(m.ctx, o)
	if err != nil {
		m.fatalf("snapshot %v: %v", o.Sources, err)
	}
	m.tracef("snapshot %v -> %v writable=%v", o.Sources, o.Names, writable)
	for i, s := range srcs {
		if out[i].Name != o.Names[i] || out[i].ReadOnly == writable {
			m.fatalf("snapshot gave %+v", out[i])
		}
		m.disks[o.Names[i]] = &mdisk{name: o.Names[i], data: bytes.Clone(s.data), segSize: s.segSize, readOnly: !writable, policy: s.policy, clone: writable, family: s.family}
		if s.clone {
			m.stats["snapshot-of-clone"]++
		}
	}
}

func (m *model) snapshot() {
	if d := m.pick(false); d != nil {
		m.snapshotOf([]*mdisk{d}, m.rng.IntN(3) == 0)
		m.stats["snapshot"]++
	}
}

func (m *model) groupSnapshot() {
	ds := m.sorted()
	if len(ds) < 2 {
		return
	}
	m.rng.Shuffle(len(ds), func(i, j int) { ds[i], ds[j] = ds[j], ds[i] })
	m.snapshotOf(ds[:2+m.rng.IntN(min(2, len(ds)-1))], false)
	m.stats["group-snapshot"]++
}

// clone makes a writable copy of a read-only snapshot (or of anything).
func (m *model) clone() {
	var ro []*mdisk
	for _, d := range m.sorted() {
		if d.readOnly {
			ro = append(ro, d)
		}
	}
	if len(ro) == 0 {
		return
	}
	m.snapshotOf([]*mdisk{ro[m.rng.IntN(len(ro))]}, true)
	m.stats["clone"]++
}

func (m *model) resize() {
	d := m.pick(true)
	if d == nil {
		return
	}
	old := uint64(len(d.data))
	size := old + 512*(1+m.rng.Uint64N(2*d.segSize/512))
	shrink := false
	if m.rng.IntN(3) == 0 && old > d.segSize {
		size = d.segSize * m.rng.Uint64N(old/d.segSize)
		size = max(size, d.segSize)
		shrink = true
	}
	if _, err := m.c.Ctrl.ResizeDisk(m.ctx, d.name, size, false); shrink && !errors.Is(err, controller.ErrShrink) {
		m.fatalf("shrink %s without asking: %v", d.name, err)
	} else if !shrink && err != nil {
		m.fatalf("grow %s: %v", d.name, err)
	}
	if shrink {
		if _, err := m.c.Ctrl.ResizeDisk(m.ctx, d.name, size, true); err != nil {
			m.fatalf("shrink %s: %v", d.name, err)
		}
	}
	if size > old {
		d.data = append(d.data, make([]byte, size-old)...)
	} else {
		d.data = d.data[:size]
	}
	m.tracef("resize %s %d -> %d", d.name, old, size)
	m.stats["resize"]++
}

// concurrent writes through both agents to disjoint pieces of one disk
// while a snapshot of it is taken. Every piece lies within one segment, so
// the snapshot must hold, for each piece, either all of its old bytes or all
// of its new ones.
func (m *model) concurrent() {
	d := m.pick(true)
	if d == nil || len(m.disks) >= m.maxDisks {
		return
	}
	type piece struct {
		off uint64
		p   []byte
	}
	var pieces []piece
	for s := uint64(0); s*d.segSize < uint64(len(d.data)); s++ {
		end := min((s+1)*d.segSize, uint64(len(d.data)))
		for k := 0; k < 2; k++ {
			// Two disjoint pieces per segment: one in each half.
			half := (end - s*d.segSize) / 2
			lo := s*d.segSize + uint64(k)*half
			n := 1 + m.rng.Uint64N(min(half, 8192))
			off := lo + m.rng.Uint64N(half-n+1)
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(m.rng.Uint32())
			}
			pieces = append(pieces, piece{off, p})
		}
	}
	old := bytes.Clone(d.data)
	name := m.newName(d.name + ".c")
	var wg sync.WaitGroup
	errs := make(chan error, len(pieces)+1)
	for j, pc := range pieces {
		h := m.handle(j%2, d)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := h.WriteAt(m.ctx, pc.p, pc.off, false); err != nil {
				errs <- fmt.Errorf("write [%d,+%d): %w", pc.off, len(pc.p), err)
			}
		}()
	}
	// The snapshot is read as soon as it exists, while writes may still
	// be landing: a snapshot must not change after it is taken.
	early := make([]byte, len(old))
	wg.Add(1)
	delay := time.Duration(m.rng.IntN(300)) * time.Microsecond
	reader := m.c.Agents[m.rng.IntN(2)]
	go func() {
		defer wg.Done()
		time.Sleep(delay)
		if _, err := m.c.Ctrl.Snapshot(m.ctx, controller.SnapshotOptions{Sources: []string{d.name}, Names: []string{name}}); err != nil {
			errs <- fmt.Errorf("snapshot: %w", err)
			return
		}
		h, err := reader.Open(m.ctx, name)
		if err == nil {
			err = h.ReadAt(m.ctx, early, 0)
		}
		if err != nil {
			errs <- fmt.Errorf("early read of the snapshot: %w", err)
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		m.fatalf("concurrent on %s: %v", d.name, err)
	}
	for _, pc := range pieces {
		copy(d.data[pc.off:], pc.p)
	}
	// Read the snapshot and decide, piece by piece, old or new.
	snap := &mdisk{name: name, data: bytes.Clone(old), segSize: d.segSize, readOnly: true, policy: d.policy, family: d.family}
	got := make([]byte, len(old))
	if err := m.handle(m.rng.IntN(2), snap).ReadAt(m.ctx, got, 0); err != nil {
		m.fatalf("read snapshot %s: %v", name, err)
	}
	// A write in flight as the snapshot is taken may be in it in part,
	// as in a crash: each 4 KiB block of it (the unit a sub-segment copy
	// writes and maps) is old or new.
	const blk = table.MinSubBlock
	for _, pc := range pieces {
		end := pc.off + uint64(len(pc.p))
		for lo := pc.off; lo < end; {
			hi := min(end, (lo/blk+1)*blk)
			g, p := got[lo:hi], pc.p[lo-pc.off:hi-pc.off]
			switch {
			case bytes.Equal(g, p):
				copy(snap.data[lo:], p)
			case bytes.Equal(g, old[lo:hi]):
			default:
				m.fatalf("snapshot %s block [%d,%d) of piece [%d,+%d) is neither the old nor the new bytes", name, lo, hi, pc.off, len(pc.p))
			}
			lo = hi
		}
	}
	if !bytes.Equal(early, got) {
		m.fatalf("snapshot %s changed after it was taken", name)
	}
	m.disks[name] = snap
	m.tracef("concurrent %s -> %s", d.name, name)
	m.verify(0, snap, 0, uint64(len(snap.data)))
	m.stats["concurrent"]++
}

func (m *model) restartAgent() {
	i := m.rng.IntN(2)
	if err := m.c.RestartAgent(m.ctx, i); err != nil {
		m.fatalf("restart agent %d: %v", i, err)
	}
	m.open[i] = map[string]*agent.Disk{}
	if m.sh != nil {
		// Every model's handles on that agent are gone.
		for _, o := range m.sh.models {
			o.open[i] = map[string]*agent.Disk{}
		}
	}
	m.stats["restart-agent"]++
}

func (m *model) restartController() {
	for p, n := range m.c.Ctrl.FaultCounts() {
		m.plans[p] += n
	}
	if err := m.c.RestartController(m.ctx); err != nil {
		m.fatalf("restart controller: %v", err)
	}
	m.stats["restart-controller"]++
}

// readOnlyWrite checks that writes to a read-only snapshot are refused and
// change nothing.
// rollback rolls a writable disk back to a read-only disk of its family;
// its open handles read the snapshot's data from then on.
func (m *model) rollback() {
	d := m.pick(true)
	if d == nil {
		return
	}
	var snaps []*mdisk
	for _, s := range m.sorted() {
		if s.readOnly && s.family == d.family {
			snaps = append(snaps, s)
		}
	}
	if len(snaps) == 0 {
		return
	}
	s := snaps[m.rng.IntN(len(snaps))]
	if _, err := m.c.Ctrl.Rollback(m.ctx, d.name, s.name); err != nil {
		m.fatalf("rollback %s to %s: %v", d.name, s.name, err)
	}
	d.data = bytes.Clone(s.data)
	m.tracef("rollback %s to %s", d.name, s.name)
	m.stats["rollback"]++
}

// rename renames a disk; open handles go on under the new name.
func (m *model) rename() {
	d := m.pick(false)
	if d == nil {
		return
	}
	to := m.newName(m.prefix + "r")
	if _, err := m.c.Ctrl.RenameDisk(m.ctx, d.name, to); err != nil {
		m.fatalf("rename %s to %s: %v", d.name, to, err)
	}
	m.tracef("rename %s to %s", d.name, to)
	delete(m.disks, d.name)
	for i := range m.open {
		if h := m.open[i][d.name]; h != nil {
			delete(m.open[i], d.name)
			m.open[i][to] = h
		}
	}
	d.name = to
	m.disks[to] = d
	m.stats["rename"]++
}

// snapshotDelete snapshots a disk twice, writes to it, deletes the first
// snapshot and promotes the second to writable, then writes to that: a
// backup taken and dropped, a restore point put to use. Under the
// reverse-delta policy the write moves both snapshots onto a slot they
// share, stored No-write; once one is deleted, the other's first write
// finds it No-write with one holder (ClearNoWrite).
func (m *model) snapshotDelete() {
	d := m.pick(true)
	if d == nil || len(m.disks)+1 > m.maxDisks {
		return
	}
	t1 := m.newName(d.name + ".t")
	t2 := t1 + "u"
	for _, n := range []string{t1, t2} {
		if _, err := m.c.Ctrl.Snapshot(m.ctx, controller.SnapshotOptions{Sources: []string{d.name}, Names: []string{n}}); err != nil {
			m.fatalf("snapshot %s: %v", d.name, err)
		}
	}
	m.disks[t2] = &mdisk{name: t2, data: bytes.Clone(d.data), segSize: d.segSize, policy: d.policy, family: d.family}
	m.writeTo(d)
	if err := m.c.Ctrl.DeleteDisk(m.ctx, t1); err != nil {
		m.fatalf("delete %s: %v", t1, err)
	}
	if _, err := m.c.Ctrl.SetReadOnly(m.ctx, t2, false); err != nil {
		m.fatalf("promote %s: %v", t2, err)
	}
	m.tracef("snapshot %s as %s and %s, delete %s, promote %s", d.name, t1, t2, t1, t2)
	m.writeTo(m.disks[t2])
	m.stats["snapshot-delete"]++
}

// flatten flattens a writable disk: its data stays, and it shares nothing.
func (m *model) flatten() {
	d := m.pick(true)
	if d == nil {
		return
	}
	if err := m.c.Ctrl.Flatten(m.ctx, d.name, nil); err != nil {
		m.fatalf("flatten %s: %v", d.name, err)
	}
	m.tracef("flatten %s", d.name)
	if m.sh == nil { // alone on the cluster: no other model writes to it
		if u, err := m.c.Ctrl.DiskUsage(m.ctx, d.name); err != nil || u.Shared != 0 {
			m.fatalf("flattened %s: %+v, %v: still shared", d.name, u, err)
		}
	}
	m.stats["flatten"]++
}

// setReadOnly freezes a writable disk or promotes a read-only one.
// setError makes whole segments of a writable disk fail I/O, sees reads
// and writes there fail through both agents (and the rest of the disk
// still read right), sometimes snapshots it meanwhile (the snapshot fails
// there too), and clears the errors: the range then reads zeros.
func (m *model) setError() {
	d := m.pick(true)
	if d == nil || uint64(len(d.data)) < d.segSize {
		return
	}
	segs := uint64(len(d.data)) / d.segSize
	first := m.rng.Uint64N(segs)
	n := 1 + m.rng.Uint64N(min(3, segs-first))
	off, length := first*d.segSize, n*d.segSize
	if _, err := m.c.Ctrl.SetError(m.ctx, d.name, off, length); err != nil {
		m.fatalf("set error on %s [%d,+%d): %v", d.name, off, length, err)
	}
	m.tracef("set error on %s [%d,+%d)", d.name, off, length)
	p := make([]byte, 512)
	for i := range 2 {
		at := off + m.rng.Uint64N(length-uint64(len(p))+1)
		if err := m.handle(i, d).ReadAt(m.ctx, p, at); !errors.Is(err, protocol.ErrIO) {
			m.fatalf("agent %d read %s at %d in an Error range: %v, want EIO", i, d.name, at, err)
		}
		if err := m.handle(i, d).WriteAt(m.ctx, p, at, false); !errors.Is(err, protocol.ErrIO) {
			m.fatalf("agent %d write %s at %d in an Error range: %v, want EIO", i, d.name, at, err)
		}
	}
	if off > 0 {
		m.verify(m.rng.IntN(2), d, 0, off)
	}
	ds := []*mdisk{d}
	if m.rng.IntN(3) == 0 && len(m.disks) < m.maxDisks {
		// A snapshot now shares the Error entries; clear-errors
		// clears it too.
		before := make(map[string]bool, len(m.disks))
		for name := range m.disks {
			before[name] = true
		}
		m.snapshotOf([]*mdisk{d}, false)
		for _, s := range m.sorted() {
			if !before[s.name] {
				ds = append(ds, s)
			}
		}
	}
	for _, e := range ds {
		exts, err := m.c.Ctrl.ErrorExtents(m.ctx, e.name)
		if err != nil || len(exts) != 1 || exts[0] != (controller.Extent{Off: off, Len: length}) {
			m.fatalf("error extents of %s: %v %v, want [%d,+%d)", e.name, exts, err, off, length)
		}
		cleared, err := m.c.Ctrl.ClearErrors(m.ctx, e.name)
		if err != nil || cleared != length {
			m.fatalf("clear errors of %s: %d %v, want %d", e.name, cleared, err, length)
		}
		clear(e.data[off : off+length])
		m.verify(m.rng.IntN(2), e, off, length)
	}
	m.stats["set-error"]++
}

func (m *model) setReadOnly() {
	d := m.pick(false)
	if d == nil {
		return
	}
	if _, err := m.c.Ctrl.SetReadOnly(m.ctx, d.name, !d.readOnly); err != nil {
		m.fatalf("set %s read-only=%v: %v", d.name, !d.readOnly, err)
	}
	d.readOnly = !d.readOnly
	m.tracef("set %s read-only=%v", d.name, d.readOnly)
	m.stats["set-read-only"]++
}

func (m *model) readOnlyWrite() {
	var ro []*mdisk
	for _, d := range m.sorted() {
		if d.readOnly {
			ro = append(ro, d)
		}
	}
	if len(ro) == 0 {
		return
	}
	d := ro[m.rng.IntN(len(ro))]
	i := m.rng.IntN(2)
	off, n := m.span(d)
	h := m.handle(i, d)
	if err := h.WriteAt(m.ctx, make([]byte, n), off, false); !errors.Is(err, protocol.ErrReadOnly) {
		m.fatalf("write to read-only %s: %v, want ErrReadOnly", d.name, err)
	}
	if err := h.Trim(m.ctx, off, n); !errors.Is(err, protocol.ErrReadOnly) {
		m.fatalf("trim of read-only %s: %v, want ErrReadOnly", d.name, err)
	}
	m.verify(i, d, off, n)
	m.stats["read-only-write"]++
}
