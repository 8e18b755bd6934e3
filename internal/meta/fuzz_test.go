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

// A recordKind is one kind of record: its seeds, and a check of one
// decode of a fuzzed value under the kind's key.
type recordKind struct {
	name  string
	seeds [][]byte
	check func(t *testing.T, v []byte)
}

// recordKinds lists every record the store decodes.
func recordKinds() []recordKind {
	mixed := new(page)
	states := []table.State{0, table.NoWrite, table.Zero, table.Error, table.Error | table.Zero | table.NoWrite}
	for i := range mixed {
		mixed[i] = table.Entry{Loc: table.Location{Container: uint32(i % 7), Slot: uint32(i * 2654435761)}, State: states[i%len(states)]}
	}
	full := new(dir)
	for i := range full {
		full[i] = uint64(i)*2654435761 + 1
	}
	some := new(dir)
	some[0], some[7], some[DirPages-1] = 1, math.MaxUint64, 42
	counts := new(refs)
	for i := range counts {
		counts[i] = uint32(i * i)
	}
	counts[PageSlots-1] = math.MaxUint32

	return []recordKind{
		{"disk", [][]byte{
			encodeDisk(Disk{ID: 1, Name: "vol", Size: 1 << 30, SegmentSize: 1 << 20, Policy: table.Forward, Family: 1,
				Created: time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)}),
			encodeDisk(Disk{ID: math.MaxUint64, Name: strings.Repeat("ü", maxName/2), Size: math.MaxUint64, SegmentSize: 1 << 63,
				Policy: table.Reverse, Origin: 7, Family: 3, ReadOnly: true, Created: time.Unix(0, math.MinInt64)}),
			encodeDisk(Disk{ID: 2, Name: "x", SegmentSize: 1, Policy: table.Forward, Created: time.Unix(0, 0)}),
			encodeDisk(Disk{ID: 3, Name: "vm1@mon", Size: 1 << 26, SegmentSize: 1 << 16, Policy: table.Forward, Family: 1,
				ReadOnly: true, Created: time.Unix(1700000000, 5), UUID: [16]byte{1, 2, 3, 4, 5, 6, 0x47, 8, 0x89, 10, 11, 12, 13, 14, 15, 16}}),
		}, func(t *testing.T, v []byte) {
			key := diskKey(1)
			orig := bytes.Clone(v)
			d, err := decodeDisk(key, v)
			checkDecode(t, key, v, orig, err, func() []byte { return encodeDisk(d) })
			if err == nil && (d.ID == 0 || d.Name == "" || !d.Policy.Valid() || d.SegmentSize&(d.SegmentSize-1) != 0 || d.Created.Location() != time.UTC) {
				t.Fatalf("decoded an invalid disk %+v", d)
			}
		}},
		{"container", [][]byte{
			encodeContainer(Container{ID: 1, URI: "file:///var/lib/segmap/c1", SlotSize: 1 << 20, Slots: 1000, Used: 10}),
			encodeContainer(Container{ID: math.MaxUint32, URI: strings.Repeat("u", maxName), SlotSize: 1 << 63, Slots: math.MaxUint64, Used: math.MaxUint64}),
			encodeContainer(Container{ID: 2, SlotSize: 1}),
			encodeContainer(Container{ID: 3, SlotSize: 1 << 16, Slots: 4, Used: 1, State: ContainerDraining}),
		}, func(t *testing.T, v []byte) {
			key := containerKey(1)
			orig := bytes.Clone(v)
			c, err := decodeContainer(key, v)
			checkDecode(t, key, v, orig, err, func() []byte { return encodeContainer(c) })
			if err == nil && (c.ID == 0 || c.Used > c.Slots) {
				t.Fatalf("decoded an invalid container %+v", c)
			}
		}},
		{"page", [][]byte{encodePage(zeroPage), encodePage(mixed), encodePage(new(page)), encodePage(partialPage())}, func(t *testing.T, v []byte) {
			key := pageKey(1)
			orig := bytes.Clone(v)
			p, err := decodePage(key, v)
			checkDecode(t, key, v, orig, err, func() []byte { return encodePage(p) })
			checkPageEntries(t, key, v, p, err)
			if err == nil {
				for i, e := range p {
					if !e.State.Valid() || e.State&table.Invalid != 0 {
						t.Fatalf("decoded entry %d with state %v", i, e.State)
					}
					if e.Part != nil && (!e.Mapped() || badPartLayout(e.Part) != "") {
						t.Fatalf("decoded entry %d %v with layers it cannot have", i, e)
					}
				}
			}
		}},
		{"dir", [][]byte{encodeDir(new(dir)), encodeDir(some), encodeDir(full)}, func(t *testing.T, v []byte) {
			key := dirKey(1, 0)
			orig := bytes.Clone(v)
			d, err := decodeDir(key, v)
			checkDecode(t, key, v, orig, err, func() []byte { return encodeDir(d) })
		}},
		{"refs", [][]byte{encodeRefs(new(refs)), encodeRefs(counts)}, func(t *testing.T, v []byte) {
			key := refsKey(1, 0)
			orig := bytes.Clone(v)
			p, err := decodeRefs(key, v)
			checkDecode(t, key, v, orig, err, func() []byte { return encodeRefs(p) })
		}},
		{"grants", [][]byte{encodeGrants(nil), encodeGrants([]string{"host-a", "host-b"}), encodeGrants([]string{strings.Repeat("a", maxName), ""})}, func(t *testing.T, v []byte) {
			key := grantsKey(1)
			orig := bytes.Clone(v)
			g, err := decodeGrants(key, v)
			checkDecode(t, key, v, orig, err, func() []byte { return encodeGrants(g) })
		}},
		{"u64", [][]byte{encodeU64(0), encodeU64(1), encodeU64(math.MaxUint64)}, func(t *testing.T, v []byte) {
			key := seqKey("disk")
			orig := bytes.Clone(v)
			n, err := decodeU64(key, v)
			checkDecode(t, key, v, orig, err, func() []byte { return encodeU64(n) })
		}},
	}
}

// fuzzKind fuzzes the decoder of one kind of record.
func fuzzKind(f *testing.F, name string) {
	for _, k := range recordKinds() {
		if k.name == name {
			addSeeds(f, k.seeds...)
			f.Fuzz(func(t *testing.T, in []byte, reseal bool) { k.check(t, fuzzInput(in, reseal)) })
			return
		}
	}
	f.Fatalf("no record kind %q", name)
}

func FuzzDecodeDisk(f *testing.F)      { fuzzKind(f, "disk") }
func FuzzDecodeContainer(f *testing.F) { fuzzKind(f, "container") }
func FuzzDecodePage(f *testing.F)      { fuzzKind(f, "page") }
func FuzzDecodeDir(f *testing.F)       { fuzzKind(f, "dir") }
func FuzzDecodeRefs(f *testing.F)      { fuzzKind(f, "refs") }
func FuzzDecodeGrants(f *testing.F)    { fuzzKind(f, "grants") }
func FuzzDecodeU64(f *testing.F)       { fuzzKind(f, "u64") }

// FuzzRecord fuzzes every record decoder at once (the first argument
// picks the kind), so that one long run covers them all; it is what `make
// fuzz` runs for the metadata records.
func FuzzRecord(f *testing.F) {
	kinds := recordKinds()
	for i, k := range kinds {
		for _, v := range k.seeds {
			f.Add(uint8(i), v, false)
			f.Add(uint8(i), v[:len(v)-4], true)
			f.Add(uint8(i), v[:len(v)/2], false)
		}
	}
	f.Fuzz(func(t *testing.T, kind uint8, in []byte, reseal bool) {
		kinds[int(kind)%len(kinds)].check(t, fuzzInput(in, reseal))
	})
}
