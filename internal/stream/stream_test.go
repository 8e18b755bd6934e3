package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"time"
)

// snap returns a valid snapshot identity named name of size bytes.
func snap(name string, id byte, size uint64) Snapshot {
	return Snapshot{
		Name:        name,
		ID:          [16]byte{id, 0xa5, 15: id},
		Created:     time.Date(2026, 12, 5, 5, 19, 0, int(id)*1001, time.UTC),
		Size:        size,
		SegmentSize: 1 << 20,
	}
}

// fullHeader and incHeader are the headers of the hand-made streams.
func fullHeader() Header { return Header{Source: snap("s1", 1, 1<<20)} }

func incHeader() Header {
	base := snap("s0", 2, 1<<20)
	return Header{Source: snap("s1", 1, 1<<20), Base: &base}
}

// encode writes a stream of h and recs, failing the test on any error.
func encode(t testing.TB, h Header, recs []Record) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, h)
	if err != nil {
		t.Fatalf("NewWriter: %v", err)
	}
	for _, r := range recs {
		if r.Type == TypeData {
			err = w.Data(r.Off, r.Data)
		} else {
			err = w.Zero(r.Off, r.Len)
		}
		if err != nil {
			t.Fatalf("%s [%d, +%d): %v", r.Type, r.Off, r.Len, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return buf.Bytes()
}

// decode reads the whole stream b: its header, a copy of every record,
// and the error that ended it (nil when Next returned io.EOF).
func decode(b []byte) (Header, []Record, error) {
	r, err := NewReader(bytes.NewReader(b))
	if err != nil {
		return Header{}, nil, err
	}
	var recs []Record
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			return r.Header(), recs, nil
		}
		if err != nil {
			return r.Header(), recs, err
		}
		rec.Data = bytes.Clone(rec.Data)
		recs = append(recs, rec)
	}
}

// pattern returns n bytes that differ from those at any other offset.
func pattern(off uint64, n int) []byte {
	p := make([]byte, n)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(p[i:], off+uint64(i)^0x5eed)
	}
	return p
}

// smallRecords are the records of the hand-made streams: data, zero,
// data, in a 1 MiB source.
func smallRecords() []Record {
	return []Record{
		{Type: TypeData, Off: 0, Len: 512, Data: pattern(0, 512)},
		{Type: TypeZero, Off: 4096, Len: 8192},
		{Type: TypeData, Off: 12288, Len: 1024, Data: pattern(12288, 1024)},
	}
}

// randomStream returns a random header and the records a reader must
// return for it: the data split at MaxData.
func randomStream(rng *rand.Rand) (Header, []Record, []Record) {
	size := uint64(1+rng.IntN(16<<11)) * Sector // up to 16 MiB
	h := Header{Source: snap(fmt.Sprintf("snap-%d", rng.IntN(1000)), byte(1+rng.IntN(100)), size)}
	h.Source.Created = time.Unix(rng.Int64N(4e9), rng.Int64N(1e9))
	if rng.IntN(2) == 0 {
		base := snap("base", 200, uint64(1+rng.IntN(16<<11))*Sector)
		h.Base = &base
	}
	var in, out []Record
	off := uint64(0)
	for {
		off += uint64(rng.IntN(3)) * uint64(rng.IntN(4096)) * Sector
		n := uint64(1 + rng.IntN(64))
		if rng.IntN(10) == 0 {
			n = uint64(1 + rng.IntN(3*MaxData/Sector))
		}
		n *= Sector
		if off >= size {
			break
		}
		n = min(n, size-off)
		if rng.IntN(3) == 0 {
			rec := Record{Type: TypeZero, Off: off, Len: n}
			in, out = append(in, rec), append(out, rec)
		} else {
			p := pattern(off, int(n))
			in = append(in, Record{Type: TypeData, Off: off, Len: n, Data: p})
			for o := uint64(0); o < n; o += MaxData {
				m := min(n-o, MaxData)
				out = append(out, Record{Type: TypeData, Off: off + o, Len: m, Data: p[o : o+m]})
			}
		}
		off += n
	}
	return h, in, out
}

func TestRoundTrip(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		rng := rand.New(rand.NewPCG(seed, 14))
		h, in, want := randomStream(rng)
		b := encode(t, h, in)
		gotH, got, err := decode(b)
		if err != nil {
			t.Fatalf("seed %d: decode: %v", seed, err)
		}
		checkHeader(t, gotH, h)
		if len(got) != len(want) {
			t.Fatalf("seed %d: %d records, want %d", seed, len(got), len(want))
		}
		for i := range got {
			g, w := got[i], want[i]
			if g.Type != w.Type || g.Off != w.Off || g.Len != w.Len || !bytes.Equal(g.Data, w.Data) {
				t.Fatalf("seed %d: record %d is %s [%d, +%d), want %s [%d, +%d) (or its data differs)", seed, i, g.Type, g.Off, g.Len, w.Type, w.Off, w.Len)
			}
		}
		// The records read re-encode to the same bytes.
		if re := encode(t, gotH, got); !bytes.Equal(re, b) {
			t.Fatalf("seed %d: re-encoding differs", seed)
		}
	}
}

// checkHeader compares two headers, times with Equal.
func checkHeader(t *testing.T, got, want Header) {
	t.Helper()
	eq := func(a, b Snapshot) bool {
		return a.Name == b.Name && a.ID == b.ID && a.Created.Equal(b.Created) && a.Size == b.Size && a.SegmentSize == b.SegmentSize
	}
	if !eq(got.Source, want.Source) || (got.Base == nil) != (want.Base == nil) || (got.Base != nil && !eq(*got.Base, *want.Base)) {
		t.Fatalf("header %+v (base %+v), want %+v (base %+v)", got, got.Base, want, want.Base)
	}
}

func TestEmptyStream(t *testing.T) {
	b := encode(t, fullHeader(), nil)
	h, recs, err := decode(b)
	if err != nil || len(recs) != 0 {
		t.Fatalf("decode: %d records, %v", len(recs), err)
	}
	checkHeader(t, h, fullHeader())
}

// reseal gives every record of b a valid checksum and, if fixEnd, the
// end record the counts and chain of the records before it, so that a test (or the
// fuzzer) that changed a field reaches the check behind the checksum. It
// walks b by the records' lengths, whatever their types, and stops where
// a record does not fit.
func reseal(b []byte, fixEnd bool) []byte {
	b = bytes.Clone(b)
	var e extents
	for pos := preambleLen; pos+headLen <= len(b); {
		t := RecordType(b[pos])
		n := int(binary.LittleEndian.Uint32(b[pos+4:]))
		end := pos + headLen + n
		if n > len(b) || end+crcLen > len(b) {
			break
		}
		body := b[pos+headLen : end]
		if t == TypeEnd && n == endBody && fixEnd {
			e.appendEndBody(body[:0])
		}
		sum := crc32.Checksum(b[pos:end], castagnoli)
		binary.LittleEndian.PutUint32(b[end:], sum)
		switch {
		case t == TypeData && n >= 8:
			e.add(t, 0, uint64(n-8), sum)
		case t == TypeZero && n == zeroBody:
			e.add(t, 0, binary.LittleEndian.Uint64(body[8:]), sum)
		case t != TypeEnd:
			e.chainSum(sum)
		}
		pos = end + crcLen
	}
	return b
}

// recordAt returns the byte offset of record i of b (0: the header).
func recordAt(b []byte, i int) int {
	pos := preambleLen
	for ; i > 0; i-- {
		pos += headLen + int(binary.LittleEndian.Uint32(b[pos+4:])) + crcLen
	}
	return pos
}

func TestReject(t *testing.T) {
	full := encode(t, fullHeader(), smallRecords())
	inc := encode(t, incHeader(), smallRecords())
	r1 := recordAt(full, 1) // the first data record
	r2 := recordAt(full, 2) // the zero record
	r3 := recordAt(full, 3) // the second data record
	r4 := recordAt(full, 4) // the end record
	hdr := preambleLen + headLen

	// edit returns a copy of b changed by f, resealed.
	edit := func(b []byte, f func(b []byte) []byte) []byte { return reseal(f(bytes.Clone(b)), true) }
	// editSums is edit leaving the end record's body as it is.
	editSums := func(b []byte, f func(b []byte) []byte) []byte { return reseal(f(bytes.Clone(b)), false) }
	put64 := func(at int, v uint64) func([]byte) []byte {
		return func(b []byte) []byte { binary.LittleEndian.PutUint64(b[at:], v); return b }
	}
	put32 := func(at int, v uint32) func([]byte) []byte {
		return func(b []byte) []byte { binary.LittleEndian.PutUint32(b[at:], v); return b }
	}
	set := func(at int, v byte) func([]byte) []byte {
		return func(b []byte) []byte { b[at] = v; return b }
	}
	// withRecord inserts a record of type t and body before byte at.
	withRecord := func(at int, t RecordType, body []byte) func([]byte) []byte {
		return func(b []byte) []byte {
			r := appendHead(nil, t, len(body))
			r = append(append(r, body...), 0, 0, 0, 0)
			return append(b[:at:at], append(r, b[at:]...)...)
		}
	}
	zeroRec := func(off, n uint64) []byte {
		return binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, off), n)
	}

	tests := []struct {
		name string
		b    []byte
		err  error
		msg  string // in the error's text
	}{
		{"empty", nil, ErrTruncated, "ends at byte 0"},
		{"magic", edit(full, set(1, 'X')), ErrNotStream, `starts with "\x89XEGMAP\n"`},
		{"short other bytes", []byte("hello"), ErrNotStream, `starts with "hello"`},
		{"version", edit(full, put32(8, 2)), ErrVersion, "version 2 at byte 8"},
		{"cut in preamble", full[:10], ErrTruncated, "ends at byte 10"},
		{"short, not the magic", edit(full, set(2, 'x'))[:10], ErrNotStream, `starts with "\x89SxGMAP\n"`},
		{"first record not header", edit(full, set(preambleLen, byte(TypeZero))), ErrCorrupt, "record 0 (zero) at byte 12: body of"},
		{"header flags", edit(full, put32(hdr, 6)), ErrCorrupt, "record 0 (header) at byte 12: unknown flags 0x6"},
		{"header zero ID", edit(full, func(b []byte) []byte { clear(b[hdr+4 : hdr+20]); return b }), ErrCorrupt, "all-zero ID"},
		{"header nanoseconds", edit(full, put32(hdr+4+24, 1e9)), ErrCorrupt, "1000000000 nanoseconds"},
		{"header size unaligned", edit(full, put64(hdr+4+28, 1000)), ErrCorrupt, "size 1000"},
		{"header segment size", edit(full, put64(hdr+4+36, 3<<20)), ErrCorrupt, "segment size 3145728"},
		{"header name length", edit(full, put32(hdr+4+44, 200)), ErrCorrupt, "name of 200 bytes, 2 left"},
		{"header name not UTF-8", edit(full, set(hdr+4+46, 0xff)), ErrCorrupt, "is not UTF-8"},
		{"header body too long", edit(full, put32(preambleLen+4, headerMaxBody+1)), ErrCorrupt, "body of 607 bytes (from 51 to 606)"},
		{"base same ID", edit(inc, func(b []byte) []byte { copy(b[hdr+4+idLen+2:], b[hdr+4:hdr+20]); return b }), ErrCorrupt, "same ID"},
		{"unknown type", edit(full, set(r1, 'X')), ErrCorrupt, fmt.Sprintf("record 1 at byte %d: unknown record type 0x58", r1)},
		{"reserved", edit(full, set(r1+2, 1)), ErrCorrupt, fmt.Sprintf("record 1 (data) at byte %d: reserved bytes", r1)},
		{"4 GiB length", edit(full, put32(r1+4, 0xffffffff)), ErrCorrupt, fmt.Sprintf("record 1 (data) at byte %d: body of 4294967295 bytes", r1)},
		{"data length MaxData+1 sector", edit(full, put32(r1+4, dataMaxBody+Sector)), ErrCorrupt, "body of 4194824 bytes"},
		{"data length unaligned", edit(full, put32(r1+4, 8+513)), ErrCorrupt, "body of 521 bytes (8 plus a multiple of 512"},
		{"data length empty", edit(full, put32(r1+4, 8)), ErrCorrupt, "body of 8 bytes"},
		{"zero length field", edit(full, put32(r2+4, 24)), ErrCorrupt, fmt.Sprintf("record 2 (zero) at byte %d: body of 24 bytes (exactly 16)", r2)},
		{"end length field", edit(full, put32(r4+4, 20)), ErrCorrupt, fmt.Sprintf("record 4 (end) at byte %d: body of 20 bytes (exactly 28)", r4)},
		{"data offset unaligned", edit(full, put64(r1+headLen, 100)), ErrCorrupt, fmt.Sprintf("record 1 (data) at byte %d: extent [100, +512) not aligned", r1)},
		{"zero extent unaligned", edit(full, put64(r2+headLen+8, 1000)), ErrCorrupt, "extent [4096, +1000) not aligned"},
		{"zero extent empty", edit(full, put64(r2+headLen+8, 0)), ErrCorrupt, fmt.Sprintf("record 2 (zero) at byte %d: empty extent at 4096", r2)},
		{"data past the end", edit(full, put64(r3+headLen, 1<<20)), ErrCorrupt, "extent [1048576, +1024) past the end, 1048576"},
		{"zero past the end", edit(full, put64(r2+headLen+8, 1<<20)), ErrCorrupt, "extent [4096, +1048576) past the end"},
		{"zero offset wraps", edit(full, put64(r2+headLen, 1<<63)), ErrCorrupt, "past the end"},
		{"huge zero extent wraps", edit(full, put64(r2+headLen+8, ^uint64(511))), ErrCorrupt, "past the end"},
		{"overlap", edit(full, put64(r2+headLen, 0)), ErrCorrupt, fmt.Sprintf("record 2 (zero) at byte %d: extent [0, +8192) starts before the end of the previous one, 512", r2)},
		{"out of order", edit(full, put64(r3+headLen, 2048)), ErrCorrupt, "extent [2048, +1024) starts before the end of the previous one, 12288"},
		{"second header", edit(full, withRecord(r2, TypeHeader, full[hdr:hdr+headerMinBody+1])), ErrCorrupt, fmt.Sprintf("record 2 (header) at byte %d: a second header record", r2)},
		{"end counts", editSums(full, put64(r4+headLen, 2)), ErrCorrupt, fmt.Sprintf("record 4 (end) at byte %d: says 2 records", r4)},
		{"end chain", editSums(full, set(r4+headLen+24, 0)), ErrCorrupt, "record 4 (end)"},
		{"bad checksum", func() []byte { b := bytes.Clone(full); b[r3+headLen+8] ^= 1; return b }(), ErrCorrupt, fmt.Sprintf("record 3 (data) at byte %d: checksum", r3)},
		{"record dropped", append(bytes.Clone(full[:r2]), full[r3:]...), ErrCorrupt, "record 3 (end)"},
		{"records swapped", edit(full, func(b []byte) []byte {
			return append(append(append(b[:r1:r1], full[r3:r4]...), full[r1:r2]...), full[r4:]...)
		}), ErrCorrupt, "starts before the end of the previous one"},
		{"stream spliced", append(bytes.Clone(full[:r4]), inc[recordAt(inc, 4):]...), ErrCorrupt, "record 4 (end)"},
		{"no end record", full[:r4], ErrTruncated, fmt.Sprintf("record 4 at byte %d: the input ends with no end record", r4)},
		{"cut in head", full[:r3+3], ErrTruncated, fmt.Sprintf("record 3 at byte %d: the input ends 3 bytes into the 8-byte head", r3)},
		{"cut in payload", full[:r3+headLen+100], ErrTruncated, fmt.Sprintf("record 3 (data) at byte %d: the input ends 100 bytes into the 1032-byte body", r3)},
		{"cut in checksum", full[:r4-2], ErrTruncated, "2 bytes into the 4-byte checksum"},
		{"cut in end", full[:len(full)-1], ErrTruncated, "record 4 (end)"},
		{"trailing byte", append(bytes.Clone(full), 0), ErrCorrupt, fmt.Sprintf("record 5 at byte %d: bytes after the end record", len(full))},
		{"trailing stream", append(bytes.Clone(full), full...), ErrCorrupt, "bytes after the end record"},
		{"extra zero record", editSums(full, withRecord(r4, TypeZero, zeroRec(1<<19, 512))), ErrCorrupt, "record 5 (end)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := decode(tc.b)
			if !errors.Is(err, tc.err) {
				t.Fatalf("error %v, want %v", err, tc.err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("error %q does not say %q", err, tc.msg)
			}
		})
	}
	_ = r3
}

func TestRejectFlippedByte(t *testing.T) {
	for _, h := range []Header{fullHeader(), incHeader()} {
		b := encode(t, h, smallRecords())
		for i := range b {
			// The lowest bit, the highest, the whole byte.
			for _, x := range []byte{0x01, 0x80, 0xff} {
				c := bytes.Clone(b)
				c[i] ^= x
				_, _, err := decode(c)
				if err == nil {
					t.Fatalf("byte %d xor %#x: stream accepted", i, x)
				}
				if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotStream) && !errors.Is(err, ErrVersion) && !errors.Is(err, ErrTruncated) {
					t.Fatalf("byte %d xor %#x: error %v wraps no sentinel", i, x, err)
				}
			}
		}
	}
}

func TestRejectTruncated(t *testing.T) {
	for _, h := range []Header{fullHeader(), incHeader()} {
		b := encode(t, h, smallRecords())
		for n := range len(b) {
			if _, _, err := decode(b[:n]); !errors.Is(err, ErrTruncated) {
				t.Fatalf("cut at byte %d of %d: error %v, want ErrTruncated", n, len(b), err)
			}
		}
	}
}

// errReader returns its bytes, then err.
type errReader struct {
	b   []byte
	err error
}

func (r *errReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, r.err
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

func TestReadError(t *testing.T) {
	eio := errors.New("EIO")
	b := encode(t, fullHeader(), smallRecords())
	for _, n := range []int{0, 5, recordAt(b, 1), recordAt(b, 1) + 20, recordAt(b, 4), len(b)} {
		r, err := NewReader(&errReader{b: b[:n], err: eio})
		for err == nil {
			_, err = r.Next()
		}
		if !errors.Is(err, eio) || errors.Is(err, ErrTruncated) {
			t.Fatalf("read error after %d bytes: got %v", n, err)
		}
		if r != nil {
			if _, again := r.Next(); !errors.Is(again, eio) {
				t.Fatalf("second Next after the error: %v", again)
			}
		}
	}
}

// allocated returns the bytes f allocates.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

func TestHugeLengthNotAllocated(t *testing.T) {
	b := encode(t, fullHeader(), smallRecords())
	r1 := recordAt(b, 1)
	for _, tc := range []struct {
		name  string
		n     uint32
		limit uint64
	}{
		// Refused before anything is read: nothing near its size.
		{"4 GiB", 0xffffffff, 4 << 10},
		// Within the limit, but the input holds 1 KiB of it: the payload
		// buffer grows only as the bytes arrive.
		{"MaxData", dataMaxBody, 2 * firstChunk},
	} {
		c := bytes.Clone(b)
		binary.LittleEndian.PutUint32(c[r1+4:], tc.n)
		r, err := NewReader(bytes.NewReader(c))
		if err != nil {
			t.Fatal(err)
		}
		n := allocated(func() { _, err = r.Next() })
		if err == nil {
			t.Fatalf("%s: record accepted", tc.name)
		}
		if n > tc.limit {
			t.Fatalf("%s: Next allocated %d bytes, want at most %d (%v)", tc.name, n, tc.limit, err)
		}
	}
}

func TestNoAllocsPerRecord(t *testing.T) {
	p := pattern(0, 64<<10)
	w, err := NewWriter(io.Discard, Header{Source: snap("big", 9, 1<<30)})
	if err != nil {
		t.Fatal(err)
	}
	off := uint64(0)
	if a := testing.AllocsPerRun(100, func() {
		if err := w.Data(off, p); err != nil {
			t.Fatal(err)
		}
		if err := w.Zero(off+uint64(len(p)), Sector); err != nil {
			t.Fatal(err)
		}
		off += uint64(len(p)) + Sector
	}); a > 0 {
		t.Fatalf("Writer: %.1f allocations per Data and Zero", a)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	recs := make([]Record, 60)
	for i := range recs {
		recs[i] = Record{Type: TypeData, Off: uint64(i) * (64 << 10), Len: 64 << 10, Data: p}
	}
	r, err := NewReader(bytes.NewReader(encode(t, Header{Source: snap("big", 9, 1<<30)}, recs)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Next(); err != nil { // the first data record sizes the buffer
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(50, func() {
		if _, err := r.Next(); err != nil {
			t.Fatal(err)
		}
	}); a > 0 {
		t.Fatalf("Reader: %.1f allocations per record", a)
	}
}

func TestWriterRejects(t *testing.T) {
	bad := func(f func(h *Header)) Header { h := incHeader(); f(&h); return h }
	for _, tc := range []struct {
		name string
		h    Header
		msg  string
	}{
		{"no name", bad(func(h *Header) { h.Source.Name = "" }), "source: name of 0 bytes"},
		{"long name", bad(func(h *Header) { h.Base.Name = strings.Repeat("x", 256) }), "base: name of 256 bytes"},
		{"zero ID", bad(func(h *Header) { h.Source.ID = [16]byte{} }), "all-zero ID"},
		{"size", bad(func(h *Header) { h.Source.Size = 0 }), "size 0"},
		{"too big", bad(func(h *Header) { h.Source.Size = MaxSize + Sector }), "size 1152921504606847488"},
		{"segment size", bad(func(h *Header) { h.Base.SegmentSize = 256 }), "segment size 256"},
		{"same ID", bad(func(h *Header) { h.Base.ID = h.Source.ID }), "same ID"},
	} {
		if _, err := NewWriter(io.Discard, tc.h); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: NewWriter error %v, want ErrInvalid saying %q", tc.name, err, tc.msg)
		}
	}

	var buf bytes.Buffer
	w, err := NewWriter(&buf, fullHeader())
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Data(4096, pattern(4096, 4096)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		f    func() error
		msg  string
	}{
		{"unaligned offset", func() error { return w.Zero(8192+1, 512) }, "not aligned"},
		{"unaligned length", func() error { return w.Data(8192, make([]byte, 100)) }, "not aligned"},
		{"overlap", func() error { return w.Zero(4096, 512) }, "starts before the end of the previous one, 8192"},
		{"past the end", func() error { return w.Zero(8192, 1<<20) }, "past the end"},
	} {
		if err := tc.f(); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: error %v, want ErrInvalid saying %q", tc.name, err, tc.msg)
		}
	}
	// The refused calls wrote nothing: the stream is still valid.
	if err := w.Zero(8192, 512); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("second Close: %v", err)
	}
	if err := w.Data(1<<19, make([]byte, 512)); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Data after Close: %v", err)
	}
	if _, recs, err := decode(buf.Bytes()); err != nil || len(recs) != 2 {
		t.Fatalf("decode after refused calls: %d records, %v", len(recs), err)
	}
}

// failWriter fails every write after the first n bytes.
type failWriter struct{ n int }

func (w *failWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		k := w.n
		w.n = 0
		return k, errors.New("ENOSPC")
	}
	w.n -= len(p)
	return len(p), nil
}

func TestWriterError(t *testing.T) {
	w, err := NewWriter(&failWriter{n: 1000}, fullHeader())
	if err != nil {
		t.Fatal(err)
	}
	err = w.Data(0, make([]byte, 1<<19)) // larger than the buffer: reaches the writer
	if err == nil {
		t.Fatal("Data: no error from a failing writer")
	}
	if again := w.Zero(1<<19, 512); !errors.Is(again, err) {
		t.Fatalf("Zero after a write error: %v, want %v", again, err)
	}
	if again := w.Close(); !errors.Is(again, err) {
		t.Fatalf("Close after a write error: %v, want %v", again, err)
	}
}

func TestRecordTypeString(t *testing.T) {
	for ty, want := range map[RecordType]string{TypeHeader: "header", TypeData: "data", TypeZero: "zero", TypeEnd: "end", 7: "type 0x07"} {
		if got := ty.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", uint8(ty), got, want)
		}
	}
}
