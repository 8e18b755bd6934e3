// Package disktree arranges disks into trees by origin, the shape that
// 'segmap disk tree' prints and the dashboard draws: a snapshot sits under
// the disk it was taken from, a clone under the snapshot it was made from.
package disktree

import (
	"slices"
	"strings"

	pb "segmap/api/segmapv1"
)

// Node is a disk in a tree, with the disks made from it.
type Node struct {
	Disk     *pb.Disk
	Children []*Node
}

// Build arranges disks into trees: the roots are the disks with no origin,
// one that no longer exists, or one that leads back to themselves
// (metadata that says so must not hang a caller walking the tree); the
// roots and every node's children are in order of creation, then name.
func Build(disks []*pb.Disk) []*Node {
	nodes := make(map[string]*Node, len(disks))
	origin := make(map[string]string, len(disks))
	for _, d := range disks {
		nodes[d.Name] = &Node{Disk: d}
		origin[d.Name] = d.Origin
	}
	var roots []*Node
	for _, d := range disks {
		n := nodes[d.Name]
		if p := nodes[d.Origin]; p != nil && !inCycle(origin, d.Name) {
			p.Children = append(p.Children, n)
		} else {
			roots = append(roots, n)
		}
	}
	for _, n := range nodes {
		slices.SortFunc(n.Children, byAge)
	}
	slices.SortFunc(roots, byAge)
	return roots
}

// byAge orders nodes by creation, then name.
func byAge(a, b *Node) int {
	if c := a.Disk.GetCreatedUnixNano() - b.Disk.GetCreatedUnixNano(); c != 0 {
		if c < 0 {
			return -1
		}
		return 1
	}
	return strings.Compare(a.Disk.GetName(), b.Disk.GetName())
}

// inCycle reports whether following origins from name comes back to it.
func inCycle(origin map[string]string, name string) bool {
	seen := map[string]bool{}
	for n := origin[name]; n != ""; n = origin[n] {
		if n == name {
			return true
		}
		if seen[n] {
			return false // a cycle further up, not through name
		}
		seen[n] = true
	}
	return false
}
