package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"

	pb "segmap/api/segmapv1"
	"segmap/internal/agent"
	"segmap/internal/controller"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/standalone"
)

// TestPrintDiff: the text form has one extent a line and a total; the
// JSON form is a bare array of numbers, empty as [].
func TestPrintDiff(t *testing.T) {
	r := &pb.DiffDisksResponse{
		Extents:      []*pb.Extent{{Offset: 2 << 20, Length: 1 << 20}, {Offset: 5<<20 + 4096, Length: 4096}},
		ChangedBytes: 1<<20 + 4096, FromSize: 8 << 20, ToSize: 10 << 20, SegmentSize: 1 << 20,
	}
	for _, tt := range []struct {
		name   string
		r      *pb.DiffDisksResponse
		asJSON bool
		want   string
	}{
		{"text", r, false, "" +
			"OFFSET   LENGTH   RANGE         SIZE\n" +
			"2097152  1048576  2M..3M        1M\n" +
			"5246976  4096     5124K..5128K  4K\n" +
			"total: 2 extents, 1.0M changed (1052672 bytes) of 10M\n"},
		{"json", r, true, `[{"offset":2097152,"length":1048576},{"offset":5246976,"length":4096}]` + "\n"},
		{"text, none", &pb.DiffDisksResponse{FromSize: 1 << 20, ToSize: 1 << 20}, false, "total: 0 extents, 0 changed (0 bytes) of 1M\n"},
		{"json, none", &pb.DiffDisksResponse{}, true, "[]\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := printDiff(&b, tt.r, tt.asJSON); err != nil {
				t.Fatal(err)
			}
			if b.String() != tt.want {
				t.Errorf("got\n%s\nwant\n%s", b.String(), tt.want)
			}
		})
	}
}

// TestDiskDiffCommand runs 'segmap disk diff' against a controller's
// admin API on a unix socket: a snapshot against its disk after a write,
// as text and as JSON, and the errors for a disk of another family and
// one that does not exist.
func TestDiskDiffCommand(t *testing.T) {
	ctx := context.Background()
	const seg = 64 << 10
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Agents: []string{"host-a"},
		Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: 64, Count: 1}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	}()
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	pb.RegisterAdminServer(gs, adminapi.New(adminapi.Config{Ctrl: c.Ctrl}))
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	defer func() { gs.Stop(); <-served }()

	for _, n := range []string{"d", "other"} {
		if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: n, Size: 8 * seg, SegmentSize: seg}); err != nil {
			t.Fatal(err)
		}
	}
	h, err := c.Agents[0].Open(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	defer func(h *agent.Disk) { _ = h.Close(ctx) }(h)
	if err := h.WriteAt(ctx, bytes.Repeat([]byte{1}, 2*seg), 0, false); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}}); err != nil {
		t.Fatal(err)
	}
	if err := h.WriteAt(ctx, bytes.Repeat([]byte{2}, seg), 3*seg, false); err != nil {
		t.Fatal(err)
	}

	run := func(args ...string) (string, error) {
		root := newRoot()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(append(args, "--controller", "unix:"+sock, "--certs", ""))
		err := root.Execute()
		return out.String(), err
	}
	out, err := run("disk", "diff", "d@1", "d")
	if err != nil {
		t.Fatalf("disk diff: %v\n%s", err, out)
	}
	if want := "196608  65536   192K..256K  64K\ntotal: 1 extent, 64K changed (65536 bytes) of 512K\n"; !strings.HasSuffix(out, want) {
		t.Errorf("disk diff printed\n%s\nwant it to end in\n%s", out, want)
	}
	out, err = run("disk", "diff", "d@1", "d", "--json")
	if err != nil || out != `[{"offset":196608,"length":65536}]`+"\n" {
		t.Errorf("disk diff --json: %q, %v", out, err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"disk", "diff", "d@1", "other"}, "not of one family"},
		{[]string{"disk", "diff", "d@1", "nosuch"}, "no such disk"},
		{[]string{"disk", "diff", "d@1"}, "two disk names"},
	} {
		if _, err := run(tt.args...); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%v: %v, want an error saying %q", tt.args, err, tt.want)
		}
	}
}

// pagedAdmin answers DiffDisks one extent at a time from extents.
type pagedAdmin struct {
	pb.AdminClient
	extents []*pb.Extent
	asked   []string
}

func (p *pagedAdmin) DiffDisks(_ context.Context, r *pb.DiffDisksRequest, _ ...grpc.CallOption) (*pb.DiffDisksResponse, error) {
	p.asked = append(p.asked, fmt.Sprintf("%d+%d", r.Offset, r.Length))
	out := &pb.DiffDisksResponse{FromSize: 100, ToSize: 100, SegmentSize: 1}
	for i, x := range p.extents {
		if x.Offset >= r.Offset {
			out.Extents, out.ChangedBytes = []*pb.Extent{x}, x.Length
			if i+1 < len(p.extents) {
				out.NextOffset = p.extents[i+1].Offset
			}
			break
		}
	}
	return out, nil
}

// TestDiffAll: the CLI pages through a diff with next_offset, keeping the
// end it asked for.
func TestDiffAll(t *testing.T) {
	p := &pagedAdmin{extents: []*pb.Extent{{Offset: 10, Length: 5}, {Offset: 20, Length: 1}, {Offset: 30, Length: 2}}}
	r, err := diffAll(context.Background(), p, &pb.DiffDisksRequest{From: "a", To: "b", Offset: 5, Length: 90})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Extents) != 3 || r.ChangedBytes != 8 || r.Extents[2].Offset != 30 {
		t.Errorf("diffAll = %v", r)
	}
	if want := []string{"5+90", "20+75", "30+65"}; !slices.Equal(p.asked, want) {
		t.Errorf("asked %v, want %v", p.asked, want)
	}
}
