package dashboard

import (
	"time"

	pb "segmap/api/segmapv1"
	"segmap/internal/disktree"
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
}

// diskTree arranges disks into trees by origin, as 'segmap disk tree'
// does (disktree.Build), with each disk's space usage.
func diskTree(disks []*pb.Disk) []*diskNode {
	return diskNodes(disktree.Build(disks))
}

// diskNodes returns the page's nodes of trees ns.
func diskNodes(ns []*disktree.Node) []*diskNode {
	out := make([]*diskNode, 0, len(ns))
	for _, n := range ns {
		d := n.Disk
		agents := d.Agents
		if agents == nil {
			agents = []string{}
		}
		out = append(out, &diskNode{
			Name: d.Name, ReadOnly: d.ReadOnly, Origin: d.Origin,
			Size: d.Size, SizeText: size.Format(d.Size), SegmentSize: d.SegmentSize,
			Allocated: d.Allocated, AllocatedText: size.Format(d.Allocated),
			Exclusive: d.Exclusive, ExclusiveText: size.Format(d.Exclusive),
			Shared: d.Shared, SharedText: size.Format(d.Shared),
			SnapsHold: d.SnapshotsHold, SnapsHoldText: size.Format(d.SnapshotsHold),
			Created: time.Unix(0, d.CreatedUnixNano).UTC().Format(time.RFC3339),
			Agents:  agents, AllAgents: d.AllAgents,
			Children: diskNodes(n.Children),
		})
	}
	return out
}
