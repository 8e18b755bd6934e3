package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	pb "segmap/api/segmapv1"
	"segmap/internal/admin"
	"segmap/internal/agent"
	"segmap/internal/controller"
	"segmap/internal/local"
	"segmap/internal/meta"
	"segmap/internal/nbd"
	"segmap/internal/remote"
	"segmap/internal/tlsconf"
)

// newController is `segmap controller`: the controller alone, serving
// the admin API and the mapping protocol to remote agents.
func newController() *cobra.Command {
	var addr, data string
	var lease time.Duration
	tf := &tlsFlags{}
	cmd := &cobra.Command{
		Use:   "controller --listen ADDR --data DIR",
		Short: "run a controller: metadata (bbolt in DIR), the admin API and the agents' mapping protocol on ADDR",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
			// The controller's certificate serves the admin API and the
			// agents, and reaches storage nodes to open and format nbd://
			// containers.
			m, err := tf.identity(tlsconf.RoleController, tf.name, true)
			if err != nil {
				return err
			}
			creds := serverCreds(m, tlsconf.RoleController, tlsconf.RoleAgent, tlsconf.RoleAdmin)
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			if err := os.MkdirAll(data, 0o700); err != nil {
				return err
			}
			l, err := listen(addr)
			if err != nil {
				return fmt.Errorf("listen: %w", err)
			}
			defer l.Close()
			st, err := meta.OpenBolt(filepath.Join(data, "meta.db"))
			if err != nil {
				return err
			}
			defer st.Close()
			ctrl := controller.New(controller.Config{Store: st, OpenContainer: local.ContainerOpener(m), Logger: logger})
			defer ctrl.Close()
			epoch, err := ctrl.NewEpoch(ctx)
			if err != nil {
				return err
			}
			// Agents of an earlier controller may still hold leases:
			// change nothing until those have run out.
			ctrl.Hold(time.Now().Add(lease))
			gs := grpc.NewServer(append(remote.ServerOptions(), grpc.Creds(creds))...)
			pb.RegisterAdminServer(gs, admin.New(admin.Config{
				Ctrl: ctrl, Version: version,
				CreateContainer: func(ctx context.Context, uri string, slotSize, slots uint64) error {
					id, err := ctrl.NextContainerID(ctx)
					if err != nil {
						return err
					}
					return local.CreateContainerTLS(ctx, m, uri, id, slotSize, slots)
				},
			}))
			ms := remote.NewServer(remote.ServerConfig{Ctrl: ctrl, Epoch: epoch, Lease: lease, Logger: logger})
			pb.RegisterMappingServer(gs, ms)
			errc := make(chan error, 1)
			go func() { errc <- gs.Serve(l) }()
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "segmap %s controller, epoch %d\n", version, epoch)
			fmt.Fprintf(w, "  data:     %s\n", data)
			fmt.Fprintf(w, "  admin API on %s (and the mapping protocol for agents)\n", l.Addr())
			fmt.Fprintln(w, "ready")
			select {
			case <-ctx.Done():
			case err = <-errc:
			}
			ms.Close()
			gs.GracefulStop()
			fmt.Fprintln(w, "stopped")
			if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				return err
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "listen", "127.0.0.1:10810", "address of the admin API and the mapping protocol")
	cmd.Flags().StringVar(&data, "data", "./segmap-controller", "data directory (bbolt metadata)")
	cmd.Flags().DurationVar(&lease, "lease", remote.DefaultLease, "agents' lease: how long an agent that cannot renew keeps serving before it fences itself")
	tf.add(cmd, "controller", false)
	return cmd
}

// newAgent is `segmap agent`: a mapping agent serving NBD to hosts.
func newAgent() *cobra.Command {
	var ctrlAddr, name, nbdListen string
	var nbdTLS bool
	tf := &tlsFlags{serverName: "controller"}
	cmd := &cobra.Command{
		Use:   "agent --controller ADDR --name HOST --nbd-listen ADDR",
		Short: "run a mapping agent: serves the controller's disks over NBD, doing the I/O straight to the containers",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" {
				return usageError{fmt.Errorf("--name is required (the host's name, unique among agents)")}
			}
			logger := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("agent", name)
			// The agent's certificate reaches the controller and the
			// storage nodes of nbd:// containers.
			m, err := tf.identity(tlsconf.RoleAgent, name, true)
			if err != nil {
				return err
			}
			creds := tf.clientCreds(m)
			if nbdTLS && m == nil {
				return usageError{fmt.Errorf("--nbd-tls needs --certs")}
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			l, err := listen(nbdListen)
			if err != nil {
				return fmt.Errorf("NBD listener: %w", err)
			}
			defer l.Close()
			conn, err := grpc.NewClient(ctrlAddr, append(remote.DialOptions(), grpc.WithTransportCredentials(creds))...)
			if err != nil {
				return fmt.Errorf("controller %s: %w", ctrlAddr, err)
			}
			defer conn.Close()
			client := remote.NewClient(conn, logger)
			a := agent.New(agent.Config{Name: name, Controller: client, OpenContainer: local.ContainerOpener(m)})
			runCtx, cancelRun := context.WithCancel(ctx)
			ran := make(chan struct{})
			first := make(chan struct{})
			var once sync.Once
			go func() {
				remote.RunAgent(runCtx, a, client, logger, func() { once.Do(func() { close(first) }) })
				close(ran)
			}()
			// Serve hosts once attached: before that every export would
			// only wait.
			select {
			case <-first:
			case <-ctx.Done():
			}

			ncfg := nbd.Config{Backend: local.NBDBackend(client, a), Errno: local.Errno, Logger: logger}
			if nbdTLS {
				// Hosts must upgrade with STARTTLS and present a
				// certificate of the cluster CA.
				ncfg.TLS, ncfg.TLSRequired = m.Server(), true
			}
			ns := nbd.NewServer(ncfg)
			errc := make(chan error, 1)
			go func() { errc <- ns.Serve(l) }()
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "segmap %s agent %q, controller %s\n", version, name, ctrlAddr)
			fmt.Fprintf(w, "  NBD on %s\n", l.Addr())
			fmt.Fprintln(w, "ready")
			select {
			case <-ctx.Done():
			case err = <-errc:
			}
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			ns.Shutdown(sctx)
			cancelRun()
			<-ran
			if cerr := a.Close(); cerr != nil {
				logger.Warn("close", "err", cerr)
			}
			fmt.Fprintln(w, "stopped")
			if err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				return err
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&ctrlAddr, "controller", "127.0.0.1:10810", "the controller's address")
	cmd.Flags().StringVar(&name, "name", "", "this agent's (host's) name")
	cmd.Flags().StringVar(&nbdListen, "nbd-listen", "127.0.0.1:10809", "address hosts connect to over NBD")
	cmd.Flags().BoolVar(&nbdTLS, "nbd-tls", false, "require TLS (NBD STARTTLS) from hosts, with a certificate of the cluster CA")
	tf.add(cmd, "", false)
	cmd.Flags().StringVar(&tf.serverName, "controller-name", "controller", "the controller's certificate name")
	return cmd
}
