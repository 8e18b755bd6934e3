package adminapi_test

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/standalone"
)

// TestDiffDisks: DiffDisks answers for two disks of one family, and bad
// input gets the code a script tests.
func TestDiffDisks(t *testing.T) {
	ctx := context.Background()
	const seg = 64 << 10
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Pool: []standalone.PoolSpec{{SlotSize: seg, Slots: 16, Count: 1}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	}()
	for _, n := range []string{"d", "other"} {
		if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: n, Size: 4 * seg, SegmentSize: seg}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.ResizeDisk(ctx, "d", 6*seg, false); err != nil {
		t.Fatal(err)
	}
	s := adminapi.New(adminapi.Config{Ctrl: c.Ctrl})
	r, err := s.DiffDisks(ctx, &pb.DiffDisksRequest{From: "s", To: "d"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Extents) != 1 || r.Extents[0].Offset != 4*seg || r.Extents[0].Length != 2*seg ||
		r.ChangedBytes != 2*seg || r.FromSize != 4*seg || r.ToSize != 6*seg || r.SegmentSize != seg {
		t.Errorf("DiffDisks(s, d) after a grow = %v", r)
	}
	for _, tt := range []struct {
		from, to string
		want     codes.Code
	}{
		{"s", "other", codes.InvalidArgument},
		{"s", "nosuch", codes.NotFound},
		{"", "d", codes.InvalidArgument},
		{"s", "bad/name", codes.InvalidArgument},
	} {
		_, err := s.DiffDisks(ctx, &pb.DiffDisksRequest{From: tt.from, To: tt.to})
		if got := status.Code(err); got != tt.want {
			t.Errorf("DiffDisks(%q, %q): %v, want code %v", tt.from, tt.to, err, tt.want)
		}
	}
}
