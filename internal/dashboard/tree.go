package dashboard

import (
	"slices"
	"strings"
	"time"

	pb "segmap/api/segmapv1"
	"segmap/internal/size"
)

// diskNode is a disk in the page's tree, with its space usage. Sizes go
// both in bytes and as the CLI writes them (size.Format), so that the
// page and 'segmap disk list' agree to the letter.
type diskNode struct {
	Name          string      `json:"name"`
	ReadOnly      bool        `json:"read_only"`
	Origin        string      `json:"origin,omitempty"`
	Size          uint64      `json:"size"`
	SizeText      string      `json:"size_text"`
	SegmentSize   uint64      `json:"segment_size"`
	Allocated     uint64      `json:"allocated"`
	AllocatedText string      `json:"allocated_text"`
	Exclusive     uint64      `json:"exclusive"`
	ExclusiveText string      `json:"exclusive_text"`
	Shared        uint64      `json:"shared"`
	SharedText    string      `json:"shared_text"`
	SnapsHold     uint64      `json:"snapshots_hold"`
	SnapsHoldText string      `json:"snapshots_hold_text"`
	Created       string      `json:"created"` // RFC 3339, UTC
	Agents        []string    `json:"agents"`
	AllAgents     bool        `json:"all_agents"`
	Children      []*diskNode `json:"children"`
	created       int64
}

// diskTree arranges disks into trees by origin, as 'segmap disk tree'
// does: roots are the disks with no origin or one that no longer exists;
// a snapshot sits under the disk it was taken from, a clone under the
// snapshot it was made from; siblings are in order of creation.
func diskTree(disks []*pb.Disk) []*diskNode {
	nodes := make(map[string]*diskNode, len(disks))
	for _, d := range disks {
		agents := d.Agents
		if agents == nil {
			agents = []string{}
		}
		nodes[d.Name] = &diskNode{
			Name: d.Name, ReadOnly: d.ReadOnly, Origin: d.Origin,
			Size: d.Size, SizeText: size.Format(d.Size), SegmentSize: d.SegmentSize,
			Allocated: d.Allocated, AllocatedText: size.Format(d.Allocated),
			Exclusive: d.Exclusive, ExclusiveText: size.Format(d.Exclusive),
			Shared: d.Shared, SharedText: size.Format(d.Shared),
			SnapsHold: d.SnapshotsHold, SnapsHoldText: size.Format(d.SnapshotsHold),
			Created: time.Unix(0, d.CreatedUnixNano).UTC().Format(time.RFC3339),
			Agents:  agents, AllAgents: d.AllAgents,
			Children: []*diskNode{}, created: d.CreatedUnixNano,
		}
	}
	origin := make(map[string]string, len(disks))
	for _, d := range disks {
		origin[d.Name] = d.Origin
	}
	roots := []*diskNode{}
	for _, d := range disks {
		n := nodes[d.Name]
		if p := nodes[d.Origin]; p != nil && !inCycle(origin, d.Name) {
			p.Children = append(p.Children, n)
		} else {
			roots = append(roots, n)
		}
	}
	byAge := func(a, b *diskNode) int {
		if a.created != b.created {
			if a.created < b.created {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Name, b.Name)
	}
	for _, n := range nodes {
		slices.SortFunc(n.Children, byAge)
	}
	slices.SortFunc(roots, byAge)
	return roots
}

// inCycle reports whether following origins from name comes back to it:
// metadata that says so must not hang the page (or the JSON encoder).
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
