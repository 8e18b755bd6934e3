package controller_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestSetError: segments set to Error fail reads and writes with EIO on
// every agent at once, the others go on; a snapshot taken before keeps its
// data; ClearErrors makes them read zeros and be writable again.
func TestSetError(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "d", 4, table.Forward)
	h0, h1 := openDisk(t, c, 0, "d"), openDisk(t, c, 1, "d")
	data := pattern(4*seg, 3)
	write(t, h0, data, 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.SetError(ctx, "d", seg, 2*seg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for _, h := range []interface {
		ReadAt(context.Context, []byte, uint64) error
		WriteAt(context.Context, []byte, uint64, bool) error
	}{h0, h1} {
		for _, off := range []uint64{seg, 2*seg + 100} {
			if err := h.ReadAt(ctx, buf, off); !errors.Is(err, protocol.ErrIO) {
				t.Errorf("read at %d in the Error range: %v, want EIO", off, err)
			}
			if err := h.WriteAt(ctx, buf, off, false); !errors.Is(err, protocol.ErrIO) {
				t.Errorf("write at %d in the Error range: %v, want EIO", off, err)
			}
		}
	}
	expect(t, h1, 0, data[:seg])
	expect(t, h1, 3*seg, data[3*seg:])
	write(t, h1, pattern(seg, 9), 3*seg)
	expect(t, openDisk(t, c, 0, "s"), 0, data)
	got, err := c.Ctrl.ErrorExtents(ctx, "d")
	if err != nil || !slices.Equal(got, []controller.Extent{{Off: seg, Len: 2 * seg}}) {
		t.Fatalf("error extents %v %v, want [%d+%d]", got, err, seg, 2*seg)
	}
	checkClean(t, c)

	n, err := c.Ctrl.ClearErrors(ctx, "d")
	if err != nil || n != 2*seg {
		t.Fatalf("clear errors: %d %v, want %d", n, err, 2*seg)
	}
	expect(t, h0, seg, make([]byte, 2*seg))
	write(t, h0, pattern(2*seg, 5), seg)
	expect(t, h1, seg, pattern(2*seg, 5))
	if got, err := c.Ctrl.ErrorExtents(ctx, "d"); err != nil || len(got) != 0 {
		t.Fatalf("error extents after clearing: %v %v", got, err)
	}
	checkClean(t, c)
}

// TestSetErrorRefuses: ranges not in whole segments, past the end or on a
// read-only disk are refused, and change nothing.
func TestSetErrorRefuses(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "d", 4, table.Forward)
	write(t, openDisk(t, c, 0, "d"), pattern(seg, 1), 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		off, n    uint64
		wantError error
	}{
		{"d", 1, seg, protocol.ErrBadRequest},
		{"d", 0, seg / 2, protocol.ErrBadRequest},
		{"d", 0, 0, protocol.ErrBadRequest},
		{"d", 3 * seg, 2 * seg, protocol.ErrBadRequest},
		{"d", 8 * seg, seg, protocol.ErrBadRequest},
		{"s", 0, seg, protocol.ErrReadOnly},
		{"nope", 0, seg, protocol.ErrNotFound},
	} {
		if _, err := c.Ctrl.SetError(ctx, tc.name, tc.off, tc.n); !errors.Is(err, tc.wantError) {
			t.Errorf("set error on %s at %d+%d: %v, want %v", tc.name, tc.off, tc.n, err, tc.wantError)
		}
	}
	if got, err := c.Ctrl.ErrorExtents(ctx, "d"); err != nil || len(got) != 0 {
		t.Fatalf("error extents after refusals: %v %v", got, err)
	}
	expect(t, openDisk(t, c, 1, "d"), 0, pattern(seg, 1))
}
