// Package ctlserver builds a running controller: the one place where a
// metadata store becomes a controller that opens containers by URI, with
// the admin API over it and, for remote agents, the controller-agent
// protocol over gRPC. `segmap controller` leads with Lead; `segmap up`
// (package standalone) builds its controller with New and its admin API
// with NewAdmin, so the two modes differ only in what they add around it.
package ctlserver

import (
	"context"
	"log/slog"
	"time"

	"google.golang.org/grpc"

	pb "segmap/api/segmapv1"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/metrics"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/rpc/protocol"
	"segmap/internal/rpc/transport"
	"segmap/internal/tlsconf"
)

// Config configures the controller New builds.
type Config struct {
	// Store is the metadata store; the caller closes it after the
	// controller.
	Store meta.Store
	// TLS is the controller's identity, with which it reaches storage
	// nodes to open and format nbd:// containers; nil is plaintext.
	TLS *tlsconf.Material
	// Logger; slog.Default if nil.
	Logger *slog.Logger
	// CommandTimeout is the controller's; its default if 0.
	CommandTimeout time.Duration
	// WrapContainer, if set, wraps every container the controller opens
	// (tests use it to fail or crash the controller's copies and
	// punches).
	WrapContainer func(container.Container) container.Container
	// ControllerCopies is controller.Config's: the controller, not the
	// faulting agent, copies a shared segment for a partial write.
	ControllerCopies bool
	// SyncMaps is controller.Config's: every map change is committed
	// before the fault is answered.
	SyncMaps bool
	// DrainMoves is controller.Config's.
	DrainMoves int
	// PreflushRounds is controller.Config's.
	PreflushRounds int
	// StorageTimeout is how long the controller's I/O to an nbd://
	// container waits for its storage node to come back before it
	// fails, and the container is marked failed (container.NBDOptions'
	// FailTimeout; its default if 0).
	StorageTimeout time.Duration
	// ReplicaTimeout is controller.Config.ReplicaTimeout.
	ReplicaTimeout time.Duration
	// Metrics is controller.Config.Metrics.
	Metrics *metrics.Controller
	// FillBreakAfter is controller.Config.FillBreakAfter.
	FillBreakAfter time.Duration
}

// New returns a controller over cfg.Store that opens containers by URI
// as the holder of cfg.TLS.
func New(cfg Config) *controller.Controller {
	open := container.URIOpener(cfg.TLS, container.NBDOptions{Logger: cfg.Logger, FailTimeout: cfg.StorageTimeout})
	openReplica := container.URIOpener(cfg.TLS, container.NBDOptions{Logger: cfg.Logger, FailTimeout: container.ReplicaFailTimeout(cfg.ReplicaTimeout)})
	if wrap := cfg.WrapContainer; wrap != nil {
		wrapped := func(plain func(protocol.Container) (container.Container, error)) func(protocol.Container) (container.Container, error) {
			return func(info protocol.Container) (container.Container, error) {
				ct, err := plain(info)
				if err != nil {
					return nil, err
				}
				return wrap(ct), nil
			}
		}
		open, openReplica = wrapped(open), wrapped(openReplica)
	}
	return controller.New(controller.Config{Store: cfg.Store, OpenContainer: open, OpenReplica: openReplica, Logger: cfg.Logger, CommandTimeout: cfg.CommandTimeout, ControllerCopies: cfg.ControllerCopies, SyncMaps: cfg.SyncMaps, DrainMoves: cfg.DrainMoves, PreflushRounds: cfg.PreflushRounds, ReplicaTimeout: cfg.ReplicaTimeout, Metrics: cfg.Metrics, FillBreakAfter: cfg.FillBreakAfter})
}

// NewAdmin returns the admin API of ctrl. cfg.Ctrl and cfg.CreateContainer
// are set here: 'segmap container add --slots' makes the container at the
// URI, as the holder of m (nil: plaintext), with the next container id.
func NewAdmin(ctrl *controller.Controller, m *tlsconf.Material, cfg adminapi.Config) *adminapi.Server {
	cfg.Ctrl = ctrl
	cfg.CreateContainer = func(ctx context.Context, uri string, slotSize, slots uint64, force bool) error {
		id, err := ctrl.NextContainerID(ctx)
		if err != nil {
			return err
		}
		return container.CreateURI(ctx, m, uri, id, slotSize, slots, force)
	}
	cfg.CreateReplica = func(ctx context.Context, uri string, id uint32, slotSize, slots uint64, force bool) error {
		return container.CreateURI(ctx, m, uri, id, slotSize, slots, force)
	}
	return adminapi.New(cfg)
}

// LeadConfig configures Lead.
type LeadConfig struct {
	Config
	// Lease is the agents' lease (the transport's default if 0 for the
	// agents; no hold if 0): the leader changes nothing until an earlier
	// controller's agents have let theirs run out.
	Lease time.Duration
	// Version is reported by the admin API's Status.
	Version string
	// ServerOptions are the gRPC server's (credentials, limits).
	ServerOptions []grpc.ServerOption
}

// Leader is a controller that leads: it serves the admin API and the
// controller-agent protocol on Server, which the caller serves on its
// listener and stops before Close.
type Leader struct {
	Ctrl   *controller.Controller
	Server *grpc.Server
	// Epoch is the leader's: larger than any earlier controller's on the
	// same store.
	Epoch uint64

	agents *transport.Server
	// stopWatch stops Watch.
	stopWatch func()
}

// ProbeEvery is how often Watch probes the containers.
const ProbeEvery = time.Second

// Watch runs ctrl.ProbeContainers every ProbeEvery (a round that waits
// for unreachable storage delays the next) until stop is called, which
// waits for the round under way. A container whose storage fails is then
// marked failed.
func Watch(ctrl *controller.Controller) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(ProbeEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			ctrl.ProbeContainers(ctx)
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// Lead starts a controller over cfg.Store as the leader: it takes a new
// epoch, holds every change until the leases of an earlier controller's
// agents have run out, and registers the admin API and the protocol for
// remote agents on a new gRPC server.
func Lead(ctx context.Context, cfg LeadConfig) (*Leader, error) {
	ctrl := New(cfg.Config)
	epoch, err := ctrl.NewEpoch(ctx)
	if err != nil {
		ctrl.Close()
		return nil, err
	}
	// No import runs yet: the hidden disks of those an earlier
	// controller left go (no agent maps them).
	ctrl.SweepImports(ctx)
	// Agents of an earlier controller may still hold leases: change
	// nothing until those have run out.
	if err := ctrl.Hold(cfg.Lease); err != nil {
		ctrl.Close()
		return nil, err
	}
	// Drains an earlier controller left under way go on (they wait
	// for the hold like any change).
	ctrl.ResumeDrains(ctx)
	gs := grpc.NewServer(cfg.ServerOptions...)
	pb.RegisterAdminServer(gs, NewAdmin(ctrl, cfg.TLS, adminapi.Config{Version: cfg.Version}))
	ms := transport.NewServer(transport.ServerConfig{Ctrl: ctrl, Epoch: epoch, Lease: cfg.Lease, Logger: cfg.Logger})
	pb.RegisterMappingServer(gs, ms)
	// Storage that fails marks its container failed.
	return &Leader{Ctrl: ctrl, Server: gs, Epoch: epoch, agents: ms, stopWatch: Watch(ctrl)}, nil
}

// Close stops serving remote agents and closes the controller (not the
// store). The caller stops Server first or after, as it needs.
func (l *Leader) Close() {
	l.stopWatch()
	l.agents.Close()
	l.Ctrl.Close()
}
