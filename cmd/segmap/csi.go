package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	pb "segmap/api/segmapv1"
	"segmap/internal/csi"
	"segmap/internal/listen"
)

// newCSI is 'segmap csi': the Kubernetes CSI driver (package csi), one
// process per cluster as the controller plugin and one per host as the
// node plugin, or both in one.
func newCSI(g *globals) *cobra.Command {
	var (
		endpoint, nodeID, mode, nbdAddr, stateDir, kubeletDir string
	)
	cmd := &cobra.Command{
		Use:   "csi",
		Short: "run the CSI driver (" + csi.DriverName + ") for Kubernetes",
		Long: `Run segmap's Container Storage Interface driver, ` + csi.DriverName + `.

The controller plugin (--mode controller) turns CSI calls into calls of the
segmap controller's admin API (--controller, --certs): volumes are disks,
snapshots read-only disks, clones writable snapshots, group snapshots one
consistency-group snapshot. The node plugin (--mode node) runs on every host
next to its segmap agent (--node-id is the agent's name): it makes a volume a
block device (a FUSE file served from the agent over NBD, and a loop device
over it), puts a filesystem on it and mounts it. See docs/kubernetes.md.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := csi.ParseMode(mode)
			if err != nil {
				return usageError{fmt.Errorf("--mode: %w", err)}
			}
			sock, ok := strings.CutPrefix(endpoint, "unix://")
			if !ok {
				sock, ok = strings.CutPrefix(endpoint, "unix:")
			}
			if !ok || !strings.HasPrefix(sock, "/") {
				return usageError{fmt.Errorf("--endpoint %q: want unix:///ABSOLUTE/PATH (CSI plugins listen on a Unix socket)", endpoint)}
			}
			if m != csi.ModeController && nodeID == "" {
				return usageError{errors.New("--node-id: the node plugin needs the name of this host's segmap agent")}
			}
			logger := newLogger(os.Stderr)
			// The node plugin never calls the admin API, so a host
			// needs no admin certificate.
			var admin pb.AdminClient
			if m != csi.ModeNode {
				g.noDeadline = true
				var done func()
				admin, _, done, err = g.dial()
				if err != nil {
					return err
				}
				defer done()
			}
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			d, err := csi.New(csi.Config{
				Admin:   admin,
				Mode:    m,
				NodeID:  nodeID,
				Version: version,
				Logger:  logger,
				Node: csi.NodeConfig{
					StateDir: stateDir,
					Root:     kubeletDir,
					Attacher: &csi.FuseLoop{NBD: nbdAddr, Exe: exe, Logger: logger},
				},
			})
			if err != nil {
				return err
			}
			l, err := listen.Listen("unix:" + sock)
			if err != nil {
				return fmt.Errorf("--endpoint: %w", err)
			}
			if err := os.Chmod(sock, 0o600); err != nil {
				l.Close()
				return err
			}
			gs := grpc.NewServer(d.ServerOptions()...)
			d.Register(gs)
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			errc := make(chan error, 1)
			go func() { errc <- gs.Serve(l) }()
			logger.Info("csi: serving", "driver", csi.DriverName, "mode", m.String(), "endpoint", "unix://"+sock, "node", nodeID)
			say := func(format string, args ...any) { fmt.Fprintf(cmd.OutOrStdout(), format+"\n", args...) }
			say("csi: %s (%s) on unix://%s", csi.DriverName, m, sock)
			say("ready")
			select {
			case <-ctx.Done():
			case err = <-errc:
			}
			// Calls in flight (a mkfs, a mount) finish, up to a bound.
			t := time.AfterFunc(30*time.Second, gs.Stop)
			gs.GracefulStop()
			t.Stop()
			say("stopped")
			if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				return err
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&endpoint, "endpoint", "unix:///csi/csi.sock", "the Unix socket to serve CSI on (unix:///PATH)")
	fl.StringVar(&nodeID, "node-id", "", "this host's node id: the name of its segmap agent (node plugin)")
	fl.StringVar(&mode, "mode", "all", "the services to serve: controller, node or all")
	fl.StringVar(&nbdAddr, "nbd", "127.0.0.1:10809", "NBD address of this host's segmap agent (node plugin)")
	fl.StringVar(&stateDir, "state-dir", "/var/lib/segmap-csi", "where the node plugin keeps what it staged (node plugin)")
	fl.StringVar(&kubeletDir, "kubelet-dir", "/var/lib/kubelet", "staging and target paths must lie under it (node plugin)")
	return cmd
}
