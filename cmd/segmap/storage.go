package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"segmap/internal/metrics"
	"segmap/internal/nbd"
	"segmap/internal/size"
	"segmap/internal/storage"
	"segmap/internal/tlsconf"
)

// newStorage is `segmap storage`: a storage node serving the files of a
// directory and named block devices over NBD, and `segmap storage create`
// to add a file.
func newStorage() *cobra.Command {
	var dir, addr, prefix string
	var devs []string
	var drain time.Duration
	tf := &tlsFlags{}
	hf := &httpFlags{}
	cmd := &cobra.Command{
		Use:   "storage --listen ADDR [--dir DIR] [--device NAME=/dev/X ...] --certs DIR [--cert-name NAME] [--export-prefix P]",
		Short: "run a storage node: serve every regular file in DIR, and each --device, as an NBD export",
		Long: `storage serves every regular file in DIR as a read-write NBD export named
after the file, and each block device given with --device NAME=/dev/X
(repeatable) as the export NAME, its size the device's (with
--export-prefix in front of every name). An export is the file's or
device's raw bytes: the node knows nothing of segmap, so a controller
formats a container on an export over NBD ('segmap container add
nbd://HOST:PORT/NAME --format', which refuses an export holding a file
system or a container unless --force) and agents open it as
nbd://HOST:PORT/NAME, as they would a qemu-nbd or nbdkit export. Files
starting with '.', directories, symbolic links and device nodes in DIR are
not served: a block device is served only when named with --device (a
symbolic link such as /dev/disk/by-id/... is followed there), and its name
hides a file of the same name. Files added while the node runs are served
at once; 'segmap storage create' makes one. At least one of --dir and
--device is needed.

With --certs (a directory made by 'segmap certs init --storage NAME'), the
node requires TLS: a client must upgrade with NBD_OPT_STARTTLS before any
other option and present an agent or controller certificate of the
cluster CA; the node presents its certificate storage-NAME (--cert-name).
Agents and controllers started with --certs reach every nbd:// container
this way, naming the URI's host, which the node's certificate must carry.
Plaintext only with an explicit --insecure.

TRIM and WRITE_ZEROES punch holes (fallocate; on a block device, a discard
that reads back as zeros), FLUSH and FUA are fdatasync. SIGINT or SIGTERM
stop the node cleanly: requests in flight are answered first.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" && len(devs) == 0 {
				return usageError{errors.New("--dir or --device is required")}
			}
			devices, err := parseDevices(devs)
			if err != nil {
				return err
			}
			return runStorage(cmd, dir, devices, addr, prefix, drain, tf, hf)
		},
	}
	cmd.PersistentFlags().StringVar(&dir, "dir", "", "directory whose files are the exports")
	fl := cmd.Flags()
	fl.StringArrayVar(&devs, "device", nil, "serve block device PATH as export NAME (NAME=PATH; repeatable)")
	fl.StringVar(&addr, "listen", "127.0.0.1:10809", "address to serve NBD on (host:port, unix:PATH or fd:N, an inherited socket)")
	fl.StringVar(&prefix, "export-prefix", "", "prefix of every export name")
	fl.DurationVar(&drain, "drain-timeout", 30*time.Second, "how long a stop waits for requests in flight")
	tf.add(cmd, tlsconf.RoleStorage, false)
	hf.add(cmd, "", "Prometheus metrics at /metrics")

	var sz string
	create := &cobra.Command{
		Use:   "create --dir DIR NAME --size SIZE",
		Short: "create a sparse file NAME of SIZE bytes in DIR, to be served as an export",
		Long: `create makes a sparse file in DIR that a running storage node serves at
once. It has no header: the controller formats it as a container over NBD.
An existing file is never replaced.`,
		Args: exactArgs(1, "the file name: segmap storage create --dir DIR NAME --size SIZE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				return usageError{errors.New("--dir is required")}
			}
			if sz == "" {
				return usageError{errors.New("--size is required")}
			}
			n, err := parseSize("size", sz)
			if err != nil {
				return err
			}
			if err := storage.CheckName(args[0]); err != nil {
				return usageError{err}
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			if err := storage.Create(dir, args[0], n); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created %s (%s, sparse)\n", filepath.Join(dir, args[0]), size.Format(n))
			return nil
		},
	}
	create.Flags().StringVar(&sz, "size", "", "size of the file (4096, 64M, 10G, ...)")
	cmd.AddCommand(create)
	return cmd
}

// parseDevices parses the --device flags, NAME=PATH each.
func parseDevices(flags []string) ([]storage.Device, error) {
	var out []storage.Device
	for _, f := range flags {
		name, path, ok := strings.Cut(f, "=")
		if !ok || path == "" {
			return nil, usageError{fmt.Errorf("--device %q: want NAME=PATH, such as disk1=/dev/sdb", f)}
		}
		if err := storage.CheckName(name); err != nil {
			return nil, usageError{fmt.Errorf("--device %q: %w", f, err)}
		}
		out = append(out, storage.Device{Name: name, Path: path})
	}
	return out, nil
}

// runStorage serves dir ("" for none) and devices; with --certs, over TLS
// that clients must start and that admits agents and controllers.
func runStorage(cmd *cobra.Command, dir string, devices []storage.Device, addr, prefix string, drain time.Duration, tf *tlsFlags, hf *httpFlags) error {
	logger := newLogger(os.Stderr)
	// Bind first: a busy port is an error now, not later; and one the
	// network reaches is refused in plaintext unless asked for.
	l, err := listenChecked("NBD", "--listen", addr, tf.certs != "", tf.insecure, "--insecure")
	if err != nil {
		return err
	}
	defer l.Close()
	m, err := tf.identity(tlsconf.RoleStorage, tf.name, false)
	if err != nil {
		return err
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
	backend, err := storage.NewDir(dir, prefix, devices...)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// Agents open their containers with a lease (see
	// container.LeasedOpener): requests of an agent whose lease ran out
	// are refused.
	cfg := nbd.Config{Backend: backend, Errno: storage.Errno, Logger: logger, Leases: true, Metrics: metrics.NewStorage(hs.Registry)}
	// Clients that reconnect after this node restarts learn whether the
	// writes it answered without a flush survived (a restart of the
	// process) or may not have (a reboot of the machine).
	if id, err := storage.CacheID(); err == nil {
		cfg.CacheID = id
	} else {
		logger.Warn("serving without a write cache id: clients will take unflushed writes as lost after a reconnection", "err", err)
	}
	if m != nil {
		cfg.TLS = m.Server(tlsconf.RoleAgent, tlsconf.RoleController)
		cfg.TLSRequired = true
	}
	srv := nbd.NewServer(cfg)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()

	exports, _ := backend.List(ctx)
	sizes := map[string]uint64{}
	for _, x := range exports {
		sizes[x.Name] = x.Size
	}
	files := len(exports)
	for _, dv := range backend.Devices() {
		if _, ok := sizes[prefix+dv.Name]; ok {
			files--
		}
	}
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "segmap %s storage node\n", version)
	if dir != "" {
		if abs, err := filepath.Abs(dir); err == nil {
			dir = abs
		}
		fmt.Fprintf(w, "  dir:  %s (%d exports)\n", dir, files)
	}
	for _, dv := range backend.Devices() {
		sz, ok := sizes[prefix+dv.Name]
		state := size.Format(sz)
		if !ok {
			state = "cannot be opened now"
		}
		fmt.Fprintf(w, "  device: %s%s = %s (%s)\n", prefix, dv.Name, dv.Path, state)
	}
	if m != nil {
		fmt.Fprintf(w, "  NBD:  %s, TLS required (certificate %s-%s; clients: agents, controllers)\n", l.Addr(), m.Role(), m.Name())
	} else {
		fmt.Fprintf(w, "  NBD:  %s, plaintext   try: nbdinfo --list nbd://%s\n", l.Addr(), l.Addr())
	}
	if u := hs.URL(); u != "" {
		fmt.Fprintf(w, "  http: metrics on %s (at /metrics)\n", u)
	}
	hs.Serve()
	fmt.Fprintf(w, "ready; stop with Ctrl-C\n")

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	fmt.Fprintln(w, "stopping: draining I/O")
	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
		logger.Warn("NBD shutdown", "err", err)
	}
	srv.Close()
	if serveErr == nil {
		serveErr = <-errc
	}
	fmt.Fprintln(w, "stopped")
	if !errors.Is(serveErr, nbd.ErrServerClosed) {
		return serveErr
	}
	return nil
}
