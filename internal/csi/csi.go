// Package csi is segmap's Container Storage Interface driver: it lets
// Kubernetes (or any CSI orchestrator) create, publish, stage, snapshot,
// clone and grow segmap disks.
//
// The driver holds no state of its own that a restart could lose. The
// controller side is a thin translation onto the admin API of the segmap
// controller: a volume is a writable disk, a snapshot a read-only one, a
// clone a writable snapshot, a group snapshot one consistency-group
// snapshot of several disks. The node side turns the disk, served by the
// host's mapping agent over NBD, into a block device (see Attacher), and
// mounts it.
//
// # Names
//
// A CSI name is free text chosen by the orchestrator (Kubernetes uses
// "pvc-UUID", "snapshot-UUID", "groupsnapshot-UUID"); idempotency is by
// name. The driver derives the disk's name from it, so a retried create
// finds what the first made without a lookup table:
//
//	volume          csi-vol-NAME         (or csi-vol-H, H a hash of NAME)
//	snapshot        csi-snap-NAME        (or csi-snap-H)
//	group snapshot  csi-grp-G            G a hash of the group's name;
//	  its members   csi-grp-G-V          V a hash of the source volume id
//
// NAME is used as is when the result is a valid disk name; a longer or
// stranger NAME is hashed (SHA-256, hex). The volume id and the snapshot
// id handed back are the disk names, so any existing segmap disk can be
// given to Kubernetes as a static volume by its name.
//
// # Access
//
// A volume the driver creates may be mapped by no agent until
// ControllerPublishVolume grants it to the node's agent (the node id is
// the agent's name); ControllerUnpublishVolume revokes it, and the agent
// forgets the disk first. So a single-node volume is never mapped by two
// hosts at once, which a filesystem on it could not survive.
package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
)

// DriverName is the name the driver registers under; the CSIDriver
// object, the StorageClass provisioner and the snapshot classes use it.
const DriverName = "csi.segmap.io"

// Mode says which CSI services a driver serves.
type Mode int

// The modes: a controller plugin (one per cluster), a node plugin (one
// per host) or both in one process.
const (
	ModeAll Mode = iota
	ModeController
	ModeNode
)

func (m Mode) String() string {
	switch m {
	case ModeAll:
		return "all"
	case ModeController:
		return "controller"
	case ModeNode:
		return "node"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode reads a mode's name.
func ParseMode(s string) (Mode, error) {
	for _, m := range []Mode{ModeAll, ModeController, ModeNode} {
		if s == m.String() {
			return m, nil
		}
	}
	return 0, fmt.Errorf("mode %q: %w (controller, node or all)", s, ErrBadMode)
}

// Config configures a Driver.
type Config struct {
	// Admin is the segmap controller's admin API (not needed by the
	// node service alone).
	Admin pb.AdminClient
	// Mode says which services to serve.
	Mode Mode
	// NodeID is this host's name: the name of the segmap agent on it.
	// The node service needs it.
	NodeID string
	// Version is reported by GetPluginInfo.
	Version string
	// Node configures the node service (Mode ModeNode or ModeAll).
	Node NodeConfig
	// Logger logs every request that fails, and the node's steps.
	Logger *slog.Logger
}

// Driver serves the CSI services over gRPC.
type Driver struct {
	cfg  Config
	node *nodeServer
}

// New checks cfg and makes a driver.
func New(cfg Config) (*Driver, error) {
	if cfg.Admin == nil && cfg.Mode != ModeNode {
		return nil, fmt.Errorf("csi: the controller service needs an admin client: %w", ErrConfig)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	d := &Driver{cfg: cfg}
	if cfg.Mode != ModeController {
		if cfg.NodeID == "" {
			return nil, fmt.Errorf("csi: the node service needs a node id: %w", ErrConfig)
		}
		n, err := newNodeServer(cfg)
		if err != nil {
			return nil, err
		}
		d.node = n
	}
	return d, nil
}

// Register adds the driver's services to s.
func (d *Driver) Register(s *grpc.Server) {
	csi.RegisterIdentityServer(s, &identityServer{d: d})
	if d.cfg.Mode != ModeNode {
		cs := &controllerServer{d: d}
		csi.RegisterControllerServer(s, cs)
		csi.RegisterGroupControllerServer(s, &groupServer{c: cs})
	}
	if d.node != nil {
		csi.RegisterNodeServer(s, d.node)
	}
}

// ServerOptions are the gRPC options the driver's server should have: a
// request logger that says what failed and why.
func (d *Driver) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(d.logCall)}
}

func (d *Driver) logCall(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	if err != nil {
		d.cfg.Logger.Info("csi call failed", "method", info.FullMethod, "code", status.Code(err).String(), "err", status.Convert(err).Message())
	} else {
		d.cfg.Logger.Debug("csi call", "method", info.FullMethod)
	}
	return resp, err
}

// The disk-name prefixes of the objects the driver makes.
const (
	volPrefix  = "csi-vol-"
	snapPrefix = "csi-snap-"
	grpPrefix  = "csi-grp-"
)

// diskName is the disk for the CSI object called name, of the kind
// prefix says: prefix+name when that is a valid disk name, else prefix
// and a hash of name.
func diskName(prefix, name string) string {
	if n := prefix + name; controller.ValidName(n) == nil {
		return n
	}
	return prefix + hash(name, 40)
}

// hash is the first n hex digits of name's SHA-256.
func hash(name string, n int) string {
	h := sha256.Sum256([]byte(name))
	return hex.EncodeToString(h[:])[:n]
}

// groupID is the id of the group snapshot called name.
func groupID(name string) string { return grpPrefix + hash(name, 24) }

// memberName is the snapshot of volume vol in group snapshot group.
func memberName(group, vol string) string { return group + "-" + hash(vol, 16) }

// isGroupID says whether id names a group snapshot (not one of its
// members).
func isGroupID(id string) bool {
	return strings.HasPrefix(id, grpPrefix) && len(id) == len(grpPrefix)+24
}

// groupOf is the group snapshot a member snapshot id belongs to, or "".
func groupOf(id string) string {
	if !strings.HasPrefix(id, grpPrefix) || len(id) != len(grpPrefix)+24+1+16 || id[len(grpPrefix)+24] != '-' {
		return ""
	}
	return id[:len(grpPrefix)+24]
}

// fromAdmin turns an admin API error into the CSI error of the same
// meaning, prefixed with what was being done.
func fromAdmin(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return status.FromContextError(err).Err()
	}
	st := status.Convert(err)
	code := st.Code()
	switch code {
	case codes.OK, codes.Unknown:
		code = codes.Internal
	}
	return status.Errorf(code, "%s: %s", fmt.Sprintf(format, args...), st.Message())
}
