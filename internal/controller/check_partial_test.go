package controller_test

import (
	"context"
	"errors"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/table"
)

// partialStore is a store holding partial entries, built through meta.Tx
// with every count right: disk a (4 segments of 1 MiB) and its snapshot s
// share a table page whose segment 0 is partial, c1/s3{8} over c1/s2{0-3}
// over c1/s1, and whose segment 1 is whole, c1/s4. Every slot has one
// reference (the page is shared, not its entries).
type partialStore struct {
	st   *meta.Bolt
	a    meta.Disk
	part table.Entry
}

var partialSlots = []table.Location{{Container: 1, Slot: 1}, {Container: 1, Slot: 2}, {Container: 1, Slot: 3}, {Container: 1, Slot: 4}}

func newPartialStore(t *testing.T) *partialStore {
	t.Helper()
	st, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	const segSize = 1 << 20
	n := table.SubBlockCount(segSize)
	l := func(s uint32) table.Location { return table.Location{Container: 1, Slot: s} }
	p := &partialStore{st: st}
	p.part = table.Over(l(3), table.Range(8, 9), table.Over(l(2), table.Range(0, 4), table.At(l(1), false), n), n)
	if err := p.part.Part.Valid(p.part.Loc, n); err != nil || p.part.Depth() != 3 {
		t.Fatalf("fixture entry %v: depth %d, %v", p.part, p.part.Depth(), err)
	}
	created := time.Date(2025, 3, 14, 15, 9, 26, 0, time.UTC)
	err = st.Update(t.Context(), func(tx *meta.Tx) error {
		var err error
		if p.a, err = tx.CreateDisk(meta.Disk{Name: "a", Size: 4 * segSize, SegmentSize: segSize, Policy: table.Forward, Created: created}); err != nil {
			return err
		}
		s, err := tx.CreateDisk(meta.Disk{Name: "s", Size: 4 * segSize, SegmentSize: segSize, Policy: table.Forward, Origin: p.a.ID, Family: p.a.ID, ReadOnly: true, Created: created})
		if err != nil {
			return err
		}
		if _, err := tx.AddContainer(meta.Container{ID: 1, URI: "c1", SlotSize: segSize, Slots: 64}); err != nil {
			return err
		}
		if err := tx.SetEntries(p.a.ID, 0, []table.Entry{p.part, table.At(l(4), false)}); err != nil {
			return err
		}
		for _, loc := range partialSlots {
			if err := tx.SetRefs(loc, 1); err != nil {
				return err
			}
		}
		return tx.CopyTable(p.a.ID, s.ID)
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *partialStore) check(t *testing.T) []controller.Problem {
	t.Helper()
	ps, err := controller.New(controller.Config{Store: p.st}).Check(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// TestCheckPartialEntries: Check counts every layer of a partial entry as
// a reference (a store whose counts say so is clean: its layer slots are
// neither leaked nor free), finds a layer's wrong or missing count, a
// layer outside its container, and a partial entry of an invalid shape,
// naming the disk, the segment and the slot; Repair refuses them all.
func TestCheckPartialEntries(t *testing.T) {
	base, mid := partialSlots[0], partialSlots[1]
	for _, tc := range []struct {
		name   string
		damage func(tx *meta.Tx, p *partialStore) error
		want   []controller.Problem // Kind, Loc, Disk, Segment; Detail contains
		detail []string
	}{
		{"clean", nil, nil, nil},
		{"layer count too high", func(tx *meta.Tx, _ *partialStore) error { return tx.SetRefs(base, 2) },
			[]controller.Problem{{Kind: controller.WrongCount, Loc: base, Disk: "a", Segment: 0}}, []string{"count 2"}},
		{"layer counted free", func(tx *meta.Tx, _ *partialStore) error { return tx.SetRefs(mid, 0) },
			[]controller.Problem{{Kind: controller.ReferencedFree, Loc: mid, Disk: "a", Segment: 0}}, []string{"count 0"}},
		{"layer past its container", func(tx *meta.Tx, p *partialStore) error {
			e := p.part
			e.Part = &table.Partial{Bits: e.Part.Bits, Under: append([]table.Layer{}, e.Part.Under...)}
			e.Part.Under[1].Loc.Slot = 9999
			if err := tx.SetRefs(base, 0); err != nil {
				return err
			}
			return tx.SetEntries(p.a.ID, 0, []table.Entry{e})
		}, []controller.Problem{{Kind: controller.OutOfRange, Loc: table.Location{Container: 1, Slot: 9999}, Disk: "a", Segment: 0}},
			[]string{"layer under partial entry c1/s3: container has 64 slots"}},
		{"layers do not hold every sub-block", func(tx *meta.Tx, p *partialStore) error {
			// c1/s3{0} over c1/s1{1}: the layout is a page's, the
			// shape is not (sub-blocks 2 and up are nowhere).
			e := table.Entry{Loc: partialSlots[2], Part: &table.Partial{Bits: table.Range(0, 1), Under: []table.Layer{{Loc: base, Bits: table.Range(1, 2)}}}}
			if err := tx.SetRefs(mid, 0); err != nil {
				return err
			}
			return tx.SetEntries(p.a.ID, 0, []table.Entry{e})
		}, []controller.Problem{{Kind: controller.InvalidPartial, Loc: partialSlots[2], Disk: "a", Segment: 0}},
			[]string{"its layers hold {0-1}, not all 256 sub-blocks"}},
		{"slot named twice", func(tx *meta.Tx, p *partialStore) error {
			// Segment 2 becomes c1/s5{0} over c1/s6{1} over c1/s6,
			// with counts that say so.
			l5, l6 := table.Location{Container: 1, Slot: 5}, table.Location{Container: 1, Slot: 6}
			e := table.Entry{Loc: l5, Part: &table.Partial{Bits: table.Range(0, 1), Under: []table.Layer{{Loc: l6, Bits: table.Range(1, 2)}, {Loc: l6, Bits: table.Full(256)}}}}
			if err := tx.SetEntries(p.a.ID, 2, []table.Entry{e}); err != nil {
				return err
			}
			if err := tx.SetRefs(l5, 1); err != nil {
				return err
			}
			return tx.SetRefs(l6, 2)
		}, []controller.Problem{{Kind: controller.InvalidPartial, Loc: table.Location{Container: 1, Slot: 5}, Disk: "a", Segment: 2}},
			[]string{"names c1/s6 twice"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPartialStore(t)
			if tc.damage != nil {
				if err := p.st.Update(t.Context(), func(tx *meta.Tx) error { return tc.damage(tx, p) }); err != nil {
					t.Fatal(err)
				}
			}
			ps := p.check(t)
			if len(ps) != len(tc.want) {
				t.Fatalf("check: %v, want %v", ps, tc.want)
			}
			for i, w := range tc.want {
				g := ps[i]
				if g.Kind != w.Kind || g.Loc != w.Loc || g.Disk != w.Disk || g.Segment != w.Segment || !strings.Contains(g.Detail, tc.detail[i]) {
					t.Errorf("problem %d: %v; want %v at %v of disk %q segment %d, saying %q", i, g, w.Kind, w.Loc, w.Disk, w.Segment, tc.detail[i])
				}
			}
			if len(ps) == 0 {
				return
			}
			t.Logf("%v", ps)
			if err := controller.Repairable(ps); !errors.Is(err, controller.ErrRepairRefused) {
				t.Errorf("Repairable(%v) = %v, want a refusal", ps, err)
			}
		})
	}
}

// TestCheckPartialDelete: deleting the snapshot and then the disk through
// the store leaves a clean store with every slot of the partial entry
// free, each freed once.
func TestCheckPartialDelete(t *testing.T) {
	p := newPartialStore(t)
	var freed []table.Location
	for _, name := range []string{"s", "a"} {
		err := p.st.Update(t.Context(), func(tx *meta.Tx) error {
			d, err := tx.Disk(name)
			if err != nil {
				return err
			}
			f, err := tx.DeleteDisk(d.ID)
			freed = append(freed, f...)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if ps := p.check(t); len(ps) != 0 {
			t.Fatalf("after deleting %s: %v", name, ps)
		}
	}
	got := map[table.Location]int{}
	for _, l := range freed {
		got[l]++
	}
	want := map[table.Location]int{}
	for _, l := range partialSlots {
		want[l] = 1
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("freed %v, want each of %v once", freed, partialSlots)
	}
}
