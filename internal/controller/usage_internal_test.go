package controller

import (
	"testing"

	"segmap/internal/table"
)

func TestSnapshotOnly(t *testing.T) {
	at := func(c, s uint32) table.Entry { return table.At(table.Location{Container: c, Slot: s}, false) }
	z := table.ZeroEntry
	// over is a copy-on-write of sub-block s%16 of e into c1/s (the
	// segments have 16 sub-blocks).
	over := func(s uint32, e table.Entry) table.Entry {
		return table.Over(table.Location{Container: 1, Slot: s}, table.Range(int(s%16), int(s%16)+1), e, 16)
	}
	for _, tc := range []struct {
		name        string
		live, snaps [][]table.Entry
		want        uint64
	}{
		{"nothing", nil, nil, 0},
		{"no snapshot", [][]table.Entry{{at(1, 1), at(1, 2)}}, nil, 0},
		{"snapshot shares everything", [][]table.Entry{{at(1, 1), at(1, 2)}}, [][]table.Entry{{at(1, 1), at(1, 2)}}, 0},
		{"one segment rewritten", [][]table.Entry{{at(1, 3), at(1, 2)}}, [][]table.Entry{{at(1, 1), at(1, 2)}}, 16},
		{"no live disk", nil, [][]table.Entry{{at(1, 1), z, at(2, 1)}}, 32},
		{"zero entries hold nothing", [][]table.Entry{{z, z}}, [][]table.Entry{{z, z}}, 0},
		{"live disk zeroed a segment", [][]table.Entry{{z, at(1, 2)}}, [][]table.Entry{{at(1, 1), at(1, 2)}}, 16},
		{"two snapshots share an old slot", [][]table.Entry{{at(1, 5)}}, [][]table.Entry{{at(1, 1)}, {at(1, 1)}}, 16},
		{"two snapshots, two old slots", [][]table.Entry{{at(1, 5)}}, [][]table.Entry{{at(1, 1)}, {at(1, 2)}}, 32},
		{"a clone keeps an old slot", [][]table.Entry{{at(1, 5)}, {at(1, 1)}}, [][]table.Entry{{at(1, 1)}, {at(1, 2)}}, 16},
		{"same slot at another index is another slot", [][]table.Entry{{at(1, 1), z}}, [][]table.Entry{{z, at(1, 1)}}, 16},
		// Once no snapshot names its slots, a live partial entry is
		// compacted into its base: the slots above it come back. A
		// slot counts the sub-blocks its entries say it holds: a
		// partial entry's top and layers are written there only.
		{"a live partial entry reads through to the snapshot's slot", [][]table.Entry{{over(5, at(1, 1))}}, [][]table.Entry{{at(1, 1)}}, 1},
		{"a snapshot's partial entry holds its layers", [][]table.Entry{{at(1, 9)}}, [][]table.Entry{{over(6, over(5, at(1, 1)))}}, 18},
		{"a live partial entry shares the snapshot's base", [][]table.Entry{{over(7, at(1, 1))}}, [][]table.Entry{{over(5, at(1, 1))}}, 2},
		{"a live entry over a snapshot's partial one", [][]table.Entry{{over(7, over(5, at(1, 1)))}}, [][]table.Entry{{over(5, at(1, 1))}, {at(1, 1)}}, 2},
		{"a clone shares the live partial entry's base", [][]table.Entry{{over(7, at(1, 1))}, {at(1, 1)}}, [][]table.Entry{{at(1, 1)}}, 0},
		{"two snapshots name one layer", [][]table.Entry{{at(1, 9)}}, [][]table.Entry{{over(5, at(1, 1))}, {over(6, over(5, at(1, 1)))}}, 18},
		{"no-write entries are mapped", [][]table.Entry{{table.At(table.Location{Container: 1, Slot: 1}, true)}}, [][]table.Entry{{at(1, 1)}}, 0},
	} {
		if got := snapshotOnly(tc.live, tc.snaps, 16); got != tc.want {
			t.Errorf("%s: %d sub-blocks, want %d", tc.name, got, tc.want)
		}
	}
}
