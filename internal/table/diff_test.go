package table

import "testing"

func TestChanged(t *testing.T) {
	const n = 16 // a 64 KiB segment
	x, y, z := Location{1, 2}, Location{1, 3}, Location{2, 9}
	// part is a partial entry: top holds bits over the layers.
	part := func(top Location, bits Bits, under ...Layer) Entry {
		return Entry{Loc: top, Part: &Partial{Bits: bits, Under: under}}
	}
	for _, tt := range []struct {
		name string
		a, b Entry
		want Bits
	}{
		{"zero, zero", ZeroEntry, ZeroEntry, Bits{}},
		{"zero with a stale location", ZeroEntry, Entry{Loc: x, State: Zero}, Bits{}},
		{"same slot", At(x, false), At(x, false), Bits{}},
		{"same slot, NoWrite on one", At(x, true), At(x, false), Bits{}},
		{"same slot, NoWrite on both", At(x, true), At(x, true), Bits{}},
		{"other slot", At(x, true), At(y, false), Full(n)},
		{"zero and mapped", ZeroEntry, At(x, false), Full(n)},
		{"mapped and zero (a trim)", At(x, true), ZeroEntry, Full(n)},
		{"zero and error", ZeroEntry, ErrorEntry, Full(n)},
		{"error, error", ErrorEntry, ErrorEntry, Bits{}},
		{"partial over the other's slot", At(x, true), part(y, Range(1, 3), Layer{x, Full(n)}), Range(1, 3)},
		{"partial over the other's slot, swapped", part(y, Range(1, 3), Layer{x, Full(n)}), At(x, false), Range(1, 3)},
		{"same partial, NoWrite on one", Entry{Loc: y, State: NoWrite, Part: &Partial{Bits: Range(4, 5), Under: []Layer{{x, Full(n)}}}},
			part(y, Range(4, 5), Layer{x, Full(n)}), Bits{}},
		{"partial over partial: the top written since",
			part(y, Range(2, 4), Layer{x, Full(n)}),
			part(z, Range(8, 9), Layer{y, Range(2, 4)}, Layer{x, Full(n)}), Range(8, 9)},
		{"partials on one base, tops apart",
			part(y, Range(0, 2), Layer{x, Full(n)}),
			part(z, Range(1, 3), Layer{x, Full(n)}), Range(0, 3)},
		{"partial and another slot", part(y, Range(0, 2), Layer{x, Full(n)}), At(z, false), Full(n)},
		{"partial and zero", part(y, Range(0, 2), Layer{x, Full(n)}), ZeroEntry, Full(n)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := Changed(tt.a, tt.b, n); got != tt.want {
				t.Errorf("Changed(%v, %v) = {%v}, want {%v}", tt.a, tt.b, got, tt.want)
			}
			if got := Changed(tt.b, tt.a, n); got != tt.want {
				t.Errorf("Changed(%v, %v) = {%v}, want {%v} (not symmetric)", tt.b, tt.a, got, tt.want)
			}
		})
	}
}
