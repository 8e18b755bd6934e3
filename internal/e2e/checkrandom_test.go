package e2e

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/table"
)

// census is what a clean store holds, for predicting what check finds
// after a random change.
type census struct {
	cleanStore
	refs    map[table.Location]uint32 // every slot's count (0: free)
	holders map[uint64]uint32         // table page -> disks holding it
	keys    [][]byte                  // every record key
}

func takeCensus(t *testing.T, path string) census {
	t.Helper()
	c := census{cleanStore: describe(t, path), refs: map[table.Location]uint32{}, holders: map[uint64]uint32{}}
	st, err := meta.OpenBoltReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	err = st.View(context.Background(), func(tx *meta.Tx) error {
		cts, err := tx.Containers()
		if err != nil {
			return err
		}
		for _, ct := range cts {
			for s := range uint32(ct.Slots) {
				c.refs[table.Location{Container: ct.ID, Slot: s}] = 0
			}
			if err := tx.ForEachRef(ct.ID, func(slot, n uint32) error {
				c.refs[table.Location{Container: ct.ID, Slot: slot}] = n
				return nil
			}); err != nil {
				return err
			}
		}
		ds, err := tx.Disks()
		for _, d := range ds {
			prs, err := tx.TablePages(d.ID)
			if err != nil {
				return err
			}
			for _, pr := range prs {
				c.holders[pr.ID]++
			}
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(func(btx *bolt.Tx) error {
		return btx.Bucket([]byte("segmap")).ForEach(func(k, _ []byte) error {
			c.keys = append(c.keys, bytes.Clone(k))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

// A randomDamage changes the store at path and returns the problems check
// must report, as "kind where" strings (all of them, in any order).
type randomDamage func(t *testing.T, rng *rand.Rand, path string, c census) (what string, want []string)

// slotCountWant is what check reports for a slot that n table pages map
// and whose count is set to v (v != n).
func slotCountWant(l table.Location, n, v uint32) string {
	kind := "wrong-reference-count"
	switch {
	case n == 0:
		kind = "leaked-slot"
	case v == 0:
		kind = "referenced-free-slot"
	case v == 1:
		kind = "shared-slot-writable"
	}
	return kind + " " + slotName(l)
}

var randomDamages = []randomDamage{
	// A random slot's count set to another value (Used kept in step).
	func(t *testing.T, rng *rand.Rand, path string, c census) (string, []string) {
		// Mapped slots two times in three: they are few.
		var mapped, all []table.Location
		for l, n := range c.refs {
			all = append(all, l)
			if n > 0 {
				mapped = append(mapped, l)
			}
		}
		byLoc := func(a, b table.Location) int {
			return cmp.Or(cmp.Compare(a.Container, b.Container), cmp.Compare(a.Slot, b.Slot))
		}
		slices.SortFunc(mapped, byLoc)
		slices.SortFunc(all, byLoc)
		l := all[rng.IntN(len(all))]
		if rng.IntN(3) > 0 {
			l = mapped[rng.IntN(len(mapped))]
		}
		n := c.refs[l]
		v := uint32(rng.IntN(4))
		if v == n {
			v = n + 1
		}
		metaUpdate(t, path, func(tx *meta.Tx) error { return tx.SetRefs(l, v) })
		return fmt.Sprintf("slot %s count %d -> %d", slotName(l), n, v), []string{slotCountWant(l, n, v)}
	},
	// A random table page's count (or that of a page never handed out)
	// set to another value.
	func(t *testing.T, rng *rand.Rand, path string, c census) (string, []string) {
		pid := uint64(1 + rng.IntN(len(c.holders)+3))
		n := c.holders[pid]
		v := uint32(rng.IntN(4))
		if v == n {
			v = n + 1
		}
		setPageCount(t, path, pid, v)
		kind := "wrong-page-reference-count"
		switch {
		case n == 0:
			kind = "leaked-table-page"
		case v == 1 && n > 1:
			kind = "shared-slot-writable"
		}
		return fmt.Sprintf("table page %d count %d -> %d", pid, n, v), []string{kind + " p/" + strconv.FormatUint(pid, 10)}
	},
	// A random entry of vm pointed past its container or at none.
	func(t *testing.T, rng *rand.Rand, path string, c census) (string, []string) {
		seg := uint64(7 + rng.IntN(9)) // vm maps segments 0 to 6
		l := table.Location{Container: c.container.ID, Slot: uint32(c.container.Slots) + uint32(rng.IntN(1000))}
		if rng.IntN(2) == 0 {
			l = table.Location{Container: 50 + uint32(rng.IntN(50)), Slot: uint32(rng.IntN(64))}
		}
		metaUpdate(t, path, func(tx *meta.Tx) error { return tx.SetEntries(c.vm.ID, seg, []table.Entry{table.At(l, false)}) })
		return fmt.Sprintf("vm segment %d -> %s", seg, slotName(l)), []string{"location-out-of-range " + slotName(l)}
	},
	// The container's used count changed, checksum recomputed.
	func(t *testing.T, rng *rand.Rand, path string, c census) (string, []string) {
		v := c.container.Used - 1 - uint64(rng.IntN(int(c.container.Used)))
		if rng.IntN(2) == 0 {
			v = c.container.Used + 1 + uint64(rng.IntN(int(c.container.Slots-c.container.Used)))
		}
		rawUpdate(t, path, containerKey(c.container.ID), func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[1+4+4+len(c.container.URI)+8+8:], v)
			return reseal(b)
		})
		return fmt.Sprintf("container used %d -> %d", c.container.Used, v), []string{"wrong-used-count " + meta.KeyName(containerKey(c.container.ID))}
	},
	// One to three random records: a bit flipped, or cut short.
	func(t *testing.T, rng *rand.Rand, path string, c census) (string, []string) {
		var what string
		var want []string
		for _, i := range rng.Perm(len(c.keys))[:1+rng.IntN(3)] {
			k := c.keys[i]
			var kind string
			rawUpdate(t, path, k, func(v []byte) []byte {
				if rng.IntN(2) == 0 {
					n := rng.IntN(len(v))
					what += fmt.Sprintf("%s cut to %d of %d bytes; ", meta.KeyName(k), n, len(v))
					kind = "truncated-record"
					return v[:n]
				}
				bit := rng.IntN(8 * len(v))
				v[bit/8] ^= 1 << (bit % 8)
				what += fmt.Sprintf("%s bit %d flipped; ", meta.KeyName(k), bit)
				kind = "corrupt-record" // or truncated-record: see recordKind
				return v
			})
			want = append(want, kind+" "+meta.KeyName(k))
		}
		return what, want
	},
}

// recordKind: a flipped bit in a record's length field can make it look
// cut short, so a flip may be reported as either.
func recordKind(got, want string) bool {
	if got == want {
		return true
	}
	g, w := []byte(got), []byte(want)
	return bytes.HasPrefix(w, []byte("corrupt-record ")) && bytes.HasPrefix(g, []byte("truncated-record ")) &&
		bytes.Equal(g[len("truncated-record "):], w[len("corrupt-record "):])
}

// TestCheckRandomDamage damages copies of a clean store at random (slot
// and page counts, entries, used counts, record bytes), predicts from the
// clean store's census exactly what check must report, and checks it in
// process: the reported problems, and Repair, which must reclaim a leak
// (leaving the store clean) and refuse anything else, changing nothing.
// The short form runs 150 rounds; with SEGMAP_SOAK=DURATION it runs rounds
// with fresh seeds until DURATION has passed. SEGMAP_CHECK_SEED=N reruns
// one seed.
func TestCheckRandomDamage(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SEGMAP_CHECK_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatal(err)
		}
	}
	clean := makeCleanStore(t, t.TempDir())
	c := takeCensus(t, clean)
	soak := soakDuration(t)
	deadline := time.Now().Add(soak)
	rounds, repaired, refused := 0, 0, 0
	kinds := map[string]int{}
	for {
		s := seed + uint64(rounds)
		rounds++
		t.Run(fmt.Sprint(s), func(t *testing.T) {
			defer func() {
				if t.Failed() {
					t.Logf("rerun: SEGMAP_CHECK_SEED=%d go test ./internal/e2e -run 'TestCheckRandomDamage' (then its first round)", s)
				}
			}()
			rng := rand.New(rand.NewPCG(s, s^0x9e3779b97f4a7c15))
			path := filepath.Join(t.TempDir(), "meta.db")
			copyFile(t, clean, path)
			what, want := randomDamages[rng.IntN(len(randomDamages))](t, rng, path, c)
			got := storeProblems(t, path)
			var gotS []string
			for _, p := range got {
				where := p.Key
				if where == "" {
					where = slotName(p.Loc)
				}
				gotS = append(gotS, p.Kind.String()+" "+where)
				kinds[p.Kind.String()]++
			}
			slices.Sort(gotS)
			slices.Sort(want)
			if !slices.EqualFunc(gotS, want, recordKind) {
				// Sorting may pair a truncated-record with the wrong
				// corrupt-record: compare as sets too.
				if len(gotS) != len(want) || !matchAll(gotS, want) {
					t.Fatalf("damage: %s\ncheck found %q\nwant %q", what, gotS, want)
				}
			}

			st, err := meta.OpenBolt(path)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			// The container files are gone: punching the reclaimed
			// slot fails, and the controller only warns.
			ctrl := controller.New(controller.Config{Store: st, OpenContainer: container.OpenURI, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			defer ctrl.Close()
			fixed, err := ctrl.Repair(context.Background())
			after, cerr := ctrl.Check(context.Background())
			if cerr != nil {
				t.Fatal(cerr)
			}
			onlyLeaks := controller.Repairable(got) == nil
			switch {
			case onlyLeaks:
				repaired++
				if err != nil || len(fixed) != len(got) || len(after) != 0 {
					t.Fatalf("damage: %s\nrepair of %v: fixed %v, %v; then %v", what, got, fixed, err, after)
				}
			default:
				refused++
				if !errors.Is(err, controller.ErrRepairRefused) || len(fixed) != 0 || !slices.Equal(after, got) {
					t.Fatalf("damage: %s\nrepair of %v: fixed %v, %v (want a refusal); then %v", what, got, fixed, err, after)
				}
			}
		})
		if t.Failed() || soak == 0 && rounds >= 150 || soak > 0 && time.Now().After(deadline) {
			break
		}
	}
	t.Logf("summary: seeds %d from %d, damaged stores checked %d, leaks repaired %d, repairs refused %d, problems by kind %v", rounds, seed, rounds, repaired, refused, kinds)
}

// matchAll pairs every got with a distinct want it matches.
func matchAll(got, want []string) bool {
	used := make([]bool, len(want))
	for _, g := range got {
		ok := false
		for i, w := range want {
			if !used[i] && recordKind(g, w) {
				used[i], ok = true, true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}
