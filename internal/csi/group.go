package csi

import (
	"context"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "segmap/api/segmapv1"
)

// groupServer is the CSI GroupController service: a group snapshot is
// one segmap consistency-group snapshot, which holds the I/O of every
// member's agents at one point (quiesce), copies every table in one
// commit, and lets the I/O go (activate). So the members are crash
// consistent with each other, not taken one after the other.
type groupServer struct {
	csi.UnimplementedGroupControllerServer
	c *controllerServer
}

func (s *groupServer) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,
		}},
	}}}, nil
}

// members lists group snapshot id's member snapshots, sorted by name.
func (s *groupServer) members(ctx context.Context, id string) ([]*pb.Disk, error) {
	ds, err := s.c.admin().ListDisks(ctx, &pb.ListDisksRequest{})
	if err != nil {
		return nil, err
	}
	var out []*pb.Disk
	for _, d := range ds.GetDisks() {
		if d.GetReadOnly() && groupOf(d.GetName()) == id {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out, nil
}

func groupSnapshot(id string, ms []*pb.Disk) *csi.VolumeGroupSnapshot {
	g := &csi.VolumeGroupSnapshot{GroupSnapshotId: id, ReadyToUse: true}
	for _, d := range ms {
		g.Snapshots = append(g.Snapshots, snapshot(d))
	}
	if len(ms) > 0 {
		g.CreationTime = timestamppb.New(timeOf(ms[0]))
	}
	return g
}

func timeOf(d *pb.Disk) time.Time { return time.Unix(0, d.GetCreatedUnixNano()) }

func (s *groupServer) CreateVolumeGroupSnapshot(ctx context.Context, r *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	const op = "create group snapshot"
	switch {
	case r.GetName() == "":
		return nil, status.Errorf(codes.InvalidArgument, "%s: no name", op)
	case len(r.GetSourceVolumeIds()) == 0:
		return nil, status.Errorf(codes.InvalidArgument, "%s %q: no source volume ids", op, r.GetName())
	}
	for k := range r.GetParameters() {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return nil, status.Errorf(codes.InvalidArgument, "%s %q: unknown parameter %q (group snapshots take none)", op, r.GetName(), k)
		}
	}
	srcs := slices.Clone(r.GetSourceVolumeIds())
	sort.Strings(srcs)
	if i := slices.IndexFunc(srcs[1:], func(v string) bool { return v == "" }); srcs[0] == "" || i >= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "%s %q: an empty source volume id", op, r.GetName())
	}
	if len(slices.Compact(slices.Clone(srcs))) != len(srcs) {
		return nil, status.Errorf(codes.InvalidArgument, "%s %q: a source volume named twice", op, r.GetName())
	}
	id := groupID(r.GetName())
	existing := func(ms []*pb.Disk) (*csi.CreateVolumeGroupSnapshotResponse, error) {
		var have []string
		for _, d := range ms {
			have = append(have, d.GetOrigin())
		}
		sort.Strings(have)
		if !slices.Equal(have, srcs) {
			return nil, status.Errorf(codes.AlreadyExists, "%s %q: group %s exists, of volumes %s", op, r.GetName(), id, strings.Join(have, ", "))
		}
		return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: groupSnapshot(id, ms)}, nil
	}
	ms, err := s.members(ctx, id)
	if err != nil {
		return nil, fromAdmin(err, "%s %q", op, r.GetName())
	}
	if len(ms) > 0 {
		return existing(ms)
	}
	names := make([]string, len(srcs))
	for i, v := range srcs {
		if _, err := s.c.volumeDisk(ctx, op, v); err != nil {
			return nil, err
		}
		names[i] = memberName(id, v)
	}
	// One request: the controller quiesces every source's agents, copies
	// every table in one commit and activates them again.
	_, err = s.c.admin().Snapshot(ctx, &pb.SnapshotRequest{Sources: srcs, Names: names})
	if status.Code(err) == codes.AlreadyExists {
		if ms, lerr := s.members(ctx, id); lerr == nil && len(ms) > 0 {
			return existing(ms)
		}
	}
	if err != nil {
		return nil, fromAdmin(err, "%s %q", op, r.GetName())
	}
	if ms, err = s.members(ctx, id); err != nil {
		return nil, fromAdmin(err, "%s %q", op, r.GetName())
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: groupSnapshot(id, ms)}, nil
}

func (s *groupServer) DeleteVolumeGroupSnapshot(ctx context.Context, r *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	const op = "delete group snapshot"
	id := r.GetGroupSnapshotId()
	if id == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s: no group snapshot id", op)
	}
	if !isGroupID(id) {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil // none the driver could have made
	}
	ms, err := s.members(ctx, id)
	if err != nil {
		return nil, fromAdmin(err, "%s %s", op, id)
	}
	for _, sid := range r.GetSnapshotIds() {
		if groupOf(sid) != id {
			return nil, status.Errorf(codes.InvalidArgument, "%s %s: snapshot %q is not one of its members", op, id, sid)
		}
	}
	for _, d := range ms {
		if _, err := s.c.admin().DeleteDisk(ctx, &pb.DeleteDiskRequest{Name: d.GetName()}); err != nil && status.Code(err) != codes.NotFound {
			return nil, fromAdmin(err, "%s %s: member %s", op, id, d.GetName())
		}
	}
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}

func (s *groupServer) GetVolumeGroupSnapshot(ctx context.Context, r *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	const op = "get group snapshot"
	id := r.GetGroupSnapshotId()
	if id == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s: no group snapshot id", op)
	}
	var ms []*pb.Disk
	if isGroupID(id) {
		var err error
		if ms, err = s.members(ctx, id); err != nil {
			return nil, fromAdmin(err, "%s %s", op, id)
		}
	}
	if len(ms) == 0 {
		return nil, status.Errorf(codes.NotFound, "%s: no group snapshot %q", op, id)
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: groupSnapshot(id, ms)}, nil
}
