package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	pb "segmap/api/segmapv1"
	"segmap/internal/agent/nbdexport"
	"segmap/internal/ctlserver"
	"segmap/internal/ha"
	"segmap/internal/meta"
	"segmap/internal/metrics"
	"segmap/internal/nbd"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/rpc/transport"
	"segmap/internal/size"
	"segmap/internal/standalone"
	"segmap/internal/tlsconf"
)

type upFlags struct {
	data, nbdListen, adminListen, poolSize string
	poolFiles                              int
	agent                                  string
	drain                                  time.Duration
	etcd                                   etcdFlags
	pprof                                  string
	http                                   httpFlags
	tls                                    tlsFlags
	controllerCopies                       bool
	syncMaps                               bool
}

func newUp() *cobra.Command {
	f := &upFlags{}
	cmd := &cobra.Command{
		Use:   "up",
		Short: "run segmap in one process: controller (bbolt), one agent serving NBD, a pool of file containers",
		Long: `up runs the embedded segmap: the controller with its bbolt store at
DATA/meta.db, a pool of sparse container files in DATA/containers, one
mapping agent serving every disk over NBD, and the admin API that the
other segmap commands use. SIGINT or SIGTERM stop it cleanly: I/O in
flight is answered, containers are flushed, the store is closed. Start it
again on the same data directory and every disk is as it was.

The pool is created on first start (--pool-size split in --pool-files
sparse files, 1 MiB slots); a disk with another segment size gets a pool
of its own the same way. 'segmap container add' adds more.

With --etcd the metadata is kept in etcd instead of DATA/meta.db (the
container files stay in DATA): up campaigns for the leadership of
--etcd-prefix, waits until it leads, and stops (fencing its agent first)
if it loses it. Do not share a prefix between 'segmap up' and 'segmap
controller': up serves no remote agents.

Every listener is on loopback by default. With --certs DIR (made by
'segmap certs init DIR') up serves mutual TLS on all of them with the
certificate controller-NAME (--cert-name, default controller): the admin
API takes the admin certificate (the CLI with --certs DIR) or a
controller's, NBD requires STARTTLS and a client certificate of the
cluster CA, the HTTP listener serves HTTPS to admin or controller
certificates. Without --certs, a listener on an address other machines
reach (0.0.0.0, a LAN address) is refused unless --insecure: it would
hand out every disk, and the power to delete them, to the network. The
pprof listener has no TLS: off loopback it needs --insecure always.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runUp(cmd, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.data, "data", "./segmap-data", "data directory (metadata and container files)")
	fl.StringVar(&f.nbdListen, "nbd-listen", "127.0.0.1:10809", "address hosts connect to over NBD (host:port, unix:PATH or fd:N, an inherited socket)")
	fl.StringVar(&f.adminListen, "admin-listen", "127.0.0.1:10810", "address of the admin API (host:port, unix:PATH or fd:N, an inherited socket)")
	fl.StringVar(&f.poolSize, "pool-size", "64G", "total size of the container pool created for each segment size (sparse: costs nothing until written)")
	fl.IntVar(&f.poolFiles, "pool-files", 4, "number of container files the pool is split into")
	fl.StringVar(&f.agent, "agent-name", "local", "name of the embedded agent")
	fl.DurationVar(&f.drain, "drain-timeout", 30*time.Second, "how long a stop waits for I/O in flight")
	fl.BoolVar(&f.controllerCopies, "controller-copies", false, "the controller, not the agent, copies a shared segment for a write into part of it (to compare the two; the agent's copy is the default)")
	fl.BoolVar(&f.syncMaps, "sync-maps", false, "commit every map change before answering the write that made it, not at the client's next flush (to compare; see docs/fault-path.md)")
	fl.StringVar(&f.pprof, "pprof", "", "serve net/http/pprof on this address (profiling; off loopback only with --insecure)")
	f.http.add(cmd, "127.0.0.1:10812", "the dashboard at / and Prometheus metrics at /metrics")
	f.tls.add(cmd, tlsconf.RoleController, false)
	fl.Lookup("certs").Usage = "serve every listener with mutual TLS, with the certificates of this directory made by 'segmap certs init' (ca.crt, controller-NAME.crt/.key)"
	fl.Lookup("cert-name").Usage = "name of up's certificate in --certs (controller-NAME.crt)"
	fl.Lookup("insecure").Usage = "serve plaintext, without TLS or authentication, even on an address other machines reach (only on a trusted network)"
	f.etcd.add(cmd)
	return cmd
}

func runUp(cmd *cobra.Command, f *upFlags) error {
	pool, err := parseSize("pool-size", f.poolSize)
	if err != nil {
		return err
	}
	if f.poolFiles < 1 || f.poolFiles > 1024 {
		return usageError{fmt.Errorf("--pool-files %d: want 1 to 1024", f.poolFiles)}
	}
	logger := newLogger(os.Stderr)
	// up's identity serves every listener; nil: plaintext.
	m, err := f.tls.identity(tlsconf.RoleController, f.tls.name, false)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// Bind first: a busy port is an error now, not later.
	nbdL, err := listenChecked("NBD", "--nbd-listen", f.nbdListen, m != nil, f.tls.insecure, "--insecure")
	if err != nil {
		return err
	}
	defer nbdL.Close()
	adminL, err := listenChecked("admin API", "--admin-listen", f.adminListen, m != nil, f.tls.insecure, "--insecure")
	if err != nil {
		return err
	}
	defer adminL.Close()
	f.http.insecure = f.http.insecure || f.tls.insecure
	hs, err := newHTTP(&f.http, m, logger)
	if err != nil {
		return err
	}
	defer hs.Close()
	if f.pprof != "" {
		stopPprof, err := servePprof(f.pprof, f.tls.insecure, logger)
		if err != nil {
			return err
		}
		defer stopPprof()
	}

	w := cmd.OutOrStdout()
	opts := standalone.Options{
		Agents:   []string{f.agent},
		AutoPool: &standalone.AutoPool{Bytes: pool, Count: f.poolFiles},
		Logger:   logger,

		ControllerCopies: f.controllerCopies,
		SyncMaps:         f.syncMaps,

		ControllerMetrics: metrics.NewController(hs.Registry, nil),
		AgentMetrics:      metrics.NewAgent(hs.Registry),
	}
	var lost <-chan struct{} // closed if the etcd leadership is lost
	metaDesc := filepath.Join(f.data, "meta.db")
	if f.etcd.endpoints != "" {
		cli, err := f.etcd.client()
		if err != nil {
			return err
		}
		defer cli.Close()
		if err := f.etcd.reachable(ctx, cli); err != nil {
			return err
		}
		fmt.Fprintf(w, "campaigning for the leadership of the controllers under %s in etcd %s\n", f.etcd.prefix, f.etcd.endpoints)
		l, err := ha.Elect(ctx, ha.Config{Client: cli, Prefix: f.etcd.prefix, Name: "up/" + f.agent, Advertise: adminL.Addr().String(), TTL: f.etcd.ttl, Logger: logger})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		defer l.Resign()
		lost = l.Done()
		opts.OpenStore = func(context.Context) (meta.Store, error) { return l.Store, nil }
		metaDesc = fmt.Sprintf("etcd %s under %s", f.etcd.endpoints, f.etcd.prefix)
	}
	c, err := standalone.Open(ctx, f.data, opts)
	if err != nil {
		return err
	}
	if lost != nil {
		// Agents of an earlier leader may still hold leases.
		if err := c.Ctrl.Hold(transport.DefaultLease); err != nil {
			c.Close()
			return err
		}
	}
	closed := false
	defer func() {
		if !closed {
			c.Close()
		}
	}()
	// Storage that fails marks its container failed.
	defer ctlserver.Watch(c.Ctrl)()

	// The admin API can delete every disk: with TLS, only the admin's
	// certificate (the CLI) and a controller's may call it.
	gs := grpc.NewServer(append(adminapi.ServerOptions(), grpc.Creds(serverCreds(m, tlsconf.RoleAdmin, tlsconf.RoleController)))...)
	pb.RegisterAdminServer(gs, ctlserver.NewAdmin(c.Ctrl, nil, adminapi.Config{
		Provision:  c.Provision,
		NBDAddress: nbdL.Addr().String(),
		Version:    version,
	}))
	opts.ControllerMetrics.Leader(true, lost != nil)
	ncfg := nbd.Config{Backend: nbdexport.Backend(c.Ctrl, c.Agents[0]), Errno: nbdexport.Errno, Logger: logger, Metrics: opts.AgentMetrics.NBD}
	if m != nil {
		// Hosts must upgrade with STARTTLS and present a certificate
		// of the cluster CA, as with 'segmap agent --nbd-tls'.
		ncfg.TLS, ncfg.TLSRequired = m.Server(), true
	}
	ns := nbd.NewServer(ncfg)

	role := "embedded"
	if lost != nil {
		role = "leader" // up serves only once it leads
	}
	stopDash, err := mountDashboard(hs, adminL.Addr(), upAdminCreds(m), func() string { return role }, logger)
	if err != nil {
		return err
	}
	defer stopDash()

	errc := make(chan error, 2)
	go func() { errc <- gs.Serve(adminL) }()
	go func() { errc <- ns.Serve(nbdL) }()
	hs.Serve()

	cs, _ := c.Ctrl.ListContainers(ctx)
	var total uint64
	for _, ct := range cs {
		total += ct.Slots * ct.SlotSize
	}
	fmt.Fprintf(w, "segmap %s up\n", version)
	fmt.Fprintf(w, "  data:       %s (metadata %s, %d containers, %s)\n", c.Dir, metaDesc, len(cs), size.Format(total))
	if m != nil {
		fmt.Fprintf(w, "  controller: admin API on %s (TLS: certificate %s-%s; clients: admin, controllers)   try: segmap --certs %s disk create vm1 --size 10G\n", adminL.Addr(), m.Role(), m.Name(), f.tls.certs)
		fmt.Fprintf(w, "  agent:      %q, NBD on %s (STARTTLS required, with a certificate of the cluster CA)\n", f.agent, nbdL.Addr())
	} else {
		fmt.Fprintf(w, "  controller: admin API on %s   try: segmap disk create vm1 --size 10G\n", adminL.Addr())
		fmt.Fprintf(w, "  agent:      %q, NBD on %s   try: nbdinfo --list nbd://%s\n", f.agent, nbdL.Addr(), nbdL.Addr())
	}
	if u := hs.URL(); u != "" {
		fmt.Fprintf(w, "  http:       dashboard and metrics on %s\n", u)
	}
	fmt.Fprintf(w, "ready; stop with Ctrl-C\n")

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	case <-lost:
		serveErr = errors.New("lost the leadership in etcd: stopping (another controller leads now)")
		fctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := c.Fence(fctx); err != nil {
			logger.Warn("fence", "err", err)
		}
		cancel()
	}
	fmt.Fprintln(w, "stopping: draining I/O")
	sctx, cancel := context.WithTimeout(context.Background(), f.drain)
	defer cancel()
	if err := ns.Shutdown(sctx); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
		logger.Warn("NBD shutdown", "err", err)
	}
	gs.GracefulStop()
	closed = true
	if err := c.Close(); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	fmt.Fprintln(w, "stopped")
	if serveErr != nil && !errors.Is(serveErr, nbd.ErrServerClosed) && !errors.Is(serveErr, grpc.ErrServerStopped) {
		return serveErr
	}
	return nil
}

// upAdminCreds returns the credentials a client inside 'segmap up' (the
// dashboard) dials up's admin API with: its own certificate, a
// controller's, which the admin API takes; plaintext without --certs.
func upAdminCreds(m *tlsconf.Material) credentials.TransportCredentials {
	if m == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(m.Client(m.Name(), tlsconf.RoleController))
}
