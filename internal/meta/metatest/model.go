package metatest

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// modelSeeds are the seeds of the randomised model test; each runs as its
// own subtest, named after its seed, so `-run Model/Random/seed=N` replays it.
var modelSeeds = []uint64{1, 2, 3, 20250314}

// model is the expected content of a store: the tables of a few disks and
// the counts of one container.
type model struct {
	entries []map[uint64]table.Entry // per disk; missing means Zero
	refs    map[uint32]uint32        // missing means 0
}

func (m model) clone() model {
	c := model{refs: maps.Clone(m.refs)}
	for _, es := range m.entries {
		c.entries = append(c.entries, maps.Clone(es))
	}
	return c
}

// modelOp is one step of a transaction: SetEntries when disk >= 0, else
// SetRefs.
type modelOp struct {
	disk  int
	first uint64
	es    []table.Entry
	slot  uint32
	n     uint32
}

const (
	modelDisks = 2
	modelPages = 4                    // table pages the ops touch
	modelSlots = 2*meta.PageSlots + 5 // slots of the model's container
)

func testModel(t *testing.T, s meta.Store) {
	// The store is shared by the seeds' subtests; each uses its own disks
	// and container.
	for _, seed := range modelSeeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("seed %d", seed)
			runModel(t, s, seed)
		})
	}
}

func runModel(t *testing.T, s meta.Store, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, seed))
	var ids []meta.DiskID
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		ids = ids[:0]
		for i := range modelDisks {
			d, err := tx.CreateDisk(testDisk(fmt.Sprintf("model-%d-%d", seed, i)))
			if err != nil {
				return err
			}
			ids = append(ids, d.ID)
		}
		var err error
		c, err = tx.AddContainer(testContainer(fmt.Sprintf("model-%d", seed), modelSlots))
		return err
	})
	m := model{refs: map[uint32]uint32{}}
	for range modelDisks {
		m.entries = append(m.entries, map[uint64]table.Entry{})
	}

	randEntry := func() table.Entry {
		switch rng.IntN(5) {
		case 0:
			return table.ZeroEntry
		case 1:
			return table.ErrorEntry
		case 2:
			return atNW(uint32(rng.IntN(3)), rng.Uint32())
		default:
			return at(uint32(rng.IntN(3)), rng.Uint32())
		}
	}
	randOps := func() []modelOp {
		ops := make([]modelOp, 1+rng.IntN(12))
		for i := range ops {
			if rng.IntN(3) == 0 {
				ops[i] = modelOp{disk: -1, slot: nearBoundary(rng, meta.PageSlots, modelSlots), n: uint32(rng.IntN(3))}
				continue
			}
			first := uint64(nearBoundary(rng, meta.PageEntries, modelPages*meta.PageEntries))
			n := 1 + rng.IntN(4)
			if rng.IntN(8) == 0 {
				n = 1 + rng.IntN(meta.PageEntries+3)
			}
			n = min(n, modelPages*meta.PageEntries-int(first))
			es := make([]table.Entry, n)
			for j := range es {
				es[j] = randEntry()
			}
			ops[i] = modelOp{disk: rng.IntN(modelDisks), first: first, es: es}
		}
		return ops
	}
	froms := func() []uint32 {
		return []uint32{0, nearBoundary(rng, meta.PageSlots, modelSlots), rng.Uint32N(modelSlots)}
	}

	for round := range 30 {
		ops := randOps()
		commit := rng.IntN(4) != 0
		fs := froms()
		var next model
		err := s.Update(t.Context(), func(tx *meta.Tx) error {
			next = m.clone()
			for _, op := range ops {
				if op.disk < 0 {
					if err := tx.SetRefs(loc(c.ID, op.slot), op.n); err != nil {
						return fmt.Errorf("SetRefs(%d, %d): %w", op.slot, op.n, err)
					}
					if op.n == 0 {
						delete(next.refs, op.slot)
					} else {
						next.refs[op.slot] = op.n
					}
					continue
				}
				if err := tx.SetEntries(ids[op.disk], op.first, op.es); err != nil {
					return fmt.Errorf("SetEntries(%d, %d, %d entries): %w", ids[op.disk], op.first, len(op.es), err)
				}
				for j, e := range op.es {
					next.entries[op.disk][op.first+uint64(j)] = e
				}
			}
			if err := compareModel(t, tx, next, ids, c.ID, fs); err != nil {
				return err
			}
			if !commit {
				return errStop
			}
			return nil
		})
		if commit && err != nil {
			t.Fatalf("seed %d round %d: Update: %v", seed, round, err)
		}
		if !commit && !errors.Is(err, errStop) {
			t.Fatalf("seed %d round %d: aborted Update returned %v", seed, round, err)
		}
		if commit {
			m = next
		}
		view(t, s, func(tx *meta.Tx) error { return compareModel(t, tx, m, ids, c.ID, fs) })
		if t.Failed() {
			t.Fatalf("seed %d: store and model differ after round %d (ops %v, commit %v)", seed, round, ops, commit)
		}
	}
}

// nearBoundary returns a number below limit, mostly at or next to a
// multiple of page.
func nearBoundary(rng *rand.Rand, page, limit int) uint32 {
	var v int
	switch rng.IntN(3) {
	case 0:
		v = rng.IntN(limit)
	default:
		v = rng.IntN(limit/page+1)*page + rng.IntN(5) - 2
	}
	return uint32(min(max(v, 0), limit-1))
}

func compareModel(t *testing.T, tx *meta.Tx, m model, ids []meta.DiskID, cid uint32, froms []uint32) error {
	t.Helper()
	for i, id := range ids {
		want := zeros(modelPages*meta.PageEntries + 1)
		var wantMapped []segEntry
		for seg, e := range m.entries[i] {
			want[seg] = e
		}
		for seg, e := range want {
			if e.Mapped() {
				wantMapped = append(wantMapped, segEntry{uint64(seg), e})
			}
		}
		if err := checkEntries(t, tx, id, 0, want); err != nil {
			return err
		}
		got, err := mappedOf(tx, id)
		if err != nil {
			return err
		}
		if !slices.Equal(got, wantMapped) {
			t.Errorf("ForEachMapped(%d) = %s, want %s", id, short(got), short(wantMapped))
		}
	}
	var wantRefs []slotRef
	for slot, n := range m.refs {
		wantRefs = append(wantRefs, slotRef{slot, n})
	}
	slices.SortFunc(wantRefs, func(a, b slotRef) int { return cmp.Compare(a.slot, b.slot) })
	got, err := refsOf(tx, cid)
	if err != nil {
		return err
	}
	if !slices.Equal(got, wantRefs) {
		t.Errorf("ForEachRef = %s, want %s", short(got), short(wantRefs))
	}
	if err := checkUsed(t, tx, cid, uint64(len(m.refs))); err != nil {
		return err
	}
	for _, from := range froms {
		want, wantOK := from, false
		for i := range uint32(modelSlots) {
			if s := (from + i) % modelSlots; m.refs[s] == 0 {
				want, wantOK = s, true
				break
			}
		}
		slot, ok, err := tx.FindFree(cid, from)
		if err != nil {
			return err
		}
		if ok != wantOK || (ok && slot != want) {
			t.Errorf("FindFree(%d) = %d, %v, want %d, %v", from, slot, ok, want, wantOK)
		}
	}
	return nil
}

// short formats a long list by its length and ends.
func short[E any](s []E) string {
	if len(s) <= 8 {
		return fmt.Sprint(s)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d items: %v ... %v", len(s), s[:4], s[len(s)-4:])
	return b.String()
}
