package disktree

import (
	"fmt"
	"strings"
	"testing"

	pb "segmap/api/segmapv1"
)

// shape writes trees as name(children...), roots separated by spaces.
func shape(ns []*Node) string {
	var out []string
	for _, n := range ns {
		s := n.Disk.GetName()
		if len(n.Children) > 0 {
			s += "(" + shape(n.Children) + ")"
		}
		out = append(out, s)
	}
	return strings.Join(out, " ")
}

func TestBuild(t *testing.T) {
	for _, tc := range []struct {
		disks []*pb.Disk
		want  string
	}{
		{nil, ""},
		// Snapshots under their disk, clones under their snapshot,
		// siblings by creation then name.
		{[]*pb.Disk{
			{Name: "vm", CreatedUnixNano: 1},
			{Name: "vm@2", Origin: "vm", CreatedUnixNano: 3},
			{Name: "vm@1", Origin: "vm", CreatedUnixNano: 2},
			{Name: "b", Origin: "vm@1", CreatedUnixNano: 4},
			{Name: "a", Origin: "vm@1", CreatedUnixNano: 4},
			{Name: "other"},
		}, "other vm(vm@1(a b) vm@2)"},
		// An origin deleted since: a root.
		{[]*pb.Disk{{Name: "c", Origin: "gone"}}, "c"},
		// Origins that loop: every disk of the loop a root, the rest
		// under them; nothing hangs.
		{[]*pb.Disk{{Name: "a", Origin: "b"}, {Name: "b", Origin: "a"}, {Name: "c", Origin: "a", CreatedUnixNano: 1}, {Name: "s", Origin: "s"}}, "a(c) b s"},
	} {
		if got := shape(Build(tc.disks)); got != tc.want {
			t.Errorf("Build(%s) = %q, want %q", fmt.Sprint(tc.disks), got, tc.want)
		}
	}
}
