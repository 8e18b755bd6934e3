package controller

import (
	"testing"

	"segmap/internal/meta"
)

func TestPickContainer(t *testing.T) {
	const k64, k128 = 64 << 10, 128 << 10
	ct := func(id uint32, slotSize, slots, used uint64) meta.Container {
		return meta.Container{ID: id, SlotSize: slotSize, Slots: slots, Used: used}
	}
	for _, tc := range []struct {
		name     string
		cs       []meta.Container
		slotSize uint64
		// want is the id picked at turn 0, 1, 2, ...; nil means ok=false
		// at every turn.
		want []uint32
	}{
		{
			name:     "none",
			cs:       nil,
			slotSize: k64,
		},
		{
			name:     "one",
			cs:       []meta.Container{ct(3, k64, 4, 0)},
			slotSize: k64,
			want:     []uint32{3, 3, 3},
		},
		{
			name:     "round-robin in id order",
			cs:       []meta.Container{ct(5, k64, 4, 0), ct(2, k64, 4, 1), ct(9, k64, 4, 3)},
			slotSize: k64,
			want:     []uint32{2, 5, 9, 2, 5, 9, 2},
		},
		{
			name:     "skips full containers",
			cs:       []meta.Container{ct(1, k64, 4, 4), ct(2, k64, 4, 0), ct(3, k64, 8, 8), ct(4, k64, 8, 7)},
			slotSize: k64,
			want:     []uint32{2, 4, 2, 4},
		},
		{
			name:     "skips other slot sizes",
			cs:       []meta.Container{ct(1, k128, 4, 0), ct(2, k64, 4, 0), ct(3, k128, 4, 0), ct(4, k64, 4, 0)},
			slotSize: k64,
			want:     []uint32{2, 4, 2, 4},
		},
		{
			name:     "other slot size only",
			cs:       []meta.Container{ct(1, k128, 4, 0), ct(3, k128, 4, 0)},
			slotSize: k128,
			want:     []uint32{1, 3, 1},
		},
		{
			name:     "all full",
			cs:       []meta.Container{ct(1, k64, 4, 4), ct(2, k64, 1, 1)},
			slotSize: k64,
		},
		{
			name:     "free slots of the wrong size only",
			cs:       []meta.Container{ct(1, k64, 4, 4), ct(2, k128, 4, 0)},
			slotSize: k64,
		},
		{
			name: "draining and failed containers get none",
			cs: []meta.Container{
				ct(1, k64, 4, 0), {ID: 2, SlotSize: k64, Slots: 4, State: meta.ContainerDraining},
				ct(3, k64, 4, 0), {ID: 4, SlotSize: k64, Slots: 4, State: meta.ContainerFailed},
			},
			slotSize: k64,
			want:     []uint32{1, 3, 1, 3},
		},
		{
			name:     "only a draining container",
			cs:       []meta.Container{{ID: 2, SlotSize: k64, Slots: 4, State: meta.ContainerDraining}},
			slotSize: k64,
		},
		{
			name:     "no slots at all",
			cs:       []meta.Container{ct(1, k64, 0, 0)},
			slotSize: k64,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.want == nil {
				for turn := uint64(0); turn < 4; turn++ {
					if id, ok := pickContainer(tc.cs, tc.slotSize, turn); ok {
						t.Errorf("turn %d: picked %d, want none", turn, id)
					}
				}
				return
			}
			for turn, want := range tc.want {
				id, ok := pickContainer(tc.cs, tc.slotSize, uint64(turn))
				if !ok || id != want {
					t.Errorf("turn %d: got (%d, %v), want (%d, true)", turn, id, ok, want)
				}
			}
		})
	}
}

// TestPickContainerTurnWraps checks that a huge turn counter still lands on
// an eligible container and keeps the round-robin order.
func TestPickContainerTurnWraps(t *testing.T) {
	cs := []meta.Container{{ID: 7, SlotSize: 64 << 10, Slots: 2}, {ID: 8, SlotSize: 64 << 10, Slots: 2}}
	for _, tc := range []struct {
		turn uint64
		want uint32
	}{{1<<64 - 2, 7}, {1<<64 - 1, 8}, {1 << 63, 7}} {
		if id, ok := pickContainer(cs, 64<<10, tc.turn); !ok || id != tc.want {
			t.Errorf("turn %d: got (%d, %v), want (%d, true)", tc.turn, id, ok, tc.want)
		}
	}
}

// TestPickContainerDoesNotReorder checks that pickContainer leaves the
// caller's slice as it was: it is pure.
func TestPickContainerDoesNotReorder(t *testing.T) {
	cs := []meta.Container{{ID: 9, SlotSize: 64 << 10, Slots: 2}, {ID: 1, SlotSize: 64 << 10, Slots: 2}}
	pickContainer(cs, 64<<10, 0)
	if cs[0].ID != 9 || cs[1].ID != 1 {
		t.Errorf("pickContainer reordered its input: %v", cs)
	}
}

func TestHasPool(t *testing.T) {
	cs := []meta.Container{
		{ID: 1, SlotSize: 64 << 10, Slots: 4, Used: 4}, // full still counts
		{ID: 2, SlotSize: 1 << 20, Slots: 4},
	}
	for _, tc := range []struct {
		cs       []meta.Container
		slotSize uint64
		want     bool
	}{
		{nil, 64 << 10, false},
		{cs, 64 << 10, true},
		{cs, 1 << 20, true},
		{cs, 128 << 10, false},
		{cs, 0, false},
	} {
		if got := hasPool(tc.cs, tc.slotSize); got != tc.want {
			t.Errorf("hasPool(%d containers, %d) = %v, want %v", len(tc.cs), tc.slotSize, got, tc.want)
		}
	}
}
