package table

// Changed returns the sub-blocks of an n-sub-block segment whose bytes may
// differ between entries a and b, the entries of one segment index in two
// disks of one family (a snapshot and its disk, two snapshots). It reads
// no data: a slot that both entries name for a sub-block holds the same
// bytes for both, since a slot that two tables name is written by
// neither (a shared slot is No-write everywhere, and a write to it goes
// to a new slot first); and a slot only one of them names, or a voided
// entry facing anything else, may hold other bytes.
//
//   - NoWrite alone is no difference: it says whether a slot may be written
//     in place, not what it holds (a snapshot and its disk name the same
//     slot, the disk without NoWrite once it is its only holder again).
//   - Two voided entries differ only if their states do (Zero and Error).
//   - A voided entry and a mapped one differ in every sub-block, even if
//     the slot happens to hold zeros: that would take reading it.
//   - Two mapped entries differ in the sub-blocks that they read from
//     different slots (Entry.Locate): a partial entry over the other's
//     slot differs only in the sub-blocks written since.
//
// The result is empty when nothing differs, Full(n) when all may.
func Changed(a, b Entry, n int) Bits {
	a.State &^= NoWrite
	b.State &^= NoWrite
	if a.Equal(b) {
		return Bits{}
	}
	if a.Voided() || b.Voided() {
		return Full(n)
	}
	if !a.Partial() && !b.Partial() {
		return Full(n) // different slots
	}
	var out Bits
	for i := range min(n, SubBlocks) {
		if a.Locate(i) != b.Locate(i) {
			out[i/64] |= 1 << (i % 64)
		}
	}
	return out
}
