// Package adminapi serves the controller's admin API (api/segmapv1) over
// gRPC: it translates requests into controller calls and controller errors
// into gRPC status codes, so that every bad request gets a clear message
// and a code a script can test.
package adminapi

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "segmap/api/segmapv1"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/stream"
	"segmap/internal/table"
)

// Config configures a Server.
type Config struct {
	Ctrl *controller.Controller
	// Provision, if set, is called before a disk is created with a
	// segment size that no container serves yet: the embedded mode
	// creates container files for it.
	Provision func(ctx context.Context, slotSize uint64) error
	// CreateContainer, if set, creates a new container file at uri with
	// the given geometry (AddContainer with slots set), or formats the
	// block device, file or NBD export there (slots 0), over whatever it
	// holds only with force.
	CreateContainer func(ctx context.Context, uri string, slotSize, slots uint64, force bool) error
	// CreateReplica makes a replica of a mirrored container, as
	// CreateContainer does, with the given container id.
	CreateReplica func(ctx context.Context, uri string, id uint32, slotSize, slots uint64, force bool) error
	// NBDAddress is where hosts connect, for Status.
	NBDAddress string
	// Version is reported by Status.
	Version string
	// Now returns the time used to name snapshots; time.Now if nil.
	Now func() time.Time
}

// Server implements pb.AdminServer.
type Server struct {
	pb.UnimplementedAdminServer
	cfg Config
}

// New returns a Server.
func New(cfg Config) *Server {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Server{cfg: cfg}
}

// Bulk streams (export, import) move gigabytes through one gRPC stream:
// gRPC's defaults (a 64 KiB flow-control window, 32 KiB write buffers)
// hold them to a fraction of what the disks give, in small writes.

// ServerOptions are the options a gRPC server that serves the admin API
// adds: windows and buffers for bulk streams.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(bulkWindow), grpc.InitialConnWindowSize(2 * bulkWindow),
		grpc.WriteBufferSize(bulkBuffer), grpc.ReadBufferSize(bulkBuffer),
	}
}

// DialOptions are the options an admin client adds, likewise.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithInitialWindowSize(bulkWindow), grpc.WithInitialConnWindowSize(2 * bulkWindow),
		grpc.WithWriteBufferSize(bulkBuffer), grpc.WithReadBufferSize(bulkBuffer),
	}
}

const (
	bulkWindow = 8 << 20 // bytes in flight per stream
	bulkBuffer = 1 << 20 // bytes per socket write or read
)

// Code returns the gRPC code for a controller error.
func Code(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case errors.Is(err, controller.ErrInvalidName), errors.Is(err, controller.ErrInvalidSize),
		errors.Is(err, controller.ErrInvalidSegmentSize), errors.Is(err, protocol.ErrBadRequest),
		errors.Is(err, table.ErrBadPolicy), errors.Is(err, container.ErrNotContainer),
		errors.Is(err, container.ErrCorruptHeader), errors.Is(err, container.ErrWrongContainer),
		errors.Is(err, container.ErrTruncated), errors.Is(err, container.ErrInvalidHeader),
		errors.Is(err, meta.ErrInvalid), errors.Is(err, stream.ErrNotStream), errors.Is(err, stream.ErrVersion),
		errors.Is(err, stream.ErrCorrupt), errors.Is(err, stream.ErrTruncated), errors.Is(err, stream.ErrInvalid),
		errors.Is(err, controller.ErrOtherLineage):
		return codes.InvalidArgument
	case errors.Is(err, protocol.ErrNotFound), errors.Is(err, meta.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, controller.ErrExists), errors.Is(err, meta.ErrExists):
		return codes.AlreadyExists
	case errors.Is(err, controller.ErrShrink), errors.Is(err, controller.ErrNoPool), errors.Is(err, protocol.ErrReadOnly),
		errors.Is(err, controller.ErrRepairRefused), errors.Is(err, container.ErrNotBlank),
		errors.Is(err, controller.ErrNotSnapshot), errors.Is(err, controller.ErrWrongBase), errors.Is(err, controller.ErrWrittenSince),
		errors.Is(err, controller.ErrContainerInUse), errors.Is(err, controller.ErrContainerFailed), errors.Is(err, controller.ErrDrainStuck):
		return codes.FailedPrecondition
	case errors.Is(err, protocol.ErrNoSpace):
		return codes.ResourceExhausted
	case errors.Is(err, controller.ErrClosed), errors.Is(err, meta.ErrClosed), errors.Is(err, meta.ErrLeadershipLost),
		errors.Is(err, meta.ErrUnreachable):
		// The controller is stopping or stepping down: ask the next.
		return codes.Unavailable
	case errors.Is(err, meta.ErrCorrupt):
		// The metadata contradicts itself: 'segmap check' says where.
		return codes.DataLoss
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	return codes.Internal
}

func grpcErr(err error) error {
	if err == nil {
		return nil
	}
	return status.Error(Code(err), err.Error())
}

func toPolicy(p pb.Policy) (table.Policy, error) {
	switch p {
	case pb.Policy_POLICY_UNSPECIFIED, pb.Policy_POLICY_FORWARD:
		return table.Forward, nil
	case pb.Policy_POLICY_REVERSE:
		return table.Reverse, nil
	}
	return 0, fmt.Errorf("policy %d: %w", p, table.ErrBadPolicy)
}

func fromPolicy(p table.Policy) pb.Policy {
	if p == table.Reverse {
		return pb.Policy_POLICY_REVERSE
	}
	return pb.Policy_POLICY_FORWARD
}

// disk converts a record; names maps disk ids to names for the origin.
func disk(d meta.Disk, names map[meta.DiskID]string) *pb.Disk {
	out := &pb.Disk{
		Name: d.Name, Size: d.Size, SegmentSize: d.SegmentSize, Policy: fromPolicy(d.Policy),
		ReadOnly: d.ReadOnly, CreatedUnixNano: d.Created.UnixNano(),
	}
	if d.Origin != 0 {
		if n, ok := names[d.Origin]; ok {
			out.Origin = n
		} else {
			out.Origin = "(deleted)"
		}
	}
	return out
}

func (s *Server) names(ctx context.Context) (map[meta.DiskID]string, []meta.Disk, error) {
	ds, err := s.cfg.Ctrl.Disks(ctx)
	if err != nil {
		return nil, nil, err
	}
	names := make(map[meta.DiskID]string, len(ds))
	for _, d := range ds {
		names[d.ID] = d.Name
	}
	// An import's hidden disks are not the user's to see.
	ds = slices.DeleteFunc(ds, func(d meta.Disk) bool { return controller.Hidden(d.Name) })
	return names, ds, nil
}

// withUsage converts a record with its space usage; hold is what the
// snapshots hold, by family (controller.SnapshotsHold).
func (s *Server) withUsage(ctx context.Context, d meta.Disk, names map[meta.DiskID]string, hold map[meta.DiskID]uint64) (*pb.Disk, error) {
	out := disk(d, names)
	u, err := s.cfg.Ctrl.DiskUsage(ctx, d.Name)
	if err != nil {
		return nil, err
	}
	out.Allocated, out.Exclusive, out.Shared = u.Allocated, u.Exclusive, u.Shared
	if !d.ReadOnly {
		out.SnapshotsHold = hold[d.Family]
	}
	if out.Agents, out.AllAgents, err = s.cfg.Ctrl.Grants(ctx, d.Name); err != nil {
		return nil, err
	}
	return out, nil
}

// CreateDisk implements pb.AdminServer.
func (s *Server) CreateDisk(ctx context.Context, r *pb.CreateDiskRequest) (*pb.Disk, error) {
	return s.createDisk(ctx, r, nil)
}

// CreateDiskProgress implements pb.AdminServer: progress goes out at
// most every 100 ms, and the disk at the end.
func (s *Server) CreateDiskProgress(r *pb.CreateDiskRequest, stream pb.Admin_CreateDiskProgressServer) error {
	var (
		last    time.Time
		sendErr error
	)
	d, err := s.createDisk(stream.Context(), r, func(done, total uint64) {
		if now := time.Now(); sendErr == nil && done < total && now.Sub(last) >= 100*time.Millisecond {
			last = now
			sendErr = stream.Send(&pb.CreateProgress{Done: done, Total: total, SegmentSize: r.SegmentSize})
		}
	})
	if err != nil {
		return err
	}
	if sendErr != nil {
		return sendErr
	}
	var segs uint64
	if r.Preallocate && d.SegmentSize > 0 {
		segs = (d.Size + d.SegmentSize - 1) / d.SegmentSize
	}
	return stream.Send(&pb.CreateProgress{Done: segs, Total: segs, SegmentSize: d.SegmentSize, Disk: d})
}

// createDisk creates a disk; a preallocation is registered as an
// operation and its progress also goes to progress, if set.
func (s *Server) createDisk(ctx context.Context, r *pb.CreateDiskRequest, progress func(done, total uint64)) (*pb.Disk, error) {
	pol, err := toPolicy(r.Policy)
	if err != nil {
		return nil, grpcErr(err)
	}
	o := controller.CreateOptions{Name: r.Name, Size: r.Size, SegmentSize: r.SegmentSize, Policy: pol, Preallocate: r.Preallocate}
	if len(r.Agents) > 0 {
		o.Agents = r.Agents
	}
	if o.SegmentSize == 0 {
		o.SegmentSize = controller.DefaultSegmentSize
	}
	if s.cfg.Provision != nil && controller.ValidSegmentSize(o.SegmentSize) == nil && controller.ValidName(o.Name) == nil && controller.ValidSize(o.Size) == nil {
		if err := s.cfg.Provision(ctx, o.SegmentSize); err != nil {
			return nil, grpcErr(fmt.Errorf("provision containers for %d-byte segments: %w", o.SegmentSize, err))
		}
	}
	var op *controller.Op
	if o.Preallocate {
		op = s.cfg.Ctrl.StartOperation(controller.OpPreallocate, "disk "+o.Name, controller.UnitSegments)
		o.Progress = func(done, total uint64) {
			op.Progress(done, total)
			if progress != nil {
				progress(done, total)
			}
		}
	}
	d, err := s.cfg.Ctrl.CreateDisk(ctx, o)
	op.Finish(err)
	if err != nil {
		return nil, grpcErr(err)
	}
	out := disk(d, nil)
	out.Agents, out.AllAgents = o.Agents, o.Agents == nil
	return out, nil
}

// Grant implements pb.AdminServer.
func (s *Server) Grant(ctx context.Context, r *pb.GrantRequest) (*pb.Disk, error) {
	var err error
	switch {
	case r.Only && r.All:
		return nil, status.Error(codes.InvalidArgument, "grant: only and all together")
	case r.Only:
		err = s.cfg.Ctrl.GrantOnly(ctx, r.Name, r.Agents)
	case !r.All && len(r.Agents) == 0:
		return nil, status.Error(codes.InvalidArgument, "grant: name the agents, or all")
	default:
		err = s.cfg.Ctrl.Grant(ctx, r.Name, r.Agents, r.All)
	}
	if err != nil {
		return nil, grpcErr(err)
	}
	return s.GetDisk(ctx, &pb.GetDiskRequest{Name: r.Name})
}

// Revoke implements pb.AdminServer.
func (s *Server) Revoke(ctx context.Context, r *pb.GrantRequest) (*pb.Disk, error) {
	if r.All || len(r.Agents) == 0 {
		return nil, status.Error(codes.InvalidArgument, "revoke: name the agents")
	}
	if err := s.cfg.Ctrl.Revoke(ctx, r.Name, r.Agents); err != nil {
		return nil, grpcErr(err)
	}
	return s.GetDisk(ctx, &pb.GetDiskRequest{Name: r.Name})
}

// ListDisks implements pb.AdminServer.
func (s *Server) ListDisks(ctx context.Context, _ *pb.ListDisksRequest) (*pb.ListDisksResponse, error) {
	names, ds, err := s.names(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	hold, err := s.cfg.Ctrl.SnapshotsHold(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	out := &pb.ListDisksResponse{}
	for _, d := range ds {
		pd, err := s.withUsage(ctx, d, names, hold)
		if errors.Is(err, protocol.ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, grpcErr(err)
		}
		out.Disks = append(out.Disks, pd)
	}
	return out, nil
}

// GetDisk implements pb.AdminServer.
func (s *Server) GetDisk(ctx context.Context, r *pb.GetDiskRequest) (*pb.Disk, error) {
	d, err := s.cfg.Ctrl.Disk(ctx, r.Name)
	if err != nil {
		return nil, grpcErr(err)
	}
	names, _, err := s.names(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	held, err := s.cfg.Ctrl.FamilySnapshotsHold(ctx, d.Name)
	if err != nil {
		return nil, grpcErr(err)
	}
	pd, err := s.withUsage(ctx, d, names, map[meta.DiskID]uint64{d.Family: held})
	if err != nil {
		return nil, grpcErr(err)
	}
	exts, err := s.cfg.Ctrl.ErrorExtents(ctx, d.Name)
	if err != nil {
		return nil, grpcErr(err)
	}
	pd.ErrorExtents = extentsMsg(exts)
	return pd, nil
}

// extentsMsg converts extents for the wire.
func extentsMsg(exts []controller.Extent) []*pb.Extent {
	out := make([]*pb.Extent, len(exts))
	for i, x := range exts {
		out[i] = &pb.Extent{Offset: x.Off, Length: x.Len}
	}
	return out
}

// SetDiskError implements pb.AdminServer.
func (s *Server) SetDiskError(ctx context.Context, r *pb.SetDiskErrorRequest) (*pb.Disk, error) {
	d, err := s.cfg.Ctrl.SetError(ctx, r.Name, r.Offset, r.Length)
	if err != nil {
		return nil, grpcErr(err)
	}
	return s.GetDisk(ctx, &pb.GetDiskRequest{Name: d.Name})
}

// ClearDiskErrors implements pb.AdminServer.
func (s *Server) ClearDiskErrors(ctx context.Context, r *pb.ClearDiskErrorsRequest) (*pb.ClearDiskErrorsResponse, error) {
	n, err := s.cfg.Ctrl.ClearErrors(ctx, r.Name)
	if err != nil {
		return nil, grpcErr(err)
	}
	return &pb.ClearDiskErrorsResponse{ClearedBytes: n}, nil
}

// ResizeDisk implements pb.AdminServer.
func (s *Server) ResizeDisk(ctx context.Context, r *pb.ResizeDiskRequest) (*pb.Disk, error) {
	d, err := s.cfg.Ctrl.ResizeDisk(ctx, r.Name, r.Size, r.Shrink)
	if err != nil {
		return nil, grpcErr(err)
	}
	return s.GetDisk(ctx, &pb.GetDiskRequest{Name: d.Name})
}

// RollbackDisk implements pb.AdminServer.
func (s *Server) RollbackDisk(ctx context.Context, r *pb.RollbackDiskRequest) (*pb.Disk, error) {
	d, err := s.cfg.Ctrl.Rollback(ctx, r.Name, r.To)
	if err != nil {
		return nil, grpcErr(err)
	}
	return s.GetDisk(ctx, &pb.GetDiskRequest{Name: d.Name})
}

// RenameDisk implements pb.AdminServer.
func (s *Server) RenameDisk(ctx context.Context, r *pb.RenameDiskRequest) (*pb.Disk, error) {
	d, err := s.cfg.Ctrl.RenameDisk(ctx, r.Name, r.NewName)
	if err != nil {
		return nil, grpcErr(err)
	}
	return s.GetDisk(ctx, &pb.GetDiskRequest{Name: d.Name})
}

// SetDisk implements pb.AdminServer.
func (s *Server) SetDisk(ctx context.Context, r *pb.SetDiskRequest) (*pb.Disk, error) {
	if r.ReadOnly == nil {
		return nil, grpcErr(fmt.Errorf("set %q: nothing to change: %w", r.Name, protocol.ErrBadRequest))
	}
	d, err := s.cfg.Ctrl.SetReadOnly(ctx, r.Name, *r.ReadOnly)
	if err != nil {
		return nil, grpcErr(err)
	}
	return s.GetDisk(ctx, &pb.GetDiskRequest{Name: d.Name})
}

// FlattenDisk implements pb.AdminServer: progress goes out at most every
// 100 ms, and once at the end.
func (s *Server) FlattenDisk(r *pb.FlattenDiskRequest, stream pb.Admin_FlattenDiskServer) error {
	ctx := stream.Context()
	d, err := s.cfg.Ctrl.Disk(ctx, r.Name)
	if err != nil {
		return grpcErr(err)
	}
	var (
		last    time.Time
		sendErr error
	)
	op := s.cfg.Ctrl.StartOperation(controller.OpFlatten, "disk "+r.Name, controller.UnitSegments)
	err = s.cfg.Ctrl.Flatten(ctx, r.Name, func(done, total uint64) {
		op.Progress(done, total)
		if now := time.Now(); sendErr == nil && (done == total || now.Sub(last) >= 100*time.Millisecond) {
			last = now
			sendErr = stream.Send(&pb.FlattenProgress{Done: done, Total: total, SegmentSize: d.SegmentSize})
		}
	})
	op.Finish(cmp.Or(err, sendErr))
	if err != nil {
		return grpcErr(err)
	}
	return sendErr
}

// DeleteDisk implements pb.AdminServer.
func (s *Server) DeleteDisk(ctx context.Context, r *pb.DeleteDiskRequest) (*pb.DeleteDiskResponse, error) {
	if r.DryRun {
		n, err := s.cfg.Ctrl.DeleteFrees(ctx, r.Name)
		if err != nil {
			return nil, grpcErr(err)
		}
		return &pb.DeleteDiskResponse{FreedBytes: n}, nil
	}
	n, err := s.cfg.Ctrl.DeleteDiskFreed(ctx, r.Name)
	if err != nil {
		return nil, grpcErr(err)
	}
	return &pb.DeleteDiskResponse{FreedBytes: n}, nil
}

// Snapshot implements pb.AdminServer. Names left empty are made from the
// source and the time: SOURCE@20261126-063000.
func (s *Server) Snapshot(ctx context.Context, r *pb.SnapshotRequest) (*pb.SnapshotResponse, error) {
	names := r.Names
	if len(names) == 0 {
		stamp := s.cfg.Now().UTC().Format("20060102-150405")
		for _, src := range r.Sources {
			names = append(names, src+"@"+stamp)
		}
	}
	ds, err := s.cfg.Ctrl.Snapshot(ctx, controller.SnapshotOptions{
		Sources: r.Sources, Names: names, Writable: r.Writable, Closed: r.Closed,
		QuiesceTimeout: time.Duration(r.QuiesceTimeoutMs) * time.Millisecond,
	})
	if err != nil {
		return nil, grpcErr(err)
	}
	all, _, err := s.names(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	out := &pb.SnapshotResponse{}
	for _, d := range ds {
		out.Disks = append(out.Disks, disk(d, all))
	}
	return out, nil
}

// MaxDiffExtents is the most extents one DiffDisks response holds (about
// 1 MiB): a client pages through a larger diff with next_offset.
const MaxDiffExtents = 1 << 16

// DiffDisks implements pb.AdminServer.
func (s *Server) DiffDisks(ctx context.Context, r *pb.DiffDisksRequest) (*pb.DiffDisksResponse, error) {
	var ids [2]meta.DiskID
	for i, n := range []string{r.From, r.To} {
		if err := controller.ValidName(n); err != nil {
			return nil, grpcErr(fmt.Errorf("diff: %w", err))
		}
		d, err := s.cfg.Ctrl.Disk(ctx, n)
		if err != nil {
			return nil, grpcErr(err)
		}
		ids[i] = d.ID // ids are never reused: a disk deleted since is not found
	}
	q := controller.DiffQuery{Off: r.Offset, Len: r.Length, Max: MaxDiffExtents}
	if r.MaxExtents > 0 && r.MaxExtents < MaxDiffExtents {
		q.Max = int(r.MaxExtents)
	}
	d, err := s.cfg.Ctrl.DiffRange(ctx, ids[0], ids[1], q)
	if err != nil {
		return nil, grpcErr(err)
	}
	out := &pb.DiffDisksResponse{
		Extents:      make([]*pb.Extent, len(d.Extents)),
		ChangedBytes: d.Bytes(),
		FromSize:     d.From.Size, ToSize: d.To.Size, SegmentSize: d.From.SegmentSize,
		NextOffset: d.Next,
	}
	for i, x := range d.Extents {
		out.Extents[i] = &pb.Extent{Offset: x.Off, Length: x.Len}
	}
	return out, nil
}

func containerMsg(c meta.Container) *pb.Container {
	out := &pb.Container{Id: c.ID, Uri: c.URI, SlotSize: c.SlotSize, Slots: c.Slots, UsedSlots: c.Used, State: c.State.String()}
	if c.Mirrored() {
		out.Epoch = c.Epoch
		for _, r := range c.Replicas {
			out.Replicas = append(out.Replicas, &pb.ReplicaInfo{Uri: r.URI, State: r.State.String()})
		}
	}
	return out
}

// spaceMsg converts a container with what its backing holds.
func spaceMsg(c controller.ContainerSpace) *pb.Container {
	out := containerMsg(c.Container)
	if c.Known {
		out.AllocatedBytes = &c.Allocated
	}
	return out
}

// ListContainers implements pb.AdminServer.
func (s *Server) ListContainers(ctx context.Context, _ *pb.ListContainersRequest) (*pb.ListContainersResponse, error) {
	cs, err := s.cfg.Ctrl.ContainerSpaces(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	out := &pb.ListContainersResponse{}
	for _, c := range cs {
		out.Containers = append(out.Containers, spaceMsg(c))
	}
	return out, nil
}

// DrainContainer implements pb.AdminServer: progress goes out at most
// every 100 ms, and once at the end.
func (s *Server) DrainContainer(r *pb.DrainContainerRequest, stream pb.Admin_DrainContainerServer) error {
	ctx := stream.Context()
	var slotSize uint64
	cs, err := s.cfg.Ctrl.ListContainers(ctx)
	if err != nil {
		return grpcErr(err)
	}
	for _, c := range cs {
		if c.ID == r.Id {
			slotSize = c.SlotSize
		}
	}
	var (
		last    time.Time
		sendErr error
	)
	op := s.cfg.Ctrl.StartOperation(controller.OpDrain, fmt.Sprintf("container %d", r.Id), controller.UnitSlots)
	err = s.cfg.Ctrl.Drain(ctx, r.Id, func(done, total uint64) {
		op.Progress(done, total)
		if now := time.Now(); sendErr == nil && (done == total || now.Sub(last) >= 100*time.Millisecond) {
			last = now
			sendErr = stream.Send(&pb.DrainProgress{Done: done, Total: total, SlotSize: slotSize})
		}
	})
	op.Finish(cmp.Or(err, sendErr))
	if err != nil {
		return grpcErr(err)
	}
	return sendErr
}

// RemoveContainer implements pb.AdminServer.
func (s *Server) RemoveContainer(ctx context.Context, r *pb.RemoveContainerRequest) (*pb.RemoveContainerResponse, error) {
	if err := s.cfg.Ctrl.RemoveContainer(ctx, r.Id); err != nil {
		return nil, grpcErr(err)
	}
	return &pb.RemoveContainerResponse{Id: r.Id}, nil
}

// OnlineContainer implements pb.AdminServer.
func (s *Server) OnlineContainer(ctx context.Context, r *pb.OnlineContainerRequest) (*pb.Container, error) {
	c, err := s.cfg.Ctrl.OnlineContainer(ctx, r.Id)
	if err != nil {
		return nil, grpcErr(err)
	}
	return containerMsg(c), nil
}

// AddContainer implements pb.AdminServer.
func (s *Server) AddContainer(ctx context.Context, r *pb.AddContainerRequest) (*pb.Container, error) {
	if len(r.Mirror) > 0 {
		return s.addMirror(ctx, r)
	}
	if r.Uri == "" {
		return nil, status.Error(codes.InvalidArgument, "add container: no path or URI")
	}
	if r.Slots > 0 || r.SlotSize > 0 {
		if s.cfg.CreateContainer == nil {
			return nil, status.Error(codes.FailedPrecondition, "this controller does not create container files; create it where the agents can reach it and add it without --slots")
		}
		if r.SlotSize == 0 {
			return nil, status.Error(codes.InvalidArgument, "add container: a new container file needs both a slot size and a slot count (a block device or NBD export to format, a slot size)")
		}
		if r.Slots > 0 && strings.HasPrefix(r.Uri, "nbd://") {
			return nil, status.Error(codes.InvalidArgument, "add container: an NBD export is formatted, with a slot size only: its size gives the slots")
		}
		if err := s.cfg.CreateContainer(ctx, r.Uri, r.SlotSize, r.Slots, r.Force); err != nil {
			return nil, grpcErr(err)
		}
	}
	c, err := s.cfg.Ctrl.AddContainer(ctx, r.Uri)
	if err != nil {
		return nil, grpcErr(err)
	}
	return containerMsg(c), nil
}

// addMirror adds a mirrored container, formatting its replicas first
// when asked (a slot size).
func (s *Server) addMirror(ctx context.Context, r *pb.AddContainerRequest) (*pb.Container, error) {
	if r.Uri != "" {
		return nil, status.Error(codes.InvalidArgument, "add container: a URI and mirror replicas; give one or the other")
	}
	if len(r.Mirror) < 2 || len(r.Mirror) > meta.MaxReplicas {
		return nil, status.Errorf(codes.InvalidArgument, "add container: a mirror of %d replicas (2 to %d)", len(r.Mirror), meta.MaxReplicas)
	}
	if r.SlotSize > 0 {
		if s.cfg.CreateReplica == nil {
			return nil, status.Error(codes.FailedPrecondition, "this controller does not format replicas; format them alike where the agents can reach them and add them without a slot size")
		}
		id, err := s.cfg.Ctrl.NextContainerID(ctx)
		if err != nil {
			return nil, grpcErr(err)
		}
		for _, uri := range r.Mirror {
			slots := r.Slots
			if strings.HasPrefix(uri, "nbd://") {
				slots = 0
			}
			if err := s.cfg.CreateReplica(ctx, uri, id, r.SlotSize, slots, r.Force); err != nil {
				return nil, grpcErr(fmt.Errorf("replica %s: %w", uri, err))
			}
		}
	}
	c, err := s.cfg.Ctrl.AddMirror(ctx, r.Mirror)
	if err != nil {
		return nil, grpcErr(err)
	}
	return containerMsg(c), nil
}

// ReplaceReplica implements pb.AdminServer: progress goes out at most
// every 100 ms, and once at the end.
func (s *Server) ReplaceReplica(r *pb.ReplaceReplicaRequest, stream pb.Admin_ReplaceReplicaServer) error {
	ctx := stream.Context()
	if r.OldUri == "" || r.NewUri == "" {
		return status.Error(codes.InvalidArgument, "replace replica: the old and the new replica's URI are needed")
	}
	if r.Format {
		if s.cfg.CreateReplica == nil {
			return status.Error(codes.FailedPrecondition, "this controller does not format replicas")
		}
		ct, err := s.container(ctx, r.Id)
		if err != nil {
			return grpcErr(err)
		}
		slots := ct.Slots
		if strings.HasPrefix(r.NewUri, "nbd://") {
			slots = 0
		} else if path, err := container.FilePath(r.NewUri); err == nil {
			if _, err := os.Stat(path); err == nil {
				slots = 0 // there: a device or file to format
			}
		}
		if err := s.cfg.CreateReplica(ctx, r.NewUri, ct.ID, ct.SlotSize, slots, r.Force); err != nil {
			return grpcErr(fmt.Errorf("replica %s: %w", r.NewUri, err))
		}
	}
	var slotSize uint64
	if ct, err := s.container(ctx, r.Id); err == nil {
		slotSize = ct.SlotSize
	}
	send := progressSender(stream.Send, slotSize)
	send.op = s.cfg.Ctrl.StartOperation(controller.OpReplaceReplica, fmt.Sprintf("container %d", r.Id), controller.UnitSlots)
	err := s.cfg.Ctrl.ReplaceReplica(ctx, r.Id, r.OldUri, r.NewUri, send.progress)
	send.op.Finish(cmp.Or(err, send.err))
	if err != nil {
		return grpcErr(err)
	}
	return send.err
}

// RebuildReplica implements pb.AdminServer.
func (s *Server) RebuildReplica(r *pb.RebuildReplicaRequest, stream pb.Admin_RebuildReplicaServer) error {
	var slotSize uint64
	if ct, err := s.container(stream.Context(), r.Id); err == nil {
		slotSize = ct.SlotSize
	}
	send := progressSender(stream.Send, slotSize)
	send.op = s.cfg.Ctrl.StartOperation(controller.OpRebuild, fmt.Sprintf("container %d", r.Id), controller.UnitSlots)
	err := s.cfg.Ctrl.RebuildReplica(stream.Context(), r.Id, send.progress)
	send.op.Finish(cmp.Or(err, send.err))
	if err != nil {
		return grpcErr(err)
	}
	return send.err
}

// container returns container id's record.
func (s *Server) container(ctx context.Context, id uint32) (meta.Container, error) {
	cs, err := s.cfg.Ctrl.ListContainers(ctx)
	if err != nil {
		return meta.Container{}, err
	}
	for _, c := range cs {
		if c.ID == id {
			return c, nil
		}
	}
	return meta.Container{}, fmt.Errorf("container %d: %w", id, protocol.ErrNotFound)
}

// sender streams progress at most every 100 ms, and at the end, and
// feeds op with every count.
type sender struct {
	send     func(*pb.DrainProgress) error
	op       *controller.Op
	slotSize uint64
	last     time.Time
	err      error
}

func progressSender(send func(*pb.DrainProgress) error, slotSize uint64) *sender {
	return &sender{send: send, slotSize: slotSize}
}

func (s *sender) progress(done, total uint64) {
	s.op.Progress(done, total)
	if now := time.Now(); s.err == nil && (done == total || now.Sub(s.last) >= 100*time.Millisecond) {
		s.last = now
		s.err = s.send(&pb.DrainProgress{Done: done, Total: total, SlotSize: s.slotSize})
	}
}

// Problems converts problems found by Check to their messages.
func Problems(ps []controller.Problem) []*pb.Problem {
	out := make([]*pb.Problem, len(ps))
	for i, p := range ps {
		out[i] = &pb.Problem{Kind: p.Kind.String(), Container: p.Loc.Container, Slot: p.Loc.Slot, Key: p.Key, Disk: p.Disk, Segment: p.Segment, Detail: p.Detail}
	}
	return out
}

// Check implements pb.AdminServer. A repair refused (damage other than
// leaked slots) is not an error: the response says why, with the problems.
// With scrub, the replicas of the mirrored containers are compared (and
// repaired, with repair) once the metadata is found sound.
func (s *Server) Check(ctx context.Context, r *pb.CheckRequest) (*pb.CheckResponse, error) {
	out := &pb.CheckResponse{}
	if r.Repair {
		fixed, err := s.cfg.Ctrl.Repair(ctx)
		switch {
		case errors.Is(err, controller.ErrRepairRefused):
			out.Refused = err.Error()
		case err != nil:
			return nil, grpcErr(err)
		}
		out.Repaired = Problems(fixed)
	}
	ps, err := s.cfg.Ctrl.Check(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	out.Problems = Problems(ps)
	if len(ps) > 0 {
		// Damaged records may keep the disks from being read: the
		// problems say so already. Nor is a scrub run: it reads the
		// slots the counts say are used or free, and a repair would
		// punch a slot counted free while in use.
		return out, nil
	}
	if r.Scrub {
		op := s.cfg.Ctrl.StartOperation(controller.OpScrub, "mirrored containers", controller.UnitSlots)
		res, err := s.cfg.Ctrl.Scrub(ctx, r.Repair, op.Progress)
		op.Finish(err)
		out.ScrubProblems = Problems(res.Problems)
		out.ScrubRepaired = Problems(res.Repaired)
		out.ScrubbedSlots = res.Slots
		out.ScrubbedContainers = uint32(res.Containers)
		if err != nil {
			return nil, grpcErr(err)
		}
	}
	ds, err := s.cfg.Ctrl.Disks(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	for _, d := range ds {
		exts, err := s.cfg.Ctrl.ErrorExtents(ctx, d.Name)
		if errors.Is(err, protocol.ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, grpcErr(err)
		}
		if len(exts) > 0 {
			out.DiskErrors = append(out.DiskErrors, &pb.DiskErrors{Disk: d.Name, Extents: extentsMsg(exts)})
		}
	}
	return out, nil
}

// Status implements pb.AdminServer.
func (s *Server) Status(ctx context.Context, r *pb.StatusRequest) (*pb.StatusResponse, error) {
	cs, err := s.cfg.Ctrl.ContainerSpaces(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	ds, err := s.cfg.Ctrl.Disks(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	hold, err := s.cfg.Ctrl.SnapshotsHold(ctx)
	if err != nil {
		return nil, grpcErr(err)
	}
	out := &pb.StatusResponse{Disks: uint64(len(ds)), NbdAddress: s.cfg.NBDAddress, Version: s.cfg.Version}
	for _, a := range s.cfg.Ctrl.Agents() {
		out.Agents = append(out.Agents, &pb.Agent{Name: a.Name, Disks: uint32(a.Disks)})
	}
	if r.GetAgents() {
		if out.Agents, err = s.agentStatus(ctx, out.Agents); err != nil {
			return nil, grpcErr(err)
		}
	}
	for _, c := range cs {
		out.Containers = append(out.Containers, spaceMsg(c))
		out.TotalBytes += c.Slots * c.SlotSize
		out.UsedBytes += c.Used * c.SlotSize
		if c.Known {
			out.AllocatedBytes += c.Allocated
		} else {
			out.AllocatedUnknown++
		}
	}
	out.FreeBytes = out.TotalBytes - out.UsedBytes
	for _, n := range hold {
		out.SnapshotsHoldBytes += n
	}
	return out, nil
}

// agentStatus fills in the mapped disks of agents with what each agent
// said of them (get_status). An agent that attached meanwhile is added.
func (s *Server) agentStatus(ctx context.Context, agents []*pb.Agent) ([]*pb.Agent, error) {
	as, err := s.cfg.Ctrl.AgentStatus(ctx, 0)
	if err != nil {
		return nil, err
	}
	byName := make(map[string]*pb.Agent, len(agents))
	for _, a := range agents {
		byName[a.Name] = a
	}
	for _, st := range as {
		a := byName[st.Name]
		if a == nil {
			a = &pb.Agent{Name: st.Name, Disks: uint32(len(st.Disks))}
			agents = append(agents, a)
		}
		for _, d := range st.Disks {
			a.MappedDisks = append(a.MappedDisks, agentDiskMsg(d))
		}
	}
	slices.SortFunc(agents, func(a, b *pb.Agent) int { return strings.Compare(a.Name, b.Name) })
	return agents, nil
}

func agentDiskMsg(d controller.AgentDiskStatus) *pb.AgentDisk {
	m := &pb.AgentDisk{Id: uint64(d.ID), Name: d.Name}
	if d.Err != nil {
		m.Failure = d.Err.Error()
		return m
	}
	st := d.Status
	m.Segments, m.Loaded = st.Segments, st.Loaded
	m.Invalid, m.Error, m.Zero, m.NoWrite, m.Mapped = st.Invalid, st.Error, st.Zero, st.NoWrite, st.Mapped
	m.InFlight, m.FaultsOut, m.Quiesced = st.InFlight, st.FaultsOut, st.Quiesced
	m.Leased, m.LeaseLeftMs = st.Leased, st.LeaseLeft.Milliseconds()
	return m
}

// exportChunk is the size of the chunks an export is sent in.
const exportChunk = 1 << 20

// chunkWriter sends what is written to it as ExportChunks; the first
// carries the total.
type chunkWriter struct {
	srv   pb.Admin_ExportServer
	op    *controller.Op
	total uint64
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	all := len(p)
	for len(p) > 0 {
		n := min(len(p), exportChunk)
		if err := w.srv.Send(&pb.ExportChunk{Data: p[:n], TotalDataBytes: w.total}); err != nil {
			return 0, err
		}
		w.op.Add(uint64(n))
		w.total = 0
		p = p[n:]
	}
	return all, nil
}

// Export implements pb.AdminServer.
func (s *Server) Export(r *pb.ExportRequest, srv pb.Admin_ExportServer) error {
	// The stream's own buffer batches small records; a large one goes
	// straight to a chunk, with no copy of its own here.
	target := r.Snapshot
	if r.Base != "" {
		target += " from " + r.Base
	}
	cw := &chunkWriter{srv: srv, op: s.cfg.Ctrl.StartOperation(controller.OpExport, target, controller.UnitBytes)}
	err := s.cfg.Ctrl.Export(srv.Context(), controller.ExportOptions{
		Snapshot: r.Snapshot, Base: r.Base,
		Start: func(n uint64) {
			cw.total = max(n, 1)
			cw.op.SetTotal(n)
		},
	}, cw)
	cw.op.Finish(err)
	return grpcErr(err)
}

// chunkReader reads the data of ImportChunks.
type chunkReader struct {
	srv pb.Admin_ImportServer
	op  *controller.Op
	buf []byte
}

func (r *chunkReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		c, err := r.srv.Recv()
		if err != nil {
			return 0, err // io.EOF at the client's end
		}
		r.buf = c.Data
		r.op.Add(uint64(len(c.Data)))
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// Import implements pb.AdminServer.
func (s *Server) Import(srv pb.Admin_ImportServer) error {
	first, err := srv.Recv()
	if errors.Is(err, io.EOF) {
		return status.Error(codes.InvalidArgument, "import: no disk named")
	}
	if err != nil {
		return err
	}
	o := controller.ImportOptions{Disk: first.Disk, Force: first.Force}
	if s.cfg.Provision != nil {
		o.Prepare = func(ctx context.Context, h stream.Header) error {
			// An incremental stream's disk has its pool already; a
			// bad segment size is Import's to refuse.
			if h.Base == nil && controller.ValidSegmentSize(h.Source.SegmentSize) == nil {
				return s.cfg.Provision(ctx, h.Source.SegmentSize)
			}
			return nil
		}
	}
	op := s.cfg.Ctrl.StartOperation(controller.OpImport, "disk "+first.Disk, controller.UnitBytes)
	op.Progress(uint64(len(first.Data)), first.TotalBytes)
	d, err := s.cfg.Ctrl.Import(srv.Context(), o, &chunkReader{srv: srv, op: op, buf: first.Data})
	op.Finish(err)
	if err != nil {
		return grpcErr(err)
	}
	names, _, err := s.names(srv.Context())
	if err != nil {
		return grpcErr(err)
	}
	return srv.SendAndClose(&pb.ImportResponse{Snapshot: disk(d, names)})
}

// ListOperations implements pb.AdminServer.
func (s *Server) ListOperations(context.Context, *pb.ListOperationsRequest) (*pb.ListOperationsResponse, error) {
	out := &pb.ListOperationsResponse{}
	for _, o := range s.cfg.Ctrl.Operations() {
		m := &pb.Operation{
			Id: o.ID, Kind: o.Kind, Target: o.Target, Done: o.Done, Total: o.Total, Unit: o.Unit,
			StartedUnix: o.Started.Unix(), State: o.State.String(), Error: o.Err,
		}
		if !o.Finished.IsZero() {
			m.FinishedUnix = o.Finished.Unix()
		}
		out.Operations = append(out.Operations, m)
	}
	return out, nil
}
