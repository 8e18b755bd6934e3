package meta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"strings"
	"testing"
	"time"

	"segmap/internal/table"
)

// The fuzz targets take a value and a flag: when reseal is set, the value is
// taken as a record body and given a valid checksum first, so that the
// fuzzer reaches the decoding behind the checksum instead of spending its
// time on checksum mismatches. Every target checks that decoding never
// panics, leaves its input alone, fails only with ErrCorrupt naming the key,
// and that whatever decodes encodes back to the same bytes.

// addSeeds adds each valid record, several truncations of it, and its body
// for resealing.
func addSeeds(f *testing.F, records ...[]byte) {
	for _, v := range records {
		f.Add(v, false)
		for _, n := range []int{0, 1, 4, 5, len(v) / 2, len(v) - 5, len(v) - 4, len(v) - 1} {
			if n >= 0 && n < len(v) {
				f.Add(v[:n], false)
			}
		}
		body := v[:len(v)-4]
		f.Add(body, true)
		f.Add(body[:len(body)-1], true)
		f.Add(append(bytes.Clone(body), 0), true)
	}
}

// fuzzInput turns the fuzzer's arguments into the value to decode.
func fuzzInput(v []byte, reseal bool) []byte {
	if reseal {
		v = binary.LittleEndian.AppendUint32(bytes.Clone(v), crc32.Checksum(v, castagnoli))
	}
	return v
}

// checkDecode checks the outcome of one decode of v under key.
func checkDecode(t *testing.T, key, v, orig []byte, err error, encode func() []byte) {
	t.Helper()
	if !bytes.Equal(v, orig) {
		t.Fatalf("decoder modified its input")
	}
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("decode error %v is not ErrCorrupt", err)
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("%q", key)) {
			t.Fatalf("decode error %q does not name key %q", err, key)
		}
		return
	}
	if re := encode(); !bytes.Equal(re, v) {
		t.Fatalf("decoded record re-encodes differently:\n in  %x\n out %x", v, re)
	}
}

func FuzzDecodeDisk(f *testing.F) {
	addSeeds(f,
		encodeDisk(Disk{ID: 1, Name: "vol", Size: 1 << 30, SegmentSize: 1 << 20, Policy: table.Forward, Family: 1,
			Created: time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)}),
		encodeDisk(Disk{ID: math.MaxUint64, Name: strings.Repeat("ü", maxName/2), Size: math.MaxUint64, SegmentSize: 1 << 63,
			Policy: table.Reverse, Origin: 7, Family: 3, ReadOnly: true, Created: time.Unix(0, math.MinInt64)}),
		encodeDisk(Disk{ID: 2, Name: "x", SegmentSize: 1, Policy: table.Forward, Created: time.Unix(0, 0)}),
	)
	key := diskKey(1)
	f.Fuzz(func(t *testing.T, in []byte, reseal bool) {
		v := fuzzInput(in, reseal)
		orig := bytes.Clone(v)
		d, err := decodeDisk(key, v)
		checkDecode(t, key, v, orig, err, func() []byte { return encodeDisk(d) })
		if err == nil && (d.ID == 0 || d.Name == "" || !d.Policy.Valid() || d.SegmentSize&(d.SegmentSize-1) != 0 || d.Created.Location() != time.UTC) {
			t.Fatalf("decoded an invalid disk %+v", d)
		}
	})
}

func FuzzDecodeContainer(f *testing.F) {
	addSeeds(f,
		encodeContainer(Container{ID: 1, URI: "file:///var/lib/segmap/c1", SlotSize: 1 << 20, Slots: 1000, Used: 10}),
		encodeContainer(Container{ID: math.MaxUint32, URI: strings.Repeat("u", maxName), SlotSize: 1 << 63, Slots: math.MaxUint64, Used: math.MaxUint64}),
		encodeContainer(Container{ID: 2, SlotSize: 1}),
	)
	key := containerKey(1)
	f.Fuzz(func(t *testing.T, in []byte, reseal bool) {
		v := fuzzInput(in, reseal)
		orig := bytes.Clone(v)
		c, err := decodeContainer(key, v)
		checkDecode(t, key, v, orig, err, func() []byte { return encodeContainer(c) })
		if err == nil && (c.ID == 0 || c.Used > c.Slots) {
			t.Fatalf("decoded an invalid container %+v", c)
		}
	})
}

func FuzzDecodePage(f *testing.F) {
	mixed := new(page)
	states := []table.State{0, table.NoWrite, table.Zero, table.Error, table.Error | table.Zero | table.NoWrite}
	for i := range mixed {
		mixed[i] = table.Entry{Loc: table.Location{Container: uint32(i % 7), Slot: uint32(i * 2654435761)}, State: states[i%len(states)]}
	}
	addSeeds(f, encodePage(zeroPage), encodePage(mixed), encodePage(new(page)))
	key := pageKey(1)
	f.Fuzz(func(t *testing.T, in []byte, reseal bool) {
		v := fuzzInput(in, reseal)
		orig := bytes.Clone(v)
		p, err := decodePage(key, v)
		checkDecode(t, key, v, orig, err, func() []byte { return encodePage(p) })
		if err == nil {
			for i, e := range p {
				if !e.State.Valid() || e.State&table.Invalid != 0 {
					t.Fatalf("decoded entry %d with state %v", i, e.State)
				}
			}
		}
	})
}

func FuzzDecodeDir(f *testing.F) {
	full := new(dir)
	for i := range full {
		full[i] = uint64(i)*2654435761 + 1
	}
	some := new(dir)
	some[0], some[7], some[DirPages-1] = 1, math.MaxUint64, 42
	addSeeds(f, encodeDir(new(dir)), encodeDir(some), encodeDir(full))
	key := dirKey(1, 0)
	f.Fuzz(func(t *testing.T, in []byte, reseal bool) {
		v := fuzzInput(in, reseal)
		orig := bytes.Clone(v)
		d, err := decodeDir(key, v)
		checkDecode(t, key, v, orig, err, func() []byte { return encodeDir(d) })
	})
}

func FuzzDecodeRefs(f *testing.F) {
	counts := new(refs)
	for i := range counts {
		counts[i] = uint32(i * i)
	}
	counts[PageSlots-1] = math.MaxUint32
	addSeeds(f, encodeRefs(new(refs)), encodeRefs(counts))
	key := refsKey(1, 0)
	f.Fuzz(func(t *testing.T, in []byte, reseal bool) {
		v := fuzzInput(in, reseal)
		orig := bytes.Clone(v)
		p, err := decodeRefs(key, v)
		checkDecode(t, key, v, orig, err, func() []byte { return encodeRefs(p) })
	})
}

func FuzzDecodeU64(f *testing.F) {
	addSeeds(f, encodeU64(0), encodeU64(1), encodeU64(math.MaxUint64))
	key := seqKey("disk")
	f.Fuzz(func(t *testing.T, in []byte, reseal bool) {
		v := fuzzInput(in, reseal)
		orig := bytes.Clone(v)
		n, err := decodeU64(key, v)
		checkDecode(t, key, v, orig, err, func() []byte { return encodeU64(n) })
	})
}
