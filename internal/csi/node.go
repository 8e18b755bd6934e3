package csi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"segmap/internal/controller"
)

// NodeConfig configures the node service.
type NodeConfig struct {
	// StateDir holds a directory per staged volume: what the Attacher
	// keeps, and the volume's publications. It survives a restart of the
	// node plugin, so that the plugin finds what it staged before.
	StateDir string
	// Root bounds the staging and target paths the orchestrator names
	// (kubelet's directory): a path outside it is refused.
	Root string
	// Attacher makes a volume a block device on this host.
	Attacher Attacher
}

// Attacher makes a segmap disk, served by this host's agent, a block
// device on this host. Every method is called with the volume's lock
// held, so calls for one dir never overlap; calls for different dirs
// may run at once.
type Attacher interface {
	// Attach makes the agent's export a block device, keeping what it
	// needs to find it again under dir (an existing directory). It
	// returns the device's path; called again for an attached dir, it
	// returns the same device.
	Attach(ctx context.Context, export, dir string) (dev string, err error)
	// Device is the block device attached under dir; ok is false if
	// none is, or if it has stopped working (Detach still cleans up).
	Device(dir string) (dev string, ok bool, err error)
	// Grow makes the device follow the export's size, at least want
	// bytes, and returns the device's size.
	Grow(ctx context.Context, dir string, want uint64) (uint64, error)
	// Detach takes the device away and everything Attach made under
	// dir; a dir with nothing attached is no error.
	Detach(ctx context.Context, dir string) error
}

// nodeServer is the CSI Node service.
type nodeServer struct {
	csi.UnimplementedNodeServer
	cfg    NodeConfig
	nodeID string
	mu     struct {
		sync.Mutex
		// locks holds a lock per volume id being worked on.
		locks map[string]*volumeLock
	}
}

type volumeLock struct {
	mu struct{ sync.Mutex }
	// users counts the calls holding or waiting for it, under
	// nodeServer.mu.
	users int
}

func newNodeServer(cfg Config) (*nodeServer, error) {
	nc := cfg.Node
	if nc.StateDir == "" || nc.Root == "" || nc.Attacher == nil {
		return nil, fmt.Errorf("csi: the node service needs a state directory, a root and an attacher: %w", ErrConfig)
	}
	for _, p := range []*string{&nc.StateDir, &nc.Root} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return nil, err
		}
		*p = abs
	}
	if err := os.MkdirAll(nc.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("csi: state directory: %w", err)
	}
	s := &nodeServer{cfg: nc, nodeID: cfg.NodeID}
	s.mu.locks = map[string]*volumeLock{}
	return s, nil
}

// lock serializes the calls about one volume.
func (s *nodeServer) lock(id string) func() {
	s.mu.Lock()
	l := s.mu.locks[id]
	if l == nil {
		l = &volumeLock{}
		s.mu.locks[id] = l
	}
	l.users++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.users--; l.users == 0 {
			delete(s.mu.locks, id)
		}
		s.mu.Unlock()
	}
}

// volumeState is what the node keeps about a staged volume, in
// StateDir/ID/volume.json.
type volumeState struct {
	Export  string `json:"export"`
	Staging string `json:"staging"`
	Block   bool   `json:"block"`
	FsType  string `json:"fs_type,omitempty"`
	// Targets are the paths the volume is published at.
	Targets []string `json:"targets,omitempty"`
	// Single: the volume was staged SINGLE_NODE_SINGLE_WRITER, so one
	// target at most.
	Single bool `json:"single,omitempty"`
	// ReadOnlyLoops are, for a block volume, the read-only loop devices
	// over its device that read-only targets are bound to, by target.
	ReadOnlyLoops map[string]string `json:"read_only_loops,omitempty"`
}

func (s *nodeServer) volDir(id string) string { return filepath.Join(s.cfg.StateDir, id) }

func (s *nodeServer) readState(id string) (*volumeState, error) {
	b, err := os.ReadFile(filepath.Join(s.volDir(id), "volume.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: read its state: %v", id, err)
	}
	var st volumeState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: its state file %s is corrupt: %v", id, filepath.Join(s.volDir(id), "volume.json"), err)
	}
	return &st, nil
}

func (s *nodeServer) writeState(id string, st *volumeState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	p := filepath.Join(s.volDir(id), "volume.json")
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return status.Errorf(codes.Internal, "volume %s: write its state: %v", id, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return status.Errorf(codes.Internal, "volume %s: write its state: %v", id, err)
	}
	return nil
}

// checkVolumeID refuses an id that could not name a disk (and so could
// climb out of the state directory).
func checkVolumeID(op, id string) error {
	if id == "" {
		return status.Errorf(codes.InvalidArgument, "%s: no volume id", op)
	}
	if controller.ValidName(id) != nil {
		return status.Errorf(codes.NotFound, "%s: no volume %q (not a segmap disk name)", op, id)
	}
	return nil
}

// checkCap refuses a missing capability, or one the driver cannot give,
// with InvalidArgument.
func checkCap(op, id string, vc *csi.VolumeCapability) error {
	if vc == nil {
		return status.Errorf(codes.InvalidArgument, "%s %s: no volume capability", op, id)
	}
	if why := checkCaps([]*csi.VolumeCapability{vc}); why != "" {
		return status.Errorf(codes.InvalidArgument, "%s %s: %s", op, id, why)
	}
	return nil
}

// underRoot refuses a path that is not absolute or not below the root,
// also through symbolic links in the part of it that exists.
func (s *nodeServer) underRoot(op, what, p string) (string, error) {
	if p == "" {
		return "", status.Errorf(codes.InvalidArgument, "%s: no %s", op, what)
	}
	if !filepath.IsAbs(p) {
		return "", status.Errorf(codes.InvalidArgument, "%s: %s %q is not an absolute path", op, what, p)
	}
	c := filepath.Clean(p)
	inside := func(q string) bool { return strings.HasPrefix(q, s.cfg.Root+string(filepath.Separator)) }
	if !inside(c) {
		return "", status.Errorf(codes.InvalidArgument, "%s: %s %q is outside %s, the only place this driver stages and publishes volumes", op, what, p, s.cfg.Root)
	}
	// The path itself must be no link: mkdir, open and mount follow
	// one, even one that leads nowhere yet.
	if fi, err := os.Lstat(c); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		return "", status.Errorf(codes.InvalidArgument, "%s: %s %q is a symbolic link", op, what, p)
	}
	// The deepest existing ancestor, with its links resolved, must be
	// inside too (the root itself may be a link).
	root, err := filepath.EvalSymlinks(s.cfg.Root)
	if err != nil {
		root = s.cfg.Root
	}
	for q := filepath.Dir(c); len(q) > len(s.cfg.Root); q = filepath.Dir(q) {
		r, err := filepath.EvalSymlinks(q)
		if err != nil {
			continue
		}
		if r != root && !strings.HasPrefix(r, root+string(filepath.Separator)) {
			return "", status.Errorf(codes.InvalidArgument, "%s: %s %q leads outside %s through a symbolic link", op, what, p, s.cfg.Root)
		}
		break
	}
	return c, nil
}

func (s *nodeServer) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: s.nodeID}, nil
}

func (s *nodeServer) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (s *nodeServer) NodeStageVolume(ctx context.Context, r *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	const op = "stage volume"
	id := r.GetVolumeId()
	if err := checkVolumeID(op, id); err != nil {
		return nil, err
	}
	staging, err := s.underRoot(op, "staging target path", r.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	vc := r.GetVolumeCapability()
	if err := checkCap(op, id, vc); err != nil {
		return nil, err
	}
	unlock := s.lock(id)
	defer unlock()

	export := r.GetPublishContext()["export"]
	if export == "" {
		export = id
	}
	want := &volumeState{Export: export, Staging: staging, Block: vc.GetBlock() != nil,
		Single: vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER}
	if !want.Block {
		want.FsType = vc.GetMount().GetFsType()
		if want.FsType == "" {
			want.FsType = "ext4"
		}
	}
	st, err := s.readState(id)
	if err != nil {
		return nil, err
	}
	if st != nil && (st.Staging != want.Staging || st.Block != want.Block || st.FsType != want.FsType) {
		return nil, status.Errorf(codes.FailedPrecondition, "%s %s: already staged at %s (block %t, filesystem %q)", op, id, st.Staging, st.Block, st.FsType)
	}
	dir := s.volDir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
	}
	fresh := st == nil
	if fresh {
		st = want
		if err := s.writeState(id, st); err != nil {
			return nil, err
		}
	}
	dev, err := s.cfg.Attacher.Attach(ctx, st.Export, dir)
	if err != nil {
		if fresh {
			s.undoStage(id)
		}
		return nil, attachError(op, id, err)
	}
	if !st.Block {
		if err := s.mountStaging(ctx, dev, st, vc.GetMount().GetMountFlags()); err != nil {
			if fresh {
				s.undoStage(id)
			}
			return nil, err
		}
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// undoStage takes back a stage that failed half way.
func (s *nodeServer) undoStage(id string) {
	ctx := context.Background()
	if err := s.cfg.Attacher.Detach(ctx, s.volDir(id)); err == nil {
		os.RemoveAll(s.volDir(id))
	}
}

// attachError makes an Attacher's error a CSI one: an export the agent
// does not know is NotFound (the volume is gone, or not published to
// this node), anything else Internal.
func attachError(op, id string, err error) error {
	if errors.Is(err, ErrNoExport) {
		return status.Errorf(codes.NotFound, "%s %s: %v", op, id, err)
	}
	if st, ok := status.FromError(err); ok {
		return st.Err()
	}
	return status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
}

// mountStaging puts a filesystem on dev if it has none, and mounts it at
// the staging path (once).
func (s *nodeServer) mountStaging(ctx context.Context, dev string, st *volumeState, flags []string) error {
	const op = "stage volume"
	if src, ok, err := mountedAt(st.Staging); err != nil {
		return status.Errorf(codes.Internal, "%s: %v", op, err)
	} else if ok {
		if src != dev {
			return status.Errorf(codes.FailedPrecondition, "%s: %s has %s mounted, not %s", op, st.Staging, src, dev)
		}
		return nil
	}
	have, err := fsTypeOf(ctx, dev)
	if err != nil {
		return status.Errorf(codes.Internal, "%s: %v", op, err)
	}
	switch {
	case have == "":
		if err := mkfs(ctx, st.FsType, dev); err != nil {
			return status.Errorf(codes.Internal, "%s: %v", op, err)
		}
	case have != st.FsType:
		return status.Errorf(codes.FailedPrecondition, "%s: %s holds a %s filesystem, not %s", op, dev, have, st.FsType)
	}
	if err := os.MkdirAll(st.Staging, 0o750); err != nil {
		return status.Errorf(codes.Internal, "%s: %v", op, err)
	}
	args := []string{"-t", st.FsType}
	if st.FsType == "xfs" {
		// A clone carries its source's filesystem UUID, which XFS
		// refuses to mount twice on one host.
		flags = append(slices.Clone(flags), "nouuid")
	}
	if len(flags) > 0 {
		args = append(args, "-o", strings.Join(flags, ","))
	}
	if err := run(ctx, "mount", append(args, dev, st.Staging)...); err != nil {
		return status.Errorf(codes.Internal, "%s: %v", op, err)
	}
	return nil
}

func (s *nodeServer) NodeUnstageVolume(ctx context.Context, r *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	const op = "unstage volume"
	id := r.GetVolumeId()
	if err := checkVolumeID(op, id); err != nil {
		return nil, err
	}
	staging, err := s.underRoot(op, "staging target path", r.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	unlock := s.lock(id)
	defer unlock()
	st, err := s.readState(id)
	if err != nil {
		return nil, err
	}
	if st != nil && st.Staging != staging {
		// Unmounting the path named would take away whatever is
		// there (another volume's staging mount), and leave ours.
		return nil, status.Errorf(codes.InvalidArgument, "%s %s: staged at %s, not %s", op, id, st.Staging, staging)
	}
	if st != nil && len(st.Targets) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "%s %s: still published at %s", op, id, strings.Join(st.Targets, ", "))
	}
	if err := unmountAll(ctx, staging); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
	}
	if err := s.cfg.Attacher.Detach(ctx, s.volDir(id)); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
	}
	if err := os.RemoveAll(s.volDir(id)); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

func (s *nodeServer) NodePublishVolume(ctx context.Context, r *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	const op = "publish volume"
	id := r.GetVolumeId()
	if err := checkVolumeID(op, id); err != nil {
		return nil, err
	}
	if r.GetStagingTargetPath() == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s %s: no staging target path (this driver stages every volume)", op, id)
	}
	target, err := s.underRoot(op, "target path", r.GetTargetPath())
	if err != nil {
		return nil, err
	}
	vc := r.GetVolumeCapability()
	if err := checkCap(op, id, vc); err != nil {
		return nil, err
	}
	unlock := s.lock(id)
	defer unlock()
	st, err := s.readState(id)
	if err != nil {
		return nil, err
	}
	if st == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "%s %s: not staged on this node", op, id)
	}
	if st.Block != (vc.GetBlock() != nil) {
		return nil, status.Errorf(codes.InvalidArgument, "%s %s: staged with block access %t, published with %t", op, id, st.Block, vc.GetBlock() != nil)
	}
	if fs := vc.GetMount().GetFsType(); !st.Block && fs != "" && fs != st.FsType {
		return nil, status.Errorf(codes.InvalidArgument, "%s %s: staged with a %s filesystem, published asking for %s", op, id, st.FsType, fs)
	}
	ro := r.GetReadonly() || vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY ||
		vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
	if _, ok, err := mountedAt(target); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
	} else if ok && slices.Contains(st.Targets, target) {
		// Done before; with the same read-only flag, or the spec's
		// AlreadyExists.
		if was, err := mountedReadOnly(target); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
		} else if was != ro {
			return nil, status.Errorf(codes.AlreadyExists, "%s %s: already published at %s with read-only %t", op, id, target, was)
		}
		return &csi.NodePublishVolumeResponse{}, nil
	} else if ok {
		return nil, status.Errorf(codes.FailedPrecondition, "%s %s: something else is mounted at %s", op, id, target)
	}
	if single := st.Single || vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER; single {
		if other := slices.DeleteFunc(slices.Clone(st.Targets), func(t string) bool { return t == target }); len(other) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "%s %s: single-writer volume already published at %s", op, id, strings.Join(other, ", "))
		}
	}
	var src string
	if st.Block {
		dev, ok, err := s.cfg.Attacher.Device(s.volDir(id))
		if err != nil || !ok {
			return nil, status.Errorf(codes.FailedPrecondition, "%s %s: its block device is gone (unstage and stage it again): %v", op, id, err)
		}
		src = dev
		if ro {
			// A read-only bind mount of a device node still lets
			// writes through to the device: the target gets a
			// device that refuses them.
			roDev, err := s.readOnlyLoop(ctx, id, st, target, dev)
			if err != nil {
				return nil, err
			}
			src = roDev
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: make the target file: %v", op, id, err)
		}
		f.Close()
	} else {
		if _, ok, err := mountedAt(st.Staging); err != nil || !ok {
			return nil, status.Errorf(codes.FailedPrecondition, "%s %s: nothing mounted at its staging path %s", op, id, st.Staging)
		}
		src = st.Staging
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
		}
	}
	if err := bindMount(src, target, ro); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, errors.Join(err, s.dropReadOnlyLoop(ctx, id, st, target)))
	}
	st.Targets = append(st.Targets, target)
	if err := s.writeState(id, st); err != nil {
		// Take it all back: the mount, and a read-only loop device
		// made for it (its state was written before; the write may
		// fail again, and then a retry finds and reuses the device).
		st.Targets = st.Targets[:len(st.Targets)-1]
		if uerr := unmountAll(ctx, target); uerr != nil {
			return nil, status.Errorf(codes.Internal, "%v; and %s stays mounted: %v", err, target, uerr)
		}
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, errors.Join(err, s.dropReadOnlyLoop(ctx, id, st, target)))
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (s *nodeServer) NodeUnpublishVolume(ctx context.Context, r *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	const op = "unpublish volume"
	id := r.GetVolumeId()
	if err := checkVolumeID(op, id); err != nil {
		return nil, err
	}
	target, err := s.underRoot(op, "target path", r.GetTargetPath())
	if err != nil {
		return nil, err
	}
	unlock := s.lock(id)
	defer unlock()
	if err := unmountAll(ctx, target); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "%s %s: remove %s: %v", op, id, target, err)
	}
	st, err := s.readState(id)
	if err != nil {
		return nil, err
	}
	if st != nil && slices.Contains(st.Targets, target) {
		st.Targets = slices.DeleteFunc(st.Targets, func(t string) bool { return t == target })
		if err := s.writeState(id, st); err != nil {
			return nil, err
		}
	}
	if st != nil {
		if err := s.dropReadOnlyLoop(ctx, id, st, target); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
		}
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// readOnlyLoop makes a read-only loop device over dev for target, and
// keeps it in the volume's state, which it writes.
func (s *nodeServer) readOnlyLoop(ctx context.Context, id string, st *volumeState, target, dev string) (string, error) {
	if ro := st.ReadOnlyLoops[target]; ro != "" && backing(ro) == dev {
		return ro, nil // a publish that failed after making it
	}
	out, err := exec.CommandContext(ctx, "losetup", "--find", "--show", "--read-only", dev).CombinedOutput()
	if err != nil {
		return "", status.Errorf(codes.Internal, "publish volume %s read-only: losetup %s: %v: %s", id, dev, err, strings.TrimSpace(string(out)))
	}
	ro := strings.TrimSpace(string(out))
	if st.ReadOnlyLoops == nil {
		st.ReadOnlyLoops = map[string]string{}
	}
	st.ReadOnlyLoops[target] = ro
	if err := s.writeState(id, st); err != nil {
		return "", errors.Join(err, detachLoop(ctx, ro, dev))
	}
	return ro, nil
}

// dropReadOnlyLoop takes away target's read-only loop device, if it has
// one, and writes the volume's state.
func (s *nodeServer) dropReadOnlyLoop(ctx context.Context, id string, st *volumeState, target string) error {
	ro, ok := st.ReadOnlyLoops[target]
	if !ok {
		return nil
	}
	dev, _, _ := s.cfg.Attacher.Device(s.volDir(id))
	if err := detachLoop(ctx, ro, dev); err != nil {
		return err
	}
	delete(st.ReadOnlyLoops, target)
	return s.writeState(id, st)
}

// detachLoop detaches loop device ro if it still reads dev.
func detachLoop(ctx context.Context, ro, dev string) error {
	if dev == "" || backing(ro) != dev {
		return nil // gone already, or reused for something else
	}
	if out, err := exec.CommandContext(ctx, "losetup", "--detach", ro).CombinedOutput(); err != nil {
		return fmt.Errorf("losetup --detach %s: %w: %s", ro, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// published finds the staged volume id at path p (a target or its
// staging path): NotFound if it is not there.
func (s *nodeServer) stagedAt(op, id, p string) (*volumeState, error) {
	if err := checkVolumeID(op, id); err != nil {
		return nil, err
	}
	if p == "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s %s: no volume path", op, id)
	}
	st, err := s.readState(id)
	if err != nil {
		return nil, err
	}
	c := filepath.Clean(p)
	if st == nil || c != st.Staging && !slices.Contains(st.Targets, c) {
		return nil, status.Errorf(codes.NotFound, "%s: volume %s is not at %s on this node", op, id, p)
	}
	return st, nil
}

func (s *nodeServer) NodeGetVolumeStats(ctx context.Context, r *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	const op = "volume stats"
	st, err := s.stagedAt(op, r.GetVolumeId(), r.GetVolumePath())
	if err != nil {
		return nil, err
	}
	p := filepath.Clean(r.GetVolumePath())
	if st.Block {
		dev, ok, err := s.cfg.Attacher.Device(s.volDir(r.GetVolumeId()))
		if err != nil || !ok {
			return nil, status.Errorf(codes.NotFound, "%s: volume %s has no block device: %v", op, r.GetVolumeId(), err)
		}
		n, err := deviceSize(dev)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%s: %v", op, err)
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: int64(n)}}}, nil
	}
	var fsst unix.Statfs_t
	if err := unix.Statfs(p, &fsst); err != nil {
		return nil, status.Errorf(codes.NotFound, "%s: %s: %v", op, p, err)
	}
	bs := fsst.Bsize
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(fsst.Blocks) * bs, Available: int64(fsst.Bavail) * bs, Used: int64(fsst.Blocks-fsst.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(fsst.Files), Available: int64(fsst.Ffree), Used: int64(fsst.Files - fsst.Ffree)},
	}}, nil
}

func (s *nodeServer) NodeGetVolumeHealth(ctx context.Context, r *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	const op = "volume health"
	// The paths are optional here: without one, the volume need only be
	// staged on this node.
	p := r.GetVolumePublishPath()
	if p == "" {
		p = r.GetStagingTargetPath()
	}
	if p != "" {
		if _, err := s.stagedAt(op, r.GetVolumeId(), p); err != nil {
			return nil, err
		}
	} else if err := checkVolumeID(op, r.GetVolumeId()); err != nil {
		return nil, err
	} else if st, err := s.readState(r.GetVolumeId()); err != nil {
		return nil, err
	} else if st == nil {
		return nil, status.Errorf(codes.NotFound, "%s: volume %s is not staged on this node", op, r.GetVolumeId())
	}
	h := &csi.VolumeHealth{VolumeId: r.GetVolumeId()}
	if _, ok, err := s.cfg.Attacher.Device(s.volDir(r.GetVolumeId())); err != nil || !ok {
		msg := "its block device is gone (the process serving it ended)"
		if err != nil {
			msg = err.Error()
		}
		h.HealthStatuses = []*csi.VolumeHealth_VolumeHealthEntry{{Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: "DeviceGone", Message: msg}}
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
}

func (s *nodeServer) NodeExpandVolume(ctx context.Context, r *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	const op = "expand volume"
	id := r.GetVolumeId()
	if err := checkVolumeID(op, id); err != nil {
		return nil, err
	}
	// The state is read under the lock: an unstage or publish running
	// now changes it.
	unlock := s.lock(id)
	defer unlock()
	st, err := s.stagedAt(op, id, r.GetVolumePath())
	if err != nil {
		return nil, err
	}
	want := uint64(max(r.GetCapacityRange().GetRequiredBytes(), 0))
	n, err := s.cfg.Attacher.Grow(ctx, s.volDir(id), want)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
	}
	for _, ro := range st.ReadOnlyLoops {
		if out, err := exec.CommandContext(ctx, "losetup", "--set-capacity", ro).CombinedOutput(); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: losetup --set-capacity %s: %v: %s", op, id, ro, err, strings.TrimSpace(string(out)))
		}
	}
	if !st.Block {
		dev, _, err := s.cfg.Attacher.Device(s.volDir(id))
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
		}
		if err := growFS(ctx, st.FsType, dev, st.Staging); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, id, err)
		}
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: int64(n)}, nil
}

// Mounting, by the system's tools: they know every filesystem's options.

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// fsTypeOf is the filesystem on dev, "" if blkid finds none.
func fsTypeOf(ctx context.Context, dev string) (string, error) {
	out, err := exec.CommandContext(ctx, "blkid", "-p", "-s", "TYPE", "-o", "value", dev).Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 2 {
		return "", nil // nothing found
	}
	if err != nil {
		return "", fmt.Errorf("blkid %s: %w", dev, err)
	}
	return strings.TrimSpace(string(out)), nil
}

func mkfs(ctx context.Context, fsType, dev string) error {
	switch fsType {
	case "ext4":
		// No discard pass: a new disk reads zeroes already.
		return run(ctx, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
	case "xfs":
		return run(ctx, "mkfs.xfs", "-q", "-K", dev)
	}
	return fmt.Errorf("mkfs: filesystem %q: %w", fsType, errors.ErrUnsupported)
}

func growFS(ctx context.Context, fsType, dev, mnt string) error {
	switch fsType {
	case "ext4":
		return run(ctx, "resize2fs", dev)
	case "xfs":
		return run(ctx, "xfs_growfs", mnt)
	}
	return fmt.Errorf("grow: filesystem %q: %w", fsType, errors.ErrUnsupported)
}

func bindMount(src, target string, ro bool) error {
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s at %s: %w", src, target, err)
	}
	if ro {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return errors.Join(fmt.Errorf("make %s read-only: %w", target, err), unix.Unmount(target, 0))
		}
	}
	return nil
}

// unmountAll unmounts everything stacked at p.
func unmountAll(ctx context.Context, p string) error {
	for range 8 {
		_, ok, err := mountedAt(p)
		if err != nil || !ok {
			return err
		}
		if err := unix.Unmount(p, 0); err != nil {
			return fmt.Errorf("unmount %s: %w", p, err)
		}
	}
	return fmt.Errorf("unmount %s: still mounted after 8 unmounts", p)
}

// mountedAt says whether something is mounted at p, and what (the
// mount's source as /proc/self/mountinfo gives it).
func mountedAt(p string) (src string, ok bool, err error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", false, err
	}
	p = filepath.Clean(p)
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
		if len(f) < 10 || unescapeMount(f[4]) != p {
			continue
		}
		i := slices.Index(f, "-")
		if i < 0 || i+2 >= len(f) {
			continue
		}
		src, ok = unescapeMount(f[i+2]), true
	}
	return src, ok, nil
}

// mountedReadOnly says whether the mount on top at p is read-only.
func mountedReadOnly(p string) (bool, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	p = filepath.Clean(p)
	ro, found := false, false
	for line := range strings.SplitSeq(string(b), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ...: the last line
		// for p is the mount on top.
		if f := strings.Fields(line); len(f) > 5 && unescapeMount(f[4]) == p {
			ro, found = slices.Contains(strings.Split(f[5], ","), "ro"), true
		}
	}
	if !found {
		return false, fmt.Errorf("nothing mounted at %s", p)
	}
	return ro, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			ok := true
			for _, d := range s[i+1 : i+4] {
				if d < '0' || d > '7' {
					ok = false
					break
				}
				c = c*8 + byte(d-'0')
			}
			if ok {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// deviceSize is a block device's size in bytes.
func deviceSize(dev string) (uint64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	return n, nil
}
