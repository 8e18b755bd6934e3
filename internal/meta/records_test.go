package meta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"

	"segmap/internal/table"
)

// partialPage returns a page with whole, voided and partial entries, the
// partial ones of every depth and at both ends of the page.
func partialPage() *page {
	const n = 256 // sub-blocks of a 1 MiB segment
	p := new(page)
	for i := range p {
		p[i] = table.ZeroEntry
	}
	p[1] = table.At(table.Location{Container: 1, Slot: 1}, false)
	p[2] = table.ErrorEntry
	p[3] = table.At(table.Location{Container: 1, Slot: 3}, true)
	for d := 2; d <= table.MaxDepth; d++ {
		e := table.At(table.Location{Container: 2, Slot: uint32(d * 100)}, false)
		for k := 1; k < d; k++ {
			b := k * (n - 1) / (d - 1)
			e = table.Over(table.Location{Container: 2, Slot: uint32(d*100 + k)}, table.Range(b, b+1), e, n)
		}
		p[10*d] = e
	}
	p[0] = table.Over(table.Location{Container: 3, Slot: 7}, table.Range(0, 16), p[1], n)
	last := table.Over(table.Location{Container: 3, Slot: 9}, table.Range(15, 16), table.At(table.Location{Container: 3, Slot: 8}, false), 16)
	last.State = table.NoWrite
	p[PageEntries-1] = last
	return p
}

// fullPartialPage returns the largest page: every entry partial with
// MaxDepth layers, each holding sub-blocks in every word of its bitmap.
func fullPartialPage() *page {
	const n = table.SubBlocks
	p := new(page)
	for i := range p {
		base := uint32(i * table.MaxDepth)
		e := table.At(table.Location{Container: 1, Slot: base}, false)
		for k := 1; k < table.MaxDepth; k++ {
			var b table.Bits
			for w := range b {
				b[w] = 1 << k
			}
			e = table.Over(table.Location{Container: 1, Slot: base + uint32(k)}, b, e, n)
		}
		p[i] = e
	}
	return p
}

func TestPageVersions(t *testing.T) {
	key := pageKey(1)
	whole := new(page)
	for i := range whole {
		whole[i] = table.At(table.Location{Container: 1, Slot: uint32(i)}, i%2 == 0)
	}
	v1 := encodePage(whole)
	if len(v1) != 1+PageEntries*entrySize+4 || v1[0] != pageVersion {
		t.Errorf("page without partial entries: version %d, %d bytes; want version 1, %d bytes", v1[0], len(v1), 1+PageEntries*entrySize+4)
	}
	// A version 1 page as written before partial entries existed, built
	// byte by byte.
	old := []byte{1}
	for i := range PageEntries {
		old = binary.LittleEndian.AppendUint32(old, 1)
		old = binary.LittleEndian.AppendUint32(old, uint32(i))
		old = append(old, byte(whole[i].State))
	}
	old = binary.LittleEndian.AppendUint32(old, crc32.Checksum(old, castagnoli))
	if !bytes.Equal(old, v1) {
		t.Error("a page without partial entries is not encoded as version 1 was")
	}
	p, err := decodePage(key, old)
	if err != nil {
		t.Fatalf("version 1 page: %v", err)
	}
	if *p != *whole {
		t.Error("version 1 page decodes to other entries")
	}

	pp := partialPage()
	v2 := encodePage(pp)
	if v2[0] != partPageVersion {
		t.Errorf("page with partial entries: version %d, want %d", v2[0], partPageVersion)
	}
	got, err := decodePage(key, v2)
	if err != nil {
		t.Fatalf("version 2 page: %v", err)
	}
	parts := 0
	for i := range pp {
		if !got[i].Equal(pp[i]) || got[i].Loc != pp[i].Loc || got[i].State != pp[i].State {
			t.Errorf("entry %d: %v, want %v", i, got[i], pp[i])
		}
		if pp[i].Part != nil {
			parts++
			if got[i].Part == pp[i].Part {
				t.Errorf("entry %d: decoded layers are the encoded ones, not a fresh value", i)
			}
		}
	}
	if n, ok := layoutSize(key, v2); !ok || n > len(v2) {
		t.Errorf("layoutSize of a %d-byte version 2 page: %d, %v", len(v2), n, ok)
	}
	t.Logf("page with %d partial entries: %d bytes (%d without)", parts, len(v2), len(v1))

	full := encodePage(fullPartialPage())
	if want := 1 + PageEntries*entrySize + 4 + PageEntries*partEntryMax + 4; len(full) != want {
		t.Errorf("page of %d partial entries of %d layers: %d bytes, want %d", PageEntries, table.MaxDepth, len(full), want)
	}
	if _, err := decodePage(key, full); err != nil {
		t.Errorf("full page: %v", err)
	}
}

// TestPageMalformed damages the partial entries of a version 2 page, each
// way resealed with a valid checksum: each decodes to a RecordError naming
// the key, never a panic.
func TestPageMalformed(t *testing.T) {
	key := pageKey(7)
	fixed := 1 + PageEntries*entrySize // version and fixed entries
	// One partial entry at index 5: c1/s2{0} over c1/s1.
	base := new(page)
	for i := range base {
		base[i] = table.ZeroEntry
	}
	base[5] = table.Over(table.Location{Container: 1, Slot: 2}, table.Range(0, 1), table.At(table.Location{Container: 1, Slot: 1}, false), 16)
	body := encodePage(base)
	body = body[:len(body)-4]
	// Offsets in body of the partial part.
	count, index, depth := fixed, fixed+4, fixed+6
	topWords := depth + 1
	layerCont := topWords + 1 + 8
	layerWords := layerCont + 8
	u16 := func(b []byte, off int, v uint16) { binary.LittleEndian.PutUint16(b[off:], v) }
	u32 := func(b []byte, off int, v uint32) { binary.LittleEndian.PutUint32(b[off:], v) }
	for _, c := range []struct {
		name      string
		damage    func(b []byte) []byte
		truncated bool
		reason    string
	}{
		{"NoCount", func(b []byte) []byte { return b[:fixed] }, true, ""},
		{"CountZero", func(b []byte) []byte { u32(b, count, 0); return b[:count+4] }, false, "0 partial entries"},
		{"CountHuge", func(b []byte) []byte { u32(b, count, PageEntries+1); return b }, false, "partial entries"},
		{"CountMore", func(b []byte) []byte { u32(b, count, 2); return b }, true, ""},
		{"Cut", func(b []byte) []byte { return b[:len(b)-3] }, true, ""},
		{"IndexOutOfRange", func(b []byte) []byte { u16(b, index, PageEntries); return b }, false, "partial entry 1024"},
		{"Duplicated", func(b []byte) []byte {
			u32(b, count, 2)
			return append(b, b[index:]...)
		}, false, "partial entry 5 after entry 5"},
		{"OutOfOrder", func(b []byte) []byte {
			u32(b, count, 2)
			e := bytes.Clone(b[index:])
			u16(e, 0, 4)
			return append(b, e...)
		}, false, "partial entry 4 after entry 5"},
		{"OnVoidedEntry", func(b []byte) []byte { u16(b, index, 6); return b }, false, "partial entry 6 is Zero"},
		{"NoLayer", func(b []byte) []byte { b[depth] = 0; return b }, false, "has 1 layers"},
		{"TooManyLayers", func(b []byte) []byte { b[depth] = table.MaxDepth; return b }, false, "has 9 layers"},
		{"LayerInContainer0", func(b []byte) []byte { u32(b, layerCont, 0); return b }, false, "layer 1 is c0/s1"},
		{"TopHoldsNothing", func(b []byte) []byte {
			return append(append(b[:topWords:topWords], 0), b[layerCont-0:]...)
		}, false, "holds no sub-block"},
		{"LayerHoldsNothing", func(b []byte) []byte { b[layerWords] = 0; return b[:layerWords+1] }, false, "layer 1 is c1/s1 holding {}"},
		{"TooManyWords", func(b []byte) []byte { b[topWords] = 5; return b }, false, "5 sub-block words"},
		{"ZeroLastWord", func(b []byte) []byte { u32(b, topWords+1, 0); return b }, false, "ends in a zero word"},
		{"Trailing", func(b []byte) []byte { return append(b, 0) }, false, "trailing"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := c.damage(bytes.Clone(body))
			v := binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
			p, err := decodePage(key, v)
			var re *RecordError
			if !errors.As(err, &re) {
				t.Fatalf("decoded %v, err %v; want a RecordError", p != nil, err)
			}
			if !bytes.Equal(re.Key, key) || re.Truncated != c.truncated || !strings.Contains(re.Reason, c.reason) {
				t.Errorf("error %v (truncated %v); want key %s, truncated %v, reason with %q", err, re.Truncated, KeyName(key), c.truncated, c.reason)
			}
		})
	}
}

// TestPageRandomDamage changes random bytes of the partial entries of a
// version 2 page (and cuts or extends it), reseals it, and decodes it:
// never a panic, a RecordError naming the key or a page that re-encodes to
// the same bytes with only layouts a page can hold. Its seed is fixed, so
// that it runs the same everywhere; FuzzDecodePage explores further.
func TestPageRandomDamage(t *testing.T) {
	key := pageKey(3)
	v := encodePage(partialPage())
	body := v[:len(v)-4]
	fixed := 1 + PageEntries*entrySize
	rng := rand.New(rand.NewPCG(13, 0))
	decoded, failed := 0, 0
	for range 8000 {
		b := bytes.Clone(body)
		for range 1 + rng.IntN(4) {
			switch i := fixed + rng.IntN(len(b)-fixed); rng.IntN(8) {
			case 0:
				b = b[:i]
			case 1:
				b = append(b, byte(rng.IntN(256)))
			default:
				b[i] = byte(rng.IntN(256))
			}
			if len(b) <= fixed {
				break
			}
		}
		in := binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
		p, err := decodePage(key, in)
		checkPageEntries(t, key, in, p, err)
		if err != nil {
			var re *RecordError
			if !errors.As(err, &re) || !bytes.Equal(re.Key, key) {
				t.Fatalf("error %v is not a RecordError naming the key", err)
			}
			failed++
			continue
		}
		decoded++
		if out := encodePage(p); !bytes.Equal(out, in) {
			t.Fatalf("decoded page re-encodes differently")
		}
		for i, e := range p {
			if e.Part != nil && (!e.Mapped() || badPartLayout(e.Part) != "") {
				t.Fatalf("entry %d decoded as %v", i, e)
			}
		}
	}
	t.Logf("random damage: %d pages decoded, %d refused", decoded, failed)
	if failed == 0 || decoded == 0 {
		t.Errorf("%d decoded, %d refused: the damage should do both", decoded, failed)
	}
}

// checkPageEntries checks decodePageEntry against decodePage's answer
// (p, err) for record v: where the page decodes, each entry alone decodes
// the same; where it does not, an entry alone decodes or fails with a
// RecordError naming the key, never a panic.
func checkPageEntries(t *testing.T, key, v []byte, p *page, err error) {
	t.Helper()
	for i := 0; i < PageEntries; i += 1 + i%41 {
		e, eerr := decodePageEntry(key, v, i)
		if err == nil {
			if eerr != nil || !e.Equal(p[i]) {
				t.Fatalf("entry %d alone: %v, %v; in the page: %v", i, e, eerr, p[i])
			}
			continue
		}
		var re *RecordError
		if eerr != nil && (!errors.As(eerr, &re) || !bytes.Equal(re.Key, key)) {
			t.Fatalf("entry %d alone: error %v is not a RecordError naming the key", i, eerr)
		}
	}
}

// TestPageEntry: one entry decoded alone is the entry of the decoded page,
// for pages of either version.
func TestPageEntry(t *testing.T) {
	key := pageKey(5)
	for _, p := range []*page{zeroPage, new(page), partialPage(), fullPartialPage()} {
		v := encodePage(p)
		got, err := decodePage(key, v)
		if err != nil {
			t.Fatal(err)
		}
		for i := range PageEntries {
			e, err := decodePageEntry(key, v, i)
			if err != nil || !e.Equal(got[i]) {
				t.Fatalf("entry %d alone: %v, %v; want %v", i, e, err, got[i])
			}
		}
	}
}

// TestDiskIdentity checks that a disk record stored before UUIDs (version
// 1) still decodes and re-encodes as it was, with an identity derived from
// its id and creation time, and that a UUID survives a round trip.
func TestDiskIdentity(t *testing.T) {
	old := Disk{ID: 7, Name: "vol", Size: 1 << 20, SegmentSize: 1 << 16, Policy: table.Forward, Family: 7,
		Created: time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)}
	v := encodeDisk(old)
	if v[0] != diskVersionNoID {
		t.Fatalf("disk without UUID stored as version %d", v[0])
	}
	d, err := decodeDisk(diskKey(7), v)
	if err != nil {
		t.Fatal(err)
	}
	if d.UUID != ([16]byte{}) || !bytes.Equal(encodeDisk(d), v) {
		t.Fatalf("version 1 record decoded as %+v", d)
	}
	id := d.Identity()
	if id == ([16]byte{}) || id != old.Identity() {
		t.Fatalf("identity %x, want a stable non-zero one", id)
	}
	other := old
	other.Created = other.Created.Add(1)
	if other.Identity() == id {
		t.Fatal("two disks derived the same identity")
	}
	nd := old
	nd.UUID = NewUUID()
	v = encodeDisk(nd)
	if v[0] != diskVersion {
		t.Fatalf("disk with UUID stored as version %d", v[0])
	}
	d, err = decodeDisk(diskKey(7), v)
	if err != nil || d.UUID != nd.UUID || d.Identity() != nd.UUID {
		t.Fatalf("decoded %+v, %v; want UUID %x", d, err, nd.UUID)
	}
}

// TestContainerState checks that a container record stored before states
// (version 1) still decodes, online, and re-encodes as it was; that every
// other state survives a round trip as version 2; and that a version 2
// record claiming Online or an unknown state is corrupt.
func TestContainerState(t *testing.T) {
	old := Container{ID: 3, URI: "file:///c3", SlotSize: 1 << 20, Slots: 100, Used: 4}
	v := encodeContainer(old)
	if v[0] != containerV1 {
		t.Fatalf("online container stored as version %d", v[0])
	}
	c, err := decodeContainer(containerKey(3), v)
	if err != nil || !reflect.DeepEqual(c, old) || !bytes.Equal(encodeContainer(c), v) {
		t.Fatalf("version 1 record decoded as %+v, %v", c, err)
	}
	for _, st := range []ContainerState{ContainerDraining, ContainerFailed} {
		nc := old
		nc.State = st
		v := encodeContainer(nc)
		if v[0] != containerVersion {
			t.Fatalf("%v container stored as version %d", st, v[0])
		}
		c, err := decodeContainer(containerKey(3), v)
		if err != nil || !reflect.DeepEqual(c, nc) {
			t.Fatalf("%v: decoded %+v, %v", st, c, err)
		}
	}
	for _, st := range []ContainerState{ContainerOnline, containerStates, 255} {
		e := &enc{}
		e.u8(containerVersion)
		e.u32(3)
		e.str("")
		e.u64(1 << 20)
		e.u64(10)
		e.u64(0)
		e.u8(uint8(st))
		if _, err := decodeContainer(containerKey(3), e.seal()); !errors.Is(err, ErrCorrupt) {
			t.Errorf("version 2 record in state %d: %v, want ErrCorrupt", st, err)
		}
	}
	if got := ContainerDraining.String(); got != "draining" {
		t.Errorf("String() = %q", got)
	}
}

// TestMirroredContainerRecord checks that a mirrored container's
// replicas, epoch and rebuild cursor survive a round trip, and that a
// record with a bad replica count or state is corrupt.
func TestMirroredContainerRecord(t *testing.T) {
	c := Container{ID: 4, SlotSize: 1 << 20, Slots: 64, Used: 3, Epoch: 7, CursorFam: 2, CursorSeg: 9,
		Replicas: []Replica{{URI: "nbd://a/x", State: ReplicaHealthy}, {URI: "nbd://b/x", State: ReplicaRebuilding, Full: true}}}
	v := encodeContainer(c)
	if v[0] != containerMirror {
		t.Fatalf("mirrored container stored as version %d", v[0])
	}
	got, err := decodeContainer(containerKey(4), v)
	if err != nil || !reflect.DeepEqual(got, c) {
		t.Fatalf("decoded %+v, %v; want %+v", got, err, c)
	}
	for _, bad := range []Container{
		{ID: 4, SlotSize: 1 << 20, Slots: 64, Replicas: []Replica{{URI: "a"}}},
		{ID: 4, SlotSize: 1 << 20, Slots: 64, Replicas: []Replica{{URI: "a"}, {URI: "b", State: replicaStates}}},
	} {
		if _, err := decodeContainer(containerKey(4), encodeContainer(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%+v decoded: %v", bad, err)
		}
		if err := bad.validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%+v valid: %v", bad, err)
		}
	}
}
