package controller

import (
	"sort"

	"segmap/internal/meta"
)

// pickContainer chooses the container for the next slot of a disk whose
// segments are slotSize bytes. It spreads allocations round-robin over every
// container of that slot size with a free slot: turn is a counter the caller
// advances on each allocation. ok is false when no container qualifies.
//
// It is pure: the caller reads the containers and applies the choice.
func pickContainer(cs []meta.Container, slotSize uint64, turn uint64) (id uint32, ok bool) {
	var ids []uint32
	for _, c := range cs {
		if c.SlotSize == slotSize && c.Used < c.Slots {
			ids = append(ids, c.ID)
		}
	}
	if len(ids) == 0 {
		return 0, false
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids[turn%uint64(len(ids))], true
}

// hasPool reports whether any container has slots of slotSize.
func hasPool(cs []meta.Container, slotSize uint64) bool {
	for _, c := range cs {
		if c.SlotSize == slotSize {
			return true
		}
	}
	return false
}
