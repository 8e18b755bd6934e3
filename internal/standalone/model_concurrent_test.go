package standalone_test

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

var (
	concSeed   = flag.Uint64("modelconc.seed", 0, "run TestModelConcurrent with this seed only (0: the default seeds)")
	concOps    = flag.Int("modelconc.ops", 0, "operations per model and seed in TestModelConcurrent (0: $SEGMAP_MODELCONC_OPS or 120)")
	concSeeds  = flag.Int("modelconc.seeds", 0, "number of seeds in TestModelConcurrent (0: $SEGMAP_MODELCONC_SEEDS or 2)")
	concModels = flag.Int("modelconc.models", 3, "models run side by side in TestModelConcurrent")
)

// sharedRun is what models running side by side on one cluster share.
type sharedRun struct {
	// gate is taken shared by every operation and exclusively by the
	// restarts of an agent or of the controller, which every model's
	// handles and the controller depend on.
	gate   sync.RWMutex
	models []*model
}

// TestModelConcurrent runs several models (see TestModel) side by side
// on one cluster, each on disks of its own, so that the controller
// resolves faults of many disks and families at once: copies on write
// on many disks, allocations racing deletes and discards that free
// slots, snapshots, resizes and reverse-delta copies of one family while
// another faults, the zeroing of containers after a restart racing the
// allocations of the other models. Each model also runs operations on
// several of its disks at once (parallelIO), from both agents. Every
// read is compared with the model; every snapshot must keep its data;
// the store must pass Check after every operation (Check reads one
// transaction, so it sees no half change, whatever runs meanwhile).
//
// The operations each model picks are seeded (model k of seed s uses
// the seed s*1000+k); their interleaving is not. Under `make soak`
// (SEGMAP_SOAK=DURATION) fresh seeds follow until the duration has passed.
// Reproduce with -run TestModelConcurrent -modelconc.seed N.
func TestModelConcurrent(t *testing.T) {
	ops := *concOps
	if ops == 0 {
		ops = envInt("SEGMAP_MODELCONC_OPS", 120)
	}
	plans := map[table.Plan]uint64{}
	total, nseeds := runSeeds(t, *concSeed, *concSeeds, "SEGMAP_MODELCONC_SEEDS", 2, func(t *testing.T, seed uint64) int {
		return runModelConcurrent(t, seed, ops, *concModels, plans)
	})
	t.Logf("summary: concurrent model %d operations over %d seeds; faults resolved by plan: %v", total, nseeds, plans)
	// Every way of resolving a fault must have run in a long run, but
	// ClearNoWrite: it needs a reverse copy among three sharers and then
	// deletes that leave one, rare with fewer disks per model (TestModel
	// covers it).
	if !t.Failed() && total >= 1000 {
		for p := table.Load; p <= table.FillAll; p++ {
			if p != table.Deny && p != table.ClearNoWrite && plans[p] == 0 {
				t.Errorf("no fault was resolved by %v in %d operations", p, total)
			}
		}
	}
}

func runModelConcurrent(t *testing.T, seed uint64, ops, nmodels int, plans map[table.Plan]uint64) int {
	ctx := context.Background()
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Agents: []string{"host-a", "host-b"},
		// Every second seed, the controller copies whole segments
		// (copy-forward) instead of the agents' sub-segment copies.
		ControllerCopies: seed%2 == 0,
		Pool: []standalone.PoolSpec{
			{SlotSize: seg64, Slots: 256 * uint64(nmodels), Count: 2},
			{SlotSize: seg128, Slots: 64 * uint64(nmodels), Count: 2},
		},
		WrapAgentContainer: func(_ string, ct container.Container) container.Container {
			return &slowContainer{Container: ct, seed: seed}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	sh := &sharedRun{}
	for k := range nmodels {
		s := seed*1000 + uint64(k)
		sh.models = append(sh.models, &model{
			t: t, rng: rand.New(rand.NewPCG(s, s^0x5e9a)), ctx: ctx, c: c,
			disks: map[string]*mdisk{}, open: []map[string]*agent.Disk{{}, {}},
			stats: map[string]int{}, plans: plans, maxDisks: 10,
			prefix: fmt.Sprintf("m%d", k), sh: sh,
		})
	}
	defer func() {
		for p, n := range c.Ctrl.FaultCounts() {
			plans[p] += n
		}
		if err := c.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if t.Failed() {
			t.Logf("FAILED with seed %d; rerun with -run 'TestModelConcurrent/seed=%d$' -modelconc.seed %d -modelconc.ops %d (the interleaving may differ)", seed, seed, seed, ops)
		}
	}()
	var wg sync.WaitGroup
	for _, m := range sh.models {
		wg.Go(func() { m.runShared(ops) })
	}
	wg.Wait()
	if t.Failed() {
		return 0
	}
	// Finally read every disk whole through both agents.
	total := 0
	for _, m := range sh.models {
		for _, d := range m.sorted() {
			for i := range m.open {
				m.verifyNow(i, d)
			}
		}
		total += m.seq
		t.Logf("seed %d model %s: %d operations: %v", seed, m.prefix, m.seq, m.stats)
	}
	ps, err := c.Ctrl.Check(ctx)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	for _, p := range ps {
		t.Errorf("check: %v", p)
	}
	return total
}

// verifyNow reads d whole through agent i, from the test's goroutine.
func (m *model) verifyNow(i int, d *mdisk) {
	m.t.Helper()
	h, err := m.c.Agents[i].Open(m.ctx, d.name)
	if err != nil {
		m.t.Fatalf("agent %d open %s: %v", i, d.name, err)
	}
	p := make([]byte, len(d.data))
	if err := h.ReadAt(m.ctx, p, 0); err != nil {
		m.t.Fatalf("agent %d read %s: %v", i, d.name, err)
	}
	if !bytes.Equal(p, d.data) {
		m.t.Errorf("agent %d: %s does not read as the model has it", i, d.name)
	}
}

// runShared runs ops operations of m beside the other models of m.sh. It
// runs in a goroutine of its own: a failure ends it (fatalf).
func (m *model) runShared(ops int) {
	mix := append(m.mix(), modelOp{12, "parallel-io", m.parallelIO, false})
	sum := 0
	for _, o := range mix {
		sum += o.w
	}
	run := func(o modelOp) {
		if o.global {
			m.sh.gate.Lock()
			defer m.sh.gate.Unlock()
		} else {
			m.sh.gate.RLock()
			defer m.sh.gate.RUnlock()
		}
		if *modelTrace {
			m.t.Logf("model %s op %d: %s", m.prefix, m.seq, o.name)
		}
		o.fn()
		m.check()
	}
	run(modelOp{name: "create", fn: m.create})
	for m.seq = 0; m.seq < ops; m.seq++ {
		r := m.rng.IntN(sum)
		for _, o := range mix {
			if r < o.w {
				run(o)
				break
			}
			r -= o.w
		}
	}
}

// parallelIO runs I/O on two to four of the model's disks at once, one
// operation per disk, through either agent: writes that copy on write on
// several disks of a family at once (a disk and its clones share slots at
// the same segment indexes), zeroing and trims that free slots while
// others allocate, and reads, of snapshots too, which must read what the
// model holds: no one else writes those disks meanwhile.
func (m *model) parallelIO() {
	ds := m.sorted()
	if len(ds) < 2 {
		m.create()
		return
	}
	m.rng.Shuffle(len(ds), func(i, j int) { ds[i], ds[j] = ds[j], ds[i] })
	ds = ds[:2+m.rng.IntN(min(3, len(ds)-1))]
	type job struct {
		d      *mdisk
		h      *agent.Disk
		kind   int // 0 write, 1 trim, 2 write zeroes, 3 read
		off, n uint64
		p      []byte
		fua    bool
	}
	jobs := make([]job, len(ds))
	for i, d := range ds {
		j := job{d: d, h: m.handle(m.rng.IntN(2), d), kind: 3}
		if !d.readOnly {
			j.kind = []int{0, 0, 0, 1, 2, 3}[m.rng.IntN(6)]
		}
		j.off, j.n = m.span(d)
		if j.kind == 0 {
			j.p = make([]byte, j.n)
			for k := range j.p {
				j.p[k] = byte(m.rng.Uint32())
			}
		}
		j.fua = m.rng.IntN(8) == 0
		jobs[i] = j
	}
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() {
			var err error
			switch j.kind {
			case 0:
				err = j.h.WriteAt(m.ctx, j.p, j.off, j.fua)
			case 1:
				err = j.h.Trim(m.ctx, j.off, j.n)
			case 2:
				err = j.h.WriteZeroes(m.ctx, j.off, j.n, j.fua)
			case 3:
				got := make([]byte, j.n)
				if err = j.h.ReadAt(m.ctx, got, j.off); err == nil && !bytes.Equal(got, j.d.data[j.off:j.off+j.n]) {
					err = errors.New("read differs from the model")
				}
			}
			if err != nil {
				errs[i] = fmt.Errorf("%s op %d [%d,+%d): %w", j.d.name, j.kind, j.off, j.n, err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		m.fatalf("parallel I/O: %v", err)
	}
	for _, j := range jobs {
		switch j.kind {
		case 0:
			copy(j.d.data[j.off:], j.p)
		case 1, 2:
			clear(j.d.data[j.off : j.off+j.n])
		}
		m.tracef("parallel %s kind %d [%d,+%d)", j.d.name, j.kind, j.off, j.n)
	}
	m.stats["parallel-io"]++
}
