package controller_test

import (
	"context"
	"errors"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// A read fault on a range answers each segment's entry as a read fault on
// that segment alone would: written, Zero, shared with a snapshot (No-write)
// and with a copy-on-write made since.
func TestReadFaultRange(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	const segs = 12
	createDisk(t, c, "a", segs, table.Forward)
	h := openDisk(t, c, 0, "a")
	for _, s := range []uint64{1, 2, 5, 9} {
		write(t, h, pattern(seg, byte(s)), s*seg)
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"a-snap"}}); err != nil {
		t.Fatal(err)
	}
	write(t, h, pattern(100, 42), 2*seg) // a copy-on-write: 2 is a's own
	write(t, h, pattern(100, 43), 7*seg) // an allocation
	agent, id := c.Agents[0].Name(), h.Info().ID

	one := make([]table.Entry, segs)
	for s := range uint64(segs) {
		r, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: agent, Disk: id, Segment: s, Count: 1, Op: protocol.FaultRead})
		if err != nil {
			t.Fatalf("segment %d: %v", s, err)
		}
		one[s] = r.Entries[0]
	}
	r, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: agent, Disk: id, Segment: 1, Count: segs - 1, Op: protocol.FaultRead})
	if err != nil {
		t.Fatal(err)
	}
	if r.First != 1 || len(r.Entries) != segs-1 {
		t.Fatalf("reply [%d,+%d), want [1,+%d)", r.First, len(r.Entries), segs-1)
	}
	for i, e := range r.Entries {
		if s := 1 + i; !e.Equal(one[s]) {
			t.Errorf("segment %d: range says %v, alone %v", s, e, one[s])
		}
	}
	if !one[1].Is(table.NoWrite) || one[2].Is(table.NoWrite) || one[3] != table.ZeroEntry {
		t.Errorf("entries 1-3 %v, want shared, own, Zero", one[1:4])
	}

	createDisk(t, c, "big", 2*protocol.MaxReadRange, table.Forward)
	big := openDisk(t, c, 0, "big").Info().ID
	for _, tc := range []struct {
		name         string
		disk         protocol.DiskID
		first, count uint64
	}{
		{"past the end", id, segs - 2, 3},
		{"over the limit", big, 0, protocol.MaxReadRange + 1},
	} {
		_, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: agent, Disk: tc.disk, Segment: tc.first, Count: tc.count, Op: protocol.FaultRead})
		if !errors.Is(err, protocol.ErrBadRequest) {
			t.Errorf("%s: %v, want ErrBadRequest", tc.name, err)
		}
	}
	checkClean(t, c)
}
