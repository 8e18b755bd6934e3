package csi

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/size"
)

// controllerServer is the CSI Controller service over the admin API.
type controllerServer struct {
	csi.UnimplementedControllerServer
	d *Driver
}

func (s *controllerServer) admin() pb.AdminClient { return s.d.cfg.Admin }

// Sizes of a new volume.
const (
	// defaultVolumeSize is a volume's size when the request names none.
	defaultVolumeSize = 1 << 30
	// volumeAlign: sizes are rounded up to a multiple of it where the
	// limit allows, else to a multiple of 512 bytes.
	volumeAlign = 1 << 20
)

// volumeSize is the size to give a volume asked for with r, at least
// least bytes (a clone's source, whose size a clone asked for with no
// size gets): InvalidArgument for a range that contradicts itself,
// OutOfRange for one segmap cannot meet.
func volumeSize(r *csi.CapacityRange, least uint64) (uint64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, status.Errorf(codes.InvalidArgument, "capacity range: negative bytes (required %d, limit %d)", req, lim)
	}
	if lim > 0 && lim < req {
		return 0, status.Errorf(codes.InvalidArgument, "capacity range: limit %d below required %d", lim, req)
	}
	want := uint64(req)
	if want == 0 && least == 0 {
		want = defaultVolumeSize
		if lim > 0 && uint64(lim) < want {
			want = uint64(lim)
		}
	}
	want = max(want, least)
	n := roundUp(want, volumeAlign)
	if lim > 0 && n > uint64(lim) {
		n = roundUp(want, 512)
	}
	if lim > 0 && n > uint64(lim) {
		return 0, status.Errorf(codes.OutOfRange, "capacity range: limit %d bytes is below %d, the least this volume can have (a multiple of 512 bytes, at least its source's size)", lim, n)
	}
	if err := controller.ValidSize(n); err != nil {
		return 0, status.Errorf(codes.OutOfRange, "capacity range: %v", err)
	}
	return n, nil
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// volumeParams are the StorageClass parameters a volume is created with.
type volumeParams struct {
	segmentSize uint64
	policy      pb.Policy
	preallocate bool
}

// parseParams reads a CreateVolume request's parameters. Keys Kubernetes
// adds itself (csi.storage.k8s.io/...) are ignored; any other unknown
// key is an error, so that a typo in a StorageClass is seen at once.
func parseParams(ps map[string]string) (volumeParams, error) {
	var v volumeParams
	for k, val := range ps {
		var err error
		switch k {
		case "segmentSize":
			v.segmentSize, err = size.Parse(val)
			if err == nil {
				err = controller.ValidSegmentSize(v.segmentSize)
			}
		case "policy":
			switch val {
			case "forward", "":
				v.policy = pb.Policy_POLICY_FORWARD
			case "reverse":
				v.policy = pb.Policy_POLICY_REVERSE
			default:
				err = fmt.Errorf("want forward or reverse")
			}
		case "preallocate":
			v.preallocate, err = strconv.ParseBool(val)
		default:
			if strings.HasPrefix(k, "csi.storage.k8s.io/") {
				continue
			}
			err = fmt.Errorf("unknown parameter (segmap knows segmentSize, policy, preallocate)")
		}
		if err != nil {
			return volumeParams{}, status.Errorf(codes.InvalidArgument, "parameter %s=%q: %v", k, val, err)
		}
	}
	return v, nil
}

// checkCaps refuses capabilities the driver cannot give: an access mode
// other than the single-node ones and multi-node read-only, or neither
// block nor mount access. It returns a reason, "" if all are fine.
func checkCaps(caps []*csi.VolumeCapability) string {
	if len(caps) == 0 {
		return "no volume capabilities"
	}
	for _, c := range caps {
		switch c.GetAccessMode().GetMode() {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER, csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
			csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		default:
			return fmt.Sprintf("access mode %s is not supported (single-node modes and MULTI_NODE_READER_ONLY are)", c.GetAccessMode().GetMode())
		}
		switch {
		case c.GetBlock() != nil:
		case c.GetMount() != nil:
			if fs := c.GetMount().GetFsType(); fs != "" && !slices.Contains(fsTypes, fs) {
				return fmt.Sprintf("filesystem %q is not supported (%s are)", fs, strings.Join(fsTypes, ", "))
			}
		default:
			return "neither block nor mount access"
		}
	}
	return ""
}

// fsTypes are the filesystems the node service makes and mounts.
var fsTypes = []string{"ext4", "xfs"}

// singleNode says whether mode lets only one node use the volume.
func singleNode(m csi.VolumeCapability_AccessMode_Mode) bool {
	return m != csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
}

func (s *controllerServer) CreateVolume(ctx context.Context, r *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if r.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "create volume: no name")
	}
	if why := checkCaps(r.GetVolumeCapabilities()); why != "" {
		return nil, status.Errorf(codes.InvalidArgument, "create volume %q: %s", r.GetName(), why)
	}
	ps, err := parseParams(r.GetParameters())
	if err != nil {
		return nil, err
	}
	name := diskName(volPrefix, r.GetName())
	// The source, if any: a snapshot or a volume, which must exist.
	var src *pb.Disk
	if cs := r.GetVolumeContentSource(); cs != nil {
		var id string
		switch {
		case cs.GetSnapshot() != nil:
			id = cs.GetSnapshot().GetSnapshotId()
		case cs.GetVolume() != nil:
			id = cs.GetVolume().GetVolumeId()
		default:
			return nil, status.Errorf(codes.InvalidArgument, "create volume %q: content source of no known kind", r.GetName())
		}
		if id == "" {
			return nil, status.Errorf(codes.InvalidArgument, "create volume %q: content source without an id", r.GetName())
		}
		src, err = s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: id})
		if err != nil {
			return nil, fromAdmin(err, "create volume %q from %q", r.GetName(), id)
		}
		if (cs.GetSnapshot() != nil) != src.GetReadOnly() {
			// A snapshot id that names a volume, or the reverse.
			return nil, status.Errorf(codes.NotFound, "create volume %q: no %s %q", r.GetName(), sourceKind(cs), id)
		}
	}
	sz, err := volumeSize(r.GetCapacityRange(), src.GetSize())
	if err != nil {
		return nil, err
	}
	if d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: name}); err == nil {
		return s.existingVolume(ctx, r, d, src, sz, ps)
	} else if status.Code(err) != codes.NotFound {
		return nil, fromAdmin(err, "create volume %q", r.GetName())
	}
	var d *pb.Disk
	if src != nil {
		d, err = s.clone(ctx, src, name, sz, ps)
	} else {
		d, err = s.create(ctx, name, sz, ps)
	}
	if status.Code(err) == codes.AlreadyExists {
		// A concurrent call with the same name made it: answer as a retry.
		if d, gerr := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: name}); gerr == nil {
			return s.existingVolume(ctx, r, d, src, sz, ps)
		}
	}
	if err != nil {
		return nil, fromAdmin(err, "create volume %q", r.GetName())
	}
	return &csi.CreateVolumeResponse{Volume: volume(d, r.GetVolumeContentSource())}, nil
}

func sourceKind(cs *csi.VolumeContentSource) string {
	if cs.GetSnapshot() != nil {
		return "snapshot"
	}
	return "volume"
}

// create makes a new empty volume that no agent may map yet.
func (s *controllerServer) create(ctx context.Context, name string, sz uint64, ps volumeParams) (*pb.Disk, error) {
	req := &pb.CreateDiskRequest{Name: name, Size: sz, SegmentSize: ps.segmentSize, Policy: ps.policy, Preallocate: ps.preallocate}
	var err error
	if ps.preallocate {
		err = createPreallocated(ctx, s.admin(), req)
	} else {
		_, err = s.admin().CreateDisk(ctx, req)
	}
	if err != nil {
		return nil, err
	}
	return s.admin().Grant(ctx, &pb.GrantRequest{Name: name, Only: true})
}

// createPreallocated creates a disk with a slot for every segment,
// following the stream to its end.
func createPreallocated(ctx context.Context, c pb.AdminClient, req *pb.CreateDiskRequest) error {
	st, err := c.CreateDiskProgress(ctx, req)
	if err != nil {
		return err
	}
	for {
		p, err := st.Recv()
		if err != nil {
			return err
		}
		if p.GetDisk() != nil {
			return nil
		}
	}
}

// clone makes a writable copy of src called name, of size sz at least.
func (s *controllerServer) clone(ctx context.Context, src *pb.Disk, name string, sz uint64, ps volumeParams) (*pb.Disk, error) {
	if ps.segmentSize != 0 && ps.segmentSize != src.GetSegmentSize() {
		return nil, status.Errorf(codes.InvalidArgument, "segmentSize %d: a clone keeps its source's segment size, %d", ps.segmentSize, src.GetSegmentSize())
	}
	// Born closed: a clone inherits its source's grants otherwise, and a
	// crash before they were taken back would leave it open to the
	// source's nodes, and undeletable as "published" there.
	ds, err := s.admin().Snapshot(ctx, &pb.SnapshotRequest{Sources: []string{src.GetName()}, Names: []string{name}, Writable: true, Closed: true})
	if err != nil {
		return nil, err
	}
	if len(ds.GetDisks()) != 1 {
		return nil, status.Errorf(codes.Internal, "clone %s: the controller made %d disks", name, len(ds.GetDisks()))
	}
	return s.finishVolume(ctx, ds.GetDisks()[0], sz)
}

// finishVolume grows a new volume d to sz and closes it to every agent
// if it is open to all: the steps after the disk is made, which a
// retried CreateVolume redoes when the first call stopped before them.
func (s *controllerServer) finishVolume(ctx context.Context, d *pb.Disk, sz uint64) (*pb.Disk, error) {
	var err error
	if sz > d.GetSize() {
		if d, err = s.admin().ResizeDisk(ctx, &pb.ResizeDiskRequest{Name: d.GetName(), Size: sz}); err != nil {
			return nil, err
		}
	}
	if d.GetAllAgents() {
		return s.admin().Grant(ctx, &pb.GrantRequest{Name: d.GetName(), Only: true})
	}
	return d, nil
}

// existingVolume answers a CreateVolume whose disk exists: the same
// volume if it was made with what r asks, AlreadyExists if not.
func (s *controllerServer) existingVolume(ctx context.Context, r *csi.CreateVolumeRequest, d, src *pb.Disk, sz uint64, ps volumeParams) (*csi.CreateVolumeResponse, error) {
	differs := func(what string) (*csi.CreateVolumeResponse, error) {
		return nil, status.Errorf(codes.AlreadyExists, "create volume %q: disk %s exists with another %s", r.GetName(), d.GetName(), what)
	}
	req, lim := r.GetCapacityRange().GetRequiredBytes(), r.GetCapacityRange().GetLimitBytes()
	// A clone whose first CreateVolume stopped before growing it is
	// still its source's size: finishVolume grows it below.
	unfinishedClone := src != nil && d.GetOrigin() == src.GetName() && d.GetSize() == src.GetSize() && d.GetSize() < sz
	switch {
	case d.GetReadOnly():
		return differs("kind (it is a snapshot)")
	case !unfinishedClone && d.GetSize() < uint64(req) || lim > 0 && d.GetSize() > uint64(lim):
		return differs(fmt.Sprintf("size (%d bytes)", d.GetSize()))
	case src == nil && d.GetOrigin() != "" || src != nil && d.GetOrigin() != src.GetName():
		return differs(fmt.Sprintf("origin (%q)", d.GetOrigin()))
	case ps.segmentSize != 0 && ps.segmentSize != d.GetSegmentSize():
		return differs(fmt.Sprintf("segment size (%d)", d.GetSegmentSize()))
	case ps.policy == pb.Policy_POLICY_REVERSE && d.GetPolicy() != pb.Policy_POLICY_REVERSE:
		return differs("policy")
	}
	// The first call may have stopped before growing or closing it.
	d, err := s.finishVolume(ctx, d, sz)
	if err != nil {
		return nil, fromAdmin(err, "create volume %q", r.GetName())
	}
	return &csi.CreateVolumeResponse{Volume: volume(d, r.GetVolumeContentSource())}, nil
}

// volume describes disk d as a CSI volume.
func volume(d *pb.Disk, src *csi.VolumeContentSource) *csi.Volume {
	return &csi.Volume{
		VolumeId:      d.GetName(),
		CapacityBytes: int64(d.GetSize()),
		ContentSource: src,
		VolumeContext: map[string]string{"segmentSize": strconv.FormatUint(d.GetSegmentSize(), 10)},
	}
}

// published is the nodes a volume is granted to; nil for a disk any
// agent may map (a static volume made outside the driver).
func published(d *pb.Disk) []string {
	if d.GetAllAgents() {
		return nil
	}
	return d.GetAgents()
}

func (s *controllerServer) DeleteVolume(ctx context.Context, r *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := r.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "delete volume: no volume id")
	}
	d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: id})
	switch {
	case status.Code(err) == codes.NotFound || status.Code(err) == codes.InvalidArgument:
		return &csi.DeleteVolumeResponse{}, nil // gone already, or never could have been
	case err != nil:
		return nil, fromAdmin(err, "delete volume %q", id)
	case d.GetReadOnly():
		return nil, status.Errorf(codes.InvalidArgument, "delete volume %q: it is a snapshot (DeleteSnapshot deletes it)", id)
	case len(published(d)) > 0:
		return nil, status.Errorf(codes.FailedPrecondition, "delete volume %q: still published to %s", id, strings.Join(published(d), ", "))
	}
	if _, err := s.admin().DeleteDisk(ctx, &pb.DeleteDiskRequest{Name: id}); err != nil && status.Code(err) != codes.NotFound {
		return nil, fromAdmin(err, "delete volume %q", id)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// volumeDisk reads volume id: NotFound for no such disk or a snapshot.
func (s *controllerServer) volumeDisk(ctx context.Context, op, id string) (*pb.Disk, error) {
	if id == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s: no volume id", op)
	}
	d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: id})
	if status.Code(err) == codes.InvalidArgument {
		return nil, status.Errorf(codes.NotFound, "%s: no volume %q", op, id)
	}
	if err != nil {
		return nil, fromAdmin(err, "%s %q", op, id)
	}
	if d.GetReadOnly() {
		return nil, status.Errorf(codes.NotFound, "%s: %q is a snapshot, not a volume", op, id)
	}
	return d, nil
}

func (s *controllerServer) ControllerPublishVolume(ctx context.Context, r *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error) {
	const op = "publish volume"
	switch {
	case r.GetVolumeId() == "":
		return nil, status.Errorf(codes.InvalidArgument, "%s: no volume id", op)
	case r.GetNodeId() == "":
		return nil, status.Errorf(codes.InvalidArgument, "%s: no node id", op)
	}
	if err := checkCap(op, r.GetVolumeId(), r.GetVolumeCapability()); err != nil {
		return nil, err
	}
	d, err := s.volumeDisk(ctx, op, r.GetVolumeId())
	if err != nil {
		return nil, err
	}
	node := r.GetNodeId()
	if err := s.knownNode(ctx, node); err != nil {
		return nil, err
	}
	pub := published(d)
	if singleNode(r.GetVolumeCapability().GetAccessMode().GetMode()) {
		if other := slices.DeleteFunc(slices.Clone(pub), func(n string) bool { return n == node }); len(other) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "%s %q to %q: a single-node volume already published to %s", op, d.GetName(), node, strings.Join(other, ", "))
		}
	}
	if !d.GetAllAgents() && !slices.Contains(pub, node) {
		if _, err := s.admin().Grant(ctx, &pb.GrantRequest{Name: d.GetName(), Agents: []string{node}}); err != nil {
			return nil, fromAdmin(err, "%s %q to %q", op, d.GetName(), node)
		}
	}
	return &csi.ControllerPublishVolumeResponse{PublishContext: map[string]string{"export": d.GetName()}}, nil
}

// knownNode is NotFound unless node names an agent attached to the
// controller now.
func (s *controllerServer) knownNode(ctx context.Context, node string) error {
	st, err := s.admin().Status(ctx, &pb.StatusRequest{Agents: true})
	if err != nil {
		return fromAdmin(err, "publish volume: list agents")
	}
	for _, a := range st.GetAgents() {
		if a.GetName() == node {
			return nil
		}
	}
	return status.Errorf(codes.NotFound, "publish volume: no node %q (no segmap agent of that name is attached to the controller)", node)
}

func (s *controllerServer) ControllerUnpublishVolume(ctx context.Context, r *csi.ControllerUnpublishVolumeRequest) (*csi.ControllerUnpublishVolumeResponse, error) {
	const op = "unpublish volume"
	if r.GetVolumeId() == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s: no volume id", op)
	}
	d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: r.GetVolumeId()})
	if c := status.Code(err); c == codes.NotFound || c == codes.InvalidArgument {
		return &csi.ControllerUnpublishVolumeResponse{}, nil
	} else if err != nil {
		return nil, fromAdmin(err, "%s %q", op, r.GetVolumeId())
	}
	var from []string
	if r.GetNodeId() == "" {
		from = published(d) // from every node
	} else if slices.Contains(published(d), r.GetNodeId()) {
		from = []string{r.GetNodeId()}
	}
	if len(from) > 0 {
		if _, err := s.admin().Revoke(ctx, &pb.GrantRequest{Name: d.GetName(), Agents: from}); err != nil && status.Code(err) != codes.NotFound {
			return nil, fromAdmin(err, "%s %q from %s", op, d.GetName(), strings.Join(from, ", "))
		}
	}
	return &csi.ControllerUnpublishVolumeResponse{}, nil
}

func (s *controllerServer) ValidateVolumeCapabilities(ctx context.Context, r *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	const op = "validate volume capabilities"
	if len(r.GetVolumeCapabilities()) == 0 {
		if r.GetVolumeId() == "" {
			return nil, status.Errorf(codes.InvalidArgument, "%s: no volume id", op)
		}
		return nil, status.Errorf(codes.InvalidArgument, "%s: no capabilities", op)
	}
	if _, err := s.volumeDisk(ctx, op, r.GetVolumeId()); err != nil {
		return nil, err
	}
	if _, err := parseParams(r.GetParameters()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	if why := checkCaps(r.GetVolumeCapabilities()); why != "" {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: why}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      r.GetVolumeContext(),
		VolumeCapabilities: r.GetVolumeCapabilities(),
		Parameters:         r.GetParameters(),
	}}, nil
}

// page cuts names (sorted) at a starting token and a maximum: the token
// is the last name of the previous page. A token that is no name the
// driver could have made is Aborted, as the spec asks.
func page(names []string, token string, maxEntries int32, kind string) (out []string, next string, err error) {
	if maxEntries < 0 {
		return nil, "", status.Errorf(codes.InvalidArgument, "list %s: negative max_entries", kind)
	}
	i := 0
	if token != "" {
		if !strings.HasPrefix(token, "after:") {
			return nil, "", status.Errorf(codes.Aborted, "list %s: starting token %q was not given by this driver", kind, token)
		}
		after := strings.TrimPrefix(token, "after:")
		i = sort.SearchStrings(names, after)
		if i < len(names) && names[i] == after {
			i++
		}
	}
	out = names[i:]
	if maxEntries > 0 && int(maxEntries) < len(out) {
		out = out[:maxEntries]
		next = "after:" + out[len(out)-1]
	}
	return out, next, nil
}

// volumes lists the driver's volumes, their names sorted.
func (s *controllerServer) volumes(ctx context.Context) ([]string, map[string]*pb.Disk, error) {
	ds, err := s.admin().ListDisks(ctx, &pb.ListDisksRequest{})
	if err != nil {
		return nil, nil, fromAdmin(err, "list volumes")
	}
	byName := map[string]*pb.Disk{}
	var names []string
	for _, d := range ds.GetDisks() {
		if strings.HasPrefix(d.GetName(), volPrefix) && !d.GetReadOnly() {
			byName[d.GetName()] = d
			names = append(names, d.GetName())
		}
	}
	sort.Strings(names)
	return names, byName, nil
}

func (s *controllerServer) ListVolumes(ctx context.Context, r *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	names, byName, err := s.volumes(ctx)
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	names, next, err := page(names, r.GetStartingToken(), r.GetMaxEntries(), "volumes")
	if err != nil {
		return nil, err
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, n := range names {
		d := byName[n]
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{
			Volume: volume(d, nil),
			Status: &csi.ListVolumesResponse_VolumeStatus{PublishedNodeIds: published(d)},
		})
	}
	return resp, nil
}

// health is a volume's health: data lost while a range of it fails
// every I/O (segmap's Error entries, after a failed container or
// SetDiskError); nothing known otherwise.
func health(d *pb.Disk) *csi.VolumeHealth {
	h := &csi.VolumeHealth{VolumeId: d.GetName()}
	var bad uint64
	for _, e := range d.GetErrorExtents() {
		bad += e.GetLength()
	}
	if bad > 0 {
		h.HealthStatuses = []*csi.VolumeHealth_VolumeHealthEntry{{
			Status:  csi.VolumeHealthErrorType_DATA_LOSS,
			Reason:  "ErrorExtents",
			Message: fmt.Sprintf("%d bytes in %d ranges fail every I/O (segmap disk info %s)", bad, len(d.GetErrorExtents()), d.GetName()),
		}}
	}
	return h
}

func (s *controllerServer) ControllerGetVolume(ctx context.Context, r *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	d, err := s.volumeDisk(ctx, "get volume", r.GetVolumeId())
	if err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeResponse{
		Volume: volume(d, nil),
		Status: &csi.ControllerGetVolumeResponse_VolumeStatus{PublishedNodeIds: published(d)},
	}, nil
}

func (s *controllerServer) ControllerGetVolumeHealth(ctx context.Context, r *csi.ControllerGetVolumeHealthRequest) (*csi.ControllerGetVolumeHealthResponse, error) {
	d, err := s.volumeDisk(ctx, "get volume health", r.GetVolumeId())
	if err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeHealthResponse{VolumeHealth: &csi.VolumeHealth{VolumeId: d.GetName()}}, nil
}

func (s *controllerServer) ControllerListVolumeHealth(ctx context.Context, r *csi.ControllerListVolumeHealthRequest) (*csi.ControllerListVolumeHealthResponse, error) {
	names, _, err := s.volumes(ctx)
	if err != nil {
		return nil, err
	}
	names, next, err := page(names, r.GetStartingToken(), r.GetMaxEntries(), "volume health")
	if err != nil {
		return nil, err
	}
	resp := &csi.ControllerListVolumeHealthResponse{NextToken: next}
	for _, n := range names {
		// ListDisks leaves out the error extents; GetDisk has them.
		d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: n})
		if status.Code(err) == codes.NotFound {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, fromAdmin(err, "list volume health: %s", n)
		}
		resp.Entries = append(resp.Entries, health(d))
	}
	return resp, nil
}

func (s *controllerServer) GetCapacity(ctx context.Context, _ *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	st, err := s.admin().Status(ctx, &pb.StatusRequest{})
	if err != nil {
		return nil, fromAdmin(err, "get capacity")
	}
	return &csi.GetCapacityResponse{AvailableCapacity: int64(st.GetFreeBytes())}, nil
}

func (s *controllerServer) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES_PUBLISHED_NODES,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_VOLUME,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (s *controllerServer) ControllerExpandVolume(ctx context.Context, r *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	const op = "expand volume"
	if r.GetVolumeId() == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s: no volume id", op)
	}
	if r.GetCapacityRange() == nil {
		return nil, status.Errorf(codes.InvalidArgument, "%s %q: no capacity range", op, r.GetVolumeId())
	}
	d, err := s.volumeDisk(ctx, op, r.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if uint64(max(r.GetCapacityRange().GetRequiredBytes(), 0)) > d.GetSize() {
		// Only a size asked for above the current one grows the disk:
		// no size, or a smaller one, leaves it as it is.
		sz, err := volumeSize(r.GetCapacityRange(), d.GetSize())
		if err != nil {
			return nil, err
		}
		if d, err = s.admin().ResizeDisk(ctx, &pb.ResizeDiskRequest{Name: d.GetName(), Size: sz}); err != nil {
			return nil, fromAdmin(err, "%s %q", op, r.GetVolumeId())
		}
	} else if lim := r.GetCapacityRange().GetLimitBytes(); lim > 0 && d.GetSize() > uint64(lim) {
		return nil, status.Errorf(codes.OutOfRange, "%s %q: it has %d bytes, over the limit %d, and volumes do not shrink", op, d.GetName(), d.GetSize(), lim)
	}
	// The node's block device follows the disk's size only when told
	// (a loop device re-reads its file's size), so the node always
	// takes part, for block volumes too.
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: int64(d.GetSize()), NodeExpansionRequired: true}, nil
}

// Snapshots.

func (s *controllerServer) CreateSnapshot(ctx context.Context, r *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	const op = "create snapshot"
	switch {
	case r.GetName() == "":
		return nil, status.Errorf(codes.InvalidArgument, "%s: no name", op)
	case r.GetSourceVolumeId() == "":
		return nil, status.Errorf(codes.InvalidArgument, "%s %q: no source volume id", op, r.GetName())
	}
	for k := range r.GetParameters() {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return nil, status.Errorf(codes.InvalidArgument, "%s %q: unknown parameter %q (snapshots take none)", op, r.GetName(), k)
		}
	}
	name := diskName(snapPrefix, r.GetName())
	existing := func(d *pb.Disk) (*csi.CreateSnapshotResponse, error) {
		if !d.GetReadOnly() || d.GetOrigin() != r.GetSourceVolumeId() {
			return nil, status.Errorf(codes.AlreadyExists, "%s %q: snapshot %s exists, of %q", op, r.GetName(), name, d.GetOrigin())
		}
		return &csi.CreateSnapshotResponse{Snapshot: snapshot(d)}, nil
	}
	if d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: name}); err == nil {
		return existing(d)
	} else if status.Code(err) != codes.NotFound {
		return nil, fromAdmin(err, "%s %q", op, r.GetName())
	}
	if _, err := s.volumeDisk(ctx, op, r.GetSourceVolumeId()); err != nil {
		return nil, err
	}
	resp, err := s.admin().Snapshot(ctx, &pb.SnapshotRequest{Sources: []string{r.GetSourceVolumeId()}, Names: []string{name}})
	if status.Code(err) == codes.AlreadyExists {
		if d, gerr := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: name}); gerr == nil {
			return existing(d)
		}
	}
	if err != nil {
		return nil, fromAdmin(err, "%s %q of %q", op, r.GetName(), r.GetSourceVolumeId())
	}
	return &csi.CreateSnapshotResponse{Snapshot: snapshot(resp.GetDisks()[0])}, nil
}

// snapshot describes read-only disk d as a CSI snapshot: ready at once,
// since a segmap snapshot copies a table, not data.
func snapshot(d *pb.Disk) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:      d.GetName(),
		SourceVolumeId:  d.GetOrigin(),
		SizeBytes:       int64(d.GetSize()),
		CreationTime:    timestamppb.New(timeOf(d)),
		ReadyToUse:      true,
		GroupSnapshotId: groupOf(d.GetName()),
	}
}

// isSnapshot says whether d is a snapshot the driver lists: a read-only
// disk it made, alone or in a group.
func isSnapshot(d *pb.Disk) bool {
	n := d.GetName()
	return d.GetReadOnly() && (strings.HasPrefix(n, snapPrefix) || groupOf(n) != "")
}

func (s *controllerServer) DeleteSnapshot(ctx context.Context, r *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	const op = "delete snapshot"
	id := r.GetSnapshotId()
	if id == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s: no snapshot id", op)
	}
	d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: id})
	switch {
	case status.Code(err) == codes.NotFound || status.Code(err) == codes.InvalidArgument:
		return &csi.DeleteSnapshotResponse{}, nil
	case err != nil:
		return nil, fromAdmin(err, "%s %q", op, id)
	case !d.GetReadOnly():
		return nil, status.Errorf(codes.InvalidArgument, "%s %q: it is a writable volume, not a snapshot", op, id)
	case groupOf(id) != "":
		return nil, status.Errorf(codes.FailedPrecondition, "%s %q: it belongs to group snapshot %s; delete the group", op, id, groupOf(id))
	}
	// Volumes cloned from it keep their data: they reference the
	// snapshot's segments, not the snapshot.
	if _, err := s.admin().DeleteDisk(ctx, &pb.DeleteDiskRequest{Name: id}); err != nil && status.Code(err) != codes.NotFound {
		return nil, fromAdmin(err, "%s %q", op, id)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (s *controllerServer) ListSnapshots(ctx context.Context, r *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	ds, err := s.admin().ListDisks(ctx, &pb.ListDisksRequest{})
	if err != nil {
		return nil, fromAdmin(err, "list snapshots")
	}
	byName := map[string]*pb.Disk{}
	var names []string
	for _, d := range ds.GetDisks() {
		switch {
		case !isSnapshot(d),
			r.GetSnapshotId() != "" && d.GetName() != r.GetSnapshotId(),
			r.GetSourceVolumeId() != "" && d.GetOrigin() != r.GetSourceVolumeId():
			continue
		}
		byName[d.GetName()] = d
		names = append(names, d.GetName())
	}
	sort.Strings(names)
	names, next, err := page(names, r.GetStartingToken(), r.GetMaxEntries(), "snapshots")
	if err != nil {
		return nil, err
	}
	resp := &csi.ListSnapshotsResponse{NextToken: next}
	for _, n := range names {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: snapshot(byName[n])})
	}
	return resp, nil
}

func (s *controllerServer) GetSnapshot(ctx context.Context, r *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	const op = "get snapshot"
	if r.GetSnapshotId() == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s: no snapshot id", op)
	}
	d, err := s.admin().GetDisk(ctx, &pb.GetDiskRequest{Name: r.GetSnapshotId()})
	if c := status.Code(err); c == codes.NotFound || c == codes.InvalidArgument || err == nil && !d.GetReadOnly() {
		return nil, status.Errorf(codes.NotFound, "%s: no snapshot %q", op, r.GetSnapshotId())
	} else if err != nil {
		return nil, fromAdmin(err, "%s %q", op, r.GetSnapshotId())
	}
	return &csi.GetSnapshotResponse{Snapshot: snapshot(d)}, nil
}
