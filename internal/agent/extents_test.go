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
