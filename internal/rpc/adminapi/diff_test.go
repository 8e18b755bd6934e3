package adminapi_test

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/standalone"
	"segmap/internal/table"
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
	// Paged: the grow and a write, one extent a response.
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error {
		d, err := tx.Disk("d")
		if err != nil {
			return err
		}
		return tx.SetEntries(d.ID, 1, []table.Entry{table.ErrorEntry})
	}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for req := (&pb.DiffDisksRequest{From: "s", To: "d", MaxExtents: 1}); ; {
		r, err := s.DiffDisks(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		for _, x := range r.Extents {
			got = append(got, fmt.Sprintf("%d+%d", x.Offset, x.Length))
		}
		if r.NextOffset == 0 {
			break
		}
		req.Offset = r.NextOffset
	}
	if want := []string{fmt.Sprintf("%d+%d", seg, seg), fmt.Sprintf("%d+%d", 4*seg, 2*seg)}; !slices.Equal(got, want) {
		t.Errorf("DiffDisks one extent at a time: %v, want %v", got, want)
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
