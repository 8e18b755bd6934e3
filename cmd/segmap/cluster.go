package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"segmap/internal/agent"
	"segmap/internal/agent/nbdexport"
	"segmap/internal/container"
	"segmap/internal/ctlserver"
	"segmap/internal/ha"
	"segmap/internal/listen"
	"segmap/internal/meta"
	"segmap/internal/metrics"
	"segmap/internal/nbd"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/rpc/transport"
	"segmap/internal/tlsconf"
)

// newController is `segmap controller`: the controller alone, serving
// the admin API and the mapping protocol to remote agents; with --etcd, one
// of several controllers sharing the metadata in etcd, of which one leads.
func newController() *cobra.Command {
	var addr, data, advertise, name string
	var deferMaps bool
	var lease, storageTimeout, replicaTimeout time.Duration
	tf := &tlsFlags{}
	ef := &etcdFlags{}
	hf := &httpFlags{}
	cmd := &cobra.Command{
		Use:   "controller --listen ADDR (--data DIR | --etcd URLS)",
		Short: "run a controller: metadata (bbolt in DIR, or etcd), the admin API and the agents' mapping protocol on ADDR",
		Long: `controller runs a segmap controller. With --data it keeps the metadata in
a bbolt file and is the only controller. With --etcd it keeps the metadata
in etcd and is one of several: they elect a leader through etcd, the
others stand by and answer every call with the leader's address (agents
and the CLI given every controller's address follow it), and when the
leader dies or loses etcd, a standby takes over after --etcd-ttl. See
docs/cluster.md.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger := newLogger(os.Stderr)
			// Bind first: a busy port is an error now, not later; and
			// one the network reaches is refused in plaintext unless
			// asked for.
			l, err := listenChecked("admin API", "--listen", addr, tf.certs != "", tf.insecure, "--insecure")
			if err != nil {
				return err
			}
			defer l.Close()
			// The controller's certificate serves the admin API and the
			// agents, and reaches storage nodes to open and format nbd://
			// containers.
			m, err := tf.identity(tlsconf.RoleController, tf.name, false)
			if err != nil {
				return err
			}
			opts := append(append(transport.ServerOptions(), adminapi.ServerOptions()...), grpc.Creds(serverCreds(m, tlsconf.RoleController, tlsconf.RoleAgent, tlsconf.RoleAdmin)))
			hf.insecure = hf.insecure || tf.insecure
			hs, err := newHTTP(hf, m, logger)
			if err != nil {
				return err
			}
			defer hs.Close()
			if err := tf.require(); err != nil {
				return err
			}
			var cli *clientv3.Client
			if ef.endpoints != "" {
				if cmd.Flags().Changed("data") {
					return usageError{fmt.Errorf("--data and --etcd: the metadata is in one or the other")}
				}
				if cli, err = ef.client(); err != nil {
					return err
				}
				defer cli.Close()
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			w := cmd.OutOrStdout()
			var outMu sync.Mutex
			say := func(format string, args ...any) {
				outMu.Lock()
				defer outMu.Unlock()
				fmt.Fprintf(w, format+"\n", args...)
			}
			cm := metrics.NewController(hs.Registry, nil)
			// lead starts the controller over st: what a leader serves.
			lead := func(ctx context.Context, st meta.Store, what string) (*grpc.Server, func(), error) {
				l, err := ctlserver.Lead(ctx, ctlserver.LeadConfig{
					Config: ctlserver.Config{Store: st, TLS: m, Logger: logger, SyncMaps: !deferMaps, StorageTimeout: storageTimeout, ReplicaTimeout: replicaTimeout, Metrics: cm},
					Lease:  lease, Version: version, ServerOptions: opts,
				})
				if err != nil {
					return nil, nil, err
				}
				say("%s: epoch %d (%s)", what, l.Epoch, time.Now().UTC().Format(time.RFC3339Nano))
				return l.Server, l.Close, nil
			}

			say("segmap %s controller", version)
			say("  admin API on %s (and the mapping protocol for agents)", l.Addr())
			if u := hs.URL(); u != "" {
				say("  http: metrics on %s (at /metrics)", u)
			}
			hs.Serve()
			if cli != nil {
				if advertise == "" {
					advertise = l.Addr().String()
				}
				if name == "" {
					name = advertise
				}
				say("  metadata: etcd %s under %s; %s advertises %s", ef.endpoints, ef.prefix, name, advertise)
				say("ready: standing by")
				err := ha.Run(ctx, ha.Config{
					Client: cli, Prefix: ef.prefix, Name: name, Advertise: advertise, TTL: ef.ttl,
					Listener: l, ServerOptions: opts, Logger: logger,
					Lead: func(ctx context.Context, st meta.Store, t ha.Term) (*grpc.Server, func(), error) {
						gs, stop, err := lead(ctx, st, fmt.Sprintf("leader (etcd revision %d)", t.Rev))
						if err != nil {
							return nil, nil, err
						}
						cm.Leader(true, true)
						// ha.Run calls this once the term's store is
						// closed and gs has stopped: the leader has
						// stopped acting now. The time is taken before
						// stop, which waits for the controller's lock
						// (a fault may hold it in a commit that etcd,
						// cut off, never answers).
						return gs, func() {
							say("standby: stepped down (%s)", time.Now().UTC().Format(time.RFC3339Nano))
							cm.Leader(false, false)
							stop()
						}, nil
					},
				})
				say("stopped")
				return err
			}

			if err := os.MkdirAll(data, 0o700); err != nil {
				return err
			}
			st, err := meta.OpenBolt(filepath.Join(data, "meta.db"))
			if err != nil {
				return err
			}
			defer st.Close()
			gs, stopLead, err := lead(ctx, st, "leader")
			if err != nil {
				return err
			}
			cm.Leader(true, false)
			errc := make(chan error, 1)
			go func() { errc <- gs.Serve(l) }()
			say("  data:     %s", data)
			say("ready")
			select {
			case <-ctx.Done():
			case err = <-errc:
			}
			stopLead()
			gs.GracefulStop()
			say("stopped")
			if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				return err
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&addr, "listen", "127.0.0.1:10810", "address of the admin API and the mapping protocol (host:port, unix:PATH or fd:N, an inherited socket)")
	fl.StringVar(&data, "data", "./segmap-controller", "data directory (bbolt metadata), without --etcd")
	fl.DurationVar(&lease, "lease", transport.DefaultLease, "agents' lease: how long an agent that cannot renew keeps serving before it fences itself")
	fl.StringVar(&advertise, "advertise", "", "with --etcd: the address agents and the CLI reach this controller at (default: the --listen address)")
	fl.StringVar(&name, "name", "", "with --etcd: this controller's name in logs and etcd (default: its --advertise address)")
	fl.DurationVar(&storageTimeout, "storage-timeout", container.DefaultFailTimeout, "how long I/O to an nbd:// container waits for its storage node to come back; beyond it the container is marked failed and its segments fail I/O (Error) until 'container online'")
	fl.DurationVar(&replicaTimeout, "replica-timeout", container.DefaultReplicaTimeout, "how long a replica of a mirrored container may take to answer the controller's I/O before it is marked failed (keep it under the lease)")
	fl.BoolVar(&deferMaps, "defer-maps", false, "keep the map changes of a disk one agent maps in memory until the agent flushes it (faster first writes; a controller's death or failover then ends the NBD connections that wrote since their last flush; see docs/fault-path.md)")
	ef.add(cmd)
	tf.add(cmd, "controller", false)
	hf.add(cmd, "", "Prometheus metrics at /metrics")
	return cmd
}

// newAgent is `segmap agent`: a mapping agent serving NBD to hosts.
func newAgent() *cobra.Command {
	var ctrlAddr, name, nbdListen string
	var storageTimeout, replicaTimeout time.Duration
	var nbdTLS bool
	tf := &tlsFlags{serverName: "controller"}
	hf := &httpFlags{}
	cmd := &cobra.Command{
		Use:   "agent --controller ADDR --name HOST --nbd-listen ADDR",
		Short: "run a mapping agent: serves the controller's disks over NBD, doing the I/O straight to the containers",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" {
				return usageError{fmt.Errorf("--name is required (the host's name, unique among agents)")}
			}
			logger := newLogger(os.Stderr).With("agent", name)
			// Bind first: a busy port is an error now, not later. Hosts
			// reach it in plaintext unless --nbd-tls: off loopback,
			// only if asked for.
			l, err := listen.Listen(nbdListen)
			if err != nil {
				return fmt.Errorf("NBD listener: %w", err)
			}
			defer l.Close()
			if !nbdTLS && !tf.insecure && !listen.Local(l.Addr()) {
				return exposedError("NBD", "--nbd-listen", nbdListen, l.Addr(), "give --certs DIR --nbd-tls (hosts then present a certificate of the cluster CA)", "--insecure")
			}
			// The agent's certificate reaches the controller and the
			// storage nodes of nbd:// containers.
			m, err := tf.identity(tlsconf.RoleAgent, name, false)
			if err != nil {
				return err
			}
			creds := tf.clientCreds(m)
			if nbdTLS && m == nil {
				return usageError{fmt.Errorf("--nbd-tls needs --certs")}
			}
			hf.insecure = hf.insecure || tf.insecure
			hs, err := newHTTP(hf, m, logger)
			if err != nil {
				return err
			}
			defer hs.Close()
			if err := tf.require(); err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			addrs, err := ha.ParseAddrs(ctrlAddr)
			if err != nil {
				return usageError{fmt.Errorf("--controller: %w", err)}
			}
			conn, err := ha.Dial(addrs, append(transport.DialOptions(), grpc.WithTransportCredentials(creds))...)
			if err != nil {
				return err
			}
			defer conn.Close()
			client := transport.NewClient(conn, logger)
			// Storage nodes serve the agent's containers only under
			// its lease, so that a write held up in an agent paused
			// past its lease cannot land after the controller went
			// on without it.
			var a *agent.Agent
			open := container.LeasedOpener(m, func() time.Time { return a.LeaseUntil() }, container.NBDOptions{Logger: logger, FailTimeout: storageTimeout})
			openReplica := container.LeasedOpener(m, func() time.Time { return a.LeaseUntil() }, container.NBDOptions{Logger: logger, FailTimeout: container.ReplicaFailTimeout(replicaTimeout)})
			am := metrics.NewAgent(hs.Registry)
			a = agent.New(agent.Config{Name: name, Controller: client, OpenContainer: open, OpenReplica: openReplica, ReplicaTimeout: replicaTimeout, Metrics: am})
			runCtx, cancelRun := context.WithCancel(ctx)
			ran := make(chan struct{})
			first := make(chan struct{})
			var once sync.Once
			go func() {
				transport.RunAgent(runCtx, a, client, logger, func() { once.Do(func() { close(first) }) })
				close(ran)
			}()
			// Serve hosts once attached: before that every export would
			// only wait.
			select {
			case <-first:
			case <-ctx.Done():
			}

			ncfg := nbd.Config{Backend: nbdexport.Backend(client, a), Errno: nbdexport.Errno, Logger: logger, Metrics: am.NBD}
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
			if u := hs.URL(); u != "" {
				fmt.Fprintf(w, "  http: metrics on %s (at /metrics)\n", u)
			}
			hs.Serve()
			fmt.Fprintln(w, "ready")
			select {
			case <-ctx.Done():
			case err = <-errc:
			}
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_ = ns.Shutdown(sctx) // the NBD server stops either way; the run's error is what counts
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
	cmd.Flags().StringVar(&ctrlAddr, "controller", "127.0.0.1:10810", "the controller's address; with several controllers, every one's, comma-separated")
	cmd.Flags().StringVar(&name, "name", "", "this agent's (host's) name")
	cmd.Flags().StringVar(&nbdListen, "nbd-listen", "127.0.0.1:10809", "address hosts connect to over NBD (host:port, unix:PATH or fd:N, an inherited socket)")
	cmd.Flags().DurationVar(&storageTimeout, "storage-timeout", container.DefaultFailTimeout, "how long I/O to an nbd:// container waits for its storage node to come back before it fails with EIO")
	cmd.Flags().DurationVar(&replicaTimeout, "replica-timeout", container.DefaultReplicaTimeout, "how long a replica of a mirrored container may take to answer an I/O before the agent reports it failed and goes on with the others (keep it under the lease)")
	cmd.Flags().BoolVar(&nbdTLS, "nbd-tls", false, "require TLS (NBD STARTTLS) from hosts, with a certificate of the cluster CA")
	tf.add(cmd, "", false)
	hf.add(cmd, "", "Prometheus metrics at /metrics")
	cmd.Flags().StringVar(&tf.serverName, "controller-name", "controller", "the controller's certificate name")
	return cmd
}
