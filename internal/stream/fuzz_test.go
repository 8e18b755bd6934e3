package stream

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"
)

// FuzzReader feeds the Reader arbitrary bytes. With reseal set the input
// first gets valid record checksums and end record (see reseal), so that
// the fuzzer reaches the checks behind them instead of spending its time
// on checksum mismatches. Reading must never panic, must fail only with
// one of the package's sentinel errors, and a stream that reads to the
// end must encode back to exactly its bytes: the format has one encoding
// of each stream, so nothing the Reader accepts can be ambiguous.
func FuzzReader(f *testing.F) {
	seeds := [][]byte{
		encode(f, fullHeader(), smallRecords()),
		encode(f, incHeader(), smallRecords()),
		encode(f, fullHeader(), nil),
	}
	rng := rand.New(rand.NewPCG(14, 14))
	for range 3 {
		h, in, _ := randomStream(rng)
		h.Source.Size = min(h.Source.Size, 64<<10)
		var small []Record
		for _, r := range in {
			if r.Off+r.Len <= h.Source.Size {
				small = append(small, r)
			}
		}
		seeds = append(seeds, encode(f, h, small))
	}
	for _, b := range seeds {
		f.Add(b, false)
		f.Add(b, true)
		for _, n := range []int{0, 5, preambleLen, recordAt(b, 1), recordAt(b, 1) + 9, len(b) / 2, len(b) - 1} {
			f.Add(b[:n], false)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte, resealed bool) {
		if resealed {
			b = reseal(b, true)
		}
		orig := bytes.Clone(b)
		h, recs, err := decode(b)
		if !bytes.Equal(b, orig) {
			t.Fatal("the Reader modified its input")
		}
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrNotStream) && !errors.Is(err, ErrVersion) {
				t.Fatalf("error %v wraps none of the sentinels", err)
			}
			return
		}
		if re := encode(t, h, recs); !bytes.Equal(re, b) {
			t.Fatalf("a stream read whole encodes differently:\n in  %x\n out %x", b, re)
		}
	})
}
