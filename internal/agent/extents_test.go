package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// extent is a run Extents reported.
type extent struct {
	n    uint64
	zero bool
}

func extentsOf(t *testing.T, d *Disk, off, n uint64) []extent {
	t.Helper()
	var got []extent
	if err := d.Extents(context.Background(), off, n, func(n uint64, zero bool) bool {
		got = append(got, extent{n, zero})
		return true
	}); err != nil {
		t.Fatalf("Extents(%d, %d): %v", off, n, err)
	}
	return got
}

func TestExtents(t *testing.T) {
	e := newEnv(t)
	// Segments 0, 3, 4 and 7 are thin; 5 is in the Error state; 6 is
	// partial (layered: its sub-blocks are in three slots).
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		if f.Op == protocol.FaultWrite {
			return identity(f), nil
		}
		switch f.Segment {
		case 0, 3, 4, 7:
			return protocol.Reply{First: f.Segment, Entries: []table.Entry{table.ZeroEntry}}, nil
		case 5:
			return protocol.Reply{First: f.Segment, Entries: []table.Entry{table.ErrorEntry}}, nil
		case 6:
			return protocol.Reply{First: f.Segment, Entries: []table.Entry{layered(false)}}, nil
		}
		return identity(f), nil
	})
	want := []extent{{tSeg, true}, {2 * tSeg, false}, {2 * tSeg, true}, {2 * tSeg, false}, {tSeg, true}}
	if got := extentsOf(t, e.d, 0, tSegs*tSeg); !slices.Equal(got, want) {
		t.Fatalf("whole disk: %v, want %v", got, want)
	}
	// Every entry was loaded with one read fault, and is held now.
	if n := e.fc.faults(); n != tSegs {
		t.Fatalf("%d faults, want %d", n, tSegs)
	}
	if got := e.entry(3); got != table.ZeroEntry {
		t.Errorf("entry 3 is %v, want Zero", got)
	}
	if got := e.entry(6); !got.Partial() {
		t.Errorf("entry 6 is %v, want partial", got)
	}
	for _, tt := range []struct {
		off, n uint64
		want   []extent
	}{
		{tSeg / 2, tSeg, []extent{{tSeg / 2, true}, {tSeg / 2, false}}},
		{tSeg + 1, 100, []extent{{100, false}}},
		{3 * tSeg, 2 * tSeg, []extent{{2 * tSeg, true}}},
		{tSegs*tSeg - 1, 1, []extent{{1, true}}},
	} {
		if got := extentsOf(t, e.d, tt.off, tt.n); !slices.Equal(got, tt.want) {
			t.Errorf("Extents(%d, %d): %v, want %v", tt.off, tt.n, got, tt.want)
		}
	}
	if n := e.fc.faults(); n != tSegs {
		t.Errorf("%d faults after the first walk, want %d", n, tSegs)
	}

	// The walk stops when fn wants no more.
	calls := 0
	if err := e.d.Extents(e.ctx, 0, tSegs*tSeg, func(uint64, bool) bool {
		calls++
		return false
	}); err != nil || calls != 1 {
		t.Errorf("stopped walk: %d calls, err %v", calls, err)
	}

	// A write to a thin segment makes it data.
	if err := e.d.WriteAt(e.ctx, []byte{1}, 3*tSeg+10, false); err != nil {
		t.Fatal(err)
	}
	want = []extent{{tSeg, false}, {tSeg, true}}
	if got := extentsOf(t, e.d, 3*tSeg, 2*tSeg); !slices.Equal(got, want) {
		t.Errorf("after a write: %v, want %v", got, want)
	}

	if err := e.d.Extents(e.ctx, tSegs*tSeg, 1, func(uint64, bool) bool { return true }); !errors.Is(err, ErrRange) {
		t.Errorf("past the end: %v, want ErrRange", err)
	}
}

func TestExtentsFaultError(t *testing.T) {
	e := newEnv(t)
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		return protocol.Reply{}, fmt.Errorf("controller away: %w", protocol.ErrIO)
	})
	err := e.d.Extents(e.ctx, 0, tSeg, func(uint64, bool) bool {
		t.Error("fn called for a segment that could not be loaded")
		return true
	})
	if !errors.Is(err, protocol.ErrIO) {
		t.Fatalf("err %v, want ErrIO", err)
	}
}

// rangeReply answers a read fault on f's whole range: even segments are
// Zero, odd ones at slot seg.
func rangeReply(f protocol.Fault) protocol.Reply {
	r := protocol.Reply{First: f.Segment}
	for s := f.Segment; s < f.Segment+f.Count; s++ {
		e := table.ZeroEntry
		if s%2 == 1 {
			e = table.At(table.Location{Container: 1, Slot: uint32(s)}, false)
		}
		r.Entries = append(r.Entries, e)
	}
	return r
}

func TestExtentsLoadRange(t *testing.T) {
	e := newEnv(t)
	var counts []uint64
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		if f.Op == protocol.FaultRead {
			counts = append(counts, f.Count)
			return rangeReply(f), nil
		}
		return identity(f), nil
	})
	got := extentsOf(t, e.d, tSeg, tSeg)
	if want := []extent{{tSeg, false}}; !slices.Equal(got, want) {
		t.Fatalf("segment 1: %v, want %v", got, want)
	}
	// One fault asked for segment 1 and every one after it.
	if !slices.Equal(counts, []uint64{tSegs - 1}) {
		t.Fatalf("read faults of %v segments, want one of %d", counts, tSegs-1)
	}
	got = extentsOf(t, e.d, 0, tSegs*tSeg)
	want := make([]extent, 0, tSegs)
	for s := range uint64(tSegs) {
		want = append(want, extent{tSeg, s%2 == 0})
	}
	if !slices.Equal(got, want) {
		t.Fatalf("whole disk: %v, want %v", got, want)
	}
	// Segment 0 faulted on its own range; the rest were loaded.
	if !slices.Equal(counts, []uint64{tSegs - 1, tSegs}) {
		t.Fatalf("read faults of %v segments", counts)
	}
}

// A reply to a range read fault that comes back after a write's reply was
// installed for a segment in the range leaves that segment's entry alone:
// it may have been computed before the write's copy on write.
func TestLoadRangeKeepsNewerEntries(t *testing.T) {
	e := newEnv(t)
	held := make(chan struct{})
	release := make(chan struct{})
	newer := table.At(table.Location{Container: 1, Slot: 15}, false)
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		switch {
		case f.Op == protocol.FaultRead && f.Count > 1:
			r := rangeReply(f) // computed now, answered later
			close(held)
			<-release
			return r, nil
		case f.Op == protocol.FaultWrite:
			return protocol.Reply{First: f.Segment, Entries: []table.Entry{newer}}, nil
		}
		return rangeReply(f), nil
	})
	done := async(func() error {
		return e.d.Extents(e.ctx, 0, tSegs*tSeg, func(uint64, bool) bool { return true })
	})
	<-held
	// Segment 3's write faults and installs its own entry while the
	// range's reply, which says slot 3, is still out.
	if err := e.d.WriteAt(e.ctx, []byte{7}, 3*tSeg, false); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := await(t, done, "Extents"); err != nil {
		t.Fatal(err)
	}
	if got := e.entry(3); got != newer {
		t.Fatalf("entry 3 is %v after the range reply, want the write's %v", got, newer)
	}
	if got := e.entry(5); got != table.At(table.Location{Container: 1, Slot: 5}, false) {
		t.Fatalf("entry 5 is %v, want the range's", got)
	}
	p := make([]byte, 1)
	if err := e.d.ReadAt(e.ctx, p, 3*tSeg); err != nil || p[0] != 7 {
		t.Fatalf("read back %v, %v: want 7", p, err)
	}
}
