package transport

import (
	"errors"
	"fmt"
	"math"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestCodeOfStepDown: a controller stepping down answers with errors its
// agents retry (on the next leader), not with I/O errors for their hosts.
func TestCodeOfStepDown(t *testing.T) {
	for _, err := range []error{meta.ErrLeadershipLost, meta.ErrUnreachable, meta.ErrClosed, controller.ErrClosed, protocol.ErrUnavailable} {
		if got := codeOf(fmt.Errorf("fault: %w", err)); got != pb.Code_CODE_UNAVAILABLE {
			t.Errorf("codeOf(%v) = %v, want CODE_UNAVAILABLE", err, got)
		}
	}
	if got := codeOf(fmt.Errorf("x: %w", meta.ErrCorrupt)); got != pb.Code_CODE_IO {
		t.Errorf("codeOf(ErrCorrupt) = %v, want CODE_IO", got)
	}
}

// partialOf builds a partial entry for a segment of n sub-blocks from the
// fuzzer's words: a whole entry at base, then a copy-on-write (table.Over)
// of a new slot per word, each holding the sub-blocks that word and the
// next one select, while the result stays partial and within MaxDepth.
func partialOf(n int, base table.Location, words []uint64) table.Entry {
	e := table.Entry{Loc: base}
	for i := 0; i+1 < len(words) && e.Depth() < table.MaxDepth; i += 2 {
		var b table.Bits
		b[0], b[1], b[2], b[3] = words[i], words[i+1], words[i]^words[i+1], words[i]*0x9e3779b97f4a7c15
		b = b.AndNot(table.Range(n, table.SubBlocks))
		if b.Empty() || b.Has(table.Full(n)) {
			continue
		}
		next := table.Over(table.Location{Container: base.Container + 1 + uint32(i), Slot: base.Slot + uint32(i)}, b, e, n)
		if next.Part.Valid(next.Loc, n) != nil {
			break
		}
		e = next
	}
	return e
}

// roundTrip sends e across the wire and back.
func roundTrip(t *testing.T, e table.Entry) (table.Entry, error) {
	t.Helper()
	b, err := proto.Marshal(entryToPB(e))
	if err != nil {
		t.Fatal(err)
	}
	var back pb.Entry
	if err := proto.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	return entryFromPB(&back)
}

// FuzzEntryRoundTrip: an entry, partial (up to MaxDepth layers) or whole,
// crosses the wire unchanged, layers and all; a voided one loses its
// layers (they mean nothing) and nothing else.
func FuzzEntryRoundTrip(f *testing.F) {
	f.Add(uint8(0), uint8(15), uint32(1), uint32(2), uint64(0), uint64(0), uint64(0), uint64(0))
	f.Add(uint8(0), uint8(15), uint32(1), uint32(2), uint64(0xf), uint64(0), uint64(0x100), uint64(0))
	f.Add(uint8(table.NoWrite), uint8(255), uint32(3), uint32(9), uint64(1<<63), uint64(1), uint64(0xff00), uint64(1<<40))
	f.Add(uint8(table.Zero), uint8(15), uint32(1), uint32(2), uint64(0xf), uint64(0), uint64(0x100), uint64(0))
	f.Fuzz(func(t *testing.T, state, n1 uint8, cont, slot uint32, w0, w1, w2, w3 uint64) {
		st := table.State(state)
		if !st.Valid() || cont == 0 || cont > 1<<31 {
			return
		}
		n := int(n1) + 1
		e := partialOf(n, table.Location{Container: cont, Slot: slot}, []uint64{w0, w1, w2, w3, w0 ^ w3, w1 + w2})
		e.State = st
		got, err := roundTrip(t, e)
		if err != nil {
			t.Fatalf("%v (part %+v): %v", e, e.Part, err)
		}
		if !got.Equal(e) {
			t.Fatalf("%v sent, %v received", e, got)
		}
		if got.Voided() && got.Part != nil {
			t.Fatalf("voided %v received with layers", got)
		}
		if e.Partial() && (got.Depth() != e.Depth() || got.Part.Valid(got.Loc, n) != nil) {
			t.Fatalf("%v sent (depth %d), %v received (depth %d)", e, e.Depth(), got, got.Depth())
		}
	})
}

// FuzzEntryFromPB: whatever entry arrives from the wire is either refused
// with protocol.ErrBadRequest or converted to an entry of a valid shape
// that crosses back unchanged; it never panics.
func FuzzEntryFromPB(f *testing.F) {
	for _, e := range []*pb.Entry{
		{Container: 1, Slot: 2},
		{Container: 1, Slot: 2, Bits: []uint64{1}, Under: []*pb.Layer{{Container: 2, Slot: 3, Bits: []uint64{0xffff}}}},
		{Container: 1, Slot: 2, Bits: []uint64{1, 2, 3, 4, 5}, Under: []*pb.Layer{{Container: 2, Bits: []uint64{1 << 63}}}},
		{Container: 0, Bits: []uint64{1}, Under: []*pb.Layer{{Container: 0, Bits: []uint64{3}}}},
		{State: uint32(table.Invalid), Bits: []uint64{1}, Under: []*pb.Layer{{Container: 2, Bits: []uint64{3}}}},
	} {
		b, err := proto.Marshal(e)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var in pb.Entry
		if proto.Unmarshal(raw, &in) != nil {
			return
		}
		e, err := entryFromPB(&in)
		if err != nil {
			if !errors.Is(err, protocol.ErrBadRequest) {
				t.Fatalf("%v: %v is not ErrBadRequest", &in, err)
			}
			return
		}
		if e.Part != nil {
			n := e.Part.Under[len(e.Part.Under)-1].Bits.Count()
			if err := e.Part.Valid(e.Loc, n); err != nil || e.Voided() || e.Depth() > table.MaxDepth {
				t.Fatalf("%v accepted as %v: %v", &in, e, err)
			}
		}
		back, err := roundTrip(t, e)
		if err != nil || !back.Equal(e) {
			t.Fatalf("%v accepted as %v, sent back as %v (%v)", &in, e, back, err)
		}
	})
}

// TestEntryFromPBRefuses: each kind of malformed entry from the wire is a
// protocol.ErrBadRequest error for that entry.
func TestEntryFromPBRefuses(t *testing.T) {
	full := []uint64{0xffff} // a 16-sub-block segment's base
	layer := func(c uint32, bits ...uint64) *pb.Layer { return &pb.Layer{Container: c, Slot: c, Bits: bits} }
	deep := make([]*pb.Layer, table.MaxDepth)
	for i := range deep {
		deep[i] = layer(uint32(10+i), 1<<(i+1))
	}
	deep[len(deep)-1].Bits = full
	for _, c := range []struct {
		what string
		e    *pb.Entry
	}{
		{"undefined state", &pb.Entry{Container: 1, State: 0x80}},
		{"state beyond a byte", &pb.Entry{Container: 1, State: 0x101}},
		{"too many layers", &pb.Entry{Container: 1, Bits: []uint64{1}, Under: deep}},
		{"bits beyond 256", &pb.Entry{Container: 1, Bits: []uint64{1, 0, 0, 0, 1}, Under: []*pb.Layer{layer(2, full...)}}},
		{"layer bits beyond 256", &pb.Entry{Container: 1, Bits: []uint64{1}, Under: []*pb.Layer{layer(2, 0xffff, 0, 0, 0, 0)}}},
		{"layer with container 0", &pb.Entry{Container: 1, Bits: []uint64{1}, Under: []*pb.Layer{layer(0, full...)}}},
		{"layers on a voided entry", &pb.Entry{Container: 1, State: uint32(table.Zero), Bits: []uint64{1}, Under: []*pb.Layer{layer(2, full...)}}},
		{"bits without layers", &pb.Entry{Container: 1, Bits: []uint64{1}}},
		{"top without container", &pb.Entry{Bits: []uint64{1}, Under: []*pb.Layer{layer(2, full...)}}},
		{"top holding nothing", &pb.Entry{Container: 1, Under: []*pb.Layer{layer(2, full...)}}},
		{"top holding all", &pb.Entry{Container: 1, Bits: full, Under: []*pb.Layer{layer(2, full...)}}},
		{"base not holding all", &pb.Entry{Container: 1, Bits: []uint64{1}, Under: []*pb.Layer{layer(2, 0xfff0)}}},
		{"slot named twice", &pb.Entry{Container: 2, Slot: 2, Bits: []uint64{1}, Under: []*pb.Layer{layer(2, full...)}}},
		{"hidden layer", &pb.Entry{Container: 1, Bits: []uint64{3}, Under: []*pb.Layer{layer(2, 1), layer(3, full...)}}},
	} {
		_, err := entriesFromPB([]*pb.Entry{{Container: 1}, c.e})
		if !errors.Is(err, protocol.ErrBadRequest) {
			t.Errorf("%s (%v): got %v, want ErrBadRequest", c.what, c.e, err)
		}
	}
	r := &pb.FaultReply{Staged: true, Stage: &pb.Entry{Container: 1}, StageFrom: &pb.Entry{Container: 1, Bits: []uint64{1}, Under: []*pb.Layer{layer(0, full...)}}}
	if _, err := stageFromPB(r); !errors.Is(err, protocol.ErrBadRequest) {
		t.Errorf("stage from a malformed entry: got %v, want ErrBadRequest", err)
	}
}

// FuzzStageRoundTrip: a fault reply's stage crosses the wire unchanged,
// whole-segment (no From), copying (From set, partial or whole) and
// sparse alike, and a reply without one stays without.
func FuzzStageRoundTrip(f *testing.F) {
	f.Add(false, uint32(0), uint32(0), uint64(0), uint32(0), uint32(0), false, uint64(0), uint64(0))
	f.Add(true, uint32(1), uint32(5), uint64(7), uint32(0), uint32(0), false, uint64(0), uint64(0))
	f.Add(true, uint32(2), uint32(9), uint64(1<<63), uint32(1), uint32(3), false, uint64(0), uint64(0))
	f.Add(true, uint32(2), uint32(9), uint64(1<<63), uint32(1), uint32(3), true, uint64(0xf0), uint64(3))
	f.Add(true, uint32(1<<31), uint32(1<<32-1), uint64(1<<64-1), uint32(1<<31), uint32(1<<32-1), true, uint64(1<<63), uint64(1<<62))
	f.Fuzz(func(t *testing.T, staged bool, cont, slot uint32, tok uint64, fromCont, fromSlot uint32, sparse bool, w0, w1 uint64) {
		var st *protocol.Stage
		if staged {
			st = &protocol.Stage{Loc: table.Location{Container: cont, Slot: slot}, Token: tok, Sparse: sparse}
			if fromCont != 0 && fromCont <= 1<<31 {
				st.From = partialOf(256, table.Location{Container: fromCont, Slot: fromSlot}, []uint64{w0, w1, w1, w0})
			}
		}
		out := &pb.FaultReply{First: 3}
		stageToPB(out, st)
		b, err := proto.Marshal(out)
		if err != nil {
			t.Fatal(err)
		}
		var back pb.FaultReply
		if err := proto.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		got, err := stageFromPB(&back)
		switch {
		case err != nil:
			t.Fatalf("stage %+v: %v", st, err)
		case st == nil && got != nil:
			t.Fatalf("no stage sent, %+v received", *got)
		case st == nil:
		case got == nil || got.Loc != st.Loc || got.Token != st.Token || got.Sparse != st.Sparse || !got.From.Equal(st.From):
			t.Fatalf("stage %+v (from %v) sent, %+v received", *st, st.From, got)
		case got.Copies() != st.Copies() || got.From.Depth() != st.From.Depth():
			t.Fatalf("stage %+v: Copies %v, depth %d", *got, got.Copies(), got.From.Depth())
		}
	})
}

// TestDiskStatusRoundTrip: every field of a DiskStatus survives the wire,
// and a lease the wire cannot hold in a Duration is cut, not wrapped.
func TestDiskStatusRoundTrip(t *testing.T) {
	in := protocol.DiskStatus{Disk: 9, Segments: 100, Loaded: 40, Invalid: 60, Error: 2, Zero: 5, NoWrite: 7, Mapped: 33,
		InFlight: 3, FaultsOut: 4, Quiesced: true, Leased: true, LeaseLeft: 1500 * time.Millisecond}
	b, err := proto.Marshal(diskStatusToPB(in))
	if err != nil {
		t.Fatal(err)
	}
	var m pb.DiskStatus
	if err := proto.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if out := diskStatusFromPB(&m); out != in {
		t.Errorf("round trip: %+v, want %+v", out, in)
	}
	for _, ms := range []int64{-5, math.MaxInt64} {
		if got := diskStatusFromPB(&pb.DiskStatus{Leased: true, LeaseLeftMs: ms}).LeaseLeft; got < 0 {
			t.Errorf("lease of %d ms read as %v", ms, got)
		}
	}
}
